//! Test harness: an in-process node on port 0 and a small WebSocket/HTTP client that
//! talks to it over real sockets. No fixed ports, no sleeps for readiness.
#![allow(dead_code)]

pub mod client;
pub mod cluster;
pub mod faulty;
pub mod process;
pub mod receiver;

pub use client::*;
pub use process::Proc;

use std::net::SocketAddr;

pub use chat_node::config::Config;

/// The real CQL server's contact points, from `CHAT_CQL_NODES` (set by
/// `deploy/local/test.sh`). Missing means the suite was started the wrong way: fail loudly.
pub fn cql_nodes() -> Vec<String> {
    match std::env::var("CHAT_CQL_NODES") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|s| s.trim().to_string()).collect(),
        _ => panic!(
            "CHAT_CQL_NODES is not set: this test needs the real CQL server. \
             Run the suite with deploy/local/test.sh, which starts it."
        ),
    }
}

/// This test binary's keyspace. Rooms are distinct per test within a binary; the keyspace
/// is dropped once per run so a re-run starts empty.
pub fn keyspace() -> String {
    format!("t_{}", env!("CARGO_CRATE_NAME"))
}

/// A node config on the real CQL store, with test defaults (dev auth, port 0).
pub fn config() -> Config {
    let mut c = Config::for_tests();
    c.store = chat_node::config::StoreKind::Scylla;
    c.cql_nodes = cql_nodes();
    c.cql_keyspace = keyspace();
    c
}

/// [`config`] with a send budget of `rate` frames a second and `burst` at once.
pub fn config_with_rate(rate: f64, burst: f64) -> Config {
    let mut c = config();
    c.send_rate = rate;
    c.send_burst = burst;
    c
}

/// A send rate or burst no test reaches, for tests about something else.
pub const NO_LIMIT: f64 = 100_000.0;

/// The flags every chat-node process in a test gets: a JSON log (for [`Proc::spawn`]) and
/// this binary's keyspace of the real CQL server.
pub fn node_flags() -> [String; 6] {
    [
        "--log-format".into(),
        "json".into(),
        "--cql-nodes".into(),
        cql_nodes().join(","),
        "--cql-keyspace".into(),
        keyspace(),
    ]
}

/// The chat-node binary with [`node_flags`]; the caller adds the rest.
pub fn node_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_chat-node"));
    cmd.args(node_flags());
    cmd
}

static FRESH_KEYSPACE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// Drops this binary's keyspace once per process, before the first node uses it.
pub async fn fresh_keyspace() {
    FRESH_KEYSPACE
        .get_or_init(|| async {
            let session = scylla::client::session_builder::SessionBuilder::new()
                .known_nodes(cql_nodes())
                .build()
                .await
                .expect("connect to the CQL server named by CHAT_CQL_NODES");
            session
                .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", keyspace()), ())
                .await
                .expect("drop the test keyspace");
        })
        .await;
}

/// A node running in this process on port 0.
pub type TestNode = Served;

impl Served {
    /// Starts a node with `config` (on a fresh keyspace when it uses the CQL store).
    pub async fn start(config: Config) -> TestNode {
        if config.store == chat_node::config::StoreKind::Scylla {
            fresh_keyspace().await;
        }
        Served::spawn(|listener, shutdown| chat_node::run(config, listener, shutdown)).await
    }

    /// Starts a node with `config` on `store` instead of the one `config` names.
    pub async fn start_on(
        config: Config,
        store: std::sync::Arc<dyn chat_node::store::MessageStore>,
    ) -> TestNode {
        Served::spawn(|listener, shutdown| {
            chat_node::run_with_store(config, listener, shutdown, store)
        })
        .await
    }

    pub async fn connect(&self, room: &str, user: &str) -> Client {
        Client::connect(self.addr, &format!("/ws?room={room}&user={user}"))
            .await
            .expect("connect")
    }

    /// [`TestNode::connect`], and its `joined` read.
    pub async fn joined(&self, room: &str, user: &str) -> Client {
        Client::joined(self.addr, room, user).await
    }
}

/// A minimal HTTP/1.1 request over a fresh connection; returns status and body.
/// ([`request`] takes headers and returns the answer's head too.)
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let a = request(addr, method, path, body, &[]).await;
    (a.status, a.body)
}

/// `GET path` over [`http`].
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, None).await
}

/// `POST path` with `body` over [`http`].
pub async fn http_post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    http(addr, "POST", path, Some(body)).await
}

/// The `messages` of a history page (`GET /v1/rooms/{room}/messages`).
pub fn messages_of(page: &serde_json::Value) -> &[serde_json::Value] {
    page["messages"].as_array().expect("messages")
}

/// Field `key` (a string: `cid`, `id`, `body`, …) of each message of a history page.
pub fn message_fields(page: &serde_json::Value, key: &str) -> Vec<String> {
    messages_of(page)
        .iter()
        .map(|m| {
            m[key]
                .as_str()
                .unwrap_or_else(|| panic!("a message without {key}: {m}"))
                .to_string()
        })
        .collect()
}

/// The ids of the messages of a history page.
pub fn message_ids(page: &serde_json::Value) -> Vec<common::MessageId> {
    message_fields(page, "id")
        .iter()
        .map(|id| id.parse().expect("a message id"))
        .collect()
}

/// A room's stored messages, oldest first, read back over the history API (at most 1000),
/// or the status and body of a refusal (a room between owners, say).
pub async fn stored_messages(
    addr: SocketAddr,
    room: &str,
) -> Result<Vec<serde_json::Value>, (u16, String)> {
    let path = format!("/v1/rooms/{room}/messages?user=reader&limit=1000");
    let (status, body) = http_get(addr, &path).await;
    if status != 200 {
        return Err((status, body));
    }
    Ok(messages_of(&json(&body)).to_vec())
}
