//! The cluster and the requests the placement benchmarks use.
#![allow(dead_code)]

use std::collections::BTreeMap;

use shoal_policy::{
    Affinity, AffinityTarget, Constraint, Node, NodeStatus, PlacementRequest, Resources, Snapshot,
};

/// Cluster sizes measured.
pub const SIZES: [usize; 3] = [100, 1_000, 5_000];

/// A cluster with realistic variety: 12 zones, two providers, a few images, ports and
/// allocations of 50 services per node mix, 2% of nodes down.
pub fn snapshot(n: usize) -> Snapshot {
    let nodes = (0..n)
        .map(|i| {
            let cap = Resources {
                cpu_millis: 64_000,
                memory_bytes: 256 << 30,
                disk_bytes: 1 << 40,
            };
            let used = (i % 17) as u64;
            let mut labels = BTreeMap::new();
            labels.insert("zone".to_string(), format!("z{}", i % 12));
            labels.insert(
                "provider".to_string(),
                if i % 3 == 0 { "onprem" } else { "aws" }.to_string(),
            );
            labels.insert("cost".to_string(), format!("0.{}", 10 + i % 50));
            let allocations = (0..3)
                .map(|k| (format!("svc{}", (i * 7 + k * 13) % 50), 1 + (k as u32)))
                .collect::<BTreeMap<_, _>>();
            Node {
                name: format!("node-{i:05}"),
                labels,
                status: if i % 50 == 49 {
                    NodeStatus::Down
                } else {
                    NodeStatus::Alive
                },
                capacity: cap,
                free: Resources {
                    cpu_millis: cap.cpu_millis - used * 2_000,
                    memory_bytes: cap.memory_bytes - used * (4 << 30),
                    disk_bytes: cap.disk_bytes,
                },
                ports_in_use: if i % 10 == 0 { vec![80, 443] } else { vec![] },
                images: vec![format!("img{}:1", i % 5), "base:1".to_string()],
                allocations,
            }
        })
        .collect();
    Snapshot { nodes }
}

/// One replica of service `svc{k}`: small enough that nodes never fill during a run,
/// with a hard constraint, soft anti-affinity to itself and an image.
pub fn request(k: usize) -> PlacementRequest {
    PlacementRequest {
        service: format!("svc{}", k % 50),
        replicas: 1,
        resources: Resources {
            cpu_millis: 1,
            memory_bytes: 1 << 10,
            disk_bytes: 0,
        },
        constraints: vec![Constraint::parse("zone != z3").expect("valid")],
        affinities: vec![Affinity {
            target: AffinityTarget::Service(format!("svc{}", k % 50)),
            anti: true,
            hard: false,
        }],
        image: Some(format!("img{}:1", k % 5)),
        ..PlacementRequest::default()
    }
}
