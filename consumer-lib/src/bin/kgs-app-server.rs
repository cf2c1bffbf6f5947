//! `kgs-app-server`: an app server (WAS) embedding `kgs-consumer`, built on
//! axum; the library's usage example, and a deliverable binary (cargo
//! feature `app-server`, so the library does not depend on axum or clap).
//!
//! - `GET /keys`: one key as plain text; `503 no keys` if none arrives
//!   within `--key-wait` (default 100 ms).
//! - `GET /keys?count=N` (1 ≤ N ≤ 1000): N distinct keys as a JSON array of
//!   strings, or fewer (at least one) if fewer are buffered (only an empty
//!   buffer is waited on, up to `--key-wait`); `503 no keys` if none
//!   arrives, `400` for a bad N.
//! - `DELETE /keys/{key}`: recycle a key the application no longer uses
//!   (`KeyConsumer::recycle_wait`): `200 recycled` once the producer put it
//!   back within `--recycle-wait`, else `202 accepted` (it still will);
//!   `400` a key not of the pool's format, `404` a key never handed out (or
//!   already recycled), `409` a key that cannot be recycled now; each with a
//!   one-line reason.
//! - `POST /keys/{key}`: take that key for a user (a vanity key; the admin
//!   token, as for recycle) if it was never handed out (`KeyConsumer::take_key`): `200 taken` once the
//!   producer decided within `--recycle-wait`, else `202 accepted`; `409`
//!   with the reason if it was handed out, reserved, blocked or asked for
//!   already; `400` for a key not of the pool's format.
//! - `GET /keys/config`: the `collStats` figures (count, size, avgObjSize,
//!   storageSize, totalIndexSize) of the pool's `keys` and `used_keys`, as JSON.
//! - `GET /keys/count`: keys left in `keys.<pool>` (a JSON number, from the
//!   collection's metadata count).
//! - `GET /metrics`: Prometheus text format (the consumer's metrics).
//! - `GET /healthz`: `ok`.
//! - SIGTERM or Ctrl-C: stop serving, then shut the consumer down, which
//!   hands its unused keys back (claims set to `returning`). The same, and
//!   exit 1 with one line, when Kafka refuses this client the group or the
//!   topic (a missing ACL).
//!
//! Run: `cargo run -p kgs-consumer --features app-server --bin kgs-app-server -- --pool <pool>`
//! (every flag also reads its `KGS_*` environment variable; see `--help`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::Router;
use clap::Parser;
use kgs_consumer::{Error, KeyConsumer, RecycleOutcome, VanityOutcome};
use kgs_schemas::duration;
use kgs_schemas::process::{init_logging, parse_name_value, shutdown_signal};
use prometheus::{Encoder, IntCounter, Registry, TextEncoder};
use tracing::{error, info};

