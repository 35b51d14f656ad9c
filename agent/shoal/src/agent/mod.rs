//! The agent: one loop that decides, and owners that do.
//!
//! ```text
//!  HTTP API ──writes (Command)──▶ ┌────────────┐ ──Views (watch)──▶ API reads, dashboard,
//!  (axum)  ◀──────reads───────────│ agent loop │                   /metrics, orchestration
//!  QUIC frames ──────────────────▶│ (the core) │──batches──▶ persister thread (redb, then
//!    ├─ blob frames ─▶ blob worker└────────────┘            frames out, then answers)
//!    └─ logs frames ─▶ logs task ◀── API (logs of other nodes' allocations)
//!                       thread        ▲   │  ▲
//!  executor task ──reports────────────┘   │  └── host probe task, image lister task
//!  orchestration thread ◀──PassRequest────┘      compile workers (blocking pool)
//! ```
//!
//! [`agent_loop::AgentLoop`] owns the sans-IO core and only decides (see its docs).
//! Each other part owns its state and is fed through a named bounded channel
//! ([`channels`], sizes in `[perf]`) or reads the published [`views::Views`]:
//! the persister ([`persist`]) makes writes durable before their frames leave and
//! their answers go out; the blob worker ([`blobs`]) stores and moves blob chunks;
//! the orchestration worker ([`orchestrate`]) runs the steward's pass and tells the
//! executor ([`executor`]) what to run; compile workers ([`plugins`]) build policy
//! components; the host probe ([`host_probe`]) reads the machine; the logs task
//! ([`mesh_logs`]) asks peers for the logs of their allocations and answers theirs.
//!
//! One [`CancellationToken`] stops everything; every task is spawned on one
//! [`TaskTracker`] and every thread is joined, so [`run`] returns only when all of
//! them have ended.

pub mod agent_loop;
pub mod api;
pub mod blobs;
pub mod channels;
pub mod commands;
pub mod config;
pub mod discovery;
pub mod events;
pub mod executor;
pub mod host_probe;
pub mod http_guard;
pub mod image_api;
pub mod images;
pub mod keys;
pub mod mesh_logs;
pub mod metrics;
pub mod orchestrate;
pub mod persist;
pub mod plugins;
pub mod views;

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use shoal_core::{Node, Now};
use shoal_discovery::{DnsServer, DnsStats, Resolver};
use shoal_net::{Identity, Net, NetConfig};
use shoal_policy::{HostConfig, PolicyHost};
use shoal_store::{Persist, RedbStore};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use agent_loop::{AgentLoop, Inputs, Outputs};
use config::{AgentConfig, Tls};

