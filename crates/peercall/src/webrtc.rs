//! The WebRTC gateway inside the daemon (cargo feature `webrtc`).
//!
//! The engine task owns a [`WebRtc`] next to the node and offers it every datagram
//! first: what the gateway takes (STUN for one of its ICE ufrags, DTLS and SRTP
//! from browsers it has validated) never reaches the engine; everything else does,
//! unchanged. The admin API hands it SDP offers.
//!
//! A **call session** (`POST /v1/webrtc/offer?call=ID`, what the call page does)
//! carries a call's audio: the call passes Opus through
//! ([`Node::set_opus_passthrough`]), so every Opus packet the browser sends goes
//! into the call as it is ([`Node::push_opus`]) and every fresh frame the call
//! receives goes to the browser ([`peercall_engine::Event::CallOpus`]); nothing is
//! decoded or re-encoded on the way (the node still decodes a copy for the call's
//! statistics). The browser's own jitter buffer, FEC decoding and concealment play
//! it out. A call has at most one browser; when the browser goes away (tab closed,
//! network gone) or its session is deleted, the call is hung up, so the other side
//! ends cleanly; when the call ends, its browser session is closed.
//!
//! An **echo session** (`POST /v1/webrtc/offer?echo=1`, or the page at
//! `/webrtc/echo`) is a diagnostic: it sends every Opus packet the browser sends
//! straight back to it, so a person (or a test) hears their own microphone through
//! the node: browser, ICE, DTLS, SRTP and the shared port all work.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;

use peercall_engine::{CallId, CallState, Node};
use peercall_gateway::{
    Accepted, CallKey, DisconnectReason, Gateway, GatewayConfig, GatewayError, GatewayEvent,
    SessionId, Stats, Transmit,
};
use peercall_wire::Time;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tracing::{debug, info, warn};

use crate::clock::Clock;

/// Echo sessions take call keys from the top half of the range, which the engine's
/// calls will never reach, so the two can never collide.
const ECHO_CALL_BASE: u64 = 1 << 63;

/// The gateway and what the daemon adds to it.
pub struct WebRtc {
    gateway: Gateway,
    /// The address browsers are told to send to.
    candidate: SocketAddr,
    /// Sessions whose audio goes straight back.
    echo: HashSet<SessionId>,
    /// Sessions carrying a call's audio.
    calls: HashMap<SessionId, CallId>,
    next_echo_call: u64,
}

impl std::fmt::Debug for WebRtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebRtc")
            .field("candidate", &self.candidate)
            .field("gateway", &self.gateway)
            .finish_non_exhaustive()
    }
}

/// The ICE candidate for a node bound to `udp`: that address, or loopback when it
/// is bound to all interfaces. The admin API (and so the page) is loopback-only,
/// so the browser runs on this machine and reaches the node over loopback.
pub fn candidate_for(udp: SocketAddr) -> SocketAddr {
    let ip = match udp.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, udp.port())
}

impl WebRtc {
    /// A gateway for the node bound to `udp`, starting now.
    pub fn new(udp: SocketAddr, clock: &Clock, rng_seed: [u8; 32]) -> Result<WebRtc, GatewayError> {
        let now = clock.now();
        // The instant of `now` on the clock's own monotonic scale; `now` is never
        // beyond what `Instant` can hold.
        let base = clock
            .instant_at(now)
            .expect("the current time is a representable instant");
        let gateway = Gateway::new(GatewayConfig::new(rng_seed), now, base)?;
        Ok(WebRtc {
            gateway,
            candidate: candidate_for(udp),
            echo: HashSet::new(),
            calls: HashMap::new(),
            next_echo_call: ECHO_CALL_BASE,
        })
    }

    /// Answers `sdp` with an echo session.
    pub fn offer_echo(&mut self, now: Time, sdp: &str) -> Result<Accepted, GatewayError> {
        let call = CallKey(self.next_echo_call);
        let accepted = self.gateway.accept_offer(now, call, sdp, self.candidate)?;
        self.next_echo_call += 1;
        self.echo.insert(accepted.session);
        info!(session = %accepted.session, "webrtc: echo session offered");
        Ok(accepted)
    }

