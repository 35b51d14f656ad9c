//! The scheduling engine: a compiled, mutable view of a [`Snapshot`] that answers
//! placement requests and keeps itself up to date as replicas are placed.
//!
//! Filters (in the order that decides which one a rejected node is counted under):
//! health (only `alive` nodes), hard constraints, hard affinity / anti-affinity to
//! services (co-location) and labels, host ports, then CPU, memory and disk. Every
//! feasible node is then ranked by its number of broken soft rules (fewest first) and,
//! among equals, by the strategy's key; ties go to the lowest node index, so answers are
//! deterministic.
//!
//! Cost: building a [`Cluster`] interns labels, images and services once; a request
//! then costs one pass over the nodes (a few array reads per node and rule) plus one
//! pass over the feasible nodes per replica.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use crate::model::{
    AffinityTarget, ConstraintOp, Filter, NodeStatus, Params, Placement, PlacementRequest,
    Rejection, Resources, Snapshot,
};

/// Most replicas one request may place; more are reported as unplaced.
pub const MAX_REPLICAS_PER_REQUEST: u32 = 100_000;

/// How much an image already on the node counts for `binpack`, in per-mille of
/// utilisation (100 = as if the node were 10% fuller).
const IMAGE_BONUS_PERMILLE: u32 = 100;

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
/// Marks a candidate that no longer fits.
const GONE: u32 = u32::MAX;

/// Counter slots: fixed filters first, then constraints, affinities and ports by index.
const SLOT_HEALTH: usize = 0;
const SLOT_CPU: usize = 1;
const SLOT_MEMORY: usize = 2;
const SLOT_DISK: usize = 3;
const FIXED_SLOTS: usize = 4;

/// The cluster, compiled for fast placement, plus what was placed on it this round.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    names: Vec<String>,
    alive: Vec<bool>,
    capacity: Vec<Resources>,
    free: Vec<Resources>,
    /// Sorted, deduplicated host ports in use per node.
    ports: Vec<Vec<u16>>,
    /// Sorted image ids per node.
    images: Vec<Vec<u32>>,
    image_ids: BTreeMap<String, u32>,
    /// Label key -> column in `columns`.
    keys: BTreeMap<String, usize>,
    /// Label value -> id (from 1).
    value_ids: BTreeMap<String, u32>,
    /// Id -> label value (`value_names[0]` is unused).
    value_names: Vec<String>,
    /// `columns[key][node]` = value id, 0 when the node lacks the label.
    columns: Vec<Vec<u32>>,
    service_ids: BTreeMap<String, u32>,
    /// Per service id: node -> allocation count (no zero entries).
    service_allocs: Vec<BTreeMap<u32, u32>>,
    /// Allocations per node, all services.
    total: Vec<u32>,
}

/// One rule compiled against the cluster's interned ids.
#[derive(Debug)]
enum Test {
    Pass,
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
    /// Node holds (or, for anti-affinity, does not hold) the service.
    Holds {
        mask: Vec<bool>,
        want: bool,
        own: bool,
    },
    /// Node has (or, for anti-affinity, has not) label value `val` in column `col`.
    Label {
        col: usize,
        val: u32,
        want: bool,
    },
}

#[derive(Debug)]
struct Rule {
    slot: usize,
    test: Test,
}

/// A request compiled against the cluster.
#[derive(Debug)]
struct Compiled {
    service: u32,
    hard: Vec<Rule>,
    soft: Vec<Rule>,
    ports: Vec<(usize, u16)>,
    resources: Resources,
    image: Option<u32>,
    spread_col: Option<usize>,
    slots: usize,
    port_slot: usize,
}

