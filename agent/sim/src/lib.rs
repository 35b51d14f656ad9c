//! A deterministic simulator for shoal cores.
//!
//! [`Sim`] runs many [`shoal_core::Node`]s in one thread under virtual time.
//! Nothing touches a socket or a clock: every frame a node emits becomes an
//! event in one queue ordered by `(virtual ms, insertion number)`, delivered
//! after a latency drawn uniformly from [`SimConfig::latency_ms`]. Timers are
//! events in the same queue. All randomness (latencies, datagram loss, node
//! seeds, clock skew) comes from one `SmallRng` seeded with [`SimConfig::seed`],
//! so a seed replays a run exactly, to the byte.
//!
//! The network model: reliable frames (QUIC streams: pushes and sync) are never
//! lost, but are dropped when sender and receiver sit in different partition
//! groups at send time or at delivery time; unreliable frames (QUIC datagrams:
//! SWIM) are subject to the same partition rule and are also lost with
//! probability [`SimConfig::datagram_loss`]. A crashed node stops sending,
//! receiving and firing timers; frames it sent before crashing still arrive.
//! Each node's wall clock may be offset by up to [`SimConfig::clock_skew_ms`].
//!
//! A run that misses a deadline returns a [`SimFailure`] whose message names
//! the seed and how to replay it (`SHOAL_SIM_SEED=<seed>`, see [`test_seeds`]).
//! The simulator does not model bandwidth, congestion, stream ordering or
//! connection set-up cost; latency is per frame and independent.

pub mod orch;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use shoal_core::{Config, Entry, Event, Node, NodeId, Now, Output, Profile, Reject, Status};

/// Wall-clock time (Unix ms) at virtual time 0: 2023-11-14, any fixed value works.
pub const BASE_WALL_MS: u64 = 1_700_000_000_000;
/// UDP/QUIC port every simulated node pretends to listen on.
pub const SIM_PORT: u16 = 7000;
/// Most nodes one simulation can address (`127.1.x.y`).
pub const MAX_NODES: usize = 1 << 16;
/// Environment variable that pins [`test_seeds`] to one seed, to replay a failure.
pub const SEED_ENV: &str = "SHOAL_SIM_SEED";

/// How a simulation is set up.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// Seed of every random choice in the run.
    pub seed: u64,
    /// Timing preset of every node.
    pub profile: Profile,
    /// Per-frame latency in ms, drawn uniformly from `min..=max`.
    pub latency_ms: (u64, u64),
    /// Probability that a datagram (SWIM frame) is lost; streams are never lost.
    pub datagram_loss: f64,
    /// Replication only: every node gets the full peer list instead of running SWIM.
    pub static_peers: bool,
    /// Each node's wall clock is offset by a uniform value in `-skew..=skew` ms.
    pub clock_skew_ms: u64,
    /// Adjusts node `i`'s core config before it starts (to compare settings);
    /// `None` runs the core's defaults.
    pub tune: Option<fn(usize, &mut Config)>,
    /// How often (virtual ms) [`Sim::step_until`] evaluates its predicate;
    /// times it reports are multiples of this.
    pub check_every_ms: u64,
}

impl SimConfig {
    /// `nodes` LAN nodes, 1-5 ms latency, no loss, SWIM membership, no clock
    /// skew, core defaults, predicates checked every 10 virtual ms.
    pub fn new(nodes: usize, seed: u64) -> Self {
        SimConfig {
            nodes,
            seed,
            profile: Profile::Lan,
            latency_ms: (1, 5),
            datagram_loss: 0.0,
            static_peers: false,
            clock_skew_ms: 0,
            tune: None,
            check_every_ms: 10,
        }
    }

    /// A one-line description of the network model, for reports.
    pub fn describe(&self) -> String {
        format!(
            "{:?} profile, latency uniform {}..={} ms per frame, datagram loss {:.1}%, clock skew ±{} ms, {}",
            self.profile,
            self.latency_ms.0,
            self.latency_ms.1,
            self.datagram_loss * 100.0,
            self.clock_skew_ms,
            if self.static_peers { "static peer list (no SWIM)" } else { "SWIM membership" }
        )
    }
}

