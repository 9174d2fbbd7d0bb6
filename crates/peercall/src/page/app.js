// The peercall call page: sign-in, identity, contacts with live presence, directory
// search, calls with the browser's microphone over WebRTC, live call statistics.
//
// It speaks only to the node that served it (the CSP allows nothing else), always
// with the admin token as a bearer token:
//
//   GET  /status                       handle, fingerprint, role
//   GET  /v1/contacts                  contacts with presence (also checks the token)
//   POST /v1/contacts {contact}        add (a handle is pinned to the user id found)
//   DELETE /v1/contacts/{id}           remove
//   GET  /v1/lookup?q=                 directory lookup
//   GET  /v1/events                    server-sent events, read through fetch (an
//                                      EventSource cannot send the token)
//   POST /v1/calls {to}                -> {call}: place a call
//   GET  /v1/calls                     the calls now (an incoming one rings here)
//   GET  /v1/calls/{id}                one call's state and statistics
//   POST /v1/calls/{id}/answer|reject  answer or reject a ringing call
//   DELETE /v1/calls/{id}              hang up
//   POST /v1/webrtc/offer?call={id}    SDP offer -> {session, answer}: the browser
//                                      joins the call's audio through the gateway
//   DELETE /v1/webrtc/sessions/{id}    leave it
//
// A node without calls answers the call endpoints 404 (no such route) or 501: the
// page then says "calls not available on this node" and everything else works.
//
// The token lives in sessionStorage (this tab only) and is never logged or put in
// a URL the page requests. No DOM is built from HTML strings: textContent only.

"use strict";

const TOKEN_KEY = "peercall.token";
// Statistics poll interval during a call: the chart's resolution.
const STATS_INTERVAL_MS = 1000;
// Points kept on the chart: an hour at one per second, then the oldest go.
const CHART_POINTS = 3600;
// Reconnect delays of the event stream: doubling from the first to the last.
const EVENTS_RETRY_MIN_MS = 500;
const EVENTS_RETRY_MAX_MS = 10000;
// Call states while the call carries audio (the engine says "active").
const LIVE_STATES = new Set(["active", "connected"]);
// Ends that are nobody's failure; any other reason is shown as an error.
const NORMAL_ENDS = new Set(["completed", "hung_up", "hung up", "hung up here", "hung up by the peer", "ended"]);
// Call states after which a call is over (the engine says "ended", with a reason).
const FINAL_STATES = new Set([
  "ended", "failed", "rejected", "busy", "no_answer", "unreachable", "lost",
  "hung_up", "hangup", "not_found", "cancelled", "timeout",
]);
const CALLS_UNAVAILABLE = "calls not available on this node";

const $ = (id) => document.getElementById(id);

// ---- state -----------------------------------------------------------------

const page = {
  token: null,
  signedIn: false,
  status: null,
  contacts: [],
  lookup: null,
  live: false,
  events: null, // AbortController of the event stream
  callsAvailable: null, // null: not known yet
  call: null, // the call shown in the call panel
  incoming: null, // a ringing incoming call
  audio: null, // { pc, mic, session, call }
  lastError: null,
};

// ---- the API ---------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, json) {
    super(message);
    this.status = status;
    // Whether the node answered with its JSON error body (an unknown route does not).
    this.json = json;
  }

  // The node has no such endpoint: built before calls, or without WebRTC.
  get missing() {
    return (this.status === 404 && !this.json) || this.status === 405 || this.status === 501;
  }
}

async function api(method, path, { json, text, contentType, keepalive = false } = {}) {
  if (!page.token) throw new ApiError(401, "not signed in", false);
  const headers = { "Authorization": "Bearer " + page.token };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (text !== undefined) {
    headers["Content-Type"] = contentType || "text/plain";
    body = text;
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, cache: "no-store", redirect: "error", keepalive });
  } catch (e) {
    throw new ApiError(0, "the node does not answer (is it still running?)", false);
  }
  const raw = await response.text();
  let data = null;
  try { data = raw ? JSON.parse(raw) : null; } catch (e) { data = null; }
  if (!response.ok) {
    const message = (data && typeof data.error === "string") ? data.error : `HTTP ${response.status}`;
    const err = new ApiError(response.status, message, Boolean(data && data.error));
    if (response.status === 401) tokenRefused();
    throw err;
  }
  return data;
}

