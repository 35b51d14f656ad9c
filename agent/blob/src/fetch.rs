//! The sans-IO multi-peer fetch of one blob.
//!
//! A [`Fetch`] opens no sockets, reads no clock and spawns nothing: the driver
//! hands it responses and the time, and drains [`Request`]s to send, in the
//! style of quinn-proto. It does write verified chunks to disk through a
//! [`Partial`], inline, so a chunk is durable-or-refetched the moment it has
//! been accepted.
//!
//! Flow: ask one peer for the manifest (unless a partial download on disk
//! already has it), check it hashes to the blob id, then keep up to
//! `per_peer` chunk requests in flight at every usable peer (and at most
//! `parallel` overall), least-loaded peer first. A chunk that fails, times
//! out or comes back busy goes back in the queue and is preferably given to a
//! different peer. A peer that sends bad data is never asked again; one that
//! fails `max_failures` times in a row is avoided.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::id::BlobId;
use crate::manifest::Manifest;
use crate::store::{BlobStore, Partial, StoreError};
use crate::wire::BlobMsg;

/// Tuning of a [`Fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchConfig {
    /// Most requests in flight at one peer.
    pub per_peer: usize,
    /// Most requests in flight overall.
    pub parallel: usize,
    /// A request unanswered this long (ms) counts as a failure of its peer.
    pub timeout_ms: u64,
    /// Consecutive failures after which a peer is avoided for this fetch.
    pub max_failures: u32,
    /// Upper bound (ms) on how long a `Busy` answer keeps a peer aside.
    pub max_busy_wait_ms: u64,
    /// Times a finished download may fail its on-disk re-check (and have the
    /// bad chunks fetched again) before the fetch gives up.
    pub max_finish_attempts: u32,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            per_peer: 4,
            parallel: 16,
            // Generous: a 1 MiB chunk over a slow WAN link with a few others
            // in flight on the same connection takes seconds.
            timeout_ms: 30_000,
            max_failures: 3,
            max_busy_wait_ms: 10_000,
            max_finish_attempts: 3,
        }
    }
}

impl FetchConfig {
    /// Checks the values make sense.
    pub fn validate(&self) -> Result<(), FetchError> {
        let bad = |what: &'static str| Err(FetchError::Config(what));
        if self.per_peer == 0 {
            return bad("per_peer must be at least 1");
        }
        if self.parallel == 0 {
            return bad("parallel must be at least 1");
        }
        if self.timeout_ms == 0 {
            return bad("timeout_ms must be at least 1");
        }
        if self.max_failures == 0 {
            return bad("max_failures must be at least 1");
        }
        if self.max_finish_attempts == 0 {
            return bad("max_finish_attempts must be at least 1");
        }
        Ok(())
    }
}

/// Why a fetch could not complete.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The configuration is invalid.
    #[error("invalid fetch config: {0}")]
    Config(&'static str),
    /// No advertised peer can (any longer) serve the blob.
    #[error("no peer can serve blob {id}: {}", if why.is_empty() { "no peer advertises it".to_string() } else { why.join("; ") })]
    NoPeers {
        /// The blob.
        id: BlobId,
        /// One line per peer known to this fetch: who and why not.
        why: Vec<String>,
    },
    /// The local store failed, or the blob's manifest is inconsistent.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a fetch stands.
#[derive(Debug)]
pub enum Status {
    /// Still working.
    Running,
    /// The blob is complete in the store.
    Done(BlobId),
    /// Gave up; a partial download stays on disk for a later fetch to resume.
    Failed(FetchError),
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum What {
    /// The manifest.
    Manifest,
    /// One chunk.
    Chunk(u32),
}

/// A request the driver must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<P> {
    /// The peer to send it to.
    pub peer: P,
    /// The blob.
    pub id: BlobId,
    /// What to ask for.
    pub what: What,
}

impl<P> Request<P> {
    /// The wire message for this request.
    pub fn to_msg(&self) -> BlobMsg {
        match self.what {
            What::Manifest => BlobMsg::GetManifest { id: self.id },
            What::Chunk(idx) => BlobMsg::GetChunk { id: self.id, idx },
        }
    }
}

/// Per-peer counters of one fetch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Requests sent to it.
    pub requests: u64,
    /// Verified chunks it delivered.
    pub chunks: u64,
    /// Bytes of those chunks.
    pub bytes: u64,
    /// Chunks or manifests from it that failed verification.
    pub bad: u64,
    /// Requests to it that timed out.
    pub timeouts: u64,
    /// Requests to it reported failed by the driver.
    pub failures: u64,
    /// `Busy` answers from it.
    pub busy: u64,
}

