//! `shoal bench footprint`: what idle agents cost — CPU, resident memory, bytes
//! sent — with the CPU split by thread name, so idle work can be traced to its
//! owner (tokio workers, persister, blob worker, orchestration, DNS, …).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::future::join_all;

use super::{bytes_out, cpu_ticks, rss_bytes, Mesh};

/// Options of `shoal bench footprint`.
#[derive(Debug, clap::Args)]
pub struct FootprintBenchArgs {
    /// Agents in the mesh (agent 0 is the one the others join through).
    #[arg(long, default_value_t = 50)]
    pub agents: usize,
    /// Seconds to let the mesh settle after everyone sees everyone.
    #[arg(long, default_value_t = 15)]
    pub settle_secs: u64,
    /// Seconds of idleness measured.
    #[arg(long, default_value_t = 30)]
    pub idle_secs: u64,
    /// First port, as for `bench mesh`.
    #[arg(long, default_value_t = 24001)]
    pub base_port: u16,
}

/// CPU ticks of every thread of `pid`, by thread name.
fn thread_ticks(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = rest
            .get(11)
            .and_then(|u| u.parse::<u64>().ok())
            .unwrap_or(0)
            + rest
                .get(12)
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0);
        *out.entry(name).or_default() += ticks;
    }
    out
}

/// Resident memory of `pid` split in two, in bytes: anonymous (heap, stacks: this
/// agent's own) and file-backed (the binary's and libraries' pages, which every
/// agent on a machine maps from the same page cache).
fn rss_split(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    let rss = field("Rss:")?;
    let anon = field("Anonymous:")?;
    Some((anon, rss.saturating_sub(anon)))
}

/// Runs the benchmark and prints its table.
pub async fn run_footprint(args: FootprintBenchArgs) -> anyhow::Result<()> {
    if args.agents < 2 {
        bail!("--agents must be at least 2");
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mesh = Mesh::start(args.agents, args.base_port).await?;
    println!(
        "{} agents see each other after {:.1}s; settling {}s, then measuring {}s idle",
        args.agents,
        mesh.membership.as_secs_f64(),
        args.settle_secs,
        args.idle_secs
    );
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let pids: Vec<u32> = mesh.procs.0.iter().map(|c| c.id()).collect();
    let http = reqwest::Client::new();
    let sent = |http: reqwest::Client| {
        let apis = mesh.apis.clone();
        async move {
            join_all(apis.iter().map(|a| bytes_out(&http, *a)))
                .await
                .into_iter()
                .map(|b| b.unwrap_or(0.0))
                .collect::<Vec<f64>>()
        }
    };
    let ticks0: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).collect();
    let threads0: Vec<BTreeMap<String, u64>> = pids.iter().map(|p| thread_ticks(*p)).collect();
    let bytes0 = sent(http.clone()).await;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let secs = t0.elapsed().as_secs_f64();
    let ticks1: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).collect();
    let threads1: Vec<BTreeMap<String, u64>> = pids.iter().map(|p| thread_ticks(*p)).collect();
    let bytes1 = sent(http).await;
    let rss: Vec<u64> = pids.iter().map(|p| rss_bytes(*p).unwrap_or(0)).collect();
    let split: Vec<(u64, u64)> = pids
        .iter()
        .map(|p| rss_split(*p).unwrap_or((0, 0)))
        .collect();

    let cpu: Vec<f64> = ticks0
        .iter()
        .zip(&ticks1)
        .map(|(a, b)| (b.saturating_sub(*a)) as f64 / hz / secs * 100.0)
        .collect();
    let kbps: Vec<f64> = bytes0
        .iter()
        .zip(&bytes1)
        .map(|(a, b)| (b - a).max(0.0) * 8.0 / 1000.0 / secs)
        .collect();
    let n = args.agents as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n;
    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let rss_others: Vec<f64> = rss[1..].iter().map(|b| mib(*b)).collect();
    println!("| | mean | max | agent 0 (the seed) |");
    println!("|---|---|---|---|");
    println!(
        "| CPU, % of one core | {:.2} | {:.2} | {:.2} |",
        mean(&cpu),
        max(&cpu),
        cpu[0]
    );
    println!(
        "| resident memory, MiB | {:.1} | {:.1} | {:.1} |",
        rss_others.iter().sum::<f64>() / (n - 1.0),
        rss_others.iter().cloned().fold(0.0, f64::max),
        mib(rss[0])
    );
    for (label, part) in [
        ("of it anonymous (heap, stacks)", 0),
        ("of it file-backed (binary, libraries)", 1),
    ] {
        let v: Vec<f64> = split[1..]
            .iter()
            .map(|s| mib(if part == 0 { s.0 } else { s.1 }))
            .collect();
        let seed = if part == 0 { split[0].0 } else { split[0].1 };
        println!(
            "| {label}, MiB | {:.1} | {:.1} | {:.1} |",
            v.iter().sum::<f64>() / (n - 1.0),
            v.iter().cloned().fold(0.0, f64::max),
            mib(seed)
        );
    }
    println!(
        "| sent, kbit/s | {:.1} | {:.1} | {:.1} |",
        mean(&kbps),
        max(&kbps),
        kbps[0]
    );

    // Where the CPU went, summed over every agent, by thread name.
    let mut by_thread: BTreeMap<String, u64> = BTreeMap::new();
    for (before, after) in threads0.iter().zip(&threads1) {
        for (name, t) in after {
            let d = t.saturating_sub(before.get(name).copied().unwrap_or(0));
            *by_thread.entry(name.clone()).or_default() += d;
        }
    }
    let total: u64 = by_thread.values().sum();
    let mut rows: Vec<(String, u64)> = by_thread.into_iter().filter(|(_, t)| *t > 0).collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    println!("\nidle CPU by thread (all agents), % of one core per agent:");
    for (name, t) in rows.iter().take(12) {
        println!(
            "  {name:<18} {:.3}  ({:.0}% of the total)",
            *t as f64 / hz / secs * 100.0 / n,
            *t as f64 * 100.0 / total.max(1) as f64
        );
    }
    drop(mesh);
    Ok(())
}
