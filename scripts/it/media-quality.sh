#!/usr/bin/env bash
# Voice quality smoke test: PESQ-WB of the real pipeline on two natural-speech clips
# (human-voice recordings from alsa-utils), two seeds, 0/10/20 % random loss with
# redundancy on and off; fails below the floors in scripts/quality.py (QUICK_FLOORS,
# QUICK_GAIN_FLOOR) or over the latency targets. Uses the debug binary the test suite
# already builds: fast enough (~20 s), and no extra release build. Scores differ from
# a release build in the second decimal (libopus's float code is not bit-exact
# across compiler flags).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q -p peercall
target="${CARGO_TARGET_DIR:-target}"
PEERCALL_BIN="$target/debug/peercall" exec bash scripts/quality.sh --quick
