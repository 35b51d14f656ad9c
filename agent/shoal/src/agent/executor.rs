//! The executor: runs the allocations the slots assign to this node.
//!
//! One task, separate from the driver task so slow container operations never
//! delay gossip. The driver task hands it the set of allocations this node must
//! run (a [`watch`] of [`Desired`]); the executor starts what is missing through
//! the runtime driver of each workload's kind, stops what is no longer wanted
//! (orphans), health-checks what runs, restarts what ended according to the
//! service's restart policy (with exponential backoff), samples CPU and memory,
//! and sends an [`AllocReport`] per allocation back whenever it changes. The
//! driver task publishes those under `node/<me>/alloc/<id>`.
//!
//! On start it first lists what the drivers already run for this node (containers
//! by label, processes by pid file) and adopts it: an allocation the slots still
//! name keeps running untouched; one they do not name is stopped once the agent's
//! view of the cluster has settled.
//!
//! Driver calls (start, stop, probes, usage) run in spawned tasks whose results
//! come back on a channel, so one slow container never holds up the others.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use shoal_orch::{AllocReport, AllocState, HealthCheck, Probe, RestartPolicy};
use shoal_runtime::{
    Driver as Runtime, Protocol, RunState, Usage, WorkloadKind, WorkloadSpec, WorkloadStatus,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use shoal_api::human_bytes;

/// How often driver state is polled and due work is done.
const TICK: Duration = Duration::from_millis(250);
/// How often CPU and memory are sampled.
const USAGE_EVERY: Duration = Duration::from_secs(5);
/// How often replicas of autoscaled services are sampled (and their custom metrics
/// scraped), and at most how often their metrics are republished: fast enough for
/// the autoscaler's reaction goal, and no faster.
const AUTOSCALED_EVERY: Duration = Duration::from_secs(1);
/// A scrape of a replica's Prometheus endpoint gives up after this long.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(800);
/// At most this much of a metrics page is read.
const SCRAPE_MAX_BYTES: usize = 1 << 20;
/// A report whose only change is pull progress is republished at most this often.
const PULL_EVERY: Duration = Duration::from_secs(1);
/// A report whose only change is CPU or memory is republished at most this often.
const METRICS_EVERY: Duration = Duration::from_secs(10);
/// How long after a start a replica's listening address is looked up every tick,
/// until it is known.
const SCOPE_FRESH: Duration = Duration::from_secs(30);
/// How often drivers rotate logs and do other upkeep.
const HOUSEKEEP_EVERY: Duration = Duration::from_secs(2);
/// Running this long without ending resets the restart backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(60);
/// Grace between SIGTERM (or `docker stop`) and a kill.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// One allocation this node must run.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredAlloc {
    /// What to run, or why it cannot be run here (e.g. its spec version is gone).
    pub workload: Result<WorkloadSpec, Unrunnable>,
    /// Health check of its spec.
    pub health: Option<HealthCheck>,
    /// Restart policy of its spec.
    pub restart: RestartPolicy,
    /// How long it keeps running out of discovery before a stop (zero: stop at once).
    pub stop_delay: Duration,
    /// Its service is autoscaled: sample it every second and scrape these metrics.
    pub autoscaled: Option<Scrape>,
}

/// A slot this node cannot run (yet), and why. Its service, slot and version
/// still go into its report, so `ps` shows the reason on the right service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrunnable {
    /// The slot's service.
    pub service: String,
    /// The slot.
    pub slot: u32,
    /// The spec version the slot names.
    pub version: u64,
    /// Why it cannot run.
    pub reason: String,
}

/// What the autoscaler needs read from a replica besides CPU and memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scrape {
    /// Custom metrics (Prometheus names) to read; empty: none.
    pub metrics: Vec<String>,
    /// The port (by name) serving them.
    pub port: Option<String>,
    /// The path of the Prometheus text page.
    pub path: String,
}

/// Everything this node must run, from the driver task.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// By alloc id.
    pub allocs: BTreeMap<String, DesiredAlloc>,
    /// True once the agent's view of the cluster has settled after start: only then
    /// are workloads that no slot names stopped.
    pub settled: bool,
}

/// What the executor tells the driver task.
#[derive(Debug, Clone)]
pub enum ExecEvent {
    /// Publish (or with `None` delete) the report of an allocation.
    Report(String, Option<Box<AllocReport>>),
    /// Adoption is done: every report this node should have is now published, so
    /// older reports of this node found in the cluster state can be deleted.
    Ready,
}

/// The runtime drivers of this node.
#[derive(Clone)]
pub struct Runtimes {
    /// The process driver (always available).
    pub process: Arc<dyn Runtime>,
    /// The docker driver, or why there is none.
    pub docker: Result<Arc<dyn Runtime>, String>,
    /// The same docker driver, for what only Docker has (the images it holds).
    pub engine: Option<Arc<shoal_runtime::DockerDriver>>,
    /// The image task: docker images are pulled from peers before a start.
    pub images: Option<super::images::ImageHandle>,
}

impl Runtimes {
    /// The driver for a workload of `kind`.
    pub fn for_kind(&self, kind: &WorkloadKind) -> Result<Arc<dyn Runtime>, String> {
        match kind {
            WorkloadKind::Process { .. } => Ok(self.process.clone()),
            WorkloadKind::Docker { .. } => self
                .docker
                .clone()
                .map_err(|e| format!("docker is not available on this node: {e}")),
        }
    }

    /// Every available driver.
    pub fn all(&self) -> Vec<Arc<dyn Runtime>> {
        let mut v = vec![self.process.clone()];
        if let Ok(d) = &self.docker {
            v.push(d.clone());
        }
        v
    }

    /// The driver that knows `alloc_id`, with its status.
    pub async fn find(&self, alloc_id: &str) -> Option<(Arc<dyn Runtime>, WorkloadStatus)> {
        for d in self.all() {
            if let Ok(Some(st)) = d.status(alloc_id).await {
                return Some((d, st));
            }
        }
        None
    }
}

/// Where one allocation is in the executor's hands.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// A start is in flight.
    Starting,
    /// Started; the driver's status says how it is.
    Running,
    /// Ended; restart at `until`.
    Backoff { until: Instant },
    /// Ended for good (restart policy), or cannot be run here.
    Done { state: AllocState },
    /// Out of discovery (reported stopping), still running until `until`; then
    /// stopped. Wanted again meanwhile, it simply goes back to `Running`.
    Draining { until: Instant },
    /// A stop is in flight (or retried at the next tick after a failure).
    Stopping { in_flight: bool },
}

