//! One node's orchestration pass, as a sans-IO state machine.
//!
//! Every node runs [`NodeOrch::pass`] over its own replica of the cluster state:
//! the agent on its orchestration task, and both simulators for every simulated
//! node, so the simulations test exactly what agents run. One pass:
//!
//! 1. refreshes the member table, stamping when each node's status changed (a node
//!    known from the state but missing from membership counts as down from when it
//!    was first missed, so it gets the full `reschedule_after` grace);
//! 2. decides whether the view has *settled*: [`Settle::after_peer_ms`] after the
//!    first peer was seen, at once without seeds (after [`Settle::alone_ms`]), or
//!    [`Settle::cut_off_ms`] after start if no seed ever answered (an edge site cut
//!    off while it restarted keeps working on its own). Before that the node acts
//!    on nothing: a restarted node must not reschedule from a one-node view;
//! 3. once settled, evaluates the scaler of every autoscaled service it is steward of
//!    when its interval is due ([`crate::autoscale`]), writing `scale/<svc>`;
//! 4. runs [`reconcile`] for every service it is steward of, over the
//!    view with the writes of the services before it applied (so two services in
//!    one pass cannot overcommit a node). Slots without a record are cleaned up
//!    only if the record is a tombstone: a record merely not received yet must not
//!    delete anything;
//! 5. publishes each stewarded service's rollout status (`node/<me>/rollout/<svc>`)
//!    when it changed, and deletes the statuses of services that are gone;
//! 6. says what this node must run: every current and next placement naming it.
//!
//! It reads no clock and touches no state: the caller passes the time, the
//! membership, the decoded view, a scheduler and a scaler, and applies the returned
//! writes.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use shoal_policy_logic::{NodeStatus, PlacementRequest, Snapshot};

use crate::autoscale::{decide, native_scaler, scale_input, scale_key, Recommendation};
use crate::model::{encode, rollout_key, ClusterView, Member, Members, Placement};
use crate::snapshot::{build_snapshot, NodeFacts, Placed};
use crate::steward::{allocs_for_node, reconcile, steward_for, RolloutStatus, Write};

/// When a node's view counts as settled (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settle {
    /// Time after the first peer is seen.
    pub after_peer_ms: u64,
    /// Time after start for a node without seeds.
    pub alone_ms: u64,
    /// Time after start for a node none of whose seeds answered.
    pub cut_off_ms: u64,
}

impl Default for Settle {
    /// 3 s after the first peer, 1 s alone, 30 s cut off.
    fn default() -> Self {
        Settle {
            after_peer_ms: 3_000,
            alone_ms: 1_000,
            cut_off_ms: 30_000,
        }
    }
}

/// A steward's published rollout status: `node/<steward>/rollout/<service>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedRollout {
    /// The service version it is about.
    pub version: u64,
    /// The status.
    pub status: RolloutStatus,
}

/// An allocation this node must run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    /// Service.
    pub service: String,
    /// Slot number.
    pub slot: u32,
    /// The allocation.
    pub placement: Placement,
    /// A surge allocation (the slot's `next`).
    pub next: bool,
}

/// What a pass is given.
#[derive(Debug, Clone, Copy)]
pub struct PassInput<'a> {
    /// Now, wall-clock ms (the clock placements and member stamps use).
    pub now_ms: u64,
    /// Every member membership knows, one entry per name (its newest identity),
    /// this node included.
    pub membership: &'a [(String, NodeStatus)],
    /// Nodes the state knows (they published their info), alive or not.
    pub known_nodes: &'a [String],
    /// The decoded orchestration state of this node's replica.
    pub view: &'a ClusterView,
    /// Services whose record is a tombstone (known to be gone).
    pub tombstoned: &'a BTreeSet<String>,
    /// What the scheduler should know of each node, by name (status is set by the
    /// pass from its member table).
    pub facts: &'a BTreeMap<String, NodeFacts>,
    /// Services this node has a published rollout status for in the state.
    pub published_rollouts: &'a BTreeSet<String>,
}

