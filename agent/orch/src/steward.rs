//! Stewards and reconcile: who decides for a service, and what they decide.
//!
//! Every agent computes [`steward_for`] from its membership view; the one that finds
//! itself steward calls [`reconcile`] with the service's record, slots and reports
//! and writes the result. `reconcile` is a pure function of its input (time is an
//! input, alloc ids are hashes), so any node computing it over the same state writes
//! the same slots, a new steward after a failover carries on where the old one
//! stopped, and two stewards on both sides of a partition write slots that
//! converge by last-writer-wins once the sides meet.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_policy_logic::{NodeStatus, PlacementRequest, Resources, Snapshot};

use crate::model::{
    encode, new_alloc_id, service_key, slot_key, AllocState, ClusterSlots, ClusterView, Members,
    Placement, Reports, Reservation, ServiceRecord, Slot, SlotMap, START_FAILURES_STALL,
};
use crate::snapshot::{over_capacity, release, Placed};
use crate::spec::MAX_REPLICAS;

/// The rendezvous score of `node` for `service`: the first 8 bytes (little
/// endian) of blake3(`service` 0x00 `node`). blake3 because it is stable across
/// platforms and versions, and already a dependency.
pub fn rendezvous_score(service: &str, node: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(service.as_bytes());
    h.update(&[0]);
    h.update(node.as_bytes());
    let bytes = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The steward of `service`: the node among `alive` with the highest rendezvous
/// score (ties, which need a 64-bit collision, go to the larger name). Removing any
/// other node never changes the answer, so a failure moves only the stewardships
/// of the node that failed.
pub fn steward_for<'a>(service: &str, alive: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    alive
        .into_iter()
        .max_by_key(|node| (rendezvous_score(service, node), *node))
}

/// One change to the replicated state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Set `key` to the JSON `value`.
    Put {
        /// The key.
        key: String,
        /// The JSON value.
        value: Vec<u8>,
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: String,
    },
}

impl Write {
    /// The key written.
    pub fn key(&self) -> &str {
        match self {
            Write::Put { key, .. } | Write::Delete { key } => key,
        }
    }
}

/// How the service's rollout stands after a reconcile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "state")]
pub enum RolloutStatus {
    /// Every desired replica runs the current version and is healthy, or has been
    /// (one that crashed since is restarting: that is not a rollout).
    Complete,
    /// `updated` of `total` replicas run the current version and are healthy.
    Progressing {
        /// Healthy replicas of the current version.
        updated: u32,
        /// Desired replicas.
        total: u32,
    },
    /// A replica of the current version that was never healthy did not get healthy
    /// within the update's `healthy_deadline`, or its driver refused its start
    /// twice in a row: no further replica is updated until it is healthy, or until a
    /// new version is deployed. Remaining old replicas keep running.
    Stalled {
        /// Which replica and why.
        reason: String,
    },
    /// The service is being removed.
    Removing,
}

/// What [`reconcile`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Writes to apply, deletes first. Empty when the state already matches.
    pub writes: Vec<Write>,
    /// How the rollout stands.
    pub rollout: RolloutStatus,
    /// What an operator should hear about: replicas rescheduled or moved, and
    /// placements that newly failed (each once, not every round).
    pub events: Vec<Note>,
}

/// One thing a reconcile did or could not do, for `shoal events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// `rescheduled`, `moved` or `placement failed`.
    pub kind: &'static str,
    /// What happened, e.g. `slot 2 moved from n3 (down) to n1`.
    pub reason: String,
}

/// Everything a steward decides from, for one service.
#[derive(Debug, Clone)]
pub struct ReconcileInput<'a> {
    /// The service.
    pub service: &'a str,
    /// Its record; `None` means it is known to be gone (a tombstone), and every
    /// slot left is deleted. Do not pass `None` for a record merely not yet received.
    pub record: Option<&'a ServiceRecord>,
    /// Replicas to run: the record's count, or for an autoscaled service its
    /// scaler's (see [`ClusterView::desired_replicas`]).
    pub desired: u32,
    /// Its slots.
    pub slots: &'a SlotMap,
    /// Every report of its allocations, from every node.
    pub reports: &'a Reports,
    /// Healthy replicas of each service this one depends on; a dependency missing
    /// here does not exist (no live record).
    pub dependencies: BTreeMap<String, u32>,
    /// Membership: every node a slot may name. A node missing here counts as gone
    /// long ago (its slots are placed elsewhere), so reconcile only once the
    /// membership view has settled after joining.
    pub members: &'a Members,
    /// The cluster as [`crate::build_snapshot`] builds it from the current state.
    pub snapshot: &'a Snapshot,
    /// Allocations (of any service) that must leave a node over its capacity
    /// ([`crate::over_capacity`]).
    pub evicted: BTreeSet<String>,
    /// Drained nodes (`drain/<node>`): every allocation on them gets a replacement
    /// elsewhere, like an evicted one. Leave them out of `snapshot` too, so nothing
    /// new is placed there.
    pub draining: BTreeSet<String>,
    /// Now, in ms, on the clock `members[..].since_ms` uses.
    pub now_ms: u64,
}

static NO_SLOTS: SlotMap = BTreeMap::new();
static NO_REPORTS: Reports = BTreeMap::new();

fn or_empty<'a, T>(v: Option<&'a std::sync::Arc<T>>, empty: &'a T) -> &'a T {
    v.map_or(empty, |a| a.as_ref())
}

impl ClusterView {
    /// The reconcile input for `service` from this view.
    pub fn reconcile_input<'a>(
        &'a self,
        service: &'a str,
        members: &'a Members,
        snapshot: &'a Snapshot,
        now_ms: u64,
    ) -> ReconcileInput<'a> {
        let record = self.services.get(service);
        let dependencies = record
            .map(|r| {
                r.spec
                    .depends_on
                    .iter()
                    // A dependency with no live record is left out: it does not exist.
                    .filter(|d| self.services.get(*d).is_some_and(|r| !r.deleted))
                    .map(|d| {
                        let healthy = self
                            .slots
                            .get(d)
                            .map(|s| {
                                healthy_replicas(
                                    s,
                                    or_empty(self.reports.get(d), &NO_REPORTS),
                                    members,
                                )
                            })
                            .unwrap_or(0);
                        (d.clone(), healthy)
                    })
                    .collect()
            })
            .unwrap_or_default();
        ReconcileInput {
            service,
            record: record.map(|r| r.as_ref()),
            desired: self.desired_replicas(service),
            slots: or_empty(self.slots.get(service), &NO_SLOTS),
            reports: or_empty(self.reports.get(service), &NO_REPORTS),
            dependencies,
            members,
            snapshot,
            evicted: over_capacity(snapshot, &self.slots),
            draining: self.drains.keys().cloned().collect(),
            now_ms,
        }
    }
}

