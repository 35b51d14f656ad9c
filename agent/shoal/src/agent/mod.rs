//! The agent driver: one task owns the sans-IO core and `select!`s over the
//! network, timers, API commands, resource readings and shutdown.
//!
//! Everything the core asks for happens here: frames go to `shoal-net`,
//! changed cluster-wide entries go to `shoal-store` (fsync'd before a client's
//! write is acknowledged), events become logs and metrics.

pub mod api;
pub mod blobs;
pub mod config;
pub mod executor;
pub mod http_guard;
pub mod keys;
pub mod metrics;
pub mod orchestrate;
pub mod plugins;
pub mod resources;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use shoal_core::wire::{self, Msg};
use shoal_core::{Entry, Event, Node, Now, Output, Status, NODE_PREFIX};
use shoal_net::{Identity, Incoming, Net, NetConfig};
use shoal_policy::{HostConfig, PolicyHost, PolicyKind};
use shoal_store::{Persist, RedbStore};
use tokio::sync::{mpsc, oneshot, watch};

use crate::views::{DeployView, NodeInfo, NodeView, PsView, ServiceView};
use config::{AgentConfig, Tls};
use resources::{Probe, Resources};

/// A request from the API to the driver.
pub enum Command {
    /// Write (or with `None` delete) a cluster-wide key; answered once durable.
    Put {
        /// Key.
        key: String,
        /// Value or delete.
        value: Option<Vec<u8>>,
        /// Answer.
        reply: oneshot::Sender<Result<Entry, ApiError>>,
    },
    /// Read one key from the local replica.
    Get {
        /// Key.
        key: String,
        /// Answer (`None`: missing or deleted).
        reply: oneshot::Sender<Option<Entry>>,
    },
    /// List live keys under a prefix.
    List {
        /// Prefix.
        prefix: String,
        /// Internal records instead of user kv.
        internal: bool,
        /// Answer.
        reply: oneshot::Sender<Vec<Entry>>,
    },
    /// The membership table.
    Nodes {
        /// Answer.
        reply: oneshot::Sender<Vec<NodeView>>,
    },
    /// Prometheus text.
    Metrics {
        /// Answer.
        reply: oneshot::Sender<String>,
    },
    /// Store a validated plugin as a blob and bind it cluster-wide.
    InstallPlugin {
        /// The world.
        kind: PolicyKind,
        /// Service scope (`None`: cluster default).
        service: Option<String>,
        /// Name.
        name: String,
        /// The component.
        wasm: Vec<u8>,
        /// Answer.
        reply: oneshot::Sender<Result<plugins::Binding, ApiError>>,
    },
    /// Remove a binding (revert to the built-in or cluster default).
    RemovePlugin {
        /// The world.
        kind: PolicyKind,
        /// Service scope.
        service: Option<String>,
        /// Answer.
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Plugin states: this agent's, or every agent's as published.
    Plugins {
        /// Every agent's rows.
        all: bool,
        /// Answer.
        reply: oneshot::Sender<Vec<plugins::PluginRow>>,
    },
    /// The scheduler's view of the cluster.
    Snapshot {
        /// Answer.
        reply: oneshot::Sender<shoal_policy::Snapshot>,
    },
    /// Create or update a service.
    Deploy {
        /// The validated spec.
        spec: Box<shoal_orch::ServiceSpec>,
        /// Answer.
        reply: oneshot::Sender<Result<DeployView, ApiError>>,
    },
    /// Set a service's desired replicas.
    Scale {
        /// Service.
        name: String,
        /// Replicas.
        replicas: u32,
        /// Answer.
        reply: oneshot::Sender<Result<DeployView, ApiError>>,
    },
    /// Remove a service.
    Remove {
        /// Service.
        name: String,
        /// Answer.
        reply: oneshot::Sender<Result<DeployView, ApiError>>,
    },
    /// Every service.
    Services {
        /// Answer.
        reply: oneshot::Sender<Vec<ServiceView>>,
    },
    /// One service's slots.
    Ps {
        /// Service.
        name: String,
        /// Answer.
        reply: oneshot::Sender<Result<PsView, ApiError>>,
    },
    /// Start fetching a blob from the peers that advertise it.
    FetchBlob {
        /// The blob.
        id: shoal_blob::BlobId,
        /// Answer.
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Blobs held and fetches in progress.
    Blobs {
        /// Answer.
        reply: oneshot::Sender<Vec<crate::views::BlobView>>,
    },
    /// Where the allocations of a service run, and each node's API address, for logs.
    LogTargets {
        /// Service.
        name: String,
        /// Only this slot.
        slot: Option<u32>,
        /// Answer: (slot, node, alloc id, that node's API address).
        reply: oneshot::Sender<Result<Vec<LogTarget>, ApiError>>,
    },
}

/// Where one allocation's logs are.
#[derive(Debug, Clone)]
pub struct LogTarget {
    /// Slot number.
    pub slot: u32,
    /// Node running it.
    pub node: String,
    /// Allocation id.
    pub alloc_id: String,
    /// The node's published API address (empty if unknown).
    pub api: String,
    /// Whether the node is this agent.
    pub local: bool,
}

/// A component compiled off the driver task.
pub struct Compiled {
    key: String,
    blob: String,
    wasm: Vec<u8>,
    result: Result<(), String>,
}

/// Why an API request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request itself is wrong (bad key, too large, not UTF-8).
    #[error("{0}")]
    BadRequest(String),
    /// The key does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The write could not be made durable.
    #[error("{0}")]
    Storage(String),
    /// The agent is shutting down.
    #[error("agent is shutting down")]
    Unavailable,
    /// Another agent that holds the answer could not be reached.
    #[error("{0}")]
    Unreachable(String),
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Driver {
    cfg: AgentConfig,
    node: Node,
    net: Net,
    store: RedbStore,
    start: Instant,
    probe: Probe,
    published: Option<(Resources, Instant)>,
    persist_errors: u64,
    pending: Vec<Entry>,
    blobs: blobs::Blobs,
    host: Arc<PolicyHost>,
    plugins: plugins::Plugins,
    kv: plugins::KvMirror,
    compiled_tx: mpsc::Sender<Compiled>,
    published_plugins: Option<Vec<u8>>,
    orch: orchestrate::Orch,
    drivers: Vec<String>,
    /// Some peer has been alive at some point since start.
    ever_joined: bool,
    /// A reason to stop the agent (e.g. our name is held by a live node).
    fatal: Option<String>,
    /// While no seed has let us in: why, for `shoal nodes` (`not joined: …`).
    join_note: Option<String>,
    /// When each seed's failure was last logged.
    join_warned: BTreeMap<std::net::SocketAddr, Instant>,
    /// How long loop turns take, by branch.
    turns: BTreeMap<&'static str, shoal_core::Histogram>,
}

impl Driver {
    fn now(&self) -> Now {
        Now {
            mono_ms: self.start.elapsed().as_millis() as u64,
            wall_ms: wall_ms(),
        }
    }

    /// Carries out everything the core asked for. Entries are made durable
    /// before any frame of this batch leaves.
    fn flush(&mut self) -> Result<(), shoal_store::StoreError> {
        let mut sends = Vec::new();
        while let Some(out) = self.node.poll_output() {
            match out {
                Output::Transmit {
                    to,
                    reliable,
                    bytes,
                } => sends.push((to, reliable, bytes)),
                Output::Event(Event::Changed(e)) => {
                    self.on_changed(&e);
                    if !e.is_node_owned() {
                        self.pending.push(e);
                    }
                }
                Output::Event(Event::MemberUp(id)) => {
                    self.ever_joined = true;
                    tracing::info!(peer = %id.name, addr = %id.addr, "member up");
                }
                Output::Event(Event::IdentityRefused {
                    name,
                    claimant,
                    holder,
                }) => {
                    tracing::warn!(
                        %name, %claimant, %holder,
                        "refused a second agent named {name} at {claimant}: a live node holds the name at {holder}"
                    );
                }
                Output::Event(Event::IdentityReplaced { name, old, new }) => {
                    tracing::info!(%name, %old, %new, "{name} restarted at {new}; its old identity at {old} no longer answers");
                }
                Output::Event(Event::JoinRefused { by, reason }) => {
                    if self.ever_joined {
                        tracing::warn!(peer = %by, "peer refused our SWIM packets: {reason}");
                    } else {
                        tracing::error!(peer = %by, "cannot join: {reason}");
                        self.fatal.get_or_insert(reason);
                    }
                }
                Output::Event(Event::Rejoined(id)) => {
                    tracing::info!(gen = id.gen, "the cluster had declared this node down; rejoined under a renewed identity");
                }
                Output::Event(Event::MemberDown(id)) => {
                    tracing::info!(peer = %id.name, addr = %id.addr, "member down");
                }
                Output::Event(Event::Blob {
                    from_name,
                    from,
                    payload,
                }) => {
                    let now = self.now().mono_ms;
                    // Chunk reads and writes hit the disk.
                    let answer = tokio::task::block_in_place(|| {
                        self.blobs.on_message(&from_name, &payload, now)
                    });
                    match answer {
                        Ok(Some(reply)) => {
                            sends.push((from, true, wire::encode(&Msg::Blob(reply))));
                        }
                        Ok(None) => {}
                        Err(e) => tracing::debug!(peer = %from_name, "bad blob message: {e}"),
                    }
                }
            }
        }
        self.pump_blobs(&mut sends);
        let result = if self.pending.is_empty() {
            Ok(())
        } else {
            let batch = std::mem::take(&mut self.pending);
            let saved = tokio::task::block_in_place(|| self.store.save(&batch));
            if let Err(e) = &saved {
                // Keep the batch: the next flush retries it.
                self.persist_errors += 1;
                tracing::error!("persisting {} entries failed: {e}", batch.len());
                self.pending = batch;
            }
            saved
        };
        for (to, reliable, bytes) in sends {
            self.net.send(to, reliable, bytes);
        }
        result
    }

    /// Sends pending download requests and handles finished downloads.
    fn pump_blobs(&mut self, sends: &mut Vec<(std::net::SocketAddr, bool, Vec<u8>)>) {
        let now = self.now();
        let requests = self.blobs.poll_requests(now.mono_ms);
        if !requests.is_empty() {
            let addrs: BTreeMap<String, std::net::SocketAddr> = self
                .node
                .members()
                .into_iter()
                .filter(|(_, st)| matches!(st, Status::Alive | Status::Suspect))
                .map(|(id, _)| (id.name, id.addr))
                .collect();
            for (peer, payload) in requests {
                match addrs.get(&peer) {
                    Some(&addr) => sends.push((addr, true, wire::encode(&Msg::Blob(payload)))),
                    None => self.blobs.send_failed(&peer, &payload, now.mono_ms),
                }
            }
        }
        for done in self.blobs.take_finished() {
            let waiting = self.plugins.waiting_for(&done.id);
            match done.result {
                Ok(()) => {
                    tracing::info!(blob = %done.id, "blob fetched and verified");
                    self.advertise_blob(&done.id);
                    for key in waiting {
                        self.start_compile(&key, done.id);
                    }
                }
                Err(reason) => {
                    tracing::warn!(blob = %done.id, "blob fetch failed: {reason}");
                    for key in waiting {
                        self.fail_plugin(&key, format!("fetching blob {}: {reason}", done.id));
                    }
                }
            }
        }
    }

    /// Reacts to a replicated change: plugin bindings, blob advertisements, kv for plugins.
    fn on_changed(&mut self, e: &Entry) {
        self.kv.apply(e);
        if orchestrate::is_orch_key(&e.key) {
            self.orch.dirty = true;
        }
        if e.key.starts_with(plugins::PLUGIN_PREFIX) {
            self.binding_changed(e);
        } else if let Some((owner, id)) = e
            .key
            .strip_prefix(NODE_PREFIX)
            .and_then(|rest| rest.split_once(blobs::BLOB_INFIX))
        {
            if owner != self.cfg.name && !e.is_tombstone() {
                if let Ok(id) = id.parse::<shoal_blob::BlobId>() {
                    self.blobs.add_peer(&id, owner);
                    // A binding may have arrived before the advertisement of its
                    // blob (they spread independently): fetch now that someone has it.
                    let hex = id.to_string();
                    let waiting: Vec<String> = self
                        .plugins
                        .bindings
                        .iter()
                        .filter(|(_, (b, l))| {
                            b.blob == hex
                                && matches!(
                                    l,
                                    plugins::Local::Fetching | plugins::Local::Failed { .. }
                                )
                        })
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in waiting {
                        self.ensure_plugin(&key);
                    }
                }
            }
        }
    }

    fn binding_changed(&mut self, e: &Entry) {
        let Some(value) = e.value.as_deref() else {
            if let Some((b, _)) = self.plugins.bindings.remove(&e.key) {
                self.host.remove(b.kind, b.service.as_deref());
            }
            return;
        };
        let binding: plugins::Binding = match serde_json::from_slice(value) {
            Ok(b) => b,
            Err(err) => {
                tracing::warn!(key = %e.key, "ignoring unreadable plugin binding: {err}");
                return;
            }
        };
        if let Some((old, _)) = self.plugins.bindings.get(&e.key) {
            if old.blob == binding.blob {
                return;
            }
        }
        tracing::info!(kind = %binding.kind, name = %binding.name, hash = %binding.hash, "plugin binding changed");
        self.plugins
            .bindings
            .insert(e.key.clone(), (binding, plugins::Local::Fetching));
        self.ensure_plugin(&e.key);
    }

    /// Moves a binding towards installed: fetch its blob, or compile it if present.
    fn ensure_plugin(&mut self, key: &str) {
        let Some((b, _)) = self.plugins.bindings.get(key) else {
            return;
        };
        let id = match b.blob.parse::<shoal_blob::BlobId>() {
            Ok(id) => id,
            Err(e) => {
                self.set_local(
                    key,
                    plugins::Local::Failed {
                        reason: e.to_string(),
                        attempts: 1,
                    },
                );
                return;
            }
        };
        if self.blobs.store().has(&id) {
            self.start_compile(key, id);
        } else {
            let peers = blobs::advertisers(self.node.state(), &id, &self.cfg.name);
            self.set_local(key, plugins::Local::Fetching);
            // With no advertiser known yet, wait for one (see `on_changed`)
            // rather than start a fetch that can only fail.
            if !peers.is_empty() {
                self.blobs.want(id, peers);
            }
        }
    }

    fn set_local(&mut self, key: &str, local: plugins::Local) {
        if let Some(entry) = self.plugins.bindings.get_mut(key) {
            entry.1 = local;
        }
    }

    fn start_compile(&mut self, key: &str, id: shoal_blob::BlobId) {
        let Some((b, _)) = self.plugins.bindings.get(key).cloned() else {
            return;
        };
        let wasm = match tokio::task::block_in_place(|| self.blobs.store().read_all(&id)) {
            Ok(w) => w,
            Err(e) => {
                self.fail_plugin(key, format!("reading blob {id}: {e}"));
                return;
            }
        };
        self.set_local(key, plugins::Local::Compiling);
        let host = self.host.clone();
        let tx = self.compiled_tx.clone();
        let key = key.to_string();
        // Compiling takes Cranelift a while; the driver keeps serving meanwhile.
        // `validate` leaves the compiled artifact in the cache, so the install
        // on the driver task afterwards is a quick load.
        tokio::task::spawn_blocking(move || {
            let result = host.validate(b.kind, &wasm).map_err(|e| e.to_string());
            let _ = tx.blocking_send(Compiled {
                key,
                blob: b.blob,
                wasm,
                result,
            });
        });
    }

    fn fail_plugin(&mut self, key: &str, reason: String) {
        tracing::warn!(binding = key, "plugin not activated: {reason}");
        let attempts = match self.plugins.bindings.get(key) {
            Some((_, plugins::Local::Failed { attempts, .. })) => attempts + 1,
            _ => 1,
        };
        self.set_local(key, plugins::Local::Failed { reason, attempts });
    }

    fn on_compiled(&mut self, c: Compiled) {
        let Some((b, _)) = self.plugins.bindings.get(&c.key).cloned() else {
            return;
        };
        if b.blob != c.blob {
            return; // A newer binding replaced this one while it compiled.
        }
        let installed = c.result.and_then(|()| {
            tokio::task::block_in_place(|| {
                self.host
                    .install(b.kind, b.service.as_deref(), &b.name, &c.wasm)
                    .map_err(|e| e.to_string())
            })
        });
        match installed {
            Ok(hash) => {
                tracing::info!(kind = %b.kind, name = %b.name, %hash, "plugin active");
                self.set_local(&c.key, plugins::Local::Installed);
            }
            Err(reason) => self.fail_plugin(&c.key, reason),
        }
        self.publish_plugins();
    }

    /// Retries failed bindings (a peer may have come back) a bounded number of times.
    fn retry_plugins(&mut self) {
        let retry: Vec<String> = self
            .plugins
            .bindings
            .iter()
            .filter(|(_, (_, l))| matches!(l, plugins::Local::Failed { attempts, .. } if *attempts < 10))
            .map(|(k, _)| k.clone())
            .collect();
        for key in retry {
            self.ensure_plugin(&key);
        }
    }

    /// Publishes this agent's plugin states when they changed.
    fn publish_plugins(&mut self) {
        let rows = self.plugins.rows(&self.cfg.name, &self.host);
        let Ok(json) = serde_json::to_vec(&rows) else {
            return;
        };
        if self.published_plugins.as_ref() == Some(&json) {
            return;
        }
        let key = self.node.node_key(plugins::PLUGINS_SUFFIX);
        let now = self.now();
        if self.node.put(&key, Some(json.clone()), now).is_ok() {
            self.published_plugins = Some(json);
        }
    }

    fn install_plugin(
        &mut self,
        kind: PolicyKind,
        service: Option<String>,
        name: String,
        wasm: Vec<u8>,
    ) -> Result<plugins::Binding, ApiError> {
        let id = tokio::task::block_in_place(|| self.blobs.store().put_bytes(&wasm))
            .map_err(|e| ApiError::Storage(format!("storing the plugin blob: {e}")))?;
        self.advertise_blob(&id);
        let binding = plugins::Binding {
            kind,
            service: service.clone(),
            name,
            blob: id.to_string(),
            hash: blake3::hash(&wasm).to_hex().to_string(),
            size: wasm.len() as u64,
            installed_by: self.cfg.name.clone(),
            installed_ms: wall_ms(),
        };
        let value = serde_json::to_vec(&binding).map_err(|e| ApiError::Storage(e.to_string()))?;
        let key = plugins::binding_key(kind, service.as_deref());
        let now = self.now();
        self.node
            .put(&key, Some(value), now)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        self.flush().map_err(|e| {
            ApiError::Storage(format!("binding applied in memory but not persisted: {e}"))
        })?;
        Ok(binding)
    }

    fn plugin_rows(&self, all: bool) -> Vec<plugins::PluginRow> {
        if !all {
            return self.plugins.rows(&self.cfg.name, &self.host);
        }
        let mut rows = Vec::new();
        for (id, status) in self.node.members() {
            if matches!(status, Status::Down | Status::Left) {
                continue;
            }
            if id.name == self.cfg.name {
                rows.extend(self.plugins.rows(&self.cfg.name, &self.host));
                continue;
            }
            let key = format!("{NODE_PREFIX}{}/{}", id.name, plugins::PLUGINS_SUFFIX);
            if let Some(v) = self.node.state().value(&key) {
                if let Ok(r) = serde_json::from_slice::<Vec<plugins::PluginRow>>(v) {
                    rows.extend(r);
                }
            }
        }
        rows
    }

    /// The scheduler's view: every member with labels, capacity and what the slots
    /// reserve on it.
    fn snapshot(&self) -> shoal_policy::Snapshot {
        self.orch.snapshot(self.node.state())
    }

    /// Tells the cluster this node holds `id`.
    fn advertise_blob(&mut self, id: &shoal_blob::BlobId) {
        let key = blobs::advert_key(&self.cfg.name, id);
        let now = self.now();
        if let Err(e) = self.node.put(&key, Some(Vec::new()), now) {
            tracing::warn!("advertising blob {id} failed: {e}");
        }
    }

    fn publish_info(&mut self) -> anyhow::Result<()> {
        let info = NodeInfo {
            name: self.cfg.name.clone(),
            addr: self.cfg.advertise.to_string(),
            labels: self.cfg.labels.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_ms: wall_ms(),
            api: self.cfg.api.to_string(),
            drivers: self.drivers.clone(),
        };
        let key = self.node.node_key("info");
        let now = self.now();
        self.node.put(&key, Some(serde_json::to_vec(&info)?), now)?;
        Ok(())
    }

    /// Until some seed lets us in, says why not: a warning per seed (at most every
    /// [`JOIN_WARN_EVERY`]) and the `not joined: …` note `shoal nodes` shows.
    fn check_join(&mut self) {
        if self.ever_joined || self.node.joined() {
            if self.join_note.take().is_some() {
                tracing::info!("joined the cluster");
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
    }

    fn refresh_resources(&mut self) {
        let r = self.probe.read();
        let stale = match &self.published {
            None => true,
            Some((old, at)) => old.differs(&r) || at.elapsed() > Duration::from_secs(60),
        };
        if !stale {
            return;
        }
        let key = self.node.node_key("resources");
        let now = self.now();
        match serde_json::to_vec(&r) {
            Ok(bytes) => {
                if let Err(e) = self.node.put(&key, Some(bytes), now) {
                    tracing::warn!("publishing resources failed: {e}");
                } else {
                    self.published = Some((r, Instant::now()));
                }
            }
            Err(e) => tracing::warn!("encoding resources failed: {e}"),
        }
    }

    fn nodes(&self) -> Vec<NodeView> {
        let state = self.node.state();
        self.node
            .members()
            .into_iter()
            .map(|(id, status)| {
                let read =
                    |suffix: &str| state.value(&format!("{NODE_PREFIX}{}/{suffix}", id.name));
                let info: Option<NodeInfo> =
                    read("info").and_then(|b| serde_json::from_slice(b).ok());
                let resources: Option<Resources> =
                    read("resources").and_then(|b| serde_json::from_slice(b).ok());
                NodeView {
                    name: id.name.clone(),
                    addr: id.addr.to_string(),
                    status: status.as_str().to_string(),
                    gen: id.gen,
                    labels: info.map(|i| i.labels).unwrap_or_default(),
                    resources,
                    note: (id.name == self.cfg.name)
                        .then(|| self.join_note.clone())
                        .flatten(),
                }
            })
            .collect()
    }

    fn metrics(&self) -> String {
        let mut members: BTreeMap<Status, usize> = BTreeMap::new();
        for (_, st) in self.node.members() {
            *members.entry(st).or_default() += 1;
        }
        metrics::render(&metrics::Snapshot {
            members,
            core: self.node.stats(),
            net: self.net.stats(),
            keys: self.node.state().len(),
            persist_errors: self.persist_errors,
            steward_passes: self.orch.passes,
            steward_writes: self.orch.writes,
            allocations: self.orch.allocation_states(),
            turns: &self.turns,
        })
    }

    fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Put { key, value, reply } => {
                if let Some(why) = keys::refusal(&key) {
                    let _ = reply.send(Err(ApiError::BadRequest(why)));
                    return;
                }
                let is_delete = value.is_none();
                if is_delete && self.node.state().value(&key).is_none() {
                    let _ = reply.send(Err(ApiError::NotFound(format!("key not found: {key}"))));
                    return;
                }
                let now = self.now();
                let res = match self.node.put(&key, value, now) {
                    Err(e) => Err(ApiError::BadRequest(e.to_string())),
                    Ok(entry) => match self.flush() {
                        Ok(()) => Ok(entry),
                        Err(e) => Err(ApiError::Storage(format!(
                            "write applied in memory but not persisted: {e}"
                        ))),
                    },
                };
                let _ = reply.send(res);
            }
            Command::Get { key, reply } => {
                let e = self
                    .node
                    .state()
                    .get(&key)
                    .filter(|e| !e.is_tombstone())
                    .cloned();
                let _ = reply.send(e);
            }
            Command::List {
                prefix,
                internal,
                reply,
            } => {
                let v = self
                    .node
                    .state()
                    .scan_prefix(&prefix)
                    .filter(|e| keys::is_user(&e.key) != internal)
                    .cloned()
                    .collect();
                let _ = reply.send(v);
            }
            Command::Nodes { reply } => {
                let _ = reply.send(self.nodes());
            }
            Command::Metrics { reply } => {
                let _ = reply.send(self.metrics());
            }
            Command::InstallPlugin {
                kind,
                service,
                name,
                wasm,
                reply,
            } => {
                let res = self.install_plugin(kind, service, name, wasm);
                let _ = reply.send(res);
            }
            Command::RemovePlugin {
                kind,
                service,
                reply,
            } => {
                let key = plugins::binding_key(kind, service.as_deref());
                let res = if self.node.state().value(&key).is_none() {
                    Err(ApiError::NotFound(format!(
                        "no {kind} plugin is installed{}",
                        service.map_or(String::new(), |s| format!(" for service {s}"))
                    )))
                } else {
                    let now = self.now();
                    match self.node.put(&key, None, now) {
                        Err(e) => Err(ApiError::BadRequest(e.to_string())),
                        Ok(_) => self.flush().map_err(|e| ApiError::Storage(e.to_string())),
                    }
                };
                let _ = reply.send(res);
            }
            Command::Plugins { all, reply } => {
                let _ = reply.send(self.plugin_rows(all));
            }
            Command::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Command::Deploy { spec, reply } => {
                // Accepted either way (a dependency may be deployed next), but said.
                let warnings = spec
                    .depends_on
                    .iter()
                    .filter(|d| self.orch.live_record(self.node.state(), d).is_err())
                    .map(|d| format!("dependency {d} does not exist (yet): replicas wait for it"))
                    .collect();
                let (record, changed) = self.orch.deploy(self.node.state(), *spec);
                let view = DeployView {
                    name: record.spec.name.clone(),
                    version: record.version,
                    replicas: record.replicas,
                    changed,
                    warnings,
                };
                let res = if changed {
                    self.put_record(&record).map(|()| view)
                } else {
                    Ok(view)
                };
                let _ = reply.send(res);
            }
            Command::Scale {
                name,
                replicas,
                reply,
            } => {
                let res = self
                    .orch
                    .live_record(self.node.state(), &name)
                    .and_then(|r| {
                        r.scaled(replicas)
                            .map_err(|e| ApiError::BadRequest(e.to_string()))
                    })
                    .and_then(|r| {
                        self.put_record(&r)?;
                        Ok(DeployView {
                            name: name.clone(),
                            version: r.version,
                            replicas: r.replicas,
                            changed: true,
                            warnings: Vec::new(),
                        })
                    });
                let _ = reply.send(res);
            }
            Command::Remove { name, reply } => {
                let res = self
                    .orch
                    .live_record(self.node.state(), &name)
                    .and_then(|r| {
                        let r = r.removed();
                        self.put_record(&r)?;
                        Ok(DeployView {
                            name: name.clone(),
                            version: r.version,
                            replicas: 0,
                            changed: true,
                            warnings: Vec::new(),
                        })
                    });
                let _ = reply.send(res);
            }
            Command::Services { reply } => {
                let _ = reply.send(self.orch.services(self.node.state()));
            }
            Command::Ps { name, reply } => {
                let res = self
                    .orch
                    .ps(self.node.state(), &name)
                    .map(|(service, slots)| PsView { service, slots });
                let _ = reply.send(res);
            }
            Command::FetchBlob { id, reply } => {
                let res = if self.blobs.store().has(&id) {
                    Ok(())
                } else {
                    let peers = blobs::advertisers(self.node.state(), &id, &self.cfg.name);
                    if peers.is_empty() {
                        Err(ApiError::NotFound(format!("no node advertises blob {id}")))
                    } else {
                        self.blobs.want(id, peers);
                        Ok(())
                    }
                };
                let _ = reply.send(res);
            }
            Command::Blobs { reply } => {
                let mut out: Vec<crate::views::BlobView> = self
                    .blobs
                    .in_progress()
                    .into_iter()
                    .map(|(id, done, total)| crate::views::BlobView {
                        id: id.to_string(),
                        state: "fetching".into(),
                        chunks_done: done,
                        chunks_total: total,
                    })
                    .collect();
                for id in self.blobs.store().list().unwrap_or_default() {
                    let chunks = self
                        .blobs
                        .store()
                        .manifest(&id)
                        .map(|m| m.num_chunks())
                        .unwrap_or(0);
                    out.push(crate::views::BlobView {
                        id: id.to_string(),
                        state: "held".into(),
                        chunks_done: chunks,
                        chunks_total: Some(chunks),
                    });
                }
                let _ = reply.send(out);
            }
            Command::LogTargets { name, slot, reply } => {
                let res = self.log_targets(&name, slot);
                let _ = reply.send(res);
            }
        }
    }

    /// Writes a service record durably.
    fn put_record(&mut self, r: &shoal_orch::ServiceRecord) -> Result<(), ApiError> {
        let key = shoal_orch::service_key(&r.spec.name);
        let now = self.now();
        self.node
            .put(&key, Some(shoal_orch::encode(r)), now)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        self.orch.dirty = true;
        self.flush().map_err(|e| {
            ApiError::Storage(format!("service applied in memory but not persisted: {e}"))
        })
    }

    fn log_targets(&self, name: &str, slot: Option<u32>) -> Result<Vec<LogTarget>, ApiError> {
        let (_, rows) = self.orch.ps(self.node.state(), name)?;
        let mut out = Vec::new();
        for row in rows {
            if slot.is_some_and(|s| s != row.slot) {
                continue;
            }
            let (Some(node), Some(alloc_id)) = (row.node, row.alloc_id) else {
                continue;
            };
            let api = self
                .node
                .state()
                .value(&format!("{NODE_PREFIX}{node}/info"))
                .and_then(|v| serde_json::from_slice::<NodeInfo>(v).ok())
                .map(|i| i.api)
                .unwrap_or_default();
            out.push(LogTarget {
                slot: row.slot,
                local: node == self.cfg.name,
                node,
                alloc_id,
                api,
            });
        }
        if out.is_empty() {
            return Err(ApiError::NotFound(match slot {
                Some(s) => format!("service {name} has no allocation in slot {s}"),
                None => format!("service {name} has no allocations"),
            }));
        }
        Ok(out)
    }

    /// One orchestration pass (see [`orchestrate`]).
    fn orchestrate(&mut self) {
        let now = self.now();
        let host = self.host.clone();
        self.orch.pass(&mut self.node, &host, now);
    }

    fn on_exec(&mut self, ev: executor::ExecEvent) {
        match ev {
            executor::ExecEvent::Report(id, report) => {
                let (key, value) = self.orch.on_report(&id, report);
                let now = self.now();
                if let Err(e) = self.node.put(&key, value, now) {
                    tracing::warn!(alloc = %id, "publishing a report failed: {e}");
                }
            }
            executor::ExecEvent::Ready => self.orch.executor_ready(),
        }
    }
}

/// A loop turn at least this long is logged.
const SLOW_TURN: Duration = Duration::from_millis(50);
/// A start-up grace before seeds that have not answered are reported.
const JOIN_GRACE: Duration = Duration::from_secs(3);
/// How often each failing seed is logged while the agent is not joined.
const JOIN_WARN_EVERY: Duration = Duration::from_secs(30);
/// How long after an orchestration change the next pass runs.
const ORCH_DEBOUNCE: Duration = Duration::from_millis(100);
/// Orchestration pass interval without changes (health and time-driven decisions).
const ORCH_INTERVAL: Duration = Duration::from_secs(1);
/// How often the images Docker holds are listed.
const IMAGES_INTERVAL: Duration = Duration::from_secs(10);

/// The process driver, and the docker driver when wanted and the engine answers.
async fn open_runtimes(cfg: &AgentConfig) -> anyhow::Result<executor::Runtimes> {
    let dir = cfg.data_dir.join("workloads");
    let process = shoal_runtime::ProcessDriver::with_logs(&dir, cfg.logs)
        .with_context(|| format!("opening the process driver in {}", dir.display()))?;
    let engine: Result<Arc<shoal_runtime::DockerDriver>, String> = if cfg.docker {
        let mut opts = shoal_runtime::DockerOptions::new(cfg.name.clone());
        opts.timeout = Duration::from_secs(60);
        match tokio::time::timeout(
            Duration::from_secs(5),
            shoal_runtime::DockerDriver::connect_with(opts),
        )
        .await
        {
            Ok(Ok(d)) => Ok(Arc::new(d)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("Docker Engine did not answer within 5 s".into()),
        }
    } else {
        Err("disabled by config (docker = \"off\")".into())
    };
    match &engine {
        Ok(_) => tracing::info!("docker driver ready"),
        Err(e) => tracing::info!("docker driver not available: {e}"),
    }
    Ok(executor::Runtimes {
        process: Arc::new(process),
        docker: engine.clone().map(|d| d as Arc<dyn shoal_runtime::Driver>),
        engine: engine.ok(),
    })
}

fn load_identity(cfg: &AgentConfig) -> anyhow::Result<Identity> {
    let id = match &cfg.tls {
        Tls::SelfIssued { ca_dir } => Identity::self_issued(ca_dir, &cfg.name)
            .with_context(|| format!("issuing a certificate from {}", ca_dir.display()))?,
        Tls::Files { cert, key, ca } => {
            Identity::load(cert, key, ca).context("loading the node certificate")?
        }
    };
    if id.name != cfg.name {
        bail!(
            "the certificate is issued to {:?} but this agent is named {:?}",
            id.name,
            cfg.name
        );
    }
    Ok(id)
}

/// Runs an agent until `shutdown` resolves, then leaves the cluster gracefully.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let store = RedbStore::open(&cfg.data_dir.join("state.redb"))?;
    let identity = load_identity(&cfg)?;
    let (net, mut net_rx) = Net::bind(cfg.listen, &identity, NetConfig::default())
        .with_context(|| format!("binding QUIC on {}", cfg.listen))?;
    let listener = tokio::net::TcpListener::bind(cfg.api)
        .await
        .with_context(|| format!("binding the HTTP API on {}", cfg.api))?;

    let start = Instant::now();
    // Generations must grow across restarts of the same node: microseconds of wall time.
    let gen = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64);
    let seed = gen
        ^ cfg.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let now = Now {
        mono_ms: 0,
        wall_ms: wall_ms(),
    };
    let mut node = Node::new(cfg.core_config(), gen, seed, now);
    let restored = node
        .restore(store.load()?)
        .context("restoring persisted state")?;
    let probe = Probe::new(&cfg.data_dir);
    let blobs = blobs::Blobs::open(&cfg.data_dir.join("blobs"), cfg.upload_rate(), seed)
        .context("opening the blob store")?;
    let kv = plugins::KvMirror::default();
    let host_cfg = HostConfig {
        cache_dir: Some(cfg.policy_cache.clone()),
        ..HostConfig::default()
    };
    let host = tokio::task::block_in_place(|| PolicyHost::new(host_cfg))
        .context("starting the policy host")?
        .with_kv(Arc::new(kv.clone()));
    let (compiled_tx, mut compiled_rx) = mpsc::channel::<Compiled>(16);
    let runtimes = open_runtimes(&cfg).await?;
    let mut drivers = vec!["process".to_string()];
    if runtimes.docker.is_ok() {
        drivers.push("docker".to_string());
    }
    // The images Docker holds, for the scheduler's image-locality preference.
    let (images_tx, mut images_rx) = mpsc::channel::<Vec<String>>(4);
    if let Some(engine) = runtimes.engine.clone() {
        tokio::spawn(async move {
            let mut last = None;
            loop {
                match engine.images().await {
                    Ok(images) if last.as_ref() != Some(&images) => {
                        last = Some(images.clone());
                        if images_tx.send(images).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!("listing docker images failed: {e}"),
                }
                tokio::time::sleep(IMAGES_INTERVAL).await;
            }
        });
    }
    let (desired_tx, desired_rx) = watch::channel(executor::Desired::default());
    let (exec_tx, mut exec_rx) = mpsc::channel::<executor::ExecEvent>(1024);
    let (exec_stop_tx, exec_stop_rx) = watch::channel(false);
    let endpoint_ip = match cfg.advertise.ip() {
        ip if ip.is_unspecified() => std::net::IpAddr::from([127, 0, 0, 1]),
        ip => ip,
    };
    let exec_task = tokio::spawn(executor::run(
        runtimes.clone(),
        endpoint_ip,
        desired_rx,
        exec_tx,
        exec_stop_rx,
        cfg.drain_on_exit,
    ));
    let orch = orchestrate::Orch::new(&cfg.name, wall_ms(), !cfg.join.is_empty(), desired_tx);
    let mut d = Driver {
        orch,
        drivers,
        node,
        net,
        store,
        start,
        probe,
        published: None,
        persist_errors: 0,
        pending: Vec::new(),
        blobs,
        host: Arc::new(host),
        plugins: plugins::Plugins::default(),
        kv,
        compiled_tx,
        published_plugins: None,
        ever_joined: false,
        fatal: None,
        join_note: None,
        join_warned: BTreeMap::new(),
        turns: BTreeMap::new(),
        cfg,
    };
    // Bindings and kv restored from disk take effect as if they had just arrived.
    let restored_entries: Vec<Entry> = d.node.state().entries().cloned().collect();
    for e in &restored_entries {
        d.on_changed(e);
    }
    d.publish_info()?;
    d.refresh_resources();
    // Node-owned state is rebuilt on start: advertise every blob we hold.
    for id in d.blobs.store().list().context("listing held blobs")? {
        d.advertise_blob(&id);
    }
    let now = d.now();
    let seeds = d.cfg.join.clone();
    d.node.join(&seeds, now);
    d.flush()?;

    d.publish_plugins();
    d.flush()?;
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(256);
    let (api_stop_tx, api_stop_rx) = oneshot::channel::<()>();
    let guard = http_guard::HttpGuard {
        hosts: d.cfg.api_hosts.clone(),
        token: d.cfg.api_token.as_deref().map(Arc::from),
    };
    let api_task = tokio::spawn(api::serve(
        listener,
        cmd_tx,
        d.host.clone(),
        runtimes,
        guard,
        api_stop_rx,
    ));
    tracing::info!(
        name = %d.cfg.name, quic = %d.cfg.listen, api = %d.cfg.api, restored,
        "agent started"
    );

    let mut res_tick = tokio::time::interval(d.cfg.resource_interval());
    res_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut last_orch = tokio::time::Instant::now();
    loop {
        let wake = [d.node.poll_timeout(), d.blobs.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .map(|ms| tokio::time::Instant::from_std(d.start + Duration::from_millis(ms)));
        // Orchestration runs 100 ms after a change (batching bursts), else every second.
        let orch_at = last_orch
            + if d.orch.dirty {
                ORCH_DEBOUNCE
            } else {
                ORCH_INTERVAL
            };
        let orch_sleep = tokio::time::sleep_until(orch_at);
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let branch: &'static str;
        let turn = Instant::now();
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(cmd) = cmd_rx.recv() => { branch = "command"; d.handle_command(cmd) },
            Some(inc) = net_rx.recv() => {
                branch = "frame";
                let Incoming { from_name, from, bytes, .. } = inc;
                let now = d.now();
                d.node.handle_frame(&from_name, from, &bytes, now);
            }
            () = sleep => {
                branch = "timer";
                let now = d.now();
                d.node.handle_timeout(now);
                tokio::task::block_in_place(|| d.blobs.handle_timeout(now.mono_ms));
            }
            Some(c) = compiled_rx.recv() => { branch = "compiled"; d.on_compiled(c) },
            Some(ev) = exec_rx.recv() => { branch = "executor"; d.on_exec(ev) },
            Some(images) = images_rx.recv() => {
                branch = "images";
                let key = d.node.node_key(orchestrate::IMAGES_SUFFIX);
                let now = d.now();
                match serde_json::to_vec(&images) {
                    Ok(v) => {
                        if let Err(e) = d.node.put(&key, Some(v), now) {
                            tracing::warn!("publishing images failed: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("encoding images failed: {e}"),
                }
            }
            () = orch_sleep => {
                branch = "orchestrate";
                d.orchestrate();
                last_orch = tokio::time::Instant::now();
            }
            _ = res_tick.tick() => {
                branch = "tick";
                d.check_join();
                d.refresh_resources();
                d.retry_plugins();
                d.publish_plugins();
            }
        }
        // A failed persist is counted, logged and retried on the next flush;
        // it must not stop the agent.
        let _ = d.flush();
        let took = turn.elapsed();
        d.turns
            .entry(branch)
            .or_default()
            .observe(took.as_secs_f64());
        if took >= SLOW_TURN {
            tracing::warn!(
                branch,
                took_ms = took.as_millis() as u64,
                "slow agent loop turn"
            );
        }
        if d.fatal.is_some() {
            break;
        }
    }

    // The executor stops its workloads only when asked to drain; otherwise they
    // keep running and the next start adopts them.
    let _ = exec_stop_tx.send(true);
    let mut exec_task = exec_task;
    loop {
        tokio::select! {
            _ = &mut exec_task => break,
            // Keep draining its events so it never blocks on a full channel.
            ev = exec_rx.recv() => if ev.is_none() {
                let _ = (&mut exec_task).await;
                break;
            },
        }
    }
    tracing::info!(name = %d.cfg.name, "leaving the cluster");
    let now = d.now();
    d.node.leave(now);
    let _ = d.flush();
    let _ = api_stop_tx.send(());
    d.net.close(Duration::from_secs(2)).await;
    let _ = api_task.await;
    match d.fatal {
        Some(reason) => Err(anyhow::anyhow!(reason)),
        None => Ok(()),
    }
}
