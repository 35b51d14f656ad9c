//! The replicated map: last-writer-wins registers with per-writer sequence numbers.
//!
//! Every entry carries the hybrid-logical-clock stamp and the id of its writer;
//! for one key the entry with the larger `(hlc, writer, seq)` wins. Deletes are
//! tombstones (entries without a value). Applying entries is commutative,
//! associative and idempotent, so any delivery order converges.
//!
//! Keys under `node/<name>/` are node-owned: only the node called `<name>`
//! may write them. Everything else is cluster-wide.
//!
//! For delta sync each replica keeps, per writer, a *head*: the highest
//! sequence number `h` such that every write of that writer numbered `<= h`
//! has been received or superseded. Invariant kept by [`State::apply_delta`]:
//! a range `(from, to]` is only claimed by a sender that included every live
//! entry of that writer numbered in that range.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 512;
/// Largest value accepted, in bytes.
pub const MAX_VALUE_LEN: usize = 1 << 20;
/// Prefix of node-owned keys: `node/<name>/...`.
pub const NODE_PREFIX: &str = "node/";

/// Who wrote an entry: a node name plus the generation of that node's process.
///
/// The generation changes on every agent start, so sequence numbers restart
/// from 1 without being mistaken for old ones.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WriterId {
    /// The node's name (bound to its certificate).
    pub node: String,
    /// The generation of the writing process.
    pub gen: u64,
}

/// One versioned register value (or tombstone) for one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value; `None` is a tombstone (the key was deleted).
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    /// When it was written.
    pub hlc: Hlc,
    /// Who wrote it.
    pub writer: WriterId,
    /// The writer's sequence number for this write (from 1).
    pub seq: u64,
}

impl Entry {
    /// Whether this entry is a delete marker.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// Whether the key is node-owned (`node/<name>/...`).
    pub fn is_node_owned(&self) -> bool {
        self.key.starts_with(NODE_PREFIX)
    }

    /// The LWW order: larger wins.
    fn version(&self) -> (Hlc, &WriterId, u64) {
        (self.hlc, &self.writer, self.seq)
    }

    /// Whether `self` replaces `other` for the same key.
    pub fn wins_over(&self, other: &Entry) -> bool {
        self.version() > other.version()
    }

    /// Rough encoded size, used to bound message sizes.
    pub fn approx_size(&self) -> usize {
        64 + self.key.len() + self.writer.node.len() + self.value.as_ref().map_or(0, Vec::len)
    }
}

/// Why an entry was refused. The state is unchanged in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// Empty key, or longer than [`MAX_KEY_LEN`].
    #[error("key must be 1..={MAX_KEY_LEN} bytes, got {0}")]
    KeyLength(usize),
    /// Value larger than [`MAX_VALUE_LEN`].
    #[error("value must be at most {MAX_VALUE_LEN} bytes, got {0}")]
    ValueTooLarge(usize),
    /// Sequence number 0 is never assigned.
    #[error("sequence number 0 is invalid")]
    ZeroSeq,
    /// A node-owned key written by another node.
    #[error("key {key:?} is owned by another node than writer {writer:?}")]
    NotOwner {
        /// The key.
        key: String,
        /// The node that tried to write it.
        writer: String,
    },
}

/// Checks an entry against the size limits and node ownership.
pub fn validate(e: &Entry) -> Result<(), Reject> {
    if e.key.is_empty() || e.key.len() > MAX_KEY_LEN {
        return Err(Reject::KeyLength(e.key.len()));
    }
    if let Some(v) = &e.value {
        if v.len() > MAX_VALUE_LEN {
            return Err(Reject::ValueTooLarge(v.len()));
        }
    }
    if e.seq == 0 {
        return Err(Reject::ZeroSeq);
    }
    if let Some(rest) = e.key.strip_prefix(NODE_PREFIX) {
        let owner = rest.split('/').next().unwrap_or("");
        if owner != e.writer.node {
            return Err(Reject::NotOwner {
                key: e.key.clone(),
                writer: e.writer.node.clone(),
            });
        }
    }
    Ok(())
}

