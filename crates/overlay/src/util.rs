//! Small shared pieces: a keyed deterministic hasher, a token bucket, back-off with
//! full jitter, a lazy timer queue, and the mixing function behind HRW placement.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasher, DefaultHasher, Hasher};
use std::time::Duration;

use peercall_wire::Time;
use rand_core::RngCore;

/// A deterministic, keyed hash builder: SipHash-1-3 (std's `DefaultHasher`) with a
/// 128-bit secret prefix drawn from the node's seeded RNG. Deterministic, so
/// simulations replay (std's `RandomState` reads OS randomness); keyed, so a peer
/// cannot grind keys that collide in one node's tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyedState {
    k0: u64,
    k1: u64,
}

impl KeyedState {
    /// A hash builder keyed by two words from `rng`.
    pub fn new(rng: &mut impl RngCore) -> KeyedState {
        KeyedState {
            k0: rng.next_u64(),
            k1: rng.next_u64(),
        }
    }

    /// A hash builder with a fixed key (for tables whose keys peers cannot choose).
    pub const fn fixed(k0: u64, k1: u64) -> KeyedState {
        KeyedState { k0, k1 }
    }

    /// The hash of one 32-byte key.
    pub fn hash32(&self, bytes: &[u8; 32]) -> u64 {
        let mut h = self.build_hasher();
        h.write(bytes);
        h.finish()
    }
}

impl BuildHasher for KeyedState {
    type Hasher = DefaultHasher;

    fn build_hasher(&self) -> DefaultHasher {
        let mut h = DefaultHasher::new();
        h.write_u64(self.k0);
        h.write_u64(self.k1);
        h
    }
}

/// A `HashMap` with a [`KeyedState`] hasher.
pub type Map<K, V> = HashMap<K, V, KeyedState>;
/// A `HashSet` with a [`KeyedState`] hasher.
pub type Set<K> = HashSet<K, KeyedState>;

/// An empty [`Map`] keyed from `rng`.
pub fn map<K, V>(rng: &mut impl RngCore) -> Map<K, V> {
    HashMap::with_hasher(KeyedState::new(rng))
}

/// An empty [`Set`] keyed from `rng`.
pub fn set<K>(rng: &mut impl RngCore) -> Set<K> {
    HashSet::with_hasher(KeyedState::new(rng))
}

/// The 64-bit finalizer of SplitMix64: a bijection whose every output bit depends on
/// every input bit. HRW placement scores `mix64(object ^ member)`, which costs a
/// couple of nanoseconds per member instead of a cryptographic hash.
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The first eight bytes of a 32-byte key, as a number: keys and ids are hashes or
/// public keys, so these bits are already uniform.
pub fn prefix64(bytes: &[u8; 32]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(w)
}

/// A uniformly random duration in `[0, max]` (full jitter).
pub fn jitter(rng: &mut impl RngCore, max: Duration) -> Duration {
    let us = max.as_micros().min(u128::from(u64::MAX)) as u64;
    if us == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros(rng.next_u64() % (us + 1))
}

/// Exponential back-off with full jitter (the AWS architecture blog's "full
/// jitter"): a uniform draw in `[0, min(cap, base · 2^attempt)]`, at least `floor`.
pub fn backoff(
    rng: &mut impl RngCore,
    attempt: u32,
    base: Duration,
    cap: Duration,
    floor: Duration,
) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(20)).min(cap);
    jitter(rng, ceiling).max(floor)
}

/// A uniform index below `n` (`n > 0`).
pub fn below(rng: &mut impl RngCore, n: usize) -> usize {
    debug_assert!(n > 0);
    (rng.next_u64() % n as u64) as usize
}

/// A token bucket in integer micro-tokens: `rate` tokens per second up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Micro-tokens per second.
    rate: u64,
    /// The bucket size in micro-tokens.
    burst: u64,
    tokens: u64,
    last: Time,
}

