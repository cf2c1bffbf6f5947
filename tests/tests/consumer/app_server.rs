//! The app server binary, as separate processes: serving, disjoint keys
//! across processes, SIGTERM and SIGKILL.

use std::collections::{HashMap, HashSet};

use anyhow::{ensure, Context, Result};
use bson::doc;
use kgs_schemas::docs::{used_keys_collection, ClaimState, UsedKeyDoc};
use kgs_schemas::KeyBatch;
use kgs_tests::{unique, wait_for, AppServer, AppServerCmd, Signal};

use super::publisher::{Pool, WAIT};

/// An app server of `pool` in `group` as `instance`.
async fn app_server(pool: &Pool, group: &str, instance: &str) -> Result<AppServer> {
    AppServerCmd::new(&pool.db_name, &pool.name)?
        .group(group)
        .instance(instance)
        .start()
        .await
}

/// The example app server serves keys over `GET /keys` (503 `no keys` when
/// empty), exposes `/metrics` and `/healthz`, and on SIGTERM exits cleanly
/// after recording its unserved keys for return.
#[tokio::test(flavor = "multi_thread")]
async fn app_server_serves_keys_and_returns_them_on_sigterm() -> Result<()> {
    let pool = Pool::create(1).await?;
    let mut published = HashSet::new();
    for _ in 0..2 {
        published.extend(pool.publish(10, 0).await?.keys);
    }
    let app = AppServerCmd::new(&pool.db_name, &pool.name)?
        .group(&unique("g"))
        .start()
        .await?;
    let mut served = HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while served.len() < 5 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "app-server served no keys"
        );
        let (status, body) = app.get("/keys").await?;
        match status {
            200 => assert!(served.insert(body), "key served twice"),
            503 => assert_eq!(body, "no keys\n"),
            other => anyhow::bail!("GET /keys: {other} {body}"),
        }
    }
    assert!(served.is_subset(&published));
    let (status, metrics) = app.get("/metrics").await?;
    assert_eq!(status, 200);
    assert!(metrics.contains(kgs_consumer::metrics::BATCHES_CLAIMED_TOTAL));

    // Wait until both batches are buffered, so the return covers 15 keys.
    wait_for("both batches claimed", WAIT, || async {
        Ok((pool.claims().await?.len() == 2).then_some(()))
    })
    .await?;
    let status = app.stop(Signal::Term).await?;
    assert!(status.success(), "app-server exit status {status}");
    let returned: HashSet<String> = pool
        .claims()
        .await?
        .into_iter()
        .flat_map(|c| c.return_keys)
        .collect();
    assert_eq!(returned.len(), published.len() - served.len());
    assert!(returned.is_disjoint(&served));
    pool.drop_db().await;
    Ok(())
}

