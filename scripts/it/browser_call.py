#!/usr/bin/env python3
"""Real-browser calls through the node's WebRTC gateway, driven by
scripts/it/browser-call.sh.

1. espeak-ng speaks three sentences: alice's and carol's fake microphones, and the
   WAV bob's command line plays.
2. Five `peercall node` processes on loopback: two seed supernodes (relaying, private
   targets allowed as on any one-host network), alice, bob and carol (with the debug
   block list, to cut a path).
3. Browser to command line: alice's page in headless Chromium (through chromedriver)
   calls bob from the search box, with her fake microphone; bob answers with
   `peercall answer --play --record --json`. Mid-call alice's node cuts the direct
   path to bob (its debug block list); the page must show the switch to a relay.
   Alice hangs up on the page. Asserted: bob's summary (completed, frames both
   ways, the switch), that bob's recording carries alice's speech (level, and the
   normalised cross-correlation per one-second window with her microphone's WAV,
   against a time-reversed control), and that alice's browser decoded bob's audio
   (its WebRTC statistics).
4. Browser to browser: carol's page in a second Chromium answers alice's call; audio
   flows both ways (each browser's statistics); carol's node cuts the direct path;
   carol's page shows the switch and audio keeps flowing both ways; carol hangs up
   and alice's page shows the end.

Prints one JSON line with the figures. Every process it starts is stopped by PID.
"""

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.io.wavfile as wavfile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser_echo import (RATE, circular_spread, dbfs, make_speech, resample,  # noqa: E402
                          to_float, windowed_ncc)
from browser_page import Node, snapshot, text_of, visible  # noqa: E402
from webdriver import (browser_args, leave_work, log_tails, CHROMIUM_FLAGS, ENTER, WebDriver, free_port,  # noqa: E402
                       log_to_stderr, node_env, stop)

log = log_to_stderr("browser-call")

ALICE_SAYS = "The quick brown fox jumps over the lazy dog, and then it runs back home before the rain."
BOB_SAYS = "Bob here. I can hear you well; the weather is fine and the line is clear today."
CAROL_SAYS = "Carol speaking from her browser, counting one, two, three, four, five, six."

# Seconds of conversation before the cut and after it.
TALK_BEFORE_CUT = 5
TALK_AFTER_CUT = 5
# The longest a browser may live: both calls, set-up and slack.
BROWSER_SECONDS = 200
# How long the directory may take to hold every record (attach, publish).
DIRECTORY_SECONDS = 60
# Any step of the page: a request to the node and a render.
STEP_SECONDS = 20
# The path switch after a cut: the router leaves a dead path within
# max(3 x RTT, 150 ms); the page polls its statistics every second.
SWITCH_SECONDS = 10

# Floors for bob's recording of alice's speech, under what was measured when
# written (see crates/peercall/README.md): windowed NCC 0.55-0.70, control
# 0.20-0.25, 95-100 % of the windows on one lag. Chromium's voice processing (echo cancellation, noise suppression
# and gain control, which the page asks for, as a call needs with loudspeakers)
# reshapes the waveform: with it off the same path scores 0.97. The lags are the
# sharper test: one stream keeps its delay within milliseconds, while chance
# matches scatter over the whole clip; a window or two may still match by chance
# where the processing flattened a syllable, so most windows (not all) must sit
# within MAX_LAG_SPREAD_MS of the median lag.
MIN_RMS_DBFS = -40.0
MIN_WINDOW_NCC = 0.4
MAX_CONTROL_NCC = 0.3
MAX_LAG_SPREAD_MS = 120.0
MIN_WINDOWS_ON_LAG = 0.8
# A browser that decodes speech (not silence) gathers at least this much audio
# energy (WebRTC's totalAudioEnergy: the sum of level squared times duration) a
# second; silence gathers next to none.
MIN_ENERGY_PER_S = 1e-4

CALL_ENV = {
    "PEERCALL_KEEPALIVE_SECS": "1",
    "PEERCALL_RELAY_ALLOW_PRIVATE_TARGETS": "true",
}


def windows_on_lag(lags, clip_ms):
    """The share of windows whose lag is within MAX_LAG_SPREAD_MS of the median, on
    the circle of the looped clip."""
    if not lags:
        return 0.0
    centre = float(np.median(lags))
    near = [v for v in lags if min(abs(v - centre), clip_ms - abs(v - centre)) <= MAX_LAG_SPREAD_MS]
    return len(near) / len(lags)


def audio_stats(driver):
    return driver.run_async(
        "const done = arguments[arguments.length - 1];"
        "window.peercallPage.audioStats().then(done, (e) => done({error: String(e)}));")


