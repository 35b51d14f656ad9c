//! Built-in scalers: `target-utilization` (the Kubernetes HPA rule over CPU, memory
//! and custom metrics) and `schedule` (fixed replica counts in weekly time windows,
//! in UTC or a named time zone).
//!
//! These are pure recommendations from one moment's metrics and clock. What needs
//! history — the scale-up rate limit, the scale-down stabilization window, the
//! record of decisions — is the host's (`shoal-orch`'s autoscaler).

use crate::model::{Params, ScaleDecision, ScaleInput};

/// Default relative tolerance of `target-utilization`: no change within ±10%.
pub const DEFAULT_TOLERANCE: f64 = 0.1;

/// Default CPU target of `target-utilization`, in percent.
pub const DEFAULT_CPU_TARGET: f64 = 80.0;

/// Runs the scaler named by param `policy`: `target-utilization` (default) or
/// `schedule`.
pub fn scale(input: &ScaleInput) -> Result<ScaleDecision, String> {
    match input.params.get("policy").map(|s| s.trim()) {
        None | Some("") | Some("target-utilization") => target_utilization(input),
        Some("schedule") => schedule(input),
        Some(other) => Err(format!(
            "unknown scaling policy {other:?} (expected target-utilization or schedule)"
        )),
    }
}

fn param_f64(params: &Params, key: &str) -> Result<Option<f64>, String> {
    match params.get(key) {
        None => Ok(None),
        Some(s) => match s.trim().trim_end_matches('%').parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(Some(v)),
            _ => Err(format!("param {key}: {s:?} is not a number")),
        },
    }
}

fn clamp(desired: u32, input: &ScaleInput) -> (u32, &'static str) {
    let (min, max) = input.bounds();
    if desired < min {
        (min, " (raised to min)")
    } else if desired > max {
        (max, " (capped at max)")
    } else {
        (desired, "")
    }
}

/// One metric a `target-utilization` scaler follows, with its target.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricTarget {
    /// `cpu` (percent of the replica's CPU request), `memory` (bytes) or the name
    /// of a custom metric the replica exposes.
    pub name: String,
    /// The per-replica value to hold.
    pub target: f64,
}

/// The metrics of a `target-utilization` scaler: param `metric` is one name with
/// param `target` (`metric = "cpu"`, `target = 50`; cpu defaults to
/// [`DEFAULT_CPU_TARGET`]) or a list of `name:target` pairs
/// (`metric = "cpu:50, requests_in_flight:10"`), in which case `target` must not be
/// set.
pub fn metric_targets(params: &Params) -> Result<Vec<MetricTarget>, String> {
    let text = params.get("metric").map(|s| s.trim()).unwrap_or("cpu");
    let target = param_f64(params, "target")?;
    let mut out = Vec::new();
    if text.contains(':') {
        if target.is_some() {
            return Err(format!(
                "param target must not be set when metric lists targets ({text:?})"
            ));
        }
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, t) = part
                .split_once(':')
                .ok_or_else(|| format!("param metric: {part:?} is not `name:target`"))?;
            let t: f64 = t
                .trim()
                .trim_end_matches('%')
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite())
                .ok_or_else(|| format!("param metric: target of {part:?} is not a number"))?;
            out.push(MetricTarget {
                name: name.trim().to_string(),
                target: t,
            });
        }
    } else {
        let name = if text.is_empty() { "cpu" } else { text };
        let target = match (target, name) {
            (Some(t), _) => t,
            (None, "cpu") => DEFAULT_CPU_TARGET,
            (None, _) => return Err(format!("param target is required for metric {name:?}")),
        };
        out.push(MetricTarget {
            name: name.to_string(),
            target,
        });
    }
    if out.is_empty() {
        return Err("param metric names no metric".into());
    }
    for m in &out {
        if m.name.is_empty() || m.name.contains(char::is_whitespace) {
            return Err(format!("param metric: {:?} is not a metric name", m.name));
        }
        if m.target <= 0.0 {
            return Err(format!(
                "param target must be above 0, got {} for {}",
                m.target, m.name
            ));
        }
    }
    Ok(out)
}

/// What one metric recommends.
struct Recommendation {
    replicas: u32,
    why: String,
}

