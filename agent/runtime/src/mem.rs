//! The in-memory driver: a deterministic fake for orchestrator tests and the simulator.
//!
//! It runs nothing. Workloads are entries in a map; handles (`mem-1`, `mem-2`, …) and
//! dynamic host ports (from 30000 up) are handed out in call order; time is whatever
//! the test sets with [`MemDriver::set_now_ms`]. Every call is recorded, and tests make
//! the world misbehave with [`MemDriver::fail_next`], [`MemDriver::exit`],
//! [`MemDriver::set_image_present`] and friends.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use crate::driver::Driver;
use crate::error::DriverError;
use crate::logfile::{LogChunk, LogQuery};
use crate::spec::{
    check_alloc_id, tail_lines, RunState, Usage, WorkloadKind, WorkloadSpec, WorkloadStatus,
};

const NAME: &str = "mem";
const FIRST_DYNAMIC_PORT: u16 = 30000;

/// A driver operation, to aim injected failures at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemOp {
    /// [`Driver::start`].
    Start,
    /// [`Driver::stop`].
    Stop,
    /// [`Driver::status`].
    Status,
    /// [`Driver::list`].
    List,
    /// [`Driver::usage`].
    Usage,
    /// [`Driver::logs`].
    Logs,
}

impl MemOp {
    fn name(self) -> &'static str {
        match self {
            MemOp::Start => "start",
            MemOp::Stop => "stop",
            MemOp::Status => "status",
            MemOp::List => "list",
            MemOp::Usage => "usage",
            MemOp::Logs => "logs",
        }
    }
}

/// One call made to a [`MemDriver`], in order.
#[derive(Debug, Clone, PartialEq)]
pub enum MemCall {
    /// `start(spec)`.
    Start(WorkloadSpec),
    /// `stop(alloc_id, grace)`.
    Stop {
        /// The alloc asked to stop.
        alloc_id: String,
        /// The grace period given.
        grace: Duration,
    },
    /// `status(alloc_id)`.
    Status(String),
    /// `list()`.
    List,
    /// `usage(alloc_id)`.
    Usage(String),
    /// `logs(alloc_id, query)`.
    Logs {
        /// The alloc asked for.
        alloc_id: String,
        /// Lines asked for.
        tail: Option<usize>,
    },
}

/// A deterministic in-memory [`Driver`].
#[derive(Default)]
pub struct MemDriver {
    state: Mutex<MemState>,
}

#[derive(Default)]
struct MemState {
    workloads: BTreeMap<String, MemWorkload>,
    calls: Vec<MemCall>,
    failures: HashMap<MemOp, VecDeque<String>>,
    missing_images: BTreeSet<String>,
    now_ms: u64,
    handles_issued: u64,
    next_port: u16,
}

struct MemWorkload {
    status: WorkloadStatus,
    logs: Vec<u8>,
    usage: Usage,
}

impl MemState {
    /// Records the call, then fails it if a failure was queued for `op`.
    fn enter(&mut self, op: MemOp, call: MemCall) -> Result<(), DriverError> {
        self.calls.push(call);
        match self.failures.get_mut(&op).and_then(VecDeque::pop_front) {
            Some(message) => Err(DriverError::Injected {
                op: op.name(),
                message,
            }),
            None => Ok(()),
        }
    }

    /// The workload of `alloc_id`, or the driver's not-found error.
    fn existing(&self, alloc_id: &str) -> Result<&MemWorkload, DriverError> {
        check_alloc_id(alloc_id)?;
        self.workloads
            .get(alloc_id)
            .ok_or_else(|| DriverError::NotFound {
                driver: NAME,
                alloc_id: alloc_id.to_string(),
            })
    }

    fn dynamic_port(&mut self) -> u16 {
        if self.next_port < FIRST_DYNAMIC_PORT {
            self.next_port = FIRST_DYNAMIC_PORT;
        }
        let p = self.next_port;
        // Wraps back to the start of the range rather than overflowing.
        self.next_port = p.checked_add(1).unwrap_or(FIRST_DYNAMIC_PORT);
        p
    }
}

impl MemDriver {
    /// An empty driver at time 0 where every image is present.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next call of `op` fail with `message` (queued: call twice for two).
    pub fn fail_next(&self, op: MemOp, message: impl Into<String>) {
        self.state()
            .failures
            .entry(op)
            .or_default()
            .push_back(message.into());
    }

    /// Ends a workload by itself with `code`; false if there is no such workload.
    pub fn exit(&self, alloc_id: &str, code: Option<i32>) -> bool {
        self.set_state(alloc_id, RunState::Exited { code })
    }

    /// Sets a workload's state, e.g. [`RunState::Failed`]; false if there is none.
    pub fn set_state(&self, alloc_id: &str, state: RunState) -> bool {
        match self.state().workloads.get_mut(alloc_id) {
            Some(w) => {
                w.status.state = state;
                true
            }
            None => false,
        }
    }

    /// Sets what `usage` reports for a workload; false if there is none.
    pub fn set_usage(&self, alloc_id: &str, usage: Usage) -> bool {
        match self.state().workloads.get_mut(alloc_id) {
            Some(w) => {
                w.usage = usage;
                true
            }
            None => false,
        }
    }

    /// Appends output to a workload's logs; false if there is none.
    pub fn append_log(&self, alloc_id: &str, bytes: &[u8]) -> bool {
        match self.state().workloads.get_mut(alloc_id) {
            Some(w) => {
                w.logs.extend_from_slice(bytes);
                true
            }
            None => false,
        }
    }

