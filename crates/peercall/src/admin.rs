//! The HTTP admin API, on loopback only.
//!
//! | method | path | auth | does |
//! |---|---|---|---|
//! | GET | `/healthz` | open | `ok` if the engine task answers, 503 otherwise |
//! | GET | `/status` | open | JSON: ids, role, supernode or not, home supernodes, attached clients, members, directory share, reflexive address, sessions, uptime |
//! | GET | `/metrics` | open | Prometheus text format |
//! | GET | `/` | open | the call page (`crate::page`); its files under `/assets/` |
//! | GET | `/v1/lookup?q=HANDLE\|USER_ID` | bearer | looks the user up in the directory: 200 with the record (fingerprint, user id, handle, static key, endpoints, home supernodes, online, expiry); 404 not found, 504 timed out, 503 not attached |
//! | GET | `/v1/contacts` | bearer | the contacts with their presence |
//! | POST | `/v1/contacts` | bearer | `{"contact": "HANDLE" or "USER_ID"}`: a handle is looked up and the user id found is pinned (trust on first use); 201 new, 200 known, 409 handle pinned to someone else |
//! | DELETE | `/v1/contacts/{HANDLE or USER_ID}` | bearer | removes the contact |
//! | GET | `/v1/events` | bearer | server-sent events: presence, role, homes, ... (see `crate::events`) |
//! | POST | `/v1/connect` | bearer | `{"peer": "PEERKEY@HOST:PORT" or "HOST:PORT"}`: start a session |
//! | POST | `/v1/shutdown` | bearer | graceful shutdown, as on SIGTERM |
//! | POST | `/v1/calls` | bearer | `{"to": HANDLE or USER_ID, "play": WAV?, "record": WAV?}`: places a call; 201 `{"call": ID}` (failures come as the call's end); 400 bad target or unreadable WAV |
//! | GET | `/v1/calls` | bearer | `{"calls": [...]}`: live calls and those ended in the last minute |
//! | GET | `/v1/calls/{id}` | bearer | one call: state, peer, paths with RTT/jitter/loss/MOS, switches, frames, gaps, set-up and first-audio times, MOS estimate, end reason; 404 unknown |
//! | POST | `/v1/calls/{id}/answer` | bearer | answers an incoming call (body as above without `to`, optional); 404 unknown, 409 not incoming |
//! | POST | `/v1/calls/{id}/reject` | bearer | declines an incoming call; 404, 409 |
//! | DELETE | `/v1/calls/{id}` | bearer | hangs up (or cancels) a call; 404, 409 if it has ended |
//! | POST | `/v1/webrtc/offer?echo=1` | bearer | body: a browser's SDP offer; answers `{"session", "answer"}` (201) with an echo session (feature `webrtc`) |
//! | POST | `/v1/webrtc/offer?call=ID` | bearer | the same, joining call `ID`'s audio: 501 until the node has calls |
//! | DELETE | `/v1/webrtc/sessions/{id}` | bearer | closes a browser session (feature `webrtc`) |
//! | GET | `/v1/debug/block` | bearer | `{"blocked": ["IP:PORT", ...]}`: the debug block list (only with `debug_endpoints = true`, else 404) |
//! | POST | `/v1/debug/block` | bearer | `{"addr": "IP:PORT"}`: the UDP socket drops every datagram to or from it, counted in `peercall_debug_blocked_datagrams_total` (cuts a path for tests and `peercall demo`); answers the list; 400 bad address; 404 without `debug_endpoints` |
//! | DELETE | `/v1/debug/block` | bearer | empties the block list; 404 without `debug_endpoints` |
//! | GET | `/webrtc/echo` | open | the echo test page (feature `webrtc`); the token goes in the page, or in its URL fragment `#token=` |
//!
//! Without the `webrtc` feature the WebRTC paths answer 501.
//!
//! The operational endpoints (`/healthz`, `/status`, `/metrics`) and the page are
//! open to local processes, so monitoring needs no secret; every `/v1/*` request
//! needs `Authorization: Bearer <token>` (unknown `/v1/*` paths too: without the
//! token they answer 401, not 404), the token being the contents of `admin.token` in
//! the data directory (mode 0600, so only the node's user can read it).
//!
//! Against other web pages in a local browser:
//! - every request must carry a loopback `Host` header, which defeats DNS
//!   rebinding;
//! - cross-origin requests are refused (403): an `Origin` header other than the
//!   node's own, or a `Sec-Fetch-Site` other than `same-origin` or `none` (only a
//!   top-level navigation to the page may come from elsewhere). No CORS header is
//!   ever sent, so preflights fail too;
//! - every response says `X-Content-Type-Options: nosniff`, sends no referrer, and
//!   may not be framed (`Content-Security-Policy`, which the page sets strictly).

use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use futures_util::StreamExt;
use peercall_crypto::{Handle, Record, UserId};
use peercall_engine::{CallError, CallId, CallTarget, Found, Lookup, LookupError};
use peercall_wire::Time;
use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::info;

use crate::book::{AddError, Added, ContactView, endpoint_strings};
use crate::calls::{CallBody, MediaFiles, Playback, Recorder};
use crate::clock::Clock;
use crate::contact::PeerSpec;
use crate::events::EventBus;
use crate::logging::short_key;
use crate::metrics::Metrics;
use crate::page;
use crate::runtime::{self, Command, Snapshot};

