//! Behaviour tests on the simulation harness: deploy, scale, reschedule, rolling
//! updates, dependencies, capacity, partitions and steward failover.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use shoal_policy_logic::Resources;

use crate::model::{Members, ServiceRecord};
use crate::sim::{Health, Sim};
use crate::snapshot::{build_snapshot, native_scheduler};
use crate::spec::ServiceSpec;
use crate::steward::{reconcile, steward_for, RolloutStatus};

const GI: u64 = 1 << 30;

fn cap(cpu_millis: u64, memory_bytes: u64) -> Resources {
    Resources {
        cpu_millis,
        memory_bytes,
        disk_bytes: 0,
    }
}

/// `n` nodes `n1..` of 4 cores and 8Gi, zones cycling a, b, c.
fn cluster(n: usize) -> Sim {
    let names: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
    let zones = ["a", "b", "c"];
    let nodes: Vec<(&str, &str, Resources)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| (name.as_str(), zones[i % 3], cap(4000, 8 * GI)))
        .collect();
    Sim::new(&nodes)
}

/// A process service `name` with 500m / 256Mi per replica, plus `extra` TOML
/// (top-level keys first, then tables).
fn spec(name: &str, replicas: u32, extra: &str) -> ServiceSpec {
    let text = format!(
        "name = \"{name}\"\ndriver = \"process\"\ncommand = [\"shoal\", \"workload\", \"http\"]\nreplicas = {replicas}\n{extra}\n[resources]\ncpu = \"500m\"\nmemory = \"256Mi\"\n"
    );
    ServiceSpec::from_toml(&format!("{name}.toml"), &text).unwrap_or_else(|e| panic!("{e}"))
}

fn nodes_of(sim: &Sim, service: &str) -> Vec<String> {
    sim.placement(service)
        .into_iter()
        .map(|(_, n)| n.expect("placed"))
        .collect()
}

fn versions(sim: &Sim, service: &str) -> Vec<u64> {
    sim.view(0).slots[service]
        .values()
        .map(|s| s.current.as_ref().map_or(0, |p| p.version))
        .collect()
}

#[test]
fn deploy_three_replicas_spreads_over_zones() {
    let mut sim = cluster(6);
    sim.deploy(&spec("web", 3, "spread = \"zone\""));
    sim.run(5, Sim::check_capacity);
    let nodes = nodes_of(&sim, "web");
    assert_eq!(nodes.len(), 3);
    let distinct: BTreeSet<&String> = nodes.iter().collect();
    assert_eq!(distinct.len(), 3, "{nodes:?}");
    let zones: BTreeSet<String> = nodes
        .iter()
        .map(|n| sim.nodes[n].facts.labels["zone"].clone())
        .collect();
    assert_eq!(zones.len(), 3, "one replica per zone: {nodes:?}");
    assert_eq!(sim.healthy("web"), 3);
    assert_eq!(sim.rollout["web"], RolloutStatus::Complete);
    sim.tick();
    assert_eq!(sim.last_writes, 0, "a converged service needs no writes");
}

#[test]
fn scale_up_to_five_and_down_to_two() {
    let mut sim = cluster(5);
    sim.deploy(&spec("web", 3, ""));
    sim.run(5, Sim::check_capacity);
    let before = sim.placement("web");
    let scaled = sim.record("web").scaled(5).unwrap();
    sim.put_record(&scaled);
    sim.run(5, Sim::check_capacity);
    assert_eq!(sim.healthy("web"), 5);
    let five = nodes_of(&sim, "web");
    assert_eq!(
        five.iter().collect::<BTreeSet<_>>().len(),
        5,
        "spread: {five:?}"
    );
    assert_eq!(
        sim.placement("web")[..3],
        before[..],
        "existing replicas stay put"
    );

    let scaled = sim.record("web").scaled(2).unwrap();
    sim.put_record(&scaled);
    sim.run(3, Sim::check_capacity);
    assert_eq!(
        sim.placement("web"),
        before[..2].to_vec(),
        "highest slots go first"
    );
    assert_eq!(sim.healthy("web"), 2);
    let running: usize = sim.running.values().map(|r| r.len()).sum();
    assert_eq!(running, 2, "the scaled-down replicas were stopped");
    // Scaling does not start a rollout.
    assert_eq!(sim.record("web").version, 1);
}

