//! The serving side: answers blob requests from the local store.

use crate::id::BlobId;
use crate::rate::RateLimiter;
use crate::store::{BlobStore, Partial, StoreError};

/// How long a fetcher should leave a peer alone that lacks a chunk it is itself
/// still downloading.
const PARTIAL_RETRY_MS: u64 = 150;
use crate::wire::BlobMsg;

/// Answers one request from `store`, or `None` if `req` is not a request.
///
/// `Err` is a local failure (I/O, on-disk corruption) the operator should
/// see; the requester should then be told [`BlobMsg::NotFound`], which is
/// what [`serve`] and [`Server`] do.
pub fn try_serve(store: &BlobStore, req: &BlobMsg) -> Option<Result<BlobMsg, StoreError>> {
    let answer =
        match *req {
            BlobMsg::GetManifest { id } => store
                .manifest(&id)
                .map(|manifest| BlobMsg::Manifest { id, manifest }),
            BlobMsg::GetChunk { id, idx } => store
                .read_chunk(&id, idx)
                .map(|bytes| BlobMsg::Chunk { id, idx, bytes }),
            _ => return None,
        };
    Some(match answer {
        // Not having a blob is a normal answer, not a local failure.
        Err(StoreError::NotFound(id)) | Err(StoreError::NoSuchChunk { id, .. }) => {
            Ok(BlobMsg::NotFound { id })
        }
        other => other,
    })
}

/// Answers one request from `store` (local failures become `NotFound`), or
/// `None` if `req` is not a request. No rate limit: see [`Server`].
pub fn serve(store: &BlobStore, req: &BlobMsg) -> Option<BlobMsg> {
    let id = req.id();
    try_serve(store, req).map(|r| r.unwrap_or(BlobMsg::NotFound { id }))
}

/// Counters of a [`Server`], for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Requests answered (any answer).
    pub requests: u64,
    /// Chunks sent.
    pub chunks_sent: u64,
    /// Chunk bytes sent.
    pub bytes_sent: u64,
    /// Chunk requests refused with `Busy` by the rate cap.
    pub busy: u64,
    /// Requests answered `NotFound`.
    pub not_found: u64,
    /// Local failures (each also answered `NotFound`).
    pub local_errors: u64,
}

/// The serving side of one agent: [`serve`] plus the upload rate cap.
#[derive(Debug)]
pub struct Server {
    store: BlobStore,
    limiter: RateLimiter,
    stats: ServerStats,
    last_error: Option<StoreError>,
}

impl Server {
    /// Serves from `store`, capping chunk uploads with `limiter`.
    pub fn new(store: BlobStore, limiter: RateLimiter) -> Self {
        Server {
            store,
            limiter,
            stats: ServerStats::default(),
            last_error: None,
        }
    }

    /// Answers `req` at time `now_ms`, or `None` if it is not a request.
    ///
    /// A chunk request over the rate cap is answered [`BlobMsg::Busy`] at once
    /// rather than held, so the fetcher can use another peer instead of
    /// timing out on this one. Manifests are small and not rate-limited.
    pub fn handle(&mut self, req: &BlobMsg, now_ms: u64) -> Option<BlobMsg> {
        if !req.is_request() {
            return None;
        }
        self.stats.requests += 1;
        if let BlobMsg::GetChunk { id, idx } = *req {
            if self.limiter.is_limited() {
                // Charge the exact chunk length before reading it from disk.
                let len = self
                    .store
                    .manifest_arc(&id)
                    .ok()
                    .and_then(|m| m.chunk_len(idx));
                if let Some(len) = len {
                    if let Some(busy) = self.charge(id, idx, len, now_ms) {
                        return Some(busy);
                    }
                }
            }
        }
        let answer = match try_serve(&self.store, req)? {
            Ok(msg) => msg,
            Err(e) => {
                self.stats.local_errors += 1;
                self.last_error = Some(e);
                BlobMsg::NotFound { id: req.id() }
            }
        };
        match &answer {
            BlobMsg::Chunk { bytes, .. } => {
                self.stats.chunks_sent += 1;
                self.stats.bytes_sent += bytes.len() as u64;
            }
            BlobMsg::NotFound { .. } => self.stats.not_found += 1,
            _ => {}
        }
        Some(answer)
    }

    /// Answers `req` for a blob this node is still downloading, from `partial`: its
    /// manifest, and the chunks verified so far. A chunk not here yet is answered
    /// [`BlobMsg::Busy`] (ask another peer now, this one later), never
    /// `NotFound`, which would make the fetcher drop this peer for the whole blob.
    /// Uploads count against the same cap as complete blobs.
    pub fn handle_partial(
        &mut self,
        req: &BlobMsg,
        partial: &Partial,
        now_ms: u64,
    ) -> Option<BlobMsg> {
        if !req.is_request() {
            return None;
        }
        self.stats.requests += 1;
        let answer = match *req {
            BlobMsg::GetManifest { id } => BlobMsg::Manifest {
                id,
                manifest: partial.manifest().clone(),
            },
            BlobMsg::GetChunk { id, idx } => {
                if !partial.has_chunk(idx) {
                    return Some(BlobMsg::Busy {
                        id,
                        idx,
                        retry_after_ms: PARTIAL_RETRY_MS,
                    });
                }
                let len = partial.manifest().chunk_len(idx).unwrap_or(0);
                if let Some(busy) = self.charge(id, idx, len, now_ms) {
                    return Some(busy);
                }
                match partial.read_chunk(idx) {
                    Ok(bytes) => {
                        self.stats.chunks_sent += 1;
                        self.stats.bytes_sent += bytes.len() as u64;
                        BlobMsg::Chunk { id, idx, bytes }
                    }
                    Err(e) => {
                        self.stats.local_errors += 1;
                        self.last_error = Some(e);
                        BlobMsg::Busy {
                            id,
                            idx,
                            retry_after_ms: PARTIAL_RETRY_MS,
                        }
                    }
                }
            }
            _ => return None,
        };
        Some(answer)
    }

