//! A deterministic test harness: nodes with capacities, the real replicated map
//! (`shoal_core::State`) per side of a partition, every node running the agent's
//! own orchestration pass ([`NodeOrch::pass`]: member table, settle gate, stewards'
//! [`crate::reconcile`] with the native scheduler, tombstone rule, rollout
//! statuses), and fake executors that run what the pass assigns them and report
//! it. No networking and no clock: each [`Sim::tick`] advances virtual time by one
//! second. A node that comes back up is a restarted agent: a fresh pass state that
//! must settle again before it acts.

use std::collections::{BTreeMap, BTreeSet};

use shoal_core::{Entry, Hlc, State, WriterId};
use shoal_policy_logic::{NodeStatus, Resources};

use crate::model::{
    encode, report_key, service_key, AllocReport, AllocState, ClusterView, Member, Members,
    ServiceRecord,
};
use crate::pass::{Assigned, NodeOrch, Settle};
use crate::snapshot::{native_scheduler, NodeFacts};
use crate::spec::ServiceSpec;
use crate::steward::{steward_for, RolloutStatus, Write};

/// Virtual time per tick.
pub const TICK_MS: u64 = 1000;

/// How a node is, in truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Running and reachable.
    Up,
    /// Dead: runs nothing; seen as down.
    Down,
    /// Unreachable but not yet declared down: seen as suspect; runs nothing.
    Suspect,
}

/// One simulated machine.
#[derive(Debug, Clone)]
pub struct SimNode {
    pub facts: NodeFacts,
    pub health: Health,
    /// When `health` last changed.
    pub since_ms: u64,
}

/// An allocation a fake agent runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Running {
    pub service: String,
    pub slot: u32,
    pub version: u64,
    pub ticks: u32,
    pub healthy: bool,
}

/// One side of a partition: the nodes in it and their shared replica of the state
/// (replication inside a side is instant; only partitions delay it).
#[derive(Debug, Clone)]
pub struct Side {
    pub nodes: BTreeSet<String>,
    pub state: State,
}

/// The simulated cluster.
pub struct Sim {
    pub now_ms: u64,
    pub nodes: BTreeMap<String, SimNode>,
    pub sides: Vec<Side>,
    /// When the current partition began (meaningful with several sides).
    pub partition_ms: u64,
    /// Per node: what its agent runs.
    pub running: BTreeMap<String, BTreeMap<String, Running>>,
    /// Ticks after start before an allocation turns healthy.
    pub healthy_after: u32,
    /// `(service, version)` pairs that never get healthy.
    pub bad_versions: BTreeSet<(String, u64)>,
    /// Last rollout status per service (from side 0's steward).
    pub rollout: BTreeMap<String, RolloutStatus>,
    /// Steward per service in the last tick (side 0).
    pub stewards: BTreeMap<String, String>,
    /// Writes per tick, for idempotency checks.
    pub last_writes: usize,
    /// Every node's orchestration pass state (a restart replaces it).
    orch: BTreeMap<String, NodeOrch>,
    /// Per node: whether its last pass was settled, and what it assigned the node.
    assigned: BTreeMap<String, (bool, Vec<Assigned>)>,
    seq: BTreeMap<String, u64>,
    logical: u16,
}

/// The settle gate every simulated node runs with (the agent's).
const SETTLE: Settle = Settle {
    after_peer_ms: 3_000,
    alone_ms: 1_000,
    cut_off_ms: 30_000,
};

impl Sim {
    /// A cluster of `nodes` (`(name, zone, capacity)`), all up, one side.
    pub fn new(nodes: &[(&str, &str, Resources)]) -> Sim {
        let mut map = BTreeMap::new();
        for (name, zone, cap) in nodes {
            map.insert(
                name.to_string(),
                SimNode {
                    facts: NodeFacts {
                        name: name.to_string(),
                        status: NodeStatus::Alive,
                        labels: [("zone".to_string(), zone.to_string())].into(),
                        capacity: *cap,
                        images: Vec::new(),
                        ports_in_use: Vec::new(),
                    },
                    health: Health::Up,
                    since_ms: 0,
                },
            );
        }
        let mut sim = Sim {
            now_ms: 0,
            sides: vec![Side {
                nodes: map.keys().cloned().collect(),
                state: State::new(),
            }],
            running: map.keys().map(|n| (n.clone(), BTreeMap::new())).collect(),
            nodes: map,
            partition_ms: 0,
            healthy_after: 2,
            bad_versions: BTreeSet::new(),
            rollout: BTreeMap::new(),
            stewards: BTreeMap::new(),
            last_writes: 0,
            orch: BTreeMap::new(),
            assigned: BTreeMap::new(),
            seq: BTreeMap::new(),
            logical: 0,
        };
        // The agents joined at time 0 and have seen each other since: the scenario
        // starts once their views settled.
        for name in sim.nodes.keys().cloned().collect::<Vec<_>>() {
            let mut o = NodeOrch::new(&name, 0, true, SETTLE);
            o.observe(&sim.membership(0), &[], 0);
            sim.orch.insert(name, o);
        }
        sim.now_ms = SETTLE.after_peer_ms - TICK_MS;
        sim
    }

