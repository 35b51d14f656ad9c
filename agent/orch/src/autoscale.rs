//! Autoscaling, sans-IO: how a service's steward turns a scaler's recommendation
//! into the replica count it runs.
//!
//! A service with a `[scaler]` table is *autoscaled*. Every
//! [`Autoscaling::interval`] its steward builds a [`ScaleInput`] from the reports of
//! its running replicas ([`scale_input`]), asks the scaler (the service's plugin,
//! else the cluster default, else the built-in named by `policy`; the caller passes
//! it in) and hands the answer to [`decide`], which applies what needs history and
//! therefore cannot live in a stateless scaler call:
//!
//! - **scale-up at once, but by at most `max(+100%, +4)` per evaluation**;
//! - **scale-down only to the highest recommendation of the last
//!   `scale_down_window`** (the HPA stabilization window), so a dip in load does not
//!   remove replicas a returning peak needs;
//! - **windows on a metric policy**: with `windows` next to `target-utilization` (or
//!   a plugin), the open window's count is a floor — the larger wins. A pure
//!   `policy = "schedule"` moves at its window boundaries at once, without
//!   stabilization.
//!
//! The result is a [`ScaleState`] under `scale/<service>`, written by the steward
//! only: the desired count, why, when it last changed, the recommendations still
//! inside the window and the last [`HISTORY`] decisions. Because it is replicated, a
//! steward that takes over (the old one died) continues with the same window and
//! count: a steward change is never a scale event.
//!
//! This module decides and nothing else: it reads no clock and calls no policy.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_policy_logic::{Params, ReplicaMetrics, ScaleDecision, ScaleInput};
use shoal_runtime::{PortSpec, Protocol};

use crate::model::{AllocState, Members, Reports, ServiceRecord, SlotMap};
use crate::spec::MAX_REPLICAS;
use crate::steward::is_healthy;
use crate::units::parse_duration_ms;

/// Prefix of scale states: `scale/<service>`.
pub const SCALE_PREFIX: &str = "scale/";
/// Decisions kept in a [`ScaleState`] (newest first).
pub const HISTORY: usize = 20;
/// Recommendations kept for the stabilization window at most (the oldest, largest
/// ones are kept; see [`decide`]).
const MAX_RECOMMENDATIONS: usize = 64;
/// Default evaluation interval.
pub const DEFAULT_INTERVAL_MS: u64 = 2_000;
/// Default scale-down stabilization window.
pub const DEFAULT_SCALE_DOWN_WINDOW_MS: u64 = 300_000;
/// Default time after a replica starts during which its CPU is left out.
pub const DEFAULT_STARTUP_MS: u64 = 30_000;
/// Default path of a replica's Prometheus endpoint.
pub const DEFAULT_METRICS_PATH: &str = "/metrics";

/// `scale/<service>`.
pub fn scale_key(service: &str) -> String {
    format!("{SCALE_PREFIX}{service}")
}

/// The service of a `scale/<service>` key.
pub fn parse_scale_key(key: &str) -> Option<&str> {
    key.strip_prefix(SCALE_PREFIX)
        .filter(|n| !n.is_empty() && !n.contains('/'))
}

/// How a service scales: the engine's part of its `[scaler]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Autoscaling {
    /// The built-in policy: `target-utilization` or `schedule`.
    pub policy: String,
    /// Fewest replicas.
    pub min: u32,
    /// Most replicas.
    pub max: u32,
    /// How often the steward evaluates.
    pub interval: Duration,
    /// Scale-down goes only to the highest recommendation of this long.
    pub scale_down_window: Duration,
    /// A replica's CPU is left out of averages for this long after it starts.
    pub startup: Duration,
    /// Custom metrics the replicas expose, scraped by the agent that runs them.
    pub custom: Vec<String>,
    /// The port (by name) of the replicas' Prometheus endpoint.
    pub metrics_port: Option<String>,
    /// Its path.
    pub metrics_path: String,
}

