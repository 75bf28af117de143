//! Facts about the machine and this process that a report carries: CPU time from `/proc`,
//! clock ticks, load, listen-queue overflows, the core count, the revision and the command
//! line. Reads only local process state.

/// The fields of `/proc/<pid>/stat` the bench reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// The command name (field 2), without its parentheses.
    pub comm: String,
    /// User and system CPU time, in clock ticks (fields 14 and 15).
    pub utime: u64,
    pub stime: u64,
    /// When the process started, in clock ticks after boot (field 22): a pid whose
    /// `starttime` changed between two reads is another process.
    pub starttime: u64,
}

impl ProcStat {
    pub fn parse(stat: &str) -> Option<ProcStat> {
        // The command name is in parentheses and may itself contain spaces or ')': it runs
        // from the first '(' to the last ')'.
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let comm = stat.get(open + 1..close)?.to_owned();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // `fields` starts at field 3 (state).
        let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
        Some(ProcStat {
            comm,
            utime: field(14)?,
            stime: field(15)?,
            starttime: field(22)?,
        })
    }

    pub fn cpu_ticks(&self) -> u64 {
        self.utime + self.stime
    }
}

/// `utime + stime` in clock ticks from the contents of `/proc/<pid>/stat`.
pub fn parse_proc_stat(stat: &str) -> Option<u64> {
    ProcStat::parse(stat).map(|p| p.cpu_ticks())
}

/// The kernel's clock ticks per second for `/proc` times (`sysconf(_SC_CLK_TCK)`), read from
/// this process's auxiliary vector (`AT_CLKTCK`) without `unsafe`; 100, the value on every
/// common Linux architecture, when it cannot be read.
pub fn clock_ticks_per_second() -> u64 {
    static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::fs::read("/proc/self/auxv")
            .ok()
            .and_then(|auxv| auxv_value(&auxv, AT_CLKTCK))
            .filter(|&hz| hz > 0)
            .unwrap_or(100)
    })
}

const AT_CLKTCK: u64 = 17;

/// The value of entry `key` in an auxiliary vector: native-endian `(type, value)` pairs of
/// machine words, ended by type 0.
pub fn auxv_value(auxv: &[u8], key: u64) -> Option<u64> {
    const W: usize = std::mem::size_of::<usize>();
    let word = |b: &[u8]| -> Option<u64> {
        let b: [u8; W] = b.try_into().ok()?;
        Some(usize::from_ne_bytes(b) as u64)
    };
    for pair in auxv.chunks_exact(2 * W) {
        let (k, v) = (word(&pair[..W])?, word(&pair[W..])?);
        if k == 0 {
            return None;
        }
        if k == key {
            return Some(v);
        }
    }
    None
}

/// CPU seconds this process has used so far (Linux; `None` elsewhere).
pub fn self_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_proc_stat(&stat).map(|ticks| ticks as f64 / clock_ticks_per_second() as f64)
}

/// `git rev-parse --short HEAD`, or `"unknown"`.
pub fn git_rev() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The machine's load average at this moment (`/proc/loadavg`: 1, 5 and 15 minutes), for
/// reports: other processes share the cores, and a busy machine skews every figure.
pub fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    (fields.len() == 3).then(|| fields.join(" "))
}

/// `TcpExt: ListenOverflows` from `/proc/net/netstat`: SYNs this machine dropped because a
/// listener's accept queue was full. Each one costs the client a retransmit (1 s, then 3 s,
/// ...), which is what a bimodal connect latency usually is. Machine-wide: meaningful when
/// the servers run on the bench's machine.
pub fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let i = names
            .split_whitespace()
            .position(|n| n == "ListenOverflows")?;
        return values.split_whitespace().nth(i)?.parse().ok();
    }
    None
}

/// The note every report carries about the load at its start.
pub fn load_note(load: Option<&str>, nproc: usize) -> String {
    match load {
        Some(l) => format!(
            "machine load average at the start (1/5/15 min): {l} on {nproc} cores; other \
             processes share them"
        ),
        None => "machine load average at the start: n/a (/proc/loadavg unreadable)".to_owned(),
    }
}

/// [`load_note`] for this machine, now.
pub fn current_load_note() -> String {
    load_note(load_average().as_deref(), nproc())
}

pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The command line as a shell would need it to run again.
pub fn command_line(args: impl IntoIterator<Item = String>) -> String {
    args.into_iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@+%".contains(&b));
            if plain {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
