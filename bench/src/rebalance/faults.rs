//! Faults `rebalance` injects itself, on a schedule: pausing a process (`SIGSTOP`, then
//! `SIGCONT`) or cutting the network with the planner's own commands (a cut, then its
//! heal), K times, so one run gives K samples.
//!
//! This module owns the schedule, the thread that carries it out, and the promise that
//! every fault is undone: the paused process gets `SIGCONT` and the cut its heal when the
//! fault's time is up, and also, at once, when the [`FaultRunner`] is dropped (the run
//! ended early, failed, panicked, or was interrupted: `run` turns SIGINT and SIGTERM into
//! an early end). Only a SIGKILL of the bench itself can leave a fault in place. Undoing is
//! bounded: `kill` returns at once, a heal command is killed after its timeout.
//!
//! It knows nothing about members or rooms; the run attributes disruptions to faults by
//! time. Signals go through the `kill` program (the workspace forbids `unsafe`).

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{run_command, CommandOutcome};

/// What one fault does.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultAction {
    /// `SIGSTOP` the process, `SIGCONT` it at the end.
    Pause { pid: u32 },
    /// Run `cut` (`sh -c`) at the start, `heal` at the end.
    Cut { cut: String, heal: String },
}

impl FaultAction {
    pub fn kind(&self) -> &'static str {
        match self {
            FaultAction::Pause { .. } => "pause",
            FaultAction::Cut { .. } => "cut",
        }
    }

    /// What it acts on, for the report.
    pub fn target(&self) -> String {
        match self {
            FaultAction::Pause { pid } => format!("pid {pid}"),
            FaultAction::Cut { cut, heal } => format!("cut `{cut}`, heal `{heal}`"),
        }
    }
}

/// When and what: `repeat` faults of `length`, the first `first_at` after sending starts,
/// each `every` after the previous one's start.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPlan {
    pub action: FaultAction,
    pub first_at: Duration,
    pub every: Duration,
    pub repeat: u32,
    pub length: Duration,
    /// Bound of each cut or heal command.
    pub command_timeout: Duration,
}

impl FaultPlan {
    /// Each fault's start, after sending starts.
    pub fn starts(&self) -> impl Iterator<Item = Duration> + '_ {
        (0..self.repeat).map(|i| self.first_at + self.every * i)
    }

    /// When the last fault ends, after sending starts.
    pub fn end(&self) -> Duration {
        self.starts().last().unwrap_or(self.first_at) + self.length
    }
}

/// What one fault did, in ns since the run's base instant.
#[derive(Debug, Clone, Default)]
pub struct FaultRecord {
    pub index: u32,
    /// When the injection began (the `kill -STOP` or the cut command was started).
    pub started_ns: u64,
    /// When the injection had been done (the cut command returned).
    pub injected_ns: Option<u64>,
    /// When undoing began, and when it was done (`SIGCONT` sent, the heal returned): the
    /// fault's end, from which recovery is measured.
    pub restoring_ns: Option<u64>,
    pub restored_ns: Option<u64>,
    /// Undone before its time: the run ended or was interrupted.
    pub early: bool,
    pub inject_error: Option<String>,
    pub restore_error: Option<String>,
    /// The cut and heal commands' outcomes (`Cut` only).
    pub cut: Option<CommandOutcome>,
    pub heal: Option<CommandOutcome>,
}

/// The thread carrying out a [`FaultPlan`]. Dropping it undoes an open fault and waits for
/// that (bounded by the heal's timeout).
pub struct FaultRunner {
    cancel: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    records: Arc<Mutex<Vec<FaultRecord>>>,
}

impl FaultRunner {
    /// Starts the schedule; `start` is when sending starts, `base` the instant the records'
    /// ns count from.
    pub fn start(plan: FaultPlan, base: Instant, start: Instant) -> std::io::Result<FaultRunner> {
        let (tx, rx) = mpsc::channel();
        let records = Arc::new(Mutex::new(Vec::new()));
        let shared = records.clone();
        let thread = thread::Builder::new()
            .name("chat-bench-faults".into())
            .spawn(move || carry_out(&plan, base, start, &rx, &shared))?;
        Ok(FaultRunner {
            cancel: Some(tx),
            thread: Some(thread),
            records,
        })
    }

