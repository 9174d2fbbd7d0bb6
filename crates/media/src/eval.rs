//! The offline evaluator: the real sender and receiver over a seeded network model.
//!
//! ```text
//! input PCM ─► Encoder ─► Packetizer ─► network model ─► Receiver ─► output PCM
//!                ▲                       (loss, jitter)     │
//!                └──── receiver reports (loss), every 1 s ──┘
//! ```
//!
//! Time is virtual: frame `k` is captured during `[20k, 20k + 20)` ms and sent at its
//! end; the network delays it by a fixed [`NETWORK_BASE_DELAY_MS`] plus a uniform
//! random `0..2J` ms (mean `J`, so packets can overtake each other) or drops it; the
//! receiver pulls 20 ms of audio every 20 ms on its own clock, whose phase against
//! the sender's is drawn from the seed too. Everything random comes from one
//! ChaCha20 RNG seeded with [`EvalOptions::seed`], so a run replays exactly.
//!
//! The output is the audio the listener hears, shifted by the pipeline delay at the
//! first played frame so it starts with the input and has the same length. Later
//! jitter-buffer adaptation (a frame inserted or dropped in silence) stays in, as
//! the listener would hear it.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use peercall_wire::Time;
use peercall_wire::frame::MAX_OPUS_PACKET;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use serde::Serialize;

use crate::codec::{Encoder, EncoderConfig, PathFeedback};
use crate::jitter::JitterConfig;
use crate::packetizer::Packetizer;
use crate::receiver::{Pulled, Receiver};
use crate::{FRAME_SAMPLES, FRAME_US, MediaError, SAMPLE_RATE};

/// The network's fixed one-way delay: a typical continental path. It only enters
/// the MOS estimate; the pipeline latency excludes the network.
pub const NETWORK_BASE_DELAY_MS: f64 = 30.0;

/// Frames between receiver reports on a clean path: once a second.
const REPORT_INTERVAL_FRAMES: u64 = 50;

/// Frames between early reports once new loss is seen (as RTCP early feedback,
/// RFC 4585): the sender turns FEC on within a fifth of a second.
const EARLY_REPORT_FRAMES: u64 = 10;

/// Frames a report takes to reach the sender: about one round trip over the model's
/// base delay (2 × 30 ms).
const FEEDBACK_DELAY_FRAMES: usize = 3;

/// Virtual wall-clock start, so the evaluator exercises realistic `Time` values.
const EPOCH: Time = Time::from_secs(1_700_000_000);

/// A network loss model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossSpec {
    /// No loss.
    None,
    /// Each packet lost independently with probability `pct` %.
    Random {
        /// Loss rate, percent.
        pct: f64,
    },
    /// Gilbert-Elliott: a good state that loses nothing and a bad state that loses
    /// everything, with transition rates giving `pct` % loss in bursts of
    /// `mean_burst_ms` on average.
    Bursty {
        /// Long-run loss rate, percent.
        pct: f64,
        /// Mean burst length, ms (at least one frame).
        mean_burst_ms: f64,
    },
}

/// A loss specification that does not parse; the message names the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad loss spec `{spec}`: {reason} (expected none, random:PCT or bursty:PCT:MEAN_BURST_MS)")]
pub struct LossSpecError {
    spec: String,
    reason: String,
}

