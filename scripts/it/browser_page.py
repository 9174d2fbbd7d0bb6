#!/usr/bin/env python3
"""Real-browser test of the call page, driven by scripts/it/browser-page.sh.

1. Starts three `peercall node` processes on loopback: a seed supernode, `alice` and
   `bob` (handles claimed in the directory through the seed).
2. Starts chromedriver and, through it (WebDriver over HTTP, standard library only),
   headless Chromium with a fresh profile, and drives alice's page at her admin
   address as a person would, typing and clicking:
   - a wrong token is refused with a clear message (401);
   - the right token signs in: the page shows alice's handle and fingerprint (as her
     node's /status says) and its live event stream;
   - the search box: an unknown handle says so; `bob` shows bob's fingerprint; "Add
     to contacts" adds him, and his presence shows online;
   - calling bob: while the node has no call API, the page says "calls not available
     on this node" (checked only when the node answers /v1/calls with 404 or 501);
   - a page of another origin (a plain HTTP server on another loopback port) cannot
     use alice's API even with her token: the browser's request fails;
   - bob's node stops: the page shows him offline, pushed through /v1/events;
   - sign-out forgets the token; a link with `#token=` (what `peercall page`
     prints) signs in again and the token leaves the address bar.
3. Checks the browser's console: no Content-Security-Policy violation, no script
   error; and that alice's node log never contains the token.

Prints one JSON line with the figures. Every process it starts is stopped by PID.
"""

import http.server as httpserver
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from webdriver import (browser_args, leave_work, log_tails, CHROMIUM_FLAGS, ENTER, WebDriver, free_port, http,  # noqa: E402
                       log_to_stderr, node_env, stop, wait_for_file)

log = log_to_stderr("browser-page")

# The longest the browser may live: every step below, with slack.
BROWSER_SECONDS = 150
# How long the directory may take to hold a new node's record (attach, publish).
DIRECTORY_SECONDS = 40
# How long presence may take to reach the page: a graceful stop is pushed at once;
# the bound covers a loaded machine.
PRESENCE_SECONDS = 25
# Any other step of the page (a request to the node and a render).
STEP_SECONDS = 15


def snapshot(driver):
    return driver.run("return window.peercallPage ? window.peercallPage.snapshot() : null;")


def visible(driver, element_id):
    return driver.run("const e = document.getElementById(arguments[0]); return Boolean(e) && !e.hidden;",
                      element_id)


def text_of(driver, element_id):
    return driver.run("const e = document.getElementById(arguments[0]); return e ? e.textContent : null;",
                      element_id)


def contact_state(driver, user_id):
    """(data-online, presence text) of a contact's row, or None."""
    return driver.run(
        "for (const li of document.querySelectorAll('#contacts li')) {"
        "  if (li.dataset.user === arguments[0])"
        "    return [li.dataset.online, li.querySelector('.presence').textContent];"
        "}"
        "return null;", user_id)


