//! [`PolicyHost`]: plugin bindings, hot swap, failure counting and quarantine, and the
//! scale and discovery calls (scheduling rounds live in `round`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use shoal_policy_logic as logic;
use shoal_policy_logic::{DiscoveryInput, PlacementRequest, ScaleDecision, ScaleInput, Snapshot};

use crate::builtin;
use crate::convert;
use crate::error::PolicyError;
use crate::round::ScheduleRound;
use crate::runtime::{CallError, Loaded, Pre, Runtime, Stats};
use crate::types::{
    DecidedBy, Discovered, HostConfig, HostStats, KvReader, PlacementOutcome, PluginState,
    PluginStatus, PolicyKind, Scaled, WeightedEndpoint,
};

/// A plugin bound to a (kind, scope), with its failure record.
pub(crate) struct Binding {
    pub loaded: Loaded,
    kind: PolicyKind,
    scope: Option<String>,
    consecutive: AtomicU32,
    total_failures: AtomicU64,
    calls: AtomicU64,
    quarantined: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Binding {
    pub fn decided_by(&self) -> DecidedBy {
        DecidedBy::Plugin {
            name: self.loaded.name.to_string(),
            hash: self.loaded.hash.clone(),
        }
    }
}

/// The three built-in components.
struct Builtins {
    scheduler: Loaded,
    scaler: Loaded,
    discovery: Loaded,
}

/// Runs policy plugins — installed per (kind, scope) — with the built-in policies as
/// fallback. Thread-safe (`Send + Sync`); every call is synchronous and short (bounded
/// by the deadline), so from async code call it from `spawn_blocking`.
pub struct PolicyHost {
    pub(crate) runtime: Runtime,
    config: HostConfig,
    builtins: Builtins,
    bindings: RwLock<Bindings>,
}

impl std::fmt::Debug for PolicyHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyHost")
            .field("config", &self.config)
            .field("plugins", &self.status().len())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Installed plugins: per kind, the cluster default and one per service. Looked up on
/// every call by service name, without allocating.
#[derive(Default)]
struct Bindings {
    defaults: HashMap<PolicyKind, Arc<Binding>>,
    services: HashMap<PolicyKind, HashMap<String, Arc<Binding>>>,
}

impl Bindings {
    fn slot(
        &mut self,
        kind: PolicyKind,
        scope: Option<&str>,
        binding: Option<Arc<Binding>>,
    ) -> Option<Arc<Binding>> {
        match (scope, binding) {
            (None, Some(b)) => self.defaults.insert(kind, b),
            (None, None) => self.defaults.remove(&kind),
            (Some(s), Some(b)) => self
                .services
                .entry(kind)
                .or_default()
                .insert(s.to_string(), b),
            (Some(s), None) => self.services.get_mut(&kind).and_then(|m| m.remove(s)),
        }
    }

    fn get(&self, kind: PolicyKind, service: &str) -> Option<&Arc<Binding>> {
        self.services
            .get(&kind)
            .and_then(|m| m.get(service))
            .or_else(|| self.defaults.get(&kind))
    }

    fn all(&self) -> impl Iterator<Item = &Arc<Binding>> {
        self.defaults
            .values()
            .chain(self.services.values().flat_map(|m| m.values()))
    }
}

fn check_name(name: &str) -> Result<(), PolicyError> {
    let ok = !name.is_empty()
        && name.chars().count() <= 64
        && name.chars().all(|c| !c.is_whitespace() && !c.is_control());
    if ok {
        Ok(())
    } else {
        Err(PolicyError::BadName(name.chars().take(80).collect()))
    }
}

fn check_scope(scope: Option<&str>) -> Result<(), PolicyError> {
    match scope {
        None => Ok(()),
        Some(s)
            if !s.is_empty()
                && s.len() <= 253
                && s.chars().all(|c| !c.is_whitespace() && !c.is_control()) =>
        {
            Ok(())
        }
        Some(s) => Err(PolicyError::BadScope(s.chars().take(80).collect())),
    }
}

impl PolicyHost {
    /// Starts the engine (and its epoch thread) and loads the built-in components,
    /// from the cache when `config.cache_dir` has them.
    pub fn new(config: HostConfig) -> Result<PolicyHost, PolicyError> {
        let runtime = Runtime::new(&config)?;
        let load = |kind, name, wasm| {
            runtime
                .load(kind, name, wasm)
                .map_err(|e| PolicyError::Engine(format!("built-in {kind} policy: {e}")))
        };
        let builtins = Builtins {
            scheduler: load(
                PolicyKind::Scheduler,
                "builtin-scheduler",
                builtin::SCHEDULER,
            )?,
            scaler: load(PolicyKind::Scaler, "builtin-scaler", builtin::SCALER)?,
            discovery: load(
                PolicyKind::Discovery,
                "builtin-discovery",
                builtin::DISCOVERY,
            )?,
        };
        Ok(PolicyHost {
            runtime,
            config,
            builtins,
            bindings: RwLock::new(Bindings::default()),
        })
    }

