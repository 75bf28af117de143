//! `rebalance` against real processes: a router, chat-nodes, the real Redis and CQL
//! server. A node killed with SIGKILL, a fourth node joining, and no change at all: in each
//! case the report must show nothing acked lost, no cid stored twice, no gap, and every
//! disrupted client resumed. A node paused with `--pause-pid`: the bench moves its clients
//! off it, continues it, and judges the run by the CQL store.

mod support;

use chat_bench::harness::Outcome as _;
use chat_bench::rebalance::RebalanceArgs;
use support::*;

const ROOMS: usize = 9;

fn args(url: &str, room_prefix: &str, extra: &[&str]) -> RebalanceArgs {
    let line = format!(
        "--url {url} --rooms {ROOMS} --members 3 --rate 4 --duration 8 --command-at 2 \
         --drain 30 --quiet --room-prefix {room_prefix}"
    );
    parse_line(&line, extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_node_loses_nothing_acked_and_every_client_resumes() {
    let c = TestCluster::start("kill9", 3).await;
    // Rooms chosen so that node 2, the victim, owns at least one.
    let prefix = prefix_with_a_room_on("rb-kill9", ROOMS, &[1, 2, 3], 2);
    let on_victim = (0..ROOMS)
        .filter(|r| owner_in_ring(&[1, 2, 3], &format!("{prefix}-{r}")) == 2)
        .count() as u64;
    assert_eq!(
        c.owner(&format!("{prefix}-0")).await,
        owner_in_ring(&[1, 2, 3], &format!("{prefix}-0")),
        "the router's ring is the one the test computed"
    );
    let victim = c.nodes[&2].pid();
    let cmd = format!("kill -9 {victim}");
    let r = chat_bench::rebalance::run(
        args(&c.url(), &prefix, &["--command", &cmd]),
        "test kill9".into(),
    )
    .await
    .expect("run");
    let md = r.to_markdown();
    // A node killed after delivering a message and before storing it (it delivers first
    // and persists in the background) leaves its members holding an id the store never
    // got; the sender resends the cid and it is stored once, under a new id. Only the
    // victim may have minted such ids.
    assert_guarantees_after_losing(&r, Some(2));
    let x = r.external_command.as_ref().expect("command ran");
    assert_eq!(x.exit_code, Some(0), "{md}");
    // Every member (3 per room) of the victim's rooms was cut off, and only those.
    assert_eq!(r.disruption.clients_disconnected, on_victim * 3, "{md}");
    assert_eq!(r.disruption.disconnections_before_command, 0, "{md}");
    assert!(r.disruption.command_to_all_resumed_s.is_some(), "{md}");
    assert!(r.disruption.resume_us.count > 0, "{md}");
    // The timeline covers the run from the first send through the drain, starts with
    // everyone joined, shows the victim's members gone after the kill, and adds up to the
    // report's totals.
    let t = &r.timeline;
    let json = r.to_json();
    let total = (ROOMS * 3) as u64;
    assert!(t.len() >= 8, "the 8 s of sending at least: {json}");
    assert_eq!(t[0].members_joined, total, "{json}");
    assert!(
        t.iter()
            .any(|p| p.t_s + 1.0 > x.started_at_s && p.members_joined < total),
        "no second after the kill shows members missing: {json}"
    );
    let sum = |f: fn(&chat_bench::rebalance::RebalancePoint) -> u64| t.iter().map(f).sum::<u64>();
    assert_eq!(
        sum(|p| p.disconnections),
        r.disruption.disconnections,
        "{json}"
    );
    assert_eq!(sum(|p| p.resumes), r.disruption.disconnections, "{json}");
    assert!(sum(|p| p.acks) > 0, "{json}");
    assert_eq!(t.last().map(|p| p.members_joined), Some(total), "{json}");
    let svg = r.chart();
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("--command") && svg.contains(&cmd), "{svg}");
    println!("{md}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_joining_moves_rooms_and_loses_nothing_acked() {
    let c = TestCluster::start("join", 3).await;
    // Rooms chosen so that the fourth node takes at least one.
    let prefix = prefix_with_a_room_on("rb-join", ROOMS, &[1, 2, 3, 4], 4);
    let dir = std::env::temp_dir().join(unique("rb-join"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let pidfile = dir.join("node4.pid");
    let log = dir.join("node4.log");
    let argv: Vec<String> = c.node_argv(4).iter().map(|a| sh_quote(a)).collect();
    let cmd = format!(
        "{} >{} 2>&1 & echo $! >{}",
        argv.join(" "),
        sh_quote(&log.display().to_string()),
        sh_quote(&pidfile.display().to_string())
    );
    let run = chat_bench::rebalance::run(
        args(&c.url(), &prefix, &["--command", &cmd]),
        "test join".into(),
    )
    .await;
    // Kill the fourth node whatever happened.
    let pid = std::fs::read_to_string(&pidfile).unwrap_or_default();
    let pid = pid.trim();
    if !pid.is_empty() {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", pid])
            .status();
    }
    let r = run.expect("run");
    let md = r.to_markdown();
    assert!(!pid.is_empty(), "the command wrote the node's pid: {md}");
    assert_rebalance_guarantees(&r);
    assert!(r.external_command.as_ref().is_some_and(|x| x.ok()), "{md}");
    // The fourth node took at least one room: its clients were moved.
    assert!(r.disruption.clients_disconnected >= 3, "{md}");
    assert!(
        r.disruption.closes.keys().any(|k| k.starts_with("4001")),
        "moved clients were closed with room_moved: {md}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    println!("{md}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_command_nothing_is_disrupted() {
    let c = TestCluster::start("plain", 3).await;
    let prefix = unique("rb-plain");
    let r =
        chat_bench::rebalance::run(args(&c.url(), &prefix, &["--duration", "4"]), "test".into())
            .await
            .expect("run");
    let md = r.to_markdown();
    assert_rebalance_guarantees(&r);
    assert!(r.external_command.is_none());
    assert_eq!(r.disruption.clients_disconnected, 0, "{md}");
    assert_eq!(r.disruption.disconnections, 0, "{md}");
    assert!(r.disruption.closes.is_empty(), "{md}");
    assert_eq!(r.sends.resends, 0, "{md}");
    // 27 members × 4/s × 4 s, give or take a tick at either end.
    assert!((400..=460).contains(&r.sends.sent), "{md}");
    assert_eq!(r.sends.acked, r.sends.sent, "{md}");
    assert_eq!(r.read_back.history_rows, r.sends.sent, "{md}");
    assert_eq!(r.correctness.stored_messages, r.sends.sent, "{md}");
    assert_eq!(r.disruption.stalled_reconnects, 0, "{md}");
}

/// The state letter of /proc/PID/stat (`T` when stopped).
fn proc_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let after = stat.rsplit_once(") ").expect("stat format").1;
    after.chars().next().expect("state")
}

/// `--pause-pid` SIGSTOPs node 2 for 5 s: the members of its rooms hear nothing while their
/// sends wait, drop their sockets after `--dead-after` and move to the interim owner
/// through the router; the node is continued on time; the run is judged by CQL, and the
/// guarantees hold: the resumed node is fenced before it touches what was queued on it
/// (before fencing, the store showed stored_twice and gaps here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_is_fenced_and_its_clients_move_off_it() {
    let c = TestCluster::start("pause", 2).await;
    let prefix = prefix_with_a_room_on("rb-pause", ROOMS, &[1, 2], 2);
    let on_victim = (0..ROOMS)
        .filter(|r| owner_in_ring(&[1, 2], &format!("{prefix}-{r}")) == 2)
        .count() as u64;
    let pid = c.nodes[&2].pid();
    let victim = pid.to_string();
    let r = chat_bench::rebalance::run(
        args(
            &c.url(),
            &prefix,
            &[
                "--pause-pid",
                &victim,
                "--pause-secs",
                "5",
                "--dead-after",
                "2",
                "--fault-at",
                "2",
                "--duration",
                "10",
                "--cql-nodes",
                &cql_nodes(),
                "--cql-keyspace",
                KEYSPACE,
            ],
        ),
        "test pause".into(),
    )
    .await
    .expect("run");
    let md = r.to_markdown();
    assert_ne!(proc_state(pid), 'T', "the node was continued: {md}");
    let [f] = r.faults.as_slice() else {
        panic!("one fault: {md}")
    };
    assert!(
        f.inject_error.is_none() && f.restore_error.is_none(),
        "{md}"
    );
    assert!(!f.early, "{md}");
    let ended = f.ended_at_s.expect("continued");
    assert!((5.0..6.5).contains(&(ended - f.started_at_s)), "{md}");
    // Only members of the paused node's rooms went silent, and they moved.
    let d = &r.disruption;
    assert!(d.stalled_reconnects > 0, "{md}");
    assert!(d.clients_stalled <= on_victim * 3, "{md}");
    assert_eq!(f.stalled_reconnects, d.stalled_reconnects, "{md}");
    assert!(f.clients_cut_off >= d.clients_stalled, "{md}");
    assert_eq!(d.disconnections_before_command, 0, "{md}");
    assert!(f.end_to_all_resumed_s.is_some(), "{md}");
    assert!(r.drained && d.all_resumed, "{md}");
    // Judged by what the store holds.
    assert_eq!(r.correctness.judged_by, "cql", "{md}");
    assert!(r.store_error().is_none(), "{md}");
    assert_eq!(
        r.read_back.cql_rows,
        Some(r.correctness.stored_messages),
        "{md}"
    );
    let stalled: u64 = r.timeline.iter().map(|p| p.stalled_reconnects).sum();
    assert_eq!(stalled, d.stalled_reconnects, "{md}");
    assert!(r.chart().contains("pause 1"));
    // And the guarantees held: the paused node was fenced when it ran again, so nothing it
    // had queued was stored, and the interim owner's messages reached everyone.
    assert_guarantees_after_losing(&r, Some(2));
    println!("{md}");
}
