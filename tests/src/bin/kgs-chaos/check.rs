//! The checker: after the run, everything stopped cleanly, proves the
//! invariants from what the clients received, the database and the topic.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use bson::{doc, Document};
use futures::TryStreamExt;
use kgs_schemas::docs::{BatchRecord, ClaimDoc, ClaimState, PoolDoc, BATCHES, CLAIMS, POOLS};
use kgs_schemas::KeyBatch;

use crate::cluster::Tuning;

/// A check's name and what it found (`None` = passed).
#[derive(Debug)]
pub struct Verdict {
    /// Which invariant.
    pub name: &'static str,
    /// Why it failed.
    pub failure: Option<String>,
}

/// Figures of the final state, for the summary.
#[derive(Debug, Default)]
pub struct Figures {
    /// Keys received by clients.
    pub handed_out: usize,
    /// Keys received more than once.
    pub duplicates: usize,
    /// Keys generated (`cursor`).
    pub generated: u64,
    /// Of the generated positions, skipped by the blocklist.
    pub blocked: u64,
    /// In `keys` / in `used_keys`.
    pub in_keys: usize,
    /// In `used_keys`.
    pub in_used: usize,
    /// Batches in the topic (the producer's).
    pub batches: usize,
    /// Messages in the topic matching no batch record (the hostile writer's).
    pub forged: usize,
    /// Keys in published, never-claimed batches (the backlog left at the end).
    pub pending: usize,
    /// Keys returned by gracefully stopped app servers.
    pub returned: usize,
    /// Claimed keys neither received nor returned: lost in crashed buffers
    /// (or in an HTTP response cut by a crash).
    pub lost: usize,
    /// Sum of the loss limits of the lossy incarnations.
    pub loss_limit: usize,
    /// Lossy incarnations.
    pub lossy_instances: usize,
    /// Smallest and largest batch claimed (the producer's sizer varies it).
    pub batch_sizes: (usize, usize),
    /// The lengths of the keys received, e.g. `1..=3`.
    pub lengths: String,
    /// Words added to the blocklist during the run.
    pub words_added: usize,
    /// Keys the leader's sweeps took out of `keys` for them.
    pub blocklist_removed: u64,
    /// Keys matching them handed out before they were added.
    pub blocklist_handed_out: u64,
}

