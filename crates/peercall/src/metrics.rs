//! Prometheus metrics: the engine's [`Stats`] snapshot mapped onto `peercall_*`
//! series, plus the shell's own counters and process-level series.
//!
//! The engine counts; this module only mirrors its snapshot at scrape time (counters
//! advance by the difference since the last scrape, so they stay counters). Every
//! series has a help text, counters end in `_total`, and every drop reason is
//! exported from zero so rates work from the first scrape.

use std::sync::Mutex;
use std::time::Duration;

use peercall_engine::{
    CallState, CallStats, DropReason, EndReason, PathKind, RelayDrop, SETUP_BUCKETS_MS, Stats,
    kind_index,
};
use peercall_wire::Time;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, Histogram, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
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

/// The engine's and the overlay's other counters, mirrored the same way.
const MORE_COUNTERS: [(&str, &str, Getter); 30] = [
    (
        "peercall_stun_answered_total",
        "STUN Binding requests answered on the shared UDP port.",
        |s| s.stun_answered,
    ),
    (
        "peercall_control_frames_received_total",
        "Overlay control frames received on sessions.",
        |s| s.control_in,
    ),
    (
        "peercall_control_frames_sent_total",
        "Overlay control frames sent on sessions.",
        |s| s.control_out,
    ),
    (
        "peercall_control_frames_dropped_total",
        "Overlay messages dropped before sending: queue full while dialing, or the peer unreachable.",
        |s| s.control_dropped,
    ),
    (
        "peercall_dials_failed_total",
        "Sessions opened on demand for overlay messages that could not be set up.",
        |s| s.dials_failed,
    ),
    (
        "peercall_sessions_reaped_total",
        "Idle sessions this node closed.",
        |s| s.sessions_reaped,
    ),
    (
        "peercall_overlay_messages_received_total",
        "Overlay messages received.",
        |s| s.overlay.msgs_in,
    ),
    (
        "peercall_overlay_received_bytes_total",
        "Bytes of overlay messages received.",
        |s| s.overlay.bytes_in,
    ),
    (
        "peercall_overlay_messages_sent_total",
        "Overlay messages sent.",
        |s| s.overlay.msgs_out,
    ),
    (
        "peercall_overlay_sent_bytes_total",
        "Bytes of overlay messages sent.",
        |s| s.overlay.bytes_out,
    ),
    (
        "peercall_overlay_rate_limited_total",
        "Client requests (lookups, publishes, subscriptions) shed by a per-client rate limit.",
        |s| s.overlay.rate_limited,
    ),
    (
        "peercall_overlay_rehomes_total",
        "Attaches this node started to move to a supernode nearer than its farthest home.",
        |s| s.overlay.rehomes,
    ),
    (
        "peercall_overlay_attach_attempts_total",
        "Attach requests this node sent to supernodes.",
        |s| s.overlay.attach_attempts,
    ),
    (
        "peercall_overlay_homes_lost_total",
        "Home supernodes lost: died, left or went silent.",
        |s| s.overlay.homes_lost,
    ),
    (
        "peercall_overlay_lookups_total",
        "Directory lookups this node started.",
        |s| s.overlay.lookups,
    ),
    (
        "peercall_overlay_fetches_total",
        "Directory reads this home supernode sent to storers.",
        |s| s.overlay.fetches,
    ),
    (
        "peercall_overlay_read_repairs_total",
        "Records pushed to stale storers after a read.",
        |s| s.overlay.read_repairs,
    ),
    (
        "peercall_overlay_replicated_records_total",
        "Records pushed to new storers after a membership change or hand-off.",
        |s| s.overlay.replicated,
    ),
    (
        "peercall_overlay_expired_records_total",
        "Directory records expired from this supernode's share.",
        |s| s.overlay.expired,
    ),
    (
        "peercall_overlay_presence_events_total",
        "Presence changes of contacts reported to this node.",
        |s| s.overlay.presence_events,
    ),
    (
        "peercall_overlay_presence_pushes_total",
        "Presence notifications this supernode pushed to subscribers.",
        |s| s.overlay.presence_pushes,
    ),
    (
        "peercall_overlay_publishes_total",
        "Directory records this node signed and published.",
        |s| s.overlay.publishes,
    ),
    (
        "peercall_overlay_promotions_total",
        "Promotions this node decided as the election's coordinator.",
        |s| s.overlay.promotions,
    ),
    (
        "peercall_overlay_demotions_total",
        "Demotions this node decided as the election's coordinator.",
        |s| s.overlay.demotions,
    ),
    (
        "peercall_overlay_stun_requests_total",
        "STUN Binding requests this node sent to learn its reflexive address.",
        |s| s.overlay.stun_requests,
    ),
    (
        "peercall_swim_probes_total",
        "SWIM probes this supernode sent.",
        |s| s.overlay.swim.probes,
    ),
    (
        "peercall_swim_indirect_probes_total",
        "SWIM indirect probe requests this supernode sent.",
        |s| s.overlay.swim.indirect_probes,
    ),
    (
        "peercall_swim_suspicions_total",
        "Supernodes this supernode declared suspect.",
        |s| s.overlay.swim.suspicions,
    ),
    (
        "peercall_swim_refutations_total",
        "Suspicions of this supernode that it refuted.",
        |s| s.overlay.swim.refutations,
    ),
    (
        "peercall_swim_deaths_total",
        "Supernodes this supernode declared dead.",
        |s| s.overlay.swim.deaths,
    ),
];

