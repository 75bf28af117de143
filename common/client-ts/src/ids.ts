// Message ids are unsigned 64-bit integers carried as canonical decimal strings (no sign,
// no leading zeros). They are never turned into JavaScript numbers, which lose precision
// past 2^53: canonical decimals compare by length, then character by character.

/** A message id as the servers send it: a decimal string. */
export type MessageId = string;

const CANONICAL = /^(0|[1-9][0-9]{0,19})$/;
const MAX = "18446744073709551615";

/** True for a canonical id: digits, no sign or leading zero, at most 2^64-1. */
export function isMessageId(s: unknown): s is MessageId {
  return typeof s === "string" && CANONICAL.test(s) && compareIds(s, MAX) <= 0;
}

/** Negative, zero or positive as `a` is older than, the same as, or newer than `b`. */
export function compareIds(a: MessageId, b: MessageId): number {
  if (a.length !== b.length) return a.length - b.length;
  return a < b ? -1 : a > b ? 1 : 0;
}
