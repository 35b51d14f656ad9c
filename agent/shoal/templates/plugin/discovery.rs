//! `{{name}}`: a shoal discovery policy, built as a WebAssembly component.
//!
//! It hands out the healthy endpoints of a service, least loaded first, all with the
//! same weight; unhealthy ones are left out. The caller (`input.caller`: the asking
//! agent's node and labels) is there for policies that prefer nearby endpoints.

use shoal_policy_sdk::discovery::{Discovery, DiscoveryInput, Ranked};

/// Healthy endpoints, least loaded first.
struct Policy;

impl Discovery for Policy {
    fn discover(input: &DiscoveryInput) -> Result<Vec<Ranked>, String> {
        let mut healthy: Vec<(usize, f64)> = input
            .endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.healthy)
            .map(|(i, e)| (i, e.load))
            .collect();
        healthy.sort_by(|a, b| a.1.total_cmp(&b.1));
        Ok(healthy
            .into_iter()
            .map(|(i, _)| Ranked {
                index: i as u32,
                weight: 100,
            })
            .collect())
    }
}

shoal_policy_sdk::export_discovery!(Policy);