// ---- small DOM helpers -----------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function setText(id, text) { $(id).textContent = text; }

function notice(message, kind = "error") {
  const n = $("notice");
  n.textContent = message || "";
  n.className = "notice " + kind;
  n.hidden = !message;
  if (message && kind === "error") page.lastError = message;
}

function describe(e) {
  if (e instanceof ApiError) return e.message;
  return String((e && e.message) || e);
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

function displayName(c) {
  return c.handle || c.record_handle || "(no handle)";
}

// ---- sign-in ---------------------------------------------------------------

// The token from a `#token=` link, taken out of the address bar and the history
// at once; null without one.
function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (!token) return null;
  history.replaceState(null, "", location.pathname + location.search);
  return token.trim();
}

function showSignIn(message) {
  $("sign-in").hidden = false;
  $("app").hidden = true;
  $("me").hidden = true;
  setText("sign-in-error", message || "");
  $("token").value = "";
  $("token").focus();
}

// The node refused the token: forget it and ask again.
function tokenRefused() {
  const wasSignedIn = page.signedIn;
  signOut();
  showSignIn(wasSignedIn
    ? "The node refused the token (401): it makes a new one at every start. Paste the current contents of admin.token."
    : "The node refused this token (401). Paste the contents of admin.token in the node's data directory.");
}

async function signIn(token) {
  page.token = token.trim();
  if (!page.token) { showSignIn("Paste the token first."); return; }
  $("sign-in-button").disabled = true;
  setText("sign-in-error", "checking the token…");
  try {
    // /v1/contacts needs the token: a wrong one answers 401 here.
    const contacts = await api("GET", "/v1/contacts");
    sessionStorage.setItem(TOKEN_KEY, page.token);
    page.signedIn = true;
    page.contacts = contacts.contacts || [];
    $("sign-in").hidden = true;
    $("app").hidden = false;
    $("me").hidden = false;
    setText("sign-in-error", "");
    renderContacts();
    await refreshStatus();
    followEvents();
    probeCalls();
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) {
      page.token = null;
      showSignIn("Could not sign in: " + describe(e));
    }
  } finally {
    $("sign-in-button").disabled = false;
  }
}

function signOut() {
  if (page.events) page.events.abort();
  page.events = null;
  stopStatsPolling();
  leaveAudio();
  page.token = null;
  page.signedIn = false;
  page.status = null;
  page.call = null;
  page.incoming = null;
  sessionStorage.removeItem(TOKEN_KEY);
}

// ---- identity --------------------------------------------------------------

async function refreshStatus() {
  try {
    const s = await api("GET", "/status");
    page.status = s;
    setText("me-handle", s.handle ? s.handle : "(no handle)");
    $("me-handle").title = "user id " + s.user_id;
    setText("me-fingerprint", s.fingerprint);
    let role = s.supernode ? "supernode" : "node";
    if (!s.supernode) role += (s.homes && s.homes.length) ? ` · ${s.homes.length} home supernode${s.homes.length > 1 ? "s" : ""}` : " · not attached";
    setText("me-node", role);
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) notice("Could not read the node's status: " + describe(e));
  }
}

// ---- contacts --------------------------------------------------------------

async function refreshContacts() {
  try {
    const body = await api("GET", "/v1/contacts");
    page.contacts = body.contacts || [];
    setText("contacts-error", "");
    renderContacts();
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) setText("contacts-error", "Could not list the contacts: " + describe(e));
  }
}

function presenceText(c) {
  if (c.online === true) return "online" + (c.since_s != null ? ` for ${ago(c.since_s)}` : "");
  if (c.online === false) return "offline" + (c.since_s != null ? ` for ${ago(c.since_s)}` : "");
  return "presence not known yet";
}

