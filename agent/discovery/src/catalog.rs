//! The catalog: every service's healthy, running endpoints as one agent sees them.
//!
//! Built from the agent's published views (services, slots, reports, membership,
//! node labels and addresses) by [`Catalog::build`], a pure function. An endpoint is
//! a slot's current or next allocation that its node reports `running` and healthy
//! while that node is alive or suspect — the steward's own notion of a healthy
//! replica (`shoal_orch::is_healthy`). A replica about to stop is no longer one: the
//! steward's write that drops it, and its node's `stopping` report, both take it out.

use std::collections::BTreeMap;
use std::net::IpAddr;

use shoal_orch::{is_healthy, ClusterView, Member, Members};
use shoal_policy::{Caller, NodeStatus};
use shoal_runtime::Protocol;

/// A node as discovery needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeEntry {
    /// The address it advertises to peers (and so to clients).
    pub ip: IpAddr,
    /// Its labels (`zone`, `region`, …).
    pub labels: BTreeMap<String, String>,
    /// Its membership status.
    pub status: NodeStatus,
}

/// What a catalog is built from.
#[derive(Debug, Clone, Copy)]
pub struct CatalogSource<'a> {
    /// The asking agent's node name (the discovery policy's caller).
    pub me: &'a str,
    /// Services, slots and reports.
    pub cluster: &'a ClusterView,
    /// Every known node.
    pub nodes: &'a BTreeMap<String, NodeEntry>,
    /// Changes whenever the discovery policies active on this agent change, so answers
    /// cached under an older policy are not reused.
    pub policy_epoch: u64,
}

/// One named port of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortDef {
    /// The port's name in the spec.
    pub name: String,
    /// Its protocol.
    pub protocol: Protocol,
}

/// One healthy, running replica.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// Its allocation id.
    pub alloc_id: String,
    /// Its slot.
    pub slot: u32,
    /// Its spec version.
    pub version: u64,
    /// Node that runs it.
    pub node: String,
    /// Address clients use: the node's advertised address, or loopback for a
    /// workload that listens on loopback only (then only its own node sees it).
    pub ip: IpAddr,
    /// `(port name, host port)`, in the spec's order.
    pub ports: Vec<(String, u16)>,
    /// It listens on loopback only.
    pub local_only: bool,
    /// Its node's `zone` label (empty if none).
    pub zone: String,
    /// Its node's `region` label (empty if none).
    pub region: String,
    /// CPU use relative to its reservation (0 without one).
    pub load: f64,
}

/// Everything discovery knows about one service.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceEntry {
    /// Its ports, in the spec's order.
    pub ports: Vec<PortDef>,
    /// `[discovery]` params of its spec.
    pub params: BTreeMap<String, String>,
    /// Healthy running endpoints, by slot then allocation id.
    pub endpoints: Vec<Endpoint>,
}

/// The catalog (see the module docs).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Catalog {
    /// Bumped on every change of content; the first catalog is generation 1.
    pub generation: u64,
    /// The asking node and its labels.
    pub caller: Caller,
    /// Services that exist (not removed), by name.
    pub services: BTreeMap<String, ServiceEntry>,
    /// Nodes that have not left, by name: their address.
    pub nodes: BTreeMap<String, IpAddr>,
    /// See [`CatalogSource::policy_epoch`].
    pub policy_epoch: u64,
}

