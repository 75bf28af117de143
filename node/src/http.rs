//! HTTP on the node's listener: routing, the WebSocket upgrade's checks, health, metrics and
//! the history and publish API.
//!
//! Every refusal is a JSON body `{"code", "message", "retry"}` with the status from the code
//! table in `common::codes`. Nothing here holds room state; publishes go through the room's
//! owner task like WebSocket sends, so ordering, acks and dedupe are the same.

// Handlers return a ready `Response` as their early-exit error: boxing it only to shrink
// the `Err` variant would add noise on every path for no gain on this cold code.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use common::{metrics as m, ChatMessage, ClientMsgId, ErrorCode, MessageId, RoomId};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::cluster::Route;
use crate::connection::{self, ConnGuard, Session};
use crate::refusal::{authorize, bad, moved, unavailable};
use crate::room::{Reply, RoomCmd, Source};
use crate::state::NodeState;
use crate::store::{HistoryQuery, PageFrom};

use chat_server::http::ws_room;
pub use chat_server::http::{error, json, Body, Query};

const MAX_HISTORY_PAGE: usize = 1000;
const DEFAULT_HISTORY_PAGE: usize = 50;

pub async fn handle(req: Request<Incoming>, state: Arc<NodeState>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let route = route_label(&path);
    // At info, so the default filter keeps it (see the connection's and the room's spans).
    let span =
        tracing::info_span!("http", node = state.config.node_id, route, method = %req.method());
    let resp = route_request(req, &state, &path).instrument(span).await;
    let class = chat_server::http::status_class(resp.status());
    metrics::counter!(m::HTTP_REQUESTS, "route" => route, "status" => class).increment(1);
    resp
}

fn route_label(path: &str) -> &'static str {
    match path {
        "/ws" => "ws",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        p if p.starts_with("/v1/rooms/") && p.ends_with("/messages") => "messages",
        p if p.starts_with("/v1/rooms/") => "room_api",
        p if p.starts_with("/v1/users/") => "presence",
        "/v1/dead-letters" => "room_api",
        _ => "other",
    }
}

async fn route_request(
    req: Request<Incoming>,
    state: &Arc<NodeState>,
    path: &str,
) -> Response<Body> {
    if let Some(resp) = chat_server::http::own_route(req.method(), path, || readiness(state)) {
        return resp;
    }
    match (req.method(), path) {
        (&Method::GET, "/ws") => upgrade(req, state),
        (_, "/ws") => error(
            ErrorCode::MethodNotAllowed,
            "method not allowed on this route",
        ),
        (_, "/v1/dead-letters") => crate::api::all_dead_letters(req, state).await,
        (_, p) if p.starts_with("/v1/users/") => {
            match p["/v1/users/".len()..].strip_suffix("/presence") {
                Some(user) => {
                    let user = user.to_owned();
                    crate::api::user_presence(req, state, &user).await
                }
                None => error(ErrorCode::NotFound, "no such route"),
            }
        }
        (method, p) => match p
            .strip_prefix("/v1/rooms/")
            .and_then(|rest| rest.split_once('/'))
        {
            Some((room, rest)) => {
                let origin = state.config.allowed_origins.check(req.headers());
                if let Some(why) = origin.refusal() {
                    return bad(ErrorCode::Forbidden, why);
                }
                let room = match RoomId::new(room) {
                    Ok(r) => r,
                    Err(e) => return bad(ErrorCode::InvalidField, &e.to_string()),
                };
                if *method == Method::OPTIONS {
                    return origin.preflight();
                }
                let mut resp = match (method, rest) {
                    (&Method::GET, "messages") => history(req, state, room).await,
                    (&Method::POST, "messages") => publish(req, state, room).await,
                    (_, "messages") => error(ErrorCode::MethodNotAllowed, "use GET or POST"),
                    (_, rest) => {
                        let rest = rest.to_owned();
                        crate::api::room(req, state, room, &rest).await
                    }
                };
                origin.decorate(resp.headers_mut());
                resp
            }
            None => error(ErrorCode::NotFound, "no such route"),
        },
    }
}

fn readiness(state: &NodeState) -> (bool, serde_json::Value) {
    let ctx = state.registry.ctx();
    let ready = crate::state::is_ready(ctx, &state.cluster);
    let ring = state.cluster.ring().current();
    let body = serde_json::json!({
        "ready": ready,
        "store": { "kind": ctx.store.name(), "ok": ctx.store_healthy() },
        "cluster": {
            "node": state.cluster.me().id,
            "in_ring": state.cluster.in_ring(),
            "ring_size": ring.len(),
            "ring_version": ring.version().to_string(),
            "membership_ok": state.cluster.membership_ok(),
            "lease": {
                "held": state.cluster.has_lease(),
                "incarnation": state.cluster.lease().incarnation(),
                "remaining_ms": lease_remaining_ms(state.cluster.lease()),
            },
            "settled": state.cluster.settled(),
        },
        // The bus carries only cross-shard traffic: local rooms keep working without it, so
        // it is reported here but does not make the node unready.
        "bus": state.bus.get().map(|b| serde_json::json!({ "ok": b.bus().is_up() })),
        "shutting_down": state.is_shutting_down(),
    });
    (ready, body)
}

