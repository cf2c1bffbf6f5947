//! Integration tests of `kgs-producer` against the real servers: generation of
//! whole key spaces, `init` idempotence, crash at every failpoint then
//! recovery, two producers on one pool (also with one host clock a lease
//! off), backlog watermarks, `reserve`.
//!
//! Each test spawns the built binary (`cargo build -p kgs-producer` first)
//! with its own database, pool and topic, and checks the invariants directly
//! in MongoDB and Kafka: no batch twice in the topic, no key in both
//! collections, every key of the space in exactly one of them.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bson::{doc, Document};
use chrono::{DateTime, Utc};
use kgs_schemas::docs::{LeaseDoc, LeaseEpochDoc, PoolDoc, LEASES, LEASE_EPOCHS, POOLS};
use kgs_schemas::{KeyBatch, KeyFormat};
use kgs_tests::kafka::{commit_offsets, CommitAt};
use kgs_tests::process::send_signal;
use kgs_tests::{
    free_addr, http_get, kafka_brokers, kafka_config, mongo_client, mongodb_uri, terminate, unique,
    wait_for, ProducerCmd, Signal,
};
use tokio::process::Child;

/// One pool in its own database.
struct Pool {
    db: String,
    name: String,
    partitions: i32,
}

impl Pool {
    fn new(partitions: i32) -> Self {
        Self {
            db: unique("kgs"),
            name: unique("p"),
            partitions,
        }
    }

    /// The pool document (written by `init`).
    async fn pool_doc(&self) -> Result<PoolDoc> {
        self.db()
            .await?
            .collection::<PoolDoc>(POOLS)
            .find_one(doc! { "_id": &self.name })
            .await?
            .context("pool document")
    }

    /// The pool's topic, as `init` named it (scoped by the incarnation).
    async fn topic(&self) -> Result<String> {
        Ok(self.pool_doc().await?.topic)
    }

    /// The consumer group the producer reads the backlog of by default.
    async fn group(&self) -> Result<String> {
        Ok(self.pool_doc().await?.default_group())
    }

    /// A `kgs-producer` command with this pool's servers and database.
    fn command(&self, args: &[&str], failpoint: Option<&str>) -> Result<ProducerCmd> {
        Ok(ProducerCmd::new(&self.db, &self.name)?
            .args(args)
            .failpoint(failpoint))
    }

    /// Runs a one-shot command to completion.
    async fn exec(&self, args: &[&str], failpoint: Option<&str>) -> Result<Output> {
        self.command(args, failpoint)?.output().await
    }

    /// `init` that must succeed.
    async fn init(&self, length: u32, extra: &[&str]) -> Result<()> {
        self.command(&[], None)?
            .init(length, self.partitions as u32)
            .args(extra)
            .success()
            .await?;
        Ok(())
    }

    /// Spawns `run` with small batches and watermarks.
    fn run(&self, high_watermark: usize, extra: &[&str], failpoint: Option<&str>) -> Result<Child> {
        // Logs of each spawned producer go to the temp dir, for post-mortems.
        self.command(&[], failpoint)?
            .run(50, high_watermark)
            .args(extra)
            .log_to_temp(&self.name)?
            .spawn()
    }

    async fn db(&self) -> Result<mongodb::Database> {
        Ok(mongo_client().await?.database(&self.db))
    }

    /// Every `_id` of a collection.
    async fn ids(&self, coll: &str) -> Result<Vec<String>> {
        kgs_tests::string_ids(&self.db, coll).await
    }

    async fn docs(&self, coll: &str, filter: Document) -> Result<Vec<Document>> {
        kgs_tests::find_docs(&self.db, coll, filter).await
    }

    /// Every committed batch in the topic, with partition and offset.
    async fn topic_batches(&self) -> Result<Vec<(i32, i64, KeyBatch)>> {
        kgs_tests::read_topic_batches(
            &kafka_brokers(),
            &self.topic().await?,
            self.partitions,
            Duration::from_secs(30),
        )
        .await
    }

    /// Proves the protocol's invariants for a pool whose whole space of
    /// `space` keys was generated: every key is in exactly one collection, no
    /// batch or key is twice in the topic, every key in the topic is in
    /// `used_keys` with its batch, and no batch record is left unfinished.
    async fn check_invariants(&self, space: usize) -> Result<Vec<(i32, i64, KeyBatch)>> {
        self.check_invariants_returned(space, &HashSet::new()).await
    }

    /// [`Pool::check_invariants`], where the `returned` keys of published
    /// batches went round again: each is in the topic twice, in its first
    /// batch and in one re-batch of it (a record whose `from` is that batch),
    /// and its `used_keys` document names the re-batch.
    async fn check_invariants_returned(
        &self,
        space: usize,
        returned: &HashSet<String>,
    ) -> Result<Vec<(i32, i64, KeyBatch)>> {
        let keys: HashSet<String> = self
            .ids(&format!("keys.{}", self.name))
            .await?
            .into_iter()
            .collect();
        let used_docs = self
            .docs(&format!("used_keys.{}", self.name), doc! {})
            .await?;
        let used: HashMap<String, Option<String>> = used_docs
            .iter()
            .map(|d| {
                (
                    d.get_str("_id").unwrap().to_owned(),
                    d.get_str("batch").ok().map(str::to_owned),
                )
            })
            .collect();
        let both: Vec<_> = keys.iter().filter(|k| used.contains_key(*k)).collect();
        ensure!(both.is_empty(), "keys in both collections: {both:?}");
        ensure!(
            keys.len() + used.len() == space,
            "key lost or extra: {} in keys + {} used != {space}",
            keys.len(),
            used.len()
        );
        let batches = self.topic_batches().await?;
        let from: HashMap<String, String> = self
            .docs("batches", doc! { "pool": &self.name })
            .await?
            .iter()
            .filter_map(|r| {
                Some((
                    r.get_str("_id").ok()?.to_owned(),
                    r.get_str("from").ok()?.to_owned(),
                ))
            })
            .collect();
        let mut ids = HashSet::new();
        // Key -> the batches it is in, in topic order per partition.
        let mut seen: HashMap<String, Vec<String>> = HashMap::new();
        for (_, _, b) in &batches {
            ensure!(
                ids.insert(b.batch_id.clone()),
                "batch {} twice in the topic",
                b.batch_id
            );
            for k in &b.keys {
                seen.entry(k.clone()).or_default().push(b.batch_id.clone());
            }
        }
        for (k, in_batches) in &seen {
            ensure!(!keys.contains(k), "published key {k} is in keys");
            let last = match in_batches.as_slice() {
                [one] => one,
                [a, b] if returned.contains(k) => {
                    // Whichever partition came first: one is the re-batch of the other.
                    let (first, again) = if from.get(b) == Some(a) {
                        (a, b)
                    } else {
                        (b, a)
                    };
                    ensure!(
                        from.get(again) == Some(first),
                        "returned key {k} is in {first} and {again}, which is no re-batch of it"
                    );
                    again
                }
                more => anyhow::bail!("key {k} in {} batches: {more:?}", more.len()),
            };
            ensure!(
                used.get(k) == Some(&Some(last.clone())),
                "key {k} of batch {last} is not in used_keys with that batch"
            );
        }
        for k in returned {
            ensure!(
                seen.get(k).is_some_and(|b| b.len() == 2),
                "returned key {k} was not handed out again"
            );
        }
        let unfinished = self
            .docs(
                "batches",
                doc! { "pool": &self.name, "state": { "$ne": "published" } },
            )
            .await?;
        ensure!(
            unfinished.is_empty(),
            "unfinished batch records: {unfinished:?}"
        );
        Ok(batches)
    }
}

