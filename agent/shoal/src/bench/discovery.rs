//! `shoal bench dns` (one agent's DNS under `dnsperf`, beside `dnsmasq` serving the
//! same names in the same run) and `shoal bench freshness` (from a replica turning
//! healthy, unhealthy or dying to the DNS answer changing on every agent).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::future::join_all;
use shoal_discovery::RecordType;

use super::{deploy_and_wait, median, Mesh};
use crate::client::table;

/// Options of `shoal bench dns`.
#[derive(Debug, clap::Args)]
pub struct DnsBenchArgs {
    /// Services deployed (each a name to query).
    #[arg(long, default_value_t = 20)]
    pub services: u32,
    /// Replicas per service.
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Queries per second of the latency probe (one query at a time).
    #[arg(long, default_value_t = 2_000)]
    pub rate: u32,
    /// Queries the latency probe sends.
    #[arg(long, default_value_t = 20_000)]
    pub probes: usize,
    /// Queries `dnsperf` keeps outstanding in the throughput runs.
    #[arg(long, default_value_t = 100)]
    pub outstanding: u32,
    /// First port, as for `bench mesh` (the agent's DNS is base+2000, dnsmasq base+2100).
    #[arg(long, default_value_t = 18001)]
    pub base_port: u16,
}

/// Options of `shoal bench freshness`.
#[derive(Debug, clap::Args)]
pub struct FreshnessBenchArgs {
    /// Agents in the mesh; every one's DNS is watched.
    #[arg(long, default_value_t = 5)]
    pub agents: usize,
    /// Rounds of each change measured.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// First port, as for `bench mesh`.
    #[arg(long, default_value_t = 20001)]
    pub base_port: u16,
}

/// Finds `tool` on PATH or in the sbin directories.
fn tool(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path.split(':').chain(["/usr/sbin", "/sbin", "/usr/bin"]) {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("`{name}` is not installed (apt-get install {package})")
}

/// What one `dnsperf` run reported.
#[derive(Debug, Clone, Default)]
struct Perf {
    qps: f64,
    sent: u64,
    lost: u64,
    avg_ms: f64,
}

fn field<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(str::trim)
}

/// Runs `dnsperf` against `server` flat out (`outstanding` queries in flight).
fn dnsperf(
    bin: &Path,
    server: SocketAddr,
    queries: &Path,
    secs: u64,
    outstanding: u32,
) -> anyhow::Result<Perf> {
    let mut cmd = Command::new(bin);
    cmd.args([
        "-s",
        &server.ip().to_string(),
        "-p",
        &server.port().to_string(),
    ])
    .arg("-d")
    .arg(queries)
    .args([
        "-l",
        &secs.to_string(),
        "-q",
        &outstanding.to_string(),
        "-c",
        "4",
    ])
    .stderr(Stdio::null());
    let out = cmd.output().context("running dnsperf")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("dnsperf failed: {text}");
    }
    let num = |label: &str| -> Option<f64> {
        field(&text, label)?.split_whitespace().next()?.parse().ok()
    };
    Ok(Perf {
        qps: num("Queries per second:").context("no throughput in dnsperf's report")?,
        sent: num("Queries sent:").unwrap_or(0.0) as u64,
        lost: num("Queries lost:").unwrap_or(0.0) as u64,
        avg_ms: num("Average Latency (s):").unwrap_or(f64::NAN) * 1000.0,
    })
}

/// Latencies (seconds, sorted) of `count` queries sent one at a time at about `rate`
/// per second from one connected UDP socket: the answer time a client sees when the
/// server is not saturated, free of a load generator's own queueing.
fn probe_latency(
    server: SocketAddr,
    names: &[String],
    count: usize,
    rate: u32,
) -> anyhow::Result<Vec<f64>> {
    use shoal_discovery::proto::op::{Message, MessageType, OpCode, Query};
    use shoal_discovery::proto::rr::Name;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(server)?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let queries: Vec<Vec<u8>> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut m = Message::new(i as u16, MessageType::Query, OpCode::Query);
            m.add_query(Query::query(
                Name::from_ascii(n).expect("a valid name"),
                RecordType::A,
            ));
            m.to_vec().expect("an encodable query")
        })
        .collect();
    let gap = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut buf = [0u8; 4096];
    let mut out = Vec::with_capacity(count);
    let start = Instant::now();
    for i in 0..count {
        let due = start + gap * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let q = &queries[i % queries.len()];
        let t = Instant::now();
        sock.send(q)?;
        let n = sock
            .recv(&mut buf)
            .context("a query went unanswered for 1 s")?;
        out.push(t.elapsed().as_secs_f64());
        if n < 12 || buf[..2] != q[..2] {
            bail!("an answer to another query");
        }
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

fn q_ms(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1] * 1000.0
}

