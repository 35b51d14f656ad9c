//! The scheduling engine: a compiled, mutable view of a [`Snapshot`] that answers
//! placement requests and keeps itself up to date as replicas are placed.
//!
//! Filters, in the order that decides which one a rejected node is counted under:
//! health (only `alive` nodes), hard constraints, hard affinity / anti-affinity to
//! services (co-location) and labels, host ports, then CPU, memory and disk. Feasible
//! nodes are ranked by their number of broken soft rules (fewest first) and, among
//! equals, by the strategy's key; ties go to the lowest node index, so answers are
//! deterministic.
//!
//! Cost, and why it is low: health and labels do not change during a round, so the
//! nodes passing a request's label rules (and their broken soft label rules) are
//! computed once per distinct rule set and cached in the cluster. Placing a replica is
//! then one pass over those nodes that checks what does change (resources, ports,
//! service affinity) and ranks the node in the same step. Which filter rejected which
//! node is only worked out when a replica fits nowhere.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::model::{
    AffinityTarget, ConstraintOp, Filter, NodeStatus, Params, Placement, PlacementRequest,
    Rejection, Resources, Snapshot, SnapshotColumns,
};

/// Most replicas one request may place; more are reported as unplaced.
pub const MAX_REPLICAS_PER_REQUEST: u32 = 100_000;

/// How much an image already on the node counts for `binpack`, in per-mille of
/// utilisation (100 = as if the node were 10% fuller).
const IMAGE_BONUS_PERMILLE: u32 = 100;

/// Distinct label rule sets whose feasible nodes are cached; the cache is emptied when
/// full (a round rarely has more than a few dozen).
const MAX_CACHED_RULE_SETS: usize = 256;

/// How the built-in scheduler ranks feasible nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Fewest allocations of this service (per spread-key group first, then per node),
    /// then a node that holds the image, then fewest allocations in total.
    #[default]
    Spread,
    /// Most utilised node that still fits (average of CPU and memory use after
    /// placement), holding the image counting as 10% more utilisation.
    Binpack,
    /// A node drawn at random, reproducibly from the seed.
    Random {
        /// Seed (param `seed`).
        seed: u64,
    },
}

impl Strategy {
    /// Reads params `strategy` (`spread`, the default, `binpack` or `random`) and
    /// `seed` (an integer, default 0).
    pub fn from_params(params: &Params) -> Result<Strategy, String> {
        match params.get("strategy").map(|s| s.trim()) {
            None | Some("") | Some("spread") => Ok(Strategy::Spread),
            Some("binpack") => Ok(Strategy::Binpack),
            Some("random") => {
                let seed = match params.get("seed") {
                    None => 0,
                    Some(s) => s
                        .trim()
                        .parse::<u64>()
                        .map_err(|_| format!("param seed: {s:?} is not an integer"))?,
                };
                Ok(Strategy::Random { seed })
            }
            Some(other) => Err(format!(
                "unknown strategy {other:?} (expected spread, binpack or random)"
            )),
        }
    }
}

/// A value id that no node has (0 means "label absent", ids of real values start at 1).
const NEVER: u32 = u32::MAX;

/// Counter slots: fixed filters first, then constraints, affinities and ports by index.
const SLOT_HEALTH: usize = 0;
const SLOT_CPU: usize = 1;
const SLOT_MEMORY: usize = 2;
const SLOT_DISK: usize = 3;
const FIXED_SLOTS: usize = 4;

/// A rule on node labels, compiled to interned ids. Labels and health are fixed for
/// the life of a [`Cluster`], so these results can be cached.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum LabelTest {
    Fail,
    Equals {
        col: usize,
        val: u32,
    },
    NotEquals {
        col: usize,
        val: u32,
    },
    In {
        col: usize,
        vals: Vec<u32>,
    },
    Exists {
        col: usize,
    },
    /// Node has (`want`) or has not (`!want`) label value `val` in column `col`.
    Label {
        col: usize,
        val: u32,
        want: bool,
    },
}

/// A rule on where services run, which changes as replicas are placed.
#[derive(Debug)]
enum ServiceTest {
    /// Node holds (`want`) or does not hold the requested service itself.
    Own { want: bool },
    /// Node holds (`want`) or does not hold another service (mask by node).
    Other { mask: Vec<bool>, want: bool },
}