function renderContacts() {
  const list = $("contacts");
  list.replaceChildren();
  for (const c of page.contacts) {
    const dotClass = c.online === true ? "dot online" : c.online === false ? "dot offline" : "dot";
    const callButton = el("button", {
      type: "button", class: "small go", text: "Call",
      on: { click: () => placeCall(c.user_id, displayName(c)) },
    });
    const removeButton = el("button", {
      type: "button", class: "small quiet", text: "Remove",
      on: { click: () => removeContact(c) },
    });
    const renamed = c.record_handle && c.handle && c.record_handle !== c.handle
      ? ` (now calls itself ${c.record_handle})` : "";
    const item = el("li", { "data-user": c.user_id, "data-online": String(c.online) },
      el("span", { class: dotClass, title: presenceText(c) }),
      el("span", {},
        el("span", { class: "name", text: displayName(c) + renamed }), " ",
        el("span", { class: "fingerprint", text: c.fingerprint, title: "user id " + c.user_id })),
      el("span", { class: "actions" }, callButton, removeButton),
      el("span", { class: "presence", text: presenceText(c) }));
    list.append(item);
  }
  const online = page.contacts.filter((c) => c.online === true).length;
  setText("contacts-count", page.contacts.length ? `${online} of ${page.contacts.length} online` : "");
  $("contacts-empty").hidden = page.contacts.length > 0;
}

function upsertContact(c) {
  const i = page.contacts.findIndex((x) => x.user_id === c.user_id);
  if (i >= 0) page.contacts[i] = c; else page.contacts.push(c);
  renderContacts();
}

async function addContact(result) {
  setText("search-error", "");
  try {
    const body = await api("POST", "/v1/contacts", { json: { contact: result.handle || result.user_id } });
    // The node looks a handle up again and pins what it finds: it must be who was shown.
    if (body.contact.user_id !== result.user_id) {
      setText("search-error", `Careful: "${result.handle}" now belongs to another user (fingerprint ${body.contact.fingerprint}); that is who was added.`);
    }
    // The event stream may have brought newer presence than this answer: keep it,
    // and read the list again.
    if (!page.contacts.some((c) => c.user_id === body.contact.user_id)) upsertContact(body.contact);
    refreshContacts();
    $("result-add").disabled = true;
    $("result-add").textContent = body.added ? "Added" : "Already a contact";
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) setText("search-error", "Could not add: " + describe(e));
  }
}

async function removeContact(c) {
  try {
    await api("DELETE", "/v1/contacts/" + encodeURIComponent(c.user_id));
    page.contacts = page.contacts.filter((x) => x.user_id !== c.user_id);
    renderContacts();
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) setText("contacts-error", "Could not remove: " + describe(e));
  }
}

// ---- search ----------------------------------------------------------------

async function search(query) {
  query = query.trim();
  if (!query) return;
  setText("search-error", "");
  $("search-result").hidden = true;
  $("search-button").disabled = true;
  $("search-button").textContent = "Looking up…";
  try {
    const r = await api("GET", "/v1/lookup?q=" + encodeURIComponent(query));
    page.lookup = r;
    showResult(r);
  } catch (e) {
    page.lookup = null;
    if (e instanceof ApiError && e.status === 401) return;
    if (e instanceof ApiError && e.status === 404) {
      setText("search-error", `No one called "${query}" in the directory (no live record).`);
    } else {
      setText("search-error", "Lookup failed: " + describe(e));
    }
  } finally {
    $("search-button").disabled = false;
    $("search-button").textContent = "Look up";
  }
}

function showResult(r) {
  $("search-result").hidden = false;
  $("result-dot").className = r.online ? "dot online" : "dot offline";
  $("result-dot").title = r.online ? "online" : "offline";
  setText("result-handle", r.handle || "(no handle)");
  setText("result-fingerprint", r.fingerprint);
  const homes = (r.home_supernodes || []).length;
  setText("result-detail",
    `${r.online ? "online" : "offline"} · user id ${r.user_id} · ${(r.endpoints || []).length} endpoint(s) · ${homes} home supernode(s)`);
  const known = page.contacts.some((c) => c.user_id === r.user_id);
  const mine = page.status && page.status.user_id === r.user_id;
  $("result-add").disabled = known || mine;
  $("result-add").textContent = mine ? "That is you" : known ? "Already a contact" : "Add to contacts";
  $("result-call").disabled = Boolean(mine);
}

// ---- events ----------------------------------------------------------------

async function followEvents() {
  if (page.events) page.events.abort();
  const control = new AbortController();
  page.events = control;
  let delay = EVENTS_RETRY_MIN_MS;
  while (!control.signal.aborted && page.token) {
    try {
      const response = await fetch("/v1/events", {
        headers: { "Authorization": "Bearer " + page.token, "Accept": "text/event-stream" },
        cache: "no-store", signal: control.signal,
      });
      if (response.status === 401) { tokenRefused(); return; }
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      await readEvents(response.body, control.signal, () => { delay = EVENTS_RETRY_MIN_MS; });
    } catch (e) {
      if (control.signal.aborted) return;
    }
    setLive(false);
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, EVENTS_RETRY_MAX_MS);
  }
}

