//! Calls: the state machine of each call, its paths, and its media.
//!
//! # Set-up
//!
//! The caller resolves the callee's signed record through the overlay, then sends one
//! end-to-end Noise IK initiation (the callee's static key comes from the record) at
//! once straight to each of the callee's endpoints (which opens the caller's NAT
//! towards them) and, wrapped in a [`RelayMsg::Signal`], through the callee's home
//! supernodes, which hand it on over their client sessions. The callee answers both
//! ways (the node layer does that), so the session comes up on whichever arrives
//! first. At the same time the caller asks its own and the callee's home supernodes
//! for relay channels, so relayed paths are ready by the time the callee answers.
//!
//! Call control then rides the end-to-end session as [`CallMsg`]s: Invite (with the
//! caller's signed record, checked against the session's key) → Ringing → Accept |
//! Reject | Busy, and Hangup from either side. Messages that need an answer are sent
//! again until it comes ([`RESEND_INTERVAL`], at most [`MAX_RESENDS`] times).
//!
//! # Paths
//!
//! A path is engine metadata: how an outer packet of the end-to-end session goes to
//! the peer. Path [`DIRECT_PATH`] is straight UDP: its address is learned from the
//! first authenticated packet that arrives straight from the peer (both sides send
//! keepalives to each other's candidate addresses every [`PUNCH_INTERVAL`] for
//! [`PUNCH_WINDOW`], punching their NATs). Relayed paths are numbered by the caller
//! in a [`CallMsg::Paths`] offer; both sides ask the relay for a channel to the other
//! (mutual permission), and a path joins the router once the relay says it forwards.
//! The router ([`peercall_router`]) measures every path, picks the active one and
//! sends redundant copies when that helps.
//!
//! # Media
//!
//! The shell pushes 20 ms of capture with [`Node::push_audio`] (Opus encoder with
//! in-band FEC → packetizer → router → paths) and pulls 20 ms of playout with
//! [`Node::pull_audio`] (jitter buffer → decoder, FEC, concealment).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use peercall_crypto::record::Record;
use peercall_crypto::{Handle, PeerKey, UserId};
use peercall_media::{
    Encoder, EncoderConfig, FRAME_SAMPLES, JitterConfig, MediaError, Packetizer, Pulled, Receiver,
};
use peercall_overlay::util::{Map, map};
use peercall_overlay::{Found, Lookup, LookupError, RequestId};
use peercall_router::{
    Delivery, PathId, PathKind, PathState, RedundancyMode, Router, RouterConfig, RouterEvent,
};
use peercall_wire::frame::Media;
use peercall_wire::{Frame, Time};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use thiserror::Error;

use crate::msg::{CallMsg, HangupCode, PathOffer, Refusal, RejectCode, RelayMsg, Sn};
use crate::node::{Event, Node};
use crate::paths::{Origin, Route};
use crate::relay::{LEG_REFRESH, RelayEnv};
use crate::stats::DropReason;

/// The direct path's id: fixed, never offered.
pub const DIRECT_PATH: PathId = 0;
/// Time to ring before the caller gives up ([`EndReason::NoAnswer`]): what phone
/// networks use before voicemail.
pub const DEFAULT_RING_TIMEOUT: Duration = Duration::from_secs(30);
/// Time from placing a call to an answer to the invitation (ringing or accept)
/// before it is [`EndReason::Unreachable`]: a dozen handshake round trips over
/// signalling, and the user waits no longer.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Nothing heard from the peer on any path or the session for this long: the call
/// is [`EndReason::Lost`]. Long enough to ride out a path re-establishment.
pub const DEFAULT_LOST_TIMEOUT: Duration = Duration::from_secs(10);
/// Calls (not ended) one node takes part in by default; an invitation beyond it is
/// answered [`RejectCode::Busy`]. One, as a telephone.
pub const DEFAULT_MAX_CALLS: usize = 1;
/// Handshake initiations are re-sent this often while no session is up: a lost
/// initiation costs one second, not the call.
const HANDSHAKE_RETRY: Duration = Duration::from_secs(1);
/// Unanswered call messages are re-sent this often: a few round trips.
pub const RESEND_INTERVAL: Duration = Duration::from_millis(300);
/// ...and at most this many times (3 s in all), then given up.
pub const MAX_RESENDS: u32 = 10;
/// Hole punching: keepalives to the peer's candidates this often (20-50 ms, as ICE
/// pacing), so both NATs open within a round trip of each other.
pub const PUNCH_INTERVAL: Duration = Duration::from_millis(40);
/// ...for this long after the call starts; a direct path found later still upgrades
/// the call (probes of the direct path keep trying at the router's cold interval).
pub const PUNCH_WINDOW: Duration = Duration::from_secs(5);
/// An ended call's statistics stay readable this long, for the shell's summary.
pub const ENDED_LINGER: Duration = Duration::from_secs(60);
/// A refused or closed relay channel is asked for again after this long.
const RELAY_RETRY: Duration = Duration::from_secs(5);
/// Candidate addresses tried for the direct path: a record lists at most a few
/// endpoints, plus the addresses supernodes observed.
const MAX_CANDIDATES: usize = 8;
/// One-relay paths offered per call: through one supernode of each side.
const MAX_RELAY1: usize = 2;
/// Relay messages held per supernode while its session is being set up.
const MAX_QUEUED_RELAY_MSGS: usize = 16;
/// Encoder feedback (loss) from the router at this interval: a second of frames.
const FEEDBACK_INTERVAL: Duration = Duration::from_secs(1);
/// Frame length in milliseconds, for gap and concealment figures.
const FRAME_MS: u64 = peercall_media::FRAME_MS as u64;
/// The longest run of frames a pass-through source may skip and still be taken as
/// the same clock (two seconds of its DTX or loss); a longer jump, or a step back,
/// is a new clock and counts as no gap.
const MAX_PASSTHROUGH_SKIP: u32 = 100;
/// Upper bounds (ms) of the set-up time histogram buckets; the last is +Inf.
pub const SETUP_BUCKETS_MS: [u64; 8] = [100, 250, 500, 750, 1_000, 2_000, 5_000, 10_000];

/// A call, as this node numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(pub u64);

impl std::fmt::Display for CallId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Whom to call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallTarget {
    /// A user id (pinned contact).
    User(UserId),
    /// A handle, resolved through the directory.
    Handle(Handle),
}

/// Where a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallState {
    /// Outgoing: looking the callee up.
    Resolving,
    /// Outgoing: setting up the session and inviting.
    Connecting,
    /// Outgoing: the callee is ringing.
    Ringing,
    /// Incoming: waiting for [`Node::answer`] or [`Node::reject`].
    Incoming,
    /// Answered: media flows.
    Active,
    /// Over (see [`EndReason`]).
    Ended,
}

impl CallState {
    /// A stable label.
    pub fn label(self) -> &'static str {
        match self {
            CallState::Resolving => "resolving",
            CallState::Connecting => "connecting",
            CallState::Ringing => "ringing",
            CallState::Incoming => "incoming",
            CallState::Active => "active",
            CallState::Ended => "ended",
        }
    }
}

/// Which side did something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// This node's user.
    Local,
    /// The other caller.
    Remote,
}

/// Why a call could not reach the callee.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unreachable {
    /// The node is not attached to the overlay (no home supernode).
    NotAttached,
    /// The directory did not answer in time.
    LookupTimeout,
    /// The callee's record says it is offline.
    Offline,
    /// No answer to the handshake, directly or through its home supernodes.
    NoHandshake,
    /// A session came up but the invitation went unanswered.
    NoInviteAnswer,
    /// The callee's home supernodes refused to pass the handshake on.
    SignalRefused(Refusal),
    /// The node is shutting down.
    Shutdown,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreachable::NotAttached => f.write_str("not attached to the overlay"),
            Unreachable::LookupTimeout => f.write_str("directory lookup timed out"),
            Unreachable::Offline => f.write_str("callee is offline"),
            Unreachable::NoHandshake => f.write_str("no answer to the handshake"),
            Unreachable::NoInviteAnswer => f.write_str("no answer to the invitation"),
            Unreachable::SignalRefused(r) => write!(f, "signalling refused: {}", r.label()),
            Unreachable::Shutdown => f.write_str("node shutting down"),
        }
    }
}

/// Why a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// No such user in the directory.
    NotFound,
    /// The callee could not be reached.
    Unreachable(Unreachable),
    /// Nobody answered in time.
    NoAnswer,
    /// The callee (or this node's user, for an incoming call) declined.
    Rejected,
    /// The callee is in another call.
    Busy,
    /// Hung up normally.
    HungUp(Side),
    /// Every path went silent.
    Lost,
}

impl EndReason {
    /// Outcome labels, for per-outcome counters (bounded cardinality).
    pub const LABELS: [&'static str; 8] = [
        "completed",
        "not_found",
        "unreachable",
        "no_answer",
        "rejected",
        "busy",
        "lost",
        "cancelled",
    ];

    /// The outcome label (index into [`EndReason::LABELS`]).
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.outcome()]
    }

    fn outcome(&self) -> usize {
        match self {
            EndReason::HungUp(_) => 0,
            EndReason::NotFound => 1,
            EndReason::Unreachable(_) => 2,
            EndReason::NoAnswer => 3,
            EndReason::Rejected => 4,
            EndReason::Busy => 5,
            EndReason::Lost => 6,
        }
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::NotFound => f.write_str("user not found"),
            EndReason::Unreachable(why) => write!(f, "unreachable: {why}"),
            EndReason::NoAnswer => f.write_str("no answer"),
            EndReason::Rejected => f.write_str("rejected"),
            EndReason::Busy => f.write_str("busy"),
            EndReason::HungUp(Side::Local) => f.write_str("hung up here"),
            EndReason::HungUp(Side::Remote) => f.write_str("hung up by the peer"),
            EndReason::Lost => f.write_str("connection lost"),
        }
    }
}

/// Why a call command was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CallError {
    /// No call with this id (never, or ended and forgotten).
    #[error("no call {0}")]
    UnknownCall(CallId),
    /// The command does not fit the call's state (say, answering an outgoing call).
    #[error("call {call} is {state}, cannot {what}")]
    State {
        /// The call.
        call: CallId,
        /// Its state's label.
        state: &'static str,
        /// The command.
        what: &'static str,
    },
    /// The audio pipeline failed (the call goes on; this frame is lost).
    #[error("media: {0}")]
    Media(String),
}

/// Call settings.
#[derive(Debug, Clone)]
pub struct CallConfig {
    /// Answer incoming calls at once.
    pub auto_answer: bool,
    /// Calls at a time; more are answered busy.
    pub max_calls: usize,
    /// See [`DEFAULT_RING_TIMEOUT`].
    pub ring_timeout: Duration,
    /// See [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// See [`DEFAULT_LOST_TIMEOUT`].
    pub lost_timeout: Duration,
    /// Opus encoder settings.
    pub encoder: EncoderConfig,
    /// Jitter buffer settings.
    pub jitter: JitterConfig,
    /// When the router sends redundant copies.
    pub redundancy: RedundancyMode,
}

