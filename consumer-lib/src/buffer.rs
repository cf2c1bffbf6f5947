//! The local key buffer: claimed batches stored as packed byte arrays and
//! handed out, lock-free, by any number of threads at once.
//!
//! # How it works
//! A pushed batch is one packed array per key length in it (`count × L`
//! bytes, `L` the key length: about `L` bytes per buffered key; a batch of
//! a pool of several lengths may hold two, where one length ends) cut into
//! a few *segments*, one per *lane*. A segment is a key range with an atomic cursor; taking a key
//! is one `fetch_add` on it. A lane is the segment being used
//! ([`ArcSwap`]) plus a lock-free queue of the next ones. Each thread has a
//! home lane (its thread number modulo the lane count) and only moves to
//! other lanes when its own is empty, so two request threads rarely touch
//! the same cursor. A thread keeps (thread-local) the segment it last took
//! from and goes back to the lanes only when that one is used up, so the
//! common call is a thread-local read plus one uncontended `fetch_add`.
//!
//! # Exact accounting
//! The cursor of a segment counts the keys taken from it: index `i` is
//! handed out iff the `fetch_add` that returned `i` saw `i < len`. At
//! shutdown [`KeyBuffer::close`] *swaps* every cursor to a huge value: the
//! value swapped out is exactly the number of keys handed out, and every
//! later `fetch_add` lands past the end. So the keys reported unhanded are
//! exactly those never returned by [`KeyBuffer::next_key`], with no window
//! where a key is both returned and handed out.
//!
//! The hot path takes no lock and does not allocate. The `Mutex` here guards
//! only the list of batches, touched by push, housekeeping and close.

use std::cell::RefCell;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use crossbeam_queue::SegQueue;
use crossbeam_utils::CachePadded;

use crate::key::{Key, MAX_KEY_LEN};

/// Cursor value after [`KeyBuffer::close`]: far past any segment's end, and
/// far enough from `usize::MAX` that `fetch_add`s from spinning callers can
/// never wrap around.
const CLOSED: usize = usize::MAX / 2;

/// Segments shorter than this are not split further across lanes: the
/// per-segment cost (an `ArcSwap` store, a queue push) should stay small
/// next to the keys it serves.
const MIN_SEGMENT_KEYS: usize = 64;

/// Most lanes a buffer uses; more would only add empty lanes to scan.
const MAX_LANES: usize = 64;

/// The keys of one length of a batch, packed, followed by [`MAX_KEY_LEN`]
/// zero bytes so that every key can be read as a fixed 12-byte chunk.
#[derive(Debug)]
struct PackedBatch {
    key_len: usize,
    /// `key_len << 32`, the length part of a key's high word.
    len_word: NonZeroU64,
    bytes: Box<[u8]>,
    /// Masks keeping the first `key_len` bytes of a chunk read as a little-endian
    /// `u64` (bytes 0..8) and `u32` (bytes 8..12).
    low_mask: u64,
    high_mask: u32,
}

impl PackedBatch {
    fn new(key_len: usize, mut bytes: Vec<u8>) -> Self {
        bytes.extend_from_slice(&[0; MAX_KEY_LEN]);
        let bits = |n: usize| if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        Self {
            key_len,
            len_word: NonZeroU64::new((key_len as u64) << 32).expect("key length checked by push"),
            bytes: bytes.into_boxed_slice(),
            low_mask: bits(8 * key_len.min(8)),
            high_mask: bits(8 * key_len.saturating_sub(8)) as u32,
        }
    }

    /// The key at `index`.
    #[inline]
    fn key(&self, index: usize) -> Key {
        let (low, high) = self.words(index);
        Key::from_words(low, high)
    }