// Parses a text/event-stream body (the subset the node sends: event, id, data).
async function readEvents(body, signal, onOpen) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  signal.addEventListener("abort", () => reader.cancel().catch(() => {}));
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "event") kind = val;
        else if (field === "data") data.push(val);
      }
      if (!data.length) continue;
      let parsed = null;
      try { parsed = JSON.parse(data.join("\n")); } catch (e) { continue; }
      if (kind === "hello") onOpen();
      onEvent(kind, parsed);
    }
  }
}

function setLive(live) {
  page.live = live;
  const pill = $("me-live");
  pill.textContent = live ? "live" : "reconnecting…";
  pill.className = "pill " + (live ? "live" : "down");
}

function onEvent(kind, data) {
  switch (kind) {
    case "hello":
      // The subscription is in place: whatever changed before it is read now.
      setLive(true);
      refreshContacts();
      refreshStatus();
      if (page.callsAvailable) refreshCalls();
      break;
    case "lagged":
      refreshContacts();
      if (page.callsAvailable) refreshCalls();
      break;
    case "presence":
    case "contact_added":
      if (data && data.user_id) upsertContact(data); else refreshContacts();
      break;
    case "contact_removed":
      page.contacts = page.contacts.filter((c) => !data || c.user_id !== data.user_id);
      renderContacts();
      break;
    case "role":
    case "homes":
    case "reflexive":
      refreshStatus();
      break;
    case "handle_refused":
      notice(`Another live user holds the handle "${data && data.handle}": others cannot find you by it.`, "warn");
      break;
    default:
      if (kind.startsWith("call")) onCallEvent(kind, data || {});
  }
}

// ---- calls -----------------------------------------------------------------

function callId(c) {
  if (!c) return null;
  const id = c.call !== undefined ? c.call : c.id;
  return id === undefined || id === null ? null : String(id);
}

function isFinal(c) {
  return Boolean(c && (c.ended === true || FINAL_STATES.has(String(c.state || "").toLowerCase())));
}

function isIncomingRinging(c) {
  const state = String(c.state || "").toLowerCase();
  const incoming = c.direction === "incoming" || c.outgoing === false;
  return !isFinal(c) && (state === "incoming" || (incoming && (state === "ringing" || state === "invited")));
}

// Why a call ended, from whichever field the node uses.
function endReason(c) {
  const why = c && (c.end_reason || c.end || c.reason);
  return why ? String(why) : null;
}

// The peer's name in a call object.
function peerName(c) {
  return (c && (c.handle || c.peer_handle || c.fingerprint || c.peer || c.peer_user)) || "";
}

function callsUnavailable(message) {
  page.callsAvailable = false;
  const p = $("calls-unavailable");
  p.textContent = message || CALLS_UNAVAILABLE + ": this node cannot place or answer calls yet.";
  p.hidden = false;
}

// Asks the node whether it has calls; shows a call already under way (or ringing).
async function probeCalls() {
  try {
    const body = await api("GET", "/v1/calls");
    page.callsAvailable = true;
    $("calls-unavailable").hidden = true;
    showCalls(body);
  } catch (e) {
    if (e instanceof ApiError && e.missing) callsUnavailable();
    else if (!(e instanceof ApiError && e.status === 401)) setText("call-error", "Could not list calls: " + describe(e));
  }
}

async function refreshCalls() {
  try { showCalls(await api("GET", "/v1/calls")); } catch (e) { /* the next event retries */ }
}

function showCalls(body) {
  const calls = Array.isArray(body) ? body : (body && body.calls) || [];
  const ringing = calls.find(isIncomingRinging);
  if (ringing && (!page.call || callId(page.call) !== callId(ringing))) showIncoming(ringing);
  else if (!ringing) hideIncoming();
  if (!page.call) {
    const active = calls.find((c) => !isFinal(c) && !isIncomingRinging(c));
    if (active) adoptCall(callId(active), peerName(active), active);
  }
}

