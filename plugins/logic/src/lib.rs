//! shoal's built-in policies as plain Rust: the scheduler (Docker-Swarm-style filters
//! with `spread`, `binpack` and `random` strategies), the scalers (`target-utilization`,
//! `schedule`) and `zone-aware` discovery, plus the data types they work on.
//!
//! This crate does no I/O and knows nothing of WebAssembly. It is compiled twice: into
//! the built-in guest components in `plugins/` (through `shoal-policy-sdk`), and natively
//! into the host (`shoal-policy`), where it is the last-resort fallback when even the
//! built-in component fails, and the native side of the benchmark. Because both sides
//! run the same code, a fallback decision equals the built-in component's.
//!
//! All entry points are deterministic (the `random` strategy is seeded) and total: bad
//! parameters are an `Err`, never a panic.

#![warn(missing_docs)]

mod discover;
mod model;
mod scale;
mod schedule;

pub use discover::{zone_aware, DEFAULT_WEIGHT};
pub use model::{
    check_ranked, describe_filter, describe_unplaced, Affinity, AffinityTarget, Caller, Constraint,
    ConstraintOp, DiscoveryInput, Endpoint, Filter, Node, NodeFacts, NodeStatus, Params, Placement,
    PlacementRequest, Ranked, Rejection, ReplicaMetrics, Resources, ScaleDecision, ScaleInput,
    Snapshot, SnapshotColumns,
};
pub use scale::{
    metric_targets, parse_windows, scale, schedule, target_utilization, window_floor, MetricTarget,
    Window, DEFAULT_CPU_TARGET, DEFAULT_TOLERANCE,
};
pub use schedule::{Cluster, NodeView, Strategy, MAX_REPLICAS_PER_REQUEST};

/// Runs the built-in discovery policy named by param `policy` (only `zone-aware`, the
/// default, exists).
pub fn discover(input: &DiscoveryInput) -> Result<Vec<Ranked>, String> {
    match input.params.get("policy").map(|s| s.trim()) {
        None | Some("") | Some("zone-aware") => zone_aware(input),
        Some(other) => Err(format!(
            "unknown discovery policy {other:?} (expected zone-aware)"
        )),
    }
}