def int_text(driver, element_id):
    try:
        return int(text_of(driver, element_id))
    except (TypeError, ValueError):
        return None


def start_browser(driver, chromium, work, name, mic):
    """A Chromium session for `name`, its fake microphone playing `mic`."""
    wrapper = work / f"chromium-{name}"
    wrapper.write_text(f'#!/bin/sh\nexec timeout --kill-after=5 {BROWSER_SECONDS} "{chromium}" "$@"\n')
    wrapper.chmod(0o755)
    driver.start(str(wrapper), CHROMIUM_FLAGS + [
        f"--use-file-for-fake-audio-capture={mic}",
        f"--user-data-dir={work / ('profile-' + name)}",
    ], logs=True)


def sign_in(driver, node):
    driver.open(f"http://{node.admin}/#token={node.token}")
    driver.wait(f"{node.name} signed in", lambda: snapshot(driver)["signedIn"], STEP_SECONDS)
    driver.wait(f"{node.name}'s live event stream", lambda: snapshot(driver)["live"], STEP_SECONDS)


def call_from_search(driver, handle):
    driver.type("#search", handle + ENTER)
    driver.wait(f"{handle}'s record", lambda: visible(driver, "search-result")
                and text_of(driver, "result-handle") == handle, STEP_SECONDS)
    driver.click("#result-call")


def wait_in_call(driver, who):
    """Waits until the page shows the call active with its audio connected; returns
    the seconds it took."""
    t0 = time.monotonic()
    driver.wait(f"{who}'s page in an active call with audio",
                lambda: (snap := snapshot(driver))["call"] and snap["call"]["state"] == "active"
                and snap["audio"] and snap["audio"]["state"] == "connected", STEP_SECONDS)
    return time.monotonic() - t0


def cut(node, target, driver, who):
    """Once `node`'s call (the one `driver`'s page shows) has a relay path up,
    blocks `target` in `node`'s socket; waits for the page to show a path switch to
    a relay; returns (seconds to the page showing it, path shown)."""
    call = snapshot(driver)["call"]["id"]

    def relay_up():
        status, body = node.api("GET", f"/v1/calls/{call}")
        return status == 200 and any(p["kind"].startswith("relay") and p["state"] in ("standby", "redundant")
                                     for p in body["paths"])
    driver.wait(f"a relay path up on {node.name}'s call", relay_up, STEP_SECONDS)
    before = int_text(driver, "st-switches") or 0
    status, body = node.api("POST", "/v1/debug/block", {"addr": target})
    assert status in (200, 201, 204), f"block: {status} {body}"
    t0 = time.monotonic()
    try:
        path = driver.wait(f"{who}'s page showing the switch",
                           lambda: (int_text(driver, "st-switches") or 0) > before
                           and "relay" in (text_of(driver, "st-path") or "")
                           and text_of(driver, "st-path"), SWITCH_SECONDS)
    except AssertionError:
        log(f"{node.name}'s call at the time-out: {node.api('GET', f'/v1/calls/{call}')[1]}")
        raise
    return time.monotonic() - t0, path


def grows(first, second, who):
    """Checks that a browser kept receiving and decoding audio between two
    samples of its statistics; returns (packets, energy per second)."""
    a, b = first["inbound"], second["inbound"]
    assert a and b, f"{who}: no inbound audio statistics: {first} {second}"
    packets = b["packetsReceived"] - a["packetsReceived"]
    seconds = b["totalSamplesDuration"] - a["totalSamplesDuration"]
    energy = (b["totalAudioEnergy"] - a["totalAudioEnergy"]) / max(seconds, 1e-3)
    assert packets >= 25 * seconds, f"{who}: {packets} packets in {seconds:.1f} s"
    assert energy >= MIN_ENERGY_PER_S, f"{who}: audio energy {energy:.2e}/s: silence"
    return packets, energy


def both_hear(page_a, page_c, seconds, when):
    """Checks that alice's and carol's browsers both decode audio over `seconds`
    (the first second skipped: a switch or the start may still be settling)."""
    time.sleep(1)
    first = (audio_stats(page_a), audio_stats(page_c))
    time.sleep(seconds - 1)
    second = (audio_stats(page_a), audio_stats(page_c))
    return [grows(first[0], second[0], "alice hearing carol" + when),
            grows(first[1], second[1], "carol hearing alice" + when)]


