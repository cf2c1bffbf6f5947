//! The MongoDB documents of kgs and the names of their collections.
//!
//! One database (default `kgs`) holds every pool. Shared collections:
//! `pools` ([`PoolDoc`]), `leases` ([`LeaseDoc`]), `batches` ([`BatchRecord`]),
//! `claims` ([`ClaimDoc`]) and `recycles` ([`RecycleDoc`]). Each pool has its own key collections,
//! `keys.<pool>` ([`KeyDoc`]) and `used_keys.<pool>` ([`UsedKeyDoc`]), so that
//! `keys ∪ used_keys` of a pool is exactly its generated set and the
//! collections' statistics are the pool's.
//!
//! Timestamps are BSON dates; counters are BSON int64 (see [`crate::format::MAX_SPACE`]).

use std::fmt;

use bson::Bson;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::format::KeyFormatSpec;

/// Collection of [`PoolDoc`]s.
pub const POOLS: &str = "pools";
/// Collection of [`LeaseDoc`]s.
pub const LEASES: &str = "leases";
/// Collection of [`LeaseEpochDoc`]s.
pub const LEASE_EPOCHS: &str = "lease_epochs";
/// Collection of [`BatchRecord`]s.
pub const BATCHES: &str = "batches";
/// Collection of [`ClaimDoc`]s.
pub const CLAIMS: &str = "claims";
/// Collection of [`RecycleDoc`]s.
pub const RECYCLES: &str = "recycles";
/// Collection of [`VanityDoc`]s.
pub const VANITY: &str = "vanity";

/// The collection of a pool's unused keys.
pub fn keys_collection(pool: &str) -> String {
    format!("keys.{pool}")
}

/// The collection of a pool's used (moved, reserved) keys.
pub fn used_keys_collection(pool: &str) -> String {
    format!("used_keys.{pool}")
}

/// The longest pool name.
pub const MAX_POOL_NAME_LEN: usize = 48;

/// Checks a pool name: 1 to 48 characters of `a-z`, `0-9`, `_` and `-`,
/// starting with a letter or digit. The name appears in collection and topic
/// names, so it is kept to characters both accept.
pub fn validate_pool_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
    if name.is_empty() || name.len() > MAX_POOL_NAME_LEN {
        return Err(format!(
            "pool name must have 1 to {MAX_POOL_NAME_LEN} characters, {name:?} has {}",
            name.len()
        ));
    }
    if !name.chars().all(ok_char) || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "pool name {name:?} must use only a-z, 0-9, '_' and '-', starting with a letter or digit"
        ));
    }
    Ok(())
}

/// The per-pool permutation secret. Serialized as hex; never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PoolSecret(pub String);

impl fmt::Debug for PoolSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PoolSecret(<redacted>)")
    }
}

/// A range of generation indices `[from, to)`: one being written to `keys`
/// (crash recovery), or the window a batch of new keys was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationRange {
    /// First index of the range.
    pub from: u64,
    /// One past the last index.
    pub to: u64,
}

/// The Kafka topic of one incarnation of a pool: `kgs.<pool>.<incarnation>`.
///
/// Scoped by the incarnation so that two installations with the same pool
/// name on one Kafka cluster (different databases), or a pool re-created
/// after its database was dropped, never share a topic.
pub fn topic_name(pool: &str, incarnation: &str) -> String {
    format!("kgs.{pool}.{incarnation}")
}

/// A new random incarnation id: 16 hex digits (64 random bits).
pub fn new_incarnation() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..16].to_owned()
}

