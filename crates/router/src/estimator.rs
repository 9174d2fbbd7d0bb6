//! Per-path estimators: round-trip time, RFC 3550 inter-arrival jitter, and loss
//! with bursts over a sliding time window.
//!
//! Each estimator is a small value type fed with `now` and one observation; none
//! allocates, so feeding them costs a few nanoseconds per packet.

use std::time::Duration;

use peercall_wire::Time;

/// How many recent RTT samples the robust statistics (windowed minimum, median,
/// 90th percentile) look at: about six seconds of reports on a media path, eight
/// seconds of warm probes; enough for a stable median, small enough to sort on a
/// stats call without allocating.
pub const RTT_SAMPLES: usize = 32;

/// Samples older than this are left out of the windowed minimum, so a route change
/// to a longer path shows in the minimum within this time.
pub const RTT_MIN_WINDOW: Duration = Duration::from_secs(10);

/// RTT samples above this are refused as bogus: no usable voice path has a round
/// trip of ten seconds, and a clock or echo error must not poison the average.
pub const MAX_RTT: Duration = Duration::from_secs(10);

/// Round-trip time: RFC 6298's smoothed RTT and variation, plus robust statistics
/// over the last [`RTT_SAMPLES`] samples.
#[derive(Debug, Clone)]
pub struct RttEstimator {
    srtt_us: Option<u64>,
    rttvar_us: u64,
    latest_us: u64,
    /// Ring of (time, rtt µs).
    ring: [(Time, u32); RTT_SAMPLES],
    next: usize,
    len: usize,
    count: u64,
}

impl Default for RttEstimator {
    fn default() -> Self {
        RttEstimator {
            srtt_us: None,
            rttvar_us: 0,
            latest_us: 0,
            ring: [(Time::ZERO, 0); RTT_SAMPLES],
            next: 0,
            len: 0,
            count: 0,
        }
    }
}

impl RttEstimator {
    /// Feeds one sample taken at `now`. Returns false (and ignores it) when the
    /// sample exceeds [`MAX_RTT`].
    pub fn on_sample(&mut self, now: Time, rtt: Duration) -> bool {
        if rtt > MAX_RTT {
            return false;
        }
        let r = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        match self.srtt_us {
            None => {
                self.srtt_us = Some(r);
                self.rttvar_us = r / 2;
            }
            Some(s) => {
                // RFC 6298 §2.3: beta = 1/4, alpha = 1/8.
                self.rttvar_us = (3 * self.rttvar_us + s.abs_diff(r)) / 4;
                self.srtt_us = Some((7 * s + r) / 8);
            }
        }
        self.latest_us = r;
        let r32 = u32::try_from(r).unwrap_or(u32::MAX);
        self.ring[self.next] = (now, r32);
        self.next = (self.next + 1) % RTT_SAMPLES;
        self.len = (self.len + 1).min(RTT_SAMPLES);
        self.count += 1;
        true
    }

    /// The smoothed RTT, once a sample arrived.
    pub fn smoothed(&self) -> Option<Duration> {
        self.srtt_us.map(Duration::from_micros)
    }

    /// RFC 6298's RTT variation (mean deviation).
    pub fn variation(&self) -> Duration {
        Duration::from_micros(self.rttvar_us)
    }

    /// The latest sample.
    pub fn latest(&self) -> Option<Duration> {
        self.srtt_us.map(|_| Duration::from_micros(self.latest_us))
    }

    /// Samples taken so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The smallest sample of the last [`RTT_MIN_WINDOW`] (the path's propagation
    /// delay without queueing), if any sample is that recent.
    pub fn min(&self, now: Time) -> Option<Duration> {
        let cutoff = now - RTT_MIN_WINDOW;
        self.ring[..self.len]
            .iter()
            .filter(|(t, _)| *t >= cutoff)
            .map(|&(_, r)| r)
            .min()
            .map(|r| Duration::from_micros(u64::from(r)))
    }

