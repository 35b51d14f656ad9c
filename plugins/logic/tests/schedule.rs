//! Scheduler filters and strategies of the built-in policy.

use std::collections::BTreeMap;

use shoal_policy_logic::{
    describe_unplaced, Affinity, AffinityTarget, Cluster, Constraint, Filter, Node, NodeStatus,
    Placement, PlacementRequest, Rejection, Resources, Snapshot, Strategy,
};

const GIB: u64 = 1 << 30;

fn node(name: &str, cpu: u64, mem_gib: u64, labels: &[(&str, &str)]) -> Node {
    let r = Resources {
        cpu_millis: cpu,
        memory_bytes: mem_gib * GIB,
        disk_bytes: 100 * GIB,
    };
    Node {
        name: name.into(),
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

fn request(service: &str, replicas: u32, cpu: u64, mem_gib: u64) -> PlacementRequest {
    PlacementRequest {
        service: service.into(),
        replicas,
        resources: Resources {
            cpu_millis: cpu,
            memory_bytes: mem_gib * GIB,
            disk_bytes: 0,
        },
        ..PlacementRequest::default()
    }
}

/// n0..n4 in zones a, a, b, b, c; n4 also has `gpu=yes`.
fn five() -> Snapshot {
    let mut nodes: Vec<Node> = ["a", "a", "b", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, z)| node(&format!("n{i}"), 4000, 8, &[("zone", z)]))
        .collect();
    nodes[4].labels.insert("gpu".into(), "yes".into());
    Snapshot { nodes }
}

fn place(snapshot: &Snapshot, req: &PlacementRequest) -> Placement {
    Cluster::new(snapshot.clone())
        .place(req)
        .expect("valid params")
}

fn with(mut req: PlacementRequest, key: &str, value: &str) -> PlacementRequest {
    req.params.insert(key.into(), value.into());
    req
}

fn constraint(text: &str) -> Constraint {
    Constraint::parse(text).expect("constraint parses")
}

#[test]
fn spread_prefers_fewest_replicas_of_the_service_then_fewest_in_total() {
    let mut snap = Snapshot {
        nodes: vec![
            node("n0", 4000, 8, &[]),
            node("n1", 4000, 8, &[]),
            node("n2", 4000, 8, &[]),
        ],
    };
    snap.nodes[0].allocations = BTreeMap::from([("web".to_string(), 2)]);
    snap.nodes[1].allocations = BTreeMap::from([("db".to_string(), 1)]);
    let p = place(&snap, &request("web", 3, 100, 0));
    // n2 (0 web, 0 total), n1 (0 web, 1 total), then n2 again (1 web, 1 total) beats n1 (1 web, 2 total).
    assert_eq!(
        p,
        Placement {
            nodes: vec![2, 1, 2],
            unplaced: None
        }
    );
}

#[test]
fn spread_and_binpack_differ() {
    let snap = Snapshot {
        nodes: (0..3)
            .map(|i| node(&format!("n{i}"), 4000, 8, &[]))
            .collect(),
    };
    let req = request("web", 3, 1000, 1);
    assert_eq!(
        place(&snap, &req).nodes,
        vec![0, 1, 2],
        "spread uses every node"
    );
    assert_eq!(
        place(&snap, &with(req, "strategy", "binpack")).nodes,
        vec![0, 0, 0],
        "binpack fills one node"
    );
}

#[test]
fn binpack_picks_the_most_utilised_node_that_still_fits() {
    let mut snap = Snapshot {
        nodes: (0..3)
            .map(|i| node(&format!("n{i}"), 4000, 8, &[]))
            .collect(),
    };
    snap.nodes[0].free = Resources {
        cpu_millis: 400,
        memory_bytes: GIB,
        disk_bytes: GIB,
    }; // 90% used: no room
    snap.nodes[1].free = Resources {
        cpu_millis: 2000,
        memory_bytes: 4 * GIB,
        disk_bytes: GIB,
    }; // 50% used
    let p = place(
        &snap,
        &with(request("web", 2, 1000, 1), "strategy", "binpack"),
    );
    assert_eq!(p.nodes, vec![1, 1]);
}

#[test]
fn spread_key_spreads_across_label_values_first() {
    let snap = five();
    let mut req = request("web", 3, 100, 0);
    assert_eq!(
        place(&snap, &req).nodes,
        vec![0, 1, 2],
        "without a key: node by node"
    );
    req.spread_key = Some("zone".into());
    assert_eq!(
        place(&snap, &req).nodes,
        vec![0, 2, 4],
        "with key zone: one per zone"
    );
    req.replicas = 5;
    // Zones a, b, c, then a and b again (c has only one node, which has a replica).
    assert_eq!(place(&snap, &req).nodes, vec![0, 2, 4, 1, 3]);
}

#[test]
fn hard_constraints_with_each_operator() {
    let snap = five();
    let cases = [
        ("zone == b", vec![2, 3]),
        ("zone != a", vec![2, 3, 4]),
        ("zone in (a, c)", vec![0, 1, 4]),
        ("gpu exists", vec![4]),
        ("gpu != yes", vec![0, 1, 2, 3]), // nodes without the label pass `!=`
    ];
    for (text, allowed) in cases {
        let mut req = request("web", 10, 100, 0);
        req.constraints = vec![constraint(text)];
        let p = place(&snap, &req);
        let mut used = p.nodes.clone();
        used.sort_unstable();
        used.dedup();
        assert_eq!(used, allowed, "constraint {text}");
    }
}

#[test]
fn unknown_label_keys_and_values_fail_closed_except_not_equals() {
    let snap = five();
    for (text, fits) in [
        ("rack == r1", false),
        ("zone == z", false),
        ("rack != r1", true),
        ("rack exists", false),
    ] {
        let mut req = request("web", 1, 100, 0);
        req.constraints = vec![constraint(text)];
        assert_eq!(
            place(&snap, &req).unplaced.is_none(),
            fits,
            "constraint {text}"
        );
    }
}

#[test]
fn soft_constraints_are_preferred_but_broken_when_nothing_else_fits() {
    let snap = five();
    let mut req = request("web", 3, 3000, 1);
    req.constraints = vec![constraint("~zone == c")];
    let p = place(&snap, &req);
    // n4 is the only zone-c node and fits one 3-core replica; the rest go elsewhere.
    assert_eq!(p.nodes, vec![4, 0, 1]);
    assert!(p.unplaced.is_none());
}

#[test]
fn hard_anti_affinity_to_itself_allows_one_replica_per_node() {
    let snap = Snapshot {
        nodes: (0..3)
            .map(|i| node(&format!("n{i}"), 4000, 8, &[]))
            .collect(),
    };
    let mut req = request("web", 4, 100, 0);
    req.affinities = vec![Affinity {
        target: AffinityTarget::Service("web".into()),
        anti: true,
        hard: true,
    }];
    req.params.insert("strategy".into(), "binpack".into());
    let p = place(&snap, &req);
    assert_eq!(p.nodes, vec![0, 1, 2]);
    let reasons = p.unplaced.expect("fourth replica fits nowhere");
    assert_eq!(
        describe_unplaced(3, &reasons, &req),
        "0/3 nodes fit: 3 anti-affinity service web"
    );

    req.affinities[0].hard = false;
    let p = place(&snap, &req);
    assert_eq!(
        p.nodes.len(),
        4,
        "a soft rule is broken rather than leave a replica out"
    );
    assert_eq!(
        &p.nodes[..3],
        &[0, 1, 2],
        "but only once every node has one"
    );
}

#[test]
fn affinity_to_a_service_co_locates_and_to_a_label_prefers() {
    let mut snap = five();
    snap.nodes[3].allocations.insert("db".into(), 1);
    let mut req = request("web", 2, 100, 0);
    req.affinities = vec![Affinity {
        target: AffinityTarget::Service("db".into()),
        anti: false,
        hard: true,
    }];
    assert_eq!(
        place(&snap, &req).nodes,
        vec![3, 3],
        "hard affinity: only next to db"
    );

    let mut req = request("web", 1, 100, 0);
    req.affinities = vec![Affinity {
        target: AffinityTarget::Label {
            key: "zone".into(),
            value: "b".into(),
        },
        anti: false,
        hard: false,
    }];
    assert_eq!(
        place(&snap, &req).nodes,
        vec![2],
        "soft label affinity: zone b first"
    );
    req.affinities[0].anti = true;
    req.affinities[0].hard = true;
    req.replicas = 5;
    let p = place(&snap, &req);
    assert!(
        p.nodes.iter().all(|&n| n != 2 && n != 3),
        "hard anti-affinity to zone b: {p:?}"
    );
}

#[test]
fn unplaceable_reason_counts_each_node_under_its_first_failing_filter() {
    let mut snap = five();
    snap.nodes[2].labels.insert("zone".into(), "c".into());
    for n in &mut snap.nodes {
        if n.labels["zone"] != "c" {
            n.free.memory_bytes = GIB;
        }
    }
    let mut req = request("web", 1, 100, 2);
    req.constraints = vec![constraint("zone != c")];
    let p = place(&snap, &req);
    assert!(p.nodes.is_empty());
    let reasons = p.unplaced.expect("unplaceable");
    assert_eq!(
        reasons,
        vec![
            Rejection {
                filter: Filter::Memory,
                nodes: 3
            },
            Rejection {
                filter: Filter::Constraint(0),
                nodes: 2
            }
        ]
    );
    assert_eq!(
        describe_unplaced(5, &reasons, &req),
        "0/5 nodes fit: 3 insufficient memory, 2 constraint zone != c"
    );
}

#[test]
fn only_alive_nodes_take_work() {
    let mut snap = five();
    snap.nodes[0].status = NodeStatus::Down;
    snap.nodes[1].status = NodeStatus::Suspect;
    snap.nodes[2].status = NodeStatus::Left;
    let req = request("web", 3, 3000, 0);
    let p = place(&snap, &req);
    assert_eq!(p.nodes, vec![3, 4]);
    assert_eq!(
        describe_unplaced(5, p.unplaced.as_deref().expect("third does not fit"), &req),
        "0/5 nodes fit: 3 not alive, 2 insufficient cpu"
    );
}

#[test]
fn host_ports_cannot_be_shared() {
    let mut snap = Snapshot {
        nodes: (0..3)
            .map(|i| node(&format!("n{i}"), 4000, 8, &[]))
            .collect(),
    };
    snap.nodes[0].ports_in_use = vec![80, 443];
    let mut req = request("web", 3, 100, 0);
    req.ports = vec![80];
    let p = place(&snap, &req);
    assert_eq!(p.nodes, vec![1, 2]);
    assert_eq!(
        describe_unplaced(3, p.unplaced.as_deref().expect("no third port 80"), &req),
        "0/3 nodes fit: 3 port 80 in use"
    );
}

#[test]
fn resources_are_consumed_as_replicas_are_placed() {
    let snap = Snapshot {
        nodes: vec![node("n0", 2000, 8, &[])],
    };
    let req = request("web", 3, 1000, 1);
    let mut cluster = Cluster::new(snap);
    let p = cluster.place(&req).unwrap();
    assert_eq!(p.nodes, vec![0, 0]);
    assert_eq!(
        p.unplaced,
        Some(vec![Rejection {
            filter: Filter::Cpu,
            nodes: 1
        }])
    );
    assert_eq!(cluster.free(0).unwrap().cpu_millis, 0);
    assert_eq!(cluster.service_allocations("web", 0), 2);
}

#[test]
fn commit_records_placements_made_elsewhere() {
    let snap = Snapshot {
        nodes: vec![node("n0", 2000, 8, &[]), node("n1", 2000, 8, &[])],
    };
    let mut cluster = Cluster::new(snap);
    let req = request("web", 2, 1000, 1);
    cluster.commit(&req, &[0, 0, 99]); // 99 does not exist and is ignored
    let p = cluster.place(&request("api", 1, 1000, 1)).unwrap();
    assert_eq!(p.nodes, vec![1], "n0 is full after the commit");
}

#[test]
fn random_is_reproducible_from_its_seed_and_only_uses_feasible_nodes() {
    let snap = Snapshot {
        nodes: (0..20)
            .map(|i| node(&format!("n{i}"), 4000, 8, &[]))
            .collect(),
    };
    let mut req = request("web", 8, 100, 0);
    req.constraints = vec![Constraint::parse("zone exists").unwrap()];
    let mut snap_b = snap.clone();
    for (i, n) in snap_b.nodes.iter_mut().enumerate() {
        if i % 2 == 0 {
            n.labels.insert("zone".into(), "a".into());
        }
    }
    let seeded = |seed: &str| {
        place(
            &snap_b,
            &with(with(req.clone(), "strategy", "random"), "seed", seed),
        )
        .nodes
    };
    assert_eq!(seeded("7"), seeded("7"));
    assert_ne!(seeded("7"), seeded("8"));
    assert!(
        seeded("7").iter().all(|n| n % 2 == 0),
        "only labelled nodes"
    );
    assert_eq!(
        place(&snap, &with(req, "strategy", "random")).nodes,
        Vec::<u32>::new()
    );
}

#[test]
fn image_locality_breaks_spread_ties_and_tilts_binpack() {
    let mut snap = Snapshot {
        nodes: (0..3)
            .map(|i| node(&format!("n{i}"), 4000, 8, &[]))
            .collect(),
    };
    snap.nodes[2].images = vec!["web:1".into()];
    let mut req = request("web", 1, 100, 0);
    req.image = Some("web:1".into());
    assert_eq!(place(&snap, &req).nodes, vec![2]);
    assert_eq!(
        place(&snap, &with(req, "strategy", "binpack")).nodes,
        vec![2]
    );
}

#[test]
fn strategies_come_from_params_and_bad_params_are_errors() {
    let mut params = BTreeMap::new();
    assert_eq!(Strategy::from_params(&params), Ok(Strategy::Spread));
    params.insert("strategy".to_string(), "random".to_string());
    assert_eq!(
        Strategy::from_params(&params),
        Ok(Strategy::Random { seed: 0 })
    );
    params.insert("seed".to_string(), "x".to_string());
    assert!(Strategy::from_params(&params).is_err());
    params.insert("strategy".to_string(), "fastest".to_string());
    let err = Strategy::from_params(&params).unwrap_err();
    assert!(err.contains("unknown strategy \"fastest\""), "{err}");
}

#[test]
fn degenerate_requests_never_panic() {
    let empty = Snapshot::default();
    let req = request("web", 2, 100, 0);
    let p = place(&empty, &req);
    assert_eq!(
        describe_unplaced(0, p.unplaced.as_deref().unwrap(), &req),
        "0/0 nodes fit"
    );
    assert_eq!(
        place(&five(), &request("web", 0, 0, 0)),
        Placement {
            nodes: vec![],
            unplaced: None
        }
    );
    let mut odd = request("", 1, u64::MAX, u64::MAX / GIB);
    odd.constraints = vec![Constraint {
        key: "zone".into(),
        op: shoal_policy_logic::ConstraintOp::In,
        values: vec![],
        hard: true,
    }];
    odd.ports = vec![0, 0, 65535];
    odd.spread_key = Some("nope".into());
    let p = place(&five(), &odd);
    assert!(p.nodes.is_empty() && p.unplaced.is_some());
}

#[test]
fn placement_shape_checks() {
    let ok = Placement {
        nodes: vec![0, 1],
        unplaced: None,
    };
    assert!(ok.check(2, 2).is_ok());
    assert!(ok
        .check(1, 2)
        .unwrap_err()
        .contains("2 placements for 1 replicas"));
    assert!(ok.check(3, 2).is_err(), "too few and no reason");
    assert!(ok.check(2, 1).unwrap_err().contains("unknown node index 1"));
    let partial = Placement {
        nodes: vec![0],
        unplaced: Some(vec![]),
    };
    assert!(partial.check(2, 1).is_ok());
    assert!(partial.check(1, 1).is_err(), "all placed but a reason");
}

#[test]
fn constraints_parse_and_render() {
    for text in ["zone == a", "zone != c", "zone in (a, b)", "gpu exists"] {
        let c = Constraint::parse(text).unwrap();
        assert!(c.hard);
        assert_eq!(c.to_string(), text);
    }
    assert!(!Constraint::parse("~zone == a").unwrap().hard);
    for bad in ["", "zone", "== a", "zone == ", "a b == c"] {
        assert!(Constraint::parse(bad).is_err(), "{bad:?} should not parse");
    }
}

/// The fast column-wise ranking of the built-in strategies picks exactly what the
/// generic engine picks with the documented keys.
#[test]
fn builtin_strategies_match_the_generic_engine() {
    use std::cmp::Reverse;
    let zones = ["a", "b", "c"];
    let mut nodes: Vec<Node> = (0..60u64)
        .map(|i| {
            node(
                &format!("n{i}"),
                1000 + (i % 5) * 1000,
                2 + i % 4,
                &[("zone", zones[(i % 3) as usize])],
            )
        })
        .collect();
    for (i, n) in nodes.iter_mut().enumerate() {
        n.allocations.insert(format!("s{}", i % 4), (i % 3) as u32);
        if i % 7 == 0 {
            n.images.push("img".into());
        }
        if i % 9 == 0 {
            n.labels.insert("ssd".into(), "yes".into());
        }
    }
    let snap = Snapshot { nodes };
    for (round, strategy) in [
        Strategy::Spread,
        Strategy::Binpack,
        Strategy::Random { seed: 3 },
    ]
    .into_iter()
    .enumerate()
    {
        let mut fast = Cluster::new(snap.clone());
        let mut generic = Cluster::new(snap.clone());
        for i in 0..40u32 {
            let mut req = request(
                &format!("s{}", i % 5),
                1 + i % 4,
                300 * u64::from(1 + i % 3),
                u64::from(i % 2),
            );
            if i % 3 == 0 {
                req.spread_key = Some("zone".into());
            }
            if i % 4 == 1 {
                req.image = Some("img".into());
                req.constraints
                    .push(Constraint::parse("~ssd exists").unwrap());
            }
            if i % 5 == 2 {
                req.affinities.push(Affinity {
                    target: AffinityTarget::Service(req.service.clone()),
                    anti: true,
                    hard: false,
                });
            }
            let a = fast.place_with(&req, strategy);
            let res = req.resources;
            let salt = 3 ^ {
                let mut h = 0xcbf2_9ce4_8422_2325u64;
                for b in req.service.bytes() {
                    h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
                }
                h
            };
            let b = match strategy {
                Strategy::Spread => generic.place_by(&req, |n| {
                    (
                        n.group_allocations(),
                        n.service_allocations(),
                        !n.holds_image(),
                        n.allocations(),
                    )
                }),
                Strategy::Binpack => generic.place_by(&req, |n| {
                    Reverse(n.utilisation_after(&res) + if n.holds_image() { 100 } else { 0 })
                }),
                Strategy::Random { .. } => generic.place_by(&req, |n| {
                    let mut x = (salt ^ (u64::from(n.replica()) << 32) ^ u64::from(n.index()))
                        .wrapping_add(0x9e37_79b9_7f4a_7c15);
                    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    (x ^ (x >> 31)) >> 8
                }),
            };
            assert_eq!(a, b, "strategy #{round}, request {i}");
        }
    }
}

/// A guest may be handed columns with dangling references; they are skipped, never a
/// panic.
#[test]
fn columns_with_bad_references_are_skipped() {
    use shoal_policy_logic::{NodeFacts, SnapshotColumns};
    let r = Resources {
        cpu_millis: 1000,
        memory_bytes: GIB,
        disk_bytes: GIB,
    };
    let facts = |name| NodeFacts {
        name,
        status: NodeStatus::Alive,
        capacity: r,
        free: r,
    };
    let cols = SnapshotColumns {
        strings: vec!["n0".into(), "zone".into(), "a".into(), "web".into()],
        nodes: vec![facts(0), facts(99)],
        labels: vec![(0, 1, 2), (7, 1, 2), (1, 99, 2), (1, 1, 42)],
        ports: vec![(5, 80), (1, 80)],
        images: vec![(0, 77), (9, 3)],
        allocations: vec![(9, 3, 1), (0, 55, 1), (1, 3, 2)],
    };
    let mut cluster = Cluster::from_columns(cols);
    assert_eq!(
        (cluster.len(), cluster.name(0), cluster.name(1)),
        (2, Some("n0"), Some(""))
    );
    assert_eq!(cluster.service_allocations("web", 1), 2);
    let mut req = request("api", 2, 100, 0);
    req.constraints = vec![Constraint::parse("zone == a").unwrap()];
    assert_eq!(cluster.place(&req).unwrap().nodes, vec![0, 0]);
    let mut req = request("api", 1, 100, 0);
    req.ports = vec![80];
    assert_eq!(
        cluster.place(&req).unwrap().nodes,
        vec![0],
        "node 1 has port 80"
    );
}