#[test]
fn down_node_is_replaced_after_reschedule_after_and_not_before() {
    let mut sim = cluster(5);
    sim.deploy(&spec("web", 3, "reschedule_after = \"10s\""));
    sim.run(5, Sim::check_capacity);
    let (slot, victim) = sim.placement("web")[0].clone();
    let victim = victim.unwrap();
    sim.set_health(&victim, Health::Down);
    let down_at = sim.now_ms;
    // Within the grace period the slot stays where it is.
    while sim.now_ms + 1000 < down_at + 10_000 {
        sim.tick();
        sim.check_capacity();
        assert_eq!(
            sim.placement("web")[slot as usize].1.as_deref(),
            Some(victim.as_str())
        );
    }
    sim.run(4, Sim::check_capacity);
    let moved = sim.placement("web")[slot as usize].1.clone().unwrap();
    assert_ne!(moved, victim);
    assert_eq!(sim.healthy("web"), 3);
    assert!(!nodes_of(&sim, "web").contains(&victim));
}

#[test]
fn suspect_node_is_not_rescheduled() {
    let mut sim = cluster(5);
    sim.deploy(&spec("web", 3, "reschedule_after = \"5s\""));
    sim.run(5, Sim::check_capacity);
    let before = sim.placement("web");
    let suspect = before[1].1.clone().unwrap();
    sim.set_health(&suspect, Health::Suspect);
    sim.run(60, Sim::check_capacity);
    assert_eq!(sim.placement("web"), before);
    assert_eq!(sim.healthy("web"), 2);
}

#[test]
fn rolling_update_in_place_keeps_three_of_four_healthy() {
    let mut sim = cluster(5);
    let v1 = spec("web", 4, "[update]\nmax_unavailable = 1");
    sim.deploy(&v1);
    sim.run(6, Sim::check_capacity);
    assert_eq!(sim.healthy("web"), 4);
    let mut v2 = v1.clone();
    v2.env.insert("RELEASE".into(), "2".into());
    sim.deploy(&v2);
    assert_eq!(sim.record("web").version, 2);
    let mut lowest = 4;
    for _ in 0..40 {
        sim.tick();
        sim.check_capacity();
        let h = sim.healthy("web");
        lowest = lowest.min(h);
        assert!(h >= 3, "at {} ms only {h} healthy", sim.now_ms);
    }
    assert_eq!(lowest, 3, "replicas were replaced one at a time");
    assert_eq!(versions(&sim, "web"), vec![2; 4]);
    assert_eq!(sim.rollout["web"], RolloutStatus::Complete);
    assert_eq!(sim.healthy("web"), 4);
    let running: usize = sim.running.values().map(|r| r.len()).sum();
    assert_eq!(running, 4, "old allocations were stopped");
}

#[test]
fn rolling_update_with_surge_keeps_four_healthy() {
    let mut sim = cluster(5);
    let v1 = spec("web", 4, "[update]\nmax_surge = 1");
    sim.deploy(&v1);
    sim.run(6, Sim::check_capacity);
    let mut v2 = v1.clone();
    v2.env.insert("RELEASE".into(), "2".into());
    sim.deploy(&v2);
    let mut most_running = 0;
    for _ in 0..40 {
        sim.tick();
        sim.check_capacity();
        assert_eq!(sim.healthy("web"), 4, "at {} ms", sim.now_ms);
        most_running = most_running.max(sim.running.values().map(|r| r.len()).sum::<usize>());
    }
    assert_eq!(most_running, 5, "exactly one surge replica at a time");
    assert_eq!(versions(&sim, "web"), vec![2; 4]);
    assert_eq!(sim.rollout["web"], RolloutStatus::Complete);
}

