//! Orchestration over simulated cores: stewards and executors on every node, with
//! real SWIM failure detection and gossip. A crashed node's replicas, and a crashed
//! steward's duties, move on by themselves.

use shoal_orch::ServiceSpec;
use shoal_policy_logic::Resources;
use shoal_sim::orch::OrchSim;
use shoal_sim::{test_seeds, Sim, SimConfig};

const STEP_MS: u64 = 100;

fn cluster(n: usize, seed: u64) -> OrchSim {
    let mut sim = Sim::new(SimConfig::new(n, seed));
    sim.join_all();
    sim.run_until(|s| s.min_view() >= n, 60_000)
        .unwrap_or_else(|e| panic!("{e}"));
    OrchSim::new(
        sim,
        Resources {
            cpu_millis: 2000,
            memory_bytes: 4 << 30,
            disk_bytes: 0,
        },
        500,
    )
}

fn web(replicas: u32) -> ServiceSpec {
    let text = format!(
        "name = \"web\"\ndriver = \"process\"\ncommand = [\"web\"]\nreplicas = {replicas}\nreschedule_after = \"2s\"\n[resources]\ncpu = \"500m\"\n"
    );
    ServiceSpec::from_toml("web.toml", &text).unwrap()
}

#[test]
fn crashed_nodes_and_stewards_are_replaced() {
    for seed in test_seeds(2) {
        let mut o = cluster(30, seed);
        o.deploy(3, web(12));
        o.run_until(STEP_MS, 30_000, |o| {
            o.steward("web")
                .is_some_and(|s| o.healthy_seen_by(s, "web", "").0 == 12)
        })
        .unwrap_or_else(|| panic!("seed {seed}: 12 replicas never healthy"));

        // A node running replicas (not the steward) crashes.
        let steward = o.steward("web").unwrap();
        let victim = (0..30)
            .find(|&i| i != steward && o.healthy_seen_by(steward, "web", o.name(i)).1)
            .unwrap();
        let victim_name = o.name(victim).to_string();
        o.sim.crash(victim);
        let took = o
            .run_until(STEP_MS, 60_000, |o| {
                o.steward("web").is_some_and(|s| {
                    let (healthy, on_victim) = o.healthy_seen_by(s, "web", &victim_name);
                    healthy == 12 && !on_victim
                })
            })
            .unwrap_or_else(|| panic!("seed {seed}: replicas of {victim_name} not replaced"));
        // Detection, the 2 s grace, placement and start all fit well within a minute.
        assert!(
            took >= 2_000,
            "seed {seed}: moved before reschedule_after ({took} ms)"
        );

        // The steward itself crashes: another node takes over and keeps the service whole.
        let steward = o.steward("web").unwrap();
        let steward_name = o.name(steward).to_string();
        let had = o.healthy_seen_by(steward, "web", &steward_name).1;
        o.sim.crash(steward);
        o.run_until(STEP_MS, 60_000, |o| {
            o.steward("web").is_some_and(|s| {
                let (healthy, on_old) = o.healthy_seen_by(s, "web", &steward_name);
                s != steward && healthy == 12 && !(had && on_old)
            })
        })
        .unwrap_or_else(|| panic!("seed {seed}: no new steward restored the service"));
    }
}
