//! peercall's audio pipeline, sans-IO.
//!
//! ```text
//! sender:   PCM ─► Encoder (Opus, in-band FEC) ─► Packetizer ─► Media frames ─► router
//! receiver: Media frames ─► Receiver { JitterBuffer ─► Decoder (FEC / PLC) } ─► PCM
//! ```
//!
//! Everything runs on 48 kHz mono audio in 20 ms frames ([`FRAME_SAMPLES`] samples).
//! Nothing here reads a clock or draws OS randomness: arrivals and playout pulls take
//! `now: peercall_wire::Time`, and the offline evaluator's network model draws from a
//! seeded ChaCha RNG, so every run replays exactly from its seed.
//!
//! - [`codec`]: the Opus encoder and decoder, bitrate and FEC policy.
//! - [`packetizer`]: stream sequence numbers, 48 kHz timestamps, talkspurt flags.
//! - [`jitter`]: the adaptive jitter buffer (packet level, no decoding).
//! - [`receiver`]: jitter buffer + decoder: push frames in, pull 20 ms of PCM out.
//! - [`stats`]: per-call statistics.
//! - [`quality`]: the ITU-T G.107 E-model (R-factor and MOS).
//! - [`wav`]: WAV in (any rate, any channels) and out (48 kHz mono 16-bit).
//! - [`eval`]: the offline evaluator behind `peercall media-eval`.
//! - `devices` (cargo feature `devices`): real audio devices through cpal.

pub mod codec;
#[cfg(feature = "devices")]
pub mod devices;
mod error;
pub mod eval;
pub mod jitter;
pub mod packetizer;
pub mod quality;
pub mod receiver;
pub mod stats;
pub mod wav;

pub use codec::{Decoder, Encoder, EncoderConfig};
pub use error::MediaError;
pub use jitter::{JitterBuffer, JitterConfig};
pub use packetizer::{OutgoingFrame, Packetizer};
pub use receiver::{Pulled, Receiver};
pub use stats::CallStats;

/// The sample rate of everything in this crate: Opus's native rate.
pub const SAMPLE_RATE: u32 = 48_000;

/// Frame duration in milliseconds: 20 ms is Opus's sweet spot for speech (the SILK
/// layer codes 20 ms natively, and in-band FEC is carried one 20 ms frame later).
pub const FRAME_MS: u32 = 20;

/// Samples in one frame (mono).
pub const FRAME_SAMPLES: usize = (SAMPLE_RATE / 1000 * FRAME_MS) as usize;

/// One frame in microseconds.
pub const FRAME_US: u64 = FRAME_MS as u64 * 1000;
