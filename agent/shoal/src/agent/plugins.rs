//! Policy plugins on one agent: a sans-IO manager of the bindings in cluster state,
//! and the worker that compiles and installs them off the agent loop.
//!
//! `shoal plugin install` stores the `.wasm` as a blob and writes a binding
//! (`plugin/<kind>/default` or `plugin/<kind>/service/<name>`, see
//! [`super::keys`]). Every agent that sees the binding fetches the blob from peers
//! that advertise it, verifies it, compiles it and swaps it into the policy host.
//! Each agent publishes what it runs in `node/<name>/plugins`, so any agent can
//! answer `shoal plugin ls --all`.
//!
//! [`PluginManager`] decides and returns [`Effect`]s; it never touches the store,
//! the network or wasmtime. The loop carries effects out: fetches go to the blob
//! worker, compiles to [`compile`] on a blocking thread (reading the blob,
//! validating, installing — Cranelift takes a while), removals to the host. At
//! most one compile per binding runs at a time, so an older version can never be
//! installed over a newer one.

use std::collections::BTreeMap;
use std::sync::Arc;

use shoal_blob::{BlobId, BlobStore};
use shoal_policy::{KvReader, PluginState, PolicyHost, PolicyKind};
use tokio::sync::watch;

use super::keys::{binding_key, Binding, PluginRow};
use super::views::Views;

/// Where a binding stands on this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// Waiting for the blob from peers.
    Fetching,
    /// Blob present; compiling off the loop.
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

/// Something the loop must do for the manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Fetch `blob` from `peers` (the blob worker does nothing if it has it).
    Fetch {
        /// The blob.
        blob: BlobId,
        /// Nodes that advertise it.
        peers: Vec<String>,
    },
    /// Read `blob`, validate it as `binding.kind` and install it; report the result
    /// with [`PluginManager::on_compiled`].
    Compile {
        /// The binding key.
        key: String,
        /// The binding.
        binding: Binding,
        /// Its blob.
        blob: BlobId,
    },
    /// Revert `kind` in `service` scope to the built-in (or cluster default).
    Uninstall {
        /// The world.
        kind: PolicyKind,
        /// The scope.
        service: Option<String>,
    },
}

/// One binding and what this agent did with it.
#[derive(Debug, Clone)]
struct Tracked {
    binding: Binding,
    local: Local,
    /// A compile of this blob is running.
    compiling: Option<String>,
    /// Failed attempts of this binding so far.
    failures: u32,
}

/// The bindings this agent knows (see the module docs).
#[derive(Debug, Default)]
pub struct PluginManager {
    bindings: BTreeMap<String, Tracked>,
}

/// Failed bindings are retried this many times (a peer may come back).
const MAX_ATTEMPTS: u32 = 10;

impl PluginManager {
    /// A binding key's value changed (`None`: deleted). `holds` says whether the
    /// local store has a blob; `advertisers` who else does.
    pub fn on_binding(
        &mut self,
        key: &str,
        binding: Option<&Binding>,
        holds: &dyn Fn(&BlobId) -> bool,
        advertisers: &dyn Fn(&BlobId) -> Vec<String>,
    ) -> Vec<Effect> {
        let Some(binding) = binding else {
            return match self.bindings.remove(key) {
                Some(t) => vec![Effect::Uninstall {
                    kind: t.binding.kind,
                    service: t.binding.service,
                }],
                None => Vec::new(),
            };
        };
        if self
            .bindings
            .get(key)
            .is_some_and(|t| t.binding.blob == binding.blob)
        {
            return Vec::new();
        }
        tracing::info!(kind = %binding.kind, name = %binding.name, hash = %binding.hash, "plugin binding changed");
        let compiling = self.bindings.get(key).and_then(|t| t.compiling.clone());
        self.bindings.insert(
            key.to_string(),
            Tracked {
                binding: binding.clone(),
                local: Local::Fetching,
                compiling,
                failures: 0,
            },
        );
        self.ensure(key, holds, advertisers)
    }

    /// A node now advertises blob `id`: bindings waiting for it can fetch it.
    pub fn on_advert(
        &mut self,
        id: &BlobId,
        holds: &dyn Fn(&BlobId) -> bool,
        advertisers: &dyn Fn(&BlobId) -> Vec<String>,
    ) -> Vec<Effect> {
        let hex = id.to_string();
        let waiting: Vec<String> = self
            .bindings
            .iter()
            .filter(|(_, t)| {
                t.binding.blob == hex && matches!(t.local, Local::Fetching | Local::Failed { .. })
            })
            .map(|(k, _)| k.clone())
            .collect();
        waiting
            .into_iter()
            .flat_map(|k| self.ensure(&k, holds, advertisers))
            .collect()
    }

