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

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if ! peercall_apt_install chromium chromium-driver; then
        echo "browser-page: SKIPPED: Debian's chromium and chromium-driver could not be installed" >&2
        exit 0
    fi
fi

cargo build -q -p peercall --features webrtc
target="${CARGO_TARGET_DIR:-target}"
# Bounded: a hung browser or node cannot stall the suite.
exec timeout --kill-after=10 180 python3 scripts/it/browser_page.py --bin "$target/debug/peercall" "$@"
