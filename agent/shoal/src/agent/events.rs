//! This agent's recent events, for `shoal events`: what it decided as a steward
//! (rescheduled, moved, placement failed, rollout stalled), what its replicas did
//! (restarts), what happened to its plugins (quarantined), and which of the writes
//! it acknowledged lost the last-writer-wins merge after a partition healed
//! (`write lost`, e.g. `scale web 5` here undone by `scale web 2` on the other side).
//!
//! The log keeps the newest [`KEPT_EVENTS`] and is published as node-owned state
//! (`node/<me>/events`), so every agent can list the whole cluster's events from its
//! views. It records only; the loop feeds it what it already handles and publishes
//! it when it changed. Scale decisions are not kept here: they live in the
//! autoscaler's replicated history and are merged in when listing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use shoal_core::Entry;
use shoal_orch::{AllocReport, ServiceRecord};

use super::keys::PluginRow;

/// Events one agent keeps and publishes.
pub const KEPT_EVENTS: usize = 64;

/// One event, as published in `node/<n>/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeEvent {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// `rescheduled`, `moved`, `placement failed`, `rollout stalled`, `restart`,
    /// `plugin quarantined` or `write lost`.
    pub kind: String,
    /// The service it concerns, if one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// What happened.
    pub reason: String,
}

/// The log (see the module docs).
#[derive(Default)]
pub struct EventLog {
    events: VecDeque<NodeEvent>,
    /// Restarts last seen per own allocation.
    restarts: BTreeMap<String, u32>,
    /// Plugins (by agent, kind, service, hash) last seen quarantined.
    quarantined: BTreeSet<String>,
    dirty: bool,
}

impl EventLog {
    /// Records one event.
    pub fn record(&mut self, at_ms: u64, kind: &str, service: Option<&str>, reason: String) {
        if self.events.len() == KEPT_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(NodeEvent {
            at_ms,
            kind: kind.to_string(),
            service: service.map(str::to_string),
            reason,
        });
        self.dirty = true;
    }

    /// Takes a report of one of this node's allocations (`None`: it is gone); a
    /// restart count that went up is a `restart` event.
    pub fn report(&mut self, alloc_id: &str, report: Option<&AllocReport>, at_ms: u64) {
        let Some(r) = report else {
            self.restarts.remove(alloc_id);
            return;
        };
        let before = self.restarts.insert(alloc_id.to_string(), r.restarts);
        if before.is_some_and(|b| r.restarts > b) {
            let why = r.reason.as_deref().unwrap_or("it ended");
            self.record(
                at_ms,
                "restart",
                Some(&r.service),
                format!("slot {} (restart {}): {why}", r.slot, r.restarts),
            );
        }
    }

    /// Takes this agent's plugin rows; one newly quarantined is an event.
    pub fn plugins(&mut self, rows: &[PluginRow], at_ms: u64) {
        let now: BTreeSet<String> = rows
            .iter()
            .filter(|r| r.state == "quarantined")
            .map(|r| format!("{}/{:?}/{:?}/{}", r.agent, r.kind, r.service, r.hash))
            .collect();
        for r in rows.iter().filter(|r| r.state == "quarantined") {
            let id = format!("{}/{:?}/{:?}/{}", r.agent, r.kind, r.service, r.hash);
            if !self.quarantined.contains(&id) {
                let scope = r
                    .service
                    .as_deref()
                    .map_or("the cluster default".into(), |s| format!("service {s}"));
                self.record(
                    at_ms,
                    "plugin quarantined",
                    r.service.as_deref(),
                    format!(
                        "{} plugin {} ({}) for {scope}: {}; the built-in policy answers instead",
                        r.kind,
                        r.name,
                        &r.hash[..r.hash.len().min(12)],
                        r.error.as_deref().unwrap_or("too many failed calls")
                    ),
                );
            }
        }
        self.quarantined = now;
    }

    /// A write this node acknowledged lost the last-writer-wins merge.
    pub fn overwritten(&mut self, ours: &Entry, theirs: &Entry, at_ms: u64) {
        let Some((service, reason)) = describe_loss(ours, theirs) else {
            return;
        };
        self.record(at_ms, "write lost", service.as_deref(), reason);
    }

