#!/usr/bin/env bash
# Real-browser calls through the node's WebRTC gateway: headless Chromium pages call
# a command-line user (`peercall answer --record`) and each other, with speech WAVs
# (espeak-ng) as fake microphones and a path cut mid-call; scripts/it/browser_call.py
# asserts the recording carries the caller's speech, both browsers decode audio, and
# the pages show the switch. Skips, saying so, only where Chromium cannot be
# installed. Uses the debug binary the test suite builds, with `--features webrtc`.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../setup.sh
. scripts/setup.sh
# shellcheck source=browser-lib.bash
. scripts/it/browser-lib.bash

browser_prereqs browser-call
browser_audio_prereqs browser-call
browser_build
# Bounded: a hung browser or node cannot stall the suite.
exec timeout --kill-after=10 300 "$browser_python" scripts/it/browser_call.py --bin "$browser_bin" "$@"