    /// Membership as nodes of `side` see it: every node with its status.
    fn membership(&self, side: usize) -> Vec<(String, NodeStatus)> {
        self.members(side)
            .into_iter()
            .map(|(n, m)| (n, m.status))
            .collect()
    }

    /// Applies `writes` to one side as `writer`, stamped with the virtual time.
    pub fn apply(&mut self, side: usize, writer: &str, writes: Vec<Write>) {
        for w in writes {
            let seq = self.seq.entry(writer.to_string()).or_insert(0);
            *seq += 1;
            self.logical = self.logical.wrapping_add(1);
            let (key, value) = match w {
                Write::Put { key, value } => (key, Some(value)),
                Write::Delete { key } => (key, None),
            };
            let e = Entry {
                key,
                value,
                hlc: Hlc::new(self.now_ms, self.logical),
                writer: WriterId {
                    node: writer.to_string(),
                    gen: 1,
                },
                seq: *seq,
            };
            self.sides[side].state.apply(e).expect("valid entry");
        }
    }

    /// Decodes one side's state.
    pub fn view(&self, side: usize) -> ClusterView {
        let (view, errors) = ClusterView::from_state(&self.sides[side].state);
        assert!(errors.is_empty(), "{errors:?}");
        view
    }

    /// Deploys (or redeploys) a spec through side 0.
    pub fn deploy(&mut self, spec: &ServiceSpec) {
        let current = self.view(0).services.get(&spec.name).cloned();
        let record = ServiceRecord::deploy(current.as_deref(), spec.clone());
        self.put_record(&record);
    }

    /// Writes a record through side 0.
    pub fn put_record(&mut self, record: &ServiceRecord) {
        let w = Write::Put {
            key: service_key(&record.spec.name),
            value: encode(record),
        };
        self.apply(0, "cli", vec![w]);
    }

    /// The record of `service` on side 0.
    pub fn record(&self, service: &str) -> ServiceRecord {
        self.view(0).services[service].as_ref().clone()
    }

    /// Membership as nodes in `side` see it.
    pub fn members(&self, side: usize) -> Members {
        let here = &self.sides[side].nodes;
        self.nodes
            .iter()
            .map(|(name, n)| {
                let m = if here.contains(name) {
                    match n.health {
                        Health::Up => Member {
                            status: NodeStatus::Alive,
                            since_ms: n.since_ms,
                        },
                        Health::Down => Member {
                            status: NodeStatus::Down,
                            since_ms: n.since_ms,
                        },
                        Health::Suspect => Member {
                            status: NodeStatus::Suspect,
                            since_ms: n.since_ms,
                        },
                    }
                } else {
                    // Across the partition every node looks down since it began
                    // (or since it died, if that was earlier).
                    let since = match n.health {
                        Health::Up => self.partition_ms,
                        _ => n.since_ms.min(self.partition_ms),
                    };
                    Member {
                        status: NodeStatus::Down,
                        since_ms: since,
                    }
                };
                (name.clone(), m)
            })
            .collect()
    }

    /// Every up node of one side runs its orchestration pass (only stewards write
    /// slots); returns the number of writes.
    pub fn reconcile_side(&mut self, side: usize) -> usize {
        let membership = self.membership(side);
        let facts: BTreeMap<String, NodeFacts> = self
            .nodes
            .values()
            .map(|n| (n.facts.name.clone(), n.facts.clone()))
            .collect();
        let nodes: Vec<String> = self.sides[side].nodes.iter().cloned().collect();
        let mut total = 0;
        for node in nodes {
            if self.nodes[&node].health != Health::Up {
                continue;
            }
            let orch = self.orch.get_mut(&node).expect("every node has a pass");
            let out = orch.pass_over_state(
                &self.sides[side].state,
                self.now_ms,
                &membership,
                &facts,
                &mut native_scheduler,
            );
            total += out.writes.len();
            let stewarded = out.stewarded > 0;
            self.apply(side, &node, out.writes);
            self.assigned
                .insert(node.clone(), (out.settled, out.assigned));
            if stewarded {
                self.check_idempotent(side, &node, &membership, &facts);
            }
        }
        if side == 0 {
            let alive: Vec<String> = membership
                .iter()
                .filter(|(_, st)| *st == NodeStatus::Alive)
                .map(|(n, _)| n.clone())
                .collect();
            for service in self.view(0).services.keys() {
                let Some(steward) = steward_for(service, alive.iter().map(String::as_str)) else {
                    continue;
                };
                self.stewards.insert(service.clone(), steward.to_string());
                if let Some(r) = self.orch[steward].rollout(service) {
                    self.rollout.insert(service.clone(), r.status.clone());
                }
            }
        }
        total
    }

