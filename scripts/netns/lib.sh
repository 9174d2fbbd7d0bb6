# shellcheck shell=bash
# Network-namespace test topology with real kernel NAT, and a shell API to run
# `peercall node` processes in it, read their state and impair their paths.
#
# Source it, set NETNS_RUN (a short run id) and call netns_up; call netns_down on
# every exit path (a trap). Everything lives in namespaces named "$NETNS_RUN-<role>";
# the root namespace is never touched (no interface, route, rule or sysctl there).
# Needs root, iproute2, iptables (nft or legacy backend), python3 and curl.
# The README next to this file has the addressing plan and the NAT types; every
# public function is documented where it is defined, and listed there.

# Run id: prefixes every namespace, so parallel runs cannot collide. Lowercase letters
# and digits, at most 12 (namespace names stay short and greppable).
NETNS_RUN=${NETNS_RUN:-pcn$$}
# Per-run state: node data directories, logs, pid files, relay control files.
NETNS_STATE=${NETNS_STATE:-${TMPDIR:-/tmp}/peercall-netns-$NETNS_RUN}
# Conntrack UDP timeout (seconds) in the NAT namespaces, both for unreplied flows and
# for streams. Linux defaults to 30 and 120 s; tests lower it so that keepalives
# that keep a mapping alive can be checked within a minute.
NETNS_UDP_TIMEOUT=${NETNS_UDP_TIMEOUT:-30}
# UDP port every node listens on (each host is its own namespace, so all can share it).
NETNS_NODE_PORT=${NETNS_NODE_PORT:-7600}
# Upper bound on any process started here (nodes, relays, probes), in seconds, so a
# run killed with SIGKILL leaves nothing running for long; netns_down stops them anyway.
NETNS_MAX_LIFETIME=${NETNS_MAX_LIFETIME:-600}
# The Python interpreter for the helpers (standard library only). The system one
# starts fastest (a version-manager shim can cost a quarter second per call).
if [ -z "${NETNS_PYTHON:-}" ]; then
    NETNS_PYTHON=python3
    [ -x /usr/bin/python3 ] && NETNS_PYTHON=/usr/bin/python3
fi
# The peercall binary netns_node_start runs.
NETNS_PEERCALL_BIN=${NETNS_PEERCALL_BIN:-${CARGO_TARGET_DIR:-target}/debug/peercall}

NETNS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The "internet": one /24 from TEST-NET-3 (RFC 5737), bridged inside its own
# namespace. Documentation space never routes anywhere real, and unlike RFC 1918
# space a relay's "no private targets" rule does not reject it.
NETNS_PUBLIC_PREFIX=203.0.113
# Roles, in creation order. Public hosts first, then NAT routers with their desktops.
NETNS_SN1=$NETNS_PUBLIC_PREFIX.11
NETNS_SN2=$NETNS_PUBLIC_PREFIX.12
NETNS_STUN1=$NETNS_PUBLIC_PREFIX.21
NETNS_STUN2=$NETNS_PUBLIC_PREFIX.22

# Roles created by netns_up, "role address" per public host; NAT routers are listed
# separately because they carry a type and a LAN.
declare -gA NETNS_ADDR=()

netns_log() { echo "netns[$NETNS_RUN]: $*" >&2; }
netns_die() {
    netns_log "error: $*"
    return 1
}

# netns_ns ROLE: the namespace name of ROLE in this run.
netns_ns() { echo "$NETNS_RUN-$1"; }

# netns_exec ROLE CMD...: runs CMD inside ROLE's namespace.
netns_exec() {
    local role=$1
    shift
    ip netns exec "$(netns_ns "$role")" "$@"
}

# netns_addr ROLE: ROLE's own IPv4 address (a public host's public address, a NAT
# router's WAN address, a desktop's private address).
netns_addr() {
    [ -n "${NETNS_ADDR[$1]:-}" ] || netns_die "unknown role '$1'" || return 1
    echo "${NETNS_ADDR[$1]}"
}

# netns_check_run: fails unless NETNS_RUN is a safe prefix.
netns_check_run() {
    [[ $NETNS_RUN =~ ^[a-z0-9]{1,12}$ ]] ||
        netns_die "NETNS_RUN '$NETNS_RUN' must be 1 to 12 lowercase letters or digits"
}

