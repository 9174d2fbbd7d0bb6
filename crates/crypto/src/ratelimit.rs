//! Handshake rate limits: a global load detector and per-source token buckets.
//!
//! A responder spends three or four X25519 operations on every initiation it
//! processes, so initiations are what an attacker floods. Two limits apply (the
//! endpoint composes them, see `endpoint.rs`):
//!
//! * [`LoadDetector`]: a token bucket of handshakes per second for the whole endpoint.
//!   While it is empty the endpoint is *under load* and processes only initiations
//!   whose `mac2` proves the source address (a cookie round trip); the others get a
//!   cookie reply and no state.
//! * [`RateLimiter`]: a token bucket per source IP (ports are free to an attacker, so
//!   they are ignored), applied to address-proven initiations, in a table of fixed
//!   capacity that evicts its least recently used entry. A flood of distinct sources
//!   cannot grow it.
//!
//! Token buckets count in micro-tokens so refills are exact integer arithmetic on
//! microsecond clocks: deterministic, no floating point.

use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use peercall_wire::Time;

use crate::lru::LruMap;

/// Micro-tokens per token: one token per second refills one micro-token per µs.
const SCALE: u64 = 1_000_000;

/// Handshakes per second the endpoint processes before demanding cookies. One core
/// completes about 1,500 to 2,500 responder handshakes per second (see the crypto
/// bench), so 1,000 leaves headroom for the rest of the node.
pub const DEFAULT_GLOBAL_HANDSHAKES_PER_SEC: u32 = 1_000;
/// Handshakes the endpoint absorbs at once before it is under load: a burst of peers
/// reconnecting after a supernode restart should not all pay a cookie round trip.
pub const DEFAULT_GLOBAL_BURST: u32 = 1_000;
/// Handshakes per second from one IP once under load. Twenty allows a busy NAT with
/// several nodes behind it (WireGuard uses the same figure) while keeping one source
/// to a small share of [`DEFAULT_GLOBAL_HANDSHAKES_PER_SEC`].
pub const DEFAULT_PER_SOURCE_PER_SEC: u32 = 20;
/// Handshakes one IP may send back to back (a node retrying several peers at once).
pub const DEFAULT_PER_SOURCE_BURST: u32 = 5;
/// Sources tracked at once. 8,192 entries of about 64 bytes is half a megabyte, and
/// more distinct proven sources than that within a few seconds is a distributed
/// attack, where evicting the idlest entry is the best a fixed table can do.
pub const DEFAULT_SOURCE_TABLE: usize = 8_192;
/// How long the endpoint stays under load after its bucket ran dry, so it does not
/// flap between the two modes on every packet of a sustained flood.
pub const UNDER_LOAD_HOLD: Duration = Duration::from_secs(1);

/// A rate with a burst allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: NonZeroU32,
    /// Tokens the bucket holds when full.
    pub burst: NonZeroU32,
}

