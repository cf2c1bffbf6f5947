//! Taking keys from a `KeyConsumer` embedded in the test, bounded in time.

use std::time::Duration;

use anyhow::{ensure, Result};
use kgs_consumer::KeyConsumer;

/// Takes keys from `c` until `n` were taken, or fails after `timeout`.
pub async fn take(c: &KeyConsumer, n: usize, timeout: Duration) -> Result<Vec<String>> {
    let mut taken = 0;
    take_until(c, &format!("{n} keys"), timeout, |k| {
        taken += usize::from(k.is_some());
        taken >= n
    })
    .await
}

/// Takes keys from `c` until `done` says stop, or fails after `timeout`
/// naming `what`. `done` is asked before the first take, then after every
/// key (given the key) and after every empty wait (given `None`).
pub async fn take_until<F>(
    c: &KeyConsumer,
    what: &str,
    timeout: Duration,
    mut done: F,
) -> Result<Vec<String>>
where
    F: FnMut(Option<&str>) -> bool,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut keys = Vec::new();
    if done(None) {
        return Ok(keys);
    }
    loop {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what} ({} keys taken)",
            keys.len()
        );
        match c.next_key_wait(Duration::from_millis(200)).await {
            Ok(k) => {
                let k = k.to_string();
                let stop = done(Some(&k));
                keys.push(k);
                if stop {
                    return Ok(keys);
                }
            }
            Err(kgs_consumer::Error::Empty) => {
                if done(None) {
                    return Ok(keys);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}