/// Serde `skip_serializing_if` of counters a pool document gained later:
/// left out while zero, so the document stays readable by older versions.
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A pool: its key format, permutation secret and generation progress.
/// Collection [`POOLS`], `_id` = pool name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolDoc {
    /// Pool name.
    #[serde(rename = "_id")]
    pub name: String,
    /// This incarnation of the pool, made by `init` ([`new_incarnation`]).
    /// Every batch record carries it, and the topic, the producer's
    /// `transactional.id` and the default consumer group are scoped by it:
    /// a batch of another installation, or of a dropped and re-created
    /// database, is never taken for one of this pool.
    pub incarnation: String,
    /// Alphabet and key length.
    pub format: KeyFormatSpec,
    /// `|alphabet|^length`.
    pub space: u64,
    /// Secret key of the pool's permutation (hex).
    pub secret: PoolSecret,
    /// Next generation index: indices `0..cursor` have been written to `keys`.
    pub cursor: u64,
    /// A generation step that was started but may not have finished.
    #[serde(default)]
    pub generating: Option<GenerationRange>,
    /// Generation positions (`n`) of keys reserved by `kgs-producer reserve`
    /// before they were generated: their keys are already in `used_keys` with
    /// reason `reserved`, so generation skips these positions. Only added to
    /// while no generation range is pending, so a generation step that reads
    /// it after marking its range sees every reservation inside the range.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reserved_ahead: Vec<u64>,
    /// Words no generated key may contain, folded ([`crate::blocklist`]);
    /// set by `init`, the pool's own copy of its lists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocklist: Vec<String>,
    /// Words added to the blocklist after `init` (`kgs-producer
    /// blocklist-add`), in the order they were added. An addition blocks
    /// the positions from its `from` on at generation; the leader takes the
    /// keys of earlier positions that match it out of `keys` (into
    /// `used_keys`, reason `blocked`) and counts those already handed out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocklist_added: Vec<BlocklistAddition>,
    /// How many of `blocklist_added` the leader has swept `keys` for.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub blocklist_swept: u64,
    /// Keys the sweeps took out of `keys` (in `used_keys`, reason `blocked`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub blocklist_removed: u64,
    /// Keys matching added words that had been handed out (or reserved,
    /// or taken as vanity keys) before the words were added: counted and
    /// reported, never recalled.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub blocklist_handed_out: u64,
    /// Generation positions below `cursor` skipped because their key is
    /// blocked: their keys are in neither `keys` nor `used_keys`, so
    /// `keys ∪ used_keys` is the generated set minus these. Advanced with
    /// the cursor, in the same conditional update.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub blocked: u64,
    /// How long a recycled key stays out of circulation (milliseconds):
    /// each recycle request is due this long after it was made, so caches
    /// and old links never resolve to a new target. 0 (and a pool made
    /// before it existed): at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recycle_cooldown_ms: u64,
    /// Kafka topic of the pool's batches.
    pub topic: String,
    /// Partition count of the topic.
    pub partitions: u32,
    /// How many times the leader found the topic re-created (deleted, then
    /// created again, e.g. by `init`): batch records carry the generation
    /// they were published into, so the backlog counts only batches of the
    /// topic as it is now, and batches published into an earlier
    /// generation and never claimed are published again.
    #[serde(default)]
    pub topic_generation: u64,
    /// Every generation position below it has left `keys` (its key is in
    /// `used_keys`): the next batch of new keys starts here. Only ever
    /// raised (`$max`), by the leader, after a batch's delete from `keys`,
    /// so it never passes a key still waiting in `keys` — a stale leader's
    /// late write can only lower what it adds, never raise it past what has
    /// happened. `None` in a pool made before it existed: the leader derives
    /// it once from the smallest `n` in `keys`.
    #[serde(default)]
    pub moved_to: Option<u64>,
    /// When the pool was created.
    #[serde(with = "bson::serde_helpers::chrono_datetime_as_bson_datetime")]
    pub created_at: DateTime<Utc>,
}

/// Words added to a pool's blocklist after `init` ([`PoolDoc::blocklist_added`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlocklistAddition {
    /// The pool's cursor when they were added, set in an update conditional
    /// on that cursor and on no generation range pending: every generation
    /// step from here on starts at or after it and skips their matches;
    /// every step before ended at or before it.
    pub from: u64,
    /// The words, folded ([`crate::blocklist`]).
    pub words: Vec<String>,
    /// When they were added.
    #[serde(with = "bson::serde_helpers::chrono_datetime_as_bson_datetime")]
    pub at: DateTime<Utc>,
}

