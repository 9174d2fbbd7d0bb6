#!/usr/bin/env bash
# The main job: installs what is missing, builds, and runs `peercall demo` (a small
# local network on loopback). Arguments are passed to `peercall demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=setup.sh
. scripts/setup.sh
peercall_setup
# With the browser gateway (POST /v1/webrtc/offer, the /webrtc/echo page).
cargo build --release --quiet -p peercall --features webrtc
exec "$CARGO_TARGET_DIR/release/peercall" demo "$@"