impl FromStr for LossSpec {
    type Err = LossSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| LossSpecError {
            spec: s.to_string(),
            reason,
        };
        let number = |what: &str, v: &str| -> Result<f64, LossSpecError> {
            match v.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(x),
                _ => Err(fail(format!("{what} `{v}` is not a number"))),
            }
        };
        let pct = |v: &str| -> Result<f64, LossSpecError> {
            let p = number("loss percentage", v)?;
            if (0.0..=100.0).contains(&p) {
                Ok(p)
            } else {
                Err(fail(format!("loss percentage {p} is outside 0..=100")))
            }
        };
        let parts: Vec<&str> = s.trim().split(':').collect();
        match parts.as_slice() {
            ["none"] => Ok(LossSpec::None),
            ["random", p] => Ok(LossSpec::Random { pct: pct(p)? }),
            ["bursty", p, b] => {
                let pct = pct(p)?;
                if pct >= 100.0 {
                    return Err(fail("bursty loss must be below 100 %".into()));
                }
                let mean_burst_ms = number("mean burst", b)?;
                if mean_burst_ms < FRAME_US as f64 / 1000.0 {
                    return Err(fail(format!(
                        "mean burst {mean_burst_ms} ms is shorter than one 20 ms frame"
                    )));
                }
                Ok(LossSpec::Bursty { pct, mean_burst_ms })
            }
            ["random" | "bursty", ..] => Err(fail(format!(
                "`{}` takes {} field(s) after the model name",
                parts[0],
                if parts[0] == "random" { 1 } else { 2 }
            ))),
            [model, ..] => Err(fail(format!("unknown loss model `{model}`"))),
            [] => Err(fail("empty".into())),
        }
    }
}

impl fmt::Display for LossSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossSpec::None => write!(f, "none"),
            LossSpec::Random { pct } => write!(f, "random:{pct}"),
            LossSpec::Bursty { pct, mean_burst_ms } => write!(f, "bursty:{pct}:{mean_burst_ms}"),
        }
    }
}

/// Evaluator settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalOptions {
    /// The network's loss model.
    pub loss: LossSpec,
    /// Mean extra delay per packet, ms: each packet gets `U(0, 2J)` on top of the base.
    pub jitter_ms: f64,
    /// Seed of the network model and the clocks' phase.
    pub seed: u64,
    /// Sender settings (bitrate, FEC, DTX, complexity).
    pub encoder: EncoderConfig,
    /// Receiver settings.
    pub jitter: JitterConfig,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            loss: LossSpec::None,
            jitter_ms: 0.0,
            seed: 0,
            encoder: EncoderConfig::default(),
            jitter: JitterConfig::default(),
        }
    }
}

/// The evaluator's summary, printed as JSON by `peercall media-eval --json`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalReport {
    /// 20 ms frames in the input.
    pub frames: u64,
    /// Frames whose packet was missing at playout: dropped by the network, or late.
    pub lost: u64,
    /// Lost frames rebuilt from the next packet's in-band FEC.
    pub fec_recovered: u64,
    /// Lost frames rebuilt from a later packet's DRED.
    pub dred_recovered: u64,
    /// Frames concealed (lost and not recoverable, or corrupt).
    pub concealed: u64,
    /// Packets that arrived after their playout time: dropped (and counted in
    /// `lost`), or, when their place was held by a concealed frame, played late.
    pub late: u64,
    /// Mean time a played packet waited in the jitter buffer, ms.
    pub jb_delay_ms_avg: f64,
    /// 95th percentile of that wait, ms.
    pub jb_delay_ms_p95: f64,
    /// Mean input-to-output delay without the network, ms: the 20 ms frame, the
    /// codec look-ahead and the jitter-buffer wait (so a frame's latency is
    /// `pipeline_latency_ms - jb_delay_ms_avg` plus its own wait).
    pub pipeline_latency_ms: f64,
    /// Average Opus bitrate on the wire, b/s: the payload bytes of every packet sent
    /// (in-band FEC and DRED included, lost ones too) over the input's duration.
    /// Packet headers, encryption and UDP/IP come on top.
    pub bitrate_bps: f64,
    /// E-model MOS estimate (narrowband scale, see [`crate::quality`]) from the
    /// mouth-to-ear delay including the network, residual loss and its burstiness.
    pub mos_estimate: f64,
    /// The seed, to replay the run.
    pub seed: u64,
}

/// The evaluator's result.
#[derive(Debug, Clone)]
pub struct EvalOutcome {
    /// The received audio, time-aligned with the input and of the same length.
    pub audio: Vec<i16>,
    /// The summary.
    pub report: EvalReport,
}

