//! The keyed permutation that makes the hand-out order unguessable: a balanced
//! Feistel network over the smallest even-bit-width domain that covers the key
//! space, with cycle-walking to stay inside the space.
//!
//! Position `i` of a pool's generation order maps to key index `perm(i)`, and
//! `perm` is a bijection on `0..space`: keys are unique by construction and the
//! pool only needs a cursor, never the list of the whole space. The round
//! function is SHA-256 keyed by the pool's secret, so without the secret the
//! next key cannot be predicted from the previous ones.

use kgs_schemas::format::{KeyFormat, Tier};
use sha2::{Digest, Sha256};

/// Feistel rounds. Four rounds already give a pseudo-random permutation
/// (Luby–Rackoff); eight leave a wide margin at a cost that is negligible
/// next to the database writes.
const ROUNDS: u8 = 8;

/// A keyed bijection on `0..space`.
#[derive(Clone)]
pub struct Permutation {
    space: u64,
    half_bits: u32,
    half_mask: u64,
    /// SHA-256 state after absorbing the secret; cloned for every round.
    keyed: Sha256,
}

impl std::fmt::Debug for Permutation {
    // The hasher state is derived from the secret: keep it out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permutation")
            .field("space", &self.space)
            .field("half_bits", &self.half_bits)
            .finish_non_exhaustive()
    }
}

impl Permutation {
    /// The permutation of `0..space` keyed by `secret` (`space >= 1`).
    pub fn new(secret: &[u8], space: u64) -> Self {
        assert!(space >= 1, "empty key space");
        // Bits needed for the largest index, rounded up to an even number so
        // the two Feistel halves are equal; at least one bit per half.
        let bits = (64 - (space - 1).leading_zeros()).max(2);
        let half_bits = bits.div_ceil(2);
        let mut keyed = Sha256::new();
        keyed.update(b"kgs-permutation-v1");
        keyed.update((secret.len() as u64).to_le_bytes());
        keyed.update(secret);
        Self {
            space,
            half_bits,
            half_mask: (1u64 << half_bits) - 1,
            keyed,
        }
    }

    /// The size of the permuted space.
    pub fn space(&self) -> u64 {
        self.space
    }

    /// `perm(i)`, the key index at generation position `i` (`i < space`).
    pub fn apply(&self, i: u64) -> u64 {
        assert!(i < self.space, "index {i} outside 0..{}", self.space);
        // Cycle-walking: the domain is at most 4x the space, so this loop runs
        // a few times on average and terminates because the Feistel network is
        // a permutation of the domain (the walk returns into 0..space).
        let mut x = i;
        loop {
            x = self.feistel(x);
            if x < self.space {
                return x;
            }
        }
    }

    /// `perm⁻¹(index)`: the generation position of a key index.
    pub fn invert(&self, index: u64) -> u64 {
        assert!(
            index < self.space,
            "index {index} outside 0..{}",
            self.space
        );
        let mut x = index;
        loop {
            x = self.feistel_inverse(x);
            if x < self.space {
                return x;
            }
        }
    }

    fn round(&self, round: u8, half: u64) -> u64 {
        let mut h = self.keyed.clone();
        h.update([round]);
        h.update(half.to_le_bytes());
        let digest = h.finalize();
        let mut word = [0u8; 8];
        word.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(word) & self.half_mask
    }

    fn feistel(&self, x: u64) -> u64 {
        let (mut l, mut r) = (x >> self.half_bits, x & self.half_mask);
        for round in 0..ROUNDS {
            (l, r) = (r, l ^ self.round(round, r));
        }
        (l << self.half_bits) | r
    }

    fn feistel_inverse(&self, x: u64) -> u64 {
        let (mut l, mut r) = (x >> self.half_bits, x & self.half_mask);
        for round in (0..ROUNDS).rev() {
            (l, r) = (r ^ self.round(round, l), l);
        }
        (l << self.half_bits) | r
    }
}

/// The hand-out order of a pool: generation position `n` to key index,
/// tier by tier. A tier's positions are its indices' range (shortest keys
/// first, see [`kgs_schemas::format`]), and within it a [`Permutation`] of
/// its own: position `first + i` holds index `first + perm_t(i)`. So every
/// key of a length is handed out before the first key of the next one, and
/// the order inside each length is as unguessable as in a pool of one.
#[derive(Debug, Clone)]
pub struct Order {
    tiers: Vec<(Tier, Permutation)>,
    space: u64,
}

impl Order {
    /// The order of `format`'s space keyed by `secret`. The first tier is
    /// keyed by the secret itself (a pool of one length has the order it
    /// had before tiers existed); each longer tier by the secret and its
    /// length, so no two tiers share round keys.
    pub fn new(secret: &[u8], format: &KeyFormat) -> Self {
        let tiers = format
            .tiers()
            .iter()
            .enumerate()
            .map(|(i, tier)| {
                let perm = if i == 0 {
                    Permutation::new(secret, tier.space)
                } else {
                    let mut keyed = secret.to_vec();
                    keyed.extend_from_slice(b"/kgs-tier/");
                    keyed.push(tier.length);
                    Permutation::new(&keyed, tier.space)
                };
                (*tier, perm)
            })
            .collect();
        Self {
            tiers,
            space: format.space(),
        }
    }