/// Why a run did not reach its goal; its message carries the seed that replays it.
#[derive(Clone, PartialEq, Eq)]
pub struct SimFailure {
    /// Seed of the failing run.
    pub seed: u64,
    /// Virtual time (ms) when the run gave up.
    pub at_ms: u64,
    /// How long (virtual ms) the run waited for the goal.
    pub waited_ms: u64,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "simulation seed {} did not reach its goal within {} virtual ms (gave up at t={} ms); \
             replay with {}={} cargo test -p shoal-sim",
            self.seed, self.waited_ms, self.at_ms, SEED_ENV, self.seed
        )
    }
}

// Debug shows the same text, so `.expect()` and `?` in tests print the seed readably.
impl fmt::Debug for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for SimFailure {}

/// The seeds a test should run: `SHOAL_SIM_SEED` alone if set, else `1..=count`.
pub fn test_seeds(count: u64) -> Vec<u64> {
    match std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        Some(seed) => vec![seed],
        None => (1..=count).collect(),
    }
}

/// The fake address of node `i`: `127.1.(i/256).(i%256):7000` (never used for I/O).
pub fn node_addr(i: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(127, 1, (i / 256) as u8, (i % 256) as u8),
        SIM_PORT,
    ))
}

/// Lifecycle of a simulated node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    /// Running normally.
    Running,
    /// Crashed: sends, receives and fires nothing.
    Crashed,
    /// Left gracefully and shut down.
    Left,
}

/// Frame kinds, as counted in [`NetStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// SWIM datagram.
    Swim,
    /// Epidemic push of changes.
    Push,
    /// Anti-entropy request or answer.
    Sync,
    /// Blob-transfer payload.
    Blob,
    /// Anything the simulator could not classify.
    Other,
}

impl FrameKind {
    const ALL: [FrameKind; 5] = [
        FrameKind::Swim,
        FrameKind::Push,
        FrameKind::Sync,
        FrameKind::Blob,
        FrameKind::Other,
    ];

    /// Classifies a frame by its variant name, without decoding it
    /// ([`shoal_core::wire::variant`]).
    pub fn of(frame: &[u8]) -> FrameKind {
        match shoal_core::wire::variant(frame) {
            Some(b"Swim") => FrameKind::Swim,
            Some(b"Push") => FrameKind::Push,
            Some(b"SyncReq" | b"SyncResp") => FrameKind::Sync,
            Some(b"Blob") => FrameKind::Blob,
            _ => FrameKind::Other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Lower-case label.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameKind::Swim => "swim",
            FrameKind::Push => "push",
            FrameKind::Sync => "sync",
            FrameKind::Blob => "blob",
            FrameKind::Other => "other",
        }
    }
}

/// What the simulated network did with the frames handed to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames handed to the network.
    pub sent: u64,
    /// Frames delivered to a running node.
    pub delivered: u64,
    /// Datagrams lost to random loss.
    pub lost: u64,
    /// Frames dropped because of a partition (at send or delivery).
    pub partitioned: u64,
    /// Frames dropped because the receiver had crashed or left.
    pub dead_receiver: u64,
    /// Frames addressed to an address that is no simulated node.
    pub unroutable: u64,
    /// Bytes sent, by [`FrameKind`] (indexed in declaration order).
    pub bytes_by_kind: [u64; 5],
}

impl NetStats {
    /// Bytes sent in frames of one kind.
    pub fn bytes(&self, kind: FrameKind) -> u64 {
        self.bytes_by_kind[kind.index()]
    }

    /// Bytes sent in all frames.
    pub fn total_bytes(&self) -> u64 {
        self.bytes_by_kind.iter().sum()
    }

    /// Per-kind labels and byte counts.
    pub fn by_kind(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        FrameKind::ALL.iter().map(|k| (k.as_str(), self.bytes(*k)))
    }
}

