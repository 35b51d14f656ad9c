//! Agent configuration: a TOML file (see `examples/agent.toml`) overridden by flags,
//! validated once at load.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use shoal_core::Profile;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped fields.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (names the field).
        message: String,
    },
    /// A required setting is missing.
    #[error("missing setting `{0}` (give it in the config file or as --{1})")]
    Missing(&'static str, &'static str),
    /// A setting has an invalid value.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// Timing knobs; every one has a documented default from the chosen profile.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tuning {
    /// Interval between pushes of pending changes (ms).
    pub gossip_interval_ms: Option<u64>,
    /// Peers each push goes to.
    pub fanout: Option<usize>,
    /// Interval between anti-entropy rounds (ms).
    pub sync_interval_ms: Option<u64>,
    /// Interval between host resource readings (ms).
    pub resource_interval_ms: Option<u64>,
    /// Expected cluster size, used to size SWIM timeouts and retransmits.
    pub cluster_size: Option<u32>,
    /// Cap on blob upload to peers, bytes per second (0: no cap; default 64 MiB/s).
    pub upload_bytes_per_sec: Option<u64>,
    /// A node that left gracefully this long ago is forgotten by every agent (s;
    /// default 86400, a day).
    pub forget_left_after_s: Option<u64>,
}

/// Performance knobs in one place (`[perf]` in the config file): the size of every
/// queue between the agent's tasks, and the loop's timing thresholds. The defaults
/// suit clusters of up to a few hundred nodes and a thousand replicas per agent.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Perf {
    /// API writes waiting for the loop.
    pub command_queue: usize,
    /// Received frames waiting for the loop (datagrams beyond it are dropped).
    pub incoming_frames: usize,
    /// Executor events (reports) waiting for the loop.
    pub exec_events: usize,
    /// Transfer frames and commands waiting for the blob worker.
    pub blob_inbox: usize,
    /// Blob worker events waiting for the loop.
    pub blob_events: usize,
    /// Log requests and answers (frames and API asks) waiting for the logs task.
    pub logs_inbox: usize,
    /// Pushes and pulls waiting for the image task.
    pub image_requests: usize,
    /// Batches waiting to be persisted.
    pub persist_queue: usize,
    /// Finished plugin compiles waiting for the loop.
    pub compile_results: usize,
    /// Orchestration results waiting for the loop.
    pub pass_results: usize,
    /// Host readings waiting for the loop.
    pub host_readings: usize,
    /// Docker image lists waiting for the loop.
    pub image_lists: usize,
    /// A loop turn at least this long is logged (ms).
    pub slow_turn_ms: u64,
    /// An orchestration pass runs this long after an orchestration key changed (ms).
    pub orch_debounce_ms: u64,
    /// An orchestration pass runs at least this often (ms).
    pub orch_interval_ms: u64,
}

impl Default for Perf {
    fn default() -> Self {
        Perf {
            command_queue: 256,
            incoming_frames: 4096,
            exec_events: 1024,
            blob_inbox: 1024,
            blob_events: 256,
            logs_inbox: 256,
            image_requests: 256,
            persist_queue: 1024,
            compile_results: 16,
            pass_results: 4,
            host_readings: 4,
            image_lists: 4,
            slow_turn_ms: 50,
            orch_debounce_ms: 100,
            orch_interval_ms: 1000,
        }
    }
}

impl Perf {
    fn check(&self) -> Result<(), ConfigError> {
        for (field, v) in [
            ("perf.command_queue", self.command_queue),
            ("perf.incoming_frames", self.incoming_frames),
            ("perf.exec_events", self.exec_events),
            ("perf.blob_inbox", self.blob_inbox),
            ("perf.blob_events", self.blob_events),
            ("perf.logs_inbox", self.logs_inbox),
            ("perf.image_requests", self.image_requests),
            ("perf.persist_queue", self.persist_queue),
            ("perf.compile_results", self.compile_results),
            ("perf.pass_results", self.pass_results),
            ("perf.host_readings", self.host_readings),
            ("perf.image_lists", self.image_lists),
            ("perf.slow_turn_ms", self.slow_turn_ms as usize),
            ("perf.orch_debounce_ms", self.orch_debounce_ms as usize),
            ("perf.orch_interval_ms", self.orch_interval_ms as usize),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    field,
                    reason: "must be greater than 0".into(),
                });
            }
        }
        Ok(())
    }
}

