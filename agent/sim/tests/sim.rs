//! Deterministic cluster scenarios. Every failure message names the seed;
//! `SHOAL_SIM_SEED=<seed> cargo test -p shoal-sim` replays just that seed.
//!
//! All scenarios live in one test binary so cargo runs them on parallel threads.

use shoal_core::Status;
use shoal_sim::{test_seeds, Sim, SimConfig};

/// Builds a SWIM cluster of `n`, joins it, and waits until everyone sees everyone.
///
/// With the core's defaults, full membership after a mass join can take a
/// while: foca gossips each join a bounded number of times, and the few
/// (observer, member) pairs it misses are repaired by round-robin probes.
fn joined(cfg: SimConfig, deadline_ms: u64) -> Sim {
    let n = cfg.nodes;
    let mut sim = Sim::new(cfg);
    sim.join_all();
    let took = sim
        .run_until(|s| s.all_see_alive(n), deadline_ms)
        .unwrap_or_else(|e| panic!("{n} nodes never all saw {n} alive: {e}"));
    eprintln!(
        "seed {}: {n} nodes all alive after {took} virtual ms",
        sim.seed()
    );
    sim
}

/// The headline scenario: 200 LAN agents, a partition into halves with writes
/// on both sides (one key written on both), then heal. Replicas must end
/// identical, the conflict resolved the same everywhere, and membership whole.
#[test]
fn partition_with_conflicting_writes_heals() {
    const N: usize = 200;
    for seed in test_seeds(1) {
        // Membership is checked every 100 virtual ms: members() of 200 nodes is not free.
        let cfg = SimConfig {
            check_every_ms: 100,
            ..SimConfig::new(N, seed)
        };
        let mut sim = joined(cfg, 400_000);
        let left: Vec<usize> = (0..N / 2).collect();
        let right: Vec<usize> = (N / 2..N).collect();
        sim.partition(&[left.clone(), right.clone()]);
        let split = sim
            .run_until(|s| s.all_see_alive(N / 2), 300_000)
            .unwrap_or_else(|e| panic!("halves never saw each other down: {e}"));

        for i in (0..N).step_by(20) {
            sim.put(i, &format!("app/k{i}"), format!("v{i}").as_bytes())
                .expect("put");
        }
        sim.put(left[7], "app/conflict", b"left").expect("put");
        sim.put(right[7], "app/conflict", b"right").expect("put");
        // Each side converges on its own value, proving the partition holds.
        sim.run_until(
            |s| {
                s.converged_on("app/conflict", b"left") == 0.5
                    && s.converged_on("app/conflict", b"right") == 0.5
            },
            30_000,
        )
        .unwrap_or_else(|e| panic!("sides did not converge separately: {e}"));
        assert!(
            !sim.states_equal(),
            "seed {seed}: replicas equal across a partition"
        );

        sim.heal();
        let took = sim
            .run_until(|s| s.states_equal(), 120_000)
            .unwrap_or_else(|e| panic!("replicas did not converge after heal: {e}"));
        let winner = sim
            .node(0)
            .state()
            .value("app/conflict")
            .map(<[u8]>::to_vec);
        assert!(
            matches!(winner.as_deref(), Some(b"left" | b"right")),
            "seed {seed}: conflict resolved to {winner:?}"
        );
        let winner = winner.unwrap_or_default();
        assert_eq!(
            sim.converged_on("app/conflict", &winner),
            1.0,
            "seed {seed}"
        );
        for i in (0..N).step_by(20) {
            let want = format!("v{i}");
            assert_eq!(
                sim.converged_on(&format!("app/k{i}"), want.as_bytes()),
                1.0,
                "seed {seed}: app/k{i} missing somewhere after heal (took {took} ms)"
            );
        }
        let rejoined = sim
            .run_until(|s| s.all_see_alive(N), 900_000)
            .unwrap_or_else(|e| panic!("membership did not heal: {e}"));
        eprintln!("seed {seed}: split seen in {split} ms, replicas equal {took} ms and membership whole {rejoined} ms after heal");
        assert!(sim.states_equal(), "seed {seed}: replicas diverged again");
    }
}

/// 10% of SWIM datagrams lost: membership still converges and a put reaches all.
#[test]
fn datagram_loss_still_converges() {
    const N: usize = 50;
    for seed in test_seeds(5) {
        let cfg = SimConfig {
            datagram_loss: 0.10,
            ..SimConfig::new(N, seed)
        };
        let mut sim = joined(cfg, 300_000);
        assert!(
            sim.net_stats().lost > 0,
            "seed {seed}: loss configured but nothing lost"
        );
        sim.put(N - 1, "app/lossy", b"made it").expect("put");
        sim.run_until(|s| s.converged_on("app/lossy", b"made it") == 1.0, 30_000)
            .unwrap_or_else(|e| panic!("put did not reach every node: {e}"));
        assert!(
            sim.all_see_alive(N),
            "seed {seed}: a live member was lost to datagram loss"
        );
    }
}

/// A crashed node is declared down by everyone; a node that leaves is seen as left.
#[test]
fn crash_is_down_and_leave_is_left() {
    const N: usize = 40;
    for seed in test_seeds(3) {
        let mut sim = joined(SimConfig::new(N, seed), 300_000);
        let (crashed, leaver) = (7, 23);

        sim.crash(crashed);
        sim.run_until(|s| s.all_see_status(crashed, Status::Down), 60_000)
            .unwrap_or_else(|e| panic!("crashed node not seen down by all: {e}"));

        assert!(
            sim.all_see_status(leaver, Status::Alive),
            "seed {seed}: leaver not alive before leaving"
        );
        sim.leave(leaver);
        sim.run_until(|s| s.all_see_status(leaver, Status::Left), 60_000)
            .unwrap_or_else(|e| panic!("departed node not seen as left by all: {e}"));
        // The crash stays a crash: no `left` marker was ever written for it.
        assert!(
            sim.all_see_status(crashed, Status::Down),
            "seed {seed}: crashed node no longer seen as down"
        );
        assert!(
            sim.all_see_alive(N - 2),
            "seed {seed}: survivors do not see each other"
        );
    }
}

