//! The binary format of a link batch: what one node publishes to another node's inbox.
//!
//! Every pair of nodes talks over one ordered *link* (see `link.rs`): a numbered stream of
//! batches, each a run of [`Item`]s. Room frames travel as the exact bytes the owner
//! serialized once for its own members, length-prefixed, never re-escaped inside JSON; the
//! receiver slices them out of the payload without copying. A payload starts with a byte no
//! JSON text starts with, so the inbox tells link batches from the JSON request/reply
//! envelopes of `redis.rs`.
//!
//! Layout (big-endian): `MAGIC`, `VERSION`, from node `u16`, epoch `u64`, seq `u64`, item
//! count `u32`, then the items, each a tag byte and its fields. Strings are `u16` length +
//! UTF-8; frame lists are a `u32` count of `u32`-length blobs. This module is pure: no I/O,
//! no clock; decoding checks every length and name and never panics on bad bytes.

use bytes::{BufMut, Bytes};
use common::{ClientMsgId, ErrorCode, MessageId, RoomId, UserId};

use crate::frames::Out;

/// First byte of a link batch (JSON envelopes start with `{`).
pub(crate) const MAGIC: u8 = 0xB1;
const VERSION: u8 = 1;

const T_ROOM: u8 = 1;
const T_TO: u8 = 2;
const T_FOLLOW: u8 = 3;
const T_UNFOLLOW: u8 = 4;
const T_CLOSE: u8 = 5;
const T_JOIN: u8 = 6;
const T_SEND: u8 = 7;
const T_LEAVE: u8 = 8;
const T_GONE: u8 = 9;
const T_RESET: u8 = 10;
const T_MOVED: u8 = 11;
const T_REFUSED: u8 = 12;
const T_FORGET: u8 = 13;

/// One thing a node tells a peer. Owner → requester: `Room`, `To`, `Follow`, `Unfollow`,
/// `Close`, `Moved`, `Refused`. Requester → owner: `Join`, `Send`, `Leave`, `Gone`. Either
/// way: `Reset`.
#[derive(Debug)]
pub(crate) enum Item {
    /// A room broadcast, once for every member the peer has in `room` that follows it;
    /// `last` is the id of the message it carries (0: not a message, e.g. presence).
    Room {
        room: RoomId,
        last: u64,
        frames: Out,
    },
    /// Frames for one of the peer's connections only (joined, replay, ack, error, left).
    To {
        conn: u64,
        frames: Out,
    },
    /// From here on, `conn` gets `room`'s broadcasts from the peer's copy of the stream; it
    /// has every message up to `at`.
    Follow {
        conn: u64,
        room: RoomId,
        at: u64,
    },
    /// `conn` no longer gets `room`'s broadcasts (it left, is catching up, or was dropped).
    Unfollow {
        conn: u64,
        room: RoomId,
    },
    /// The owner closed the member: close the connection with `code`.
    Close {
        conn: u64,
        code: u16,
    },
    /// `room` moved to node `to` after the owner stored everything it accepted: join it
    /// there from the last message delivered to `conn`.
    Moved {
        conn: u64,
        room: RoomId,
        to: u16,
    },
    /// The owner refused `conn`'s join of `room` (`code`, and the owner it knows of).
    Refused {
        conn: u64,
        room: RoomId,
        code: ErrorCode,
        owner: Option<String>,
    },
    Join {
        conn: u64,
        room: RoomId,
        user: UserId,
        since: Option<MessageId>,
    },
    Send {
        conn: u64,
        user: UserId,
        room: RoomId,
        cid: ClientMsgId,
        body: String,
    },
    Leave {
        conn: u64,
        room: RoomId,
    },
    /// The connection ended: forget it in every room.
    Gone {
        conn: u64,
    },
    /// Something between the two nodes was lost. The sender has forgotten everything
    /// bridged with the receiver and closed its connections bridged to it; it had taken
    /// the receiver's batches up to `upto` of the receiver's incarnation `epoch`, so the
    /// receiver's joins in those batches are forgotten too, later ones stand.
    Reset {
        epoch: u64,
        upto: u64,
    },
    /// The sender is a new process that found the receiver's link older than itself: the
    /// receiver's joins up to `upto` (of its incarnation `epoch`) went to an earlier process
    /// of the sender and are gone. Unlike `Reset`, nothing of the sender's is forgotten.
    Forget {
        epoch: u64,
        upto: u64,
    },
}