/// Commits the end of every partition for `group`, as a consumer that read everything.
async fn commit_all(topic: String, partitions: i32, group: String) -> Result<()> {
    commit_offsets(&topic, partitions, &group, CommitAt::End).await
}

/// Pid of a spawned producer (to SIGSTOP or SIGCONT it).
fn pid(child: &Child) -> Result<u32> {
    child.id().context("the producer was already reaped")
}

/// Waits until the topic holds exactly `n` batches and nothing is unfinished.
async fn wait_batches(pool: &Pool, n: usize, timeout: Duration) -> Result<()> {
    let topic = pool.topic().await?;
    wait_for(&format!("{n} batches in {topic}"), timeout, || async {
        let batches = pool.topic_batches().await?;
        ensure!(
            batches.len() <= n,
            "topic overfilled: {} > {n} batches",
            batches.len()
        );
        Ok((batches.len() == n).then_some(()))
    })
    .await
}

/// The whole 1- and 2-letter base62 spaces are generated exactly once, `n`
/// runs over 0..space, and the hand-out order is not lexicographic.
#[tokio::test]
async fn whole_small_spaces_are_generated_exactly_once() -> Result<()> {
    for length in [1u32, 2] {
        let pool = Pool::new(1);
        pool.init(length, &["--generate-chunk", "1000"]).await?;
        let format = KeyFormat::base62(length)?;
        let mut docs = pool.docs(&format!("keys.{}", pool.name), doc! {}).await?;
        docs.sort_by_key(|d| d.get_i64("n").unwrap());
        let keys: Vec<String> = docs
            .iter()
            .map(|d| d.get_str("_id").unwrap().to_owned())
            .collect();
        let ns: Vec<i64> = docs.iter().map(|d| d.get_i64("n").unwrap()).collect();
        assert_eq!(ns, (0..format.space() as i64).collect::<Vec<_>>());
        let all: HashSet<String> = (0..format.space())
            .map(|i| format.key_at(i).unwrap())
            .collect();
        assert_eq!(keys.iter().cloned().collect::<HashSet<_>>(), all);
        let mut sorted = keys.clone();
        sorted.sort();
        assert_ne!(keys, sorted, "hand-out order is lexicographic");
        let p = pool.docs("pools", doc! {}).await?;
        assert_eq!(p[0].get_i64("cursor")?, format.space() as i64);
        assert!(p[0]
            .get("generating")
            .is_none_or(|g| g == &bson::Bson::Null));
    }
    Ok(())
}

/// Re-running `init` with the same settings changes nothing; other settings
/// fail with one clear line and leave the pool as it was.
#[tokio::test]
async fn init_is_idempotent_and_refuses_conflicts() -> Result<()> {
    let pool = Pool::new(2);
    pool.init(1, &[]).await?;
    let before = pool.docs("pools", doc! {}).await?;
    pool.init(1, &[]).await?;
    let out = pool
        .exec(&["init", "--length", "2", "--partitions", "2"], None)
        .await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(err.contains("other settings"), "{err}");
    let out = pool
        .exec(&["init", "--length", "1", "--partitions", "3"], None)
        .await?;
    assert!(!out.status.success());
    assert_eq!(pool.docs("pools", doc! {}).await?, before);
    assert_eq!(pool.ids(&format!("keys.{}", pool.name)).await?.len(), 62);
    Ok(())
}

/// `init` creates the pool topic with retention that never deletes a
/// batch (`retention.ms` and `retention.bytes` -1): consumers away for
/// longer than the broker's default week lose nothing.
#[tokio::test]
async fn init_creates_the_topic_with_unlimited_retention() -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;

    let pool = Pool::new(1);
    pool.init(1, &[]).await?;
    let topic = pool.topic().await?;
    let admin: AdminClient<DefaultClientContext> = kafka_config().create()?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(&topic)], &opts)
        .await?;
    let config = described
        .into_iter()
        .next()
        .context("no config result")?
        .map_err(|e| anyhow::anyhow!("describe {topic}: {e}"))?;
    for (name, wanted) in [("retention.ms", "-1"), ("retention.bytes", "-1")] {
        let entry = config
            .get(name)
            .with_context(|| format!("{name} missing"))?;
        assert_eq!(entry.value.as_deref(), Some(wanted), "{topic} {name}");
    }
    Ok(())
}

/// A bad MongoDB address fails with one line and a non-zero exit after the
/// bounded retry.
#[tokio::test]
async fn unreachable_server_is_one_line() -> Result<()> {
    let pool = Pool::new(1);
    let out = pool
        .command(&["stats"], None)?
        .env(
            "KGS_MONGODB_URI",
            "mongodb://127.0.0.1:1/?directConnection=true",
        )
        .env("KGS_CONNECT_TIMEOUT", "1s")
        .output()
        .await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(err.contains("cannot reach MongoDB"), "{err}");
    Ok(())
}

/// Crashing `init` at a generation failpoint and re-running it generates the
/// whole space exactly once (nothing skipped, nothing twice).
async fn generation_crash(failpoint: &str) -> Result<()> {
    let pool = Pool::new(1);
    let out = pool
        .command(&[], Some(failpoint))?
        .init(2, 1)
        .args(["--generate-chunk", "1000"])
        .output()
        .await?;
    assert!(!out.status.success(), "{failpoint} did not fire");
    pool.init(2, &["--generate-chunk", "1000"]).await?;
    pool.check_invariants(3_844).await?;
    assert_eq!(pool.ids(&format!("keys.{}", pool.name)).await?.len(), 3_844);
    Ok(())
}

/// Crashing `run` at a move/publish failpoint and restarting it: the batch is
/// finished, none is published twice, no key is lost or in both collections.
async fn move_crash(failpoint: &str) -> Result<()> {
    let pool = Pool::new(2);
    pool.init(2, &[]).await?;
    let status = pool.run(2, &[], Some(failpoint))?.wait().await?;
    assert!(!status.success(), "{failpoint} did not fire");
    let run = pool.run(2, &[], None)?;
    // High watermark 2 on 2 partitions.
    wait_batches(&pool, 4, Duration::from_secs(60)).await?;
    wait_for(
        "batch records finished",
        Duration::from_secs(30),
        || async {
            let left = pool
                .docs(
                    "batches",
                    doc! { "pool": &pool.name, "state": { "$ne": "published" } },
                )
                .await?;
            Ok(left.is_empty().then_some(()))
        },
    )
    .await?;
    assert!(terminate(run).await?.success());
    let batches = pool.check_invariants(3_844).await?;
    assert_eq!(batches.len(), 4);
    Ok(())
}

