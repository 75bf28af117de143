//! One member connection that mostly sits still: connect, wait for `joined`, optionally send
//! one message and wait for its ack, then stay open (answering the server's pings) until the
//! owner asks it to close, and close with 1000 and the server's echo.
//!
//! `connections` and `churn` are made of these. A connection is a reader task and a writer
//! task, as in `fanout` (fastwebsockets' read is not cancel-safe, so nothing here `select!`s
//! on a read: the owner watches the reader's `JoinHandle`, which is). Every wait has a
//! deadline; a reader whose server never answers the close is aborted after the grace.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::client::{self, ConnectOptions, ControlRx, Incoming, Reader, Target, WsWrite};
use crate::payload::{FrameView, OwnedView};
use crate::report::close_label;

/// A connection that received its `joined`.
pub struct Joined {
    pub reader: Reader,
    pub ws: WsWrite,
    pub control: ControlRx,
    /// Microseconds from the start of the TCP connect to `joined`.
    pub connect_us: u64,
}

/// The parts of a server frame the idle client looks at, borrowed or owned.
struct Seen {
    kind: String,
    room: Option<String>,
    cid: Option<String>,
    code: Option<String>,
}

fn seen(bytes: &[u8]) -> Option<Seen> {
    let own = |v: &FrameView<'_>| Seen {
        kind: v.kind.to_owned(),
        room: v.room.map(str::to_owned),
        cid: v.cid.map(str::to_owned),
        code: v.code.map(str::to_owned),
    };
    match FrameView::parse(bytes) {
        Some(v) => Some(own(&v)),
        None => OwnedView::parse(bytes).map(|o| own(&o.as_view())),
    }
}

/// Connects and waits for `joined` in `room`; the error is the failure's kind, as reported
/// (e.g. `upgrade refused: HTTP 401 Unauthorized`, `connect timed out`).
pub async fn connect_joined(
    target: &Target,
    room: &str,
    opts: &ConnectOptions,
    timeout: Duration,
) -> Result<Joined, String> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let (rd, ws) = client::connect_as(target, room, opts, timeout)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let (mut reader, control) = client::reader(rd);
    loop {
        let next = tokio::time::timeout_at(deadline, reader.next())
            .await
            .map_err(|_| "no joined frame before the connect timeout".to_owned())?;
        match next {
            Ok(Incoming::Data(b)) => match seen(&b) {
                Some(s) if s.kind == "joined" && s.room.as_deref() == Some(room) => {
                    return Ok(Joined {
                        reader,
                        ws,
                        control,
                        connect_us: started.elapsed().as_micros() as u64,
                    })
                }
                Some(s) if s.kind == "error" => {
                    return Err(format!(
                        "error before joined: {}",
                        s.code.as_deref().unwrap_or("unknown")
                    ))
                }
                _ => {}
            },
            Ok(Incoming::Close(code)) => {
                return Err(format!("closed before joined: {}", close_label(code)))
            }
            Ok(_) => {}
            Err(e) => return Err(format!("connection failed before joined: {e}")),
        }
    }
}

/// What one send of [`send_and_wait_ack`] got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    Acked {
        micros: u64,
    },
    /// An error frame for this cid, with its code.
    Rejected(String),
    /// Neither within the timeout, or the connection ended (the label says how).
    NoAnswer(String),
}

/// Sends one `send` frame and reads until the ack or error carrying `cid`, within
/// `timeout`. Error frames for other things are returned in `other_errors`.
pub async fn send_and_wait_ack(
    j: &mut Joined,
    room: &str,
    cid: &str,
    body: &str,
    timeout: Duration,
    other_errors: &mut BTreeMap<String, u64>,
) -> SendOutcome {
    let frame = serde_json::json!({"type": "send", "room": room, "cid": cid, "body": body});
    let mut bytes = frame.to_string().into_bytes();
    let sent = Instant::now();
    if let Err(e) = client::send_text(&mut j.ws, &mut bytes).await {
        return SendOutcome::NoAnswer(format!("send failed: {e}"));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // Pongs the reader owes go out while we wait (the writer task starts later).
        while let Ok(f) = j.control.try_recv() {
            let _ = j.ws.write_frame(f).await;
        }
        let next = match tokio::time::timeout_at(deadline, j.reader.next()).await {
            Ok(n) => n,
            Err(_) => return SendOutcome::NoAnswer("no ack before the timeout".into()),
        };
        match next {
            Ok(Incoming::Data(b)) => {
                let Some(s) = seen(&b) else { continue };
                let ours = s.cid.as_deref() == Some(cid);
                match (s.kind.as_str(), ours) {
                    ("ack", true) => {
                        return SendOutcome::Acked {
                            micros: sent.elapsed().as_micros() as u64,
                        }
                    }
                    ("error", true) => {
                        return SendOutcome::Rejected(s.code.unwrap_or_else(|| "unknown".into()))
                    }
                    ("error", false) => {
                        *other_errors
                            .entry(s.code.unwrap_or_else(|| "unknown".into()))
                            .or_default() += 1;
                    }
                    _ => {}
                }
            }
            Ok(Incoming::Close(code)) => return SendOutcome::NoAnswer(close_label(code)),
            Ok(_) => {}
            Err(_) => return SendOutcome::NoAnswer(close_label(1006)),
        }
    }
}

