//! Tests of key recycling against the real servers: a recycled key is handed
//! out again exactly once across app-server instances, every refusal
//! changes nothing, a crash at each recycle failpoint is finished by the
//! next leader, and the app server's `DELETE /keys/{key}`, `GET
//! /keys/config` and `GET /keys/count`.
//!
//! Pools are tiny (2 decimal digits: 100 keys, all generated at `init`), so
//! `keys ∪ used_keys` can be compared with the whole key space. Needs the
//! built `kgs-producer` and `kgs-app-server` (`cargo build --workspace
//! --bins`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bson::{doc, Document};
use kgs_consumer::{Error as ConsumerError, KeyConsumer, RecycleOutcome};
use kgs_schemas::KeyFormat;
use kgs_tests::{
    kafka_brokers, mongo_client, mongodb_uri, registry_value, terminate, unique, wait_for,
    AppServer, AppServerCmd, ProducerCmd,
};
use prometheus::Registry;
use tokio::process::Child;

const WAIT: Duration = Duration::from_secs(90);
const ALPHABET: &str = "0123456789";

/// One pool of 2-character keys (100 of [`ALPHABET`]) in its own database,
/// with its own consumer group.
struct Pool {
    db: String,
    name: String,
    group: String,
    partitions: u32,
    alphabet: &'static str,
}

impl Pool {
    fn new(partitions: u32) -> Self {
        Self::with_alphabet(partitions, ALPHABET)
    }

    fn with_alphabet(partitions: u32, alphabet: &'static str) -> Self {
        Self {
            db: unique("kgs-recycle"),
            name: unique("p"),
            group: unique("g"),
            partitions,
            alphabet,
        }
    }

    /// Every key of the space.
    fn space(&self) -> HashSet<String> {
        let f = KeyFormat::new(self.alphabet, 2).expect("format");
        (0..f.space()).map(|i| f.key_at(i).expect("key")).collect()
    }

    fn producer(&self, args: &[&str], failpoint: Option<&str>) -> Result<ProducerCmd> {
        Ok(ProducerCmd::new(&self.db, &self.name)?
            .args(args)
            .env("KGS_GROUP", &self.group)
            .failpoint(failpoint))
    }

    /// `init`: the whole space of 100 keys is generated.
    async fn init(&self) -> Result<()> {
        self.producer(&[], None)?
            .init(2, self.partitions)
            .args(["--alphabet", self.alphabet])
            .success()
            .await?;
        Ok(())
    }

    /// Spawns `run` (batches of 10, at most `high` per partition waiting).
    fn run(&self, high: usize, failpoint: Option<&str>) -> Result<Child> {
        self.producer(&[], failpoint)?
            .run(10, high)
            .log_to_temp(&self.name)?
            .spawn()
    }

