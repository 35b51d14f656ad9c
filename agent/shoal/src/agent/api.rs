//! The HTTP API (`/v1/...`), Prometheus metrics (`/metrics`) and the dashboard (`/`).
//!
//! Reads come from the agent loop's published [`Views`] and never queue behind
//! it; writes become [`Command`]s for the loop, answered once durable. Blob
//! listings and fetches go to the blob worker directly; plugin components are
//! validated here, on a blocking thread, before anything is stored.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use shoal_net::Net;
use shoal_policy::{PolicyError, PolicyHost, PolicyKind};
use shoal_runtime::{LogQuery, MAX_LOG_CHUNK};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::blobs::{BlobCmd, BlobStatus};
use super::commands::{Command, KvCommand, NodeCommand, PluginCommand, ServiceCommand};
use super::executor::Runtimes;
use super::http_guard::{self, HttpGuard};
use super::keys::{self, Binding};
use super::mesh_logs::{local_logs, AllocLogs, LogsCmd, LogsError};
use super::views::{LogTarget, Views};
use super::{wall_ms, ApiError};
use shoal_api::{ErrorView, LogsView, PsView, RequestBody, RollbackBody, ScaleBody};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Writes for the agent loop.
    pub tx: mpsc::Sender<Command>,
    /// The loop's latest published views.
    pub views: watch::Receiver<Arc<Views>>,
    /// Commands for the blob worker.
    pub blobs: mpsc::Sender<BlobCmd>,
    /// What the blob worker holds and fetches.
    pub blob_status: watch::Receiver<Arc<BlobStatus>>,
    /// The image task (pushes and pulls).
    pub images: mpsc::Sender<super::images::ImageCmd>,
    /// The policy host (validation and `plugin eval` run here, off the loop).
    pub host: Arc<PolicyHost>,
    /// The runtime drivers (logs of local allocations).
    pub runtimes: Runtimes,
    /// The transport (its counters for `/metrics`).
    pub net: Net,
    /// The logs task (logs of allocations on other nodes, over the mesh).
    pub logs: mpsc::Sender<LogsCmd>,
    /// The latest discovery catalog and its answers.
    pub discovery: watch::Receiver<Arc<shoal_discovery::Resolver>>,
    /// The DNS server's counters, when it runs.
    pub dns_stats: Option<Arc<shoal_discovery::DnsStats>>,
}

impl AppState {
    fn views(&self) -> Arc<Views> {
        self.views.borrow().clone()
    }
}

/// A JSON request body, decoded and checked by [`shoal_api::decode`] (the code
/// the `api_json` fuzz target runs); a refusal is a `400` naming what was wrong.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: RequestBody> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("reading the request body: {e}")))?;
        shoal_api::decode(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::BadRequest(e.to_string()))
    }
}

/// Largest plugin accepted by `POST /v1/plugins`.
pub const MAX_PLUGIN_BYTES: usize = 64 << 20;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
        };
        (
            code,
            Json(ErrorView {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

/// Sends a write to the loop and waits for its answer.
async fn ask<T>(
    tx: &mpsc::Sender<Command>,
    make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Command,
) -> Result<T, ApiError> {
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply))
        .await
        .map_err(|_| ApiError::Unavailable)?;
    rx.await.map_err(|_| ApiError::Unavailable)?
}

async fn nodes(State(app): State<AppState>) -> Response {
    Json(app.views().nodes()).into_response()
}

async fn node_drain_status(
    State(app): State<AppState>,
    Path(node): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(app.views().drain(&node)?).into_response())
}

/// `POST` (drain) and `DELETE` (undrain) `/v1/nodes/{name}/drain`.
async fn node_drain_set(app: AppState, node: String, on: bool) -> Result<Response, ApiError> {
    // Only a member can be drained: a typo must not mark a node nobody has.
    let mut view = app.views().drain(&node)?;
    let name = node.clone();
    let changed = ask(&app.tx, |reply| {
        Command::Node(NodeCommand::Drain {
            node: name,
            on,
            reply,
        })
    })
    .await?;
    if !on {
        view.left.clear();
    }
    view.draining = on;
    view.changed = Some(changed);
    Ok(Json(view).into_response())
}

async fn node_forget(
    State(app): State<AppState>,
    Path(node): Path<String>,
) -> Result<Response, ApiError> {
    let name = node.clone();
    ask(&app.tx, |reply| {
        Command::Node(NodeCommand::Forget { node: name, reply })
    })
    .await?;
    Ok(Json(serde_json::json!({ "node": node, "forgotten": true })).into_response())
}