function onCallEvent(kind, data) {
  const id = callId(data);
  if (kind === "call_incoming" || (id && isIncomingRinging({ ...data, state: data.state || (kind === "call_incoming" ? "incoming" : "") }))) {
    if (!page.call || callId(page.call) !== id) showIncoming(data);
  }
  if (page.incoming && callId(page.incoming) === id && (kind === "call_ended" || isFinal(data))) hideIncoming();
  if (page.call && callId(page.call) === id) {
    if (kind === "call_ended" || isFinal(data)) {
      endCall(endReason(data) || "ended");
    } else {
      // Connected, path switched, ringing: the statistics say the rest.
      pollStats();
    }
  }
  if (page.callsAvailable === null) page.callsAvailable = true;
}

async function placeCall(target, name) {
  setText("call-error", "");
  if (page.call && !isFinal(page.call)) {
    setText("call-error", "Hang up the current call first.");
    return;
  }
  if (page.callsAvailable === false) {
    setText("call-error", CALLS_UNAVAILABLE + ".");
    return;
  }
  const c = startCallView(null, name, "calling");
  try {
    const body = await api("POST", "/v1/calls", { json: { to: target } });
    page.callsAvailable = true;
    const id = callId(body);
    if (!id) throw new Error("the node did not say which call it placed");
    if (page.call !== c) return; // hung up or signed out meanwhile
    c.id = id;
    startStatsPolling();
    joinAudio(id);
  } catch (e) {
    if (page.call !== c) return;
    page.call = null;
    setCallState("no call", "");
    $("hangup").disabled = true;
    if (e instanceof ApiError && e.status === 401) return;
    if (e instanceof ApiError && e.missing) {
      callsUnavailable();
      setText("call-error", CALLS_UNAVAILABLE + ".");
    } else if (e instanceof ApiError && e.status === 404) {
      setText("call-error", `Call failed: ${name} is not in the directory (${describe(e)}).`);
    } else {
      setText("call-error", "Call failed: " + describe(e));
    }
  }
}

function showIncoming(c) {
  page.incoming = c;
  document.title = `Incoming call from ${peerName(c) || "someone"} · peercall`;
  $("incoming").hidden = false;
  setText("incoming-who", peerName(c) || "someone");
  setText("incoming-fingerprint", c.fingerprint || "");
  $("answer").disabled = false;
  $("reject").disabled = false;
}

function hideIncoming() {
  page.incoming = null;
  document.title = "peercall";
  $("incoming").hidden = true;
}

async function answer() {
  const c = page.incoming;
  if (!c) return;
  const id = callId(c);
  $("answer").disabled = true;
  $("reject").disabled = true;
  setText("call-error", "");
  if (page.call && !isFinal(page.call)) await hangUp();
  startCallView(id, peerName(c), "answering");
  // Join the audio first, so nothing the caller says is lost.
  await joinAudio(id);
  try {
    await api("POST", `/v1/calls/${encodeURIComponent(id)}/answer`);
    hideIncoming();
    startStatsPolling();
  } catch (e) {
    hideIncoming();
    if (e instanceof ApiError && e.missing) callsUnavailable();
    endCall("could not answer: " + describe(e));
  }
}

async function reject() {
  const c = page.incoming;
  if (!c) return;
  hideIncoming();
  try {
    await api("POST", `/v1/calls/${encodeURIComponent(callId(c))}/reject`);
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) setText("call-error", "Could not reject: " + describe(e));
  }
}

async function hangUp() {
  const c = page.call;
  if (!c) return;
  $("hangup").disabled = true;
  if (c.id) {
    try {
      await api("DELETE", `/v1/calls/${encodeURIComponent(c.id)}`);
    } catch (e) {
      // 404: it had ended already. Anything else is worth saying.
      if (!(e instanceof ApiError && (e.status === 404 || e.status === 401))) setText("call-error", "Hang-up failed: " + describe(e));
    }
  }
  endCall("hung up here");
}

// ---- the call panel and its statistics ---------------------------------------

function startCallView(id, name, state) {
  page.call = { id, name, state, started: performance.now(), connectedAt: null, history: [], lastSwitches: null };
  setCallState(state, name);
  setText("audio-state", "");
  for (const cell of ["st-path", "st-switches", "st-rtt", "st-jitter", "st-loss", "st-mos", "st-frames", "st-concealed", "st-setup", "st-first"]) setText(cell, "-");
  $("hangup").disabled = false;
  drawChart();
  return page.call;
}

