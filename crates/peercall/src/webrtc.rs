//! The WebRTC gateway inside the daemon (cargo feature `webrtc`).
//!
//! The engine task owns a [`WebRtc`] next to the node and offers it every datagram
//! first: what the gateway takes (STUN for one of its ICE ufrags, DTLS and SRTP
//! from browsers it has validated) never reaches the engine; everything else does,
//! unchanged. The admin API hands it SDP offers.
//!
//! Until calls exist there is one use, a diagnostic: an **echo session**
//! (`POST /v1/webrtc/offer?echo=1`, or the page at `/webrtc/echo`) sends every Opus
//! packet the browser sends straight back to it, so a person (or a test) hears
//! their own microphone through the node: browser, ICE, DTLS, SRTP and the shared
//! port all work.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;

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

    /// Closes a session; false if there was none.
    pub fn close(&mut self, session: SessionId) -> bool {
        self.echo.remove(&session);
        self.gateway.close(session)
    }

    /// Closes every session (at shutdown): browsers are told.
    pub fn close_all(&mut self) {
        let sessions: Vec<SessionId> = self.echo.iter().copied().collect();
        for session in sessions {
            self.close(session);
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

    /// Acts on every pending gateway event: echo sessions send their audio back.
    pub fn handle_events(&mut self, now: Time, metrics: &WebRtcMetrics) {
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
                    if self.echo.contains(&id)
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
                }
            }
        }
    }

    /// The gateway's counters.
    pub fn stats(&self) -> Stats {
        self.gateway.stats()
    }
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

    /// Counts a session that ended on its own.
    pub fn disconnected(&self, reason: &'static str) {
        self.disconnects.with_label_values(&[reason]).inc();
    }
}

/// The diagnostic page served at `/webrtc/echo`.
pub const ECHO_PAGE: &str = include_str!("webrtc/echo.html");

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
