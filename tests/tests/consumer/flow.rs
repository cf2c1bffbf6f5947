//! What flows into the buffer: bad messages are skipped while the
//! partition keeps flowing, and the watermarks pause and resume fetching.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Result;
use kgs_tests::{registry_value, take, unique, wait_for};
use prometheus::Registry;

use super::publisher::{buffered_at_least, Pool, WAIT};

/// Every kind of bad input (including a well-formed batch that no batch
/// record backs: `unverified`) is skipped with its metric incremented, none
/// of its keys is handed out, and the partition keeps flowing: the good
/// batch after each bad message is handed out. A replay of a good batch is
/// counted as a replay, not as a bad message.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_skipped_and_the_partition_keeps_flowing() -> Result<()> {
    let pool = Pool::create(1).await?;
    let registry = Registry::new();
    let c = pool.consumer(&unique("g"), &registry).build().await?;
    let good_json = |keys: serde_json::Value, pool_name: &str, version: u32| {
        serde_json::to_vec(&serde_json::json!({
            "schema_version": version,
            "batch_id": unique("bad"),
            "pool": pool_name,
            "epoch": 1,
            "created_at": "2026-11-26T00:00:00Z",
            "keys": keys,
        }))
        .unwrap()
    };
    let fresh = pool.fresh_keys(3);
    let truncated = {
        let bytes = good_json(serde_json::json!(fresh), &pool.name, 1);
        bytes[..bytes.len() / 2].to_vec()
    };
    let many: Vec<String> = (0..kgs_schemas::batch::MAX_BATCH_KEYS as u64 + 1)
        .map(|i| pool.format.key_at(1_000_000 + i).unwrap())
        .collect();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("not_json", vec![0xff, 0x00, 0x13, 0x37]),
        ("not_json", truncated),
        (
            "unknown_schema_version",
            good_json(serde_json::json!(fresh), &pool.name, 2),
        ),
        (
            "wrong_pool",
            good_json(serde_json::json!(fresh), "another-pool", 1),
        ),
        (
            "bad_key",
            good_json(serde_json::json!(["abc"]), &pool.name, 1),
        ),
        (
            "bad_key",
            good_json(serde_json::json!(["ab-def"]), &pool.name, 1),
        ),
        (
            "duplicate_key",
            good_json(
                serde_json::json!([fresh[0], fresh[1], fresh[0]]),
                &pool.name,
                1,
            ),
        ),
        // Well-formed, but no producer recorded it: refused by verification.
        (
            "unverified",
            good_json(serde_json::json!(fresh), &pool.name, 1),
        ),
        // A message over 1 MiB cannot even be produced to a default topic;
        // the batch-size limit is the oversize case that reaches a consumer.
        (
            "too_many_keys",
            good_json(serde_json::json!(many), &pool.name, 1),
        ),
    ];
    let bad_keys: HashSet<String> = fresh.iter().cloned().chain(many.iter().cloned()).collect();
    let mut good = HashSet::new();
    let mut expected: HashMap<&str, f64> = HashMap::new();
    for (kind, payload) in &bad {
        pool.send(payload, 0).await?;
        *expected.entry(kind).or_default() += 1.0;
        good.extend(pool.publish(5, 0).await?.keys);
    }
    // A replay: the same batch (same id, keys and partition) published a
    // second time. Harmless: counted as a replay, not as a bad message.
    let replayed = pool.publish(5, 0).await?;
    good.extend(replayed.keys.iter().cloned());
    pool.send(&replayed.encode(), 0).await?;
    let last = pool.publish(5, 0).await?;
    good.extend(last.keys);

    let got = take(&c, good.len(), WAIT).await?;
    let got_set: HashSet<String> = got.iter().cloned().collect();
    assert_eq!(got_set.len(), got.len(), "a key was handed out twice");
    assert_eq!(got_set, good);
    assert!(got_set.is_disjoint(&bad_keys));
    for (kind, count) in &expected {
        assert_eq!(
            registry_value(
                &registry,
                kgs_consumer::metrics::BAD_MESSAGES_TOTAL,
                Some(("kind", kind))
            ),
            *count,
            "bad messages of kind {kind}"
        );
    }
    assert_eq!(
        registry_value(&registry, kgs_consumer::metrics::REPLAYS_TOTAL, None),
        1.0
    );
    assert!(matches!(
        c.next_key_wait(Duration::from_millis(300)).await,
        Err(kgs_consumer::Error::Empty)
    ));
    c.shutdown().await?;
    pool.drop_db().await;
    Ok(())
}

/// At the high watermark the consumer pauses its partitions (claims no more
/// batches), and resumes once hand-out brings the buffer to the low one.
#[tokio::test(flavor = "multi_thread")]
async fn backpressure_pauses_at_the_high_watermark() -> Result<()> {
    let pool = Pool::create(1).await?;
    let registry = Registry::new();
    let c = pool
        .consumer(&unique("g"), &registry)
        .watermarks(15, 40)
        .build()
        .await?;
    let mut all = HashSet::new();
    for _ in 0..12 {
        all.extend(pool.publish(10, 0).await?.keys);
    }
    buffered_at_least(&c, 40).await?;
    wait_for("the paused gauge", WAIT, || async {
        Ok((registry_value(&registry, kgs_consumer::metrics::PAUSED, None) == 1.0).then_some(()))
    })
    .await?;
    // Paused: nothing more is claimed however long we wait.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let claimed = registry_value(
        &registry,
        kgs_consumer::metrics::BATCHES_CLAIMED_TOTAL,
        None,
    );
    assert!(
        c.buffered() <= 50,
        "buffered {} past high watermark + one batch",
        c.buffered()
    );
    assert!(claimed <= 5.0, "claimed {claimed} batches while paused");
    assert_eq!(pool.claims().await?.len() as f64, claimed);
    // Draining resumes the flow until every key has been handed out.
    let got: HashSet<String> = take(&c, all.len(), WAIT).await?.into_iter().collect();
    assert_eq!(got, all);
    c.shutdown().await?;
    pool.drop_db().await;
    Ok(())
}
