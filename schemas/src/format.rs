//! The key format of a pool: its alphabet and key lengths, validation of
//! both, and the bijection between a key and its index in the key space.
//!
//! A pool's keys have a length in `min..=max` (one length for most pools).
//! The key space is the concatenation of one *tier* per length, shortest
//! first: the keys of length `min` take indices `0..|A|^min`, those of
//! length `min + 1` the next `|A|^(min+1)`, and so on. Within a tier a key
//! of length `L` over an alphabet `A` is read as an `L`-digit number in base
//! `|A|`, most significant digit first: index 0 is `A…A` in the default
//! alphabet, and the tier's last index is `9…9`. The producer never stores
//! this order (it hands keys out through a keyed permutation of each tier's
//! indices); this module only gives every key a number and checks that a
//! string is a well-formed key.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The default alphabet: base62 in the original design's order `A–Z a–z 0–9`.
pub const BASE62: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Named alphabets for `kgs-producer init --alphabet-preset`: `(name,
/// alphabet, what it is for)`. Which to choose is in the README (*Keys*).
pub const ALPHABET_PRESETS: &[(&str, &str, &str)] = &[
    (
        "base62",
        BASE62,
        "A-Z a-z 0-9 (the default, the original design's order)",
    ),
    (
        "base58",
        "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz",
        "base62 without 0 O I l (Bitcoin's order), for keys people read",
    ),
    (
        "lower36",
        "abcdefghijklmnopqrstuvwxyz0123456789",
        "a-z 0-9, for case-insensitive URLs: unique under case folding",
    ),
    (
        "crockford32",
        "0123456789ABCDEFGHJKMNPQRSTVWXYZ",
        "Crockford's base32: 0-9 A-Z without I L O U",
    ),
    (
        "unambiguous",
        "abcdefghkmnpqrstuvwxyz23456789",
        "lowercase and digits without look-alikes (0 1 i j l o), for keys people type",
    ),
];

/// The alphabet of preset `name` (see [`ALPHABET_PRESETS`]).
pub fn alphabet_preset(name: &str) -> Option<&'static str> {
    ALPHABET_PRESETS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, a, _)| *a)
}

/// The longest key a pool may have. Twelve base62 characters would already
/// overflow 64 bits; the limit mostly bounds small alphabets.
pub const MAX_KEY_LENGTH: u8 = 12;

/// The largest key space: indices are stored as BSON int64 in MongoDB, so the
/// space must fit in a signed 64-bit integer (62^10 ≈ 8.4e17 does).
pub const MAX_SPACE: u64 = i64::MAX as u64;

/// Marks a byte that is not in the alphabet in [`KeyFormat`]'s lookup table.
const NOT_IN_ALPHABET: u8 = u8::MAX;

/// Why a key format or a key is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The alphabet has fewer than two characters.
    #[error("alphabet must have at least 2 characters, got {0}")]
    AlphabetTooSmall(usize),
    /// The alphabet contains a character that is not printable ASCII (`!`..=`~`).
    #[error("alphabet must be printable ASCII without spaces, found {0:?}")]
    AlphabetNotPrintable(char),
    /// The alphabet lists the same character twice.
    #[error("alphabet lists {0:?} twice")]
    AlphabetDuplicate(char),
    /// The key length is outside `1..=12`.
    #[error("key length must be between 1 and {MAX_KEY_LENGTH}, got {0}")]
    BadLength(u32),
    /// The longest length is below the shortest.
    #[error("the longest key length ({max}) is below the shortest ({min})")]
    LengthsReversed {
        /// The shortest length asked for.
        min: u32,
        /// The longest length asked for.
        max: u32,
    },
    /// The key space does not fit in a BSON int64.
    #[error("key space of {alphabet_len} characters up to length {length} does not fit in a signed 64-bit integer")]
    SpaceTooLarge {
        /// Number of characters in the alphabet.
        alphabet_len: usize,
        /// The longest key length.
        length: u8,
    },
    /// A key has the wrong length.
    #[error("key {key:?} has length {found}, expected {expected}")]
    WrongKeyLength {
        /// The offending key (truncated to 32 characters).
        key: String,
        /// Its length in bytes.
        found: usize,
        /// The pool's key length(s): `3`, or `3 to 7`.
        expected: String,
    },
    /// A key contains a character outside the alphabet.
    #[error("key {key:?} contains {found:?}, which is not in the pool's alphabet")]
    NotInAlphabet {
        /// The offending key (truncated to 32 characters).
        key: String,
        /// The first character not in the alphabet.
        found: char,
    },
    /// An index is outside the key space.
    #[error("index {index} is outside the key space of {space} keys")]
    IndexOutOfRange {
        /// The index asked for.
        index: u64,
        /// The size of the key space.
        space: u64,
    },
}