impl PoolDoc {
    /// The words that block generation position `n`: the `init` list and
    /// every addition made at or before `n`.
    pub fn blocklist_at(&self, n: u64) -> Vec<String> {
        let mut words = self.blocklist.clone();
        for added in self.blocklist_added.iter().filter(|a| a.from <= n) {
            words.extend(added.words.iter().cloned());
        }
        words
    }

    /// Every word of the pool's blocklist, added ones included.
    pub fn blocklist_all(&self) -> Vec<String> {
        self.blocklist_at(u64::MAX)
    }

    /// The consumer group app servers join unless configured otherwise: the
    /// topic's name, so it is scoped by the incarnation as the topic is.
    pub fn default_group(&self) -> String {
        self.topic.clone()
    }
}

/// An unused key. Collection `keys.<pool>`, `_id` = the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyDoc {
    /// The key.
    #[serde(rename = "_id")]
    pub key: String,
    /// Hand-out order: batches take the smallest `n` first (indexed).
    pub n: u64,
}

/// Why a key is in `used_keys`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsedReason {
    /// Moved in a batch for hand-out.
    Batch,
    /// Taken out of circulation by `kgs-producer reserve`.
    Reserved,
    /// Taken for a user on request (`POST /keys/{key}`, a [`VanityDoc`]).
    Vanity,
    /// Taken out of `keys` because it holds a word added to the pool's
    /// blocklist after it was generated ([`PoolDoc::blocklist_added`]).
    Blocked,
}

/// A used key. Collection `used_keys.<pool>`, `_id` = the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsedKeyDoc {
    /// The key.
    #[serde(rename = "_id")]
    pub key: String,
    /// Its `n` while it was in `keys` (kept so it can be returned in order).
    pub n: u64,
    /// Why it is used.
    pub reason: UsedReason,
    /// The batch that moved it (absent for reserved keys).
    #[serde(default)]
    pub batch: Option<String>,
    /// When it was moved.
    #[serde(with = "bson::serde_helpers::chrono_datetime_as_bson_datetime")]
    pub at: DateTime<Utc>,
}

/// Steps of a batch, in order. Each step is idempotent, so recovery redoes the
/// current one and continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchState {
    /// Keys chosen; they are being copied to `used_keys` and deleted from `keys`.
    Moving,
    /// Every key is in `used_keys` and none in `keys`; not yet published.
    Moved,
    /// In the topic at `partition`/`offset`.
    Published,
}

/// The producer's record of one batch, for crash recovery.
/// Collection [`BATCHES`], `_id` = batch id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRecord {
    /// Batch id (also in the Kafka message).
    #[serde(rename = "_id")]
    pub id: String,
    /// Pool name.
    pub pool: String,
    /// The pool's incarnation ([`PoolDoc::incarnation`]).
    pub incarnation: String,
    /// Lease epoch of the producer that created it.
    pub epoch: u64,
    /// Current step.
    pub state: BatchState,
    /// [`crate::batch::keys_digest`] of `keys`: what a consumer compares
    /// with the keys of a message before it claims the batch.
    pub digest: String,
    /// The keys, in hand-out order.
    pub keys: Vec<String>,
    /// Their `n` values, parallel to `keys`.
    pub ns: Vec<u64>,
    /// Partition chosen for publishing (set before publishing).
    #[serde(default)]
    pub partition: Option<i32>,
    /// Before publishing: the partition's end offset, where a search for the
    /// batch starts. After: the batch's own offset.
    #[serde(default)]
    pub offset: Option<i64>,
    /// The topic generation ([`PoolDoc::topic_generation`]) `offset` is in.
    #[serde(default)]
    pub topic_generation: u64,
    /// For a batch of handed-out keys going round again (returned unused by
    /// a consumer, or recycled): the batch they were handed out in. Such keys
    /// never leave `used_keys`: their documents are moved from that batch to
    /// this one (`{_id, batch: from}` → `{batch: id}`), and `keys` is not
    /// written at all, so `keys` only ever gets a key once (at generation)
    /// and loses it once (at its first move). That is what makes a stale
    /// leader's late write to either collection harmless: a late delete from
    /// `keys` finds nothing that could have come back, and a late insert
    /// into `used_keys` finds the key's document there for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// For a batch of new keys: the window of generation positions
    /// `[from, to)` it was read from (every key of `keys` in it, at most
    /// `to - from`). Step 3 then deletes the window from `keys` with one
    /// range statement on `{n: 1}` instead of one statement per key. Safe
    /// because the window lies below the pool's cursor (fully generated)
    /// when it is read, so every document in it at the time of the delete
    /// is either one of this batch's keys (in `used_keys` by step 2) or a
    /// key that left `keys` before and was written back by a stale
    /// generator (also in `used_keys`). `None`: delete by exact `_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<GenerationRange>,
    /// When the batch was created.
    #[serde(with = "bson::serde_helpers::chrono_datetime_as_bson_datetime")]
    pub created_at: DateTime<Utc>,
}