    /// The `q`-quantile (0..=1, nearest rank) of the last [`RTT_SAMPLES`] samples.
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        let mut sorted = [0u32; RTT_SAMPLES];
        for (dst, &(_, r)) in sorted.iter_mut().zip(&self.ring[..self.len]) {
            *dst = r;
        }
        let sorted = &mut sorted[..self.len];
        sorted.sort_unstable();
        let q = if q.is_finite() {
            q.clamp(0.0, 1.0)
        } else {
            0.5
        };
        // Nearest rank: ceil(q * n), 1-based.
        let rank = ((q * self.len as f64).ceil() as usize).clamp(1, self.len);
        Some(Duration::from_micros(u64::from(sorted[rank - 1])))
    }
}

/// RFC 3550 §6.4.1 / A.8 inter-arrival jitter, in the RFC's fixed-point form
/// (the estimate times 16, so the 1/16 gain loses no precision).
///
/// Each observation is a pair (sender time, arrival time); only differences between
/// consecutive observations matter, so the two clocks need not agree.
#[derive(Debug, Clone, Copy, Default)]
pub struct JitterEstimator {
    last: Option<(i64, Time)>,
    jitter16_us: u64,
}

impl JitterEstimator {
    /// Feeds one arrival: `sent_us` on the sender's clock (any origin), `now` the
    /// arrival time.
    pub fn on_arrival(&mut self, sent_us: i64, now: Time) {
        if let Some((last_sent, last_arrival)) = self.last {
            let arrival_delta = now.as_micros() as i128 - last_arrival.as_micros() as i128;
            let send_delta = i128::from(sent_us) - i128::from(last_sent);
            let d = u64::try_from((arrival_delta - send_delta).unsigned_abs()).unwrap_or(u64::MAX);
            // J += (|D| - J) / 16, kept as 16 J: 16J += |D| - (16J + 8) / 16.
            self.jitter16_us = self
                .jitter16_us
                .saturating_add(d.min(u64::from(u32::MAX)))
                .saturating_sub((self.jitter16_us + 8) / 16);
        }
        self.last = Some((sent_us, now));
    }

    /// The jitter estimate in microseconds.
    pub fn jitter_us(&self) -> u32 {
        u32::try_from(self.jitter16_us / 16).unwrap_or(u32::MAX)
    }

    /// Whether two arrivals have been seen (the estimate means something).
    pub fn is_measured(&self) -> bool {
        self.last.is_some() && self.jitter16_us > 0
    }
}

/// Length of the loss window. Ten seconds holds 500 media frames, enough to tell
/// 1 % from 3 % loss, yet lets a path that changed show its new loss within a few
/// seconds (the selector also waits [`crate::selector::SWITCH_HOLD`] on top).
pub const LOSS_WINDOW: Duration = Duration::from_secs(10);

/// The window is kept as this many buckets; a bucket ages out as a whole, so the
/// window's length is exact to one bucket (half a second).
pub const LOSS_BUCKETS: usize = 20;

const BUCKET_US: u64 = LOSS_WINDOW.as_micros() as u64 / LOSS_BUCKETS as u64;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// `now / BUCKET_US` of the bucket's time slot; a bucket whose slot is out of
    /// the window counts as empty.
    slot: u64,
    received: u32,
    lost: u32,
    bursts: u32,
    max_burst: u32,
}

/// Loss rate and loss bursts over the last [`LOSS_WINDOW`].
///
/// Outcomes are recorded in the order the packets were sent: a run of losses
/// between two deliveries is one burst.
#[derive(Debug, Clone)]
pub struct LossWindow {
    buckets: [Bucket; LOSS_BUCKETS],
    /// Length of the loss run in progress (0 after a delivery).
    run: u32,
    total_received: u64,
    total_lost: u64,
}

impl Default for LossWindow {
    fn default() -> Self {
        LossWindow {
            buckets: [Bucket::default(); LOSS_BUCKETS],
            run: 0,
            total_received: 0,
            total_lost: 0,
        }
    }
}

/// Loss figures over a window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossSummary {
    /// Packets delivered.
    pub received: u32,
    /// Packets lost.
    pub lost: u32,
    /// Loss runs that started in the window.
    pub bursts: u32,
    /// Longest loss run seen in the window.
    pub max_burst: u32,
}

impl LossSummary {
    /// Outcomes in the window.
    pub fn samples(&self) -> u32 {
        self.received.saturating_add(self.lost)
    }

