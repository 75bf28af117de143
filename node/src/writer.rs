//! Server-to-client WebSocket frame encoding with a batch buffer that exists only while
//! there is something to write.
//!
//! Server frames are never masked, so encoding is a 2-10 byte header and the payload. The
//! writer task appends every waiting frame to one buffer and writes it out (one `write`
//! when the socket has room), then drops the buffer: an idle connection holds no write
//! buffer at all, which is most of the memory an idle connection would otherwise pin.
//! Reading (masking, fragments, control frames) is `reader.rs`.

use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A batch stops growing past this many bytes and is written out.
pub const BATCH_BYTES: usize = 64 * 1024;

pub struct FrameWriter<W> {
    io: W,
    buf: Vec<u8>,
    /// How much of `buf` is written: a flush that is dropped halfway resumes from here.
    at: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(io: W) -> Self {
        FrameWriter {
            io,
            buf: Vec::new(),
            at: 0,
        }
    }

    /// Appends one complete (FIN) frame to the batch.
    pub fn push(&mut self, opcode: u8, payload: &[u8]) {
        encode(&mut self.buf, opcode, payload);
    }

    pub fn push_close(&mut self, code: u16, reason: &str) {
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(reason.as_bytes());
        self.push(OP_CLOSE, &payload);
    }

    pub fn batch_len(&self) -> usize {
        self.buf.len()
    }

    /// Writes the batch and releases its buffer. Fails with `TimedOut` when the peer takes
    /// no bytes at all for `stall` (a peer that reads slowly but keeps reading is waited
    /// for). Cancel-safe: what was written stays written, and a later flush goes on from
    /// there, so no byte is sent twice.
    pub async fn flush(&mut self, stall: Duration) -> std::io::Result<()> {
        let stalled = || std::io::Error::new(std::io::ErrorKind::TimedOut, "peer took no bytes");
        while self.at < self.buf.len() {
            match tokio::time::timeout(stall, self.io.write(&self.buf[self.at..])).await {
                Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => self.at += n,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(stalled()),
            }
        }
        self.buf = Vec::new();
        self.at = 0;
        tokio::time::timeout(stall, self.io.flush())
            .await
            .map_err(|_| stalled())?
    }
}

/// Encodes an unmasked frame with FIN set.
pub fn encode(buf: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let len = payload.len();
    buf.reserve(len + 10);
    buf.push(0x80 | opcode);
    if len < 126 {
        buf.push(len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        buf.push(126);
        buf.extend_from_slice(&len16.to_be_bytes());
    } else {
        buf.push(127);
        buf.extend_from_slice(&(len as u64).to_be_bytes());
    }
    buf.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_for_each_length_class() {
        let mut b = Vec::new();
        encode(&mut b, OP_TEXT, b"hi");
        assert_eq!(b, [0x81, 2, b'h', b'i']);
        let mut b = Vec::new();
        encode(&mut b, OP_TEXT, &[0u8; 300]);
        assert_eq!(&b[..4], &[0x81, 126, 1, 44]);
        assert_eq!(b.len(), 304);
        let mut b = Vec::new();
        encode(&mut b, OP_PING, &[0u8; 70_000]);
        assert_eq!(&b[..2], &[0x89, 127]);
        assert_eq!(
            u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")),
            70_000
        );
    }

    #[tokio::test]
    async fn flush_writes_the_batch_and_drops_the_buffer() {
        let mut w = FrameWriter::new(Vec::new());
        w.push(OP_TEXT, b"a");
        w.push_close(4000, "slow_consumer");
        w.flush(Duration::from_secs(5)).await.expect("flush");
        assert_eq!(w.buf.capacity(), 0);
        let out = w.io;
        assert_eq!(&out[..3], &[0x81, 1, b'a']);
        assert_eq!(&out[3..7], &[0x88, 15, 0x0f, 0xa0]);
        assert_eq!(&out[7..], b"slow_consumer");
    }
}
