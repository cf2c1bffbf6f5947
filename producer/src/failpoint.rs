//! Test-only fault injection: `KGS_FAILPOINT=<name>` aborts the process at the
//! named step boundary, so the integration tests can prove that every crash
//! window of generation and of the move/publish protocol is recoverable.
//! `KGS_FAILPOINT=stop:<name>` instead stops the process there (SIGSTOP, the
//! first time only), as a long GC pause or a stalled host would: the tests
//! let another producer take over, then resume it with SIGCONT, so every
//! write it had been about to make arrives late, from a stale leader.
//!
//! Compiled in only with the cargo feature `failpoints` (the integration
//! tests' build enables it, as TiKV's fail-rs advises); without it [`hit`]
//! is empty and `KGS_FAILPOINT` means nothing, so a release binary cannot be
//! made to die by its environment. The names are listed in [`ALL`]; an
//! unknown name simply never fires.

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
    // Re-batch of handed-out keys (returned or recycled): record, then each
    // key's used_keys document moved to it (then `move_after_moved` and the
    // publish points as above).
    "rebatch_after_record",
    "rebatch_after_used",
    // Return of a consumer's unused keys: re-batched, claim not yet marked.
    "return_after_rebatch",
    // Recycling of a handed-out key: re-batched, request not yet marked,
    // then marked.
    "recycle_after_rebatch",
    "recycle_after_done",
    // Sweep of words added to the blocklist: a chunk of keys in used_keys
    // (reason blocked) not yet deleted from keys; every chunk done, the
    // sweep not yet recorded.
    "blocklist_after_used",
    "blocklist_before_swept",
    // Right after a lease check, right before the write it guards: with
    // `stop:` these hold a leader between its check and its write, so the
    // write arrives after a takeover (a check in the process never fences
    // the write itself; the protocol must make it harmless).
    "checked_insert_generated",
    "checked_insert_used",
    "checked_delete_keys",
    "checked_rebatch_used",
    "checked_mark_moved",
    "checked_claim_returned",
    "checked_recycle_done",
];

#[cfg(feature = "failpoints")]
fn armed() -> Option<&'static str> {
    use std::sync::OnceLock;

    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            std::env::var("KGS_FAILPOINT")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .as_deref()
}

/// Without the `failpoints` feature: nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(name: &'static str) {
    debug_assert!(ALL.contains(&name), "unlisted failpoint {name}");
}

/// Aborts (or stops) the process if `KGS_FAILPOINT` names this point.
#[cfg(feature = "failpoints")]
pub fn hit(name: &'static str) {
    debug_assert!(ALL.contains(&name), "unlisted failpoint {name}");
    match armed() {
        Some(armed) if armed == name => {
            eprintln!(
                "kgs-producer: KGS_FAILPOINT={name} reached, aborting (test fault injection)"
            );
            std::process::abort();
        }
        Some(armed) if armed.strip_prefix("stop:") == Some(name) => stop_once(name),
        _ => {}
    }
}

/// Sends SIGSTOP to this process, once: it continues where it stopped when
/// the test sends SIGCONT. (`kill` rather than a libc call: the crate
/// forbids unsafe code.)
#[cfg(feature = "failpoints")]
fn stop_once(name: &'static str) {
    static STOPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if STOPPED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    eprintln!("kgs-producer: KGS_FAILPOINT=stop:{name} reached, stopping (test fault injection)");
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &std::process::id().to_string()])
        .status();
    eprintln!("kgs-producer: resumed after stop:{name}");
}
