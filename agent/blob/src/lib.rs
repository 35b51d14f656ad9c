//! Blobs for shoal: a blake3-addressed store on disk and a verified,
//! resumable fetch of a blob from several peers at once.
//!
//! A blob (a policy `.wasm`, a `docker save` tarball of several GB) is cut
//! into fixed-size chunks. Its [`Manifest`] lists blake3 of every chunk and of
//! the whole content ([`ContentHash`], what `b3sum` prints and users see); the
//! blob's [`BlobId`] is blake3 of the manifest's CBOR, so one id lets a node
//! check the manifest it gets from anyone, and the manifest lets it check
//! every chunk on its own.
//!
//! - [`BlobStore`] keeps complete blobs and [`Partial`] downloads in a
//!   directory, streaming (one chunk in memory at a time), crash-safe (a blob
//!   appears complete only through one rename after fsync and a full
//!   re-check), and resumable across restarts (the set of verified chunks is
//!   persisted).
//! - [`Fetch`] is a sans-IO state machine for one download: it is given
//!   responses and the time, and returns [`Request`]s to send, spreading
//!   chunks over peers, re-queueing on failure or timeout, and avoiding peers
//!   that send bad data. [`Server`] answers requests from a store under an
//!   upload cap ([`RateLimiter`]). [`BlobMsg`] is their CBOR wire format.
//!
//! It does not open sockets, spawn tasks, read the clock, talk to Docker, or
//! decide which blobs to fetch or keep: the agent's driver carries
//! [`BlobMsg`] bytes over QUIC, advertises what the store holds in cluster
//! state, and calls `docker load` with [`BlobStore::path_of`]. Disk I/O is
//! synchronous `std::fs`; call it from a blocking-friendly context.

#![warn(missing_docs)]

mod fetch;
mod id;
mod manifest;
mod rate;
mod serve;
mod store;
mod wire;

pub use fetch::{Fetch, FetchConfig, FetchError, PeerHealth, PeerStats, Request, Status, What};
pub use id::{BlobId, ContentHash, ParseHashError};
pub use manifest::{
    ChunkMismatch, Manifest, ManifestError, DEFAULT_CHUNK_SIZE, MAX_CHUNKS, MAX_CHUNK_SIZE,
};
pub use rate::RateLimiter;
pub use serve::{serve, try_serve, Server, ServerStats};
pub use store::{BlobStore, Partial, StoreError};
pub use wire::{BlobMsg, WireError, MAX_MSG};
