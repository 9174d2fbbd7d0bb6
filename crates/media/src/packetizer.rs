//! Stream sequence numbers and timestamps for outgoing Opus packets.
//!
//! As in RTP (RFC 3550 §5.1): the sequence number grows by one per packet *sent*,
//! the timestamp by the frame's duration in 48 kHz samples per frame *coded*, sent
//! or not. So a receiver tells loss (a gap in sequence numbers) from DTX silence (a
//! gap in timestamps with consecutive sequence numbers). The first packet after a
//! gap, and the first of the stream, carry [`Media::FLAG_TALKSPURT`]. Both counters
//! start at random values drawn from the caller's RNG, as RFC 3550 recommends.
//!
//! The path fields of [`Media`] belong to the router, which sets them per path.

use peercall_wire::frame::Media;
use rand_core::RngCore;

use crate::FRAME_SAMPLES;
use crate::codec::DTX_PACKET_MAX_LEN;

/// One packet ready for the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutgoingFrame<'a> {
    /// Stream sequence number.
    pub seq: u32,
    /// 48 kHz timestamp of the frame's first sample.
    pub timestamp: u32,
    /// [`Media::FLAG_TALKSPURT`] or nothing.
    pub flags: u8,
    /// The Opus packet.
    pub payload: &'a [u8],
}

impl<'a> OutgoingFrame<'a> {
    /// The wire frame for one path; `path` and `path_seq` are the router's.
    pub fn to_media(&self, path: u16, path_seq: u32) -> Media<'a> {
        Media {
            path,
            path_seq,
            seq: self.seq,
            timestamp: self.timestamp,
            flags: self.flags,
            payload: self.payload,
        }
    }
}

/// Numbers outgoing packets.
#[derive(Debug, Clone)]
pub struct Packetizer {
    seq: u32,
    timestamp: u32,
    after_gap: bool,
}

impl Packetizer {
    /// A packetizer with random initial sequence number and timestamp.
    pub fn new(rng: &mut impl RngCore) -> Self {
        Self::starting_at(rng.next_u32(), rng.next_u32())
    }

    /// A packetizer starting at the given numbers (tests, replays).
    pub fn starting_at(seq: u32, timestamp: u32) -> Self {
        Packetizer {
            seq,
            timestamp,
            after_gap: true,
        }
    }

    /// The timestamp the next frame will get.
    pub fn next_timestamp(&self) -> u32 {
        self.timestamp
    }

    /// Skips `frames` 20 ms frames that were never coded here (a pass-through source
    /// that sent nothing for them): their timestamps are consumed and the next
    /// packet starts a talkspurt, as after DTX.
    pub fn skip(&mut self, frames: u32) {
        if frames > 0 {
            let samples = (FRAME_SAMPLES as u32).wrapping_mul(frames);
            self.timestamp = self.timestamp.wrapping_add(samples);
            self.after_gap = true;
        }
    }

    /// Numbers the encoder's output for the next 20 ms frame. Returns `None` for a
    /// DTX frame (nothing worth sending); its timestamp is still consumed.
    pub fn packetize<'a>(&mut self, payload: &'a [u8]) -> Option<OutgoingFrame<'a>> {
        let timestamp = self.timestamp;
        self.timestamp = self.timestamp.wrapping_add(FRAME_SAMPLES as u32);
        if payload.len() <= DTX_PACKET_MAX_LEN {
            self.after_gap = true;
            return None;
        }
        let flags = if std::mem::take(&mut self.after_gap) {
            Media::FLAG_TALKSPURT
        } else {
            0
        };
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        Some(OutgoingFrame {
            seq,
            timestamp,
            flags,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_frames_move_the_timestamp_and_start_a_talkspurt() {
        let mut p = Packetizer::starting_at(7, 1000);
        let speech = [0x78u8, 1, 2, 3];
        p.packetize(&speech).unwrap();
        p.skip(0);
        assert_eq!(p.packetize(&speech).unwrap().flags, 0);
        p.skip(3);
        let f = p.packetize(&speech).unwrap();
        assert_eq!((f.seq, f.timestamp), (9, 1000 + 5 * FRAME_SAMPLES as u32));
        assert_eq!(f.flags, Media::FLAG_TALKSPURT);
    }

    #[test]
    fn numbers_wrap_and_dtx_keeps_sequence_dense() {
        let mut p = Packetizer::starting_at(u32::MAX, u32::MAX - 100);
        let speech = [0x78u8, 1, 2, 3];
        let a = p.packetize(&speech).unwrap();
        assert_eq!(
            (a.seq, a.timestamp, a.flags),
            (u32::MAX, u32::MAX - 100, Media::FLAG_TALKSPURT)
        );
        let b = p.packetize(&speech).unwrap();
        assert_eq!((b.seq, b.timestamp, b.flags), (0, 859, 0));
        assert!(p.packetize(&[0x78]).is_none());
        assert!(p.packetize(&[0x78]).is_none());
        let c = p.packetize(&speech).unwrap();
        assert_eq!(
            (c.seq, c.timestamp, c.flags),
            (1, 859 + 3 * 960, Media::FLAG_TALKSPURT)
        );
        let m = c.to_media(7, 42);
        assert_eq!(
            (m.path, m.path_seq, m.seq, m.payload),
            (7, 42, 1, &speech[..])
        );
    }
}
