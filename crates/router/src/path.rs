//! One path of a call: its estimators, its liveness, and the receiving side that
//! builds [`Report`]s about it.

use std::time::Duration;

use peercall_wire::Time;
use peercall_wire::frame::{Probe, ProbeAck, Report};

use crate::estimator::{JitterEstimator, LossSummary, LossWindow, RttEstimator};
use crate::score::{PathQuality, mos};
use crate::selector::PathView;
use crate::{PathId, PathKind};

/// The RTT assumed before a path has a sample: a continental round trip, so the
/// liveness timers are neither hair-trigger nor slow before the first measurement.
pub const INITIAL_RTT: Duration = Duration::from_millis(100);

/// A path whose answers stopped is silent after this many RTTs...
pub const SILENCE_RTT_FACTOR: u32 = 3;
/// ...or after this long, whichever is longer: the bound for leaving a dead
/// active path, max(3 × RTT, 150 ms). 150 ms is 7 frames of a peer's media or 5 of
/// its liveness reports, so random loss of a few percent never trips it.
pub const SILENCE_FLOOR: Duration = Duration::from_millis(150);

/// An answer to a send (the peer's media, a report, a probe ack) normally comes
/// within one RTT plus the peer's report pacing; a send counts as unanswered only
/// after this many RTTs...
pub const ANSWER_GRACE_RTT_FACTOR: u32 = 2;
/// ...or this long, whichever is longer. It keeps an idle path that is probed only
/// every [`crate::router::PROBE_INTERVAL_WARM`] from looking silent between probes,
/// and is below [`SILENCE_FLOOR`] by more than a frame, so on a path carrying media
/// it never delays silence past max(3 × RTT, 150 ms) from the last packet heard.
pub const ANSWER_GRACE_FLOOR: Duration = Duration::from_millis(100);

/// The active path is suspect (and redundancy starts) after this many RTTs without
/// an answer...
pub const SUSPECT_RTT_FACTOR: f64 = 1.5;
/// ...or this long, whichever is longer: three frame intervals; the peer's media or
/// liveness reports normally arrive every 20 to 40 ms, so two or three losses in a
/// row are needed to reach it.
pub const SUSPECT_FLOOR: Duration = Duration::from_millis(60);

/// The peer's media normally arrives on the active path every frame interval; the
/// path is *quiet* (an early warning, cheaper to act on than suspect: a second copy
/// of the media starts, see [`crate::selector::QUIET_LINGER`]) when its media has
/// stopped for two frame intervals plus a jitter margin. Two frames in a row must be
/// lost to reach it: at 5 % random loss once per 400 frames (8 s).
pub const QUIET_FRAMES: u32 = 2;
/// The jitter margin on top of [`QUIET_FRAMES`]: this many times the path's inbound
/// RFC 3550 jitter...
pub const QUIET_JITTER_FACTOR: u32 = 3;
/// ...and at least this much, so a path with no measured jitter is not hair-trigger
/// (half a frame interval).
pub const QUIET_MARGIN_FLOOR: Duration = Duration::from_millis(10);
/// One frame interval of the peer's media.
pub const FRAME_INTERVAL: Duration = Duration::from_millis(20);
/// Quiet applies only while the peer's media was flowing on the path: its last frame
/// came within this of the last packet heard (a path carrying only reports or probes
/// has no cadence to miss).
pub const QUIET_STREAM_GAP: Duration = Duration::from_millis(100);

/// Reports on a path carrying our media come at least every
/// [`STATS_REPORT_INTERVAL`]; none for this long while we send means our direction
/// of the path is dead even if the peer's packets still reach us (a one-way
/// failure): five reports missed in a row.
pub const FEEDBACK_TIMEOUT: Duration = Duration::from_secs(1);

/// A receiver reports on a path at least this often while media arrives on it, so
/// the sender's loss, jitter and RTT figures stay fresh.
pub const STATS_REPORT_INTERVAL: Duration = Duration::from_millis(200);

/// When we have sent nothing on a path for this long while the peer's media
/// arrives on it, the next arrival is answered with a report, so the sender hears
/// from its active path every other frame or so and can tell silence within
/// [`SILENCE_FLOOR`] (five of these per 150 ms must all be lost to fake it).
pub const LIVENESS_REPORT_INTERVAL: Duration = Duration::from_millis(30);

