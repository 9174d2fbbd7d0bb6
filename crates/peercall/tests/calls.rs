//! A real call between two real `peercall node` processes on loopback: two seed
//! supernodes (relaying, with private targets allowed as on any one-host network)
//! and two desktop nodes with handles. `peercall call bob --play speech.wav
//! --duration ... --json` on alice's node; bob's node answers by itself
//! (`calls.auto_answer`), plays its own WAV and records the call. Asserted: the
//! JSON summary (set-up and first audio bounded, frames both ways, a MOS
//! estimate), that bob's recording carries alice's signal (energy, and
//! cross-correlation with what was played at the right delay), the call metrics
//! on both nodes (promtool-clean), and the bad inputs: an unknown handle, a
//! missing token, unknown calls and wrong states.

mod common;

use std::f64::consts::PI;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Seconds of conversation before alice hangs up.
const CALL_SECS: f64 = 5.0;
/// How long `peercall call` may take in all: set-up, the call, the summary.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Sample rate of the played file: not the engine's, so the resampler is used.
const PLAY_RATE: u32 = 16_000;
/// The engine's and the recording's rate.
const RATE: u32 = 48_000;
/// Length of the played signal.
const SIGNAL_SECS: f64 = 4.0;
/// Upper bound asserted on time to first audio on loopback: the 1 s
/// target with 50 ms links, with room for a debug build on a loaded machine.
const FIRST_AUDIO_MAX_MS: u64 = 3_000;

/// A voiced, speech-like test signal at time `t` (seconds): syllables of 180 ms
/// with 90 ms pauses, each on its own pitch (110 to 230 Hz) with twelve harmonics
/// falling off like a glottal source, and a smooth envelope. Irregular syllable
/// pitches make the cross-correlation peak unique.
fn voice(t: f64) -> f64 {
    const SYLLABLE: f64 = 0.18;
    const PAUSE: f64 = 0.09;
    let period = SYLLABLE + PAUSE;
    let n = (t / period).floor();
    let within = t - n * period;
    if within >= SYLLABLE || t >= SIGNAL_SECS {
        return 0.0;
    }
    let pitch = 110.0 + ((n * 37.0) % 120.0);
    let envelope = (PI * within / SYLLABLE).sin().powi(2);
    let mut s = 0.0;
    for k in 1..=12 {
        let k = f64::from(k);
        s += (2.0 * PI * pitch * k * t).sin() / k;
    }
    0.25 * envelope * s
}

/// Writes `f` sampled at `rate` for `secs` as a 16-bit mono WAV.
fn write_wav(path: &Path, rate: u32, secs: f64, f: impl Fn(f64) -> f64) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).expect("create WAV");
    let n = (secs * f64::from(rate)) as usize;
    for i in 0..n {
        let x = f(i as f64 / f64::from(rate));
        w.write_sample((x * 32767.0).clamp(-32768.0, 32767.0) as i16)
            .expect("write sample");
    }
    w.finalize().expect("finalize WAV");
}

fn read_wav(path: &Path) -> (u32, Vec<f64>) {
    let mut r = hound::WavReader::open(path)
        .unwrap_or_else(|e| panic!("{} is a finished WAV: {e}", path.display()));
    let spec = r.spec();
    assert_eq!(spec.channels, 1);
    let samples = r
        .samples::<i16>()
        .map(|s| f64::from(s.expect("sample")) / 32768.0)
        .collect();
    (spec.sample_rate, samples)
}

/// Root mean square per 10 ms window.
fn envelope(x: &[f64], rate: u32) -> Vec<f64> {
    let w = rate as usize / 100;
    x.chunks(w)
        .map(|c| (c.iter().map(|v| v * v).sum::<f64>() / c.len() as f64).sqrt())
        .collect()
}

/// Normalized cross-correlation of `a` against `b` delayed by `lag` samples.
fn ncc(a: &[f64], b: &[f64], lag: usize) -> f64 {
    let n = a.len().min(b.len().saturating_sub(lag));
    if n == 0 {
        return 0.0;
    }
    let (a, b) = (&a[..n], &b[lag..lag + n]);
    let ma = a.iter().sum::<f64>() / n as f64;
    let mb = b.iter().sum::<f64>() / n as f64;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    if saa == 0.0 || sbb == 0.0 {
        0.0
    } else {
        sab / (saa * sbb).sqrt()
    }
}

