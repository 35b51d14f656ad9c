//! Data types shared by the policies, the guest SDK and the host. They mirror the
//! records of the `shoal:policy` WIT package (see `wit/`), with maps where the WIT has
//! lists of pairs, and a node's index being its position in [`Snapshot::nodes`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Free-form policy parameters from the service spec.
pub type Params = BTreeMap<String, String>;

/// An amount of compute resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct Resources {
    /// CPU in millicores (1000 = one core).
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Disk in bytes.
    pub disk_bytes: u64,
}

/// Membership state of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum NodeStatus {
    /// Answering probes: the only state in which a node takes new work.
    #[default]
    Alive,
    /// Missed probes; may be gone.
    Suspect,
    /// Declared dead.
    Down,
    /// Left the cluster gracefully.
    Left,
}

/// One node of a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct Node {
    /// Unique node name.
    pub name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Membership state.
    pub status: NodeStatus,
    /// Total resources.
    pub capacity: Resources,
    /// Resources not yet allocated.
    pub free: Resources,
    /// Host ports already bound.
    pub ports_in_use: Vec<u16>,
    /// Images the node already holds.
    pub images: Vec<String>,
    /// Allocations on the node per service name.
    pub allocations: BTreeMap<String, u32>,
}

/// The cluster as seen at the start of a scheduling round.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct Snapshot {
    /// All known nodes; answers name a node by its position here.
    pub nodes: Vec<Node>,
}

/// A node's fixed-size facts in [`SnapshotColumns`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeFacts {
    /// Index of the node's name in [`SnapshotColumns::strings`].
    pub name: u32,
    /// Membership state.
    pub status: NodeStatus,
    /// Total resources.
    pub capacity: Resources,
    /// Resources not yet allocated.
    pub free: Resources,
}

/// A [`Snapshot`] in columns, the shape the WIT `snapshot` record has: every distinct
/// string once, one fixed-size record per node, and flat lists of per-node facts that
/// name nodes by index and strings by their index in `strings`. Cheap to hand to a
/// WebAssembly guest (numbers, few strings) and to build a [`crate::Cluster`] from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SnapshotColumns {
    /// Node names, label keys and values, images and service names, each once.
    pub strings: Vec<String>,
    /// One entry per node, in snapshot order.
    pub nodes: Vec<NodeFacts>,
    /// (node, key, value) label entries.
    pub labels: Vec<(u32, u32, u32)>,
    /// (node, port) host ports in use.
    pub ports: Vec<(u32, u16)>,
    /// (node, image) images held.
    pub images: Vec<(u32, u32)>,
    /// (node, service, count) allocations.
    pub allocations: Vec<(u32, u32, u32)>,
}

impl Snapshot {
    /// The snapshot in columns (strings interned).
    pub fn to_columns(&self) -> SnapshotColumns {
        fn intern<'a>(
            ids: &mut HashMap<&'a str, u32>,
            strings: &mut Vec<String>,
            s: &'a str,
        ) -> u32 {
            *ids.entry(s).or_insert_with(|| {
                strings.push(s.to_string());
                strings.len() as u32 - 1
            })
        }
        let mut ids: HashMap<&str, u32> = HashMap::new();
        let mut strings: Vec<String> = Vec::new();
        let mut intern = |s| intern(&mut ids, &mut strings, s);
        let mut c = SnapshotColumns::default();
        for (j, n) in self.nodes.iter().enumerate() {
            let j = j as u32;
            let name = intern(&n.name);
            c.nodes.push(NodeFacts {
                name,
                status: n.status,
                capacity: n.capacity,
                free: n.free,
            });
            for (k, v) in &n.labels {
                let (k, v) = (intern(k), intern(v));
                c.labels.push((j, k, v));
            }
            c.ports.extend(n.ports_in_use.iter().map(|&p| (j, p)));
            for image in &n.images {
                let image = intern(image);
                c.images.push((j, image));
            }
            for (service, &count) in &n.allocations {
                let service = intern(service);
                c.allocations.push((j, service, count));
            }
        }
        c.strings = strings;
        c
    }
}

