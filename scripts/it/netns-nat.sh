#!/usr/bin/env bash
# NAT traversal groundwork in network namespaces with real kernel NAT
# (scripts/netns/README.md): seed supernodes on public hosts, desktops behind a
# port-restricted NAT (a, c) and a symmetric NAT (b), all real `peercall node`
# processes. Checks, each measured:
#   1. the NATs are what they claim (natprobe.py: mapping and filtering per RFC 4787),
#      and a silent mapping dies at the conntrack timeout;
#   2. the impairment tools do what they claim (relay delay, loss and cut; kernel loss);
#   3. every desktop holds Noise sessions with both supernodes through its NAT, and the
#      supernodes see it at its NAT's public address (same port at both supernodes
#      behind the cone NAT, different ports behind the symmetric one);
#   4. unsolicited datagrams from the internet to a desktop's mapping are filtered;
#   5. keepalives keep the sessions and mappings alive past three conntrack timeouts;
#   6. a session cut (iptables DROP in the NAT router, longer than the session timeout)
#      and a cut in a user-space relay on the path both recover once healed.
# Needs root; skips (exit 0) without it or without `ip netns`. About 50 s.
set -euo pipefail
# Decimal points in EPOCHREALTIME and awk, whatever the caller's locale.
export LC_ALL=C
cd "$(dirname "$0")/../.."
repo=$(pwd)

export NETNS_RUN=nat$$
# shellcheck source-path=SCRIPTDIR source=../netns/lib.sh
. scripts/netns/lib.sh
netns_script_begin netns-nat iproute2 iptables curl python3

# ---------------------------------------------------------------- parameters
# Conntrack UDP timeout in the NAT routers (Linux default 30 s, 120 s for streams):
# short, so that surviving three of them fits in the test.
export NETNS_UDP_TIMEOUT=10
# Keepalive interval of every node: well under the conntrack timeout.
KEEPALIVE_SECS=2
# Session timeout of every node: three keepalives, so one lost keepalive is harmless
# and a cut is noticed within seconds.
SESSION_TIMEOUT_SECS=6
# How long the desktops' sessions must survive: three conntrack timeouts.
SURVIVE_SECS=$((3 * NETNS_UDP_TIMEOUT))
# A cut lasts until both ends have dropped the session (so the desktop must dial
# again), and at least this long: more than the session timeout.
CUT_SECS=$((SESSION_TIMEOUT_SECS + 1))
# Deadline for sessions to come up (a debug build on a loaded 2-core machine).
SESSION_WAIT=20
# Deadline for a session to come back after a heal: the engine's handshake back-off
# (1, 2, 4 s... from the session's end) is at most 4 s by then; plus a wide margin.
RECOVER_WAIT=20
# Probe server ports (the STUN port and the next) and the echo port on host "stun".
PROBE_PORT=3478
PROBE_ALT_PORT=3479
ECHO_PORT=7000
# Whole-run watchdog: the run is killed (and cleaned up) if it takes longer.
WATCHDOG_SECS=240
# User-space relay on the path c -> sn2, in c's NAT router.
RELAY_PORT=7650
RELAY_DELAY_MS=20
RELAY_JITTER_MS=5
RELAY_LOSS=0.02

start=$SECONDS
summary=()
note() {
    echo "netns-nat: $*" >&2
}
measured() {
    summary+=("$*")
    note "ok: $*"
}
fail() { netns_fail "$@"; }
# secs_between T1 T2 [FLOOR]: T2 - T1 in seconds (EPOCHREALTIME values), one decimal.
secs_between() { awk -v a="$1" -v b="$2" -v f="${3:-}" 'BEGIN { d = b - a; if (f != "" && d < f) d = f; printf "%.1f\n", d }'; }
# secs_after T S: T + S.
secs_after() { awk -v a="$1" -v s="$2" 'BEGIN { printf "%.6f\n", a + s }'; }

netns_script_binary
probe=$repo/scripts/netns/natprobe.py
netns_script_guard $WATCHDOG_SECS 'nodes/*/node.log' 'impair/*.log'
netns_script_up