/// What a scenario produced, compared across runs.
#[derive(Debug, PartialEq)]
struct Trace {
    converged_ms: u64,
    spread_ms: u64,
    bytes: Vec<u64>,
    net: shoal_sim::NetStats,
    events: shoal_sim::EventCounts,
    now: u64,
}

fn lossy_scenario(seed: u64) -> Trace {
    const N: usize = 30;
    let cfg = SimConfig {
        datagram_loss: 0.05,
        clock_skew_ms: 200,
        ..SimConfig::new(N, seed)
    };
    let mut sim = Sim::new(cfg);
    sim.join_all();
    let converged_ms = sim
        .run_until(|s| s.all_see_alive(N), 300_000)
        .unwrap_or_else(|e| panic!("{e}"));
    sim.partition(&[(0..10).collect()]);
    sim.put(3, "app/x", b"1").expect("put");
    sim.put(20, "app/x", b"2").expect("put");
    sim.run_for(5_000);
    sim.heal();
    let spread_ms = sim
        .run_until(|s| s.states_equal(), 60_000)
        .unwrap_or_else(|e| panic!("{e}"));
    Trace {
        converged_ms,
        spread_ms,
        bytes: sim.bytes_sent_per_node(),
        net: sim.net_stats().clone(),
        events: sim.event_counts().clone(),
        now: sim.now(),
    }
}

/// Same seed, same run, to the byte; another seed takes another path.
#[test]
fn same_seed_same_run() {
    for seed in test_seeds(2) {
        let a = lossy_scenario(seed);
        let b = lossy_scenario(seed);
        assert_eq!(a, b, "seed {seed}: two runs of the same seed differ");
        let c = lossy_scenario(seed + 1000);
        assert_ne!(
            a.bytes,
            c.bytes,
            "seeds {seed} and {}: identical traffic",
            seed + 1000
        );
    }
}

/// Replication alone at a size SWIM would not fit: a write and then its delete
/// reach all 2,000 static-peer nodes quickly.
#[test]
fn static_peers_replicate_to_all() {
    const N: usize = 2_000;
    for seed in test_seeds(2) {
        let cfg = SimConfig {
            static_peers: true,
            ..SimConfig::new(N, seed)
        };
        let mut sim = Sim::new(cfg);
        sim.join_all();
        sim.run_for(1_000);
        sim.watch("app/flag", b"on");
        sim.put(N / 3, "app/flag", b"on").expect("put");
        let took = sim
            .run_until(|s| s.watch_count() == N, 10_000)
            .unwrap_or_else(|e| panic!("write did not reach all static peers: {e}"));
        // Epidemic push: O(log N) hops of 1-5 ms, far below a second.
        assert!(took < 1_000, "seed {seed}: {took} ms to reach {N} nodes");
        // The watch records exact arrival times; run_until checks every 10 ms.
        let exact = sim.watch_time_to(1.0).expect("every node arrived");
        assert!(
            exact <= took && took < exact + 10,
            "seed {seed}: watch {exact} ms vs run {took} ms"
        );
        sim.delete(0, "app/flag").expect("delete");
        sim.run_until(|s| s.converged_on("app/flag", b"on") == 0.0, 10_000)
            .unwrap_or_else(|e| panic!("delete did not reach all static peers: {e}"));
        sim.run_until(|s| s.states_equal(), 10_000)
            .unwrap_or_else(|e| panic!("static replicas differ: {e}"));
        assert!(
            sim.node(N - 1)
                .state()
                .get("app/flag")
                .is_some_and(|e| e.is_tombstone()),
            "seed {seed}: tombstone missing"
        );
    }
}

/// Wall clocks seconds apart (within the core's drift limit): concurrent writes
/// to one key still settle on a single value everywhere.
#[test]
fn clock_skew_still_converges() {
    const N: usize = 30;
    for seed in test_seeds(3) {
        let cfg = SimConfig {
            clock_skew_ms: 5_000,
            ..SimConfig::new(N, seed)
        };
        let mut sim = joined(cfg, 300_000);
        for i in 0..N {
            sim.put(i, "app/skewed", format!("from n{i}").as_bytes())
                .expect("put");
        }
        sim.run_until(|s| s.states_equal(), 30_000)
            .unwrap_or_else(|e| panic!("skewed writers did not converge: {e}"));
        let v = sim.node(0).state().value("app/skewed").map(<[u8]>::to_vec);
        assert!(v.is_some(), "seed {seed}: key lost");
        let dropped: u64 = (0..N)
            .map(|i| {
                sim.node(i)
                    .stats()
                    .dropped
                    .get("clock_drift")
                    .copied()
                    .unwrap_or(0)
            })
            .sum();
        assert_eq!(
            dropped, 0,
            "seed {seed}: 5 s skew is within max_drift, nothing may be refused"
        );
    }
}

/// A failing run names its seed and how to replay it.
#[test]
fn failure_names_the_seed() {
    let mut sim = Sim::new(SimConfig::new(3, 4242));
    let err = sim
        .run_until(|_| false, 50)
        .expect_err("an impossible goal");
    let msg = err.to_string();
    assert!(
        msg.contains("4242") && msg.contains("SHOAL_SIM_SEED=4242"),
        "{msg}"
    );
    assert_eq!(sim.now(), 50);
}
