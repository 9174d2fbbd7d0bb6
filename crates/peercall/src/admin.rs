//! The HTTP admin API, on loopback only.
//!
//! | method | path | auth | does |
//! |---|---|---|---|
//! | GET | `/healthz` | open | `ok` if the engine task answers, 503 otherwise |
//! | GET | `/status` | open | JSON: ids, role, sessions, uptime |
//! | GET | `/metrics` | open | Prometheus text format |
//! | POST | `/v1/connect` | bearer | `{"peer": "PEERKEY@HOST:PORT" or "HOST:PORT"}`: start a session |
//! | POST | `/v1/shutdown` | bearer | graceful shutdown, as on SIGTERM |
//! | POST | `/v1/webrtc/offer?echo=1` | bearer | body: a browser's SDP offer; answers `{"session", "answer"}` (201) with an echo session (feature `webrtc`) |
//! | DELETE | `/v1/webrtc/sessions/{id}` | bearer | closes a browser session (feature `webrtc`) |
//! | GET | `/webrtc/echo` | open | the echo test page (feature `webrtc`); the token goes in the page, or in its URL fragment `#token=` |
//!
//! Without the `webrtc` feature the WebRTC paths answer 501.
//!
//! Reading is open to local processes; anything that changes state needs
//! `Authorization: Bearer <token>`, the token being the contents of `admin.token` in
//! the data directory (mode 0600, so only the node's user can read it). Every request
//! must carry a loopback `Host` header, which defeats DNS-rebinding attacks from web
//! pages in a local browser.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::info;

use crate::clock::Clock;
use crate::contact::PeerSpec;
use crate::logging::short_key;
use crate::metrics::Metrics;
use crate::runtime::{self, Command, Snapshot};

/// Random bytes in an admin token: 256 bits, beyond guessing.
const TOKEN_BYTES: usize = 32;
/// How long a request waits for the engine task before answering 503. The engine
/// answers within one loop turn; seconds of silence mean it is stuck.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request body accepted (a connect request is under 200 bytes).
const MAX_BODY: usize = 4096;

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
}

type Shared = Arc<AdminState>;

/// The admin routes.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/connect", post(connect))
        .route("/v1/shutdown", post(shutdown))
        .route("/v1/webrtc/offer", post(webrtc_offer))
        .route("/v1/webrtc/sessions/{id}", delete(webrtc_close))
        .route("/webrtc/echo", get(webrtc_echo_page))
        .layer(middleware::from_fn(loopback_host))
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

/// Proof that the request carried the bearer token.
struct Authorized;

impl FromRequestParts<Shared> for Authorized {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Response> {
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        if presented.is_some_and(|t| state.token.matches(t)) {
            return Ok(Authorized);
        }
        state.metrics.admin_unauthorized.inc();
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "this request needs Authorization: Bearer <contents of admin.token in the data directory>",
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"peercall\""),
        );
        Err(response)
    }
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

fn status_body(snap: &Snapshot, udp: SocketAddr) -> StatusBody {
    let status = &snap.status;
    StatusBody {
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
        Some(snap) => axum::Json(status_body(&snap, state.udp_local)).into_response(),
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
    let text = state.metrics.render(&snap.stats, state.clock.uptime());
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response()
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

/// Query of `/v1/webrtc/offer`.
#[cfg(feature = "webrtc")]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OfferQuery {
    /// `1` or `true`: an echo session (the only kind until calls exist).
    echo: Option<String>,
}

#[cfg(feature = "webrtc")]
async fn webrtc_offer(
    _: Authorized,
    State(state): State<Shared>,
    query: Result<axum::extract::Query<OfferQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Response {
    use peercall_gateway::{GatewayError, MAX_SDP_LEN};

    let query = match query {
        Ok(q) => q.0,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad query: {e}")),
    };
    if !matches!(query.echo.as_deref(), Some("1" | "true")) {
        return error(
            StatusCode::BAD_REQUEST,
            "a browser session joins a call, and this node has no calls yet: \
             POST with ?echo=1 for the echo diagnostic",
        );
    }
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
    if !runtime::send(&state.commands, Command::WebRtcEchoOffer { sdp, reply }).await {
        return engine_gone();
    }
    let accepted = match tokio::time::timeout(ENGINE_TIMEOUT, answer).await {
        Ok(Ok(Some(result))) => result,
        Ok(Ok(None)) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "this node runs no WebRTC gateway",
            );
        }
        _ => return engine_gone(),
    };
    let accepted = match accepted {
        Ok(a) => a,
        Err(e) => {
            let status = match e {
                GatewayError::CallTaken { .. } => StatusCode::CONFLICT,
                GatewayError::TooManySessions(_) => StatusCode::SERVICE_UNAVAILABLE,
                GatewayError::SdpTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            return error(status, e.to_string());
        }
    };
    info!(session = %accepted.session, "admin: WebRTC echo session");
    #[derive(Serialize)]
    struct Created {
        session: u64,
        answer: String,
        echo: bool,
    }
    let location = format!("/v1/webrtc/sessions/{}", accepted.session);
    let mut response = (
        StatusCode::CREATED,
        axum::Json(Created {
            session: accepted.session.0,
            answer: accepted.answer,
            echo: true,
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
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; media-src 'self' blob: mediastream:",
            ),
        ],
        crate::webrtc::ECHO_PAGE,
    )
        .into_response()
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
