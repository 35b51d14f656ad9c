//! The chaos runner: plays a [`Schedule`] on a [`Lab`] of real agents, with client
//! load, then heals everything and checks the invariants a user relies on.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::lab::{Lab, LabConfig};
use crate::schedule::{Fault, OpKind, Schedule, CONTENDED_KEYS};

/// CPU each chaos replica reserves, in millicores.
const REPLICA_CPU_MILLIS: u64 = 500;
/// Size of each agent's tmpfs data dir.
const DATA_TMPFS: u64 = 160 << 20;
/// How long one client command may take before it counts as unanswered.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// What one run does.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// The `shoal` binary.
    pub shoal: PathBuf,
    /// Agents in the lab (≥ 2).
    pub agents: usize,
    /// The seed of the fault schedule and client load.
    pub seed: u64,
    /// Faults injected, one after another.
    pub steps: usize,
    /// How long each fault is held.
    pub hold: Duration,
    /// How long after the heal every invariant must hold.
    pub settle: Duration,
}

impl ChaosConfig {
    /// The command that replays this run.
    pub fn replay(&self) -> String {
        format!(
            "cargo build -p shoal && cargo run -p shoal-chaos -- --seed {} --runs 1 --agents {} --steps {} --hold-ms {}",
            self.seed,
            self.agents,
            self.steps,
            self.hold.as_millis()
        )
    }
}

/// What a passing run measured.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The seed.
    pub seed: u64,
    /// Faults injected.
    pub faults: usize,
    /// Faults injected, by kind.
    pub fault_kinds: BTreeMap<&'static str, usize>,
    /// Client operations sent.
    pub ops: usize,
    /// Unique-key writes acknowledged (each must reach every agent).
    pub writes_acked: usize,
    /// Acknowledged writes missing anywhere once settled (0 when the run passes).
    pub writes_lost: usize,
    /// Writes refused (disk full, an agent cut off from a service's steward, …).
    pub ops_refused: usize,
    /// Time from the heal until every invariant held.
    pub converged: Duration,
    /// What happened, one line per fault and operation.
    pub timeline: Vec<String>,
}

/// A run whose invariants did not hold (or whose lab could not be built).
#[derive(Debug)]
pub struct RunFailure {
    /// The seed.
    pub seed: u64,
    /// What went wrong: the violated invariants, one per line.
    pub what: String,
    /// The command that replays the run.
    pub replay: String,
    /// What happened before.
    pub timeline: Vec<String>,
    /// The tail of every agent's log.
    pub logs: String,
}

impl fmt::Display for RunFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "chaos seed {} failed:\n{}", self.seed, self.what)?;
        writeln!(f, "replay: {}", self.replay)?;
        writeln!(f, "timeline:")?;
        for line in &self.timeline {
            writeln!(f, "  {line}")?;
        }
        write!(f, "agent logs (tails):\n{}", self.logs)
    }
}

impl std::error::Error for RunFailure {}

/// Whether an agent can answer its API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Up {
    Yes,
    Killed,
    Paused,
}

/// What the client load sent and got acknowledged: what [`violations`] holds the
/// cluster to.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// Unique keys acknowledged, with their value.
    pub acked: BTreeMap<String, String>,
    /// Every value sent to a contended key (acknowledged or not).
    pub contended: BTreeMap<String, BTreeSet<String>>,
    /// Operations sent.
    pub ops: usize,
    /// Operations refused or unanswered.
    pub refused: usize,
}

