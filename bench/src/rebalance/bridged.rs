//! `rebalance --bridged`: every member's connection lives on a home room of its own, owned
//! by another node than the shared room it sends to, so all it sends and receives in the
//! shared room crosses the bridge through Redis (PROTOCOL.md, "Rooms on other nodes").
//!
//! This module owns two decisions and no I/O: which home room a member connects with
//! ([`HomeSearch`], fed the router's owner lookups at the start), and the shared room's
//! `join` on each session ([`SharedJoin`]): written right after the upgrade, written again
//! after a backoff when it is refused with a retry-later code, a reconnect when the refusal
//! says so ([`join_refusal`]). The member's session does the writes and hands in the answers
//! and the time.

use std::time::{Duration, Instant};

use common::Retry;

/// Home room names tried per member before settling for one on the shared room's owner.
/// With two nodes or more a candidate misses with probability about 1 − 1/nodes, so 32
/// misses in a row do not happen in practice; the report counts members left local.
pub const HOME_CANDIDATES: usize = 32;

/// The `k`-th home room name of `member` of `room`: `<room>-home-<member>`, then
/// `<room>-home-<member>-<k>`.
pub fn home_candidate(room: &str, member: usize, k: usize) -> String {
    if k == 0 {
        format!("{room}-home-{member}")
    } else {
        format!("{room}-home-{member}-{k}")
    }
}

/// A member's home room and where it lived at the start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    pub room: String,
    pub owner: u64,
    /// Owned by another node than the shared room: the member is bridged.
    pub bridged: bool,
}

/// The search for one member's home room: look up [`candidate`](Self::candidate), hand the
/// owner to [`observe`](Self::observe), until it returns the choice. The first candidate
/// owned by another node than the shared room wins; with a ring of one node (or after
/// [`HOME_CANDIDATES`] misses) the member keeps the first candidate and is not bridged.
#[derive(Debug, Clone)]
pub struct HomeSearch {
    room: String,
    member: usize,
    room_owner: u64,
    ring_size: u64,
    k: usize,
    first_owner: Option<u64>,
}

impl HomeSearch {
    /// `room_owner` and `ring_size` are from the shared room's lookup.
    pub fn new(room: &str, member: usize, room_owner: u64, ring_size: u64) -> HomeSearch {
        HomeSearch {
            room: room.to_owned(),
            member,
            room_owner,
            ring_size,
            k: 0,
            first_owner: None,
        }
    }

    /// The room to look up next.
    pub fn candidate(&self) -> String {
        home_candidate(&self.room, self.member, self.k)
    }

    /// The owner of [`candidate`](Self::candidate); `Some` once the choice is made.
    pub fn observe(&mut self, owner: u64) -> Option<Home> {
        if owner != self.room_owner {
            return Some(Home {
                room: self.candidate(),
                owner,
                bridged: true,
            });
        }
        let first = *self.first_owner.get_or_insert(owner);
        self.k += 1;
        if self.ring_size <= 1 || self.k >= HOME_CANDIDATES {
            return Some(Home {
                room: home_candidate(&self.room, self.member, 0),
                owner: first,
                bridged: false,
            });
        }
        None
    }
}

/// What an `error` frame without a cid for the shared room asks of a bridged member: it
/// answers a `join` (refused, or its `since` replay failed and the member is no longer in
/// the room).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinRefusal {
    /// Join again on this connection after a backoff (PROTOCOL.md: `room_unavailable`,
    /// `node_unavailable` while the node's link to Redis is down or the owner just
    /// crashed, `store_unavailable` after a failed join or replay, `overloaded`).
    JoinAgain,
    /// Close, reconnect through the router and join again with `since` (`room_moved`,
    /// `going_away`, `internal`: reconnect and resume).
    Reconnect,
}

/// The answer to a refused shared-room join, by its code, as `common`'s table says
/// ([`crate::client::retry`]): retry later is joining again, reconnect and resume is
/// reconnecting; `None` for do-not-retry codes (a correct member never provokes them).
pub fn join_refusal(code: &str) -> Option<JoinRefusal> {
    match crate::client::retry(code) {
        Retry::RetryLater => Some(JoinRefusal::JoinAgain),
        Retry::ReconnectAndResume => Some(JoinRefusal::Reconnect),
        Retry::DoNotRetry => None,
    }
}

/// Where the shared room's join of the current session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinState {
    /// To be written now (a new session).
    Due,
    /// Written at this instant; no answer yet.
    Sent(Instant),
    /// Refused; write it again at this instant.
    RetryAt(Instant),
    /// The shared room answered `joined`.
    Joined,
}

/// The shared room's join across a member's sessions. The backoff between refused joins
/// starts at `first`, doubles up to `max`, is stretched by the member's jitter, and starts
/// over once a join succeeds (not on a new session: a member refused again and again after
/// reconnecting keeps backing off).
#[derive(Debug, Clone)]
pub struct SharedJoin {
    state: JoinState,
    backoff: Duration,
    first: Duration,
    max: Duration,
    jitter: f64,
}

impl SharedJoin {
    pub fn new(first: Duration, max: Duration, jitter: f64) -> SharedJoin {
        SharedJoin {
            state: JoinState::Due,
            backoff: first,
            first,
            max,
            jitter,
        }
    }

    pub fn state(&self) -> JoinState {
        self.state
    }

    /// A new session is up: its join goes out at once.
    pub fn new_session(&mut self) {
        self.state = JoinState::Due;
    }

    /// Whether the join should be written now.
    pub fn due(&self, now: Instant) -> bool {
        match self.state {
            JoinState::Due => true,
            JoinState::RetryAt(t) => now >= t,
            JoinState::Sent(_) | JoinState::Joined => false,
        }
    }

