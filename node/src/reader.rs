//! Client-to-server WebSocket frame reading with a buffer sized to what is in flight.
//!
//! RFC 6455 from the server's side: every client frame must be masked; control frames are
//! short and unfragmented; fragments of one message are reassembled up to the message
//! limit, with control frames allowed between them; text must be UTF-8. The buffer starts
//! empty, grows with the bytes of the frame being read (never ahead of them to a length the
//! peer merely declared) and is released when drained, so an idle connection pins a few
//! hundred bytes instead of a fixed 8 KiB. Unmasking uses
//! fastwebsockets' SIMD routine. This module decodes only; what a frame means is
//! `connection.rs`'s business.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes requested from the socket when the next frame's size is not yet known.
const READ_CHUNK: usize = 512;
/// Longest payload a control frame may have (RFC 6455 5.5).
const MAX_CONTROL: usize = 125;

/// One complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A complete text message, valid UTF-8.
    Text(Bytes),
    /// A complete binary message (the protocol has none; answered with an error frame).
    Binary,
    Ping(Bytes),
    Pong,
    /// A close frame, with its status code if it had one.
    Close(Option<u16>),
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed by peer")]
    Eof,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("message larger than the limit")]
    TooLarge,
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    max_message: usize,
    /// A fragmented message being reassembled: (is_text, bytes so far).
    partial: Option<(bool, BytesMut)>,
}

struct Header {
    fin: bool,
    opcode: u8,
    header_len: usize,
    payload_len: usize,
    mask: [u8; 4],
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// `initial` holds bytes already read from the socket (for example during the upgrade).
    pub fn new(io: R, initial: Bytes, max_message: usize) -> Self {
        FrameReader {
            io,
            buf: BytesMut::from(&initial[..]),
            max_message,
            partial: None,
        }
    }

    /// The next message or control frame. Cancel-safe: bytes read so far stay buffered,
    /// and calling again resumes where the cancelled call stopped.
    pub async fn next(&mut self) -> Result<Incoming, ReadError> {
        Ok(self.next_with_binary().await?.0)
    }

    /// [`next`](Self::next), with a binary message's bytes beside `Incoming::Binary` (and
    /// `None` beside anything else). The node has no use for them, it answers binary with
    /// an error frame; the conformance suite's echo server (`tests/conformance.rs`) echoes
    /// them. Cancel-safe like `next`.
    pub async fn next_with_binary(&mut self) -> Result<(Incoming, Option<Bytes>), ReadError> {
        loop {
            match self.parse_header()? {
                Some(h) if self.buf.len() >= h.header_len + h.payload_len => {
                    self.buf.advance(h.header_len);
                    let mut payload = self.buf.split_to(h.payload_len);
                    fastwebsockets::unmask(&mut payload, h.mask);
                    if self.buf.is_empty() {
                        // Release the read buffer between messages.
                        self.buf = BytesMut::new();
                    }
                    if let Some(msg) = self.on_frame(h.fin, h.opcode, payload)? {
                        return Ok(msg);
                    }
                }
                Some(h) => {
                    let want = h.header_len + h.payload_len - self.buf.len();
                    self.fill(want).await?;
                }
                None => self.fill(READ_CHUNK).await?,
            }
        }
    }

    /// Reads at least one more byte. Room is reserved for what is missing of the frame but
    /// never more than what has already arrived (and one chunk): a header declaring a large
    /// frame costs nothing until its bytes come, and the buffer at most doubles per read.
    async fn fill(&mut self, want: usize) -> Result<(), ReadError> {
        let room = want.min(self.buf.len().max(READ_CHUNK));
        self.buf.reserve(room.max(64));
        if self.io.read_buf(&mut self.buf).await? == 0 {
            return Err(ReadError::Eof);
        }
        Ok(())
    }

