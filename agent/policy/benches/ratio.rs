//! Interleaved wasm-vs-native placement timing, robust to a busy machine: each trial
//! places `ROUND_LEN` single-replica requests through the built-in component and then
//! natively, on fresh copies of the same cluster, and the report gives the minimum and
//! the median per-placement time over the trials.
//!
//! `cargo bench -p shoal-policy --bench ratio --no-run && taskset -c 0 cargo bench -p shoal-policy --bench ratio`

use std::time::{Duration, Instant};

use shoal_policy::logic::Cluster;
use shoal_policy::{DecidedBy, HostConfig, PolicyHost};

mod support;

const TRIALS: usize = 25;
const ROUND_LEN: usize = 500;

fn main() {
    let cache = std::env::temp_dir().join("shoal-policy-bench-cache");
    let host = PolicyHost::new(HostConfig {
        cache_dir: Some(cache),
        ..HostConfig::default()
    })
    .expect("host");
    println!(
        "{:>6}  {:>22}  {:>22}  {:>12}",
        "nodes", "wasm µs (min / median)", "native µs (min / median)", "ratio (min)"
    );
    for n in [0, support::SIZES[0], support::SIZES[1], support::SIZES[2]] {
        let snap = support::snapshot(n);
        // With no nodes, zero replicas: the fixed cost of a call, nothing else.
        let requests: Vec<_> = (1..=ROUND_LEN)
            .map(|k| {
                let mut r = support::request(k);
                r.replicas = u32::from(n > 0);
                r
            })
            .collect();
        let (mut wasm, mut native) = (Vec::new(), Vec::new());
        for _ in 0..TRIALS {
            let mut round = host.begin_round(&snap);
            round.place(&requests[0]);
            let started = Instant::now();
            for r in &requests {
                let out = round.place(r);
                assert!(
                    out.indices.len() == usize::from(n > 0) && out.decided_by == DecidedBy::Builtin,
                    "{out:?}"
                );
            }
            wasm.push(started.elapsed() / ROUND_LEN as u32);

            let mut cluster = Cluster::new(snap.clone());
            cluster.place(&requests[0]).expect("valid");
            let started = Instant::now();
            for r in &requests {
                assert_eq!(
                    cluster.place(r).expect("valid").nodes.len(),
                    usize::from(n > 0)
                );
            }
            native.push(started.elapsed() / ROUND_LEN as u32);
        }
        let stats = |v: &mut Vec<Duration>| {
            v.sort();
            (v[0].as_secs_f64() * 1e6, v[v.len() / 2].as_secs_f64() * 1e6)
        };
        let (w, nat) = (stats(&mut wasm), stats(&mut native));
        println!(
            "{n:>6}  {:>10.2} / {:>9.2}  {:>10.2} / {:>11.2}  {:>12.2}",
            w.0,
            w.1,
            nat.0,
            nat.1,
            w.0 / nat.0
        );
    }
}