function adoptCall(id, name, stats) {
  startCallView(id, name, stats.state || "connected");
  startStatsPolling();
  joinAudio(id);
}

function setCallState(state, name) {
  const s = $("call-state");
  s.textContent = String(state).replace(/_/g, " ");
  s.className = "state " + String(state).toLowerCase();
  setText("call-peer", name || "");
}

let statsTimer = null;
let clockTimer = null;

function startStatsPolling() {
  stopStatsPolling();
  statsTimer = setInterval(pollStats, STATS_INTERVAL_MS);
  clockTimer = setInterval(showTimer, 1000);
  pollStats();
}

function stopStatsPolling() {
  clearInterval(statsTimer);
  clearInterval(clockTimer);
  statsTimer = null;
  clockTimer = null;
}

function showTimer() {
  const c = page.call;
  if (!c || !c.connectedAt) { setText("call-timer", ""); return; }
  const s = Math.floor((performance.now() - c.connectedAt) / 1000);
  setText("call-timer", `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`);
}

async function pollStats() {
  const c = page.call;
  if (!c || !c.id) return;
  let s;
  try {
    s = await api("GET", `/v1/calls/${encodeURIComponent(c.id)}`);
  } catch (e) {
    if (page.call !== c) return;
    if (e instanceof ApiError && e.status === 404 && e.json) endCall("ended");
    else if (e instanceof ApiError && e.missing) { callsUnavailable(); endCall(CALLS_UNAVAILABLE); }
    return;
  }
  if (page.call !== c || !s) return;
  showStats(c, s);
}

const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
const fmt = (v, digits, unit) => (num(v) === null ? "-" : v.toFixed(digits) + unit);

function showStats(c, s) {
  const state = s.state || c.state;
  c.state = state;
  if (!c.connectedAt && LIVE_STATES.has(String(state).toLowerCase())) c.connectedAt = performance.now();
  setCallState(state, peerName(s) || c.name);
  setText("st-path", s.path_kind || "-");
  setText("st-switches", num(s.path_switches) === null ? "-" : String(s.path_switches));
  setText("st-rtt", fmt(s.rtt_ms, 1, " ms"));
  setText("st-jitter", fmt(s.jitter_ms, 1, " ms"));
  setText("st-loss", num(s.loss) === null ? "-" : (100 * s.loss).toFixed(1) + " %");
  setText("st-mos", fmt(s.mos_estimate, 2, ""));
  setText("st-frames", num(s.frames_sent) === null ? "-" : `${s.frames_sent} / ${s.frames_received ?? "-"}`);
  setText("st-concealed", num(s.concealed_ms) === null ? "-" : `${s.concealed_ms} ms / ${s.max_gap_ms ?? "-"} ms`);
  setText("st-setup", fmt(s.setup_ms, 0, " ms"));
  setText("st-first", fmt(s.first_audio_ms, 0, " ms"));
  const t = (performance.now() - c.started) / 1000;
  const switches = num(s.path_switches);
  const switched = switches !== null && c.lastSwitches !== null && switches > c.lastSwitches;
  if (switches !== null) c.lastSwitches = switches;
  c.history.push({ t, rtt: num(s.rtt_ms), loss: num(s.loss), switched, path: s.path_kind || "" });
  if (c.history.length > CHART_POINTS) c.history.shift();
  drawChart();
  if (isFinal(s)) endCall(endReason(s) || state);
}

function endCall(reason) {
  const c = page.call;
  stopStatsPolling();
  leaveAudio();
  $("hangup").disabled = true;
  if (c) {
    c.state = "ended";
    setCallState("ended", c.name);
    setText("call-timer", "");
    const why = String(reason || "ended").replace(/_/g, " ");
    if (NORMAL_ENDS.has(why.toLowerCase())) {
      setText("audio-state", why === "ended" ? "The call ended." : "The call ended: " + why + ".");
    } else {
      setText("audio-state", "");
      setText("call-error", "Call failed: " + why + ".");
    }
  }
  page.call = null;
}

// ---- audio: the browser joins the call through the node's WebRTC gateway ----

