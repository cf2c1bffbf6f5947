//! The Kafka message that carries one batch of keys from the producer to the
//! consumers, and its strict decoder.
//!
//! The wire format is JSON (see `schemas/json/key-batch.v1.schema.json`) so
//! that app servers in any language can read it. Decoding checks everything a
//! consumer relies on before a key may be handed out: the schema version, the
//! pool, the key format, no duplicates, bounded size.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::format::{FormatError, KeyFormat};

/// The schema version this crate writes and accepts.
pub const SCHEMA_VERSION: u32 = 1;

/// The largest encoded batch accepted: Kafka's default `message.max.bytes`
/// (1 MiB); a bigger message could not have come from a kgs producer.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// The most keys one batch may carry. 50,000 keys of 12 characters encode to
/// about 800 KB, under [`MAX_MESSAGE_BYTES`].
pub const MAX_BATCH_KEYS: usize = 50_000;

/// The longest batch id accepted.
pub const MAX_BATCH_ID_LEN: usize = 128;

/// The most bytes a batch of `keys` keys of `format` can encode to, for
/// any pool name, epoch and batch id kgs writes: every key at its format's longest
/// length, each character as JSON writes it (`"` and `\` take two bytes,
/// every other character of an alphabet one), plus the fixed fields at their
/// longest. A producer configuration whose worst case exceeds the message
/// limit is refused before anything is moved.
pub fn max_encoded_len(format: &KeyFormat, keys: usize) -> usize {
    let widest_char = if format.alphabet().contains(['"', '\\']) {
        2
    } else {
        1
    };
    // `"key",` per key.
    let per_key = usize::from(format.max_length()) * widest_char + 3;
    // {"schema_version":N,"batch_id":"…","pool":"…","epoch":N,
    //  "created_at":"…","keys":[…]} with every field at its longest.
    let fixed = 128 + MAX_BATCH_ID_LEN + crate::docs::MAX_POOL_NAME_LEN + 20 + 40;
    fixed + keys * per_key
}

/// Fields every version-1 message must have.
const REQUIRED_FIELDS: [&str; 6] = [
    "schema_version",
    "batch_id",
    "pool",
    "epoch",
    "created_at",
    "keys",
];

/// One batch of keys, as published to the pool's topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBatch {
    /// Always [`SCHEMA_VERSION`] when written by this crate.
    pub schema_version: u32,
    /// Unique id of the batch; also the `_id` of its batch record and claim.
    pub batch_id: String,
    /// Name of the pool the keys belong to.
    pub pool: String,
    /// Lease epoch of the producer that moved the batch.
    pub epoch: u64,
    /// When the producer created the batch.
    pub created_at: DateTime<Utc>,
    /// The keys, in hand-out order.
    pub keys: Vec<String>,
}

/// What a consumer expects of the batches on its topic.
#[derive(Debug, Clone)]
pub struct BatchCheck<'a> {
    /// The pool the consumer serves; batches of other pools are rejected.
    pub pool: &'a str,
    /// The pool's key format; every key must match it.
    pub format: &'a KeyFormat,
}

/// Why a message is not an acceptable key batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message is larger than [`MAX_MESSAGE_BYTES`].
    #[error("message of {size} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")]
    Oversize {
        /// Size of the payload in bytes.
        size: usize,
    },
    /// The payload is not a JSON document (or not a JSON object).
    #[error("not a JSON object: {0}")]
    NotJson(String),
    /// The `schema_version` is not one this crate understands.
    #[error("unknown schema version {0}, expected {SCHEMA_VERSION}")]
    UnknownSchemaVersion(String),
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field has the wrong type or an invalid value, or an unknown field is present.
    #[error("malformed batch: {0}")]
    Malformed(String),
    /// The batch belongs to another pool.
    #[error("batch of pool {found:?} on the topic of pool {expected:?}")]
    WrongPool {
        /// The consumer's pool.
        expected: String,
        /// The pool named by the message.
        found: String,
    },
    /// The batch has no keys.
    #[error("empty batch")]
    EmptyBatch,
    /// The batch has more than [`MAX_BATCH_KEYS`] keys.
    #[error("batch of {0} keys exceeds the limit of {MAX_BATCH_KEYS}")]
    TooManyKeys(usize),
    /// A key does not match the pool's format.
    #[error("bad key at position {position}: {source}")]
    BadKey {
        /// Position of the key in the batch.
        position: usize,
        /// What is wrong with it.
        source: FormatError,
    },
    /// The same key appears twice in the batch.
    #[error("key {0:?} appears twice in the batch")]
    DuplicateKey(String),
}