fn ms_param(params: &Params, key: &str, default_ms: u64) -> Result<Duration, String> {
    match params.get(key) {
        None => Ok(Duration::from_millis(default_ms)),
        Some(s) => parse_duration_ms(s)
            .map(Duration::from_millis)
            .ok_or_else(|| format!("{key}: {s:?} is not a duration (e.g. \"30s\", \"5m\")")),
    }
}

fn count_param(params: &Params, key: &str) -> Result<Option<u32>, String> {
    match params.get(key) {
        None => Ok(None),
        Some(s) => match s.trim().parse::<u32>() {
            Ok(n) if n <= MAX_REPLICAS => Ok(Some(n)),
            Ok(n) => Err(format!(
                "{key}: {n} is more than the limit of {MAX_REPLICAS}"
            )),
            Err(_) => Err(format!("{key}: {s:?} is not a replica count")),
        },
    }
}

impl Autoscaling {
    /// Reads and checks a `[scaler]` table (`None`: the service is not autoscaled).
    /// The policy's own parameters are checked by running the built-in policy once,
    /// so a misspelt target or window is refused at deploy, not found at 19:00.
    pub fn from_params(params: &Params, ports: &[PortSpec]) -> Result<Option<Autoscaling>, String> {
        let Some(auto) = Autoscaling::read(params, ports)? else {
            return Ok(None);
        };
        // Dry runs of the built-in: bad targets, tolerances and windows fail here.
        let probe = ScaleInput {
            service: String::new(),
            current: auto.min,
            min: auto.min,
            max: auto.max,
            replicas: Vec::new(),
            now_ms: 0,
            params: params.clone(),
        };
        shoal_policy_logic::scale(&probe)?;
        shoal_policy_logic::window_floor(params, 0)?;
        Ok(Some(auto))
    }

    /// Reads the engine's keys of a table [`Autoscaling::from_params`] has checked
    /// (no dry run of the policy: what every pass and read uses).
    pub fn read(params: &Params, ports: &[PortSpec]) -> Result<Option<Autoscaling>, String> {
        if params.is_empty() {
            return Ok(None);
        }
        let policy = params
            .get("policy")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "target-utilization".into());
        if policy != "target-utilization" && policy != "schedule" {
            return Err(format!(
                "policy: {policy:?} is not a built-in scaler (target-utilization or schedule); a plugin installed for the service decides first and falls back to this one"
            ));
        }
        let min = count_param(params, "min")?.unwrap_or(1);
        let max = count_param(params, "max")?
            .ok_or("max is required: the most replicas the scaler may ask for")?;
        if max < min {
            return Err(format!("max ({max}) is below min ({min})"));
        }
        let interval = ms_param(params, "interval", DEFAULT_INTERVAL_MS)?;
        if interval < Duration::from_millis(500) || interval > Duration::from_secs(600) {
            return Err("interval must be between 500ms and 10m".into());
        }
        let scale_down_window =
            ms_param(params, "scale_down_window", DEFAULT_SCALE_DOWN_WINDOW_MS)?;
        if scale_down_window > Duration::from_secs(3_600) {
            return Err("scale_down_window must be at most 1h".into());
        }
        let startup = ms_param(params, "startup", DEFAULT_STARTUP_MS)?;
        let mut custom = Vec::new();
        if policy == "target-utilization" {
            for m in shoal_policy_logic::metric_targets(params)? {
                if m.name != "cpu" && m.name != "memory" {
                    custom.push(m.name);
                }
            }
        }
        let metrics_port = params.get("metrics_port").map(|s| s.trim().to_string());
        if let Some(name) = &metrics_port {
            match ports.iter().find(|p| &p.name == name) {
                None => {
                    return Err(format!(
                        "metrics_port: {name:?} is not one of the service's ports"
                    ))
                }
                Some(p) if p.protocol != Protocol::Tcp => {
                    return Err(format!("metrics_port: {name:?} is not a TCP port"))
                }
                Some(_) => {}
            }
        }
        if !custom.is_empty() && metrics_port.is_none() {
            return Err(format!(
                "metrics_port is required to scrape custom metric {:?} (the name of the port serving Prometheus text)",
                custom[0]
            ));
        }
        let metrics_path = params
            .get("metrics_path")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| DEFAULT_METRICS_PATH.into());
        if !metrics_path.starts_with('/') {
            return Err(format!("metrics_path: {metrics_path:?} must start with /"));
        }
        Ok(Some(Autoscaling {
            policy,
            min,
            max,
            interval,
            scale_down_window,
            startup,
            custom,
            metrics_port,
            metrics_path,
        }))
    }

    /// Whether decisions follow metrics (and so get the rate limit and the
    /// stabilization window); a pure schedule does not.
    pub fn follows_metrics(&self) -> bool {
        self.policy != "schedule"
    }

    /// `n` moved into `min..=max`.
    pub fn clamp(&self, n: u32) -> u32 {
        n.clamp(self.min, self.max)
    }
}

