//! `chat_node::reader::FrameReader` on arbitrary bytes in arbitrary chunkings.
//!
//! Input: `[max/8] [flags] [chunk sizes...] [stream...]`. `flags & 0x0F` is how many chunk
//! size bytes follow (cycled, 1-255 bytes, 0xFF for the rest; none means one chunk),
//! `0x10` makes the reader return `Pending` before every chunk, `0x20` drops the `next()`
//! future at each `Pending` and calls again (the reader says calling again resumes), `0x40`
//! hands the first chunk over as the `initial` bytes of `FrameReader::new`, `0x80` sets the
//! limit to 1 MiB instead of `max/8 * 8` (so declared lengths far past the input are
//! allowed and must not be reserved).
//!
//! Checked: no panic; no hang (a bounded number of polls and messages); the reader's
//! allocations stay under a multiple of the largest acceptable frame (or of the input, if
//! smaller); Text is UTF-8 and no message passes the limit; a control frame is short and a
//! close code is one a peer may send; and the outcome (every message, then the error) is
//! the same as reading the same bytes in one piece: chunking, `Pending` and cancellation
//! change nothing.

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use chat_node::reader::{FrameReader, Incoming, ReadError};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// Counts live heap bytes so the reader's buffer can be bounded from outside: its fields
/// are private and this crate must not change it. `unsafe` is what `GlobalAlloc` takes; the
/// calls are passed straight to the system allocator.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            // Old and new blocks may both be live during the copy.
            let now = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(now, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Header of the longest frame: 2 bytes, an 8-byte length, a 4-byte mask.
const MAX_HEADER: usize = 14;
/// The reader's read size when it does not know what comes (its `READ_CHUNK`).
const READ_CHUNK: usize = 512;

/// Yields `data` in the given chunk sizes (cycled), optionally `Pending` before each.
struct Chunks<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    next_size: usize,
    pend: bool,
    pended: bool,
}

impl Chunks<'_> {
    fn size(&mut self) -> usize {
        if self.sizes.is_empty() {
            return usize::MAX;
        }
        let b = self.sizes[self.next_size % self.sizes.len()];
        self.next_size += 1;
        if b == 0xFF {
            usize::MAX
        } else {
            usize::from(b) + 1
        }
    }
}

impl AsyncRead for Chunks<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.data.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if self.pend && !self.pended {
            self.pended = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.pended = false;
        let n = self.size().min(self.data.len()).min(buf.remaining());
        let (head, rest) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// What one message was, without keeping its bytes (they would pin the reader's memory).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Seen {
    Text(usize, u64),
    Binary(usize, u64),
    Ping(usize, u64),
    Pong,
    Close(Option<u16>),
}

fn digest(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

fn error_kind(e: &ReadError) -> &'static str {
    match e {
        ReadError::Eof => "eof",
        ReadError::TooLarge => "too large",
        ReadError::Protocol(why) => why,
        ReadError::Io(e) => panic!("an in-memory reader cannot fail: {e}"),
    }
}

/// Polls `fut` with a no-op waker until it is ready, or, with `cancel`, until its first
/// `Pending` (then it is dropped and `None` returned). Every `Pending` counts in `polls`.
fn poll_until<F: Future>(
    fut: F,
    cancel: bool,
    polls: &mut usize,
    limit: usize,
) -> Option<F::Output> {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(r) => return Some(r),
            Poll::Pending => {
                *polls += 1;
                assert!(*polls <= limit, "reader keeps returning Pending");
                if cancel {
                    return None;
                }
            }
        }
    }
}

/// One `next_with_binary()` (or `next()`), called again after each cancellation.
fn next_message<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    with_binary: bool,
    cancel: bool,
    polls: &mut usize,
    limit: usize,
) -> Result<(Incoming, Option<Bytes>), ReadError> {
    loop {
        let got = if with_binary {
            poll_until(reader.next_with_binary(), cancel, polls, limit)
        } else {
            let next = async { reader.next().await.map(|m| (m, None)) };
            poll_until(next, cancel, polls, limit)
        };
        if let Some(r) = got {
            return r;
        }
    }
}

fn check(seen: Seen, max: usize, text: Option<&[u8]>) {
    match seen {
        Seen::Text(len, _) => {
            assert!(len <= max, "text of {len} bytes past the limit {max}");
            let t = text.expect("text bytes");
            assert!(std::str::from_utf8(t).is_ok(), "Text is not UTF-8");
        }
        Seen::Binary(len, _) => assert!(len <= max, "binary of {len} bytes past {max}"),
        Seen::Ping(len, _) => assert!(len <= 125, "ping of {len} bytes"),
        Seen::Pong | Seen::Close(None) => {}
        Seen::Close(Some(code)) => assert!(
            matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999),
            "close code {code} a peer may not send"
        ),
    }
}

