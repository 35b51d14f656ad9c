//! `/v1/images`: push (streamed progress), list, remove.
//!
//! Pushes run on the image task ([`super::images`]); listings are built from the
//! published views (records, blob adverts, engine image lists, pulling replicas);
//! removal is a write through the loop.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use shoal_api::{PullBody, PushBody};
use shoal_core::Status;
use shoal_orch::AllocState;
use tokio::sync::mpsc;

use super::api::{AppState, JsonBody};
use super::commands::{Command, ImageCommand};
use super::images::{ImageCmd, PushEvent, PushRequest};
use super::ApiError;
use shoal_api::{ImageRemoved, ImageView, PullView};

/// The `/v1/images` routes.
pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/images", get(list).post(push))
        .route("/v1/images/{*reference}", axum::routing::delete(remove))
        .route("/v1/pulls", post(pull))
}

/// Starts a push; the answer is `application/x-ndjson`, one [`PushEvent`] per line,
/// ending with `done` or `error`.
async fn push(
    State(app): State<AppState>,
    JsonBody(body): JsonBody<PushBody>,
) -> Result<Response, ApiError> {
    let (tx, rx) = mpsc::channel::<PushEvent>(64);
    let req = PushRequest {
        reference: body.reference,
        to: body.to,
        replace: body.replace,
        events: Some(tx),
    };
    app.images
        .send(ImageCmd::Push(req))
        .await
        .map_err(|_| ApiError::Unavailable)?;
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

/// `POST /v1/pulls`.
/// Makes this node's engine hold a pushed image (what a replica start does), and
/// answers once it does: `shoal image pull` and the benchmark use it.
async fn pull(
    State(app): State<AppState>,
    JsonBody(PullBody { reference }): JsonBody<PullBody>,
) -> Result<Response, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    app.images
        .send(ImageCmd::Ensure {
            image: reference.clone(),
            reply: tx,
        })
        .await
        .map_err(|_| ApiError::Unavailable)?;
    rx.await
        .map_err(|_| ApiError::Unavailable)?
        .map_err(ApiError::Conflict)?;
    Ok(Json(serde_json::json!({ "pulled": reference })).into_response())
}

/// Every pushed image, with the nodes that hold it.
async fn list(State(app): State<AppState>) -> Response {
    let v = app.views.borrow().clone();
    let alive: std::collections::BTreeSet<&str> = v
        .members
        .iter()
        .filter(|(_, st)| matches!(st, Status::Alive | Status::Suspect))
        .map(|(id, _)| id.name.as_str())
        .collect();
    let mut out = Vec::new();
    for (reference, rec) in v.state.images.iter() {
        let blobs = rec.blobs();
        let mut holders = Vec::new();
        let mut partial = Vec::new();
        let mut engines = Vec::new();
        for (node, r) in &v.state.nodes {
            if !alive.contains(node.as_str()) {
                continue;
            }
            let held = blobs.iter().filter(|b| r.blobs.contains(*b)).count();
            if held == blobs.len() {
                holders.push(node.clone());
            } else if held > 0 {
                partial.push(node.clone());
            }
            if r.images.iter().any(|i| i == reference) {
                engines.push(node.clone());
            }
        }
        let mut pulling = Vec::new();
        for (service, reports) in v.state.cluster.reports.iter() {
            for rep in reports.values() {
                let r = &rep.report;
                if r.state != AllocState::Pulling {
                    continue;
                }
                let Some(spec_image) = v
                    .state
                    .cluster
                    .services
                    .get(service)
                    .and_then(|s| s.spec.image().map(str::to_string))
                else {
                    continue;
                };
                if shoal_image::normalize_reference(&spec_image)
                    .ok()
                    .as_deref()
                    != Some(reference.as_str())
                {
                    continue;
                }
                let [done, total] = r.pull_bytes.unwrap_or([0, 0]);
                if !pulling.iter().any(|p: &PullView| p.node == rep.node) {
                    pulling.push(PullView {
                        node: rep.node.clone(),
                        done,
                        total,
                    });
                }
            }
        }
        out.push(ImageView {
            reference: reference.clone(),
            id: rec.id.clone(),
            size: rec.size(),
            layers: rec.layers.len(),
            pushed_by: rec.pushed_by.clone(),
            pushed_ms: rec.pushed_ms,
            preheat: rec.preheat.as_ref().map(|p| p.to_string()),
            holders,
            partial,
            engines,
            pulling,
        });
    }
    Json(out).into_response()
}

/// Deletes an image record; its blobs are collected on every node after the grace.
async fn remove(
    State(app): State<AppState>,
    Path(reference): Path<String>,
) -> Result<Response, ApiError> {
    let reference = shoal_image::normalize_reference(&reference)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let v = app.views.borrow().clone();
    let users: Vec<String> = v
        .state
        .cluster
        .services
        .iter()
        .filter(|(_, s)| !s.deleted)
        .filter(|(_, s)| {
            s.spec
                .image()
                .and_then(|i| shoal_image::normalize_reference(i).ok())
                .as_deref()
                == Some(reference.as_str())
        })
        .map(|(n, _)| n.clone())
        .collect();
    let (reply, rx) = tokio::sync::oneshot::channel();
    app.tx
        .send(Command::Image(ImageCommand::Remove {
            reference: reference.clone(),
            reply,
        }))
        .await
        .map_err(|_| ApiError::Unavailable)?;
    rx.await.map_err(|_| ApiError::Unavailable)??;
    let warnings = if users.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "service{} {} still use{} it: nodes whose engine has it keep running it, other nodes can no longer fetch it",
            if users.len() == 1 { "" } else { "s" },
            users.join(", "),
            if users.len() == 1 { "s" } else { "" },
        )]
    };
    Ok(Json(ImageRemoved {
        removed: reference,
        warnings,
    })
    .into_response())
}
