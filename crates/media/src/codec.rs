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
//! `opusic-c` wrapper is used because it exposes the decoder's complexity and DRED
//! (the `opus` 0.4 wrapper does neither, and this workspace forbids `unsafe`).
//!
//! # DRED
//!
//! DRED (Deep REDundancy, libopus ≥ 1.5) is the other redundancy Opus has: each
//! packet carries up to a second of past audio as neural-coded features, so a run
//! of lost frames can be rebuilt from the first packet after it. It is supported
//! end to end ([`EncoderConfig::dred_ms`], [`Decoder::decode_dred`], [`has_dred`];
//! the receiver uses it whenever a packet carries it) but off by default
//! ([`DEFAULT_DRED_MS`]), because on the quality script's measure it does not pay
//! for its bits at 32 kb/s:
//!
//! - With the jitter buffer's one frame of look-ahead, a run of lost frames is
//!   due before the packet after it arrives, so only its last frame can be rebuilt,
//!   which LBRR does already. LBRR + DRED scored 0.02-0.17 PESQ-WB *below* LBRR
//!   alone at 5-20 % random and 10 % bursty loss (natural and synthetic speech):
//!   DRED's bits come out of the main layer and it rarely gets to rebuild anything.
//! - A frame rebuilt from DRED is well aligned and its spectral envelope is much
//!   closer to the original than Deep PLC's, but further than LBRR's (log-spectral
//!   distance about 1.9 dB against 1.0 for LBRR and 3.3 for Deep PLC on natural
//!   speech), and PESQ scores it low: DRED alone (no LBRR) at 10 % random loss
//!   rebuilt 54 of 65 lost frames and still scored 3.11 against 3.78 for LBRR,
//!   0.57 above Deep PLC alone. (PESQ is known to underrate vocoded speech; a
//!   listening test or PLCMOS might rank it higher.)
//! - More look-ahead ([`crate::jitter::JitterConfig::recovery_frames`]) lets DRED
//!   rebuild whole runs, but each frame adds 20 ms. Two frames (77 ms median
//!   pipeline latency, over the 60 ms budget) gained nothing; three (97 ms) made
//!   DRED alone beat LBRR on 60 ms bursts (3.28 against 3.11) and nothing else.

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

/// The most past audio a packet's DRED can cover: libopus codes at most 26 latent
/// vectors of 40 ms (`DRED_MAX_LATENTS`), and `OPUS_SET_DRED_DURATION` takes
/// 0..=104 units of 10 ms.
pub const MAX_DRED_MS: u16 = 1040;

/// DRED's unit of duration in `OPUS_SET_DRED_DURATION`.
const DRED_UNIT_MS: u16 = 10;

