//! What the agent loop publishes for everyone else to read.
//!
//! The loop keeps a [`StateIndex`]: the replicated state decoded once, entry by
//! entry as changes arrive (orchestration records, what each node publishes about
//! itself, plugin bindings, and every live entry for kv reads). After each turn
//! that changed something it publishes one immutable [`Views`] through a `watch`.
//! API reads, the dashboard, `/metrics` and the orchestration pass read the latest
//! `Views` without queueing behind the loop and without any lock held across an
//! await. Every part of a `Views` is shared (`Arc`s and a persistent map), so
//! publishing copies pointers, not the state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use shoal_core::{Entry, Histogram, NodeId, Stats, Status};
use shoal_orch::{
    build_snapshot, healthy_replicas, is_healthy, steward_for, AllocState, ClusterView, Member,
    Members, NodeFacts, PublishedRollout, DOCKER_LABEL,
};
use shoal_policy::NodeStatus;

use super::keys::{self, Binding, Key, NodeInfo, PluginRow, Resources};
use super::ApiError;
use shoal_api::{AllocView, DrainView, KvView, NodeView, ServiceView, SlotView, VersionView};
use shoal_image::ImageRecord;

/// What one node has published about itself, decoded.
#[derive(Debug, Clone, Default)]
pub struct NodeRecord {
    /// `node/<n>/info`.
    pub info: Option<NodeInfo>,
    /// `node/<n>/resources`.
    pub resources: Option<Resources>,
    /// `node/<n>/images`.
    pub images: Vec<String>,
    /// `node/<n>/plugins`.
    pub plugins: Vec<PluginRow>,
    /// `node/<n>/left` is set.
    pub left: bool,
    /// Blobs it advertises (ids as text).
    pub blobs: BTreeSet<String>,
    /// Blobs it is downloading and serves in part.
    pub partial: BTreeSet<String>,
    /// Rollout statuses it published as steward, by service.
    pub rollouts: BTreeMap<String, PublishedRollout>,
    /// `node/<n>/events`: its recent events, oldest first.
    pub events: Vec<super::events::NodeEvent>,
}

/// The decoded replicated state, kept current by the loop (see the module docs).
#[derive(Default)]
pub struct StateIndex {
    cluster: ClusterView,
    nodes: BTreeMap<String, Arc<NodeRecord>>,
    bindings: Arc<BTreeMap<String, Binding>>,
    images: Arc<BTreeMap<String, ImageRecord>>,
    tombstoned: Arc<BTreeSet<String>>,
    entries: imbl::OrdMap<String, Arc<Entry>>,
    logged: BTreeSet<String>,
    dirty: bool,
}

/// What a change touched, for the loop's reactions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    /// An orchestration key: a pass is due.
    pub orchestration: bool,
    /// A plugin binding changed (its key).
    pub binding: Option<String>,
    /// A node advertised a blob: (node, blob id).
    pub blob_advert: Option<(String, String)>,
    /// A node started serving part of a blob it downloads: (node, blob id).
    pub blob_partial: Option<(String, String)>,
}