/// kgs app server: hands out keys from a kgs pool over HTTP.
#[derive(Debug, Parser)]
#[command(
    name = "kgs-app-server",
    version,
    after_help = "Endpoints:
  GET /keys                one key (plain text); 503 no keys if none arrives within --key-wait
  GET /keys?count=N        N distinct keys (1 <= N <= 1000) as a JSON array, fewer if fewer are buffered
  DELETE /keys/{key}       recycle a handed-out key (admin token; back after the pool's quarantine)
  POST /keys/{key}         take that key for a user (a vanity key; admin token): 200 taken, 409 if it was
                           handed out, reserved, blocked or asked for already
  GET /keys/count          keys left in keys.<pool>;  GET /keys/config  collStats of the pool
  GET /metrics, /healthz   Prometheus metrics, liveness"
)]
struct Config {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KGS_KAFKA_BROKERS", default_value = kgs_consumer::config::DEFAULT_BROKERS)]
    kafka_brokers: String,
    /// MongoDB connection string.
    #[arg(long, env = "KGS_MONGODB_URI", hide_env_values = true, default_value = kgs_consumer::config::DEFAULT_MONGODB_URI)]
    mongodb_uri: String,
    /// MongoDB database of kgs.
    #[arg(long, env = "KGS_MONGODB_DB", default_value = kgs_consumer::config::DEFAULT_DATABASE)]
    mongodb_db: String,
    /// Pool to serve keys from.
    #[arg(long, env = "KGS_POOL")]
    pool: String,
    /// Consumer group (default the pool topic's name, `kgs.<pool>.<incarnation>`).
    #[arg(long, env = "KGS_GROUP")]
    group: Option<String>,
    /// Instance id recorded in claims (default `$HOSTNAME-<uuid>`).
    #[arg(long, env = "KGS_INSTANCE_ID")]
    instance_id: Option<String>,
    /// HTTP listen address.
    #[arg(long, env = "KGS_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    /// Resume fetching at or below this many buffered keys (fixed; by
    /// default 10,000 or 2 s of the hand-out rate, whichever is more).
    #[arg(long, env = "KGS_BUFFER_LOW_WATERMARK", requires = "high_watermark")]
    low_watermark: Option<usize>,
    /// Pause fetching at this many buffered keys (fixed; by default 50,000
    /// or 10 s of the hand-out rate, whichever is more, at most 500,000).
    #[arg(long, env = "KGS_BUFFER_HIGH_WATERMARK", requires = "low_watermark")]
    high_watermark: Option<usize>,
    /// Kafka session timeout: how soon the group notices a dead instance
    /// and gives its partitions to the others (default 45s, librdkafka's).
    #[arg(long, env = "KGS_KAFKA_SESSION_TIMEOUT", value_parser = duration::parse)]
    kafka_session_timeout: Option<Duration>,
    /// How long `GET /keys` waits for a batch when the buffer is empty
    /// (default 100ms).
    #[arg(long, env = "KGS_KEY_WAIT", value_parser = duration::parse)]
    key_wait: Option<Duration>,
    /// How long `DELETE /keys/{key}` waits for the producer to put the key
    /// back before answering `202 accepted` instead of `200 recycled`
    /// (default 1s).
    #[arg(long, env = "KGS_RECYCLE_WAIT", value_parser = duration::parse)]
    recycle_wait: Option<Duration>,
    /// Deprecated: `KGS_KAFKA_SESSION_TIMEOUT` in milliseconds.
    #[arg(long, env = "KGS_KAFKA_SESSION_TIMEOUT_MS", hide = true)]
    kafka_session_timeout_ms: Option<u64>,
    /// Deprecated: `KGS_KEY_WAIT` in milliseconds.
    #[arg(long, env = "KGS_KEY_WAIT_MS", hide = true)]
    key_wait_ms: Option<u64>,
    /// Deprecated: `KGS_RECYCLE_WAIT` in milliseconds.
    #[arg(long, env = "KGS_RECYCLE_WAIT_MS", hide = true)]
    recycle_wait_ms: Option<u64>,
    /// Bearer token that `DELETE /keys/{key}` (recycle) and `POST
    /// /keys/{key}` (vanity keys), the endpoints that change state,
    /// require: `Authorization: Bearer <token>`; at least 16 characters.
    /// Without one, they are served on loopback addresses only.
    #[arg(long, env = "KGS_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// File holding the admin token (a mounted secret), instead of
    /// `KGS_ADMIN_TOKEN`.
    #[arg(long, env = "KGS_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    admin_token_file: Option<std::path::PathBuf>,
    /// Serve recycle and vanity keys without a token on a non-loopback
    /// address: only on a network where every client may put keys back
    /// into circulation and take any key.
    #[arg(long, env = "KGS_INSECURE_ADMIN")]
    insecure_admin: bool,
    /// Extra librdkafka setting `name=value` (TLS, SASL, ...); repeatable;
    /// the environment variable takes a comma list. Settings the guarantees
    /// rely on are refused.
    #[arg(long = "kafka-option", env = "KGS_KAFKA_OPTIONS", hide_env_values = true, value_delimiter = ',', value_parser = parse_name_value)]
    kafka_options: Vec<(String, String)>,
}

