//! Per-call receive statistics.

use serde::Serialize;

use crate::quality::{self, Conditions};

/// Delay a frame's audio takes through the sender before it is a packet: the 20 ms
/// frame itself plus Opus's 6.5 ms look-ahead (libopus `OPUS_GET_LOOKAHEAD` at 48 kHz
/// in VoIP mode: 2.5 ms of CELT overlap and 4 ms of SILK resampler delay).
pub const CODEC_DELAY_MS: f64 = 26.5;

/// What one call's receiving side has seen. Frame counts are 20 ms frames.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct CallStats {
    /// First copies of packets received (including late ones).
    pub received: u64,
    /// Frames whose packet was missing at playout (network loss or late).
    pub lost: u64,
    /// Lost frames rebuilt from the next packet's in-band FEC.
    pub fec_recovered: u64,
    /// Lost frames rebuilt from a later packet's DRED (Deep REDundancy). libopus
    /// conceals the part of a long run its DRED does not reach back to; those
    /// frames are counted here too.
    pub dred_recovered: u64,
    /// Frames concealed because of loss (not DTX), including corrupt packets.
    pub concealed: u64,
    /// Packets that arrived after their playout time: dropped (and counted in
    /// `lost`), or played late behind a concealed frame (the buffer grew by one).
    pub late: u64,
    /// Second copies (two paths) and retransmitted duplicates dropped.
    pub duplicate: u64,
    /// Packets libopus rejected; each was concealed.
    pub corrupt: u64,
    /// Comfort-noise frames played in the sender's DTX gaps.
    pub dtx: u64,
    /// Frames inserted to grow the jitter buffer.
    pub inserted: u64,
    /// Frames dropped to shrink the jitter buffer.
    pub discarded: u64,
    /// Frames played in total (any kind, after playout started).
    pub frames_played: u64,
    /// Wait of the last played packet in the jitter buffer, ms.
    pub jb_delay_ms_current: f64,
    /// Average wait of played packets, ms.
    pub jb_delay_ms_avg: f64,
    /// The jitter buffer's current target delay, ms.
    pub jb_target_ms: f64,
    /// RFC 3550 inter-arrival jitter, ms.
    pub jitter_ms: f64,
    /// Mean length of runs of concealed frames.
    pub mean_loss_burst: f64,
}

impl CallStats {
    /// Fraction of played frames that had to be concealed (residual loss after FEC).
    pub fn residual_loss(&self) -> f64 {
        if self.frames_played == 0 {
            0.0
        } else {
            self.concealed as f64 / self.frames_played as f64
        }
    }

    /// Mouth-to-ear delay without the network: codec delay plus the average time in
    /// the jitter buffer, ms.
    pub fn pipeline_delay_ms(&self) -> f64 {
        CODEC_DELAY_MS + self.jb_delay_ms_avg
    }

    /// E-model MOS estimate for this call, given the network's one-way delay in ms.
    /// Jitter enters through the jitter buffer's delay and late loss, which are
    /// measured, so no separate jitter term is added.
    pub fn mos_estimate(&self, network_delay_ms: f64) -> f64 {
        let loss = self.residual_loss();
        let conditions = Conditions {
            delay_ms: network_delay_ms + self.pipeline_delay_ms(),
            jitter_ms: 0.0,
            loss,
            burst_ratio: quality::burst_ratio(loss, self.mean_loss_burst),
        };
        quality::mos(&conditions, &quality::OPUS)
    }
}
