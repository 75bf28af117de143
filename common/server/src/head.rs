//! A connection's first HTTP request head, read and checked before HTTP serving starts.
//!
//! hyper answers a request it cannot parse (garbage, or a head past its buffer) with a bare
//! status and no body. The node and the router read the first head themselves, bounded in
//! size and time: garbage gets `400` and an oversized head `431`, each with the usual JSON
//! error body, then the connection closes. A head that parses is handed on unchanged, with
//! whatever followed it, through [`Prefixed`]. Later requests on a keep-alive connection are
//! hyper's to parse (bounded by the same size; hyper's bare answers apply there).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use common::codes::ErrorCode;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Time a new connection gets to send its first head; a silent one is closed.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What the first head was.
#[derive(Debug)]
pub enum FirstHead {
    /// A complete, parseable head: these bytes (and any that followed) go to the server.
    Ok(Vec<u8>),
    /// Refused: write these bytes (a complete HTTP answer), then close.
    Refused(Vec<u8>),
    /// The peer closed, failed or stayed silent before sending a head: close.
    Gone,
}

/// Reads until a complete head, a malformed one, [`MAX_HEAD_BYTES`], EOF or
/// [`HEAD_TIMEOUT`], whichever comes first.
pub async fn read_first<S: AsyncRead + Unpin>(io: &mut S) -> FirstHead {
    match tokio::time::timeout(HEAD_TIMEOUT, read(io)).await {
        Ok(head) => head,
        Err(_) => FirstHead::Gone,
    }
}

async fn read<S: AsyncRead + Unpin>(io: &mut S) -> FirstHead {
    let mut buf = Vec::with_capacity(2048);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        match httparse::Request::new(&mut headers).parse(&buf) {
            Ok(httparse::Status::Complete(_)) => return FirstHead::Ok(buf),
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return FirstHead::Refused(refusal(
                    431,
                    "Request Header Fields Too Large",
                    ErrorCode::InvalidField,
                    "more than 100 request headers",
                ))
            }
            Err(e) => {
                return FirstHead::Refused(refusal(
                    400,
                    "Bad Request",
                    ErrorCode::InvalidField,
                    &format!("malformed HTTP request: {e}"),
                ))
            }
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return FirstHead::Refused(refusal(
                431,
                "Request Header Fields Too Large",
                ErrorCode::InvalidField,
                &format!("request head is larger than {MAX_HEAD_BYTES} bytes"),
            ));
        }
        let room = (MAX_HEAD_BYTES - buf.len()).min(8192);
        let start = buf.len();
        buf.resize(start + room, 0);
        match io.read(&mut buf[start..]).await {
            Ok(0) | Err(_) => return FirstHead::Gone,
            Ok(n) => buf.truncate(start + n),
        }
    }
}

/// A complete `Connection: close` HTTP/1.1 answer with the JSON error body every endpoint
/// uses (`code`, `message`, `retry`).
pub fn refusal(status: u16, reason: &str, code: ErrorCode, message: &str) -> Vec<u8> {
    let body =
        serde_json::json!({ "code": code, "message": message, "retry": code.retry() }).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A stream that first yields bytes already read from it.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            at: 0,
            inner,
        }
    }

    /// The prefix bytes not read yet, and the stream.
    pub fn into_parts(self) -> (Vec<u8>, S) {
        let mut rest = self.prefix;
        rest.drain(..self.at);
        (rest, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn first(bytes: &[u8]) -> FirstHead {
        let mut io = bytes;
        read_first(&mut io).await
    }

    #[tokio::test]
    async fn a_parseable_head_is_handed_on_with_what_followed() {
        let req = b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n\x81\x80abcd";
        match first(req).await {
            FirstHead::Ok(buf) => assert_eq!(buf, req.to_vec()),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn garbage_and_oversized_heads_get_json_answers() {
        let FirstHead::Refused(answer) = first(b"\x16\x03\x01 hello\r\n\r\n").await else {
            panic!("garbage was taken");
        };
        let answer = String::from_utf8(answer).expect("utf-8");
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert!(answer.contains(r#""code":"invalid_field""#), "{answer}");
        let big = format!(
            "GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        let FirstHead::Refused(answer) = first(big.as_bytes()).await else {
            panic!("a 16 KiB header was taken");
        };
        assert!(answer.starts_with(b"HTTP/1.1 431 "));
        assert!(matches!(first(b"GET / HT").await, FirstHead::Gone));
    }

    #[tokio::test]
    async fn prefixed_reads_the_prefix_first_and_gives_back_the_rest() {
        let rest: &[u8] = b" world";
        let mut p = Prefixed::new(b"hello".to_vec(), rest);
        let mut two = [0u8; 2];
        p.read_exact(&mut two).await.expect("read");
        assert_eq!(&two, b"he");
        let (left, inner) = p.into_parts();
        assert_eq!((left.as_slice(), inner), (&b"llo"[..], rest));
    }
}