def cli_call(args, work, page_a, alice, bob, bob_wav, alice_wav):
    """Alice's page calls bob, who answers on the command line and records; the
    direct path is cut mid-call; returns the figures, fails on any check."""
    out = {}
    heard = work / "bob-heard.wav"
    answer = subprocess.Popen(
        [args.bin, "answer", "--data-dir", str(bob.data), "--play", str(bob_wav),
         "--record", str(heard), "--json"],
        stdout=subprocess.PIPE, stderr=open(work / "answer.log", "w"), text=True,
        start_new_session=True, env=node_env({}))
    try:
        return cli_call_checked(answer, work, page_a, alice, bob, alice_wav, heard, out)
    finally:
        stop(answer, "peercall answer", log)


def cli_call_checked(answer, work, page_a, alice, bob, alice_wav, heard, out):
    """The checks of [`cli_call`], with bob's `peercall answer` running."""
    t0 = time.monotonic()
    call_from_search(page_a, "bob")
    wait_in_call(page_a, "alice")
    out["cli_call_connected_s"] = round(time.monotonic() - t0, 2)
    time.sleep(TALK_BEFORE_CUT)
    before = audio_stats(page_a)
    out["cli_switch_shown_s"], out["cli_path_after_cut"] = cut(alice, bob.udp, page_a, "alice")
    time.sleep(TALK_AFTER_CUT)
    after = audio_stats(page_a)
    out["alice_hears_bob"] = grows(before, after, "alice hearing bob")
    page_a.click("#hangup")
    stdout, _ = answer.communicate(timeout=30)
    assert answer.returncode == 0, f"peercall answer failed: {(work / 'answer.log').read_text()}"
    summary = json.loads(stdout.strip().splitlines()[-1])
    out["bob_summary"] = {k: summary.get(k) for k in
                              ("outcome", "setup_ms", "first_audio_ms", "duration_s", "path_switches",
                               "paths_used", "frames_received", "max_gap_ms", "mos_estimate")}
    assert summary["outcome"] == "completed", summary
    assert summary["path_switches"] >= 1, summary
    assert summary["frames_received"] >= 40 * (TALK_BEFORE_CUT + TALK_AFTER_CUT), summary

    rate, pcm = wavfile.read(heard)
    recorded = resample(to_float(pcm), rate)
    rate_in, mic = wavfile.read(alice_wav)
    reference = resample(to_float(mic), rate_in)
    ncc, lags = windowed_ncc(recorded, reference)
    control, _ = windowed_ncc(recorded, reference[::-1].copy())
    clip_ms = len(reference) / RATE * 1000
    on_lag = windows_on_lag(lags, clip_ms)
    out["bob_recording"] = {
        "seconds": round(len(recorded) / RATE, 1), "rms_dbfs": round(dbfs(recorded), 1),
        "ncc_windowed_median": round(ncc, 3), "windows": len(lags),
        "control_ncc": round(control, 3), "windows_on_lag": round(on_lag, 2),
        "lag_spread_ms": round(circular_spread(lags, clip_ms), 1),
    }
    log(f"bob's recording: {out['bob_recording']}")
    assert dbfs(recorded) >= MIN_RMS_DBFS, out["bob_recording"]
    assert ncc >= MIN_WINDOW_NCC, out["bob_recording"]
    assert control <= MAX_CONTROL_NCC, out["bob_recording"]
    assert on_lag >= MIN_WINDOWS_ON_LAG, out["bob_recording"]
    page_a.wait("alice's page after the hang-up", lambda: snapshot(page_a)["call"] is None, STEP_SECONDS)
    return out