/// The keys of one length in a pool's key space: indices
/// `first..first + space`, in generation positions the same range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    /// The key length of the tier.
    pub length: u8,
    /// Index of the tier's first key (the sum of the shorter tiers' spaces).
    pub first: u64,
    /// Number of keys in the tier: `|alphabet|^length`.
    pub space: u64,
}

impl Tier {
    /// One past the tier's last index.
    pub fn end(&self) -> u64 {
        self.first + self.space
    }
}

/// The alphabet and key lengths of a pool's keys, validated.
///
/// Cheap to clone; holds a 256-entry reverse lookup table so that checking a
/// key costs one table load per character.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyFormat {
    alphabet: String,
    /// One per length, shortest first.
    tiers: Vec<Tier>,
    space: u64,
    digit_of: [u8; 256],
}

impl KeyFormat {
    /// Validates an alphabet (distinct printable ASCII characters, at least 2)
    /// and a length (1..=12, with a key space that fits in a BSON int64).
    pub fn new(alphabet: &str, length: u32) -> Result<Self, FormatError> {
        Self::with_lengths(alphabet, length, length)
    }

    /// A format whose keys have any length in `min..=max` (see the module
    /// documentation for the order of the tiers).
    pub fn with_lengths(alphabet: &str, min: u32, max: u32) -> Result<Self, FormatError> {
        if let Some(c) = alphabet.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(FormatError::AlphabetNotPrintable(c));
        }
        if alphabet.len() < 2 {
            return Err(FormatError::AlphabetTooSmall(alphabet.len()));
        }
        let mut digit_of = [NOT_IN_ALPHABET; 256];
        for (digit, byte) in alphabet.bytes().enumerate() {
            if digit_of[byte as usize] != NOT_IN_ALPHABET {
                return Err(FormatError::AlphabetDuplicate(byte as char));
            }
            // At most 94 printable ASCII characters, so the digit fits in u8.
            digit_of[byte as usize] = digit as u8;
        }
        let length = |l: u32| match u8::try_from(l) {
            Ok(l) if (1..=MAX_KEY_LENGTH).contains(&l) => Ok(l),
            _ => Err(FormatError::BadLength(l)),
        };
        let (min, max) = (length(min)?, length(max)?);
        if max < min {
            return Err(FormatError::LengthsReversed {
                min: min.into(),
                max: max.into(),
            });
        }
        let too_large = FormatError::SpaceTooLarge {
            alphabet_len: alphabet.len(),
            length: max,
        };
        let mut tiers = Vec::with_capacity(usize::from(max - min) + 1);
        let mut space = 0u64;
        for length in min..=max {
            let tier_space = (alphabet.len() as u64)
                .checked_pow(u32::from(length))
                .ok_or_else(|| too_large.clone())?;
            tiers.push(Tier {
                length,
                first: space,
                space: tier_space,
            });
            space = space
                .checked_add(tier_space)
                .filter(|s| *s <= MAX_SPACE)
                .ok_or_else(|| too_large.clone())?;
        }
        Ok(Self {
            alphabet: alphabet.to_owned(),
            tiers,
            space,
            digit_of,
        })
    }

    /// The default base62 alphabet with the given length.
    pub fn base62(length: u32) -> Result<Self, FormatError> {
        Self::new(BASE62, length)
    }

    /// The alphabet, in digit order.
    pub fn alphabet(&self) -> &str {
        &self.alphabet
    }

    /// The shortest key length.
    pub fn min_length(&self) -> u8 {
        self.tiers[0].length
    }

    /// The longest key length.
    pub fn max_length(&self) -> u8 {
        self.tiers[self.tiers.len() - 1].length
    }

    /// The tiers, one per length, shortest first.
    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    /// The tier holding index (or generation position) `index`; the last
    /// tier for an index past the space.
    pub fn tier_of(&self, index: u64) -> &Tier {
        self.tiers
            .iter()
            .find(|t| index < t.end())
            .unwrap_or(&self.tiers[self.tiers.len() - 1])
    }

    /// The number of distinct keys: the sum of `|alphabet|^length` over the
    /// lengths.
    pub fn space(&self) -> u64 {
        self.space
    }

    /// The key at `index` (`0..space`).
    pub fn key_at(&self, index: u64) -> Result<String, FormatError> {
        if index >= self.space {
            return Err(FormatError::IndexOutOfRange {
                index,
                space: self.space,
            });
        }
        let tier = self.tier_of(index);
        let base = self.alphabet.len() as u64;
        let alphabet = self.alphabet.as_bytes();
        let mut buf = vec![0u8; usize::from(tier.length)];
        let mut rest = index - tier.first;
        for slot in buf.iter_mut().rev() {
            *slot = alphabet[(rest % base) as usize];
            rest /= base;
        }
        // Every byte comes from the ASCII alphabet.
        Ok(String::from_utf8(buf).expect("alphabet is ASCII"))
    }

    /// The index of `key`, or why it is not a key of this format.
    pub fn index_of(&self, key: &str) -> Result<u64, FormatError> {
        self.check(key)?;
        let first = self
            .tiers
            .iter()
            .find(|t| usize::from(t.length) == key.len())
            .expect("check passed: the key's length has a tier")
            .first;
        let base = self.alphabet.len() as u64;
        Ok(first
            + key.bytes().fold(0u64, |acc, b| {
                acc * base + u64::from(self.digit_of[b as usize])
            }))
    }

    /// Checks that `key` has one of the pool's lengths and only alphabet
    /// characters.
    pub fn check(&self, key: &str) -> Result<(), FormatError> {
        let lengths = usize::from(self.min_length())..=usize::from(self.max_length());
        if !lengths.contains(&key.len()) {
            return Err(FormatError::WrongKeyLength {
                key: truncate(key),
                found: key.len(),
                expected: self.lengths(),
            });
        }
        match key
            .bytes()
            .position(|b| self.digit_of[b as usize] == NOT_IN_ALPHABET)
        {
            None => Ok(()),
            Some(pos) => Err(FormatError::NotInAlphabet {
                key: truncate(key),
                // `pos` may fall inside a multi-byte character: report that character.
                found: key[floor_char_boundary(key, pos)..]
                    .chars()
                    .next()
                    .unwrap_or('\u{fffd}'),
            }),
        }
    }

    /// The key lengths for people: `3`, or `3 to 7`.
    pub fn lengths(&self) -> String {
        match (self.min_length(), self.max_length()) {
            (min, max) if min == max => min.to_string(),
            (min, max) => format!("{min} to {max}"),
        }
    }
}