# netns_new ROLE: creates ROLE's namespace with loopback up, IPv6 off (no router
# solicitations or DAD noise) and forwarding off.
netns_new() {
    local ns
    ns=$(netns_ns "$1")
    ip netns add "$ns" || return 1
    ip -n "$ns" link set dev lo up || return 1
    ip netns exec "$ns" sysctl -qw \
        net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 || return 1
}

# netns_add_public ROLE ADDR...: a host on the internet bridge with the given public
# addresses (first one primary). Interface "wan" in the host, ROLE on the bridge.
netns_add_public() {
    local role=$1
    shift
    [ ${#role} -le 15 ] || netns_die "role '$role' longer than an interface name" || return 1
    local ns inet addr
    ns=$(netns_ns "$role")
    inet=$(netns_ns inet)
    [ -e "/run/netns/$ns" ] || netns_new "$role" || return 1
    ip -n "$inet" link add name "$role" type veth peer name wan netns "$ns" || return 1
    ip -n "$inet" link set dev "$role" master br0 up || return 1
    for addr in "$@"; do
        ip -n "$ns" addr add "$addr/24" dev wan || return 1
    done
    ip -n "$ns" link set dev wan up || return 1
    NETNS_ADDR[$role]=$1
}

# netns_add_nat NAT DESKTOP WAN_ADDR LAN_PREFIX TYPE: a NAT router NAT with public
# address WAN_ADDR and a LAN LAN_PREFIX.0/24 (a bridge "lan" in the router, which
# is .1), and a desktop host DESKTOP at LAN_PREFIX.2 behind it (more with
# netns_add_lan_host). TYPE is one of
#   port-restricted  MASQUERADE: endpoint-independent mapping (conntrack keeps the
#                    source port when that tuple is free), address-and-port-dependent
#                    filtering (only replies matching a conntrack entry come in)
#   symmetric        MASQUERADE --random-fully: a fresh random port per destination
#                    (address-and-port-dependent mapping), same filtering
# The conntrack UDP timeouts of the router are set to NETNS_UDP_TIMEOUT, and new UDP
# flows addressed to the router itself from the internet are dropped.
netns_add_nat() {
    local nat=$1 desktop=$2 wan=$3 lan=$4 type=$5 random=()
    case $type in
        port-restricted) ;;
        symmetric) random=(--random-fully) ;;
        *) netns_die "NAT type '$type': expected port-restricted or symmetric" || return 1 ;;
    esac
    netns_add_public "$nat" "$wan" || return 1
    local nns
    nns=$(netns_ns "$nat")
    ip -n "$nns" link add name lan type bridge || return 1
    ip -n "$nns" addr add "$lan.1/24" dev lan || return 1
    ip -n "$nns" link set dev lan up || return 1
    ip netns exec "$nns" sysctl -qw net.ipv4.ip_forward=1 || return 1
    ip netns exec "$nns" iptables -w 5 -t nat -A POSTROUTING -o wan -j MASQUERADE "${random[@]}" ||
        return 1
    # Conntrack's per-namespace sysctls exist once the NAT rule loaded conntrack.
    ip netns exec "$nns" sysctl -qw \
        "net.netfilter.nf_conntrack_udp_timeout=$NETNS_UDP_TIMEOUT" \
        "net.netfilter.nf_conntrack_udp_timeout_stream=$NETNS_UDP_TIMEOUT" || return 1
    # Unsolicited UDP to the router's public address is dropped before conntrack
    # confirms it. Without this, a hole-punching datagram that reaches the router
    # before its desktop's own first one leaves an entry (peer -> router:port) that
    # takes the desktop's mapping tuple, so MASQUERADE maps the desktop to another
    # port, which the peer's NAT filters: simultaneous punching would then fail by
    # a Linux artefact, where a real port-restricted NAT simply discards such
    # datagrams without keeping state (see README.md).
    ip netns exec "$nns" iptables -w 5 -A INPUT -i wan -p udp -m conntrack --ctstate NEW -j DROP ||
        return 1
    NETNS_ADDR[$nat]=$wan
    NETNS_ADDR[${nat}_lan]=$lan
    NETNS_ADDR[${nat}_type]=$type
    netns_add_lan_host "$nat" "$desktop" 2
}