/// What a pass decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassOutput {
    /// Whether the view has settled (nothing new starts and no orphan is stopped
    /// before).
    pub settled: bool,
    /// Writes to apply: slots of stewarded services, rollout statuses.
    pub writes: Vec<Write>,
    /// Allocations this node must run.
    pub assigned: Vec<Assigned>,
    /// Rollout statuses that changed this pass, for logs.
    pub rollouts: Vec<(String, RolloutStatus)>,
    /// What the stewarded services' reconciles reported (rescheduled, moved,
    /// placement failed) and rollouts that stalled, for `shoal events`.
    pub events: Vec<OrchEvent>,
    /// Services reconciled as steward.
    pub stewarded: u32,
}

/// An event of one service's orchestration, as this node's steward saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrchEvent {
    /// The service.
    pub service: String,
    /// `rescheduled`, `moved`, `placement failed` or `rollout stalled`.
    pub kind: &'static str,
    /// What happened.
    pub reason: String,
}

/// One node's orchestration state (see the module docs).
#[derive(Debug, Clone)]
pub struct NodeOrch {
    me: String,
    started_ms: u64,
    has_seeds: bool,
    settle: Settle,
    first_peer_ms: Option<u64>,
    members: Members,
    rollouts: BTreeMap<String, PublishedRollout>,
    /// When each autoscaled service's scaler last ran here.
    evaluated: BTreeMap<String, u64>,
    /// Reconcile calls made as steward.
    pub passes: u64,
    /// Writes made as steward.
    pub writes: u64,
}

