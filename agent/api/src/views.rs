//! The answers of the HTTP API, as the agent writes them and the CLI reads them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a node has, as published under `node/<name>/resources`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Logical CPUs usable by this process.
    pub cpus: u32,
    /// Total memory.
    pub memory_bytes: u64,
    /// Memory available for new work.
    pub memory_free_bytes: u64,
    /// Free space on the disk holding the data directory.
    pub disk_free_bytes: u64,
}

impl Resources {
    /// Whether `other` differs enough from `self` to be worth gossiping (over 1%).
    pub fn differs(&self, other: &Resources) -> bool {
        let far = |a: u64, b: u64| a.abs_diff(b) as f64 > (a.max(b) as f64) * 0.01;
        self.cpus != other.cpus
            || self.memory_bytes != other.memory_bytes
            || far(self.memory_free_bytes, other.memory_free_bytes)
            || far(self.disk_free_bytes, other.disk_free_bytes)
    }
}

/// One member as `shoal nodes` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// Node name (from its certificate).
    pub name: String,
    /// QUIC address.
    pub addr: String,
    /// `alive`, `suspect`, `down` or `left`.
    pub status: String,
    /// Process generation (changes on restart).
    pub gen: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Last published host resources, if any arrived yet.
    pub resources: Option<Resources>,
    /// Something the operator should know about this member, e.g. on the agent's
    /// own row `not joined: <seed>: <reason>` while none of its seeds let it in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Drained (`shoal node drain`): takes no new placements.
    #[serde(default)]
    pub draining: bool,
}

/// A node's drain, as `shoal node drain` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainView {
    /// The node.
    pub node: String,
    /// It is drained.
    pub draining: bool,
    /// When the drain was asked for (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// For a drain or undrain request: whether it changed the mark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
    /// Allocations still on the node, `service/slot state`: placed there, or
    /// replaced and not yet stopped.
    pub left: Vec<String>,
}

/// One key/value entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvView {
    /// The key.
    pub key: String,
    /// The value (UTF-8; invalid bytes are replaced).
    pub value: String,
    /// The node that wrote it.
    pub writer: String,
    /// Its hybrid-logical-clock stamp.
    pub hlc: u64,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorView {
    /// What went wrong.
    pub error: String,
}

impl KvView {
    /// The view of a core entry.
    pub fn of(e: &shoal_core::Entry) -> Self {
        KvView {
            key: e.key.clone(),
            value: String::from_utf8_lossy(e.value.as_deref().unwrap_or_default()).into_owned(),
            writer: e.writer.node.clone(),
            hlc: e.hlc.0,
        }
    }
}

/// One service as `shoal services` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    /// Service name.
    pub name: String,
    /// `docker` or `process`.
    pub driver: String,
    /// Desired replicas.
    pub desired: u32,
    /// Slots that exist.
    pub slots: u32,
    /// Slots with a running allocation.
    pub running: u32,
    /// Slots with a healthy allocation.
    pub healthy: u32,
    /// Slots whose allocation runs the current version and is healthy.
    pub updated: u32,
    /// Current spec version.
    pub version: u64,
    /// Being removed (`shoal rm`).
    pub removing: bool,
    /// The node acting as the service's steward.
    pub steward: Option<String>,
    /// The steward's rollout status for the current version, once it has one.
    pub rollout: Option<shoal_orch::RolloutStatus>,
    /// How it is autoscaled, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleView>,
}

/// An autoscaled service's scaler, as `shoal services` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleView {
    /// The built-in policy (a plugin installed for the service decides first).
    pub policy: String,
    /// Fewest replicas.
    pub min: u32,
    /// Most replicas.
    pub max: u32,
    /// Why the count is what it is (the last change).
    pub reason: Option<String>,
    /// When it last changed (ms since the epoch).
    pub changed_ms: Option<u64>,
    /// The latest evaluation's conclusion.
    pub last: Option<String>,
    /// Changes so far.
    pub decisions: u64,
}

/// One scale decision, for `shoal events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    /// The service, if the event concerns one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// `scale`, `rescheduled`, `moved`, `placement failed`, `rollout stalled`,
    /// `restart`, `plugin quarantined` or `write lost`.
    pub kind: String,
    /// The node that recorded it (for `scale`, the steward).
    pub node: String,
    /// What happened, or why.
    pub reason: String,
    /// `scale`: replicas before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u32>,
    /// `scale`: replicas after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u32>,
    /// `scale`: the scaler that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// `scale`: the steward that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steward: Option<String>,
}