impl Default for CallConfig {
    fn default() -> Self {
        CallConfig {
            auto_answer: false,
            max_calls: DEFAULT_MAX_CALLS,
            ring_timeout: DEFAULT_RING_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            lost_timeout: DEFAULT_LOST_TIMEOUT,
            encoder: EncoderConfig::default(),
            jitter: JitterConfig::default(),
            redundancy: RedundancyMode::Auto,
        }
    }
}

/// One path of a call, for statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct CallPathStats {
    /// Path id (shared by both ends).
    pub id: PathId,
    /// Its kind.
    pub kind: PathKind,
    /// Active, redundant, standby, silent...
    pub state: PathState,
    /// Smoothed RTT.
    pub rtt: Option<Duration>,
    /// Jitter.
    pub jitter: Duration,
    /// Loss rate.
    pub loss: f64,
    /// E-model R factor.
    pub r: f64,
    /// MOS from `r`.
    pub mos: f64,
}

/// A snapshot of one call.
#[derive(Debug, Clone, PartialEq)]
pub struct CallStats {
    /// The call.
    pub id: CallId,
    /// Its state.
    pub state: CallState,
    /// This node placed it.
    pub outgoing: bool,
    /// The peer's user id, once known.
    pub peer_user: Option<UserId>,
    /// The peer's handle, if its record has one.
    pub peer_handle: Option<Handle>,
    /// Why it ended.
    pub end: Option<EndReason>,
    /// The kind of the active path.
    pub active_path: Option<PathKind>,
    /// Every path.
    pub paths: Vec<CallPathStats>,
    /// Changes of the active path.
    pub path_switches: u64,
    /// Kinds of path that carried media as the active path, in order of first use.
    pub paths_used: Vec<PathKind>,
    /// Media frames sent (first copies).
    pub frames_sent: u64,
    /// Media copies sent beyond the first of each frame: redundancy on a second
    /// path and re-sends after a path failed.
    pub frames_duplicated: u64,
    /// Media frames received (first copies).
    pub frames_received: u64,
    /// Audio concealed because of loss, ms.
    pub concealed_ms: u64,
    /// Longest run of concealed audio, ms.
    pub max_gap_ms: u64,
    /// From placing (or being invited) to connected, ms.
    pub setup_ms: Option<u64>,
    /// From placing (or being invited) to the first audio played, ms.
    pub first_audio_ms: Option<u64>,
    /// From connected to now (or the end), seconds.
    pub duration_s: f64,
    /// E-model MOS estimate of what this side hears.
    pub mos_estimate: Option<f64>,
    /// The receive pipeline's counters.
    pub media: peercall_media::CallStats,
}

/// Node-wide call counters, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallCounters {
    /// Calls placed.
    pub outgoing: u64,
    /// Calls received (invitations that created a call).
    pub incoming: u64,
    /// Calls not ended (a gauge).
    pub active: u64,
    /// Ended calls by outcome, indexed like [`EndReason::LABELS`].
    pub ended: [u64; EndReason::LABELS.len()],
    /// Set-up times: counts per bucket of [`SETUP_BUCKETS_MS`], plus +Inf last.
    pub setup_buckets: [u64; SETUP_BUCKETS_MS.len() + 1],
    /// Sum of set-up times, ms.
    pub setup_ms_sum: u64,
    /// Active paths of live calls by kind (a gauge): direct, relay1, relay2.
    pub active_paths: [u64; 3],
    /// Paths that came up, by kind: direct, relay1, relay2.
    pub paths_up: [u64; 3],
    /// Active path changes.
    pub path_switches: u64,
    /// Frames concealed in ended calls plus live ones.
    pub frames_concealed: u64,
    /// Invitations busy-rejected.
    pub busy_rejected: u64,
    /// Invitations whose record did not verify or did not match the session
    /// (forged): dropped.
    pub forged_invites: u64,
    /// Call messages that did not decode, or for no known call: dropped.
    pub bad_messages: u64,
    /// Relay channel requests refused by relays.
    pub relay_refusals: u64,
    /// Packets for a path that had no route: dropped.
    pub unroutable: u64,
    /// Relay messages dropped (no session to the relay, queue full).
    pub relay_msgs_dropped: u64,
}

/// Index of a path kind in the per-kind counters.
pub fn kind_index(kind: PathKind) -> usize {
    match kind {
        PathKind::Direct => 0,
        PathKind::Relay1 => 1,
        PathKind::Relay2 => 2,
    }
}

/// A message sent until answered.
#[derive(Debug, Clone)]
struct Resend {
    msg: CallMsg,
    next: Time,
    left: u32,
}

/// A relayed path of a call, from this side.
#[derive(Debug, Clone)]
struct RelayPath {
    id: PathId,
    kind: PathKind,
    /// The relay this side talks to.
    relay: Sn,
    /// For two-relay paths: the other side's relay.
    via: Option<Sn>,
    channel: Option<u32>,
    ready: bool,
    /// In the router.
    added: bool,
    /// When to (re-)send the allocation.
    next_alloc: Time,
}

/// Frames kept after sending, for the router's re-sends when a path fails
/// ([`peercall_router::SendPlan::resend`]): eight frames (160 ms) cover what is in
/// flight and unanswered on a path with up to ~100 ms RTT when the quiet trigger
/// fires; older frames would come too late to play anyway.
const RESEND_KEEP: usize = 8;

/// One frame kept for a re-send: when it went out, its stream numbers, and where
/// its payload sits in [`Audio::kept_data`].
#[derive(Debug, Clone, Copy, Default)]
struct Kept {
    sent: Option<Time>,
    seq: u32,
    timestamp: u32,
    flags: u8,
    len: usize,
}

struct Audio {
    encoder: Encoder,
    packetizer: Packetizer,
    receiver: Receiver,
    buf: Vec<u8>,
    /// The last [`RESEND_KEEP`] frames sent, a ring by sending order.
    kept: [Kept; RESEND_KEEP],
    /// Their payloads, `MAX_OPUS_PACKET` bytes per slot, allocated once.
    kept_data: Vec<u8>,
    kept_next: usize,
}

impl Audio {
    /// The kept frames sent at or after `since`, oldest first, as ring slots.
    fn kept_since(&self, since: Time) -> impl Iterator<Item = usize> + '_ {
        (0..RESEND_KEEP)
            .map(move |k| (self.kept_next + k) % RESEND_KEEP)
            .filter(move |&i| self.kept[i].sent.is_some_and(|t| t >= since))
    }

    fn kept_media(&self, i: usize, path: PathId, path_seq: u32) -> Media<'_> {
        let k = &self.kept[i];
        let at = i * peercall_wire::frame::MAX_OPUS_PACKET;
        Media {
            path,
            path_seq,
            seq: k.seq,
            timestamp: k.timestamp,
            flags: k.flags | Media::FLAG_REDUNDANT,
            payload: &self.kept_data[at..at + k.len],
        }
    }

    /// Keeps the frame just sent, whose payload is the first `len` bytes of `buf`.
    fn keep(&mut self, now: Time, seq: u32, timestamp: u32, flags: u8, len: usize) {
        let i = self.kept_next;
        let at = i * peercall_wire::frame::MAX_OPUS_PACKET;
        let len = len.min(peercall_wire::frame::MAX_OPUS_PACKET);
        self.kept_data[at..at + len].copy_from_slice(&self.buf[..len]);
        self.kept[i] = Kept {
            sent: Some(now),
            seq,
            timestamp,
            flags,
            len,
        };
        self.kept_next = (i + 1) % RESEND_KEEP;
    }
}

impl std::fmt::Debug for Audio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audio").finish_non_exhaustive()
    }
}

/// Where a frame to send comes from.
enum Source<'a> {
    /// Capture to encode.
    Pcm(&'a [i16; FRAME_SAMPLES]),
    /// An Opus packet coded elsewhere, after `skipped` frames it never sent.
    Opus { opus: &'a [u8], skipped: u32 },
}

#[derive(Debug)]
struct Call {
    id: CallId,
    number: u64,
    outgoing: bool,
    state: CallState,
    lookup: Option<RequestId>,
    peer: Option<PeerKey>,
    user: Option<UserId>,
    handle: Option<Handle>,
    peer_homes: Vec<Sn>,
    candidates: Vec<SocketAddr>,
    started: Time,
    deadline: Option<Time>,
    next_handshake: Option<Time>,
    punch_until: Option<Time>,
    next_punch: Time,
    direct: Option<SocketAddr>,
    paths: Vec<RelayPath>,
    offer_version: u32,
    offered: bool,
    resends: Vec<Resend>,
    router: Router,
    audio: Option<Audio>,
    connected_at: Option<Time>,
    first_audio_at: Option<Time>,
    ended_at: Option<Time>,
    end: Option<EndReason>,
    last_heard: Time,
    frames_sent: u64,
    /// Media copies beyond the first of each frame: redundancy and re-sends.
    frames_duplicated: u64,
    frames_received: u64,
    gap_ms: u64,
    max_gap_ms: u64,
    playing: bool,
    /// Opus pass-through (see [`Node::set_opus_passthrough`]): audio comes from
    /// [`Node::push_opus`] and fresh frames go out as [`Event::CallOpus`].
    passthrough: bool,
    /// The pass-through source's last RTP-style timestamp, to count the frames it
    /// skipped.
    passthrough_ts: Option<u32>,
    next_feedback: Time,
    paths_used: Vec<PathKind>,
    unreachable: Option<Unreachable>,
    /// Ended and its relay channels given back.
    settled: bool,
}

impl Call {
    fn new(id: CallId, number: u64, outgoing: bool, now: Time, cfg: &CallConfig) -> Call {
        Call {
            id,
            number,
            outgoing,
            state: if outgoing {
                CallState::Resolving
            } else {
                CallState::Incoming
            },
            lookup: None,
            peer: None,
            user: None,
            handle: None,
            peer_homes: Vec::new(),
            candidates: Vec::new(),
            started: now,
            deadline: None,
            next_handshake: None,
            punch_until: None,
            next_punch: now,
            direct: None,
            paths: Vec::new(),
            offer_version: 0,
            offered: false,
            resends: Vec::new(),
            router: Router::new(
                now,
                RouterConfig {
                    redundancy: cfg.redundancy,
                },
            ),
            audio: None,
            connected_at: None,
            first_audio_at: None,
            ended_at: None,
            end: None,
            last_heard: now,
            frames_sent: 0,
            frames_duplicated: 0,
            frames_received: 0,
            gap_ms: 0,
            max_gap_ms: 0,
            playing: false,
            passthrough: false,
            passthrough_ts: None,
            next_feedback: now,
            paths_used: Vec::new(),
            unreachable: None,
            settled: false,
        }
    }

    fn live(&self) -> bool {
        self.state != CallState::Ended
    }

    fn add_candidate(&mut self, a: SocketAddr) {
        if a.port() != 0
            && !a.ip().is_unspecified()
            && !self.candidates.contains(&a)
            && self.candidates.len() < MAX_CANDIDATES
        {
            self.candidates.push(a);
        }
    }

    fn kind_of(&self, path: PathId) -> Option<PathKind> {
        self.router.path_kind(path)
    }

    fn next_timeout(&self) -> Option<Time> {
        let mut next: Option<Time> = None;
        let mut consider = |t: Option<Time>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Time| n.min(t)));
            }
        };
        if let Some(at) = self.ended_at {
            consider(Some(at + ENDED_LINGER));
            consider(self.resends.iter().map(|r| r.next).min());
            return next;
        }
        consider(self.deadline);
        consider(self.next_handshake);
        if self.punch_until.is_some() && self.direct.is_none() {
            consider(Some(self.next_punch));
        }
        consider(self.resends.iter().map(|r| r.next).min());
        consider(self.paths.iter().map(|p| p.next_alloc).min());
        if self.peer.is_some() && self.state != CallState::Resolving {
            consider(self.router.poll_timeout());
        }
        next
    }
}

