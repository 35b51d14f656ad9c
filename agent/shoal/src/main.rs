//! `shoal`: the agent, the CLI and the demo in one binary.
//!
//! `shoal agent` runs the driver that owns a sans-IO [`shoal_core::Node`],
//! moves its frames over QUIC (`shoal-net`) and its state to disk
//! (`shoal-store`), and serves the HTTP API. Every other subcommand is a client
//! of that API, except `ca` (certificates, offline) and `demo` (a local mesh).

mod agent;
mod bench;
mod client;
mod compose;
mod demo;
mod discover_cli;
mod image_cli;
mod kv_cli;
mod node_cli;
mod plugin_cli;
mod plugin_new;
mod plugin_test;
mod service_cli;
mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use agent::config::{AgentConfig, FileConfig};
use client::{nodes_table, AgentError, Client, Format};

/// A masterless container orchestrator.
#[derive(Parser)]
#[command(name = "shoal", version, about)]
struct Cli {
    /// File with the API token client commands send (or set SHOAL_TOKEN).
    #[arg(long, global = true, env = "SHOAL_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the agent's API is and how to print answers.
#[derive(clap::Args, Clone)]
struct ClientArgs {
    /// Address of an agent's HTTP API.
    #[arg(
        long,
        env = "SHOAL_API",
        default_value = "http://127.0.0.1:7101",
        global = true
    )]
    api: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table", global = true)]
    output: Format,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an agent on this machine.
    Agent(Box<AgentArgs>),
    /// Start a throwaway local mesh of agents and show it.
    Demo(demo::DemoArgs),
    /// List cluster members as one agent sees them.
    Nodes {
        /// Print the scheduler's snapshot (JSON) instead, for `shoal plugin eval --snapshot`.
        #[arg(long)]
        snapshot: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Docker Compose files as shoal service specs.
    Compose {
        #[command(subcommand)]
        cmd: ComposeCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One node: drain, undrain, status.
    Node {
        #[command(subcommand)]
        cmd: node_cli::NodeCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Services: deploy, services, ps, scale, rollback, history, events, logs, rm.
    #[command(flatten)]
    Service(service_cli::ServiceCmd),
    /// Policy plugins (WebAssembly components).
    Plugin {
        #[command(subcommand)]
        cmd: plugin_cli::PluginCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Container images carried by the mesh: push, ls, pull, rm.
    Image {
        #[command(subcommand)]
        cmd: image_cli::ImageCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A service's endpoints, as this agent's DNS and policy give them.
    Discover {
        /// The service.
        service: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Render a template with every service's endpoints (proxy configs), once or on every change.
    Render {
        #[command(flatten)]
        args: discover_cli::RenderArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The cluster-wide key/value store.
    Kv {
        #[command(subcommand)]
        cmd: kv_cli::KvCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The cluster certificate authority.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Built-in workloads for demos and tests.
    Workload {
        #[command(subcommand)]
        cmd: WorkloadCmd,
    },
    /// Print a shell completion script: `shoal completions bash > /etc/bash_completion.d/shoal`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Benchmarks measured on this machine.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
}

#[derive(Subcommand)]
enum ComposeCmd {
    /// Translate a compose file into one shoal spec per service (refusing, by name,
    /// what shoal cannot honour); `shoal deploy compose.yaml` deploys it directly.
    Import {
        /// The compose file.
        file: PathBuf,
        /// Write `<service>.toml` files here instead of printing them.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overwrite spec files that already exist in --out.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum WorkloadCmd {
    /// An HTTP server with `/`, `/healthz`, `/burn?ms=N`, `/sleep?ms=N` and `/metrics`.
    Http(workload::HttpArgs),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Real agent processes on loopback: membership and change convergence, idle traffic.
    Mesh(bench::MeshBenchArgs),
    /// Time from `plugin install` on one agent to active on every agent.
    Plugin(bench::PluginBenchArgs),
    /// Time from `kill -9` of an agent to all its replicas healthy elsewhere.
    Reschedule(bench::RescheduleBenchArgs),
    /// Time from `deploy` of many replicas to all healthy, and from `rm` to all stopped.
    Deploy(bench::DeployBenchArgs),
    /// Many replicas on few agents: API latency, CPU and memory per agent, duplicates, rm time.
    Replicas(bench::ReplicasBenchArgs),
    /// Agent loop turns and SWIM round trips under replica load and a large blob transfer.
    Loop(bench::LoopBenchArgs),
    /// One agent's DNS under dnsperf, beside dnsmasq serving the same names.
    Dns(bench::discovery::DnsBenchArgs),
    /// From a replica turning healthy, unhealthy or dying to every agent's DNS answer changing.
    Freshness(bench::discovery::FreshnessBenchArgs),
    /// From a load step to the autoscaler's decision and new replicas healthy; flaps under steady noisy load.
    Scale(bench::scale::ScaleBenchArgs),
    /// A layer to N agents with capped uploads: swarm vs one server; push + pull vs docker save | load.
    Images(bench::images::ImagesBenchArgs),
    /// Idle agents: CPU (by thread), resident memory and bytes sent, the seed apart.
    Footprint(bench::footprint::FootprintBenchArgs),
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a cluster CA (ca.pem, ca.key) in a new directory.
    Init {
        /// Directory to create it in.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a node certificate signed by the CA.
    Issue {
        /// The CA directory (with ca.pem and ca.key).
        #[arg(long)]
        ca: PathBuf,
        /// The node name the certificate binds.
        #[arg(long)]
        name: String,
        /// Directory for node.pem, node.key and ca.pem.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Flags of `shoal agent`; each overrides the config file.
#[derive(clap::Args)]
struct AgentArgs {
    /// TOML config file (see examples/agent.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Node name (unique in the cluster).
    #[arg(long)]
    name: Option<String>,
    /// QUIC listen address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address peers dial, when it differs from --listen.
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// HTTP API listen address [default: 127.0.0.1:7101].
    #[arg(long)]
    api: Option<SocketAddr>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Directory holding ca.pem (and ca.key to self-issue a certificate).
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Node certificate from `shoal ca issue`.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Node private key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Seed address to join through (repeatable).
    #[arg(long)]
    join: Vec<SocketAddr>,
    /// Label key=value (repeatable).
    #[arg(long, value_parser = parse_label)]
    label: Vec<(String, String)>,
    /// Timing preset: lan or wan.
    #[arg(long)]
    profile: Option<String>,
    /// Compiled-policy cache [default: <data-dir>/policy-cache]; agents on one machine may share it.
    #[arg(long)]
    policy_cache: Option<PathBuf>,
    /// Docker driver: auto (use the default engine when it answers), off, or an engine's socket (unix:///path).
    #[arg(long)]
    docker: Option<String>,
    /// Stop every workload when the agent exits (default: leave them running for the next start to adopt).
    #[arg(long)]
    drain_on_exit: bool,
    /// Host name the HTTP API answers to besides IP addresses and localhost (repeatable; `*` for any).
    #[arg(long = "api-host", value_name = "NAME")]
    api_host: Vec<String>,
    /// Require this token (file, mode 600) on every API request: for hosts with several users.
    #[arg(long, value_name = "FILE")]
    api_token_file: Option<PathBuf>,
    /// Rotate workload logs at this size [default: 10Mi].
    #[arg(long, value_name = "SIZE")]
    log_max_size: Option<String>,
    /// Workload log files kept, the current one included [default: 3].
    #[arg(long, value_name = "N")]
    log_max_files: Option<u32>,
    /// DNS listen address, UDP and TCP, or `off` [default: 127.0.0.1:8600].
    #[arg(long, value_name = "ADDR|off")]
    dns: Option<String>,
    /// DNS domain: `<svc>.service.<domain>`, `<node>.node.<domain>` [default: shoal].
    #[arg(long, value_name = "DOMAIN")]
    dns_domain: Option<String>,
    /// TTL of DNS answers in seconds [default: 1].
    #[arg(long, value_name = "SECS")]
    dns_ttl: Option<u32>,
    /// Disk cap of the blob store (e.g. 20Gi): unreferenced blobs are evicted first, pushes that cannot fit are refused [default: none].
    #[arg(long, value_name = "SIZE")]
    blob_cap: Option<String>,
    /// Keep blobs no image or plugin names this long before removing them [default: 10m].
    #[arg(long, value_name = "DURATION")]
    blob_gc_grace: Option<String>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} must look like key=value")),
    }
}

impl AgentArgs {
    fn into_config(self) -> anyhow::Result<AgentConfig> {
        let mut f = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        macro_rules! over {
            ($($field:ident),*) => { $( if self.$field.is_some() { f.$field = self.$field; } )* };
        }
        over!(
            name,
            listen,
            advertise,
            api,
            data_dir,
            ca_dir,
            cert,
            key,
            profile,
            policy_cache,
            docker,
            api_token_file,
            log_max_size,
            log_max_files,
            dns,
            dns_domain,
            dns_ttl,
            blob_cap,
            blob_gc_grace
        );
        f.api_hosts.extend(self.api_host);
        if self.drain_on_exit {
            f.drain_on_exit = Some(true);
        }
        if !self.join.is_empty() {
            f.join = self.join;
        }
        f.labels.extend(self.label);
        Ok(AgentConfig::validate(f)?)
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: a log file or pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// Prints `v` as pretty JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Agent(args) => {
            init_logging("info");
            let cfg = args.into_config()?;
            agent::run(cfg, shutdown_signal()).await
        }
        Cmd::Demo(args) => {
            init_logging("warn");
            demo::run(args).await
        }
        Cmd::Plugin { cmd, client } => plugin_cli::run(cmd, &client.api, client.output).await,
        Cmd::Image { cmd, client } => image_cli::run(cmd, &client.api, client.output).await,
        Cmd::Service(cmd) => service_cli::run(cmd).await,
        Cmd::Nodes {
            snapshot: true,
            client,
        } => print_json(&Client::new(&client.api)?.snapshot().await?),
        Cmd::Nodes { client, .. } => {
            let c = Client::new(&client.api)?;
            let nodes = c.nodes().await?;
            match client.output {
                Format::Json => print_json(&nodes),
                Format::Table => {
                    print!("{}", nodes_table(&nodes));
                    Ok(())
                }
            }
        }
        Cmd::Kv { cmd, client } => kv_cli::run(cmd, &client.api, client.output).await,
        Cmd::Node { cmd, client } => node_cli::run(cmd, &client.api, client.output).await,
        Cmd::Compose {
            cmd: ComposeCmd::Import { file, out, force },
            client,
        } => compose_import(&file, out.as_deref(), force, client.output),
        Cmd::Discover { service, client } => {
            discover_cli::discover(&client.api, &service, client.output).await
        }
        Cmd::Render { args, client } => discover_cli::render(&client.api, args).await,
        Cmd::Workload {
            cmd: WorkloadCmd::Http(args),
        } => workload::run(args).await,
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "shoal", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Bench { cmd } => match cmd {
            BenchCmd::Mesh(args) => {
                init_logging("warn");
                bench::run(args).await
            }
            BenchCmd::Plugin(args) => {
                init_logging("warn");
                bench::run_plugin(args).await
            }
            BenchCmd::Reschedule(args) => {
                init_logging("warn");
                bench::run_reschedule(args).await
            }
            BenchCmd::Deploy(args) => {
                init_logging("warn");
                bench::run_deploy(args).await
            }
            BenchCmd::Replicas(args) => {
                init_logging("warn");
                bench::run_replicas(args).await
            }
            BenchCmd::Loop(args) => {
                init_logging("warn");
                bench::run_loop(args).await
            }
            BenchCmd::Dns(args) => {
                init_logging("warn");
                bench::discovery::run_dns(args).await
            }
            BenchCmd::Freshness(args) => {
                init_logging("warn");
                bench::discovery::run_freshness(args).await
            }
            BenchCmd::Scale(args) => {
                init_logging("warn");
                bench::scale::run_scale(args).await
            }
            BenchCmd::Images(args) => {
                init_logging("warn");
                bench::images::run_images(args).await
            }
            BenchCmd::Footprint(args) => {
                init_logging("warn");
                bench::footprint::run_footprint(args).await
            }
        },
        Cmd::Ca { cmd } => match cmd {
            CaCmd::Init { out } => {
                shoal_net::init_ca(&out)
                    .with_context(|| format!("creating a CA in {}", out.display()))?;
                println!(
                    "cluster CA written to {} (ca.pem, ca.key: keep ca.key secret)",
                    out.display()
                );
                Ok(())
            }
            CaCmd::Issue { ca, name, out } => {
                shoal_net::issue(&ca, &name, &out)
                    .with_context(|| format!("issuing a certificate for {name}"))?;
                println!(
                    "certificate for {name} written to {} (node.pem, node.key, ca.pem)",
                    out.display()
                );
                Ok(())
            }
        },
    }
}

fn main() -> ExitCode {
    // Like other Unix tools, stop quietly when the reader of our output goes
    // away (`shoal nodes | head -1`) instead of panicking on a broken pipe.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread
    // starts has no other effect on the process.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let json_errors = output_is_json(&matches);
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Some(path) = &cli.token_file {
        match std::fs::read_to_string(path) {
            Ok(t) => client::set_token(t.trim().to_string()),
            Err(e) => {
                eprintln!("error: cannot read the token file {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let agent = e.downcast_ref::<AgentError>();
            if json_errors {
                // Scripts that asked for JSON get their error as JSON too.
                let v = match agent {
                    Some(a) => serde_json::json!({ "error": a.message, "status": a.status }),
                    None => serde_json::json!({ "error": format!("{e:#}") }),
                };
                eprintln!("{v}");
            } else if let Some(a) = agent {
                eprintln!("error: {} (HTTP {})", a.message, a.status);
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `shoal compose import`.
fn compose_import(
    file: &std::path::Path,
    out: Option<&std::path::Path>,
    force: bool,
    format: Format,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let imported = compose::import_or_explain(&file.display().to_string(), &text)?;
    for w in &imported.warnings {
        eprintln!("warning: {}", client::printable(w));
    }
    let specs: Vec<(String, String)> = imported
        .specs
        .iter()
        .map(|s| (format!("{}.toml", s.name), compose::to_toml(s)))
        .collect();
    match out {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            // Check first, so nothing is half-written.
            if !force {
                if let Some((f, _)) = specs.iter().find(|(f, _)| dir.join(f).exists()) {
                    anyhow::bail!(
                        "{} exists: pass --force to overwrite (nothing was written)",
                        dir.join(f).display()
                    );
                }
            }
            for (f, text) in &specs {
                let path = dir.join(f);
                std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
                if format == Format::Table {
                    println!("wrote {}", path.display());
                }
            }
            if format == Format::Json {
                let files: Vec<String> = specs
                    .iter()
                    .map(|(f, _)| dir.join(f).display().to_string())
                    .collect();
                print_json(&serde_json::json!({ "files": files, "warnings": imported.warnings }))?;
            }
            Ok(())
        }
        None if format == Format::Json => print_json(&serde_json::json!({
            "specs": specs.iter().map(|(f, t)| serde_json::json!({ "file": f, "toml": t })).collect::<Vec<_>>(),
            "warnings": imported.warnings,
        })),
        None => {
            for (f, text) in &specs {
                println!("# {f}\n{text}");
            }
            Ok(())
        }
    }
}

/// Whether the command line asked for `-o json` (a global flag: it sits in the
/// matches of the innermost subcommand).
fn output_is_json(mut m: &clap::ArgMatches) -> bool {
    loop {
        if let Ok(Some(Format::Json)) = m.try_get_one::<Format>("output") {
            return true;
        }
        match m.subcommand() {
            Some((_, sub)) => m = sub,
            None => return false,
        }
    }
}