/// Why a peer is no longer asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerHealth {
    /// Usable.
    Ok,
    /// Sent data that failed verification: never asked again by this fetch.
    Bad,
    /// Failed `max_failures` times in a row.
    Failing,
    /// Answered that it does not have the blob.
    Missing,
}

#[derive(Debug)]
struct Peer {
    advertised: bool,
    health: PeerHealth,
    in_flight: usize,
    consecutive_failures: u32,
    busy_until: u64,
    stats: PeerStats,
}

impl Peer {
    fn new() -> Self {
        Peer {
            advertised: true,
            health: PeerHealth::Ok,
            in_flight: 0,
            consecutive_failures: 0,
            busy_until: 0,
            stats: PeerStats::default(),
        }
    }

    fn usable(&self) -> bool {
        self.advertised && self.health == PeerHealth::Ok
    }
}

#[derive(Debug, Clone)]
struct Flight<P> {
    peer: P,
    deadline: u64,
}

enum Phase<P> {
    Manifest {
        asked: Option<Flight<P>>,
        /// The peer whose manifest request last failed, to try someone else first.
        avoid: Option<P>,
    },
    Chunks {
        partial: Box<Partial>,
        /// Missing chunks not in flight. Ascending, so disk writes stay mostly sequential.
        queue: BTreeSet<u32>,
        in_flight: BTreeMap<u32, Flight<P>>,
        /// Chunk → the peer that last failed it, to try someone else first.
        avoid: BTreeMap<u32, P>,
        finish_attempts: u32,
    },
    Over,
}

/// Fetches one blob from the peers that advertise it. See the module docs.
pub struct Fetch<P> {
    id: BlobId,
    cfg: FetchConfig,
    store: BlobStore,
    rng: SmallRng,
    peers: BTreeMap<P, Peer>,
    phase: Phase<P>,
    status: Status,
    now: u64,
    total_chunks: Option<u32>,
}

impl<P: Clone + Ord + Debug> Fetch<P> {
    /// Starts fetching `id` into `store` from `peers`.
    ///
    /// If the blob is already complete the fetch is `Done` at once; if a
    /// partial download is on disk it is resumed without asking for the
    /// manifest, and only its missing chunks are requested. `seed` drives the
    /// (deterministic) tie-breaking between equally loaded peers.
    pub fn new(
        id: BlobId,
        peers: impl IntoIterator<Item = P>,
        cfg: FetchConfig,
        store: &BlobStore,
        seed: u64,
    ) -> Result<Self, FetchError> {
        cfg.validate()?;
        let mut f = Fetch {
            id,
            cfg,
            store: store.clone(),
            rng: SmallRng::seed_from_u64(seed),
            peers: peers.into_iter().map(|p| (p, Peer::new())).collect(),
            phase: Phase::Manifest {
                asked: None,
                avoid: None,
            },
            status: Status::Running,
            now: 0,
            total_chunks: None,
        };
        if store.has(&id) {
            f.finish_with(Status::Done(id));
            return Ok(f);
        }
        if let Some(partial) = store.resume(&id)? {
            f.start_chunks(partial);
        }
        f.check_stalled();
        Ok(f)
    }

    /// The blob being fetched.
    pub fn id(&self) -> BlobId {
        self.id
    }

    /// Where the fetch stands.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// The download on disk, once the manifest is known: what this node can already
    /// serve to others fetching the same blob.
    pub fn partial(&self) -> Option<&Partial> {
        match &self.phase {
            Phase::Chunks { partial, .. } => Some(partial),
            _ => None,
        }
    }

    /// Whether the fetch is over (done or failed).
    pub fn is_over(&self) -> bool {
        !matches!(self.status, Status::Running)
    }

