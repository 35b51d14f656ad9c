//! `shoal plugin ...`: install, list, remove and dry-run policy plugins.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use shoal_policy::{
    DiscoveryInput, HostConfig, PlacementRequest, PolicyHost, PolicyKind, ScaleInput, Snapshot,
};

use crate::client::{plugins_table, Client, Format};

/// `shoal plugin` subcommands.
#[derive(clap::Subcommand)]
pub enum PluginCmd {
    /// Validate a component on the agent, store it, and bind it on every agent.
    Install {
        /// World the component implements.
        #[arg(long)]
        kind: PolicyKind,
        /// The `.wasm` component.
        file: PathBuf,
        /// Name shown in `plugin ls` [default: <kind>-plugin].
        #[arg(long)]
        name: Option<String>,
        /// Bind it to one service only (default: the cluster-wide default).
        #[arg(long)]
        service: Option<String>,
    },
    /// Active plugin per kind on the agent (or on every agent with --all).
    Ls {
        /// Every agent's view, as each publishes it.
        #[arg(long)]
        all: bool,
    },
    /// Remove a binding: back to the built-in (or to the cluster default for --service).
    Rm {
        /// World of the binding.
        #[arg(long)]
        kind: PolicyKind,
        /// The service binding to remove (default: the cluster-wide one).
        #[arg(long)]
        service: Option<String>,
    },
    /// Scaffold a policy crate that builds on its own (SDK and WIT included).
    New {
        /// World the policy implements.
        #[arg(long)]
        kind: PolicyKind,
        /// Crate and plugin name, e.g. `cpu-target`.
        name: String,
        /// Where to write it [default: ./NAME].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run a component on recorded inputs and check the expected answers (no cluster).
    Test {
        /// The `.wasm` component.
        file: PathBuf,
        /// World the component implements.
        #[arg(long)]
        kind: PolicyKind,
        /// The cases (JSON; see the README `plugin new` writes).
        #[arg(long)]
        cases: PathBuf,
    },
    /// Dry-run a component against the live cluster or a saved snapshot.
    Eval {
        /// World the component implements.
        #[arg(long)]
        kind: PolicyKind,
        /// The `.wasm` component.
        file: PathBuf,
        /// JSON input: placement request(s) for a scheduler, a scale input, or a discovery input.
        #[arg(long)]
        request: Option<PathBuf>,
        /// For a discovery policy: rank this live service's endpoints, with the agent
        /// behind --api as the caller (instead of --request).
        #[arg(long, conflicts_with = "request")]
        service: Option<String>,
        /// Snapshot JSON (from `shoal nodes --snapshot`); default: the live cluster behind --api.
        #[arg(long)]
        snapshot: Option<PathBuf>,
    },
}

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path, what: &str) -> anyhow::Result<T> {
    let text = std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{what} {} is not valid", path.display()))
}

