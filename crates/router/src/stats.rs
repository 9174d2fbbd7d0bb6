//! Snapshots of the router's figures, for the engine's stats and metrics.

use std::time::Duration;

use crate::estimator::LossSummary;
use crate::{PathId, PathKind};

/// A path's role right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathState {
    /// Nothing heard on it yet.
    Unvalidated,
    /// Carries the media.
    Active,
    /// Carries a copy of the media.
    Redundant,
    /// Works, kept measured by probes.
    Standby,
    /// Stopped answering.
    Silent,
}

impl PathState {
    /// A stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            PathState::Unvalidated => "unvalidated",
            PathState::Active => "active",
            PathState::Redundant => "redundant",
            PathState::Standby => "standby",
            PathState::Silent => "silent",
        }
    }
}

/// One path's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct PathStats {
    /// The path.
    pub id: PathId,
    /// Its kind.
    pub kind: PathKind,
    /// Its role.
    pub state: PathState,
    /// Kept measured at the warm probe interval.
    pub warm: bool,
    /// Smoothed RTT (RFC 6298), once measured.
    pub rtt: Option<Duration>,
    /// RTT variation (RFC 6298).
    pub rtt_var: Duration,
    /// Smallest RTT of the last 10 s.
    pub rtt_min: Option<Duration>,
    /// Median of the recent RTT samples.
    pub rtt_p50: Option<Duration>,
    /// 90th percentile of the recent RTT samples.
    pub rtt_p90: Option<Duration>,
    /// Jitter the score uses (the peer's report of our direction when fresh).
    pub jitter: Duration,
    /// Loss rate the score uses.
    pub loss: f64,
    /// `loss` comes from media reports (else from probes).
    pub loss_from_media: bool,
    /// Our media's loss on this path over the window, from the peer's reports.
    pub media_loss: LossSummary,
    /// Our probes' round-trip loss over the window.
    pub probe_loss: LossSummary,
    /// Loss of the peer's media arriving on this path over the window.
    pub inbound_loss: LossSummary,
    /// RFC 3550 jitter of the peer's media arriving on this path.
    pub inbound_jitter: Duration,
    /// E-model R for this path.
    pub r: f64,
    /// MOS estimate from `r`.
    pub mos: f64,
    /// Time since anything arrived on the path.
    pub since_heard: Option<Duration>,
    /// Media frames we sent on it.
    pub media_sent: u64,
    /// Media frames that arrived on it (copies included).
    pub media_received: u64,
    /// Probes sent.
    pub probes_sent: u64,
    /// Probes answered.
    pub probes_acked: u64,
    /// Receiver reports received.
    pub reports_received: u64,
}

/// The router's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterStats {
    /// The active path.
    pub active: Option<PathId>,
    /// Its kind.
    pub active_kind: Option<PathKind>,
    /// The path carrying copies, if any.
    pub redundant: Option<PathId>,
    /// Changes of the active path (the first choice not counted).
    pub switches: u64,
    /// Of which away from a silent path.
    pub switches_silent: u64,
    /// Of which for a better path.
    pub switches_better: u64,
    /// Second copies of frames dropped by the de-duplicator.
    pub duplicates: u64,
    /// Frames dropped as too old to de-duplicate.
    pub too_old: u64,
    /// Inputs refused (unknown path, unanswerable ack, bogus report).
    pub rejected: u64,
    /// Events dropped because nobody drained them.
    pub events_dropped: u64,
    /// Per path.
    pub paths: Vec<PathStats>,
}
