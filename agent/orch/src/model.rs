//! The replicated data model: what orchestration keeps in the core's LWW map, as JSON.
//!
//! | key | value | written by |
//! |---|---|---|
//! | `service/<name>` | [`ServiceRecord`] | `shoal deploy` / `scale` / `rm` (any node) |
//! | `alloc/<service>/<slot>` | [`Slot`] | the service's steward only |
//! | `node/<node>/alloc/<alloc_id>` | [`AllocReport`] | the node running the allocation |
//! | `scale/<name>` | [`ScaleState`](crate::ScaleState) | the service's steward, if autoscaled |
//! | `drain/<node>` | [`Drain`] | `shoal node drain` (any node); `undrain` deletes it |
//!
//! Removing a service is a flag, not a tombstone: `shoal rm` writes the record with
//! `deleted = true`. Its steward then deletes every slot (which tells each agent to stop
//! its copy), and once no slot is left and no live node still reports an allocation of
//! the service it deletes the record itself. A tombstone written by `rm` would lose the
//! information that slots are still to be cleaned up.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_policy_logic::{NodeStatus, Resources};

use crate::spec::{ServiceSpec, MAX_REPLICAS};

/// Prefix of service records.
pub const SERVICE_PREFIX: &str = "service/";
/// Prefix of drain marks (`shoal node drain`).
pub const DRAIN_PREFIX: &str = "drain/";
/// Prefix of allocation slots.
pub const SLOT_PREFIX: &str = "alloc/";
/// Infix of allocation reports in a node's key space (`node/<n>/alloc/<id>`).
const REPORT_INFIX: &str = "/alloc/";
/// Specs of earlier versions kept in a record, so a node can still (re)start an
/// allocation of a version a rollout has not replaced yet.
pub const KEPT_VERSIONS: usize = 3;

/// A value in the replicated state that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The value is not the JSON this key holds (or its spec is invalid).
    #[error("{key}: {message}")]
    Decode {
        /// The key.
        key: String,
        /// What the decoder said.
        message: String,
    },
    /// A request asked for more replicas than allowed.
    #[error("{0} replicas is more than the limit of {MAX_REPLICAS}")]
    TooManyReplicas(u32),
    /// A rollback was asked for, but the record keeps no earlier spec.
    #[error(
        "service {service} has no earlier version to roll back to (it runs version {current})"
    )]
    NoEarlierVersion {
        /// The service.
        service: String,
        /// Its version.
        current: u64,
    },
    /// A rollback named a version the record does not keep.
    #[error(
        "service {service} keeps no version {version}: it runs version {current}, and keeps {kept}"
    )]
    VersionNotKept {
        /// The service.
        service: String,
        /// The version asked for.
        version: u64,
        /// Its version.
        current: u64,
        /// The versions it keeps, e.g. `3, 2 and 1`.
        kept: String,
    },
    /// A rollback to what already runs.
    #[error("service {service} already runs the spec of version {version} (as version {current})")]
    AlreadyRunning {
        /// The service.
        service: String,
        /// The version asked for.
        version: u64,
        /// Its version.
        current: u64,
    },
}

/// `service/<name>`.
pub fn service_key(name: &str) -> String {
    format!("{SERVICE_PREFIX}{name}")
}

/// `drain/<node>`.
pub fn drain_key(node: &str) -> String {
    format!("{DRAIN_PREFIX}{node}")
}

/// The node name of a `drain/<node>` key.
pub fn parse_drain_key(key: &str) -> Option<&str> {
    key.strip_prefix(DRAIN_PREFIX)
        .filter(|n| !n.is_empty() && !n.contains('/'))
}

/// `drain/<node>`: the node takes no new placements, and every allocation on it
/// gets a replacement elsewhere (promoted once healthy, then the old one stops).
/// Any node may write it; `shoal node undrain` deletes it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Drain {
    /// When it was asked for (wall-clock ms).
    pub since_ms: u64,
}

