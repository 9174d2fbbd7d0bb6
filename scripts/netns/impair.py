#!/usr/bin/env python3
"""User-space UDP impairment relay: netem for kernels without the netem qdisc.

Forwards datagrams sent to LISTEN on to TARGET, and TARGET's replies back, through
one upstream socket per client address (so each client gets its own flow, as through
a NAT). Each datagram, in either direction, is dropped at random with probability
`loss`, otherwise held for `delay_ms` plus a uniform jitter in [-jitter_ms,
+jitter_ms] (never below zero). Order within a direction of a client is kept unless
`reorder` is set (then jitter may reorder, as netem does). `cut` drops everything.

    impair.py --listen 0.0.0.0:7650 --target 203.0.113.12:7600 \\
              --delay-ms 20 --jitter-ms 5 --loss 0.05 --control relay.ctl --stats relay.json

Settings change at run time through the control file (checked every 0.1 s): lines
`key=value` with keys delay_ms, jitter_ms, loss, cut (0 or 1), reorder (0 or 1);
`#` starts a comment; a later line wins; a key missing from the file keeps its
command-line value. A bad file is reported on stderr and ignored (the settings in
force stay). SIGUSR1 toggles `cut`; SIGTERM and SIGINT stop the relay.

The stats file (JSON, replaced atomically every 0.5 s and at exit; written first once
the relay listens) counts per direction ("up": client to target, "down": back)
datagrams received, forwarded, lost (random loss), cut, overflow (queue full) and
send errors, plus the settings in force. The relay exits after --max-seconds.
Python 3 standard library only.
"""

import argparse
import heapq
import json
import os
import random
import selectors
import signal
import socket
import sys
import time

# Largest UDP payload; a bigger receive buffer is never needed.
MAX_DATAGRAM = 65535
# Distinct client addresses served at once; a flood of spoofed sources cannot make
# the relay open unbounded sockets. Further clients are counted as rejected.
MAX_CLIENTS = 256
# Datagrams held for delay at once (all clients); beyond it datagrams are dropped as
# overflow. 10,000 is 100 voice streams at 50 packets/s under a 2 s delay.
MAX_QUEUED = 10_000
# A client with no traffic either way for this long loses its upstream socket, as a
# NAT mapping would (a later datagram opens a new one).
CLIENT_IDLE_SECS = 300.0
# How often the control file is checked: changes apply within 0.1 s.
CONTROL_POLL_SECS = 0.1
# How often the stats file is rewritten.
STATS_EVERY_SECS = 0.5
# Datagrams read from one socket per wake-up, so one busy client cannot starve others.
READ_BURST = 64

SETTING_KEYS = ("delay_ms", "jitter_ms", "loss", "cut", "reorder")


