//! The agent loop: one task owns the sans-IO core and only decides.
//!
//! Each turn waits for one [`Branch`] (a frame, a timer, a write from the API, an
//! event of one of the agent's owners), handles it, then ends the turn: the core's
//! outputs are drained (SWIM datagrams go out at once; changed entries update the
//! [`StateIndex`] and, with the frames that carry them and the answers to the
//! writes that made them, go to the persister as one batch), and a fresh
//! [`Views`] is published if anything changed. Nothing slow happens here: disk
//! I/O is the persister's and the blob worker's, compiling the plugin worker's,
//! orchestration passes the orchestration worker's, host readings the host
//! probe's. Every turn is timed by branch (`shoal_loop_turn_seconds{branch}`), and
//! a turn slower than `perf.slow_turn_ms` is logged with its branch.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_blob::{BlobId, BlobStore};
use shoal_core::{wire, Entry, Event, Histogram, Node, NodeId, Now, Output, Status};
use shoal_net::{Incoming, Net};
use shoal_orch::{encode, ServiceRecord, Write};
use shoal_policy::PolicyHost;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::blobs::{BlobCmd, BlobEvent};
use super::channels::Channels;
use super::commands::{
    Command, ImageCommand, KvCommand, NodeCommand, PluginCommand, ServiceCommand,
};
use super::config::AgentConfig;
use super::events::EventLog;
use super::executor::ExecEvent;
use super::host_probe::Resources;
use super::keys::{self, NodeInfo, PluginRow};
use super::mesh_logs::LogsCmd;
use super::orchestrate::{PassRequest, PassResult};
use super::persist::Batch;
use super::plugins::{self, Compiled, Effect, PluginManager};
use super::views::{AgentStats, StateIndex, Views};
use super::{wall_ms, ApiError};
use shoal_api::DeployView;

/// A start-up grace before seeds that have not answered are reported.
const JOIN_GRACE: Duration = Duration::from_secs(3);
/// How often each failing seed is logged while the agent is not joined.
const JOIN_WARN_EVERY: Duration = Duration::from_secs(30);
/// Housekeeping tick: join status, members, plugin rows, published views.
const TICK: Duration = Duration::from_secs(1);
/// Failed plugin bindings are retried every this many ticks.
const PLUGIN_RETRY_TICKS: u64 = 5;
/// Resources are republished at least this often, even unchanged.
const RESOURCES_EVERY: Duration = Duration::from_secs(60);
/// Views are published at most this often, unless a write waits to be answered
/// (read-your-writes: an answered write is visible to the next read).
const PUBLISH_EVERY: Duration = Duration::from_millis(20);
/// Most queued frames or executor events one turn takes.
const BATCH: usize = 64;

/// What woke the loop.
pub enum Branch {
    /// The shutdown token was cancelled.
    Shutdown,
    /// A write from the API.
    Command(Command),
    /// Frames from peers (as many as were queued, up to a batch).
    Frames(Vec<Incoming>),
    /// A core timer is due.
    Timer,
    /// The executor reported (as many events as were queued, up to a batch).
    Exec(Vec<ExecEvent>),
    /// A plugin compile ended.
    Compiled(Compiled),
    /// The blob worker reported.
    Blob(BlobEvent),
    /// An orchestration pass ended.
    Pass(PassResult),
    /// An orchestration pass is due.
    PassDue,
    /// A host reading.
    Host(Resources),
    /// The images Docker holds.
    Images(Vec<String>),
    /// The housekeeping tick.
    Tick,
    /// Changed views wait to be published.
    Publish,
}

impl Branch {
    /// The branch's name, for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Branch::Shutdown => "shutdown",
            Branch::Command(_) => "command",
            Branch::Frames(_) => "frames",
            Branch::Timer => "timer",
            Branch::Exec(_) => "executor",
            Branch::Compiled(_) => "compiled",
            Branch::Blob(_) => "blob",
            Branch::Pass(_) => "pass",
            Branch::PassDue => "pass_due",
            Branch::Host(_) => "host",
            Branch::Images(_) => "images",
            Branch::Tick => "tick",
            Branch::Publish => "publish",
        }
    }
}

/// `first` and whatever else is queued on `rx`, up to [`BATCH`].
fn drain<T>(first: T, rx: &mut mpsc::Receiver<T>) -> Vec<T> {
    let mut v = vec![first];
    while v.len() < BATCH {
        match rx.try_recv() {
            Ok(x) => v.push(x),
            Err(_) => break,
        }
    }
    v
}

