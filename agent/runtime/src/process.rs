//! The `process` driver: workloads as plain processes, for hosts without Docker.
//!
//! Layout of the state dir:
//! - `allocs/<alloc_id>.json` — what was started: pid, the process's start time (from
//!   `/proc/<pid>/stat`), the boot id, ports, and the exit status once known. This is
//!   the pid file: a restarted agent re-adopts a process only if a process with that
//!   pid exists *and* has the recorded start time in the same boot, so a reused pid is
//!   never mistaken for (or signalled as) the workload.
//! - `logs/<alloc_id>.log` — stdout and stderr, interleaved, appended across restarts
//!   of the allocation, rotated at a size cap ([`LogPolicy`]; `<alloc_id>.log.1` … are
//!   the older parts) by [`Driver::housekeep`] and at every start, so a crash loop
//!   cannot fill the disk.
//!
//! The records are read from disk once, when the driver opens, and kept in memory
//! in step with the files; a workload this driver spawned is watched by a task that
//! reaps it, so its status needs no `/proc` read at all. The cost of `list` and
//! `status` is therefore O(own workloads), and `/proc` is scanned only by
//! [`Driver::usage_many`] (once per sampling pass, for every workload together, on
//! a blocking thread). Waiting for a process group to go away asks the kernel
//! (`kill(-pgid, 0)`), never scans.
//!
//! Each workload gets its own process group (leader = the spawned program), so `stop`
//! signals everything it forked: SIGTERM to the group, SIGKILL after the grace period.
//!
//! Environment: the workload sees only `PATH` from the agent, then the spec's `env`,
//! then `SHOAL_ALLOC_ID`, `SHOAL_SERVICE`, `SHOAL_SLOT`, `SHOAL_VERSION`, and for every
//! port `PORT_<NAME>` (see [`crate::port_env_name`]) with its host port, plus `PORT` for
//! the first port. A process has no port mapping: it must listen on the host port
//! (`container_port` is not used). A dynamic port is found by binding port 0 and
//! releasing it, so another program may take it before the workload binds it; the
//! workload then fails and is restarted by the agent on a new port.
//!
//! Not done here: `cpu_millis` and `memory_bytes` are not enforced (no cgroups); a
//! descendant that leaves the group (`setsid`, daemonising) escapes `stop` and usage;
//! the working directory is the agent's.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::driver::Driver;
use crate::error::DriverError;
use crate::logfile::{self, LogChunk, LogPolicy, LogQuery};
use crate::procfs;
use crate::spec::{
    check_alloc_id, port_env_name, Protocol, RunState, Usage, WorkloadKind, WorkloadSpec,
    WorkloadStatus,
};

const NAME: &str = "process";
/// How long to wait for a group to vanish after SIGKILL before reporting it stuck
/// (processes in uninterruptible sleep can outlive SIGKILL for a while).
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Used when the agent itself has no PATH.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs workloads as process groups and adopts them again after an agent restart.
pub struct ProcessDriver {
    inner: Arc<Inner>,
}

struct Inner {
    allocs_dir: PathBuf,
    logs_dir: PathBuf,
    boot_id: Option<String>,
    ticks_per_sec: u64,
    page_size: u64,
    logs: LogPolicy,
    /// Every alloc record, read from `allocs/` when the driver opened and kept in
    /// step with the files since (they stay the source of truth across restarts).
    records: Mutex<HashMap<String, AllocRecord>>,
    /// Records that could not be read when the driver opened: id -> why.
    corrupt: Mutex<HashMap<String, String>>,
    /// What this instance learnt in memory; the files stay the source of truth.
    live: Mutex<HashMap<String, Live>>,
    /// One async lock per alloc id, so start/stop/exit-recording of one alloc never
    /// interleave while different allocs proceed in parallel.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Notified when a watched child ends.
    exits: Arc<tokio::sync::Notify>,
    /// Cgroups that contain each workload and everything it forks (`None`: the
    /// host offers none to use; the process group alone contains them).
    cgroups: Option<crate::cgroup::Cgroups>,
    /// Starts forking at once. A thousand parallel forks on a thousand blocking
    /// threads starve every other thread of the agent (API, loop) for seconds; a few
    /// at a time start them as fast and leave the CPU to answer.
    launch_slots: tokio::sync::Semaphore,
}

/// Starts that fork at once (see `Inner::launch_slots`).
const LAUNCH_SLOTS: usize = 4;

#[derive(Default)]
struct Live {
    /// Pid of the child this instance spawned and whose exit a watcher task awaits.
    watched_pid: Option<i32>,
    /// Exit of that child, once the watcher reaped it: (pid, exit).
    exit: Option<(i32, ExitRecord)>,
    /// Previous CPU reading, for `usage` deltas.
    cpu: Option<CpuSample>,
    /// Bytes rotated out of the current log file: its first byte's logical offset.
    log_base: u64,
}

#[derive(Clone, Copy)]
struct CpuSample {
    pid: i32,
    ticks: u64,
    at: Instant,
    /// What the window ending at `at` gave.
    percent: f64,
}

