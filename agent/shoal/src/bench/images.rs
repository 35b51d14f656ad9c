//! `shoal bench images`: how fast a layer reaches every agent over the mesh.
//!
//! Part 1 (blob-only agents, no engines): a random S-byte blob (one layer) sits on
//! n0; every other agent fetches it at once with every agent's upload capped at B.
//! Measured twice in the same run: as shoal does it (every node serves what it has,
//! also while still downloading: a swarm) and with the other agents' uploads capped
//! near zero, so n0 alone serves everyone (the central registry, ≈ (N-1)·S/B). The
//! bound for a swarm is ≈ S/B. SWIM probe failures and RTTs during the transfers
//! show whether the control path kept its timing.
//!
//! Part 2 (`--engines`): two extra Docker Engines, an image with one S-byte random
//! layer (`docker import`), `shoal image push` on n0 and `shoal image pull` on n1
//! (uncapped), against `docker save | docker load` between the same two engines.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use shoal_runtime::scratch::Engine;

use super::{loop_metrics, Mesh, RandomReader};
use crate::client::{table, Client};

/// Options of `shoal bench images`.
#[derive(Debug, clap::Args)]
pub struct ImagesBenchArgs {
    /// Agents in the mesh (n0 holds the blob, the others fetch it).
    #[arg(long, default_value_t = 10)]
    pub agents: usize,
    /// Blob (layer) size in MiB.
    #[arg(long, default_value_t = 64)]
    pub mib: u64,
    /// Upload cap per agent, MiB/s.
    #[arg(long, default_value_t = 8)]
    pub cap_mib: u64,
    /// Skip the one-server run (it takes about N times longer).
    #[arg(long)]
    pub no_star: bool,
    /// Also compare `shoal image push`+`pull` with `docker save | docker load` over
    /// two extra Docker Engines (needs root and dockerd).
    #[arg(long)]
    pub engines: bool,
    /// First port, as for `bench mesh`.
    #[arg(long, default_value_t = 24001)]
    pub base_port: u16,
}

/// Runs the benchmark and prints a table.
pub async fn run_images(args: ImagesBenchArgs) -> anyhow::Result<()> {
    if args.agents < 2 {
        bail!("--agents must be at least 2");
    }
    if args.mib == 0 || args.cap_mib == 0 {
        bail!("--mib and --cap-mib must be positive");
    }
    let size = args.mib << 20;
    let cap = args.cap_mib << 20;
    let bound = size as f64 / cap as f64;
    let mut rows = Vec::new();
    let swarm = transfer(&args, size, cap, false).await?;
    rows.push(row(
        "swarm (shoal)",
        &args,
        bound,
        &swarm,
        "every node serves, also while downloading",
    ));
    if !args.no_star {
        let star = transfer(&args, size, cap, true).await?;
        rows.push(row(
            "one server",
            &args,
            bound,
            &star,
            "others' uploads capped to ~0: n0 serves all",
        ));
        println!(
            "swarm vs one server: {:.1}x faster",
            star.took.as_secs_f64() / swarm.took.as_secs_f64()
        );
    }
    println!(
        "{}",
        table(
            &[
                "RUN",
                "AGENTS",
                "SIZE",
                "CAP/AGENT",
                "ALL HOLD IT",
                "x S/B",
                "SERVED BY n0",
                "PROBE FAILURES",
                "SWIM RTT MAX",
                "NOTE"
            ],
            &rows
        )
    );
    if args.engines {
        engines(&args, size).await?;
    }
    Ok(())
}

struct Transfer {
    took: Duration,
    served_by_origin: u64,
    probe_failures: u64,
    rtt_max: f64,
}

