//! Opus encoder and decoder: 48 kHz mono, 20 ms frames, VoIP mode, in-band FEC.
//!
//! In-band FEC (Opus "LBRR") puts a coarser copy of frame *n* inside packet *n + 1*;
//! a receiver that lost *n* but has *n + 1* decodes it with [`Decoder::decode_fec`].
//! libopus only codes LBRR when it is told to expect loss (`packet_loss_perc > 0`)
//! and when the bitrate leaves room for it, so the encoder's expected-loss setting
//! is fed from the loss the receiver reports, and the bitrate is never adapted below
//! the rate at which FEC still fits ([`fec_threshold_bps`]). Both decisions sit
//! behind the [`RatePolicy`] trait; [`DefaultRatePolicy`] is documented there.
//!
//! The codec is libopus 1.6.1, bundled and built with cmake through `opusic-sys`,
//! with its neural features compiled in (features `dred` and `osce`): the decoder runs
//! at complexity [`DECODER_COMPLEXITY`], which turns on Deep PLC (a neural
//! concealment model, complexity ≥ 5) and the NoLACE speech enhancer (≥ 7). Measured
//! on the quality script's clips with LBRR FEC at 32 kb/s, this raises PESQ-WB by
//! 0.04 on a clean path and by about 0.25 at 5, 10 and 20 % random loss. The safe
//! `opusic-c` wrapper is used because it exposes the decoder's complexity (the `opus`
//! 0.4 wrapper does not, and this workspace forbids `unsafe`). DRED (neural
//! redundancy covering up to a second of loss) is compiled in too but not used yet:
//! it needs the jitter buffer to hold packets past a burst, a larger change.

use std::str::FromStr;

use opusic_c::{Application, Bitrate, Channels, ErrorCode, InbandFec, SampleRate, Signal};
use peercall_wire::frame::MAX_OPUS_PACKET;

use crate::{FRAME_SAMPLES, MediaError};

/// The default bitrate: 32 kb/s gives fullband hybrid Opus with room for FEC.
pub const DEFAULT_BITRATE_BPS: u32 = 32_000;

/// The lowest bitrate accepted: below 6 kb/s libopus cannot code 20 ms speech
/// intelligibly (its own floor for SILK narrowband).
pub const MIN_BITRATE_BPS: u32 = 6_000;

/// The highest bitrate accepted: 128 kb/s is transparent for mono speech and music;
/// more only costs bandwidth.
pub const MAX_BITRATE_BPS: u32 = 128_000;

/// Default encoder complexity. 10 is libopus's best quality; a 20 ms mono frame costs
/// well under a millisecond of one core even at 10 (see the `media` bench), so there
/// is no reason to trade quality away.
pub const DEFAULT_COMPLEXITY: u8 = 10;

/// Expected loss assumed before the first receiver report, in percent. Zero: FEC
/// costs the main layer about 0.4 PESQ-WB at 32 kb/s (measured at 10 % expected loss
/// on a clean path), most paths are clean, and receivers report the first losses
/// within a few hundred milliseconds. The engine should seed the encoder with the
/// path's probe-measured loss through [`Encoder::on_feedback`] when it has one.
pub const INITIAL_EXPECTED_LOSS_PCT: u8 = 0;

/// Decoder complexity: 7 enables Deep PLC and the NoLACE enhancer (see the module
/// docs). It costs about 8 ms of one core per second of audio: the `media` bench
/// decodes at about 100× real time instead of 560× at complexity 0, affordable for
/// the one or two streams an endpoint decodes (relays never decode).
pub const DECODER_COMPLEXITY: u8 = 7;

/// Packets this short carry no audio: libopus emits a lone TOC byte for a frame it
/// discontinues in DTX (RFC 7587 §3.1.3 lets senders skip packets of ≤ 2 bytes).
pub const DTX_PACKET_MAX_LEN: usize = 2;

/// Encoder settings for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderConfig {
    /// Target bitrate, bits per second (the ceiling of adaptation).
    pub bitrate_bps: u32,
    /// In-band forward error correction.
    pub fec: bool,
    /// Discontinuous transmission: stop sending during silence.
    pub dtx: bool,
    /// libopus complexity, 0..=10.
    pub complexity: u8,
    /// The widest audio band to code (narrowed further when FEC needs the bits).
    pub max_band: AudioBand,
}