    /// Over the state a pass just produced, another pass at the same time changes
    /// nothing but the reasons of slots that could not be placed (they describe the
    /// room other services took later in the same pass), and a third changes nothing.
    fn check_idempotent(
        &mut self,
        side: usize,
        node: &str,
        membership: &[(String, NodeStatus)],
        facts: &BTreeMap<String, NodeFacts>,
    ) {
        for round in 0..2 {
            let orch = self.orch.get_mut(node).expect("every node has a pass");
            let again = orch.pass_over_state(
                &self.sides[side].state,
                self.now_ms,
                membership,
                facts,
                &mut native_scheduler,
            );
            let only_reasons = again.writes.iter().all(|w| match w {
                Write::Put { key, value } => {
                    let old = self.sides[side]
                        .state
                        .value(key)
                        .and_then(|v| serde_json::from_slice::<crate::model::Slot>(v).ok());
                    let new = serde_json::from_slice::<crate::model::Slot>(value).ok();
                    matches!((old, new), (Some(o), Some(n)) if o.current == n.current && o.next == n.next)
                }
                Write::Delete { .. } => false,
            });
            assert!(
                again.writes.is_empty() || (round == 0 && only_reasons),
                "{node} at {} ms: the pass is not idempotent (round {round}): {:?}",
                self.now_ms,
                again
                    .writes
                    .iter()
                    .map(|w| match w {
                        Write::Put { key, value } => format!(
                            "{key} {} -> {}",
                            String::from_utf8_lossy(
                                self.sides[side].state.value(key).unwrap_or(b"-")
                            ),
                            String::from_utf8_lossy(value)
                        ),
                        Write::Delete { key } => key.clone(),
                    })
                    .collect::<Vec<_>>()
            );
            if again.writes.is_empty() {
                return;
            }
            self.apply(side, node, again.writes);
        }
    }

    /// Every up node of one side runs what its last pass assigned it and reports it,
    /// like the agent's executor: before its view settled it starts nothing new and
    /// stops nothing.
    pub fn agents_side(&mut self, side: usize) {
        let view = self.view(side);
        let nodes: Vec<String> = self.sides[side].nodes.iter().cloned().collect();
        for node in nodes {
            if self.nodes[&node].health != Health::Up {
                continue;
            }
            let (settled, assigned) = self.assigned.get(&node).cloned().unwrap_or_default();
            let mut writes = Vec::new();
            let running = self.running.entry(node.clone()).or_default();
            let wanted: BTreeSet<&str> = assigned
                .iter()
                .map(|a| a.placement.alloc_id.as_str())
                .collect();
            if settled {
                let orphans: Vec<String> = running
                    .keys()
                    .filter(|id| !wanted.contains(id.as_str()))
                    .cloned()
                    .collect();
                for id in orphans {
                    running.remove(&id);
                    writes.push(Write::Delete {
                        key: report_key(&node, &id),
                    });
                }
            }
            for a in &assigned {
                if !settled && !running.contains_key(&a.placement.alloc_id) {
                    continue;
                }
                let bad = self
                    .bad_versions
                    .contains(&(a.service.clone(), a.placement.version));
                let r = running
                    .entry(a.placement.alloc_id.clone())
                    .or_insert_with(|| Running {
                        service: a.service.clone(),
                        slot: a.slot,
                        version: a.placement.version,
                        ticks: 0,
                        healthy: false,
                    });
                r.ticks += 1;
                r.healthy = !bad && r.ticks > self.healthy_after;
                let report = AllocReport {
                    service: r.service.clone(),
                    slot: r.slot,
                    version: r.version,
                    state: if r.ticks > 1 {
                        AllocState::Running
                    } else {
                        AllocState::Starting
                    },
                    healthy: r.healthy,
                    reason: bad.then(|| "health check failed: HTTP 500".to_string()),
                    ..AllocReport::default()
                };
                let old = view
                    .reports
                    .get(&a.service)
                    .and_then(|r| r.get(&a.placement.alloc_id))
                    .map(|r| &r.report);
                if old != Some(&report) {
                    writes.push(Write::Put {
                        key: report_key(&node, &a.placement.alloc_id),
                        value: encode(&report),
                    });
                }
            }
            self.apply(side, &node, writes);
        }
    }

