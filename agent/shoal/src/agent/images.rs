//! The image task: pushes images from this node's Docker Engine into the mesh and
//! pulls them from peers when a replica needs one, on a task of its own.
//!
//! - **Push** (`POST /v1/images`): `docker save` through the engine's API into a
//!   file in `<data-dir>/images`, [`shoal_image::split`] on a blocking thread into
//!   one blob per layer and an image blob (each new blob announced to the blob
//!   worker, which advertises it), then the [`ImageRecord`] is written through the
//!   loop. Progress goes back to the caller as [`PushEvent`]s.
//! - **Pull** ([`ImageCmd::Ensure`] from the executor before a docker start, and
//!   preheats for records whose `--to` names this node): if the engine lacks the
//!   image, fetch the blobs it needs — layers the store or the engine (by diff id
//!   chain) already has are skipped — from every live node that advertises them
//!   ([`BlobCmd::Need`]: the blob worker's multi-peer verified fetch), assemble a
//!   `docker load` archive, load it and check the image id. Bytes done/total per
//!   image are published in [`PullStatus`] for `shoal ps`.
//! - **Garbage collection:** it tells the blob worker which blobs records name
//!   (image records, plugin bindings, pushes under way); the worker removes the rest
//!   after the grace.
//!
//! It never touches the replicated state directly (writes go through the loop as
//! [`Command`]s) and reads it only from the published [`Views`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_blob::{BlobId, BlobStore};
use shoal_core::Status;
use shoal_image::{ImageBlob, ImageRecord, Preheat};
use shoal_runtime::DockerDriver;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::blobs::{BlobCmd, BlobStatus};
use super::commands::{Command, ImageCommand};
use super::views::Views;
use shoal_api::human_bytes;

/// What the task is asked to do.
pub enum ImageCmd {
    /// Make `image` present in this node's engine (fetching it from peers if it was
    /// pushed); answered once it is, or with why it cannot be.
    Ensure {
        /// The reference in the service spec.
        image: String,
        /// The answer.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Push `reference` from this node's engine into the mesh.
    Push(PushRequest),
}

/// A push, as the API hands it to the image task (its body is [`shoal_api::PushBody`]).
#[derive(Debug, Clone)]
pub struct PushRequest {
    /// `name[:tag]`.
    pub reference: String,
    /// Nodes that fetch it at once (`all` or `LABEL=VALUE`).
    pub to: Option<String>,
    /// Move the tag even if it names another image now.
    pub replace: bool,
    /// Where progress and the result go.
    pub events: Option<mpsc::Sender<PushEvent>>,
}

/// One line of a push's progress (`application/x-ndjson`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushEvent {
    /// Work under way: `phase` is `save` (docker save) or `store` (layers into blobs).
    Progress {
        /// What is being done.
        phase: String,
        /// Bytes done.
        done: u64,
        /// Bytes in all (0: not known yet).
        total: u64,
    },
    /// It is in the mesh.
    Done(Box<ImageRecord>),
    /// It failed.
    Error(String),
}

/// Pulls in progress on this node: image reference → `[bytes done, bytes total]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PullStatus {
    /// By reference as the spec names it.
    pub pulls: BTreeMap<String, [u64; 2]>,
}

/// Everything the task uses.
pub struct ImageTask {
    /// This node's name.
    pub me: String,
    /// The engine (`None`: no docker driver).
    pub engine: Option<Arc<DockerDriver>>,
    /// The blob store (read by assembly, written by splits).
    pub store: BlobStore,
    /// The blob worker.
    pub blobs: mpsc::Sender<BlobCmd>,
    /// What the blob worker holds and fetches.
    pub blob_status: watch::Receiver<Arc<BlobStatus>>,
    /// Writes for the loop.
    pub commands: mpsc::Sender<Command>,
    /// The published views.
    pub views: watch::Receiver<Arc<Views>>,
    /// Scratch space for archives (`<data-dir>/images`).
    pub scratch: PathBuf,
    /// Where pull progress is published.
    pub status: watch::Sender<PullStatus>,
}

/// Shared by the task's pulls and pushes.
struct Shared {
    t: ImageTask,
    /// Blobs of pushes whose record is not written yet (kept from collection).
    pinned: Mutex<BTreeSet<BlobId>>,
    seq: AtomicU64,
}

