//! Seeded fault schedules: everything a chaos run will do, decided from its seed
//! before the run starts, so a seed replays the same faults and client operations.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// A small deterministic random source (SplitMix64): the same seed gives the same
/// sequence on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: u32, hi: u32) -> u32 {
        lo + self.below((hi - lo + 1) as usize) as u32
    }
}

/// One fault, injected at the start of a step and cleared at its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The network is cut into these groups of agent indices (every agent is in
    /// exactly one group; singletons included).
    Partition(Vec<Vec<usize>>),
    /// The agent drops this share of the datagrams and packets it receives.
    Loss {
        /// Agent index.
        agent: usize,
        /// Percent dropped.
        percent: u32,
    },
    /// The packets the agent receives are each held `ms` ± `jitter_ms` (so they
    /// also arrive out of order).
    Delay {
        /// Agent index.
        agent: usize,
        /// Mean delay, milliseconds.
        ms: u32,
        /// Largest deviation from it, milliseconds.
        jitter_ms: u32,
    },
    /// The agent is `kill -9`ed; it is started again when the step ends (its
    /// workloads keep running meanwhile, as on a real crash).
    Kill {
        /// Agent index.
        agent: usize,
    },
    /// The agent is SIGSTOPped, then SIGCONTed when the step ends.
    Pause {
        /// Agent index.
        agent: usize,
    },
    /// The agent's data dir (a small tmpfs) is filled up; the filler is removed
    /// when the step ends.
    DiskFull {
        /// Agent index.
        agent: usize,
    },
}

impl Fault {
    /// The fault's kind, one word: `partition`, `loss`, `delay`, `kill`, `pause`, `disk`.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Partition(_) => "partition",
            Fault::Loss { .. } => "loss",
            Fault::Delay { .. } => "delay",
            Fault::Kill { .. } => "kill",
            Fault::Pause { .. } => "pause",
            Fault::DiskFull { .. } => "disk",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |i: &usize| format!("n{}", i + 1);
        match self {
            Fault::Partition(groups) => {
                let shown: Vec<String> = groups
                    .iter()
                    .map(|g| g.iter().map(name).collect::<Vec<_>>().join(","))
                    .collect();
                write!(f, "partition {}", shown.join(" | "))
            }
            Fault::Loss { agent, percent } => write!(f, "{percent}% loss at {}", name(agent)),
            Fault::Delay {
                agent,
                ms,
                jitter_ms,
            } => write!(f, "{ms}±{jitter_ms} ms delay at {}", name(agent)),
            Fault::Kill { agent } => write!(f, "kill -9 {}", name(agent)),
            Fault::Pause { agent } => write!(f, "SIGSTOP {}", name(agent)),
            Fault::DiskFull { agent } => write!(f, "disk full at {}", name(agent)),
        }
    }
}

/// One client operation. The runner sends it to `agent`, or to the next agent that
/// can answer if that one is killed or paused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Agent index to send it to.
    pub agent: usize,
    /// What to do.
    pub kind: OpKind,
}

/// What a client operation does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// Writes a key no other operation writes: once acknowledged it must reach
    /// every agent.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Writes a key several operations write (on any side of a partition): it must
    /// end with one value everywhere.
    Contend {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Deploys a process service with this many replicas.
    Deploy {
        /// Service name.
        service: String,
        /// Replicas.
        replicas: u32,
    },
    /// Scales a service.
    Scale {
        /// Service name.
        service: String,
        /// Replicas.
        replicas: u32,
    },
    /// Removes a service.
    Remove {
        /// Service name.
        service: String,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = format!("n{}", self.agent + 1);
        match &self.kind {
            OpKind::Put { key, value } | OpKind::Contend { key, value } => {
                write!(f, "{at}: kv put {key} {value}")
            }
            OpKind::Deploy { service, replicas } => {
                write!(f, "{at}: deploy {service} ×{replicas}")
            }
            OpKind::Scale { service, replicas } => write!(f, "{at}: scale {service} {replicas}"),
            OpKind::Remove { service } => write!(f, "{at}: rm {service}"),
        }
    }
}