/// Why an API request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request itself is wrong (bad key, too large, not UTF-8).
    #[error("{0}")]
    BadRequest(String),
    /// The key does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The write could not be made durable.
    #[error("{0}")]
    Storage(String),
    /// The agent is shutting down.
    #[error("agent is shutting down")]
    Unavailable,
    /// The request conflicts with how the object is managed (scaling an autoscaled
    /// service by hand).
    #[error("{0}")]
    Conflict(String),
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Sleeps until `at`, or for ever without a deadline (a `select!` branch that
/// never fires).
pub async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The tokio instant `ms` milliseconds after `start` (the cores' monotonic clock).
pub fn at_ms(start: Instant, ms: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(start + Duration::from_millis(ms))
}

/// How often the images Docker holds are listed.
const IMAGES_INTERVAL: Duration = Duration::from_secs(10);

/// The process driver, and the docker driver when wanted and the engine answers.
async fn open_runtimes(cfg: &AgentConfig) -> anyhow::Result<executor::Runtimes> {
    let dir = cfg.data_dir.join("workloads");
    let process = shoal_runtime::ProcessDriver::with_logs(&dir, cfg.logs)
        .with_context(|| format!("opening the process driver in {}", dir.display()))?;
    let socket = match &cfg.docker {
        config::DockerSetting::Off => None,
        config::DockerSetting::Auto => Some(None),
        config::DockerSetting::Socket(p) => Some(Some(p.clone())),
    };
    let engine: Result<Arc<shoal_runtime::DockerDriver>, String> = match socket {
        Some(socket) => {
            let mut opts = shoal_runtime::DockerOptions::new(cfg.name.clone());
            // `docker save` and `docker load` of a large image are single requests.
            opts.timeout = Duration::from_secs(600);
            opts.socket = socket.clone();
            let connected = match tokio::time::timeout(
                Duration::from_secs(5),
                shoal_runtime::DockerDriver::connect_with(opts),
            )
            .await
            {
                Ok(Ok(d)) => Ok(Arc::new(d)),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("Docker Engine did not answer within 5 s".into()),
            };
            if let (Some(path), Err(e)) = (&socket, &connected) {
                // Named explicitly: running without it would fail every docker
                // replica here later, far from the cause.
                anyhow::bail!("--docker unix://{}: {e}", path.display());
            }
            connected
        }
        None => Err("disabled by config (docker = \"off\")".into()),
    };
    match &engine {
        Ok(_) => tracing::info!("docker driver ready"),
        Err(e) => tracing::info!("docker driver not available: {e}"),
    }
    Ok(executor::Runtimes {
        process: Arc::new(process),
        docker: engine.clone().map(|d| d as Arc<dyn shoal_runtime::Driver>),
        engine: engine.ok(),
        images: None,
    })
}

fn load_identity(cfg: &AgentConfig) -> anyhow::Result<Identity> {
    let id = match &cfg.tls {
        Tls::SelfIssued { ca_dir } => Identity::self_issued(ca_dir, &cfg.name)
            .with_context(|| format!("issuing a certificate from {}", ca_dir.display()))?,
        Tls::Files { cert, key, ca } => {
            Identity::load(cert, key, ca).context("loading the node certificate")?
        }
    };
    if id.name != cfg.name {
        bail!(
            "the certificate is issued to {:?} but this agent is named {:?}",
            id.name,
            cfg.name
        );
    }
    Ok(id)
}

/// Lists the images Docker holds every [`IMAGES_INTERVAL`] and sends changes.
async fn list_images(
    engine: Arc<shoal_runtime::DockerDriver>,
    tx: tokio::sync::mpsc::Sender<Vec<String>>,
    stop: CancellationToken,
) {
    let mut last = None;
    loop {
        match engine.images().await {
            Ok(images) if last.as_ref() != Some(&images) => {
                last = Some(images.clone());
                if tx.send(images).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("listing docker images failed: {e}"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(IMAGES_INTERVAL) => {}
        }
    }
}

/// Spawns a named thread, failing with a clear error. Bulk workers (`nice` > 0)
/// run at a lower CPU priority, so on a busy machine they yield to the loop and the
/// network tasks that carry SWIM.
fn thread<T: Send + 'static>(
    name: &str,
    nice: i32,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if nice != 0 {
                // SAFETY: plain syscalls; on Linux a thread's nice value is its own,
                // and `who = tid` names the calling thread.
                unsafe {
                    let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                    libc::setpriority(libc::PRIO_PROCESS, tid, nice);
                }
            }
            f()
        })
        .with_context(|| format!("starting the {name} thread"))
}

/// Nice value of the bulk workers (orchestration passes, blob chunks).
const BULK_NICE: i32 = 10;

/// Runs an agent until `shutdown` resolves, then leaves the cluster gracefully.
/// Returns an error if it cannot start, or had to stop (e.g. a live node holds its
/// name).
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // --- setup ---------------------------------------------------------------
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let store = RedbStore::open(&cfg.data_dir.join("state.redb"))?;
    let identity = load_identity(&cfg)?;
    let net_cfg = NetConfig {
        incoming_capacity: cfg.perf.incoming_frames,
        ..NetConfig::default()
    };
    let (net, frames) = Net::bind(cfg.listen, &identity, net_cfg)
        .with_context(|| format!("binding QUIC on {}", cfg.listen))?;
    let listener = tokio::net::TcpListener::bind(cfg.api)
        .await
        .with_context(|| format!("binding the HTTP API on {}", cfg.api))?;
    let dns_server = match cfg.dns {
        None => None,
        Some(addr) => Some(DnsServer::bind(addr).await.with_context(|| {
            format!(
                "binding DNS on {addr} (UDP and TCP); pick another with --dns ADDR, or --dns off"
            )
        })?),
    };

    let stop = CancellationToken::new();
    let api_stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut threads: Vec<(&str, std::thread::JoinHandle<()>)> = Vec::new();
    {
        let stop = stop.clone();
        tracker.spawn(async move {
            tokio::select! {
                () = shutdown => stop.cancel(),
                // Stopped from inside (e.g. refused at join): nothing to wait for.
                () = stop.cancelled() => {}
            }
        });
    }

    let start = Instant::now();
    // Generations must grow across restarts of the same node: microseconds of wall time.
    let gen = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64);
    let seed = gen
        ^ cfg.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let now = Now {
        mono_ms: 0,
        wall_ms: wall_ms(),
    };
    let mut node = Node::new(cfg.core_config(), gen, seed, now);
    let restored = node
        .restore(store.load()?)
        .context("restoring persisted state")?;

    let channels = channels::Channels::default();
    let perf = cfg.perf.clone();
    let (views_tx, views_rx) = watch::channel(Arc::new(views::Views::default()));
    let host_cfg = HostConfig {
        cache_dir: Some(cfg.policy_cache.clone()),
        ..HostConfig::default()
    };
    let kv = Arc::new(plugins::KvFromViews(views_rx.clone()));
    let host = tokio::task::spawn_blocking(move || PolicyHost::new(host_cfg))
        .await
        .context("starting the policy host")?
        .context("starting the policy host")?
        .with_kv(kv);
    let host = Arc::new(host);

    // Blob worker.
    let blob_store = blobs::open(&cfg.data_dir.join("blobs")).context("opening the blob store")?;
    let (blob_tx, blob_rx) = channels.bounded("blob_inbox", perf.blob_inbox);
    let (blob_ev_tx, blob_ev_rx) = channels.bounded("blob_events", perf.blob_events);
    let (blob_status_tx, blob_status_rx) = watch::channel(Arc::new(blobs::BlobStatus::default()));
    {
        let (store, net, stop, rate) = (
            blob_store.clone(),
            net.clone(),
            stop.clone(),
            cfg.upload_rate(),
        );
        let gc = blobs::GcConfig {
            cap: cfg.blob_cap,
            grace: cfg.blob_gc_grace,
        };
        threads.push((
            "blob worker",
            thread("shoal-blobs", BULK_NICE, move || {
                blobs::run(
                    store,
                    rate,
                    gc,
                    net,
                    seed,
                    blob_rx,
                    blob_ev_tx,
                    blob_status_tx,
                    stop,
                )
            })?,
        ));
    }

    // Persister.
    let (persist_tx, persist_rx) = channels.bounded("persist", perf.persist_queue);
    let persist_errors = Arc::new(AtomicU64::new(0));
    let persister = {
        let (net, errors) = (net.clone(), persist_errors.clone());
        thread("shoal-persist", 0, move || {
            persist::run(store, net, persist_rx, errors);
        })?
    };

    // Runtimes, executor, image lister, image task.
    let mut runtimes = open_runtimes(&cfg).await?;
    let (image_tx, image_rx) = channels.bounded("image_requests", perf.image_requests);
    let (pull_tx, pull_rx) = watch::channel(images::PullStatus::default());
    runtimes.images = Some(images::ImageHandle {
        cmds: image_tx.clone(),
        status: pull_rx,
    });
    let mut runtime_names = vec!["process".to_string()];
    if runtimes.docker.is_ok() {
        runtime_names.push("docker".to_string());
    }
    let (images_tx, images_rx) = channels.bounded("image_lists", perf.image_lists);
    if let Some(engine) = runtimes.engine.clone() {
        tracker.spawn(list_images(engine, images_tx, stop.clone()));
    }
    let (desired_tx, desired_rx) = watch::channel(executor::Desired::default());
    let (exec_tx, exec_rx) = channels.bounded("exec_events", perf.exec_events);
    let endpoint_ip = match cfg.advertise.ip() {
        ip if ip.is_unspecified() => std::net::IpAddr::from([127, 0, 0, 1]),
        ip => ip,
    };
    let exec_task = tracker.spawn(executor::run(
        runtimes.clone(),
        endpoint_ip,
        desired_rx,
        exec_tx,
        stop.clone(),
        cfg.drain_on_exit,
        tracker.clone(),
    ));

    // Orchestration worker.
    let (pass_tx, pass_rx) = channels.bounded("pass_requests", 1);
    let (pass_res_tx, pass_res_rx) = channels.bounded("pass_results", perf.pass_results);
    let orch_worker = {
        let worker = orchestrate::OrchWorker::new(
            &cfg.name,
            wall_ms(),
            !cfg.join.is_empty(),
            host.clone(),
            desired_tx,
            endpoint_ip,
        );
        thread("shoal-orchestrate", BULK_NICE, move || {
            worker.run(pass_rx, pass_res_tx)
        })?
    };

    // Discovery: the catalog task and the DNS server, both fed by the views.
    let (resolver_tx, resolver_rx) = watch::channel(Arc::new(Resolver::build(
        shoal_discovery::Catalog::default(),
        &shoal_discovery::InOrder,
        None,
    )));
    tracker.spawn(discovery::run(
        views_rx.clone(),
        host.clone(),
        resolver_tx,
        stop.clone(),
    ));
    let dns_stats = Arc::new(DnsStats::default());
    let dns_addr = match dns_server {
        None => None,
        Some(server) => {
            let addr = server.local_addr().ok();
            server
                .spawn(
                    resolver_rx.clone(),
                    Arc::new(cfg.dns_config.clone()),
                    dns_stats.clone(),
                    stop.clone(),
                    &tracker,
                )
                .context("starting the DNS server")?;
            addr
        }
    };

    // Host probe.
    let (host_tx, host_rx) = channels.bounded("host_readings", perf.host_readings);
    tracker.spawn(host_probe::run(
        host_probe::HostProbe::new(&cfg.data_dir),
        cfg.resource_interval(),
        host_tx,
        stop.clone(),
    ));

    // Logs over the mesh: asks of the API, and peers' asks and answers.
    let (logs_tx, logs_rx) = channels.bounded("logs_inbox", perf.logs_inbox);
    tracker.spawn(mesh_logs::run(
        net.clone(),
        runtimes.clone(),
        logs_rx,
        stop.clone(),
        tracker.clone(),
    ));

    // The API.
    let (cmd_tx, cmd_rx) = channels.bounded("commands", perf.command_queue);
    tracker.spawn(images::run(
        images::ImageTask {
            me: cfg.name.clone(),
            engine: runtimes.engine.clone(),
            store: blob_store.clone(),
            blobs: blob_tx.clone(),
            blob_status: blob_status_rx.clone(),
            commands: cmd_tx.clone(),
            views: views_rx.clone(),
            scratch: cfg.data_dir.join("images"),
            status: pull_tx,
        },
        image_rx,
        stop.clone(),
        tracker.clone(),
    ));
    let (compiled_tx, compiled_rx) = channels.bounded("compile_results", perf.compile_results);
    let guard = http_guard::HttpGuard {
        hosts: cfg.api_hosts.clone(),
        token: cfg.api_token.as_deref().map(Arc::from),
    };
    let api_state = api::AppState {
        tx: cmd_tx,
        views: views_rx,
        blobs: blob_tx.clone(),
        blob_status: blob_status_rx,
        images: image_tx,
        host: host.clone(),
        runtimes,
        net: net.clone(),
        logs: logs_tx.clone(),
        discovery: resolver_rx,
        dns_stats: dns_addr.map(|_| dns_stats),
    };

    let mut inputs = Inputs {
        commands: cmd_rx,
        frames,
        exec: exec_rx,
        compiled: compiled_rx,
        blobs: blob_ev_rx,
        passes: pass_res_rx,
        host: host_rx,
        images: images_rx,
    };
    let outputs = Outputs {
        views: views_tx,
        persist: persist_tx,
        persist_errors,
        blobs: blob_tx,
        logs: logs_tx,
        passes: pass_tx,
        compiled: compiled_tx,
    };
    let name = cfg.name.clone();
    let (quic, api_addr) = (cfg.listen, cfg.api);
    let mut lp = AgentLoop::new(
        cfg,
        node,
        start,
        net.clone(),
        outputs,
        blob_store,
        host,
        tracker.clone(),
        channels,
        runtime_names,
    );
    lp.begin()?;
    // Only now: the first Views holds what was restored from disk, so no read
    // after a restart answers from an empty state. (Connections wait in the
    // listener's backlog meanwhile.)
    let api_task = tracker.spawn(api::serve(listener, api_state, guard, api_stop.clone()));
    let dns_text = dns_addr.map_or_else(|| "off".to_string(), |a| a.to_string());
    tracing::info!(%name, %quic, api = %api_addr, dns = %dns_text, restored, "agent started");

    // --- the loop --------------------------------------------------------------
    lp.run(&mut inputs, &stop).await;
    let fatal = lp.fatal().map(str::to_string);

    // --- shutdown --------------------------------------------------------------
    stop.cancel();
    // The executor stops its workloads only when asked to drain; otherwise they
    // keep running and the next start adopts them. Keep draining its events so it
    // never blocks on a full channel.
    let mut exec_task = exec_task;
    loop {
        tokio::select! {
            _ = &mut exec_task => break,
            ev = inputs.exec.recv() => if ev.is_none() {
                let _ = (&mut exec_task).await;
                break;
            },
        }
    }
    lp.leave().await;
    // The loop's senders go: the persister writes what is left, sends its frames
    // and ends; the orchestration worker ends.
    drop(inputs);
    drop(lp);
    let joined = tokio::task::spawn_blocking(move || {
        let mut failed = Vec::new();
        if persister.join().is_err() {
            failed.push("persister");
        }
        if orch_worker.join().is_err() {
            failed.push("orchestration worker");
        }
        for (what, t) in threads {
            if t.join().is_err() {
                failed.push(what);
            }
        }
        failed
    })
    .await
    .unwrap_or_default();
    for what in joined {
        tracing::error!("the {what} thread panicked");
    }
    api_stop.cancel();
    let _ = api_task.await;
    net.close(Duration::from_secs(2)).await;
    tracker.close();
    tracker.wait().await;
    match fatal {
        Some(reason) => Err(anyhow::anyhow!(reason)),
        None => Ok(()),
    }
}