    /// Answers `sdp` with a session carrying call `call`'s audio, which must be
    /// live (ringing, incoming or connected) and have no browser yet; the call
    /// passes Opus through from now on.
    pub fn offer_call(
        &mut self,
        now: Time,
        node: &mut Node,
        call: CallId,
        sdp: &str,
    ) -> Result<Accepted, OfferError> {
        match node.call_stats(now, call) {
            None => return Err(OfferError::UnknownCall(call)),
            Some(s) if s.state == CallState::Ended => return Err(OfferError::Ended(call)),
            Some(_) => {}
        }
        let accepted = self
            .gateway
            .accept_offer(now, CallKey(call.0), sdp, self.candidate)?;
        if let Err(e) = node.set_opus_passthrough(call, true) {
            // Live a moment ago and nothing ran since: not expected; undo the session.
            self.gateway.close(accepted.session);
            return Err(OfferError::Call(e.to_string()));
        }
        self.calls.insert(accepted.session, call);
        info!(session = %accepted.session, %call, "webrtc: browser joins the call");
        Ok(accepted)
    }

    /// Closes a session; false if there was none. A call it carried is hung up.
    pub fn close(&mut self, now: Time, node: &mut Node, session: SessionId) -> bool {
        self.echo.remove(&session);
        if let Some(call) = self.calls.remove(&session) {
            hang_up(now, node, call, "its browser session was closed");
        }
        self.gateway.close(session)
    }

    /// Closes every session (at shutdown): browsers are told.
    pub fn close_all(&mut self) {
        let sessions: Vec<SessionId> = self.echo.iter().chain(self.calls.keys()).copied().collect();
        self.echo.clear();
        self.calls.clear();
        for session in sessions {
            self.gateway.close(session);
        }
    }

    /// Hands a received Opus packet of `call` to its browser, if it has one.
    pub fn forward_to_browser(&mut self, now: Time, call: CallId, timestamp: u32, opus: &[u8]) {
        if let Some(session) = self.gateway.session_of(CallKey(call.0))
            && let Err(e) = self.gateway.send_audio(session, now, timestamp, opus)
        {
            debug!(%session, %call, error = %e, "webrtc: audio to the browser failed");
        }
    }

    /// Call `call` ended: its browser session, if any, is closed (the browser is
    /// told).
    pub fn call_ended(&mut self, call: CallId) {
        if let Some(session) = self.gateway.session_of(CallKey(call.0)) {
            self.calls.remove(&session);
            self.gateway.close(session);
            info!(%session, %call, "webrtc: call over, browser session closed");
        }
    }

    /// Offers a received datagram to the gateway; true if it took it.
    pub fn handle_datagram(&mut self, now: Time, from: SocketAddr, datagram: &[u8]) -> bool {
        self.gateway.handle_datagram(now, from, datagram)
    }