fn row(name: &str, args: &ImagesBenchArgs, bound: f64, t: &Transfer, note: &str) -> Vec<String> {
    vec![
        name.to_string(),
        args.agents.to_string(),
        format!("{} MiB", args.mib),
        format!("{} MiB/s", args.cap_mib),
        format!("{:.1} s", t.took.as_secs_f64()),
        format!("{:.2}", t.took.as_secs_f64() / bound),
        format!(
            "{:.0}%",
            100.0 * t.served_by_origin as f64
                / ((args.agents as u64 - 1) * (args.mib << 20)) as f64
        ),
        t.probe_failures.to_string(),
        format!("{:.1} ms", t.rtt_max * 1000.0),
        note.to_string(),
    ]
}

async fn metric(http: &reqwest::Client, api: SocketAddr, series: &str) -> f64 {
    let Ok(resp) = http.get(format!("http://{api}/metrics")).send().await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn transfer(
    args: &ImagesBenchArgs,
    size: u64,
    cap: u64,
    star: bool,
) -> anyhow::Result<Transfer> {
    let (mesh, id) = Mesh::start_custom(
        args.agents,
        args.base_port,
        |dir| {
            let store = shoal_blob::BlobStore::open(dir.join("n0").join("blobs"))?;
            let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(11);
            let mut reader = RandomReader {
                rng: &mut rng,
                left: size,
            };
            Ok(store.put_reader(&mut reader)?)
        },
        |i, dir| {
            let rate = if star && i > 0 { 1 } else { cap };
            let path = dir.join(format!("n{i}.toml"));
            let _ = std::fs::write(&path, format!("[tuning]\nupload_bytes_per_sec = {rate}\n"));
            vec!["--config".into(), path.display().to_string()]
        },
    )
    .await?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let id_text = id.to_string();
    let before: Vec<u64> = {
        let mut v = Vec::new();
        for a in &mesh.apis {
            v.push(loop_metrics(&http, *a).await?.probe_failures);
        }
        v
    };
    // Every agent must know n0 advertises the blob before the clock starts.
    let known = Instant::now();
    'wait: loop {
        for c in &mesh.clients {
            let snap = c.kv_list("node/n0/blob/", true).await.unwrap_or_default();
            if !snap
                .iter()
                .any(|kv| kv.key == format!("node/n0/blob/{id_text}"))
            {
                if known.elapsed() > Duration::from_secs(30) {
                    bail!("the blob's advertisement did not spread within 30 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue 'wait;
            }
        }
        break;
    }
    let t0 = Instant::now();
    for a in &mesh.apis[1..] {
        let resp = http
            .post(format!("http://{a}/v1/blobs/{id_text}/fetch"))
            .header("x-shoal-request", "1")
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!(
                "starting a fetch on {a} failed: {}",
                resp.text().await.unwrap_or_default()
            );
        }
    }
    let mut pending: Vec<SocketAddr> = mesh.apis[1..].to_vec();
    let limit = Duration::from_secs(60)
        + Duration::from_secs_f64(3.0 * (args.agents as f64) * size as f64 / cap as f64);
    while !pending.is_empty() {
        let mut still = Vec::new();
        for a in pending {
            let blobs: Vec<shoal_api::BlobView> = http
                .get(format!("http://{a}/v1/blobs"))
                .send()
                .await?
                .json()
                .await?;
            if !blobs.iter().any(|b| b.id == id_text && b.state == "held") {
                still.push(a);
            }
        }
        pending = still;
        if t0.elapsed() > limit {
            bail!(
                "{} agents still lack the blob after {:?}",
                pending.len(),
                limit
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = t0.elapsed();
    // Byte counters are republished once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut probe_failures = 0;
    let mut rtt_max: f64 = 0.0;
    for (a, b) in mesh.apis.iter().zip(before) {
        let m = loop_metrics(&http, *a).await?;
        probe_failures += m.probe_failures.saturating_sub(b);
        rtt_max = rtt_max.max(m.rtt.max);
    }
    let served_by_origin =
        metric(&http, mesh.apis[0], "shoal_blob_served_bytes_total").await as u64;
    drop(mesh);
    Ok(Transfer {
        took,
        served_by_origin,
        probe_failures,
        rtt_max,
    })
}

/// Part 2: shoal push + pull against `docker save | docker load`.
async fn engines(args: &ImagesBenchArgs, size: u64) -> anyhow::Result<()> {
    let root = tempfile::Builder::new()
        .prefix("shoal-bench-engines-")
        .tempdir()?;
    let e0 = Engine::start().map_err(anyhow::Error::msg)?;
    let e1 = Engine::start().map_err(anyhow::Error::msg)?;
    // One layer of `size` random bytes.
    let tar = root.path().join("rootfs.tar");
    {
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(5);
        let mut reader = RandomReader {
            rng: &mut rng,
            left: size,
        };
        let mut b = tar_builder(std::fs::File::create(&tar)?);
        let mut h = tar_header(size);
        b.append_data(&mut h, "blob", &mut reader)?;
        b.finish()?;
    }
    let out = e0.docker(&["import", &tar.display().to_string(), "bench-layer:1"]);
    if !out.status.success() {
        bail!(
            "docker import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The anchor: docker save | docker load, piped.
    let t0 = Instant::now();
    let mut save = Command::new("docker")
        .arg("-H")
        .arg(e0.url())
        .args(["save", "bench-layer:1"])
        .stdout(Stdio::piped())
        .spawn()?;
    let load = Command::new("docker")
        .arg("-H")
        .arg(e1.url())
        .arg("load")
        .stdin(save.stdout.take().context("piping docker save")?)
        .stdout(Stdio::null())
        .status()?;
    save.wait()?;
    let anchor = t0.elapsed();
    if !load.success() {
        bail!("docker load failed");
    }
    let _ = e1.docker(&["rmi", "bench-layer:1"]);
    // shoal: push on n0, pull on n1 (uncapped uploads).
    let (mesh, ()) = Mesh::start_custom(
        2,
        args.base_port,
        |_| Ok(()),
        |i, dir| {
            let path = dir.join(format!("n{i}.toml"));
            let _ = std::fs::write(&path, "[tuning]\nupload_bytes_per_sec = 0\n");
            let url = if i == 0 { e0.url() } else { e1.url() };
            vec![
                "--config".into(),
                path.display().to_string(),
                "--docker".into(),
                url,
            ]
        },
    )
    .await?;
    let c0 = Client::new(&mesh.apis[0].to_string())?;
    let c1 = Client::new(&mesh.apis[1].to_string())?;
    let t0 = Instant::now();
    let mut resp = c0.image_push("bench-layer:1", None, false).await?;
    while resp.chunk().await?.is_some() {}
    let push = t0.elapsed();
    // The record reaches n1 by gossip.
    let t1 = Instant::now();
    while !c1
        .images()
        .await?
        .iter()
        .any(|i| i.reference == "bench-layer:1")
    {
        if t1.elapsed() > Duration::from_secs(30) {
            bail!("the image record did not reach n1");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t2 = Instant::now();
    c1.image_pull("bench-layer:1").await?;
    let pull = t2.elapsed();
    drop(mesh);
    println!(
        "{}",
        table(
            &["PATH", "SIZE", "TIME"],
            &[
                vec![
                    "docker save | docker load".into(),
                    format!("{} MiB", args.mib),
                    format!("{:.2} s", anchor.as_secs_f64())
                ],
                vec![
                    "shoal image push (n0)".into(),
                    format!("{} MiB", args.mib),
                    format!("{:.2} s", push.as_secs_f64())
                ],
                vec![
                    "shoal image pull (n1, from n0)".into(),
                    format!("{} MiB", args.mib),
                    format!("{:.2} s", pull.as_secs_f64())
                ],
                vec![
                    "shoal push + pull".into(),
                    format!("{} MiB", args.mib),
                    format!("{:.2} s", (push + pull).as_secs_f64())
                ],
            ]
        )
    );
    Ok(())
}

fn tar_builder(f: std::fs::File) -> tar::Builder<std::fs::File> {
    tar::Builder::new(f)
}

fn tar_header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h
}