    /// The number of positions (the size of the key space).
    pub fn space(&self) -> u64 {
        self.space
    }

    fn tier(&self, x: u64) -> &(Tier, Permutation) {
        assert!(x < self.space, "{x} outside 0..{}", self.space);
        self.tiers
            .iter()
            .find(|(t, _)| x < t.end())
            .expect("x is inside some tier")
    }

    /// The key index at generation position `n` (`n < space`).
    pub fn apply(&self, n: u64) -> u64 {
        let (tier, perm) = self.tier(n);
        tier.first + perm.apply(n - tier.first)
    }

    /// The generation position of key index `index`.
    pub fn invert(&self, index: u64) -> u64 {
        let (tier, perm) = self.tier(index);
        tier.first + perm.invert(index - tier.first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(p: &Permutation) -> Vec<u64> {
        (0..p.space()).map(|i| p.apply(i)).collect()
    }

    /// Over spaces of many sizes (odd bit widths, powers of two, the base62
    /// 1-, 2- and 3-letter spaces) every index appears exactly once.
    #[test]
    fn is_a_bijection_on_every_space_size() {
        for space in [1, 2, 3, 5, 62, 64, 65, 1000, 3_844, 238_328] {
            let p = Permutation::new(b"secret", space);
            let mut seen = vec![false; space as usize];
            for x in image(&p) {
                assert!(!seen[x as usize], "space {space}: {x} twice");
                seen[x as usize] = true;
            }
            assert!(seen.iter().all(|s| *s), "space {space}: not onto");
        }
    }

    /// `invert` undoes `apply`, so `reserve` can find a key's position.
    #[test]
    fn invert_undoes_apply() {
        let p = Permutation::new(b"k", 3_844);
        for i in 0..3_844 {
            assert_eq!(p.invert(p.apply(i)), i);
        }
    }

    /// The same secret gives the same order; another secret another order.
    #[test]
    fn deterministic_per_secret_and_different_across_secrets() {
        let a = image(&Permutation::new(b"one", 3_844));
        assert_eq!(a, image(&Permutation::new(b"one", 3_844)));
        let b = image(&Permutation::new(b"two", 3_844));
        assert_ne!(a, b);
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        // A random pair of permutations agrees on about one position.
        assert!(same < 20, "{same} fixed agreements");
    }

    /// A pool of several lengths hands out every key of a length before
    /// any longer one, each length in an order of its own; a pool of one
    /// length keeps the order of its permutation.
    #[test]
    fn an_order_goes_tier_by_tier() {
        let format = KeyFormat::with_lengths("abc", 2, 4).unwrap();
        let order = Order::new(b"secret", &format);
        let keys: Vec<String> = (0..order.space())
            .map(|n| format.key_at(order.apply(n)).unwrap())
            .collect();
        let lengths: Vec<usize> = keys.iter().map(String::len).collect();
        assert!(lengths.windows(2).all(|w| w[0] <= w[1]), "{lengths:?}");
        assert_eq!(lengths.iter().filter(|l| **l == 2).count(), 9);
        assert_eq!(lengths.iter().filter(|l| **l == 4).count(), 81);
        let unique: std::collections::HashSet<&String> = keys.iter().collect();
        assert_eq!(unique.len() as u64, format.space());
        for n in 0..order.space() {
            assert_eq!(order.invert(order.apply(n)), n);
        }
        // Not lexicographic inside a tier.
        assert_ne!(keys[9..36], {
            let mut sorted = keys[9..36].to_vec();
            sorted.sort();
            sorted
        });
        let one = KeyFormat::new("abc", 3).unwrap();
        let plain = Permutation::new(b"secret", one.space());
        let order = Order::new(b"secret", &one);
        assert!((0..one.space()).all(|n| order.apply(n) == plain.apply(n)));
        // The second tier is not the first's permutation widened.
        let two = Order::new(b"secret", &KeyFormat::with_lengths("abc", 3, 3).unwrap());
        let tiered = Order::new(b"secret", &KeyFormat::with_lengths("abc", 2, 3).unwrap());
        assert!((0..27).any(|i| tiered.apply(9 + i) - 9 != two.apply(i)));
    }

    /// The order is far from lexicographic: few successive indices are
    /// neighbours, and the sequence is not sorted.
    #[test]
    fn not_in_lexicographic_order() {
        let a = image(&Permutation::new(b"secret", 3_844));
        assert_ne!(a, (0..3_844).collect::<Vec<_>>());
        let adjacent = a.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(adjacent < 20, "{adjacent} consecutive pairs");
        let ascending = a.windows(2).filter(|w| w[1] > w[0]).count();
        assert!((1_500..2_350).contains(&ascending), "{ascending} ascents");
    }
}
