//! The app and operations API beyond messages: a room's lifecycle (end it, give it an
//! expiry, read its state), who is in a room and who is online, and the webhook dead
//! letters (list, replay, delete).
//!
//! Lifecycle changes and room presence go through the room's owner task like sends, so they
//! are ordered with the room's messages; dead letters and user presence are read from the
//! store and Redis by whichever node is asked. Operations (ending, expiry, dead letters)
//! need the admin token. Every refusal is the usual JSON error body (`http::error`).

#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use common::id::now_ms;
use common::{ErrorCode, MessageId, RoomId, UserId};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::cluster::Route;
use crate::refusal::{authenticate, authorize, bad, moved, unavailable};
use crate::room::{RoomCmd, RoomPresence, StateChange};
use crate::state::NodeState;
use crate::store::RoomState;
use chat_server::http::{error, json, Body, Query};

/// Dead letters listed per request by default, and at most.
const DEAD_PAGE: usize = 100;
const DEAD_PAGE_MAX: usize = 1000;
/// Longest expiry accepted: ten years.
const EXPIRY_MAX: Duration = Duration::from_secs(10 * 365 * 86_400);

/// `/v1/rooms/{room}/{rest}` for every `rest` but `messages`.
pub(crate) async fn room(
    req: Request<Incoming>,
    state: &Arc<NodeState>,
    room: RoomId,
    rest: &str,
) -> Response<Body> {
    let method = req.method().clone();
    match (method, rest) {
        (Method::GET, "state") => room_state(req, state, room).await,
        (Method::POST, "end") => match admin(&req, state) {
            Ok(()) => change(state, room, StateChange::End).await,
            Err(resp) => resp,
        },
        (Method::PUT, "expiry") => expiry(req, state, room).await,
        (Method::GET, "presence") => room_presence(req, state, room).await,
        (Method::GET, "dead-letters") => dead_letters(req, state, Some(room)).await,
        (method, rest) => match rest.strip_prefix("dead-letters/") {
            Some(tail) => {
                let (id, action) = tail.split_once('/').unwrap_or((tail, ""));
                let Ok(id) = id.parse::<MessageId>() else {
                    return bad(
                        ErrorCode::InvalidField,
                        "a dead letter is named by its message id (decimal)",
                    );
                };
                match (method, action) {
                    (Method::POST, "replay") => replay(req, state, room, id).await,
                    (Method::DELETE, "") => delete(req, state, room, id).await,
                    (_, "" | "replay") => error(
                        ErrorCode::MethodNotAllowed,
                        "use POST .../replay or DELETE on a dead letter",
                    ),
                    _ => error(ErrorCode::NotFound, "no such route"),
                }
            }
            None => match rest {
                "state" | "end" | "expiry" | "presence" | "dead-letters" => error(
                    ErrorCode::MethodNotAllowed,
                    "see PROTOCOL.md for this route's method",
                ),
                _ => error(ErrorCode::NotFound, "no such route"),
            },
        },
    }
}

/// `GET /v1/dead-letters`: every room's, oldest room first.
pub(crate) async fn all_dead_letters(
    req: Request<Incoming>,
    state: &Arc<NodeState>,
) -> Response<Body> {
    if req.method() != Method::GET {
        return error(ErrorCode::MethodNotAllowed, "use GET");
    }
    dead_letters(req, state, None).await
}

/// `GET /v1/users/{user}/presence`.
pub(crate) async fn user_presence(
    req: Request<Incoming>,
    state: &Arc<NodeState>,
    user: &str,
) -> Response<Body> {
    if req.method() != Method::GET {
        return error(ErrorCode::MethodNotAllowed, "use GET");
    }
    let query = Query::parse(req.uri().query());
    if let Err(resp) = authenticate(&req, &query, &state.auth) {
        return resp;
    }
    let user = match UserId::new(user) {
        Ok(u) => u,
        Err(e) => return bad(ErrorCode::InvalidField, &e.to_string()),
    };
    match state.presence.lookup(&user).await {
        Ok(status) => json(StatusCode::OK, &status),
        Err(why) => error(ErrorCode::NodeUnavailable, &why),
    }
}

