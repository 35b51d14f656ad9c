//! `shoal-sim detect`: how fast a crashed node is declared down everywhere, and
//! how many live nodes are declared down by mistake, under loss and with a node
//! stopped (SIGSTOP) for a while. Runs the agents' own cores (SWIM, Lifeguard).

use std::process::ExitCode;
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use shoal_sim::{Sim, SimConfig};

/// Arguments of `shoal-sim detect`.
#[derive(clap::Args)]
pub struct DetectArgs {
    /// Cluster size.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Nodes crashed one after another (each once everyone saw the last one down).
    #[arg(long, default_value_t = 10)]
    crashes: usize,
    /// Probability that a datagram is lost, 0..=1.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Before the crashes, stop one node this many ms (0: none), as SIGSTOP does.
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    /// Virtual seconds watched for false alarms before the crashes.
    #[arg(long, default_value_t = 30)]
    watch_secs: u64,
    /// Seed of the first run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs, each a fresh cluster (seeds seed..seed+runs); the summary covers all.
    #[arg(long, default_value_t = 1)]
    runs: u64,
}

/// What one run measured.
struct Run {
    /// Virtual ms from each crash to `down` on every live node.
    everywhere: Vec<u64>,
    /// Live nodes declared down, one line each.
    false_downs: Vec<String>,
}

/// Warm-up limit: every node knows every other by then.
const WARMUP_MS: u64 = 300_000;
/// A crash not seen down everywhere by then fails the run.
const DETECT_LIMIT_MS: u64 = 60_000;

/// Runs `shoal-sim detect` and prints a markdown report.
pub fn run(args: &DetectArgs) -> ExitCode {
    if args.nodes < 3 || args.nodes > shoal_sim::MAX_NODES || args.crashes >= args.nodes - 1 {
        eprintln!(
            "--nodes must be 3..={} and --crashes fewer than nodes - 1",
            shoal_sim::MAX_NODES
        );
        return ExitCode::FAILURE;
    }
    if !(0.0..=1.0).contains(&args.loss) {
        eprintln!("--loss must be a probability (0..=1), got {}", args.loss);
        return ExitCode::FAILURE;
    }
    let wall = Instant::now();
    println!("| seed | crash | first `down` (s) | `down` on every live node (s) |");
    println!("|---|---|---|---|");
    let mut all = Vec::new();
    let mut false_downs = Vec::new();
    for seed in args.seed..args.seed + args.runs.max(1) {
        match one_run(args, seed) {
            Ok(r) => {
                all.extend(r.everywhere);
                false_downs.extend(r.false_downs);
            }
            Err(e) => {
                eprintln!("seed {seed}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    all.sort_unstable();
    let q = |p: f64| all[((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1];
    println!(
        "\n{} nodes, loss {:.0}%{}, {} runs from seed {}, {} crashes: `down` everywhere median {:.2} s, \
         p99 {:.2} s, max {:.2} s; {} false `down` events; {:.0} s wall",
        args.nodes,
        args.loss * 100.0,
        if args.pause_ms > 0 {
            format!(", one node stopped {} ms", args.pause_ms)
        } else {
            String::new()
        },
        args.runs.max(1),
        args.seed,
        all.len(),
        q(0.5) as f64 / 1000.0,
        q(0.99) as f64 / 1000.0,
        all[all.len() - 1] as f64 / 1000.0,
        false_downs.len(),
        wall.elapsed().as_secs_f64()
    );
    for f in false_downs.iter().take(20) {
        println!("false alarm: {f}");
    }
    if false_downs.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn one_run(args: &DetectArgs, seed: u64) -> Result<Run, String> {
    let n = args.nodes;
    let mut sim = Sim::new(SimConfig {
        datagram_loss: args.loss,
        check_every_ms: 10,
        ..SimConfig::new(n, seed)
    });
    sim.join_all();
    sim.run_until(|s| s.min_view() >= n, WARMUP_MS)
        .map_err(|e| format!("membership did not converge: {e}"))?;
    sim.run_for(10_000);
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xdec7);
    let mut crashed: Vec<String> = Vec::new();
    let watched_from = sim.downs().len();
    if args.pause_ms > 0 {
        let p = rng.random_range(1..n);
        sim.pause(p, args.pause_ms);
    }
    sim.run_for(args.watch_secs * 1000);
    let mut all = Vec::new();
    for k in 0..args.crashes {
        let victim = loop {
            let v = rng.random_range(1..n);
            if sim.is_live(v) {
                break v;
            }
        };
        let name = sim.node(victim).name().to_string();
        crashed.push(name.clone());
        let (t0, from) = (sim.now(), sim.downs().len());
        sim.crash(victim);
        let live = sim.live_count();
        let done = sim.step_until(t0 + DETECT_LIMIT_MS, |s| {
            let mut seen = vec![false; s.len()];
            s.downs()[from..]
                .iter()
                .filter(|d| d.member == name)
                .for_each(|d| seen[d.observer] = true);
            (0..s.len()).filter(|&i| seen[i] && s.is_live(i)).count() == live
        });
        if !done {
            return Err(format!(
                "crash {k} ({name}) not seen down everywhere within {} s",
                DETECT_LIMIT_MS / 1000
            ));
        }
        let first = sim.downs()[from..]
            .iter()
            .find(|d| d.member == name)
            .map_or(0, |d| d.at - t0);
        let every = sim.now() - t0;
        println!(
            "| {seed} | {name} | {:.2} | {:.2} |",
            first as f64 / 1000.0,
            every as f64 / 1000.0
        );
        all.push(every);
        sim.run_for(2_000);
    }
    let false_downs = sim.downs()[watched_from..]
        .iter()
        .filter(|d| !crashed.contains(&d.member))
        .map(|d| {
            format!(
                "seed {seed}: n{} declared {} down at {} ms",
                d.observer, d.member, d.at
            )
        })
        .collect();
    Ok(Run {
        everywhere: all,
        false_downs,
    })
}