impl DecodeError {
    /// Every value [`DecodeError::kind`] returns, so metrics labelled by kind
    /// can start every series at 0.
    pub const KINDS: [&'static str; 10] = [
        "oversize",
        "not_json",
        "unknown_schema_version",
        "missing_field",
        "malformed",
        "wrong_pool",
        "empty_batch",
        "too_many_keys",
        "bad_key",
        "duplicate_key",
    ];

    /// A short, fixed label for metrics (bounded cardinality).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Oversize { .. } => "oversize",
            Self::NotJson(_) => "not_json",
            Self::UnknownSchemaVersion(_) => "unknown_schema_version",
            Self::MissingField(_) => "missing_field",
            Self::Malformed(_) => "malformed",
            Self::WrongPool { .. } => "wrong_pool",
            Self::EmptyBatch => "empty_batch",
            Self::TooManyKeys(_) => "too_many_keys",
            Self::BadKey { .. } => "bad_key",
            Self::DuplicateKey(_) => "duplicate_key",
        }
    }
}

impl KeyBatch {
    /// A new batch with the current schema version, stamped now.
    pub fn new(batch_id: String, pool: String, epoch: u64, keys: Vec<String>) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            batch_id,
            pool,
            epoch,
            created_at: Utc::now(),
            keys,
        }
    }

    /// Encodes the batch as JSON.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_vec(self).expect("KeyBatch serializes")
    }

    /// Decodes and fully validates a message from the pool's topic.
    ///
    /// Only a batch that passes every check is returned: none of the keys of a
    /// rejected message may ever be handed out.
    pub fn decode(payload: &[u8], check: &BatchCheck<'_>) -> Result<Self, DecodeError> {
        if payload.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::Oversize {
                size: payload.len(),
            });
        }
        let value: Value =
            serde_json::from_slice(payload).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let Value::Object(fields) = &value else {
            return Err(DecodeError::NotJson(format!(
                "expected an object, found {}",
                json_type(&value)
            )));
        };
        // The version decides how to read the rest, so it is checked first.
        match fields.get("schema_version") {
            None => return Err(DecodeError::MissingField("schema_version")),
            Some(v) if v.as_u64() == Some(u64::from(SCHEMA_VERSION)) => {}
            Some(v) => return Err(DecodeError::UnknownSchemaVersion(truncated(v))),
        }
        if let Some(missing) = REQUIRED_FIELDS.iter().find(|f| !fields.contains_key(**f)) {
            return Err(DecodeError::MissingField(missing));
        }
        let batch: KeyBatch =
            serde_json::from_value(value).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        batch.validate(check)?;
        Ok(batch)
    }

    /// Checks a decoded batch against what the consumer expects.
    pub fn validate(&self, check: &BatchCheck<'_>) -> Result<(), DecodeError> {
        if self.batch_id.is_empty() || self.batch_id.len() > MAX_BATCH_ID_LEN {
            return Err(DecodeError::Malformed(format!(
                "batch_id must have 1 to {MAX_BATCH_ID_LEN} characters, has {}",
                self.batch_id.len()
            )));
        }
        if self.pool != check.pool {
            return Err(DecodeError::WrongPool {
                expected: check.pool.to_owned(),
                found: self.pool.chars().take(64).collect(),
            });
        }
        if self.keys.is_empty() {
            return Err(DecodeError::EmptyBatch);
        }
        if self.keys.len() > MAX_BATCH_KEYS {
            return Err(DecodeError::TooManyKeys(self.keys.len()));
        }
        let mut seen = HashSet::with_capacity(self.keys.len());
        for (position, key) in self.keys.iter().enumerate() {
            check
                .format
                .check(key)
                .map_err(|source| DecodeError::BadKey { position, source })?;
            if !seen.insert(key.as_str()) {
                return Err(DecodeError::DuplicateKey(key.clone()));
            }
        }
        Ok(())
    }
}