/// Nodes that are alive and pass a request's hard label rules, with how many of its
/// soft label rules each breaks (`soft` is empty when it has none).
#[derive(Debug)]
struct LabelSet {
    nodes: Vec<u32>,
    soft: Vec<u8>,
}

/// Key of a cached [`LabelSet`]: the hard and the soft label rules.
type LabelKey = (Vec<LabelTest>, Vec<LabelTest>);

/// A request compiled against the cluster. Label rules and service rules are kept
/// apart: the first are answered by the cached [`LabelSet`], the second are checked
/// per node in the scan. Slots keep request order for attribution.
#[derive(Debug)]
struct Compiled {
    service: u32,
    hard_labels: Vec<(usize, LabelTest)>,
    hard_services: Vec<(usize, ServiceTest)>,
    soft_services: Vec<ServiceTest>,
    label_key: LabelKey,
    ports: Vec<(usize, u16)>,
    resources: Resources,
    image: Option<u32>,
    spread_col: Option<usize>,
    slots: usize,
    port_slot: usize,
}

/// Per-request dense state, kept in the cluster between requests so a request costs
/// no large allocation: the requested service's allocations per node and per spread
/// group, and which nodes hold the requested image.
///
/// Invariant between requests: `own` is all zeros (and `n` long once used);
/// `take_scratch` relies on it and `return_scratch` restores it by clearing only the
/// entries the request touched.
#[derive(Debug, Clone, Default)]
struct Scratch {
    own: Vec<u32>,
    groups: Vec<u32>,
}

impl ServiceTest {
    #[inline]
    fn passes(&self, s: &Scratch, j: usize) -> bool {
        match self {
            ServiceTest::Own { want } => (s.own[j] > 0) == *want,
            ServiceTest::Other { mask, want } => mask[j] == *want,
        }
    }
}

/// The cluster, compiled for fast placement, plus what was placed on it this round.
///
/// Per-node data is kept column by column (struct of arrays), so the pass over all
/// nodes that a replica costs touches a few small arrays, not scattered node records.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    names: Vec<String>,
    alive: Vec<bool>,
    capacity: Vec<Resources>,
    /// 1 / capacity (0 for zero capacity), CPU and memory, for `binpack`.
    inv_capacity: Vec<(f64, f64)>,
    free: Vec<Resources>,
    /// Sorted, deduplicated host ports in use per node.
    ports: Vec<Vec<u16>>,
    image_ids: BTreeMap<String, u32>,
    /// Per image id: a bitset of the nodes holding it.
    image_bits: Vec<Vec<u64>>,
    /// Label key -> column in `columns`.
    keys: BTreeMap<String, usize>,
    /// Label value -> id (from 1).
    value_ids: BTreeMap<String, u32>,
    /// Id -> label value (`value_names[0]` is unused).
    value_names: Vec<String>,
    /// `columns[key][node]` = value id, 0 when the node lacks the label.
    columns: Vec<Vec<u32>>,
    service_ids: BTreeMap<String, u32>,
    /// Per service id: (node, allocation count) pairs, unordered, no zero counts.
    service_allocs: Vec<Vec<(u32, u32)>>,
    /// Allocations per node, all services.
    total: Vec<u32>,
    label_sets: BTreeMap<LabelKey, Arc<LabelSet>>,
    scratch: Scratch,
}

/// What a strategy's key function sees of one feasible node.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'a> {
    cluster: &'a Cluster,
    index: usize,
    scratch: &'a Scratch,
    group_col: Option<&'a [u32]>,
    image: Option<u32>,
    soft_violations: u32,
    replica: u32,
}

impl<'a> NodeView<'a> {
    /// Index of the node in the snapshot.
    pub fn index(&self) -> u32 {
        self.index as u32
    }

