//! Who the bench's connections claim to be: the query parameters that authenticate one
//! user on the WebSocket upgrade (common/PROTOCOL.md, "Connecting").
//!
//! With `--jwt-secret` (HS256) or `--jwt-key` (an RSA private key PEM, RS256) every
//! connection carries `token=<JWT>` signed here with `sub` = its user id and `exp` =
//! now + `--jwt-ttl` (the claims node/src/auth.rs checks); without them it carries today's
//! insecure dev-auth `user=<id>`. Every scenario builds its connections' credentials through
//! [`Auth::credentials`] so all of them speak the same auth. This module never touches the
//! network.
//!
//! A token is signed when its connection is attempted (not up front), so a long run never
//! connects with a token that expired while waiting, and the signing cost (microseconds for
//! HS256, about a millisecond for RS256 with a 2048-bit key) is spread over the ramp. With
//! RS256 that cost is bench CPU and shows in the report's bench CPU figure.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// The auth options every scenario accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args, Serialize, Deserialize)]
pub struct AuthArgs {
    /// Sign an HS256 JWT for every connection with this shared secret (the node's
    /// --jwt-secret) and pass it as `token=`. Without --jwt-secret or --jwt-key the bench
    /// uses the node's insecure dev auth (`user=`).
    #[arg(
        long,
        env = "CHAT_BENCH_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "jwt_key"
    )]
    pub jwt_secret: Option<String>,
    /// Sign an RS256 JWT for every connection with this RSA private key (PEM file); the
    /// node verifies with the matching public key (--jwt-public-key-file).
    #[arg(long, env = "CHAT_BENCH_JWT_KEY")]
    pub jwt_key: Option<PathBuf>,
    /// Lifetime of each signed token, in seconds from its connection attempt. The node closes
    /// a session with 4003 when its token expires, so keep it above the run's length.
    #[arg(long, env = "CHAT_BENCH_JWT_TTL", default_value_t = 3600)]
    pub jwt_ttl: u64,
}

/// The longest `--jwt-ttl` accepted (one year).
pub const MAX_TTL: u64 = 365 * 86_400;

/// The claims the bench signs; node/src/auth.rs requires `sub` and `exp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
}

impl Claims {
    pub fn new(user: &str, now_s: u64, ttl_s: u64) -> Claims {
        Claims {
            sub: user.to_owned(),
            exp: now_s.saturating_add(ttl_s),
            iat: now_s,
        }
    }
}

/// How connections authenticate.
pub enum Auth {
    /// `user=<id>`: the node's --insecure-dev-auth.
    Dev,
    Jwt {
        key: Box<EncodingKey>,
        algorithm: Algorithm,
        ttl_s: u64,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.write_str(self.describe())
    }
}