/// An Opus audio band, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum AudioBand {
    /// 0-4 kHz.
    Narrowband,
    /// 0-6 kHz.
    Mediumband,
    /// 0-8 kHz ("HD voice"), SILK only: every bit goes to the band that carries
    /// speech. At 32 kb/s it scores about 0.3 PESQ-WB higher than fullband hybrid,
    /// which spends a third of the rate above 8 kHz (measured with
    /// `scripts/quality.sh`).
    #[default]
    Wideband,
    /// 0-12 kHz.
    Superwideband,
    /// 0-20 kHz: hybrid SILK + CELT; more air in the voice, less rate for its core.
    Fullband,
}

impl AudioBand {
    fn opus(self) -> opusic_c::Bandwidth {
        match self {
            AudioBand::Narrowband => opusic_c::Bandwidth::Narrow,
            AudioBand::Mediumband => opusic_c::Bandwidth::Medium,
            AudioBand::Wideband => opusic_c::Bandwidth::Wide,
            AudioBand::Superwideband => opusic_c::Bandwidth::Superwide,
            AudioBand::Fullband => opusic_c::Bandwidth::Full,
        }
    }
}

impl FromStr for AudioBand {
    type Err = MediaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nb" | "narrowband" => Ok(AudioBand::Narrowband),
            "mb" | "mediumband" => Ok(AudioBand::Mediumband),
            "wb" | "wideband" => Ok(AudioBand::Wideband),
            "swb" | "superwideband" => Ok(AudioBand::Superwideband),
            "fb" | "fullband" => Ok(AudioBand::Fullband),
            other => Err(MediaError::Config {
                key: "bandwidth",
                reason: format!("`{other}` is not one of nb, mb, wb, swb, fb"),
            }),
        }
    }
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            bitrate_bps: DEFAULT_BITRATE_BPS,
            fec: true,
            dtx: false,
            complexity: DEFAULT_COMPLEXITY,
            max_band: AudioBand::default(),
        }
    }
}

impl EncoderConfig {
    /// Checks every field, naming the first one out of range.
    pub fn validate(&self) -> Result<(), MediaError> {
        if !(MIN_BITRATE_BPS..=MAX_BITRATE_BPS).contains(&self.bitrate_bps) {
            return Err(MediaError::Config {
                key: "bitrate",
                reason: format!(
                    "{} b/s is outside {MIN_BITRATE_BPS}..={MAX_BITRATE_BPS}",
                    self.bitrate_bps
                ),
            });
        }
        if self.complexity > 10 {
            return Err(MediaError::Config {
                key: "complexity",
                reason: format!("{} is outside 0..=10", self.complexity),
            });
        }
        Ok(())
    }
}

/// What the path and the far end report back to the sender.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PathFeedback {
    /// Fraction of frames lost since the previous report, 0.0..=1.0, as the receiver
    /// counted it (before FEC recovery).
    pub loss_fraction: f64,
    /// Bitrate the path can carry for audio, when the router knows it.
    pub available_bps: Option<u32>,
}

/// The encoder settings a [`RatePolicy`] chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Bitrate to code at.
    pub bitrate_bps: u32,
    /// libopus `packet_loss_perc`: how much loss the FEC should be sized for.
    pub expected_loss_pct: u8,
    /// The widest audio band to code.
    pub max_bandwidth: AudioBand,
}

/// Decides bitrate and FEC sizing from path feedback.
pub trait RatePolicy {
    /// The settings to start a call with.
    fn initial(&mut self, config: &EncoderConfig) -> RateDecision;
    /// The settings after a report from the path.
    fn on_feedback(&mut self, config: &EncoderConfig, feedback: &PathFeedback) -> RateDecision;
}

/// How much of the last loss estimate survives each report that shows less loss:
/// fast attack, slow release, so one clean second does not switch FEC off in the
/// middle of a lossy stretch.
const LOSS_RELEASE: f64 = 0.7;

/// libopus stops scaling FEC thresholds beyond 25 % (`decide_fec`), and LBRR gain
/// stops changing well before: asking for more only lowers the main layer's quality.
const MAX_EXPECTED_LOSS_PCT: u8 = 25;

