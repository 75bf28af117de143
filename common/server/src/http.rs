//! The HTTP plumbing both servers share: JSON answers and the error body every refusal
//! carries, the query string, the routes every server answers itself (`/healthz`,
//! `/readyz`, `/metrics`), and the accept loop with its graceful stop.
//!
//! Every refusal is a JSON body `{"code", "message", "retry"}` with the status from the
//! code table in `common::codes`, so a client handles a router's refusal and a node's the
//! same way.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::{ErrorCode, RoomId};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::head::{self, FirstHead, Prefixed};
use crate::origin::OriginPolicy;

pub type Body = Full<Bytes>;

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: ErrorCode,
    message: &'a str,
    retry: common::Retry,
}

pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .unwrap_or_else(|_| Response::new(Full::default()))
}

/// An error answer with the code's own status.
pub fn error(code: ErrorCode, message: &str) -> Response<Body> {
    let status =
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error_with_status(status, code, message)
}

/// An error answer with an explicit status (a router's `node_unavailable` is 503 when no
/// node is known but 502 when the owner did not answer). Statuses a client should retry
/// carry `Retry-After: 1`.
pub fn error_with_status(status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    let mut resp = json(
        status,
        &ErrorBody {
            code,
            message,
            retry: code.retry(),
        },
    );
    if matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
    ) {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// A response's status class, the `status` label of the request counters (a WebSocket
/// upgrade's 101 is `1xx`).
pub fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The routes every server answers itself, and how: `/readyz` from `readiness`, which
/// gives the verdict and the body. `None` for any other path.
pub fn own_route(
    method: &Method,
    path: &str,
    readiness: impl FnOnce() -> (bool, serde_json::Value),
) -> Option<Response<Body>> {
    if !matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return None;
    }
    if method != Method::GET {
        return Some(error(
            ErrorCode::MethodNotAllowed,
            "method not allowed on this route",
        ));
    }
    Some(match path {
        "/healthz" => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        "/readyz" => {
            let (ready, body) = readiness();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, &body)
        }
        _ => Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(crate::telemetry::render())))
            .unwrap_or_else(|_| Response::new(Full::default())),
    })
}

/// The first checks of a `/ws` upgrade, the same on a node and a router: the `Origin`
/// allow-list (browsers send it on every upgrade: a page from elsewhere is refused before
/// anything else is looked at), then the `room` query parameter. The refusal otherwise.
pub fn ws_room(
    origins: &OriginPolicy,
    headers: &http::HeaderMap,
    query: &Query<'_>,
) -> Result<RoomId, (ErrorCode, String)> {
    if let Some(why) = origins.check(headers).refusal() {
        return Err((ErrorCode::Forbidden, why.to_owned()));
    }
    match query.get("room").map(RoomId::new) {
        None => Err((
            ErrorCode::InvalidField,
            "missing room query parameter: /ws?room=R".to_owned(),
        )),
        Some(Err(e)) => Err((ErrorCode::InvalidField, e.to_string())),
        Some(Ok(room)) => Ok(room),
    }
}

/// The parts of a query string the servers read. Values are used as-is: every accepted
/// value (ids, tokens) is from a URL-safe alphabet, so percent-encoded input is simply
/// invalid.
#[derive(Default)]
pub struct Query<'a> {
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Query<'a> {
    pub fn parse(q: Option<&'a str>) -> Self {
        let pairs = q
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
            .collect();
        Query { pairs }
    }

    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

/// The accept loop of a listener, serving HTTP/1 (with upgrades) through `handler`.
pub struct Acceptor {
    task: JoinHandle<()>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Acceptor {
    /// Accepts on `listener` until [`Acceptor::stop`]. Each connection's first request is
    /// checked before hyper reads it (`head`); a refused one gets its answer written and
    /// `refused` is called.
    pub fn start<H, F>(listener: TcpListener, refused: fn(), handler: H) -> Acceptor
    where
        H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let task = tokio::spawn(accept_loop(
            listener,
            stop.clone(),
            tracker.clone(),
            refused,
            handler,
        ));
        Acceptor {
            task,
            stop,
            tracker,
        }
    }

    /// Stops accepting, lets each connection finish the request in flight (keep-alive
    /// off), and waits for them until `deadline`. Whether they all finished.
    pub async fn stop(self, deadline: Instant) -> bool {
        self.stop.cancel();
        let _ = self.task.await;
        self.tracker.close();
        tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}

async fn accept_loop<H, F>(
    listener: TcpListener,
    stop: CancellationToken,
    tracker: TaskTracker,
    refused: fn(),
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(serve_connection(
            stream,
            peer,
            stop.clone(),
            refused,
            handler.clone(),
        ));
    }
}

async fn serve_connection<H, F>(
    mut stream: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
    refused: fn(),
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let head = match head::read_first(&mut stream).await {
        FirstHead::Ok(head) => head,
        FirstHead::Refused(answer) => {
            refused();
            let _ = stream.write_all(&answer).await;
            let _ = stream.shutdown().await;
            return;
        }
        FirstHead::Gone => return,
    };
    let svc = service_fn(move |req| {
        let answer = handler(req, peer);
        async move { Ok::<_, Infallible>(answer.await) }
    });
    let conn = http1::Builder::new()
        .max_buf_size(head::MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(Prefixed::new(head, stream)), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, %peer, "http connection ended with an error");
            }
        }
        _ = stop.cancelled() => {
            // Finish the request in flight, then close (keep-alive off).
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