/// Comparison a [`Constraint`] makes against a node label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum ConstraintOp {
    /// `key == value`; a node without the label fails.
    #[cfg_attr(feature = "serde", serde(rename = "=="))]
    Equals,
    /// `key != value`; a node without the label passes.
    #[cfg_attr(feature = "serde", serde(rename = "!="))]
    NotEquals,
    /// The label's value is one of the values; a node without the label fails.
    #[cfg_attr(feature = "serde", serde(rename = "in"))]
    In,
    /// The node has the label.
    #[cfg_attr(feature = "serde", serde(rename = "exists"))]
    Exists,
}

#[cfg(feature = "serde")]
fn yes() -> bool {
    true
}

/// A condition on node labels, hard (never broken) or soft (preferred).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Constraint {
    /// Label key.
    pub key: String,
    /// Comparison.
    pub op: ConstraintOp,
    /// Operands: one for `==`/`!=`, any number for `in`, none for `exists`.
    #[cfg_attr(feature = "serde", serde(default))]
    pub values: Vec<String>,
    /// Hard constraints filter nodes out; soft ones only rank them.
    #[cfg_attr(feature = "serde", serde(default = "yes"))]
    pub hard: bool,
}

impl Constraint {
    /// Parses `zone == a`, `zone != c`, `zone in (a, b)`, `gpu exists`; a leading `~`
    /// makes the constraint soft (`~zone == a`).
    pub fn parse(text: &str) -> Result<Constraint, String> {
        let text = text.trim();
        let (hard, body) = match text.strip_prefix('~') {
            Some(rest) => (false, rest.trim()),
            None => (true, text),
        };
        let bad = || {
            format!("bad constraint {text:?}: expected `key == v`, `key != v`, `key in (a, b)` or `key exists`")
        };
        let (key, op, values) = if let Some((k, v)) = body.split_once("==") {
            (k, ConstraintOp::Equals, vec![v.trim().to_string()])
        } else if let Some((k, v)) = body.split_once("!=") {
            (k, ConstraintOp::NotEquals, vec![v.trim().to_string()])
        } else if let Some(k) = body.strip_suffix("exists") {
            (k, ConstraintOp::Exists, Vec::new())
        } else if let Some((k, v)) = body.split_once(" in ") {
            let v = v.trim();
            let v = v
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .unwrap_or(v);
            let values: Vec<String> = v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            (k, ConstraintOp::In, values)
        } else {
            return Err(bad());
        };
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(bad());
        }
        if values.iter().any(|v| v.is_empty()) {
            return Err(bad());
        }
        Ok(Constraint {
            key: key.to_string(),
            op,
            values,
            hard,
        })
    }
}

impl fmt::Display for Constraint {
    /// Renders the way [`Constraint::parse`] reads it (without the `~`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first = self.values.first().map(String::as_str).unwrap_or("");
        match self.op {
            ConstraintOp::Equals => write!(f, "{} == {}", self.key, first),
            ConstraintOp::NotEquals => write!(f, "{} != {}", self.key, first),
            ConstraintOp::In => write!(f, "{} in ({})", self.key, self.values.join(", ")),
            ConstraintOp::Exists => write!(f, "{} exists", self.key),
        }
    }
}

/// What an [`Affinity`] rule points at.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum AffinityTarget {
    /// Nodes running at least one allocation of this service.
    Service(String),
    /// Nodes carrying this label with this value.
    Label {
        /// Label key.
        key: String,
        /// Label value.
        value: String,
    },
}

/// Affinity (be with) or anti-affinity (stay away from) a service or a label. Hard
/// affinity to a service is the co-location (dependency) rule.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Affinity {
    /// What to be with, or away from.
    pub target: AffinityTarget,
    /// True for anti-affinity.
    #[cfg_attr(feature = "serde", serde(default))]
    pub anti: bool,
    /// Hard rules filter nodes out; soft ones only rank them.
    #[cfg_attr(feature = "serde", serde(default = "yes"))]
    pub hard: bool,
}

impl fmt::Display for Affinity {
    /// `affinity service db`, `anti-affinity label disk=hdd`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.anti {
            "anti-affinity"
        } else {
            "affinity"
        };
        match &self.target {
            AffinityTarget::Service(s) => write!(f, "{kind} service {s}"),
            AffinityTarget::Label { key, value } => write!(f, "{kind} label {key}={value}"),
        }
    }
}

