//! Who is connecting: verifies JWTs (HS256 or RS256) and decides which rooms a user may use.
//!
//! A token's `sub` is the user id; its optional `rooms` claim lists the rooms it allows
//! (exact ids, or prefixes ending in `*`). Without the claim every room is allowed. In the
//! insecure dev mode no token is read and the user id comes from the `user` query
//! parameter. This module does not know about HTTP beyond reading the token's location.

use std::sync::Arc;

use anyhow::Context;

use common::{ErrorCode, RoomId, UserId};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::Config;

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: pass ?token= or an Authorization: Bearer header")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("missing or invalid user parameter (dev auth): {0}")]
    BadDevUser(String),
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::Unauthorized
    }
}

/// Seconds a token is still taken past its `exp`, for clock skew between the issuer and
/// the node. The same leeway applies at the upgrade and at the session's end (4003).
pub const LEEWAY_S: u64 = 5;

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    rooms: Option<Vec<String>>,
}

/// An authenticated user and what the token allows.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: UserId,
    rooms: Option<Arc<[String]>>,
    /// Unix seconds after which the session must end: the token's `exp` plus [`LEEWAY_S`],
    /// the leeway its upgrade was given; `None` in dev mode.
    pub expires_at: Option<u64>,
}

impl Principal {
    pub fn may_use(&self, room: &RoomId) -> bool {
        match &self.rooms {
            None => true,
            Some(allowed) => allowed.iter().any(|a| match a.strip_suffix('*') {
                Some(prefix) => room.as_str().starts_with(prefix),
                None => a == room.as_str(),
            }),
        }
    }
}

pub enum Authenticator {
    Jwt {
        key: Box<DecodingKey>,
        validation: Box<Validation>,
    },
    InsecureDev,
}

impl Authenticator {
    pub fn from_config(config: &Config) -> anyhow::Result<Authenticator> {
        if let Some(secret) = &config.jwt_secret {
            let mut validation = Validation::new(Algorithm::HS256);
            validation.leeway = LEEWAY_S;
            return Ok(Authenticator::Jwt {
                key: Box::new(DecodingKey::from_secret(secret.as_bytes())),
                validation: Box::new(validation),
            });
        }
        if let Some(path) = &config.jwt_public_key_file {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .with_context(|| format!("{} is not an RSA public key PEM", path.display()))?;
            let mut validation = Validation::new(Algorithm::RS256);
            validation.leeway = LEEWAY_S;
            return Ok(Authenticator::Jwt {
                key: Box::new(key),
                validation: Box::new(validation),
            });
        }
        Ok(Authenticator::InsecureDev)
    }

    /// Authenticates from a bearer token (query or header) or, in dev mode, a user name.
    pub fn authenticate(
        &self,
        token: Option<&str>,
        dev_user: Option<&str>,
    ) -> Result<Principal, AuthError> {
        match self {
            Authenticator::InsecureDev => {
                let user = dev_user.ok_or_else(|| AuthError::BadDevUser("missing".into()))?;
                let user = UserId::new(user).map_err(|e| AuthError::BadDevUser(e.to_string()))?;
                Ok(Principal {
                    user,
                    rooms: None,
                    expires_at: None,
                })
            }
            Authenticator::Jwt { key, validation } => {
                let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
                let data = jsonwebtoken::decode::<Claims>(token, key, validation)
                    .map_err(|e| AuthError::Invalid(e.to_string()))?;
                let user = UserId::new(data.claims.sub)
                    .map_err(|e| AuthError::Invalid(format!("sub: {e}")))?;
                Ok(Principal {
                    user,
                    rooms: data.claims.rooms.map(Into::into),
                    expires_at: Some(data.claims.exp.saturating_add(LEEWAY_S)),
                })
            }
        }
    }
}

/// The token from an `Authorization: Bearer` header value.
pub fn bearer(header: Option<&http::HeaderValue>) -> Option<&str> {
    let v = header?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde::Serialize;

    const SECRET: &str = "test-secret-0123456789";

    #[derive(Serialize)]
    struct Out<'a> {
        sub: &'a str,
        exp: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        rooms: Option<Vec<&'a str>>,
    }

    fn token(sub: &str, exp: u64, rooms: Option<Vec<&str>>, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &Out { sub, exp, rooms },
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    fn hs256() -> Authenticator {
        let mut c = Config::for_tests();
        c.insecure_dev_auth = false;
        c.jwt_secret = Some(SECRET.into());
        Authenticator::from_config(&c).expect("auth")
    }

    fn later() -> u64 {
        common::id::now_ms() / 1000 + 3600
    }

    #[test]
    fn valid_token_gives_user_and_rooms() {
        let a = hs256();
        let p = a
            .authenticate(
                Some(&token(
                    "alice",
                    later(),
                    Some(vec!["team-*", "lobby"]),
                    SECRET,
                )),
                None,
            )
            .expect("valid");
        assert_eq!(p.user.as_str(), "alice");
        assert!(p.may_use(&RoomId::new("team-7").expect("r")));
        assert!(p.may_use(&RoomId::new("lobby").expect("r")));
        assert!(!p.may_use(&RoomId::new("lobby2").expect("r")));
        assert!(!p.may_use(&RoomId::new("other").expect("r")));
    }

    #[test]
    fn missing_bad_expired_and_wrongly_signed_tokens_are_refused() {
        let a = hs256();
        assert_eq!(
            a.authenticate(None, Some("alice")).err(),
            Some(AuthError::Missing)
        );
        assert!(matches!(
            a.authenticate(Some("garbage"), None),
            Err(AuthError::Invalid(_))
        ));
        let expired = token("alice", 1_000_000, None, SECRET);
        assert!(matches!(
            a.authenticate(Some(&expired), None),
            Err(AuthError::Invalid(_))
        ));
        let forged = token("alice", later(), None, "another-secret-0123456789");
        assert!(matches!(
            a.authenticate(Some(&forged), None),
            Err(AuthError::Invalid(_))
        ));
        let bad_sub = token("no spaces allowed", later(), None, SECRET);
        assert!(matches!(
            a.authenticate(Some(&bad_sub), None),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn dev_mode_takes_the_user_parameter() {
        let a = Authenticator::InsecureDev;
        assert_eq!(
            a.authenticate(None, Some("bob")).expect("ok").user.as_str(),
            "bob"
        );
        assert!(a.authenticate(None, None).is_err());
        assert!(a.authenticate(None, Some("b o b")).is_err());
    }

    #[test]
    fn bearer_header() {
        let v = http::HeaderValue::from_static("Bearer abc.def");
        assert_eq!(bearer(Some(&v)), Some("abc.def"));
        let v = http::HeaderValue::from_static("Basic xyz");
        assert_eq!(bearer(Some(&v)), None);
    }
}
