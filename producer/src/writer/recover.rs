//! Recovery: finishing every unfinished batch record of the pool, of this
//! leader or of an older epoch (adopted first), after a crash at any step.

use bson::doc;
use kgs_schemas::docs::{BatchRecord, BatchState};

use super::Writer;
use crate::error::{Error, Result};
use crate::store::find_all;

impl Writer<'_> {
    /// Finishes every unfinished batch of the pool; `partition` is where a
    /// batch that never got one is published. Returns how many were finished.
    ///
    /// A batch that fails (other than by losing the lease) is logged and
    /// counted, and the others are still finished: one record that cannot
    /// be published never blocks the pool. It is tried again at the next
    /// recovery pass.
    pub async fn recover(&self, partition: i32) -> Result<u64> {
        let epoch = self.lease.check()?;
        let unfinished: Vec<BatchRecord> = find_all(
            &self.store.batches,
            doc! { "pool": self.pool, "state": { "$in": [BatchState::Moving, BatchState::Moved] } },
            "find unfinished batches",
        )
        .await?;
        let mut finished = 0;
        for record in unfinished {
            if record.epoch > epoch {
                // A newer leader exists: this process must stop.
                return Err(Error::LeaseLost(self.pool.to_owned()));
            }
            let id = record.id.clone();
            match self.recover_one(record, epoch, partition).await {
                Ok(true) => finished += 1,
                Ok(false) => {}
                Err(e @ (Error::LeaseLost(_) | Error::Fenced(_))) => return Err(e),
                Err(e) => self.metrics.batch_not_recovered(&id, &e),
            }
        }
        Ok(finished)
    }

    /// Recovers one unfinished record (see [`Writer::recover`]); `false` if
    /// it changed meanwhile and the next pass sees it.
    async fn recover_one(
        &self,
        mut record: BatchRecord,
        epoch: u64,
        partition: i32,
    ) -> Result<bool> {
        if record.epoch < epoch {
            self.lease.check()?;
            let adopted = self
                .store
                .batches
                .update_one(
                    doc! { "_id": &record.id, "epoch": record.epoch as i64 },
                    doc! { "$set": { "epoch": epoch as i64 } },
                )
                .await
                .map_err(Error::store("adopt batch"))?;
            if adopted.matched_count == 0 {
                return Ok(false); // changed meanwhile; the next pass sees it
            }
            record.epoch = epoch;
        }
        tracing::info!(batch = %record.id, state = ?record.state, "recovering batch");
        if record.state == BatchState::Moving {
            self.finish_move(&mut record).await?;
        }
        if record.state == BatchState::Moved {
            match (record.partition, record.offset) {
                (Some(p), Some(from)) => match self.kafka.find_batch(p, from, &record).await? {
                    Some(offset) => {
                        tracing::info!(batch = %record.id, partition = p, offset, "batch already in the topic");
                        self.mark_published(&mut record, p, offset).await?;
                    }
                    None => self.publish(&mut record, p).await?,
                },
                _ => self.publish(&mut record, partition).await?,
            }
        }
        self.metrics.batch_recovered(&record.id);
        Ok(true)
    }
}
