//! Validates serialized examples of every kgs message and document against
//! the JSON Schema files in `schemas/json/`, so the files other languages read
//! cannot drift from the Rust types. Each schema also rejects a broken
//! example, so these checks can fail.

use std::path::Path;

use chrono::{DateTime, Utc};
use kgs_schemas::docs::{
    BatchRecord, BatchState, ClaimDoc, ClaimState, GenerationRange, KeyDoc, LeaseDoc,
    LeaseEpochDoc, PoolDoc, PoolSecret, RecycleDoc, RecycleState, UsedKeyDoc, UsedReason,
};
use kgs_schemas::format::KeyFormatSpec;
use kgs_schemas::{KeyBatch, BASE62};
use serde::Serialize;
use serde_json::{json, Value};

fn load(file: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("json")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn validator(schema: &Value) -> jsonschema::Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(schema)
        .expect("schema compiles")
}

/// The validator of one `$defs` entry of the MongoDB documents schema.
fn mongo_validator(def: &str) -> jsonschema::Validator {
    let mut schema = load("mongo-documents.schema.json");
    schema["$ref"] = json!(format!("#/$defs/{def}"));
    validator(&schema)
}

/// A document as MongoDB Relaxed Extended JSON, the form the schema describes.
fn relaxed<T: Serialize>(doc: &T) -> Value {
    bson::to_bson(doc).unwrap().into_relaxed_extjson()
}

fn assert_valid(v: &jsonschema::Validator, instance: &Value) {
    let errors: Vec<String> = v.iter_errors(instance).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{instance}\n{errors:#?}");
}

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_795_000_000_000).unwrap()
}

#[test]
fn key_batch_examples_match_the_schema() {
    let v = validator(&load("key-batch.v1.schema.json"));
    let batch = KeyBatch::new(
        "p3-1-42".into(),
        "p3".into(),
        1,
        vec!["aZ3".into(), "x8K".into()],
    );
    let good: Value = serde_json::from_slice(&batch.encode()).unwrap();
    assert_valid(&v, &good);

    for (field, bad) in [
        ("schema_version", json!(2)),
        ("keys", json!([])),
        ("keys", json!(["aZ3", "aZ3"])),
        ("keys", json!(["has space"])),
        ("pool", json!("Not A Pool")),
        ("created_at", json!("yesterday")),
        ("epoch", json!(-1)),
    ] {
        let mut broken = good.clone();
        broken[field] = bad;
        assert!(
            !v.is_valid(&broken),
            "schema accepted {field} = {}",
            broken[field]
        );
    }
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("batch_id");
    assert!(
        !v.is_valid(&missing),
        "schema accepted a batch without batch_id"
    );
}