    /// What has happened so far.
    pub fn records(&self) -> Vec<FaultRecord> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every fault of the plan has run and been undone (or the runner was stopped).
    pub fn is_done(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the schedule (undoing an open fault at once) and returns the records.
    pub fn finish(mut self) -> Vec<FaultRecord> {
        self.stop();
        self.records()
    }

    fn stop(&mut self) {
        drop(self.cancel.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FaultRunner {
    fn drop(&mut self) {
        // Blocking, but bounded (a `kill`, or a heal with its timeout), and only on the way
        // out: leaving a process stopped or a link down would be worse than a short stall.
        self.stop();
    }
}

/// Sleeps until `t`; true if cancelled (the runner was stopped or dropped) first.
fn wait_until(cancel: &mpsc::Receiver<()>, t: Instant) -> bool {
    loop {
        let now = Instant::now();
        if now >= t {
            return false;
        }
        match cancel.recv_timeout(t - now) {
            Err(RecvTimeoutError::Timeout) => continue,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return true,
        }
    }
}

fn carry_out(
    plan: &FaultPlan,
    base: Instant,
    start: Instant,
    cancel: &mpsc::Receiver<()>,
    records: &Mutex<Vec<FaultRecord>>,
) {
    let ns = |t: Instant| u64::try_from(t.saturating_duration_since(base).as_nanos()).unwrap_or(0);
    let update = |i: usize, f: &dyn Fn(&mut FaultRecord)| {
        if let Some(r) = records.lock().unwrap_or_else(|e| e.into_inner()).get_mut(i) {
            f(r);
        }
    };
    for (i, at) in plan.starts().enumerate() {
        if wait_until(cancel, start + at) {
            return;
        }
        let began = Instant::now();
        records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(FaultRecord {
                index: i as u32,
                started_ns: ns(began),
                ..Default::default()
            });
        let (error, cut) = inject(&plan.action, plan.command_timeout);
        let injected = ns(Instant::now());
        update(i, &|r| {
            r.injected_ns = Some(injected);
            r.inject_error = error.clone();
            r.cut = cut.clone();
        });
        // Undo even when injecting failed: a cut that failed half way may have cut something.
        let early = wait_until(cancel, began + plan.length);
        let restoring = ns(Instant::now());
        let (error, heal) = restore(&plan.action, plan.command_timeout);
        let restored = ns(Instant::now());
        update(i, &|r| {
            r.restoring_ns = Some(restoring);
            r.restored_ns = Some(restored);
            r.restore_error = error.clone();
            r.heal = heal.clone();
            r.early = early;
        });
        if early {
            return;
        }
    }
}

/// Sends `signal` to `pid` with the `kill` program.
pub fn signal(pid: u32, signal: &str) -> Result<(), String> {
    let out = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("kill -{signal} {pid}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "kill -{signal} {pid}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn command_error(o: &CommandOutcome) -> Option<String> {
    (!o.ok()).then(|| match (&o.error, o.timed_out, o.exit_code) {
        (Some(e), _, _) => e.clone(),
        (None, true, _) => "timed out".into(),
        (None, false, code) => format!("exit {}", code.map_or("none".into(), |c| c.to_string())),
    })
}

fn inject(action: &FaultAction, timeout: Duration) -> (Option<String>, Option<CommandOutcome>) {
    match action {
        FaultAction::Pause { pid } => (signal(*pid, "STOP").err(), None),
        FaultAction::Cut { cut, .. } => {
            let o = run_command(cut, timeout);
            (command_error(&o), Some(o))
        }
    }
}

fn restore(action: &FaultAction, timeout: Duration) -> (Option<String>, Option<CommandOutcome>) {
    match action {
        FaultAction::Pause { pid } => (signal(*pid, "CONT").err(), None),
        FaultAction::Cut { heal, .. } => {
            let o = run_command(heal, timeout);
            (command_error(&o), Some(o))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    /// A child to pause, killed when dropped.
    struct Sleeper(Child);

    impl Sleeper {
        fn start() -> Sleeper {
            Sleeper(
                Command::new("sleep")
                    .arg("120")
                    .spawn()
                    .expect("spawn sleep"),
            )
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }

        /// The state letter of /proc/PID/stat (`T` stopped, `S` sleeping).
        fn state(&self) -> char {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
                .expect("read /proc/PID/stat");
            let after = stat.rsplit_once(") ").expect("stat format").1;
            after.chars().next().expect("state")
        }

        /// Polls (bounded) until the state is `want`.
        fn wait_state(&self, want: char) -> bool {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if self.state() == want {
                    return true;
                }
                thread::sleep(Duration::from_millis(10));
            }
            false
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn plan(action: FaultAction, repeat: u32, length_ms: u64) -> FaultPlan {
        FaultPlan {
            action,
            first_at: Duration::from_millis(50),
            every: Duration::from_millis(400),
            repeat,
            length: Duration::from_millis(length_ms),
            command_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn the_schedule_starts_every_period_and_ends_after_the_last() {
        let p = plan(FaultAction::Pause { pid: 1 }, 3, 100);
        let s: Vec<u64> = p.starts().map(|d| d.as_millis() as u64).collect();
        assert_eq!(s, [50, 450, 850]);
        assert_eq!(p.end(), Duration::from_millis(950));
    }

    #[test]
    fn a_paused_process_is_stopped_then_continued_each_time() {
        let child = Sleeper::start();
        let base = Instant::now();
        let runner = FaultRunner::start(
            plan(FaultAction::Pause { pid: child.pid() }, 2, 150),
            base,
            base,
        )
        .expect("start");
        assert!(child.wait_state('T'), "stopped during the first fault");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !runner.is_done() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(runner.is_done());
        let r = runner.finish();
        assert_eq!(r.len(), 2, "{r:?}");
        for f in &r {
            assert!(
                f.inject_error.is_none() && f.restore_error.is_none(),
                "{f:?}"
            );
            assert!(!f.early);
            let len = f.restoring_ns.expect("restored") - f.started_ns;
            assert!(len >= 150_000_000, "{f:?}");
        }
        // On schedule (start = base): 50 ms, then 400 ms later.
        assert!(
            r[0].started_ns >= 50_000_000 && r[1].started_ns >= 450_000_000,
            "{r:?}"
        );
        assert_eq!(child.state(), 'S', "running again");
    }

    #[test]
    fn dropping_the_runner_continues_a_paused_process_at_once() {
        let child = Sleeper::start();
        let base = Instant::now();
        let runner = FaultRunner::start(
            plan(FaultAction::Pause { pid: child.pid() }, 1, 60_000),
            base,
            base,
        )
        .expect("start");
        assert!(child.wait_state('T'));
        let t = Instant::now();
        let records = runner.records();
        drop(runner);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(child.wait_state('S'), "SIGCONT on drop");
        assert_eq!(records.len(), 1);
    }

    #[test]
    fn a_cut_is_healed_on_time_and_on_an_early_stop() {
        let dir = std::env::temp_dir().join(format!("chat-bench-faults-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let flag = dir.join("cut");
        let log = dir.join("log");
        let (f, l) = (flag.display(), log.display());
        let action = FaultAction::Cut {
            cut: format!("touch {f}; echo cut >>{l}"),
            heal: format!("rm {f}; echo heal >>{l}"),
        };
        let base = Instant::now();
        let runner = FaultRunner::start(plan(action.clone(), 2, 100), base, base).expect("start");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !runner.is_done() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let r = runner.finish();
        assert_eq!(r.len(), 2);
        assert!(r
            .iter()
            .all(|f| f.cut.as_ref().is_some_and(|o| o.ok())
                && f.heal.as_ref().is_some_and(|o| o.ok())));
        assert!(!flag.exists());
        assert_eq!(
            std::fs::read_to_string(&log).expect("log"),
            "cut\nheal\ncut\nheal\n"
        );

        // Stopped while cut: healed at once, and no further fault starts.
        std::fs::remove_file(&log).expect("rm log");
        let runner =
            FaultRunner::start(plan(action, 3, 60_000), base, Instant::now()).expect("start");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !flag.exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let r = runner.finish();
        assert!(!flag.exists(), "healed");
        assert_eq!(r.len(), 1);
        assert!(r[0].early);
        assert_eq!(std::fs::read_to_string(&log).expect("log"), "cut\nheal\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failing_cut_is_still_healed_and_reported() {
        let base = Instant::now();
        let action = FaultAction::Cut {
            cut: "exit 3".into(),
            heal: "true".into(),
        };
        let runner = FaultRunner::start(plan(action, 1, 10), base, base).expect("start");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !runner.is_done() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let r = runner.finish();
        assert_eq!(r[0].inject_error.as_deref(), Some("exit 3"));
        assert!(r[0].heal.as_ref().is_some_and(|o| o.ok()));
    }

    #[test]
    fn signalling_a_missing_process_is_an_error() {
        // A pid far above pid_max on Linux (4194304 at most).
        assert!(signal(999_999_999, "CONT").is_err());
    }
}