/// `alloc/<service>/<slot>`.
pub fn slot_key(service: &str, slot: u32) -> String {
    format!("{SLOT_PREFIX}{service}/{slot}")
}

/// Prefix of every slot of one service: `alloc/<service>/`.
pub fn slot_prefix(service: &str) -> String {
    format!("{SLOT_PREFIX}{service}/")
}

/// `node/<node>/alloc/<alloc_id>`.
pub fn report_key(node: &str, alloc_id: &str) -> String {
    format!("node/{node}{REPORT_INFIX}{alloc_id}")
}

/// Prefix of one node's reports: `node/<node>/alloc/`.
pub fn report_prefix(node: &str) -> String {
    format!("node/{node}{REPORT_INFIX}")
}

/// The service name of a `service/<name>` key.
pub fn parse_service_key(key: &str) -> Option<&str> {
    key.strip_prefix(SERVICE_PREFIX)
        .filter(|n| !n.is_empty() && !n.contains('/'))
}

/// `(service, slot)` of an `alloc/<service>/<slot>` key. Only the canonical
/// spelling of the number is accepted (`alloc/web/03` is not slot 3), so one slot
/// has one key.
pub fn parse_slot_key(key: &str) -> Option<(&str, u32)> {
    let rest = key.strip_prefix(SLOT_PREFIX)?;
    let (service, slot) = rest.split_once('/')?;
    let n: u32 = slot.parse().ok()?;
    (!service.is_empty() && n.to_string() == slot).then_some((service, n))
}

/// `(node, alloc_id)` of a `node/<node>/alloc/<alloc_id>` key.
pub fn parse_report_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("node/")?;
    let (node, id) = rest.split_once(REPORT_INFIX)?;
    (!node.is_empty() && !node.contains('/') && !id.is_empty() && !id.contains('/'))
        .then_some((node, id))
}

/// Encodes a value as JSON (the form every orchestration key holds).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // These types contain only strings, numbers, maps with string keys and
    // sequences, which serde_json always encodes.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Decodes the JSON value of `key`.
pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, ModelError> {
    serde_json::from_slice(bytes).map_err(|e| ModelError::Decode {
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// A spec of an earlier version, kept in the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PastSpec {
    /// Its version.
    pub version: u64,
    /// The spec.
    pub spec: ServiceSpec,
}

/// `service/<name>`: what the operator asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The current spec.
    pub spec: ServiceSpec,
    /// Bumped by each deploy that changes the spec (other than its replica count).
    pub version: u64,
    /// Desired replicas; `shoal scale` changes only this.
    pub replicas: u32,
    /// Set by `shoal rm`; the steward then removes every slot and finally the record.
    #[serde(default)]
    pub deleted: bool,
    /// Specs of up to [`KEPT_VERSIONS`] earlier versions, newest first.
    #[serde(default)]
    pub previous: Vec<PastSpec>,
}

impl ServiceRecord {
    /// The record after deploying `spec` over `current` (if any).
    ///
    /// A changed workload bumps the version (a rollout); a changed `replicas` in the
    /// spec sets the desired count, while an unchanged one keeps what `shoal scale`
    /// set. Deploying over a deleted record revives it with a new version.
    pub fn deploy(current: Option<&ServiceRecord>, spec: ServiceSpec) -> ServiceRecord {
        let Some(cur) = current else {
            return ServiceRecord {
                replicas: spec.replicas,
                spec,
                version: 1,
                deleted: false,
                previous: Vec::new(),
            };
        };
        let same = !cur.deleted && cur.spec.same_workload(&spec);
        let replicas = if cur.deleted || cur.spec.replicas != spec.replicas {
            spec.replicas
        } else {
            cur.replicas
        };
        if same {
            return ServiceRecord {
                replicas,
                spec,
                ..cur.clone()
            };
        }
        let mut previous = vec![PastSpec {
            version: cur.version,
            spec: cur.spec.clone(),
        }];
        previous.extend(cur.previous.iter().cloned());
        previous.truncate(KEPT_VERSIONS);
        ServiceRecord {
            replicas,
            spec,
            version: cur.version.saturating_add(1),
            deleted: false,
            previous,
        }
    }

    /// The record with `replicas` desired replicas.
    pub fn scaled(&self, replicas: u32) -> Result<ServiceRecord, ModelError> {
        if replicas > MAX_REPLICAS {
            return Err(ModelError::TooManyReplicas(replicas));
        }
        Ok(ServiceRecord {
            replicas,
            ..self.clone()
        })
    }

    /// The record marked for removal.
    pub fn removed(&self) -> ServiceRecord {
        ServiceRecord {
            deleted: true,
            ..self.clone()
        }
    }

    /// The record after rolling back to the spec of version `to` (default: the
    /// newest kept one before the current). Like a deploy of that spec, it gets a
    /// new version number; the desired replica count stays as it is, and replicas
    /// that still run that spec keep running ([`crate::reconcile`] moves them to
    /// the new version in place).
    pub fn rolled_back(&self, to: Option<u64>) -> Result<ServiceRecord, ModelError> {
        let service = &self.spec.name;
        let current = self.version;
        let past = match to {
            None => self.previous.first().ok_or(ModelError::NoEarlierVersion {
                service: service.clone(),
                current,
            })?,
            Some(v) => match self.previous.iter().find(|p| p.version == v) {
                Some(p) => p,
                None if v == current => {
                    return Err(ModelError::AlreadyRunning {
                        service: service.clone(),
                        version: v,
                        current,
                    })
                }
                None => {
                    let mut kept: Vec<String> = std::iter::once(current)
                        .chain(self.previous.iter().map(|p| p.version))
                        .map(|v| v.to_string())
                        .collect();
                    let last = kept.pop().unwrap_or_default();
                    let kept = if kept.is_empty() {
                        "only that one".to_string()
                    } else {
                        format!("{} and {last}", kept.join(", "))
                    };
                    return Err(ModelError::VersionNotKept {
                        service: service.clone(),
                        version: v,
                        current,
                        kept,
                    });
                }
            },
        };
        if self.spec.same_workload(&past.spec) {
            return Err(ModelError::AlreadyRunning {
                service: service.clone(),
                version: past.version,
                current,
            });
        }
        let mut spec = past.spec.clone();
        // `deploy` keeps the desired count when the spec's count is unchanged.
        spec.replicas = self.spec.replicas;
        Ok(ServiceRecord::deploy(Some(self), spec))
    }

    /// The spec of `version`, if it is the current one or still kept.
    pub fn spec_for(&self, version: u64) -> Option<&ServiceSpec> {
        if version == self.version {
            return Some(&self.spec);
        }
        self.previous
            .iter()
            .find(|p| p.version == version)
            .map(|p| &p.spec)
    }
}

/// What a placement holds on its node, so every node can compute free capacity
/// exactly, whatever version of the spec the placement runs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Reservation {
    /// Resources reserved.
    pub resources: Resources,
    /// Fixed host ports bound.
    pub host_ports: Vec<u16>,
    /// Image the node will hold.
    pub image: Option<String>,
}

/// One allocation: a version of a slot on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Node that runs it.
    pub node: String,
    /// Spec version it runs.
    pub version: u64,
    /// Unique id (see [`new_alloc_id`]).
    pub alloc_id: String,
    /// When the steward placed it (ms).
    pub placed_ms: u64,
    /// What it holds on the node.
    #[serde(default)]
    pub reserved: Reservation,
}

/// `alloc/<service>/<slot>`: where one replica runs. Written only by the steward.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Slot {
    /// The allocation serving this slot; `None` while it could not be placed.
    pub current: Option<Placement>,
    /// A new-version allocation started alongside `current` (rolling update with
    /// surge); promoted to `current` once healthy.
    pub next: Option<Placement>,
    /// Why the slot (or its replacement) is not placed, for `shoal ps`:
    /// `0/5 nodes fit: 3 insufficient memory, 2 not alive`.
    pub reason: Option<String>,
}