/// Fraction of the path's available bitrate the audio may take, leaving room for
/// packet headers, probes and redundant copies on a second path.
const AVAILABLE_HEADROOM: f64 = 0.8;

/// Margin above libopus's FEC threshold, so rounding in its fixed-point arithmetic
/// never flips FEC off.
const FEC_FLOOR_MARGIN_BPS: u32 = 1_000;

/// The default policy.
///
/// - Expected loss: the receiver-reported loss with fast attack and slow release
///   (each clean report keeps 70 % of the estimate), rounded to whole percent, at
///   most 25 % (0 when FEC is off), starting at [`INITIAL_EXPECTED_LOSS_PCT`].
///   Once a clean path has brought the estimate under 0.5 %, libopus stops coding
///   LBRR and the main layer gets every bit back. Scaling the expected loss up or
///   down from the measured loss (×0.5, ×2) changed PESQ-WB by less than 0.05 at
///   5-20 % loss, so it is used as is.
/// - Bitrate: the configured bitrate, lowered to 80 % of what the path can carry when
///   that is known, but never below the rate at which libopus still codes FEC for
///   wideband speech at the current loss ([`fec_floor_bps`]).
/// - Bandwidth: the widest band whose FEC threshold the bitrate clears, so a lower
///   bitrate narrows the band instead of silently dropping FEC.
#[derive(Debug, Clone, Default)]
pub struct DefaultRatePolicy {
    loss_estimate: f64,
}

impl DefaultRatePolicy {
    fn decide(&self, config: &EncoderConfig, available_bps: Option<u32>) -> RateDecision {
        let expected_loss_pct = if config.fec {
            // The estimate is clamped to 0..=1, so the product fits a u8 after the clamp.
            let pct = (self.loss_estimate * 100.0).round().clamp(0.0, 100.0) as u8;
            pct.min(MAX_EXPECTED_LOSS_PCT)
        } else {
            0
        };
        let mut bitrate_bps = config.bitrate_bps;
        if let Some(available) = available_bps {
            let usable = (f64::from(available) * AVAILABLE_HEADROOM) as u32;
            bitrate_bps = bitrate_bps.min(usable);
        }
        let floor = if config.fec {
            fec_floor_bps(expected_loss_pct)
        } else {
            MIN_BITRATE_BPS
        };
        let bitrate_bps = bitrate_bps.max(floor).min(MAX_BITRATE_BPS);
        let fec_band = if config.fec {
            widest_fec_bandwidth(bitrate_bps, expected_loss_pct)
        } else {
            AudioBand::Fullband
        };
        let max_bandwidth = fec_band.min(config.max_band);
        RateDecision {
            bitrate_bps,
            expected_loss_pct,
            max_bandwidth,
        }
    }
}

impl RatePolicy for DefaultRatePolicy {
    fn initial(&mut self, config: &EncoderConfig) -> RateDecision {
        self.loss_estimate = f64::from(INITIAL_EXPECTED_LOSS_PCT) / 100.0;
        self.decide(config, None)
    }

