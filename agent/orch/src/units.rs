//! Human quantities in specs: sizes (`256Mi`, `1G`), CPU (`500m`, `0.5`) and
//! durations (`5s`, `1m30s`). Each parser has a formatter whose output it reads back
//! unchanged, so a spec survives a round trip through the replicated state.

/// Size units: binary (`Ki`..`Ti`) and decimal (`k`/`K`..`T`), each optionally
/// followed by `B`. Longest suffixes first so `Mi` is not read as `M`.
const SIZE_UNITS: &[(&str, u64)] = &[
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("kB", 1_000),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
    ("k", 1_000),
    ("K", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("B", 1),
];

/// Splits `12.5Mi` into `("12.5", "Mi")`.
fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    s.split_at(end)
}

/// Multiplies a decimal number (`"12"`, `"0.5"`) by `unit`, refusing overflow,
/// negatives and malformed numbers. Fractions are rounded to the nearest integer.
fn scale(number: &str, unit: u64) -> Option<u64> {
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return None;
    }
    if !number.contains('.') {
        let n: u64 = number.parse().ok()?;
        return n.checked_mul(unit);
    }
    let f: f64 = number.parse().ok()?;
    let v = (f * unit as f64).round();
    // 2^64 as f64; anything at or above does not fit.
    if !v.is_finite() || !(0.0..18_446_744_073_709_551_616.0).contains(&v) {
        return None;
    }
    Some(v as u64)
}

/// Parses a size in bytes: `1024`, `256Mi`, `1G`, `1.5Gi`, `512MB`.
pub fn parse_size(s: &str) -> Option<u64> {
    let (number, unit) = split_number(s.trim());
    let mult = if unit.is_empty() {
        1
    } else {
        SIZE_UNITS.iter().find(|(u, _)| *u == unit)?.1
    };
    scale(number, mult)
}

/// Renders bytes in the largest unit that divides them exactly (`256Mi`, `1G`, `1234`).
pub(crate) fn format_size(bytes: u64) -> String {
    for (unit, m) in [
        ("Ti", 1u64 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
        ("T", 1_000_000_000_000),
        ("G", 1_000_000_000),
        ("M", 1_000_000),
        ("k", 1_000),
    ] {
        if bytes >= m && bytes.is_multiple_of(m) {
            return format!("{}{unit}", bytes / m);
        }
    }
    bytes.to_string()
}

/// Parses CPU as text: `500m` (millicores) or a number of cores (`0.5`, `2`).
pub(crate) fn parse_cpu_text(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_suffix('m') {
        Some(millis) if !millis.contains('.') => millis.parse().ok(),
        Some(_) => None,
        None => scale(s, 1000),
    }
}

/// Converts a number of cores to millicores.
pub(crate) fn cores_to_millis(cores: f64) -> Option<u64> {
    let v = (cores * 1000.0).round();
    if !v.is_finite() || !(0.0..=1e15).contains(&v) {
        return None;
    }
    Some(v as u64)
}

/// Renders millicores: whole cores as `2`, the rest as `500m`.
pub(crate) fn format_cpu(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// Longest duration accepted anywhere in a spec (a year), so arithmetic on
/// milliseconds can never overflow.
pub(crate) const MAX_DURATION_MS: u64 = 365 * 24 * 3600 * 1000;

/// Parses a duration in milliseconds: one or more `<number><unit>` with units
/// `ms`, `s`, `m`, `h` (`5s`, `1m30s`, `1.5s`, `250ms`).
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let (number, after) = split_number(rest);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, tail) = after.split_at(unit_len);
        let mult = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return None,
        };
        total = total.checked_add(scale(number, mult)?)?;
        rest = tail;
    }
    (total <= MAX_DURATION_MS).then_some(total)
}

/// Renders milliseconds in the largest unit that divides them exactly (`5s`, `2m`, `1500ms`).
pub(crate) fn format_duration_ms(ms: u64) -> String {
    for (unit, m) in [("h", 3_600_000u64), ("m", 60_000), ("s", 1_000)] {
        if ms >= m && ms.is_multiple_of(m) {
            return format!("{}{unit}", ms / m);
        }
    }
    if ms == 0 {
        "0s".to_string()
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256Mi"), Some(256 << 20));
        assert_eq!(parse_size("1G"), Some(1_000_000_000));
        assert_eq!(parse_size("1.5Gi"), Some(3 << 29));
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("512MB"), Some(512_000_000));
        for bad in [
            "12QB",
            "",
            "Mi",
            "-1Mi",
            "1..2G",
            ".5G",
            "1 G G",
            "99999999999Ti",
        ] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        assert_eq!(format_size(256 << 20), "256Mi");
        assert_eq!(format_size(1_000_000_000), "1G");
        assert_eq!(format_size(1234), "1234");
    }

    #[test]
    fn cpu() {
        assert_eq!(parse_cpu_text("500m"), Some(500));
        assert_eq!(parse_cpu_text("0.5"), Some(500));
        assert_eq!(parse_cpu_text("2"), Some(2000));
        assert_eq!(parse_cpu_text("1.5m"), None);
        assert_eq!(parse_cpu_text("fast"), None);
        assert_eq!(cores_to_millis(0.25), Some(250));
        assert_eq!(cores_to_millis(-1.0), None);
        assert_eq!(format_cpu(2000), "2");
        assert_eq!(format_cpu(500), "500m");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("5s"), Some(5_000));
        assert_eq!(parse_duration_ms("1m30s"), Some(90_000));
        assert_eq!(parse_duration_ms("1.5s"), Some(1_500));
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("2h"), Some(7_200_000));
        for bad in ["", "5", "5 s", "5x", "s", "9999h", "-1s"] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
        assert_eq!(format_duration_ms(90_000), "90s");
        assert_eq!(format_duration_ms(120_000), "2m");
        assert_eq!(format_duration_ms(1_500), "1500ms");
        assert_eq!(format_duration_ms(0), "0s");
    }

    proptest! {
        #[test]
        fn formats_read_back(bytes in any::<u64>(), millis in 0u64..1_000_000_000, ms in 0..MAX_DURATION_MS) {
            prop_assert_eq!(parse_size(&format_size(bytes)), Some(bytes));
            prop_assert_eq!(parse_cpu_text(&format_cpu(millis)), Some(millis));
            prop_assert_eq!(parse_duration_ms(&format_duration_ms(ms)), Some(ms));
        }
    }
}