    /// Fraction lost, 0 with no samples.
    pub fn rate(&self) -> f64 {
        let n = self.samples();
        if n == 0 {
            0.0
        } else {
            f64::from(self.lost) / f64::from(n)
        }
    }

    /// Mean length of a loss run, 0 with no loss.
    pub fn mean_burst(&self) -> f64 {
        if self.bursts == 0 {
            0.0
        } else {
            f64::from(self.lost) / f64::from(self.bursts)
        }
    }

    /// The upper end of the one-sided confidence interval on the loss rate, with `z`
    /// standard deviations (Wilson score interval): what the loss could still be,
    /// given this few samples. 1 with no samples.
    pub fn rate_upper(&self, z: f64) -> f64 {
        wilson(self.lost, self.samples(), z).1
    }

    /// The lower end of the same interval: what the loss is at least. 0 with no
    /// samples.
    pub fn rate_lower(&self, z: f64) -> f64 {
        wilson(self.lost, self.samples(), z).0
    }
}

/// The Wilson score interval's upper bound for `lost` of `n` with `z` deviations.
pub fn wilson_upper(lost: u32, n: u32, z: f64) -> f64 {
    wilson(lost, n, z).1
}

/// The Wilson score interval (lower, upper) for `lost` of `n` with `z` deviations;
/// (0, 1) with no samples.
pub fn wilson(lost: u32, n: u32, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = f64::from(n);
    let p = f64::from(lost) / n;
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    let scale = 1.0 + z2 / n;
    (
        ((centre - spread) / scale).clamp(0.0, 1.0),
        ((centre + spread) / scale).clamp(0.0, 1.0),
    )
}

impl LossWindow {
    fn bucket(&mut self, now: Time) -> &mut Bucket {
        let slot = now.as_micros() / BUCKET_US;
        let b = &mut self.buckets[(slot % LOSS_BUCKETS as u64) as usize];
        if b.slot != slot {
            *b = Bucket {
                slot,
                ..Bucket::default()
            };
        }
        b
    }

    /// Records `n` deliveries (ending any loss run).
    pub fn record_received(&mut self, now: Time, n: u32) {
        if n == 0 {
            return;
        }
        self.run = 0;
        self.total_received += u64::from(n);
        let b = self.bucket(now);
        b.received = b.received.saturating_add(n);
    }

    /// Records `n` consecutive losses, continuing the loss run in progress.
    pub fn record_lost(&mut self, now: Time, n: u32) {
        if n == 0 {
            return;
        }
        let new_burst = self.run == 0;
        self.run = self.run.saturating_add(n);
        self.total_lost += u64::from(n);
        let run = self.run;
        let b = self.bucket(now);
        b.lost = b.lost.saturating_add(n);
        if new_burst {
            b.bursts += 1;
        }
        b.max_burst = b.max_burst.max(run);
    }

    /// The figures of the last [`LOSS_WINDOW`] at `now`.
    pub fn summary(&self, now: Time) -> LossSummary {
        let current = now.as_micros() / BUCKET_US;
        let oldest = current.saturating_sub(LOSS_BUCKETS as u64 - 1);
        let mut s = LossSummary::default();
        for b in &self.buckets {
            if b.slot >= oldest && b.slot <= current {
                s.received = s.received.saturating_add(b.received);
                s.lost = s.lost.saturating_add(b.lost);
                s.bursts = s.bursts.saturating_add(b.bursts);
                s.max_burst = s.max_burst.max(b.max_burst);
            }
        }
        // A run that began before the window still counts as one burst, and only
        // its part inside the window counts towards its length.
        if s.lost > 0 {
            s.bursts = s.bursts.max(1);
        }
        s.max_burst = s.max_burst.min(s.lost);
        s
    }

    /// Deliveries recorded since the start.
    pub fn total_received(&self) -> u64 {
        self.total_received
    }