    /// The key at `index` as two words (see [`Key::from_words`]): a
    /// fixed-size read plus two masks, no `memcpy` call. Two integers are
    /// returned in registers even where a call is not inlined (a 16-byte
    /// `Key` is returned through memory, and reading it back stalled on
    /// store-to-load forwarding).
    #[inline]
    fn words(&self, index: usize) -> (u64, NonZeroU64) {
        let start = index * self.key_len;
        let chunk: &[u8; MAX_KEY_LEN] = self.bytes[start..start + MAX_KEY_LEN]
            .try_into()
            .expect("chunk of 12 bytes");
        let (low, high) = chunk.split_at(8);
        let low = u64::from_le_bytes(low.try_into().expect("8 bytes")) & self.low_mask;
        let high = u32::from_le_bytes(high.try_into().expect("4 bytes")) & self.high_mask;
        (low, self.len_word | u64::from(high))
    }

    fn keys(&self, from: usize, to: usize) -> impl Iterator<Item = String> + '_ {
        (from..to).map(|i| self.key(i).as_str().to_owned())
    }
}

/// A range of one batch's keys with its own cursor.
#[derive(Debug)]
struct Segment {
    batch: Arc<PackedBatch>,
    /// First key index of the range in the batch.
    start: usize,
    /// Number of keys in the range.
    len: usize,
    /// Keys taken so far (may run past `len`: those takes found nothing).
    cursor: CachePadded<AtomicUsize>,
}

impl Segment {
    fn empty() -> Self {
        Self {
            batch: Arc::new(PackedBatch::new(1, Vec::new())),
            start: 0,
            len: 0,
            cursor: CachePadded::new(AtomicUsize::new(0)),
        }
    }

    #[inline]
    fn take(&self) -> Option<Key> {
        self.take_words()
            .map(|(low, high)| Key::from_words(low, high))
    }

    #[inline]
    fn take_words(&self) -> Option<(u64, NonZeroU64)> {
        // Relaxed is enough: the bytes are immutable and were published by
        // the ArcSwap store (release) that made this segment visible.
        let i = self.cursor.fetch_add(1, Ordering::Relaxed);
        (i < self.len).then(|| self.batch.words(self.start + i))
    }

    fn handed_out(&self) -> usize {
        self.cursor.load(Ordering::Relaxed).min(self.len)
    }

    /// Stops hand-out from this segment; returns how many keys were handed out.
    fn close(&self) -> usize {
        self.cursor.swap(CLOSED, Ordering::AcqRel).min(self.len)
    }
}

#[derive(Debug)]
struct Lane {
    current: ArcSwap<Segment>,
    next: SegQueue<Arc<Segment>>,
}

impl Lane {
    /// A key from the lane, with the segment it came from.
    fn take(&self) -> Option<(Key, Arc<Segment>)> {
        loop {
            let current = self.current.load_full();
            if let Some(key) = current.take() {
                return Some((key, current));
            }
            // The current segment is used up: move the lane to the next one.
            let next = self.next.pop()?;
            let previous = self.current.compare_and_swap(&current, Arc::clone(&next));
            if !Arc::ptr_eq(&previous, &current) {
                // Another thread advanced the lane first; keep ours for later
                // (order of hand-out does not matter, only that each key is
                // handed out once).
                self.next.push(next);
            }
        }
    }
}

/// A batch in the buffer, as the owner (the consume loop) sees it: its
/// segments, of one packed array per key length, in the batch's order.
#[derive(Debug)]
struct Tracked {
    id: String,
    segments: Vec<Arc<Segment>>,
}

impl Tracked {
    fn handed_out(&self) -> usize {
        self.segments.iter().map(|s| s.handed_out()).sum()
    }

    fn len(&self) -> usize {
        self.segments.iter().map(|s| s.len).sum()
    }
}

/// What a batch left behind when the buffer was closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// The batch id.
    pub batch_id: String,
    /// Number of keys the batch had.
    pub keys: usize,
    /// Its keys that were never handed out.
    pub unhanded: Vec<String>,
}

/// Where a key of a batch stands in the buffer ([`KeyBuffer::key_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// The batch is not in the buffer (not pushed yet, drained and retired,
    /// or closed), or the key is not one of its keys.
    Untracked,
    /// The key was handed out (its segment's cursor passed it); it can
    /// never be handed out again from this buffer.
    HandedOut,
    /// The key is still waiting in the buffer.
    Waiting,
}

