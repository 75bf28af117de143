//! The node's configuration: one clap struct, every flag also read from a `CHAT_*`
//! environment variable, checked by [`Config::validate`] before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
pub use common::duration::parse_duration;

/// Which message store the node writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// ScyllaDB or Apache Cassandra over CQL: the production store.
    Scylla,
    /// Single-node embedded mode: history lives in this process's memory, bounded per room,
    /// and is lost on restart. For development and single-node demos only.
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CqlConsistency {
    One,
    LocalOne,
    LocalQuorum,
    Quorum,
    EachQuorum,
    All,
}

impl CqlConsistency {
    pub fn to_scylla(self) -> scylla::statement::Consistency {
        use scylla::statement::Consistency as C;
        match self {
            CqlConsistency::One => C::One,
            CqlConsistency::LocalOne => C::LocalOne,
            CqlConsistency::LocalQuorum => C::LocalQuorum,
            CqlConsistency::Quorum => C::Quorum,
            CqlConsistency::EachQuorum => C::EachQuorum,
            CqlConsistency::All => C::All,
        }
    }
}

/// A chat node: owns rooms, their WebSocket members, ordering, fan-out and persistence.
#[derive(Debug, Clone, Parser)]
#[command(name = "chat-node", version)]
pub struct Config {
    /// Address for WebSocket, HTTP API, health and metrics.
    #[arg(long, env = "CHAT_LISTEN", default_value = "127.0.0.1:7001")]
    pub listen: SocketAddr,
    /// Redis for cluster membership. Without it the node runs standalone and owns every room.
    #[arg(long, env = "CHAT_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of this cluster's Redis keys and channels.
    #[arg(long, env = "CHAT_REDIS_PREFIX", default_value = "chat")]
    pub redis_prefix: String,
    /// A member that stops refreshing its registration drops out after this long; it is
    /// also the node's lease: a node that could not renew it for this long (minus a tenth)
    /// stops serving every room until it registers again.
    #[arg(long, env = "CHAT_MEMBERSHIP_TTL", value_parser = parse_duration, default_value = "5s")]
    pub membership_ttl: Duration,
    /// Longest a join or send waits for a room whose previous owner has not let go yet
    /// (after a crash: about the TTL plus --store-timeout); then `room_unavailable`.
    #[arg(long, env = "CHAT_ROOM_ACQUIRE_TIMEOUT", value_parser = parse_duration, default_value = "15s")]
    pub room_acquire_timeout: Duration,
    /// Virtual nodes per node in the consistent-hash ring; the same on every node and router.
    #[arg(long, env = "CHAT_VNODES", default_value_t = common::ring::DEFAULT_VNODES)]
    pub vnodes: u32,
    /// host:port where routers and clients reach this node (default: the bound address).
    #[arg(long, env = "CHAT_ADVERTISE")]
    pub advertise: Option<String>,
    /// This node's stable id, 0-1023; part of every message id it mints.
    #[arg(long, env = "CHAT_NODE_ID", default_value_t = 0)]
    pub node_id: u16,
    /// HS256 secret for client tokens.
    #[arg(long, env = "CHAT_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM file with the RS256 public key for client tokens.
    #[arg(long, env = "CHAT_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// INSECURE: take the user id from the `user` query parameter; no token checked.
    #[arg(long, env = "CHAT_INSECURE_DEV_AUTH")]
    pub insecure_dev_auth: bool,
    /// Message store: `scylla` (ScyllaDB or Cassandra over CQL) or `memory` (single-node
    /// embedded mode).
    #[arg(long, env = "CHAT_STORE", value_enum, default_value = "scylla")]
    pub store: StoreKind,
    /// CQL contact points, host:port, comma-separated.
    #[arg(
        long,
        env = "CHAT_CQL_NODES",
        value_delimiter = ',',
        default_value = "127.0.0.1:9042"
    )]
    pub cql_nodes: Vec<String>,
    /// Keyspace holding the chat tables; created if missing.
    #[arg(long, env = "CHAT_CQL_KEYSPACE", default_value = "chat")]
    pub cql_keyspace: String,
    /// Replication map used when the keyspace is created.
    #[arg(
        long,
        env = "CHAT_CQL_REPLICATION",
        default_value = "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )]
    pub cql_replication: String,
    /// Consistency level of every store read and write; an ack means a write reached it.
    #[arg(
        long,
        env = "CHAT_CQL_CONSISTENCY",
        value_enum,
        default_value = "local-quorum"
    )]
    pub cql_consistency: CqlConsistency,
    /// Width of the time buckets messages are partitioned by. Fixed per keyspace.
    #[arg(long, env = "CHAT_CQL_BUCKET", value_parser = parse_duration, default_value = "1d")]
    pub cql_bucket: Duration,
    /// Store write batches in flight at once, node-wide.
    #[arg(long, env = "CHAT_CQL_MAX_INFLIGHT", default_value_t = 256)]
    pub cql_max_inflight: usize,
    /// Messages of history kept per room by the embedded memory store.
    #[arg(long, env = "CHAT_MEMORY_HISTORY_PER_ROOM", default_value_t = 10_000)]
    pub memory_history_per_room: usize,
    /// Frames a connection's outbound queue holds before the client is closed as slow.
    #[arg(long, env = "CHAT_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,
    /// Bytes a connection may have waiting (its queue and what rooms buffer for it while
    /// it catches up) before it is closed as slow (4000); replays wait for room instead.
    #[arg(long, env = "CHAT_OUTBOUND_QUEUE_BYTES", default_value_t = 4 << 20)]
    pub outbound_queue_bytes: usize,
    /// Commands a room's inbox holds before sends are refused with `overloaded`.
    #[arg(long, env = "CHAT_ROOM_INBOX", default_value_t = 4096)]
    pub room_inbox: usize,
    /// Largest WebSocket frame or message (after reassembly) and HTTP body accepted, bytes.
    #[arg(long, env = "CHAT_MAX_FRAME_BYTES", default_value_t = 65_536)]
    pub max_frame_bytes: usize,
    /// Longest message body accepted, bytes.
    #[arg(long, env = "CHAT_MAX_BODY_BYTES", default_value_t = 4096)]
    pub max_body_bytes: usize,
    /// Rooms one connection may be joined to at once.
    #[arg(long, env = "CHAT_MAX_ROOMS_PER_CONNECTION", default_value_t = 64)]
    pub max_rooms_per_connection: usize,
    /// Concurrent WebSocket connections accepted; more get HTTP 503 `overloaded`. 0 (the
    /// default): the open-file limit less a reserve (a tenth of it, at least 256) that keeps
    /// health checks, metrics, the API, the store and Redis answerable when the node is full.
    #[arg(long, env = "CHAT_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,
    /// Browser origins allowed besides this server's own, comma-separated:
    /// `https://app.example.com`, `https://*.example.com` (its subdomains), or `*` (any; for
    /// development). Requests with another `Origin` get 403 `forbidden`; requests without one
    /// (servers, mobile apps) are not affected. Empty (the default): same-origin pages only.
    #[arg(long, env = "CHAT_ALLOWED_ORIGINS", default_value = "")]
    pub allowed_origins: chat_server::origin::OriginPolicy,
    /// Sends, joins and leaves per second one connection may make (token bucket refill rate);
    /// refusals past another bucket of the same size close it with 4029.
    #[arg(long, env = "CHAT_SEND_RATE", default_value_t = 100.0)]
    pub send_rate: f64,
    /// Requests one connection may burst above its rate.
    #[arg(long, env = "CHAT_SEND_BURST", default_value_t = 200.0)]
    pub send_burst: f64,
    /// Interval between server pings.
    #[arg(long, env = "CHAT_PING_INTERVAL", value_parser = parse_duration, default_value = "15s")]
    pub ping_interval: Duration,
    /// A peer that sends nothing (not even a pong) for this long is closed.
    #[arg(long, env = "CHAT_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "45s")]
    pub idle_timeout: Duration,
    /// A peer that accepts no bytes for this long while we write is dropped.
    #[arg(long, env = "CHAT_WRITE_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub write_timeout: Duration,
    /// A room with no members and nothing to persist is dropped after this long.
    #[arg(long, env = "CHAT_ROOM_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "60s")]
    pub room_idle_timeout: Duration,
    /// How long a client message id is remembered for dedupe.
    #[arg(long, env = "CHAT_DEDUPE_WINDOW", value_parser = parse_duration, default_value = "10m")]
    pub dedupe_window: Duration,
    /// Client message ids remembered per room at most (oldest forgotten first).
    #[arg(long, env = "CHAT_DEDUPE_MAX_PER_ROOM", default_value_t = 100_000)]
    pub dedupe_max_per_room: usize,
    /// Recent messages a room keeps in memory to serve `since` joins without a store read.
    #[arg(long, env = "CHAT_RECENT_PER_ROOM", default_value_t = 256)]
    pub recent_per_room: usize,
    /// Messages per store write batch, at most.
    #[arg(long, env = "CHAT_STORE_BATCH", default_value_t = 256)]
    pub store_batch: usize,
    /// A store call slower than this counts as failed.
    #[arg(long, env = "CHAT_STORE_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub store_timeout: Duration,
    /// Accepted but not yet durable messages per room; past it sends get `store_unavailable`.
    #[arg(long, env = "CHAT_MAX_PENDING_PER_ROOM", default_value_t = 8192)]
    pub max_pending_per_room: usize,
    /// Whether rooms broadcast `presence` frames when users join and leave.
    #[arg(long, env = "CHAT_PRESENCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub presence: bool,
    /// How long the CQL store keeps each message (a CQL TTL on its row; history and replay
    /// end where it expired). 0 (the default) keeps messages until deleted by hand.
    #[arg(long, env = "CHAT_MESSAGE_TTL", value_parser = parse_duration, default_value = "0s")]
    pub message_ttl: Duration,
    /// Bearer token for the operations API (ending rooms, room TTLs, dead letters). Without
    /// it that API answers 403, except under --insecure-dev-auth where it is open.
    #[arg(long, env = "CHAT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// How long a user's cluster-wide presence outlives its node's last refresh (it is
    /// refreshed every third of this): a crashed node's users show offline after it.
    #[arg(long, env = "CHAT_USER_PRESENCE_TTL", value_parser = parse_duration, default_value = "30s")]
    pub user_presence_ttl: Duration,
    /// The app's endpoint that gets every stored message as a signed POST (see
    /// OPERATIONS "Webhooks"). http:// only. Unset: no webhooks.
    #[arg(long, env = "CHAT_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// Shared secret of the webhook signature (HMAC-SHA256 of the body).
    #[arg(long, env = "CHAT_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Room id prefixes whose messages go to the webhook, comma-separated; empty: every room.
    #[arg(
        long,
        env = "CHAT_WEBHOOK_ROOMS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub webhook_rooms: Vec<String>,
    /// One delivery attempt fails after this long without a 2xx answer.
    #[arg(long, env = "CHAT_WEBHOOK_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub webhook_timeout: Duration,
    /// Delivery attempts in flight at once, node-wide.
    #[arg(long, env = "CHAT_WEBHOOK_CONCURRENCY", default_value_t = 32)]
    pub webhook_concurrency: usize,
    /// Attempts per message before it goes to the dead-letter table.
    #[arg(long, env = "CHAT_WEBHOOK_MAX_ATTEMPTS", default_value_t = 10)]
    pub webhook_max_attempts: u32,
    /// A message older than this whose delivery fails goes to the dead-letter table.
    #[arg(long, env = "CHAT_WEBHOOK_MAX_AGE", value_parser = parse_duration, default_value = "24h")]
    pub webhook_max_age: Duration,
    /// Wait before the first retry; it doubles per attempt, with jitter, up to the max.
    #[arg(long, env = "CHAT_WEBHOOK_BACKOFF", value_parser = parse_duration, default_value = "1s")]
    pub webhook_backoff: Duration,
    /// Longest wait between two attempts.
    #[arg(long, env = "CHAT_WEBHOOK_BACKOFF_MAX", value_parser = parse_duration, default_value = "5m")]
    pub webhook_backoff_max: Duration,
    /// How often the node looks in the store for rooms it owns with deliveries pending (a
    /// crashed or departed owner's work).
    #[arg(long, env = "CHAT_WEBHOOK_SWEEP", value_parser = parse_duration, default_value = "10s")]
    pub webhook_sweep: Duration,
    /// Time allowed for a graceful shutdown after SIGTERM/SIGINT.
    #[arg(long, env = "CHAT_SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "20s")]
    pub shutdown_grace: Duration,
    /// Clients closed per second during shutdown, so they do not all reconnect at once.
    #[arg(long, env = "CHAT_SHUTDOWN_CLOSE_RATE", default_value_t = 2000)]
    pub shutdown_close_rate: u32,
    #[command(flatten)]
    pub server: chat_server::binary::ServerFlags,
}

