//! `{{name}}`: a shoal scaler policy, built as a WebAssembly component.
//!
//! It sizes a service so its replicas' CPU adds up to `target-cpu` percent each
//! (param, default 50): 2 replicas at 90% and 70% with a 50% target want 4. Replicas
//! still starting (no CPU reading yet) are left out; with no reading at all the count
//! stays. The agent keeps the answer within the service's min and max, and applies
//! its rate limit and scale-down window around it.

use shoal_policy_sdk::scaler::{ScaleDecision, ScaleInput, Scaler};

/// CPU over a per-replica target.
struct Policy;

impl Scaler for Policy {
    fn scale(input: &ScaleInput) -> Result<ScaleDecision, String> {
        let target: f64 = match input.params.get("target-cpu") {
            None => 50.0,
            Some(s) => s
                .trim()
                .parse()
                .ok()
                .filter(|t: &f64| *t > 0.0)
                .ok_or_else(|| format!("target-cpu {s:?} is not a positive number"))?,
        };
        let (min, max) = input.bounds();
        let readings: Vec<f64> = input
            .replicas
            .iter()
            .map(|r| r.cpu_percent)
            .filter(|c| c.is_finite())
            .collect();
        if readings.is_empty() {
            return Ok(ScaleDecision {
                replicas: input.current.clamp(min, max),
                reason: "no replica reports its CPU yet: the count stays".into(),
            });
        }
        let total: f64 = readings.iter().sum();
        let replicas = ((total / target).ceil() as u32).clamp(min, max);
        Ok(ScaleDecision {
            replicas,
            reason: format!(
                "cpu {total:.0}% in all, {target:.0}% per replica: {} -> {replicas}",
                input.current
            ),
        })
    }
}

shoal_policy_sdk::export_scaler!(Policy);