/// The loss figures of a path come from its media reports once the window holds this
/// many outcomes (one second of frames); below that, from probes.
pub const MIN_MEDIA_SAMPLES: u32 = 50;

/// Standard deviations in the loss confidence interval (one-sided 95 %): a
/// candidate path must be no worse than the active one even with its loss at the
/// upper end and the active path's at the lower end, so a run of luck on a sparsely
/// measured path, or the noise between two equal paths, does not cause a switch.
pub const LOSS_CONFIDENCE_Z: f64 = 1.645;

/// A jitter figure from the peer's reports is used while it is this recent.
pub const REPORT_FRESH: Duration = Duration::from_secs(2);

/// Send times of recent media frames kept per path, to turn a report's highest
/// sequence number into an RTT sample: five seconds of frames, longer than any
/// report takes.
pub const SENT_RING: usize = 256;

/// Probes in flight per path. At the fastest probe rate (suspect path) that covers
/// 320 ms, more than a probe waits for its answer on any live path.
pub const PROBES_IN_FLIGHT: usize = 8;

/// A probe with no answer for this many RTTs counts as lost...
pub const PROBE_TIMEOUT_RTT_FACTOR: u32 = 3;
/// ...or after this long, whichever is longer.
pub const PROBE_TIMEOUT_FLOOR: Duration = Duration::from_secs(1);

/// A path's loss figures for its score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LossEstimate {
    pub rate: f64,
    /// Ends of the confidence interval ([`LOSS_CONFIDENCE_Z`]).
    pub lower: f64,
    pub upper: f64,
    pub mean_burst: f64,
    pub from_media: bool,
}

/// What happened to an incoming media frame on its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arrival {
    /// It raised the path's highest sequence number.
    pub newest: bool,
    /// It ended a gap (frames before it on this path were lost).
    pub gap_closed: bool,
}

/// The receiving side of one path: per-path sequence numbers, RFC 3550 jitter,
/// loss and bursts of what the peer sends on it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Inbound {
    /// Extended highest path sequence number; path sequence numbers start at 0.
    highest: Option<u64>,
    received: u64,
    pub jitter: JitterEstimator,
    pub loss: LossWindow,
    pub last_report: Option<Time>,
    pub report_pending: bool,
    /// When the peer's last media frame arrived on this path.
    pub last_arrival: Option<Time>,
}

impl Inbound {
    pub fn on_media(&mut self, now: Time, path_seq: u32, timestamp: u32) -> Arrival {
        let none = Arrival {
            newest: false,
            gap_closed: false,
        };
        let ext = match self.highest {
            None => u64::from(path_seq),
            Some(h) => {
                let delta = i64::from(path_seq.wrapping_sub(h as u32) as i32);
                match u64::try_from(h as i64 + delta) {
                    Ok(e) => e,
                    Err(_) => return none,
                }
            }
        };
        self.last_arrival = Some(now);
        // 48 kHz samples to microseconds: 1e6 / 48000 = 125 / 6. The estimator only
        // takes differences, so the stream's timestamp origin does not matter; the
        // 32-bit wrap (after 24 hours) costs one jitter sample.
        self.jitter.on_arrival(i64::from(timestamp) * 125 / 6, now);
        match self.highest {
            Some(h) if ext == h => none, // the same frame twice on one path
            Some(h) if ext < h => {
                // Late (reordered): it counts as received, not as a new gap.
                self.received += 1;
                none
            }
            _ => {
                let gap = ext - self.highest.map_or(0, |h| h + 1);
                let gap32 = u32::try_from(gap).unwrap_or(u32::MAX);
                self.loss.record_lost(now, gap32);
                self.loss.record_received(now, 1);
                self.received += 1;
                self.highest = Some(ext);
                Arrival {
                    newest: true,
                    gap_closed: gap > 0,
                }
            }
        }
    }

    /// RFC 3550's cumulative lost: expected minus received, clamped.
    fn cumulative_lost(&self) -> u32 {
        let expected = self.highest.map_or(0, |h| h + 1);
        u32::try_from(expected.saturating_sub(self.received)).unwrap_or(u32::MAX)
    }

    pub fn report(&self, path: PathId) -> Report {
        Report {
            path,
            highest_seq: self.highest.unwrap_or(0) as u32,
            lost: self.cumulative_lost(),
            jitter_us: self.jitter.jitter_us(),
        }
    }