/// A counter family with one fixed label: name, help, label name, and each label
/// value with where its count lives. Every value is exported from zero.
type Labeled = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, Getter)],
);

/// The labeled counters.
const LABELED_COUNTERS: [Labeled; 5] = [
    (
        "peercall_overlay_dropped_messages_total",
        "Overlay messages dropped without effect: malformed (or oversize, or another version), or unexpected in this state or from that sender.",
        "reason",
        &[
            ("malformed", |s| s.overlay.dropped_malformed),
            ("unexpected", |s| s.overlay.dropped_unexpected),
        ],
    ),
    (
        "peercall_overlay_refused_records_total",
        "Directory records refused: forged (bad signature, wrong key, not what was asked), stale (not newer, or expired), or claiming a handle another live user holds.",
        "reason",
        &[
            ("forged", |s| s.overlay.forged_records),
            ("stale", |s| s.overlay.stale_records),
            ("handle_conflict", |s| s.overlay.handle_conflicts),
        ],
    ),
    (
        "peercall_overlay_attaches_total",
        "Attach requests this supernode answered, by result (redirected: admission full or rate-limited).",
        "result",
        &[
            ("admitted", |s| s.overlay.attaches_admitted),
            ("redirected", |s| s.overlay.attaches_redirected),
        ],
    ),
    (
        "peercall_overlay_lookups_completed_total",
        "Directory lookups this node started that finished, by result (failed: timed out or not attached).",
        "result",
        &[
            ("found", |s| s.overlay.lookups_found),
            ("not_found", |s| s.overlay.lookups_not_found),
            ("failed", |s| s.overlay.lookups_failed),
        ],
    ),
    (
        "peercall_overlay_dialbacks_total",
        "Promotion candidates dialed back, by result.",
        "result",
        &[
            ("ok", |s| s.overlay.dialbacks_ok),
            ("failed", |s| s.overlay.dialbacks_failed),
        ],
    ),
];

