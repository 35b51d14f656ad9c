//! Service specs: the TOML file an operator writes, checked into a typed
//! [`ServiceSpec`].
//!
//! Parsing has two steps. The file is first read into [`SpecFile`] with
//! `deny_unknown_fields`, so a misspelt key is refused rather than ignored; then
//! [`SpecFile::validate`] checks every value and names the offending field in its
//! error. A `ServiceSpec` serializes back to the file form (with canonical units),
//! and deserializing one always validates, so a spec read from the replicated
//! state is as trustworthy as one read from disk.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_policy_logic::{
    Affinity, AffinityTarget, Constraint, ConstraintOp, Params, PlacementRequest, Resources,
};
use shoal_runtime::{PortSpec, Protocol, WorkloadKind, WorkloadSpec};

use crate::units;

/// Most replicas a service may ask for.
pub const MAX_REPLICAS: u32 = 1000;

/// Node label an agent sets on itself when it can run docker workloads.
pub const DOCKER_LABEL: &str = "shoal.driver.docker";

/// Default for `reschedule_after`.
const DEFAULT_RESCHEDULE_AFTER_MS: u64 = 30_000;
/// Default for `stop_delay`: longer than `shoal render`'s longest default wait (1 s)
/// plus gossip and a proxy reload, shorter than anyone's patience with `rm`.
const DEFAULT_STOP_DELAY_MS: u64 = 2_000;
/// Longest `stop_delay` accepted.
const MAX_STOP_DELAY_MS: u64 = 600_000;
/// Default for `update.healthy_deadline`.
const DEFAULT_HEALTHY_DEADLINE_MS: u64 = 60_000;

/// Why a spec was refused. The message names the field it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct SpecError {
    /// The file the spec came from, if any (`web.toml`).
    pub file: Option<String>,
    /// Dotted path of the field at fault (`resources.memory`, `ports[1].host_port`);
    /// `None` when the TOML itself could not be read.
    pub field: Option<String>,
    /// What is wrong with it.
    pub message: String,
}

impl SpecError {
    fn render(&self) -> String {
        let mut out = String::from("service spec");
        if let Some(file) = &self.file {
            out.push(' ');
            out.push_str(file);
        }
        out.push_str(": ");
        if let Some(field) = &self.field {
            out.push_str(&format!("`{field}`: "));
        }
        out.push_str(&self.message);
        out
    }

    fn in_file(mut self, file: &str) -> SpecError {
        self.file = Some(file.to_string());
        self
    }
}

/// Shorthand for an error about `field`.
fn bad(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        file: None,
        field: Some(field.into()),
        message: message.into(),
    }
}

/// A TOML scalar where a spec accepts several types (`cpu = 0.5` or `"500m"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Text(String),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Int(v) => write!(f, "{v}"),
            Scalar::Float(v) => write!(f, "{v}"),
            Scalar::Bool(v) => write!(f, "{v}"),
            Scalar::Text(v) => f.write_str(v),
        }
    }
}

/// A value in a `[scaler]` table: a scalar, or (for `windows`) a list of window tables.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ScalerValue {
    /// A scalar (`min = 2`, `windows = "mon-fri 19:00-23:00 => 10"`).
    Scalar(Scalar),
    /// `windows = [{ days = "mon-fri", from = "19:00", to = "23:00", replicas = 10 }]`.
    Windows(Vec<WindowFile>),
}

impl<'de> Deserialize<'de> for ScalerValue {
    /// A list reads as window tables and anything else as a scalar, each with its
    /// own error (`windows[0]: unknown field `till``), where an untagged enum could
    /// only say that nothing matched.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        match toml::Value::deserialize(d)? {
            toml::Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    WindowFile::deserialize(item)
                        .map_err(|e| D::Error::custom(format!("windows[{i}]: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(ScalerValue::Windows),
            other => Scalar::deserialize(other)
                .map(ScalerValue::Scalar)
                .map_err(|e| D::Error::custom(e.to_string())),
        }
    }
}

/// One schedule window as a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowFile {
    /// `mon-fri`, `sat,sun`, `daily`.
    pub days: String,
    /// `HH:MM`.
    pub from: String,
    /// `HH:MM` (before `from`: the window runs past midnight).
    pub to: String,
    /// Replicas while the window is open.
    pub replicas: u32,
    /// IANA time zone (`Asia/Shanghai`); UTC without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
}