fn reachable(members: &Members, node: &str) -> bool {
    members
        .get(node)
        .is_some_and(|m| matches!(m.status, NodeStatus::Alive | NodeStatus::Suspect))
}

/// How a lost node is gone: `left`, `down`, or `gone` (not a member any more).
fn gone_as(members: &Members, node: &str) -> &'static str {
    members.get(node).map_or("gone", |m| match m.status {
        NodeStatus::Left => "left",
        _ => "down",
    })
}

/// Whether `node` has been gone (down or left) for at least `after_ms`. A suspect
/// node is not gone: SWIM may still clear it.
fn lost(members: &Members, node: &str, now_ms: u64, after_ms: u64) -> bool {
    match members.get(node) {
        None => true,
        Some(m) => {
            matches!(m.status, NodeStatus::Down | NodeStatus::Left)
                && now_ms.saturating_sub(m.since_ms) >= after_ms
        }
    }
}

/// Whether the allocation of `p` is reported running and healthy by a reachable node.
pub fn is_healthy(p: &Placement, reports: &Reports, members: &Members) -> bool {
    reachable(members, &p.node)
        && reports.get(&p.alloc_id).is_some_and(|r| {
            r.node == p.node && r.report.healthy && r.report.state == AllocState::Running
        })
}

/// Slots with a healthy current or next allocation.
pub fn healthy_replicas(slots: &SlotMap, reports: &Reports, members: &Members) -> u32 {
    slots
        .values()
        .filter(|s| s.placements().any(|p| is_healthy(p, reports, members)))
        .count() as u32
}

/// Whether two image references name the same tag (`app` is `app:latest`).
fn same_image(a: &str, b: &str) -> bool {
    fn tagged(r: &str) -> std::borrow::Cow<'_, str> {
        let last = r.rsplit('/').next().unwrap_or(r);
        if last.contains(':') {
            r.into()
        } else {
            format!("{r}:latest").into()
        }
    }
    tagged(a) == tagged(b)
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// Why a slot needs a new allocation, in placement priority order: replicas that
/// are gone first, then missing ones, then updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Need {
    /// The current allocation's node is gone: place it elsewhere.
    Lost,
    /// No allocation yet.
    Fresh,
    /// The allocation's node holds more than its capacity and this one is among
    /// the newest there: start a replacement elsewhere alongside it.
    Evict,
    /// Replace the current allocation with the new version (in place).
    Update,
    /// Start the new version alongside the current one.
    Surge,
}

/// Checks scheduler answers against the snapshot, so a buggy policy can never
/// put a replica on a node that is not alive or lacks room.
struct Fit {
    index: BTreeMap<String, usize>,
    alive: Vec<bool>,
    free: Vec<Resources>,
    ports: Vec<BTreeSet<u16>>,
}

impl Fit {
    fn new(snapshot: &Snapshot) -> Fit {
        Fit {
            index: snapshot
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.name.clone(), i))
                .collect(),
            alive: snapshot
                .nodes
                .iter()
                .map(|n| n.status == NodeStatus::Alive)
                .collect(),
            free: snapshot.nodes.iter().map(|n| n.free).collect(),
            ports: snapshot
                .nodes
                .iter()
                .map(|n| n.ports_in_use.iter().copied().collect())
                .collect(),
        }
    }

    /// Takes room for one replica on `node`, or says why it cannot.
    fn take(&mut self, node: &str, r: &Resources, ports: &[u16]) -> Result<(), String> {
        let Some(&i) = self.index.get(node) else {
            return Err(format!("the scheduler chose unknown node {node:?}"));
        };
        let f = &mut self.free[i];
        let problem = if !self.alive[i] {
            Some("is not alive")
        } else if f.cpu_millis < r.cpu_millis
            || f.memory_bytes < r.memory_bytes
            || f.disk_bytes < r.disk_bytes
        {
            Some("lacks room")
        } else if ports.iter().any(|p| self.ports[i].contains(p)) {
            Some("has the port in use")
        } else {
            None
        };
        if let Some(p) = problem {
            return Err(format!("the scheduler chose node {node}, which {p}"));
        }
        f.cpu_millis -= r.cpu_millis;
        f.memory_bytes -= r.memory_bytes;
        f.disk_bytes -= r.disk_bytes;
        self.ports[i].extend(ports);
        Ok(())
    }
}

/// Computes the writes that bring one service's slots to its record. Pure and
/// deterministic; applying its writes and calling it again at the same time
/// returns no writes.
///
/// Rules, in order, each one function below:
/// 1. [`remove_service`]: a deleted (or gone) service loses every slot, highest
///    first; once none is left and no reachable node reports an allocation, its
///    record is deleted.
/// 2. [`Round::scale_down`]: slots at or above the desired count are deleted,
///    highest first.
/// 3. [`Round::settle_surges`]: a `next` on a gone node, or older than the version
///    and unhealthy, is dropped; a healthy `next` is promoted to `current` (the old
///    allocation becomes an orphan its node stops).
/// 4. [`Round::find_needs`]: a slot whose node has been down or left for
///    `reschedule_after` is placed elsewhere (suspect nodes are waited for); a slot
///    whose allocation is on a drained node, or among the excess of a node over its
///    capacity (placements from both sides of a healed partition,
///    [`crate::over_capacity`]), gets a replacement elsewhere as its `next`,
///    promoted once healthy; a slot
///    with no allocation is placed, unless a `depends_on` service has no healthy
///    replica ("waiting for dependency"), or does not exist ("dependency … does not
///    exist").
/// 5. [`Round::keep_unchanged`]: an allocation of an older version whose spec
///    runs the same workload as the current one (a rollback, or a re-deploy of a
///    spec an earlier version had) is moved to the current version as it is: it
///    keeps running, nothing restarts.
/// 6. [`Round::rolling_update`], unless [`Round::stalled`] finds a current-version
///    replica that missed `update.healthy_deadline`, or whose starts its driver
///    refused [`START_FAILURES_STALL`] times in a row (then the rollout is `Stalled`):
///    with `max_surge = 0` old replicas are replaced in place, at most
///    `max_unavailable` in flight and never taking healthy replicas below
///    `replicas - max_unavailable`; with `max_surge > 0` up to that many new replicas
///    start alongside old ones. Unhealthy old replicas are replaced in place first,
///    as that costs no availability.
/// 7. [`Round::place`]: everything to place goes to the scheduler as one request
///    (so spread sees all of it), with the reservations of replaced allocations
///    given back first. Answers are checked against the snapshot; replicas that fit
///    nowhere leave the reason on the slot, and are retried on the next call.
pub fn reconcile(
    input: &ReconcileInput<'_>,
    scheduler: &mut dyn FnMut(&Snapshot, &[PlacementRequest]) -> Vec<Placed>,
) -> Reconciled {
    let record = match input.record {
        Some(r) if !r.deleted => r,
        other => return remove_service(input, other.is_some()),
    };
    let mut round = Round::new(input, record);
    round.scale_down();
    round.settle_surges();
    round.find_needs();
    round.keep_unchanged();
    let stalled = round.stalled();
    if stalled.is_none() {
        round.rolling_update();
    }
    round.place(scheduler);
    round.finish(stalled)
}