# netns_add_lan_host NAT ROLE N: a host ROLE at <NAT's LAN prefix>.N behind NAT
# (N from 2 to 254), with its default route through NAT. Hosts behind one NAT reach
# each other directly on its LAN bridge.
netns_add_lan_host() {
    local nat=$1 role=$2 n=$3 lan nns hns
    lan=$(netns_addr "${nat}_lan") || return 1
    [ ${#role} -le 15 ] || netns_die "role '$role' longer than an interface name" || return 1
    nns=$(netns_ns "$nat")
    hns=$(netns_ns "$role")
    netns_new "$role" || return 1
    ip -n "$nns" link add name "$role" type veth peer name lan netns "$hns" || return 1
    ip -n "$nns" link set dev "$role" master lan up || return 1
    ip -n "$hns" addr add "$lan.$n/24" dev lan || return 1
    ip -n "$hns" link set dev lan up || return 1
    ip -n "$hns" route add default via "$lan.1" || return 1
    NETNS_ADDR[$role]=$lan.$n
    NETNS_ADDR[${role}_lan_gw]=$lan.1
    NETNS_ADDR[${role}_public]=$(netns_addr "$nat")
    NETNS_ADDR[${role}_nat]=$nat
}

# netns_public_addr DESKTOP: the public (NAT WAN) address DESKTOP appears from.
netns_public_addr() { netns_addr "${1}_public"; }
# netns_nat_of DESKTOP: the role of the NAT router in front of DESKTOP.
netns_nat_of() { netns_addr "${1}_nat"; }

# netns_up: builds the standard topology (see README.md): the internet bridge, seed
# supernode hosts sn1 and sn2, a two-address probe host "stun", desktop a behind
# port-restricted NAT nata, desktop b behind symmetric NAT natb, desktop c behind
# port-restricted NAT natc. Fails (after removing what it built) if anything fails.
netns_up() {
    netns_check_run || return 1
    command -v ip >/dev/null && command -v iptables >/dev/null ||
        netns_die "needs iproute2 and iptables" || return 1
    if ip netns list | awk '{print $1}' | grep -q "^$NETNS_RUN-"; then
        netns_die "namespaces of run '$NETNS_RUN' exist already (netns_down first)"
        return 1
    fi
    mkdir -p "$NETNS_STATE" && chmod 700 "$NETNS_STATE" || return 1
    [ -z "${NETNS_OWNER:-}" ] || echo "$NETNS_OWNER" >"$NETNS_STATE/owner"
    if ! netns_build; then
        netns_log "topology failed; removing it"
        netns_down
        return 1
    fi
    netns_save_addrs
    netns_log "topology up: $(netns_list | tr '\n' ' ')"
}

netns_build() {
    netns_new inet || return 1
    ip -n "$(netns_ns inet)" link add name br0 type bridge || return 1
    ip -n "$(netns_ns inet)" link set dev br0 up || return 1
    netns_add_public sn1 "$NETNS_SN1" || return 1
    netns_add_public sn2 "$NETNS_SN2" || return 1
    netns_add_public stun "$NETNS_STUN1" "$NETNS_STUN2" || return 1
    netns_add_nat nata a "$NETNS_PUBLIC_PREFIX.101" 10.0.1 port-restricted || return 1
    netns_add_nat natb b "$NETNS_PUBLIC_PREFIX.102" 10.0.2 symmetric || return 1
    netns_add_nat natc c "$NETNS_PUBLIC_PREFIX.103" 10.0.3 port-restricted || return 1
}

# The address table survives in the state directory, so another shell (or
# topology.sh status) can source lib.sh and call netns_load for an existing run.
netns_save_addrs() {
    local k
    for k in "${!NETNS_ADDR[@]}"; do
        echo "$k ${NETNS_ADDR[$k]}"
    done | sort >"$NETNS_STATE/addrs"
}

# netns_load: reads the address table of an existing run (NETNS_RUN, NETNS_STATE).
netns_load() {
    local k v
    [ -f "$NETNS_STATE/addrs" ] || netns_die "no topology state in $NETNS_STATE" || return 1
    while read -r k v; do NETNS_ADDR[$k]=$v; done <"$NETNS_STATE/addrs"
}

# netns_list: the namespaces of this run, one a line.
netns_list() { ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NETNS_RUN-" || true; }

# netns_down: stops every process in this run's namespaces (SIGTERM, SIGKILL after
# 3 s), deletes the namespaces (and with them every veth, bridge and rule) and the
# state directory. Idempotent; safe after a partial netns_up; never fails.
netns_down() {
    netns_check_run || return 0
    local ns pids=() pid deadline
    for ns in $(netns_list); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do pids+=("$pid"); done
    done
    if [ ${#pids[@]} -gt 0 ]; then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        deadline=$((SECONDS + 3))
        while [ $SECONDS -lt $deadline ]; do
            local alive=0
            for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
            [ $alive = 0 ] && break
            sleep 0.1
        done
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    for ns in $(netns_list); do
        ip netns del "$ns" 2>/dev/null || netns_log "warning: could not delete namespace $ns"
    done
    case $NETNS_STATE in
        */peercall-netns-*) rm -rf "$NETNS_STATE" ;;
    esac
    return 0
}

# netns_gc: removes every run (in the default state location) whose owner process
# is gone: what a test killed with SIGKILL leaves behind. A run records its owner
# when NETNS_OWNER (a pid) is set at netns_up; runs without one are never touched.
netns_gc() {
    local dir owner
    for dir in "${TMPDIR:-/tmp}"/peercall-netns-*; do
        [ -f "$dir/owner" ] || continue
        owner=$(cat "$dir/owner")
        [[ $owner =~ ^[0-9]+$ ]] || continue
        kill -0 "$owner" 2>/dev/null && continue
        netns_log "removing run ${dir##*/peercall-netns-}: its owner $owner is gone"
        (NETNS_RUN=${dir##*/peercall-netns-} NETNS_STATE=$dir netns_down)
    done
    return 0
}

# netns_wait DESC SECONDS CMD...: runs CMD every 0.2 s until it succeeds; fails with
# DESC after SECONDS.
netns_wait() {
    local desc=$1 secs=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            netns_log "timed out after ${secs}s waiting for: $desc"
            return 1
        fi
        sleep 0.2
    done
}

# netns_bg ROLE LOGFILE CMD...: starts CMD in ROLE's namespace in the background, in
# its own session, bounded by NETNS_MAX_LIFETIME; prints its pid.
netns_bg() {
    local role=$1 log=$2
    shift 2
    setsid ip netns exec "$(netns_ns "$role")" \
        timeout --kill-after=5 "$NETNS_MAX_LIFETIME" "$@" </dev/null >"$log" 2>&1 &
    echo $!
}

# ---------------------------------------------------------------- test scripts
# The common frame of the scripts in scripts/it that use this topology: source this
# file with NETNS_RUN set (from the repository root), then
#   netns_script_begin NAME PACKAGE...   skips without root or namespaces, installs
#   netns_script_binary                  finds or builds peercall (NETNS_PEERCALL_BIN)
#   netns_script_guard SECS LOG_GLOB...  cleanup on every exit, watchdog after SECS
#   netns_script_up                      removes dead runs, builds the topology

# netns_script_begin NAME PACKAGE...: names the script in messages (NETNS_SCRIPT),
# skips it (exit 0, with the reason) unless it runs as root with network namespace
# support, and installs the Debian packages it needs (skips if that fails).
netns_script_begin() {
    NETNS_SCRIPT=$1
    shift
    [ "$(id -u)" -eq 0 ] || netns_skip "needs root (network namespaces, iptables); run as root to include it"
    # shellcheck source-path=SCRIPTDIR source=../setup.sh
    . "$NETNS_DIR/../setup.sh"
    peercall_apt_install "$@" || netns_skip "cannot install $*"
    ip netns add "$NETNS_RUN-probe" 2>/dev/null || netns_skip "ip netns unavailable (no network namespace support)"
    ip netns del "$NETNS_RUN-probe"
}

# netns_skip REASON: ends the script as skipped (exit 0).
netns_skip() {
    echo "${NETNS_SCRIPT:-netns}: SKIPPED: $*" >&2
    exit 0
}

# netns_fail REASON: ends the script as failed (exit 1; the guard cleans up).
netns_fail() {
    echo "${NETNS_SCRIPT:-netns}: FAIL: $*" >&2
    exit 1
}

# netns_script_binary: the peercall binary the nodes run, in NETNS_PEERCALL_BIN:
# PEERCALL_BIN if set; else this checkout's debug build with the features the test
# suite builds (built here: a no-op after `cargo test`, and the same features, so
# nothing is rebuilt); without cargo, a build found in the cache.
netns_script_binary() {
    local bin target
    if [ -n "${PEERCALL_BIN:-}" ]; then
        bin=$PEERCALL_BIN
    elif peercall_setup; then
        cargo build -q -p peercall --features webrtc || netns_fail "cargo build -p peercall"
        bin=$CARGO_TARGET_DIR/debug/peercall
    else
        target=${CARGO_TARGET_DIR:-$HOME/.cache/peercall-target}
        bin=$target/debug/peercall
        [ -x "$bin" ] || bin=$target/release/peercall
    fi
    [ -x "$bin" ] || netns_fail "no peercall binary (set PEERCALL_BIN or install cargo)"
    export NETNS_PEERCALL_BIN=$bin
}

# netns_script_guard SECS LOG_GLOB...: from here on every exit (success, failure,
# INT, TERM, HUP) removes the run (netns_down); a failure first prints the last
# lines of the logs matching LOG_GLOB (relative to NETNS_STATE). A watchdog ends
# the script (as a failure) after SECS; it wakes every second, so it ends within a
# second of the script, holds no output open, and quits if the script died
# (reparented: it never signals a pid that may have been reused). Processes
# started in the run live at most SECS too (NETNS_MAX_LIFETIME).
netns_script_guard() {
    local secs=$1
    shift
    NETNS_FAIL_LOGS=("$@")
    export NETNS_MAX_LIFETIME=$secs
    NETNS_WATCHDOG=""
    trap netns_script_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    (
        trap 'exit 0' TERM
        me=$BASHPID
        for ((i = 0; i < secs; i++)); do
            sleep 1 >/dev/null 2>&1
            [ "$(ps -o ppid= -p "$me" | tr -d ' ')" = $$ ] || exit 0
        done
        echo "${NETNS_SCRIPT:-netns}: FAIL: watchdog: over ${secs}s" >&2
        kill -TERM $$
    ) &
    NETNS_WATCHDOG=$!
}

# The EXIT trap of netns_script_guard.
netns_script_cleanup() {
    local status=$? glob log
    trap - EXIT INT TERM HUP
    [ -z "${NETNS_WATCHDOG:-}" ] || kill "$NETNS_WATCHDOG" 2>/dev/null || true
    if [ $status -ne 0 ] && [ -d "$NETNS_STATE" ]; then
        for glob in "${NETNS_FAIL_LOGS[@]}"; do
            for log in "$NETNS_STATE"/$glob; do
                [ -f "$log" ] || continue
                echo "---- ${log#"$NETNS_STATE"/} (last lines)" >&2
                tail -n 12 "$log" >&2
            done
        done
    fi
    netns_down
    exit $status
}

# netns_script_up: removes runs whose owner died, then builds the topology owned by
# this script (netns_up); fails the script if that fails.
netns_script_up() {
    netns_gc
    export NETNS_OWNER=$$
    netns_up || netns_fail "topology"
}

# ---------------------------------------------------------------- peercall nodes

# netns_node_start NAME ROLE [TOML_LINE...]: starts `peercall node` NAME in ROLE's
# namespace, with data directory $NETNS_STATE/nodes/NAME, admin API on the
# namespace's loopback, and a config file made of the given TOML lines (for example
# 'role = "supernode"' 'keepalive_secs = 2' "seeds = [\"$(netns_node_seed sn1)\"]").
# Unless a line sets it, listen = "0.0.0.0:$NETNS_NODE_PORT". Waits (20 s at most)
# until the node is ready (admin.addr written); fails with the end of its log.
netns_node_start() {
    local name=$1 role=$2
    shift 2
    local dir=$NETNS_STATE/nodes/$name line
    mkdir -p "$dir" && chmod 700 "$dir" || return 1
    [ -x "$NETNS_PEERCALL_BIN" ] || netns_die "no peercall binary at $NETNS_PEERCALL_BIN" || return 1
    {
        echo "# netns node $name in $(netns_ns "$role")"
        printf '%s\n' "$@" | grep -q '^[[:space:]]*listen[[:space:]]*=' ||
            echo "listen = \"0.0.0.0:$NETNS_NODE_PORT\""
        for line in "$@"; do echo "$line"; done
    } >"$dir/node.toml"
    echo "$role" >"$dir/role"
    # Nothing inherited configures the node: only its config file does.
    local unset=() var
    for var in $(compgen -e); do
        if [[ $var == PEERCALL_* ]]; then unset+=(-u "$var"); fi
    done
    netns_bg "$role" "$dir/node.log" env "${unset[@]}" \
        "$NETNS_PEERCALL_BIN" node --config "$dir/node.toml" --data-dir "$dir/data" \
        --admin 127.0.0.1:0 >"$dir/pid"
    local pid deadline=$((SECONDS + 20))
    pid=$(cat "$dir/pid")
    until [ -s "$dir/data/admin.addr" ]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            netns_log "node $name exited during start-up; its log ends:"
            tail -n 20 "$dir/node.log" >&2
            return 1
        fi
        if [ $SECONDS -ge $deadline ]; then
            netns_log "node $name not ready after 20 s; its log ends:"
            tail -n 20 "$dir/node.log" >&2
            return 1
        fi
        sleep 0.1
    done
}

# netns_node_dir NAME: the node's state directory (node.toml, node.log, data/).
netns_node_dir() { echo "$NETNS_STATE/nodes/$1"; }

# netns_node_role NAME: the namespace role the node runs in.
netns_node_role() { cat "$NETNS_STATE/nodes/$1/role"; }

# netns_node_get NAME PATH: GET PATH from the node's admin API (inside its
# namespace); prints the body, fails on an HTTP error.
netns_node_get() {
    local dir=$NETNS_STATE/nodes/$1
    netns_exec "$(cat "$dir/role")" curl -sf --max-time 5 "http://$(cat "$dir/data/admin.addr")$2"
}

# netns_node_post NAME PATH [JSON]: POST to the node's admin API with its token.
netns_node_post() {
    local dir=$NETNS_STATE/nodes/$1
    netns_exec "$(cat "$dir/role")" curl -sf --max-time 5 -X POST \
        -H "Authorization: Bearer $(cat "$dir/data/admin.token")" \
        -H 'Content-Type: application/json' -d "${3:-}" \
        "http://$(cat "$dir/data/admin.addr")$2"
}

# netns_node_status NAME: the node's /status JSON.
netns_node_status() { netns_node_get "$1" /status; }
# netns_node_metrics NAME: the node's /metrics text.
netns_node_metrics() { netns_node_get "$1" /metrics; }

# netns_node_metric NAME SERIES: the value of one series of /metrics, written as it
# appears there (e.g. 'peercall_dropped_datagrams_total{reason="unknown_protocol"}').
netns_node_metric() {
    netns_node_metrics "$1" | awk -v s="$2" '$1 == s { print $2; found = 1 } END { exit !found }'
}

# netns_json EXPR: evaluates the Python expression EXPR over the JSON document on
# stdin, bound to `d`; prints strings bare and everything else as JSON.
netns_json() {
    "$NETNS_PYTHON" -c '
import json, sys
d = json.load(sys.stdin)
v = eval(sys.argv[1], {"d": d})
print(v if isinstance(v, str) else json.dumps(v))' "$1"
}

# netns_node_key NAME: the node's Noise static key (from /status; cached, as it
# never changes while the data directory lives).
netns_node_key() {
    local cache=$NETNS_STATE/nodes/$1/key
    if [ ! -s "$cache" ]; then
        netns_node_status "$1" | netns_json 'd["peer_key"]' >"$cache.tmp" && mv "$cache.tmp" "$cache" ||
            return 1
    fi
    cat "$cache"
}

# netns_node_seed NAME: "PEERKEY@ADDR:PORT" for seeding other nodes with NAME, ADDR
# being the address of its namespace role.
netns_node_seed() {
    local role port key
    role=$(netns_node_role "$1")
    port=$(cat "$NETNS_STATE/nodes/$1/data/udp.addr") || return 1
    key=$(netns_node_key "$1") || return 1
    echo "$key@$(netns_addr "$role"):${port##*:}"
}

# netns_node_sessions NAME: the node's established sessions, one a line:
# PEER_KEY ADDR ESTABLISHED_AGE_S LAST_RECEIVED_AGE_S.
netns_node_sessions() {
    netns_node_status "$1" | "$NETNS_PYTHON" -c '
import json, sys
for s in json.load(sys.stdin)["sessions"]:
    print(s["peer"], s["addr"], s["established_age_s"], s["last_received_age_s"])'
}

# netns_node_session NAME PEER_NAME: the address NAME sees PEER_NAME at, if they
# have an established session; fails otherwise.
netns_node_session() { netns_node_session_field "$1" "$2" addr; }

# netns_node_session_field NAME PEER_NAME FIELD: one field of that session
# (addr, established_age_s, last_received_age_s); fails if there is no session.
netns_node_session_field() {
    local key col
    case $3 in
        addr) col=2 ;;
        established_age_s) col=3 ;;
        last_received_age_s) col=4 ;;
        *) netns_die "unknown session field '$3'" || return 1 ;;
    esac
    key=$(netns_node_key "$2") || return 1
    netns_node_sessions "$1" | awk -v k="$key" -v c="$col" '$1 == k { print $c; found = 1 } END { exit !found }'
}

# netns_node_has_sessions NAME PEER_NAME...: succeeds if NAME has an established
# session with every PEER_NAME (one /status read).
netns_node_has_sessions() {
    local name=$1 sessions peer key
    shift
    sessions=$(netns_node_sessions "$name") || return 1
    for peer in "$@"; do
        key=$(netns_node_key "$peer") || return 1
        grep -q "^$key " <<<"$sessions" || return 1
    done
}

# netns_node_stop NAME: graceful shutdown through the admin API (peers are told),
# SIGTERM after 5 s, SIGKILL after 5 more.
netns_node_stop() {
    local dir=$NETNS_STATE/nodes/$1 pid
    pid=$(cat "$dir/pid" 2>/dev/null) || return 0
    netns_node_post "$1" /v1/shutdown >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    netns_wait "node $1 to exit" 5 netns_not_running "$pid" ||
        kill -TERM "$pid" 2>/dev/null || true
    netns_wait "node $1 to exit" 5 netns_not_running "$pid" ||
        kill -KILL "$pid" 2>/dev/null || true
    rm -f "$dir/pid"
}

netns_not_running() { ! kill -0 "$1" 2>/dev/null; }

# ---------------------------------------------------------------- path impairment
# Kernel rules in a router or host namespace. A and B are addresses or CIDRs; the
# rules match both directions in FORWARD (routed traffic; in a NAT router, LAN-side
# addresses are the private ones), INPUT and OUTPUT (the namespace's own traffic),
# and carry a comment so they can be removed exactly.

netns_rules() { # ROLE ACTION(-I|-D) TAG A B TARGET...
    local role=$1 action=$2 tag=$3 a=$4 b=$5 chain
    shift 5
    for chain in FORWARD INPUT OUTPUT; do
        netns_exec "$role" iptables -w 5 "$action" "$chain" -s "$a" -d "$b" \
            -m comment --comment "$tag" "$@" || return 1
        netns_exec "$role" iptables -w 5 "$action" "$chain" -s "$b" -d "$a" \
            -m comment --comment "$tag" "$@" || return 1
    done
}

netns_rules_clear() { # ROLE TAG A B TARGET...: removes every copy of those rules
    local role=$1 tag=$2 a=$3 b=$4 chain
    shift 4
    for chain in FORWARD INPUT OUTPUT; do
        while netns_exec "$role" iptables -w 5 -D "$chain" -s "$a" -d "$b" \
            -m comment --comment "$tag" "$@" 2>/dev/null; do :; done
        while netns_exec "$role" iptables -w 5 -D "$chain" -s "$b" -d "$a" \
            -m comment --comment "$tag" "$@" 2>/dev/null; do :; done
    done
}

# netns_cut ROLE A B: drops every packet between A and B passing through (or to, or
# from) ROLE's namespace, until netns_heal. A hard path cut.
netns_cut() { netns_rules "$1" -I "netns-cut" "$2" "$3" -j DROP; }

# netns_heal ROLE A B: removes the cut between A and B in ROLE.
netns_heal() { netns_rules_clear "$1" "netns-cut" "$2" "$3" -j DROP; }

# netns_loss ROLE A B P: drops each packet between A and B independently with
# probability P (0 < P < 1) in ROLE, in each direction (iptables statistic match);
# replaces an earlier loss rule for the pair. P = 0 removes it.
netns_loss() {
    local role=$1 a=$2 b=$3 p=$4
    "$NETNS_PYTHON" -c 'import sys; sys.exit(not 0 <= float(sys.argv[1]) < 1)' "$p" 2>/dev/null ||
        netns_die "loss probability '$p' must be a number in [0, 1)" || return 1
    # The probability in force is remembered, to delete exactly that rule.
    local dir=$NETNS_STATE/loss
    local file=$dir/$role-${a//\//_}-${b//\//_}
    mkdir -p "$dir"
    if [ -f "$file" ]; then
        netns_rules_clear "$role" netns-loss "$a" "$b" \
            -m statistic --mode random --probability "$(cat "$file")" -j DROP
        rm -f "$file"
    fi
    "$NETNS_PYTHON" -c 'import sys; sys.exit(float(sys.argv[1]) == 0)' "$p" || return 0
    netns_rules "$role" -I netns-loss "$a" "$b" \
        -m statistic --mode random --probability "$p" -j DROP && echo "$p" >"$file"
}

# ---------------------------------------------------------------- user-space relay
# impair.py forwards UDP between a listening address and one target with delay,
# jitter, random loss and a cut toggle, driven by a control file (see impair.py).

# netns_impair_start NAME ROLE LISTEN TARGET [IMPAIR_OPTION...]: starts relay NAME in
# ROLE's namespace, forwarding datagrams sent to LISTEN (IP:PORT) to TARGET and the
# replies back. Control file $NETNS_STATE/impair/NAME.ctl, stats NAME.json (JSON,
# rewritten every 0.5 s). Waits until it is listening.
netns_impair_start() {
    local name=$1 role=$2 listen=$3 target=$4
    shift 4
    local dir=$NETNS_STATE/impair
    mkdir -p "$dir"
    : >"$dir/$name.ctl"
    netns_bg "$role" "$dir/$name.log" "$NETNS_PYTHON" "$NETNS_DIR/impair.py" \
        --listen "$listen" --target "$target" --control "$dir/$name.ctl" \
        --stats "$dir/$name.json" --max-seconds "$NETNS_MAX_LIFETIME" "$@" >"$dir/$name.pid"
    if ! netns_wait "relay $name listening" 10 test -s "$dir/$name.json"; then
        cat "$dir/$name.log" >&2
        return 1
    fi
}

# netns_impair_set NAME KEY=VALUE...: changes a running relay's settings (delay_ms,
# jitter_ms, loss, cut=1|0); the relay applies them within 0.1 s.
netns_impair_set() {
    local ctl=$NETNS_STATE/impair/$1.ctl
    shift
    local tmp=$ctl.tmp
    { cat "$ctl"; printf '%s\n' "$@"; } >"$tmp" && mv "$tmp" "$ctl"
}

# netns_impair_stats NAME: the relay's counters as JSON.
netns_impair_stats() { cat "$NETNS_STATE/impair/$1.json"; }

# netns_impair_stop NAME: stops the relay.
netns_impair_stop() {
    local pid
    pid=$(cat "$NETNS_STATE/impair/$1.pid" 2>/dev/null) || return 0
    kill -TERM "$pid" 2>/dev/null || true
    netns_wait "relay $1 to exit" 5 netns_not_running "$pid" || kill -KILL "$pid" 2>/dev/null || true
    rm -f "$NETNS_STATE/impair/$1.pid"
}

# netns_impair_divert DESKTOP TARGET_ADDR TARGET_PORT LOCAL_PORT: in the NAT router in
# front of DESKTOP, redirects DESKTOP's UDP to TARGET_ADDR:TARGET_PORT to a relay
# listening on LOCAL_PORT in the router (start it with netns_impair_start NAME
# <nat role> 0.0.0.0:LOCAL_PORT TARGET_ADDR:TARGET_PORT). Transparent: the desktop
# still talks to the target's address, and replies come back from it. Must be set
# before the desktop's first packet to the target (NAT rules apply to new flows).
netns_impair_divert() {
    local desktop=$1 addr=$2 port=$3 local_port=$4 nat
    nat=$(netns_nat_of "$desktop") || return 1
    netns_exec "$nat" iptables -w 5 -t nat -I PREROUTING -i lan -p udp \
        -s "$(netns_addr "$desktop")" -d "$addr" --dport "$port" \
        -j REDIRECT --to-ports "$local_port"
}