    /// `(chunks present, total chunks)`; the total is unknown until the manifest is.
    pub fn progress(&self) -> (u32, Option<u32>) {
        let total = self.total_chunks;
        match &self.phase {
            Phase::Chunks { partial, .. } => (
                partial.manifest().num_chunks() - partial.missing_count(),
                total,
            ),
            Phase::Over if matches!(self.status, Status::Done(_)) => (total.unwrap_or(0), total),
            _ => (0, total),
        }
    }

    /// Counters and health of every peer this fetch has known.
    pub fn peer_stats(&self) -> BTreeMap<P, (PeerHealth, PeerStats)> {
        self.peers
            .iter()
            .map(|(p, s)| (p.clone(), (s.health, s.stats.clone())))
            .collect()
    }

    /// A peer now advertises the blob (again). A peer that answered
    /// `NotFound` becomes usable again; one that sent bad data does not.
    pub fn add_peer(&mut self, peer: P) {
        let p = self.peers.entry(peer).or_insert_with(Peer::new);
        p.advertised = true;
        if p.health == PeerHealth::Missing {
            p.health = PeerHealth::Ok;
        }
    }

    /// A peer no longer advertises the blob (or went down): its outstanding
    /// requests are given to others at once.
    pub fn remove_peer(&mut self, peer: &P) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.advertised = false;
        }
        self.requeue_peer(peer);
        self.check_stalled();
    }

    /// The next request to send, if any. Call until `None` after every input.
    pub fn poll_request(&mut self, now: u64) -> Option<Request<P>> {
        self.now = self.now.max(now);
        if self.is_over() {
            return None;
        }
        let deadline = self.now.saturating_add(self.cfg.timeout_ms);
        match &mut self.phase {
            Phase::Manifest { asked: Some(_), .. } | Phase::Over => None,
            Phase::Manifest { asked, avoid } => {
                let avoid = avoid.as_ref();
                let peer = pick_peer(&self.peers, &mut self.rng, &self.cfg, self.now, avoid)?;
                *asked = Some(Flight {
                    peer: peer.clone(),
                    deadline,
                });
                Some(self.sent(peer, What::Manifest))
            }
            Phase::Chunks {
                queue,
                in_flight,
                avoid,
                ..
            } => {
                if in_flight.len() >= self.cfg.parallel {
                    return None;
                }
                // Look a little past the head so one chunk waiting for "anyone
                // but peer X" does not hold up the rest.
                let (idx, peer) = queue.iter().take(self.cfg.parallel).find_map(|&idx| {
                    let avoid = avoid.get(&idx);
                    pick_peer(&self.peers, &mut self.rng, &self.cfg, self.now, avoid)
                        .map(|p| (idx, p))
                })?;
                queue.remove(&idx);
                in_flight.insert(
                    idx,
                    Flight {
                        peer: peer.clone(),
                        deadline,
                    },
                );
                Some(self.sent(peer, What::Chunk(idx)))
            }
        }
    }

    fn sent(&mut self, peer: P, what: What) -> Request<P> {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.in_flight += 1;
            p.stats.requests += 1;
        }
        Request {
            peer,
            id: self.id,
            what,
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<u64> {
        let flights = match &self.phase {
            Phase::Manifest { asked, .. } => asked.as_ref().map(|f| f.deadline),
            Phase::Chunks { in_flight, .. } => in_flight.values().map(|f| f.deadline).min(),
            Phase::Over => return None,
        };
        // A peer set aside by `Busy` becomes available again at busy_until.
        let busy = self
            .peers
            .values()
            .filter(|p| p.usable() && p.busy_until > self.now)
            .map(|p| p.busy_until)
            .min();
        match (flights, busy) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Expires requests whose deadline has passed; their peers are charged a failure.
    pub fn handle_timeout(&mut self, now: u64) {
        self.now = self.now.max(now);
        let now = self.now;
        let expired: Vec<(What, P)> = match &mut self.phase {
            Phase::Manifest { asked, avoid } => match asked {
                Some(f) if f.deadline <= now => {
                    let peer = f.peer.clone();
                    *asked = None;
                    *avoid = Some(peer.clone());
                    vec![(What::Manifest, peer)]
                }
                _ => vec![],
            },
            Phase::Chunks {
                in_flight,
                queue,
                avoid,
                ..
            } => {
                let late: Vec<u32> = in_flight
                    .iter()
                    .filter(|(_, f)| f.deadline <= now)
                    .map(|(&i, _)| i)
                    .collect();
                late.into_iter()
                    .filter_map(|i| {
                        let f = in_flight.remove(&i)?;
                        queue.insert(i);
                        avoid.insert(i, f.peer.clone());
                        Some((What::Chunk(i), f.peer))
                    })
                    .collect()
            }
            Phase::Over => vec![],
        };
        for (_, peer) in expired {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.in_flight = p.in_flight.saturating_sub(1);
                p.stats.timeouts += 1;
            }
            self.charge_failure(&peer);
        }
        self.check_stalled();
    }

    /// Feeds any response message from `peer`. Requests and messages about
    /// other blobs are ignored.
    pub fn handle_msg(&mut self, peer: &P, msg: BlobMsg, now: u64) {
        if msg.id() != self.id {
            return;
        }
        match msg {
            BlobMsg::Manifest { manifest, .. } => self.handle_manifest(peer, manifest, now),
            BlobMsg::Chunk { idx, bytes, .. } => self.handle_chunk(peer, idx, &bytes, now),
            BlobMsg::NotFound { .. } => self.handle_not_found(peer, now),
            BlobMsg::Busy {
                idx,
                retry_after_ms,
                ..
            } => self.handle_busy(peer, idx, retry_after_ms, now),
            BlobMsg::GetManifest { .. } | BlobMsg::GetChunk { .. } => {}
        }
    }

    /// A manifest from `peer`. One that does not hash to the blob id gets
    /// the peer marked bad, and another peer is asked.
    pub fn handle_manifest(&mut self, peer: &P, manifest: Manifest, now: u64) {
        self.now = self.now.max(now);
        let Phase::Manifest { asked, .. } = &mut self.phase else {
            return; // Already have it (or over): a late duplicate.
        };
        if let Some(f) = asked.take_if(|f| &f.peer == peer) {
            self.end_flight_of(&f.peer);
        }
        if manifest.id() != self.id {
            self.mark_bad(peer);
        } else {
            if let Some(p) = self.peers.get_mut(peer) {
                p.consecutive_failures = 0;
            }
            // Anyone else still asked for it answers into the void: release them.
            if let Phase::Manifest { asked: Some(f), .. } = &self.phase {
                let other = f.peer.clone();
                self.end_flight_of(&other);
            }
            match self.store.begin(&manifest) {
                Ok(partial) => self.start_chunks(partial),
                Err(e) => return self.finish_with(Status::Failed(e.into())),
            }
        }
        self.check_stalled();
    }

    /// Chunk `idx` from `peer`: verified, then written. Bad bytes get the peer
    /// marked bad and the chunk asked of someone else.
    pub fn handle_chunk(&mut self, peer: &P, idx: u32, bytes: &[u8], now: u64) {
        self.now = self.now.max(now);
        let Phase::Chunks {
            partial,
            queue,
            in_flight,
            avoid,
            ..
        } = &mut self.phase
        else {
            return;
        };
        if partial.has_chunk(idx) || idx >= partial.manifest().num_chunks() {
            return; // Late duplicate after a timeout, or nonsense: nothing to learn.
        }
        // Whoever it was asked of, that request is over now.
        let flight = in_flight.remove(&idx);
        match partial.write_chunk(idx, bytes) {
            Ok(()) => {
                queue.remove(&idx);
                avoid.remove(&idx);
                if let Some(p) = self.peers.get_mut(peer) {
                    p.consecutive_failures = 0;
                    p.stats.chunks += 1;
                    p.stats.bytes += bytes.len() as u64;
                }
                if let Some(f) = flight {
                    self.end_flight_of(&f.peer);
                }
                self.maybe_finish();
            }
            Err(StoreError::BadChunk { .. }) => {
                queue.insert(idx);
                avoid.insert(idx, peer.clone());
                if let Some(f) = flight {
                    self.end_flight_of(&f.peer);
                }
                self.mark_bad(peer);
            }
            Err(e) => self.finish_with(Status::Failed(e.into())),
        }
        self.check_stalled();
    }

    /// The driver could not get an answer for `what` from `peer` (stream or
    /// connection error, or an answer that did not decode). Counts as a
    /// failure of that peer.
    pub fn handle_failure(&mut self, peer: &P, what: What, now: u64) {
        self.now = self.now.max(now);
        if self.take_flight(peer, what) {
            if let Some(p) = self.peers.get_mut(peer) {
                p.stats.failures += 1;
            }
            self.charge_failure(peer);
        }
        self.check_stalled();
    }

    /// `peer` says it does not have the blob: stop asking it (until re-added).
    pub fn handle_not_found(&mut self, peer: &P, now: u64) {
        self.now = self.now.max(now);
        if let Some(p) = self.peers.get_mut(peer) {
            if p.health == PeerHealth::Ok {
                p.health = PeerHealth::Missing;
            }
        }
        self.requeue_peer(peer);
        self.check_stalled();
    }

    /// `peer` is over its upload cap: give chunk `idx` to someone else and
    /// leave it alone for `retry_after_ms` (bounded). Not a failure.
    pub fn handle_busy(&mut self, peer: &P, idx: u32, retry_after_ms: u64, now: u64) {
        self.now = self.now.max(now);
        if self.take_flight(peer, What::Chunk(idx)) {
            let until = self
                .now
                .saturating_add(retry_after_ms.min(self.cfg.max_busy_wait_ms));
            if let Some(p) = self.peers.get_mut(peer) {
                p.stats.busy += 1;
                p.busy_until = p.busy_until.max(until);
            }
        }
        self.check_stalled();
    }

    /// Ends the flight of `what` if it is with `peer`, re-queueing a chunk.
    fn take_flight(&mut self, peer: &P, what: What) -> bool {
        let taken = match (&mut self.phase, what) {
            (Phase::Manifest { asked, avoid }, What::Manifest) => {
                let taken = asked.take_if(|f| &f.peer == peer).is_some();
                if taken {
                    *avoid = Some(peer.clone());
                }
                taken
            }
            (
                Phase::Chunks {
                    in_flight,
                    queue,
                    avoid,
                    ..
                },
                What::Chunk(idx),
            ) => match in_flight.get(&idx) {
                Some(f) if &f.peer == peer => {
                    in_flight.remove(&idx);
                    queue.insert(idx);
                    avoid.insert(idx, peer.clone());
                    true
                }
                _ => false,
            },
            _ => false,
        };
        if taken {
            self.end_flight_of(peer);
        }
        taken
    }

    fn end_flight_of(&mut self, peer: &P) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.in_flight = p.in_flight.saturating_sub(1);
        }
    }

    fn charge_failure(&mut self, peer: &P) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        p.consecutive_failures += 1;
        if p.consecutive_failures >= self.cfg.max_failures && p.health == PeerHealth::Ok {
            p.health = PeerHealth::Failing;
            self.requeue_peer(peer);
        }
    }

    fn mark_bad(&mut self, peer: &P) {
        let p = self.peers.entry(peer.clone()).or_insert_with(|| {
            // Unsolicited bad data from a peer we never knew: remember it anyway.
            let mut p = Peer::new();
            p.advertised = false;
            p
        });
        p.stats.bad += 1;
        p.health = PeerHealth::Bad;
        self.requeue_peer(peer);
    }

    /// Gives every request outstanding at `peer` back to the queue.
    fn requeue_peer(&mut self, peer: &P) {
        let mut ended = 0;
        match &mut self.phase {
            Phase::Manifest { asked, .. } => {
                if asked.take_if(|f| &f.peer == peer).is_some() {
                    ended += 1;
                }
            }
            Phase::Chunks {
                in_flight,
                queue,
                avoid,
                ..
            } => {
                in_flight.retain(|&idx, f| {
                    if &f.peer != peer {
                        return true;
                    }
                    queue.insert(idx);
                    avoid.insert(idx, peer.clone());
                    ended += 1;
                    false
                });
            }
            Phase::Over => {}
        }
        if let Some(p) = self.peers.get_mut(peer) {
            p.in_flight = p.in_flight.saturating_sub(ended);
        }
    }

    fn start_chunks(&mut self, partial: Partial) {
        self.total_chunks = Some(partial.manifest().num_chunks());
        self.phase = Phase::Chunks {
            queue: partial.missing().into_iter().collect(),
            partial: Box::new(partial),
            in_flight: BTreeMap::new(),
            avoid: BTreeMap::new(),
            finish_attempts: 0,
        };
        self.maybe_finish();
    }

    fn maybe_finish(&mut self) {
        let Phase::Chunks {
            partial,
            queue,
            finish_attempts,
            ..
        } = &mut self.phase
        else {
            return;
        };
        if partial.missing_count() > 0 {
            return;
        }
        match partial.finish() {
            Ok(id) => self.finish_with(Status::Done(id)),
            Err(StoreError::Corrupt { chunks, .. })
                if *finish_attempts + 1 < self.cfg.max_finish_attempts =>
            {
                // Bytes went bad on our own disk after they were verified:
                // fetch those chunks again.
                *finish_attempts += 1;
                queue.extend(chunks);
            }
            Err(e @ StoreError::ContentMismatch { .. }) => {
                // The manifest contradicts itself: no peer can ever fix this
                // download, so do not leave it around to be resumed.
                self.finish_with(Status::Failed(e.into()));
                let _ = self.store.remove(&self.id);
            }
            Err(e) => self.finish_with(Status::Failed(e.into())),
        }
    }

    fn finish_with(&mut self, status: Status) {
        // Dropping the Partial releases it; its files stay for a later resume.
        self.phase = Phase::Over;
        self.status = status;
        if let Status::Done(id) = self.status {
            if self.total_chunks.is_none() {
                self.total_chunks = self.store.manifest(&id).ok().map(|m| m.num_chunks());
            }
        }
    }

    /// Fails the fetch if work remains and no peer can be asked any more.
    fn check_stalled(&mut self) {
        if self.is_over() || self.peers.values().any(Peer::usable) {
            return;
        }
        let why = self
            .peers
            .iter()
            .map(|(peer, p)| {
                let reason = match (p.health, p.advertised) {
                    (PeerHealth::Bad, _) => "sent data that failed verification".to_string(),
                    (PeerHealth::Failing, _) => {
                        format!("failed {} times in a row", p.consecutive_failures)
                    }
                    (PeerHealth::Missing, _) => "answered that it does not have it".to_string(),
                    (PeerHealth::Ok, false) => "no longer advertises it".to_string(),
                    (PeerHealth::Ok, true) => "usable".to_string(),
                };
                format!("{peer:?} {reason}")
            })
            .collect();
        let id = self.id;
        self.finish_with(Status::Failed(FetchError::NoPeers { id, why }));
    }
}

