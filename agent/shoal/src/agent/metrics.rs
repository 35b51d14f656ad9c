//! Prometheus text exposition of the agent's counters, rendered from the published
//! [`Views`] (and the transport's own counters) without asking the agent loop.

use std::collections::BTreeMap;
use std::fmt::Write;

use shoal_core::Status;
use shoal_net::NetStats;

use super::views::Views;

/// Writes one histogram family member in the Prometheus text format.
fn histogram(out: &mut String, name: &str, labels: &str, h: &shoal_core::Histogram) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (le, n) in h.cumulative() {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {}", h.sum);
    let _ = writeln!(out, "{name}_count{braces} {}", h.count);
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders the Prometheus text format.
pub fn render(v: &Views, net: &NetStats) -> String {
    let s = &v.stats;
    let mut members: BTreeMap<Status, usize> = BTreeMap::new();
    for (_, st) in v.members.iter() {
        *members.entry(*st).or_default() += 1;
    }
    let mut o = String::new();
    family(
        &mut o,
        "shoal_loop_turn_seconds",
        "histogram",
        "Time the agent loop spent on one turn, by the branch that woke it.",
    );
    for (branch, h) in &s.turns {
        histogram(
            &mut o,
            "shoal_loop_turn_seconds",
            &format!("branch=\"{branch}\""),
            h,
        );
    }
    family(
        &mut o,
        "shoal_loop_turn_max_seconds",
        "gauge",
        "Longest agent loop turn since start, by branch.",
    );
    for (branch, h) in &s.turns {
        let _ = writeln!(
            o,
            "shoal_loop_turn_max_seconds{{branch=\"{branch}\"}} {}",
            h.max
        );
    }
    family(
        &mut o,
        "shoal_orchestration_pass_seconds",
        "histogram",
        "Time one orchestration pass took (on the orchestration worker, off the loop).",
    );
    histogram(&mut o, "shoal_orchestration_pass_seconds", "", &s.passes);
    family(
        &mut o,
        "shoal_channel_depth",
        "gauge",
        "Messages queued in each channel between the agent's tasks.",
    );
    for (name, _, depth) in &s.channels {
        let _ = writeln!(o, "shoal_channel_depth{{name=\"{name}\"}} {depth}");
    }
    family(
        &mut o,
        "shoal_channel_capacity",
        "gauge",
        "Capacity of each channel between the agent's tasks ([perf] in the config).",
    );
    for (name, cap, _) in &s.channels {
        let _ = writeln!(o, "shoal_channel_capacity{{name=\"{name}\"}} {cap}");
    }
    family(
        &mut o,
        "shoal_blob_frames_dropped_total",
        "counter",
        "Blob transfer frames dropped because the blob worker was backed up.",
    );
    let _ = writeln!(
        o,
        "shoal_blob_frames_dropped_total {}",
        s.blob_frames_dropped
    );
    family(
        &mut o,
        "shoal_logs_frames_dropped_total",
        "counter",
        "Logs request and answer frames dropped because the logs task was backed up.",
    );
    let _ = writeln!(
        o,
        "shoal_logs_frames_dropped_total {}",
        s.logs_frames_dropped
    );
    family(
        &mut o,
        "shoal_swim_probe_rtt_seconds",
        "histogram",
        "Round trip of direct SWIM probes (ping sent to ack handled).",
    );
    histogram(
        &mut o,
        "shoal_swim_probe_rtt_seconds",
        "",
        &s.core.probe_rtt,
    );
    family(
        &mut o,
        "shoal_swim_probe_rtt_max_seconds",
        "gauge",
        "Longest SWIM probe round trip since start.",
    );
    let _ = writeln!(
        o,
        "shoal_swim_probe_rtt_max_seconds {}",
        s.core.probe_rtt.max
    );
    family(
        &mut o,
        "shoal_swim_probe_failures_total",
        "counter",
        "SWIM probe cycles that failed (each makes a member suspect).",
    );
    let _ = writeln!(
        o,
        "shoal_swim_probe_failures_total {}",
        s.core.probe_failures
    );
    family(
        &mut o,
        "shoal_swim_stuck_suspects_total",
        "counter",
        "Members declared down after staying suspect twice the suspicion timeout (a suspicion timer SWIM dropped while this node was cut off).",
    );
    let _ = writeln!(
        o,
        "shoal_swim_stuck_suspects_total {}",
        s.core.stuck_suspects
    );
    for (name, kind, help, v) in [
        (
            "shoal_swim_suspicion_reports_total",
            "counter",
            "Other nodes' failed probes heard of (Lifeguard confirmations of a suspicion).",
            s.core.suspicion_reports,
        ),
        (
            "shoal_swim_checks_total",
            "counter",
            "Confirmation checks this node sent to a member another node reported failing.",
            s.core.checks_sent,
        ),
        (
            "shoal_swim_checks_failed_total",
            "counter",
            "Confirmation checks left unanswered for a probe timeout (each confirmed the suspicion).",
            s.core.checks_failed,
        ),
        (
            "shoal_swim_refutations_total",
            "counter",
            "Suspicions of this node it refuted.",
            s.core.refutations,
        ),
        (
            "shoal_swim_declared_down_total",
            "counter",
            "Members this node declared down itself (its probe failed and the suspicion timed out).",
            s.core.declared_down,
        ),
        (
            "shoal_swim_local_health",
            "gauge",
            "Lifeguard local-health score (0 healthy; timers stretch by score + 1).",
            u64::from(s.core.local_health),
        ),
    ] {
        family(&mut o, name, kind, help);
        let _ = writeln!(o, "{name} {v}");
    }
    family(
        &mut o,
        "shoal_members",
        "gauge",
        "Cluster members by status, as seen by this agent.",
    );
    for st in [Status::Alive, Status::Suspect, Status::Down, Status::Left] {
        let n = members.get(&st).copied().unwrap_or(0);
        let _ = writeln!(o, "shoal_members{{status=\"{}\"}} {n}", st.as_str());
    }
    family(
        &mut o,
        "shoal_messages_in_total",
        "counter",
        "Valid frames received, by kind.",
    );
    for (k, v) in &s.core.msgs_in {
        let _ = writeln!(o, "shoal_messages_in_total{{kind=\"{k}\"}} {v}");
    }
    family(
        &mut o,
        "shoal_messages_out_total",
        "counter",
        "Frames sent, by kind.",
    );
    for (k, v) in &s.core.msgs_out {
        let _ = writeln!(o, "shoal_messages_out_total{{kind=\"{k}\"}} {v}");
    }
    family(
        &mut o,
        "shoal_bytes_in_total",
        "counter",
        "Bytes received over QUIC.",
    );
    let _ = writeln!(o, "shoal_bytes_in_total {}", net.bytes_in);
    family(
        &mut o,
        "shoal_bytes_out_total",
        "counter",
        "Bytes sent over QUIC.",
    );
    let _ = writeln!(o, "shoal_bytes_out_total {}", net.bytes_out);
    family(
        &mut o,
        "shoal_sync_rounds_total",
        "counter",
        "Anti-entropy rounds started.",
    );
    let _ = writeln!(o, "shoal_sync_rounds_total {}", s.core.sync_rounds);
    family(
        &mut o,
        "shoal_dropped_frames_total",
        "counter",
        "Frames or entries dropped, by reason.",
    );
    let mut dropped: BTreeMap<&str, u64> = s.core.dropped.iter().map(|(k, v)| (*k, *v)).collect();
    *dropped.entry("oversized").or_default() += net.oversized_streams;
    *dropped.entry("datagram_too_large").or_default() += net.datagrams_too_large;
    *dropped.entry("handshake_failed").or_default() += net.handshakes_failed;
    for reason in ["garbage", "version", "truncated", "malformed"] {
        dropped.entry(reason).or_default();
    }
    for (k, v) in &dropped {
        let _ = writeln!(o, "shoal_dropped_frames_total{{reason=\"{k}\"}} {v}");
    }
    family(
        &mut o,
        "shoal_handshakes_total",
        "counter",
        "QUIC/TLS handshakes by result.",
    );
    let _ = writeln!(
        o,
        "shoal_handshakes_total{{result=\"ok\"}} {}",
        net.handshakes_ok
    );
    let _ = writeln!(
        o,
        "shoal_handshakes_total{{result=\"failed\"}} {}",
        net.handshakes_failed
    );
    family(
        &mut o,
        "shoal_send_errors_total",
        "counter",
        "Sends that failed (peer unreachable, connection lost).",
    );
    let _ = writeln!(o, "shoal_send_errors_total {}", net.send_errors);
    family(
        &mut o,
        "shoal_kv_keys",
        "gauge",
        "Keys in the local replica, tombstones included.",
    );
    let _ = writeln!(o, "shoal_kv_keys {}", s.keys);
    family(
        &mut o,
        "shoal_persist_errors_total",
        "counter",
        "Failed writes to the state database.",
    );
    let _ = writeln!(o, "shoal_persist_errors_total {}", s.persist_errors);
    family(
        &mut o,
        "shoal_tombstones_collected_total",
        "counter",
        "Tombstones garbage-collected.",
    );
    let _ = writeln!(
        o,
        "shoal_tombstones_collected_total {}",
        s.core.tombstones_collected
    );
    family(
        &mut o,
        "shoal_steward_passes_total",
        "counter",
        "Reconcile passes this agent ran as a service's steward.",
    );
    let _ = writeln!(o, "shoal_steward_passes_total {}", s.steward_passes);
    family(
        &mut o,
        "shoal_steward_writes_total",
        "counter",
        "Allocation slot writes this agent made as a steward.",
    );
    let _ = writeln!(o, "shoal_steward_writes_total {}", s.steward_writes);
    family(
        &mut o,
        "shoal_allocations",
        "gauge",
        "Allocations this agent runs, by state.",
    );
    for (state, n) in &s.allocations {
        let _ = writeln!(o, "shoal_allocations{{state=\"{state}\"}} {n}");
    }
    render_scaling(&mut o, v);
    o
}

/// Desired replicas of every service and the autoscaler's decisions, from the
/// replicated state (every agent shows the same numbers).
fn render_scaling(o: &mut String, v: &Views) {
    let cluster = &v.state.cluster;
    family(
        o,
        "shoal_service_desired_replicas",
        "gauge",
        "Replicas each service should run (its scaler's count when autoscaled).",
    );
    for name in cluster.services.keys() {
        let _ = writeln!(
            o,
            "shoal_service_desired_replicas{{service=\"{}\"}} {}",
            label(name),
            cluster.desired_replicas(name)
        );
    }
    family(
        o,
        "shoal_scaler_decisions_total",
        "counter",
        "Replica count changes the autoscaler made, per service.",
    );
    for (name, st) in &cluster.scales {
        let _ = writeln!(
            o,
            "shoal_scaler_decisions_total{{service=\"{}\"}} {}",
            label(name),
            st.decisions
        );
    }
    family(
        o,
        "shoal_scaler_last_change_timestamp_seconds",
        "gauge",
        "When each autoscaled service's replica count last changed (Unix time).",
    );
    for (name, st) in &cluster.scales {
        if st.changed_ms > 0 {
            let _ = writeln!(
                o,
                "shoal_scaler_last_change_timestamp_seconds{{service=\"{}\"}} {:.3}",
                label(name),
                st.changed_ms as f64 / 1000.0
            );
        }
    }
}

/// A Prometheus label value, escaped.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The blob families: bytes served, fetched and held, blobs collected.
pub fn render_blobs(b: &super::blobs::BlobStatus) -> String {
    let mut o = String::new();
    for (name, kind, help, v) in [
        (
            "shoal_blob_served_bytes_total",
            "counter",
            "Blob chunk bytes sent to peers.",
            b.served_bytes,
        ),
        (
            "shoal_blob_fetched_bytes_total",
            "counter",
            "Blob chunk bytes received from peers.",
            b.fetched_bytes,
        ),
        (
            "shoal_blob_held_bytes",
            "gauge",
            "Bytes of the blobs this agent holds.",
            b.held_bytes,
        ),
        (
            "shoal_blob_collected_total",
            "counter",
            "Unreferenced blobs removed by garbage collection.",
            b.collected,
        ),
    ] {
        family(&mut o, name, kind, help);
        let _ = writeln!(o, "{name} {v}");
    }
    o
}

/// The discovery and DNS families: catalog generation and size, and (when DNS is on)
/// the server's counters.
pub fn render_discovery(
    resolver: &shoal_discovery::Resolver,
    dns: Option<&shoal_discovery::DnsStats>,
) -> String {
    let mut o = String::new();
    let c = resolver.catalog();
    family(
        &mut o,
        "shoal_discovery_generation",
        "gauge",
        "Generation of this agent's discovery catalog (moves on every change).",
    );
    let _ = writeln!(o, "shoal_discovery_generation {}", c.generation);
    family(
        &mut o,
        "shoal_discovery_endpoints",
        "gauge",
        "Healthy endpoints in this agent's discovery catalog, all services together.",
    );
    let n: usize = c.services.values().map(|s| s.endpoints.len()).sum();
    let _ = writeln!(o, "shoal_discovery_endpoints {n}");
    let Some(dns) = dns else {
        return o;
    };
    let k = dns.counts();
    family(
        &mut o,
        "shoal_dns_queries_total",
        "counter",
        "DNS queries received, by transport.",
    );
    let _ = writeln!(o, "shoal_dns_queries_total{{transport=\"udp\"}} {}", k.udp);
    let _ = writeln!(o, "shoal_dns_queries_total{{transport=\"tcp\"}} {}", k.tcp);
    family(
        &mut o,
        "shoal_dns_answers_total",
        "counter",
        "DNS answers sent, by response code.",
    );
    for (rcode, n) in shoal_discovery::server::RCODES.iter().zip(k.answers) {
        let _ = writeln!(o, "shoal_dns_answers_total{{rcode=\"{rcode}\"}} {n}");
    }
    family(
        &mut o,
        "shoal_dns_malformed_total",
        "counter",
        "DNS queries that could not be parsed (answered FORMERR).",
    );
    let _ = writeln!(o, "shoal_dns_malformed_total {}", k.malformed);
    family(
        &mut o,
        "shoal_dns_dropped_total",
        "counter",
        "DNS packets left unanswered (shorter than a header, or responses).",
    );
    let _ = writeln!(o, "shoal_dns_dropped_total {}", k.dropped);
    family(
        &mut o,
        "shoal_dns_truncated_total",
        "counter",
        "DNS answers too large for UDP, sent with TC set (the client retries over TCP).",
    );
    let _ = writeln!(o, "shoal_dns_truncated_total {}", k.truncated);
    o
}