impl Rate {
    /// `per_sec` tokens per second with `burst` tokens of slack; zero values become 1.
    pub fn new(per_sec: u32, burst: u32) -> Rate {
        Rate {
            per_sec: NonZeroU32::new(per_sec).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// A token bucket, starting full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    level: u64,
    last: Time,
    rate: Rate,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: Rate, now: Time) -> TokenBucket {
        TokenBucket {
            level: u64::from(rate.burst.get()) * SCALE,
            last: now,
            rate,
        }
    }

    fn refill(&mut self, now: Time) {
        let elapsed = now.as_micros().saturating_sub(self.last.as_micros());
        let cap = u64::from(self.rate.burst.get()) * SCALE;
        self.level = self
            .level
            .saturating_add(elapsed.saturating_mul(u64::from(self.rate.per_sec.get())))
            .min(cap);
        self.last = self.last.max(now);
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Time) -> bool {
        self.refill(now);
        if self.level >= SCALE {
            self.level -= SCALE;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full at `now`.
    pub fn is_full(&self, now: Time) -> bool {
        let mut b = self.clone();
        b.refill(now);
        b.level == u64::from(self.rate.burst.get()) * SCALE
    }
}

/// Decides when the endpoint is under load.
#[derive(Debug, Clone)]
pub struct LoadDetector {
    bucket: TokenBucket,
    loaded_until: Time,
}

impl LoadDetector {
    /// A detector allowing `rate` handshakes before load.
    pub fn new(rate: Rate, now: Time) -> LoadDetector {
        LoadDetector {
            bucket: TokenBucket::new(rate, now),
            loaded_until: Time::ZERO,
        }
    }

    /// Asks to process one handshake without proof of address. Returns false when the
    /// endpoint is under load (the caller then demands a cookie); a false answer
    /// keeps the endpoint under load for [`UNDER_LOAD_HOLD`].
    pub fn admit(&mut self, now: Time) -> bool {
        if now < self.loaded_until {
            return false;
        }
        if self.bucket.try_take(now) {
            true
        } else {
            self.loaded_until = now + UNDER_LOAD_HOLD;
            false
        }
    }

    /// Whether the endpoint is under load at `now`.
    pub fn is_loaded(&self, now: Time) -> bool {
        now < self.loaded_until
    }
}

/// Per-source-IP token buckets in a bounded table.
pub struct RateLimiter {
    rate: Rate,
    table: LruMap<IpAddr, TokenBucket>,
}

impl RateLimiter {
    /// A limiter giving each source `rate` and tracking at most `capacity` sources.
    pub fn new(rate: Rate, capacity: NonZeroUsize) -> RateLimiter {
        RateLimiter {
            rate,
            table: LruMap::new(capacity.get()),
        }
    }

    /// Takes a token for `source`. False means: drop this handshake.
    pub fn allow(&mut self, now: Time, source: IpAddr) -> bool {
        let source = source.to_canonical();
        if let Some(bucket) = self.table.get_mut(&source) {
            return bucket.try_take(now);
        }
        let mut bucket = TokenBucket::new(self.rate, now);
        let allowed = bucket.try_take(now);
        self.table.insert(source, bucket);
        allowed
    }

    /// Sources tracked now.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.table.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn t(ms: u64) -> Time {
        Time::from_micros(ms * 1000)
    }

    #[test]
    fn bucket_refills_at_its_rate() {
        let mut b = TokenBucket::new(Rate::new(10, 2), t(0));
        assert!(b.try_take(t(0)));
        assert!(b.try_take(t(0)));
        assert!(!b.try_take(t(0)));
        assert!(!b.try_take(t(99)));
        assert!(b.try_take(t(100)));
        assert!(!b.try_take(t(100)));
        // A long idle period refills to the burst, not beyond.
        assert!(b.is_full(t(10_000)));
        for _ in 0..2 {
            assert!(b.try_take(t(10_000)));
        }
        assert!(!b.try_take(t(10_000)));
    }

    #[test]
    fn load_is_sticky_for_the_hold_time() {
        let mut d = LoadDetector::new(Rate::new(1000, 3), t(0));
        assert!(d.admit(t(0)) && d.admit(t(0)) && d.admit(t(0)));
        assert!(!d.admit(t(0)));
        assert!(d.is_loaded(t(500)));
        // Tokens are back after 1 ms, but the hold keeps demanding cookies.
        assert!(!d.admit(t(500)));
        assert!(!d.is_loaded(t(1000)));
        assert!(d.admit(t(1000)));
    }

    #[test]
    fn per_source_limit_ignores_ports_and_table_is_bounded() {
        let cap = NonZeroUsize::new(64).expect("non-zero");
        let mut l = RateLimiter::new(Rate::new(1, 2), cap);
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        assert!(l.allow(t(0), a));
        assert!(l.allow(t(0), a));
        assert!(!l.allow(t(0), a));
        // The IPv4-mapped IPv6 spelling is the same source.
        assert!(!l.allow(
            t(0),
            IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped())
        ));
        // A flood of distinct sources never grows the table past its capacity.
        for i in 0..100_000u32 {
            assert!(l.allow(t(1), IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i))));
            assert!(l.len() <= 64);
        }
        assert_eq!(l.len(), 64);
        // The flood evicted `a`, which starts again with a full bucket.
        assert!(l.allow(t(2), a));
    }
}
