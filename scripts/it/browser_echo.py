#!/usr/bin/env python3
"""Real-browser test of the WebRTC gateway, driven by scripts/it/browser-echo.sh.

1. Speaks a sentence with espeak-ng into a WAV file: Chromium's fake microphone.
2. Starts a `peercall node` (built with the `webrtc` feature) on loopback.
3. Starts chromedriver and, through it (WebDriver over HTTP, standard library only),
   headless Chromium with a fresh profile, opens the node's echo page
   (`/webrtc/echo#token=...`) and calls its `echoTest.run(seconds)`: the page takes
   the microphone, sends its SDP offer to `POST /v1/webrtc/offer?echo=1` with the
   admin token, connects to the node's UDP port, records the audio the node echoes
   back (WebAudio, 16-bit PCM, base64) and returns it with its WebRTC statistics.
4. Asserts that the returned audio carries the speech: its level, and its
   normalised cross-correlation (NCC) with the input speech at the best lag (the
   fake microphone loops the file, so the lag is known modulo the clip's length).
   The NCC is taken per one-second window, each at its own best lag, because
   Chromium's jitter buffer stretches time by a few milliseconds now and then
   (enough to decorrelate a whole-recording comparison); the windows must agree on
   the lag within a few tens of milliseconds. A control, the correlation with the
   time-reversed speech, must stay low. The whole-recording NCC is reported too.
   The page also records its microphone on the same clock: the lag between the
   microphone and the echo is the echo's delay (browser to node and back,
   Chromium's jitter buffer included).
5. Checks the node's metrics: frames went both ways, and no browser datagram reached
   the engine's unknown-protocol drops.

Prints one JSON line with the figures. Every process it starts is stopped by PID.
"""

import base64
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.io.wavfile as wavfile
import scipy.signal as sps

from webdriver import browser_args, leave_work, log_tails, CHROMIUM_FLAGS, WebDriver, free_port, http, node_env, stop, wait_for_file

SENTENCE = ("The quick brown fox jumps over the lazy dog, "
            "and then it runs back home before the rain.")
# Seconds of echoed audio to record: two loops of the ~4 s sentence.
RECORD_SECONDS = 8
# Analysis rate: wideband speech, where Opus keeps the waveform.
RATE = 16000
# The start of a recording is the jitter buffer filling up and settling; skip it.
SKIP_SECONDS = 1.0

# Windows for the NCC: one second, half overlapping; windows quieter than this are
# pauses between words and are skipped.
WINDOW_SECONDS = 1.0
QUIET_DBFS = -45.0

# Thresholds, loose floors under what was measured when written (Chromium 156, debug
# node, loaded 2-core machine: windowed NCC 0.95, level 0.97 of the input's, control
# 0.20; see crates/peercall/README.md).
MIN_RMS_DBFS = -40.0
MIN_RMS_RATIO = 0.25
MIN_WINDOW_NCC = 0.8
# Chromium's jitter buffer settles (seen: 42 ms in the first seconds) and stretches
# time by a few ms; one stream stays well within this, while chance matches would
# scatter over the whole clip (seconds).
MAX_LAG_SPREAD_MS = 120.0
MAX_CONTROL_NCC = 0.3

# The longest the browser may live: set-up, the recording, and slack.
BROWSER_SECONDS = 120



def log(msg):
    print(f"browser-echo: {msg}", file=sys.stderr, flush=True)


def make_speech(work, sentence=SENTENCE, name="speech", voice="en-us"):
    """Speaks `sentence` into `work/<name>.wav` (48 kHz mono), padded for Chromium's
    fake microphone."""
    raw = work / f"{name}_raw.wav"
    wav = work / f"{name}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(raw), sentence], check=True)
    # 48 kHz mono 16-bit, peak at -3 dBFS: what a microphone would give.
    subprocess.run(["sox", str(raw), "-r", "48000", "-b", "16", "-c", "1", str(wav), "norm", "-3"],
                   check=True)
    # Chromium's fake microphone loops the file in 10 ms buffers: pad it to whole
    # buffers, so every loop starts exactly one clip length after the last.
    rate, samples = wavfile.read(wav)
    buffer = rate // 100
    pad = (-len(samples)) % buffer
    wavfile.write(wav, rate, np.concatenate([samples, np.zeros(pad, dtype=samples.dtype)]))
    return wav


def to_float(samples):
    if samples.dtype == np.int16:
        return samples.astype(np.float64) / 32768.0
    return samples.astype(np.float64)