/// Three app-server processes in one group each own one partition and hand
/// out disjoint keys, together exactly the published set, every one of them
/// in `used_keys`.
#[tokio::test(flavor = "multi_thread")]
async fn three_app_server_processes_hand_out_disjoint_keys() -> Result<()> {
    let pool = Pool::create(3).await?;
    let group = unique("g");
    let mut servers = Vec::new();
    for i in 0..3 {
        servers.push(app_server(&pool, &group, &format!("app{i}")).await?);
    }
    wait_for("one partition per app server", WAIT, || async {
        for s in &servers {
            if s.metric(kgs_consumer::metrics::ASSIGNED_PARTITIONS).await? != 1.0 {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await?;
    let mut published = HashSet::new();
    for i in 0..9 {
        published.extend(pool.publish(15, i % 3).await?.keys);
    }
    let mut served: Vec<HashSet<String>> = vec![HashSet::new(); 3];
    let deadline = tokio::time::Instant::now() + WAIT;
    while served.iter().map(HashSet::len).sum::<usize>() < published.len() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "served only {} keys",
            served.iter().map(HashSet::len).sum::<usize>()
        );
        for (s, mine) in servers.iter().zip(served.iter_mut()) {
            if let Some(k) = s.key().await? {
                assert!(mine.insert(k), "a server handed a key out twice");
            }
        }
    }
    for (i, a) in served.iter().enumerate() {
        assert_eq!(a.len(), 45, "app{i} serves its own partition's 3 batches");
        for b in &served[i + 1..] {
            assert!(a.is_disjoint(b), "a key reached two app servers");
        }
    }
    let all: HashSet<String> = served.iter().flatten().cloned().collect();
    assert_eq!(all, published);
    let keys: Vec<&String> = all.iter().collect();
    let used = pool
        .db
        .collection::<UsedKeyDoc>(&used_keys_collection(&pool.name))
        .count_documents(doc! { "_id": { "$in": keys } })
        .await?;
    assert_eq!(
        used as usize,
        all.len(),
        "every handed-out key is in used_keys"
    );
    for s in servers {
        assert!(s.stop(Signal::Term).await?.success());
    }
    pool.drop_db().await;
    Ok(())
}

/// SIGKILL of an app server mid-stream: no key is ever served twice, the
/// survivor takes over its partition, and the only keys neither served nor
/// returned are in the dead instance's claims, which stay `open`.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_stream_loses_at_most_the_buffer() -> Result<()> {
    let pool = Pool::create(2).await?;
    let group = unique("g");
    let doomed = app_server(&pool, &group, "doomed").await?;
    let survivor = app_server(&pool, &group, "survivor").await?;
    wait_for("one partition per app server", WAIT, || async {
        Ok((doomed
            .metric(kgs_consumer::metrics::ASSIGNED_PARTITIONS)
            .await?
            == 1.0
            && survivor
                .metric(kgs_consumer::metrics::ASSIGNED_PARTITIONS)
                .await?
                == 1.0)
            .then_some(()))
    })
    .await?;
    let mut published = Vec::new();
    for i in 0..6 {
        published.push(pool.publish(20, i % 2).await?);
    }
    // Take keys from both until the doomed one has served some.
    let mut served = Vec::new();
    let mut from_doomed = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while from_doomed < 10 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "doomed served no keys"
        );
        if let Some(k) = doomed.key().await? {
            served.push(k);
            from_doomed += 1;
        }
        if let Some(k) = survivor.key().await? {
            served.push(k);
        }
    }
    assert!(!doomed.stop(Signal::Kill).await?.success());
    // More batches on both partitions: the survivor gets the dead one's
    // partition after the session timeout and serves the new batches.
    for i in 0..4 {
        published.push(pool.publish(20, i % 2).await?);
    }
    let ids: HashSet<String> = published.iter().map(|b| b.batch_id.clone()).collect();
    wait_for("every batch claimed", WAIT, || async {
        let claimed = pool
            .claims()
            .await?
            .iter()
            .filter(|c| ids.contains(&c.batch_id))
            .count();
        Ok((claimed == ids.len()).then_some(()))
    })
    .await?;
    while let Some(k) = survivor.key().await? {
        served.push(k);
    }
    assert!(survivor.stop(Signal::Term).await?.success());

    let served_set: HashSet<String> = served.iter().cloned().collect();
    assert_eq!(served_set.len(), served.len(), "a key was served twice");
    let claims = pool.claims().await?;
    let returned: HashSet<String> = claims.iter().flat_map(|c| c.return_keys.clone()).collect();
    assert!(returned.is_disjoint(&served_set));
    let batch_keys: HashMap<String, &Vec<String>> = published
        .iter()
        .map(|b| (b.batch_id.clone(), &b.keys))
        .collect();
    let lost_allowed: HashSet<String> = claims
        .iter()
        .filter(|c| c.instance == "doomed" && c.state == ClaimState::Open)
        .flat_map(|c| batch_keys[&c.batch_id].iter().cloned())
        .collect();
    assert!(
        !lost_allowed.is_empty(),
        "the dead instance's claims stay open"
    );
    for key in published.iter().flat_map(|b| &b.keys) {
        assert!(
            served_set.contains(key) || returned.contains(key) || lost_allowed.contains(key),
            "key {key} neither served, returned, nor in an open claim of the dead instance"
        );
    }
    assert!(claims
        .iter()
        .all(|c| c.instance == "doomed" || c.state != ClaimState::Open));
    pool.drop_db().await;
    Ok(())
}