impl NodeOrch {
    /// Orchestration for node `me`, started at `started_ms`; `has_seeds`: it was
    /// given seeds to join through.
    pub fn new(me: &str, started_ms: u64, has_seeds: bool, settle: Settle) -> NodeOrch {
        NodeOrch {
            me: me.to_string(),
            started_ms,
            has_seeds,
            settle,
            first_peer_ms: None,
            members: Members::new(),
            rollouts: BTreeMap::new(),
            evaluated: BTreeMap::new(),
            passes: 0,
            writes: 0,
        }
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The rollout status this node last published for `service` as its steward.
    pub fn rollout(&self, service: &str) -> Option<&PublishedRollout> {
        self.rollouts.get(service)
    }

    /// The member table: status and since when, per node.
    pub fn members(&self) -> &Members {
        &self.members
    }

    /// Whether the view has settled enough to act on (see the module docs).
    pub fn settled(&self, now_ms: u64) -> bool {
        match self.first_peer_ms {
            Some(t) => now_ms >= t + self.settle.after_peer_ms,
            None if self.has_seeds => now_ms >= self.started_ms + self.settle.cut_off_ms,
            None => now_ms >= self.started_ms + self.settle.alone_ms,
        }
    }

    /// Step 1: the member table from what membership says now.
    pub fn observe(&mut self, membership: &[(String, NodeStatus)], known: &[String], now_ms: u64) {
        let mut seen = BTreeSet::new();
        for (name, status) in membership {
            let status = if *name == self.me {
                NodeStatus::Alive
            } else {
                *status
            };
            if *name != self.me && status == NodeStatus::Alive && self.first_peer_ms.is_none() {
                self.first_peer_ms = Some(now_ms);
            }
            stamp(&mut self.members, name, status, now_ms);
            seen.insert(name.as_str());
        }
        for name in known {
            if seen.contains(name.as_str()) {
                continue;
            }
            match self.members.get(name) {
                Some(m) if matches!(m.status, NodeStatus::Down | NodeStatus::Left) => {}
                _ => stamp(&mut self.members, name, NodeStatus::Down, now_ms),
            }
        }
    }

    /// Runs one pass (see the module docs), placing through `scheduler` and sizing
    /// autoscaled services with the built-in scalers ([`native_scaler`]).
    pub fn pass(
        &mut self,
        input: &PassInput<'_>,
        scheduler: &mut dyn FnMut(&Snapshot, &[PlacementRequest]) -> Vec<Placed>,
    ) -> PassOutput {
        self.pass_with(input, scheduler, &mut native_scaler)
    }

    /// Runs one pass, placing through `scheduler` and sizing autoscaled services
    /// through `scaler` (the agent passes its policy host).
    pub fn pass_with(
        &mut self,
        input: &PassInput<'_>,
        scheduler: &mut dyn FnMut(&Snapshot, &[PlacementRequest]) -> Vec<Placed>,
        scaler: &mut dyn FnMut(&shoal_policy_logic::ScaleInput) -> Recommendation,
    ) -> PassOutput {
        self.observe(input.membership, input.known_nodes, input.now_ms);
        let settled = self.settled(input.now_ms);
        let mut out = PassOutput {
            settled,
            ..PassOutput::default()
        };
        if !settled {
            out.assigned = assigned(&self.me, input.view);
            return out;
        }
        let mut view = input.view.clone();
        // A drained node takes nothing new: schedulers never see it.
        let mut facts = self.facts(input.facts);
        facts.retain(|f| !view.drains.contains_key(&f.name));
        let mut snapshot = build_snapshot(&facts, &view.slots);
        let alive: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.status == NodeStatus::Alive)
            .map(|(n, _)| n.clone())
            .collect();
        let names: BTreeSet<String> = view
            .services
            .keys()
            .chain(view.slots.keys())
            .cloned()
            .collect();
        // A service later in the order may free room an earlier one needed (a
        // scale-down, a move): when the first sweep wrote slots, a second one gives
        // the earlier services that room now instead of a pass later.
        for sweep in 0..2 {
            let mut wrote_slots = false;
            for name in &names {
                if steward_for(name, alive.iter().map(String::as_str)) != Some(self.me.as_str()) {
                    continue;
                }
                let record = view.services.get(name).cloned();
                if record.is_none() && !input.tombstoned.contains(name) {
                    continue;
                }
                if sweep == 0 {
                    out.stewarded += 1;
                    if let Some(w) = self.autoscale(name, &view, input.now_ms, scaler) {
                        view.apply_write(&w);
                        out.writes.push(w);
                    }
                }
                let reconciled = {
                    let ri = view.reconcile_input(name, &self.members, &snapshot, input.now_ms);
                    reconcile(&ri, scheduler)
                };
                self.passes += 1;
                let wrote = !reconciled.writes.is_empty();
                wrote_slots |= wrote;
                for w in &reconciled.writes {
                    view.apply_write(w);
                }
                self.writes += reconciled.writes.len() as u64;
                out.writes.extend(reconciled.writes);
                out.events
                    .extend(reconciled.events.into_iter().map(|n| OrchEvent {
                        service: name.clone(),
                        kind: n.kind,
                        reason: n.reason,
                    }));
                if let Some(r) = record {
                    let published = PublishedRollout {
                        version: r.version,
                        status: reconciled.rollout,
                    };
                    if self.rollouts.get(name) != Some(&published) {
                        if let RolloutStatus::Stalled { reason } = &published.status {
                            out.events.push(OrchEvent {
                                service: name.clone(),
                                kind: "rollout stalled",
                                reason: format!("version {}: {reason}", r.version),
                            });
                        }
                        out.writes.push(Write::Put {
                            key: rollout_key(&self.me, name),
                            value: encode(&published),
                        });
                        out.rollouts.push((name.clone(), published.status.clone()));
                        self.rollouts.insert(name.clone(), published);
                    }
                }
                if wrote {
                    // Later services must see what this one just reserved.
                    snapshot = build_snapshot(&facts, &view.slots);
                }
            }
            if !wrote_slots {
                break;
            }
        }
        for svc in input.published_rollouts {
            if !view.services.contains_key(svc) {
                self.rollouts.remove(svc);
                out.writes.push(Write::Delete {
                    key: rollout_key(&self.me, svc),
                });
            }
        }
        out.assigned = assigned(&self.me, &view);
        out
    }

    /// Runs a pass over a replica of the state, decoding it first: what the
    /// simulators do (the agent keeps a decoded view and calls [`NodeOrch::pass`]).
    pub fn pass_over_state(
        &mut self,
        state: &shoal_core::State,
        now_ms: u64,
        membership: &[(String, NodeStatus)],
        facts: &BTreeMap<String, NodeFacts>,
        scheduler: &mut dyn FnMut(&Snapshot, &[PlacementRequest]) -> Vec<Placed>,
    ) -> PassOutput {
        let (view, _) = ClusterView::from_state(state);
        let tombstoned = crate::model::tombstoned_services(state);
        let published = crate::model::published_rollouts(state, &self.me);
        let input = PassInput {
            now_ms,
            membership,
            known_nodes: &[],
            view: &view,
            tombstoned: &tombstoned,
            facts,
            published_rollouts: &published,
        };
        self.pass(&input, scheduler)
    }

