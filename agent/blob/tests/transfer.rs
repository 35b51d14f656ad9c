//! Multi-peer fetch, end to end through the wire format, in virtual time.
//!
//! `Net` wires one `Fetch` to fake peers, each serving from a real
//! `BlobStore` in a temp dir through a `Server`. Every message is encoded and
//! decoded, each hop takes a seeded random 1–5 ms, and time only moves to the
//! next delivery or the fetch's next timeout, so every run is deterministic.
//! A failing test prints its seed; `BLOB_TEST_SEED=<n>` replays it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use shoal_blob::{
    BlobId, BlobMsg, BlobStore, Fetch, FetchConfig, FetchError, Manifest, PeerHealth, RateLimiter,
    Server, Status, What,
};
use tempfile::TempDir;

const CHUNK: u32 = 1024;
const TIMEOUT_MS: u64 = 1_000;

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[2] ^ seed)
        .collect()
}

fn seed(default: u64) -> u64 {
    std::env::var("BLOB_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn cfg() -> FetchConfig {
    FetchConfig {
        per_peer: 3,
        parallel: 8,
        timeout_ms: TIMEOUT_MS,
        ..FetchConfig::default()
    }
}

#[derive(Clone)]
enum Behavior {
    Honest,
    /// Flips a byte of every chunk it sends.
    Corrupt,
    /// Answers this many requests, then never again (crashed, partitioned).
    SilentAfter(usize),
    /// Answers manifest requests with this (wrong) manifest.
    WrongManifest(Manifest),
}

struct FakePeer {
    server: Server,
    behavior: Behavior,
    answered: usize,
}

enum Hop {
    ToPeer(String, Vec<u8>),
    ToFetch(String, Vec<u8>),
}

struct Net {
    seed: u64,
    rng: SmallRng,
    now: u64,
    seq: u64,
    fetch: Fetch<String>,
    store: BlobStore,
    peers: BTreeMap<String, FakePeer>,
    wire: BinaryHeap<Reverse<(u64, u64, usize)>>,
    hops: Vec<Option<Hop>>,
    /// Every request the fetch made, in order.
    sent: Vec<(String, What)>,
    outstanding: BTreeSet<(String, What)>,
    max_outstanding: usize,
    _dirs: Vec<TempDir>,
}

/// A peer's store holding `data`, with the test chunk size.
fn peer_store(data: &[u8]) -> (BlobStore, BlobId, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open_with_chunk_size(dir.path(), CHUNK).unwrap();
    let id = store.put_bytes(data).unwrap();
    (store, id, dir)
}

impl Net {
    /// A fetch of `data` into a fresh store (or `into`) from the given peers.
    fn new(
        seed: u64,
        data: &[u8],
        peers: &[(&str, Behavior, RateLimiter)],
        into: Option<BlobStore>,
    ) -> Net {
        eprintln!("seed = {seed} (replay with BLOB_TEST_SEED={seed})");
        let mut dirs = Vec::new();
        let mut fake = BTreeMap::new();
        let mut id = None;
        for (name, behavior, limiter) in peers {
            let (store, pid, dir) = peer_store(data);
            id = Some(pid);
            dirs.push(dir);
            fake.insert(
                name.to_string(),
                FakePeer {
                    server: Server::new(store, limiter.clone()),
                    behavior: behavior.clone(),
                    answered: 0,
                },
            );
        }
        let id = id.unwrap_or_else(|| Manifest::for_bytes(data, CHUNK).unwrap().id());
        let store = into.unwrap_or_else(|| {
            let dir = tempfile::tempdir().unwrap();
            let s = BlobStore::open(dir.path()).unwrap();
            dirs.push(dir);
            s
        });
        let fetch = Fetch::new(id, fake.keys().cloned(), cfg(), &store, seed).unwrap();
        Net {
            seed,
            rng: SmallRng::seed_from_u64(seed ^ 0x5eed),
            now: 0,
            seq: 0,
            fetch,
            store,
            peers: fake,
            wire: BinaryHeap::new(),
            hops: Vec::new(),
            sent: Vec::new(),
            outstanding: BTreeSet::new(),
            max_outstanding: 0,
            _dirs: dirs,
        }
    }

    fn send(&mut self, hop: Hop) {
        let at = self.now + self.rng.random_range(1..=5u64);
        self.hops.push(Some(hop));
        self.seq += 1;
        self.wire.push(Reverse((at, self.seq, self.hops.len() - 1)));
    }

    fn drain_requests(&mut self) {
        while let Some(req) = self.fetch.poll_request(self.now) {
            assert_eq!(req.id, self.fetch.id());
            self.sent.push((req.peer.clone(), req.what));
            self.outstanding.insert((req.peer.clone(), req.what));
            self.max_outstanding = self.max_outstanding.max(self.outstanding.len());
            let bytes = req.to_msg().encode().unwrap();
            self.send(Hop::ToPeer(req.peer, bytes));
        }
    }

    fn deliver(&mut self, hop: Hop) {
        match hop {
            Hop::ToPeer(name, bytes) => {
                let req = BlobMsg::decode(&bytes).unwrap();
                let now = self.now;
                let Some(peer) = self.peers.get_mut(&name) else {
                    return;
                };
                if let Behavior::SilentAfter(n) = peer.behavior {
                    if peer.answered >= n {
                        return;
                    }
                }
                peer.answered += 1;
                let mut reply = peer.server.handle(&req, now).unwrap();
                match (&peer.behavior, &mut reply) {
                    (Behavior::Corrupt, BlobMsg::Chunk { bytes, .. }) => bytes[0] ^= 0x55,
                    (Behavior::WrongManifest(m), BlobMsg::Manifest { manifest, .. }) => {
                        *manifest = m.clone()
                    }
                    _ => {}
                }
                let bytes = reply.encode().unwrap();
                self.send(Hop::ToFetch(name, bytes));
            }
            Hop::ToFetch(name, bytes) => {
                let msg = BlobMsg::decode(&bytes).unwrap();
                let what = match &msg {
                    BlobMsg::Manifest { .. } => What::Manifest,
                    BlobMsg::Chunk { idx, .. } | BlobMsg::Busy { idx, .. } => What::Chunk(*idx),
                    _ => What::Manifest,
                };
                self.outstanding.remove(&(name.clone(), what));
                self.fetch.handle_msg(&name, msg, self.now);
            }
        }
    }

    /// One step: deliver the next message or fire the next timeout.
    /// Returns false when nothing can happen any more.
    fn step(&mut self) -> bool {
        self.drain_requests();
        if self.fetch.is_over() {
            return false;
        }
        let next_msg = self.wire.peek().map(|Reverse((at, _, _))| *at);
        let next_timer = self.fetch.poll_timeout();
        match (next_msg, next_timer) {
            (None, None) => return false,
            (Some(m), t) if t.is_none_or(|t| m <= t) => {
                let Reverse((at, _, i)) = self.wire.pop().unwrap();
                self.now = self.now.max(at);
                let hop = self.hops[i].take().unwrap();
                self.deliver(hop);
            }
            (_, t) => {
                self.now = self.now.max(t.unwrap_or(self.now));
                self.fetch.handle_timeout(self.now);
            }
        }
        true
    }

    fn run_until(&mut self, mut stop: impl FnMut(&Net) -> bool) {
        for _ in 0..100_000 {
            if stop(self) || !self.step() {
                return;
            }
        }
        panic!("seed {}: no progress after 100000 steps", self.seed);
    }

    fn run(&mut self) -> &Status {
        self.run_until(|_| false);
        self.fetch.status()
    }

    fn chunks_from(&self, peer: &str) -> u64 {
        self.fetch.peer_stats()[peer].1.chunks
    }

    fn health(&self, peer: &str) -> PeerHealth {
        self.fetch.peer_stats()[peer].0
    }
}

fn honest(names: &[&'static str]) -> Vec<(&'static str, Behavior, RateLimiter)> {
    names
        .iter()
        .map(|n| (*n, Behavior::Honest, RateLimiter::unlimited()))
        .collect()
}

fn assert_done(net: &Net, data: &[u8]) {
    match net.fetch.status() {
        Status::Done(id) => {
            assert_eq!(net.store.read_all(id).unwrap(), data, "seed {}", net.seed);
        }
        other => panic!("seed {}: expected Done, got {other:?}", net.seed),
    }
}

#[test]
fn fetches_from_three_peers_in_parallel() {
    let data = content(40 * 1024 + 300, 1);
    let mut net = Net::new(seed(1), &data, &honest(&["a", "b", "c"]), None);
    net.run();
    assert_done(&net, &data);
    for p in ["a", "b", "c"] {
        assert!(
            net.chunks_from(p) >= 5,
            "seed {}: {p} served {}",
            net.seed,
            net.chunks_from(p)
        );
    }
    assert_eq!(
        (0..3)
            .map(|i| net.chunks_from(["a", "b", "c"][i]))
            .sum::<u64>(),
        41
    );
    // Several requests were actually in flight at once, capped by `parallel`.
    assert!(
        net.max_outstanding > 3 && net.max_outstanding <= 8,
        "{}",
        net.max_outstanding
    );
    // One manifest request, and every chunk asked for exactly once.
    assert_eq!(
        net.sent
            .iter()
            .filter(|(_, w)| *w == What::Manifest)
            .count(),
        1
    );
    assert_eq!(net.sent.len(), 42);
    assert_eq!(net.fetch.progress(), (41, Some(41)));
}

#[test]
fn corrupt_peer_is_blamed_and_fetch_completes() {
    let data = content(30 * 1024, 2);
    let mut peers = honest(&["a", "c"]);
    peers.push(("b", Behavior::Corrupt, RateLimiter::unlimited()));
    let mut net = Net::new(seed(2), &data, &peers, None);
    net.run();
    assert_done(&net, &data);
    assert_eq!(net.health("b"), PeerHealth::Bad);
    assert_eq!(net.chunks_from("b"), 0);
    assert!(net.fetch.peer_stats()["b"].1.bad >= 1);
    // Once b's first bad chunk arrived, b was never asked again: all its
    // requests were issued before that, so it got at most `per_peer` of them
    // plus what was in the same first burst.
    let to_b = net.sent.iter().filter(|(p, _)| p == "b").count();
    assert!(
        to_b <= 4,
        "seed {}: {to_b} requests to the bad peer",
        net.seed
    );
}

#[test]
fn vanished_peer_chunks_are_requested_elsewhere_after_timeout() {
    let data = content(30 * 1024, 3);
    let mut peers = honest(&["a", "b"]);
    peers.push(("c", Behavior::SilentAfter(3), RateLimiter::unlimited()));
    let mut net = Net::new(seed(3), &data, &peers, None);
    net.run();
    assert_done(&net, &data);
    let c = &net.fetch.peer_stats()["c"].1;
    assert!(c.timeouts >= 1, "seed {}: {c:?}", net.seed);
    assert!(net.chunks_from("c") <= 3);
    assert_eq!(
        net.chunks_from("a") + net.chunks_from("b") + net.chunks_from("c"),
        30
    );
    // Every chunk that timed out at c was asked of someone else afterwards.
    for (i, (peer, what)) in net.sent.iter().enumerate() {
        if peer == "c" && net.outstanding.contains(&(peer.clone(), *what)) {
            assert!(
                net.sent[i + 1..].iter().any(|(p, w)| p != "c" && w == what),
                "seed {}: {what:?} lost at c never re-requested",
                net.seed
            );
        }
    }
    // Recovery took about one timeout, not one per lost chunk.
    assert!(
        net.now < 3 * TIMEOUT_MS,
        "seed {}: took {} ms",
        net.seed,
        net.now
    );
}

#[test]
fn withdrawn_peer_requests_move_at_once() {
    let data = content(30 * 1024, 4);
    let mut peers = honest(&["a", "b"]);
    peers.push(("c", Behavior::SilentAfter(2), RateLimiter::unlimited()));
    let mut net = Net::new(seed(4), &data, &peers, None);
    // c stops answering; its advertisement disappears as soon as it has 2 chunks out.
    net.run_until(|n| n.sent.iter().filter(|(p, _)| p == "c").count() >= 3);
    net.fetch.remove_peer(&"c".to_string());
    net.run();
    assert_done(&net, &data);
    // No request had to time out: c's were handed to a and b immediately.
    assert_eq!(net.fetch.peer_stats()["c"].1.timeouts, 0);
    assert!(
        net.now < TIMEOUT_MS,
        "seed {}: took {} ms",
        net.seed,
        net.now
    );
}

#[test]
fn all_peers_gone_fails_with_a_clear_reason() {
    let data = content(30 * 1024, 5);
    let peers: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|n| (n, Behavior::SilentAfter(4), RateLimiter::unlimited()))
        .collect();
    let mut net = Net::new(seed(5), &data, &peers, None);
    let id = net.fetch.id();
    net.run();
    let Status::Failed(e @ FetchError::NoPeers { .. }) = net.fetch.status() else {
        panic!(
            "seed {}: expected NoPeers, got {:?}",
            net.seed,
            net.fetch.status()
        );
    };
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("no peer can serve blob {id}: ")),
        "{msg}"
    );
    for p in ["\"a\"", "\"b\"", "\"c\""] {
        assert!(
            msg.contains(&format!("{p} failed 3 times in a row")),
            "{msg}"
        );
    }
    // What did arrive is kept for a later fetch to resume.
    assert_eq!(net.store.partials().unwrap(), vec![id]);
    assert!(!net.store.has(&id));
    assert!(net.fetch.poll_request(net.now).is_none());
}