/// How often the named blob set is refreshed at most.
const RETAIN_EVERY: Duration = Duration::from_secs(2);
/// A failed preheat is retried after this long.
const PREHEAT_RETRY: Duration = Duration::from_secs(30);
/// How long a pull waits for the advertisement of a blob its record names.
const ADVERT_WAIT: Duration = Duration::from_secs(5);
/// Pull progress is republished this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Runs the task until `stop` is cancelled or the command channel closes.
pub async fn run(
    task: ImageTask,
    mut cmds: mpsc::Receiver<ImageCmd>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let _ = std::fs::create_dir_all(&task.scratch);
    // Archives of an earlier run that died mid-push or mid-load.
    if let Ok(dir) = std::fs::read_dir(&task.scratch) {
        for e in dir.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let mut views = task.views.clone();
    let shared = Arc::new(Shared {
        t: task,
        pinned: Mutex::new(BTreeSet::new()),
        seq: AtomicU64::new(0),
    });
    let (done_tx, mut done_rx) = mpsc::channel::<(String, Result<(), String>)>(64);
    let mut waiting: BTreeMap<String, Vec<oneshot::Sender<Result<(), String>>>> = BTreeMap::new();
    let mut preheated: BTreeMap<String, (String, Option<tokio::time::Instant>)> = BTreeMap::new();
    let mut named_sent: Option<BTreeSet<BlobId>> = None;
    let mut retain = tokio::time::interval(RETAIN_EVERY);
    retain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            cmd = cmds.recv() => match cmd {
                None => break,
                Some(ImageCmd::Ensure { image, reply }) => {
                    let first = !waiting.contains_key(&image);
                    waiting.entry(image.clone()).or_default().push(reply);
                    if first {
                        let (s, tx) = (shared.clone(), done_tx.clone());
                        tracker.spawn(async move {
                            let r = s.ensure(&image).await;
                            let _ = tx.send((image, r)).await;
                        });
                    }
                }
                Some(ImageCmd::Push(req)) => {
                    let s = shared.clone();
                    let tracker2 = tracker.clone();
                    tracker.spawn(async move { s.push(req, tracker2).await });
                }
            },
            Some((image, r)) = done_rx.recv() => {
                if let Err(e) = &r {
                    tracing::warn!(%image, "pulling the image failed: {e}");
                }
                for w in waiting.remove(&image).unwrap_or_default() {
                    let _ = w.send(r.clone());
                }
                if let Some(p) = preheated.get_mut(&image) {
                    p.1 = r.is_err().then(|| tokio::time::Instant::now() + PREHEAT_RETRY);
                }
            }
            _ = retain.tick() => {
                let v = views.borrow_and_update().clone();
                let named = shared.named(&v);
                if named_sent.as_ref() != Some(&named)
                    && shared.t.blobs.try_send(BlobCmd::Retain(named.clone())).is_ok()
                {
                    named_sent = Some(named);
                }
                // Preheats: records whose `--to` names this node.
                if shared.t.engine.is_none() {
                    continue;
                }
                let labels = v
                    .state
                    .nodes
                    .get(&v.me)
                    .and_then(|r| r.info.as_ref())
                    .map(|i| i.labels.clone())
                    .unwrap_or_default();
                let now = tokio::time::Instant::now();
                for (reference, rec) in v.state.images.iter() {
                    if !rec.preheat.as_ref().is_some_and(|p| p.matches(&labels)) {
                        continue;
                    }
                    let due = match preheated.get(reference) {
                        None => true,
                        Some((id, retry)) => id != &rec.id || retry.is_some_and(|t| t <= now),
                    };
                    if !due || waiting.contains_key(reference) {
                        continue;
                    }
                    preheated.insert(reference.clone(), (rec.id.clone(), None));
                    tracing::info!(image = %reference, "preheating a pushed image");
                    waiting.insert(reference.clone(), Vec::new());
                    let (s, tx, image) = (shared.clone(), done_tx.clone(), reference.clone());
                    tracker.spawn(async move {
                        let r = s.ensure(&image).await;
                        let _ = tx.send((image, r)).await;
                    });
                }
            }
        }
    }
}

impl Shared {
    /// Blobs that records name, plus pushes under way.
    fn named(&self, v: &Views) -> BTreeSet<BlobId> {
        let mut out: BTreeSet<BlobId> = self
            .pinned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for rec in v.state.images.values() {
            out.extend(rec.blobs().iter().filter_map(|b| b.parse::<BlobId>().ok()));
        }
        for (key, e) in v.state.entries.iter() {
            if key.starts_with(super::keys::PLUGIN_PREFIX) {
                if let Ok(b) = super::keys::decode::<super::keys::Binding>(e) {
                    out.extend(b.blob.parse::<BlobId>().ok());
                }
            }
        }
        out
    }

