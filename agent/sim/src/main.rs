//! `shoal-sim bench`: how fast one change reaches every node, and what it costs.
//!
//! For each cluster size it runs the deterministic simulator in static-peer
//! mode (replication alone) and, up to `--swim-max` nodes, with full SWIM
//! membership; puts one change on a random node after warm-up; and reports
//! the virtual time until 99%, 99.9% and 100% of nodes hold it, the bytes per
//! second each agent sends while it spreads, and the background rate of an
//! idle cluster. Medians over `--runs` seeds.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

mod detect;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;
use shoal_sim::{needed, FrameKind, Sim, SimConfig};

#[derive(Parser)]
#[command(name = "shoal-sim", about = "Deterministic simulator for shoal cores")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure convergence time and bandwidth of one change.
    Bench(BenchArgs),
    /// Measure failure detection: crash nodes one by one and time until every
    /// live node sees each down; count live nodes declared down by mistake.
    Detect(detect::DetectArgs),
    /// Measure kill-to-healthy-elsewhere: crash a node running replicas and time
    /// until every replica is healthy on other nodes.
    Reschedule(RescheduleArgs),
}

#[derive(clap::Args)]
struct RescheduleArgs {
    /// Cluster size.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Replicas of the service (spread over nodes).
    #[arg(long, default_value_t = 100)]
    replicas: u32,
    /// The service's reschedule_after, in ms.
    #[arg(long, default_value_t = 0)]
    reschedule_after_ms: u64,
    /// Virtual ms from an allocation being seen to it reporting healthy.
    #[arg(long, default_value_t = 500)]
    start_delay_ms: u64,
    /// Runs (seeds seed..seed+runs); the report shows each and the median.
    #[arg(long, default_value_t = 3)]
    runs: u64,
    /// Seed of the first run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Cluster sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    nodes: Vec<usize>,
    /// Seed of the first run; run r uses seed + r.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs per configuration; the report shows medians.
    #[arg(long, default_value_t = 3)]
    runs: u64,
    /// Largest size also run with full SWIM membership (foca in every node).
    #[arg(long, default_value_t = 1000)]
    swim_max: usize,
    /// Virtual seconds of idle cluster over which the background rate is measured.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Virtual seconds between warm-up and the idle window. SWIM keeps piggybacking
    /// the N join updates (each up to max_transmissions times per node) for a while
    /// after everyone knows everyone; a short settle measures that tail, not idle.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Per-frame latency range in ms, MIN,MAX (uniform).
    #[arg(long, default_value = "1,5", value_parser = parse_range)]
    latency_ms: (u64, u64),
    /// Print JSON instead of a markdown table.
    #[arg(long)]
    json: bool,
}

/// Virtual ms to wait for the change to reach everyone before giving up.
const SPREAD_TIMEOUT_MS: u64 = 120_000;
/// Warm-up limit for SWIM: every node should know 99% of the cluster by then.
const SWIM_WARMUP_MS: u64 = 120_000;
/// After the put, how long push retransmits are counted.
const RUMOR_LIFE_MS: u64 = 5_000;

#[derive(Debug, Clone)]
struct RunResult {
    t99: Option<u64>,
    t999: Option<u64>,
    t100: Option<u64>,
    /// kbit/s per agent, all frames, from the put until 99.9% held it.
    spread_kbps: f64,
    /// kbit/s per agent, push frames only, same window.
    spread_push_kbps: f64,
    /// Push bytes per agent for the whole life of the change (retransmits included).
    push_bytes_per_agent: f64,
    /// kbit/s per agent while idle, by kind.
    idle_swim_kbps: f64,
    idle_sync_kbps: f64,
    /// Virtual ms of warm-up and the smallest membership view after it.
    warmup_ms: u64,
    min_view: usize,
    wall_s: f64,
}

fn kbps(bytes: u64, nodes: usize, ms: u64) -> f64 {
    if ms == 0 || nodes == 0 {
        return 0.0;
    }
    bytes as f64 * 8.0 / nodes as f64 / ms as f64 // bits per ms = kbit/s
}