/// Random bytes in an admin token: 256 bits, beyond guessing.
const TOKEN_BYTES: usize = 32;
/// How long a request waits for the engine task before answering 503. The engine
/// answers within one loop turn; seconds of silence mean it is stuck.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request body accepted (a connect request is under 200 bytes).
const MAX_BODY: usize = 4096;
/// How long `/v1/lookup` waits for the overlay's answer: its own timeout (it then
/// answers "timed out" itself) plus a margin for a busy engine.
const LOOKUP_WAIT: Duration = Duration::from_secs(peercall_overlay::LOOKUP_TIMEOUT.as_secs() + 4);
/// How long a contact change may take to reach the disk before the request fails.
const SAVE_WAIT: Duration = Duration::from_secs(10);
/// Comment lines on an idle event stream, so proxies and clients see it is alive.
const EVENTS_KEEPALIVE: Duration = Duration::from_secs(15);

/// The bearer token for state-changing requests.
#[derive(Clone)]
pub struct AdminToken(String);

impl AdminToken {
    /// A fresh random token, as lowercase hex.
    pub fn generate(rng: &mut impl CryptoRngCore) -> AdminToken {
        let mut bytes = [0u8; TOKEN_BYTES];
        rng.fill_bytes(&mut bytes);
        AdminToken(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The token text, as written to `admin.token`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, compared in constant time (the length is
    /// public anyway).
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(redacted)")
    }
}

/// What the handlers share.
#[derive(Debug)]
pub struct AdminState {
    /// To the engine task.
    pub commands: mpsc::Sender<Command>,
    /// The bearer token.
    pub token: AdminToken,
    /// The registry behind `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The node's clock.
    pub clock: Clock,
    /// The bound UDP address (to pick an address family when resolving peers).
    pub udp_local: SocketAddr,
    /// The configured handle.
    pub handle: Option<Handle>,
    /// This node's user id (calls to it are refused).
    pub user_id: Option<UserId>,
    /// The event stream's source.
    pub events: Arc<EventBus>,
    /// Becomes `true` when the node stops: event streams end then.
    pub stopping: watch::Receiver<bool>,
    /// The UDP socket's debug block list; `None` (the endpoints answer 404) unless
    /// `debug_endpoints = true`.
    pub debug_block: Option<Arc<crate::udp::BlockList>>,
}

type Shared = Arc<AdminState>;

/// The admin routes.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/lookup", get(lookup))
        .route("/v1/contacts", get(contacts).post(add_contact))
        .route("/v1/contacts/{contact}", delete(remove_contact))
        .route("/v1/events", get(events))
        .route("/v1/connect", post(connect))
        .route("/v1/shutdown", post(shutdown))
        .route("/v1/calls", get(list_calls).post(place_call))
        .route("/v1/calls/{id}", get(get_call).delete(hangup_call))
        .route("/v1/calls/{id}/answer", post(answer_call))
        .route("/v1/calls/{id}/reject", post(reject_call))
        .route(
            "/v1/debug/block",
            get(debug_blocked).post(debug_block).delete(debug_unblock),
        )
        .route("/v1/webrtc/offer", post(webrtc_offer))
        .route("/v1/webrtc/sessions/{id}", delete(webrtc_close))
        .route("/webrtc/echo", get(webrtc_echo_page))
        .route("/", get(page::index))
        .route("/assets/{name}", get(page::asset))
        .fallback(not_found)
        // Layers run outside in: headers on every answer, then the Host check, the
        // origin check, and the token for the API.
        .layer(middleware::from_fn_with_state(state.clone(), api_token))
        .layer(middleware::from_fn(same_origin))
        .layer(middleware::from_fn(loopback_host))
        .layer(middleware::map_response(security_headers))
        .with_state(state)
}

/// Serves the admin API on `listener` until `stop` completes.
pub async fn serve(
    listener: TcpListener,
    state: Shared,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(stop)
        .await
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    #[derive(Serialize)]
    struct Body {
        error: String,
    }
    (
        status,
        axum::Json(Body {
            error: message.into(),
        }),
    )
        .into_response()
}

/// No such endpoint: plain text, unlike the JSON errors of endpoints that exist, so
/// a client can tell "this node has no such API" from "no such thing".
async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "no such endpoint on this node\n",
    )
        .into_response()
}

fn engine_gone() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the engine is not responding",
    )
}

/// Whether an HTTP `Host` header names the loopback interface.
fn host_is_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, _port)) => ip,
            None => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

async fn loopback_host(request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    if host.is_some_and(host_is_loopback) {
        next.run(request).await
    } else {
        error(
            StatusCode::FORBIDDEN,
            "the admin API answers only requests addressed to a loopback host",
        )
    }
}

/// Whether a request carries the bearer token; a refusal is counted.
fn token_ok(headers: &HeaderMap, state: &AdminState) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let ok = presented.is_some_and(|t| state.token.matches(t));
    if !ok {
        state.metrics.admin_unauthorized.inc();
    }
    ok
}

/// The answer to a request without the right token.
fn unauthorized() -> Response {
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "this request needs Authorization: Bearer <contents of admin.token in the data directory>",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"peercall\""),
    );
    response
}

/// Proof that the request carried the bearer token.
struct Authorized;

impl FromRequestParts<Shared> for Authorized {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Response> {
        if token_ok(&parts.headers, state) {
            Ok(Authorized)
        } else {
            Err(unauthorized())
        }
    }
}

/// The prefix of the API, where every request needs the token.
const API_PREFIX: &str = "/v1/";

/// Refuses every `/v1/*` request without the token, before routing: an unknown
/// path under the API answers 401 to a caller without the token, never 404.
async fn api_token(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if request.uri().path().starts_with(API_PREFIX) && !token_ok(request.headers(), &state) {
        return unauthorized();
    }
    next.run(request).await
}

/// Paths a top-level navigation from another site may open: the pages, which
/// carry no secrets (a link printed elsewhere must work).
const NAVIGABLE: [&str; 2] = ["/", "/webrtc/echo"];