impl Slot {
    /// The node of the current allocation.
    pub fn node(&self) -> Option<&str> {
        self.current.as_ref().map(|p| p.node.as_str())
    }

    /// The current and next placements.
    pub fn placements(&self) -> impl Iterator<Item = &Placement> {
        self.current.iter().chain(self.next.iter())
    }
}

/// Where an allocation is in its life, as its node reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocState {
    /// Known but not started (e.g. the image is being fetched).
    #[default]
    Pending,
    /// Its image is being fetched from peers (bytes in [`AllocReport::pull_bytes`]).
    Pulling,
    /// Started, not yet running.
    Starting,
    /// Running.
    Running,
    /// Being stopped.
    Stopping,
    /// Ended and will not be restarted now (crashed, or waiting for backoff).
    Failed,
    /// Ended successfully and, by its restart policy, stays ended.
    Exited,
}

/// `node/<node>/alloc/<alloc_id>`: what a node observes about an allocation it runs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AllocReport {
    /// Service name.
    pub service: String,
    /// Slot number.
    pub slot: u32,
    /// Spec version.
    pub version: u64,
    /// Where it is in its life.
    pub state: AllocState,
    /// Result of the health check (or, without one, whether it runs).
    pub healthy: bool,
    /// `host:port` of its first port, if any. The host is the node's advertised
    /// address, or `127.0.0.1` when the workload listens on loopback only.
    pub endpoint: Option<String>,
    /// Every port by name, with the host port it got on the node.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<(String, u16)>,
    /// It listens on loopback only: reachable from its own node, not from others.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub local_only: bool,
    /// Restarts so far.
    pub restarts: u32,
    /// Starts in a row the driver refused (no such image or program, a spec the
    /// driver cannot run); 0 once a start succeeds. See [`START_FAILURES_STALL`].
    #[serde(skip_serializing_if = "is_zero")]
    pub start_failures: u32,
    /// It has been healthy at least once: a crash after that is a restart, and
    /// does not hold up or stall a rollout.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub was_healthy: bool,
    /// Last error or exit reason.
    pub reason: Option<String>,
    /// CPU use in percent of one core.
    pub cpu_percent: f64,
    /// Resident memory.
    pub memory_bytes: u64,
    /// Custom metrics scraped from the replica's Prometheus endpoint (autoscaled
    /// services that name them), by metric name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// While pulling: bytes of its image fetched so far and in all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull_bytes: Option<[u64; 2]>,
    /// Start time (ms since the epoch).
    pub started_ms: u64,
    /// The driver's handle: container id (docker) or pid (process).
    pub handle: Option<String>,
}

/// Refused starts in a row after which a current-version replica stalls its rollout
/// at once, without waiting out `healthy_deadline`: the same start failing twice is
/// not going to succeed by waiting.
pub const START_FAILURES_STALL: u32 = 2;

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A report and the node that wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reported {
    /// The node (from the key).
    pub node: String,
    /// The report.
    pub report: AllocReport,
}

/// One service's reports by alloc id.
pub type Reports = BTreeMap<String, Reported>;
/// One service's slots by number.
pub type SlotMap = BTreeMap<u32, Slot>;
/// Every service's slots. Each service's map is shared, so a view is cheap to copy
/// and a change copies only the service it touches.
pub type ClusterSlots = BTreeMap<String, Arc<SlotMap>>;

/// A member as the agent's membership sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Status.
    pub status: NodeStatus,
    /// Since when it has had this status (ms, same clock as `now_ms`).
    pub since_ms: u64,
}

/// Every member by node name.
pub type Members = BTreeMap<String, Member>;

