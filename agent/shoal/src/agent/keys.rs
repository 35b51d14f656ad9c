//! Every key of the replicated state, what it holds, and its decoder — the one
//! place that knows the layout (corrosion's `corro-types` idea).
//!
//! | key | value | written by |
//! |---|---|---|
//! | `service/<name>` | `shoal_orch::ServiceRecord` | `deploy`, `scale`, `rm` (any agent) |
//! | `alloc/<service>/<slot>` | `shoal_orch::Slot` | the service's steward |
//! | `plugin/<kind>/default`, `plugin/<kind>/service/<svc>` | [`Binding`] | `plugin install` / `rm` |
//! | `node/<n>/info` | [`NodeInfo`] | node n, at start |
//! | `node/<n>/resources` | [`Resources`] | node n, when they change |
//! | `node/<n>/images` | image names (JSON array) | node n, from its Docker Engine |
//! | `node/<n>/plugins` | [`PluginRow`]s | node n, when its plugin states change |
//! | `node/<n>/blob/<id>` | empty: n holds blob `id` | node n |
//! | `node/<n>/blobpart/<id>` | empty: n is fetching blob `id`, serves what it has | node n |
//! | `node/<n>/alloc/<alloc id>` | `shoal_orch::AllocReport` | node n's executor |
//! | `node/<n>/rollout/<service>` | `shoal_orch::PublishedRollout` | n, as steward |
//! | `image/<name:tag>` | `shoal_image::ImageRecord` | `image push` / `rm` |
//! | `node/<n>/left` | leave time | node n, on a graceful leave |
//! | anything else | user kv | `shoal kv` |
//!
//! The orchestration records (`service/`, `alloc/`, reports, rollouts) belong to
//! `shoal-orch`, whose keys and decoders this module re-exports.
//!
//! **Namespaces.** Internal records live under the prefixes above (plus `scale/`,
//! `event/` and `shoal/`), each
//! changed by operators only through its command. User kv is everything else:
//! `/v1/kv` and `shoal kv` read and write only user keys and refuse internal ones
//! with the command to use instead; `kv ls --internal` shows internal records
//! read-only. Keys were never renamed, so data dirs of earlier releases open
//! unchanged (a user key under a reserved prefix becomes read-only).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_blob::BlobId;
use shoal_core::{Entry, NODE_PREFIX};
use shoal_policy::PolicyKind;

pub use shoal_orch::{
    parse_rollout_key, parse_service_key, report_key, service_key, SERVICE_PREFIX, SLOT_PREFIX,
};

pub use super::host_probe::Resources;

/// Prefix of plugin bindings.
pub const PLUGIN_PREFIX: &str = "plugin/";
/// `node/<n>/info`.
pub const INFO: &str = "info";
/// `node/<n>/resources`.
pub const RESOURCES: &str = "resources";
/// `node/<n>/images`.
pub const IMAGES: &str = "images";
/// `node/<n>/plugins`.
pub const PLUGINS: &str = "plugins";
/// `node/<n>/events`: the node's recent events ([`super::events`]).
pub const EVENTS: &str = "events";
/// Infix of blob advertisements: `node/<n>/blob/<id>`.
const BLOB_INFIX: &str = "/blob/";
/// Infix of partial-blob advertisements: `node/<n>/blobpart/<id>`.
const BLOB_PART_INFIX: &str = "/blobpart/";

/// `node/<node>/<suffix>`.
pub fn node_key(node: &str, suffix: &str) -> String {
    format!("{NODE_PREFIX}{node}/{suffix}")
}

/// `node/<node>/blob/<id>`: `node` holds blob `id`.
pub fn blob_advert_key(node: &str, id: &BlobId) -> String {
    format!("{NODE_PREFIX}{node}{BLOB_INFIX}{id}")
}

/// `node/<node>/blobpart/<id>`: `node` is downloading blob `id` and serves the
/// chunks it has.
pub fn blob_part_key(node: &str, id: &BlobId) -> String {
    format!("{NODE_PREFIX}{node}{BLOB_PART_INFIX}{id}")
}

/// The cluster-state key of a plugin binding.
pub fn binding_key(kind: PolicyKind, service: Option<&str>) -> String {
    match service {
        None => format!("{PLUGIN_PREFIX}{kind}/default"),
        Some(s) => format!("{PLUGIN_PREFIX}{kind}/service/{s}"),
    }
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
    /// HTTP API address (for `shoal logs` of workloads on this node).
    #[serde(default)]
    pub api: String,
    /// Runtime drivers available: `process`, and `docker` when the engine answered.
    #[serde(default)]
    pub drivers: Vec<String>,
}

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

/// One row of `shoal plugin ls`, as each agent publishes them.
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

/// What a key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key<'a> {
    /// `service/`, `alloc/` or a node's allocation report: `shoal_orch::ClusterView`'s.
    Orchestration,
    /// A steward's rollout status of `service`.
    Rollout {
        /// The steward.
        node: &'a str,
        /// The service.
        service: &'a str,
    },
    /// `node/<node>/<suffix>` (info, resources, images, plugins, left).
    Node {
        /// The node.
        node: &'a str,
        /// What it is about.
        suffix: &'a str,
    },
    /// `node` holds blob `id`.
    BlobAdvert {
        /// The node.
        node: &'a str,
        /// The blob (still text: a bad id is refused when used).
        id: &'a str,
    },
    /// `node` is downloading blob `id` (and serves the chunks it has).
    BlobPart {
        /// The node.
        node: &'a str,
        /// The blob (text).
        id: &'a str,
    },
    /// A plugin binding.
    Binding,
    /// An image record (`image/<reference>`).
    Image {
        /// `name:tag`.
        reference: &'a str,
    },
    /// User kv.
    User,
    /// An internal key shoal does not (yet) read.
    Other,
}

