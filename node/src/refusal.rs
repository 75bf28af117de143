//! The node's refusals over HTTP that more than one route gives: bad input (counted), a
//! room owned elsewhere (421 with the owner), a room this node cannot serve right now (503),
//! and a request without valid credentials (401).

// Handlers return a ready `Response` as their early-exit error (as in `http.rs`).
#![allow(clippy::result_large_err)]

use common::{metrics as m, ErrorCode, RoomId};
use http::{header, Request, Response, StatusCode};

use crate::auth::{bearer, Authenticator, Principal};
use chat_server::http::{error, json, Body, Query};

pub(crate) fn bad(code: ErrorCode, message: &str) -> Response<Body> {
    metrics::counter!(m::BAD_INPUT, "kind" => code.as_str()).increment(1);
    error(code, message)
}

/// 503 `room_unavailable` with `Retry-After`: this node owns the room in its ring but holds
/// no lease (it is fenced until it registers again), or the ring is empty.
pub(crate) fn unavailable() -> Response<Body> {
    let code = ErrorCode::RoomUnavailable;
    let mut resp = json(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({
            "code": code,
            "message": "this node holds no lease for the room right now; retry shortly with the same cid",
            "retry": code.retry(),
        }),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    resp
}

/// 421 `room_moved` with the owner's address, for requests that reached a non-owner.
pub(crate) fn moved(owner: &common::NodeInfo) -> Response<Body> {
    let code = ErrorCode::RoomMoved;
    json(
        StatusCode::MISDIRECTED_REQUEST,
        &serde_json::json!({
            "code": code,
            "message": "this node does not own the room; connect through the router",
            "retry": code.retry(),
            "owner": owner.addr,
        }),
    )
}

/// The request's principal: a `token` in the query or a bearer token, or the dev `user`;
/// 401 without valid credentials.
pub(crate) fn authenticate<B>(
    req: &Request<B>,
    query: &Query<'_>,
    auth: &Authenticator,
) -> Result<Principal, Response<Body>> {
    let token = query
        .get("token")
        .or_else(|| bearer(req.headers().get(header::AUTHORIZATION)));
    auth.authenticate(token, query.get("user")).map_err(|e| {
        metrics::counter!(m::BAD_INPUT, "kind" => "unauthorized").increment(1);
        error(e.code(), &e.to_string())
    })
}

/// [`authenticate`], and 403 unless the principal may use `room`.
pub(crate) fn authorize<B>(
    req: &Request<B>,
    query: &Query<'_>,
    auth: &Authenticator,
    room: &RoomId,
) -> Result<Principal, Response<Body>> {
    let principal = authenticate(req, query, auth)?;
    if !principal.may_use(room) {
        return Err(bad(
            ErrorCode::Forbidden,
            "the token does not allow this room",
        ));
    }
    Ok(principal)
}