    /// `kgs-producer recycle KEY...` (or from stdin): (success, stdout).
    async fn recycle_cli(&self, keys: &[&str], stdin: Option<&str>) -> Result<(bool, String)> {
        let mut args = vec!["recycle"];
        args.extend_from_slice(keys);
        let mut c = self
            .producer(&args, None)?
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if stdin.is_some() {
            c = c.stdin(std::process::Stdio::piped());
        }
        let mut child = c.spawn()?;
        if let Some(input) = stdin {
            use tokio::io::AsyncWriteExt;
            let mut pipe = child.stdin.take().context("stdin")?;
            pipe.write_all(input.as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    async fn database(&self) -> Result<mongodb::Database> {
        Ok(mongo_client().await?.database(&self.db))
    }

    async fn docs(&self, coll: &str, filter: Document) -> Result<Vec<Document>> {
        kgs_tests::find_docs(&self.db, coll, filter).await
    }

    async fn ids(&self, coll: &str) -> Result<HashSet<String>> {
        Ok(kgs_tests::string_ids(&self.db, coll)
            .await?
            .into_iter()
            .collect())
    }

    /// `keys ∪ used_keys` is exactly the space, no key in both.
    async fn check_invariant(&self) -> Result<()> {
        let keys = self.ids(&format!("keys.{}", self.name)).await?;
        let used = self.ids(&format!("used_keys.{}", self.name)).await?;
        let both: Vec<_> = keys.intersection(&used).collect();
        ensure!(both.is_empty(), "keys in both collections: {both:?}");
        let union: HashSet<String> = keys.union(&used).cloned().collect();
        ensure!(
            union == self.space(),
            "keys ∪ used_keys is not the generated set: {} + {}",
            keys.len(),
            used.len()
        );
        Ok(())
    }

    /// The epoch of the pool's lease (0 if none).
    async fn lease_epoch(&self) -> Result<i64> {
        let lease = self.docs("leases", doc! { "_id": &self.name }).await?;
        Ok(lease
            .first()
            .and_then(|l| l.get_i64("epoch").ok())
            .unwrap_or(0))
    }

    /// The state of the recycle request of `key` (the only one for it).
    async fn recycle_state(&self, key: &str) -> Result<Option<String>> {
        let r = self.docs("recycles", doc! { "key": key }).await?;
        Ok(r.last()
            .map(|d| d.get_str("state").unwrap_or("").to_owned()))
    }

    fn consumer(&self, instance: &str) -> kgs_consumer::KeyConsumerBuilder {
        KeyConsumer::builder()
            .brokers(kafka_brokers())
            .mongodb_uri(mongodb_uri())
            .database(&self.db)
            .pool(&self.name)
            .group(&self.group)
            .instance_id(instance)
            .registry(Registry::new())
            .watermarks(5, 10)
            .kafka_option("session.timeout.ms", "6000")
            .kafka_option("heartbeat.interval.ms", "500")
    }
}

/// An app server of `pool` in its group, as `instance`: `DELETE` waits up
/// to 3 s for the producer to put the key back.
async fn app_server(pool: &Pool, instance: &str) -> Result<AppServer> {
    AppServerCmd::new(&pool.db, &pool.name)?
        .group(&pool.group)
        .instance(instance)
        .watermarks(5, 10)
        .env("KGS_RECYCLE_WAIT", "3s")
        .start()
        .await
}

/// Takes keys from every server, round robin, until `done` says stop or
/// `timeout` passes; returns every key with how often it came.
async fn collect(
    servers: &[&AppServer],
    timeout: Duration,
    mut done: impl FnMut(&HashMap<String, usize>) -> bool,
) -> Result<HashMap<String, usize>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen: HashMap<String, usize> = HashMap::new();
    while !done(&seen) {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "collecting keys timed out with {} keys",
            seen.len()
        );
        let mut any = false;
        for s in servers {
            if let Some(k) = s.key().await? {
                *seen.entry(k).or_default() += 1;
                any = true;
            }
        }
        if !any {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(seen)
}

/// A key recycled through one app server (handed out by another) comes back
/// exactly once, from either instance, and no other key comes twice; it can
/// be recycled again after that second hand-out. Along the way the HTTP
/// codes: 404 for a never-used key, 400 for a bad key, 404/409 for a repeat;
/// `/keys/config` and `/keys/count` report the collections' figures.
#[tokio::test(flavor = "multi_thread")]
async fn recycled_key_is_handed_out_again_exactly_once_across_instances() -> Result<()> {
    let pool = Pool::new(2);
    pool.init().await?;
    let a = app_server(&pool, "a").await?;
    let b = app_server(&pool, "b").await?;

    // Before any batch: every key is in `keys`, never handed out.
    let (status, body) = a.delete("42").await?;
    assert_eq!(status, 404, "never-used key: {body}");
    assert!(body.contains("not in used_keys") && body.lines().count() == 1);
    for bad in ["123", "4x", "a"] {
        let (status, body) = b.delete(bad).await?;
        assert_eq!(status, 400, "bad key {bad}: {body}");
        assert_eq!(body.lines().count(), 1, "one-line reason: {body:?}");
    }
    let (status, count) = a.get("/keys/count").await?;
    assert_eq!((status, count.trim()), (200, "100"));

    let run = pool.run(2, None)?;
    let first = collect(&[&a, &b], Duration::from_secs(180), |s| s.len() == 100).await?;
    assert!(first.values().all(|n| *n == 1), "a key came twice");
    let (status, count) = b.get("/keys/count").await?;
    assert_eq!((status, count.trim()), (200, "0"), "pool exhausted");
    // collStats of two collections: slow on FerretDB's SQLite backend when
    // the machine is busy (one CI run took over the 10 s of a plain GET).
    let (status, config) =
        kgs_tests::http::http_within(a.addr(), "GET", "/keys/config", Duration::from_secs(60))
            .await?;
    assert_eq!(status, 200, "{config}");
    let config: serde_json::Value = serde_json::from_str(&config)?;
    assert_eq!(config["keys"]["count"], 0, "{config}");
    assert_eq!(config["used_keys"]["count"], 100, "{config}");
    assert_eq!(
        config["used_keys"]["ns"],
        format!("used_keys.{}", pool.name)
    );
    for field in ["size", "avgObjSize", "storageSize", "totalIndexSize"] {
        assert!(config["used_keys"][field].is_i64(), "{field}: {config}");
    }

    // A key handed out by a, whose claim is open (or drained) in a, recycled
    // through b: 409 while a's batch is open, then accepted.
    let claims = pool.docs("claims", doc! { "instance": "a" }).await?;
    let batch = claims.first().context("a claimed nothing")?;
    let record = pool
        .docs("batches", doc! { "_id": batch.get_str("_id")? })
        .await?;
    let key = record[0].get_array("keys")?[0]
        .as_str()
        .context("key")?
        .to_owned();
    let (status, body) = wait_for("recycle accepted", WAIT, || async {
        let (status, body) = b.delete(&key).await?;
        ensure!(
            status != 409 || body.contains("still open in instance a"),
            "{status} {body}"
        );
        Ok((status != 409).then_some((status, body)))
    })
    .await?;
    assert!(status == 200 || status == 202, "{status} {body}");
    // Again: already recycled (409), or done and in a new batch that is not
    // claimed yet (409 unclaimed), or claimed but still open (409).
    let (status, body) = b.delete(&key).await?;
    assert!(status == 404 || status == 409, "repeat: {status} {body}");

    // It comes back exactly once, and nothing else does.
    let again = collect(&[&a, &b], WAIT, |s| s.contains_key(&key)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let more = collect(&[&a, &b], Duration::from_secs(5), |_| true).await?;
    assert_eq!(again.len() + more.len(), 1, "{again:?} {more:?}");
    assert_eq!(again[&key], 1);

    // Handed out again (another batch): recyclable again.
    let (status, body) = wait_for("second recycle accepted", WAIT, || async {
        let (status, body) = a.delete(&key).await?;
        Ok((status != 409).then_some((status, body)))
    })
    .await?;
    assert!(status == 200 || status == 202, "{status} {body}");
    wait_for("both recycles done", WAIT, || async {
        let done = pool
            .docs("recycles", doc! { "key": &key, "state": "done" })
            .await?;
        Ok((done.len() == 2).then_some(()))
    })
    .await?;
    assert!(terminate(run).await?.success());
    pool.check_invariant().await?;
    drop((a, b));
    Ok(())
}

/// The admin surface of the app server: with a token configured, recycle
/// without it or with a wrong one is `401` and records nothing; with it the
/// key is recycled and handed out again, once. The keys hold `/`, `%` and
/// `?` (an alphabet may): sent percent-encoded, each reaches recycle intact.
#[tokio::test(flavor = "multi_thread")]
async fn recycle_needs_the_admin_token_and_takes_percent_encoded_keys() -> Result<()> {
    let pool = Pool::with_alphabet(1, "ab/%?");
    pool.init().await?;
    let token = "admin-token-of-this-test-0123";
    let a = AppServerCmd::new(&pool.db, &pool.name)?
        .group(&pool.group)
        .instance("a")
        .watermarks(5, 10)
        .env("KGS_RECYCLE_WAIT", "3s")
        .env("KGS_ADMIN_TOKEN", token)
        .start()
        .await?;
    let run = pool.run(2, None)?;
    let all = collect(&[&a], WAIT, |s| s.len() == 25).await?;
    assert_eq!(all.keys().cloned().collect::<HashSet<_>>(), pool.space());
    let unsafe_keys = ["a/", "%b", "?%", "//"];

    for key in unsafe_keys {
        for wrong in [None, Some("not-the-admin-token-0123"), Some("")] {
            let (status, body) = a.delete_with_token(key, wrong).await?;
            assert_eq!(status, 401, "{key} with {wrong:?}: {body}");
        }
    }
    assert!(
        a.metric("kgs_app_server_unauthorized_requests_total")
            .await?
            >= 12.0
    );
    assert!(
        pool.docs("recycles", doc! {}).await?.is_empty(),
        "an unauthorized request recorded a recycle"
    );

    for key in unsafe_keys {
        let (status, body) = wait_for("recycle accepted", WAIT, || async {
            let (status, body) = a.delete_with_token(key, Some(token)).await?;
            ensure!(
                status == 200 || status == 202 || status == 409,
                "{key}: {status} {body}"
            );
            Ok((status != 409).then_some((status, body)))
        })
        .await?;
        assert!(status == 200 || status == 202, "{key}: {status} {body}");
        assert!(pool.recycle_state(key).await?.is_some(), "{key}");
    }
    // Each comes back exactly once, and nothing else does.
    let again = collect(&[&a], WAIT, |s| s.len() == unsafe_keys.len()).await?;
    assert_eq!(
        again.keys().map(String::as_str).collect::<HashSet<_>>(),
        unsafe_keys.into_iter().collect::<HashSet<_>>()
    );
    assert!(again.values().all(|n| *n == 1), "{again:?}");
    assert!(terminate(run).await?.success());
    pool.check_invariant().await?;
    drop(a);
    Ok(())
}

/// Without a token, the app server serves recycle on loopback addresses
/// only: on any other address it refuses to start, with one line, before it
/// listens or joins anything; a token too short to be secret is refused too.
#[tokio::test(flavor = "multi_thread")]
async fn recycle_without_a_token_is_refused_off_loopback() -> Result<()> {
    let pool = Pool::new(1);
    pool.init().await?;
    for (addr, token, expected) in [
        (
            "0.0.0.0:0",
            None,
            "not a loopback address, without an admin token",
        ),
        ("127.0.0.1:0", Some("short"), "at least 16 characters"),
    ] {
        let mut cmd = AppServerCmd::new(&pool.db, &pool.name)?.args(["--http-addr", addr]);
        if let Some(t) = token {
            cmd = cmd.env("KGS_ADMIN_TOKEN", t);
        }
        let out = cmd.output().await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{addr}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{addr}: not one line: {stderr}");
        assert!(
            lines[0].starts_with("kgs-app-server: ") && lines[0].contains(expected),
            "{stderr}"
        );
    }
    Ok(())
}

/// Every refusal (bad format, never used, reserved, unclaimed batch, still in
/// the own buffer, open in another instance, recycled twice) is reported as
/// such and changes nothing; the one accepted request is then done by the
/// leader and `keys ∪ used_keys` stays the generated set.
#[tokio::test(flavor = "multi_thread")]
async fn every_refusal_changes_nothing() -> Result<()> {
    let pool = Pool::new(1);
    pool.init().await?;
    // Reserve one generated key (never handed out).
    let keys_before = pool.ids(&format!("keys.{}", pool.name)).await?;
    let reserved = keys_before.iter().next().context("keys")?.clone();
    pool.producer(&["reserve", &reserved], None)?
        .success()
        .await?;

    let run = pool.run(2, None)?;
    let registry = Registry::new();
    let a = pool
        .consumer("a")
        .registry(registry.clone())
        .build()
        .await?;
    let mut taken = Vec::new();
    while taken.len() < 3 {
        match a.next_key_wait(Duration::from_secs(1)).await {
            Ok(k) => taken.push(k.to_string()),
            Err(ConsumerError::Empty) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // a stops fetching at 10 buffered keys; the producer keeps 2 batches
    // waiting behind it, unclaimed.
    wait_for("an unclaimed published batch", WAIT, || async {
        let published = pool
            .docs("batches", doc! { "pool": &pool.name, "state": "published" })
            .await?;
        let claimed = pool.ids("claims").await?;
        Ok(published
            .into_iter()
            .find(|b| !claimed.contains(b.get_str("_id").unwrap_or("")))
            .map(|_| ()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let claimed = pool.ids("claims").await?;
    let unclaimed = pool
        .docs("batches", doc! { "pool": &pool.name, "state": "published" })
        .await?
        .into_iter()
        .find(|b| !claimed.contains(b.get_str("_id").unwrap_or("")))
        .context("unclaimed batch")?;
    let unclaimed_key = unclaimed.get_array("keys")?[0]
        .as_str()
        .context("key")?
        .to_owned();
    // A key of a's open batch that a has not handed out.
    let own_claim = pool.docs("claims", doc! { "instance": "a" }).await?;
    let own_batch = pool
        .docs("batches", doc! { "_id": own_claim[0].get_str("_id")? })
        .await?;
    let buffered_key = own_batch[0]
        .get_array("keys")?
        .iter()
        .filter_map(|k| k.as_str())
        .find(|k| !taken.iter().any(|t| t == k))
        .context("a buffered key")?
        .to_owned();
    let never_used = pool
        .ids(&format!("keys.{}", pool.name))
        .await?
        .into_iter()
        .next()
        .context("a key left in keys")?;

    let used_before = pool
        .docs(&format!("used_keys.{}", pool.name), doc! {})
        .await?;
    let refusal = |r: kgs_consumer::Result<RecycleOutcome>| match r {
        Err(ConsumerError::NotRecyclable { refusal, .. }) => refusal.kind().to_owned(),
        Err(ConsumerError::BadKey { .. }) => "bad_key".to_owned(),
        other => format!("not refused: {other:?}"),
    };
    assert_eq!(refusal(a.recycle("123").await), "bad_key", "wrong length");
    assert_eq!(refusal(a.recycle("1z").await), "bad_key", "wrong alphabet");
    assert_eq!(refusal(a.recycle(&never_used).await), "not_used");
    assert_eq!(refusal(a.recycle(&reserved).await), "reserved");
    assert_eq!(refusal(a.recycle(&unclaimed_key).await), "unclaimed");
    assert_eq!(refusal(a.recycle(&buffered_key).await), "in_buffer");
    // The command line sees no buffer: a's open batch is open elsewhere;
    // one line per key, exit 1, from stdin too.
    let (ok, out) = pool
        .recycle_cli(&[], Some(&format!("{} {}\n", taken[1], reserved)))
        .await?;
    assert!(!ok, "exit status must say some were refused");
    assert!(
        out.contains(&format!("{}: refused (open_elsewhere): batch", taken[1])),
        "{out}"
    );
    assert!(
        out.contains(&format!("{reserved}: refused (reserved)")),
        "{out}"
    );
    // a handed taken[0] out: accepted once, then "already recycled".
    assert!(matches!(
        a.recycle(&taken[0]).await?,
        RecycleOutcome::Accepted { .. }
    ));
    assert_eq!(refusal(a.recycle(&taken[0]).await), "already_recycled");
    // Counted by outcome in the app's registry.
    assert_eq!(outcome_count(&registry, "accepted"), 1.0);
    assert_eq!(outcome_count(&registry, "already_recycled"), 1.0);
    assert_eq!(outcome_count(&registry, "bad_key"), 2.0);
    assert_eq!(outcome_count(&registry, "open_elsewhere"), 0.0);
    // The refusals changed nothing: the used documents of the refused keys
    // are as they were, and the never-used key is still in `keys`.
    let used_now = pool
        .docs(&format!("used_keys.{}", pool.name), doc! {})
        .await?;
    let of = |docs: &[Document], k: &str| {
        docs.iter()
            .find(|d| d.get_str("_id").ok() == Some(k))
            .cloned()
    };
    for k in [&reserved, &unclaimed_key, &buffered_key, &taken[1]] {
        let before = of(&used_before, k);
        assert!(before.is_some(), "{k} was not used");
        assert_eq!(before, of(&used_now, k), "{k} changed");
    }
    assert!(of(&used_now, &never_used).is_none());
    wait_for("the recycle done", WAIT, || async {
        Ok((pool.recycle_state(&taken[0]).await?.as_deref() == Some("done")).then_some(()))
    })
    .await?;
    a.abandon().await;
    assert!(terminate(run).await?.success());
    pool.check_invariant().await?;
    Ok(())
}

/// The value of `kgs_consumer_recycle_requests_total{outcome}`.
fn outcome_count(registry: &Registry, outcome: &str) -> f64 {
    registry_value(
        registry,
        kgs_consumer::metrics::RECYCLE_REQUESTS_TOTAL,
        Some(("outcome", outcome)),
    )
}

/// A crash of the leader at a recycle failpoint, then a restart: the request
/// ends `done`, the key is in exactly one re-batch of its old batch (a
/// record whose `from` is that batch, with its old `n`), published, and its
/// `used_keys` document names that re-batch (it never left `used_keys`);
/// `keys ∪ used_keys` is the generated set, none in both.
async fn recycle_crash(failpoint: &str) -> Result<()> {
    let pool = Pool::new(1);
    pool.init().await?;
    let run = pool.run(2, None)?;
    wait_for("2 published batches", WAIT, || async {
        let b = pool
            .docs("batches", doc! { "pool": &pool.name, "state": "published" })
            .await?;
        Ok((b.len() >= 2).then_some(b))
    })
    .await?;
    assert!(terminate(run).await?.success());
    let batch = pool
        .docs("batches", doc! { "pool": &pool.name, "state": "published" })
        .await?
        .remove(0);
    let id = batch.get_str("_id")?.to_owned();
    let key = batch.get_array("keys")?[3]
        .as_str()
        .context("key")?
        .to_owned();
    let n = batch.get_array("ns")?[3].as_i64().context("n")?;
    // As a consumer that handed the whole batch out would leave it.
    pool.database()
        .await?
        .collection::<Document>("claims")
        .insert_one(doc! {
            "_id": &id, "pool": &pool.name, "group": &pool.group, "instance": "test",
            "token": "test", "partition": 0, "offset": 0_i64, "keys": 10_i64, "state": "drained",
            "return_keys": [], "claimed_at": bson::DateTime::now(),
        })
        .await?;
    let (ok, out) = pool.recycle_cli(&[&key], None).await?;
    assert!(ok, "{out}");
    assert_eq!(out.trim(), format!("{key}: accepted"));

    let mut crashed = pool.run(2, Some(failpoint))?;
    let status = tokio::time::timeout(WAIT, crashed.wait()).await??;
    assert!(!status.success(), "{failpoint} did not fire");
    let epoch = pool.lease_epoch().await?;
    let run = pool.run(2, None)?;
    // The restarted producer leads (after the crashed one's lease expired)...
    wait_for("a new leader", WAIT, || async {
        Ok((pool.lease_epoch().await? > epoch).then_some(()))
    })
    .await?;
    // ...and finishes the request.
    wait_for("recycle done", WAIT, || async {
        Ok((pool.recycle_state(&key).await?.as_deref() == Some("done")).then_some(()))
    })
    .await?;
    assert!(terminate(run).await?.success());
    pool.check_invariant().await?;
    let back = pool
        .docs(&format!("keys.{}", pool.name), doc! { "_id": &key })
        .await?;
    ensure!(back.is_empty(), "{key} is in keys again");
    let again: Vec<Document> = pool
        .docs("batches", doc! { "from": &id })
        .await?
        .into_iter()
        .filter(|r| {
            r.get_array("keys")
                .is_ok_and(|ks| ks.iter().any(|k| k.as_str() == Some(key.as_str())))
        })
        .collect();
    ensure!(
        again.len() == 1,
        "{key} in {} re-batches of {id}",
        again.len()
    );
    let rebatch = &again[0];
    ensure!(
        rebatch.get_str("state")? == "published",
        "re-batch not published"
    );
    let at = rebatch
        .get_array("keys")?
        .iter()
        .position(|k| k.as_str() == Some(key.as_str()))
        .context("key")?;
    assert_eq!(
        rebatch.get_array("ns")?[at].as_i64(),
        Some(n),
        "{key} lost its n"
    );
    let used = pool
        .docs(&format!("used_keys.{}", pool.name), doc! { "_id": &key })
        .await?;
    assert_eq!(
        used.first().and_then(|u| u.get_str("batch").ok()),
        rebatch.get_str("_id").ok(),
        "used_keys does not name the re-batch"
    );
    let r = pool.docs("recycles", doc! { "key": &key }).await?;
    assert_eq!(r.len(), 1);
    assert!(r[0].get_datetime("done_at").is_ok());
    Ok(())
}

macro_rules! crash_tests {
    ($($name:ident => $point:literal),* $(,)?) => {$(
        /// Crash at this recycle failpoint, restart: the recycle is finished,
        /// nothing lost, nothing in both collections.
        #[tokio::test(flavor = "multi_thread")]
        async fn $name() -> Result<()> {
            recycle_crash($point).await
        }
    )*};
}

crash_tests! {
    crash_recycle_rebatch_after_record => "rebatch_after_record",
    crash_recycle_rebatch_after_used => "rebatch_after_used",
    crash_recycle_after_rebatch => "recycle_after_rebatch",
    crash_recycle_after_done => "recycle_after_done",
}

/// Quarantine: in a pool with a recycle cooldown (6 s here; 30 days unless
/// `init` says otherwise), a recycled key is accepted at once (`202`,
/// "quarantined until …"), shown by `stats`, and not handed out before its
/// time although the pool has nothing else to give; then it comes back
/// exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_recycled_key_waits_out_its_quarantine_then_comes_back_once() -> Result<()> {
    quarantine(false).await
}

/// The same with host clocks an hour off, none of which may shorten the
/// quarantine: the request made by `kgs-producer recycle` on a host an hour
/// behind, the leader on a host an hour ahead. Both use the MongoDB
/// server's clock; before, `due_at` came out an hour in the past and the
/// leader released the key at once.
#[tokio::test(flavor = "multi_thread")]
async fn host_clocks_do_not_shorten_a_quarantine() -> Result<()> {
    quarantine(true).await
}

async fn quarantine(skewed_clocks: bool) -> Result<()> {
    let pool = Pool::new(1);
    pool.producer(&[], None)?
        .init(2, 1)
        .args(["--alphabet", ALPHABET, "--recycle-cooldown", "6s"])
        .success()
        .await?;
    let a = app_server(&pool, "a").await?;
    let run = if skewed_clocks {
        pool.producer(&[], None)?
            .run(10, 2)
            .log_to_temp(&pool.name)?
            .clock_offset(3600)?
            .spawn()?
    } else {
        pool.run(2, None)?
    };
    let first = collect(&[&a], Duration::from_secs(180), |s| s.len() == 100).await?;
    assert!(first.values().all(|n| *n == 1), "a key came twice");
    let key = first.keys().next().context("a key")?.clone();
    if skewed_clocks {
        let said = wait_for("recycle accepted", WAIT, || async {
            let out = pool
                .producer(&["recycle", &key], None)?
                .clock_offset(-3600)?
                .output()
                .await?;
            let said = String::from_utf8_lossy(&out.stdout).into_owned();
            Ok(out.status.success().then_some(said))
        })
        .await?;
        ensure!(
            said.starts_with(&format!("{key}: accepted, quarantined until ")),
            "{said}"
        );
    } else {
        let (status, body) = wait_for("recycle accepted", WAIT, || async {
            let (status, body) = a.delete(&key).await?;
            Ok((status != 409).then_some((status, body)))
        })
        .await?;
        ensure!(
            status == 202 && body.starts_with("accepted, quarantined until "),
            "{status} {body}"
        );
    }
    let request = pool
        .docs("recycles", doc! { "key": &key })
        .await?
        .pop()
        .context("the request")?;
    ensure!(request.get_str("state")? == "requested", "{request:?}");
    let due = request.get_datetime("due_at")?.to_chrono();
    ensure!(
        due > chrono::Utc::now() + chrono::Duration::seconds(3),
        "due at {due}: not 6 s after the request by this host's (the server's) clock"
    );
    let out = pool.producer(&["stats"], None)?.success().await?;
    let stats = String::from_utf8_lossy(&out.stdout);
    ensure!(
        stats.contains("cooldown 6 s, 1 keys quarantined, next back at"),
        "{stats}"
    );
    // Nothing to hand out but the quarantined key: none until it is due.
    let back = loop {
        let got = a.key().await?;
        let now = chrono::Utc::now();
        match got {
            Some(k) => {
                ensure!(k == key, "{k} came, not the recycled {key}");
                ensure!(
                    now >= due,
                    "{key} came back at {now}, before its quarantine ended at {due}"
                );
                break now;
            }
            None => {
                ensure!(
                    now < due + chrono::Duration::seconds(60),
                    "{key} not back within 60 s of {due}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // Once: nothing more comes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..10 {
        ensure!(
            a.key().await?.is_none(),
            "a key after the recycled one came back at {back}"
        );
    }
    let done = pool
        .docs("recycles", doc! { "key": &key, "state": "done" })
        .await?;
    ensure!(done.len() == 1, "request not done: {done:?}");
    assert!(terminate(run).await?.success());
    pool.check_invariant().await?;
    drop(a);
    Ok(())
}
