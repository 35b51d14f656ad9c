//! `shoal bench scale`: the autoscaler's reaction time and calm on real agents.
//!
//! An autoscaled `shoal workload http` service (`target-utilization`, CPU target 50%
//! of a 100m request, the default 2 s interval, min 1) idles at one replica. Each run
//! steps a bounded client load on (`/burn` round-robin over the healthy replicas,
//! ±20% noise per request) and measures the time to the first scale decision and to
//! the decided replicas all healthy; then it keeps the noisy load steady and counts
//! further changes (flaps), stops the load and waits for the scale-down.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;

use super::{deploy_and_wait, median, Mesh};
use crate::client::{table, Client};

/// Options of `shoal bench scale`.
#[derive(Debug, clap::Args)]
pub struct ScaleBenchArgs {
    /// Agents in the mesh.
    #[arg(long, default_value_t = 5)]
    pub agents: usize,
    /// Load steps measured.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// CPU the load spends per second, in ms (50 ms is one replica at target).
    #[arg(long, default_value_t = 250)]
    pub load_ms: u64,
    /// Seconds of steady noisy load after each scale-up, over which flaps are counted.
    #[arg(long, default_value_t = 30)]
    pub steady_secs: u64,
    /// The service's scale-down window (short, so runs can follow each other).
    #[arg(long, default_value = "10s")]
    pub scale_down_window: String,
    /// First port, as for `bench mesh`.
    #[arg(long, default_value_t = 22001)]
    pub base_port: u16,
}

/// The service's desired count and healthy replicas, from agent `c`.
async fn observe(c: &Client) -> anyhow::Result<(u32, Vec<SocketAddr>)> {
    let ps = c.ps("burn").await?;
    let healthy = ps
        .slots
        .iter()
        .filter(|s| s.healthy && !s.next)
        .filter_map(|s| s.endpoint.as_deref()?.parse().ok())
        .collect();
    Ok((ps.service.desired, healthy))
}