/// The `[scaler]` table as policy params: window tables become the text form
/// (`mon-fri 19:00-23:00 Asia/Shanghai => 10; …`).
fn scaler_params(table: Option<&BTreeMap<String, ScalerValue>>) -> Result<Params, SpecError> {
    let mut out = Params::new();
    for (k, v) in table.into_iter().flatten() {
        if k.is_empty() {
            return Err(bad("scaler", "parameter names must not be empty"));
        }
        let text = match v {
            ScalerValue::Scalar(s) => s.to_string(),
            ScalerValue::Windows(ws) => {
                if k != "windows" {
                    return Err(bad(
                        format!("scaler.{k}"),
                        "only `windows` may be a list of tables",
                    ));
                }
                ws.iter()
                    .map(|w| {
                        let zone = w.tz.as_deref().map(|z| format!(" {z}")).unwrap_or_default();
                        format!(
                            "{} {}-{}{zone} => {}",
                            w.days.trim(),
                            w.from.trim(),
                            w.to.trim(),
                            w.replicas
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        };
        out.insert(k.clone(), text);
    }
    Ok(out)
}

/// The file form of a service spec, exactly as written (see the examples in
/// `examples/services/`). Unknown keys are refused.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    /// Service name.
    pub name: String,
    /// `docker` or `process`.
    pub driver: String,
    /// Container image (docker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Program and arguments (process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Docker networking: `bridge` (default: ports mapped by the engine) or `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Desired replicas (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i64>,
    /// Per-replica reservation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesFile>,
    /// Ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortFile>,
    /// Environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, Scalar>,
    /// Label constraints (`zone == a`, `~disk == ssd`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
    /// Affinity rules (`service:db`, `zone=a`, `~` = soft).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinity: Vec<String>,
    /// Anti-affinity rules, same syntax.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anti_affinity: Vec<String>,
    /// Node label to spread replicas over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
    /// Services that must have a healthy replica before this one is placed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthFile>,
    /// `always`, `on-failure` or `never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
    /// First restart delay (doubles per consecutive restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_backoff: Option<Scalar>,
    /// Largest restart delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_backoff_max: Option<Scalar>,
    /// Rolling update settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateFile>,
    /// How long a node may be down before its replicas are placed elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reschedule_after: Option<Scalar>,
    /// How long a replica about to stop stays running out of discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_delay: Option<Scalar>,
    /// Scheduler policy params.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<BTreeMap<String, Scalar>>,
    /// Autoscaling: engine keys (`min`, `max`, `interval`, …) and policy params;
    /// `windows` may be a list of tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaler: Option<BTreeMap<String, ScalerValue>>,
    /// Discovery policy params.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<BTreeMap<String, Scalar>>,
}

/// `[resources]` as written.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesFile {
    /// `500m`, `0.5` or `2` (cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Scalar>,
    /// `256Mi`, `1G` or bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Scalar>,
    /// Like memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Scalar>,
}

/// One `[[ports]]` entry as written.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortFile {
    /// Port name.
    pub name: String,
    /// Port inside the container (not used by the process driver).
    pub container_port: i64,
    /// Fixed host port; absent = dynamic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<i64>,
    /// `tcp` (default) or `udp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// `[health]` as written.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    /// HTTP path to GET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// Port name for `http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// Port name to connect to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// Command to run; exit 0 = healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Time between checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Scalar>,
    /// Time one check may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Scalar>,
    /// Consecutive failures that make a replica unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<i64>,
    /// Time after start during which failures do not count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<Scalar>,
}

/// `[update]` as written.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateFile {
    /// Replicas that may be unavailable during an update (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<i64>,
    /// Extra replicas started alongside old ones (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_surge: Option<i64>,
    /// A new version must be healthy within this, or the rollout stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_deadline: Option<Scalar>,
}

/// A checked service spec. Serializes as its [`SpecFile`] form; deserializing
/// validates, so every `ServiceSpec` value is valid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "SpecFile", into = "SpecFile")]
pub struct ServiceSpec {
    /// DNS-label name: 1-63 of `a-z`, `0-9`, `-`, starting with a letter.
    pub name: String,
    /// What to run.
    pub kind: WorkloadKind,
    /// Desired replicas from the spec (the record's count may differ after `shoal scale`).
    pub replicas: u32,
    /// Reservation of one replica (zero = none).
    pub resources: Resources,
    /// Ports each replica listens on.
    pub ports: Vec<PortSpec>,
    /// Environment given to each replica.
    pub env: BTreeMap<String, String>,
    /// Label constraints.
    pub constraints: Vec<Constraint>,
    /// Affinity and anti-affinity rules.
    pub affinities: Vec<Affinity>,
    /// Node label to spread replicas over.
    pub spread: Option<String>,
    /// Services that must have a healthy replica before this one is placed.
    pub depends_on: Vec<String>,
    /// Health check; without one a running replica counts as healthy.
    pub health: Option<HealthCheck>,
    /// When and how fast a replica that ended is restarted (by its agent).
    pub restart: RestartPolicy,
    /// Rolling update settings.
    pub update: UpdatePolicy,
    /// How long a node may be down or gone before its replicas are placed elsewhere.
    pub reschedule_after: Duration,
    /// How long a replica that is about to be stopped keeps running after it left
    /// discovery, before it gets SIGTERM (only for services with ports).
    pub stop_delay: Duration,
    /// Scheduler policy params (`strategy = "binpack"`).
    pub scheduler: Params,
    /// Scaler policy params.
    pub scaler: Params,
    /// Discovery policy params.
    pub discovery: Params,
}

/// A health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// What to probe.
    pub probe: Probe,
    /// Time between checks.
    pub interval: Duration,
    /// Time one check may take.
    pub timeout: Duration,
    /// Consecutive failures that make a replica unhealthy (at least 1).
    pub retries: u32,
    /// Time after start during which failures do not count.
    pub grace: Duration,
}

/// What a health check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `GET path` on the named port; 2xx = healthy.
    Http {
        /// Request path, starting with `/`.
        path: String,
        /// Port name.
        port: String,
    },
    /// A TCP connect to the named port.
    Tcp {
        /// Port name.
        port: String,
    },
    /// A command run on the node (for docker: inside the container); exit 0 = healthy.
    Command {
        /// Program and arguments.
        command: Vec<String>,
    },
}

/// When a replica that ended is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartMode {
    /// Always (the default).
    #[default]
    Always,
    /// Only after a non-zero exit or a crash.
    OnFailure,
    /// Never; the replica stays failed until the next deploy or reschedule.
    Never,
}

impl RestartMode {
    fn as_str(self) -> &'static str {
        match self {
            RestartMode::Always => "always",
            RestartMode::OnFailure => "on-failure",
            RestartMode::Never => "never",
        }
    }
}

/// Restart rule and exponential backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// When to restart.
    pub mode: RestartMode,
    /// Delay before the first restart; doubles with each consecutive one.
    pub backoff: Duration,
    /// Largest delay.
    pub backoff_max: Duration,
}

impl RestartPolicy {
    /// Whether a replica that ended (successfully or not) is to be started again.
    pub fn should_restart(&self, succeeded: bool) -> bool {
        match self.mode {
            RestartMode::Always => true,
            RestartMode::OnFailure => !succeeded,
            RestartMode::Never => false,
        }
    }

    /// The delay before restart number `restarts + 1`: `backoff * 2^restarts`, at most `backoff_max`.
    pub fn delay(&self, restarts: u32) -> Duration {
        let factor = 1u32.checked_shl(restarts.min(31)).unwrap_or(u32::MAX);
        self.backoff
            .checked_mul(factor)
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max)
    }
}