/// One step: a fault held for `hold` while `ops` are sent, spread over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The fault.
    pub fault: Fault,
    /// How long it is held.
    pub hold: Duration,
    /// Client operations sent meanwhile.
    pub ops: Vec<Op>,
}

/// A whole run's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// The seed it came from.
    pub seed: u64,
    /// Agents in the lab.
    pub agents: usize,
    /// Steps, in order.
    pub steps: Vec<Step>,
}

/// Seeds the CI suite runs (`tests/chaos.rs`, [`CI_STEPS`] steps each): between
/// them every fault kind and every operation kind turns up (unit-tested).
pub const CI_SEEDS: [u64; 2] = [34, 2];
/// Steps per CI run.
pub const CI_STEPS: usize = 6;

/// Services the client load deploys, scales and removes.
pub const SERVICES: [&str; 3] = ["c1", "c2", "c3"];
/// Keys the client load writes from every side.
pub const CONTENDED_KEYS: usize = 3;
/// Most replicas a client operation asks for.
pub const MAX_REPLICAS: u32 = 5;
/// Client operations per step.
const OPS_PER_STEP: usize = 8;

impl Schedule {
    /// The plan for `seed`: `steps` faults on `agents` agents (≥ 2), each held for
    /// `hold`, with client load during every step.
    pub fn generate(seed: u64, agents: usize, steps: usize, hold: Duration) -> Schedule {
        let agents = agents.max(2);
        let mut rng = Rng::new(seed);
        let mut deployed = [false; SERVICES.len()];
        let mut writes = 0usize;
        let steps = (0..steps)
            .map(|s| {
                let fault = match rng.below(7) {
                    0 | 1 => Fault::Partition(random_groups(&mut rng, agents)),
                    2 => Fault::Loss {
                        agent: rng.below(agents),
                        percent: rng.between(5, 30),
                    },
                    3 => {
                        let ms = rng.between(20, 400);
                        Fault::Delay {
                            agent: rng.below(agents),
                            ms,
                            jitter_ms: rng.between(0, ms / 2),
                        }
                    }
                    4 => Fault::Kill {
                        agent: rng.below(agents),
                    },
                    5 => Fault::Pause {
                        agent: rng.below(agents),
                    },
                    _ => Fault::DiskFull {
                        agent: rng.below(agents),
                    },
                };
                let ops = (0..OPS_PER_STEP)
                    .map(|_| {
                        let agent = rng.below(agents);
                        let kind = match rng.below(10) {
                            0..=4 => {
                                writes += 1;
                                OpKind::Put {
                                    key: format!("chaos/w/{writes}"),
                                    value: format!("s{s}-{writes}"),
                                }
                            }
                            5 | 6 => {
                                writes += 1;
                                OpKind::Contend {
                                    key: format!("chaos/c/{}", rng.below(CONTENDED_KEYS)),
                                    value: format!("n{}-s{s}-{writes}", agent + 1),
                                }
                            }
                            _ => {
                                let k = rng.below(SERVICES.len());
                                let service = SERVICES[k].to_string();
                                let replicas = rng.between(1, MAX_REPLICAS);
                                if !deployed[k] {
                                    deployed[k] = true;
                                    OpKind::Deploy { service, replicas }
                                } else if rng.below(4) == 0 {
                                    deployed[k] = false;
                                    OpKind::Remove { service }
                                } else {
                                    OpKind::Scale { service, replicas }
                                }
                            }
                        };
                        Op { agent, kind }
                    })
                    .collect();
                Step { fault, hold, ops }
            })
            .collect();
        Schedule {
            seed,
            agents,
            steps,
        }
    }

    /// Faults injected in all.
    pub fn faults(&self) -> usize {
        self.steps.len()
    }

    /// Faults injected, by kind ([`Fault::kind`]).
    pub fn fault_kinds(&self) -> BTreeMap<&'static str, usize> {
        let mut out = BTreeMap::new();
        for s in &self.steps {
            *out.entry(s.fault.kind()).or_default() += 1;
        }
        out
    }
}