#[test]
fn no_advertising_peer_fails_at_once() {
    let t = tempfile::tempdir().unwrap();
    let store = BlobStore::open(t.path()).unwrap();
    let id = BlobId::from_bytes([7; 32]);
    let f = Fetch::<String>::new(id, [], FetchConfig::default(), &store, 0).unwrap();
    let Status::Failed(e) = f.status() else {
        panic!("{:?}", f.status())
    };
    assert_eq!(
        e.to_string(),
        format!("no peer can serve blob {id}: no peer advertises it")
    );
}

#[test]
fn manifest_that_does_not_hash_to_the_id_is_rejected() {
    let data = content(10 * 1024, 6);
    let other = Manifest::for_bytes(&content(10 * 1024, 99), CHUNK).unwrap();
    // Only a liar: the fetch fails naming it, and nothing is created on disk.
    let liar = [(
        "m",
        Behavior::WrongManifest(other.clone()),
        RateLimiter::unlimited(),
    )];
    let mut net = Net::new(seed(6), &data, &liar, None);
    net.run();
    let Status::Failed(e) = net.fetch.status() else {
        panic!("seed {}: {:?}", net.seed, net.fetch.status());
    };
    assert!(
        e.to_string()
            .contains("\"m\" sent data that failed verification"),
        "{e}"
    );
    assert!(net.store.partials().unwrap().is_empty());
    // A liar among honest peers: it is blamed and another peer's manifest is used.
    let mut peers = honest(&["a", "b"]);
    peers.push((
        "0-liar",
        Behavior::WrongManifest(other),
        RateLimiter::unlimited(),
    ));
    for s in 0..8 {
        let mut net = Net::new(seed(60 + s), &data, &peers, None);
        net.run();
        assert_done(&net, &data);
        if net.sent[0].0 == "0-liar" {
            assert_eq!(net.health("0-liar"), PeerHealth::Bad);
            assert_eq!(net.sent[1].1, What::Manifest);
        }
    }
}