/// The overlay's gauges: name, help, value.
const OVERLAY_GAUGES: [(&str, &str, Getter); 8] = [
    (
        "peercall_overlay_supernode",
        "1 if this node is a supernode now, else 0.",
        |s| u64::from(s.overlay.supernode),
    ),
    (
        "peercall_overlay_homes",
        "Home supernodes this node is attached to.",
        |s| s.overlay.homes,
    ),
    (
        "peercall_overlay_clients",
        "Nodes attached to this supernode.",
        |s| s.overlay.clients,
    ),
    (
        "peercall_overlay_capacity_clients",
        "Most clients this supernode admits (0 while not a supernode).",
        |s| s.overlay.capacity,
    ),
    (
        "peercall_overlay_members",
        "Live supernodes this supernode knows, itself included.",
        |s| s.overlay.members,
    ),
    (
        "peercall_overlay_records",
        "Directory records this supernode stores (its directory share).",
        |s| s.overlay.records,
    ),
    (
        "peercall_overlay_record_bytes",
        "Bytes of signed directory records this supernode stores.",
        |s| s.overlay.record_bytes,
    ),
    (
        "peercall_overlay_store_overhead_bytes",
        "Bytes the directory store spends beyond the records themselves.",
        |s| s.overlay.store_overhead_bytes,
    ),
];

/// Call and relay counters: name, help, value.
const CALL_COUNTERS: [(&str, &str, Getter); 15] = [
    (
        "peercall_calls_placed_total",
        "Calls this node placed.",
        |s| s.calls.outgoing,
    ),
    (
        "peercall_calls_received_total",
        "Calls this node received (invitations that created a call).",
        |s| s.calls.incoming,
    ),
    (
        "peercall_call_path_switches_total",
        "Active path changes in calls.",
        |s| s.calls.path_switches,
    ),
    (
        "peercall_call_frames_concealed_total",
        "20 ms audio frames concealed (lost or late) in calls.",
        |s| s.calls.frames_concealed,
    ),
    (
        "peercall_call_busy_rejected_total",
        "Invitations answered busy (the node was in as many calls as allowed).",
        |s| s.calls.busy_rejected,
    ),
    (
        "peercall_call_forged_invites_total",
        "Invitations whose caller record did not verify or did not match the session: dropped.",
        |s| s.calls.forged_invites,
    ),
    (
        "peercall_call_bad_messages_total",
        "Call messages that did not decode, or for no known call: dropped.",
        |s| s.calls.bad_messages,
    ),
    (
        "peercall_call_relay_refusals_total",
        "Relay channel requests of this node's calls that relays refused.",
        |s| s.calls.relay_refusals,
    ),
    (
        "peercall_call_unroutable_packets_total",
        "Call packets for a path without a route: dropped.",
        |s| s.calls.unroutable,
    ),
    (
        "peercall_call_relay_messages_dropped_total",
        "Relay messages of calls dropped before sending (no session to the relay, queue full).",
        |s| s.calls.relay_msgs_dropped,
    ),
    (
        "peercall_relay_packets_total",
        "Packets this supernode relayed.",
        |s| s.relay.packets,
    ),
    (
        "peercall_relay_bytes_total",
        "Bytes of end-to-end packets this supernode relayed.",
        |s| s.relay.bytes,
    ),
    (
        "peercall_relay_allocations_total",
        "Relay channels granted (new ones, not refreshes).",
        |s| s.relay.allocations,
    ),
    (
        "peercall_relay_refusals_total",
        "Relay requests refused (quota, rate, private target, disabled).",
        |s| s.relay.refusals,
    ),
    (
        "peercall_relay_expired_channels_total",
        "Relay channels expired (idle or past their lifetime).",
        |s| s.relay.expired,
    ),
];

/// Call and relay gauges: name, help, value.
const CALL_GAUGES: [(&str, &str, Getter); 4] = [
    (
        "peercall_calls_active",
        "Calls not ended (placing, ringing, connected).",
        |s| s.calls.active,
    ),
    (
        "peercall_relay_sessions",
        "Clients holding at least one relay channel on this supernode.",
        |s| s.relay.clients,
    ),
    (
        "peercall_relay_channels",
        "Relay channels held on this supernode.",
        |s| s.relay.channels,
    ),
    (
        "peercall_relay_active_channels",
        "Relay channels whose peer consented: forwarding now.",
        |s| s.relay.active_channels,
    ),
];