    /// Step 3 for one stewarded service: the scale state to write, if it changed.
    fn autoscale(
        &mut self,
        name: &str,
        view: &ClusterView,
        now_ms: u64,
        scaler: &mut dyn FnMut(&shoal_policy_logic::ScaleInput) -> Recommendation,
    ) -> Option<Write> {
        let record = view.services.get(name).filter(|r| !r.deleted);
        let state = view.scales.get(name).map(|s| s.as_ref());
        let Some((record, auto)) = record.and_then(|r| Some((r, r.spec.autoscaling()?))) else {
            // Removed, or no longer autoscaled: the state goes with it.
            self.evaluated.remove(name);
            return state.map(|_| Write::Delete {
                key: scale_key(name),
            });
        };
        let interval = auto.interval.as_millis() as u64;
        if let Some(at) = self.evaluated.get(name) {
            if now_ms < at.saturating_add(interval) && now_ms >= *at {
                return None;
            }
        }
        self.evaluated.insert(name.to_string(), now_ms);
        let current = crate::autoscale::effective_replicas(&auto, record.replicas, state);
        let empty_slots = crate::model::SlotMap::new();
        let empty_reports = crate::model::Reports::new();
        let scale_in = scale_input(
            &auto,
            record,
            current,
            view.slots.get(name).map_or(&empty_slots, |s| s.as_ref()),
            view.reports
                .get(name)
                .map_or(&empty_reports, |r| r.as_ref()),
            &self.members,
            now_ms,
        );
        let rec = scaler(&scale_in);
        let before = state.cloned().unwrap_or_default();
        let next = decide(
            &auto,
            &record.spec.scaler,
            &before,
            current,
            &rec,
            now_ms,
            &self.me,
        );
        (state != Some(&next)).then(|| Write::Put {
            key: scale_key(name),
            value: encode(&next),
        })
    }

    /// One scheduler fact per member, with the member table's status.
    fn facts(&self, known: &BTreeMap<String, NodeFacts>) -> Vec<NodeFacts> {
        self.members
            .iter()
            .map(|(name, m)| {
                let mut f = known.get(name).cloned().unwrap_or_else(|| NodeFacts {
                    name: name.clone(),
                    ..NodeFacts::default()
                });
                f.status = m.status;
                f
            })
            .collect()
    }
}

/// Records `status` for `name`, stamping the time if it changed.
fn stamp(members: &mut Members, name: &str, status: NodeStatus, now_ms: u64) {
    match members.get_mut(name) {
        Some(m) if m.status == status => {}
        Some(m) => {
            *m = Member {
                status,
                since_ms: now_ms,
            }
        }
        None => {
            members.insert(
                name.to_string(),
                Member {
                    status,
                    since_ms: now_ms,
                },
            );
        }
    }
}

