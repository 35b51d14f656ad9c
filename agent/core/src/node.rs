//! One agent's core: membership plus replicated state, as a sans-IO state machine.
//!
//! The driver feeds it received frames, fired timers and local writes, each
//! with the current time, and then drains [`Output`]s: frames to transmit and
//! events to act on. It never sleeps, spawns, reads a clock or touches a
//! socket, so the simulator can run thousands of them in virtual time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU8, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use foca::OwnedNotification;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::hlc::{Clock, Hlc};
use crate::identity::{Guard, Verdict};
use crate::lifeguard::{Due, Lifeguard, LifeguardConfig};
use crate::membership::{packet_sender, MemberEffect, Membership, NodeId, Status, SwimTimer};
use crate::state::{Entry, Reject, State, WriterId, NODE_PREFIX};
use crate::wire::{self, Msg};

/// Suffix of the node-owned key a node writes when it leaves gracefully.
pub const LEFT_SUFFIX: &str = "left";
/// Prefix of forget marks: `forget/<name>` holds the highest generation of `name`
/// that every node forgets (8 bytes, big-endian).
pub const FORGET_PREFIX: &str = "forget/";

/// Timing presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Low-latency networks: 1 s SWIM probes, 200 ms gossip, 2 s anti-entropy.
    Lan,
    /// Long-haul links: 5 s probes, 500 ms gossip, 10 s anti-entropy.
    Wan,
}

/// Everything the core needs to know up front.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name (bound to its certificate).
    pub name: String,
    /// Where this node listens for QUIC.
    pub addr: SocketAddr,
    /// SWIM settings (foca).
    pub swim: foca::Config,
    /// How often pending changes are pushed again.
    pub gossip_interval: Duration,
    /// How many random peers each push goes to.
    pub fanout: usize,
    /// Each change is pushed `ceil(retransmit_mult * log10(N + 1))` times.
    pub retransmit_mult: f64,
    /// How often to run anti-entropy with one random peer.
    pub sync_interval: Duration,
    /// Upper bound on the entries in one sync answer, in bytes.
    pub sync_budget: usize,
    /// Upper bound on the entries in one push, in bytes.
    pub push_budget: usize,
    /// Remote timestamps further ahead than this are refused.
    pub max_drift: Duration,
    /// Tombstones older than this are collected.
    pub tombstone_ttl: Duration,
    /// A member that left gracefully this long ago is forgotten by every node on
    /// its own: out of the member list, its node-owned records dropped.
    pub forget_left_after: Duration,
    /// A fixed peer list instead of SWIM. Used to measure replication alone at
    /// sizes where running SWIM in every simulated node does not fit in memory;
    /// agents always run SWIM.
    pub static_peers: Option<Arc<[SocketAddr]>>,
    /// Longest wait between announcements while the node has no live peer (the
    /// wait doubles from 1 s up to this), so any partition heals once links return.
    pub rejoin_max: Duration,
    /// How long the holder of a name has to answer before a process claiming the
    /// same name from another address replaces it ([`crate::identity`]).
    pub verify_timeout: Duration,
    /// Failure detection on top of SWIM: local health, suspicions that shrink with
    /// confirmations, buddy refutation ([`crate::lifeguard`]).
    pub lifeguard: LifeguardConfig,
}

/// Largest SWIM packet; stays under QUIC's datagram size on a 1200-byte path.
pub const SWIM_PACKET_SIZE: usize = 1024;

/// Most known members one rejoin round announces to (besides every seed).
const REJOIN_SAMPLE: usize = 32;

/// Sweeps (1 s apart) in which a member suspect for too long is asked directly
/// before it is declared down ([`Node::sweep_suspects`]).
const STUCK_ASKS: u32 = 3;

impl Config {
    /// A config from a timing preset, sized for about `cluster_size` nodes.
    pub fn new(
        name: impl Into<String>,
        addr: SocketAddr,
        profile: Profile,
        cluster_size: u32,
    ) -> Self {
        let size = NonZeroU32::new(cluster_size.max(1)).unwrap_or(NonZeroU32::MIN);
        let mut swim = match profile {
            Profile::Lan => foca::Config::new_lan(size),
            Profile::Wan => foca::Config::new_wan(size),
        };
        swim.max_packet_size = NonZeroUsize::new(SWIM_PACKET_SIZE).unwrap_or(NonZeroUsize::MIN);
        // Lifeguard keeps fast timers from raising false alarms (a lossy link or a
        // starved observer cannot declare a member down alone), so probes run
        // twice as often as foca's memberlist-derived LAN preset and a suspicion
        // lasts from `f` periods, and never under 1.5 (confirmed by 3 other
        // observers, which their confirmation checks make take one probe
        // timeout), to `3 f` (alone), where f = max(1, log10 N) for the N members
        // known now. WAN keeps foca's timing.
        if profile == Profile::Lan {
            swim.probe_period = Duration::from_millis(500);
            swim.probe_rtt = Duration::from_millis(200);
        }
        let lifeguard = LifeguardConfig {
            min_suspicion: swim.probe_period,
            max_suspicion: swim.probe_period.mul_f64(3.0),
            min_suspicion_floor: swim.probe_period.mul_f64(1.5),
            confirmations: 3,
            max_health: 8,
            late_timer: swim.probe_rtt,
        };
        // We hold foca's down timer and fire it ourselves (`Lifeguard::hold`);
        // foca only needs a value, the longest for the hinted size.
        let f = f64::from(cluster_size.max(1)).log10().max(1.0);
        swim.suspect_to_down_after = lifeguard.max_suspicion.mul_f64(f);
        // foca's memberlist-derived defaults leave a few (observer, member) pairs
        // to be repaired by round-robin probes, and re-announce to members held
        // down only every 65 s, so a healed partition took minutes to merge in
        // simulation. Twice the transmissions and a faster re-announce to down
        // members bring a 200-node join to ~12 s and a heal to ~20 s
        // (shoal-sim, seeds 1-4), for ~30% more SWIM bytes while membership changes.
        swim.max_transmissions = NonZeroU8::new(swim.max_transmissions.get().saturating_mul(2))
            .unwrap_or(NonZeroU8::MAX);
        swim.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(if profile == Profile::Lan { 10 } else { 30 }),
            num_members: NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
        });
        let (gossip_interval, sync_interval) = match profile {
            Profile::Lan => (Duration::from_millis(200), Duration::from_secs(2)),
            Profile::Wan => (Duration::from_millis(500), Duration::from_secs(10)),
        };
        let (rejoin_max, verify_timeout) = match profile {
            Profile::Lan => (Duration::from_secs(8), Duration::from_secs(2)),
            Profile::Wan => (Duration::from_secs(30), Duration::from_secs(5)),
        };
        Config {
            name: name.into(),
            addr,
            swim,
            gossip_interval,
            fanout: 3,
            retransmit_mult: 2.0,
            sync_interval,
            sync_budget: 1 << 20,
            push_budget: 64 << 10,
            max_drift: Duration::from_secs(60),
            tombstone_ttl: Duration::from_secs(24 * 3600),
            forget_left_after: Duration::from_secs(24 * 3600),
            static_peers: None,
            rejoin_max,
            verify_timeout,
            lifeguard,
        }
    }
}

