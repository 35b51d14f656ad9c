//! Example discovery policy `local-first`: keep traffic on the caller's node when the
//! service runs there.
//!
//! Endpoints on the caller's own node come first, with weight `local-weight` (param,
//! default 1000); the rest follow in the built-in `zone-aware` order with its weights.
//! Only healthy endpoints are returned. Bind it to a service with
//! `shoal plugin install --kind discovery --service web local_first.wasm`.

use shoal_policy_sdk::discovery::{Discovery, DiscoveryInput, Ranked};

struct LocalFirst;

impl Discovery for LocalFirst {
    fn discover(input: &DiscoveryInput) -> Result<Vec<Ranked>, String> {
        let local_weight = match input.params.get("local-weight") {
            None => 1000,
            Some(s) => s
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|w| *w >= 1)
                .ok_or_else(|| format!("local-weight {s:?} is not a positive integer"))?,
        };
        let rest = shoal_policy_sdk::logic::discover(input)?;
        let (mut local, remote): (Vec<Ranked>, Vec<Ranked>) = rest
            .into_iter()
            .partition(|r| input.endpoints[r.index as usize].node == input.caller.node);
        for r in &mut local {
            r.weight = local_weight;
        }
        local.extend(remote);
        Ok(local)
    }
}

shoal_policy_sdk::export_discovery!(LocalFirst);