/// The producer lease of a pool: only its holder moves and publishes.
/// Collection [`LEASES`], `_id` = pool name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseDoc {
    /// Pool name.
    #[serde(rename = "_id")]
    pub pool: String,
    /// Id of the producer instance holding the lease (a label for people).
    pub holder: String,
    /// Random token of the holding process, new at every start: renewal and
    /// release match it, so two processes given the same instance id never
    /// renew each other's lease.
    pub token: String,
    /// Incremented at every change of holder; carried by every batch.
    pub epoch: u64,
    /// The lease is free after this time unless renewed: the database
    /// server's clock at the renewal plus the lease duration, compared with
    /// the server's clock again by a taker (no two hosts' clocks are ever
    /// compared).
    #[serde(with = "bson::serde_helpers::chrono_datetime_as_bson_datetime")]
    pub expires_at: DateTime<Utc>,
}

/// The claim of one lease epoch of a pool. Collection [`LEASE_EPOCHS`],
/// `_id` = `"<pool>:<epoch>"`.
///
/// A takeover first inserts the next epoch's claim: the unique `_id` makes
/// exactly one taker win even on servers whose conditional `update_one` is
/// not an atomic compare-and-set (two takers must never both get an epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseEpochDoc {
    /// `"<pool>:<epoch>"`.
    #[serde(rename = "_id")]
    pub id: String,
    /// Pool name.
    pub pool: String,
    /// The epoch.
    pub epoch: u64,
    /// The producer instance that took it.
    pub holder: String,
    /// Random token of the process that took it ([`LeaseDoc::token`]): a
    /// taker whose retried insert finds this claim recognises it as its own.
    pub token: String,
    /// When it was taken (the database server's clock).
    #[serde(with = "bson::serde_helpers::chrono_datetime_as_bson_datetime")]
    pub taken_at: DateTime<Utc>,
}

/// State of a consumer's claim on a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimState {
    /// Claimed; its keys are (or were, if the instance crashed) in a buffer.
    Open,
    /// Every key was handed out.
    Drained,
    /// The instance shut down and asked for its unused keys (`return_keys`)
    /// to be handed out again. The producer leader puts them into new
    /// batches (their `used_keys` documents move from this batch to those,
    /// see [`BatchRecord::from`]) and then sets [`ClaimState::Returned`];
    /// every step is idempotent, so a crash anywhere is finished by the next
    /// producer.
    Returning,
    /// The unused keys are in new batches.
    Returned,
    /// The producer could not match the claim to a batch record of this
    /// pool (`reason` says why) and set it aside: nothing was put back.
    Rejected,
}