    fn on_feedback(&mut self, config: &EncoderConfig, feedback: &PathFeedback) -> RateDecision {
        let reported = if feedback.loss_fraction.is_finite() {
            feedback.loss_fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.loss_estimate = reported.max(self.loss_estimate * LOSS_RELEASE);
        self.decide(config, feedback.available_bps)
    }
}

/// The bitrate above which libopus codes in-band FEC at `bandwidth` and `loss_pct`.
///
/// This mirrors `decide_fec` in libopus 1.6 `src/opus_encoder.c`: a per-band base
/// (NB 12, MB 14, WB 16, SWB 20, FB 22 kb/s) plus 1 kb/s of hysteresis when FEC was
/// off, scaled by `(125 - min(loss, 25)) / 100`. When the rate is below it and loss is
/// above 5 %, libopus narrows the band on its own; at ≤ 5 % it drops FEC.
pub fn fec_threshold_bps(bandwidth: AudioBand, loss_pct: u8) -> u32 {
    const HYSTERESIS_BPS: u32 = 1_000;
    let base = match bandwidth {
        AudioBand::Narrowband => 12_000,
        AudioBand::Mediumband => 14_000,
        AudioBand::Wideband => 16_000,
        AudioBand::Superwideband => 20_000,
        AudioBand::Fullband => 22_000,
    };
    let scale = 125 - u32::from(loss_pct.min(MAX_EXPECTED_LOSS_PCT));
    (base + HYSTERESIS_BPS) * scale / 100
}

/// The lowest bitrate the default policy adapts down to while FEC is on: enough for
/// wideband (the band that carries speech intelligibility) with FEC.
pub fn fec_floor_bps(loss_pct: u8) -> u32 {
    fec_threshold_bps(AudioBand::Wideband, loss_pct) + FEC_FLOOR_MARGIN_BPS
}

fn widest_fec_bandwidth(bitrate_bps: u32, loss_pct: u8) -> AudioBand {
    [
        AudioBand::Fullband,
        AudioBand::Superwideband,
        AudioBand::Wideband,
        AudioBand::Mediumband,
    ]
    .into_iter()
    .find(|&bw| bitrate_bps >= fec_threshold_bps(bw, loss_pct) + FEC_FLOOR_MARGIN_BPS)
    .unwrap_or(AudioBand::Narrowband)
}

/// Maps a libopus error code for `call` to a [`MediaError`].
fn opus_error(call: &'static str) -> impl Fn(ErrorCode) -> MediaError {
    move |code| MediaError::Codec {
        call,
        message: code.message(),
    }
}

/// An Opus encoder for one outgoing stream.
pub struct Encoder<P: RatePolicy = DefaultRatePolicy> {
    inner: opusic_c::Encoder,
    /// The frame as libopus's `opus_int16`, which `opusic-c` spells `u16`.
    scratch: Box<[u16; FRAME_SAMPLES]>,
    config: EncoderConfig,
    policy: P,
    current: RateDecision,
}

impl<P: RatePolicy> std::fmt::Debug for Encoder<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("config", &self.config)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl Encoder<DefaultRatePolicy> {
    /// An encoder with the default rate policy.
    pub fn new(config: EncoderConfig) -> Result<Self, MediaError> {
        Self::with_policy(config, DefaultRatePolicy::default())
    }
}

impl<P: RatePolicy> Encoder<P> {
    /// An encoder whose bitrate and FEC sizing follow `policy`.
    pub fn with_policy(config: EncoderConfig, mut policy: P) -> Result<Self, MediaError> {
        config.validate()?;
        let mut inner =
            opusic_c::Encoder::new(Channels::Mono, SampleRate::Hz48000, Application::Voip)
                .map_err(opus_error("opus_encoder_create"))?;
        inner
            .set_complexity(config.complexity)
            .map_err(opus_error("OPUS_SET_COMPLEXITY"))?;
        // Unconstrained VBR: measured 0.4 PESQ-WB above CBR and 0.1 above constrained
        // VBR at 32 kb/s; hard frames get the bits, pauses give them back.
        inner.set_vbr(true).map_err(opus_error("OPUS_SET_VBR"))?;
        let fec = if config.fec {
            InbandFec::Mode1
        } else {
            InbandFec::Off
        };
        inner
            .set_inband_fec(fec)
            .map_err(opus_error("OPUS_SET_INBAND_FEC"))?;
        inner
            .set_dtx(config.dtx)
            .map_err(opus_error("OPUS_SET_DTX"))?;
        // A call carries speech: without the hint libopus may switch a steady,
        // tonal stretch to CELT-only mode, which has no in-band FEC at all.
        inner
            .set_signal(Signal::Voice)
            .map_err(opus_error("OPUS_SET_SIGNAL"))?;
        let current = policy.initial(&config);
        let mut encoder = Encoder {
            inner,
            scratch: Box::new([0; FRAME_SAMPLES]),
            config,
            policy,
            current,
        };
        encoder.apply(current)?;
        Ok(encoder)
    }