pub(crate) fn read_wasm(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading plugin {}", path.display()))
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs a `shoal plugin` subcommand.
pub async fn run(cmd: PluginCmd, api: &str, output: Format) -> anyhow::Result<()> {
    let json = output == Format::Json;
    match cmd {
        PluginCmd::Install {
            kind,
            file,
            name,
            service,
        } => {
            let wasm = read_wasm(&file)?;
            let c = Client::new(api)?;
            let b = c
                .plugin_install(kind.as_str(), name.as_deref(), service.as_deref(), wasm)
                .await?;
            if json {
                print_json(&b)
            } else {
                println!(
                    "installed {} plugin {} (blake3 {}); every agent fetches and activates it — see `shoal plugin ls --all`",
                    kind,
                    b["name"].as_str().unwrap_or("?"),
                    b["hash"].as_str().unwrap_or("?")
                );
                Ok(())
            }
        }
        PluginCmd::Ls { all } => {
            let rows = Client::new(api)?.plugin_list(all).await?;
            if json {
                print_json(&rows)
            } else {
                print!("{}", plugins_table(&rows));
                Ok(())
            }
        }
        PluginCmd::Rm { kind, service } => {
            Client::new(api)?
                .plugin_remove(kind.as_str(), service.as_deref())
                .await?;
            if !json {
                println!("removed the {kind} plugin binding; agents revert to the built-in");
            }
            Ok(())
        }
        PluginCmd::New { kind, name, dir } => {
            let s = crate::plugin_new::scaffold(kind, &name, dir.as_deref())?;
            if json {
                return print_json(&serde_json::json!({
                    "dir": s.dir.display().to_string(),
                    "wasm": s.wasm,
                }));
            }
            let d = s.dir.display();
            println!("wrote the {kind} policy {name} in {d}; next:");
            println!("  cd {d} && cargo build --release --target wasm32-wasip2");
            println!(
                "  shoal plugin test {} --kind {kind} --cases tests/cases.json",
                s.wasm
            );
            println!(
                "  shoal plugin install --kind {kind} {} --name {name}",
                s.wasm
            );
            Ok(())
        }
        PluginCmd::Test { file, kind, cases } => {
            let results = crate::plugin_test::run(kind, &file, &cases).await?;
            let failed = results.iter().filter(|r| !r.passed).count();
            if json {
                print_json(&results)?;
            } else {
                for r in &results {
                    if r.passed {
                        println!("PASS {}", r.name);
                    } else {
                        println!("FAIL {}: {}", r.name, r.detail);
                    }
                }
                println!("{}/{} cases passed", results.len() - failed, results.len());
            }
            if failed > 0 {
                bail!("{failed} of {} cases failed", results.len());
            }
            Ok(())
        }
        PluginCmd::Eval {
            kind,
            file,
            request,
            service,
            snapshot,
        } => {
            let input = match (request, service) {
                (Some(r), _) => EvalInput::File(r),
                (None, Some(s)) if kind == PolicyKind::Discovery => EvalInput::Service(s),
                (None, Some(_)) => {
                    bail!("--service works with --kind discovery; give a {kind} --request")
                }
                (None, None) => {
                    bail!("give --request FILE (or, for --kind discovery, --service NAME)")
                }
            };
            eval(kind, &file, &input, snapshot.as_deref(), api, json).await
        }
    }
}

/// What `plugin eval` runs the component on.
enum EvalInput {
    /// A JSON file.
    File(PathBuf),
    /// A live service's discovery input, from the agent.
    Service(String),
}

async fn eval(
    kind: PolicyKind,
    file: &Path,
    input: &EvalInput,
    snapshot: Option<&Path>,
    api: &str,
    json: bool,
) -> anyhow::Result<()> {
    let wasm = read_wasm(file)?;
    let host = tokio::task::spawn_blocking(|| PolicyHost::new(HostConfig::default()))
        .await?
        .context("starting the policy host")?;
    let host = std::sync::Arc::new(host);
    host.install(kind, None, "eval", &wasm)
        .with_context(|| format!("loading {}", file.display()))?;
    let request = match input {
        EvalInput::File(p) => p.as_path(),
        EvalInput::Service(_) => Path::new("-"),
    };
    match kind {
        PolicyKind::Scheduler => {
            let requests: Vec<PlacementRequest> =
                match read_json::<serde_json::Value>(request, "request")? {
                    serde_json::Value::Array(_) => read_json(request, "request")?,
                    _ => vec![read_json(request, "request")?],
                };
            let snap: Snapshot = match snapshot {
                Some(p) => read_json(p, "snapshot")?,
                None => serde_json::from_value(Client::new(api)?.snapshot().await?)
                    .context("the agent's snapshot is not the expected JSON")?,
            };
            if snap.nodes.is_empty() {
                bail!("the snapshot has no nodes");
            }
            let requests_for_host = requests.clone();
            let outcomes =
                off_runtime(&host, move |h| h.schedule(&snap, &requests_for_host)).await?;
            if json {
                return print_json(&outcomes);
            }
            for (req, o) in requests.iter().zip(&outcomes) {
                println!(
                    "{}: {}/{} placed{}{}",
                    o.service,
                    o.nodes.len(),
                    req.replicas,
                    if o.nodes.is_empty() {
                        String::new()
                    } else {
                        format!(" on {}", o.nodes.join(", "))
                    },
                    o.unplaced
                        .as_ref()
                        .map_or(String::new(), |u| format!("; unplaced: {u}")),
                );
                println!("  decided by: {}", decided(&o.decided_by));
                if let Some(r) = &o.fallback_reason {
                    println!("  the plugin's answer was not used: {r}");
                }
            }
            Ok(())
        }
        PolicyKind::Scaler => {
            let input: ScaleInput = read_json(request, "scale input")?;
            let d = {
                let input = input.clone();
                off_runtime(&host, move |h| h.scale(&input)).await?
            };
            if json {
                print_json(&d)
            } else {
                println!(
                    "{}: desired {} (from {}): {}",
                    input.service, d.replicas, input.current, d.reason
                );
                Ok(())
            }
        }
        PolicyKind::Discovery => {
            let input: DiscoveryInput = match input {
                EvalInput::File(p) => read_json(p, "discovery input")?,
                EvalInput::Service(s) => Client::new(api)?.discover_input(s).await?,
            };
            let d = {
                let input = input.clone();
                off_runtime(&host, move |h| h.discover_explained(&input)).await?
            };
            if json {
                return print_json(&d);
            }
            println!(
                "{}: {} of {} endpoints for {}",
                crate::client::printable(&input.service),
                d.endpoints.len(),
                input.endpoints.len(),
                crate::client::printable(&input.caller.node)
            );
            println!("  decided by: {}", decided(&d.decided_by));
            if let Some(r) = &d.fallback_reason {
                println!(
                    "  the plugin's answer was not used: {}",
                    crate::client::printable(r)
                );
            }
            let rows: Vec<Vec<String>> = d
                .endpoints
                .iter()
                .map(|w| {
                    let e = &w.endpoint;
                    vec![
                        e.address.clone(),
                        e.port.to_string(),
                        crate::client::printable(&e.node).into_owned(),
                        crate::client::printable(&e.zone).into_owned(),
                        w.weight.to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                crate::client::table(&["ADDRESS", "PORT", "NODE", "ZONE", "WEIGHT"], &rows)
            );
            Ok(())
        }
    }
}

/// Runs a policy call on a blocking thread: a guest that writes to stderr (a
/// panicking one does) needs WASI's blocking I/O, which must not run on an async
/// worker.
pub(crate) async fn off_runtime<T: Send + 'static>(
    host: &std::sync::Arc<PolicyHost>,
    f: impl FnOnce(&PolicyHost) -> T + Send + 'static,
) -> anyhow::Result<T> {
    let host = host.clone();
    tokio::task::spawn_blocking(move || f(&host))
        .await
        .context("the policy call failed")
}

fn decided(d: &shoal_policy::DecidedBy) -> String {
    match d {
        shoal_policy::DecidedBy::Plugin { name, hash } => {
            format!("plugin {name} ({})", &hash[..hash.len().min(12)])
        }
        shoal_policy::DecidedBy::Builtin => "built-in policy (fallback)".into(),
        shoal_policy::DecidedBy::Native => "native built-in policy (fallback)".into(),
    }
}
