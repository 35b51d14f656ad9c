//! Hostile plugins: each failure mode fails one call only, the built-in answers
//! instead (and answers exactly as the built-in would have), the host keeps serving,
//! and repeated failures quarantine the plugin.

mod common;

use std::time::Instant;

use common::*;
use shoal_policy::logic::Cluster;
use shoal_policy::{
    DecidedBy, PlacementOutcome, PlacementRequest, PluginState, PolicyError, PolicyHost,
    PolicyKind, Snapshot,
};

/// What the built-in policy answers for these requests, computed natively.
fn builtin_answers(snapshot: &Snapshot, requests: &[PlacementRequest]) -> Vec<Vec<u32>> {
    let mut cluster = Cluster::new(snapshot.clone());
    requests
        .iter()
        .map(|r| cluster.place(r).expect("valid request").nodes)
        .collect()
}

fn requests() -> Vec<PlacementRequest> {
    vec![request("web", 2, 1000, 1), request("api", 3, 2000, 2)]
}

/// Installs `fixture` as the cluster's scheduler, runs one round, and checks that the
/// built-in answered every request correctly. Returns the outcomes.
fn run_hostile(
    host: &PolicyHost,
    fixture: &str,
    reqs: &[PlacementRequest],
) -> Vec<PlacementOutcome> {
    host.install(PolicyKind::Scheduler, None, fixture, &guest(fixture))
        .expect("fixture installs");
    let snapshot = five_nodes();
    let outcomes = host.schedule(&snapshot, reqs);
    let expected = builtin_answers(&snapshot, reqs);
    for (outcome, want) in outcomes.iter().zip(&expected) {
        assert_eq!(
            outcome.decided_by,
            DecidedBy::Builtin,
            "{fixture}: {outcome:?}"
        );
        assert_eq!(
            &outcome.indices, want,
            "{fixture}: fallback equals the built-in's answer"
        );
        assert!(outcome.unplaced.is_none());
    }
    outcomes
}

fn assert_serving(host: &PolicyHost) {
    let out = host.schedule(&five_nodes(), &[request("after", 1, 100, 0)]);
    assert_eq!(
        out[0].indices.len(),
        1,
        "host still places after a hostile plugin"
    );
}

#[test]
fn infinite_loop_is_stopped_by_the_deadline() {
    let host = host();
    let started = Instant::now();
    let out = run_hostile(&host, "shoal_fixture_spin.wasm", &requests()[..1]);
    let elapsed = started.elapsed();
    assert!(elapsed < GENEROUS, "took {elapsed:?}");
    let reason = out[0].fallback_reason.as_deref().unwrap();
    assert!(reason.contains("timed out after 50 ms"), "{reason}");
    assert_eq!(host.status()[0].state, PluginState::Failed);
    assert_serving(&host);
}

#[test]
fn memory_bomb_hits_the_cap() {
    let host = host_with(|c| c.memory_cap = 16 << 20);
    let out = run_hostile(&host, "shoal_fixture_bomb.wasm", &requests()[..1]);
    let reason = out[0].fallback_reason.as_deref().unwrap();
    assert!(
        reason.contains("exceeded the memory cap of 16 MiB"),
        "{reason}"
    );
    assert_serving(&host);
}

#[test]
fn trap_falls_back_to_the_builtin() {
    let host = host();
    let out = run_hostile(&host, "shoal_fixture_trap.wasm", &requests());
    for o in &out {
        assert!(
            o.fallback_reason.as_deref().unwrap().contains("trapped"),
            "{o:?}"
        );
    }
    assert_serving(&host);
}

#[test]
fn malformed_answers_are_discarded() {
    let cases = [
        ("extra", "malformed answer: 3 placements for 2 replicas"),
        (
            "unknown",
            "malformed answer: unknown node index 12 (snapshot has 5 nodes)",
        ),
        (
            "short",
            "malformed answer: 1 placements for 2 replicas and no reason",
        ),
    ];
    for (mode, want) in cases {
        let host = host();
        let mut req = request("web", 2, 1000, 1);
        req.params = params(&[("mode", mode)]);
        let out = run_hostile(&host, "shoal_fixture_malformed.wasm", &[req]);
        let reason = out[0].fallback_reason.as_deref().unwrap();
        assert!(reason.contains(want), "mode {mode}: {reason}");
        assert_serving(&host);
    }
}

