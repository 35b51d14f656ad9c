//! Typed errors of the policy host. Each variant says what happened to the host's
//! state: none of them changes a binding (a failed install leaves the old plugin, or
//! the built-in, in place).

use std::path::PathBuf;

use crate::types::PolicyKind;

/// Why the host could not start, or refused a plugin.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The wasmtime engine, its pooling allocator or the built-in policies could not be
    /// set up (nothing was created).
    #[error("policy engine setup failed: {0}")]
    Engine(String),
    /// The compiled-artifact cache directory is unusable (nothing was created).
    #[error("policy cache directory {path}: {source}")]
    Cache {
        /// The directory.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The bytes are not a WebAssembly component wasmtime can compile.
    #[error("not a valid WebAssembly component: {0}")]
    Invalid(String),
    /// The component does not export the world of the kind it is installed as.
    #[error("component does not implement the `{expected}` world (shoal:policy/{expected}@0.1.0): {detail}")]
    WrongWorld {
        /// The world the install asked for.
        expected: PolicyKind,
        /// What is missing or mistyped, and which world the component looks like.
        detail: String,
    },
    /// The component imports something the host does not provide (only
    /// `shoal:policy/host` and WASI 0.2 are available).
    #[error("component needs imports the policy host does not provide: {0}")]
    Imports(String),
    /// The component failed to instantiate in the sandbox (trap in its start-up code,
    /// initial memory above the cap, ...).
    #[error("component failed to start in the sandbox: {0}")]
    Startup(String),
    /// A plugin name must be 1 to 64 characters, none of them whitespace or control.
    #[error("bad plugin name {0:?}: use 1 to 64 visible characters")]
    BadName(String),
    /// A scope must be a service name: 1 to 253 visible characters.
    #[error("bad scope {0:?}: use a service name (1 to 253 visible characters)")]
    BadScope(String),
    /// An unknown policy kind was named.
    #[error("unknown policy kind {0:?} (expected scheduler, scaler or discovery)")]
    UnknownKind(String),
}