/// A fresh allocation id: `<service>-<slot>-<version>-<12 hex>`.
///
/// The suffix hashes the node, the time and the allocation it replaces, so ids are
/// unique per (service, slot, version, node, attempt), yet the same inputs give the
/// same id: `reconcile` stays a pure function.
pub fn new_alloc_id(
    service: &str,
    slot: u32,
    version: u64,
    node: &str,
    now_ms: u64,
    replaces: Option<&str>,
) -> String {
    let mut h = blake3::Hasher::new();
    for part in [
        service.as_bytes(),
        &slot.to_le_bytes(),
        &version.to_le_bytes(),
        node.as_bytes(),
        &now_ms.to_le_bytes(),
        replaces.unwrap_or("").as_bytes(),
    ] {
        // Length-prefixed so no two different tuples hash the same bytes.
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    let hash = h.finalize();
    let hex: String = hash.as_bytes()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{service}-{slot}-{version}-{hex}")
}

/// Prefix of the steward's published rollout status of a service, in its node-owned
/// keys: `node/<steward>/rollout/<service>`.
const ROLLOUT_INFIX: &str = "/rollout/";

/// `node/<node>/rollout/<service>`: the rollout status `node` published as steward.
pub fn rollout_key(node: &str, service: &str) -> String {
    format!("node/{node}{ROLLOUT_INFIX}{service}")
}

/// Prefix of the rollout statuses `node` published: `node/<node>/rollout/`.
pub fn rollout_prefix(node: &str) -> String {
    format!("node/{node}{ROLLOUT_INFIX}")
}

/// `(node, service)` of a `node/<node>/rollout/<service>` key.
pub fn parse_rollout_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("node/")?;
    let (node, service) = rest.split_once(ROLLOUT_INFIX)?;
    (!node.is_empty() && !node.contains('/') && !service.is_empty() && !service.contains('/'))
        .then_some((node, service))
}

/// Services whose record in `state` is a tombstone (known to be gone), for
/// [`crate::PassInput::tombstoned`].
pub fn tombstoned_services(state: &shoal_core::State) -> std::collections::BTreeSet<String> {
    state
        .scan_prefix(SERVICE_PREFIX)
        .filter(|e| e.is_tombstone())
        .filter_map(|e| parse_service_key(&e.key).map(str::to_string))
        .collect()
}

/// Services `node` has a live published rollout status for in `state`, for
/// [`crate::PassInput::published_rollouts`].
pub fn published_rollouts(
    state: &shoal_core::State,
    node: &str,
) -> std::collections::BTreeSet<String> {
    state
        .scan_prefix(&rollout_prefix(node))
        .filter(|e| !e.is_tombstone())
        .filter_map(|e| parse_rollout_key(&e.key).map(|(_, s)| s.to_string()))
        .collect()
}

/// The orchestration part of the replicated state, decoded.
///
/// Built once from a replica ([`ClusterView::from_state`]) and then kept current
/// entry by entry ([`ClusterView::apply_entry`]), so nobody decodes the whole
/// state again per pass or per read. Cheap to clone: maps of shared per-service
/// parts.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Records by service name.
    pub services: BTreeMap<String, Arc<ServiceRecord>>,
    /// Slots by service.
    pub slots: ClusterSlots,
    /// Reports by service, then alloc id.
    pub reports: BTreeMap<String, Arc<Reports>>,
    /// Autoscaler states by service.
    pub scales: crate::autoscale::ScaleStates,
    /// Drained nodes by name.
    pub drains: BTreeMap<String, Arc<Drain>>,
    /// Service of each report key, so a deleted report can be found.
    report_services: Arc<BTreeMap<String, String>>,
}

/// Puts a decoded per-service value into `map` (a delete or an undecodable value
/// takes it out; the latter is returned as the error).
fn keep<T>(
    map: &mut BTreeMap<String, Arc<T>>,
    name: &str,
    decoded: Result<Option<T>, ModelError>,
) -> Result<bool, ModelError> {
    match decoded {
        Ok(Some(v)) => {
            map.insert(name.to_string(), Arc::new(v));
            Ok(true)
        }
        Ok(None) => {
            map.remove(name);
            Ok(true)
        }
        Err(e) => {
            map.remove(name);
            Err(e)
        }
    }
}

