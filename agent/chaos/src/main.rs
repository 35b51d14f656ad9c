//! `shoal-chaos`: runs seeded chaos runs over real agents in network namespaces
//! and prints what each measured; a run whose invariants fail prints them with the
//! command that replays it, and the whole command then exits 1. Needs root and a
//! built `shoal` binary.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use shoal_chaos::{run, ChaosConfig, Schedule};

/// Seeded faults over real agents: partitions, loss, delay, kill -9, SIGSTOP, full disks.
#[derive(Parser)]
#[command(name = "shoal-chaos", version)]
struct Args {
    /// Runs, with seeds SEED, SEED+1, …
    #[arg(long, default_value_t = 1)]
    runs: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Agents per run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(2..=50))]
    agents: u64,
    /// Faults per run.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// How long each fault is held, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    hold_ms: u64,
    /// How long after the heal every invariant must hold, in seconds.
    #[arg(long, default_value_t = 120)]
    settle_s: u64,
    /// The shoal binary (default: `shoal` next to this one, e.g. target/release/shoal).
    #[arg(long)]
    shoal: Option<PathBuf>,
    /// Print each seed's faults and client operations, and run nothing.
    #[arg(long)]
    plan: bool,
}

/// Prints the schedules of the seeds `args` names, with a tally of fault kinds.
fn print_plans(args: &Args) {
    let mut kinds: BTreeMap<&'static str, usize> = BTreeMap::new();
    for seed in args.seed..args.seed.saturating_add(args.runs) {
        let plan = Schedule::generate(
            seed,
            args.agents as usize,
            args.steps,
            Duration::from_millis(args.hold_ms),
        );
        println!("seed {seed}:");
        for step in &plan.steps {
            let ops: Vec<String> = step.ops.iter().map(|o| o.to_string()).collect();
            println!("  {} — {}", step.fault, ops.join("; "));
        }
        for (kind, n) in plan.fault_kinds() {
            *kinds.entry(kind).or_default() += n;
        }
    }
    let by_kind: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!("faults by kind: {}", by_kind.join(", "));
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.plan {
        print_plans(&args);
        return ExitCode::SUCCESS;
    }
    let shoal = match args.shoal.clone().or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.parent()?.join("shoal")))
    }) {
        Some(p) if p.is_file() => p,
        other => {
            eprintln!(
                "error: no shoal binary at {}; build it first (cargo build --release -p shoal) or pass --shoal PATH",
                other.map(|p| p.display().to_string()).unwrap_or_default()
            );
            return ExitCode::from(2);
        }
    };
    let mut worst = Duration::ZERO;
    let (mut faults, mut ops, mut acked, mut refused) = (0, 0, 0, 0);
    let mut failed: Vec<u64> = Vec::new();
    let mut kinds: BTreeMap<&'static str, usize> = BTreeMap::new();
    for seed in args.seed..args.seed.saturating_add(args.runs) {
        let cfg = ChaosConfig {
            shoal: shoal.clone(),
            agents: args.agents as usize,
            seed,
            steps: args.steps,
            hold: Duration::from_millis(args.hold_ms),
            settle: Duration::from_secs(args.settle_s),
        };
        match run(&cfg) {
            Ok(r) => {
                println!(
                    "seed {seed}: ok — {} faults, {} ops ({} refused), {} writes acknowledged, {} lost, converged {:.1}s after the heal",
                    r.faults,
                    r.ops,
                    r.ops_refused,
                    r.writes_acked,
                    r.writes_lost,
                    r.converged.as_secs_f64()
                );
                worst = worst.max(r.converged);
                faults += r.faults;
                for (kind, n) in &r.fault_kinds {
                    *kinds.entry(kind).or_default() += n;
                }
                ops += r.ops;
                acked += r.writes_acked;
                refused += r.ops_refused;
            }
            Err(f) => {
                eprintln!("{f}");
                println!(
                    "seed {seed}: FAILED — {}",
                    f.what.lines().nth(1).unwrap_or("")
                );
                failed.push(seed);
            }
        }
    }
    let by_kind: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "{} runs, {} passed: {faults} faults injected ({}), {ops} client ops ({refused} refused), {acked} writes acknowledged, 0 lost, worst convergence {:.1}s after the heal",
        args.runs,
        args.runs as usize - failed.len(),
        by_kind.join(", "),
        worst.as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failed seeds (each printed its replay command): {failed:?}");
        ExitCode::FAILURE
    }
}
