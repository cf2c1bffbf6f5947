//! Hand-out through the consumer group: instances of one group get
//! disjoint keys, also while members join and leave.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Result};
use kgs_schemas::docs::{ClaimDoc, ClaimState};
use kgs_tests::{registry_value, unique, wait_for};
use prometheus::Registry;

use super::publisher::{assigned, Pool, WAIT};

/// Two instances in one group get disjoint keys, both get some, and
/// together exactly the published set; every handed-out key's batch has an
/// open or drained claim by the instance that handed it out.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_get_disjoint_keys() -> Result<()> {
    let pool = Pool::create(4).await?;
    let group = unique("g");
    let (ra, rb) = (Registry::new(), Registry::new());
    let a = pool.consumer(&group, &ra).instance_id("a").build().await?;
    let b = pool.consumer(&group, &rb).instance_id("b").build().await?;
    assigned(&ra).await?;
    assigned(&rb).await?;
    // Let the group settle on a split of the partitions between a and b.
    wait_for("both members in the group", WAIT, || async {
        let total = registry_value(
            &ra,
            kgs_consumer::metrics::REBALANCES_TOTAL,
            Some(("event", "assign")),
        ) + registry_value(
            &rb,
            kgs_consumer::metrics::REBALANCES_TOTAL,
            Some(("event", "assign")),
        );
        Ok((total >= 2.0).then_some(()))
    })
    .await?;

    let mut published = HashSet::new();
    let mut batch_of = HashMap::new();
    for i in 0..8 {
        let batch = pool.publish(25, i % 4).await?;
        for k in &batch.keys {
            batch_of.insert(k.clone(), batch.batch_id.clone());
        }
        published.extend(batch.keys);
    }
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    while got_a.len() + got_b.len() < published.len() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "keys missing: {} of {}",
            got_a.len() + got_b.len(),
            published.len()
        );
        let mut progress = false;
        while let Ok(k) = a.next_key() {
            got_a.push(k.to_string());
            progress = true;
        }
        while let Ok(k) = b.next_key() {
            got_b.push(k.to_string());
            progress = true;
        }
        if !progress {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let set_a: HashSet<_> = got_a.iter().cloned().collect();
    let set_b: HashSet<_> = got_b.iter().cloned().collect();
    assert_eq!(set_a.len(), got_a.len(), "a handed a key out twice");
    assert_eq!(set_b.len(), got_b.len(), "b handed a key out twice");
    assert!(set_a.is_disjoint(&set_b), "a key reached both instances");
    assert!(
        !set_a.is_empty() && !set_b.is_empty(),
        "both instances got keys"
    );
    let union: HashSet<_> = set_a.union(&set_b).cloned().collect();
    assert_eq!(union, published);

    let claims: HashMap<String, ClaimDoc> = pool
        .claims()
        .await?
        .into_iter()
        .map(|c| (c.batch_id.clone(), c))
        .collect();
    for (keys, instance) in [(&set_a, "a"), (&set_b, "b")] {
        for k in keys {
            let claim = &claims[&batch_of[k]];
            assert_eq!(claim.instance, instance, "claim of {k}'s batch");
        }
    }
    a.shutdown().await?;
    b.shutdown().await?;
    pool.drop_db().await;
    Ok(())
}

/// Members join and leave (gracefully) while keys are taken at full speed:
/// no key is handed out twice, and at the end every published key was
/// either handed out or recorded for return, never both.
#[tokio::test(flavor = "multi_thread")]
async fn members_join_and_leave_without_duplicates() -> Result<()> {
    let pool = Arc::new(Pool::create(4).await?);
    let group = unique("g");
    let handed = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));

    // Each member runs with a taker task hammering next_key.
    let start_member = |name: &'static str| {
        let pool = Arc::clone(&pool);
        let handed = Arc::clone(&handed);
        let stop = Arc::clone(&stop);
        let group = group.clone();
        async move {
            let c = Arc::new(
                pool.consumer(&group, &Registry::new())
                    .instance_id(name)
                    .build()
                    .await?,
            );
            let taker = {
                let c = Arc::clone(&c);
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match c.next_key() {
                            Ok(k) => mine.push(k.to_string()),
                            Err(kgs_consumer::Error::ShutDown) => break,
                            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                        }
                    }
                    handed.lock().unwrap().extend(mine);
                })
            };
            anyhow::Ok((c, taker))
        }
    };
    let publisher = {
        let pool = Arc::clone(&pool);
        tokio::spawn(async move {
            let mut published = Vec::new();
            for i in 0..40 {
                published.push(pool.publish(20, i % 4).await?);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(published)
        })
    };
    let (a, ta) = start_member("a").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (b, tb) = start_member("b").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report_a = a.shutdown().await?;
    let (c, tc) = start_member("c").await?;
    let published = publisher.await??;
    let batch_ids: HashSet<String> = published.iter().map(|b| b.batch_id.clone()).collect();
    wait_for("every batch claimed", WAIT, || async {
        let claims = pool.claims().await?;
        Ok((claims
            .iter()
            .filter(|c| batch_ids.contains(&c.batch_id))
            .count()
            == batch_ids.len())
        .then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report_b = b.shutdown().await?;
    let report_c = c.shutdown().await?;
    stop.store(true, Ordering::Relaxed);
    for t in [ta, tb, tc] {
        t.await?;
    }

    let handed = handed.lock().unwrap().clone();
    let handed_set: HashSet<String> = handed.iter().cloned().collect();
    assert_eq!(handed_set.len(), handed.len(), "a key was handed out twice");
    let claims = pool.claims().await?;
    let returned: Vec<String> = claims.iter().flat_map(|c| c.return_keys.clone()).collect();
    let returned_set: HashSet<String> = returned.iter().cloned().collect();
    assert_eq!(returned_set.len(), returned.len());
    assert!(
        handed_set.is_disjoint(&returned_set),
        "a key both handed out and returned"
    );
    let all: HashSet<String> = published.iter().flat_map(|b| b.keys.clone()).collect();
    let accounted: HashSet<String> = handed_set.union(&returned_set).cloned().collect();
    assert_eq!(accounted, all, "every key handed out or returned");
    assert!(
        claims.iter().all(|c| c.state != ClaimState::Open),
        "no claim left open"
    );
    let reported = report_a.keys_returned + report_b.keys_returned + report_c.keys_returned;
    assert!(reported <= returned.len());
    pool.drop_db().await;
    Ok(())
}