/// The current time as the driver sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic milliseconds (timers).
    pub mono_ms: u64,
    /// Wall-clock milliseconds since the Unix epoch (timestamps).
    pub wall_ms: u64,
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send a frame. `reliable` frames go on a QUIC stream, others as a datagram.
    Transmit {
        /// Destination address.
        to: SocketAddr,
        /// Stream (true) or datagram (false).
        reliable: bool,
        /// The encoded frame.
        bytes: Vec<u8>,
    },
    /// Something the driver may want to act on.
    Event(Event),
}

/// Things that happened inside the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A member became reachable.
    MemberUp(NodeId),
    /// A member was declared down (or left).
    MemberDown(NodeId),
    /// An entry became the current value of its key (local write, push or sync).
    Changed(Entry),
    /// A process claiming the name of a live member from another address was
    /// refused (see [`crate::identity`]); it has been told why.
    IdentityRefused {
        /// The name.
        name: String,
        /// Where the refused process listens.
        claimant: SocketAddr,
        /// Where the live holder of the name listens.
        holder: SocketAddr,
    },
    /// A process claiming a member's name from another address replaced it, because
    /// the old identity no longer answered (a restart on a new address).
    IdentityReplaced {
        /// The name.
        name: String,
        /// The old identity's address.
        old: SocketAddr,
        /// The new identity's address.
        new: SocketAddr,
    },
    /// A peer refused our SWIM packets, e.g. because a live node holds our name.
    JoinRefused {
        /// The refusing peer's name.
        by: String,
        /// Its one-line reason.
        reason: String,
    },
    /// SWIM had declared us down (e.g. during a partition) and we rejoined under a
    /// renewed identity.
    Rejoined(NodeId),
    /// A down or left member was forgotten (`forget/<name>`, or it left longer than
    /// [`Config::forget_left_after`] ago): it is out of [`Node::members`], and these
    /// node-owned keys of its generations up to `gen` were dropped from the state.
    Forgotten {
        /// The member's name.
        name: String,
        /// The highest generation forgotten.
        gen: u64,
        /// The keys dropped.
        keys: Vec<String>,
    },
    /// A cluster-wide entry this node wrote lost the last-writer-wins merge to
    /// another node's write of the same key with a different value (typically when
    /// a partition heals): what was acknowledged here is undone.
    Overwritten {
        /// Our entry, no longer the value.
        ours: Entry,
        /// The entry that won.
        theirs: Entry,
    },
}

/// Why [`Node::forget_member`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForgetRefusal {
    /// A node does not forget itself.
    #[error("a node cannot forget itself")]
    Myself,
    /// The member still answers, or may.
    #[error("it is {}: only a down or left node can be forgotten (stop it first, or `shoal node drain` it)", .0.as_str())]
    Reachable(Status),
    /// No member or record of that name.
    #[error("no node of that name is known")]
    Unknown,
    /// The mark could not be written.
    #[error("{0}")]
    Write(String),
}

/// Counters the driver exports as metrics.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Frames received, by message kind.
    pub msgs_in: BTreeMap<&'static str, u64>,
    /// Frames sent, by message kind.
    pub msgs_out: BTreeMap<&'static str, u64>,
    /// Bytes received in valid frames.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Frames or entries dropped, by reason.
    pub dropped: BTreeMap<&'static str, u64>,
    /// Anti-entropy rounds started.
    pub sync_rounds: u64,
    /// Tombstones collected.
    pub tombstones_collected: u64,
    /// Announcements sent while the node had no live peer.
    pub rejoin_announces: u64,
    /// Processes refused because a live node holds their name.
    pub identity_refusals: u64,
    /// Round trips of direct SWIM probes (ping to ack).
    pub probe_rtt: crate::Histogram,
    /// SWIM probe cycles that failed, direct and indirect: each makes a member
    /// suspect (a false suspicion when the member was in fact alive).
    pub probe_failures: u64,
    /// Members declared down after staying suspect for twice the suspicion timeout
    /// (a suspicion timer foca dropped; see `sweep_suspects`).
    pub stuck_suspects: u64,
    /// Reports of another node's failed probe that were new to us (Lifeguard
    /// confirmations, forwarded once).
    pub suspicion_reports: u64,
    /// Confirmation checks we sent after another node's report (Lifeguard).
    pub checks_sent: u64,
    /// Of those, checks left unanswered for a probe timeout: each confirmed the
    /// suspicion.
    pub checks_failed: u64,
    /// Suspicions of ourselves we refuted.
    pub refutations: u64,
    /// Members we declared down ourselves (our probe failed and the suspicion
    /// timeout passed).
    pub declared_down: u64,
    /// Local-health score now (0 healthy; see [`crate::lifeguard`]).
    pub local_health: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TimerKind {
    Swim(SwimTimer),
    Gossip,
    Sync,
    Gc,
    /// Look for members stuck in suspicion (see [`Node::sweep_suspects`]).
    SuspectSweep,
    /// See whether a suspicion we hold foca's down timer for has timed out.
    Suspicion(NodeId),
    /// Our confirmation check of a suspect times out unless answered; a failure
    /// is reported to `reporter` (whose report started it) and spread.
    Check {
        member: NodeId,
        nonce: u64,
        reporter: SocketAddr,
    },
    /// Re-announce to the seeds and every member we knew while we have no live
    /// peer (seeds may start after us; a partition may have cut us off).
    Rejoin(Duration),
    /// The verification of a claimed name times out.
    Verify {
        name: String,
        nonce: u64,
    },
}

/// The fields of a [`Msg::Suspect`].
struct Report {
    member: NodeId,
    incarnation: u16,
    by: String,
    checked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    at: u64,
    id: u64,
    kind: TimerKind,
}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.id).cmp(&(other.at, other.id))
    }
}

struct Rumor {
    entry: Entry,
    remaining: u32,
}

/// A sans-IO shoal node.
pub struct Node {
    /// Highest forgotten generation per member name (see [`Node::forget_member`]).
    forgotten: BTreeMap<String, u64>,
    cfg: Config,
    writer: WriterId,
    seq: u64,
    clock: Clock,
    state: State,
    swim: Membership,
    rng: SmallRng,
    rumors: BTreeMap<String, Rumor>,
    fresh: Vec<String>,
    timers: BinaryHeap<Reverse<Pending>>,
    next_timer: u64,
    out: VecDeque<Output>,
    effects: Vec<MemberEffect>,
    stats: Stats,
    left: bool,
    seeds: Vec<SocketAddr>,
    /// The last known address of every member ever seen, kept after SWIM forgets
    /// down members, so a node left alone can announce to all of them.
    known: BTreeMap<String, SocketAddr>,
    rejoin_armed: bool,
    guard: Guard,
    /// The direct probe in flight: (probe number, member, sent at mono ms).
    probe_sent: Option<(u8, SocketAddr, u64)>,
    /// Members seen in suspicion: the mono ms they were first seen so, and how
    /// often the sweep has asked them directly since ([`STUCK_ASKS`]).
    suspects: HashMap<NodeId, (u64, u32)>,
    lifeguard: Lifeguard,
    /// Suspicions of ourselves at incarnations below this were refuted already.
    refuted_below: Option<u16>,
    /// Nodes that told us we are suspected and were answered directly, with when
    /// (mono ms; [`Node::answer_suspector`]).
    answered: HashMap<SocketAddr, u64>,
}