/// What a strategy's key function sees of one feasible node.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'a> {
    cluster: &'a Cluster,
    index: usize,
    own: &'a [u32],
    groups: &'a [u32],
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
        self.own[self.index]
    }

    /// Allocations of the requested service in the node's spread-key group (0 when the
    /// request has no spread key).
    pub fn group_allocations(&self) -> u32 {
        match self.group_col {
            Some(col) => self.groups[col[self.index] as usize],
            None => 0,
        }
    }

    /// Whether the node already holds the requested image (false if none requested).
    pub fn holds_image(&self) -> bool {
        match self.image {
            Some(id) => self.cluster.images[self.index].binary_search(&id).is_ok(),
            None => false,
        }
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
        let cap = self.capacity();
        let free = self.free();
        let mut sum = 0.0f64;
        let mut dims = 0u32;
        for (c, f, r) in [
            (cap.cpu_millis, free.cpu_millis, resources.cpu_millis),
            (cap.memory_bytes, free.memory_bytes, resources.memory_bytes),
        ] {
            if c > 0 {
                let used = c.saturating_sub(f).saturating_add(r);
                sum += used as f64 / c as f64;
                dims += 1;
            }
        }
        if dims == 0 {
            return 0;
        }
        (sum / f64::from(dims) * 1000.0).min(1_000_000.0) as u32
    }
}

