//! Protocol v1: JSON text frames tagged by `type`.
//!
//! Client frames: `join`, `leave`, `send`. Server frames: `joined`, `left`, `message`, `ack`,
//! `error`, `presence`. `common/PROTOCOL.md` documents each with examples. Unknown fields are
//! ignored so newer clients can talk to older nodes; unknown `type`s are answered with
//! `unknown_type`.

use serde::{Deserialize, Serialize};

use crate::codes::ErrorCode;
use crate::id::MessageId;
use crate::names::{ClientMsgId, RoomId, UserId};

/// A frame sent by a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Join a room; with `since`, first receive every stored message after that id.
    Join {
        room: RoomId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<MessageId>,
    },
    /// Leave a room.
    Leave { room: RoomId },
    /// Send a message; `cid` is the sender's id for it, reused on retries.
    Send {
        room: RoomId,
        cid: ClientMsgId,
        body: String,
    },
    /// Asks for a `pong`: how a client that cannot send WebSocket pings (a browser) finds
    /// out that its connection is alive.
    Ping,
}

/// A client frame that could not be accepted, with the code to answer it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    /// The frame's `cid`, when it had a readable one, so the client can match the error.
    pub cid: Option<String>,
    pub room: Option<String>,
}

impl FrameError {
    fn new(code: ErrorCode, message: impl Into<String>, raw: &RawFrame) -> Self {
        FrameError {
            code,
            message: message.into(),
            cid: raw.cid.as_str().map(str::to_owned),
            room: raw.room.as_str().map(str::to_owned),
        }
    }
}