/// Whether `key` is one [`ClusterView`] decodes.
pub fn is_orchestration_key(key: &str) -> bool {
    parse_service_key(key).is_some()
        || parse_slot_key(key).is_some()
        || parse_report_key(key).is_some()
        || crate::autoscale::parse_scale_key(key).is_some()
        || parse_drain_key(key).is_some()
}

impl ClusterView {
    /// Decodes the orchestration keys of a replica of the cluster state (services,
    /// slots and every node's reports; other keys are not read).
    pub fn from_state(state: &shoal_core::State) -> (ClusterView, Vec<ModelError>) {
        let entries = state
            .scan_prefix(SERVICE_PREFIX)
            .chain(state.scan_prefix(SLOT_PREFIX))
            .chain(state.scan_prefix(crate::autoscale::SCALE_PREFIX))
            .chain(state.scan_prefix(DRAIN_PREFIX))
            .chain(
                state
                    .scan_prefix(shoal_core::NODE_PREFIX)
                    .filter(|e| parse_report_key(&e.key).is_some()),
            )
            .filter_map(|e| e.value.as_deref().map(|v| (e.key.as_str(), v)));
        ClusterView::from_entries(entries)
    }

    /// Decodes every orchestration key among `entries` (live `(key, value)` pairs);
    /// other keys are skipped. Values that do not decode are left out and returned
    /// as errors, so one bad writer cannot stop orchestration.
    pub fn from_entries<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> (ClusterView, Vec<ModelError>) {
        let mut view = ClusterView::default();
        let mut errors = Vec::new();
        for (key, value) in entries {
            if let Err(e) = view.apply_entry(key, Some(value)) {
                errors.push(e);
            }
        }
        (view, errors)
    }

    /// Takes one changed key into the view: `value` is its new value, `None` a
    /// delete. Keys the view does not hold are ignored (`Ok(false)`); a value that
    /// does not decode removes the key from the view and is returned as the error.
    pub fn apply_entry(&mut self, key: &str, value: Option<&[u8]>) -> Result<bool, ModelError> {
        if let Some(name) = parse_service_key(key) {
            let decoded = value
                .map(|v| {
                    decode::<ServiceRecord>(key, v).and_then(|r| {
                        if r.spec.name == name {
                            Ok(r)
                        } else {
                            Err(ModelError::Decode {
                                key: key.to_string(),
                                message: format!("record names service {:?}", r.spec.name),
                            })
                        }
                    })
                })
                .transpose();
            return keep(&mut self.services, name, decoded);
        }
        if let Some(name) = crate::autoscale::parse_scale_key(key) {
            let decoded = value
                .map(|v| decode::<crate::autoscale::ScaleState>(key, v))
                .transpose();
            return keep(&mut self.scales, name, decoded);
        }
        if let Some(node) = parse_drain_key(key) {
            let decoded = value.map(|v| decode::<Drain>(key, v)).transpose();
            return keep(&mut self.drains, node, decoded);
        }
        if let Some((service, n)) = parse_slot_key(key) {
            let decoded = value.map(|v| decode::<Slot>(key, v)).transpose();
            if let Ok(Some(slot)) = decoded {
                Arc::make_mut(self.slots.entry(service.to_string()).or_default()).insert(n, slot);
                return Ok(true);
            }
            // Deleted, or unreadable: either way the slot is not in the view.
            if let Some(map) = self.slots.get_mut(service) {
                Arc::make_mut(map).remove(&n);
                if map.is_empty() {
                    self.slots.remove(service);
                }
            }
            return decoded.map(|_| true);
        }
        if let Some((node, id)) = parse_report_key(key) {
            // The service is inside the value: a delete finds it by the key.
            let known = self.report_services.contains_key(key);
            if let Some(old) = known
                .then(|| Arc::make_mut(&mut self.report_services).remove(key))
                .flatten()
            {
                if let Some(map) = self.reports.get_mut(&old) {
                    Arc::make_mut(map).remove(id);
                    if map.is_empty() {
                        self.reports.remove(&old);
                    }
                }
            }
            let Some(v) = value else {
                return Ok(true);
            };
            let report = decode::<AllocReport>(key, v)?;
            Arc::make_mut(&mut self.report_services)
                .insert(key.to_string(), report.service.clone());
            Arc::make_mut(self.reports.entry(report.service.clone()).or_default()).insert(
                id.to_string(),
                Reported {
                    node: node.to_string(),
                    report,
                },
            );
            return Ok(true);
        }
        Ok(false)
    }