/// The agent config file, every field optional so flags can fill in.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Node name; must match the certificate when `cert` is given.
    pub name: Option<String>,
    /// QUIC listen address.
    pub listen: Option<SocketAddr>,
    /// Address peers should dial (defaults to `listen`).
    pub advertise: Option<SocketAddr>,
    /// HTTP API listen address.
    pub api: Option<SocketAddr>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Directory with `ca.pem` (and `ca.key` to self-issue a certificate).
    pub ca_dir: Option<PathBuf>,
    /// Node certificate (PEM), from `shoal ca issue`.
    pub cert: Option<PathBuf>,
    /// Node private key (PEM).
    pub key: Option<PathBuf>,
    /// Seed addresses to join through.
    #[serde(default)]
    pub join: Vec<SocketAddr>,
    /// Labels of this node.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `lan` (default) or `wan` timing preset.
    pub profile: Option<String>,
    /// Where compiled policy components are cached [default: <data_dir>/policy-cache];
    /// agents on one machine may share it.
    pub policy_cache: Option<PathBuf>,
    /// Docker driver: `auto` (default: the engine at `$DOCKER_HOST` or
    /// `/var/run/docker.sock`, used when it answers), `off`, or an engine's socket
    /// (`unix:///run/docker-2.sock`), which must answer.
    pub docker: Option<String>,
    /// Stop every workload when the agent exits (default: leave them running, to be
    /// adopted by the next start).
    pub drain_on_exit: Option<bool>,
    /// Host names the HTTP API answers to besides IP addresses and `localhost`
    /// (DNS-rebinding protection); `"*"` accepts any.
    #[serde(default)]
    pub api_hosts: Vec<String>,
    /// File holding the API token every request must carry (`Authorization: Bearer`).
    pub api_token_file: Option<PathBuf>,
    /// Workload logs are rotated at this size (`10Mi` by default).
    pub log_max_size: Option<String>,
    /// Workload log files kept, the current one included (3 by default).
    pub log_max_files: Option<u32>,
    /// DNS listen address (UDP and TCP), or `"off"` [default: 127.0.0.1:8600].
    pub dns: Option<String>,
    /// The DNS domain [default: shoal]: `<svc>.service.<domain>`, `<node>.node.<domain>`.
    pub dns_domain: Option<String>,
    /// TTL of DNS answers, in seconds [default: 1].
    pub dns_ttl: Option<u32>,
    /// Disk cap of the blob store (`20Gi`); unset: no cap.
    pub blob_cap: Option<String>,
    /// How long a blob no image record or plugin binding names is kept (`10m` by
    /// default).
    pub blob_gc_grace: Option<String>,
    /// Timing overrides.
    #[serde(default)]
    pub tuning: Tuning,
    /// Queue sizes and loop thresholds.
    #[serde(default)]
    pub perf: Perf,
}

impl FileConfig {
    /// Reads and parses a config file; unknown fields are refused.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

/// How the agent gets its TLS identity.
#[derive(Debug, Clone, PartialEq)]
pub enum Tls {
    /// Issue a certificate in memory from `<dir>/ca.pem` + `<dir>/ca.key`.
    SelfIssued {
        /// The CA directory.
        ca_dir: PathBuf,
    },
    /// Use a certificate issued by `shoal ca issue`.
    Files {
        /// Certificate PEM.
        cert: PathBuf,
        /// Key PEM.
        key: PathBuf,
        /// CA certificate PEM.
        ca: PathBuf,
    },
}

/// Whether and where the agent uses Docker Engine (`--docker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerSetting {
    /// The default engine, when it answers; without it docker replicas fail with
    /// the reason.
    Auto,
    /// No docker driver.
    Off,
    /// This engine's socket; it must answer at start.
    Socket(PathBuf),
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name.
    pub name: String,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Address peers dial.
    pub advertise: SocketAddr,
    /// HTTP API address.
    pub api: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// TLS identity source.
    pub tls: Tls,
    /// Seeds.
    pub join: Vec<SocketAddr>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Timing preset.
    pub profile: Profile,
    /// Compiled-policy cache directory.
    pub policy_cache: PathBuf,
    /// Whether and where to use Docker Engine.
    pub docker: DockerSetting,
    /// Stop every workload on exit.
    pub drain_on_exit: bool,
    /// Extra host names the API answers to.
    pub api_hosts: Vec<String>,
    /// The API token, when one is required.
    pub api_token: Option<String>,
    /// Rotation of workload logs.
    pub logs: shoal_runtime::LogPolicy,
    /// Where DNS listens (`None`: off).
    pub dns: Option<SocketAddr>,
    /// DNS domain and TTL.
    pub dns_config: shoal_discovery::DnsConfig,
    /// Disk cap of the blob store in bytes (`None`: no cap).
    pub blob_cap: Option<u64>,
    /// How long an unreferenced blob is kept.
    pub blob_gc_grace: Duration,
    /// Timing overrides.
    pub tuning: Tuning,
    /// Queue sizes and loop thresholds.
    pub perf: Perf,
}

