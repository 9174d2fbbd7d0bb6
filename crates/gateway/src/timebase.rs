//! Mapping peercall's [`Time`] onto the `Instant`s str0m counts in.

use std::time::Instant;

use peercall_wire::Time;

/// One moment known in both clocks; every other moment is an offset from it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timebase {
    time: Time,
    instant: Instant,
}

impl Timebase {
    /// `instant` must have been taken at `time`.
    pub(crate) fn new(time: Time, instant: Instant) -> Timebase {
        Timebase { time, instant }
    }

    /// The instant of `t`. Times before the base map to the base (they cannot
    /// happen: `now` never goes backwards); times beyond what `Instant` can hold
    /// map to the latest representable offset of a century.
    pub(crate) fn instant(&self, t: Time) -> Instant {
        let offset = t.saturating_since(self.time);
        self.instant
            .checked_add(offset)
            .or_else(|| self.instant.checked_add(FAR_FUTURE))
            .unwrap_or(self.instant)
    }

    /// The time of `at`. str0m asks for timeouts at instants before the base
    /// ("already due"), which map to the base; far-future instants saturate.
    pub(crate) fn time(&self, at: Instant) -> Time {
        self.time + at.saturating_duration_since(self.instant)
    }
}

/// What "never" becomes when a time is too far out for `Instant`: a century.
const FAR_FUTURE: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn round_trips_and_saturates() {
        let base = Instant::now();
        let tb = Timebase::new(Time::from_secs(1_000), base);
        let t = Time::from_secs(1_000) + Duration::from_millis(1_500);
        assert_eq!(tb.instant(t), base + Duration::from_millis(1_500));
        assert_eq!(tb.time(tb.instant(t)), t);
        assert_eq!(tb.instant(Time::from_secs(3)), base);
        if let Some(before) = base.checked_sub(Duration::from_secs(1)) {
            assert_eq!(tb.time(before), Time::from_secs(1_000));
        }
        // Time::MAX neither panics nor lands before the base.
        assert!(tb.instant(Time::MAX) >= base);
    }
}
