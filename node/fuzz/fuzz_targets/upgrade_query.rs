//! What the WebSocket upgrade reads from a request, through the public surface.
//!
//! The query splitting itself (`Query::parse` in node/src/http.rs) is private and has no
//! public caller short of a running node, so it is not reached here; what the upgrade does
//! with each value is: `since` (`MessageId`), the `Authorization` header (`auth::bearer`),
//! the token (`Authenticator::authenticate`, HS256), `room` (`RoomId`) and the dev-mode
//! `user` (`UserId`).
//!
//! Input: `[flags] since \n authorization \n token-or-header \n claims \n room`. With
//! `flags & 1` the token is built from the 3rd and 4th parts as a JWT header and claims
//! and signed with the node's secret, so the claims checks are reached; otherwise the 3rd
//! part is taken as the token as it is (or the bearer token, when the header had one).
//!
//! Checked: no panic; an id parses exactly when it is a u64 in its canonical decimal form
//! and prints back to the input, the same through serde; bearer returns the trimmed rest of
//! a `Bearer ` value and nothing else; a token is accepted only with our HS256 signature,
//! and then its `sub` is the user, its session ends at `exp` plus the leeway (not already
//! past), and its `rooms` claim decides `may_use`; a room id or user id is accepted exactly
//! when it is 1-128 bytes of the documented alphabet.

#![no_main]

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chat_node::auth::{bearer, Authenticator, LEEWAY_S};
use chat_node::NodeConfig;
use common::{MessageId, RoomId, UserId};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const SECRET: &str = "fuzz-secret-0123456789";

fn authenticators() -> &'static (Authenticator, Authenticator) {
    static AUTH: OnceLock<(Authenticator, Authenticator)> = OnceLock::new();
    AUTH.get_or_init(|| {
        let mut jwt = NodeConfig::for_tests();
        jwt.insecure_dev_auth = false;
        jwt.jwt_secret = Some(SECRET.into());
        let jwt = Authenticator::from_config(&jwt).expect("HS256 authenticator");
        let dev = Authenticator::from_config(&NodeConfig::for_tests()).expect("dev authenticator");
        assert!(matches!(jwt, Authenticator::Jwt { .. }));
        assert!(matches!(dev, Authenticator::InsecureDev));
        (jwt, dev)
    })
}

fn sign(message: &str) -> String {
    jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
        Algorithm::HS256,
    )
    .expect("HS256 signs")
}

fn valid_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

fn check_id(s: &str) {
    let parsed = s.parse::<MessageId>();
    let canonical = s.parse::<u64>().ok().filter(|n| n.to_string() == s);
    assert_eq!(parsed.ok().map(|id| id.0), canonical, "id {s:?}");
    if let Ok(id) = parsed {
        assert_eq!(id.to_string(), s, "an id prints back to its input");
    }
    let quoted = Value::String(s.to_owned()).to_string();
    let via_serde = serde_json::from_str::<MessageId>(&quoted).ok();
    assert_eq!(
        via_serde.map(|id| id.0),
        canonical,
        "id {s:?} through serde"
    );
}

fn check_bearer(raw: &[u8]) -> Option<String> {
    assert_eq!(bearer(None), None);
    let value = http::HeaderValue::from_bytes(raw).ok()?;
    let got = bearer(Some(&value));
    let want = value.to_str().ok().and_then(|v| {
        let (scheme, rest) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    assert_eq!(got, want, "bearer of {value:?}");
    got.map(str::to_owned)
}

/// The claims the node reads, each as plain JSON. Other fields are skipped the way serde
/// skips them (an invalid UTF-8 string in an unknown field is not looked at), so this reads
/// whatever the node accepted.
#[derive(serde::Deserialize)]
struct Claims {
    sub: Value,
    exp: Value,
    #[serde(default)]
    rooms: Option<Value>,
}

/// The claims of a token `authenticate` accepted, with the checks that hold for any.
fn check_accepted(token: &str, principal: &chat_node::auth::Principal, room: Option<&RoomId>) {
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        panic!("accepted a token that is not three parts: {token:?}");
    };
    assert_eq!(
        sig,
        sign(&format!("{header}.{claims}")),
        "accepted a token without our signature: {token:?}"
    );
    let claims: Claims = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(claims)
            .expect("accepted claims are base64url"),
    )
    .expect("accepted claims read");
    assert_eq!(
        claims.sub.as_str(),
        Some(principal.user.as_str()),
        "user is not the token's sub"
    );
    let exp = claims.exp.as_u64().expect("exp");
    let ends = principal.expires_at.expect("a token session ends");
    assert_eq!(ends, exp.saturating_add(LEEWAY_S));
    let now = jsonwebtoken::get_current_timestamp();
    assert!(
        ends >= now,
        "accepted a token whose session is already over"
    );
    if let Some(room) = room {
        let allowed = match &claims.rooms {
            None => true,
            Some(Value::Array(rooms)) => rooms.iter().any(|r| {
                let r = r.as_str().expect("rooms are strings");
                match r.strip_suffix('*') {
                    Some(prefix) => room.as_str().starts_with(prefix),
                    None => r == room.as_str(),
                }
            }),
            Some(other) => panic!("accepted rooms claim {other}"),
        };
        assert_eq!(principal.may_use(room), allowed, "may_use({room})");
    }
}

fuzz_target!(|input: &[u8]| {
    let [flags, rest @ ..] = input else {
        return;
    };
    let mut parts = rest.splitn(5, |&b| b == b'\n');
    let mut part = || parts.next().unwrap_or_default();
    let (since, authorization, token, claims, room) = (part(), part(), part(), part(), part());
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();

    check_id(&text(since));

    let room = text(room);
    let room_id = RoomId::new(room.as_str());
    assert_eq!(room_id.is_ok(), valid_name(&room), "room {room:?}");
    if let Ok(r) = &room_id {
        assert_eq!(r.as_str(), room);
    }

    let (jwt, dev) = authenticators();
    let header_token = check_bearer(authorization);
    let token = if flags & 1 != 0 {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(token),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let sig = sign(&signing_input);
        format!("{signing_input}.{sig}")
    } else {
        header_token.unwrap_or_else(|| text(token))
    };
    match jwt.authenticate(Some(&token), Some(&room)) {
        Ok(p) => check_accepted(&token, &p, room_id.as_ref().ok()),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    assert!(
        jwt.authenticate(None, Some(&room)).is_err(),
        "no token, no entry"
    );
    assert!(jwt.authenticate(Some(""), None).is_err(), "empty token");

    // Dev mode takes the user as given, validated like any user id.
    let user = dev.authenticate(Some(&token), Some(&room));
    assert_eq!(user.is_ok(), valid_name(&room), "dev user {room:?}");
    if let Ok(p) = user {
        assert_eq!(p.user.as_str(), room);
        assert_eq!(p.expires_at, None);
        assert!(UserId::new(room.as_str()).is_ok());
    }
});
