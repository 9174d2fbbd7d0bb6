//! End-to-end behaviour of the pipeline: evaluator alignment and determinism, FEC,
//! DRED, DTX, and a receiver fed corrupt packets.

use peercall_media::codec::EncoderConfig;
use peercall_media::eval::{self, EvalOptions, LossSpec};
use peercall_media::jitter::JitterConfig;
use peercall_media::{FRAME_SAMPLES, Pulled, Receiver};
use peercall_wire::Time;
use peercall_wire::frame::Media;

/// Speech-like test audio: voiced "syllables" with a gliding pitch and pauses.
fn speechy(seconds: f64) -> Vec<i16> {
    let n = (48_000.0 * seconds) as usize;
    (0..n)
        .map(|i| {
            let t = i as f64 / 48_000.0;
            let syllable = (t * 4.0).fract();
            let pause = (t * 0.5).fract() > 0.7;
            if pause || syllable > 0.8 {
                return 0;
            }
            let f0 = 110.0 + 40.0 * (t * 1.3).sin();
            let env = (syllable * std::f64::consts::PI / 0.8).sin();
            let v: f64 = (1..=12)
                .map(|h| {
                    let formant = (-((h as f64 * f0 - 700.0) / 500.0).powi(2)).exp() + 0.3;
                    formant * (2.0 * std::f64::consts::PI * f0 * h as f64 * t).sin() / h as f64
                })
                .sum();
            (v * env * 7000.0) as i16
        })
        .collect()
}

fn xcorr_lag(a: &[i16], b: &[i16], max_lag: i64) -> i64 {
    let score = |lag: i64| -> f64 {
        (20_000..a.len() - 20_000)
            .map(|i| {
                let j = i as i64 + lag;
                f64::from(a[i]) * f64::from(b[j as usize])
            })
            .sum()
    };
    (-max_lag..=max_lag)
        .max_by(|&x, &y| score(x).total_cmp(&score(y)))
        .expect("the lag range is not empty")
}

#[test]
fn clean_path_output_is_aligned_and_the_same_length() {
    let input = speechy(3.0);
    let out = eval::run(&input, &EvalOptions::default()).unwrap();
    assert_eq!(out.audio.len(), input.len());
    // Within 8 samples (0.17 ms): Opus's phase response blurs the peak a little.
    let lag = xcorr_lag(&input, &out.audio, 400);
    assert!(lag.abs() <= 8, "lag {lag}");
    let r = out.report;
    assert_eq!((r.lost, r.concealed, r.fec_recovered, r.late), (0, 0, 0, 0));
    assert_eq!(r.frames, 150);
    // No jitter: every packet waits 20..40 ms (one frame for FEC plus the clock phase).
    assert!((20.0..40.0).contains(&r.jb_delay_ms_avg), "{r:?}");
    assert!(r.pipeline_latency_ms < 70.0, "{r:?}");
    assert!(r.mos_estimate > 4.2, "{r:?}");
}

#[test]
fn runs_replay_from_their_seed() {
    let input = speechy(2.0);
    let options = EvalOptions {
        loss: LossSpec::Bursty {
            pct: 10.0,
            mean_burst_ms: 60.0,
        },
        jitter_ms: 15.0,
        seed: 42,
        ..EvalOptions::default()
    };
    let a = eval::run(&input, &options).unwrap();
    let b = eval::run(&input, &options).unwrap();
    assert_eq!(a.report, b.report);
    assert_eq!(a.audio, b.audio);
    let c = eval::run(
        &input,
        &EvalOptions {
            seed: 43,
            ..options
        },
    )
    .unwrap();
    assert_ne!(a.audio, c.audio);
    let json = serde_json::to_value(a.report).unwrap();
    let mut keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "bitrate_bps",
            "concealed",
            "dred_recovered",
            "fec_recovered",
            "frames",
            "jb_delay_ms_avg",
            "jb_delay_ms_p95",
            "late",
            "lost",
            "mos_estimate",
            "pipeline_latency_ms",
            "seed"
        ]
    );
}

#[test]
fn fec_recovers_most_single_losses_and_no_fec_recovers_none() {
    let input = speechy(6.0);
    let lossy = EvalOptions {
        loss: LossSpec::Random { pct: 10.0 },
        jitter_ms: 10.0,
        seed: 3,
        ..EvalOptions::default()
    };
    let with = eval::run(&input, &lossy).unwrap().report;
    assert!(with.lost > 15, "{with:?}");
    // FEC starts with the first receiver report, and silent frames carry none.
    assert!(with.fec_recovered * 3 > with.lost, "{with:?}");
    let without = EvalOptions {
        encoder: EncoderConfig {
            fec: false,
            ..EncoderConfig::default()
        },
        ..lossy
    };
    let without = eval::run(&input, &without).unwrap().report;
    assert_eq!(without.fec_recovered, 0);
    assert_eq!(without.lost, with.lost, "same seed, same network");
    assert!(without.concealed > with.concealed);
    assert!(without.mos_estimate < with.mos_estimate);
}

