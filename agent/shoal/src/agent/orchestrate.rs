//! Orchestration on the driver task: stewardship, the desired set, reports.
//!
//! Every pass (on changes to orchestration keys, at most every 100 ms, and once a
//! second anyway) the agent:
//! 1. refreshes its membership table, stamping when each node's status changed
//!    (nodes known from the state but absent from SWIM count as down since they
//!    were first missed, so they get the full `reschedule_after` grace);
//! 2. once its view has *settled* (a few seconds after it first saw a peer, so a
//!    restarted agent does not act on a one-node view; 30 s after start if no seed
//!    ever answers), runs [`shoal_orch::reconcile`]
//!    for each service it is steward of, with the policy host as scheduler, and
//!    writes the resulting slots;
//! 3. hands the executor every allocation the slots assign to this node.
//!
//! It also answers the service API (`deploy`, `scale`, `rm`, `services`, `ps`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_core::{Node, Now, State, Status, NODE_PREFIX};
use shoal_orch::{
    allocs_for_node, build_snapshot, decode, encode, healthy_replicas, reconcile, service_key,
    steward_for, AllocReport, AllocState, ClusterView, Member, Members, NodeFacts, Placed,
    RolloutStatus, ServiceRecord, ServiceSpec, Write, DOCKER_LABEL, SERVICE_PREFIX, SLOT_PREFIX,
};
use shoal_policy::{NodeStatus, PolicyHost};
use tokio::sync::watch;

use super::executor::{Desired, DesiredAlloc};
use super::resources::Resources;
use super::ApiError;
use crate::views::{NodeInfo, ServiceView, SlotView};

/// Time after the first peer is seen before the view counts as settled.
const SETTLE_AFTER_PEER_MS: u64 = 3_000;
/// Time after start before a node with no peers (no seeds) counts as settled.
const SETTLE_ALONE_MS: u64 = 1_000;
/// Time after start before a node whose seeds never answered counts as settled.
pub const SETTLE_CUT_OFF_MS: u64 = 30_000;
/// Where an agent publishes the images its Docker Engine holds: `node/<me>/images`.
pub const IMAGES_SUFFIX: &str = "images";
/// Suffix of a steward's published rollout status: `node/<me>/rollout/<service>`.
const ROLLOUT_INFIX: &str = "/rollout/";

/// Whether a key is one orchestration reacts to.
pub fn is_orch_key(key: &str) -> bool {
    key.starts_with(SERVICE_PREFIX)
        || key.starts_with(SLOT_PREFIX)
        || (key.starts_with(NODE_PREFIX) && key.contains("/alloc/"))
}

/// Orchestration state kept by the driver task.
pub struct Orch {
    me: String,
    started_ms: u64,
    first_peer_ms: Option<u64>,
    has_seeds: bool,
    members: Members,
    /// A pass is due (an orchestration key changed).
    pub dirty: bool,
    desired_tx: watch::Sender<Desired>,
    /// Reports this node published, by alloc id (what the executor last said).
    reports: BTreeMap<String, AllocReport>,
    /// The executor has adopted and published what it runs.
    executor_ready: bool,
    rollouts: BTreeMap<String, Rollout>,
    /// `PATH` for process workloads: the agent's own directory first, so a spec's
    /// `shoal workload http` runs this very binary.
    path_env: Option<String>,
    /// Reconcile passes run as steward, for metrics.
    pub passes: u64,
    /// Slot writes made as steward, for metrics.
    pub writes: u64,
    /// Unreadable records already logged (each is logged once).
    bad_records: BTreeSet<String>,
}

/// A published rollout status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Rollout {
    version: u64,
    status: RolloutStatus,
}

