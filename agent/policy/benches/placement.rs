//! Placement throughput through the WASM scheduler (the built-in component, run by
//! `PolicyHost`) against the same policy compiled natively (`shoal-policy-logic`), at
//! 100, 1,000 and 5,000 nodes; plus the fixed cost of a call into a guest.
//!
//! Run pinned to one core (results in agent/policy/BENCHMARKS.md):
//! `cargo bench -p shoal-policy --bench placement --no-run && taskset -c 0 cargo bench -p shoal-policy --bench placement`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shoal_policy::logic::Cluster;
use shoal_policy::{
    DecidedBy, HostConfig, PlacementRequest, PolicyHost, ReplicaMetrics, ScaleInput, Snapshot,
};

mod support;
use data::{request, snapshot, SIZES};
use support as data;

fn host() -> PolicyHost {
    let cache = std::env::temp_dir().join("shoal-policy-bench-cache");
    PolicyHost::new(HostConfig {
        cache_dir: Some(cache),
        ..HostConfig::default()
    })
    .expect("policy host starts")
}

/// Placements per round before a fresh round starts (so services accumulate a
/// realistic number of allocations, as in a real reconcile round).
const ROUND_LEN: u64 = 500;

/// One `place` call (one replica) on a snapshot that was handed over already; the
/// hand-over at the start of each round of `ROUND_LEN` calls is not timed here (see
/// `round-of-100`).
fn place(c: &mut Criterion) {
    let host = host();
    let mut group = c.benchmark_group("place");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    for n in SIZES {
        let snap = snapshot(n);
        group.bench_with_input(BenchmarkId::new("wasm", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let mut round = host.begin_round(&snap);
                    round.place(&request(0)); // hands the snapshot over
                    let batch: Vec<PlacementRequest> = (1..=ROUND_LEN.min(iters - done))
                        .map(|k| request(k as usize))
                        .collect();
                    let started = Instant::now();
                    for r in &batch {
                        let out = round.place(black_box(r));
                        assert!(
                            out.indices.len() == 1 && out.decided_by == DecidedBy::Builtin,
                            "{out:?}"
                        );
                    }
                    spent += started.elapsed();
                    done += batch.len() as u64;
                }
                spent
            })
        });
        group.bench_with_input(BenchmarkId::new("native", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let mut cluster = Cluster::new(snap.clone());
                    cluster.place(&request(0)).expect("valid");
                    let batch: Vec<PlacementRequest> = (1..=ROUND_LEN.min(iters - done))
                        .map(|k| request(k as usize))
                        .collect();
                    let started = Instant::now();
                    for r in &batch {
                        let out = cluster.place(black_box(r)).expect("valid");
                        assert_eq!(out.nodes.len(), 1);
                    }
                    spent += started.elapsed();
                    done += batch.len() as u64;
                }
                spent
            })
        });
    }
    group.finish();
}

/// A whole round: hand the snapshot over, then place 100 single-replica requests.
fn round(c: &mut Criterion) {
    let host = host();
    let mut group = c.benchmark_group("round-of-100");
    group
        .throughput(Throughput::Elements(100))
        .sample_size(10)
        .measurement_time(Duration::from_secs(4));
    let requests: Vec<PlacementRequest> = (0..100).map(request).collect();
    for n in SIZES {
        let snap = snapshot(n);
        group.bench_with_input(BenchmarkId::new("wasm", n), &n, |b, _| {
            b.iter(|| {
                let out = host.schedule(black_box(&snap), &requests);
                assert!(out
                    .iter()
                    .all(|o| o.indices.len() == 1 && o.decided_by == DecidedBy::Builtin));
            })
        });
        group.bench_with_input(BenchmarkId::new("native", n), &n, |b, _| {
            b.iter(|| {
                let mut cluster = Cluster::new(black_box(&snap).clone());
                for r in &requests {
                    assert_eq!(cluster.place(r).expect("valid").nodes.len(), 1);
                }
            })
        });
    }
    group.finish();
}

/// Fixed costs: a `place` on an empty snapshot (the boundary crossing itself), a new
/// scheduler instance with an empty snapshot, and a whole `scale` call (fresh instance
/// per call).
fn overhead(c: &mut Criterion) {
    let host = host();
    let mut group = c.benchmark_group("overhead");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(3));
    let empty = Snapshot::default();
    let nothing = PlacementRequest {
        service: "svc".into(),
        replicas: 0,
        ..PlacementRequest::default()
    };
    let mut round = host.begin_round(&empty);
    group.bench_function("place-call-empty", |b| {
        b.iter(|| black_box(round.place(black_box(&nothing))))
    });
    group.bench_function("new-instance+set-snapshot-empty+place", |b| {
        b.iter(|| black_box(host.schedule(black_box(&empty), std::slice::from_ref(&nothing))))
    });
    let input = ScaleInput {
        service: "web".into(),
        current: 4,
        min: 1,
        max: 10,
        replicas: vec![
            ReplicaMetrics {
                cpu_percent: 100.0,
                ..ReplicaMetrics::default()
            };
            4
        ],
        ..ScaleInput::default()
    };
    group.bench_function("scale-call", |b| {
        b.iter(|| black_box(host.scale(black_box(&input))))
    });
    group.bench_function("scale-native", |b| {
        b.iter(|| black_box(shoal_policy::logic::scale(black_box(&input))))
    });
    group.finish();
}

criterion_group!(benches, overhead, place, round);
criterion_main!(benches);