impl StateIndex {
    /// Takes one entry that became current (a write, a tombstone).
    pub fn apply(&mut self, e: &Entry) -> Touched {
        self.dirty = true;
        if e.is_tombstone() {
            self.entries.remove(&e.key);
        } else {
            self.entries.insert(e.key.clone(), Arc::new(e.clone()));
        }
        let mut touched = Touched::default();
        match keys::classify(&e.key) {
            Key::Orchestration => {
                touched.orchestration = true;
                if let Some(name) = keys::parse_service_key(&e.key) {
                    if e.is_tombstone() {
                        Arc::make_mut(&mut self.tombstoned).insert(name.to_string());
                    } else if self.tombstoned.contains(name) {
                        Arc::make_mut(&mut self.tombstoned).remove(name);
                    }
                }
                if let Err(err) = self.cluster.apply_entry(&e.key, e.value.as_deref()) {
                    self.log_once(err.to_string());
                }
            }
            Key::Rollout { node, service } => {
                touched.orchestration = true;
                let decoded = e
                    .value
                    .as_ref()
                    .map(|_| keys::decode::<PublishedRollout>(e));
                let service = service.to_string();
                let rec = self.node_mut(node);
                match decoded {
                    Some(Ok(r)) => {
                        rec.rollouts.insert(service, r);
                    }
                    Some(Err(err)) => {
                        rec.rollouts.remove(&service);
                        self.log_once(err);
                    }
                    None => {
                        rec.rollouts.remove(&service);
                    }
                }
            }
            Key::Node { node, suffix } => {
                let node = node.to_string();
                if let Err(err) = self.apply_node(&node, suffix, e) {
                    self.log_once(err);
                }
            }
            Key::BlobAdvert { node, id } => {
                let (node, id) = (node.to_string(), id.to_string());
                let rec = self.node_mut(&node);
                if e.is_tombstone() {
                    rec.blobs.remove(&id);
                } else {
                    rec.blobs.insert(id.clone());
                    touched.blob_advert = Some((node, id));
                }
            }
            Key::BlobPart { node, id } => {
                let (node, id) = (node.to_string(), id.to_string());
                let rec = self.node_mut(&node);
                if e.is_tombstone() {
                    rec.partial.remove(&id);
                } else {
                    rec.partial.insert(id.clone());
                    touched.blob_partial = Some((node, id));
                }
            }
            Key::Binding => {
                touched.binding = Some(e.key.clone());
                let bindings = Arc::make_mut(&mut self.bindings);
                match e.value.as_ref().map(|_| keys::decode::<Binding>(e)) {
                    Some(Ok(b)) => {
                        bindings.insert(e.key.clone(), b);
                    }
                    Some(Err(err)) => {
                        bindings.remove(&e.key);
                        self.log_once(err);
                    }
                    None => {
                        bindings.remove(&e.key);
                    }
                }
            }
            Key::Image { reference } => {
                // Which nodes hold an image feeds placement (see `facts`).
                touched.orchestration = true;
                let images = Arc::make_mut(&mut self.images);
                match e.value.as_ref().map(|_| keys::decode::<ImageRecord>(e)) {
                    Some(Ok(r)) => {
                        images.insert(reference.to_string(), r);
                    }
                    Some(Err(err)) => {
                        images.remove(reference);
                        self.log_once(err);
                    }
                    None => {
                        images.remove(reference);
                    }
                }
            }
            Key::User | Key::Other => {}
        }
        touched
    }

    fn apply_node(&mut self, node: &str, suffix: &str, e: &Entry) -> Result<(), String> {
        let live = !e.is_tombstone();
        match suffix {
            keys::INFO => {
                let v = if live { Some(keys::decode(e)?) } else { None };
                self.node_mut(node).info = v;
            }
            keys::RESOURCES => {
                let v = if live { Some(keys::decode(e)?) } else { None };
                self.node_mut(node).resources = v;
            }
            keys::IMAGES => {
                let v = if live { keys::decode(e)? } else { Vec::new() };
                self.node_mut(node).images = v;
            }
            keys::PLUGINS => {
                let v = if live { keys::decode(e)? } else { Vec::new() };
                self.node_mut(node).plugins = v;
            }
            keys::EVENTS => {
                let v = if live { keys::decode(e)? } else { Vec::new() };
                self.node_mut(node).events = v;
            }
            shoal_core::LEFT_SUFFIX => self.node_mut(node).left = live,
            _ => {}
        }
        Ok(())
    }

    fn node_mut(&mut self, node: &str) -> &mut NodeRecord {
        Arc::make_mut(self.nodes.entry(node.to_string()).or_default())
    }

    /// Logs an unreadable record once (a bad writer must not flood the log).
    fn log_once(&mut self, what: String) {
        if self.logged.len() < 10_000 && self.logged.insert(what.clone()) {
            tracing::warn!("ignoring an unreadable record: {what}");
        }
    }