/// One agent's DNS and `dnsmasq`, the same names, the same `dnsperf` runs.
pub async fn run_dns(args: DnsBenchArgs) -> anyhow::Result<()> {
    let dnsperf_bin = tool("dnsperf", "dnsperf")?;
    let dnsmasq_bin = tool("dnsmasq", "dnsmasq-base")?;
    if args.services == 0 {
        bail!("--services must be at least 1");
    }
    let mesh = Mesh::start(1, args.base_port).await?;
    let shoal_dns = *mesh.dns.first().context("the agent has no DNS address")?;
    for i in 0..args.services {
        let spec = format!(
            "name = \"svc{i}\"\ndriver = \"process\"\ncommand = [\"sleep\", \"3600\"]\nreplicas = {}\n\
             stop_delay = \"0s\"\n[[ports]]\nname = \"p\"\ncontainer_port = 1\n",
            args.replicas
        );
        deploy_and_wait(&mesh, &format!("svc{i}"), spec, Duration::from_secs(120)).await?;
    }
    // Every service resolvable before the clock starts.
    let last = format!("svc{}.service.shoal.", args.services - 1);
    let t = Instant::now();
    loop {
        let a =
            shoal_discovery::client::query(shoal_dns, &last, RecordType::A, Duration::from_secs(1))
                .await;
        if a.is_ok_and(|a| !a.records.is_empty()) {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("{last} did not resolve within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let dir = mesh.dir.path();
    let hosts = dir.join("dnsmasq.hosts");
    let a_queries = dir.join("a.queries");
    let srv_queries = dir.join("srv.queries");
    let mut h = String::new();
    let mut a = String::new();
    let mut s = String::new();
    for i in 0..args.services {
        h.push_str(&format!("127.0.0.1 svc{i}.service.shoal\n"));
        a.push_str(&format!("svc{i}.service.shoal A\n"));
        s.push_str(&format!("_p._tcp.svc{i}.service.shoal SRV\n"));
    }
    std::fs::write(&hosts, h)?;
    std::fs::write(&a_queries, a)?;
    std::fs::write(&srv_queries, s)?;
    let dnsmasq_addr = SocketAddr::from(([127, 0, 0, 1], args.base_port + 2100));
    // Authoritative for the domain (`--local`), answers from the hosts file only.
    let mut dnsmasq = Command::new(&dnsmasq_bin)
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
        ])
        .arg(format!("--addn-hosts={}", hosts.display()))
        .args([
            "--local=/shoal/",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
        ])
        .arg(format!("--port={}", dnsmasq_addr.port()))
        .args(["--cache-size=10000", "--user=root", "--pid-file="])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dnsmasq")?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let a_names: Vec<String> = (0..args.services)
        .map(|i| format!("svc{i}.service.shoal."))
        .collect();
    let srv_names: Vec<String> = (0..args.services)
        .map(|i| format!("_p._tcp.svc{i}.service.shoal."))
        .collect();
    let runs: Vec<(&str, SocketAddr, &Path, &[String])> = vec![
        ("shoal (A)", shoal_dns, &a_queries, &a_names),
        ("dnsmasq (A)", dnsmasq_addr, &a_queries, &a_names),
        ("shoal (SRV)", shoal_dns, &srv_queries, &srv_names),
    ];
    let pid = mesh.procs.0[0].id();
    let mut rows = Vec::new();
    for (what, server, queries, names) in runs {
        let (bin, q, secs, out) = (
            dnsperf_bin.clone(),
            queries.to_path_buf(),
            args.secs,
            args.outstanding,
        );
        let cpu0 = super::cpu_ticks(pid).unwrap_or(0);
        let full =
            tokio::task::spawn_blocking(move || dnsperf(&bin, server, &q, secs, out)).await??;
        let cpu = (super::cpu_ticks(pid).unwrap_or(0) - cpu0) as f64
            // SAFETY: sysconf has no preconditions.
            / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
            / secs as f64;
        let (names, count, rate) = (names.to_vec(), args.probes, args.rate);
        let lat = tokio::task::spawn_blocking(move || probe_latency(server, &names, count, rate))
            .await??;
        rows.push(vec![
            what.to_string(),
            format!("{:.0}", full.qps),
            format!("{:.2} ms", full.avg_ms),
            format!("{} of {}", full.lost, full.sent),
            if what.starts_with("shoal") {
                format!("{:.0}%", cpu * 100.0)
            } else {
                "-".into()
            },
            format!(
                "{:.3} / {:.3} / {:.3} ms",
                q_ms(&lat, 0.5),
                q_ms(&lat, 0.99),
                q_ms(&lat, 0.999)
            ),
            format!("{:.3} ms", q_ms(&lat, 1.0)),
        ]);
    }
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    println!(
        "{} services x {} replicas; dnsperf -c 4 -q {} for {} s; then {} queries one at a time at {}/s",
        args.services, args.replicas, args.outstanding, args.secs, args.probes, args.rate
    );
    print!(
        "{}",
        table(
            &[
                "SERVER",
                "QPS (dnsperf)",
                "AVG LATENCY (dnsperf)",
                "LOST",
                "AGENT CPU",
                "p50 / p99 / p99.9 (one at a time)",
                "MAX"
            ],
            &rows
        )
    );
    Ok(())
}

/// Agents whose DNS answer for `name` (SRV) satisfies `pred`.
async fn agents_where(
    dns: &[SocketAddr],
    name: &str,
    pred: &(dyn Fn(&[String]) -> bool + Sync),
) -> usize {
    let answers = join_all(dns.iter().map(|d| {
        shoal_discovery::client::query(*d, name, RecordType::SRV, Duration::from_millis(500))
    }))
    .await;
    answers
        .into_iter()
        .filter(|a| a.as_ref().is_ok_and(|a| pred(&a.records)))
        .count()
}

/// Polls every agent's DNS until all satisfy `pred`: the time since `t0` until the
/// first did, and until all did.
async fn until_all(
    dns: &[SocketAddr],
    name: &str,
    t0: Instant,
    pred: &(dyn Fn(&[String]) -> bool + Sync),
) -> anyhow::Result<(Duration, Duration)> {
    let mut first = None;
    loop {
        let n = agents_where(dns, name, pred).await;
        if n > 0 && first.is_none() {
            first = Some(t0.elapsed());
        }
        if n == dns.len() {
            return Ok((first.unwrap_or_default(), t0.elapsed()));
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("not every agent's answer changed within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// From a replica's change to every agent's DNS answer reflecting it.
pub async fn run_freshness(args: FreshnessBenchArgs) -> anyhow::Result<()> {
    if args.agents == 0 || args.rounds == 0 {
        bail!("--agents and --rounds must be at least 1");
    }
    let mesh = Mesh::start(args.agents, args.base_port).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let flag = mesh.dir.path().join("healthy");
    std::fs::write(&flag, "")?;
    let spec = format!(
        "name = \"fresh\"\ndriver = \"process\"\n\
         command = [\"shoal\", \"workload\", \"http\", \"--health-file\", \"{}\"]\nreplicas = 1\n\
         stop_delay = \"0s\"\nrestart_backoff = \"100ms\"\n[[ports]]\nname = \"http\"\ncontainer_port = 80\n\
         [health]\nhttp = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"500ms\"\nretries = 1\ngrace = \"0s\"\n",
        flag.display()
    );
    deploy_and_wait(&mesh, "fresh", spec, Duration::from_secs(60)).await?;
    let name = "_http._tcp.fresh.service.shoal.";
    let dns = mesh.dns.clone();
    let has_one = |r: &[String]| r.len() == 1;
    let has_none = |r: &[String]| r.is_empty();
    until_all(&dns, name, Instant::now(), &has_one).await?;

    let (mut up, mut down, mut died) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        // Unhealthy: the health file goes.
        let t0 = Instant::now();
        std::fs::remove_file(&flag)?;
        down.push(until_all(&dns, name, t0, &has_none).await?);
        // Healthy again.
        let t0 = Instant::now();
        std::fs::write(&flag, "")?;
        up.push(until_all(&dns, name, t0, &has_one).await?);
        // Dies: kill -9 of its process group; its agent restarts it.
        let groups = super::workload_groups(mesh.dir.path());
        let Some(pgid) = groups.first().copied() else {
            bail!("the replica's process was not found");
        };
        let before: Vec<String> =
            shoal_discovery::client::query(dns[0], name, RecordType::SRV, Duration::from_secs(1))
                .await?
                .records;
        let t0 = Instant::now();
        // SAFETY: signalling a process group this benchmark's agents started.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let gone = move |r: &[String]| r.iter().all(|x| !before.contains(x));
        died.push(until_all(&dns, name, t0, &gone).await?);
        until_all(&dns, name, Instant::now(), &has_one).await?;
    }
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let row = |what: &str, v: &[(Duration, Duration)]| {
        let first: Vec<Duration> = v.iter().map(|x| x.0).collect();
        let all: Vec<Duration> = v.iter().map(|x| x.1).collect();
        vec![
            what.to_string(),
            ms(median(first)),
            ms(median(all.clone())),
            ms(all.iter().max().copied().unwrap_or_default()),
        ]
    };
    println!(
        "{} agents, health checked every 100 ms, every agent's DNS polled every ~2 ms; {} rounds",
        args.agents, args.rounds
    );
    print!(
        "{}",
        table(
            &[
                "CHANGE",
                "FIRST AGENT (median)",
                "ALL AGENTS (median)",
                "ALL AGENTS (max)"
            ],
            &[
                row("replica turns unhealthy (check fails)", &down),
                row("replica turns healthy (check passes)", &up),
                row("replica dies (kill -9)", &died),
            ]
        )
    );
    Ok(())
}
