//! `shoal demo`: a throwaway CA and N agents on loopback in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::watch;

use crate::agent::config::{AgentConfig, Tls, Tuning};
use crate::client::{nodes_table, Client};

/// The example app the demo deploys, in dependency order.
const APP: [(&str, &str); 3] = [
    (
        "db.toml",
        include_str!("../../../examples/services/db.toml"),
    ),
    (
        "web.toml",
        include_str!("../../../examples/services/web.toml"),
    ),
    (
        "worker.toml",
        include_str!("../../../examples/services/worker.toml"),
    ),
];

/// Options of `shoal demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How many agents to start.
    #[arg(long, default_value_t = 5)]
    pub nodes: usize,
    /// First QUIC port; agent i listens on base+i for QUIC, base+100+i for its API and
    /// base+200+i for DNS.
    #[arg(long, default_value_t = 7001)]
    pub base_port: u16,
    /// Keep CA and data here instead of a temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print the table and stop (instead of running until Ctrl-C).
    #[arg(long)]
    pub once: bool,
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > 99 {
        bail!("--nodes must be between 1 and 99, got {}", args.nodes);
    }
    if usize::from(args.base_port) + 200 + args.nodes > usize::from(u16::MAX) {
        bail!(
            "--base-port {} leaves no room for {} agents",
            args.base_port,
            args.nodes
        );
    }
    // Stop on Ctrl-C, SIGTERM or SIGHUP, whenever it comes: every exit path below
    // stops the agents (which stop their workloads) and removes the temp dir.
    let signals = stop_signals()?;
    tokio::pin!(signals);
    check_ports_free(&args)?;
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new().prefix("shoal-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let ca_dir = dir.join("ca");
    if !ca_dir.join("ca.pem").exists() {
        shoal_net::init_ca(&ca_dir).context("creating the demo CA")?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut apis = Vec::new();
    let result = tokio::select! {
        r = start_and_show(&args, &dir, &ca_dir, &stop_rx, &mut tasks, &mut apis) => r,
        sig = &mut signals => {
            eprintln!("\n{sig}: stopping the demo");
            Ok(false)
        }
    };
    let wait_for_signal = matches!(result, Ok(true));
    if wait_for_signal {
        println!("\nCtrl-C stops every agent (they leave the cluster gracefully).");
        let sig = (&mut signals).await;
        eprintln!("\n{sig}: stopping the demo");
    }
    let _ = stop_tx.send(true);
    for (name, t) in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("agent {name}: {e:#}"),
            Err(e) => eprintln!("agent {name} panicked: {e}"),
        }
    }
    result.map(|_| ())
}

/// Agents handed to the demo's caller, so they are stopped on every exit path.
type Agents = Vec<(String, tokio::task::JoinHandle<anyhow::Result<()>>)>;