/// Where to put the replicas of one service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct PlacementRequest {
    /// Service name.
    pub service: String,
    /// Number of replicas to place now.
    pub replicas: u32,
    /// Resources of one replica.
    pub resources: Resources,
    /// Label constraints.
    pub constraints: Vec<Constraint>,
    /// Affinity and anti-affinity rules.
    pub affinities: Vec<Affinity>,
    /// Spread replicas evenly across the values of this node label.
    pub spread_key: Option<String>,
    /// Host ports each replica binds.
    pub ports: Vec<u16>,
    /// Image the replica runs.
    pub image: Option<String>,
    /// Policy parameters (built-ins read `strategy` and `seed`).
    pub params: Params,
}

/// The filter that rejected a node.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum Filter {
    /// The node is not alive.
    Health,
    /// Not enough free CPU.
    Cpu,
    /// Not enough free memory.
    Memory,
    /// Not enough free disk.
    Disk,
    /// The host port is already in use.
    Port(u16),
    /// The hard constraint at this index of the request fails.
    Constraint(u32),
    /// The hard affinity rule at this index of the request fails.
    Affinity(u32),
    /// A policy-specific reason.
    Other(String),
}

/// How many nodes one filter rejected (each node is counted once, under the first
/// filter that rejected it).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Rejection {
    /// The filter.
    pub filter: Filter,
    /// Number of nodes it rejected.
    pub nodes: u32,
}

/// A scheduler's answer to one [`PlacementRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct Placement {
    /// Node index per placed replica.
    pub nodes: Vec<u32>,
    /// Why the remaining replicas fit nowhere (`None` when all were placed).
    pub unplaced: Option<Vec<Rejection>>,
}

impl Placement {
    /// Checks the shape the WIT contract demands: exactly `replicas` nodes and no
    /// reason, or fewer nodes and a reason; every index below `node_count`.
    pub fn check(&self, replicas: u32, node_count: usize) -> Result<(), String> {
        let placed = self.nodes.len();
        let wanted = replicas as usize;
        if placed > wanted {
            return Err(format!("{placed} placements for {wanted} replicas"));
        }
        if let Some(bad) = self.nodes.iter().find(|&&i| i as usize >= node_count) {
            return Err(format!(
                "unknown node index {bad} (snapshot has {node_count} nodes)"
            ));
        }
        match (&self.unplaced, placed == wanted) {
            (None, false) => Err(format!(
                "{placed} placements for {wanted} replicas and no reason"
            )),
            (Some(_), true) => {
                Err("all replicas placed, yet a reason for unplaced ones".to_string())
            }
            _ => Ok(()),
        }
    }
}

/// Renders why a replica could not be placed, e.g.
/// `0/5 nodes fit: 3 insufficient memory, 2 constraint zone != c`.
///
/// Reasons are listed by count (largest first), then in pipeline order (health,
/// constraints, affinity, ports, cpu, memory, disk). A filter that
/// refers to a rule the request does not have is rendered by its index.
pub fn describe_unplaced(
    total_nodes: usize,
    rejections: &[Rejection],
    request: &PlacementRequest,
) -> String {
    let rejected: u64 = rejections.iter().map(|r| u64::from(r.nodes)).sum();
    let fit = (total_nodes as u64).saturating_sub(rejected);
    let mut sorted: Vec<&Rejection> = rejections.iter().filter(|r| r.nodes > 0).collect();
    sorted.sort_by(|a, b| {
        b.nodes
            .cmp(&a.nodes)
            .then_with(|| pipeline_rank(&a.filter).cmp(&pipeline_rank(&b.filter)))
    });
    let mut out = format!("{fit}/{total_nodes} nodes fit");
    for (i, r) in sorted.iter().enumerate() {
        out.push_str(if i == 0 { ": " } else { ", " });
        out.push_str(&format!(
            "{} {}",
            r.nodes,
            describe_filter(&r.filter, request)
        ));
    }
    out
}

/// Where a filter sits in the scheduler's pipeline (health, constraints, affinity,
/// ports, cpu, memory, disk, other), for listing ties in that order.
fn pipeline_rank(filter: &Filter) -> (u8, u32) {
    match filter {
        Filter::Health => (0, 0),
        Filter::Constraint(i) => (1, *i),
        Filter::Affinity(i) => (2, *i),
        Filter::Port(p) => (3, u32::from(*p)),
        Filter::Cpu => (4, 0),
        Filter::Memory => (5, 0),
        Filter::Disk => (6, 0),
        Filter::Other(_) => (7, 0),
    }
}

