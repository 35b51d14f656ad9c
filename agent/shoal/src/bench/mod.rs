//! `shoal bench mesh`: real agent processes on loopback, measured from outside.
//!
//! For each size N it starts N `shoal agent` processes (a throwaway CA, every
//! agent joining the first), then measures: how long until every agent sees
//! all N alive; how long a `kv put` on one agent takes to be readable on all N
//! (every agent's API polled concurrently, so resolution is one poll round);
//! and the steady-state bytes each agent sends per second with no changes.

pub mod discovery;
pub mod footprint;
pub mod images;
pub mod scale;

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
    /// First port; agent i uses base+i (QUIC), base+1000+i (API) and base+2000+i (DNS).
    #[arg(long, default_value_t = 27001)]
    pub base_port: u16,
    /// Seconds of idle traffic measured per size.
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
}

/// The binary benchmarks run agents from (default: this one); `bench loop --agent-binary`
/// sets it to compare builds in one run.
static AGENT_BINARY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

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

/// N agent processes on loopback with a throwaway CA; killed on drop.
struct Mesh {
    dir: tempfile::TempDir,
    procs: Procs,
    clients: Vec<Client>,
    apis: Vec<SocketAddr>,
    /// Each agent's DNS address (empty for agents of another build, given no --dns).
    dns: Vec<SocketAddr>,
    /// Time from spawning until every agent saw all N alive.
    membership: Duration,
}

impl Mesh {
    async fn start(n: usize, base_port: u16) -> anyhow::Result<Mesh> {
        Ok(Mesh::start_prepared(n, base_port, |_| Ok(())).await?.0)
    }

    /// Like [`Mesh::start`], running `prepare` on the mesh's directory first (agent
    /// `i`'s data dir is `<dir>/n<i>`).
    async fn start_prepared<T>(
        n: usize,
        base_port: u16,
        prepare: impl FnOnce(&std::path::Path) -> anyhow::Result<T>,
    ) -> anyhow::Result<(Mesh, T)> {
        Mesh::start_custom(n, base_port, prepare, |_, _| Vec::new()).await
    }