#[test]
fn bad_version_stalls_the_rollout_and_keeps_old_replicas() {
    let mut sim = cluster(5);
    let v1 = spec("web", 4, "[update]\nhealthy_deadline = \"10s\"");
    sim.deploy(&v1);
    sim.run(6, Sim::check_capacity);
    sim.bad_versions.insert(("web".into(), 2));
    let mut v2 = v1.clone();
    v2.env.insert("RELEASE".into(), "broken".into());
    sim.deploy(&v2);
    sim.run(60, |s| {
        s.check_capacity();
        assert!(s.healthy("web") >= 3);
    });
    let RolloutStatus::Stalled { reason } = &sim.rollout["web"] else {
        panic!("not stalled: {:?}", sim.rollout["web"]);
    };
    assert!(
        reason.contains("version 2") && reason.contains("not healthy within 10s"),
        "{reason}"
    );
    assert!(
        reason.contains("HTTP 500"),
        "the report's reason is passed on: {reason}"
    );
    let mut v = versions(&sim, "web");
    v.sort();
    assert_eq!(v, vec![1, 1, 1, 2], "the rollout stopped after one replica");
    assert_eq!(sim.healthy("web"), 3, "the old replicas keep running");

    // A fixed version resumes the rollout from where it stopped.
    sim.bad_versions.clear();
    let mut v3 = v2.clone();
    v3.env.insert("RELEASE".into(), "3".into());
    sim.deploy(&v3);
    sim.run(40, |s| assert!(s.healthy("web") >= 3));
    assert_eq!(versions(&sim, "web"), vec![3; 4]);
    assert_eq!(sim.rollout["web"], RolloutStatus::Complete);
}

#[test]
fn dependencies_are_placed_first() {
    let mut sim = cluster(4);
    sim.deploy(&spec("web", 2, "depends_on = [\"db\"]"));
    sim.run(3, Sim::check_capacity);
    let view = sim.view(0);
    for slot in view.slots["web"].values() {
        assert!(slot.current.is_none());
        assert_eq!(slot.reason.as_deref(), Some("dependency db does not exist"));
    }
    sim.deploy(&spec("db", 1, ""));
    // db exists but has no healthy replica yet: web waits for it.
    sim.tick();
    for slot in sim.view(0).slots["web"].values() {
        assert!(slot.current.is_none());
        assert_eq!(slot.reason.as_deref(), Some("waiting for dependency db"));
    }
    let mut db_healthy_at = None;
    let mut web_placed_at = None;
    for _ in 0..15 {
        sim.tick();
        if db_healthy_at.is_none() && sim.healthy("db") == 1 {
            db_healthy_at = Some(sim.now_ms);
        }
        if web_placed_at.is_none() && sim.placement("web").iter().any(|(_, n)| n.is_some()) {
            web_placed_at = Some(sim.now_ms);
        }
    }
    let (db, web) = (db_healthy_at.unwrap(), web_placed_at.unwrap());
    assert!(web > db, "web placed at {web} ms, db healthy at {db} ms");
    assert_eq!(sim.healthy("web"), 2);
}

#[test]
fn unplaceable_replicas_say_why() {
    let small = cap(4000, GI);
    let mut sim = Sim::new(&[("n1", "a", small), ("n2", "b", small), ("n3", "c", small)]);
    let mut big = spec("big", 2, "");
    big.resources.memory_bytes = 2 * GI;
    sim.deploy(&big);
    sim.run(3, Sim::check_capacity);
    let view = sim.view(0);
    for slot in view.slots["big"].values() {
        assert!(slot.current.is_none());
        assert_eq!(
            slot.reason.as_deref(),
            Some("0/3 nodes fit: 3 insufficient memory")
        );
    }
    // Half fits: two 600Mi replicas per 1Gi node is too many, so 3 of 4 place.
    let mut mid = spec("mid", 4, "");
    mid.resources.memory_bytes = 600 << 20;
    sim.deploy(&mid);
    sim.run(3, Sim::check_capacity);
    let placed = sim
        .placement("mid")
        .iter()
        .filter(|(_, n)| n.is_some())
        .count();
    assert_eq!(placed, 3);
    let view = sim.view(0);
    assert_eq!(
        view.slots["mid"][&3].reason.as_deref(),
        Some("0/3 nodes fit: 3 insufficient memory")
    );
}

