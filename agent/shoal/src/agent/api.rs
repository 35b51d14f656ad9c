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
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use shoal_policy::{PolicyError, PolicyHost, PolicyKind};
use tokio::sync::{mpsc, oneshot};

use super::{ApiError, Command};
use crate::views::{ErrorView, KvView};

type Tx = mpsc::Sender<Command>;

/// What every handler can reach: the driver's command queue and the policy host
/// (validation compiles components without blocking the driver).
#[derive(Clone)]
pub struct AppState {
    tx: Tx,
    host: Arc<PolicyHost>,
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
}

async fn kv_list(State(tx): State<Tx>, Query(q): Query<ListQuery>) -> Result<Response, ApiError> {
    let prefix = q.prefix;
    let v = ask(&tx, |reply| Command::List { prefix, reply }).await?;
    Ok(Json(v.iter().map(KvView::of).collect::<Vec<_>>()).into_response())
}

async fn kv_get(State(tx): State<Tx>, Path(key): Path<String>) -> Result<Response, ApiError> {
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

/// The API router.
pub fn router(tx: Tx, host: Arc<PolicyHost>) -> Router {
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
        .with_state(AppState { tx, host })
}

/// Serves the API until `stop` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tx: Tx,
    host: Arc<PolicyHost>,
    stop: oneshot::Receiver<()>,
) {
    let app = router(tx, host);
    let res = axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = stop.await;
        })
        .await;
    if let Err(e) = res {
        tracing::error!("HTTP API stopped: {e}");
    }
}
