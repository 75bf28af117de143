//! The oracle of `rebalance`: what members saw, judged against what the store holds.
//!
//! Pure functions of two inputs: each member's view (its join point, the ids it received in
//! the order they arrived, its acks) and each room's rows as read back at the end (from the
//! CQL store, or the history API). Every rule is unit-tested with synthetic data. It shares
//! no code with the product's decisions: it knows the rows and the guarantees the README
//! promises, not how a node orders, dedupes or replays. It must not read the network.
//!
//! The store's order of a room is ascending `id`, so "in the store's order" is "by id".

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

/// Examples kept per kind of problem, for a human to follow up.
pub const EXAMPLES_PER_KIND: usize = 5;

/// One stored message, as far as the oracle needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    pub id: u64,
    pub sender: String,
    pub cid: String,
}

impl StoredRow {
    pub fn new(id: u64, sender: &str, cid: &str) -> StoredRow {
        StoredRow {
            id,
            sender: sender.into(),
            cid: cid.into(),
        }
    }
}

/// What one member ended up with.
#[derive(Debug, Clone, Default)]
pub struct MemberView {
    /// Index of its room in the stored rooms.
    pub room: usize,
    pub user: String,
    /// Where its stream starts: the `since` it first joined with, or else the room's head
    /// its first `joined` reported (0 for an empty room); `None` if it never joined. Every
    /// stored message after it, up to the last message it received, must reach it.
    pub join_point: Option<u64>,
    /// Ids received (live or replayed), each once, in the order they first arrived.
    pub received: Vec<u64>,
    /// Acks: cid → id.
    pub acked: BTreeMap<String, u64>,
}

/// A few examples of each problem.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Examples {
    pub acked_lost: Vec<String>,
    pub stored_twice: Vec<String>,
    pub gaps: Vec<String>,
    pub out_of_order: Vec<String>,
    pub unknown_ids: Vec<String>,
    pub ids_reused: Vec<String>,
}

impl Examples {
    pub fn is_empty(&self) -> bool {
        self.kinds().iter().all(|(_, v)| v.is_empty())
    }

    /// `(kind, examples)` in report order.
    pub fn kinds(&self) -> [(&'static str, &Vec<String>); 6] {
        [
            ("acked_lost", &self.acked_lost),
            ("stored_twice", &self.stored_twice),
            ("gaps", &self.gaps),
            ("out_of_order", &self.out_of_order),
            ("unknown_ids", &self.unknown_ids),
            ("ids_reused", &self.ids_reused),
        ]
    }
}

fn example(v: &mut Vec<String>, s: impl FnOnce() -> String) {
    if v.len() < EXAMPLES_PER_KIND {
        v.push(s());
    }
}

/// One member's gaps.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MemberGaps {
    pub room: usize,
    pub user: String,
    pub gaps: u64,
    pub first_missing: u64,
    pub last_missing: u64,
}

/// The verdict on the guarantees, from the store.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Correctness {
    /// Where the rows judged came from: `cql` or `history`.
    pub judged_by: String,
    /// Acked (cid → id) pairs whose id is not stored, or holds another message (the cid
    /// stored under another id, or not at all). Must be 0.
    pub acked_lost: u64,
    /// Extra stored copies: a (sender, cid) of this run's members stored under more than one
    /// id counts each id after the first. Must be 0.
    pub stored_twice: u64,
    /// Stored messages after a member's join point, up to the last message it received,
    /// that it never received; summed over members. Must be 0.
    pub gaps: u64,
    pub members_with_gaps: u64,
    /// Stored messages a member received after one that comes later in the store (a
    /// higher id); summed over members. Must be 0.
    pub out_of_order: u64,
    pub members_out_of_order: u64,
    /// Ids members received that the store does not hold: (member, id) pairs. Reported,
    /// not a failure: a node delivers first and persists in the background, so a node that
    /// crashed or was fenced between the two leaves its members holding an id that was never
    /// stored nor acked (its sender resends the cid and it is stored once, under a new id).
    /// Tests check who minted them.
    pub unknown_ids: u64,
    pub members_with_unknown_ids: u64,
    /// Those ids, each once, ascending (at most one per stored message's worth of traffic:
    /// every one was delivered by some node).
    pub unknown_id_values: Vec<u64>,
    /// Stored messages after the last one a member received (not a gap: a member that was
    /// not caught up at the end; the drain reports those).
    pub unreceived_tail: u64,
    /// Ids stored in more than one row of a room (extra rows).
    pub ids_reused: u64,
    /// Rows judged, all rooms.
    pub stored_messages: u64,
    /// Acked pairs checked.
    pub acked_checked: u64,
    /// Every member with a gap (a member is in one room).
    pub gaps_by_member: Vec<MemberGaps>,
    pub examples: Examples,
}

