//! What every scenario's flags have in common: the bound on durations and its check, the
//! default room prefix, and (in unit tests) parsing one scenario's flags on their own. Each
//! `*Args` keeps its own flags, defaults and other limits; nothing here reads the network.

use std::time::{SystemTime, UNIX_EPOCH};

/// Upper bound of every duration flag: a day.
pub const MAX_SECONDS: f64 = 86_400.0;

/// A duration flag's value is finite, at most [`MAX_SECONDS`], and positive (or, when
/// `positive` is false, non-negative).
pub fn seconds_ok(v: f64, positive: bool) -> bool {
    v.is_finite() && v <= MAX_SECONDS && if positive { v > 0.0 } else { v >= 0.0 }
}

/// [`seconds_ok`], with the message naming the flag.
pub fn seconds(name: &str, v: f64, positive: bool) -> Result<(), String> {
    if seconds_ok(v, positive) {
        Ok(())
    } else {
        Err(format!(
            "--{name} must be {} and at most {MAX_SECONDS} seconds",
            if positive { "positive" } else { "non-negative" }
        ))
    }
}

/// `--room-prefix` as given, or `<scenario>-<unix seconds>` so each run starts with rooms
/// no earlier run used.
pub fn room_prefix(given: Option<&str>, scenario: &str) -> String {
    given.map_or_else(
        || {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            format!("{scenario}-{secs}")
        },
        str::to_owned,
    )
}

/// `last_user`, the highest user id a `--user-prefix` produces, is a valid user id.
pub fn check_user_prefix(last_user: String) -> Result<(), String> {
    common::UserId::new(last_user)
        .map(drop)
        .map_err(|e| format!("--user-prefix gives invalid user ids: {e}"))
}

/// `last_room`, the highest room id a `--room-prefix` produces, is a valid room id.
pub fn check_room_prefix(last_room: String) -> Result<(), String> {
    common::RoomId::new(last_room)
        .map(drop)
        .map_err(|e| format!("--room-prefix gives invalid room ids: {e}"))
}

/// One scenario's flags parsed on their own, as `chat-bench <scenario> EXTRA...` would.
#[cfg(test)]
pub fn parse<A: clap::Args + clap::FromArgMatches>(extra: &[&str]) -> A {
    let matches = A::augment_args(clap::Command::new("t"))
        .try_get_matches_from(std::iter::once("t").chain(extra.iter().copied()))
        .expect("parses");
    A::from_arg_matches(&matches).expect("parses")
}

/// A test's flags written as one line (no value in it holds a space).
#[cfg(test)]
pub fn flags(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(seconds("drain", 0.0, false), Ok(()));
        assert_eq!(
            seconds("duration", 0.0, true),
            Err("--duration must be positive and at most 86400 seconds".into())
        );
        assert_eq!(
            seconds("settle", f64::NAN, false),
            Err("--settle must be non-negative and at most 86400 seconds".into())
        );
        assert!(!seconds_ok(MAX_SECONDS + 1.0, false));
    }

    #[test]
    fn room_prefixes() {
        assert_eq!(room_prefix(Some("mine"), "bench"), "mine");
        assert!(room_prefix(None, "bench").starts_with("bench-"));
    }
}