impl Orch {
    /// Orchestration for node `me`, started at `now_ms` (wall clock).
    pub fn new(me: &str, now_ms: u64, has_seeds: bool, desired_tx: watch::Sender<Desired>) -> Orch {
        Orch {
            me: me.to_string(),
            started_ms: now_ms,
            first_peer_ms: None,
            has_seeds,
            members: Members::new(),
            dirty: true,
            desired_tx,
            reports: BTreeMap::new(),
            executor_ready: false,
            rollouts: BTreeMap::new(),
            path_env: workload_path(),
            passes: 0,
            writes: 0,
            bad_records: BTreeSet::new(),
        }
    }

    /// Whether this agent's view has settled enough to act on: a few seconds after
    /// it first saw a peer; without seeds, at once; with seeds none of which answers
    /// (an edge site cut off while it restarted), after [`SETTLE_CUT_OFF_MS`], so
    /// the site keeps working on its own.
    pub fn settled(&self, now_ms: u64) -> bool {
        match self.first_peer_ms {
            Some(t) => now_ms >= t + SETTLE_AFTER_PEER_MS,
            None if self.has_seeds => now_ms >= self.started_ms + SETTLE_CUT_OFF_MS,
            None => now_ms >= self.started_ms + SETTLE_ALONE_MS,
        }
    }

    /// Notes the executor's report for `alloc_id`; returns the write to make.
    pub fn on_report(
        &mut self,
        alloc_id: &str,
        report: Option<AllocReport>,
    ) -> (String, Option<Vec<u8>>) {
        let key = shoal_orch::report_key(&self.me, alloc_id);
        match report {
            Some(r) => {
                let v = encode(&r);
                self.reports.insert(alloc_id.to_string(), r);
                (key, Some(v))
            }
            None => {
                self.reports.remove(alloc_id);
                (key, None)
            }
        }
    }