/// What a replica has of one writer's sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Head {
    /// Every write numbered `<= contiguous` is received or superseded.
    contiguous: u64,
    /// Writes received beyond `contiguous`.
    ahead: BTreeSet<u64>,
}

impl Head {
    fn mark(&mut self, seq: u64) {
        if seq > self.contiguous {
            self.ahead.insert(seq);
            self.advance();
        }
    }

    fn raise_to(&mut self, to: u64) {
        if to > self.contiguous {
            self.contiguous = to;
            self.ahead = self.ahead.split_off(&(to + 1));
            self.advance();
        }
    }

    fn advance(&mut self) {
        while self.ahead.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
    }
}

/// A set of entries plus the sequence ranges they completely cover.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// `(writer, from, to)`: every live entry of `writer` with `from < seq <= to` is in `entries`.
    pub ranges: Vec<(WriterId, u64, u64)>,
    /// The entries.
    pub entries: Vec<Entry>,
}

/// A replica of the whole key space.
#[derive(Debug, Clone, Default)]
pub struct State {
    entries: BTreeMap<String, Entry>,
    /// Live (winning) entries by writer and sequence number: what a delta serves.
    by_writer: BTreeMap<WriterId, BTreeMap<u64, String>>,
    heads: BTreeMap<WriterId, Head>,
    /// XOR of `head_hash(writer, contiguous)` over all heads, kept current on
    /// every head change, so two replicas can tell in 8 bytes whether their
    /// heads differ (anti-entropy sends full heads only then).
    digest: u64,
}

/// A 64-bit mix of a writer and its contiguous head (stable across builds).
fn head_hash(w: &WriterId, contiguous: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in w.node.as_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    for x in [w.gen, contiguous] {
        // splitmix64 finaliser over the running hash and the next word.
        let mut z = h ^ x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h = z ^ (z >> 31);
    }
    h
}

impl State {
    /// An empty replica.
    pub fn new() -> Self {
        Self::default()
    }

    /// Merges one entry. Returns `Ok(true)` if it became the current value of its key.
    pub fn apply(&mut self, e: Entry) -> Result<bool, Reject> {
        validate(&e)?;
        self.update_head(&e.writer, |h| h.mark(e.seq));
        if let Some(cur) = self.entries.get(&e.key) {
            if !e.wins_over(cur) {
                return Ok(false);
            }
            let (w, s) = (cur.writer.clone(), cur.seq);
            self.unindex(&w, s);
        }
        self.by_writer
            .entry(e.writer.clone())
            .or_default()
            .insert(e.seq, e.key.clone());
        self.entries.insert(e.key.clone(), e);
        Ok(true)
    }

    fn update_head(&mut self, writer: &WriterId, f: impl FnOnce(&mut Head)) {
        let head = self.heads.entry(writer.clone()).or_default();
        let before = head.contiguous;
        f(head);
        let after = head.contiguous;
        if before != after {
            // A head at 0 contributes nothing, so unknown and empty writers agree.
            if before > 0 {
                self.digest ^= head_hash(writer, before);
            }
            self.digest ^= head_hash(writer, after);
        }
    }

