//! The adaptive jitter buffer: reorders, de-duplicates and schedules Opus packets.
//!
//! It works on packets only and never decodes; [`crate::Receiver`] pairs it with a
//! decoder. The owner calls [`JitterBuffer::push`] for every received media frame
//! (both copies when a frame is sent on two paths: the second is a duplicate) and
//! [`JitterBuffer::pull`] once per 20 ms of audio it needs. `pull` answers what to
//! play: a packet, the packet after a run of missing frames (whose in-band FEC or
//! DRED can rebuild them), concealment, comfort noise during DTX, or an inserted
//! frame while the buffer grows.
//!
//! # Delay
//!
//! Each first copy's *transit* (arrival time minus its timestamp in µs) is kept for
//! the last [`JitterConfig::window`] packets. Against the fastest of them, a packet's
//! transit excess is its inter-arrival deviation: how much later than the best case
//! it came. The target delay is a high percentile of that deviation plus
//! [`JitterConfig::recovery_frames`] frames (one by default), so that when a frame is
//! due the *next* packet has normally arrived too and can stand in through its FEC;
//! it is clamped to `min_delay..=max_delay`.
//!
//! The playout delay `D` is how long after its best-case arrival the frame due now is
//! played. `pull` keeps `D` in `target..target + 20 ms` by dropping or inserting one
//! frame, and only where nobody hears it: during silence (the caller says whether the
//! last frame it played was silent), in a DTX gap, or just before a talkspurt
//! starts. Only a large mismatch ([`FORCE_GROW_US`], [`FORCE_SHRINK_US`]) adapts in
//! the middle of speech. One more way to grow: when nothing is buffered at a pull,
//! the frame due is concealed but keeps its place, so if it then arrives it is played
//! one frame late instead of being lost.
//!
//! # Memory and invariants
//!
//! Packets live in a fixed ring of [`CAPACITY`] slots indexed by sequence number,
//! allocated once: no allocation per packet, bounded memory whatever arrives. Two
//! consecutive packets more than `CAPACITY` frames ahead of playout restart the
//! buffer (a sender restart or a long outage); a lone one is dropped. A sequence
//! number is played at most once, and the played sequence numbers only grow.

use std::collections::VecDeque;
use std::time::Duration;

use peercall_wire::Time;
use peercall_wire::frame::{MAX_OPUS_PACKET, Media};

use crate::{FRAME_SAMPLES, FRAME_US, MediaError};

/// Packet slots. 64 frames are 1.28 s of audio: more than the largest allowed target
/// delay ([`MAX_DELAY_LIMIT`]) plus reordering.
pub const CAPACITY: usize = 64;

/// Recently seen sequence numbers remembered to tell a duplicate (the same frame on
/// a second path, after the first copy was played) from a late first copy.
const HISTORY: usize = 128;

/// The largest `max_delay` a configuration may ask for: must stay below
/// `CAPACITY` frames so a full target delay of packets fits the ring.
pub const MAX_DELAY_LIMIT: Duration = Duration::from_millis(1000);

/// Grow the buffer even mid-speech when it is this far below target: one inserted
/// concealment frame is better than a run of late losses.
pub const FORCE_GROW_US: i64 = 2 * FRAME_US as i64;

/// Shrink the buffer even mid-speech when it is this far above target, so that a
/// long stretch of speech without pauses still sheds excess delay.
pub const FORCE_SHRINK_US: i64 = 4 * FRAME_US as i64;

/// After this many frames with nothing to play and nothing buffered, playout stops
/// and buffers anew: the next packet starts a fresh talkspurt with a fresh delay.
const IDLE_RESET_FRAMES: u32 = 50;

/// Default [`JitterConfig::recovery_frames`]: one frame, what in-band FEC needs.
pub const DEFAULT_RECOVERY_FRAMES: u32 = 1;

/// The most [`JitterConfig::recovery_frames`]: 200 ms of look-ahead, the default
/// `max_delay`.
pub const MAX_RECOVERY_FRAMES: u32 = 10;