    /// Node name.
    pub fn name(&self) -> &'a str {
        &self.cluster.names[self.index]
    }

    /// Value of a node label, if the node has it.
    pub fn label(&self, key: &str) -> Option<&'a str> {
        self.cluster.label(self.index, key)
    }

    /// Free resources now (after this round's placements so far).
    pub fn free(&self) -> Resources {
        self.cluster.free[self.index]
    }

    /// Total resources.
    pub fn capacity(&self) -> Resources {
        self.cluster.capacity[self.index]
    }

    /// Allocations on the node, all services.
    pub fn allocations(&self) -> u32 {
        self.cluster.total[self.index]
    }

    /// Allocations of the requested service on the node.
    pub fn service_allocations(&self) -> u32 {
        self.scratch.own[self.index]
    }

    /// Allocations of the requested service in the node's spread-key group (0 when the
    /// request has no spread key).
    pub fn group_allocations(&self) -> u32 {
        match self.group_col {
            Some(col) => self.scratch.groups[col[self.index] as usize],
            None => 0,
        }
    }

    /// Whether the node already holds the requested image (false if none requested).
    pub fn holds_image(&self) -> bool {
        self.cluster.holds_image(self.image, self.index)
    }

    /// Soft rules this node breaks (the engine already ranks by it first).
    pub fn soft_violations(&self) -> u32 {
        self.soft_violations
    }

    /// Which replica of the request is being placed (0-based).
    pub fn replica(&self) -> u32 {
        self.replica
    }

    /// Average CPU and memory use of the node, in per-mille of capacity, if a replica
    /// of `resources` were added (dimensions with zero capacity are skipped).
    pub fn utilisation_after(&self, resources: &Resources) -> u32 {
        self.cluster.utilisation_after(self.index, resources)
    }
}

impl Cluster {
    /// Compiles a snapshot.
    pub fn new(snapshot: Snapshot) -> Cluster {
        Cluster::from_columns(snapshot.to_columns())
    }