/// Why a request comes from another origin, if it does. `host` is the request's
/// `Host` (already checked to be loopback): the page's own origin is
/// `http://{host}`.
fn cross_origin(method: &Method, path: &str, headers: &HeaderMap) -> Option<&'static str> {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let host = text(header::HOST.as_str()).unwrap_or("");
    if let Some(origin) = text(header::ORIGIN.as_str()) {
        let own = origin
            .strip_prefix("http://")
            .is_some_and(|rest| rest.eq_ignore_ascii_case(host));
        if !own {
            return Some("the request comes from another origin");
        }
    }
    match text("sec-fetch-site") {
        None | Some("same-origin" | "none") => None,
        Some(_) => {
            let navigation = matches!(*method, Method::GET | Method::HEAD)
                && text("sec-fetch-mode") == Some("navigate")
                && text("sec-fetch-dest") == Some("document")
                && NAVIGABLE.contains(&path);
            (!navigation).then_some("the request comes from another site")
        }
    }
}

/// Refuses cross-origin requests (see the module documentation).
async fn same_origin(request: Request, next: Next) -> Response {
    match cross_origin(request.method(), request.uri().path(), request.headers()) {
        None => next.run(request).await,
        Some(why) => error(
            StatusCode::FORBIDDEN,
            format!("{why}: this node's admin API answers only its own page and local tools"),
        ),
    }
}

/// Headers on every answer: no type sniffing, no referrer, no framing; no caching
/// and a restrictive content policy unless the handler set its own (the pages do).
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    );
    // Answers are live state, some of it personal (contacts): never cached.
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(page::API_CSP),
        );
    }
    response
}

async fn healthz(State(state): State<Shared>) -> Response {
    match runtime::snapshot(&state.commands, ENGINE_TIMEOUT).await {
        Some(_) => "ok\n".into_response(),
        None => engine_gone(),
    }
}

/// The `/status` body.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusBody {
    /// The user id (52 base32 characters).
    pub user_id: String,
    /// Its short form for people to compare.
    pub fingerprint: String,
    /// The node's Noise static key (52 base32 characters).
    pub peer_key: String,
    /// `auto`, `ordinary` or `supernode`.
    pub role: String,
    /// The bound UDP address.
    pub udp: String,
    /// peercall version.
    pub version: String,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Established sessions.
    pub sessions: Vec<SessionBody>,
    /// The handle claimed in the directory.
    #[serde(default)]
    pub handle: Option<String>,
    /// Whether the node is a supernode now.
    #[serde(default)]
    pub supernode: bool,
    /// Home supernodes (ordinary nodes).
    #[serde(default)]
    pub homes: Vec<HomeBody>,
    /// Nodes attached to this supernode.
    #[serde(default)]
    pub clients: u64,
    /// Most clients this supernode admits (0 while not a supernode).
    #[serde(default)]
    pub capacity: u64,
    /// Live supernodes known, this one included (supernodes).
    #[serde(default)]
    pub members: u64,
    /// Directory records this supernode stores: its directory share.
    #[serde(default)]
    pub records: u64,
    /// The address the supernodes see this node at.
    #[serde(default)]
    pub reflexive: Option<String>,
    /// Contacts in the book.
    #[serde(default)]
    pub contacts: usize,
    /// Contacts online.
    #[serde(default)]
    pub contacts_online: usize,
    /// Supernodes in the host cache.
    #[serde(default)]
    pub host_cache: usize,
}

/// A supernode a node is attached to (or that a record lists).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HomeBody {
    /// Its static key.
    pub key: String,
    /// Its address.
    pub addr: String,
}

/// One session in `/status`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SessionBody {
    /// The peer's static key.
    pub peer: String,
    /// The peer's address.
    pub addr: String,
    /// Seconds since the session (or its latest rekey) was established.
    pub established_age_s: f64,
    /// Seconds since the last authenticated packet.
    pub last_received_age_s: f64,
}