/// Why a batch cannot be pushed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The buffer was closed.
    #[error("the key buffer is closed")]
    Closed,
    /// The batch has no keys.
    #[error("empty batch")]
    Empty,
    /// A key is empty, longer than 12 bytes, or not ASCII.
    #[error("key at position {0} is not ASCII of length 1 to 12")]
    BadKey(usize),
}

/// The lock-free buffer of claimed keys behind [`crate::KeyConsumer`].
///
/// Public so that it can be benchmarked and used on its own; a
/// [`crate::KeyConsumer`] pushes only batches it has claimed and committed.
#[derive(Debug)]
pub struct KeyBuffer {
    /// Tells this buffer's entry in a thread's [`LOCAL_SEGMENT`] from another's.
    id: usize,
    lanes: Box<[CachePadded<Lane>]>,
    /// `lanes.len() - 1`; the lane count is a power of two.
    mask: usize,
    closed: AtomicBool,
    batches: Mutex<Vec<Tracked>>,
    /// Lane where the next pushed batch starts, so small batches spread out.
    next_lane: AtomicUsize,
    /// Keys handed out by batches no longer tracked (drained).
    retired_handed_out: AtomicUsize,
}

impl KeyBuffer {
    /// A buffer with `lanes` lanes, rounded up to a power of two (at most 64).
    /// One lane per thread that calls [`KeyBuffer::next_key`] concurrently
    /// avoids contention; see [`default_lanes`].
    pub fn new(lanes: usize) -> Self {
        let lanes = lanes.clamp(1, MAX_LANES).next_power_of_two();
        static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            lanes: (0..lanes)
                .map(|_| {
                    CachePadded::new(Lane {
                        current: ArcSwap::from_pointee(Segment::empty()),
                        next: SegQueue::new(),
                    })
                })
                .collect(),
            mask: lanes - 1,
            closed: AtomicBool::new(false),
            batches: Mutex::new(Vec::new()),
            next_lane: AtomicUsize::new(0),
            retired_handed_out: AtomicUsize::new(0),
        }
    }

    /// Adds a batch of distinct keys of 1 to 12 ASCII bytes. Each run of
    /// keys of one length is packed on its own, so the batch may mix
    /// lengths; keys come out in the batch's order within a lane.
    pub fn push(&self, batch_id: &str, keys: &[String]) -> Result<(), PushError> {
        if keys.is_empty() {
            return Err(PushError::Empty);
        }
        if let Some(position) = keys
            .iter()
            .position(|k| !(1..=MAX_KEY_LEN).contains(&k.len()) || !k.is_ascii())
        {
            return Err(PushError::BadKey(position));
        }
        let mut segments: Vec<Arc<Segment>> = Vec::new();
        for run in keys.chunk_by(|a, b| a.len() == b.len()) {
            let key_len = run[0].len();
            let mut bytes = Vec::with_capacity(run.len() * key_len);
            for key in run {
                bytes.extend_from_slice(key.as_bytes());
            }
            let packed = Arc::new(PackedBatch::new(key_len, bytes));
            let count = run.len();
            let pieces = (count / MIN_SEGMENT_KEYS).clamp(1, self.lanes.len());
            segments.extend((0..pieces).map(|p| {
                let start = count * p / pieces;
                let end = count * (p + 1) / pieces;
                Arc::new(Segment {
                    batch: Arc::clone(&packed),
                    start,
                    len: end - start,
                    cursor: CachePadded::new(AtomicUsize::new(0)),
                })
            }));
        }
        // Track before publishing, under the lock `close` takes: a batch is
        // either closed by `close` or refused here, never published untracked.
        let mut batches = self.batches.lock().expect("buffer lock poisoned");
        if self.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        let first = self.next_lane.fetch_add(1, Ordering::Relaxed);
        for (i, segment) in segments.iter().enumerate() {
            self.lanes[(first + i) & self.mask]
                .next
                .push(Arc::clone(segment));
        }
        batches.push(Tracked {
            id: batch_id.to_owned(),
            segments,
        });
        Ok(())
    }

    /// Takes one key, or `None` if the buffer is empty (or closed). Never
    /// waits, never locks, never allocates.
    ///
    /// Each thread remembers the segment it took its last key from, so the
    /// usual call is one thread-local access and one uncontended
    /// `fetch_add`; the lanes are looked at only when that segment runs out.
    #[inline]
    pub fn next_key(&self) -> Option<Key> {
        // Fast path kept tiny so that it inlines into the caller.
        let words = LOCAL_SEGMENT.with_borrow(|local| match local {
            Some((owner, segment)) if *owner == self.id => segment.take_words(),
            _ => None,
        });
        match words {
            Some((low, high)) => Some(Key::from_words(low, high)),
            None => LOCAL_SEGMENT.with_borrow_mut(|local| self.next_key_from_lanes(local)),
        }
    }

    /// The slow path: finds a segment with keys left, starting at the
    /// thread's home lane, and makes it the thread's current one.
    #[cold]
    #[inline(never)]
    fn next_key_from_lanes(&self, local: &mut Option<(usize, Arc<Segment>)>) -> Option<Key> {
        let home = thread_number();
        for step in 0..self.lanes.len() {
            let lane = &self.lanes[(home + step) & self.mask];
            if let Some((key, segment)) = lane.take() {
                *local = Some((self.id, segment));
                return Some(key);
            }
        }
        // Release the used-up segment so its batch's memory can be freed.
        *local = None;
        None
    }

    /// Keys in the buffer not yet handed out.
    pub fn depth(&self) -> usize {
        let batches = self.batches.lock().expect("buffer lock poisoned");
        batches.iter().map(|b| b.len() - b.handed_out()).sum()
    }

    /// Keys handed out since the buffer was created.
    pub fn handed_out(&self) -> usize {
        let batches = self.batches.lock().expect("buffer lock poisoned");
        self.retired_handed_out.load(Ordering::Relaxed)
            + batches.iter().map(Tracked::handed_out).sum::<usize>()
    }

    /// Removes the batches whose keys have all been handed out and returns
    /// their ids.
    pub fn take_drained(&self) -> Vec<String> {
        let mut batches = self.batches.lock().expect("buffer lock poisoned");
        let mut drained = Vec::new();
        batches.retain(|b| {
            let len = b.len();
            if b.handed_out() < len {
                return true;
            }
            self.retired_handed_out.fetch_add(len, Ordering::Relaxed);
            drained.push(b.id.clone());
            false
        });
        drained
    }

    /// Whether batch `batch_id` is in the buffer: pushed, and not yet taken
    /// by [`KeyBuffer::take_drained`].
    pub fn holds(&self, batch_id: &str) -> bool {
        let batches = self.batches.lock().expect("buffer lock poisoned");
        batches.iter().any(|b| b.id == batch_id)
    }

    /// Whether `key` of batch `batch_id` was handed out from this buffer.
    /// Exact: a key is handed out iff its segment's cursor passed it, and a
    /// cursor only grows, so [`KeyState::HandedOut`] stays true. Scans the
    /// batch's keys under the batch-list lock (for rare calls such as
    /// recycling, not for the hot path).
    pub fn key_state(&self, batch_id: &str, key: &str) -> KeyState {
        let batches = self.batches.lock().expect("buffer lock poisoned");
        let Some(b) = batches.iter().find(|b| b.id == batch_id) else {
            return KeyState::Untracked;
        };
        let Some((segment, index)) = b
            .segments
            .iter()
            .flat_map(|s| (s.start..s.start + s.len).map(move |i| (s, i)))
            .find(|(s, i)| s.batch.key(*i).as_str() == key)
        else {
            return KeyState::Untracked;
        };
        if index - segment.start < segment.handed_out() {
            KeyState::HandedOut
        } else {
            KeyState::Waiting
        }
    }

    /// Whether [`KeyBuffer::close`] has been called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Stops hand-out for good and returns, per batch still tracked, exactly
    /// the keys that were never handed out. Later calls return nothing.
    pub fn close(&self) -> Vec<Leftover> {
        let mut batches = self.batches.lock().expect("buffer lock poisoned");
        self.closed.store(true, Ordering::Release);
        let leftovers = batches
            .drain(..)
            .map(|b| {
                let mut unhanded = Vec::new();
                let mut handed = 0;
                for s in &b.segments {
                    let taken = s.close();
                    handed += taken;
                    unhanded.extend(s.batch.keys(s.start + taken, s.start + s.len));
                }
                self.retired_handed_out.fetch_add(handed, Ordering::Relaxed);
                Leftover {
                    batch_id: b.id.clone(),
                    keys: b.len(),
                    unhanded,
                }
            })
            .collect();
        // Let the lanes release the closed segments' memory.
        for lane in self.lanes.iter() {
            while lane.next.pop().is_some() {}
            lane.current.store(Arc::new(Segment::empty()));
        }
        leftovers
    }
}