    /// The events to publish, if they changed since the last call.
    pub fn take_dirty(&mut self) -> Option<Vec<NodeEvent>> {
        std::mem::take(&mut self.dirty).then(|| self.events.iter().cloned().collect())
    }
}

/// What an overwritten entry undid, in words; `None` for internal records only a
/// steward writes (slots, scaler state), whose merges are not operators' writes.
fn describe_loss(ours: &Entry, theirs: &Entry) -> Option<(Option<String>, String)> {
    let key = ours.key.as_str();
    if key.starts_with(shoal_orch::SLOT_PREFIX) || key.starts_with(shoal_orch::SCALE_PREFIX) {
        return None;
    }
    let by = &theirs.writer.node;
    if let Some(name) = shoal_orch::parse_service_key(key) {
        let decode = |e: &Entry| -> Option<ServiceRecord> {
            serde_json::from_slice(e.value.as_deref()?).ok()
        };
        let what = |r: &Option<ServiceRecord>| match r {
            None => "removed".to_string(),
            Some(r) if r.deleted => "removed".to_string(),
            Some(r) => format!("version {}, {} replicas", r.version, r.replicas),
        };
        let (mine, won) = (decode(ours), decode(theirs));
        return Some((
            Some(name.to_string()),
            format!(
                "service {name}: this node's write ({}) was overwritten by {by}'s ({})",
                what(&mine),
                what(&won)
            ),
        ));
    }
    let text = |e: &Entry| match e.value.as_deref() {
        None => "deleted".to_string(),
        Some(v) if v.len() <= 64 => format!("{:?}", String::from_utf8_lossy(v)),
        Some(v) => format!("{} bytes", v.len()),
    };
    let shown = if super::keys::is_user(key) {
        format!("kv {key}")
    } else {
        key.to_string()
    };
    Some((
        None,
        format!(
            "{shown}: this node's write ({}) was overwritten by {by}'s ({})",
            text(ours),
            text(theirs)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::{Hlc, WriterId};

    fn entry(key: &str, node: &str, value: &[u8]) -> Entry {
        Entry {
            key: key.into(),
            value: Some(value.to_vec()),
            hlc: Hlc::default(),
            writer: WriterId {
                node: node.into(),
                gen: 1,
            },
            seq: 1,
        }
    }

    #[test]
    fn losses_restarts_and_quarantines_are_recorded_once_each() {
        let mut log = EventLog::default();
        let spec = shoal_orch::ServiceSpec::from_toml(
            "web.toml",
            "name = \"web\"\ndriver = \"process\"\ncommand = [\"x\"]\nreplicas = 5\n",
        )
        .unwrap();
        let five = ServiceRecord::deploy(None, spec);
        let two = five.scaled(2).unwrap();
        log.overwritten(
            &entry("service/web", "n1", &serde_json::to_vec(&five).unwrap()),
            &entry("service/web", "n4", &serde_json::to_vec(&two).unwrap()),
            10,
        );
        // Slots are the stewards' business, not an operator's lost write.
        log.overwritten(
            &entry("alloc/web/0", "n1", b"{}"),
            &entry("alloc/web/0", "n4", b"[]"),
            11,
        );
        let mut r = AllocReport {
            service: "web".into(),
            slot: 1,
            reason: Some("exited with code 3; restarting in 1s".into()),
            ..AllocReport::default()
        };
        log.report("a1", Some(&r), 12);
        log.report("a1", Some(&r), 13);
        r.restarts = 1;
        log.report("a1", Some(&r), 14);
        let got = log.take_dirty().unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            got[0].reason,
            "service web: this node's write (version 1, 5 replicas) was overwritten by n4's (version 1, 2 replicas)"
        );
        assert_eq!(
            (got[1].kind.as_str(), got[1].service.as_deref()),
            ("restart", Some("web"))
        );
        assert!(got[1]
            .reason
            .starts_with("slot 1 (restart 1): exited with code 3"));
        assert!(log.take_dirty().is_none(), "published once");
        for _ in 0..KEPT_EVENTS + 5 {
            log.record(1, "moved", None, "x".into());
        }
        assert_eq!(log.take_dirty().unwrap().len(), KEPT_EVENTS);
    }
}
