#!/usr/bin/env python3
"""Small UDP probes that measure what a NAT does, in the terms of RFC 4787.

A probe server on a public host with two addresses and two ports (as an RFC 5780
STUN server has) tells a client the address its request came from, and on request
answers from another address or port, or later. A client behind the NAT then
classifies the mapping (does the public address:port depend on the destination?)
and the filtering (which outside sources may send to a mapping?).

    natprobe.py server   --addr IP1 --addr IP2 --port P1 --port P2 [--max-seconds S]
    natprobe.py classify --server IP1 --alt-server IP2 --port P1 --alt-port P2
    natprobe.py expiry   --server IP1 --port P1 --after SECS
    natprobe.py send     --to IP:PORT [--bind IP:PORT] [--payload TEXT]
    natprobe.py echo     --bind IP:PORT [--max-seconds S]
    natprobe.py rtt      --to IP:PORT [--count N] [--interval-ms MS]

Every client command prints one JSON object on stdout and is bounded in time.
Python 3 standard library only.
"""

import argparse
import json
import select
import socket
import struct
import sys
import time

# How long a client waits for one answer. The test networks are local: an answer
# comes within milliseconds, or was filtered.
ANSWER_WAIT_SECS = 1.0
# Attempts per request before concluding it is filtered (guards against a lost
# datagram on a busy machine; the paths themselves do not lose packets).
ATTEMPTS = 3
# After the acknowledgement of a "from" request, how long an answer from the other
# source may still arrive (it was sent first, on an equally short path).
STRAGGLER_SECS = 0.3
# Answers the server holds for "later" requests at once; more are refused, so a
# flood of requests cannot grow the server without bound.
MAX_PENDING = 1000
# Largest datagram read.
MAX_DATAGRAM = 65535
# Warm-up exchanges before an expiry probe, spaced so that conntrack sees a UDP
# stream (traffic both ways for more than 2 s) and applies its stream timeout.
WARMUP_EXCHANGES = 3
WARMUP_GAP_SECS = 1.5


def addr_text(a):
    return f"{a[0]}:{a[1]}"


def parse_addr(text):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"'{text}': expected IP:PORT")
    return host, int(port)


def send_quietly(sock, data, dst):
    """Sends, ignoring errors: a drop rule in the sender's own namespace makes
    sendto fail with EPERM, and an ICMP error may surface on a later send; both mean
    a lost datagram, which is what the probes measure."""
    try:
        sock.sendto(data, dst)
    except OSError:
        pass


def udp(bind=("0.0.0.0", 0)):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(bind)
    return s


def recv_json(sock, wait, want_id):
    """The first JSON answer with id `want_id` within `wait` s, with its source."""
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return None, None
        data, src = sock.recvfrom(MAX_DATAGRAM)
        try:
            msg = json.loads(data)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("id") == want_id:
            return msg, src


class Client:
    def __init__(self):
        self.next_id = 0

    def ask(self, sock, server, request, wait=ANSWER_WAIT_SECS, attempts=ATTEMPTS):
        """Sends `request` to `server`; the answer and its source, or (None, None)."""
        for _ in range(attempts):
            self.next_id += 1
            request["id"] = self.next_id
            send_quietly(sock, json.dumps(request).encode(), server)
            msg, src = recv_json(sock, wait, self.next_id)
            if msg is not None:
                return msg, src
        return None, None


# ---------------------------------------------------------------- server


def cmd_server(args):
    socks = {}
    for ip in args.addr:
        for port in args.port:
            s = udp((ip, port))
            socks[(ip, port)] = s
    pending = []  # (due, socket, destination, payload)
    end = time.monotonic() + args.max_seconds
    print(json.dumps({"listening": [addr_text(a) for a in socks]}), flush=True)
    while True:
        now = time.monotonic()
        for item in [p for p in pending if p[0] <= now]:
            pending.remove(item)
            send_quietly(item[1], item[3], item[2])
        if now >= end:
            return 0
        wake = min([end] + [p[0] for p in pending])
        ready, _, _ = select.select(list(socks.values()), [], [], max(0.0, wake - now))
        for s in ready:
            data, src = s.recvfrom(MAX_DATAGRAM)
            try:
                serve_one(s, socks, pending, data, src, args.max_seconds)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # not a well-formed probe: ignored