impl Auth {
    /// Builds the signer; a bad flag gives a message naming it.
    pub fn from_args(args: &AuthArgs) -> Result<Auth, String> {
        if args.jwt_ttl == 0 || args.jwt_ttl > MAX_TTL {
            return Err(format!("--jwt-ttl must be between 1 and {MAX_TTL} seconds"));
        }
        match (&args.jwt_secret, &args.jwt_key) {
            (Some(_), Some(_)) => Err("--jwt-secret and --jwt-key are exclusive".into()),
            (Some(secret), None) => {
                if secret.is_empty() {
                    return Err("--jwt-secret must not be empty".into());
                }
                Ok(Auth::Jwt {
                    key: Box::new(EncodingKey::from_secret(secret.as_bytes())),
                    algorithm: Algorithm::HS256,
                    ttl_s: args.jwt_ttl,
                })
            }
            (None, Some(path)) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("--jwt-key: reading {}: {e}", path.display()))?;
                let key = EncodingKey::from_rsa_pem(&pem).map_err(|e| {
                    format!(
                        "--jwt-key: {} is not an RSA private key PEM: {e}",
                        path.display()
                    )
                })?;
                let auth = Auth::Jwt {
                    key: Box::new(key),
                    algorithm: Algorithm::RS256,
                    ttl_s: args.jwt_ttl,
                };
                // A PEM that parses may still not sign (a public key, say): find out now,
                // not once per connection.
                auth.credentials("probe")
                    .map_err(|e| format!("--jwt-key: {} cannot sign: {e}", path.display()))?;
                Ok(auth)
            }
            (None, None) => Ok(Auth::Dev),
        }
    }

    /// For reports: which auth the run used (never the secret).
    pub fn describe(&self) -> &'static str {
        match self {
            Auth::Dev => "insecure dev auth (user=)",
            Auth::Jwt {
                algorithm: Algorithm::RS256,
                ..
            } => "JWT RS256 (token=)",
            Auth::Jwt { .. } => "JWT HS256 (token=)",
        }
    }

    /// The upgrade query's credentials for `user` (a valid user id): `user=U` or
    /// `token=JWT`. A JWT is base64url text, so it needs no escaping in the query.
    pub fn credentials(&self, user: &str) -> Result<String, String> {
        match self {
            Auth::Dev => Ok(format!("user={user}")),
            Auth::Jwt {
                key,
                algorithm,
                ttl_s,
            } => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let token = jsonwebtoken::encode(
                    &Header::new(*algorithm),
                    &Claims::new(user, now, *ttl_s),
                    key,
                )
                .map_err(|e| format!("signing a JWT for {user}: {e}"))?;
                Ok(format!("token={token}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    fn hs(secret: &str) -> AuthArgs {
        AuthArgs {
            jwt_secret: Some(secret.into()),
            jwt_key: None,
            jwt_ttl: 600,
        }
    }

    #[test]
    fn dev_auth_is_the_user_parameter() {
        let a = Auth::from_args(&AuthArgs {
            jwt_ttl: 60,
            ..Default::default()
        })
        .expect("dev");
        assert_eq!(a.credentials("bench-1").expect("creds"), "user=bench-1");
        assert_eq!(a.describe(), "insecure dev auth (user=)");
    }

    #[test]
    fn hs256_token_carries_sub_and_exp_the_node_checks() {
        let a = Auth::from_args(&hs("s3cret")).expect("hs256");
        let creds = a.credentials("alice-7").expect("creds");
        let token = creds.strip_prefix("token=").expect("token=");
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
        // Verified the way node/src/auth.rs does.
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 5;
        let data = jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(b"s3cret"), &v)
            .expect("valid with the same secret");
        assert_eq!(data.claims.sub, "alice-7");
        assert_eq!(data.claims.exp, data.claims.iat + 600);
        assert!(
            jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(b"other"), &v).is_err()
        );
        assert!(format!("{a:?}").contains("HS256") && !format!("{a:?}").contains("s3cret"));
    }

    #[test]
    fn bad_auth_flags_name_themselves() {
        for (args, needle) in [
            (
                AuthArgs {
                    jwt_ttl: 0,
                    ..hs("x")
                },
                "--jwt-ttl",
            ),
            (hs(""), "--jwt-secret"),
            (
                AuthArgs {
                    jwt_secret: Some("x".into()),
                    jwt_key: Some("/k.pem".into()),
                    jwt_ttl: 60,
                },
                "--jwt-key",
            ),
            (
                AuthArgs {
                    jwt_secret: None,
                    jwt_key: Some("/nonexistent/key.pem".into()),
                    jwt_ttl: 60,
                },
                "--jwt-key",
            ),
        ] {
            let e = Auth::from_args(&args).expect_err(needle);
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn rs256_token_verifies_with_the_public_key() {
        // A key pair made for this test only (bench/tests/data), never used anywhere else.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let a = Auth::from_args(&AuthArgs {
            jwt_secret: None,
            jwt_key: Some(dir.join("test-rs256-private.pem")),
            jwt_ttl: 60,
        })
        .expect("rs256");
        assert_eq!(a.describe(), "JWT RS256 (token=)");
        let creds = a.credentials("bob").expect("creds");
        let token = creds.strip_prefix("token=").expect("token=");
        let public = std::fs::read(dir.join("test-rs256-public.pem")).expect("public key");
        let data = jsonwebtoken::decode::<Claims>(
            token,
            &DecodingKey::from_rsa_pem(&public).expect("pem"),
            &Validation::new(Algorithm::RS256),
        )
        .expect("valid");
        assert_eq!(data.claims.sub, "bob");
        // The public key is not a signing key: a clear error naming the flag.
        let e = Auth::from_args(&AuthArgs {
            jwt_secret: None,
            jwt_key: Some(dir.join("test-rs256-public.pem")),
            jwt_ttl: 60,
        })
        .expect_err("public key");
        assert!(e.contains("--jwt-key"), "{e}");
    }

    #[test]
    fn claims_saturate() {
        let c = Claims::new("u", u64::MAX - 1, 10);
        assert_eq!(c.exp, u64::MAX);
    }
}
