//! Prometheus metrics: the engine's [`Stats`] snapshot mapped onto `peercall_*`
//! series, plus the shell's own counters and process-level series.
//!
//! The engine counts; this module only mirrors its snapshot at scrape time (counters
//! advance by the difference since the last scrape, so they stay counters). Every
//! series has a help text, counters end in `_total`, and every drop reason is
//! exported from zero so rates work from the first scrape.

use std::sync::Mutex;
use std::time::Duration;

use peercall_engine::{DropReason, Stats};
use peercall_wire::Time;
use prometheus::{
    Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Reads one counter out of a stats snapshot.
type Getter = fn(&Stats) -> u64;

/// The engine's counters: metric name, help text, and where the value lives.
const ENGINE_COUNTERS: [(&str, &str, Getter); 9] = [
    (
        "peercall_datagrams_received_total",
        "UDP datagrams received and handed to the engine.",
        |s| s.datagrams_in,
    ),
    (
        "peercall_received_bytes_total",
        "Bytes of UDP payload received.",
        |s| s.bytes_in,
    ),
    (
        "peercall_datagrams_sent_total",
        "UDP datagrams the engine handed out to send.",
        |s| s.datagrams_out,
    ),
    (
        "peercall_sent_bytes_total",
        "Bytes of UDP payload the engine handed out to send.",
        |s| s.bytes_out,
    ),
    (
        "peercall_handshakes_initiated_total",
        "Noise handshakes this node started.",
        |s| s.handshakes_initiated,
    ),
    (
        "peercall_handshakes_completed_total",
        "Noise handshakes completed, as initiator or responder.",
        |s| s.handshakes_completed,
    ),
    (
        "peercall_cookie_replies_sent_total",
        "Cookie replies sent instead of handshake responses while under load.",
        |s| s.cookie_replies_sent,
    ),
    (
        "peercall_keepalives_sent_total",
        "Authenticated keepalives sent on idle sessions.",
        |s| s.keepalives_sent,
    ),
    (
        "peercall_keepalives_received_total",
        "Authenticated keepalives received.",
        |s| s.keepalives_received,
    ),
];

/// The node's metrics registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    engine_counters: Vec<(IntCounter, Getter)>,
    sessions: IntGauge,
    drops: IntCounterVec,
    uptime: Gauge,
    sessions_ended: IntCounterVec,
    /// Failed UDP sends (the engine counted them as sent; the OS refused).
    pub udp_send_errors: IntCounter,
    /// Failed UDP receives (e.g. ICMP errors reported on the socket).
    pub udp_receive_errors: IntCounter,
    /// Admin requests refused for a missing or wrong bearer token.
    pub admin_unauthorized: IntCounter,
    /// The WebRTC gateway's series.
    #[cfg(feature = "webrtc")]
    pub webrtc: crate::webrtc::WebRtcMetrics,
    /// Serialises scrapes: mirroring counters by difference must not interleave.
    scrape: Mutex<()>,
}