/// How long a blob nothing references is kept before it is removed.
pub const DEFAULT_BLOB_GC_GRACE: Duration = Duration::from_secs(600);

/// Default DNS port (Consul's, so tooling that knows Consul finds it).
pub const DEFAULT_DNS_PORT: u16 = 8600;
/// Default TTL of DNS answers, in seconds: shorter than the default `stop_delay`
/// (2 s), so a client that cached an answer drops a stopping replica before it stops.
pub const DEFAULT_DNS_TTL: u32 = 1;

/// Reads an API token file: one line of at least 16 printable characters. A file
/// that other users may read defeats its purpose, so that is refused too.
pub fn read_token(path: &Path) -> Result<String, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        field: "api_token_file",
        reason: format!("{}: {reason}", path.display()),
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(invalid(format!(
                "mode {:o} lets other users read the token; chmod 600 it",
                mode & 0o777
            )));
        }
    }
    let token = text.trim();
    if token.len() < 16 || !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(
            "the token must be one line of at least 16 printable characters (e.g. `openssl rand -hex 32`)".into(),
        ));
    }
    Ok(token.to_string())
}

/// Checks a node name or label key: 1..=63 of `[A-Za-z0-9._-]`.
pub fn check_name(field: &'static str, s: &str) -> Result<(), ConfigError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            field,
            reason: format!("{s:?} must be 1 to 63 characters of letters, digits, '-', '_' or '.'"),
        })
    }
}