/// Agents `0..n` dealt into 2 to `n` non-empty groups.
fn random_groups(rng: &mut Rng, n: usize) -> Vec<Vec<usize>> {
    let k = 2 + rng.below(n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); k];
    // The first k agents of the shuffled order seed one group each, so none is empty.
    for (pos, agent) in order.into_iter().enumerate() {
        let g = if pos < k { pos } else { rng.below(k) };
        groups[g].push(agent);
    }
    for g in &mut groups {
        g.sort_unstable();
    }
    groups.sort();
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_plan_and_seeds_differ() {
        let hold = Duration::from_secs(3);
        let a = Schedule::generate(7, 5, 20, hold);
        assert_eq!(a, Schedule::generate(7, 5, 20, hold));
        assert_ne!(a, Schedule::generate(8, 5, 20, hold));
        assert_eq!(a.faults(), 20);
    }

    #[test]
    fn partitions_cover_every_agent_once_in_non_empty_groups() {
        let mut rng = Rng::new(1);
        let mut shapes = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let groups = random_groups(&mut rng, 5);
            assert!(groups.len() >= 2 && groups.iter().all(|g| !g.is_empty()));
            let mut all: Vec<usize> = groups.concat();
            all.sort_unstable();
            assert_eq!(all, vec![0, 1, 2, 3, 4]);
            shapes.insert(groups.len());
        }
        // Every shape from two sides to all singletons turns up.
        assert_eq!(shapes.into_iter().collect::<Vec<_>>(), vec![2, 3, 4, 5]);
    }

    fn fault_kinds(plan: &Schedule) -> std::collections::BTreeSet<&'static str> {
        plan.fault_kinds().into_keys().collect()
    }

    #[test]
    fn the_ci_seeds_inject_every_fault_kind_and_every_operation() {
        let plans: Vec<Schedule> = CI_SEEDS
            .iter()
            .map(|&s| Schedule::generate(s, 5, CI_STEPS, Duration::from_secs(4)))
            .collect();
        let faults: std::collections::BTreeSet<&str> = plans.iter().flat_map(fault_kinds).collect();
        let ops: std::collections::HashSet<std::mem::Discriminant<OpKind>> = plans
            .iter()
            .flat_map(|p| &p.steps)
            .flat_map(|s| &s.ops)
            .map(|o| std::mem::discriminant(&o.kind))
            .collect();
        let others: Vec<String> = (1..=60)
            .map(|s| {
                let p = Schedule::generate(s, 5, CI_STEPS, Duration::from_secs(4));
                format!("{s}: {:?}", fault_kinds(&p))
            })
            .collect();
        assert!(
            faults.len() == 6 && ops.len() == 5,
            "CI seeds {CI_SEEDS:?} cover {faults:?} and {} operation kinds; seeds 1-60:\n{}",
            ops.len(),
            others.join("\n")
        );
    }

    #[test]
    fn every_fault_kind_and_operation_kind_turns_up() {
        let plan = Schedule::generate(3, 5, 200, Duration::from_secs(1));
        let faults = fault_kinds(&plan);
        assert_eq!(faults.len(), 6, "{faults:?}");
        let ops: std::collections::BTreeSet<&str> = plan
            .steps
            .iter()
            .flat_map(|s| &s.ops)
            .map(|o| match o.kind {
                OpKind::Put { .. } => "put",
                OpKind::Contend { .. } => "contend",
                OpKind::Deploy { .. } => "deploy",
                OpKind::Scale { .. } => "scale",
                OpKind::Remove { .. } => "remove",
            })
            .collect();
        assert_eq!(ops.len(), 5, "{ops:?}");
        // Unique keys really are unique.
        let mut keys: Vec<&String> = plan
            .steps
            .iter()
            .flat_map(|s| &s.ops)
            .filter_map(|o| match &o.kind {
                OpKind::Put { key, .. } => Some(key),
                _ => None,
            })
            .collect();
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n);
    }
}