async function joinAudio(id) {
  leaveAudio();
  const audio = { pc: null, mic: null, session: null, call: id };
  page.audio = audio;
  setText("audio-state", "asking for the microphone…");
  try {
    audio.mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
  } catch (e) {
    setText("audio-state", "No microphone (" + describe(e) + "): the call goes on, but the other side cannot hear you.");
    return;
  }
  if (page.audio !== audio) { stopTracks(audio.mic); return; }
  const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle" });
  audio.pc = pc;
  pc.ontrack = (ev) => { $("remote-audio").srcObject = ev.streams[0] || new MediaStream([ev.track]); };
  pc.onconnectionstatechange = () => {
    if (page.audio !== audio) return;
    const state = pc.connectionState;
    if (state === "connected") setText("audio-state", "Your microphone is in the call.");
    else if (state === "failed") setText("audio-state", "The audio connection to the node failed.");
    else if (state === "disconnected") setText("audio-state", "The audio connection to the node is interrupted…");
  };
  for (const track of audio.mic.getAudioTracks()) pc.addTransceiver(track, { direction: "sendrecv", streams: [audio.mic] });
  try {
    await pc.setLocalDescription(await pc.createOffer());
    setText("audio-state", "connecting the audio…");
    const body = await api("POST", `/v1/webrtc/offer?call=${encodeURIComponent(id)}`,
      { text: pc.localDescription.sdp, contentType: "application/sdp" });
    if (page.audio !== audio) return;
    audio.session = body.session;
    await pc.setRemoteDescription({ type: "answer", sdp: body.answer });
  } catch (e) {
    if (page.audio !== audio) return;
    leaveAudio();
    let why = describe(e);
    if (e instanceof ApiError && e.status === 501) why = why || "this node was built without WebRTC";
    else if (e instanceof ApiError && e.status === 409) why = "another browser tab already has this call's audio";
    else if (e instanceof ApiError && e.missing) why = "this node has no WebRTC gateway";
    setText("audio-state", "No browser audio: " + why + ".");
  }
}

function stopTracks(stream) {
  if (stream) for (const t of stream.getTracks()) t.stop();
}

function leaveAudio() {
  const audio = page.audio;
  page.audio = null;
  if (!audio) return;
  if (audio.pc) audio.pc.close();
  stopTracks(audio.mic);
  $("remote-audio").srcObject = null;
  if (audio.session !== null && page.token) {
    // keepalive: the request outlives a closing tab, so the node frees the session now.
    api("DELETE", `/v1/webrtc/sessions/${encodeURIComponent(audio.session)}`, { keepalive: true }).catch(() => {});
  }
}

// ---- the chart ---------------------------------------------------------------

const COLORS = { rtt: "#2457c5", loss: "#d9822b", switch: "#7a3db8", grid: "#e3e7ee", text: "#5d6878" };

// A round upper bound for an axis of four divisions: 1, 2 or 4 times a power of
// ten, so every gridline has a short label.
function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 4, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function tick(v) {
  return String(Number.isInteger(v) ? v : +v.toFixed(2));
}

function drawChart() {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width;
  const h = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
  }
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, w, h);
  g.font = "11px system-ui, sans-serif";
  const history = page.call ? page.call.history : (drawChart.last || []);
  if (page.call) drawChart.last = history;
  const left = 44, right = 40, top = 10, bottom = 20;
  const pw = w - left - right, ph = h - top - bottom;
  if (!history.length) {
    g.fillStyle = COLORS.text;
    g.textAlign = "center";
    g.fillText("round trip and loss appear here during a call", w / 2, h / 2);
    return;
  }
  const t0 = history[0].t;
  const span = Math.max(30, history[history.length - 1].t - t0);
  const rttMax = niceCeil(Math.max(40, ...history.map((p) => p.rtt || 0)));
  const lossMax = niceCeil(Math.max(4, ...history.map((p) => 100 * (p.loss || 0))));
  const x = (t) => left + ((t - t0) / span) * pw;
  const yRtt = (v) => top + ph - (v / rttMax) * ph;
  const yLoss = (v) => top + ph - (v / lossMax) * ph;

  g.strokeStyle = COLORS.grid;
  g.lineWidth = 1;
  g.fillStyle = COLORS.text;
  for (let i = 0; i <= 4; i++) {
    const y = top + (ph * i) / 4;
    g.beginPath(); g.moveTo(left, y); g.lineTo(left + pw, y); g.stroke();
    g.textAlign = "right";
    g.fillText(tick(rttMax * (1 - i / 4)), left - 5, y + 4);
    g.textAlign = "left";
    g.fillText(tick(lossMax * (1 - i / 4)), left + pw + 5, y + 4);
  }
  g.textAlign = "left";
  g.fillText("0 s", left, h - 5);
  g.textAlign = "right";
  g.fillText(`${Math.round(span)} s`, left + pw, h - 5);

  // Path switches: a vertical line each.
  g.strokeStyle = COLORS.switch;
  g.setLineDash([3, 3]);
  for (const p of history) {
    if (!p.switched) continue;
    g.beginPath(); g.moveTo(x(p.t), top); g.lineTo(x(p.t), top + ph); g.stroke();
    g.fillStyle = COLORS.switch;
    g.textAlign = "left";
    g.fillText(p.path, x(p.t) + 3, top + 10);
  }
  g.setLineDash([]);

  const line = (value, y, color) => {
    g.strokeStyle = color;
    g.lineWidth = 2;
    g.beginPath();
    let pen = false;
    for (const p of history) {
      const v = value(p);
      if (v === null) { pen = false; continue; }
      if (pen) g.lineTo(x(p.t), y(v)); else g.moveTo(x(p.t), y(v));
      pen = true;
    }
    g.stroke();
  };
  line((p) => (p.loss === null ? null : 100 * p.loss), yLoss, COLORS.loss);
  line((p) => p.rtt, yRtt, COLORS.rtt);
}

