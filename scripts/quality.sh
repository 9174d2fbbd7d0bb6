#!/usr/bin/env bash
# Measures peercall's voice quality with PESQ wideband (ITU-T P.862.2) over a grid of
# loss rates, seeds and FEC on/off, and prints the mean MOS per condition.
#
#   scripts/quality.sh            full grid: {natural, espeak} x 4 clips x 4 seeds x
#                                 {0,5,10,20 % random, 10 % bursty} x redundancy on/off
#                                 (~10 min on one core; QUALITY_JOBS=2 halves it)
#   scripts/quality.sh --quick    1 natural clip, 2 seeds, 0 and 10 % loss, defaults;
#                                 exits non-zero below floors (for the test suite)
#   extra arguments go to scripts/quality.py (--jitter-ms, --seeds, --bitrate, ...)
#
# The PESQ reference implementation is not free software: it is installed from PyPI
# into a private venv at run time and never committed. Natural speech is made from
# the human-voice recordings of Debian's alsa-utils, synthetic speech with espeak-ng;
# clips are built at run time, no audio is committed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="${PEERCALL_VENV:-$HOME/.cache/peercall-venv}"

need=()
[[ -e /usr/share/sounds/alsa/Front_Center.wav ]] || need+=(alsa-utils)
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v sox >/dev/null || need+=(sox)
if ((${#need[@]})); then
    echo "installing ${need[*]}" >&2
    sudo_cmd=""
    [[ $(id -u) -eq 0 ]] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
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