/// One scale decision, for `shoal events` and `shoal services --history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleEvent {
    /// When (ms since the epoch, the steward's clock).
    pub at_ms: u64,
    /// Replicas before.
    pub from: u32,
    /// Replicas after.
    pub to: u32,
    /// Why.
    pub reason: String,
    /// Which scaler answered: `built-in target-utilization` or the plugin's name.
    pub by: String,
    /// The steward that decided.
    pub steward: String,
}

/// `scale/<service>`: the autoscaler's replicated state (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ScaleState {
    /// The replica count the service runs.
    pub desired: u32,
    /// Why, from the last change.
    pub reason: String,
    /// When `desired` last changed.
    pub changed_ms: u64,
    /// The latest evaluation, when it changed nothing (`within tolerance`, `held by
    /// the scale-down window`), so operators see why the count stays.
    pub last: String,
    /// Recommendations inside the scale-down window: `(at_ms, replicas)`, each larger
    /// than every later one (a later, larger one makes an earlier one irrelevant).
    pub recommendations: Vec<(u64, u32)>,
    /// Changes so far.
    pub decisions: u64,
    /// The last [`HISTORY`] decisions, newest first.
    pub history: Vec<ScaleEvent>,
}

/// What a scaler answered and who answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recommendation {
    /// The answer (already checked to lie within `min..=max`).
    pub decision: ScaleDecision,
    /// `built-in target-utilization`, or the plugin's name.
    pub by: String,
}

/// The built-in policy, natively: what the simulators use, and the policy host's
/// last resort.
pub fn native_scaler(input: &ScaleInput) -> Recommendation {
    let policy = input
        .params
        .get("policy")
        .cloned()
        .unwrap_or_else(|| "target-utilization".into());
    let decision = shoal_policy_logic::scale(input).unwrap_or_else(|e| ScaleDecision {
        replicas: input.current.clamp(input.min, input.max.max(input.min)),
        reason: format!("scaler cannot decide ({e}); keeping the current count"),
    });
    Recommendation {
        decision,
        by: format!("built-in {policy}"),
    }
}

/// The count a service runs: its scale state's, else the record's, moved into
/// `min..=max`.
pub fn effective_replicas(
    auto: &Autoscaling,
    record_replicas: u32,
    state: Option<&ScaleState>,
) -> u32 {
    auto.clamp(state.map_or(record_replicas, |s| s.desired))
}