macro_rules! crash_tests {
    ($($name:ident => $kind:ident($point:literal)),* $(,)?) => {$(
        /// Crash at this failpoint, restart: nothing lost, nothing twice.
        #[tokio::test]
        async fn $name() -> Result<()> {
            $kind($point).await
        }
    )*};
}

/// A consumer's `returning` claim is processed even across a crash at each
/// return failpoint: the unused keys go out again in a new batch (a record
/// whose `from` is the claim's batch, their `n` kept), never leave
/// `used_keys`, and the claim ends `returned`.
async fn return_crash(failpoint: &str) -> Result<()> {
    let pool = Pool::new(2);
    pool.init(2, &[]).await?;
    let run = pool.run(2, &[], None)?;
    wait_batches(&pool, 4, Duration::from_secs(60)).await?;
    assert!(terminate(run).await?.success());
    let (partition, offset, batch) = pool.topic_batches().await?.remove(0);
    let back = return_ten(&pool, partition, offset, &batch).await?;
    let status = pool.run(2, &[], Some(failpoint))?.wait().await?;
    assert!(!status.success(), "{failpoint} did not fire");
    let run = pool.run(2, &[], None)?;
    wait_for("claim returned", Duration::from_secs(30), || async {
        let c = pool.docs("claims", doc! {}).await?;
        Ok((c[0].get_str("state")? == "returned").then_some(()))
    })
    .await?;
    assert!(terminate(run).await?.success());
    let returned: HashSet<String> = back.iter().cloned().collect();
    pool.check_invariants_returned(3_844, &returned).await?;
    let record = pool
        .docs("batches", doc! { "_id": &batch.batch_id })
        .await?;
    let ns = record[0].get_array("ns")?;
    let again = pool
        .docs(
            "batches",
            doc! { "from": &batch.batch_id, "state": "published" },
        )
        .await?;
    let mut found = 0;
    for r in &again {
        let keys = r.get_array("keys")?;
        let again_ns = r.get_array("ns")?;
        for (key, n) in keys.iter().zip(again_ns) {
            let i = back
                .iter()
                .position(|k| Some(k.as_str()) == key.as_str())
                .with_context(|| format!("{key} re-batched but not returned"))?;
            assert_eq!(n.as_i64(), ns[i].as_i64(), "{key} lost its n");
            found += 1;
        }
    }
    assert_eq!(
        found,
        back.len(),
        "every returned key in exactly one re-batch"
    );
    Ok(())
}

crash_tests! {
    crash_rebatch_after_record => return_crash("rebatch_after_record"),
    crash_rebatch_after_used => return_crash("rebatch_after_used"),
    crash_return_after_rebatch => return_crash("return_after_rebatch"),
    crash_gen_after_mark => generation_crash("gen_after_mark"),
    crash_gen_after_insert => generation_crash("gen_after_insert"),
    crash_gen_after_cursor => generation_crash("gen_after_cursor"),
    crash_move_after_record => move_crash("move_after_record"),
    crash_move_after_used => move_crash("move_after_used"),
    crash_move_after_delete => move_crash("move_after_delete"),
    crash_move_after_moved => move_crash("move_after_moved"),
    crash_publish_after_offset => move_crash("publish_after_offset"),
    crash_publish_after_send => move_crash("publish_after_send"),
    crash_publish_after_commit => move_crash("publish_after_commit"),
    crash_publish_after_record => move_crash("publish_after_record"),
}

/// With no consumer the topic stops at the high watermark; when the group
/// commits, the producer refills; SIGTERM exits 0 and releases the lease.
#[tokio::test]
async fn watermarks_stop_and_refill() -> Result<()> {
    let pool = Pool::new(2);
    pool.init(2, &[]).await?;
    let run = pool.run(3, &[], None)?;
    wait_batches(&pool, 6, Duration::from_secs(60)).await?;
    // No consumer: it must stay at 6 (wait_batches fails on overfill).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pool.topic_batches().await?.len(), 6);
    commit_all(pool.topic().await?, pool.partitions, pool.group().await?).await?;
    wait_batches(&pool, 12, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(terminate(run).await?.success(), "SIGTERM did not exit 0");
    let batches = pool.check_invariants(3_844).await?;
    assert_eq!(batches.len(), 12);
    let per_partition = batches.iter().filter(|(p, _, _)| *p == 0).count();
    assert_eq!(per_partition, 6, "batches not balanced over partitions");
    let lease = pool.docs("leases", doc! {}).await?;
    let expires = *lease[0].get_datetime("expires_at")?;
    assert!(expires <= bson::DateTime::now(), "lease not released");
    Ok(())
}

/// Two producers on one pool: only one publishes; when it is paused (a
/// zombie), the other takes over within the lease time with a higher epoch,
/// and the zombie's late writes are fenced: no batch twice, no key lost.
#[tokio::test]
async fn two_producers_one_leader_and_takeover() -> Result<()> {
    let pool = Pool::new(2);
    pool.init(2, &[]).await?;
    let a = pool.run(2, &["--instance-id", "a"], None)?;
    let b = pool.run(2, &["--instance-id", "b"], None)?;
    wait_batches(&pool, 4, Duration::from_secs(60)).await?;
    let lease = pool.docs("leases", doc! {}).await?;
    let leader = lease[0].get_str("holder")?.to_owned();
    let first_epoch = lease[0].get_i64("epoch")?;
    let batches = pool.topic_batches().await?;
    assert!(
        batches
            .iter()
            .all(|(_, _, b)| b.epoch == first_epoch as u64),
        "two publishers"
    );
    let (zombie, standby) = if leader == "a" { (a, b) } else { (b, a) };
    send_signal(pid(&zombie)?, Signal::Stop)?;
    let paused = std::time::Instant::now();
    commit_all(pool.topic().await?, pool.partitions, pool.group().await?).await?;
    wait_batches(&pool, 8, Duration::from_secs(30)).await?;
    let took = paused.elapsed();
    // Lease 3 s + a renewal period + Kafka init_transactions.
    assert!(took < Duration::from_secs(15), "takeover took {took:?}");
    let batches = pool.topic_batches().await?;
    let newer = batches
        .iter()
        .filter(|(_, _, b)| b.epoch > first_epoch as u64)
        .count();
    assert_eq!(newer, 4, "the standby did not publish the refill");
    send_signal(pid(&zombie)?, Signal::Cont)?;
    // The zombie wakes up mid-step: give it time to try (and be fenced).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(terminate(zombie).await?.success());
    assert!(terminate(standby).await?.success());
    let batches = pool.check_invariants(3_844).await?;
    // 8, plus at most one: a leader that stepped down mid-batch (a slow lease
    // renewal on a loaded machine) finishes that batch when it leads again,
    // even if the partitions are full, because its keys are already moved.
    assert!(
        (8..=9).contains(&batches.len()),
        "{} batches",
        batches.len()
    );
    Ok(())
}

/// The lease of every spawned producer ([`kgs_tests::producer::LEASE`]).
fn lease_duration() -> Duration {
    kgs_schemas::duration::parse(kgs_tests::producer::LEASE).expect("the test lease parses")
}

/// The database server's clock (`hello.localTime`): the one clock every
/// lease time is on.
async fn server_now(pool: &Pool) -> Result<DateTime<Utc>> {
    let hello = pool.db().await?.run_command(doc! { "hello": 1 }).await?;
    Ok(hello.get_datetime("localTime")?.to_chrono())
}

/// The pool's lease document.
async fn lease_doc(pool: &Pool) -> Result<LeaseDoc> {
    pool.db()
        .await?
        .collection::<LeaseDoc>(LEASES)
        .find_one(doc! { "_id": &pool.name })
        .await?
        .context("lease document")
}

/// The claim of lease epoch `epoch` of the pool (every epoch after the
/// first is a takeover, and `init` holds the first).
async fn epoch_claim(pool: &Pool, epoch: u64) -> Result<LeaseEpochDoc> {
    pool.db()
        .await?
        .collection::<LeaseEpochDoc>(LEASE_EPOCHS)
        .find_one(doc! { "_id": format!("{}:{epoch}", pool.name) })
        .await?
        .with_context(|| format!("no claim of lease epoch {epoch}"))
}

/// The timestamp (by the producer's own clock) of the first line of `log`
/// that contains `what`, behind its ANSI colours; `None` before it is
/// written.
fn logged_at(log: &Path, what: &str) -> Result<Option<DateTime<Utc>>> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let Some(line) = text.lines().find(|l| l.contains(what)) else {
        return Ok(None);
    };
    // Drop the colour sequences (ESC '[' ... 'm').
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            plain.push(c);
        }
    }
    let stamp = plain.split_whitespace().next().unwrap_or_default();
    let at = DateTime::parse_from_rfc3339(stamp)
        .with_context(|| format!("the log line {plain:?} starts with no timestamp"))?;
    Ok(Some(at.with_timezone(&Utc)))
}