/// Calls, their paths, and relay channels held as a client.
#[derive(Debug)]
pub(crate) struct Calls {
    cfg: CallConfig,
    rng: ChaCha20Rng,
    next_id: u64,
    calls: Vec<Call>,
    /// Our channels at relays: (relay, channel).
    channels: Map<(PeerKey, u32), CallId>,
    /// Relay messages waiting for a session with their supernode.
    relay_queue: Map<PeerKey, VecDeque<Vec<u8>>>,
    /// Counters.
    pub(crate) stats: CallCounters,
}

impl Calls {
    pub(crate) fn new(cfg: CallConfig, seed: [u8; 32]) -> Calls {
        let mut rng = ChaCha20Rng::from_seed(seed);
        Calls {
            cfg,
            channels: map(&mut rng),
            relay_queue: map(&mut rng),
            rng,
            next_id: 1,
            calls: Vec::new(),
            stats: CallCounters::default(),
        }
    }

    fn get(&self, id: CallId) -> Option<&Call> {
        self.calls.iter().find(|c| c.id == id)
    }

    /// The live call with `peer`, newest first.
    fn by_peer(&self, peer: &PeerKey) -> Option<CallId> {
        self.calls
            .iter()
            .rev()
            .find(|c| c.live() && c.peer.as_ref() == Some(peer))
            .map(|c| c.id)
    }

    /// A best address for a session that came up through a relay or signalling.
    pub(crate) fn address_hint(&self, key: &PeerKey, origin: &Origin) -> Option<SocketAddr> {
        match origin {
            Origin::Direct(a) => Some(*a),
            Origin::Signal { observed, .. } => Some(*observed),
            Origin::Relay { .. } => self
                .by_peer(key)
                .and_then(|id| self.get(id))
                .and_then(|c| c.candidates.first().copied()),
        }
    }

    pub(crate) fn is_our_channel(&self, relay: &PeerKey, channel: u32) -> bool {
        self.channels.contains_key(&(*relay, channel))
    }

    pub(crate) fn keeps_session(&self, key: &PeerKey) -> bool {
        self.calls.iter().any(|c| {
            c.live()
                && (c.peer.as_ref() == Some(key)
                    || c.paths.iter().any(|p| PeerKey(p.relay.key) == *key))
        })
    }

    pub(crate) fn owns_lookup(&self, id: RequestId) -> bool {
        self.calls.iter().any(|c| c.lookup == Some(id))
    }

    pub(crate) fn counters(&self) -> CallCounters {
        let mut s = self.stats.clone();
        s.active = self.calls.iter().filter(|c| c.live()).count() as u64;
        s.active_paths = [0; 3];
        for c in self.calls.iter().filter(|c| c.live()) {
            if let Some(k) = c.router.active().and_then(|p| c.kind_of(p)) {
                s.active_paths[kind_index(k)] += 1;
            }
            if let Some(a) = &c.audio {
                s.frames_concealed += a.receiver.stats().concealed;
            }
        }
        s
    }

    /// Holds a relay message until the session with `to` is up; false when full.
    pub(crate) fn queue_relay_msg(&mut self, to: PeerKey, body: Vec<u8>) -> bool {
        let q = self.relay_queue.entry(to).or_default();
        if q.len() >= MAX_QUEUED_RELAY_MSGS {
            return false;
        }
        q.push_back(body);
        true
    }

    fn new_id(&mut self) -> CallId {
        let id = CallId(self.next_id);
        self.next_id += 1;
        id
    }
}

/// What the relay service sees of the node.
struct Env<'a> {
    overlay: &'a peercall_overlay::Overlay,
    peers: &'a Map<PeerKey, crate::node::Peer>,
}

impl RelayEnv for Env<'_> {
    fn relays(&self) -> bool {
        self.overlay.is_supernode()
    }
    fn session_addr(&self, key: &PeerKey) -> Option<SocketAddr> {
        self.peers
            .get(key)
            .filter(|p| p.via.is_none())
            .map(|p| p.addr)
    }
    fn is_client(&self, key: &PeerKey) -> bool {
        self.overlay.is_client(key)
    }
    fn member_addr(&self, key: &PeerKey) -> Option<SocketAddr> {
        self.overlay.member_addr(key)
    }
}

fn sn(key: PeerKey, addr: SocketAddr) -> Sn {
    Sn { key: key.0, addr }
}

impl Node {
    // ---- public API ----------------------------------------------------------------

    /// Places a call to `to`. Progress comes as events ([`Event::CallRinging`],
    /// [`Event::CallConnected`], [`Event::CallEnded`] with the reason it failed).
    pub fn call(&mut self, now: Time, to: CallTarget) -> CallId {
        let id = self.calls.new_id();
        let number = self.calls.rng.next_u64();
        let mut call = Call::new(id, number, true, now, &self.calls.cfg);
        self.calls.stats.outgoing += 1;
        if self.is_closing() {
            self.calls.calls.push(call);
            self.end_call(now, id, EndReason::Unreachable(Unreachable::Shutdown));
            return id;
        }
        let what = match to {
            CallTarget::User(u) => Lookup::User(u),
            CallTarget::Handle(h) => Lookup::Handle(h),
        };
        call.lookup = Some(self.overlay.lookup(now, what));
        call.deadline = Some(now + self.calls.cfg.connect_timeout);
        self.calls.calls.push(call);
        self.drain_overlay(now);
        id
    }

    /// Answers an incoming call.
    pub fn answer(&mut self, now: Time, id: CallId) -> Result<(), CallError> {
        let call = self.calls.get(id).ok_or(CallError::UnknownCall(id))?;
        if call.state != CallState::Incoming {
            return Err(CallError::State {
                call: id,
                state: call.state.label(),
                what: "answer",
            });
        }
        let number = call.number;
        self.send_reliable(now, id, CallMsg::Accept { call: number });
        self.connect_call(now, id);
        Ok(())
    }

    /// Declines an incoming call.
    pub fn reject(&mut self, now: Time, id: CallId) -> Result<(), CallError> {
        let call = self.calls.get(id).ok_or(CallError::UnknownCall(id))?;
        if call.state != CallState::Incoming {
            return Err(CallError::State {
                call: id,
                state: call.state.label(),
                what: "reject",
            });
        }
        let number = call.number;
        self.send_reliable(
            now,
            id,
            CallMsg::Reject {
                call: number,
                reason: RejectCode::Declined,
            },
        );
        self.end_call(now, id, EndReason::Rejected);
        Ok(())
    }

    /// Hangs up (or cancels) a call.
    pub fn hangup(&mut self, now: Time, id: CallId) -> Result<(), CallError> {
        let call = self.calls.get(id).ok_or(CallError::UnknownCall(id))?;
        if !call.live() {
            return Err(CallError::State {
                call: id,
                state: call.state.label(),
                what: "hang up",
            });
        }
        let number = call.number;
        if call.peer.is_some_and(|p| self.peers.contains_key(&p)) {
            self.send_reliable(
                now,
                id,
                CallMsg::Hangup {
                    call: number,
                    reason: HangupCode::Normal,
                },
            );
        }
        self.end_call(now, id, EndReason::HungUp(Side::Local));
        Ok(())
    }

    /// Feeds 20 ms of 48 kHz mono capture for call `id`; sent when the call is
    /// active and a path works (dropped otherwise). Ignored while the call passes
    /// Opus through ([`Node::set_opus_passthrough`]).
    pub fn push_audio(
        &mut self,
        now: Time,
        id: CallId,
        pcm: &[i16; FRAME_SAMPLES],
    ) -> Result<(), CallError> {
        self.send_audio(now, id, Source::Pcm(pcm))
    }

    /// Sends one 20 ms Opus packet coded elsewhere (a browser) in call `id`, which
    /// must pass Opus through ([`Node::set_opus_passthrough`]). `timestamp` is the
    /// source's 48 kHz RTP timestamp: a jump of more than one frame (the source's
    /// DTX, or a packet lost on its way here) moves the stream's timestamp alike,
    /// so the far end conceals the gap instead of shortening it. Packets of another
    /// duration are refused (the far end's jitter buffer plays 20 ms frames).
    pub fn push_opus(
        &mut self,
        now: Time,
        id: CallId,
        timestamp: u32,
        opus: &[u8],
    ) -> Result<(), CallError> {
        let call = find_mut(&mut self.calls.calls, id).ok_or(CallError::UnknownCall(id))?;
        if !call.passthrough {
            return Err(CallError::State {
                call: id,
                state: call.state.label(),
                what: "take Opus without pass-through",
            });
        }
        if opus.len() > peercall_wire::frame::MAX_OPUS_PACKET {
            return Err(CallError::Media(format!(
                "Opus packet of {} bytes, more than {}",
                opus.len(),
                peercall_wire::frame::MAX_OPUS_PACKET
            )));
        }
        match peercall_media::codec::packet_samples(opus) {
            Some(FRAME_SAMPLES) => {}
            Some(n) => {
                return Err(CallError::Media(format!(
                    "Opus packet of {} ms, only 20 ms frames are carried",
                    n / 48
                )));
            }
            None => return Err(CallError::Media("malformed Opus packet".into())),
        }
        // Frames the source skipped since its last packet: a forward jump of a
        // few frames (a step back or a huge jump is a new source clock: no skip).
        let skipped = call.passthrough_ts.map_or(0, |last| {
            let frames = timestamp.wrapping_sub(last) / FRAME_SAMPLES as u32;
            if (2..=MAX_PASSTHROUGH_SKIP).contains(&frames) {
                frames - 1
            } else {
                0
            }
        });
        call.passthrough_ts = Some(timestamp);
        self.send_audio(now, id, Source::Opus { opus, skipped })
    }

