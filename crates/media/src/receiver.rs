//! The receiving half of a call: jitter buffer plus decoder.
//!
//! The owner pushes every received media frame with [`Receiver::push`] and pulls
//! 20 ms of 48 kHz mono PCM at a time with [`Receiver::pull`], on its playout clock.
//! Nothing fails at this level: a missing frame is rebuilt from the redundancy of
//! the packet after it when that is here (its in-band FEC for a single lost frame,
//! its DRED for a run of them), and concealed otherwise; a corrupt packet is
//! concealed.
//!
//! libopus rebuilds a run of frames from DRED in one call (it places the audio by
//! its length before the packet), so the receiver decodes the whole run when its
//! first frame is due and plays the rest from memory at the following pulls.

use std::time::Duration;

use peercall_wire::Time;
use peercall_wire::frame::Media;

use crate::codec::{Decoder, MAX_DRED_FRAMES, has_dred, has_fec};
use crate::jitter::{JitterBuffer, JitterConfig, Playout, Pushed};
use crate::stats::CallStats;
use crate::{FRAME_SAMPLES, MediaError};

/// A frame whose RMS is below this (in 16-bit units, about -50 dBFS) is silent,
/// whatever the noise floor: digital silence and a quiet room.
const SILENCE_RMS_ABSOLUTE: f64 = 100.0;

/// A frame within this factor (≈ 8 dB) of the noise floor is background, not speech.
const SILENCE_ABOVE_FLOOR: f64 = 2.5;

/// The noise floor estimate creeps up by this factor per frame, so it follows a
/// rising background within a few seconds, and drops at once to any quieter frame.
const FLOOR_RISE: f64 = 1.02;

/// What [`Receiver::pull`] played.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pulled {
    /// Playout has not started: silence.
    Idle,
    /// The packet with this sequence number, after `waited` in the buffer.
    Decoded {
        /// Stream sequence number.
        seq: u32,
        /// Time in the jitter buffer.
        waited: Duration,
    },
    /// A lost frame rebuilt from the next packet's in-band FEC.
    FecRecovered {
        /// The recovered frame's sequence number.
        seq: u32,
    },
    /// A lost frame rebuilt from a later packet's DRED.
    DredRecovered {
        /// The recovered frame's sequence number.
        seq: u32,
    },
    /// Concealment for a missing or corrupt frame.
    Concealed,
    /// Comfort noise in a DTX gap.
    ComfortNoise,
    /// An extra frame while the jitter buffer grows.
    Inserted,
}

/// The receiving half of a call.
#[derive(Debug)]
pub struct Receiver {
    jitter: JitterBuffer,
    decoder: Decoder,
    stats: CallStats,
    noise_floor: f64,
    last_silent: bool,
    in_loss_burst: bool,
    loss_bursts: u64,
    rebuilt: Rebuilt,
}

/// A run of lost frames rebuilt from DRED in one go, played one pull at a time.
#[derive(Debug)]
struct Rebuilt {
    /// The run's audio, [`MAX_DRED_FRAMES`] frames of room.
    pcm: Box<[i16]>,
    /// The sequence number of the run's first frame and of the packet whose DRED
    /// rebuilt it; `None` when nothing is held.
    span: Option<(u32, u32)>,
    /// Frames of the run played so far.
    played: usize,
}

impl Rebuilt {
    /// Plays frame `seq` into `out` if it is the next one held from packet `from`.
    fn take(&mut self, seq: u32, from: u32, out: &mut [i16; FRAME_SAMPLES]) -> bool {
        let Some((first, source)) = self.span else {
            return false;
        };
        let at = seq.wrapping_sub(first) as usize * FRAME_SAMPLES;
        let next = self.played * FRAME_SAMPLES;
        match self.pcm.get(at..at + FRAME_SAMPLES) {
            Some(frame) if source == from && at == next => {
                out.copy_from_slice(frame);
                self.played += 1;
                true
            }
            _ => {
                self.span = None;
                false
            }
        }
    }
}

impl Receiver {
    /// A receiver with a jitter buffer configured by `config`.
    pub fn new(config: JitterConfig) -> Result<Self, MediaError> {
        Ok(Receiver {
            jitter: JitterBuffer::new(config)?,
            decoder: Decoder::new()?,
            stats: CallStats::default(),
            noise_floor: SILENCE_RMS_ABSOLUTE,
            last_silent: true,
            in_loss_burst: false,
            loss_bursts: 0,
            rebuilt: Rebuilt {
                pcm: vec![0; MAX_DRED_FRAMES * FRAME_SAMPLES].into_boxed_slice(),
                span: None,
                played: 0,
            },
        })
    }

    /// Adds a received media frame (from any path).
    pub fn push(&mut self, now: Time, media: &Media<'_>) -> Pushed {
        self.jitter.push_media(now, media)
    }