/// The receiving ends the loop selects over.
pub struct Inputs {
    /// API writes.
    pub commands: mpsc::Receiver<Command>,
    /// Frames from the network.
    pub frames: mpsc::Receiver<Incoming>,
    /// Executor events.
    pub exec: mpsc::Receiver<ExecEvent>,
    /// Finished compiles.
    pub compiled: mpsc::Receiver<Compiled>,
    /// Blob worker events.
    pub blobs: mpsc::Receiver<BlobEvent>,
    /// Orchestration results.
    pub passes: mpsc::Receiver<PassResult>,
    /// Host readings.
    pub host: mpsc::Receiver<Resources>,
    /// Docker image lists.
    pub images: mpsc::Receiver<Vec<String>>,
}

/// The sending ends and handles the loop uses (see [`AgentLoop::new`]).
pub struct Outputs {
    /// Published views.
    pub views: watch::Sender<Arc<Views>>,
    /// Batches for the persister.
    pub persist: mpsc::Sender<Batch>,
    /// Persist failures so far (counted by the persister).
    pub persist_errors: Arc<AtomicU64>,
    /// Commands for the blob worker.
    pub blobs: mpsc::Sender<BlobCmd>,
    /// Logs frames for the logs task.
    pub logs: mpsc::Sender<LogsCmd>,
    /// Pass requests for the orchestration worker.
    pub passes: mpsc::Sender<PassRequest>,
    /// Where compile workers report.
    pub compiled: mpsc::Sender<Compiled>,
}

/// The agent loop's state (see the module docs).
pub struct AgentLoop {
    cfg: AgentConfig,
    node: Node,
    start: Instant,
    net: Net,
    index: StateIndex,
    out: Outputs,
    batch: Batch,
    blob_store: BlobStore,
    plugins: PluginManager,
    host: Arc<PolicyHost>,
    tracker: TaskTracker,
    channels: Channels,
    runtimes: Vec<String>,
    pass_busy: bool,
    pass_dirty: bool,
    last_pass: tokio::time::Instant,
    own_reports: BTreeSet<String>,
    alloc_states: BTreeMap<String, &'static str>,
    executor_ready: bool,
    /// Node-owned JSON last published, by suffix (republished only when changed).
    published: BTreeMap<String, Vec<u8>>,
    resources: Option<(Resources, Instant)>,
    local_plugins: Arc<Vec<PluginRow>>,
    members: Arc<Vec<(NodeId, Status)>>,
    peers_sent: BTreeMap<String, SocketAddr>,
    views_dirty: bool,
    ever_joined: bool,
    fatal: Option<String>,
    join_note: Option<String>,
    join_warned: BTreeMap<SocketAddr, Instant>,
    turns: BTreeMap<&'static str, Histogram>,
    pass_times: Histogram,
    last_publish: tokio::time::Instant,
    publish_pending: bool,
    steward_passes: u64,
    steward_writes: u64,
    blob_frames_dropped: u64,
    /// Logs frames dropped because the logs task was backed up.
    logs_frames_dropped: u64,
    /// Recent events, published as `node/<me>/events`.
    events: EventLog,
    ticks: u64,
}