impl Correctness {
    /// The counts that fail a run.
    pub fn failures(&self) -> [(&'static str, u64); 4] {
        [
            ("acked_lost", self.acked_lost),
            ("stored_twice", self.stored_twice),
            ("gaps", self.gaps),
            ("out_of_order", self.out_of_order),
        ]
    }

    pub fn clean(&self) -> bool {
        self.failures().iter().all(|(_, n)| *n == 0)
    }
}

/// Judges every member's acks and stream against its room's stored rows (`store[room]`, in
/// any order). `judged_by` names the source in the result.
pub fn account(judged_by: &str, store: &[Vec<StoredRow>], members: &[MemberView]) -> Correctness {
    let mut c = Correctness {
        judged_by: judged_by.into(),
        ..Default::default()
    };
    let users: HashSet<&str> = members.iter().map(|m| m.user.as_str()).collect();
    let mut by_id: Vec<HashMap<u64, &StoredRow>> = Vec::with_capacity(store.len());
    for (room, rows) in store.iter().enumerate() {
        c.stored_messages += rows.len() as u64;
        let mut ids: HashMap<u64, &StoredRow> = HashMap::with_capacity(rows.len());
        for r in rows {
            if ids.insert(r.id, r).is_some() {
                c.ids_reused += 1;
                example(&mut c.examples.ids_reused, || {
                    format!("room {room}: id {} in more than one row", r.id)
                });
            }
        }
        by_id.push(ids);
        let mut copies: BTreeMap<(&str, &str), Vec<u64>> = BTreeMap::new();
        for r in rows.iter().filter(|r| users.contains(r.sender.as_str())) {
            copies.entry((&r.sender, &r.cid)).or_default().push(r.id);
        }
        for ((sender, cid), mut ids) in copies {
            if ids.len() > 1 {
                ids.sort_unstable();
                c.stored_twice += ids.len() as u64 - 1;
                example(&mut c.examples.stored_twice, || {
                    format!("room {room}: {sender}/{cid} stored as ids {ids:?}")
                });
            }
        }
    }
    let empty_ids = HashMap::new();
    let empty_rows = Vec::new();
    let mut unknown_values: HashSet<u64> = HashSet::new();
    for m in members {
        let stored = by_id.get(m.room).unwrap_or(&empty_ids);
        let rows = store.get(m.room).unwrap_or(&empty_rows);
        for (cid, &id) in &m.acked {
            c.acked_checked += 1;
            let why = match stored.get(&id) {
                Some(r) if r.sender == m.user && r.cid == *cid => continue,
                Some(r) => format!("id {id} holds {}/{}", r.sender, r.cid),
                None => match rows.iter().find(|r| r.sender == m.user && r.cid == *cid) {
                    Some(r) => format!("not stored; the cid is stored as {}", r.id),
                    None => "not stored".into(),
                },
            };
            c.acked_lost += 1;
            example(&mut c.examples.acked_lost, || {
                format!("{}: {cid} acked as {id}: {why}", m.user)
            });
        }

        let mut unknown = 0u64;
        let mut disordered = 0u64;
        let mut highest_stored: Option<u64> = None;
        for &id in &m.received {
            if !stored.contains_key(&id) {
                unknown += 1;
                unknown_values.insert(id);
                example(&mut c.examples.unknown_ids, || {
                    format!("{}: received {id}, not in the store", m.user)
                });
                continue;
            }
            match highest_stored {
                Some(h) if id < h => {
                    disordered += 1;
                    example(&mut c.examples.out_of_order, || {
                        format!("{}: received {id} after {h}", m.user)
                    });
                }
                _ => highest_stored = Some(id),
            }
        }
        c.unknown_ids += unknown;
        c.members_with_unknown_ids += u64::from(unknown > 0);
        c.out_of_order += disordered;
        c.members_out_of_order += u64::from(disordered > 0);

        let Some(jp) = m.join_point else { continue };
        let last = m.received.iter().copied().max();
        let received: HashSet<u64> = m.received.iter().copied().collect();
        let mut missing: Vec<u64> = Vec::new();
        for r in rows
            .iter()
            .filter(|r| r.id > jp && !received.contains(&r.id))
        {
            if last.is_some_and(|l| r.id <= l) {
                missing.push(r.id);
            } else {
                c.unreceived_tail += 1;
            }
        }
        if !missing.is_empty() {
            missing.sort_unstable();
            missing.dedup();
            let n = missing.len() as u64;
            let (first, last_missing) = (missing[0], missing[missing.len() - 1]);
            c.gaps += n;
            c.members_with_gaps += 1;
            example(&mut c.examples.gaps, || {
                format!(
                    "{}: missed {n} stored messages between {first} and {last_missing} \
                     (joined at {jp}, last received {})",
                    m.user,
                    last.unwrap_or(0)
                )
            });
            c.gaps_by_member.push(MemberGaps {
                room: m.room,
                user: m.user.clone(),
                gaps: n,
                first_missing: first,
                last_missing,
            });
        }
    }
    c.unknown_id_values = unknown_values.into_iter().collect();
    c.unknown_id_values.sort_unstable();
    c
}

/// Rows the history API and the CQL store disagree on, when both were read.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Disagreement {
    /// Ids the history returned that the CQL store does not hold.
    pub history_only: u64,
    /// Ids the CQL store holds that the history did not return.
    pub cql_only: u64,
    /// Ids both hold with a different sender or cid.
    pub differing: u64,
    pub examples: Vec<String>,
}

