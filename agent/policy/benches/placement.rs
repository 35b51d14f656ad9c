//! Placement throughput through the WASM scheduler (the built-in component, run by
//! `PolicyHost`) against the same policy compiled natively (`shoal-policy-logic`), at
//! 100, 1,000 and 5,000 nodes; plus the fixed cost of a call into a guest.
//!
//! Run pinned to one core (results in agent/policy/BENCHMARKS.md):
//! `cargo bench -p shoal-policy --bench placement --no-run && taskset -c 0 cargo bench -p shoal-policy --bench placement`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shoal_policy::logic::Cluster;
use shoal_policy::{
    Affinity, AffinityTarget, Constraint, DecidedBy, HostConfig, Node, NodeStatus,
    PlacementRequest, PolicyHost, ReplicaMetrics, Resources, ScaleInput, Snapshot,
};

const SIZES: [usize; 3] = [100, 1_000, 5_000];

/// A cluster with realistic variety: 12 zones, two providers, a few images, ports and
/// allocations of 50 services per node mix, 2% of nodes down.
fn snapshot(n: usize) -> Snapshot {
    let nodes = (0..n)
        .map(|i| {
            let cap = Resources {
                cpu_millis: 64_000,
                memory_bytes: 256 << 30,
                disk_bytes: 1 << 40,
            };
            let used = (i % 17) as u64;
            let mut labels = BTreeMap::new();
            labels.insert("zone".to_string(), format!("z{}", i % 12));
            labels.insert(
                "provider".to_string(),
                if i % 3 == 0 { "onprem" } else { "aws" }.to_string(),
            );
            labels.insert("cost".to_string(), format!("0.{}", 10 + i % 50));
            let allocations = (0..3)
                .map(|k| (format!("svc{}", (i * 7 + k * 13) % 50), 1 + (k as u32)))
                .collect::<BTreeMap<_, _>>();
            Node {
                name: format!("node-{i:05}"),
                labels,
                status: if i % 50 == 49 {
                    NodeStatus::Down
                } else {
                    NodeStatus::Alive
                },
                capacity: cap,
                free: Resources {
                    cpu_millis: cap.cpu_millis - used * 2_000,
                    memory_bytes: cap.memory_bytes - used * (4 << 30),
                    disk_bytes: cap.disk_bytes,
                },
                ports_in_use: if i % 10 == 0 { vec![80, 443] } else { vec![] },
                images: vec![format!("img{}:1", i % 5), "base:1".to_string()],
                allocations,
            }
        })
        .collect();
    Snapshot { nodes }
}

/// One replica of service `svc{k}`: small enough that nodes never fill during a run,
/// with a hard constraint, soft anti-affinity to itself and an image.
fn request(k: usize) -> PlacementRequest {
    PlacementRequest {
        service: format!("svc{}", k % 50),
        replicas: 1,
        resources: Resources {
            cpu_millis: 1,
            memory_bytes: 1 << 10,
            disk_bytes: 0,
        },
        constraints: vec![Constraint::parse("zone != z3").expect("valid")],
        affinities: vec![Affinity {
            target: AffinityTarget::Service(format!("svc{}", k % 50)),
            anti: true,
            hard: false,
        }],
        image: Some(format!("img{}:1", k % 5)),
        ..PlacementRequest::default()
    }
}

fn host() -> PolicyHost {
    let cache = std::env::temp_dir().join("shoal-policy-bench-cache");
    PolicyHost::new(HostConfig {
        cache_dir: Some(cache),
        ..HostConfig::default()
    })
    .expect("policy host starts")
}

/// One `place` call (one replica) on a snapshot that was handed over already.
fn place(c: &mut Criterion) {
    let host = host();
    let mut group = c.benchmark_group("place");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    for n in SIZES {
        let snap = snapshot(n);
        let mut round = host.begin_round(&snap);
        let mut k = 0usize;
        group.bench_with_input(BenchmarkId::new("wasm", n), &n, |b, _| {
            b.iter(|| {
                k += 1;
                let out = round.place(black_box(&request(k)));
                assert!(
                    out.indices.len() == 1 && out.decided_by == DecidedBy::Builtin,
                    "{out:?}"
                );
            })
        });
        let mut cluster = Cluster::new(snap.clone());
        let mut k = 0usize;
        group.bench_with_input(BenchmarkId::new("native", n), &n, |b, _| {
            b.iter(|| {
                k += 1;
                let out = cluster.place(black_box(&request(k))).expect("valid");
                assert_eq!(out.nodes.len(), 1);
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
