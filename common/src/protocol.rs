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
            cid: raw.cid.clone(),
            room: raw.room.clone(),
        }
    }
}

/// Loose shape used to give precise error codes: JSON errors, unknown types and invalid
/// fields are told apart.
#[derive(Deserialize)]
struct RawFrame {
    #[serde(rename = "type")]
    kind: String,
    room: Option<String>,
    since: Option<serde_json::Value>,
    cid: Option<String>,
    body: Option<String>,
}

impl ClientFrame {
    /// Parses and validates a client frame. `max_body` is the longest accepted `body`, in
    /// bytes.
    pub fn parse(bytes: &[u8], max_body: usize) -> Result<ClientFrame, FrameError> {
        let raw: RawFrame = serde_json::from_slice(bytes).map_err(|e| FrameError {
            code: ErrorCode::BadJson,
            message: format!("invalid frame: {e}"),
            cid: None,
            room: None,
        })?;
        let room = || -> Result<RoomId, FrameError> {
            let r = raw
                .room
                .as_deref()
                .ok_or_else(|| FrameError::new(ErrorCode::InvalidField, "missing room", &raw))?;
            RoomId::new(r)
                .map_err(|e| FrameError::new(ErrorCode::InvalidField, e.to_string(), &raw))
        };
        match raw.kind.as_str() {
            "join" => {
                let since = match &raw.since {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) => Some(s.parse().map_err(|_| {
                        FrameError::new(
                            ErrorCode::InvalidField,
                            "since must be a message id as a decimal string",
                            &raw,
                        )
                    })?),
                    Some(_) => {
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
            "send" => {
                let room = room()?;
                let cid = raw
                    .cid
                    .as_deref()
                    .ok_or_else(|| FrameError::new(ErrorCode::InvalidField, "missing cid", &raw))?;
                let cid = ClientMsgId::new(cid)
                    .map_err(|e| FrameError::new(ErrorCode::InvalidField, e.to_string(), &raw))?;
                let body = raw.body.as_deref().ok_or_else(|| {
                    FrameError::new(ErrorCode::InvalidField, "missing body", &raw)
                })?;
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

    /// Encodes a `message` frame without cloning the message.
    pub fn encode_message(msg: &ChatMessage) -> Vec<u8> {
        serde_json::to_vec(&MessageRef::Message(msg)).unwrap_or_default()
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
        ClientFrame::parse(s.as_bytes(), 16)
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