    pub fn received(&self) -> u64 {
        self.received
    }
}

/// Why an input for a path was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// A probe ack that answers no probe in flight.
    UnknownProbe,
    /// A report about frames never sent on the path.
    BogusReport,
}

#[derive(Debug, Clone)]
pub(crate) struct Path {
    pub id: PathId,
    pub kind: PathKind,
    pub added: Time,

    // Liveness.
    pub last_heard: Option<Time>,
    pub first_heard: Option<Time>,
    /// The first media frame or probe sent after the last packet heard.
    pub answer_pending_since: Option<Time>,
    /// The first media frame or probe sent after the last feedback (report or ack).
    pub feedback_pending_since: Option<Time>,
    pub last_feedback: Option<Time>,
    pub last_sent: Option<Time>,

    pub rtt: RttEstimator,

    // Our media on this path.
    next_path_seq: u32,
    sent_ring: [(u32, Time); SENT_RING],
    pub media_sent: u64,
    /// (highest, lost) of the last report; (u32::MAX, 0) means "before frame 0".
    report_base: (u32, u32),
    pub reports_received: u64,
    pub media_loss: LossWindow,
    pub remote_jitter: Option<(Time, u32)>,

    // Probes.
    next_probe_seq: u32,
    in_flight: [Option<(u32, u64)>; PROBES_IN_FLIGHT],
    pub last_probe: Option<Time>,
    pub probe_loss: LossWindow,
    pub probes_sent: u64,
    pub probes_acked: u64,
    /// Jitter of the peer's probes arriving on this path.
    pub probe_jitter: JitterEstimator,

    pub inbound: Inbound,

    /// Since when every probe was answered and the path never went silent.
    pub clean_since: Option<Time>,

    /// Maintained by the router from the last selection.
    pub warm: bool,
}

impl Path {
    pub fn new(id: PathId, kind: PathKind, now: Time) -> Path {
        Path {
            id,
            kind,
            added: now,
            last_heard: None,
            first_heard: None,
            answer_pending_since: None,
            feedback_pending_since: None,
            last_feedback: None,
            last_sent: None,
            rtt: RttEstimator::default(),
            next_path_seq: 0,
            sent_ring: [(u32::MAX, Time::ZERO); SENT_RING],
            media_sent: 0,
            report_base: (u32::MAX, 0),
            reports_received: 0,
            media_loss: LossWindow::default(),
            remote_jitter: None,
            next_probe_seq: 0,
            in_flight: [None; PROBES_IN_FLIGHT],
            last_probe: None,
            probe_loss: LossWindow::default(),
            probes_sent: 0,
            probes_acked: 0,
            probe_jitter: JitterEstimator::default(),
            inbound: Inbound::default(),
            clean_since: None,
            warm: true,
        }
    }

    /// The RTT the timers use: the smoothed one, or [`INITIAL_RTT`].
    pub fn rtt_or_initial(&self) -> Duration {
        self.rtt.smoothed().unwrap_or(INITIAL_RTT)
    }

    pub fn silence_threshold(&self) -> Duration {
        (self.rtt_or_initial() * SILENCE_RTT_FACTOR).max(SILENCE_FLOOR)
    }

    fn answer_grace(&self) -> Duration {
        (self.rtt_or_initial() * ANSWER_GRACE_RTT_FACTOR).max(ANSWER_GRACE_FLOOR)
    }

    fn suspect_threshold(&self) -> Duration {
        self.rtt_or_initial()
            .mul_f64(SUSPECT_RTT_FACTOR)
            .max(SUSPECT_FLOOR)
    }

    /// When the path turns silent if nothing is heard, or None if nothing is
    /// awaited (or it was never heard: then it is unvalidated, not silent).
    pub fn silent_at(&self) -> Option<Time> {
        let heard = self.last_heard?;
        let mut at = self
            .answer_pending_since
            .map(|sent| (heard + self.silence_threshold()).max(sent + self.answer_grace()));
        if let Some(sent) = self.feedback_pending_since {
            let one_way = sent + FEEDBACK_TIMEOUT;
            at = Some(at.map_or(one_way, |a| a.min(one_way)));
        }
        at
    }