# ---------------------------------------------------------------- 1. NAT behaviour
netns_bg stun "$NETNS_STATE/probe-server.log" "$NETNS_PYTHON" "$probe" server \
    --addr "$NETNS_STUN1" --addr "$NETNS_STUN2" --port $PROBE_PORT --port $PROBE_ALT_PORT \
    --max-seconds $WATCHDOG_SECS >/dev/null
netns_bg stun "$NETNS_STATE/echo-server.log" "$NETNS_PYTHON" "$probe" echo \
    --bind "$NETNS_STUN1:$ECHO_PORT" --max-seconds $WATCHDOG_SECS >/dev/null
netns_wait "probe server" 5 grep -q listening "$NETNS_STATE/probe-server.log" || fail "probe server"
netns_wait "echo server" 5 grep -q listening "$NETNS_STATE/echo-server.log" || fail "echo server"

# Mapping lifetime, in the background (it takes a conntrack timeout): an answer after
# a short silence passes, one after a silence longer than the timeout is filtered.
expiry_short=4
expiry_long=$((NETNS_UDP_TIMEOUT + 3))
expiry_pids=()
for d in a b; do
    for after in $expiry_short $expiry_long; do
        netns_exec "$d" timeout 40 "$NETNS_PYTHON" "$probe" expiry --server "$NETNS_STUN1" \
            --port $PROBE_PORT --after "$after" >"$NETNS_STATE/expiry-$d-$after.json" &
        expiry_pids+=($!)
    done
done