/// One field of a frame as it came: a string, something else (named for the error), or
/// absent. Reading fields this way lets a wrongly typed field get `invalid_field` with the
/// frame's `cid` and `room` echoed, instead of failing the whole frame.
#[derive(Debug, Default)]
enum Loose {
    #[default]
    Absent,
    Str(String),
    Other(&'static str),
}

impl Loose {
    fn as_str(&self) -> Option<&str> {
        match self {
            Loose::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The string, or `invalid_field` naming `field` when it is missing or not a string.
    fn string(&self, field: &str, raw: &RawFrame) -> Result<&str, FrameError> {
        match self {
            Loose::Str(s) => Ok(s),
            Loose::Absent => Err(FrameError::new(
                ErrorCode::InvalidField,
                format!("missing {field}"),
                raw,
            )),
            Loose::Other(kind) => Err(FrameError::new(
                ErrorCode::InvalidField,
                format!("{field} must be a string, not {kind}"),
                raw,
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Loose;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, v: &str) -> Result<Loose, E> {
                Ok(Loose::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Loose, E> {
                Ok(Loose::Str(v))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Loose, E> {
                Ok(Loose::Other("a boolean"))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Loose, E> {
                Ok(Loose::Other("a number"))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Loose, E> {
                Ok(Loose::Other("a number"))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Loose, E> {
                Ok(Loose::Other("a number"))
            }
            fn visit_unit<E>(self) -> Result<Loose, E> {
                Ok(Loose::Absent)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Loose, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Loose::Other("an array"))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Loose, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Loose::Other("an object"))
            }
        }
        d.deserialize_any(V)
    }
}

/// Loose shape used to give precise error codes: JSON errors, unknown types and invalid
/// fields are told apart, and a frame that is an object keeps its `cid` and `room` for the
/// error whatever else is wrong with it. `null` counts as absent.
#[derive(Deserialize)]
struct RawFrame {
    #[serde(rename = "type", default)]
    kind: Loose,
    #[serde(default)]
    room: Loose,
    #[serde(default)]
    since: Loose,
    #[serde(default)]
    cid: Loose,
    #[serde(default)]
    body: Loose,
}

/// `cid` alone and `room` alone, for a frame that cannot be read whole: each read skips
/// every other field unread, so a field that cannot be held does not hide them.
#[derive(Deserialize)]
struct CidAlone {
    #[serde(default)]
    cid: Loose,
}

#[derive(Deserialize)]
struct RoomAlone {
    #[serde(default)]
    room: Loose,
}

impl ClientFrame {
    /// Parses and validates a client frame. `max_body` is the longest accepted `body`, in
    /// bytes.
    pub fn parse(bytes: &[u8], max_body: usize) -> Result<ClientFrame, FrameError> {
        // serde would also read a struct from an array (`["send", …]`); a frame is an object.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(FrameError {
                code: ErrorCode::BadJson,
                message: "a frame is a JSON object".into(),
                cid: None,
                room: None,
            });
        }
        // Checked whole first: serde_json skips the strings of ignored fields without
        // checking them, so bad UTF-8 inside one would pass (found by fuzzing). The node's
        // reader has checked text frames already; this keeps `parse` right for any caller,
        // and `from_str` then skips the per-string checks, so it costs about the same.
        let text = std::str::from_utf8(bytes).map_err(|e| FrameError {
            code: ErrorCode::BadJson,
            message: format!("invalid frame: not UTF-8: {e}"),
            cid: None,
            room: None,
        })?;
        let raw: RawFrame = serde_json::from_str(text).map_err(|e| {
            // Valid JSON that a field cannot hold (`1e999`, nesting past serde_json's limit)
            // fails the whole read; `cid` and `room` are then read alone, each skipping the rest.
            let cid = serde_json::from_str::<CidAlone>(text).map(|f| f.cid);
            let room = serde_json::from_str::<RoomAlone>(text).map(|f| f.room);
            FrameError {
                code: ErrorCode::BadJson,
                message: format!("invalid frame: {e}"),
                cid: cid.ok().and_then(|l| l.as_str().map(str::to_owned)),
                room: room.ok().and_then(|l| l.as_str().map(str::to_owned)),
            }
        })?;
        let kind = match &raw.kind {
            Loose::Str(k) => k.as_str(),
            Loose::Absent => return Err(FrameError::new(ErrorCode::BadJson, "missing type", &raw)),
            Loose::Other(kind) => {
                return Err(FrameError::new(
                    ErrorCode::BadJson,
                    format!("type must be a string, not {kind}"),
                    &raw,
                ))
            }
        };
        let room = || -> Result<RoomId, FrameError> {
            let r = raw.room.string("room", &raw)?;
            RoomId::new(r)
                .map_err(|e| FrameError::new(ErrorCode::InvalidField, e.to_string(), &raw))
        };
        match kind {
            "join" => {
                let since = match &raw.since {
                    Loose::Absent => None,
                    Loose::Str(s) => Some(s.parse().map_err(|_| {
                        FrameError::new(
                            ErrorCode::InvalidField,
                            "since must be a message id as a decimal string",
                            &raw,
                        )
                    })?),
                    Loose::Other(_) => {
                        return Err(FrameError::new(
                            ErrorCode::InvalidField,
                            "since must be a message id as a decimal string",
                            &raw,
                        ))
                    }
                };
                Ok(ClientFrame::Join {
                    room: room()?,
                    since,
                })
            }
            "leave" => Ok(ClientFrame::Leave { room: room()? }),
            "ping" => Ok(ClientFrame::Ping),
            "send" => {
                let room = room()?;
                let cid = ClientMsgId::new(raw.cid.string("cid", &raw)?)
                    .map_err(|e| FrameError::new(ErrorCode::InvalidField, e.to_string(), &raw))?;
                let body = raw.body.string("body", &raw)?;
                if body.len() > max_body {
                    return Err(FrameError::new(
                        ErrorCode::BodyTooLong,
                        format!("body is {} bytes; the limit is {max_body}", body.len()),
                        &raw,
                    ));
                }
                Ok(ClientFrame::Send {
                    room,
                    cid,
                    body: body.to_owned(),
                })
            }
            other => Err(FrameError::new(
                ErrorCode::UnknownType,
                format!("unknown frame type {other:?}"),
                &raw,
            )),
        }
    }
}

/// A stored chat message, as delivered live, replayed and served by the history API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub room: RoomId,
    pub id: MessageId,
    pub from: UserId,
    pub cid: ClientMsgId,
    pub body: String,
    /// Unix milliseconds when the owner accepted the message.
    pub ts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceEvent {
    Join,
    Leave,
}

/// Most users a `joined` frame lists; a bigger room sends only the count.
pub const JOINED_USERS_MAX: usize = 100;

/// A frame sent by the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The join was accepted. `head` is the room's newest id at that moment: with `since`,
    /// replayed messages up to `head` follow, then live ones.
    Joined {
        room: RoomId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        head: Option<MessageId>,
        /// Users connected to the room across the cluster, this joiner included.
        #[serde(default)]
        members: u32,
        /// Who they are, sorted, when there are at most [`JOINED_USERS_MAX`] of them
        /// (otherwise absent: ask `GET /v1/rooms/{room}/presence`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        users: Option<Vec<UserId>>,
    },
    Left {
        room: RoomId,
    },
    Message(ChatMessage),
    /// The message with this `cid` is durable in the store under `id`.
    Ack {
        room: RoomId,
        cid: ClientMsgId,
        id: MessageId,
        /// True when this `cid` had been accepted before: nothing new was stored or sent.
        #[serde(default)]
        duplicate: bool,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cid: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        room: Option<String>,
        /// With `room_moved`: the `host:port` of the node that owns the room now.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    Presence {
        room: RoomId,
        user: UserId,
        event: PresenceEvent,
    },
    /// The answer to a `ping`.
    Pong,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum MessageRef<'a> {
    Message(&'a ChatMessage),
}

impl ServerFrame {
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these types cannot fail: every map key is a string.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Encodes a `message` frame without cloning the message. The buffer is sized for the
    /// frame up front: grown by doubling, it would often hold twice the frame's bytes for as
    /// long as the frame is queued or kept in a room's recent window.
    pub fn encode_message(msg: &ChatMessage) -> Vec<u8> {
        // Escaping adds at most 5 bytes per quote, backslash or control character.
        let escapes = msg
            .body
            .bytes()
            .filter(|b| matches!(b, b'"' | b'\\' | 0..=0x1f))
            .count();
        let estimate = 128
            + msg.room.as_str().len()
            + msg.from.as_str().len()
            + msg.cid.as_str().len()
            + msg.body.len()
            + escapes * 5;
        let mut out = Vec::with_capacity(estimate);
        if serde_json::to_writer(&mut out, &MessageRef::Message(msg)).is_err() {
            return Vec::new();
        }
        out
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> ServerFrame {
        ServerFrame::Error {
            code,
            message: message.into(),
            cid: None,
            room: None,
            owner: None,
        }
    }
}

impl From<FrameError> for ServerFrame {
    fn from(e: FrameError) -> Self {
        ServerFrame::Error {
            code: e.code,
            message: e.message,
            cid: e.cid,
            room: e.room,
            owner: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ClientFrame, FrameError> {
        parse_bytes(s.as_bytes())
    }

    fn parse_bytes(b: &[u8]) -> Result<ClientFrame, FrameError> {
        ClientFrame::parse(b, 16)
    }

    #[test]
    fn parses_each_client_frame() {
        assert_eq!(
            parse(r#"{"type":"join","room":"r1","since":"42"}"#),
            Ok(ClientFrame::Join {
                room: RoomId::new("r1").expect("room"),
                since: Some(MessageId(42))
            })
        );
        assert_eq!(
            parse(r#"{"type":"join","room":"r1"}"#),
            Ok(ClientFrame::Join {
                room: RoomId::new("r1").expect("room"),
                since: None
            })
        );
        assert!(matches!(
            parse(r#"{"type":"leave","room":"r1","extra":1}"#),
            Ok(ClientFrame::Leave { .. })
        ));
        assert!(matches!(
            parse(r#"{"type":"send","room":"r1","cid":"c1","body":"hi"}"#),
            Ok(ClientFrame::Send { .. })
        ));
        assert_eq!(parse(r#"{"type":"ping"}"#), Ok(ClientFrame::Ping));
        assert_eq!(ServerFrame::Pong.to_json(), br#"{"type":"pong"}"#);
    }

    #[test]
    fn each_bad_frame_gets_its_code() {
        let code = |s: &str| parse(s).expect_err(s).code;
        assert_eq!(code("{nope"), ErrorCode::BadJson);
        assert_eq!(code(r#"{"room":"r"}"#), ErrorCode::BadJson);
        assert_eq!(
            code(r#"{"type":"dance","room":"r"}"#),
            ErrorCode::UnknownType
        );
        assert_eq!(
            code(r#"{"type":"join","room":"a b"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(code(r#"{"type":"join"}"#), ErrorCode::InvalidField);
        assert_eq!(
            code(r#"{"type":"join","room":"r","since":"x"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"join","room":"r","since":5}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"send","room":"r","body":"x"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"send","room":"r","cid":"c","body":"01234567890123456"}"#),
            ErrorCode::BodyTooLong
        );
        let e = parse(r#"{"type":"send","room":"r","cid":"c9","body":"01234567890123456"}"#)
            .expect_err("too long");
        assert_eq!(e.cid.as_deref(), Some("c9"));
    }

    #[test]
    fn a_wrongly_typed_field_keeps_the_frames_cid_and_room() {
        for (frame, code) in [
            (
                r#"{"type":"send","room":"r","cid":"e1","body":5}"#,
                ErrorCode::InvalidField,
            ),
            (
                r#"{"type":"send","room":"r","cid":"e1","body":{"a":[1]}}"#,
                ErrorCode::InvalidField,
            ),
            (
                r#"{"type":"send","room":"r","cid":"e1","body":null}"#,
                ErrorCode::InvalidField,
            ),
            (r#"{"type":7,"room":"r","cid":"e1"}"#, ErrorCode::BadJson),
            (r#"{"room":"r","cid":"e1"}"#, ErrorCode::BadJson),
            (
                r#"{"type":"dance","room":"r","cid":"e1"}"#,
                ErrorCode::UnknownType,
            ),
            (
                r#"{"type":"join","room":"r","cid":"e1","since":true}"#,
                ErrorCode::InvalidField,
            ),
        ] {
            let e = parse(frame).expect_err(frame);
            assert_eq!(e.code, code, "{frame}");
            assert_eq!(e.cid.as_deref(), Some("e1"), "{frame}");
            assert_eq!(e.room.as_deref(), Some("r"), "{frame}");
        }
        let e = parse(r#"{"type":"send","room":["r"],"cid":"e1","body":"x"}"#).expect_err("room");
        assert_eq!(
            (e.code, e.cid.as_deref(), e.room),
            (ErrorCode::InvalidField, Some("e1"), None)
        );
        assert!(e.message.contains("room must be a string"), "{}", e.message);
        // Bad UTF-8 inside a field that is otherwise ignored is still not JSON (a fuzzing
        // find: the frame used to be read, with its `room` echoed).
        let e = parse_bytes(
            b"{\"-ype\":\"send\",\"room\":\"r\",\"cid\":{\"a\":[0,2,{\"b\xe6\xe6\":null}]}}",
        )
        .expect_err("not UTF-8");
        assert_eq!((e.code, e.room), (ErrorCode::BadJson, None));
        // A number past f64 is valid JSON grammar: skipped inside a wrong-typed field, and
        // where it is read it fails the frame as `bad_json`; either way `room` is echoed (a
        // harness find: the fuzz target's own probe could not read the first).
        let e = parse(r#"{"type":"send","room":"r","cid":{"":[0,2e5111]}}"#).expect_err("cid");
        assert_eq!(
            (e.code, e.room.as_deref()),
            (ErrorCode::InvalidField, Some("r"))
        );
        let e = parse(r#"{"type":"send","room":"r","cid":2e5111}"#).expect_err("cid");
        assert_eq!(
            (e.code, e.cid, e.room.as_deref()),
            (ErrorCode::BadJson, None, Some("r"))
        );
        // Not an object at all: nothing to echo.
        for frame in ["5", r#"["send"]"#, r#""send""#, "{nope"] {
            let e = parse(frame).expect_err(frame);
            assert_eq!((e.code, e.cid), (ErrorCode::BadJson, None), "{frame}");
        }
    }

    #[test]
    fn an_encoded_message_holds_little_more_than_its_bytes() {
        for (body, plain) in [
            ("x".repeat(4000), true),
            ("ünïcode text ".repeat(300), true),
            (String::new(), true),
            ("é\"".repeat(300), false),
            ("\u{1}\n\\".repeat(100), false),
        ] {
            let msg = ChatMessage {
                room: RoomId::new("room-1").expect("room"),
                id: MessageId(u64::MAX >> 1),
                from: UserId::new("someone").expect("user"),
                cid: ClientMsgId::new("c-123").expect("cid"),
                body,
                ts: 1_700_000_000_000,
            };
            let bytes = ServerFrame::encode_message(&msg);
            assert_eq!(bytes, ServerFrame::Message(msg).to_json());
            // Plain text gets a buffer of its size; escapes are over-counted a little.
            let slack = if plain {
                bytes.len() + 128
            } else {
                bytes.len() * 2 + 128
            };
            assert!(
                bytes.capacity() <= slack,
                "{} bytes in {}",
                bytes.len(),
                bytes.capacity()
            );
        }
    }

    #[test]
    fn server_frames_round_trip() {
        let msg = ChatMessage {
            room: RoomId::new("r").expect("room"),
            id: MessageId(7),
            from: UserId::new("alice").expect("user"),
            cid: ClientMsgId::new("c1").expect("cid"),
            body: "hé \"quoted\"".into(),
            ts: 1,
        };
        let bytes = ServerFrame::encode_message(&msg);
        assert_eq!(
            serde_json::from_slice::<ServerFrame>(&bytes).expect("de"),
            ServerFrame::Message(msg.clone())
        );
        assert_eq!(bytes, ServerFrame::Message(msg).to_json());
        let ack = ServerFrame::Ack {
            room: RoomId::new("r").expect("room"),
            cid: ClientMsgId::new("c1").expect("cid"),
            id: MessageId(9),
            duplicate: false,
        };
        let s = String::from_utf8(ack.to_json()).expect("utf8");
        assert!(
            s.contains(r#""type":"ack""#) && s.contains(r#""id":"9""#),
            "{s}"
        );
    }
}