class Node:
    """A `peercall node` process and what its data directory says."""

    def __init__(self, binary, work, name, env):
        self.name = name
        self.data = work / name
        self.log_path = work / f"{name}.log"
        self.proc = subprocess.Popen(
            [binary, "--log-level", "debug", "node", "--data-dir", str(self.data),
             "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
            start_new_session=True, env=node_env(env))
        self.admin = wait_for_file(self.data / "admin.addr", 30, self.proc)
        self.udp = wait_for_file(self.data / "udp.addr", 5, self.proc)
        self.token = (self.data / "admin.token").read_text().strip()

    def api(self, method, path, body=None):
        status, text = http(method, f"http://{self.admin}{path}", body,
                            headers={"Authorization": f"Bearer {self.token}"})
        try:
            return status, json.loads(text) if text else None
        except json.JSONDecodeError:
            return status, text

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stop(self.proc, self.name, log)


class Quiet(httpserver.BaseHTTPRequestHandler):
    """Serves a blank page: the foreign origin of the cross-origin check."""

    def do_GET(self):
        body = b"<!doctype html><title>elsewhere</title><p>another origin"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    args = browser_args()

    # The suite's `timeout` sends SIGTERM: unwind through `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    work = Path(tempfile.mkdtemp(prefix="peercall-browser-page-"))
    nodes = []
    driver_proc = driver = foreign = None
    figures = {}
    try:
        seed = Node(args.bin, work, "seed", {"PEERCALL_ROLE": "supernode"})
        nodes.append(seed)
        alice = Node(args.bin, work, "alice", {"PEERCALL_HANDLE": "alice", "PEERCALL_SEEDS": seed.udp})
        nodes.append(alice)
        bob = Node(args.bin, work, "bob", {"PEERCALL_HANDLE": "bob", "PEERCALL_SEEDS": seed.udp})
        nodes.append(bob)
        _, alice_status = alice.api("GET", "/status")
        _, bob_status = bob.api("GET", "/status")
        log(f"nodes up: seed {seed.udp}, alice {alice.admin}, bob {bob.admin}")

        # The directory holds bob's record before the page looks for him.
        started = time.monotonic()
        while True:
            status, body = alice.api("GET", "/v1/lookup?q=bob")
            if status == 200:
                break
            if time.monotonic() - started > DIRECTORY_SECONDS:
                raise AssertionError(f"alice cannot find bob in the directory: {status} {body}")
            time.sleep(0.3)
        figures["directory_ready_s"] = round(time.monotonic() - started, 1)

        foreign_port = free_port()
        foreign = httpserver.ThreadingHTTPServer(("127.0.0.1", foreign_port), Quiet)
        threading.Thread(target=foreign.serve_forever, daemon=True).start()

        port = free_port()
        driver_proc = subprocess.Popen(
            [args.chromedriver, f"--port={port}"], stdout=open(work / "chromedriver.log", "w"),
            stderr=subprocess.STDOUT, start_new_session=True)
        driver = WebDriver(port)
        driver.wait_ready()
        browser = work / "chromium"
        browser.write_text(f'#!/bin/sh\nexec timeout --kill-after=5 {BROWSER_SECONDS} '
                           f'"{args.chromium}" "$@"\n')
        browser.chmod(0o755)
        driver.start(str(browser), CHROMIUM_FLAGS + [f"--user-data-dir={work / 'profile'}"], logs=True)
        page = f"http://{alice.admin}/"
        t0 = time.monotonic()

        # Sign-in: a wrong token first.
        driver.open(page)
        driver.wait("the sign-in form", lambda: visible(driver, "sign-in"), STEP_SECONDS)
        driver.type("#token", "0" * 64 + ENTER)
        refused = driver.wait("the wrong token's refusal",
                              lambda: "401" in (text_of(driver, "sign-in-error") or "")
                              and text_of(driver, "sign-in-error"), STEP_SECONDS)
        assert "refused" in refused, refused
        assert not snapshot(driver)["signedIn"]

        # The right token.
        driver.type("#token", alice.token)
        driver.click("#sign-in-button")
        driver.wait("signed in", lambda: snapshot(driver)["signedIn"], STEP_SECONDS)
        driver.wait("alice's handle", lambda: text_of(driver, "me-handle") == "alice", STEP_SECONDS)
        shown_fp = text_of(driver, "me-fingerprint")
        assert shown_fp == alice_status["fingerprint"], (shown_fp, alice_status["fingerprint"])
        driver.wait("the live event stream", lambda: snapshot(driver)["live"], STEP_SECONDS)
        figures["signed_in_s"] = round(time.monotonic() - t0, 1)

        # Search: someone who does not exist, then bob.
        driver.type("#search", "nobody-here" + ENTER)
        missing = driver.wait("the not-found message",
                              lambda: text_of(driver, "search-error"), STEP_SECONDS)
        assert "No one called" in missing and "nobody-here" in missing, missing
        driver.type("#search", "bob" + ENTER)
        driver.wait("bob's record", lambda: visible(driver, "search-result")
                    and text_of(driver, "result-handle") == "bob", STEP_SECONDS)
        shown = text_of(driver, "result-fingerprint")
        assert shown == bob_status["fingerprint"], (shown, bob_status["fingerprint"])
        assert text_of(driver, "search-error") == "", text_of(driver, "search-error")
        driver.click("#result-add")
        online = driver.wait("bob online in the contacts",
                             lambda: (contact_state(driver, bob_status["user_id"]) or [None])[0] == "true"
                             and contact_state(driver, bob_status["user_id"]), PRESENCE_SECONDS)
        assert online[1].startswith("online"), online
        status, contacts = alice.api("GET", "/v1/contacts")
        assert [c["user_id"] for c in contacts["contacts"]] == [bob_status["user_id"]], contacts
        figures["bob_online_s"] = round(time.monotonic() - t0, 1)

        # Calls: until the node has them, the page says so.
        calls_status, _ = alice.api("GET", "/v1/calls")
        figures["node_calls_status"] = calls_status
        if calls_status in (404, 501):
            driver.click(f"#contacts li[data-user='{bob_status['user_id']}'] button.go")
            said = driver.wait("the calls-unavailable message",
                               lambda: text_of(driver, "call-error"), STEP_SECONDS)
            assert "calls not available on this node" in said, said
            assert visible(driver, "calls-unavailable")
            assert snapshot(driver)["call"] is None
        else:
            log(f"the node has calls (GET /v1/calls: {calls_status}): the call check is another test's")

        # Another origin cannot use alice's API, token or not.
        driver.open(f"http://127.0.0.1:{foreign_port}/")
        outcome = driver.run_async(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0], {headers: {Authorization: 'Bearer ' + arguments[1]}})"
            "  .then((r) => done('answered ' + r.status), (e) => done('failed: ' + e));",
            f"http://{alice.admin}/v1/contacts", alice.token)
        assert outcome.startswith("failed"), f"a foreign page reached the API: {outcome}"
        figures["foreign_origin"] = outcome

        # Back to the page: the token is in this tab's sessionStorage.
        driver.open(page)
        driver.wait("signed in again from sessionStorage", lambda: snapshot(driver)["signedIn"], STEP_SECONDS)
        driver.wait("the live event stream", lambda: snapshot(driver)["live"], STEP_SECONDS)
        driver.wait("bob still online", lambda: (contact_state(driver, bob_status["user_id"]) or [None])[0] == "true",
                    STEP_SECONDS)

        # Bob's node stops: presence is pushed to the page.
        stopped_at = time.monotonic()
        bob.stop()
        offline = driver.wait("bob offline on the page",
                              lambda: (contact_state(driver, bob_status["user_id"]) or [None])[0] == "false"
                              and contact_state(driver, bob_status["user_id"]), PRESENCE_SECONDS)
        assert offline[1].startswith("offline"), offline
        figures["bob_offline_after_stop_s"] = round(time.monotonic() - stopped_at, 1)

        # Sign out, then the link `peercall page` prints.
        driver.click("#sign-out")
        driver.wait("the sign-in form after sign-out", lambda: visible(driver, "sign-in"), STEP_SECONDS)
        assert driver.run("return sessionStorage.length;") == 0
        link = subprocess.run([args.bin, "page", "--data-dir", str(alice.data)], check=True,
                              capture_output=True, text=True, timeout=20).stdout.strip()
        assert link == f"{page}#token={alice.token}", "peercall page printed another link"
        driver.open(link)
        driver.wait("signed in from the link", lambda: snapshot(driver)["signedIn"], STEP_SECONDS)
        url = driver.run("return location.href;")
        assert alice.token not in url and url == page, f"the token stayed in the address bar: {url != page}"

        # The console: no CSP violation, no script error.
        entries = driver.browser_log()
        if entries is None:
            log("chromedriver gave no browser log: console not checked")
        else:
            bad = [e["message"] for e in entries
                   if "Content Security Policy" in e["message"] or "Uncaught" in e["message"]
                   or "TrustedHTML" in e["message"] or "TrustedScript" in e["message"]]
            figures["console_entries"] = len(entries)
            assert not bad, f"console: {bad}"

        for node in nodes:
            text = node.log_path.read_text(errors="replace")
            assert node.token not in text, f"{node.name}'s log holds its admin token"
            if node is alice:
                assert alice.token not in text
        figures["page_run_s"] = round(time.monotonic() - t0, 1)
        print(json.dumps(figures))
        log("ok: sign-in, identity, search, contacts with live presence, calls gated, "
            "cross-origin refused, link sign-in")
    except Exception:
        log_tails(work, ("alice.log", "seed.log", "bob.log", "chromedriver.log"), log, 30)
        if driver and driver.session:
            try:
                log(f"page snapshot: {snapshot(driver)}")
                log(f"browser console: {driver.browser_log()}")
            except Exception as e:
                log(f"(no page state: {e})")
        raise
    finally:
        if driver:
            driver.quit(log)
        stop(driver_proc, "chromedriver", log)
        if foreign:
            foreign.shutdown()
        for node in reversed(nodes):
            node.stop()
        leave_work(work, args.keep, log)


if __name__ == "__main__":
    main()
