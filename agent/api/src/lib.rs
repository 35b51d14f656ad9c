//! The JSON shapes of shoal's HTTP API, shared by the agent that serves it and the
//! CLI that calls it: [`views`] are the answers, [`bodies`] the request bodies the
//! agent accepts, each decoded and checked by one function ([`decode`]) that the
//! handlers and the `api_json` fuzz target both call.
//!
//! This crate holds no routes, no HTTP and no state: the router is the agent's
//! (`shoal` crate, `agent::api`). Service specs are TOML, not JSON, and are parsed
//! by `shoal-orch`; plugin bodies are WebAssembly, checked by `shoal-policy`.

pub mod bodies;
pub mod views;

pub use bodies::{decode, BodyError, PullBody, PushBody, RequestBody, RollbackBody, ScaleBody};
pub use views::*;