    fn apply(&mut self, decision: RateDecision) -> Result<(), MediaError> {
        let bits = decision.bitrate_bps;
        self.inner
            .set_bitrate(Bitrate::Value(bits))
            .map_err(opus_error("OPUS_SET_BITRATE"))?;
        self.inner
            .set_packet_loss(decision.expected_loss_pct)
            .map_err(opus_error("OPUS_SET_PACKET_LOSS_PERC"))?;
        self.inner
            .set_max_bandwidth(decision.max_bandwidth.opus())
            .map_err(opus_error("OPUS_SET_MAX_BANDWIDTH"))?;
        self.current = decision;
        Ok(())
    }

    /// Encodes one 20 ms frame of 48 kHz mono PCM into `out` and returns the packet
    /// length. A length of at most [`DTX_PACKET_MAX_LEN`] means "nothing to send"
    /// (DTX). `out` should hold [`MAX_OPUS_PACKET`] bytes.
    pub fn encode(&mut self, pcm: &[i16], out: &mut [u8]) -> Result<usize, MediaError> {
        if pcm.len() != FRAME_SAMPLES {
            return Err(MediaError::Config {
                key: "frame",
                reason: format!("{} samples given, {FRAME_SAMPLES} needed", pcm.len()),
            });
        }
        let limit = out.len().min(MAX_OPUS_PACKET);
        for (dst, &src) in self.scratch.iter_mut().zip(pcm) {
            // Same 16 bits: libopus reads them as opus_int16.
            *dst = src as u16;
        }
        self.inner
            .encode_to_slice(&self.scratch[..], &mut out[..limit])
            .map_err(opus_error("opus_encode"))
    }

    /// Feeds a receiver report (and the path's capacity, when known) to the rate
    /// policy and applies its decision.
    pub fn on_feedback(&mut self, feedback: &PathFeedback) -> Result<RateDecision, MediaError> {
        let decision = self.policy.on_feedback(&self.config, feedback);
        if decision != self.current {
            self.apply(decision)?;
        }
        Ok(decision)
    }

    /// The settings in force.
    pub fn rate(&self) -> RateDecision {
        self.current
    }

    /// The configuration the encoder was made with.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// The encoder's look-ahead in 48 kHz samples: decoded audio lags the input by
    /// this much on top of the frame itself.
    pub fn lookahead(&mut self) -> Result<usize, MediaError> {
        let samples = self
            .inner
            .get_look_ahead()
            .map_err(opus_error("OPUS_GET_LOOKAHEAD"))?;
        Ok(usize::try_from(samples).unwrap_or(0))
    }
}

/// Why a decode produced concealment instead of the packet's audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeFault {
    /// The packet is not a 20 ms mono-decodable Opus packet.
    WrongDuration,
    /// libopus rejected the packet as corrupt.
    Corrupt,
}

/// An Opus decoder for one incoming stream. Every method fills exactly one 20 ms frame
/// and never fails: a packet libopus rejects is concealed instead, and reported.
pub struct Decoder {
    inner: opusic_c::Decoder,
    /// libopus's `opus_int16` output, spelled `u16` by `opusic-c`.
    scratch: Box<[u16; FRAME_SAMPLES]>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").finish_non_exhaustive()
    }
}

impl Decoder {
    /// A 48 kHz mono decoder with Deep PLC and NoLACE on ([`DECODER_COMPLEXITY`]).
    pub fn new() -> Result<Self, MediaError> {
        let mut inner = opusic_c::Decoder::new(Channels::Mono, SampleRate::Hz48000)
            .map_err(opus_error("opus_decoder_create"))?;
        inner
            .set_complexity(DECODER_COMPLEXITY)
            .map_err(opus_error("OPUS_SET_COMPLEXITY"))?;
        Ok(Decoder {
            inner,
            scratch: Box::new([0; FRAME_SAMPLES]),
        })
    }

    /// Runs libopus on `packet` (empty: conceal) into `out`.
    fn run(
        &mut self,
        packet: &[u8],
        out: &mut [i16; FRAME_SAMPLES],
        fec: bool,
    ) -> Result<usize, ErrorCode> {
        let n = self
            .inner
            .decode_to_slice(packet, &mut self.scratch[..], fec)?;
        for (dst, &src) in out.iter_mut().zip(self.scratch.iter()) {
            // Same 16 bits: libopus wrote opus_int16.
            *dst = src as i16;
        }
        Ok(n)
    }