/// Shortest window a CPU percentage is computed over. Readings come every second
/// for autoscaled replicas and every few seconds for all, so two can land a few ms
/// apart; over such a window the kernel's 10 ms ticks make 0% or 100%+ out of a
/// steady 40%, and the autoscaler saw flaps. A reading sooner than this repeats the
/// last percentage and keeps the window growing.
const MIN_CPU_WINDOW: Duration = Duration::from_millis(500);

/// The per-alloc file. Changing it needs a migration: live agents' files outlive them.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct AllocRecord {
    alloc_id: String,
    service: String,
    slot: u32,
    version: u64,
    command: Vec<String>,
    pid: i32,
    start_ticks: u64,
    boot_id: Option<String>,
    started_at_ms: u64,
    ports: Vec<(String, u16)>,
    #[serde(default)]
    exit: Option<ExitRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct ExitRecord {
    code: Option<i32>,
    signal: Option<i32>,
}

impl ExitRecord {
    fn from_status(st: std::process::ExitStatus) -> Self {
        ExitRecord {
            code: st.code(),
            signal: st.signal(),
        }
    }

    fn from_wait_status(status: libc::c_int) -> Self {
        if libc::WIFEXITED(status) {
            ExitRecord {
                code: Some(libc::WEXITSTATUS(status)),
                signal: None,
            }
        } else if libc::WIFSIGNALED(status) {
            ExitRecord {
                code: None,
                signal: Some(libc::WTERMSIG(status)),
            }
        } else {
            ExitRecord {
                code: None,
                signal: None,
            }
        }
    }

    fn state(self) -> RunState {
        match (self.code, self.signal) {
            (Some(code), _) => RunState::Exited { code: Some(code) },
            (None, Some(sig)) => RunState::Failed {
                reason: format!("killed by signal {sig}{}", signal_name(sig)),
            },
            (None, None) => RunState::Exited { code: None },
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => " (SIGHUP)",
        libc::SIGINT => " (SIGINT)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGKILL => " (SIGKILL, e.g. out of memory)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGPIPE => " (SIGPIPE)",
        libc::SIGTERM => " (SIGTERM)",
        _ => "",
    }
}

/// Whether the recorded leader process is still the one we started.
enum Leader {
    Alive,
    /// Gone, exited (maybe as a zombie), or its pid now belongs to someone else.
    Gone(Option<ExitRecord>),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DriverError + 'a {
    move |source| DriverError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

impl ProcessDriver {
    /// Opens (creating if needed) the driver's state under `state_dir`. Workloads
    /// recorded there by an earlier instance are adopted, not restarted.
    pub fn new(state_dir: impl Into<PathBuf>) -> Result<Self, DriverError> {
        Self::with_logs(state_dir, LogPolicy::default())
    }

    /// Like [`ProcessDriver::new`], rotating workload logs by `logs`.
    pub fn with_logs(state_dir: impl Into<PathBuf>, logs: LogPolicy) -> Result<Self, DriverError> {
        let state_dir = state_dir.into();
        let allocs_dir = state_dir.join("allocs");
        let logs_dir = state_dir.join("logs");
        for dir in [&allocs_dir, &logs_dir] {
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        }
        let mut records = HashMap::new();
        let mut corrupt = HashMap::new();
        for entry in fs::read_dir(&allocs_dir).map_err(io_err("list", &allocs_dir))? {
            let entry = entry.map_err(io_err("list", &allocs_dir))?;
            let name = entry.file_name();
            let Some(alloc_id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue; // temp files of an interrupted write
            };
            match load_record(&entry.path()) {
                Ok(Some(rec)) => {
                    records.insert(alloc_id.to_string(), rec);
                }
                Ok(None) => {}
                Err(e) => {
                    // One bad file must not hide every other workload from adoption.
                    tracing::warn!(alloc_id, error = %e, "skipping unreadable alloc record");
                    corrupt.insert(alloc_id.to_string(), e.to_string());
                }
            }
        }
        // One scope per state directory: agents sharing a host keep apart.
        let scope = format!(
            "shoal-{}",
            &blake3::hash(state_dir.as_os_str().as_encoded_bytes()).to_hex()[..12]
        );
        let cgroups = crate::cgroup::Cgroups::detect(&scope);
        match &cgroups {
            Some(_) => tracing::info!(scope, "process workloads are contained in cgroups"),
            None => tracing::info!(
                "no writable cgroup v1 hierarchy: process workloads are contained by their process group only"
            ),
        }
        Ok(ProcessDriver {
            inner: Arc::new(Inner {
                cgroups,
                allocs_dir,
                logs_dir,
                boot_id: procfs::boot_id(),
                ticks_per_sec: procfs::ticks_per_sec(),
                page_size: procfs::page_size(),
                logs,
                records: Mutex::new(records),
                corrupt: Mutex::new(corrupt),
                live: Mutex::new(HashMap::new()),
                locks: Mutex::new(HashMap::new()),
                launch_slots: tokio::sync::Semaphore::new(LAUNCH_SLOTS),
                exits: Arc::new(tokio::sync::Notify::new()),
            }),
        })
    }