impl Cluster {
    /// Compiles a snapshot (consumes it so names and labels move, not copy).
    pub fn new(snapshot: Snapshot) -> Cluster {
        let n = snapshot.nodes.len();
        let mut c = Cluster {
            names: Vec::with_capacity(n),
            alive: Vec::with_capacity(n),
            capacity: Vec::with_capacity(n),
            free: Vec::with_capacity(n),
            ports: Vec::with_capacity(n),
            images: Vec::with_capacity(n),
            value_names: vec![String::new()],
            total: Vec::with_capacity(n),
            ..Cluster::default()
        };
        for (j, node) in snapshot.nodes.into_iter().enumerate() {
            c.alive.push(node.status == NodeStatus::Alive);
            c.capacity.push(node.capacity);
            c.free.push(node.free);
            let mut ports = node.ports_in_use;
            ports.sort_unstable();
            ports.dedup();
            c.ports.push(ports);
            let mut images: Vec<u32> = node.images.into_iter().map(|i| c.intern_image(i)).collect();
            images.sort_unstable();
            images.dedup();
            c.images.push(images);
            for (key, value) in node.labels {
                let col = match c.keys.get(&key) {
                    Some(&col) => col,
                    None => {
                        c.columns.push(vec![0; n]);
                        c.keys.insert(key, c.columns.len() - 1);
                        c.columns.len() - 1
                    }
                };
                let id = c.intern_value(value);
                c.columns[col][j] = id;
            }
            let mut total = 0u32;
            for (service, count) in node.allocations {
                if count == 0 {
                    continue;
                }
                let sid = c.intern_service(service) as usize;
                c.service_allocs[sid].insert(j as u32, count);
                total = total.saturating_add(count);
            }
            c.total.push(total);
            c.names.push(node.name);
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
            .and_then(|&sid| self.service_allocs[sid as usize].get(&index))
            .copied()
            .unwrap_or(0)
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

    fn intern_image(&mut self, image: String) -> u32 {
        let next = self.image_ids.len() as u32;
        *self.image_ids.entry(image).or_insert(next)
    }

    fn intern_service(&mut self, service: String) -> u32 {
        if let Some(&id) = self.service_ids.get(&service) {
            return id;
        }
        let id = self.service_allocs.len() as u32;
        self.service_allocs.push(BTreeMap::new());
        self.service_ids.insert(service, id);
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
            for &node in self.service_allocs[sid as usize].keys() {
                mask[node as usize] = true;
            }
        }
        mask
    }

    fn compile(&mut self, req: &PlacementRequest) -> Compiled {
        let service = self.intern_service(req.service.clone());
        let mut hard = Vec::new();
        let mut soft = Vec::new();
        for (i, c) in req.constraints.iter().enumerate() {
            let col = self.keys.get(&c.key).copied();
            let test = match (c.op, col) {
                (ConstraintOp::NotEquals, None) => Test::Pass,
                (_, None) => Test::Fail,
                (ConstraintOp::Equals, Some(col)) => Test::Equals {
                    col,
                    val: self.value_id(c.values.first()),
                },
                (ConstraintOp::NotEquals, Some(col)) => Test::NotEquals {
                    col,
                    val: self.value_id(c.values.first()),
                },
                (ConstraintOp::In, Some(col)) => Test::In {
                    col,
                    vals: c.values.iter().map(|v| self.value_id(Some(v))).collect(),
                },
                (ConstraintOp::Exists, Some(col)) => Test::Exists { col },
            };
            let rule = Rule {
                slot: FIXED_SLOTS + i,
                test,
            };
            if c.hard {
                hard.push(rule)
            } else {
                soft.push(rule)
            }
        }
        let affinity_base = FIXED_SLOTS + req.constraints.len();
        for (i, a) in req.affinities.iter().enumerate() {
            let want = !a.anti;
            let test = match &a.target {
                AffinityTarget::Service(s) => Test::Holds {
                    mask: self.holders(s),
                    want,
                    own: *s == req.service,
                },
                AffinityTarget::Label { key, value } => match self.keys.get(key) {
                    Some(&col) => Test::Label {
                        col,
                        val: self.value_id(Some(value)),
                        want,
                    },
                    None if want => Test::Fail,
                    None => Test::Pass,
                },
            };
            let rule = Rule {
                slot: affinity_base + i,
                test,
            };
            if a.hard {
                hard.push(rule)
            } else {
                soft.push(rule)
            }
        }
        let port_slot = affinity_base + req.affinities.len();
        let mut ports: Vec<(usize, u16)> = Vec::new();
        for (k, &p) in req.ports.iter().enumerate() {
            if !ports.iter().any(|&(_, q)| q == p) {
                ports.push((port_slot + k, p));
            }
        }
        Compiled {
            service,
            hard,
            soft,
            ports,
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
            slots: port_slot + req.ports.len(),
            port_slot,
        }
    }

    fn passes(&self, test: &Test, j: usize) -> bool {
        match test {
            Test::Pass => true,
            Test::Fail => false,
            Test::Equals { col, val } => self.columns[*col][j] == *val,
            Test::NotEquals { col, val } => self.columns[*col][j] != *val,
            Test::In { col, vals } => {
                let v = self.columns[*col][j];
                v != 0 && vals.contains(&v)
            }
            Test::Exists { col } => self.columns[*col][j] != 0,
            Test::Holds { mask, want, .. } => mask[j] == *want,
            Test::Label { col, val, want } => (self.columns[*col][j] == *val) == *want,
        }
    }

    /// The counter slot of the first filter node `j` fails, if any.
    fn first_failure(&self, c: &Compiled, j: usize) -> Option<usize> {
        if !self.alive[j] {
            return Some(SLOT_HEALTH);
        }
        for rule in &c.hard {
            if !self.passes(&rule.test, j) {
                return Some(rule.slot);
            }
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

    fn soft_violations(&self, c: &Compiled, j: usize) -> u32 {
        c.soft
            .iter()
            .filter(|rule| !self.passes(&rule.test, j))
            .count() as u32
    }

    /// Places a request with the strategy its params name (see [`Strategy::from_params`]).
    pub fn place(&mut self, req: &PlacementRequest) -> Result<Placement, String> {
        let strategy = Strategy::from_params(&req.params)?;
        Ok(self.place_with(req, strategy))
    }

    /// Places a request with a given built-in strategy.
    pub fn place_with(&mut self, req: &PlacementRequest, strategy: Strategy) -> Placement {
        match strategy {
            Strategy::Spread => self.place_by(req, |n| {
                (
                    n.group_allocations(),
                    n.service_allocations(),
                    !n.holds_image(),
                    n.allocations(),
                )
            }),
            Strategy::Binpack => {
                let res = req.resources;
                self.place_by(req, move |n| {
                    let bonus = if n.holds_image() {
                        IMAGE_BONUS_PERMILLE
                    } else {
                        0
                    };
                    Reverse(n.utilisation_after(&res).saturating_add(bonus))
                })
            }
            Strategy::Random { seed } => {
                let salt = seed ^ fnv1a(req.service.as_bytes());
                self.place_by(req, move |n| {
                    splitmix64(salt ^ (u64::from(n.replica()) << 32) ^ u64::from(n.index()))
                })
            }
        }
    }

    /// Places a request, ranking feasible nodes by fewest broken soft rules and then by
    /// `key` (smallest wins, ties to the lowest index). This is the engine the built-in
    /// strategies use, and what a custom policy plugs its own ranking into.
    pub fn place_by<K: Ord>(
        &mut self,
        req: &PlacementRequest,
        mut key: impl FnMut(&NodeView<'_>) -> K,
    ) -> Placement {
        let n = self.len();
        let mut c = self.compile(req);
        let mut counters = vec![0u32; c.slots];
        // (node, soft violations or GONE), in index order so ties go to the lowest index.
        let mut cands: Vec<(u32, u32)> = Vec::with_capacity(n);
        for j in 0..n {
            match self.first_failure(&c, j) {
                Some(slot) => counters[slot] += 1,
                None => cands.push((j as u32, self.soft_violations(&c, j))),
            }
        }
        let mut own = vec![0u32; n];
        for (&node, &count) in &self.service_allocs[c.service as usize] {
            own[node as usize] = count;
        }
        let mut groups = vec![
            0u32;
            if c.spread_col.is_some() {
                self.value_names.len()
            } else {
                0
            }
        ];
        if let Some(col) = c.spread_col {
            for (&node, &count) in &self.service_allocs[c.service as usize] {
                let g = &mut groups[self.columns[col][node as usize] as usize];
                *g = g.saturating_add(count);
            }
        }
        let wanted = req.replicas.min(MAX_REPLICAS_PER_REQUEST);
        let mut nodes = Vec::with_capacity(wanted as usize);
        let mut unplaced = None;
        for replica in 0..wanted {
            let mut best: Option<(usize, u32, K)> = None;
            for (pos, &(j, sv)) in cands.iter().enumerate() {
                if sv == GONE || best.as_ref().is_some_and(|b| sv > b.1) {
                    continue;
                }
                let view = NodeView {
                    cluster: self,
                    index: j as usize,
                    own: &own,
                    groups: &groups,
                    group_col: c.spread_col.map(|col| self.columns[col].as_slice()),
                    image: c.image,
                    soft_violations: sv,
                    replica,
                };
                let k = key(&view);
                let better = match &best {
                    None => true,
                    Some((_, bsv, bk)) => sv < *bsv || k < *bk,
                };
                if better {
                    best = Some((pos, sv, k));
                }
            }
            let Some((pos, _, _)) = best else {
                unplaced = Some(rejections(&counters, &c, req));
                break;
            };
            let j = cands[pos].0 as usize;
            self.apply_one(j, &c, req);
            own[j] = own[j].saturating_add(1);
            if let Some(col) = c.spread_col {
                let g = &mut groups[self.columns[col][j] as usize];
                *g = g.saturating_add(1);
            }
            for rule in c.hard.iter_mut().chain(c.soft.iter_mut()) {
                if let Test::Holds {
                    mask, own: true, ..
                } = &mut rule.test
                {
                    mask[j] = true;
                }
            }
            nodes.push(j as u32);
            match self.first_failure(&c, j) {
                Some(slot) => {
                    counters[slot] += 1;
                    cands[pos].1 = GONE;
                }
                None => cands[pos].1 = self.soft_violations(&c, j),
            }
        }
        if unplaced.is_none() && wanted < req.replicas {
            unplaced = Some(vec![Rejection {
                filter: Filter::Other(format!(
                    "more than {MAX_REPLICAS_PER_REQUEST} replicas in one request"
                )),
                nodes: n as u32,
            }]);
        }
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
        let count = self.service_allocs[c.service as usize]
            .entry(j as u32)
            .or_insert(0);
        *count = count.saturating_add(1);
        self.total[j] = self.total[j].saturating_add(1);
        // The node pulls the image to run the replica, so it holds it from now on.
        if let Some(image) = &req.image {
            let id = self.intern_image(image.clone());
            if let Err(at) = self.images[j].binary_search(&id) {
                self.images[j].insert(at, id);
            }
        }
    }
}

fn rejections(counters: &[u32], c: &Compiled, req: &PlacementRequest) -> Vec<Rejection> {
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
