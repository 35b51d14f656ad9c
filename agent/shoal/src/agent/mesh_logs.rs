//! Workload logs over the mesh: the task that asks the agent running an
//! allocation for its logs, and answers such asks from peers.
//!
//! `shoal logs` may be pointed at any agent; the replicas it names run on other
//! machines, whose HTTP APIs listen on loopback. So logs travel the way state does:
//! as frames over QUIC with mutual TLS ([`Msg::Logs`]), from the agent that runs the
//! allocation. A request names the allocation and the read (tail, offset, limit); the
//! answer carries at most one chunk ([`MAX_LOG_CHUNK`]), and the caller pages on.
//! Any member of the cluster may read any allocation's logs, as any API caller may.
//!
//! This task owns the requests in flight; the API hands it [`LogsCmd::Fetch`] and
//! waits for the answer with a deadline, and the agent loop routes `Logs` frames
//! here ([`LogsCmd::Frame`]) past the core. Reads of local log files run on tracked
//! tasks, at most [`MAX_READS`] at a time; more are refused (the asker says so). It
//! does not retry: a lost answer is a timed-out request, which the caller reports.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shoal_core::wire::{self, Msg};
use shoal_net::Net;
use shoal_runtime::{LogQuery, MAX_LOG_CHUNK};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::executor::Runtimes;

/// Peer log reads served at once; more are answered "busy".
pub const MAX_READS: usize = 8;

/// Logs of one allocation: at most one chunk ([`MAX_LOG_CHUNK`]); `more` says to
/// ask again from `next_offset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllocLogs {
    /// Log text (invalid UTF-8 replaced).
    pub text: String,
    /// Where the next read starts.
    pub next_offset: u64,
    /// The chunk stopped at its size limit.
    #[serde(default)]
    pub more: bool,
}

/// Why logs could not be read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum LogsError {
    /// The node runs no workload of that allocation.
    #[error("{0}")]
    NotFound(String),
    /// Reading failed, or the node could not answer.
    #[error("{0}")]
    Failed(String),
}

/// What the task is asked to do.
pub enum LogsCmd {
    /// A `Logs` frame from a peer: a request to answer, or an answer to ours.
    Frame {
        /// The sender's QUIC address.
        from: SocketAddr,
        /// The whole frame.
        bytes: Vec<u8>,
    },
    /// Read an allocation's logs on the peer at `to`.
    Fetch {
        /// The peer's QUIC address.
        to: SocketAddr,
        /// The allocation.
        alloc_id: String,
        /// What to read.
        query: LogQuery,
        /// The answer.
        reply: oneshot::Sender<Result<AllocLogs, LogsError>>,
    },
}

/// The body of a [`Msg::Logs`] frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum LogsMsg {
    /// Read an allocation's logs.
    Req {
        id: u64,
        alloc_id: String,
        tail: Option<usize>,
        offset: Option<u64>,
        limit: usize,
    },
    /// The answer to `Req` `id`.
    Resp {
        id: u64,
        result: Result<AllocLogs, LogsError>,
    },
}

fn frame(msg: &LogsMsg) -> Vec<u8> {
    // Strings and numbers only: CBOR encoding into a Vec cannot fail.
    let body = serde_cbor::to_vec(msg).unwrap_or_default();
    wire::encode(&Msg::Logs(body))
}

/// Reads `alloc_id`'s logs from this node's drivers.
pub async fn local_logs(
    runtimes: &Runtimes,
    alloc_id: &str,
    query: LogQuery,
) -> Result<AllocLogs, LogsError> {
    let Some((driver, _)) = runtimes.find(alloc_id).await else {
        return Err(LogsError::NotFound(format!(
            "no workload for allocation {alloc_id} on this node"
        )));
    };
    let chunk = driver
        .logs(alloc_id, query)
        .await
        .map_err(|e| LogsError::Failed(e.to_string()))?;
    Ok(AllocLogs {
        text: String::from_utf8_lossy(&chunk.bytes).into_owned(),
        next_offset: chunk.next_offset,
        more: chunk.more,
    })
}

/// Runs the task until `stop`; reads it starts run on `tracker`.
pub async fn run(
    net: Net,
    runtimes: Runtimes,
    mut rx: mpsc::Receiver<LogsCmd>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let mut pending: HashMap<u64, oneshot::Sender<Result<AllocLogs, LogsError>>> = HashMap::new();
    let mut next_id: u64 = 1;
    let reads = Arc::new(Semaphore::new(MAX_READS));
    loop {
        let cmd = tokio::select! {
            () = stop.cancelled() => return,
            cmd = rx.recv() => match cmd {
                Some(c) => c,
                None => return,
            },
        };
        match cmd {
            LogsCmd::Fetch {
                to,
                alloc_id,
                query,
                reply,
            } => {
                // Askers that gave up (timed out) leave their slot behind.
                pending.retain(|_, r| !r.is_closed());
                let id = next_id;
                next_id += 1;
                pending.insert(id, reply);
                let req = LogsMsg::Req {
                    id,
                    alloc_id,
                    tail: query.tail,
                    offset: query.offset,
                    limit: query.limit,
                };
                net.send(to, true, frame(&req));
            }
            LogsCmd::Frame { from, bytes } => {
                let body = match wire::decode(&bytes) {
                    Ok(Msg::Logs(body)) => body,
                    _ => continue,
                };
                match serde_cbor::from_slice::<LogsMsg>(&body) {
                    Ok(LogsMsg::Resp { id, result }) => {
                        if let Some(reply) = pending.remove(&id) {
                            let _ = reply.send(result);
                        }
                    }
                    Ok(LogsMsg::Req {
                        id,
                        alloc_id,
                        tail,
                        offset,
                        limit,
                    }) => {
                        let Ok(permit) = reads.clone().try_acquire_owned() else {
                            let busy = LogsError::Failed(format!(
                                "busy: {MAX_READS} log reads in flight; try again"
                            ));
                            let resp = LogsMsg::Resp {
                                id,
                                result: Err(busy),
                            };
                            net.send(from, true, frame(&resp));
                            continue;
                        };
                        let (net, runtimes) = (net.clone(), runtimes.clone());
                        let query = LogQuery {
                            tail,
                            offset,
                            limit: limit.min(MAX_LOG_CHUNK),
                        };
                        tracker.spawn(async move {
                            let result = local_logs(&runtimes, &alloc_id, query).await;
                            net.send(from, true, frame(&LogsMsg::Resp { id, result }));
                            drop(permit);
                        });
                    }
                    Err(e) => tracing::debug!(%from, "malformed logs frame: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_route_past_the_core() {
        let msg = LogsMsg::Resp {
            id: 7,
            result: Err(LogsError::NotFound("no workload".into())),
        };
        let f = frame(&msg);
        assert!(wire::is_logs(&f));
        let Ok(Msg::Logs(body)) = wire::decode(&f) else {
            panic!("not a logs frame");
        };
        assert_eq!(serde_cbor::from_slice::<LogsMsg>(&body).unwrap(), msg);
        // Bad bodies are errors, not panics.
        assert!(serde_cbor::from_slice::<LogsMsg>(&[0xff, 0x00]).is_err());
    }
}