impl Catalog {
    /// The catalog of `src` (generation 0; see [`Catalog::next`]).
    pub fn build(src: &CatalogSource<'_>) -> Catalog {
        let members: Members = src
            .nodes
            .iter()
            .map(|(n, e)| {
                (
                    n.clone(),
                    Member {
                        status: e.status,
                        since_ms: 0,
                    },
                )
            })
            .collect();
        let mut services = BTreeMap::new();
        for (name, record) in &src.cluster.services {
            if record.deleted {
                continue;
            }
            let spec = &record.spec;
            let mut entry = ServiceEntry {
                ports: spec
                    .ports
                    .iter()
                    .map(|p| PortDef {
                        name: p.name.clone(),
                        protocol: p.protocol,
                    })
                    .collect(),
                params: spec.discovery.clone(),
                endpoints: Vec::new(),
            };
            let empty = Default::default();
            let reports = src.cluster.reports.get(name).map_or(&empty, |r| &**r);
            if let Some(slots) = src.cluster.slots.get(name) {
                for (slot_no, slot) in slots.iter() {
                    for p in slot.placements() {
                        if !is_healthy(p, reports, &members) {
                            continue;
                        }
                        let Some(node) = src.nodes.get(&p.node) else {
                            continue;
                        };
                        let Some(rep) = reports.get(&p.alloc_id) else {
                            continue;
                        };
                        let r = &rep.report;
                        // Reachable from other nodes only if it listens beyond loopback
                        // (or the whole cluster lives on loopback).
                        if r.local_only && p.node != src.me && !node.ip.is_loopback() {
                            continue;
                        }
                        let ip = if r.local_only {
                            if node.ip.is_ipv6() {
                                IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
                            } else {
                                IpAddr::from([127, 0, 0, 1])
                            }
                        } else {
                            node.ip
                        };
                        let cpu_millis = record
                            .spec_for(p.version)
                            .map_or(0, |s| s.resources.cpu_millis);
                        let load = if cpu_millis > 0 {
                            r.cpu_percent * 10.0 / cpu_millis as f64
                        } else {
                            0.0
                        };
                        entry.endpoints.push(Endpoint {
                            alloc_id: p.alloc_id.clone(),
                            slot: *slot_no,
                            version: p.version,
                            node: p.node.clone(),
                            ip,
                            ports: r.ports.clone(),
                            local_only: r.local_only,
                            zone: node.labels.get("zone").cloned().unwrap_or_default(),
                            region: node.labels.get("region").cloned().unwrap_or_default(),
                            // Rounded: a load that wobbles in the third digit is no
                            // reason for a new catalog generation.
                            load: (load * 100.0).round() / 100.0,
                        });
                    }
                }
            }
            services.insert(name.clone(), entry);
        }
        Catalog {
            generation: 0,
            caller: Caller {
                node: src.me.to_string(),
                labels: src
                    .nodes
                    .get(src.me)
                    .map(|n| n.labels.clone())
                    .unwrap_or_default(),
            },
            services,
            nodes: src
                .nodes
                .iter()
                .filter(|(_, e)| e.status != NodeStatus::Left)
                .map(|(n, e)| (n.clone(), e.ip))
                .collect(),
            policy_epoch: src.policy_epoch,
        }
    }

    /// Whether `self` and `other` hold the same content (generations aside).
    pub fn same_content(&self, other: &Catalog) -> bool {
        self.caller == other.caller
            && self.services == other.services
            && self.nodes == other.nodes
            && self.policy_epoch == other.policy_epoch
    }