    /// Whether something changed since the last [`StateIndex::take_dirty`].
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// The decoded orchestration state.
    #[cfg(test)]
    pub fn cluster(&self) -> &ClusterView {
        &self.cluster
    }

    /// Bindings by key.
    pub fn bindings(&self) -> &BTreeMap<String, Binding> {
        &self.bindings
    }

    /// Nodes (other than `me`) that advertise blob `id`.
    pub fn advertisers(&self, id: &str, me: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(n, r)| n.as_str() != me && r.blobs.contains(id))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The record of `name`, if present and live.
    pub fn service(&self, name: &str) -> Option<&shoal_orch::ServiceRecord> {
        self.cluster.services.get(name).map(|r| r.as_ref())
    }

    /// The part of a [`Views`] that comes from the state.
    pub fn snapshot_parts(&self) -> StateParts {
        StateParts {
            cluster: self.cluster.clone(),
            nodes: self.nodes.clone(),
            images: self.images.clone(),
            tombstoned: self.tombstoned.clone(),
            entries: self.entries.clone(),
        }
    }
}

/// The state-derived part of [`Views`].
#[derive(Debug, Clone, Default)]
pub struct StateParts {
    /// Orchestration records.
    pub cluster: ClusterView,
    /// What each node published about itself.
    pub nodes: BTreeMap<String, Arc<NodeRecord>>,
    /// Pushed images by reference.
    pub images: Arc<BTreeMap<String, ImageRecord>>,
    /// Services whose record is a tombstone.
    pub tombstoned: Arc<BTreeSet<String>>,
    /// Every live entry, for kv reads.
    pub entries: imbl::OrdMap<String, Arc<Entry>>,
}

/// Counters of the agent, published with the views for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct AgentStats {
    /// The core's counters.
    pub core: Stats,
    /// Keys held (tombstones included).
    pub keys: usize,
    /// Batches that failed to persist.
    pub persist_errors: u64,
    /// Reconcile passes made as steward.
    pub steward_passes: u64,
    /// Writes made as steward.
    pub steward_writes: u64,
    /// This node's allocations by reported state.
    pub allocations: BTreeMap<&'static str, usize>,
    /// Loop turns by branch.
    pub turns: BTreeMap<&'static str, Histogram>,
    /// Orchestration pass durations (off the loop).
    pub passes: Histogram,
    /// `(name, capacity, queued)` of every named channel.
    pub channels: Vec<(&'static str, usize, usize)>,
    /// Blob frames dropped because the blob worker's inbox was full.
    pub blob_frames_dropped: u64,
    /// Logs frames dropped because the logs task's inbox was full.
    pub logs_frames_dropped: u64,
}

/// One immutable picture of the agent (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Views {
    /// This agent's name.
    pub me: String,
    /// Every member, one per name, this agent included.
    pub members: Arc<Vec<(NodeId, Status)>>,
    /// The state-derived part.
    pub state: StateParts,
    /// This agent's plugin rows.
    pub local_plugins: Arc<Vec<PluginRow>>,
    /// `not joined: …` while no seed let us in.
    pub join_note: Option<String>,
    /// Counters.
    pub stats: Arc<AgentStats>,
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

/// Lower-case name of an allocation state, as the CLI shows it.
pub fn state_str(s: AllocState) -> &'static str {
    match s {
        AllocState::Pending => "pending",
        AllocState::Pulling => "pulling",
        AllocState::Starting => "starting",
        AllocState::Running => "running",
        AllocState::Stopping => "stopping",
        AllocState::Failed => "failed",
        AllocState::Exited => "exited",
    }
}

