//! peercall's multipath call router, sans-IO.
//!
//! A call has several paths between the two callers: direct UDP, through one relay
//! (a supernode either side is attached to), or through two relays. The [`Router`]
//! of each caller measures every path, rates it with the ITU-T G.107 E-model
//! ([`peercall_media::quality`]), picks the path for the media with a
//! [`PathSelector`] (default: [`DefaultSelector`]), sends a second copy on the
//! second best path when that helps, and de-duplicates what arrives twice.
//!
//! # Measurement
//!
//! - **Idle probes** ([`Probe`] / [`ProbeAck`]): RTT = now − echo − held. Warm paths
//!   are probed every [`PROBE_INTERVAL_WARM`], others every [`PROBE_INTERVAL_COLD`];
//!   a path that carries media is measured by its receiver reports instead.
//! - **Media**: every frame carries a per-path sequence number (`Media.path_seq`,
//!   from 0 on each path). The receiving router tracks each path's highest number,
//!   loss, loss runs and RFC 3550 jitter, and sends [`Report`]s on the path they are
//!   about: at least every 200 ms, right after a gap closes (so each report carries
//!   exactly one loss run), and every other frame or so when nothing else goes back
//!   on that path (so the sender can tell silence quickly). Reports are generated
//!   when a frame arrives, so `now − send time of highest_seq` is an RTT sample.
//! - **Estimators** ([`estimator`]): smoothed RTT (RFC 6298) with a windowed minimum
//!   and percentiles, RFC 3550 jitter, loss and loss bursts over a 10 s window.
//! - **Liveness**: a path is *silent* when a frame or probe sent on it has gone
//!   unanswered and nothing was heard on it for max(3 × RTT, 150 ms) (see
//!   [`path::SILENCE_FLOOR`]), or when reports about our media stopped for
//!   [`path::FEEDBACK_TIMEOUT`] (a one-way failure). Before that, a path carrying
//!   the peer's media is *quiet* when two of its frames in a row are missing
//!   ([`path::QUIET_FRAMES`], plus a jitter margin): the default selector then puts
//!   a copy on the next path at once and the router asks for a re-send of the
//!   frames the path may have lost ([`Router::poll_resend`]); the switch itself
//!   still waits for silence.
//!
//! # Driving contract
//!
//! One `Router` per call on each side; path ids are shared by both sides (call
//! setup numbers the paths). All inputs take `now`; nothing reads a clock.
//!
//! ```text
//! for each path found by call setup:   router.add_path(now, id, kind)
//! for each outgoing 20 ms frame:       plan = router.send_plan(now)
//!                                      if let Some((path, since)) = router.poll_resend():
//!                                          for each kept frame sent >= since:
//!                                              path_seq = router.on_media_sent(now, path)
//!                                              send it again on path (FLAG_REDUNDANT)
//!                                      for path in plan.paths():
//!                                          path_seq = router.on_media_sent(now, path)
//!                                          send Media { path, path_seq, .. } on path
//! on Media received on a path:         if router.on_media_received(now, &m)? == Fresh
//!                                          { hand to the jitter buffer }
//! on Probe:                            send router.on_probe(now, &p)? on p.path
//! on ProbeAck / Report:                router.on_probe_ack / on_report(now, ..)
//! on any other packet on a path:       router.on_packet_received(now, path)
//! after every input and timeout:       drain poll_probe(now), poll_report(now)
//!                                      (send each on its .path), poll_event(),
//!                                      poll_resend() (re-send as above)
//! then:                                wake at poll_timeout(), call handle_timeout(now)
//! ```
//!
//! Errors ([`RouterError`]) mean the input was dropped and counted (in
//! [`RouterStats::rejected`]); no state changed.
//!
//! Stats ([`Router::stats`]) give every path's RTT, jitter, loss, bursts, R and MOS,
//! the active path and its kind, and the switch counts.

pub mod dedup;
pub mod estimator;
pub mod path;
pub mod router;
pub mod score;
pub mod selector;
pub mod stats;

use thiserror::Error;

pub use dedup::{DEDUP_WINDOW, Deduplicator};
pub use router::{
    Delivery, MAX_PATHS, MIN_WARM_PATHS, PROBE_INTERVAL_COLD, PROBE_INTERVAL_SUSPECT,
    PROBE_INTERVAL_WARM, RESEND_WINDOW_RTT_FACTOR, Router, RouterConfig, RouterEvent, SendPlan,
};
pub use selector::{
    DefaultSelector, PathSelector, PathView, RedundancyMode, Selection, SwitchReason,
};
pub use stats::{PathState, PathStats, RouterStats};

#[doc(no_inline)]
pub use peercall_wire::frame::{Media, Probe, ProbeAck, Report};

/// A path's id within a call, the same on both ends.
pub type PathId = u16;

/// How a path gets from one caller to the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathKind {
    /// Straight between the two callers (hole punched or public).
    Direct,
    /// Through one relay supernode.
    Relay1,
    /// Through two relays (the caller's supernode and the callee's).
    Relay2,
}

impl PathKind {
    /// A stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Relay1 => "relay1",
            PathKind::Relay2 => "relay2",
        }
    }
}

/// Why the router refused an input. The input was dropped and counted; nothing
/// else changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RouterError {
    /// No path with this id in this call.
    #[error("unknown path {0}")]
    UnknownPath(PathId),
    /// `add_path` with an id already in use.
    #[error("path {0} already exists")]
    DuplicatePath(PathId),
    /// `add_path` beyond [`MAX_PATHS`].
    #[error("too many paths (at most {MAX_PATHS})")]
    TooManyPaths,
    /// A probe ack that answers no probe in flight on the path (late, duplicate or
    /// forged).
    #[error("probe ack on path {0} answers no probe in flight")]
    UnknownProbe(PathId),
    /// A report about media frames never sent on the path.
    #[error("report on path {0} covers frames never sent")]
    BogusReport(PathId),
}