    /// A download ended.
    pub fn on_fetched(&mut self, id: &BlobId, result: &Result<(), String>) -> Vec<Effect> {
        let hex = id.to_string();
        let waiting: Vec<String> = self
            .bindings
            .iter()
            .filter(|(_, t)| t.binding.blob == hex && t.local == Local::Fetching)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in waiting {
            match result {
                Ok(()) => out.extend(self.compile(&key, *id)),
                Err(reason) => self.fail(&key, format!("fetching blob {id}: {reason}")),
            }
        }
        out
    }

    /// A compile of `blob` for `key` ended (`Ok(hash)`: installed).
    pub fn on_compiled(
        &mut self,
        key: &str,
        blob: &str,
        result: Result<String, String>,
        holds: &dyn Fn(&BlobId) -> bool,
        advertisers: &dyn Fn(&BlobId) -> Vec<String>,
    ) -> Vec<Effect> {
        let Some(t) = self.bindings.get_mut(key) else {
            return Vec::new();
        };
        t.compiling = None;
        if t.binding.blob != blob {
            // A newer binding arrived while this one compiled: now its turn.
            return self.ensure(key, holds, advertisers);
        }
        match result {
            Ok(hash) => {
                tracing::info!(kind = %t.binding.kind, name = %t.binding.name, %hash, "plugin active");
                t.local = Local::Installed;
                t.failures = 0;
            }
            Err(reason) => self.fail(key, reason),
        }
        Vec::new()
    }

    /// Retries failed bindings a bounded number of times.
    pub fn retry(
        &mut self,
        holds: &dyn Fn(&BlobId) -> bool,
        advertisers: &dyn Fn(&BlobId) -> Vec<String>,
    ) -> Vec<Effect> {
        let retry: Vec<String> = self
            .bindings
            .iter()
            .filter(|(_, t)| matches!(t.local, Local::Failed { attempts, .. } if attempts < MAX_ATTEMPTS))
            .map(|(k, _)| k.clone())
            .collect();
        retry
            .into_iter()
            .flat_map(|k| self.ensure(&k, holds, advertisers))
            .collect()
    }

    /// Moves a binding towards installed: compile its blob if present, else fetch it.
    fn ensure(
        &mut self,
        key: &str,
        holds: &dyn Fn(&BlobId) -> bool,
        advertisers: &dyn Fn(&BlobId) -> Vec<String>,
    ) -> Vec<Effect> {
        let Some(t) = self.bindings.get(key) else {
            return Vec::new();
        };
        let id = match t.binding.blob.parse::<BlobId>() {
            Ok(id) => id,
            Err(e) => {
                self.fail(key, format!("blob id {:?}: {e}", t.binding.blob));
                return Vec::new();
            }
        };
        if holds(&id) {
            return self.compile(key, id);
        }
        let peers = advertisers(&id);
        self.set(key, Local::Fetching);
        // With no advertiser known yet, wait for one (`on_advert`) rather than start
        // a fetch that can only fail.
        if peers.is_empty() {
            Vec::new()
        } else {
            vec![Effect::Fetch { blob: id, peers }]
        }
    }

    fn compile(&mut self, key: &str, id: BlobId) -> Vec<Effect> {
        let Some(t) = self.bindings.get_mut(key) else {
            return Vec::new();
        };
        if t.compiling.is_some() {
            // One at a time per binding; `on_compiled` starts the next.
            t.local = Local::Compiling;
            return Vec::new();
        }
        t.local = Local::Compiling;
        t.compiling = Some(t.binding.blob.clone());
        vec![Effect::Compile {
            key: key.to_string(),
            binding: t.binding.clone(),
            blob: id,
        }]
    }

    fn set(&mut self, key: &str, local: Local) {
        if let Some(t) = self.bindings.get_mut(key) {
            t.local = local;
        }
    }