const MICRO: u64 = 1_000_000;

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled at `rate_per_s`.
    pub fn new(rate_per_s: u32, burst: u32, now: Time) -> TokenBucket {
        let burst = u64::from(burst.max(1)) * MICRO;
        TokenBucket {
            rate: u64::from(rate_per_s) * MICRO,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Time) {
        let elapsed = now
            .saturating_since(self.last)
            .as_micros()
            .min(u128::from(u64::MAX)) as u64;
        if elapsed > 0 {
            // rate is per second, elapsed in µs: tokens += rate · elapsed / 1e6.
            let add = (u128::from(self.rate) * u128::from(elapsed) / u128::from(MICRO))
                .min(u128::from(u64::MAX)) as u64;
            self.tokens = self.tokens.saturating_add(add).min(self.burst);
            self.last = now;
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Time) -> bool {
        self.refill(now);
        if self.tokens >= MICRO {
            self.tokens -= MICRO;
            true
        } else {
            false
        }
    }
}

/// A min-queue of timers with lazy cancellation: entries are never removed early;
/// whoever pops one checks that it is still wanted (the state it refers to still
/// exists and is due). Pushing is `O(log n)`, the next deadline `O(1)`.
#[derive(Debug)]
pub struct Timers<T: Ord> {
    heap: BinaryHeap<Reverse<(Time, T)>>,
}

impl<T: Ord> Default for Timers<T> {
    fn default() -> Self {
        Timers {
            heap: BinaryHeap::new(),
        }
    }
}

impl<T: Ord + Copy> Timers<T> {
    /// Schedules `timer` at `at`.
    pub fn push(&mut self, at: Time, timer: T) {
        self.heap.push(Reverse((at, timer)));
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Time> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Pops a timer due at `now`.
    pub fn pop_due(&mut self, now: Time) -> Option<(Time, T)> {
        if self.next()? <= now {
            self.heap.pop().map(|Reverse(e)| e)
        } else {
            None
        }
    }

    /// Entries queued (live or stale).
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn bucket_refills_at_its_rate() {
        let t0 = Time::from_secs(100);
        let mut b = TokenBucket::new(2, 3, t0);
        assert!(b.take(t0) && b.take(t0) && b.take(t0));
        assert!(!b.take(t0));
        assert!(!b.take(t0 + Duration::from_millis(400)));
        assert!(b.take(t0 + Duration::from_millis(500)));
        assert!(!b.take(t0 + Duration::from_millis(500)));
        // Never more than the burst.
        let later = t0 + Duration::from_secs(100);
        assert!(b.take(later) && b.take(later) && b.take(later));
        assert!(!b.take(later));
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(60);
        let mut distinct = std::collections::BTreeSet::new();
        for attempt in 0..40 {
            let d = backoff(&mut rng, attempt, base, cap, Duration::from_millis(10));
            assert!(d <= cap && d >= Duration::from_millis(10));
            assert!(d <= base * (1 << attempt.min(6)));
            distinct.insert(d);
        }
        assert!(distinct.len() > 30, "jittered");
    }

    #[test]
    fn timers_pop_in_order() {
        let mut t: Timers<u32> = Timers::default();
        t.push(Time::from_secs(5), 1);
        t.push(Time::from_secs(3), 2);
        t.push(Time::from_secs(3), 0);
        assert_eq!(t.next(), Some(Time::from_secs(3)));
        assert_eq!(t.pop_due(Time::from_secs(2)), None);
        assert_eq!(t.pop_due(Time::from_secs(4)), Some((Time::from_secs(3), 0)));
        assert_eq!(t.pop_due(Time::from_secs(4)), Some((Time::from_secs(3), 2)));
        assert_eq!(t.pop_due(Time::from_secs(4)), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn keyed_hashers_differ_by_key() {
        let a = KeyedState::fixed(1, 2).hash32(&[7; 32]);
        let b = KeyedState::fixed(1, 3).hash32(&[7; 32]);
        assert_ne!(a, b);
        assert_eq!(a, KeyedState::fixed(1, 2).hash32(&[7; 32]));
    }
}