/// How a held connection's reader ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadEnd {
    /// Close label: `"1000"` for the echo of our own close, `"4003 token_expired"`...;
    /// `"1006 abnormal"` when the connection ended without a close frame.
    pub close: String,
    /// Error frames by code while held.
    pub errors: BTreeMap<String, u64>,
}

/// A joined connection left open: its reader and writer tasks.
pub struct Live {
    reader: JoinHandle<ReadEnd>,
    /// The reader's result once [`Live::wait_until`] saw it end (a `JoinHandle` must not be
    /// polled again after it completed).
    ended: Option<Option<ReadEnd>>,
    writer: JoinHandle<()>,
    close: Option<oneshot::Sender<()>>,
}

/// Leaves `j` open: the reader reads (and counts error frames) until a close frame or the
/// end of the connection; the writer forwards owed pongs until asked to close.
pub fn hold(j: Joined) -> Live {
    let Joined {
        mut reader,
        mut ws,
        mut control,
        ..
    } = j;
    let (close_tx, close_rx) = oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        // Asked to close, or the owner is gone: close either way.
        if client::forward_control(&mut ws, &mut control, close_rx)
            .await
            .is_some()
        {
            let _ = client::send_close(&mut ws, 1000, "bench done").await;
        }
    });
    let reader = tokio::spawn(async move {
        let mut end = ReadEnd::default();
        loop {
            match reader.next().await {
                Ok(Incoming::Data(b)) => {
                    if let Some(s) = seen(&b).filter(|s| s.kind == "error") {
                        *end.errors
                            .entry(s.code.unwrap_or_else(|| "unknown".into()))
                            .or_default() += 1;
                    }
                }
                Ok(Incoming::Close(code)) => {
                    end.close = close_label(code);
                    return end;
                }
                Ok(_) => {}
                Err(_) => {
                    end.close = close_label(1006);
                    return end;
                }
            }
        }
    });
    Live {
        reader,
        ended: None,
        writer,
        close: Some(close_tx),
    }
}

impl Live {
    /// The reader ended by itself: the server closed or dropped the connection.
    pub fn ended_by_server(&self) -> bool {
        self.ended.is_some() || self.reader.is_finished()
    }

    /// Waits until `deadline` or the reader's end, whichever is first; `true` when the
    /// server closed (or dropped) the connection first.
    pub async fn wait_until(&mut self, deadline: tokio::time::Instant) -> bool {
        if self.ended.is_some() {
            return true;
        }
        tokio::select! {
            r = &mut self.reader => {
                self.ended = Some(r.ok());
                true
            }
            _ = tokio::time::sleep_until(deadline) => false,
        }
    }

    /// Asks the writer to send a close frame (idempotent).
    pub fn request_close(&mut self) {
        if let Some(tx) = self.close.take() {
            let _ = tx.send(());
        }
    }

    /// Closes (if not asked yet) and waits up to `grace` for the reader to see the echo;
    /// `None` when it did not (the tasks are then aborted).
    pub async fn finish(mut self, grace: Duration) -> Option<ReadEnd> {
        self.request_close();
        let out = if let Some(end) = self.ended.take() {
            end
        } else {
            match tokio::time::timeout(grace, &mut self.reader).await {
                Ok(Ok(end)) => Some(end),
                Ok(Err(_)) => None,
                Err(_) => {
                    self.reader.abort();
                    None
                }
            }
        };
        if tokio::time::timeout(Duration::from_millis(200), &mut self.writer)
            .await
            .is_err()
        {
            self.writer.abort();
        }
        out
    }
}