/// Spawns `run` as instance `id` with its host clock `offset` seconds off
/// (none if 0; see [`ProducerCmd::clock_offset`]), its log in a file of the
/// temp dir, and waits for its start: the child and the server's clock
/// just before the spawn.
///
/// Proves the offset took effect, apart from anything the lease does: the
/// timestamp of the "producer started" line, less `offset`, lies between
/// the server's clock just before the spawn and when the line was seen —
/// and that span (the start, about 0.1 s) is shorter than the offset, so
/// a producer whose clock was not shifted fails.
async fn start_with_clock(pool: &Pool, id: &str, offset: i64) -> Result<(Child, DateTime<Utc>)> {
    let log = std::env::temp_dir().join(format!("{}-{id}.log", pool.name));
    let mut cmd = pool
        .command(&[], None)?
        .run(50, 2)
        .args(["--instance-id", id]);
    if offset != 0 {
        cmd = cmd.clock_offset(offset)?;
    }
    let before = server_now(pool).await?;
    let child = cmd.log_to(&log)?.spawn()?;
    let logged = wait_for(
        &format!("{id} to start"),
        Duration::from_secs(60),
        || async { logged_at(&log, "producer started") },
    )
    .await?;
    let seen = server_now(pool).await?;
    let shift = chrono::Duration::seconds(offset);
    let slack = chrono::Duration::milliseconds(5);
    ensure!(
        logged - shift >= before - slack && logged - shift <= seen + slack,
        "{id} logged its start at {logged}, not {offset:+} s off the server's clock \
         (between {before} and {seen}): the clock offset did not take effect"
    );
    ensure!(
        offset == 0 || seen - before < shift.abs(),
        "{id} took {} ms to start, too long to tell a {offset:+} s clock offset",
        (seen - before).num_milliseconds()
    );
    Ok((child, before))
}

