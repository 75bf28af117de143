//! What the bench puts on the wire and reads back: the self-describing message body, the
//! `send` frame built without per-message allocation, and a borrowing view of server frames.
//!
//! The body carries the sender's index, its per-sender sequence number and the send time
//! (nanoseconds since the bench's shared `Instant` base) in a fixed-width ASCII header padded
//! to `--size` bytes, so any receiver can compute end-to-end latency and detect loss,
//! duplicates and reordering without a side channel. The frames follow `common::ClientFrame`
//! and `common::ServerFrame` exactly; tests below keep them in step. This module does no I/O.

use std::io::Write as _;

use serde::Deserialize;

/// Length of the body header: `SSSSSSSS.QQQQQQQQQQQQ.TTTTTTTTTTTTTTTT.` (sender, seq and
/// timestamp as fixed-width lower-case hex). The rest of the body is `x` padding.
pub const BODY_HEADER_LEN: usize = 8 + 1 + 12 + 1 + 16 + 1;
/// Largest sender index that fits the header.
pub const MAX_SENDER: u64 = u32::MAX as u64;
/// Largest sequence number that fits the header.
pub const MAX_SEQ: u64 = (1 << 48) - 1;

const HEX: &[u8; 16] = b"0123456789abcdef";
const PAD: u8 = b'x';

/// What a receiver learns from a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyHeader {
    /// Global sender index: `room * members + member`.
    pub sender: u32,
    pub seq: u64,
    /// Send time in nanoseconds since the bench's base `Instant`.
    pub sent_ns: u64,
}

fn put_hex(dst: &mut [u8], mut v: u64) {
    for b in dst.iter_mut().rev() {
        *b = HEX[(v & 0xf) as usize];
        v >>= 4;
    }
}

fn get_hex(src: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for &b in src {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u64::from(d);
    }
    Some(v)
}

/// Writes the header of `h` into the first [`BODY_HEADER_LEN`] bytes of `dst`.
fn write_header(dst: &mut [u8], h: BodyHeader) {
    put_hex(&mut dst[0..8], u64::from(h.sender));
    dst[8] = b'.';
    put_hex(&mut dst[9..21], h.seq);
    dst[21] = b'.';
    put_hex(&mut dst[22..38], h.sent_ns);
    dst[38] = b'.';
}

/// Builds a body of exactly `size` bytes (`size >= BODY_HEADER_LEN`).
pub fn encode_body(h: BodyHeader, size: usize) -> String {
    let mut buf = vec![PAD; size.max(BODY_HEADER_LEN)];
    write_header(&mut buf, h);
    // Only ASCII hex digits, dots and padding were written.
    String::from_utf8(buf).unwrap_or_default()
}

/// Reads the header back; `None` if the body was not written by this bench.
pub fn decode_body(body: &[u8]) -> Option<BodyHeader> {
    if body.len() < BODY_HEADER_LEN || body[8] != b'.' || body[21] != b'.' || body[38] != b'.' {
        return None;
    }
    let sender = u32::try_from(get_hex(&body[0..8])?).ok()?;
    Some(BodyHeader {
        sender,
        seq: get_hex(&body[9..21])?,
        sent_ns: get_hex(&body[22..38])?,
    })
}

/// The sequence number in a `cid` of the form `<sender>-<seq>`, if it belongs to `sender`.
pub fn parse_cid(cid: &str, sender: u32) -> Option<u64> {
    let (s, q) = cid.split_once('-')?;
    if s.parse::<u32>().ok()? != sender {
        return None;
    }
    q.parse().ok()
}

/// A reusable encoder of one sender's `send` frames.
///
/// The client masks each frame's payload in place, so the whole frame is rebuilt into the
/// same buffer on every call: a few memcpys, no allocation after the first.
pub struct SendFrameEncoder {
    sender: u32,
    size: usize,
    /// `{"type":"send","room":"<room>","cid":"`
    prefix: Vec<u8>,
    buf: Vec<u8>,
}

