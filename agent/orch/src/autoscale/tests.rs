//! The autoscaler's rules, on an injected clock.

use super::*;
use crate::model::{encode, service_key, ClusterView, ServiceRecord};
use crate::spec::ServiceSpec;

/// 2024-01-01T00:00:00Z, a Monday.
const MONDAY: u64 = 1_704_067_200_000;
const MIN: u64 = 60_000;

fn params(pairs: &[(&str, &str)]) -> Params {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn auto(pairs: &[(&str, &str)]) -> Autoscaling {
    Autoscaling::from_params(&params(pairs), &[])
        .unwrap()
        .unwrap()
}

fn rec(replicas: u32) -> Recommendation {
    Recommendation {
        decision: ScaleDecision {
            replicas,
            reason: format!("wants {replicas}"),
        },
        by: "test".into(),
    }
}

/// Feeds `recs` one per `step_ms` from `start`, returning the state and the
/// times at which the count changed.
fn run(
    a: &Autoscaling,
    p: &Params,
    mut state: ScaleState,
    start: u64,
    step_ms: u64,
    recs: &[u32],
) -> (ScaleState, Vec<(u64, u32)>) {
    let mut changes = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        let now = start + i as u64 * step_ms;
        let current = effective_replicas(a, 2, Some(&state).filter(|s| s.desired > 0));
        let next = decide(a, p, &state, current, &rec(*r), now, "n1");
        if next.desired != current {
            changes.push((now, next.desired));
        }
        state = next;
    }
    (state, changes)
}

#[test]
fn the_scaler_table_is_checked_at_deploy() {
    let a = auto(&[("max", "10")]);
    assert_eq!(
        (a.min, a.max, a.policy.as_str()),
        (1, 10, "target-utilization")
    );
    assert_eq!(a.interval, Duration::from_secs(2));
    assert_eq!(a.scale_down_window, Duration::from_secs(300));
    assert_eq!(a.startup, Duration::from_secs(30));
    assert!(Autoscaling::from_params(&Params::new(), &[])
        .unwrap()
        .is_none());
    for (pairs, needle) in [
        (vec![("min", "2")], "max is required"),
        (vec![("min", "5"), ("max", "2")], "below min"),
        (
            vec![("max", "4"), ("policy", "magic")],
            "not a built-in scaler",
        ),
        (vec![("max", "4"), ("interval", "10ms")], "interval"),
        (
            vec![("max", "4"), ("scale_down_window", "soon")],
            "not a duration",
        ),
        (
            vec![("max", "4"), ("metric", "rps"), ("target", "5")],
            "metrics_port is required",
        ),
        (
            vec![
                ("max", "4"),
                ("metric", "rps"),
                ("target", "5"),
                ("metrics_port", "http"),
            ],
            "not one of the service's ports",
        ),
        (vec![("max", "4"), ("target", "-3")], "above 0"),
        (
            vec![("max", "4"), ("policy", "schedule")],
            "windows is required",
        ),
        (
            vec![
                ("max", "4"),
                ("windows", "mon 10:00-11:00 Mars/Olympus => 3"),
            ],
            "unknown time zone",
        ),
        (vec![("max", "100000")], "limit"),
    ] {
        let err = Autoscaling::from_params(&params(&pairs), &[]).unwrap_err();
        assert!(err.contains(needle), "{pairs:?}: {err}");
    }
    let port = shoal_runtime::PortSpec {
        name: "http".into(),
        container_port: 8080,
        host_port: None,
        protocol: Protocol::Tcp,
    };
    let a = Autoscaling::from_params(
        &params(&[
            ("max", "4"),
            ("metric", "cpu:50, rif:10"),
            ("metrics_port", "http"),
        ]),
        &[port],
    )
    .unwrap()
    .unwrap();
    assert_eq!(a.custom, vec!["rif".to_string()]);
    assert_eq!(a.metrics_path, "/metrics");
}

#[test]
fn scale_up_is_immediate_but_at_most_double_or_plus_four() {
    let a = auto(&[("max", "100"), ("scale_down_window", "1m")]);
    let p = Params::new();
    let s = ScaleState {
        desired: 2,
        ..ScaleState::default()
    };
    let next = decide(&a, &p, &s, 2, &rec(20), MONDAY, "n1");
    assert_eq!(next.desired, 6, "2 -> max(4, 6)");
    assert!(next.reason.contains("limited to 6"), "{}", next.reason);
    assert_eq!(next.history[0].from, 2);
    assert_eq!(next.decisions, 1);
    let next = decide(&a, &p, &next, 6, &rec(20), MONDAY + 2_000, "n1");
    assert_eq!(next.desired, 12, "6 -> 12 (+100%)");
    let next = decide(&a, &p, &next, 12, &rec(20), MONDAY + 4_000, "n1");
    assert_eq!(next.desired, 20);
    assert_eq!(next.history.len(), 3);
    assert_eq!(next.history[0].to, 20, "newest first");
}

