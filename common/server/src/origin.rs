//! Which browser pages may use a server: the `Origin` allow-list, CORS answers and the
//! WebSocket upgrade check, the same on nodes and routers.
//!
//! Browsers send `Origin` on every WebSocket upgrade and on cross-origin HTTP requests;
//! other clients usually send none and are not affected. A request whose `Origin` is the
//! server's own (its host and port are the request's `Host`, or the `X-Forwarded-Host` a
//! router adds) is same-origin and always allowed, so a page served by the router works
//! with no list at all. Any other origin must be on the list (`--allowed-origins`), or the
//! list must be `*`. A refused origin gets 403 `forbidden` on upgrades and API requests,
//! including the simple `text/plain` POSTs that a browser sends without a preflight, so a
//! page elsewhere cannot write to a room through a visitor's browser.

use std::fmt;
use std::str::FromStr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The origins allowed besides the server's own. Parsed from a comma-separated list of
/// `scheme://host[:port]` entries, where the host may start with `*.` (any subdomain, not
/// the domain itself); `*` alone allows every origin. The empty list allows only
/// same-origin pages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginPolicy {
    any: bool,
    /// Lower-case `scheme://host[:port]`.
    exact: Vec<String>,
    /// `(scheme://, .domain[:port])` for `scheme://*.domain[:port]`.
    subdomains: Vec<(String, String)>,
}

impl FromStr for OriginPolicy {
    type Err = String;

    fn from_str(list: &str) -> Result<Self, String> {
        let mut policy = OriginPolicy::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" {
                policy.any = true;
                continue;
            }
            let lower = entry.to_ascii_lowercase();
            let (scheme, authority) = split_origin(&lower).ok_or_else(|| {
                format!("origin {entry:?} is not scheme://host[:port] (no path, no trailing /)")
            })?;
            match authority.strip_prefix("*.") {
                Some(domain) if !domain.is_empty() && !domain.contains('*') => {
                    policy
                        .subdomains
                        .push((format!("{scheme}://"), format!(".{domain}")));
                }
                Some(_) => return Err(format!("origin {entry:?}: `*.` needs a domain after it")),
                None if authority.contains('*') => {
                    return Err(format!("origin {entry:?}: `*` only as `*.domain`"))
                }
                None => policy.exact.push(lower),
            }
        }
        Ok(policy)
    }
}

impl fmt::Display for OriginPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut entries: Vec<String> = Vec::new();
        if self.any {
            entries.push("*".into());
        }
        entries.extend(self.exact.iter().cloned());
        entries.extend(
            self.subdomains
                .iter()
                .map(|(scheme, domain)| format!("{scheme}*{domain}")),
        );
        if entries.is_empty() {
            f.write_str("(same origin only)")
        } else {
            f.write_str(&entries.join(","))
        }
    }
}

/// `("https", "host:port")` from `https://host:port`; `None` for anything with a path,
/// query, user info or an empty host.
fn split_origin(origin: &str) -> Option<(&str, &str)> {
    let (scheme, authority) = origin.split_once("://")?;
    let scheme_ok = !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    let authority_ok = !authority.is_empty()
        && !authority.starts_with(':')
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]*".contains(&b));
    (scheme_ok && authority_ok).then_some((scheme, authority))
}

/// What a request's `Origin` means for this server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginCheck {
    /// No `Origin` header: not a browser's cross-origin request. Allowed, no CORS headers.
    NoOrigin,
    /// The page is the server's own. Allowed, no CORS headers needed.
    SameOrigin,
    /// Another origin on the list: allowed, and answered with CORS headers naming it.
    Allowed(HeaderValue),
    /// Another origin not on the list (or an `Origin` that is not one): refused.
    Refused(String),
}

impl OriginPolicy {
    /// Allows every origin (`*`).
    pub fn any() -> Self {
        OriginPolicy {
            any: true,
            ..OriginPolicy::default()
        }
    }

    fn lists(&self, origin: &str) -> bool {
        self.any
            || self.exact.iter().any(|o| o == origin)
            || self.subdomains.iter().any(|(scheme, domain)| {
                origin
                    .strip_prefix(scheme.as_str())
                    .and_then(|host| host.strip_suffix(domain.as_str()))
                    .is_some_and(|sub| {
                        !sub.is_empty()
                            && sub
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
                    })
            })
    }

    /// Checks a request's `Origin` against the list and the request's own host.
    pub fn check(&self, headers: &HeaderMap) -> OriginCheck {
        let Some(value) = headers.get(header::ORIGIN) else {
            return OriginCheck::NoOrigin;
        };
        let Some(origin) = value.to_str().ok().map(str::to_ascii_lowercase) else {
            return OriginCheck::Refused("the Origin header is not text".into());
        };
        let authority = split_origin(&origin).map(|(_, a)| a);
        let same_host = |name: &HeaderName| {
            headers
                .get(name)
                .and_then(|h| h.to_str().ok())
                .is_some_and(|h| authority.is_some_and(|a| a.eq_ignore_ascii_case(h.trim())))
        };
        if same_host(&header::HOST) || same_host(&X_FORWARDED_HOST) {
            return OriginCheck::SameOrigin;
        }
        if self.lists(&origin) {
            return OriginCheck::Allowed(value.clone());
        }
        OriginCheck::Refused(format!(
            "origin {origin} is not allowed here (see --allowed-origins)"
        ))
    }
}