impl Views {
    /// Membership statuses by name, for orchestration: SWIM's view, plus nodes known
    /// only from the state (they published info), which count as down.
    pub fn membership(&self) -> Vec<(String, NodeStatus)> {
        let mut out: Vec<(String, NodeStatus)> = self
            .members
            .iter()
            .map(|(id, st)| {
                let st = if id.name == self.me {
                    NodeStatus::Alive
                } else {
                    to_status(*st)
                };
                (id.name.clone(), st)
            })
            .collect();
        for (name, rec) in &self.state.nodes {
            if rec.info.is_some() && !out.iter().any(|(n, _)| n == name) {
                out.push((name.clone(), NodeStatus::Down));
            }
        }
        out
    }

    /// Members with their status (stamps are not known here: `since_ms` is 0).
    pub fn members_table(&self) -> Members {
        self.membership()
            .into_iter()
            .map(|(n, status)| {
                (
                    n,
                    Member {
                        status,
                        since_ms: 0,
                    },
                )
            })
            .collect()
    }

    /// Nodes that published their info.
    pub fn known_nodes(&self) -> Vec<String> {
        self.state
            .nodes
            .iter()
            .filter(|(_, r)| r.info.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// What the scheduler knows of every node that published something.
    pub fn facts(&self) -> BTreeMap<String, NodeFacts> {
        self.state
            .nodes
            .iter()
            .map(|(name, r)| {
                let mut labels = r
                    .info
                    .as_ref()
                    .map(|i| i.labels.clone())
                    .unwrap_or_default();
                if r.info
                    .as_ref()
                    .is_some_and(|i| i.drivers.iter().any(|d| d == "docker"))
                {
                    labels.insert(DOCKER_LABEL.to_string(), "true".into());
                }
                let capacity = r.resources.map_or(shoal_policy::Resources::default(), |r| {
                    shoal_policy::Resources {
                        cpu_millis: u64::from(r.cpus) * 1000,
                        memory_bytes: r.memory_bytes,
                        disk_bytes: r.disk_free_bytes,
                    }
                });
                (
                    name.clone(),
                    NodeFacts {
                        name: name.clone(),
                        status: NodeStatus::Down,
                        labels,
                        capacity,
                        images: self.images_held(r),
                        ports_in_use: Vec::new(),
                    },
                )
            })
            .collect()
    }

    /// Images a node holds: those its engine lists, and pushed images whose every
    /// blob it holds (it can load them without fetching a byte).
    fn images_held(&self, r: &NodeRecord) -> Vec<String> {
        let mut v = r.images.clone();
        for (reference, rec) in self.state.images.iter() {
            if !v.contains(reference) && rec.blobs().iter().all(|b| r.blobs.contains(b)) {
                v.push(reference.clone());
            }
        }
        v.sort();
        v
    }

    /// The scheduler's view: every member with labels, capacity and what slots reserve.
    pub fn scheduler_snapshot(&self) -> shoal_policy::Snapshot {
        let known = self.facts();
        let facts: Vec<NodeFacts> = self
            .membership()
            .into_iter()
            .map(|(name, status)| {
                let mut f = known.get(&name).cloned().unwrap_or_else(|| NodeFacts {
                    name: name.clone(),
                    ..NodeFacts::default()
                });
                f.status = status;
                f
            })
            .collect();
        build_snapshot(&facts, &self.state.cluster.slots)
    }

    /// `shoal nodes`.
    pub fn nodes(&self) -> Vec<NodeView> {
        self.members
            .iter()
            .map(|(id, status)| {
                let rec = self.state.nodes.get(&id.name);
                NodeView {
                    name: id.name.clone(),
                    addr: id.addr.to_string(),
                    status: status.as_str().to_string(),
                    gen: id.gen,
                    labels: rec
                        .and_then(|r| r.info.as_ref())
                        .map(|i| i.labels.clone())
                        .unwrap_or_default(),
                    resources: rec.and_then(|r| r.resources),
                    note: (id.name == self.me)
                        .then(|| self.join_note.clone())
                        .flatten(),
                    draining: self.state.cluster.drains.contains_key(&id.name),
                }
            })
            .collect()
    }

    /// `shoal node drain`: whether `node` is drained and what still runs there.
    pub fn drain(&self, node: &str) -> Result<DrainView, ApiError> {
        if !self.members.iter().any(|(id, _)| id.name == node) {
            return Err(ApiError::NotFound(format!("no node named {node:?}")));
        }
        let cluster = &self.state.cluster;
        let mut left = Vec::new();
        let mut placed = std::collections::BTreeSet::new();
        for (service, slots) in &cluster.slots {
            for (n, slot) in slots.iter() {
                for p in slot.placements().filter(|p| p.node == node) {
                    placed.insert(p.alloc_id.as_str());
                    left.push(format!("{service}/{n} placed"));
                }
            }
        }
        for reports in cluster.reports.values() {
            for (id, r) in reports.iter() {
                if r.node == node && !placed.contains(id.as_str()) {
                    left.push(format!(
                        "{}/{} {}",
                        r.report.service,
                        r.report.slot,
                        state_str(r.report.state)
                    ));
                }
            }
        }
        let drain = cluster.drains.get(node);
        Ok(DrainView {
            node: node.to_string(),
            draining: drain.is_some(),
            since_ms: drain.map(|d| d.since_ms),
            changed: None,
            left,
        })
    }

    fn alive(&self) -> Vec<String> {
        self.membership()
            .into_iter()
            .filter(|(_, st)| *st == NodeStatus::Alive)
            .map(|(n, _)| n)
            .collect()
    }

    /// `shoal services`.
    pub fn services(&self) -> Vec<ServiceView> {
        let members = self.members_table();
        let alive = self.alive();
        self.state
            .cluster
            .services
            .keys()
            .map(|name| self.service_view(name, &members, &alive))
            .collect()
    }

    fn service_view(&self, name: &str, members: &Members, alive: &[String]) -> ServiceView {
        let r = &self.state.cluster.services[name];
        let (slots, reports) = self.slots_and_reports(name);
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
        let healthy = healthy_replicas(slots, reports, members);
        let updated = slots
            .values()
            .filter(|s| {
                s.next.is_none()
                    && s.current
                        .as_ref()
                        .is_some_and(|p| p.version == r.version && is_healthy(p, reports, members))
            })
            .count() as u32;
        let steward = steward_for(name, alive.iter().map(String::as_str));
        // The steward's published status, if it is for this version.
        let rollout = steward
            .and_then(|s| self.state.nodes.get(s))
            .and_then(|rec| rec.rollouts.get(name))
            .filter(|ro| ro.version == r.version)
            .map(|ro| ro.status.clone());
        ServiceView {
            name: name.to_string(),
            driver: match r.spec.image() {
                Some(_) => "docker".into(),
                None => "process".into(),
            },
            desired: self.state.cluster.desired_replicas(name),
            slots: slots.len() as u32,
            running,
            healthy,
            updated,
            version: r.version,
            removing: r.deleted,
            steward: steward.map(str::to_string),
            rollout,
            autoscale: r.spec.autoscaling().map(|auto| {
                let state = self.state.cluster.scales.get(name);
                shoal_api::AutoscaleView {
                    policy: auto.policy,
                    min: auto.min,
                    max: auto.max,
                    reason: state.map(|s| s.reason.clone()).filter(|r| !r.is_empty()),
                    changed_ms: state.map(|s| s.changed_ms).filter(|t| *t > 0),
                    last: state.map(|s| s.last.clone()).filter(|r| !r.is_empty()),
                    decisions: state.map_or(0, |s| s.decisions),
                }
            }),
        }
    }

    /// `shoal events [SVC]`: scale decisions, newest first (of `service`, or of all).
    pub fn events(&self, service: Option<&str>) -> Result<Vec<shoal_api::EventView>, ApiError> {
        let cluster = &self.state.cluster;
        if let Some(name) = service {
            if !cluster.services.contains_key(name) {
                return Err(ApiError::NotFound(format!("no service named {name:?}")));
            }
        }
        let mut out: Vec<shoal_api::EventView> = cluster
            .scales
            .iter()
            .filter(|(name, _)| service.is_none_or(|s| s == name.as_str()))
            .flat_map(|(name, state)| {
                state.history.iter().map(move |e| shoal_api::EventView {
                    service: Some(name.clone()),
                    at_ms: e.at_ms,
                    kind: "scale".into(),
                    node: e.steward.clone(),
                    reason: e.reason.clone(),
                    from: Some(e.from),
                    to: Some(e.to),
                    by: Some(e.by.clone()),
                    steward: Some(e.steward.clone()),
                })
            })
            .collect();
        for (node, rec) in &self.state.nodes {
            out.extend(
                rec.events
                    .iter()
                    .filter(|e| service.is_none_or(|s| e.service.as_deref() == Some(s)))
                    .map(|e| shoal_api::EventView {
                        service: e.service.clone(),
                        at_ms: e.at_ms,
                        kind: e.kind.clone(),
                        node: node.clone(),
                        reason: e.reason.clone(),
                        from: None,
                        to: None,
                        by: None,
                        steward: None,
                    }),
            );
        }
        out.sort_by(|a, b| {
            b.at_ms
                .cmp(&a.at_ms)
                .then_with(|| a.service.cmp(&b.service))
                .then_with(|| a.node.cmp(&b.node))
        });
        Ok(out)
    }

    /// The slots and reports of `name` (empty if it has none).
    fn slots_and_reports(&self, name: &str) -> (&shoal_orch::SlotMap, &shoal_orch::Reports) {
        static NO_SLOTS: shoal_orch::SlotMap = shoal_orch::SlotMap::new();
        static NO_REPORTS: shoal_orch::Reports = shoal_orch::Reports::new();
        let cluster = &self.state.cluster;
        (
            cluster.slots.get(name).map_or(&NO_SLOTS, |s| s.as_ref()),
            cluster
                .reports
                .get(name)
                .map_or(&NO_REPORTS, |r| r.as_ref()),
        )
    }

    /// `shoal history <name>`: the current and every kept version, newest first.
    pub fn history(&self, name: &str) -> Result<Vec<VersionView>, ApiError> {
        let record = self
            .state
            .cluster
            .services
            .get(name)
            .filter(|r| !r.deleted)
            .ok_or_else(|| ApiError::NotFound(format!("no service named {name:?}")))?;
        let kept: Vec<(u64, &shoal_orch::ServiceSpec)> =
            std::iter::once((record.version, &record.spec))
                .chain(record.previous.iter().map(|p| (p.version, &p.spec)))
                .collect();
        let fields = |spec: &shoal_orch::ServiceSpec| match serde_json::to_value(spec) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        Ok(kept
            .iter()
            .enumerate()
            .map(|(i, &(version, spec))| {
                let mine = fields(spec);
                let changed = match kept.get(i + 1) {
                    Some((_, older)) => {
                        let theirs = fields(older);
                        let mut keys: Vec<String> =
                            mine.keys().chain(theirs.keys()).cloned().collect();
                        keys.sort();
                        keys.dedup();
                        keys.retain(|k| k != "replicas" && mine.get(k) != theirs.get(k));
                        keys
                    }
                    None => Vec::new(),
                };
                VersionView {
                    version,
                    current: version == record.version,
                    runs: match &spec.kind {
                        shoal_runtime::WorkloadKind::Docker { image, .. } => image.clone(),
                        shoal_runtime::WorkloadKind::Process { command } => command.join(" "),
                    },
                    changed,
                    spec: spec.clone(),
                }
            })
            .collect())
    }

    /// `shoal ps <name>`: the service and one row per allocation.
    pub fn ps(&self, name: &str) -> Result<(ServiceView, Vec<SlotView>), ApiError> {
        let cluster = &self.state.cluster;
        if !cluster.services.contains_key(name) {
            return Err(ApiError::NotFound(format!("no service named {name:?}")));
        }
        let members = self.members_table();
        let summary = self.service_view(name, &members, &self.alive());
        let (slots, reports) = self.slots_and_reports(name);
        let mut rows = Vec::new();
        for (&n, slot) in slots {
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
                let member = members.get(&p.node).map(|m| m.status);
                let (state_name, reason) = match (member, rep) {
                    (Some(NodeStatus::Alive), Some(rep)) => (
                        state_str(rep.state).to_string(),
                        rep.reason
                            .clone()
                            .or_else(|| if next { None } else { slot.reason.clone() }),
                    ),
                    (Some(NodeStatus::Alive), None) => (
                        "pending".to_string(),
                        Some(format!("waiting for node {} to start it", p.node)),
                    ),
                    // Its node does not answer (suspect, down, left or unknown): the
                    // replica may well still serve, so say what is known rather
                    // than `pending`.
                    (status, rep) => (
                        "unknown".to_string(),
                        Some(format!(
                            "node {} {}{}",
                            p.node,
                            status.map_or("unknown", status_str),
                            rep.map_or(String::new(), |r| format!(
                                "; last reported {}",
                                state_str(r.state)
                            ))
                        )),
                    ),
                };
                rows.push(SlotView {
                    slot: n,
                    node: Some(p.node.clone()),
                    state: state_name,
                    healthy: is_healthy(p, reports, &members),
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

    /// `shoal ps [--node N]`: every allocation of every service, by service
    /// and slot; only those placed on `node` if given (a node no member or
    /// record knows is an error, not an empty list).
    pub fn allocs(&self, node: Option<&str>) -> Result<Vec<AllocView>, ApiError> {
        if let Some(n) = node {
            if !self.state.nodes.contains_key(n) && !self.members_table().contains_key(n) {
                return Err(ApiError::NotFound(format!("no node named {n:?}")));
            }
        }
        let mut out = Vec::new();
        for name in self.state.cluster.services.keys() {
            let (_, rows) = self.ps(name)?;
            out.extend(
                rows.into_iter()
                    .filter(|r| node.is_none_or(|n| r.node.as_deref() == Some(n)))
                    .map(|slot| AllocView {
                        service: name.clone(),
                        slot,
                    }),
            );
        }
        Ok(out)
    }

    /// Where the logs of `name`'s allocations are (slot `slot` only, if given).
    pub fn log_targets(&self, name: &str, slot: Option<u32>) -> Result<Vec<LogTarget>, ApiError> {
        let (_, rows) = self.ps(name)?;
        let mut out = Vec::new();
        for row in rows {
            if slot.is_some_and(|s| s != row.slot) {
                continue;
            }
            let (Some(node), Some(alloc_id)) = (row.node, row.alloc_id) else {
                continue;
            };
            let member = self.members.iter().find(|(id, _)| id.name == node);
            let unreachable = match member {
                None => Some(format!("node {node} is not a member any more")),
                Some((_, st)) if matches!(st, Status::Down | Status::Left) => {
                    Some(format!("node {node} is {}", st.as_str()))
                }
                Some(_) => None,
            };
            out.push(LogTarget {
                slot: row.slot,
                local: node == self.me,
                addr: member.map(|(id, _)| id.addr),
                unreachable,
                node,
                alloc_id,
            });
        }
        if out.is_empty() {
            return Err(ApiError::NotFound(match slot {
                Some(s) => format!("service {name} has no allocation in slot {s}"),
                None => format!("service {name} has no allocations"),
            }));
        }
        Ok(out)
    }

    /// Plugin rows: this agent's, or every reachable agent's as published.
    pub fn plugin_rows(&self, all: bool) -> Vec<PluginRow> {
        if !all {
            return self.local_plugins.as_ref().clone();
        }
        let mut rows = Vec::new();
        for (id, status) in self.members.iter() {
            if matches!(status, Status::Down | Status::Left) {
                continue;
            }
            if id.name == self.me {
                rows.extend(self.local_plugins.iter().cloned());
            } else if let Some(r) = self.state.nodes.get(&id.name) {
                rows.extend(r.plugins.iter().cloned());
            }
        }
        rows
    }

    /// One user kv key.
    pub fn kv_get(&self, key: &str) -> Result<KvView, ApiError> {
        if let Some(why) = keys::refusal(key) {
            return Err(ApiError::BadRequest(why));
        }
        self.state
            .entries
            .get(key)
            .map(|e| KvView::of(e))
            .ok_or_else(|| ApiError::NotFound(format!("key not found: {key}")))
    }

    /// Live keys under `prefix`: user kv, or with `internal` shoal's records.
    pub fn kv_list(&self, prefix: &str, internal: bool) -> Vec<KvView> {
        self.state
            .entries
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| keys::is_user(k) != internal)
            .map(|(_, e)| KvView::of(e))
            .collect()
    }

    /// A live entry.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.state.entries.get(key).map(|e| e.as_ref())
    }
}

/// Where one allocation's logs are.
#[derive(Debug, Clone)]
pub struct LogTarget {
    /// Slot number.
    pub slot: u32,
    /// Node running it.
    pub node: String,
    /// Allocation id.
    pub alloc_id: String,
    /// The node's QUIC address, where its logs task answers.
    pub addr: Option<std::net::SocketAddr>,
    /// Why the node cannot answer now (down, left, gone), if it cannot.
    pub unreachable: Option<String>,
    /// Whether the node is this agent.
    pub local: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::{Hlc, WriterId};

    fn entry(key: &str, value: Option<&[u8]>) -> Entry {
        Entry {
            key: key.into(),
            value: value.map(<[u8]>::to_vec),
            hlc: Hlc(1),
            writer: WriterId {
                node: "n1".into(),
                gen: 1,
            },
            seq: 1,
        }
    }

    #[test]
    fn the_index_follows_changes_and_logs_bad_records_once() {
        let mut idx = StateIndex::default();
        let t = idx.apply(&entry("app/x", Some(b"1")));
        assert_eq!(t, Touched::default());
        let info = serde_json::to_vec(&NodeInfo {
            name: "n2".into(),
            addr: "127.0.0.1:7002".into(),
            labels: [("zone".to_string(), "b".to_string())].into(),
            version: "0".into(),
            started_ms: 0,
            api: "127.0.0.1:7102".into(),
            drivers: vec!["process".into()],
        })
        .unwrap();
        idx.apply(&entry("node/n2/info", Some(&info)));
        let t = idx.apply(&entry("node/n2/blob/abc", Some(b"")));
        assert_eq!(t.blob_advert, Some(("n2".into(), "abc".into())));
        assert_eq!(idx.advertisers("abc", "n1"), vec!["n2".to_string()]);
        let t = idx.apply(&entry("alloc/web/0", Some(b"{not json")));
        assert!(t.orchestration);
        assert!(idx.cluster().slots.is_empty());
        idx.apply(&entry("alloc/web/0", Some(b"{not json")));
        assert_eq!(idx.logged.len(), 1, "logged once");
        assert!(idx.take_dirty());
        assert!(!idx.take_dirty());

        let views = Views {
            me: "n1".into(),
            state: idx.snapshot_parts(),
            ..Views::default()
        };
        assert_eq!(views.kv_get("app/x").unwrap().value, "1");
        assert!(views.kv_get("node/n2/info").is_err());
        assert_eq!(views.kv_list("", false).len(), 1);
        assert_eq!(views.kv_list("node/", true).len(), 2);
        assert_eq!(
            views.kv_list("", true).len(),
            3,
            "the bad slot is a live entry too"
        );
        assert_eq!(views.facts()["n2"].labels["zone"], "b");
        // n2 is known from the state only: down.
        assert_eq!(
            views.membership(),
            vec![("n2".to_string(), NodeStatus::Down)]
        );
        // Deletes leave the index too.
        idx.apply(&entry("app/x", None));
        let views = Views {
            state: idx.snapshot_parts(),
            ..views
        };
        assert!(views.kv_get("app/x").is_err());
    }
}