# ---------------------------------------------------------------- 3. sessions through NAT
node_conf=("keepalive_secs = $KEEPALIVE_SECS" "session_timeout_secs = $SESSION_TIMEOUT_SECS")
netns_node_start sn1 sn1 'role = "supernode"' "${node_conf[@]}" || fail "start sn1"
netns_node_start sn2 sn2 'role = "supernode"' "${node_conf[@]}" || fail "start sn2"
seeds="seeds = [\"$(netns_node_seed sn1)\", \"$(netns_node_seed sn2)\"]"
sn2_port=$(netns_node_seed sn2)
sn2_port=${sn2_port##*:}
# c reaches sn2 through a user-space relay in its NAT router (set before c starts:
# the redirect applies to new flows).
netns_impair_start c-sn2 natc "$(netns_addr c_lan_gw):$RELAY_PORT" "$NETNS_SN2:$sn2_port" \
    --delay-ms $RELAY_DELAY_MS --jitter-ms $RELAY_JITTER_MS --loss $RELAY_LOSS ||
    fail "start relay c-sn2"
netns_impair_divert c "$NETNS_SN2" "$sn2_port" $RELAY_PORT || fail "divert c -> sn2 via relay"
t_nodes=$EPOCHREALTIME
for d in a b c; do
    netns_node_start "$d" "$d" "$seeds" "${node_conf[@]}" || fail "start $d"
done

sessions_up() {
    netns_node_has_sessions sn1 a b c && netns_node_has_sessions sn2 a b c &&
        netns_node_has_sessions a sn1 sn2 && netns_node_has_sessions b sn1 sn2 &&
        netns_node_has_sessions c sn1 sn2
}
netns_wait "every desktop in session with both supernodes" $SESSION_WAIT sessions_up ||
    fail "sessions did not come up: $(for n in sn1 sn2 a b c; do echo "$n: $(netns_node_status "$n")"; done)"
t_up=$SECONDS
measured "sessions: a, b, c each with sn1 and sn2 through their NATs, $(secs_between "$t_nodes" "$EPOCHREALTIME") s after the desktops were started"

declare -A seen
for d in a b c; do
    for sn in sn1 sn2; do
        seen[$d,$sn]=$(netns_node_session "$sn" "$d")
    done
    pub=$(netns_public_addr "$d")
    for sn in sn1 sn2; do
        [ "${seen[$d,$sn]%:*}" = "$pub" ] ||
            fail "$sn sees $d at ${seen[$d,$sn]}, not at its NAT's public address $pub"
    done
done
[ "${seen[a,sn1]}" = "${seen[a,sn2]}" ] ||
    fail "cone NAT: sn1 sees a at ${seen[a,sn1]}, sn2 at ${seen[a,sn2]}: the mapping depends on the destination"
[ "${seen[b,sn1]}" != "${seen[b,sn2]}" ] ||
    fail "symmetric NAT: sn1 and sn2 both see b at ${seen[b,sn1]}: the mapping does not depend on the destination"
measured "public addresses: supernodes see a at ${seen[a,sn1]} (both), b at ${seen[b,sn1]} and ${seen[b,sn2]} (one mapping per destination), c at ${seen[c,sn1]} and ${seen[c,sn2]} (via the relay)"

# ---------------------------------------------------------------- 1. NAT behaviour (cont.)
classify() { # ROLE
    netns_exec "$1" timeout 30 "$NETNS_PYTHON" "$probe" classify --server "$NETNS_STUN1" \
        --alt-server "$NETNS_STUN2" --port $PROBE_PORT --alt-port $PROBE_ALT_PORT
}
expect_nat() { # ROLE NAT_TYPE MAPPING
    local out type mapping
    out=$(classify "$1") || fail "natprobe classify in $1: $out"
    type=$(netns_json 'd["nat_type"]' <<<"$out")
    mapping=$(netns_json 'd["mapping"] + " mapping, " + d["filtering"] + " filtering"' <<<"$out")
    [ "$type" = "$2" ] || fail "$1: expected a $2 NAT, measured $type ($mapping): $out"
    [ "$(netns_json 'd["mapping"]' <<<"$out")" = "$3" ] || fail "$1: $out"
    measured "NAT in front of $1: $type ($mapping; $(netns_json '"port preserved" if d.get("port_preserved") else "port not preserved"' <<<"$out"))"
}
# Control: from a public host there is no NAT and unsolicited answers arrive, so the
# probe can tell "delivered" from "filtered".
out=$(classify sn1) || fail "natprobe classify in sn1: $out"
[ "$(netns_json 'd["nat_type"] + " " + d["filtering"]' <<<"$out")" = "none endpoint-independent" ] ||
    fail "public host sn1 should be un-NATed and unfiltered: $out"
expect_nat a "port-restricted cone" endpoint-independent
expect_nat b symmetric address-and-port-dependent
expect_nat c "port-restricted cone" endpoint-independent

# ---------------------------------------------------------------- 2. impairment tools
# Relay stun:.22 -> echo server; round trips from sn1 cross it twice.
relay_delay=25
relay_jitter=5
relay_loss=0.2
netns_impair_start selftest stun "$NETNS_STUN2:$((ECHO_PORT + 1))" "$NETNS_STUN1:$ECHO_PORT" \
    --delay-ms $relay_delay --jitter-ms $relay_jitter --loss $relay_loss --seed 1 ||
    fail "start relay selftest"
rtt() { # ROLE TARGET COUNT
    netns_exec "$1" timeout 20 "$NETNS_PYTHON" "$probe" rtt --to "$2" --count "$3" --interval-ms 5
}
kernel_loss=0.3
netns_loss stun "$NETNS_STUN1" "$NETNS_SN2" $kernel_loss || fail "netns_loss"
rtt sn2 "$NETNS_STUN1:$ECHO_PORT" 300 >"$NETNS_STATE/kernel-loss.json" &
kernel_pid=$!
relayed=$(rtt sn1 "$NETNS_STUN2:$((ECHO_PORT + 1))" 300) || fail "rtt through relay: $relayed"
wait $kernel_pid || fail "rtt with kernel loss"
netns_loss stun "$NETNS_STUN1" "$NETNS_SN2" 0 || fail "netns_loss 0"
# Expected: two crossings each way: RTT 2 x delay, loss 1 - (1 - p)^2. Tolerances:
# +-0.12 is four standard deviations of a loss fraction over 300 probes; the RTT may
# exceed 2 x delay by the relay's scheduling (a few ms on a busy machine; 20 ms of
# margin, still far below a delay applied twice).
impair_desc=$("$NETNS_PYTHON" - "$relayed" "$(cat "$NETNS_STATE/kernel-loss.json")" $relay_delay $relay_loss $kernel_loss <<'EOF'
import json, sys
relayed, kernel = json.loads(sys.argv[1]), json.loads(sys.argv[2])
delay, rloss, kloss = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
want_r, want_k = 1 - (1 - rloss) ** 2, 1 - (1 - kloss) ** 2
p50 = relayed["rtt_ms"]["p50"]
errors = []
if not 2 * delay - 1 <= p50 <= 2 * delay + 20:
    errors.append(f"relay RTT p50 {p50} ms, expected about {2 * delay} ms")
if abs(relayed["loss"] - want_r) > 0.12:
    errors.append(f"relay loss {relayed['loss']}, expected about {want_r:.2f}")
if abs(kernel["loss"] - want_k) > 0.12:
    errors.append(f"kernel loss {kernel['loss']}, expected about {want_k:.2f}")
if errors:
    sys.exit("; ".join(errors))
print(f"relay: RTT p50 {p50} ms (p10 {relayed['rtt_ms']['p10']}, p90 {relayed['rtt_ms']['p90']}) "
      f"for 2 x {delay:g} ms +- jitter, round-trip loss {relayed['loss']:.2f} (expected {want_r:.2f}); "
      f"iptables statistic: round-trip loss {kernel['loss']:.2f} (expected {want_k:.2f})")
EOF
) || fail "impairment self-check"
netns_impair_set selftest cut=1
sleep 0.3
cut_out=$(rtt sn1 "$NETNS_STUN2:$((ECHO_PORT + 1))" 40)
[ "$(netns_json 'd["received"]' <<<"$cut_out")" = 0 ] || fail "relay cut let datagrams through: $cut_out"
netns_impair_stop selftest
measured "impairment: $impair_desc; relay cut: 0 of 40 through"

# ---------------------------------------------------------------- 4. unsolicited filtering
unknown='peercall_dropped_datagrams_total{reason="unknown_protocol"}'
for d in a b; do
    mapping=${seen[$d,sn1]}
    before=$(netns_node_metric "$d" "$unknown") || fail "metric $unknown on $d"
    # From a host the desktop never contacted, and from sn1's address but another port.
    netns_exec stun "$NETNS_PYTHON" "$probe" send --to "$mapping" --payload "unsolicited from a stranger" >/dev/null
    netns_exec sn1 "$NETNS_PYTHON" "$probe" send --to "$mapping" --bind "$NETNS_SN1:$((PROBE_PORT + 100))" \
        --payload "unsolicited from the supernode's address, another port" >/dev/null
    sleep 1
    after=$(netns_node_metric "$d" "$unknown")
    [ "$after" = "$before" ] ||
        fail "$d received unsolicited datagrams through its NAT ($unknown $before -> $after)"
    # Control: the same datagram from inside the LAN arrives and is counted, so the
    # counter does see a delivered probe.
    netns_exec "$(netns_nat_of "$d")" "$NETNS_PYTHON" "$probe" send --to "$(netns_addr "$d"):$NETNS_NODE_PORT" \
        --payload "from the LAN" >/dev/null
    counted() { [ "$(netns_node_metric "$d" "$unknown")" = "$((before + 1))" ]; }
    netns_wait "LAN control datagram counted on $d" 5 counted ||
        fail "control datagram from the LAN was not counted on $d"
done
measured "unsolicited datagrams to a's and b's mappings (${seen[a,sn1]}, ${seen[b,sn1]}) from a stranger and from sn1's address on another port: filtered (0 delivered; a LAN control datagram was counted)"

# ---------------------------------------------------------------- 6. path cuts on c
no_session() { ! netns_node_session "$1" "$2"; }
cut_and_heal() { # KIND (iptables|relay) SUPERNODE
    local kind=$1 sn=$2 other t_cut t_down t_heal t_back
    other=sn1
    [ "$sn" = sn1 ] && other=sn2
    t_cut=$EPOCHREALTIME
    case $kind in
        iptables) netns_cut natc "$(netns_addr c)" "$(netns_addr "$sn")" || fail "netns_cut" ;;
        relay) netns_impair_set c-sn2 cut=1 ;;
    esac
    both_down() { no_session c "$sn" && no_session "$sn" c; }
    netns_wait "c and $sn to drop their session" $((SESSION_TIMEOUT_SECS + KEEPALIVE_SECS + 5)) \
        both_down || fail "$kind cut: c-$sn still up: $(netns_node_sessions c)"
    t_down=$EPOCHREALTIME
    netns_node_session c "$other" >/dev/null || fail "$kind cut of c-$sn also broke c-$other"
    sleep "$(secs_between "$EPOCHREALTIME" "$(secs_after "$t_cut" $CUT_SECS)" 0)"
    t_heal=$EPOCHREALTIME
    case $kind in
        iptables) netns_heal natc "$(netns_addr c)" "$(netns_addr "$sn")" ;;
        relay) netns_impair_set c-sn2 cut=0 ;;
    esac
    netns_wait "c to re-establish its session with $sn" $RECOVER_WAIT sessions_up ||
        fail "$kind cut: c-$sn did not come back within ${RECOVER_WAIT}s of the heal"
    t_back=$EPOCHREALTIME
    measured "$kind cut c-$sn for $(secs_between "$t_cut" "$t_heal") s: both ends dropped the session $(secs_between "$t_cut" "$t_down") s into the cut (timeout ${SESSION_TIMEOUT_SECS} s); c re-dialed and the session was back $(secs_between "$t_heal" "$t_back") s after the heal ($sn sees c at $(netns_node_session "$sn" c))"
}
cut_and_heal iptables sn1
cut_and_heal relay sn2
[ "$(netns_json 'd["up"]["cut"] > 0 and d["down"]["forwarded"] > 0' <"$NETNS_STATE/impair/c-sn2.json")" = true ] ||
    fail "relay c-sn2 stats: $(netns_impair_stats c-sn2)"