fn status_body(snap: &Snapshot, udp: SocketAddr, handle: Option<&Handle>) -> StatusBody {
    let status = &snap.status;
    StatusBody {
        handle: handle.map(|h| h.as_str().to_owned()),
        supernode: status.supernode,
        homes: status
            .homes
            .iter()
            .map(|(key, addr)| HomeBody {
                key: key.to_string(),
                addr: addr.to_string(),
            })
            .collect(),
        clients: status.clients,
        capacity: snap.stats.overlay.capacity,
        members: status.members,
        records: status.records,
        reflexive: status.reflexive.map(|a| a.to_string()),
        contacts: snap.contacts,
        contacts_online: snap.contacts_online,
        host_cache: snap.host_cache,
        user_id: status.user_id.to_string(),
        fingerprint: status.user_id.fingerprint(),
        peer_key: status.peer_key.to_string(),
        role: status.role.as_str().to_owned(),
        udp: udp.to_string(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_s: snap.now.saturating_since(status.started).as_secs(),
        sessions: status
            .sessions
            .iter()
            .map(|s| SessionBody {
                peer: s.peer.to_string(),
                addr: s.addr.to_string(),
                established_age_s: snap.now.saturating_since(s.established).as_secs_f64(),
                last_received_age_s: snap.now.saturating_since(s.last_received).as_secs_f64(),
            })
            .collect(),
    }
}

async fn status(State(state): State<Shared>) -> Response {
    match runtime::snapshot(&state.commands, ENGINE_TIMEOUT).await {
        Some(snap) => {
            axum::Json(status_body(&snap, state.udp_local, state.handle.as_ref())).into_response()
        }
        None => engine_gone(),
    }
}

async fn metrics(State(state): State<Shared>) -> Response {
    let Some(snap) = runtime::snapshot(&state.commands, ENGINE_TIMEOUT).await else {
        return engine_gone();
    };
    #[cfg(feature = "webrtc")]
    if let Some(webrtc) = &snap.webrtc {
        state.metrics.webrtc.mirror(webrtc);
    }
    let m = &state.metrics;
    let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    m.contacts.set(gauge(snap.contacts));
    m.contacts_online.set(gauge(snap.contacts_online));
    m.host_cache.set(gauge(snap.host_cache));
    m.event_subscribers.set(gauge(state.events.subscribers()));
    let text = m.render(&snap.stats, &snap.calls, state.clock.uptime());
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response()
}

/// Parses what a user typed to name someone: a user id (52 base32 characters) or
/// a handle.
pub fn parse_query(q: &str) -> Result<Lookup, String> {
    let q = q.trim();
    if let Ok(user) = q.parse::<UserId>() {
        return Ok(Lookup::User(user));
    }
    Handle::new(q).map(Lookup::Handle).map_err(|e| {
        format!("{q:?} is neither a user id (52 base32 characters) nor a handle ({e})")
    })
}

/// The `/v1/lookup` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LookupBody {
    /// What was asked.
    pub query: String,
    /// The user id.
    pub user_id: String,
    /// Its fingerprint, for people to compare.
    pub fingerprint: String,
    /// The handle the record claims.
    pub handle: Option<String>,
    /// The node's Noise static key.
    pub static_key: String,
    /// Whether the record lists endpoints (a signed "offline" record does not).
    pub online: bool,
    /// Where the node can be reached.
    pub endpoints: Vec<String>,
    /// The node's home supernodes.
    pub home_supernodes: Vec<HomeBody>,
    /// The record's sequence number.
    pub seq: u64,
    /// When it expires, Unix seconds.
    pub expires: u64,
    /// Seconds until then.
    pub expires_in_s: u64,
}

fn lookup_body(query: &str, record: &Record, online: bool, now: Time) -> LookupBody {
    let user = record.user_id();
    let body = &record.body;
    LookupBody {
        query: query.to_owned(),
        user_id: user.to_string(),
        fingerprint: user.fingerprint(),
        handle: body.handle.as_ref().map(|h| h.as_str().to_owned()),
        static_key: body.static_key.to_string(),
        online,
        endpoints: endpoint_strings(&body.endpoints),
        home_supernodes: body
            .supernodes
            .iter()
            .map(|h| HomeBody {
                key: h.key.to_string(),
                addr: h.addr.to_string(),
            })
            .collect(),
        seq: record.seq,
        expires: record.expires,
        expires_in_s: record.expires.saturating_sub(now.as_secs()),
    }
}

/// Asks the overlay and waits for its answer; an error response if there is none.
async fn run_lookup(state: &AdminState, what: Lookup, shown: &str) -> Result<Found, Response> {
    let answer = runtime::ask(
        &state.commands,
        |reply| Command::Lookup { what, reply },
        LOOKUP_WAIT,
    )
    .await;
    match answer {
        None => Err(error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no answer for {shown:?} within {LOOKUP_WAIT:?}"),
        )),
        Some(None) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many lookups in flight; try again shortly",
        )),
        Some(Some(Ok(found))) => Ok(found),
        Some(Some(Err(LookupError::NotFound))) => Err(error(
            StatusCode::NOT_FOUND,
            format!("{shown:?} was not found: no live record in the directory"),
        )),
        Some(Some(Err(LookupError::Timeout))) => Err(error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the lookup of {shown:?} timed out: no directory storer answered in time"),
        )),
        Some(Some(Err(LookupError::NotAttached))) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is not attached to the overlay yet (no home supernode); try again shortly",
        )),
    }
}

/// Query of `/v1/lookup`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupQuery {
    q: String,
}

async fn lookup(
    _: Authorized,
    State(state): State<Shared>,
    query: Result<Query<LookupQuery>, QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q.q,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected ?q=HANDLE or ?q=USER_ID: {e}"),
            );
        }
    };
    let what = match parse_query(&q) {
        Ok(w) => w,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match run_lookup(&state, what, q.trim()).await {
        Ok(found) => axum::Json(lookup_body(
            q.trim(),
            &found.record,
            found.online,
            state.clock.now(),
        ))
        .into_response(),
        Err(response) => response,
    }
}

/// The `/v1/contacts` listing.
#[derive(Debug, Serialize, Deserialize)]
pub struct ContactsBody {
    /// The contacts, in the order added.
    pub contacts: Vec<ContactView>,
}

async fn contacts(_: Authorized, State(state): State<Shared>) -> Response {
    match runtime::ask(&state.commands, Command::Contacts, ENGINE_TIMEOUT).await {
        Some(contacts) => axum::Json(ContactsBody { contacts }).into_response(),
        None => engine_gone(),
    }
}

/// The `POST /v1/contacts` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddContactRequest {
    contact: String,
}

/// The answer to an add.
#[derive(Debug, Serialize, Deserialize)]
pub struct AddedBody {
    /// Whether the contact is new.
    pub added: bool,
    /// The contact.
    pub contact: ContactView,
}

/// Waits until a contact change reached the disk.
async fn saved(rx: tokio::sync::oneshot::Receiver<crate::persist::Saved>) -> Result<(), Response> {
    match tokio::time::timeout(SAVE_WAIT, rx).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the change is made but could not be saved: {e}"),
        )),
        _ => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the change is made but was not saved in time",
        )),
    }
}

