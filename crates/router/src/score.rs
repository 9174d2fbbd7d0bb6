//! A path's quality as an ITU-T G.107 E-model rating, through
//! [`peercall_media::quality`].
//!
//! The mouth-to-ear delay a path would give is its one-way delay (half the RTT)
//! plus the audio pipeline's fixed delay ([`peercall_media::stats::CODEC_DELAY_MS`])
//! plus [`JITTER_BUFFER_BASE_MS`]; the path's jitter enters as the jitter buffer's
//! allowance on top ([`peercall_media::quality::JITTER_DELAY_WEIGHT`] times it).
//! Loss is the effective loss with its burstiness (G.107's burst ratio).

use std::time::Duration;

use peercall_media::quality::{self, Conditions};
use peercall_media::stats::CODEC_DELAY_MS;

/// The jitter buffer's floor: one frame held back so in-band FEC in the next frame
/// can rebuild a lost one (the media crate's buffer target is measured jitter plus
/// one frame).
pub const JITTER_BUFFER_BASE_MS: f64 = peercall_media::FRAME_MS as f64;

/// What a path's score is computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathQuality {
    /// Round-trip time.
    pub rtt: Duration,
    /// Inter-arrival jitter (RFC 3550).
    pub jitter: Duration,
    /// Loss rate, 0..=1.
    pub loss: f64,
    /// Mean loss burst in frames (1 or less for isolated losses).
    pub mean_burst: f64,
}

impl PathQuality {
    /// The E-model conditions this path gives a listener.
    pub fn conditions(&self) -> Conditions {
        let one_way_ms = self.rtt.as_secs_f64() * 1000.0 / 2.0;
        Conditions {
            delay_ms: one_way_ms + CODEC_DELAY_MS + JITTER_BUFFER_BASE_MS,
            jitter_ms: self.jitter.as_secs_f64() * 1000.0,
            loss: self.loss,
            burst_ratio: quality::burst_ratio(self.loss, self.mean_burst),
        }
    }

    /// The transmission rating R (0..=93.2) for Opus.
    pub fn r_factor(&self) -> f64 {
        quality::r_factor(&self.conditions(), &quality::OPUS)
    }
}

/// The estimated MOS for a rating, 1.0..=4.5. G.107 Annex B's polynomial dips just
/// below 1 for 0 < R < 6.5 (to 0.99); MOS is 1 at worst, so it is clamped here.
pub fn mos(r: f64) -> f64 {
    quality::mos_from_r(r).clamp(1.0, 4.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_latency_and_jitter_lower_the_score() {
        let clean = PathQuality {
            rtt: Duration::from_millis(40),
            jitter: Duration::ZERO,
            loss: 0.0,
            mean_burst: 0.0,
        };
        let r = clean.r_factor();
        // 20 + 26.5 + 20 = 66.5 ms: Id = 0.024 * 66.5 = 1.6.
        assert!((r - (93.2 - 0.024 * 66.5)).abs() < 1e-9, "{r}");
        let lossy = PathQuality {
            loss: 0.03,
            ..clean
        }
        .r_factor();
        let bursty = PathQuality {
            loss: 0.03,
            mean_burst: 4.0,
            ..clean
        }
        .r_factor();
        let far = PathQuality {
            rtt: Duration::from_millis(400),
            ..clean
        }
        .r_factor();
        let jittery = PathQuality {
            jitter: Duration::from_millis(20),
            ..clean
        }
        .r_factor();
        assert!(lossy < r - 9.0 && bursty < lossy && far < r - 10.0 && jittery < r);
        assert!(mos(r) > 4.3 && mos(lossy) < mos(r));
        assert_eq!(mos(1.0), 1.0);
    }
}