struct Alloc {
    desired: Option<DesiredAlloc>,
    driver: Option<Arc<dyn Runtime>>,
    phase: Phase,
    status: Option<WorkloadStatus>,
    restarts: u32,
    consecutive: u32,
    /// Starts in a row the driver refused (reset by a start that succeeds).
    start_failures: u32,
    healthy: bool,
    /// It has been healthy at least once (a later crash is a restart, not a
    /// failed rollout).
    was_healthy: bool,
    failures: u32,
    next_probe: Instant,
    probing: bool,
    started: Instant,
    reason: Option<String>,
    usage: Usage,
    /// Custom metrics from its last scrape.
    custom: BTreeMap<String, f64>,
    /// A scrape is in flight.
    scraping: bool,
    last_scrape: Instant,
    /// It listens on loopback only (`None`: not known yet, nothing listens).
    local_only: Option<bool>,
    service: String,
    slot: u32,
    version: u64,
}

impl Alloc {
    fn new(service: String, slot: u32, version: u64) -> Alloc {
        let now = Instant::now();
        Alloc {
            desired: None,
            driver: None,
            phase: Phase::Starting,
            status: None,
            restarts: 0,
            consecutive: 0,
            start_failures: 0,
            healthy: false,
            was_healthy: false,
            failures: 0,
            next_probe: now,
            probing: false,
            started: now,
            reason: None,
            usage: Usage::default(),
            custom: BTreeMap::new(),
            scraping: false,
            last_scrape: now,
            local_only: None,
            service,
            slot,
            version,
        }
    }
}

enum Done {
    Started(String, Result<WorkloadStatus, String>),
    Stopped(String, Result<(), String>),
    Probed(String, Result<(), String>),
    Usage(Vec<(String, Usage)>),
    /// A scrape of custom metrics (an error keeps the last values and is logged).
    Scraped(String, Result<BTreeMap<String, f64>, String>),
    /// Which allocations listen on loopback only (from one read of the socket tables).
    Scopes(Vec<(String, bool)>),
    Housekept,
}

/// Runs the executor until `desired`'s sender is dropped or `stop` is cancelled.
/// With `drain`, every workload is stopped before returning; otherwise they keep
/// running, to be adopted by the next agent on this node. Driver calls run as tasks
/// of `tracker`.
pub async fn run(
    runtimes: Runtimes,
    endpoint_ip: IpAddr,
    mut desired: watch::Receiver<Desired>,
    events: mpsc::Sender<ExecEvent>,
    stop: CancellationToken,
    drain: bool,
    tracker: TaskTracker,
) {
    let (done_tx, mut done_rx) = mpsc::channel::<Done>(256);
    let mut ex = Executor {
        runtimes,
        endpoint_ip,
        allocs: HashMap::new(),
        published: HashMap::new(),
        done_tx,
        events,
        settled: false,
        last_usage: Instant::now(),
        last_fast_usage: Instant::now(),
        last_housekeep: Instant::now(),
        sampling: false,
        housekeeping: false,
        scoping: false,
        last_scope: Instant::now(),
        tracker,
        http: reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(1)
            .build()
            .unwrap_or_default(),
    };
    ex.adopt().await;
    ex.apply(&desired.borrow_and_update().clone());
    ex.publish().await;
    let _ = ex.events.send(ExecEvent::Ready).await;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A workload that ends is looked at at once, not at the next tick.
    let exits = ex
        .runtimes
        .process
        .exits()
        .unwrap_or_else(|| Arc::new(tokio::sync::Notify::new()));
    loop {
        let due = ex.next_due();
        tokio::select! {
            changed = desired.changed() => {
                if changed.is_err() {
                    break;
                }
                let d = desired.borrow_and_update().clone();
                ex.apply(&d);
            }
            Some(done) = done_rx.recv() => ex.on_done(done),
            _ = tick.tick() => ex.poll().await,
            () = exits.notified() => ex.poll().await,
            () = tokio::time::sleep_until(due) => ex.on_due(Instant::now()),
            () = stop.cancelled() => break,
        }
        ex.publish().await;
    }
    if drain {
        ex.drain().await;
    }
}

struct Executor {
    runtimes: Runtimes,
    endpoint_ip: IpAddr,
    allocs: HashMap<String, Alloc>,
    published: HashMap<String, (AllocReport, Instant)>,
    done_tx: mpsc::Sender<Done>,
    events: mpsc::Sender<ExecEvent>,
    settled: bool,
    last_usage: Instant,
    last_fast_usage: Instant,
    last_housekeep: Instant,
    /// A usage sample is in flight.
    sampling: bool,
    /// Driver upkeep is in flight.
    housekeeping: bool,
    /// A read of the socket tables is in flight.
    scoping: bool,
    last_scope: Instant,
    /// Where driver calls run.
    tracker: TaskTracker,
    /// One HTTP client for every health probe (building one per probe costs more
    /// than the probe).
    http: reqwest::Client,
}

impl Executor {
    /// Takes over what the drivers already run for this node.
    async fn adopt(&mut self) {
        for driver in self.runtimes.all() {
            match driver.list().await {
                Ok(list) => {
                    for st in list {
                        tracing::info!(alloc = %st.alloc_id, driver = driver.name(), "found a running workload");
                        let mut a = Alloc::new(st.service.clone(), st.slot, st.version);
                        a.driver = Some(driver.clone());
                        a.phase = Phase::Running;
                        a.started = Instant::now()
                            .checked_sub(Duration::from_millis(
                                super::wall_ms().saturating_sub(st.started_at_ms),
                            ))
                            .unwrap_or_else(Instant::now);
                        a.status = Some(st.clone());
                        self.allocs.insert(st.alloc_id.clone(), a);
                    }
                }
                Err(e) => tracing::warn!(driver = driver.name(), "listing workloads failed: {e}"),
            }
        }
    }