/// Classifies `key`.
pub fn classify(key: &str) -> Key<'_> {
    if shoal_orch::is_orchestration_key(key) {
        return Key::Orchestration;
    }
    if let Some((node, service)) = parse_rollout_key(key) {
        return Key::Rollout { node, service };
    }
    if let Some(rest) = key.strip_prefix(NODE_PREFIX) {
        if let Some((node, id)) = rest.split_once(BLOB_INFIX) {
            if !node.is_empty() && !node.contains('/') && !id.contains('/') {
                return Key::BlobAdvert { node, id };
            }
        }
        if let Some((node, id)) = rest.split_once(BLOB_PART_INFIX) {
            if !node.is_empty() && !node.contains('/') && !id.contains('/') {
                return Key::BlobPart { node, id };
            }
        }
        if let Some((node, suffix)) = rest.split_once('/') {
            if !node.is_empty() && !suffix.contains('/') {
                return Key::Node { node, suffix };
            }
        }
        return Key::Other;
    }
    if key.starts_with(PLUGIN_PREFIX) {
        return Key::Binding;
    }
    if let Some(reference) = key.strip_prefix(shoal_image::IMAGE_PREFIX) {
        return Key::Image { reference };
    }
    if is_user(key) {
        Key::User
    } else {
        Key::Other
    }
}

/// Decodes a JSON record of `entry` (a value must be present).
pub fn decode<T: serde::de::DeserializeOwned>(entry: &Entry) -> Result<T, String> {
    let bytes = entry
        .value
        .as_deref()
        .ok_or_else(|| format!("{}: deleted", entry.key))?;
    serde_json::from_slice(bytes).map_err(|e| format!("{}: {e}", entry.key))
}

/// Internal prefixes, each with what manages it (for error messages).
const INTERNAL: &[(&str, &str)] = &[
    (
        NODE_PREFIX,
        "keys under node/ are owned by their node and written by it alone",
    ),
    (
        SERVICE_PREFIX,
        "services are managed with `shoal deploy`, `shoal scale` and `shoal rm`",
    ),
    (
        SLOT_PREFIX,
        "allocation slots are written by stewards; use `shoal deploy`, `shoal scale` and `shoal rm`",
    ),
    (
        PLUGIN_PREFIX,
        "plugin bindings are managed with `shoal plugin install` and `shoal plugin rm`",
    ),
    // Reserved for the records of subsystems (images, scale decisions, events).
    (
        "image/",
        "image records are managed with `shoal image push` and `shoal image rm`",
    ),
    ("scale/", "scale decisions are written by stewards"),
    ("event/", "events are written by shoal"),
    ("shoal/", "the prefix is reserved for shoal's own records"),
];

/// If `key` is an internal record, what manages it.
pub fn internal(key: &str) -> Option<&'static str> {
    INTERNAL
        .iter()
        .find(|(prefix, _)| key.starts_with(prefix))
        .map(|(_, why)| *why)
}

/// Whether `key` is a user kv key.
pub fn is_user(key: &str) -> bool {
    internal(key).is_none()
}

/// The error for a kv request on an internal key.
pub fn refusal(key: &str) -> Option<String> {
    internal(key).map(|why| {
        format!("key {key:?} is an internal record, not user kv: {why} (`shoal kv ls --internal` shows them read-only)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_records_are_not_user_kv() {
        for k in [
            "node/n1/info",
            "service/web",
            "alloc/web/0",
            "plugin/scheduler/default",
            "image/app:1",
        ] {
            assert!(!is_user(k), "{k}");
            assert!(refusal(k).is_some_and(|m| m.contains("internal")), "{k}");
        }
        for k in ["app/color", "services/web", "nodes", "x"] {
            assert!(is_user(k), "{k}");
        }
        assert!(refusal("service/tmpsvc").unwrap().contains("shoal deploy"));
    }

    #[test]
    fn every_key_is_classified() {
        assert_eq!(classify("service/web"), Key::Orchestration);
        assert_eq!(classify("alloc/web/0"), Key::Orchestration);
        assert_eq!(classify("node/n1/alloc/web-0-1-abc"), Key::Orchestration);
        assert_eq!(
            classify("node/n1/rollout/web"),
            Key::Rollout {
                node: "n1",
                service: "web"
            }
        );
        assert_eq!(
            classify(&node_key("n1", INFO)),
            Key::Node {
                node: "n1",
                suffix: "info"
            }
        );
        let id: BlobId = "00".repeat(32).parse().unwrap();
        assert!(matches!(
            classify(&blob_advert_key("n2", &id)),
            Key::BlobAdvert { node: "n2", .. }
        ));
        assert_eq!(
            classify(&binding_key(PolicyKind::Scheduler, None)),
            Key::Binding
        );
        assert_eq!(classify("app/color"), Key::User);
        assert_eq!(classify("image/app:1"), Key::Image { reference: "app:1" });
    }
}