/// The operations API's check: `Authorization: Bearer <--admin-token>`; open only under
/// `--insecure-dev-auth` without a token configured.
fn admin<B>(req: &Request<B>, state: &NodeState) -> Result<(), Response<Body>> {
    let given = crate::auth::bearer(req.headers().get(header::AUTHORIZATION));
    match (&state.config.admin_token, given) {
        (Some(want), Some(given)) if constant_time_eq(want.as_bytes(), given.as_bytes()) => Ok(()),
        (Some(_), _) => Err(bad(
            ErrorCode::Unauthorized,
            "this operation needs Authorization: Bearer <admin token>",
        )),
        (None, _) if state.config.insecure_dev_auth => Ok(()),
        (None, _) => Err(bad(
            ErrorCode::Forbidden,
            "the operations API is off: start the node with --admin-token",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A client's token (or dev user) that allows `room`.
fn client_of<B>(req: &Request<B>, state: &NodeState, room: &RoomId) -> Result<(), Response<Body>> {
    let query = Query::parse(req.uri().query());
    authorize(req, &query, &state.auth, room).map(drop)
}

/// A store call bounded by `--store-timeout`; a failure is the 503 answer.
async fn stored<T>(
    state: &NodeState,
    call: crate::store::BoxFuture<'_, Result<T, crate::store::StoreError>>,
) -> Result<T, Response<Body>> {
    match tokio::time::timeout(state.config.store_timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error(ErrorCode::StoreUnavailable, &e.to_string())),
        Err(_) => Err(error(ErrorCode::StoreUnavailable, "the store timed out")),
    }
}

/// This node must own the room to answer for it.
fn owned(state: &NodeState, room: &RoomId) -> Result<(), Response<Body>> {
    match state.cluster.route(room) {
        Route::Local => Ok(()),
        Route::Elsewhere(owner) => Err(moved(&owner)),
        Route::Unavailable => Err(unavailable()),
    }
}

fn state_body(room: &RoomId, s: &RoomState) -> serde_json::Value {
    let ended = s.is_ended_at(now_ms());
    serde_json::json!({
        "room": room,
        "state": if ended { "ended" } else { "active" },
        "ended_at": if ended { s.end() } else { None },
        "expires_at": s.expires_at,
    })
}

async fn room_state(
    req: Request<Incoming>,
    state: &Arc<NodeState>,
    room: RoomId,
) -> Response<Body> {
    if let Err(resp) = client_of(&req, state, &room) {
        return resp;
    }
    match stored(state, state.registry.ctx().store.room_state(&room)).await {
        Ok(s) => json(StatusCode::OK, &state_body(&room, &s)),
        Err(resp) => resp,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpiryBody {
    /// Unix ms; `null` clears the expiry.
    #[serde(default, deserialize_with = "present")]
    expires_at: Option<Option<u64>>,
    /// Milliseconds from now.
    #[serde(default)]
    ttl_ms: Option<u64>,
}

/// A field that is present, even as `null` (which plain `Option<Option<_>>` reads as absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

async fn expiry(req: Request<Incoming>, state: &Arc<NodeState>, room: RoomId) -> Response<Body> {
    if let Err(resp) = admin(&req, state) {
        return resp;
    }
    let bytes = match Limited::new(req.into_body(), 4096).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return bad(ErrorCode::FrameTooLarge, "body is larger than 4096 bytes"),
    };
    let parsed: ExpiryBody = match serde_json::from_slice(&bytes) {
        Ok(p) => p,
        Err(e) => {
            return bad(
                ErrorCode::BadJson,
                &format!("expected {{\"ttl_ms\": N}} or {{\"expires_at\": unix_ms | null}}: {e}"),
            )
        }
    };
    let now = now_ms();
    let change = match (parsed.expires_at, parsed.ttl_ms) {
        (Some(None), None) => StateChange::KeepForever,
        (Some(Some(at)), None) => match at.checked_sub(now) {
            Some(left) if Duration::from_millis(left) <= EXPIRY_MAX => StateChange::ExpireAt {
                at,
                within: Duration::from_millis(left),
            },
            Some(_) => {
                return bad(
                    ErrorCode::InvalidField,
                    "expires_at is more than ten years away",
                )
            }
            None => {
                return bad(
                    ErrorCode::InvalidField,
                    "expires_at is in the past: end the room instead",
                )
            }
        },
        (None, Some(ttl)) if ttl > 0 && Duration::from_millis(ttl) <= EXPIRY_MAX => {
            StateChange::ExpireAt {
                at: now + ttl,
                within: Duration::from_millis(ttl),
            }
        }
        (None, Some(_)) => return bad(ErrorCode::InvalidField, "ttl_ms must be 1 ms to ten years"),
        _ => {
            return bad(
                ErrorCode::InvalidField,
                "give exactly one of ttl_ms and expires_at",
            )
        }
    };
    self::change(state, room, change).await
}

/// Applies a lifecycle change through the room's owner task.
async fn change(state: &Arc<NodeState>, room: RoomId, change: StateChange) -> Response<Body> {
    if let Err(resp) = owned(state, &room) {
        return resp;
    }
    if state.is_shutting_down() {
        return error(ErrorCode::GoingAway, "node is shutting down; retry");
    }
    let (reply, answer) = oneshot::channel();
    let cmd = RoomCmd::SetState { change, reply };
    if state.registry.try_dispatch(&room, cmd).is_err() {
        return error(ErrorCode::Overloaded, "room is overloaded; retry later");
    }
    let wait = state.config.room_acquire_timeout + state.config.store_timeout * 2;
    match tokio::time::timeout(wait, answer).await {
        Ok(Ok(Ok(s))) => json(StatusCode::OK, &state_body(&room, &s)),
        Ok(Ok(Err(ErrorCode::RoomEnded))) => error(
            ErrorCode::RoomEnded,
            "the room has ended; an ended room's expiry cannot change",
        ),
        Ok(Ok(Err(code))) => error(code, "the change was not saved; retry"),
        Ok(Err(_)) => error(ErrorCode::Internal, "the room dropped the request; retry"),
        Err(_) => error(
            ErrorCode::StoreUnavailable,
            "no answer from the store in time; retry",
        ),
    }
}

async fn room_presence(
    req: Request<Incoming>,
    state: &Arc<NodeState>,
    room: RoomId,
) -> Response<Body> {
    if let Err(resp) = client_of(&req, state, &room) {
        return resp;
    }
    if let Err(resp) = owned(state, &room) {
        return resp;
    }
    // A room with no task here has nobody connected: it is not started to say so.
    let (reply, answer) = oneshot::channel();
    state
        .registry
        .dispatch_existing(&room, RoomCmd::Presence { reply })
        .await;
    let presence = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let RoomPresence { members, users } = presence;
    json(
        StatusCode::OK,
        &serde_json::json!({ "room": room, "members": members, "users": users }),
    )
}

async fn dead_letters(
    req: Request<Incoming>,
    state: &Arc<NodeState>,
    room: Option<RoomId>,
) -> Response<Body> {
    if let Err(resp) = admin(&req, state) {
        return resp;
    }
    let query = Query::parse(req.uri().query());
    let limit = match query.get("limit").map(str::parse::<usize>) {
        None => DEAD_PAGE,
        Some(Ok(n)) if (1..=DEAD_PAGE_MAX).contains(&n) => n,
        Some(_) => {
            return bad(
                ErrorCode::InvalidField,
                &format!("limit must be 1..={DEAD_PAGE_MAX}"),
            )
        }
    };
    let store = &state.registry.ctx().store;
    match stored(state, store.dead_letters(room.as_ref(), limit)).await {
        Ok(letters) => json(
            StatusCode::OK,
            &serde_json::json!({ "dead_letters": letters }),
        ),
        Err(resp) => resp,
    }
}

/// One more attempt at a dead letter, now; on success it leaves the table.
async fn replay(
    req: Request<Incoming>,
    state: &Arc<NodeState>,
    room: RoomId,
    id: MessageId,
) -> Response<Body> {
    if let Err(resp) = admin(&req, state) {
        return resp;
    }
    let ctx = state.registry.ctx();
    let Some(hooks) = &ctx.hooks else {
        return bad(
            ErrorCode::NotFound,
            "webhooks are off on this node (--webhook-url)",
        );
    };
    let found = match stored(state, ctx.store.dead_letter(&room, id)).await {
        Ok(found) => found,
        Err(resp) => return resp,
    };
    let Some(dead) = found else {
        return error(ErrorCode::NotFound, "no such dead letter");
    };
    if let Err(failed) = hooks.attempt(&dead.message, &[], dead.attempts + 1).await {
        return error(
            ErrorCode::WebhookFailed,
            &format!(
                "the endpoint did not take it: {}; it stays a dead letter",
                failed.message
            ),
        );
    }
    metrics::counter!(common::metrics::WEBHOOK_DELIVERED).increment(1);
    match stored(state, ctx.store.delete_dead_letter(&room, id)).await {
        Ok(_) => json(
            StatusCode::OK,
            &serde_json::json!({ "room": room, "id": id, "delivered": true }),
        ),
        Err(_) => error(
            ErrorCode::StoreUnavailable,
            "delivered, but removing the dead letter failed; delete it by hand",
        ),
    }
}

async fn delete(
    req: Request<Incoming>,
    state: &Arc<NodeState>,
    room: RoomId,
    id: MessageId,
) -> Response<Body> {
    if let Err(resp) = admin(&req, state) {
        return resp;
    }
    let store = &state.registry.ctx().store;
    match stored(state, store.delete_dead_letter(&room, id)).await {
        Ok(true) => json(
            StatusCode::OK,
            &serde_json::json!({ "room": room, "id": id, "deleted": true }),
        ),
        Ok(false) => error(ErrorCode::NotFound, "no such dead letter"),
        Err(resp) => resp,
    }
}