// ---- start -----------------------------------------------------------------

function start() {
  const linked = takeTokenFromFragment();
  // A link opened in a tab that shows the page already changes only the fragment.
  window.addEventListener("hashchange", () => {
    const token = takeTokenFromFragment();
    if (token && token !== page.token) { signOut(); signIn(token); }
  });
  $("sign-in-form").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("token").value); });
  $("sign-out").addEventListener("click", () => { signOut(); showSignIn(""); });
  $("search-form").addEventListener("submit", (ev) => { ev.preventDefault(); search($("search").value); });
  $("result-add").addEventListener("click", () => { if (page.lookup) addContact(page.lookup); });
  $("result-call").addEventListener("click", () => {
    if (page.lookup) placeCall(page.lookup.user_id, page.lookup.handle || page.lookup.fingerprint);
  });
  $("hangup").addEventListener("click", hangUp);
  $("answer").addEventListener("click", answer);
  $("reject").addEventListener("click", reject);
  window.addEventListener("resize", drawChart);
  window.addEventListener("pagehide", () => { leaveAudio(); });
  drawChart();
  const token = linked || sessionStorage.getItem(TOKEN_KEY);
  if (token) signIn(token); else showSignIn("");
}

// A read-only view for tests and the curious (no token in it).
window.peercallPage = Object.freeze({
  snapshot: () => ({
    signedIn: page.signedIn,
    handle: page.status && page.status.handle,
    fingerprint: page.status && page.status.fingerprint,
    live: page.live,
    contacts: page.contacts.map((c) => ({ user_id: c.user_id, handle: c.handle, online: c.online })),
    lookup: page.lookup && { user_id: page.lookup.user_id, handle: page.lookup.handle, fingerprint: page.lookup.fingerprint },
    callsAvailable: page.callsAvailable,
    call: page.call && { id: page.call.id, state: page.call.state, points: page.call.history.length },
    incoming: page.incoming && callId(page.incoming),
    audio: page.audio && { session: page.audio.session, state: page.audio.pc ? page.audio.pc.connectionState : "none" },
    lastError: page.lastError,
  }),
  // The browser's own view of the call's audio (its WebRTC statistics): what the
  // microphone sent to the node and what came back, decoded.
  audioStats: async () => {
    const pc = page.audio && page.audio.pc;
    if (!pc) return null;
    const out = { inbound: null, outbound: null };
    (await pc.getStats()).forEach((r) => {
      if (r.kind !== "audio") return;
      if (r.type === "inbound-rtp") {
        out.inbound = {
          packetsReceived: r.packetsReceived, packetsLost: r.packetsLost,
          totalAudioEnergy: r.totalAudioEnergy, totalSamplesDuration: r.totalSamplesDuration,
          concealedSamples: r.concealedSamples, totalSamplesReceived: r.totalSamplesReceived,
        };
      } else if (r.type === "outbound-rtp") {
        out.outbound = { packetsSent: r.packetsSent, bytesSent: r.bytesSent };
      }
    });
    return out;
  },
});

start();
