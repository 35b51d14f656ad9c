//! Write a shoal policy — scheduler, scaler or discovery — as a WebAssembly component
//! in about 20 lines of Rust.
//!
//! The SDK wraps `wit-bindgen` (bindings generated from the `shoal:policy@0.1.0` WIT
//! package in `wit/`), converts the WIT records into the plain types of
//! [`shoal-policy-logic`](logic), and gives one trait and one export macro per world:
//! [`scheduler::Scheduler`] + [`export_scheduler!`], [`scaler::Scaler`] +
//! [`export_scaler!`], [`discovery::Discovery`] + [`export_discovery!`]. Enable the
//! cargo feature of exactly the world you export (`scheduler`, `scaler` or
//! `discovery`). For a scheduler the SDK keeps the round's snapshot in instance state as
//! a [`logic::Cluster`] and records every placement in it, so a policy only ranks nodes;
//! the Swarm-style filters (health, constraints, affinity, ports, resources) come for
//! free with [`logic::Cluster::place_by`]. The generated WIT types stay available under
//! `wit` modules for policies that want them.
//!
//! A complete scheduler that prefers the node with the most free memory
//! (`Cargo.toml`: `crate-type = ["cdylib"]`, `shoal-policy-sdk` with
//! `features = ["scheduler"]`; build with `cargo build --release --target wasm32-wasip2`):
//!
//! ```ignore
//! use std::cmp::Reverse;
//!
//! use shoal_policy_sdk::scheduler::{Cluster, Placement, PlacementRequest, Scheduler};
//! use shoal_policy_sdk::{log, Level};
//!
//! /// Puts each replica on the feasible node with the most free memory.
//! struct MostFreeMemory;
//!
//! impl Scheduler for MostFreeMemory {
//!     fn place(cluster: &mut Cluster, request: &PlacementRequest) -> Result<Placement, String> {
//!         let placement = cluster.place_by(request, |node| Reverse(node.free().memory_bytes));
//!         if placement.unplaced.is_some() {
//!             log(Level::Warn, &format!("{}: not every replica fits", request.service));
//!         }
//!         Ok(placement)
//!     }
//! }
//!
//! shoal_policy_sdk::export_scheduler!(MostFreeMemory);
//! ```
//!
//! Install it with `shoal plugin install --kind scheduler target/wasm32-wasip2/release/<name>.wasm`.
//! A policy that panics, loops or grows memory past the agent's cap fails only that
//! call: the agent answers with its built-in policy and, after repeated failures,
//! quarantines the plugin.

#![warn(missing_docs)]

pub use shoal_policy_logic as logic;

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

#[doc(hidden)]
pub mod __host {
    wit_bindgen::generate!({
        inline: "package shoal:sdk; world host-only { import shoal:policy/host@0.1.0; }",
        path: "../../wit",
        world: "shoal:sdk/host-only",
        generate_all,
    });
}

/// Severity of a [`log`] line.
pub use __host::shoal::policy::host::Level;

/// Writes a line to the agent's log, tagged with this plugin's name.
pub fn log(level: Level, message: &str) {
    __host::shoal::policy::host::log(level, message);
}

/// Reads a key of the cluster's key/value store (read-only); `None` if absent or if
/// the agent gives policies no kv access.
pub fn kv_get(key: &str) -> Option<String> {
    __host::shoal::policy::host::kv_get(key)
}

fn pairs<V>(list: Vec<(String, V)>) -> std::collections::BTreeMap<String, V> {
    list.into_iter().collect()
}

#[cfg(feature = "scheduler")]
#[doc(hidden)]
#[allow(clippy::too_many_arguments)] // generated code
pub mod __scheduler {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "shoal:policy/scheduler@0.1.0",
        with: { "shoal:policy/host@0.1.0": crate::__host::shoal::policy::host },
        export_macro_name: "__export_scheduler_world",
        pub_export_macro: true,
    });
}

