#!/usr/bin/env bash
# Real-browser test of the call page: Debian's headless Chromium, driven through
# chromedriver (WebDriver over loopback HTTP, scripts/it/webdriver.py), signs in to a
# loopback node's page with its token, checks the handle and fingerprint shown, looks
# users up, adds a contact and follows its presence live, checks that calls are
# refused clearly while the node has no call API, that another origin cannot use the
# API, and that the `peercall page` link signs in (scripts/it/browser_page.py).
# Skips, saying so, only where Chromium cannot be installed. Uses the debug binary the
# test suite builds, with `--features webrtc` (the same binary as browser-echo.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../setup.sh
. scripts/setup.sh
# shellcheck source=browser-lib.bash
. scripts/it/browser-lib.bash

browser_prereqs browser-page
browser_build
# Bounded: a hung browser or node cannot stall the suite.
exec timeout --kill-after=10 180 python3 scripts/it/browser_page.py --bin "$browser_bin" "$@"