impl SendFrameEncoder {
    /// `room` must be a valid `common::RoomId` (its characters need no JSON escaping).
    pub fn new(room: &str, sender: u32, size: usize) -> Self {
        let prefix = format!(r#"{{"type":"send","room":"{room}","cid":""#).into_bytes();
        let size = size.max(BODY_HEADER_LEN);
        let cap = prefix.len() + 32 + size + 16;
        SendFrameEncoder {
            sender,
            size,
            prefix,
            buf: Vec::with_capacity(cap),
        }
    }

    /// Encodes the frame for `seq` sent at `sent_ns`; returns the JSON bytes to write.
    pub fn encode(&mut self, seq: u64, sent_ns: u64) -> &mut [u8] {
        let buf = &mut self.buf;
        buf.clear();
        buf.extend_from_slice(&self.prefix);
        // Writing integers into a Vec cannot fail.
        let _ = write!(buf, "{}-{}", self.sender, seq);
        buf.extend_from_slice(br#"","body":""#);
        let start = buf.len();
        buf.resize(start + self.size, PAD);
        write_header(
            &mut buf[start..start + BODY_HEADER_LEN],
            BodyHeader {
                sender: self.sender,
                seq,
                sent_ns,
            },
        );
        buf.extend_from_slice(br#""}"#);
        &mut buf[..]
    }
}

/// A borrowing view of any server frame: the fields the bench reads, without building the
/// owned `common::ServerFrame` (which costs several allocations per delivery, and the
/// receivers handle `members` times more frames than the senders send). Strings that carry
/// JSON escapes cannot be borrowed; the caller then falls back to `ServerFrame`.
#[derive(Debug, Deserialize)]
pub struct FrameView<'a> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    #[serde(default)]
    pub room: Option<&'a str>,
    #[serde(default)]
    pub id: Option<&'a str>,
    #[serde(default)]
    pub cid: Option<&'a str>,
    #[serde(default)]
    pub body: Option<&'a str>,
    #[serde(default)]
    pub code: Option<&'a str>,
    #[serde(default)]
    pub duplicate: bool,
}

impl<'a> FrameView<'a> {
    pub fn parse(bytes: &'a [u8]) -> Option<FrameView<'a>> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The same facts taken from an owned `ServerFrame`, for frames the view could not borrow.
#[derive(Debug, Default)]
pub struct OwnedView {
    pub kind: &'static str,
    pub room: Option<String>,
    pub id: Option<String>,
    pub cid: Option<String>,
    pub body: Option<String>,
    pub code: Option<String>,
    pub duplicate: bool,
}

impl OwnedView {
    pub fn parse(bytes: &[u8]) -> Option<OwnedView> {
        use common::ServerFrame as F;
        let frame: F = serde_json::from_slice(bytes).ok()?;
        Some(match frame {
            F::Joined { room, .. } => OwnedView {
                kind: "joined",
                room: Some(room.to_string()),
                ..Default::default()
            },
            F::Left { room } => OwnedView {
                kind: "left",
                room: Some(room.to_string()),
                ..Default::default()
            },
            F::Pong => OwnedView {
                kind: "pong",
                ..Default::default()
            },
            F::Message(m) => OwnedView {
                kind: "message",
                room: Some(m.room.to_string()),
                id: Some(m.id.to_string()),
                cid: Some(m.cid.to_string()),
                body: Some(m.body),
                ..Default::default()
            },
            F::Ack {
                room,
                cid,
                id,
                duplicate,
            } => OwnedView {
                kind: "ack",
                room: Some(room.to_string()),
                id: Some(id.to_string()),
                cid: Some(cid.to_string()),
                duplicate,
                ..Default::default()
            },
            F::Error {
                code, cid, room, ..
            } => OwnedView {
                kind: "error",
                room,
                cid,
                code: Some(code.as_str().to_owned()),
                ..Default::default()
            },
            F::Presence { room, .. } => OwnedView {
                kind: "presence",
                room: Some(room.to_string()),
                ..Default::default()
            },
        })
    }

    pub fn as_view(&self) -> FrameView<'_> {
        FrameView {
            kind: self.kind,
            room: self.room.as_deref(),
            id: self.id.as_deref(),
            cid: self.cid.as_deref(),
            body: self.body.as_deref(),
            code: self.code.as_deref(),
            duplicate: self.duplicate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::{ChatMessage, ClientFrame, ErrorCode, MessageId, RoomId, ServerFrame, UserId};

    #[test]
    fn body_round_trips_at_exact_size() {
        let h = BodyHeader {
            sender: 4_000_000_000,
            seq: MAX_SEQ,
            sent_ns: u64::MAX,
        };
        for size in [BODY_HEADER_LEN, 100, 4096] {
            let body = encode_body(h, size);
            assert_eq!(body.len(), size);
            assert_eq!(decode_body(body.as_bytes()), Some(h));
        }
        let small = BodyHeader {
            sender: 0,
            seq: 1,
            sent_ns: 2,
        };
        assert_eq!(
            encode_body(small, 40),
            "00000000.000000000001.0000000000000002.x"
        );
    }

    #[test]
    fn foreign_bodies_are_rejected() {
        assert_eq!(decode_body(b"hello"), None);
        assert_eq!(decode_body(&[b'x'; 64]), None);
        let mut b = encode_body(
            BodyHeader {
                sender: 1,
                seq: 2,
                sent_ns: 3,
            },
            50,
        )
        .into_bytes();
        b[3] = b'G';
        assert_eq!(decode_body(&b), None);
    }

    #[test]
    fn send_frame_is_a_valid_client_frame() {
        let mut enc = SendFrameEncoder::new("bench-1.r-3", 17, 64);
        for seq in [0u64, 9, 123_456] {
            let bytes = enc.encode(seq, 42 + seq).to_vec();
            let frame = ClientFrame::parse(&bytes, 4096).expect("valid send frame");
            let ClientFrame::Send { room, cid, body } = frame else {
                panic!("not a send frame");
            };
            assert_eq!(room.as_str(), "bench-1.r-3");
            assert_eq!(cid.as_str(), format!("17-{seq}"));
            assert_eq!(parse_cid(cid.as_str(), 17), Some(seq));
            assert_eq!(parse_cid(cid.as_str(), 18), None);
            assert_eq!(body.len(), 64);
            assert_eq!(
                decode_body(body.as_bytes()),
                Some(BodyHeader {
                    sender: 17,
                    seq,
                    sent_ns: 42 + seq
                })
            );
        }
    }

    #[test]
    fn view_reads_what_the_server_encodes() {
        let room = RoomId::new("r1").expect("room");
        let msg = ChatMessage {
            room: room.clone(),
            id: MessageId(77),
            from: UserId::new("u").expect("user"),
            cid: common::ClientMsgId::new("3-4").expect("cid"),
            body: "b".into(),
            ts: 5,
        };
        let bytes = ServerFrame::encode_message(&msg);
        let v = FrameView::parse(&bytes).expect("view");
        assert_eq!(
            (v.kind, v.room, v.id, v.cid, v.body),
            ("message", Some("r1"), Some("77"), Some("3-4"), Some("b"))
        );

        let ack = ServerFrame::Ack {
            room: room.clone(),
            cid: common::ClientMsgId::new("3-4").expect("cid"),
            id: MessageId(78),
            duplicate: true,
        }
        .to_json();
        let v = FrameView::parse(&ack).expect("view");
        assert_eq!((v.kind, v.cid, v.duplicate), ("ack", Some("3-4"), true));

        let err = ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "slow \"down\"".into(),
            cid: Some("3-5".into()),
            room: None,
            owner: None,
        }
        .to_json();
        let v = FrameView::parse(&err).expect("escapes in skipped fields are fine");
        assert_eq!(
            (v.kind, v.code, v.cid),
            ("error", Some("rate_limited"), Some("3-5"))
        );

        let joined = ServerFrame::Joined {
            room,
            head: Some(MessageId(1)),
            members: 1,
            users: None,
        }
        .to_json();
        assert_eq!(FrameView::parse(&joined).expect("view").kind, "joined");
    }

    #[test]
    fn escaped_strings_fall_back_to_the_owned_frame() {
        let msg = ChatMessage {
            room: RoomId::new("r1").expect("room"),
            id: MessageId(1),
            from: UserId::new("u").expect("user"),
            cid: common::ClientMsgId::new("c").expect("cid"),
            body: "quote \" inside".into(),
            ts: 5,
        };
        let bytes = ServerFrame::encode_message(&msg);
        assert!(FrameView::parse(&bytes).is_none());
        let owned = OwnedView::parse(&bytes).expect("owned");
        let v = owned.as_view();
        assert_eq!((v.kind, v.body), ("message", Some("quote \" inside")));
        assert!(OwnedView::parse(b"{\"type\":\"nope\"}").is_none());
    }
}