    /// Path of the log file of `alloc_id` (it may not exist).
    pub fn log_path(&self, alloc_id: &str) -> PathBuf {
        self.inner.log_path(alloc_id)
    }
}

impl Inner {
    fn record_path(&self, alloc_id: &str) -> PathBuf {
        self.allocs_dir.join(format!("{alloc_id}.json"))
    }

    fn log_path(&self, alloc_id: &str) -> PathBuf {
        self.logs_dir.join(format!("{alloc_id}.log"))
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        // A panic elsewhere while holding the lock leaves plain data behind: keep going.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn lock(&self, alloc_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(alloc_id.to_string()).or_default().clone()
        };
        m.lock_owned().await
    }

    /// Drops the lock of a stopped alloc unless someone else holds or awaits it, so the
    /// map does not grow with every alloc ever run.
    fn forget_lock(&self, alloc_id: &str) {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Two references: the map's and the caller's guard.
        if locks
            .get(alloc_id)
            .is_some_and(|m| Arc::strong_count(m) <= 2)
        {
            locks.remove(alloc_id);
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, AllocRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_record(&self, alloc_id: &str) -> Result<Option<AllocRecord>, DriverError> {
        if let Some(rec) = self.records().get(alloc_id) {
            return Ok(Some(rec.clone()));
        }
        let corrupt = self.corrupt.lock().unwrap_or_else(|e| e.into_inner());
        match corrupt.get(alloc_id) {
            Some(reason) => Err(DriverError::CorruptRecord {
                path: self.record_path(alloc_id),
                reason: reason.clone(),
            }),
            None => Ok(None),
        }
    }

    fn write_record(&self, rec: &AllocRecord) -> Result<(), DriverError> {
        let path = self.record_path(&rec.alloc_id);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| DriverError::Io {
            what: "encode alloc record",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        // Write-then-rename: a crash leaves the old record or the new one, never half.
        (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })()
        .map_err(io_err("write alloc record", &path))?;
        self.records().insert(rec.alloc_id.clone(), rec.clone());
        Ok(())
    }

    /// Forgets the record of `alloc_id` (file and memory), keeping its log.
    fn remove_record(&self, alloc_id: &str) -> Result<(), DriverError> {
        let path = self.record_path(alloc_id);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &path)(e)),
        }
        self.records().remove(alloc_id);
        self.corrupt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(alloc_id);
        Ok(())
    }

