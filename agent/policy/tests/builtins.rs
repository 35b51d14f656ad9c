//! The built-in policies, run as components through the host: behaviour, equality with
//! the native build, bindings per scope, the host interface, and JSON input.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use shoal_policy::logic::Cluster;
use shoal_policy::{
    Affinity, AffinityTarget, Caller, Constraint, DecidedBy, DiscoveryInput, Endpoint,
    PlacementOutcome, PlacementRequest, PolicyKind, ReplicaMetrics, ScaleInput, Snapshot,
};

fn indices(out: &[PlacementOutcome]) -> Vec<Vec<u32>> {
    out.iter().map(|o| o.indices.clone()).collect()
}

#[test]
fn spread_and_binpack_place_differently() {
    let host = host();
    let snap = Snapshot {
        nodes: (0..3)
            .map(|i| node(&format!("n{i}"), 4000, 8, &[]))
            .collect(),
    };
    let spread = request("web", 3, 1000, 1);
    let mut binpack = spread.clone();
    binpack.params = params(&[("strategy", "binpack")]);
    let out = host.schedule(&snap, &[spread]);
    assert_eq!(out[0].nodes, vec!["n0", "n1", "n2"]);
    assert_eq!(out[0].decided_by, DecidedBy::Builtin);
    assert_eq!(
        host.schedule(&snap, &[binpack])[0].nodes,
        vec!["n0", "n0", "n0"]
    );
}

#[test]
fn constraints_hard_and_soft() {
    let host = host();
    let snap = five_nodes();
    let with = |c: &str| {
        let mut r = request("web", 2, 3000, 1);
        r.constraints = vec![Constraint::parse(c).unwrap()];
        r
    };
    let out = host.schedule(
        &snap,
        &[
            with("zone == b"),
            with("zone != a"),
            with("zone in (a, c)"),
            with("zone exists"),
        ],
    );
    // Each request sees the earlier ones: 3-core replicas fill a 4-core node.
    assert_eq!(indices(&out), vec![vec![2, 3], vec![4], vec![0, 1], vec![]]);
    assert_eq!(
        out[1].unplaced.as_ref().unwrap().message,
        "0/5 nodes fit: 3 insufficient cpu, 2 constraint zone != a"
    );
    assert_eq!(
        out[3].unplaced.as_ref().unwrap().message,
        "0/5 nodes fit: 5 insufficient cpu"
    );
    let out = host.schedule(&snap, &[with("~zone == c")]);
    assert_eq!(
        out[0].indices,
        vec![4, 0],
        "soft: zone c first, then anywhere"
    );
}

#[test]
fn anti_affinity_and_the_exact_unplaceable_message() {
    let host = host();
    let mut snap = five_nodes();
    snap.nodes[2].labels.insert("zone".into(), "c".into());
    for n in &mut snap.nodes {
        if n.labels["zone"] != "c" {
            n.free.memory_bytes = GIB;
        }
    }
    let mut req = request("web", 1, 100, 2);
    req.constraints = vec![Constraint::parse("zone != c").unwrap()];
    let out = host.schedule(&snap, &[req]);
    assert_eq!(
        out[0].unplaced.as_ref().unwrap().to_string(),
        "0/5 nodes fit: 3 insufficient memory, 2 constraint zone != c"
    );

    let mut req = request("db", 6, 100, 0);
    req.affinities = vec![Affinity {
        target: AffinityTarget::Service("db".into()),
        anti: true,
        hard: true,
    }];
    let out = host.schedule(&five_nodes(), &[req]);
    assert_eq!(out[0].indices, vec![0, 1, 2, 3, 4]);
    assert_eq!(
        out[0].unplaced.as_ref().unwrap().message,
        "0/5 nodes fit: 5 anti-affinity service db"
    );
}

#[test]
fn port_conflicts() {
    let host = host();
    let mut snap = five_nodes();
    snap.nodes[1].ports_in_use = vec![8080];
    let mut req = request("web", 5, 100, 0);
    req.ports = vec![8080];
    let out = host.schedule(&snap, &[req]);
    assert_eq!(out[0].indices, vec![0, 2, 3, 4]);
    assert_eq!(
        out[0].unplaced.as_ref().unwrap().message,
        "0/5 nodes fit: 5 port 8080 in use"
    );
}

