#!/usr/bin/env bash
# Sourced by test.sh and demo.sh: installs what a fresh Debian 12 machine lacks and
# sets the shared build cache. Idempotent and quiet when everything is present.

# Debian packages the build and the tests need (alsa-utils for the human-voice
# recordings in /usr/share/sounds/alsa that scripts/quality.sh builds its clips from;
# python3-venv, python3-dev and gcc for the test-time venv, where pip builds `pesq`).
PEERCALL_APT_PACKAGES=(cmake pkg-config iproute2 iptables prometheus sox espeak-ng alsa-utils stun-client
    python3-venv python3-dev gcc)

peercall_missing_packages() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}

peercall_apt_install() {
    local missing
    missing=$(peercall_missing_packages "$@")
    [ -z "$missing" ] && return 0
    echo "setup: installing Debian packages: $missing" >&2
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq >&2
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >&2
}

peercall_setup() {
    peercall_apt_install "${PEERCALL_APT_PACKAGES[@]}"
    if ! command -v cargo >/dev/null 2>&1; then
        # shellcheck disable=SC1091
        [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust with rustup" >&2; return 1; }
    # The build cache lives outside the clone so fresh clones reuse it.
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peercall-target}"
    mkdir -p "$CARGO_TARGET_DIR"
}
