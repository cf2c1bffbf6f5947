//! The HTTP endpoints of `run`: `/metrics` (Prometheus text), `/healthz`
//! (the process answers) and `/readyz` (leader, or a standby that reaches the
//! database; 503 while the lease state is unknown).

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::leader::lease::{LeaseCheck, LeaseState};
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
struct AppState {
    metrics: Metrics,
    lease: LeaseCheck,
}

/// The running HTTP server.
#[derive(Debug)]
pub struct HttpServer {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Binds `addr` (failing at start if it is taken) and serves in the background.
pub async fn spawn(addr: SocketAddr, metrics: Metrics, lease: LeaseCheck) -> Result<HttpServer> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {addr}: {e}")))?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .with_state(AppState { metrics, lease });
    let (stop, mut stop_rx) = watch::channel(false);
    tracing::info!(%addr, "HTTP server listening");
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.changed().await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(cause = %e, "HTTP server failed");
        }
    });
    Ok(HttpServer { stop, task })
}

impl HttpServer {
    /// Stops accepting and waits for in-flight requests.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn metrics_handler(State(state): State<AppState>) -> String {
    state.metrics.render()
}

async fn ready_handler(State(state): State<AppState>) -> (StatusCode, String) {
    match state.lease.state() {
        LeaseState::Leader { epoch, .. } => (StatusCode::OK, format!("leader epoch {epoch}\n")),
        LeaseState::Standby => (StatusCode::OK, "standby\n".to_owned()),
        LeaseState::Unknown => (
            StatusCode::SERVICE_UNAVAILABLE,
            "lease state unknown\n".to_owned(),
        ),
    }
}