/// Runs one seed: builds the lab, plays the schedule, heals, checks.
pub fn run(cfg: &ChaosConfig) -> Result<RunReport, RunFailure> {
    let plan = Schedule::generate(cfg.seed, cfg.agents, cfg.steps, cfg.hold);
    let mut timeline = Vec::new();
    let fail = |what: String, timeline: &[String], lab: Option<&Lab>| RunFailure {
        seed: cfg.seed,
        what,
        replay: cfg.replay(),
        timeline: timeline.to_vec(),
        logs: lab
            .map(|l| format!("{}{}", kept_logs(l, cfg.seed), log_tails(l)))
            .unwrap_or_default(),
    };
    let mut lab = Lab::new(LabConfig {
        agents: plan.agents,
        shoal: cfg.shoal.clone(),
        agent_args: Vec::new(),
        data_tmpfs: Some(DATA_TMPFS),
    })
    .map_err(|e| fail(format!("building the lab: {e:#}"), &timeline, None))?;
    lab.start_all()
        .map_err(|e| fail(format!("starting agents: {e:#}"), &timeline, None))?;
    let all: Vec<usize> = (0..plan.agents).collect();
    lab.wait(
        "every agent sees every other",
        Duration::from_secs(60),
        |l| all.iter().all(|&i| sees_all_alive(l, i)).then_some(()),
    )
    .map_err(|e| fail(format!("{e:#}"), &timeline, Some(&lab)))?;

    let started = Instant::now();
    let mut up = vec![Up::Yes; plan.agents];
    let mut ledger = Ledger::default();
    for (s, step) in plan.steps.iter().enumerate() {
        let at = started.elapsed().as_secs_f32();
        timeline.push(format!("{at:6.1}s step {s}: {}", step.fault));
        inject(&mut lab, &step.fault, &mut up, cfg.seed ^ s as u64).map_err(|e| {
            fail(
                format!("injecting {}: {e:#}", step.fault),
                &timeline,
                Some(&lab),
            )
        })?;
        let began = Instant::now();
        let gap = step.hold / (step.ops.len() as u32 + 1);
        for op in &step.ops {
            std::thread::sleep(gap);
            let line = send(&lab, &up, op.agent, &op.kind, &mut ledger);
            timeline.push(format!("        {line}"));
        }
        if let Some(rest) = step.hold.checked_sub(began.elapsed()) {
            std::thread::sleep(rest);
        }
        clear(&mut lab, &step.fault, &mut up).map_err(|e| {
            fail(
                format!("clearing {}: {e:#}", step.fault),
                &timeline,
                Some(&lab),
            )
        })?;
    }
    let healed = Instant::now();
    timeline.push(format!(
        "{:6.1}s healed: every link up, every agent running",
        started.elapsed().as_secs_f32()
    ));

    let mut last = Vec::new();
    while healed.elapsed() < cfg.settle {
        last = violations(&lab, &ledger);
        if last.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let converged = healed.elapsed();
    let panicked: Vec<String> = (0..plan.agents)
        .filter(|&i| lab.log(i).contains("panicked"))
        .map(|i| format!("agent n{} panicked (see its log)", i + 1))
        .collect();
    last.extend(panicked);
    if !last.is_empty() {
        return Err(fail(
            format!(
                "after {:?} of settling ({} acknowledged writes lost):\n{}\n{}\n3 s later:\n{}\n{}",
                cfg.settle,
                lost_writes(&lab, &ledger),
                last.join("\n"),
                drop_counters(&lab),
                {
                    // Twice, a few seconds apart: a counter that does not move
                    // points at a task that is stuck.
                    std::thread::sleep(Duration::from_secs(3));
                    drop_counters(&lab)
                },
                state_diff(&lab)
            ),
            &timeline,
            Some(&lab),
        ));
    }
    Ok(RunReport {
        seed: cfg.seed,
        faults: plan.faults(),
        fault_kinds: plan.fault_kinds(),
        ops: ledger.ops,
        writes_acked: ledger.acked.len(),
        writes_lost: 0,
        ops_refused: ledger.refused,
        converged,
        timeline,
    })
}

fn inject(lab: &mut Lab, fault: &Fault, up: &mut [Up], seed: u64) -> anyhow::Result<()> {
    match fault {
        Fault::Partition(groups) => lab.partition(groups),
        Fault::Loss { agent, percent } => lab.set_loss(*agent, *percent),
        Fault::Delay {
            agent,
            ms,
            jitter_ms,
        } => lab.set_delay(
            *agent,
            Duration::from_millis(u64::from(*ms)),
            Duration::from_millis(u64::from(*jitter_ms)),
            seed,
        ),
        Fault::Kill { agent } => {
            lab.signal(*agent, libc::SIGKILL);
            up[*agent] = Up::Killed;
            Ok(())
        }
        Fault::Pause { agent } => {
            lab.signal(*agent, libc::SIGSTOP);
            up[*agent] = Up::Paused;
            Ok(())
        }
        Fault::DiskFull { agent } => lab.fill_disk(*agent),
    }
}

fn clear(lab: &mut Lab, fault: &Fault, up: &mut [Up]) -> anyhow::Result<()> {
    match fault {
        Fault::Partition(_) => lab.heal(),
        Fault::Loss { agent, .. } => lab.set_loss(*agent, 0),
        Fault::Delay { agent, .. } => lab.set_delay(*agent, Duration::ZERO, Duration::ZERO, 0),
        Fault::Kill { agent } => {
            up[*agent] = Up::Yes;
            lab.start(*agent)
        }
        Fault::Pause { agent } => {
            lab.signal(*agent, libc::SIGCONT);
            up[*agent] = Up::Yes;
            Ok(())
        }
        Fault::DiskFull { agent } => lab.free_disk(*agent),
    }
}

/// Sends one operation to `agent` (or the next agent that can answer); records
/// what was acknowledged. Returns a timeline line.
fn send(lab: &Lab, up: &[Up], agent: usize, kind: &OpKind, ledger: &mut Ledger) -> String {
    let n = up.len();
    let Some(to) = (0..n).map(|k| (agent + k) % n).find(|&j| up[j] == Up::Yes) else {
        return "no agent can answer".into();
    };
    ledger.ops += 1;
    let spec_file;
    let replicas_text;
    let args: Vec<&str> = match kind {
        OpKind::Put { key, value } | OpKind::Contend { key, value } => {
            if let OpKind::Contend { key, value } = kind {
                ledger
                    .contended
                    .entry(key.clone())
                    .or_default()
                    .insert(value.clone());
            }
            vec!["kv", "put", key, value]
        }
        OpKind::Deploy { service, replicas } => {
            spec_file = lab.path().join(format!("{service}.toml"));
            let spec = service_spec(lab, service, *replicas);
            if let Err(e) = std::fs::write(&spec_file, spec) {
                return format!("writing {}: {e}", spec_file.display());
            }
            vec!["deploy", spec_file.to_str().unwrap_or_default()]
        }
        OpKind::Scale { service, replicas } => {
            replicas_text = replicas.to_string();
            vec!["scale", service, &replicas_text]
        }
        OpKind::Remove { service } => vec!["rm", service],
    };
    let op = crate::schedule::Op {
        agent: to,
        kind: kind.clone(),
    };
    match lab.cli_within(to, &args, OP_TIMEOUT) {
        Ok(out) if out.status.success() => {
            if let OpKind::Put { key, value } = kind {
                ledger.acked.insert(key.clone(), value.clone());
            }
            format!("{op}: ok")
        }
        Ok(out) => {
            ledger.refused += 1;
            let err = String::from_utf8_lossy(&out.stderr);
            format!("{op}: refused: {}", err.lines().next().unwrap_or("").trim())
        }
        Err(e) => {
            ledger.refused += 1;
            format!("{op}: no answer: {e:#}")
        }
    }
}

/// The spec of a chaos service: real processes that reserve CPU, so capacity
/// matters, tagged with the lab so stray copies can be found on the host.
fn service_spec(lab: &Lab, service: &str, replicas: u32) -> String {
    format!(
        r#"name = "{service}"
driver = "process"
command = [{shoal:?}, "workload", "http", "--bind", "127.0.0.1", "--message", "{service}"]
replicas = {replicas}
restart = "always"
restart_backoff = "300ms"
reschedule_after = "3s"

[env]
SHOAL_LAB = "{tag}"

[resources]
cpu = "{REPLICA_CPU_MILLIS}m"
memory = "32Mi"

[[ports]]
name = "http"
container_port = 8080

[health]
tcp = "http"
interval = "1s"
"#,
        shoal = lab.shoal().display().to_string(),
        tag = lab.tag(),
    )
}

/// Whether agent `i` sees every member alive.
fn sees_all_alive(lab: &Lab, i: usize) -> bool {
    lab.view(i)
        .is_some_and(|v| v.len() == lab.agents.len() && v.iter().all(|(_, st)| st == "alive"))
}

/// Agent `i`'s keys under `chaos/`.
fn kv_of(lab: &Lab, i: usize) -> Option<BTreeMap<String, String>> {
    let v = lab.cli_json(i, &["kv", "ls", "chaos/"])?;
    Some(
        v.as_array()?
            .iter()
            .filter_map(|e| {
                Some((
                    e["key"].as_str()?.to_string(),
                    e["value"].as_str()?.to_string(),
                ))
            })
            .collect(),
    )
}

/// Acknowledged unique writes missing on some agent.
fn lost_writes(lab: &Lab, ledger: &Ledger) -> usize {
    let views: Vec<BTreeMap<String, String>> = (0..lab.agents.len())
        .map(|i| kv_of(lab, i).unwrap_or_default())
        .collect();
    ledger
        .acked
        .iter()
        .filter(|(k, v)| views.iter().any(|m| m.get(*k) != Some(v)))
        .count()
}

/// One service as an agent's `services -o json` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Svc {
    desired: u64,
    version: u64,
    removing: bool,
}