/// The least-loaded usable peer with spare capacity, ties broken at random.
/// `avoid` is skipped while any other usable peer exists (even a busy one:
/// waiting for it beats asking again the peer that just failed this chunk).
fn pick_peer<P: Clone + Ord>(
    peers: &BTreeMap<P, Peer>,
    rng: &mut SmallRng,
    cfg: &FetchConfig,
    now: u64,
    avoid: Option<&P>,
) -> Option<P> {
    let others_exist = avoid.is_some_and(|a| peers.iter().any(|(p, s)| p != a && s.usable()));
    let mut best: Vec<&P> = Vec::new();
    let mut best_load = usize::MAX;
    for (p, s) in peers {
        if !s.usable() || s.in_flight >= cfg.per_peer || s.busy_until > now {
            continue;
        }
        if others_exist && Some(p) == avoid {
            continue;
        }
        match s.in_flight.cmp(&best_load) {
            std::cmp::Ordering::Less => {
                best_load = s.in_flight;
                best.clear();
                best.push(p);
            }
            std::cmp::Ordering::Equal => best.push(p),
            std::cmp::Ordering::Greater => {}
        }
    }
    match best.len() {
        0 => None,
        1 => Some(best[0].clone()),
        n => Some(best[rng.random_range(0..n)].clone()),
    }
}
