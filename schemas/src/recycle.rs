//! The rules of recycling a key (putting a handed-out key back into its
//! pool), shared by every place that accepts a request: the consumer
//! library and `kgs-producer recycle`. Only the checks live here; reading
//! the documents and recording the [`crate::docs::RecycleDoc`] is the
//! caller's, and performing it is the producer leader's.
//!
//! A key may be recycled only if it was certainly handed out and can never
//! be handed out again from where it is: its `used_keys` document names a
//! batch (not a reservation), and that batch's claim says its keys left the
//! buffer that held them (`drained`), or went back without this key
//! (`returning`/`returned` with the key not in `return_keys`), or the claim
//! is the asking instance's own `open` one and its buffer shows the key
//! handed out. Everything else is refused, changing nothing.

use std::fmt;

use crate::docs::{ClaimDoc, ClaimState, UsedKeyDoc, UsedReason};

/// Why a key cannot be recycled. [`Refusal::kind`] is a short fixed label
/// (metrics, CLI output); `Display` is a one-line reason for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not in `used_keys`: never handed out, or already recycled.
    NotUsed,
    /// Reserved with `kgs-producer reserve`: never handed out.
    Reserved,
    /// Its batch has no claim: still in the topic, its keys not handed out.
    Unclaimed {
        /// The batch.
        batch: String,
    },
    /// Its batch is this instance's and the key is still in the buffer.
    InBuffer {
        /// The batch.
        batch: String,
    },
    /// Its batch is still open in an instance's buffer (another instance,
    /// or, for the command line, any instance): the key may not be handed
    /// out yet.
    OpenElsewhere {
        /// The batch.
        batch: String,
        /// The instance holding the claim.
        instance: String,
    },
    /// The key went back to the pool unused when its batch was returned.
    Returned {
        /// The batch.
        batch: String,
    },
    /// The producer set the batch's claim aside (no matching batch record):
    /// whether the key was handed out is not known.
    Rejected {
        /// The batch.
        batch: String,
    },
    /// A recycling of this key from this batch was already requested.
    AlreadyRecycled,
    /// The leader found `used_keys` changed since the request (not this
    /// batch's any more): nothing was done.
    Changed,
}

impl Refusal {
    /// Every value of [`Refusal::kind`], to pre-create labelled metrics.
    pub const KINDS: [&'static str; 9] = [
        "not_used",
        "reserved",
        "unclaimed",
        "in_buffer",
        "open_elsewhere",
        "returned",
        "rejected",
        "already_recycled",
        "changed",
    ];

    /// A short fixed label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotUsed => "not_used",
            Self::Reserved => "reserved",
            Self::Unclaimed { .. } => "unclaimed",
            Self::InBuffer { .. } => "in_buffer",
            Self::OpenElsewhere { .. } => "open_elsewhere",
            Self::Returned { .. } => "returned",
            Self::Rejected { .. } => "rejected",
            Self::AlreadyRecycled => "already_recycled",
            Self::Changed => "changed",
        }
    }

    /// True when the key is unknown as a handed-out key (HTTP 404); every
    /// other refusal is a conflict with the key's state (HTTP 409).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotUsed)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotUsed => f.write_str("not in used_keys: never handed out, or already recycled"),
            Self::Reserved => f.write_str("reserved key: never handed out"),
            Self::Unclaimed { batch } => write!(
                f,
                "batch {batch} is not claimed yet: its keys are not handed out"
            ),
            Self::InBuffer { batch } => write!(
                f,
                "still in this instance's buffer (batch {batch}): not handed out yet"
            ),
            Self::OpenElsewhere { batch, instance } => {
                write!(f, "batch {batch} still open in instance {instance}")
            }
            Self::Returned { batch } => write!(
                f,
                "went back to the pool unused when batch {batch} was returned"
            ),
            Self::Rejected { batch } => write!(
                f,
                "the claim of batch {batch} was set aside by the producer (no matching batch record)"
            ),
            Self::AlreadyRecycled => f.write_str("already recycled"),
            Self::Changed => f.write_str("used_keys changed since the request"),
        }
    }
}

impl std::error::Error for Refusal {}

/// What the claim check leaves to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimVerdict {
    /// The key was handed out: it may be recycled.
    HandedOut,
    /// The batch is open in the asking instance: its buffer must say whether
    /// this key was handed out (else [`Refusal::InBuffer`]).
    AskBuffer,
}

/// The batch of a key that may be recycled, from its `used_keys` document
/// (`None` if it has none).
pub fn check_used(used: Option<&UsedKeyDoc>) -> Result<(&str, u64), Refusal> {
    let used = used.ok_or(Refusal::NotUsed)?;
    match (&used.reason, &used.batch) {
        (UsedReason::Batch, Some(batch)) => Ok((batch, used.n)),
        // A batch-moved key always names its batch; anything else is not
        // known to be handed out.
        _ => Err(Refusal::Reserved),
    }
}