    /// `fresh` as the successor of `self`: `None` if nothing changed, else `fresh`
    /// with the next generation.
    pub fn next(&self, mut fresh: Catalog) -> Option<Catalog> {
        if self.generation > 0 && self.same_content(&fresh) {
            return None;
        }
        fresh.generation = self.generation + 1;
        Some(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_orch::{AllocReport, AllocState, ServiceRecord, ServiceSpec};

    const WEB: &str = "name = \"web\"\ndriver = \"process\"\ncommand = [\"x\"]\nreplicas = 3\n\
        [resources]\ncpu = \"100m\"\n[[ports]]\nname = \"http\"\ncontainer_port = 80\n\
        [[ports]]\nname = \"dns\"\ncontainer_port = 53\nprotocol = \"udp\"\n";

    fn node(ip: [u8; 4], zone: &str, status: NodeStatus) -> NodeEntry {
        NodeEntry {
            ip: IpAddr::from(ip),
            labels: [("zone".to_string(), zone.to_string())].into(),
            status,
        }
    }

    fn put(view: &mut ClusterView, key: &str, value: Vec<u8>) {
        view.apply_entry(key, Some(&value)).unwrap();
    }

    /// web with slots 0..3 on n1, n2, n3; reports as given.
    fn cluster(reports: &[(u32, &str, AllocState, bool, bool)]) -> ClusterView {
        let mut view = ClusterView::default();
        let spec = ServiceSpec::from_toml("web.toml", WEB).unwrap();
        let rec = ServiceRecord::deploy(None, spec);
        put(
            &mut view,
            &shoal_orch::service_key("web"),
            shoal_orch::encode(&rec),
        );
        for (slot, node, state, healthy, local_only) in reports {
            let alloc = format!("web-{slot}-1-{node}");
            let slot_v = shoal_orch::Slot {
                current: Some(shoal_orch::Placement {
                    node: node.to_string(),
                    version: 1,
                    alloc_id: alloc.clone(),
                    placed_ms: 0,
                    reserved: Default::default(),
                }),
                next: None,
                reason: None,
            };
            put(
                &mut view,
                &shoal_orch::slot_key("web", *slot),
                shoal_orch::encode(&slot_v),
            );
            let report = AllocReport {
                service: "web".into(),
                slot: *slot,
                version: 1,
                state: *state,
                healthy: *healthy,
                ports: vec![("http".into(), 30000 + *slot as u16), ("dns".into(), 31000)],
                local_only: *local_only,
                cpu_percent: 5.0,
                ..AllocReport::default()
            };
            put(
                &mut view,
                &shoal_orch::report_key(node, &alloc),
                shoal_orch::encode(&report),
            );
        }
        view
    }

    fn nodes() -> BTreeMap<String, NodeEntry> {
        [
            (
                "n1".to_string(),
                node([10, 0, 0, 1], "a", NodeStatus::Alive),
            ),
            (
                "n2".to_string(),
                node([10, 0, 0, 2], "b", NodeStatus::Alive),
            ),
            ("n3".to_string(), node([10, 0, 0, 3], "a", NodeStatus::Down)),
        ]
        .into()
    }

    fn build(me: &str, view: &ClusterView, nodes: &BTreeMap<String, NodeEntry>) -> Catalog {
        Catalog::build(&CatalogSource {
            me,
            cluster: view,
            nodes,
            policy_epoch: 0,
        })
    }

    #[test]
    fn only_healthy_running_replicas_on_live_nodes_are_endpoints() {
        let view = cluster(&[
            (0, "n1", AllocState::Running, true, false),
            (1, "n2", AllocState::Running, false, false),
            (2, "n3", AllocState::Running, true, false),
        ]);
        let c = build("n1", &view, &nodes());
        let web = &c.services["web"];
        assert_eq!(web.endpoints.len(), 1, "{web:?}");
        let e = &web.endpoints[0];
        assert_eq!((e.node.as_str(), e.ip), ("n1", IpAddr::from([10, 0, 0, 1])));
        assert_eq!(e.ports, vec![("http".into(), 30000), ("dns".into(), 31000)]);
        assert_eq!((e.zone.as_str(), e.load), ("a", 0.5));
        assert_eq!(web.ports[1].protocol, Protocol::Udp);
        assert_eq!(c.caller.node, "n1");
        assert_eq!(c.caller.labels["zone"], "a");
        assert_eq!(c.nodes.len(), 3, "down nodes still have an address");
    }

    #[test]
    fn stopping_replicas_are_not_endpoints() {
        let view = cluster(&[(0, "n1", AllocState::Stopping, false, false)]);
        let c = build("n1", &view, &nodes());
        assert!(c.services["web"].endpoints.is_empty());
    }

    #[test]
    fn loopback_only_replicas_are_seen_by_their_own_node_only() {
        let view = cluster(&[(0, "n1", AllocState::Running, true, true)]);
        let here = build("n1", &view, &nodes());
        assert_eq!(
            here.services["web"].endpoints[0].ip,
            IpAddr::from([127, 0, 0, 1])
        );
        let there = build("n2", &view, &nodes());
        assert!(there.services["web"].endpoints.is_empty());
        // A cluster on loopback reaches everyone's loopback.
        let mut lo = nodes();
        for n in lo.values_mut() {
            n.ip = IpAddr::from([127, 0, 0, 1]);
        }
        assert_eq!(build("n2", &view, &lo).services["web"].endpoints.len(), 1);
    }

    #[test]
    fn generations_move_only_on_change() {
        let view = cluster(&[(0, "n1", AllocState::Running, true, false)]);
        let first = Catalog::default()
            .next(build("n1", &view, &nodes()))
            .unwrap();
        assert_eq!(first.generation, 1);
        assert!(first.next(build("n1", &view, &nodes())).is_none());
        let view2 = cluster(&[(0, "n1", AllocState::Running, false, false)]);
        assert_eq!(
            first
                .next(build("n1", &view2, &nodes()))
                .unwrap()
                .generation,
            2
        );
    }

    #[test]
    fn removed_services_are_gone() {
        let mut view = cluster(&[(0, "n1", AllocState::Running, true, false)]);
        let rec = view.services["web"].removed();
        put(
            &mut view,
            &shoal_orch::service_key("web"),
            shoal_orch::encode(&rec),
        );
        assert!(build("n1", &view, &nodes()).services.is_empty());
    }
}
