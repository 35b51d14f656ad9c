//! The `docker` driver: workloads as containers of the local Docker Engine, reached
//! over its Unix socket with bollard. No registry is ever contacted: an image must be
//! on this node already, put there by [`DockerDriver::load_image`] (images travel
//! between nodes as blobs, saved with [`DockerDriver::save_image`]).
//!
//! Containers are named `shoal-<service>-<slot>-<hash>` (hash of node and alloc id) and
//! carry the labels in [`labels`]; everything else (finding, adopting, listing) goes by
//! those labels, restricted to this driver's node name, so two agents sharing one
//! engine never adopt or stop each other's containers.
//!
//! Environment: the spec's `env`, then `SHOAL_ALLOC_ID`, `SHOAL_SERVICE`, `SHOAL_SLOT`,
//! `SHOAL_VERSION`, and `PORT_<NAME>` (container port) per port plus `PORT` for the
//! first. Containers log with the `json-file` driver, capped at 3 × 10 MB, and are not
//! restarted by the engine: the agent decides restarts.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HostConfig,
    HostConfigLogConfig, PortBinding, PortMap,
};
use bollard::query_parameters::{
    CreateContainerOptions, ImportImageOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, RemoveImageOptions, StatsOptions, StopContainerOptions,
};
use bollard::Docker;
use futures_util::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;

use crate::driver::Driver;
use crate::error::DriverError;
use crate::logfile::{LogChunk, LogQuery};
use crate::spec::{
    check_alloc_id, port_env_name, Protocol, RunState, Usage, WorkloadKind, WorkloadSpec,
    WorkloadStatus,
};

const NAME: &str = "docker";
const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// bollard's per-request timeout bounds `docker stop`, which waits the grace period
/// inside one request; longer graces are cut to this.
const MAX_GRACE: Duration = Duration::from_secs(100);

/// Labels shoal puts on its containers (keys starting with `shoal.` are reserved).
pub mod labels {
    /// `"true"` on every container shoal manages.
    pub const MANAGED: &str = "shoal.managed";
    /// Name of the node whose agent started the container.
    pub const NODE: &str = "shoal.node";
    /// Allocation id.
    pub const ALLOC: &str = "shoal.alloc";
    /// Service name.
    pub const SERVICE: &str = "shoal.service";
    /// Slot number.
    pub const SLOT: &str = "shoal.slot";
    /// Service spec version.
    pub const VERSION: &str = "shoal.version";
    /// Port names and container ports (host ports with host networking):
    /// `http=8080/tcp,dns=53/udp`.
    pub const PORTS: &str = "shoal.ports";
    /// `host` when the container runs in the host's network namespace.
    pub const NETWORK: &str = "shoal.network";
}