def parse_addr(text):
    """'IP:PORT' or '[IPv6]:PORT' to (family, (host, port))."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"'{text}': expected IP:PORT")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, (host[1:-1], int(port))
    return socket.AF_INET, (host, int(port))


def check_settings(s):
    """Raises ValueError naming the bad key."""
    if not 0 <= s["delay_ms"] <= 60_000:
        raise ValueError(f"delay_ms {s['delay_ms']}: expected 0 to 60000")
    if not 0 <= s["jitter_ms"] <= 60_000:
        raise ValueError(f"jitter_ms {s['jitter_ms']}: expected 0 to 60000")
    if not 0 <= s["loss"] <= 1:
        raise ValueError(f"loss {s['loss']}: expected a probability from 0 to 1")
    return s


def parse_control(text, base):
    """Settings from control-file text over `base`; ValueError on a bad line."""
    s = dict(base)
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        if not sep or key not in SETTING_KEYS:
            raise ValueError(f"line {n} '{raw.strip()}': expected one of "
                             f"{', '.join(SETTING_KEYS)} = value")
        try:
            if key in ("cut", "reorder"):
                if value not in ("0", "1"):
                    raise ValueError
                s[key] = value == "1"
            else:
                s[key] = float(value)
        except ValueError:
            raise ValueError(f"line {n}: bad value '{value}' for {key}") from None
    return check_settings(s)


class Relay:
    def __init__(self, args):
        self.family, self.listen_addr = args.listen
        self.target_family, self.target = args.target
        self.base = check_settings({
            "delay_ms": args.delay_ms, "jitter_ms": args.jitter_ms, "loss": args.loss,
            "cut": args.cut, "reorder": args.reorder,
        })
        self.settings = dict(self.base)
        self.control = args.control
        self.control_stamp = None
        self.stats_path = args.stats
        self.rng = random.Random(args.seed)
        self.sel = selectors.DefaultSelector()
        self.sock = socket.socket(self.family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(self.listen_addr)
        self.sock.setblocking(False)
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.clients = {}  # client address -> [upstream socket, last activity]
        self.queue = []  # (due, seq, direction, client address, payload)
        self.seq = 0
        self.last_due = {}  # (direction, client) -> latest due time, to keep order
        self.counts = {d: dict.fromkeys(
            ("received", "forwarded", "lost", "cut", "overflow", "send_errors"), 0)
            for d in ("up", "down")}
        self.rejected_clients = 0
        self.running = True

    def toggle_cut(self, *_):
        self.settings["cut"] = not self.settings["cut"]
        self.base["cut"] = self.settings["cut"]
        print(f"impair: cut {'on' if self.settings['cut'] else 'off'} (SIGUSR1)",
              file=sys.stderr)

    def stop(self, *_):
        self.running = False

    def poll_control(self):
        if not self.control:
            return
        try:
            st = os.stat(self.control)
        except FileNotFoundError:
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self.control_stamp:
            return
        self.control_stamp = stamp
        try:
            with open(self.control, encoding="utf-8") as f:
                new = parse_control(f.read(), self.base)
        except (OSError, ValueError) as e:
            print(f"impair: control file {self.control} ignored: {e}", file=sys.stderr)
            return
        if new != self.settings:
            print(f"impair: settings {json.dumps(new)}", file=sys.stderr)
        self.settings = new

    def write_stats(self):
        if not self.stats_path:
            return
        doc = {
            "listen": f"{self.listen_addr[0]}:{self.sock.getsockname()[1]}",
            "target": f"{self.target[0]}:{self.target[1]}",
            "settings": self.settings, "clients": len(self.clients),
            "rejected_clients": self.rejected_clients, "queued": len(self.queue),
            **self.counts,
        }
        tmp = f"{self.stats_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        os.replace(tmp, self.stats_path)

    def upstream(self, client, now):
        entry = self.clients.get(client)
        if entry is None:
            if len(self.clients) >= MAX_CLIENTS:
                return None
            up = socket.socket(self.target_family, socket.SOCK_DGRAM)
            up.connect(self.target)
            up.setblocking(False)
            self.sel.register(up, selectors.EVENT_READ, client)
            entry = self.clients[client] = [up, now]
        entry[1] = now
        return entry[0]

    def expire_clients(self, now):
        for client, (up, last) in list(self.clients.items()):
            if now - last > CLIENT_IDLE_SECS:
                self.sel.unregister(up)
                up.close()
                del self.clients[client]
                self.last_due.pop(("up", client), None)
                self.last_due.pop(("down", client), None)

    def admit(self, direction, client, payload, now):
        """Applies loss, cut and delay to one received datagram."""
        c = self.counts[direction]
        c["received"] += 1
        s = self.settings
        if s["cut"]:
            c["cut"] += 1
            return
        if s["loss"] > 0 and self.rng.random() < s["loss"]:
            c["lost"] += 1
            return
        if len(self.queue) >= MAX_QUEUED:
            c["overflow"] += 1
            return
        delay = s["delay_ms"]
        if s["jitter_ms"] > 0:
            delay += self.rng.uniform(-s["jitter_ms"], s["jitter_ms"])
        due = now + max(0.0, delay) / 1000.0
        if not s["reorder"]:
            key = (direction, client)
            due = max(due, self.last_due.get(key, 0.0))
            self.last_due[key] = due
        self.seq += 1
        heapq.heappush(self.queue, (due, self.seq, direction, client, payload))

    def deliver(self, now):
        while self.queue and self.queue[0][0] <= now:
            _, _, direction, client, payload = heapq.heappop(self.queue)
            c = self.counts[direction]
            try:
                if direction == "up":
                    entry = self.clients.get(client)
                    if entry is None:
                        c["send_errors"] += 1
                        continue
                    entry[0].send(payload)
                else:
                    self.sock.sendto(payload, client)
                c["forwarded"] += 1
            except OSError:
                c["send_errors"] += 1

    def read(self, sock, client, now):
        for _ in range(READ_BURST):
            try:
                if client is None:
                    payload, src = sock.recvfrom(MAX_DATAGRAM)
                else:
                    payload = sock.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:
                # An ICMP error from an earlier send on a connected socket; the
                # datagram it concerns is gone, nothing to forward.
                continue
            if client is None:
                if self.upstream(src, now) is None:
                    self.rejected_clients += 1
                    continue
                self.admit("up", src, payload, now)
            else:
                if client in self.clients:
                    self.clients[client][1] = now
                self.admit("down", client, payload, now)

    def run(self, max_seconds):
        start = time.monotonic()
        end = start + max_seconds
        next_control = next_stats = next_expiry = start
        while self.running:
            now = time.monotonic()
            self.deliver(now)
            if now >= next_control:
                self.poll_control()
                next_control = now + CONTROL_POLL_SECS
            if now >= next_stats:
                self.write_stats()
                next_stats = now + STATS_EVERY_SECS
            if now >= next_expiry:
                self.expire_clients(now)
                next_expiry = now + CLIENT_IDLE_SECS / 10
            if now >= end:
                break
            wake = min(next_control, next_stats, end)
            if self.queue:
                wake = min(wake, self.queue[0][0])
            for key, _ in self.sel.select(max(0.0, wake - now)):
                self.read(key.fileobj, key.data, time.monotonic())
        self.write_stats()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=parse_addr, required=True, help="IP:PORT to receive on")
    p.add_argument("--target", type=parse_addr, required=True, help="IP:PORT to forward to")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +- jitter on the delay")
    p.add_argument("--loss", type=float, default=0.0, help="drop probability, each direction")
    p.add_argument("--cut", action="store_true", help="start with the path cut")
    p.add_argument("--reorder", action="store_true", help="let jitter reorder datagrams")
    p.add_argument("--control", help="control file (key=value lines), re-read on change")
    p.add_argument("--stats", help="JSON counters, rewritten every 0.5 s")
    p.add_argument("--seed", type=int, help="seed for loss and jitter (default: random)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="exit after this long")
    args = p.parse_args()
    try:
        relay = Relay(args)
    except ValueError as e:
        p.error(str(e))
    except OSError as e:
        sys.exit(f"impair: cannot listen on {args.listen[1]}: {e}")
    signal.signal(signal.SIGUSR1, relay.toggle_cut)
    signal.signal(signal.SIGTERM, relay.stop)
    signal.signal(signal.SIGINT, relay.stop)
    relay.run(args.max_seconds)


if __name__ == "__main__":
    main()
