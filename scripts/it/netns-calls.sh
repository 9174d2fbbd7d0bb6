#!/usr/bin/env bash
# Calls across real kernel NAT in network namespaces (scripts/netns/README.md):
# seed supernodes sn1 and sn2 on public hosts (they relay), desktops a and c behind
# port-restricted NATs and b behind a symmetric NAT, all real `peercall node`
# processes; calls placed with `peercall call --json` in the caller's namespace.
# Checks, each measured (set-up, first audio, path kinds, switch gap):
#   1. a calls c (both port-restricted): the call completes, media went direct,
#      frames flowed both ways;
#   2. a calls b (symmetric): the call completes over a relay (relay1 or relay2);
#   3. failover: during an a -> c call on the direct path, an iptables DROP in a's
#      NAT router cuts UDP between a and c's public address (the supernodes stay
#      reachable): the call switches (path_switches >= 1) to a relay and completes.
#   4. measured, not asserted: a call started with the direct path cut, healed once
#      on a relay: does it upgrade to direct?
# Needs root; skips (exit 0) without it or without `ip netns`. About 45 s.
set -euo pipefail
# Decimal points in EPOCHREALTIME and awk, whatever the caller's locale.
export LC_ALL=C
cd "$(dirname "$0")/../.."

skip() {
    echo "netns-calls: SKIPPED: $*" >&2
    exit 0
}
[ "$(id -u)" -eq 0 ] || skip "needs root (network namespaces, iptables); run as root to include it"
# shellcheck source-path=SCRIPTDIR source=../setup.sh
. scripts/setup.sh
peercall_apt_install iproute2 iptables curl python3 sox || skip "cannot install iproute2, iptables, curl, python3, sox"
export NETNS_RUN=calls$$
ip netns add "$NETNS_RUN-probe" 2>/dev/null || skip "ip netns unavailable (no network namespace support)"
ip netns del "$NETNS_RUN-probe"

# ---------------------------------------------------------------- parameters
# Keepalive interval and session timeout of every node, as in netns-nat.sh: well
# under the conntrack timeout, and a lost keepalive is harmless.
KEEPALIVE_SECS=2
SESSION_TIMEOUT_SECS=6
# Deadline for sessions to come up and for the callees to be found in the directory
# (a debug build on a loaded 2-core machine).
SESSION_WAIT=25
LOOKUP_WAIT=25
# Seconds of conversation per call: enough for paths to be probed and frames counted.
CALL_SECS=5
# The failover call: its length, and how long it may take to be on the direct path
# before the cut (media starts on the first working path, which may be a relay).
FAILOVER_CALL_SECS=10
DIRECT_WAIT=6
# Upper bound on one `peercall call` (set-up, conversation, hang-up).
CALL_TIMEOUT=40
# Whole-run watchdog: the run is killed (and cleaned up) if it takes longer.
WATCHDOG_SECS=150

start=$SECONDS
summary=()
note() { echo "netns-calls: $*" >&2; }
measured() {
    summary+=("$*")
    note "ok: $*"
}
fail() {
    echo "netns-calls: FAIL: $*" >&2
    exit 1
}

# ---------------------------------------------------------------- binary
if [ -n "${PEERCALL_BIN:-}" ]; then
    bin=$PEERCALL_BIN
elif peercall_setup; then
    cargo build -q -p peercall || fail "cargo build -p peercall"
    bin=$CARGO_TARGET_DIR/debug/peercall
else
    bin=${CARGO_TARGET_DIR:-$HOME/.cache/peercall-target}/debug/peercall
    [ -x "$bin" ] || bin=${CARGO_TARGET_DIR:-$HOME/.cache/peercall-target}/release/peercall
fi
[ -x "$bin" ] || fail "no peercall binary (set PEERCALL_BIN or install cargo)"
export NETNS_PEERCALL_BIN=$bin
export NETNS_MAX_LIFETIME=$WATCHDOG_SECS

# shellcheck source-path=SCRIPTDIR source=../netns/lib.sh
. scripts/netns/lib.sh