    fn parse_header(&self) -> Result<Option<Header>, ReadError> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        if b[0] & 0x70 != 0 {
            return Err(ReadError::Protocol("reserved bits set"));
        }
        let opcode = b[0] & 0x0F;
        if !matches!(opcode, 0x0..=0x2 | 0x8..=0xA) {
            return Err(ReadError::Protocol("unknown opcode"));
        }
        if b[1] & 0x80 == 0 {
            return Err(ReadError::Protocol("client frames must be masked"));
        }
        let (payload_len, ext) = match b[1] & 0x7F {
            126 => {
                if b.len() < 4 {
                    return Ok(None);
                }
                (usize::from(u16::from_be_bytes([b[2], b[3]])), 2)
            }
            127 => {
                if b.len() < 10 {
                    return Ok(None);
                }
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                if n[0] & 0x80 != 0 {
                    return Err(ReadError::Protocol("64-bit length with its top bit set"));
                }
                (
                    usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX),
                    8,
                )
            }
            n => (usize::from(n), 0),
        };
        if opcode >= 0x8 && (!fin || payload_len > MAX_CONTROL) {
            return Err(ReadError::Protocol("bad control frame"));
        }
        // A fragment is judged with what came before it, so a message that would outgrow the
        // limit is refused at the header that would take it there, like a single frame.
        let so_far = match (&self.partial, opcode) {
            (Some((_, buf)), 0x0) => buf.len(),
            _ => 0,
        };
        if so_far.saturating_add(payload_len) > self.max_message {
            return Err(ReadError::TooLarge);
        }
        let header_len = 2 + ext + 4;
        if b.len() < header_len {
            return Ok(None);
        }
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&b[2 + ext..header_len]);
        Ok(Some(Header {
            fin,
            opcode,
            header_len,
            payload_len,
            mask,
        }))
    }

    fn on_frame(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: BytesMut,
    ) -> Result<Option<(Incoming, Option<Bytes>)>, ReadError> {
        match opcode {
            0x8 => {
                // RFC 6455 5.5.1 and 7.4: no body, or a code a peer may send and a UTF-8
                // reason; anything else fails the connection (1002).
                let code = match payload.len() {
                    0 => None,
                    1 => return Err(ReadError::Protocol("close frame with a 1-byte body")),
                    _ => Some(u16::from_be_bytes([payload[0], payload[1]])),
                };
                if let Some(code) = code {
                    if !close_code_allowed(code) {
                        return Err(ReadError::Protocol("close code a peer may not send"));
                    }
                    if std::str::from_utf8(&payload[2..]).is_err() {
                        return Err(ReadError::Protocol("close reason is not UTF-8"));
                    }
                }
                Ok(Some((Incoming::Close(code), None)))
            }
            0x9 => Ok(Some((Incoming::Ping(payload.freeze()), None))),
            0xA => Ok(Some((Incoming::Pong, None))),
            0x1 | 0x2 => {
                if self.partial.is_some() {
                    return Err(ReadError::Protocol("new message inside a fragmented one"));
                }
                let text = opcode == 0x1;
                if fin {
                    return finish(text, payload).map(Some);
                }
                self.partial = Some((text, payload));
                Ok(None)
            }
            _ => {
                let Some((text, mut buf)) = self.partial.take() else {
                    return Err(ReadError::Protocol("continuation without a message"));
                };
                // `parse_header` has held the message to the limit.
                buf.extend_from_slice(&payload);
                if fin {
                    return finish(text, buf).map(Some);
                }
                self.partial = Some((text, buf));
                Ok(None)
            }
        }
    }
}

