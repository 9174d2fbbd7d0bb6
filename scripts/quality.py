#!/usr/bin/env python3
"""PESQ wideband quality of peercall's audio pipeline over a grid of network conditions.

Called by scripts/quality.sh, which prepares the tools. For every clip, condition and
seed it runs `peercall media-eval`, scores the output against the input with PESQ
(ITU-T P.862.2 wideband, through the `pesq` package installed at run time), and prints
the mean MOS-LQO per condition, the redundancy gain, the bitrate on the wire and the
pipeline latency.

Two kinds of test material, both made at run time (no audio is committed):

- natural: a real human voice, the nine recordings Debian's alsa-utils ships in
  /usr/share/sounds/alsa (one word pair each, 1.3-1.5 s), concatenated with sox in
  different orders with short natural pauses into 11-12 s clips, the length P.862
  asks for. This is the primary material: the issue's targets are for natural speech.
- espeak: sentences spoken by espeak-ng with several voices. Formant synthesis, not
  natural speech; kept as a secondary column because it stresses the codec
  differently (and earlier results were measured on it).
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import scipy.io.wavfile as wavfile
import scipy.signal as signal
from pesq import pesq

ALSA_SOUNDS = Path("/usr/share/sounds/alsa")

# Each natural clip: seven of the eight channel-name recordings (Noise.wav is not
# speech; each clip leaves out a different one) in its own order, with the pause (s)
# before each recording after the first. 7 x ~1.4 s of speech, 1.2-1.3 s of pauses
# and 0.6 s of padding: 11-12 s with about half of it active speech (P.862.3 asks
# for 40-80 %; the recordings themselves pause between their two words).
NATURAL_CLIPS = [
    (["Front_Left", "Front_Center", "Front_Right", "Side_Left", "Side_Right", "Rear_Left",
      "Rear_Center"], [0.20, 0.15, 0.30, 0.20, 0.25, 0.15]),
    (["Rear_Left", "Rear_Center", "Rear_Right", "Side_Right", "Front_Right", "Front_Left",
      "Side_Left"], [0.25, 0.20, 0.15, 0.30, 0.20, 0.15]),
    (["Rear_Right", "Front_Left", "Rear_Center", "Side_Right", "Front_Center", "Rear_Left",
      "Front_Right"], [0.15, 0.30, 0.20, 0.20, 0.25, 0.15]),
    (["Side_Right", "Rear_Left", "Front_Center", "Rear_Right", "Side_Left", "Front_Right",
      "Rear_Center"], [0.30, 0.15, 0.25, 0.15, 0.20, 0.20]),
]

# Each espeak clip: (espeak-ng voice, text). Several sentences with natural pauses,
# 8-12 s; male and female voices, two accents.
ESPEAK_CLIPS = [
    ("en-us", "A small boat drifted past the old stone bridge. Nobody on the shore "
              "seemed to notice it. Later that evening, the wind picked up and the rain began to fall."),
    ("en-gb+f3", "Please leave the parcel with the neighbour if nobody answers. "
                 "I will be back before six, unless the train is late again. Thank you so much for waiting."),
    ("en-us+m3", "The meeting moved to Thursday morning at nine. Bring the printed report "
                 "and the figures from last quarter. We should finish well before lunch."),
    ("en-gb+f4", "Seven bright kites rose over the hill as the children cheered. "
                 "One of them caught in a tree, but the others kept climbing into the clouds."),
]

FULL_LOSSES = ["none", "random:5", "random:10", "random:20", "bursty:10:60"]
QUICK_LOSSES = ["none", "random:10", "random:20"]
QUICK_CLIPS = 2
QUICK_SEEDS = 2

# Redundancy modes: the pipeline's defaults (LBRR in-band FEC sized from the loss
# the receiver reports), plain concealment (Deep PLC only), and DRED (100 ms) with
# and without LBRR; DRED is off by default (crates/media/src/codec.rs says why).
MODES = {
    "on": [],
    "off": ["--no-fec", "--dred-ms", "0"],
    "dred": ["--dred-ms", "100"],
    "dred-only": ["--no-fec", "--dred-ms", "100"],
}

# Issue #4's targets (mean over seeds, 32 kb/s, natural speech): PESQ-WB per loss.
TARGETS = {"none": 4.1, "random:5": 3.8, "random:10": 3.4, "random:20": 2.7}
GAIN_TARGET = 0.8
LATENCY_MEDIAN_TARGET = 60.0
LATENCY_P95_TARGET = 80.0

# --quick floors (natural clips 0-1, seeds 1-2, debug build), about 0.2 under what
# was measured when they were set (4.50, 3.88 and 3.15 at 0, 10 and 20 %; gain
# +1.33 at 10 %), so they catch a broken pipeline, not tuning noise. Latency is held
# to the issue's own targets: it does not depend on the material.
QUICK_FLOORS = {"none": 4.3, "random:10": 3.6, "random:20": 2.9}
QUICK_GAIN_FLOOR = 1.0
QUICK_LATENCY_CEILING = LATENCY_P95_TARGET

PESQ_RATE = 16000


def run(cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def make_natural(index, out48, work):
    names, pauses = NATURAL_CLIPS[index]
    parts = [str(ALSA_SOUNDS / f"{names[0]}.wav")]
    for name, pause in zip(names[1:], pauses):
        gap = work / f"gap{int(pause * 1000)}.wav"
        if not gap.exists():
            run(["sox", "-R", "-n", "-r", "48000", "-b", "16", "-c", "1", str(gap), "trim", "0", str(pause)])
        parts += [str(gap), str(ALSA_SOUNDS / f"{name}.wav")]
    # One gain for the whole clip (peak at -3 dBFS) keeps the words' natural levels;
    # a little silence either side, as PESQ likes. -R: repeatable dither, so every
    # run scores the same clips.
    run(["sox", "-R", *parts, "-r", "48000", "-b", "16", "-c", "1", str(out48),
         "norm", "-3", "pad", "0.3", "0.3"])


def make_espeak(index, out48, work):
    voice, text = ESPEAK_CLIPS[index]
    raw = work / (out48.stem + "_raw.wav")
    run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(raw), text])
    run(["sox", "-R", str(raw), "-r", "48000", "-b", "16", "-c", "1", str(out48),
         "norm", "-3", "pad", "0.3", "0.3"])


MATERIALS = {
    "natural": (len(NATURAL_CLIPS), make_natural),
    "espeak": (len(ESPEAK_CLIPS), make_espeak),
}


def to16k(path):
    rate, x = wavfile.read(path)
    if rate != 48000:
        sys.exit(f"{path}: expected 48 kHz, got {rate}")
    return signal.resample_poly(x.astype(np.float64), 1, 3)


def evaluate(args, ref_path, ref16, loss, seed, extra, jitter_ms, work):
    """One media-eval run and its PESQ score."""
    out = Path(tempfile.mkstemp(suffix=".wav", dir=work)[1])
    try:
        cmd = [args.bin, "media-eval", "--input", str(ref_path), "--output", str(out),
               "--loss", loss, "--jitter-ms", str(jitter_ms), "--seed", str(seed),
               "--bitrate", str(args.bitrate), "--bandwidth", args.bandwidth, "--json",
               *extra, *args.extra]
        report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        return pesq(PESQ_RATE, ref16, to16k(out), "wb"), report
    finally:
        out.unlink(missing_ok=True)


SWEEP_JITTER_MS = [0, 5, 10, 20, 40]


def latency_sweep(args, pool, ref, seeds, work):
    """Pipeline latency and PESQ against network jitter, no loss, one clip."""
    ref_path, ref16 = ref
    print(f"\nlatency against jitter (no loss, defaults, natural clip 0, {len(seeds)} seeds; "
          f"per-packet extra delay uniform in 0..2J)\n")
    print("| jitter J ms | latency median ms | latency p95 ms | frame p95 ms (max) | late | mean PESQ |")
    print("|---|---|---|---|---|---|")
    for jitter in SWEEP_JITTER_MS:
        futs = [pool.submit(evaluate, args, ref_path, ref16, "none", seed, [], jitter, work)
                for seed in seeds]
        rows = [f.result() for f in futs]
        lats = sorted(r["pipeline_latency_ms"] for _, r in rows)
        frame_p95 = [r["pipeline_latency_ms"] - r["jb_delay_ms_avg"] + r["jb_delay_ms_p95"]
                     for _, r in rows]
        p95 = lats[min(len(lats) - 1, int(0.95 * len(lats)))]
        print(f"| {jitter} | {statistics.median(lats):.1f} | {p95:.1f} | {max(frame_p95):.1f} "
              f"| {statistics.fmean(r['late'] for _, r in rows):.1f} "
              f"| {statistics.fmean(s for s, _ in rows):.2f} |")


def print_table(material, results, args, nclips, nseeds):
    print(f"\n{material} speech: PESQ-WB (P.862.2) MOS-LQO, {args.bitrate} b/s, {args.bandwidth}, "
          f"jitter {args.jitter_ms} ms, {nclips} clip(s) x {nseeds} seed(s) per condition\n")
    print("| loss | redundancy | mean PESQ | min | max | target | kb/s on wire | lost "
          "| FEC-recovered | DRED-recovered | concealed | late | latency ms | E-model MOS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    means = {}
    for (loss, mode), rows in results.items():
        scores = [s for s, _ in rows]
        reps = [r for _, r in rows]
        mean = statistics.fmean(scores)
        means[(loss, mode)] = mean
        target = TARGETS.get(loss) if mode == "on" and material == "natural" else None

        def avg(key):
            return statistics.fmean(r[key] for r in reps)

        print(f"| {loss} | {mode} | {mean:.2f} | {min(scores):.2f} | {max(scores):.2f} "
              f"| {'≥ %.1f' % target if target else ''} | {avg('bitrate_bps') / 1000:.1f} "
              f"| {avg('lost'):.1f} | {avg('fec_recovered'):.1f} | {avg('dred_recovered'):.1f} "
              f"| {avg('concealed'):.1f} "
              f"| {avg('late'):.1f} | {avg('pipeline_latency_ms'):.1f} | {avg('mos_estimate'):.2f} |")
    return means


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the peercall binary")
    ap.add_argument("--quick", action="store_true",
                    help="2 natural clips, 2 seeds, 0/10/20 %% loss, on and off; assert floors")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--jitter-ms", type=float, default=5.0)
    ap.add_argument("--bitrate", type=int, default=32000)
    ap.add_argument("--bandwidth", default="wb")
    ap.add_argument("--losses", default=None, help="comma-separated loss specs (default: the grid)")
    ap.add_argument("--materials", default="natural,espeak",
                    help="comma-separated: natural, espeak (default both)")
    ap.add_argument("--modes", default="on,off",
                    help="comma-separated redundancy modes: on (defaults: LBRR), off (concealment "
                         "only), dred (LBRR + DRED), dred-only")
    ap.add_argument("--extra", action="append", default=[],
                    help="an extra media-eval argument for every run (repeatable; use --extra=--flag)")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("QUALITY_JOBS", "1")),
                    help="parallel media-eval runs (default 1: the build machines are shared)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the latency-against-jitter sweep")
    ap.add_argument("--keep", default=None, help="directory to keep the clips in")
    args = ap.parse_args()

    materials = ["natural"] if args.quick else args.materials.split(",")
    for m in materials:
        if m not in MATERIALS:
            sys.exit(f"unknown material `{m}` (natural, espeak)")
    if "natural" in materials and not (ALSA_SOUNDS / "Front_Center.wav").exists():
        sys.exit(f"{ALSA_SOUNDS} is missing: install Debian's alsa-utils")
    seeds = list(range(1, (QUICK_SEEDS if args.quick else args.seeds) + 1))
    losses = args.losses.split(",") if args.losses else (QUICK_LOSSES if args.quick else FULL_LOSSES)
    modes = ["on", "off"] if args.quick else args.modes.split(",")
    for m in modes:
        if m not in MODES:
            sys.exit(f"unknown mode `{m}` ({', '.join(MODES)})")

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="peercall-quality-"))
    work.mkdir(parents=True, exist_ok=True)

    all_reports = []
    failures = []
    natural_refs = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for material in materials:
            nclips, make = MATERIALS[material]
            nclips = QUICK_CLIPS if args.quick else nclips
            refs = []
            for i in range(nclips):
                path = work / f"{material}{i}.wav"
                make(i, path, work)
                refs.append((path, to16k(path)))
            if material == "natural":
                natural_refs = refs
            futs = {}
            for loss in losses:
                for mode in modes:
                    for ref_path, ref16 in refs:
                        for seed in seeds:
                            f = pool.submit(evaluate, args, ref_path, ref16, loss, seed, MODES[mode],
                                            args.jitter_ms, work)
                            futs.setdefault((loss, mode), []).append(f)
            results = {key: [f.result() for f in fs] for key, fs in futs.items()}
            all_reports += [r for rows in results.values() for _, r in rows]
            means = print_table(material, results, args, len(refs), len(seeds))
            if ("random:10", "on") in means and ("random:10", "off") in means:
                gain = means[("random:10", "on")] - means[("random:10", "off")]
                print(f"\nredundancy gain at 10 % random loss ({material}): {gain:+.2f} "
                      f"(target ≥ +{GAIN_TARGET})")
                if material == "natural" and gain < GAIN_TARGET:
                    failures.append(f"gain {gain:.2f} < {GAIN_TARGET}")
            if material == "natural":
                for (loss, mode), mean in means.items():
                    if mode == "on" and loss in TARGETS and mean < TARGETS[loss]:
                        failures.append(f"{loss}: {mean:.2f} < {TARGETS[loss]}")
                natural_means = means

        lat = sorted(r["pipeline_latency_ms"] for r in all_reports)
        # A frame's latency is the fixed part plus its own jitter-buffer wait.
        frame_p95 = sorted(r["pipeline_latency_ms"] - r["jb_delay_ms_avg"] + r["jb_delay_ms_p95"]
                           for r in all_reports)
        med = statistics.median(lat)
        print(f"\npipeline latency over {len(lat)} runs: median of run means {med:.1f} ms "
              f"(target ≤ {LATENCY_MEDIAN_TARGET:.0f}), "
              f"p95 of run means {lat[min(len(lat) - 1, int(0.95 * len(lat)))]:.1f} ms, "
              f"median per-run frame p95 {statistics.median(frame_p95):.1f} ms, "
              f"max per-run frame p95 {max(frame_p95):.1f} ms (target ≤ {LATENCY_P95_TARGET:.0f})")
        if med > LATENCY_MEDIAN_TARGET:
            failures.append(f"latency median {med:.1f} ms > {LATENCY_MEDIAN_TARGET}")
        if max(frame_p95) > LATENCY_P95_TARGET:
            failures.append(f"frame latency p95 {max(frame_p95):.1f} ms > {LATENCY_P95_TARGET}")

        if not args.quick and not args.losses and not args.no_sweep and natural_refs:
            latency_sweep(args, pool, natural_refs[0], seeds, work)

    if failures:
        print("targets missed: " + "; ".join(failures))

    if args.quick:
        bad = [f"{loss}: {natural_means[(loss, 'on')]:.2f} < {floor}"
               for loss, floor in QUICK_FLOORS.items() if natural_means[(loss, "on")] < floor]
        gain = natural_means[("random:10", "on")] - natural_means[("random:10", "off")]
        if gain < QUICK_GAIN_FLOOR:
            bad.append(f"gain at 10 %: {gain:.2f} < {QUICK_GAIN_FLOOR}")
        if med > LATENCY_MEDIAN_TARGET:
            bad.append(f"latency median {med:.1f} ms > {LATENCY_MEDIAN_TARGET}")
        if max(frame_p95) > QUICK_LATENCY_CEILING:
            bad.append(f"frame latency p95 {max(frame_p95):.1f} ms > {QUICK_LATENCY_CEILING}")
        if bad:
            print("QUICK FLOORS FAILED: " + "; ".join(bad))
            return 1
        print("quick floors passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
