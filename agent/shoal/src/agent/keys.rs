//! The namespaces of the replicated state: which keys are shoal's own records and
//! which belong to users of `shoal kv`.
//!
//! Internal records live under a handful of prefixes, each written by one part of
//! shoal and changed by operators only through its command (`deploy`, `plugin …`).
//! User kv is everything else: `/v1/kv` and `shoal kv` read and write only user
//! keys, and refuse internal ones with the command to use instead, so a stray
//! `kv put service/x …` can no longer delete a running service. `kv ls --internal`
//! shows internal records read-only. Keys were never renamed, so data dirs of
//! earlier releases open unchanged (a user key that happens to sit under a
//! reserved prefix becomes read-only through `--internal`).

/// Internal prefixes, each with what manages it (for error messages).
const INTERNAL: &[(&str, &str)] = &[
    (
        shoal_core::NODE_PREFIX,
        "keys under node/ are owned by their node and written by it alone",
    ),
    (
        shoal_orch::SERVICE_PREFIX,
        "services are managed with `shoal deploy`, `shoal scale` and `shoal rm`",
    ),
    (
        shoal_orch::SLOT_PREFIX,
        "allocation slots are written by stewards; use `shoal deploy`, `shoal scale` and `shoal rm`",
    ),
    (
        super::plugins::PLUGIN_PREFIX,
        "plugin bindings are managed with `shoal plugin install` and `shoal plugin rm`",
    ),
    // Reserved for the records of subsystems (images, scale decisions, events).
    (
        "image/",
        "image records are managed with `shoal image push` and `shoal image rm`",
    ),
    ("scale/", "scale decisions are written by stewards"),
    ("event/", "events are written by shoal"),
    ("shoal/", "the prefix is reserved for shoal's own records"),
];

/// If `key` is an internal record, what manages it.
pub fn internal(key: &str) -> Option<&'static str> {
    INTERNAL
        .iter()
        .find(|(prefix, _)| key.starts_with(prefix))
        .map(|(_, why)| *why)
}

/// Whether `key` is a user kv key.
pub fn is_user(key: &str) -> bool {
    internal(key).is_none()
}

/// The error for a kv request on an internal key.
pub fn refusal(key: &str) -> Option<String> {
    internal(key).map(|why| {
        format!("key {key:?} is an internal record, not user kv: {why} (`shoal kv ls --internal` shows them read-only)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_records_are_not_user_kv() {
        for k in [
            "node/n1/info",
            "service/web",
            "alloc/web/0",
            "plugin/scheduler/default",
            "image/app:1",
        ] {
            assert!(!is_user(k), "{k}");
            assert!(refusal(k).is_some_and(|m| m.contains("internal")), "{k}");
        }
        for k in ["app/color", "services/web", "nodes", "x"] {
            assert!(is_user(k), "{k}");
        }
        assert!(refusal("service/tmpsvc").unwrap().contains("shoal deploy"));
    }
}
