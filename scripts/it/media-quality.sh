#!/usr/bin/env bash
# Voice quality smoke test: PESQ-WB of the real pipeline at 0 and 10 % loss on one
# espeak-ng clip, two seeds; fails below loose floors (scripts/quality.py QUICK_FLOORS).
# Uses the debug binary the test suite already builds: fast enough (~25 s), and no
# extra release build. Scores differ from a release build in the second decimal
# (libopus's float code is not bit-exact across compiler flags).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q -p peercall
target="${CARGO_TARGET_DIR:-target}"
PEERCALL_BIN="$target/debug/peercall" exec bash scripts/quality.sh --quick
