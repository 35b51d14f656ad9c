//! The blob worker: the agent's blob store in `<data-dir>/blobs`, the serving side
//! under the upload cap, and the downloads in progress — on a thread of its own.
//!
//! Blob chunks are bulk disk I/O and hashing (a multi-GB image is thousands of
//! 1 MiB chunks), so none of it runs on the agent loop: transfer frames
//! ([`shoal_core::wire::Msg::Blob`] on QUIC streams) are routed here by the loop
//! without reaching the core, and the worker sends its requests and answers
//! straight to the network. The loop tells it what to fetch and who is alive
//! ([`BlobCmd`]); it tells the loop what it now holds and which downloads ended
//! ([`BlobEvent`]), and publishes what it holds and fetches ([`BlobStatus`]) for
//! `GET /v1/blobs`.
//!
//! Which blobs a node holds is advertised in node-owned state
//! (`node/<name>/blob/<id>`, see [`super::keys`]), so anyone needing a blob knows
//! whom to ask.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_blob::{BlobId, BlobMsg, BlobStore, Fetch, FetchConfig, RateLimiter, Server, Status};
use shoal_core::wire::{self, Msg};
use shoal_net::Net;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use shoal_api::{human_bytes, BlobView};

/// What the worker is asked to do.
pub enum BlobCmd {
    /// A transfer frame from an authenticated peer.
    Frame {
        /// The sender's certificate name.
        from_name: String,
        /// Where it came from.
        from: SocketAddr,
        /// The whole frame (`Msg::Blob`).
        bytes: Vec<u8>,
    },
    /// Download `id` from `peers` unless it is held or already being fetched.
    Want {
        /// The blob.
        id: BlobId,
        /// Nodes that advertise it.
        peers: Vec<String>,
    },
    /// `peer` now advertises `id`: running downloads of it may use it.
    AddPeer {
        /// The blob.
        id: BlobId,
        /// The node.
        peer: String,
    },
    /// Store these bytes as a blob.
    Put {
        /// The content.
        bytes: Vec<u8>,
        /// The new blob's id, or why it could not be stored.
        reply: oneshot::Sender<Result<BlobId, String>>,
    },
    /// Like `Want`, and answer `done` once `id` is held (at once if it is) or its
    /// download failed.
    Need {
        /// The blob.
        id: BlobId,
        /// Nodes that advertise it.
        peers: Vec<String>,
        /// The answer.
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Someone else put `id` into the store (an image push): advertise it.
    Added(BlobId),
    /// The blobs image records and plugin bindings name: every other blob is removed
    /// once it has been unnamed for the grace, or sooner to make room under the cap.
    Retain(BTreeSet<BlobId>),
    /// Make room for `bytes` more under the cap (evicting unnamed blobs), or say why
    /// it cannot fit.
    Reserve {
        /// Bytes about to be stored.
        bytes: u64,
        /// The answer.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The live peers and their addresses (sent whenever membership changes).
    Peers(BTreeMap<String, SocketAddr>),
}

/// What the worker tells the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobEvent {
    /// The store holds `id` (at start, after a put, after a download): advertise it.
    Holds(BlobId),
    /// A download of `id` has its manifest: advertise it as partly held, so others
    /// fetching it can take the chunks this node already has.
    Fetching(BlobId),
    /// `id` was removed from the store (garbage collection): stop advertising it.
    Dropped(BlobId),
    /// A download ended.
    Fetched {
        /// The blob.
        id: BlobId,
        /// `Err(reason)` if it failed.
        result: Result<(), String>,
    },
}

/// What the store holds and fetches, for `GET /v1/blobs`.
#[derive(Debug, Clone, Default)]
pub struct BlobStatus {
    /// One row per blob held or being fetched.
    pub blobs: Vec<BlobView>,
    /// Chunk bytes sent to peers since start.
    pub served_bytes: u64,
    /// Chunk bytes received from peers since start (verified or not).
    pub fetched_bytes: u64,
    /// Bytes of the blobs held.
    pub held_bytes: u64,
    /// Blobs removed by garbage collection since start.
    pub collected: u64,
}

/// The worker's state.
struct Worker {
    store: BlobStore,
    server: Server,
    fetches: BTreeMap<BlobId, Fetch<String>>,
    peers: BTreeMap<String, SocketAddr>,
    net: Net,
    events: mpsc::Sender<BlobEvent>,
    status: watch::Sender<Arc<BlobStatus>>,
    start: Instant,
    seed: u64,
    status_at: Instant,
    /// Bytes served and fetched as last published.
    published_counters: (u64, u64),
    /// Downloads already advertised as partly held.
    announced: BTreeSet<BlobId>,
    /// Who waits for which download.
    waiters: BTreeMap<BlobId, Vec<oneshot::Sender<Result<(), String>>>>,
    /// Garbage collection and the disk cap.
    gc: Gc,
    /// Chunk bytes received.
    fetched_bytes: u64,
    /// Blobs removed by garbage collection.
    collected: u64,
}

/// What the store may keep: the blobs named by records, the cap, the grace.
pub struct GcConfig {
    /// Disk cap in bytes (`None`: none).
    pub cap: Option<u64>,
    /// How long an unnamed blob is kept.
    pub grace: Duration,
}

struct Gc {
    cfg: GcConfig,
    /// Named blobs; `None` until the first [`BlobCmd::Retain`] (nothing is removed
    /// before the agent knows what is named).
    named: Option<BTreeSet<BlobId>>,
    /// Since when each held blob has been unnamed.
    unnamed_since: BTreeMap<BlobId, Instant>,
}

/// How often unnamed blobs are looked for.
const GC_EVERY: Duration = Duration::from_secs(5);

/// How often download progress is republished while fetches run.
const STATUS_EVERY: Duration = Duration::from_millis(250);

/// Opens the store in `dir` (uploads capped at `upload_bytes_per_sec`, 0: none).
pub fn open(dir: &Path) -> Result<BlobStore, shoal_blob::StoreError> {
    BlobStore::open(dir)
}

/// Runs the worker on the current thread until `stop` is cancelled or the command
/// channel closes. Call it on a thread of its own (it does blocking disk I/O).
#[allow(clippy::too_many_arguments)]
pub fn run(
    store: BlobStore,
    upload_bytes_per_sec: u64,
    gc: GcConfig,
    net: Net,
    seed: u64,
    commands: mpsc::Receiver<BlobCmd>,
    events: mpsc::Sender<BlobEvent>,
    status: watch::Sender<Arc<BlobStatus>>,
    stop: CancellationToken,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("the blob worker cannot start: {e}");
            return;
        }
    };
    let limiter = RateLimiter::new(upload_bytes_per_sec, upload_bytes_per_sec.max(8 << 20));
    let mut w = Worker {
        server: Server::new(store.clone(), limiter),
        store,
        fetches: BTreeMap::new(),
        peers: BTreeMap::new(),
        net,
        events,
        status,
        start: Instant::now(),
        seed,
        status_at: Instant::now(),
        waiters: BTreeMap::new(),
        announced: BTreeSet::new(),
        published_counters: (0, 0),
        fetched_bytes: 0,
        collected: 0,
        gc: Gc {
            cfg: gc,
            named: None,
            unnamed_since: BTreeMap::new(),
        },
    };
    rt.block_on(w.run(commands, stop));
}

