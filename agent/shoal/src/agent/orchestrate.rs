//! Orchestration off the agent loop: a thread that runs this node's
//! [`shoal_orch::NodeOrch`] pass over the latest published views.
//!
//! The loop asks for a pass ([`PassRequest`]) 100 ms after an orchestration key
//! changed and once a second anyway, never while one is running. The pass —
//! member table, settle gate, every stewarded service's reconcile through the
//! policy host (installed scheduler plugins place real replicas), rollout
//! statuses, the scalers of autoscaled services — runs here, where a slow scheduler or a thousand slots cannot delay
//! SWIM. Its writes go back to the loop ([`PassResult`]), which applies them. The
//! worker also hands the executor the set of allocations this node must run (a
//! `watch` of [`Desired`]), and, once the executor has adopted what it runs,
//! deletes this node's reports of allocations the executor does not have (left
//! from before a restart).
//!
//! The pass is the same code both simulators run (`shoal_orch::NodeOrch`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_orch::{
    report_key, NodeOrch, PassInput, Placed, RestartMode, RestartPolicy, RolloutStatus,
    ServiceSpec, Settle, Write,
};
use shoal_policy::PolicyHost;
use tokio::sync::{mpsc, watch};

use super::executor::{Desired, DesiredAlloc, Scrape, Unrunnable};
use super::views::Views;

/// A pass to run.
pub struct PassRequest {
    /// The state to decide from.
    pub views: Arc<Views>,
    /// Now (wall-clock ms).
    pub now_ms: u64,
    /// Alloc ids whose reports this node's executor published.
    pub own_reports: BTreeSet<String>,
    /// The executor has adopted what it runs and published its reports.
    pub executor_ready: bool,
}

/// What a pass decided.
pub struct PassResult {
    /// Writes for the loop to apply.
    pub writes: Vec<Write>,
    /// How long the pass took.
    pub took: Duration,
    /// Reconcile calls as steward so far.
    pub passes: u64,
    /// Steward writes so far.
    pub steward_writes: u64,
    /// What the pass reported for `shoal events`.
    pub events: Vec<shoal_orch::OrchEvent>,
}

/// The orchestration worker's state.
pub struct OrchWorker {
    orch: NodeOrch,
    host: Arc<PolicyHost>,
    desired: watch::Sender<Desired>,
    /// `PATH` for process workloads: the agent's own directory first, so a spec's
    /// `shoal workload http` runs this very binary.
    path_env: Option<String>,
    /// `SHOAL_NODE` and `SHOAL_IP` (the node's advertised address, which a workload
    /// binds to be reachable from other nodes), unless the spec sets them.
    node_env: [(String, String); 2],
}

impl OrchWorker {
    /// The worker of node `me`, started at `started_ms`.
    pub fn new(
        me: &str,
        started_ms: u64,
        has_seeds: bool,
        host: Arc<PolicyHost>,
        desired: watch::Sender<Desired>,
        endpoint_ip: std::net::IpAddr,
    ) -> Self {
        OrchWorker {
            orch: NodeOrch::new(me, started_ms, has_seeds, Settle::default()),
            host,
            desired,
            path_env: workload_path(),
            node_env: [
                ("SHOAL_NODE".to_string(), me.to_string()),
                ("SHOAL_IP".to_string(), endpoint_ip.to_string()),
            ],
        }
    }

    /// Runs passes until the request channel closes (call on a thread of its own).
    pub fn run(mut self, mut rx: mpsc::Receiver<PassRequest>, tx: mpsc::Sender<PassResult>) {
        while let Some(req) = rx.blocking_recv() {
            let result = self.pass(&req);
            if tx.blocking_send(result).is_err() {
                return;
            }
        }
    }

