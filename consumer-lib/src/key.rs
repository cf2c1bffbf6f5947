//! [`Key`]: one handed-out key, stored inline so that handing it out
//! allocates nothing.

use std::fmt;
use std::num::{NonZeroU64, NonZeroU8};

/// The longest key kgs generates ([`kgs_schemas::format::MAX_KEY_LENGTH`]).
pub const MAX_KEY_LEN: usize = kgs_schemas::format::MAX_KEY_LENGTH as usize;

/// One key of a pool: up to [`MAX_KEY_LEN`] ASCII characters, stored inline.
///
/// `Key` is `Copy` and 13 bytes large; [`crate::KeyConsumer::next_key`]
/// returns it by value without touching the heap. Use [`Key::as_str`] or
/// `Display` to get the text.
// Aligned to 8 and 16 bytes large, with a niche in `len`: `Option<Key>` is
// 16 bytes, returned in two registers and written with aligned stores (an
// odd layout made the hot path stall on store-to-load forwarding).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C, align(8))]
pub struct Key {
    // Bytes past `len` are always zero, so the derived Eq/Hash are correct.
    bytes: [u8; MAX_KEY_LEN],
    len: NonZeroU8,
}

impl Key {
    /// A key from its text, or `None` if it is empty, longer than
    /// [`MAX_KEY_LEN`] or not ASCII.
    pub fn new(text: &str) -> Option<Self> {
        if text.is_empty() || text.len() > MAX_KEY_LEN || !text.is_ascii() {
            return None;
        }
        Some(Self::from_ascii(text.as_bytes()))
    }

    /// Copies `bytes`, which the caller has checked to be 1..=12 ASCII bytes
    /// (the buffer checks every batch once, when it is pushed).
    #[inline]
    pub(crate) fn from_ascii(bytes: &[u8]) -> Self {
        let mut key = Self {
            bytes: [0; MAX_KEY_LEN],
            len: NonZeroU8::new(bytes.len() as u8).expect("keys are not empty"),
        };
        key.bytes[..bytes.len()].copy_from_slice(bytes);
        key
    }

    /// A key from two little-endian words: bytes 0..8 in `low`, bytes 8..12
    /// in the low half of `high` and the length in bits 32..40 of `high`;
    /// bytes past the length already zero (see `PackedBatch::words`).
    #[inline]
    pub(crate) fn from_words(low: u64, high: NonZeroU64) -> Self {
        let high = high.get();
        let mut bytes = [0; MAX_KEY_LEN];
        bytes[..8].copy_from_slice(&low.to_le_bytes());
        bytes[8..].copy_from_slice(&(high as u32).to_le_bytes());
        let len = NonZeroU8::new((high >> 32) as u8).expect("keys are not empty");
        Self { bytes, len }
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored (see `new` and `KeyBuffer::push`).
        std::str::from_utf8(self.as_bytes()).expect("keys are ASCII")
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len.get())]
    }

    /// The key's length in characters.
    #[allow(clippy::len_without_is_empty)] // a key is never empty
    pub fn len(&self) -> usize {
        usize::from(self.len.get())
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.as_str())
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<Key> for String {
    fn from(key: Key) -> Self {
        key.as_str().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key round-trips through its text, and equality ignores the padding.
    #[test]
    fn round_trip() {
        let k = Key::new("aZ3x").unwrap();
        assert_eq!(k.as_str(), "aZ3x");
        assert_eq!(k.to_string(), "aZ3x");
        assert_eq!(k.len(), 4);
        assert_eq!(k, Key::from_ascii(b"aZ3x"));
        assert_ne!(k, Key::new("aZ3").unwrap());
    }

    /// Empty, too long and non-ASCII texts are not keys.
    #[test]
    fn rejects_non_keys() {
        assert!(Key::new("").is_none());
        assert!(Key::new("abcdefghijklm").is_none());
        assert!(Key::new("abcdefghijkl").is_some());
        assert!(Key::new("é").is_none());
        assert_eq!(std::mem::size_of::<Option<Key>>(), 16);
    }
}