    /// Decodes `packet` into `out` (one frame). On a bad packet the frame is concealed
    /// and the fault returned.
    pub fn decode(
        &mut self,
        packet: &[u8],
        out: &mut [i16; FRAME_SAMPLES],
    ) -> Result<(), DecodeFault> {
        self.decode_inner(packet, out, false)
    }

    /// Recovers the frame *before* `next_packet` from its in-band FEC into `out`. When
    /// the packet carries no FEC, libopus conceals instead (check [`has_fec`] first to
    /// count which one happened).
    pub fn decode_fec(
        &mut self,
        next_packet: &[u8],
        out: &mut [i16; FRAME_SAMPLES],
    ) -> Result<(), DecodeFault> {
        self.decode_inner(next_packet, out, true)
    }

    /// Packet loss concealment (or comfort noise during DTX) for one frame.
    pub fn conceal(&mut self, out: &mut [i16; FRAME_SAMPLES]) {
        if self.run(&[], out, false).is_err() {
            // Concealment with a null packet only fails on a bad frame size, which
            // FRAME_SAMPLES is not; silence is the safe answer all the same.
            out.fill(0);
        }
    }

    fn decode_inner(
        &mut self,
        packet: &[u8],
        out: &mut [i16; FRAME_SAMPLES],
        fec: bool,
    ) -> Result<(), DecodeFault> {
        if packet_samples(packet) != Some(FRAME_SAMPLES) {
            self.conceal(out);
            return Err(DecodeFault::WrongDuration);
        }
        match self.run(packet, out, fec) {
            Ok(FRAME_SAMPLES) => Ok(()),
            Ok(_) => {
                self.conceal(out);
                Err(DecodeFault::WrongDuration)
            }
            Err(_) => {
                self.conceal(out);
                Err(DecodeFault::Corrupt)
            }
        }
    }
}

/// The number of 48 kHz samples `packet` decodes to, or `None` when its header is
/// malformed (RFC 6716 §3.1-3.2).
pub fn packet_samples(packet: &[u8]) -> Option<usize> {
    if packet.is_empty() {
        return None;
    }
    opusic_c::utils::get_nb_samples(packet, SampleRate::Hz48000).ok()
}

/// Whether `packet` carries in-band FEC (an LBRR frame) for the frame before it.
///
/// The TOC byte's config (RFC 6716 §3.1) says whether a SILK layer is present (SILK-only
/// and hybrid modes, configs 0..=15); for a 20 ms SILK frame, the LBRR flag is the bit
/// after the VAD flag at the top of the first coded byte (§4.2.3: both are coded with
/// probability ½ at the very start of the range coder, so they are its first bits).
/// This is what libopus's `opus_packet_has_lbrr` reads; `opusic-c` does not expose
/// it.
pub fn has_fec(packet: &[u8]) -> bool {
    /// Configs 0..=11 are SILK-only and 12..=15 hybrid; 16.. are CELT-only.
    const LAST_SILK_CONFIG: u8 = 15;
    /// Bit of the first coded byte holding the LBRR flag of a 20 ms mono frame.
    const LBRR_BIT_20MS_MONO: u8 = 6;
    let Some(&toc) = packet.first() else {
        return false;
    };
    if toc >> 3 > LAST_SILK_CONFIG || packet_samples(packet) != Some(FRAME_SAMPLES) {
        return false;
    }
    first_frame_byte(packet).is_some_and(|b| (b >> LBRR_BIT_20MS_MONO) & 1 == 1)
}