/// Renders one filter: `insufficient memory`, `port 80 in use`, `constraint zone != c`.
pub fn describe_filter(filter: &Filter, request: &PlacementRequest) -> String {
    match filter {
        Filter::Health => "not alive".to_string(),
        Filter::Cpu => "insufficient cpu".to_string(),
        Filter::Memory => "insufficient memory".to_string(),
        Filter::Disk => "insufficient disk".to_string(),
        Filter::Port(p) => format!("port {p} in use"),
        Filter::Constraint(i) => match request.constraints.get(*i as usize) {
            Some(c) => format!("constraint {c}"),
            None => format!("constraint #{i}"),
        },
        Filter::Affinity(i) => match request.affinities.get(*i as usize) {
            Some(a) => a.to_string(),
            None => format!("affinity rule #{i}"),
        },
        Filter::Other(text) => text.chars().take(200).collect(),
    }
}

/// Metrics of one running replica.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct ReplicaMetrics {
    /// CPU use in percent of the replica's CPU request; NaN inside its startup period.
    pub cpu_percent: f64,
    /// Resident memory in bytes.
    pub memory_bytes: u64,
    /// Application metrics by name.
    pub custom: BTreeMap<String, f64>,
}

/// What a scaler decides from.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct ScaleInput {
    /// Service name.
    pub service: String,
    /// The replica count in effect (the last decision).
    pub current: u32,
    /// Lower bound.
    pub min: u32,
    /// Upper bound (a value below `min` is read as `min`).
    pub max: u32,
    /// Metrics per running replica.
    pub replicas: Vec<ReplicaMetrics>,
    /// Wall-clock time, milliseconds since the Unix epoch (UTC).
    pub now_ms: u64,
    /// Policy parameters.
    pub params: Params,
}

impl ScaleInput {
    /// `(min, max)` with `max` raised to `min` if the spec had them crossed.
    pub fn bounds(&self) -> (u32, u32) {
        (self.min, self.max.max(self.min))
    }
}

/// A scaler's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct ScaleDecision {
    /// Desired replica count, within the input's bounds.
    pub replicas: u32,
    /// Why, for operators.
    pub reason: String,
}

impl ScaleDecision {
    /// Checks the answer lies within the input's bounds.
    pub fn check(&self, input: &ScaleInput) -> Result<(), String> {
        let (min, max) = input.bounds();
        if self.replicas < min || self.replicas > max {
            return Err(format!(
                "{} replicas is outside {min}..={max}",
                self.replicas
            ));
        }
        Ok(())
    }
}

/// Who asks a discovery policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct Caller {
    /// Name of the caller's node.
    pub node: String,
    /// That node's labels.
    pub labels: BTreeMap<String, String>,
}

/// One instance of a service.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct Endpoint {
    /// IP address or host name.
    pub address: String,
    /// Port.
    pub port: u16,
    /// Node running it.
    pub node: String,
    /// Zone of that node (empty if unknown).
    pub zone: String,
    /// Region of that node (empty if unknown).
    pub region: String,
    /// Result of the last health check.
    pub healthy: bool,
    /// Current load, 0.0 = idle, 1.0 = at target.
    pub load: f64,
    /// Configured relative weight (0 = default of 100).
    pub weight: u32,
}

/// What a discovery policy decides from.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct DiscoveryInput {
    /// Service being looked up.
    pub service: String,
    /// Who is asking.
    pub caller: Caller,
    /// All known endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Policy parameters.
    pub params: Params,
}

/// One endpoint to use: an index into [`DiscoveryInput::endpoints`] and a weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Ranked {
    /// Index into the input's endpoints.
    pub index: u32,
    /// Relative weight, at least 1.
    pub weight: u32,
}

/// Checks a discovery answer: indices in range, none repeated, weights at least 1.
pub fn check_ranked(ranked: &[Ranked], endpoint_count: usize) -> Result<(), String> {
    let mut seen = vec![false; endpoint_count];
    for r in ranked {
        let Some(slot) = seen.get_mut(r.index as usize) else {
            return Err(format!(
                "unknown endpoint index {} ({endpoint_count} endpoints)",
                r.index
            ));
        };
        if std::mem::replace(slot, true) {
            return Err(format!("endpoint index {} listed twice", r.index));
        }
        if r.weight == 0 {
            return Err(format!("endpoint index {} has weight 0", r.index));
        }
    }
    Ok(())
}