/// Jitter buffer settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JitterConfig {
    /// Lowest target delay. One frame at least, so FEC can be used.
    pub min_delay: Duration,
    /// Highest target delay.
    pub max_delay: Duration,
    /// Percentile of the inter-arrival deviation the target covers, in (0, 1].
    pub percentile: f64,
    /// Number of recent packets the deviation is measured over.
    pub window: usize,
    /// Frames of look-ahead the target keeps on top of the jitter, so that when a
    /// frame is missing at its turn, the packets after it have come and their
    /// redundancy can rebuild it: 1 lets in-band FEC (and DRED) cover a single
    /// lost frame, `n` lets DRED rebuild runs of up to `n` lost frames. Each frame
    /// adds 20 ms of delay.
    pub recovery_frames: u32,
}

impl Default for JitterConfig {
    /// 20..=200 ms, the 95th percentile over the last 250 packets (5 s): long enough
    /// to see a jitter pattern repeat, short enough to relax after a spike.
    fn default() -> Self {
        JitterConfig {
            min_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
            percentile: 0.95,
            window: 250,
            recovery_frames: DEFAULT_RECOVERY_FRAMES,
        }
    }
}

impl JitterConfig {
    /// Checks the settings, naming the first bad one.
    pub fn validate(&self) -> Result<(), MediaError> {
        let bad = |key, reason: &str| {
            Err(MediaError::Config {
                key,
                reason: reason.to_string(),
            })
        };
        if self.min_delay < Duration::from_micros(FRAME_US) {
            return bad("jitter.min_delay", "must be at least one frame (20 ms)");
        }
        if self.max_delay < self.min_delay || self.max_delay > MAX_DELAY_LIMIT {
            return bad("jitter.max_delay", "must be within min_delay..=1000 ms");
        }
        if !(self.percentile > 0.0 && self.percentile <= 1.0) {
            return bad("jitter.percentile", "must be in (0, 1]");
        }
        if !(1..=10_000).contains(&self.window) {
            return bad("jitter.window", "must be 1..=10000 packets");
        }
        if !(1..=MAX_RECOVERY_FRAMES).contains(&self.recovery_frames) {
            return bad("jitter.recovery_frames", "must be 1..=10 frames");
        }
        Ok(())
    }
}

/// What [`JitterBuffer::push`] did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Stored for playout.
    Stored,
    /// Already stored or played (e.g. the copy from a second path); dropped.
    Duplicate,
    /// Its playout time has passed; dropped.
    Late,
    /// Empty, longer than an Opus packet can be, or a lone packet far ahead of the
    /// stream (see [`CAPACITY`]); dropped.
    Invalid,
}

/// What to play for the next 20 ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Playout<'a> {
    /// Playout has not started (or stopped after a long silence): play silence.
    Idle,
    /// Decode this packet.
    Play {
        /// Its stream sequence number.
        seq: u32,
        /// The Opus packet.
        payload: &'a [u8],
        /// How long it waited in the buffer.
        waited: Duration,
    },
    /// Frame `seq` is missing, and so are the `ahead - 1` frames after it, but the
    /// packet after them is here with no DTX gap between: rebuild the frame from
    /// that packet's redundancy (its in-band FEC covers the one frame before it, its
    /// DRED the whole run), or conceal it.
    Recover {
        /// The missing frame.
        seq: u32,
        /// How many frames on the packet is: `1` for the very next one.
        ahead: u32,
        /// The packet after the run of missing frames.
        next: &'a [u8],
    },
    /// Nothing is buffered: the packet is late or lost, or the sender is in DTX
    /// (which one shows when the next packet comes; see
    /// [`JitterStats::dtx_underruns`]). Conceal (libopus turns a DTX gap into
    /// comfort noise).
    Underrun,
    /// A DTX gap: the sender sent nothing, play comfort noise.
    ComfortNoise,
    /// The buffer is growing: play one concealment frame and hold the position.
    Insert,
}

/// Counters and delay figures of one buffer.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct JitterStats {
    /// First copies stored (including ones that later turned out late).
    pub received: u64,
    /// Copies of a frame already stored or played.
    pub duplicate: u64,
    /// First copies that arrived after their playout time: dropped, or played one
    /// frame late behind an underrun.
    pub late: u64,
    /// Frames whose playout time came without the packet (network loss or late).
    pub lost: u64,
    /// Frames dropped to shrink the buffer.
    pub discarded: u64,
    /// Frames inserted to grow the buffer.
    pub inserted: u64,
    /// Empty or oversize payloads, and lone packets far ahead of the stream.
    pub invalid: u64,
    /// Restarts after a jump of more than [`CAPACITY`] frames.
    pub resyncs: u64,
    /// Frames played from a packet.
    pub played: u64,
    /// [`Playout::Underrun`]s answered.
    pub underruns: u64,
    /// Of those, the ones that turned out to be DTX gaps: the next packet played
    /// followed the last one in sequence but jumped ahead in time.
    pub dtx_underruns: u64,
    /// Of those, the ones that turned out to be loss or lateness. Underruns not yet
    /// resolved (at the end of a call that ends in DTX silence) are in neither.
    pub loss_underruns: u64,
    /// How long the last played packet waited in the buffer.
    pub current_delay: Duration,
    /// Sum of the waits of all played packets (for the average).
    pub total_delay: Duration,
    /// The current target delay.
    pub target_delay: Duration,
    /// RFC 3550 §6.4.1 inter-arrival jitter estimate.
    pub jitter: Duration,
}