impl fmt::Debug for KeyFormat {
    // The lookup table is noise in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFormat")
            .field("alphabet", &self.alphabet)
            .field("lengths", &self.lengths())
            .field("space", &self.space)
            .finish()
    }
}

/// The serialized form of a [`KeyFormat`], as stored in the pool document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFormatSpec {
    /// The alphabet, in digit order.
    pub alphabet: String,
    /// The key length; the shortest one in a pool of several lengths.
    pub length: u32,
    /// The longest key length, in a pool of several lengths (`None`: every
    /// key has `length`). Left out of a pool of one length, so its document
    /// stays readable by versions before tiers; a version before them
    /// refuses a pool of several lengths rather than misread its keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<u32>,
}

impl KeyFormatSpec {
    /// The longest key length (`length` in a pool of one length).
    pub fn longest(&self) -> u32 {
        self.max_length.unwrap_or(self.length)
    }

    /// The key lengths for people: `3`, or `3 to 7`.
    pub fn lengths(&self) -> String {
        match self.max_length {
            Some(max) => format!("{} to {max}", self.length),
            None => self.length.to_string(),
        }
    }
}

impl TryFrom<&KeyFormatSpec> for KeyFormat {
    type Error = FormatError;

    fn try_from(spec: &KeyFormatSpec) -> Result<Self, FormatError> {
        KeyFormat::with_lengths(&spec.alphabet, spec.length, spec.longest())
    }
}

