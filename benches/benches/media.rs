//! Audio pipeline speed: Opus encode and decode of one second of speech-like audio
//! (so `1 s / time` is the speed in × real time), the cost of rebuilding a run of
//! three lost frames from DRED, and the jitter buffer's cost per 20 ms frame (one
//! push and one pull, with reordering).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use peercall_media::codec::{Decoder, Encoder, EncoderConfig, PathFeedback, has_dred};
use peercall_media::jitter::{JitterBuffer, JitterConfig, Playout};
use peercall_media::{FRAME_SAMPLES, SAMPLE_RATE};
use peercall_wire::Time;
use peercall_wire::frame::MAX_OPUS_PACKET;

const FRAMES_PER_SECOND: usize = 50;

/// The run of lost frames the DRED bench rebuilds.
const RUN_FRAMES: usize = 3;

/// One second of voiced, pitch-gliding, syllable-shaped audio.
fn speechy_second() -> Vec<i16> {
    (0..SAMPLE_RATE as usize)
        .map(|i| {
            let t = f64::from(i as u32) / f64::from(SAMPLE_RATE);
            let env = ((t * 4.0).fract() * std::f64::consts::PI).sin();
            let f0 = 120.0 + 30.0 * (t * 2.0).sin();
            let v: f64 = (1..=10)
                .map(|h| (2.0 * std::f64::consts::PI * f0 * f64::from(h) * t).sin() / f64::from(h))
                .sum();
            (v * env * 6000.0) as i16
        })
        .collect()
}

fn encoder() -> Encoder {
    encoder_with(EncoderConfig::default())
}

fn encoder_with(config: EncoderConfig) -> Encoder {
    let mut enc = Encoder::new(config).expect("the config is valid");
    // Code FEC too, as on a lossy path: the expensive case.
    enc.on_feedback(&PathFeedback {
        loss_fraction: 0.1,
        available_bps: None,
    })
    .expect("libopus accepts the policy's settings");
    enc
}

fn codec(c: &mut Criterion) {
    let audio = speechy_second();
    let mut group = c.benchmark_group("opus");
    group.throughput(Throughput::Elements(SAMPLE_RATE.into()));

    let mut enc = encoder();
    let mut buf = [0u8; MAX_OPUS_PACKET];
    group.bench_function("encode_1s_32kbps_fec", |b| {
        b.iter(|| {
            for frame in audio.chunks_exact(FRAME_SAMPLES) {
                black_box(enc.encode(frame, &mut buf).expect("encodes"));
            }
        })
    });

    let mut enc = encoder();
    let packets: Vec<Vec<u8>> = audio
        .chunks_exact(FRAME_SAMPLES)
        .map(|frame| {
            let n = enc.encode(frame, &mut buf).expect("encodes");
            buf[..n].to_vec()
        })
        .collect();
    let mut dec = Decoder::new().expect("decoder");
    let mut out = [0i16; FRAME_SAMPLES];
    group.bench_function("decode_1s", |b| {
        b.iter(|| {
            for p in &packets {
                let _ = black_box(dec.decode(p, &mut out));
            }
        })
    });
    group.bench_function("conceal_1s", |b| {
        b.iter(|| {
            for _ in 0..FRAMES_PER_SECOND {
                dec.conceal(&mut out);
                black_box(&out);
            }
        })
    });
    group.finish();

    // DRED: one call rebuilds three lost frames (60 ms) from the packet after them.
    let mut enc = encoder_with(EncoderConfig {
        fec: false,
        dred_ms: 100,
        ..EncoderConfig::default()
    });
    let packets: Vec<Vec<u8>> = audio
        .chunks_exact(FRAME_SAMPLES)
        .map(|frame| {
            let n = enc.encode(frame, &mut buf).expect("encodes");
            buf[..n].to_vec()
        })
        .collect();
    let next = packets
        .iter()
        .rev()
        .find(|p| has_dred(p))
        .expect("DRED is coded once loss is reported");
    let mut run = vec![0i16; RUN_FRAMES * FRAME_SAMPLES];
    let mut group = c.benchmark_group("dred");
    group.throughput(Throughput::Elements(RUN_FRAMES as u64));
    group.bench_function("rebuild_3_frames", |b| {
        b.iter(|| {
            let _ = black_box(dec.decode_dred(next, &mut run));
        })
    });
    group.finish();
}

fn jitter(c: &mut Criterion) {
    let payload = [0x48u8; 80];
    let mut group = c.benchmark_group("jitter_buffer");
    group.throughput(Throughput::Elements(1));
    group.bench_function("push_pull_per_frame", |b| {
        let mut jb = JitterBuffer::new(JitterConfig::default()).expect("default config");
        let mut k: u64 = 0;
        let t0 = 1_700_000_000_000_000u64;
        b.iter(|| {
            // Pairs of frames swap places and every frame gets 0..15 ms of jitter.
            let seq = if k.is_multiple_of(2) { k + 1 } else { k - 1 };
            let arrival = t0 + k * 20_000 + (k * 7919 % 15) * 1000;
            jb.push(
                Time::from_micros(arrival),
                seq as u32,
                (seq * FRAME_SAMPLES as u64) as u32,
                0,
                &payload,
            );
            let out = jb.pull(Time::from_micros(t0 + k * 20_000 + 10_000), k % 10 < 3);
            black_box(matches!(out, Playout::Play { .. }));
            k += 1;
        })
    });
    group.finish();
}

criterion_group!(benches, codec, jitter);
criterion_main!(benches);