impl Config {
    /// A duration setting: the flag or `KGS_*` variable in the duration
    /// grammar, else its deprecated `*_MS` form, else `default`.
    fn duration(
        given: Option<Duration>,
        deprecated_ms: Option<u64>,
        default: Duration,
    ) -> Duration {
        given
            .or(deprecated_ms.map(Duration::from_millis))
            .unwrap_or(default)
    }

    fn session_timeout(&self) -> Duration {
        Self::duration(
            self.kafka_session_timeout,
            self.kafka_session_timeout_ms,
            Duration::from_secs(45),
        )
    }

    /// The admin token in force, if any. Refuses a token too short to be
    /// secret, and a non-loopback address without one (unless
    /// `--insecure-admin`): anyone who can reach recycle can put a key that
    /// is still in use back into circulation, and the application would see
    /// it twice.
    fn admin_token(&self) -> anyhow::Result<Option<String>> {
        let token = match (&self.admin_token, &self.admin_token_file) {
            (Some(t), _) => Some(t.trim().to_owned()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the admin token file {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        match token {
            Some(t) if t.chars().count() < MIN_ADMIN_TOKEN => anyhow::bail!(
                "the admin token must have at least {MIN_ADMIN_TOKEN} characters (e.g. openssl rand -hex 24)"
            ),
            Some(t) => Ok(Some(t)),
            None if self.http_addr.ip().is_loopback() || self.insecure_admin => Ok(None),
            None => anyhow::bail!(
                "refusing to serve DELETE and POST /keys/{{key}} (recycle, vanity keys) on {}, not a loopback address, without an admin token: set KGS_ADMIN_TOKEN or KGS_ADMIN_TOKEN_FILE (or KGS_INSECURE_ADMIN=true on a network where every client may recycle)",
                self.http_addr
            ),
        }
    }
}

/// Shortest admin token accepted.
const MIN_ADMIN_TOKEN: usize = 16;

#[derive(Clone)]
struct AppState {
    keys: Arc<KeyConsumer>,
    registry: Registry,
    key_wait: Duration,
    recycle_wait: Duration,
    /// Required by recycle when set (`Authorization: Bearer <token>`).
    admin_token: Option<Arc<str>>,
    /// [`UNAUTHORIZED_TOTAL`].
    unauthorized: IntCounter,
}

/// Counter: state-changing requests refused for a missing or wrong admin token.
const UNAUTHORIZED_TOTAL: &str = "kgs_app_server_unauthorized_requests_total";

impl AppState {
    /// Whether the request may change state: no token configured, or the
    /// right one (compared in constant time).
    /// `401` (counted, logged) unless `headers` carry the admin token; for
    /// `what` (an admin operation) on `key`.
    fn refuse_unadmitted(&self, headers: &HeaderMap, key: &str, what: &str) -> Option<Response> {
        if self.admitted(headers) {
            return None;
        }
        self.unauthorized.inc();
        tracing::warn!(key, "{what} refused: no or a wrong admin token");
        Some(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                format!("{what} needs the admin token: Authorization: Bearer <token>\n"),
            )
                .into_response(),
        )
    }

    fn admitted(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.admin_token else {
            return true;
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        constant_time_eq(given.as_bytes(), expected.as_bytes())
    }
}

/// Equal bytes, in a time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[tokio::main]
async fn main() {
    let config = Config::parse();
    init_logging("info");
    if let Err(e) = run(config, shutdown_signal()).await {
        eprintln!("kgs-app-server: {e:#}");
        std::process::exit(1);
    }
}

/// Starts the consumer and the HTTP server; on `shutdown`, stops serving
/// and then returns the consumer's unused keys.
async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Checked before anything listens or joins the group.
    let admin_token = config.admin_token()?;
    // Bound first: a taken port fails before anything joins the group.
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    let session_ms = config.session_timeout().as_millis() as u64;
    let registry = Registry::new();
    let mut builder = KeyConsumer::builder()
        .brokers(&config.kafka_brokers)
        .mongodb_uri(&config.mongodb_uri)
        .database(&config.mongodb_db)
        .pool(&config.pool)
        .registry(registry.clone())
        .kafka_option("session.timeout.ms", session_ms.to_string())
        // librdkafka requires the heartbeat well inside the session timeout.
        .kafka_option(
            "heartbeat.interval.ms",
            (session_ms / 10).clamp(100, 3_000).to_string(),
        );
    if let (Some(low), Some(high)) = (config.low_watermark, config.high_watermark) {
        builder = builder.watermarks(low, high);
    }
    for (name, value) in &config.kafka_options {
        builder = builder.kafka_option(name, value);
    }
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
        registry: registry.clone(),
        key_wait: Config::duration(
            config.key_wait,
            config.key_wait_ms,
            Duration::from_millis(100),
        ),
        recycle_wait: Config::duration(
            config.recycle_wait,
            config.recycle_wait_ms,
            Duration::from_secs(1),
        ),
        admin_token: admin_token.map(Arc::from),
        unauthorized: {
            let c = IntCounter::new(
                UNAUTHORIZED_TOTAL,
                "State-changing requests refused for a missing or wrong admin token.",
            )?;
            registry.register(Box::new(c.clone()))?;
            c
        },
    };
    let app = Router::new()
        .route("/keys", get(next_key))
        .route("/keys/{key}", delete(recycle).post(take))
        // The static routes win over `{key}`: keys spelled like them are
        // recycled through these routes' DELETE.
        .route(
            "/keys/config",
            get(pool_config)
                .delete(|s, h| recycle_key(s, h, "config".to_owned()))
                .post(|s, h| take_key(s, h, "config".to_owned())),
        )
        .route(
            "/keys/count",
            get(keys_count)
                .delete(|s, h| recycle_key(s, h, "count".to_owned()))
                .post(|s, h| take_key(s, h, "count".to_owned())),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state);
    info!(addr = %listener.local_addr()?, pool = %config.pool, instance = keys.instance_id(), "app server listening");
    // Stop on a signal, or when Kafka refuses this client the group or
    // topic (a missing ACL): serving 503s for ever would hide it.
    let (why_tx, why_rx) = tokio::sync::oneshot::channel();
    let watched = Arc::clone(&keys);
    let stop = async move {
        let refusal = tokio::select! {
            () = shutdown => None,
            e = watched.refused() => Some(e),
        };
        let _ = why_tx.send(refusal);
    };
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
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
    if let Ok(Some(refusal)) = why_rx.await {
        return Err(refusal.into());
    }
    served
}

async fn next_key(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    match query.as_deref().and_then(parse_count) {
        None => {}
        Some(Ok(n)) => return next_keys(&state, n).await,
        Some(Err(why)) => return (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response(),
    }
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

/// The `N` of `count=N` in the query of `GET /keys`, if it has one (other
/// parameters, e.g. a cache buster, are ignored).
fn parse_count(query: &str) -> Option<Result<usize, String>> {
    let max = kgs_consumer::MAX_KEYS_PER_CALL;
    let value = query.split('&').find_map(|p| p.strip_prefix("count="))?;
    Some(match value.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "count must be a number from 1 to {max}, not {value:?}"
        )),
    })
}

