#!/usr/bin/env bash
# The whole test suite: installs what is missing, then format, lints, docs, unit and
# integration tests, fuzz smoke runs and the integration scripts. Exits non-zero on
# the first failing step; prints a summary line at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=setup.sh
. scripts/setup.sh
peercall_setup

passed=0
step() {
    local name=$1
    shift
    echo "==> $name" >&2
    local start=$SECONDS
    if "$@"; then
        passed=$((passed + 1))
        echo "==> $name: ok ($((SECONDS - start)) s)" >&2
    else
        echo "==> $name: FAILED" >&2
        echo "test.sh: $passed passed, 1 failed"
        exit 1
    fi
}

fuzz_smoke() {
    command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
    local seconds=${PEERCALL_FUZZ_SECONDS:-10} target
    for target in $(cd fuzz && cargo fuzz list); do
        echo "fuzz: $target for ${seconds}s" >&2
        (cd fuzz && CARGO_TARGET_DIR="$HOME/.cache/peercall-fuzz-target" \
            cargo fuzz run "$target" -s none -- -max_total_time="$seconds" -print_final_stats=0 2>&1 |
            grep -E "^Done|ERROR|panicked" >&2) || return 1
    done
}

# The `webrtc` feature of peercall (the browser gateway, str0m) is off by default.
# Lints cover both builds of peercall (the second re-checks only peercall); docs and
# tests run once, with the feature, which is the superset.
WEBRTC=(--features peercall/webrtc)
step "cargo fmt" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --workspace --all-targets --quiet -- -D warnings
step "cargo clippy (webrtc)" cargo clippy -p peercall --all-targets --quiet --features webrtc -- -D warnings
step "cargo doc" env RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet "${WEBRTC[@]}"
step "cargo test" cargo test --workspace --quiet "${WEBRTC[@]}"
step "fuzz smoke" fuzz_smoke
for script in scripts/it/*.sh; do
    [ -e "$script" ] || continue
    step "$script" bash "$script"
done
echo "test.sh: $passed passed, 0 failed"