#[test]
fn dred_rebuilds_runs_of_lost_frames_inside_the_bitrate() {
    let input = speechy(8.0);
    let bursty = EvalOptions {
        loss: LossSpec::Bursty {
            pct: 10.0,
            mean_burst_ms: 60.0,
        },
        jitter_ms: 5.0,
        seed: 5,
        encoder: EncoderConfig {
            fec: false,
            dred_ms: 100,
            ..EncoderConfig::default()
        },
        // Three frames of look-ahead: runs of up to three lost frames are rebuilt
        // before they are due.
        jitter: JitterConfig {
            recovery_frames: 3,
            ..JitterConfig::default()
        },
    };
    let with = eval::run(&input, &bursty).unwrap().report;
    assert!(with.lost > 20, "{with:?}");
    // DRED starts with the first receiver report; after that nearly every run of
    // three or fewer frames is rebuilt.
    assert!(with.dred_recovered * 2 > with.lost, "{with:?}");
    assert_eq!(with.fec_recovered, 0);
    let without = EvalOptions {
        encoder: EncoderConfig {
            fec: false,
            dred_ms: 0,
            ..EncoderConfig::default()
        },
        ..bursty
    };
    let without = eval::run(&input, &without).unwrap().report;
    assert_eq!((without.dred_recovered, without.lost), (0, with.lost));
    // DRED's bits come out of the configured rate: VBR may overshoot a little.
    assert!(
        with.bitrate_bps > without.bitrate_bps,
        "{with:?} {without:?}"
    );
    assert!(with.bitrate_bps < 32_000.0 * 1.05, "{with:?}");
}

#[test]
fn heavy_jitter_grows_the_buffer_instead_of_losing_frames() {
    let input = speechy(8.0);
    let options = EvalOptions {
        jitter_ms: 40.0,
        seed: 9,
        ..EvalOptions::default()
    };
    let r = eval::run(&input, &options).unwrap().report;
    // Delays spread over 0..80 ms: the buffer must hold about that plus a frame.
    assert!(r.jb_delay_ms_p95 > 60.0, "{r:?}");
    assert!(r.late * 20 < r.frames, "more than 5 % late: {r:?}");
}

#[test]
fn dtx_silence_is_not_counted_as_loss() {
    let input = speechy(4.0);
    let options = EvalOptions {
        encoder: EncoderConfig {
            dtx: true,
            ..EncoderConfig::default()
        },
        ..EvalOptions::default()
    };
    let out = eval::run(&input, &options).unwrap();
    assert_eq!(out.audio.len(), input.len());
    assert_eq!(
        (out.report.lost, out.report.concealed),
        (0, 0),
        "{:?}",
        out.report
    );
}

#[test]
fn bad_options_are_errors() {
    let err = eval::run(&[], &EvalOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("input"), "{err}");
    let bad = EvalOptions {
        jitter_ms: f64::INFINITY,
        ..EvalOptions::default()
    };
    let err = eval::run(&[0; 960], &bad).unwrap_err().to_string();
    assert!(err.contains("jitter_ms"), "{err}");
}

#[test]
fn corrupt_packets_are_concealed_and_counted() {
    let mut rx = Receiver::new(JitterConfig::default()).unwrap();
    let t0 = 1_700_000_000_000_000u64;
    let junk: [&[u8]; 5] = [
        &[0xff],                   // code 3 with no frame count
        &[0x0b, 0x00],             // zero frames
        &[0x1b, 1, 2, 3],          // 60 ms SILK, wrong duration
        &[0x78, 0xff, 0xff, 0xff], // 20 ms CELT with a garbage range-coder body
        &[0xfc; 300],
    ];
    let mut out = [0i16; FRAME_SAMPLES];
    let mut concealed = 0;
    for k in 0..40u32 {
        let payload = junk[k as usize % junk.len()];
        let media = Media {
            path: 0,
            path_seq: k,
            seq: k,
            timestamp: k * FRAME_SAMPLES as u32,
            flags: 0,
            payload,
        };
        rx.push(Time::from_micros(t0 + u64::from(k) * 20_000), &media);
        let pulled = rx.pull(
            Time::from_micros(t0 + u64::from(k) * 20_000 + 25_000),
            &mut out,
        );
        concealed += usize::from(matches!(pulled, Pulled::Concealed));
    }
    let s = rx.stats();
    assert!(s.corrupt >= 20, "{s:?}");
    assert!(concealed >= 20);
}
