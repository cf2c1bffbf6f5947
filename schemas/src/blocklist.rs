//! A pool's blocklist: words no generated key may contain.
//!
//! Matching folds case and the substitutions people use to slip a word past
//! a filter (`0→o`, `1→i` or `l`, `3→e`, `4→a`, `5→s`, `7→t`, `8→b`, `9→g`,
//! `@→a`, `$→s`, `!→i`, `|→l`, `+→t`), and a word matches anywhere inside a
//! key, however short the word: `Sh1T`, `xxA55x` and `f0o` (for `foo`) are
//! all caught. Characters that fold to no letter (other digits, punctuation)
//! break a match.
//!
//! The producer applies it at generation: a position whose key is blocked is
//! skipped and counted (`pools.blocked`), so a blocked key never enters
//! `keys.<pool>`. The words are stored folded in the pool document, so the
//! pool keeps its own copy whatever happens to the lists later.

use std::collections::HashSet;

/// The project's default English list (`schemas/blocklist/en.txt`), named
/// `default` where a blocklist source is expected.
pub const DEFAULT_ENGLISH: &str = include_str!("../blocklist/en.txt");

/// The shortest word a blocklist accepts: a one-letter word would block
/// nearly every key.
pub const MIN_WORD: usize = 2;

/// The longest word (no key is longer than 12 characters).
pub const MAX_WORD: usize = 12;

/// What a character of a key can stand for, lowercase.
fn fold(c: u8) -> &'static [u8] {
    const LETTERS: &[u8; 26] = b"abcdefghijklmnopqrstuvwxyz";
    match c {
        b'a'..=b'z' => {
            let i = usize::from(c - b'a');
            &LETTERS[i..=i]
        }
        b'A'..=b'Z' => {
            let i = usize::from(c - b'A');
            &LETTERS[i..=i]
        }
        b'0' => b"o",
        b'1' => b"il",
        b'3' => b"e",
        b'4' | b'@' => b"a",
        b'5' | b'$' => b"s",
        b'7' | b'+' => b"t",
        b'8' => b"b",
        b'9' => b"g",
        b'!' => b"i",
        b'|' => b"l",
        _ => b"",
    }
}

/// A set of blocked words, ready to match keys.
#[derive(Debug, Clone, Default)]
pub struct Blocklist {
    words: HashSet<Vec<u8>>,
    /// Every prefix of every word (the words included): a match is extended
    /// only while it is still the start of some word.
    prefixes: HashSet<Vec<u8>>,
}

impl Blocklist {
    /// A blocklist of `words` (folded as keys are). A word must be
    /// [`MIN_WORD`]..=[`MAX_WORD`] characters that each fold to a letter.
    pub fn new<I, S>(words: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = Self::default();
        for word in words {
            let word = word.as_ref();
            let folded = fold_word(word)?;
            for end in 1..=folded.len() {
                list.prefixes.insert(folded[..end].to_vec());
            }
            list.words.insert(folded);
        }
        Ok(list)
    }

    /// The words of a list file: one per line, `#` starts a comment, blank
    /// lines skipped.
    pub fn parse_list(text: &str) -> Vec<&str> {
        text.lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The words, folded, sorted (what a pool document stores).
    pub fn words(&self) -> Vec<String> {
        let mut w: Vec<String> = self
            .words
            .iter()
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        w.sort();
        w
    }

    /// Whether no word is listed.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Whether `key` contains a listed word anywhere, after folding.
    pub fn blocks(&self, key: &str) -> bool {
        if self.words.is_empty() {
            return false;
        }
        let key = key.as_bytes();
        let mut path = Vec::with_capacity(MAX_WORD);
        (0..key.len()).any(|start| self.matches_from(&key[start..], &mut path))
    }

    /// Whether some folding of a prefix of `rest`, appended to `path`, is a
    /// word (depth-first over the characters that fold two ways).
    fn matches_from(&self, rest: &[u8], path: &mut Vec<u8>) -> bool {
        let Some((&c, rest)) = rest.split_first() else {
            return false;
        };
        for &letter in fold(c) {
            path.push(letter);
            let found = self.prefixes.contains(path.as_slice())
                && (self.words.contains(path.as_slice()) || self.matches_from(rest, path));
            path.pop();
            if found {
                return true;
            }
        }
        false
    }
}

/// `word` folded to lowercase letters, or why it cannot be a blocked word.
fn fold_word(word: &str) -> Result<Vec<u8>, String> {
    let n = word.chars().count();
    if !(MIN_WORD..=MAX_WORD).contains(&n) {
        return Err(format!(
            "blocked word {word:?} must have {MIN_WORD} to {MAX_WORD} characters"
        ));
    }
    word.bytes()
        .map(|c| match fold(c) {
            // Ambiguous in a word (`1`: i or l?): spell the word with letters.
            [one] => Ok(*one),
            _ => Err(format!(
                "blocked word {word:?}: write it in letters only ({:?} is not one)",
                char::from(c)
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_case_and_substitutions_anywhere_in_a_key() {
        let list = Blocklist::new(["ass", "shit", "go"]).unwrap();
        for key in [
            "ass", "xAsSy", "a55", "4$5", "Sh1T", "sh!t", "xxg0", "G0", "9o", "zGOz",
        ] {
            assert!(list.blocks(key), "{key} not blocked");
        }
        for key in ["as", "a5x5", "shjt", "g_o", "g2o", "oG", "", "XYZ"] {
            assert!(!list.blocks(key), "{key} blocked");
        }
    }

    #[test]
    fn one_folds_to_i_and_to_l() {
        let list = Blocklist::new(["lit", "kill"]).unwrap();
        assert!(list.blocks("1it"));
        assert!(list.blocks("ki11"));
        assert!(list.blocks("k1l1"));
        assert!(!list.blocks("kil"));
    }

    #[test]
    fn refuses_words_it_cannot_match() {
        assert!(Blocklist::new(["a"]).is_err());
        assert!(Blocklist::new(["abcdefghijklm"]).is_err());
        assert!(Blocklist::new(["a1"]).unwrap_err().contains("letters only"));
        assert!(Blocklist::new(["a-b"]).is_err());
        // Substitutes spelled out are folded like keys.
        assert!(Blocklist::new(["5H17"]).is_err());
        assert_eq!(Blocklist::new(["Sh3t"]).unwrap().words(), vec!["shet"]);
    }

    #[test]
    fn the_default_list_parses() {
        let words = Blocklist::parse_list(DEFAULT_ENGLISH);
        assert!(words.len() > 50, "{} words", words.len());
        let list = Blocklist::new(&words).unwrap();
        assert_eq!(list.words().len(), words.len(), "a word listed twice");
        assert!(list.blocks("xFuCkx"));
        assert!(!list.blocks("aZ3"));
    }

    #[test]
    fn an_empty_list_blocks_nothing() {
        assert!(!Blocklist::default().blocks("shit"));
        assert!(Blocklist::parse_list("# only\n\n  \n").is_empty());
    }
}
