//! JSON shapes of the HTTP API, shared by the server and the CLI.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::agent::resources::Resources;

/// One member as `shoal nodes` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// Node name (from its certificate).
    pub name: String,
    /// QUIC address.
    pub addr: String,
    /// `alive`, `suspect`, `down` or `left`.
    pub status: String,
    /// Process generation (changes on restart).
    pub gen: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Last published host resources, if any arrived yet.
    pub resources: Option<Resources>,
}

/// One key/value entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvView {
    /// The key.
    pub key: String,
    /// The value (UTF-8; invalid bytes are replaced).
    pub value: String,
    /// The node that wrote it.
    pub writer: String,
    /// Its hybrid-logical-clock stamp.
    pub hlc: u64,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorView {
    /// What went wrong.
    pub error: String,
}

/// Published under `node/<name>/info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// QUIC address peers dial.
    pub addr: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// shoal version.
    pub version: String,
    /// Wall-clock start time (ms since the epoch).
    pub started_ms: u64,
}

impl KvView {
    /// The view of a core entry.
    pub fn of(e: &shoal_core::Entry) -> Self {
        KvView {
            key: e.key.clone(),
            value: String::from_utf8_lossy(e.value.as_deref().unwrap_or_default()).into_owned(),
            writer: e.writer.node.clone(),
            hlc: e.hlc.0,
        }
    }
}
