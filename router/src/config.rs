//! The router's configuration: one clap struct, every flag also read from a `CHAT_*`
//! environment variable, checked by [`Config::validate`] before anything starts.
//!
//! The membership settings (`--redis-url`, `--redis-prefix`, `--membership-ttl`, `--vnodes`)
//! must match the nodes' exactly: a router with another prefix sees another cluster, and one
//! with another vnode count computes other owners.

use std::net::SocketAddr;
use std::time::Duration;

use chat_server::membership::MembershipConfig;
use clap::Parser;
pub use common::duration::parse_duration;

/// The chat cluster's stateless front door: sends each room's traffic to its owner node.
#[derive(Debug, Clone, Parser)]
#[command(name = "chat-router", version)]
pub struct Config {
    /// Address for client WebSockets, the room API, health and metrics.
    #[arg(long, env = "CHAT_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,
    /// Redis holding cluster membership (the nodes register there).
    #[arg(long, env = "CHAT_REDIS_URL", default_value = "redis://127.0.0.1:6390")]
    pub redis_url: String,
    /// Prefix of the cluster's Redis keys and channels; the same as the nodes'.
    #[arg(long, env = "CHAT_REDIS_PREFIX", default_value = "chat")]
    pub redis_prefix: String,
    /// A member that stops refreshing its registration drops out after this long; the same
    /// as the nodes'. Sets how often the router re-reads membership (half of it, 0.1-2 s).
    #[arg(long, env = "CHAT_MEMBERSHIP_TTL", value_parser = parse_duration, default_value = "5s")]
    pub membership_ttl: Duration,
    /// Virtual nodes per node in the consistent-hash ring; the same on every node and router.
    #[arg(long, env = "CHAT_VNODES", default_value_t = common::ring::DEFAULT_VNODES)]
    pub vnodes: u32,
    /// Answer `/ws` with a 307 redirect to the owner instead of proxying it. A client can
    /// also ask for one request with `redirect=1` in the query.
    #[arg(long, env = "CHAT_ROUTER_REDIRECT")]
    pub redirect: bool,
    /// Longest wait for a TCP connection to an owner.
    #[arg(long, env = "CHAT_UPSTREAM_CONNECT_TIMEOUT", value_parser = parse_duration, default_value = "2s")]
    pub upstream_connect_timeout: Duration,
    /// Longest wait for an owner's whole answer to a proxied HTTP request, or for its
    /// answer to a WebSocket upgrade.
    #[arg(long, env = "CHAT_UPSTREAM_TIMEOUT", value_parser = parse_duration, default_value = "15s")]
    pub upstream_timeout: Duration,
    /// Browser origins allowed besides this server's own, comma-separated:
    /// `https://app.example.com`, `https://*.example.com` (its subdomains), or `*` (any; for
    /// development). Requests with another `Origin` get 403 `forbidden`; requests without one
    /// (servers, mobile apps) are not affected. Empty (the default): same-origin pages only.
    #[arg(long, env = "CHAT_ALLOWED_ORIGINS", default_value = "")]
    pub allowed_origins: chat_server::origin::OriginPolicy,
    /// Serve the demo chat page from this directory at `/demo/` (`/` redirects there):
    /// `common/client-ts/demo` after `npm run build` there. Off by default; for local and
    /// staging clusters.
    #[arg(long, env = "CHAT_SERVE_DEMO")]
    pub serve_demo: Option<std::path::PathBuf>,
    /// Largest HTTP request body forwarded to a node; larger ones get 413 `frame_too_large`.
    // Not `CHAT_MAX_BODY_BYTES`: on a node that names the longest message text (4096), and
    // one environment shared by routers and nodes must not shrink the router's bound to it.
    #[arg(long, env = "CHAT_ROUTER_MAX_BODY_BYTES", default_value_t = 65_536)]
    pub max_body_bytes: usize,
    /// After SIGTERM/SIGINT: how long in-flight requests and proxied WebSockets may go on
    /// before the router cuts them and exits.
    #[arg(long, env = "CHAT_SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,
    #[command(flatten)]
    pub server: chat_server::binary::ServerFlags,
}

impl Config {
    /// Checks what clap cannot: ranges and formats. The message is one line.
    pub fn validate(&self) -> Result<(), chat_server::InvalidConfig> {
        self.problem().map_err(chat_server::InvalidConfig)
    }

    fn problem(&self) -> Result<(), String> {
        if !["redis://", "rediss://", "redis+unix://", "unix://"]
            .iter()
            .any(|s| self.redis_url.starts_with(s))
        {
            return Err(format!(
                "--redis-url {:?} must start with redis://, rediss://, redis+unix:// or unix://",
                self.redis_url
            ));
        }
        if let Err(e) = redis::Client::open(self.redis_url.as_str()) {
            return Err(format!("--redis-url {:?}: {e}", self.redis_url));
        }
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(char::is_whitespace) {
            return Err("--redis-prefix must be non-empty, without spaces".into());
        }
        if self.membership_ttl < Duration::from_millis(100) {
            return Err("--membership-ttl must be at least 100ms".into());
        }
        if self.vnodes == 0 {
            return Err("--vnodes must be at least 1".into());
        }
        for (name, d) in [
            ("--upstream-connect-timeout", self.upstream_connect_timeout),
            ("--upstream-timeout", self.upstream_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        if self.max_body_bytes == 0 {
            return Err("--max-body-bytes must be at least 1".into());
        }
        if let Some(dir) = &self.serve_demo {
            if !dir.join("index.html").is_file() {
                return Err(format!(
                    "--serve-demo {}: no index.html there (build it: cd common/client-ts && npm run build)",
                    dir.display()
                ));
            }
        }
        Ok(())
    }

    pub fn membership(&self) -> MembershipConfig {
        MembershipConfig {
            redis_url: self.redis_url.clone(),
            prefix: self.redis_prefix.clone(),
            ttl: self.membership_ttl,
            vnodes: self.vnodes,
            // Routers take over no rooms, so they never wait out a departure.
            departure_wait: std::time::Duration::ZERO,
        }
    }

    /// A config for tests and embedding: defaults with port 0 and a short grace.
    pub fn for_tests(redis_url: &str, prefix: &str) -> Config {
        let mut c = Config::parse_from(["chat-router"]);
        c.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.redis_url = redis_url.to_string();
        c.redis_prefix = prefix.to_string();
        c.membership_ttl = Duration::from_secs(2);
        c.shutdown_grace = Duration::from_secs(2);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_do_not() {
        let c = Config::parse_from(["chat-router"]);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.vnodes, common::ring::DEFAULT_VNODES);
        assert_eq!(c.max_body_bytes, 65_536);
        assert_eq!(c.upstream_timeout, Duration::from_secs(15));
        let bad: [fn(&mut Config); 6] = [
            |c| c.redis_url = "http://127.0.0.1:6390".into(),
            |c| c.redis_prefix = "a b".into(),
            |c| c.membership_ttl = Duration::from_millis(10),
            |c| c.vnodes = 0,
            |c| c.upstream_timeout = Duration::ZERO,
            |c| c.max_body_bytes = 0,
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut c = Config::parse_from(["chat-router"]);
            f(&mut c);
            assert!(c.validate().is_err(), "case {i} validated");
        }
    }
}
