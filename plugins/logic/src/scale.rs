//! Built-in scalers: `target-utilization` (the Kubernetes HPA rule) and `schedule`
//! (fixed replica counts in weekly time windows, UTC).

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

/// Kubernetes HPA: `desired = ceil(current × metric / target)`, unchanged while the
/// ratio is within the tolerance, clamped to `min..=max`.
///
/// Params: `metric` = `cpu` (default, percent of request), `memory` (bytes) or the name
/// of a custom metric; `target` (default 80 for cpu, required otherwise); `tolerance`
/// (default 0.1). The metric is averaged over the replicas that report it; with no
/// metrics, or from zero replicas, the count only moves into bounds.
pub fn target_utilization(input: &ScaleInput) -> Result<ScaleDecision, String> {
    let metric = input
        .params
        .get("metric")
        .map(|s| s.trim())
        .unwrap_or("cpu");
    let target = match (param_f64(&input.params, "target")?, metric) {
        (Some(t), _) => t,
        (None, "cpu") => DEFAULT_CPU_TARGET,
        (None, _) => return Err(format!("param target is required for metric {metric:?}")),
    };
    if target <= 0.0 {
        return Err(format!("param target must be above 0, got {target}"));
    }
    let tolerance = param_f64(&input.params, "tolerance")?.unwrap_or(DEFAULT_TOLERANCE);
    if tolerance < 0.0 {
        return Err(format!(
            "param tolerance must not be negative, got {tolerance}"
        ));
    }
    let samples: Vec<f64> = input
        .replicas
        .iter()
        .filter_map(|r| match metric {
            "cpu" => Some(r.cpu_percent),
            "memory" => Some(r.memory_bytes as f64),
            name => r.custom.get(name).copied(),
        })
        .filter(|v| v.is_finite() && *v >= 0.0)
        .collect();
    let keep = |why: String| {
        let (replicas, note) = clamp(input.current, input);
        Ok(ScaleDecision {
            replicas,
            reason: format!("{why}{note}"),
        })
    };
    if samples.is_empty() {
        return keep(format!("no {metric} metrics; keeping {}", input.current));
    }
    if input.current == 0 {
        return keep(format!("{metric}: not scaling from zero replicas"));
    }
    let average = samples.iter().sum::<f64>() / samples.len() as f64;
    let ratio = average / target;
    let observed = format!("{metric} {} vs target {}", short(average), short(target));
    if (ratio - 1.0).abs() <= tolerance {
        return keep(format!(
            "{observed}: within tolerance, keeping {}",
            input.current
        ));
    }
    // Subtract a hair so that float noise on an exact ratio (4 × 1.25) cannot round up.
    let raw = (f64::from(input.current) * ratio - 1e-9).ceil();
    let desired = if raw >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        raw.max(0.0) as u32
    };
    let (replicas, note) = clamp(desired, input);
    Ok(ScaleDecision {
        replicas,
        reason: format!("{observed}: {} -> {desired}{note}", input.current),
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
/// after midnight (UTC); `end <= start` runs past midnight into the next day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Days the window starts on, bit 0 = Monday … bit 6 = Sunday.
    pub days: u8,
    /// Start, minutes after midnight.
    pub start: u16,
    /// End, minutes after midnight (exclusive).
    pub end: u16,
    /// Replicas while the window is open.
    pub replicas: u32,
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

/// Parses windows like `mon-fri 18:00-22:00 => 8; sat,sun 00:00-24:00 => 2`
/// (separated by `;` or newlines; days `mon`..`sun`, ranges, lists, or `daily`).
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
            .ok_or_else(|| bad("expected `<days> HH:MM-HH:MM => <replicas>`".into()))?;
        let replicas: u32 = count
            .trim()
            .parse()
            .map_err(|_| bad(format!("{:?} is not a replica count", count.trim())))?;
        let when = when.trim();
        let (day_spec, range) = when
            .rsplit_once(char::is_whitespace)
            .ok_or_else(|| bad("missing days or times".into()))?;
        let (start, end) = range
            .split_once('-')
            .ok_or_else(|| bad(format!("bad time range {range:?}")))?;
        let (start, end) = (minutes(start).map_err(bad)?, minutes(end).map_err(bad)?);
        if start == end {
            return Err(bad("empty time range".into()));
        }
        out.push(Window {
            days: days(day_spec).map_err(bad)?,
            start,
            end,
            replicas,
            text: entry.to_string(),
        });
    }
    Ok(out)
}

impl Window {
    /// Whether the window is open at `now_ms` (Unix milliseconds, UTC).
    pub fn contains(&self, now_ms: u64) -> bool {
        let day_index = now_ms / 86_400_000;
        // 1970-01-01 was a Thursday (index 3 with Monday = 0).
        let weekday = ((day_index + 3) % 7) as u8;
        let yesterday = (weekday + 6) % 7;
        let minute = ((now_ms % 86_400_000) / 60_000) as u16;
        let on = |d: u8| self.days & (1 << d) != 0;
        if self.start < self.end {
            on(weekday) && minute >= self.start && minute < self.end
        } else {
            (on(weekday) && minute >= self.start) || (on(yesterday) && minute < self.end)
        }
    }
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