#[cfg(feature = "scaler")]
#[doc(hidden)]
#[allow(clippy::too_many_arguments)] // generated code
pub mod __scaler {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "shoal:policy/scaler@0.1.0",
        with: { "shoal:policy/host@0.1.0": crate::__host::shoal::policy::host },
        export_macro_name: "__export_scaler_world",
        pub_export_macro: true,
    });
}

#[cfg(feature = "discovery")]
#[doc(hidden)]
#[allow(clippy::too_many_arguments)] // generated code
pub mod __discovery {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "shoal:policy/discovery@0.1.0",
        with: { "shoal:policy/host@0.1.0": crate::__host::shoal::policy::host },
        export_macro_name: "__export_discovery_world",
        pub_export_macro: true,
    });
}

/// The `scheduler` world: place replicas on nodes.
#[cfg(feature = "scheduler")]
pub mod scheduler {
    use std::cell::RefCell;

    pub use shoal_policy_logic::{
        Affinity, AffinityTarget, Cluster, Constraint, ConstraintOp, Filter, NodeFacts, NodeStatus,
        NodeView, Placement, PlacementRequest, Rejection, Resources, SnapshotColumns, Strategy,
    };

    /// The generated WIT types of this world.
    pub mod wit {
        pub use crate::__scheduler::shoal::policy::scheduling::*;
    }

    /// A scheduler policy.
    pub trait Scheduler {
        /// Places `request.replicas` replicas on `cluster` (this round's view of the
        /// cluster, already updated with earlier placements). Placements made through
        /// [`Cluster::place_by`] / [`Cluster::place`] are recorded in the view; a policy
        /// that picks nodes by hand must call [`Cluster::commit`] itself.
        fn place(cluster: &mut Cluster, request: &PlacementRequest) -> Result<Placement, String>;
    }

    thread_local! {
        static CLUSTER: RefCell<Cluster> = RefCell::new(Cluster::default());
    }

    fn resources(r: wit::Resources) -> Resources {
        Resources {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            disk_bytes: r.disk_bytes,
        }
    }

    fn status(s: wit::NodeStatus) -> NodeStatus {
        match s {
            wit::NodeStatus::Alive => NodeStatus::Alive,
            wit::NodeStatus::Suspect => NodeStatus::Suspect,
            wit::NodeStatus::Down => NodeStatus::Down,
            wit::NodeStatus::Left => NodeStatus::Left,
        }
    }

    /// Converts a WIT snapshot (moving its strings).
    pub fn columns_from_wit(s: wit::Snapshot) -> SnapshotColumns {
        SnapshotColumns {
            strings: s.strings,
            nodes: s
                .nodes
                .into_iter()
                .map(|n| NodeFacts {
                    name: n.name,
                    status: status(n.status),
                    capacity: resources(n.capacity),
                    free: resources(n.free),
                })
                .collect(),
            labels: s
                .labels
                .into_iter()
                .map(|l| (l.node, l.key, l.value))
                .collect(),
            ports: s.ports.into_iter().map(|p| (p.node, p.port)).collect(),
            images: s.images.into_iter().map(|i| (i.node, i.image)).collect(),
            allocations: s
                .allocations
                .into_iter()
                .map(|a| (a.node, a.service, a.count))
                .collect(),
        }
    }

    /// Converts a WIT placement request.
    pub fn request_from_wit(r: wit::PlacementRequest) -> PlacementRequest {
        PlacementRequest {
            service: r.service,
            replicas: r.replicas,
            resources: resources(r.resources),
            constraints: r
                .constraints
                .into_iter()
                .map(|c| Constraint {
                    key: c.key,
                    op: match c.op {
                        wit::ConstraintOp::Equals => ConstraintOp::Equals,
                        wit::ConstraintOp::NotEquals => ConstraintOp::NotEquals,
                        wit::ConstraintOp::InSet => ConstraintOp::In,
                        wit::ConstraintOp::Exists => ConstraintOp::Exists,
                    },
                    values: c.values,
                    hard: c.hard,
                })
                .collect(),
            affinities: r
                .affinities
                .into_iter()
                .map(|a| Affinity {
                    target: match a.target {
                        wit::AffinityTarget::Service(s) => AffinityTarget::Service(s),
                        wit::AffinityTarget::Label((key, value)) => {
                            AffinityTarget::Label { key, value }
                        }
                    },
                    anti: a.anti,
                    hard: a.hard,
                })
                .collect(),
            spread_key: r.spread_key,
            ports: r.ports,
            image: r.image,
            params: crate::pairs(r.params),
        }
    }

