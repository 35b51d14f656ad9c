//! The built-in policies as components, built from `plugins/builtin` by `build.rs`
//! and embedded in the binary, so the default path runs through the same host as a
//! custom plugin.

/// The built-in scheduler component (`spread`, `binpack`, `random`).
pub const SCHEDULER: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shoal_builtin_scheduler.wasm"));
/// The built-in scaler component (`target-utilization`, `schedule`).
pub const SCALER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/shoal_builtin_scaler.wasm"));
/// The built-in discovery component (`zone-aware`).
pub const DISCOVERY: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shoal_builtin_discovery.wasm"));
