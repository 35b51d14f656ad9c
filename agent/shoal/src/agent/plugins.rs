//! Policy plugins on one agent: bindings in cluster state, their blobs, and the
//! wasmtime host that runs them.
//!
//! `shoal plugin install` stores the `.wasm` as a blob and writes a binding
//! (`plugin/<kind>/default` or `plugin/<kind>/service/<name>`) into cluster
//! state. Every agent that sees the binding fetches the blob from peers that
//! advertise it, verifies it, compiles it off the driver task, and swaps it into
//! the host. Each agent publishes what it runs in `node/<name>/plugins`, so any
//! agent can answer `shoal plugin ls --all`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use shoal_blob::BlobId;
use shoal_policy::{KvReader, PluginState, PolicyHost, PolicyKind};

/// Prefix of binding keys.
pub const PLUGIN_PREFIX: &str = "plugin/";
/// Suffix of the node-owned key where an agent publishes its plugin states.
pub const PLUGINS_SUFFIX: &str = "plugins";

/// A plugin binding as stored in cluster state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The world it implements.
    pub kind: PolicyKind,
    /// The service it applies to; `None` is the cluster default.
    pub service: Option<String>,
    /// Name given at install.
    pub name: String,
    /// The blob holding the wasm.
    pub blob: String,
    /// blake3 of the wasm (hex), as `b3sum` prints it.
    pub hash: String,
    /// Size of the wasm in bytes.
    pub size: u64,
    /// Agent that accepted the install.
    pub installed_by: String,
    /// Wall-clock time of the install (ms since the epoch).
    pub installed_ms: u64,
}

/// The cluster-state key of a binding.
pub fn binding_key(kind: PolicyKind, service: Option<&str>) -> String {
    match service {
        None => format!("{PLUGIN_PREFIX}{kind}/default"),
        Some(s) => format!("{PLUGIN_PREFIX}{kind}/service/{s}"),
    }
}

/// One row of `shoal plugin ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRow {
    /// The agent reporting.
    pub agent: String,
    /// The world.
    pub kind: PolicyKind,
    /// The service it is bound to, or null for the cluster default.
    pub service: Option<String>,
    /// Plugin name (`builtin` when none is installed).
    pub name: String,
    /// blake3 of the wasm, hex.
    pub hash: String,
    /// `active`, `quarantined`, `fetching` or `failed`.
    pub state: String,
    /// Consecutive failed calls (or fetch/compile attempts).
    pub failures: u32,
    /// Why it is failed or quarantined.
    pub error: Option<String>,
}

/// Where a binding stands on this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// Waiting for the blob from peers.
    Fetching,
    /// Blob present; compiling off the driver task.
    Compiling,
    /// Swapped into the host.
    Installed,
    /// Could not be fetched or compiled.
    Failed {
        /// Why.
        reason: String,
        /// Attempts so far.
        attempts: u32,
    },
}

/// Bindings this agent knows and what it did with them.
#[derive(Default)]
pub struct Plugins {
    /// Binding key → (binding, local state).
    pub bindings: BTreeMap<String, (Binding, Local)>,
}

impl Plugins {
    /// Bindings waiting for `blob`.
    pub fn waiting_for(&self, blob: &BlobId) -> Vec<String> {
        let hex = blob.to_string();
        self.bindings
            .iter()
            .filter(|(_, (b, l))| b.blob == hex && *l == Local::Fetching)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The rows this agent publishes: one per kind for the default scope (the
    /// built-in when nothing is bound) plus one per service binding.
    pub fn rows(&self, agent: &str, host: &PolicyHost) -> Vec<PluginRow> {
        let installed: BTreeMap<(PolicyKind, Option<String>), shoal_policy::PluginStatus> = host
            .status()
            .into_iter()
            .map(|s| ((s.kind, s.scope.clone()), s))
            .collect();
        let mut rows = Vec::new();
        for kind in PolicyKind::ALL {
            let default_key = binding_key(kind, None);
            if !self.bindings.contains_key(&default_key) {
                rows.push(PluginRow {
                    agent: agent.to_string(),
                    kind,
                    service: None,
                    name: "builtin".into(),
                    hash: builtin_hash(kind),
                    state: "active".into(),
                    failures: 0,
                    error: None,
                });
            }
        }
        for (b, local) in self.bindings.values() {
            let (state, failures, error) = match local {
                Local::Fetching | Local::Compiling => ("fetching".to_string(), 0, None),
                Local::Failed { reason, attempts } => {
                    ("failed".to_string(), *attempts, Some(reason.clone()))
                }
                Local::Installed => match installed.get(&(b.kind, b.service.clone())) {
                    Some(s) if s.hash == b.hash => {
                        let state = match s.state {
                            PluginState::Quarantined => "quarantined",
                            // A plugin with some failed calls is still the one answering.
                            PluginState::Active | PluginState::Failed => "active",
                        };
                        (state.to_string(), s.failures, s.last_error.clone())
                    }
                    _ => ("fetching".to_string(), 0, None),
                },
            };
            rows.push(PluginRow {
                agent: agent.to_string(),
                kind: b.kind,
                service: b.service.clone(),
                name: b.name.clone(),
                hash: b.hash.clone(),
                state,
                failures,
                error,
            });
        }
        rows.sort_by(|a, b| (a.kind, &a.service).cmp(&(b.kind, &b.service)));
        rows
    }
}

/// blake3 (hex) of the embedded built-in component of `kind`.
pub fn builtin_hash(kind: PolicyKind) -> String {
    let wasm = match kind {
        PolicyKind::Scheduler => shoal_policy::builtins::SCHEDULER,
        PolicyKind::Scaler => shoal_policy::builtins::SCALER,
        PolicyKind::Discovery => shoal_policy::builtins::DISCOVERY,
    };
    blake3::hash(wasm).to_hex().to_string()
}

/// The cluster kv as plugins see it through `kv-get`: a copy of the live
/// cluster-wide text values, kept current by the driver.
#[derive(Default, Clone)]
pub struct KvMirror(pub Arc<RwLock<BTreeMap<String, String>>>);

impl KvReader for KvMirror {
    fn get(&self, key: &str) -> Option<String> {
        self.0.read().ok()?.get(key).cloned()
    }
}

impl KvMirror {
    /// Applies a changed entry (only user kv is visible to plugins).
    pub fn apply(&self, e: &shoal_core::Entry) {
        if !super::keys::is_user(&e.key) {
            return;
        }
        let Ok(mut map) = self.0.write() else {
            return;
        };
        match e.value.as_deref().map(std::str::from_utf8) {
            Some(Ok(text)) => {
                map.insert(e.key.clone(), text.to_string());
            }
            _ => {
                map.remove(&e.key);
            }
        }
    }
}