    /// Takes a new desired set: claims adopted workloads, starts new ones, and
    /// stops the rest (once settled).
    fn apply(&mut self, d: &Desired) {
        self.settled = d.settled;
        let mut restart = Vec::new();
        for (id, want) in &d.allocs {
            match self.allocs.get_mut(id) {
                Some(a) => {
                    // It could not start for want of its spec (the slot arrived
                    // before the service record, e.g. right after a re-deploy):
                    // now that the spec is known, start it.
                    let unrunnable = a.desired.as_ref().is_some_and(|d| d.workload.is_err());
                    if let Ok(w) = &want.workload {
                        // The steward may move a running allocation to a newer
                        // version whose spec runs the same workload (a rollback):
                        // it keeps running and reports the new version.
                        (a.service, a.slot, a.version) = (w.service.clone(), w.slot, w.version);
                        if unrunnable && matches!(a.phase, Phase::Done { .. }) {
                            restart.push(id.clone());
                        }
                    }
                    if a.desired.is_none() {
                        if let Some(st) = &a.status {
                            tracing::info!(alloc = %id, handle = %st.handle, "adopted");
                        }
                        // It ended before anyone wanted it (e.g. it crashed while the
                        // agent was down): now that a slot names it, run it again.
                        if matches!(a.phase, Phase::Done { .. }) {
                            restart.push(id.clone());
                        }
                    }
                    if matches!(a.phase, Phase::Draining { .. }) {
                        tracing::info!(alloc = %id, "wanted again while leaving discovery: kept");
                        a.phase = Phase::Running;
                        a.reason = None;
                    }
                    a.desired = Some(want.clone());
                }
                // Before the view settles, the slots may be stale (restored from
                // disk): adopt what runs, but start nothing new yet.
                None if !d.settled => {}
                None => {
                    let (service, slot, version) = match &want.workload {
                        Ok(w) => (w.service.clone(), w.slot, w.version),
                        Err(u) => (u.service.clone(), u.slot, u.version),
                    };
                    let mut a = Alloc::new(service, slot, version);
                    a.desired = Some(want.clone());
                    self.allocs.insert(id.clone(), a);
                    self.start(id);
                }
            }
        }
        let unwanted: Vec<String> = self
            .allocs
            .iter()
            .filter(|(id, a)| {
                !d.allocs.contains_key(*id)
                    && (a.desired.is_some() || self.settled)
                    && !matches!(a.phase, Phase::Stopping { .. } | Phase::Draining { .. })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in unwanted {
            self.stop(&id);
        }
        for id in restart {
            self.start(&id);
        }
    }

    fn start(&mut self, id: &str) {
        let Some(a) = self.allocs.get_mut(id) else {
            return;
        };
        let Some(want) = a.desired.clone() else {
            return;
        };
        let spec = match want.workload {
            Ok(s) => s,
            Err(u) => {
                tracing::warn!(alloc = %id, "cannot start: {}", u.reason);
                a.phase = Phase::Done {
                    state: AllocState::Failed,
                };
                a.reason = Some(u.reason);
                return;
            }
        };
        let driver = match self.runtimes.for_kind(&spec.kind) {
            Ok(d) => d,
            Err(reason) => {
                a.phase = Phase::Done {
                    state: AllocState::Failed,
                };
                a.reason = Some(reason);
                return;
            }
        };
        a.driver = Some(driver.clone());
        a.phase = Phase::Starting;
        a.healthy = false;
        a.failures = 0;
        a.status = None;
        let tx = self.done_tx.clone();
        let id = id.to_string();
        // A docker image the engine lacks is pulled from peers first (the report
        // says `pulling` meanwhile).
        let images = match &spec.kind {
            WorkloadKind::Docker { image, .. } => {
                self.runtimes.images.clone().map(|h| (h, image.clone()))
            }
            WorkloadKind::Process { .. } => None,
        };
        self.tracker.spawn(async move {
            let pulled = match &images {
                Some((h, image)) => h.ensure(image).await,
                None => Ok(()),
            };
            let r = match pulled {
                Ok(()) => driver.start(&spec).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            let _ = tx.send(Done::Started(id, r)).await;
        });
    }

    fn stop(&mut self, id: &str) {
        let Some(a) = self.allocs.get_mut(id) else {
            return;
        };
        let delay = a.desired.take().map_or(Duration::ZERO, |d| d.stop_delay);
        if !delay.is_zero() && a.phase == Phase::Running && a.healthy {
            // In discovery until now: leave it first (the report says `stopping`),
            // keep serving while clients and proxies catch up, then stop.
            tracing::info!(alloc = %id, "leaving discovery; stopping in {}", human(delay));
            a.phase = Phase::Draining {
                until: Instant::now() + delay,
            };
            a.reason = Some(format!("left discovery; stopping in {}", human(delay)));
            return;
        }
        self.stop_now(id);
    }

    /// Stops `id` through its driver (no delay).
    fn stop_now(&mut self, id: &str) {
        let Some(a) = self.allocs.get_mut(id) else {
            return;
        };
        a.desired = None;
        // Nothing was (or is being) started: nothing to stop.
        let Some(driver) = a.driver.clone() else {
            self.allocs.remove(id);
            return;
        };
        if a.phase == Phase::Starting {
            // Let the start land first; the `Started` handler sees no desire and stops.
            return;
        }
        a.phase = Phase::Stopping { in_flight: true };
        a.healthy = false;
        let tx = self.done_tx.clone();
        let id = id.to_string();
        self.tracker.spawn(async move {
            let r = driver
                .stop(&id, STOP_GRACE)
                .await
                .map_err(|e| e.to_string());
            let _ = tx.send(Done::Stopped(id, r)).await;
        });
    }

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Started(id, r) => {
                let Some(a) = self.allocs.get_mut(&id) else {
                    return;
                };
                if a.desired.is_none() {
                    // Unwanted while it started.
                    a.phase = Phase::Running;
                    self.stop(&id);
                    return;
                }
                match r {
                    Ok(st) => {
                        tracing::info!(alloc = %id, handle = %st.handle, "started");
                        a.phase = Phase::Running;
                        a.started = Instant::now();
                        a.next_probe = Instant::now();
                        a.status = Some(st);
                        a.reason = None;
                        a.start_failures = 0;
                    }
                    Err(e) => {
                        tracing::warn!(alloc = %id, "start failed: {e}");
                        a.start_failures = a.start_failures.saturating_add(1);
                        self.ended(&id, false, format!("start failed: {e}"));
                    }
                }
            }
            Done::Stopped(id, r) => match r {
                Ok(()) => {
                    tracing::info!(alloc = %id, "stopped");
                    let wanted_again = self.allocs.get(&id).is_some_and(|a| a.desired.is_some());
                    if wanted_again {
                        // A slot named it again while it stopped (a flapping view).
                        self.start(&id);
                    } else {
                        self.allocs.remove(&id);
                    }
                }
                Err(e) => {
                    tracing::warn!(alloc = %id, "stop failed, retrying: {e}");
                    if let Some(a) = self.allocs.get_mut(&id) {
                        a.phase = Phase::Stopping { in_flight: false };
                        a.reason = Some(format!("stop failed: {e}"));
                    }
                }
            },
            Done::Probed(id, r) => {
                let Some(a) = self.allocs.get_mut(&id) else {
                    return;
                };
                a.probing = false;
                if a.phase != Phase::Running {
                    return;
                }
                let Some(check) = a.desired.as_ref().and_then(|d| d.health.clone()) else {
                    return;
                };
                match r {
                    Ok(()) => {
                        a.healthy = true;
                        a.was_healthy = true;
                        a.failures = 0;
                        if a.reason.as_deref().is_some_and(|r| r.starts_with("health")) {
                            a.reason = None;
                        }
                    }
                    Err(e) => {
                        if a.started.elapsed() < check.grace && !a.healthy {
                            // Still starting up: failures do not count yet.
                            return;
                        }
                        a.failures += 1;
                        if a.failures >= check.retries {
                            a.healthy = false;
                            a.reason = Some(format!("health check failed: {e}"));
                        }
                    }
                }
            }
            Done::Housekept => self.housekeeping = false,
            Done::Scopes(list) => {
                self.scoping = false;
                for (id, local) in list {
                    if let Some(a) = self.allocs.get_mut(&id) {
                        a.local_only = Some(local);
                    }
                }
            }
            Done::Scraped(id, r) => {
                if let Some(a) = self.allocs.get_mut(&id) {
                    a.scraping = false;
                    match r {
                        Ok(m) => a.custom = m,
                        Err(e) => tracing::debug!(alloc = %id, "scraping metrics failed: {e}"),
                    }
                }
            }
            Done::Usage(list) => {
                self.sampling = false;
                for (id, u) in list {
                    if let Some(a) = self.allocs.get_mut(&id) {
                        a.usage = u;
                    }
                }
            }
        }
    }

    /// An allocation ended (or failed to start): restart it per its policy.
    fn ended(&mut self, id: &str, succeeded: bool, why: String) {
        let Some(a) = self.allocs.get_mut(id) else {
            return;
        };
        a.healthy = false;
        let policy = a
            .desired
            .as_ref()
            .map(|d| d.restart)
            .unwrap_or_else(|| RestartPolicy {
                mode: shoal_orch::RestartMode::Never,
                backoff: Duration::ZERO,
                backoff_max: Duration::ZERO,
            });
        if a.started.elapsed() >= BACKOFF_RESET {
            a.consecutive = 0;
        }
        if policy.should_restart(succeeded) {
            let delay = policy.delay(a.consecutive);
            a.phase = Phase::Backoff {
                until: Instant::now() + delay,
            };
            a.reason = Some(format!("{why}; restarting in {}", human(delay)));
        } else {
            a.phase = Phase::Done {
                state: if succeeded {
                    AllocState::Exited
                } else {
                    AllocState::Failed
                },
            };
            a.reason = Some(why);
        }
    }

    /// Polls driver state, restarts what is due, probes and samples usage.
    async fn poll(&mut self) {
        let mut seen: HashMap<String, WorkloadStatus> = HashMap::new();
        let mut listed_ok = Vec::new();
        for driver in self.runtimes.all() {
            match driver.list().await {
                Ok(list) => {
                    listed_ok.push(driver.name());
                    seen.extend(list.into_iter().map(|s| (s.alloc_id.clone(), s)));
                }
                Err(e) => tracing::debug!(driver = driver.name(), "listing failed: {e}"),
            }
        }
        let now = Instant::now();
        let ids: Vec<String> = self.allocs.keys().cloned().collect();
        for id in ids {
            let Some(a) = self.allocs.get_mut(&id) else {
                continue;
            };
            match a.phase.clone() {
                Phase::Running => {
                    let Some(driver_name) = a.driver.as_ref().map(|d| d.name()) else {
                        continue;
                    };
                    if !listed_ok.contains(&driver_name) {
                        continue;
                    }
                    match seen.get(&id) {
                        Some(st) => {
                            let state = st.state.clone();
                            a.status = Some(st.clone());
                            match state {
                                RunState::Running | RunState::Starting => {}
                                RunState::Exited { code } => {
                                    let why = match code {
                                        Some(c) => format!("exited with code {c}"),
                                        None => "exited".to_string(),
                                    };
                                    tracing::info!(alloc = %id, "{why}");
                                    self.ended(&id, code == Some(0), why);
                                }
                                RunState::Failed { reason } => {
                                    tracing::info!(alloc = %id, "failed: {reason}");
                                    self.ended(&id, false, reason);
                                }
                            }
                        }
                        None => {
                            if a.desired.is_some() {
                                self.ended(&id, false, "the workload vanished".into());
                            } else {
                                self.allocs.remove(&id);
                            }
                        }
                    }
                }
                Phase::Backoff { until } if now >= until => {
                    a.restarts += 1;
                    a.consecutive += 1;
                    self.start(&id);
                }
                Phase::Draining { until } if now >= until => self.stop_now(&id),
                Phase::Stopping { in_flight: false } => self.stop_now(&id),
                _ => {}
            }
        }
        self.probe_due(now);
        self.scope_due();
        if self.last_usage.elapsed() >= USAGE_EVERY {
            self.last_usage = Instant::now();
            self.last_fast_usage = self.last_usage;
            self.sample_usage(false);
        } else if self.last_fast_usage.elapsed() >= AUTOSCALED_EVERY {
            self.last_fast_usage = Instant::now();
            self.sample_usage(true);
        }
        self.scrape_due(now);
        if self.last_housekeep.elapsed() >= HOUSEKEEP_EVERY {
            self.last_housekeep = Instant::now();
            self.housekeep();
        }
    }

    /// When the next probe, restart or end of a stop delay is due (at most a tick away).
    fn next_due(&self) -> Instant {
        let mut due = Instant::now() + TICK;
        for a in self.allocs.values() {
            let at = match a.phase {
                // Exactly the allocations `probe_due` would probe (so a due time in
                // the past always moves on).
                Phase::Running
                    if !a.probing
                        && a.desired.as_ref().is_some_and(|d| d.health.is_some())
                        && a.status
                            .as_ref()
                            .is_some_and(|s| s.state == RunState::Running) =>
                {
                    a.next_probe
                }
                Phase::Backoff { until } | Phase::Draining { until } => until,
                _ => continue,
            };
            due = due.min(at);
        }
        due
    }

    /// Does what is due by the clock alone (probes, restarts, stops after a delay),
    /// without asking the drivers what runs.
    fn on_due(&mut self, now: Instant) {
        let due: Vec<(String, Phase)> = self
            .allocs
            .iter()
            .filter(|(_, a)| match a.phase {
                Phase::Backoff { until } | Phase::Draining { until } => now >= until,
                _ => false,
            })
            .map(|(id, a)| (id.clone(), a.phase.clone()))
            .collect();
        for (id, phase) in due {
            match phase {
                Phase::Backoff { .. } => {
                    if let Some(a) = self.allocs.get_mut(&id) {
                        a.restarts += 1;
                        a.consecutive += 1;
                    }
                    self.start(&id);
                }
                Phase::Draining { .. } => self.stop_now(&id),
                _ => {}
            }
        }
        self.probe_due(now);
    }

    fn probe_due(&mut self, now: Instant) {
        for (id, a) in &mut self.allocs {
            if a.phase != Phase::Running || a.probing || now < a.next_probe {
                continue;
            }
            let running = a
                .status
                .as_ref()
                .is_some_and(|s| s.state == RunState::Running);
            let Some(check) = a.desired.as_ref().and_then(|d| d.health.clone()) else {
                // Without a health check a running workload is healthy.
                a.healthy = running;
                a.was_healthy |= running;
                continue;
            };
            if !running {
                continue;
            }
            a.next_probe = now + check.interval;
            a.probing = true;
            let ports = a
                .status
                .as_ref()
                .map(|s| s.ports.clone())
                .unwrap_or_default();
            let driver = a.driver.clone();
            let tx = self.done_tx.clone();
            let id = id.clone();
            let http = self.http.clone();
            self.tracker.spawn(async move {
                let r = tokio::time::timeout(
                    check.timeout,
                    probe(&http, &check.probe, &ports, driver, &id),
                )
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {}", human(check.timeout))));
                let _ = tx.send(Done::Probed(id, r)).await;
            });
        }
    }

    /// Samples CPU and memory of every running allocation (with `only_autoscaled`,
    /// of those of autoscaled services) off the executor task: one `usage_many` call
    /// per driver (one pass over `/proc` for processes).
    fn sample_usage(&mut self, only_autoscaled: bool) {
        if self.sampling {
            return; // The previous pass is still running (a slow host): skip a beat.
        }
        let mut by_driver: Vec<(Arc<dyn Runtime>, Vec<String>)> = Vec::new();
        for (id, a) in &self.allocs {
            if a.phase != Phase::Running {
                continue;
            }
            if only_autoscaled && a.desired.as_ref().is_none_or(|d| d.autoscaled.is_none()) {
                continue;
            }
            let Some(d) = a.driver.clone() else { continue };
            match by_driver.iter_mut().find(|(x, _)| x.name() == d.name()) {
                Some((_, ids)) => ids.push(id.clone()),
                None => by_driver.push((d, vec![id.clone()])),
            }
        }
        if by_driver.is_empty() {
            return;
        }
        self.sampling = true;
        let tx = self.done_tx.clone();
        self.tracker.spawn(async move {
            let mut out = Vec::new();
            for (d, ids) in by_driver {
                match d.usage_many(&ids).await {
                    Ok(map) => out.extend(map),
                    Err(e) => tracing::debug!(driver = d.name(), "sampling usage failed: {e}"),
                }
            }
            let _ = tx.send(Done::Usage(out)).await;
        });
    }

    /// Scrapes the custom metrics of running replicas of autoscaled services that name
    /// some, at most every [`AUTOSCALED_EVERY`], each in a task of its own.
    fn scrape_due(&mut self, now: Instant) {
        for (id, a) in &mut self.allocs {
            if a.phase != Phase::Running || a.scraping {
                continue;
            }
            if now.duration_since(a.last_scrape) < AUTOSCALED_EVERY {
                continue;
            }
            let Some(scrape) = a.desired.as_ref().and_then(|d| d.autoscaled.clone()) else {
                continue;
            };
            if scrape.metrics.is_empty() {
                continue;
            }
            let ports = a
                .status
                .as_ref()
                .map(|s| s.ports.clone())
                .unwrap_or_default();
            let port = match &scrape.port {
                Some(name) => ports.iter().find(|(n, _)| n == name).map(|(_, p)| *p),
                None => ports.first().map(|(_, p)| *p),
            };
            let Some(port) = port else { continue };
            a.scraping = true;
            a.last_scrape = now;
            let url = format!("http://127.0.0.1:{port}{}", scrape.path);
            let http = self.http.clone();
            let tx = self.done_tx.clone();
            let id = id.clone();
            self.tracker.spawn(async move {
                let r = tokio::time::timeout(
                    SCRAPE_TIMEOUT,
                    scrape_metrics(&http, &url, &scrape.metrics),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(format!("{url}: no answer within {}", human(SCRAPE_TIMEOUT)))
                });
                let _ = tx.send(Done::Scraped(id, r)).await;
            });
        }
    }