    fn pass(&mut self, req: &PassRequest) -> PassResult {
        let t = Instant::now();
        let views = &req.views;
        let me = self.orch.me().to_string();
        let membership = views.membership();
        let known = views.known_nodes();
        let facts = views.facts();
        let published: BTreeSet<String> = views
            .state
            .nodes
            .get(&me)
            .map(|r| r.rollouts.keys().cloned().collect())
            .unwrap_or_default();
        let input = PassInput {
            now_ms: req.now_ms,
            membership: &membership,
            known_nodes: &known,
            view: &views.state.cluster,
            tombstoned: &views.state.tombstoned,
            facts: &facts,
            published_rollouts: &published,
        };
        let host = self.host.clone();
        let mut scheduler = |snap: &shoal_policy::Snapshot,
                             reqs: &[shoal_policy::PlacementRequest]| {
            host.schedule(snap, reqs)
                .into_iter()
                .map(|o| Placed {
                    nodes: o.nodes,
                    unplaced: o.unplaced.map(|u| u.message),
                })
                .collect::<Vec<_>>()
        };
        // Scaler plugins run here too: on this thread, never on an async worker.
        let mut scaler = |scale_in: &shoal_policy::ScaleInput| {
            let s = host.scale_explained(scale_in);
            let mut decision = s.decision;
            if let Some(why) = s.fallback_reason {
                decision.reason = format!("{} ({why})", decision.reason);
            }
            shoal_orch::Recommendation {
                decision,
                by: s.decided_by,
            }
        };
        let mut out = self.orch.pass_with(&input, &mut scheduler, &mut scaler);
        for (service, status) in &out.rollouts {
            if let RolloutStatus::Stalled { reason } = status {
                tracing::warn!(service, "rollout stalled: {reason}");
            }
        }
        self.hand_to_executor(views, &out.assigned, out.settled);
        if out.settled && req.executor_ready {
            // Reports of this node the executor does not have: left from before a restart.
            for (id, reported) in views.state.cluster.reports.values().flat_map(|r| r.iter()) {
                if reported.node == me && !req.own_reports.contains(id) {
                    out.writes.push(Write::Delete {
                        key: report_key(&me, id),
                    });
                }
            }
        }
        PassResult {
            writes: out.writes,
            took: t.elapsed(),
            passes: self.orch.passes,
            steward_writes: self.orch.writes,
            events: out.events,
        }
    }

    fn workload(
        &self,
        spec: &ServiceSpec,
        slot: u32,
        version: u64,
        alloc_id: &str,
    ) -> shoal_runtime::WorkloadSpec {
        let mut w = spec.to_workload(slot, version, alloc_id);
        for (k, v) in &self.node_env {
            w.env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        if let (shoal_runtime::WorkloadKind::Process { .. }, Some(path)) = (&w.kind, &self.path_env)
        {
            w.env.entry("PATH".into()).or_insert_with(|| path.clone());
        }
        w
    }

    fn hand_to_executor(&self, views: &Views, assigned: &[shoal_orch::Assigned], settled: bool) {
        let mut allocs = BTreeMap::new();
        for a in assigned {
            let p = &a.placement;
            let spec = views
                .state
                .cluster
                .services
                .get(&a.service)
                .and_then(|r| r.spec_for(p.version));
            let want = match spec {
                Some(spec) => DesiredAlloc {
                    workload: Ok(self.workload(spec, a.slot, p.version, &p.alloc_id)),
                    health: spec.health.clone(),
                    restart: spec.restart,
                    // Only what discovery can hand out needs to leave it first.
                    stop_delay: if spec.ports.is_empty() {
                        Duration::ZERO
                    } else {
                        spec.stop_delay
                    },
                    autoscaled: spec.autoscaling().map(|auto| Scrape {
                        metrics: auto.custom,
                        port: auto.metrics_port,
                        path: auto.metrics_path,
                    }),
                },
                None => DesiredAlloc {
                    workload: Err(Unrunnable {
                        service: a.service.clone(),
                        slot: a.slot,
                        version: p.version,
                        reason: format!(
                            "spec version {} of service {} is not known here",
                            p.version, a.service
                        ),
                    }),
                    health: None,
                    restart: RestartPolicy {
                        mode: RestartMode::Never,
                        backoff: Duration::ZERO,
                        backoff_max: Duration::ZERO,
                    },
                    stop_delay: Duration::ZERO,
                    autoscaled: None,
                },
            };
            allocs.insert(p.alloc_id.clone(), want);
        }
        let desired = Desired { allocs, settled };
        self.desired.send_if_modified(|d| {
            if *d == desired {
                false
            } else {
                *d = desired;
                true
            }
        });
    }
}

/// The agent's directory, then the agent's `PATH`.
fn workload_path() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.to_str()?.to_string();
    let rest = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    Some(format!("{dir}:{rest}"))
}