/// Rolling update settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdatePolicy {
    /// Replicas that may be unavailable (being replaced in place) at once.
    pub max_unavailable: u32,
    /// Replicas of the new version started alongside old ones; when above zero the
    /// update only surges (old replicas stop once their successor is healthy).
    pub max_surge: u32,
    /// A new-version replica not healthy this long after placement stops the rollout.
    pub healthy_deadline: Duration,
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn check_name(field: &str, name: &str) -> Result<(), SpecError> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(bad(
            field,
            format!("{name:?} must be 1-63 lowercase letters, digits or '-', starting with a letter and not ending with '-'"),
        ))
    }
}

/// A value as written: strings quoted, numbers bare.
fn shown(v: &Scalar) -> String {
    match v {
        Scalar::Text(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn duration(field: &str, value: Option<&Scalar>, default_ms: u64) -> Result<Duration, SpecError> {
    let ms = match value {
        None => default_ms,
        Some(Scalar::Text(s)) => units::parse_duration_ms(s).ok_or_else(|| {
            bad(
                field,
                format!("{s:?} is not a duration like 5s, 1m30s or 250ms (at most a year)"),
            )
        })?,
        Some(other) => {
            return Err(bad(
                field,
                format!("{other} is not a duration like \"5s\" (write it as a string with a unit)"),
            ))
        }
    };
    Ok(Duration::from_millis(ms))
}

fn positive_duration(
    field: &str,
    value: Option<&Scalar>,
    default_ms: u64,
) -> Result<Duration, SpecError> {
    let d = duration(field, value, default_ms)?;
    if d.is_zero() {
        return Err(bad(field, "must be longer than 0s"));
    }
    Ok(d)
}

fn size(field: &str, value: Option<&Scalar>) -> Result<u64, SpecError> {
    match value {
        None => Ok(0),
        Some(Scalar::Int(n)) if *n >= 0 => Ok(*n as u64),
        Some(Scalar::Text(s)) => units::parse_size(s)
            .ok_or_else(|| bad(field, format!("{s:?} is not a size like 256Mi or 1G"))),
        Some(other) => Err(bad(
            field,
            format!("{} is not a size like 256Mi or 1G", shown(other)),
        )),
    }
}

fn cpu(field: &str, value: Option<&Scalar>) -> Result<u64, SpecError> {
    let millis = match value {
        None => Some(0),
        Some(Scalar::Int(n)) if *n >= 0 => (*n as u64).checked_mul(1000),
        Some(Scalar::Float(f)) => units::cores_to_millis(*f),
        Some(Scalar::Text(s)) => units::parse_cpu_text(s),
        Some(_) => None,
    };
    millis.ok_or_else(|| {
        bad(
            field,
            format!(
                "{} is not a CPU amount like \"500m\" or 0.5",
                value.map(shown).unwrap_or_default()
            ),
        )
    })
}

fn int_in(
    field: &str,
    value: Option<i64>,
    default: u32,
    min: u32,
    max: u32,
) -> Result<u32, SpecError> {
    let v = value.unwrap_or(i64::from(default));
    if v < i64::from(min) || v > i64::from(max) {
        return Err(bad(field, format!("{v} is not within {min}..={max}")));
    }
    Ok(v as u32)
}

fn command(field: &str, cmd: &[String]) -> Result<Vec<String>, SpecError> {
    match cmd.first() {
        None => return Err(bad(field, "must name a program: [\"prog\", \"arg\", ...]")),
        Some(p) if p.trim().is_empty() => return Err(bad(field, "the program name is empty")),
        Some(_) => {}
    }
    if cmd.iter().any(|a| a.contains('\0')) {
        return Err(bad(field, "contains a NUL byte"));
    }
    Ok(cmd.to_vec())
}

fn params(field: &str, table: Option<&BTreeMap<String, Scalar>>) -> Result<Params, SpecError> {
    let mut out = Params::new();
    for (k, v) in table.into_iter().flatten() {
        if k.is_empty() {
            return Err(bad(field, "parameter names must not be empty"));
        }
        out.insert(k.clone(), v.to_string());
    }
    Ok(out)
}

/// Parses an affinity rule: `service:db`, `zone=a`, with `~` for soft.
fn affinity(field: &str, text: &str, anti: bool) -> Result<Affinity, SpecError> {
    let t = text.trim();
    let (hard, body) = match t.strip_prefix('~') {
        Some(rest) => (false, rest.trim()),
        None => (true, t),
    };
    let target = if let Some(service) = body.strip_prefix("service:") {
        let service = service.trim();
        if !is_dns_label(service) {
            return Err(bad(
                field,
                format!("{text:?}: {service:?} is not a service name"),
            ));
        }
        AffinityTarget::Service(service.to_string())
    } else if let Some((k, v)) = body.split_once('=') {
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || v.is_empty() || k.contains(char::is_whitespace) {
            return Err(bad(field, format!("{text:?} is not `label=value`")));
        }
        AffinityTarget::Label {
            key: k.to_string(),
            value: v.to_string(),
        }
    } else {
        return Err(bad(
            field,
            format!("{text:?} is neither `service:<name>` nor `label=value` (prefix `~` for soft)"),
        ));
    };
    Ok(Affinity { target, anti, hard })
}

fn affinity_text(a: &Affinity) -> String {
    let soft = if a.hard { "" } else { "~" };
    match &a.target {
        AffinityTarget::Service(s) => format!("{soft}service:{s}"),
        AffinityTarget::Label { key, value } => format!("{soft}{key}={value}"),
    }
}

impl SpecFile {
    /// Reads the file form from TOML (unknown keys are an error). `file` names the
    /// source in error messages.
    pub fn from_toml(file: &str, text: &str) -> Result<SpecFile, SpecError> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .and_then(|s| text.get(..s.start))
                .map(|before| before.matches('\n').count() + 1);
            let message = match line {
                Some(l) => format!("line {l}: {}", e.message().trim()),
                None => e.message().trim().to_string(),
            };
            SpecError {
                file: Some(file.to_string()),
                field: None,
                message,
            }
        })
    }

    /// Checks every field and builds the typed spec.
    pub fn validate(&self) -> Result<ServiceSpec, SpecError> {
        check_name("name", &self.name)?;
        let kind = match (self.driver.as_str(), &self.image, &self.command) {
            ("docker", Some(image), None) => {
                if image.is_empty() || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(bad("image", format!("{image:?} is not an image reference")));
                }
                let host_network = match self.network.as_deref().map(str::trim) {
                    None | Some("bridge") => false,
                    Some("host") => true,
                    Some(other) => {
                        return Err(bad(
                            "network",
                            format!("{other:?} is not \"bridge\" (the default: ports mapped by the engine) or \"host\""),
                        ))
                    }
                };
                WorkloadKind::Docker {
                    image: image.clone(),
                    host_network,
                }
            }
            ("docker", None, _) => return Err(bad("image", "required with driver = \"docker\"")),
            ("docker", Some(_), Some(_)) => {
                return Err(bad(
                    "command",
                    "not allowed with driver = \"docker\" (the image decides what runs)",
                ))
            }
            ("process", None, Some(cmd)) => {
                if self.network.is_some() {
                    return Err(bad(
                        "network",
                        "applies to driver = \"docker\" only (a process always uses the host's network)",
                    ));
                }
                WorkloadKind::Process {
                    command: command("command", cmd)?,
                }
            }
            ("process", _, None) => {
                return Err(bad("command", "required with driver = \"process\""))
            }
            ("process", Some(_), Some(_)) => {
                return Err(bad(
                    "image",
                    "not allowed with driver = \"process\" (use command)",
                ))
            }
            (other, _, _) => {
                return Err(bad(
                    "driver",
                    format!("{other:?} is not \"docker\" or \"process\""),
                ))
            }
        };
        let replicas = int_in("replicas", self.replicas, 1, 0, MAX_REPLICAS)?;
        let r = self.resources.clone().unwrap_or_default();
        let resources = Resources {
            cpu_millis: cpu("resources.cpu", r.cpu.as_ref())?,
            memory_bytes: size("resources.memory", r.memory.as_ref())?,
            disk_bytes: size("resources.disk", r.disk.as_ref())?,
        };
        let mut ports = Vec::new();
        let mut names = BTreeSet::new();
        let mut fixed = BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            let f = |sub: &str| format!("ports[{i}].{sub}");
            if !is_port_name(&p.name) {
                return Err(bad(
                    f("name"),
                    format!("{:?} must be 1-63 of [A-Za-z0-9_.-]", p.name),
                ));
            }
            if !names.insert(p.name.clone()) {
                return Err(bad(f("name"), format!("{:?} is used twice", p.name)));
            }
            let container_port = u16::try_from(p.container_port)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| {
                    bad(
                        f("container_port"),
                        format!("{} is not a port (1-65535)", p.container_port),
                    )
                })?;
            let protocol = match p.protocol.as_deref() {
                None => Protocol::Tcp,
                Some(s) => Protocol::parse(s).ok_or_else(|| {
                    bad(f("protocol"), format!("{s:?} is not \"tcp\" or \"udp\""))
                })?,
            };
            let host_port = match p.host_port {
                None => None,
                Some(h) => {
                    let h = u16::try_from(h).ok().filter(|&v| v > 0).ok_or_else(|| {
                        bad(
                            f("host_port"),
                            format!("{h} is not a port (1-65535; leave it out for a dynamic one)"),
                        )
                    })?;
                    if !fixed.insert((h, protocol)) {
                        return Err(bad(f("host_port"), format!("{h} is used twice")));
                    }
                    Some(h)
                }
            };
            ports.push(PortSpec {
                name: p.name.clone(),
                container_port,
                host_port,
                protocol,
            });
        }
        let mut env = BTreeMap::new();
        for (k, v) in &self.env {
            if k.is_empty() || k.contains(['=', '\0']) {
                return Err(bad(
                    format!("env.{k}"),
                    "variable names must be non-empty without '=' or NUL",
                ));
            }
            let v = v.to_string();
            if v.contains('\0') {
                return Err(bad(format!("env.{k}"), "contains a NUL byte"));
            }
            env.insert(k.clone(), v);
        }
        let constraints = self
            .constraints
            .iter()
            .enumerate()
            .map(|(i, c)| Constraint::parse(c).map_err(|e| bad(format!("constraints[{i}]"), e)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut affinities = Vec::new();
        for (i, a) in self.affinity.iter().enumerate() {
            affinities.push(affinity(&format!("affinity[{i}]"), a, false)?);
        }
        for (i, a) in self.anti_affinity.iter().enumerate() {
            affinities.push(affinity(&format!("anti_affinity[{i}]"), a, true)?);
        }
        if let Some(s) = &self.spread {
            if s.trim().is_empty() || s.contains(char::is_whitespace) {
                return Err(bad("spread", format!("{s:?} is not a node label name")));
            }
        }
        let mut deps = BTreeSet::new();
        for (i, d) in self.depends_on.iter().enumerate() {
            let field = format!("depends_on[{i}]");
            check_name(&field, d)?;
            if *d == self.name {
                return Err(bad(field, "a service cannot depend on itself"));
            }
            if !deps.insert(d.clone()) {
                return Err(bad(field, format!("{d:?} is listed twice")));
            }
        }
        let health = match &self.health {
            None => None,
            Some(h) => Some(self.health(h, &ports)?),
        };
        let mode = match self.restart.as_deref() {
            None | Some("always") => RestartMode::Always,
            Some("on-failure") => RestartMode::OnFailure,
            Some("never") => RestartMode::Never,
            Some(other) => {
                return Err(bad(
                    "restart",
                    format!("{other:?} is not \"always\", \"on-failure\" or \"never\""),
                ))
            }
        };
        let restart = RestartPolicy {
            mode,
            backoff: positive_duration("restart_backoff", self.restart_backoff.as_ref(), 1_000)?,
            backoff_max: positive_duration(
                "restart_backoff_max",
                self.restart_backoff_max.as_ref(),
                60_000,
            )?,
        };
        if restart.backoff_max < restart.backoff {
            return Err(bad(
                "restart_backoff_max",
                "is shorter than restart_backoff",
            ));
        }
        let u = self.update.clone().unwrap_or_default();
        let update = UpdatePolicy {
            max_unavailable: int_in(
                "update.max_unavailable",
                u.max_unavailable,
                1,
                0,
                MAX_REPLICAS,
            )?,
            max_surge: int_in("update.max_surge", u.max_surge, 0, 0, MAX_REPLICAS)?,
            healthy_deadline: positive_duration(
                "update.healthy_deadline",
                u.healthy_deadline.as_ref(),
                DEFAULT_HEALTHY_DEADLINE_MS,
            )?,
        };
        if update.max_unavailable == 0 && update.max_surge == 0 {
            return Err(bad(
                "update.max_unavailable",
                "0 together with max_surge = 0 would never let an update proceed",
            ));
        }
        let scaler = scaler_params(self.scaler.as_ref())?;
        crate::autoscale::Autoscaling::from_params(&scaler, &ports)
            .map_err(|m| bad("scaler", m))?;
        Ok(ServiceSpec {
            name: self.name.clone(),
            kind,
            replicas,
            resources,
            ports,
            env,
            constraints,
            affinities,
            spread: self.spread.as_ref().map(|s| s.trim().to_string()),
            depends_on: self.depends_on.clone(),
            health,
            restart,
            update,
            reschedule_after: duration(
                "reschedule_after",
                self.reschedule_after.as_ref(),
                DEFAULT_RESCHEDULE_AFTER_MS,
            )?,
            stop_delay: {
                let d = duration(
                    "stop_delay",
                    self.stop_delay.as_ref(),
                    DEFAULT_STOP_DELAY_MS,
                )?;
                if d > Duration::from_millis(MAX_STOP_DELAY_MS) {
                    return Err(bad("stop_delay", "must be at most 10m"));
                }
                d
            },
            scheduler: params("scheduler", self.scheduler.as_ref())?,
            scaler,
            discovery: params("discovery", self.discovery.as_ref())?,
        })
    }

    fn health(&self, h: &HealthFile, ports: &[PortSpec]) -> Result<HealthCheck, SpecError> {
        let port_named = |field: &str, name: &str| -> Result<String, SpecError> {
            if ports.iter().any(|p| p.name == name) {
                Ok(name.to_string())
            } else {
                Err(bad(
                    field,
                    format!("{name:?} is not one of the service's ports"),
                ))
            }
        };
        let probe = match (&h.http, &h.tcp, &h.command) {
            (Some(path), None, None) => {
                if !path.starts_with('/')
                    || path.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(bad(
                        "health.http",
                        format!("{path:?} is not a path like /healthz"),
                    ));
                }
                let port = match (&h.port, ports) {
                    (Some(name), _) => port_named("health.port", name)?,
                    (None, [only]) => only.name.clone(),
                    (None, []) => {
                        return Err(bad("health.http", "needs a port, and the service has none"))
                    }
                    (None, _) => {
                        return Err(bad(
                            "health.port",
                            "required when the service has several ports",
                        ))
                    }
                };
                Probe::Http {
                    path: path.clone(),
                    port,
                }
            }
            (None, Some(port), None) => Probe::Tcp {
                port: port_named("health.tcp", port)?,
            },
            (None, None, Some(cmd)) => Probe::Command {
                command: command("health.command", cmd)?,
            },
            (None, None, None) => return Err(bad("health", "needs one of http, tcp or command")),
            _ => return Err(bad("health", "takes only one of http, tcp or command")),
        };
        if h.port.is_some() && !matches!(probe, Probe::Http { .. }) {
            return Err(bad("health.port", "only applies to an http check"));
        }
        Ok(HealthCheck {
            probe,
            interval: positive_duration("health.interval", h.interval.as_ref(), 5_000)?,
            timeout: positive_duration("health.timeout", h.timeout.as_ref(), 2_000)?,
            retries: int_in("health.retries", h.retries, 3, 1, 100)?,
            grace: duration("health.grace", h.grace.as_ref(), 10_000)?,
        })
    }
}

