//! Runtime drivers: the only code in shoal that starts, stops or inspects containers
//! and processes (ARCHITECTURE §4).
//!
//! An agent runs the allocation slots that name it through one [`Driver`]. The trait is
//! narrow on purpose — start, stop, status, list, usage, logs — so the orchestrator can
//! be tested against [`MemDriver`] and run for real against [`DockerDriver`] (Docker
//! Engine over its Unix socket, via bollard) or [`ProcessDriver`] (plain processes, for
//! hosts without Docker).
//!
//! Every driver keeps enough on the side of the workload (container labels, or a JSON
//! file per allocation in the state dir) that a restarted agent *adopts* what is still
//! running instead of restarting it: [`Driver::list`] returns every workload this node's
//! shoal started, with its service, slot, version and allocation id, so the caller can
//! adopt what a slot still names and stop the rest.
//!
//! What this crate does not do: decide what should run (that is the steward's job),
//! restart crashed workloads (the agent does, after reading [`RunState::Exited`]),
//! health-check endpoints, or pull images — no registry is ever contacted. Images travel
//! between nodes as blobs: [`DockerDriver::save_image`] on a node that has one,
//! [`DockerDriver::load_image`] where it is needed (ARCHITECTURE §6). Process
//! workloads are contained in cgroups where the host allows it. [`scratch`] starts
//! throwaway extra Docker Engines for tests and benchmarks; the agent never uses it.

mod cgroup;
mod docker;
mod driver;
mod error;
mod listeners;
mod logfile;
mod mem;
mod process;
mod procfs;
pub mod scratch;
mod spec;
#[cfg(feature = "testutil")]
pub mod testutil;

pub use docker::{labels, DockerDriver, DockerOptions};
pub use driver::Driver;
pub use error::DriverError;
pub use listeners::Listeners;
pub use logfile::{LogChunk, LogPolicy, LogQuery, MAX_LOG_CHUNK};
pub use mem::{MemCall, MemDriver, MemOp};
pub use process::ProcessDriver;
pub use spec::{
    port_env_name, tail_lines, PortSpec, Protocol, RunState, Usage, WorkloadKind, WorkloadSpec,
    WorkloadStatus,
};