fn one_run(nodes: usize, static_peers: bool, seed: u64, args: &BenchArgs) -> RunResult {
    let started = Instant::now();
    let cfg = SimConfig {
        static_peers,
        latency_ms: args.latency_ms,
        ..SimConfig::new(nodes, seed)
    };
    let mut sim = Sim::new(cfg);
    sim.join_all();
    let warm_start = sim.now();
    if !static_peers {
        let want = needed(0.99, nodes);
        // A slow warm-up is reported (min_view), not fatal.
        let _ = sim.run_until(|s| s.min_view() >= want, SWIM_WARMUP_MS);
    }
    sim.run_for(args.settle_secs * 1000);
    let warmup_ms = sim.now() - warm_start;
    let min_view = sim.min_view();

    let idle_ms = args.idle_secs * 1000;
    let before = sim.net_stats().clone();
    sim.run_for(idle_ms);
    let after = sim.net_stats().clone();
    let idle = |k: FrameKind| kbps(after.bytes(k) - before.bytes(k), nodes, idle_ms);
    let (idle_swim_kbps, idle_sync_kbps) = (idle(FrameKind::Swim), idle(FrameKind::Sync));

    let mut pick = SmallRng::seed_from_u64(seed ^ 0xbe7c);
    let origin = pick.random_range(0..nodes);
    let value = vec![0x5a; 64];
    sim.watch("bench/change", &value);
    sim.set_check_every(1);
    let put_at = sim.now();
    let at_put = sim.net_stats().clone();
    if let Err(e) = sim.put(origin, "bench/change", &value) {
        panic!("bench put refused: {e}");
    }
    let need999 = needed(0.999, nodes);
    let reached = sim.step_until(put_at + SPREAD_TIMEOUT_MS, |s| s.watch_count() >= need999);
    let window = sim.now() - put_at;
    let at999 = sim.net_stats().clone();
    if reached {
        sim.step_until(put_at + SPREAD_TIMEOUT_MS, |s| s.watch_count() >= nodes);
    }
    // Rumors live ~ceil(2·log10 N) gossip ticks; by then every retransmit is out.
    sim.run_for((put_at + RUMOR_LIFE_MS).saturating_sub(sim.now()));
    let push_total = sim.net_stats().bytes(FrameKind::Push) - at_put.bytes(FrameKind::Push);
    RunResult {
        t99: sim.watch_time_to(0.99),
        t999: sim.watch_time_to(0.999),
        t100: sim.watch_time_to(1.0),
        spread_kbps: kbps(at999.total_bytes() - at_put.total_bytes(), nodes, window),
        spread_push_kbps: kbps(
            at999.bytes(FrameKind::Push) - at_put.bytes(FrameKind::Push),
            nodes,
            window,
        ),
        push_bytes_per_agent: push_total as f64 / nodes as f64,
        idle_swim_kbps,
        idle_sync_kbps,
        warmup_ms,
        min_view,
        wall_s: started.elapsed().as_secs_f64(),
    }
}

/// Runs every seed, at most as many at once as there are cores.
fn runs(nodes: usize, static_peers: bool, args: &BenchArgs) -> Vec<RunResult> {
    let seeds: Vec<u64> = (0..args.runs).map(|r| args.seed + r).collect();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = Vec::with_capacity(seeds.len());
    for batch in seeds.chunks(workers.max(1)) {
        std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .iter()
                .map(|&seed| s.spawn(move || one_run(nodes, static_peers, seed, args)))
                .collect();
            for h in handles {
                match h.join() {
                    Ok(r) => out.push(r),
                    Err(_) => {
                        panic!("a benchmark run panicked (nodes {nodes}, static {static_peers})")
                    }
                }
            }
        });
    }
    out
}

/// Parses `MIN,MAX` with MIN <= MAX.
fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (lo, hi) = s
        .split_once(',')
        .ok_or_else(|| format!("expected MIN,MAX, got {s:?}"))?;
    let num = |v: &str| v.trim().parse::<u64>().map_err(|e| format!("{v:?}: {e}"));
    let (lo, hi) = (num(lo)?, num(hi)?);
    if lo > hi {
        return Err(format!("MIN {lo} exceeds MAX {hi}"));
    }
    Ok((lo, hi))
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Median of optional times; a run that never got there counts as infinitely slow.
fn median_t(v: impl Iterator<Item = Option<u64>>) -> Option<u64> {
    let mut v: Vec<u64> = v.map(|t| t.unwrap_or(u64::MAX)).collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied().filter(|&t| t != u64::MAX)
}

struct Row {
    mode: &'static str,
    nodes: usize,
    runs: Vec<RunResult>,
}