/// Default DRED duration: off, see [the module docs](self#dred) for the measurements.
/// 100 ms is a sensible value when turning it on: it covers the longest run of lost
/// frames the jitter buffer can wait for at its default bounds with room to spare,
/// and libopus sizes the bits from the expected loss anyway.
pub const DEFAULT_DRED_MS: u16 = 0;

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
    /// Deep REDundancy: how much past audio, in ms (0 = off, at most
    /// [`MAX_DRED_MS`]), each packet may carry as neural-coded features, so the
    /// receiver can rebuild a run of lost frames from the packet after it. libopus
    /// sizes it from the expected loss and takes its bits out of `bitrate_bps`.
    pub dred_ms: u16,
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
            dred_ms: DEFAULT_DRED_MS,
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
        if self.dred_ms > MAX_DRED_MS {
            return Err(MediaError::Config {
                key: "dred",
                reason: format!("{} ms is outside 0..={MAX_DRED_MS}", self.dred_ms),
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
        let expected_loss_pct = if config.fec || config.dred_ms > 0 {
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
        // In range: validate() bounds dred_ms by MAX_DRED_MS, 104 units.
        let dred_units = u8::try_from(config.dred_ms / DRED_UNIT_MS).unwrap_or(u8::MAX);
        inner
            .set_dred_duration(dred_units)
            .map_err(opus_error("OPUS_SET_DRED_DURATION"))?;
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

/// The longest run of lost frames [`Decoder::decode_dred`] rebuilds at once, 320 ms:
/// more than the jitter buffer's look-ahead can ever wait for
/// ([`crate::jitter::MAX_RECOVERY_FRAMES`]), and small enough that the float buffer
/// libopus puts on the stack for one call stays at 60 KiB. A longer run is concealed
/// until its remaining part fits.
pub const MAX_DRED_FRAMES: usize = 16;

/// An Opus decoder for one incoming stream. Every method fills whole 20 ms frames
/// and never fails: a packet libopus rejects is concealed instead, and reported.
pub struct Decoder {
    /// libopus's decoder inside `opusic-c`'s DRED wrapper, which owns it.
    inner: opusic_c::dred::Dred,
    /// libopus's `opus_int16` output, spelled `u16` by `opusic-c`; room for the
    /// longest DRED rebuild.
    scratch: Box<[u16]>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").finish_non_exhaustive()
    }
}

impl Decoder {
    /// A 48 kHz mono decoder with Deep PLC and NoLACE on ([`DECODER_COMPLEXITY`]),
    /// able to decode DRED.
    pub fn new() -> Result<Self, MediaError> {
        let mut decoder = opusic_c::Decoder::new(Channels::Mono, SampleRate::Hz48000)
            .map_err(opus_error("opus_decoder_create"))?;
        decoder
            .set_complexity(DECODER_COMPLEXITY)
            .map_err(opus_error("OPUS_SET_COMPLEXITY"))?;
        let inner =
            opusic_c::dred::Dred::new(decoder).map_err(opus_error("opus_dred_decoder_create"))?;
        Ok(Decoder {
            inner,
            scratch: vec![0; MAX_DRED_FRAMES * FRAME_SAMPLES].into_boxed_slice(),
        })
    }

    /// Copies the first `out.len()` samples of the scratch buffer to `out`.
    fn copy_out(&self, out: &mut [i16]) {
        for (dst, &src) in out.iter_mut().zip(self.scratch.iter()) {
            // Same 16 bits: libopus wrote opus_int16.
            *dst = src as i16;
        }
    }

    /// Runs libopus on `packet` (empty: conceal) into `out`.
    fn run(
        &mut self,
        packet: &[u8],
        out: &mut [i16; FRAME_SAMPLES],
        fec: bool,
    ) -> Result<usize, ErrorCode> {
        let n = self.inner.decoder_mut().decode_to_slice(
            packet,
            &mut self.scratch[..FRAME_SAMPLES],
            fec,
        )?;
        self.copy_out(out);
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

    /// Rebuilds the `out.len() / FRAME_SAMPLES` frames right before `next_packet`
    /// from its DRED (Deep REDundancy) into `out`: the whole run of lost frames in
    /// one call, since libopus places the rebuilt span by its length. Where the
    /// packet carries no DRED (check [`has_dred`]) or its DRED does not reach back
    /// that far, libopus conceals. `out` must hold 1..=[`MAX_DRED_FRAMES`] whole
    /// frames; anything else, or a corrupt packet, is concealed and reported.
    pub fn decode_dred(&mut self, next_packet: &[u8], out: &mut [i16]) -> Result<(), DecodeFault> {
        let frames = out.len() / FRAME_SAMPLES;
        let whole =
            out.len().is_multiple_of(FRAME_SAMPLES) && (1..=MAX_DRED_FRAMES).contains(&frames);
        if !whole || packet_samples(next_packet) != Some(FRAME_SAMPLES) {
            self.conceal_all(out);
            return Err(DecodeFault::WrongDuration);
        }
        let len = out.len();
        match self
            .inner
            .decode_to_slice(next_packet, &mut self.scratch[..len])
        {
            Ok(n) if n == len => {
                self.copy_out(out);
                Ok(())
            }
            Ok(_) => {
                self.conceal_all(out);
                Err(DecodeFault::WrongDuration)
            }
            Err(_) => {
                self.conceal_all(out);
                Err(DecodeFault::Corrupt)
            }
        }
    }

    /// Packet loss concealment (or comfort noise during DTX) for one frame.
    pub fn conceal(&mut self, out: &mut [i16; FRAME_SAMPLES]) {
        if self.run(&[], out, false).is_err() {
            // Concealment with a null packet only fails on a bad frame size, which
            // FRAME_SAMPLES is not; silence is the safe answer all the same.
            out.fill(0);
        }
    }

    /// Conceals every whole frame of `out` and zeroes any remainder.
    fn conceal_all(&mut self, out: &mut [i16]) {
        let mut frame = [0i16; FRAME_SAMPLES];
        let mut chunks = out.chunks_exact_mut(FRAME_SAMPLES);
        for chunk in &mut chunks {
            self.conceal(&mut frame);
            chunk.copy_from_slice(&frame);
        }
        chunks.into_remainder().fill(0);
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

/// Whether `packet` carries DRED (Deep REDundancy) for the audio before it.
///
/// libopus 1.5+ puts DRED in the packet's padding as an Opus extension
/// (draft-ietf-mlcodec-opus-extension): a long extension with ID
/// [`DRED_EXTENSION_ID`] whose payload starts with the experimental tag `'D'` and
/// version [`DRED_EXPERIMENTAL_VERSION`], as `dred_find_payload` in libopus 1.6
/// looks for. Only single-frame packets (this crate's 20 ms frames) are searched.
pub fn has_dred(packet: &[u8]) -> bool {
    if packet_samples(packet) != Some(FRAME_SAMPLES) {
        return false;
    }
    let Some(mut ext) = padding(packet) else {
        return false;
    };
    while let Some((&id_byte, rest)) = ext.split_first() {
        let (id, long_len) = (id_byte >> 1, id_byte & 1 == 1);
        let payload;
        match id {
            // Padding: one byte (L = 1), or everything that follows (L = 0).
            0 if long_len => {
                ext = rest;
                continue;
            }
            0 => return false,
            // A frame separator: what follows belongs to a later frame.
            1 => return false,
            // "Repeat these extensions": nothing to repeat in a one-frame packet.
            2 => {
                ext = rest;
                continue;
            }
            // Short extensions: zero or one byte of data.
            3..=31 => {
                let skip = usize::from(long_len);
                let Some(after) = rest.get(skip..) else {
                    return false;
                };
                ext = after;
                continue;
            }
            // Long extensions: a 255-laced length (L = 1), or the rest (L = 0).
            _ if !long_len => {
                payload = rest;
                ext = &[];
            }
            _ => {
                let mut len = 0usize;
                let mut at = 0;
                loop {
                    let Some(&b) = rest.get(at) else {
                        return false;
                    };
                    at += 1;
                    len += usize::from(b);
                    if b != 255 {
                        break;
                    }
                }
                let Some(p) = rest.get(at..at + len) else {
                    return false;
                };
                payload = p;
                ext = &rest[at + len..];
            }
        }
        if id == DRED_EXTENSION_ID
            && payload.len() > DRED_TAG.len()
            && payload.starts_with(&DRED_TAG)
        {
            return true;
        }
    }
    false
}

/// The Opus extension ID libopus 1.6 codes DRED with (`DRED_EXTENSION_ID`).
pub const DRED_EXTENSION_ID: u8 = 126;

/// The experimental DRED bitstream version of libopus 1.6
/// (`DRED_EXPERIMENTAL_VERSION`); a decoder ignores DRED of any other version.
pub const DRED_EXPERIMENTAL_VERSION: u8 = 12;

/// The first two bytes of a DRED extension's payload.
const DRED_TAG: [u8; 2] = [b'D', DRED_EXPERIMENTAL_VERSION];

/// The padding of a code-3 packet (RFC 6716 §3.2.5), where extensions live.
fn padding(packet: &[u8]) -> Option<&[u8]> {
    let toc = *packet.first()?;
    if toc & 0x3 != 3 {
        return None;
    }
    let count = *packet.get(1)?;
    if count & 0x40 == 0 {
        return None;
    }
    let mut pad = 0usize;
    let mut at = 2;
    loop {
        let b = *packet.get(at)?;
        at += 1;
        // Each 255 means 254 bytes of padding and another length byte.
        if b == 255 {
            pad += 254;
        } else {
            pad += usize::from(b);
            break;
        }
    }
    let start = packet.len().checked_sub(pad)?;
    (start >= at).then(|| &packet[start..])
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
        let bad = EncoderConfig {
            dred_ms: MAX_DRED_MS + 10,
            ..EncoderConfig::default()
        };
        assert!(Encoder::new(bad).unwrap_err().to_string().contains("dred"));
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
    fn dred_is_coded_when_loss_is_expected_and_rebuilds_a_run() {
        let cfg = EncoderConfig {
            fec: false,
            dred_ms: 100,
            ..EncoderConfig::default()
        };
        let mut enc = Encoder::new(cfg).unwrap();
        let mut buf = [0u8; MAX_OPUS_PACKET];
        let n = enc.encode(&tone(0), &mut buf).unwrap();
        assert!(!has_dred(&buf[..n]), "no DRED before loss is reported");
        enc.on_feedback(&PathFeedback {
            loss_fraction: 0.1,
            available_bps: None,
        })
        .unwrap();
        let packets: Vec<Vec<u8>> = (1..30)
            .map(|f| {
                let n = enc.encode(&tone(f), &mut buf).unwrap();
                buf[..n].to_vec()
            })
            .collect();
        assert!(packets[5..].iter().all(|p| has_dred(p) && !has_fec(p)));
        let mut dec = Decoder::new().unwrap();
        let mut out = [0i16; FRAME_SAMPLES];
        for p in &packets[..20] {
            dec.decode(p, &mut out).unwrap();
        }
        // Packets 20, 21 and 22 lost: rebuild all three from packet 23.
        let mut run = vec![0i16; 3 * FRAME_SAMPLES];
        dec.decode_dred(&packets[23], &mut run).unwrap();
        for frame in run.chunks_exact(FRAME_SAMPLES) {
            let energy: f64 = frame.iter().map(|&s| f64::from(s).powi(2)).sum();
            assert!(energy > 1e9, "rebuilt frame is near silent: {energy}");
        }
        dec.decode(&packets[23], &mut out).unwrap();
        // Wrong sizes are concealed and reported, never passed to libopus.
        for len in [0, FRAME_SAMPLES + 1, (MAX_DRED_FRAMES + 1) * FRAME_SAMPLES] {
            let mut bad = vec![1i16; len];
            assert_eq!(
                dec.decode_dred(&packets[24], &mut bad),
                Err(DecodeFault::WrongDuration)
            );
        }
        // Without DRED configured, none is coded.
        let mut plain = Encoder::new(EncoderConfig::default()).unwrap();
        plain
            .on_feedback(&PathFeedback {
                loss_fraction: 0.1,
                available_bps: None,
            })
            .unwrap();
        for f in 0..10 {
            let n = plain.encode(&tone(f), &mut buf).unwrap();
            assert!(!has_dred(&buf[..n]));
        }
    }

    #[test]
    fn dred_search_reads_extensions_and_survives_junk() {
        // A 20 ms SILK WB packet (config 9), code 3, one frame, padded: padding
        // with a 1-byte short extension (ID 3), then DRED as a long extension with
        // a laced length.
        let mut ext = vec![3 << 1 | 1, 0xaa, DRED_EXTENSION_ID << 1 | 1, 4];
        ext.extend_from_slice(&[b'D', DRED_EXPERIMENTAL_VERSION, 1, 2]);
        let mut packet = vec![9 << 3 | 3, 0x41, ext.len() as u8];
        packet.extend_from_slice(&[0x55; 10]);
        packet.extend_from_slice(&ext);
        assert!(has_dred(&packet));
        // The wrong version, a truncated length, or the extension after a frame
        // separator is not DRED for this frame.
        let mut other = packet.clone();
        let at = other.len() - 3;
        other[at] = DRED_EXPERIMENTAL_VERSION + 1;
        assert!(!has_dred(&other));
        let mut short = packet.clone();
        let at = short.len() - ext.len() + 3;
        short[at] = 200;
        assert!(!has_dred(&short));
        let mut separated = vec![9 << 3 | 3, 0x41, ext.len() as u8 + 1];
        separated.extend_from_slice(&[0x55; 10]);
        separated.push(1 << 1);
        separated.extend_from_slice(&ext);
        assert!(!has_dred(&separated));
        assert!(!has_dred(&[]) && !has_dred(&[9 << 3 | 3, 0x41, 255]));
        for seed in 0u8..=255 {
            let junk: Vec<u8> = (0..60u8)
                .map(|i| i.wrapping_mul(seed).wrapping_add(seed ^ 0x5b))
                .collect();
            let _ = has_dred(&junk);
            let mut coded = packet.clone();
            let at = 3 + usize::from(seed) % (coded.len() - 3);
            coded[at] = seed;
            let _ = has_dred(&coded);
        }
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
