//! The compiled-artifact cache: a second host on the same directory loads every
//! component from disk instead of compiling it.

mod common;

use common::*;
use shoal_policy::{HostConfig, PolicyHost, PolicyKind};

#[test]
fn second_host_loads_compiled_components_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let config = HostConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        max_instances: 8,
        ..HostConfig::default()
    };
    let wasm = guest("hybrid_cloud.wasm");

    let first = PolicyHost::new(config.clone()).unwrap();
    assert_eq!(
        (first.stats().compiled, first.stats().cache_hits),
        (3, 0),
        "built-ins compiled once"
    );
    first
        .install(PolicyKind::Scheduler, None, "hybrid", &wasm)
        .unwrap();
    assert_eq!(first.stats().compiled, 4);
    let files = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .collect::<Vec<_>>();
    assert_eq!(files.len(), 4, "one artifact per component");
    let hash = blake3::hash(&wasm).to_hex().to_string();
    assert!(files
        .iter()
        .any(|f| f.file_name().to_string_lossy().starts_with(&hash)));
    drop(first);

    let second = PolicyHost::new(config.clone()).unwrap();
    second
        .install(PolicyKind::Scheduler, None, "hybrid", &wasm)
        .unwrap();
    assert_eq!(
        (second.stats().compiled, second.stats().cache_hits),
        (0, 4),
        "everything from the cache"
    );
    assert_eq!(
        second.schedule(&five_nodes(), &[request("web", 1, 100, 0)])[0].nodes,
        vec!["n0"]
    );

    // A damaged artifact is discarded and recompiled, never trusted.
    for f in std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
    {
        if f.file_name().to_string_lossy().starts_with(&hash) {
            std::fs::write(f.path(), b"garbage").unwrap();
        }
    }
    let third = PolicyHost::new(config).unwrap();
    third
        .install(PolicyKind::Scheduler, None, "hybrid", &wasm)
        .unwrap();
    assert_eq!((third.stats().compiled, third.stats().cache_hits), (1, 3));
}