/// The lag (within `max`) where `b` best matches `a`, and the correlation there.
fn best_lag(a: &[f64], b: &[f64], max: usize) -> (usize, f64) {
    (0..max)
        .map(|lag| (lag, ncc(a, b, lag)))
        .fold((0, f64::MIN), |best, x| if x.1 > best.1 { x } else { best })
}

/// A node with fast keepalives and relays allowed to loopback targets; `env` adds
/// to it.
fn cli(args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
    let out = tempfile::tempdir().expect("tmp");
    let (o, e) = (out.path().join("out"), out.path().join("err"));
    let mut cmd = peercall();
    cmd.args(args)
        .stdout(Stdio::from(File::create(&o).expect("out")))
        .stderr(Stdio::from(File::create(&e).expect("err")));
    let mut child = cmd.spawn().expect("spawn peercall");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "peercall {args:?} did not finish in {timeout:?}:\n{}",
                fs::read_to_string(&e).unwrap_or_default()
            );
        }
        sleep(Duration::from_millis(50));
    };
    (
        status,
        fs::read_to_string(&o).unwrap_or_default(),
        fs::read_to_string(&e).unwrap_or_default(),
    )
}

/// Two seeds, alice and bob (auto-answering, playing `bob_play`, recording to
/// `bob_record`), attached and published.
struct Net {
    _seeds: Vec<Daemon>,
    alice: Daemon,
    bob: Daemon,
}

fn network(root: &Path, bob_play: &Path, bob_record: &Path) -> Net {
    let (seeds, spec) = start_seeds(root);
    let alice = start_call_node(
        &root.join("alice"),
        &[("PEERCALL_SEEDS", &spec), ("PEERCALL_HANDLE", "alice")],
    );
    let (play, record) = (
        bob_play.to_str().expect("utf-8"),
        bob_record.to_str().expect("utf-8"),
    );
    let bob = start_call_node(
        &root.join("bob"),
        &[
            ("PEERCALL_SEEDS", &spec),
            ("PEERCALL_HANDLE", "bob"),
            ("PEERCALL_CALLS_AUTO_ANSWER", "true"),
            ("PEERCALL_CALLS_ANSWER_PLAY", play),
            ("PEERCALL_CALLS_ANSWER_RECORD", record),
        ],
    );
    wait_directory(&[("alice", &alice), ("bob", &bob)]);
    Net {
        _seeds: seeds,
        alice,
        bob,
    }
}

fn check_promtool(text: &str, who: &str) {
    if let Some((ok, report)) = promtool_check(text) {
        assert!(ok, "{who}: promtool check metrics:\n{report}");
    }
}