/// Reads until an error, recording each message. Returns the error's kind.
fn read_all<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    with_binary: bool,
    cancel: bool,
    max: usize,
    out: &mut Vec<Seen>,
    poll_limit: usize,
) -> &'static str {
    let mut polls = 0;
    loop {
        let got = next_message(reader, with_binary, cancel, &mut polls, poll_limit);
        let (msg, binary): (Incoming, Option<Bytes>) = match got {
            Ok(x) => x,
            Err(e) => return error_kind(&e),
        };
        let seen = match &msg {
            Incoming::Text(b) => Seen::Text(b.len(), digest(b)),
            Incoming::Binary => match &binary {
                Some(b) => Seen::Binary(b.len(), digest(b)),
                // `next` drops the bytes: only the kind can be compared.
                None => Seen::Binary(0, 0),
            },
            Incoming::Ping(b) => Seen::Ping(b.len(), digest(b)),
            Incoming::Pong => Seen::Pong,
            Incoming::Close(c) => Seen::Close(*c),
        };
        if with_binary {
            assert_eq!(
                binary.is_some(),
                matches!(msg, Incoming::Binary),
                "binary bytes beside a non-binary message"
            );
        }
        let text = match &msg {
            Incoming::Text(b) => Some(&b[..]),
            _ => None,
        };
        check(seen, max, text);
        // Each message takes at least a 2-byte header and a 4-byte mask from the input.
        assert!(
            out.len() < out.capacity(),
            "more messages than the input holds"
        );
        out.push(seen);
    }
}

fn peak_since(base: usize) -> usize {
    PEAK.load(Ordering::Relaxed).saturating_sub(base)
}

fn reset_peak() -> usize {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    live
}

fuzz_target!(|input: &[u8]| {
    let [max8, flags, rest @ ..] = input else {
        return;
    };
    let max = if flags & 0x80 != 0 {
        1 << 20
    } else {
        usize::from(*max8) * 8
    };
    let n_sizes = usize::from(flags & 0x0F).min(rest.len());
    let (sizes, data) = rest.split_at(n_sizes);
    let pend = flags & 0x10 != 0;
    let cancel = flags & 0x20 != 0;
    let split = if flags & 0x40 != 0 {
        let first = sizes.first().map_or(usize::MAX, |&b| usize::from(b) + 1);
        first.min(data.len())
    } else {
        0
    };
    let (initial, stream) = data.split_at(split);
    let initial = Bytes::copy_from_slice(initial);
    let capacity = data.len() / 6 + 1;
    let poll_limit = data.len() + 2;
    // The reader holds at most a read buffer and a message being reassembled, each at most
    // the largest acceptable frame plus one read chunk, each at most doubled by growth, and
    // briefly the old block beside the new one while growing: six of `frame`. A frame is
    // never larger than what arrived, whatever its header declared. The bytes handed over
    // at the start are copied, and may grow the same way.
    let frame = max.min(data.len()) + MAX_HEADER + READ_CHUNK;
    let bound = 8 * frame + 3 * initial.len();

    // The bytes in one piece: the reference outcome.
    let mut whole = Vec::with_capacity(capacity);
    let base = reset_peak();
    let whole_end = {
        let mut r = FrameReader::new(data, Bytes::new(), max);
        read_all(&mut r, false, false, max, &mut whole, poll_limit)
    };
    let whole_peak = peak_since(base);
    assert!(
        whole_peak <= 8 * frame,
        "reading {} bytes in one piece with max {max} held {whole_peak} bytes",
        data.len()
    );

    // The same bytes chunked, pending and cancelled as the input says.
    let mut chunked = Vec::with_capacity(capacity);
    let base = reset_peak();
    let chunked_end = {
        let io = Chunks {
            data: stream,
            sizes,
            next_size: usize::from(split > 0),
            pend,
            pended: false,
        };
        let mut r = FrameReader::new(io, initial.clone(), max);
        read_all(&mut r, true, cancel, max, &mut chunked, poll_limit)
    };
    let chunked_peak = peak_since(base);
    assert!(
        chunked_peak <= bound,
        "reading {} bytes chunked with max {max} held {chunked_peak} bytes (bound {bound})",
        data.len()
    );

    assert_eq!(chunked_end, whole_end, "chunking changed the error");
    assert_eq!(chunked.len(), whole.len(), "chunking changed the messages");
    for (c, w) in chunked.iter().zip(&whole) {
        match (c, w) {
            (Seen::Binary(..), Seen::Binary(..)) => {}
            _ => assert_eq!(c, w, "chunking changed a message"),
        }
    }
});