async fn add_contact(_: Authorized, State(state): State<Shared>, body: Bytes) -> Response {
    if body.len() > MAX_BODY {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    }
    let request: AddContactRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"contact\": \"HANDLE\" or \"USER_ID\"}}: {e}"),
            );
        }
    };
    let shown = request.contact.trim();
    let (user, handle) = match parse_query(shown) {
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
        Ok(Lookup::User(user)) => (user, None),
        // Trust on first use: the user id the directory has for the handle now is
        // the one pinned.
        Ok(Lookup::Handle(handle)) => {
            match run_lookup(&state, Lookup::Handle(handle.clone()), shown).await {
                Ok(found) => (found.record.user_id(), Some(handle)),
                Err(response) => return response,
            }
        }
    };
    let answer = runtime::ask(
        &state.commands,
        |reply| Command::AddContact {
            user,
            handle,
            reply,
        },
        ENGINE_TIMEOUT,
    )
    .await;
    let (added, contact, rx) = match answer {
        None => return engine_gone(),
        Some(Err(e @ (AddError::HandleTaken { .. } | AddError::Full))) => {
            return error(StatusCode::CONFLICT, e.to_string());
        }
        Some(Err(e @ AddError::Myself)) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        Some(Ok(a)) => a,
    };
    if let Err(response) = saved(rx).await {
        return response;
    }
    let status = if added == Added::New {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = AddedBody {
        added: added == Added::New,
        contact,
    };
    (status, axum::Json(body)).into_response()
}

async fn remove_contact(
    _: Authorized,
    State(state): State<Shared>,
    Path(contact): Path<String>,
) -> Response {
    let shown = contact.trim();
    let Some(list) = runtime::ask(&state.commands, Command::Contacts, ENGINE_TIMEOUT).await else {
        return engine_gone();
    };
    let Some(user) = list
        .iter()
        .find(|c| c.user_id == shown || c.handle.as_deref() == Some(shown))
        .and_then(|c| c.user_id.parse::<UserId>().ok())
    else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no contact {shown:?} (give its handle or user id)"),
        );
    };
    let answer = runtime::ask(
        &state.commands,
        |reply| Command::RemoveContact { user, reply },
        ENGINE_TIMEOUT,
    )
    .await;
    match answer {
        None => engine_gone(),
        Some(None) => error(StatusCode::NOT_FOUND, format!("no contact {shown:?}")),
        Some(Some((contact, rx))) => match saved(rx).await {
            Ok(()) => axum::Json(serde_json::json!({ "removed": contact })).into_response(),
            Err(response) => response,
        },
    }
}

/// An SSE event; `id` only for bus events (the client's `Last-Event-ID`).
fn sse_event(id: Option<u64>, kind: &str, data: &serde_json::Value) -> SseEvent {
    let mut event = SseEvent::default().event(kind);
    if let Some(id) = id {
        event = event.id(id.to_string());
    }
    match event.clone().json_data(data) {
        Ok(e) => e,
        Err(_) => event.data("{}"),
    }
}

async fn events(_: Authorized, State(state): State<Shared>) -> Response {
    let rx = state.events.subscribe();
    let stopping = state.stopping.clone();
    // The first event says the subscription is in place: everything published from
    // then on will arrive.
    let hello = futures_util::stream::once(async {
        Ok::<_, Infallible>(sse_event(
            None,
            "hello",
            &serde_json::json!({ "version": env!("CARGO_PKG_VERSION") }),
        ))
    });
    let stream =
        futures_util::stream::unfold((rx, stopping), |(mut rx, mut stopping)| async move {
            let event = tokio::select! {
                received = rx.recv() => match received {
                    Ok(e) => sse_event(Some(e.id), e.kind, &e.data),
                    Err(RecvError::Lagged(missed)) => {
                        sse_event(None, "lagged", &serde_json::json!({ "missed": missed }))
                    }
                    Err(RecvError::Closed) => return None,
                },
                // The node is stopping (or gone): end the stream so shutdown completes.
                _ = stopping.wait_for(|s| *s) => return None,
            };
            Some((Ok::<_, Infallible>(event), (rx, stopping)))
        });
    Sse::new(hello.chain(stream))
        .keep_alive(KeepAlive::new().interval(EVENTS_KEEPALIVE))
        .into_response()
}

/// The `/v1/connect` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectRequest {
    peer: String,
}

async fn connect(_: Authorized, State(state): State<Shared>, body: Bytes) -> Response {
    if body.len() > MAX_BODY {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    }
    let request: ConnectRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"peer\": \"PEERKEY@HOST:PORT\" or \"HOST:PORT\"}}: {e}"),
            );
        }
    };
    let spec: PeerSpec = match request.peer.parse() {
        Ok(s) => s,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid peer {:?}: {e}", request.peer),
            );
        }
    };
    let contact = match spec.resolve(state.udp_local).await {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match contact.key {
        Some(key) => info!(peer = %short_key(&key), "admin: connect"),
        None => info!("admin: connect to a peer of unknown key"),
    }
    if !runtime::send(&state.commands, Command::Connect(contact)).await {
        return engine_gone();
    }
    #[derive(Serialize)]
    struct Accepted {
        connecting: String,
        addr: String,
    }
    (
        StatusCode::ACCEPTED,
        axum::Json(Accepted {
            connecting: spec.to_string(),
            addr: contact.addr.to_string(),
        }),
    )
        .into_response()
}

async fn shutdown(_: Authorized, State(state): State<Shared>) -> Response {
    info!("admin: shutdown requested");
    if !runtime::send(&state.commands, Command::Shutdown).await {
        return engine_gone();
    }
    #[derive(Serialize)]
    struct Accepted {
        shutting_down: bool,
    }
    (
        StatusCode::ACCEPTED,
        axum::Json(Accepted {
            shutting_down: true,
        }),
    )
        .into_response()
}

/// The `POST /v1/debug/block` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockRequest {
    /// `IP:PORT` to cut off.
    addr: String,
}