#[test]
fn a_call_with_speech_is_heard_recorded_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let alice_wav = root.join("alice-speech.wav");
    write_wav(&alice_wav, PLAY_RATE, SIGNAL_SECS, voice);
    // Bob answers with a steady 440 Hz tone, so frames flow both ways.
    let bob_wav = root.join("bob-tone.wav");
    write_wav(&bob_wav, RATE, CALL_SECS + 2.0, |t| {
        0.2 * (2.0 * PI * 440.0 * t).sin()
    });
    let recorded = root.join("bob-heard.wav");
    let mut net = network(root, &bob_wav, &recorded);
    let alice_dir = net.alice.data_dir.display().to_string();

    // Bad input first: an unknown handle fails clearly.
    let (status_code, stdout, stderr) = cli(
        &["call", "nobody-here", "--json", "--data-dir", &alice_dir],
        CALL_TIMEOUT,
    );
    assert!(!status_code.success(), "unknown user fails: {stderr}");
    assert!(
        stderr.contains("not found"),
        "the reason is given: {stderr}"
    );
    let failed: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(failed["outcome"], "not_found", "{failed}");
    let (status_code, _, stderr) = cli(
        &["call", "Not A Handle", "--data-dir", &alice_dir],
        CALL_TIMEOUT,
    );
    assert!(!status_code.success());
    assert!(stderr.contains("neither a user id"), "{stderr}");

    // The API without the token: 401, nothing placed.
    let r = http(
        net.alice.admin(),
        "POST",
        "/v1/calls",
        &[],
        "{\"to\": \"bob\"}",
    )
    .expect("HTTP");
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(
        http(net.alice.admin(), "GET", "/v1/calls", &[], "")
            .expect("HTTP")
            .status,
        401
    );
    let r = net
        .alice
        .request("POST", "/v1/calls", "{\"to\": \"bad handle!\"}");
    assert_eq!(r.status, 400, "{}", r.body);
    let r = net.alice.request(
        "POST",
        "/v1/calls",
        "{\"to\": \"bob\", \"play\": \"/nonexistent.wav\"}",
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("cannot play"), "{}", r.body);
    assert_eq!(net.alice.request("GET", "/v1/calls/999", "").status, 404);
    assert_eq!(net.alice.request("DELETE", "/v1/calls/999", "").status, 404);
    assert_eq!(net.alice.request("GET", "/v1/calls/x", "").status, 400);

    // The call.
    let duration = CALL_SECS.to_string();
    let play = alice_wav.display().to_string();
    let started = Instant::now();
    let (status_code, stdout, stderr) = cli(
        &[
            "call",
            "bob",
            "--play",
            &play,
            "--duration",
            &duration,
            "--json",
            "--data-dir",
            &alice_dir,
        ],
        CALL_TIMEOUT,
    );
    assert!(
        status_code.success(),
        "the call completes: {stderr}\nalice:\n{}\nbob:\n{}",
        net.alice.stderr(),
        net.bob.stderr()
    );
    eprintln!(
        "peercall call took {:?}; summary {stdout}",
        started.elapsed()
    );
    assert_eq!(stdout.trim().lines().count(), 1, "one JSON line: {stdout}");
    let s: Value = serde_json::from_str(stdout.trim()).expect("JSON summary");
    for field in [
        "setup_ms",
        "first_audio_ms",
        "duration_s",
        "paths_used",
        "path_switches",
        "frames_sent",
        "frames_received",
        "concealed_ms",
        "max_gap_ms",
        "mos_estimate",
        "end_reason",
    ] {
        assert!(s.get(field).is_some(), "{field} in {s}");
    }
    assert_eq!(s["outcome"], "completed", "{s}");
    let setup = s["setup_ms"].as_u64().expect("setup_ms");
    let first_audio = s["first_audio_ms"].as_u64().expect("first_audio_ms");
    assert!(
        first_audio >= setup && first_audio <= FIRST_AUDIO_MAX_MS,
        "{s}"
    );
    let duration_s = s["duration_s"].as_f64().expect("duration_s");
    assert!(
        (CALL_SECS - 0.5..CALL_SECS + 3.0).contains(&duration_s),
        "{s}"
    );
    // 50 frames a second each way, most of the call.
    let min_frames = (CALL_SECS * 50.0 * 0.7) as u64;
    assert!(s["frames_sent"].as_u64().unwrap() >= min_frames, "{s}");
    assert!(s["frames_received"].as_u64().unwrap() >= min_frames, "{s}");
    let mos = s["mos_estimate"].as_f64().expect("mos_estimate");
    assert!((1.0..=4.5).contains(&mos), "{s}");
    assert!(
        s["paths_used"].as_array().is_some_and(|p| !p.is_empty()),
        "{s}"
    );

    // Bob's side ended too, and finished its recording.
    let ended = eventually(Duration::from_secs(10), || {
        let r = net.bob.request("GET", "/v1/calls", "");
        r.status == 200
            && r.json()["calls"]
                .as_array()
                .is_some_and(|c| !c.is_empty() && c.iter().all(|c| c["state"] == "ended"))
    });
    assert!(ended, "bob's call ended: {}", net.bob.stderr());
    let bob_calls = net.bob.request("GET", "/v1/calls", "").json();
    let bob_call = &bob_calls["calls"][0];
    assert_eq!(bob_call["outgoing"], false, "{bob_call}");
    assert_eq!(bob_call["handle"], "alice", "{bob_call}");
    assert_eq!(bob_call["outcome"], "completed", "{bob_call}");
    assert_eq!(
        bob_call["audio"]["record"],
        recorded.display().to_string(),
        "{bob_call}"
    );
    let (rate, heard) = read_wav(&recorded);
    assert_eq!(rate, RATE);
    assert!(
        heard.len() as f64 >= (CALL_SECS - 1.0) * f64::from(RATE),
        "{} samples recorded",
        heard.len()
    );
    let rms = (heard.iter().map(|v| v * v).sum::<f64>() / heard.len() as f64).sqrt();
    assert!(rms > 0.02, "the recording carries audio: RMS {rms}");

    // Where alice's speech sits in bob's recording: envelopes first (10 ms steps,
    // up to 2 s of delay), then the waveform around that lag.
    let reference: Vec<f64> = (0..(SIGNAL_SECS * f64::from(RATE)) as usize)
        .map(|i| voice(i as f64 / f64::from(RATE)))
        .collect();
    let (env_ref, env_heard) = (envelope(&reference, RATE), envelope(&heard, RATE));
    let (env_lag, env_corr) = best_lag(&env_ref, &env_heard, 200);
    assert!(
        env_corr > 0.7,
        "the recording follows the speech's envelope: r = {env_corr:.2} at {} ms",
        env_lag * 10
    );
    let window = RATE as usize; // one second of speech, from 0.5 s in
    let start = RATE as usize / 2;
    let centre = env_lag * (RATE as usize / 100) + start;
    let from = centre.saturating_sub(RATE as usize / 50);
    let (fine, wave_corr) = (from..centre + RATE as usize / 50)
        .map(|at| (at, ncc(&reference[start..start + window], &heard, at)))
        .fold((0, f64::MIN), |b, x| if x.1 > b.1 { x } else { b });
    eprintln!(
        "speech found in bob's recording at {:.1} ms: envelope r = {env_corr:.3}, waveform r = {wave_corr:.3}; RMS {rms:.3}",
        (fine - start) as f64 / 48.0
    );
    assert!(
        wave_corr > 0.5,
        "the recording carries the played waveform: r = {wave_corr:.2}"
    );

    // Metrics: one completed call on each side, promtool-clean.
    let alice_metrics = net.alice.get("/metrics").body;
    let bob_metrics = net.bob.get("/metrics").body;
    for (who, text) in [("alice", &alice_metrics), ("bob", &bob_metrics)] {
        assert_eq!(
            metric(text, "peercall_calls_total{outcome=\"completed\"}"),
            Some(1.0),
            "{who}"
        );
        assert_eq!(metric(text, "peercall_calls_active"), Some(0.0), "{who}");
        assert_eq!(
            metric(text, "peercall_call_setup_seconds_count"),
            Some(1.0),
            "{who}"
        );
        check_promtool(text, who);
    }
    assert_eq!(
        metric(
            &alice_metrics,
            "peercall_calls_total{outcome=\"not_found\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&alice_metrics, "peercall_calls_placed_total"),
        Some(2.0)
    );
    assert_eq!(
        metric(&bob_metrics, "peercall_calls_received_total"),
        Some(1.0)
    );
    assert!(
        metric(&alice_metrics, "peercall_call_frames_concealed_total").is_some(),
        "concealment counted"
    );
    for seed in &net._seeds {
        let text = seed.get("/metrics").body;
        check_promtool(&text, "seed");
        assert!(metric(&text, "peercall_relay_packets_total").is_some());
        assert!(
            metric(
                &text,
                "peercall_relay_dropped_packets_total{reason=\"no_permission\"}"
            )
            .is_some()
        );
    }
    // Wrong state: the ended call can be neither answered nor hung up.
    let id = s["call"].as_u64().expect("call id");
    assert_eq!(
        net.alice
            .request("POST", &format!("/v1/calls/{id}/answer"), "")
            .status,
        409
    );
    assert_eq!(
        net.alice
            .request("DELETE", &format!("/v1/calls/{id}"), "")
            .status,
        409
    );

    net.alice.stop();
    net.bob.stop();
}

/// Auto-answer files that cannot work, and a bad relay value, stop start-up with
/// the key named.
#[test]
fn a_bad_auto_answer_file_stops_start_up_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    let missing: PathBuf = tmp.path().join("missing.wav");
    let mut cmd = peercall();
    cmd.args(node_args(&dir))
        .env("PEERCALL_CALLS_ANSWER_PLAY", &missing);
    let (status, stderr) = run_to_exit(cmd, &dir);
    assert!(!status.success());
    assert!(stderr.contains("calls.answer_play"), "{stderr}");
    let mut cmd = peercall();
    cmd.args(node_args(&dir)).env(
        "PEERCALL_CALLS_ANSWER_RECORD",
        tmp.path().join("no/such/dir/x.wav"),
    );
    let (status, stderr) = run_to_exit(cmd, &dir);
    assert!(!status.success());
    assert!(stderr.contains("calls.answer_record"), "{stderr}");
    let mut cmd = peercall();
    cmd.args(node_args(&dir))
        .env("PEERCALL_RELAY_MAX_CHANNELS", "lots");
    let (status, stderr) = run_to_exit(cmd, &dir);
    assert!(!status.success());
    assert!(stderr.contains("relay.max_channels"), "{stderr}");
}