impl JitterStats {
    /// Average wait of played packets.
    pub fn average_delay(&self) -> Duration {
        match u32::try_from(self.played) {
            Ok(0) => Duration::ZERO,
            Ok(n) => self.total_delay / n,
            Err(_) => Duration::from_secs_f64(self.total_delay.as_secs_f64() / self.played as f64),
        }
    }
}

#[derive(Clone)]
struct Slot {
    /// Extended sequence number, or `None` when free.
    seq: Option<u64>,
    ts: u64,
    arrival: Time,
    flags: u8,
    len: usize,
    data: [u8; MAX_OPUS_PACKET],
}

impl Slot {
    const EMPTY: Slot = Slot {
        seq: None,
        ts: 0,
        arrival: Time::ZERO,
        flags: 0,
        len: 0,
        data: [0; MAX_OPUS_PACKET],
    };
}

/// Extended numbers start here so unwrapping a u32 a little backwards never goes
/// below zero.
const EXT_BASE: u64 = 1 << 32;

/// Converts a 32-bit counter to a 64-bit one, nearest to `reference`.
fn unwrap32(value: u32, reference: u64) -> u64 {
    let delta = i64::from(value.wrapping_sub(reference as u32) as i32);
    reference.saturating_add_signed(delta)
}

/// 48 kHz samples to microseconds.
fn samples_to_us(samples: u64) -> i64 {
    // 1_000_000 / 48_000 = 125 / 6; i64 holds 2^63 µs ≈ 292 000 years.
    i64::try_from(samples.saturating_mul(125) / 6).unwrap_or(i64::MAX)
}

const FRAME: u64 = FRAME_SAMPLES as u64;

/// The adaptive jitter buffer. See the [module documentation](self).
pub struct JitterBuffer {
    config: JitterConfig,
    slots: Box<[Slot]>,
    history: Box<[u64; HISTORY]>,
    /// Whether any packet has been seen (the extended numbering is anchored).
    anchored: bool,
    started: bool,
    /// The next sequence number to play (before start: the lowest seen).
    next_seq: u64,
    /// The 48 kHz timestamp due at the next pull.
    next_ts: u64,
    highest_seq: u64,
    idle_frames: u32,
    last_played: Option<(u64, u64)>,
    /// After a far jump: the sequence number that would confirm it.
    probation: Option<u64>,
    /// Every sequence number below this has had its turn (played, recovered, lost or
    /// dropped); playout never goes back below it.
    floor_seq: u64,
    pending_underruns: u64,
    transits: VecDeque<i64>,
    scratch: Vec<i64>,
    min_transit: i64,
    target_us: i64,
    last_transit: Option<i64>,
    jitter_us: f64,
    stats: JitterStats,
}

impl std::fmt::Debug for JitterBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JitterBuffer")
            .field("started", &self.started)
            .field("next_seq", &self.next_seq)
            .field("buffered", &self.buffered())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// What the frame due next looks like.
enum Next {
    /// Its packet is here.
    Present { ts: u64, talkspurt: bool },
    /// A DTX gap before the next packet.
    Gap,
    /// Missing and due now; the first packet buffered after it is `ahead` on.
    Missing { ahead: u64 },
    /// Missing and its time already passed (concealed earlier): skip it.
    Passed,
    /// Nothing buffered at all.
    Unknown,
}