/// Core events seen across all nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventCounts {
    /// `MemberUp` events (a node started seeing a member as active).
    pub member_up: u64,
    /// `MemberDown` events (a node declared a member down).
    pub member_down: u64,
    /// `Changed` events (an entry became current on a node).
    pub changed: u64,
    /// `IdentityRefused` events (a node refused a process claiming a live name).
    pub identity_refused: u64,
    /// `IdentityReplaced` events (a claimant replaced a silent holder of its name).
    pub identity_replaced: u64,
}

/// First arrival of one watched `(key, value)` at each node.
#[derive(Debug, Clone)]
struct Watch {
    key: String,
    value: Vec<u8>,
    since: u64,
    arrivals: Vec<Option<u64>>,
    count: usize,
}

struct Slot {
    node: Node,
    addr: SocketAddr,
    skew_ms: i64,
    life: Life,
    group: u32,
    /// Time of the timer event queued for this node, if any (later ones are stale).
    timer_at: Option<u64>,
    /// Reasons peers gave for refusing this node (`JoinRefused` events).
    refused: Vec<String>,
    /// Keys of this node's writes that lost the LWW merge (`Overwritten` events).
    overwritten: Vec<String>,
    /// Until this virtual ms the node is stopped (SIGSTOP): frames to it and its
    /// timers wait, as in a stopped process's socket buffer and timer wheel.
    paused_until: u64,
}

enum Job {
    Deliver { from: u32, to: u32, bytes: Vec<u8> },
    Timer { node: u32 },
}

struct Queued {
    at: u64,
    seq: u64,
    job: Job,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A deterministic, single-threaded simulation of a shoal cluster.
pub struct Sim {
    cfg: SimConfig,
    rng: SmallRng,
    now: u64,
    slots: Vec<Slot>,
    queue: BinaryHeap<Reverse<Queued>>,
    next_seq: u64,
    net: NetStats,
    events: EventCounts,
    watch: Option<Watch>,
    downs: Vec<Down>,
}

/// One node declaring a member down (a `MemberDown` event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Down {
    /// Virtual ms.
    pub at: u64,
    /// The node that declared it (or heard it declared).
    pub observer: usize,
    /// The member's name.
    pub member: String,
}

impl Sim {
    /// Builds `cfg.nodes` nodes at virtual time 0; call [`join_all`](Self::join_all) next.
    ///
    /// Panics if the config is impossible: more than [`MAX_NODES`] nodes,
    /// latency `min > max`, or a loss probability outside `0..=1`.
    pub fn new(cfg: SimConfig) -> Self {
        assert!(
            cfg.nodes <= MAX_NODES,
            "at most {MAX_NODES} simulated nodes, got {}",
            cfg.nodes
        );
        assert!(
            cfg.latency_ms.0 <= cfg.latency_ms.1,
            "latency range {:?} has min > max",
            cfg.latency_ms
        );
        assert!(
            (0.0..=1.0).contains(&cfg.datagram_loss),
            "datagram loss {} is not a probability",
            cfg.datagram_loss
        );
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let n = cfg.nodes;
        let hint = u32::try_from(n).unwrap_or(u32::MAX);
        let peers: Option<Arc<[SocketAddr]>> = cfg
            .static_peers
            .then(|| (0..n).map(node_addr).collect::<Vec<_>>().into());
        let skew = i64::try_from(cfg.clock_skew_ms).unwrap_or(i64::MAX);
        let mut slots = Vec::with_capacity(n);
        for i in 0..n {
            let addr = node_addr(i);
            let mut ncfg = Config::new(format!("n{i}"), addr, cfg.profile, hint);
            ncfg.static_peers = peers.clone();
            if let Some(tune) = cfg.tune {
                tune(i, &mut ncfg);
            }
            let gen: u64 = rng.random();
            let seed: u64 = rng.random();
            let skew_ms = if skew > 0 {
                rng.random_range(-skew..=skew)
            } else {
                0
            };
            let now = wall(0, skew_ms);
            slots.push(Slot {
                node: Node::new(ncfg, gen, seed, now),
                addr,
                skew_ms,
                life: Life::Running,
                group: 0,
                timer_at: None,
                refused: Vec::new(),
                overwritten: Vec::new(),
                paused_until: 0,
            });
        }
        let mut sim = Sim {
            cfg,
            rng,
            now: 0,
            slots,
            queue: BinaryHeap::new(),
            next_seq: 0,
            net: NetStats::default(),
            events: EventCounts::default(),
            watch: None,
            downs: Vec::new(),
        };
        for i in 0..n {
            sim.drain(i);
        }
        sim
    }

