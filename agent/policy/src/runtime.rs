//! Everything wasmtime: the engine and its settings (narrowed here, in one place), the
//! compiled-artifact cache, the per-store sandbox (empty WASI, memory cap, epoch
//! deadline) and the classification of call failures.

use std::fmt;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, OptLevel, PoolConcurrencyLimitError,
    PoolingAllocationConfig, ResourceLimiter, Store, Trap,
};
use wasmtime_wasi::{
    HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};

use crate::bindings::{discovery, scaler, scheduler};
use crate::error::PolicyError;
use crate::types::{HostConfig, KvReader, PolicyKind};

/// Largest component accepted.
/// Time a component may take to instantiate when it is loaded (see `load`).
const STARTUP_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

const MAX_WASM_BYTES: usize = 64 << 20;
/// Longest `log` line kept.
const MAX_LOG_BYTES: usize = 4096;
/// `log` lines one store may write; the rest are dropped.
const MAX_LOG_LINES: u32 = 100;
/// Extra `set-snapshot` time per node.
const SNAPSHOT_TIME_PER_NODE: Duration = Duration::from_micros(20);
/// Longest message kept from a trap or a guest error.
const MAX_ERROR_BYTES: usize = 512;

/// Shortens `s` to at most `max` bytes, on a character boundary.
pub(crate) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Counters shared by the runtime and the host.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub compiled: AtomicU64,
    pub cache_hits: AtomicU64,
    pub plugin_answers: AtomicU64,
    pub plugin_failures: AtomicU64,
    pub builtin_failures: AtomicU64,
    pub native_answers: AtomicU64,
    pub quarantines: AtomicU64,
}

impl Stats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a guest call did not produce a usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CallError {
    /// Ran past the epoch deadline.
    Timeout(Duration),
    /// Tried to grow memory past the cap.
    MemoryCap(usize),
    /// Trapped (panic, unreachable, out-of-bounds access, ...).
    Trap(String),
    /// Returned an error through the WIT `result`.
    Guest(String),
    /// Returned an answer that breaks the contract.
    Malformed(String),
    /// The host could not run the call (no free instance slot, ...); not the
    /// plugin's fault, so not counted against it.
    Host(String),
}

impl CallError {
    /// Whether this failure counts towards quarantine.
    pub fn is_plugin_fault(&self) -> bool {
        !matches!(self, CallError::Host(_))
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Timeout(d) => write!(f, "timed out after {} ms", d.as_millis()),
            CallError::MemoryCap(cap) => write!(f, "exceeded the memory cap of {} MiB", cap >> 20),
            CallError::Trap(e) => write!(f, "trapped: {e}"),
            CallError::Guest(e) => write!(f, "returned an error: {e}"),
            CallError::Malformed(e) => write!(f, "malformed answer: {e}"),
            CallError::Host(e) => write!(f, "could not be run: {e}"),
        }
    }
}