/// Checks the claim of the key's `batch` (`None` if it has none).
/// `asking_token` is the [`ClaimDoc::token`] of the consumer process asking,
/// if any: only its own open claim can be looked up in its buffer (an
/// instance id may be shared by two processes; the token is not).
pub fn check_claim(
    claim: Option<&ClaimDoc>,
    key: &str,
    batch: &str,
    asking_token: Option<&str>,
) -> Result<ClaimVerdict, Refusal> {
    let Some(claim) = claim else {
        return Err(Refusal::Unclaimed {
            batch: batch.to_owned(),
        });
    };
    match claim.state {
        ClaimState::Open if asking_token == Some(claim.token.as_str()) => {
            Ok(ClaimVerdict::AskBuffer)
        }
        ClaimState::Open => Err(Refusal::OpenElsewhere {
            batch: batch.to_owned(),
            instance: claim.instance.clone(),
        }),
        ClaimState::Drained => Ok(ClaimVerdict::HandedOut),
        ClaimState::Rejected => Err(Refusal::Rejected {
            batch: batch.to_owned(),
        }),
        ClaimState::Returning | ClaimState::Returned => {
            if claim.return_keys.iter().any(|k| k == key) {
                Err(Refusal::Returned {
                    batch: batch.to_owned(),
                })
            } else {
                Ok(ClaimVerdict::HandedOut)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    fn used(reason: UsedReason, batch: Option<&str>) -> UsedKeyDoc {
        UsedKeyDoc {
            key: "k".into(),
            n: 4,
            reason,
            batch: batch.map(str::to_owned),
            at: Utc::now(),
        }
    }

    fn claim(state: ClaimState, return_keys: &[&str]) -> ClaimDoc {
        ClaimDoc {
            batch_id: "b".into(),
            pool: "p".into(),
            group: "g".into(),
            instance: "app-1".into(),
            token: "token-1".into(),
            partition: 0,
            offset: 0,
            keys: 2,
            state,
            return_keys: return_keys.iter().map(|k| (*k).to_owned()).collect(),
            reason: None,
            claimed_at: Utc::now(),
        }
    }

    #[test]
    fn used_document_decides_the_batch() {
        assert_eq!(check_used(None), Err(Refusal::NotUsed));
        let r = used(UsedReason::Reserved, None);
        assert_eq!(check_used(Some(&r)), Err(Refusal::Reserved));
        let b = used(UsedReason::Batch, Some("b"));
        assert_eq!(check_used(Some(&b)), Ok(("b", 4)));
    }

    #[test]
    fn claim_states() {
        use ClaimVerdict::*;
        let check = |c: Option<&ClaimDoc>, me| check_claim(c, "k", "b", me);
        assert_eq!(check(None, None).unwrap_err().kind(), "unclaimed");
        let open = claim(ClaimState::Open, &[]);
        assert_eq!(check(Some(&open), Some("token-1")), Ok(AskBuffer));
        assert_eq!(
            check(Some(&open), Some("token-2")).unwrap_err().kind(),
            "open_elsewhere"
        );
        // The instance id is a label: sharing it does not make a claim ours.
        assert_eq!(
            check(Some(&open), Some("app-1")).unwrap_err().kind(),
            "open_elsewhere"
        );
        let rejected = claim(ClaimState::Rejected, &[]);
        assert_eq!(
            check(Some(&rejected), Some("token-1")).unwrap_err().kind(),
            "rejected"
        );
        assert_eq!(
            check(Some(&open), None).unwrap_err().kind(),
            "open_elsewhere"
        );
        let drained = claim(ClaimState::Drained, &[]);
        assert_eq!(check(Some(&drained), None), Ok(HandedOut));
        for state in [ClaimState::Returning, ClaimState::Returned] {
            let without = claim(state, &["other"]);
            assert_eq!(check(Some(&without), None), Ok(HandedOut));
            let with = claim(state, &["k"]);
            assert_eq!(check(Some(&with), None).unwrap_err().kind(), "returned");
        }
    }

    #[test]
    fn kinds_are_listed() {
        let all = [
            Refusal::NotUsed,
            Refusal::Reserved,
            Refusal::Unclaimed { batch: "b".into() },
            Refusal::InBuffer { batch: "b".into() },
            Refusal::OpenElsewhere {
                batch: "b".into(),
                instance: "i".into(),
            },
            Refusal::Returned { batch: "b".into() },
            Refusal::Rejected { batch: "b".into() },
            Refusal::AlreadyRecycled,
            Refusal::Changed,
        ];
        for r in &all {
            assert!(Refusal::KINDS.contains(&r.kind()));
            assert!(!r.to_string().contains('\n'));
        }
        assert_eq!(all.len(), Refusal::KINDS.len());
    }
}
