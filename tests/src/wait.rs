//! Bounded waits that say what they waited for.

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, Result};

/// Polls `check` every 100 ms until it returns `Some`, or fails after
/// `timeout` with a message naming `what` was waited for.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `addr` answers `GET path` with 200 (`/healthz` of a kgs
/// process, `/-/ready` of Prometheus); connection errors mean not yet.
pub async fn wait_healthy(addr: &str, path: &str, timeout: Duration) -> Result<()> {
    wait_for(&format!("{addr}{path}"), timeout, || async {
        Ok(crate::http_get(addr, path)
            .await
            .ok()
            .filter(|(s, _)| *s == 200)
            .map(|_| ()))
    })
    .await
}