    /// Every node joins through node 0's address. In static-peer mode nodes
    /// already know each other and this does nothing.
    pub fn join_all(&mut self) {
        if self.cfg.static_peers {
            return;
        }
        let seed = [node_addr(0)];
        for i in 0..self.slots.len() {
            self.join(i, &seed);
        }
    }

    /// Node `i` joins through the nodes at `seeds` (addresses, see [`node_addr`]).
    pub fn join(&mut self, i: usize, seeds: &[SocketAddr]) {
        if self.slots[i].life != Life::Running {
            return;
        }
        let now = self.now_of(i);
        self.slots[i].node.join(seeds, now);
        self.drain(i);
    }

    /// The run's configuration.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// Changes how often (virtual ms) [`step_until`](Self::step_until) checks its predicate.
    pub fn set_check_every(&mut self, ms: u64) {
        self.cfg.check_every_ms = ms.max(1);
    }

    /// The run's seed.
    pub fn seed(&self) -> u64 {
        self.cfg.seed
    }

    /// Current virtual time in ms.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Number of nodes, crashed and departed included.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the simulation has no nodes.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.slots[i].node
    }

    /// Node `i`'s lifecycle state.
    pub fn life(&self, i: usize) -> Life {
        self.slots[i].life
    }

    /// Whether node `i` is running (neither crashed nor departed).
    pub fn is_live(&self, i: usize) -> bool {
        self.slots[i].life == Life::Running
    }

    /// Indices of running nodes.
    pub fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.slots.len()).filter(|&i| self.is_live(i))
    }

    /// Number of running nodes.
    pub fn live_count(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.life == Life::Running)
            .count()
    }

    /// Bytes node `i` has sent since the start.
    pub fn bytes_sent(&self, i: usize) -> u64 {
        self.slots[i].node.stats().bytes_out
    }

    /// Bytes all nodes have sent since the start.
    pub fn total_bytes_sent(&self) -> u64 {
        self.slots.iter().map(|s| s.node.stats().bytes_out).sum()
    }

    /// Bytes sent by each node since the start, in node order.
    pub fn bytes_sent_per_node(&self) -> Vec<u64> {
        self.slots
            .iter()
            .map(|s| s.node.stats().bytes_out)
            .collect()
    }

    /// What the network did so far.
    pub fn net_stats(&self) -> &NetStats {
        &self.net
    }

    /// Core events counted so far, over all nodes.
    pub fn event_counts(&self) -> &EventCounts {
        &self.events
    }

    /// The `Now` node `i` sees at the current virtual time.
    pub fn now_of(&self, i: usize) -> Now {
        wall(self.now, self.slots[i].skew_ms)
    }

    /// Writes `key = value` on node `i` (which starts spreading it).
    pub fn put(&mut self, i: usize, key: &str, value: &[u8]) -> Result<Entry, Reject> {
        self.write(i, key, Some(value.to_vec()))
    }

    /// Deletes `key` on node `i` (a tombstone, spread like any write).
    pub fn delete(&mut self, i: usize, key: &str) -> Result<Entry, Reject> {
        self.write(i, key, None)
    }

    /// Node `i` forgets the down or left member `name` (`shoal node forget`).
    pub fn forget(&mut self, i: usize, name: &str) -> Result<Entry, shoal_core::ForgetRefusal> {
        let now = self.now_of(i);
        let res = self.slots[i].node.forget_member(name, now);
        self.drain(i);
        res
    }

    fn write(&mut self, i: usize, key: &str, value: Option<Vec<u8>>) -> Result<Entry, Reject> {
        assert!(
            self.is_live(i),
            "put on node {i}, which is {:?}",
            self.slots[i].life
        );
        let now = self.now_of(i);
        let res = self.slots[i].node.put(key, value, now);
        self.drain(i);
        res
    }

    /// Splits the network: nodes in different groups cannot exchange frames.
    /// Nodes not listed form one more group together.
    pub fn partition(&mut self, groups: &[Vec<usize>]) {
        for s in &mut self.slots {
            s.group = 0;
        }
        for (g, members) in groups.iter().enumerate() {
            for &i in members {
                self.slots[i].group = g as u32 + 1;
            }
        }
    }

    /// Removes every partition.
    pub fn heal(&mut self) {
        for s in &mut self.slots {
            s.group = 0;
        }
    }

    /// Hands node `to` a frame as if node `from` had sent it (test hook for
    /// hand-crafted or hostile frames); the frame skips the network model.
    pub fn inject(&mut self, from: usize, to: usize, bytes: &[u8]) {
        if self.slots[to].life != Life::Running {
            return;
        }
        let now = self.now_of(to);
        let (name, addr) = (
            self.slots[from].node.name().to_string(),
            self.slots[from].addr,
        );
        self.slots[to].node.handle_frame(&name, addr, bytes, now);
        self.drain(to);
    }

    /// The reasons peers gave node `i` for refusing it, oldest first.
    pub fn refusals(&self, i: usize) -> &[String] {
        &self.slots[i].refused
    }

    /// Keys of node `i`'s writes that another node's write overwrote, oldest first.
    pub fn overwritten(&self, i: usize) -> &[String] {
        &self.slots[i].overwritten
    }

    /// Node `i` stops dead: no more frames in or out, no timers.
    pub fn crash(&mut self, i: usize) {
        self.slots[i].life = Life::Crashed;
        self.slots[i].timer_at = None;
    }

    /// Node `i` stops for `ms` of virtual time, as under SIGSTOP or CPU
    /// starvation: nothing it would send goes out, and frames sent to it and its
    /// timers are handled when it resumes (late).
    pub fn pause(&mut self, i: usize, ms: u64) {
        self.slots[i].paused_until = self.now.saturating_add(ms);
    }

    /// Every `MemberDown` event so far, in order.
    pub fn downs(&self) -> &[Down] {
        &self.downs
    }

    /// Node `i` leaves gracefully (its farewell frames go out), then shuts down.
    pub fn leave(&mut self, i: usize) {
        if !self.is_live(i) {
            return;
        }
        let now = self.now_of(i);
        self.slots[i].node.leave(now);
        self.drain(i);
        self.slots[i].life = Life::Left;
        self.slots[i].timer_at = None;
    }

    /// Starts recording when each node first holds `key = value` (clears any earlier watch).
    /// Nodes that already hold it count as arriving now.
    pub fn watch(&mut self, key: &str, value: &[u8]) {
        let mut w = Watch {
            key: key.to_string(),
            value: value.to_vec(),
            since: self.now,
            arrivals: vec![None; self.slots.len()],
            count: 0,
        };
        for (i, s) in self.slots.iter().enumerate() {
            if s.node.state().value(key) == Some(value) {
                w.arrivals[i] = Some(self.now);
                w.count += 1;
            }
        }
        self.watch = Some(w);
    }

    /// How many nodes have held the watched value so far (0 without a watch).
    pub fn watch_count(&self) -> usize {
        self.watch.as_ref().map_or(0, |w| w.count)
    }

    /// Virtual ms after [`watch`](Self::watch) at which each node first held the value.
    pub fn watch_arrivals(&self) -> Vec<Option<u64>> {
        self.watch.as_ref().map_or_else(Vec::new, |w| {
            w.arrivals.iter().map(|a| a.map(|t| t - w.since)).collect()
        })
    }

    /// Virtual ms after the watch started until `fraction` of all nodes held the value,
    /// or `None` if that many have not yet.
    pub fn watch_time_to(&self, fraction: f64) -> Option<u64> {
        let mut times: Vec<u64> = self.watch_arrivals().into_iter().flatten().collect();
        times.sort_unstable();
        let need = needed(fraction, self.slots.len());
        if need == 0 {
            return Some(0);
        }
        times.get(need - 1).copied()
    }

    /// Whether every running node's `members()` shows exactly `n` alive members (itself included).
    pub fn all_see_alive(&self, n: usize) -> bool {
        // members() clones every identity, so first make sure every node at
        // least has n active (alive or suspect) members, which is O(1) each.
        self.live()
            .all(|i| self.slots[i].node.num_active_peers() + 1 >= n)
            && self.live().all(|i| {
                let alive = self.slots[i]
                    .node
                    .members()
                    .iter()
                    .filter(|(_, st)| *st == Status::Alive)
                    .count();
                alive == n
            })
    }

    /// The smallest membership view among running nodes: active peers (alive
    /// or suspect) plus itself. Cheap; useful as a warm-up condition.
    pub fn min_view(&self) -> usize {
        self.live()
            .map(|i| self.slots[i].node.num_active_peers() + 1)
            .min()
            .unwrap_or(0)
    }

    /// Whether every running node other than `target` sees `target` (its newest identity) as `status`.
    pub fn all_see_status(&self, target: usize, status: Status) -> bool {
        let name = self.slots[target].node.name();
        self.live().filter(|&i| i != target).all(|i| {
            let members = self.slots[i].node.members();
            let newest = members
                .iter()
                .filter(|(id, _)| id.name == name)
                .max_by_key(|(id, _)| id.gen);
            newest.is_some_and(|(_, st)| *st == status)
        })
    }

    /// How node `i` sees each member, newest identity per name, itself included.
    pub fn view_of(&self, i: usize) -> Vec<(NodeId, Status)> {
        let mut members = self.slots[i].node.members();
        members.sort_by(|a, b| a.0.name.cmp(&b.0.name).then(b.0.gen.cmp(&a.0.gen)));
        members.dedup_by(|later, first| later.0.name == first.0.name);
        members
    }

    /// Fraction of running nodes whose replica holds `key = value`.
    pub fn converged_on(&self, key: &str, value: &[u8]) -> f64 {
        let live = self.live_count();
        if live == 0 {
            return 0.0;
        }
        let have = self
            .live()
            .filter(|&i| self.slots[i].node.state().value(key) == Some(value))
            .count();
        have as f64 / live as f64
    }

    /// Whether all running nodes hold identical entries (tombstones included).
    pub fn states_equal(&self) -> bool {
        let mut live = self.live();
        let Some(first) = live.next() else {
            return true;
        };
        let reference = self.slots[first].node.state();
        live.all(|i| {
            let st = self.slots[i].node.state();
            st.len() == reference.len() && st.entries().eq(reference.entries())
        })
    }

    /// Runs every event up to `deadline_ms`, checking `pred` every
    /// [`SimConfig::check_every_ms`] of virtual time. Stops as soon as `pred`
    /// holds and returns true; otherwise returns false with now = deadline.
    pub fn step_until(&mut self, deadline_ms: u64, mut pred: impl FnMut(&Sim) -> bool) -> bool {
        if pred(self) {
            return true;
        }
        let step = self.cfg.check_every_ms.max(1);
        while self.now < deadline_ms {
            let until = self.now.saturating_add(step).min(deadline_ms);
            self.advance_to(until);
            if pred(self) {
                return true;
            }
        }
        false
    }

    /// Runs until `pred` holds; returns the virtual ms that took, or a
    /// [`SimFailure`] (carrying the seed) after `timeout_ms`.
    pub fn run_until(
        &mut self,
        pred: impl FnMut(&Sim) -> bool,
        timeout_ms: u64,
    ) -> Result<u64, SimFailure> {
        let start = self.now;
        if self.step_until(start.saturating_add(timeout_ms), pred) {
            Ok(self.now - start)
        } else {
            Err(SimFailure {
                seed: self.cfg.seed,
                at_ms: self.now,
                waited_ms: timeout_ms,
            })
        }
    }

    /// Runs for `ms` virtual milliseconds.
    pub fn run_for(&mut self, ms: u64) {
        self.advance_to(self.now.saturating_add(ms));
    }

    /// Executes every queued event due at or before `t`, then sets now = `t`.
    fn advance_to(&mut self, t: u64) {
        while let Some(Reverse(q)) = self.queue.peek() {
            if q.at > t {
                break;
            }
            let Some(Reverse(q)) = self.queue.pop() else {
                break;
            };
            self.now = q.at;
            self.execute(q.job);
        }
        self.now = self.now.max(t);
    }

    fn execute(&mut self, job: Job) {
        match job {
            Job::Timer { node } => {
                let i = node as usize;
                let s = &mut self.slots[i];
                if s.life != Life::Running || s.timer_at != Some(self.now) {
                    return; // stale: re-armed for another time, or the node is gone
                }
                if s.paused_until > self.now {
                    let at = s.paused_until;
                    s.timer_at = Some(at);
                    self.enqueue(at, Job::Timer { node });
                    return;
                }
                s.timer_at = None;
                let now = wall(self.now, s.skew_ms);
                s.node.handle_timeout(now);
                self.drain(i);
            }
            Job::Deliver { from, to, bytes } => {
                let (from, to) = (from as usize, to as usize);
                if self.slots[to].life != Life::Running {
                    self.net.dead_receiver += 1;
                    return;
                }
                if self.slots[from].group != self.slots[to].group {
                    self.net.partitioned += 1;
                    return;
                }
                if self.slots[to].paused_until > self.now {
                    let at = self.slots[to].paused_until;
                    self.enqueue(
                        at,
                        Job::Deliver {
                            from: from as u32,
                            to: to as u32,
                            bytes,
                        },
                    );
                    return;
                }
                self.net.delivered += 1;
                let now = self.now_of(to);
                // What the sender's certificate would vouch for: its configured name.
                let (name, addr) = (
                    self.slots[from].node.name().to_string(),
                    self.slots[from].addr,
                );
                self.slots[to].node.handle_frame(&name, addr, &bytes, now);
                self.drain(to);
            }
        }
    }

    /// Hands node `i`'s outputs to the network and re-arms its timer.
    fn drain(&mut self, i: usize) {
        while let Some(out) = self.slots[i].node.poll_output() {
            match out {
                Output::Transmit {
                    to,
                    reliable,
                    bytes,
                } => self.send(i, to, reliable, bytes),
                Output::Event(ev) => self.observe(i, &ev),
            }
        }
        let s = &mut self.slots[i];
        if s.life != Life::Running {
            return;
        }
        let want = s.node.poll_timeout().map(|t| t.max(self.now));
        if want != s.timer_at {
            s.timer_at = want;
            if let Some(at) = want {
                self.enqueue(at, Job::Timer { node: i as u32 });
            }
        }
    }

    fn observe(&mut self, i: usize, ev: &Event) {
        match ev {
            Event::MemberUp(_) => self.events.member_up += 1,
            Event::MemberDown(id) => {
                self.events.member_down += 1;
                self.downs.push(Down {
                    at: self.now,
                    observer: i,
                    member: id.name.clone(),
                });
            }
            Event::Changed(_) => self.events.changed += 1,
            Event::IdentityRefused { .. } => self.events.identity_refused += 1,
            Event::IdentityReplaced { .. } => self.events.identity_replaced += 1,
            Event::JoinRefused { reason, .. } => self.slots[i].refused.push(reason.clone()),
            Event::Overwritten { ours, .. } => self.slots[i].overwritten.push(ours.key.clone()),
            _ => {}
        }
        if let (Event::Changed(e), Some(w)) = (ev, self.watch.as_mut()) {
            if w.arrivals[i].is_none() && e.key == w.key && e.value.as_deref() == Some(&w.value[..])
            {
                w.arrivals[i] = Some(self.now);
                w.count += 1;
            }
        }
    }

    fn send(&mut self, from: usize, to: SocketAddr, reliable: bool, bytes: Vec<u8>) {
        self.net.sent += 1;
        self.net.bytes_by_kind[FrameKind::of(&bytes).index()] += bytes.len() as u64;
        let Some(to) = self.index_of(to) else {
            self.net.unroutable += 1;
            return;
        };
        if self.slots[from].group != self.slots[to].group {
            self.net.partitioned += 1;
            return;
        }
        if !reliable
            && self.cfg.datagram_loss > 0.0
            && self.rng.random_bool(self.cfg.datagram_loss.min(1.0))
        {
            self.net.lost += 1;
            return;
        }
        let (lo, hi) = self.cfg.latency_ms;
        let delay = if hi > lo {
            self.rng.random_range(lo..=hi)
        } else {
            lo
        };
        self.enqueue(
            self.now + delay,
            Job::Deliver {
                from: from as u32,
                to: to as u32,
                bytes,
            },
        );
    }

    fn enqueue(&mut self, at: u64, job: Job) {
        self.next_seq += 1;
        self.queue.push(Reverse(Queued {
            at,
            seq: self.next_seq,
            job,
        }));
    }

    fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        let SocketAddr::V4(v4) = addr else {
            return None;
        };
        let [a, b, c, d] = v4.ip().octets();
        if (a, b) != (127, 1) || v4.port() != SIM_PORT {
            return None;
        }
        let i = usize::from(c) * 256 + usize::from(d);
        (i < self.slots.len()).then_some(i)
    }
}