    /// Turns Opus pass-through on or off for call `id` (any live state). While it
    /// is on, [`Node::push_opus`] feeds the call and [`Node::push_audio`] is
    /// ignored, and the first copy of every media frame received is also handed
    /// out as [`Event::CallOpus`]; [`Node::pull_audio`] keeps decoding (the call's
    /// statistics need it) for a shell that wants it.
    pub fn set_opus_passthrough(&mut self, id: CallId, on: bool) -> Result<(), CallError> {
        let call = find_mut(&mut self.calls.calls, id).ok_or(CallError::UnknownCall(id))?;
        if !call.live() {
            return Err(CallError::State {
                call: id,
                state: call.state.label(),
                what: "change its audio source",
            });
        }
        call.passthrough = on;
        call.passthrough_ts = None;
        Ok(())
    }

    fn send_audio(&mut self, now: Time, id: CallId, source: Source<'_>) -> Result<(), CallError> {
        let call = find_mut(&mut self.calls.calls, id).ok_or(CallError::UnknownCall(id))?;
        if call.state != CallState::Active || (call.passthrough && matches!(source, Source::Pcm(_)))
        {
            return Ok(());
        }
        let Some(peer) = call.peer else {
            return Ok(());
        };
        // The audio state leaves the call while its packet is sent (the payload
        // borrows its buffer): no copy, no allocation per frame.
        let Some(mut audio) = call.audio.take() else {
            return Ok(());
        };
        let n = match source {
            Source::Pcm(pcm) => match audio.encoder.encode(pcm, &mut audio.buf) {
                Ok(n) => n,
                Err(e) => {
                    call.audio = Some(audio);
                    return Err(CallError::Media(e.to_string()));
                }
            },
            Source::Opus { opus, skipped } => {
                audio.packetizer.skip(skipped);
                audio.buf[..opus.len()].copy_from_slice(opus);
                opus.len()
            }
        };
        let plan = call.router.send_plan(now);
        let mut sends: [Option<(PathId, u32, Route)>; 2] = [None, None];
        // Re-sends first, so the frames go out in order on their new path.
        let resends = plan_resends(now, call, &audio);
        let frame = audio.packetizer.packetize(&audio.buf[..n]);
        let sent = frame.filter(|_| plan.primary.is_some());
        if sent.is_some() {
            call.frames_sent += 1;
            call.frames_duplicated += u64::from(plan.redundant.is_some());
            for (slot, path) in sends.iter_mut().zip(plan.paths()) {
                if let (Ok(path_seq), Some(route)) =
                    (call.router.on_media_sent(now, path), route_of(call, path))
                {
                    *slot = Some((path, path_seq, route));
                }
            }
        }
        self.send_resends(now, peer, &audio, resends);
        if let Some(frame) = sent {
            let redundant = plan.redundant.is_some();
            for (path, path_seq, route) in sends.into_iter().flatten() {
                let media = frame.to_media(path, path_seq);
                let media = Media {
                    flags: media.flags | if redundant { Media::FLAG_REDUNDANT } else { 0 },
                    ..media
                };
                self.send_on(now, peer, route, &Frame::Media(media));
            }
            let (seq, timestamp, flags) = (frame.seq, frame.timestamp, frame.flags);
            audio.keep(now, seq, timestamp, flags, n);
        }
        if let Some(call) = find_mut(&mut self.calls.calls, id) {
            call.audio = Some(audio);
        }
        self.drive_call(now, id);
        Ok(())
    }

    /// Fills `out` with the next 20 ms of call `id`'s playout (silence until audio
    /// arrives).
    pub fn pull_audio(
        &mut self,
        now: Time,
        id: CallId,
        out: &mut [i16; FRAME_SAMPLES],
    ) -> Result<(), CallError> {
        let call = find_mut(&mut self.calls.calls, id).ok_or(CallError::UnknownCall(id))?;
        let Some(audio) = call
            .audio
            .as_mut()
            .filter(|_| call.state == CallState::Active)
        else {
            out.fill(0);
            return Ok(());
        };
        match audio.receiver.pull(now, out) {
            Pulled::Idle => {}
            Pulled::Decoded { .. } | Pulled::FecRecovered { .. } | Pulled::DredRecovered { .. } => {
                if call.first_audio_at.is_none() {
                    call.first_audio_at = Some(now);
                }
                call.playing = true;
                call.gap_ms = 0;
            }
            Pulled::Concealed if call.playing => {
                call.gap_ms += FRAME_MS;
                call.max_gap_ms = call.max_gap_ms.max(call.gap_ms);
            }
            _ => {}
        }
        Ok(())
    }

    /// Snapshots of every call (live ones and those ended in the last minute).
    pub fn calls(&self, now: Time) -> Vec<CallStats> {
        self.calls
            .calls
            .iter()
            .map(|c| call_stats(c, now))
            .collect()
    }

    /// A snapshot of one call.
    pub fn call_stats(&self, now: Time, id: CallId) -> Option<CallStats> {
        self.calls.get(id).map(|c| call_stats(c, now))
    }

    // ---- hooks from the node -----------------------------------------------------

    pub(crate) fn on_call_lookup(
        &mut self,
        now: Time,
        req: RequestId,
        result: Result<Found, LookupError>,
    ) {
        let Some(id) = self
            .calls
            .calls
            .iter()
            .find(|c| c.lookup == Some(req))
            .map(|c| c.id)
        else {
            return;
        };
        if let Some(c) = find_mut(&mut self.calls.calls, id) {
            c.lookup = None;
        }
        let found = match result {
            Ok(f) => f,
            Err(LookupError::NotFound) => return self.end_call(now, id, EndReason::NotFound),
            Err(LookupError::Timeout) => {
                return self.end_call(now, id, EndReason::Unreachable(Unreachable::LookupTimeout));
            }
            Err(LookupError::NotAttached) => {
                return self.end_call(now, id, EndReason::Unreachable(Unreachable::NotAttached));
            }
        };
        let record = &found.record;
        let key = record.body.static_key;
        if !found.online || record.body.endpoints.is_empty() && record.body.supernodes.is_empty() {
            return self.end_call(now, id, EndReason::Unreachable(Unreachable::Offline));
        }
        if key == self.config.identity.peer_key() {
            return self.end_call(now, id, EndReason::NotFound);
        }
        let my_homes: Vec<Sn> = self
            .overlay
            .homes()
            .into_iter()
            .map(|(k, a)| sn(k, a))
            .collect();
        let me = self.config.identity.peer_key();
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        call.peer = Some(key);
        call.user = Some(record.user_id());
        call.handle = record.body.handle.clone();
        call.peer_homes = record
            .body
            .supernodes
            .iter()
            .map(|h| sn(h.key, h.addr))
            .collect();
        for a in &record.body.endpoints {
            call.add_candidate(*a);
        }
        call.state = CallState::Connecting;
        // Relayed paths: one-relay through the callee's and our homes, two-relay
        // from ours to theirs.
        let mut relays: Vec<Sn> = Vec::new();
        let mut theirs = call.peer_homes.iter();
        let mut ours = my_homes.iter();
        loop {
            let (t, o) = (theirs.next(), ours.next());
            if t.is_none() && o.is_none() {
                break;
            }
            for s in t.into_iter().chain(o) {
                if relays.len() < MAX_RELAY1
                    && PeerKey(s.key) != me
                    && PeerKey(s.key) != key
                    && !relays.iter().any(|r| r.key == s.key)
                {
                    relays.push(*s);
                }
            }
        }
        let mut next_id = DIRECT_PATH + 1;
        for r in relays {
            call.paths.push(RelayPath {
                id: next_id,
                kind: PathKind::Relay1,
                relay: r,
                via: None,
                channel: None,
                ready: false,
                added: false,
                next_alloc: now,
            });
            next_id += 1;
        }
        let pair = my_homes.iter().find_map(|a| {
            call.peer_homes
                .iter()
                .find(|b| b.key != a.key && PeerKey(b.key) != key)
                .map(|b| (*a, *b))
        });
        if let Some((a, b)) = pair
            && PeerKey(a.key) != me
        {
            call.paths.push(RelayPath {
                id: next_id,
                kind: PathKind::Relay2,
                relay: a,
                via: Some(b),
                channel: None,
                ready: false,
                added: false,
                next_alloc: now,
            });
        }
        call.router
            .add_path(now, DIRECT_PATH, PathKind::Direct)
            .expect("a new router has room for the direct path");
        self.allocate_paths(now, id);
        // A session with the callee (left from an earlier call) carries the invite
        // at once; but its path may have died since, unnoticed until the session
        // times out, so a new handshake, sent directly and through the callee's
        // supernodes, always runs beside it, and the session it makes carries the
        // invite's re-sends if the old one does not.
        if self.peers.contains_key(&key) {
            self.call_session_up(now, id, None);
        }
        self.call_handshake(now, id);
    }

    /// A session came up (either side initiated).
    pub(crate) fn on_session_established(&mut self, now: Time, key: PeerKey, origin: Origin) {
        if let Some(q) = self.calls.relay_queue.remove(&key) {
            for body in q {
                if let Some(p) = self.peers.get(&key) {
                    let route = Route::Direct(p.addr);
                    self.send_on(now, key, route, &Frame::RelayControl(&body));
                }
            }
        }
        if let Some(id) = self.calls.by_peer(&key) {
            self.call_session_up(now, id, Some(origin));
        }
    }

    /// A session ended.
    pub(crate) fn on_session_down(&mut self, now: Time, key: PeerKey) {
        if let Some(q) = self.calls.relay_queue.remove(&key) {
            self.calls.stats.relay_msgs_dropped += q.len() as u64;
        }
        let ids: Vec<CallId> = self
            .calls
            .calls
            .iter()
            .filter(|c| c.live())
            .map(|c| c.id)
            .collect();
        for id in ids {
            let Some(call) = find_mut(&mut self.calls.calls, id) else {
                continue;
            };
            if call.peer == Some(key) && call.state != CallState::Connecting {
                self.end_call(now, id, EndReason::Lost);
                continue;
            }
            let mut gone = Vec::new();
            for p in call.paths.iter_mut() {
                if PeerKey(p.relay.key) == key {
                    if let Some(ch) = p.channel.take() {
                        gone.push(ch);
                    }
                    p.ready = false;
                    p.next_alloc = now + RELAY_RETRY;
                    if p.added {
                        p.added = false;
                        let _ = call.router.remove_path(now, p.id);
                    }
                }
            }
            for ch in gone {
                self.calls.channels.remove(&(key, ch));
            }
        }
    }

    /// An authenticated keepalive from `key`.
    pub(crate) fn on_call_keepalive(&mut self, now: Time, key: PeerKey, origin: Origin) {
        if let Some(id) = self.calls.by_peer(&key) {
            self.note_origin(now, id, key, origin);
            self.drive_call(now, id);
        }
    }