/// The block list's answer: what it holds now.
#[derive(Serialize)]
struct BlockList {
    blocked: Vec<String>,
}

fn block_list(list: &crate::udp::BlockList) -> Response {
    axum::Json(BlockList {
        blocked: list.addrs().iter().map(ToString::to_string).collect(),
    })
    .into_response()
}

/// `GET /v1/debug/block`: the addresses blocked (404 without `debug_endpoints`).
async fn debug_blocked(_: Authorized, State(state): State<Shared>) -> Response {
    match &state.debug_block {
        Some(list) => block_list(list),
        None => not_found().await,
    }
}

/// `POST /v1/debug/block`: drop every datagram to or from `addr` at the UDP socket.
async fn debug_block(_: Authorized, State(state): State<Shared>, body: Bytes) -> Response {
    let Some(list) = &state.debug_block else {
        return not_found().await;
    };
    if body.len() > MAX_BODY {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    }
    let request: BlockRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"addr\": \"IP:PORT\"}}: {e}"),
            );
        }
    };
    let addr: SocketAddr = match request.addr.parse() {
        Ok(a) => a,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid addr {:?} (expected IP:PORT): {e}", request.addr),
            );
        }
    };
    list.block(addr);
    info!(%addr, "admin: debug block list: datagrams to and from the address dropped");
    block_list(list)
}

/// `DELETE /v1/debug/block`: empty the block list.
async fn debug_unblock(_: Authorized, State(state): State<Shared>) -> Response {
    let Some(list) = &state.debug_block else {
        return not_found().await;
    };
    let n = list.clear();
    info!(addresses = n, "admin: debug block list emptied");
    block_list(list)
}

/// The `POST /v1/calls` body (and, without `to`, the answer's).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallRequest {
    /// Whom to call.
    #[serde(default)]
    to: Option<String>,
    /// A WAV file to play into the call.
    #[serde(default)]
    play: Option<PathBuf>,
    /// A WAV file to record the call to.
    #[serde(default)]
    record: Option<PathBuf>,
}

/// The `GET /v1/calls` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct CallsBody {
    /// Live calls and those ended in the last minute.
    pub calls: Vec<CallBody>,
}

/// The `POST /v1/calls` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct PlacedBody {
    /// The new call's id.
    pub call: u64,
}

/// Parses a call request body (empty: no files).
fn call_request(body: &[u8], with_target: bool) -> Result<CallRequest, (StatusCode, String)> {
    if body.len() > MAX_BODY {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large".into(),
        ));
    }
    if body.iter().all(u8::is_ascii_whitespace) && !with_target {
        return Ok(CallRequest::default());
    }
    let expected = if with_target {
        "{\"to\": \"HANDLE\" or \"USER_ID\", \"play\": \"IN.wav\" (optional), \"record\": \"OUT.wav\" (optional)}"
    } else {
        "{\"play\": \"IN.wav\" (optional), \"record\": \"OUT.wav\" (optional)}"
    };
    let request: CallRequest = serde_json::from_slice(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("expected {expected}: {e}")))?;
    if request.to.is_some() != with_target {
        let what = if with_target {
            "\"to\" is required"
        } else {
            "\"to\" does not belong in an answer"
        };
        return Err((
            StatusCode::BAD_REQUEST,
            format!("{what}; expected {expected}"),
        ));
    }
    Ok(request)
}

/// Loads the WAV to play and creates the one to record (off the engine task: the
/// reader resamples). A clear 400 if either fails.
async fn call_media(request: &CallRequest) -> Result<MediaFiles, Response> {
    let (play, record) = (request.play.clone(), request.record.clone());
    let loaded = tokio::task::spawn_blocking(move || -> Result<MediaFiles, String> {
        let play = match play {
            Some(p) => Some(Playback::load(&p).map_err(|e| format!("cannot play: {e}"))?),
            None => None,
        };
        let record = match record {
            Some(p) => Some(Recorder::create(&p).map_err(|e| format!("cannot record: {e}"))?),
            None => None,
        };
        Ok(MediaFiles { play, record })
    })
    .await;
    match loaded {
        Ok(Ok(media)) => Ok(media),
        Ok(Err(e)) => Err(error(StatusCode::BAD_REQUEST, e)),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("loading the audio files failed: {e}"),
        )),
    }
}

/// A call id from the path.
fn call_id(id: &str) -> Result<CallId, String> {
    id.trim()
        .parse::<u64>()
        .map(CallId)
        .map_err(|_| format!("{id:?} is not a call id (a number, as POST /v1/calls answers)"))
}