/// A leader and a standby on one pool, one of them with its host clock
/// `leader` or `standby` lease durations off (ahead if positive, behind if
/// negative; see [`ProducerCmd::clock_offset`]), and the lease holds as if
/// both clocks were right, because every lease time is the database
/// server's clock:
///
/// - the leader's takeover is recorded at the server's time (its claim's
///   `taken_at` between the server's clock at its spawn and when the lease
///   was seen to be its);
/// - while the leader lives (three lease durations, sampled every 100 ms,
///   the standby trying every third of a lease), the lease never changes
///   hands, no batch of another epoch is published, and its `expires_at` is
///   never more than a lease past the server's clock;
/// - after the leader is SIGKILLed, the standby takes over once the lease
///   has run out on the server's clock, not before (its claim's `taken_at`
///   between that expiry and when the takeover was seen) and within one of
///   its attempts (a third of a lease) and half a lease of slack after it,
///   and publishes the refill;
/// - the invariants hold.
///
/// Each producer's clock offset is proven to be in effect from its own log
/// ([`start_with_clock`]). A lease on host clocks fails every variant: a
/// standby a lease ahead (or a leader a lease behind) reads a lease just
/// renewed (expiry = renewal + duration, by the leader's clock) as already
/// expired and takes it from a live leader at its first attempt (the local
/// validity, four fifths of a lease, does not cover a full lease of skew);
/// a leader a lease ahead records its takeover and its expiry a lease past
/// the server's clock; a standby a lease behind takes over a lease late.
async fn host_clock_offset(leader: i64, standby: i64) -> Result<()> {
    let d = lease_duration();
    let secs = i64::try_from(d.as_secs())?;
    let (leader_offset, standby_offset) = (leader * secs, standby * secs);
    let skew = format!("leader clock {leader_offset:+} s, standby {standby_offset:+} s");
    let pool = Pool::new(2);
    pool.init(2, &[]).await?;
    let (mut leader, spawned) = start_with_clock(&pool, "leader", leader_offset).await?;
    let (held, seen) = wait_for("the leader's lease", Duration::from_secs(60), || async {
        let lease = lease_doc(&pool).await?;
        let now = server_now(&pool).await?;
        Ok((lease.holder == "leader").then_some((lease, now)))
    })
    .await?;
    let taken_at = epoch_claim(&pool, held.epoch).await?.taken_at;
    ensure!(
        spawned <= taken_at && taken_at <= seen,
        "the leader's takeover is recorded at {taken_at}, not between its spawn at {spawned} \
         and {seen} on the server's clock ({skew})"
    );
    wait_batches(&pool, 4, Duration::from_secs(60)).await?;

    let (standby, _) = start_with_clock(&pool, "standby", standby_offset).await?;
    // From its start on, the standby tries the lease every third of a lease.
    let watched = std::time::Instant::now();
    let mut samples = 0;
    while watched.elapsed() < 3 * d {
        let lease = lease_doc(&pool).await?;
        let now = server_now(&pool).await?;
        ensure!(
            lease.token == held.token && lease.epoch == held.epoch,
            "the lease moved from a live leader after {:?} ({skew}): {held:?} -> {lease:?}",
            watched.elapsed()
        );
        // The renewal read the server's clock before this read: its expiry
        // is at most a lease past the server's clock now (localTime has
        // millisecond resolution).
        ensure!(
            lease.expires_at <= now + d + chrono::Duration::milliseconds(5),
            "the lease expires at {}, more than {d:?} past the server's clock {now} ({skew})",
            lease.expires_at
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(samples >= 10, "only {samples} lease samples in {:?}", 3 * d);
    let batches = pool.topic_batches().await?;
    ensure!(
        batches.iter().all(|(_, _, b)| b.epoch == held.epoch),
        "a batch of another epoch than the leader's {} ({skew})",
        held.epoch
    );

    send_signal(pid(&leader)?, Signal::Kill)?;
    let killed = std::time::Instant::now();
    leader.wait().await?;
    // A renewal the server received before the kill lands within moments.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let last = lease_doc(&pool).await?;
    ensure!(
        last.epoch == held.epoch,
        "the lease moved before it could have expired: {last:?}"
    );
    let (taken, seen) = wait_for("the standby's takeover", 5 * d, || async {
        let lease = lease_doc(&pool).await?;
        let now = server_now(&pool).await?;
        Ok((lease.epoch != held.epoch).then_some((lease, now)))
    })
    .await?;
    let took = killed.elapsed();
    ensure!(
        taken.holder == "standby" && taken.epoch > held.epoch,
        "not the standby's takeover: {taken:?}"
    );
    let taken_at = epoch_claim(&pool, taken.epoch).await?.taken_at;
    ensure!(
        last.expires_at <= taken_at && taken_at <= seen,
        "the standby's takeover is recorded at {taken_at}, not between the lease's expiry \
         at {} and {seen} on the server's clock ({skew})",
        last.expires_at
    );
    // Within one attempt (a third of a lease) and half a lease of slack for
    // the round trips: less than the lease a standby whose clock is a lease
    // behind would wait past the expiry on a lease of host clocks.
    let late = seen - last.expires_at;
    ensure!(
        late <= chrono::Duration::from_std(d / 3 + d / 2)?,
        "the standby took over {} ms after the lease ran out on the server's clock, \
         more than an attempt (a third of a lease) and half a lease ({skew}; {took:?} after the kill)",
        late.num_milliseconds()
    );

    // The standby leads: the refill of what a consumer read is its batches.
    commit_all(pool.topic().await?, pool.partitions, pool.group().await?).await?;
    wait_batches(&pool, 8, Duration::from_secs(60)).await?;
    let newer = pool
        .topic_batches()
        .await?
        .iter()
        .filter(|(_, _, b)| b.epoch > held.epoch)
        .count();
    ensure!(newer >= 4, "{newer} batches after the takeover, not 4");
    ensure!(
        terminate(standby).await?.success(),
        "SIGTERM did not exit 0"
    );
    let batches = pool.check_invariants(3_844).await?;
    // 8, plus at most one, as in `two_producers_one_leader_and_takeover`.
    ensure!(
        (8..=9).contains(&batches.len()),
        "{} batches",
        batches.len()
    );
    Ok(())
}

macro_rules! host_clock_tests {
    ($($name:ident => ($leader:literal, $standby:literal)),* $(,)?) => {$(
        /// One producer's host clock a lease off: the lease holds as if it
        /// were right (see `host_clock_offset`).
        #[tokio::test]
        async fn $name() -> Result<()> {
            host_clock_offset($leader, $standby).await
        }
    )*};
}

// Host clock offsets in lease durations: (leader, standby).
host_clock_tests! {
    host_clock_leader_ahead => (1, 0),
    host_clock_leader_behind => (-1, 0),
    host_clock_standby_ahead => (0, 1),
    host_clock_standby_behind => (0, -1),
}

/// `reserve` takes a generated key and a not-yet-generated key out of
/// circulation; generation then skips the latter; both are recorded reserved.
#[tokio::test]
async fn reserve_generated_and_future_keys() -> Result<()> {
    let pool = Pool::new(1);
    pool.init(2, &["--target-size", "100", "--generate-chunk", "100"])
        .await?;
    let generated: HashSet<String> = pool
        .ids(&format!("keys.{}", pool.name))
        .await?
        .into_iter()
        .collect();
    assert_eq!(generated.len(), 100);
    let now = generated.iter().next().unwrap().clone();
    let format = KeyFormat::base62(2)?;
    let later = (0..format.space())
        .map(|i| format.key_at(i).unwrap())
        .find(|k| !generated.contains(k))
        .unwrap();
    let out = pool.exec(&["reserve", &now, &later], None).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = pool.exec(&["reserve", &now], None).await?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("AlreadyReserved"));
    pool.init(2, &["--generate-chunk", "1000"]).await?;
    let keys: HashSet<String> = pool
        .ids(&format!("keys.{}", pool.name))
        .await?
        .into_iter()
        .collect();
    assert_eq!(keys.len(), 3_842);
    assert!(!keys.contains(&now) && !keys.contains(&later));
    let reserved = pool
        .docs(
            &format!("used_keys.{}", pool.name),
            doc! { "reason": "reserved" },
        )
        .await?;
    assert_eq!(reserved.len(), 2);
    pool.check_invariants(3_844).await?;
    Ok(())
}

/// Recovering a crashed generation step never brings back a key that was
/// moved to `used_keys` meanwhile, and still generates every other key.
#[tokio::test]
async fn generation_recovery_skips_used_keys() -> Result<()> {
    let pool = Pool::new(1);
    let small = ["--target-size", "1000", "--generate-chunk", "1000"];
    pool.init(2, &small).await?;
    let out = pool
        .command(&[], Some("gen_after_insert"))?
        .init(2, 1)
        .args(["--target-size", "2000", "--generate-chunk", "1000"])
        .output()
        .await?;
    assert!(!out.status.success(), "gen_after_insert did not fire");
    // Simulate a batch that moved a key of the pending range before the recovery.
    let db = pool.db().await?;
    let keys = db.collection::<Document>(&format!("keys.{}", pool.name));
    let moved = keys
        .find_one(doc! { "n": 1_500_i64 })
        .await?
        .context("key n=1500 was not inserted before the crash")?;
    let key = moved.get_str("_id")?.to_owned();
    db.collection::<Document>(&format!("used_keys.{}", pool.name))
        .insert_one(doc! { "_id": &key, "n": 1_500_i64, "reason": "batch", "batch": "manual", "at": bson::DateTime::now() })
        .await?;
    keys.delete_one(doc! { "_id": &key }).await?;
    pool.init(2, &["--target-size", "2000", "--generate-chunk", "1000"])
        .await?;
    let ids: HashSet<String> = pool
        .ids(&format!("keys.{}", pool.name))
        .await?
        .into_iter()
        .collect();
    assert!(!ids.contains(&key), "recovery resurrected a used key");
    // The recovered range holds 999 keys. (The target counts positions the
    // batch window has not passed, and this simulated move did not raise
    // `moved_to`, so top-up adds nothing.)
    assert_eq!(ids.len(), 1_999);
    let p = pool.docs("pools", doc! {}).await?;
    assert_eq!(p[0].get_i64("cursor")?, 2_000);
    Ok(())
}

/// The leader serves /healthz, /readyz (leader) and /metrics with the
/// published batches; `stats --json` reports collStats, progress, backlog
/// per partition and the leader.
#[tokio::test]
async fn http_endpoints_and_stats_json() -> Result<()> {
    let pool = Pool::new(2);
    pool.init(2, &[]).await?;
    let addr = free_addr()?;
    let run = pool.run(2, &["--http-addr", &addr, "--instance-id", "solo"], None)?;
    wait_batches(&pool, 4, Duration::from_secs(60)).await?;
    wait_for("readyz to say leader", Duration::from_secs(20), || async {
        let (status, body) = http_get(&addr, "/readyz").await?;
        Ok((status == 200 && body.contains("leader")).then_some(()))
    })
    .await?;
    assert_eq!(http_get(&addr, "/healthz").await?.0, 200);
    // The 4th batch is visible in Kafka just before the producer records it
    // (and counts it): wait for the counter.
    let metrics = wait_for(
        "4 batches counted in /metrics",
        Duration::from_secs(20),
        || async {
            let (_, metrics) = http_get(&addr, "/metrics").await?;
            let counted = metrics.lines().any(|l| {
                l.starts_with("kgs_producer_batches_published_total") && l.ends_with(" 4")
            });
            Ok(counted.then_some(metrics))
        },
    )
    .await?;
    assert!(metrics.contains("kgs_producer_backlog_batches{partition=\"1\""));
    let out = pool.exec(&["stats", "--json"], None).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let s = &stats[0];
    assert_eq!(s["space"], 3_844);
    assert_eq!(s["generated"], 3_844);
    assert_eq!(s["used"], 200);
    assert_eq!(s["in_keys"], 3_644);
    assert_eq!(s["keys"]["count"], 3_644);
    assert!(s["used_keys"]["avgObjSize"].as_i64().unwrap_or(0) > 0);
    assert_eq!(s["partitions"].as_array().map(Vec::len), Some(2));
    assert_eq!(s["leader"], "solo");
    assert!(terminate(run).await?.success());
    Ok(())
}

/// Eight producers racing to take over an expired lease, five times: every
/// time exactly one gets the next epoch. The race is decided by inserting the
/// epoch's claim (a unique `_id`), not by a conditional update, which is not
/// an atomic compare-and-set on every MongoDB-wire server (on FerretDB v1
/// two takers once both got the same epoch).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_takeovers_give_one_leader_per_epoch() -> Result<()> {
    use kgs_producer::leader::lease::Lease;
    use kgs_producer::store::Store;

    let config = kgs_producer::Config {
        kafka_brokers: kafka_brokers(),
        mongodb_uri: mongodb_uri(),
        mongodb_db: unique("kgs"),
        ..Default::default()
    };
    let store = Store::connect(&config).await?;
    let lease = |holder: String| Lease::new(store.clone(), "p", &holder, Duration::from_secs(5));
    let first = lease("first".into());
    let mut epoch = first.acquire(None).await?.context("first lease")?;
    first.release(epoch).await?;
    for round in 0..5 {
        let takers: Vec<Lease> = (0..8).map(|i| lease(format!("r{round}-t{i}"))).collect();
        let results = futures::future::join_all(takers.iter().map(|t| t.acquire(None))).await;
        let mut winners = Vec::new();
        for (taker, result) in takers.iter().zip(results) {
            if let Some(e) = result? {
                winners.push((taker, e));
            }
        }
        ensure!(
            winners.len() == 1,
            "round {round}: {} takers won",
            winners.len()
        );
        let (winner, won) = winners[0];
        ensure!(won == epoch + 1, "round {round}: epoch {won} after {epoch}");
        epoch = won;
        winner.release(epoch).await?;
    }
    let client = mongo_client().await?;
    client.database(&config.mongodb_db).drop().await?;
    Ok(())
}