    /// Gives plugins read access to the cluster's key/value store (`kv-get`); without
    /// it `kv-get` answers `none`.
    pub fn with_kv(mut self, kv: Arc<dyn KvReader>) -> PolicyHost {
        self.runtime.set_kv(kv);
        self
    }

    /// The configuration the host runs with.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// Checks that `wasm` is a component of `kind`'s world that the host can run,
    /// without installing it.
    pub fn validate(&self, kind: PolicyKind, wasm: &[u8]) -> Result<(), PolicyError> {
        self.runtime.load(kind, "validate", wasm).map(drop)
    }

    /// Installs (or replaces) the plugin for `kind` in `scope` (a service name, or
    /// `None` for the cluster default) and returns the blake3 hash of `wasm` (hex).
    /// Calls already running finish on the version they started with.
    pub fn install(
        &self,
        kind: PolicyKind,
        scope: Option<&str>,
        name: &str,
        wasm: &[u8],
    ) -> Result<String, PolicyError> {
        check_name(name)?;
        check_scope(scope)?;
        let loaded = self.runtime.load(kind, name, wasm)?;
        let hash = loaded.hash.clone();
        let binding = Arc::new(Binding {
            loaded,
            kind,
            scope: scope.map(str::to_string),
            consecutive: AtomicU32::new(0),
            total_failures: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            quarantined: AtomicBool::new(false),
            last_error: Mutex::new(None),
        });
        let previous = self
            .bindings
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .slot(kind, scope, Some(binding));
        tracing::info!(%kind, scope = scope.unwrap_or("*"), name, %hash, replaced = previous.is_some(), "policy plugin installed");
        Ok(hash)
    }

    /// Removes the plugin for `kind` in `scope`, reverting to the built-in policy (or,
    /// for a service scope, to the cluster default). Returns whether one was bound.
    pub fn remove(&self, kind: PolicyKind, scope: Option<&str>) -> bool {
        let removed = self
            .bindings
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .slot(kind, scope, None);
        if removed.is_some() {
            tracing::info!(%kind, scope = scope.unwrap_or("*"), "policy plugin removed");
        }
        removed.is_some()
    }