/// The component and the native build agree on a busy, varied round.
#[test]
fn builtin_component_matches_the_native_logic() {
    let host = host();
    let zones = ["a", "b", "c", "d"];
    let mut nodes = Vec::new();
    for i in 0..200u64 {
        let mut n = node(
            &format!("n{i}"),
            2000 + (i % 7) * 1000,
            4 + i % 9,
            &[("zone", zones[(i % 4) as usize])],
        );
        if i % 5 == 0 {
            n.labels.insert("ssd".into(), "yes".into());
        }
        if i % 11 == 0 {
            n.images.push("web:1".into());
        }
        if i % 13 == 0 {
            n.ports_in_use.push(443);
        }
        n.allocations
            .insert(format!("svc{}", i % 3), (i % 4) as u32);
        nodes.push(n);
    }
    let snap = Snapshot { nodes };
    let strategies = ["spread", "binpack", "random"];
    let reqs: Vec<PlacementRequest> = (0..60u32)
        .map(|i| {
            let mut r = request(
                &format!("svc{}", i % 5),
                1 + i % 6,
                250 * u64::from(1 + i % 4),
                u64::from(i % 3),
            );
            r.params = params(&[
                ("strategy", strategies[(i % 3) as usize]),
                ("seed", &i.to_string()),
            ]);
            if i % 4 == 0 {
                r.constraints.push(Constraint::parse("ssd exists").unwrap());
            }
            if i % 6 == 1 {
                r.spread_key = Some("zone".into());
            }
            if i % 7 == 2 {
                r.ports = vec![443];
            }
            if i % 5 == 3 {
                r.image = Some("web:1".into());
                r.affinities.push(Affinity {
                    target: AffinityTarget::Service(r.service.clone()),
                    anti: true,
                    hard: false,
                });
            }
            r
        })
        .collect();
    let out = host.schedule(&snap, &reqs);
    let mut cluster = Cluster::new(snap.clone());
    for (o, r) in out.iter().zip(&reqs) {
        let native = cluster.place(r).unwrap();
        assert_eq!(o.indices, native.nodes, "request for {}", r.service);
        assert_eq!(
            o.unplaced.as_ref().map(|u| u.rejections.clone()),
            native.unplaced
        );
        assert_eq!(o.decided_by, DecidedBy::Builtin);
    }
}

fn hpa(current: u32, min: u32, max: u32, cpu: f64) -> ScaleInput {
    ScaleInput {
        service: "web".into(),
        current,
        min,
        max,
        replicas: vec![
            ReplicaMetrics {
                cpu_percent: cpu,
                ..ReplicaMetrics::default()
            };
            current as usize
        ],
        now_ms: 0,
        params: params(&[("target", "50")]),
    }
}

#[test]
fn target_utilization_scaler() {
    let host = host();
    let d = host.scale(&hpa(3, 1, 20, 90.0));
    assert_eq!(
        (d.replicas, d.reason.as_str()),
        (6, "cpu 90% of 50% target: 3 \u{2192} 6")
    ); // ceil(5.4)
    assert_eq!(host.scale(&hpa(3, 1, 20, 54.0)).replicas, 3, "within ±10%");
    assert_eq!(host.scale(&hpa(3, 1, 20, 46.0)).replicas, 3, "within ±10%");
    assert_eq!(
        host.scale(&hpa(10, 4, 20, 5.0)).replicas,
        4,
        "clamped to min"
    );
    assert_eq!(
        host.scale(&hpa(10, 4, 12, 95.0)).replicas,
        12,
        "clamped to max"
    );
    let mut bad = hpa(3, 1, 20, 90.0);
    bad.params.insert("target".into(), "zero".into());
    let d = host.scale(&bad);
    assert_eq!(d.replicas, 3);
    assert!(
        d.reason.starts_with("scaler cannot decide (param target"),
        "{}",
        d.reason
    );
}

#[test]
fn schedule_scaler() {
    let host = host();
    let monday_1900 = 1_704_067_200_000 + 19 * 3_600_000;
    let mut input = ScaleInput {
        service: "batch".into(),
        current: 2,
        min: 0,
        max: 10,
        now_ms: monday_1900,
        params: params(&[
            ("policy", "schedule"),
            ("windows", "mon-fri 18:00-22:00 => 8"),
            ("default", "1"),
        ]),
        ..ScaleInput::default()
    };
    let d = host.scale(&input);
    assert_eq!(
        (d.replicas, d.reason.as_str()),
        (8, "window mon-fri 18:00-22:00 => 8")
    );
    input.now_ms += 5 * 24 * 3_600_000; // saturday
    assert_eq!(host.scale(&input).replicas, 1);
}

#[test]
fn zone_aware_discovery() {
    let host = host();
    let ep = |node: &str, zone: &str, region: &str, healthy: bool, load: f64| Endpoint {
        address: format!("10.0.0.{}", node.len()),
        port: 80,
        node: node.into(),
        zone: zone.into(),
        region: region.into(),
        healthy,
        load,
        weight: 0,
    };
    let input = DiscoveryInput {
        service: "api".into(),
        caller: Caller {
            node: "me".into(),
            labels: BTreeMap::from([("zone".into(), "a".into()), ("region".into(), "eu".into())]),
        },
        endpoints: vec![
            ep("far", "x", "us", true, 0.0),
            ep("near", "b", "eu", true, 0.0),
            ep("local-busy", "a", "eu", true, 3.0),
            ep("local", "a", "eu", true, 0.0),
            ep("sick", "a", "eu", false, 0.0),
        ],
        params: BTreeMap::new(),
    };
    let out = host.discover(&input);
    let got: Vec<(&str, u32)> = out
        .iter()
        .map(|w| (w.endpoint.node.as_str(), w.weight))
        .collect();
    assert_eq!(
        got,
        vec![
            ("local", 100),
            ("local-busy", 25),
            ("near", 100),
            ("far", 100)
        ]
    );
}