#[test]
fn wrong_world_is_refused_at_install() {
    let host = host();
    let scaler = shoal_policy::builtins::SCALER;
    let err = host
        .install(PolicyKind::Scheduler, None, "oops", scaler)
        .unwrap_err();
    assert!(
        matches!(
            err,
            PolicyError::WrongWorld {
                expected: PolicyKind::Scheduler,
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with(
            "component does not implement the `scheduler` world (shoal:policy/scheduler@0.1.0)"
        ),
        "{text}"
    );
    assert!(
        text.contains("missing export(s) set-snapshot, place, commit"),
        "{text}"
    );
    assert!(text.contains("it looks like a scaler policy"), "{text}");

    let err = host
        .validate(PolicyKind::Discovery, &guest("hybrid_cloud.wasm"))
        .unwrap_err();
    assert!(
        err.to_string().contains("it looks like a scheduler policy"),
        "{err}"
    );
    assert!(matches!(
        host.validate(PolicyKind::Scaler, b"not wasm"),
        Err(PolicyError::Invalid(_))
    ));
    let core_module = b"\0asm\x01\0\0\0";
    let err = host.validate(PolicyKind::Scaler, core_module).unwrap_err();
    assert!(err.to_string().contains("core WebAssembly module"), "{err}");
    assert!(host.status().is_empty(), "nothing was bound");
}

#[test]
fn repeated_failures_quarantine_the_plugin() {
    let host = host();
    host.install(
        PolicyKind::Scheduler,
        None,
        "trap",
        &guest("shoal_fixture_trap.wasm"),
    )
    .unwrap();
    let snapshot = five_nodes();
    let req = request("web", 1, 100, 0);
    for i in 1..=3 {
        let out = host.schedule(&snapshot, std::slice::from_ref(&req));
        assert_eq!(out[0].decided_by, DecidedBy::Builtin);
        assert!(
            out[0].fallback_reason.is_some(),
            "call {i} tried the plugin"
        );
        let status = &host.status()[0];
        assert_eq!(status.failures, i);
        let want = if i < 3 {
            PluginState::Failed
        } else {
            PluginState::Quarantined
        };
        assert_eq!(status.state, want, "after {i} failures");
    }
    // Quarantined: the plugin is no longer called.
    let out = host.schedule(&snapshot, std::slice::from_ref(&req));
    assert_eq!(out[0].fallback_reason, None);
    assert_eq!(out[0].indices, vec![0]);
    let status = &host.status()[0];
    assert_eq!((status.total_failures, status.calls), (3, 3));
    assert!(status.last_error.as_deref().unwrap().contains("trapped"));
    assert_eq!(host.stats().quarantines, 1);
    // A new version starts afresh.
    host.install(
        PolicyKind::Scheduler,
        None,
        "fixed",
        &guest("hybrid_cloud.wasm"),
    )
    .unwrap();
    assert_eq!(host.status()[0].state, PluginState::Active);
    let out = host.schedule(&snapshot, &[req]);
    assert!(matches!(&out[0].decided_by, DecidedBy::Plugin { name, .. } if name == "fixed"));
}

#[test]
fn a_failure_mid_round_keeps_every_later_answer_consistent() {
    let host = host();
    // Only service "bad" uses the trapping plugin; the others use the built-in.
    host.install(
        PolicyKind::Scheduler,
        Some("bad"),
        "trap",
        &guest("shoal_fixture_trap.wasm"),
    )
    .unwrap();
    host.install(
        PolicyKind::Scheduler,
        Some("odd"),
        "kv",
        &guest("shoal_fixture_kv.wasm"),
    )
    .unwrap();
    let snapshot = five_nodes();
    let reqs = vec![
        request("a", 4, 2000, 2),
        request("odd", 2, 1000, 1), // the kv fixture puts both on node 0
        request("bad", 3, 2000, 2),
        request("b", 6, 1000, 1),
    ];
    let out = host.schedule(&snapshot, &reqs);
    // Natively: the same sequence, with the kv fixture's choice committed by hand.
    let mut cluster = Cluster::new(snapshot.clone());
    let mut want = Vec::new();
    for r in &reqs {
        if r.service == "odd" {
            cluster.commit(r, &[0, 0]);
            want.push(vec![0, 0]);
        } else {
            want.push(cluster.place(r).unwrap().nodes);
        }
    }
    let got: Vec<Vec<u32>> = out.iter().map(|o| o.indices.clone()).collect();
    assert_eq!(got, want);
    assert!(matches!(out[1].decided_by, DecidedBy::Plugin { .. }));
    assert_eq!(out[2].decided_by, DecidedBy::Builtin);
}

#[test]
fn scale_and_discover_keep_serving_next_to_hostile_schedulers() {
    let host = host();
    host.install(
        PolicyKind::Scheduler,
        None,
        "spin",
        &guest("shoal_fixture_spin.wasm"),
    )
    .unwrap();
    let input = shoal_policy::ScaleInput {
        service: "web".into(),
        current: 4,
        min: 1,
        max: 10,
        replicas: vec![
            shoal_policy::ReplicaMetrics {
                cpu_percent: 100.0,
                ..Default::default()
            };
            4
        ],
        ..Default::default()
    };
    assert_eq!(host.scale(&input).replicas, 5);
}

#[test]
fn a_plugin_that_fails_mid_round_resumes_with_a_true_view() {
    let host = host();
    host.install(
        PolicyKind::Scheduler,
        None,
        "flaky",
        &guest("shoal_fixture_malformed.wasm"),
    )
    .unwrap();
    let snapshot = five_nodes();
    let with_mode = |service: &str, mode: &str| {
        let mut r = request(service, 3, 1500, 1);
        r.params = params(&[("mode", mode)]);
        r
    };
    // ok (plugin), bad (built-in), ok (plugin again, in a fresh instance that must
    // replay both earlier placements, its own included).
    let reqs = vec![
        with_mode("a", "ok"),
        with_mode("b", "extra"),
        with_mode("c", "ok"),
        with_mode("d", "ok"),
    ];
    let out = host.schedule(&snapshot, &reqs);
    let by: Vec<bool> = out
        .iter()
        .map(|o| matches!(o.decided_by, DecidedBy::Plugin { .. }))
        .collect();
    assert_eq!(by, vec![true, false, true, true]);
    let got: Vec<Vec<u32>> = out.iter().map(|o| o.indices.clone()).collect();
    assert_eq!(got, builtin_answers(&snapshot, &reqs));
}
