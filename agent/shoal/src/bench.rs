//! `shoal bench mesh`: real agent processes on loopback, measured from outside.
//!
//! For each size N it starts N `shoal agent` processes (a throwaway CA, every
//! agent joining the first), then measures: how long until every agent sees
//! all N alive; how long a `kv put` on one agent takes to be readable on all N
//! (every agent's API polled concurrently, so resolution is one poll round);
//! and the steady-state bytes each agent sends per second with no changes.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::future::join_all;

use crate::client::{table, Client};

/// Options of `shoal bench mesh`.
#[derive(Debug, clap::Args)]
pub struct MeshBenchArgs {
    /// Cluster sizes to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "5,20,50")]
    pub agents: Vec<usize>,
    /// Changes timed per size (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub changes: usize,
    /// First port; agent i uses base+i (QUIC) and base+1000+i (API).
    #[arg(long, default_value_t = 27001)]
    pub base_port: u16,
    /// Seconds of idle traffic measured per size.
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

async fn bytes_out(http: &reqwest::Client, api: SocketAddr) -> Option<f64> {
    let text = http
        .get(format!("http://{api}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("shoal_bytes_out_total "))
        .and_then(|v| v.trim().parse().ok())
}

struct Row {
    n: usize,
    membership: Duration,
    change: Duration,
    change_max: Duration,
    idle_bps: f64,
}

async fn measure(n: usize, args: &MeshBenchArgs) -> anyhow::Result<Row> {
    let dir = tempfile::Builder::new().prefix("shoal-bench-").tempdir()?;
    let ca = dir.path().join("ca");
    shoal_net::init_ca(&ca)?;
    let exe = std::env::current_exe().context("locating the shoal binary")?;
    let quic = |i: usize| SocketAddr::from(([127, 0, 0, 1], args.base_port + i as u16));
    let api = |i: usize| SocketAddr::from(([127, 0, 0, 1], args.base_port + 1000 + i as u16));
    let start = Instant::now();
    let mut procs = Procs(Vec::new());
    for i in 0..n {
        let log = std::fs::File::create(dir.path().join(format!("n{i}.log")))?;
        let mut cmd = Command::new(&exe);
        cmd.args(["agent", "--name", &format!("n{i}")])
            .args([
                "--listen",
                &quic(i).to_string(),
                "--api",
                &api(i).to_string(),
            ])
            .arg("--data-dir")
            .arg(dir.path().join(format!("n{i}")))
            .arg("--ca-dir")
            .arg(&ca)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        if i > 0 {
            cmd.args(["--join", &quic(0).to_string()]);
        }
        procs.0.push(cmd.spawn().context("starting an agent")?);
    }
    let clients: Vec<Client> = (0..n)
        .map(|i| Client::new(&api(i).to_string()))
        .collect::<anyhow::Result<_>>()?;

    // Membership: every agent sees n alive.
    let deadline = start + Duration::from_secs(120);
    loop {
        for (i, c) in procs.0.iter_mut().enumerate() {
            if let Some(st) = c.try_wait()? {
                bail!("agent n{i} exited with {st}; see {}", dir.path().display());
            }
        }
        let views = join_all(clients.iter().map(|c| c.nodes())).await;
        let done = views.iter().all(|v| {
            v.as_ref()
                .is_ok_and(|nodes| nodes.iter().filter(|x| x.status == "alive").count() == n)
        });
        if done {
            break;
        }
        if Instant::now() > deadline {
            bail!("{n} agents did not converge within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let membership = start.elapsed();

    // Changes: put on agent k, poll all until every one has it.
    let mut times = Vec::new();
    for round in 0..args.changes {
        let k = (round * 7 + 3) % n;
        let key = format!("bench/{round}");
        let t0 = Instant::now();
        clients[k].kv_put(&key, "v").await?;
        loop {
            let got = join_all(clients.iter().map(|c| c.kv_get(&key))).await;
            if got.iter().all(Result::is_ok) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("change {round} did not reach all {n} agents within 60 s");
            }
        }
        times.push(t0.elapsed());
    }
    let change_max = times.iter().max().copied().unwrap_or_default();
    let change = median(times);

    // Idle traffic: bytes sent per agent per second with no changes.
    let http = reqwest::Client::new();
    let sum = |v: Vec<Option<f64>>| v.into_iter().map(|x| x.unwrap_or(0.0)).sum::<f64>();
    let before = sum(join_all((0..n).map(|i| bytes_out(&http, api(i)))).await);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let after = sum(join_all((0..n).map(|i| bytes_out(&http, api(i)))).await);
    let idle_bps = (after - before) / t0.elapsed().as_secs_f64() / n as f64;
    drop(procs);
    Ok(Row {
        n,
        membership,
        change,
        change_max,
        idle_bps,
    })
}

/// Runs the loopback mesh benchmark and prints a markdown table.
pub async fn run(args: MeshBenchArgs) -> anyhow::Result<()> {
    if args.agents.iter().any(|&n| n == 0 || n > 500) {
        bail!("--agents sizes must be between 1 and 500");
    }
    let mut rows = Vec::new();
    for &n in &args.agents {
        eprintln!("measuring {n} agents...");
        let r = measure(n, &args).await?;
        rows.push(vec![
            r.n.to_string(),
            format!("{:.2} s", r.membership.as_secs_f64()),
            format!("{:.0} ms", r.change.as_secs_f64() * 1e3),
            format!("{:.0} ms", r.change_max.as_secs_f64() * 1e3),
            format!("{:.1} kbit/s", r.idle_bps * 8.0 / 1e3),
        ]);
    }
    println!(
        "{}",
        table(
            &[
                "AGENTS",
                "ALL SEE ALL ALIVE",
                "CHANGE TO ALL (MEDIAN)",
                "CHANGE TO ALL (MAX)",
                "IDLE SEND/AGENT"
            ],
            &rows
        )
    );
    Ok(())
}
