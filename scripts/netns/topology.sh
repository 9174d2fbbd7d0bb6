#!/usr/bin/env bash
# The NAT test topology in network namespaces (see README.md in this directory).
#
#   topology.sh up [RUN_ID]      build it (fails if that run exists; removes a
#                                partial build on failure)
#   topology.sh down [RUN_ID]    remove it, with every process inside (idempotent)
#   topology.sh status [RUN_ID]  namespaces, addresses, NAT rules, conntrack timeouts
#   topology.sh probe [RUN_ID]   measure each NAT's mapping and filtering (natprobe.py)
#
# RUN_ID (default: $NETNS_RUN, else "pcnet") prefixes every namespace name, so runs
# with different ids never collide. Needs root. Set NETNS_UDP_TIMEOUT (seconds) before
# `up` to shorten the conntrack UDP timeouts in the NAT routers.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cmd=${1:-}
export NETNS_RUN=${2:-${NETNS_RUN:-pcnet}}
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

# Probe ports on the probe host "stun" (the STUN port and the next one).
PROBE_PORT=3478
PROBE_ALT_PORT=3479

need_root() {
    [ "$(id -u)" -eq 0 ] || { echo "topology.sh: needs root (network namespaces, iptables)" >&2; exit 1; }
}

case $cmd in
    up)
        need_root
        netns_up
        echo "run $NETNS_RUN up; state in $NETNS_STATE; remove with: $0 down $NETNS_RUN"
        ;;
    down)
        need_root
        netns_down
        echo "run $NETNS_RUN down"
        ;;
    status)
        need_root
        netns_load
        for ns in $(netns_list); do
            echo "== $ns"
            ip -n "$ns" -4 -brief addr show | grep -v '^lo ' || true
            ip netns exec "$ns" iptables -t nat -S POSTROUTING 2>/dev/null | grep -v '^-P' || true
            if ip netns exec "$ns" sysctl -n net.ipv4.ip_forward 2>/dev/null | grep -q 1; then
                echo "conntrack udp timeout: $(ip netns exec "$ns" sysctl -n net.netfilter.nf_conntrack_udp_timeout) s," \
                    "stream: $(ip netns exec "$ns" sysctl -n net.netfilter.nf_conntrack_udp_timeout_stream) s"
            fi
        done
        ;;
    probe)
        need_root
        netns_load
        log=$NETNS_STATE/probe-server.log
        pid=$(netns_bg stun "$log" "$NETNS_PYTHON" "$here/natprobe.py" server \
            --addr "$NETNS_STUN1" --addr "$NETNS_STUN2" \
            --port $PROBE_PORT --port $PROBE_ALT_PORT --max-seconds 60)
        trap 'kill "$pid" 2>/dev/null || true' EXIT
        netns_wait "probe server" 5 grep -q listening "$log"
        for desktop in a b c; do
            echo "$desktop behind $(netns_nat_of "$desktop"):"
            netns_exec "$desktop" timeout 30 "$NETNS_PYTHON" "$here/natprobe.py" classify \
                --server "$NETNS_STUN1" --alt-server "$NETNS_STUN2" \
                --port $PROBE_PORT --alt-port $PROBE_ALT_PORT
        done
        ;;
    *)
        sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
