//! Ring lookups and builds: the router does one lookup per request, a node one per join;
//! a build happens on every membership change. `cargo bench -p common --bench ring`.

use std::hint::black_box;

use common::ring::{NodeInfo, Ring, DEFAULT_VNODES};
use criterion::{criterion_group, criterion_main, Criterion};

fn nodes(n: u16) -> Vec<NodeInfo> {
    (1..=n)
        .map(|id| NodeInfo {
            id,
            addr: format!("10.0.0.{id}:7001"),
            started_at_ms: 0,
            incarnation: 0,
        })
        .collect()
}

fn lookups(c: &mut Criterion) {
    let rooms: Vec<String> = (0..1024).map(|i| format!("team-{i}.general")).collect();
    for n in [3u16, 10, 50] {
        let ring = Ring::new(nodes(n), DEFAULT_VNODES);
        let mut i = 0;
        c.bench_function(&format!("owner/{n}-nodes"), |b| {
            b.iter(|| {
                i = (i + 1) % rooms.len();
                black_box(ring.owner(black_box(&rooms[i])))
            })
        });
    }
}

fn builds(c: &mut Criterion) {
    for n in [3u16, 10, 50] {
        let members = nodes(n);
        c.bench_function(&format!("build/{n}-nodes"), |b| {
            b.iter(|| black_box(Ring::new(members.clone(), DEFAULT_VNODES)))
        });
    }
}

criterion_group!(benches, lookups, builds);
criterion_main!(benches);