    /// The replica count `service` runs: 0 once removed; for an autoscaled service
    /// its scaler's count (within `min..=max`), else the record's.
    pub fn desired_replicas(&self, service: &str) -> u32 {
        let Some(r) = self.services.get(service) else {
            return 0;
        };
        if r.deleted {
            return 0;
        }
        match r.spec.autoscaling() {
            Some(auto) => crate::autoscale::effective_replicas(
                &auto,
                r.replicas,
                self.scales.get(service).map(|s| s.as_ref()),
            ),
            None => r.replicas,
        }
    }

    /// Applies a steward's own write (see [`ClusterView::apply_entry`]).
    pub fn apply_write(&mut self, w: &crate::Write) {
        let _ = match w {
            crate::Write::Put { key, value } => self.apply_entry(key, Some(value)),
            crate::Write::Delete { key } => self.apply_entry(key, None),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn keys_round_trip() {
        assert_eq!(parse_service_key(&service_key("web")), Some("web"));
        assert_eq!(parse_slot_key(&slot_key("web", 12)), Some(("web", 12)));
        assert_eq!(parse_slot_key("alloc/web/03"), None);
        assert_eq!(parse_slot_key("alloc/web/x"), None);
        assert_eq!(parse_slot_key("alloc//1"), None);
        assert_eq!(
            parse_report_key(&report_key("n1", "web-0-1-abc")),
            Some(("n1", "web-0-1-abc"))
        );
        assert_eq!(parse_report_key("node/n1/info"), None);
        assert_eq!(parse_service_key("service/a/b"), None);
    }

    #[test]
    fn alloc_ids_are_unique_per_attempt_and_deterministic() {
        let a = new_alloc_id("web", 0, 1, "n1", 1000, None);
        assert!(a.starts_with("web-0-1-") && a.len() == "web-0-1-".len() + 12);
        assert_eq!(a, new_alloc_id("web", 0, 1, "n1", 1000, None));
        assert_ne!(a, new_alloc_id("web", 0, 1, "n2", 1000, None));
        assert_ne!(a, new_alloc_id("web", 0, 1, "n1", 1000, Some(&a)));
        assert_ne!(a, new_alloc_id("web", 0, 1, "n1", 1001, None));
    }

    #[test]
    fn deploy_bumps_the_version_only_when_the_workload_changes() {
        let text = "name = \"web\"\ndriver = \"process\"\ncommand = [\"x\"]\nreplicas = 3\n";
        let v1 = ServiceSpec::from_toml("web.toml", text).unwrap();
        let r1 = ServiceRecord::deploy(None, v1.clone());
        assert_eq!((r1.version, r1.replicas), (1, 3));
        // Same spec again: nothing changes.
        assert_eq!(ServiceRecord::deploy(Some(&r1), v1.clone()), r1);
        // `shoal scale` then an unchanged deploy keeps the scaled count.
        let scaled = r1.scaled(5).unwrap();
        assert_eq!(ServiceRecord::deploy(Some(&scaled), v1.clone()).replicas, 5);
        assert!(r1.scaled(MAX_REPLICAS + 1).is_err());
        // Only the spec's replicas changed: new count, no rollout.
        let mut more = v1.clone();
        more.replicas = 7;
        let r = ServiceRecord::deploy(Some(&scaled), more);
        assert_eq!((r.version, r.replicas), (1, 7));
        // What only agents and policies read changes without a rollout.
        let mut tuned = v1.clone();
        tuned.stop_delay = Duration::from_secs(9);
        tuned.discovery.insert("limit".into(), "2".into());
        let r = ServiceRecord::deploy(Some(&r1), tuned.clone());
        assert_eq!(r.version, 1);
        assert_eq!(r.spec_for(1), Some(&tuned));
        // A changed workload is a new version; the old spec is kept.
        let mut v2 = v1.clone();
        v2.env.insert("A".into(), "1".into());
        let r2 = ServiceRecord::deploy(Some(&scaled), v2.clone());
        assert_eq!((r2.version, r2.replicas), (2, 5));
        assert_eq!(r2.spec_for(1), Some(&v1));
        assert_eq!(r2.spec_for(2), Some(&v2));
        let mut r = r2.clone();
        for i in 0..10 {
            let mut v = v2.clone();
            v.env.insert("I".into(), i.to_string());
            r = ServiceRecord::deploy(Some(&r), v);
        }
        assert_eq!(r.previous.len(), KEPT_VERSIONS);
        // Deploying over a removed service revives it with a new version.
        let back = ServiceRecord::deploy(Some(&r2.removed()), v2);
        assert_eq!((back.version, back.deleted), (3, false));
        // JSON round trip.
        let json = encode(&r2);
        assert_eq!(decode::<ServiceRecord>("service/web", &json).unwrap(), r2);
    }

    #[test]
    fn rollback_redeploys_a_kept_spec_and_keeps_the_replica_count() {
        let text = "name = \"web\"\ndriver = \"process\"\ncommand = [\"x\"]\nreplicas = 3\n";
        let v1 = ServiceSpec::from_toml("web.toml", text).unwrap();
        let r1 = ServiceRecord::deploy(None, v1.clone());
        assert_eq!(
            r1.rolled_back(None).unwrap_err().to_string(),
            "service web has no earlier version to roll back to (it runs version 1)"
        );
        let mut v2 = v1.clone();
        v2.env.insert("A".into(), "2".into());
        let r2 = ServiceRecord::deploy(Some(&r1), v2.clone())
            .scaled(6)
            .unwrap();
        // Back to v1: a new version 3 with v1's spec, still 6 replicas, v2 kept.
        let r3 = r2.rolled_back(None).unwrap();
        assert_eq!((r3.version, r3.replicas), (3, 6));
        assert!(r3.spec.same_workload(&v1));
        assert_eq!(r3.spec_for(2), Some(&v2));
        // Undo the undo: the default goes to the version before, v2.
        let r4 = r3.rolled_back(None).unwrap();
        assert!(r4.spec.same_workload(&v2));
        assert_eq!(r4.version, 4);
        // --to a kept version; --to the current or a forgotten one is refused by name.
        assert!(r4.rolled_back(Some(1)).unwrap().spec.same_workload(&v1));
        assert_eq!(
            r4.rolled_back(Some(4)).unwrap_err().to_string(),
            "service web already runs the spec of version 4 (as version 4)"
        );
        assert_eq!(
            r4.rolled_back(Some(2)).unwrap_err().to_string(),
            "service web already runs the spec of version 2 (as version 4)"
        );
        assert_eq!(
            r4.rolled_back(Some(9)).unwrap_err().to_string(),
            "service web keeps no version 9: it runs version 4, and keeps 4, 3, 2 and 1"
        );
    }

    #[test]
    fn bad_values_are_reported_not_fatal() {
        let good = encode(&Slot::default());
        let entries: Vec<(&str, &[u8])> = vec![
            ("alloc/web/0", &good),
            ("alloc/web/1", b"{not json"),
            ("service/web", b"{}"),
            ("kv/other", b"whatever"),
        ];
        let (view, errors) = ClusterView::from_entries(entries);
        assert_eq!(view.slots["web"].len(), 1);
        assert_eq!(errors.len(), 2);
    }
}