/// Rule 1: the service is deleted (`has_record`: a record with `deleted` set) or
/// gone (a tombstone): every slot goes, then the record.
fn remove_service(input: &ReconcileInput<'_>, has_record: bool) -> Reconciled {
    let service = input.service;
    let mut writes = Vec::new();
    for n in input.slots.keys().rev() {
        writes.push(Write::Delete {
            key: slot_key(service, *n),
        });
    }
    let still_running = input
        .reports
        .values()
        .any(|r| reachable(input.members, &r.node));
    if has_record && input.slots.is_empty() && !still_running {
        writes.push(Write::Delete {
            key: service_key(service),
        });
    }
    Reconciled {
        writes,
        rollout: RolloutStatus::Removing,
        events: Vec::new(),
    }
}

/// One reconcile of a live service: the slots being worked on and what was decided.
struct Round<'a, 'i> {
    input: &'a ReconcileInput<'i>,
    record: &'a ServiceRecord,
    want: u32,
    after_ms: u64,
    snapshot: Snapshot,
    work: BTreeMap<u32, Slot>,
    needs: Vec<(Need, u32)>,
    writes: Vec<Write>,
    events: Vec<Note>,
}

impl<'a, 'i> Round<'a, 'i> {
    fn new(input: &'a ReconcileInput<'i>, record: &'a ServiceRecord) -> Self {
        let want = input.desired.min(MAX_REPLICAS);
        Round {
            input,
            record,
            want,
            after_ms: ms(record.spec.reschedule_after),
            snapshot: input.snapshot.clone(),
            work: (0..want)
                .map(|n| (n, input.slots.get(&n).cloned().unwrap_or_default()))
                .collect(),
            needs: Vec::new(),
            writes: Vec::new(),
            events: Vec::new(),
        }
    }

    fn healthy(&self, p: &Placement) -> bool {
        is_healthy(p, self.input.reports, self.input.members)
    }

    /// Its node reports it has been healthy at least once.
    fn was_healthy(&self, p: &Placement) -> bool {
        self.input
            .reports
            .get(&p.alloc_id)
            .is_some_and(|r| r.node == p.node && r.report.was_healthy)
    }

    fn lost(&self, node: &str) -> bool {
        lost(self.input.members, node, self.input.now_ms, self.after_ms)
    }

    /// Rule 2. The removed replicas stop, so their room is free for this round.
    fn scale_down(&mut self) {
        let service = self.input.service;
        for (n, slot) in self.input.slots.range(self.want..).rev() {
            for p in slot.placements() {
                release(&mut self.snapshot, service, p);
            }
            self.writes.push(Write::Delete {
                key: slot_key(service, *n),
            });
        }
    }

    /// Rule 3: drop dead or stale surges; promote healthy ones.
    fn settle_surges(&mut self) {
        let service = self.input.service;
        let version = self.record.version;
        let slots: Vec<u32> = self.work.keys().copied().collect();
        for n in slots {
            let slot = self.work[&n].clone();
            let Some(next) = slot.next.clone() else {
                let s = self.work.get_mut(&n).expect("slot in work");
                s.reason = None;
                continue;
            };
            let current_version = slot.current.as_ref().map_or(0, |c| c.version);
            let drop = self.lost(&next.node)
                || next.version < current_version
                || (next.version < version && !self.healthy(&next));
            let promote = !drop
                && (self.healthy(&next)
                    || slot.current.as_ref().is_none_or(|c| self.lost(&c.node)));
            let s = self.work.get_mut(&n).expect("slot in work");
            s.reason = None;
            if drop {
                release(&mut self.snapshot, service, &next);
                s.next = None;
            } else if promote {
                // The surge is healthy, or there is nothing left to keep running
                // alongside it: it becomes the slot's allocation.
                if let Some(old) = s.current.take() {
                    release(&mut self.snapshot, service, &old);
                }
                s.current = s.next.take();
            }
        }
    }