/// Step 5: every allocation the slots of `view` assign to `me`.
pub fn assigned(me: &str, view: &ClusterView) -> Vec<Assigned> {
    allocs_for_node(me, &view.slots)
        .into_iter()
        .map(|a| Assigned {
            service: a.service.to_string(),
            slot: a.slot,
            placement: a.placement.clone(),
            next: a.next,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{service_key, ServiceRecord};
    use crate::snapshot::native_scheduler;
    use crate::spec::ServiceSpec;
    use shoal_policy_logic::Resources;

    fn facts(names: &[&str]) -> BTreeMap<String, NodeFacts> {
        names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    NodeFacts {
                        name: n.to_string(),
                        capacity: Resources {
                            cpu_millis: 4000,
                            memory_bytes: 4 << 30,
                            disk_bytes: 0,
                        },
                        ..NodeFacts::default()
                    },
                )
            })
            .collect()
    }

    fn view_with(service: &str, replicas: u32) -> ClusterView {
        let text = format!(
            "name = \"{service}\"\ndriver = \"process\"\ncommand = [\"x\"]\nreplicas = {replicas}\n"
        );
        let spec = ServiceSpec::from_toml("s.toml", &text).unwrap();
        let mut view = ClusterView::default();
        view.apply_entry(
            &service_key(service),
            Some(&encode(&ServiceRecord::deploy(None, spec))),
        )
        .unwrap();
        view
    }

    #[test]
    fn settles_after_a_peer_alone_or_cut_off() {
        let s = Settle::default();
        let mut o = NodeOrch::new("n1", 1_000, true, s);
        assert!(
            !o.settled(1_000 + s.cut_off_ms - 1),
            "seeds may still answer"
        );
        assert!(o.settled(1_000 + s.cut_off_ms), "cut off: act alone");
        let peers = vec![
            ("n1".to_string(), NodeStatus::Alive),
            ("n2".to_string(), NodeStatus::Alive),
        ];
        o.observe(&peers, &[], 2_000);
        assert!(!o.settled(2_000 + s.after_peer_ms - 1));
        assert!(o.settled(2_000 + s.after_peer_ms));
        let lone = NodeOrch::new("n1", 1_000, false, s);
        assert!(!lone.settled(1_000));
        assert!(lone.settled(1_000 + s.alone_ms));
        // A node known from the state but not from membership is down since first missed.
        let mut o = NodeOrch::new("n1", 0, true, s);
        o.observe(&peers, &["n3".to_string()], 5_000);
        assert_eq!(o.members()["n3"].status, NodeStatus::Down);
        assert_eq!(o.members()["n3"].since_ms, 5_000);
        o.observe(&peers, &["n3".to_string()], 9_000);
        assert_eq!(o.members()["n3"].since_ms, 5_000, "the stamp stays");
    }

    #[test]
    fn nothing_happens_before_the_view_settles() {
        let names = ["n1", "n2", "n3"];
        let membership: Vec<(String, NodeStatus)> = names
            .iter()
            .map(|n| (n.to_string(), NodeStatus::Alive))
            .collect();
        let view = view_with("web", 3);
        let facts = facts(&names);
        let empty = BTreeSet::new();
        // Every node tries; the steward writes only once settled.
        let mut total = 0;
        for me in names {
            let mut orch = NodeOrch::new(me, 0, true, Settle::default());
            let input = PassInput {
                now_ms: 1_000,
                membership: &membership,
                known_nodes: &[],
                view: &view,
                tombstoned: &empty,
                facts: &facts,
                published_rollouts: &empty,
            };
            let early = orch.pass(&input, &mut native_scheduler);
            assert!(!early.settled && early.writes.is_empty(), "{me}");
            let later = orch.pass(
                &PassInput {
                    now_ms: 4_000,
                    ..input
                },
                &mut native_scheduler,
            );
            assert!(later.settled);
            total += later.writes.len();
        }
        // One steward: 3 slots and its rollout status.
        assert_eq!(total, 4);
    }

    /// A drained node gets nothing new, and each of its allocations gets a
    /// replacement elsewhere that takes over once healthy; undrained, it takes
    /// placements again.
    #[test]
    fn a_drained_node_is_emptied_through_healthy_replacements() {
        let names = ["n1", "n2", "n3"];
        let membership: Vec<(String, NodeStatus)> = names
            .iter()
            .map(|n| (n.to_string(), NodeStatus::Alive))
            .collect();
        let facts = facts(&names);
        let empty = BTreeSet::new();
        let mut orchs: Vec<NodeOrch> = names
            .iter()
            .map(|me| NodeOrch::new(me, 0, true, Settle::default()))
            .collect();
        let mut view = view_with("web", 4);
        let mut round = |view: &mut ClusterView, now_ms: u64| -> Vec<OrchEvent> {
            let mut events = Vec::new();
            for orch in orchs.iter_mut() {
                let input = PassInput {
                    now_ms,
                    membership: &membership,
                    known_nodes: &[],
                    view,
                    tombstoned: &empty,
                    facts: &facts,
                    published_rollouts: &empty,
                };
                let out = orch.pass(&input, &mut native_scheduler);
                for w in &out.writes {
                    view.apply_write(w);
                }
                events.extend(out.events);
            }
            events
        };
        let healthy_all = |view: &mut ClusterView| {
            let placements: Vec<(u32, Placement)> = view.slots["web"]
                .iter()
                .flat_map(|(n, s)| s.placements().map(|p| (*n, p.clone())).collect::<Vec<_>>())
                .collect();
            for (slot, p) in placements {
                let report = crate::model::AllocReport {
                    service: "web".into(),
                    slot,
                    version: p.version,
                    state: crate::model::AllocState::Running,
                    healthy: true,
                    ..Default::default()
                };
                view.apply_entry(
                    &crate::model::report_key(&p.node, &p.alloc_id),
                    Some(&encode(&report)),
                )
                .unwrap();
            }
        };
        round(&mut view, 1_000);
        round(&mut view, 4_000);
        healthy_all(&mut view);
        let on = |view: &ClusterView, node: &str| {
            view.slots["web"]
                .values()
                .flat_map(|s| s.placements())
                .filter(|p| p.node == node)
                .count()
        };
        let busiest = *names.iter().max_by_key(|n| on(&view, n)).unwrap();
        assert!(on(&view, busiest) > 0);
        let drain = crate::model::Drain { since_ms: 5_000 };
        view.apply_entry(&crate::model::drain_key(busiest), Some(&encode(&drain)))
            .unwrap();
        let events = round(&mut view, 5_000);
        // Each move is an event naming the drain.
        assert_eq!(events.len(), on(&view, busiest), "{events:?}");
        assert!(events
            .iter()
            .all(|e| e.kind == "moved"
                && e.reason.ends_with(&format!("(node {busiest} is draining)"))));
        // Each allocation there has a replacement elsewhere, and still runs.
        for s in view.slots["web"].values() {
            if s.node() == Some(busiest) {
                let next = s.next.as_ref().expect("a replacement");
                assert_ne!(next.node, busiest);
            }
        }
        healthy_all(&mut view);
        round(&mut view, 6_000);
        assert_eq!(on(&view, busiest), 0, "{:?}", view.slots["web"]);
        assert_eq!(view.slots["web"].len(), 4);
        // Scaling up while drained puts nothing there either.
        let mut rec = (*view.services["web"]).clone();
        rec.replicas = 8;
        view.apply_entry(&service_key("web"), Some(&encode(&rec)))
            .unwrap();
        round(&mut view, 7_000);
        assert_eq!(view.slots["web"].len(), 8);
        assert_eq!(on(&view, busiest), 0);
        // Undrained, it is a candidate again.
        view.apply_entry(&crate::model::drain_key(busiest), None)
            .unwrap();
        rec.replicas = 12;
        view.apply_entry(&service_key("web"), Some(&encode(&rec)))
            .unwrap();
        round(&mut view, 8_000);
        assert!(on(&view, busiest) > 0);
    }

    #[test]
    fn slots_without_a_record_are_deleted_only_after_a_tombstone() {
        let membership = vec![("n1".to_string(), NodeStatus::Alive)];
        let mut view = view_with("web", 2);
        let facts = facts(&["n1"]);
        let empty = BTreeSet::new();
        let mut orch = NodeOrch::new("n1", 0, false, Settle::default());
        fn input<'a>(
            view: &'a ClusterView,
            now_ms: u64,
            tombstoned: &'a BTreeSet<String>,
            membership: &'a [(String, NodeStatus)],
            facts: &'a BTreeMap<String, NodeFacts>,
        ) -> PassInput<'a> {
            PassInput {
                now_ms,
                membership,
                known_nodes: &[],
                view,
                tombstoned,
                facts,
                published_rollouts: tombstoned,
            }
        }
        let placed = orch.pass(
            &input(&view, 2_000, &empty, &membership, &facts),
            &mut native_scheduler,
        );
        for w in &placed.writes {
            view.apply_write(w);
        }
        assert_eq!(view.slots["web"].len(), 2);
        assert_eq!(placed.assigned.len(), 2, "a lone node runs what it placed");
        // The record vanishes without a tombstone (not received yet): keep the slots.
        view.apply_entry(&service_key("web"), None).unwrap();
        let kept = orch.pass(
            &input(&view, 3_000, &empty, &membership, &facts),
            &mut native_scheduler,
        );
        assert!(
            kept.writes.iter().all(|w| !w.key().starts_with("alloc/")),
            "{:?}",
            kept.writes
        );
        let gone: BTreeSet<String> = ["web".to_string()].into();
        let removed = orch.pass(
            &input(&view, 3_000, &gone, &membership, &facts),
            &mut native_scheduler,
        );
        let deletes = removed
            .writes
            .iter()
            .filter(|w| matches!(w, Write::Delete { key } if key.starts_with("alloc/web/")))
            .count();
        assert_eq!(deletes, 2);
    }
}
