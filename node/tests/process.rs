//! The `chat-node` binary as an operator runs it: exit status 64 on bad config, RS256
//! tokens, and SIGTERM closing clients with 1001 before a clean exit.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_chat-node");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

#[test]
fn a_bad_config_exits_64_with_one_line() {
    for args in [
        vec!["--insecure-dev-auth", "--node-id", "5000"],
        vec!["--insecure-dev-auth", "--ping-interval", "soon"],
        vec!["--no-such-flag"],
        vec![],
        vec!["--jwt-public-key-file", "/nonexistent/key.pem"],
        vec!["--insecure-dev-auth", "--listen-backlog", "0"],
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .output()
            .expect("run chat-node");
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("chat-node: "), "{stderr}");
    }
}

/// Starts the binary on port 0 against the real CQL store and reads the bound address from
/// its log.
async fn spawn_node(extra: &[&str]) -> (std::process::Child, SocketAddr) {
    spawn_node_with(Command::new(BIN), extra).await
}

/// [`spawn_node`] with the command to run (say, a shell that lowers a limit first).
async fn spawn_node_with(
    mut command: Command,
    extra: &[&str],
) -> (std::process::Child, SocketAddr) {
    fresh_keyspace().await;
    let mut child = command
        // Standalone: these tests are about one process, not membership.
        .env_remove("CHAT_REDIS_URL")
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args([
            "--cql-nodes",
            &cql_nodes().join(","),
            "--cql-keyspace",
            &keyspace(),
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn chat-node");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("node logs before exiting")
            .expect("log line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json log");
        if let Some(addr) = v["fields"]["addr"].as_str() {
            break addr.parse().expect("addr");
        }
    };
    // Keep draining the log so the node never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_0() {
    let (mut child, addr) = spawn_node(&["--insecure-dev-auth"]).await;
    let mut c = Client::connect(addr, "/ws?room=term&user=alice")
        .await
        .expect("connect");
    c.expect_joined().await;
    c.send_text("term", "t1", "before SIGTERM").await;
    c.ack().await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    assert_eq!(c.closed().await, 1001);
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test]
async fn rs256_tokens_are_verified_with_the_public_key() {
    let public = format!("{FIXTURES}/rs256-test-public.pem");
    let (mut child, addr) = spawn_node(&["--jwt-public-key-file", &public]).await;
    let private = std::fs::read(format!("{FIXTURES}/rs256-test-private.pem")).expect("fixture");
    let key = EncodingKey::from_rsa_pem(&private).expect("rsa key");
    let exp = common::id::now_ms() / 1000 + 600;
    let token = encode(
        &Header::new(Algorithm::RS256),
        &serde_json::json!({"sub": "rsa-user", "exp": exp}),
        &key,
    )
    .expect("sign");
    let mut c = Client::connect(addr, &format!("/ws?room=rsa&token={token}"))
        .await
        .expect("valid RS256 token");
    c.expect_joined().await;
    c.send_text("rsa", "r1", "signed").await;
    let m = c.message().await;
    assert_eq!(m.from.as_str(), "rsa-user");
    // An HS256 token is refused by an RS256 node.
    let hs = encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": "x", "exp": exp}),
        &EncodingKey::from_secret(b"0123456789abcdef0123"),
    )
    .expect("sign");
    let Err((status, body)) = Client::connect(addr, &format!("/ws?room=rsa&token={hs}")).await
    else {
        panic!("HS256 token accepted by an RS256 node");
    };
    assert_eq!(status, 401, "{body}");
    child.kill().expect("kill");
    let _ = child.wait();
}

/// The accept queue of a listening socket, as `ss` reports it (its `Send-Q` column).
fn listen_backlog_of(port: u16) -> u32 {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .expect("run ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no listening socket on port {port} in `ss` output: {text:?}"))
}

#[tokio::test]
async fn the_listen_backlog_flag_sizes_the_accept_queue() {
    let (mut child, addr) = spawn_node(&["--insecure-dev-auth", "--listen-backlog", "123"]).await;
    let backlog = listen_backlog_of(addr.port());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(backlog, 123);
}

/// With the default `--max-connections`, a node under an open-file limit of 400 takes 144
/// WebSockets (400 less a reserve of 256) and answers the rest 503 `overloaded`, while its
/// health, readiness and metrics still answer. (The default was 100,000: at the fd limit,
/// upgrades went unanswered and `/healthz` timed out.)
#[tokio::test]
async fn a_full_node_refuses_upgrades_and_still_answers_its_probes() {
    let mut sh = Command::new("sh");
    sh.args(["-c", &format!("ulimit -n 400 && exec {BIN} \"$@\""), "sh"]);
    let (child, addr) = spawn_node_with(sh, &["--insecure-dev-auth"]).await;
    let _child = KillOnDrop(child);
    let mut open = Vec::new();
    let mut refused = 0;
    for i in 0..170 {
        match Client::connect(addr, &format!("/ws?room=full-{}&user=u{i}", i % 7)).await {
            Ok(mut c) => {
                c.expect_joined().await;
                open.push(c);
            }
            Err((status, _)) => {
                assert_eq!(status, 503);
                refused += 1;
            }
        }
    }
    // The refusal's body, from a raw upgrade request.
    let answer = raw_json_answer(
        addr,
        b"GET /ws?room=full-0&user=late HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#""code":"overloaded""#), "{answer}");
    assert_eq!((open.len(), refused), (144, 26));
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, body) = http(addr, "GET", path, None).await;
        assert_eq!(status, 200, "{path} while full: {body:.200}");
    }
    // A freed slot is taken again.
    drop(open.pop());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut again = Client::connect(addr, "/ws?room=full-0&user=later")
        .await
        .expect("a freed slot is taken");
    again.expect_joined().await;
}

/// Kills the child when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