/// Caps linear memory; remembers whether the cap was hit so the resulting trap can be
/// told apart from others.
pub(crate) struct Limiter {
    cap: usize,
    exceeded: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.exceeded = true;
            wasmtime::bail!("memory cap of {} bytes exceeded", self.cap);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// A WASI clock stuck at zero: policies get the time from their input, so a decision
/// depends on nothing else.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// What a store carries: the (empty) WASI context, the limiter, and what the `host`
/// interface needs.
pub(crate) struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    plugin: Arc<str>,
    kv: Option<Arc<dyn KvReader>>,
    logs_left: u32,
    /// Keeps the epoch ticking while this store lives.
    _busy: Busy,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl scheduler::shoal::policy::host::Host for State {
    fn log(&mut self, level: scheduler::shoal::policy::host::Level, message: String) {
        use scheduler::shoal::policy::host::Level;
        if self.logs_left == 0 {
            return;
        }
        self.logs_left -= 1;
        let message = truncate(message, MAX_LOG_BYTES);
        let plugin = &*self.plugin;
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn kv_get(&mut self, key: String) -> Option<String> {
        self.kv.as_ref()?.get(&key)
    }
}

impl scheduler::shoal::policy::types::Host for State {}
impl scheduler::shoal::policy::scheduling::Host for State {}
impl scaler::shoal::policy::scaling::Host for State {}
impl discovery::shoal::policy::discovering::Host for State {}

/// A component checked against its world and pre-instantiated.
pub(crate) enum Pre {
    Scheduler(scheduler::SchedulerPre<State>),
    Scaler(scaler::ScalerPre<State>),
    Discovery(discovery::DiscoveryPre<State>),
}

/// A plugin ready to run: its name (for logs), hash and pre-instance.
pub(crate) struct Loaded {
    pub name: Arc<str>,
    pub hash: String,
    pub pre: Pre,
}

/// Increments the engine's epoch every `tick` while some store exists (a call or
/// a round is under way), until dropped. With no store it sleeps: an idle agent's
/// policy host costs no wakeups (it used to tick every few ms for nothing, a third
/// of an idle agent's CPU). Deadlines are counted in ticks from when a call is
/// armed, so pausing between calls does not change them.
struct Ticker {
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// One live store: the ticker ticks while any exists.
struct Busy {
    active: Arc<AtomicUsize>,
}

impl Busy {
    fn enter(ticker: &Ticker) -> Busy {
        if ticker.active.fetch_add(1, Ordering::SeqCst) == 0 {
            if let Some(t) = &ticker.thread {
                t.thread().unpark();
            }
        }
        Busy {
            active: ticker.active.clone(),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ticker {
    fn start(engine: Engine, tick: Duration) -> Result<Ticker, PolicyError> {
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let (flag, busy) = (stop.clone(), active.clone());
        let thread = std::thread::Builder::new()
            .name("shoal-policy-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    if busy.load(Ordering::SeqCst) == 0 {
                        // Woken by the first store (or by drop); the timeout only
                        // bounds how long a missed wakeup could last.
                        std::thread::park_timeout(Duration::from_secs(1));
                        continue;
                    }
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })
            .map_err(|e| PolicyError::Engine(format!("starting the epoch thread: {e}")))?;
        Ok(Ticker {
            stop,
            active,
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// Feeds `Hash` output into blake3, to turn the engine's compatibility hash into a
/// stable file-name component.
struct Blake3Hasher(blake3::Hasher);

impl Hasher for Blake3Hasher {
    fn finish(&self) -> u64 {
        let bytes = self.0.finalize();
        u64::from_le_bytes(bytes.as_bytes()[..8].try_into().unwrap_or([0; 8]))
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// The wasmtime engine, linker and cache, shared by every call.
pub(crate) struct Runtime {
    engine: Engine,
    linker: Linker<State>,
    cache_dir: Option<PathBuf>,
    compat: String,
    memory_cap: usize,
    deadline: Duration,
    tick: Duration,
    kv: Option<Arc<dyn KvReader>>,
    pub stats: Stats,
    ticker: Ticker,
}

impl Runtime {
    pub fn new(config: &HostConfig) -> Result<Runtime, PolicyError> {
        let engine_err = |e: wasmtime::Error| PolicyError::Engine(format!("{e:#}"));
        if config.deadline.is_zero() {
            return Err(PolicyError::Engine("deadline must be above zero".into()));
        }
        if config.memory_cap < (1 << 20) {
            return Err(PolicyError::Engine(
                "memory cap must be at least 1 MiB".into(),
            ));
        }
        let slots = config.max_instances.max(1);
        let mut pool = PoolingAllocationConfig::default();
        // A Rust wasip2 component holds a few core instances (the program plus
        // wit-component's shims), one memory and a couple of tables.
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(8))
            .total_memories(slots.saturating_mul(2))
            .total_tables(slots.saturating_mul(4))
            .max_memories_per_component(2)
            .max_tables_per_component(4)
            .max_core_instances_per_component(16)
            .max_memory_size(config.memory_cap);
        let mut cfg = Config::new();
        cfg.wasm_component_model(true)
            .epoch_interruption(true)
            .cranelift_opt_level(OptLevel::Speed)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&cfg).map_err(engine_err)?;

        let mut linker = Linker::<State>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(engine_err)?;
        scheduler::Scheduler::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)
            .map_err(engine_err)?;

        let mut hasher = Blake3Hasher(blake3::Hasher::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compat = hasher.0.finalize().to_hex()[..16].to_string();

        if let Some(dir) = &config.cache_dir {
            fs::create_dir_all(dir).map_err(|source| PolicyError::Cache {
                path: dir.clone(),
                source,
            })?;
        }
        // Ticks of a twentieth of the deadline: timeouts land within 5% of it.
        let tick =
            (config.deadline / 20).clamp(Duration::from_millis(1), Duration::from_millis(10));
        let ticker = Ticker::start(engine.clone(), tick)?;
        Ok(Runtime {
            engine,
            linker,
            cache_dir: config.cache_dir.clone(),
            compat,
            memory_cap: config.memory_cap,
            deadline: config.deadline,
            tick,
            kv: None,
            stats: Stats::default(),
            ticker,
        })
    }

    pub fn set_kv(&mut self, kv: Arc<dyn KvReader>) {
        self.kv = Some(kv);
    }

    /// The cache file of a wasm with this hash, if caching is on.
    pub fn cache_path(&self, hash: &str) -> Option<PathBuf> {
        self.cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("{hash}-{}.cwasm", self.compat)))
    }

    /// Compiles a component, or loads it from the cache.
    fn compile(&self, hash: &str, wasm: &[u8]) -> Result<Component, PolicyError> {
        let Some(path) = self.cache_path(hash) else {
            Stats::bump(&self.stats.compiled);
            return Component::new(&self.engine, wasm)
                .map_err(|e| PolicyError::Invalid(format!("{e:#}")));
        };
        // Read, not `deserialize_file`: that maps the file, and anyone truncating it
        // while the component is in use would crash the agent (SIGBUS).
        if let Ok(bytes) = fs::read(&path) {
            // SAFETY: the cache directory is trusted (HostConfig::cache_dir) and only
            // this function writes to it, with the output of `precompile_component`
            // for the wasm whose blake3 names the file, for an engine whose
            // compatibility hash names it too; wasmtime re-checks the header (engine
            // settings and version) and refuses a mismatch or a truncated artifact.
            match unsafe { Component::deserialize(&self.engine, &bytes) } {
                Ok(component) => {
                    Stats::bump(&self.stats.cache_hits);
                    return Ok(component);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "discarding unusable cached component: {e:#}");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Stats::bump(&self.stats.compiled);
        let bytes = self
            .engine
            .precompile_component(wasm)
            .map_err(|e| PolicyError::Invalid(format!("{e:#}")))?;
        if let Err(e) = write_atomically(&path, &bytes) {
            tracing::warn!(path = %path.display(), "cannot cache compiled component: {e}");
        }
        // SAFETY: `bytes` was produced by `precompile_component` of this engine just now.
        unsafe { Component::deserialize(&self.engine, &bytes) }
            .map_err(|e| PolicyError::Invalid(format!("{e:#}")))
    }

    /// Compiles (or loads from cache), checks the world, pre-instantiates and test-starts
    /// a plugin.
    pub fn load(&self, kind: PolicyKind, name: &str, wasm: &[u8]) -> Result<Loaded, PolicyError> {
        if wasm.len() > MAX_WASM_BYTES {
            return Err(PolicyError::Invalid(format!(
                "{} bytes is above the {MAX_WASM_BYTES}-byte limit",
                wasm.len()
            )));
        }
        if wasm.len() >= 8 && wasm[..4] == *b"\0asm" && wasm[4..8] == [1, 0, 0, 0] {
            return Err(PolicyError::Invalid(
                "this is a core WebAssembly module; build a component (target wasm32-wasip2)"
                    .into(),
            ));
        }
        let hash = blake3::hash(wasm).to_hex().to_string();
        let component = self.compile(&hash, wasm)?;
        self.check_world(kind, &component)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PolicyError::Imports(format!("{e:#}")))?;
        let wrong = |e: wasmtime::Error| PolicyError::WrongWorld {
            expected: kind,
            detail: format!("{e:#}"),
        };
        let pre = match kind {
            PolicyKind::Scheduler => {
                Pre::Scheduler(scheduler::SchedulerPre::new(pre).map_err(wrong)?)
            }
            PolicyKind::Scaler => Pre::Scaler(scaler::ScalerPre::new(pre).map_err(wrong)?),
            PolicyKind::Discovery => {
                Pre::Discovery(discovery::DiscoveryPre::new(pre).map_err(wrong)?)
            }
        };
        let name: Arc<str> = Arc::from(name);
        let mut store = self.store(name.clone());
        // Instantiating at load is a check that the component starts at all, not a
        // policy call: on a busy machine (many agents compiling at once) it can take
        // longer than a call's deadline, which must not fail an agent's start.
        let startup_ticks = STARTUP_BUDGET
            .as_nanos()
            .div_ceil(self.tick.as_nanos().max(1)) as u64
            + 1;
        store.set_epoch_deadline(startup_ticks);
        let started = match &pre {
            Pre::Scheduler(p) => p.instantiate(&mut store).map(drop),
            Pre::Scaler(p) => p.instantiate(&mut store).map(drop),
            Pre::Discovery(p) => p.instantiate(&mut store).map(drop),
        };
        started.map_err(|e| PolicyError::Startup(self.classify(&store, e).to_string()))?;
        Ok(Loaded { name, hash, pre })
    }

    fn check_world(&self, kind: PolicyKind, component: &Component) -> Result<(), PolicyError> {
        let exports: Vec<String> = component
            .component_type()
            .exports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let has = |k: PolicyKind| k.exports().iter().all(|e| exports.iter().any(|x| x == e));
        if has(kind) {
            return Ok(());
        }
        let missing: Vec<&str> = kind
            .exports()
            .iter()
            .copied()
            .filter(|e| !exports.iter().any(|x| x == e))
            .collect();
        let mut detail = format!(
            "missing export(s) {}; it exports [{}]",
            missing.join(", "),
            exports.join(", ")
        );
        if let Some(other) = PolicyKind::ALL.into_iter().find(|&k| k != kind && has(k)) {
            detail.push_str(&format!(": it looks like a {other} policy"));
        }
        Err(PolicyError::WrongWorld {
            expected: kind,
            detail,
        })
    }

    /// A fresh sandbox: empty WASI (no files, env, args or network; frozen clocks;
    /// deterministic random), the memory cap, and the call deadline armed.
    pub fn store(&self, plugin: Arc<str>) -> Store<State> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .secure_random(wasmtime_wasi::Deterministic::new(vec![
                0x5e, 0xed, 0x01, 0x23,
            ]))
            .insecure_random(wasmtime_wasi::Deterministic::new(vec![
                0x5e, 0xed, 0x45, 0x67,
            ]))
            .insecure_random_seed(0x5eed);
        let state = State {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: Limiter {
                cap: self.memory_cap,
                exceeded: false,
            },
            plugin,
            kv: self.kv.clone(),
            logs_left: MAX_LOG_LINES,
            _busy: Busy::enter(&self.ticker),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        self.arm(&mut store, 0);
        store
    }

    /// Sets the deadline for the next call (plus `nodes` × the per-node snapshot
    /// allowance).
    pub fn arm(&self, store: &mut Store<State>, nodes: usize) {
        let budget = self.deadline
            + SNAPSHOT_TIME_PER_NODE.saturating_mul(nodes.min(u32::MAX as usize) as u32);
        // +1: the epoch may tick right after arming.
        let ticks = budget.as_nanos().div_ceil(self.tick.as_nanos().max(1)) as u64 + 1;
        store.set_epoch_deadline(ticks);
    }

    /// Names the failure behind a wasmtime error.
    pub fn classify(&self, store: &Store<State>, err: wasmtime::Error) -> CallError {
        if store.data().limiter.exceeded {
            return CallError::MemoryCap(self.memory_cap);
        }
        if err.downcast_ref::<PoolConcurrencyLimitError>().is_some() {
            return CallError::Host(format!("{err:#}"));
        }
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => CallError::Timeout(self.deadline),
            _ => CallError::Trap(truncate(format!("{err:#}"), MAX_ERROR_BYTES)),
        }
    }

    /// Shortens a guest-supplied error message.
    pub fn guest_error(&self, message: String) -> CallError {
        CallError::Guest(truncate(message, MAX_ERROR_BYTES))
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!(
        "tmp{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}
