//! The one way tests start the app server (the `kgs-consumer` binary that
//! serves keys over HTTP), and a handle to a running one.

use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tokio::process::{Child, Command};

use crate::env::{free_addr, workspace_binary, APP_SERVER_BIN};
use crate::http::{http_get, http_within, HTTP_TIMEOUT};
use crate::process::{Signal, EXIT_WAIT};

/// How long an app server may take to answer `/healthz` after its start.
pub const START_WAIT: Duration = Duration::from_secs(90);

/// An app server command line for a pool, with test-friendly settings.
#[derive(Debug)]
pub struct AppServerCmd {
    cmd: Command,
    addr: String,
}

impl AppServerCmd {
    /// The app server for pool `pool` in database `db` on the test servers,
    /// on a free loopback port; the group notices a dead member within 6 s,
    /// `GET /keys` waits 20 ms for a batch, logs at WARN (to stderr), stdin
    /// closed. The consumer group is the pool's default unless
    /// [`AppServerCmd::group`] says otherwise.
    pub fn new(db: &str, pool: &str) -> Result<Self> {
        Ok(Self::with_binary(
            &workspace_binary(APP_SERVER_BIN)?,
            db,
            pool,
            &free_addr()?,
        ))
    }

    /// [`AppServerCmd::new`] running the binary at `binary` on `addr`.
    pub fn with_binary(binary: &Path, db: &str, pool: &str, addr: &str) -> Self {
        let mut cmd = crate::process::kgs_command(binary, db, pool);
        cmd.env("KGS_HTTP_ADDR", addr)
            .env("KGS_KAFKA_SESSION_TIMEOUT", "6s")
            .env("KGS_KEY_WAIT", "20ms")
            .env("KGS_LOG", "warn");
        Self {
            cmd,
            addr: addr.to_owned(),
        }
    }

    /// Its HTTP address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Consumer group `group`.
    pub fn group(self, group: &str) -> Self {
        self.env("KGS_GROUP", group)
    }

    /// Instance id `instance` (recorded in its claims).
    pub fn instance(self, instance: &str) -> Self {
        self.env("KGS_INSTANCE_ID", instance)
    }

    /// Fixed buffer watermarks, in keys.
    pub fn watermarks(self, low: usize, high: usize) -> Self {
        self.env("KGS_BUFFER_LOW_WATERMARK", low.to_string())
            .env("KGS_BUFFER_HIGH_WATERMARK", high.to_string())
    }

    crate::process::command_builder!("the app server");

    /// Starts it and waits until `/healthz` answers.
    pub async fn start(self) -> Result<AppServer> {
        AppServer::start(self).await
    }
}

/// A running app server, killed when dropped.
#[derive(Debug)]
pub struct AppServer {
    child: Child,
    addr: String,
}

impl AppServer {
    /// Starts `cmd` and waits (up to [`START_WAIT`]) until `/healthz` answers 200.
    pub async fn start(cmd: AppServerCmd) -> Result<Self> {
        let addr = cmd.addr.clone();
        let server = Self {
            child: cmd.spawn()?,
            addr,
        };
        crate::wait_healthy(&server.addr, "/healthz", START_WAIT).await?;
        Ok(server)
    }

    /// Its HTTP address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `GET path`: `(status, body)`.
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(&self.addr, path).await
    }

    /// One key, or `None` on `503 no keys`.
    pub async fn key(&self) -> Result<Option<String>> {
        get_key(&self.addr, HTTP_TIMEOUT).await
    }

    /// Keys until `n` were served (polling every 50 ms while it has none),
    /// or fails after `timeout`.
    pub async fn keys(&self, n: usize, timeout: Duration) -> Result<Vec<String>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut keys = Vec::new();
        while keys.len() < n {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "{} served {} of {n} keys in {timeout:?}",
                self.addr,
                keys.len()
            );
            match self.key().await? {
                Some(k) => keys.push(k),
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        Ok(keys)
    }

    /// `DELETE /keys/{key}` (recycle), the key percent-encoded: `(status, body)`.
    pub async fn delete(&self, key: &str) -> Result<(u16, String)> {
        self.delete_with_token(key, None).await
    }

    /// [`AppServer::delete`] with `Authorization: Bearer <token>` if given.
    pub async fn delete_with_token(&self, key: &str, token: Option<&str>) -> Result<(u16, String)> {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|b| ("Authorization", b))
            .into_iter()
            .collect();
        let path = format!("/keys/{}", crate::http::percent_encode(key));
        crate::http::http_request(
            &self.addr,
            "DELETE",
            &path,
            &headers,
            crate::http::HTTP_TIMEOUT,
        )
        .await
    }

    /// The value of `series` (a name, with labels as printed) on `/metrics`;
    /// an error if it is not there.
    pub async fn metric(&self, series: &str) -> Result<f64> {
        let (_, text) = self.get("/metrics").await?;
        crate::metrics::series_value(&text, series)
            .with_context(|| format!("no series {series} on {}/metrics", self.addr))
    }

    /// Sends `signal` (`Term`: graceful, `Kill`: a crash) and waits for the
    /// exit status, up to [`EXIT_WAIT`].
    pub async fn stop(mut self, signal: Signal) -> Result<ExitStatus> {
        crate::process::stop(&mut self.child, signal, EXIT_WAIT)
            .await?
            .with_context(|| {
                format!(
                    "app server {} did not exit within {EXIT_WAIT:?} of SIG{}",
                    self.addr,
                    signal.name()
                )
            })
    }
}

/// `GET /keys` of the app server at `addr` within `timeout`: `Some(key)`
/// on 200, `None` on `503 no keys`, an error on anything else.
pub async fn get_key(addr: &str, timeout: Duration) -> Result<Option<String>> {
    match http_within(addr, "GET", "/keys", timeout).await? {
        (200, key) if !key.is_empty() => Ok(Some(key)),
        (503, _) => Ok(None),
        (status, body) => bail!("GET {addr}/keys: {status} {body:?}"),
    }
}