    /// One second: stewards reconcile, then agents act, on every side.
    pub fn tick(&mut self) {
        self.now_ms += TICK_MS;
        let mut writes = 0;
        for side in 0..self.sides.len() {
            writes += self.reconcile_side(side);
            self.agents_side(side);
        }
        self.last_writes = writes;
    }

    /// Ticks `n` times, calling `check` after each.
    pub fn run(&mut self, n: usize, mut check: impl FnMut(&Sim)) {
        for _ in 0..n {
            self.tick();
            check(self);
        }
    }

    /// Changes a node's health. A node that dies loses its workloads; one that
    /// comes back starts with none and clears its old reports (node-owned state is
    /// rebuilt on start).
    pub fn set_health(&mut self, node: &str, health: Health) {
        let was = self.nodes[node].health;
        if was == health {
            return;
        }
        let n = self.nodes.get_mut(node).expect("known node");
        n.health = health;
        n.since_ms = self.now_ms;
        if health != Health::Up {
            if let Some(r) = self.running.get_mut(node) {
                r.clear();
            }
        } else {
            // A restarted agent: its pass state starts afresh and must settle again.
            let side = self.side_of(node);
            let mut o = NodeOrch::new(node, self.now_ms, true, SETTLE);
            o.observe(&self.membership(side), &[], self.now_ms);
            self.orch.insert(node.to_string(), o);
            self.assigned.remove(node);
            let side = self.side_of(node);
            let stale: Vec<Write> = self.sides[side]
                .state
                .scan_prefix(&format!("node/{node}/alloc/"))
                .map(|e| Write::Delete { key: e.key.clone() })
                .collect();
            self.apply(side, node, stale);
        }
    }

    /// The side `node` is on.
    pub fn side_of(&self, node: &str) -> usize {
        self.sides
            .iter()
            .position(|s| s.nodes.contains(node))
            .unwrap_or(0)
    }

    /// Splits the cluster: each group gets a copy of the (single) current state.
    pub fn partition(&mut self, groups: &[Vec<String>]) {
        self.heal();
        let state = self.sides[0].state.clone();
        self.sides = groups
            .iter()
            .map(|g| Side {
                nodes: g.iter().cloned().collect(),
                state: state.clone(),
            })
            .collect();
        self.partition_ms = self.now_ms;
    }

    /// Merges every side into one, as anti-entropy does when a partition heals.
    pub fn heal(&mut self) {
        if self.sides.len() == 1 {
            return;
        }
        let mut merged = State::new();
        let mut nodes = BTreeSet::new();
        for side in &self.sides {
            for e in side.state.entries() {
                merged.apply(e.clone()).expect("valid entry");
            }
            nodes.extend(side.nodes.iter().cloned());
        }
        self.sides = vec![Side {
            nodes,
            state: merged,
        }];
    }

    /// Replicas of `service` whose current allocation really runs healthy (the
    /// agents' truth, not the reports).
    pub fn healthy(&self, service: &str) -> u32 {
        let view = self.view(0);
        let Some(slots) = view.slots.get(service) else {
            return 0;
        };
        slots
            .values()
            .filter(|s| {
                s.current.as_ref().is_some_and(|p| {
                    self.nodes[&p.node].health == Health::Up
                        && self.running[&p.node]
                            .get(&p.alloc_id)
                            .is_some_and(|r| r.healthy)
                })
            })
            .count() as u32
    }

    /// Panics if any side's slots reserve more than a node's capacity.
    pub fn check_capacity(&self) {
        for (i, side) in self.sides.iter().enumerate() {
            let view = self.view(i);
            let mut used: BTreeMap<&str, Resources> = BTreeMap::new();
            for slots in view.slots.values() {
                for slot in slots.values() {
                    for p in slot.placements() {
                        let u = used.entry(p.node.as_str()).or_default();
                        u.cpu_millis += p.reserved.resources.cpu_millis;
                        u.memory_bytes += p.reserved.resources.memory_bytes;
                    }
                }
            }
            for (node, u) in used {
                let cap = self.nodes[node].facts.capacity;
                assert!(
                    u.cpu_millis <= cap.cpu_millis && u.memory_bytes <= cap.memory_bytes,
                    "side {i} ({:?}) at {} ms: {node} holds {u:?}, capacity {cap:?}",
                    side.nodes,
                    self.now_ms
                );
            }
        }
    }

    /// `(slot, node)` of every current allocation of `service` on side 0.
    pub fn placement(&self, service: &str) -> Vec<(u32, Option<String>)> {
        self.view(0)
            .slots
            .get(service)
            .map(|s| {
                s.iter()
                    .map(|(n, slot)| (*n, slot.node().map(str::to_string)))
                    .collect()
            })
            .unwrap_or_default()
    }
}