/// How to reach Docker Engine and how to publish ports.
#[derive(Debug, Clone)]
pub struct DockerOptions {
    /// This node's name, written on and filtered by every container (non-empty).
    pub node: String,
    /// Engine socket; `None` uses `$DOCKER_HOST` if it is `unix://…`, else
    /// `/var/run/docker.sock`.
    pub socket: Option<PathBuf>,
    /// Host address published ports bind to; `0.0.0.0` (the default) makes workloads
    /// reachable from other nodes.
    pub publish_ip: IpAddr,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl DockerOptions {
    /// Defaults for node `node`: default socket, publish on all addresses, 120 s timeout.
    pub fn new(node: impl Into<String>) -> Self {
        DockerOptions {
            node: node.into(),
            socket: None,
            publish_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            timeout: Duration::from_secs(120),
        }
    }
}

/// Runs workloads as containers of the local Docker Engine.
pub struct DockerDriver {
    docker: Docker,
    node: String,
    publish_ip: IpAddr,
    /// Previous CPU reading per container id, for `usage` deltas.
    cpu: Mutex<HashMap<String, CpuSample>>,
}

#[derive(Clone, Copy)]
struct CpuSample {
    container_ns: u64,
    system_ns: u64,
    at: Instant,
}

fn status_code(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn docker_err(what: impl Into<String>) -> impl FnOnce(BollardError) -> DriverError {
    let what = what.into();
    move |source| DriverError::Docker { what, source }
}

/// Milliseconds since the epoch of an RFC 3339 UTC time as Docker writes it
/// (`2024-05-01T12:34:56.123456789Z`); `None` for anything else or before 1970
/// (Docker's "never": `0001-01-01T00:00:00Z`).
fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut millis = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        let ms_digits = &frac[..digits.min(3)];
        millis = format!("{ms_digits:0<3}").parse().ok()?;
        rest = &frac[digits..];
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (o[1..3].parse::<i64>().ok()? * 3600 + o[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = days * 86400 + h * 3600 + mi * 60 + sec - offset_secs;
    let ms = secs.checked_mul(1000)?.checked_add(millis)?;
    u64::try_from(ms).ok()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Parses the [`labels::PORTS`] label: `(name, container port, protocol)`.
fn parse_ports_label(s: &str) -> Vec<(String, u16, Protocol)> {
    s.split(',')
        .filter_map(|item| {
            let (name, rest) = item.split_once('=')?;
            let (port, proto) = rest.split_once('/')?;
            Some((
                name.to_string(),
                port.parse().ok()?,
                Protocol::parse(proto)?,
            ))
        })
        .collect()
}

impl DockerDriver {
    /// Connects to the local engine for node `node` with default options.
    pub async fn connect(node: impl Into<String>) -> Result<Self, DriverError> {
        Self::connect_with(DockerOptions::new(node)).await
    }

    /// Connects to the engine and agrees on an API version it supports.
    pub async fn connect_with(opts: DockerOptions) -> Result<Self, DriverError> {
        if opts.node.is_empty() {
            return Err(DriverError::InvalidConfig {
                reason: "the docker driver needs a non-empty node name".into(),
            });
        }
        let socket = match &opts.socket {
            Some(p) => p.to_string_lossy().into_owned(),
            None => std::env::var("DOCKER_HOST")
                .ok()
                .and_then(|h| h.strip_prefix("unix://").map(str::to_string))
                .unwrap_or_else(|| DEFAULT_SOCKET.to_string()),
        };
        let unavailable = |source| DriverError::DockerUnavailable {
            socket: socket.clone(),
            source,
        };
        let docker = Docker::connect_with_socket(
            &socket,
            opts.timeout.as_secs().max(1),
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(unavailable)?;
        // bollard speaks a newer API than many engines (20.10 stops at 1.41); without
        // negotiation every call to such an engine is refused.
        let docker = docker.negotiate_version().await.map_err(unavailable)?;
        Ok(DockerDriver {
            docker,
            node: opts.node,
            publish_ip: opts.publish_ip,
            cpu: Mutex::new(HashMap::new()),
        })
    }

    /// The node name this driver's containers are labelled with.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The bollard client, for helpers in this crate.
    #[cfg_attr(not(feature = "testutil"), allow(dead_code))]
    pub(crate) fn client(&self) -> &Docker {
        &self.docker
    }

    /// The container name for `spec` on this node.
    pub fn container_name(&self, spec: &WorkloadSpec) -> String {
        let mut h = blake3::Hasher::new();
        h.update(self.node.as_bytes());
        h.update(b"\0");
        h.update(spec.alloc_id.as_bytes());
        let hex = h.finalize().to_hex();
        format!("shoal-{}-{}-{}", spec.service, spec.slot, &hex[..10])
    }

    /// Every tagged image on this node (`name:tag`), sorted: what the scheduler's
    /// image-locality preference sees.
    pub async fn images(&self) -> Result<Vec<String>, DriverError> {
        let list = self
            .docker
            .list_images(None::<bollard::query_parameters::ListImagesOptions>)
            .await
            .map_err(docker_err("list images"))?;
        let mut out: Vec<String> = list
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .filter(|t| !t.starts_with("<none>"))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The id (`sha256:…`) of `image` on this node, or `None` if it is not here.
    pub async fn image_id(&self, image: &str) -> Result<Option<String>, DriverError> {
        match self.docker.inspect_image(image).await {
            Ok(i) => Ok(i.id),
            Err(e) if status_code(&e) == Some(404) => Ok(None),
            Err(e) => Err(docker_err(format!("inspect image {image}"))(e)),
        }
    }

    /// The layer diff ids (bottom first) of every image on this node: a layer is
    /// in the engine when some image's list starts with it and everything below it.
    pub async fn layer_stacks(&self) -> Result<Vec<Vec<String>>, DriverError> {
        let list = self
            .docker
            .list_images(None::<bollard::query_parameters::ListImagesOptions>)
            .await
            .map_err(docker_err("list images"))?;
        let mut out = Vec::new();
        for i in list {
            match self.docker.inspect_image(&i.id).await {
                Ok(info) => {
                    if let Some(layers) = info.root_fs.and_then(|r| r.layers) {
                        out.push(layers);
                    }
                }
                Err(e) if status_code(&e) == Some(404) => {}
                Err(e) => return Err(docker_err(format!("inspect image {}", i.id))(e)),
            }
        }
        Ok(out)
    }

    /// True if `image` is present on this node.
    pub async fn has_image(&self, image: &str) -> Result<bool, DriverError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if status_code(&e) == Some(404) => Ok(false),
            Err(e) => Err(docker_err(format!("inspect image {image}"))(e)),
        }
    }

    /// Writes `image` as a `docker save` tarball to `dest` (atomically: a temp file is
    /// renamed into place). Returns the number of bytes written.
    pub async fn save_image(&self, image: &str, dest: &Path) -> Result<u64, DriverError> {
        if !self.has_image(image).await? {
            return Err(DriverError::ImageMissing {
                image: image.to_string(),
            });
        }
        let io_err = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| DriverError::Io { what, path, source }
        };
        let mut tmp_name = dest.as_os_str().to_owned();
        tmp_name.push(".partial");
        let tmp = PathBuf::from(tmp_name);
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(io_err("create", &tmp))?;
        let mut stream = self.docker.export_image(image);
        let mut written = 0u64;
        let result: Result<(), DriverError> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(docker_err(format!("save image {image}")))?;
                file.write_all(&chunk)
                    .await
                    .map_err(io_err("write", &tmp))?;
                written += chunk.len() as u64;
            }
            file.sync_all().await.map_err(io_err("write", &tmp))?;
            tokio::fs::rename(&tmp, dest)
                .await
                .map_err(io_err("rename into place", dest))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result.map(|()| written)
    }

    /// Loads a `docker save` tarball into the engine. Returns what the engine says it
    /// loaded (image references, or ids for untagged images).
    pub async fn load_image(&self, src: &Path) -> Result<Vec<String>, DriverError> {
        let file = tokio::fs::File::open(src)
            .await
            .map_err(|source| DriverError::Io {
                what: "open image tarball",
                path: src.to_path_buf(),
                source,
            })?;
        // Streamed in chunks: image tarballs can be far larger than memory wants.
        let body = futures_util::stream::try_unfold(file, |mut f| async move {
            let mut buf = vec![0u8; 256 * 1024];
            let n = tokio::io::AsyncReadExt::read(&mut f, &mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            buf.truncate(n);
            Ok(Some((bytes::Bytes::from(buf), f)))
        });
        let what = format!("load image tarball {}", src.display());
        let infos: Vec<_> = self
            .docker
            .import_image_stream(ImportImageOptions::default(), body, None)
            .try_collect()
            .await
            .map_err(docker_err(what))?;
        Ok(infos
            .iter()
            .filter_map(|i| i.stream.as_deref())
            .filter_map(|s| {
                let s = s.trim();
                s.strip_prefix("Loaded image: ")
                    .or_else(|| s.strip_prefix("Loaded image ID: "))
                    .map(str::to_string)
            })
            .collect())
    }

    /// Removes an image reference from this node (`Ok` if it was not there).
    pub async fn remove_image(&self, image: &str) -> Result<(), DriverError> {
        let opts = RemoveImageOptions {
            force: false,
            noprune: false,
            platforms: None,
        };
        match self.docker.remove_image(image, Some(opts), None).await {
            Ok(_) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(docker_err(format!("remove image {image}"))(e)),
        }
    }

    /// Ids of this node's containers, optionally only those of one alloc.
    async fn find(&self, alloc_id: Option<&str>) -> Result<Vec<String>, DriverError> {
        let mut label_filters = vec![
            format!("{}=true", labels::MANAGED),
            format!("{}={}", labels::NODE, self.node),
        ];
        if let Some(a) = alloc_id {
            label_filters.push(format!("{}={a}", labels::ALLOC));
        }
        let opts = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_string(), label_filters)])),
            ..Default::default()
        };
        let found = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(docker_err("list containers"))?;
        Ok(found.into_iter().filter_map(|c| c.id).collect())
    }

    /// Inspects a container; `None` if it has gone meanwhile.
    async fn inspect(&self, id: &str) -> Result<Option<ContainerInspectResponse>, DriverError> {
        match self.docker.inspect_container(id, None).await {
            Ok(r) => Ok(Some(r)),
            Err(e) if status_code(&e) == Some(404) => Ok(None),
            Err(e) => Err(docker_err(format!("inspect container {id}"))(e)),
        }
    }

    /// The status of the (first) container of `alloc_id`, with its inspect answer.
    async fn find_one(
        &self,
        alloc_id: &str,
    ) -> Result<Option<(WorkloadStatus, ContainerInspectResponse)>, DriverError> {
        for id in self.find(Some(alloc_id)).await? {
            if let Some(resp) = self.inspect(&id).await? {
                if let Some(st) = status_from_inspect(&resp) {
                    return Ok(Some((st, resp)));
                }
            }
        }
        Ok(None)
    }

    /// Stops and removes one container; a container already gone is fine.
    async fn remove(&self, id: &str, grace: Duration) -> Result<(), DriverError> {
        let t = grace.min(MAX_GRACE).as_secs_f64().ceil() as i32;
        let stop = StopContainerOptions {
            t: Some(t),
            signal: None,
        };
        match self.docker.stop_container(id, Some(stop)).await {
            Ok(()) => {}
            Err(e) if matches!(status_code(&e), Some(304 | 404)) => {}
            Err(e) => return Err(docker_err(format!("stop container {id}"))(e)),
        }
        let rm = RemoveContainerOptions {
            force: true,
            v: true,
            link: false,
        };
        match self.docker.remove_container(id, Some(rm)).await {
            Ok(()) => {}
            // 409: a removal is already under way, which is what we want.
            Err(e) if matches!(status_code(&e), Some(404 | 409)) => {}
            Err(e) => return Err(docker_err(format!("remove container {id}"))(e)),
        }
        self.cpu
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(())
    }

    fn create_body(
        &self,
        spec: &WorkloadSpec,
        image: &str,
        host_network: bool,
    ) -> Result<ContainerCreateBody, DriverError> {
        let mut lbl: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        // With host networking a port is a host port: the fixed one, or a free one
        // picked now; the workload listens on it (`PORT_<NAME>`), and it is the one
        // reported. Otherwise the container port, mapped by the engine.
        let mut listen = Vec::new();
        for p in &spec.ports {
            let port = match (host_network, p.host_port) {
                (false, _) => p.container_port,
                (true, Some(h)) => h,
                (true, None) => {
                    crate::process::pick_port(p.protocol).map_err(|e| DriverError::Io {
                        what: "pick a free host port",
                        path: std::path::PathBuf::from("/proc/net"),
                        source: e,
                    })?
                }
            };
            listen.push(port);
        }
        let ports_label: Vec<String> = spec
            .ports
            .iter()
            .zip(&listen)
            .map(|(p, port)| format!("{}={port}/{}", p.name, p.protocol.as_str()))
            .collect();
        if host_network {
            lbl.insert(labels::NETWORK.to_string(), "host".to_string());
        }
        for (k, v) in [
            (labels::MANAGED, "true".to_string()),
            (labels::NODE, self.node.clone()),
            (labels::ALLOC, spec.alloc_id.clone()),
            (labels::SERVICE, spec.service.clone()),
            (labels::SLOT, spec.slot.to_string()),
            (labels::VERSION, spec.version.to_string()),
            (labels::PORTS, ports_label.join(",")),
        ] {
            lbl.insert(k.to_string(), v);
        }

        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.push(format!("SHOAL_ALLOC_ID={}", spec.alloc_id));
        env.push(format!("SHOAL_SERVICE={}", spec.service));
        env.push(format!("SHOAL_SLOT={}", spec.slot));
        env.push(format!("SHOAL_VERSION={}", spec.version));
        for (i, (p, port)) in spec.ports.iter().zip(&listen).enumerate() {
            env.push(format!("{}={port}", port_env_name(&p.name)));
            if i == 0 {
                env.push(format!("PORT={port}"));
            }
        }

        let mut exposed = Vec::new();
        let mut bindings = PortMap::new();
        for p in spec.ports.iter().filter(|_| !host_network) {
            let key = format!("{}/{}", p.container_port, p.protocol.as_str());
            exposed.push(key.clone());
            bindings.insert(
                key,
                Some(vec![PortBinding {
                    host_ip: Some(self.publish_ip.to_string()),
                    // An empty host port asks the engine for a free one.
                    host_port: Some(p.host_port.map(|h| h.to_string()).unwrap_or_default()),
                }]),
            );
        }

        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Ok(ContainerCreateBody {
            image: Some(image.to_string()),
            env: Some(env),
            labels: Some(lbl),
            exposed_ports: Some(exposed),
            host_config: Some(HostConfig {
                nano_cpus: spec.cpu_millis.map(|m| clamp(m.saturating_mul(1_000_000))),
                memory: spec.memory_bytes.map(clamp),
                port_bindings: Some(bindings),
                network_mode: host_network.then(|| "host".to_string()),
                log_config: Some(HostConfigLogConfig {
                    typ: Some("json-file".into()),
                    config: Some(HashMap::from([
                        ("max-size".to_string(), "10m".to_string()),
                        ("max-file".to_string(), "3".to_string()),
                    ])),
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}

/// Builds a status from an inspect answer; `None` if the labels are not shoal's.
fn status_from_inspect(resp: &ContainerInspectResponse) -> Option<WorkloadStatus> {
    let lbl = resp.config.as_ref()?.labels.as_ref()?;
    let alloc_id = lbl.get(labels::ALLOC)?.clone();
    let service = lbl.get(labels::SERVICE)?.clone();
    let slot = lbl.get(labels::SLOT)?.parse().ok()?;
    let version = lbl.get(labels::VERSION)?.parse().ok()?;
    let st = resp.state.as_ref();
    let exit_code = st
        .and_then(|s| s.exit_code)
        .and_then(|c| i32::try_from(c).ok());
    let state = match st.and_then(|s| s.status) {
        Some(ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::PAUSED) => {
            RunState::Running
        }
        Some(ContainerStateStatusEnum::CREATED | ContainerStateStatusEnum::RESTARTING) => {
            RunState::Starting
        }
        _ => {
            let st = st.cloned().unwrap_or_default();
            if st.oom_killed == Some(true) {
                let limit = resp
                    .host_config
                    .as_ref()
                    .and_then(|h| h.memory)
                    .filter(|m| *m > 0)
                    .map(|m| format!(" (limit {m} bytes)"))
                    .unwrap_or_default();
                RunState::Failed {
                    reason: format!("killed: out of memory{limit}"),
                }
            } else if let Some(err) = st.error.filter(|e| !e.is_empty()) {
                RunState::Failed { reason: err }
            } else {
                RunState::Exited { code: exit_code }
            }
        }
    };
    let bound = resp
        .network_settings
        .as_ref()
        .and_then(|n| n.ports.as_ref());
    let host_network = lbl.get(labels::NETWORK).map(String::as_str) == Some("host");
    let ports = lbl
        .get(labels::PORTS)
        .map(|s| parse_ports_label(s))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, cport, proto)| {
            if host_network {
                // The label holds the host port the workload was told to use.
                return Some((name, cport));
            }
            let bindings = bound?
                .get(&format!("{cport}/{}", proto.as_str()))?
                .as_ref()?;
            // The engine may bind IPv4 and IPv6 separately (with different dynamic
            // ports on some versions); report the IPv4 one, which every node can use.
            let b = bindings
                .iter()
                .find(|b| !b.host_ip.as_deref().unwrap_or("").contains(':'))
                .or_else(|| bindings.first())?;
            let host: u16 = b.host_port.as_deref()?.parse().ok()?;
            Some((name, host))
        })
        .collect();
    let started_at_ms = st
        .and_then(|s| s.started_at.as_deref())
        .and_then(parse_rfc3339_ms)
        .unwrap_or(0);
    Some(WorkloadStatus {
        alloc_id,
        service,
        slot,
        version,
        handle: resp.id.clone().unwrap_or_default(),
        state,
        ports,
        started_at_ms,
    })
}

#[async_trait]
impl Driver for DockerDriver {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn start(&self, spec: &WorkloadSpec) -> Result<WorkloadStatus, DriverError> {
        spec.validate()?;
        let WorkloadKind::Docker {
            image,
            host_network,
        } = &spec.kind
        else {
            return Err(DriverError::Unsupported {
                driver: NAME,
                what: "a process command (use the process driver)".into(),
            });
        };
        // Idempotent: a live container for this alloc is kept; an ended one replaced.
        for id in self.find(Some(&spec.alloc_id)).await? {
            if let Some(resp) = self.inspect(&id).await? {
                match status_from_inspect(&resp) {
                    Some(st) if st.state.is_live() => return Ok(st),
                    _ => self.remove(&id, Duration::ZERO).await?,
                }
            }
        }
        if !self.has_image(image).await? {
            return Err(DriverError::ImageMissing {
                image: image.clone(),
            });
        }
        let name = self.container_name(spec);
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    platform: String::new(),
                }),
                self.create_body(spec, image, *host_network)?,
            )
            .await
            .map_err(docker_err(format!(
                "create container {name} for alloc {} from image {image}",
                spec.alloc_id
            )))?;
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            // Do not leave a created-but-dead container behind to be adopted later.
            let cleanup = self.remove(&created.id, Duration::ZERO).await;
            let what = match cleanup {
                Ok(()) => format!("start container {name} (removed it again)"),
                Err(_) => format!("start container {name} (could not remove it)"),
            };
            return Err(DriverError::Docker { what, source: e });
        }
        tracing::info!(alloc_id = %spec.alloc_id, container = %name, %image, "started container");
        let resp = self
            .inspect(&created.id)
            .await?
            .ok_or_else(|| DriverError::NotFound {
                driver: NAME,
                alloc_id: spec.alloc_id.clone(),
            })?;
        status_from_inspect(&resp).ok_or_else(|| DriverError::NotFound {
            driver: NAME,
            alloc_id: spec.alloc_id.clone(),
        })
    }

    async fn stop(&self, alloc_id: &str, grace: Duration) -> Result<(), DriverError> {
        check_alloc_id(alloc_id)?;
        for id in self.find(Some(alloc_id)).await? {
            self.remove(&id, grace).await?;
            tracing::info!(alloc_id, container = %id, "stopped and removed container");
        }
        Ok(())
    }

    async fn status(&self, alloc_id: &str) -> Result<Option<WorkloadStatus>, DriverError> {
        check_alloc_id(alloc_id)?;
        Ok(self.find_one(alloc_id).await?.map(|(st, _)| st))
    }

    async fn list(&self) -> Result<Vec<WorkloadStatus>, DriverError> {
        let mut out = Vec::new();
        for id in self.find(None).await? {
            if let Some(resp) = self.inspect(&id).await? {
                match status_from_inspect(&resp) {
                    Some(st) => out.push(st),
                    None => tracing::warn!(container = %id, "shoal container with broken labels"),
                }
            }
        }
        out.sort_by(|a, b| a.alloc_id.cmp(&b.alloc_id));
        Ok(out)
    }

    async fn usage(&self, alloc_id: &str) -> Result<Option<Usage>, DriverError> {
        check_alloc_id(alloc_id)?;
        let Some((st, _)) = self.find_one(alloc_id).await? else {
            return Ok(None);
        };
        if st.state != RunState::Running {
            return Ok(None);
        }
        let id = st.handle.as_str();
        // one_shot: answer at once instead of sampling for a second; CPU % is then
        // computed against this driver's previous reading.
        let opts = StatsOptions {
            stream: false,
            one_shot: true,
        };
        let stats = match self.docker.stats(id, Some(opts)).next().await {
            Some(Ok(s)) => s,
            Some(Err(e)) if status_code(&e) == Some(404) => return Ok(None),
            Some(Err(e)) => return Err(docker_err(format!("read stats of container {id}"))(e)),
            None => return Ok(None),
        };
        let mem = stats.memory_stats.unwrap_or_default();
        // As `docker stats` does: page cache that can be dropped is not the workload's.
        let inactive = mem
            .stats
            .as_ref()
            .and_then(|s| {
                s.get("total_inactive_file")
                    .or_else(|| s.get("inactive_file"))
            })
            .copied()
            .unwrap_or(0);
        let memory_bytes = mem.usage.unwrap_or(0).saturating_sub(inactive);

        let cpu = stats.cpu_stats.unwrap_or_default();
        let container_ns = cpu
            .cpu_usage
            .as_ref()
            .and_then(|u| u.total_usage)
            .unwrap_or(0);
        let system_ns = cpu.system_cpu_usage.unwrap_or(0);
        let online = cpu
            .online_cpus
            .filter(|n| *n > 0)
            .or_else(|| {
                cpu.cpu_usage
                    .as_ref()
                    .and_then(|u| u.percpu_usage.as_ref())
                    .map(|v| v.len() as u32)
            })
            .unwrap_or(1) as f64;
        let now = Instant::now();
        let prev = {
            let mut map = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
            map.insert(
                id.to_string(),
                CpuSample {
                    container_ns,
                    system_ns,
                    at: now,
                },
            )
        };
        let pre = stats.precpu_stats.unwrap_or_default();
        let pre_container = pre
            .cpu_usage
            .as_ref()
            .and_then(|u| u.total_usage)
            .unwrap_or(0);
        let pre_system = pre.system_cpu_usage.unwrap_or(0);
        let cpu_percent = match prev {
            // Share of all CPUs' time, scaled so one busy core is 100 %.
            Some(p) if system_ns > p.system_ns && now > p.at => {
                container_ns.saturating_sub(p.container_ns) as f64
                    / (system_ns - p.system_ns) as f64
                    * online
                    * 100.0
            }
            _ if pre_system > 0 && system_ns > pre_system => {
                container_ns.saturating_sub(pre_container) as f64 / (system_ns - pre_system) as f64
                    * online
                    * 100.0
            }
            _ => {
                // First reading: the average since the container started.
                let elapsed_ns = now_ms().saturating_sub(st.started_at_ms) as f64 * 1e6;
                if elapsed_ns > 0.0 {
                    container_ns as f64 / elapsed_ns * 100.0
                } else {
                    0.0
                }
            }
        };
        Ok(Some(Usage {
            cpu_percent,
            memory_bytes,
        }))
    }

    async fn logs(&self, alloc_id: &str, query: LogQuery) -> Result<LogChunk, DriverError> {
        check_alloc_id(alloc_id)?;
        let Some((st, _)) = self.find_one(alloc_id).await? else {
            return Err(DriverError::NotFound {
                driver: NAME,
                alloc_id: alloc_id.to_string(),
            });
        };
        let limit = query.limit.clamp(1, crate::MAX_LOG_CHUNK);
        // The engine rotates the log (json-file, 3 x 10 MB) and streams it; offsets
        // count bytes of that stream, and nothing beyond `limit` is kept in memory.
        let tail = match (query.offset, query.tail) {
            (None, Some(n)) => n.to_string(),
            _ => "all".to_string(),
        };
        let opts = LogsOptions {
            stdout: true,
            stderr: true,
            tail,
            ..Default::default()
        };
        let skip = query.offset.unwrap_or(0);
        let mut seen: u64 = 0;
        let mut out: Vec<u8> = Vec::new();
        let mut more = false;
        let mut stream = self.docker.logs(&st.handle, Some(opts));
        while let Some(item) = stream.next().await {
            let item = item.map_err(docker_err(format!("read logs of container {}", st.handle)))?;
            let bytes = item.into_bytes();
            let start = seen;
            seen += bytes.len() as u64;
            if seen <= skip {
                continue;
            }
            let from = skip.saturating_sub(start) as usize;
            out.extend_from_slice(&bytes[from..]);
            if query.tail.is_some() && query.offset.is_none() {
                // A tail: keep the newest `limit` bytes.
                if out.len() > limit {
                    out.drain(..out.len() - limit);
                }
            } else if out.len() >= limit {
                more = out.len() > limit || stream.next().await.is_some();
                out.truncate(limit);
                break;
            }
        }
        let next_offset = if query.tail.is_some() && query.offset.is_none() {
            // Offsets count bytes of the whole stream: count it (without keeping it)
            // so a follower can continue after the tail.
            let opts = LogsOptions {
                stdout: true,
                stderr: true,
                tail: "all".to_string(),
                ..Default::default()
            };
            let mut total = 0u64;
            let mut all = self.docker.logs(&st.handle, Some(opts));
            while let Some(item) = all.next().await {
                let item =
                    item.map_err(docker_err(format!("read logs of container {}", st.handle)))?;
                total += item.into_bytes().len() as u64;
            }
            total
        } else {
            skip.min(seen) + out.len() as u64
        };
        Ok(LogChunk {
            bytes: out,
            next_offset,
            more,
        })
    }

    async fn exec(&self, alloc_id: &str, command: &[String]) -> Result<i32, DriverError> {
        check_alloc_id(alloc_id)?;
        let Some((st, _)) = self.find_one(alloc_id).await? else {
            return Err(DriverError::NotFound {
                driver: NAME,
                alloc_id: alloc_id.to_string(),
            });
        };
        let what = || format!("run a health check in container {}", st.handle);
        let created = self
            .docker
            .create_exec(
                &st.handle,
                bollard::exec::CreateExecOptions {
                    cmd: Some(command.to_vec()),
                    attach_stdout: Some(false),
                    attach_stderr: Some(false),
                    ..Default::default()
                },
            )
            .await
            .map_err(docker_err(what()))?;
        let started = self
            .docker
            .start_exec(
                &created.id,
                Some(bollard::exec::StartExecOptions {
                    detach: true,
                    ..Default::default()
                }),
            )
            .await
            .map_err(docker_err(what()))?;
        drop(started);
        // A detached exec is polled until it ends; the caller bounds the wait.
        loop {
            let info = self
                .docker
                .inspect_exec(&created.id)
                .await
                .map_err(docker_err(what()))?;
            if info.running != Some(true) {
                if let Some(code) = info.exit_code {
                    return Ok(i32::try_from(code).unwrap_or(i32::MAX));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_timestamps() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2024-05-01T12:34:56.123456789Z"),
            Some(1_714_566_896_123)
        );
        assert_eq!(
            parse_rfc3339_ms("2024-05-01T14:34:56.5+02:00"),
            Some(1_714_566_896_500)
        );
        assert_eq!(parse_rfc3339_ms("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }

    #[test]
    fn ports_label_round_trips() {
        assert_eq!(
            parse_ports_label("http=8080/tcp,dns=53/udp,bad,x=1/sctp"),
            vec![
                ("http".to_string(), 8080, Protocol::Tcp),
                ("dns".to_string(), 53, Protocol::Udp)
            ]
        );
        assert!(parse_ports_label("").is_empty());
    }
}
