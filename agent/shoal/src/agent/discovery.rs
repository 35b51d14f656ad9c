//! The discovery task: turns each published [`Views`] into a discovery catalog and
//! publishes a fresh [`Resolver`] whenever the catalog's content changes.
//!
//! It owns nothing the loop owns: it reads the views `watch` and writes the resolver
//! `watch`, which the DNS server, `GET /v1/discover` and `/metrics` read without
//! waiting. Building a catalog is a pure function of the views
//! ([`shoal_discovery::Catalog::build`]); the policy's answers for every changed
//! service are then computed on a blocking thread (WebAssembly calls, which WASI
//! must not make on an async worker), so lookups never call a policy.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use shoal_discovery::{Catalog, CatalogSource, NodeEntry, Policy, Resolver};
use shoal_policy::{NodeStatus, PolicyKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::views::Views;

/// Every node's address, labels and status, from the views.
pub fn node_entries(v: &Views) -> BTreeMap<String, NodeEntry> {
    let mut out = BTreeMap::new();
    let labels = |name: &str| {
        v.state
            .nodes
            .get(name)
            .and_then(|r| r.info.as_ref())
            .map(|i| i.labels.clone())
            .unwrap_or_default()
    };
    let addrs: BTreeMap<&str, IpAddr> = v
        .members
        .iter()
        .map(|(id, _)| (id.name.as_str(), id.addr.ip()))
        .collect();
    for (name, status) in v.membership() {
        let ip = addrs.get(name.as_str()).copied().or_else(|| {
            v.state
                .nodes
                .get(&name)
                .and_then(|r| r.info.as_ref())
                .and_then(|i| i.addr.parse::<std::net::SocketAddr>().ok())
                .map(|a| a.ip())
        });
        let Some(ip) = ip else { continue };
        let status = if v.state.nodes.get(&name).is_some_and(|r| r.left) {
            NodeStatus::Left
        } else {
            status
        };
        out.insert(
            name.clone(),
            NodeEntry {
                ip,
                labels: labels(&name),
                status,
            },
        );
    }
    out
}

/// A number that changes whenever this agent's discovery plugins change.
fn policy_epoch(v: &Views) -> u64 {
    let mut h = DefaultHasher::new();
    for row in v.local_plugins.iter() {
        if row.kind == PolicyKind::Discovery {
            (&row.service, &row.hash, &row.state).hash(&mut h);
        }
    }
    h.finish()
}

/// The catalog `views` give.
pub fn catalog_of(v: &Views) -> Catalog {
    let nodes = node_entries(v);
    Catalog::build(&CatalogSource {
        me: &v.me,
        cluster: &v.state.cluster,
        nodes: &nodes,
        policy_epoch: policy_epoch(v),
    })
}

/// Runs until `stop`: rebuilds the catalog on every new `Views`, publishing a new
/// resolver through `out` when its content changed.
pub async fn run(
    mut views: watch::Receiver<Arc<Views>>,
    policy: Arc<dyn Policy>,
    out: watch::Sender<Arc<Resolver>>,
    stop: CancellationToken,
) {
    let mut current = Catalog::default();
    loop {
        let v = views.borrow_and_update().clone();
        if let Some(next) = current.next(catalog_of(&v)) {
            let built_from = next.clone();
            let (policy, previous) = (policy.clone(), out.borrow().clone());
            let built = tokio::task::spawn_blocking(move || {
                Resolver::build(next, &*policy, Some(&previous))
            })
            .await;
            match built {
                Ok(r) => {
                    current = built_from;
                    out.send_replace(Arc::new(r));
                }
                Err(e) => tracing::error!("building the discovery answers failed: {e}"),
            }
        }
        tokio::select! {
            r = views.changed() => if r.is_err() { return },
            () = stop.cancelled() => return,
        }
    }
}

/// Longest a `GET /v1/discover?index=N` waits for a newer generation.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(300);
/// Its default wait.
const DEFAULT_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(serde::Deserialize)]
struct WaitQuery {
    /// Answer once the generation is greater than this (0: at once).
    #[serde(default)]
    index: u64,
    /// How long to wait for that (`30s`, `5m`; at most 5 minutes).
    wait: Option<String>,
}

/// `/v1/discover` routes, answered from the latest resolver.
pub fn routes() -> axum::Router<super::api::AppState> {
    use axum::routing::get;
    axum::Router::new()
        .route("/v1/discover", get(discover_all))
        .route("/v1/discover/{svc}", get(discover_one))
        .route("/v1/discover/{svc}/input", get(discover_input))
}

/// The answer of every service; with `index`, a blocking query (as Consul's) that
/// returns once the catalog generation passes it or `wait` runs out. The generation
/// is also in the `X-Shoal-Index` header.
async fn discover_all(
    axum::extract::State(app): axum::extract::State<super::api::AppState>,
    axum::extract::Query(q): axum::extract::Query<WaitQuery>,
) -> Result<axum::response::Response, super::ApiError> {
    use axum::response::IntoResponse;
    let wait = match q.wait.as_deref() {
        None => DEFAULT_WAIT,
        Some(w) => shoal_orch::parse_duration_ms(w)
            .map(std::time::Duration::from_millis)
            .filter(|d| *d <= MAX_WAIT)
            .ok_or_else(|| {
                super::ApiError::BadRequest(format!(
                    "wait {w:?} is not a duration of at most 5m (like 30s)"
                ))
            })?,
    };
    let mut rx = app.discovery.clone();
    if q.index > 0 {
        let _ = tokio::time::timeout(wait, async {
            while rx.borrow_and_update().generation() <= q.index {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }
    let resolver = rx.borrow().clone();
    let view = shoal_discovery::CatalogView::of(&resolver);
    Ok((
        [("x-shoal-index", view.generation.to_string())],
        axum::Json(view),
    )
        .into_response())
}

fn resolver_of(app: &super::api::AppState) -> Arc<Resolver> {
    app.discovery.borrow().clone()
}

/// One service's answer for this agent's node.
async fn discover_one(
    axum::extract::State(app): axum::extract::State<super::api::AppState>,
    axum::extract::Path(svc): axum::extract::Path<String>,
) -> Result<axum::Json<shoal_discovery::LookupView>, super::ApiError> {
    let r = resolver_of(&app);
    let answer = r
        .lookup(&svc)
        .ok_or_else(|| super::ApiError::NotFound(format!("no service named {svc}")))?;
    Ok(axum::Json(shoal_discovery::LookupView {
        generation: r.generation(),
        caller: r.catalog().caller.clone(),
        answer: shoal_discovery::AnswerView::of(&answer),
    }))
}

/// What the discovery policy is given for `svc` here (for `shoal plugin eval`).
async fn discover_input(
    axum::extract::State(app): axum::extract::State<super::api::AppState>,
    axum::extract::Path(svc): axum::extract::Path<String>,
) -> Result<axum::Json<shoal_policy::DiscoveryInput>, super::ApiError> {
    resolver_of(&app)
        .policy_input(&svc)
        .map(axum::Json)
        .ok_or_else(|| super::ApiError::NotFound(format!("no service named {svc}")))
}