/// A bounded load: 10 requests a second over the latest endpoints, each burning
/// `load_ms / 10` ± 20%.
fn start_load(
    endpoints: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    load_ms: u64,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let eps = endpoints.lock().map(|e| e.clone()).unwrap_or_default();
            if eps.is_empty() {
                continue;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let jitter = (x % 1001) as f64 / 500.0 - 1.0;
            let ms = ((load_ms as f64 / 10.0) * (1.0 + 0.2 * jitter)).max(1.0) as u64;
            let url = format!("http://{}/burn?ms={ms}", eps[n % eps.len()]);
            n += 1;
            let http = http.clone();
            let sent = sent.clone();
            // Concurrent, so a slow replica does not slow the load down.
            tokio::spawn(async move {
                if http.get(url).send().await.is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    })
}

/// Runs the benchmark and prints its table.
pub async fn run_scale(args: ScaleBenchArgs) -> anyhow::Result<()> {
    if args.agents == 0 || args.runs == 0 {
        bail!("--agents and --runs must be at least 1");
    }
    let mesh = Mesh::start(args.agents, args.base_port).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let spec = format!(
        "name = \"burn\"\ndriver = \"process\"\ncommand = [\"shoal\", \"workload\", \"http\"]\nreplicas = 1\nstop_delay = \"0s\"\n\
         [resources]\ncpu = \"100m\"\nmemory = \"32Mi\"\n[[ports]]\nname = \"http\"\ncontainer_port = 80\n\
         [health]\nhttp = \"/healthz\"\ninterval = \"500ms\"\ngrace = \"0s\"\n\
         [scaler]\npolicy = \"target-utilization\"\nmetric = \"cpu\"\ntarget = 50\nmin = 1\nmax = 10\nscale_down_window = \"{}\"\n",
        args.scale_down_window
    );
    deploy_and_wait(&mesh, "burn", spec, Duration::from_secs(60)).await?;
    // A replica's CPU counts only after its 30 s startup period (the default):
    // before that a load step would wait it out.
    tokio::time::sleep(Duration::from_secs(31)).await;
    let c = &mesh.clients[0];
    let endpoints: Arc<std::sync::Mutex<Vec<SocketAddr>>> = Arc::default();
    let (mut decide, mut healthy, mut flaps, mut peaks) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut changes = Vec::new();
    let mut sent_total = 0;
    for run in 0..args.runs {
        // Idle at one replica.
        let t = Instant::now();
        loop {
            let (d, eps) = observe(c).await?;
            if d == 1 && eps.len() == 1 {
                *endpoints.lock().unwrap_or_else(|p| p.into_inner()) = eps;
                break;
            }
            if t.elapsed() > Duration::from_secs(120) {
                bail!("run {run}: the service did not return to 1 replica");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let load = start_load(endpoints.clone(), args.load_ms, stop.clone(), sent.clone());
        let step = Instant::now();
        let mut decided: Option<(Duration, u32)> = None;
        let mut all_healthy = None;
        while all_healthy.is_none() {
            let (d, eps) = observe(c).await?;
            if decided.is_none() && d > 1 {
                decided = Some((step.elapsed(), d));
            }
            if let Some((_, first)) = decided {
                if eps.len() as u32 >= first {
                    all_healthy = Some(step.elapsed());
                }
            }
            *endpoints.lock().unwrap_or_else(|p| p.into_inner()) = eps;
            if step.elapsed() > Duration::from_secs(60) {
                bail!("run {run}: no scale-up within 60 s of the load step");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (t_decide, _) = decided.unwrap_or_default();
        decide.push(t_decide);
        healthy.push(all_healthy.unwrap_or_default());
        // Let a possible second step land, then count changes under steady load.
        let settle = Instant::now();
        while settle.elapsed() < Duration::from_secs(8) {
            let (_, eps) = observe(c).await?;
            *endpoints.lock().unwrap_or_else(|p| p.into_inner()) = eps;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let steady = Instant::now();
        let mut peak = 0;
        while steady.elapsed() < Duration::from_secs(args.steady_secs) {
            let (d, eps) = observe(c).await?;
            peak = peak.max(d);
            *endpoints.lock().unwrap_or_else(|p| p.into_inner()) = eps;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let mut after = c.events(Some("burn")).await?;
        after.retain(|e| e.kind == "scale");
        // Only the newest 20 are kept: count by time. A flap is a change against the
        // direction of the one before it.
        let since = crate::agent::wall_ms().saturating_sub(steady.elapsed().as_millis() as u64);
        let mut recent: Vec<&shoal_api::EventView> =
            after.iter().take_while(|e| e.at_ms >= since).collect();
        recent.reverse();
        let mut up = after.get(recent.len()).is_none_or(|e| e.to > e.from);
        let mut reversals = 0;
        for e in &recent {
            let this_up = e.to > e.from;
            if this_up != up {
                reversals += 1;
            }
            up = this_up;
        }
        changes.push(recent.len());
        flaps.push(reversals);
        peaks.push(peak);
        stop.store(true, Ordering::Relaxed);
        let _ = load.await;
        sent_total += sent.load(Ordering::Relaxed);
    }
    let ms = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    let p95 = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[((v.len() as f64 * 0.95).ceil() as usize)
            .saturating_sub(1)
            .min(v.len() - 1)]
    };
    println!(
        "{} agents, {} load steps of {} ms CPU/s (target 50 ms/s per replica, ±20% noise), interval 2 s, {} requests",
        args.agents, args.runs, args.load_ms, sent_total
    );
    print!(
        "{}",
        table(
            &["MEASURE", "MEDIAN", "P95", "MAX"],
            &[
                vec![
                    "load step → first scale decision".into(),
                    ms(median(decide.clone())),
                    ms(p95(&decide)),
                    ms(decide.iter().max().copied().unwrap_or_default()),
                ],
                vec![
                    "load step → decided replicas healthy".into(),
                    ms(median(healthy.clone())),
                    ms(p95(&healthy)),
                    ms(healthy.iter().max().copied().unwrap_or_default()),
                ],
            ]
        )
    );
    println!(
        "during {} s of steady noisy load, per run: changes {:?}, flaps (reversals) {:?}; replicas reached {:?}",
        args.steady_secs, changes, flaps, peaks
    );
    Ok(())
}