    /// An 8-byte summary of [`heads`](Self::heads): equal heads give equal digests.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    fn unindex(&mut self, writer: &WriterId, seq: u64) {
        if let Some(m) = self.by_writer.get_mut(writer) {
            m.remove(&seq);
            if m.is_empty() {
                self.by_writer.remove(writer);
            }
        }
    }

    /// The current entry of a key, tombstones included.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// The current value of a key (`None` if missing or deleted).
    pub fn value(&self, key: &str) -> Option<&[u8]> {
        self.entries.get(key).and_then(|e| e.value.as_deref())
    }

    /// Live (non-deleted) entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e)
            .filter(|e| !e.is_tombstone())
    }

    /// Every current entry, tombstones included, in key order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Number of keys held (tombstones included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Per-writer contiguous heads: what to send a peer so it can compute a delta.
    pub fn heads(&self) -> Vec<(WriterId, u64)> {
        self.heads
            .iter()
            .map(|(w, h)| (w.clone(), h.contiguous))
            .collect()
    }

    /// What a peer with heads `theirs` lacks, at most about `budget` bytes of entries.
    ///
    /// Ranges are cut at entry boundaries, so a truncated delta still claims
    /// only ranges it fully covers; the next sync continues from there.
    pub fn delta_for(&self, theirs: &[(WriterId, u64)], budget: usize) -> Delta {
        let theirs: BTreeMap<&WriterId, u64> = theirs.iter().map(|(w, s)| (w, *s)).collect();
        let mut delta = Delta::default();
        let mut used = 0usize;
        for (writer, head) in &self.heads {
            let from = theirs.get(writer).copied().unwrap_or(0);
            let live = self.by_writer.get(writer);
            let mut covered = from;
            let mut truncated = false;
            if let Some(live) = live {
                for (&seq, key) in live.range(from + 1..) {
                    let e = &self.entries[key];
                    if used > 0 && used + e.approx_size() > budget {
                        truncated = true;
                        break;
                    }
                    used += e.approx_size();
                    delta.entries.push(e.clone());
                    if seq <= head.contiguous {
                        covered = seq;
                    }
                }
            }
            if !truncated {
                covered = covered.max(head.contiguous);
            }
            if covered > from {
                delta.ranges.push((writer.clone(), from, covered));
            }
            if truncated {
                break;
            }
        }
        delta
    }

    /// Merges a delta. Returns the entries that changed the current value of their key,
    /// and the entries refused (with why).
    pub fn apply_delta(&mut self, delta: Delta) -> (Vec<Entry>, Vec<Reject>) {
        let mut changed = Vec::new();
        let mut rejected = Vec::new();
        for e in delta.entries {
            match self.apply(e.clone()) {
                Ok(true) => changed.push(e),
                Ok(false) => {}
                Err(r) => rejected.push(r),
            }
        }
        for (writer, from, to) in delta.ranges {
            // Only a gap-free extension is sound: we must already hold everything up to `from`.
            self.update_head(&writer, |head| {
                if head.contiguous >= from {
                    head.raise_to(to);
                }
            });
        }
        (changed, rejected)
    }

    /// Drops the current entries of `keys` without tombstones, keeping every head:
    /// what a forgotten node wrote goes, and no sync sends it again (a peer's
    /// delta starts above our heads).
    pub fn purge(&mut self, keys: &[String]) {
        for key in keys {
            if let Some(e) = self.entries.remove(key) {
                self.unindex(&e.writer, e.seq);
            }
        }
    }

    /// Removes tombstones stamped before `older_than`. Returns how many were removed.
    ///
    /// A replica cut off for longer than the tombstone lifetime may bring a
    /// deleted key back when it returns; the lifetime is a config knob.
    pub fn gc_tombstones(&mut self, older_than: Hlc) -> usize {
        let dead: Vec<(String, WriterId, u64)> = self
            .entries
            .values()
            .filter(|e| e.is_tombstone() && e.hlc < older_than)
            .map(|e| (e.key.clone(), e.writer.clone(), e.seq))
            .collect();
        for (key, writer, seq) in &dead {
            self.entries.remove(key);
            self.unindex(writer, *seq);
        }
        dead.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(node: &str) -> WriterId {
        WriterId {
            node: node.into(),
            gen: 1,
        }
    }

    fn entry(key: &str, val: Option<&str>, hlc: u64, writer: &str, seq: u64) -> Entry {
        Entry {
            key: key.into(),
            value: val.map(|v| v.as_bytes().to_vec()),
            hlc: Hlc(hlc),
            writer: w(writer),
            seq,
        }
    }

    fn snapshot(s: &State) -> Vec<Entry> {
        s.entries().cloned().collect()
    }

    #[test]
    fn later_write_wins_and_tombstone_hides() {
        let mut s = State::new();
        assert!(s.apply(entry("a", Some("1"), 10, "n1", 1)).unwrap());
        assert!(!s.apply(entry("a", Some("0"), 5, "n2", 1)).unwrap());
        assert_eq!(s.value("a"), Some(&b"1"[..]));
        assert!(s.apply(entry("a", None, 11, "n2", 2)).unwrap());
        assert_eq!(s.value("a"), None);
        assert_eq!(s.scan_prefix("").count(), 0);
    }

    #[test]
    fn node_owned_keys_only_by_owner() {
        let mut s = State::new();
        assert!(s
            .apply(entry("node/n1/info", Some("x"), 1, "n1", 1))
            .is_ok());
        let err = s
            .apply(entry("node/n1/info", Some("evil"), 9, "n2", 1))
            .unwrap_err();
        assert!(matches!(err, Reject::NotOwner { .. }));
        assert_eq!(s.value("node/n1/info"), Some(&b"x"[..]));
    }

    #[test]
    fn limits_are_enforced() {
        let mut s = State::new();
        assert_eq!(
            s.apply(entry("", Some("x"), 1, "n1", 1)),
            Err(Reject::KeyLength(0))
        );
        let mut big = entry("k", None, 1, "n1", 1);
        big.value = Some(vec![0; MAX_VALUE_LEN + 1]);
        assert_eq!(s.apply(big), Err(Reject::ValueTooLarge(MAX_VALUE_LEN + 1)));
        assert_eq!(
            s.apply(entry("k", Some("x"), 1, "n1", 0)),
            Err(Reject::ZeroSeq)
        );
        assert!(s.is_empty());
    }

    #[test]
    fn truncated_delta_claims_only_what_it_carries() {
        let mut a = State::new();
        for i in 1..=10u64 {
            a.apply(entry(&format!("k{i}"), Some("v"), i, "n1", i))
                .unwrap();
        }
        let mut b = State::new();
        let d = a.delta_for(&b.heads(), 200);
        assert!(d.entries.len() < 10);
        let last = d.entries.last().unwrap().seq;
        assert_eq!(d.ranges, vec![(w("n1"), 0, last)]);
        b.apply_delta(d);
        // Keep syncing: the rest arrives, nothing is skipped.
        for _ in 0..20 {
            let d = a.delta_for(&b.heads(), 200);
            b.apply_delta(d);
        }
        assert_eq!(snapshot(&a), snapshot(&b));
        assert_eq!(a.heads(), b.heads());
    }

    #[test]
    fn superseded_writes_are_covered_by_ranges() {
        let mut a = State::new();
        a.apply(entry("k", Some("1"), 1, "n1", 1)).unwrap();
        a.apply(entry("k", Some("2"), 2, "n1", 2)).unwrap();
        a.apply(entry("k", Some("3"), 3, "n1", 3)).unwrap();
        let mut b = State::new();
        let d = a.delta_for(&b.heads(), usize::MAX);
        assert_eq!(d.entries.len(), 1);
        b.apply_delta(d);
        assert_eq!(b.heads(), vec![(w("n1"), 3)]);
    }

    #[test]
    fn digest_tracks_heads_in_any_order() {
        let mut a = State::new();
        let mut b = State::new();
        assert_eq!(a.digest(), b.digest());
        a.apply(entry("x", Some("1"), 1, "n1", 1)).unwrap();
        assert_ne!(a.digest(), b.digest());
        a.apply(entry("y", Some("1"), 2, "n2", 1)).unwrap();
        b.apply(entry("y", Some("1"), 2, "n2", 1)).unwrap();
        b.apply(entry("x", Some("1"), 1, "n1", 1)).unwrap();
        assert_eq!(a.digest(), b.digest(), "same heads, any order");
        // A write beyond a gap does not move the contiguous head: same digest.
        let d = a.digest();
        a.apply(entry("z", Some("1"), 9, "n1", 3)).unwrap();
        assert_eq!(a.digest(), d);
        a.apply(entry("w", Some("1"), 8, "n1", 2)).unwrap();
        assert_ne!(a.digest(), d);
    }

    #[test]
    fn tombstone_gc() {
        let mut s = State::new();
        s.apply(entry("a", None, 5, "n1", 1)).unwrap();
        s.apply(entry("b", None, 50, "n1", 2)).unwrap();
        s.apply(entry("c", Some("x"), 1, "n1", 3)).unwrap();
        assert_eq!(s.gc_tombstones(Hlc(10)), 1);
        assert!(s.get("a").is_none());
        assert!(s.get("b").is_some());
        assert_eq!(s.value("c"), Some(&b"x"[..]));
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (
            0u8..6,
            proptest::option::of(0u8..4),
            0u64..20,
            0u8..3,
            1u64..30,
        )
            .prop_map(|(k, v, hlc, wr, seq)| Entry {
                key: format!("k{k}"),
                value: v.map(|v| vec![v]),
                hlc: Hlc(hlc),
                writer: w(&format!("n{wr}")),
                seq,
            })
    }

    /// Entries as real writers produce them: one `(writer, seq)` is one write.
    fn arb_entries(max: usize) -> impl Strategy<Value = Vec<Entry>> {
        proptest::collection::vec(arb_entry(), 0..max).prop_map(|v| {
            let mut seen = std::collections::BTreeSet::new();
            v.into_iter()
                .filter(|e| seen.insert((e.writer.clone(), e.seq)))
                .collect()
        })
    }

    fn apply_all(entries: &[Entry]) -> State {
        let mut s = State::new();
        for e in entries {
            s.apply(e.clone()).unwrap();
        }
        s
    }

    proptest! {
        /// Commutative: any permutation of the same entries gives the same map.
        #[test]
        fn merge_is_commutative(entries in arb_entries(40), seed in any::<u64>()) {
            let a = apply_all(&entries);
            let mut shuffled = entries.clone();
            // deterministic Fisher-Yates from the seed
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let b = apply_all(&shuffled);
            prop_assert_eq!(snapshot(&a), snapshot(&b));
        }

        /// Idempotent: applying everything twice changes nothing.
        #[test]
        fn merge_is_idempotent(entries in arb_entries(40)) {
            let a = apply_all(&entries);
            let mut twice = entries.clone();
            twice.extend(entries.iter().cloned());
            prop_assert_eq!(snapshot(&a), snapshot(&apply_all(&twice)));
        }

        /// Associative: merging (x ∪ y) then z equals x then (y ∪ z), as replicas.
        #[test]
        fn merge_is_associative(all in arb_entries(60), cut1 in 0usize..60, cut2 in 0usize..60) {
            let (c1, c2) = (cut1.min(cut2).min(all.len()), cut1.max(cut2).min(all.len()));
            let (x, y, z) = (&all[..c1], &all[c1..c2], &all[c2..]);
            let merge = |into: &mut State, from: &State| {
                for e in from.entries() { into.apply(e.clone()).unwrap(); }
            };
            let (sx, sy, sz) = (apply_all(x), apply_all(y), apply_all(z));
            let mut left = sx.clone(); merge(&mut left, &sy); merge(&mut left, &sz);
            let mut yz = sy.clone(); merge(&mut yz, &sz);
            let mut right = sx.clone(); merge(&mut right, &yz);
            prop_assert_eq!(snapshot(&left), snapshot(&right));
        }

        /// Delta sync in both directions makes two replicas equal, whatever
        /// each has seen, even with small message budgets.
        #[test]
        fn two_way_sync_converges(
            x in proptest::collection::vec(arb_entry(), 0..30),
            y in proptest::collection::vec(arb_entry(), 0..30),
            budget in 50usize..2000,
        ) {
            // Each replica only holds writes of one writer with distinct seqs,
            // as real writers produce; build them that way.
            let renumber = |v: &[Entry], node: &str| -> Vec<Entry> {
                v.iter().enumerate().map(|(i, e)| Entry { writer: w(node), seq: i as u64 + 1, ..e.clone() }).collect()
            };
            let (x, y) = (renumber(&x, "a"), renumber(&y, "b"));
            let mut a = apply_all(&x);
            let mut b = apply_all(&y);
            for _ in 0..200 {
                let d = b.delta_for(&a.heads(), budget); a.apply_delta(d);
                let d = a.delta_for(&b.heads(), budget); b.apply_delta(d);
            }
            let mut all = x.clone(); all.extend(y.iter().cloned());
            let want = apply_all(&all);
            prop_assert_eq!(snapshot(&a), snapshot(&want));
            prop_assert_eq!(snapshot(&b), snapshot(&want));
        }
    }
}