    /// Sets the clock that stamps `started_at_ms`.
    pub fn set_now_ms(&self, now_ms: u64) {
        self.state().now_ms = now_ms;
    }

    /// Makes a docker image present (default) or missing on this fake node.
    pub fn set_image_present(&self, image: &str, present: bool) {
        let mut st = self.state();
        if present {
            st.missing_images.remove(image);
        } else {
            st.missing_images.insert(image.to_string());
        }
    }

    /// Puts a workload in place as if an earlier agent had started it (for adoption
    /// tests); replaces any workload with the same alloc id.
    pub fn insert(&self, status: WorkloadStatus) {
        self.state().workloads.insert(
            status.alloc_id.clone(),
            MemWorkload {
                status,
                logs: Vec::new(),
                usage: Usage {
                    cpu_percent: 0.0,
                    memory_bytes: 0,
                },
            },
        );
    }

    /// Every call so far, oldest first.
    pub fn calls(&self) -> Vec<MemCall> {
        self.state().calls.clone()
    }

    /// Every call so far, oldest first, and forgets them.
    pub fn take_calls(&self) -> Vec<MemCall> {
        std::mem::take(&mut self.state().calls)
    }
}

#[async_trait]
impl Driver for MemDriver {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn start(&self, spec: &WorkloadSpec) -> Result<WorkloadStatus, DriverError> {
        let mut st = self.state();
        st.enter(MemOp::Start, MemCall::Start(spec.clone()))?;
        spec.validate()?;
        if let Some(w) = st.workloads.get(&spec.alloc_id) {
            if w.status.state.is_live() {
                return Ok(w.status.clone());
            }
        }
        if let WorkloadKind::Docker { image, .. } = &spec.kind {
            if st.missing_images.contains(image) {
                return Err(DriverError::ImageMissing {
                    image: image.clone(),
                });
            }
        }
        let mut ports = Vec::with_capacity(spec.ports.len());
        for p in &spec.ports {
            let host = match p.host_port {
                Some(h) => h,
                None => st.dynamic_port(),
            };
            ports.push((p.name.clone(), host));
        }
        st.handles_issued += 1;
        let status = WorkloadStatus {
            alloc_id: spec.alloc_id.clone(),
            service: spec.service.clone(),
            slot: spec.slot,
            version: spec.version,
            handle: format!("mem-{}", st.handles_issued),
            state: RunState::Running,
            ports,
            started_at_ms: st.now_ms,
        };
        st.workloads.insert(
            spec.alloc_id.clone(),
            MemWorkload {
                status: status.clone(),
                logs: Vec::new(),
                usage: Usage {
                    cpu_percent: 0.0,
                    memory_bytes: 0,
                },
            },
        );
        Ok(status)
    }

    async fn stop(&self, alloc_id: &str, grace: Duration) -> Result<(), DriverError> {
        let mut st = self.state();
        st.enter(
            MemOp::Stop,
            MemCall::Stop {
                alloc_id: alloc_id.to_string(),
                grace,
            },
        )?;
        check_alloc_id(alloc_id)?;
        st.workloads.remove(alloc_id);
        Ok(())
    }

    async fn status(&self, alloc_id: &str) -> Result<Option<WorkloadStatus>, DriverError> {
        let mut st = self.state();
        st.enter(MemOp::Status, MemCall::Status(alloc_id.to_string()))?;
        check_alloc_id(alloc_id)?;
        Ok(st.workloads.get(alloc_id).map(|w| w.status.clone()))
    }

    async fn list(&self) -> Result<Vec<WorkloadStatus>, DriverError> {
        let mut st = self.state();
        st.enter(MemOp::List, MemCall::List)?;
        Ok(st.workloads.values().map(|w| w.status.clone()).collect())
    }

    async fn usage(&self, alloc_id: &str) -> Result<Option<Usage>, DriverError> {
        let mut st = self.state();
        st.enter(MemOp::Usage, MemCall::Usage(alloc_id.to_string()))?;
        check_alloc_id(alloc_id)?;
        Ok(st
            .workloads
            .get(alloc_id)
            .filter(|w| w.status.state.is_live())
            .map(|w| w.usage))
    }

    async fn logs(&self, alloc_id: &str, query: LogQuery) -> Result<LogChunk, DriverError> {
        let mut st = self.state();
        st.enter(
            MemOp::Logs,
            MemCall::Logs {
                alloc_id: alloc_id.to_string(),
                tail: query.tail,
            },
        )?;
        let w = st.existing(alloc_id)?;
        let len = w.logs.len();
        let limit = query.limit.clamp(1, crate::MAX_LOG_CHUNK);
        Ok(match (query.offset, query.tail) {
            (None, Some(n)) => LogChunk {
                bytes: tail_lines(&w.logs, n).to_vec(),
                next_offset: len as u64,
                more: false,
            },
            (offset, _) => {
                let start = offset.map_or(0, |o| (o as usize).min(len));
                let end = (start + limit).min(len);
                LogChunk {
                    bytes: w.logs[start..end].to_vec(),
                    next_offset: end as u64,
                    more: end < len,
                }
            }
        })
    }

    /// A health-check command "passes" (exit 0) while the workload is live, else 1.
    async fn exec(&self, alloc_id: &str, _command: &[String]) -> Result<i32, DriverError> {
        let st = self.state();
        let w = st.existing(alloc_id)?;
        Ok(if w.status.state.is_live() { 0 } else { 1 })
    }
}
