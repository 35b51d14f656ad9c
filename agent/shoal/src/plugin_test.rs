//! `shoal plugin test`: runs a policy component on recorded inputs and checks the
//! expected answers, like `opa test`, with no cluster.
//!
//! A cases file is JSON: `{"kind": K, "snapshot": S, "cases": [...]}` where each
//! case has a `name`, its input (`request` and optionally its own `snapshot` for a
//! scheduler, `input` for a scaler or discovery policy) and an `expect`. The
//! component runs in the same host the agent uses, so a case fails when the agent
//! would not use the component's answer (an error, a trap, a timeout, an answer out
//! of bounds) unless the case expects that with `error`. Unknown fields are refused,
//! so a misspelt expectation cannot pass silently.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shoal_policy::{
    DecidedBy, DiscoveryInput, HostConfig, PlacementRequest, PolicyHost, PolicyKind, ScaleInput,
    Snapshot,
};

use crate::plugin_cli::{off_runtime, read_json, read_wasm};

/// The name the component is installed under for the run.
const UNDER_TEST: &str = "under-test";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesFile {
    /// The world the cases are for; checked against `--kind` when given.
    #[serde(default)]
    kind: Option<String>,
    /// A snapshot shared by the scheduler cases that have none of their own.
    #[serde(default)]
    snapshot: Option<Snapshot>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    snapshot: Option<Snapshot>,
    #[serde(default)]
    request: Option<PlacementRequest>,
    #[serde(default)]
    input: Option<serde_json::Value>,
    expect: Expect,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Expect {
    /// Scheduler: exactly these nodes, in order. Discovery: the endpoints' nodes, in order.
    nodes: Option<Vec<String>>,
    /// Scheduler: this many replicas placed.
    placed: Option<usize>,
    /// Scheduler: some replicas unplaced, the reason containing this.
    unplaced: Option<String>,
    /// Scaler: this many replicas.
    replicas: Option<u32>,
    /// Scaler: the reason containing this.
    reason: Option<String>,
    /// Discovery: this many endpoints.
    count: Option<usize>,
    /// Any: the component's answer is not used, the reason containing this.
    error: Option<String>,
}

/// One case's result.
#[derive(Debug, Serialize)]
pub struct CaseResult {
    /// The case's name.
    pub name: String,
    /// Whether every expectation held.
    pub passed: bool,
    /// What did not hold (empty when passed).
    pub detail: String,
}

/// Checks the expectations that apply; `got_error` is why the component's answer
/// was not used, if it was not.
struct Check {
    problems: Vec<String>,
}

impl Check {
    fn new() -> Check {
        Check {
            problems: Vec::new(),
        }
    }
    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, want: Option<T>, got: T) {
        if let Some(w) = want {
            if w != got {
                self.problems
                    .push(format!("{what}: expected {w:?}, got {got:?}"));
            }
        }
    }
    fn contains(&mut self, what: &str, want: Option<&str>, got: Option<&str>) {
        if let Some(w) = want {
            match got {
                Some(g) if g.contains(w) => {}
                Some(g) => self
                    .problems
                    .push(format!("{what}: expected it to contain {w:?}, got {g:?}")),
                None => self
                    .problems
                    .push(format!("{what}: expected {w:?}, got none")),
            }
        }
    }
}

/// Runs every case of `cases` on the component in `file`.
pub async fn run(kind: PolicyKind, file: &Path, cases: &Path) -> anyhow::Result<Vec<CaseResult>> {
    let spec: CasesFile = read_json(cases, "cases file")?;
    if let Some(k) = &spec.kind {
        if k != kind.as_str() {
            bail!("{} holds {k} cases, not {kind} ones", cases.display());
        }
    }
    if spec.cases.is_empty() {
        bail!("{} has no cases", cases.display());
    }
    let wasm = read_wasm(file)?;
    let host = tokio::task::spawn_blocking(|| PolicyHost::new(HostConfig::default()))
        .await?
        .context("starting the policy host")?;
    let host = Arc::new(host);
    host.install(kind, None, UNDER_TEST, &wasm)
        .with_context(|| format!("loading {}", file.display()))?;
    let mut out = Vec::new();
    for case in spec.cases {
        let e = &case.expect;
        let checks = [
            e.nodes.is_some(),
            e.placed.is_some(),
            e.unplaced.is_some(),
            e.replicas.is_some(),
            e.reason.is_some(),
            e.count.is_some(),
            e.error.is_some(),
        ];
        if !checks.contains(&true) {
            bail!("case {:?} expects nothing: give it an `expect`", case.name);
        }
        let mut check = Check::new();
        let fallback = match kind {
            PolicyKind::Scheduler => {
                let snapshot = case
                    .snapshot
                    .clone()
                    .or_else(|| spec.snapshot.clone())
                    .with_context(|| {
                        format!("case {:?} has no snapshot (nor does the file)", case.name)
                    })?;
                let request = case
                    .request
                    .clone()
                    .with_context(|| format!("case {:?} has no `request`", case.name))?;
                let mut outcomes =
                    off_runtime(&host, move |h| h.schedule(&snapshot, &[request])).await?;
                let o = outcomes.pop().context("the host answered no outcome")?;
                check.eq("nodes", e.nodes.clone(), o.nodes.clone());
                check.eq("placed", e.placed, o.nodes.len());
                check.contains(
                    "unplaced",
                    e.unplaced.as_deref(),
                    o.unplaced.as_ref().map(|u| u.message.as_str()),
                );
                match o.decided_by {
                    DecidedBy::Plugin { .. } => o.fallback_reason,
                    _ => Some(
                        o.fallback_reason
                            .unwrap_or_else(|| "the built-in policy answered".into()),
                    ),
                }
            }
            PolicyKind::Scaler => {
                let input: ScaleInput = input_of(&case)?;
                let s = off_runtime(&host, move |h| h.scale_explained(&input)).await?;
                check.eq("replicas", e.replicas, s.decision.replicas);
                check.contains("reason", e.reason.as_deref(), Some(&s.decision.reason));
                s.fallback_reason.or_else(|| {
                    (s.decided_by != UNDER_TEST).then(|| format!("decided by {}", s.decided_by))
                })
            }
            PolicyKind::Discovery => {
                let input: DiscoveryInput = input_of(&case)?;
                let d = off_runtime(&host, move |h| h.discover_explained(&input)).await?;
                let nodes: Vec<String> = d
                    .endpoints
                    .iter()
                    .map(|w| w.endpoint.node.clone())
                    .collect();
                check.eq("count", e.count, nodes.len());
                check.eq("nodes", e.nodes.clone(), nodes);
                match d.decided_by {
                    DecidedBy::Plugin { .. } => d.fallback_reason,
                    _ => Some(
                        d.fallback_reason
                            .unwrap_or_else(|| "the built-in policy answered".into()),
                    ),
                }
            }
        };
        match (&e.error, &fallback) {
            (Some(_), _) => check.contains("error", e.error.as_deref(), fallback.as_deref()),
            (None, Some(why)) => check
                .problems
                .push(format!("the component's answer was not used: {why}")),
            (None, None) => {}
        }
        out.push(CaseResult {
            name: case.name,
            passed: check.problems.is_empty(),
            detail: check.problems.join("; "),
        });
    }
    Ok(out)
}

fn input_of<T: serde::de::DeserializeOwned>(case: &Case) -> anyhow::Result<T> {
    let v = case
        .input
        .clone()
        .with_context(|| format!("case {:?} has no `input`", case.name))?;
    serde_json::from_value(v).with_context(|| format!("case {:?}: `input` is not valid", case.name))
}