/// Path kinds, in the engine's per-kind counter order.
const PATH_KINDS: [PathKind; 3] = [PathKind::Direct, PathKind::Relay1, PathKind::Relay2];

/// The set-up time histogram, built from the engine's per-bucket counts at each
/// scrape (the engine counts; this only exports).
#[derive(Debug)]
struct SetupHistogram {
    desc: Desc,
    /// Per-bucket counts (not cumulative), +Inf last; sum in ms.
    counts: Mutex<([u64; SETUP_BUCKETS_MS.len() + 1], u64)>,
}

/// Name and help of the set-up time histogram.
const SETUP_HISTOGRAM: (&str, &str) = (
    "peercall_call_setup_seconds",
    "Time from placing or receiving a call to it being connected.",
);

impl SetupHistogram {
    fn new() -> Result<SetupHistogram, prometheus::Error> {
        Ok(SetupHistogram {
            desc: Desc::new(
                SETUP_HISTOGRAM.0.to_owned(),
                SETUP_HISTOGRAM.1.to_owned(),
                Vec::new(),
                std::collections::HashMap::new(),
            )?,
            counts: Mutex::new(([0; SETUP_BUCKETS_MS.len() + 1], 0)),
        })
    }
}

impl Collector for SetupHistogram {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (counts, sum_ms) = *self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(SETUP_BUCKETS_MS.len());
        for (bound, count) in SETUP_BUCKETS_MS.iter().zip(counts) {
            cumulative += count;
            let mut b = Bucket::default();
            b.set_cumulative_count(cumulative);
            b.set_upper_bound(*bound as f64 / 1000.0);
            buckets.push(b);
        }
        let mut h = Histogram::default();
        h.set_bucket(buckets);
        h.set_sample_count(counts.iter().sum());
        h.set_sample_sum(sum_ms as f64 / 1000.0);
        let mut m = Metric::default();
        m.set_histogram(h);
        let mut family = MetricFamily::default();
        family.set_name(SETUP_HISTOGRAM.0.to_owned());
        family.set_help(SETUP_HISTOGRAM.1.to_owned());
        family.set_field_type(MetricType::HISTOGRAM);
        family.set_metric(vec![m]);
        vec![family]
    }
}

/// Series of calls and relays beyond the plain counters and gauges.
#[derive(Debug)]
struct CallMetrics {
    outcomes: Vec<IntCounter>,
    paths_active: Vec<IntGauge>,
    paths_up: Vec<IntCounter>,
    relay_drops: Vec<IntCounter>,
    rtt: GaugeVec,
    jitter: GaugeVec,
    loss: GaugeVec,
    mos: GaugeVec,
    setup: std::sync::Arc<SetupHistogram>,
}

/// A registered counter family with one label, every value exported from zero.
fn labeled_counters(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
) -> Result<Vec<IntCounter>, prometheus::Error> {
    let family = IntCounterVec::new(Opts::new(name, help), &[label])?;
    let counters = values
        .iter()
        .map(|v| family.with_label_values(&[*v]))
        .collect();
    registry.register(Box::new(family))?;
    Ok(counters)
}