/// The answer to a call command: 204, 404 unknown, 409 wrong state.
fn call_result(answer: Option<Result<(), CallError>>) -> Response {
    match answer {
        None => engine_gone(),
        Some(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Some(Err(e @ CallError::UnknownCall(_))) => error(StatusCode::NOT_FOUND, e.to_string()),
        Some(Err(e @ CallError::State { .. })) => error(StatusCode::CONFLICT, e.to_string()),
        Some(Err(e @ CallError::Media(_))) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

async fn place_call(_: Authorized, State(state): State<Shared>, body: Bytes) -> Response {
    let request = match call_request(&body, true) {
        Ok(r) => r,
        Err((status, e)) => return error(status, e),
    };
    let shown = request.to.as_deref().unwrap_or("").trim().to_owned();
    let to = match parse_query(&shown) {
        Ok(Lookup::User(user)) => CallTarget::User(user),
        Ok(Lookup::Handle(handle)) => CallTarget::Handle(handle),
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if let (Some(me), CallTarget::User(user)) = (state.user_id, &to)
        && me == *user
    {
        return error(StatusCode::BAD_REQUEST, "this node cannot call itself");
    }
    if state.handle.as_ref().is_some_and(|h| shown == h.as_str()) {
        return error(StatusCode::BAD_REQUEST, "this node cannot call itself");
    }
    let media = match call_media(&request).await {
        Ok(m) => m,
        Err(response) => return response,
    };
    let answer = runtime::ask(
        &state.commands,
        |reply| Command::PlaceCall { to, media, reply },
        ENGINE_TIMEOUT,
    )
    .await;
    match answer {
        None => engine_gone(),
        Some(call) => {
            info!(%call, "admin: call placed");
            let mut response =
                (StatusCode::CREATED, axum::Json(PlacedBody { call: call.0 })).into_response();
            if let Ok(value) = HeaderValue::from_str(&format!("/v1/calls/{call}")) {
                response.headers_mut().insert(header::LOCATION, value);
            }
            response
        }
    }
}

async fn answer_call(
    _: Authorized,
    State(state): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let call = match call_id(&id) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let request = match call_request(&body, false) {
        Ok(r) => r,
        Err((status, e)) => return error(status, e),
    };
    let media = match call_media(&request).await {
        Ok(m) => m,
        Err(response) => return response,
    };
    let answer = runtime::ask(
        &state.commands,
        |reply| Command::AnswerCall { call, media, reply },
        ENGINE_TIMEOUT,
    )
    .await;
    if !matches!(answer, Some(Ok(()))) {
        // The engine refused: the recording it would have made is not wanted.
        if let Some(path) = &request.record {
            let _ = std::fs::remove_file(path);
        }
    }
    call_result(answer)
}

async fn reject_call(
    _: Authorized,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    call_command(&state, &id, |call, reply| Command::RejectCall {
        call,
        reply,
    })
    .await
}

async fn hangup_call(
    _: Authorized,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    call_command(&state, &id, |call, reply| Command::HangupCall {
        call,
        reply,
    })
    .await
}

/// Parses the call id of the path, asks the engine `make(call)`, and answers with
/// its result.
async fn call_command(
    state: &Shared,
    id: &str,
    make: impl FnOnce(CallId, oneshot::Sender<Result<(), CallError>>) -> Command,
) -> Response {
    let call = match call_id(id) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    call_result(runtime::ask(&state.commands, |reply| make(call, reply), ENGINE_TIMEOUT).await)
}

async fn list_calls(_: Authorized, State(state): State<Shared>) -> Response {
    match runtime::ask(&state.commands, Command::Calls, ENGINE_TIMEOUT).await {
        Some(calls) => axum::Json(CallsBody { calls }).into_response(),
        None => engine_gone(),
    }
}

async fn get_call(_: Authorized, State(state): State<Shared>, Path(id): Path<String>) -> Response {
    let call = match call_id(&id) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let answer = runtime::ask(
        &state.commands,
        |reply| Command::GetCall { call, reply },
        ENGINE_TIMEOUT,
    )
    .await;
    match answer {
        None => engine_gone(),
        Some(None) => error(
            StatusCode::NOT_FOUND,
            format!("no call {call} (ended calls are kept for a minute)"),
        ),
        Some(Some(body)) => axum::Json(body).into_response(),
    }
}

/// Query of `/v1/webrtc/offer`.
#[cfg(feature = "webrtc")]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OfferQuery {
    /// `1` or `true`: an echo session (a diagnostic: the browser hears itself).
    echo: Option<String>,
    /// The call whose audio the browser joins (`POST /v1/calls` gave its id).
    call: Option<String>,
}

#[cfg(feature = "webrtc")]
async fn webrtc_offer(
    _: Authorized,
    State(state): State<Shared>,
    query: Result<axum::extract::Query<OfferQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Response {
    use peercall_gateway::MAX_SDP_LEN;

    let query = match query {
        Ok(q) => q.0,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad query: {e}")),
    };
    let echo = matches!(query.echo.as_deref(), Some("1" | "true"));
    let call = match (echo, query.call.as_deref()) {
        (true, None) => None,
        (false, Some(call)) => match call.parse::<u64>() {
            Ok(id) => Some(peercall_engine::CallId(id)),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("bad call id {call:?}: a call id is a number"),
                );
            }
        },
        (true, Some(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "give either ?call=ID or ?echo=1, not both",
            );
        }
        (false, None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "name the call whose audio the browser joins, ?call=ID, or ask for the \
                 echo diagnostic with ?echo=1",
            );
        }
    };
    if body.len() > MAX_SDP_LEN {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("SDP offer larger than {MAX_SDP_LEN} bytes"),
        );
    }
    let Ok(sdp) = String::from_utf8(body.to_vec()) else {
        return error(StatusCode::BAD_REQUEST, "the SDP offer is not UTF-8 text");
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if !runtime::send(&state.commands, Command::WebRtcOffer { call, sdp, reply }).await {
        return engine_gone();
    }
    match tokio::time::timeout(ENGINE_TIMEOUT, answer).await {
        Ok(Ok(result)) => offer_response(result, call),
        _ => engine_gone(),
    }
}

/// The admin API's answer to a browser offer the engine task answered with
/// `result` (`None`: no gateway).
#[cfg(feature = "webrtc")]
fn offer_response(
    result: Option<Result<peercall_gateway::Accepted, crate::webrtc::OfferError>>,
    call: Option<peercall_engine::CallId>,
) -> Response {
    use crate::webrtc::OfferError;
    use peercall_gateway::GatewayError;

    let Some(result) = result else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node runs no WebRTC gateway",
        );
    };
    let accepted = match result {
        Ok(a) => a,
        Err(e) => {
            let status = match &e {
                OfferError::UnknownCall(_) => StatusCode::NOT_FOUND,
                OfferError::Ended(_) | OfferError::Call(_) => StatusCode::CONFLICT,
                OfferError::Gateway(GatewayError::CallTaken { .. }) => StatusCode::CONFLICT,
                OfferError::Gateway(GatewayError::TooManySessions(_)) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                OfferError::Gateway(GatewayError::SdpTooLarge { .. }) => {
                    StatusCode::PAYLOAD_TOO_LARGE
                }
                OfferError::Gateway(_) => StatusCode::BAD_REQUEST,
            };
            return error(status, e.to_string());
        }
    };
    match call {
        Some(call) => info!(session = %accepted.session, %call, "admin: WebRTC call session"),
        None => info!(session = %accepted.session, "admin: WebRTC echo session"),
    }
    #[derive(Serialize)]
    struct Created {
        session: u64,
        answer: String,
        echo: bool,
        call: Option<u64>,
    }
    let location = format!("/v1/webrtc/sessions/{}", accepted.session);
    let mut response = (
        StatusCode::CREATED,
        axum::Json(Created {
            session: accepted.session.0,
            answer: accepted.answer,
            echo: call.is_none(),
            call: call.map(|c| c.0),
        }),
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

#[cfg(feature = "webrtc")]
async fn webrtc_close(
    _: Authorized,
    State(state): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return error(StatusCode::BAD_REQUEST, format!("bad session id {id:?}"));
    };
    let session = peercall_gateway::SessionId(id);
    let (reply, closed) = tokio::sync::oneshot::channel();
    if !runtime::send(&state.commands, Command::WebRtcClose { session, reply }).await {
        return engine_gone();
    }
    match tokio::time::timeout(ENGINE_TIMEOUT, closed).await {
        Ok(Ok(true)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Ok(false)) => error(StatusCode::NOT_FOUND, format!("no browser session {id}")),
        _ => engine_gone(),
    }
}