impl JitterBuffer {
    /// A buffer with `config`, validated.
    pub fn new(config: JitterConfig) -> Result<Self, MediaError> {
        config.validate()?;
        let min_us = i64::try_from(config.min_delay.as_micros()).unwrap_or(i64::MAX);
        Ok(JitterBuffer {
            config,
            slots: vec![Slot::EMPTY; CAPACITY].into_boxed_slice(),
            history: Box::new([u64::MAX; HISTORY]),
            anchored: false,
            started: false,
            next_seq: 0,
            next_ts: 0,
            highest_seq: 0,
            idle_frames: 0,
            last_played: None,
            probation: None,
            floor_seq: 0,
            pending_underruns: 0,
            transits: VecDeque::with_capacity(config.window),
            scratch: Vec::with_capacity(config.window),
            min_transit: 0,
            target_us: min_us,
            last_transit: None,
            jitter_us: 0.0,
            stats: JitterStats {
                target_delay: config.min_delay,
                ..JitterStats::default()
            },
        })
    }

    /// Counters and delays so far.
    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// The 48 kHz timestamp the next pull will play, once playout has started.
    pub fn next_timestamp(&self) -> Option<u32> {
        self.started.then_some(self.next_ts as u32)
    }

    /// Packets held now.
    pub fn buffered(&self) -> usize {
        self.slots.iter().filter(|s| s.seq.is_some()).count()
    }

    /// Adds a received media frame.
    pub fn push_media(&mut self, now: Time, media: &Media<'_>) -> Pushed {
        self.push(now, media.seq, media.timestamp, media.flags, media.payload)
    }

    /// Adds a received packet: stream `seq`, 48 kHz `timestamp`, media `flags`.
    pub fn push(
        &mut self,
        now: Time,
        seq: u32,
        timestamp: u32,
        flags: u8,
        payload: &[u8],
    ) -> Pushed {
        if payload.is_empty() || payload.len() > MAX_OPUS_PACKET {
            self.stats.invalid += 1;
            return Pushed::Invalid;
        }
        if !self.anchored {
            self.anchored = true;
            self.next_seq = EXT_BASE + u64::from(seq);
            self.highest_seq = self.next_seq;
            self.next_ts = EXT_BASE + u64::from(timestamp);
        }
        let ext_seq = unwrap32(seq, self.next_seq);
        let ext_ts = unwrap32(timestamp, self.next_ts);

        if ext_seq < self.next_seq {
            // Before playout (re)starts, an earlier frame may still come first, but
            // never one at or before a frame already played.
            let reorder_before_start = !self.started
                && ext_seq >= self.floor_seq
                && self.highest_seq - ext_seq < CAPACITY as u64;
            if !reorder_before_start {
                return self.too_old(now, ext_seq, ext_ts);
            }
            self.next_seq = ext_seq;
        } else if ext_seq >= self.next_seq + CAPACITY as u64 {
            // RFC 3550 A.1's probation: a jump this far is believed (a sender restart,
            // a long outage) only when the next packet continues from it; a lone
            // stray packet is dropped.
            if self.probation != Some(ext_seq) {
                self.probation = Some(ext_seq + 1);
                self.stats.invalid += 1;
                return Pushed::Invalid;
            }
            self.resync(ext_seq, ext_ts);
        }
        self.probation = None;

        let slot = &mut self.slots[(ext_seq % CAPACITY as u64) as usize];
        if slot.seq == Some(ext_seq) {
            self.stats.duplicate += 1;
            return Pushed::Duplicate;
        }
        slot.seq = Some(ext_seq);
        slot.ts = ext_ts;
        slot.arrival = now;
        slot.flags = flags;
        slot.len = payload.len();
        slot.data[..payload.len()].copy_from_slice(payload);
        self.highest_seq = self.highest_seq.max(ext_seq);
        self.history[(ext_seq % HISTORY as u64) as usize] = ext_seq;
        self.stats.received += 1;
        self.observe_transit(now, ext_ts);
        Pushed::Stored
    }

    fn too_old(&mut self, now: Time, ext_seq: u64, ext_ts: u64) -> Pushed {
        let h = &mut self.history[(ext_seq % HISTORY as u64) as usize];
        if *h == ext_seq {
            self.stats.duplicate += 1;
            return Pushed::Duplicate;
        }
        if self.next_seq - ext_seq < HISTORY as u64 {
            *h = ext_seq;
        }
        self.stats.received += 1;
        self.stats.late += 1;
        // A late packet is exactly what the delay estimate must learn from.
        self.observe_transit(now, ext_ts);
        Pushed::Late
    }

