//! Orchestration on top of the simulated cores: stewards and executors at scale.
//!
//! [`OrchSim`] drives a [`Sim`] (real cores: SWIM membership and the replicated
//! map) and, every step of virtual time, does on each running node what the agent
//! does, with the agent's own code: the nodes that may be steward of a service
//! (the best-ranked by rendezvous hash) run [`shoal_orch::NodeOrch::pass`] — member
//! table, settle gate, tombstone rule, reconcile with the native scheduler, rollout
//! statuses — over their own replica of the state and write there; every node runs
//! what [`shoal_orch::assigned`] (the pass's last step) says its replica's slots
//! assign it (a fake executor: an allocation reports running and healthy
//! `start_delay_ms` after its node first sees it) and drops the rest. Nothing is
//! shared between nodes but what the cores gossip, so detection time, placement and
//! report spreading are all what a real cluster of that size would see, minus
//! process start-up costs.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use shoal_core::{State, Status};
use shoal_orch::{
    assigned, encode, is_healthy, native_scheduler, rendezvous_score, report_key, service_key,
    steward_for, AllocReport, AllocState, ClusterView, Member, Members, NodeFacts, NodeOrch,
    ServiceRecord, ServiceSpec, Settle, Write,
};
use shoal_policy_logic::{NodeStatus, Resources};

use crate::Sim;

/// Only the nodes ranked this high for a service check whether they are its
/// steward; a lower-ranked node is steward only if all of these are gone.
const CANDIDATES: usize = 8;

/// A simulated cluster running orchestration.
pub struct OrchSim {
    /// The simulated cores.
    pub sim: Sim,
    /// Capacity of every node.
    pub capacity: Resources,
    /// Virtual ms from a node seeing an allocation to its report of running and healthy.
    pub start_delay_ms: u64,
    names: Vec<String>,
    /// Per service, node indices in rendezvous order (best first).
    ranks: BTreeMap<String, Vec<usize>>,
    /// Per steward candidate, its orchestration pass state (created at its first
    /// pass; it saw every member alive when the cluster formed).
    orch: HashMap<usize, NodeOrch>,
    /// Per node: alloc id -> virtual ms it first saw the allocation.
    running: Vec<BTreeMap<String, u64>>,
    /// Per node: alloc ids it has reported.
    reported: Vec<BTreeSet<String>>,
    /// Per node: fingerprint of the slots it last acted on.
    seen_slots: Vec<u64>,
}

impl OrchSim {
    /// Orchestration over `sim`, whose nodes all get `capacity`.
    pub fn new(sim: Sim, capacity: Resources, start_delay_ms: u64) -> OrchSim {
        let n = sim.len();
        OrchSim {
            names: (0..n).map(|i| format!("n{i}")).collect(),
            sim,
            capacity,
            start_delay_ms,
            ranks: BTreeMap::new(),
            orch: HashMap::new(),
            running: vec![BTreeMap::new(); n],
            reported: vec![BTreeSet::new(); n],
            seen_slots: vec![u64::MAX; n],
        }
    }

    /// Node `i`'s name.
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Deploys `spec` through node `via`.
    pub fn deploy(&mut self, via: usize, spec: ServiceSpec) {
        let name = spec.name.clone();
        let mut order: Vec<usize> = (0..self.names.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(rendezvous_score(&name, &self.names[i])));
        self.ranks.insert(name.clone(), order);
        let record = ServiceRecord::deploy(None, spec);
        self.sim
            .put(via, &service_key(&name), &encode(&record))
            .expect("service record is a valid entry");
    }

    /// Runs `ms` of virtual time in steps of `step_ms`, orchestrating after each.
    pub fn run_for(&mut self, ms: u64, step_ms: u64) {
        let end = self.sim.now() + ms;
        while self.sim.now() < end {
            self.sim.run_for(step_ms.min(end - self.sim.now()));
            self.step();
        }
    }

    /// Runs until `pred` holds (checked after every step) or `timeout_ms` passes;
    /// returns the virtual ms it took.
    pub fn run_until(
        &mut self,
        step_ms: u64,
        timeout_ms: u64,
        mut pred: impl FnMut(&OrchSim) -> bool,
    ) -> Option<u64> {
        let start = self.sim.now();
        while self.sim.now() < start + timeout_ms {
            if pred(self) {
                return Some(self.sim.now() - start);
            }
            self.sim.run_for(step_ms);
            self.step();
        }
        pred(self).then(|| self.sim.now() - start)
    }

    /// The node currently acting as steward of `service`: the best-ranked running
    /// node that sees no better-ranked node alive.
    pub fn steward(&self, service: &str) -> Option<usize> {
        let order = self.ranks.get(service)?;
        order
            .iter()
            .copied()
            .filter(|&i| self.sim.is_live(i))
            .find(|&i| self.is_steward(service, i))
    }

    fn is_steward(&self, service: &str, i: usize) -> bool {
        let Some(members) = self.orch.get(&i).map(NodeOrch::members) else {
            return false;
        };
        let alive = members
            .iter()
            .filter(|(_, m)| m.status == NodeStatus::Alive)
            .map(|(n, _)| n.as_str());
        steward_for(service, alive) == Some(self.names[i].as_str())
    }

    /// How node `i` sees member `name`.
    pub fn status_seen_by(&self, i: usize, name: &str) -> Option<NodeStatus> {
        self.orch.get(&i)?.members().get(name).map(|m| m.status)
    }

