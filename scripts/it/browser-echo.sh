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
# shellcheck source=browser-lib.bash
. scripts/it/browser-lib.bash

browser_prereqs browser-echo
browser_audio_prereqs browser-echo
browser_build
# Bounded: a hung browser or node cannot stall the suite.
exec timeout --kill-after=10 240 "$browser_python" scripts/it/browser_echo.py --bin "$browser_bin" "$@"