    /// A call-layer frame (probe, ack, media, report, call control) from `key`.
    pub(crate) fn on_call_frame(
        &mut self,
        now: Time,
        key: PeerKey,
        origin: Origin,
        frame: &Frame<'_>,
    ) {
        if let Frame::Call(body) = frame {
            return self.on_call_msg(now, key, origin, body);
        }
        let Some(id) = self.calls.by_peer(&key) else {
            self.stats.drop(DropReason::Unexpected);
            return;
        };
        self.note_origin(now, id, key, origin);
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        match frame {
            Frame::Probe(p) => {
                if let Ok(ack) = call.router.on_probe(now, p)
                    && let Some(route) = route_of(call, p.path)
                {
                    self.send_on(now, key, route, &Frame::ProbeAck(ack));
                }
            }
            Frame::ProbeAck(a) => {
                let _ = call.router.on_probe_ack(now, a);
            }
            Frame::Report(r) => {
                let _ = call.router.on_report(now, r);
            }
            Frame::Media(m) => {
                if let Ok(Delivery::Fresh) = call.router.on_media_received(now, m)
                    && let Some(audio) = call.audio.as_mut()
                {
                    call.frames_received += 1;
                    audio.receiver.push(now, m);
                    if call.passthrough {
                        self.events.push_back(Event::CallOpus {
                            call: id,
                            seq: m.seq,
                            timestamp: m.timestamp,
                            opus: m.payload.to_vec(),
                        });
                    }
                }
            }
            _ => {}
        }
        self.drive_call(now, id);
    }

    /// A relay control message on the hop session with `from`.
    pub(crate) fn on_relay_control(
        &mut self,
        now: Time,
        from: PeerKey,
        from_addr: SocketAddr,
        body: &[u8],
    ) {
        let msg = match RelayMsg::decode(body) {
            Ok(m) => m,
            Err(_) => {
                self.stats.drop(DropReason::Malformed);
                return;
            }
        };
        match msg {
            RelayMsg::Allocate { .. }
            | RelayMsg::Release { .. }
            | RelayMsg::Signal { .. }
            | RelayMsg::Link { .. }
            | RelayMsg::Unlink { .. } => {
                let env = Env {
                    overlay: &self.overlay,
                    peers: &self.peers,
                };
                self.relay.handle(now, &env, from, from_addr, msg);
                self.drain_relay(now);
            }
            RelayMsg::Signalled {
                from: sender,
                observed,
                packet,
            } => {
                let origin = Origin::Signal {
                    relay: from,
                    from: PeerKey(sender),
                    observed,
                };
                self.handle_peercall(now, origin, &packet);
            }
            RelayMsg::SignalRefused { to, reason } => {
                if let Some(id) = self.calls.by_peer(&PeerKey(to))
                    && let Some(c) = find_mut(&mut self.calls.calls, id)
                {
                    c.unreachable = Some(Unreachable::SignalRefused(reason));
                }
            }
            RelayMsg::Allocated {
                peer,
                via,
                channel,
                ready,
                ..
            } => self.on_allocated(now, from, PeerKey(peer), via, channel, ready),
            RelayMsg::Ready { channel } => {
                if let Some(&id) = self.calls.channels.get(&(from, channel)) {
                    self.path_ready(now, id, from, channel);
                }
            }
            RelayMsg::Refused { peer, via, reason } => {
                self.calls.stats.relay_refusals += 1;
                tracing::debug!(reason = reason.label(), "relay refused a channel");
                self.relay_path_gone(now, from, PeerKey(peer), via);
            }
            RelayMsg::Closed { channel } => {
                if let Some(id) = self.calls.channels.remove(&(from, channel))
                    && let Some(c) = find_mut(&mut self.calls.calls, id)
                    && let Some(p) = c
                        .paths
                        .iter_mut()
                        .find(|p| PeerKey(p.relay.key) == from && p.channel == Some(channel))
                {
                    p.channel = None;
                    p.ready = false;
                    p.next_alloc = now;
                    if p.added {
                        p.added = false;
                        let _ = c.router.remove_path(now, p.id);
                    }
                }
            }
        }
    }

    /// Timers of every call.
    pub(crate) fn calls_timeout(&mut self, now: Time) {
        let ids: Vec<CallId> = self.calls.calls.iter().map(|c| c.id).collect();
        for id in ids {
            self.call_timer(now, id);
        }
        // Ended calls released their channels when they ended; their snapshots go
        // after the linger.
        self.calls
            .calls
            .retain(|c| c.ended_at.is_none_or(|t| now < t + ENDED_LINGER));
    }

    /// The earliest call timer.
    pub(crate) fn calls_poll_timeout(&self) -> Option<Time> {
        self.calls
            .calls
            .iter()
            .filter_map(|c| {
                let lost = (c.live()
                    && c.peer.is_some()
                    && !matches!(c.state, CallState::Resolving | CallState::Connecting))
                .then(|| c.last_heard + self.calls.cfg.lost_timeout);
                match (c.next_timeout(), lost) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            })
            .min()
    }

    /// Hangs up every call (the node is closing).
    pub(crate) fn hangup_all(&mut self, now: Time) {
        let ids: Vec<CallId> = self
            .calls
            .calls
            .iter()
            .filter(|c| c.live())
            .map(|c| c.id)
            .collect();
        for id in ids {
            if let Some(c) = self.calls.get(id)
                && c.peer.is_some_and(|p| self.peers.contains_key(&p))
            {
                let msg = CallMsg::Hangup {
                    call: c.number,
                    reason: HangupCode::Shutdown,
                };
                self.send_call_msg(now, id, &msg);
            }
            self.end_call(now, id, EndReason::HungUp(Side::Local));
        }
    }

    // ---- internals -----------------------------------------------------------------

    fn call_timer(&mut self, now: Time, id: CallId) {
        let lost_timeout = self.calls.cfg.lost_timeout;
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        // Re-sends.
        let mut due = Vec::new();
        for r in call.resends.iter_mut() {
            if r.next <= now {
                if r.left == 0 {
                    continue;
                }
                r.left -= 1;
                r.next = now + RESEND_INTERVAL;
                due.push(r.msg.clone());
            }
        }
        call.resends.retain(|r| r.left > 0 || r.next > now);
        let ended = !call.live();
        let settle = ended && call.resends.is_empty();
        for msg in due {
            self.send_call_msg(now, id, &msg);
        }
        if settle {
            self.settle_call(now, id);
        }
        if ended {
            return;
        }
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        if call.deadline.is_some_and(|d| d <= now) {
            let reason = match call.state {
                CallState::Ringing => EndReason::NoAnswer,
                CallState::Incoming => EndReason::NoAnswer,
                CallState::Resolving => EndReason::Unreachable(Unreachable::LookupTimeout),
                _ => EndReason::Unreachable(call.unreachable.unwrap_or(
                    if call.peer.is_some_and(|p| self.peers.contains_key(&p)) {
                        Unreachable::NoInviteAnswer
                    } else {
                        Unreachable::NoHandshake
                    },
                )),
            };
            if matches!(reason, EndReason::NoAnswer) && call.outgoing {
                let msg = CallMsg::Hangup {
                    call: call.number,
                    reason: HangupCode::NoAnswer,
                };
                self.send_reliable(now, id, msg);
            }
            return self.end_call(now, id, reason);
        }
        if call.peer.is_some()
            && !matches!(call.state, CallState::Resolving | CallState::Connecting)
            && now.saturating_since(call.last_heard) >= lost_timeout
        {
            let msg = CallMsg::Hangup {
                call: call.number,
                reason: HangupCode::Lost,
            };
            self.send_call_msg(now, id, &msg);
            return self.end_call(now, id, EndReason::Lost);
        }
        let invite_waits = call.outgoing
            && call.state == CallState::Connecting
            && !call.offered
            && call.peer.is_some_and(|p| self.peers.contains_key(&p));
        if call.next_handshake.is_some_and(|t| t <= now) {
            self.call_handshake(now, id);
        }
        if invite_waits && self.overlay.own_record().is_some() {
            self.call_session_up(now, id, None);
        }
        self.punch(now, id);
        self.allocate_paths(now, id);
        if let Some(call) = find_mut(&mut self.calls.calls, id) {
            call.router.handle_timeout(now);
        }
        self.drive_call(now, id);
    }