    /// Finds out which running allocations listen on loopback only, with one read of
    /// the socket tables off the executor task: at once for replicas that just
    /// started listening (within their first [`SCOPE_FRESH`]), else every
    /// [`USAGE_EVERY`] (a workload may rebind).
    fn scope_due(&mut self) {
        if self.scoping {
            return;
        }
        let periodic = self.last_scope.elapsed() >= USAGE_EVERY;
        let mut asks: Vec<(String, Vec<(u16, Protocol)>)> = Vec::new();
        let mut fresh = false;
        for (id, a) in &self.allocs {
            if a.phase != Phase::Running {
                continue;
            }
            let Some(spec) = a.desired.as_ref().and_then(|d| d.workload.as_ref().ok()) else {
                continue;
            };
            let ports: Vec<(u16, Protocol)> = a
                .status
                .iter()
                .flat_map(|s| s.ports.iter())
                .filter_map(|(name, host)| {
                    let p = spec.ports.iter().find(|p| &p.name == name)?;
                    Some((*host, p.protocol))
                })
                .collect();
            if ports.is_empty() {
                continue;
            }
            if a.local_only.is_none() && a.started.elapsed() < SCOPE_FRESH {
                fresh = true;
            }
            asks.push((id.clone(), ports));
        }
        if asks.is_empty() || !(fresh || periodic) {
            return;
        }
        self.scoping = true;
        self.last_scope = Instant::now();
        let tx = self.done_tx.clone();
        self.tracker.spawn(async move {
            let read = tokio::task::spawn_blocking(shoal_runtime::Listeners::read).await;
            let out = match read {
                Ok(Ok(l)) => asks
                    .into_iter()
                    .filter_map(|(id, ports)| {
                        let seen: Vec<bool> = ports
                            .iter()
                            .filter_map(|(port, proto)| l.loopback_only(*port, *proto))
                            .collect();
                        (!seen.is_empty()).then(|| (id, seen.iter().all(|b| *b)))
                    })
                    .collect(),
                Ok(Err(e)) => {
                    tracing::debug!("reading the socket tables failed: {e}");
                    Vec::new()
                }
                Err(_) => Vec::new(),
            };
            let _ = tx.send(Done::Scopes(out)).await;
        });
    }

