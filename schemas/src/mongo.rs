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

/// Why connecting to MongoDB failed, in one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The server refused this client, which no retry changes: bad
    /// credentials, or a server certificate the client does not trust.
    Refused(String),
    /// Anything else (not up yet, unreachable, slow): worth retrying.
    Unreachable(String),
}

/// Classifies a connection error and says it in one line: the driver's
/// `Display` of a failed server selection is a dump of the topology, whose
/// one useful part is the per-server error (`I/O error: invalid peer
/// certificate: UnknownIssuer`).
pub fn connect_failure(err: &mongodb::error::Error) -> ConnectFailure {
    match err.kind.as_ref() {
        ErrorKind::Authentication { message, .. } => ConnectFailure::Refused(message.clone()),
        ErrorKind::ServerSelection { message, .. } => {
            let cause = message
                .split_once("Error: Kind: ")
                .map(|(_, rest)| rest.split(", labels:").next().unwrap_or(rest).to_owned());
            match cause {
                Some(c) if is_tls_refusal(&c) => ConnectFailure::Refused(c),
                Some(c) => ConnectFailure::Unreachable(c),
                None => ConnectFailure::Unreachable(message.clone()),
            }
        }
        _ => {
            let text = err.to_string();
            if is_tls_refusal(&text) {
                ConnectFailure::Refused(text)
            } else {
                ConnectFailure::Unreachable(text)
            }
        }
    }
}

/// The one-line reason of any MongoDB error: the server's message and code
/// for a refused command or write, else as [`connect_failure`] says it.
pub fn error_detail(err: &mongodb::error::Error) -> String {
    match err.kind.as_ref() {
        ErrorKind::Command(c) => format!("{} ({} {})", c.message, c.code_name, c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => format!("{} (code {})", w.message, w.code),
        _ => match connect_failure(err) {
            ConnectFailure::Refused(d) | ConnectFailure::Unreachable(d) => d,
        },
    }
}

/// A TLS handshake the client gave up on: the server's certificate is not
/// trusted or not for this host.
fn is_tls_refusal(text: &str) -> bool {
    text.contains("invalid peer certificate") || text.contains("certificate verify failed")
}

/// The MongoDB server's clock (`hello.localTime`): what every time that
/// hosts compare is taken from (the producer lease, a recycled key's
/// quarantine), so no two hosts' clocks are ever compared. `Ok(None)` if
/// the reply has no `localTime` (every MongoDB server sends it).
pub async fn server_now(
    db: &mongodb::Database,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, mongodb::error::Error> {
    let hello = db.run_command(bson::doc! { "hello": 1 }).await?;
    Ok(match hello.get("localTime") {
        Some(bson::Bson::DateTime(t)) => Some(t.to_chrono()),
        _ => None,
    })
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
