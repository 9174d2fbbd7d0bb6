# Shared by the real-browser tests (sourced, so not named *.sh: the suite runs every
# scripts/it/*.sh): Debian's Chromium and chromedriver, the Python packages the
# audio checks use, and the binary under test.

# Installs chromium and chromium-driver if missing; exits 0 with a SKIPPED line
# naming test $1 only where they cannot be installed.
browser_prereqs() {
    if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
        if ! peercall_apt_install chromium chromium-driver; then
            echo "$1: SKIPPED: Debian's chromium and chromium-driver could not be installed" >&2
            exit 0
        fi
    fi
}

# espeak-ng and sox for the speech, numpy and scipy (in the test venv) for the
# analysis; sets $browser_python to the venv's interpreter.
browser_audio_prereqs() {
    peercall_apt_install espeak-ng sox
    local venv="${PEERCALL_VENV:-$HOME/.cache/peercall-venv}"
    if ! "$venv/bin/python" -c "import numpy, scipy" 2>/dev/null; then
        echo "$1: installing numpy, scipy into $venv" >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q numpy scipy
    fi
    browser_python="$venv/bin/python"
}

# Builds the daemon with the gateway; sets $browser_bin to it.
browser_build() {
    cargo build -q -p peercall --features webrtc
    browser_bin="${CARGO_TARGET_DIR:-target}/debug/peercall"
}
