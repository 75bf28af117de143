//! The API crate of the chat cluster: what nodes, routers and the bench agree on.
//!
//! It owns the wire protocol (frames, close and error codes), identifiers (rooms, users,
//! client message ids, time-ordered message ids) and metric names. Without features it
//! depends on no server crate and does no I/O, so any client can link it; the servers turn
//! on `membership` (the ring in Redis) and `edge` (the first-request check and the `Origin` allow-list).

pub mod codes;
pub mod duration;
#[cfg(feature = "edge")]
pub mod head;
pub mod id;
#[cfg(feature = "membership")]
pub mod membership;
pub mod metrics;
pub mod names;
#[cfg(feature = "edge")]
pub mod origin;
pub mod protocol;
pub mod ring;

pub use codes::{CloseCode, ErrorCode, Retry};
pub use id::{IdGenerator, MessageId};
pub use names::{ClientMsgId, InvalidName, RoomId, UserId};
pub use protocol::{ChatMessage, ClientFrame, PresenceEvent, ServerFrame};
pub use ring::{NodeInfo, Ring};