#[test]
fn scale_down_waits_for_the_highest_recommendation_of_the_window() {
    let a = auto(&[("max", "20"), ("scale_down_window", "1m")]);
    let p = Params::new();
    let start = ScaleState {
        desired: 8,
        ..ScaleState::default()
    };
    // 8 wanted for 10 s, then 3, every 2 s.
    let mut recs = vec![8; 5];
    recs.extend(vec![3; 60]);
    let (state, changes) = run(&a, &p, start, MONDAY, 2_000, &recs);
    // The last 8 was recommended at +8 s; the window is 60 s: down at +68 s.
    assert_eq!(changes, vec![(MONDAY + 68_000, 3)]);
    assert_eq!(state.desired, 3);
    // A dip inside the window goes only to the highest recommendation left in it.
    let start = ScaleState {
        desired: 8,
        ..ScaleState::default()
    };
    let recs = [8, 6, 6, 3, 3, 3];
    let (_, changes) = run(&a, &p, start, MONDAY, 20_000, &recs);
    assert_eq!(changes, vec![(MONDAY + 60_000, 6), (MONDAY + 100_000, 3)]);
}

#[test]
fn steady_noisy_load_changes_the_count_at_most_once() {
    // Load of 4 replicas' worth at target, ±20%, as target-utilization sees it.
    let a = auto(&[("max", "20"), ("target", "50"), ("scale_down_window", "1m")]);
    let p = params(&[("target", "50"), ("max", "20")]);
    let mut state = ScaleState {
        desired: 4,
        ..ScaleState::default()
    };
    let mut changes = 0;
    let mut x: u64 = 7;
    for i in 0..600u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let noise = ((x >> 33) % 41) as f64 / 100.0 - 0.2; // -0.20 ..= 0.20
        let total = 200.0 * (1.0 + noise);
        let current = state.desired;
        let input = ScaleInput {
            service: "web".into(),
            current,
            min: 1,
            max: 20,
            replicas: (0..current)
                .map(|_| ReplicaMetrics {
                    cpu_percent: total / f64::from(current),
                    ..ReplicaMetrics::default()
                })
                .collect(),
            now_ms: MONDAY + i * 2_000,
            params: p.clone(),
        };
        let r = native_scaler(&input);
        let next = decide(&a, &p, &state, current, &r, MONDAY + i * 2_000, "n1");
        if next.desired != current {
            changes += 1;
        }
        state = next;
    }
    assert!(changes <= 1, "{changes} changes under steady load");
}

#[test]
fn a_new_steward_honours_the_window_of_the_old_one() {
    let a = auto(&[("max", "20"), ("scale_down_window", "30s")]);
    let p = Params::new();
    let start = ScaleState {
        desired: 6,
        ..ScaleState::default()
    };
    let mut recs = vec![6; 3];
    recs.extend(vec![2; 30]);
    // One steward all along.
    let (_, alone) = run(&a, &p, start.clone(), MONDAY, 2_000, &recs);
    // The steward dies after 5 evaluations; its last state went through the
    // replicated state (JSON); the next one picks it up 3 s later.
    let (handed, first) = run(&a, &p, start, MONDAY, 2_000, &recs[..5]);
    assert!(first.is_empty());
    let json = encode(&handed);
    let picked: ScaleState = crate::model::decode("scale/web", &json).unwrap();
    let (_, second) = run(&a, &p, picked, MONDAY + 13_000, 2_000, &recs[5..]);
    assert_eq!(alone.len(), 1);
    assert_eq!(
        second.len(),
        1,
        "one decision, no extra one for the hand-over"
    );
    // The last 6 was at +4 s: both scale down once the 30 s window has passed.
    assert!(alone[0].0 >= MONDAY + 34_000 && second[0].0 >= MONDAY + 34_000);
    assert!(second[0].0 - alone[0].0 <= 3_000, "{alone:?} {second:?}");
}

