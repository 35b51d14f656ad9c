//! shoal's built-in scaler as a component: `target-utilization` (default) or
//! `schedule`, chosen by param `policy`.

use shoal_policy_sdk::scaler::{ScaleDecision, ScaleInput, Scaler};

struct Builtin;

impl Scaler for Builtin {
    fn scale(input: &ScaleInput) -> Result<ScaleDecision, String> {
        shoal_policy_sdk::logic::scale(input)
    }
}

shoal_policy_sdk::export_scaler!(Builtin);