/// The digest of a batch's key list, kept in its [`crate::docs::BatchRecord`]:
/// SHA-256 over every key, each preceded by its length (so no two lists
/// share a digest by moving a separator), as lowercase hex.
pub fn keys_digest(keys: &[String]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for k in keys {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
    }
    hex::encode(h.finalize())
}

/// What a consumer reads of a batch record to verify a message: the
/// [`crate::docs::BatchRecord`] without its key lists (one exact-`_id` read
/// with a projection). Unknown fields are ignored, so the record may grow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchProof {
    /// Batch id.
    #[serde(rename = "_id")]
    pub id: String,
    /// Pool name.
    pub pool: String,
    /// The pool incarnation that moved it.
    pub incarnation: String,
    /// The record's step.
    pub state: crate::docs::BatchState,
    /// [`keys_digest`] of the moved keys.
    pub digest: String,
    /// The partition the producer publishes it to (set before publishing).
    #[serde(default)]
    pub partition: Option<i32>,
    /// The topic generation ([`crate::docs::PoolDoc::topic_generation`]) it
    /// is published into: a consumer that finds it newer than the topic it
    /// subscribed to knows the topic was re-created.
    #[serde(default)]
    pub topic_generation: u64,
}

impl BatchProof {
    /// The projection that reads a [`BatchProof`] from a batch record.
    pub fn projection() -> bson::Document {
        bson::doc! {
            "pool": 1, "incarnation": 1, "state": 1, "digest": 1, "partition": 1,
            "topic_generation": 1,
        }
    }
}

/// Why a well-formed batch is not one this pool's producer durably moved:
/// its keys must never be handed out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unverified {
    /// No batch record has the message's batch id.
    #[error("no batch record {0:?}: not moved by this pool's producer")]
    NoRecord(String),
    /// The record is another pool's.
    #[error("batch record of pool {0:?}")]
    OtherPool(String),
    /// The record is of another incarnation of the pool.
    #[error("batch record of incarnation {found:?}, the pool is {expected:?}")]
    OtherIncarnation {
        /// The pool's incarnation.
        expected: String,
        /// The record's.
        found: String,
    },
    /// The record's keys are not moved yet (a message cannot precede it).
    #[error("batch record is still {0:?}, not moved")]
    NotMoved(crate::docs::BatchState),
    /// The message's keys are not the ones the record moved.
    #[error("keys differ from the batch record's")]
    KeysDiffer,
    /// The message is on another partition than the record names.
    #[error("on partition {found}, the batch record names {expected:?}")]
    OtherPartition {
        /// The record's partition.
        expected: Option<i32>,
        /// The message's.
        found: i32,
    },
}

impl Unverified {
    /// Every value of [`Unverified::reason`].
    pub const REASONS: [&'static str; 6] = [
        "no_record",
        "other_pool",
        "other_incarnation",
        "not_moved",
        "keys_differ",
        "other_partition",
    ];

    /// A short fixed label (metrics).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoRecord(_) => "no_record",
            Self::OtherPool(_) => "other_pool",
            Self::OtherIncarnation { .. } => "other_incarnation",
            Self::NotMoved(_) => "not_moved",
            Self::KeysDiffer => "keys_differ",
            Self::OtherPartition { .. } => "other_partition",
        }
    }
}