impl Config {
    /// Checks what clap cannot: ranges and combinations. The message is one line.
    pub fn validate(&self) -> Result<(), chat_server::InvalidConfig> {
        self.problem().map_err(chat_server::InvalidConfig)
    }

    fn problem(&self) -> Result<(), String> {
        let auth_modes = usize::from(self.jwt_secret.is_some())
            + usize::from(self.jwt_public_key_file.is_some())
            + usize::from(self.insecure_dev_auth);
        if auth_modes != 1 {
            return Err(
                "choose exactly one of --jwt-secret, --jwt-public-key-file, --insecure-dev-auth"
                    .into(),
            );
        }
        if self.jwt_secret.as_deref().is_some_and(|s| s.len() < 16) {
            return Err("--jwt-secret must be at least 16 bytes".into());
        }
        if self.node_id > common::id::MAX_NODE_ID {
            return Err(format!(
                "--node-id {} is above {}",
                self.node_id,
                common::id::MAX_NODE_ID
            ));
        }
        for (name, v) in [
            ("--outbound-queue", self.outbound_queue),
            ("--outbound-queue-bytes", self.outbound_queue_bytes),
            ("--room-inbox", self.room_inbox),
            ("--max-rooms-per-connection", self.max_rooms_per_connection),
            ("--store-batch", self.store_batch),
            ("--max-pending-per-room", self.max_pending_per_room),
            ("--dedupe-max-per-room", self.dedupe_max_per_room),
            ("--memory-history-per-room", self.memory_history_per_room),
            ("--recent-per-room", self.recent_per_room),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.max_frame_bytes < 256 {
            return Err("--max-frame-bytes must be at least 256".into());
        }
        if self.max_body_bytes + 256 > self.max_frame_bytes {
            return Err(
                "--max-body-bytes must leave 256 bytes of --max-frame-bytes for the frame's fields"
                    .into(),
            );
        }
        if !(self.send_rate > 0.0 && self.send_burst >= 1.0) {
            return Err("--send-rate must be > 0 and --send-burst >= 1".into());
        }
        if self.ping_interval.is_zero() || self.ping_interval >= self.idle_timeout {
            return Err("--ping-interval must be > 0 and shorter than --idle-timeout".into());
        }
        if self.shutdown_close_rate == 0 {
            return Err("--shutdown-close-rate must be at least 1".into());
        }
        if self.store == StoreKind::Scylla {
            if self.cql_nodes.iter().all(|n| n.trim().is_empty()) {
                return Err("--cql-nodes is empty".into());
            }
            if !crate::store::scylla::valid_keyspace(&self.cql_keyspace) {
                return Err(format!(
                    "--cql-keyspace {:?} must be a letter then up to 47 letters, digits or '_'",
                    self.cql_keyspace
                ));
            }
            let r = self.cql_replication.trim();
            if !(r.starts_with('{')
                && r.ends_with('}')
                && r.contains("'class'")
                && !r.contains(';'))
            {
                return Err("--cql-replication must be a CQL map like {'class': 'SimpleStrategy', 'replication_factor': 1}".into());
            }
            if self.cql_bucket < Duration::from_secs(60) {
                return Err("--cql-bucket must be at least 1m".into());
            }
            if self.cql_max_inflight == 0 {
                return Err("--cql-max-inflight must be at least 1".into());
            }
        }
        if self.redis_url.is_some() {
            if self.membership_ttl < Duration::from_millis(300) {
                return Err("--membership-ttl must be at least 300ms".into());
            }
            if self.room_acquire_timeout.is_zero() {
                return Err("--room-acquire-timeout must be more than 0".into());
            }
            if self.redis_prefix.is_empty() || self.redis_prefix.contains(char::is_whitespace) {
                return Err("--redis-prefix must be non-empty, without spaces".into());
            }
        }
        if self.vnodes == 0 || self.vnodes > 10_000 {
            return Err("--vnodes must be 1..=10000".into());
        }
        if let Some(a) = &self.advertise {
            if a.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(format!("--advertise {a:?} must be host:port"));
            }
        }
        if self.admin_token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err("--admin-token must be at least 16 bytes".into());
        }
        if self.user_presence_ttl < Duration::from_secs(1) {
            return Err("--user-presence-ttl must be at least 1s".into());
        }
        if let Some(url) = &self.webhook_url {
            if Endpoint::parse(url).is_none() {
                return Err(format!(
                    "--webhook-url {url:?} must be http://host[:port]/path (no TLS: put a proxy in front for https)"
                ));
            }
            if self.webhook_secret.as_deref().is_none_or(|s| s.len() < 16) {
                return Err("--webhook-url needs --webhook-secret of at least 16 bytes".into());
            }
            if self.webhook_concurrency == 0 || self.webhook_max_attempts == 0 {
                return Err(
                    "--webhook-concurrency and --webhook-max-attempts must be at least 1".into(),
                );
            }
            if self.webhook_timeout.is_zero()
                || self.webhook_backoff.is_zero()
                || self.webhook_backoff > self.webhook_backoff_max
                || self.webhook_sweep.is_zero()
            {
                return Err("--webhook-timeout, --webhook-backoff and --webhook-sweep must be > 0, and --webhook-backoff at most --webhook-backoff-max".into());
            }
        }
        if self.store_batch > self.max_pending_per_room {
            return Err("--store-batch must not exceed --max-pending-per-room".into());
        }
        Ok(())
    }

    /// A config for tests and embedding: defaults, insecure dev auth, the embedded memory
    /// store, port 0.
    pub fn for_tests() -> Config {
        let mut c = Config::parse_from(["chat-node", "--insecure-dev-auth", "--store", "memory"]);
        c.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        // clap also reads CHAT_* from the environment, where the test command exports the
        // real servers' addresses: standalone unless a test opts into membership.
        c.redis_url = None;
        c.shutdown_grace = Duration::from_secs(5);
        c
    }
}