/// Uniform in `[0, 1)` from 53 random bits.
fn uniform(rng: &mut ChaCha20Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The seeded packet-loss process.
struct LossModel {
    spec: LossSpec,
    bad: bool,
}

impl LossModel {
    fn lose(&mut self, rng: &mut ChaCha20Rng) -> bool {
        match self.spec {
            LossSpec::None => false,
            LossSpec::Random { pct } => uniform(rng) < pct / 100.0,
            LossSpec::Bursty { pct, mean_burst_ms } => {
                let burst_frames = (mean_burst_ms * 1000.0 / FRAME_US as f64).max(1.0);
                let p_end = 1.0 / burst_frames;
                let share = pct / 100.0;
                // Stationary share of the bad state = p_start / (p_start + p_end).
                let p_start = (share * p_end / (1.0 - share)).min(1.0);
                let u = uniform(rng);
                self.bad = if self.bad { u >= p_end } else { u < p_start };
                self.bad
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn round_to(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// A packet in flight.
struct InFlight {
    arrival: Time,
    seq: u32,
    timestamp: u32,
    flags: u8,
    payload: Vec<u8>,
    /// False for a DTX frame, which was never a packet.
    sent: bool,
}

/// Runs `input` (48 kHz mono) through the pipeline.
pub fn run(input: &[i16], options: &EvalOptions) -> Result<EvalOutcome, MediaError> {
    if !(options.jitter_ms.is_finite() && (0.0..=1000.0).contains(&options.jitter_ms)) {
        return Err(MediaError::Config {
            key: "jitter_ms",
            reason: format!("{} is outside 0..=1000", options.jitter_ms),
        });
    }
    if input.is_empty() {
        return Err(MediaError::Config {
            key: "input",
            reason: "no audio samples".into(),
        });
    }
    let mut rng = ChaCha20Rng::seed_from_u64(options.seed);
    let mut encoder = Encoder::new(options.encoder)?;
    let lookahead = encoder.lookahead()?;
    let mut receiver = Receiver::new(options.jitter)?;
    let mut packetizer = Packetizer::new(&mut rng);
    let mut loss = LossModel {
        spec: options.loss,
        bad: false,
    };

    let frames = input.len().div_ceil(FRAME_SAMPLES);
    let mut padded = input.to_vec();
    padded.resize(frames * FRAME_SAMPLES, 0);

    // Sender: encode every frame, decide its fate in the network.
    let frame = Duration::from_micros(FRAME_US);
    let base = Duration::from_secs_f64(NETWORK_BASE_DELAY_MS / 1000.0);
    let mut in_flight: Vec<InFlight> = Vec::with_capacity(frames);
    let mut buf = [0u8; MAX_OPUS_PACKET];

    // Receiver: pull every 20 ms from its own clock phase.
    let phase = Duration::from_secs_f64(uniform(&mut rng) * FRAME_US as f64 / 1e6);
    let extra_frames =
        (ms(options.jitter.max_delay) + 2.0 * options.jitter_ms + NETWORK_BASE_DELAY_MS)
            / (FRAME_US as f64 / 1000.0);
    let pulls = frames + extra_frames.ceil() as usize + 4;
    let mut stream: Vec<i16> = Vec::with_capacity(pulls * FRAME_SAMPLES);
    let mut waits: Vec<f64> = Vec::with_capacity(frames);
    let mut first_play: Option<(usize, usize)> = None;
    let mut next_packet = 0;
    let mut reported = (0u64, 0u64);
    let mut feedback: VecDeque<(usize, PathFeedback)> = VecDeque::new();
    let mut out = [0i16; FRAME_SAMPLES];
    let first_ts = packetizer.next_timestamp();
    let mut last_ts: Option<u32> = None;
    let mut stats = receiver.stats();
    let mut payload_bytes: u64 = 0;

    for pull in 0..pulls {
        let pull_at = EPOCH + frame + phase + frame * pull as u32;
        // Encode and send every frame whose capture ended by now.
        while in_flight.len() < frames {
            let k = in_flight.len();
            let sent_at = EPOCH + frame * (k as u32 + 1);
            if sent_at > pull_at {
                break;
            }
            let pcm = &padded[k * FRAME_SAMPLES..(k + 1) * FRAME_SAMPLES];
            let len = encoder.encode(pcm, &mut buf)?;
            let Some(packet) = packetizer.packetize(&buf[..len]) else {
                in_flight.push(InFlight {
                    arrival: Time::MAX,
                    seq: 0,
                    timestamp: 0,
                    flags: 0,
                    payload: Vec::new(),
                    sent: false,
                });
                continue;
            };
            payload_bytes += packet.payload.len() as u64;
            let dropped = loss.lose(&mut rng);
            let jitter =
                Duration::from_secs_f64(uniform(&mut rng) * 2.0 * options.jitter_ms / 1000.0);
            in_flight.push(InFlight {
                arrival: if dropped {
                    Time::MAX
                } else {
                    sent_at + base + jitter
                },
                seq: packet.seq,
                timestamp: packet.timestamp,
                flags: packet.flags,
                // A dropped packet keeps its numbers (to map played frames back to
                // input frames) but no payload: nothing will ever arrive.
                payload: if dropped {
                    Vec::new()
                } else {
                    packet.payload.to_vec()
                },
                sent: true,
            });
        }
        // Deliver everything that arrived by now, in arrival order.
        let mut due: Vec<usize> = (next_packet..in_flight.len())
            .filter(|&i| in_flight[i].arrival <= pull_at)
            .collect();
        due.sort_by_key(|&i| (in_flight[i].arrival, i));
        for i in due {
            let p = &mut in_flight[i];
            let media = peercall_wire::frame::Media {
                path: 0,
                path_seq: 0,
                seq: p.seq,
                timestamp: p.timestamp,
                flags: p.flags,
                payload: &p.payload,
            };
            receiver.push(p.arrival, &media);
            p.arrival = Time::MAX;
            p.payload = Vec::new();
        }
        while next_packet < in_flight.len() && in_flight[next_packet].payload.is_empty() {
            next_packet += 1;
        }

        // Statistics cover the input's frames; pulls after the last one (to flush the
        // pipeline) would otherwise count as underruns.
        if last_ts.is_none_or(|last| {
            receiver
                .jitter_buffer()
                .next_timestamp()
                .is_none_or(|next| (next.wrapping_sub(last) as i32) <= 0)
        }) {
            stats = receiver.stats();
        }
        let played = match receiver.pull(pull_at, &mut out) {
            Pulled::Decoded { seq, waited } => {
                waits.push(ms(waited));
                Some(seq)
            }
            Pulled::FecRecovered { seq } | Pulled::DredRecovered { seq } => Some(seq),
            _ => None,
        };
        if let (None, Some(seq)) = (first_play, played) {
            // The input frame this packet carried (DTX frames have no packet).
            let k = in_flight.iter().position(|p| p.sent && p.seq == seq);
            first_play = k.map(|k| (pull, k));
        }
        stream.extend_from_slice(&out);
        if in_flight.len() == frames && last_ts.is_none() {
            last_ts = Some(first_ts.wrapping_add(((frames - 1) * FRAME_SAMPLES) as u32));
        }

        // Receiver report: loss since the last one, before FEC; early when there is
        // new loss, and delivered to the sender a round trip later.
        let j = receiver.jitter_buffer().stats();
        let settled = j.lost + j.played + j.discarded;
        let (lost0, settled0) = reported;
        let span = settled.saturating_sub(settled0);
        let new_loss = j.lost > lost0;
        if span >= REPORT_INTERVAL_FRAMES || (new_loss && span >= EARLY_REPORT_FRAMES) {
            feedback.push_back((
                pull + FEEDBACK_DELAY_FRAMES,
                PathFeedback {
                    loss_fraction: (j.lost - lost0) as f64 / span as f64,
                    available_bps: None,
                },
            ));
            reported = (j.lost, settled);
        }
        while let Some(&(at, report)) = feedback.front() {
            if at > pull {
                break;
            }
            encoder.on_feedback(&report)?;
            feedback.pop_front();
        }
    }

    // Align: output sample n is the input's sample n as it came out of the decoder.
    let shift = first_play.map_or(0, |(pull, k)| {
        (pull.saturating_sub(k)) * FRAME_SAMPLES + lookahead
    });
    let mut audio: Vec<i16> = stream
        .iter()
        .skip(shift)
        .take(input.len())
        .copied()
        .collect();
    audio.resize(input.len(), 0);

    let jb_avg = mean(&waits);
    let codec_ms = FRAME_US as f64 / 1000.0 + lookahead as f64 * 1000.0 / f64::from(SAMPLE_RATE);
    let pipeline_latency_ms = codec_ms + jb_avg;
    let network_ms = NETWORK_BASE_DELAY_MS + options.jitter_ms;
    let report = EvalReport {
        frames: frames as u64,
        lost: stats.lost,
        fec_recovered: stats.fec_recovered,
        dred_recovered: stats.dred_recovered,
        concealed: stats.concealed,
        late: stats.late,
        jb_delay_ms_avg: round_to(jb_avg, 2),
        jb_delay_ms_p95: round_to(percentile(&mut waits, 0.95), 2),
        pipeline_latency_ms: round_to(pipeline_latency_ms, 2),
        bitrate_bps: round_to(
            payload_bytes as f64 * 8.0 * f64::from(SAMPLE_RATE) / input.len() as f64,
            0,
        ),
        mos_estimate: round_to(stats.mos_estimate(network_ms), 3),
        seed: options.seed,
    };
    Ok(EvalOutcome { audio, report })
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let rank = ((xs.len() as f64 * p).ceil() as usize).clamp(1, xs.len()) - 1;
    xs[rank]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_specs_parse_and_errors_name_the_problem() {
        assert_eq!("none".parse::<LossSpec>().unwrap(), LossSpec::None);
        assert_eq!(
            "random:5".parse::<LossSpec>().unwrap(),
            LossSpec::Random { pct: 5.0 }
        );
        assert_eq!(
            "bursty:10:60".parse::<LossSpec>().unwrap(),
            LossSpec::Bursty {
                pct: 10.0,
                mean_burst_ms: 60.0
            }
        );
        for (spec, want) in [
            ("random:abc", "`abc` is not a number"),
            ("random:150", "outside 0..=100"),
            ("random", "takes 1 field"),
            ("bursty:10", "takes 2 field"),
            ("bursty:10:5", "shorter than one 20 ms frame"),
            ("bursty:100:40", "below 100"),
            ("gaussian:3", "unknown loss model `gaussian`"),
            ("random:NaN", "not a number"),
        ] {
            let err = spec.parse::<LossSpec>().unwrap_err().to_string();
            assert!(err.contains(want), "{spec}: {err}");
        }
    }

    #[test]
    fn gilbert_elliott_hits_its_rate_and_burst_length() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut m = LossModel {
            spec: LossSpec::Bursty {
                pct: 10.0,
                mean_burst_ms: 60.0,
            },
            bad: false,
        };
        let n = 200_000;
        let mut lost = 0;
        let mut bursts = 0;
        let mut prev = false;
        for _ in 0..n {
            let l = m.lose(&mut rng);
            lost += usize::from(l);
            bursts += usize::from(l && !prev);
            prev = l;
        }
        let rate = lost as f64 / n as f64;
        let burst = lost as f64 / bursts as f64;
        assert!((rate - 0.10).abs() < 0.01, "{rate}");
        assert!((burst - 3.0).abs() < 0.2, "{burst}");
    }
}
