//! The narrow trait every runtime driver implements.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::DriverError;
use crate::logfile::{LogChunk, LogQuery};
use crate::spec::{Usage, WorkloadSpec, WorkloadStatus};

/// Starts, stops and observes the workloads of one node.
///
/// Object-safe (`Arc<dyn Driver>`) and its futures are `Send`, so the agent can pick a
/// driver at run time and call it from spawned tasks. All methods are safe to call
/// concurrently, and concurrent starts of one alloc id never run it twice (the second
/// one returns the first's workload or fails).
#[async_trait]
pub trait Driver: Send + Sync {
    /// Short name: `docker`, `process` or `mem`.
    fn name(&self) -> &'static str;

    /// Starts the workload. If one for `spec.alloc_id` is already running it is
    /// returned as is (start is idempotent); one that has ended is replaced.
    async fn start(&self, spec: &WorkloadSpec) -> Result<WorkloadStatus, DriverError>;

    /// Asks the workload to stop, kills it after `grace`, and removes it with its logs
    /// and records. Stopping a workload that does not exist is `Ok`.
    async fn stop(&self, alloc_id: &str, grace: Duration) -> Result<(), DriverError>;

    /// The workload's current status, or `None` if this node has none for `alloc_id`.
    async fn status(&self, alloc_id: &str) -> Result<Option<WorkloadStatus>, DriverError>;

    /// Every workload this node's shoal started and has not stopped, running or ended:
    /// what a restarted agent adopts, and what orphan cleanup stops.
    async fn list(&self) -> Result<Vec<WorkloadStatus>, DriverError>;

    /// Resource use, or `None` if the workload does not exist or is not running.
    async fn usage(&self, alloc_id: &str) -> Result<Option<Usage>, DriverError>;

    /// Resource use of several workloads in one pass over the host where the driver
    /// can (the process driver reads `/proc` once for all of them); workloads that do
    /// not exist or do not run are left out.
    async fn usage_many(
        &self,
        alloc_ids: &[String],
    ) -> Result<HashMap<String, Usage>, DriverError> {
        let mut out = HashMap::new();
        for id in alloc_ids {
            if let Some(u) = self.usage(id).await? {
                out.insert(id.clone(), u);
            }
        }
        Ok(out)
    }

    /// Captured stdout and stderr, interleaved: the part `query` asks for, and never
    /// more than its limit, however large the log is.
    async fn logs(&self, alloc_id: &str, query: LogQuery) -> Result<LogChunk, DriverError>;

    /// Periodic upkeep, such as rotating logs that reached their size cap; cheap when
    /// nothing is due. The agent calls it every few seconds.
    async fn housekeep(&self) -> Result<(), DriverError> {
        Ok(())
    }

    /// Runs `command` (a health check) inside the workload's container (docker) or on
    /// the host with the workload's environment (process), and returns its exit code
    /// (128 + signal when killed). The caller bounds the time it may take.
    async fn exec(&self, alloc_id: &str, command: &[String]) -> Result<i32, DriverError>;

    /// Notified whenever a workload of this driver ends on its own, so the caller can
    /// look at once instead of at its next poll. `None`: the driver cannot tell (poll).
    fn exits(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
}