/// What the scaler decides from: the current count and one [`ReplicaMetrics`] per
/// running, healthy, current allocation. CPU is in percent of the replica's CPU
/// request (of one core without a request) and is NaN during its first `startup`
/// (left out of averages; kubernetes#29989 is what happens otherwise).
pub fn scale_input(
    auto: &Autoscaling,
    record: &ServiceRecord,
    current: u32,
    slots: &SlotMap,
    reports: &Reports,
    members: &Members,
    now_ms: u64,
) -> ScaleInput {
    let startup_ms = auto.startup.as_millis() as u64;
    let replicas = slots
        .values()
        .filter_map(|s| s.current.as_ref())
        .filter(|p| is_healthy(p, reports, members))
        .filter_map(|p| reports.get(&p.alloc_id).map(|r| (p, &r.report)))
        .filter(|(_, r)| r.state == AllocState::Running)
        .map(|(p, r)| {
            let request = p.reserved.resources.cpu_millis;
            let young = r.started_ms > 0 && now_ms < r.started_ms.saturating_add(startup_ms);
            let cpu = if young || !r.cpu_percent.is_finite() {
                f64::NAN
            } else if request > 0 {
                r.cpu_percent * 1000.0 / request as f64
            } else {
                r.cpu_percent
            };
            ReplicaMetrics {
                cpu_percent: cpu,
                memory_bytes: r.memory_bytes,
                custom: r.metrics.clone(),
            }
        })
        .collect();
    ScaleInput {
        service: record.spec.name.clone(),
        current,
        min: auto.min,
        max: auto.max,
        replicas,
        now_ms,
        params: record.spec.scaler.clone(),
    }
}

/// The next scale state from the current one and a recommendation made at `now_ms`
/// (see the module docs for the rules). Returns the state unchanged (equal) when
/// nothing moved.
pub fn decide(
    auto: &Autoscaling,
    params: &Params,
    state: &ScaleState,
    current: u32,
    rec: &Recommendation,
    now_ms: u64,
    steward: &str,
) -> ScaleState {
    let mut next = state.clone();
    let raw = auto.clamp(rec.decision.replicas);
    let mut why = rec.decision.reason.clone();
    let mut target = if auto.follows_metrics() {
        let window = auto.scale_down_window.as_millis() as u64;
        let recs = &mut next.recommendations;
        recs.retain(|(at, _)| now_ms.saturating_sub(*at) < window && *at <= now_ms);
        while recs.last().is_some_and(|(_, r)| *r <= raw) {
            recs.pop();
        }
        recs.push((now_ms, raw));
        if recs.len() > MAX_RECOMMENDATIONS {
            // Keep the oldest (largest) ones: forgetting a small late one can only
            // delay a scale-down, never hasten it.
            recs.truncate(MAX_RECOMMENDATIONS);
        }
        let highest = recs.first().map_or(raw, |(_, r)| *r);
        if raw > current {
            let limit = current.saturating_mul(2).max(current.saturating_add(4));
            if raw > limit {
                why = format!("{why} (limited to {limit}: at most +100% or +4 per step)");
            }
            raw.min(limit)
        } else if highest < current {
            if highest > raw {
                why = format!("{why}; scale-down window holds {highest}");
            }
            highest
        } else {
            if raw < current {
                let held_until = recs
                    .first()
                    .map_or(now_ms, |(at, _)| at.saturating_add(window));
                why = format!(
                    "{why}; held at {current} by the {} scale-down window until {}",
                    crate::units::format_duration_ms(window),
                    clock(held_until)
                );
            }
            current
        }
    } else {
        next.recommendations.clear();
        raw
    };
    if auto.follows_metrics() {
        match shoal_policy_logic::window_floor(params, now_ms) {
            Ok(Some((floor, text))) if floor > target => {
                target = floor;
                why = format!("window {text} (over {why})");
            }
            _ => {}
        }
    }
    let target = auto.clamp(target);
    if target == current {
        next.last = why;
        next.desired = current;
        return next;
    }
    next.desired = target;
    next.reason = why.clone();
    next.last = why.clone();
    next.changed_ms = now_ms;
    next.decisions += 1;
    next.history.insert(
        0,
        ScaleEvent {
            at_ms: now_ms,
            from: current,
            to: target,
            reason: why,
            by: rec.by.clone(),
            steward: steward.to_string(),
        },
    );
    next.history.truncate(HISTORY);
    next
}

/// `HH:MM:SS` UTC of a ms timestamp, for reasons.
fn clock(ms: u64) -> String {
    let s = (ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, (s / 60) % 60, s % 60)
}

/// Scale states by service, as [`crate::ClusterView`] holds them.
pub type ScaleStates = BTreeMap<String, std::sync::Arc<ScaleState>>;

#[cfg(test)]
mod tests;