/// `GET /keys?count=N`: the keys as a JSON array.
async fn next_keys(state: &AppState, n: usize) -> Response {
    // Fewer buffered than asked: answered at once with those. Keys once
    // taken are never held across a wait, which a client that goes away
    // would end, losing them. Only an empty buffer is waited on.
    let keys = match state.keys.next_keys(n) {
        Err(Error::Empty) => state.keys.next_keys_wait(n, state.key_wait).await,
        other => other,
    };
    match keys {
        Ok(keys) => {
            let keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
            json(&keys)
        }
        Err(Error::Empty) | Err(Error::ShutDown) => {
            (StatusCode::SERVICE_UNAVAILABLE, "no keys\n").into_response()
        }
        Err(e) => {
            error!(cause = %e, "next_keys failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "error\n").into_response()
        }
    }
}

/// `POST /keys/{key}` (percent-decoded, as for recycle).
async fn take(state: State<AppState>, headers: HeaderMap, Path(key): Path<String>) -> Response {
    take_key(state, headers, key).await
}

async fn take_key(State(state): State<AppState>, headers: HeaderMap, key: String) -> Response {
    let line = |status: StatusCode, text: String| (status, format!("{text}\n")).into_response();
    // Like recycle: each request costs the producer work and withdraws a
    // key for good, so it is for the application's backend, not its users.
    if let Some(refused) = state.refuse_unadmitted(&headers, &key, "a vanity key") {
        return refused;
    }
    match state.keys.take_key(&key, state.recycle_wait).await {
        Ok(VanityOutcome::Taken) => line(StatusCode::OK, "taken".to_owned()),
        Ok(VanityOutcome::Accepted { .. }) => line(StatusCode::ACCEPTED, "accepted".to_owned()),
        Err(e @ Error::BadKey { .. }) => line(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ Error::KeyTaken { .. }) => line(StatusCode::CONFLICT, e.to_string()),
        Err(e) => {
            error!(key, cause = %e, "take_key failed");
            line(
                StatusCode::SERVICE_UNAVAILABLE,
                "database unavailable".to_owned(),
            )
        }
    }
}

/// `DELETE /keys/{key}`; the key is percent-decoded (an alphabet may hold
/// `/`, `%` or `?`: send them as `%2F`, `%25`, `%3F`).
async fn recycle(state: State<AppState>, headers: HeaderMap, Path(key): Path<String>) -> Response {
    recycle_key(state, headers, key).await
}

async fn recycle_key(State(state): State<AppState>, headers: HeaderMap, key: String) -> Response {
    let line = |status: StatusCode, text: String| (status, format!("{text}\n")).into_response();
    if let Some(refused) = state.refuse_unadmitted(&headers, &key, "recycle") {
        return refused;
    }
    match state.keys.recycle_wait(&key, state.recycle_wait).await {
        Ok(RecycleOutcome::Done { .. }) => line(StatusCode::OK, "recycled".to_owned()),
        Ok(RecycleOutcome::Accepted { .. }) => line(StatusCode::ACCEPTED, "accepted".to_owned()),
        Ok(RecycleOutcome::Quarantined { until, .. }) => line(
            StatusCode::ACCEPTED,
            format!(
                "accepted, quarantined until {}",
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        ),
        Err(e @ Error::BadKey { .. }) => line(StatusCode::BAD_REQUEST, e.to_string()),
        Err(Error::NotRecyclable { refusal, .. }) if refusal.is_not_found() => {
            line(StatusCode::NOT_FOUND, refusal.to_string())
        }
        Err(Error::NotRecyclable { refusal, .. }) => {
            line(StatusCode::CONFLICT, refusal.to_string())
        }
        Err(e) => {
            error!(cause = %e, key, "recycle failed");
            line(StatusCode::INTERNAL_SERVER_ERROR, "error".to_owned())
        }
    }
}

async fn pool_config(State(state): State<AppState>) -> Response {
    match state.keys.pool_stats().await {
        Ok(stats) => json(&stats),
        Err(e) => {
            error!(cause = %e, "pool stats failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "error\n").into_response()
        }
    }
}

async fn keys_count(State(state): State<AppState>) -> Response {
    match state.keys.keys_left().await {
        Ok(n) => json(&n),
        Err(e) => {
            error!(cause = %e, "counting keys failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "error\n").into_response()
        }
    }
}

/// A JSON body (axum's `json` feature is not enabled; serde_json is there).
fn json(value: &impl serde::Serialize) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