def main():
    args = browser_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    work = Path(tempfile.mkdtemp(prefix="peercall-browser-call-"))
    nodes, drivers = [], []
    driver_proc = None
    figures = {}
    try:
        alice_wav = make_speech(work, ALICE_SAYS, "alice")
        bob_wav = make_speech(work, BOB_SAYS, "bob", voice="en-gb")
        carol_wav = make_speech(work, CAROL_SAYS, "carol", voice="en-us+f3")

        seed1 = Node(args.bin, work, "seed1", {**CALL_ENV, "PEERCALL_ROLE": "supernode"})
        nodes.append(seed1)
        spec1 = f"{seed1.api('GET', '/status')[1]['peer_key']}@{seed1.udp}"
        seed2 = Node(args.bin, work, "seed2", {**CALL_ENV, "PEERCALL_ROLE": "supernode",
                                               "PEERCALL_SEEDS": spec1})
        nodes.append(seed2)
        seeds = f"{spec1},{seed2.api('GET', '/status')[1]['peer_key']}@{seed2.udp}"
        desktop = {**CALL_ENV, "PEERCALL_SEEDS": seeds, "PEERCALL_DEBUG_ENDPOINTS": "true"}
        alice = Node(args.bin, work, "alice", {**desktop, "PEERCALL_HANDLE": "alice"})
        bob = Node(args.bin, work, "bob", {**desktop, "PEERCALL_HANDLE": "bob"})
        carol = Node(args.bin, work, "carol", {**desktop, "PEERCALL_HANDLE": "carol"})
        nodes += [alice, bob, carol]
        started = time.monotonic()
        for who, other in [(alice, "bob"), (alice, "carol"), (bob, "alice"), (carol, "alice")]:
            while who.api("GET", f"/v1/lookup?q={other}")[0] != 200:
                if time.monotonic() - started > DIRECTORY_SECONDS:
                    raise AssertionError(f"{who.name} cannot find {other} in the directory")
                time.sleep(0.3)
        figures["directory_ready_s"] = round(time.monotonic() - started, 1)

        port = free_port()
        driver_proc = subprocess.Popen(
            [args.chromedriver, f"--port={port}"], stdout=open(work / "chromedriver.log", "w"),
            stderr=subprocess.STDOUT, start_new_session=True)
        page_a, page_c = WebDriver(port), WebDriver(port)
        drivers += [page_a, page_c]
        page_a.wait_ready()
        start_browser(page_a, args.chromium, work, "alice", alice_wav)
        start_browser(page_c, args.chromium, work, "carol", carol_wav)
        sign_in(page_a, alice)
        sign_in(page_c, carol)

        # ---- browser to command line --------------------------------------------
        # One retry: a loaded CI run once gave bob a garbled recording (MOS 1.0,
        # NCC 0.20; unexplained, see the closing note of issue 6); the first
        # failure is logged with its figures, a second fails the test.
        for attempt in (1, 2):
            try:
                figures.update(cli_call(args, work, page_a, alice, bob, bob_wav, alice_wav))
                break
            except AssertionError as e:
                if attempt == 2:
                    raise
                log(f"browser-to-CLI call failed once, retrying: {e}")
                figures["cli_first_attempt_failed"] = str(e)[:500]
                alice.api("DELETE", "/v1/debug/block")
                page_a.wait("alice's page without a call", lambda: snapshot(page_a)["call"] is None
                            or page_a.click("#hangup"), STEP_SECONDS)

        # ---- browser to browser ---------------------------------------------------
        t0 = time.monotonic()
        call_from_search(page_a, "carol")
        page_c.wait("carol's page ringing", lambda: visible(page_c, "incoming"), STEP_SECONDS)
        page_c.click("#answer")
        wait_in_call(page_c, "carol")
        wait_in_call(page_a, "alice")
        figures["browser_call_connected_s"] = round(time.monotonic() - t0, 2)
        figures["browsers_before_cut"] = both_hear(page_a, page_c, TALK_BEFORE_CUT, "")
        figures["browser_switch_shown_s"], figures["browser_path_after_cut"] = \
            cut(carol, alice.udp, page_c, "carol")
        figures["browsers_after_cut"] = both_hear(page_a, page_c, TALK_AFTER_CUT, " after the cut")
        page_c.click("#hangup")
        page_a.wait("alice's page showing the end", lambda: snapshot(page_a)["call"] is None, STEP_SECONDS)
        status, calls = carol.api("GET", "/v1/calls")
        last = max(calls["calls"], key=lambda c: c["call"])
        assert last["outcome"] == "completed" and last["path_switches"] >= 1, last
        figures["carol_call"] = {k: last.get(k) for k in
                                 ("setup_ms", "first_audio_ms", "path_switches", "paths_used",
                                  "frames_received", "max_gap_ms", "mos_estimate")}

        for driver, who in ((page_a, "alice"), (page_c, "carol")):
            entries = driver.browser_log() or []
            bad = [e["message"] for e in entries
                   if "Content Security Policy" in e["message"] or "Uncaught" in e["message"]]
            assert not bad, f"{who}'s console: {bad}"
        print(json.dumps(figures))
        log("ok: browser to command line and browser to browser, with a path switch in each")
    except Exception:
        log_tails(work, ("alice.log", "bob.log", "carol.log", "answer.log", "chromedriver.log"), log, 25)
        for driver, who in zip(drivers, ("alice", "carol")):
            if driver.session:
                try:
                    log(f"{who}'s page: {snapshot(driver)}; console: {driver.browser_log()}")
                except Exception as e:
                    log(f"(no page state for {who}: {e})")
        log(f"figures so far: {figures}")
        raise
    finally:
        for driver in drivers:
            driver.quit(log)
        stop(driver_proc, "chromedriver", log)
        for node in reversed(nodes):
            node.stop()
        leave_work(work, args.keep, log)


if __name__ == "__main__":
    main()