#[test]
fn a_schedule_moves_at_its_boundaries_and_windows_floor_a_metric_policy() {
    // Monday 00:01 to 00:03 UTC: 5 replicas, else 1.
    let windows = "mon 00:01-00:03 => 5";
    let pairs = [
        ("policy", "schedule"),
        ("windows", windows),
        ("default", "1"),
        ("max", "10"),
    ];
    let a = auto(&pairs);
    let p = params(&pairs);
    let mut state = ScaleState::default();
    let mut changes = Vec::new();
    for i in 0..120u64 {
        let now = MONDAY + i * 2_000;
        let current = effective_replicas(&a, 1, Some(&state).filter(|s| s.desired > 0));
        let input = ScaleInput {
            service: "web".into(),
            current,
            min: a.min,
            max: a.max,
            now_ms: now,
            params: p.clone(),
            ..ScaleInput::default()
        };
        let next = decide(&a, &p, &state, current, &native_scaler(&input), now, "n1");
        if next.desired != current {
            changes.push((now, next.desired));
        }
        state = next;
    }
    assert_eq!(
        changes,
        vec![(MONDAY + MIN, 5), (MONDAY + 3 * MIN, 1)],
        "at the boundaries, no stabilization"
    );
    // The same window next to target-utilization: the larger wins.
    let pairs = [
        ("windows", windows),
        ("max", "10"),
        ("scale_down_window", "0s"),
    ];
    let a = auto(&pairs);
    let p = params(&pairs);
    let s = ScaleState {
        desired: 2,
        ..ScaleState::default()
    };
    let open = decide(&a, &p, &s, 2, &rec(3), MONDAY + MIN, "n1");
    assert_eq!(open.desired, 5, "{}", open.reason);
    let busy = decide(&a, &p, &s, 2, &rec(6), MONDAY + MIN, "n1");
    assert_eq!(busy.desired, 6);
    let closed = decide(&a, &p, &open, 5, &rec(3), MONDAY + 4 * MIN, "n1");
    assert_eq!(closed.desired, 3);
}

#[test]
fn windows_follow_their_time_zone() {
    // 19:00-23:00 in Shanghai (UTC+8) is 11:00-15:00 UTC.
    let w = shoal_policy_logic::parse_windows("mon-fri 19:00-23:00 Asia/Shanghai => 10").unwrap();
    assert!(w[0].contains(MONDAY + 11 * 60 * MIN + MIN));
    assert!(!w[0].contains(MONDAY + 19 * 60 * MIN + MIN));
}

fn record(extra: &str) -> ServiceRecord {
    let text = format!(
        "name = \"web\"\ndriver = \"process\"\ncommand = [\"x\"]\nreplicas = 2\n[resources]\ncpu = \"100m\"\nmemory = \"64Mi\"\n{extra}"
    );
    ServiceRecord::deploy(None, ServiceSpec::from_toml("web.toml", &text).unwrap())
}

#[test]
fn inputs_count_cpu_against_the_request_and_skip_young_replicas() {
    use crate::model::{AllocReport, Member, Placement, Reported, Reservation, Slot};
    let r = record("[scaler]\nmax = 8\nstartup = \"30s\"\n");
    let a = r.spec.autoscaling().unwrap();
    let mut slots = SlotMap::new();
    let mut reports = Reports::new();
    let now = MONDAY + 10 * MIN;
    for (n, (cpu, started, healthy)) in [
        (10.0, now - 5 * MIN, true),
        (50.0, now - 1_000, true),
        (90.0, now - MIN, false),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("web-{n}");
        let mut reserved = Reservation::default();
        reserved.resources.cpu_millis = 100;
        slots.insert(
            n as u32,
            Slot {
                current: Some(Placement {
                    node: "n1".into(),
                    version: 1,
                    alloc_id: id.clone(),
                    placed_ms: 0,
                    reserved,
                }),
                ..Slot::default()
            },
        );
        reports.insert(
            id,
            Reported {
                node: "n1".into(),
                report: AllocReport {
                    service: "web".into(),
                    slot: n as u32,
                    state: AllocState::Running,
                    healthy,
                    cpu_percent: cpu,
                    started_ms: started,
                    ..AllocReport::default()
                },
            },
        );
    }
    let members: Members = [(
        "n1".to_string(),
        Member {
            status: shoal_policy_logic::NodeStatus::Alive,
            since_ms: 0,
        },
    )]
    .into();
    let input = scale_input(&a, &r, 3, &slots, &reports, &members, now);
    assert_eq!(input.replicas.len(), 2, "the unhealthy replica is left out");
    assert_eq!(
        input.replicas[0].cpu_percent, 100.0,
        "10% of a core is 100% of 100m"
    );
    assert!(
        input.replicas[1].cpu_percent.is_nan(),
        "started 1 s ago: inside startup"
    );
}

#[test]
fn the_view_runs_the_scalers_count_within_bounds() {
    let r = record("[scaler]\nmin = 3\nmax = 5\n");
    let mut view = ClusterView::default();
    view.apply_entry(&service_key("web"), Some(&encode(&r)))
        .unwrap();
    assert_eq!(
        view.desired_replicas("web"),
        3,
        "the record's 2 raised to min"
    );
    let s = ScaleState {
        desired: 9,
        ..ScaleState::default()
    };
    view.apply_entry(&scale_key("web"), Some(&encode(&s)))
        .unwrap();
    assert_eq!(view.desired_replicas("web"), 5, "capped at max");
    view.apply_entry(&scale_key("web"), None).unwrap();
    assert_eq!(view.desired_replicas("web"), 3);
    let plain = record("");
    view.apply_entry(&service_key("web"), Some(&encode(&plain)))
        .unwrap();
    view.apply_entry(&scale_key("web"), Some(&encode(&s)))
        .unwrap();
    assert_eq!(
        view.desired_replicas("web"),
        2,
        "not autoscaled: the record decides"
    );
}
