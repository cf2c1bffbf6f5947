//! Test-only fault injection: `KGS_FAILPOINT=<name>` aborts the process at the
//! named step boundary, so the integration tests can prove that every crash
//! window of generation and of the move/publish protocol is recoverable.
//!
//! **Never set `KGS_FAILPOINT` in production**: the process dies on purpose.
//! The names are listed in [`ALL`]; an unknown name simply never fires.

use std::sync::OnceLock;

/// Every failpoint, in protocol order.
pub const ALL: &[&str] = &[
    // Generation (`init` and the top-up of `run`).
    "gen_after_mark",
    "gen_after_insert",
    "gen_after_cursor",
    // Move of a batch from `keys` to `used_keys`.
    "move_after_record",
    "move_after_used",
    "move_after_delete",
    "move_after_moved",
    // Publish of a moved batch.
    "publish_after_offset",
    "publish_after_send",
    "publish_after_commit",
    "publish_after_record",
    // Return of a consumer's unused keys.
    "return_after_delete",
    "return_after_insert",
    // Recycling of a handed-out key.
    "recycle_after_delete",
    "recycle_after_insert",
    "recycle_after_done",
];

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            std::env::var("KGS_FAILPOINT")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .as_deref()
}

/// Aborts the process if `KGS_FAILPOINT` names this point.
pub fn hit(name: &'static str) {
    debug_assert!(ALL.contains(&name), "unlisted failpoint {name}");
    if armed() == Some(name) {
        eprintln!("kgs-producer: KGS_FAILPOINT={name} reached, aborting (test fault injection)");
        std::process::abort();
    }
}