#[test]
fn resume_requests_only_the_missing_chunks() {
    let data = content(40 * 1024, 7);
    let dir = tempfile::tempdir().unwrap();
    let have_before;
    {
        let store = BlobStore::open(dir.path()).unwrap();
        let mut net = Net::new(seed(7), &data, &honest(&["a", "b", "c"]), Some(store));
        net.run_until(|n| n.fetch.progress().0 >= 20);
        have_before = net.fetch.progress().0;
        assert!(!net.fetch.is_over());
        // The agent stops: fetch, in-flight replies and store handle all dropped.
    }
    let store = BlobStore::open(dir.path()).unwrap();
    let id = store.partials().unwrap()[0];
    let missing: BTreeSet<u32> = store
        .resume(&id)
        .unwrap()
        .unwrap()
        .missing()
        .into_iter()
        .collect();
    assert_eq!(missing.len() as u32, 40 - have_before);
    let mut net = Net::new(seed(8), &data, &honest(&["a", "b", "c"]), Some(store));
    assert_eq!(net.fetch.progress(), (have_before, Some(40)));
    net.run();
    assert_done(&net, &data);
    // No manifest round trip, and exactly the missing chunks, each once.
    let asked: Vec<What> = net.sent.iter().map(|(_, w)| *w).collect();
    let want: Vec<What> = missing.iter().map(|&i| What::Chunk(i)).collect();
    let mut sorted = asked.clone();
    sorted.sort();
    assert_eq!(sorted, want, "seed {}", net.seed);
}

