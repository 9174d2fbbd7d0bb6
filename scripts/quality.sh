#!/usr/bin/env bash
# Measures peercall's voice quality with PESQ wideband (ITU-T P.862.2) over a grid of
# loss rates, seeds and FEC on/off, and prints the mean MOS per condition.
#
#   scripts/quality.sh            full grid: 4 clips x 4 seeds x {0,5,10,20 % random,
#                                 10 % bursty} x FEC on/off (~5 min on 2 cores)
#   scripts/quality.sh --quick    1 clip, 2 seeds, 0 and 10 % loss, FEC on; exits
#                                 non-zero below loose floors (for the test suite)
#   extra arguments go to scripts/quality.py (--jitter-ms, --seeds, --bitrate, ...)
#
# The PESQ reference implementation is not free software: it is installed from PyPI
# into a private venv at run time and never committed. Speech comes from espeak-ng.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="${PEERCALL_VENV:-$HOME/.cache/peercall-venv}"

need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v sox >/dev/null || need+=(sox)
if ((${#need[@]})); then
    echo "installing ${need[*]}" >&2
    sudo_cmd=""
    [[ $(id -u) -eq 0 ]] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! "$venv/bin/python" -c "import pesq, numpy, scipy" 2>/dev/null; then
    echo "installing pesq, numpy, scipy into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip >/dev/null
    "$venv/bin/pip" install -q pesq numpy scipy
fi

bin="${PEERCALL_BIN:-}"
if [[ -z "$bin" ]]; then
    (cd "$root" && cargo build --release -q -p peercall)
    bin="${CARGO_TARGET_DIR:-$root/target}/release/peercall"
fi

exec "$venv/bin/python" "$here/quality.py" --bin "$bin" "$@"
