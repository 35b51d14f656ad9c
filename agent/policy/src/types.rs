//! The host's public types: configuration, plugin status and the answers it gives.
//! Policy inputs (snapshots, requests, metrics, endpoints) are the plain types of
//! `shoal-policy-logic`, re-exported from this crate; all derive serde so a dry run can
//! read them from JSON files.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_policy_logic::{Endpoint, Rejection};

use crate::error::PolicyError;

/// Which world a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Places replicas on nodes (`shoal:policy/scheduler`).
    Scheduler,
    /// Decides replica counts (`shoal:policy/scaler`).
    Scaler,
    /// Orders a service's endpoints for a caller (`shoal:policy/discovery`).
    Discovery,
}

impl PolicyKind {
    /// Every kind.
    pub const ALL: [PolicyKind; 3] = [
        PolicyKind::Scheduler,
        PolicyKind::Scaler,
        PolicyKind::Discovery,
    ];

    /// `scheduler`, `scaler` or `discovery`.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Scheduler => "scheduler",
            PolicyKind::Scaler => "scaler",
            PolicyKind::Discovery => "discovery",
        }
    }

    /// The functions a component of this world exports.
    pub(crate) fn exports(self) -> &'static [&'static str] {
        match self {
            PolicyKind::Scheduler => &["set-snapshot", "place", "commit"],
            PolicyKind::Scaler => &["scale"],
            PolicyKind::Discovery => &["discover"],
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyKind {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| PolicyError::UnknownKind(s.to_string()))
    }
}

/// Host settings; [`HostConfig::default`] gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// Where compiled components are cached (keyed by blake3 of the wasm and the
    /// engine's compatibility hash); `None` compiles on every start. Must be trusted:
    /// cached artifacts are native code.
    pub cache_dir: Option<PathBuf>,
    /// Longest a single guest call may run (default 50 ms). `set-snapshot` gets an
    /// extra 20 µs per node.
    pub deadline: Duration,
    /// Most linear memory one plugin instance may have (default 64 MiB).
    pub memory_cap: usize,
    /// Consecutive failed calls after which a plugin is quarantined (default 3).
    pub quarantine_after: u32,
    /// Most plugin instances alive at once across all threads (default 64; each
    /// reserves virtual address space, not memory).
    pub max_instances: u32,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            cache_dir: None,
            deadline: Duration::from_millis(50),
            memory_cap: 64 << 20,
            quarantine_after: 3,
            max_instances: 64,
        }
    }
}

/// Read-only access to the cluster's key/value store for plugins (`kv-get`).
pub trait KvReader: Send + Sync {
    /// The value of `key`, if present.
    fn get(&self, key: &str) -> Option<String>;
}

impl KvReader for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        BTreeMap::get(self, key).cloned()
    }
}

impl KvReader for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

/// Health of an installed plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginState {
    /// Its last call succeeded (or it has not been called yet).
    Active,
    /// Its last call failed; still in use until `quarantine_after` failures in a row.
    Failed,
    /// Failed too often in a row: no longer called; the built-in policy answers until
    /// a new version is installed.
    Quarantined,
}

impl fmt::Display for PluginState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PluginState::Active => "active",
            PluginState::Failed => "failed",
            PluginState::Quarantined => "quarantined",
        })
    }
}

/// One installed plugin binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginStatus {
    /// Its world.
    pub kind: PolicyKind,
    /// The service it is bound to, or `None` for the cluster default.
    pub scope: Option<String>,
    /// Name given at install.
    pub name: String,
    /// blake3 of the wasm, hex.
    pub hash: String,
    /// Health.
    pub state: PluginState,
    /// Consecutive failed calls.
    pub failures: u32,
    /// Failed calls since install.
    pub total_failures: u64,
    /// Calls since install.
    pub calls: u64,
    /// The most recent failure, if any.
    pub last_error: Option<String>,
}

/// Which policy produced an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "policy")]
pub enum DecidedBy {
    /// An installed plugin.
    Plugin {
        /// Its name.
        name: String,
        /// blake3 of its wasm, hex.
        hash: String,
    },
    /// The built-in component embedded in the agent.
    Builtin,
    /// The native build of the built-in policy (when even the component failed).
    Native,
}

/// Why replicas could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    /// Rendered, e.g. `0/5 nodes fit: 3 insufficient memory, 2 constraint zone != c`.
    pub message: String,
    /// Nodes rejected per filter.
    pub rejections: Vec<Rejection>,
}

impl fmt::Display for Unplaced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The answer to one placement request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementOutcome {
    /// The request's service.
    pub service: String,
    /// Node name per placed replica.
    pub nodes: Vec<String>,
    /// Node index (in the snapshot) per placed replica.
    pub indices: Vec<u32>,
    /// Set when fewer replicas than requested were placed.
    pub unplaced: Option<Unplaced>,
    /// Who decided.
    pub decided_by: DecidedBy,
    /// Why the bound plugin's answer was not used, if it was not.
    pub fallback_reason: Option<String>,
}

/// An endpoint to use and its load-balancing weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightedEndpoint {
    /// The endpoint, as given in the input.
    pub endpoint: Endpoint,
    /// Relative weight, at least 1.
    pub weight: u32,
}

/// A discovery answer and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Discovered {
    /// Endpoints to use, best first: indices into the input's endpoints, each once.
    pub ranked: Vec<shoal_policy_logic::Ranked>,
    /// The same endpoints, copied from the input, with their weights.
    pub endpoints: Vec<WeightedEndpoint>,
    /// Which policy decided.
    pub decided_by: DecidedBy,
    /// Why the bound plugin (or the built-in's params) could not be used, if so.
    pub fallback_reason: Option<String>,
}

/// A scaler's answer and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaled {
    /// The answer, within the input's bounds.
    pub decision: shoal_policy_logic::ScaleDecision,
    /// The plugin's name, or `built-in <policy>`.
    pub decided_by: String,
    /// Why the bound plugin was passed over (it failed, trapped, answered out of
    /// bounds), if it was.
    pub fallback_reason: Option<String>,
}

/// Counters of the host's work since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStats {
    /// Components compiled with Cranelift.
    pub compiled: u64,
    /// Components loaded from the on-disk cache instead.
    pub cache_hits: u64,
    /// Calls answered by an installed plugin.
    pub plugin_answers: u64,
    /// Failed plugin calls (traps, timeouts, memory cap, malformed answers, errors).
    pub plugin_failures: u64,
    /// Failed calls of the built-in components.
    pub builtin_failures: u64,
    /// Answers from the native fallback.
    pub native_answers: u64,
    /// Plugins quarantined.
    pub quarantines: u64,
}
