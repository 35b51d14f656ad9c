//! Answers: which endpoints of a service this agent's callers get, in which order.
//!
//! A [`Resolver`] holds one catalog generation and every service's answer, asked of
//! the discovery policy (the service's plugin, else the cluster default, else the
//! built-in `zone-aware`) with this agent's node as the caller when the resolver is
//! built. Lookups are then plain reads: no policy call, no lock, so a slow or hostile
//! plugin never delays a DNS answer. A service whose catalog entry did not change
//! keeps its previous answer (when the policies did not change either).
//!
//! Build resolvers on a blocking thread (`spawn_blocking`): policy calls are
//! synchronous WebAssembly calls, and WASI must not run on an async worker.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use shoal_policy::{DecidedBy, Discovered, DiscoveryInput, PolicyHost};

use crate::catalog::{Catalog, Endpoint, ServiceEntry};

/// Default weight of an endpoint, as the built-in policy uses it.
const DEFAULT_WEIGHT: u32 = 100;

/// Where answers come from: the agent's policy host, or a stand-in in tests.
pub trait Policy: Send + Sync {
    /// Ranks `input.endpoints` for `input.caller`.
    fn discover(&self, input: &DiscoveryInput) -> Discovered;
}

impl Policy for PolicyHost {
    fn discover(&self, input: &DiscoveryInput) -> Discovered {
        self.discover_explained(input)
    }
}

/// One endpoint to hand out, with its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Relative weight, at least 1.
    pub weight: u32,
}

/// The policy's answer for one service.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The service.
    pub service: String,
    /// Endpoints to use, best first.
    pub endpoints: Vec<Ranked>,
    /// Which policy decided.
    pub decided_by: DecidedBy,
    /// Why the bound plugin (or the params) could not be used, if so.
    pub fallback_reason: Option<String>,
}

/// One catalog generation and its answers (see the module docs).
pub struct Resolver {
    catalog: Catalog,
    answers: HashMap<String, Arc<Answer>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("generation", &self.catalog.generation)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver over `catalog`, asking `policy` for every service's answer (reusing
    /// those of `previous` whose entries did not change).
    pub fn build(catalog: Catalog, policy: &dyn Policy, previous: Option<&Resolver>) -> Resolver {
        let reusable = previous.filter(|p| {
            p.catalog.policy_epoch == catalog.policy_epoch && p.catalog.caller == catalog.caller
        });
        let mut answers = HashMap::with_capacity(catalog.services.len());
        for (name, entry) in &catalog.services {
            let kept = reusable.and_then(|p| {
                (p.catalog.services.get(name) == Some(entry))
                    .then(|| p.answers.get(name).cloned())
                    .flatten()
            });
            let answer = kept.unwrap_or_else(|| Arc::new(ask(&catalog, name, entry, policy)));
            answers.insert(name.clone(), answer);
        }
        Resolver { catalog, answers }
    }

    /// The catalog it answers from.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The catalog's generation.
    pub fn generation(&self) -> u64 {
        self.catalog.generation
    }

    /// A node's address, if it has not left.
    pub fn node_ip(&self, node: &str) -> Option<IpAddr> {
        self.catalog.nodes.get(node).copied()
    }

    /// The service's catalog entry, if it exists.
    pub fn service(&self, name: &str) -> Option<&ServiceEntry> {
        self.catalog.services.get(name)
    }

    /// What the policy is asked for `service`, if it exists.
    pub fn policy_input(&self, service: &str) -> Option<DiscoveryInput> {
        let entry = self.catalog.services.get(service)?;
        Some(policy_input(&self.catalog, service, entry))
    }

    /// The answer for `service`; `None` if no such service exists.
    pub fn lookup(&self, service: &str) -> Option<Arc<Answer>> {
        self.answers.get(service).cloned()
    }

    /// Every service's answer, by name.
    pub fn all(&self) -> Vec<Arc<Answer>> {
        self.catalog
            .services
            .keys()
            .filter_map(|s| self.lookup(s))
            .collect()
    }
}

/// The policy's answer for one service of `catalog`.
fn ask(catalog: &Catalog, service: &str, entry: &ServiceEntry, policy: &dyn Policy) -> Answer {
    if entry.endpoints.is_empty() {
        // Nothing to rank: no need to ask (and wake) a plugin.
        return Answer {
            service: service.to_string(),
            endpoints: Vec::new(),
            decided_by: DecidedBy::Builtin,
            fallback_reason: None,
        };
    }
    let input = policy_input(catalog, service, entry);
    let d = policy.discover(&input);
    Answer {
        service: service.to_string(),
        endpoints: d
            .ranked
            .iter()
            .filter_map(|r| {
                Some(Ranked {
                    endpoint: entry.endpoints.get(r.index as usize)?.clone(),
                    weight: r.weight.max(1),
                })
            })
            .collect(),
        decided_by: d.decided_by,
        fallback_reason: d.fallback_reason,
    }
}

