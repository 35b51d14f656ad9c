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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_blob::{BlobId, BlobMsg, BlobStore, Fetch, FetchConfig, RateLimiter, Server, Status};
use shoal_core::wire::{self, Msg};
use shoal_net::Net;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::api_types::BlobView;

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
    /// The live peers and their addresses (sent whenever membership changes).
    Peers(BTreeMap<String, SocketAddr>),
}

/// What the worker tells the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobEvent {
    /// The store holds `id` (at start, after a put, after a download): advertise it.
    Holds(BlobId),
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
}

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
            BlobCmd::Peers(peers) => self.peers = peers,
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
                let _ = self.events.try_send(BlobEvent::Fetched {
                    id,
                    result: Err(e.to_string()),
                });
            }
        }
        self.publish_status();
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
            let _ = self.events.send(BlobEvent::Fetched { id, result }).await;
            self.publish_status();
        }
        if !self.fetches.is_empty() && self.status_at.elapsed() >= STATUS_EVERY {
            self.publish_status();
        }
    }

    fn publish_status(&mut self) {
        self.status_at = Instant::now();
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
                }
            })
            .collect();
        for id in self.store.list().unwrap_or_default() {
            let chunks = self
                .store
                .manifest(&id)
                .map(|m| m.num_chunks())
                .unwrap_or(0);
            blobs.push(BlobView {
                id: id.to_string(),
                state: "held".into(),
                chunks_done: chunks,
                chunks_total: Some(chunks),
            });
        }
        self.status.send_replace(Arc::new(BlobStatus { blobs }));
    }
}
