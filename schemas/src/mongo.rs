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

/// `uri` with the password of its credentials, if any, replaced by `***`,
/// for error messages and logs (`mongodb://kgs:***@db:27017/?tls=true`).
pub fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    // The credentials end at the last `@` before the host list's end.
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{}", &rest[at + 1..])
        }
        None => uri.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passwords never survive; URIs without credentials are unchanged.
    #[test]
    fn redacts_the_password() {
        assert_eq!(
            redact_uri("mongodb://kgs:s3cr%40t@127.0.0.1:27017/?tls=true"),
            "mongodb://kgs:***@127.0.0.1:27017/?tls=true"
        );
        assert_eq!(
            redact_uri("mongodb+srv://u:p@a.example,b.example/db"),
            "mongodb+srv://u:***@a.example,b.example/db"
        );
        assert_eq!(
            redact_uri("mongodb://127.0.0.1:27017"),
            "mongodb://127.0.0.1:27017"
        );
        assert_eq!(redact_uri("not a uri"), "not a uri");
    }
}