/// A consumer instance's claim on one batch. Collection [`CLAIMS`],
/// `_id` = batch id, so a batch can be claimed once only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimDoc {
    /// Batch id.
    #[serde(rename = "_id")]
    pub batch_id: String,
    /// Pool name.
    pub pool: String,
    /// Consumer group.
    pub group: String,
    /// Consumer instance id: a label for people and metrics only.
    pub instance: String,
    /// Random token of the consumer process that claimed it, new at every
    /// start. Only the process holding it may resume, return or drain the
    /// claim: instance ids are configurable and may be reused.
    pub token: String,
    /// Kafka partition of the batch.
    pub partition: i32,
    /// Kafka offset of the batch.
    pub offset: i64,
    /// Number of keys in the batch.
    pub keys: u64,
    /// Current state.
    pub state: ClaimState,
    /// Keys of the batch not handed out, to be handed out again (set with
    /// [`ClaimState::Returning`]).
    #[serde(default)]
    pub return_keys: Vec<String>,
    /// Why the producer set the claim aside (with [`ClaimState::Rejected`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the claim was recorded.
    #[serde(with = "bson::serde_helpers::chrono_datetime_as_bson_datetime")]
    pub claimed_at: DateTime<Utc>,
}

/// State of a [`RecycleDoc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecycleState {
    /// Validated and recorded; the producer leader has not finished it yet.
    Requested,
    /// The key is in a new batch (its `used_keys` document names it).
    Done,
    /// The leader's re-check refused it (`reason` says why); nothing changed.
    Refused,
}

/// The stored name of each state of a document (what serde writes), for
/// queries and updates: `doc! { "state": BatchState::Moved }` instead of a
/// string literal beside the enum. A test checks each name against serde.
macro_rules! stored_names {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The name stored in MongoDB (the serde name).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl From<$ty> for Bson {
            fn from(value: $ty) -> Bson {
                Bson::String(value.as_str().to_owned())
            }
        }
    };
}

stored_names!(UsedReason {
    Batch => "batch",
    Reserved => "reserved",
    Vanity => "vanity",
    Blocked => "blocked",
});
stored_names!(VanityState { Requested => "requested", Taken => "taken", Refused => "refused" });
stored_names!(BatchState { Moving => "moving", Moved => "moved", Published => "published" });
stored_names!(ClaimState {
    Open => "open",
    Drained => "drained",
    Returning => "returning",
    Returned => "returned",
    Rejected => "rejected",
});
stored_names!(RecycleState { Requested => "requested", Done => "done", Refused => "refused" });

/// A request to put a handed-out key back into its pool. Collection
/// [`RECYCLES`], `_id` = [`recycle_id`] (`<pool>:<key>:<batch>`): a key
/// handed out in one batch can be recycled once, so a second request is a
/// duplicate-key error; once handed out again (another batch) it can be
/// recycled again.
///
/// Anyone may insert a request after checking it (the consumer library, the
/// `kgs-producer recycle` command); only the producer leader performs it:
/// the key goes into a new batch (its `used_keys` document moves from
/// `batch` to that one; it never leaves `used_keys`), then `done`. Each step
/// is idempotent and the `requested` document is the durable record that
/// lets the next leader finish a crashed one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecycleDoc {
    /// `<pool>:<key>:<batch>`.
    #[serde(rename = "_id")]
    pub id: String,
    /// Pool name.
    pub pool: String,
    /// The key.
    pub key: String,
    /// The batch that handed the key out (its `used_keys` document names it).
    pub batch: String,
    /// The key's `n` (from its `used_keys` document), kept in the new batch.
    pub n: u64,
    /// Current state.
    pub state: RecycleState,
    /// Why the leader refused it (with [`RecycleState::Refused`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who asked: a consumer instance id or `kgs-producer@<host>`.
    pub requested_by: String,
    /// When it was asked.
    #[serde(with = "bson::serde_helpers::chrono_datetime_as_bson_datetime")]
    pub requested_at: DateTime<Utc>,
    /// When it was done or refused.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "bson::serde_helpers::chrono_datetime_as_bson_datetime_optional"
    )]
    pub done_at: Option<DateTime<Utc>>,
    /// Quarantine: the leader puts the key back only from this moment on
    /// (`requested_at` + the pool's `recycle_cooldown_ms`); none = at once.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "bson::serde_helpers::chrono_datetime_as_bson_datetime_optional"
    )]
    pub due_at: Option<DateTime<Utc>>,
}

