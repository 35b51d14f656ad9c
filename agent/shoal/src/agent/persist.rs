//! Durability off the agent loop: a thread that writes batches of changed entries
//! to the store, then sends the frames that carry them, then answers the writes.
//!
//! The guarantee is the one the loop used to give by blocking on `fsync`: an
//! acknowledged write is on disk before the answer, and before any frame of its
//! batch leaves. Batches are handled in order, and every frame that carries state
//! (pushes, sync) goes through here, so no frame leaves before the entries of every
//! earlier batch are durable. SWIM datagrams carry no state and are sent by the
//! loop at once. Batches that queue up while a write is on the disk are written
//! together in one transaction.
//!
//! A failed write is counted and logged; its entries stay pending and are written
//! with the next batch; the writes it held are answered with the error; its frames
//! are still sent (replication must go on, and the entries are in memory
//! everywhere they were sent).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use shoal_core::Entry;
use shoal_net::Net;
use shoal_store::{Persist, RedbStore};
use tokio::sync::mpsc;

/// Called once the batch holding a write is durable (`Ok`) or failed to be.
pub type Ack = Box<dyn FnOnce(Result<(), String>) + Send + Sync>;

/// A frame to send: (destination, reliable, bytes).
pub type Frame = (SocketAddr, bool, Vec<u8>);

/// What one loop turn produced.
#[derive(Default)]
pub struct Batch {
    /// Cluster-wide entries that changed (node-owned ones are rebuilt on start).
    pub entries: Vec<Entry>,
    /// Frames to send once `entries` are durable.
    pub frames: Vec<Frame>,
    /// Writes to answer once `entries` are durable.
    pub acks: Vec<Ack>,
}

impl Batch {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.frames.is_empty() && self.acks.is_empty()
    }
}

/// Runs the persister until every sender of `rx` is dropped; returns the store.
pub fn run(
    mut store: RedbStore,
    net: Net,
    mut rx: mpsc::Receiver<Batch>,
    errors: Arc<AtomicU64>,
) -> RedbStore {
    let mut pending: Vec<Entry> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut batches = vec![first];
        while let Ok(more) = rx.try_recv() {
            batches.push(more);
        }
        for b in &mut batches {
            pending.append(&mut b.entries);
        }
        let result = if pending.is_empty() {
            Ok(())
        } else {
            match store.save(&pending) {
                Ok(()) => {
                    pending.clear();
                    Ok(())
                }
                Err(e) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("persisting {} entries failed: {e}", pending.len());
                    Err(format!("write applied in memory but not persisted: {e}"))
                }
            }
        };
        for b in batches {
            for (to, reliable, bytes) in b.frames {
                net.send(to, reliable, bytes);
            }
            for ack in b.acks {
                ack(result.clone());
            }
        }
    }
    if !pending.is_empty() {
        if let Err(e) = store.save(&pending) {
            tracing::error!("persisting {} entries on exit failed: {e}", pending.len());
        }
    }
    store
}