/// One allocation slot as `shoal ps` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotView {
    /// Slot number.
    pub slot: u32,
    /// Node it is placed on (none while pending).
    pub node: Option<String>,
    /// `pending`, `starting`, `running`, `stopping`, `failed` or `exited`.
    pub state: String,
    /// Running and passing its health check.
    pub healthy: bool,
    /// `host:port` of its first port.
    pub endpoint: Option<String>,
    /// Restarts by its agent.
    pub restarts: u32,
    /// Why it is pending or failed.
    pub reason: Option<String>,
    /// Spec version it runs.
    pub version: Option<u64>,
    /// Allocation id.
    pub alloc_id: Option<String>,
    /// Container id or pid.
    pub handle: Option<String>,
    /// A new-version allocation started alongside the current one (rolling update).
    pub next: bool,
    /// CPU use, percent of one core.
    pub cpu_percent: f64,
    /// Resident memory.
    pub memory_bytes: u64,
}

/// One allocation of the whole cluster, as `shoal ps` with no service shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllocView {
    /// The service it belongs to.
    pub service: String,
    /// The slot, as `shoal ps <service>` shows it.
    #[serde(flatten)]
    pub slot: SlotView,
}

/// `shoal ps` answer: the service and its slots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PsView {
    /// The service.
    pub service: ServiceView,
    /// One row per allocation (a slot in a rolling update has two).
    pub slots: Vec<SlotView>,
}

/// One kept version of a service, as `shoal history` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionView {
    /// The version.
    pub version: u64,
    /// It is the version the service runs now.
    pub current: bool,
    /// What a replica runs: the image, or the command line.
    pub runs: String,
    /// Top-level spec fields that differ from the next older kept version.
    pub changed: Vec<String>,
    /// The whole spec.
    pub spec: shoal_orch::ServiceSpec,
}

/// `shoal deploy` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployView {
    /// Service name.
    pub name: String,
    /// Version after the deploy.
    pub version: u64,
    /// Desired replicas after the deploy.
    pub replicas: u32,
    /// False when the spec was already deployed as is.
    pub changed: bool,
    /// Things the operator should know, e.g. `dependency dbb does not exist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Logs of one allocation, from `offset` on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogsView {
    /// Slot number.
    pub slot: u32,
    /// Node running it.
    pub node: String,
    /// Allocation id.
    pub alloc_id: String,
    /// Log text (invalid UTF-8 replaced).
    pub text: String,
    /// Offset to ask from next time (`--follow`, or the next page when `more`).
    pub next_offset: u64,
    /// The answer stopped at its size limit: more follows from `next_offset`.
    #[serde(default)]
    pub more: bool,
    /// Why this slot's logs could not be read (its node is down, or did not
    /// answer); the other slots' logs are still in the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One blob on this agent, as `GET /v1/blobs` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlobView {
    /// The blob id (blake3 of its manifest).
    pub id: String,
    /// `held` (complete, served to peers) or `fetching`.
    pub state: String,
    /// Chunks verified so far (all of them when held).
    pub chunks_done: u32,
    /// Chunks in all, once the manifest is known.
    pub chunks_total: Option<u32>,
    /// Bytes held (its size when held; verified chunk bytes while fetching).
    #[serde(default)]
    pub bytes: u64,
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One pushed image, as `shoal image ls` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageView {
    /// `name:tag`.
    pub reference: String,
    /// Image id (`sha256:…` of its config).
    pub id: String,
    /// Bytes of its layers.
    pub size: u64,
    /// Number of layers.
    pub layers: usize,
    /// Node that pushed it.
    pub pushed_by: String,
    /// When (ms since the epoch).
    pub pushed_ms: u64,
    /// `--to` of the push, if any.
    pub preheat: Option<String>,
    /// Live nodes holding every blob of it (they serve it to others).
    pub holders: Vec<String>,
    /// Live nodes holding some of its blobs (fetching, or collected in part).
    pub partial: Vec<String>,
    /// Live nodes whose Docker Engine has it loaded.
    pub engines: Vec<String>,
    /// Nodes with a replica waiting for it, and their progress.
    pub pulling: Vec<PullView>,
}

/// A pull under way on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullView {
    /// The node.
    pub node: String,
    /// Bytes fetched.
    pub done: u64,
    /// Bytes to fetch.
    pub total: u64,
}

/// The answer to `DELETE /v1/images/<reference>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRemoved {
    /// The reference removed.
    pub removed: String,
    /// What the operator should know (services still using it).
    pub warnings: Vec<String>,
}