fn services_of(lab: &Lab, i: usize) -> Option<BTreeMap<String, Svc>> {
    let v = lab.cli_json(i, &["services"])?;
    Some(
        v.as_array()?
            .iter()
            .filter_map(|s| {
                Some((
                    s["name"].as_str()?.to_string(),
                    Svc {
                        desired: s["desired"].as_u64()?,
                        version: s["version"].as_u64()?,
                        removing: s["removing"].as_bool()?,
                    },
                ))
            })
            .collect(),
    )
}

/// Every invariant that does not hold yet on `lab`, one line each (empty: all
/// hold): membership whole, `ledger`'s writes everywhere, one value per key, one
/// services record, each live slot healthy and run by exactly one tagged process,
/// no tagged process that no slot names, no node over its CPU.
pub fn violations(lab: &Lab, ledger: &Ledger) -> Vec<String> {
    let n = lab.agents.len();
    let mut out = Vec::new();
    for i in 0..n {
        match lab.view(i) {
            Some(v) if v.len() == n && v.iter().all(|(_, st)| st == "alive") => {}
            Some(v) => {
                let shown: Vec<String> = v.iter().map(|(m, st)| format!("{m} {st}")).collect();
                out.push(format!("n{} sees {}", i + 1, shown.join(", ")));
            }
            None => out.push(format!("n{} did not answer nodes", i + 1)),
        }
    }
    if !out.is_empty() {
        return out;
    }

    // Data: every acknowledged write everywhere; every key one value everywhere.
    let views: Vec<Option<BTreeMap<String, String>>> = (0..n).map(|i| kv_of(lab, i)).collect();
    for (i, v) in views.iter().enumerate() {
        let Some(v) = v else {
            out.push(format!("n{} did not answer kv ls", i + 1));
            continue;
        };
        for (k, want) in &ledger.acked {
            if v.get(k) != Some(want) {
                out.push(format!(
                    "acknowledged write {k}={want} is {:?} on n{}",
                    v.get(k),
                    i + 1
                ));
            }
        }
    }
    for c in 0..CONTENDED_KEYS {
        let key = format!("chaos/c/{c}");
        let values: BTreeSet<Option<&String>> =
            views.iter().flatten().map(|v| v.get(&key)).collect();
        if values.len() > 1 {
            out.push(format!("{key} differs between agents: {values:?}"));
        }
        if let Some(Some(v)) = values.iter().next() {
            if !ledger.contended.get(&key).is_some_and(|s| s.contains(*v)) {
                out.push(format!("{key} = {v}, a value no client wrote"));
            }
        }
    }

    // Services: one record everywhere.
    let svcs: Vec<Option<BTreeMap<String, Svc>>> = (0..n).map(|i| services_of(lab, i)).collect();
    let Some(Some(first)) = svcs.first().cloned() else {
        out.push("n1 did not answer services".into());
        return out;
    };
    for (i, s) in svcs.iter().enumerate().skip(1) {
        if s.as_ref() != Some(&first) {
            out.push(format!("n{} sees services {s:?}, n1 sees {first:?}", i + 1));
        }
    }

    // Replicas: what n1 reports, and what really runs on the machine.
    let procs = lab.workloads();
    let mut running: BTreeMap<(String, u32), Vec<usize>> = BTreeMap::new();
    for w in &procs {
        running
            .entry((w.service.clone(), w.slot))
            .or_default()
            .push(w.agent.unwrap_or(usize::MAX));
    }
    let mut want_slots: BTreeSet<(String, u32)> = BTreeSet::new();
    for (name, svc) in &first {
        if svc.removing {
            continue;
        }
        let Some(ps) = lab.cli_json(0, &["ps", name]) else {
            out.push(format!("n1 did not answer ps {name}"));
            continue;
        };
        let rows = ps.as_array().cloned().unwrap_or_default();
        let healthy: BTreeSet<u32> = rows
            .iter()
            .filter(|r| r["state"] == "running" && r["healthy"] == true && r["next"] == false)
            .filter_map(|r| r["slot"].as_u64().map(|s| s as u32))
            .collect();
        if healthy.len() as u64 != svc.desired || rows.len() as u64 != svc.desired {
            let odd: Vec<String> = rows
                .iter()
                .filter(|r| !(r["state"] == "running" && r["healthy"] == true))
                .map(|r| {
                    format!(
                        "slot {} {} on {} ({}{})",
                        r["slot"],
                        r["alloc_id"].as_str().unwrap_or("-"),
                        r["node"].as_str().unwrap_or("-"),
                        r["state"].as_str().unwrap_or("?"),
                        r["reason"]
                            .as_str()
                            .map(|x| format!(": {x}"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            out.push(format!(
                "{name}: {} healthy of {} desired ({} rows){}{}",
                healthy.len(),
                svc.desired,
                rows.len(),
                if odd.is_empty() { "" } else { "; " },
                odd.join("; ")
            ));
        }
        want_slots.extend(healthy.into_iter().map(|s| (name.clone(), s)));
    }
    for (key, nodes) in &running {
        if !want_slots.contains(key) {
            out.push(format!(
                "{} slot {} runs on {} although no live slot names it",
                key.0,
                key.1,
                names(nodes)
            ));
        } else if nodes.len() != 1 {
            out.push(format!(
                "{} slot {} runs {} times ({})",
                key.0,
                key.1,
                nodes.len(),
                names(nodes)
            ));
        }
    }
    for key in &want_slots {
        if !running.contains_key(key) {
            out.push(format!(
                "{} slot {} is reported healthy but no process runs it",
                key.0, key.1
            ));
        }
    }

    // Capacity: what really runs on each node fits in it.
    let cpus: BTreeMap<String, u64> = lab
        .cli_json(0, &["nodes"])
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|n| {
            Some((
                n["name"].as_str()?.to_string(),
                n["resources"]["cpus"].as_u64()?,
            ))
        })
        .collect();
    for (i, a) in lab.agents.iter().enumerate() {
        let held = procs.iter().filter(|w| w.agent == Some(i)).count() as u64 * REPLICA_CPU_MILLIS;
        if let Some(c) = cpus.get(&a.name) {
            if held > c * 1000 {
                out.push(format!("{} runs {held}m of replicas on {c} cpus", a.name));
            }
        }
    }
    out
}

fn names(nodes: &[usize]) -> String {
    nodes
        .iter()
        .map(|&i| {
            if i == usize::MAX {
                "outside the lab".to_string()
            } else {
                format!("n{}", i + 1)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every agent's counters of frames and entries it dropped, of state it could
/// not persist, of orchestration passes and of queued work: what a failure's
/// investigation starts from.
fn drop_counters(lab: &Lab) -> String {
    (0..lab.agents.len())
        .map(|i| {
            let text = lab.metrics(i);
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| {
                    !l.starts_with('#')
                        && (l.starts_with("shoal_dropped_frames_total")
                            || l.starts_with("shoal_persist_errors_total")
                            || l.starts_with("shoal_swim_stuck_suspects_total")
                            || l.starts_with("shoal_steward_passes_total")
                            || l.starts_with("shoal_orchestration_pass_seconds_count")
                            || l.starts_with("shoal_allocations")
                            || (l.starts_with("shoal_channel_depth") && !l.ends_with(" 0")))
                })
                .collect();
            format!("n{} counters: {}", i + 1, lines.join(", "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The records (user and internal) on which the agents disagree: a key missing on
/// some agent, or held at different stamps. It tells an entry that did not
/// replicate from one that replicated but was not acted on.
fn state_diff(lab: &Lab) -> String {
    let n = lab.agents.len();
    let mut by_key: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    for i in 0..n {
        for args in [&["kv", "ls"][..], &["kv", "ls", "--internal"]] {
            let Some(v) = lab.cli_json(i, args) else {
                return format!("state diff: n{} did not answer kv ls", i + 1);
            };
            for e in v.as_array().cloned().unwrap_or_default() {
                let (Some(k), Some(w), Some(h)) =
                    (e["key"].as_str(), e["writer"].as_str(), e["hlc"].as_u64())
                else {
                    continue;
                };
                by_key.entry(k.to_string()).or_insert_with(|| vec![None; n])[i] =
                    Some(format!("{w}@{h}"));
            }
        }
    }
    let differ: Vec<String> = by_key
        .iter()
        .filter(|(_, v)| v.iter().any(|x| x != &v[0]))
        .map(|(k, v)| {
            let each: Vec<String> = v
                .iter()
                .enumerate()
                .map(|(i, x)| format!("n{}={}", i + 1, x.as_deref().unwrap_or("missing")))
                .collect();
            format!("  {k}: {}", each.join(" "))
        })
        .collect();
    let shown = differ.len().min(40);
    format!(
        "state diff: {} of {} records differ between agents{}\n{}",
        differ.len(),
        by_key.len(),
        if differ.len() > shown {
            " (first 40)"
        } else {
            ""
        },
        differ[..shown].join("\n")
    )
}

/// Copies every agent's whole log out of the lab (which is deleted) and says where.
fn kept_logs(lab: &Lab, seed: u64) -> String {
    let dir = std::env::temp_dir().join(format!("shoal-chaos-seed-{seed}"));
    if std::fs::create_dir_all(&dir).is_err() {
        return String::new();
    }
    for a in &lab.agents {
        let _ = std::fs::copy(&a.log, dir.join(format!("{}.log", a.name)));
    }
    format!("whole logs kept in {}\n", dir.display())
}

/// The last lines of every agent's log.
fn log_tails(lab: &Lab) -> String {
    (0..lab.agents.len())
        .map(|i| {
            let log = lab.log(i);
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            format!("--- n{}\n{tail}", i + 1)
        })
        .collect::<Vec<_>>()
        .join("\n")
}