/// Starts the agents, deploys the app and prints where it runs. Ok(true): the
/// demo should keep running until a signal.
async fn start_and_show(
    args: &DemoArgs,
    dir: &std::path::Path,
    ca_dir: &std::path::Path,
    stop_rx: &watch::Receiver<bool>,
    tasks: &mut Agents,
    apis: &mut Vec<SocketAddr>,
) -> anyhow::Result<bool> {
    let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    for i in 0..args.nodes {
        let quic = addr(args.base_port + i as u16);
        let api = addr(args.base_port + 100 + i as u16);
        let cfg = AgentConfig {
            name: format!("n{}", i + 1),
            listen: quic,
            advertise: quic,
            api,
            data_dir: dir.join(format!("n{}", i + 1)),
            tls: Tls::SelfIssued {
                ca_dir: ca_dir.to_path_buf(),
            },
            join: if i == 0 {
                vec![]
            } else {
                vec![addr(args.base_port)]
            },
            labels: [
                ("zone".to_string(), ["a", "b", "c"][i % 3].to_string()),
                (
                    "disk".to_string(),
                    if i < 2 { "ssd" } else { "hdd" }.to_string(),
                ),
            ]
            .into(),
            profile: shoal_core::Profile::Lan,
            // One cache for all: the built-in policies are compiled once, not per agent.
            policy_cache: dir.join("policy-cache"),
            // The example app runs as processes; every workload stops with the demo.
            docker: crate::agent::config::DockerSetting::Off,
            drain_on_exit: true,
            api_hosts: Vec::new(),
            api_token: None,
            logs: shoal_runtime::LogPolicy::default(),
            dns: Some(addr(args.base_port + 200 + i as u16)),
            dns_config: shoal_discovery::DnsConfig::new(
                "shoal",
                crate::agent::config::DEFAULT_DNS_TTL,
            )
            .expect("the default domain is valid"),
            perf: crate::agent::config::Perf::default(),
            blob_cap: None,
            blob_gc_grace: crate::agent::config::DEFAULT_BLOB_GC_GRACE,
            tuning: Tuning {
                cluster_size: Some(args.nodes as u32),
                ..Tuning::default()
            },
        };
        let mut rx = stop_rx.clone();
        let name = cfg.name.clone();
        tasks.push((
            name,
            tokio::spawn(crate::agent::run(cfg, async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })),
        ));
        apis.push(api);
    }

    let client = Client::new(&apis[0].to_string())?;
    let tasks: &Agents = tasks;
    let deadline = Instant::now() + Duration::from_secs(30);
    let nodes = loop {
        if let Some((name, t)) = tasks.iter().find(|(_, t)| t.is_finished()) {
            bail!("agent {name} stopped during start-up (is port range {}.. in use? try --base-port): {t:?}", args.base_port);
        }
        if let Ok(nodes) = client.nodes().await {
            let alive = nodes.iter().filter(|n| n.status == "alive").count();
            if alive == args.nodes && nodes.iter().all(|n| n.resources.is_some()) {
                break nodes;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the {} demo agents did not all see each other within 30 s",
                args.nodes
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "{} agents up (CA and data in {}):\n",
        args.nodes,
        dir.display()
    );
    print!("{}", nodes_table(&nodes));

    // The example app: a database and a web tier that depends on it.
    println!("\nDeploying the example app (examples/services/db.toml, web.toml, worker.toml):");
    for (file, text) in APP {
        let v = client.deploy(file, text.to_string()).await?;
        println!(
            "  {}: version {}, {} replicas",
            v.name, v.version, v.replicas
        );
    }
    for (file, _) in APP {
        let name = file.trim_end_matches(".toml");
        let ps = crate::service_cli::wait_rollout(&client, name, 1, Duration::from_secs(60), false)
            .await
            .with_context(|| format!("waiting for service {name}"))?;
        println!(
            "\n{name}: {} of {} replicas healthy",
            ps.service.healthy, ps.service.desired
        );
        print!("{}", crate::service_cli::slots_table(&ps.slots));
    }
    // Every agent answers DNS: ask n1 where web is, as any client would.
    let dns0 = addr(args.base_port + 200);
    match shoal_discovery::client::query(
        dns0,
        "web.service.shoal.",
        shoal_discovery::RecordType::SRV,
        Duration::from_secs(2),
    )
    .await
    {
        Ok(a) => {
            println!("\nweb.service.shoal SRV, from n1's DNS on {dns0}:");
            for r in &a.records {
                println!("  {r}");
            }
        }
        Err(e) => println!("\nasking n1's DNS on {dns0} failed: {e}"),
    }
    println!("\nTry, in another terminal:");
    let api_last = apis[apis.len() - 1];
    println!("  export SHOAL_API=http://{}", apis[0]);
    println!("  shoal services");
    println!("  shoal ps web");
    println!("  dig @127.0.0.1 -p {} web.service.shoal SRV", dns0.port());
    println!("  shoal discover web");
    println!("  shoal scale web 5");
    println!("  shoal logs web --slot 0");
    println!("  shoal nodes --api http://{api_last}");
    println!("  shoal kv put app/color blue --api http://{}", apis[0]);
    println!(
        "  shoal kv get app/color --api http://{}",
        apis[apis.len() - 1]
    );
    println!("  open http://{}/ for the dashboard", apis[0]);

    Ok(!args.once)
}

/// Resolves with the signal's name on SIGINT, SIGTERM or SIGHUP.
fn stop_signals() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut hup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => "interrupted",
            _ = term.recv() => "terminated",
            _ = hup.recv() => "hung up",
        }
    })
}

/// Fails with one line, before anything is started, if a port the demo needs is taken.
fn check_ports_free(args: &DemoArgs) -> anyhow::Result<()> {
    for i in 0..args.nodes {
        let quic = args.base_port + i as u16;
        let api = args.base_port + 100 + i as u16;
        let dns = args.base_port + 200 + i as u16;
        let name = format!("n{}", i + 1);
        let dns_free = std::net::UdpSocket::bind(("127.0.0.1", dns))
            .and_then(|_| std::net::TcpListener::bind(("127.0.0.1", dns)).map(|_| ()));
        if let Err(e) = dns_free {
            bail!(
                "port {dns} (DNS of {name}) is not free: {e}; pick another range with --base-port"
            );
        }
        if let Err(e) = std::net::UdpSocket::bind(("127.0.0.1", quic)) {
            bail!("port {quic} (QUIC of {name}) is not free: {e}; pick another range with --base-port");
        }
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", api)) {
            bail!(
                "port {api} (API of {name}) is not free: {e}; pick another range with --base-port"
            );
        }
    }
    Ok(())
}
