//! The node's only clock.
//!
//! [`Clock::now`] is the Unix time read once at start plus a monotonic clock's
//! elapsed time: it has wall-clock meaning (other nodes judge handshake timestamps
//! and record expiry by it) and never goes backwards, even if the system clock is
//! stepped while the node runs.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use peercall_wire::Time;

/// Wall-clock origin plus monotonic elapsed time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Unix time at start.
    origin: Time,
    /// The monotonic instant at start.
    base: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn start() -> Clock {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            // A system clock before 1970 is broken; count from the epoch then.
            .unwrap_or(Duration::ZERO);
        Clock {
            origin: Time::ZERO + since_epoch,
            base: Instant::now(),
        }
    }

    /// The current time.
    pub fn now(&self) -> Time {
        self.origin + self.base.elapsed()
    }

    /// The Unix time at start.
    pub fn started(&self) -> Time {
        self.origin
    }

    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.base.elapsed()
    }

    /// The monotonic instant at which [`Clock::now`] reaches `t` (now, if it has
    /// passed), or `None` if that is beyond what `Instant` can represent (a timer at
    /// [`Time::MAX`] never fires).
    pub fn instant_at(&self, t: Time) -> Option<Instant> {
        self.base.checked_add(t.saturating_since(self.origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_wall_clock_and_monotonic() {
        let clock = Clock::start();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(clock.now().as_secs().abs_diff(wall) <= 1);
        let mut last = clock.now();
        for _ in 0..1000 {
            let t = clock.now();
            assert!(t >= last);
            last = t;
        }
        assert!(clock.now() >= clock.started());
    }

    #[test]
    fn deadlines_map_to_instants() {
        let clock = Clock::start();
        let later = clock.started() + Duration::from_secs(5);
        let at = clock.instant_at(later).unwrap();
        assert_eq!(at.duration_since(clock.base), Duration::from_secs(5));
        // A deadline in the past is due at once (at the start instant or later).
        assert_eq!(clock.instant_at(Time::ZERO), Some(clock.base));
        // The far future neither panics nor lands in the past.
        assert!(clock.instant_at(Time::MAX).is_none_or(|i| i > at));
    }
}
