//! Helpers shared by the policy host's integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use shoal_policy::{
    HostConfig, Node, NodeStatus, PlacementRequest, PolicyHost, Resources, Snapshot,
};

/// A compiled-artifact cache shared by all tests of this package, so each component is
/// compiled once per `cargo test` rather than once per test.
pub fn shared_cache() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("shoal-policy-cache")
}

/// A host with default limits and the shared cache.
pub fn host() -> PolicyHost {
    host_with(|_| {})
}

/// A host with the shared cache and settings adjusted by `f`.
pub fn host_with(f: impl FnOnce(&mut HostConfig)) -> PolicyHost {
    let mut config = HostConfig {
        cache_dir: Some(shared_cache()),
        max_instances: 16,
        ..HostConfig::default()
    };
    f(&mut config);
    PolicyHost::new(config).expect("policy host starts")
}

/// A guest component built by build.rs (`shoal_fixture_trap.wasm`, `hybrid_cloud.wasm`, ...).
pub fn guest(file: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("SHOAL_POLICY_GUEST_DIR")).join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

pub const GIB: u64 = 1 << 30;

/// An alive node with `cpu` millicores and `mem_gib` GiB, all free, and labels.
pub fn node(name: &str, cpu: u64, mem_gib: u64, labels: &[(&str, &str)]) -> Node {
    let r = Resources {
        cpu_millis: cpu,
        memory_bytes: mem_gib * GIB,
        disk_bytes: 100 * GIB,
    };
    Node {
        name: name.to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        status: NodeStatus::Alive,
        capacity: r,
        free: r,
        ..Node::default()
    }
}

/// A request for `replicas` replicas of `cpu` millicores and `mem_gib` GiB each.
pub fn request(service: &str, replicas: u32, cpu: u64, mem_gib: u64) -> PlacementRequest {
    PlacementRequest {
        service: service.to_string(),
        replicas,
        resources: Resources {
            cpu_millis: cpu,
            memory_bytes: mem_gib * GIB,
            disk_bytes: 0,
        },
        ..PlacementRequest::default()
    }
}

/// Params from pairs.
pub fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Five nodes n0..n4 in zones a, a, b, b, c with 4 cores and 8 GiB each.
pub fn five_nodes() -> Snapshot {
    let zones = ["a", "a", "b", "b", "c"];
    Snapshot {
        nodes: zones
            .iter()
            .enumerate()
            .map(|(i, z)| node(&format!("n{i}"), 4000, 8, &[("zone", z)]))
            .collect(),
    }
}

/// A generous bound for "stopped within the deadline" on a loaded 2-core CI machine.
pub const GENEROUS: Duration = Duration::from_secs(2);
