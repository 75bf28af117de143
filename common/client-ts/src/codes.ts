// Error and close codes with their retry policy: the table of common/src/codes.rs.
// A Rust test (common/tests/client_ts_codes.rs) fails if this file drifts from it.

/** What a client does about an error or a close. */
export type Retry = "reconnect_and_resume" | "retry_later" | "do_not_retry";

/** Every `code` an error frame or an HTTP refusal may carry, and its retry policy. */
export const ERROR_CODES = {
  bad_json: "do_not_retry",
  unknown_type: "do_not_retry",
  invalid_field: "do_not_retry",
  body_too_long: "do_not_retry",
  frame_too_large: "do_not_retry",
  not_joined: "do_not_retry",
  unauthorized: "do_not_retry",
  forbidden: "do_not_retry",
  rate_limited: "retry_later",
  overloaded: "retry_later",
  store_unavailable: "retry_later",
  room_moved: "reconnect_and_resume",
  going_away: "reconnect_and_resume",
  node_unavailable: "retry_later",
  room_unavailable: "retry_later",
  not_found: "do_not_retry",
  method_not_allowed: "do_not_retry",
  internal: "reconnect_and_resume",
  room_ended: "do_not_retry",
  webhook_failed: "retry_later",
} as const satisfies Record<string, Retry>;

export type ErrorCode = keyof typeof ERROR_CODES;

/** The WebSocket close codes the servers send: name and retry policy. */
export const CLOSE_CODES = {
  1000: ["normal", "do_not_retry"],
  1001: ["going_away", "reconnect_and_resume"],
  1002: ["protocol_error", "do_not_retry"],
  1009: ["frame_too_large", "do_not_retry"],
  4000: ["slow_consumer", "reconnect_and_resume"],
  4001: ["room_moved", "reconnect_and_resume"],
  4002: ["bridge_interrupted", "reconnect_and_resume"],
  4003: ["unauthorized", "do_not_retry"],
  4008: ["idle_timeout", "reconnect_and_resume"],
  4029: ["rate_limited", "retry_later"],
} as const satisfies Record<number, readonly [string, Retry]>;

/** The retry policy of an error code; unknown codes (a newer server) are not retried. */
export function errorRetry(code: string): Retry {
  return (ERROR_CODES as Record<string, Retry>)[code] ?? "do_not_retry";
}

/**
 * The retry policy of a close code. Codes the servers do not send (1006 when a node dies,
 * 1011 from a proxy) are network failures: reconnect and resume.
 */
export function closeRetry(code: number): Retry {
  const known = (CLOSE_CODES as Record<number, readonly [string, Retry]>)[code];
  return known ? known[1] : "reconnect_and_resume";
}

/** The name of a close code (`slow_consumer` for 4000), or `close_<code>` for others. */
export function closeName(code: number): string {
  const known = (CLOSE_CODES as Record<number, readonly [string, Retry]>)[code];
  return known ? known[0] : `close_${code}`;
}
