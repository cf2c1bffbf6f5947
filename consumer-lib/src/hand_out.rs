//! Handing keys out: the app's calls, served from the local buffer
//! ([`crate::buffer`]) with no lock, no allocation and no round trip.

use std::time::Duration;

use crate::{Error, Key, KeyConsumer, Result};

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
        let m = &self.shared.metrics;
        m.waits.inc();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register for the wake-up before looking, so a batch buffered in
            // between is not missed.
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(key) = self.shared.buffer.next_key() {
                return Ok(key);
            }
            if self.shared.buffer.is_closed() {
                return Err(Error::ShutDown);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                m.wait_timeouts.inc();
                return Err(Error::Empty);
            }
        }
    }
}
