//! Built-in scalers: target-utilization (HPA) and schedule.

use std::collections::BTreeMap;

use shoal_policy_logic::{parse_windows, scale, ReplicaMetrics, ScaleInput};

/// 2024-01-01T00:00:00Z, a Monday.
const MONDAY: u64 = 1_704_067_200_000;
const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;

fn cpu(current: u32, min: u32, max: u32, percent: f64) -> ScaleInput {
    ScaleInput {
        service: "web".into(),
        current,
        min,
        max,
        replicas: (0..current)
            .map(|_| ReplicaMetrics {
                cpu_percent: percent,
                ..ReplicaMetrics::default()
            })
            .collect(),
        now_ms: MONDAY,
        params: BTreeMap::from([("target".to_string(), "80".to_string())]),
    }
}

#[test]
fn hpa_formula_scales_up_by_the_metric_ratio() {
    // ceil(4 × 100 / 80) = 5
    let d = scale(&cpu(4, 1, 10, 100.0)).unwrap();
    assert_eq!(d.replicas, 5);
    assert_eq!(d.reason, "cpu 100% of 80% target: 4 \u{2192} 5");
    // ceil(3 × 130 / 80) = ceil(4.875) = 5
    assert_eq!(scale(&cpu(3, 1, 10, 130.0)).unwrap().replicas, 5);
}

#[test]
fn no_change_within_ten_percent() {
    let d = scale(&cpu(4, 1, 10, 87.9)).unwrap(); // ratio 1.099
    assert_eq!(d.replicas, 4);
    assert!(d.reason.contains("within tolerance"), "{}", d.reason);
    assert_eq!(scale(&cpu(4, 1, 10, 72.1)).unwrap().replicas, 4); // ratio 0.901
    assert_eq!(scale(&cpu(4, 1, 10, 88.1)).unwrap().replicas, 5); // ratio 1.101: ceil(4.405)
    assert_eq!(scale(&cpu(4, 1, 10, 71.9)).unwrap().replicas, 4); // ratio 0.899: ceil(3.595) = 4
    assert_eq!(scale(&cpu(4, 1, 10, 59.0)).unwrap().replicas, 3); // ceil(2.95)
}

#[test]
fn clamped_to_min_and_max() {
    let d = scale(&cpu(4, 2, 10, 20.0)).unwrap(); // ceil(1.0) = 1 -> min 2
    assert_eq!(d.replicas, 2);
    assert!(d.reason.ends_with("(raised to min)"), "{}", d.reason);
    let d = scale(&cpu(4, 2, 10, 400.0)).unwrap(); // 20 -> max 10
    assert_eq!(d.replicas, 10);
    assert!(d.reason.ends_with("(capped at max)"), "{}", d.reason);
    // Crossed bounds read max as min; never a panic.
    assert_eq!(scale(&cpu(4, 6, 3, 80.0)).unwrap().replicas, 6);
}

#[test]
fn custom_and_memory_metrics() {
    let mut input = cpu(2, 1, 10, 0.0);
    input.params = BTreeMap::from([
        ("metric".into(), "rps".into()),
        ("target".into(), "100".into()),
    ]);
    input.replicas[0].custom.insert("rps".into(), 300.0);
    input.replicas[1].custom.insert("rps".into(), 100.0);
    assert_eq!(scale(&input).unwrap().replicas, 4); // avg 200 -> ceil(2 × 2)

    let mut input = cpu(2, 1, 10, 0.0);
    input.params = BTreeMap::from([
        ("metric".into(), "memory".into()),
        ("target".into(), "1000".into()),
    ]);
    input
        .replicas
        .iter_mut()
        .for_each(|r| r.memory_bytes = 1500);
    assert_eq!(scale(&input).unwrap().replicas, 3);

    input.params.remove("target");
    assert!(scale(&input).unwrap_err().contains("target is required"));
}

#[test]
fn without_metrics_or_replicas_only_bounds_apply() {
    let mut input = cpu(3, 1, 10, 0.0);
    input.replicas.clear();
    assert_eq!(scale(&input).unwrap().replicas, 3);
    let mut input = cpu(0, 2, 10, 0.0);
    input.replicas = vec![ReplicaMetrics {
        cpu_percent: 500.0,
        ..ReplicaMetrics::default()
    }];
    assert_eq!(
        scale(&input).unwrap().replicas,
        2,
        "from zero only up to min"
    );
    let mut input = cpu(2, 1, 10, f64::NAN);
    input.replicas[0].cpu_percent = f64::INFINITY;
    assert_eq!(
        scale(&input).unwrap().replicas,
        2,
        "non-finite samples are ignored"
    );
}

#[test]
fn bad_params_are_errors() {
    for (k, v) in [
        ("target", "-1"),
        ("target", "lots"),
        ("tolerance", "-0.5"),
        ("policy", "magic"),
    ] {
        let mut input = cpu(2, 1, 10, 50.0);
        input.params.insert(k.into(), v.into());
        assert!(scale(&input).is_err(), "{k}={v}");
    }
}

fn scheduled(windows: &str, default: Option<&str>, now_ms: u64) -> u32 {
    let mut params = BTreeMap::from([
        ("policy".to_string(), "schedule".to_string()),
        ("windows".to_string(), windows.to_string()),
    ]);
    if let Some(d) = default {
        params.insert("default".into(), d.into());
    }
    let input = ScaleInput {
        service: "web".into(),
        current: 3,
        min: 1,
        max: 20,
        now_ms,
        params,
        ..ScaleInput::default()
    };
    scale(&input).unwrap().replicas
}