    /// Sends a fresh IK initiation to the callee's endpoints and through its homes.
    fn call_handshake(&mut self, now: Time, id: CallId) {
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        let Some(key) = call.peer else {
            return;
        };
        call.next_handshake = Some(now + HANDSHAKE_RETRY);
        let candidates = call.candidates.clone();
        let homes = call.peer_homes.clone();
        let to = candidates.first().copied().unwrap_or(UNSPECIFIED);
        let mut buf = vec![0u8; peercall_wire::MAX_DATAGRAM];
        let len = match self.endpoint.initiate(now, to, Some(key), &mut buf) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "cannot initiate call handshake");
                return;
            }
        };
        self.stats.handshakes_initiated += 1;
        let packet = &buf[..len];
        for c in candidates {
            self.send_bytes(now, Route::Direct(c), packet);
        }
        for h in homes {
            let msg = RelayMsg::Signal {
                to: key.0,
                packet: packet.to_vec(),
            };
            self.send_relay_msg(now, PeerKey(h.key), Some(h.addr), &msg);
        }
    }

    /// The session with the call's peer is up: invite (caller), start punching.
    fn call_session_up(&mut self, now: Time, id: CallId, origin: Option<Origin>) {
        let own = self.overlay.own_record().map(<[u8]>::to_vec);
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        let Some(key) = call.peer else {
            return;
        };
        call.next_handshake = None;
        if call.punch_until.is_none() {
            call.punch_until = Some(now + PUNCH_WINDOW);
            call.next_punch = now;
        }
        if let Some(Origin::Signal { observed, .. }) = origin {
            call.add_candidate(observed);
        }
        if call.outgoing && call.state == CallState::Connecting && !call.offered {
            match own {
                Some(record) => {
                    call.offered = true;
                    let number = call.number;
                    let offer = paths_offer(call);
                    self.send_reliable(
                        now,
                        id,
                        CallMsg::Invite {
                            call: number,
                            record,
                        },
                    );
                    if let Some(offer) = offer {
                        self.send_reliable(now, id, offer);
                    }
                }
                // The invite carries it: the call timer tries again once the
                // overlay has published it (moments after attaching).
                None => tracing::debug!(%id, "no own record yet; the invite waits for it"),
            }
        }
        if let Some(o) = origin {
            self.note_origin(now, id, key, o);
        }
        self.punch(now, id);
        self.drive_call(now, id);
    }

    /// Keepalives to the peer's candidates while no direct path is known.
    fn punch(&mut self, now: Time, id: CallId) {
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        let Some(key) = call.peer else {
            return;
        };
        let Some(until) = call.punch_until else {
            return;
        };
        if call.direct.is_some() || now >= until {
            call.punch_until = None;
            return;
        }
        if call.next_punch > now {
            return;
        }
        call.next_punch = now + PUNCH_INTERVAL;
        if !self.peers.contains_key(&key) {
            return;
        }
        let candidates = call.candidates.clone();
        for c in candidates {
            self.send_on(now, key, Route::Direct(c), &Frame::Keepalive);
        }
    }

    /// Attributes an authenticated packet from the call's peer to a path.
    fn note_origin(&mut self, now: Time, id: CallId, key: PeerKey, origin: Origin) {
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        call.last_heard = now;
        match origin {
            Origin::Direct(addr) => {
                if call.direct != Some(addr) {
                    if call.direct.is_none() {
                        self.calls.stats.paths_up[0] += 1;
                    }
                    call.direct = Some(addr);
                }
                let _ = call.router.on_packet_received(now, DIRECT_PATH);
                // Node-level traffic (keepalives, rekeys) goes straight now.
                if let Some(p) = self.peers.get_mut(&key)
                    && p.via.is_some()
                {
                    p.via = None;
                    p.addr = addr;
                }
            }
            Origin::Relay { relay, channel } => {
                if let Some(p) = call.paths.iter().find(|p| {
                    PeerKey(p.relay.key) == relay && p.channel == Some(channel) && p.added
                }) {
                    let _ = call.router.on_packet_received(now, p.id);
                }
            }
            Origin::Signal { .. } => {}
        }
    }

    /// Sends the re-sends [`plan_resends`] numbered.
    fn send_resends(&mut self, now: Time, peer: PeerKey, audio: &Audio, resends: Resends) {
        if let Some((path, route, frames)) = resends {
            for (i, path_seq) in frames.into_iter().flatten() {
                let media = audio.kept_media(i, path, path_seq);
                self.send_on(now, peer, route, &Frame::Media(media));
            }
        }
    }

    /// Drains the router of a call: re-sends, probes, reports, events.
    fn drive_call(&mut self, now: Time, id: CallId) {
        if let Some(call) = find_mut(&mut self.calls.calls, id)
            && let Some(peer) = call.peer
            && let Some(audio) = call.audio.take()
        {
            let resends = plan_resends(now, call, &audio);
            self.send_resends(now, peer, &audio, resends);
            if let Some(call) = find_mut(&mut self.calls.calls, id) {
                call.audio = Some(audio);
            }
        }
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        let Some(key) = call.peer else {
            return;
        };
        if !call.live() {
            return;
        }
        // Without a session the probes are drained and dropped (nothing to encrypt
        // them with); the router counts them unanswered.
        let session = self.peers.contains_key(&key);
        let mut frames: Vec<(Route, Frame<'static>)> = Vec::new();
        let mut unroutable = 0u64;
        while let Some(p) = call.router.poll_probe(now) {
            match route_of(call, p.path) {
                Some(r) => frames.push((r, Frame::Probe(p))),
                None if p.path == DIRECT_PATH => {
                    for c in &call.candidates {
                        frames.push((Route::Direct(*c), Frame::Probe(p)));
                    }
                }
                None => unroutable += 1,
            }
        }
        while let Some(r) = call.router.poll_report(now) {
            match route_of(call, r.path) {
                Some(route) => frames.push((route, Frame::Report(r))),
                None => unroutable += 1,
            }
        }
        let mut events = Vec::new();
        while let Some(e) = call.router.poll_event() {
            if let RouterEvent::Switched { from, to, .. } = e {
                let from_kind = from.and_then(|p| call.kind_of(p));
                if let Some(to_kind) = call.kind_of(to) {
                    if !call.paths_used.contains(&to_kind) {
                        call.paths_used.push(to_kind);
                    }
                    if from.is_some() {
                        self.calls.stats.path_switches += 1;
                    }
                    if call.state == CallState::Active {
                        events.push(Event::CallPathSwitched {
                            call: id,
                            from: from_kind,
                            to: to_kind,
                        });
                    }
                }
            }
        }
        // Encoder feedback from the active path's loss.
        if call.next_feedback <= now
            && let Some(audio) = call.audio.as_mut()
        {
            call.next_feedback = now + FEEDBACK_INTERVAL;
            if let Some(active) = call.router.active() {
                let stats = call.router.stats(now);
                if let Some(p) = stats.paths.iter().find(|p| p.id == active) {
                    let fb = peercall_media::codec::PathFeedback {
                        loss_fraction: p.loss,
                        available_bps: None,
                    };
                    let _ = audio.encoder.on_feedback(&fb);
                }
            }
        }
        // Node-level traffic follows the active relayed path when no direct one.
        let via = match call.router.active() {
            Some(DIRECT_PATH) | None => None,
            Some(p) => route_of(call, p),
        };
        self.calls.stats.unroutable += unroutable;
        if let Some(route) = via
            && let Some(p) = self.peers.get_mut(&key)
            && p.via.is_some()
        {
            p.via = Some(route);
        }
        if session {
            for (route, frame) in frames {
                self.send_on(now, key, route, &frame);
            }
        }
        self.events.extend(events);
    }

    fn on_call_msg(&mut self, now: Time, key: PeerKey, origin: Origin, body: &[u8]) {
        let msg = match CallMsg::decode(body) {
            Ok(m) => m,
            Err(_) => {
                self.calls.stats.bad_messages += 1;
                return;
            }
        };
        let number = msg.call();
        let found = self
            .calls
            .calls
            .iter()
            .rev()
            .find(|c| c.peer == Some(key) && c.number == number)
            .map(|c| c.id);
        if let CallMsg::Invite { call, record } = &msg {
            return self.on_invite(now, key, origin, found, *call, record);
        }
        let Some(id) = found else {
            // Answer a hang-up for a call we forgot, so the peer stops re-sending.
            if matches!(msg, CallMsg::Hangup { .. } | CallMsg::Reject { .. }) {
                self.send_call_frame(now, key, None, &CallMsg::HangupAck { call: number });
            } else {
                self.calls.stats.bad_messages += 1;
            }
            return;
        };
        self.note_origin(now, id, key, origin);
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        let state = call.state;
        let outgoing = call.outgoing;
        let live = call.live();
        match msg {
            CallMsg::Invite { .. } => {}
            CallMsg::Ringing { .. } => {
                call.resends
                    .retain(|r| !matches!(r.msg, CallMsg::Invite { .. }));
                if outgoing && state == CallState::Connecting {
                    call.state = CallState::Ringing;
                    call.deadline = Some(now + self.calls.cfg.ring_timeout);
                    self.events.push_back(Event::CallRinging { call: id });
                }
            }
            CallMsg::Accept { .. } => {
                call.resends
                    .retain(|r| !matches!(r.msg, CallMsg::Invite { .. }));
                if outgoing {
                    self.send_call_msg(now, id, &CallMsg::Connected { call: number });
                    if matches!(state, CallState::Connecting | CallState::Ringing) {
                        self.connect_call(now, id);
                    }
                }
            }
            CallMsg::Connected { .. } => {
                call.resends
                    .retain(|r| !matches!(r.msg, CallMsg::Accept { .. }));
            }
            CallMsg::Reject { reason, .. } => {
                self.send_call_msg(now, id, &CallMsg::HangupAck { call: number });
                if live {
                    let why = match reason {
                        RejectCode::Busy => EndReason::Busy,
                        RejectCode::Declined => EndReason::Rejected,
                    };
                    self.end_call(now, id, why);
                }
            }
            CallMsg::Hangup { reason, .. } => {
                self.send_call_msg(now, id, &CallMsg::HangupAck { call: number });
                if live {
                    let why = match reason {
                        HangupCode::Normal | HangupCode::Shutdown => {
                            EndReason::HungUp(Side::Remote)
                        }
                        HangupCode::NoAnswer => EndReason::NoAnswer,
                        HangupCode::Lost => EndReason::Lost,
                    };
                    self.end_call(now, id, why);
                }
            }
            CallMsg::HangupAck { .. } => {
                call.resends
                    .retain(|r| !matches!(r.msg, CallMsg::Hangup { .. } | CallMsg::Reject { .. }));
                if !live && call.resends.is_empty() {
                    self.settle_call(now, id);
                }
            }
            CallMsg::Paths { version, paths, .. } => {
                if !outgoing && version >= call.offer_version && call.live() {
                    self.adopt_paths(now, id, version, paths);
                }
                self.send_call_msg(
                    now,
                    id,
                    &CallMsg::PathsAck {
                        call: number,
                        version,
                    },
                );
            }
            CallMsg::PathsAck { version, .. } => call
                .resends
                .retain(|r| !matches!(r.msg, CallMsg::Paths { version: v, .. } if v <= version)),
        }
        self.drive_call(now, id);
    }

    fn on_invite(
        &mut self,
        now: Time,
        key: PeerKey,
        origin: Origin,
        found: Option<CallId>,
        number: u64,
        record: &[u8],
    ) {
        if let Some(id) = found {
            // A re-sent invitation: answer again with where the call is.
            let Some(c) = self.calls.get(id) else {
                return;
            };
            let reply = match c.state {
                CallState::Incoming => CallMsg::Ringing {
                    call: number,
                    homes: self.home_sns(),
                },
                CallState::Active => CallMsg::Accept { call: number },
                _ => return,
            };
            self.note_origin(now, id, key, origin);
            self.send_call_msg(now, id, &reply);
            return;
        }
        let record = match Record::verify_at(record, now) {
            Ok(r) if r.body.static_key == key => r,
            _ => {
                self.calls.stats.forged_invites += 1;
                return;
            }
        };
        let live = self.calls.calls.iter().filter(|c| c.live()).count();
        if live >= self.calls.cfg.max_calls || self.is_closing() {
            self.calls.stats.busy_rejected += 1;
            let msg = CallMsg::Reject {
                call: number,
                reason: RejectCode::Busy,
            };
            self.send_call_frame(now, key, None, &msg);
            return;
        }
        let id = self.calls.new_id();
        let mut call = Call::new(id, number, false, now, &self.calls.cfg);
        call.peer = Some(key);
        call.user = Some(record.user_id());
        call.handle = record.body.handle.clone();
        call.peer_homes = record
            .body
            .supernodes
            .iter()
            .map(|h| sn(h.key, h.addr))
            .collect();
        if let Some(p) = self.peers.get(&key)
            && p.addr != UNSPECIFIED
        {
            call.add_candidate(p.addr);
        }
        for a in &record.body.endpoints {
            call.add_candidate(*a);
        }
        call.deadline = Some(now + self.calls.cfg.ring_timeout);
        call.router
            .add_path(now, DIRECT_PATH, PathKind::Direct)
            .expect("a new router has room for the direct path");
        self.calls.calls.push(call);
        self.calls.stats.incoming += 1;
        self.events.push_back(Event::CallIncoming {
            call: id,
            from: record.user_id(),
            handle: record.body.handle.clone(),
        });
        self.call_session_up(now, id, Some(origin));
        let homes = self.home_sns();
        self.send_call_msg(
            now,
            id,
            &CallMsg::Ringing {
                call: number,
                homes,
            },
        );
        if self.calls.cfg.auto_answer {
            let _ = self.answer(now, id);
        }
    }

    fn home_sns(&self) -> Vec<Sn> {
        self.overlay
            .homes()
            .into_iter()
            .take(crate::msg::MAX_HOMES)
            .map(|(k, a)| sn(k, a))
            .collect()
    }

    /// The callee adopts the caller's numbering of relayed paths.
    fn adopt_paths(&mut self, now: Time, id: CallId, version: u32, offers: Vec<PathOffer>) {
        let me = self.config.identity.peer_key();
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        call.offer_version = version;
        for o in offers {
            if call.paths.iter().any(|p| p.id == o.id()) || o.id() == DIRECT_PATH {
                continue;
            }
            let (kind, relay, via) = match o {
                PathOffer::Relay1 { relay, .. } => (PathKind::Relay1, relay, None),
                // The callee's side of a two-relay path is the callee's relay.
                PathOffer::Relay2 {
                    caller_side,
                    callee_side,
                    ..
                } => (PathKind::Relay2, callee_side, Some(caller_side)),
            };
            if PeerKey(relay.key) == me {
                continue;
            }
            call.paths.push(RelayPath {
                id: o.id(),
                kind,
                relay,
                via,
                channel: None,
                ready: false,
                added: false,
                next_alloc: now,
            });
        }
        self.allocate_paths(now, id);
    }

    /// Sends due channel requests (first ones and refreshes).
    fn allocate_paths(&mut self, now: Time, id: CallId) {
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        let Some(peer) = call.peer else {
            return;
        };
        if !call.live() {
            return;
        }
        let mut msgs = Vec::new();
        for p in call.paths.iter_mut() {
            if p.next_alloc <= now {
                p.next_alloc = now
                    + if p.channel.is_some() {
                        LEG_REFRESH
                    } else {
                        RELAY_RETRY
                    };
                msgs.push((
                    p.relay,
                    RelayMsg::Allocate {
                        peer: peer.0,
                        via: p.via.map(|v| v.key),
                    },
                ));
            }
        }
        for (relay, msg) in msgs {
            self.send_relay_msg(now, PeerKey(relay.key), Some(relay.addr), &msg);
        }
    }

    fn on_allocated(
        &mut self,
        now: Time,
        relay: PeerKey,
        peer: PeerKey,
        via: Option<[u8; 32]>,
        channel: u32,
        ready: bool,
    ) {
        let Some(id) = self.calls.by_peer(&peer) else {
            // Nobody wants it (the call ended): give it back.
            let msg = RelayMsg::Release { peer: peer.0, via };
            self.send_relay_msg(now, relay, None, &msg);
            return;
        };
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        let Some(p) = call
            .paths
            .iter_mut()
            .find(|p| PeerKey(p.relay.key) == relay && p.via.map(|v| v.key) == via)
        else {
            return;
        };
        if let Some(old) = p.channel
            && old != channel
        {
            self.calls.channels.remove(&(relay, old));
        }
        p.channel = Some(channel);
        self.calls.channels.insert((relay, channel), id);
        if ready {
            self.path_ready(now, id, relay, channel);
        }
    }

    fn path_ready(&mut self, now: Time, id: CallId, relay: PeerKey, channel: u32) {
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        let Some(p) = call
            .paths
            .iter_mut()
            .find(|p| PeerKey(p.relay.key) == relay && p.channel == Some(channel))
        else {
            return;
        };
        p.ready = true;
        if !p.added && call.router.add_path(now, p.id, p.kind).is_ok() {
            p.added = true;
            self.calls.stats.paths_up[kind_index(p.kind)] += 1;
        }
        self.drive_call(now, id);
    }

    fn relay_path_gone(&mut self, now: Time, relay: PeerKey, peer: PeerKey, via: Option<[u8; 32]>) {
        let Some(id) = self.calls.by_peer(&peer) else {
            return;
        };
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        if let Some(p) = call
            .paths
            .iter_mut()
            .find(|p| PeerKey(p.relay.key) == relay && p.via.map(|v| v.key) == via)
        {
            if let Some(ch) = p.channel.take() {
                self.calls.channels.remove(&(relay, ch));
            }
            p.ready = false;
            p.next_alloc = now + RELAY_RETRY;
            if p.added {
                p.added = false;
                let _ = call.router.remove_path(now, p.id);
            }
        }
    }

    /// Both sides agreed: media starts.
    fn connect_call(&mut self, now: Time, id: CallId) {
        let cfg = self.calls.cfg.clone();
        let seed = self.calls.rng.next_u64();
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        let audio = (|| -> Result<Audio, MediaError> {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            Ok(Audio {
                encoder: Encoder::new(cfg.encoder)?,
                packetizer: Packetizer::new(&mut rng),
                receiver: Receiver::new(cfg.jitter)?,
                buf: vec![0u8; peercall_wire::frame::MAX_OPUS_PACKET],
                kept: [Kept::default(); RESEND_KEEP],
                kept_data: vec![0u8; RESEND_KEEP * peercall_wire::frame::MAX_OPUS_PACKET],
                kept_next: 0,
            })
        })();
        match audio {
            Ok(a) => call.audio = Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the call's audio");
            }
        }
        call.state = CallState::Active;
        call.deadline = None;
        call.connected_at = Some(now);
        call.last_heard = now;
        let setup = now.saturating_since(call.started).as_millis() as u64;
        let bucket = SETUP_BUCKETS_MS
            .iter()
            .position(|&b| setup <= b)
            .unwrap_or(SETUP_BUCKETS_MS.len());
        self.calls.stats.setup_buckets[bucket] += 1;
        self.calls.stats.setup_ms_sum += setup;
        let path = call.router.active().and_then(|p| call.kind_of(p));
        if let Some(k) = path
            && !call.paths_used.contains(&k)
        {
            call.paths_used.push(k);
        }
        self.events
            .push_back(Event::CallConnected { call: id, path });
        self.drive_call(now, id);
    }

    fn end_call(&mut self, now: Time, id: CallId, reason: EndReason) {
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        if !call.live() {
            return;
        }
        call.state = CallState::Ended;
        call.end = Some(reason);
        call.ended_at = Some(now);
        call.deadline = None;
        call.next_handshake = None;
        call.punch_until = None;
        call.resends
            .retain(|r| matches!(r.msg, CallMsg::Hangup { .. } | CallMsg::Reject { .. }));
        self.calls.stats.ended[reason.outcome()] += 1;
        if let Some(a) = &call.audio {
            self.calls.stats.frames_concealed += a.receiver.stats().concealed;
        }
        let settled = call.resends.is_empty();
        self.events.push_back(Event::CallEnded { call: id, reason });
        if settled {
            self.settle_call(now, id);
        }
    }

    /// An ended call whose last messages were answered (or given up): its relay
    /// channels go back, and a session that only its relays carried is closed (its
    /// route is gone); a direct one is left to close when idle.
    fn settle_call(&mut self, now: Time, id: CallId) {
        let Some(call) = find_mut(&mut self.calls.calls, id) else {
            return;
        };
        if call.live() || call.settled {
            return;
        }
        call.settled = true;
        call.resends.clear();
        let peer = call.peer;
        let mut releases = Vec::new();
        for p in call.paths.drain(..) {
            if let Some(ch) = p.channel {
                self.calls.channels.remove(&(PeerKey(p.relay.key), ch));
            }
            if let Some(peer) = peer {
                releases.push((
                    PeerKey(p.relay.key),
                    RelayMsg::Release {
                        peer: peer.0,
                        via: p.via.map(|v| v.key),
                    },
                ));
            }
        }
        let Some(peer) = peer else {
            return;
        };
        let relayed = self.peers.get(&peer).is_some_and(|p| p.via.is_some());
        let needed = self.calls.by_peer(&peer).is_some()
            || self.overlay.keeps_session(&peer)
            || self.relay.keeps_session(&peer);
        if relayed && !needed {
            self.send_frame(
                now,
                peer,
                &Frame::Close(peercall_wire::frame::CloseReason::SHUTDOWN),
            );
            self.peer_down(now, peer, "call ended");
        } else if let Some(p) = self.peers.get_mut(&peer) {
            // The session may go once idle.
            p.last_control = Some(now);
            p.on_demand = true;
        }
        for (relay, msg) in releases {
            self.send_relay_msg(now, relay, None, &msg);
        }
    }

    /// Sends `msg` now and again until answered.
    fn send_reliable(&mut self, now: Time, id: CallId, msg: CallMsg) {
        self.send_call_msg(now, id, &msg);
        if let Some(c) = find_mut(&mut self.calls.calls, id) {
            c.resends.push(Resend {
                msg,
                next: now + RESEND_INTERVAL,
                left: MAX_RESENDS,
            });
        }
    }

    fn send_call_msg(&mut self, now: Time, id: CallId, msg: &CallMsg) {
        let Some(call) = self.calls.get(id) else {
            return;
        };
        let Some(key) = call.peer else {
            return;
        };
        let route = call.router.active().and_then(|p| route_of(call, p));
        self.send_call_frame(now, key, route, msg);
    }

    /// Sends a call message on `route`, or the session's own route.
    fn send_call_frame(&mut self, now: Time, key: PeerKey, route: Option<Route>, msg: &CallMsg) {
        let Ok(body) = msg.encode() else {
            return;
        };
        let Some(route) = route.or_else(|| self.peer_route(&key)) else {
            return;
        };
        self.send_on(now, key, route, &Frame::Call(&body));
    }
}