    /// Log rotation and other driver upkeep, off the executor task.
    fn housekeep(&mut self) {
        if self.housekeeping {
            return;
        }
        self.housekeeping = true;
        let drivers = self.runtimes.all();
        let tx = self.done_tx.clone();
        self.tracker.spawn(async move {
            for d in drivers {
                if let Err(e) = d.housekeep().await {
                    tracing::warn!(driver = d.name(), "driver upkeep failed: {e}");
                }
            }
            let _ = tx.send(Done::Housekept).await;
        });
    }

    fn report(&self, a: &Alloc) -> AllocReport {
        let pull = match (&a.phase, &self.runtimes.images) {
            (Phase::Starting, Some(h)) => a
                .desired
                .as_ref()
                .and_then(|d| d.workload.as_ref().ok())
                .and_then(|w| match &w.kind {
                    WorkloadKind::Docker { image, .. } => {
                        h.progress(image).map(|p| (image.clone(), p))
                    }
                    WorkloadKind::Process { .. } => None,
                }),
            _ => None,
        };
        let state = match &a.phase {
            Phase::Starting if pull.is_some() => AllocState::Pulling,
            Phase::Starting => AllocState::Starting,
            Phase::Running => match a.status.as_ref().map(|s| &s.state) {
                Some(RunState::Running) => AllocState::Running,
                _ => AllocState::Starting,
            },
            Phase::Backoff { .. } => AllocState::Failed,
            Phase::Done { state } => *state,
            Phase::Draining { .. } | Phase::Stopping { .. } => AllocState::Stopping,
        };
        let local_only = a.local_only == Some(true);
        let ip = if local_only {
            IpAddr::from([127, 0, 0, 1])
        } else {
            self.endpoint_ip
        };
        let ports = a
            .status
            .as_ref()
            .map(|s| s.ports.clone())
            .unwrap_or_default();
        let endpoint = ports
            .first()
            .map(|(_, port)| SocketAddr::new(ip, *port).to_string());
        AllocReport {
            service: a.service.clone(),
            slot: a.slot,
            version: a.version,
            state,
            healthy: a.healthy && state == AllocState::Running,
            endpoint,
            ports,
            local_only,
            restarts: a.restarts,
            start_failures: a.start_failures,
            was_healthy: a.was_healthy,
            reason: match &pull {
                Some((image, [done, total])) => Some(format!(
                    "pulling image {image} from peers: {} of {}",
                    human_bytes(*done),
                    human_bytes(*total)
                )),
                None => a.reason.clone(),
            },
            pull_bytes: pull.map(|(_, p)| p),
            cpu_percent: (a.usage.cpu_percent * 10.0).round() / 10.0,
            memory_bytes: a.usage.memory_bytes,
            metrics: a.custom.clone(),
            started_ms: a.status.as_ref().map_or(0, |s| s.started_at_ms),
            handle: a.status.as_ref().map(|s| s.handle.clone()),
        }
    }