    /// Losses recorded since the start.
    pub fn total_lost(&self) -> u64 {
        self.total_lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn rtt_follows_rfc6298() {
        let mut e = RttEstimator::default();
        let t = Time::from_secs(100);
        assert!(e.smoothed().is_none());
        e.on_sample(t, ms(100));
        assert_eq!(e.smoothed(), Some(ms(100)));
        assert_eq!(e.variation(), ms(50));
        e.on_sample(t, ms(200));
        // srtt = 7/8 * 100 + 1/8 * 200 = 112.5; rttvar = 3/4 * 50 + 1/4 * 100 = 62.5
        assert_eq!(e.smoothed(), Some(Duration::from_micros(112_500)));
        assert_eq!(e.variation(), Duration::from_micros(62_500));
        assert!(!e.on_sample(t, Duration::from_secs(11)));
        assert_eq!(e.count(), 2);
    }

    #[test]
    fn rtt_min_is_windowed_and_percentiles_are_nearest_rank() {
        let mut e = RttEstimator::default();
        let t0 = Time::from_secs(100);
        e.on_sample(t0, ms(10));
        for i in 1..=10 {
            e.on_sample(t0 + Duration::from_secs(i), ms(50 + i));
        }
        assert_eq!(e.min(t0 + Duration::from_secs(5)), Some(ms(10)));
        // Eleven seconds on, the 10 ms sample is out of the window.
        assert_eq!(e.min(t0 + Duration::from_secs(11)), Some(ms(51)));
        assert_eq!(e.percentile(0.0), Some(ms(10)));
        assert_eq!(e.percentile(1.0), Some(ms(60)));
        // 11 samples: median is the 6th smallest = 55.
        assert_eq!(e.percentile(0.5), Some(ms(55)));
    }

    #[test]
    fn jitter_is_zero_for_constant_transit_and_tracks_alternating_delay() {
        let mut j = JitterEstimator::default();
        let t0 = Time::from_secs(1);
        for i in 0..100u64 {
            j.on_arrival(
                (i * 20_000) as i64,
                t0 + Duration::from_micros(i * 20_000 + 30_000),
            );
        }
        assert_eq!(j.jitter_us(), 0);
        // Transit alternating between 30 and 40 ms: |D| = 10 ms each time, so J
        // converges to 10 ms.
        let mut j = JitterEstimator::default();
        for i in 0..1000u64 {
            let transit = if i % 2 == 0 { 30_000 } else { 40_000 };
            j.on_arrival(
                (i * 20_000) as i64,
                t0 + Duration::from_micros(i * 20_000 + transit),
            );
        }
        assert!(
            (9_900..=10_000).contains(&j.jitter_us()),
            "{}",
            j.jitter_us()
        );
    }

    #[test]
    fn loss_window_counts_bursts_and_ages_out() {
        let mut w = LossWindow::default();
        let t0 = Time::from_secs(1000);
        // 90 received, a burst of 3, 5 received, a burst of 2.
        w.record_received(t0, 90);
        w.record_lost(t0, 2);
        w.record_lost(t0, 1);
        w.record_received(t0, 5);
        w.record_lost(t0, 2);
        let s = w.summary(t0);
        assert_eq!((s.received, s.lost, s.bursts, s.max_burst), (95, 5, 2, 3));
        assert!((s.rate() - 0.05).abs() < 1e-12);
        assert!((s.mean_burst() - 2.5).abs() < 1e-12);
        // Still in the window 9.5 s later, gone after 10 s.
        assert_eq!(w.summary(t0 + ms(9_400)).lost, 5);
        assert_eq!(w.summary(t0 + ms(10_000)).samples(), 0);
        assert_eq!(w.total_lost(), 5);
    }

    #[test]
    fn wilson_bound_shrinks_with_samples() {
        assert_eq!(wilson_upper(0, 0, 1.645), 1.0);
        let few = wilson_upper(0, 40, 1.645);
        let many = wilson_upper(0, 500, 1.645);
        assert!(few > 0.05 && few < 0.07, "{few}");
        assert!(many < 0.006, "{many}");
        let mid = wilson_upper(15, 500, 1.645);
        assert!(mid > 0.04 && mid < 0.05, "{mid}");
        let (lo, hi) = wilson(15, 500, 1.645);
        assert!(lo > 0.015 && lo < 0.03 && hi == mid, "{lo}");
        assert_eq!(wilson(0, 100, 1.645).0, 0.0);
    }
}