    /// This node's allocations by reported state.
    pub fn allocation_states(&self) -> BTreeMap<&'static str, usize> {
        let mut out = BTreeMap::new();
        for r in self.reports.values() {
            *out.entry(state_str(r.state)).or_insert(0) += 1;
        }
        out
    }

    /// The executor has adopted what it runs.
    pub fn executor_ready(&mut self) {
        self.executor_ready = true;
        self.dirty = true;
    }

    fn refresh_members(&mut self, node: &Node, now_ms: u64) {
        let mut seen = BTreeSet::new();
        // A restarted node can be listed twice (old generation down, new one alive):
        // its newest generation speaks for it.
        let mut newest: BTreeMap<String, (u64, Status)> = BTreeMap::new();
        for (id, status) in node.members() {
            let e = newest.entry(id.name.clone()).or_insert((id.gen, status));
            if id.gen >= e.0 {
                *e = (id.gen, status);
            }
        }
        for (name, (_, status)) in newest {
            let status = if name == self.me {
                NodeStatus::Alive
            } else {
                to_status(status)
            };
            if name != self.me && status == NodeStatus::Alive && self.first_peer_ms.is_none() {
                self.first_peer_ms = Some(now_ms);
            }
            match self.members.get_mut(&name) {
                Some(m) if m.status == status => {}
                Some(m) => {
                    *m = Member {
                        status,
                        since_ms: now_ms,
                    }
                }
                None => {
                    self.members.insert(
                        name.clone(),
                        Member {
                            status,
                            since_ms: now_ms,
                        },
                    );
                }
            }
            seen.insert(name);
        }
        // Nodes the state knows (they published info) but SWIM does not (yet, or any
        // more): down since we first missed them.
        for e in node.state().scan_prefix(NODE_PREFIX) {
            let Some(name) = e
                .key
                .strip_prefix(NODE_PREFIX)
                .and_then(|r| r.strip_suffix("/info"))
            else {
                continue;
            };
            if seen.contains(name) {
                continue;
            }
            match self.members.get_mut(name) {
                Some(m) if matches!(m.status, NodeStatus::Down | NodeStatus::Left) => {}
                Some(m) => {
                    *m = Member {
                        status: NodeStatus::Down,
                        since_ms: now_ms,
                    }
                }
                None => {
                    self.members.insert(
                        name.to_string(),
                        Member {
                            status: NodeStatus::Down,
                            since_ms: now_ms,
                        },
                    );
                }
            }
        }
    }

    fn alive(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|(_, m)| m.status == NodeStatus::Alive)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// One orchestration pass. Returns the number of writes made.
    pub fn pass(&mut self, node: &mut Node, host: &PolicyHost, now: Now) -> usize {
        self.dirty = false;
        let wall = now.wall_ms;
        self.refresh_members(node, wall);
        let settled = self.settled(wall);
        let mut made = 0;
        if settled {
            let (mut view, errors) = view_of(node.state());
            for e in errors {
                let text = e.to_string();
                if self.bad_records.len() < 10_000 && self.bad_records.insert(text.clone()) {
                    tracing::warn!("ignoring an unreadable record: {text}");
                }
            }
            let mut snapshot =
                build_snapshot(&node_facts(node.state(), &self.members), &view.slots);
            let alive = self.alive();
            let names: BTreeSet<String> = view
                .services
                .keys()
                .chain(view.slots.keys())
                .cloned()
                .collect();
            for name in &names {
                if steward_for(name, alive.iter().map(String::as_str)) != Some(self.me.as_str()) {
                    continue;
                }
                let record = view.services.get(name).cloned();
                if record.is_none() {
                    // Slots without a record: only a tombstone means the service is
                    // gone; a record not received yet must not delete anything.
                    let gone = node
                        .state()
                        .get(&service_key(name))
                        .is_some_and(|e| e.is_tombstone());
                    if !gone {
                        continue;
                    }
                }
                let input = view.reconcile_input(name, &self.members, &snapshot, wall);
                let mut scheduler =
                    |snap: &shoal_policy::Snapshot, reqs: &[shoal_policy::PlacementRequest]| {
                        host.schedule(snap, reqs)
                            .into_iter()
                            .map(|o| Placed {
                                nodes: o.nodes,
                                unplaced: o.unplaced.map(|u| u.message),
                            })
                            .collect::<Vec<_>>()
                    };
                let out = tokio::task::block_in_place(|| reconcile(&input, &mut scheduler));
                self.passes += 1;
                let wrote = !out.writes.is_empty();
                for w in &out.writes {
                    let res = match w {
                        Write::Put { key, value } => node.put(key, Some(value.clone()), now),
                        Write::Delete { key } => node.put(key, None, now),
                    };
                    match res {
                        Ok(_) => made += 1,
                        Err(e) => {
                            tracing::warn!(service = %name, key = w.key(), "steward write refused: {e}")
                        }
                    }
                }
                if let Some(r) = record {
                    let rollout = Rollout {
                        version: r.version,
                        status: out.rollout,
                    };
                    self.publish_rollout(node, name, rollout, now);
                }
                if wrote {
                    // Later services must see what this one just reserved.
                    view = view_of(node.state()).0;
                    snapshot =
                        build_snapshot(&node_facts(node.state(), &self.members), &view.slots);
                }
            }
            self.forget_rollouts(node, &view.services, now);
            self.writes += made as u64;
            if self.executor_ready {
                self.clean_stale_reports(node, now);
            }
        }
        self.update_desired(node.state(), settled);
        made
    }

    fn publish_rollout(&mut self, node: &mut Node, service: &str, r: Rollout, now: Now) {
        if self.rollouts.get(service) == Some(&r) {
            return;
        }
        let key = format!("{NODE_PREFIX}{}{ROLLOUT_INFIX}{service}", self.me);
        if let RolloutStatus::Stalled { reason } = &r.status {
            tracing::warn!(service, "rollout stalled: {reason}");
        }
        if node.put(&key, Some(encode(&r)), now).is_ok() {
            self.rollouts.insert(service.to_string(), r);
        }
    }

    /// Deletes this node's published rollout statuses of services that are gone.
    fn forget_rollouts(
        &mut self,
        node: &mut Node,
        services: &BTreeMap<String, ServiceRecord>,
        now: Now,
    ) {
        let prefix = format!("{NODE_PREFIX}{}{ROLLOUT_INFIX}", self.me);
        let gone: Vec<String> = node
            .state()
            .scan_prefix(&prefix)
            .map(|e| e.key[prefix.len()..].to_string())
            .filter(|svc| !services.contains_key(svc))
            .collect();
        for svc in gone {
            self.rollouts.remove(&svc);
            let _ = node.put(&format!("{prefix}{svc}"), None, now);
        }
    }

    /// Deletes reports of this node that the executor does not have (left over from
    /// before a restart).
    fn clean_stale_reports(&mut self, node: &mut Node, now: Now) {
        let prefix = shoal_orch::report_prefix(&self.me);
        let stale: Vec<String> = node
            .state()
            .scan_prefix(&prefix)
            .filter(|e| {
                let id = &e.key[prefix.len()..];
                !self.reports.contains_key(id)
            })
            .map(|e| e.key.clone())
            .collect();
        for key in stale {
            let _ = node.put(&key, None, now);
        }
    }

    fn workload(
        &self,
        spec: &ServiceSpec,
        slot: u32,
        version: u64,
        alloc_id: &str,
    ) -> shoal_runtime::WorkloadSpec {
        let mut w = spec.to_workload(slot, version, alloc_id);
        if let (shoal_runtime::WorkloadKind::Process { .. }, Some(path)) = (&w.kind, &self.path_env)
        {
            w.env.entry("PATH".into()).or_insert_with(|| path.clone());
        }
        w
    }

    fn update_desired(&self, state: &State, settled: bool) {
        let (view, _) = view_of(state);
        let mut allocs = BTreeMap::new();
        for a in allocs_for_node(&self.me, &view.slots) {
            let p = a.placement;
            let spec = view
                .services
                .get(a.service)
                .and_then(|r| r.spec_for(p.version));
            let want = match spec {
                Some(spec) => DesiredAlloc {
                    workload: Ok(self.workload(spec, a.slot, p.version, &p.alloc_id)),
                    health: spec.health.clone(),
                    restart: spec.restart,
                },
                None => DesiredAlloc {
                    workload: Err(format!(
                        "spec version {} of service {} is not known here",
                        p.version, a.service
                    )),
                    health: None,
                    restart: shoal_orch::RestartPolicy {
                        mode: shoal_orch::RestartMode::Never,
                        backoff: Duration::ZERO,
                        backoff_max: Duration::ZERO,
                    },
                },
            };
            allocs.insert(p.alloc_id.clone(), want);
        }
        let desired = Desired { allocs, settled };
        self.desired_tx.send_if_modified(|d| {
            if *d == desired {
                false
            } else {
                *d = desired;
                true
            }
        });
    }

    /// The scheduler's view: members with labels, capacity and what slots reserve.
    pub fn snapshot(&self, state: &State) -> shoal_policy::Snapshot {
        let (view, _) = view_of(state);
        build_snapshot(&node_facts(state, &self.members), &view.slots)
    }

    /// `shoal deploy`: the record to write for `spec`, or `None` if nothing changes.
    pub fn deploy(&self, state: &State, spec: ServiceSpec) -> (ServiceRecord, bool) {
        let current = record_of(state, &spec.name);
        let next = ServiceRecord::deploy(current.as_ref(), spec);
        let changed = current.as_ref() != Some(&next);
        (next, changed)
    }

    /// The live record of `name`, or a not-found error.
    pub fn live_record(&self, state: &State, name: &str) -> Result<ServiceRecord, ApiError> {
        match record_of(state, name) {
            Some(r) if !r.deleted => Ok(r),
            _ => Err(ApiError::NotFound(format!("no service named {name:?}"))),
        }
    }

    /// `shoal services`.
    pub fn services(&self, state: &State) -> Vec<ServiceView> {
        let (view, _) = view_of(state);
        view.services
            .iter()
            .map(|(name, r)| self.service_view(state, &view, name, r))
            .collect()
    }

    fn service_view(
        &self,
        state: &State,
        view: &ClusterView,
        name: &str,
        r: &ServiceRecord,
    ) -> ServiceView {
        let slots = view.slots.get(name).cloned().unwrap_or_default();
        let reports = view.reports.get(name).cloned().unwrap_or_default();
        let running = slots
            .values()
            .filter(|s| {
                s.placements().any(|p| {
                    reports.get(&p.alloc_id).is_some_and(|rep| {
                        rep.node == p.node && rep.report.state == AllocState::Running
                    })
                })
            })
            .count() as u32;
        let healthy = healthy_replicas(&slots, &reports, &self.members);
        let updated = slots
            .values()
            .filter(|s| {
                s.next.is_none()
                    && s.current.as_ref().is_some_and(|p| {
                        p.version == r.version && shoal_orch::is_healthy(p, &reports, &self.members)
                    })
            })
            .count() as u32;
        // The steward's published status, if it is for this version.
        let alive = self.alive();
        let steward = steward_for(name, alive.iter().map(String::as_str));
        let rollout = steward
            .and_then(|s| state.value(&format!("{NODE_PREFIX}{s}{ROLLOUT_INFIX}{name}")))
            .and_then(|v| decode::<Rollout>(name, v).ok())
            .filter(|ro| ro.version == r.version)
            .map(|ro| ro.status);
        ServiceView {
            name: name.to_string(),
            driver: match r.spec.image() {
                Some(_) => "docker".into(),
                None => "process".into(),
            },
            desired: if r.deleted { 0 } else { r.replicas },
            slots: slots.len() as u32,
            running,
            healthy,
            updated,
            version: r.version,
            removing: r.deleted,
            steward: steward.map(str::to_string),
            rollout,
        }
    }

    /// `shoal ps <name>`.
    pub fn ps(&self, state: &State, name: &str) -> Result<(ServiceView, Vec<SlotView>), ApiError> {
        let (view, _) = view_of(state);
        let Some(r) = view.services.get(name) else {
            return Err(ApiError::NotFound(format!("no service named {name:?}")));
        };
        let summary = self.service_view(state, &view, name, r);
        let slots = view.slots.get(name).cloned().unwrap_or_default();
        let reports = view.reports.get(name).cloned().unwrap_or_default();
        let mut rows = Vec::new();
        for (&n, slot) in &slots {
            if slot.current.is_none() {
                rows.push(SlotView {
                    slot: n,
                    node: None,
                    state: "pending".into(),
                    healthy: false,
                    endpoint: None,
                    restarts: 0,
                    reason: slot.reason.clone(),
                    version: None,
                    alloc_id: None,
                    handle: None,
                    next: false,
                    cpu_percent: 0.0,
                    memory_bytes: 0,
                });
            }
            for (p, next) in [(&slot.current, false), (&slot.next, true)] {
                let Some(p) = p else { continue };
                let rep = reports
                    .get(&p.alloc_id)
                    .filter(|rep| rep.node == p.node)
                    .map(|rep| &rep.report);
                let member = self.members.get(&p.node).map(|m| m.status);
                let reachable = matches!(member, Some(NodeStatus::Alive | NodeStatus::Suspect));
                let (state_name, reason) = match rep {
                    Some(rep) if reachable => (
                        state_str(rep.state).to_string(),
                        rep.reason
                            .clone()
                            .or_else(|| if next { None } else { slot.reason.clone() }),
                    ),
                    _ if !reachable => (
                        "pending".to_string(),
                        Some(format!(
                            "node {} is {}",
                            p.node,
                            member.map_or("unknown", status_str)
                        )),
                    ),
                    _ => (
                        "pending".to_string(),
                        Some(format!("waiting for node {} to start it", p.node)),
                    ),
                };
                rows.push(SlotView {
                    slot: n,
                    node: Some(p.node.clone()),
                    state: state_name,
                    healthy: shoal_orch::is_healthy(p, &reports, &self.members),
                    endpoint: rep.and_then(|r| r.endpoint.clone()),
                    restarts: rep.map_or(0, |r| r.restarts),
                    reason,
                    version: Some(p.version),
                    alloc_id: Some(p.alloc_id.clone()),
                    handle: rep.and_then(|r| r.handle.clone()),
                    next,
                    cpu_percent: rep.map_or(0.0, |r| r.cpu_percent),
                    memory_bytes: rep.map_or(0, |r| r.memory_bytes),
                });
            }
        }
        Ok((summary, rows))
    }
}