#[test]
fn mongo_documents_match_the_schema() {
    let pool = PoolDoc {
        name: "p3".into(),
        incarnation: "0123456789abcdef".into(),
        format: KeyFormatSpec {
            alphabet: BASE62.into(),
            length: 3,
            max_length: Some(5),
        },
        space: 238_328,
        secret: PoolSecret("00ff".repeat(8)),
        cursor: 1000,
        generating: Some(GenerationRange {
            from: 1000,
            to: 2000,
        }),
        reserved_ahead: vec![1_500],
        blocklist: vec!["ass".into(), "shit".into()],
        blocked: 12,
        blocklist_added: vec![kgs_schemas::docs::BlocklistAddition {
            from: 1000,
            words: vec!["cat".into()],
            at: chrono::Utc::now(),
        }],
        blocklist_swept: 1,
        blocklist_removed: 3,
        blocklist_handed_out: 1,
        recycle_cooldown_ms: 30 * 86_400_000,
        topic: "kgs.p3.0123456789abcdef".into(),
        partitions: 4,
        topic_generation: 0,
        moved_to: Some(900),
        created_at: now(),
    };
    let key = KeyDoc {
        key: "aZ3".into(),
        n: 7,
    };
    let used = UsedKeyDoc {
        key: "x8K".into(),
        n: 8,
        reason: UsedReason::Batch,
        batch: Some("p3-1-42".into()),
        at: now(),
    };
    let reserved = UsedKeyDoc {
        key: "api".into(),
        n: 9,
        reason: UsedReason::Reserved,
        batch: None,
        at: now(),
    };
    let record = BatchRecord {
        id: "p3-1-42".into(),
        pool: "p3".into(),
        incarnation: "0123456789abcdef".into(),
        epoch: 1,
        state: BatchState::Moved,
        digest: kgs_schemas::keys_digest(&["x8K".to_owned()]),
        keys: vec!["x8K".into()],
        ns: vec![8],
        partition: Some(2),
        offset: Some(10),
        topic_generation: 0,
        from: Some("p3-1-41".into()),
        window: None,
        created_at: now(),
    };
    let new_keys = BatchRecord {
        id: "p3-1-43".into(),
        from: None,
        window: Some(GenerationRange { from: 0, to: 1000 }),
        ..record.clone()
    };
    let lease = LeaseDoc {
        pool: "p3".into(),
        holder: "producer-a".into(),
        token: "9f1c0b2a".into(),
        epoch: 1,
        expires_at: now(),
    };
    let lease_epoch = LeaseEpochDoc {
        id: "p3:2".into(),
        pool: "p3".into(),
        epoch: 2,
        holder: "producer-b".into(),
        token: "4d5e6f70".into(),
        taken_at: now(),
    };
    let claim = ClaimDoc {
        batch_id: "p3-1-42".into(),
        pool: "p3".into(),
        group: "kgs.p3.0123456789abcdef".into(),
        instance: "app-1".into(),
        token: "5f0c1e2d3b4a49586776859493a2b1c0".into(),
        partition: 2,
        offset: 10,
        keys: 1,
        state: ClaimState::Returning,
        return_keys: vec!["x8K".into()],
        reason: None,
        claimed_at: now(),
    };
    let recycle = RecycleDoc {
        id: "p3:x8K:p3-1-42".into(),
        pool: "p3".into(),
        key: "x8K".into(),
        batch: "p3-1-42".into(),
        n: 8,
        state: RecycleState::Done,
        reason: None,
        requested_by: "app-1".into(),
        requested_at: now(),
        done_at: Some(now()),
        due_at: Some(now()),
    };
    let refused = RecycleDoc {
        state: RecycleState::Refused,
        reason: Some("used_keys changed since the request".into()),
        done_at: None,
        ..recycle.clone()
    };
    let vanity = kgs_schemas::docs::VanityDoc {
        id: "p3:aZ9".into(),
        pool: "p3".into(),
        key: "aZ9".into(),
        state: kgs_schemas::docs::VanityState::Taken,
        reason: None,
        requested_by: "app-1".into(),
        token: "0123456789abcdef".into(),
        requested_at: now(),
        done_at: Some(now()),
    };
    let cases = [
        ("pool", relaxed(&pool)),
        ("key_doc", relaxed(&key)),
        ("used_key_doc", relaxed(&used)),
        ("used_key_doc", relaxed(&reserved)),
        ("batch_record", relaxed(&record)),
        ("batch_record", relaxed(&new_keys)),
        ("lease", relaxed(&lease)),
        ("lease_epoch", relaxed(&lease_epoch)),
        ("claim", relaxed(&claim)),
        ("recycle", relaxed(&recycle)),
        ("recycle", relaxed(&refused)),
        ("vanity", relaxed(&vanity)),
    ];
    for (def, good) in cases {
        let v = mongo_validator(def);
        assert_valid(&v, &good);
        // A document missing its _id, or with a field the schema does not
        // know, must be rejected.
        let mut no_id = good.clone();
        no_id.as_object_mut().unwrap().remove("_id");
        assert!(
            !v.is_valid(&no_id),
            "{def}: accepted a document without _id"
        );
        let mut extra = good.clone();
        extra["unexpected"] = json!(1);
        assert!(!v.is_valid(&extra), "{def}: accepted an unknown field");
    }
}