fn find_mut(calls: &mut [Call], id: CallId) -> Option<&mut Call> {
    calls.iter_mut().find(|c| c.id == id)
}

/// The offer of a caller's relayed paths.
fn paths_offer(call: &mut Call) -> Option<CallMsg> {
    if call.paths.is_empty() {
        return None;
    }
    call.offer_version += 1;
    let paths = call
        .paths
        .iter()
        .map(|p| match (p.kind, p.via) {
            (PathKind::Relay2, Some(via)) => PathOffer::Relay2 {
                id: p.id,
                caller_side: p.relay,
                callee_side: via,
            },
            _ => PathOffer::Relay1 {
                id: p.id,
                relay: p.relay,
            },
        })
        .collect();
    Some(CallMsg::Paths {
        call: call.number,
        version: call.offer_version,
        paths,
    })
}

/// How to send on path `path` of `call` now.
/// A re-send ready to go: the path, its route, and (kept slot, path sequence
/// number) per frame.
type Resends = Option<(PathId, Route, [Option<(usize, u32)>; RESEND_KEEP])>;

/// Takes the router's pending re-send, if any, and numbers its frames on their
/// path.
fn plan_resends(now: Time, call: &mut Call, audio: &Audio) -> Resends {
    let (path, since) = call.router.poll_resend()?;
    let route = route_of(call, path)?;
    let mut frames = [None; RESEND_KEEP];
    for (slot, i) in frames.iter_mut().zip(audio.kept_since(since)) {
        if let Ok(path_seq) = call.router.on_media_sent(now, path) {
            *slot = Some((i, path_seq));
            call.frames_duplicated += 1;
        }
    }
    Some((path, route, frames))
}

