//! Built-in discovery: `zone-aware`.

use crate::model::{DiscoveryInput, Ranked};

/// Weight of an endpoint configured with weight 0.
pub const DEFAULT_WEIGHT: u32 = 100;

/// Healthy endpoints only: those in the caller's zone first, then its region, then the
/// rest; within a tier, least loaded first (then input order). Weight = configured
/// weight (default 100) divided by `1 + load`, at least 1.
///
/// Params: `zone-label` / `region-label` (caller labels to read, default `zone` and
/// `region`), `limit` (return at most this many).
pub fn zone_aware(input: &DiscoveryInput) -> Result<Vec<Ranked>, String> {
    let zone_label = input
        .params
        .get("zone-label")
        .map(String::as_str)
        .unwrap_or("zone");
    let region_label = input
        .params
        .get("region-label")
        .map(String::as_str)
        .unwrap_or("region");
    let limit = match input.params.get("limit") {
        None => usize::MAX,
        Some(s) => s
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("param limit: {s:?} is not a count"))?,
    };
    let zone = input
        .caller
        .labels
        .get(zone_label)
        .map(String::as_str)
        .unwrap_or("");
    let region = input
        .caller
        .labels
        .get(region_label)
        .map(String::as_str)
        .unwrap_or("");
    let mut picked: Vec<(u8, f64, u32, u32)> = input
        .endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| e.healthy)
        .map(|(i, e)| {
            let tier = if !zone.is_empty() && e.zone == zone {
                0
            } else if !region.is_empty() && e.region == region {
                1
            } else {
                2
            };
            let load = if e.load.is_nan() || e.load < 0.0 {
                0.0
            } else {
                e.load
            };
            let base = if e.weight == 0 {
                DEFAULT_WEIGHT
            } else {
                e.weight
            };
            let weight = (f64::from(base) / (1.0 + load))
                .round()
                .clamp(1.0, f64::from(u32::MAX)) as u32;
            (tier, load, i as u32, weight)
        })
        .collect();
    picked.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
    Ok(picked
        .into_iter()
        .take(limit)
        .map(|(_, _, index, weight)| Ranked { index, weight })
        .collect())
}
