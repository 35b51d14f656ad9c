//! `{{name}}`: a shoal scheduler policy, built as a WebAssembly component.
//!
//! It puts each replica on the feasible node with the most free memory. The SDK
//! applies the usual filters first (alive, constraints, affinity, ports, resources)
//! and records every placement, so the policy only ranks nodes. Change the key below
//! to write your own: `place_by` takes the feasible node with the smallest key.

use std::cmp::Reverse;

use shoal_policy_sdk::scheduler::{Cluster, Placement, PlacementRequest, Scheduler};

/// Most free memory first.
struct Policy;

impl Scheduler for Policy {
    fn place(cluster: &mut Cluster, request: &PlacementRequest) -> Result<Placement, String> {
        Ok(cluster.place_by(request, |node| Reverse(node.free().memory_bytes)))
    }
}

shoal_policy_sdk::export_scheduler!(Policy);