    /// Every installed binding and its health, sorted by kind then scope.
    pub fn status(&self) -> Vec<PluginStatus> {
        let bindings = self.bindings.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<PluginStatus> = bindings
            .all()
            .map(|b| {
                let failures = b.consecutive.load(Ordering::Relaxed);
                let state = if b.quarantined.load(Ordering::Relaxed) {
                    PluginState::Quarantined
                } else if failures > 0 {
                    PluginState::Failed
                } else {
                    PluginState::Active
                };
                PluginStatus {
                    kind: b.kind,
                    scope: b.scope.clone(),
                    name: b.loaded.name.to_string(),
                    hash: b.loaded.hash.clone(),
                    state,
                    failures,
                    total_failures: b.total_failures.load(Ordering::Relaxed),
                    calls: b.calls.load(Ordering::Relaxed),
                    last_error: b
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| (a.kind, &a.scope).cmp(&(b.kind, &b.scope)));
        out
    }

    /// Counters since start.
    pub fn stats(&self) -> HostStats {
        let s = &self.runtime.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HostStats {
            compiled: get(&s.compiled),
            cache_hits: get(&s.cache_hits),
            plugin_answers: get(&s.plugin_answers),
            plugin_failures: get(&s.plugin_failures),
            builtin_failures: get(&s.builtin_failures),
            native_answers: get(&s.native_answers),
            quarantines: get(&s.quarantines),
        }
    }

    /// The active (not quarantined) plugin for `kind` and `service`: the service's own
    /// binding if it has one, else the cluster default. A quarantined binding is not
    /// skipped over: its calls go to the built-in policy.
    pub(crate) fn binding(&self, kind: PolicyKind, service: &str) -> Option<Arc<Binding>> {
        let bindings = self.bindings.read().unwrap_or_else(|p| p.into_inner());
        let found = bindings.get(kind, service)?;
        if found.quarantined.load(Ordering::Relaxed) {
            return None;
        }
        Some(found.clone())
    }

    pub(crate) fn builtin(&self, kind: PolicyKind) -> &Loaded {
        match kind {
            PolicyKind::Scheduler => &self.builtins.scheduler,
            PolicyKind::Scaler => &self.builtins.scaler,
            PolicyKind::Discovery => &self.builtins.discovery,
        }
    }

    pub(crate) fn succeeded(&self, binding: &Binding) {
        binding.calls.fetch_add(1, Ordering::Relaxed);
        binding.consecutive.store(0, Ordering::Relaxed);
        Stats::bump(&self.runtime.stats.plugin_answers);
    }

    /// Records a failed plugin call; quarantines the plugin after too many in a row.
    pub(crate) fn failed(&self, binding: &Binding, error: &CallError) {
        binding.calls.fetch_add(1, Ordering::Relaxed);
        let name = &*binding.loaded.name;
        let kind = binding.kind;
        if !error.is_plugin_fault() {
            tracing::warn!(%kind, plugin = name, "policy plugin {error}; using the built-in policy");
            return;
        }
        Stats::bump(&self.runtime.stats.plugin_failures);
        binding.total_failures.fetch_add(1, Ordering::Relaxed);
        *binding.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
        let failures = binding.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(%kind, plugin = name, failures, "policy plugin {error}; using the built-in policy");
        if failures >= self.config.quarantine_after.max(1)
            && !binding.quarantined.swap(true, Ordering::Relaxed)
        {
            Stats::bump(&self.runtime.stats.quarantines);
            tracing::error!(%kind, plugin = name, failures, "policy plugin quarantined after {failures} failures in a row (last: {error}); install a new version to re-enable it");
        }
    }

    pub(crate) fn builtin_failed(&self, kind: PolicyKind, error: &CallError) {
        Stats::bump(&self.runtime.stats.builtin_failures);
        tracing::error!(%kind, "built-in policy component {error}; using the native fallback");
    }

    pub(crate) fn native_answered(&self) {
        Stats::bump(&self.runtime.stats.native_answers);
    }

    /// Starts a scheduling round on `snapshot`: the snapshot is handed to each policy
    /// once, then [`ScheduleRound::place`] answers requests one by one, each seeing the
    /// placements made before it.
    pub fn begin_round<'h>(&'h self, snapshot: &'h Snapshot) -> ScheduleRound<'h> {
        ScheduleRound::new(self, snapshot)
    }

    /// Places every request in order on one snapshot (one hand-over per policy, then a
    /// cheap `place` per request). The plugin is chosen per request by its service.
    pub fn schedule(
        &self,
        snapshot: &Snapshot,
        requests: &[PlacementRequest],
    ) -> Vec<PlacementOutcome> {
        let mut round = self.begin_round(snapshot);
        requests.iter().map(|r| round.place(r)).collect()
    }

    /// Runs one plugin call in a fresh sandbox, and `with` on the instance.
    fn call<T>(
        &self,
        loaded: &Loaded,
        with: impl FnOnce(&Pre, &mut wasmtime::Store<crate::runtime::State>) -> Result<T, CallError>,
    ) -> Result<T, CallError> {
        let mut store = self.runtime.store(loaded.name.clone());
        with(&loaded.pre, &mut store)
    }

    fn try_scale(
        &self,
        loaded: &Loaded,
        wit: &crate::bindings::scaler::shoal::policy::scaling::ScaleInput,
        input: &ScaleInput,
    ) -> Result<ScaleDecision, CallError> {
        let rt = &self.runtime;
        self.call(loaded, |pre, store| {
            let Pre::Scaler(pre) = pre else {
                return Err(CallError::Host("not a scaler".into()));
            };
            let instance = pre
                .instantiate(&mut *store)
                .map_err(|e| rt.classify(store, e))?;
            let answer = instance
                .call_scale(&mut *store, wit)
                .map_err(|e| rt.classify(store, e))?;
            let d = answer.map_err(|e| rt.guest_error(e))?;
            let decision = ScaleDecision {
                replicas: d.replicas,
                reason: crate::runtime::truncate(d.reason, 1024),
            };
            decision.check(input).map_err(CallError::Malformed)?;
            Ok(decision)
        })
    }

    /// The desired replica count for `input.service`: from its plugin, else the
    /// built-in scaler (`target-utilization` or `schedule`, by param `policy`). If even
    /// the built-in cannot decide (bad params), the current count, moved into bounds.
    pub fn scale(&self, input: &ScaleInput) -> ScaleDecision {
        self.scale_explained(input).decision
    }

    /// [`PolicyHost::scale`], saying who answered: the plugin's name, or `built-in
    /// <policy>` (with why the plugin was passed over, if it was).
    pub fn scale_explained(&self, input: &ScaleInput) -> Scaled {
        let wit = convert::scale_input(input);
        let policy = input
            .params
            .get("policy")
            .map(|p| p.trim().to_string())
            .unwrap_or_else(|| "target-utilization".into());
        let mut fallback = None;
        if let Some(binding) = self.binding(PolicyKind::Scaler, &input.service) {
            match self.try_scale(&binding.loaded, &wit, input) {
                Ok(decision) => {
                    self.succeeded(&binding);
                    return Scaled {
                        decision,
                        decided_by: binding.loaded.name.to_string(),
                        fallback_reason: None,
                    };
                }
                Err(e) => {
                    fallback = Some(format!("plugin {} failed: {e}", binding.loaded.name));
                    self.failed(&binding, &e);
                }
            }
        }
        let decided_by = format!("built-in {policy}");
        let decision = match self.try_scale(self.builtin(PolicyKind::Scaler), &wit, input) {
            Ok(d) => d,
            Err(CallError::Guest(e)) => keep_current(input, &e),
            Err(e) => {
                self.builtin_failed(PolicyKind::Scaler, &e);
                self.native_answered();
                logic::scale(input).unwrap_or_else(|e| keep_current(input, &e))
            }
        };
        Scaled {
            decision,
            decided_by,
            fallback_reason: fallback,
        }
    }

    fn try_discover(
        &self,
        loaded: &Loaded,
        wit: &crate::bindings::discovery::shoal::policy::discovering::DiscoveryInput,
        count: usize,
    ) -> Result<Vec<logic::Ranked>, CallError> {
        let rt = &self.runtime;
        self.call(loaded, |pre, store| {
            let Pre::Discovery(pre) = pre else {
                return Err(CallError::Host("not a discovery policy".into()));
            };
            let instance = pre
                .instantiate(&mut *store)
                .map_err(|e| rt.classify(store, e))?;
            let answer = instance
                .call_discover(&mut *store, wit)
                .map_err(|e| rt.classify(store, e))?;
            let list = answer.map_err(|e| rt.guest_error(e))?;
            let ranked: Vec<logic::Ranked> = list
                .into_iter()
                .map(|r| logic::Ranked {
                    index: r.index,
                    weight: r.weight,
                })
                .collect();
            logic::check_ranked(&ranked, count).map_err(CallError::Malformed)?;
            Ok(ranked)
        })
    }

    /// The endpoints of `input.service` that `input.caller` should use, best first:
    /// from its plugin, else the built-in `zone-aware` policy. If even that cannot
    /// decide (bad params), every healthy endpoint in input order.
    pub fn discover(&self, input: &DiscoveryInput) -> Vec<WeightedEndpoint> {
        self.discover_explained(input).endpoints
    }

    /// [`PolicyHost::discover`], saying which policy decided and, when a bound plugin
    /// was passed over, why.
    pub fn discover_explained(&self, input: &DiscoveryInput) -> Discovered {
        let wit = convert::discovery_input(input);
        let count = input.endpoints.len();
        let mut fallback_reason = None;
        let (ranked, decided_by) = 'ranked: {
            if let Some(binding) = self.binding(PolicyKind::Discovery, &input.service) {
                match self.try_discover(&binding.loaded, &wit, count) {
                    Ok(r) => {
                        self.succeeded(&binding);
                        break 'ranked (r, binding.decided_by());
                    }
                    Err(e) => {
                        fallback_reason = Some(e.to_string());
                        self.failed(&binding, &e);
                    }
                }
            }
            match self.try_discover(self.builtin(PolicyKind::Discovery), &wit, count) {
                Ok(r) => break 'ranked (r, DecidedBy::Builtin),
                Err(CallError::Guest(e)) => {
                    fallback_reason.get_or_insert_with(|| e.clone());
                    break 'ranked (all_healthy(input, &e), DecidedBy::Builtin);
                }
                Err(e) => self.builtin_failed(PolicyKind::Discovery, &e),
            }
            self.native_answered();
            let r = logic::discover(input).unwrap_or_else(|e| {
                fallback_reason.get_or_insert_with(|| e.clone());
                all_healthy(input, &e)
            });
            (r, DecidedBy::Native)
        };
        let endpoints = ranked
            .iter()
            .filter_map(|r| {
                input
                    .endpoints
                    .get(r.index as usize)
                    .map(|e| WeightedEndpoint {
                        endpoint: e.clone(),
                        weight: r.weight,
                    })
            })
            .collect();
        Discovered {
            ranked,
            endpoints,
            decided_by,
            fallback_reason,
        }
    }
}

fn keep_current(input: &ScaleInput, error: &str) -> ScaleDecision {
    let (min, max) = input.bounds();
    ScaleDecision {
        replicas: input.current.max(min).min(max),
        reason: format!("scaler cannot decide ({error}); keeping the current count"),
    }
}

fn all_healthy(input: &DiscoveryInput, error: &str) -> Vec<logic::Ranked> {
    tracing::warn!(service = %input.service, "discovery policy cannot decide ({error}); using every healthy endpoint");
    input
        .endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| e.healthy)
        .map(|(i, e)| logic::Ranked {
            index: i as u32,
            weight: if e.weight == 0 {
                logic::DEFAULT_WEIGHT
            } else {
                e.weight
            },
        })
        .collect()
}