/// A batch as it came off the wire.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) from: u16,
    pub(crate) epoch: u64,
    pub(crate) seq: u64,
    pub(crate) items: Vec<Item>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum DecodeError {
    #[error("not a link batch")]
    NotABatch,
    #[error("unsupported link batch version {0}")]
    Version(u8),
    #[error("truncated link batch")]
    Truncated,
    #[error("unknown item tag {0}")]
    Tag(u8),
    #[error("invalid name or text in a link batch")]
    Invalid,
}

/// Encodes a batch header; items follow through [`put_item`], then [`finish`] fixes the count.
pub(crate) fn start(buf: &mut Vec<u8>, from: u16, epoch: u64, seq: u64) {
    buf.clear();
    buf.push(MAGIC);
    buf.push(VERSION);
    buf.put_u16(from);
    buf.put_u64(epoch);
    buf.put_u64(seq);
    buf.put_u32(0);
}

const COUNT_AT: usize = 2 + 2 + 8 + 8;

pub(crate) fn finish(buf: &mut [u8], items: u32) {
    buf[COUNT_AT..COUNT_AT + 4].copy_from_slice(&items.to_be_bytes());
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    // Names are bounded far below 64 KiB by `common::names`; cut rather than corrupt.
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

fn put_blob(buf: &mut Vec<u8>, b: &[u8]) {
    buf.put_u32(b.len() as u32);
    buf.put_slice(b);
}

fn put_frames(buf: &mut Vec<u8>, out: &Out) {
    match out {
        Out::Frame(b) | Out::Pong(b) => {
            buf.put_u32(1);
            put_blob(buf, b);
        }
        Out::Frames(v) | Out::Shared(v) => {
            buf.put_u32(v.len() as u32);
            for b in v {
                put_blob(buf, b);
            }
        }
    }
}

/// Appends one item.
pub(crate) fn put_item(buf: &mut Vec<u8>, item: &Item) {
    match item {
        Item::Room { room, last, frames } => {
            buf.push(T_ROOM);
            put_str(buf, room.as_str());
            buf.put_u64(*last);
            put_frames(buf, frames);
        }
        Item::Follow { conn, room, at } => {
            buf.push(T_FOLLOW);
            buf.put_u64(*conn);
            put_str(buf, room.as_str());
            buf.put_u64(*at);
        }
        Item::Moved { conn, room, to } => {
            buf.push(T_MOVED);
            buf.put_u64(*conn);
            put_str(buf, room.as_str());
            buf.put_u16(*to);
        }
        Item::Refused {
            conn,
            room,
            code,
            owner,
        } => {
            buf.push(T_REFUSED);
            buf.put_u64(*conn);
            put_str(buf, room.as_str());
            put_str(buf, code.as_str());
            put_str(buf, owner.as_deref().unwrap_or(""));
        }
        Item::To { conn, frames } => {
            buf.push(T_TO);
            buf.put_u64(*conn);
            put_frames(buf, frames);
        }
        Item::Unfollow { conn, room } | Item::Leave { conn, room } => {
            buf.push(match item {
                Item::Unfollow { .. } => T_UNFOLLOW,
                _ => T_LEAVE,
            });
            buf.put_u64(*conn);
            put_str(buf, room.as_str());
        }
        Item::Close { conn, code } => {
            buf.push(T_CLOSE);
            buf.put_u64(*conn);
            buf.put_u16(*code);
        }
        Item::Join {
            conn,
            room,
            user,
            since,
        } => {
            buf.push(T_JOIN);
            buf.put_u64(*conn);
            put_str(buf, room.as_str());
            put_str(buf, user.as_str());
            match since {
                Some(id) => {
                    buf.push(1);
                    buf.put_u64(id.0);
                }
                None => buf.push(0),
            }
        }
        Item::Send {
            conn,
            user,
            room,
            cid,
            body,
        } => {
            buf.push(T_SEND);
            buf.put_u64(*conn);
            put_str(buf, user.as_str());
            put_str(buf, room.as_str());
            put_str(buf, cid.as_str());
            put_blob(buf, body.as_bytes());
        }
        Item::Gone { conn } => {
            buf.push(T_GONE);
            buf.put_u64(*conn);
        }
        Item::Reset { epoch, upto } | Item::Forget { epoch, upto } => {
            buf.push(if matches!(item, Item::Reset { .. }) {
                T_RESET
            } else {
                T_FORGET
            });
            buf.put_u64(*epoch);
            buf.put_u64(*upto);
        }
    }
}

/// A cursor over a received payload; slices share its buffer.
struct Cursor {
    buf: Bytes,
    at: usize,
}

impl Cursor {
    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.buf.len() - self.at < n {
            return Err(DecodeError::Truncated);
        }
        let b = self.buf.slice(self.at..self.at + n);
        self.at += n;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_be_bytes(a))
    }

    fn text(&mut self, n: usize) -> Result<String, DecodeError> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Invalid)
    }

    fn str(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        self.text(n)
    }

    fn room(&mut self) -> Result<RoomId, DecodeError> {
        RoomId::new(self.str()?).map_err(|_| DecodeError::Invalid)
    }

    fn user(&mut self) -> Result<UserId, DecodeError> {
        UserId::new(self.str()?).map_err(|_| DecodeError::Invalid)
    }

    fn frames(&mut self) -> Result<Out, DecodeError> {
        let n = self.u32()? as usize;
        // Each frame takes at least its 4-byte length: a count the rest cannot hold is a lie.
        if n > (self.buf.len() - self.at) / 4 {
            return Err(DecodeError::Truncated);
        }
        let mut frames = Vec::with_capacity(n);
        for _ in 0..n {
            let len = self.u32()? as usize;
            frames.push(self.take(len)?);
        }
        Ok(if frames.len() == 1 {
            Out::Frame(frames.pop().unwrap_or_default())
        } else {
            Out::Frames(frames)
        })
    }
}