    /// Runs the gateway's timers due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        if self.gateway.poll_timeout().is_some_and(|t| t <= now) {
            self.gateway.handle_timeout(now);
        }
    }

    /// The gateway's next deadline.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.gateway.poll_timeout()
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.gateway.poll_transmit()
    }

    /// Acts on every pending gateway event: echo sessions send their audio back,
    /// call sessions feed their call. Returns whether the node was given anything
    /// (then it has transmits and events to drain).
    pub fn handle_events(&mut self, now: Time, metrics: &WebRtcMetrics, node: &mut Node) -> bool {
        let mut fed = false;
        while let Some(event) = self.gateway.poll_event() {
            match event {
                GatewayEvent::Connected(session) => {
                    info!(%session, "webrtc: browser connected");
                }
                GatewayEvent::AudioFrame {
                    id,
                    timestamp,
                    opus,
                    ..
                } => {
                    if let Some(&call) = self.calls.get(&id) {
                        fed = true;
                        if let Err(e) = node.push_opus(now, call, timestamp, &opus) {
                            metrics.refused_frame();
                            debug!(session = %id, %call, error = %e, "webrtc: browser frame refused");
                        }
                    } else if self.echo.contains(&id)
                        && let Err(e) = self.gateway.send_audio(id, now, timestamp, &opus)
                    {
                        debug!(session = %id, error = %e, "webrtc: echo failed");
                    }
                }
                GatewayEvent::Feedback { id, report } => {
                    debug!(
                        session = %id,
                        loss = report.loss_fraction,
                        jitter_ms = report.jitter.as_secs_f64() * 1e3,
                        lost = report.packets_lost,
                        "webrtc: browser receiver report"
                    );
                }
                GatewayEvent::Disconnected(session, reason) => {
                    self.echo.remove(&session);
                    metrics.disconnected(reason.as_str());
                    if reason == DisconnectReason::ClosedByBrowser {
                        info!(%session, "webrtc: the browser hung up");
                    } else {
                        warn!(%session, %reason, "webrtc: browser session ended");
                    }
                    if let Some(call) = self.calls.remove(&session) {
                        fed = true;
                        hang_up(now, node, call, "its browser went away");
                    }
                }
            }
        }
        fed
    }

    /// The gateway's counters.
    pub fn stats(&self) -> Stats {
        self.gateway.stats()
    }
}

/// Hangs up `call` (whatever its state) because its browser is gone.
fn hang_up(now: Time, node: &mut Node, call: CallId, why: &str) {
    match node.hangup(now, call) {
        Ok(()) => info!(%call, "webrtc: call hung up: {why}"),
        // Ended meanwhile: nothing to do.
        Err(e) => debug!(%call, error = %e, "webrtc: no call to hang up ({why})"),
    }
}

/// Why a browser cannot join a call.
#[derive(Debug, thiserror::Error)]
pub enum OfferError {
    /// The gateway refused the offer.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// No such call.
    #[error("no call {0}")]
    UnknownCall(CallId),
    /// The call is over.
    #[error("call {0} has ended")]
    Ended(CallId),
    /// The engine refused the call's pass-through.
    #[error("call refused pass-through: {0}")]
    Call(String),
}

/// The `peercall_webrtc_*` series.
#[derive(Debug)]
pub struct WebRtcMetrics {
    sessions: IntGauge,
    offers: IntCounterVec,
    datagrams_in: IntCounter,
    datagrams_out: IntCounter,
    bytes_in: IntCounter,
    bytes_out: IntCounter,
    dropped: IntCounter,
    frames: IntCounterVec,
    disconnects: IntCounterVec,
    refused_frames: IntCounter,
    /// Mirroring counters by difference must not interleave.
    mirror: Mutex<()>,
}

/// Every [`peercall_gateway::DisconnectReason`] label, exported from zero.
const DISCONNECT_REASONS: [&str; 4] = [
    "connect_timeout",
    "consent_lost",
    "closed_by_browser",
    "failed",
];

