//! Handing keys out: the app's calls, served from the local buffer
//! ([`crate::buffer`]) with no lock, no allocation and no round trip.

use std::time::Duration;

use crate::{Error, Key, KeyConsumer, Result};

/// Most keys one bulk call takes ([`KeyConsumer::next_keys`],
/// [`KeyConsumer::next_keys_wait`], the app server's `GET /keys?count=N`):
/// a bound on what one caller can drain from a buffer that serves many.
pub const MAX_KEYS_PER_CALL: usize = 1_000;

impl KeyConsumer {
    /// Takes one key from the local buffer. Never waits: returns
    /// [`Error::Empty`] when no key is buffered, [`Error::ShutDown`] after
    /// shutdown. Takes no lock and allocates nothing.
    #[inline]
    pub fn next_key(&self) -> Result<Key> {
        match self.shared.buffer.next_key() {
            Some(key) => Ok(key),
            None => Err(self.no_key()),
        }
    }

    #[cold]
    fn no_key(&self) -> Error {
        if self.shared.buffer.is_closed() {
            Error::ShutDown
        } else {
            self.shared.metrics.empty.inc();
            Error::Empty
        }
    }

    /// Takes one key, waiting up to `timeout` for a batch to arrive if the
    /// buffer is empty. [`Error::Empty`] on timeout.
    pub async fn next_key_wait(&self, timeout: Duration) -> Result<Key> {
        if let Some(key) = self.shared.buffer.next_key() {
            return Ok(key);
        }
        // The one wait of both calls: a key came, or the error.
        Ok(self.next_keys_wait(1, timeout).await?[0])
    }

    /// Takes up to `n` keys from the local buffer without waiting, each
    /// distinct and handed out once like a key of [`KeyConsumer::next_key`]:
    /// `n` when that many are buffered, else all there are (at least one).
    /// [`Error::Empty`] when none is buffered, [`Error::ShutDown`] after
    /// shutdown, [`Error::Count`] unless `1 <= n <=` [`MAX_KEYS_PER_CALL`].
    pub fn next_keys(&self, n: usize) -> Result<Vec<Key>> {
        check_count(n)?;
        let mut keys = Vec::with_capacity(n);
        self.fill(&mut keys, n);
        if keys.is_empty() {
            return Err(self.no_key());
        }
        Ok(keys)
    }

    /// Takes `n` keys, waiting up to `timeout` for batches while fewer are
    /// buffered. When the time is up it returns the keys taken so far (at
    /// least one; keys once taken are never put back into the buffer, so a
    /// partial answer is not discarded), or [`Error::Empty`] if there were
    /// none. Errors as [`KeyConsumer::next_keys`].
    pub async fn next_keys_wait(&self, n: usize, timeout: Duration) -> Result<Vec<Key>> {
        check_count(n)?;
        let mut keys = Vec::with_capacity(n);
        self.fill(&mut keys, n);
        if keys.len() == n {
            return Ok(keys);
        }
        let m = &self.shared.metrics;
        m.waits.inc();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register for the wake-up before looking, so a batch buffered in
            // between is not missed.
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            self.fill(&mut keys, n);
            if keys.len() == n {
                return Ok(keys);
            }
            let closed = self.shared.buffer.is_closed();
            if closed || tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return match (keys.is_empty(), closed) {
                    (false, _) => Ok(keys),
                    (true, true) => Err(Error::ShutDown),
                    (true, false) => {
                        m.wait_timeouts.inc();
                        Err(Error::Empty)
                    }
                };
            }
        }
    }

    /// Moves keys from the buffer into `keys` until it holds `n` or the
    /// buffer is empty.
    fn fill(&self, keys: &mut Vec<Key>, n: usize) {
        while keys.len() < n {
            match self.shared.buffer.next_key() {
                Some(key) => keys.push(key),
                None => return,
            }
        }
    }
}

fn check_count(n: usize) -> Result<()> {
    if (1..=MAX_KEYS_PER_CALL).contains(&n) {
        Ok(())
    } else {
        Err(Error::Count {
            requested: n,
            max: MAX_KEYS_PER_CALL,
        })
    }
}
