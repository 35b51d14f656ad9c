//! Orchestration without a master, as sans-IO logic (ARCHITECTURE §4).
//!
//! This crate decides what should run where, and nothing else. It holds:
//! - [`ServiceSpec`]: the service spec operators write in TOML, parsed with unknown
//!   keys refused and checked field by field ([`SpecError`] names the field), plus the
//!   conversions to what the runtime drivers run ([`ServiceSpec::to_workload`]) and
//!   what the scheduler places ([`ServiceSpec::to_request`]);
//! - the replicated data model ([`ServiceRecord`], [`Slot`], [`AllocReport`] and their
//!   keys), kept as JSON in the core's last-writer-wins map;
//! - the steward ([`steward_for`], a rendezvous hash over alive nodes) and
//!   [`reconcile`], a pure function from a service's record, slots, reports,
//!   membership, time and a cluster [`Snapshot`](shoal_policy_logic::Snapshot) to the
//!   slot writes that bring the service closer to its record: placement, scaling,
//!   rescheduling off lost nodes, dependency ordering and rolling updates;
//! - the autoscaler ([`autoscale`]): the rate limit, stabilization window and
//!   history around a scaler's recommendation, kept in `scale/<service>`;
//! - what each agent derives from the slots: [`allocs_for_node`] to run and
//!   [`orphans`] to stop.
//!
//! It does not open sockets, read clocks, spawn tasks or touch disks: the agent
//! feeds it the replicated state, the membership view and the time, passes a
//! scheduler (the policy host, or [`native_scheduler`]) and applies the returned
//! [`Write`]s. It does not run, health-check or restart workloads either; the agent
//! does that with `shoal-runtime` drivers and reports back in [`AllocReport`]s.

#![warn(missing_docs)]

pub mod autoscale;
mod model;
mod pass;
mod snapshot;
mod spec;
mod steward;
mod units;

#[cfg(test)]
mod scenarios;
#[cfg(test)]
mod sim;

pub use autoscale::{
    native_scaler, parse_scale_key, scale_key, Autoscaling, Recommendation, ScaleEvent, ScaleState,
    SCALE_PREFIX,
};
pub use model::{
    decode, drain_key, encode, is_orchestration_key, new_alloc_id, parse_drain_key,
    parse_report_key, parse_rollout_key, parse_service_key, parse_slot_key, published_rollouts,
    report_key, report_prefix, rollout_key, rollout_prefix, service_key, slot_key, slot_prefix,
    tombstoned_services, AllocReport, AllocState, ClusterSlots, ClusterView, Drain, Member,
    Members, ModelError, PastSpec, Placement, Reported, Reports, Reservation, ServiceRecord, Slot,
    SlotMap, DRAIN_PREFIX, KEPT_VERSIONS, SERVICE_PREFIX, SLOT_PREFIX, START_FAILURES_STALL,
};
pub use pass::{
    assigned, Assigned, NodeOrch, OrchEvent, PassInput, PassOutput, PublishedRollout, Settle,
};
pub use snapshot::{build_snapshot, native_scheduler, over_capacity, NodeFacts, Placed};
pub use spec::{
    HealthCheck, HealthFile, PortFile, Probe, ResourcesFile, RestartMode, RestartPolicy, Scalar,
    ScalerValue, ServiceSpec, SpecError, SpecFile, UpdateFile, UpdatePolicy, WindowFile,
    DOCKER_LABEL, MAX_REPLICAS,
};
pub use steward::{
    allocs_for_node, healthy_replicas, is_healthy, orphans, reconcile, rendezvous_score,
    steward_for, Assignment, Note, ReconcileInput, Reconciled, RolloutStatus, Write,
};
pub use units::{parse_duration_ms, parse_size};