    /// Compiles a snapshot in columns (the form a guest receives). Entries naming a
    /// node or a string that does not exist are skipped; a node's later value for a
    /// label key wins.
    pub fn from_columns(cols: SnapshotColumns) -> Cluster {
        let n = cols.nodes.len();
        let mut c = Cluster {
            names: Vec::with_capacity(n),
            alive: Vec::with_capacity(n),
            capacity: Vec::with_capacity(n),
            inv_capacity: Vec::with_capacity(n),
            free: Vec::with_capacity(n),
            ports: vec![Vec::new(); n],
            value_names: vec![String::new()],
            total: vec![0; n],
            ..Cluster::default()
        };
        let strings = &cols.strings;
        let text = |id: u32| strings.get(id as usize);
        for node in &cols.nodes {
            c.names.push(text(node.name).cloned().unwrap_or_default());
            c.alive.push(node.status == NodeStatus::Alive);
            let inv = |x: u64| if x == 0 { 0.0 } else { 1.0 / x as f64 };
            c.inv_capacity.push((
                inv(node.capacity.cpu_millis),
                inv(node.capacity.memory_bytes),
            ));
            c.capacity.push(node.capacity);
            c.free.push(node.free);
        }
        // String id -> label column / value id / image id / service id, filled lazily.
        let none = u32::MAX;
        let (mut key_of, mut value_of) = (vec![none; strings.len()], vec![none; strings.len()]);
        for &(j, key, value) in &cols.labels {
            let (Some(k), Some(v)) = (text(key), text(value)) else {
                continue;
            };
            if j as usize >= n {
                continue;
            }
            if key_of[key as usize] == none {
                key_of[key as usize] = *c.keys.entry(k.clone()).or_insert_with(|| {
                    c.columns.push(vec![0; n]);
                    c.columns.len() - 1
                }) as u32;
            }
            if value_of[value as usize] == none {
                value_of[value as usize] = c.intern_value(v.clone());
            }
            c.columns[key_of[key as usize] as usize][j as usize] = value_of[value as usize];
        }
        for &(j, p) in &cols.ports {
            if let Some(ports) = c.ports.get_mut(j as usize) {
                ports.push(p);
            }
        }
        for ports in &mut c.ports {
            ports.sort_unstable();
            ports.dedup();
        }
        let mut image_of = vec![none; strings.len()];
        for &(j, image) in &cols.images {
            let Some(name) = text(image) else { continue };
            if j as usize >= n {
                continue;
            }
            if image_of[image as usize] == none {
                image_of[image as usize] = c.intern_image(name, n);
            }
            let j = j as usize;
            c.image_bits[image_of[image as usize] as usize][j / 64] |= 1 << (j % 64);
        }
        let mut service_of = vec![none; strings.len()];
        for &(j, service, count) in &cols.allocations {
            let Some(name) = text(service) else { continue };
            if j as usize >= n || count == 0 {
                continue;
            }
            if service_of[service as usize] == none {
                service_of[service as usize] = c.intern_service(name);
            }
            let allocs = &mut c.service_allocs[service_of[service as usize] as usize];
            match allocs.iter_mut().find(|(node, _)| *node == j) {
                Some((_, existing)) => *existing = existing.saturating_add(count),
                None => allocs.push((j, count)),
            }
            c.total[j as usize] = c.total[j as usize].saturating_add(count);
        }
        c
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Name of node `index`, if it exists.
    pub fn name(&self, index: u32) -> Option<&str> {
        self.names.get(index as usize).map(String::as_str)
    }

    /// Free resources of node `index` now, if it exists.
    pub fn free(&self, index: u32) -> Option<Resources> {
        self.free.get(index as usize).copied()
    }

    /// Allocations of `service` on node `index` now.
    pub fn service_allocations(&self, service: &str, index: u32) -> u32 {
        self.service_ids
            .get(service)
            .and_then(|&sid| {
                self.service_allocs[sid as usize]
                    .iter()
                    .find(|(node, _)| *node == index)
            })
            .map_or(0, |&(_, count)| count)
    }

    #[inline]
    fn holds_image(&self, image: Option<u32>, j: usize) -> bool {
        image.is_some_and(|id| self.image_bits[id as usize][j / 64] & (1 << (j % 64)) != 0)
    }

    fn label(&self, node: usize, key: &str) -> Option<&str> {
        let col = *self.keys.get(key)?;
        match self.columns[col][node] {
            0 => None,
            id => Some(&self.value_names[id as usize]),
        }
    }

    fn intern_value(&mut self, value: String) -> u32 {
        if let Some(&id) = self.value_ids.get(&value) {
            return id;
        }
        let id = self.value_names.len() as u32;
        self.value_names.push(value.clone());
        self.value_ids.insert(value, id);
        id
    }

    /// The id of `image`, registering it (with a bitset for `nodes` nodes) if new.
    fn intern_image(&mut self, image: &str, nodes: usize) -> u32 {
        if let Some(&id) = self.image_ids.get(image) {
            return id;
        }
        let id = self.image_bits.len() as u32;
        self.image_bits.push(vec![0; nodes.div_ceil(64)]);
        self.image_ids.insert(image.to_string(), id);
        id
    }

    fn intern_service(&mut self, service: &str) -> u32 {
        if let Some(&id) = self.service_ids.get(service) {
            return id;
        }
        let id = self.service_allocs.len() as u32;
        self.service_allocs.push(Vec::new());
        self.service_ids.insert(service.to_string(), id);
        id
    }

    fn value_id(&self, value: Option<&String>) -> u32 {
        value
            .and_then(|v| self.value_ids.get(v))
            .copied()
            .unwrap_or(NEVER)
    }

    fn holders(&self, service: &str) -> Vec<bool> {
        let mut mask = vec![false; self.len()];
        if let Some(&sid) = self.service_ids.get(service) {
            for &(node, _) in &self.service_allocs[sid as usize] {
                mask[node as usize] = true;
            }
        }
        mask
    }

    fn compile(&mut self, req: &PlacementRequest) -> Compiled {
        let service = self.intern_service(&req.service);
        let mut c = Compiled {
            service,
            hard_labels: Vec::new(),
            hard_services: Vec::new(),
            soft_services: Vec::new(),
            label_key: (Vec::new(), Vec::new()),
            ports: Vec::new(),
            resources: req.resources,
            image: req
                .image
                .as_ref()
                .and_then(|i| self.image_ids.get(i))
                .copied(),
            spread_col: req
                .spread_key
                .as_ref()
                .and_then(|k| self.keys.get(k))
                .copied(),
            slots: 0,
            port_slot: 0,
        };
        // `None`: a rule every node passes (e.g. `!=` on an unknown key).
        let add_label = |c: &mut Compiled, hard: bool, slot: usize, test: Option<LabelTest>| {
            let Some(test) = test else { return };
            if hard {
                c.label_key.0.push(test.clone());
                c.hard_labels.push((slot, test));
            } else {
                c.label_key.1.push(test);
            }
        };
        for (i, con) in req.constraints.iter().enumerate() {
            let col = self.keys.get(&con.key).copied();
            let test = match (con.op, col) {
                (ConstraintOp::NotEquals, None) => None,
                (_, None) => Some(LabelTest::Fail),
                (ConstraintOp::Equals, Some(col)) => Some(LabelTest::Equals {
                    col,
                    val: self.value_id(con.values.first()),
                }),
                (ConstraintOp::NotEquals, Some(col)) => Some(LabelTest::NotEquals {
                    col,
                    val: self.value_id(con.values.first()),
                }),
                (ConstraintOp::In, Some(col)) => Some(LabelTest::In {
                    col,
                    vals: con.values.iter().map(|v| self.value_id(Some(v))).collect(),
                }),
                (ConstraintOp::Exists, Some(col)) => Some(LabelTest::Exists { col }),
            };
            add_label(&mut c, con.hard, FIXED_SLOTS + i, test);
        }
        let affinity_base = FIXED_SLOTS + req.constraints.len();
        for (i, a) in req.affinities.iter().enumerate() {
            let want = !a.anti;
            let slot = affinity_base + i;
            let service_test = match &a.target {
                AffinityTarget::Service(s) if *s == req.service => ServiceTest::Own { want },
                AffinityTarget::Service(s) => ServiceTest::Other {
                    mask: self.holders(s),
                    want,
                },
                AffinityTarget::Label { key, value } => {
                    let test = match self.keys.get(key) {
                        Some(&col) => Some(LabelTest::Label {
                            col,
                            val: self.value_id(Some(value)),
                            want,
                        }),
                        None if want => Some(LabelTest::Fail),
                        None => None,
                    };
                    add_label(&mut c, a.hard, slot, test);
                    continue;
                }
            };
            if a.hard {
                c.hard_services.push((slot, service_test));
            } else {
                c.soft_services.push(service_test);
            }
        }
        c.port_slot = affinity_base + req.affinities.len();
        for (k, &p) in req.ports.iter().enumerate() {
            if !c.ports.iter().any(|&(_, q)| q == p) {
                c.ports.push((c.port_slot + k, p));
            }
        }
        c.slots = c.port_slot + req.ports.len();
        c
    }

    #[inline]
    fn label_passes(&self, test: &LabelTest, j: usize) -> bool {
        match test {
            LabelTest::Fail => false,
            LabelTest::Equals { col, val } => self.columns[*col][j] == *val,
            LabelTest::NotEquals { col, val } => self.columns[*col][j] != *val,
            LabelTest::In { col, vals } => {
                let v = self.columns[*col][j];
                v != 0 && vals.contains(&v)
            }
            LabelTest::Exists { col } => self.columns[*col][j] != 0,
            LabelTest::Label { col, val, want } => (self.columns[*col][j] == *val) == *want,
        }
    }

    /// The alive nodes passing the hard label rules in `key.0`, with their broken soft
    /// label rules (`key.1`); computed once per distinct key and cached.
    fn label_set(&mut self, key: &LabelKey) -> Arc<LabelSet> {
        if let Some(set) = self.label_sets.get(key) {
            return set.clone();
        }
        let mut nodes = Vec::new();
        let mut soft = Vec::new();
        for j in 0..self.len() {
            if self.alive[j] && key.0.iter().all(|t| self.label_passes(t, j)) {
                nodes.push(j as u32);
                if !key.1.is_empty() {
                    let broken = key.1.iter().filter(|t| !self.label_passes(t, j)).count();
                    soft.push(broken.min(u8::MAX as usize) as u8);
                }
            }
        }
        if self.label_sets.len() >= MAX_CACHED_RULE_SETS {
            self.label_sets.clear();
        }
        let set = Arc::new(LabelSet { nodes, soft });
        self.label_sets.insert(key.clone(), set.clone());
        set
    }

    /// Takes the scratch buffers out of the cluster, filled for request `c`.
    fn take_scratch(&mut self, c: &Compiled) -> Scratch {
        let n = self.len();
        let mut s = std::mem::take(&mut self.scratch);
        s.own.resize(n, 0);
        s.groups.clear();
        if c.spread_col.is_some() {
            s.groups.resize(self.value_names.len(), 0);
        }
        for &(node, count) in &self.service_allocs[c.service as usize] {
            s.own[node as usize] = count;
            if let Some(col) = c.spread_col {
                let g = &mut s.groups[self.columns[col][node as usize] as usize];
                *g = g.saturating_add(count);
            }
        }
        s
    }

    /// Puts the scratch buffers back, zeroing what the request set (see [`Scratch`]).
    fn return_scratch(&mut self, c: &Compiled, mut s: Scratch) {
        for &(node, _) in &self.service_allocs[c.service as usize] {
            s.own[node as usize] = 0;
        }
        self.scratch = s;
    }

    /// If node `j`, at `pos` in the label set, fits what changes during a round
    /// (resources, ports, hard service rules): how many soft rules it breaks.
    #[inline(always)]
    fn fits(&self, c: &Compiled, set: &LabelSet, s: &Scratch, pos: usize, j: usize) -> Option<u32> {
        let (r, f) = (&c.resources, &self.free[j]);
        if f.cpu_millis < r.cpu_millis
            || f.memory_bytes < r.memory_bytes
            || f.disk_bytes < r.disk_bytes
        {
            return None;
        }
        if !c.ports.is_empty()
            && c.ports
                .iter()
                .any(|(_, p)| self.ports[j].binary_search(p).is_ok())
        {
            return None;
        }
        // One rule is the common case; matching it avoids an inner loop per node.
        match c.hard_services.as_slice() {
            [] => {}
            [(_, t)] if t.passes(s, j) => {}
            [_] => return None,
            many => {
                if !many.iter().all(|(_, t)| t.passes(s, j)) {
                    return None;
                }
            }
        }
        let mut broken = if set.soft.is_empty() {
            0
        } else {
            u32::from(set.soft[pos])
        };
        match c.soft_services.as_slice() {
            [] => {}
            [t] => broken += u32::from(!t.passes(s, j)),
            many => {
                for t in many {
                    broken += u32::from(!t.passes(s, j));
                }
            }
        }
        Some(broken)
    }

    /// Calls `f(position, node)` for every node of the label set. (Unrolling this
    /// by hand, to save wasmtime's epoch check on each loop back-edge, made both the
    /// guest and the native build slower: the closure's state left registers.)
    #[inline(always)]
    fn each_node(nodes: &[u32], mut f: impl FnMut(usize, usize)) {
        for (pos, &j) in nodes.iter().enumerate() {
            f(pos, j as usize);
        }
    }

    /// One pass over the label set: among the nodes that also fit (resources, ports,
    /// hard service rules), the one with the fewest broken soft rules and then the
    /// smallest `rank`, first on ties. Returns (node, broken soft rules).
    #[inline]
    fn scan<R: Ord>(
        &self,
        c: &Compiled,
        set: &LabelSet,
        s: &Scratch,
        mut rank: impl FnMut(usize, u32) -> R,
    ) -> Option<(usize, u32)> {
        let mut best: Option<(usize, u32, R)> = None;
        Self::each_node(&set.nodes, |pos, j| {
            let Some(broken) = self.fits(c, set, s, pos, j) else {
                return;
            };
            if best.as_ref().is_some_and(|b| broken > b.1) {
                return;
            }
            let k = rank(j, broken);
            if best
                .as_ref()
                .is_none_or(|(_, bb, bk)| broken < *bb || k < *bk)
            {
                best = Some((j, broken, k));
            }
        });
        best.map(|(j, broken, _)| (j, broken))
    }

    /// [`Self::scan`] for ranks below 2^56: broken soft rules (saturated at 255) and
    /// the rank are packed into one integer, so each node costs one comparison.
    #[inline]
    fn scan_packed(
        &self,
        c: &Compiled,
        set: &LabelSet,
        s: &Scratch,
        rank: impl Fn(usize) -> u64,
    ) -> Option<(usize, u32)> {
        let mut best = (u64::MAX, None);
        Self::each_node(&set.nodes, |pos, j| {
            let Some(broken) = self.fits(c, set, s, pos, j) else {
                return;
            };
            let packed = (u64::from(broken.min(0xff)) << 56) | rank(j);
            if packed < best.0 || best.1.is_none() {
                best = (packed, Some(j));
            }
        });
        best.1.map(|j| (j, (best.0 >> 56) as u32))
    }

    /// The counter slot of the first filter node `j` fails, if any.
    fn first_failure(&self, c: &Compiled, s: &Scratch, j: usize) -> Option<usize> {
        if !self.alive[j] {
            return Some(SLOT_HEALTH);
        }
        // The first failing rule in request order, label or service.
        let label = c
            .hard_labels
            .iter()
            .find(|(_, t)| !self.label_passes(t, j))
            .map(|(slot, _)| *slot);
        let service = c
            .hard_services
            .iter()
            .find(|(_, t)| !t.passes(s, j))
            .map(|(slot, _)| *slot);
        if let Some(slot) = label.into_iter().chain(service).min() {
            return Some(slot);
        }
        for &(slot, p) in &c.ports {
            if self.ports[j].binary_search(&p).is_ok() {
                return Some(slot);
            }
        }
        let free = &self.free[j];
        if free.cpu_millis < c.resources.cpu_millis {
            return Some(SLOT_CPU);
        }
        if free.memory_bytes < c.resources.memory_bytes {
            return Some(SLOT_MEMORY);
        }
        if free.disk_bytes < c.resources.disk_bytes {
            return Some(SLOT_DISK);
        }
        None
    }

    /// Why nothing fits: every node counted under the first filter it fails now.
    fn rejections(&self, c: &Compiled, s: &Scratch, req: &PlacementRequest) -> Vec<Rejection> {
        let mut counters = vec![0u32; c.slots];
        for j in 0..self.len() {
            if let Some(slot) = self.first_failure(c, s, j) {
                counters[slot] += 1;
            }
        }
        let affinity_base = FIXED_SLOTS + req.constraints.len();
        counters
            .iter()
            .enumerate()
            .filter(|(_, &count)| count > 0)
            .map(|(slot, &count)| {
                let filter = match slot {
                    SLOT_HEALTH => Filter::Health,
                    SLOT_CPU => Filter::Cpu,
                    SLOT_MEMORY => Filter::Memory,
                    SLOT_DISK => Filter::Disk,
                    s if s < affinity_base => Filter::Constraint((s - FIXED_SLOTS) as u32),
                    s if s < c.port_slot => Filter::Affinity((s - affinity_base) as u32),
                    s => Filter::Port(req.ports.get(s - c.port_slot).copied().unwrap_or(0)),
                };
                Rejection {
                    filter,
                    nodes: count,
                }
            })
            .collect()
    }

    /// See [`NodeView::utilisation_after`]; multiplies by precomputed inverse
    /// capacities, since a division per node and dimension would dominate `binpack`.
    #[inline]
    fn utilisation_after(&self, j: usize, r: &Resources) -> u32 {
        let (cap, free, (inv_cpu, inv_mem)) =
            (self.capacity[j], self.free[j], self.inv_capacity[j]);
        let used =
            |cap: u64, free: u64, req: u64| cap.saturating_sub(free).saturating_add(req) as f64;
        let dims = u32::from(inv_cpu > 0.0) + u32::from(inv_mem > 0.0);
        if dims == 0 {
            return 0;
        }
        let sum = used(cap.cpu_millis, free.cpu_millis, r.cpu_millis) * inv_cpu
            + used(cap.memory_bytes, free.memory_bytes, r.memory_bytes) * inv_mem;
        (sum / f64::from(dims) * 1000.0).min(1_000_000.0) as u32
    }

    /// Places a request with the strategy its params name (see [`Strategy::from_params`]).
    pub fn place(&mut self, req: &PlacementRequest) -> Result<Placement, String> {
        let strategy = Strategy::from_params(&req.params)?;
        Ok(self.place_with(req, strategy))
    }

    /// Places a request with a given built-in strategy.
    ///
    /// Same result as [`Cluster::place_by`] with the strategy's key (see [`Strategy`]),
    /// computed faster: broken soft rules and the key are packed into one integer,
    /// each field saturated (soft rules at 255; for `spread` group allocations at 2^20,
    /// service allocations at 2^16, all allocations at 2^19; `random` uses the top 56
    /// bits of its hash).
    pub fn place_with(&mut self, req: &PlacementRequest, strategy: Strategy) -> Placement {
        let salt = match strategy {
            Strategy::Random { seed } => seed ^ fnv1a(req.service.as_bytes()),
            _ => 0,
        };
        let sat = |v: u32, max: u32| u64::from(v.min(max));
        self.place_inner(req, |cluster, c, s, replica, set| match strategy {
            Strategy::Spread => {
                let group_col = c.spread_col.map(|col| cluster.columns[col].as_slice());
                cluster.scan_packed(c, set, s, |j| {
                    let group = group_col.map_or(0, |col| sat(s.groups[col[j] as usize], 0xf_ffff));
                    (group << 36)
                        | (sat(s.own[j], 0xffff) << 20)
                        | (u64::from(!cluster.holds_image(c.image, j)) << 19)
                        | sat(cluster.total[j], 0x7_ffff)
                })
            }
            Strategy::Binpack => cluster.scan(c, set, s, |j, _| {
                let bonus = if cluster.holds_image(c.image, j) {
                    IMAGE_BONUS_PERMILLE
                } else {
                    0
                };
                u32::MAX
                    - cluster
                        .utilisation_after(j, &c.resources)
                        .saturating_add(bonus)
            }),
            Strategy::Random { .. } => cluster.scan(c, set, s, |j, _| {
                splitmix64(salt ^ (u64::from(replica) << 32) ^ j as u64)
            }),
        })
    }

    /// Places a request, ranking feasible nodes by fewest broken soft rules and then by
    /// `key` (smallest wins, ties to the lowest index). This is the engine the built-in
    /// strategies use, and what a custom policy plugs its own ranking into.
    pub fn place_by<K: Ord>(
        &mut self,
        req: &PlacementRequest,
        mut key: impl FnMut(&NodeView<'_>) -> K,
    ) -> Placement {
        self.place_inner(req, |cluster, c, s, replica, set| {
            let group_col = c.spread_col.map(|col| cluster.columns[col].as_slice());
            cluster.scan(c, set, s, |j, soft_violations| {
                key(&NodeView {
                    cluster,
                    index: j,
                    scratch: s,
                    group_col,
                    image: c.image,
                    soft_violations,
                    replica,
                })
            })
        })
    }

    /// The replica loop shared by all strategies: `pick` chooses a node for each
    /// replica; the choice is recorded before the next one is picked.
    fn place_inner(
        &mut self,
        req: &PlacementRequest,
        mut pick: impl FnMut(&Cluster, &Compiled, &Scratch, u32, &LabelSet) -> Option<(usize, u32)>,
    ) -> Placement {
        let c = self.compile(req);
        let set = self.label_set(&c.label_key);
        let mut s = self.take_scratch(&c);
        let wanted = req.replicas.min(MAX_REPLICAS_PER_REQUEST);
        let mut nodes = Vec::with_capacity(wanted as usize);
        let mut unplaced = None;
        for replica in 0..wanted {
            let Some((j, _)) = pick(self, &c, &s, replica, &set) else {
                unplaced = Some(self.rejections(&c, &s, req));
                break;
            };
            self.apply_one(j, &c, req);
            s.own[j] = s.own[j].saturating_add(1);
            if let Some(col) = c.spread_col {
                let g = &mut s.groups[self.columns[col][j] as usize];
                *g = g.saturating_add(1);
            }
            nodes.push(j as u32);
        }
        if unplaced.is_none() && wanted < req.replicas {
            unplaced = Some(vec![Rejection {
                filter: Filter::Other(format!(
                    "more than {MAX_REPLICAS_PER_REQUEST} replicas in one request"
                )),
                nodes: self.len() as u32,
            }]);
        }
        self.return_scratch(&c, s);
        Placement { nodes, unplaced }
    }

    /// Records replicas placed by someone else (another policy, or a fallback) so this
    /// view stays true. Unknown node indices are ignored.
    pub fn commit(&mut self, req: &PlacementRequest, nodes: &[u32]) {
        let c = self.compile(req);
        for &j in nodes {
            if (j as usize) < self.len() {
                self.apply_one(j as usize, &c, req);
            }
        }
    }

    fn apply_one(&mut self, j: usize, c: &Compiled, req: &PlacementRequest) {
        let free = &mut self.free[j];
        free.cpu_millis = free.cpu_millis.saturating_sub(c.resources.cpu_millis);
        free.memory_bytes = free.memory_bytes.saturating_sub(c.resources.memory_bytes);
        free.disk_bytes = free.disk_bytes.saturating_sub(c.resources.disk_bytes);
        for &(_, p) in &c.ports {
            if let Err(at) = self.ports[j].binary_search(&p) {
                self.ports[j].insert(at, p);
            }
        }
        let allocs = &mut self.service_allocs[c.service as usize];
        match allocs.iter_mut().find(|(node, _)| *node == j as u32) {
            Some((_, count)) => *count = count.saturating_add(1),
            None => allocs.push((j as u32, 1)),
        }
        self.total[j] = self.total[j].saturating_add(1);
        // The node pulls the image to run the replica, so it holds it from now on.
        if let Some(image) = &req.image {
            let id = self.intern_image(image, self.len()) as usize;
            self.image_bits[id][j / 64] |= 1 << (j % 64);
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
