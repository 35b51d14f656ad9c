//! Conversions between the plain policy types (`shoal-policy-logic`) and the records
//! `bindgen!` generated from the WIT. Maps become lists of pairs; the snapshot goes
//! over in columns (strings interned, per-node facts in flat lists).

use shoal_policy_logic as logic;

use crate::bindings::discovery::shoal::policy::discovering as wd;
use crate::bindings::scaler::shoal::policy::scaling as wsc;
use crate::bindings::scheduler::shoal::policy::scheduling as ws;

fn pairs<V: Clone>(map: &std::collections::BTreeMap<String, V>) -> Vec<(String, V)> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn resources(r: &logic::Resources) -> ws::Resources {
    ws::Resources {
        cpu_millis: r.cpu_millis,
        memory_bytes: r.memory_bytes,
        disk_bytes: r.disk_bytes,
    }
}

/// The snapshot in the WIT's column form: strings interned, per-node facts flat.
pub(crate) fn snapshot(s: &logic::Snapshot) -> ws::Snapshot {
    let c = s.to_columns();
    ws::Snapshot {
        strings: c.strings,
        nodes: c
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| ws::Node {
                index: i as u32,
                name: n.name,
                status: match n.status {
                    logic::NodeStatus::Alive => ws::NodeStatus::Alive,
                    logic::NodeStatus::Suspect => ws::NodeStatus::Suspect,
                    logic::NodeStatus::Down => ws::NodeStatus::Down,
                    logic::NodeStatus::Left => ws::NodeStatus::Left,
                },
                capacity: resources(&n.capacity),
                free: resources(&n.free),
            })
            .collect(),
        labels: c
            .labels
            .iter()
            .map(|&(node, key, value)| ws::Label { node, key, value })
            .collect(),
        ports: c
            .ports
            .iter()
            .map(|&(node, port)| ws::Port { node, port })
            .collect(),
        images: c
            .images
            .iter()
            .map(|&(node, image)| ws::Image { node, image })
            .collect(),
        allocations: c
            .allocations
            .iter()
            .map(|&(node, service, count)| ws::Allocation {
                node,
                service,
                count,
            })
            .collect(),
    }
}

pub(crate) fn request(r: &logic::PlacementRequest) -> ws::PlacementRequest {
    ws::PlacementRequest {
        service: r.service.clone(),
        replicas: r.replicas,
        resources: resources(&r.resources),
        constraints: r
            .constraints
            .iter()
            .map(|c| ws::Constraint {
                key: c.key.clone(),
                op: match c.op {
                    logic::ConstraintOp::Equals => ws::ConstraintOp::Equals,
                    logic::ConstraintOp::NotEquals => ws::ConstraintOp::NotEquals,
                    logic::ConstraintOp::In => ws::ConstraintOp::InSet,
                    logic::ConstraintOp::Exists => ws::ConstraintOp::Exists,
                },
                values: c.values.clone(),
                hard: c.hard,
            })
            .collect(),
        affinities: r
            .affinities
            .iter()
            .map(|a| ws::Affinity {
                target: match &a.target {
                    logic::AffinityTarget::Service(s) => ws::AffinityTarget::Service(s.clone()),
                    logic::AffinityTarget::Label { key, value } => {
                        ws::AffinityTarget::Label((key.clone(), value.clone()))
                    }
                },
                anti: a.anti,
                hard: a.hard,
            })
            .collect(),
        spread_key: r.spread_key.clone(),
        ports: r.ports.clone(),
        image: r.image.clone(),
        params: pairs(&r.params),
    }
}

pub(crate) fn placement(p: ws::Placement) -> logic::Placement {
    logic::Placement {
        nodes: p.nodes,
        unplaced: p.unplaced.map(|list| {
            list.into_iter()
                .map(|r| logic::Rejection {
                    filter: match r.filter {
                        ws::Filter::Health => logic::Filter::Health,
                        ws::Filter::Cpu => logic::Filter::Cpu,
                        ws::Filter::Memory => logic::Filter::Memory,
                        ws::Filter::Disk => logic::Filter::Disk,
                        ws::Filter::Port(p) => logic::Filter::Port(p),
                        ws::Filter::Constraint(i) => logic::Filter::Constraint(i),
                        ws::Filter::Affinity(i) => logic::Filter::Affinity(i),
                        ws::Filter::Other(s) => {
                            logic::Filter::Other(crate::runtime::truncate(s, 200))
                        }
                    },
                    nodes: r.nodes,
                })
                .collect()
        }),
    }
}

pub(crate) fn scale_input(i: &logic::ScaleInput) -> wsc::ScaleInput {
    let (min, max) = i.bounds();
    wsc::ScaleInput {
        service: i.service.clone(),
        current: i.current,
        min,
        max,
        replicas: i
            .replicas
            .iter()
            .map(|r| wsc::ReplicaMetrics {
                cpu_percent: r.cpu_percent,
                memory_bytes: r.memory_bytes,
                custom: pairs(&r.custom),
            })
            .collect(),
        now_ms: i.now_ms,
        params: pairs(&i.params),
    }
}

pub(crate) fn discovery_input(i: &logic::DiscoveryInput) -> wd::DiscoveryInput {
    wd::DiscoveryInput {
        service: i.service.clone(),
        caller: wd::Caller {
            node: i.caller.node.clone(),
            labels: pairs(&i.caller.labels),
        },
        endpoints: i
            .endpoints
            .iter()
            .map(|e| wd::Endpoint {
                address: e.address.clone(),
                port: e.port,
                node: e.node.clone(),
                zone: e.zone.clone(),
                region: e.region.clone(),
                healthy: e.healthy,
                load: e.load,
                weight: e.weight,
            })
            .collect(),
        params: pairs(&i.params),
    }
}

/// The inverse of [`request`], for replaying the round's log into the native fallback.
pub(crate) fn request_from_wit(r: &ws::PlacementRequest) -> logic::PlacementRequest {
    let res = |r: &ws::Resources| logic::Resources {
        cpu_millis: r.cpu_millis,
        memory_bytes: r.memory_bytes,
        disk_bytes: r.disk_bytes,
    };
    logic::PlacementRequest {
        service: r.service.clone(),
        replicas: r.replicas,
        resources: res(&r.resources),
        constraints: r
            .constraints
            .iter()
            .map(|c| logic::Constraint {
                key: c.key.clone(),
                op: match c.op {
                    ws::ConstraintOp::Equals => logic::ConstraintOp::Equals,
                    ws::ConstraintOp::NotEquals => logic::ConstraintOp::NotEquals,
                    ws::ConstraintOp::InSet => logic::ConstraintOp::In,
                    ws::ConstraintOp::Exists => logic::ConstraintOp::Exists,
                },
                values: c.values.clone(),
                hard: c.hard,
            })
            .collect(),
        affinities: r
            .affinities
            .iter()
            .map(|a| logic::Affinity {
                target: match &a.target {
                    ws::AffinityTarget::Service(s) => logic::AffinityTarget::Service(s.clone()),
                    ws::AffinityTarget::Label((key, value)) => logic::AffinityTarget::Label {
                        key: key.clone(),
                        value: value.clone(),
                    },
                },
                anti: a.anti,
                hard: a.hard,
            })
            .collect(),
        spread_key: r.spread_key.clone(),
        ports: r.ports.clone(),
        image: r.image.clone(),
        params: r.params.iter().cloned().collect(),
    }
}