    fn quiet_threshold(&self) -> Duration {
        let margin =
            Duration::from_micros(u64::from(self.inbound.jitter.jitter_us())) * QUIET_JITTER_FACTOR;
        FRAME_INTERVAL * QUIET_FRAMES + margin.max(QUIET_MARGIN_FLOOR)
    }

    /// When the path turns quiet (the peer's media stopped arriving on it while we
    /// await an answer), if nothing is heard.
    pub fn quiet_at(&self) -> Option<Time> {
        let heard = self.last_heard?;
        self.answer_pending_since?;
        let arrival = self.inbound.last_arrival?;
        if heard.saturating_since(arrival) > QUIET_STREAM_GAP {
            return None;
        }
        Some(heard + self.quiet_threshold())
    }

    /// When the path becomes suspect if nothing is heard.
    pub fn suspect_at(&self) -> Option<Time> {
        let heard = self.last_heard?;
        let sent = self.answer_pending_since?;
        // No answer can come sooner than one RTT after the send.
        Some((heard + self.suspect_threshold()).max(sent + self.rtt_or_initial()))
    }

    pub fn on_heard(&mut self, now: Time) {
        self.first_heard.get_or_insert(now);
        self.clean_since.get_or_insert(now);
        self.last_heard = Some(now);
        self.answer_pending_since = None;
    }

    fn on_feedback(&mut self, now: Time) {
        self.last_feedback = Some(now);
        self.feedback_pending_since = None;
    }

    /// Something that asks for an answer (media or a probe) was sent.
    fn on_sent_expecting_answer(&mut self, now: Time) {
        self.last_sent = Some(now);
        self.answer_pending_since.get_or_insert(now);
        self.feedback_pending_since.get_or_insert(now);
    }

    /// A packet that asks for no answer (a report, an ack, a keepalive) was sent.
    pub fn on_sent_other(&mut self, now: Time) {
        self.last_sent = Some(now);
    }

    /// Our media frame goes out on this path; returns its path sequence number.
    pub fn on_media_sent(&mut self, now: Time) -> u32 {
        let seq = self.next_path_seq;
        self.next_path_seq = seq.wrapping_add(1);
        self.sent_ring[seq as usize % SENT_RING] = (seq, now);
        self.media_sent += 1;
        self.on_sent_expecting_answer(now);
        seq
    }

    pub fn make_probe(&mut self, now: Time) -> Probe {
        let seq = self.next_probe_seq;
        self.next_probe_seq = seq.wrapping_add(1);
        let sent_at = now.as_micros();
        let slot = seq as usize % PROBES_IN_FLIGHT;
        if let Some((_, old)) = self.in_flight[slot]
            && self.counts_as_lost(old)
        {
            // Its slot is reused before it was answered or timed out: lost.
            self.probe_loss.record_lost(now, 1);
            self.probe_lost_since_clean(old);
        }
        self.in_flight[slot] = Some((seq, sent_at));
        self.last_probe = Some(now);
        self.probes_sent += 1;
        self.on_sent_expecting_answer(now);
        Probe {
            path: self.id,
            seq,
            sent_at,
        }
    }

    /// A probe sent at `sent_at` (µs) was lost: the path is not clean any more,
    /// unless the probe went out before its clean run began (sent into an outage
    /// that has since ended).
    fn probe_lost_since_clean(&mut self, sent_at: u64) {
        if self.clean_since.is_some_and(|c| sent_at >= c.as_micros()) {
            self.clean_since = None;
        }
    }

    /// A probe sent at `sent_at` (µs) and never answered counts as lost only if the
    /// path had been heard from before it was sent: a path not open yet (hole
    /// punching) is not lossy, and its early probes would only delay a good score.
    fn counts_as_lost(&self, sent_at: u64) -> bool {
        self.first_heard.is_some_and(|t| sent_at >= t.as_micros())
    }

    pub fn probe_timeout(&self) -> Duration {
        (self.rtt_or_initial() * PROBE_TIMEOUT_RTT_FACTOR).max(PROBE_TIMEOUT_FLOOR)
    }