    fn scratch_file(&self, what: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.t.scratch.join(format!("{what}-{n}.tar"))
    }

    fn engine(&self) -> Result<&Arc<DockerDriver>, String> {
        self.t.engine.as_ref().ok_or_else(|| {
            format!(
                "agent {} has no Docker Engine (--docker off, or the engine did not answer at start)",
                self.t.me
            )
        })
    }

    /// Pushes an image; every outcome goes to the request's events.
    async fn push(&self, req: PushRequest, tracker: TaskTracker) {
        let Some(events) = req.events.clone() else {
            return;
        };
        let result = self.push_inner(&req, &events, tracker).await;
        let last = match result {
            Ok(r) => PushEvent::Done(Box::new(r)),
            Err(e) => PushEvent::Error(e),
        };
        let _ = events.send(last).await;
    }

    async fn push_inner(
        &self,
        req: &PushRequest,
        events: &mpsc::Sender<PushEvent>,
        tracker: TaskTracker,
    ) -> Result<ImageRecord, String> {
        let reference =
            shoal_image::normalize_reference(&req.reference).map_err(|e| e.to_string())?;
        let preheat = req.to.as_deref().map(Preheat::parse).transpose()?;
        let engine = self.engine()?.clone();
        let id = engine
            .image_id(&reference)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "no image {reference} in the Docker Engine of agent {} (`docker images` there lists what it has)",
                    self.t.me
                )
            })?;
        let views = self.t.views.borrow().clone();
        if let Some(old) = views.state.images.get(&reference) {
            if old.id != id && !req.replace {
                return Err(format!(
                    "{reference} already names image {} (pushed by {}); push with --replace to move the tag, or push another tag",
                    short_id(&old.id),
                    old.pushed_by
                ));
            }
        }
        let _ = events.try_send(PushEvent::Progress {
            phase: "save".into(),
            done: 0,
            total: 0,
        });
        let archive = self.scratch_file("push");
        let result = async {
            let size = engine
                .save_image(&reference, &archive)
                .await
                .map_err(|e| e.to_string())?;
            let (tx, rx) = oneshot::channel();
            self.t
                .blobs
                .send(BlobCmd::Reserve {
                    bytes: size,
                    reply: tx,
                })
                .await
                .map_err(|_| "the agent is shutting down".to_string())?;
            rx.await
                .map_err(|_| "the agent is shutting down".to_string())??;
            let (store, path, r, ev) = (
                self.t.store.clone(),
                archive.clone(),
                reference.clone(),
                events.clone(),
            );
            let split = tracker
                .spawn_blocking(move || {
                    let mut last = 0u64;
                    shoal_image::split(&path, &r, &store, &mut |done, total| {
                        // A line per 1% (or 4 MiB) is plenty for a progress bar.
                        if done == total || done.saturating_sub(last) >= (total / 100).max(4 << 20)
                        {
                            last = done;
                            let _ = ev.try_send(PushEvent::Progress {
                                phase: "store".into(),
                                done,
                                total,
                            });
                        }
                    })
                })
                .await
                .map_err(|e| format!("splitting the image failed: {e}"))?
                .map_err(|e| format!("splitting the image failed: {e}"))?;
            Ok::<_, String>(split)
        }
        .await;
        let _ = std::fs::remove_file(&archive);
        let split = result?;
        if split.id != id {
            return Err(format!(
                "the engine saved image {} for {reference}, not {} (did the tag move meanwhile?)",
                short_id(&split.id),
                short_id(&id)
            ));
        }
        let mut blobs: Vec<BlobId> = vec![split.image_blob];
        blobs.extend(
            split
                .layers
                .iter()
                .filter_map(|l| l.blob.parse::<BlobId>().ok()),
        );
        self.pinned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(blobs.iter().copied());
        for b in &blobs {
            let _ = self.t.blobs.send(BlobCmd::Added(*b)).await;
        }
        let record = ImageRecord {
            reference: reference.clone(),
            id,
            image_blob: split.image_blob.to_string(),
            layers: split.layers,
            pushed_by: self.t.me.clone(),
            pushed_ms: super::wall_ms(),
            preheat,
        };
        let (tx, rx) = oneshot::channel();
        let sent = self
            .t
            .commands
            .send(Command::Image(ImageCommand::Put {
                record: Box::new(record),
                reply: tx,
            }))
            .await;
        let written = match sent {
            Ok(()) => rx
                .await
                .map_err(|_| "the agent is shutting down".to_string())
                .and_then(|r| r.map_err(|e| e.to_string())),
            Err(_) => Err("the agent is shutting down".to_string()),
        };
        // Named by the record from now on (or, if it failed, collectable again).
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        for b in &blobs {
            pinned.remove(b);
        }
        drop(pinned);
        let record = written?;
        tracing::info!(image = %reference, id = %short_id(&record.id), layers = record.layers.len(), size = %human_bytes(record.size()), layout = split.layout, "pushed an image into the mesh");
        Ok(record)
    }

    /// Live nodes to fetch blob `id` from: those holding it and those still fetching
    /// it (they serve what they have: a swarm). `None` unless someone holds all of it.
    fn holders(&self, views: &Views, id: &BlobId) -> Option<Vec<String>> {
        let text = id.to_string();
        let alive: BTreeSet<&str> = views
            .members
            .iter()
            .filter(|(_, st)| matches!(st, Status::Alive | Status::Suspect))
            .map(|(n, _)| n.name.as_str())
            .collect();
        let (mut peers, mut complete) = (Vec::new(), false);
        for (n, r) in &views.state.nodes {
            if n.as_str() == self.t.me || !alive.contains(n.as_str()) {
                continue;
            }
            if r.blobs.contains(&text) {
                complete = true;
                peers.push(n.clone());
            } else if r.partial.contains(&text) {
                peers.push(n.clone());
            }
        }
        complete.then_some(peers)
    }

    /// Makes `image` present in the engine, pulling it from peers if needed.
    async fn ensure(&self, image: &str) -> Result<(), String> {
        let engine = self.engine()?.clone();
        if engine
            .image_id(image)
            .await
            .map_err(|e| e.to_string())?
            .is_some()
        {
            return Ok(());
        }
        let reference = shoal_image::normalize_reference(image).map_err(|e| e.to_string())?;
        let views = self.t.views.borrow().clone();
        let Some(rec) = views.state.images.get(&reference).cloned() else {
            return Err(format!(
                "image {image} is not in this node's Docker Engine and was never pushed: `shoal image push {image}` from an agent that has it"
            ));
        };
        let result = self.pull(&engine, image, &rec).await;
        self.t.status.send_modify(|s| {
            s.pulls.remove(image);
        });
        result
    }

    async fn pull(
        &self,
        engine: &DockerDriver,
        image: &str,
        rec: &ImageRecord,
    ) -> Result<(), String> {
        let stacks = engine.layer_stacks().await.map_err(|e| e.to_string())?;
        let diff_ids: Vec<&str> = rec.layers.iter().map(|l| l.diff_id.as_str()).collect();
        // Layer i is in the engine when an image there has layers 0..=i exactly.
        let in_engine = |i: usize| {
            stacks.iter().any(|s| {
                s.len() > i
                    && s[..=i]
                        .iter()
                        .map(String::as_str)
                        .eq(diff_ids[..=i].iter().copied())
            })
        };
        let skip: Vec<bool> = (0..rec.layers.len()).map(in_engine).collect();
        let mut need: Vec<(BlobId, u64, String)> = Vec::new();
        let image_blob: BlobId = rec
            .image_blob
            .parse()
            .map_err(|e| format!("image record {}: bad image blob: {e}", rec.reference))?;
        need.push((image_blob, 0, "the image config".into()));
        for (i, l) in rec.layers.iter().enumerate() {
            if skip[i] {
                continue;
            }
            let id: BlobId = l
                .blob
                .parse()
                .map_err(|e| format!("image record {}: bad layer blob: {e}", rec.reference))?;
            if !need.iter().any(|(b, _, _)| *b == id) {
                need.push((id, l.size, format!("layer {}", short_id(&l.diff_id))));
            }
        }
        need.retain(|(id, _, _)| !self.t.store.has(id));
        let total: u64 = need.iter().map(|(_, s, _)| *s).sum();
        if !need.is_empty() {
            // The record and the blobs' advertisements spread separately: right
            // after a push the record may arrive first.
            let deadline = tokio::time::Instant::now() + ADVERT_WAIT;
            let peers = loop {
                let views = self.t.views.borrow().clone();
                let found: Result<Vec<Vec<String>>, &String> = need
                    .iter()
                    .map(|(id, _, what)| self.holders(&views, id).ok_or(what))
                    .collect();
                match found {
                    Ok(p) => break p,
                    Err(what) if tokio::time::Instant::now() >= deadline => {
                        return Err(format!(
                            "{what} of {} is held by no live node (pushed by {})",
                            rec.reference, rec.pushed_by
                        ));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            let (tx, rx) = oneshot::channel();
            self.t
                .blobs
                .send(BlobCmd::Reserve {
                    bytes: total,
                    reply: tx,
                })
                .await
                .map_err(|_| "the agent is shutting down".to_string())?;
            rx.await
                .map_err(|_| "the agent is shutting down".to_string())??;
            let mut waits = Vec::new();
            for ((id, _, _), peers) in need.iter().zip(peers) {
                let (tx, rx) = oneshot::channel();
                self.t
                    .blobs
                    .send(BlobCmd::Need {
                        id: *id,
                        peers,
                        done: tx,
                    })
                    .await
                    .map_err(|_| "the agent is shutting down".to_string())?;
                waits.push(rx);
            }
            tracing::info!(%image, blobs = need.len(), bytes = %human_bytes(total), "pulling an image from peers");
            let mut all = std::pin::pin!(futures_util::future::join_all(waits));
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            let results = loop {
                tokio::select! {
                    r = &mut all => break r,
                    _ = tick.tick() => {
                        let st = self.t.blob_status.borrow().clone();
                        let done: u64 = need
                            .iter()
                            .map(|(id, size, _)| {
                                let text = id.to_string();
                                st.blobs
                                    .iter()
                                    .find(|b| b.id == text)
                                    .map_or(0, |b| b.bytes.min(*size))
                            })
                            .sum();
                        self.t.status.send_modify(|s| {
                            s.pulls.insert(image.to_string(), [done, total]);
                        });
                    }
                }
            };
            for (r, (_, _, what)) in results.into_iter().zip(&need) {
                r.map_err(|_| "the agent is shutting down".to_string())?
                    .map_err(|e| format!("fetching {what} of {}: {e}", rec.reference))?;
            }
        }
        self.t.status.send_modify(|s| {
            s.pulls.insert(image.to_string(), [total, total]);
        });
        // Assemble and load.
        let archive = self.scratch_file("load");
        let (store, path, blob) = (self.t.store.clone(), archive.clone(), image_blob);
        let assembled = tokio::task::spawn_blocking(move || {
            let bytes = store.read_all(&blob).map_err(|e| e.to_string())?;
            let image = ImageBlob::decode(&bytes)?;
            let file = std::fs::File::create(&path)
                .map_err(|e| format!("create {}: {e}", path.display()))?;
            let out = std::io::BufWriter::with_capacity(1 << 20, file);
            let path_of = |b: &str| store.path_of(&b.parse().ok()?);
            shoal_image::assemble(&image, &path_of, &|i| skip[i], out).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("assembling the image failed: {e}"))?;
        let loaded = match assembled {
            Ok(_) => engine.load_image(&archive).await.map_err(|e| e.to_string()),
            Err(e) => Err(format!("assembling the image failed: {e}")),
        };
        let _ = std::fs::remove_file(&archive);
        loaded?;
        let got = engine.image_id(image).await.map_err(|e| e.to_string())?;
        if got.as_deref() != Some(rec.id.as_str()) {
            return Err(format!(
                "docker load gave {image} id {}, but {} was pushed",
                got.as_deref().map_or("none".to_string(), short_id),
                short_id(&rec.id)
            ));
        }
        tracing::info!(%image, id = %short_id(&rec.id), "image loaded from peers");
        Ok(())
    }
}

/// `sha256:0123456789ab…` → `0123456789ab`.
pub fn short_id(id: &str) -> String {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.chars().take(12).collect()
}

/// What the executor holds to ask for images and read pull progress.
#[derive(Clone)]
pub struct ImageHandle {
    /// Commands for the task.
    pub cmds: mpsc::Sender<ImageCmd>,
    /// Pull progress.
    pub status: watch::Receiver<PullStatus>,
}

impl ImageHandle {
    /// Waits until `image` is in this node's engine, or says why it cannot be.
    pub async fn ensure(&self, image: &str) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(ImageCmd::Ensure {
                image: image.to_string(),
                reply: tx,
            })
            .await
            .map_err(|_| "the agent is shutting down".to_string())?;
        rx.await
            .map_err(|_| "the agent is shutting down".to_string())?
    }

    /// `[done, total]` bytes of a pull of `image` under way.
    pub fn progress(&self, image: &str) -> Option<[u64; 2]> {
        self.status.borrow().pulls.get(image).copied()
    }
}