impl Worker {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    async fn run(&mut self, mut commands: mpsc::Receiver<BlobCmd>, stop: CancellationToken) {
        // Node-owned state is rebuilt on start: advertise every blob held.
        match self.store.list() {
            Ok(ids) => {
                for id in ids {
                    let _ = self.events.send(BlobEvent::Holds(id)).await;
                }
            }
            Err(e) => tracing::warn!("listing held blobs failed: {e}"),
        }
        self.publish_status();
        let mut status_tick = tokio::time::interval(Duration::from_secs(1));
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gc_tick = tokio::time::interval(GC_EVERY);
        gc_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let sleep = super::sleep_until(
                self.fetches
                    .values()
                    .filter_map(Fetch::poll_timeout)
                    .min()
                    .map(|ms| super::at_ms(self.start, ms)),
            );
            tokio::select! {
                () = stop.cancelled() => return,
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                },
                () = sleep => {
                    let now = self.now_ms();
                    for f in self.fetches.values_mut() {
                        f.handle_timeout(now);
                    }
                }
                _ = gc_tick.tick() => self.collect(),
                _ = status_tick.tick() => {
                    // Serving alone changes no row, only the byte counters.
                    let counters = (self.server.stats().bytes_sent, self.fetched_bytes);
                    if counters != self.published_counters {
                        self.publish_status();
                    }
                }
            }
            self.pump().await;
        }
    }

    fn handle(&mut self, cmd: BlobCmd) {
        match cmd {
            BlobCmd::Frame {
                from_name,
                from,
                bytes,
            } => self.on_frame(&from_name, from, &bytes),
            BlobCmd::Want { id, peers } => self.want(id, peers),
            BlobCmd::AddPeer { id, peer } => {
                if let Some(f) = self.fetches.get_mut(&id) {
                    f.add_peer(peer);
                }
            }
            BlobCmd::Put { bytes, reply } => {
                let res = self.store.put_bytes(&bytes).map_err(|e| e.to_string());
                if let Ok(id) = &res {
                    let _ = self.events.try_send(BlobEvent::Holds(*id));
                }
                let _ = reply.send(res);
                self.publish_status();
            }
            BlobCmd::Need { id, peers, done } => {
                if self.store.has(&id) {
                    let _ = done.send(Ok(()));
                    return;
                }
                self.waiters.entry(id).or_default().push(done);
                self.want(id, peers);
            }
            BlobCmd::Added(id) => {
                let _ = self.events.try_send(BlobEvent::Holds(id));
                self.publish_status();
            }
            BlobCmd::Retain(named) => {
                self.gc.named = Some(named);
                self.collect();
            }
            BlobCmd::Reserve { bytes, reply } => {
                let _ = reply.send(self.reserve(bytes));
            }
            BlobCmd::Peers(peers) => self.peers = peers,
        }
    }

    /// Bytes of every blob held.
    fn held_bytes(&self) -> u64 {
        self.store
            .list()
            .unwrap_or_default()
            .iter()
            .filter_map(|id| self.store.manifest(id).ok())
            .map(|m| m.size())
            .sum()
    }

    /// Held blobs no record names, oldest-unnamed first.
    fn unnamed(&self) -> Vec<BlobId> {
        let Some(named) = &self.gc.named else {
            return Vec::new();
        };
        let mut v: Vec<(Instant, BlobId)> = self
            .store
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|id| !named.contains(id) && !self.fetches.contains_key(id))
            .map(|id| {
                let since = self
                    .gc
                    .unnamed_since
                    .get(&id)
                    .copied()
                    .unwrap_or_else(Instant::now);
                (since, id)
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, id)| id).collect()
    }

    fn drop_blob(&mut self, id: &BlobId, why: &str) {
        match self.store.remove(id) {
            Ok(true) => {
                tracing::info!(blob = %id, "removed an unreferenced blob ({why})");
                self.collected += 1;
                self.gc.unnamed_since.remove(id);
                let _ = self.events.try_send(BlobEvent::Dropped(*id));
            }
            Ok(false) => {
                self.gc.unnamed_since.remove(id);
            }
            Err(e) => tracing::warn!(blob = %id, "removing an unreferenced blob failed: {e}"),
        }
    }

    /// Removes blobs unnamed for longer than the grace.
    fn collect(&mut self) {
        let Some(named) = self.gc.named.clone() else {
            return;
        };
        let held = self.store.list().unwrap_or_default();
        let now = Instant::now();
        self.gc.unnamed_since.retain(|id, _| !named.contains(id));
        let mut expired = Vec::new();
        for id in held {
            if named.contains(&id) || self.fetches.contains_key(&id) {
                continue;
            }
            let since = *self.gc.unnamed_since.entry(id).or_insert(now);
            if now.duration_since(since) >= self.gc.cfg.grace {
                expired.push(id);
            }
        }
        for id in &expired {
            self.drop_blob(id, "past the grace");
        }
        if !expired.is_empty() {
            self.publish_status();
        }
    }

    /// Makes room for `bytes` under the cap, evicting unnamed blobs oldest first.
    fn reserve(&mut self, bytes: u64) -> Result<(), String> {
        let Some(cap) = self.gc.cfg.cap else {
            return Ok(());
        };
        let mut held = self.held_bytes();
        if held.saturating_add(bytes) <= cap {
            return Ok(());
        }
        for id in self.unnamed() {
            if held.saturating_add(bytes) <= cap {
                break;
            }
            let size = self.store.manifest(&id).map(|m| m.size()).unwrap_or(0);
            self.drop_blob(&id, "to make room under --blob-cap");
            held = held.saturating_sub(size);
        }
        self.publish_status();
        if held.saturating_add(bytes) <= cap {
            Ok(())
        } else {
            Err(format!(
                "the blob store of this node is full: {} more do not fit under --blob-cap {} ({} held by image records and plugins); remove images with `shoal image rm` or raise --blob-cap",
                human_bytes(bytes),
                human_bytes(cap),
                human_bytes(held)
            ))
        }
    }

    fn want(&mut self, id: BlobId, peers: Vec<String>) {
        if self.store.has(&id) || self.fetches.contains_key(&id) {
            return;
        }
        self.seed = self.seed.wrapping_add(1);
        match Fetch::new(id, peers, FetchConfig::default(), &self.store, self.seed) {
            Ok(f) => {
                self.fetches.insert(id, f);
            }
            Err(e) => {
                self.answer(&id, Err(e.to_string()));
                let _ = self.events.try_send(BlobEvent::Fetched {
                    id,
                    result: Err(e.to_string()),
                });
            }
        }
        self.publish_status();
    }

    /// Answers everyone waiting for `id`.
    fn answer(&mut self, id: &BlobId, result: Result<(), String>) {
        for w in self.waiters.remove(id).unwrap_or_default() {
            let _ = w.send(result.clone());
        }
    }

    fn on_frame(&mut self, from_name: &str, from: SocketAddr, bytes: &[u8]) {
        let payload = match wire::decode(bytes) {
            Ok(Msg::Blob(p)) => p,
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(peer = %from_name, "bad blob frame: {e}");
                return;
            }
        };
        let msg = match BlobMsg::decode(&payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(peer = %from_name, "bad blob message: {e}");
                return;
            }
        };
        let now = self.now_ms();
        if msg.is_request() {
            // A blob still being downloaded is served from what has arrived.
            if !self.store.has(&msg.id()) {
                if let Some(p) = self.fetches.get(&msg.id()).and_then(Fetch::partial) {
                    if let Some(reply) = self.server.handle_partial(&msg, p, now) {
                        match reply.encode() {
                            Ok(b) => self.net.send(from, true, wire::encode(&Msg::Blob(b))),
                            Err(e) => {
                                tracing::debug!(peer = %from_name, "cannot answer a blob request: {e}")
                            }
                        }
                    }
                    return;
                }
            }
            match self
                .server
                .handle(&msg, now)
                .map(|m| m.encode())
                .transpose()
            {
                Ok(Some(reply)) => self.net.send(from, true, wire::encode(&Msg::Blob(reply))),
                Ok(None) => {}
                Err(e) => tracing::debug!(peer = %from_name, "cannot answer a blob request: {e}"),
            }
            return;
        }
        if let Some(f) = self.fetches.get_mut(&msg.id()) {
            if let BlobMsg::Chunk { bytes, .. } = &msg {
                self.fetched_bytes += bytes.len() as u64;
            }
            f.handle_msg(&from_name.to_string(), msg, now);
        }
    }

    /// Sends what the downloads want to send and reports the ones that ended.
    async fn pump(&mut self) {
        let now = self.now_ms();
        let mut sends = Vec::new();
        for f in self.fetches.values_mut() {
            while let Some(req) = f.poll_request(now) {
                match (req.to_msg().encode(), self.peers.get(&req.peer)) {
                    (Ok(bytes), Some(&addr)) => sends.push((addr, bytes)),
                    // Unknown or gone peer, or a request that does not encode: a failure.
                    (Ok(_), None) => {
                        f.remove_peer(&req.peer);
                        f.handle_timeout(now);
                    }
                    (Err(_), _) => f.handle_failure(&req.peer, req.what, now),
                }
            }
        }
        for (addr, bytes) in sends {
            self.net.send(addr, true, wire::encode(&Msg::Blob(bytes)));
        }
        let fresh: Vec<BlobId> = self
            .fetches
            .iter()
            .filter(|(id, f)| f.partial().is_some() && !self.announced.contains(*id))
            .map(|(id, _)| *id)
            .collect();
        for id in fresh {
            self.announced.insert(id);
            let _ = self.events.send(BlobEvent::Fetching(id)).await;
        }
        let over: Vec<BlobId> = self
            .fetches
            .iter()
            .filter(|(_, f)| f.is_over())
            .map(|(id, _)| *id)
            .collect();
        for id in over {
            let Some(f) = self.fetches.remove(&id) else {
                continue;
            };
            self.announced.remove(&id);
            let result = match f.status() {
                Status::Done(_) => Ok(()),
                Status::Failed(e) => Err(e.to_string()),
                Status::Running => continue,
            };
            if result.is_ok() {
                tracing::info!(blob = %id, "blob fetched and verified");
                let _ = self.events.send(BlobEvent::Holds(id)).await;
            } else if let Err(reason) = &result {
                tracing::warn!(blob = %id, "blob fetch failed: {reason}");
            }
            self.answer(&id, result.clone());
            let _ = self.events.send(BlobEvent::Fetched { id, result }).await;
            self.publish_status();
        }
        if !self.fetches.is_empty() && self.status_at.elapsed() >= STATUS_EVERY {
            self.publish_status();
        }
    }

    fn publish_status(&mut self) {
        self.status_at = Instant::now();
        self.published_counters = (self.server.stats().bytes_sent, self.fetched_bytes);
        let mut blobs: Vec<BlobView> = self
            .fetches
            .iter()
            .map(|(id, f)| {
                let (done, total) = f.progress();
                BlobView {
                    id: id.to_string(),
                    state: "fetching".into(),
                    chunks_done: done,
                    chunks_total: total,
                    bytes: u64::from(done) * u64::from(self.store.chunk_size()),
                }
            })
            .collect();
        let mut held_bytes = 0;
        for id in self.store.list().unwrap_or_default() {
            let (chunks, size) = self
                .store
                .manifest(&id)
                .map(|m| (m.num_chunks(), m.size()))
                .unwrap_or((0, 0));
            held_bytes += size;
            blobs.push(BlobView {
                id: id.to_string(),
                state: "held".into(),
                chunks_done: chunks,
                chunks_total: Some(chunks),
                bytes: size,
            });
        }
        self.status.send_replace(Arc::new(BlobStatus {
            blobs,
            served_bytes: self.server.stats().bytes_sent,
            fetched_bytes: self.fetched_bytes,
            held_bytes,
            collected: self.collected,
        }));
    }
}