/// Runs every check. `received` are the keys clients got (with repeats).
pub async fn check(
    db: &mongodb::Database,
    pool: &str,
    brokers: &str,
    received: &[String],
    lossy: &HashSet<String>,
    tuning: &Tuning,
) -> Result<(Vec<Verdict>, Figures)> {
    let mut verdicts = Vec::new();
    let mut fig = Figures::default();
    let mut verdict = |name, failures: Vec<String>| {
        verdicts.push(Verdict {
            name,
            failure: (!failures.is_empty()).then(|| {
                let n = failures.len();
                let mut shown: Vec<_> = failures.into_iter().take(5).collect();
                if n > 5 {
                    shown.push(format!("... {} more", n - 5));
                }
                shown.join("; ")
            }),
        })
    };

    // (1) no duplicates among the keys handed out.
    let mut handed: HashMap<&str, usize> = HashMap::new();
    for k in received {
        *handed.entry(k.as_str()).or_default() += 1;
    }
    fig.handed_out = received.len();
    let dups: Vec<String> = handed
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, n)| format!("{k} handed out {n} times"))
        .collect();
    fig.duplicates = dups.len();
    verdict("1. zero duplicates among handed-out keys", dups);

    // The database's final state.
    let doc: PoolDoc = db
        .collection::<PoolDoc>(POOLS)
        .find_one(doc! { "_id": pool })
        .await?
        .context("pool document missing")?;
    let keys: HashSet<String> = ids(db, &kgs_schemas::docs::keys_collection(pool)).await?;
    let used: HashMap<String, Option<String>> = db
        .collection::<Document>(&kgs_schemas::docs::used_keys_collection(pool))
        .find(doc! {})
        .await?
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .map(|d| {
            (
                d.get_str("_id").unwrap_or_default().to_owned(),
                d.get_str("batch").ok().map(str::to_owned),
            )
        })
        .collect();
    fig.in_keys = keys.len();
    fig.in_used = used.len();
    fig.generated = doc.cursor;

    // (2) every handed-out key is in used_keys.
    let missing: Vec<String> = handed
        .keys()
        .filter(|k| !used.contains_key(**k))
        .map(|k| format!("{k} handed out but not in used_keys"))
        .collect();
    verdict("2. every handed-out key is in used_keys", missing);

    // (3) keys ∪ used_keys is exactly the generated set, none in both.
    let mut bad = Vec::new();
    if let Some(range) = doc.generating {
        bad.push(format!(
            "generation step {}..{} left unfinished",
            range.from, range.to
        ));
    }
    // Blocked positions (the run's pool has the default blocklist) are
    // in neither collection.
    let generated: HashSet<String> = kgs_producer::writer::generate::generated_keys(&doc)?
        .into_iter()
        .collect();
    fig.blocked = doc.blocked;
    if generated.len() as u64 + doc.blocked != doc.cursor {
        bad.push(format!(
            "{} keys generated + {} blocked != cursor {}",
            generated.len(),
            doc.blocked,
            doc.cursor
        ));
    }
    for k in &keys {
        if used.contains_key(k) {
            bad.push(format!("{k} in both keys and used_keys"));
        }
        if !generated.contains(k) {
            bad.push(format!("{k} in keys but never generated"));
        }
    }
    for k in used.keys() {
        if !generated.contains(k) {
            bad.push(format!("{k} in used_keys but never generated"));
        }
    }
    for k in &generated {
        if !keys.contains(k) && !used.contains_key(k) {
            bad.push(format!("generated key {k} in neither collection"));
        }
    }
    verdict("3. keys ∪ used_keys == generated set, none in both", bad);

    // (3b) the blocklist holds in `keys`: no key there holds a word of the
    // init list or of an addition the leader has swept for.
    fig.words_added = doc.blocklist_added.iter().map(|a| a.words.len()).sum();
    fig.blocklist_removed = doc.blocklist_removed;
    fig.blocklist_handed_out = doc.blocklist_handed_out;
    let swept: Vec<String> = doc
        .blocklist
        .iter()
        .chain(
            doc.blocklist_added
                .iter()
                .take(doc.blocklist_swept as usize)
                .flat_map(|a| a.words.iter()),
        )
        .cloned()
        .collect();
    let list = kgs_schemas::blocklist::Blocklist::new(&swept).map_err(anyhow::Error::msg)?;
    let held: Vec<String> = keys
        .iter()
        .filter(|k| list.blocks(k))
        .map(|k| format!("{k} in keys holds a blocked word"))
        .collect();
    verdict(
        "3b. no key in keys holds a word of the (swept) blocklist",
        held,
    );
    let lengths: std::collections::BTreeSet<usize> = received.iter().map(String::len).collect();
    fig.lengths = match (lengths.first(), lengths.last()) {
        (Some(a), Some(b)) => format!("{a}..={b} received"),
        _ => "none received".to_owned(),
    };

    // (5) no batch twice in the topic. Only the producer's messages count:
    // those matching a batch record in partition and keys; the rest are the
    // hostile writer's forgeries (counted apart).
    let records: HashMap<String, BatchRecord> = db
        .collection::<BatchRecord>(BATCHES)
        .find(doc! { "pool": pool })
        .await?
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    let all = kgs_tests::read_topic_batches(
        brokers,
        &doc.topic,
        doc.partitions as i32,
        Duration::from_secs(120),
    )
    .await?;
    let mut batches: Vec<KeyBatch> = Vec::new();
    for (partition, _, b) in all {
        let genuine = records.get(&b.batch_id).is_some_and(|r| {
            r.partition == Some(partition) && r.digest == kgs_schemas::keys_digest(&b.keys)
        });
        if genuine {
            batches.push(b);
        } else {
            fig.forged += 1;
        }
    }
    fig.batches = batches.len();
    let mut seen = HashSet::new();
    let twice: Vec<String> = batches
        .iter()
        .filter(|b| !seen.insert(b.batch_id.clone()))
        .map(|b| format!("batch {} twice in the topic", b.batch_id))
        .collect();

    // (4) lost keys: claimed, not received, not returned.
    let claims: HashMap<String, ClaimDoc> = db
        .collection::<ClaimDoc>(CLAIMS)
        .find(doc! { "pool": pool })
        .await?
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .map(|c| (c.batch_id.clone(), c))
        .collect();
    let mut bad = Vec::new();
    let mut lost_by: HashMap<&str, usize> = HashMap::new();
    for (key, batch) in &used {
        let Some(batch) = batch else { continue };
        let received = handed.contains_key(key.as_str());
        match claims.get(batch) {
            None if received => bad.push(format!("{key} handed out from unclaimed batch {batch}")),
            None => fig.pending += 1,
            Some(_) if received => {}
            Some(c) => match c.state {
                ClaimState::Open | ClaimState::Drained => {
                    *lost_by.entry(c.instance.as_str()).or_default() += 1
                }
                ClaimState::Returning => {
                    bad.push(format!("claim {batch} still returning at the end"))
                }
                ClaimState::Returned => bad.push(format!(
                    "{key} of returned claim {batch} not handed out but still in used_keys"
                )),
                // Only claims matching no batch record are set aside; every
                // claim of the chaos run names a real batch.
                ClaimState::Rejected => bad.push(format!(
                    "claim {batch} was set aside: {}",
                    c.reason.as_deref().unwrap_or("")
                )),
            },
        }
    }
    for c in claims.values() {
        if c.state == ClaimState::Returned {
            fig.returned += c.return_keys.len();
        }
        if c.state == ClaimState::Open && !lossy.contains(&c.instance) {
            bad.push(format!(
                "claim {} of {} still open, but that instance stopped cleanly",
                c.batch_id, c.instance
            ));
        }
    }
    // The largest batch each instance claimed: its bound (see Tuning::loss_limit).
    let mut largest: HashMap<&str, usize> = HashMap::new();
    for c in claims.values() {
        let l = largest.entry(c.instance.as_str()).or_default();
        *l = (*l).max(c.keys as usize);
    }
    fig.batch_sizes = (
        claims.values().map(|c| c.keys as usize).min().unwrap_or(0),
        claims.values().map(|c| c.keys as usize).max().unwrap_or(0),
    );
    for (instance, n) in &lost_by {
        if !lossy.contains(*instance) {
            bad.push(format!(
                "{n} keys of {instance} neither received nor returned, but it stopped cleanly"
            ));
        }
        let batch = largest.get(instance).copied().unwrap_or(0);
        let limit = tuning.loss_limit(batch);
        if *n > limit {
            bad.push(format!(
                "{instance} lost {n} keys, more than its buffer limit {limit} (high watermark {} + its largest batch {batch})",
                tuning.app_high
            ));
        }
    }
    fig.lost = lost_by.values().sum();
    fig.lossy_instances = lossy.len();
    fig.loss_limit = lossy
        .iter()
        .map(|i| tuning.loss_limit(largest.get(i.as_str()).copied().unwrap_or(0)))
        .sum();
    if fig.lost > fig.loss_limit {
        bad.push(format!(
            "{} keys lost > {} (sum of the buffer limits of {} crashed instances)",
            fig.lost,
            fig.loss_limit,
            lossy.len()
        ));
    }
    verdict(
        "4. lost keys ≤ buffer limits of crashed instances, all in their claims",
        bad,
    );
    verdict("5. no batch twice in the topic", twice);
    Ok((verdicts, fig))
}

async fn ids(db: &mongodb::Database, coll: &str) -> Result<HashSet<String>> {
    Ok(db
        .collection::<Document>(coll)
        .find(doc! {})
        .projection(doc! { "_id": 1 })
        .await?
        .try_collect::<Vec<_>>()
        .await?
        .iter()
        .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
        .collect())
}