    /// Counts probes unanswered for [`Path::probe_timeout`] as lost.
    pub fn expire_probes(&mut self, now: Time) {
        let timeout = u64::try_from(self.probe_timeout().as_micros()).unwrap_or(u64::MAX);
        let first_heard = self.first_heard;
        for slot in &mut self.in_flight {
            if let Some((_, sent_at)) = *slot
                && now.as_micros().saturating_sub(sent_at) >= timeout
            {
                *slot = None;
                if first_heard.is_some_and(|t| sent_at >= t.as_micros()) {
                    self.probe_loss.record_lost(now, 1);
                    if self.clean_since.is_some_and(|c| sent_at >= c.as_micros()) {
                        self.clean_since = None;
                    }
                }
            }
        }
    }

    /// The earliest time a probe in flight expires.
    pub fn probe_expiry(&self) -> Option<Time> {
        let oldest = self.in_flight.iter().flatten().map(|&(_, t)| t).min()?;
        Some(Time::from_micros(oldest) + self.probe_timeout())
    }

    pub fn on_probe(&mut self, now: Time, probe: &Probe) {
        self.on_heard(now);
        self.probe_jitter
            .on_arrival(i64::try_from(probe.sent_at).unwrap_or(i64::MAX), now);
    }

    pub fn on_probe_ack(&mut self, now: Time, ack: &ProbeAck) -> Result<Duration, Rejected> {
        let slot = ack.seq as usize % PROBES_IN_FLIGHT;
        match self.in_flight[slot] {
            Some((seq, sent_at)) if seq == ack.seq && sent_at == ack.echo => {
                self.in_flight[slot] = None;
            }
            _ => return Err(Rejected::UnknownProbe),
        }
        self.on_heard(now);
        self.on_feedback(now);
        self.probes_acked += 1;
        self.probe_loss.record_received(now, 1);
        let rtt = now
            .saturating_since(Time::from_micros(ack.echo))
            .saturating_sub(Duration::from_micros(u64::from(ack.held_us)));
        self.rtt.on_sample(now, rtt);
        Ok(rtt)
    }

    pub fn on_report(&mut self, now: Time, report: &Report) -> Result<(), Rejected> {
        self.on_heard(now);
        // The newest frame we sent has sequence number next - 1; a report about a
        // later one is bogus.
        let newest_sent = self.next_path_seq.wrapping_sub(1);
        if self.media_sent == 0 || (newest_sent.wrapping_sub(report.highest_seq) as i32) < 0 {
            return Err(Rejected::BogusReport);
        }
        self.reports_received += 1;
        self.remote_jitter = Some((now, report.jitter_us));
        let (base_high, base_lost) = self.report_base;
        let expected = report.highest_seq.wrapping_sub(base_high) as i32;
        if expected <= 0 {
            // A stale or reordered report: nothing new.
            return Ok(());
        }
        self.on_feedback(now);
        let expected = expected.unsigned_abs();
        let lost = (report.lost.wrapping_sub(base_lost) as i32).clamp(0, expected as i32 - 1);
        let lost = lost.unsigned_abs();
        // The receiver reports right after a gap closes, so the losses since the last
        // report form one run just before the newest frame.
        self.media_loss.record_received(now, expected - lost - 1);
        self.media_loss.record_lost(now, lost);
        self.media_loss.record_received(now, 1);
        self.report_base = (report.highest_seq, report.lost);
        let (seq, sent) = self.sent_ring[report.highest_seq as usize % SENT_RING];
        if seq == report.highest_seq && sent <= now {
            self.rtt.on_sample(now, now.saturating_since(sent));
        }
        Ok(())
    }

    /// The loss figures the score uses: from media reports when there are enough,
    /// else from probes (round-trip loss turned into one-way loss assuming both
    /// directions lose alike), and whether they came from media.
    pub fn loss_for_score(&self, now: Time) -> LossEstimate {
        let media = self.media_loss.summary(now);
        if media.samples() >= MIN_MEDIA_SAMPLES {
            return LossEstimate {
                rate: media.rate(),
                lower: media.rate_lower(LOSS_CONFIDENCE_Z),
                upper: media.rate_upper(LOSS_CONFIDENCE_Z),
                mean_burst: media.mean_burst(),
                from_media: true,
            };
        }
        let probes = self.probe_loss.summary(now);
        let one_way = |round_trip: f64| 1.0 - (1.0 - round_trip.clamp(0.0, 1.0)).sqrt();
        LossEstimate {
            rate: one_way(probes.rate()),
            lower: one_way(probes.rate_lower(LOSS_CONFIDENCE_Z)),
            upper: one_way(probes.rate_upper(LOSS_CONFIDENCE_Z)),
            // Probes are too sparse to see bursts of 20 ms frames.
            mean_burst: 1.0,
            from_media: false,
        }
    }

