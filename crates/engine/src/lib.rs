//! The sans-IO peercall node: one state machine that composes sessions, overlay,
//! router and media.
//!
//! # Driving contract
//!
//! A [`Node`] never reads a clock, touches a socket or draws OS randomness. Its
//! owner (the daemon, or the simulator) drives it:
//!
//! 1. Feed inputs, each with the current time: [`Node::handle_datagram`] for every
//!    received datagram, [`Node::handle_timeout`] when the time returned by
//!    [`Node::poll_timeout`] has come, and commands such as [`Node::connect`].
//! 2. After **every** input, drain the outputs until they are empty:
//!    [`Node::poll_transmit`] (datagrams to send), [`Node::poll_event`] (things the
//!    owner may want to show or act on).
//! 3. Ask [`Node::poll_timeout`] for the next deadline and sleep until then or until
//!    the next datagram, whichever comes first.
//!
//! # Calls
//!
//! [`Node::call`] places a call to a [`CallTarget`] (user id or handle) and returns
//! its [`CallId`]; an incoming one arrives as [`Event::CallIncoming`] and is taken
//! with [`Node::answer`] or declined with [`Node::reject`] (or answered at once when
//! [`CallConfig::auto_answer`] is set); [`Node::hangup`] ends or cancels either.
//! Progress comes as events: [`Event::CallRinging`], [`Event::CallConnected`] (with
//! the active path's [`PathKind`]), [`Event::CallPathSwitched`] and
//! [`Event::CallEnded`] with an [`EndReason`] (`NotFound`, `Unreachable(why)`,
//! `NoAnswer`, `Rejected`, `Busy`, `HungUp(side)`, `Lost`).
//!
//! Audio is the owner's to clock: every 20 ms it hands [`Node::push_audio`] one
//! frame of 48 kHz mono capture ([`FRAME_SAMPLES`] samples) and takes one frame of
//! playout from [`Node::pull_audio`], for each active call. The engine owns per call
//! the Opus encoder, packetizer, router (paths, probes, selection, redundancy) and
//! receiver (jitter buffer, FEC, concealment); media is end-to-end encrypted on the
//! callers' Noise session whichever path (direct, one relay, two relays) it takes.
//!
//! [`Node::calls`] and [`Node::call_stats`] give [`CallStats`] snapshots (state,
//! peer, active path kind, per-path RTT/jitter/loss/R/MOS, switches, frames,
//! concealment, longest gap, set-up and first-audio times, MOS estimate); node-wide
//! call and relay counters for metrics are in [`Stats::calls`] ([`CallCounters`]) and
//! [`Stats::relay`] ([`RelayStats`]). A supernode relays for others under
//! [`RelayConfig`] limits (see [`relay`]); [`msg`] has the call and relay message sets.
//!
//! `now` must never go backwards. Everything random is drawn from a ChaCha RNG seeded
//! by [`Config::rng_seed`], so the same inputs at the same times give the same
//! outputs: simulations replay exactly from their seed.

mod call;
pub mod msg;
mod node;
mod paths;
pub mod relay;
mod stats;

pub use call::{
    CallConfig, CallCounters, CallError, CallId, CallPathStats, CallState, CallStats, CallTarget,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_LOST_TIMEOUT, DEFAULT_MAX_CALLS, DEFAULT_RING_TIMEOUT,
    DIRECT_PATH, ENDED_LINGER, EndReason, SETUP_BUCKETS_MS, Side, Unreachable, kind_index,
};
pub use peercall_media::FRAME_SAMPLES;
pub use peercall_router::{PathKind, PathState, RedundancyMode};
pub use relay::{RelayConfig, RelayDrop, RelayStats};

pub use node::{
    Config, Contact, DEFAULT_IDLE_TIMEOUT, Event, Node, Role, SessionInfo, Status, Transmit,
};
pub use peercall_overlay::{
    CachedHost, Found, Lookup, LookupError, OverlayConfig, OverlayEvent, OverlayStats, RequestId,
    Resources,
};
pub use stats::{DropReason, Stats};
