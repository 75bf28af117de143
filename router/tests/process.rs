//! The `chat-router` binary as an operator runs it: exit status 64 and one line on a bad
//! config; SIGTERM ends it cleanly with status 0.

mod support;

use std::process::Command;

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_chat-router");

#[test]
fn a_bad_config_exits_64_with_one_line() {
    support::process::assert_bad_config_exits_64(
        BIN,
        "chat-router",
        &[
            &["--vnodes", "0"],
            &["--membership-ttl", "soon"],
            &["--redis-url", "http://127.0.0.1:6390"],
            &["--upstream-timeout", "0s"],
            &["--listen-backlog", "70000"],
            &["--no-such-flag"],
        ],
    );
}

#[tokio::test]
async fn sigterm_stops_the_router_with_status_0() {
    let prefix = unique("t-router");
    let mut cmd = Command::new(BIN);
    cmd.args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--redis-url", &redis_url(), "--redis-prefix", &prefix])
        .args(["--shutdown-grace", "1s"]);
    let router = tokio::task::spawn_blocking(move || Proc::spawn(&mut cmd, "chat-router"))
        .await
        .expect("read the log");
    let addr = router.addr;
    assert_eq!(http(addr, "GET", "/healthz", None).await.status, 200);
    let r = http(addr, "GET", "/readyz", None).await;
    assert_eq!(r.status, 503, "no node registered: {}", r.body);

    router.signal("TERM");
    assert_eq!(router.exit_code().await, Some(0));
}
