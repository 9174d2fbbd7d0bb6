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
#   4. upgrade: a call started with the direct path cut (so it runs on a relay) moves
#      to direct within UPGRADE_BOUND of the heal. The relayed path is made worse
#      than the direct one: a and c delay what they send to the supernodes by
#      RELAY_EXTRA_MS in their own sockets ([emulate]), as a relay far away would;
#      on zero-delay links relay and direct score alike and the selector has no
#      improvement to switch on (scripts/netns/README.md).
# Needs root; skips (exit 0) without it or without `ip netns`. About 45 s.
set -euo pipefail
# Decimal points in EPOCHREALTIME and awk, whatever the caller's locale.
export LC_ALL=C
cd "$(dirname "$0")/../.."

export NETNS_RUN=calls$$
# shellcheck source-path=SCRIPTDIR source=../netns/lib.sh
. scripts/netns/lib.sh
netns_script_begin netns-calls iproute2 iptables curl python3 sox

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
# The upgrade call: its length, and the bound on moving to direct after the heal:
# re-validating the healed path (probes), the selector's 3 s hold on sustained
# improvement, and slack for a loaded machine.
UPGRADE_CALL_SECS=16
UPGRADE_BOUND=10
# Added by a and c to every datagram they send to a supernode (the relays): the
# relayed path's one-way delay grows by this, its R-factor drops by about 1 (G.107:
# 0.024 per ms), enough for the selector's preference of direct paths to decide.
RELAY_EXTRA_MS=40
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
fail() { netns_fail "$@"; }

netns_script_binary
bin=$NETNS_PEERCALL_BIN
netns_script_guard $WATCHDOG_SECS 'nodes/*/node.log' 'call-*.err'
netns_script_up

# The caller's audio, generated here (in the state directory: removed at the end).
tone=$NETNS_STATE/tone.wav
sox -n -r 48000 -c 1 "$tone" synth $((UPGRADE_CALL_SECS + 2)) sine 440 vol 0.5 2>/dev/null ||
    fail "sox could not write $tone"

# ---------------------------------------------------------------- nodes
node_conf=("keepalive_secs = $KEEPALIVE_SECS" "session_timeout_secs = $SESSION_TIMEOUT_SECS")
netns_node_start sn1 sn1 'role = "supernode"' "${node_conf[@]}" || fail "start sn1"
netns_node_start sn2 sn2 'role = "supernode"' "${node_conf[@]}" || fail "start sn2"
seeds="seeds = [\"$(netns_node_seed sn1)\", \"$(netns_node_seed sn2)\"]"
# Handles: a is alice (the caller), b is bob, c is carol (both answer by themselves).
declare -A handle=([a]=alice [b]=bob [c]=carol)
# a and c reach the supernodes (and so every relay) over a longer path.
far_relays=('[emulate]' "delay_ms = $RELAY_EXTRA_MS" "peers = [\"$NETNS_SN1\", \"$NETNS_SN2\"]")
netns_node_start a a "$seeds" "${node_conf[@]}" 'handle = "alice"' "${far_relays[@]}" ||
    fail "start a"
for d in b c; do
    extra=()
    [ "$d" = c ] && extra=("${far_relays[@]}")
    netns_node_start "$d" "$d" "$seeds" "${node_conf[@]}" "handle = \"${handle[$d]}\"" \
        '[calls]' 'auto_answer = true' \
        "answer_record = \"$(netns_node_dir "$d")/heard.wav\"" "${extra[@]}" || fail "start $d"
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

# 4. upgrade: a -> c with the direct path cut from the start, healed once the call
# runs on a relay: it must move to direct within UPGRADE_BOUND.
# a's session with c must end first: a call placed over a session whose path is
# dead (not yet timed out) waits for that session's timeout (see the report).
netns_cut nata "$(netns_addr a)" "$(netns_public_addr c)" || fail "netns_cut"
no_session_c() { ! netns_node_session a c; }
on_relay() { case $(active_kind) in relay1 | relay2) return 0 ;; esac; return 1; }
netns_wait "a's session with c to end" $((SESSION_TIMEOUT_SECS + 4)) no_session_c ||
    fail "upgrade: a's session with c outlived the cut"
rm -f "$NETNS_STATE/call-carol.json"
place_call carol $UPGRADE_CALL_SECS &
call_pid=$!
netns_wait "the upgrade call to be active on a relay" $DIRECT_WAIT on_relay ||
    fail "upgrade: the call was not on a relay within ${DIRECT_WAIT}s (active path: $(active_kind 2>&1))"
relay_state() {
    node_api a GET /v1/calls | netns_json '"; ".join("%s %s, RTT %s ms, R %.1f" % (p["kind"], p["state"], p["rtt_ms"] and round(p["rtt_ms"], 2), p["r"]) for c in d["calls"] if c["state"] == "active" for p in c["paths"])' || echo "?"
}
before_heal=$(relay_state)
t_heal=$EPOCHREALTIME
netns_heal nata "$(netns_addr a)" "$(netns_public_addr c)"
netns_wait "the call to upgrade to direct" $UPGRADE_BOUND on_direct ||
    fail "upgrade: the call did not move to direct within ${UPGRADE_BOUND}s of the heal (paths before the heal: $before_heal; now: $(relay_state))"
upgrade_ms=$(awk -v a="$t_heal" -v b="$EPOCHREALTIME" 'BEGIN { printf "%d", (b - a) * 1000 }')
wait $call_pid || fail "a -> carol (upgrade): peercall call failed: $(tail -n 5 "$NETNS_STATE/call-carol.err")"
check_completed carol
[ "$(field carol 'd["paths_used"][-1] == "direct" and any(p in ("relay1", "relay2") for p in d["paths_used"])')" = true ] ||
    fail "upgrade: the call did not go from a relay to direct: $(describe carol)"
measured "upgrade a -> c, relays ${RELAY_EXTRA_MS} ms further away: started on a relay with the direct path cut, moved to direct ${upgrade_ms} ms after the heal (bound ${UPGRADE_BOUND} s; paths before the heal: $before_heal); $(describe carol)"

trap - INT TERM HUP
echo "netns-calls: summary ($((SECONDS - start)) s):"
printf '  %s\n' "${summary[@]}"
