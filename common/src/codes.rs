//! The one table of error codes and close codes, with the retry policy of each.
//!
//! An error reaches a client in one of three forms: an `error` frame with a stable string
//! `code` (the connection stays open), an HTTP status with a JSON body carrying the same
//! `code`, or a WebSocket close code (the connection ends). `common/PROTOCOL.md` renders this
//! table for people; the `table_is_consistent` test keeps the two forms in step.

use serde::{Deserialize, Serialize};

/// What a client should do after an error or close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retry {
    /// Reconnect (through the router or load balancer) and rejoin with `since` = the last id
    /// seen; nothing is lost.
    ReconnectAndResume,
    /// The same request may succeed later: back off, then resend with the same `cid`.
    RetryLater,
    /// Retrying the same request will fail the same way; fix the request or the credentials.
    DoNotRetry,
}

/// Error codes carried in `error` frames and HTTP JSON bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON, or a field has the wrong type.
    BadJson,
    /// The frame's `type` is not one this server knows.
    UnknownType,
    /// A field failed validation (room id, cid, `since`, query parameter).
    InvalidField,
    /// The message body is longer than the configured maximum.
    BodyTooLong,
    /// A frame or HTTP body is larger than the configured maximum.
    FrameTooLarge,
    /// `send` or `leave` for a room this connection has not joined.
    NotJoined,
    /// Missing, malformed, expired or wrongly signed token.
    Unauthorized,
    /// The token is valid but does not allow this room.
    Forbidden,
    /// The sender exceeded its send rate.
    RateLimited,
    /// The room or node is at capacity (room inbox full, connection limit reached).
    Overloaded,
    /// The message store did not confirm the write; the message was not acked.
    StoreUnavailable,
    /// This node does not own the room; reconnect through the router.
    RoomMoved,
    /// The node is shutting down.
    GoingAway,
    /// The router could not reach the room's owner, or knows no live node.
    NodeUnavailable,
    /// The room is between owners: this node is waiting for the previous owner to let go,
    /// or has lost its lease. Nothing was stored; retry shortly (with the same `cid`).
    RoomUnavailable,
    /// The HTTP route does not exist.
    NotFound,
    /// The HTTP method is not allowed on this route.
    MethodNotAllowed,
    /// A bug or an unexpected failure inside the node.
    Internal,
    /// The room has ended (by the API or its TTL): no more joins or sends; its history
    /// stays readable.
    RoomEnded,
    /// The app's webhook endpoint did not take the delivery (a dead letter's replay).
    WebhookFailed,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 20] = [
        ErrorCode::BadJson,
        ErrorCode::UnknownType,
        ErrorCode::InvalidField,
        ErrorCode::BodyTooLong,
        ErrorCode::FrameTooLarge,
        ErrorCode::NotJoined,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::Overloaded,
        ErrorCode::StoreUnavailable,
        ErrorCode::RoomMoved,
        ErrorCode::GoingAway,
        ErrorCode::NodeUnavailable,
        ErrorCode::RoomUnavailable,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Internal,
        ErrorCode::RoomEnded,
        ErrorCode::WebhookFailed,
    ];

    /// The stable string used on the wire and as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::BodyTooLong => "body_too_long",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::RoomMoved => "room_moved",
            ErrorCode::GoingAway => "going_away",
            ErrorCode::NodeUnavailable => "node_unavailable",
            ErrorCode::RoomUnavailable => "room_unavailable",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Internal => "internal",
            ErrorCode::RoomEnded => "room_ended",
            ErrorCode::WebhookFailed => "webhook_failed",
        }
    }

    pub fn retry(self) -> Retry {
        match self {
            ErrorCode::RateLimited
            | ErrorCode::Overloaded
            | ErrorCode::StoreUnavailable
            | ErrorCode::NodeUnavailable
            | ErrorCode::RoomUnavailable
            | ErrorCode::WebhookFailed => Retry::RetryLater,
            ErrorCode::RoomMoved | ErrorCode::GoingAway | ErrorCode::Internal => {
                Retry::ReconnectAndResume
            }
            _ => Retry::DoNotRetry,
        }
    }

    /// The HTTP status used when this code answers an HTTP request.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadJson
            | ErrorCode::UnknownType
            | ErrorCode::InvalidField
            | ErrorCode::BodyTooLong
            | ErrorCode::NotJoined => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::RoomMoved => 421,
            ErrorCode::RoomEnded => 410,
            ErrorCode::WebhookFailed => 502,
            ErrorCode::FrameTooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Internal => 500,
            ErrorCode::Overloaded
            | ErrorCode::StoreUnavailable
            | ErrorCode::GoingAway
            | ErrorCode::NodeUnavailable
            | ErrorCode::RoomUnavailable => 503,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WebSocket close codes this server sends. Values 1000-1015 are RFC 6455's; 4000-4999 are
/// ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// The client closed, or left cleanly.
    Normal,
    /// The node is shutting down or draining.
    GoingAway,
    /// A WebSocket protocol violation (bad opcode, bad UTF-8, bad fragmenting).
    ProtocolError,
    /// A frame or message larger than the configured maximum.
    FrameTooLarge,
    /// The client's outbound queue was full: it did not read fast enough.
    SlowConsumer,
    /// The room is now owned by another node.
    RoomMoved,
    /// A room joined through another node's bridge lost frames or its bus link.
    BridgeInterrupted,
    /// The token expired during the session.
    Unauthorized,
    /// The peer sent nothing (not even a pong) for longer than the idle timeout.
    IdleTimeout,
    /// The client kept sending far past its rate limit despite `rate_limited` errors.
    RateLimited,
}

impl CloseCode {
    pub const ALL: [CloseCode; 10] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::FrameTooLarge,
        CloseCode::SlowConsumer,
        CloseCode::RoomMoved,
        CloseCode::BridgeInterrupted,
        CloseCode::Unauthorized,
        CloseCode::IdleTimeout,
        CloseCode::RateLimited,
    ];

    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::FrameTooLarge => 1009,
            CloseCode::SlowConsumer => 4000,
            CloseCode::RoomMoved => 4001,
            CloseCode::BridgeInterrupted => 4002,
            CloseCode::Unauthorized => 4003,
            CloseCode::IdleTimeout => 4008,
            CloseCode::RateLimited => 4029,
        }
    }

    pub fn from_code(code: u16) -> Option<CloseCode> {
        CloseCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// Short stable name, used as the close reason text and as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::GoingAway => "going_away",
            CloseCode::ProtocolError => "protocol_error",
            CloseCode::FrameTooLarge => "frame_too_large",
            CloseCode::SlowConsumer => "slow_consumer",
            CloseCode::RoomMoved => "room_moved",
            CloseCode::BridgeInterrupted => "bridge_interrupted",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::IdleTimeout => "idle_timeout",
            CloseCode::RateLimited => "rate_limited",
        }
    }

    pub fn retry(self) -> Retry {
        match self {
            CloseCode::Normal
            | CloseCode::ProtocolError
            | CloseCode::FrameTooLarge
            | CloseCode::Unauthorized => Retry::DoNotRetry,
            CloseCode::RateLimited => Retry::RetryLater,
            CloseCode::GoingAway
            | CloseCode::SlowConsumer
            | CloseCode::RoomMoved
            | CloseCode::BridgeInterrupted
            | CloseCode::IdleTimeout => Retry::ReconnectAndResume,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        let mut codes = std::collections::HashSet::new();
        for c in CloseCode::ALL {
            assert!(codes.insert(c.code()), "duplicate close code {}", c.code());
            assert_eq!(CloseCode::from_code(c.code()), Some(c));
            assert!(c.code() == 1000 || c.code() >= 1001);
        }
        let mut names = std::collections::HashSet::new();
        for e in ErrorCode::ALL {
            assert!(names.insert(e.as_str()));
            let json = serde_json::to_string(&e).expect("ser");
            assert_eq!(json, format!("\"{}\"", e.as_str()));
            assert!((400..600).contains(&e.http_status()));
        }
    }

    /// The TypeScript client's copy of the table (`client-ts/src/codes.ts`) says the same:
    /// every code, its name and its retry policy, and nothing else.
    #[test]
    fn the_typescript_client_has_the_same_table() {
        let ts = include_str!("../client-ts/src/codes.ts");
        let retry = |r: Retry| match r {
            Retry::ReconnectAndResume => "reconnect_and_resume",
            Retry::RetryLater => "retry_later",
            Retry::DoNotRetry => "do_not_retry",
        };
        for e in ErrorCode::ALL {
            let line = format!("  {}: \"{}\",", e.as_str(), retry(e.retry()));
            assert!(ts.contains(&line), "codes.ts lacks `{line}`");
        }
        for c in CloseCode::ALL {
            let line = format!(
                "  {}: [\"{}\", \"{}\"],",
                c.code(),
                c.as_str(),
                retry(c.retry())
            );
            assert!(ts.contains(&line), "codes.ts lacks `{line}`");
        }
        let entries = |start: &str| {
            let block = ts
                .split(start)
                .nth(1)
                .expect("table")
                .split("} as const")
                .next();
            block
                .expect("end")
                .lines()
                .filter(|l| l.contains(':'))
                .count()
        };
        assert_eq!(
            entries("export const ERROR_CODES = {"),
            ErrorCode::ALL.len()
        );
        assert_eq!(
            entries("export const CLOSE_CODES = {"),
            CloseCode::ALL.len()
        );
    }

    #[test]
    fn documented_in_protocol_md() {
        let doc = include_str!("../PROTOCOL.md");
        for e in ErrorCode::ALL {
            assert!(
                doc.contains(&format!("`{}`", e.as_str())),
                "{e} missing from PROTOCOL.md"
            );
        }
        for c in CloseCode::ALL {
            assert!(
                doc.contains(&format!("| {} ", c.code())),
                "{} missing",
                c.code()
            );
        }
    }
}
