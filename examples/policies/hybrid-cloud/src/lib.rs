//! Example scheduler for a hybrid fleet: replicas go to on-prem nodes
//! (`provider=onprem`) while any fits, and burst to the cloud only when on-prem is full,
//! cheapest cloud node first (numeric label `cost`, e.g. dollars per hour; nodes
//! without it come last). Within a tier, replicas spread over the nodes. Health,
//! constraints, affinity, ports and resources are checked by the SDK's filters.

use shoal_policy_sdk::scheduler::{Cluster, NodeView, Placement, PlacementRequest, Scheduler};

struct HybridCloud;

/// Smaller is better: (cloud?, cost if cloud, this service's replicas, all replicas).
fn rank(node: &NodeView<'_>) -> (bool, u64, u32, u32) {
    let onprem = node.label("provider") == Some("onprem");
    let cost = match node
        .label("cost")
        .and_then(|c| c.trim().parse::<f64>().ok())
    {
        Some(c) if c >= 0.0 && !onprem => (c * 1000.0) as u64,
        Some(_) if onprem => 0,
        _ => u64::MAX,
    };
    (
        !onprem,
        cost,
        node.service_allocations(),
        node.allocations(),
    )
}

impl Scheduler for HybridCloud {
    fn place(cluster: &mut Cluster, request: &PlacementRequest) -> Result<Placement, String> {
        Ok(cluster.place_by(request, rank))
    }
}

shoal_policy_sdk::export_scheduler!(HybridCloud);
