//! `shoal workload http`: a built-in workload for demos and tests without Docker.
//!
//! It serves `/` (a line naming the process), `/healthz` (200 while healthy; with
//! `--health-file`, only while that file exists), `/burn?ms=N` (spends N ms of CPU,
//! for autoscaling on CPU), `/sleep?ms=N` (holds the request N ms, for autoscaling
//! on a custom metric) and `/metrics` (Prometheus text: `requests_in_flight`, a
//! gauge of `/burn` and `/sleep` requests being served, and `requests_total`).
//! SIGTERM stops it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::Query;
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

/// Options of `shoal workload http`.
#[derive(Debug, clap::Args)]
pub struct HttpArgs {
    /// Port to listen on [default: $PORT, else 8080].
    #[arg(long, env = "PORT")]
    pub port: Option<u16>,
    /// Address to bind: 0.0.0.0 (or the node's address, $SHOAL_IP) to be reachable
    /// from other nodes; the default, loopback, serves this node only.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// Text `/` answers with [default: the service, slot and pid].
    #[arg(long)]
    pub message: Option<String>,
    /// `/healthz` answers 200 only while this file exists (503 otherwise), so a
    /// test or benchmark can make the replica healthy or unhealthy at will.
    #[arg(long, value_name = "FILE")]
    pub health_file: Option<std::path::PathBuf>,
}

#[derive(Deserialize)]
struct Burn {
    #[serde(default)]
    ms: u64,
}

/// Spends about `ms` milliseconds of CPU on this thread (capped at 10 s).
fn burn(ms: u64) -> u64 {
    let until = Instant::now() + Duration::from_millis(ms.min(10_000));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rounds = 0u64;
    while Instant::now() < until {
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        rounds += 1;
    }
    std::hint::black_box(x);
    rounds
}

/// Requests being served and served so far, for `/metrics`.
#[derive(Default)]
struct Load {
    in_flight: AtomicI64,
    total: AtomicU64,
}

/// Counts one request in flight until dropped.
struct InFlight(Arc<Load>);

impl InFlight {
    fn new(load: &Arc<Load>) -> InFlight {
        load.in_flight.fetch_add(1, Ordering::Relaxed);
        load.total.fetch_add(1, Ordering::Relaxed);
        InFlight(load.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves until SIGTERM or Ctrl-C.
pub async fn run(args: HttpArgs) -> anyhow::Result<()> {
    let port = args.port.unwrap_or(8080);
    let addr = SocketAddr::new(args.bind, port);
    let message = args.message.unwrap_or_else(|| {
        let svc = std::env::var("SHOAL_SERVICE").unwrap_or_else(|_| "workload".into());
        let slot = std::env::var("SHOAL_SLOT").unwrap_or_else(|_| "-".into());
        format!("hello from {svc} slot {slot} (pid {})", std::process::id())
    });
    let health_file = args.health_file;
    let load = Arc::new(Load::default());
    let app = Router::new()
        .route("/", get(move || async move { format!("{message}\n") }))
        .route(
            "/healthz",
            get(move || {
                let file = health_file.clone();
                async move {
                    match file {
                        Some(f) if !f.exists() => (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            format!("unhealthy: {} is missing\n", f.display()),
                        ),
                        _ => (axum::http::StatusCode::OK, "ok\n".to_string()),
                    }
                }
            }),
        )
        .route(
            "/burn",
            get({
                let load = load.clone();
                move |Query(b): Query<Burn>| async move {
                    let _busy = InFlight::new(&load);
                    let rounds = tokio::task::spawn_blocking(move || burn(b.ms))
                        .await
                        .unwrap_or(0);
                    format!("burned {} ms ({rounds} rounds)\n", b.ms)
                }
            }),
        )
        .route(
            "/sleep",
            get({
                let load = load.clone();
                move |Query(b): Query<Burn>| async move {
                    let _busy = InFlight::new(&load);
                    tokio::time::sleep(Duration::from_millis(b.ms.min(600_000))).await;
                    format!("slept {} ms\n", b.ms)
                }
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                format!(
                    "# HELP requests_in_flight Requests to /burn and /sleep being served.\n# TYPE requests_in_flight gauge\nrequests_in_flight {}\n# HELP requests_total Requests to /burn and /sleep served or being served.\n# TYPE requests_total counter\nrequests_total {}\n",
                    load.in_flight.load(Ordering::Relaxed),
                    load.total.load(Ordering::Relaxed)
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    eprintln!("workload http listening on {addr}");
    axum::serve(listener, app)
        .with_graceful_shutdown(crate::shutdown_signal())
        .await
        .context("serving HTTP")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burn_spends_about_the_time_asked() {
        let t = Instant::now();
        assert!(burn(30) > 0);
        assert!(t.elapsed() >= Duration::from_millis(30));
    }
}