impl Metrics {
    /// A registry with every series at zero; `started` is the node's start time.
    pub fn new(started: Time) -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let engine_counters = ENGINE_COUNTERS
            .iter()
            .map(|(name, help, get)| Ok((counter(name, help)?, *get)))
            .collect::<Result<_, prometheus::Error>>()?;
        let sessions = IntGauge::new("peercall_sessions", "Noise sessions now established.")?;
        registry.register(Box::new(sessions.clone()))?;
        let drops = IntCounterVec::new(
            Opts::new(
                "peercall_dropped_datagrams_total",
                "Received datagrams dropped without effect, by reason.",
            ),
            &["reason"],
        )?;
        for reason in DropReason::ALL {
            drops.with_label_values(&[reason.label()]);
        }
        registry.register(Box::new(drops.clone()))?;
        let sessions_ended = IntCounterVec::new(
            Opts::new(
                "peercall_sessions_ended_total",
                "Established sessions that ended, by reason (closed_by_peer, timed_out, ...).",
            ),
            &["reason"],
        )?;
        for reason in SESSION_END_REASONS {
            sessions_ended.with_label_values(&[&session_end_label(reason)]);
        }
        registry.register(Box::new(sessions_ended.clone()))?;
        let uptime = Gauge::new("peercall_uptime_seconds", "Seconds since the node started.")?;
        registry.register(Box::new(uptime.clone()))?;
        let start_time = Gauge::new(
            "peercall_start_time_seconds",
            "Unix time at which the node started.",
        )?;
        // Microseconds to seconds for display; f64 is exact far beyond any real time.
        start_time.set(started.as_micros() as f64 / 1e6);
        registry.register(Box::new(start_time))?;
        let build = IntGaugeVec::new(
            Opts::new(
                "peercall_build_info",
                "Always 1; the labels describe the running peercall build.",
            ),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build))?;
        Ok(Metrics {
            #[cfg(feature = "webrtc")]
            webrtc: crate::webrtc::WebRtcMetrics::new(&registry)?,
            udp_send_errors: counter(
                "peercall_udp_send_errors_total",
                "UDP sends the operating system refused.",
            )?,
            udp_receive_errors: counter(
                "peercall_udp_receive_errors_total",
                "UDP receive calls that failed (such as ICMP errors reported on the socket).",
            )?,
            admin_unauthorized: counter(
                "peercall_admin_unauthorized_total",
                "Admin API requests refused for a missing or wrong bearer token.",
            )?,
            registry,
            engine_counters,
            sessions,
            drops,
            uptime,
            sessions_ended,
            scrape: Mutex::new(()),
        })
    }

    /// Counts a session that ended (an engine `Event::PeerDown`) under its reason.
    pub fn session_ended(&self, reason: &str) {
        self.sessions_ended
            .with_label_values(&[&session_end_label(reason)])
            .inc();
    }

    /// Mirrors `stats` and `uptime`, then renders the Prometheus text format.
    pub fn render(&self, stats: &Stats, uptime: Duration) -> String {
        // A poisoned lock only means another scrape panicked; the data is still fine.
        let _guard = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        for (counter, get) in &self.engine_counters {
            advance(counter, get(stats));
        }
        self.sessions
            .set(i64::try_from(stats.sessions).unwrap_or(i64::MAX));
        for reason in DropReason::ALL {
            advance(
                &self.drops.with_label_values(&[reason.label()]),
                stats.dropped(reason),
            );
        }
        self.uptime.set(uptime.as_secs_f64());
        let mut out = Vec::new();
        // Encoding our own well-formed families into a Vec cannot fail.
        if let Err(e) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "could not encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The engine's `Event::PeerDown` reasons known today, exported from zero so rates
/// work from the first scrape. A reason added later still gets its own series the
/// first time it happens (the engine's reasons are a fixed set of `&'static str`, so
/// the label's cardinality stays bounded).
const SESSION_END_REASONS: [&str; 2] = ["closed by peer", "timed out"];

/// A session-end reason as a metric label: lowercase ASCII letters and digits, any
/// other character as `_` ("closed by peer" becomes `closed_by_peer`).
fn session_end_label(reason: &str) -> String {
    reason
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Moves a mirrored counter up to `value` (never down: the engine's counters only
/// grow, and a counter that went down would read as a reset).
fn advance(counter: &IntCounter, value: u64) {
    counter.inc_by(value.saturating_sub(counter.get()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value_of(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn mirrors_stats_and_exports_every_drop_reason_from_zero() {
        let m = Metrics::new(Time::from_secs(1_700_000_000)).unwrap();
        let text = m.render(&Stats::default(), Duration::from_secs(3));
        for reason in DropReason::ALL {
            let series = format!(
                "peercall_dropped_datagrams_total{{reason=\"{}\"}}",
                reason.label()
            );
            assert_eq!(value_of(&text, &series), Some(0.0), "{series}");
        }
        assert_eq!(value_of(&text, "peercall_uptime_seconds"), Some(3.0));
        assert_eq!(value_of(&text, "peercall_start_time_seconds"), Some(1.7e9));
        assert!(text.contains("peercall_build_info{version=\""));

        let mut stats = Stats {
            datagrams_in: 7,
            bytes_in: 700,
            keepalives_sent: 2,
            sessions: 3,
            ..Stats::default()
        };
        stats.drops[DropReason::Replay as usize] = 4;
        let text = m.render(&stats, Duration::from_secs(4));
        assert_eq!(
            value_of(&text, "peercall_datagrams_received_total"),
            Some(7.0)
        );
        assert_eq!(
            value_of(&text, "peercall_received_bytes_total"),
            Some(700.0)
        );
        assert_eq!(value_of(&text, "peercall_keepalives_sent_total"), Some(2.0));
        assert_eq!(value_of(&text, "peercall_sessions"), Some(3.0));
        assert_eq!(
            value_of(&text, "peercall_dropped_datagrams_total{reason=\"replay\"}"),
            Some(4.0)
        );
        // A later snapshot moves the counters to the new totals, not by them.
        stats.datagrams_in = 9;
        stats.sessions = 1;
        let text = m.render(&stats, Duration::from_secs(5));
        assert_eq!(
            value_of(&text, "peercall_datagrams_received_total"),
            Some(9.0)
        );
        assert_eq!(value_of(&text, "peercall_sessions"), Some(1.0));
    }

    #[test]
    fn ended_sessions_are_counted_by_reason() {
        let m = Metrics::new(Time::ZERO).unwrap();
        let text = m.render(&Stats::default(), Duration::ZERO);
        for label in ["closed_by_peer", "timed_out"] {
            let series = format!("peercall_sessions_ended_total{{reason=\"{label}\"}}");
            assert_eq!(value_of(&text, &series), Some(0.0), "{series}");
        }
        m.session_ended("closed by peer");
        m.session_ended("closed by peer");
        m.session_ended("Odd-Reason 2");
        let text = m.render(&Stats::default(), Duration::ZERO);
        let value = |label: &str| {
            value_of(
                &text,
                &format!("peercall_sessions_ended_total{{reason=\"{label}\"}}"),
            )
        };
        assert_eq!(value("closed_by_peer"), Some(2.0));
        assert_eq!(value("timed_out"), Some(0.0));
        assert_eq!(value("odd_reason_2"), Some(1.0));
    }

    #[test]
    fn every_series_has_help_and_counters_are_typed_total() {
        let m = Metrics::new(Time::ZERO).unwrap();
        let text = m.render(&Stats::default(), Duration::ZERO);
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert!(families.len() >= 16, "{text}");
        for family in families {
            let (name, kind) = family.split_once(' ').unwrap();
            assert!(name.starts_with("peercall_"), "{name}");
            assert!(text.contains(&format!("# HELP {name} ")), "{name} has help");
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name} is {kind}"
            );
        }
    }
}
