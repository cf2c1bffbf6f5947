//! Benchmark of the move+publish protocol: keys moved from `keys` to
//! `used_keys` and published to Kafka per second, for batch sizes 100, 1,000
//! and 10,000, side by side in one run with the raw rate of the same
//! database writes on the same server, the same documents and write concern
//! (no batch record, lease checks or Kafka):
//! - raw by `_id`: `insert_many` into one collection + one `delete` command
//!   of `_id` statements from another (the issue's definition of raw);
//! - raw by range: the same insert + one `delete_many` of an `n` range (the
//!   floor of the window protocol);
//! - producer, one batch after the other ([`Writer::next_batch`]);
//! - producer, pipelined ([`Writer::fill`]: each move overlaps the publish of
//!   the batch before), as the leader runs it.
//!
//! ```text
//! cargo run --release -p kgs-producer --example bench
//! ```
//! Environment: `KGS_KAFKA_BROKERS`, `KGS_MONGODB_URI`, `KGS_BENCH_KEYS`
//! (keys per batch size and method, default 30000), `KGS_BENCH_SIZES`
//! (default `100,1000,10000`). Each size uses its own database and pool.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bson::doc;
use futures::TryStreamExt;
use kgs_producer::cmd::init::{self, PoolSpec};
use kgs_producer::config::Config;
use kgs_producer::kafka::PoolKafka;
use kgs_producer::leader::lease::{Lease, LeaseCheck, LeaseKeeper};
use kgs_producer::metrics::Metrics;
use kgs_producer::store::{delete_by_ids, insert_ignoring_duplicates, Store};
use kgs_producer::writer::generate;
use kgs_producer::writer::Writer;
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
    if std::env::var("KGS_BENCH_MODE").as_deref() == Ok("init") {
        return bench_init(config).await;
    }
    let sizes: Vec<usize> = std::env::var("KGS_BENCH_SIZES")
        .unwrap_or_else(|_| "100,1000,10000".into())
        .split(',')
        .map(|s| s.trim().parse().context("KGS_BENCH_SIZES"))
        .collect::<Result<_>>()?;
    println!("| batch size | keys | raw by _id keys/s | raw by range keys/s | producer keys/s | producer pipelined keys/s | pipelined / raw by _id | pipelined / raw by range |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for size in sizes {
        let tag = rand::random::<u32>() & 0xff_ffff;
        config.mongodb_db = format!("bench-{tag:06x}");
        let name = format!("bench-{size}-{tag:06x}");
        let store = Store::connect(&config).await?;
        let (keeper, lease) = leading_pool(&config, &store, &name, KeyFormat::base62(4)?).await?;
        generate::top_up(&store, &name, 2 * n, 10_000, u64::MAX, &lease, None).await?;
        let colls = store.key_collections(&name);
        let docs: Vec<KeyDoc> = colls
            .keys
            .find(doc! {})
            .sort(doc! { "n": 1 })
            .await?
            .try_collect()
            .await?;
        anyhow::ensure!(
            docs.len() as u64 == 2 * n,
            "expected {} keys, found {}",
            2 * n,
            docs.len()
        );

        // Raw: the same documents, copied to a scratch collection first (untimed).
        let src = store.db.collection::<KeyDoc>("raw_src");
        let dst = store.db.collection::<UsedKeyDoc>("raw_dst");
        src.create_index(mongodb::IndexModel::builder().keys(doc! { "n": 1 }).build())
            .await?;
        for chunk in docs.chunks(5_000) {
            insert_ignoring_duplicates(&src, chunk, "copy").await?;
        }
        let used = |chunk: &[KeyDoc]| -> Vec<UsedKeyDoc> {
            chunk
                .iter()
                .map(|k| UsedKeyDoc {
                    key: k.key.clone(),
                    n: k.n,
                    reason: UsedReason::Batch,
                    batch: Some("raw".into()),
                    at: chrono::Utc::now(),
                })
                .collect()
        };
        let (by_id, by_range) = docs.split_at(n as usize);
        let started = Instant::now();
        for chunk in by_id.chunks(size) {
            dst.insert_many(used(chunk)).await?;
            let ids: Vec<String> = chunk.iter().map(|k| k.key.clone()).collect();
            delete_by_ids(&store.db, "raw_src", &ids, "raw delete").await?;
        }
        let raw_id = n as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        for chunk in by_range.chunks(size) {
            dst.insert_many(used(chunk)).await?;
            let (from, to) = (chunk[0].n as i64, chunk[chunk.len() - 1].n as i64);
            src.delete_many(doc! { "n": { "$gte": from, "$lte": to } })
                .await?;
        }
        let raw_range = n as f64 / started.elapsed().as_secs_f64();

        // Producer: the full protocol, one Kafka transaction per batch.
        let metrics = Metrics::new(&name);
        let pool_doc = store.pool(&name).await?;
        let kafka = PoolKafka::start(&config, &pool_doc).await?;
        let writer = Writer::new(&store, &pool_doc, 0, &lease, &kafka, &metrics);
        let batches = (n as usize).div_ceil(size);
        let started = Instant::now();
        for _ in 0..batches {
            anyhow::ensure!(
                writer.next_batch(size, 0).await.context("batch")?,
                "pool empty"
            );
        }
        let sequential = n as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        let plan = vec![0; batches];
        let (moved, _) = writer
            .fill(size, &plan, Duration::from_secs(3600))
            .await
            .context("fill")?;
        let pipelined = n as f64 / started.elapsed().as_secs_f64();
        anyhow::ensure!(moved == batches, "moved {moved} of {batches} batches");
        anyhow::ensure!(
            metrics.keys_published() == 2 * n,
            "published {} keys",
            metrics.keys_published()
        );
        println!(
            "| {size} | {n} | {raw_id:.0} | {raw_range:.0} | {sequential:.0} | {pipelined:.0} | {:.2} | {:.2} |",
            pipelined / raw_id,
            pipelined / raw_range,
        );
        keeper.stop().await;
        store.db.drop().await?;
    }
    Ok(())
}