# ---------------------------------------------------------------- 5. survival
# Let a's and b's sessions (untouched since they came up) reach SURVIVE_SECS; the
# expiry probes end meanwhile.
left=$((t_up + SURVIVE_SECS + 1 - SECONDS))
[ $left -gt 0 ] && sleep $left
for pid in "${expiry_pids[@]}"; do wait "$pid" || true; done
for d in a b; do
    short=$(netns_json 'd.get("answer")' <"$NETNS_STATE/expiry-$d-$expiry_short.json")
    long=$(netns_json 'd.get("answer")' <"$NETNS_STATE/expiry-$d-$expiry_long.json")
    [ "$short,$long" = delivered,filtered ] ||
        fail "mapping lifetime behind $(netns_nat_of "$d"): answer after ${expiry_short}s $short, after ${expiry_long}s $long (expected delivered, filtered)"
done
measured "silent mappings (a, b): an answer after ${expiry_short} s passes, after ${expiry_long} s is filtered (conntrack UDP timeout ${NETNS_UDP_TIMEOUT} s)"
for d in a b; do
    for sn in sn1 sn2; do
        now_seen=$(netns_node_session "$sn" "$d") || fail "$sn lost its session with $d"
        [ "$now_seen" = "${seen[$d,$sn]}" ] ||
            fail "$sn saw $d move from ${seen[$d,$sn]} to $now_seen: the NAT mapping was lost"
        age=$(netns_node_session_field "$d" "$sn" established_age_s)
        "$NETNS_PYTHON" -c 'import sys; sys.exit(float(sys.argv[1]) < float(sys.argv[2]))' "$age" $SURVIVE_SECS ||
            fail "$d's session with $sn is ${age}s old, expected one session for ${SURVIVE_SECS}s"
    done
    ended=$(netns_node_metric "$d" 'peercall_sessions_ended_total{reason="timed_out"}')
    [ "$ended" = 0 ] || fail "$d had $ended session timeouts"
done
ka=$(netns_node_metric b peercall_keepalives_received_total)
ct=$(netns_exec natb grep -F "src=$(netns_addr b) dst=$NETNS_SN1 sport=$NETNS_NODE_PORT" /proc/net/nf_conntrack |
    awk '{print "timeout " $5 " s"}' | head -n 1)
measured "keepalives every ${KEEPALIVE_SECS} s kept a's and b's sessions (one each, no timeout) and mappings (unchanged, even b's random one: ${seen[b,sn1]}) for $((SECONDS - t_up)) s = $(((SECONDS - t_up) / NETNS_UDP_TIMEOUT)) conntrack timeouts; b received $ka keepalives; conntrack b->sn1: ${ct:-not listed}"

trap - INT TERM HUP
echo "netns-nat: summary ($((SECONDS - start)) s):"
printf '  %s\n' "${summary[@]}"
