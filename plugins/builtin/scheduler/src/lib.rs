//! shoal's built-in scheduler as a component: Swarm-style filters, strategy from param
//! `strategy` (`spread` by default, `binpack`, `random` seeded by `seed`).

use shoal_policy_sdk::scheduler::{Cluster, Placement, PlacementRequest, Scheduler};

struct Builtin;

impl Scheduler for Builtin {
    fn place(cluster: &mut Cluster, request: &PlacementRequest) -> Result<Placement, String> {
        cluster.place(request)
    }
}

shoal_policy_sdk::export_scheduler!(Builtin);