impl RecycleDoc {
    /// Whether `stored` (the document found under this request's `_id`
    /// after a duplicate-key error) is this very request: the insert was
    /// applied by the server and retried (by the driver across a
    /// reconnection, or by the caller), so the request is accepted, not
    /// "already recycled". Same requester, same moment (BSON dates keep
    /// milliseconds).
    pub fn is_same_request(&self, stored: &RecycleDoc) -> bool {
        self.id == stored.id
            && self.requested_by == stored.requested_by
            && self.requested_at.timestamp_millis() == stored.requested_at.timestamp_millis()
    }
}

impl RecycleDoc {
    /// A new request (state `requested`) to recycle `key` of `pool`, handed
    /// out by `batch` at position `n`, asked by `by` now.
    /// `now` is the MongoDB server's clock
    /// ([`crate::mongo::server_now`]): the leader compares `due_at` with
    /// it too, so no host clock shortens a quarantine.
    pub fn request(
        pool: &str,
        key: &str,
        batch: &str,
        n: u64,
        by: &str,
        cooldown_ms: u64,
        now: DateTime<Utc>,
    ) -> Self {
        let requested_at = now;
        // BSON dates keep milliseconds: the same value once stored.
        let requested_at = DateTime::from_timestamp_millis(requested_at.timestamp_millis())
            .unwrap_or(requested_at);
        let due_at = (cooldown_ms > 0)
            .then(|| requested_at + chrono::Duration::milliseconds(cooldown_ms as i64));
        Self {
            id: recycle_id(pool, key, batch),
            pool: pool.to_owned(),
            key: key.to_owned(),
            batch: batch.to_owned(),
            n,
            state: RecycleState::Requested,
            reason: None,
            requested_by: by.to_owned(),
            requested_at,
            done_at: None,
            due_at,
        }
    }
}

/// The state of a [`VanityDoc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VanityState {
    /// Recorded; the producer leader has not decided it yet.
    Requested,
    /// The key is in `used_keys` with reason `vanity`: the requester's.
    Taken,
    /// The key was handed out, reserved or blocked already (`reason`).
    Refused,
}

/// A request to take one specific key for a user (a vanity key).
/// Collection [`VANITY`], `_id` = [`vanity_id`] (`<pool>:<key>`): one
/// request per key ever, so of two concurrent requests for a key exactly
/// one is recorded (the other's insert is a duplicate-key error), and a
/// key asked for once is never asked for again.
///
/// Anyone may insert one (the consumer library); only the producer leader
/// decides it, through the same writes as `kgs-producer reserve`: the
/// key's `used_keys` document (unique `_id`, reason `vanity`) wins over a
/// concurrent batch move, or meets the document of a key handed out or
/// reserved already, and the request is `refused`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VanityDoc {
    /// `<pool>:<key>`.
    #[serde(rename = "_id")]
    pub id: String,
    /// Pool name.
    pub pool: String,
    /// The key asked for.
    pub key: String,
    /// Current state.
    pub state: VanityState,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who asked: a consumer instance id.
    pub requested_by: String,
    /// Random per request: tells a retried insert of this very request
    /// (answered as a duplicate) from another requester's.
    pub token: String,
    /// When it was asked.
    #[serde(with = "bson::serde_helpers::chrono_datetime_as_bson_datetime")]
    pub requested_at: DateTime<Utc>,
    /// When it was decided.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "bson::serde_helpers::chrono_datetime_as_bson_datetime_optional"
    )]
    pub done_at: Option<DateTime<Utc>>,
}

/// The `_id` of the [`VanityDoc`] of `key` in `pool`.
pub fn vanity_id(pool: &str, key: &str) -> String {
    format!("{pool}:{key}")
}

