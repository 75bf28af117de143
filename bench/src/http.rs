//! A small HTTP/1.1 client for the cluster's HTTP API (history reads, publishes, the
//! router's owner lookup): one keep-alive connection per [`HttpClient`], reopened when the
//! server closes it, every request bounded in time and body size.
//!
//! It only ever connects to the bench's `--url` target (or an address the caller was given
//! explicitly, e.g. a node for `--http-publishers`), and knows nothing about rooms.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// History pages are at most 1000 messages of at most 4 KiB bodies; 16 MiB is plenty.
const MAX_BODY: usize = 16 << 20;

/// One HTTP answer: status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// A keep-alive connection to one address.
pub struct HttpClient {
    addr: SocketAddr,
    authority: String,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl HttpClient {
    pub fn new(addr: SocketAddr, authority: impl Into<String>) -> Self {
        HttpClient {
            addr,
            authority: authority.into(),
            sender: None,
        }
    }

    pub fn for_target(target: &crate::client::Target) -> Self {
        HttpClient::new(target.addr, target.authority.clone())
    }

    async fn connection(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        let reusable = match &mut self.sender {
            Some(s) => !s.is_closed() && s.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            let stream = TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("connect {}", self.addr))?;
            stream.set_nodelay(true)?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            // The driver ends when the server closes or `sender` is dropped.
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        self.sender
            .as_mut()
            .ok_or_else(|| anyhow!("no HTTP connection"))
    }

    /// Sends one request (`path` includes the query) and reads the whole answer within
    /// `timeout`. A transport failure drops the connection so the next call reconnects.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<String>,
        timeout: Duration,
    ) -> anyhow::Result<Answer> {
        let out = tokio::time::timeout(timeout, self.request_inner(method, path, body)).await;
        match out {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                self.sender = None;
                Err(anyhow!("{method} {path}: no answer within {timeout:?}"))
            }
        }
    }

    async fn request_inner(
        &mut self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<Answer> {
        let authority = self.authority.clone();
        let sender = self.connection().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, authority);
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the answer to {path}: {e}"))?
            .to_bytes();
        Ok(Answer { status, body })
    }
}

/// One message of a history page, as far as the bench needs it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct HistoryEntry {
    #[serde(deserialize_with = "id_from_str")]
    pub id: u64,
    pub from: String,
    pub cid: String,
}

#[derive(Debug, serde::Deserialize)]
pub struct HistoryPage {
    pub messages: Vec<HistoryEntry>,
    #[serde(default)]
    pub has_more: bool,
}

fn id_from_str<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s: String = serde::Deserialize::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

/// Reads a room's whole history oldest first (`after=` paging, `limit` per page) through
/// `client`, retrying answers `common`'s table says to retry ([`crate::client::status_retried`])
/// until `deadline`.
/// `credentials` (`user=U` or `token=JWT`, see [`crate::auth::Auth::credentials`])
/// authenticate. Returns the entries and the number of pages.
pub async fn read_history(
    client: &mut HttpClient,
    room: &str,
    credentials: &str,
    limit: u32,
    deadline: tokio::time::Instant,
) -> anyhow::Result<(Vec<HistoryEntry>, u64)> {
    let mut out: Vec<HistoryEntry> = Vec::new();
    let mut pages = 0u64;
    let mut after = 0u64;
    let mut backoff = Duration::from_millis(100);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            anyhow::bail!(
                "history of {room}: deadline reached after {pages} pages ({} messages)",
                out.len()
            );
        }
        let path = format!("/v1/rooms/{room}/messages?after={after}&limit={limit}&{credentials}");
        let retry = match client.request("GET", &path, None, left).await {
            Ok(a) if a.status == 200 => {
                let page: HistoryPage = serde_json::from_slice(&a.body)
                    .with_context(|| format!("history of {room}: bad page"))?;
                pages += 1;
                backoff = Duration::from_millis(100);
                let more = page.has_more && !page.messages.is_empty();
                for m in page.messages {
                    if m.id <= after {
                        anyhow::bail!("history of {room}: id {} not after {after}", m.id);
                    }
                    after = m.id;
                    out.push(m);
                }
                if !more {
                    return Ok((out, pages));
                }
                false
            }
            Ok(a) if crate::client::status_retried(a.status) => true,
            Ok(a) => anyhow::bail!(
                "history of {room}: HTTP {} {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            ),
            Err(_) => true,
        };
        if retry {
            tokio::time::sleep(backoff.min(left)).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}
