//! Benchmark of the move+publish protocol: keys moved from `keys` to
//! `used_keys` and published to Kafka per second, for batch sizes 100, 1,000
//! and 10,000, next to the raw rate of the same database writes (insert_many
//! into one collection + one `delete` command of `_id` statements from
//! another, the same documents,
//! same server, same run) without the batch record, lease checks and Kafka.
//!
//! ```text
//! cargo run --release -p kgs-producer --example bench
//! ```
//! Environment: `KGS_KAFKA_BROKERS`, `KGS_MONGODB_URI`, `KGS_BENCH_KEYS`
//! (keys per batch size, default 30000). Each size uses its own database and pool.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bson::doc;
use futures::TryStreamExt;
use kgs_producer::config::Config;
use kgs_producer::generate;
use kgs_producer::kafka::PoolKafka;
use kgs_producer::lease::{Lease, LeaseKeeper};
use kgs_producer::metrics::Metrics;
use kgs_producer::mover::Mover;
use kgs_producer::pool::{self, PoolSpec};
use kgs_producer::store::{delete_by_ids, insert_ignoring_duplicates, Store};
use kgs_schemas::docs::{KeyDoc, UsedKeyDoc, UsedReason};
use kgs_schemas::KeyFormat;

#[tokio::main]
async fn main() -> Result<()> {
    // `KGS_LOG=kgs_producer=trace` shows the time of each protocol step.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KGS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let n: u64 = std::env::var("KGS_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    let mut config = Config::default();
    if let Ok(b) = std::env::var("KGS_KAFKA_BROKERS") {
        config.kafka_brokers = b;
    }
    if let Ok(u) = std::env::var("KGS_MONGODB_URI") {
        config.mongodb_uri = u;
    }
    println!("| batch size | keys | raw insert_many+delete keys/s | producer move+publish keys/s | ratio | move ms/batch | publish ms/batch |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for size in [100usize, 1_000, 10_000] {
        let tag = rand::random::<u32>() & 0xff_ffff;
        config.mongodb_db = format!("bench-{tag:06x}");
        let name = format!("bench-{size}-{tag:06x}");
        let store = Store::connect(&config).await?;
        let spec = PoolSpec {
            name: name.clone(),
            format: KeyFormat::base62(3)?,
            partitions: 1,
        };
        pool::init(&config, &store, &spec).await?;
        let keeper = LeaseKeeper::spawn(Lease::new(
            store.clone(),
            &name,
            "bench",
            Duration::from_secs(30),
        ));
        let mut guard = keeper.guard();
        guard.wait_leader().await;
        generate::top_up(&store, &name, n, 10_000, u64::MAX, &guard, None).await?;
        let pk = store.pool_keys(&name);
        let docs: Vec<KeyDoc> = pk
            .keys
            .find(doc! {})
            .sort(doc! { "n": 1 })
            .await?
            .try_collect()
            .await?;
        anyhow::ensure!(
            docs.len() as u64 == n,
            "expected {n} keys, found {}",
            docs.len()
        );

        // Raw: the same documents, copied to a scratch collection first (untimed).
        let src = store.db.collection::<KeyDoc>("raw_src");
        let dst = store.db.collection::<UsedKeyDoc>("raw_dst");
        for chunk in docs.chunks(5_000) {
            insert_ignoring_duplicates(&src, chunk, "copy").await?;
        }
        let started = Instant::now();
        for chunk in docs.chunks(size) {
            let used: Vec<UsedKeyDoc> = chunk
                .iter()
                .map(|k| UsedKeyDoc {
                    key: k.key.clone(),
                    n: k.n,
                    reason: UsedReason::Batch,
                    batch: Some("raw".into()),
                    at: chrono::Utc::now(),
                })
                .collect();
            dst.insert_many(&used).await?;
            let ids: Vec<String> = chunk.iter().map(|k| k.key.clone()).collect();
            delete_by_ids(&store.db, "raw_src", &ids, "raw delete").await?;
        }
        let raw = n as f64 / started.elapsed().as_secs_f64();

        // Producer: the full protocol, one Kafka transaction per batch.
        let metrics = Metrics::new(&name);
        let pool_doc = store.pool(&name).await?;
        let kafka = PoolKafka::start(&config, &pool_doc).await?;
        let mover = Mover {
            store: &store,
            pk,
            pool: &name,
            incarnation: &pool_doc.incarnation,
            guard: &guard,
            kafka: &kafka,
            metrics: &metrics,
            topic_generation: 0.into(),
            last_offsets: Default::default(),
        };
        let started = Instant::now();
        while mover.next_batch(size, 0).await.context("batch")? {}
        let produced = n as f64 / started.elapsed().as_secs_f64();
        anyhow::ensure!(
            metrics.keys_published.get() == n,
            "published {} keys",
            metrics.keys_published.get()
        );
        let avg_ms = |h: &prometheus::Histogram| {
            h.get_sample_sum() / h.get_sample_count().max(1) as f64 * 1e3
        };
        println!(
            "| {size} | {n} | {raw:.0} | {produced:.0} | {:.2} | {:.0} | {:.0} |",
            produced / raw,
            avg_ms(&metrics.move_seconds),
            avg_ms(&metrics.publish_seconds)
        );
        keeper.stop().await;
        store.db.drop().await?;
    }
    Ok(())
}
