//! The `chat-router` binary as an operator runs it: exit status 64 and one line on a bad
//! config; SIGTERM ends it cleanly with status 0.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_chat-router");

#[test]
fn a_bad_config_exits_64_with_one_line() {
    for args in [
        vec!["--vnodes", "0"],
        vec!["--membership-ttl", "soon"],
        vec!["--redis-url", "http://127.0.0.1:6390"],
        vec!["--upstream-timeout", "0s"],
        vec!["--listen-backlog", "70000"],
        vec!["--no-such-flag"],
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .output()
            .expect("run chat-router");
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("chat-router: "), "{stderr}");
    }
}

/// A process killed when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn sigterm_stops_the_router_with_status_0() {
    let prefix = unique("t-router");
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--redis-url", &redis_url(), "--redis-prefix", &prefix])
        .args(["--shutdown-grace", "1s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn chat-router");
    let stdout = child.stdout.take().expect("stdout");
    let proc = Proc(child);
    let addr: SocketAddr = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("router logs before exiting")
                .expect("log line");
            let v: serde_json::Value = serde_json::from_str(&line).expect("json log");
            if let Some(addr) = v["fields"]["addr"].as_str() {
                break addr.parse().expect("addr");
            }
        };
        std::thread::spawn(move || for _ in lines {});
        addr
    })
    .await
    .expect("read the log");
    assert_eq!(http(addr, "GET", "/healthz", None).await.status, 200);
    let r = http(addr, "GET", "/readyz", None).await;
    assert_eq!(r.status, 503, "no node registered: {}", r.body);

    let status = Command::new("kill")
        .args(["-TERM", &proc.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut proc = proc;
    let exit = tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || {
            let code = proc.0.wait().map(|s| s.code());
            (proc, code)
        }),
    )
    .await
    .expect("the router exits within the wait")
    .expect("join");
    assert_eq!(exit.1.expect("wait"), Some(0));
}
