//! The policy host: shoal's scheduling, scaling and discovery decisions are made by
//! WebAssembly components (worlds `scheduler`, `scaler`, `discovery` of the WIT package
//! `shoal:policy@0.1.0` in `wit/`), which operators replace at runtime. This crate is
//! the only code in shoal that touches wasmtime.
//!
//! A [`PolicyHost`] compiles each component once (cached on disk by blake3 of the wasm
//! and the engine's compatibility hash), pre-instantiates it on a pooling allocator,
//! and runs every call in a fresh sandbox: WASI with an empty context, a memory cap and
//! an epoch deadline. Plugins are bound per (kind, scope) — the cluster default or one
//! service — and swapped atomically: a call in flight finishes on the version it
//! started with. A trap, timeout, memory overrun or malformed answer fails that call
//! only: the host answers with the built-in component (embedded, built from
//! `plugins/builtin`), or if that fails too with the same logic compiled natively
//! (`shoal-policy-logic`), counts the failure, and quarantines the plugin after
//! [`HostConfig::quarantine_after`] failures in a row. Host errors (a refused install)
//! are [`PolicyError`]s; guest misbehaviour is never an error to the caller, only a
//! fallback, visible in [`PluginStatus`], [`HostStats`] and the outcomes.
//!
//! Scheduling is shaped for speed: a round hands the snapshot to the policy once, then
//! each request is a cheap call answered with node indices ([`PolicyHost::schedule`],
//! [`PolicyHost::begin_round`]).
//!
//! Not here: fetching plugin blobs, storing bindings in cluster state, or the CLI — the
//! agent does those and calls [`PolicyHost::install`].

#![warn(missing_docs)]

mod bindings;
mod builtin;
mod convert;
mod error;
mod host;
mod round;
mod runtime;
mod types;

pub use error::PolicyError;
pub use host::PolicyHost;
pub use round::ScheduleRound;
pub use shoal_policy_logic as logic;
pub use shoal_policy_logic::{
    Affinity, AffinityTarget, Caller, Constraint, ConstraintOp, DiscoveryInput, Endpoint, Filter,
    Node, NodeStatus, Placement, PlacementRequest, Rejection, ReplicaMetrics, Resources,
    ScaleDecision, ScaleInput, Snapshot,
};
pub use types::{
    DecidedBy, Discovered, HostConfig, HostStats, KvReader, PlacementOutcome, PluginState,
    PluginStatus, PolicyKind, Scaled, Unplaced, WeightedEndpoint,
};

/// The built-in components' wasm, for tools that want to inspect or re-install them.
pub mod builtins {
    pub use crate::builtin::{DISCOVERY, SCALER, SCHEDULER};
}