/// Decodes a payload whose first byte is [`MAGIC`].
pub(crate) fn decode(payload: Bytes) -> Result<Batch, DecodeError> {
    let mut c = Cursor {
        buf: payload,
        at: 0,
    };
    if c.u8().map_err(|_| DecodeError::NotABatch)? != MAGIC {
        return Err(DecodeError::NotABatch);
    }
    let version = c.u8()?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let from = c.u16()?;
    let epoch = c.u64()?;
    let seq = c.u64()?;
    let count = c.u32()? as usize;
    let mut items = Vec::with_capacity(count.min(c.buf.len()));
    for _ in 0..count {
        let item = match c.u8()? {
            T_ROOM => Item::Room {
                room: c.room()?,
                last: c.u64()?,
                frames: c.frames()?,
            },
            T_TO => Item::To {
                conn: c.u64()?,
                frames: c.frames()?,
            },
            T_FOLLOW => Item::Follow {
                conn: c.u64()?,
                room: c.room()?,
                at: c.u64()?,
            },
            T_MOVED => Item::Moved {
                conn: c.u64()?,
                room: c.room()?,
                to: c.u16()?,
            },
            T_REFUSED => {
                let conn = c.u64()?;
                let room = c.room()?;
                let code = c.str()?;
                let code = ErrorCode::ALL
                    .iter()
                    .copied()
                    .find(|k| k.as_str() == code)
                    .ok_or(DecodeError::Invalid)?;
                let owner = Some(c.str()?).filter(|o| !o.is_empty());
                Item::Refused {
                    conn,
                    room,
                    code,
                    owner,
                }
            }
            T_UNFOLLOW => Item::Unfollow {
                conn: c.u64()?,
                room: c.room()?,
            },
            T_LEAVE => Item::Leave {
                conn: c.u64()?,
                room: c.room()?,
            },
            T_CLOSE => Item::Close {
                conn: c.u64()?,
                code: c.u16()?,
            },
            T_JOIN => Item::Join {
                conn: c.u64()?,
                room: c.room()?,
                user: c.user()?,
                since: match c.u8()? {
                    0 => None,
                    _ => Some(MessageId(c.u64()?)),
                },
            },
            T_SEND => {
                let conn = c.u64()?;
                let user = c.user()?;
                let room = c.room()?;
                let cid = ClientMsgId::new(c.str()?).map_err(|_| DecodeError::Invalid)?;
                let n = c.u32()? as usize;
                Item::Send {
                    conn,
                    user,
                    room,
                    cid,
                    body: c.text(n)?,
                }
            }
            T_GONE => Item::Gone { conn: c.u64()? },
            T_RESET => Item::Reset {
                epoch: c.u64()?,
                upto: c.u64()?,
            },
            T_FORGET => Item::Forget {
                epoch: c.u64()?,
                upto: c.u64()?,
            },
            tag => return Err(DecodeError::Tag(tag)),
        };
        items.push(item);
    }
    Ok(Batch {
        from,
        epoch,
        seq,
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(s: &str) -> RoomId {
        RoomId::new(s).expect("room")
    }

    fn encode(items: &[Item]) -> Bytes {
        let mut buf = Vec::new();
        start(&mut buf, 7, 0xDEAD_BEEF, 42);
        for item in items {
            put_item(&mut buf, item);
        }
        finish(&mut buf, items.len() as u32);
        Bytes::from(buf)
    }

    fn sample() -> Vec<Item> {
        vec![
            Item::Room {
                room: room("general"),
                last: 12,
                frames: Out::Frame(Bytes::from_static(br#"{"type":"message","body":"a\"b"}"#)),
            },
            Item::To {
                conn: 9,
                frames: Out::Frames(vec![Bytes::from_static(b"one"), Bytes::new()]),
            },
            Item::Follow {
                conn: 9,
                room: room("general"),
                at: 11,
            },
            Item::Moved {
                conn: 9,
                room: room("general"),
                to: 3,
            },
            Item::Refused {
                conn: 9,
                room: room("r3"),
                code: ErrorCode::RoomMoved,
                owner: Some("10.0.0.3:7001".into()),
            },
            Item::Refused {
                conn: 9,
                room: room("r3"),
                code: ErrorCode::RoomUnavailable,
                owner: None,
            },
            Item::Unfollow {
                conn: 9,
                room: room("r2"),
            },
            Item::Close {
                conn: 3,
                code: 4001,
            },
            Item::Join {
                conn: 1,
                room: room("r"),
                user: UserId::new("ann").expect("user"),
                since: Some(MessageId(0)),
            },
            Item::Join {
                conn: 2,
                room: room("r"),
                user: UserId::new("bob").expect("user"),
                since: None,
            },
            Item::Send {
                conn: 1,
                user: UserId::new("ann").expect("user"),
                room: room("r"),
                cid: ClientMsgId::new("c-1").expect("cid"),
                body: "héllo \u{1F600}".into(),
            },
            Item::Leave {
                conn: 1,
                room: room("r"),
            },
            Item::Gone { conn: u64::MAX },
            Item::Reset { epoch: 5, upto: 77 },
            Item::Forget { epoch: 6, upto: 78 },
        ]
    }

    #[test]
    fn every_item_survives_the_round_trip() {
        let items = sample();
        let batch = decode(encode(&items)).expect("decodes");
        assert_eq!((batch.from, batch.epoch, batch.seq), (7, 0xDEAD_BEEF, 42));
        assert_eq!(format!("{:?}", batch.items), format!("{items:?}"));
    }

    #[test]
    fn room_frames_are_carried_byte_for_byte_without_escaping() {
        let frame = br#"{"type":"message","body":"q\"uote"}"#;
        let payload = encode(&[Item::Room {
            room: room("g"),
            last: 1,
            frames: Out::Frame(Bytes::from_static(frame)),
        }]);
        // The frame's bytes appear verbatim in the payload (no JSON string escaping).
        assert!(payload.windows(frame.len()).any(|w| w == frame));
        assert_eq!(
            payload.len(),
            1 + 1 + 2 + 8 + 8 + 4 + 1 + 2 + 1 + 8 + 4 + 4 + frame.len()
        );
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let payload = encode(&sample());
        for n in 0..payload.len() {
            assert!(decode(payload.slice(..n)).is_err(), "truncated at {n}");
        }
        // Flip each byte in turn: decoding may succeed (a flipped payload byte is still a
        // payload) but must never panic.
        for i in 0..payload.len() {
            let mut b = payload.to_vec();
            b[i] ^= 0xFF;
            let _ = decode(Bytes::from(b));
        }
        assert_eq!(
            decode(Bytes::from_static(b"{\"t\":\"reply\"}")).expect_err("refused"),
            DecodeError::NotABatch
        );
        let mut v = payload.to_vec();
        v[1] = 9;
        assert_eq!(
            decode(Bytes::from(v)).expect_err("refused"),
            DecodeError::Version(9)
        );
    }

    #[test]
    fn a_huge_frame_count_is_refused_before_allocating() {
        let mut buf = Vec::new();
        start(&mut buf, 1, 1, 1);
        buf.push(T_TO);
        buf.put_u64(1);
        buf.put_u32(u32::MAX);
        finish(&mut buf, 1);
        assert_eq!(
            decode(Bytes::from(buf)).expect_err("refused"),
            DecodeError::Truncated
        );
    }

    #[test]
    fn invalid_names_are_refused() {
        let mut buf = Vec::new();
        start(&mut buf, 1, 1, 1);
        buf.push(T_LEAVE);
        buf.put_u64(1);
        put_str(&mut buf, "");
        finish(&mut buf, 1);
        assert_eq!(
            decode(Bytes::from(buf)).expect_err("refused"),
            DecodeError::Invalid
        );
    }
}