def serve_one(s, socks, pending, data, src, max_seconds):
    """Answers one probe request; raises on a malformed one."""
    req = json.loads(data)
    op, rid = req["op"], req["id"]
    answer = {"id": rid, "seen": addr_text(src), "via": addr_text(s.getsockname())}
    if op == "map":
        send_quietly(s, json.dumps(answer).encode(), src)
    elif op == "from":
        other = socks.get((str(req.get("ip")), int(req.get("port", -1))))
        if other is not None:
            send_quietly(other, json.dumps(dict(
                answer, via=addr_text(other.getsockname()), kind="from")).encode(), src)
        # Then an acknowledgement on the request's own path, which the NAT lets
        # through: it proves the request arrived.
        send_quietly(s, json.dumps(dict(answer, kind="ack")).encode(), src)
    elif op == "later":
        secs = float(req.get("secs", 0))
        if not 0 <= secs <= max_seconds or len(pending) >= MAX_PENDING:
            raise ValueError("delay out of range, or too many held answers")
        pending.append((time.monotonic() + secs, s, src, json.dumps(answer).encode()))


# ---------------------------------------------------------------- clients


def cmd_classify(args):
    c = Client()
    p1 = (args.server, args.port)
    p2 = (args.server, args.alt_port)
    p3 = (args.alt_server, args.port)
    out = {"servers": [addr_text(p1), addr_text(p2), addr_text(p3)]}

    # Mapping: one socket, three destinations; compare the addresses they saw.
    s = udp()
    out["local_port"] = s.getsockname()[1]
    # The local address the kernel picks towards the server (connect() only routes).
    probe = udp()
    probe.connect(p1)
    local_ip = probe.getsockname()[0]
    probe.close()
    seen = {}
    for dst in (p1, p2, p3):
        msg, _ = c.ask(s, dst, {"op": "map"})
        if msg is None:
            out["error"] = f"no answer from {addr_text(dst)}: the path is broken"
            return out
        seen[addr_text(dst)] = msg["seen"]
    s.close()
    m1, m2, m3 = (seen[addr_text(d)] for d in (p1, p2, p3))
    out["mapped"] = seen
    out["public_ip"] = m1.rsplit(":", 1)[0]
    out["behind_nat"] = out["public_ip"] != local_ip
    out["port_preserved"] = int(m1.rsplit(":", 1)[1]) == out["local_port"]
    if m1 == m2 == m3:
        out["mapping"] = "endpoint-independent"
    elif m1 == m2:
        out["mapping"] = "address-dependent"
    else:
        out["mapping"] = "address-and-port-dependent"

    # Filtering: a fresh mapping (fresh socket) per test, opened towards p1 only;
    # then p1's server answers from a source the client never sent to.
    def reaches(via):
        fresh = udp()
        try:
            for _ in range(ATTEMPTS):
                c.next_id += 1
                req = {"op": "from", "ip": via[0], "port": via[1], "id": c.next_id}
                send_quietly(fresh, json.dumps(req).encode(), p1)
                got = set()
                deadline = time.monotonic() + ANSWER_WAIT_SECS
                while time.monotonic() < deadline:
                    msg, src = recv_json(fresh, deadline - time.monotonic(), c.next_id)
                    if msg is None:
                        break
                    got.add("from" if src == via and msg.get("kind") == "from" else "ack")
                    if "ack" in got:
                        # The answer from `via` was sent first: give it a moment more.
                        deadline = min(deadline, time.monotonic() + STRAGGLER_SECS)
                if "ack" in got:
                    return "from" in got
            raise OSError(f"no answer from {addr_text(p1)}: the path is broken")
        finally:
            fresh.close()

    other_ip = reaches((args.alt_server, args.alt_port))
    other_port = reaches(p2)
    out["unsolicited_from_other_ip_and_port"] = "delivered" if other_ip else "filtered"
    out["unsolicited_from_same_ip_other_port"] = "delivered" if other_port else "filtered"
    if other_ip:
        out["filtering"] = "endpoint-independent"
    elif other_port:
        out["filtering"] = "address-dependent"
    else:
        out["filtering"] = "address-and-port-dependent"
    if not out["behind_nat"]:
        out["nat_type"] = "none"
        return out
    out["nat_type"] = {
        ("endpoint-independent", "endpoint-independent"): "full cone",
        ("endpoint-independent", "address-dependent"): "address-restricted cone",
        ("endpoint-independent", "address-and-port-dependent"): "port-restricted cone",
    }.get((out["mapping"], out["filtering"]), "symmetric")
    return out


def cmd_expiry(args):
    """Does an answer sent `after` seconds of silence still pass the NAT?"""
    c = Client()
    server = (args.server, args.port)
    s = udp()
    for n in range(WARMUP_EXCHANGES):
        if n:
            time.sleep(WARMUP_GAP_SECS)
        if c.ask(s, server, {"op": "map"})[0] is None:
            return {"error": f"no answer from {addr_text(server)} during warm-up"}
    # One request; the server holds its answer for `after` s. The NAT saw nothing
    # else on this flow meanwhile.
    c.next_id += 1
    send_quietly(s, json.dumps({"op": "later", "secs": args.after, "id": c.next_id}).encode(),
                 server)
    msg, _ = recv_json(s, args.after + 2 * ANSWER_WAIT_SECS, c.next_id)
    return {"after_s": args.after, "answer": "delivered" if msg else "filtered"}


