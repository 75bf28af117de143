//! The router's HTTP surface: routing, input checks, the answers it gives itself (owner
//! lookups, redirects, health, metrics) and the JSON error bodies.
//!
//! Every refusal is a JSON body `{"code", "message", "retry"}` with a code from
//! `common::codes`, exactly as the nodes answer, so a client handles a router's refusal and a
//! node's the same way. Requests the owner must answer are handed to [`crate::proxy`]; this
//! module never talks to a node itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use common::{metrics as m, ErrorCode, NodeInfo, RoomId};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::RouterState;

pub use chat_server::http::{error, error_with_status, json, Body, Query};

pub async fn handle(
    req: Request<Incoming>,
    state: Arc<RouterState>,
    peer: SocketAddr,
) -> Response<Body> {
    let started = Instant::now();
    let route = route_label(req.uri().path());
    let resp = route_request(req, &state, peer).await;
    let class = chat_server::http::status_class(resp.status());
    metrics::counter!(m::ROUTER_HTTP_REQUESTS, "route" => route, "status" => class).increment(1);
    metrics::histogram!(m::ROUTER_REQUEST_SECONDS, "route" => route)
        .record(started.elapsed().as_secs_f64());
    resp
}

fn route_label(path: &str) -> &'static str {
    match path {
        "/ws" => "ws",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        "/" | "/demo" => "demo",
        p if p.starts_with("/demo/") => "demo",
        "/v1/dead-letters" => "room_api",
        p if p.starts_with("/v1/users/") => "room_api",
        p if p.starts_with("/v1/rooms/") => {
            if p.ends_with("/messages") {
                "messages"
            } else if p.ends_with("/owner") {
                "owner"
            } else {
                "room_api"
            }
        }
        _ => "other",
    }
}

async fn route_request(
    req: Request<Incoming>,
    state: &Arc<RouterState>,
    peer: SocketAddr,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if let Some(resp) = chat_server::http::own_route(req.method(), &path, || readiness(state)) {
        return resp;
    }
    match (req.method(), path.as_str()) {
        (&Method::GET, "/ws") => websocket(req, state, peer).await,
        (&Method::GET, "/" | "/demo") if state.config.serve_demo.is_some() => {
            crate::demo::redirect()
        }
        (&Method::GET, p) if p.starts_with("/demo/") => match &state.config.serve_demo {
            Some(dir) => crate::demo::file(dir, &p["/demo/".len()..]).await,
            None => error(
                ErrorCode::NotFound,
                "no such route (the demo is off: --serve-demo)",
            ),
        },
        (_, "/ws") => error(
            ErrorCode::MethodNotAllowed,
            "method not allowed on this route",
        ),
        // Not about one room: any live node answers (the ring picks one per path, so the
        // same question goes to the same node while the ring holds).
        (_, p) if p == "/v1/dead-letters" || p.starts_with("/v1/users/") => {
            match state.ring().owner(p).cloned() {
                Some(node) => crate::proxy::http(req, &state.upstream, peer, &node).await,
                None => no_node(),
            }
        }
        (method, p) => {
            let Some((room, rest)) = p.strip_prefix("/v1/rooms/").and_then(|r| r.split_once('/'))
            else {
                return error(ErrorCode::NotFound, "no such route");
            };
            let origin = state.config.allowed_origins.check(req.headers());
            if let Some(why) = origin.refusal() {
                return error(ErrorCode::Forbidden, why);
            }
            let room = match RoomId::new(room) {
                Ok(r) => r,
                Err(e) => return error(ErrorCode::InvalidField, &e.to_string()),
            };
            // Preflights are the router's own to answer: the owner is not asked.
            if method == Method::OPTIONS {
                return origin.preflight();
            }
            let mut resp = if rest == "owner" {
                if method == Method::GET {
                    owner(state, &room)
                } else {
                    error(ErrorCode::MethodNotAllowed, "use GET")
                }
            } else if let Some(node) = owner_of(state, &room) {
                // Everything else under a room (today `/messages`) is the owner's to answer,
                // including its 404s and 405s, so new node routes need no router release.
                crate::proxy::http(req, &state.upstream, peer, &node).await
            } else {
                no_node()
            };
            origin.decorate(resp.headers_mut());
            resp
        }
    }
}

fn owner_of(state: &RouterState, room: &RoomId) -> Option<NodeInfo> {
    state.ring().owner(room.as_str()).cloned()
}

fn no_node() -> Response<Body> {
    error(
        ErrorCode::NodeUnavailable,
        "no live chat node is registered; retry later",
    )
}

async fn websocket(
    req: Request<Incoming>,
    state: &Arc<RouterState>,
    peer: SocketAddr,
) -> Response<Body> {
    let query = Query::parse(req.uri().query());
    let room =
        match chat_server::http::ws_room(&state.config.allowed_origins, req.headers(), &query) {
            Ok(room) => room,
            Err((code, why)) => return error(code, &why),
        };
    if state.is_draining() {
        // A splice opened now would be cut within the grace period: send the client to
        // another router straight away.
        return error(
            ErrorCode::GoingAway,
            "router is shutting down; reconnect through another router",
        );
    }
    let Some(node) = owner_of(state, &room) else {
        return no_node();
    };
    let wants_redirect = matches!(query.get("redirect"), Some("1" | "true"));
    if state.config.redirect || wants_redirect {
        return redirect(&req, &room, &node);
    }
    crate::proxy::websocket(req, &state.upstream, peer, &node).await
}

/// `307` to the owner, same path and query: the client repeats its upgrade there.
fn redirect(req: &Request<Incoming>, room: &RoomId, node: &NodeInfo) -> Response<Body> {
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/ws");
    let location = format!("ws://{}{path_and_query}", node.addr);
    let Ok(value) = HeaderValue::from_str(&location) else {
        return error_with_status(
            StatusCode::BAD_GATEWAY,
            ErrorCode::NodeUnavailable,
            "the owner's registered address is not usable",
        );
    };
    let mut resp = json(
        StatusCode::TEMPORARY_REDIRECT,
        &serde_json::json!({
            "room": room,
            "node": { "id": node.id, "addr": node.addr },
            "location": location,
        }),
    );
    resp.headers_mut().insert(header::LOCATION, value);
    resp
}

fn owner(state: &RouterState, room: &RoomId) -> Response<Body> {
    let ring = state.ring();
    let Some(node) = ring.owner(room.as_str()) else {
        return no_node();
    };
    json(
        StatusCode::OK,
        &serde_json::json!({
            "room": room,
            "node": { "id": node.id, "addr": node.addr },
            // A u64 as a string: JavaScript numbers lose precision past 2^53.
            "ring_version": ring.version().to_string(),
            "ring_size": ring.len(),
        }),
    )
}

fn readiness(state: &RouterState) -> (bool, serde_json::Value) {
    let ring = state.ring();
    let ready = state.is_ready();
    let body = serde_json::json!({
        "ready": ready,
        "ring_size": ring.len(),
        "ring_version": ring.version().to_string(),
        "redis_ok": state.redis_ok(),
        "shutting_down": state.is_draining(),
    });
    (ready, body)
}