#[test]
fn steward_failover_carries_on() {
    let mut sim = cluster(5);
    sim.deploy(&spec("web", 3, "reschedule_after = \"5s\""));
    sim.run(5, Sim::check_capacity);
    let first = sim.stewards["web"].clone();
    sim.set_health(&first, Health::Down);
    sim.run(10, Sim::check_capacity);
    let alive: Vec<&str> = sim
        .nodes
        .keys()
        .filter(|n| **n != first)
        .map(String::as_str)
        .collect();
    let second = steward_for("web", alive.iter().copied()).unwrap();
    assert_eq!(sim.stewards["web"], second);
    assert_ne!(second, first);
    assert_eq!(sim.healthy("web"), 3);
    assert!(!nodes_of(&sim, "web").contains(&first));
    // Every node computes the same (empty) plan from the settled state.
    let members = sim.members(0);
    let view = sim.view(0);
    let facts: Vec<_> = sim
        .nodes
        .values()
        .map(|n| {
            let mut f = n.facts.clone();
            f.status = members[&f.name].status;
            f
        })
        .collect();
    let snapshot = build_snapshot(&facts, &view.slots);
    for _node in alive {
        let input = view.reconcile_input("web", &members, &snapshot, sim.now_ms);
        assert!(reconcile(&input, &mut |s, r| native_scheduler(s, r))
            .writes
            .is_empty());
    }
}

#[test]
fn removed_service_stops_everything_then_its_record_goes() {
    let mut sim = cluster(3);
    sim.deploy(&spec("web", 3, ""));
    sim.run(5, Sim::check_capacity);
    let removed = sim.record("web").removed();
    sim.put_record(&removed);
    sim.run(3, |_| {});
    let view = sim.view(0);
    assert!(!view.slots.contains_key("web"));
    assert!(
        !view.services.contains_key("web"),
        "record deleted once nothing runs"
    );
    assert_eq!(sim.running.values().map(|r| r.len()).sum::<usize>(), 0);
    // Deploying again revives it with a new version.
    sim.deploy(&spec("web", 1, ""));
    sim.run(5, |_| {});
    assert_eq!(sim.healthy("web"), 1);
}

/// Two stewards on both sides of a partition place the same slots differently;
/// after the merge (in either order) each slot names one node and the loser's copy
/// is stopped.
#[test]
fn partition_heal_converges_to_one_node_per_slot() {
    let mut sim = cluster(4);
    sim.deploy(&spec(
        "web",
        2,
        "spread = \"zone\"\nreschedule_after = \"5s\"",
    ));
    sim.run(5, Sim::check_capacity);
    let placed = nodes_of(&sim, "web");
    // One replica on each side.
    let left: Vec<String> = vec![placed[0].clone()]
        .into_iter()
        .chain(
            sim.nodes
                .keys()
                .filter(|n| !placed.contains(n))
                .take(1)
                .cloned(),
        )
        .collect();
    let right: Vec<String> = sim
        .nodes
        .keys()
        .filter(|n| !left.contains(n))
        .cloned()
        .collect();
    sim.partition(&[left.clone(), right.clone()]);
    sim.run(15, Sim::check_capacity);
    // Each side re-placed the replica it lost onto its own nodes.
    for side in 0..2 {
        let view = sim.view(side);
        for slot in view.slots["web"].values() {
            assert!(sim.sides[side].nodes.contains(slot.node().unwrap()));
        }
    }
    assert_eq!(
        sim.running.values().map(|r| r.len()).sum::<usize>(),
        4,
        "both sides serve"
    );

    // Merge order does not matter.
    let mut ab = sim.sides[0].state.clone();
    let mut ba = sim.sides[1].state.clone();
    for e in sim.sides[1].state.entries() {
        ab.apply(e.clone()).unwrap();
    }
    for e in sim.sides[0].state.entries() {
        ba.apply(e.clone()).unwrap();
    }
    assert_eq!(
        ab.entries().collect::<Vec<_>>(),
        ba.entries().collect::<Vec<_>>()
    );

    sim.heal();
    let view = sim.view(0);
    assert_eq!(view.slots["web"].len(), 2);
    sim.run(1, |_| {});
    // Every slot is run by exactly one node, and nothing else runs.
    let view = sim.view(0);
    let named: BTreeSet<&str> = view.slots["web"]
        .values()
        .map(|s| s.current.as_ref().unwrap().alloc_id.as_str())
        .collect();
    let mut runners: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (node, allocs) in &sim.running {
        for id in allocs.keys() {
            runners.entry(id.as_str()).or_default().push(node.as_str());
        }
    }
    assert_eq!(
        runners.keys().copied().collect::<BTreeSet<_>>(),
        named,
        "losers stopped their copies"
    );
    assert!(runners.values().all(|n| n.len() == 1));
}