    /// Why new replicas may not be placed yet (dependencies), if they may not.
    fn blocked_by_dependencies(&self) -> Option<String> {
        let deps = &self.input.dependencies;
        let (missing, waiting): (Vec<&str>, Vec<&str>) = self
            .record
            .spec
            .depends_on
            .iter()
            .map(String::as_str)
            .filter(|d| deps.get(*d).copied().unwrap_or(0) == 0)
            .partition(|d| !deps.contains_key(*d));
        let plural = |v: &[&str]| if v.len() == 1 { "y" } else { "ies" };
        let mut parts = Vec::new();
        if !missing.is_empty() {
            let verb = if missing.len() == 1 { "does" } else { "do" };
            parts.push(format!(
                "dependenc{} {} {verb} not exist",
                plural(&missing),
                missing.join(", ")
            ));
        }
        if !waiting.is_empty() {
            parts.push(format!(
                "waiting for dependenc{} {}",
                plural(&waiting),
                waiting.join(", ")
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// Rule 4: replicas lost with their node, and missing ones.
    fn find_needs(&mut self) {
        let blocked = self.blocked_by_dependencies();
        let mut needs = Vec::new();
        let mut reasons = Vec::new();
        for (&n, slot) in &self.work {
            match &slot.current {
                None if blocked.is_none() => needs.push((Need::Fresh, n)),
                None => reasons.push(n),
                Some(c) if self.lost(&c.node) => needs.push((Need::Lost, n)),
                Some(c)
                    if slot.next.is_none()
                        && (self.input.evicted.contains(&c.alloc_id)
                            || self.input.draining.contains(&c.node)) =>
                {
                    needs.push((Need::Evict, n))
                }
                Some(_) => {}
            }
        }
        for n in reasons {
            if let Some(s) = self.work.get_mut(&n) {
                s.reason = blocked.clone();
            }
        }
        self.needs = needs;
    }

    /// Rule 5: old-version allocations that already run the current workload
    /// become current-version ones in place (same node, same alloc id).
    fn keep_unchanged(&mut self) {
        let version = self.record.version;
        let spec = &self.record.spec;
        let placing: BTreeSet<u32> = self.needs.iter().map(|(_, n)| *n).collect();
        let record = self.record;
        for (n, slot) in self.work.iter_mut() {
            if placing.contains(n) {
                continue;
            }
            for p in [slot.current.as_mut(), slot.next.as_mut()]
                .into_iter()
                .flatten()
            {
                let same = p.version < version
                    && record
                        .spec_for(p.version)
                        .is_some_and(|old| old.same_workload(spec));
                if same {
                    p.version = version;
                }
            }
        }
    }

    /// A current-version replica that missed its deadline, or whose starts the
    /// driver keeps refusing ([`START_FAILURES_STALL`]), stops the rollout.
    fn stalled(&self) -> Option<String> {
        let version = self.record.version;
        let deadline_ms = ms(self.record.spec.update.healthy_deadline);
        let now = self.input.now_ms;
        // While old replicas remain, a new one that got healthy and then failed
        // still stops the rollout: the version may be one that crashes under load.
        let updating = self
            .work
            .values()
            .any(|s| s.placements().any(|p| p.version < version));
        self.work.iter().find_map(|(n, slot)| {
            slot.placements().find_map(|p| {
                if p.version != version
                    || !reachable(self.input.members, &p.node)
                    || self.healthy(p)
                {
                    return None;
                }
                let report = self
                    .input
                    .reports
                    .get(&p.alloc_id)
                    .filter(|r| r.node == p.node)
                    .map(|r| &r.report);
                if !updating && report.is_some_and(|r| r.was_healthy) {
                    // The rollout is done and it got healthy once: now it is a crash,
                    // and restarts handle it.
                    return None;
                }
                let why = report
                    .and_then(|r| r.reason.clone())
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default();
                if report.is_some_and(|r| r.start_failures >= START_FAILURES_STALL) {
                    return Some(format!(
                        "slot {n}: version {version} on {} cannot start{why}",
                        p.node
                    ));
                }
                (now.saturating_sub(p.placed_ms) >= deadline_ms).then(|| {
                    format!(
                        "slot {n}: version {version} on {} not healthy within {}s{why}",
                        p.node,
                        deadline_ms / 1000
                    )
                })
            })
        })
    }

    /// Rule 6: which old-version replicas to replace now.
    fn rolling_update(&mut self) {
        let version = self.record.version;
        let update = self.record.spec.update;
        let placing: BTreeSet<u32> = self.needs.iter().map(|(_, n)| *n).collect();
        let mut candidates: Vec<(bool, u32)> = self
            .work
            .iter()
            .filter(|(n, s)| {
                !placing.contains(n)
                    && s.current.as_ref().is_some_and(|c| c.version < version)
                    && s.next.is_none()
            })
            .map(|(n, s)| (s.current.as_ref().is_some_and(|c| self.healthy(c)), *n))
            .collect();
        // Unhealthy first: replacing them costs no availability.
        candidates.sort();
        let healthy_now = self
            .work
            .values()
            .filter(|s| s.current.as_ref().is_some_and(|c| self.healthy(c)))
            .count() as u32;
        if update.max_surge == 0 {
            let in_flight = self
                .work
                .values()
                .filter(|s| {
                    s.current
                        .as_ref()
                        .is_some_and(|c| c.version == version && !self.healthy(c))
                })
                .count() as u32;
            let floor = self.want.saturating_sub(update.max_unavailable);
            let mut healthy_left = healthy_now;
            let mut room = update.max_unavailable.saturating_sub(in_flight);
            for (is_healthy, n) in candidates {
                if room == 0 {
                    break;
                }
                if is_healthy {
                    if healthy_left <= floor {
                        break;
                    }
                    healthy_left -= 1;
                }
                room -= 1;
                self.needs.push((Need::Update, n));
            }
        } else {
            let surging = self.work.values().filter(|s| s.next.is_some()).count() as u32;
            let mut room = update.max_surge.saturating_sub(surging);
            for (is_healthy, n) in candidates {
                if !is_healthy {
                    self.needs.push((Need::Update, n));
                } else if room > 0 {
                    room -= 1;
                    self.needs.push((Need::Surge, n));
                }
            }
        }
    }

    /// Rule 7: one scheduler request for everything that needs a node.
    fn place(&mut self, scheduler: &mut dyn FnMut(&Snapshot, &[PlacementRequest]) -> Vec<Placed>) {
        self.needs.sort();
        if self.needs.is_empty() {
            return;
        }
        let service = self.input.service;
        let spec = &self.record.spec;
        let version = self.record.version;
        let now = self.input.now_ms;
        for &(need, n) in &self.needs {
            if matches!(need, Need::Lost | Need::Update) {
                if let Some(c) = &self.work[&n].current {
                    release(&mut self.snapshot, service, c);
                }
            }
        }
        // No registry is used: an image no live node holds (in its engine, or as
        // pushed blobs) cannot start anywhere; say so rather than crash-loop.
        let unavailable = spec.image().filter(|image| {
            !self.snapshot.nodes.iter().any(|n| {
                n.status == NodeStatus::Alive && n.images.iter().any(|i| same_image(i, image))
            })
        });
        let request = spec.to_request(self.needs.len() as u32);
        let answer = match unavailable {
            Some(image) => Placed {
                nodes: Vec::new(),
                unplaced: Some(format!(
                    "image {image} is on no live node: `shoal image push {image}` from an agent whose Docker Engine has it"
                )),
            },
            None => scheduler(&self.snapshot, std::slice::from_ref(&request))
                .into_iter()
                .next()
                .unwrap_or_default(),
        };
        let mut fit = Fit::new(&self.snapshot);
        let reserved = Reservation {
            resources: spec.resources,
            host_ports: spec.host_ports(),
            image: spec.image().map(str::to_string),
        };
        let mut nodes = answer.nodes.iter();
        let mut failure: Option<String> = None;
        let members = self.input.members;
        for &(need, n) in &self.needs {
            let Some(slot) = self.work.get_mut(&n) else {
                continue;
            };
            let chosen = match (&failure, nodes.next()) {
                (None, Some(node)) => {
                    match fit.take(node, &reserved.resources, &reserved.host_ports) {
                        Ok(()) => Some(node),
                        Err(e) => {
                            failure = Some(e);
                            None
                        }
                    }
                }
                (None, None) => {
                    failure = Some(answer.unplaced.clone().unwrap_or_else(|| {
                        format!(
                            "the scheduler placed only {} of {} replicas",
                            answer.nodes.len(),
                            self.needs.len()
                        )
                    }));
                    None
                }
                (Some(_), _) => None,
            };
            match chosen {
                Some(node) => {
                    let replaces = match need {
                        Need::Surge => slot.next.as_ref(),
                        _ => slot.current.as_ref(),
                    }
                    .map(|p| p.alloc_id.as_str());
                    let placement = Placement {
                        node: node.clone(),
                        version,
                        alloc_id: new_alloc_id(service, n, version, node, now, replaces),
                        placed_ms: now,
                        reserved: reserved.clone(),
                    };
                    let from = slot.current.as_ref().map(|c| c.node.clone());
                    match (need, &from) {
                        (Need::Lost, Some(old)) => {
                            let status = gone_as(members, old);
                            self.events.push(Note {
                                kind: "rescheduled",
                                reason: format!("slot {n} moved from {old} ({status}) to {node}"),
                            });
                        }
                        (Need::Evict, Some(old)) => {
                            let why = if self.input.draining.contains(old) {
                                "draining"
                            } else {
                                "over its capacity"
                            };
                            self.events.push(Note {
                                kind: "moved",
                                reason: format!(
                                    "slot {n}: a replacement starts on {node} (node {old} is {why})"
                                ),
                            });
                        }
                        _ => {}
                    }
                    if matches!(need, Need::Surge | Need::Evict) {
                        slot.next = Some(placement);
                    } else {
                        slot.current = Some(placement);
                    }
                }
                None => {
                    let why = failure.as_deref().unwrap_or("unplaced");
                    let before = self.input.slots.get(&n).and_then(|s| s.reason.clone());
                    slot.reason = Some(match (need, &slot.current) {
                        (Need::Lost, Some(c)) => {
                            let status = gone_as(members, &c.node);
                            format!("node {} is {status} and no other node fits: {why}", c.node)
                        }
                        (Need::Evict, Some(c)) if self.input.draining.contains(&c.node) => {
                            format!("node {} is draining and no other node fits: {why}", c.node)
                        }
                        (Need::Evict, Some(c)) => format!(
                            "node {} is over its capacity and no other node fits: {why}",
                            c.node
                        ),
                        (Need::Update | Need::Surge, _) => {
                            format!("update to version {version} waits: {why}")
                        }
                        _ => why.to_string(),
                    });
                    if slot.reason != before {
                        self.events.push(Note {
                            kind: "placement failed",
                            reason: format!("slot {n}: {}", slot.reason.as_deref().unwrap_or(why)),
                        });
                    }
                }
            }
        }
    }

    /// The slot writes and the rollout status.
    fn finish(mut self, stalled: Option<String>) -> Reconciled {
        let service = self.input.service;
        for (n, slot) in &self.work {
            if self.input.slots.get(n) != Some(slot) {
                self.writes.push(Write::Put {
                    key: slot_key(service, *n),
                    value: encode(slot),
                });
            }
        }
        let version = self.record.version;
        let rollout = match stalled {
            Some(reason) => RolloutStatus::Stalled { reason },
            None => {
                let updated = self
                    .work
                    .values()
                    .filter(|s| {
                        s.next.is_none()
                            && s.current
                                .as_ref()
                                .is_some_and(|c| c.version == version && self.healthy(c))
                    })
                    .count() as u32;
                // Done once every slot runs the version and each replica has been
                // healthy: one that crashed since is restarting, not rolling out.
                let proven = self.work.values().all(|s| {
                    s.next.is_none()
                        && s.current.as_ref().is_some_and(|c| {
                            c.version == version && (self.healthy(c) || self.was_healthy(c))
                        })
                });
                if updated == self.want || proven {
                    RolloutStatus::Complete
                } else {
                    RolloutStatus::Progressing {
                        updated,
                        total: self.want,
                    }
                }
            }
        };
        Reconciled {
            writes: self.writes,
            rollout,
            events: self.events,
        }
    }
}

/// One allocation a node must run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment<'a> {
    /// Service name.
    pub service: &'a str,
    /// Slot number.
    pub slot: u32,
    /// The allocation.
    pub placement: &'a Placement,
    /// True for a surge allocation (the slot's `next`).
    pub next: bool,
}

/// Every allocation `node` must run: the current and next placements that name it.
pub fn allocs_for_node<'a>(node: &str, slots: &'a ClusterSlots) -> Vec<Assignment<'a>> {
    let mut out = Vec::new();
    for (service, slots) in slots {
        for (&n, slot) in slots.iter() {
            for (p, next) in [(&slot.current, false), (&slot.next, true)] {
                if let Some(p) = p.as_ref().filter(|p| p.node == node) {
                    out.push(Assignment {
                        service,
                        slot: n,
                        placement: p,
                        next,
                    });
                }
            }
        }
    }
    out
}

/// The allocations among `running` (alloc ids on `node`) that no slot assigns to
/// `node` any more: replaced, scaled down, removed, or lost to another node when a
/// partition healed. The node stops them.
pub fn orphans<'a>(
    node: &str,
    running: impl IntoIterator<Item = &'a str>,
    slots: &ClusterSlots,
) -> Vec<String> {
    let keep: BTreeSet<&str> = allocs_for_node(node, slots)
        .into_iter()
        .map(|a| a.placement.alloc_id.as_str())
        .collect();
    running
        .into_iter()
        .filter(|id| !keep.contains(id))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_slot_key, AllocReport, Member, Reported};
    use crate::snapshot::{build_snapshot, native_scheduler, NodeFacts};
    use crate::spec::ServiceSpec;
    use proptest::prelude::*;

    fn spec(extra: &str) -> ServiceSpec {
        let text = format!(
            "name = \"web\"\ndriver = \"process\"\ncommand = [\"x\"]\nreplicas = 4\n{extra}\n[resources]\ncpu = \"1\"\nmemory = \"1Gi\"\n"
        );
        ServiceSpec::from_toml("web.toml", &text).unwrap()
    }

    /// A live record of `spec` at `version` with `replicas` desired.
    fn live(spec: &ServiceSpec, version: u64, replicas: u32) -> ServiceRecord {
        ServiceRecord {
            spec: spec.clone(),
            version,
            replicas,
            deleted: false,
            previous: vec![],
        }
    }

    fn nodes(n: usize) -> (Vec<NodeFacts>, Members) {
        let facts = (1..=n)
            .map(|i| NodeFacts {
                name: format!("n{i}"),
                capacity: Resources {
                    cpu_millis: 4000,
                    memory_bytes: 4 << 30,
                    disk_bytes: 0,
                },
                ..NodeFacts::default()
            })
            .collect();
        let members = (1..=n)
            .map(|i| {
                (
                    format!("n{i}"),
                    Member {
                        status: NodeStatus::Alive,
                        since_ms: 0,
                    },
                )
            })
            .collect();
        (facts, members)
    }

    fn placement(node: &str, version: u64, id: &str, spec: &ServiceSpec) -> Placement {
        Placement {
            node: node.into(),
            version,
            alloc_id: id.into(),
            placed_ms: 0,
            reserved: Reservation {
                resources: spec.resources,
                host_ports: vec![],
                image: None,
            },
        }
    }

    fn report(node: &str, healthy: bool) -> Reported {
        Reported {
            node: node.into(),
            report: AllocReport {
                service: "web".into(),
                state: AllocState::Running,
                healthy,
                ..AllocReport::default()
            },
        }
    }

    fn run(
        record: Option<&ServiceRecord>,
        slots: &SlotMap,
        reports: &Reports,
        members: &Members,
        facts: &[NodeFacts],
        now_ms: u64,
        scheduler: &mut dyn FnMut(&Snapshot, &[PlacementRequest]) -> Vec<Placed>,
    ) -> Reconciled {
        let all: ClusterSlots = [("web".to_string(), std::sync::Arc::new(slots.clone()))].into();
        let snapshot = build_snapshot(facts, &all);
        let input = ReconcileInput {
            service: "web",
            record,
            desired: record.map_or(0, |r| if r.deleted { 0 } else { r.replicas }),
            slots,
            reports,
            dependencies: BTreeMap::new(),
            members,
            snapshot: &snapshot,
            evicted: crate::over_capacity(&snapshot, &all),
            draining: BTreeSet::new(),
            now_ms,
        };
        reconcile(&input, scheduler)
    }

    fn decode_slot(w: &Write) -> Slot {
        match w {
            Write::Put { value, .. } => serde_json::from_slice(value).unwrap(),
            Write::Delete { key } => panic!("unexpected delete of {key}"),
        }
    }

    proptest! {
        /// Removing any node but the steward never changes the steward.
        #[test]
        fn removing_a_non_steward_keeps_the_steward(
            service in "[a-z]{1,12}",
            count in 2usize..30,
            victim in any::<prop::sample::Index>(),
        ) {
            let all: Vec<String> = (0..count).map(|i| format!("node-{i}")).collect();
            let steward = steward_for(&service, all.iter().map(String::as_str)).unwrap().to_string();
            let victim = &all[victim.index(count)];
            prop_assume!(*victim != steward);
            let rest = all.iter().filter(|n| *n != victim).map(String::as_str);
            prop_assert_eq!(steward_for(&service, rest), Some(steward.as_str()));
        }
    }

    /// After a heal, two services' placements made on different sides share n1 beyond
    /// its capacity: the newest moves (as a surge elsewhere), the older stays, and a
    /// node with room is not touched.
    #[test]
    fn the_excess_on_a_node_over_capacity_moves_elsewhere() {
        let spec = spec("");
        let record = live(&spec, 1, 1);
        let (facts, members) = nodes(2);
        // spec(): 1 CPU, 1 GiB each; nodes have 4 CPUs. n1 holds 3 of "db" (older)
        // and web's slot 0 (newest): 4 CPUs, full but not over.
        let mut db = SlotMap::new();
        for i in 0..3 {
            let mut p = placement("n1", 1, &format!("db-{i}"), &spec);
            p.placed_ms = 10;
            db.insert(
                i,
                Slot {
                    current: Some(p),
                    ..Slot::default()
                },
            );
        }
        let mut web = SlotMap::new();
        let mut w = placement("n1", 1, "web-0", &spec);
        w.placed_ms = 20;
        web.insert(
            0,
            Slot {
                current: Some(w),
                ..Slot::default()
            },
        );
        let mut reports = Reports::new();
        reports.insert("web-0".into(), report("n1", true));
        let mut sched =
            |snap: &Snapshot, reqs: &[PlacementRequest]| crate::native_scheduler(snap, reqs);
        let decide =
            |facts: &[NodeFacts],
             db: &SlotMap,
             sched: &mut dyn FnMut(&Snapshot, &[PlacementRequest]) -> Vec<Placed>| {
                let all: ClusterSlots = [
                    ("db".to_string(), std::sync::Arc::new(db.clone())),
                    ("web".to_string(), std::sync::Arc::new(web.clone())),
                ]
                .into();
                let snapshot = build_snapshot(facts, &all);
                let input = ReconcileInput {
                    service: "web",
                    record: Some(&record),
                    desired: 1,
                    slots: &web,
                    reports: &reports,
                    dependencies: BTreeMap::new(),
                    members: &members,
                    snapshot: &snapshot,
                    evicted: crate::over_capacity(&snapshot, &all),
                    draining: BTreeSet::new(),
                    now_ms: 100,
                };
                reconcile(&input, sched)
            };
        assert!(
            decide(&facts, &db, &mut sched).writes.is_empty(),
            "full is not over"
        );

        // A fourth db replica from the other side of a partition, placed before web's.
        let mut p = placement("n1", 1, "db-3", &spec);
        p.placed_ms = 15;
        db.insert(
            3,
            Slot {
                current: Some(p),
                ..Slot::default()
            },
        );
        let out = decide(&facts, &db, &mut sched);
        let slot = decode_slot(&out.writes[0]);
        let current = slot.current.as_ref().unwrap();
        let next = slot.next.as_ref().expect("a replacement alongside");
        assert_eq!(
            (current.alloc_id.as_str(), current.node.as_str()),
            ("web-0", "n1")
        );
        assert_eq!(next.node, "n2", "{slot:?}");

        // With no room anywhere else the replica keeps running, and says why.
        let (mut small, _) = nodes(2);
        small[1].capacity.cpu_millis = 500;
        let out = decide(&small, &db, &mut sched);
        let slot = decode_slot(&out.writes[0]);
        assert!(slot.next.is_none());
        assert_eq!(slot.current.as_ref().unwrap().node, "n1");
        let why = slot.reason.unwrap();
        assert!(why.contains("node n1 is over its capacity"), "{why}");
    }

    #[test]
    fn stewardships_are_spread_evenly() {
        let nodes: Vec<String> = (0..10).map(|i| format!("node-{i}")).collect();
        let mut count: BTreeMap<&str, u32> = BTreeMap::new();
        for s in 0..1000 {
            let service = format!("service-{s}");
            *count
                .entry(steward_for(&service, nodes.iter().map(String::as_str)).unwrap())
                .or_default() += 1;
        }
        assert_eq!(count.len(), 10);
        // Expected 100 each; binomial sd ~9.5, so 60..140 is a > 4 sd band.
        assert!(
            count.values().all(|&c| (60..=140).contains(&c)),
            "{count:?}"
        );
        assert_eq!(steward_for("x", std::iter::empty()), None);
    }

    /// Rolling back to (or re-deploying) a spec an earlier version had: replicas
    /// still on that version move to the new version number in place, same node and
    /// alloc id; only the replicas of the version in between are replaced.
    #[test]
    fn replicas_already_on_the_deployed_workload_are_kept_not_restarted() {
        let v1 = spec("");
        let v2 = spec("env = { MODE = \"two\" }");
        let v1_again = ServiceRecord::deploy(
            Some(&ServiceRecord::deploy(Some(&live(&v1, 1, 4)), v2.clone())),
            v1.clone(),
        );
        assert_eq!(v1_again.version, 3);
        let (facts, members) = nodes(4);
        let mut slots = SlotMap::new();
        let mut reports = Reports::new();
        for n in 0..4u32 {
            // A rollout to v2 that got as far as slot 0.
            let version = if n == 0 { 2 } else { 1 };
            let id = format!("web-{n}");
            let node = format!("n{}", n + 1);
            slots.insert(
                n,
                Slot {
                    current: Some(placement(&node, version, &id, &v1)),
                    ..Slot::default()
                },
            );
            reports.insert(id, report(&node, true));
        }
        let out = run(
            Some(&v1_again),
            &slots,
            &reports,
            &members,
            &facts,
            10_000,
            &mut native_scheduler,
        );
        let mut written = BTreeMap::new();
        for w in &out.writes {
            let Write::Put { key, .. } = w else {
                panic!("unexpected {w:?}");
            };
            written.insert(parse_slot_key(key).unwrap().1, decode_slot(w));
        }
        assert_eq!(written.len(), 4, "{written:?}");
        for n in 1..4u32 {
            let c = written[&n].current.as_ref().unwrap();
            assert_eq!(
                (c.version, c.alloc_id.as_str()),
                (3, format!("web-{n}").as_str())
            );
            assert_eq!(c.node, format!("n{}", n + 1));
        }
        // Slot 0 ran v2, which differs: it is replaced by a fresh v3 allocation.
        let c0 = written[&0].current.as_ref().unwrap();
        assert_eq!(c0.version, 3);
        assert_ne!(c0.alloc_id, "web-0");
        // A spec no longer kept is not guessed at: without v1 in `previous`, the
        // v1 replicas are replaced like any old version.
        let mut forgotten = v1_again.clone();
        forgotten.previous.retain(|p| p.version != 1);
        let out = run(
            Some(&forgotten),
            &slots,
            &reports,
            &members,
            &facts,
            10_000,
            &mut native_scheduler,
        );
        assert!(!out.writes.is_empty());
        for s in out.writes.iter().map(decode_slot) {
            let c = s.current.unwrap();
            let kept = reports.contains_key(&c.alloc_id);
            assert!(
                !(kept && c.version == 3),
                "{c:?} was moved to v3 without its spec"
            );
        }
    }

    /// Once every replica ran the version healthy, a crash is a restart: the
    /// rollout stays complete.
    #[test]
    fn a_crash_after_the_rollout_is_not_a_rollout() {
        let spec = spec("");
        let record = live(&spec, 1, 2);
        let (facts, members) = nodes(2);
        let mut slots = SlotMap::new();
        let mut reports = Reports::new();
        for n in 0..2u32 {
            let id = format!("web-{n}");
            let node = format!("n{}", n + 1);
            slots.insert(
                n,
                Slot {
                    current: Some(placement(&node, 1, &id, &spec)),
                    ..Slot::default()
                },
            );
            let mut r = report(&node, n == 1);
            r.report.was_healthy = true;
            if n == 0 {
                r.report.state = AllocState::Failed;
            }
            reports.insert(id, r);
        }
        let out = run(
            Some(&record),
            &slots,
            &reports,
            &members,
            &facts,
            3_600_000,
            &mut native_scheduler,
        );
        assert!(out.writes.is_empty(), "{:?}", out.writes);
        assert_eq!(out.rollout, RolloutStatus::Complete);
        // Never healthy yet: still progressing.
        reports.get_mut("web-0").unwrap().report.was_healthy = false;
        let out = run(
            Some(&record),
            &slots,
            &reports,
            &members,
            &facts,
            1_000,
            &mut native_scheduler,
        );
        assert_eq!(
            out.rollout,
            RolloutStatus::Progressing {
                updated: 1,
                total: 2
            }
        );
    }

    /// With a current-version replica past its deadline, nothing more is updated,
    /// even where max_unavailable would allow it.
    #[test]
    fn a_stalled_rollout_updates_nothing_more() {
        let spec = spec("[update]\nmax_unavailable = 4\nhealthy_deadline = \"10s\"");
        let record = live(&spec, 2, 4);
        let (facts, members) = nodes(4);
        let mut slots = SlotMap::new();
        let mut reports = Reports::new();
        for n in 0..4u32 {
            let (version, healthy) = if n == 0 { (2, false) } else { (1, true) };
            let id = format!("web-{n}");
            let node = format!("n{}", n + 1);
            slots.insert(
                n,
                Slot {
                    current: Some(placement(&node, version, &id, &spec)),
                    ..Slot::default()
                },
            );
            reports.insert(id, report(&node, healthy));
        }
        let mut never =
            |_: &Snapshot, _: &[PlacementRequest]| -> Vec<Placed> { panic!("nothing to place") };
        let out = run(
            Some(&record),
            &slots,
            &reports,
            &members,
            &facts,
            10_000,
            &mut never,
        );
        assert!(out.writes.is_empty(), "{:?}", out.writes);
        assert!(
            matches!(&out.rollout, RolloutStatus::Stalled { reason } if reason.starts_with("slot 0: version 2 on n1"))
        );
        // Before the deadline the same state is simply progressing: the other three go.
        let out = run(
            Some(&record),
            &slots,
            &reports,
            &members,
            &facts,
            9_999,
            &mut native_scheduler,
        );
        assert_eq!(out.writes.len(), 3);
        // One that was healthy once and failed since still stalls it while old
        // replicas remain (the version may crash under load); after the rollout a
        // crash is a restart (`a_crash_after_the_rollout_is_not_a_rollout`).
        let mut crashed = reports.clone();
        crashed.get_mut("web-0").unwrap().report.was_healthy = true;
        let restarting = run(
            Some(&record),
            &slots,
            &crashed,
            &members,
            &facts,
            10_000,
            &mut native_scheduler,
        );
        assert!(
            matches!(restarting.rollout, RolloutStatus::Stalled { .. }),
            "{:?}",
            restarting.rollout
        );
        // A replica whose driver refused its start twice stalls it at once.
        let mut refused = reports.clone();
        let r = refused.get_mut("web-0").unwrap();
        r.report.state = AllocState::Failed;
        r.report.start_failures = START_FAILURES_STALL;
        r.report.reason = Some("start failed: no such image".into());
        let stalled = run(
            Some(&record),
            &slots,
            &refused,
            &members,
            &facts,
            1,
            &mut never,
        );
        assert!(stalled.writes.is_empty(), "{:?}", stalled.writes);
        assert!(
            matches!(&stalled.rollout, RolloutStatus::Stalled { reason } if reason == "slot 0: version 2 on n1 cannot start (start failed: no such image)"),
            "{:?}",
            stalled.rollout
        );
        assert_eq!(
            out.rollout,
            RolloutStatus::Progressing {
                updated: 0,
                total: 4
            }
        );
    }

    /// A scheduler (plugin) that names unknown, dead or full nodes, or answers short
    /// without a reason, never gets a replica placed there.
    #[test]
    fn bad_scheduler_answers_are_refused() {
        let spec = spec("");
        let record = live(&spec, 1, 5);
        let (facts, mut members) = nodes(3);
        members.get_mut("n3").unwrap().status = NodeStatus::Down;
        let mut facts = facts;
        facts[2].status = NodeStatus::Down;
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec!["ghost"], "the scheduler chose unknown node \"ghost\""),
            (
                vec!["n3"],
                "the scheduler chose node n3, which is not alive",
            ),
            (
                vec!["n1", "n1", "n1", "n1", "n1"],
                "the scheduler chose node n1, which lacks room",
            ),
            (vec!["n1"], "the scheduler placed only 1 of 5 replicas"),
        ];
        for (answer, reason) in cases {
            let mut sched = |_: &Snapshot, _: &[PlacementRequest]| {
                vec![Placed {
                    nodes: answer.iter().map(|s| s.to_string()).collect(),
                    unplaced: None,
                }]
            };
            let out = run(
                Some(&record),
                &SlotMap::new(),
                &Reports::new(),
                &members,
                &facts,
                0,
                &mut sched,
            );
            let slots: Vec<Slot> = out.writes.iter().map(decode_slot).collect();
            assert_eq!(slots.len(), 5);
            for s in &slots {
                if let Some(p) = &s.current {
                    assert_eq!(p.node, "n1", "{answer:?}");
                } else {
                    assert_eq!(s.reason.as_deref(), Some(reason), "{answer:?}");
                }
            }
            let placed = slots.iter().filter(|s| s.current.is_some()).count();
            // n1 has 4 cores: at most 4 one-core replicas, never five.
            assert!(placed < 5, "{answer:?}");
        }
    }

    /// A docker image that no live node holds waits with the reason; once one node
    /// holds it (engine or pushed blobs), replicas are placed.
    #[test]
    fn an_image_no_live_node_holds_waits_with_the_reason() {
        let text = "name = \"web\"\ndriver = \"docker\"\nimage = \"app\"\nreplicas = 2\n";
        let spec = ServiceSpec::from_toml("web.toml", text).unwrap();
        let record = live(&spec, 1, 2);
        let (mut facts, mut members) = nodes(2);
        // Held only by a node that is down: does not count.
        facts[1].images = vec!["app:latest".into()];
        facts[1].status = NodeStatus::Down;
        members.get_mut("n2").unwrap().status = NodeStatus::Down;
        let mut asked = 0;
        let mut sched = |_: &Snapshot, _: &[PlacementRequest]| {
            asked += 1;
            vec![Placed {
                nodes: vec!["n1".into(), "n1".into()],
                unplaced: None,
            }]
        };
        let out = run(
            Some(&record),
            &SlotMap::new(),
            &Reports::new(),
            &members,
            &facts,
            0,
            &mut sched,
        );
        let slots: Vec<Slot> = out.writes.iter().map(decode_slot).collect();
        assert_eq!(slots.len(), 2);
        for s in &slots {
            assert!(s.current.is_none());
            let why = s.reason.as_deref().unwrap();
            assert!(why.contains("image app is on no live node"), "{why}");
            assert!(why.contains("shoal image push app"), "{why}");
        }
        facts[0].images = vec!["app:latest".into()];
        let out = run(
            Some(&record),
            &SlotMap::new(),
            &Reports::new(),
            &members,
            &facts,
            0,
            &mut sched,
        );
        let slots: Vec<Slot> = out.writes.iter().map(decode_slot).collect();
        assert!(slots.iter().all(|s| s.current.is_some()), "{slots:?}");
        assert_eq!(asked, 1);
    }

    #[test]
    fn removal_deletes_slots_then_the_record() {
        let spec = spec("");
        let record = ServiceRecord {
            spec: spec.clone(),
            version: 1,
            replicas: 2,
            deleted: true,
            previous: vec![],
        };
        let (facts, members) = nodes(2);
        let slots: SlotMap = [
            (
                0,
                Slot {
                    current: Some(placement("n1", 1, "a", &spec)),
                    ..Slot::default()
                },
            ),
            (1, Slot::default()),
        ]
        .into();
        let reports: Reports = [("a".to_string(), report("n1", true))].into();
        let out = run(
            Some(&record),
            &slots,
            &reports,
            &members,
            &facts,
            0,
            &mut native_scheduler,
        );
        let keys: Vec<&str> = out.writes.iter().map(Write::key).collect();
        assert_eq!(keys, vec!["alloc/web/1", "alloc/web/0"]);
        assert_eq!(out.rollout, RolloutStatus::Removing);
        // Slots gone but n1 still reports its copy: the record stays.
        let out = run(
            Some(&record),
            &SlotMap::new(),
            &reports,
            &members,
            &facts,
            0,
            &mut native_scheduler,
        );
        assert!(out.writes.is_empty());
        // Nothing left: the record goes.
        let out = run(
            Some(&record),
            &SlotMap::new(),
            &Reports::new(),
            &members,
            &facts,
            0,
            &mut native_scheduler,
        );
        assert_eq!(
            out.writes,
            vec![Write::Delete {
                key: "service/web".into()
            }]
        );
        // No record at all: leftover slots are deleted, nothing else.
        let out = run(
            None,
            &slots,
            &reports,
            &members,
            &facts,
            0,
            &mut native_scheduler,
        );
        assert_eq!(out.writes.len(), 2);
    }

    #[test]
    fn nodes_run_current_and_next_and_stop_the_rest() {
        let spec = spec("");
        let slot = Slot {
            current: Some(placement("n1", 1, "old", &spec)),
            next: Some(placement("n2", 2, "new", &spec)),
            reason: None,
        };
        let all: ClusterSlots =
            [("web".to_string(), std::sync::Arc::new([(0, slot)].into()))].into();
        let n1 = allocs_for_node("n1", &all);
        assert_eq!(n1.len(), 1);
        assert!(!n1[0].next && n1[0].placement.alloc_id == "old");
        let n2 = allocs_for_node("n2", &all);
        assert!(n2[0].next && n2[0].slot == 0);
        assert_eq!(
            orphans("n1", ["old", "stale"], &all),
            vec!["stale".to_string()]
        );
        assert_eq!(orphans("n2", ["old", "new"], &all), vec!["old".to_string()]);
    }
}