    /// Like [`Mesh::start_prepared`], with extra flags for agent `i` from
    /// `args(i, mesh dir)`.
    async fn start_custom<T>(
        n: usize,
        base_port: u16,
        prepare: impl FnOnce(&std::path::Path) -> anyhow::Result<T>,
        args: impl Fn(usize, &std::path::Path) -> Vec<String>,
    ) -> anyhow::Result<(Mesh, T)> {
        let dir = tempfile::Builder::new().prefix("shoal-bench-").tempdir()?;
        let prepared = prepare(dir.path())?;
        let ca = dir.path().join("ca");
        shoal_net::init_ca(&ca)?;
        let exe = match AGENT_BINARY.get() {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("locating the shoal binary")?,
        };
        let quic = |i: usize| SocketAddr::from(([127, 0, 0, 1], base_port + i as u16));
        let api = |i: usize| SocketAddr::from(([127, 0, 0, 1], base_port + 1000 + i as u16));
        let dns = |i: usize| SocketAddr::from(([127, 0, 0, 1], base_port + 2000 + i as u16));
        // Another build (`--agent-binary`) may not know `--dns`.
        let with_dns = AGENT_BINARY.get().is_none();
        // Warm the shared policy cache before the clock starts.
        tokio::task::spawn_blocking({
            let cache = dir.path().join("policy-cache");
            move || {
                shoal_policy::PolicyHost::new(shoal_policy::HostConfig {
                    cache_dir: Some(cache),
                    ..shoal_policy::HostConfig::default()
                })
                .map(drop)
            }
        })
        .await?
        .context("warming the policy cache")?;
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
                // Shared: the built-in policies are compiled once, so the numbers
                // measure the mesh rather than N compilations on 2 cores.
                .arg("--policy-cache")
                .arg(dir.path().join("policy-cache"))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log);
            if i > 0 {
                cmd.args(["--join", &quic(0).to_string()]);
            }
            let extra = args(i, dir.path());
            if !extra.iter().any(|a| a == "--docker") {
                cmd.args(["--docker", "off"]);
            }
            cmd.args(extra);
            if with_dns {
                cmd.args(["--dns", &dns(i).to_string()]);
            }
            procs.0.push(cmd.spawn().context("starting an agent")?);
        }
        let apis: Vec<SocketAddr> = (0..n).map(api).collect();
        let clients: Vec<Client> = apis
            .iter()
            .map(|a| Client::new(&a.to_string()))
            .collect::<anyhow::Result<_>>()?;
        // Membership: every agent sees n alive.
        let deadline = start + Duration::from_secs(120);
        loop {
            for (i, c) in procs.0.iter_mut().enumerate() {
                if let Some(st) = c.try_wait()? {
                    // Keep the logs for whoever investigates.
                    let kept = dir.keep();
                    bail!(
                        "agent n{i} exited with {st}; its log is in {}",
                        kept.join(format!("n{i}.log")).display()
                    );
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
        Ok((
            Mesh {
                dir,
                procs,
                clients,
                apis,
                dns: if with_dns {
                    (0..n).map(dns).collect()
                } else {
                    Vec::new()
                },
                membership: start.elapsed(),
            },
            prepared,
        ))
    }
}

impl Mesh {
    /// SIGKILL agent `i` (its workloads keep running, as on a real dead machine's
    /// network partition; they are killed with the mesh).
    fn kill9(&mut self, i: usize) {
        let _ = self.procs.0[i].kill();
        let _ = self.procs.0[i].wait();
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Agents first, so none restarts a workload, then every workload's group.
        for c in &mut self.procs.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in workload_groups(self.dir.path()) {
            // SAFETY: kill(2) on a process group this mesh's agents started.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

/// Process groups recorded by the process drivers of the agents under `dir`.
fn workload_groups(dir: &std::path::Path) -> Vec<i32> {
    let mut out = Vec::new();
    for node in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let allocs = node.path().join("workloads/allocs");
        for f in std::fs::read_dir(allocs).into_iter().flatten().flatten() {
            let pid = std::fs::read(f.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["pid"].as_i64());
            if let Some(pid) = pid.filter(|p| *p > 1) {
                out.push(pid as i32);
            }
        }
    }
    out
}

/// Deploys `spec` (of service `name`) through agent 0 and waits until version 1
/// runs healthy everywhere; returns how long that took.
async fn deploy_and_wait(
    mesh: &Mesh,
    name: &str,
    spec: String,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    mesh.clients[0]
        .deploy(&format!("{name}.toml"), spec)
        .await?;
    crate::service_cli::wait_rollout(&mesh.clients[0], name, 1, limit, false).await?;
    Ok(t.elapsed())
}

/// `rm` of `service` through agent 0, then the time until no agent records a workload.
async fn rm_and_wait(mesh: &Mesh, service: &str, limit: Duration) -> anyhow::Result<Duration> {
    let t = Instant::now();
    mesh.clients[0].rm(service).await?;
    loop {
        let left = workload_groups(mesh.dir.path()).len();
        if left == 0 {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            bail!("{left} workloads still recorded {limit:?} after rm");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn measure(n: usize, args: &MeshBenchArgs) -> anyhow::Result<Row> {
    let mesh = Mesh::start(n, args.base_port).await?;
    let clients = &mesh.clients;
    let api = |i: usize| mesh.apis[i];
    let membership = mesh.membership;

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
    drop(mesh);
    Ok(Row {
        n,
        membership,
        change,
        change_max,
        idle_bps,
    })
}

/// Options of `shoal bench plugin`.
#[derive(Debug, clap::Args)]
pub struct PluginBenchArgs {
    /// The component to install (a scheduler).
    pub file: std::path::PathBuf,
    /// Agents in the mesh.
    #[arg(long, default_value_t = 5)]
    pub agents: usize,
    /// Installs timed (a fresh name each; the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// First port, as for `bench mesh`.
    #[arg(long, default_value_t = 29001)]
    pub base_port: u16,
}

/// Times `plugin install` on one agent until every agent reports it active.
pub async fn run_plugin(args: PluginBenchArgs) -> anyhow::Result<()> {
    let wasm =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let mesh = Mesh::start(args.agents, args.base_port).await?;
    let mut times = Vec::new();
    for run in 0..args.runs {
        // Each run installs a different blob (a custom section changes the bytes
        // but not the component), so nothing is cached anywhere.
        let mut bytes = wasm.clone();
        let section = format!("shoal-bench-{run}-{}", mesh.dir.path().display());
        bytes.push(0); // custom section id
        bytes.push((section.len() + 1) as u8);
        bytes.push(section.len() as u8);
        bytes.extend_from_slice(section.as_bytes());
        let hash = blake3::hash(&bytes).to_hex().to_string();
        let t0 = Instant::now();
        mesh.clients[run % args.agents]
            .plugin_install("scheduler", Some(&format!("bench{run}")), None, bytes)
            .await?;
        loop {
            let rows = join_all(mesh.clients.iter().map(|c| c.plugin_list(false))).await;
            let active = rows.iter().filter(|r| {
                r.as_ref().is_ok_and(|rows| {
                    rows.iter().any(|x| {
                        x["kind"] == "scheduler"
                            && x["hash"] == hash.as_str()
                            && x["state"] == "active"
                    })
                })
            });
            if active.count() == args.agents {
                break;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!(
                    "plugin not active on all {} agents within 120 s",
                    args.agents
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        times.push(t0.elapsed());
    }
    let max = times.iter().max().copied().unwrap_or_default();
    let med = median(times);
    println!(
        "{}",
        table(
            &[
                "AGENTS",
                "WASM BYTES",
                "INSTALL TO ACTIVE EVERYWHERE (MEDIAN)",
                "MAX"
            ],
            &[vec![
                args.agents.to_string(),
                wasm.len().to_string(),
                format!("{:.0} ms", med.as_secs_f64() * 1e3),
                format!("{:.0} ms", max.as_secs_f64() * 1e3),
            ]]
        )
    );
    Ok(())
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

/// A service of `replicas` `shoal workload http` processes for the benchmarks.
fn bench_spec(replicas: u32, reschedule_after_ms: u64) -> String {
    format!(
        r#"name = "bench"
driver = "process"
command = ["shoal", "workload", "http", "--bind", "127.0.0.1"]
replicas = {replicas}
reschedule_after = "{reschedule_after_ms}ms"
# Measures how fast replicas stop, not how long they serve out of discovery.
stop_delay = "0s"

[resources]
cpu = "10m"
memory = "16Mi"

[[ports]]
name = "http"
container_port = 8080

[health]
http = "/healthz"
interval = "250ms"
timeout = "1s"

[scheduler]
strategy = "spread"
"#
    )
}

/// Slots of `bench` healthy as agent `c` reports, and whether any sits on `avoid`.
async fn healthy_slots(c: &Client, avoid: &str) -> Option<(usize, bool)> {
    let ps = c.ps("bench").await.ok()?;
    let healthy = ps.slots.iter().filter(|r| r.healthy && !r.next).count();
    let on_avoid = ps.slots.iter().any(|r| r.node.as_deref() == Some(avoid));
    Some((healthy, on_avoid))
}

/// Options of `shoal bench reschedule`.
#[derive(Debug, clap::Args)]
pub struct RescheduleBenchArgs {
    /// Agents in the mesh.
    #[arg(long, default_value_t = 5)]
    pub agents: usize,
    /// Replicas of the service (spread over the agents).
    #[arg(long, default_value_t = 10)]
    pub replicas: u32,
    /// The service's reschedule_after, in ms.
    #[arg(long, default_value_t = 0)]
    pub reschedule_after_ms: u64,
    /// Runs, each on a fresh mesh (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// First port, as for `bench mesh`.
    #[arg(long, default_value_t = 10001)]
    pub base_port: u16,
}

/// Times `kill -9` of an agent until every replica is healthy on the others.
pub async fn run_reschedule(args: RescheduleBenchArgs) -> anyhow::Result<()> {
    if args.agents < 2 || args.replicas == 0 {
        bail!("--agents must be at least 2 and --replicas at least 1");
    }
    let mut rows = Vec::new();
    let mut totals = Vec::new();
    for run in 0..args.runs {
        let mut mesh = Mesh::start(args.agents, args.base_port).await?;
        let spec = bench_spec(args.replicas, args.reschedule_after_ms);
        mesh.clients[0].deploy("bench.toml", spec).await?;
        crate::service_cli::wait_rollout(
            &mesh.clients[0],
            "bench",
            1,
            Duration::from_secs(120),
            false,
        )
        .await?;
        // The victim: the agent of the last slot that is not agent 0 (we watch from 0).
        let ps = mesh.clients[0].ps("bench").await?;
        let victim_name = ps
            .slots
            .iter()
            .rev()
            .filter_map(|r| r.node.clone())
            .find(|n| n != "n0")
            .context("no replica outside agent 0")?;
        let lost = ps
            .slots
            .iter()
            .filter(|r| r.node.as_deref() == Some(victim_name.as_str()))
            .count();
        let victim: usize = victim_name[1..].parse()?;
        let t0 = Instant::now();
        mesh.kill9(victim);
        let mut seen_down = None;
        loop {
            if seen_down.is_none() {
                if let Ok(nodes) = mesh.clients[0].nodes().await {
                    if nodes.iter().any(|n| {
                        n.name == victim_name && matches!(n.status.as_str(), "down" | "left")
                    }) {
                        seen_down = Some(t0.elapsed());
                    }
                }
            }
            if let Some((healthy, on_victim)) = healthy_slots(&mesh.clients[0], &victim_name).await
            {
                if healthy == args.replicas as usize && !on_victim {
                    break;
                }
            }
            if t0.elapsed() > Duration::from_secs(180) {
                bail!("replicas of {victim_name} were not replaced within 180 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let total = t0.elapsed();
        eprintln!("run {run}: {lost} replicas on {victim_name}, healthy elsewhere after {total:?}");
        rows.push(vec![
            run.to_string(),
            lost.to_string(),
            seen_down.map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64())),
            format!("{:.2} s", total.as_secs_f64()),
        ]);
        totals.push(total);
    }
    let med = median(totals);
    println!(
        "{}",
        table(
            &["RUN", "REPLICAS LOST", "SEEN DOWN", "ALL HEALTHY ELSEWHERE"],
            &rows
        )
    );
    println!(
        "median kill -9 to all replicas healthy elsewhere: {:.2} s ({} agents, {} replicas, reschedule_after {} ms)",
        med.as_secs_f64(),
        args.agents,
        args.replicas,
        args.reschedule_after_ms
    );
    Ok(())
}

/// Options of `shoal bench deploy`.
#[derive(Debug, clap::Args)]
pub struct DeployBenchArgs {
    /// Agents in the mesh.
    #[arg(long, default_value_t = 5)]
    pub agents: usize,
    /// Replicas deployed.
    #[arg(long, default_value_t = 100)]
    pub replicas: u32,
    /// Runs, each on a fresh mesh (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// First port, as for `bench mesh`.
    #[arg(long, default_value_t = 12001)]
    pub base_port: u16,
}

/// Times `deploy` until every replica is healthy, then `rm` until none is left.
pub async fn run_deploy(args: DeployBenchArgs) -> anyhow::Result<()> {
    if args.agents == 0 || args.replicas == 0 {
        bail!("--agents and --replicas must be at least 1");
    }
    let mut rows = Vec::new();
    let mut ups = Vec::new();
    for run in 0..args.runs {
        let mesh = Mesh::start(args.agents, args.base_port).await?;
        // Agents place nothing until their view settles (3 s after first seeing a
        // peer): measure a settled cluster, as a user deploying to it would see.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let t0 = Instant::now();
        let via = &mesh.clients[1 % args.agents];
        via.deploy("bench.toml", bench_spec(args.replicas, 60_000))
            .await?;
        crate::service_cli::wait_rollout(via, "bench", 1, Duration::from_secs(300), false).await?;
        let up = t0.elapsed();
        let down = rm_and_wait(&mesh, "bench", Duration::from_secs(120)).await?;
        eprintln!(
            "run {run}: {} replicas healthy after {up:?}, all stopped {down:?} after rm",
            args.replicas
        );
        rows.push(vec![
            run.to_string(),
            format!("{:.2} s", up.as_secs_f64()),
            format!("{:.2} s", down.as_secs_f64()),
        ]);
        ups.push(up);
    }
    println!(
        "{}",
        table(
            &["RUN", "DEPLOY TO ALL HEALTHY", "RM TO ALL STOPPED"],
            &rows
        )
    );
    println!(
        "median deploy to all {} replicas healthy on {} agents: {:.2} s",
        args.replicas,
        args.agents,
        median(ups).as_secs_f64()
    );
    Ok(())
}

/// Options of `shoal bench replicas`.
#[derive(Debug, clap::Args)]
pub struct ReplicasBenchArgs {
    /// Agents in the mesh.
    #[arg(long, default_value_t = 3)]
    pub agents: usize,
    /// Replica counts to measure, comma separated (one fresh mesh each).
    #[arg(long, value_delimiter = ',', default_value = "100,300,1000")]
    pub counts: Vec<u32>,
    /// Seconds of steady state measured once every replica runs.
    #[arg(long, default_value_t = 20)]
    pub steady_secs: u64,
    /// First port, as for `bench mesh`.
    #[arg(long, default_value_t = 14001)]
    pub base_port: u16,
}

/// CPU ticks (user + system) of process `pid`.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest: Vec<&str> = s.get(s.rfind(')')? + 1..)?.split_whitespace().collect();
    Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
}

/// Resident memory of process `pid`, in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    Some(s.split_whitespace().nth(1)?.parse::<u64>().ok()? * page)
}

/// Latencies of API reads made while something else goes on.
#[derive(Default)]
struct Latencies(Vec<Duration>);

impl Latencies {
    fn quantile(&self, q: f64) -> Duration {
        let mut v = self.0.clone();
        v.sort();
        let i = ((v.len() as f64 * q).ceil() as usize).saturating_sub(1);
        v.get(i.min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    }
}

/// Polls `GET /v1/services` on every agent every 200 ms until `stop`, recording each
/// answer's latency (a failed or timed-out read counts as its timeout, 10 s).
async fn probe_api(
    clients: std::sync::Arc<Vec<Client>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Latencies {
    let mut lat = Latencies::default();
    while !*stop.borrow() {
        let times = join_all(clients.iter().map(|c| async move {
            let t = Instant::now();
            match c.services().await {
                Ok(_) => t.elapsed(),
                Err(_) => Duration::from_secs(10),
            }
        }))
        .await;
        lat.0.extend(times);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lat
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Many replicas on few agents: API latency while they start and while they run,
/// CPU and memory per agent, duplicates, and the time `rm` takes.
pub async fn run_replicas(args: ReplicasBenchArgs) -> anyhow::Result<()> {
    if args.agents == 0 || args.counts.is_empty() {
        bail!("--agents and --counts must not be empty");
    }
    let mut rows = Vec::new();
    for &count in &args.counts {
        let mesh = Mesh::start(args.agents, args.base_port).await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let clients = std::sync::Arc::new(
            mesh.apis
                .iter()
                .map(|a| Client::new(&a.to_string()))
                .collect::<anyhow::Result<Vec<_>>>()?,
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let prober = tokio::spawn(probe_api(clients.clone(), stop_rx));
        let spec = format!(
            "name = \"many\"\ndriver = \"process\"\ncommand = [\"sleep\", \"3600\"]\nreplicas = {count}\n\
             [resources]\ncpu = \"1m\"\nmemory = \"1Mi\"\n"
        );
        let up = deploy_and_wait(&mesh, "many", spec, Duration::from_secs(600)).await?;
        let _ = stop_tx.send(true);
        let during = prober.await?;

        // Steady state: API latency, CPU and memory of each agent.
        let pids: Vec<u32> = mesh.procs.0.iter().map(Child::id).collect();
        let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).collect();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let prober = tokio::spawn(probe_api(clients.clone(), stop_rx));
        let t1 = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.steady_secs)).await;
        let _ = stop_tx.send(true);
        let steady = prober.await?;
        let secs = t1.elapsed().as_secs_f64();
        // SAFETY: sysconf has no preconditions.
        let tps = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu: Vec<f64> = pids
            .iter()
            .zip(&before)
            .map(|(p, b)| {
                (cpu_ticks(*p).unwrap_or(0).saturating_sub(*b)) as f64 / tps / secs * 100.0
            })
            .collect();
        let rss: Vec<u64> = pids.iter().map(|p| rss_bytes(*p).unwrap_or(0)).collect();

        // Every slot runs exactly once.
        let groups = workload_groups(mesh.dir.path());
        let alive = groups
            .iter()
            // SAFETY: signal 0 only checks that the group exists.
            .filter(|g| unsafe { libc::kill(-**g, 0) } == 0)
            .count();
        let down = rm_and_wait(&mesh, "many", Duration::from_secs(300)).await?;
        eprintln!(
            "{count} replicas: all running after {up:?}; {alive} workloads alive; rm took {down:?}"
        );
        let cpu_max = cpu.iter().cloned().fold(0.0, f64::max);
        let rss_max = rss.iter().copied().max().unwrap_or(0);
        rows.push(vec![
            count.to_string(),
            format!("{:.1} s", up.as_secs_f64()),
            format!(
                "{} / {}",
                ms(during.quantile(0.99)),
                ms(during.quantile(1.0))
            ),
            format!(
                "{} / {} / {}",
                ms(steady.quantile(0.5)),
                ms(steady.quantile(0.99)),
                ms(steady.quantile(1.0))
            ),
            format!("{cpu_max:.1}%"),
            format!("{} MiB", rss_max >> 20),
            format!("{}", alive as i64 - i64::from(count)),
            format!("{:.1} s", down.as_secs_f64()),
        ]);
    }
    println!(
        "{}",
        table(
            &[
                "REPLICAS",
                "DEPLOY TO ALL RUNNING",
                "API WHILE DEPLOYING p99 / max",
                "API STEADY p50 / p99 / max",
                "CPU PER AGENT (max)",
                "RSS PER AGENT (max)",
                "EXTRA WORKLOADS",
                "RM TO ALL STOPPED",
            ],
            &rows
        )
    );
    Ok(())
}

/// Options of `shoal bench loop`.
#[derive(Debug, clap::Args)]
pub struct LoopBenchArgs {
    /// Agents in the mesh.
    #[arg(long, default_value_t = 5)]
    pub agents: usize,
    /// Replicas of the load scenario (`shoal workload http` with 1 s health checks).
    #[arg(long, default_value_t = 300)]
    pub replicas: u32,
    /// Size of the blob transferred between two agents, MiB (0 skips the scenario).
    #[arg(long, default_value_t = 500)]
    pub blob_mib: u64,
    /// Seconds measured once the replicas run.
    #[arg(long, default_value_t = 30)]
    pub secs: u64,
    /// First port, as for `bench mesh`.
    #[arg(long, default_value_t = 16001)]
    pub base_port: u16,
    /// Run the agents from this `shoal` binary instead (e.g. an earlier build, to
    /// compare); the measuring stays this binary's.
    #[arg(long)]
    pub agent_binary: Option<std::path::PathBuf>,
}

/// What `/metrics` of one agent says about its loop and SWIM.
#[derive(Debug, Clone, Default)]
struct LoopMetrics {
    /// Loop turns of every branch together.
    turns: shoal_core::Histogram,
    /// Longest turn since start and its branch.
    max_turn: (f64, String),
    rtt: shoal_core::Histogram,
    probe_failures: u64,
    passes: shoal_core::Histogram,
}

/// Parses the histogram `name` (all label sets merged) out of Prometheus text.
fn parse_histogram(text: &str, name: &str) -> shoal_core::Histogram {
    let mut h = shoal_core::Histogram::default();
    let mut cum: std::collections::BTreeMap<String, Vec<(f64, u64)>> = Default::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{")) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let le = labels
            .split(',')
            .find_map(|l| l.strip_prefix("le=\""))
            .map(|v| v.trim_end_matches('"'));
        let series = labels
            .split(',')
            .filter(|l| !l.starts_with("le="))
            .collect::<Vec<_>>()
            .join(",");
        let (Some(le), Ok(n)) = (le, value.trim().parse::<u64>()) else {
            continue;
        };
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(0.0)
        };
        cum.entry(series).or_default().push((bound, n));
    }
    for buckets in cum.values() {
        let mut prev = 0;
        for (i, (_, n)) in buckets.iter().enumerate() {
            if i < h.counts.len() {
                h.counts[i] += n.saturating_sub(prev);
            }
            prev = *n;
        }
        h.count += prev;
    }
    h
}

fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

async fn loop_metrics(http: &reqwest::Client, api: SocketAddr) -> anyhow::Result<LoopMetrics> {
    let text = http
        .get(format!("http://{api}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let mut max_turn = (0.0, String::new());
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("shoal_loop_turn_max_seconds{branch=\"") {
            if let Some((branch, v)) = rest.split_once("\"} ") {
                let v: f64 = v.trim().parse().unwrap_or(0.0);
                if v > max_turn.0 {
                    max_turn = (v, branch.to_string());
                }
            }
        }
    }
    let mut rtt = parse_histogram(&text, "shoal_swim_probe_rtt_seconds");
    rtt.max = metric_value(&text, "shoal_swim_probe_rtt_max_seconds").unwrap_or(0.0);
    let mut turns = parse_histogram(&text, "shoal_loop_turn_seconds");
    turns.max = max_turn.0;
    Ok(LoopMetrics {
        turns,
        passes: parse_histogram(&text, "shoal_orchestration_pass_seconds"),
        max_turn,
        rtt,
        probe_failures: metric_value(&text, "shoal_swim_probe_failures_total").unwrap_or(0.0)
            as u64,
    })
}

/// Histogram of what happened between two readings.
fn diff(after: &shoal_core::Histogram, before: &shoal_core::Histogram) -> shoal_core::Histogram {
    let mut d = after.clone();
    for (a, b) in d.counts.iter_mut().zip(before.counts.iter()) {
        *a = a.saturating_sub(*b);
    }
    d.count = d.counts.iter().sum();
    d
}

/// One scenario's figures over every agent.
fn loop_row(
    name: &str,
    before: &[LoopMetrics],
    after: &[LoopMetrics],
    extra: String,
) -> Vec<String> {
    let mut turns = shoal_core::Histogram::default();
    let mut rtt = shoal_core::Histogram::default();
    let mut failures = 0;
    // The longest turn and round trip within the window: the agents' maxima if they
    // rose in it, else the bound of the highest bucket the window filled.
    let mut max = (0.0, String::new());
    let mut rtt_max: f64 = 0.0;
    let mut passes = shoal_core::Histogram::default();
    for (b, a) in before.iter().zip(after) {
        let t = diff(&a.turns, &b.turns);
        let r = diff(&a.rtt, &b.rtt);
        let turn_max = if a.max_turn.0 > b.max_turn.0 {
            a.max_turn.clone()
        } else {
            (window_bound(&t), "≤".to_string())
        };
        if turn_max.0 > max.0 {
            max = turn_max;
        }
        rtt_max = rtt_max.max(if a.rtt.max > b.rtt.max {
            a.rtt.max
        } else {
            window_bound(&r)
        });
        turns.merge(&t);
        rtt.merge(&r);
        passes.merge(&diff(&a.passes, &b.passes));
        failures += a.probe_failures.saturating_sub(b.probe_failures);
    }
    turns.max = f64::INFINITY;
    rtt.max = f64::INFINITY;
    vec![
        name.to_string(),
        format!("{:.1} ms", turns.quantile(0.99) * 1000.0),
        format!("{:.1} ms ({})", max.0 * 1000.0, max.1),
        format!("{:.1} ms", rtt.quantile(0.99) * 1000.0),
        format!("{:.1} ms", rtt_max * 1000.0),
        failures.to_string(),
        if passes.count == 0 {
            "-".to_string()
        } else {
            passes.max = f64::INFINITY;
            format!("{:.1} ms", passes.quantile(0.99) * 1000.0)
        },
        extra,
    ]
}

/// The upper bound of the highest non-empty bucket (0 if empty).
fn window_bound(h: &shoal_core::Histogram) -> f64 {
    h.counts
        .iter()
        .enumerate()
        .rev()
        .find(|(_, c)| **c > 0)
        .map_or(0.0, |(i, _)| {
            shoal_core::BUCKETS_SECS
                .get(i)
                .copied()
                .unwrap_or(f64::INFINITY)
        })
}

/// Loop turns and SWIM round trips while (a) many replicas run and (b) a large blob
/// moves between two agents.
pub async fn run_loop(args: LoopBenchArgs) -> anyhow::Result<()> {
    if args.agents < 2 {
        bail!("--agents must be at least 2");
    }
    if let Some(p) = &args.agent_binary {
        if !p.is_file() {
            bail!("--agent-binary {}: no such file", p.display());
        }
        let _ = AGENT_BINARY.set(p.clone());
    }
    let http = reqwest::Client::new();
    let mut rows = Vec::new();
    {
        let mesh = Mesh::start(args.agents, args.base_port).await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let read = |apis: &[SocketAddr]| {
            let http = http.clone();
            let apis = apis.to_vec();
            async move {
                let mut out = Vec::new();
                for a in apis {
                    out.push(loop_metrics(&http, a).await?);
                }
                anyhow::Ok(out)
            }
        };
        let before = read(&mesh.apis).await?;
        let spec =
            bench_spec(args.replicas, 60_000).replace("interval = \"250ms\"", "interval = \"1s\"");
        let up = deploy_and_wait(&mesh, "bench", spec, Duration::from_secs(300)).await?;
        let deployed = read(&mesh.apis).await?;
        rows.push(loop_row(
            &format!("deploy of {} replicas", args.replicas),
            &before,
            &deployed,
            format!("all healthy after {:.1} s", up.as_secs_f64()),
        ));
        tokio::time::sleep(Duration::from_secs(args.secs)).await;
        let after = read(&mesh.apis).await?;
        rows.push(loop_row(
            &format!("{} replicas running, {} s", args.replicas, args.secs),
            &deployed,
            &after,
            "health checks every 1 s".to_string(),
        ));
    }
    if args.blob_mib > 0 {
        let size = args.blob_mib << 20;
        let (mesh, id) = Mesh::start_prepared(args.agents, args.base_port, |dir| {
            let store = shoal_blob::BlobStore::open(dir.join("n0").join("blobs"))?;
            let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(7);
            let mut reader = RandomReader {
                rng: &mut rng,
                left: size,
            };
            Ok(store.put_reader(&mut reader)?)
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let read_all = |apis: Vec<SocketAddr>| {
            let http = http.clone();
            async move {
                let mut out = Vec::new();
                for a in apis {
                    out.push(loop_metrics(&http, a).await?);
                }
                anyhow::Ok(out)
            }
        };
        let before = read_all(mesh.apis.clone()).await?;
        let to = mesh.apis[1];
        let t0 = Instant::now();
        let resp = http
            .post(format!("http://{to}/v1/blobs/{id}/fetch"))
            .header("x-shoal-request", "1")
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!(
                "starting the fetch failed: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        loop {
            let blobs: Vec<shoal_api::BlobView> = http
                .get(format!("http://{to}/v1/blobs"))
                .send()
                .await?
                .json()
                .await?;
            if blobs
                .iter()
                .any(|b| b.id == id.to_string() && b.state == "held")
            {
                break;
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!("the blob did not arrive within 600 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = t0.elapsed();
        let after = read_all(mesh.apis.clone()).await?;
        rows.push(loop_row(
            &format!("{} MiB blob n0 -> n1", args.blob_mib),
            &before,
            &after,
            format!(
                "transfer {:.1} s ({:.0} MB/s)",
                took.as_secs_f64(),
                size as f64 / took.as_secs_f64() / 1e6
            ),
        ));
    }
    println!(
        "{}",
        table(
            &[
                "SCENARIO",
                "LOOP TURN p99",
                "LOOP TURN MAX (branch)",
                "SWIM RTT p99",
                "SWIM RTT MAX",
                "PROBE FAILURES",
                "PASS p99 (off loop)",
                "NOTE",
            ],
            &rows
        )
    );
    Ok(())
}

/// `left` pseudo-random bytes.
pub(crate) struct RandomReader<'a> {
    pub(crate) rng: &'a mut rand::rngs::SmallRng,
    pub(crate) left: u64,
}

impl std::io::Read for RandomReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use rand::RngExt;
        let n = (buf.len() as u64).min(self.left) as usize;
        self.rng.fill(&mut buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}
