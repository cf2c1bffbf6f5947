//! The one rule every writer of the kgs documents relies on to make a step
//! idempotent or to let an insert decide a race: a write that fails with a
//! duplicate-key error (E11000) found the document already there.

use mongodb::error::{ErrorKind, WriteFailure};

/// MongoDB's duplicate-key error code.
pub const DUPLICATE_KEY: i32 = 11000;

/// The server error code of a single-document write (`insert_one`,
/// `update_one`, …) or of a command, if the error carries one.
pub fn code_of(err: &mongodb::error::Error) -> Option<i32> {
    match err.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

/// Whether a single-document write failed because a document with its
/// unique key (`_id`, or a unique index) already exists. An `insert_many`
/// reports duplicates per document instead; its callers look at each.
pub fn is_duplicate_key(err: &mongodb::error::Error) -> bool {
    code_of(err) == Some(DUPLICATE_KEY)
}