    /// Fills `out` with the next 20 ms of audio.
    pub fn pull(&mut self, now: Time, out: &mut [i16; FRAME_SAMPLES]) -> Pulled {
        let mut corrupt = false;
        let mut underrun = false;
        let playout = self.jitter.pull(now, self.last_silent);
        if !matches!(playout, Playout::Recover { .. }) {
            // Any other decode moves the decoder on: what was rebuilt is stale.
            self.rebuilt.span = None;
        }
        let decoder = &mut self.decoder;
        let pulled = match playout {
            Playout::Idle => {
                out.fill(0);
                return Pulled::Idle;
            }
            Playout::Play {
                seq,
                payload,
                waited,
            } => {
                if decoder.decode(payload, out).is_ok() {
                    Pulled::Decoded { seq, waited }
                } else {
                    corrupt = true;
                    Pulled::Concealed
                }
            }
            Playout::Recover { seq, ahead, next } => {
                let (pulled, bad) =
                    Self::recover(decoder, &mut self.rebuilt, seq, ahead, next, out);
                corrupt = bad;
                pulled
            }
            Playout::Underrun => {
                // Counted once the jitter buffer knows whether it was loss or DTX.
                decoder.conceal(out);
                underrun = true;
                Pulled::Concealed
            }
            Playout::ComfortNoise => {
                decoder.conceal(out);
                Pulled::ComfortNoise
            }
            Playout::Insert => {
                decoder.conceal(out);
                Pulled::Inserted
            }
        };
        self.account(pulled, corrupt, underrun);
        self.last_silent = self.is_silent(out);
        pulled
    }

    /// Plays lost frame `seq`, `ahead` frames before packet `next`: from frames
    /// already rebuilt from that packet's DRED, from its in-band FEC when it is the
    /// very next packet, from its DRED (rebuilding the whole run), or concealed.
    /// Returns what was played and whether the packet was corrupt.
    fn recover(
        decoder: &mut Decoder,
        rebuilt: &mut Rebuilt,
        seq: u32,
        ahead: u32,
        next: &[u8],
        out: &mut [i16; FRAME_SAMPLES],
    ) -> (Pulled, bool) {
        let next_seq = seq.wrapping_add(ahead);
        if rebuilt.take(seq, next_seq, out) {
            return (Pulled::DredRecovered { seq }, false);
        }
        if ahead == 1 && has_fec(next) {
            return match decoder.decode_fec(next, out) {
                Ok(()) => (Pulled::FecRecovered { seq }, false),
                Err(_) => (Pulled::Concealed, true),
            };
        }
        let frames = ahead as usize;
        if frames <= MAX_DRED_FRAMES && has_dred(next) {
            let run = &mut rebuilt.pcm[..frames * FRAME_SAMPLES];
            let result = decoder.decode_dred(next, run);
            out.copy_from_slice(&run[..FRAME_SAMPLES]);
            return match result {
                Ok(()) => {
                    rebuilt.span = Some((seq, next_seq));
                    rebuilt.played = 1;
                    (Pulled::DredRecovered { seq }, false)
                }
                Err(_) => (Pulled::Concealed, true),
            };
        }
        decoder.conceal(out);
        (Pulled::Concealed, false)
    }

    fn account(&mut self, pulled: Pulled, corrupt: bool, underrun: bool) {
        let s = &mut self.stats;
        s.frames_played += 1;
        s.corrupt += u64::from(corrupt);
        let concealed = matches!(pulled, Pulled::Concealed);
        match pulled {
            Pulled::FecRecovered { .. } => s.fec_recovered += 1,
            Pulled::DredRecovered { .. } => s.dred_recovered += 1,
            Pulled::Concealed if !underrun => s.concealed += 1,
            Pulled::ComfortNoise => s.dtx += 1,
            _ => {}
        }
        if concealed && !self.in_loss_burst {
            self.loss_bursts += 1;
        }
        if !matches!(pulled, Pulled::Inserted) {
            self.in_loss_burst = concealed;
        }
    }

    /// Tracks the noise floor and says whether `frame` is background.
    fn is_silent(&mut self, frame: &[i16; FRAME_SAMPLES]) -> bool {
        let energy: f64 = frame.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
        let rms = (energy / FRAME_SAMPLES as f64).sqrt();
        self.noise_floor = (self.noise_floor * FLOOR_RISE).min(rms.max(1.0));
        rms < SILENCE_RMS_ABSOLUTE || rms < self.noise_floor * SILENCE_ABOVE_FLOOR
    }

    /// The call's statistics so far.
    pub fn stats(&self) -> CallStats {
        let j = self.jitter.stats();
        let mut s = self.stats;
        // Underruns count once resolved: as loss, or as DTX comfort noise.
        s.concealed += j.loss_underruns;
        s.dtx += j.dtx_underruns;
        s.received = j.received;
        s.lost = j.lost;
        s.late = j.late;
        s.duplicate = j.duplicate;
        s.inserted = j.inserted;
        s.discarded = j.discarded;
        s.jb_delay_ms_current = j.current_delay.as_secs_f64() * 1000.0;
        s.jb_delay_ms_avg = j.average_delay().as_secs_f64() * 1000.0;
        s.jb_target_ms = j.target_delay.as_secs_f64() * 1000.0;
        s.jitter_ms = j.jitter.as_secs_f64() * 1000.0;
        s.mean_loss_burst = if self.loss_bursts == 0 {
            0.0
        } else {
            s.concealed as f64 / self.loss_bursts as f64
        };
        s
    }

    /// The jitter buffer, for its own counters.
    pub fn jitter_buffer(&self) -> &JitterBuffer {
        &self.jitter
    }
}