/// The first byte of the first frame's data (RFC 6716 §3.2), if the packet has one.
fn first_frame_byte(packet: &[u8]) -> Option<u8> {
    let toc = *packet.first()?;
    let offset = match toc & 0x3 {
        // One frame, or two of equal size: the data follows the TOC.
        0 | 1 => 1,
        // Two frames, the first's length in one or two bytes.
        2 => match *packet.get(1)? {
            0..=251 => 2,
            _ => 3,
        },
        // A frame count byte, optional padding lengths, optional VBR frame lengths.
        _ => {
            let count = *packet.get(1)?;
            let frames = usize::from(count & 0x3f);
            let mut at = 2;
            if count & 0x40 != 0 {
                // Padding length: each 255 means 254 more bytes and another length byte.
                loop {
                    let b = *packet.get(at)?;
                    at += 1;
                    if b != 255 {
                        break;
                    }
                }
            }
            if count & 0x80 != 0 {
                for _ in 1..frames {
                    at += if *packet.get(at)? >= 252 { 2 } else { 1 };
                }
            }
            at
        }
    };
    packet.get(offset).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SAMPLE_RATE;

    fn tone(frame: usize) -> [i16; FRAME_SAMPLES] {
        let mut pcm = [0i16; FRAME_SAMPLES];
        for (i, s) in pcm.iter_mut().enumerate() {
            let t = (frame * FRAME_SAMPLES + i) as f64 / f64::from(SAMPLE_RATE);
            // A vowel-like mix of harmonics of 180 Hz, so SILK codes it as voiced speech.
            let v: f64 = (1..=8)
                .map(|h| (2.0 * std::f64::consts::PI * 180.0 * h as f64 * t).sin() / h as f64)
                .sum();
            *s = (v * 6000.0) as i16;
        }
        pcm
    }

    #[test]
    fn config_errors_name_the_key() {
        let bad = EncoderConfig {
            bitrate_bps: 1,
            ..EncoderConfig::default()
        };
        let err = Encoder::new(bad).unwrap_err().to_string();
        assert!(err.contains("bitrate"), "{err}");
        let bad = EncoderConfig {
            complexity: 11,
            ..EncoderConfig::default()
        };
        assert!(
            Encoder::new(bad)
                .unwrap_err()
                .to_string()
                .contains("complexity")
        );
    }

    #[test]
    fn fec_is_coded_and_recovers_a_lost_frame() {
        let mut enc = Encoder::new(EncoderConfig::default()).unwrap();
        // No FEC before the receiver reports loss; after a report of 10 %, FEC is on.
        let d = enc
            .on_feedback(&PathFeedback {
                loss_fraction: 0.1,
                available_bps: None,
            })
            .unwrap();
        assert_eq!(d.expected_loss_pct, 10);
        let mut dec = Decoder::new().unwrap();
        let mut buf = [0u8; MAX_OPUS_PACKET];
        let mut packets = Vec::new();
        for f in 0..20 {
            let n = enc.encode(&tone(f), &mut buf).unwrap();
            packets.push(buf[..n].to_vec());
        }
        // LBRR is coded once the encoder has a previous frame to protect.
        let tocs: Vec<u8> = packets.iter().map(|p| p[0] >> 3).collect();
        assert!(
            packets[10..].iter().all(|p| has_fec(p)),
            "FEC missing: configs {tocs:?}"
        );
        let mut out = [0i16; FRAME_SAMPLES];
        for p in &packets[..10] {
            dec.decode(p, &mut out).unwrap();
        }
        dec.decode_fec(&packets[11], &mut out).unwrap();
        let energy: f64 = out.iter().map(|&s| f64::from(s).powi(2)).sum();
        assert!(energy > 1e9, "FEC frame is near silent: {energy}");
        dec.decode(&packets[11], &mut out).unwrap();
    }

    #[test]
    fn fec_flag_is_found_behind_every_framing_code() {
        let mut enc = Encoder::new(EncoderConfig::default()).unwrap();
        enc.on_feedback(&PathFeedback {
            loss_fraction: 0.1,
            available_bps: None,
        })
        .unwrap();
        let mut buf = [0u8; MAX_OPUS_PACKET];
        let mut seen = 0;
        for f in 0..20 {
            let n = enc.encode(&tone(f), &mut buf).unwrap();
            let p = &buf[..n];
            assert_eq!(p[0] & 3, 0, "libopus codes one VBR frame with code 0");
            let body = &p[1..];
            // The same frame, framed with code 3 (one frame, padded with 300 bytes).
            let mut c3 = vec![p[0] | 3, 0x41, 255, 45];
            c3.extend_from_slice(body);
            c3.extend(std::iter::repeat_n(0u8, 299));
            assert_eq!(packet_samples(&c3), Some(FRAME_SAMPLES));
            assert_eq!(has_fec(&c3), has_fec(p));
            seen += usize::from(has_fec(p));
        }
        assert!(seen >= 10);
        assert!(!has_fec(&[]) && !has_fec(&[0x4b]) && !has_fec(&[0x4b, 0x41, 255]));
    }

    #[test]
    fn no_fec_without_fec() {
        let cfg = EncoderConfig {
            fec: false,
            ..EncoderConfig::default()
        };
        let mut enc = Encoder::new(cfg).unwrap();
        assert_eq!(enc.rate().expected_loss_pct, 0);
        let mut buf = [0u8; MAX_OPUS_PACKET];
        for f in 0..10 {
            let n = enc.encode(&tone(f), &mut buf).unwrap();
            assert!(!has_fec(&buf[..n]));
        }
    }

    #[test]
    fn corrupt_packets_are_concealed_not_panics() {
        let mut dec = Decoder::new().unwrap();
        let mut out = [1i16; FRAME_SAMPLES];
        assert_eq!(dec.decode(&[], &mut out), Err(DecodeFault::WrongDuration));
        // A 60 ms packet (config 3, SILK NB 60 ms) is refused, not overflowed.
        assert_eq!(
            dec.decode(&[3 << 3, 0, 0], &mut out),
            Err(DecodeFault::WrongDuration)
        );
        // Code 3 with a frame count of zero is malformed.
        assert!(dec.decode(&[0x0b, 0x00], &mut out).is_err());
        for seed in 0u8..=255 {
            let junk: Vec<u8> = (0..40u8)
                .map(|i| i.wrapping_mul(seed).wrapping_add(seed))
                .collect();
            let _ = dec.decode(&junk, &mut out);
            let _ = dec.decode_fec(&junk, &mut out);
            let _ = has_fec(&junk);
        }
    }

    #[test]
    fn policy_tracks_loss_and_keeps_fec_above_its_floor() {
        let cfg = EncoderConfig::default();
        let mut enc = Encoder::new(cfg).unwrap();
        assert_eq!(enc.rate().expected_loss_pct, INITIAL_EXPECTED_LOSS_PCT);
        let d = enc
            .on_feedback(&PathFeedback {
                loss_fraction: 0.12,
                available_bps: None,
            })
            .unwrap();
        assert_eq!(d.expected_loss_pct, 12);
        assert_eq!(d.bitrate_bps, 32_000);
        // Slow release: one clean report does not switch FEC off (12 % x 0.7).
        let d = enc.on_feedback(&PathFeedback::default()).unwrap();
        assert_eq!(d.expected_loss_pct, 8);
        // A starved path lowers the bitrate, but not below the FEC floor.
        let d = enc
            .on_feedback(&PathFeedback {
                loss_fraction: 0.0,
                available_bps: Some(8_000),
            })
            .unwrap();
        assert_eq!(d.bitrate_bps, fec_floor_bps(d.expected_loss_pct));
        assert!(d.bitrate_bps > fec_threshold_bps(AudioBand::Wideband, d.expected_loss_pct));
        assert_eq!(d.max_bandwidth, AudioBand::Wideband);
        // NaN from a broken report is treated as no loss, not propagated.
        let d = enc
            .on_feedback(&PathFeedback {
                loss_fraction: f64::NAN,
                available_bps: None,
            })
            .unwrap();
        assert!(d.expected_loss_pct >= 1);
        // A long clean stretch switches FEC off; the bitrate floor stays.
        for _ in 0..20 {
            enc.on_feedback(&PathFeedback::default()).unwrap();
        }
        let d = enc.rate();
        assert_eq!(d.expected_loss_pct, 0);
        assert_eq!(d.bitrate_bps, 32_000);
    }

    #[test]
    fn thresholds_match_libopus_table() {
        // WB at 0 % loss: (16000 + 1000) * 125 / 100.
        assert_eq!(fec_threshold_bps(AudioBand::Wideband, 0), 21_250);
        // FB at 25 % and beyond: (22000 + 1000) * 100 / 100.
        assert_eq!(fec_threshold_bps(AudioBand::Fullband, 40), 23_000);
        assert_eq!(widest_fec_bandwidth(32_000, 5), AudioBand::Fullband);
        assert_eq!(widest_fec_bandwidth(24_000, 5), AudioBand::Wideband);
    }
}
