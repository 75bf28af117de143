//! The one scenario harness: the pieces every scenario's run has in common, so that a
//! scenario module states only what is its own (its flags and their checks, its clients,
//! its accounting, its report's fields and their rendering, and its run as named steps).
//!
//! It owns the run's frame: resolving `--url` and the credentials into the errors `main`
//! maps to exit 64 ([`target`], [`auth`]), raising the open-file limit
//! ([`raise_open_files`]), the facts every report starts with ([`RunFacts`]), the bench's
//! own CPU over a window ([`CpuMeter`]), the once-a-second progress line ([`Progress`]),
//! waiting with a deadline ([`wait_until`], [`within`]), stopping tasks within a grace
//! period ([`collect`]), and writing a finished report ([`Outcome`], [`emit`]): Markdown on
//! stdout, and the JSON, Markdown and SVG files asked for, then the report's verdict as the
//! exit status. A scenario supplies its report as an [`Outcome`]: its Markdown, its chart if
//! it draws one, and its verdict if a report can fail the run. The harness measures nothing
//! about the cluster and connects nowhere itself.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::{Auth, AuthArgs};
use crate::client::Target;
use crate::machine;
use crate::BenchError;

/// A finished run's report: both renderings, its chart if it has one, and whether what it
/// says makes the run fail (exit status 1, after the report is written).
pub trait Outcome: Serialize {
    fn to_markdown(&self) -> String;

    fn to_json(&self) -> String {
        // Only strings, numbers, options and string-keyed maps: serialization cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The SVG chart (`--chart`), for scenarios that draw one.
    fn svg(&self) -> Option<String> {
        None
    }

    /// `Err` when the report shows a failed run.
    fn verdict(&self) -> Result<(), BenchError> {
        Ok(())
    }
}

/// What every report starts with: which scenario, the command line that ran it, the
/// revision and the machine's cores (flattened into the report's JSON).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunFacts {
    pub scenario: String,
    pub command: String,
    pub git_rev: String,
    pub nproc: usize,
}

impl RunFacts {
    pub fn new(scenario: &str, command: String) -> RunFacts {
        RunFacts {
            scenario: scenario.into(),
            command,
            git_rev: machine::git_rev(),
            nproc: machine::nproc(),
        }
    }
}

/// The files a run writes besides the Markdown it prints (`--json`, `--markdown`, `--chart`).
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    pub json: Option<PathBuf>,
    pub markdown: Option<PathBuf>,
    pub chart: Option<PathBuf>,
}

/// Prints the Markdown on stdout, writes the files asked for (the chart before the verdict:
/// a failed run's chart is the one to look at), then returns the verdict.
pub fn emit(outcome: &impl Outcome, out: Outputs) -> Result<(), BenchError> {
    let md = outcome.to_markdown();
    println!("{md}");
    let write = |path: &std::path::Path, text: &str| {
        std::fs::write(path, text)
            .map_err(|e| BenchError::Failed(anyhow::anyhow!("writing {}: {e}", path.display())))
    };
    if let Some(path) = &out.json {
        write(path, &format!("{}\n", outcome.to_json()))?;
    }
    if let Some(path) = &out.markdown {
        write(path, &md)?;
    }
    if let (Some(path), Some(svg)) = (&out.chart, outcome.svg()) {
        write(path, &svg)?;
    }
    outcome.verdict()
}

/// `Failed` with the message, for a report's verdict.
pub fn failed(message: String) -> BenchError {
    BenchError::Failed(anyhow::anyhow!(message))
}

/// `--url` resolved; a bad one is a configuration error.
pub async fn target(url: &str) -> Result<Target, BenchError> {
    Target::resolve(url)
        .await
        .map_err(|e| BenchError::Config(format!("--url: {e:#}")))
}

/// The credentials the auth flags describe; bad ones are a configuration error.
pub fn auth(args: &AuthArgs) -> Result<Auth, BenchError> {
    Auth::from_args(args).map_err(BenchError::Config)
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Raises the open-file limit as far as allowed (each connection is a descriptor; the usual
/// soft limit, 1024, is far too low); a note when it stays below `needed + 64` for the
/// `needed` `what` asked for, or cannot be raised.
pub fn raise_open_files(needed: usize, what: &str) -> Option<String> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < needed as u64 + 64 => Some(format!(
            "the open-file limit ({limit}) is below the {needed} {what}"
        )),
        Ok(_) => None,
        Err(e) => Some(format!("cannot raise the open-file limit: {e}")),
    }
}

/// The bench's own CPU over a window, from its start.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    cpu_s: Option<f64>,
    at: Instant,
}

impl CpuMeter {
    pub fn start() -> CpuMeter {
        CpuMeter {
            cpu_s: machine::self_cpu_seconds(),
            at: Instant::now(),
        }
    }

    /// Percent of one core since the start (200 = two cores busy).
    pub fn percent(&self) -> Option<f64> {
        let wall = self.at.elapsed().as_secs_f64();
        match (self.cpu_s, machine::self_cpu_seconds()) {
            (Some(a), Some(b)) if wall > 0.0 => Some((b - a) / wall * 100.0),
            _ => None,
        }
    }
}

/// Resolves once the flag is (or already was) set, or its sender is gone. Returns `()` so
/// no watch guard is held across a `select!` that awaits it (the guard is not `Send`).
pub async fn flag(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|set| *set).await;
}

/// The progress line on stderr: `line` is called once a second until this is dropped.
pub struct Progress {
    _stop: Option<watch::Sender<bool>>,
}

impl Progress {
    /// Nothing is printed when `quiet`.
    pub fn start(quiet: bool, mut line: impl FnMut() -> String + Send + 'static) -> Progress {
        if quiet {
            return Progress { _stop: None };
        }
        let (tx, mut stop) = watch::channel(false);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => eprintln!("{}", line()),
                    _ = flag(&mut stop) => return,
                }
            }
        });
        Progress { _stop: Some(tx) }
    }
}

/// Polls `done` every `every` until it holds (true) or `deadline` passes (false).
pub async fn wait_until(
    deadline: Instant,
    every: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// Collects what `tasks` hand back: each gets until `grace` from now to end by itself; then
/// `stop` is raised and the rest get one more second before they are aborted. Returns the
/// outputs, in order, and how many tasks were lost (panicked or aborted).
pub async fn collect<T>(
    tasks: Vec<JoinHandle<T>>,
    grace: Duration,
    stop: &watch::Sender<bool>,
) -> (Vec<T>, u64) {
    let deadline = tokio::time::Instant::now() + grace;
    let mut out = Vec::with_capacity(tasks.len());
    let mut lost = 0;
    for mut t in tasks {
        let first = tokio::time::timeout_at(deadline, &mut t).await;
        let r = match first {
            Ok(r) => Some(r),
            Err(_) => {
                let _ = stop.send(true);
                tokio::time::timeout(Duration::from_secs(1), &mut t)
                    .await
                    .ok()
            }
        };
        match r {
            Some(Ok(v)) => out.push(v),
            Some(Err(_)) => lost += 1,
            None => {
                t.abort();
                lost += 1;
            }
        }
    }
    let _ = stop.send(true);
    (out, lost)
}

/// `fut`, bounded: `None` when it did not finish within `limit`.
pub async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(limit, fut).await.ok()
}