/// Creates pool `name` (one partition) and waits until this process leads it.
async fn leading_pool(
    config: &Config,
    store: &Store,
    name: &str,
    format: KeyFormat,
) -> Result<(LeaseKeeper, LeaseCheck)> {
    let spec = PoolSpec {
        name: name.to_owned(),
        format,
        partitions: 1,
        blocklist: None,
        recycle_cooldown: None,
    };
    init::create(config, store, &spec).await?;
    let keeper = LeaseKeeper::spawn(Lease::new(
        store.clone(),
        name,
        "bench",
        Duration::from_secs(30),
    ));
    let mut lease = keeper.lease_check();
    lease.wait_leader().await;
    Ok((keeper, lease))
}

/// `KGS_BENCH_MODE=init`: the generation of a whole 3-letter base62 pool
/// (238,328 keys, as `kgs-producer init --length 3` does it: marked steps of
/// `generate_chunk` keys, inserts of 5,000 documents), next to raw
/// `insert_many` of the same documents into a collection with the same
/// `{n: 1}` index, same server, same run.
async fn bench_init(mut config: Config) -> Result<()> {
    let tag = rand::random::<u32>() & 0xff_ffff;
    config.mongodb_db = format!("bench-init-{tag:06x}");
    let store = Store::connect(&config).await?;
    let name = format!("init-{tag:06x}");
    let format = KeyFormat::base62(3)?;
    let space = format.space();
    let (keeper, lease) = leading_pool(&config, &store, &name, format).await?;
    let started = Instant::now();
    let generated = generate::top_up(
        &store,
        &name,
        space,
        config.generate_chunk,
        u64::MAX,
        &lease,
        None,
    )
    .await?;
    let init_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(generated == space, "generated {generated} of {space}");
    keeper.stop().await;
    let (format, perm) = generate::pool_order(&store.pool(&name).await?)?;
    let raw = store.db.collection::<KeyDoc>("raw_keys");
    raw.create_index(mongodb::IndexModel::builder().keys(doc! { "n": 1 }).build())
        .await?;
    let started = Instant::now();
    let mut n = 0;
    while n < space {
        let to = (n + 5_000).min(space);
        let docs: Vec<KeyDoc> = (n..to)
            .map(|i| KeyDoc {
                key: format.key_at(perm.apply(i)).expect("in space"),
                n: i,
            })
            .collect();
        raw.insert_many(docs).await?;
        n = to;
    }
    let raw_s = started.elapsed().as_secs_f64();
    println!("| keys | init s | init keys/s | raw insert_many s | raw keys/s | init / raw |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {space} | {init_s:.1} | {:.0} | {raw_s:.1} | {:.0} | {:.2} |",
        space as f64 / init_s,
        space as f64 / raw_s,
        raw_s / init_s
    );
    store.db.drop().await?;
    Ok(())
}