impl AgentConfig {
    /// Validates a merged file + flags configuration.
    pub fn validate(f: FileConfig) -> Result<Self, ConfigError> {
        let name = f.name.ok_or(ConfigError::Missing("name", "name"))?;
        check_name("name", &name)?;
        let listen = f.listen.ok_or(ConfigError::Missing("listen", "listen"))?;
        let advertise = match f.advertise {
            Some(a) => a,
            None if listen.ip().is_unspecified() => {
                return Err(ConfigError::Invalid {
                    field: "advertise",
                    reason: format!(
                        "listen address {listen} is unspecified; give --advertise with the address peers should dial"
                    ),
                })
            }
            None => listen,
        };
        if advertise.ip().is_unspecified() || advertise.port() == 0 {
            return Err(ConfigError::Invalid {
                field: "advertise",
                reason: format!("{advertise} cannot be dialled by peers"),
            });
        }
        let api = f
            .api
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7101)));
        let data_dir = f
            .data_dir
            .ok_or(ConfigError::Missing("data_dir", "data-dir"))?;
        let tls = match (f.cert, f.key, f.ca_dir) {
            (Some(cert), Some(key), Some(ca_dir)) => Tls::Files {
                cert,
                key,
                ca: ca_dir.join("ca.pem"),
            },
            (None, None, Some(ca_dir)) => Tls::SelfIssued { ca_dir },
            (Some(_), None, _) | (None, Some(_), _) => {
                return Err(ConfigError::Invalid {
                    field: "cert",
                    reason: "--cert and --key go together".into(),
                })
            }
            (_, _, None) => return Err(ConfigError::Missing("ca_dir", "ca-dir")),
        };
        for k in f.labels.keys() {
            check_name("labels", k)?;
        }
        let profile = match f.profile.as_deref().unwrap_or("lan") {
            "lan" => Profile::Lan,
            "wan" => Profile::Wan,
            other => {
                return Err(ConfigError::Invalid {
                    field: "profile",
                    reason: format!("{other:?} is not one of \"lan\", \"wan\""),
                })
            }
        };
        let t = &f.tuning;
        for (field, v) in [
            ("tuning.gossip_interval_ms", t.gossip_interval_ms),
            ("tuning.sync_interval_ms", t.sync_interval_ms),
            ("tuning.resource_interval_ms", t.resource_interval_ms),
            ("tuning.forget_left_after_s", t.forget_left_after_s),
        ] {
            if v == Some(0) {
                return Err(ConfigError::Invalid {
                    field,
                    reason: "must be greater than 0".into(),
                });
            }
        }
        if t.fanout == Some(0) {
            return Err(ConfigError::Invalid {
                field: "tuning.fanout",
                reason: "must be at least 1".into(),
            });
        }
        let docker = match f.docker.as_deref().unwrap_or("auto") {
            "auto" => DockerSetting::Auto,
            "off" => DockerSetting::Off,
            other => match other.strip_prefix("unix://") {
                Some(path) if path.starts_with('/') => DockerSetting::Socket(PathBuf::from(path)),
                _ => {
                    return Err(ConfigError::Invalid {
                        field: "docker",
                        reason: format!(
                            "{other:?} is not \"auto\", \"off\" or an engine socket such as \"unix:///var/run/docker.sock\""
                        ),
                    })
                }
            },
        };
        let policy_cache = f
            .policy_cache
            .unwrap_or_else(|| data_dir.join("policy-cache"));
        for h in &f.api_hosts {
            let ok = h == "*"
                || (!h.is_empty()
                    && h.len() <= 253
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c)));
            if !ok {
                return Err(ConfigError::Invalid {
                    field: "api_hosts",
                    reason: format!(
                        "{h:?} is not a host name (letters, digits, '-', '.') or \"*\""
                    ),
                });
            }
        }
        let api_token = match &f.api_token_file {
            None => None,
            Some(path) => Some(read_token(path)?),
        };
        let mut logs = shoal_runtime::LogPolicy::default();
        if let Some(size) = &f.log_max_size {
            logs.max_bytes = shoal_orch::parse_size(size)
                .filter(|b| *b >= 4096)
                .ok_or_else(|| ConfigError::Invalid {
                    field: "log_max_size",
                    reason: format!("{size:?} is not a size of at least 4Ki (e.g. 10Mi)"),
                })?;
        }
        if let Some(n) = f.log_max_files {
            if !(1..=100).contains(&n) {
                return Err(ConfigError::Invalid {
                    field: "log_max_files",
                    reason: format!("{n} is not between 1 and 100"),
                });
            }
            logs.max_files = n;
        }
        let dns = match f.dns.as_deref().map(str::trim) {
            None => Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_DNS_PORT))),
            Some("off") => None,
            Some(a) => Some(a.parse().map_err(|_| ConfigError::Invalid {
                field: "dns",
                reason: format!("{a:?} is not an address like 127.0.0.1:8600, or \"off\""),
            })?),
        };
        let ttl = f.dns_ttl.unwrap_or(DEFAULT_DNS_TTL);
        if ttl > 3600 {
            return Err(ConfigError::Invalid {
                field: "dns_ttl",
                reason: format!(
                    "{ttl} is more than an hour; discovery answers change by the second"
                ),
            });
        }
        let dns_config =
            shoal_discovery::DnsConfig::new(f.dns_domain.as_deref().unwrap_or("shoal"), ttl)
                .map_err(|reason| ConfigError::Invalid {
                    field: "dns_domain",
                    reason,
                })?;
        let blob_cap = match &f.blob_cap {
            None => None,
            Some(text) => Some(
                shoal_orch::parse_size(text)
                    .filter(|b| *b >= 1 << 20)
                    .ok_or_else(|| ConfigError::Invalid {
                        field: "blob_cap",
                        reason: format!("{text:?} is not a size of at least 1Mi (e.g. 20Gi)"),
                    })?,
            ),
        };
        let blob_gc_grace = match &f.blob_gc_grace {
            None => DEFAULT_BLOB_GC_GRACE,
            Some(text) => shoal_orch::parse_duration_ms(text)
                .map(Duration::from_millis)
                .ok_or_else(|| ConfigError::Invalid {
                    field: "blob_gc_grace",
                    reason: format!("{text:?} is not a duration (e.g. 10m, 30s)"),
                })?,
        };
        f.perf.check()?;
        Ok(AgentConfig {
            blob_cap,
            blob_gc_grace,
            dns,
            dns_config,
            perf: f.perf,
            policy_cache,
            docker,
            drain_on_exit: f.drain_on_exit.unwrap_or(false),
            api_hosts: f.api_hosts,
            api_token,
            logs,
            name,
            listen,
            advertise,
            api,
            data_dir,
            tls,
            join: f.join,
            labels: f.labels,
            profile,
            tuning: f.tuning,
        })
    }

    /// The core's config for this agent.
    pub fn core_config(&self) -> shoal_core::Config {
        let size = self.tuning.cluster_size.unwrap_or(32);
        let mut c = shoal_core::Config::new(self.name.clone(), self.advertise, self.profile, size);
        if let Some(ms) = self.tuning.gossip_interval_ms {
            c.gossip_interval = Duration::from_millis(ms);
        }
        if let Some(n) = self.tuning.fanout {
            c.fanout = n;
        }
        if let Some(ms) = self.tuning.sync_interval_ms {
            c.sync_interval = Duration::from_millis(ms);
        }
        if let Some(s) = self.tuning.forget_left_after_s {
            c.forget_left_after = Duration::from_secs(s);
        }
        c
    }

    /// Blob upload cap in bytes per second (0: none).
    pub fn upload_rate(&self) -> u64 {
        self.tuning.upload_bytes_per_sec.unwrap_or(64 << 20)
    }

    /// How often host resources are read.
    pub fn resource_interval(&self) -> Duration {
        Duration::from_millis(self.tuning.resource_interval_ms.unwrap_or(5_000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> FileConfig {
        FileConfig {
            name: Some("n1".into()),
            listen: Some("127.0.0.1:7001".parse().unwrap()),
            data_dir: Some("d".into()),
            ca_dir: Some("ca".into()),
            ..FileConfig::default()
        }
    }

    #[test]
    fn example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/agent.toml");
        let f = FileConfig::load(&path).unwrap();
        let c = AgentConfig::validate(f).unwrap();
        assert_eq!(c.name, "n1");
        assert_eq!(c.labels.get("zone").map(String::as_str), Some("a"));
        // The one the systemd unit reads.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/systemd/agent.toml");
        let c = AgentConfig::validate(FileConfig::load(&path).unwrap()).unwrap();
        assert_eq!(c.name, "n7");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/shoal"));
    }

    #[test]
    fn docker_is_auto_off_or_a_socket() {
        for (text, want) in [
            (None, Some(DockerSetting::Auto)),
            (Some("off"), Some(DockerSetting::Off)),
            (
                Some("unix:///run/d2.sock"),
                Some(DockerSetting::Socket(PathBuf::from("/run/d2.sock"))),
            ),
            (Some("tcp://1.2.3.4:2375"), None),
            (Some("unix://relative.sock"), None),
            (Some("yes"), None),
        ] {
            let mut f = base();
            f.docker = text.map(str::to_string);
            match (AgentConfig::validate(f), want) {
                (Ok(cfg), Some(w)) => assert_eq!(cfg.docker, w, "{text:?}"),
                (Err(e), None) => assert!(e.to_string().contains("docker"), "{e}"),
                (got, want) => panic!("{text:?}: {:?} vs {want:?}", got.map(|c| c.docker)),
            }
        }
    }

    #[test]
    fn unknown_field_is_named() {
        let err = toml::from_str::<FileConfig>("nmae = \"x\"").unwrap_err();
        assert!(err.to_string().contains("nmae"), "{err}");
    }

    #[test]
    fn refusals_name_the_field() {
        let mut f = base();
        f.name = Some("bad name!".into());
        assert!(AgentConfig::validate(f)
            .unwrap_err()
            .to_string()
            .contains("`name`"));
        let mut f = base();
        f.listen = Some("0.0.0.0:7001".parse().unwrap());
        assert!(AgentConfig::validate(f)
            .unwrap_err()
            .to_string()
            .contains("advertise"));
        let mut f = base();
        f.profile = Some("moon".into());
        assert!(AgentConfig::validate(f)
            .unwrap_err()
            .to_string()
            .contains("profile"));
        let mut f = base();
        f.ca_dir = None;
        assert!(AgentConfig::validate(f)
            .unwrap_err()
            .to_string()
            .contains("ca_dir"));
        let mut f = base();
        f.tuning.fanout = Some(0);
        assert!(AgentConfig::validate(f)
            .unwrap_err()
            .to_string()
            .contains("fanout"));
    }
}