    /// Sends the reports that changed (metrics-only changes at most every 10 s, or
    /// every second for replicas of autoscaled services).
    async fn publish(&mut self) {
        let mut out = Vec::new();
        for (id, a) in &self.allocs {
            let r = self.report(a);
            let every = if a.desired.as_ref().is_some_and(|d| d.autoscaled.is_some()) {
                AUTOSCALED_EVERY
            } else {
                METRICS_EVERY
            };
            let send = match self.published.get(id) {
                None => true,
                Some((old, at)) => {
                    let mut same = r.clone();
                    same.cpu_percent = old.cpu_percent;
                    same.memory_bytes = old.memory_bytes;
                    same.metrics = old.metrics.clone();
                    // Pull progress is republished once a second, not every tick.
                    let pulling = r.pull_bytes.is_some() && old.pull_bytes.is_some();
                    if pulling {
                        same.pull_bytes = old.pull_bytes;
                        same.reason = old.reason.clone();
                    }
                    let every = if pulling { PULL_EVERY } else { every };
                    same != *old || (r != *old && at.elapsed() >= every)
                }
            };
            if send {
                out.push((id.clone(), Some(r)));
            }
        }
        let gone: Vec<String> = self
            .published
            .keys()
            .filter(|id| !self.allocs.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            out.push((id, None));
        }
        for (id, r) in out {
            match &r {
                Some(r) => {
                    self.published
                        .insert(id.clone(), (r.clone(), Instant::now()));
                }
                None => {
                    self.published.remove(&id);
                }
            }
            if self
                .events
                .send(ExecEvent::Report(id, r.map(Box::new)))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Stops every workload (the agent was asked to drain on exit).
    async fn drain(&mut self) {
        let mut tasks = Vec::new();
        for (id, a) in self.allocs.drain() {
            if let Some(d) = a.driver {
                tasks.push(self.tracker.spawn(async move {
                    if let Err(e) = d.stop(&id, STOP_GRACE).await {
                        tracing::warn!(alloc = %id, "stopping on exit failed: {e}");
                    }
                }));
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// Runs one health probe.
async fn probe(
    http: &reqwest::Client,
    probe: &Probe,
    ports: &[(String, u16)],
    driver: Option<Arc<dyn Runtime>>,
    alloc_id: &str,
) -> Result<(), String> {
    let port_of = |name: &str| {
        ports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .ok_or_else(|| format!("port {name:?} is not bound"))
    };
    match probe {
        Probe::Http { path, port } => {
            let port = port_of(port)?;
            let url = format!("http://127.0.0.1:{port}{path}");
            let resp = http
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {}", crate::client::root_cause(&e)))?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(format!("GET {url}: HTTP {}", resp.status().as_u16()))
            }
        }
        Probe::Tcp { port } => {
            let port = port_of(port)?;
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(|_| ())
                .map_err(|e| format!("connect to port {port}: {e}"))
        }
        Probe::Command { command } => {
            let Some(driver) = driver else {
                return Err("no driver".into());
            };
            match driver.exec(alloc_id, command).await {
                Ok(0) => Ok(()),
                Ok(code) => Err(format!("{} exited with code {code}", command[0])),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

/// `1.5s`, `2m`, for messages.
fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Reads `names` from the Prometheus text page at `url`: each name's samples summed
/// over their labels (so `requests_in_flight{handler="a"}` and `{handler="b"}` add
/// up). A name the page lacks is left out, so it counts as missing, not as 0.
async fn scrape_metrics(
    http: &reqwest::Client,
    url: &str,
    names: &[String],
) -> Result<BTreeMap<String, f64>, String> {
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    let body = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
    if body.len() > SCRAPE_MAX_BYTES {
        return Err(format!("{url}: page larger than {SCRAPE_MAX_BYTES} bytes"));
    }
    let text = String::from_utf8_lossy(&body);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .map_err(|e| format!("{url}: not Prometheus text: {e}"))?;
    let mut out = BTreeMap::new();
    for s in &scrape.samples {
        if !names.contains(&s.metric) {
            continue;
        }
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            // Histograms and summaries have no single value to scale on.
            _ => continue,
        };
        if v.is_finite() {
            *out.entry(s.metric.clone()).or_insert(0.0) += v;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_orch::RestartMode;
    use shoal_runtime::{MemCall, MemDriver, WorkloadKind};

    fn want(id: &str, mode: RestartMode) -> DesiredAlloc {
        DesiredAlloc {
            workload: Ok(WorkloadSpec {
                service: "web".into(),
                slot: 0,
                version: 1,
                alloc_id: id.into(),
                kind: WorkloadKind::Process {
                    command: vec!["web".into()],
                },
                env: BTreeMap::new(),
                ports: Vec::new(),
                cpu_millis: None,
                memory_bytes: None,
                labels: BTreeMap::new(),
            }),
            health: None,
            restart: RestartPolicy {
                mode,
                backoff: Duration::from_millis(10),
                backoff_max: Duration::from_millis(40),
            },
            stop_delay: Duration::ZERO,
            autoscaled: None,
        }
    }

    struct Harness {
        mem: Arc<MemDriver>,
        desired: watch::Sender<Desired>,
        events: mpsc::Receiver<ExecEvent>,
        reports: BTreeMap<String, AllocReport>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        fn start(mem: Arc<MemDriver>, drain: bool) -> Harness {
            let runtimes = Runtimes {
                process: mem.clone(),
                docker: Err("none in tests".into()),
                engine: None,
                images: None,
            };
            let (desired, rx) = watch::channel(Desired::default());
            let (tx, events) = mpsc::channel(256);
            let stop = CancellationToken::new();
            let task = tokio::spawn(run(
                runtimes,
                IpAddr::from([127, 0, 0, 1]),
                rx,
                tx,
                stop.clone(),
                drain,
                TaskTracker::new(),
            ));
            Harness {
                mem,
                desired,
                events,
                reports: BTreeMap::new(),
                stop,
                task,
            }
        }

        fn set(&self, allocs: &[(&str, DesiredAlloc)], settled: bool) {
            let allocs = allocs
                .iter()
                .map(|(id, w)| (id.to_string(), w.clone()))
                .collect();
            self.desired.send_replace(Desired { allocs, settled });
        }

        /// Applies reports until `pred` holds on them (5 s at most).
        async fn until(
            &mut self,
            what: &str,
            pred: impl Fn(&BTreeMap<String, AllocReport>) -> bool,
        ) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while !pred(&self.reports) {
                let ev = tokio::time::timeout_at(deadline, self.events.recv())
                    .await
                    .unwrap_or_else(|_| panic!("timed out waiting for {what}: {:?}", self.reports));
                match ev {
                    Some(ExecEvent::Report(id, Some(r))) => {
                        self.reports.insert(id, *r);
                    }
                    Some(ExecEvent::Report(id, None)) => {
                        self.reports.remove(&id);
                    }
                    Some(ExecEvent::Ready) => {}
                    None => panic!("executor ended while waiting for {what}"),
                }
            }
        }

        async fn shut(self) {
            self.stop.cancel();
            let mut events = self.events;
            // Keep draining so the executor never blocks on a full channel.
            tokio::spawn(async move { while events.recv().await.is_some() {} });
            self.task.await.unwrap();
        }
    }

    fn running(r: &BTreeMap<String, AllocReport>, id: &str) -> bool {
        r.get(id)
            .is_some_and(|r| r.state == AllocState::Running && r.healthy)
    }

    #[tokio::test]
    async fn runs_restarts_and_stops_what_the_slots_say() {
        let mut h = Harness::start(Arc::new(MemDriver::new()), false);
        // Not settled: nothing new starts.
        h.set(&[("a", want("a", RestartMode::Always))], false);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(h.mem.list().await.unwrap().is_empty());
        h.set(&[("a", want("a", RestartMode::Always))], true);
        h.until("a running", |r| running(r, "a")).await;

        // It crashes: restarted with backoff, counted.
        assert!(h.mem.exit("a", Some(1)));
        h.until("a restarted", |r| {
            r.get("a")
                .is_some_and(|r| r.restarts == 1 && r.state == AllocState::Running)
        })
        .await;

        // on-failure: a clean exit stays exited.
        h.set(
            &[
                ("a", want("a", RestartMode::Always)),
                ("b", want("b", RestartMode::OnFailure)),
            ],
            true,
        );
        h.until("b running", |r| running(r, "b")).await;
        assert!(h.mem.exit("b", Some(0)));
        h.until("b exited", |r| {
            r.get("b")
                .is_some_and(|r| r.state == AllocState::Exited && r.restarts == 0)
        })
        .await;

        // No longer named: stopped and its report deleted.
        h.set(&[("b", want("b", RestartMode::OnFailure))], true);
        h.until("a gone", |r| !r.contains_key("a")).await;
        assert!(h.mem.status("a").await.unwrap().is_none());
        h.shut().await;
    }

    #[tokio::test]
    async fn a_slot_whose_spec_arrives_late_starts_once_it_is_known() {
        let mut h = Harness::start(Arc::new(MemDriver::new()), false);
        let mut unknown = want("a", RestartMode::Never);
        unknown.workload = Err(Unrunnable {
            service: "web".into(),
            slot: 0,
            version: 1,
            reason: "spec version 1 of service web is not known here".into(),
        });
        h.set(&[("a", unknown)], true);
        // Refused, and reported as web's slot 0 (where `ps web` looks for it).
        h.until("a refused", |r| {
            r.get("a").is_some_and(|r| {
                r.state == AllocState::Failed
                    && (r.service.as_str(), r.slot, r.version) == ("web", 0, 1)
                    && r.reason.as_deref().is_some_and(|x| x.contains("not known"))
            })
        })
        .await;
        assert!(h.mem.list().await.unwrap().is_empty());
        h.set(&[("a", want("a", RestartMode::Never))], true);
        h.until("a running", |r| running(r, "a")).await;
        h.shut().await;
    }

    #[tokio::test]
    async fn adopts_running_workloads_and_revives_ones_that_ended_meanwhile() {
        let mem = Arc::new(MemDriver::new());
        // What a previous agent left: one running, one that crashed while it was down,
        // and one that no slot names any more.
        for id in ["keep", "dead", "orphan"] {
            mem.start(&want(id, RestartMode::Always).workload.unwrap())
                .await
                .unwrap();
        }
        let keep_handle = mem.status("keep").await.unwrap().unwrap().handle;
        assert!(mem.exit("dead", Some(137)));
        let mut h = Harness::start(mem.clone(), false);
        // Before settling: adopt, start nothing, stop nothing.
        h.set(
            &[
                ("keep", want("keep", RestartMode::Always)),
                ("dead", want("dead", RestartMode::Always)),
            ],
            false,
        );
        h.until("keep adopted", |r| running(r, "keep")).await;
        assert_eq!(
            h.reports["keep"].handle.as_deref(),
            Some(keep_handle.as_str())
        );
        assert_eq!(h.reports["keep"].restarts, 0, "adopted, not restarted");
        h.until("dead revived", |r| running(r, "dead")).await;
        assert!(
            mem.status("orphan").await.unwrap().is_some(),
            "not settled yet"
        );
        // Settled: the orphan goes.
        h.set(
            &[
                ("keep", want("keep", RestartMode::Always)),
                ("dead", want("dead", RestartMode::Always)),
            ],
            true,
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while mem.status("orphan").await.unwrap().is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "orphan never stopped"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Without drain, workloads outlive the executor.
        h.shut().await;
        assert!(mem.status("keep").await.unwrap().is_some());
    }

    fn starts(mem: &MemDriver, id: &str) -> usize {
        mem.calls()
            .iter()
            .filter(|c| matches!(c, MemCall::Start(s) if s.alloc_id == id))
            .count()
    }

    fn stops(mem: &MemDriver, id: &str) -> usize {
        mem.calls()
            .iter()
            .filter(|c| matches!(c, MemCall::Stop { alloc_id, .. } if alloc_id == id))
            .count()
    }

    /// A replica that is no longer wanted first reports `stopping` (so discovery
    /// drops it) and keeps running for its `stop_delay`; wanted again meanwhile, it
    /// simply stays.
    #[tokio::test]
    async fn a_stop_leaves_discovery_first_and_waits_its_stop_delay() {
        let mem = Arc::new(MemDriver::new());
        let mut h = Harness::start(mem.clone(), false);
        let mut w = want("a", RestartMode::Always);
        w.stop_delay = Duration::from_millis(800);
        h.set(&[("a", w.clone())], true);
        h.until("a running", |r| running(r, "a")).await;

        h.set(&[], true);
        h.until("a leaving discovery", |r| {
            r.get("a").is_some_and(|r| {
                r.state == AllocState::Stopping
                    && !r.healthy
                    && r.reason
                        .as_deref()
                        .is_some_and(|x| x.contains("left discovery"))
            })
        })
        .await;
        assert_eq!(stops(&mem, "a"), 0, "still serving during its stop_delay");
        assert!(mem.status("a").await.unwrap().is_some());

        // Wanted again before the delay ran out: kept, not restarted.
        h.set(&[("a", w.clone())], true);
        h.until("a back", |r| running(r, "a")).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!((starts(&mem, "a"), stops(&mem, "a")), (1, 0));

        // Unwanted for good: stopped once the delay is over.
        let t = Instant::now();
        h.set(&[], true);
        h.until("a gone", |r| !r.contains_key("a")).await;
        assert!(t.elapsed() >= Duration::from_millis(800), "stopped early");
        assert_eq!(stops(&mem, "a"), 1);
        h.shut().await;
    }

    /// Without a delay (no ports), or when it never was in discovery (unhealthy), a
    /// stop is immediate.
    #[tokio::test]
    async fn replicas_out_of_discovery_stop_at_once() {
        let mem = Arc::new(MemDriver::new());
        let mut h = Harness::start(mem.clone(), false);
        let mut w = want("a", RestartMode::Never);
        w.stop_delay = Duration::from_secs(30);
        h.set(&[("a", w)], true);
        h.until("a running", |r| running(r, "a")).await;
        assert!(mem.exit("a", Some(1)));
        h.until("a failed", |r| {
            r.get("a").is_some_and(|r| r.state == AllocState::Failed)
        })
        .await;
        h.set(&[], true);
        h.until("a gone", |r| !r.contains_key("a")).await;
        h.shut().await;
    }

    #[tokio::test]
    async fn drain_stops_everything() {
        let mem = Arc::new(MemDriver::new());
        let mut h = Harness::start(mem.clone(), true);
        h.set(&[("a", want("a", RestartMode::Always))], true);
        h.until("a running", |r| running(r, "a")).await;
        h.shut().await;
        assert!(mem.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn start_failures_are_reported_and_retried() {
        let mem = Arc::new(MemDriver::new());
        mem.fail_next(shoal_runtime::MemOp::Start, "disk full");
        let mut h = Harness::start(mem.clone(), false);
        h.set(&[("a", want("a", RestartMode::Always))], true);
        h.until("the failure reported", |r| {
            r.get("a").is_some_and(|r| {
                r.state == AllocState::Failed
                    && r.reason.as_deref().is_some_and(|x| x.contains("disk full"))
            })
        })
        .await;
        h.until("a running after a retry", |r| running(r, "a"))
            .await;
        h.shut().await;
    }
}