impl CallMetrics {
    fn new(registry: &Registry) -> Result<CallMetrics, prometheus::Error> {
        let kinds: Vec<&str> = PATH_KINDS.iter().map(|k| k.label()).collect();
        let outcomes = labeled_counters(
            registry,
            "peercall_calls_total",
            "Calls ended, by outcome (completed: hung up by either side after connecting).",
            "outcome",
            &EndReason::LABELS,
        )?;
        let paths_up = labeled_counters(
            registry,
            "peercall_call_paths_up_total",
            "Call paths that came up, by kind.",
            "kind",
            &kinds,
        )?;
        let drop_labels: Vec<&str> = RelayDrop::ALL.iter().map(|r| r.label()).collect();
        let relay_drops = labeled_counters(
            registry,
            "peercall_relay_dropped_packets_total",
            "Packets a relay dropped, by reason.",
            "reason",
            &drop_labels,
        )?;
        let active = IntGaugeVec::new(
            Opts::new(
                "peercall_call_paths_active",
                "Active paths of live calls, by kind.",
            ),
            &["kind"],
        )?;
        let paths_active = kinds
            .iter()
            .map(|k| active.with_label_values(&[*k]))
            .collect();
        registry.register(Box::new(active))?;
        let per_kind = |name: &str, help: &str| -> Result<GaugeVec, prometheus::Error> {
            let g = GaugeVec::new(Opts::new(name, help), &["kind"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let setup = std::sync::Arc::new(SetupHistogram::new()?);
        registry.register(Box::new(ArcCollector(setup.clone())))?;
        Ok(CallMetrics {
            outcomes,
            paths_active,
            paths_up,
            relay_drops,
            rtt: per_kind(
                "peercall_call_path_rtt_seconds",
                "Round-trip time of the active path of connected calls, by its kind (mean over calls; absent when no call uses the kind).",
            )?,
            jitter: per_kind(
                "peercall_call_path_jitter_seconds",
                "Jitter of the active path of connected calls, by its kind (mean over calls).",
            )?,
            loss: per_kind(
                "peercall_call_path_loss_ratio",
                "Loss fraction of the active path of connected calls, by its kind (mean over calls).",
            )?,
            mos: per_kind(
                "peercall_call_path_mos",
                "E-model MOS estimate of the active path of connected calls, by its kind (mean over calls).",
            )?,
            setup,
        })
    }

    fn mirror(&self, stats: &Stats, calls: &[CallStats]) {
        for (i, c) in self.outcomes.iter().enumerate() {
            advance(c, stats.calls.ended.get(i).copied().unwrap_or(0));
        }
        for kind in PATH_KINDS {
            let i = kind_index(kind);
            let n = stats.calls.active_paths.get(i).copied().unwrap_or(0);
            self.paths_active[i].set(i64::try_from(n).unwrap_or(i64::MAX));
            advance(
                &self.paths_up[i],
                stats.calls.paths_up.get(i).copied().unwrap_or(0),
            );
        }
        for (i, reason) in RelayDrop::ALL.iter().enumerate() {
            advance(&self.relay_drops[i], stats.relay.dropped(*reason));
        }
        *self.setup.counts.lock().unwrap_or_else(|e| e.into_inner()) =
            (stats.calls.setup_buckets, stats.calls.setup_ms_sum);
        for kind in PATH_KINDS {
            // The active path of every connected call of this kind.
            let paths: Vec<_> = calls
                .iter()
                .filter(|c| c.state == CallState::Active && c.active_path == Some(kind))
                .filter_map(|c| {
                    c.paths.iter().find(|p| {
                        p.kind == kind
                            && Some(p.kind) == c.active_path
                            && p.state == peercall_engine::PathState::Active
                    })
                })
                .collect();
            let label = [kind.label()];
            if paths.is_empty() {
                for g in [&self.rtt, &self.jitter, &self.loss, &self.mos] {
                    // Absent, not zero: no call measures this kind now.
                    let _ = g.remove_label_values(&label);
                }
                continue;
            }
            let n = paths.len() as f64;
            let mean = |f: &dyn Fn(&peercall_engine::CallPathStats) -> f64| {
                paths.iter().map(|p| f(p)).sum::<f64>() / n
            };
            let rtts: Vec<f64> = paths
                .iter()
                .filter_map(|p| p.rtt.map(|r| r.as_secs_f64()))
                .collect();
            if rtts.is_empty() {
                let _ = self.rtt.remove_label_values(&label);
            } else {
                self.rtt
                    .with_label_values(&label)
                    .set(rtts.iter().sum::<f64>() / rtts.len() as f64);
            }
            self.jitter
                .with_label_values(&label)
                .set(mean(&|p| p.jitter.as_secs_f64()));
            self.loss.with_label_values(&label).set(mean(&|p| p.loss));
            self.mos.with_label_values(&label).set(mean(&|p| p.mos));
        }
    }
}

/// Registers a shared collector.
#[derive(Debug)]
struct ArcCollector(std::sync::Arc<SetupHistogram>);

impl Collector for ArcCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

/// The state files whose failed saves are counted (bounded label values).
const STATE_FILES: [&str; 2] = [crate::store::HOSTS_FILE, crate::store::CONTACTS_FILE];

/// The node's metrics registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    engine_counters: Vec<(IntCounter, Getter)>,
    labeled: Vec<(IntCounter, Getter)>,
    gauges: Vec<(IntGauge, Getter)>,
    sessions: IntGauge,
    state_save_errors: IntCounterVec,
    /// Contacts in the book.
    pub contacts: IntGauge,
    /// Contacts online.
    pub contacts_online: IntGauge,
    /// Supernodes in the host cache.
    pub host_cache: IntGauge,
    /// CPU headroom last measured, percent.
    pub cpu_headroom: IntGauge,
    /// Clients following `/v1/events`.
    pub event_subscribers: IntGauge,
    /// State files that did not load at start and were set aside.
    pub state_files_set_aside: IntCounter,
    drops: IntCounterVec,
    calls: CallMetrics,
    buffers_allocated: IntCounter,
    uptime: Gauge,
    sessions_ended: IntCounterVec,
    /// Failed UDP sends (the engine counted them as sent; the OS refused).
    pub udp_send_errors: IntCounter,
    /// Failed UDP receives (e.g. ICMP errors reported on the socket).
    pub udp_receive_errors: IntCounter,
    /// Batched receive system calls (recvmmsg) that returned datagrams.
    pub udp_receive_calls: IntCounter,
    /// Send system calls (one per destination run; a GSO run carries several
    /// datagrams).
    pub udp_send_calls: IntCounter,
    /// Admin requests refused for a missing or wrong bearer token.
    pub admin_unauthorized: IntCounter,
    /// Datagrams dropped by the debug block list (`debug_endpoints`).
    pub debug_blocked: IntCounter,
    /// The link and NAT emulator's counters (`[emulate]`).
    pub emulate: crate::netem::EmulateMetrics,
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
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let engine_counters = ENGINE_COUNTERS
            .iter()
            .chain(MORE_COUNTERS.iter())
            .chain(CALL_COUNTERS.iter())
            .map(|(name, help, get)| Ok((counter(name, help)?, *get)))
            .collect::<Result<_, prometheus::Error>>()?;
        let mut labeled = Vec::new();
        for (name, help, label, values) in LABELED_COUNTERS {
            let family = IntCounterVec::new(Opts::new(name, help), &[label])?;
            for (value, get) in values {
                labeled.push((family.with_label_values(&[*value]), *get));
            }
            registry.register(Box::new(family))?;
        }
        let gauges = OVERLAY_GAUGES
            .iter()
            .chain(CALL_GAUGES.iter())
            .map(|(name, help, get)| Ok((gauge(name, help)?, *get)))
            .collect::<Result<_, prometheus::Error>>()?;
        let state_save_errors = IntCounterVec::new(
            Opts::new(
                "peercall_state_save_errors_total",
                "Saves of a state file in the data directory that failed, by file.",
            ),
            &["file"],
        )?;
        for file in STATE_FILES {
            state_save_errors.with_label_values(&[file]);
        }
        registry.register(Box::new(state_save_errors.clone()))?;
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
        let calls = CallMetrics::new(&registry)?;
        let buffers_allocated = counter(
            "peercall_transmit_buffers_allocated_total",
            "Transmit buffers the engine allocated because none was free to reuse (relays reuse them per packet).",
        )?;
        Ok(Metrics {
            calls,
            buffers_allocated,
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
            udp_receive_calls: counter(
                "peercall_udp_receive_calls_total",
                "Batched UDP receive calls (recvmmsg) that returned datagrams; datagrams \
                 received divided by this is the mean batch.",
            )?,
            udp_send_calls: counter(
                "peercall_udp_send_calls_total",
                "UDP send calls; datagrams sent divided by this is the mean GSO run.",
            )?,
            debug_blocked: counter(
                "peercall_debug_blocked_datagrams_total",
                "Datagrams to or from an address on the debug block list (POST /v1/debug/block), dropped at the UDP socket.",
            )?,
            emulate: {
                let drops = labeled_counters(
                    &registry,
                    "peercall_debug_emulated_drops_total",
                    "Datagrams the [emulate] layer of the UDP socket dropped on purpose, by reason: \
                     loss (random outbound loss), queue_full (the delay queue was full), \
                     send_failed (the socket refused a delayed datagram when it fell due), \
                     nat_filter (inbound from an address not sent to within the NAT timeout).",
                    "reason",
                    &["loss", "queue_full", "send_failed", "nat_filter"],
                )?;
                crate::netem::EmulateMetrics {
                    lost: drops[0].clone(),
                    queue_full: drops[1].clone(),
                    send_failed: drops[2].clone(),
                    nat_filtered: drops[3].clone(),
                    delayed: counter(
                        "peercall_debug_emulated_delayed_datagrams_total",
                        "Outbound datagrams the [emulate] layer held in its delay queue.",
                    )?,
                }
            },
            admin_unauthorized: counter(
                "peercall_admin_unauthorized_total",
                "Admin API requests refused for a missing or wrong bearer token.",
            )?,
            contacts: gauge("peercall_contacts", "Contacts in the contact book.")?,
            contacts_online: gauge(
                "peercall_contacts_online",
                "Contacts the overlay reports online.",
            )?,
            host_cache: gauge(
                "peercall_host_cache_entries",
                "Supernodes in the host cache.",
            )?,
            cpu_headroom: gauge(
                "peercall_cpu_headroom_percent",
                "Idle CPU last measured (the lower of /proc/stat idle time and one-minute load), offered for promotion.",
            )?,
            event_subscribers: gauge(
                "peercall_event_subscribers",
                "Clients following the admin API's event stream.",
            )?,
            state_files_set_aside: counter(
                "peercall_state_files_set_aside_total",
                "State files (host cache, contacts) that did not load at start and were renamed aside.",
            )?,
            registry,
            engine_counters,
            labeled,
            gauges,
            state_save_errors,
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

    /// Counts a failed save of a state file.
    pub fn state_save_failed(&self, file: &str) {
        if STATE_FILES.contains(&file) {
            self.state_save_errors.with_label_values(&[file]).inc();
        }
    }

    /// Mirrors `stats`, the live `calls` and `uptime`, then renders the Prometheus
    /// text format.
    pub fn render(&self, stats: &Stats, calls: &[CallStats], uptime: Duration) -> String {
        // A poisoned lock only means another scrape panicked; the data is still fine.
        let _guard = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        for (counter, get) in self.engine_counters.iter().chain(&self.labeled) {
            advance(counter, get(stats));
        }
        for (gauge, get) in &self.gauges {
            gauge.set(i64::try_from(get(stats)).unwrap_or(i64::MAX));
        }
        self.sessions
            .set(i64::try_from(stats.sessions).unwrap_or(i64::MAX));
        for reason in DropReason::ALL {
            advance(
                &self.drops.with_label_values(&[reason.label()]),
                stats.dropped(reason),
            );
        }
        self.calls.mirror(stats, calls);
        advance(&self.buffers_allocated, stats.buffers_allocated);
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
const SESSION_END_REASONS: [&str; 4] = ["closed by peer", "timed out", "idle", "unreachable"];

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
        let text = m.render(&Stats::default(), &[], Duration::from_secs(3));
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
        let text = m.render(&stats, &[], Duration::from_secs(4));
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
        let text = m.render(&stats, &[], Duration::from_secs(5));
        assert_eq!(
            value_of(&text, "peercall_datagrams_received_total"),
            Some(9.0)
        );
        assert_eq!(value_of(&text, "peercall_sessions"), Some(1.0));
    }

    #[test]
    fn mirrors_overlay_stats_with_bounded_labels() {
        let m = Metrics::new(Time::ZERO).unwrap();
        let text = m.render(&Stats::default(), &[], Duration::ZERO);
        for (name, _, label, values) in LABELED_COUNTERS {
            for (value, _) in values {
                let series = format!("{name}{{{label}=\"{value}\"}}");
                assert_eq!(value_of(&text, &series), Some(0.0), "{series}");
            }
        }
        assert_eq!(value_of(&text, "peercall_overlay_supernode"), Some(0.0));
        assert_eq!(
            value_of(
                &text,
                "peercall_state_save_errors_total{file=\"hosts.json\"}"
            ),
            Some(0.0)
        );
        let mut stats = Stats {
            stun_answered: 3,
            control_in: 4,
            ..Stats::default()
        };
        stats.overlay.supernode = true;
        stats.overlay.clients = 12;
        stats.overlay.records = 40;
        stats.overlay.lookups_found = 5;
        stats.overlay.forged_records = 2;
        stats.overlay.swim.deaths = 1;
        stats.overlay.msgs_out = 9;
        let text = m.render(&stats, &[], Duration::ZERO);
        let v = |series: &str| value_of(&text, series);
        assert_eq!(v("peercall_stun_answered_total"), Some(3.0));
        assert_eq!(v("peercall_control_frames_received_total"), Some(4.0));
        assert_eq!(v("peercall_overlay_supernode"), Some(1.0));
        assert_eq!(v("peercall_overlay_clients"), Some(12.0));
        assert_eq!(v("peercall_overlay_records"), Some(40.0));
        assert_eq!(
            v("peercall_overlay_lookups_completed_total{result=\"found\"}"),
            Some(5.0)
        );
        assert_eq!(
            v("peercall_overlay_refused_records_total{reason=\"forged\"}"),
            Some(2.0)
        );
        assert_eq!(v("peercall_swim_deaths_total"), Some(1.0));
        assert_eq!(v("peercall_overlay_messages_sent_total"), Some(9.0));
        // Gauges follow the value down; counters never go back.
        stats.overlay.clients = 2;
        let text = m.render(&stats, &[], Duration::ZERO);
        assert_eq!(value_of(&text, "peercall_overlay_clients"), Some(2.0));
        m.state_save_failed("contacts.json");
        m.state_save_failed("not-a-state-file");
        let text = m.render(&stats, &[], Duration::ZERO);
        assert_eq!(
            value_of(
                &text,
                "peercall_state_save_errors_total{file=\"contacts.json\"}"
            ),
            Some(1.0)
        );
        assert!(!text.contains("not-a-state-file"));
    }

    #[test]
    fn ended_sessions_are_counted_by_reason() {
        let m = Metrics::new(Time::ZERO).unwrap();
        let text = m.render(&Stats::default(), &[], Duration::ZERO);
        for label in ["closed_by_peer", "timed_out"] {
            let series = format!("peercall_sessions_ended_total{{reason=\"{label}\"}}");
            assert_eq!(value_of(&text, &series), Some(0.0), "{series}");
        }
        m.session_ended("closed by peer");
        m.session_ended("closed by peer");
        m.session_ended("Odd-Reason 2");
        let text = m.render(&Stats::default(), &[], Duration::ZERO);
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
        let text = m.render(&Stats::default(), &[], Duration::ZERO);
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert!(families.len() >= 60, "{} families: {text}", families.len());
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