    /// Converts a placement to its WIT form.
    pub fn placement_to_wit(p: Placement) -> wit::Placement {
        wit::Placement {
            nodes: p.nodes,
            unplaced: p.unplaced.map(|list| {
                list.into_iter()
                    .map(|r| wit::Rejection {
                        filter: match r.filter {
                            Filter::Health => wit::Filter::Health,
                            Filter::Cpu => wit::Filter::Cpu,
                            Filter::Memory => wit::Filter::Memory,
                            Filter::Disk => wit::Filter::Disk,
                            Filter::Port(p) => wit::Filter::Port(p),
                            Filter::Constraint(i) => wit::Filter::Constraint(i),
                            Filter::Affinity(i) => wit::Filter::Affinity(i),
                            Filter::Other(s) => wit::Filter::Other(s),
                        },
                        nodes: r.nodes,
                    })
                    .collect()
            }),
        }
    }

    #[doc(hidden)]
    pub fn __set_snapshot(snapshot: wit::Snapshot) -> Result<(), String> {
        let cluster = Cluster::from_columns(columns_from_wit(snapshot));
        CLUSTER.with(|c| *c.borrow_mut() = cluster);
        Ok(())
    }

    #[doc(hidden)]
    pub fn __place<S: Scheduler>(request: wit::PlacementRequest) -> Result<wit::Placement, String> {
        let request = request_from_wit(request);
        CLUSTER
            .with(|c| S::place(&mut c.borrow_mut(), &request))
            .map(placement_to_wit)
    }

    #[doc(hidden)]
    pub fn __commit(request: wit::PlacementRequest, nodes: Vec<u32>) {
        let request = request_from_wit(request);
        CLUSTER.with(|c| c.borrow_mut().commit(&request, &nodes));
    }
}

/// Exports a [`scheduler::Scheduler`] as this component's `scheduler` world.
#[cfg(feature = "scheduler")]
#[macro_export]
macro_rules! export_scheduler {
    ($policy:ty) => {
        const _: () = {
            struct ShoalSchedulerExport;
            impl $crate::__scheduler::Guest for ShoalSchedulerExport {
                fn set_snapshot(
                    snapshot: $crate::scheduler::wit::Snapshot,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    $crate::scheduler::__set_snapshot(snapshot)
                }
                fn place(
                    request: $crate::scheduler::wit::PlacementRequest,
                ) -> ::core::result::Result<$crate::scheduler::wit::Placement, ::std::string::String> {
                    $crate::scheduler::__place::<$policy>(request)
                }
                fn commit(request: $crate::scheduler::wit::PlacementRequest, nodes: ::std::vec::Vec<u32>) {
                    $crate::scheduler::__commit(request, nodes)
                }
            }
            $crate::__scheduler::__export_scheduler_world!(ShoalSchedulerExport with_types_in $crate::__scheduler);
        };
    };
}

/// The `scaler` world: decide a service's replica count.
#[cfg(feature = "scaler")]
pub mod scaler {
    pub use shoal_policy_logic::{ReplicaMetrics, ScaleDecision, ScaleInput};

    /// The generated WIT types of this world.
    pub mod wit {
        pub use crate::__scaler::shoal::policy::scaling::*;
    }

    /// A scaling policy.
    pub trait Scaler {
        /// Returns the desired replica count (within `input.bounds()`) and a reason.
        fn scale(input: &ScaleInput) -> Result<ScaleDecision, String>;
    }