impl TryFrom<SpecFile> for ServiceSpec {
    type Error = SpecError;

    fn try_from(file: SpecFile) -> Result<Self, Self::Error> {
        file.validate()
    }
}

fn text(s: String) -> Option<Scalar> {
    Some(Scalar::Text(s))
}

fn dur(d: Duration) -> Option<Scalar> {
    text(units::format_duration_ms(
        d.as_millis().min(u128::from(u64::MAX)) as u64,
    ))
}

fn param_table(p: &Params) -> Option<BTreeMap<String, Scalar>> {
    (!p.is_empty()).then(|| {
        p.iter()
            .map(|(k, v)| (k.clone(), Scalar::Text(v.clone())))
            .collect()
    })
}

impl From<ServiceSpec> for SpecFile {
    /// The canonical file form: every default written out, units normalised.
    fn from(s: ServiceSpec) -> SpecFile {
        let (driver, image, command, network) = match s.kind {
            WorkloadKind::Docker {
                image,
                host_network,
            } => (
                "docker",
                Some(image),
                None,
                host_network.then(|| "host".to_string()),
            ),
            WorkloadKind::Process { command } => ("process", None, Some(command), None),
        };
        let r = s.resources;
        let nonzero = |v: u64, f: fn(u64) -> String| (v > 0).then(|| Scalar::Text(f(v)));
        let resources = ResourcesFile {
            cpu: nonzero(r.cpu_millis, units::format_cpu),
            memory: nonzero(r.memory_bytes, units::format_size),
            disk: nonzero(r.disk_bytes, units::format_size),
        };
        let health = s.health.map(|h| {
            let mut f = HealthFile {
                interval: dur(h.interval),
                timeout: dur(h.timeout),
                retries: Some(i64::from(h.retries)),
                grace: dur(h.grace),
                ..HealthFile::default()
            };
            match h.probe {
                Probe::Http { path, port } => {
                    f.http = Some(path);
                    f.port = Some(port);
                }
                Probe::Tcp { port } => f.tcp = Some(port),
                Probe::Command { command } => f.command = Some(command),
            }
            f
        });
        SpecFile {
            name: s.name,
            driver: driver.to_string(),
            image,
            command,
            network,
            replicas: Some(i64::from(s.replicas)),
            resources: (resources != ResourcesFile::default()).then_some(resources),
            ports: s
                .ports
                .into_iter()
                .map(|p| PortFile {
                    name: p.name,
                    container_port: i64::from(p.container_port),
                    host_port: p.host_port.map(i64::from),
                    protocol: (p.protocol != Protocol::Tcp)
                        .then(|| p.protocol.as_str().to_string()),
                })
                .collect(),
            env: s
                .env
                .into_iter()
                .map(|(k, v)| (k, Scalar::Text(v)))
                .collect(),
            constraints: s
                .constraints
                .iter()
                .map(|c| {
                    if c.hard {
                        c.to_string()
                    } else {
                        format!("~{c}")
                    }
                })
                .collect(),
            affinity: s
                .affinities
                .iter()
                .filter(|a| !a.anti)
                .map(affinity_text)
                .collect(),
            anti_affinity: s
                .affinities
                .iter()
                .filter(|a| a.anti)
                .map(affinity_text)
                .collect(),
            spread: s.spread,
            depends_on: s.depends_on,
            health,
            restart: Some(s.restart.mode.as_str().to_string()),
            restart_backoff: dur(s.restart.backoff),
            restart_backoff_max: dur(s.restart.backoff_max),
            update: Some(UpdateFile {
                max_unavailable: Some(i64::from(s.update.max_unavailable)),
                max_surge: Some(i64::from(s.update.max_surge)),
                healthy_deadline: dur(s.update.healthy_deadline),
            }),
            reschedule_after: dur(s.reschedule_after),
            stop_delay: dur(s.stop_delay),
            scheduler: param_table(&s.scheduler),
            scaler: param_table(&s.scaler).map(|t| {
                t.into_iter()
                    .map(|(k, v)| (k, ScalerValue::Scalar(v)))
                    .collect()
            }),
            discovery: param_table(&s.discovery),
        }
    }
}

