//! The API crate of the chat cluster: what nodes, routers and the bench agree on.
//!
//! It owns the wire protocol (frames, close and error codes), identifiers (rooms, users,
//! client message ids, time-ordered message ids), the ring and metric names. It depends on no
//! server crate and does no I/O, so any client can link it; what only the servers need (the
//! HTTP edge, membership in Redis) is in `chat-server`.

pub mod codes;
pub mod duration;
pub mod id;
pub mod metrics;
pub mod names;
pub mod protocol;
pub mod ring;

pub use codes::{CloseCode, ErrorCode, Retry};
pub use id::{IdGenerator, MessageId};
pub use names::{ClientMsgId, InvalidName, RoomId, UserId};
pub use protocol::{ChatMessage, ClientFrame, PresenceEvent, ServerFrame};
pub use ring::{NodeInfo, Ring};