/// Close codes a peer may put on the wire (RFC 6455 7.4.1 and 7.4.2, with 1012-1014 from the
/// IANA registry): 1004-1006 and 1015 are reserved for local use, below 1000 and
/// 1016-2999 are unassigned, and codes of 5000 and above do not exist.
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn finish(text: bool, payload: BytesMut) -> Result<(Incoming, Option<Bytes>), ReadError> {
    if !text {
        return Ok((Incoming::Binary, Some(payload.freeze())));
    }
    if std::str::from_utf8(&payload).is_err() {
        return Err(ReadError::Protocol("text is not UTF-8"));
    }
    Ok((Incoming::Text(payload.freeze()), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes a masked client frame.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    async fn read_all(bytes: Vec<u8>, max: usize) -> Vec<Result<Incoming, String>> {
        let mut r = FrameReader::new(&bytes[..], Bytes::new(), max);
        let mut out = Vec::new();
        loop {
            match r.next().await {
                Ok(m) => out.push(Ok(m)),
                Err(ReadError::Eof) => return out,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn reads_messages_of_every_length_class() {
        let big = "b".repeat(70_000);
        let mut bytes = frame(true, 1, b"hi");
        bytes.extend(frame(true, 1, "m".repeat(300).as_bytes()));
        bytes.extend(frame(true, 1, big.as_bytes()));
        let got = read_all(bytes, 100_000).await;
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], Ok(Incoming::Text(Bytes::from_static(b"hi"))));
        assert_eq!(got[2], Ok(Incoming::Text(Bytes::from(big))));
    }

    #[tokio::test]
    async fn reassembles_fragments_with_control_frames_between() {
        let mut bytes = frame(false, 1, b"hel");
        bytes.extend(frame(true, 9, b"p"));
        bytes.extend(frame(true, 0, b"lo"));
        bytes.extend(frame(true, 8, &1000u16.to_be_bytes()));
        let got = read_all(bytes, 100).await;
        assert_eq!(
            got,
            vec![
                Ok(Incoming::Ping(Bytes::from_static(b"p"))),
                Ok(Incoming::Text(Bytes::from_static(b"hello"))),
                Ok(Incoming::Close(Some(1000))),
            ]
        );
    }

    #[tokio::test]
    async fn refuses_what_the_rfc_forbids() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (frame(true, 1, &[b'a'; 200]), "larger"),
            (
                {
                    let mut f = frame(false, 1, &[b'a'; 60]);
                    f.extend(frame(true, 0, &[b'a'; 60]));
                    f
                },
                "larger",
            ),
            (vec![0x81, 0x02, b'h', b'i'], "masked"),
            (
                {
                    let mut f = frame(true, 1, b"x");
                    f[0] |= 0x40;
                    f
                },
                "reserved",
            ),
            (frame(true, 3, b"x"), "opcode"),
            (frame(false, 9, b"x"), "control"),
            (frame(true, 9, &[0u8; 126]), "control"),
            (frame(true, 0, b"x"), "continuation"),
            (
                {
                    let mut f = frame(false, 1, b"a");
                    f.extend(frame(true, 1, b"b"));
                    f
                },
                "inside",
            ),
            (frame(true, 1, &[0xff, 0xfe]), "UTF-8"),
            (frame(true, 8, &[3]), "close"),
            (frame(true, 8, &999u16.to_be_bytes()), "close code"),
            (frame(true, 8, &1005u16.to_be_bytes()), "close code"),
            (frame(true, 8, &1015u16.to_be_bytes()), "close code"),
            (frame(true, 8, &2999u16.to_be_bytes()), "close code"),
            (frame(true, 8, &5000u16.to_be_bytes()), "close code"),
            (
                {
                    let mut body = 1000u16.to_be_bytes().to_vec();
                    body.extend_from_slice(&[0xce, 0xba, 0xe1, 0xbd]);
                    frame(true, 8, &body)
                },
                "reason",
            ),
            (
                {
                    let mut f = vec![0x81, 0x80 | 127];
                    f.extend_from_slice(&(1u64 << 63).to_be_bytes());
                    f.extend_from_slice(&[0; 4]);
                    f
                },
                "top bit",
            ),
        ];
        for code in [1000u16, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
            let mut body = code.to_be_bytes().to_vec();
            body.extend_from_slice("κόσμε".as_bytes());
            let got = read_all(frame(true, 8, &body), 100).await;
            assert_eq!(got, vec![Ok(Incoming::Close(Some(code)))], "{code}");
        }
        for (bytes, want) in cases {
            let got = read_all(bytes, 100).await;
            let last = got.last().expect("an outcome");
            assert!(
                matches!(last, Err(e) if e.contains(want)),
                "{want}: {got:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_declared_length_is_not_reserved_before_its_bytes_arrive() {
        // A header declaring 60,000 bytes and 100 of them: the buffer stays near what came.
        let mut bytes = frame(true, 1, &[b'a'; 60_000]);
        bytes.truncate(8 + 100);
        let mut r = FrameReader::new(&bytes[..], Bytes::new(), 100_000);
        assert!(matches!(r.next().await, Err(ReadError::Eof)));
        assert!(r.buf.capacity() < 4096, "reserved {}", r.buf.capacity());
    }

    #[tokio::test]
    async fn a_fragment_that_outgrows_the_limit_is_refused_at_its_header() {
        // 60 bytes reassembled, then a continuation declaring 60 more of which none came.
        let mut bytes = frame(false, 1, &[b'a'; 60]);
        bytes.extend_from_slice(&frame(true, 0, &[b'a'; 60])[..6]);
        let got = read_all(bytes, 100).await;
        assert_eq!(got, vec![Err(ReadError::TooLarge.to_string())]);
    }

    #[tokio::test]
    async fn binary_bytes_are_there_for_who_asks() {
        let mut bytes = frame(false, 2, &[0, 1]);
        bytes.extend(frame(true, 0, &[0xff]));
        bytes.extend(frame(true, 1, b"t"));
        let mut r = FrameReader::new(&bytes[..], Bytes::new(), 100);
        let (msg, bin) = r.next_with_binary().await.expect("binary");
        assert_eq!(msg, Incoming::Binary);
        assert_eq!(bin, Some(Bytes::from_static(&[0, 1, 0xff])));
        let (msg, bin) = r.next_with_binary().await.expect("text");
        assert_eq!(msg, Incoming::Text(Bytes::from_static(b"t")));
        assert_eq!(bin, None);
    }

    #[tokio::test]
    async fn the_buffer_is_released_between_messages() {
        let bytes = frame(true, 1, b"hello");
        let mut r = FrameReader::new(&bytes[..], Bytes::new(), 100);
        assert!(matches!(r.next().await, Ok(Incoming::Text(_))));
        assert_eq!(r.buf.capacity(), 0);
    }
}
