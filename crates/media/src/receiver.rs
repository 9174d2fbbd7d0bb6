//! The receiving half of a call: jitter buffer plus decoder.
//!
//! The owner pushes every received media frame with [`Receiver::push`] and pulls
//! 20 ms of 48 kHz mono PCM at a time with [`Receiver::pull`], on its playout clock.
//! Nothing fails at this level: a missing frame is rebuilt from the next packet's
//! FEC when that is here, and concealed otherwise; a corrupt packet is concealed.

use std::time::Duration;

use peercall_wire::Time;
use peercall_wire::frame::Media;

use crate::codec::{Decoder, has_fec};
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
    /// A lost frame rebuilt from the next packet's FEC.
    FecRecovered {
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
        })
    }

    /// Adds a received media frame (from any path).
    pub fn push(&mut self, now: Time, media: &Media<'_>) -> Pushed {
        self.jitter.push_media(now, media)
    }

    /// Fills `out` with the next 20 ms of audio.
    pub fn pull(&mut self, now: Time, out: &mut [i16; FRAME_SAMPLES]) -> Pulled {
        let decoder = &mut self.decoder;
        let mut corrupt = false;
        let mut underrun = false;
        let pulled = match self.jitter.pull(now, self.last_silent) {
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
            Playout::Fec { seq, next } => {
                if !has_fec(next) {
                    decoder.conceal(out);
                    Pulled::Concealed
                } else if decoder.decode_fec(next, out).is_ok() {
                    Pulled::FecRecovered { seq }
                } else {
                    corrupt = true;
                    Pulled::Concealed
                }
            }
            Playout::Conceal => {
                decoder.conceal(out);
                Pulled::Concealed
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

    fn account(&mut self, pulled: Pulled, corrupt: bool, underrun: bool) {
        let s = &mut self.stats;
        s.frames_played += 1;
        s.corrupt += u64::from(corrupt);
        let concealed = matches!(pulled, Pulled::Concealed);
        match pulled {
            Pulled::FecRecovered { .. } => s.fec_recovered += 1,
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