/// The agent's directory, then the agent's `PATH`.
fn workload_path() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.to_str()?.to_string();
    let rest = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    Some(format!("{dir}:{rest}"))
}

fn to_status(s: Status) -> NodeStatus {
    match s {
        Status::Alive => NodeStatus::Alive,
        Status::Suspect => NodeStatus::Suspect,
        Status::Down => NodeStatus::Down,
        Status::Left => NodeStatus::Left,
    }
}

fn status_str(s: NodeStatus) -> &'static str {
    match s {
        NodeStatus::Alive => "alive",
        NodeStatus::Suspect => "suspect",
        NodeStatus::Down => "down",
        NodeStatus::Left => "left",
    }
}

fn state_str(s: AllocState) -> &'static str {
    match s {
        AllocState::Pending => "pending",
        AllocState::Starting => "starting",
        AllocState::Running => "running",
        AllocState::Stopping => "stopping",
        AllocState::Failed => "failed",
        AllocState::Exited => "exited",
    }
}

fn record_of(state: &State, name: &str) -> Option<ServiceRecord> {
    let key = service_key(name);
    state.value(&key).and_then(|v| decode(&key, v).ok())
}

/// The orchestration keys of `state`, decoded.
fn view_of(state: &State) -> (ClusterView, Vec<shoal_orch::ModelError>) {
    ClusterView::from_state(state)
}