/// A `--webhook-url`: an `http://host[:port]/path` endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub uri: http::Uri,
}

impl Endpoint {
    pub fn parse(url: &str) -> Option<Endpoint> {
        let uri: http::Uri = url.parse().ok()?;
        (uri.scheme_str() == Some("http") && uri.host().is_some_and(|h| !h.is_empty()))
            .then_some(Endpoint { uri })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_combinations_do_not() {
        assert_eq!(Config::for_tests().validate(), Ok(()));
        let mut c = Config::for_tests();
        c.jwt_secret = Some("0123456789abcdef".into());
        assert!(c.validate().is_err(), "two auth modes");
        let mut c = Config::for_tests();
        c.node_id = 1024;
        assert!(c.validate().is_err());
        let mut c = Config::for_tests();
        c.outbound_queue = 0;
        assert!(c.validate().is_err());
        let mut c = Config::for_tests();
        c.max_body_bytes = c.max_frame_bytes;
        assert!(c.validate().is_err());
        let mut c = Config::for_tests();
        c.ping_interval = c.idle_timeout;
        assert!(c.validate().is_err());
        let mut c = Config::for_tests();
        c.admin_token = Some("short".into());
        assert!(c.validate().is_err(), "a guessable admin token");
    }

    #[test]
    fn a_webhook_needs_a_plain_http_url_and_a_secret() {
        let hooked = |url: &str, secret: Option<&str>| {
            let mut c = Config::for_tests();
            c.webhook_url = Some(url.into());
            c.webhook_secret = secret.map(str::to_owned);
            c.validate()
        };
        assert_eq!(
            hooked("http://127.0.0.1:8090/hook", Some("0123456789abcdef")),
            Ok(())
        );
        assert!(hooked("http://127.0.0.1:8090/hook", None).is_err());
        assert!(hooked("http://127.0.0.1:8090/hook", Some("short")).is_err());
        assert!(hooked("https://bots.example.com/hook", Some("0123456789abcdef")).is_err());
        assert!(hooked("bots.example.com/hook", Some("0123456789abcdef")).is_err());
        let mut c = Config::for_tests();
        c.webhook_url = Some("http://127.0.0.1:8090/hook".into());
        c.webhook_secret = Some("0123456789abcdef".into());
        c.webhook_backoff = Duration::from_secs(10);
        c.webhook_backoff_max = Duration::from_secs(1);
        assert!(c.validate().is_err(), "backoff above its max");
    }
}