    /// Slots of `service` healthy on live nodes, as node `i`'s replica says, and
    /// whether any of them is placed on `avoid`.
    pub fn healthy_seen_by(&self, i: usize, service: &str, avoid: &str) -> (u32, bool) {
        let view = view_of(self.sim.node(i).state());
        let members: Members = self
            .names
            .iter()
            .enumerate()
            .map(|(j, n)| {
                let status = if self.sim.is_live(j) {
                    NodeStatus::Alive
                } else {
                    NodeStatus::Down
                };
                (
                    n.clone(),
                    Member {
                        status,
                        since_ms: 0,
                    },
                )
            })
            .collect();
        let empty = BTreeMap::new();
        let reports = view.reports.get(service).map_or(&empty, |r| r.as_ref());
        let slots = view
            .slots
            .get(service)
            .map(|s| s.as_ref().clone())
            .unwrap_or_default();
        let healthy = slots
            .values()
            .filter(|s| {
                s.current
                    .as_ref()
                    .is_some_and(|p| is_healthy(p, reports, &members))
            })
            .count() as u32;
        let on_avoid = slots.values().any(|s| s.node() == Some(avoid));
        (healthy, on_avoid)
    }

    fn step(&mut self) {
        let now = self.sim.now();
        let services: Vec<String> = self.ranks.keys().cloned().collect();
        // Membership of every steward candidate.
        let mut candidates = BTreeSet::new();
        for s in &services {
            let order = &self.ranks[s];
            let mut taken = 0;
            for &i in order {
                if self.sim.is_live(i) {
                    candidates.insert(i);
                    taken += 1;
                    if taken >= CANDIDATES {
                        break;
                    }
                }
            }
        }
        // Steward candidates run the agent's pass on their own replica.
        let facts: BTreeMap<String, NodeFacts> = self
            .names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    NodeFacts {
                        name: n.clone(),
                        capacity: self.capacity,
                        ..NodeFacts::default()
                    },
                )
            })
            .collect();
        for &i in &candidates {
            let wall = self.sim.now_of(i).wall_ms;
            let membership: Vec<(String, NodeStatus)> = self
                .sim
                .view_of(i)
                .into_iter()
                .map(|(id, st)| (id.name, to_status(st)))
                .collect();
            let me = self.names[i].clone();
            let orch = self.orch.entry(i).or_insert_with(|| {
                // It has been part of the formed cluster since before the scenario.
                let mut o = NodeOrch::new(&me, 0, true, Settle::default());
                let all: Vec<(String, NodeStatus)> = membership
                    .iter()
                    .map(|(n, _)| (n.clone(), NodeStatus::Alive))
                    .collect();
                o.observe(&all, &[], 0);
                o
            });
            let out = orch.pass_over_state(
                self.sim.node(i).state(),
                wall,
                &membership,
                &facts,
                &mut native_scheduler,
            );
            for w in out.writes {
                let _ = match w {
                    Write::Put { key, value } => self.sim.put(i, &key, &value),
                    Write::Delete { key } => self.sim.delete(i, &key),
                };
            }
        }
        // Every node runs what its replica's slots name.
        for i in 0..self.names.len() {
            if !self.sim.is_live(i) {
                continue;
            }
            let fingerprint = slots_fingerprint(self.sim.node(i).state());
            let pending = self.running[i]
                .keys()
                .any(|id| !self.reported[i].contains(id));
            if fingerprint == self.seen_slots[i] && !pending {
                continue;
            }
            self.seen_slots[i] = fingerprint;
            let view = view_of(self.sim.node(i).state());
            let mine: BTreeMap<String, (String, u32, u64)> = assigned(&self.names[i], &view)
                .into_iter()
                .map(|a| {
                    (
                        a.placement.alloc_id.clone(),
                        (a.service, a.slot, a.placement.version),
                    )
                })
                .collect();
            for id in mine.keys() {
                self.running[i].entry(id.clone()).or_insert(now);
            }
            let gone: Vec<String> = self.running[i]
                .keys()
                .filter(|id| !mine.contains_key(*id))
                .cloned()
                .collect();
            for id in gone {
                self.running[i].remove(&id);
                if self.reported[i].remove(&id) {
                    let _ = self.sim.delete(i, &report_key(&self.names[i], &id));
                }
            }
            let due: Vec<String> = self.running[i]
                .iter()
                .filter(|(id, at)| {
                    now >= *at + self.start_delay_ms && !self.reported[i].contains(*id)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in due {
                let (service, slot, version) = mine[&id].clone();
                let report = AllocReport {
                    service,
                    slot,
                    version,
                    state: AllocState::Running,
                    healthy: true,
                    ..AllocReport::default()
                };
                let _ = self
                    .sim
                    .put(i, &report_key(&self.names[i], &id), &encode(&report));
                self.reported[i].insert(id);
            }
        }
    }
}

/// A cheap fingerprint of the slot entries of a replica (their stamps).
fn slots_fingerprint(state: &State) -> u64 {
    state
        .scan_prefix(shoal_orch::SLOT_PREFIX)
        .fold(0u64, |acc, e| {
            acc.wrapping_mul(31)
                .wrapping_add(e.hlc.0 ^ e.key.len() as u64)
        })
}

fn to_status(st: Status) -> NodeStatus {
    match st {
        Status::Alive => NodeStatus::Alive,
        Status::Suspect => NodeStatus::Suspect,
        Status::Down => NodeStatus::Down,
        Status::Left => NodeStatus::Left,
    }
}

/// The orchestration keys of a replica, decoded.
fn view_of(state: &State) -> ClusterView {
    ClusterView::from_state(state).0
}
