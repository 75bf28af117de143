//! `chat_server::head::read_first` on arbitrary bytes from an in-memory reader.
//!
//! Input: `[flags] [chunk sizes...] [stream...]`. `flags & 0x0F` chunk size bytes follow
//! (cycled, in units of 16 bytes; 0 means as much as the reader asks for);
//! `(flags >> 4) + 1` is how many times the stream is repeated, so heads past
//! `MAX_HEAD_BYTES` (16 KiB) are reached from small inputs.
//!
//! Checked: no panic; `Ok(buf)` is a prefix of the stream, at most `MAX_HEAD_BYTES`, and
//! httparse parses a complete request from it; `Refused` is a complete HTTP answer (400 or
//! 431, `connection: close`, a JSON body of the stated length with `invalid_field`); `Gone`
//! only when the stream ended inside a head; and the outcome does not depend on chunking.

#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use chat_server::head::{read_first, FirstHead, MAX_HEAD_BYTES};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

struct Chunks<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    next: usize,
    read: usize,
}

impl AsyncRead for Chunks<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let size = if self.sizes.is_empty() {
            usize::MAX
        } else {
            let b = self.sizes[self.next % self.sizes.len()];
            self.next += 1;
            (usize::from(b) + 1) * 16
        };
        let n = size.min(self.data.len()).min(buf.remaining());
        let (head, rest) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = rest;
        self.read += n;
        Poll::Ready(Ok(()))
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Ok,
    Refused(u16),
    Gone,
}

fn request_status(b: &[u8]) -> Result<httparse::Status<usize>, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    httparse::Request::new(&mut headers).parse(b)
}

fn check_answer(answer: &[u8]) -> u16 {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(n)) = resp.parse(answer) else {
        panic!(
            "refusal is not an HTTP answer: {:?}",
            String::from_utf8_lossy(answer)
        );
    };
    let status = resp.code.expect("status");
    assert!(matches!(status, 400 | 431), "refused with {status}");
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    assert_eq!(header("connection").as_deref(), Some("close"));
    let body = &answer[n..];
    assert_eq!(
        header("content-length").and_then(|v| v.parse::<usize>().ok()),
        Some(body.len())
    );
    let json: serde_json::Value = serde_json::from_slice(body).expect("JSON body");
    assert_eq!(json["code"], "invalid_field");
    assert!(json["message"].is_string());
    status
}

fn run(stream: &[u8], sizes: &[u8]) -> Kind {
    let mut io = Chunks {
        data: stream,
        sizes,
        next: 0,
        read: 0,
    };
    let got = runtime().block_on(read_first(&mut io));
    match got {
        FirstHead::Ok(buf) => {
            assert!(buf.len() <= MAX_HEAD_BYTES, "kept {} bytes", buf.len());
            assert!(stream.starts_with(&buf), "Ok is not what was read");
            assert_eq!(buf.len(), io.read);
            assert!(
                matches!(request_status(&buf), Ok(httparse::Status::Complete(n)) if n <= buf.len()),
                "Ok without a complete head: {:?}",
                String::from_utf8_lossy(&buf)
            );
            Kind::Ok
        }
        FirstHead::Refused(answer) => Kind::Refused(check_answer(&answer)),
        FirstHead::Gone => {
            assert_eq!(io.read, stream.len(), "gone before the stream ended");
            assert!(
                stream.len() < MAX_HEAD_BYTES,
                "gone after a whole head's worth"
            );
            assert_eq!(request_status(stream), Ok(httparse::Status::Partial));
            Kind::Gone
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let [flags, rest @ ..] = input else {
        return;
    };
    let n_sizes = usize::from(flags & 0x0F).min(rest.len());
    let (sizes, data) = rest.split_at(n_sizes);
    let copies = usize::from(flags >> 4) + 1;
    let stream = data.repeat(copies);
    let whole = run(&stream, &[]);
    let chunked = run(&stream, sizes);
    assert_eq!(chunked, whole, "chunking changed the outcome");
});