    fn resync(&mut self, ext_seq: u64, ext_ts: u64) {
        for slot in self.slots.iter_mut() {
            slot.seq = None;
        }
        self.started = false;
        self.next_seq = ext_seq;
        self.floor_seq = ext_seq;
        self.next_ts = ext_ts;
        // A new stream (or the old one after a long outage): old timing says nothing.
        self.transits.clear();
        self.last_transit = None;
        self.stats.resyncs += 1;
    }

    fn observe_transit(&mut self, now: Time, ext_ts: u64) {
        let arrival = i64::try_from(now.as_micros()).unwrap_or(i64::MAX);
        let transit = arrival.saturating_sub(samples_to_us(ext_ts));
        // RFC 3550 §6.4.1: J += (|D| - J) / 16.
        if let Some(last) = self.last_transit {
            let d = transit.saturating_sub(last).unsigned_abs() as f64;
            self.jitter_us += (d - self.jitter_us) / 16.0;
        }
        self.last_transit = Some(transit);
        if self.transits.len() == self.config.window {
            self.transits.pop_front();
        }
        self.transits.push_back(transit);

        self.scratch.clear();
        self.scratch.extend(self.transits.iter().copied());
        let n = self.scratch.len();
        let rank = ((n as f64 * self.config.percentile).ceil() as usize).clamp(1, n) - 1;
        let (_, &mut high, _) = self.scratch.select_nth_unstable(rank);
        let low = self.scratch[..=rank].iter().copied().min().unwrap_or(high);
        self.min_transit = low;
        let min_us = i64::try_from(self.config.min_delay.as_micros()).unwrap_or(i64::MAX);
        let max_us = i64::try_from(self.config.max_delay.as_micros()).unwrap_or(i64::MAX);
        let lookahead = i64::from(self.config.recovery_frames) * FRAME_US as i64;
        self.target_us = (high - low + lookahead).clamp(min_us, max_us);
        self.stats.target_delay = Duration::from_micros(self.target_us.unsigned_abs());
        self.stats.jitter = Duration::from_micros(self.jitter_us as u64);
    }

    /// The playout delay if the frame with timestamp `ts` were played at `now`.
    fn delay_us(&self, now: Time, ts: u64) -> i64 {
        let now = i64::try_from(now.as_micros()).unwrap_or(i64::MAX);
        now.saturating_sub(samples_to_us(ts).saturating_add(self.min_transit))
    }

    fn slot(&self, seq: u64) -> Option<&Slot> {
        let slot = &self.slots[(seq % CAPACITY as u64) as usize];
        (slot.seq == Some(seq)).then_some(slot)
    }

    fn first_buffered(&self, from: u64) -> Option<u64> {
        (from..from + CAPACITY as u64).find(|&s| self.slot(s).is_some())
    }

    fn classify(&self) -> Next {
        if let Some(slot) = self.slot(self.next_seq) {
            return if slot.ts > self.next_ts {
                Next::Gap
            } else {
                Next::Present {
                    ts: slot.ts,
                    talkspurt: slot.flags & Media::FLAG_TALKSPURT != 0,
                }
            };
        }
        let Some(later) = self.first_buffered(self.next_seq + 1) else {
            return Next::Unknown;
        };
        let ahead = later - self.next_seq;
        let ts = self.slot(later).map_or(0, |s| s.ts);
        // Assume no DTX gap among the missing frames: the earliest it can have been.
        let est = ts.saturating_sub(ahead * FRAME);
        match est.cmp(&self.next_ts) {
            std::cmp::Ordering::Less => Next::Passed,
            std::cmp::Ordering::Equal => Next::Missing { ahead },
            std::cmp::Ordering::Greater => Next::Gap,
        }
    }

    fn free(&mut self, seq: u64) {
        let slot = &mut self.slots[(seq % CAPACITY as u64) as usize];
        if slot.seq == Some(seq) {
            slot.seq = None;
        }
    }

    /// Decides what to play for the next 20 ms at `now`. `last_silent` says whether
    /// the last frame played was silence (so the buffer may adapt unheard).
    pub fn pull(&mut self, now: Time, last_silent: bool) -> Playout<'_> {
        if !self.started && !self.start(now) {
            return Playout::Idle;
        }
        // Skip frames whose time passed while they were missing (already concealed).
        let mut next = self.classify();
        for _ in 0..CAPACITY {
            if !matches!(next, Next::Passed) {
                break;
            }
            self.mark_lost();
            next = self.classify();
        }