fn policy_input(catalog: &Catalog, service: &str, entry: &ServiceEntry) -> DiscoveryInput {
    DiscoveryInput {
        service: service.to_string(),
        caller: catalog.caller.clone(),
        endpoints: entry
            .endpoints
            .iter()
            .map(|e| shoal_policy::Endpoint {
                address: e.ip.to_string(),
                port: e.ports.first().map_or(0, |(_, p)| *p),
                node: e.node.clone(),
                zone: e.zone.clone(),
                region: e.region.clone(),
                healthy: true,
                load: e.load,
                weight: 0,
            })
            .collect(),
        params: entry.params.clone(),
    }
}

/// A policy that keeps the catalog's order, weight 100 each (tests, tools).
#[derive(Debug, Clone, Copy, Default)]
pub struct InOrder;

impl Policy for InOrder {
    fn discover(&self, input: &DiscoveryInput) -> Discovered {
        let ranked: Vec<shoal_policy::logic::Ranked> = (0..input.endpoints.len() as u32)
            .map(|index| shoal_policy::logic::Ranked {
                index,
                weight: DEFAULT_WEIGHT,
            })
            .collect();
        Discovered {
            endpoints: input
                .endpoints
                .iter()
                .map(|e| shoal_policy::WeightedEndpoint {
                    endpoint: e.clone(),
                    weight: DEFAULT_WEIGHT,
                })
                .collect(),
            ranked,
            decided_by: DecidedBy::Builtin,
            fallback_reason: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{PortDef, ServiceEntry};
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub(crate) fn endpoint(node: &str, ip: [u8; 4], port: u16) -> Endpoint {
        Endpoint {
            alloc_id: format!("web-{port}"),
            slot: 0,
            version: 1,
            node: node.into(),
            ip: IpAddr::from(ip),
            ports: vec![("http".into(), port)],
            local_only: false,
            zone: String::new(),
            region: String::new(),
            load: 0.0,
        }
    }

    /// Reverses the order and counts its calls.
    struct Reverse(AtomicUsize);

    impl Policy for Reverse {
        fn discover(&self, input: &DiscoveryInput) -> Discovered {
            self.0.fetch_add(1, Ordering::Relaxed);
            let mut d = InOrder.discover(input);
            d.ranked.reverse();
            d.ranked[0].weight = 7;
            d
        }
    }

    #[test]
    fn asks_the_policy_when_built_and_keeps_its_order() {
        let mut catalog = Catalog {
            generation: 1,
            ..Catalog::default()
        };
        catalog.services.insert(
            "web".into(),
            ServiceEntry {
                ports: vec![PortDef {
                    name: "http".into(),
                    protocol: shoal_runtime::Protocol::Tcp,
                }],
                params: Default::default(),
                endpoints: vec![
                    endpoint("n1", [10, 0, 0, 1], 1),
                    endpoint("n2", [10, 0, 0, 2], 2),
                ],
            },
        );
        catalog
            .services
            .insert("idle".into(), ServiceEntry::default());
        let policy = Reverse(AtomicUsize::new(0));
        let r = Resolver::build(catalog.clone(), &policy, None);
        let a = r.lookup("web").unwrap();
        assert_eq!(a.endpoints[0].endpoint.node, "n2");
        assert_eq!(a.endpoints[0].weight, 7);
        r.lookup("web").unwrap();
        // Known but empty: no policy call; unknown: None.
        assert_eq!(policy.0.load(Ordering::Relaxed), 1, "asked once, for web");
        assert!(r.lookup("idle").unwrap().endpoints.is_empty());
        assert!(r.lookup("nope").is_none());
        assert_eq!(r.all().len(), 2);

        // The next generation: unchanged entries keep their answers unasked.
        let mut next = catalog.clone();
        next.generation = 2;
        next.services.insert(
            "idle".into(),
            ServiceEntry {
                endpoints: vec![endpoint("n3", [10, 0, 0, 3], 3)],
                ..ServiceEntry::default()
            },
        );
        let r2 = Resolver::build(next.clone(), &policy, Some(&r));
        assert_eq!(policy.0.load(Ordering::Relaxed), 2, "only idle was asked");
        assert!(Arc::ptr_eq(
            &r.lookup("web").unwrap(),
            &r2.lookup("web").unwrap()
        ));
        // Other policies: everything is asked again.
        next.policy_epoch = 9;
        Resolver::build(next, &policy, Some(&r2));
        assert_eq!(policy.0.load(Ordering::Relaxed), 4);
    }
}