#[test]
fn rate_capped_peers_answer_busy_and_fetch_still_completes() {
    let data = content(24 * 1024, 8);
    // 100 KB/s each with a 2 KB burst: about one chunk per 10 ms per peer.
    let peers: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|n| (n, Behavior::Honest, RateLimiter::new(100_000, 2_048)))
        .collect();
    let mut net = Net::new(seed(9), &data, &peers, None);
    net.run();
    assert_done(&net, &data);
    let stats = net.fetch.peer_stats();
    assert!(
        stats["a"].1.busy + stats["b"].1.busy > 0,
        "seed {}: no Busy seen",
        net.seed
    );
    // Busy is back-pressure, not failure.
    assert_eq!(net.health("a"), PeerHealth::Ok);
    assert_eq!(net.health("b"), PeerHealth::Ok);
    // 24 KiB at 2 × 100 KB/s (minus the bursts) cannot finish faster than ~100 ms.
    assert!(
        net.now >= 100,
        "seed {}: finished at {} ms",
        net.seed,
        net.now
    );
}

#[test]
fn peers_added_mid_fetch_are_used() {
    let data = content(30 * 1024, 10);
    let mut net = Net::new(seed(10), &data, &honest(&["a", "b", "c"]), None);
    for p in ["b", "c"] {
        net.fetch.remove_peer(&p.to_string());
    }
    net.run_until(|n| n.fetch.progress().0 >= 3);
    for p in ["b", "c"] {
        net.fetch.add_peer(p.to_string());
    }
    net.run();
    assert_done(&net, &data);
    assert!(net.chunks_from("b") > 0 && net.chunks_from("c") > 0);
}