#[test]
fn schedule_windows_by_weekday_and_time_in_utc() {
    let w = "mon-fri 18:00-22:00 => 8; sat,sun 10:00-16:00 => 5";
    assert_eq!(
        scheduled(w, Some("2"), MONDAY + 19 * HOUR),
        8,
        "monday evening"
    );
    assert_eq!(
        scheduled(w, Some("2"), MONDAY + 4 * DAY + 21 * HOUR + 59 * 60_000),
        8,
        "friday 21:59"
    );
    assert_eq!(
        scheduled(w, Some("2"), MONDAY + 4 * DAY + 22 * HOUR),
        2,
        "friday 22:00: window closed"
    );
    assert_eq!(
        scheduled(w, Some("2"), MONDAY + 5 * DAY + 19 * HOUR),
        2,
        "saturday evening"
    );
    assert_eq!(
        scheduled(w, Some("2"), MONDAY + 6 * DAY + 12 * HOUR),
        5,
        "sunday noon"
    );
    assert_eq!(
        scheduled(w, None, MONDAY + 9 * HOUR),
        3,
        "no default: keep current"
    );
    assert_eq!(
        scheduled("daily 00:00-24:00 => 50", None, MONDAY),
        20,
        "clamped to max"
    );
}

#[test]
fn schedule_windows_may_cross_midnight() {
    let w = "fri 22:00-02:00 => 6";
    assert_eq!(
        scheduled(w, Some("1"), MONDAY + 4 * DAY + 23 * HOUR),
        6,
        "friday 23:00"
    );
    assert_eq!(
        scheduled(w, Some("1"), MONDAY + 5 * DAY + HOUR),
        6,
        "saturday 01:00"
    );
    assert_eq!(scheduled(w, Some("1"), MONDAY + HOUR), 1, "monday 01:00");
}

#[test]
fn window_syntax_errors_are_reported() {
    for bad in [
        "mon 18:00-22:00",
        "funday 18:00-22:00 => 2",
        "mon 18:00 => 2",
        "mon 25:00-26:00 => 2",
        "mon 10:00-10:00 => 1",
        "mon 10:00-11:00 => many",
    ] {
        assert!(parse_windows(bad).is_err(), "{bad:?} should not parse");
    }
    assert_eq!(
        parse_windows("monday-wednesday,sat 09:30-17:00 => 4").unwrap()[0].days,
        0b010_0111
    );
}

#[test]
fn missing_metrics_are_counted_conservatively_and_the_largest_metric_wins() {
    // 4 replicas desired, 2 report 150% of an 80% target: the other two count as 0
    // when scaling up, so the total load (300) decides: ceil(300 / 80) = 4, no change.
    let mut input = cpu(4, 1, 10, 150.0);
    input.replicas.truncate(2);
    let d = scale(&input).unwrap();
    assert_eq!(d.replicas, 4, "{}", d.reason);
    assert!(d.reason.contains("not reporting"), "{}", d.reason);
    // Two report 200%: the load (400) does need 5.
    let mut input = cpu(4, 1, 10, 200.0);
    input.replicas.truncate(2);
    assert_eq!(scale(&input).unwrap().replicas, 5);
    // Scaling down, the silent ones count as on target: 2 × 20% + 2 × 80% = 200 -> 3.
    let mut input = cpu(4, 1, 10, 20.0);
    input.replicas.truncate(2);
    assert_eq!(scale(&input).unwrap().replicas, 3);
    // NaN CPU (a replica in its startup period) is missing, not 0.
    let mut input = cpu(2, 1, 10, 160.0);
    input.replicas[1].cpu_percent = f64::NAN;
    assert_eq!(
        scale(&input).unwrap().replicas,
        2,
        "160 of 2 × 80: on target"
    );
    // Several metrics: the one asking for most replicas wins.
    let mut input = cpu(2, 1, 10, 40.0);
    input.params = BTreeMap::from([("metric".into(), "cpu:80, rif:10".into())]);
    for r in &mut input.replicas {
        r.custom.insert("rif".into(), 30.0);
    }
    let d = scale(&input).unwrap();
    assert_eq!(
        d.replicas, 6,
        "rif 30 of 10 beats cpu 40 of 80: {}",
        d.reason
    );
    assert!(d.reason.starts_with("rif"), "{}", d.reason);
    input.params.insert("target".into(), "5".into());
    assert!(scale(&input).is_err(), "target next to a list of targets");
}

#[test]
fn windows_may_name_a_time_zone() {
    // 2024-01-01 is a Monday; 19:00 in Shanghai is 11:00 UTC.
    let w = "mon-fri 19:00-23:00 Asia/Shanghai => 10";
    assert_eq!(scheduled(w, Some("2"), MONDAY + 11 * HOUR), 10);
    assert_eq!(
        scheduled(w, Some("2"), MONDAY + 19 * HOUR),
        2,
        "19:00 UTC is 03:00 there"
    );
    assert!(parse_windows("mon 10:00-11:00 Nowhere/Land => 1").is_err());
    assert_eq!(scheduled("mon 00:00-01:00 UTC => 4", Some("1"), MONDAY), 4);
}