impl ServiceSpec {
    /// How the service scales, if it has a `[scaler]` table (checked when the spec
    /// was parsed).
    pub fn autoscaling(&self) -> Option<crate::autoscale::Autoscaling> {
        crate::autoscale::Autoscaling::read(&self.scaler, &self.ports)
            .ok()
            .flatten()
    }

    /// Parses and validates a TOML spec; `file` names the source in error messages.
    pub fn from_toml(file: &str, text: &str) -> Result<ServiceSpec, SpecError> {
        SpecFile::from_toml(file, text)?
            .validate()
            .map_err(|e| e.in_file(file))
    }

    /// The image, for docker services.
    pub fn image(&self) -> Option<&str> {
        match &self.kind {
            WorkloadKind::Docker { image, .. } => Some(image),
            WorkloadKind::Process { .. } => None,
        }
    }

    /// Fixed host ports one replica binds.
    pub fn host_ports(&self) -> Vec<u16> {
        self.ports.iter().filter_map(|p| p.host_port).collect()
    }

    /// What a driver runs for one allocation of this spec.
    pub fn to_workload(&self, slot: u32, version: u64, alloc_id: &str) -> WorkloadSpec {
        WorkloadSpec {
            service: self.name.clone(),
            slot,
            version,
            alloc_id: alloc_id.to_string(),
            kind: self.kind.clone(),
            env: self.env.clone(),
            ports: self.ports.clone(),
            // Zero means "no reservation", which for a driver is "no limit".
            cpu_millis: (self.resources.cpu_millis > 0).then_some(self.resources.cpu_millis),
            memory_bytes: (self.resources.memory_bytes > 0).then_some(self.resources.memory_bytes),
            labels: BTreeMap::new(),
        }
    }