/// Whether process `pid` is stopped (state `T` in `/proc/<pid>/stat`).
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|rest| rest.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

/// Inserts, as consumers would, a `returning` claim of `batch` giving back
/// its first ten keys; returns them.
async fn return_ten(
    pool: &Pool,
    partition: i32,
    offset: i64,
    batch: &KeyBatch,
) -> Result<Vec<String>> {
    let back: Vec<String> = batch.keys[..10].to_vec();
    pool.db()
        .await?
        .collection::<Document>("claims")
        .insert_one(doc! {
            "_id": &batch.batch_id, "pool": &pool.name, "group": pool.group().await?,
            "instance": "test", "token": "test", "partition": partition, "offset": offset,
            "keys": batch.keys.len() as i64, "state": "returning", "return_keys": &back,
            "claimed_at": bson::DateTime::now(),
        })
        .await?;
    Ok(back)
}

/// Asks `kgs-producer recycle` for `key` (handed out in a batch whose claim
/// gave it back without this key, or drained).
async fn recycle(pool: &Pool, key: &str) -> Result<()> {
    let out = pool.exec(&["recycle", key], None).await?;
    ensure!(
        out.status.success(),
        "recycle {key}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A leader held between a lease check and the write it guards (it stops
/// itself with SIGSTOP at `point`) while a second producer takes over,
/// finishes the held leader's batch and processes a return and a recycle of
/// the very keys the held leader was writing; then the held leader resumes
/// and its write lands late. Afterwards `keys ∪ used_keys` is the generated
/// set with nothing in both, no key is in two batches except a returned or
/// recycled key in its batch and in one re-batch of it, the return and the
/// recycle are done, and nothing is left unfinished. Before re-batching, a
/// late delete from `keys` removed keys put back meanwhile (in neither
/// collection), and a late insert into `used_keys` re-created documents of
/// returned keys.
async fn stale_leader(point: &str) -> Result<()> {
    let pool = Pool::new(2);
    pool.init(2, &[]).await?;
    let in_move = matches!(
        point,
        "checked_insert_used" | "checked_delete_keys" | "checked_mark_moved"
    );
    let mut returned: HashSet<String> = HashSet::new();
    if !in_move {
        // The held leader will be re-batching these when it stops.
        let run = pool.run(2, &[], None)?;
        wait_batches(&pool, 4, Duration::from_secs(60)).await?;
        assert!(terminate(run).await?.success());
        let batches = pool.topic_batches().await?;
        let (p, o, b) = &batches[0];
        returned.extend(return_ten(&pool, *p, *o, b).await?);
        recycle(&pool, &b.keys[20]).await?;
        returned.insert(b.keys[20].clone());
    }
    let held = pool.run(
        2,
        &["--instance-id", "held"],
        Some(&format!("stop:{point}")),
    )?;
    let held_pid = pid(&held)?;
    wait_for(
        &format!("the leader held at {point}"),
        Duration::from_secs(60),
        || async { Ok(is_stopped(held_pid).then_some(())) },
    )
    .await?;
    // In a move, the batch being written is the one left `moving`.
    let held_batch = if in_move {
        let moving = pool
            .docs("batches", doc! { "pool": &pool.name, "state": "moving" })
            .await?;
        ensure!(moving.len() == 1, "{} moving records", moving.len());
        Some(moving[0].get_str("_id")?.to_owned())
    } else {
        None
    };
    let taker = pool.run(2, &["--instance-id", "taker"], None)?;
    if let Some(id) = &held_batch {
        // The taker finishes the held batch; then its keys come back: ten
        // returned unused, one recycled after hand-out.
        let published = wait_for(
            "the held batch published by the taker",
            Duration::from_secs(60),
            || async {
                let b = pool.topic_batches().await?;
                Ok(b.into_iter().find(|(_, _, b)| &b.batch_id == id))
            },
        )
        .await?;
        let (p, o, b) = published;
        returned.extend(return_ten(&pool, p, o, &b).await?);
        recycle(&pool, &b.keys[20]).await?;
        returned.insert(b.keys[20].clone());
    }
    wait_for(
        "the return and the recycle done by the taker",
        Duration::from_secs(60),
        || async {
            let claims = pool.docs("claims", doc! { "state": "returning" }).await?;
            let recycles = pool.docs("recycles", doc! { "state": "requested" }).await?;
            Ok((claims.is_empty() && recycles.is_empty()).then_some(()))
        },
    )
    .await?;
    // The held leader's write arrives now, after all of that.
    send_signal(held_pid, Signal::Cont)?;
    // It makes the write right away, then finds its lease gone at its next
    // check; give both a few seconds of the taker's loop to follow.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (held_status, taker_status) = (terminate(held).await?, terminate(taker).await?);
    ensure!(
        held_status.success() && taker_status.success(),
        "exit {held_status:?} / {taker_status:?}"
    );
    let done = pool.docs("recycles", doc! { "state": "done" }).await?;
    ensure!(done.len() == 1, "recycle not done: {done:?}");
    let claims = pool.docs("claims", doc! { "state": "returned" }).await?;
    ensure!(claims.len() == 1, "claim not returned");
    pool.check_invariants_returned(3_844, &returned).await?;
    Ok(())
}

macro_rules! stale_leader_tests {
    ($($name:ident => $point:literal),* $(,)?) => {$(
        /// Held between its lease check and this write past a takeover, then resumed: harmless.
        #[tokio::test]
        async fn $name() -> Result<()> {
            stale_leader($point).await
        }
    )*};
}

stale_leader_tests! {
    stale_insert_used => "checked_insert_used",
    stale_delete_keys => "checked_delete_keys",
    stale_mark_moved => "checked_mark_moved",
    stale_rebatch_used => "checked_rebatch_used",
    stale_claim_returned => "checked_claim_returned",
    stale_recycle_done => "checked_recycle_done",
}

/// A leader held between its lease check and a generation insert (a chunk
/// of new keys into `keys`) while a second producer takes over, finishes the
/// held generation step and moves keys of that very chunk; then the held
/// leader resumes and its insert lands late, writing moved keys back into
/// `keys`. Batches of new keys are read by window from the pool's
/// `moved_to` up, so such a key is below every later window: the taker's
/// sweep finds it, its `used_keys` document wins, and it leaves `keys`
/// again without being handed out twice. Afterwards: nothing in both
/// collections, no key twice in the topic, nothing unfinished.
#[tokio::test]
async fn stale_insert_generated() -> Result<()> {
    let pool = Pool::new(2);
    pool.init(2, &["--initial-keys", "300"]).await?;
    let sweep = ["--recovery-interval", "1s"];
    let mut held_args = vec!["--instance-id", "held"];
    held_args.extend_from_slice(&sweep);
    let held = pool.run(2, &held_args, Some("stop:checked_insert_generated"))?;
    let held_pid = pid(&held)?;
    wait_for(
        "the leader held before a generation insert",
        Duration::from_secs(60),
        || async { Ok(is_stopped(held_pid).then_some(())) },
    )
    .await?;
    let pending = pool
        .pool_doc()
        .await?
        .generating
        .context("a pending range")?;
    let mut taker_args = vec!["--instance-id", "taker"];
    taker_args.extend_from_slice(&sweep);
    let taker = pool.run(2, &taker_args, None)?;
    // Consume everything until the taker has moved keys of the held chunk
    // out of `keys`: `moved_to` is raised only after a window's delete (a
    // key only in `used_keys` yet is still in `keys`, and the late insert
    // would write nothing back).
    let (topic, group) = (pool.topic().await?, pool.group().await?);
    let used = format!("used_keys.{}", pool.name);
    wait_for(
        "the taker moving keys of the held generation chunk",
        Duration::from_secs(90),
        || async {
            commit_all(topic.clone(), pool.partitions, group.clone()).await?;
            let moved_to = pool.pool_doc().await?.moved_to.unwrap_or(0);
            Ok((moved_to >= pending.from + 100).then_some(()))
        },
    )
    .await?;
    send_signal(held_pid, Signal::Cont)?;
    let keys = format!("keys.{}", pool.name);
    // The late insert writes moved keys back into `keys`; the sweep moves
    // them by `_id` in a batch of its own (no window, no `from`), which
    // drops every one of them (their `used_keys` documents name the batches
    // they were handed out in) and so ends empty.
    let swept = wait_for(
        "the sweep taking written-back keys out of `keys` again",
        Duration::from_secs(30),
        || async {
            let sweeps = pool
                .docs(
                    "batches",
                    doc! {
                        "pool": &pool.name,
                        "window": { "$exists": false },
                        "from": { "$exists": false },
                    },
                )
                .await?;
            let finished = sweeps.iter().all(|r| r.get_str("state") == Ok("published"));
            let used: HashSet<String> = pool.ids(&used).await?.into_iter().collect();
            let both = pool
                .ids(&keys)
                .await?
                .into_iter()
                .filter(|k| used.contains(k))
                .count();
            Ok((!sweeps.is_empty() && finished && both == 0).then_some(sweeps))
        },
    )
    .await?;
    for r in &swept {
        ensure!(
            r.get_array("keys")?.is_empty(),
            "a sweep batch handed a key out: {r:?}"
        );
    }
    let (held_status, taker_status) = (terminate(held).await?, terminate(taker).await?);
    ensure!(
        held_status.success() && taker_status.success(),
        "exit {held_status:?} / {taker_status:?}"
    );
    pool.check_invariants(3_844).await?;
    Ok(())
}

/// The pool topic deleted while it holds published batches (one of them
/// claimed, three not) and created again with `init`, the producer running
/// throughout: the producer sees the new topic end before batches recorded
/// in it, starts the next topic generation, and publishes the three
/// unclaimed batches into the new topic (the claimed one not): each once,
/// none lost, and the backlog counts the new topic only (before the fix it
/// counted the old records and, reading "full", published nothing).
#[tokio::test]
async fn a_recreated_topic_gets_its_unclaimed_batches_again() -> Result<()> {
    let pool = Pool::new(2);
    pool.init(2, &[]).await?;
    let run = pool.run(2, &[], None)?;
    wait_batches(&pool, 4, Duration::from_secs(60)).await?;
    let before = pool.topic_batches().await?;
    let (p0, o0, claimed) = &before[0];
    // As a consumer that handed the whole batch out would leave it.
    pool.db()
        .await?
        .collection::<Document>("claims")
        .insert_one(doc! {
            "_id": &claimed.batch_id, "pool": &pool.name, "group": pool.group().await?,
            "instance": "test", "token": "test", "partition": p0, "offset": o0,
            "keys": claimed.keys.len() as i64, "state": "drained", "return_keys": [],
            "claimed_at": bson::DateTime::now(),
        })
        .await?;
    let topic = pool.topic().await?;
    kgs_tests::kafka::delete_topic(&topic).await?;
    // `init` re-creates it once the broker has finished deleting it (until
    // then it finds the topic and changes nothing).
    wait_for(
        "the topic re-created by init",
        Duration::from_secs(60),
        || async {
            let out = pool
                .exec(&["init", "--length", "2", "--partitions", "2"], None)
                .await?;
            let said = String::from_utf8_lossy(&out.stdout).into_owned();
            ensure!(
                out.status.success(),
                "init: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(said.contains(": created;").then_some(()))
        },
    )
    .await?;
    let unclaimed: Vec<&KeyBatch> = before[1..].iter().map(|(_, _, b)| b).collect();
    let after = wait_for(
        "the unclaimed batches in the new topic",
        Duration::from_secs(90),
        || async {
            let after = pool.topic_batches().await?;
            let ids: HashSet<&str> = after.iter().map(|(_, _, b)| b.batch_id.as_str()).collect();
            Ok(unclaimed
                .iter()
                .all(|b| ids.contains(b.batch_id.as_str()))
                .then_some(after))
        },
    )
    .await?;
    assert!(terminate(run).await?.success());
    ensure!(
        !after.iter().any(|(_, _, b)| b.batch_id == claimed.batch_id),
        "the claimed batch was published again"
    );
    for b in &unclaimed {
        let copies: Vec<_> = after
            .iter()
            .filter(|(_, _, a)| a.batch_id == b.batch_id)
            .collect();
        ensure!(
            copies.len() == 1,
            "batch {} {} times in the new topic",
            b.batch_id,
            copies.len()
        );
        ensure!(
            copies[0].2.keys == b.keys,
            "batch {} changed its keys",
            b.batch_id
        );
    }
    ensure!(
        pool.pool_doc().await?.topic_generation == 1,
        "no new topic generation"
    );
    // Nothing twice in the new topic, every key in used_keys with its batch.
    pool.check_invariants(3_844).await?;
    Ok(())
}

/// A leader whose network to MongoDB stalls (a TCP proxy of the test's own
/// holds every byte it sends, nothing is lost) while it works on a return,
/// a recycle and its batches: it keeps running, its lease runs out, the
/// other producer takes over, finishes the return and the recycle and
/// moves and publishes new batches. Then the network delivers everything
/// the stalled leader had sent, late. Three rounds, the roles swapping, the
/// stall starting at a random moment of the leader's work (the failpoint
/// tests `stale_*` pin each write step; this one is the network's version,
/// with the driver's own timeouts and retries in play). Afterwards the
/// invariants hold: `keys ∪ used_keys` is the space with nothing in both,
/// each returned or recycled key went round exactly once more, nothing is
/// unfinished.
#[tokio::test]
async fn stale_leader_behind_a_stalled_network() -> Result<()> {
    use kgs_tests::proxy::{proxied_mongodb_uri, Mode};
    use rand::Rng;

    let pool = Pool::new(2);
    pool.init(2, &[]).await?;
    let mut producers = Vec::new();
    for name in ["a", "b"] {
        let (proxy, uri) = proxied_mongodb_uri(&mongodb_uri()).await?;
        let child = pool
            .command(&[], None)?
            .run(50, 2)
            .args(["--instance-id", name])
            .env("KGS_MONGODB_URI", &uri)
            .log_to_temp(&pool.name)?
            .spawn()?;
        producers.push((name, proxy, child));
    }
    let (topic, group) = (pool.topic().await?, pool.group().await?);
    let mut returned: HashSet<String> = HashSet::new();
    let mut used_batches: HashSet<String> = HashSet::new();
    for round in 0..3 {
        let leader = wait_for(
            &format!("round {round}: a leader with batches out"),
            Duration::from_secs(60),
            || async {
                let holder = pool
                    .docs("leases", doc! {})
                    .await?
                    .first()
                    .and_then(|l| l.get_str("holder").ok().map(str::to_owned));
                let fresh = pool.topic_batches().await?.into_iter().find(|(_, _, b)| {
                    !used_batches.contains(&b.batch_id)
                        && b.keys.len() > 20
                        && !b.keys.iter().any(|k| returned.contains(k))
                });
                Ok(holder.zip(fresh))
            },
        )
        .await?;
        let (holder, (p, o, batch)) = leader;
        let held = producers
            .iter()
            .position(|(name, _, _)| *name == holder)
            .context("the lease holder is none of the two")?;
        used_batches.insert(batch.batch_id.clone());
        // A slow network first, so the leader's work on the return and the
        // recycle spans seconds (each round trip 2 x 150 ms) ...
        producers[held].1.set(Mode::Pass {
            delay: Duration::from_millis(150),
        });
        returned.extend(return_ten(&pool, p, o, &batch).await?);
        recycle(&pool, &batch.keys[20]).await?;
        returned.insert(batch.keys[20].clone());
        // ... then a stalled one, at a random moment of that work.
        let after = Duration::from_millis(rand::rng().random_range(0..2_000));
        tokio::time::sleep(after).await;
        producers[held].1.set(Mode::Stall);
        let taker = producers[1 - held].0;
        wait_for(
            &format!("round {round}: {taker} taking over and finishing the return and the recycle"),
            Duration::from_secs(60),
            || async {
                let lease = pool.docs("leases", doc! {}).await?;
                let took = lease.first().and_then(|l| l.get_str("holder").ok()) == Some(taker);
                let claims = pool.docs("claims", doc! { "state": "returning" }).await?;
                let recycles = pool.docs("recycles", doc! { "state": "requested" }).await?;
                Ok((took && claims.is_empty() && recycles.is_empty()).then_some(()))
            },
        )
        .await?;
        // More moves by the taker while the stalled writes are still held.
        commit_all(topic.clone(), pool.partitions, group.clone()).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        producers[held].1.set(Mode::OPEN);
        // Its held writes land now; it then finds its lease gone.
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    for (name, proxy, child) in producers {
        ensure!(proxy.connections() > 0, "{name} never used its proxy");
        let status = terminate(child).await?;
        ensure!(status.success(), "{name} exited {status:?}");
    }
    let done = pool.docs("recycles", doc! { "state": "done" }).await?;
    ensure!(done.len() == 3, "recycles not done: {done:?}");
    pool.check_invariants_returned(3_844, &returned).await?;
    Ok(())
}
