//! Conversions between the plain policy types (`shoal-policy-logic`) and the records
//! `bindgen!` generated from the WIT. Maps become lists of pairs; a node's index is its
//! position.

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

pub(crate) fn snapshot(s: &logic::Snapshot) -> ws::Snapshot {
    ws::Snapshot {
        nodes: s
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| ws::Node {
                index: i as u32,
                name: n.name.clone(),
                labels: pairs(&n.labels),
                status: match n.status {
                    logic::NodeStatus::Alive => ws::NodeStatus::Alive,
                    logic::NodeStatus::Suspect => ws::NodeStatus::Suspect,
                    logic::NodeStatus::Down => ws::NodeStatus::Down,
                    logic::NodeStatus::Left => ws::NodeStatus::Left,
                },
                capacity: resources(&n.capacity),
                free: resources(&n.free),
                ports_in_use: n.ports_in_use.clone(),
                images: n.images.clone(),
                allocations: pairs(&n.allocations),
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