impl Disagreement {
    pub fn any(&self) -> bool {
        self.history_only + self.cql_only + self.differing > 0
    }
}

/// Compares two readings of the same rooms, room by room.
pub fn compare(history: &[Vec<StoredRow>], cql: &[Vec<StoredRow>]) -> Disagreement {
    let mut d = Disagreement::default();
    let empty = Vec::new();
    for room in 0..history.len().max(cql.len()) {
        let h: HashMap<u64, &StoredRow> = history
            .get(room)
            .unwrap_or(&empty)
            .iter()
            .map(|r| (r.id, r))
            .collect();
        let q: HashMap<u64, &StoredRow> = cql
            .get(room)
            .unwrap_or(&empty)
            .iter()
            .map(|r| (r.id, r))
            .collect();
        let ex = |d: &mut Disagreement, s: String| {
            if d.examples.len() < EXAMPLES_PER_KIND * 2 {
                d.examples.push(s);
            }
        };
        let mut ids: Vec<u64> = h.keys().chain(q.keys()).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            match (h.get(&id), q.get(&id)) {
                (Some(a), None) => {
                    d.history_only += 1;
                    ex(
                        &mut d,
                        format!(
                            "room {room}: {id} ({}/{}) only in the history",
                            a.sender, a.cid
                        ),
                    );
                }
                (None, Some(b)) => {
                    d.cql_only += 1;
                    ex(
                        &mut d,
                        format!("room {room}: {id} ({}/{}) only in CQL", b.sender, b.cid),
                    );
                }
                (Some(a), Some(b)) if a != b => {
                    d.differing += 1;
                    ex(
                        &mut d,
                        format!(
                            "room {room}: {id} is {}/{} in the history, {}/{} in CQL",
                            a.sender, a.cid, b.sender, b.cid
                        ),
                    );
                }
                _ => {}
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u64, sender: &str, cid: &str) -> StoredRow {
        StoredRow::new(id, sender, cid)
    }

    fn member(
        room: usize,
        user: &str,
        jp: Option<u64>,
        rx: &[u64],
        acks: &[(&str, u64)],
    ) -> MemberView {
        MemberView {
            room,
            user: user.into(),
            join_point: jp,
            received: rx.to_vec(),
            acked: acks.iter().map(|(c, i)| (c.to_string(), *i)).collect(),
        }
    }

    #[test]
    fn a_clean_run_accounts_nothing() {
        let store = vec![
            vec![row(10, "a", "m0-0"), row(11, "b", "m1-0")],
            vec![row(20, "c", "m2-0")],
        ];
        let m = vec![
            member(0, "a", Some(0), &[10, 11], &[("m0-0", 10)]),
            member(0, "b", Some(0), &[10, 11], &[("m1-0", 11)]),
            member(1, "c", Some(0), &[20], &[("m2-0", 20)]),
        ];
        let c = account("cql", &store, &m);
        assert!(c.clean(), "{c:?}");
        assert_eq!(c.judged_by, "cql");
        assert_eq!((c.acked_checked, c.stored_messages), (3, 3));
        assert_eq!((c.unreceived_tail, c.ids_reused), (0, 0));
        assert!(c.examples.is_empty() && c.gaps_by_member.is_empty());
    }

    #[test]
    fn each_kind_of_problem_is_counted_with_an_example() {
        let store = vec![vec![
            // Before b's join point (10): not a gap for b.
            row(9, "x", "old"),
            row(10, "a", "m0-0"),
            // m0-1 stored twice (a retry after an owner change), listed out of order: the
            // oracle does not rely on the reader's order.
            row(13, "a", "m0-1"),
            row(12, "a", "m0-1"),
            row(14, "b", "m1-0"),
            // Another user's cid that repeats: not this run's, not counted.
            row(15, "stranger", "z"),
            row(16, "stranger", "z"),
            // After everything b received: b's tail, not a gap.
            row(17, "a", "m0-3"),
        ]];
        let m = vec![
            // a: m0-2 acked as 18 but not stored; 99 delivered but never stored; 12 after 13.
            member(
                0,
                "a",
                Some(0),
                &[9, 10, 13, 12, 14, 15, 16, 99, 17],
                &[("m0-0", 10), ("m0-1", 12), ("m0-2", 18)],
            ),
            // b: joined at 10, missed 13 and 15; 17 came after the last it received.
            member(0, "b", Some(10), &[12, 14, 16], &[("m1-0", 14)]),
            // An ack whose id holds another message is lost too.
            member(0, "c", None, &[], &[("m2-0", 14)]),
        ];
        let c = account("history", &store, &m);
        assert_eq!(c.acked_lost, 2, "{c:?}");
        assert_eq!(c.stored_twice, 1, "{c:?}");
        assert_eq!((c.gaps, c.members_with_gaps), (2, 1), "{c:?}");
        assert_eq!((c.out_of_order, c.members_out_of_order), (1, 1), "{c:?}");
        assert_eq!((c.unknown_ids, c.members_with_unknown_ids), (1, 1), "{c:?}");
        assert_eq!(c.unknown_id_values, [99]);
        assert_eq!(c.unreceived_tail, 1, "{c:?}");
        assert_eq!(c.acked_checked, 5);
        assert!(!c.clean());
        assert_eq!(
            c.gaps_by_member,
            vec![MemberGaps {
                room: 0,
                user: "b".into(),
                gaps: 2,
                first_missing: 13,
                last_missing: 15
            }]
        );
        let e = &c.examples;
        assert!(e
            .acked_lost
            .iter()
            .any(|s| s.contains("m0-2") && s.contains("not stored")));
        assert!(e
            .acked_lost
            .iter()
            .any(|s| s.contains("m2-0") && s.contains("holds b/m1-0")));
        assert_eq!(e.stored_twice, ["room 0: a/m0-1 stored as ids [12, 13]"]);
        assert_eq!(e.out_of_order, ["a: received 12 after 13"]);
        assert_eq!(e.unknown_ids, ["a: received 99, not in the store"]);
        assert!(e.gaps[0].starts_with("b: missed 2 stored messages between 13 and 15"));
    }

    #[test]
    fn an_ack_whose_cid_was_stored_under_another_id_is_lost() {
        let store = vec![vec![row(21, "a", "m0-0")]];
        let c = account("cql", &store, &[member(0, "a", None, &[], &[("m0-0", 20)])]);
        assert_eq!(c.acked_lost, 1);
        assert!(c.examples.acked_lost[0].contains("stored as 21"), "{c:?}");
    }

    #[test]
    fn a_member_of_a_room_with_no_rows_loses_its_acks_and_knows_no_id() {
        let c = account("cql", &[], &[member(0, "a", Some(0), &[5], &[("m0-0", 5)])]);
        assert_eq!((c.acked_lost, c.unknown_ids, c.gaps), (1, 1, 0));
    }

    #[test]
    fn examples_are_capped_and_counts_are_not() {
        let store = vec![(1..=20).map(|i| row(i, "s", &format!("c{i}"))).collect()];
        // Joined at 0, received only the last: 19 gaps, one example line for the member.
        let m: Vec<MemberView> = (0..8)
            .map(|k| member(0, &format!("u{k}"), Some(0), &[20], &[]))
            .collect();
        let c = account("cql", &store, &m);
        assert_eq!((c.gaps, c.members_with_gaps), (19 * 8, 8));
        assert_eq!(c.examples.gaps.len(), EXAMPLES_PER_KIND);
        assert_eq!(c.gaps_by_member.len(), 8);
    }

    #[test]
    fn the_same_id_in_two_rows_is_reported() {
        let store = vec![vec![row(5, "a", "m0-0"), row(5, "a", "m0-1")]];
        let c = account("cql", &store, &[]);
        assert_eq!(c.ids_reused, 1);
    }

    /// The run that reported PASS while the store showed the damage: node A owns the room
    /// and is SIGSTOPped; B becomes the interim owner and stores what the members that
    /// moved send (and resend); A is resumed, and, unfenced, delivers and stores what was
    /// queued on it, minting ids later than B's. A member that stayed on A receives A's new
    /// ids and none of B's: gaps. Cids resent to B and also stored by A: stored twice.
    #[test]
    fn a_paused_owner_resumed_next_to_an_interim_owner_is_caught() {
        let store = vec![vec![
            // A, before the pause.
            row(100, "u0", "m0-0"),
            row(101, "u1", "m1-0"),
            // B, the interim owner: u1 moved and resent m1-1, then sent m1-2.
            row(200, "u1", "m1-1"),
            row(201, "u1", "m1-2"),
            // A after SIGCONT: u0's queued send, and u1's m1-1 that A had queued too.
            row(300, "u0", "m0-1"),
            row(301, "u1", "m1-1"),
        ]];
        let members = vec![
            // u0 stayed on A the whole time (no dead-connection detection).
            member(
                0,
                "u0",
                Some(0),
                &[100, 101, 300, 301],
                &[("m0-0", 100), ("m0-1", 300)],
            ),
            // u1 moved to B; B never relayed A's late rows; B acked m1-1 as 200.
            member(
                0,
                "u1",
                Some(0),
                &[100, 101, 200, 201],
                &[("m1-0", 101), ("m1-1", 200), ("m1-2", 201)],
            ),
        ];
        let c = account("cql", &store, &members);
        assert_eq!(c.stored_twice, 1, "{c:?}");
        assert_eq!(
            c.examples.stored_twice,
            ["room 0: u1/m1-1 stored as ids [200, 301]"]
        );
        // u0 missed 200 and 201; u1's last received is 201, so 300 and 301 are its tail.
        assert_eq!((c.gaps, c.members_with_gaps), (2, 1), "{c:?}");
        assert_eq!(c.gaps_by_member[0].user, "u0");
        assert_eq!(c.unreceived_tail, 2);
        assert_eq!((c.acked_lost, c.out_of_order, c.unknown_ids), (0, 0, 0));
        assert!(!c.clean());

        // The same members judged by a history that (as in that run) only showed the
        // interim owner's rows for the pause: the oracle still fails the run.
        let history = vec![vec![
            row(100, "u0", "m0-0"),
            row(101, "u1", "m1-0"),
            row(200, "u1", "m1-1"),
            row(201, "u1", "m1-2"),
        ]];
        let h = account("history", &history, &members);
        assert_eq!((h.acked_lost, h.unknown_ids), (1, 2), "{h:?}");
        assert_eq!(h.unknown_id_values, [300, 301]);
        let d = compare(&history, &store);
        assert_eq!((d.history_only, d.cql_only, d.differing), (0, 2, 0));
        assert!(d.any());
    }

    #[test]
    fn readings_that_agree_do_not_disagree() {
        let a = vec![vec![row(1, "a", "x"), row(2, "b", "y")], vec![]];
        let b = vec![vec![row(2, "b", "y"), row(1, "a", "x")]];
        assert_eq!(compare(&a, &b), Disagreement::default());
        let c = vec![
            vec![row(1, "a", "x"), row(2, "b", "z")],
            vec![row(7, "c", "w")],
        ];
        let d = compare(&a, &c);
        assert_eq!(
            (d.history_only, d.cql_only, d.differing),
            (0, 1, 1),
            "{d:?}"
        );
        assert!(d
            .examples
            .iter()
            .any(|e| e.contains("b/y in the history, b/z in CQL")));
    }
}