impl KeyBatch {
    /// Checks the batch against the producer's durable record of it
    /// (`record`, read by the batch id), as read from `partition` of the
    /// topic of pool incarnation `incarnation`. Only a batch that passes may
    /// be claimed: its record exists, is this pool incarnation's, says the
    /// keys are moved (`moved` or `published`), has the digest of exactly
    /// these keys in this order, and names this partition. Anything else —
    /// a forged batch, a copy on another partition, another installation's
    /// batch — is refused, whatever its shape.
    pub fn verify(
        &self,
        partition: i32,
        record: Option<&BatchProof>,
        incarnation: &str,
    ) -> Result<(), Unverified> {
        let record = record.ok_or_else(|| Unverified::NoRecord(self.batch_id.clone()))?;
        if record.id != self.batch_id {
            return Err(Unverified::NoRecord(self.batch_id.clone()));
        }
        if record.pool != self.pool {
            return Err(Unverified::OtherPool(
                record.pool.chars().take(64).collect(),
            ));
        }
        if record.incarnation != incarnation {
            return Err(Unverified::OtherIncarnation {
                expected: incarnation.to_owned(),
                found: record.incarnation.chars().take(64).collect(),
            });
        }
        if record.state == crate::docs::BatchState::Moving {
            return Err(Unverified::NotMoved(record.state));
        }
        if record.partition != Some(partition) {
            return Err(Unverified::OtherPartition {
                expected: record.partition,
                found: partition,
            });
        }
        if record.digest != keys_digest(&self.keys) {
            return Err(Unverified::KeysDiffer);
        }
        Ok(())
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn truncated(v: &Value) -> String {
    let s = v.to_string();
    s.chars().take(32).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn format() -> KeyFormat {
        KeyFormat::base62(3).unwrap()
    }

    fn good() -> Value {
        json!({
            "schema_version": 1,
            "batch_id": "p3-7-42",
            "pool": "p3",
            "epoch": 7,
            "created_at": "2026-11-26T00:00:00Z",
            "keys": ["aZ3", "x8K", "000"],
        })
    }

    fn decode(v: &Value) -> Result<KeyBatch, DecodeError> {
        let f = format();
        KeyBatch::decode(
            &serde_json::to_vec(v).unwrap(),
            &BatchCheck {
                pool: "p3",
                format: &f,
            },
        )
    }

    fn with(field: &str, value: Value) -> Value {
        let mut v = good();
        v[field] = value;
        v
    }

    /// `KINDS` lists the kind of every variant, once.
    #[test]
    fn kinds_lists_every_variant() {
        let every = [
            DecodeError::Oversize { size: 0 },
            DecodeError::NotJson(String::new()),
            DecodeError::UnknownSchemaVersion(String::new()),
            DecodeError::MissingField("keys"),
            DecodeError::Malformed(String::new()),
            DecodeError::WrongPool {
                expected: String::new(),
                found: String::new(),
            },
            DecodeError::EmptyBatch,
            DecodeError::TooManyKeys(0),
            DecodeError::BadKey {
                position: 0,
                source: FormatError::BadLength(0),
            },
            DecodeError::DuplicateKey(String::new()),
        ];
        let kinds: Vec<&str> = every.iter().map(DecodeError::kind).collect();
        assert_eq!(kinds, DecodeError::KINDS);
        // Each kind is its own metric label.
        let distinct: HashSet<&str> = kinds.iter().copied().collect();
        assert_eq!(distinct.len(), kinds.len());
    }

    #[test]
    fn round_trip() {
        let f = format();
        let b = KeyBatch::new(
            "b1".into(),
            "p3".into(),
            3,
            vec!["abc".into(), "ABC".into()],
        );
        let check = BatchCheck {
            pool: "p3",
            format: &f,
        };
        assert_eq!(KeyBatch::decode(&b.encode(), &check).unwrap(), b);
        assert_eq!(decode(&good()).unwrap().keys, vec!["aZ3", "x8K", "000"]);
    }

    #[test]
    fn rejects_garbage_and_truncated_json() {
        let f = format();
        let check = BatchCheck {
            pool: "p3",
            format: &f,
        };
        let bytes = serde_json::to_vec(&good()).unwrap();
        assert!(matches!(
            KeyBatch::decode(&[0xff, 0x00, 0x13], &check),
            Err(DecodeError::NotJson(_))
        ));
        assert!(matches!(
            KeyBatch::decode(&bytes[..bytes.len() / 2], &check),
            Err(DecodeError::NotJson(_))
        ));
        assert!(matches!(
            KeyBatch::decode(b"[1,2]", &check),
            Err(DecodeError::NotJson(_))
        ));
    }

    #[test]
    fn rejects_unknown_schema_version() {
        assert_eq!(
            decode(&with("schema_version", json!(2))),
            Err(DecodeError::UnknownSchemaVersion("2".into()))
        );
        assert!(matches!(
            decode(&with("schema_version", json!("1"))),
            Err(DecodeError::UnknownSchemaVersion(_))
        ));
    }

    #[test]
    fn rejects_missing_fields() {
        for field in REQUIRED_FIELDS {
            let mut v = good();
            v.as_object_mut().unwrap().remove(field);
            assert_eq!(decode(&v), Err(DecodeError::MissingField(field)), "{field}");
        }
    }

    #[test]
    fn rejects_malformed_fields() {
        assert!(matches!(
            decode(&with("epoch", json!(-1))),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(&with("keys", json!("aZ3"))),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(&with("created_at", json!("yesterday"))),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(&with("batch_id", json!(""))),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(&with("extra", json!(1))),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn rejects_another_pools_batch() {
        assert!(matches!(
            decode(&with("pool", json!("p2"))),
            Err(DecodeError::WrongPool { .. })
        ));
    }

    #[test]
    fn rejects_bad_keys() {
        assert!(matches!(
            decode(&with("keys", json!(["aZ3", "toolong"]))),
            Err(DecodeError::BadKey {
                position: 1,
                source: FormatError::WrongKeyLength { .. }
            })
        ));
        assert!(matches!(
            decode(&with("keys", json!(["a-3"]))),
            Err(DecodeError::BadKey {
                position: 0,
                source: FormatError::NotInAlphabet { .. }
            })
        ));
    }

    #[test]
    fn rejects_duplicate_keys() {
        assert_eq!(
            decode(&with("keys", json!(["aZ3", "bbb", "aZ3"]))),
            Err(DecodeError::DuplicateKey("aZ3".into()))
        );
    }

    #[test]
    fn rejects_empty_and_oversize_batches() {
        assert_eq!(
            decode(&with("keys", json!([]))),
            Err(DecodeError::EmptyBatch)
        );
        let f = format();
        let many: Vec<String> = (0..MAX_BATCH_KEYS as u64 + 1)
            .map(|i| f.key_at(i).unwrap())
            .collect();
        assert_eq!(
            decode(&with("keys", json!(many))),
            Err(DecodeError::TooManyKeys(MAX_BATCH_KEYS + 1))
        );
        let check = BatchCheck {
            pool: "p3",
            format: &f,
        };
        let huge = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert_eq!(
            KeyBatch::decode(&huge, &check),
            Err(DecodeError::Oversize {
                size: MAX_MESSAGE_BYTES + 1
            })
        );
    }

    fn proof(b: &KeyBatch) -> BatchProof {
        BatchProof {
            id: b.batch_id.clone(),
            pool: b.pool.clone(),
            incarnation: "inc1".into(),
            state: crate::docs::BatchState::Published,
            digest: keys_digest(&b.keys),
            partition: Some(2),
            topic_generation: 0,
        }
    }

    /// Only a batch matching its record in every respect is verified; each
    /// difference is its own reason.
    #[test]
    fn verify_against_the_record() {
        use crate::docs::BatchState;
        let b = KeyBatch::new(
            "b1".into(),
            "p3".into(),
            1,
            vec!["abc".into(), "ABC".into()],
        );
        let good = proof(&b);
        assert_eq!(b.verify(2, Some(&good), "inc1"), Ok(()));
        let moved = BatchProof {
            state: BatchState::Moved,
            ..good.clone()
        };
        assert_eq!(b.verify(2, Some(&moved), "inc1"), Ok(()));
        let reason = |partition, p: Option<&BatchProof>, inc| {
            b.verify(partition, p, inc).unwrap_err().reason()
        };
        assert_eq!(reason(2, None, "inc1"), "no_record");
        let other_id = BatchProof {
            id: "b2".into(),
            ..good.clone()
        };
        assert_eq!(reason(2, Some(&other_id), "inc1"), "no_record");
        let other_pool = BatchProof {
            pool: "p4".into(),
            ..good.clone()
        };
        assert_eq!(reason(2, Some(&other_pool), "inc1"), "other_pool");
        assert_eq!(reason(2, Some(&good), "inc2"), "other_incarnation");
        let moving = BatchProof {
            state: BatchState::Moving,
            ..good.clone()
        };
        assert_eq!(reason(2, Some(&moving), "inc1"), "not_moved");
        assert_eq!(reason(3, Some(&good), "inc1"), "other_partition");
        let unplaced = BatchProof {
            partition: None,
            ..good.clone()
        };
        assert_eq!(reason(2, Some(&unplaced), "inc1"), "other_partition");
        // Same keys in another order, one key fewer, one key more: all differ.
        for keys in [vec!["ABC", "abc"], vec!["abc"], vec!["abc", "ABC", "xyz"]] {
            let forged = KeyBatch {
                keys: keys.into_iter().map(str::to_owned).collect(),
                ..b.clone()
            };
            assert_eq!(
                forged.verify(2, Some(&good), "inc1").unwrap_err().reason(),
                "keys_differ"
            );
        }
        let every = [
            Unverified::NoRecord(String::new()),
            Unverified::OtherPool(String::new()),
            Unverified::OtherIncarnation {
                expected: String::new(),
                found: String::new(),
            },
            Unverified::NotMoved(BatchState::Moving),
            Unverified::KeysDiffer,
            Unverified::OtherPartition {
                expected: None,
                found: 0,
            },
        ];
        let reasons: Vec<&str> = every.iter().map(Unverified::reason).collect();
        assert_eq!(reasons, Unverified::REASONS);
    }

    /// The length prefix keeps lists that concatenate alike apart.
    #[test]
    fn digest_separates_keys() {
        let d =
            |keys: &[&str]| keys_digest(&keys.iter().map(|k| (*k).to_owned()).collect::<Vec<_>>());
        assert_ne!(d(&["ab", "c"]), d(&["a", "bc"]));
        assert_eq!(d(&["ab", "c"]), d(&["ab", "c"]));
        assert_eq!(d(&["ab"]).len(), 64);
    }

    /// The bound holds for the worst batch kgs writes: every key all
    /// escaped characters, the longest pool name, epoch and batch id.
    #[test]
    fn max_encoded_len_bounds_the_worst_batch() {
        let f = KeyFormat::new("\"\\ab", 12).unwrap();
        let worst_key: String = "\"".repeat(12);
        let pool = "p".repeat(crate::docs::MAX_POOL_NAME_LEN);
        for n in [1usize, 10, 1000] {
            let b = KeyBatch::new(
                "b".repeat(MAX_BATCH_ID_LEN),
                pool.clone(),
                u64::MAX,
                vec![worst_key.clone(); n],
            );
            let bound = max_encoded_len(&f, n);
            assert!(b.encode().len() <= bound, "{} > {bound}", b.encode().len());
        }
        // Escapes double the size of such keys.
        assert!(
            max_encoded_len(&f, 1000)
                > max_encoded_len(&KeyFormat::base62(10).unwrap(), 1000) + 11_000
        );
    }
}
