//! `shoal deploy | services | ps | scale | rollback | history | events | logs | rm`: the
//! service commands.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shoal_orch::RolloutStatus;

use crate::client::{table, Client, Format};
use shoal_api::{AllocView, EventView, LogsView, PsView, ServiceView, SlotView, VersionView};

/// A service command.
#[derive(clap::Subcommand)]
pub enum ServiceCmd {
    /// Create or update a service from its spec file.
    Deploy {
        /// The service spec (TOML), e.g. examples/services/web.toml; `-` reads it from
        /// stdin; a `.yml`/`.yaml` file is a Docker Compose file (every service in it).
        file: PathBuf,
        /// Wait until every replica runs the new version and is healthy.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[command(flatten)]
        client: crate::ClientArgs,
    },
    /// List services: desired, running and healthy replicas, version, rollout.
    Services {
        #[command(flatten)]
        client: crate::ClientArgs,
    },
    /// Show where each replica runs and how it is: of one service, or of the whole cluster.
    Ps {
        /// Service name; without it, every allocation of the cluster.
        name: Option<String>,
        /// Only allocations placed on this node.
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        client: crate::ClientArgs,
    },
    /// Recent cluster events, newest first: scale decisions, reschedules, moves,
    /// failed placements, stalled rollouts, restarts, quarantined plugins and
    /// writes undone by a partition's merge.
    Events {
        /// Only this service.
        service: Option<String>,
        /// Only events of this kind (e.g. `restart`, `"write lost"`).
        #[arg(long)]
        kind: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        client: crate::ClientArgs,
    },
    /// Set a service's desired replica count (refused for autoscaled services).
    Scale {
        /// Service name.
        name: String,
        /// Desired replicas.
        replicas: u32,
        /// Wait until exactly that many replicas run and are healthy.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[command(flatten)]
        client: crate::ClientArgs,
    },
    /// Deploy an earlier version's spec again (the desired replica count stays).
    Rollback {
        /// Service name.
        name: String,
        /// The version to go back to (`shoal history` lists them); default: the one before the current.
        #[arg(long)]
        to: Option<u64>,
        /// Wait until every replica runs the rolled-back spec and is healthy.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[command(flatten)]
        client: crate::ClientArgs,
    },
    /// List a service's kept versions, newest first, and what each changed.
    History {
        /// Service name.
        name: String,
        #[command(flatten)]
        client: crate::ClientArgs,
    },
    /// Print a service's logs (every slot unless --slot).
    Logs {
        /// Service name.
        name: String,
        /// Only this slot.
        #[arg(long)]
        slot: Option<u32>,
        /// Only the last N lines of each slot.
        #[arg(long)]
        tail: Option<usize>,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        client: crate::ClientArgs,
    },
    /// Remove a service: its replicas are stopped everywhere.
    Rm {
        /// Service name.
        name: String,
        /// Wait until every replica has stopped and the service is gone.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[command(flatten)]
        client: crate::ClientArgs,
    },
}

