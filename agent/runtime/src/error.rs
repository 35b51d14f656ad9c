//! Driver errors. Each variant says what it left behind, so the caller knows whether
//! to retry, clean up or report.

use std::io;
use std::path::PathBuf;

/// Why a driver call failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The spec (or an alloc id) cannot be used as given. Nothing was started or changed.
    #[error("invalid workload spec for alloc {alloc_id:?}: {reason}")]
    InvalidSpec {
        /// The allocation the spec was for.
        alloc_id: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The driver was configured wrongly (e.g. an empty node name). Nothing was changed.
    #[error("invalid driver configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },

    /// This driver cannot run this kind of workload. Nothing was started.
    #[error("{driver} driver cannot run {what}")]
    Unsupported {
        /// The driver's name.
        driver: &'static str,
        /// What it was asked to run.
        what: String,
    },

    /// No workload with this alloc id exists on this node.
    #[error("{driver}: no workload for alloc {alloc_id:?} on this node")]
    NotFound {
        /// The driver's name.
        driver: &'static str,
        /// The allocation asked for.
        alloc_id: String,
    },

    /// The image is not on this node, and shoal never pulls from a registry. Nothing was
    /// started.
    #[error(
        "docker: image {image} not present on this node (no registry is used: `docker load` it on this node)"
    )]
    ImageMissing {
        /// The image reference.
        image: String,
    },

    /// Docker Engine could not be reached or spoke an API this client cannot use.
    /// Nothing was changed.
    #[error("docker: cannot reach Docker Engine at {socket}: {source}")]
    DockerUnavailable {
        /// The socket tried.
        socket: String,
        /// What went wrong.
        #[source]
        source: bollard::errors::Error,
    },

    /// A Docker Engine call failed; `what` names the call and its target. A container
    /// may remain only where `what` says so (the driver removes what it half-created).
    #[error("docker: {what}: {source}")]
    Docker {
        /// The operation and its target, for people.
        what: String,
        /// The engine's answer.
        #[source]
        source: bollard::errors::Error,
    },

    /// The workload's program could not be started. Nothing is left running and no
    /// state was recorded for the alloc.
    #[error("process: cannot start {program:?} for alloc {alloc_id:?}: {source}")]
    Spawn {
        /// The allocation.
        alloc_id: String,
        /// The program that failed to start.
        program: String,
        /// Why (e.g. not found, not executable).
        #[source]
        source: io::Error,
    },

    /// No host port could be reserved for a dynamic port. Nothing was started.
    #[error("process: no free host port for port {port:?} of alloc {alloc_id:?}: {source}")]
    PortUnavailable {
        /// The allocation.
        alloc_id: String,
        /// The port name.
        port: String,
        /// The bind error.
        #[source]
        source: io::Error,
    },

    /// Reading or writing the driver's own files failed. For `start` nothing is left
    /// running; for `stop` the workload may still run and stop should be retried.
    #[error("process: cannot {what} {path}: {source}")]
    Io {
        /// The operation, e.g. "write alloc metadata".
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// A per-alloc record on disk cannot be parsed, so its pid cannot be trusted and
    /// nothing is signalled. `stop` removes such a record.
    #[error("process: alloc record {path} is unreadable: {reason}")]
    CorruptRecord {
        /// The file.
        path: PathBuf,
        /// The parse error.
        reason: String,
    },

    /// A stopped workload still had live processes after SIGKILL and a wait. Its record
    /// is kept so that stop can be retried.
    #[error("process: alloc {alloc_id:?} still has live processes ({pids:?}) after SIGKILL")]
    StillRunning {
        /// The allocation.
        alloc_id: String,
        /// Processes still alive in its group.
        pids: Vec<i32>,
    },

    /// A failure injected into the in-memory driver by a test. Nothing was changed.
    #[error("mem: injected failure in {op}: {message}")]
    Injected {
        /// The operation that failed.
        op: &'static str,
        /// The injected message.
        message: String,
    },
}
