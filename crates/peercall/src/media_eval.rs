//! `peercall media-eval`: runs a WAV file through the real audio pipeline over a
//! seeded network model and writes what the listener would hear.

use std::path::PathBuf;

use anyhow::Context;
use peercall_media::codec::{
    AudioBand, EncoderConfig, MAX_BITRATE_BPS, MAX_DRED_MS, MIN_BITRATE_BPS,
};
use peercall_media::eval::{self, EvalOptions, LossSpec};
use peercall_media::jitter::JitterConfig;
use peercall_media::wav;

/// Arguments of `peercall media-eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct MediaEvalArgs {
    /// Input WAV (any sample rate and channel count).
    #[arg(long)]
    pub input: PathBuf,
    /// Output WAV: 48 kHz mono 16-bit, time-aligned with the input, same length.
    #[arg(long)]
    pub output: PathBuf,
    /// Network loss: `none`, `random:PCT` or `bursty:PCT:MEAN_BURST_MS`.
    #[arg(long, default_value = "none", value_parser = parse_loss)]
    pub loss: LossSpec,
    /// Mean extra network delay per packet in ms (uniform in 0..2J, reorders).
    #[arg(long, default_value_t = 0.0)]
    pub jitter_ms: f64,
    /// Seed of the network model; the same seed replays the same run.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Opus bitrate, bits per second.
    #[arg(long, default_value_t = peercall_media::codec::DEFAULT_BITRATE_BPS,
          value_parser = clap::value_parser!(u32).range(i64::from(MIN_BITRATE_BPS)..=i64::from(MAX_BITRATE_BPS)))]
    pub bitrate: u32,
    /// Turn in-band FEC off.
    #[arg(long)]
    pub no_fec: bool,
    /// DRED (Deep REDundancy) duration in ms, 0 to turn it off; with `--no-fec`
    /// too, the receiver only conceals.
    #[arg(long, default_value_t = peercall_media::codec::DEFAULT_DRED_MS,
          value_parser = clap::value_parser!(u16).range(0..=i64::from(MAX_DRED_MS)))]
    pub dred_ms: u16,
    /// Widest audio band: wb (0-8 kHz), swb (0-12 kHz) or fb (0-20 kHz).
    #[arg(long, default_value = "wb", value_parser = parse_band)]
    pub bandwidth: AudioBand,
    /// Frames of look-ahead the jitter buffer keeps so later packets' redundancy can
    /// rebuild lost frames (1..=10; each adds 20 ms of delay).
    #[arg(long, default_value_t = peercall_media::jitter::DEFAULT_RECOVERY_FRAMES)]
    pub recovery_frames: u32,
    /// Discontinuous transmission: send nothing during silence.
    #[arg(long)]
    pub dtx: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn parse_band(s: &str) -> Result<AudioBand, String> {
    s.parse::<AudioBand>().map_err(|e| e.to_string())
}

fn parse_loss(s: &str) -> Result<LossSpec, String> {
    s.parse::<LossSpec>().map_err(|e| e.to_string())
}

/// Runs the evaluation and prints its report.
pub fn run(args: MediaEvalArgs) -> anyhow::Result<()> {
    let input = wav::read_wav(&args.input).context("reading --input")?;
    let pcm = wav::to_i16(&input);
    let options = EvalOptions {
        loss: args.loss,
        jitter_ms: args.jitter_ms,
        seed: args.seed,
        encoder: EncoderConfig {
            bitrate_bps: args.bitrate,
            fec: !args.no_fec,
            dred_ms: args.dred_ms,
            dtx: args.dtx,
            max_band: args.bandwidth,
            ..EncoderConfig::default()
        },
        jitter: JitterConfig {
            recovery_frames: args.recovery_frames,
            ..JitterConfig::default()
        },
    };
    let outcome = eval::run(&pcm, &options).context("running the pipeline")?;
    wav::write_wav(&args.output, &outcome.audio).context("writing --output")?;
    let r = &outcome.report;
    if args.json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!(
            "{} frames, loss {}, jitter {} ms, seed {}\n\
             lost {} (late {}), FEC-recovered {}, DRED-recovered {}, concealed {}\n\
             jitter buffer {:.1} ms avg, {:.1} ms p95; pipeline latency {:.1} ms; MOS estimate {:.2}\n\
             Opus bitrate on the wire {:.1} kb/s",
            r.frames,
            args.loss,
            args.jitter_ms,
            r.seed,
            r.lost,
            r.late,
            r.fec_recovered,
            r.dred_recovered,
            r.concealed,
            r.jb_delay_ms_avg,
            r.jb_delay_ms_p95,
            r.pipeline_latency_ms,
            r.mos_estimate,
            r.bitrate_bps / 1000.0
        );
    }
    Ok(())
}