    /// Takes `len` bytes from the upload cap, or the `Busy` answer if it is spent.
    fn charge(&mut self, id: BlobId, idx: u32, len: u32, now_ms: u64) -> Option<BlobMsg> {
        let retry_after_ms = self.limiter.try_take(u64::from(len), now_ms).err()?;
        self.stats.busy += 1;
        Some(BlobMsg::Busy {
            id,
            idx,
            retry_after_ms,
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// The most recent local failure, taken (for logging).
    pub fn take_error(&mut self) -> Option<StoreError> {
        self.last_error.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::BlobId;

    #[test]
    fn answers_requests_and_only_requests() {
        let t = tempfile::tempdir().unwrap();
        let store = BlobStore::open_with_chunk_size(t.path(), 4).unwrap();
        let id = store.put_bytes(b"0123456789").unwrap();
        let Some(BlobMsg::Manifest { manifest, .. }) = serve(&store, &BlobMsg::GetManifest { id })
        else {
            panic!("no manifest");
        };
        assert_eq!(manifest.id(), id);
        assert_eq!(
            serve(&store, &BlobMsg::GetChunk { id, idx: 2 }),
            Some(BlobMsg::Chunk {
                id,
                idx: 2,
                bytes: b"89".to_vec()
            })
        );
        // Unknown blob or chunk: a plain NotFound.
        let other = BlobId::from_bytes([3; 32]);
        assert_eq!(
            serve(&store, &BlobMsg::GetManifest { id: other }),
            Some(BlobMsg::NotFound { id: other })
        );
        assert_eq!(
            serve(&store, &BlobMsg::GetChunk { id, idx: 3 }),
            Some(BlobMsg::NotFound { id })
        );
        // Responses are not answered (no ping-pong between two agents).
        assert_eq!(serve(&store, &BlobMsg::NotFound { id }), None);
    }

    /// A download in progress serves its manifest and the chunks it has; for a chunk
    /// it lacks it says Busy (ask elsewhere), never NotFound.
    #[test]
    fn partial_downloads_serve_what_they_have() {
        let src = tempfile::tempdir().unwrap();
        let source = BlobStore::open_with_chunk_size(src.path(), 4).unwrap();
        let id = source.put_bytes(b"0123456789").unwrap();
        let manifest = source.manifest(&id).unwrap();
        let t = tempfile::tempdir().unwrap();
        let store = BlobStore::open_with_chunk_size(t.path(), 4).unwrap();
        let mut partial = store.begin(&manifest).unwrap();
        partial.write_chunk(1, b"4567").unwrap();
        let mut server = Server::new(store, RateLimiter::unlimited());
        let Some(BlobMsg::Manifest { manifest: m, .. }) =
            server.handle_partial(&BlobMsg::GetManifest { id }, &partial, 0)
        else {
            panic!("no manifest");
        };
        assert_eq!(m.id(), id);
        assert_eq!(
            server.handle_partial(&BlobMsg::GetChunk { id, idx: 1 }, &partial, 0),
            Some(BlobMsg::Chunk {
                id,
                idx: 1,
                bytes: b"4567".to_vec()
            })
        );
        assert!(matches!(
            server.handle_partial(&BlobMsg::GetChunk { id, idx: 0 }, &partial, 0),
            Some(BlobMsg::Busy { idx: 0, .. })
        ));
        assert_eq!(server.stats().bytes_sent, 4);
        assert_eq!(
            server.handle_partial(&BlobMsg::NotFound { id }, &partial, 0),
            None
        );
    }

    #[test]
    fn rate_cap_answers_busy_and_local_corruption_is_reported() {
        let t = tempfile::tempdir().unwrap();
        let store = BlobStore::open_with_chunk_size(t.path(), 1000).unwrap();
        let id = store.put_bytes(&[7u8; 3000]).unwrap();
        // 10 KB/s, 1 KB burst: one chunk now, the next in 100 ms.
        let mut server = Server::new(store.clone(), RateLimiter::new(10_000, 1000));
        assert!(matches!(
            server.handle(&BlobMsg::GetChunk { id, idx: 0 }, 0),
            Some(BlobMsg::Chunk { .. })
        ));
        assert_eq!(
            server.handle(&BlobMsg::GetChunk { id, idx: 1 }, 0),
            Some(BlobMsg::Busy {
                id,
                idx: 1,
                retry_after_ms: 100
            })
        );
        assert!(matches!(
            server.handle(&BlobMsg::GetChunk { id, idx: 1 }, 100),
            Some(BlobMsg::Chunk { .. })
        ));
        // Bytes rotted on disk: not served, counted, and the error kept for the log.
        let path = store.path_of(&id).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[2500] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(
            server.handle(&BlobMsg::GetChunk { id, idx: 2 }, 1000),
            Some(BlobMsg::NotFound { id })
        );
        let s = server.stats();
        assert_eq!(
            (
                s.requests,
                s.chunks_sent,
                s.bytes_sent,
                s.busy,
                s.local_errors
            ),
            (4, 2, 2000, 1, 1)
        );
        let e = server.take_error().unwrap();
        assert!(
            e.to_string()
                .contains(&format!("blob {id}: chunk 2 on disk")),
            "{e}"
        );
    }
}