    /// A placement request for `replicas` replicas of this spec.
    ///
    /// A docker service also gets the hard constraint [`DOCKER_LABEL`]` exists`:
    /// agents set that label on themselves when they reach a Docker Engine, so
    /// containers are only placed where they can run.
    pub fn to_request(&self, replicas: u32) -> PlacementRequest {
        let mut constraints = self.constraints.clone();
        if self.image().is_some() {
            constraints.push(Constraint {
                key: DOCKER_LABEL.to_string(),
                op: ConstraintOp::Exists,
                values: Vec::new(),
                hard: true,
            });
        }
        PlacementRequest {
            service: self.name.clone(),
            replicas,
            resources: self.resources,
            constraints,
            affinities: self.affinities.clone(),
            spread_key: self.spread.clone(),
            ports: self.host_ports(),
            image: self.image().map(str::to_string),
            params: self.scheduler.clone(),
        }
    }

    /// Whether two specs run the same thing, ignoring the replica count (which
    /// scaling changes without a rollout), `stop_delay` and the scaler and discovery
    /// params (read by agents and policies, not by the replicas).
    pub fn same_workload(&self, other: &ServiceSpec) -> bool {
        let mut a = self.clone();
        a.replicas = other.replicas;
        // What only the agents and policies read, not the replicas themselves.
        a.stop_delay = other.stop_delay;
        a.scaler = other.scaler.clone();
        a.discovery = other.discovery.clone();
        a == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLES: &[(&str, &str)] = &[
        (
            "web.toml",
            include_str!("../../../examples/services/web.toml"),
        ),
        (
            "db.toml",
            include_str!("../../../examples/services/db.toml"),
        ),
        (
            "api.toml",
            include_str!("../../../examples/services/api.toml"),
        ),
        (
            "worker.toml",
            include_str!("../../../examples/services/worker.toml"),
        ),
    ];

    const BASE: &str = r#"
name = "web"
driver = "process"
command = ["shoal", "workload", "http"]
[[ports]]
name = "http"
container_port = 8080
"#;

    #[test]
    fn every_example_parses_and_round_trips() {
        for (file, text) in EXAMPLES {
            let spec = ServiceSpec::from_toml(file, text).unwrap_or_else(|e| panic!("{e}"));
            // JSON in the replicated state reads back to the same spec.
            let json = serde_json::to_string(&spec).unwrap();
            let back: ServiceSpec = serde_json::from_str(&json).unwrap();
            assert_eq!(back, spec, "{file}");
            // So does the canonical TOML.
            let toml_text = toml::to_string(&SpecFile::from(spec.clone())).unwrap();
            assert_eq!(
                ServiceSpec::from_toml(file, &toml_text).unwrap(),
                spec,
                "{file}"
            );
            let wl = spec.to_workload(0, 1, "x-0-1-abc");
            wl.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }

    #[test]
    fn example_values_are_read_as_written() {
        let web = ServiceSpec::from_toml("web.toml", EXAMPLES[0].1).unwrap();
        assert_eq!(web.replicas, 3);
        assert_eq!(web.resources.cpu_millis, 250);
        assert_eq!(web.resources.memory_bytes, 64 << 20);
        assert_eq!(web.spread.as_deref(), Some("zone"));
        assert_eq!(web.depends_on, vec!["db".to_string()]);
        assert_eq!(web.update.max_surge, 1);
        assert_eq!(web.reschedule_after, Duration::from_secs(20));
        let h = web.health.as_ref().unwrap();
        assert_eq!(
            h.probe,
            Probe::Http {
                path: "/healthz".into(),
                port: "http".into()
            }
        );
        assert_eq!((h.interval, h.retries), (Duration::from_secs(2), 3));
        assert!(web.affinities[0].anti && !web.affinities[0].hard);
        let req = web.to_request(2);
        assert_eq!(req.replicas, 2);
        assert_eq!(
            req.params.get("strategy").map(String::as_str),
            Some("spread")
        );

        let db = ServiceSpec::from_toml("db.toml", EXAMPLES[1].1).unwrap();
        assert_eq!(db.resources.cpu_millis, 1000);
        assert!(db.host_ports().is_empty());
        assert_eq!(db.restart.mode, RestartMode::OnFailure);
        assert_eq!(db.constraints[0].op, ConstraintOp::Equals);

        let api = ServiceSpec::from_toml("api.toml", EXAMPLES[2].1).unwrap();
        assert_eq!(api.image(), Some("shoal-test-http:latest"));
        assert_eq!(api.resources.cpu_millis, 500);
        assert_eq!(api.host_ports(), vec![18080]);
        // Containers only go where an agent found Docker Engine.
        assert!(api
            .to_request(1)
            .constraints
            .iter()
            .any(|c| c.key == DOCKER_LABEL && c.op == ConstraintOp::Exists));
        assert_eq!(api.scaler.get("min").map(String::as_str), Some("2"));
        assert_eq!(
            api.to_request(1).image.as_deref(),
            Some("shoal-test-http:latest")
        );
        // One port: the http check uses it without naming it.
        assert!(
            matches!(&api.health.as_ref().unwrap().probe, Probe::Http { port, .. } if port == "http")
        );
    }

    #[test]
    fn defaults() {
        let s = ServiceSpec::from_toml("t.toml", BASE).unwrap();
        assert_eq!(s.replicas, 1);
        assert_eq!(s.restart.mode, RestartMode::Always);
        assert_eq!(s.update.max_unavailable, 1);
        assert_eq!(s.update.max_surge, 0);
        assert_eq!(s.update.healthy_deadline, Duration::from_secs(60));
        assert_eq!(s.reschedule_after, Duration::from_secs(30));
        assert_eq!(s.stop_delay, Duration::from_secs(2));
        assert_eq!(s.resources, Resources::default());
        assert!(s.health.is_none());
        let w = s.to_workload(2, 7, "web-2-7-abc");
        assert_eq!((w.slot, w.version, w.cpu_millis), (2, 7, None));
    }

    #[test]
    fn restart_backoff_doubles_up_to_the_cap() {
        let s = ServiceSpec::from_toml("t.toml", BASE).unwrap();
        let d: Vec<u64> = (0..10).map(|i| s.restart.delay(i).as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        assert_eq!(s.restart.delay(u32::MAX), Duration::from_secs(60));
        assert!(s.restart.should_restart(true));
    }

    /// Each invalid spec is refused, and the message names the field at fault.
    #[test]
    fn invalid_specs_name_the_field() {
        let docker = "name = \"web\"\ndriver = \"docker\"\nimage = \"web:1\"\n";
        let cases: &[(&str, String, &str)] = &[
            ("unknown field", format!("{BASE}\nreplica = 3"), "`replica`"),
            ("unknown nested field", format!("{BASE}\n[resources]\ngpu = 1"), "`gpu`"),
            ("bad size", format!("{BASE}\n[resources]\nmemory = \"12QB\""), "`resources.memory`: \"12QB\" is not a size like 256Mi or 1G"),
            ("bad cpu", format!("{BASE}\n[resources]\ncpu = \"lots\""), "`resources.cpu`"),
            ("bad duration", format!("reschedule_after = \"soon\"\n{BASE}"), "`reschedule_after`: \"soon\" is not a duration"),
            ("duration without unit", format!("reschedule_after = 30\n{BASE}"), "`reschedule_after`"),
            ("stop delay too long", format!("stop_delay = \"11m\"\n{BASE}"), "`stop_delay`: must be at most 10m"),
            ("bad health duration", format!("{BASE}\n[health]\ntcp = \"http\"\ninterval = \"5 parsecs\""), "`health.interval`"),
            ("docker without image", "name = \"web\"\ndriver = \"docker\"\n".into(), "`image`: required"),
            ("process without command", "name = \"web\"\ndriver = \"process\"\n".into(), "`command`: required"),
            ("both", format!("{docker}command = [\"x\"]\n"), "`command`: not allowed"),
            ("both (process)", "name = \"web\"\ndriver = \"process\"\nimage = \"i\"\ncommand = [\"x\"]\n".into(), "`image`: not allowed"),
            ("unknown driver", "name = \"web\"\ndriver = \"podman\"\n".into(), "`driver`"),
            ("bad network", format!("{docker}network = \"overlay\"\n"), "`network`: \"overlay\" is not \"bridge\""),
            ("network with process", format!("network = \"host\"\n{BASE}"), "`network`: applies to driver = \"docker\" only"),
            ("scaler without max", format!("{BASE}\n[scaler]\nmin = 2"), "`scaler`: max is required"),
            ("scaler bad window", format!("{BASE}\n[scaler]\nmax = 3\nwindows = \"someday => 2\""), "`scaler`: window"),
            ("scaler window table typo", format!("{BASE}\n[scaler]\nmax = 3\nwindows = [{{ days = \"mon\", from = \"10:00\", till = \"11:00\", replicas = 2 }}]"), "windows[0]: unknown field `till`"),
            ("empty command", "name = \"web\"\ndriver = \"process\"\ncommand = []\n".into(), "`command`"),
            ("replicas too large", format!("replicas = 1001\n{BASE}"), "`replicas`: 1001 is not within 0..=1000"),
            ("negative replicas", format!("replicas = -1\n{BASE}"), "`replicas`"),
            ("empty name", BASE.replace("name = \"web\"", "name = \"\""), "`name`"),
            ("bad name", BASE.replace("name = \"web\"", "name = \"Web_1\""), "`name`: \"Web_1\""),
            ("bad constraint", format!("constraints = [\"zone == a\", \"zone\"]\n{BASE}"), "`constraints[1]`"),
            ("bad affinity", format!("affinity = [\"db\"]\n{BASE}"), "`affinity[0]`"),
            ("bad anti-affinity", format!("anti_affinity = [\"service:Bad Name\"]\n{BASE}"), "`anti_affinity[0]`"),
            ("depends on itself", format!("depends_on = [\"web\"]\n{BASE}"), "`depends_on[0]`: a service cannot depend on itself"),
            ("duplicate dependency", format!("depends_on = [\"db\", \"db\"]\n{BASE}"), "`depends_on[1]`"),
            ("port 0", BASE.replace("container_port = 8080", "container_port = 0"), "`ports[0].container_port`"),
            ("host port too large", format!("{BASE}host_port = 70000\n"), "`ports[0].host_port`"),
            ("duplicate port name", format!("{BASE}[[ports]]\nname = \"http\"\ncontainer_port = 9090\n"), "`ports[1].name`"),
            ("duplicate host port", format!("{BASE}host_port = 80\n[[ports]]\nname = \"b\"\ncontainer_port = 81\nhost_port = 80\n"), "`ports[1].host_port`"),
            ("bad protocol", format!("{BASE}protocol = \"sctp\"\n"), "`ports[0].protocol`"),
            ("health port unknown", format!("{BASE}\n[health]\nhttp = \"/h\"\nport = \"admin\""), "`health.port`"),
            ("health tcp unknown", format!("{BASE}\n[health]\ntcp = \"admin\""), "`health.tcp`"),
            ("health two probes", format!("{BASE}\n[health]\ntcp = \"http\"\nhttp = \"/h\""), "`health`"),
            ("health no probe", format!("{BASE}\n[health]\ninterval = \"1s\""), "`health`"),
            ("health bad path", format!("{BASE}\n[health]\nhttp = \"healthz\""), "`health.http`"),
            ("health retries 0", format!("{BASE}\n[health]\ntcp = \"http\"\nretries = 0"), "`health.retries`"),
            ("bad restart", format!("restart = \"sometimes\"\n{BASE}"), "`restart`"),
            ("backoff max below backoff", format!("restart_backoff = \"10s\"\nrestart_backoff_max = \"1s\"\n{BASE}"), "`restart_backoff_max`"),
            ("no way to update", format!("{BASE}\n[update]\nmax_unavailable = 0"), "`update.max_unavailable`"),
            ("zero deadline", format!("{BASE}\n[update]\nhealthy_deadline = \"0s\""), "`update.healthy_deadline`"),
            ("bad env name", format!("{BASE}\n[env]\n\"A=B\" = \"x\""), "`env.A=B`"),
            ("bad spread", format!("spread = \"two words\"\n{BASE}"), "`spread`"),
            ("wrong type", BASE.replace("container_port = 8080", "container_port = \"8080\""), "line 7: invalid type"),
            ("unknown field line", format!("{BASE}replica = 3\n"), "line 8: unknown field `replica`"),
        ];
        for (what, text, want) in cases {
            let err = ServiceSpec::from_toml("web.toml", text).expect_err(what);
            let msg = err.to_string();
            assert!(msg.starts_with("service spec web.toml: "), "{what}: {msg}");
            assert!(msg.contains(want), "{what}: {msg:?} lacks {want:?}");
        }
    }

    #[test]
    fn host_networking_and_window_tables_round_trip() {
        let text = "name = \"api\"\ndriver = \"docker\"\nimage = \"api:1\"\nnetwork = \"host\"\n[scaler]\nmax = 4\npolicy = \"schedule\"\nwindows = [{ days = \"mon-fri\", from = \"19:00\", to = \"23:00\", replicas = 3, tz = \"Asia/Shanghai\" }]\n";
        let spec = ServiceSpec::from_toml("api.toml", text).unwrap();
        assert!(matches!(
            spec.kind,
            WorkloadKind::Docker {
                host_network: true,
                ..
            }
        ));
        assert_eq!(
            spec.scaler.get("windows").map(String::as_str),
            Some("mon-fri 19:00-23:00 Asia/Shanghai => 3")
        );
        let file = SpecFile::from(spec.clone());
        assert_eq!(file.network.as_deref(), Some("host"));
        assert_eq!(
            file.validate().unwrap(),
            spec,
            "the file form reads back the same"
        );
        assert!(spec.autoscaling().is_some());
    }

    #[test]
    fn invalid_json_specs_are_refused_too() {
        let mut file = SpecFile::from(ServiceSpec::from_toml("t.toml", BASE).unwrap());
        file.replicas = Some(5000);
        let json = serde_json::to_string(&file).unwrap();
        let err = serde_json::from_str::<ServiceSpec>(&json).unwrap_err();
        assert!(err.to_string().contains("`replicas`"), "{err}");
    }
}
