"""A small WebDriver client over chromedriver's HTTP API (standard library only), and
the process helpers the real-browser tests share: start `peercall node` processes
and chromedriver on loopback, stop them by PID.

Used by scripts/it/browser_page.py (the call page) and scripts/it/browser_echo.py."""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

# Headless Chromium with a fake microphone and camera that never asks for
# permission, WebRTC allowed over loopback, and nothing phoning home.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-gpu",
    "--disable-dev-shm-usage",
]

# The W3C key for an element reference in WebDriver answers.
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"
# WebDriver's key code for Enter.
ENTER = "\ue007"


def browser_args():
    """The arguments every real-browser test takes."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="peercall binary built with --features webrtc")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    return ap.parse_args()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=30):
    """One request; returns (status, body text) for every status."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if body is not None and "Content-Type" not in (headers or {}):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_for_file(path, timeout, proc):
    """The stripped contents of `path` once it exists and is not empty."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with status {proc.returncode} before writing {path.name}")
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear within {timeout} s")


def node_env(extra):
    """The environment for a node: without the suite's PEERCALL_* variables (the node
    reads them as configuration), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERCALL_")}
    env.update(extra)
    return env


def stop(proc, name, log=None):
    """Stops a process this script started (and its process group), by PID: SIGTERM,
    then SIGKILL after ten seconds."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if log:
        log(f"stopped {name} (pid {proc.pid})")


class WebDriver:
    """The WebDriver commands the tests need."""

    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"
        self.session = None

    def call(self, method, path, body=None, timeout=60):
        status, text = http(method, self.base + path, body, timeout=timeout)
        value = json.loads(text).get("value") if text else None
        if status != 200:
            raise RuntimeError(f"WebDriver {method} {path}: HTTP {status}: {text[:500]}")
        return value

    def wait_ready(self, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.call("GET", "/status", timeout=2)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def start(self, binary, args, logs=False):
        options = {"binary": binary, "args": args}
        caps = {"browserName": "chrome", "goog:chromeOptions": options}
        if logs:
            caps["goog:loggingPrefs"] = {"browser": "ALL"}
        self.session = self.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]
        self.call("POST", f"/session/{self.session}/timeouts", {"script": 90_000, "pageLoad": 30_000})

    def _s(self, path):
        return f"/session/{self.session}{path}"

    def open(self, url):
        self.call("POST", self._s("/url"), {"url": url})

    def run(self, script, *args):
        """Runs a synchronous script (`return ...`) and returns its value."""
        return self.call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

    def run_async(self, script, *args, timeout=120):
        return self.call("POST", self._s("/execute/async"),
                         {"script": script, "args": list(args)}, timeout=timeout)

    def find(self, css):
        found = self.call("POST", self._s("/element"), {"using": "css selector", "value": css})
        if not isinstance(found, dict) or ELEMENT_KEY not in found:
            raise RuntimeError(f"no element {css}: {found}")
        return found[ELEMENT_KEY]

    def type(self, css, text, clear=True):
        """Types `text` into the element, as a person would (key events)."""
        element = self.find(css)
        if clear:
            self.call("POST", self._s(f"/element/{element}/clear"), {})
        self.call("POST", self._s(f"/element/{element}/value"), {"text": text})

    def click(self, css):
        self.call("POST", self._s(f"/element/{self.find(css)}/click"), {})

    def text(self, css):
        return self.call("GET", self._s(f"/element/{self.find(css)}/text"))

    def browser_log(self):
        """The console and network messages since the last call (chromedriver only)."""
        try:
            return self.call("POST", self._s("/se/log"), {"type": "browser"})
        except RuntimeError:
            return None

    def wait(self, what, check, timeout=20, poll=0.1):
        """Polls `check()` until it returns something truthy (returned); fails with
        `what` and the last value after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                last = check()
            except RuntimeError as e:  # the element is not there yet
                last = e
            if last and not isinstance(last, Exception):
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last: {last}")
            time.sleep(poll)

    def quit(self, log=None):
        if self.session:
            try:
                self.call("DELETE", f"/session/{self.session}", timeout=10)
            except Exception as e:  # the browser may be gone already
                if log:
                    log(f"closing the browser: {e}")
            self.session = None


def log_tails(work, names, log, lines=30):
    """Logs the last `lines` lines of each of `work`'s files `names` that exists
    (what a failed test shows of its processes)."""
    for name in names:
        path = work / name
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            log(f"--- last lines of {name} ---\n" + "\n".join(tail))


def leave_work(work, keep, log):
    """Removes the work directory, or says where it is kept (`--keep`)."""
    if keep:
        log(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def log_to_stderr(prefix):
    def log(msg):
        print(f"{prefix}: {msg}", file=sys.stderr, flush=True)
    return log