impl AgentLoop {
    /// The loop of a started agent; `restored` are the entries loaded from disk.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: AgentConfig,
        node: Node,
        start: Instant,
        net: Net,
        out: Outputs,
        blob_store: BlobStore,
        host: Arc<PolicyHost>,
        tracker: TaskTracker,
        channels: Channels,
        runtimes: Vec<String>,
    ) -> AgentLoop {
        AgentLoop {
            cfg,
            node,
            start,
            net,
            index: StateIndex::default(),
            out,
            batch: Batch::default(),
            blob_store,
            plugins: PluginManager::default(),
            host,
            tracker,
            channels,
            runtimes,
            pass_busy: false,
            pass_dirty: true,
            last_pass: tokio::time::Instant::now(),
            own_reports: BTreeSet::new(),
            alloc_states: BTreeMap::new(),
            executor_ready: false,
            published: BTreeMap::new(),
            resources: None,
            local_plugins: Arc::new(Vec::new()),
            members: Arc::new(Vec::new()),
            peers_sent: BTreeMap::new(),
            views_dirty: true,
            ever_joined: false,
            fatal: None,
            join_note: None,
            join_warned: BTreeMap::new(),
            turns: BTreeMap::new(),
            pass_times: Histogram::default(),
            last_publish: tokio::time::Instant::now(),
            publish_pending: false,
            steward_passes: 0,
            steward_writes: 0,
            blob_frames_dropped: 0,
            logs_frames_dropped: 0,
            events: EventLog::default(),
            ticks: 0,
        }
    }

    fn now(&self) -> Now {
        Now {
            mono_ms: self.start.elapsed().as_millis() as u64,
            wall_ms: wall_ms(),
        }
    }

    /// Takes the restored state in, publishes this node's info, joins the seeds
    /// and publishes the first views.
    pub fn begin(&mut self) -> anyhow::Result<()> {
        let restored: Vec<Entry> = self.node.state().entries().cloned().collect();
        for e in &restored {
            // Bindings and kv restored from disk take effect as if they had just arrived.
            self.on_changed(e);
        }
        let info = NodeInfo {
            name: self.cfg.name.clone(),
            addr: self.cfg.advertise.to_string(),
            labels: self.cfg.labels.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_ms: wall_ms(),
            api: self.cfg.api.to_string(),
            drivers: self.runtimes.clone(),
        };
        self.publish_own(keys::INFO, &info);
        let now = self.now();
        let seeds = self.cfg.join.clone();
        self.node.join(&seeds, now);
        self.refresh_plugin_rows();
        self.refresh_members();
        self.end_turn();
        // Whatever end_turn's pacing decided: the API starts on this.
        self.publish_views();
        Ok(())
    }

    /// Why the agent must stop, if it must.
    pub fn fatal(&self) -> Option<&str> {
        self.fatal.as_deref()
    }

    /// Runs until `stop` is cancelled or a fatal condition (our name is held by a
    /// live node).
    pub async fn run(&mut self, inputs: &mut Inputs, stop: &CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let slow = Duration::from_millis(self.cfg.perf.slow_turn_ms);
        loop {
            let branch = self.next(inputs, stop, &mut tick).await;
            if matches!(branch, Branch::Shutdown) {
                return;
            }
            let name = branch.name();
            let t = Instant::now();
            self.handle(branch);
            self.end_turn();
            let took = t.elapsed();
            self.turns
                .entry(name)
                .or_default()
                .observe(took.as_secs_f64());
            if took >= slow {
                tracing::warn!(
                    branch = name,
                    took_ms = took.as_millis() as u64,
                    "slow agent loop turn"
                );
            }
            if self.fatal.is_some() {
                return;
            }
        }
    }

    async fn next(
        &self,
        inputs: &mut Inputs,
        stop: &CancellationToken,
        tick: &mut tokio::time::Interval,
    ) -> Branch {
        let timer = super::sleep_until(
            self.node
                .poll_timeout()
                .map(|ms| super::at_ms(self.start, ms)),
        );
        let pass_due = async {
            if self.pass_busy {
                return std::future::pending().await;
            }
            let after = if self.pass_dirty {
                self.cfg.perf.orch_debounce_ms
            } else {
                self.cfg.perf.orch_interval_ms
            };
            tokio::time::sleep_until(self.last_pass + Duration::from_millis(after)).await
        };
        let publish = async {
            if self.publish_pending {
                tokio::time::sleep_until(self.last_publish + PUBLISH_EVERY).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => Branch::Shutdown,
            Some(f) = inputs.frames.recv() => Branch::Frames(drain(f, &mut inputs.frames)),
            () = timer => Branch::Timer,
            Some(c) = inputs.commands.recv() => Branch::Command(c),
            Some(e) = inputs.exec.recv() => Branch::Exec(drain(e, &mut inputs.exec)),
            Some(r) = inputs.passes.recv() => Branch::Pass(r),
            Some(e) = inputs.blobs.recv() => Branch::Blob(e),
            Some(c) = inputs.compiled.recv() => Branch::Compiled(c),
            () = pass_due => Branch::PassDue,
            Some(r) = inputs.host.recv() => Branch::Host(r),
            Some(i) = inputs.images.recv() => Branch::Images(i),
            _ = tick.tick() => Branch::Tick,
            () = publish => Branch::Publish,
        }
    }

    fn handle(&mut self, branch: Branch) {
        match branch {
            Branch::Shutdown => {}
            Branch::Command(c) => self.on_command(c),
            Branch::Frames(frames) => {
                for f in frames {
                    self.on_frame(f);
                }
            }
            Branch::Timer => {
                let now = self.now();
                self.node.handle_timeout(now);
            }
            Branch::Exec(events) => {
                let writes: Vec<Write> =
                    events.into_iter().filter_map(|e| self.on_exec(e)).collect();
                self.apply_writes(writes);
            }
            Branch::Compiled(c) => {
                let effects = {
                    let (index, store, me) = (&self.index, &self.blob_store, &self.cfg.name);
                    self.plugins.on_compiled(
                        &c.key,
                        &c.blob,
                        c.result,
                        &|id| store.has(id),
                        &|id| index.advertisers(&id.to_string(), me),
                    )
                };
                self.run_effects(effects);
                self.refresh_plugin_rows();
            }
            Branch::Blob(e) => self.on_blob(e),
            Branch::Pass(r) => self.on_pass(r),
            Branch::PassDue => self.request_pass(),
            Branch::Host(r) => self.on_host(r),
            Branch::Images(images) => self.publish_own(keys::IMAGES, &images),
            Branch::Tick => self.on_tick(),
            Branch::Publish => {}
        }
    }

    fn on_frame(&mut self, f: Incoming) {
        // Blob chunks are the blob worker's: they bypass the core.
        if wire::is_blob(&f.bytes) {
            let cmd = BlobCmd::Frame {
                from_name: f.from_name,
                from: f.from,
                bytes: f.bytes,
            };
            if self.out.blobs.try_send(cmd).is_err() {
                // The worker is backed up: the fetch re-requests what went missing.
                self.blob_frames_dropped += 1;
            }
            return;
        }
        // So are logs requests and answers, the logs task's.
        if wire::is_logs(&f.bytes) {
            let cmd = LogsCmd::Frame {
                from: f.from,
                bytes: f.bytes,
            };
            if self.out.logs.try_send(cmd).is_err() {
                // Backed up: the asker times out and says so.
                self.logs_frames_dropped += 1;
            }
            return;
        }
        let now = self.now();
        self.node.handle_frame(&f.from_name, f.from, &f.bytes, now);
    }

    // ----- writes ---------------------------------------------------------------

    /// Writes `key` (or deletes it with `None`); `reply` gets `ok(entry)` once the
    /// write is durable, or the error.
    fn put_durable<T: Send + 'static>(
        &mut self,
        key: &str,
        value: Option<Vec<u8>>,
        reply: oneshot::Sender<Result<T, ApiError>>,
        ok: impl FnOnce(Entry) -> T + Send + Sync + 'static,
    ) {
        let now = self.now();
        match self.node.put(key, value, now) {
            Err(e) => {
                let _ = reply.send(Err(ApiError::BadRequest(e.to_string())));
            }
            Ok(entry) => self.batch.acks.push(Box::new(move |res| {
                let _ = reply.send(res.map(|()| ok(entry)).map_err(ApiError::Storage));
            })),
        }
    }

    /// Publishes node-owned JSON under `node/<me>/<suffix>`, unless it is unchanged.
    fn publish_own<T: serde::Serialize>(&mut self, suffix: &str, value: &T) {
        let Ok(bytes) = serde_json::to_vec(value) else {
            tracing::warn!(suffix, "encoding node-owned state failed");
            return;
        };
        if self.published.get(suffix) == Some(&bytes) {
            return;
        }
        let key = keys::node_key(&self.cfg.name, suffix);
        let now = self.now();
        match self.node.put(&key, Some(bytes.clone()), now) {
            Ok(_) => {
                self.published.insert(suffix.to_string(), bytes);
            }
            Err(e) => tracing::warn!(key, "publishing node-owned state failed: {e}"),
        }
    }

    /// Applies writes decided elsewhere (orchestration, the executor's reports) and
    /// spreads them in one push, logging refusals.
    fn apply_writes(&mut self, writes: Vec<Write>) {
        if writes.is_empty() {
            return;
        }
        let now = self.now();
        let pairs: Vec<(String, Option<Vec<u8>>)> = writes
            .into_iter()
            .map(|w| match w {
                Write::Put { key, value } => (key, Some(value)),
                Write::Delete { key } => (key, None),
            })
            .collect();
        let keys: Vec<String> = pairs.iter().map(|(k, _)| k.clone()).collect();
        for (key, res) in keys.iter().zip(self.node.put_many(pairs, now)) {
            if let Err(e) = res {
                tracing::warn!(key, "write refused: {e}");
            }
        }
    }

    fn on_command(&mut self, c: Command) {
        match c {
            Command::Kv(KvCommand::Put { key, value, reply }) => {
                if let Some(why) = keys::refusal(&key) {
                    let _ = reply.send(Err(ApiError::BadRequest(why)));
                    return;
                }
                if value.is_none() && self.node.state().value(&key).is_none() {
                    let _ = reply.send(Err(ApiError::NotFound(format!("key not found: {key}"))));
                    return;
                }
                self.put_durable(&key, value, reply, |e| e);
            }
            Command::Plugin(PluginCommand::Bind { binding, reply }) => {
                let key = keys::binding_key(binding.kind, binding.service.as_deref());
                match serde_json::to_vec(&binding) {
                    Ok(v) => self.put_durable(&key, Some(v), reply, move |_| binding),
                    Err(e) => {
                        let _ = reply.send(Err(ApiError::Storage(e.to_string())));
                    }
                }
            }
            Command::Plugin(PluginCommand::Unbind {
                kind,
                service,
                reply,
            }) => {
                let key = keys::binding_key(kind, service.as_deref());
                if self.node.state().value(&key).is_none() {
                    let _ = reply.send(Err(ApiError::NotFound(format!(
                        "no {kind} plugin is installed{}",
                        service.map_or(String::new(), |s| format!(" for service {s}"))
                    ))));
                    return;
                }
                self.put_durable(&key, None, reply, |_| ());
            }
            Command::Service(cmd) => self.on_service(cmd),
            Command::Node(NodeCommand::Forget { node, reply }) => {
                let now = self.now();
                match self.node.forget_member(&node, now) {
                    Ok(_) => self.batch.acks.push(Box::new(move |res| {
                        let _ = reply.send(res.map_err(ApiError::Storage));
                    })),
                    Err(shoal_core::ForgetRefusal::Unknown) => {
                        let _ =
                            reply.send(Err(ApiError::NotFound(format!("no node named {node:?}"))));
                    }
                    Err(r) => {
                        let _ = reply.send(Err(ApiError::Conflict(format!(
                            "cannot forget node {node}: {r}"
                        ))));
                    }
                }
            }
            Command::Node(NodeCommand::Drain { node, on, reply }) => {
                let key = shoal_orch::drain_key(&node);
                if self.node.state().value(&key).is_some() == on {
                    // Already so: keep the first drain's time.
                    let _ = reply.send(Ok(false));
                    return;
                }
                let value = on.then(|| {
                    encode(&shoal_orch::Drain {
                        since_ms: super::wall_ms(),
                    })
                });
                self.put_durable(&key, value, reply, |_| true);
            }
            Command::Image(ImageCommand::Put { record, reply }) => {
                let key = shoal_image::ImageRecord::key(&record.reference);
                match serde_json::to_vec(&record) {
                    Ok(v) => self.put_durable(&key, Some(v), reply, move |_| *record),
                    Err(e) => {
                        let _ = reply.send(Err(ApiError::Storage(e.to_string())));
                    }
                }
            }
            Command::Image(ImageCommand::Remove { reference, reply }) => {
                let key = shoal_image::ImageRecord::key(&reference);
                if self.node.state().value(&key).is_none() {
                    let _ = reply.send(Err(ApiError::NotFound(format!(
                        "no image {reference} was pushed (`shoal image ls` lists them)"
                    ))));
                    return;
                }
                self.put_durable(&key, None, reply, |_| ());
            }
        }
    }

    fn on_service(&mut self, cmd: ServiceCommand) {
        let (record, reply, changed, warnings) = match cmd {
            ServiceCommand::Deploy { spec, reply } => {
                // Accepted either way (a dependency may be deployed next), but said.
                let warnings: Vec<String> = spec
                    .depends_on
                    .iter()
                    .filter(|d| self.index.service(d).is_none_or(|r| r.deleted))
                    .map(|d| format!("dependency {d} does not exist (yet): replicas wait for it"))
                    .collect();
                let current = self.index.service(&spec.name).cloned();
                let next = ServiceRecord::deploy(current.as_ref(), *spec);
                let changed = current.as_ref() != Some(&next);
                (Ok(next), reply, changed, warnings)
            }
            ServiceCommand::Scale {
                name,
                replicas,
                reply,
            } => {
                let r = self.live_record(&name).and_then(|r| {
                    if let Some(auto) = r.spec.autoscaling() {
                        return Err(ApiError::Conflict(format!(
                            "service {name} is autoscaled by {} (min {}, max {}): a manual count would be undone at its next evaluation; change min/max under [scaler] in its spec and deploy it, or remove [scaler] to set a fixed count",
                            auto.policy, auto.min, auto.max
                        )));
                    }
                    r.scaled(replicas)
                        .map_err(|e| ApiError::BadRequest(e.to_string()))
                });
                (r, reply, true, Vec::new())
            }
            ServiceCommand::Rollback { name, to, reply } => {
                let r = self.live_record(&name).and_then(|r| {
                    r.rolled_back(to)
                        .map_err(|e| ApiError::Conflict(e.to_string()))
                });
                (r, reply, true, Vec::new())
            }
            ServiceCommand::Remove { name, reply } => {
                let r = self.live_record(&name).map(|r| r.removed());
                (r, reply, true, Vec::new())
            }
        };
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let view = DeployView {
            name: record.spec.name.clone(),
            version: record.version,
            replicas: if record.deleted { 0 } else { record.replicas },
            changed,
            warnings,
        };
        if !changed {
            let _ = reply.send(Ok(view));
            return;
        }
        let key = keys::service_key(&record.spec.name);
        self.put_durable(&key, Some(encode(&record)), reply, move |_| view);
    }

    fn live_record(&self, name: &str) -> Result<ServiceRecord, ApiError> {
        match self.index.service(name) {
            Some(r) if !r.deleted => Ok(r.clone()),
            _ => Err(ApiError::NotFound(format!("no service named {name:?}"))),
        }
    }

    // ----- owners' events ------------------------------------------------------

    /// Takes one executor event; returns the report write it asks for.
    fn on_exec(&mut self, ev: ExecEvent) -> Option<Write> {
        match ev {
            ExecEvent::Report(id, report) => {
                self.events.report(&id, report.as_deref(), wall_ms());
                let key = keys::report_key(&self.cfg.name, &id);
                Some(match report {
                    Some(r) => {
                        self.own_reports.insert(id.clone());
                        self.alloc_states
                            .insert(id, super::views::state_str(r.state));
                        Write::Put {
                            key,
                            value: encode(&*r),
                        }
                    }
                    None => {
                        self.own_reports.remove(&id);
                        self.alloc_states.remove(&id);
                        Write::Delete { key }
                    }
                })
            }
            ExecEvent::Ready => {
                self.executor_ready = true;
                self.pass_dirty = true;
                None
            }
        }
    }

    /// Writes (or deletes) a node-owned marker key, unless it already is so.
    fn mark(&mut self, key: &str, on: bool) {
        if self.node.state().value(key).is_some() == on {
            return;
        }
        let now = self.now();
        if let Err(e) = self.node.put(key, on.then(Vec::new), now) {
            tracing::warn!(key, "writing a blob advertisement failed: {e}");
        }
    }

    fn on_blob(&mut self, ev: BlobEvent) {
        match ev {
            BlobEvent::Holds(id) => {
                self.mark(&keys::blob_advert_key(&self.cfg.name, &id), true);
                self.mark(&keys::blob_part_key(&self.cfg.name, &id), false);
            }
            BlobEvent::Fetching(id) => {
                self.mark(&keys::blob_part_key(&self.cfg.name, &id), true);
            }
            BlobEvent::Dropped(id) => {
                self.mark(&keys::blob_advert_key(&self.cfg.name, &id), false);
            }
            BlobEvent::Fetched { id, result } => {
                self.mark(&keys::blob_part_key(&self.cfg.name, &id), false);
                let effects = self.plugins.on_fetched(&id, &result);
                self.run_effects(effects);
                self.refresh_plugin_rows();
            }
        }
    }

    fn on_pass(&mut self, r: PassResult) {
        self.pass_busy = false;
        self.last_pass = tokio::time::Instant::now();
        self.pass_times.observe(r.took.as_secs_f64());
        self.steward_passes = r.passes;
        self.steward_writes = r.steward_writes;
        self.apply_writes(r.writes);
        let now = wall_ms();
        for e in r.events {
            self.events.record(now, e.kind, Some(&e.service), e.reason);
        }
    }

    fn request_pass(&mut self) {
        // The pass decides from the latest state.
        if self.publish_pending {
            self.publish_pending = false;
            self.last_publish = tokio::time::Instant::now();
            self.publish_views();
        }
        let req = PassRequest {
            views: self.out.views.borrow().clone(),
            now_ms: wall_ms(),
            own_reports: self.own_reports.clone(),
            executor_ready: self.executor_ready,
        };
        match self.out.passes.try_send(req) {
            Ok(()) => {
                self.pass_busy = true;
                self.pass_dirty = false;
            }
            Err(_) => self.last_pass = tokio::time::Instant::now(),
        }
    }

    fn on_host(&mut self, r: Resources) {
        let stale = match &self.resources {
            None => true,
            Some((old, at)) => old.differs(&r) || at.elapsed() > RESOURCES_EVERY,
        };
        if stale {
            // Forced: `published` dedupes by bytes, and a periodic refresh is wanted.
            self.published.remove(keys::RESOURCES);
            self.publish_own(keys::RESOURCES, &r);
            self.resources = Some((r, Instant::now()));
        }
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        self.check_join();
        if self.ticks.is_multiple_of(PLUGIN_RETRY_TICKS) {
            let effects = {
                let (index, store, me) = (&self.index, &self.blob_store, &self.cfg.name);
                self.plugins.retry(&|id| store.has(id), &|id| {
                    index.advertisers(&id.to_string(), me)
                })
            };
            self.run_effects(effects);
        }
        self.refresh_plugin_rows();
        self.refresh_members();
        if let Some(events) = self.events.take_dirty() {
            self.publish_own(keys::EVENTS, &events);
        }
        // Counters (loop turns, queue depths) stay fresh in `/metrics`.
        self.views_dirty = true;
    }

    /// Reacts to an entry that became current (local write, push, sync, restore).
    fn on_changed(&mut self, e: &Entry) {
        let touched = self.index.apply(e);
        if touched.orchestration {
            self.pass_dirty = true;
        }
        if let Some(key) = touched.binding {
            let binding = self.index.bindings().get(&key).cloned();
            let effects = {
                let (index, store, me) = (&self.index, &self.blob_store, &self.cfg.name);
                self.plugins
                    .on_binding(&key, binding.as_ref(), &|id| store.has(id), &|id| {
                        index.advertisers(&id.to_string(), me)
                    })
            };
            self.run_effects(effects);
            self.refresh_plugin_rows();
        }
        if let Some((owner, id)) = touched.blob_partial {
            if owner != self.cfg.name {
                if let Ok(id) = id.parse::<BlobId>() {
                    let _ = self
                        .out
                        .blobs
                        .try_send(BlobCmd::AddPeer { id, peer: owner });
                }
            }
        }
        if let Some((owner, id)) = touched.blob_advert {
            if owner != self.cfg.name {
                if let Ok(id) = id.parse::<BlobId>() {
                    let _ = self.out.blobs.try_send(BlobCmd::AddPeer {
                        id,
                        peer: owner.clone(),
                    });
                    // A binding may have arrived before the advertisement of its blob
                    // (they spread independently): fetch now that someone has it.
                    let effects = {
                        let (index, store, me) = (&self.index, &self.blob_store, &self.cfg.name);
                        self.plugins.on_advert(&id, &|id| store.has(id), &|id| {
                            index.advertisers(&id.to_string(), me)
                        })
                    };
                    self.run_effects(effects);
                }
            }
        }
    }

    fn run_effects(&mut self, effects: Vec<Effect>) {
        for fx in effects {
            match fx {
                Effect::Fetch { blob, peers } => {
                    if self
                        .out
                        .blobs
                        .try_send(BlobCmd::Want { id: blob, peers })
                        .is_err()
                    {
                        tracing::warn!(%blob, "the blob worker is backed up; the fetch is retried");
                    }
                }
                Effect::Compile { key, binding, blob } => {
                    let (store, host, tx) = (
                        self.blob_store.clone(),
                        self.host.clone(),
                        self.out.compiled.clone(),
                    );
                    self.tracker.spawn_blocking(move || {
                        let done = plugins::compile(&store, &host, key, binding, blob);
                        let _ = tx.blocking_send(done);
                    });
                }
                Effect::Uninstall { kind, service } => {
                    self.host.remove(kind, service.as_deref());
                }
            }
        }
    }

    fn refresh_plugin_rows(&mut self) {
        let rows = self.plugins.rows(&self.cfg.name, &self.host);
        self.events.plugins(&rows, wall_ms());
        if *self.local_plugins != rows {
            self.publish_own(keys::PLUGINS, &rows);
            self.local_plugins = Arc::new(rows);
            self.views_dirty = true;
        }
    }

    /// Takes a fresh membership table; tells the blob worker who is reachable.
    fn refresh_members(&mut self) {
        let members = self.node.members();
        if *self.members != members {
            let peers: BTreeMap<String, SocketAddr> = members
                .iter()
                .filter(|(id, st)| {
                    id.name != self.cfg.name && matches!(st, Status::Alive | Status::Suspect)
                })
                .map(|(id, _)| (id.name.clone(), id.addr))
                .collect();
            if peers != self.peers_sent {
                let _ = self.out.blobs.try_send(BlobCmd::Peers(peers.clone()));
                self.peers_sent = peers;
            }
            self.members = Arc::new(members);
            self.views_dirty = true;
        }
    }

    /// Until some seed lets us in, says why not: a warning per seed (at most every
    /// [`JOIN_WARN_EVERY`]) and the `not joined: …` note `shoal nodes` shows.
    fn check_join(&mut self) {
        if self.ever_joined || self.node.joined() {
            if self.join_note.take().is_some() {
                tracing::info!("joined the cluster");
                self.views_dirty = true;
            }
            return;
        }
        if self.cfg.join.is_empty() || self.start.elapsed() < JOIN_GRACE {
            return;
        }
        let mut reasons = Vec::new();
        for seed in self.cfg.join.clone() {
            let why = match self.net.dial_error(seed) {
                Some(e) => e,
                None if self.net.is_connected(seed) => {
                    "connected, but it does not answer our SWIM announcements".to_string()
                }
                None => "no answer yet".to_string(),
            };
            let due = self
                .join_warned
                .get(&seed)
                .is_none_or(|t| t.elapsed() >= JOIN_WARN_EVERY);
            if due {
                tracing::warn!(%seed, "cannot join through seed {seed}: {why}");
                self.join_warned.insert(seed, Instant::now());
            }
            reasons.push(format!("{seed}: {why}"));
        }
        self.join_note = Some(format!("not joined: {}", reasons.join("; ")));
        self.views_dirty = true;
    }

    // ----- end of turn ---------------------------------------------------------

    /// Drains the core, publishes views if something changed, hands the batch to
    /// the persister.
    pub fn end_turn(&mut self) {
        let mut members_changed = false;
        while let Some(out) = self.node.poll_output() {
            match out {
                // SWIM datagrams carry no state: out at once.
                Output::Transmit {
                    to,
                    reliable: false,
                    bytes,
                } => self.net.send(to, false, bytes),
                Output::Transmit {
                    to,
                    reliable: true,
                    bytes,
                } => self.batch.frames.push((to, true, bytes)),
                Output::Event(ev) => {
                    if matches!(ev, Event::MemberUp(_) | Event::MemberDown(_)) {
                        members_changed = true;
                    }
                    self.on_event(ev);
                }
            }
        }
        if members_changed {
            self.refresh_members();
        }
        if self.index.take_dirty() || self.views_dirty {
            self.views_dirty = false;
            self.publish_pending = true;
        }
        let due = self.last_publish.elapsed() >= PUBLISH_EVERY;
        if self.publish_pending && (due || !self.batch.acks.is_empty()) {
            self.publish_pending = false;
            self.last_publish = tokio::time::Instant::now();
            self.publish_views();
        }
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            if let Err(e) = self.out.persist.try_send(batch) {
                // The persister is backed up: keep the batch (its frames and answers
                // wait with it) and hand it over next turn.
                let mut back = match e {
                    mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b) => b,
                };
                back.entries.append(&mut self.batch.entries);
                back.frames.append(&mut self.batch.frames);
                back.acks.append(&mut self.batch.acks);
                self.batch = back;
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Changed(e) => {
                self.on_changed(&e);
                if !e.is_node_owned() {
                    self.batch.entries.push(e);
                }
            }
            Event::MemberUp(id) => {
                self.ever_joined = true;
                tracing::info!(peer = %id.name, addr = %id.addr, "member up");
            }
            Event::MemberDown(id) => {
                tracing::info!(peer = %id.name, addr = %id.addr, "member down");
            }
            Event::IdentityRefused {
                name,
                claimant,
                holder,
            } => {
                tracing::warn!(
                    %name, %claimant, %holder,
                    "refused a second agent named {name} at {claimant}: a live node holds the name at {holder}"
                );
            }
            Event::IdentityReplaced { name, old, new } => {
                tracing::info!(%name, %old, %new, "{name} restarted at {new}; its old identity at {old} no longer answers");
            }
            Event::JoinRefused { by, reason } => {
                if self.ever_joined {
                    tracing::warn!(peer = %by, "peer refused our SWIM packets: {reason}");
                } else {
                    tracing::error!(peer = %by, "cannot join: {reason}");
                    self.join_note = Some(format!("not joined: {reason}"));
                    self.fatal.get_or_insert(reason);
                }
            }
            Event::Rejoined(id) => {
                tracing::info!(
                    gen = id.gen,
                    "the cluster had declared this node down; rejoined under a renewed identity"
                );
            }
            Event::Forgotten { name, gen, keys } => {
                tracing::info!(node = %name, gen, records = keys.len(), "forgot a node");
                for key in keys {
                    // The index drops what the core dropped, as for a delete.
                    let gone = Entry {
                        key,
                        value: None,
                        hlc: shoal_core::Hlc::default(),
                        writer: shoal_core::WriterId {
                            node: name.clone(),
                            gen,
                        },
                        seq: 0,
                    };
                    self.on_changed(&gone);
                }
                self.refresh_members();
            }
            Event::Overwritten { ours, theirs } => {
                tracing::warn!(key = %ours.key, by = %theirs.writer.node, "a write of this node lost the last-writer-wins merge");
                self.events.overwritten(&ours, &theirs, wall_ms());
            }
        }
    }

    fn publish_views(&mut self) {
        let mut allocations: BTreeMap<&'static str, usize> = BTreeMap::new();
        for s in self.alloc_states.values() {
            *allocations.entry(s).or_insert(0) += 1;
        }
        let stats = AgentStats {
            core: self.node.stats().clone(),
            keys: self.node.state().len(),
            persist_errors: self.out.persist_errors.load(Ordering::Relaxed),
            steward_passes: self.steward_passes,
            steward_writes: self.steward_writes,
            allocations,
            turns: self.turns.clone(),
            passes: self.pass_times.clone(),
            channels: self.channels.depths(),
            blob_frames_dropped: self.blob_frames_dropped,
            logs_frames_dropped: self.logs_frames_dropped,
        };
        let views = Views {
            me: self.cfg.name.clone(),
            members: self.members.clone(),
            state: self.index.snapshot_parts(),
            local_plugins: self.local_plugins.clone(),
            join_note: self.join_note.clone(),
            stats: Arc::new(stats),
        };
        self.out.views.send_replace(Arc::new(views));
    }

    /// Leaves the cluster gracefully and hands the last batch to the persister.
    pub async fn leave(&mut self) {
        tracing::info!(name = %self.cfg.name, "leaving the cluster");
        let now = self.now();
        self.node.leave(now);
        self.end_turn();
        let batch = std::mem::take(&mut self.batch);
        if !batch.is_empty() {
            let _ = self.out.persist.send(batch).await;
        }
    }
}