/// Runs a service command against the agent at `api`.
pub async fn run(cmd: ServiceCmd) -> anyhow::Result<()> {
    let args = match &cmd {
        ServiceCmd::Deploy { client, .. }
        | ServiceCmd::Services { client }
        | ServiceCmd::Ps { client, .. }
        | ServiceCmd::Scale { client, .. }
        | ServiceCmd::Events { client, .. }
        | ServiceCmd::Logs { client, .. }
        | ServiceCmd::Rollback { client, .. }
        | ServiceCmd::History { client, .. }
        | ServiceCmd::Rm { client, .. } => client.clone(),
    };
    let c = Client::new(&args.api)?;
    let json = args.output == Format::Json;
    match cmd {
        ServiceCmd::Events {
            service,
            kind,
            limit,
            ..
        } => {
            let mut v = c.events(service.as_deref()).await?;
            if let Some(k) = &kind {
                v.retain(|e| e.kind == *k);
            }
            v.truncate(limit);
            if json {
                return print_json(&v);
            }
            if v.is_empty() {
                println!("no events yet");
                return Ok(());
            }
            print!("{}", events_table(&v));
            Ok(())
        }
        ServiceCmd::Deploy {
            file,
            wait,
            timeout,
            ..
        } if is_compose(&file) => deploy_compose(&c, &file, wait, timeout, json).await,
        ServiceCmd::Deploy {
            file,
            wait,
            timeout,
            ..
        } => {
            let (name, text) = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .context("reading the spec from stdin")?;
                ("stdin".to_string(), text)
            } else {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let name = file.file_name().map_or_else(
                    || file.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                );
                (name, text)
            };
            let v = c.deploy(&name, text).await?;
            for w in &v.warnings {
                eprintln!("warning: {}", crate::client::printable(w));
            }
            if json && !wait {
                return print_json(&v);
            }
            if !json {
                if v.changed {
                    println!(
                        "service {} deployed: version {}, {} replicas",
                        v.name, v.version, v.replicas
                    );
                } else {
                    println!(
                        "service {} unchanged (version {}, {} replicas)",
                        v.name, v.version, v.replicas
                    );
                }
            }
            if wait {
                wait_and_show(&c, &v.name, v.version, Duration::from_secs(timeout), json).await?;
            }
            Ok(())
        }
        ServiceCmd::Services { .. } => {
            let v = c.services().await?;
            if json {
                return print_json(&v);
            }
            print!("{}", services_table(&v));
            Ok(())
        }
        ServiceCmd::Ps {
            name: Some(name),
            node,
            ..
        } => {
            let mut v = c.ps(&name).await?;
            if let Some(n) = &node {
                // Through the agent's node filter, so a node nobody knows is an
                // error naming it rather than an empty table.
                v.slots = c
                    .allocs(Some(n))
                    .await?
                    .into_iter()
                    .filter(|a| a.service == name)
                    .map(|a| a.slot)
                    .collect();
            }
            if json {
                return print_json(&v.slots);
            }
            print!("{}", slots_table(&v.slots));
            Ok(())
        }
        ServiceCmd::Ps {
            name: None, node, ..
        } => {
            let v = c.allocs(node.as_deref()).await?;
            if json {
                return print_json(&v);
            }
            if v.is_empty() {
                match &node {
                    Some(n) => println!("no allocations on node {n}"),
                    None => println!("no allocations: no service is deployed"),
                }
                return Ok(());
            }
            print!("{}", allocs_table(&v));
            Ok(())
        }
        ServiceCmd::Scale {
            name,
            replicas,
            wait,
            timeout,
            ..
        } => {
            let v = c.scale(&name, replicas).await?;
            if json && !wait {
                return print_json(&v);
            }
            if !json {
                println!("service {name} scaled to {} replicas", v.replicas);
            }
            if wait {
                // A scale keeps the spec version, so a view from before the write
                // would pass for a finished rollout: wait for the new count first.
                let limit = Duration::from_secs(timeout);
                let start = Instant::now();
                while c.ps(&name).await?.service.desired != v.replicas {
                    if start.elapsed() >= limit {
                        bail!(
                            "timed out after {timeout}s: the agent never showed {} desired replicas of {name}",
                            v.replicas
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let left = limit.saturating_sub(start.elapsed());
                wait_and_show(&c, &name, v.version, left, json).await?;
            }
            Ok(())
        }
        ServiceCmd::Rollback {
            name,
            to,
            wait,
            timeout,
            ..
        } => {
            let v = c.rollback(&name, to).await?;
            if json && !wait {
                return print_json(&v);
            }
            if !json {
                let from = match to {
                    Some(t) => format!("the spec of version {t}"),
                    None => "the previous spec".to_string(),
                };
                println!(
                    "service {name} rolled back to {from}: now version {}, {} replicas",
                    v.version, v.replicas
                );
            }
            if wait {
                wait_and_show(&c, &name, v.version, Duration::from_secs(timeout), json).await?;
            }
            Ok(())
        }
        ServiceCmd::History { name, .. } => {
            let v = c.history(&name).await?;
            if json {
                return print_json(&v);
            }
            print!("{}", history_table(&v));
            Ok(())
        }
        ServiceCmd::Rm {
            name,
            wait,
            timeout,
            ..
        } => {
            let v = c.rm(&name).await?;
            if json && !wait {
                return print_json(&v);
            }
            if !wait {
                println!("service {name} removed; its replicas are being stopped");
                return Ok(());
            }
            if !json {
                println!("service {name} removed; waiting for its replicas to stop");
            }
            wait_removed(&c, &name, Duration::from_secs(timeout), !json).await?;
            if json {
                return print_json(&v);
            }
            println!("service {name} is gone: every replica has stopped");
            Ok(())
        }
        ServiceCmd::Logs {
            name,
            slot,
            tail,
            follow,
            ..
        } => {
            let mut p = LogPrinter {
                service: name.clone(),
                json,
                prefix: false,
                erred: BTreeMap::new(),
            };
            logs(&c, &mut p, slot, tail, follow).await
        }
    }
}

/// A Docker Compose file, by its name (`compose.yaml`, `docker-compose.yml`, …).
fn is_compose(file: &std::path::Path) -> bool {
    matches!(
        file.extension().and_then(|e| e.to_str()),
        Some("yml" | "yaml")
    )
}

/// `shoal deploy compose.yaml`: every service of the file, translated (warnings on
/// stderr; nothing is deployed when anything is refused), deployed, then, with
/// `wait`, waited for in turn.
async fn deploy_compose(
    c: &Client,
    file: &std::path::Path,
    wait: bool,
    timeout: u64,
    json: bool,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let imported = crate::compose::import_or_explain(&file.display().to_string(), &text)?;
    for w in &imported.warnings {
        eprintln!("warning: {}", crate::client::printable(w));
    }
    let mut deployed = Vec::new();
    for spec in &imported.specs {
        let v = c
            .deploy(
                &format!("{}.toml", spec.name),
                crate::compose::to_toml(spec),
            )
            .await
            .with_context(|| format!("deploying service {} of {}", spec.name, file.display()))?;
        if !json {
            println!(
                "service {} {}: version {}, {} replicas",
                v.name,
                if v.changed { "deployed" } else { "unchanged" },
                v.version,
                v.replicas
            );
        }
        deployed.push(v);
    }
    if wait {
        let limit = Duration::from_secs(timeout);
        let start = Instant::now();
        for v in &deployed {
            let left = limit.saturating_sub(start.elapsed());
            wait_rollout(c, &v.name, v.version, left, !json).await?;
        }
    }
    if json {
        return print_json(&deployed);
    }
    Ok(())
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `--wait` of deploy, scale and rollback: waits for the rollout of `version`, then
/// prints the slots (as JSON with `json`).
async fn wait_and_show(
    c: &Client,
    name: &str,
    version: u64,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let ps = wait_rollout(c, name, version, timeout, !json).await?;
    if json {
        return print_json(&ps);
    }
    print!("{}", slots_table(&ps.slots));
    Ok(())
}

/// How long no replica of a new version may be placeable, the scheduler saying
/// why, before `--wait` gives up (the steward retries every second meanwhile).
const UNPLACEABLE_GRACE: Duration = Duration::from_secs(3);

/// Why no replica of `version` can be placed, if none is placed and the scheduler
/// said why (dependencies that may still come up are waited for).
fn unplaceable(ps: &PsView, version: u64) -> Option<String> {
    if ps
        .slots
        .iter()
        .any(|r| r.version == Some(version) && r.node.is_some())
    {
        return None;
    }
    let waits = format!("update to version {version} waits: ");
    ps.slots.iter().find_map(|r| {
        let reason = r.reason.as_deref()?;
        if reason.contains("dependenc") {
            return None;
        }
        match (&r.node, reason.strip_prefix(&waits)) {
            (_, Some(why)) => Some(why.to_string()),
            (None, None) => Some(reason.to_string()),
            (Some(_), None) => None,
        }
    })
}

/// Polls until every replica of `name` runs `version` and is healthy; fails when
/// the rollout stalls (a replica not healthy in time, or its starts refused),
/// when no replica of the version can be placed, or when `timeout` passes.
pub async fn wait_rollout(
    c: &Client,
    name: &str,
    version: u64,
    timeout: Duration,
    progress: bool,
) -> anyhow::Result<PsView> {
    let start = Instant::now();
    let mut last = String::new();
    let mut unplaced_since: Option<Instant> = None;
    loop {
        let ps = c.ps(name).await?;
        let s = &ps.service;
        if s.version > version {
            bail!(
                "service {name} was deployed again (now version {}) while waiting",
                s.version
            );
        }
        let line = format!(
            "{}/{} replicas of version {version} healthy",
            s.updated, s.desired
        );
        if progress && line != last {
            println!("  {line}");
            last = line;
        }
        if rollout_done(&ps, version) {
            return Ok(ps);
        }
        if let Some(RolloutStatus::Stalled { reason }) = &s.rollout {
            bail!("the rollout of {name} version {version} stalled: {reason}");
        }
        match unplaceable(&ps, version) {
            Some(why) => {
                let since = *unplaced_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= UNPLACEABLE_GRACE {
                    bail!("no replica of {name} version {version} can be placed: {why}");
                }
            }
            None => unplaced_since = None,
        }
        if start.elapsed() >= timeout {
            let why: Vec<String> = ps
                .slots
                .iter()
                .filter(|r| !r.healthy)
                .map(|r| {
                    format!(
                        "slot {} {}{}",
                        r.slot,
                        r.state,
                        r.reason
                            .as_ref()
                            .map_or(String::new(), |x| format!(" ({x})"))
                    )
                })
                .collect();
            bail!(
                "timed out after {}s: {}/{} replicas of version {version} healthy; {}",
                timeout.as_secs(),
                s.updated,
                s.desired,
                why.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls until service `name` is gone from the cluster (its record goes only
/// after every slot's replica has stopped); fails when `timeout` passes, naming
/// what still runs.
async fn wait_removed(
    c: &Client,
    name: &str,
    timeout: Duration,
    progress: bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let left: Vec<AllocView> = c
            .allocs(None)
            .await?
            .into_iter()
            .filter(|a| a.service == name)
            .collect();
        let exists = c.services().await?.iter().any(|s| s.name == name);
        if !exists {
            return Ok(());
        }
        let line = format!("{} allocations left", left.len());
        if progress && line != last {
            println!("  {line}");
            last = line;
        }
        if start.elapsed() >= timeout {
            let what: Vec<String> = left
                .iter()
                .map(|a| {
                    format!(
                        "slot {} {} on {}",
                        a.slot.slot,
                        a.slot.state,
                        a.slot.node.as_deref().unwrap_or("no node")
                    )
                })
                .collect();
            bail!(
                "timed out after {}s: service {name} is still being removed; {}",
                timeout.as_secs(),
                if what.is_empty() {
                    "no allocation is left, but its record is".to_string()
                } else {
                    what.join("; ")
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every desired slot runs `version`, healthy, with no second allocation left.
pub fn rollout_done(ps: &PsView, version: u64) -> bool {
    let s = &ps.service;
    s.version == version
        && s.updated == s.desired
        && ps.slots.len() as u32 == s.desired
        && ps
            .slots
            .iter()
            .all(|r| r.healthy && r.version == Some(version) && !r.next)
}

/// Prints log text as lines (prefixed `[svc.slot]` when several slots print), or
/// as JSON lines with `-o json`; and each slot's read error once until it clears.
struct LogPrinter {
    service: String,
    json: bool,
    prefix: bool,
    /// Allocations whose last read failed, with that error.
    erred: BTreeMap<String, String>,
}

impl LogPrinter {
    fn text(&mut self, v: &LogsView, text: &str) -> anyhow::Result<()> {
        self.erred.remove(&v.alloc_id);
        let mut out = std::io::stdout().lock();
        for line in text.lines() {
            if self.json {
                let row = serde_json::json!({
                    "service": self.service, "slot": v.slot, "node": v.node,
                    "alloc_id": v.alloc_id, "line": line,
                });
                writeln!(out, "{row}")?;
            } else if self.prefix {
                writeln!(out, "[{}.{}] {line}", self.service, v.slot)?;
            } else {
                writeln!(out, "{line}")?;
            }
        }
        out.flush()?;
        Ok(())
    }

    /// One line on stderr per slot that cannot be read, not repeated while it stays so.
    fn error(&mut self, v: &LogsView, error: &str) {
        if self.erred.get(&v.alloc_id).is_some_and(|e| e == error) {
            return;
        }
        self.erred.insert(v.alloc_id.clone(), error.to_string());
        if self.json {
            let row = serde_json::json!({
                "service": self.service, "slot": v.slot, "node": v.node,
                "alloc_id": v.alloc_id, "error": error,
            });
            eprintln!("{row}");
        } else {
            eprintln!(
                "{} slot {} on {}: {}",
                self.service,
                v.slot,
                v.node,
                crate::client::printable(error)
            );
        }
    }
}

/// `shoal logs`: every slot's log (or one slot's), then with `follow` what they
/// write next, including slots and replacements that appear meanwhile. A slot whose
/// node cannot answer is one line on stderr; the others print. Fails only when no
/// slot could be read.
async fn logs(
    c: &Client,
    p: &mut LogPrinter,
    slot: Option<u32>,
    tail: Option<usize>,
    follow: bool,
) -> anyhow::Result<()> {
    let name = p.service.clone();
    let views = c.logs(&name, slot, tail, None).await?;
    p.prefix = views.len() > 1 || (follow && slot.is_none());
    // alloc id -> (slot, offset printed up to; None until it could be read)
    let mut at: BTreeMap<String, (u32, Option<u64>)> = BTreeMap::new();
    let mut read_any = false;
    for v in &views {
        if let Some(e) = &v.error {
            p.error(v, e);
            at.insert(v.alloc_id.clone(), (v.slot, None));
            continue;
        }
        read_any = true;
        p.text(v, &v.text)?;
        let mut offset = v.next_offset;
        let mut more = v.more;
        // A long log comes in pages of bounded size.
        while more {
            let Some(page) = c
                .logs(&name, Some(v.slot), None, Some(offset))
                .await?
                .into_iter()
                .find(|p| p.alloc_id == v.alloc_id && p.error.is_none())
            else {
                break;
            };
            p.text(&page, &page.text)?;
            more = page.more && page.next_offset > offset;
            offset = page.next_offset;
        }
        at.insert(v.alloc_id.clone(), (v.slot, Some(offset)));
    }
    if !follow {
        if !read_any {
            bail!("the logs of no slot of {name} could be read (see above)");
        }
        return Ok(());
    }
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Which allocations there are now: new slots and replacements are read
        // from their start, and the ones gone are dropped.
        let Ok(now) = c.logs(&name, slot, Some(0), None).await else {
            continue; // The agent may be restarting; try again.
        };
        at.retain(|id, _| now.iter().any(|v| v.alloc_id == *id));
        for v in &now {
            at.entry(v.alloc_id.clone()).or_insert((v.slot, Some(0)));
        }
        for (id, (n, offset)) in at.iter_mut() {
            let Ok(views) = c
                .logs(&name, Some(*n), None, Some(offset.unwrap_or(0)))
                .await
            else {
                continue;
            };
            for v in views.into_iter().filter(|v| v.alloc_id == *id) {
                match &v.error {
                    Some(e) => p.error(&v, e),
                    None => {
                        p.text(&v, &v.text)?;
                        *offset = Some(v.next_offset);
                    }
                }
            }
        }
    }
}

/// `shoal ps` table of the whole cluster: a SERVICE column before the slot's.
pub fn allocs_table(v: &[AllocView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|a| {
            let mut row = vec![a.service.clone()];
            row.extend(slot_cells(&a.slot));
            row
        })
        .collect();
    let mut head = vec!["SERVICE"];
    head.extend_from_slice(&SLOT_COLUMNS);
    table(&head, &rows)
}

/// `shoal services` table.
pub fn services_table(v: &[ServiceView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.driver.clone(),
                s.desired.to_string(),
                s.running.to_string(),
                s.healthy.to_string(),
                s.version.to_string(),
                rollout_text(s),
                scaler_text(s),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "DRIVER", "DESIRED", "RUNNING", "HEALTHY", "VERSION", "ROLLOUT", "SCALER",
        ],
        &rows,
    )
}

/// `shoal history`: one row per kept version.
pub fn history_table(v: &[VersionView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|h| {
            vec![
                h.version.to_string(),
                if h.current { "*".into() } else { String::new() },
                crate::client::printable(&h.runs).into_owned(),
                if h.changed.is_empty() {
                    "-".into()
                } else {
                    h.changed.join(", ")
                },
            ]
        })
        .collect();
    table(&["VERSION", "CURRENT", "RUNS", "CHANGED"], &rows)
}

/// The SCALER column: `-`, or the policy, bounds and the last decision's reason.
fn scaler_text(s: &ServiceView) -> String {
    let Some(a) = &s.autoscale else {
        return "-".into();
    };
    let why = a
        .reason
        .as_deref()
        .or(a.last.as_deref())
        .unwrap_or("not evaluated yet");
    crate::client::printable(&format!("{} {}..{}: {why}", a.policy, a.min, a.max)).into_owned()
}

/// `shoal events` table.
pub fn events_table(v: &[EventView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|e| {
            let what = match (e.from, e.to, &e.by) {
                (Some(from), Some(to), Some(by)) => {
                    format!("{from} \u{2192} {to} by {by}: {}", e.reason)
                }
                _ => e.reason.clone(),
            };
            vec![
                crate::client::clock_text(e.at_ms),
                e.kind.clone(),
                e.service.clone().unwrap_or_else(|| "-".into()),
                e.node.clone(),
                crate::client::printable(&what).into_owned(),
            ]
        })
        .collect();
    table(&["TIME", "KIND", "SERVICE", "NODE", "WHAT"], &rows)
}

fn rollout_text(s: &ServiceView) -> String {
    if s.removing {
        return "removing".into();
    }
    match &s.rollout {
        // Only a rollout in flight is shown; a crash is a restart (RESTARTS in ps).
        Some(RolloutStatus::Complete) => "-".into(),
        Some(RolloutStatus::Progressing { updated, total }) => format!("{updated}/{total} updated"),
        Some(RolloutStatus::Stalled { reason }) => format!("stalled: {reason}"),
        Some(RolloutStatus::Removing) => "removing".into(),
        None => "-".into(),
    }
}

/// `shoal ps` table.
pub fn slots_table(rows: &[SlotView]) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(slot_cells).collect();
    table(&SLOT_COLUMNS, &rows)
}

/// The columns of one allocation in the `shoal ps` tables.
const SLOT_COLUMNS: [&str; 8] = [
    "SLOT", "NODE", "STATE", "HEALTHY", "ENDPOINT", "RESTARTS", "VERSION", "REASON",
];

/// One allocation's cells, in [`SLOT_COLUMNS`] order.
fn slot_cells(r: &SlotView) -> Vec<String> {
    vec![
        if r.next {
            format!("{}+", r.slot)
        } else {
            r.slot.to_string()
        },
        r.node.clone().unwrap_or_else(|| "-".into()),
        r.state.clone(),
        if r.healthy { "yes" } else { "no" }.into(),
        r.endpoint.clone().unwrap_or_else(|| "-".into()),
        r.restarts.to_string(),
        r.version.map_or_else(|| "-".into(), |v| v.to_string()),
        r.reason.clone().unwrap_or_default(),
    ]
}