def resample(x, rate):
    from math import gcd
    g = gcd(int(rate), RATE)
    return sps.resample_poly(x, RATE // g, int(rate) // g)


def best_ncc(recorded, reference):
    """Best normalised cross-correlation of `recorded` against the looped `reference`
    over every lag within one loop; returns (ncc, lag in samples)."""
    n = len(recorded)
    loops = int(np.ceil((n + len(reference)) / len(reference))) + 1
    tiled = np.tile(reference, loops)[: n + len(reference)]
    num = sps.correlate(tiled, recorded, mode="valid", method="fft")[: len(reference)]
    energy = np.concatenate(([0.0], np.cumsum(tiled ** 2)))
    window = energy[n: n + len(num)] - energy[: len(num)]
    den = np.sqrt(np.maximum(window, 1e-12) * np.sum(recorded ** 2))
    ncc = num / den
    lag = int(np.argmax(ncc))
    return float(ncc[lag]), lag


def windowed_ncc(recorded, reference):
    """(median NCC, lags in ms) over the recording's non-quiet one-second windows,
    each window's lag taken relative to the recording's start, modulo the clip."""
    size = int(WINDOW_SECONDS * RATE)
    nccs, lags = [], []
    for start in range(0, len(recorded) - size + 1, size // 2):
        window = recorded[start:start + size]
        if dbfs(window) < QUIET_DBFS:
            continue
        ncc, lag = best_ncc(window, reference)
        nccs.append(ncc)
        lags.append(((lag - start) % len(reference)) / RATE * 1000)
    return (float(np.median(nccs)) if nccs else 0.0), lags


def circular_spread(values_ms, period_ms):
    """Largest distance of any value from the median, on a circle of `period_ms`."""
    if not values_ms:
        return float("inf")
    centre = float(np.median(values_ms))
    return max(min(abs(v - centre), period_ms - abs(v - centre)) for v in values_ms)


def echo_delay_ms(echo, mic):
    """The lag (ms) at which the echo best matches the microphone, searched up to one
    second, and the NCC there."""
    limit = RATE
    n = len(echo) - limit
    if n <= RATE:
        return None, 0.0
    target = echo[limit:]
    best, best_lag = -1.0, 0
    num = sps.correlate(mic[: n + limit], target, mode="valid", method="fft")
    energy = np.concatenate(([0.0], np.cumsum(mic[: n + limit] ** 2)))
    for shift in range(limit + 1):
        den = np.sqrt(max(energy[shift + n] - energy[shift], 1e-12) * np.sum(target ** 2))
        value = num[shift] / den
        if value > best:
            best, best_lag = value, limit - shift
    return best_lag / RATE * 1000, float(best)


def dbfs(x):
    return 20 * np.log10(max(np.sqrt(np.mean(x ** 2)), 1e-9))


def metric(text, series):
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def main():
    args = browser_args()

    # The suite's `timeout` sends SIGTERM: unwind through `finally`, which stops
    # everything this script started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    work = Path(tempfile.mkdtemp(prefix="peercall-browser-echo-"))
    node = driver_proc = None
    driver = None
    try:
        speech = make_speech(work)
        rate_in, samples_in = wavfile.read(speech)
        reference = resample(to_float(samples_in), rate_in)

        data = work / "node"
        node_log = open(work / "node.log", "w")
        # The node reads PEERCALL_* variables as configuration; the suite's own
        # (PEERCALL_FUZZ_SECONDS, PEERCALL_VENV, ...) are not for it.
        env = node_env({})
        node = subprocess.Popen(
            [args.bin, "--log-level", "debug", "node", "--data-dir", str(data),
             "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
            stdout=node_log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        admin = wait_for_file(data / "admin.addr", 30, node)
        token = (data / "admin.token").read_text().strip()
        log(f"node up: admin {admin}, udp {wait_for_file(data / 'udp.addr', 5, node)}")

        port = free_port()
        driver_proc = subprocess.Popen(
            [args.chromedriver, f"--port={port}"], stdout=open(work / "chromedriver.log", "w"),
            stderr=subprocess.STDOUT, start_new_session=True)
        driver = WebDriver(port)
        driver.wait_ready()
        # Chromium itself is bounded too, whatever happens to the driver.
        browser = work / "chromium"
        browser.write_text(f'#!/bin/sh\nexec timeout --kill-after=5 {BROWSER_SECONDS} '
                           f'"{args.chromium}" "$@"\n')
        browser.chmod(0o755)
        flags = CHROMIUM_FLAGS + [
            f"--use-file-for-fake-audio-capture={speech}",
            f"--user-data-dir={work / 'profile'}",
        ]
        driver.start(str(browser), flags)
        driver.open(f"http://{admin}/webrtc/echo#token={token}")
        started = time.monotonic()
        result = driver.run_async(
            "const done = arguments[arguments.length - 1];"
            "window.echoTest.run(arguments[0]).then(done, (e) => done({ok: false, error: String(e)}));",
            RECORD_SECONDS)
        took = time.monotonic() - started
        if not result or not result.get("ok"):
            raise AssertionError(f"the page failed: {result}")
        pcm = np.frombuffer(base64.b64decode(result["pcm"]), dtype="<i2")
        recorded = resample(to_float(pcm), result["sampleRate"])[int(SKIP_SECONDS * RATE):]
        mic = np.frombuffer(base64.b64decode(result["mic"]), dtype="<i2")
        mic = resample(to_float(mic), result["sampleRate"])[int(SKIP_SECONDS * RATE):]
        delay_ms, delay_ncc = echo_delay_ms(recorded, mic)
        wavfile.write(work / "echoed.wav", RATE, (recorded * 32767).clip(-32768, 32767).astype(np.int16))

        ncc, lag = best_ncc(recorded, reference)
        window_ncc, lags = windowed_ncc(recorded, reference)
        control, _ = windowed_ncc(recorded, reference[::-1].copy())
        clip_ms = len(reference) / RATE * 1000
        spread = circular_spread(lags, clip_ms)
        level = dbfs(recorded)
        ratio = float(np.sqrt(np.mean(recorded ** 2)) / np.sqrt(np.mean(reference ** 2)))

        status, metrics = http("GET", f"http://{admin}/metrics")
        frames_in = metric(metrics, 'peercall_webrtc_audio_frames_total{direction="from_browser"}')
        frames_out = metric(metrics, 'peercall_webrtc_audio_frames_total{direction="to_browser"}')
        unknown = metric(metrics, 'peercall_dropped_datagrams_total{reason="unknown_protocol"}')
        sessions = metric(metrics, "peercall_webrtc_sessions")

        figures = {
            "recorded_s": round(len(recorded) / RATE, 2),
            "rms_dbfs": round(level, 1),
            "rms_ratio_to_input": round(ratio, 3),
            "ncc_windowed_median": round(window_ncc, 3),
            "windows": len(lags),
            "lag_ms_mod_clip": round(float(np.median(lags)), 1) if lags else None,
            "lag_spread_ms": round(spread, 1),
            "ncc_whole_recording": round(ncc, 3),
            "echo_delay_ms": None if delay_ms is None else round(delay_ms, 1),
            "echo_delay_ncc": round(delay_ncc, 3),
            "clip_s": round(len(reference) / RATE, 2),
            "control_ncc_reversed": round(control, 3),
            "browser_stats": result.get("stats"),
            "node_frames_from_browser": frames_in,
            "node_frames_to_browser": frames_out,
            "engine_unknown_protocol_drops": unknown,
            "page_run_s": round(took, 1),
        }
        print(json.dumps(figures))

        failures = []
        if level < MIN_RMS_DBFS:
            failures.append(f"echo too quiet: {level:.1f} dBFS < {MIN_RMS_DBFS}")
        if ratio < MIN_RMS_RATIO:
            failures.append(f"echo level {ratio:.2f} of the input < {MIN_RMS_RATIO}")
        if window_ncc < MIN_WINDOW_NCC:
            failures.append(f"cross-correlation with the speech {window_ncc:.3f} < {MIN_WINDOW_NCC}")
        if spread > MAX_LAG_SPREAD_MS:
            failures.append(f"lags of the windows spread {spread:.1f} ms > {MAX_LAG_SPREAD_MS}: {lags}")
        if control > MAX_CONTROL_NCC:
            failures.append(f"control correlation {control:.3f} > {MAX_CONTROL_NCC}: the measure is meaningless")
        if not frames_in or not frames_out or frames_out < 0.9 * frames_in:
            failures.append(f"frames from/to the browser: {frames_in}/{frames_out}")
        if unknown != 0:
            failures.append(f"{unknown} datagrams reached the engine as unknown protocol")
        if sessions != 0:
            failures.append(f"{sessions} browser sessions left after the page hung up")
        if failures:
            raise AssertionError("; ".join(failures))
        log(f"ok: speech came back (NCC {window_ncc:.3f} over {len(lags)} windows, lag "
            f"{np.median(lags):.0f} ms mod clip, spread {spread:.1f} ms; {level:.1f} dBFS; "
            f"echo delay {delay_ms:.0f} ms)")
    except Exception:
        log_tails(work, ("node.log", "chromedriver.log"), log, 40)
        raise
    finally:
        if driver:
            driver.quit(log)
        stop(driver_proc, "chromedriver", log)
        if node is not None and node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stop(node, "peercall node", log)
        leave_work(work, args.keep, log)


if __name__ == "__main__":
    main()
