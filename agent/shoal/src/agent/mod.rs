//! The agent driver: one task owns the sans-IO core and `select!`s over the
//! network, timers, API commands, resource readings and shutdown.
//!
//! Everything the core asks for happens here: frames go to `shoal-net`,
//! changed cluster-wide entries go to `shoal-store` (fsync'd before a client's
//! write is acknowledged), events become logs and metrics.

pub mod api;
pub mod blobs;
pub mod config;
pub mod metrics;
pub mod resources;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use shoal_core::wire::{self, Msg};
use shoal_core::{Entry, Event, Node, Now, Output, Status, NODE_PREFIX};
use shoal_net::{Identity, Incoming, Net, NetConfig};
use shoal_store::{Persist, RedbStore};
use tokio::sync::{mpsc, oneshot};

use crate::views::{NodeInfo, NodeView};
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
                    if !e.is_node_owned() {
                        self.pending.push(e);
                    }
                }
                Output::Event(Event::MemberUp(id)) => {
                    tracing::info!(peer = %id.name, addr = %id.addr, "member up");
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
            match done.result {
                Ok(()) => {
                    tracing::info!(blob = %done.id, "blob fetched and verified");
                    self.advertise_blob(&done.id);
                }
                Err(reason) => tracing::warn!(blob = %done.id, "blob fetch failed: {reason}"),
            }
        }
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
        };
        let key = self.node.node_key("info");
        let now = self.now();
        self.node.put(&key, Some(serde_json::to_vec(&info)?), now)?;
        Ok(())
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
        })
    }

    fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Put { key, value, reply } => {
                if key.starts_with(NODE_PREFIX) {
                    let _ = reply.send(Err(ApiError::BadRequest(format!(
                        "keys under {NODE_PREFIX:?} are owned by their node and cannot be written through the API"
                    ))));
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
            Command::List { prefix, reply } => {
                let v = self.node.state().scan_prefix(&prefix).cloned().collect();
                let _ = reply.send(v);
            }
            Command::Nodes { reply } => {
                let _ = reply.send(self.nodes());
            }
            Command::Metrics { reply } => {
                let _ = reply.send(self.metrics());
            }
        }
    }
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
    let mut d = Driver {
        node,
        net,
        store,
        start,
        probe,
        published: None,
        persist_errors: 0,
        pending: Vec::new(),
        blobs,
        cfg,
    };
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

    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(256);
    let (api_stop_tx, api_stop_rx) = oneshot::channel::<()>();
    let api_task = tokio::spawn(api::serve(listener, cmd_tx, api_stop_rx));
    tracing::info!(
        name = %d.cfg.name, quic = %d.cfg.listen, api = %d.cfg.api, restored,
        "agent started"
    );

    let mut res_tick = tokio::time::interval(d.cfg.resource_interval());
    res_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        let wake = [d.node.poll_timeout(), d.blobs.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .map(|ms| tokio::time::Instant::from_std(d.start + Duration::from_millis(ms)));
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(cmd) = cmd_rx.recv() => d.handle_command(cmd),
            Some(inc) = net_rx.recv() => {
                let Incoming { from_name, from, bytes, .. } = inc;
                let now = d.now();
                d.node.handle_frame(&from_name, from, &bytes, now);
            }
            () = sleep => {
                let now = d.now();
                d.node.handle_timeout(now);
                tokio::task::block_in_place(|| d.blobs.handle_timeout(now.mono_ms));
            }
            _ = res_tick.tick() => d.refresh_resources(),
        }
        // A failed persist is counted, logged and retried on the next flush;
        // it must not stop the agent.
        let _ = d.flush();
    }

    tracing::info!(name = %d.cfg.name, "leaving the cluster");
    let now = d.now();
    d.node.leave(now);
    let _ = d.flush();
    let _ = api_stop_tx.send(());
    d.net.close(Duration::from_secs(2)).await;
    let _ = api_task.await;
    Ok(())
}