fn route_of(call: &Call, path: PathId) -> Option<Route> {
    if path == DIRECT_PATH {
        return call.direct.map(Route::Direct);
    }
    let p = call.paths.iter().find(|p| p.id == path)?;
    match (p.channel, p.ready) {
        (Some(channel), true) => Some(Route::Relay {
            relay: PeerKey(p.relay.key),
            channel,
        }),
        _ => None,
    }
}

fn call_stats(c: &Call, now: Time) -> CallStats {
    let until = c.ended_at.unwrap_or(now);
    let r = c.router.stats(until);
    let media = c
        .audio
        .as_ref()
        .map(|a| a.receiver.stats())
        .unwrap_or_default();
    let active = r.active.and_then(|p| c.kind_of(p));
    let rtt = r
        .active
        .and_then(|a| r.paths.iter().find(|p| p.id == a))
        .and_then(|p| p.rtt);
    let mos = (media.frames_played > 0).then(|| {
        let one_way = rtt.map_or(0.0, |d| d.as_secs_f64() * 1000.0 / 2.0);
        media.mos_estimate(one_way)
    });
    CallStats {
        id: c.id,
        state: c.state,
        outgoing: c.outgoing,
        peer_user: c.user,
        peer_handle: c.handle.clone(),
        end: c.end,
        active_path: if c.live() { active } else { None },
        paths: r
            .paths
            .iter()
            .map(|p| CallPathStats {
                id: p.id,
                kind: p.kind,
                state: p.state,
                rtt: p.rtt,
                jitter: p.jitter,
                loss: p.loss,
                r: p.r,
                mos: p.mos,
            })
            .collect(),
        path_switches: r.switches,
        paths_used: c.paths_used.clone(),
        frames_sent: c.frames_sent,
        frames_duplicated: c.frames_duplicated,
        frames_received: c.frames_received,
        concealed_ms: media.concealed * FRAME_MS,
        max_gap_ms: c.max_gap_ms,
        setup_ms: c
            .connected_at
            .map(|t| t.saturating_since(c.started).as_millis() as u64),
        first_audio_ms: c
            .first_audio_at
            .map(|t| t.saturating_since(c.started).as_millis() as u64),
        duration_s: c
            .connected_at
            .map_or(0.0, |t| until.saturating_since(t).as_secs_f64()),
        mos_estimate: mos,
        media,
    }
}

/// A placeholder address (never sent to).
const UNSPECIFIED: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::UNSPECIFIED,
    0,
));

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Config, Contact};
    use crate::stats::DropReason;
    use peercall_crypto::Identity;
    use peercall_crypto::record::RecordBody;

    const T0: Time = Time::from_secs(1_700_000_000);

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, last], 7000))
    }

    /// Delivers every transmit between the two nodes (fixed addresses) until quiet.
    fn pump(now: Time, a: &mut Node, b: &mut Node) {
        loop {
            let mut moved = false;
            while let Some(t) = a.poll_transmit() {
                if t.dest == addr(2) {
                    b.handle_datagram(now, addr(1), &t.bytes);
                    moved = true;
                }
            }
            while let Some(t) = b.poll_transmit() {
                if t.dest == addr(1) {
                    a.handle_datagram(now, addr(2), &t.bytes);
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn pair() -> (Node, Node, PeerKey) {
        let ia = Identity::from_seed([1; 32]);
        let ib = Identity::from_seed([2; 32]);
        let kb = ib.peer_key();
        let mut a = Node::new(Config::new(ia, [3; 32]), T0);
        let mut b = Node::new(Config::new(ib, [4; 32]), T0);
        a.connect(
            T0,
            Contact {
                addr: addr(2),
                key: Some(kb),
            },
        );
        pump(T0, &mut a, &mut b);
        assert!(a.peers.contains_key(&kb), "session up");
        (a, b, kb)
    }

    fn incoming(n: &mut Node) -> usize {
        let mut count = 0;
        while let Some(e) = n.poll_event() {
            count += usize::from(matches!(e, Event::CallIncoming { .. }));
        }
        count
    }

    #[test]
    fn forged_invites_are_dropped_and_counted() {
        let (mut a, mut b, kb) = pair();
        // A record signed by someone else, naming someone else's static key.
        let mallory = Identity::from_seed([9; 32]);
        let body = RecordBody {
            handle: None,
            static_key: mallory.peer_key(),
            endpoints: vec![addr(9)],
            supernodes: Vec::new(),
        };
        let record = Record::sign(&mallory, 1, T0.as_secs() + 600, &body).expect("signs");
        let invite = CallMsg::Invite { call: 7, record }
            .encode()
            .expect("encodes");
        assert!(a.send_on(T0, kb, Route::Direct(addr(2)), &Frame::Call(&invite)));
        // Garbage inside an authenticated call frame, and a bogus record.
        assert!(a.send_on(T0, kb, Route::Direct(addr(2)), &Frame::Call(&[1, 200, 3])));
        let bogus = CallMsg::Invite {
            call: 8,
            record: vec![1; 200],
        }
        .encode()
        .expect("encodes");
        assert!(a.send_on(T0, kb, Route::Direct(addr(2)), &Frame::Call(&bogus)));
        pump(T0, &mut a, &mut b);
        assert_eq!(incoming(&mut b), 0);
        let c = b.stats().calls;
        assert_eq!(c.forged_invites, 2, "{c:?}");
        assert_eq!(c.bad_messages, 1, "{c:?}");
        assert_eq!(c.incoming, 0);
        assert!(b.calls(T0).is_empty());
    }

    #[test]
    fn relay_frames_for_unknown_channels_are_dropped_and_counted() {
        let (mut a, mut b, kb) = pair();
        let inner = [4u8; 48];
        assert!(a.send_relayed(T0, kb, 0xdead_beef, &inner));
        pump(T0, &mut a, &mut b);
        let r = b.stats().relay;
        assert_eq!(
            r.dropped(crate::relay::RelayDrop::UnknownChannel),
            1,
            "{r:?}"
        );
        assert_eq!(r.packets, 0);
        // A relay message that does not decode.
        assert!(a.send_on(
            T0,
            kb,
            Route::Direct(addr(2)),
            &Frame::RelayControl(&[1, 99, 99])
        ));
        let before = b.stats().dropped(DropReason::Malformed);
        pump(T0, &mut a, &mut b);
        assert_eq!(b.stats().dropped(DropReason::Malformed), before + 1);
    }

    /// A supernode forwarding between two clients allocates no buffer per packet
    /// once warm, when its owner hands transmit buffers back.
    #[test]
    fn relay_forwarding_allocates_nothing_per_packet() {
        let ids: Vec<Identity> = (1..=3).map(|i| Identity::from_seed([i; 32])).collect();
        let keys: Vec<PeerKey> = ids.iter().map(|i| i.peer_key()).collect();
        let mut nodes: Vec<Node> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let mut c = Config::new(id.clone(), [10 + i as u8; 32]);
                if i == 1 {
                    c.role = crate::Role::Supernode;
                }
                Node::new(c, T0)
            })
            .collect();
        // Node i sits at addr(i + 1); the supernode is node 1.
        let deliver = |nodes: &mut Vec<Node>, now: Time| {
            let mut buf = vec![0u8; peercall_wire::MAX_DATAGRAM];
            loop {
                let mut moved = false;
                for i in 0..3 {
                    loop {
                        let (dest, len) = if i == 1 {
                            match nodes[1].poll_transmit_into(&mut buf) {
                                Some(t) => t,
                                None => break,
                            }
                        } else {
                            match nodes[i].poll_transmit() {
                                Some(t) => {
                                    let n = t.bytes.len();
                                    buf[..n].copy_from_slice(&t.bytes);
                                    (t.dest, n)
                                }
                                None => break,
                            }
                        };
                        if let Some(j) = (0..3).find(|&j| addr(j as u8 + 1) == dest) {
                            nodes[j].handle_datagram(now, addr(i as u8 + 1), &buf[..len]);
                            moved = true;
                        }
                    }
                }
                if !moved {
                    return;
                }
            }
        };
        for i in [0, 2] {
            nodes[i].connect(
                T0,
                Contact {
                    addr: addr(2),
                    key: Some(keys[1]),
                },
            );
        }
        deliver(&mut nodes, T0);
        assert!(nodes[1].peers.contains_key(&keys[0]) && nodes[1].peers.contains_key(&keys[2]));
        // Both clients ask the relay for each other (straight into the service).
        let mut channels = Vec::new();
        for (c, p) in [(0, 2), (2, 0)] {
            let s = &mut nodes[1];
            let env = Env {
                overlay: &s.overlay,
                peers: &s.peers,
            };
            let msg = RelayMsg::Allocate {
                peer: keys[p].0,
                via: None,
            };
            s.relay.handle(T0, &env, keys[c], addr(c as u8 + 1), msg);
            while let Some((to, _, m)) = s.relay.poll_output() {
                if let (true, RelayMsg::Allocated { channel, .. }) = (to == keys[c], m) {
                    channels.push(channel);
                }
            }
        }
        let inner = [7u8; 120];
        let mut t = T0;
        let send = |nodes: &mut Vec<Node>, t: Time| {
            assert!(nodes[0].send_relayed(t, keys[1], channels[0], &inner));
            deliver(nodes, t);
        };
        for _ in 0..20 {
            t = t + Duration::from_millis(20);
            send(&mut nodes, t);
        }
        let warm = nodes[1].stats().buffers_allocated;
        let forwarded = nodes[1].stats().relay.packets;
        for _ in 0..1_000 {
            t = t + Duration::from_millis(20);
            send(&mut nodes, t);
        }
        let s = nodes[1].stats();
        assert_eq!(s.relay.packets, forwarded + 1_000, "{:?}", s.relay);
        assert_eq!(
            s.buffers_allocated, warm,
            "buffers allocated while forwarding"
        );
    }

    #[test]
    fn commands_on_unknown_or_wrong_calls_are_errors() {
        let (mut a, _b, _) = pair();
        let nope = CallId(42);
        assert_eq!(a.answer(T0, nope), Err(CallError::UnknownCall(nope)));
        assert_eq!(a.hangup(T0, nope), Err(CallError::UnknownCall(nope)));
        let mut pcm = [0i16; FRAME_SAMPLES];
        assert_eq!(
            a.pull_audio(T0, nope, &mut pcm),
            Err(CallError::UnknownCall(nope))
        );
        // Not attached: the lookup fails at once or times out; either way the call
        // ends unreachable, never panics.
        let id = a.call(T0, CallTarget::User(Identity::from_seed([7; 32]).user_id()));
        assert!(matches!(
            a.answer(T0, id),
            Err(CallError::State { what: "answer", .. })
        ));
        let mut t = T0;
        for _ in 0..200 {
            t = t + Duration::from_millis(100);
            a.handle_timeout(t);
        }
        let s = a.call_stats(t, id).expect("lingers");
        assert_eq!(s.state, CallState::Ended);
        assert!(matches!(s.end, Some(EndReason::Unreachable(_))), "{s:?}");
    }
}