/// The recommendation of one metric, or `None` when no replica reports it.
///
/// `n = max(current, reporting)` replicas are assumed; those that do not report
/// (starting, unhealthy, inside their startup period) count as 0 when the others
/// ask for more (so a spike on the first replicas does not overshoot) and as
/// exactly on target when the others ask for fewer (so a scale-down never counts
/// on replicas it cannot see). If that reverses the direction or lands within the
/// tolerance, the count stays.
fn recommend(input: &ScaleInput, m: &MetricTarget, tolerance: f64) -> Option<Recommendation> {
    let samples: Vec<f64> = input
        .replicas
        .iter()
        .filter_map(|r| match m.name.as_str() {
            "cpu" => Some(r.cpu_percent),
            "memory" => Some(r.memory_bytes as f64),
            name => r.custom.get(name).copied(),
        })
        .filter(|v| v.is_finite() && *v >= 0.0)
        .collect();
    if samples.is_empty() {
        return None;
    }
    let k = samples.len() as f64;
    let n = f64::from(input.current).max(k);
    let missing = n - k;
    let sum: f64 = samples.iter().sum();
    let average = sum / k;
    let unit = if m.name == "cpu" { "%" } else { "" };
    let observed = format!(
        "{} {}{unit} of {}{unit} target",
        m.name,
        short(average),
        short(m.target)
    );
    let keep = |why: &str| Recommendation {
        replicas: input.current,
        why: format!("{observed}: {why}, keeping {}", input.current),
    };
    let ratio = average / m.target;
    if (ratio - 1.0).abs() <= tolerance {
        return Some(keep("within tolerance"));
    }
    let adjusted = if ratio > 1.0 {
        sum / (n * m.target)
    } else {
        (sum + missing * m.target) / (n * m.target)
    };
    if (adjusted - 1.0).abs() <= tolerance || (adjusted > 1.0) != (ratio > 1.0) {
        return Some(keep(&format!("{} replicas not reporting", missing as u64)));
    }
    // Subtract a hair so that float noise on an exact ratio (4 × 1.25) cannot round up.
    let raw = (n * adjusted - 1e-9).ceil();
    let replicas = if raw >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        raw.max(0.0) as u32
    };
    Some(Recommendation {
        replicas,
        why: format!("{observed}: {} \u{2192} {replicas}", input.current),
    })
}

/// Kubernetes HPA: `desired = ceil(current × metric / target)` per metric, the
/// largest wins, unchanged while the ratio is within the tolerance, clamped to
/// `min..=max`.
///
/// Params: `metric` and `target` (see [`metric_targets`]); `tolerance` (default
/// 0.1). Each metric is averaged over the replicas that report it; replicas that do
/// not are treated conservatively (see the module's `recommend`). With no metrics at
/// all, or from zero replicas, the count only moves into bounds. The rate limit on
/// scale-up and the scale-down stabilization window are the host's: they need the
/// history of decisions, which a scaler call does not keep.
pub fn target_utilization(input: &ScaleInput) -> Result<ScaleDecision, String> {
    let metrics = metric_targets(&input.params)?;
    let tolerance = param_f64(&input.params, "tolerance")?.unwrap_or(DEFAULT_TOLERANCE);
    if tolerance < 0.0 {
        return Err(format!(
            "param tolerance must not be negative, got {tolerance}"
        ));
    }
    let keep = |why: String| {
        let (replicas, note) = clamp(input.current, input);
        Ok(ScaleDecision {
            replicas,
            reason: format!("{why}{note}"),
        })
    };
    if input.current == 0 {
        return keep("not scaling from zero replicas".to_string());
    }
    let best = metrics
        .iter()
        .filter_map(|m| recommend(input, m, tolerance))
        .max_by_key(|r| r.replicas);
    let Some(best) = best else {
        let names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
        return keep(format!(
            "no {} metrics; keeping {}",
            names.join("/"),
            input.current
        ));
    };
    let (replicas, note) = clamp(best.replicas, input);
    Ok(ScaleDecision {
        replicas,
        reason: format!("{}{note}", best.why),
    })
}

fn short(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.1}")
    }
}

/// One `schedule` window: on `days` (bit 0 = Monday), from `start` to `end` minutes
/// after midnight, in time zone `tz` (UTC without one); `end <= start` runs past
/// midnight into the next day.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Days the window starts on, bit 0 = Monday … bit 6 = Sunday.
    pub days: u8,
    /// Start, minutes after midnight.
    pub start: u16,
    /// End, minutes after midnight (exclusive).
    pub end: u16,
    /// Replicas while the window is open.
    pub replicas: u32,
    /// IANA time zone the times are in (`Asia/Shanghai`); `None` is UTC.
    pub tz: Option<jiff::tz::TimeZone>,
    /// The window as written.
    pub text: String,
}

const DAY_NAMES: [(&str, &str); 7] = [
    ("mon", "monday"),
    ("tue", "tuesday"),
    ("wed", "wednesday"),
    ("thu", "thursday"),
    ("fri", "friday"),
    ("sat", "saturday"),
    ("sun", "sunday"),
];

fn day(name: &str) -> Result<u8, String> {
    let name = name.trim().to_ascii_lowercase();
    DAY_NAMES
        .iter()
        .position(|(short, long)| name == *short || name == *long)
        .map(|i| i as u8)
        .ok_or_else(|| format!("unknown day {name:?}"))
}

fn days(spec: &str) -> Result<u8, String> {
    let spec = spec.trim().to_ascii_lowercase();
    if spec == "*" || spec == "daily" || spec == "all" {
        return Ok(0x7f);
    }
    let mut set = 0u8;
    for part in spec.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    set |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => set |= 1 << day(part)?,
        }
    }
    Ok(set)
}

fn minutes(t: &str) -> Result<u16, String> {
    let t = t.trim();
    let (h, m) = t
        .split_once(':')
        .ok_or_else(|| format!("bad time {t:?}, expected HH:MM"))?;
    let h: u16 = h.parse().map_err(|_| format!("bad time {t:?}"))?;
    let m: u16 = m.parse().map_err(|_| format!("bad time {t:?}"))?;
    if m >= 60 || h > 24 || (h == 24 && m > 0) {
        return Err(format!("bad time {t:?}"));
    }
    Ok(h * 60 + m)
}

