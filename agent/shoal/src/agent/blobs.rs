//! The agent's blob manager: the store in `<data-dir>/blobs`, the serving side
//! under the upload cap, and the downloads in progress.
//!
//! Which blobs a node holds is advertised in node-owned state
//! (`node/<name>/blob/<id>`), so anyone needing a blob knows whom to ask.
//! Transfer messages travel as [`shoal_core::wire::Msg::Blob`] frames on QUIC
//! streams.

use std::collections::BTreeMap;
use std::path::Path;

use shoal_blob::{BlobId, BlobMsg, BlobStore, Fetch, FetchConfig, RateLimiter, Server, Status};
use shoal_core::{State, NODE_PREFIX};

/// Infix of the node-owned keys that advertise held blobs.
pub const BLOB_INFIX: &str = "/blob/";

/// A finished download.
pub struct Finished {
    /// The blob.
    pub id: BlobId,
    /// `Err(reason)` if it failed.
    pub result: Result<(), String>,
}

/// Blob store, server and downloads of one agent.
pub struct Blobs {
    store: BlobStore,
    server: Server,
    fetches: BTreeMap<BlobId, Fetch<String>>,
    finished: Vec<Finished>,
    seed: u64,
}

/// The advertisement key of `id` on node `name`.
pub fn advert_key(name: &str, id: &BlobId) -> String {
    format!("{NODE_PREFIX}{name}{BLOB_INFIX}{id}")
}

/// Nodes (other than `me`) that advertise `id` in `state`.
pub fn advertisers(state: &State, id: &BlobId, me: &str) -> Vec<String> {
    let suffix = format!("{BLOB_INFIX}{id}");
    state
        .scan_prefix(NODE_PREFIX)
        .filter_map(|e| e.key.strip_suffix(&suffix))
        .filter_map(|k| k.strip_prefix(NODE_PREFIX))
        .filter(|n| !n.contains('/') && *n != me)
        .map(str::to_string)
        .collect()
}

impl Blobs {
    /// Opens the store in `dir`; uploads are capped at `upload_bytes_per_sec` (0: no cap).
    pub fn open(
        dir: &Path,
        upload_bytes_per_sec: u64,
        seed: u64,
    ) -> Result<Self, shoal_blob::StoreError> {
        let store = BlobStore::open(dir)?;
        let limiter = RateLimiter::new(upload_bytes_per_sec, upload_bytes_per_sec.max(8 << 20));
        Ok(Blobs {
            server: Server::new(store.clone(), limiter),
            store,
            fetches: BTreeMap::new(),
            finished: Vec::new(),
            seed,
        })
    }

    /// The store.
    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// Starts downloading `id` from `peers` unless it is present or already running.
    pub fn want(&mut self, id: BlobId, peers: Vec<String>) {
        if self.store.has(&id) || self.fetches.contains_key(&id) {
            return;
        }
        self.seed = self.seed.wrapping_add(1);
        match Fetch::new(id, peers, FetchConfig::default(), &self.store, self.seed) {
            Ok(f) => {
                self.fetches.insert(id, f);
            }
            Err(e) => self.finished.push(Finished {
                id,
                result: Err(e.to_string()),
            }),
        }
    }

    /// Tells running downloads about a node that now advertises their blob.
    pub fn add_peer(&mut self, id: &BlobId, peer: &str) {
        if let Some(f) = self.fetches.get_mut(id) {
            f.add_peer(peer.to_string());
        }
    }

    /// Handles a transfer message from `from`; returns the answer to send back, if any.
    pub fn on_message(
        &mut self,
        from: &str,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Option<Vec<u8>>, String> {
        let msg = BlobMsg::decode(payload).map_err(|e| e.to_string())?;
        if msg.is_request() {
            return self
                .server
                .handle(&msg, now_ms)
                .map(|m| m.encode())
                .transpose()
                .map_err(|e| e.to_string());
        }
        if let Some(f) = self.fetches.get_mut(&msg.id()) {
            f.handle_msg(&from.to_string(), msg, now_ms);
        }
        Ok(None)
    }

    /// Requests to send now, as `(peer name, encoded message)`.
    pub fn poll_requests(&mut self, now_ms: u64) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for f in self.fetches.values_mut() {
            while let Some(req) = f.poll_request(now_ms) {
                match req.to_msg().encode() {
                    Ok(bytes) => out.push((req.peer.clone(), bytes)),
                    // Requests are tiny; failing to encode one is treated like a lost request.
                    Err(_) => f.handle_failure(&req.peer, req.what, now_ms),
                }
            }
        }
        self.collect_finished();
        out
    }

    /// A request that could not be sent (peer unknown or gone).
    pub fn send_failed(&mut self, peer: &str, payload: &[u8], now_ms: u64) {
        let Ok(msg) = BlobMsg::decode(payload) else {
            return;
        };
        if let Some(f) = self.fetches.get_mut(&msg.id()) {
            f.remove_peer(&peer.to_string());
            f.handle_timeout(now_ms);
        }
    }

    /// Downloads in progress: (blob, chunks done, chunks in all once known).
    pub fn in_progress(&self) -> Vec<(BlobId, u32, Option<u32>)> {
        self.fetches
            .iter()
            .map(|(id, f)| {
                let (done, total) = f.progress();
                (*id, done, total)
            })
            .collect()
    }

    /// The earliest download timer.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.fetches.values().filter_map(Fetch::poll_timeout).min()
    }

    /// Fires due download timers.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        for f in self.fetches.values_mut() {
            f.handle_timeout(now_ms);
        }
        self.collect_finished();
    }

    fn collect_finished(&mut self) {
        let over: Vec<BlobId> = self
            .fetches
            .iter()
            .filter(|(_, f)| f.is_over())
            .map(|(id, _)| *id)
            .collect();
        for id in over {
            if let Some(f) = self.fetches.remove(&id) {
                let result = match f.status() {
                    Status::Done(_) => Ok(()),
                    Status::Failed(e) => Err(e.to_string()),
                    Status::Running => continue,
                };
                self.finished.push(Finished { id, result });
            }
        }
    }

    /// Downloads that ended since the last call.
    pub fn take_finished(&mut self) -> Vec<Finished> {
        self.collect_finished();
        std::mem::take(&mut self.finished)
    }
}