impl Node {
    /// A new node. `gen` must differ on every start of the same node (e.g. random);
    /// `seed` seeds every random choice the node makes.
    pub fn new(cfg: Config, gen: u64, seed: u64, now: Now) -> Self {
        let id = NodeId {
            name: cfg.name.clone(),
            addr: cfg.addr,
            gen,
        };
        let swim = Membership::new(
            id,
            cfg.swim.clone(),
            SmallRng::seed_from_u64(seed ^ 0x5157_494d),
        );
        let mut node = Node {
            writer: WriterId {
                node: cfg.name.clone(),
                gen,
            },
            seq: 0,
            clock: Clock::new(cfg.max_drift.as_millis() as u64),
            state: State::new(),
            swim,
            rng: SmallRng::seed_from_u64(seed),
            rumors: BTreeMap::new(),
            fresh: Vec::new(),
            timers: BinaryHeap::new(),
            next_timer: 0,
            out: VecDeque::new(),
            effects: Vec::new(),
            stats: Stats::default(),
            left: false,
            seeds: Vec::new(),
            known: BTreeMap::new(),
            rejoin_armed: false,
            guard: Guard::default(),
            probe_sent: None,
            suspects: HashMap::new(),
            lifeguard: Lifeguard::new(cfg.lifeguard.clone()),
            refuted_below: None,
            answered: HashMap::new(),
            forgotten: BTreeMap::new(),
            cfg,
        };
        // Random first ticks keep nodes started together from acting in lockstep.
        let g = node
            .rng
            .random_range(0..=node.cfg.gossip_interval.as_millis() as u64);
        node.schedule(now, Duration::from_millis(g), TimerKind::Gossip);
        let s = node
            .rng
            .random_range(0..=node.cfg.sync_interval.as_millis() as u64);
        node.schedule(now, Duration::from_millis(s), TimerKind::Sync);
        node.schedule(now, Duration::from_secs(60), TimerKind::Gc);
        node.schedule(now, Duration::from_secs(1), TimerKind::SuspectSweep);
        node
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// This node's current SWIM identity.
    pub fn id(&self) -> &NodeId {
        self.swim.identity()
    }

    /// The config the node runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Restores persisted cluster-wide entries (at start, before any traffic).
    /// Node-owned entries are skipped: each node rebuilds its own.
    pub fn restore(&mut self, entries: impl IntoIterator<Item = Entry>) -> Result<usize, Reject> {
        let mut n = 0;
        for e in entries {
            if e.is_node_owned() {
                continue;
            }
            // Our clock must move past anything we restore, so new writes win.
            self.clock.observe(e.hlc, u64::MAX >> 16).ok();
            self.state.apply(e)?;
            n += 1;
        }
        let marks: Vec<Entry> = self.state.scan_prefix(FORGET_PREFIX).cloned().collect();
        for e in marks {
            self.on_forget_mark(&e);
        }
        Ok(n)
    }

    /// Writes `forget/<name>`: every node drops `name` from its member list and
    /// its node-owned records, up to the newest generation known here. Only a
    /// member that is down or has left may be forgotten; a later process of the
    /// same name (a new generation) is a member again.
    pub fn forget_member(&mut self, name: &str, now: Now) -> Result<Entry, ForgetRefusal> {
        if name == self.cfg.name {
            return Err(ForgetRefusal::Myself);
        }
        let identities: Vec<(NodeId, Status)> = self
            .members()
            .into_iter()
            .filter(|(id, _)| id.name == name)
            .collect();
        if let Some((_, st)) = identities
            .iter()
            .find(|(_, st)| matches!(st, Status::Alive | Status::Suspect))
        {
            return Err(ForgetRefusal::Reachable(*st));
        }
        let prefix = format!("{NODE_PREFIX}{name}/");
        let gen = identities
            .iter()
            .map(|(id, _)| id.gen)
            .chain(self.state.scan_prefix(&prefix).map(|e| e.writer.gen))
            .max()
            .ok_or(ForgetRefusal::Unknown)?;
        let key = format!("{FORGET_PREFIX}{name}");
        self.put(&key, Some(gen.to_be_bytes().to_vec()), now)
            .map_err(|e| ForgetRefusal::Write(e.to_string()))
    }

    /// Takes a `forget/<name>` entry into account.
    fn on_forget_mark(&mut self, e: &Entry) {
        let Some(name) = e.key.strip_prefix(FORGET_PREFIX) else {
            return;
        };
        let gen = e
            .value
            .as_deref()
            .and_then(|v| <[u8; 8]>::try_from(v).ok())
            .map(u64::from_be_bytes);
        if let Some(gen) = gen {
            let name = name.to_string();
            self.forget(&name, gen);
        }
    }

    /// Forgets generations up to `gen` of `name`: drops their node-owned entries
    /// (keeping the heads, so no sync sends them again) and hides them from
    /// [`Node::members`]. Never ourselves.
    fn forget(&mut self, name: &str, gen: u64) {
        if name == self.cfg.name || self.forgotten.get(name).is_some_and(|g| *g >= gen) {
            return;
        }
        self.forgotten.insert(name.to_string(), gen);
        let prefix = format!("{NODE_PREFIX}{name}/");
        let keys: Vec<String> = self
            .state
            .scan_prefix(&prefix)
            .filter(|e| e.writer.node == name && e.writer.gen <= gen)
            .map(|e| e.key.clone())
            .collect();
        self.state.purge(&keys);
        for k in &keys {
            self.rumors.remove(k);
        }
        self.out.push_back(Output::Event(Event::Forgotten {
            name: name.to_string(),
            gen,
            keys,
        }));
    }

    /// Whether generation `gen` of `name` is forgotten.
    fn is_forgotten_gen(&self, name: &str, gen: u64) -> bool {
        self.forgotten.get(name).is_some_and(|g| gen <= *g)
    }

    /// Whether `e` is a node-owned entry of a forgotten generation.
    fn is_forgotten(&self, e: &Entry) -> bool {
        e.is_node_owned() && self.is_forgotten_gen(&e.writer.node, e.writer.gen)
    }

    /// Forgets the members that left longer than [`Config::forget_left_after`]
    /// ago, by the time in their `left` marker (checked with the tombstone sweep,
    /// once a minute).
    fn forget_long_left(&mut self, now: Now) {
        let after = self.cfg.forget_left_after.as_millis() as u64;
        let gone: Vec<(String, u64)> = self
            .swim
            .members()
            .into_iter()
            .filter(|(id, st)| {
                *st == Status::Down
                    && id.name != self.cfg.name
                    && !self.is_forgotten_gen(&id.name, id.gen)
            })
            .filter_map(|(id, _)| {
                let key = format!("{NODE_PREFIX}{}/{LEFT_SUFFIX}", id.name);
                let at = self
                    .state
                    .value(&key)
                    .and_then(|v| <[u8; 8]>::try_from(v).ok())
                    .map(u64::from_be_bytes)?;
                (now.wall_ms.saturating_sub(at) >= after).then_some((id.name, id.gen))
            })
            .collect();
        for (name, gen) in gone {
            self.forget(&name, gen);
        }
    }

    /// Asks the nodes at `seeds` to let us into their cluster; also clears a
    /// `left` marker from an earlier run. Until some peer answers, the
    /// announcement is repeated with backoff (1 s doubling to
    /// [`Config::rejoin_max`]), so agents may start in any order. The same happens
    /// whenever the node is later left without any live peer.
    pub fn join(&mut self, seeds: &[SocketAddr], now: Now) {
        let left_key = self.node_key(LEFT_SUFFIX);
        // Clearing our own previous "left" marker cannot be refused.
        let _ = self.put(&left_key, None, now);
        if self.cfg.static_peers.is_some() {
            return;
        }
        self.seeds = seeds
            .iter()
            .copied()
            .filter(|s| *s != self.cfg.addr)
            .collect();
        self.announce_everywhere(now);
        self.arm_rejoin(now);
    }

    /// Starts the rejoin loop unless it runs already (or there is nobody to ask).
    fn arm_rejoin(&mut self, now: Now) {
        if self.rejoin_armed || self.left || (self.seeds.is_empty() && self.known.is_empty()) {
            return;
        }
        let first = Duration::from_secs(1);
        self.schedule(now, first, TimerKind::Rejoin(first));
        self.rejoin_armed = true;
    }

    /// Announces to every seed and to every member we knew (a random sample of at
    /// most [`REJOIN_SAMPLE`] of them in large clusters).
    fn announce_everywhere(&mut self, now: Now) {
        let me = self.cfg.addr;
        let mut targets: Vec<SocketAddr> = self.seeds.clone();
        let mut known: Vec<SocketAddr> = self
            .known
            .values()
            .copied()
            .filter(|a| *a != me && !targets.contains(a))
            .collect();
        let n = known.len().min(REJOIN_SAMPLE);
        for i in 0..n {
            let j = self.rng.random_range(i..known.len());
            known.swap(i, j);
        }
        known.truncate(n);
        targets.extend(known);
        for to in targets {
            self.stats.rejoin_announces += 1;
            if let Err(e) = self.swim.announce(NodeId::seed(to)) {
                self.drop_reason("swim_error", &e);
            }
        }
        self.drain_swim(now);
    }

    /// Whether the node currently has at least one live (alive or suspect) peer.
    pub fn joined(&self) -> bool {
        self.swim.num_active() > 0
    }

    /// `node/<our name>/<suffix>`.
    pub fn node_key(&self, suffix: &str) -> String {
        format!("{NODE_PREFIX}{}/{suffix}", self.cfg.name)
    }

    /// Writes (or, with `None`, deletes) a key and starts spreading the change.
    pub fn put(&mut self, key: &str, value: Option<Vec<u8>>, now: Now) -> Result<Entry, Reject> {
        let entry = self.write(key, value, now)?;
        self.push_fresh(None);
        Ok(entry)
    }

    /// Writes several keys (`None` deletes), then spreads them together: one push
    /// per peer instead of one per key. Each write's outcome is returned in order.
    pub fn put_many(
        &mut self,
        writes: impl IntoIterator<Item = (String, Option<Vec<u8>>)>,
        now: Now,
    ) -> Vec<Result<Entry, Reject>> {
        let out: Vec<Result<Entry, Reject>> = writes
            .into_iter()
            .map(|(key, value)| self.write(&key, value, now))
            .collect();
        self.push_fresh(None);
        out
    }

    fn write(&mut self, key: &str, value: Option<Vec<u8>>, now: Now) -> Result<Entry, Reject> {
        let entry = Entry {
            key: key.to_string(),
            value,
            hlc: self.clock.now(now.wall_ms),
            writer: self.writer.clone(),
            seq: self.seq + 1,
        };
        crate::state::validate(&entry)?;
        self.seq += 1;
        self.state.apply(entry.clone())?;
        self.changed(entry.clone(), true);
        Ok(entry)
    }

    /// The replica.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Every known member with its status, ourselves included.
    ///
    /// A member that is down and whose `node/<name>/left` marker is set is
    /// reported as [`Status::Left`].
    pub fn members(&self) -> Vec<(NodeId, Status)> {
        let mut all = self.swim.members();
        all.push((
            self.id().clone(),
            if self.left {
                Status::Left
            } else {
                Status::Alive
            },
        ));
        for (id, st) in &mut all {
            if *st == Status::Down
                && self
                    .state
                    .value(&format!("{NODE_PREFIX}{}/{LEFT_SUFFIX}", id.name))
                    .is_some()
            {
                *st = Status::Left;
            }
        }
        // One row per name: a restarted or moved node is known under several
        // identities for a while; its live one (else its newest) speaks for it.
        let rank = |st: Status| match st {
            Status::Alive => 0,
            Status::Suspect => 1,
            Status::Down | Status::Left => 2,
        };
        all.sort_by(|a, b| {
            a.0.name
                .cmp(&b.0.name)
                .then(rank(a.1).cmp(&rank(b.1)))
                .then(b.0.gen.cmp(&a.0.gen))
        });
        all.dedup_by(|later, first| later.0.name == first.0.name);
        all.retain(|(id, _)| !self.is_forgotten_gen(&id.name, id.gen));
        all
    }

    /// Number of active peers (alive or suspect), excluding ourselves.
    pub fn num_active_peers(&self) -> usize {
        self.swim.num_active()
    }

    /// Handles one frame received from the peer authenticated as `from_name` at `from`.
    pub fn handle_frame(&mut self, from_name: &str, from: SocketAddr, bytes: &[u8], now: Now) {
        let msg = match wire::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                *self.stats.dropped.entry(e.reason()).or_default() += 1;
                return;
            }
        };
        *self.stats.msgs_in.entry(msg.kind()).or_default() += 1;
        self.stats.bytes_in += bytes.len() as u64;
        match msg {
            Msg::Swim(packet) => {
                let src = match packet_sender(&packet) {
                    // The name is what the certificate vouches for; the address
                    // may differ on multi-homed hosts, so only the name must match.
                    Some(src) if src.name == from_name => src,
                    Some(_) => return self.count_drop("impersonation"),
                    None => return self.count_drop("swim_malformed"),
                };
                if !self.admit(&src, from, now) {
                    return;
                }
                if let Err(e) = self.swim.handle_data(&packet) {
                    self.drop_reason("swim_error", &e);
                }
                self.drain_swim(now);
            }
            Msg::Suspect {
                member,
                incarnation,
                by,
                checked,
            } => self.on_suspect(
                (from_name, from),
                Report {
                    member,
                    incarnation,
                    by,
                    checked,
                },
                now,
            ),
            Msg::Probe { nonce } => {
                let gen = self.id().gen;
                self.transmit(from, true, &Msg::ProbeAck { nonce, gen });
            }
            Msg::ProbeAck { nonce, .. } => {
                if self.lifeguard.check_answered(nonce) {
                    return;
                }
                if let Some((claimant, holder, reason)) =
                    self.guard.on_ack(from_name, from, nonce, now.mono_ms)
                {
                    self.stats.identity_refusals += 1;
                    self.transmit(claimant.addr, true, &Msg::Refused { reason });
                    self.out.push_back(Output::Event(Event::IdentityRefused {
                        name: claimant.name,
                        claimant: claimant.addr,
                        holder: holder.addr,
                    }));
                }
            }
            Msg::Refused { reason } => {
                self.out.push_back(Output::Event(Event::JoinRefused {
                    by: from_name.to_string(),
                    reason,
                }));
            }
            // Blob transfers are the driver's business: it routes them by
            // [`wire::is_blob`] before frames reach the core.
            Msg::Blob(_) => self.count_drop("blob_to_core"),
            Msg::Logs(_) => self.count_drop("logs_to_core"),
            Msg::Push { entries } => {
                for e in entries {
                    self.receive_entry(e, now, true);
                }
                self.push_fresh(Some(from));
            }
            Msg::SyncReq {
                digest,
                heads: None,
            } => {
                // Same heads on both sides: nothing to exchange (the common, idle case).
                if digest != self.state.digest() {
                    let full = Msg::SyncReq {
                        digest: self.state.digest(),
                        heads: Some(self.state.heads()),
                    };
                    self.transmit(from, true, &full);
                }
            }
            Msg::SyncReq {
                heads: Some(heads), ..
            } => {
                let delta = self.state.delta_for(&heads, self.cfg.sync_budget);
                let reply = Msg::SyncResp {
                    heads: self.state.heads(),
                    delta,
                    reply: true,
                };
                self.transmit(from, true, &reply);
            }
            Msg::SyncResp {
                heads,
                delta,
                reply,
            } => {
                let mut ok = Vec::with_capacity(delta.entries.len());
                // An entry refused for its clock may be accepted later: its writer's
                // range must not be marked as received, or no sync would resend it.
                let mut too_early: Vec<crate::state::WriterId> = Vec::new();
                for e in delta.entries {
                    if self.written_by_refused(&e) {
                        continue;
                    }
                    if self.clock_accepts(&e, now) {
                        ok.push(e);
                    } else if !too_early.contains(&e.writer) {
                        too_early.push(e.writer.clone());
                    }
                }
                let ranges = delta
                    .ranges
                    .into_iter()
                    .filter(|(w, _, _)| !too_early.contains(w))
                    .collect();
                let lost: Vec<(Entry, Entry)> = ok
                    .iter()
                    .filter_map(|e| self.overwrites(e).map(|ours| (ours, e.clone())))
                    .collect();
                let (changed, rejected) = self.state.apply_delta(crate::state::Delta {
                    ranges,
                    entries: ok,
                });
                for (ours, theirs) in lost {
                    if self.state.get(&theirs.key) == Some(&theirs) {
                        self.out
                            .push_back(Output::Event(Event::Overwritten { ours, theirs }));
                    }
                }
                for r in rejected {
                    self.reject(&r);
                }
                for e in changed {
                    self.changed(e, false);
                }
                if reply {
                    let delta = self.state.delta_for(&heads, self.cfg.sync_budget);
                    let back = Msg::SyncResp {
                        heads: Vec::new(),
                        delta,
                        reply: false,
                    };
                    self.transmit(from, true, &back);
                }
            }
        }
    }

    /// Runs the identity guard on a SWIM packet from `src` (see [`crate::identity`]);
    /// false if the packet must be dropped.
    fn admit(&mut self, src: &NodeId, from: SocketAddr, now: Now) -> bool {
        let holder = self
            .swim
            .active_peers()
            .find(|id| id.name == src.name && *id != src)
            .cloned();
        let me = self.id().clone();
        let seed = self.rng.random::<u64>();
        match self
            .guard
            .judge(src, holder.as_ref(), &me, now.mono_ms, seed)
        {
            Verdict::Admit => true,
            Verdict::Wait => {
                self.count_drop("identity_check");
                false
            }
            Verdict::Verify { holder, nonce } => {
                self.count_drop("identity_check");
                self.transmit(holder, true, &Msg::Probe { nonce });
                let name = src.name.clone();
                self.schedule(
                    now,
                    self.cfg.verify_timeout,
                    TimerKind::Verify { name, nonce },
                );
                false
            }
            Verdict::Refuse { tell } => {
                self.count_drop("identity_refused");
                if let Some(reason) = tell {
                    if src.name == me.name {
                        // Someone claims our own name: nobody else will tell it.
                        self.stats.identity_refusals += 1;
                        self.out.push_back(Output::Event(Event::IdentityRefused {
                            name: src.name.clone(),
                            claimant: from,
                            holder: me.addr,
                        }));
                    }
                    self.transmit(from, true, &Msg::Refused { reason });
                }
                false
            }
        }
    }

    /// Whether a received entry must be dropped because its writer is a process that
    /// was refused for claiming a live node's name.
    fn written_by_refused(&mut self, e: &Entry) -> bool {
        if e.is_node_owned() && self.guard.is_refused_writer(&e.writer) {
            self.count_drop("refused_identity");
            return true;
        }
        if self.is_forgotten(e) {
            self.count_drop("forgotten_node");
            return true;
        }
        false
    }

    fn clock_accepts(&mut self, e: &Entry, now: Now) -> bool {
        if self.clock.observe(e.hlc, now.wall_ms).is_err() {
            self.count_drop("clock_drift");
            return false;
        }
        true
    }

    fn receive_entry(&mut self, e: Entry, now: Now, rumor: bool) {
        if self.written_by_refused(&e) || !self.clock_accepts(&e, now) {
            return;
        }
        let lost = self.overwrites(&e);
        match self.state.apply(e.clone()) {
            Ok(true) => {
                if let Some(ours) = lost {
                    self.out.push_back(Output::Event(Event::Overwritten {
                        ours,
                        theirs: e.clone(),
                    }));
                }
                self.changed(e, rumor)
            }
            Ok(false) => {}
            Err(r) => self.reject(&r),
        }
    }

    /// Our current entry of `e`'s key, if `e` (another node's write of a
    /// cluster-wide key, with a different value) is about to replace it.
    fn overwrites(&self, e: &Entry) -> Option<Entry> {
        if e.is_node_owned() || e.writer.node == self.cfg.name {
            return None;
        }
        let cur = self.state.get(&e.key)?;
        (cur.writer.node == self.cfg.name && e.wins_over(cur) && cur.value != e.value)
            .then(|| cur.clone())
    }

    fn reject(&mut self, r: &Reject) {
        let reason = match r {
            Reject::NotOwner { .. } => "not_owner",
            _ => "invalid_entry",
        };
        self.count_drop(reason);
    }

    fn changed(&mut self, e: Entry, rumor: bool) {
        if e.key.starts_with(FORGET_PREFIX) {
            self.on_forget_mark(&e);
        }
        if rumor {
            let remaining = self.retransmits();
            self.fresh.push(e.key.clone());
            self.rumors.insert(
                e.key.clone(),
                Rumor {
                    entry: e.clone(),
                    remaining,
                },
            );
        }
        self.out.push_back(Output::Event(Event::Changed(e)));
    }

    fn retransmits(&self) -> u32 {
        let n = match &self.cfg.static_peers {
            Some(p) => p.len() as f64,
            None => (self.swim.num_active() + 1) as f64,
        };
        ((self.cfg.retransmit_mult * (n + 1.0).log10()).ceil() as u32).max(1)
    }

    /// Pushes the changes that arrived with the last input to `fanout` peers at once.
    fn push_fresh(&mut self, except: Option<SocketAddr>) {
        if self.fresh.is_empty() {
            return;
        }
        if self.random_peers_available() == 0 {
            // Nobody to tell yet: keep the rumors whole for the gossip tick.
            self.fresh.clear();
            return;
        }
        let mut keys = std::mem::take(&mut self.fresh);
        keys.sort();
        keys.dedup();
        let mut entries = Vec::with_capacity(keys.len());
        for k in &keys {
            if let Some(r) = self.rumors.get_mut(k) {
                r.remaining = r.remaining.saturating_sub(1);
                entries.push(r.entry.clone());
            }
        }
        self.rumors.retain(|_, r| r.remaining > 0);
        self.push_to_random(entries, except);
    }

    fn push_to_random(&mut self, entries: Vec<Entry>, except: Option<SocketAddr>) {
        if entries.is_empty() {
            return;
        }
        let peers = self.random_peers(self.cfg.fanout, except);
        for chunk in chunk_entries(entries, self.cfg.push_budget) {
            let msg = Msg::Push { entries: chunk };
            let bytes = wire::encode(&msg);
            for &p in &peers {
                self.send_bytes(p, true, msg.kind(), bytes.clone());
            }
        }
    }

    fn random_peers(&mut self, n: usize, except: Option<SocketAddr>) -> Vec<SocketAddr> {
        if let Some(all) = self.cfg.static_peers.clone() {
            return self.sample_static(&all, n, except);
        }
        let mut peers: Vec<SocketAddr> = self
            .swim
            .active_peers()
            .map(|id| id.addr)
            .filter(|a| Some(*a) != except)
            .collect();
        // Partial Fisher-Yates: the first n are a uniform sample.
        let n = n.min(peers.len());
        for i in 0..n {
            let j = self.rng.random_range(i..peers.len());
            peers.swap(i, j);
        }
        peers.truncate(n);
        peers
    }

    fn random_peers_available(&self) -> usize {
        match &self.cfg.static_peers {
            Some(p) => p.len().saturating_sub(1),
            None => self.swim.num_active(),
        }
    }

    /// Rejection sampling: O(n) for a small fanout even with 10,000s of peers.
    fn sample_static(
        &mut self,
        all: &[SocketAddr],
        n: usize,
        except: Option<SocketAddr>,
    ) -> Vec<SocketAddr> {
        let me = self.cfg.addr;
        let eligible = if all.len() <= 64 {
            all.iter()
                .filter(|a| **a != me && Some(**a) != except)
                .count()
        } else {
            // At most ourselves and `except` are excluded; avoid an O(N) scan.
            all.len() - 2
        };
        let n = n.min(eligible);
        let mut picked = Vec::with_capacity(n);
        while picked.len() < n {
            let a = all[self.rng.random_range(0..all.len())];
            if a != me && Some(a) != except && !picked.contains(&a) {
                picked.push(a);
            }
        }
        picked
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Now) {
        let mut late = 0;
        while let Some(Reverse(p)) = self.timers.peek() {
            if p.at > now.mono_ms {
                break;
            }
            let Some(Reverse(p)) = self.timers.pop() else {
                break;
            };
            late = late.max(now.mono_ms - p.at);
            self.fire(p.kind, now);
        }
        // Timers far behind mean this process was starved or stopped: its view of
        // who answers in time is not to be trusted for a while.
        self.lifeguard.timer_fired_late(late);
        self.stats.local_health = self.lifeguard.health();
    }

    fn fire(&mut self, kind: TimerKind, now: Now) {
        match kind {
            TimerKind::Swim(t) => {
                if let Err(e) = self.swim.handle_timer(t) {
                    self.drop_reason("swim_error", &e);
                }
                self.drain_swim(now);
            }
            TimerKind::Gossip if self.random_peers_available() == 0 => {
                if !self.left {
                    self.schedule(now, self.cfg.gossip_interval, TimerKind::Gossip);
                }
            }
            TimerKind::Gossip => {
                let entries: Vec<Entry> = self
                    .rumors
                    .values_mut()
                    .map(|r| {
                        r.remaining = r.remaining.saturating_sub(1);
                        r.entry.clone()
                    })
                    .collect();
                self.rumors.retain(|_, r| r.remaining > 0);
                self.push_to_random(entries, None);
                if !self.left {
                    self.schedule(now, self.cfg.gossip_interval, TimerKind::Gossip);
                }
            }
            TimerKind::Sync => {
                if let Some(&peer) = self.random_peers(1, None).first() {
                    self.stats.sync_rounds += 1;
                    let msg = Msg::SyncReq {
                        digest: self.state.digest(),
                        heads: None,
                    };
                    self.transmit(peer, true, &msg);
                }
                if !self.left {
                    self.schedule(now, self.cfg.sync_interval, TimerKind::Sync);
                }
            }
            TimerKind::Rejoin(after) => {
                self.rejoin_armed = false;
                if self.swim.num_active() == 0 && !self.left {
                    self.announce_everywhere(now);
                    let next = (after * 2).min(self.cfg.rejoin_max.max(Duration::from_secs(1)));
                    self.schedule(now, next, TimerKind::Rejoin(next));
                    self.rejoin_armed = true;
                }
            }
            TimerKind::Verify { name, nonce } => {
                if let Some((old, new)) = self.guard.on_timeout(&name, nonce, now.mono_ms) {
                    if let Err(e) = self.swim.declare_down(old.clone()) {
                        self.drop_reason("swim_error", &e);
                    }
                    self.drain_swim(now);
                    self.out.push_back(Output::Event(Event::IdentityReplaced {
                        name,
                        old: old.addr,
                        new: new.addr,
                    }));
                }
            }
            TimerKind::Suspicion(member) => match self.lifeguard.due(&member, now.mono_ms) {
                Due::Fire(t) => {
                    // Refuted meanwhile (foca holds a newer incarnation): nothing to do.
                    let still = match &t {
                        SwimTimer::ChangeSuspectToDown {
                            member_id,
                            incarnation,
                            ..
                        } => self.swim.is_suspect_at(member_id, *incarnation),
                        _ => false,
                    };
                    if still {
                        self.stats.declared_down += 1;
                        if let Err(e) = self.swim.handle_timer(t).and_then(|()| self.swim.gossip())
                        {
                            self.drop_reason("swim_error", &e);
                        }
                        self.drain_swim(now);
                    }
                }
                Due::Later(at) => {
                    let after = Duration::from_millis(at.saturating_sub(now.mono_ms));
                    self.schedule(now, after, TimerKind::Suspicion(member));
                }
                Due::Nothing => {}
            },
            TimerKind::Check {
                member,
                nonce,
                reporter,
            } => {
                let Some(incarnation) = self.lifeguard.check_failed(&member, nonce) else {
                    return;
                };
                // Refuted or gone meanwhile: nothing to confirm.
                if !self.swim.is_active_at(&member, incarnation) {
                    return;
                }
                self.stats.checks_failed += 1;
                let msg = Msg::Suspect {
                    member: member.clone(),
                    incarnation,
                    by: self.cfg.name.clone(),
                    checked: true,
                };
                self.transmit(reporter, false, &msg);
                self.spread(&msg, &[member.addr, reporter]);
            }
            TimerKind::SuspectSweep => {
                self.sweep_suspects(now);
                if !self.left {
                    self.schedule(now, Duration::from_secs(1), TimerKind::SuspectSweep);
                }
            }
            TimerKind::Gc => {
                let ttl = self.cfg.tombstone_ttl.as_millis() as u64;
                let cutoff = Hlc::new(now.wall_ms.saturating_sub(ttl), 0);
                self.stats.tombstones_collected += self.state.gc_tombstones(cutoff) as u64;
                self.forget_long_left(now);
                if !self.left {
                    self.schedule(now, Duration::from_secs(60), TimerKind::Gc);
                }
            }
        }
    }

    /// Declares down every member suspect for twice the suspicion timeout that
    /// did not answer when asked directly.
    ///
    /// foca ignores every timer it set before it last lost all its peers (a
    /// partition into singletons) or learnt it was declared down, suspicion
    /// timeouts included; a member suspected before that stays suspect on this node
    /// forever unless it happens to refute, while every other node sees it alive
    /// (found by the chaos suite). This re-arms what foca dropped: the member is
    /// declared down, as the lost timer would have done; if it is in fact alive, it
    /// hears so and rejoins under a renewed identity at once.
    ///
    /// A member can also stay suspect here only because its refutation, spread by
    /// gossip, never reached this node under loss (found by the simulator at 10%
    /// loss: one stale suspicion, swept, took a live node down everywhere). So a
    /// stuck member is first asked, [`STUCK_ASKS`] sweeps in a row: it is told it
    /// is suspected (reliably; it refutes if it had not) and sent a SWIM announce,
    /// whose answer carries its current incarnation and so ends the suspicion
    /// here. Only a member that stays suspect through all of that is declared down.
    fn sweep_suspects(&mut self, now: Now) {
        let limit = 2 * self.lifeguard.timeout(0).as_millis() as u64;
        let suspect = self.swim.suspects();
        self.lifeguard.retain(&suspect, now.mono_ms);
        if suspect.is_empty() && self.suspects.is_empty() {
            return;
        }
        self.suspects.retain(|id, _| suspect.contains(id));
        if self.swim.num_active() == 0 {
            return;
        }
        let mut stuck = Vec::new();
        let mut ask = Vec::new();
        for id in suspect {
            let (since, asked) = self.suspects.entry(id.clone()).or_insert((now.mono_ms, 0));
            if now.mono_ms.saturating_sub(*since) > limit {
                if *asked < STUCK_ASKS {
                    *asked += 1;
                    ask.push(id);
                } else {
                    stuck.push(id);
                }
            }
        }
        for id in ask {
            if let Some(incarnation) = self.swim.incarnation_of(&id) {
                self.tell_suspect(&id, incarnation, true);
            }
            if let Err(e) = self.swim.announce(id) {
                self.drop_reason("swim_error", &e);
            }
        }
        for id in stuck {
            self.suspects.remove(&id);
            self.stats.stuck_suspects += 1;
            if let Err(e) = self.swim.declare_down(id) {
                self.drop_reason("swim_error", &e);
            }
        }
        self.drain_swim(now);
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called (monotonic ms).
    pub fn poll_timeout(&self) -> Option<u64> {
        self.timers.peek().map(|Reverse(p)| p.at)
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Leaves the cluster gracefully: marks `node/<name>/left`, hands every
    /// pending change to all active peers, and tells SWIM we are going.
    pub fn leave(&mut self, now: Now) {
        if self.left {
            return;
        }
        let key = self.node_key(LEFT_SUFFIX);
        let stamp = now.wall_ms.to_be_bytes().to_vec();
        let _ = self.put(&key, Some(stamp), now);
        let entries: Vec<Entry> = self.rumors.values().map(|r| r.entry.clone()).collect();
        let everyone: Vec<SocketAddr> = self.swim.active_peers().map(|id| id.addr).collect();
        for chunk in chunk_entries(entries, self.cfg.push_budget) {
            let msg = Msg::Push { entries: chunk };
            for &p in &everyone {
                self.transmit(p, true, &msg);
            }
        }
        self.rumors.clear();
        if let Err(e) = self.swim.leave() {
            self.drop_reason("swim_error", &e);
        }
        self.left = true;
        self.drain_swim(now);
        self.timers.clear();
    }

    fn drain_swim(&mut self, now: Now) {
        let mut idle = false;
        let mut renewed = false;
        let mut effects = std::mem::take(&mut self.effects);
        self.swim.drain(&mut effects);
        for eff in effects.drain(..) {
            match eff {
                MemberEffect::Send(to, data) => {
                    self.transmit(to.addr, false, &Msg::Swim(data));
                }
                MemberEffect::Timer(t, after) => {
                    if self.left {
                        continue;
                    }
                    match t {
                        SwimTimer::ChangeSuspectToDown { ref member_id, .. } => {
                            let member = member_id.clone();
                            if let Some(at) = self.lifeguard.hold(t, now.mono_ms) {
                                let after = Duration::from_millis(at.saturating_sub(now.mono_ms));
                                self.schedule(now, after, TimerKind::Suspicion(member));
                            }
                        }
                        SwimTimer::ProbeRandomMember(_) | SwimTimer::SendIndirectProbe { .. } => {
                            let after = self.lifeguard.stretch(after);
                            self.schedule(now, after, TimerKind::Swim(t));
                        }
                        _ => self.schedule(now, after, TimerKind::Swim(t)),
                    }
                }
                MemberEffect::Notify(n) => match n {
                    OwnedNotification::MemberUp(id) | OwnedNotification::Rename(_, id) => {
                        self.lifeguard.clear(&id);
                        self.lifeguard.set_members(self.swim.num_active() + 1);
                        self.known.insert(id.name.clone(), id.addr);
                        self.out.push_back(Output::Event(Event::MemberUp(id)));
                    }
                    OwnedNotification::MemberDown(id) => {
                        self.lifeguard.clear(&id);
                        self.lifeguard.set_members(self.swim.num_active() + 1);
                        self.out.push_back(Output::Event(Event::MemberDown(id)));
                    }
                    // No live peer left: SWIM stops probing, so keep announcing
                    // ourselves until someone answers.
                    OwnedNotification::Idle => idle = true,
                    OwnedNotification::Rejoin(id) => {
                        renewed = true;
                        // A renewed identity starts again at incarnation 0.
                        self.refuted_below = None;
                        self.out.push_back(Output::Event(Event::Rejoined(id)));
                    }
                    OwnedNotification::DataSent(h) => {
                        if let foca::Message::Ping(n) = h.message {
                            self.probe_sent = Some((n, h.dst.addr, now.mono_ms));
                            // Buddy: a member we hold suspect hears so with the probe.
                            if let Some(incarnation) = self.lifeguard.suspected_at(&h.dst) {
                                self.tell_suspect(&h.dst, incarnation, false);
                            }
                        }
                    }
                    OwnedNotification::DataReceived(h) => {
                        if let (foca::Message::Ack(n), Some((sent_n, to, at))) =
                            (&h.message, self.probe_sent)
                        {
                            if *n == sent_n && h.src.addr == to {
                                let rtt = now.mono_ms.saturating_sub(at) as f64 / 1000.0;
                                self.stats.probe_rtt.observe(rtt);
                                self.probe_sent = None;
                                self.lifeguard.probe_answered();
                            }
                        }
                    }
                    OwnedNotification::ProbeFailed(_, member) => {
                        self.stats.probe_failures += 1;
                        self.report_failed_probe(&member);
                    }
                    _ => {}
                },
            }
        }
        self.effects = effects;
        if idle {
            self.arm_rejoin(now);
        }
        if renewed {
            // Someone just told us the cluster holds us down (so the link to it
            // works): announce the renewed identity now instead of at the next
            // rejoin or down-member round, which heals a split in round trips.
            self.announce_everywhere(now);
        }
    }

    /// Our probe of `member` failed: tell it (so it can refute) and spread the
    /// report, which other suspectors count as a confirmation.
    fn report_failed_probe(&mut self, member: &NodeId) {
        let Some(incarnation) = self.swim.incarnation_of(member) else {
            return;
        };
        self.tell_suspect(member, incarnation, false);
        let msg = Msg::Suspect {
            member: member.clone(),
            incarnation,
            by: self.cfg.name.clone(),
            checked: false,
        };
        self.spread(&msg, &[member.addr]);
    }

    /// Buddy refutation: tells `member` directly that it is suspected (as a
    /// datagram, or `reliable`ly).
    fn tell_suspect(&mut self, member: &NodeId, incarnation: u16, reliable: bool) {
        let msg = Msg::Suspect {
            member: member.clone(),
            incarnation,
            by: self.cfg.name.clone(),
            checked: false,
        };
        self.transmit(member.addr, reliable, &msg);
    }

    /// Sends `msg` as a datagram to `fanout` random active peers not in `except`.
    fn spread(&mut self, msg: &Msg, except: &[SocketAddr]) {
        let mut peers = self.random_peers(self.cfg.fanout + except.len(), except.first().copied());
        peers.retain(|a| !except.contains(a));
        peers.truncate(self.cfg.fanout);
        for p in peers {
            self.transmit(p, false, msg);
        }
    }

    /// A node reports that its probe of `member` failed (or tells us we are suspected).
    fn on_suspect(&mut self, (from_name, from): (&str, SocketAddr), r: Report, now: Now) {
        let Report {
            member,
            incarnation,
            by,
            checked,
        } = r;
        if member.name == self.cfg.name {
            // Every suspector tells us on each probe until it hears our refutation:
            // count (and refute) each incarnation once.
            let fresh = self.refuted_below.is_none_or(|below| incarnation >= below);
            if &member == self.swim.identity() && fresh {
                self.refuted_below = Some(incarnation.saturating_add(1));
                self.stats.refutations += 1;
                self.lifeguard.refuted();
                // Spread the refutation now: the suspicion may time out within
                // a few hundred ms.
                if let Err(e) = self
                    .swim
                    .refute(incarnation)
                    .and_then(|()| self.swim.gossip())
                {
                    self.drop_reason("swim_error", &e);
                }
            }
            if &member == self.swim.identity() {
                self.answer_suspector(from, now);
            }
            self.drain_swim(now);
            return;
        }
        if by == self.cfg.name {
            return;
        }
        let (new, check) = self
            .lifeguard
            .report(&member, incarnation, &by, now.mono_ms);
        if !new {
            return;
        }
        self.stats.suspicion_reports += 1;
        if let Some(at) = check {
            let after = Duration::from_millis(at.saturating_sub(now.mono_ms));
            self.schedule(now, after, TimerKind::Suspicion(member.clone()));
        }
        // A first-hand report (from the node whose own probe failed) of a member
        // we hold alive at that incarnation: check it ourselves now rather than
        // wait for our round-robin probe to reach it.
        let first_hand = !checked && by == from_name;
        if first_hand && self.swim.is_active_at(&member, incarnation) {
            self.start_check(&member, incarnation, from, now);
        }
        let msg = Msg::Suspect {
            member: member.clone(),
            incarnation,
            by,
            checked,
        };
        self.spread(&msg, &[from, member.addr]);
    }

    /// Answers the node that told us we are suspected with a SWIM announce,
    /// whose header carries our current incarnation: the suspicion ends there
    /// even if every gossip of our refutation to it is lost (the simulator found
    /// a lone suspector under 10% loss that never heard one within its timeout).
    /// At most once per probe period per teller, and only to members.
    fn answer_suspector(&mut self, teller: SocketAddr, now: Now) {
        let period = self.cfg.swim.probe_period.as_millis() as u64;
        self.answered
            .retain(|_, at| now.mono_ms.saturating_sub(*at) < period);
        if self.answered.contains_key(&teller) {
            return;
        }
        let Some(id) = self.swim.active_peers().find(|p| p.addr == teller).cloned() else {
            return;
        };
        self.answered.insert(teller, now.mono_ms);
        if let Err(e) = self.swim.announce(id) {
            self.drop_reason("swim_error", &e);
        }
    }

    /// A confirmation check: one reliable probe of `member`, plus the buddy
    /// notice (so a live member refutes even if the reporter's was lost).
    fn start_check(&mut self, member: &NodeId, incarnation: u16, reporter: SocketAddr, now: Now) {
        let nonce = self.rng.random::<u64>();
        if !self
            .lifeguard
            .start_check(member, incarnation, nonce, now.mono_ms)
        {
            return;
        }
        self.stats.checks_sent += 1;
        self.transmit(member.addr, true, &Msg::Probe { nonce });
        self.tell_suspect(member, incarnation, false);
        let timeout = self.lifeguard.stretch(self.cfg.swim.probe_rtt);
        self.schedule(
            now,
            timeout,
            TimerKind::Check {
                member: member.clone(),
                nonce,
                reporter,
            },
        );
    }

    fn schedule(&mut self, now: Now, after: Duration, kind: TimerKind) {
        self.next_timer += 1;
        self.timers.push(Reverse(Pending {
            at: now.mono_ms + after.as_millis() as u64,
            id: self.next_timer,
            kind,
        }));
    }

    fn transmit(&mut self, to: SocketAddr, reliable: bool, msg: &Msg) {
        let bytes = wire::encode(msg);
        self.send_bytes(to, reliable, msg.kind(), bytes);
    }

    fn send_bytes(&mut self, to: SocketAddr, reliable: bool, kind: &'static str, bytes: Vec<u8>) {
        *self.stats.msgs_out.entry(kind).or_default() += 1;
        self.stats.bytes_out += bytes.len() as u64;
        self.out.push_back(Output::Transmit {
            to,
            reliable,
            bytes,
        });
    }

    fn count_drop(&mut self, reason: &'static str) {
        *self.stats.dropped.entry(reason).or_default() += 1;
    }

    fn drop_reason(&mut self, reason: &'static str, _err: &foca::Error) {
        self.count_drop(reason);
    }
}

fn chunk_entries(entries: Vec<Entry>, budget: usize) -> Vec<Vec<Entry>> {
    let mut chunks = Vec::new();
    let mut cur = Vec::new();
    let mut used = 0;
    for e in entries {
        let sz = e.approx_size();
        if !cur.is_empty() && used + sz > budget {
            chunks.push(std::mem::take(&mut cur));
            used = 0;
        }
        used += sz;
        cur.push(e);
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    chunks
}