    fn fail(&mut self, key: &str, reason: String) {
        tracing::warn!(binding = key, "plugin not activated: {reason}");
        if let Some(t) = self.bindings.get_mut(key) {
            t.failures += 1;
            t.local = Local::Failed {
                reason,
                attempts: t.failures,
            };
        }
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
            if !self.bindings.contains_key(&binding_key(kind, None)) {
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
        for t in self.bindings.values() {
            let b = &t.binding;
            let (state, failures, error) = match &t.local {
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

/// The outcome of a compile, for [`PluginManager::on_compiled`].
#[derive(Debug)]
pub struct Compiled {
    /// The binding key.
    pub key: String,
    /// The blob compiled.
    pub blob: String,
    /// The installed hash, or why not.
    pub result: Result<String, String>,
}

/// Reads the blob, validates it as `binding.kind` and installs it (blocking: run it
/// on a blocking thread).
pub fn compile(
    store: &BlobStore,
    host: &PolicyHost,
    key: String,
    binding: Binding,
    blob: BlobId,
) -> Compiled {
    let result = store
        .read_all(&blob)
        .map_err(|e| format!("reading blob {blob}: {e}"))
        .and_then(|wasm| {
            host.validate(binding.kind, &wasm)
                .map_err(|e| e.to_string())?;
            host.install(
                binding.kind,
                binding.service.as_deref(),
                &binding.name,
                &wasm,
            )
            .map_err(|e| e.to_string())
        });
    Compiled {
        key,
        blob: binding.blob,
        result,
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

/// The cluster kv as plugins see it through `kv-get`: user keys of the latest
/// published views (internal records are not visible to plugins).
pub struct KvFromViews(pub watch::Receiver<Arc<Views>>);

impl KvReader for KvFromViews {
    fn get(&self, key: &str) -> Option<String> {
        if !super::keys::is_user(key) {
            return None;
        }
        let views = self.0.borrow();
        let e = views.entry(key)?;
        std::str::from_utf8(e.value.as_deref()?)
            .ok()
            .map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(blob: &BlobId) -> Binding {
        Binding {
            kind: PolicyKind::Scheduler,
            service: None,
            name: "p".into(),
            blob: blob.to_string(),
            hash: "h".into(),
            size: 1,
            installed_by: "n1".into(),
            installed_ms: 0,
        }
    }

    fn id(byte: u8) -> BlobId {
        format!("{byte:02x}").repeat(32).parse().unwrap()
    }

    #[test]
    fn a_binding_is_fetched_compiled_and_installed() {
        let mut m = PluginManager::default();
        let key = binding_key(PolicyKind::Scheduler, None);
        let (a, b) = (id(1), id(2));
        // Nobody has the blob yet: wait for an advertisement.
        let none = |_: &BlobId| Vec::new();
        let no = |_: &BlobId| false;
        assert!(m
            .on_binding(&key, Some(&binding(&a)), &no, &none)
            .is_empty());
        let peers = |_: &BlobId| vec!["n2".to_string()];
        assert_eq!(
            m.on_advert(&a, &no, &peers),
            vec![Effect::Fetch {
                blob: a,
                peers: vec!["n2".into()]
            }]
        );
        let fx = m.on_fetched(&a, &Ok(()));
        assert!(matches!(&fx[..], [Effect::Compile { blob, .. }] if *blob == a));
        // A newer binding while the first compiles: its compile waits.
        let yes = |_: &BlobId| true;
        assert!(m
            .on_binding(&key, Some(&binding(&b)), &yes, &none)
            .is_empty());
        let next = m.on_compiled(&key, &a.to_string(), Ok("h".into()), &yes, &none);
        assert!(matches!(&next[..], [Effect::Compile { blob, .. }] if *blob == b));
        assert!(m
            .on_compiled(&key, &b.to_string(), Ok("h".into()), &yes, &none)
            .is_empty());
        assert_eq!(m.bindings[&key].local, Local::Installed);
        // Removal reverts to the built-in.
        assert_eq!(
            m.on_binding(&key, None, &yes, &none),
            vec![Effect::Uninstall {
                kind: PolicyKind::Scheduler,
                service: None
            }]
        );
    }

    #[test]
    fn failures_are_retried_a_bounded_number_of_times() {
        let mut m = PluginManager::default();
        let key = binding_key(PolicyKind::Scaler, Some("web"));
        let a = id(3);
        let yes = |_: &BlobId| true;
        let none = |_: &BlobId| Vec::new();
        assert_eq!(m.on_binding(&key, Some(&binding(&a)), &yes, &none).len(), 1);
        for attempt in 1..=MAX_ATTEMPTS {
            m.on_compiled(&key, &a.to_string(), Err("trap".into()), &yes, &none);
            let retried = m.retry(&yes, &none);
            if attempt < MAX_ATTEMPTS {
                assert_eq!(retried.len(), 1, "attempt {attempt}");
            } else {
                assert!(retried.is_empty(), "gives up after {MAX_ATTEMPTS}");
            }
        }
    }
}