impl From<&KeyFormat> for KeyFormatSpec {
    fn from(format: &KeyFormat) -> Self {
        Self {
            alphabet: format.alphabet.clone(),
            length: u32::from(format.min_length()),
            max_length: (format.max_length() > format.min_length())
                .then(|| u32::from(format.max_length())),
        }
    }
}

/// Keys quoted in errors are cut to 32 bytes, so a hostile message cannot
/// blow up a log line.
fn truncate(key: &str) -> String {
    key[..floor_char_boundary(key, 32.min(key.len()))].to_owned()
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base62_spaces_of_the_original_design() {
        assert_eq!(KeyFormat::base62(1).unwrap().space(), 62);
        assert_eq!(KeyFormat::base62(2).unwrap().space(), 3_844);
        assert_eq!(KeyFormat::base62(3).unwrap().space(), 238_328);
        assert_eq!(
            KeyFormat::base62(10).unwrap().space(),
            839_299_365_868_340_224
        );
    }

    #[test]
    fn index_and_key_round_trip_over_a_whole_space() {
        let f = KeyFormat::base62(2).unwrap();
        let mut seen = std::collections::HashSet::new();
        for i in 0..f.space() {
            let k = f.key_at(i).unwrap();
            assert_eq!(f.index_of(&k).unwrap(), i);
            assert!(seen.insert(k));
        }
        assert_eq!(f.key_at(0).unwrap(), "AA");
        assert_eq!(f.key_at(f.space() - 1).unwrap(), "99");
    }

    #[test]
    fn rejects_bad_formats() {
        assert_eq!(
            KeyFormat::new("a", 3),
            Err(FormatError::AlphabetTooSmall(1))
        );
        assert_eq!(
            KeyFormat::new("ab c", 3),
            Err(FormatError::AlphabetNotPrintable(' '))
        );
        assert_eq!(
            KeyFormat::new("abé", 3),
            Err(FormatError::AlphabetNotPrintable('é'))
        );
        assert_eq!(
            KeyFormat::new("abca", 3),
            Err(FormatError::AlphabetDuplicate('a'))
        );
        assert_eq!(KeyFormat::base62(0), Err(FormatError::BadLength(0)));
        assert_eq!(KeyFormat::base62(13), Err(FormatError::BadLength(13)));
        assert!(matches!(
            KeyFormat::base62(11),
            Err(FormatError::SpaceTooLarge { .. })
        ));
        // 2^12 is small: a binary alphabet may use the full length.
        assert_eq!(KeyFormat::new("01", 12).unwrap().space(), 4096);
    }

    #[test]
    fn rejects_bad_keys() {
        let f = KeyFormat::base62(3).unwrap();
        assert!(f.check("aZ3").is_ok());
        assert!(matches!(
            f.check("aZ"),
            Err(FormatError::WrongKeyLength { found: 2, .. })
        ));
        assert!(matches!(
            f.check("a-3"),
            Err(FormatError::NotInAlphabet { found: '-', .. })
        ));
        assert!(matches!(
            f.check("aé"),
            Err(FormatError::NotInAlphabet { found: 'é', .. })
        ));
        assert!(matches!(
            f.key_at(238_328),
            Err(FormatError::IndexOutOfRange { .. })
        ));
    }

    #[test]
    fn spec_round_trip() {
        let f = KeyFormat::new("xyz", 4).unwrap();
        let spec = KeyFormatSpec::from(&f);
        assert_eq!(KeyFormat::try_from(&spec).unwrap(), f);
    }

    /// A pool of several lengths: one tier per length, shortest first,
    /// each a whole base-|A| space; every key has one index and back.
    #[test]
    fn tiers_concatenate_the_spaces_of_each_length() {
        let f = KeyFormat::with_lengths("ab", 1, 3).unwrap();
        assert_eq!(f.space(), 2 + 4 + 8);
        assert_eq!(
            f.tiers()
                .iter()
                .map(|t| (t.length, t.first, t.space))
                .collect::<Vec<_>>(),
            vec![(1, 0, 2), (2, 2, 4), (3, 6, 8)]
        );
        assert_eq!(f.key_at(0).unwrap(), "a");
        assert_eq!(f.key_at(1).unwrap(), "b");
        assert_eq!(f.key_at(2).unwrap(), "aa");
        assert_eq!(f.key_at(6).unwrap(), "aaa");
        assert_eq!(f.key_at(13).unwrap(), "bbb");
        assert_eq!(f.tier_of(5).length, 2);
        assert_eq!(f.tier_of(99).length, 3);
        let mut seen = std::collections::HashSet::new();
        for i in 0..f.space() {
            let k = f.key_at(i).unwrap();
            assert_eq!(f.index_of(&k).unwrap(), i);
            assert_eq!(usize::from(f.tier_of(i).length), k.len());
            assert!(seen.insert(k));
        }
        assert!(f.check("b").is_ok() && f.check("bab").is_ok());
        assert_eq!(
            f.check("abab").unwrap_err().to_string(),
            "key \"abab\" has length 4, expected 1 to 3"
        );
        assert_eq!(f.lengths(), "1 to 3");
        assert_eq!(KeyFormat::base62(3).unwrap().lengths(), "3");
    }

    #[test]
    fn rejects_bad_tiers() {
        assert_eq!(
            KeyFormat::with_lengths(BASE62, 4, 3),
            Err(FormatError::LengthsReversed { min: 4, max: 3 })
        );
        assert_eq!(
            KeyFormat::with_lengths(BASE62, 0, 3),
            Err(FormatError::BadLength(0))
        );
        // 62^10 fits, and so do the shorter tiers below it; 62^11 does not.
        assert!(KeyFormat::with_lengths(BASE62, 1, 10).is_ok());
        assert!(matches!(
            KeyFormat::with_lengths(BASE62, 3, 11),
            Err(FormatError::SpaceTooLarge { length: 11, .. })
        ));
    }

    /// A pool of one length stores no `max_length` (older versions read
    /// it); one of several stores it, and both read back as they were.
    #[test]
    fn tiered_spec_round_trip() {
        let one = KeyFormatSpec::from(&KeyFormat::base62(3).unwrap());
        assert_eq!(one.max_length, None);
        let tiered = KeyFormat::with_lengths(BASE62, 3, 5).unwrap();
        let spec = KeyFormatSpec::from(&tiered);
        assert_eq!((spec.length, spec.max_length), (3, Some(5)));
        assert_eq!(KeyFormat::try_from(&spec).unwrap(), tiered);
        let json = serde_json::to_value(&one).unwrap();
        assert!(json.get("max_length").is_none(), "{json}");
    }

    /// Every preset is a valid alphabet and keeps out what it promises to.
    #[test]
    fn alphabet_presets_keep_their_promises() {
        for (name, alphabet, _) in ALPHABET_PRESETS {
            KeyFormat::new(alphabet, 3).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(alphabet_preset(name), Some(*alphabet));
        }
        let lacks = |name: &str, chars: &str| {
            let a = alphabet_preset(name).unwrap();
            for c in chars.chars() {
                assert!(!a.contains(c), "{name} holds {c:?}");
            }
        };
        lacks("base58", "0OIl");
        lacks("crockford32", "ILOU");
        lacks("unambiguous", "01ijloIO");
        for name in ["lower36", "unambiguous"] {
            let a = alphabet_preset(name).unwrap();
            let folded: std::collections::HashSet<char> =
                a.chars().map(|c| c.to_ascii_lowercase()).collect();
            assert_eq!(
                folded.len(),
                a.len(),
                "{name} is not unique under case folding"
            );
        }
        assert_eq!(alphabet_preset("base62"), Some(BASE62));
        assert_eq!(alphabet_preset("base64"), None);
    }
}
