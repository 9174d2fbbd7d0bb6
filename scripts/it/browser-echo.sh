#!/usr/bin/env bash
# Real-browser test of the WebRTC gateway: Debian's headless Chromium, with a speech
# WAV (espeak-ng) as its fake microphone, opens a loopback node's echo page, sends
# its SDP offer with the admin token, and records the audio the node sends back;
# scripts/it/browser_echo.py asserts the speech came back (level, and normalised
# cross-correlation with the input). Skips, saying so, only where Chromium cannot be
# installed. Uses the debug binary the test suite builds, with `--features webrtc`.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../setup.sh
. scripts/setup.sh

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if ! peercall_apt_install chromium chromium-driver; then
        echo "browser-echo: SKIPPED: Debian's chromium and chromium-driver could not be installed" >&2
        exit 0
    fi
fi
peercall_apt_install espeak-ng sox

venv="${PEERCALL_VENV:-$HOME/.cache/peercall-venv}"
if ! "$venv/bin/python" -c "import numpy, scipy" 2>/dev/null; then
    echo "browser-echo: installing numpy, scipy into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q numpy scipy
fi

cargo build -q -p peercall --features webrtc
target="${CARGO_TARGET_DIR:-target}"
# Bounded: a hung browser or node cannot stall the suite.
exec timeout --kill-after=10 240 "$venv/bin/python" scripts/it/browser_echo.py --bin "$target/debug/peercall" "$@"