#[derive(Debug, Clone)]
enum Event {
    Down(usize),
    Up(usize),
    Suspect(usize),
    Partition(u8),
    Heal,
    Scale(u32),
    Wait,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (0usize..6).prop_map(Event::Down),
        (0usize..6).prop_map(Event::Up),
        (0usize..6).prop_map(Event::Suspect),
        (1u8..63).prop_map(Event::Partition),
        Just(Event::Heal),
        (0u32..8).prop_map(Event::Scale),
        Just(Event::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Random node failures, suspicions, partitions (which also move stewardships)
    /// and scaling: no side ever reserves more than a node holds; after healing and
    /// recovery every slot is placed, run by exactly one node, and healthy.
    #[test]
    fn failures_and_partitions_never_overcommit(events in proptest::collection::vec((event(), 1usize..12), 1..10)) {
        let names: Vec<String> = (1..=6).map(|i| format!("n{i}")).collect();
        let zones = ["a", "b", "c"];
        // Tight: 2 cores and 1.5Gi per node, 6 nodes.
        let nodes: Vec<(&str, &str, Resources)> = names.iter().enumerate()
            .map(|(i, n)| (n.as_str(), zones[i % 3], cap(2000, 3 * GI / 2))).collect();
        let mut sim = Sim::new(&nodes);
        sim.deploy(&spec("web", 4, "spread = \"zone\"\nreschedule_after = \"3s\""));
        let mut db = spec("db", 2, "reschedule_after = \"5s\"");
        db.resources = cap(1000, GI);
        sim.deploy(&db);
        sim.run(4, Sim::check_capacity);
        for (ev, ticks) in events {
            match ev {
                Event::Down(i) => sim.set_health(&names[i], Health::Down),
                Event::Up(i) => sim.set_health(&names[i], Health::Up),
                Event::Suspect(i) => sim.set_health(&names[i], Health::Suspect),
                Event::Partition(mask) => {
                    let a: Vec<String> = names.iter().enumerate()
                        .filter(|(i, _)| mask & (1 << i) != 0).map(|(_, n)| n.clone()).collect();
                    let b: Vec<String> = names.iter().filter(|n| !a.contains(n)).cloned().collect();
                    sim.partition(&[a, b]);
                }
                Event::Heal => sim.heal(),
                Event::Scale(n) => {
                    let side = 0;
                    if let Some(r) = sim.view(side).services.get("web").cloned() {
                        let r: ServiceRecord = r.scaled(n).unwrap();
                        sim.put_record(&r);
                    }
                }
                Event::Wait => {}
            }
            sim.run(ticks, Sim::check_capacity);
        }
        sim.heal();
        for n in &names {
            sim.set_health(n, Health::Up);
        }
        sim.run(20, Sim::check_capacity);
        let view = sim.view(0);
        let mut runners: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (node, allocs) in &sim.running {
            for id in allocs.keys() {
                runners.entry(id.clone()).or_default().push(node.clone());
            }
        }
        let mut named = BTreeSet::new();
        for (service, slots) in &view.slots {
            let want = view.services[service].replicas;
            prop_assert_eq!(slots.len() as u32, want, "{}", service);
            for (n, slot) in slots.iter() {
                let p = slot.current.as_ref();
                prop_assert!(p.is_some(), "{} slot {} unplaced: {:?}", service, n, slot.reason);
                let p = p.unwrap();
                prop_assert_eq!(runners.get(&p.alloc_id).map(Vec::len), Some(1), "{} slot {}", service, n);
                named.insert(p.alloc_id.clone());
            }
            prop_assert_eq!(sim.healthy(service), want);
        }
        prop_assert_eq!(runners.keys().cloned().collect::<BTreeSet<_>>(), named);
        let members: Members = sim.members(0);
        prop_assert!(members.values().all(|m| m.status == shoal_policy_logic::NodeStatus::Alive));
    }
}