watchdog=""
cleanup() {
    local status=$?
    trap - EXIT INT TERM HUP
    [ -z "$watchdog" ] || kill "$watchdog" 2>/dev/null || true
    if [ $status -ne 0 ] && [ -d "$NETNS_STATE" ]; then
        local log
        for log in "$NETNS_STATE"/nodes/*/node.log "$NETNS_STATE"/call-*.err; do
            [ -f "$log" ] || continue
            echo "---- ${log#"$NETNS_STATE"/} (last lines)" >&2
            tail -n 12 "$log" >&2
        done
    fi
    netns_down
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
# The watchdog wakes every second, and quits if this script died (reparented).
(
    trap 'exit 0' TERM
    me=$BASHPID
    for ((i = 0; i < WATCHDOG_SECS; i++)); do
        sleep 1 >/dev/null 2>&1
        [ "$(ps -o ppid= -p "$me" | tr -d ' ')" = $$ ] || exit 0
    done
    echo "netns-calls: FAIL: watchdog: over ${WATCHDOG_SECS}s" >&2
    kill -TERM $$
) &
watchdog=$!

netns_gc
export NETNS_OWNER=$$
netns_up || fail "topology"
# Unsolicited datagrams to a NAT router's public address are dropped before
# conntrack confirms them. Without this, a hole-punching datagram that reaches
# natc before c's own first one leaves an entry (a:7600 -> natc:7600) that takes
# c's mapping tuple, so MASQUERADE maps c to another port, which a's NAT filters:
# simultaneous punching would then fail by a Linux artefact, where a real
# port-restricted NAT simply discards such datagrams without keeping state.
for nat in nata natb natc; do
    netns_exec "$nat" iptables -w 5 -A INPUT -i wan -p udp -m conntrack --ctstate NEW -j DROP ||
        fail "filter rule in $nat"
done

# The caller's audio, generated here (in the state directory: removed at the end).
tone=$NETNS_STATE/tone.wav
sox -n -r 48000 -c 1 "$tone" synth $((FAILOVER_CALL_SECS + 2)) sine 440 vol 0.5 2>/dev/null ||
    fail "sox could not write $tone"

# ---------------------------------------------------------------- nodes
node_conf=("keepalive_secs = $KEEPALIVE_SECS" "session_timeout_secs = $SESSION_TIMEOUT_SECS")
netns_node_start sn1 sn1 'role = "supernode"' "${node_conf[@]}" || fail "start sn1"
netns_node_start sn2 sn2 'role = "supernode"' "${node_conf[@]}" || fail "start sn2"
seeds="seeds = [\"$(netns_node_seed sn1)\", \"$(netns_node_seed sn2)\"]"
# Handles: a is alice (the caller), b is bob, c is carol (both answer by themselves).
declare -A handle=([a]=alice [b]=bob [c]=carol)
netns_node_start a a "$seeds" "${node_conf[@]}" 'handle = "alice"' || fail "start a"
for d in b c; do
    netns_node_start "$d" "$d" "$seeds" "${node_conf[@]}" "handle = \"${handle[$d]}\"" \
        '[calls]' 'auto_answer = true' \
        "answer_record = \"$(netns_node_dir "$d")/heard.wav\"" || fail "start $d"
done

sessions_up() {
    netns_node_has_sessions a sn1 sn2 && netns_node_has_sessions b sn1 sn2 &&
        netns_node_has_sessions c sn1 sn2
}
netns_wait "every desktop in session with both supernodes" $SESSION_WAIT sessions_up ||
    fail "sessions did not come up: $(for n in sn1 sn2 a b c; do echo "$n: $(netns_node_status "$n")"; done)"

# node_api NAME METHOD PATH: an authenticated admin request to NAME.
node_api() {
    local dir
    dir=$(netns_node_dir "$1")
    netns_exec "$(netns_node_role "$1")" curl -sf --max-time 5 -X "$2" \
        -H "Authorization: Bearer $(cat "$dir/data/admin.token")" \
        "http://$(cat "$dir/data/admin.addr")$3"
}
found() { node_api a GET "/v1/lookup?q=$1"; }
for d in b c; do
    netns_wait "a to find ${handle[$d]} in the directory" $LOOKUP_WAIT found "${handle[$d]}" ||
        fail "a cannot find ${handle[$d]}: $(found "${handle[$d]}" 2>&1)"
done
note "sessions up and the directory answers, $((SECONDS - start)) s in"

# ---------------------------------------------------------------- calls
# place_call NAME SECS: a calls handle NAME for SECS seconds from its namespace;
# the JSON summary goes to $NETNS_STATE/call-NAME.json (stderr to .err).
place_call() {
    netns_exec a timeout --kill-after=5 $CALL_TIMEOUT "$bin" call "$1" --play "$tone" \
        --duration "$2" --json --data-dir "$(netns_node_dir a)/data" \
        >"$NETNS_STATE/call-$1.json" 2>"$NETNS_STATE/call-$1.err"
}
field() { netns_json "$2" <"$NETNS_STATE/call-$1.json"; }
describe() { # NAME: the figures of a finished call
    field "$1" '"set-up %s ms, first audio %s ms, paths %s, %d switches, frames %d sent / %d received, longest gap %d ms, MOS %.2f, %s" % (d["setup_ms"], d["first_audio_ms"], " then ".join(d["paths_used"]), d["path_switches"], d["frames_sent"], d["frames_received"], d["max_gap_ms"], d["mos_estimate"] or 0, d["outcome"])'
}
check_completed() { # NAME
    [ "$(field "$1" 'd["outcome"]')" = completed ] ||
        fail "call to $1 did not complete: $(cat "$NETNS_STATE/call-$1.json")"
    [ "$(field "$1" 'd["frames_sent"] > 0 and d["frames_received"] > 0')" = true ] ||
        fail "call to $1: frames did not flow both ways: $(describe "$1")"
}
callee_frames() { # ROLE: frames the callee received in its latest call
    node_api "$1" GET /v1/calls | netns_json 'max(d["calls"], key=lambda c: c["call"])["frames_received"]'
}

# 1. a -> c: both behind port-restricted NATs; hole punching gives a direct path.
place_call carol $CALL_SECS || fail "a -> carol: peercall call failed: $(tail -n 5 "$NETNS_STATE/call-carol.err")"
check_completed carol
[ "$(field carol '"direct" in d["paths_used"]')" = true ] ||
    fail "a -> c (port-restricted both): no direct path: $(describe carol)"
heard=$(callee_frames c) || fail "c's calls"
[ "$heard" -gt 0 ] || fail "c received no frames"
measured "a -> c (port-restricted -> port-restricted): $(describe carol); c received $heard frames"

# 2. a -> b: b's symmetric NAT defeats hole punching; media goes through a relay.
place_call bob $CALL_SECS || fail "a -> bob: peercall call failed: $(tail -n 5 "$NETNS_STATE/call-bob.err")"
check_completed bob
[ "$(field bob 'any(p in ("relay1", "relay2") for p in d["paths_used"])')" = true ] ||
    fail "a -> b (symmetric): no relay path: $(describe bob)"
heard=$(callee_frames b) || fail "b's calls"
[ "$heard" -gt 0 ] || fail "b received no frames"
measured "a -> b (port-restricted -> symmetric): $(describe bob); b received $heard frames"

# 3. failover: a -> c again; once on direct, cut UDP between a and c's public
# address in a's NAT router (both directions; the supernodes stay reachable).
rm -f "$NETNS_STATE/call-carol.json"
place_call carol $FAILOVER_CALL_SECS &
call_pid=$!
active_kind() { node_api a GET /v1/calls | netns_json '[c["path_kind"] for c in d["calls"] if c["state"] == "active"][0]'; }
on_direct() { [ "$(active_kind)" = direct ]; }
netns_wait "the failover call to be active on the direct path" $DIRECT_WAIT on_direct ||
    fail "failover call not on direct within ${DIRECT_WAIT}s (active path: $(active_kind 2>&1))"
t_cut=$EPOCHREALTIME
netns_cut nata "$(netns_addr a)" "$(netns_public_addr c)" || fail "netns_cut"
off_direct() { [ "$(active_kind)" != direct ]; }
netns_wait "the call to leave the cut direct path" 5 off_direct ||
    fail "the call stayed on the cut direct path for 5 s"
seen_ms=$(awk -v a="$t_cut" -v b="$EPOCHREALTIME" 'BEGIN { printf "%d", (b - a) * 1000 }')
seen_kind=$(active_kind || echo "?")
# The switch as a's node logged it (its own clock: not limited by the polling).
switch_ms=$("$NETNS_PYTHON" - "$t_cut" "$(netns_node_dir a)/node.log" <<'EOF'
import datetime, re, sys
t_cut, lines = float(sys.argv[1]), open(sys.argv[2]).read().splitlines()
hits = [l for l in lines if 'call path switched' in l and 'from="direct"' in l]
if hits:
    stamp = re.sub(r"\x1b\[[0-9;]*m", "", hits[-1]).split()[0].replace("Z", "+00:00")
    print(round((datetime.datetime.fromisoformat(stamp).timestamp() - t_cut) * 1000))
else:
    print("?")
EOF
)
wait $call_pid || fail "a -> carol (failover): peercall call failed: $(tail -n 5 "$NETNS_STATE/call-carol.err")"
check_completed carol
[ "$(field carol 'd["path_switches"] >= 1 and any(p in ("relay1", "relay2") for p in d["paths_used"])')" = true ] ||
    fail "failover: no switch to a relay: $(describe carol)"
dropped=$(netns_exec nata iptables -w 5 -L FORWARD -v -n -x | awk '/netns-cut/ { n += $1 } END { print n + 0 }')
[ "$dropped" -gt 0 ] || fail "the cut dropped nothing: the call was not on the path it cut"
c_side=$(node_api c GET /v1/calls | netns_json '(lambda c: "c heard %d frames, %d switches, longest gap %d ms, %d ms concealed" % (c["frames_received"], c["path_switches"], c["max_gap_ms"], c["concealed_ms"]))(max(d["calls"], key=lambda c: c["call"]))') ||
    fail "c's calls"
measured "failover a -> c, direct path cut in nata: a switched direct -> $seen_kind ${switch_ms} ms after the cut (its log; seen by polling after ${seen_ms} ms), $dropped datagrams dropped; $(describe carol); $c_side"

# 4. upgrade (measured, never failing the run): a -> c with the direct path cut
# from the start, healed once the call runs on a relay: does it move to direct?
# a's session with c must end first: a call placed over a session whose path is
# dead (not yet timed out) waits for that session's timeout (see the report).
netns_cut nata "$(netns_addr a)" "$(netns_public_addr c)" || fail "netns_cut"
no_session_c() { ! netns_node_session a c; }
upgrade="not measured"
on_relay() { case $(active_kind) in relay1 | relay2) return 0 ;; esac; return 1; }
if ! netns_wait "a's session with c to end" $((SESSION_TIMEOUT_SECS + 4)) no_session_c; then
    upgrade="not measured: a's session with c outlived the cut"
else
    rm -f "$NETNS_STATE/call-carol.json"
    place_call carol $FAILOVER_CALL_SECS &
    call_pid=$!
    if ! netns_wait "the upgrade call to be active on a relay" $DIRECT_WAIT on_relay; then
        upgrade="not measured: the call was not on a relay within ${DIRECT_WAIT}s"
    else
        t_heal=$EPOCHREALTIME
        netns_heal nata "$(netns_addr a)" "$(netns_public_addr c)"
        if netns_wait "the call to upgrade to direct" $((FAILOVER_CALL_SECS - 3)) on_direct; then
            upgrade="moved to direct $(awk -v a="$t_heal" -v b="$EPOCHREALTIME" 'BEGIN { printf "%d", (b - a) * 1000 }') ms after the heal"
        else
            direct_state=$(node_api a GET /v1/calls | netns_json '"; ".join("%s %s, RTT %s ms, R %.1f" % (p["kind"], p["state"], p["rtt_ms"] and round(p["rtt_ms"], 2), p["r"]) for c in d["calls"] if c["state"] == "active" for p in c["paths"])' || echo "?")
            upgrade="did NOT move to direct within $((FAILOVER_CALL_SECS - 3)) s of the heal (paths then: $direct_state)"
        fi
    fi
    if wait $call_pid; then
        upgrade="$upgrade; $(describe carol)"
    else
        upgrade="$upgrade; the call failed: $(tail -n 1 "$NETNS_STATE/call-carol.err")"
    fi
fi
measured "upgrade (not asserted): a -> c started with the direct path cut, healed mid-call: $upgrade"

trap - INT TERM HUP
echo "netns-calls: summary ($((SECONDS - start)) s):"
printf '  %s\n' "${summary[@]}"
