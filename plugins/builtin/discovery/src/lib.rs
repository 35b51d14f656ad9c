//! shoal's built-in discovery as a component: `zone-aware`.

use shoal_policy_sdk::discovery::{Discovery, DiscoveryInput, Ranked};

struct Builtin;

impl Discovery for Builtin {
    fn discover(input: &DiscoveryInput) -> Result<Vec<Ranked>, String> {
        shoal_policy_sdk::logic::discover(input)
    }
}

shoal_policy_sdk::export_discovery!(Builtin);
