//! Benchmark of the database side of claiming a batch, before and after
//! provenance: the claim insert alone (`w: majority, j: true`, what claiming
//! cost before batches were verified), and the exact-`_id` read of the batch
//! record with [`BatchProof::projection`] followed by the same insert (what
//! it costs now). Both are measured interleaved in one run, on batch records
//! of `KGS_BENCH_BATCH` keys (default 1,000), so the machine's noise falls on
//! both alike. The Kafka offset commit that follows, the same before and
//! after, is not included.
//!
//! ```text
//! cargo run --release -p kgs-consumer --example claim-bench
//! ```
//! Environment: `KGS_MONGODB_URI` (default the local test server),
//! `KGS_BENCH_CLAIMS` (claims per variant, default 300). Uses a database of
//! its own and drops it at the end.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bson::doc;
use chrono::Utc;
use kgs_schemas::docs::{BatchRecord, BatchState, ClaimDoc, ClaimState, BATCHES, CLAIMS};
use kgs_schemas::{keys_digest, BatchProof, KeyFormat};
use mongodb::options::{Acknowledgment, CollectionOptions, WriteConcern};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> Result<()> {
    let uri = std::env::var("KGS_MONGODB_URI")
        .unwrap_or_else(|_| "mongodb://127.0.0.1:27017/?directConnection=true".to_owned());
    let n: usize = env_or("KGS_BENCH_CLAIMS", 300);
    let batch_keys: u64 = env_or("KGS_BENCH_BATCH", 1_000);
    let client = mongodb::Client::with_uri_str(&uri).await?;
    let db = client.database(&format!(
        "claim-bench-{:06x}",
        rand::random::<u32>() & 0xff_ffff
    ));
    let durable = CollectionOptions::builder()
        .write_concern(
            WriteConcern::builder()
                .w(Acknowledgment::Majority)
                .journal(true)
                .build(),
        )
        .build();
    let batches = db.collection::<BatchRecord>(BATCHES);
    let proofs = db.collection::<BatchProof>(BATCHES);
    let claims = db.collection_with_options::<ClaimDoc>(CLAIMS, durable);
    let format = KeyFormat::base62(6)?;
    // 2n records as the producer writes them (keys and ns included).
    let mut ids = Vec::with_capacity(2 * n);
    for b in 0..2 * n as u64 {
        let keys: Vec<String> = (0..batch_keys)
            .map(|i| format.key_at(b * batch_keys + i).expect("in space"))
            .collect();
        let record = BatchRecord {
            id: format!("bench-{b}"),
            pool: "bench".into(),
            incarnation: "0123456789abcdef".into(),
            epoch: 1,
            state: BatchState::Published,
            digest: keys_digest(&keys),
            ns: (0..batch_keys).collect(),
            keys,
            partition: Some(0),
            offset: Some(b as i64),
            topic_generation: 0,
            from: None,
            window: None,
            created_at: Utc::now(),
        };
        ids.push(record.id.clone());
        batches.insert_one(&record).await.context("insert record")?;
    }
    let claim = |id: &str| ClaimDoc {
        batch_id: id.to_owned(),
        pool: "bench".into(),
        group: "g".into(),
        instance: "bench".into(),
        token: "t".into(),
        partition: 0,
        offset: 0,
        keys: batch_keys,
        state: ClaimState::Open,
        return_keys: Vec::new(),
        reason: None,
        claimed_at: Utc::now(),
    };
    let mut before = Vec::with_capacity(n);
    let mut after = Vec::with_capacity(n);
    let mut read_only = Vec::with_capacity(n);
    for pair in ids.chunks(2) {
        let started = Instant::now();
        claims.insert_one(claim(&pair[0])).await?;
        before.push(started.elapsed());

        let started = Instant::now();
        let proof = proofs
            .find_one(doc! { "_id": &pair[1] })
            .projection(BatchProof::projection())
            .await?
            .context("record")?;
        read_only.push(started.elapsed());
        anyhow::ensure!(proof.digest.len() == 64, "proof read back");
        claims.insert_one(claim(&pair[1])).await?;
        after.push(started.elapsed());
    }
    for v in [&mut before, &mut after, &mut read_only] {
        v.sort();
    }
    println!("| claim path (database part), {n} claims each, batches of {batch_keys} keys | p50 ms | p90 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    for (name, v) in [
        ("before: claim insert (w:majority, j:true)", &before),
        (
            "after: batch record read (exact _id, projection) + claim insert",
            &after,
        ),
        ("  of which the record read", &read_only),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} |",
            percentile(v, 0.5),
            percentile(v, 0.9),
            percentile(v, 0.99)
        );
    }
    db.drop().await?;
    Ok(())
}
