//! The example policy in examples/policies/hybrid-cloud, built by build.rs: on-prem
//! first, then the cheapest cloud nodes.

mod common;

use std::path::PathBuf;

use common::*;
use shoal_policy::{DecidedBy, Node, PolicyKind, Snapshot};

fn fleet() -> Snapshot {
    let onprem = |name: &str| node(name, 2000, 8, &[("provider", "onprem")]);
    let cloud =
        |name: &str, cost: &str| node(name, 2000, 8, &[("provider", "aws"), ("cost", cost)]);
    let mut no_cost: Node = node("c-unpriced", 8000, 32, &[("provider", "gcp")]);
    no_cost.labels.insert("cost".into(), "n/a".into());
    Snapshot {
        nodes: vec![
            cloud("c-pricey", "0.30"),
            onprem("p0"),
            no_cost,
            cloud("c-cheap", "0.10"),
            onprem("p1"),
            cloud("c-mid", "0.2"),
        ],
    }
}

#[test]
fn fills_onprem_first_then_bursts_to_the_cheapest_cloud() {
    let host = host();
    host.install(
        PolicyKind::Scheduler,
        None,
        "hybrid-cloud",
        &guest("hybrid_cloud.wasm"),
    )
    .unwrap();
    let out = host.schedule(&fleet(), &[request("web", 11, 1000, 1)]);
    assert!(matches!(&out[0].decided_by, DecidedBy::Plugin { name, .. } if name == "hybrid-cloud"));
    assert_eq!(
        out[0].nodes,
        vec![
            "p0",
            "p1",
            "p0",
            "p1", // on-prem, spread, until full (2 cores each)
            "c-cheap",
            "c-cheap", // then the cheapest cloud node
            "c-mid",
            "c-mid",
            "c-pricey",
            "c-pricey",   // then the next cheapest
            "c-unpriced", // nodes without a usable cost last
        ]
    );
    // Small requests keep going on-prem while it has room.
    let out = host.schedule(
        &fleet(),
        &[request("api", 1, 500, 1), request("web", 1, 1000, 1)],
    );
    assert_eq!(
        (out[0].nodes[0].as_str(), out[1].nodes[0].as_str()),
        ("p0", "p1")
    );
}

#[test]
fn the_example_builds_into_the_root_target_directory() {
    // OUT_DIR lives in the target directory, whose root cargo marks with CACHEDIR.TAG.
    let out_dir = PathBuf::from(env!("SHOAL_POLICY_GUEST_DIR"));
    let target = out_dir
        .ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .expect("target dir");
    let wasm = target.join("wasm32-wasip2/release/hybrid_cloud.wasm");
    let bytes = std::fs::read(&wasm).unwrap_or_else(|e| panic!("{}: {e}", wasm.display()));
    host()
        .validate(PolicyKind::Scheduler, &bytes)
        .expect("a valid scheduler component");
}