    fn remove_files(&self, alloc_id: &str) -> Result<(), DriverError> {
        self.remove_record(alloc_id)?;
        let log = self.log_path(alloc_id);
        match fs::remove_file(&log) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &log)(e)),
        }
        logfile::remove_rotated(&log, self.logs);
        Ok(())
    }

    /// Rotates the log of `alloc_id` if it reached the cap, moving its logical base.
    fn rotate_log(&self, alloc_id: &str) {
        let path = self.log_path(alloc_id);
        match logfile::rotate_if_needed(&path, self.logs) {
            Ok(0) => {}
            Ok(moved) => {
                self.live()
                    .entry(alloc_id.to_string())
                    .or_default()
                    .log_base += moved;
                tracing::debug!(alloc_id, moved, "rotated workload log");
            }
            Err(e) => tracing::warn!(alloc_id, error = %e, "cannot rotate workload log"),
        }
    }

    fn same_boot(&self, rec: &AllocRecord) -> bool {
        match (&rec.boot_id, &self.boot_id) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }

    fn leader(&self, rec: &AllocRecord) -> Leader {
        if !self.same_boot(rec) {
            return Leader::Gone(None);
        }
        // Our own child: its watcher reaps it and records the exit, so until then it
        // runs (or is a zombie about to be reaped), and nothing needs reading.
        if self
            .live()
            .get(&rec.alloc_id)
            .is_some_and(|l| l.watched_pid == Some(rec.pid) && l.exit.is_none())
        {
            return Leader::Alive;
        }
        let Some(st) = procfs::read_stat(rec.pid) else {
            return Leader::Gone(None);
        };
        if st.start_ticks != rec.start_ticks {
            return Leader::Gone(None); // the pid was reused by another process
        }
        if st.is_alive() {
            return Leader::Alive;
        }
        // A zombie. If it is our child and no watcher task of this instance will reap
        // it (e.g. the agent re-exec'd itself), reap it here to learn its exit status.
        let watched = self
            .live()
            .get(&rec.alloc_id)
            .is_some_and(|l| l.watched_pid == Some(rec.pid));
        if watched {
            // The watcher reaps it within moments and records the real exit status.
            return Leader::Alive;
        }
        if st.ppid == std::process::id() as i32 {
            let mut status: libc::c_int = 0;
            // SAFETY: plain syscall on a pid we started; WNOHANG never blocks.
            let r = unsafe { libc::waitpid(rec.pid, &mut status, libc::WNOHANG) };
            if r == rec.pid {
                return Leader::Gone(Some(ExitRecord::from_wait_status(status)));
            }
        }
        Leader::Gone(None)
    }

    fn status_of(&self, rec: &AllocRecord) -> WorkloadStatus {
        let remembered = self
            .live()
            .get(&rec.alloc_id)
            .and_then(|l| l.exit)
            .filter(|(pid, _)| *pid == rec.pid)
            .map(|(_, e)| e);
        let state = match remembered.or(rec.exit) {
            Some(exit) => exit.state(),
            None => match self.leader(rec) {
                Leader::Alive => RunState::Running,
                Leader::Gone(Some(exit)) => {
                    self.remember_exit(&rec.alloc_id, rec.pid, exit);
                    exit.state()
                }
                Leader::Gone(None) => RunState::Exited { code: None },
            },
        };
        WorkloadStatus {
            alloc_id: rec.alloc_id.clone(),
            service: rec.service.clone(),
            slot: rec.slot,
            version: rec.version,
            handle: rec.pid.to_string(),
            state,
            ports: rec.ports.clone(),
            started_at_ms: rec.started_at_ms,
        }
    }

    fn remember_exit(&self, alloc_id: &str, pid: i32, exit: ExitRecord) {
        self.live().entry(alloc_id.to_string()).or_default().exit = Some((pid, exit));
    }

    /// Records a child's exit in memory and in its file, unless the alloc was stopped
    /// (file removed) or restarted (other pid) in the meantime.
    async fn record_exit(&self, alloc_id: &str, pid: i32, exit: ExitRecord) {
        self.remember_exit(alloc_id, pid, exit);
        self.exits.notify_one();
        let _guard = self.lock(alloc_id).await;
        match self.read_record(alloc_id) {
            Ok(Some(mut rec)) if rec.pid == pid && rec.exit.is_none() => {
                rec.exit = Some(exit);
                if let Err(e) = self.write_record(&rec) {
                    tracing::warn!(alloc_id, error = %e, "cannot record workload exit");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(alloc_id, error = %e, "cannot record workload exit"),
        }
    }

    /// True if signalling process group `rec.pid` can only reach our workload.
    fn may_signal_group(&self, rec: &AllocRecord) -> bool {
        if !self.same_boot(rec) || rec.pid <= 1 {
            return false;
        }
        match procfs::read_stat(rec.pid) {
            // Our leader, alive or a zombie: the group is ours.
            Some(st) if st.start_ticks == rec.start_ticks => true,
            // Another process holds the pid now; it may lead a group of the same id.
            Some(_) => false,
            // Leader gone; members left in its group are its descendants (a group id is
            // not reused while the group has members).
            None => group_exists(rec.pid),
        }
    }

    /// SIGTERM, wait up to `grace`, SIGKILL, wait; Ok once no live process is left:
    /// neither in the workload's group nor in its cgroup (descendants that left the
    /// group with `setsid` are still in the cgroup).
    async fn kill_group(&self, rec: &AllocRecord, grace: Duration) -> Result<(), DriverError> {
        let group = self.kill_leader_group(rec, grace).await;
        let Some(cg) = &self.cgroups else {
            return group;
        };
        let alloc = rec.alloc_id.as_str();
        if !cg.members(alloc).is_empty() {
            if !grace.is_zero() && group.is_ok() {
                cg.signal(alloc, libc::SIGTERM);
                wait_until(grace, || cg.members(alloc).is_empty()).await;
            }
            cg.signal(alloc, libc::SIGKILL);
            wait_until(KILL_WAIT, || cg.members(alloc).is_empty()).await;
        }
        let left = cg.members(alloc);
        if !left.is_empty() {
            return Err(DriverError::StillRunning {
                alloc_id: rec.alloc_id.clone(),
                pids: left,
            });
        }
        cg.remove(alloc);
        group
    }

    /// [`Inner::kill_group`] for the process group led by the recorded pid.
    async fn kill_leader_group(
        &self,
        rec: &AllocRecord,
        grace: Duration,
    ) -> Result<(), DriverError> {
        if !self.may_signal_group(rec) {
            return Ok(());
        }
        let pgid = rec.pid;
        if !grace.is_zero() {
            signal_group(pgid, libc::SIGTERM);
            if wait_group_gone(pgid, grace).await {
                return Ok(());
            }
        }
        signal_group(pgid, libc::SIGKILL);
        if wait_group_gone(pgid, KILL_WAIT).await {
            return Ok(());
        }
        // Still there after SIGKILL: only now look at who (zombies waiting for their
        // parent to reap them do not count).
        let pids: Vec<i32> = tokio::task::spawn_blocking(move || procfs::group_members(pgid))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
            .iter()
            .map(|p| p.pid)
            .collect();
        if pids.is_empty() {
            return Ok(());
        }
        Err(DriverError::StillRunning {
            alloc_id: rec.alloc_id.clone(),
            pids,
        })
    }

    /// CPU and memory of `rec`'s group from one reading of its members' totals.
    fn usage_of(&self, rec: &AllocRecord, ticks: u64, rss_pages: u64) -> Usage {
        let memory_bytes = rss_pages * self.page_size;
        let now = Instant::now();
        let tps = self.ticks_per_sec as f64;
        let mut live = self.live();
        let entry = live.entry(rec.alloc_id.clone()).or_default();
        let cpu_percent = match entry.cpu.filter(|c| c.pid == rec.pid) {
            Some(prev) if now.duration_since(prev.at) < MIN_CPU_WINDOW => {
                return Usage {
                    cpu_percent: prev.percent,
                    memory_bytes,
                };
            }
            Some(prev) => {
                let secs = now.duration_since(prev.at).as_secs_f64();
                // Members that exit take their ticks with them: never report negative.
                let delta = ticks.saturating_sub(prev.ticks) as f64 / tps;
                if secs > 0.0 {
                    delta / secs * 100.0
                } else {
                    0.0
                }
            }
            None => {
                let since_start = procfs::uptime_secs()
                    .map(|up| up - rec.start_ticks as f64 / tps)
                    .unwrap_or(0.0);
                if since_start > 0.0 {
                    ticks as f64 / tps / since_start * 100.0
                } else {
                    0.0
                }
            }
        };
        entry.cpu = Some(CpuSample {
            pid: rec.pid,
            ticks,
            at: now,
            percent: cpu_percent,
        });
        Usage {
            cpu_percent,
            memory_bytes,
        }
    }
}

fn signal_group(pgid: i32, sig: libc::c_int) {
    // kill(0) and kill(-1) would hit the agent's own group or every process it may
    // signal: never let a bad pid get there.
    if pgid <= 1 {
        return;
    }
    // SAFETY: plain syscall. A negative pid addresses the group; ESRCH (no member left)
    // is the outcome we want anyway, so the result is not needed.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Whether any process (a zombie included) is in group `pgid`: one syscall, no scan.
fn group_exists(pgid: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: plain syscall; signal 0 only checks that the group exists.
    let r = unsafe { libc::kill(-pgid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Polls `done` (5 ms, doubling to 100 ms) until it holds or `within` passes.
async fn wait_until(within: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut step = Duration::from_millis(5);
    loop {
        if done() {
            return true;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(step.min(deadline - now)).await;
        step = (step * 2).min(Duration::from_millis(100));
    }
}

/// Polls until group `pgid` has no live member; false if `within` passes first.
async fn wait_group_gone(pgid: i32, within: Duration) -> bool {
    wait_until(within, || !group_exists(pgid)).await
}

/// A free host port for `proto` (bound on every address, then released).
pub(crate) fn pick_port(proto: Protocol) -> io::Result<u16> {
    let any = SocketAddr::from(([0, 0, 0, 0], 0));
    match proto {
        Protocol::Tcp => TcpListener::bind(any)?.local_addr().map(|a| a.port()),
        Protocol::Udp => UdpSocket::bind(any)?.local_addr().map(|a| a.port()),
    }
}

/// The blocking half of a start: rotates the log, picks ports, forks the workload in
/// its own process group and writes its record (fsync). Runs on a blocking thread
/// inside the runtime, so the child is still watched by tokio.
fn launch(
    inner: &Inner,
    spec: &WorkloadSpec,
    command: &[String],
) -> Result<(tokio::process::Child, AllocRecord), DriverError> {
    let alloc_id = spec.alloc_id.as_str();
    // A crash loop appends to one log: keep it under its cap at every start too.
    inner.rotate_log(alloc_id);

    let mut ports = Vec::with_capacity(spec.ports.len());
    for p in &spec.ports {
        let host = match p.host_port {
            Some(h) => h,
            None => pick_port(p.protocol).map_err(|source| DriverError::PortUnavailable {
                alloc_id: alloc_id.to_string(),
                port: p.name.clone(),
                source,
            })?,
        };
        ports.push((p.name.clone(), host));
    }

    let log_path = inner.log_path(alloc_id);
    // Appended across restarts of one allocation, so the output of a crash is
    // still there after the restart that follows it.
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_err("open log file", &log_path))?;
    // stdout and stderr share one open file (and so one offset): lines interleave
    // in the order they were written and never overwrite each other.
    let log2 = log
        .try_clone()
        .map_err(io_err("open log file", &log_path))?;

    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
        )
        .envs(&spec.env)
        .env("SHOAL_ALLOC_ID", alloc_id)
        .env("SHOAL_SERVICE", &spec.service)
        .env("SHOAL_SLOT", spec.slot.to_string())
        .env("SHOAL_VERSION", spec.version.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        // Own group: stop reaches everything the workload forks, and a Ctrl-C
        // aimed at the agent's terminal group does not reach the workload.
        .process_group(0)
        // The workload must survive the agent (it is adopted after a restart).
        .kill_on_drop(false);
    for (i, (name, host)) in ports.iter().enumerate() {
        cmd.env(port_env_name(name), host.to_string());
        if i == 0 {
            cmd.env("PORT", host.to_string());
        }
    }
    if let Some(cg) = &inner.cgroups {
        match cg.prepare(alloc_id, spec.memory_bytes) {
            Ok(joined) => {
                // SAFETY: `join_self` only makes open/write/close syscalls on paths
                // prepared before the fork.
                unsafe {
                    cmd.pre_exec(move || joined.join_self());
                }
            }
            Err(e) => tracing::warn!(
                alloc_id,
                error = %e,
                "cannot create the workload's cgroup: it is contained by its process group only"
            ),
        }
    }

    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(source) => {
            let _ = fs::remove_file(&log_path);
            return Err(DriverError::Spawn {
                alloc_id: alloc_id.to_string(),
                program: command[0].clone(),
                source,
            });
        }
    };
    let started_at_ms = now_ms();
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    // Until we wait on it the child cannot be reaped, so its stat is readable even
    // if it already exited.
    let start_ticks = procfs::read_stat(pid).map(|s| s.start_ticks).unwrap_or(0);
    let rec = AllocRecord {
        alloc_id: alloc_id.to_string(),
        service: spec.service.clone(),
        slot: spec.slot,
        version: spec.version,
        command: command.to_vec(),
        pid,
        start_ticks,
        boot_id: inner.boot_id.clone(),
        started_at_ms,
        ports,
        exit: None,
    };
    if let Err(e) = inner.write_record(&rec) {
        // Without its record the workload could never be adopted or found again.
        // Dropping the child hands it to tokio's orphan reaper: no zombie.
        signal_group(pid, libc::SIGKILL);
        drop(child);
        let _ = fs::remove_file(&log_path);
        return Err(e);
    }
    Ok((child, rec))
}

/// Reads one alloc record file; `None` if it vanished meanwhile.
fn load_record(path: &Path) -> Result<Option<AllocRecord>, DriverError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read alloc record", path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| DriverError::CorruptRecord {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// CPU ticks and resident pages of the live members of each group in `pgids`, from
/// one pass over `/proc` (blocking: run it on a blocking thread).
fn scan_groups(pgids: &HashSet<i32>, page_size: u64) -> HashMap<i32, (u64, u64)> {
    let mut out: HashMap<i32, (u64, u64)> = HashMap::new();
    let Ok(all) = procfs::all_processes() else {
        return out;
    };
    for st in all.filter(|st| st.is_alive() && pgids.contains(&st.pgrp)) {
        let e = out.entry(st.pgrp).or_default();
        e.0 += st.cpu_ticks;
        e.1 += procfs::rss_bytes(st.pid, page_size).map_or(0, |b| b / page_size.max(1));
    }
    out
}

#[async_trait]
impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        NAME
    }

    fn exits(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.inner.exits.clone())
    }

    async fn start(&self, spec: &WorkloadSpec) -> Result<WorkloadStatus, DriverError> {
        spec.validate()?;
        let WorkloadKind::Process { command } = &spec.kind else {
            return Err(DriverError::Unsupported {
                driver: NAME,
                what: "a docker image (use the docker driver)".into(),
            });
        };
        let inner = &self.inner;
        let alloc_id = spec.alloc_id.as_str();
        let _guard = inner.lock(alloc_id).await;

        if let Some(old) = inner.read_record(alloc_id)? {
            let status = inner.status_of(&old);
            if status.state.is_live() {
                return Ok(status);
            }
            // It ended; whatever it forked must not outlive it into the new run.
            // Its log stays: the new run appends to it.
            inner.kill_group(&old, Duration::ZERO).await?;
            inner.remove_record(alloc_id)?;
            let base = inner.live().remove(alloc_id).map_or(0, |l| l.log_base);
            inner
                .live()
                .entry(alloc_id.to_string())
                .or_default()
                .log_base = base;
        }
        // Forking, opening the log and the fsync of the record block: off the async
        // workers, so a thousand starts do not stall the API or the agent loop.
        let (child, rec) = {
            let _slot = inner
                .launch_slots
                .acquire()
                .await
                .map_err(|e| DriverError::Io {
                    what: "start workload",
                    path: inner.record_path(alloc_id),
                    source: io::Error::other(e),
                })?;
            let inner = Arc::clone(&self.inner);
            let spec = spec.clone();
            let command = command.clone();
            tokio::task::spawn_blocking(move || launch(&inner, &spec, &command))
                .await
                .map_err(|e| DriverError::Io {
                    what: "start workload",
                    path: self.inner.record_path(alloc_id),
                    source: io::Error::other(e),
                })??
        };
        let mut child = child;
        let pid = rec.pid;
        {
            let mut live = inner.live();
            let l = live.entry(alloc_id.to_string()).or_default();
            *l = Live {
                watched_pid: Some(pid),
                log_base: l.log_base,
                ..Live::default()
            };
        }

        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let watched_alloc = alloc_id.to_string();
        tokio::spawn(async move {
            // Reaps the child (no zombie) whatever happens to the driver.
            let res = child.wait().await;
            let Some(inner) = weak.upgrade() else { return };
            match res {
                Ok(st) => {
                    inner
                        .record_exit(&watched_alloc, pid, ExitRecord::from_status(st))
                        .await
                }
                Err(e) => {
                    tracing::warn!(alloc_id = %watched_alloc, pid, error = %e, "cannot wait for workload")
                }
            }
        });
        tracing::info!(alloc_id, pid, program = %command[0], "started process workload");
        Ok(inner.status_of(&rec))
    }

    async fn stop(&self, alloc_id: &str, grace: Duration) -> Result<(), DriverError> {
        check_alloc_id(alloc_id)?;
        let inner = &self.inner;
        let _guard = inner.lock(alloc_id).await;
        let rec = match inner.read_record(alloc_id) {
            Ok(Some(rec)) => rec,
            Ok(None) => {
                // Unknown here; files left under its name (e.g. written after this
                // driver opened) go, so the slot can start afresh.
                inner.remove_files(alloc_id)?;
                return Ok(());
            }
            Err(e @ DriverError::CorruptRecord { .. }) => {
                // Unreadable record: the pid cannot be trusted, so nothing is signalled;
                // removing the files lets the slot be started afresh.
                tracing::warn!(alloc_id, error = %e, "removing unreadable alloc record");
                inner.remove_files(alloc_id)?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        inner.kill_group(&rec, grace).await?;
        inner.remove_files(alloc_id)?;
        inner.live().remove(alloc_id);
        inner.forget_lock(alloc_id);
        tracing::info!(alloc_id, pid = rec.pid, "stopped process workload");
        Ok(())
    }

    async fn status(&self, alloc_id: &str) -> Result<Option<WorkloadStatus>, DriverError> {
        check_alloc_id(alloc_id)?;
        Ok(self
            .inner
            .read_record(alloc_id)?
            .map(|rec| self.inner.status_of(&rec)))
    }

    async fn list(&self) -> Result<Vec<WorkloadStatus>, DriverError> {
        let inner = &self.inner;
        let recs: Vec<AllocRecord> = inner.records().values().cloned().collect();
        let mut out: Vec<WorkloadStatus> = recs.iter().map(|r| inner.status_of(r)).collect();
        out.sort_by(|a, b| a.alloc_id.cmp(&b.alloc_id));
        Ok(out)
    }

    async fn usage(&self, alloc_id: &str) -> Result<Option<Usage>, DriverError> {
        check_alloc_id(alloc_id)?;
        let mut all = self.usage_many(&[alloc_id.to_string()]).await?;
        Ok(all.remove(alloc_id))
    }

    async fn usage_many(
        &self,
        alloc_ids: &[String],
    ) -> Result<HashMap<String, Usage>, DriverError> {
        let inner = self.inner.clone();
        let mut live: Vec<AllocRecord> = Vec::new();
        for id in alloc_ids {
            check_alloc_id(id)?;
            if let Some(rec) = inner.read_record(id)? {
                if inner.status_of(&rec).state.is_live() {
                    live.push(rec);
                }
            }
        }
        if live.is_empty() {
            return Ok(HashMap::new());
        }
        let pgids: HashSet<i32> = live.iter().map(|r| r.pid).collect();
        let page_size = inner.page_size;
        let totals = tokio::task::spawn_blocking(move || scan_groups(&pgids, page_size))
            .await
            .map_err(|e| DriverError::Io {
                what: "scan /proc",
                path: PathBuf::from("/proc"),
                source: io::Error::other(e.to_string()),
            })?;
        Ok(live
            .iter()
            .map(|rec| {
                let (ticks, pages) = totals.get(&rec.pid).copied().unwrap_or_default();
                (rec.alloc_id.clone(), inner.usage_of(rec, ticks, pages))
            })
            .collect())
    }

    async fn logs(&self, alloc_id: &str, query: LogQuery) -> Result<LogChunk, DriverError> {
        check_alloc_id(alloc_id)?;
        let inner = &self.inner;
        if inner.read_record(alloc_id)?.is_none() {
            return Err(DriverError::NotFound {
                driver: NAME,
                alloc_id: alloc_id.to_string(),
            });
        }
        let path = inner.log_path(alloc_id);
        let base = inner.live().get(alloc_id).map_or(0, |l| l.log_base);
        let read_path = path.clone();
        tokio::task::spawn_blocking(move || logfile::read(&read_path, base, query))
            .await
            .map_err(|e| io_err("read log", &path)(io::Error::other(e.to_string())))?
            .map_err(|e| io_err("read log", &path)(e))
    }

    async fn housekeep(&self) -> Result<(), DriverError> {
        let inner = self.inner.clone();
        let ids: Vec<String> = inner.records().keys().cloned().collect();
        tokio::task::spawn_blocking(move || {
            for id in ids {
                inner.rotate_log(&id);
            }
        })
        .await
        .map_err(|e| DriverError::Io {
            what: "rotate logs",
            path: PathBuf::new(),
            source: io::Error::other(e.to_string()),
        })
    }

    async fn exec(&self, alloc_id: &str, command: &[String]) -> Result<i32, DriverError> {
        check_alloc_id(alloc_id)?;
        let Some(rec) = self.inner.read_record(alloc_id)? else {
            return Err(DriverError::NotFound {
                driver: NAME,
                alloc_id: alloc_id.to_string(),
            });
        };
        let Some(program) = command.first() else {
            return Err(DriverError::InvalidSpec {
                alloc_id: alloc_id.to_string(),
                reason: "empty health-check command".into(),
            });
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&command[1..])
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
            )
            .env("SHOAL_ALLOC_ID", alloc_id)
            .env("SHOAL_SERVICE", &rec.service)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for (i, (name, host)) in rec.ports.iter().enumerate() {
            cmd.env(port_env_name(name), host.to_string());
            if i == 0 {
                cmd.env("PORT", host.to_string());
            }
        }
        let status = cmd.status().await.map_err(|e| DriverError::Io {
            what: "run health check",
            path: PathBuf::from(program),
            source: e,
        })?;
        Ok(status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests::spec;

    /// Two readings a few ms apart (the autoscaler's and the regular one) give the
    /// same percentage instead of a 0% or 100%+ from a window of a tick or two.
    #[tokio::test]
    async fn cpu_is_never_computed_over_a_window_of_a_few_ticks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = ProcessDriver::new(dir.path()).expect("driver");
        driver
            .start(&spec("busy", &["sh", "-c", "while :; do :; done"]))
            .await
            .expect("start");
        let cpu = |u: Option<Usage>| u.expect("usage").cpu_percent;
        let _first = cpu(driver.usage("busy").await.expect("usage"));
        tokio::time::sleep(Duration::from_millis(600)).await;
        let a = cpu(driver.usage("busy").await.expect("usage"));
        let b = cpu(driver.usage("busy").await.expect("usage"));
        assert_eq!(a, b, "a reading right after another repeats it");
        assert!(a > 30.0, "a busy loop over 600 ms reads {a}%");
        driver
            .stop("busy", Duration::from_secs(1))
            .await
            .expect("stop");
    }

    /// Stale records must not be adopted: the pid is gone, or belongs to a stranger.
    #[tokio::test]
    async fn stale_records_are_not_adopted_and_strangers_are_not_signalled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = ProcessDriver::new(dir.path()).expect("driver");

        // A stranger: not started by the driver; its pid is put in a forged record.
        let mut stranger = std::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .expect("spawn sleep");
        let stranger_pid = stranger.id() as i32;
        let real = procfs::read_stat(stranger_pid).expect("stranger stat");

        // A process that has exited and been reaped: its pid names nobody now.
        let mut gone = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let gone_pid = gone.id() as i32;
        gone.wait().expect("wait true");

        let forge = |alloc: &str, pid: i32, start_ticks: u64| AllocRecord {
            alloc_id: alloc.into(),
            service: "web".into(),
            slot: 0,
            version: 1,
            command: vec!["sleep".into(), "300".into()],
            pid,
            start_ticks,
            boot_id: driver.inner.boot_id.clone(),
            started_at_ms: 1,
            ports: vec![],
            exit: None,
        };
        driver
            .inner
            .write_record(&forge("reused", stranger_pid, real.start_ticks + 1))
            .expect("write");
        driver
            .inner
            .write_record(&forge("gone", gone_pid, 1))
            .expect("write");

        let again = ProcessDriver::new(dir.path()).expect("driver");
        let listed = again.list().await.expect("list");
        assert_eq!(listed.len(), 2);
        for st in &listed {
            assert_eq!(st.state, RunState::Exited { code: None }, "{st:?}");
        }
        assert_eq!(again.usage("reused").await.expect("usage"), None);

        // Starting the stale alloc anew must not touch the stranger either.
        let restarted = again
            .start(&spec("reused", &["sleep", "300"]))
            .await
            .expect("start");
        assert_ne!(restarted.handle, stranger_pid.to_string());

        again
            .stop("reused", Duration::from_millis(100))
            .await
            .expect("stop");
        again
            .stop("gone", Duration::from_millis(100))
            .await
            .expect("stop");
        assert!(again.list().await.expect("list").is_empty());
        let st = procfs::read_stat(stranger_pid).expect("stranger still exists");
        assert!(st.is_alive(), "the stranger was signalled");

        stranger.kill().expect("kill stranger");
        stranger.wait().expect("reap stranger");
    }

    #[tokio::test]
    async fn a_corrupt_record_does_not_hide_others_and_stop_clears_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = ProcessDriver::new(dir.path()).expect("driver");
        fs::write(dir.path().join("allocs/bad.json"), b"{not json").expect("write");
        driver
            .start(&spec("good", &["sleep", "300"]))
            .await
            .expect("start");
        let listed = driver.list().await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].alloc_id, "good");
        driver.stop("bad", Duration::ZERO).await.expect("stop bad");
        assert!(!dir.path().join("allocs/bad.json").exists());
        driver
            .stop("good", Duration::from_secs(1))
            .await
            .expect("stop good");
    }
}