/// The `_id` of the [`RecycleDoc`] of `key`, handed out in `batch`, in `pool`.
pub fn recycle_id(pool: &str, key: &str, batch: &str) -> String {
    format!("{pool}:{key}:{batch}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stored state name is what serde writes for that value.
    #[test]
    fn stored_names_match_serde() {
        fn check<T: Serialize + Copy>(all: &[T], name: impl Fn(T) -> &'static str) {
            for &v in all {
                assert_eq!(bson::to_bson(&v).unwrap(), Bson::String(name(v).to_owned()));
            }
        }
        check(UsedReason::ALL, UsedReason::as_str);
        check(BatchState::ALL, BatchState::as_str);
        check(ClaimState::ALL, ClaimState::as_str);
        check(RecycleState::ALL, RecycleState::as_str);
        check(VanityState::ALL, VanityState::as_str);
    }

    #[test]
    fn pool_names() {
        for ok in ["p3", "url-short_3", "3letters"] {
            assert!(validate_pool_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "P3", "a.b", "-a", "a b", &"x".repeat(49)] {
            assert!(validate_pool_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_is_redacted_in_debug() {
        let s = PoolSecret("deadbeef".into());
        assert!(!format!("{s:?}").contains("deadbeef"));
    }

    #[test]
    fn documents_round_trip_through_bson() {
        let lease = LeaseDoc {
            pool: "p".into(),
            holder: "h".into(),
            token: "t".into(),
            epoch: 3,
            expires_at: DateTime::from_timestamp_millis(1_700_000_000_000).unwrap(),
        };
        let doc = bson::to_document(&lease).unwrap();
        assert!(matches!(
            doc.get("expires_at"),
            Some(bson::Bson::DateTime(_))
        ));
        assert!(matches!(doc.get("epoch"), Some(bson::Bson::Int64(3))));
        assert_eq!(bson::from_document::<LeaseDoc>(doc).unwrap(), lease);
    }

    #[test]
    fn recycle_doc_round_trips_with_and_without_done_at() {
        let mut r = RecycleDoc {
            id: recycle_id("p", "aZ3", "b1"),
            pool: "p".into(),
            key: "aZ3".into(),
            batch: "b1".into(),
            n: 7,
            state: RecycleState::Requested,
            reason: None,
            requested_by: "app-1".into(),
            requested_at: DateTime::from_timestamp_millis(1_700_000_000_000).unwrap(),
            done_at: None,
            due_at: None,
        };
        let doc = bson::to_document(&r).unwrap();
        assert!(!doc.contains_key("done_at"));
        assert_eq!(bson::from_document::<RecycleDoc>(doc).unwrap(), r);
        r.state = RecycleState::Done;
        r.done_at = Some(r.requested_at);
        let doc = bson::to_document(&r).unwrap();
        assert!(matches!(doc.get("done_at"), Some(bson::Bson::DateTime(_))));
        assert_eq!(bson::from_document::<RecycleDoc>(doc).unwrap(), r);
    }

    /// A retried insert finds itself (dates stored to the millisecond);
    /// another requester, or the same one later, is another request.
    #[test]
    fn a_recycle_request_recognises_itself() {
        let now = Utc::now();
        let mine = RecycleDoc {
            id: recycle_id("p", "aZ3", "b1"),
            pool: "p".into(),
            key: "aZ3".into(),
            batch: "b1".into(),
            n: 7,
            state: RecycleState::Requested,
            reason: None,
            requested_by: "app-1".into(),
            requested_at: now,
            done_at: None,
            due_at: None,
        };
        let stored: RecycleDoc = bson::from_document(bson::to_document(&mine).unwrap()).unwrap();
        assert!(mine.is_same_request(&stored));
        let other = RecycleDoc {
            requested_by: "app-2".into(),
            ..stored.clone()
        };
        assert!(!mine.is_same_request(&other));
        let later = RecycleDoc {
            requested_at: now + chrono::Duration::seconds(1),
            ..stored
        };
        assert!(!mine.is_same_request(&later));
    }
}