impl OriginCheck {
    /// The refusal's message, when refused.
    pub fn refusal(&self) -> Option<&str> {
        match self {
            OriginCheck::Refused(why) => Some(why),
            _ => None,
        }
    }

    /// Adds the CORS headers an answer to an allowed cross-origin request carries. Every
    /// answer that depends on `Origin` also says so (`Vary`), for caches in between.
    pub fn decorate(&self, headers: &mut HeaderMap) {
        if let OriginCheck::Allowed(origin) = self {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            headers.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static("retry-after"),
            );
        }
        // Once, even when a router decorates what the owner already did.
        let varies = headers
            .get_all(header::VARY)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"origin"));
        if !matches!(self, OriginCheck::NoOrigin) && !varies {
            headers.append(header::VARY, HeaderValue::from_static("origin"));
        }
    }

    /// The `204` answer to a preflight (`OPTIONS`) of the room API from an origin that was
    /// not refused: the methods and request headers it takes, cached by the browser for ten
    /// minutes. Credentials (cookies) are not allowed: the API takes a bearer token.
    pub fn preflight<B: Default>(&self) -> Response<B> {
        let mut resp = Response::new(B::default());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let headers = resp.headers_mut();
        self.decorate(headers);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        headers.insert(
            header::ALLOW,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(origin: Option<&str>, host: &str, forwarded: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).expect("host"));
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).expect("origin"));
        }
        if let Some(f) = forwarded {
            h.insert(
                X_FORWARDED_HOST.clone(),
                HeaderValue::from_str(f).expect("fwd"),
            );
        }
        h
    }

    fn policy(list: &str) -> OriginPolicy {
        list.parse().expect(list)
    }

    #[test]
    fn same_origin_is_allowed_with_no_list() {
        let p = OriginPolicy::default();
        let host = "127.0.0.1:8080";
        assert_eq!(
            p.check(&request(Some("http://127.0.0.1:8080"), host, None)),
            OriginCheck::SameOrigin
        );
        // Through a router: the node sees the router's host as X-Forwarded-Host.
        assert_eq!(
            p.check(&request(
                Some("http://127.0.0.1:8080"),
                "127.0.0.1:7001",
                Some(host)
            )),
            OriginCheck::SameOrigin
        );
        assert_eq!(p.check(&request(None, host, None)), OriginCheck::NoOrigin);
        for refused in [
            "http://evil.example",
            "http://127.0.0.1:8081",
            "null",
            "http://127.0.0.1:8080/path",
        ] {
            assert!(
                p.check(&request(Some(refused), host, None))
                    .refusal()
                    .is_some(),
                "{refused}"
            );
        }
    }

    #[test]
    fn listed_origins_and_subdomains_are_allowed() {
        let p = policy("https://app.example.com, https://*.example.org:8443");
        let h = |o| p.check(&request(Some(o), "chat.internal:80", None));
        assert!(matches!(
            h("https://app.example.com"),
            OriginCheck::Allowed(_)
        ));
        assert!(matches!(
            h("HTTPS://APP.EXAMPLE.COM"),
            OriginCheck::Allowed(_)
        ));
        assert!(matches!(
            h("https://a.b.example.org:8443"),
            OriginCheck::Allowed(_)
        ));
        for refused in [
            "http://app.example.com",
            "https://app.example.com:444",
            "https://example.org:8443",
            "https://x.example.org",
            "https://evil.com/.example.org:8443",
            "https://app.example.com.evil.com",
        ] {
            assert!(h(refused).refusal().is_some(), "{refused}");
        }
        assert!(matches!(
            policy("*").check(&request(Some("http://evil.example"), "h", None)),
            OriginCheck::Allowed(_)
        ));
    }

    #[test]
    fn a_bad_list_is_refused_at_start() {
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://*",
            "https://a.*.com",
            "https://",
            "https://user@host",
        ] {
            assert!(bad.parse::<OriginPolicy>().is_err(), "{bad}");
        }
        assert_eq!(policy(" ").to_string(), "(same origin only)");
        assert_eq!(
            policy("https://A.example, *").to_string(),
            "*,https://a.example"
        );
    }

    #[test]
    fn allowed_answers_carry_cors_headers() {
        let p = policy("https://app.example.com");
        let check = p.check(&request(Some("https://app.example.com"), "h", None));
        let resp: Response<()> = check.preflight();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        let out = resp.headers();
        assert_eq!(
            out[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example.com"
        );
        assert_eq!(out[header::VARY], "origin");
        assert!(out.contains_key(header::ACCESS_CONTROL_ALLOW_METHODS));
        assert!(!out.contains_key(header::ACCESS_CONTROL_ALLOW_CREDENTIALS));
        let mut out = HeaderMap::new();
        OriginCheck::NoOrigin.decorate(&mut out);
        assert!(out.is_empty());
        // A router decorating the owner's answer again adds no second `Vary`.
        let mut relayed = resp.headers().clone();
        check.decorate(&mut relayed);
        assert_eq!(relayed.get_all(header::VARY).iter().count(), 1);
    }
}
