//! `shoal workload http`: a built-in workload for demos and tests without Docker.
//!
//! It serves `/` (a line naming the process), `/healthz` (200 while healthy)
//! and `/burn?ms=N` (spends N ms of CPU, for autoscaling). SIGTERM stops it.

use std::net::SocketAddr;
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
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// Text `/` answers with [default: the service, slot and pid].
    #[arg(long)]
    pub message: Option<String>,
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

/// Serves until SIGTERM or Ctrl-C.
pub async fn run(args: HttpArgs) -> anyhow::Result<()> {
    let port = args.port.unwrap_or(8080);
    let addr = SocketAddr::new(args.bind, port);
    let message = args.message.unwrap_or_else(|| {
        let svc = std::env::var("SHOAL_SERVICE").unwrap_or_else(|_| "workload".into());
        let slot = std::env::var("SHOAL_SLOT").unwrap_or_else(|_| "-".into());
        format!("hello from {svc} slot {slot} (pid {})", std::process::id())
    });
    let app = Router::new()
        .route("/", get(move || async move { format!("{message}\n") }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/burn",
            get(|Query(b): Query<Burn>| async move {
                let rounds = tokio::task::spawn_blocking(move || burn(b.ms))
                    .await
                    .unwrap_or(0);
                format!("burned {} ms ({rounds} rounds)\n", b.ms)
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