#[test]
fn blob_already_present_is_done_without_requests() {
    let data = content(5000, 11);
    let (store, id, _dir) = peer_store(&data);
    let mut f = Fetch::new(id, ["a".to_string()], cfg(), &store, 0).unwrap();
    assert!(matches!(f.status(), Status::Done(d) if *d == id));
    assert!(f.poll_request(0).is_none());
    assert_eq!(f.progress(), (5, Some(5)));
}

#[test]
fn empty_blob_is_fetched() {
    let mut net = Net::new(seed(12), b"", &honest(&["a"]), None);
    net.run();
    assert_done(&net, b"");
}

#[test]
fn second_fetch_of_the_same_blob_is_refused_while_one_runs() {
    let data = content(5000, 13);
    let mut net = Net::new(seed(13), &data, &honest(&["a"]), None);
    net.run_until(|n| n.fetch.progress().0 >= 1);
    let e = Fetch::new(net.fetch.id(), ["a".to_string()], cfg(), &net.store, 1).err();
    assert!(
        e.is_some_and(|e| e.to_string().contains("already being downloaded")),
        "seed {}",
        net.seed
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Whatever the seed, size and mix of bad peers, one honest peer is
    /// enough for the fetch to complete with the right bytes.
    #[test]
    fn one_honest_peer_is_enough(
        s in 0u64..1_000_000,
        len in 0usize..20_000,
        bad in proptest::collection::vec(0u8..3, 0..4),
    ) {
        let data = content(len, s as u8);
        let other = Manifest::for_bytes(b"something else", CHUNK).unwrap();
        let names = ["p0", "p1", "p2", "p3"];
        let mut peers = honest(&["honest"]);
        for (i, b) in bad.iter().enumerate() {
            let behavior = match b {
                0 => Behavior::Corrupt,
                1 => Behavior::SilentAfter(i),
                _ => Behavior::WrongManifest(other.clone()),
            };
            peers.push((names[i], behavior, RateLimiter::unlimited()));
        }
        let mut net = Net::new(s, &data, &peers, None);
        net.run();
        assert_done(&net, &data);
    }
}