#[test]
fn per_service_binding_wins_and_remove_reverts() {
    let host = host();
    let wasm = guest("hybrid_cloud.wasm");
    let hash = host
        .install(PolicyKind::Scheduler, Some("web"), "hybrid", &wasm)
        .unwrap();
    assert_eq!(hash, blake3::hash(&wasm).to_hex().to_string());
    let reqs = [request("web", 1, 100, 0), request("api", 1, 100, 0)];
    let out = host.schedule(&five_nodes(), &reqs);
    assert_eq!(
        out[0].decided_by,
        DecidedBy::Plugin {
            name: "hybrid".into(),
            hash: hash.clone()
        }
    );
    assert_eq!(out[1].decided_by, DecidedBy::Builtin);
    host.install(PolicyKind::Scheduler, None, "default-hybrid", &wasm)
        .unwrap();
    let out = host.schedule(&five_nodes(), &reqs);
    assert!(
        matches!(&out[1].decided_by, DecidedBy::Plugin { name, .. } if name == "default-hybrid")
    );
    let status = host.status();
    assert_eq!(status.len(), 2);
    assert_eq!(
        (status[0].scope.as_deref(), status[1].scope.as_deref()),
        (None, Some("web"))
    );
    assert!(host.remove(PolicyKind::Scheduler, Some("web")));
    assert!(!host.remove(PolicyKind::Scheduler, Some("web")));
    assert!(
        matches!(&host.schedule(&five_nodes(), &reqs)[0].decided_by, DecidedBy::Plugin { name, .. } if name == "default-hybrid")
    );
    assert!(host.remove(PolicyKind::Scheduler, None));
    assert_eq!(
        host.schedule(&five_nodes(), &reqs)[0].decided_by,
        DecidedBy::Builtin
    );
    assert!(
        host.install(PolicyKind::Scheduler, Some(""), "x", &wasm)
            .is_err(),
        "empty scope"
    );
    assert!(
        host.install(PolicyKind::Scheduler, None, "two words", &wasm)
            .is_err(),
        "bad name"
    );
}

#[test]
fn plugins_read_kv_through_the_host() {
    let kv = BTreeMap::from([("fixture/node".to_string(), "3".to_string())]);
    let host = host().with_kv(Arc::new(kv));
    host.install(
        PolicyKind::Scheduler,
        None,
        "kv",
        &guest("shoal_fixture_kv.wasm"),
    )
    .unwrap();
    let out = host.schedule(&five_nodes(), &[request("web", 2, 100, 0)]);
    assert_eq!(out[0].nodes, vec!["n3", "n3"]);
    let plain = common::host();
    plain
        .install(
            PolicyKind::Scheduler,
            None,
            "kv",
            &guest("shoal_fixture_kv.wasm"),
        )
        .unwrap();
    assert_eq!(
        plain.schedule(&five_nodes(), &[request("web", 1, 100, 0)])[0].nodes,
        vec!["n0"],
        "no kv: none"
    );
}

#[test]
fn snapshot_and_requests_read_from_json() {
    let host = host();
    let snapshot: Snapshot = serde_json::from_str(
        r#"{"nodes": [
            {"name": "a", "labels": {"zone": "x"}, "capacity": {"cpu_millis": 4000, "memory_bytes": 8000000000},
             "free": {"cpu_millis": 4000, "memory_bytes": 8000000000}},
            {"name": "b", "status": "down", "labels": {"zone": "y"}},
            {"name": "c", "labels": {"zone": "y"}, "free": {"cpu_millis": 500, "memory_bytes": 8000000000}}
        ]}"#,
    )
    .unwrap();
    let requests: Vec<PlacementRequest> = serde_json::from_str(
        r#"[{"service": "web", "replicas": 2, "resources": {"cpu_millis": 1000},
             "constraints": [{"key": "zone", "op": "in", "values": ["x", "y"]}],
             "affinities": [{"target": {"service": "web"}, "anti": true}]}]"#,
    )
    .unwrap();
    let out = host.schedule(&snapshot, &requests);
    assert_eq!(out[0].nodes, vec!["a"]);
    assert_eq!(
        out[0].unplaced.as_ref().unwrap().message,
        "0/3 nodes fit: 1 not alive, 1 anti-affinity service web, 1 insufficient cpu"
    );
    let json = serde_json::to_value(&out[0]).unwrap();
    assert_eq!(json["decided_by"]["policy"], "builtin");
    let rejections = json["unplaced"]["rejections"].as_array().unwrap();
    assert!(
        rejections.contains(&serde_json::json!({"filter": {"affinity": 0}, "nodes": 1})),
        "{rejections:?}"
    );
    assert!(
        rejections.contains(&serde_json::json!({"filter": "health", "nodes": 1})),
        "{rejections:?}"
    );
}