async fn node_drain(
    State(app): State<AppState>,
    Path(node): Path<String>,
) -> Result<Response, ApiError> {
    node_drain_set(app, node, true).await
}

async fn node_undrain(
    State(app): State<AppState>,
    Path(node): Path<String>,
) -> Result<Response, ApiError> {
    node_drain_set(app, node, false).await
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    /// Internal records (read-only) instead of user kv.
    #[serde(default)]
    internal: bool,
}

async fn kv_list(State(app): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    Json(app.views().kv_list(&q.prefix, q.internal)).into_response()
}

async fn kv_get(
    State(app): State<AppState>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(app.views().kv_get(&key)?).into_response())
}

async fn kv_put(
    State(app): State<AppState>,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if let Some(why) = keys::refusal(&key) {
        return Err(ApiError::BadRequest(why));
    }
    if std::str::from_utf8(&body).is_err() {
        return Err(ApiError::BadRequest("value must be UTF-8 text".into()));
    }
    let value = Some(body.to_vec());
    let e = ask(&app.tx, |reply| {
        Command::Kv(KvCommand::Put { key, value, reply })
    })
    .await?;
    Ok(Json(shoal_api::KvView::of(&e)).into_response())
}

async fn kv_delete(
    State(app): State<AppState>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    if let Some(why) = keys::refusal(&key) {
        return Err(ApiError::BadRequest(why));
    }
    let k = key.clone();
    ask(&app.tx, |reply| {
        Command::Kv(KvCommand::Put {
            key: k,
            value: None,
            reply,
        })
    })
    .await?;
    Ok(Json(serde_json::json!({ "deleted": key })).into_response())
}

#[derive(Deserialize)]
struct InstallQuery {
    kind: String,
    name: Option<String>,
    service: Option<String>,
}

async fn plugin_install(
    State(app): State<AppState>,
    Query(q): Query<InstallQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let kind: PolicyKind = q
        .kind
        .parse()
        .map_err(|e: PolicyError| ApiError::BadRequest(e.to_string()))?;
    let name = q.name.unwrap_or_else(|| format!("{kind}-plugin"));
    let wasm = body.to_vec();
    let host = app.host.clone();
    let checked = wasm.clone();
    // Refuse a component of the wrong world (or not a component) before anything is stored.
    tokio::task::spawn_blocking(move || host.validate(kind, &checked))
        .await
        .map_err(|_| ApiError::Unavailable)?
        .map_err(|e| ApiError::BadRequest(format!("plugin refused: {e}")))?;
    let hash = blake3::hash(&wasm).to_hex().to_string();
    let size = wasm.len() as u64;
    let (reply, rx) = oneshot::channel();
    app.blobs
        .send(BlobCmd::Put { bytes: wasm, reply })
        .await
        .map_err(|_| ApiError::Unavailable)?;
    let blob = rx
        .await
        .map_err(|_| ApiError::Unavailable)?
        .map_err(|e| ApiError::Storage(format!("storing the plugin blob: {e}")))?;
    let binding = Binding {
        kind,
        service: q.service,
        name,
        blob: blob.to_string(),
        hash,
        size,
        installed_by: app.views().me.clone(),
        installed_ms: wall_ms(),
    };
    let b = ask(&app.tx, |reply| {
        Command::Plugin(PluginCommand::Bind { binding, reply })
    })
    .await?;
    Ok(Json(b).into_response())
}

#[derive(Deserialize)]
struct ScopeQuery {
    service: Option<String>,
}

async fn plugin_remove(
    State(app): State<AppState>,
    Path(kind): Path<String>,
    Query(q): Query<ScopeQuery>,
) -> Result<Response, ApiError> {
    let kind: PolicyKind = kind
        .parse()
        .map_err(|e: PolicyError| ApiError::BadRequest(e.to_string()))?;
    let service = q.service;
    ask(&app.tx, |reply| {
        Command::Plugin(PluginCommand::Unbind {
            kind,
            service,
            reply,
        })
    })
    .await?;
    Ok(Json(serde_json::json!({ "removed": kind })).into_response())
}

#[derive(Deserialize)]
struct AllQuery {
    #[serde(default)]
    all: bool,
}

async fn plugin_list(State(app): State<AppState>, Query(q): Query<AllQuery>) -> Response {
    Json(app.views().plugin_rows(q.all)).into_response()
}

async fn snapshot(State(app): State<AppState>) -> Response {
    Json(app.views().scheduler_snapshot()).into_response()
}