    /// Converts a WIT scale input.
    pub fn input_from_wit(i: wit::ScaleInput) -> ScaleInput {
        ScaleInput {
            service: i.service,
            current: i.current,
            min: i.min,
            max: i.max,
            replicas: i
                .replicas
                .into_iter()
                .map(|r| ReplicaMetrics {
                    cpu_percent: r.cpu_percent,
                    memory_bytes: r.memory_bytes,
                    custom: crate::pairs(r.custom),
                })
                .collect(),
            now_ms: i.now_ms,
            params: crate::pairs(i.params),
        }
    }

    #[doc(hidden)]
    pub fn __scale<S: Scaler>(input: wit::ScaleInput) -> Result<wit::ScaleDecision, String> {
        S::scale(&input_from_wit(input)).map(|d| wit::ScaleDecision {
            replicas: d.replicas,
            reason: d.reason,
        })
    }
}

/// Exports a [`scaler::Scaler`] as this component's `scaler` world.
#[cfg(feature = "scaler")]
#[macro_export]
macro_rules! export_scaler {
    ($policy:ty) => {
        const _: () = {
            struct ShoalScalerExport;
            impl $crate::__scaler::Guest for ShoalScalerExport {
                fn scale(
                    input: $crate::scaler::wit::ScaleInput,
                ) -> ::core::result::Result<$crate::scaler::wit::ScaleDecision, ::std::string::String> {
                    $crate::scaler::__scale::<$policy>(input)
                }
            }
            $crate::__scaler::__export_scaler_world!(ShoalScalerExport with_types_in $crate::__scaler);
        };
    };
}

/// The `discovery` world: which endpoints a caller should use.
#[cfg(feature = "discovery")]
pub mod discovery {
    pub use shoal_policy_logic::{Caller, DiscoveryInput, Endpoint, Ranked};

    /// The generated WIT types of this world.
    pub mod wit {
        pub use crate::__discovery::shoal::policy::discovering::*;
    }

    /// A discovery policy.
    pub trait Discovery {
        /// Returns endpoints to use, best first: indices into `input.endpoints`, each at
        /// most once, with weights of at least 1.
        fn discover(input: &DiscoveryInput) -> Result<Vec<Ranked>, String>;
    }

    /// Converts a WIT discovery input.
    pub fn input_from_wit(i: wit::DiscoveryInput) -> DiscoveryInput {
        DiscoveryInput {
            service: i.service,
            caller: Caller {
                node: i.caller.node,
                labels: crate::pairs(i.caller.labels),
            },
            endpoints: i
                .endpoints
                .into_iter()
                .map(|e| Endpoint {
                    address: e.address,
                    port: e.port,
                    node: e.node,
                    zone: e.zone,
                    region: e.region,
                    healthy: e.healthy,
                    load: e.load,
                    weight: e.weight,
                })
                .collect(),
            params: crate::pairs(i.params),
        }
    }

    #[doc(hidden)]
    pub fn __discover<D: Discovery>(
        input: wit::DiscoveryInput,
    ) -> Result<Vec<wit::Ranked>, String> {
        D::discover(&input_from_wit(input)).map(|list| {
            list.into_iter()
                .map(|r| wit::Ranked {
                    index: r.index,
                    weight: r.weight,
                })
                .collect()
        })
    }
}

/// Exports a [`discovery::Discovery`] as this component's `discovery` world.
#[cfg(feature = "discovery")]
#[macro_export]
macro_rules! export_discovery {
    ($policy:ty) => {
        const _: () = {
            struct ShoalDiscoveryExport;
            impl $crate::__discovery::Guest for ShoalDiscoveryExport {
                fn discover(
                    input: $crate::discovery::wit::DiscoveryInput,
                ) -> ::core::result::Result<::std::vec::Vec<$crate::discovery::wit::Ranked>, ::std::string::String> {
                    $crate::discovery::__discover::<$policy>(input)
                }
            }
            $crate::__discovery::__export_discovery_world!(ShoalDiscoveryExport with_types_in $crate::__discovery);
        };
    };
}
