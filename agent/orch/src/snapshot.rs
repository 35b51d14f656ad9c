//! The scheduler's view of the cluster: node capacities minus what every slot
//! reserves, and the adapter that runs the built-in scheduler natively.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use shoal_policy_logic::{
    describe_unplaced, Cluster, Node, NodeStatus, PlacementRequest, Resources, Snapshot,
};

use crate::model::{ClusterSlots, Placement};

/// What the agent knows about one node, from its node-owned state and membership.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeFacts {
    /// Node name.
    pub name: String,
    /// Membership status.
    pub status: NodeStatus,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Resources the node offers to workloads.
    pub capacity: Resources,
    /// Images the node holds.
    pub images: Vec<String>,
    /// Host ports bound by something other than shoal's allocations.
    pub ports_in_use: Vec<u16>,
}

/// One scheduler answer, by node name: what [`crate::reconcile`]'s scheduler
/// callback returns per request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placed {
    /// Node name per placed replica.
    pub nodes: Vec<String>,
    /// Why the remaining replicas fit nowhere (`0/5 nodes fit: ...`).
    pub unplaced: Option<String>,
}

/// Builds the snapshot a steward schedules on: every node with `free` = capacity
/// minus the reservations of every slot placement (current and next) naming it, and
/// the host ports, per-service allocation counts and images those placements add.
///
/// Nodes are sorted by name, so every agent hands the scheduler the same snapshot
/// and ties (which go to the lowest index) are broken the same way everywhere.
/// Placements naming unknown nodes are ignored.
pub fn build_snapshot(nodes: &[NodeFacts], slots: &ClusterSlots) -> Snapshot {
    let mut sorted: Vec<&NodeFacts> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    sorted.dedup_by(|a, b| a.name == b.name);
    let mut snapshot = Snapshot {
        nodes: sorted
            .into_iter()
            .map(|f| Node {
                name: f.name.clone(),
                labels: f.labels.clone(),
                status: f.status,
                capacity: f.capacity,
                free: f.capacity,
                ports_in_use: f.ports_in_use.clone(),
                images: f.images.clone(),
                allocations: BTreeMap::new(),
            })
            .collect(),
    };
    let index: BTreeMap<String, usize> = snapshot
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), i))
        .collect();
    for (service, slots) in slots {
        for slot in slots.values() {
            for p in slot.placements() {
                if let Some(&i) = index.get(&p.node) {
                    reserve(&mut snapshot.nodes[i], service, p);
                }
            }
        }
    }
    snapshot
}

/// Allocations that must move because their node holds more than its capacity,
/// by id. That happens when placements made on different sides of a partition meet
/// after the heal (each side placed within what it saw). On each alive node every
/// placement (current and next, every service) is taken oldest first (`placed_ms`,
/// then id); those that no longer fit in the node's CPU or memory are listed. Every
/// steward computes the same set from the same state, so exactly the excess moves.
/// Nodes with no published capacity are skipped.
pub fn over_capacity(snapshot: &Snapshot, slots: &ClusterSlots) -> BTreeSet<String> {
    let mut on_node: BTreeMap<&str, Vec<&Placement>> = BTreeMap::new();
    for slots in slots.values() {
        for slot in slots.values() {
            for p in slot.placements() {
                on_node.entry(p.node.as_str()).or_default().push(p);
            }
        }
    }
    let mut out = BTreeSet::new();
    for node in &snapshot.nodes {
        let cap = node.capacity;
        if node.status != NodeStatus::Alive || cap.cpu_millis == 0 || cap.memory_bytes == 0 {
            continue;
        }
        let Some(list) = on_node.get_mut(node.name.as_str()) else {
            continue;
        };
        list.sort_by(|a, b| (a.placed_ms, &a.alloc_id).cmp(&(b.placed_ms, &b.alloc_id)));
        let (mut cpu, mut mem) = (0u64, 0u64);
        for p in list.iter() {
            let r = &p.reserved.resources;
            if cpu + r.cpu_millis > cap.cpu_millis || mem + r.memory_bytes > cap.memory_bytes {
                out.insert(p.alloc_id.clone());
            } else {
                cpu += r.cpu_millis;
                mem += r.memory_bytes;
            }
        }
    }
    out
}

/// The node called `name`. A linear scan, so snapshots not built by
/// [`build_snapshot`] (in any order) work too; it runs a few times per reconcile.
fn node_mut<'a>(snapshot: &'a mut Snapshot, name: &str) -> Option<&'a mut Node> {
    snapshot.nodes.iter_mut().find(|n| n.name == name)
}

/// Adds a placement's reservation to `node`.
fn reserve(node: &mut Node, service: &str, p: &Placement) {
    let r = &p.reserved.resources;
    node.free.cpu_millis = node.free.cpu_millis.saturating_sub(r.cpu_millis);
    node.free.memory_bytes = node.free.memory_bytes.saturating_sub(r.memory_bytes);
    node.free.disk_bytes = node.free.disk_bytes.saturating_sub(r.disk_bytes);
    node.ports_in_use.extend(&p.reserved.host_ports);
    *node.allocations.entry(service.to_string()).or_insert(0) += 1;
    if let Some(image) = &p.reserved.image {
        if !node.images.contains(image) {
            node.images.push(image.clone());
        }
    }
}

/// Takes a placement's reservation back from its node in `snapshot` (the placement
/// is being replaced). Free resources never rise above capacity.
pub(crate) fn release(snapshot: &mut Snapshot, service: &str, p: &Placement) {
    let Some(node) = node_mut(snapshot, &p.node) else {
        return;
    };
    let (r, cap) = (&p.reserved.resources, node.capacity);
    node.free.cpu_millis = node
        .free
        .cpu_millis
        .saturating_add(r.cpu_millis)
        .min(cap.cpu_millis);
    node.free.memory_bytes = node
        .free
        .memory_bytes
        .saturating_add(r.memory_bytes)
        .min(cap.memory_bytes);
    node.free.disk_bytes = node
        .free
        .disk_bytes
        .saturating_add(r.disk_bytes)
        .min(cap.disk_bytes);
    for port in &p.reserved.host_ports {
        if let Some(i) = node.ports_in_use.iter().position(|x| x == port) {
            node.ports_in_use.swap_remove(i);
        }
    }
    if let Some(count) = node.allocations.get_mut(service) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            node.allocations.remove(service);
        }
    }
}

/// Answers placement requests with the built-in scheduler compiled natively
/// (`shoal_policy_logic`), strategy per the request's `strategy` param. Requests
/// see the placements of earlier ones. For tests, and for an agent without a policy
/// host.
pub fn native_scheduler(snapshot: &Snapshot, requests: &[PlacementRequest]) -> Vec<Placed> {
    let mut cluster = Cluster::new(snapshot.clone());
    requests
        .iter()
        .map(|req| match cluster.place(req) {
            Ok(p) => Placed {
                nodes: p
                    .nodes
                    .iter()
                    .filter_map(|&i| snapshot.nodes.get(i as usize).map(|n| n.name.clone()))
                    .collect(),
                unplaced: p
                    .unplaced
                    .map(|rej| describe_unplaced(snapshot.nodes.len(), &rej, req)),
            },
            Err(e) => Placed {
                nodes: Vec::new(),
                unplaced: Some(e),
            },
        })
        .collect()
}