async fn metrics(State(app): State<AppState>) -> Response {
    let mut text = super::metrics::render(&app.views(), &app.net.stats());
    let resolver = app.discovery.borrow().clone();
    text.push_str(&super::metrics::render_discovery(
        &resolver,
        app.dns_stats.as_deref(),
    ));
    text.push_str(&super::metrics::render_blobs(&app.blob_status.borrow()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

/// Largest service spec accepted by `POST /v1/services`.
pub const MAX_SPEC_BYTES: usize = 1 << 20;

#[derive(Deserialize)]
struct DeployQuery {
    /// File name, for error messages.
    file: Option<String>,
}

async fn service_deploy(
    State(app): State<AppState>,
    Query(q): Query<DeployQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let file = q.file.unwrap_or_else(|| "spec".to_string());
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::BadRequest(format!("{file}: a service spec must be UTF-8 TOML")))?;
    let spec = shoal_orch::ServiceSpec::from_toml(&file, text)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let spec = Box::new(spec);
    let v = ask(&app.tx, |reply| {
        Command::Service(ServiceCommand::Deploy { spec, reply })
    })
    .await?;
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
struct EventsQuery {
    service: Option<String>,
}

async fn events(
    State(app): State<AppState>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    Ok(Json(app.views().events(q.service.as_deref())?).into_response())
}

#[derive(Deserialize)]
struct AllocsQuery {
    node: Option<String>,
}

async fn alloc_list(
    State(app): State<AppState>,
    Query(q): Query<AllocsQuery>,
) -> Result<Response, ApiError> {
    Ok(Json(app.views().allocs(q.node.as_deref())?).into_response())
}

async fn service_list(State(app): State<AppState>) -> Response {
    Json(app.views().services()).into_response()
}

async fn service_ps(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (service, slots) = app.views().ps(&name)?;
    Ok(Json(PsView { service, slots }).into_response())
}

async fn service_scale(
    State(app): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<ScaleBody>,
) -> Result<Response, ApiError> {
    let replicas = body.replicas;
    let v = ask(&app.tx, |reply| {
        Command::Service(ServiceCommand::Scale {
            name,
            replicas,
            reply,
        })
    })
    .await?;
    Ok(Json(v).into_response())
}

async fn service_history(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(app.views().history(&name)?).into_response())
}

async fn service_rollback(
    State(app): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<RollbackBody>,
) -> Result<Response, ApiError> {
    let to = body.to;
    let v = ask(&app.tx, |reply| {
        Command::Service(ServiceCommand::Rollback { name, to, reply })
    })
    .await?;
    Ok(Json(v).into_response())
}

async fn service_remove(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let v = ask(&app.tx, |reply| {
        Command::Service(ServiceCommand::Remove { name, reply })
    })
    .await?;
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
struct LogsQuery {
    slot: Option<u32>,
    tail: Option<usize>,
    offset: Option<u64>,
    limit: Option<usize>,
}

impl LogsQuery {
    fn query(&self) -> LogQuery {
        LogQuery {
            tail: self.tail,
            offset: self.offset,
            limit: self.limit.unwrap_or(MAX_LOG_CHUNK),
        }
    }
}

async fn alloc_logs(
    State(app): State<AppState>,
    Path(alloc_id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let v = local_logs(&app.runtimes, &alloc_id, q.query())
        .await
        .map_err(|e| match e {
            LogsError::NotFound(m) => ApiError::NotFound(m),
            LogsError::Failed(m) => ApiError::Storage(m),
        })?;
    Ok(Json(v).into_response())
}

/// How long an agent waits for a peer's logs answer (below the CLI's 10 s, so a
/// peer that does not answer is named rather than the whole request timing out).
const REMOTE_LOGS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn service_logs(
    State(app): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let targets = app.views().log_targets(&name, q.slot)?;
    // Every slot is asked at once; one that cannot answer is a row with its error,
    // not a failure of the whole answer.
    let reads = targets.into_iter().map(|t| {
        let app = app.clone();
        let query = q.query();
        async move {
            let logs = if t.local {
                local_logs(&app.runtimes, &t.alloc_id, query).await
            } else {
                remote_logs(&app, &t, query).await
            };
            let (text, next_offset, more, error) = match logs {
                Ok(l) => (l.text, l.next_offset, l.more, None),
                Err(e) => (
                    String::new(),
                    query.offset.unwrap_or(0),
                    false,
                    Some(e.to_string()),
                ),
            };
            LogsView {
                slot: t.slot,
                node: t.node,
                alloc_id: t.alloc_id,
                text,
                next_offset,
                more,
                error,
            }
        }
    });
    let out: Vec<LogsView> = futures_util::future::join_all(reads).await;
    Ok(Json(out).into_response())
}

/// Asks the agent running an allocation for its logs, over the mesh.
async fn remote_logs(
    app: &AppState,
    t: &LogTarget,
    query: LogQuery,
) -> Result<AllocLogs, LogsError> {
    if let Some(why) = &t.unreachable {
        return Err(LogsError::Failed(format!(
            "{why}: its logs cannot be read now"
        )));
    }
    let Some(to) = t.addr else {
        return Err(LogsError::Failed(format!(
            "node {} has no known address",
            t.node
        )));
    };
    let (reply, answer) = oneshot::channel();
    let cmd = LogsCmd::Fetch {
        to,
        alloc_id: t.alloc_id.clone(),
        query,
        reply,
    };
    if app.logs.send(cmd).await.is_err() {
        return Err(LogsError::Failed("agent is shutting down".into()));
    }
    match tokio::time::timeout(REMOTE_LOGS_TIMEOUT, answer).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(LogsError::Failed("agent is shutting down".into())),
        Err(_) => Err(LogsError::Failed(format!(
            "node {} did not answer within {}s",
            t.node,
            REMOTE_LOGS_TIMEOUT.as_secs()
        ))),
    }
}

async fn blob_list(State(app): State<AppState>) -> Response {
    Json(app.blob_status.borrow().blobs.clone()).into_response()
}

async fn blob_fetch(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let parsed: shoal_blob::BlobId = id
        .parse()
        .map_err(|e| ApiError::BadRequest(format!("blob id {id:?}: {e}")))?;
    let views = app.views();
    let held = app
        .blob_status
        .borrow()
        .blobs
        .iter()
        .any(|b| b.id == id && b.state == "held");
    if !held {
        let peers: Vec<String> = views
            .state
            .nodes
            .iter()
            .filter(|(n, r)| **n != views.me && r.blobs.contains(&id))
            .map(|(n, _)| n.clone())
            .collect();
        if peers.is_empty() {
            return Err(ApiError::NotFound(format!("no node advertises blob {id}")));
        }
        app.blobs
            .send(BlobCmd::Want { id: parsed, peers })
            .await
            .map_err(|_| ApiError::Unavailable)?;
    }
    Ok(Json(serde_json::json!({ "fetching": id })).into_response())
}

/// The API router, every route behind `guard`.
pub fn router(state: AppState, guard: HttpGuard) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/v1/nodes", get(nodes))
        .route(
            "/v1/nodes/{name}/drain",
            get(node_drain_status).post(node_drain).delete(node_undrain),
        )
        .route("/v1/nodes/{name}/forget", post(node_forget))
        .route("/v1/snapshot", get(snapshot))
        .route("/v1/kv", get(kv_list))
        .route("/v1/kv/{*key}", get(kv_get).put(kv_put).delete(kv_delete))
        .route(
            "/v1/plugins",
            get(plugin_list)
                .post(plugin_install)
                .layer(DefaultBodyLimit::max(MAX_PLUGIN_BYTES)),
        )
        .route("/v1/plugins/{kind}", delete(plugin_remove))
        .route(
            "/v1/services",
            get(service_list)
                .post(service_deploy)
                .layer(DefaultBodyLimit::max(MAX_SPEC_BYTES)),
        )
        .route(
            "/v1/services/{name}",
            get(service_ps).delete(service_remove),
        )
        .route("/v1/services/{name}/scale", post(service_scale))
        .route("/v1/services/{name}/rollback", post(service_rollback))
        .route("/v1/services/{name}/history", get(service_history))
        .route("/v1/events", get(events))
        .route("/v1/services/{name}/logs", get(service_logs))
        .route("/v1/allocs", get(alloc_list))
        .route("/v1/allocs/{id}/logs", get(alloc_logs))
        .merge(super::discovery::routes())
        .merge(super::image_api::routes())
        .route("/v1/blobs", get(blob_list))
        .route("/v1/blobs/{id}/fetch", post(blob_fetch))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(guard),
            http_guard::enforce,
        ))
}

/// Serves the API until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    guard: HttpGuard,
    stop: CancellationToken,
) {
    let app = router(state, guard);
    let res = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(e) = res {
        tracing::error!("HTTP API stopped: {e}");
    }
}