/// What the scheduler needs to know of every member, from its node-owned keys.
fn node_facts(state: &State, members: &Members) -> Vec<NodeFacts> {
    members
        .iter()
        .map(|(name, m)| {
            let read = |suffix: &str| state.value(&format!("{NODE_PREFIX}{name}/{suffix}"));
            let info: Option<NodeInfo> = read("info").and_then(|b| serde_json::from_slice(b).ok());
            let res: Option<Resources> =
                read("resources").and_then(|b| serde_json::from_slice(b).ok());
            let mut labels = info.as_ref().map(|i| i.labels.clone()).unwrap_or_default();
            if info
                .as_ref()
                .is_some_and(|i| i.drivers.iter().any(|d| d == "docker"))
            {
                labels.insert(DOCKER_LABEL.to_string(), "true".into());
            }
            let capacity = res.map_or(shoal_policy::Resources::default(), |r| {
                shoal_policy::Resources {
                    cpu_millis: u64::from(r.cpus) * 1000,
                    memory_bytes: r.memory_bytes,
                    disk_bytes: r.disk_free_bytes,
                }
            });
            NodeFacts {
                name: name.clone(),
                status: m.status,
                labels,
                capacity,
                images: read(IMAGES_SUFFIX)
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or_default(),
                ports_in_use: Vec::new(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orch(has_seeds: bool) -> Orch {
        Orch::new("n1", 1_000, has_seeds, watch::channel(Desired::default()).0)
    }

    #[test]
    fn settles_after_a_peer_alone_or_cut_off() {
        let mut o = orch(true);
        assert!(
            !o.settled(1_000 + SETTLE_CUT_OFF_MS - 1),
            "seeds may still answer"
        );
        assert!(o.settled(1_000 + SETTLE_CUT_OFF_MS), "cut off: act alone");
        o.first_peer_ms = Some(2_000);
        assert!(!o.settled(2_000 + SETTLE_AFTER_PEER_MS - 1));
        assert!(o.settled(2_000 + SETTLE_AFTER_PEER_MS));
        let lone = orch(false);
        assert!(!lone.settled(1_000));
        assert!(lone.settled(1_000 + SETTLE_ALONE_MS));
    }
}