impl Row {
    fn t(&self, f: impl Fn(&RunResult) -> Option<u64>) -> Option<u64> {
        median_t(self.runs.iter().map(f))
    }
    fn m(&self, f: impl Fn(&RunResult) -> f64) -> f64 {
        median_f(self.runs.iter().map(f).collect())
    }
}

fn fmt_t(t: Option<u64>) -> String {
    t.map_or_else(|| "timeout".to_string(), |t| t.to_string())
}

fn main() -> ExitCode {
    let args = match Cli::parse().cmd {
        Cmd::Bench(args) => args,
        Cmd::Reschedule(args) => return reschedule(&args),
        Cmd::Detect(args) => return detect::run(&args),
    };
    let total = Instant::now();
    let mut rows = Vec::new();
    let (lo, hi) = args.latency_ms;
    for &n in &args.nodes {
        if !(2..=shoal_sim::MAX_NODES).contains(&n) {
            eprintln!(
                "--nodes: every size must be 2..={}, got {n}",
                shoal_sim::MAX_NODES
            );
            return ExitCode::FAILURE;
        }
        rows.push(Row {
            mode: "static",
            nodes: n,
            runs: runs(n, true, &args),
        });
        if n <= args.swim_max {
            rows.push(Row {
                mode: "swim",
                nodes: n,
                runs: runs(n, false, &args),
            });
        }
    }
    let model = SimConfig {
        latency_ms: (lo, hi),
        ..SimConfig::new(0, args.seed)
    }
    .describe();
    let model = model.trim_end_matches(", SWIM membership");
    if args.json {
        let out: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "mode": r.mode,
                    "nodes": r.nodes,
                    "runs": r.runs.len(),
                    "t99_ms": r.t(|x| x.t99),
                    "t999_ms": r.t(|x| x.t999),
                    "t100_ms": r.t(|x| x.t100),
                    "spread_kbit_s_per_agent": r.m(|x| x.spread_kbps),
                    "spread_push_kbit_s_per_agent": r.m(|x| x.spread_push_kbps),
                    "push_bytes_per_agent_per_change": r.m(|x| x.push_bytes_per_agent),
                    "idle_swim_kbit_s_per_agent": r.m(|x| x.idle_swim_kbps),
                    "idle_sync_kbit_s_per_agent": r.m(|x| x.idle_sync_kbps),
                    "warmup_ms": r.m(|x| x.warmup_ms as f64),
                    "min_view": r.m(|x| x.min_view as f64),
                    "wall_s_per_run": r.m(|x| x.wall_s),
                })
            })
            .collect();
        let doc = json!({
            "model": model,
            "seed": args.seed,
            "runs": args.runs,
            "results": out,
            "wall_s": total.elapsed().as_secs_f64(),
        });
        println!("{doc:#}");
        return ExitCode::SUCCESS;
    }
    println!("Network model: {model}. One 64-byte change put on a random node after warm-up;");
    println!(
        "times are virtual ms from the put; bandwidth is kbit/s sent per agent. Medians of {} run(s), seeds {}..{}.",
        args.runs,
        args.seed,
        args.seed + args.runs.saturating_sub(1)
    );
    println!();
    println!("| mode | nodes | 99% ms | 99.9% ms | 100% ms | spread kbit/s (all / push) | push B/agent | idle kbit/s (swim / sync) | min view | wall s/run |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.1} / {:.1} | {:.0} | {:.1} / {:.1} | {} | {:.1} |",
            r.mode,
            r.nodes,
            fmt_t(r.t(|x| x.t99)),
            fmt_t(r.t(|x| x.t999)),
            fmt_t(r.t(|x| x.t100)),
            r.m(|x| x.spread_kbps),
            r.m(|x| x.spread_push_kbps),
            r.m(|x| x.push_bytes_per_agent),
            r.m(|x| x.idle_swim_kbps),
            r.m(|x| x.idle_sync_kbps),
            if r.mode == "static" {
                "-".to_string()
            } else {
                format!("{:.0}", r.m(|x| x.min_view as f64))
            },
            r.m(|x| x.wall_s),
        );
    }
    println!();
    println!("total wall time {:.1} s", total.elapsed().as_secs_f64());
    ExitCode::SUCCESS
}

/// Orchestration step of the reschedule bench (virtual ms).
const ORCH_STEP_MS: u64 = 100;