    /// Jitter for the score: the peer's view of our direction from its reports,
    /// else the jitter of what arrives on the path, else half the RTT variation.
    pub fn jitter_for_score(&self, now: Time) -> Duration {
        if let Some((at, j)) = self.remote_jitter
            && now.saturating_since(at) <= REPORT_FRESH
        {
            return Duration::from_micros(u64::from(j));
        }
        if self.inbound.jitter.is_measured() {
            return Duration::from_micros(u64::from(self.inbound.jitter.jitter_us()));
        }
        if self.probe_jitter.is_measured() {
            return Duration::from_micros(u64::from(self.probe_jitter.jitter_us()));
        }
        self.rtt.variation() / 2
    }

    pub fn quality(&self, now: Time) -> (PathQuality, LossEstimate) {
        let loss = self.loss_for_score(now);
        let q = PathQuality {
            rtt: self.rtt_or_initial(),
            jitter: self.jitter_for_score(now),
            loss: loss.rate,
            mean_burst: loss.mean_burst,
        };
        (q, loss)
    }

    pub fn view(&self, now: Time) -> PathView {
        let (q, loss) = self.quality(now);
        let r = q.r_factor();
        let r_pessimistic = PathQuality {
            loss: loss.upper.max(q.loss),
            ..q
        }
        .r_factor();
        let r_optimistic = PathQuality {
            loss: loss.lower.min(q.loss),
            ..q
        }
        .r_factor();
        let silent = self.silent_at().is_some_and(|t| now >= t);
        let suspect = silent || self.suspect_at().is_some_and(|t| now >= t);
        let quiet = suspect || self.quiet_at().is_some_and(|t| now >= t);
        PathView {
            id: self.id,
            kind: self.kind,
            validated: self.last_heard.is_some(),
            silent,
            suspect,
            quiet,
            clean_since: if silent { None } else { self.clean_since },
            last_heard: self.last_heard,
            rtt: self.rtt.smoothed(),
            loss: q.loss,
            r,
            r_pessimistic,
            r_optimistic,
            measured_by_media: loss.from_media,
        }
    }

    pub fn media_summary(&self, now: Time) -> LossSummary {
        self.media_loss.summary(now)
    }

    pub fn mos(&self, now: Time) -> (f64, f64) {
        let r = self.quality(now).0.r_factor();
        (r, mos(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_counts_gaps_late_frames_and_reports() {
        let mut i = Inbound::default();
        let t = Time::from_secs(5);
        for s in [0u32, 1, 2, 5, 6] {
            i.on_media(t, s, s * 960);
        }
        let r = i.report(3);
        assert_eq!((r.path, r.highest_seq, r.lost), (3, 6, 2));
        // Frame 3 arrives late: one fewer lost, not a new highest.
        let a = i.on_media(t, 3, 3 * 960);
        assert!(!a.newest);
        assert_eq!(i.report(3).lost, 1);
        let a = i.on_media(t, 9, 9 * 960);
        assert!(a.newest && a.gap_closed);
        let s = i.loss.summary(t);
        assert_eq!((s.lost, s.bursts, s.max_burst), (4, 2, 2));
    }

    #[test]
    fn reports_turn_into_loss_runs_and_rtt() {
        let t0 = Time::from_secs(10);
        let mut p = Path::new(1, PathKind::Direct, t0);
        for i in 0..10u64 {
            p.on_media_sent(t0 + Duration::from_millis(20 * i));
        }
        let now = t0 + Duration::from_millis(180 + 50);
        p.on_report(
            now,
            &Report {
                path: 1,
                highest_seq: 9,
                lost: 3,
                jitter_us: 1500,
            },
        )
        .expect("valid report");
        let s = p.media_loss.summary(now);
        assert_eq!((s.received, s.lost, s.bursts, s.max_burst), (7, 3, 1, 3));
        assert_eq!(p.rtt.smoothed(), Some(Duration::from_millis(50)));
        assert_eq!(
            p.on_report(
                now,
                &Report {
                    path: 1,
                    highest_seq: 10,
                    lost: 0,
                    jitter_us: 0
                }
            ),
            Err(Rejected::BogusReport)
        );
    }
}
