//! An example app server (WAS) embedding `kgs-consumer`, built on axum.
//!
//! - `GET /keys`: one key as plain text; `503 no keys` if none arrives
//!   within `--key-wait` (default 100 ms).
//! - `GET /metrics`: Prometheus text format (the consumer's metrics).
//! - `GET /healthz`: `ok`.
//! - SIGTERM or Ctrl-C: stop serving, then shut the consumer down, which
//!   hands its unused keys back (claims set to `returning`).
//!
//! Run: `cargo run -p kgs-consumer --example app-server -- --pool <pool>`
//! (every flag also reads its `KGS_*` environment variable; see `--help`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clap::Parser;
use kgs_consumer::{Error, KeyConsumer};
use prometheus::{Encoder, Registry, TextEncoder};
use tracing::{error, info};

/// Example kgs app server: hands out keys from a kgs pool over HTTP.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Config {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KGS_KAFKA_BROKERS", default_value = kgs_consumer::config::DEFAULT_BROKERS)]
    kafka_brokers: String,
    /// MongoDB connection string.
    #[arg(long, env = "KGS_MONGODB_URI", default_value = kgs_consumer::config::DEFAULT_MONGODB_URI)]
    mongodb_uri: String,
    /// MongoDB database of kgs.
    #[arg(long, env = "KGS_MONGODB_DB", default_value = kgs_consumer::config::DEFAULT_DATABASE)]
    mongodb_db: String,
    /// Pool to serve keys from.
    #[arg(long, env = "KGS_POOL")]
    pool: String,
    /// Consumer group (default `kgs.<pool>`).
    #[arg(long, env = "KGS_GROUP")]
    group: Option<String>,
    /// Instance id recorded in claims (default `$HOSTNAME-<uuid>`).
    #[arg(long, env = "KGS_INSTANCE_ID")]
    instance_id: Option<String>,
    /// HTTP listen address.
    #[arg(long, env = "KGS_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    /// Resume fetching at or below this many buffered keys.
    #[arg(long, env = "KGS_LOW_WATERMARK", default_value_t = kgs_consumer::config::DEFAULT_LOW_WATERMARK)]
    low_watermark: usize,
    /// Pause fetching at this many buffered keys.
    #[arg(long, env = "KGS_HIGH_WATERMARK", default_value_t = kgs_consumer::config::DEFAULT_HIGH_WATERMARK)]
    high_watermark: usize,
    /// Kafka session timeout: how soon the group notices a dead instance
    /// and gives its partitions to the others (librdkafka's default).
    #[arg(long, env = "KGS_KAFKA_SESSION_TIMEOUT_MS", default_value_t = 45_000)]
    kafka_session_timeout_ms: u64,
    /// How long `GET /keys` waits for a batch when the buffer is empty.
    #[arg(long, env = "KGS_KEY_WAIT_MS", default_value_t = 100)]
    key_wait_ms: u64,
}

#[derive(Clone)]
struct AppState {
    keys: Arc<KeyConsumer>,
    registry: Registry,
    key_wait: Duration,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = Config::parse();
    if let Err(e) = run(config, shutdown_signal()).await {
        eprintln!("app-server: {e:#}");
        std::process::exit(1);
    }
}

/// Starts the consumer and the HTTP server; on `shutdown`, stops serving
/// and then returns the consumer's unused keys.
async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let registry = Registry::new();
    let mut builder = KeyConsumer::builder()
        .brokers(&config.kafka_brokers)
        .mongodb_uri(&config.mongodb_uri)
        .database(&config.mongodb_db)
        .pool(&config.pool)
        .watermarks(config.low_watermark, config.high_watermark)
        .registry(registry.clone())
        .kafka_option(
            "session.timeout.ms",
            config.kafka_session_timeout_ms.to_string(),
        )
        // librdkafka requires the heartbeat well inside the session timeout.
        .kafka_option(
            "heartbeat.interval.ms",
            (config.kafka_session_timeout_ms / 10)
                .clamp(100, 3_000)
                .to_string(),
        );
    if let Some(group) = &config.group {
        builder = builder.group(group);
    }
    if let Some(id) = &config.instance_id {
        builder = builder.instance_id(id);
    }
    let keys = Arc::new(
        builder
            .build()
            .await
            .with_context(|| format!("starting the consumer of pool {:?}", config.pool))?,
    );
    let state = AppState {
        keys: Arc::clone(&keys),
        registry,
        key_wait: Duration::from_millis(config.key_wait_ms),
    };
    let app = Router::new()
        .route("/keys", get(next_key))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    info!(addr = %listener.local_addr()?, pool = %config.pool, instance = keys.instance_id(), "app server listening");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP");
    // Whatever ended the server, give the unused keys back.
    let report = keys
        .shutdown()
        .await
        .context("shutting the consumer down")?;
    info!(
        keys_returned = report.keys_returned,
        returning = report.batches_returning,
        drained = report.batches_drained,
        failed = report.failed.len(),
        "app server stopped"
    );
    served
}

async fn next_key(State(state): State<AppState>) -> Response {
    let key = match state.keys.next_key() {
        Err(Error::Empty) => state.keys.next_key_wait(state.key_wait).await,
        other => other,
    };
    match key {
        Ok(key) => ([(header::CONTENT_TYPE, "text/plain")], key.to_string()).into_response(),
        Err(Error::Empty) | Err(Error::ShutDown) => {
            (StatusCode::SERVICE_UNAVAILABLE, "no keys\n").into_response()
        }
        Err(e) => {
            error!(cause = %e, "next_key failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "error\n").into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            error!(cause = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                error!(cause = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("Ctrl-C received, shutting down"),
        () = terminate => info!("SIGTERM received, shutting down"),
    }
}