fn lease_remaining_ms(lease: &chat_server::membership::Lease) -> Option<u64> {
    let left = lease.remaining_at(tokio::time::Instant::now());
    (left != Duration::MAX).then_some(left.as_millis() as u64)
}

/// 426 `invalid_field`, with the header that says what to upgrade to.
fn upgrade_required(
    message: &str,
    name: header::HeaderName,
    value: &'static str,
) -> Response<Body> {
    let mut resp = bad(ErrorCode::InvalidField, message);
    *resp.status_mut() = StatusCode::UPGRADE_REQUIRED;
    resp.headers_mut()
        .insert(name, header::HeaderValue::from_static(value));
    resp
}

fn upgrade(mut req: Request<Incoming>, state: &Arc<NodeState>) -> Response<Body> {
    let query = Query::parse(req.uri().query());
    let room = match ws_room(&state.config.allowed_origins, req.headers(), &query) {
        Ok(room) => room,
        Err((code, why)) => return bad(code, &why),
    };
    let since = match query.get("since").map(str::parse::<MessageId>) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            return bad(
                ErrorCode::InvalidField,
                "since must be a message id (decimal)",
            )
        }
    };
    let principal = match authorize(&req, &query, &state.auth, &room) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    if state.is_shutting_down() {
        return error(ErrorCode::GoingAway, "node is shutting down; reconnect");
    }
    match state.cluster.route(&room) {
        Route::Local => {}
        Route::Elsewhere(owner) => return moved(&owner),
        Route::Unavailable => return unavailable(),
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        // Everything else about the request would have been accepted: 426 says so, which
        // is how a client that repeats a failed upgrade as a plain GET (a browser cannot
        // read the refusal of a WebSocket) tells "refused" from "the connection failed".
        return upgrade_required(
            "expected a WebSocket upgrade request",
            header::UPGRADE,
            "websocket",
        );
    }
    // RFC 6455 4.2.2: another version is answered 426 naming the one spoken here.
    let version = req.headers().get(header::SEC_WEBSOCKET_VERSION);
    if version.is_some_and(|v| v.as_bytes() != b"13") {
        return upgrade_required(
            "unsupported WebSocket version; this server speaks version 13 (RFC 6455)",
            header::SEC_WEBSOCKET_VERSION,
            "13",
        );
    }
    let Some(guard) = ConnGuard::acquire(state) else {
        return error(
            ErrorCode::Overloaded,
            "connection limit reached; retry later",
        );
    };
    let (resp, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => {
            return bad(
                ErrorCode::InvalidField,
                &format!("bad upgrade request: {e}"),
            )
        }
    };
    let session = Session {
        principal,
        room,
        since,
    };
    state
        .conn_tracker
        .spawn(connection::serve(fut, state.clone(), session, guard));
    let (parts, _) = resp.into_parts();
    Response::from_parts(parts, Full::default())
}

#[derive(Serialize)]
struct HistoryPage {
    room: RoomId,
    messages: Vec<ChatMessage>,
    /// True when the page was cut at `limit`: more messages lie beyond it.
    has_more: bool,
}