#[cfg(feature = "webrtc")]
async fn webrtc_echo_page() -> Response {
    page::echo().await
}

#[cfg(not(feature = "webrtc"))]
fn webrtc_missing() -> Response {
    error(
        StatusCode::NOT_IMPLEMENTED,
        "this peercall was built without the `webrtc` cargo feature",
    )
}

#[cfg(not(feature = "webrtc"))]
async fn webrtc_offer() -> Response {
    webrtc_missing()
}

#[cfg(not(feature = "webrtc"))]
async fn webrtc_close() -> Response {
    webrtc_missing()
}

#[cfg(not(feature = "webrtc"))]
async fn webrtc_echo_page() -> Response {
    webrtc_missing()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    #[test]
    fn tokens_are_random_hex_and_compare_exactly() {
        let a = AdminToken::generate(&mut OsRng);
        let b = AdminToken::generate(&mut OsRng);
        assert_eq!(a.as_str().len(), 2 * TOKEN_BYTES);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.as_str(), b.as_str());
        assert!(a.matches(a.as_str()));
        assert!(!a.matches(b.as_str()));
        assert!(!a.matches(""));
        assert!(!a.matches(&a.as_str()[1..]));
        assert!(!format!("{a:?}").contains(a.as_str()));
    }

    #[test]
    fn only_same_origin_requests_and_page_navigations_pass() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:7601"));
            for (name, value) in pairs {
                h.insert(*name, HeaderValue::from_str(value).unwrap());
            }
            h
        };
        let get = Method::GET;
        let post = Method::POST;
        // Local tools send neither header; the page's fetches are same-origin.
        assert_eq!(cross_origin(&get, "/v1/contacts", &headers(&[])), None);
        for ok in [
            vec![("origin", "http://127.0.0.1:7601")],
            vec![("sec-fetch-site", "same-origin")],
            vec![("sec-fetch-site", "none")],
        ] {
            assert_eq!(
                cross_origin(&post, "/v1/calls", &headers(&ok)),
                None,
                "{ok:?}"
            );
        }
        for bad in [
            vec![("origin", "http://evil.example")],
            vec![("origin", "https://127.0.0.1:7601")],
            vec![("origin", "http://127.0.0.1:7602")],
            vec![("origin", "http://127.0.0.1:7601.evil.example")],
            vec![("origin", "null")],
            vec![("sec-fetch-site", "cross-site")],
            vec![("sec-fetch-site", "same-site")],
            vec![("sec-fetch-site", "something-new")],
        ] {
            assert!(
                cross_origin(&post, "/v1/calls", &headers(&bad)).is_some(),
                "{bad:?}"
            );
        }
        // A link from elsewhere opens the pages, and nothing else.
        let nav = [
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "navigate"),
            ("sec-fetch-dest", "document"),
        ];
        assert_eq!(cross_origin(&get, "/", &headers(&nav)), None);
        assert_eq!(cross_origin(&get, "/webrtc/echo", &headers(&nav)), None);
        assert!(cross_origin(&get, "/status", &headers(&nav)).is_some());
        assert!(cross_origin(&post, "/", &headers(&nav)).is_some());
        let framed = [
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "navigate"),
            ("sec-fetch-dest", "iframe"),
        ];
        assert!(cross_origin(&get, "/", &headers(&framed)).is_some());
    }

    #[test]
    fn only_loopback_hosts_pass() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:7601",
            "localhost",
            "LOCALHOST:1",
            "[::1]:7601",
            "[::1]",
            "127.1.2.3:9",
        ] {
            assert!(host_is_loopback(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:7601",
            "10.0.0.1:7601",
            "[::2]:1",
            "[::1",
            "",
            "localhost.evil.example",
        ] {
            assert!(!host_is_loopback(bad), "{bad}");
        }
    }
}