        let excess = self.delay_us(now, self.next_ts) - self.target_us;
        let quiet = last_silent
            || matches!(next, Next::Gap | Next::Unknown)
            || matches!(
                next,
                Next::Present {
                    talkspurt: true,
                    ..
                }
            );
        if (quiet && excess < 0) || excess < -FORCE_GROW_US {
            self.stats.inserted += 1;
            return Playout::Insert;
        }
        if (quiet && excess >= FRAME_US as i64) || excess >= FORCE_SHRINK_US {
            let shrunk = match next {
                // Dropping the first frame of a talkspurt would clip the word.
                Next::Present { talkspurt, .. } if !talkspurt || excess >= FORCE_SHRINK_US => {
                    self.free(self.next_seq);
                    self.next_seq += 1;
                    true
                }
                Next::Missing { .. } => {
                    self.mark_lost();
                    true
                }
                Next::Gap | Next::Unknown => true,
                _ => false,
            };
            if shrunk {
                self.stats.discarded += 1;
                self.next_ts += FRAME;
                next = self.classify();
                if matches!(next, Next::Passed) {
                    self.mark_lost();
                    next = self.classify();
                }
            }
        }
        self.emit(now, next)
    }

    /// Gives up on the frame due next: it was lost (or came too late).
    fn mark_lost(&mut self) {
        self.stats.lost += 1;
        self.next_seq += 1;
        // Underruns before a lost frame were that loss, not DTX.
        self.stats.loss_underruns += std::mem::take(&mut self.pending_underruns);
    }

    fn start(&mut self, now: Time) -> bool {
        let Some(first) = self.first_buffered(self.next_seq) else {
            return false;
        };
        let ts = self.slot(first).map_or(0, |s| s.ts);
        if self.delay_us(now, ts) < self.target_us {
            return false;
        }
        self.started = true;
        self.idle_frames = 0;
        self.next_seq = first;
        self.next_ts = ts;
        true
    }

    fn emit(&mut self, now: Time, next: Next) -> Playout<'_> {
        if !matches!(next, Next::Unknown) {
            self.idle_frames = 0;
        }
        match next {
            Next::Present { ts, .. } => {
                let seq = self.next_seq;
                let behind = ts < self.next_ts;
                self.next_seq += 1;
                // Playing a frame behind its time (after an underrun held its place)
                // moves the position back to it: the buffer grew by a frame.
                self.next_ts = ts + FRAME;
                let idx = (seq % CAPACITY as u64) as usize;
                let slot = &mut self.slots[idx];
                slot.seq = None;
                let waited = now.saturating_since(slot.arrival);
                if behind {
                    // Played after its time, behind a concealed frame: the buffer
                    // grew by that frame.
                    self.stats.late += 1;
                }
                // DTX: nothing was sent, so the sequence goes on while time jumped.
                let dtx = self
                    .last_played
                    .is_some_and(|(s, t)| s + 1 == seq && ts > t + FRAME);
                if dtx {
                    self.stats.dtx_underruns += self.pending_underruns;
                } else {
                    self.stats.loss_underruns += self.pending_underruns;
                }
                self.pending_underruns = 0;
                self.last_played = Some((seq, ts));
                self.stats.played += 1;
                self.stats.current_delay = waited;
                self.stats.total_delay += waited;
                let slot = &self.slots[idx];
                Playout::Play {
                    seq: seq as u32,
                    payload: &slot.data[..slot.len],
                    waited,
                }
            }
            Next::Missing { ahead } => {
                let seq = self.next_seq;
                self.mark_lost();
                self.next_ts += FRAME;
                let slot = &self.slots[((seq + ahead) % CAPACITY as u64) as usize];
                Playout::Recover {
                    seq: seq as u32,
                    // Below CAPACITY: classify() looks no further.
                    ahead: ahead as u32,
                    next: &slot.data[..slot.len],
                }
            }
            Next::Gap => {
                self.next_ts += FRAME;
                Playout::ComfortNoise
            }
            Next::Unknown | Next::Passed => {
                self.next_ts += FRAME;
                self.idle_frames += 1;
                self.stats.underruns += 1;
                self.pending_underruns += 1;
                if self.idle_frames >= IDLE_RESET_FRAMES {
                    self.started = false;
                    self.floor_seq = self.next_seq;
                }
                Playout::Underrun
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000_000;

    fn at(ms: u64) -> Time {
        Time::from_micros(T0 + ms * 1000)
    }

    fn ts(frame: u32) -> u32 {
        1000 + frame * FRAME_SAMPLES as u32
    }

    fn jb() -> JitterBuffer {
        JitterBuffer::new(JitterConfig::default()).unwrap()
    }

    #[test]
    fn bad_config_names_the_key() {
        let cfg = JitterConfig {
            min_delay: Duration::from_millis(5),
            ..JitterConfig::default()
        };
        assert!(
            JitterBuffer::new(cfg)
                .unwrap_err()
                .to_string()
                .contains("min_delay")
        );
        let cfg = JitterConfig {
            percentile: f64::NAN,
            ..JitterConfig::default()
        };
        assert!(
            JitterBuffer::new(cfg)
                .unwrap_err()
                .to_string()
                .contains("percentile")
        );
    }

    #[test]
    fn plays_in_order_after_one_frame_and_recovers_loss_with_fec() {
        let mut jb = jb();
        // Frames 0..10 sent every 20 ms, arriving 5 ms later; frame 4 lost.
        let mut played = Vec::new();
        for k in 0..12u32 {
            if k != 4 && k < 10 {
                jb.push(at(u64::from(k) * 20 + 5), k, ts(k), 0, &[1, 2, 3]);
            }
            match jb.pull(at(u64::from(k) * 20 + 10), false) {
                Playout::Play { seq, .. } => played.push(format!("p{seq}")),
                Playout::Recover { seq, ahead, .. } => played.push(format!("r{seq}+{ahead}")),
                Playout::Idle => played.push("idle".into()),
                other => played.push(format!("{other:?}")),
            }
        }
        assert_eq!(
            played,
            [
                "idle", "p0", "p1", "p2", "p3", "r4+1", "p5", "p6", "p7", "p8", "p9", "Underrun"
            ]
        );
        let s = jb.stats();
        assert_eq!((s.lost, s.played, s.late), (1, 9, 0));
        assert_eq!(s.target_delay, Duration::from_millis(20));
    }

    #[test]
    fn deeper_look_ahead_offers_a_whole_run_of_lost_frames_for_recovery() {
        let mut jb = JitterBuffer::new(JitterConfig {
            recovery_frames: 2,
            ..JitterConfig::default()
        })
        .unwrap();
        // Frames 0..10 sent every 20 ms, arriving 5 ms later; frames 4 and 5 lost.
        let mut played = Vec::new();
        for k in 0..12u32 {
            if !(4..=5).contains(&k) && k < 10 {
                jb.push(at(u64::from(k) * 20 + 5), k, ts(k), 0, &[k as u8]);
            }
            played.push(match jb.pull(at(u64::from(k) * 20 + 10), false) {
                Playout::Play { seq, .. } => format!("p{seq}"),
                Playout::Recover { seq, ahead, next } => format!("r{seq}+{ahead}:{}", next[0]),
                other => format!("{other:?}"),
            });
        }
        // Two frames of look-ahead: playout starts 40 ms after the first arrival, and
        // when frame 4 is due, frame 6 (whose redundancy covers both) is there.
        assert_eq!(
            played,
            [
                "Idle", "Idle", "p0", "p1", "p2", "p3", "r4+2:6", "r5+1:6", "p6", "p7", "p8", "p9"
            ]
        );
        assert_eq!(jb.stats().target_delay, Duration::from_millis(40));
        assert_eq!(jb.stats().lost, 2);
        let bad = JitterConfig {
            recovery_frames: 0,
            ..JitterConfig::default()
        };
        assert!(
            JitterBuffer::new(bad)
                .unwrap_err()
                .to_string()
                .contains("recovery_frames")
        );
    }

    #[test]
    fn a_late_frame_after_an_underrun_grows_the_buffer_once() {
        let mut jb = jb();
        let mut played = Vec::new();
        for k in 0..10u32 {
            let arrival = u64::from(k) * 20 + 5;
            if k != 3 {
                jb.push(at(arrival), k, ts(k), 0, &[1]);
            }
            if k == 4 {
                // Frame 3 comes 40 ms late, after its turn passed with nothing buffered.
                jb.push(at(arrival + 1), 3, ts(3), 0, &[1]);
            }
            played.push(match jb.pull(at(u64::from(k) * 20 + 30), false) {
                Playout::Play { seq, .. } => format!("p{seq}"),
                other => format!("{other:?}"),
            });
        }
        assert_eq!(
            played,
            [
                "p0", "p1", "p2", "Underrun", "p3", "p4", "p5", "p6", "p7", "p8"
            ]
        );
        let s = jb.stats();
        assert_eq!((s.late, s.lost, s.loss_underruns), (1, 0, 1));
    }

    #[test]
    fn duplicates_from_a_second_path_are_dropped_before_and_after_play() {
        let mut jb = jb();
        assert_eq!(jb.push(at(0), 7, ts(7), 0, &[1]), Pushed::Stored);
        assert_eq!(jb.push(at(1), 7, ts(7), 0, &[1]), Pushed::Duplicate);
        assert!(matches!(
            jb.pull(at(40), false),
            Playout::Play { seq: 7, .. }
        ));
        assert_eq!(jb.push(at(41), 7, ts(7), 0, &[1]), Pushed::Duplicate);
        // A first copy of an older frame is late, not a duplicate.
        assert_eq!(jb.push(at(42), 6, ts(6), 0, &[1]), Pushed::Late);
        assert_eq!(jb.push(at(43), 6, ts(6), 0, &[1]), Pushed::Duplicate);
        assert_eq!(jb.push(at(43), 8, ts(8), 0, &[]), Pushed::Invalid);
        let s = jb.stats();
        assert_eq!((s.duplicate, s.late, s.invalid), (3, 1, 1));
    }

    #[test]
    fn reorders_and_grows_under_jitter_only_in_silence() {
        let mut jb = jb();
        // Alternate 0 and 50 ms of extra delay: the target must cover ~50 ms + a frame.
        let mut arrivals: Vec<(u64, u32)> = (0..200u32)
            .map(|k| (u64::from(k) * 20 + if k % 2 == 1 { 50 } else { 0 }, k))
            .collect();
        arrivals.sort();
        let mut i = 0;
        let mut last = None;
        let mut lost_after_warmup = 0;
        for pull in 0..220u64 {
            let now = pull * 20 + 10;
            while i < arrivals.len() && arrivals[i].0 <= now {
                let k = arrivals[i].1;
                jb.push(at(arrivals[i].0), k, ts(k), 0, &[9]);
                i += 1;
            }
            match jb.pull(at(now), true) {
                Playout::Play { seq, .. } => {
                    if let Some(l) = last {
                        assert!(seq > l);
                    }
                    last = Some(seq);
                }
                Playout::Recover { .. } if pull > 20 && pull < 200 => lost_after_warmup += 1,
                _ => {}
            }
        }
        let s = jb.stats();
        assert_eq!(s.target_delay, Duration::from_millis(70));
        assert_eq!(lost_after_warmup, 0, "{s:?}");
        assert!(s.inserted >= 2, "{s:?}");
    }

    #[test]
    fn dtx_gap_plays_comfort_noise_then_the_talkspurt_on_time() {
        let mut jb = jb();
        jb.push(at(0), 0, ts(0), Media::FLAG_TALKSPURT, &[1]);
        assert!(matches!(
            jb.pull(at(25), false),
            Playout::Play { seq: 0, .. }
        ));
        // Sender silent for frames 1..=9; frame 10 is seq 1 with a talkspurt flag.
        let mut out = Vec::new();
        for k in 1..=11u64 {
            if k == 10 {
                jb.push(at(200), 1, ts(10), Media::FLAG_TALKSPURT, &[1]);
            }
            out.push(format!("{:?}", jb.pull(at(k * 20 + 25), false)));
        }
        assert!(out[9].starts_with("Play { seq: 1,"), "{out:?}");
        assert!(out[..9].iter().all(|o| o == "Underrun"), "{out:?}");
        assert_eq!(jb.stats().lost, 0);
    }

    #[test]
    fn a_huge_jump_restarts_only_when_the_next_packet_confirms_it() {
        let mut jb = jb();
        jb.push(at(0), 0, ts(0), 0, &[1]);
        assert_eq!(jb.push(at(0), 1_000_000, ts(5), 0, &[1]), Pushed::Invalid);
        assert_eq!(jb.stats().resyncs, 0);
        assert_eq!(jb.push(at(0), 1_000_001, ts(6), 0, &[1]), Pushed::Stored);
        assert_eq!(jb.stats().resyncs, 1);
        assert_eq!(jb.buffered(), 1);
        assert!(matches!(
            jb.pull(at(30), false),
            Playout::Play { seq: 1_000_001, .. }
        ));
    }
}
