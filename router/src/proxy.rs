//! Forwarding to a room's owner: WebSocket upgrades spliced byte for byte, and room API
//! requests over a pool of keep-alive connections.
//!
//! A WebSocket gets its own TCP connection to the owner: the client's upgrade request is
//! replayed there, and if the owner answers `101` both sides are upgraded and bytes are
//! copied each way until that side closes; the owner's last bytes (its close frame) reach
//! the client even when the client's direction has failed (or the shutdown grace ends). The router never
//! parses WebSocket frames, so it adds no per-message work and cannot corrupt a stream;
//! whatever the owner refuses with (401, 403, 421, 503 and their JSON) reaches the client
//! unchanged. An owner that cannot be reached or does not answer in time gets the client a
//! 502 `node_unavailable` with `Retry-After`, never a hang. This module does not choose the
//! owner; [`crate::http`] does, from the ring.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{metrics as m, ErrorCode, NodeInfo};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::telemetry::SpliceGuard;
use chat_server::http::{error, error_with_status, Body};

/// Largest answer body relayed from a node. Node answers are JSON built in memory (a
/// history page is at most 1000 messages), so they are read whole under the upstream
/// timeout: a node that stalls mid-answer then costs the client a clean 502, not a
/// truncated body. This bound only stops a misbehaving upstream from exhausting memory.
const MAX_UPSTREAM_BODY_BYTES: usize = 32 << 20;
/// Idle pooled connections kept per node.
const POOL_IDLE_PER_NODE: usize = 64;
const POOL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long one direction of a WebSocket splice may go on after the other has ended (the
/// owner's last bytes on their way to the client, the client's close answer being read).
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Why an exchange with the owner failed; the label of `chat_router_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// Refused, unreachable, or an address that does not resolve.
    Connect,
    /// The connection or the answer took longer than configured.
    Timeout,
    /// The owner closed mid-answer or did not speak HTTP.
    Protocol,
}

impl UpstreamError {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Protocol => "protocol",
        }
    }

    /// Counts the failure and builds the client's answer: 502 `node_unavailable`.
    fn answer(self, node: &NodeInfo, detail: &dyn std::fmt::Display) -> Response<Body> {
        metrics::counter!(m::ROUTER_UPSTREAM_ERRORS, "kind" => self.as_str()).increment(1);
        // The owner being down is an operational event the ring will fix within the TTL,
        // not a router bug: `warn`, with what a human needs to find the node.
        tracing::warn!(node = node.id, addr = %node.addr, kind = self.as_str(), error = %detail, "owner did not answer");
        let what = match self {
            UpstreamError::Connect => "could not be reached",
            UpstreamError::Timeout => "did not answer in time",
            UpstreamError::Protocol => "gave no usable answer",
        };
        error_with_status(
            StatusCode::BAD_GATEWAY,
            ErrorCode::NodeUnavailable,
            &format!(
                "the room's node {} ({}) {what}; retry later",
                node.id, node.addr
            ),
        )
    }
}

/// The way to the owner nodes: the pooled HTTP client for the room API, and every
/// WebSocket splice, so shutdown can wait for them and cut the ones still open.
pub struct Upstream {
    config: Arc<Config>,
    client: Client<HttpConnector, Full<Bytes>>,
    splices: TaskTracker,
    /// Cancelled when the grace period ends: cuts the splices still running.
    cut: CancellationToken,
}

impl Upstream {
    pub fn new(config: Arc<Config>) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.upstream_connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_IDLE_PER_NODE)
            .build(connector);
        Upstream {
            config,
            client,
            splices: TaskTracker::new(),
            cut: CancellationToken::new(),
        }
    }

    /// Waits until `deadline` for the splices to end, then cuts the rest and gives them
    /// `unwind` to finish; their clients reconnect through another router.
    pub async fn finish_splices(&self, deadline: tokio::time::Instant, unwind: Duration) {
        self.splices.close();
        if tokio::time::timeout_at(deadline, self.splices.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open = self.splices.len(),
                "grace period over: cutting proxied WebSockets; clients reconnect elsewhere"
            );
            self.cut.cancel();
            let _ = tokio::time::timeout(unwind, self.splices.wait()).await;
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, not the request.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Headers the sender named in `Connection`: hop-by-hop too (RFC 9110 §7.6.1).
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// The headers sent to the owner. For an upgrade `Connection`/`Upgrade` must go through
/// (they are the request); otherwise hop-by-hop headers stay on the client's connection.
/// `Host` names the owner; the client's goes in `X-Forwarded-Host`. Body framing is
/// recomputed by hyper for the body actually sent.
fn forward_headers(parts: &Parts, node: &NodeInfo, peer: SocketAddr, upgrade: bool) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(parts.headers.len() + 3);
    let listed = connection_listed(&parts.headers);
    for (name, value) in &parts.headers {
        if name == header::HOST || name == header::CONTENT_LENGTH {
            continue;
        }
        let keep_for_upgrade = upgrade && (name == header::CONNECTION || name == header::UPGRADE);
        if (is_hop_by_hop(name) || listed.contains(name)) && !keep_for_upgrade {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    if let Ok(host) = HeaderValue::from_str(&node.addr) {
        out.insert(header::HOST, host);
    }
    if let Some(host) = parts.headers.get(header::HOST) {
        out.insert(X_FORWARDED_HOST.clone(), host.clone());
    }
    let ip = peer.ip().to_string();
    let xff = match parts
        .headers
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
    {
        Some(prior) => format!("{prior}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        out.insert(X_FORWARDED_FOR.clone(), v);
    }
    out.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    out
}

fn path_and_query(parts: &Parts) -> &str {
    parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
}

/// Copies an owner's answer for the client, minus hop-by-hop headers (hyper frames the
/// body it sends).
fn relay(parts: http::response::Parts, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = parts.status;
    let listed = connection_listed(&parts.headers);
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name) && !listed.contains(name) && name != header::CONTENT_LENGTH {
            resp.headers_mut().append(name.clone(), value.clone());
        }
    }
    resp
}

/// Proxies one `/ws` upgrade to `node` and, once both sides are upgraded, splices them.
pub async fn websocket(
    mut req: Request<Incoming>,
    upstream: &Upstream,
    peer: SocketAddr,
    node: &NodeInfo,
) -> Response<Body> {
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (parts, _body) = req.into_parts();
    let config = &upstream.config;
    let mut upstream_req = Request::new(Full::<Bytes>::default());
    *upstream_req.method_mut() = parts.method.clone();
    *upstream_req.version_mut() = Version::HTTP_11;
    match path_and_query(&parts).parse::<Uri>() {
        Ok(uri) => *upstream_req.uri_mut() = uri,
        Err(_) => return error(ErrorCode::InvalidField, "unusable request target"),
    }
    *upstream_req.headers_mut() = forward_headers(&parts, node, peer, true);

    let stream = match tokio::time::timeout(
        config.upstream_connect_timeout,
        TcpStream::connect(node.addr.as_str()),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return UpstreamError::Connect.answer(node, &e),
        Err(_) => return UpstreamError::Timeout.answer(node, &"connect timed out"),
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => return UpstreamError::Protocol.answer(node, &e),
    };
    // Drives the owner connection: through the upgrade on a 101, or until the answer has
    // been read and `sender` dropped otherwise.
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "owner connection ended with an error");
        }
    });
    let deadline = tokio::time::Instant::now() + config.upstream_timeout;
    let mut resp = match tokio::time::timeout_at(deadline, sender.send_request(upstream_req)).await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return UpstreamError::Protocol.answer(node, &e),
        Err(_) => return UpstreamError::Timeout.answer(node, &"no answer to the upgrade"),
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The owner's refusal is the client's answer, as if it had connected directly.
        let (parts, body) = resp.into_parts();
        let collected = tokio::time::timeout_at(
            deadline,
            Limited::new(body, MAX_UPSTREAM_BODY_BYTES).collect(),
        )
        .await;
        return match collected {
            Ok(Ok(b)) => relay(parts, b.to_bytes()),
            Ok(Err(e)) => UpstreamError::Protocol.answer(node, &e),
            Err(_) => UpstreamError::Timeout.answer(node, &"answer body too slow"),
        };
    }
    let node_upgrade = hyper::upgrade::on(&mut resp);
    let (parts, _) = resp.into_parts();
    upstream.splices.spawn(splice(
        client_upgrade,
        node_upgrade,
        upstream.cut.clone(),
        node.id,
    ));
    // The owner's 101, headers and all (`Sec-WebSocket-Accept` answers the client's key).
    Response::from_parts(parts, Full::default())
}

async fn splice(client: OnUpgrade, node: OnUpgrade, cut: CancellationToken, node_id: u16) {
    let (client, upstream) = match tokio::join!(client, node) {
        (Ok(c), Ok(n)) => (c, n),
        (c, n) => {
            tracing::debug!(
                client_ok = c.is_ok(),
                node_ok = n.is_ok(),
                "upgrade did not complete on both sides"
            );
            return;
        }
    };
    let _live = SpliceGuard::open();
    let (mut client_rx, mut client_tx) = tokio::io::split(Counted::new(TokioIo::new(client)));
    let (mut node_rx, mut node_tx) = tokio::io::split(TokioIo::new(upstream));
    // Each direction is copied on its own and ends with a FIN after its last byte, so the
    // owner's close frame is relayed even when the other direction has failed (an owner
    // that closes on a client still sending, say after 1009, resets that direction).
    let ended = async {
        let down = async {
            let r = tokio::io::copy(&mut node_rx, &mut client_tx).await;
            let _ = client_tx.shutdown().await;
            r
        };
        let up = async {
            let r = tokio::io::copy(&mut client_rx, &mut node_tx).await;
            let _ = node_tx.shutdown().await;
            r
        };
        tokio::pin!(down, up);
        tokio::select! {
            r = &mut down => ("node", r),
            r = &mut up => {
                // The client is done, or the owner takes no more: its last bytes still pass.
                match tokio::time::timeout(LINGER, &mut down).await {
                    Ok(Err(e)) => ("client", Err(e)),
                    _ => ("client", r),
                }
            }
        }
    };
    tokio::select! {
        (side, r) = ended => match r {
            Ok(_) => tracing::debug!(node = node_id, side, "websocket splice ended"),
            // A peer that vanished without a close: routine for mobile clients.
            Err(e) => tracing::debug!(node = node_id, side, error = %e, "websocket splice ended with an error"),
        },
        _ = cut.cancelled() => {
            tracing::debug!(node = node_id, "websocket splice cut at shutdown");
            return;
        }
    }
    // The client has our FIN after the owner's last bytes. Closing now, with its bytes unread,
    // would reset the connection and could discard that tail before it is sent; read what it
    // still sends (its close answer) until it closes too, for a bounded time.
    let mut discard = tokio::io::sink();
    tokio::select! {
        _ = tokio::time::timeout(LINGER, tokio::io::copy(&mut client_rx, &mut discard)) => {}
        _ = cut.cancelled() => {}
    }
}

/// The client's side of a splice, counting bytes as they pass: what is read from it goes
/// to the node, what is written to it came from the node. Counted as they flow so a
/// long-lived connection shows up in the metrics before it closes.
struct Counted<T> {
    inner: T,
    to_node: metrics::Counter,
    to_client: metrics::Counter,
}

impl<T> Counted<T> {
    fn new(inner: T) -> Counted<T> {
        Counted {
            inner,
            to_node: metrics::counter!(m::ROUTER_PROXIED_BYTES, "direction" => "client_to_node"),
            to_client: metrics::counter!(m::ROUTER_PROXIED_BYTES, "direction" => "node_to_client"),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.to_node.increment((buf.filled().len() - before) as u64);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.to_client.increment(n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Forwards one room API request to `node` over the pool and relays its answer.
pub async fn http(
    req: Request<Incoming>,
    upstream: &Upstream,
    peer: SocketAddr,
    node: &NodeInfo,
) -> Response<Body> {
    let config = &upstream.config;
    let (parts, body) = req.into_parts();
    let max = config.max_body_bytes;
    let body = match Limited::new(body, max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return error(
                ErrorCode::FrameTooLarge,
                &format!("body is larger than {max} bytes"),
            );
        }
        // The client went away or sent a broken body; it will not read this answer.
        Err(e) => return error(ErrorCode::BadJson, &format!("could not read body: {e}")),
    };
    let uri = match format!("http://{}{}", node.addr, path_and_query(&parts)).parse::<Uri>() {
        Ok(u) => u,
        Err(e) => return UpstreamError::Connect.answer(node, &e),
    };
    let mut upstream_req = Request::new(Full::new(body));
    *upstream_req.method_mut() = parts.method.clone();
    *upstream_req.uri_mut() = uri;
    *upstream_req.headers_mut() = forward_headers(&parts, node, peer, false);

    let exchange = async {
        let resp = upstream
            .client
            .request(upstream_req)
            .await
            .map_err(|e| (classify(&e), e.to_string()))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_UPSTREAM_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| (UpstreamError::Protocol, e.to_string()))?;
        Ok::<_, (UpstreamError, String)>((parts, body.to_bytes()))
    };
    match tokio::time::timeout(config.upstream_timeout, exchange).await {
        Ok(Ok((parts, body))) => relay(parts, body),
        Ok(Err((kind, detail))) => kind.answer(node, &detail),
        Err(_) => UpstreamError::Timeout.answer(node, &"no answer in time"),
    }
}

/// Sorts a pooled client's failure: connection trouble (a timeout among it) or a broken
/// answer.
fn classify(e: &hyper_util::client::legacy::Error) -> UpstreamError {
    if !e.is_connect() {
        return UpstreamError::Protocol;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        {
            return UpstreamError::Timeout;
        }
        source = s.source();
    }
    UpstreamError::Connect
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().method("GET").uri("/ws?room=r&since=5");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn node() -> NodeInfo {
        NodeInfo {
            id: 3,
            addr: "10.1.2.3:7001".into(),
            started_at_ms: 0,
            incarnation: 0,
        }
    }

    const PEER: ([u8; 4], u16) = ([192, 0, 2, 7], 50_000);

    #[test]
    fn an_upgrade_keeps_its_handshake_and_credentials() {
        let p = parts(&[
            ("host", "chat.example:7000"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
            ("sec-websocket-protocol", "chat"),
            ("authorization", "Bearer t"),
            ("x-forwarded-for", "198.51.100.1"),
        ]);
        let h = forward_headers(&p, &node(), PEER.into(), true);
        assert_eq!(h["connection"], "Upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(h["sec-websocket-version"], "13");
        assert_eq!(h["sec-websocket-protocol"], "chat");
        assert_eq!(h["authorization"], "Bearer t");
        assert_eq!(h["host"], "10.1.2.3:7001");
        assert_eq!(h["x-forwarded-host"], "chat.example:7000");
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 192.0.2.7");
        assert_eq!(path_and_query(&p), "/ws?room=r&since=5");
    }

    #[test]
    fn a_plain_request_drops_hop_by_hop_headers() {
        let p = parts(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-length", "12"),
            ("te", "trailers"),
            ("x-private", "secret"),
            ("content-type", "application/json"),
        ]);
        let h = forward_headers(&p, &node(), PEER.into(), false);
        for gone in [
            "connection",
            "keep-alive",
            "transfer-encoding",
            "content-length",
            "te",
            "x-private",
        ] {
            assert!(!h.contains_key(gone), "{gone} forwarded");
        }
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
    }

    #[test]
    fn a_refusal_is_relayed_with_status_headers_and_body() {
        let upstream = Response::builder()
            .status(StatusCode::MISDIRECTED_REQUEST)
            .header("content-type", "application/json")
            .header("retry-after", "1")
            .header("connection", "close")
            .header("content-length", "2")
            .body(())
            .expect("response")
            .into_parts()
            .0;
        let r = relay(upstream, Bytes::from_static(b"{}"));
        assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.headers()["retry-after"], "1");
        assert!(!r.headers().contains_key("connection"));
    }
}
