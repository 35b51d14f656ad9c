//! The JSON shape of discovery answers: `GET /v1/discover[/{svc}]`, `shoal discover
//! -o json`, and what `shoal render` templates see.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_policy::{Caller, DecidedBy};

use crate::resolve::{Answer, Resolver};

/// One endpoint as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointView {
    /// Address to connect to.
    pub address: String,
    /// Its first port (0 if the service has none).
    pub port: u16,
    /// Every port by name.
    pub ports: BTreeMap<String, u16>,
    /// Node that runs it.
    pub node: String,
    /// That node's zone (empty if none).
    pub zone: String,
    /// That node's region (empty if none).
    pub region: String,
    /// Relative weight from the discovery policy.
    pub weight: u32,
    /// Always true: only healthy endpoints are handed out.
    pub healthy: bool,
    /// Its allocation id.
    pub alloc_id: String,
    /// Its slot.
    pub slot: u32,
}

/// One service's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerView {
    /// The service.
    pub service: String,
    /// Endpoints, best first.
    pub endpoints: Vec<EndpointView>,
    /// `plugin <name> (<hash>)`, `built-in zone-aware` or `native zone-aware`.
    pub decided_by: String,
    /// Why the bound plugin's answer was not used, if it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
}

/// Every service's answer, as one agent gives them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogView {
    /// The catalog generation: it moves whenever any answer may have changed.
    pub generation: u64,
    /// The caller the answers are for (this agent's node).
    pub caller: Caller,
    /// Answers by service name.
    pub services: BTreeMap<String, AnswerView>,
}

/// One service's answer with the catalog generation and caller it was made for
/// (`GET /v1/discover/{svc}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LookupView {
    /// The catalog generation.
    pub generation: u64,
    /// The caller the answer is for.
    pub caller: Caller,
    /// The answer.
    #[serde(flatten)]
    pub answer: AnswerView,
}

/// How an answer's decider is shown.
pub fn decided_text(d: &DecidedBy) -> String {
    match d {
        DecidedBy::Plugin { name, hash } => {
            format!("plugin {name} ({})", &hash[..hash.len().min(12)])
        }
        DecidedBy::Builtin => "built-in zone-aware".into(),
        DecidedBy::Native => "native zone-aware (the built-in component failed)".into(),
    }
}

impl AnswerView {
    /// The view of `answer`.
    pub fn of(answer: &Answer) -> AnswerView {
        AnswerView {
            service: answer.service.clone(),
            endpoints: answer
                .endpoints
                .iter()
                .map(|r| {
                    let e = &r.endpoint;
                    EndpointView {
                        address: e.ip.to_string(),
                        port: e.ports.first().map_or(0, |(_, p)| *p),
                        ports: e.ports.iter().cloned().collect(),
                        node: e.node.clone(),
                        zone: e.zone.clone(),
                        region: e.region.clone(),
                        weight: r.weight,
                        healthy: true,
                        alloc_id: e.alloc_id.clone(),
                        slot: e.slot,
                    }
                })
                .collect(),
            decided_by: decided_text(&answer.decided_by),
            fallback_reason: answer.fallback_reason.clone(),
        }
    }
}

impl CatalogView {
    /// Every answer of `resolver`.
    pub fn of(resolver: &Resolver) -> CatalogView {
        CatalogView {
            generation: resolver.generation(),
            caller: resolver.catalog().caller.clone(),
            services: resolver
                .all()
                .iter()
                .map(|a| (a.service.clone(), AnswerView::of(a)))
                .collect(),
        }
    }
}