fn wall(mono_ms: u64, skew_ms: i64) -> Now {
    Now {
        mono_ms,
        wall_ms: BASE_WALL_MS
            .saturating_add(mono_ms)
            .saturating_add_signed(skew_ms),
    }
}

/// Nodes needed for `fraction` of `n`, rounding up (99.9% of 100 is all 100).
pub fn needed(fraction: f64, n: usize) -> usize {
    let need = (fraction * n as f64 - 1e-9).ceil();
    (need.max(0.0) as usize).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::wire::{encode, Msg};
    use shoal_core::{Delta, WriterId};

    #[test]
    fn frame_kind_matches_the_wire_format() {
        let w = WriterId {
            node: "n1".into(),
            gen: 1,
        };
        assert_eq!(
            FrameKind::of(&encode(&Msg::Swim(vec![1, 2, 3]))),
            FrameKind::Swim
        );
        assert_eq!(
            FrameKind::of(&encode(&Msg::Push { entries: vec![] })),
            FrameKind::Push
        );
        assert_eq!(
            FrameKind::of(&encode(&Msg::SyncReq {
                digest: 7,
                heads: Some(vec![(w.clone(), 3)])
            })),
            FrameKind::Sync
        );
        let resp = Msg::SyncResp {
            heads: vec![(w, 1)],
            delta: Delta::default(),
            reply: true,
        };
        assert_eq!(FrameKind::of(&encode(&resp)), FrameKind::Sync);
        assert_eq!(
            FrameKind::of(&encode(&Msg::Blob(vec![7; 40]))),
            FrameKind::Blob
        );
        assert_eq!(FrameKind::of(b"SH\x01"), FrameKind::Other);
        assert_eq!(FrameKind::of(b""), FrameKind::Other);
    }

    #[test]
    fn addresses_round_trip() {
        let sim = Sim::new(SimConfig {
            static_peers: true,
            ..SimConfig::new(600, 1)
        });
        for i in [0, 1, 255, 256, 599] {
            assert_eq!(sim.index_of(node_addr(i)), Some(i));
        }
        assert_eq!(sim.index_of(node_addr(600)), None);
        assert_eq!(sim.index_of("10.0.0.1:7000".parse().unwrap()), None);
    }

    #[test]
    fn needed_rounds_up() {
        assert_eq!(needed(0.999, 100), 100);
        assert_eq!(needed(0.99, 100), 99);
        assert_eq!(needed(0.999, 10_000), 9_990);
        assert_eq!(needed(1.0, 7), 7);
        assert_eq!(needed(0.0, 7), 0);
    }

    #[test]
    fn clock_skew_stays_in_bounds() {
        let sim = Sim::new(SimConfig {
            clock_skew_ms: 500,
            static_peers: true,
            ..SimConfig::new(50, 3)
        });
        let skews: Vec<i64> = (0..50)
            .map(|i| sim.now_of(i).wall_ms as i64 - BASE_WALL_MS as i64)
            .collect();
        assert!(skews.iter().all(|s| s.abs() <= 500));
        assert!(
            skews.iter().any(|&s| s != 0),
            "skew was configured but never applied"
        );
    }
}
