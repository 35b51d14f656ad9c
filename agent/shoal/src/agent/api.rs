//! The HTTP API (`/v1/...`), Prometheus metrics (`/metrics`) and the dashboard (`/`).
//!
//! Handlers only translate HTTP to [`Command`]s for the driver task, which owns
//! all state; they never touch the core directly.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use shoal_policy::{PolicyError, PolicyHost, PolicyKind};
use shoal_runtime::{LogQuery, MAX_LOG_CHUNK};
use tokio::sync::{mpsc, oneshot};

use super::executor::Runtimes;
use super::http_guard::{self, HttpGuard};
use super::keys;
use super::{ApiError, Command};
use crate::views::{ErrorView, KvView, LogsView};

type Tx = mpsc::Sender<Command>;

/// What every handler can reach: the driver's command queue and the policy host
/// (validation compiles components without blocking the driver).
#[derive(Clone)]
pub struct AppState {
    tx: Tx,
    host: Arc<PolicyHost>,
    runtimes: Runtimes,
    /// This agent's API token, passed on when asking another agent for logs.
    token: Option<Arc<str>>,
}

impl axum::extract::FromRef<AppState> for Tx {
    fn from_ref(s: &AppState) -> Tx {
        s.tx.clone()
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
            ApiError::Unreachable(_) => StatusCode::BAD_GATEWAY,
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

async fn ask<T>(tx: &Tx, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, ApiError> {
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply))
        .await
        .map_err(|_| ApiError::Unavailable)?;
    rx.await.map_err(|_| ApiError::Unavailable)
}

async fn nodes(State(tx): State<Tx>) -> Result<Response, ApiError> {
    let v = ask(&tx, |reply| Command::Nodes { reply }).await?;
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    /// Internal records (read-only) instead of user kv.
    #[serde(default)]
    internal: bool,
}

async fn kv_list(State(tx): State<Tx>, Query(q): Query<ListQuery>) -> Result<Response, ApiError> {
    let (prefix, internal) = (q.prefix, q.internal);
    let v = ask(&tx, |reply| Command::List {
        prefix,
        internal,
        reply,
    })
    .await?;
    Ok(Json(v.iter().map(KvView::of).collect::<Vec<_>>()).into_response())
}

async fn kv_get(State(tx): State<Tx>, Path(key): Path<String>) -> Result<Response, ApiError> {
    if let Some(why) = keys::refusal(&key) {
        return Err(ApiError::BadRequest(why));
    }
    let k = key.clone();
    match ask(&tx, |reply| Command::Get { key: k, reply }).await? {
        Some(e) => Ok(Json(KvView::of(&e)).into_response()),
        None => Err(ApiError::NotFound(format!("key not found: {key}"))),
    }
}

async fn kv_put(
    State(tx): State<Tx>,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if std::str::from_utf8(&body).is_err() {
        return Err(ApiError::BadRequest("value must be UTF-8 text".into()));
    }
    let value = Some(body.to_vec());
    let e = ask(&tx, |reply| Command::Put { key, value, reply }).await??;
    Ok(Json(KvView::of(&e)).into_response())
}

async fn kv_delete(State(tx): State<Tx>, Path(key): Path<String>) -> Result<Response, ApiError> {
    if let Some(why) = keys::refusal(&key) {
        return Err(ApiError::BadRequest(why));
    }
    let k = key.clone();
    ask(&tx, |reply| Command::Put {
        key: k,
        value: None,
        reply,
    })
    .await??;
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
    let service = q.service;
    let b = ask(&app.tx, |reply| Command::InstallPlugin {
        kind,
        service,
        name,
        wasm,
        reply,
    })
    .await??;
    Ok(Json(b).into_response())
}

#[derive(Deserialize)]
struct ScopeQuery {
    service: Option<String>,
}

async fn plugin_remove(
    State(tx): State<Tx>,
    Path(kind): Path<String>,
    Query(q): Query<ScopeQuery>,
) -> Result<Response, ApiError> {
    let kind: PolicyKind = kind
        .parse()
        .map_err(|e: PolicyError| ApiError::BadRequest(e.to_string()))?;
    let service = q.service;
    ask(&tx, |reply| Command::RemovePlugin {
        kind,
        service,
        reply,
    })
    .await??;
    Ok(Json(serde_json::json!({ "removed": kind })).into_response())
}

#[derive(Deserialize)]
struct AllQuery {
    #[serde(default)]
    all: bool,
}

async fn plugin_list(
    State(tx): State<Tx>,
    Query(q): Query<AllQuery>,
) -> Result<Response, ApiError> {
    let all = q.all;
    let rows = ask(&tx, |reply| Command::Plugins { all, reply }).await?;
    Ok(Json(rows).into_response())
}

async fn snapshot(State(tx): State<Tx>) -> Result<Response, ApiError> {
    let s = ask(&tx, |reply| Command::Snapshot { reply }).await?;
    Ok(Json(s).into_response())
}

async fn metrics(State(tx): State<Tx>) -> Result<Response, ApiError> {
    let text = ask(&tx, |reply| Command::Metrics { reply }).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
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
    State(tx): State<Tx>,
    Query(q): Query<DeployQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let file = q.file.unwrap_or_else(|| "spec".to_string());
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::BadRequest(format!("{file}: a service spec must be UTF-8 TOML")))?;
    let spec = shoal_orch::ServiceSpec::from_toml(&file, text)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let spec = Box::new(spec);
    let v = ask(&tx, |reply| Command::Deploy { spec, reply }).await??;
    Ok(Json(v).into_response())
}

async fn service_list(State(tx): State<Tx>) -> Result<Response, ApiError> {
    let v = ask(&tx, |reply| Command::Services { reply }).await?;
    Ok(Json(v).into_response())
}