impl WebRtcMetrics {
    /// Registers the series, all at zero, in `registry`.
    pub fn new(registry: &Registry) -> Result<WebRtcMetrics, prometheus::Error> {
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let vec = |name: &str, help: &str, label: &str, values: &[&str]| {
            let v = IntCounterVec::new(Opts::new(name, help), &[label])?;
            for value in values {
                v.with_label_values(&[*value]);
            }
            registry.register(Box::new(v.clone()))?;
            Ok::<_, prometheus::Error>(v)
        };
        let sessions = IntGauge::new(
            "peercall_webrtc_sessions",
            "Browser sessions of the WebRTC gateway now.",
        )?;
        registry.register(Box::new(sessions.clone()))?;
        Ok(WebRtcMetrics {
            sessions,
            offers: vec(
                "peercall_webrtc_offers_total",
                "Browser SDP offers, by result (accepted, refused).",
                "result",
                &["accepted", "refused"],
            )?,
            datagrams_in: counter(
                "peercall_webrtc_datagrams_received_total",
                "UDP datagrams taken by the WebRTC gateway (STUN, DTLS, SRTP from browsers).",
            )?,
            datagrams_out: counter(
                "peercall_webrtc_datagrams_sent_total",
                "UDP datagrams the WebRTC gateway handed out to send.",
            )?,
            bytes_in: counter(
                "peercall_webrtc_received_bytes_total",
                "Bytes of UDP payload taken by the WebRTC gateway.",
            )?,
            bytes_out: counter(
                "peercall_webrtc_sent_bytes_total",
                "Bytes of UDP payload the WebRTC gateway handed out to send.",
            )?,
            dropped: counter(
                "peercall_webrtc_dropped_datagrams_total",
                "Datagrams the WebRTC gateway took but could not use.",
            )?,
            frames: vec(
                "peercall_webrtc_audio_frames_total",
                "Opus packets through the WebRTC gateway, by direction (from_browser, to_browser).",
                "direction",
                &["from_browser", "to_browser"],
            )?,
            disconnects: vec(
                "peercall_webrtc_disconnects_total",
                "Browser sessions that ended on their own, by reason.",
                "reason",
                &DISCONNECT_REASONS,
            )?,
            refused_frames: counter(
                "peercall_webrtc_refused_frames_total",
                "Opus packets from browsers a call refused (not 20 ms frames, malformed).",
            )?,
            mirror: Mutex::new(()),
        })
    }

    /// Mirrors the gateway's counters.
    pub fn mirror(&self, stats: &Stats) {
        let _guard = self.mirror.lock().unwrap_or_else(|e| e.into_inner());
        self.sessions
            .set(i64::try_from(stats.sessions).unwrap_or(i64::MAX));
        let pairs = [
            (
                &self.offers.with_label_values(&["accepted"]),
                stats.offers_accepted,
            ),
            (
                &self.offers.with_label_values(&["refused"]),
                stats.offers_refused,
            ),
            (&self.datagrams_in, stats.datagrams_in),
            (&self.datagrams_out, stats.datagrams_out),
            (&self.bytes_in, stats.bytes_in),
            (&self.bytes_out, stats.bytes_out),
            (&self.dropped, stats.datagrams_dropped),
            (
                &self.frames.with_label_values(&["from_browser"]),
                stats.frames_in,
            ),
            (
                &self.frames.with_label_values(&["to_browser"]),
                stats.frames_out,
            ),
        ];
        for (counter, value) in pairs {
            counter.inc_by(value.saturating_sub(counter.get()));
        }
    }

    /// Counts a browser frame its call refused.
    pub fn refused_frame(&self) {
        self.refused_frames.inc();
    }

    /// Counts a session that ended on its own.
    pub fn disconnected(&self, reason: &'static str) {
        self.disconnects.with_label_values(&[reason]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_concrete() {
        let c = |s: &str| candidate_for(s.parse().unwrap()).to_string();
        assert_eq!(c("0.0.0.0:7600"), "127.0.0.1:7600");
        assert_eq!(c("[::]:7600"), "[::1]:7600");
        assert_eq!(c("127.0.0.1:9"), "127.0.0.1:9");
        assert_eq!(c("192.0.2.4:9"), "192.0.2.4:9");
    }

    #[test]
    fn metrics_mirror_and_count_from_zero() {
        let registry = Registry::new();
        let m = WebRtcMetrics::new(&registry).unwrap();
        m.mirror(&Stats {
            sessions: 2,
            offers_accepted: 3,
            frames_in: 10,
            ..Stats::default()
        });
        m.disconnected("consent_lost");
        let mut out = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        for line in [
            "peercall_webrtc_sessions 2",
            "peercall_webrtc_offers_total{result=\"accepted\"} 3",
            "peercall_webrtc_offers_total{result=\"refused\"} 0",
            "peercall_webrtc_audio_frames_total{direction=\"from_browser\"} 10",
            "peercall_webrtc_disconnects_total{reason=\"consent_lost\"} 1",
            "peercall_webrtc_disconnects_total{reason=\"connect_timeout\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