def cmd_send(args):
    s = udp(args.bind or ("0.0.0.0", 0))
    s.sendto(args.payload.encode(), args.to)
    return {"sent_from": addr_text(s.getsockname()), "to": addr_text(args.to)}


def cmd_echo(args):
    s = udp(args.bind)
    end = time.monotonic() + args.max_seconds
    print(json.dumps({"listening": addr_text(s.getsockname())}), flush=True)
    while (left := end - time.monotonic()) > 0:
        if select.select([s], [], [], left)[0]:
            data, src = s.recvfrom(MAX_DATAGRAM)
            send_quietly(s, data, src)
    return 0


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return round(sorted_values[i], 2)


def cmd_rtt(args):
    """Sends numbered datagrams to an echo server; loss and RTT percentiles."""
    s = udp()
    s.setblocking(False)
    sent_at = {}
    rtts = []
    start = time.monotonic()
    interval = args.interval_ms / 1000
    n = 0
    # Send on schedule while collecting echoes; then wait for stragglers.
    while True:
        now = time.monotonic()
        if n < args.count and now >= start + n * interval:
            # A local drop rule answers EPERM: the datagram counts as lost.
            send_quietly(s, struct.pack("!Id", n, now) + b"\0" * 152, args.to)
            sent_at[n] = now
            n += 1
            continue
        last = start + (args.count - 1) * interval + args.wait
        if n >= args.count and now >= last:
            break
        wake = start + n * interval if n < args.count else last
        if select.select([s], [], [], max(0.0, wake - now))[0]:
            while True:
                try:
                    data = s.recv(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                if len(data) >= 12:
                    seq, _ = struct.unpack("!Id", data[:12])
                    t0 = sent_at.pop(seq, None)
                    if t0 is not None:
                        rtts.append((time.monotonic() - t0) * 1000)
    rtts.sort()
    return {
        "sent": args.count, "received": len(rtts),
        "loss": round(1 - len(rtts) / args.count, 4),
        "rtt_ms": {q: percentile(rtts, v) for q, v in
                   (("min", 0), ("p10", 0.1), ("p50", 0.5), ("p90", 0.9), ("max", 1))},
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("server", help="probe server on every ADDR x PORT")
    sv.add_argument("--addr", action="append", required=True)
    sv.add_argument("--port", type=int, action="append", required=True)
    sv.add_argument("--max-seconds", type=float, default=600.0)
    cl = sub.add_parser("classify", help="mapping and filtering behaviour of the NAT in front")
    cl.add_argument("--server", required=True)
    cl.add_argument("--alt-server", required=True)
    cl.add_argument("--port", type=int, required=True)
    cl.add_argument("--alt-port", type=int, required=True)
    ex = sub.add_parser("expiry", help="does an answer after SECS of silence pass?")
    ex.add_argument("--server", required=True)
    ex.add_argument("--port", type=int, required=True)
    ex.add_argument("--after", type=float, required=True)
    se = sub.add_parser("send", help="send one datagram")
    se.add_argument("--to", type=parse_addr, required=True)
    se.add_argument("--bind", type=parse_addr)
    se.add_argument("--payload", default="natprobe unsolicited")
    ec = sub.add_parser("echo", help="echo every datagram back")
    ec.add_argument("--bind", type=parse_addr, required=True)
    ec.add_argument("--max-seconds", type=float, default=600.0)
    rt = sub.add_parser("rtt", help="loss and round-trip times to an echo server")
    rt.add_argument("--to", type=parse_addr, required=True)
    rt.add_argument("--count", type=int, default=200)
    rt.add_argument("--interval-ms", type=float, default=10.0)
    rt.add_argument("--wait", type=float, default=1.0, help="seconds to wait after the last send")
    args = p.parse_args()
    handler = {"server": cmd_server, "classify": cmd_classify, "expiry": cmd_expiry,
               "send": cmd_send, "echo": cmd_echo, "rtt": cmd_rtt}[args.cmd]
    try:
        out = handler(args)
    except OSError as e:
        sys.exit(f"natprobe {args.cmd}: {e}")
    if isinstance(out, dict):
        print(json.dumps(out))
        return 1 if "error" in out else 0
    return out


if __name__ == "__main__":
    sys.exit(main())