    /// The join was written at `now`.
    pub fn sent(&mut self, now: Instant) {
        self.state = JoinState::Sent(now);
    }

    /// The shared room answered `joined`.
    pub fn joined(&mut self) {
        self.state = JoinState::Joined;
        self.backoff = self.first;
    }

    /// The join was refused with a [`JoinRefusal::JoinAgain`] code at `now`: it goes out
    /// again after the returned wait.
    pub fn refused(&mut self, now: Instant) -> Duration {
        let wait = self.backoff.mul_f64(self.jitter);
        self.state = JoinState::RetryAt(now + wait);
        self.backoff = (self.backoff * 2).min(self.max);
        wait
    }

    /// The join written on this session has had no answer for `limit`: the session is
    /// lost (the member reconnects).
    pub fn unanswered(&self, now: Instant, limit: Duration) -> bool {
        matches!(self.state, JoinState::Sent(t) if now.saturating_duration_since(t) >= limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Owners by name for a fake ring; anything unnamed lives on node 1.
    fn search(room_owner: u64, ring_size: u64, owners: &[(&str, u64)]) -> (Home, Vec<String>) {
        let mut s = HomeSearch::new("r-0", 2, room_owner, ring_size);
        let mut asked = Vec::new();
        loop {
            let c = s.candidate();
            let o = owners.iter().find(|(n, _)| *n == c).map_or(1, |(_, o)| *o);
            asked.push(c);
            if let Some(h) = s.observe(o) {
                return (h, asked);
            }
        }
    }

    #[test]
    fn the_first_home_on_another_node_wins() {
        // The first candidate is already elsewhere: one lookup.
        let (h, asked) = search(2, 3, &[]);
        assert_eq!(
            h,
            Home {
                room: "r-0-home-2".into(),
                owner: 1,
                bridged: true
            }
        );
        assert_eq!(asked, ["r-0-home-2"]);
        // The first two share the room's owner; the third does not.
        let (h, asked) = search(
            1,
            3,
            &[("r-0-home-2", 1), ("r-0-home-2-1", 1), ("r-0-home-2-2", 3)],
        );
        assert_eq!(
            h,
            Home {
                room: "r-0-home-2-2".into(),
                owner: 3,
                bridged: true
            }
        );
        assert_eq!(asked.len(), 3);
    }

    #[test]
    fn one_node_or_no_luck_keeps_the_first_name_unbridged() {
        // A ring of one node: no point in looking further.
        let (h, asked) = search(1, 1, &[]);
        assert_eq!(
            h,
            Home {
                room: "r-0-home-2".into(),
                owner: 1,
                bridged: false
            }
        );
        assert_eq!(asked.len(), 1);
        // Every candidate on the room's owner: bounded, then the first name.
        let (h, asked) = search(1, 3, &[]);
        assert_eq!(asked.len(), HOME_CANDIDATES);
        assert_eq!(asked[HOME_CANDIDATES - 1], "r-0-home-2-31");
        assert_eq!(
            h,
            Home {
                room: "r-0-home-2".into(),
                owner: 1,
                bridged: false
            }
        );
    }

    #[test]
    fn refusals_classify_as_protocol_md_says() {
        for c in [
            "room_unavailable",
            "node_unavailable",
            "store_unavailable",
            "overloaded",
            // A join over the rate is joined again later: the table says retry later.
            "rate_limited",
        ] {
            assert_eq!(join_refusal(c), Some(JoinRefusal::JoinAgain), "{c}");
        }
        for c in ["room_moved", "going_away", "internal"] {
            assert_eq!(join_refusal(c), Some(JoinRefusal::Reconnect), "{c}");
        }
        for c in ["forbidden", "invalid_field", "not_joined", "room_ended"] {
            assert_eq!(join_refusal(c), None, "{c}");
        }
    }

    #[test]
    fn a_refused_join_goes_out_again_after_a_growing_backoff() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut j = SharedJoin::new(ms(100), ms(350), 1.0);
        assert!(j.due(t0), "a new member joins at once");
        j.sent(t0);
        assert!(!j.due(t0) && !j.unanswered(t0 + ms(999), ms(1000)));
        assert!(j.unanswered(t0 + ms(1000), ms(1000)), "no answer: lost");
        // Refused three times: 100, 200, then 350 ms (capped).
        assert_eq!(j.refused(t0), ms(100));
        assert!(!j.due(t0 + ms(99)) && j.due(t0 + ms(100)));
        assert!(
            !j.unanswered(t0 + ms(5000), ms(1000)),
            "a wait is no answer"
        );
        j.sent(t0 + ms(100));
        assert_eq!(j.refused(t0 + ms(110)), ms(200));
        assert_eq!(j.state(), JoinState::RetryAt(t0 + ms(310)));
        // A reconnect meanwhile: the new session joins at once, the backoff carries over.
        j.new_session();
        assert!(j.due(t0 + ms(120)));
        j.sent(t0 + ms(120));
        assert_eq!(j.refused(t0 + ms(130)), ms(350));
        assert_eq!(j.refused(t0 + ms(500)), ms(350));
        // Joined: the next refusal starts from the first backoff again.
        j.joined();
        assert_eq!(j.state(), JoinState::Joined);
        assert!(!j.due(t0 + ms(10_000)) && !j.unanswered(t0 + ms(10_000), ms(1)));
        assert_eq!(j.refused(t0 + ms(600)), ms(100));
        // The member's jitter stretches every wait.
        let mut j = SharedJoin::new(ms(100), ms(1000), 1.25);
        assert_eq!(j.refused(t0), ms(125));
    }
}