fn reschedule(args: &RescheduleArgs) -> ExitCode {
    if args.nodes < 3 || args.nodes > shoal_sim::MAX_NODES || args.replicas == 0 {
        eprintln!(
            "--nodes must be 3..={} and --replicas at least 1",
            shoal_sim::MAX_NODES
        );
        return ExitCode::FAILURE;
    }
    println!(
        "| nodes | replicas | reschedule_after | crashed node ran | seen down by steward (s) | all healthy elsewhere (s) | wall (s) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut totals = Vec::new();
    for r in 0..args.runs {
        let seed = args.seed + r;
        let wall = Instant::now();
        match reschedule_run(args, seed) {
            Ok((lost, seen, done)) => {
                println!(
                    "| {} | {} | {} ms | {lost} replicas | {:.2} | {:.2} | {:.0} |",
                    args.nodes,
                    args.replicas,
                    args.reschedule_after_ms,
                    seen as f64 / 1000.0,
                    done as f64 / 1000.0,
                    wall.elapsed().as_secs_f64()
                );
                totals.push(done);
            }
            Err(e) => {
                eprintln!("seed {seed}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    totals.sort_unstable();
    println!(
        "\nmedian kill -9 to all replicas healthy elsewhere: {:.2} s (virtual time)",
        totals[totals.len() / 2] as f64 / 1000.0
    );
    ExitCode::SUCCESS
}

/// One run: (replicas the crashed node ran, ms until the steward saw it down,
/// ms until every replica was healthy elsewhere).
fn reschedule_run(args: &RescheduleArgs, seed: u64) -> Result<(u32, u64, u64), String> {
    use shoal_sim::orch::OrchSim;
    let n = args.nodes;
    let mut sim = Sim::new(SimConfig::new(n, seed));
    sim.join_all();
    sim.run_until(|s| s.min_view() >= n, SWIM_WARMUP_MS)
        .map_err(|e| format!("membership did not converge: {e}"))?;
    let capacity = shoal_policy_logic::Resources {
        cpu_millis: 4000,
        memory_bytes: 8 << 30,
        disk_bytes: 0,
    };
    let mut o = OrchSim::new(sim, capacity, args.start_delay_ms);
    let text = format!(
        "name = \"web\"\ndriver = \"process\"\ncommand = [\"web\"]\nreplicas = {}\nreschedule_after = \"{}ms\"\n[resources]\ncpu = \"100m\"\nmemory = \"64Mi\"\n[scheduler]\nstrategy = \"spread\"\n",
        args.replicas, args.reschedule_after_ms
    );
    let spec = shoal_orch::ServiceSpec::from_toml("web.toml", &text).map_err(|e| e.to_string())?;
    o.deploy(0, spec);
    let want = args.replicas;
    o.run_until(ORCH_STEP_MS, 60_000, |o| {
        o.steward("web")
            .is_some_and(|s| o.healthy_seen_by(s, "web", "").0 == want)
    })
    .ok_or("the service never became healthy")?;
    // Crash a node that runs a replica and is not the steward.
    let steward = o.steward("web").ok_or("no steward")?;
    let mut pick = SmallRng::seed_from_u64(seed ^ 0x7e5c);
    let victim = loop {
        let v = pick.random_range(0..n);
        let name = o.name(v).to_string();
        if v != steward && o.healthy_seen_by(steward, "web", &name).1 {
            break v;
        }
    };
    let victim_name = o.name(victim).to_string();
    let lost = {
        let before = o.healthy_seen_by(steward, "web", "").0;
        o.sim.crash(victim);
        let after_crash = o.healthy_seen_by(steward, "web", "").0;
        before - after_crash
    };
    let mut seen = None;
    let done = o
        .run_until(ORCH_STEP_MS, 600_000, |o| {
            let Some(s) = o.steward("web") else {
                return false;
            };
            if seen.is_none()
                && matches!(
                    o.status_seen_by(s, &victim_name),
                    Some(
                        shoal_policy_logic::NodeStatus::Down | shoal_policy_logic::NodeStatus::Left
                    )
                )
            {
                seen = Some(o.sim.now());
            }
            let (healthy, on_victim) = o.healthy_seen_by(s, "web", &victim_name);
            healthy == want && !on_victim
        })
        .ok_or("replicas were not replaced within 600 s")?;
    let crash_at = o.sim.now() - done;
    Ok((lost, seen.map_or(done, |t| t - crash_at), done))
}