async fn service_ps(State(tx): State<Tx>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let v = ask(&tx, |reply| Command::Ps { name, reply }).await??;
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
struct ScaleBody {
    replicas: u32,
}

async fn service_scale(
    State(tx): State<Tx>,
    Path(name): Path<String>,
    Json(body): Json<ScaleBody>,
) -> Result<Response, ApiError> {
    let replicas = body.replicas;
    let v = ask(&tx, |reply| Command::Scale {
        name,
        replicas,
        reply,
    })
    .await??;
    Ok(Json(v).into_response())
}

async fn service_remove(
    State(tx): State<Tx>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let v = ask(&tx, |reply| Command::Remove { name, reply }).await??;
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

/// Logs of one allocation on this node: at most one chunk ([`MAX_LOG_CHUNK`]);
/// `more` says to ask again from `next_offset`.
#[derive(serde::Serialize, Deserialize)]
struct AllocLogs {
    text: String,
    next_offset: u64,
    #[serde(default)]
    more: bool,
}

async fn local_logs(
    runtimes: &Runtimes,
    alloc_id: &str,
    query: LogQuery,
) -> Result<AllocLogs, ApiError> {
    let Some((driver, _)) = runtimes.find(alloc_id).await else {
        return Err(ApiError::NotFound(format!(
            "no workload for allocation {alloc_id} on this node"
        )));
    };
    let chunk = driver
        .logs(alloc_id, query)
        .await
        .map_err(|e| ApiError::Storage(e.to_string()))?;
    Ok(AllocLogs {
        text: String::from_utf8_lossy(&chunk.bytes).into_owned(),
        next_offset: chunk.next_offset,
        more: chunk.more,
    })
}

async fn alloc_logs(
    State(app): State<AppState>,
    Path(alloc_id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let v = local_logs(&app.runtimes, &alloc_id, q.query()).await?;
    Ok(Json(v).into_response())
}

async fn service_logs(
    State(app): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let slot = q.slot;
    let targets = ask(&app.tx, |reply| Command::LogTargets { name, slot, reply }).await??;
    let mut out = Vec::new();
    for t in targets {
        let logs = if t.local {
            local_logs(&app.runtimes, &t.alloc_id, q.query()).await?
        } else {
            remote_logs(&t, q.query(), app.token.as_deref()).await?
        };
        out.push(LogsView {
            slot: t.slot,
            node: t.node,
            alloc_id: t.alloc_id,
            text: logs.text,
            next_offset: logs.next_offset,
            more: logs.more,
        });
    }
    Ok(Json(out).into_response())
}

/// Asks the agent running an allocation for its logs.
async fn remote_logs(
    t: &super::LogTarget,
    query: LogQuery,
    token: Option<&str>,
) -> Result<AllocLogs, ApiError> {
    let unreachable = |why: String| {
        ApiError::Unreachable(format!(
            "slot {} runs on node {}, whose API ({}) cannot be reached from this agent: {why}; point SHOAL_API at that node",
            t.slot,
            t.node,
            if t.api.is_empty() { "unknown" } else { &t.api }
        ))
    };
    if t.api.is_empty() {
        return Err(unreachable("it has not published its API address".into()));
    }
    let mut url = format!(
        "http://{}/v1/allocs/{}/logs?limit={}",
        t.api, t.alloc_id, query.limit
    );
    if let Some(o) = query.offset {
        url.push_str(&format!("&offset={o}"));
    }
    if let Some(n) = query.tail {
        url.push_str(&format!("&tail={n}"));
    }
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| unreachable(e.to_string()))?;
    let mut req = http.get(&url);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| unreachable(crate::client::root_cause(&e)))?;
    if !resp.status().is_success() {
        let code = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<ErrorView>(&body)
            .map(|e| e.error)
            .unwrap_or(body);
        return Err(if code == StatusCode::NOT_FOUND {
            ApiError::NotFound(msg)
        } else {
            unreachable(msg)
        });
    }
    resp.json::<AllocLogs>()
        .await
        .map_err(|e| unreachable(e.to_string()))
}

async fn blob_list(State(tx): State<Tx>) -> Result<Response, ApiError> {
    let v = ask(&tx, |reply| Command::Blobs { reply }).await?;
    Ok(Json(v).into_response())
}

async fn blob_fetch(State(tx): State<Tx>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id: shoal_blob::BlobId = id
        .parse()
        .map_err(|e| ApiError::BadRequest(format!("blob id {id:?}: {e}")))?;
    ask(&tx, |reply| Command::FetchBlob { id, reply }).await??;
    Ok(Json(serde_json::json!({ "fetching": id.to_string() })).into_response())
}

/// The API router, every route behind `guard`.
pub fn router(tx: Tx, host: Arc<PolicyHost>, runtimes: Runtimes, guard: HttpGuard) -> Router {
    let token = guard.token.clone();
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/v1/nodes", get(nodes))
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
        .route("/v1/services/{name}/logs", get(service_logs))
        .route("/v1/allocs/{id}/logs", get(alloc_logs))
        .route("/v1/blobs", get(blob_list))
        .route("/v1/blobs/{id}/fetch", post(blob_fetch))
        .with_state(AppState {
            tx,
            host,
            runtimes,
            token,
        })
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(guard),
            http_guard::enforce,
        ))
}

/// Serves the API until `stop` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tx: Tx,
    host: Arc<PolicyHost>,
    runtimes: Runtimes,
    guard: HttpGuard,
    stop: oneshot::Receiver<()>,
) {
    let app = router(tx, host, runtimes, guard);
    let res = axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = stop.await;
        })
        .await;
    if let Err(e) = res {
        tracing::error!("HTTP API stopped: {e}");
    }
}
