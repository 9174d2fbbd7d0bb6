//! Small helpers: a deterministic hash map and random draws from the seeded generator.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use rand_core::RngCore;

/// A hash map with a fixed, fast hasher.
///
/// The standard `RandomState` seeds itself from the OS, which the simulator must not
/// use; keys here are small integers chosen by the simulation, so flooding is no
/// concern.
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<MixHasher>>;

/// Folds each written word in with the SplitMix64 finaliser, so keys that differ
/// only in high bits still spread over the table's low-bit buckets.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct MixHasher(u64);

/// SplitMix64's multipliers (Steele, Lea and Flood, 2014).
const MIX_1: u64 = 0xbf58_476d_1ce4_e5b9;
const MIX_2: u64 = 0x94d0_49bb_1331_11eb;
/// Odd constant (the golden ratio in 64 bits) so a zero word still changes the state.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(MIX_1);
    z = (z ^ (z >> 27)).wrapping_mul(MIX_2);
    z ^ (z >> 31)
}

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = mix(self.0.wrapping_add(GOLDEN) ^ n);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    fn write_u128(&mut self, n: u128) {
        // Truncation is the point: the low and high halves are folded in turn.
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
}

/// A uniform draw in `[0, 1)` with 53 bits of precision.
pub(crate) fn unit(rng: &mut impl RngCore) -> f64 {
    /// 2^-53: one step between consecutive doubles in [0.5, 1).
    const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
    (rng.next_u64() >> 11) as f64 * SCALE
}

/// True with probability `p`; draws nothing when `p` is 0, so features that are off
/// do not disturb the random stream of those that are on.
pub(crate) fn chance(rng: &mut impl RngCore, p: f64) -> bool {
    p > 0.0 && (p >= 1.0 || unit(rng) < p)
}

/// A uniform draw in `0..n` (`n > 0`), by multiply-and-shift.
pub(crate) fn below(rng: &mut impl RngCore, n: u64) -> u64 {
    ((u128::from(rng.next_u64()) * u128::from(n)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn draws_stay_in_range_and_chance_is_calibrated() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut hits = 0;
        for _ in 0..100_000 {
            let u = unit(&mut rng);
            assert!((0.0..1.0).contains(&u));
            assert!(below(&mut rng, 7) < 7);
            hits += usize::from(chance(&mut rng, 0.25));
        }
        assert!((24_000..26_000).contains(&hits), "{hits}");
        assert!(!chance(&mut rng, 0.0));
        assert!(chance(&mut rng, 1.0));
    }

    #[test]
    fn hasher_spreads_high_bits() {
        let mut buckets = [0u32; 16];
        for i in 0..1600u64 {
            let mut h = MixHasher::default();
            h.write_u64(i << 40);
            buckets[(h.finish() & 15) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&b| (50..150).contains(&b)),
            "{buckets:?}"
        );
    }
}