/// Parses windows like `mon-fri 18:00-22:00 => 8; sat,sun 00:00-24:00 => 2` or, with a
/// time zone, `mon-fri 19:00-23:00 Asia/Shanghai => 10` (separated by `;` or
/// newlines; days `mon`..`sun`, ranges, lists, or `daily`; without a zone, UTC).
pub fn parse_windows(text: &str) -> Result<Vec<Window>, String> {
    let mut out = Vec::new();
    for entry in text
        .split([';', '\n'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let bad = |why: String| format!("window {entry:?}: {why}");
        let (when, count) = entry
            .split_once("=>")
            .ok_or_else(|| bad("expected `<days> HH:MM-HH:MM [time zone] => <replicas>`".into()))?;
        let replicas: u32 = count
            .trim()
            .parse()
            .map_err(|_| bad(format!("{:?} is not a replica count", count.trim())))?;
        let words: Vec<&str> = when.split_whitespace().collect();
        let (day_spec, range, zone) = match words.as_slice() {
            [d, r] => (*d, *r, None),
            [d, r, z] => (*d, *r, Some(*z)),
            _ => return Err(bad("missing days or times".into())),
        };
        let (start, end) = range
            .split_once('-')
            .ok_or_else(|| bad(format!("bad time range {range:?}")))?;
        let (start, end) = (minutes(start).map_err(bad)?, minutes(end).map_err(bad)?);
        if start == end {
            return Err(bad("empty time range".into()));
        }
        let tz = match zone {
            None => None,
            Some(z) if z.eq_ignore_ascii_case("utc") => None,
            Some(z) => Some(jiff::tz::TimeZone::get(z).map_err(|_| {
                bad(format!(
                    "unknown time zone {z:?} (an IANA name such as Europe/Berlin)"
                ))
            })?),
        };
        out.push(Window {
            days: days(day_spec).map_err(bad)?,
            start,
            end,
            replicas,
            tz,
            text: entry.to_string(),
        });
    }
    Ok(out)
}

impl Window {
    /// Whether the window is open at `now_ms` (Unix milliseconds), on the clock of
    /// its time zone (daylight saving included).
    pub fn contains(&self, now_ms: u64) -> bool {
        let (weekday, minute) = match &self.tz {
            None => {
                let day_index = now_ms / 86_400_000;
                // 1970-01-01 was a Thursday (index 3 with Monday = 0).
                (
                    ((day_index + 3) % 7) as u8,
                    ((now_ms % 86_400_000) / 60_000) as u16,
                )
            }
            Some(tz) => {
                let Ok(ts) = jiff::Timestamp::from_millisecond(now_ms.min(i64::MAX as u64) as i64)
                else {
                    return false;
                };
                let local = ts.to_zoned(tz.clone());
                (
                    local.weekday().to_monday_zero_offset() as u8,
                    local.hour() as u16 * 60 + local.minute() as u16,
                )
            }
        };
        let yesterday = (weekday + 6) % 7;
        let on = |d: u8| self.days & (1 << d) != 0;
        if self.start < self.end {
            on(weekday) && minute >= self.start && minute < self.end
        } else {
            (on(weekday) && minute >= self.start) || (on(yesterday) && minute < self.end)
        }
    }
}

/// The replica count of the first window open at `input.now_ms`, with the window's
/// text: what param `windows` adds to a metric policy (the larger count wins).
/// `None` without `windows` or outside every window.
pub fn window_floor(params: &Params, now_ms: u64) -> Result<Option<(u32, String)>, String> {
    let Some(text) = params.get("windows") else {
        return Ok(None);
    };
    Ok(parse_windows(text)?
        .into_iter()
        .find(|w| w.contains(now_ms))
        .map(|w| (w.replicas, w.text)))
}

/// Fixed replica counts by time window. Params: `windows` (see [`parse_windows`]; the
/// first open window wins) and `default` (replicas outside every window; without it
/// the current count is kept). Clamped to `min..=max`.
pub fn schedule(input: &ScaleInput) -> Result<ScaleDecision, String> {
    let text = input
        .params
        .get("windows")
        .ok_or("param windows is required for policy schedule")?;
    let windows = parse_windows(text)?;
    let default = match input.params.get("default") {
        None => None,
        Some(s) => Some(
            s.trim()
                .parse::<u32>()
                .map_err(|_| format!("param default: {s:?} is not a replica count"))?,
        ),
    };
    let (desired, why) = match windows.iter().find(|w| w.contains(input.now_ms)) {
        Some(w) => (w.replicas, format!("window {}", w.text)),
        None => match default {
            Some(d) => (d, format!("outside all windows: default {d}")),
            None => (
                input.current,
                format!("outside all windows: keeping {}", input.current),
            ),
        },
    };
    let (replicas, note) = clamp(desired, input);
    Ok(ScaleDecision {
        replicas,
        reason: format!("{why}{note}"),
    })
}