async fn history(req: Request<Incoming>, state: &NodeState, room: RoomId) -> Response<Body> {
    let query = Query::parse(req.uri().query());
    if let Err(resp) = authorize(&req, &query, &state.auth, &room) {
        return resp;
    }
    if let Some(owner) = state.cluster.owner_elsewhere(&room) {
        return moved(&owner);
    }
    let id = |k: &str| -> Result<Option<MessageId>, Response<Body>> {
        match query.get(k).map(str::parse::<MessageId>) {
            None => Ok(None),
            Some(Ok(id)) => Ok(Some(id)),
            Some(Err(_)) => Err(bad(
                ErrorCode::InvalidField,
                &format!("{k} must be a message id (decimal)"),
            )),
        }
    };
    let (after, before) = match (id("after"), id("before")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let limit = match query.get("limit").map(str::parse::<usize>) {
        None => DEFAULT_HISTORY_PAGE,
        Some(Ok(n)) if (1..=MAX_HISTORY_PAGE).contains(&n) => n,
        Some(_) => {
            return bad(
                ErrorCode::InvalidField,
                &format!("limit must be 1..={MAX_HISTORY_PAGE}"),
            )
        }
    };
    // With only `after`, page forward from it; otherwise page back from `before` (or now).
    let from = if after.is_some() && before.is_none() {
        PageFrom::Oldest
    } else {
        PageFrom::Newest
    };
    let q = HistoryQuery {
        after,
        before,
        limit: limit + 1,
        from,
    };
    let ctx = state.registry.ctx();
    let mut messages =
        match tokio::time::timeout(ctx.config.store_timeout, ctx.store.read(&room, q)).await {
            Ok(Ok(msgs)) => msgs,
            Ok(Err(e)) => {
                metrics::counter!(m::STORE_ERRORS, "op" => "read").increment(1);
                return error(ErrorCode::StoreUnavailable, &e.to_string());
            }
            Err(_) => {
                metrics::counter!(m::STORE_ERRORS, "op" => "read").increment(1);
                return error(ErrorCode::StoreUnavailable, "store read timed out");
            }
        };
    let has_more = messages.len() > limit;
    if has_more {
        match from {
            PageFrom::Oldest => {
                messages.truncate(limit);
            }
            PageFrom::Newest => {
                messages.remove(0);
            }
        }
    }
    json(
        StatusCode::OK,
        &HistoryPage {
            room,
            messages,
            has_more,
        },
    )
}

#[derive(Deserialize)]
struct PublishBody {
    cid: String,
    body: String,
}

#[derive(Serialize)]
struct Published {
    room: RoomId,
    id: MessageId,
    cid: ClientMsgId,
    duplicate: bool,
}

fn published(room: RoomId, cid: ClientMsgId, accepted: crate::room::Accepted) -> Response<Body> {
    let status = if accepted.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    json(
        status,
        &Published {
            room,
            id: accepted.id,
            cid,
            duplicate: accepted.duplicate,
        },
    )
}

async fn publish(req: Request<Incoming>, state: &Arc<NodeState>, room: RoomId) -> Response<Body> {
    let query = Query::parse(req.uri().query());
    let principal = match authorize(&req, &query, &state.auth, &room) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    if state.is_shutting_down() {
        return error(
            ErrorCode::GoingAway,
            "node is shutting down; retry with the same cid",
        );
    }
    let owner_elsewhere = match state.cluster.route(&room) {
        Route::Local => None,
        Route::Elsewhere(owner) => Some(owner),
        Route::Unavailable => return unavailable(),
    };
    if let (Some(owner), None) = (&owner_elsewhere, state.bus.get()) {
        return moved(owner);
    }
    let max = state.config.max_frame_bytes;
    let bytes = match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return bad(
                ErrorCode::FrameTooLarge,
                &format!("body is larger than {max} bytes"),
            );
        }
        Err(e) => return bad(ErrorCode::BadJson, &format!("could not read body: {e}")),
    };
    let parsed: PublishBody = match serde_json::from_slice(&bytes) {
        Ok(p) => p,
        Err(e) => {
            return bad(
                ErrorCode::BadJson,
                &format!("expected {{\"cid\", \"body\"}}: {e}"),
            )
        }
    };
    let cid = match ClientMsgId::new(parsed.cid) {
        Ok(c) => c,
        Err(e) => return bad(ErrorCode::InvalidField, &e.to_string()),
    };
    tracing::debug!(%room, %cid, user = %principal.user, "publish received");
    if parsed.body.len() > state.config.max_body_bytes {
        return bad(
            ErrorCode::BodyTooLong,
            &format!(
                "body is {} bytes; the limit is {}",
                parsed.body.len(),
                state.config.max_body_bytes
            ),
        );
    }
    // A room owned elsewhere: forward through the bus and answer with the owner's reply.
    if let (Some(owner), Some(bus)) = (owner_elsewhere, state.bus.get()) {
        let wait = state.config.store_timeout * 2 + Duration::from_secs(1);
        let result = bus
            .bus()
            .forward_send(
                owner.id,
                room.clone(),
                principal.user,
                cid.clone(),
                parsed.body,
                wait,
            )
            .await;
        return match result {
            Ok(accepted) => published(room, cid, accepted),
            Err(ErrorCode::RoomMoved) => error(
                ErrorCode::RoomMoved,
                "the room is moving; retry with the same cid",
            ),
            Err(ErrorCode::NodeUnavailable) => error(
                ErrorCode::NodeUnavailable,
                "the room's owner did not answer through the bus; retry with the same cid",
            ),
            Err(code) => error(code, "the message was not stored; retry with the same cid"),
        };
    }
    let (tx, rx) = oneshot::channel();
    let cmd = RoomCmd::Send {
        from: principal.user,
        cid: cid.clone(),
        body: parsed.body,
        reply: Reply::Http(tx),
        source: Source::Http,
    };
    if state.registry.try_dispatch(&room, cmd).is_err() {
        return error(
            ErrorCode::Overloaded,
            "room is overloaded; retry later with the same cid",
        );
    }
    // The room answers within one store timeout per attempt; allow for a queue ahead of us.
    let wait = state.config.store_timeout * 2 + Duration::from_secs(1);
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(Ok(accepted))) => published(room, cid, accepted),
        Ok(Ok(Err(ErrorCode::RoomMoved))) => match state.cluster.owner_elsewhere(&room) {
            Some(owner) => moved(&owner),
            None => error(
                ErrorCode::RoomMoved,
                "the room is moving; retry with the same cid",
            ),
        },
        Ok(Ok(Err(ErrorCode::RoomEnded))) => error(
            ErrorCode::RoomEnded,
            "the room has ended: it takes no more messages (its history stays readable)",
        ),
        Ok(Ok(Err(code))) => error(code, "the message was not stored; retry with the same cid"),
        Ok(Err(_)) => error(
            ErrorCode::Internal,
            "the room dropped the request; retry with the same cid",
        ),
        Err(_) => error(
            ErrorCode::StoreUnavailable,
            "no answer from the store in time; retry with the same cid",
        ),
    }
}