/// Not a check: seeds a pool for the HTTP benchmark in BENCHMARKS.md.
/// Creates pool `$KGS_BENCH_POOL` in database `$KGS_MONGODB_DB` and publishes
/// `$KGS_BENCH_KEYS` keys (default 1,000,000) in batches of 50,000, each
/// with its batch record (the consumer verifies it) but without the
/// `used_keys` documents (the consumer never reads them).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark fixture, run by hand"]
async fn seed_pool_for_http_benchmark() -> Result<()> {
    let total: usize = std::env::var("KGS_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let pool = Pool::create_named(
        4,
        std::env::var("KGS_MONGODB_DB").context("KGS_MONGODB_DB")?,
        std::env::var("KGS_BENCH_POOL").context("KGS_BENCH_POOL")?,
    )
    .await?;
    for i in 0..total.div_ceil(50_000) {
        let batch = KeyBatch::new(unique("b"), pool.name.clone(), 1, pool.fresh_keys(50_000));
        let partition = (i % 4) as i32;
        pool.record_batch(&batch, partition).await?;
        pool.send(&batch.encode(), partition).await?;
    }
    println!(
        "seeded pool {} in {} with {total} keys",
        pool.name, pool.db_name
    );
    Ok(())
}

/// `GET /keys?count=N` hands out N distinct keys as a JSON array, from the
/// same buffer as `GET /keys` (never a key twice across both), fewer when no
/// are buffered (answered at once: taken keys are never held across a
/// wait), `503` when none arrives, and `400` for a count out of 1..=1000. Every key served is one of
/// the published batches'.
#[tokio::test(flavor = "multi_thread")]
async fn bulk_keys_over_http_are_distinct_and_bounded() -> Result<()> {
    let pool = Pool::create(1).await?;
    let mut published = HashSet::new();
    for _ in 0..3 {
        published.extend(pool.publish(40, 0).await?.keys);
    }
    let app = app_server(&pool, &unique("g"), &unique("i")).await?;
    // Buffered, not only claimed: a bulk call answers with what is there.
    wait_for("three batches buffered", WAIT, || async {
        let buffered = app
            .metric(kgs_consumer::metrics::KEYS_BUFFERED_TOTAL)
            .await?;
        Ok((pool.claims().await?.len() == 3 && buffered >= 120.0).then_some(()))
    })
    .await?;
    for bad in ["count=0", "count=1001", "count=x", "x=1&count=-1"] {
        let (status, body) = app.get(&format!("/keys?{bad}")).await?;
        ensure!(status == 400, "{bad}: {status} {body}");
        ensure!(body.lines().count() == 1, "{bad}: not one line: {body:?}");
    }
    let mut served: Vec<String> = Vec::new();
    let (status, body) = app.get("/keys?count=50").await?;
    ensure!(status == 200, "count=50: {status} {body}");
    let first: Vec<String> = serde_json::from_str(&body)?;
    ensure!(first.len() == 50, "count=50 gave {} keys", first.len());
    served.extend(first);
    let (status, one) = app.get("/keys").await?;
    ensure!(status == 200, "GET /keys: {status} {one}");
    served.push(one);
    // 120 published, 51 taken: the rest (69) in one call asking for 100.
    let (status, body) = app.get("/keys?count=100").await?;
    ensure!(status == 200, "count=100: {status} {body}");
    let rest: Vec<String> = serde_json::from_str(&body)?;
    ensure!(rest.len() == 69, "count=100 gave {} of 69 left", rest.len());
    served.extend(rest);
    let (status, body) = app.get("/keys?count=5").await?;
    ensure!(
        status == 503 && body == "no keys\n",
        "empty buffer: {status} {body}"
    );
    let distinct: HashSet<&String> = served.iter().collect();
    ensure!(distinct.len() == served.len(), "a key served twice");
    ensure!(
        served.iter().all(|k| published.contains(k)),
        "a key served that was not published"
    );
    ensure!(distinct.len() == published.len(), "keys left unserved");
    let status = app.stop(Signal::Term).await?;
    assert!(status.success(), "app-server exit status {status}");
    pool.drop_db().await;
    Ok(())
}
