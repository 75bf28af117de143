//! The `connections` and `churn` scenarios and the bench's JWT signing, run as the real
//! `chat-bench` binary against a real chat-node (real CQL store, real Redis). The checks are
//! on counts in the JSON reports, never on timings.

mod support;

use support::{run_bench, spawn_standalone_node, unique};

/// [`run_bench`] with the arguments written as one line (no value in it holds a space).
fn run_line(line: &str) -> (std::process::ExitStatus, serde_json::Value) {
    run_bench(&line.split_whitespace().collect::<Vec<_>>())
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn connections_over_two_processes_and_two_source_addresses() {
    let node = spawn_standalone_node(&["--insecure-dev-auth"]);
    let url = node.ws_url();
    let prefix = unique("conn");
    let chart = std::env::temp_dir().join(format!("{prefix}.svg"));
    let chart_arg = chart.to_str().expect("utf-8 temp path");
    let (status, r) = run_line(&format!(
        "connections --chart {chart_arg} --url {url} --connections 300 --rate 600 --members 10 \
         --hold 1 --settle 0.5 --processes 2 --source-addresses 2 --room-prefix {prefix}"
    ));
    assert!(status.success(), "{status}: {r:#}");
    assert_eq!(u(&r["attempted"]), 300, "{r:#}");
    assert_eq!(u(&r["joined"]), 300, "{r:#}");
    assert_eq!(u(&r["failed"]), 0, "{r:#}");
    assert_eq!(r["failures"], serde_json::json!({}), "{r:#}");
    assert_eq!(r["server_closes"], serde_json::json!({}), "{r:#}");
    assert_eq!(u(&r["closed_cleanly"]), 300, "{r:#}");
    assert_eq!(u(&r["connect_latency_us"]["count"]), 300, "{r:#}");
    // Both workers' counts are in the merged figures.
    let workers = r["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2, "{r:#}");
    for w in workers {
        assert_eq!(u(&w["joined"]), 150, "{r:#}");
    }
    assert_eq!(
        r["source_addresses"],
        serde_json::json!(["127.0.0.1", "127.0.0.2"])
    );
    // The node saw them all at once, and its memory grew.
    assert_eq!(
        r["servers"][0]["connections_loaded"].as_f64(),
        Some(300.0),
        "{r:#}"
    );
    let per_conn = r["rss_per_connection_bytes"]
        .as_f64()
        .unwrap_or_else(|| panic!("memory per connection missing: {r:#}"));
    assert!(per_conn > 0.0, "{r:#}");
    assert!(r["load_average"].is_string(), "{r:#}");
    // The timeline, merged from both workers, covers the ramp and the hold: every connect
    // is in it, and it ends with all 300 open.
    let t = r["timeline"].as_array().expect("timeline");
    assert!(t.len() >= 2, "ramp (0.5 s) and hold (1 s): {r:#}");
    assert_eq!(
        t.iter().map(|p| u(&p["connects"])).sum::<u64>(),
        300,
        "{r:#}"
    );
    assert_eq!(u(&t[t.len() - 1]["connections_open"]), 300, "{r:#}");
    assert!(t.iter().any(|p| u(&p["connect_p99_us"]) > 0), "{r:#}");
    let svg = std::fs::read_to_string(&chart).expect("--chart wrote the SVG");
    let _ = std::fs::remove_file(&chart);
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 6, "{svg}");
}

#[test]
fn churn_reconnects_and_acks_with_no_unexpected_closes() {
    let node = spawn_standalone_node(&["--insecure-dev-auth"]);
    let url = node.ws_url();
    let prefix = unique("churn");
    let (status, r) = run_line(&format!(
        "churn --url {url} --connections 20 --rate 20 --duration 3 --rooms 4 --send \
         --settle 0.5 --room-prefix {prefix}"
    ));
    assert!(status.success(), "{status}: {r:#}");
    // Every slot connected at least once and most reconnected.
    assert!(u(&r["connects"]) > 20, "{r:#}");
    assert!(u(&r["disconnects"]) > 0, "{r:#}");
    assert_eq!(r["join_failures"], serde_json::json!({}), "{r:#}");
    assert_eq!(r["server_closes"], serde_json::json!({}), "{r:#}");
    assert_eq!(r["errors"], serde_json::json!({}), "{r:#}");
    // One acked send per session, stored by the real CQL store.
    assert_eq!(u(&r["sends"]), u(&r["connects"]), "{r:#}");
    assert_eq!(u(&r["acks"]), u(&r["sends"]), "{r:#}");
    assert_eq!(u(&r["close_unanswered"]), 0, "{r:#}");
    assert!(!r["timeline"].as_array().expect("timeline").is_empty());
}

#[test]
fn jwt_signed_connections_are_accepted_and_a_wrong_secret_is_reported() {
    const SECRET: &str = "bench-test-secret-0123456789";
    let node = spawn_standalone_node(&["--jwt-secret", SECRET]);
    let url = node.ws_url();
    let good = unique("jwt");
    let (status, r) = run_line(&format!(
        "connections --url {url} --connections 40 --rate 200 --hold 0.5 --settle 0 \
         --jwt-secret {SECRET} --room-prefix {good}"
    ));
    assert!(status.success(), "{status}: {r:#}");
    assert_eq!(u(&r["joined"]), 40, "{r:#}");
    assert_eq!(r["auth"], "JWT HS256 (token=)");

    // A wrong secret, and no token at all (dev auth's user=): both refused with 401.
    let bad = unique("jwt-bad");
    for auth in [&["--jwt-secret", "not-the-secret"][..], &[][..]] {
        let line = format!(
            "connections --url {url} --connections 10 --rate 200 --hold 0 --settle 0 \
             --room-prefix {bad}"
        );
        let mut args: Vec<&str> = line.split_whitespace().collect();
        args.extend_from_slice(auth);
        let (status, r) = run_bench(&args);
        assert_eq!(status.code(), Some(1), "{auth:?}: {r:#}");
        assert_eq!(u(&r["joined"]), 0, "{auth:?}: {r:#}");
        assert_eq!(u(&r["failed"]), 10, "{auth:?}: {r:#}");
        let failures = r["failures"].as_object().expect("failures");
        assert!(
            failures.keys().all(|k| k.contains("401")),
            "{auth:?}: failures must name the refusal: {r:#}"
        );
        assert!(
            r["notes"].to_string().contains("--max-connect-failures"),
            "{r:#}"
        );
    }
}

#[test]
fn bad_plans_exit_64_naming_the_flag() {
    for (args, flag) in [
        (
            vec![
                "connections",
                "--connections",
                "40000",
                "--source-addresses",
                "2",
            ],
            "--processes",
        ),
        (
            vec!["connections", "--connections", "40000", "--processes", "3"],
            "--source-addresses",
        ),
        (
            vec![
                "connections",
                "--url",
                "ws://10.1.2.3:7001",
                "--source-addresses",
                "2",
            ],
            "--source-addresses",
        ),
        (vec!["churn", "--rate", "0"], "--rate"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chat-bench"))
            .args(&args)
            .output()
            .expect("run chat-bench");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?}: {err}");
    }
}