/// The default lane count: the number of CPUs (each thread calling
/// `next_key` at the same time then has a lane to itself).
pub fn default_lanes() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

thread_local! {
    /// The segment the thread last took a key from, and the id of its buffer.
    /// Taking from a segment outside any lane is fine: every take goes
    /// through the segment's cursor, which is what the accounting reads.
    static LOCAL_SEGMENT: RefCell<Option<(usize, Arc<Segment>)>> = const { RefCell::new(None) };
}

/// A small number unique to the calling thread, assigned on first use.
#[inline]
fn thread_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NUMBER.with(|n| *n)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn keys(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i:05}")).collect()
    }

    /// A key is `Waiting` until taken, then `HandedOut`; unknown batches and
    /// keys, and batches gone after close, are `Untracked`.
    #[test]
    fn key_state_follows_the_cursor() {
        let b = KeyBuffer::new(1);
        let ks = keys("k", 3);
        b.push("b1", &ks).unwrap();
        assert_eq!(b.key_state("b1", &ks[0]), KeyState::Waiting);
        assert_eq!(b.key_state("b2", &ks[0]), KeyState::Untracked);
        assert_eq!(b.key_state("b1", "zzz"), KeyState::Untracked);
        let first = b.next_key().unwrap().to_string();
        assert_eq!(b.key_state("b1", &first), KeyState::HandedOut);
        let waiting: Vec<_> = ks.iter().filter(|k| **k != first).collect();
        for k in &waiting {
            assert_eq!(b.key_state("b1", k), KeyState::Waiting);
        }
        b.close();
        assert_eq!(b.key_state("b1", &first), KeyState::Untracked);
    }

    /// Every pushed key comes out exactly once, then the buffer reports empty.
    #[test]
    fn hands_out_each_key_once() {
        let b = KeyBuffer::new(4);
        b.push("b1", &keys("a", 1000)).unwrap();
        b.push("b2", &keys("b", 7)).unwrap();
        assert_eq!(b.depth(), 1007);
        let mut seen = HashSet::new();
        while let Some(k) = b.next_key() {
            assert!(seen.insert(k.to_string()), "{k} twice");
        }
        assert_eq!(seen.len(), 1007);
        assert_eq!(b.depth(), 0);
        assert_eq!(b.handed_out(), 1007);
        let mut drained = b.take_drained();
        drained.sort();
        assert_eq!(drained, ["b1", "b2"]);
        assert_eq!(b.handed_out(), 1007);
    }

    /// Threads racing for keys get disjoint sets whose union is the input.
    #[test]
    fn concurrent_takers_get_disjoint_keys() {
        let b = Arc::new(KeyBuffer::new(2));
        for i in 0..20 {
            b.push(&format!("b{i}"), &keys(&format!("{i:02}"), 500))
                .unwrap();
        }
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    while let Some(k) = b.next_key() {
                        got.push(k.to_string());
                    }
                    got
                })
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            for k in h.join().unwrap() {
                assert!(all.insert(k), "duplicate");
            }
        }
        assert_eq!(all.len(), 10_000);
    }

    /// `close` returns exactly the keys not handed out, even while other
    /// threads are taking keys, and nothing is handed out afterwards.
    #[test]
    fn close_returns_exactly_the_unhanded_keys() {
        let b = Arc::new(KeyBuffer::new(2));
        let input: Vec<String> = keys("k", 200_000);
        for (i, chunk) in input.chunks(10_000).enumerate() {
            b.push(&format!("b{i}"), chunk).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let takers: Vec<_> = (0..3)
            .map(|_| {
                let b = Arc::clone(&b);
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(k) = b.next_key() {
                            got.push(k.to_string());
                        }
                    }
                    got
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let leftovers = b.close();
        stop.store(true, Ordering::Relaxed);
        let handed: Vec<String> = takers.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let returned: Vec<String> = leftovers.into_iter().flat_map(|l| l.unhanded).collect();
        let handed_set: HashSet<&String> = handed.iter().collect();
        let returned_set: HashSet<&String> = returned.iter().collect();
        assert_eq!(handed_set.len(), handed.len(), "a key was handed out twice");
        assert!(handed_set.is_disjoint(&returned_set));
        assert_eq!(handed.len() + returned.len(), input.len());
        assert!(b.next_key().is_none());
        assert_eq!(b.push("late", &keys("z", 3)), Err(PushError::Closed));
    }

    /// Keys of every length 1..=12 come out byte for byte as pushed.
    #[test]
    fn keys_of_every_length_round_trip() {
        for len in 1..=MAX_KEY_LEN {
            let b = KeyBuffer::new(1);
            let input: Vec<String> = (0..100)
                .map(|i| {
                    format!("{:0>len$}", i.to_string(), len = len)
                        .chars()
                        .rev()
                        .take(len)
                        .collect()
                })
                .collect::<HashSet<String>>()
                .into_iter()
                .collect();
            b.push("b", &input).unwrap();
            let mut out: Vec<String> = std::iter::from_fn(|| b.next_key())
                .map(String::from)
                .collect();
            let mut expected = input.clone();
            out.sort();
            expected.sort();
            assert_eq!(out, expected, "length {len}");
            assert!(out
                .iter()
                .all(|k| Key::new(k).unwrap() == Key::new(k).unwrap()));
        }
    }

    /// Empty batches, empty, long and non-ASCII keys are refused.
    #[test]
    fn push_checks_the_keys() {
        let b = KeyBuffer::new(1);
        assert_eq!(b.push("e", &[]), Err(PushError::Empty));
        assert_eq!(
            b.push("m", &["abc".into(), "".into()]),
            Err(PushError::BadKey(1))
        );
        assert_eq!(
            b.push("l", &["abcdefghijklm".into()]),
            Err(PushError::BadKey(0))
        );
        assert_eq!(
            b.push("u", &["ab".into(), "é".into()]),
            Err(PushError::BadKey(1))
        );
        assert_eq!(b.depth(), 0);
    }

    /// A batch where one key length ends and the next begins (a pool of
    /// several lengths): every key once, in the batch's order in one lane,
    /// with exact state and leftovers across both lengths.
    #[test]
    fn a_batch_may_mix_key_lengths() {
        let b = KeyBuffer::new(1);
        let mut ks: Vec<String> = (0..100).map(|i| format!("{i:03}")).collect();
        ks.extend((0..150).map(|i| format!("{i:04}")));
        ks.push("x".into());
        b.push("mixed", &ks).unwrap();
        assert_eq!(b.depth(), 251);
        let first: Vec<String> = (0..120)
            .map(|_| b.next_key().unwrap().to_string())
            .collect();
        assert_eq!(first, ks[..120]);
        assert_eq!(b.key_state("mixed", "0019"), KeyState::HandedOut);
        assert_eq!(b.key_state("mixed", "0020"), KeyState::Waiting);
        assert_eq!(b.key_state("mixed", "x"), KeyState::Waiting);
        assert!(b.take_drained().is_empty());
        let left = b.close();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].keys, 251);
        assert_eq!(left[0].unhanded, ks[120..]);
        assert_eq!(b.handed_out(), 120);
    }
}
