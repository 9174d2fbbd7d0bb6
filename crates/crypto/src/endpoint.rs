//! [`Endpoint`]: the sans-IO session manager. It makes and answers handshakes,
//! encrypts and decrypts transport packets, rekeys, and sheds load. The engine owns
//! one and drives it:
//!
//! ```text
//! datagram in  ──► handle(now, from, bytes, out) ──► Reply / Established / Data / Reject
//! plaintext    ──► encrypt(now, peer, bytes, out) ──► transport packet
//! new peer     ──► initiate(now, to, key?, out)  ──► initiation to send to `to`
//! timers       ──► poll_timeout() / handle_timeout(now)
//! rekey        ──► needs_rekey(now, peer) true ⇒ initiate(now, addr, Some(peer), out)
//! ```
//!
//! # Sessions and indices
//! Each side picks a random 32-bit index for each handshake and session; packets name
//! the receiver's index, and state is only ever found by index, never by address, so a
//! session survives a change of path. Per peer the endpoint keeps up to three
//! sessions, as WireGuard does: `current` (used for sending), `previous` (still
//! accepted, so packets in flight across a rekey decrypt) and `next` (a session this
//! side completed as responder, not used for sending until the first packet from the
//! initiator arrives on it: key confirmation). On `Established { initiator: true }`
//! the engine should send a packet at once (a keepalive) so the responder can start
//! using the new keys.
//!
//! # Timing
//! A session is used for sending until it is [`EndpointConfig::reject_after`] old and
//! accepted until then too. [`Endpoint::needs_rekey`] turns true at
//! [`EndpointConfig::rekey_after`] for the side that initiated the current session and
//! [`EndpointConfig::responder_rekey_margin`] later for the responder, so both sides
//! do not start handshakes at the same moment. Initiations carry the initiator's
//! timestamp; a responder accepts one only if it is strictly newer than the last
//! accepted from the same static key (IK: message 1; XX: message 3, since XX message
//! 1 is unauthenticated).
//!
//! # Denial of service
//! In order, for an initiation: mac1 (wrong: dropped with no answer,
//! [`Reject::BadMac`]); XX allowed ([`EndpointConfig::accept_xx`]); then either a
//! valid mac2 proves the source address and the per-source rate limit applies, or the
//! global load detector must admit it, or the answer is a 64-byte cookie reply and no
//! state at all. Only then is any Noise work done or memory allocated. The pending-XX
//! table (responders waiting for message 3) is bounded and evicts its oldest entry.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use peercall_wire::packet::{
    CookieReply, Finish, InitPayload, Initiation, MAC_LEN, NOISE_IK_INIT_LEN, NOISE_IK_RESP_LEN,
    NOISE_XX_FINISH_LEN, NOISE_XX_INIT_LEN, NOISE_XX_RESP_LEN, Pattern, Response, Transport,
};
use peercall_wire::{MAX_DATAGRAM, Packet, Time, WireError};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use thiserror::Error;

use crate::cookie::{CookieChecker, CookieJar, MacKeys, write_mac2};
use crate::handshake::{Handshake, Protocols};
use crate::lru::LruMap;
use crate::ratelimit::{self, LoadDetector, Rate, RateLimiter};
use crate::session::{REKEY_AFTER_MESSAGES, ReceiveError, SendError, Session, SessionLimits};
use crate::{Identity, PeerKey};

/// Start a new handshake after this long on one session (WireGuard's
/// `REKEY_AFTER_TIME`): bounds how much traffic one key protects.
pub const DEFAULT_REKEY_AFTER: Duration = Duration::from_secs(120);
/// Refuse a session's keys after this long (WireGuard's `REJECT_AFTER_TIME`): a
/// minute after the rekey for stragglers and failed handshakes to be retried.
pub const DEFAULT_REJECT_AFTER: Duration = Duration::from_secs(180);
/// How much later than the initiator the responder of a session asks for a rekey:
/// twice [`DEFAULT_HANDSHAKE_TIMEOUT`], so the initiator's attempt has normally
/// finished (or failed) before the responder starts its own, and the two sides do
/// not cross handshakes.
pub const DEFAULT_RESPONDER_REKEY_MARGIN: Duration = Duration::from_secs(10);
/// How long a handshake may take before it is abandoned (WireGuard's
/// `REKEY_TIMEOUT`): several round trips on the worst intercontinental path.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress per table (our initiations; XX responders awaiting message
/// 3). A snow handshake state is about a kilobyte, so 1,024 is about a megabyte.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1_024;
/// Sessions held at once. A supernode serves a few thousand clients with up to three
/// sessions each; 16,384 is room for that at about 1.5 KB a session.
pub const DEFAULT_MAX_SESSIONS: usize = 16_384;
/// Peers whose last initiation timestamp is remembered. A peer forgotten here could
/// have an old initiation replayed; the replay creates an unconfirmed session that is
/// never used for sending, so the cost is bounded, but the table should cover every
/// peer seen in hours. About 9 MB when full, which only a busy supernode reaches.
pub const DEFAULT_TIMESTAMP_TABLE: usize = 65_536;
/// Destinations whose cookies an initiator keeps.
pub const DEFAULT_COOKIE_JAR: usize = 1_024;

/// Settings of an [`Endpoint`]. [`EndpointConfig::default`] documents each default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// [`DEFAULT_REKEY_AFTER`].
    pub rekey_after: Duration,
    /// [`DEFAULT_REJECT_AFTER`].
    pub reject_after: Duration,
    /// [`DEFAULT_RESPONDER_REKEY_MARGIN`].
    pub responder_rekey_margin: Duration,
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// [`DEFAULT_MAX_PENDING_HANDSHAKES`].
    pub max_pending_handshakes: NonZeroUsize,
    /// [`DEFAULT_MAX_SESSIONS`].
    pub max_sessions: NonZeroUsize,
    /// Whether to answer XX initiations (first contact from nodes that do not know
    /// this node's key). Default true; a node that wants to be reachable only by
    /// those who learned its key from a signed record turns it off.
    pub accept_xx: bool,
    /// Handshakes per second before the endpoint is under load and demands cookies
    /// ([`ratelimit::DEFAULT_GLOBAL_HANDSHAKES_PER_SEC`], burst
    /// [`ratelimit::DEFAULT_GLOBAL_BURST`]).
    pub global_handshakes: Rate,
    /// Handshakes per second from one source IP with a proven address
    /// ([`ratelimit::DEFAULT_PER_SOURCE_PER_SEC`], burst
    /// [`ratelimit::DEFAULT_PER_SOURCE_BURST`]).
    pub per_source_handshakes: Rate,
    /// [`ratelimit::DEFAULT_SOURCE_TABLE`].
    pub source_table: NonZeroUsize,
    /// [`DEFAULT_TIMESTAMP_TABLE`].
    pub timestamp_table: NonZeroUsize,
    /// [`DEFAULT_COOKIE_JAR`].
    pub cookie_jar: NonZeroUsize,
}

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            rekey_after: DEFAULT_REKEY_AFTER,
            reject_after: DEFAULT_REJECT_AFTER,
            responder_rekey_margin: DEFAULT_RESPONDER_REKEY_MARGIN,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_pending_handshakes: nz(DEFAULT_MAX_PENDING_HANDSHAKES),
            max_sessions: nz(DEFAULT_MAX_SESSIONS),
            accept_xx: true,
            global_handshakes: Rate::new(
                ratelimit::DEFAULT_GLOBAL_HANDSHAKES_PER_SEC,
                ratelimit::DEFAULT_GLOBAL_BURST,
            ),
            per_source_handshakes: Rate::new(
                ratelimit::DEFAULT_PER_SOURCE_PER_SEC,
                ratelimit::DEFAULT_PER_SOURCE_BURST,
            ),
            source_table: nz(ratelimit::DEFAULT_SOURCE_TABLE),
            timestamp_table: nz(DEFAULT_TIMESTAMP_TABLE),
            cookie_jar: nz(DEFAULT_COOKIE_JAR),
        }
    }
}

/// A setting that cannot work, naming the key and the reason.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid endpoint setting `{key}`: {reason}")]
pub struct ConfigError {
    /// The setting.
    pub key: &'static str,
    /// Why.
    pub reason: &'static str,
}

impl EndpointConfig {
    /// Checks the relations between settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key, reason| Err(ConfigError { key, reason });
        if self.rekey_after.is_zero() {
            return err("rekey_after", "must be positive");
        }
        if self.handshake_timeout.is_zero() {
            return err("handshake_timeout", "must be positive");
        }
        if self.rekey_after + self.responder_rekey_margin >= self.reject_after {
            return err(
                "reject_after",
                "must exceed rekey_after plus responder_rekey_margin, or sessions die before they are replaced",
            );
        }
        if self.handshake_timeout >= self.rekey_after {
            return err("handshake_timeout", "must be shorter than rekey_after");
        }
        Ok(())
    }
}

/// What [`Endpoint::handle`] did with a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// `len` bytes in `out` to send back to `from`: a handshake response, an XX
    /// response, a cookie reply, or our initiation re-sent with mac2 after a cookie.
    Reply {
        /// Bytes in `out`.
        len: usize,
    },
    /// A handshake with `peer` completed. `reply` bytes in `out` go back to `from`
    /// (the IK response or XX message 3; 0 if none). As initiator, the session is
    /// usable at once and the engine should send a packet (a keepalive) now, which
    /// confirms the keys to the responder. As responder, the new session is used for
    /// sending once the initiator's first packet arrives on it.
    Established {
        /// The peer's static key (authenticated by the handshake).
        peer: PeerKey,
        /// Whether this side initiated.
        initiator: bool,
        /// Bytes in `out` to send to `from`.
        reply: usize,
    },
    /// An authenticated transport packet from `peer`; `len` bytes of plaintext (an
    /// encoded `peercall_wire::Frame`, or nothing for a keepalive) are in `out`.
    Data {
        /// The sender.
        peer: PeerKey,
        /// Plaintext bytes in `out`.
        len: usize,
    },
}

/// Why a datagram was dropped. Nothing changed in the endpoint's state except where
/// a variant says so; labels match the engine's drop reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Reject {
    /// Did not parse; or `out` was shorter than [`MAX_DATAGRAM`].
    #[error("malformed: {0}")]
    Malformed(#[from] WireError),
    /// No session or pending handshake has the packet's receiver index.
    #[error("unknown session index")]
    UnknownSession,
    /// Authentication failed (transport packet or cookie reply).
    #[error("decryption failed")]
    Decrypt,
    /// A transport counter already received or older than the replay window.
    #[error("replayed counter")]
    Replay,
    /// Keys older than reject-after, or a counter past the message limit.
    #[error("session keys expired")]
    ExpiredKey,
    /// An initiation whose mac1 did not verify. Never answered.
    #[error("bad mac1")]
    BadMac,
    /// An initiation whose timestamp is not newer than the last accepted from that
    /// key. For XX message 3 the pending handshake is discarded.
    #[error("initiation timestamp not newer than the last one")]
    StaleTimestamp,
    /// Noise processing failed. A pending handshake stays as it was.
    #[error("handshake failed")]
    Handshake,
    /// Shed: per-source rate limit, or the session table is full.
    #[error("rate limited")]
    RateLimited,
    /// Well-formed but not usable here: XX refused by configuration, a response of
    /// the wrong pattern, a second cookie reply for one initiation.
    #[error("unexpected packet")]
    Unexpected,
}

impl Reject {
    /// A stable metric label, the same as the engine's `DropReason::label`.
    pub fn label(&self) -> &'static str {
        match self {
            Reject::Malformed(_) => "malformed",
            Reject::UnknownSession => "unknown_session",
            Reject::Decrypt => "decrypt",
            Reject::Replay => "replay",
            Reject::ExpiredKey => "expired_key",
            Reject::BadMac => "bad_mac",
            Reject::StaleTimestamp => "stale_timestamp",
            Reject::Handshake => "handshake",
            Reject::RateLimited => "rate_limited",
            Reject::Unexpected => "unexpected",
        }
    }
}

impl From<ReceiveError> for Reject {
    fn from(e: ReceiveError) -> Reject {
        match e {
            ReceiveError::Expired => Reject::ExpiredKey,
            ReceiveError::Replay => Reject::Replay,
            ReceiveError::Decrypt => Reject::Decrypt,
            ReceiveError::BufferTooSmall => Reject::Malformed(WireError::BufferTooSmall {
                needed: MAX_DATAGRAM,
                have: 0,
            }),
        }
    }
}

/// Counters and gauges for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Sessions held (all slots: current, previous, next).
    pub sessions: usize,
    /// Peers with at least one session or pending initiation.
    pub peers: usize,
    /// Our initiations awaiting a response.
    pub pending_initiations: usize,
    /// XX handshakes awaiting message 3.
    pub pending_responses: usize,
    /// Initiations written.
    pub handshakes_initiated: u64,
    /// Handshakes completed, either side.
    pub handshakes_completed: u64,
    /// Cookie replies sent under load.
    pub cookie_replies_sent: u64,
    /// Cookie replies received and used.
    pub cookie_replies_received: u64,
    /// Whether the endpoint was under load at the last initiation it saw.
    pub under_load: bool,
    /// Source IPs in the rate-limit table.
    pub rate_limit_sources: usize,
}

/// A summary of a peer's sending session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSummary {
    /// The peer.
    pub peer: PeerKey,
    /// When the session's handshake completed.
    pub established: Time,
    /// Whether this side initiated it.
    pub initiator: bool,
}

const MAX_INIT_LEN: usize = Initiation::len_for(Pattern::Ik);

struct Initiating {
    hs: Handshake,
    remote: Option<PeerKey>,
    /// The initiation as sent, to re-send with mac2 after a cookie reply.
    packet: [u8; MAX_INIT_LEN],
    len: usize,
    mac1: [u8; MAC_LEN],
    cookie_used: bool,
    deadline: Time,
}

struct Responding {
    hs: Handshake,
    remote_index: u32,
    deadline: Time,
}

enum Slot {
    Initiating(Box<Initiating>),
    Responding(Box<Responding>),
    Session(Box<Session>),
}

/// A peer's sessions, by index.
#[derive(Debug, Default, Clone, Copy)]
struct Keys {
    current: Option<u32>,
    previous: Option<u32>,
    next: Option<u32>,
    /// Our latest initiation to this peer still in progress.
    initiating: Option<u32>,
}

impl Keys {
    fn is_empty(&self) -> bool {
        self.current.is_none()
            && self.previous.is_none()
            && self.next.is_none()
            && self.initiating.is_none()
    }

    fn forget(&mut self, index: u32) {
        for slot in [
            &mut self.current,
            &mut self.previous,
            &mut self.next,
            &mut self.initiating,
        ] {
            if *slot == Some(index) {
                *slot = None;
            }
        }
    }
}

/// The sans-IO session manager. See the module documentation.
pub struct Endpoint {
    identity: Identity,
    config: EndpointConfig,
    limits: SessionLimits,
    protocols: Protocols,
    rng: ChaCha20Rng,
    checker: CookieChecker,
    jar: CookieJar,
    load: LoadDetector,
    limiter: RateLimiter,
    /// Last accepted initiation timestamp per initiator.
    timestamps: LruMap<PeerKey, u64>,
    /// The last timestamp this endpoint sent.
    last_timestamp: u64,
    slots: BTreeMap<u32, Slot>,
    /// When each slot expires.
    deadlines: BTreeSet<(Time, u32)>,
    /// Pending XX responders in order of expiry, for eviction.
    responding: BTreeSet<(Time, u32)>,
    /// Responder sessions no packet has confirmed yet, oldest first, for eviction.
    unconfirmed: BTreeSet<(Time, u32)>,
    peers: BTreeMap<PeerKey, Keys>,
    pending_initiations: usize,
    sessions: usize,
    stats: EndpointStats,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local", &self.identity.peer_key())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn slot_deadline(slot: &Slot, limits: &SessionLimits) -> Time {
    match slot {
        Slot::Initiating(p) => p.deadline,
        Slot::Responding(p) => p.deadline,
        Slot::Session(s) => s.created() + limits.reject_after,
    }
}

impl Endpoint {
    /// An endpoint for `identity`, whose randomness (indices, ephemeral keys, cookie
    /// secrets) all comes from `rng_seed`.
    pub fn new(
        identity: &Identity,
        config: EndpointConfig,
        rng_seed: [u8; 32],
    ) -> Result<Endpoint, ConfigError> {
        config.validate()?;
        let local = identity.peer_key();
        Ok(Endpoint {
            identity: identity.clone(),
            limits: SessionLimits {
                reject_after: config.reject_after,
            },
            protocols: Protocols::new(),
            rng: ChaCha20Rng::from_seed(rng_seed),
            checker: CookieChecker::new(&local),
            jar: CookieJar::new(config.cookie_jar.get()),
            load: LoadDetector::new(config.global_handshakes, Time::ZERO),
            limiter: RateLimiter::new(config.per_source_handshakes, config.source_table),
            timestamps: LruMap::new(config.timestamp_table.get()),
            last_timestamp: 0,
            slots: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            responding: BTreeSet::new(),
            unconfirmed: BTreeSet::new(),
            peers: BTreeMap::new(),
            pending_initiations: 0,
            sessions: 0,
            stats: EndpointStats::default(),
            config,
        })
    }

    /// This node's static key.
    pub fn local_key(&self) -> PeerKey {
        self.identity.peer_key()
    }

    /// The settings.
    pub fn config(&self) -> &EndpointConfig {
        &self.config
    }

    /// Writes a new initiation into `out` and returns its length: IK when `remote` is
    /// known, else XX. It carries mac2 when a cookie for `to` is held; the same bytes
    /// may also be sent to other addresses of the same peer (they just lack mac2
    /// there). Several initiations to one peer may be in flight; whichever response
    /// arrives first makes the session.
    pub fn initiate(
        &mut self,
        now: Time,
        to: SocketAddr,
        remote: Option<PeerKey>,
        out: &mut [u8],
    ) -> Result<usize, SendError> {
        if self.pending_initiations >= self.config.max_pending_handshakes.get() {
            self.handle_timeout(now);
            if self.pending_initiations >= self.config.max_pending_handshakes.get() {
                return Err(SendError::TooManyHandshakes);
            }
        }
        let pattern = if remote.is_some() {
            Pattern::Ik
        } else {
            Pattern::Xx
        };
        let len = Initiation::len_for(pattern);
        if out.len() < len {
            return Err(SendError::BufferTooSmall { needed: len });
        }
        let seed = self.seed();
        let mut hs = Handshake::initiator(&self.protocols, &self.identity, remote.as_ref(), seed)
            .map_err(|_| SendError::Handshake)?;
        let mut noise = [0u8; NOISE_IK_INIT_LEN];
        let noise = match pattern {
            Pattern::Ik => &mut noise[..],
            Pattern::Xx => &mut noise[..NOISE_XX_INIT_LEN],
        };
        let timestamp = (pattern == Pattern::Ik).then(|| self.next_timestamp(now));
        hs.write(timestamp, noise)
            .map_err(|_| SendError::Handshake)?;
        let index = self.new_index();
        let mut packet = [0u8; MAX_INIT_LEN];
        Packet::Initiation(Initiation {
            pattern,
            sender: index,
            noise,
            mac1: [0; MAC_LEN],
            mac2: [0; MAC_LEN],
        })
        .encode(&mut packet)
        .map_err(|_| SendError::BufferTooSmall { needed: len })?;
        let keys = remote
            .as_ref()
            .map_or_else(MacKeys::for_xx, MacKeys::for_peer);
        let mac1 = keys.write_mac1(&mut packet[..len]);
        if let Some(cookie) = self.jar.get(now, &to) {
            write_mac2(&mut packet[..len], &cookie);
        }
        out[..len].copy_from_slice(&packet[..len]);
        let deadline = now + self.config.handshake_timeout;
        self.insert_slot(
            index,
            Slot::Initiating(Box::new(Initiating {
                hs,
                remote,
                packet,
                len,
                mac1,
                cookie_used: false,
                deadline,
            })),
        );
        if let Some(peer) = remote {
            self.peers.entry(peer).or_default().initiating = Some(index);
        }
        self.stats.handshakes_initiated += 1;
        Ok(len)
    }

    /// Handles one peercall datagram (types 4 to 10) from `from`. `out` must hold at
    /// least [`MAX_DATAGRAM`] bytes; what the result says is in it.
    pub fn handle(
        &mut self,
        now: Time,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Result<Received, Reject> {
        if out.len() < MAX_DATAGRAM {
            return Err(Reject::Malformed(WireError::BufferTooSmall {
                needed: MAX_DATAGRAM,
                have: out.len(),
            }));
        }
        match Packet::parse(datagram)? {
            Packet::Initiation(init) => self.on_initiation(now, from, datagram, &init, out),
            Packet::Response(resp) => self.on_response(now, &resp, out),
            Packet::Finish(finish) => self.on_finish(now, &finish),
            Packet::CookieReply(reply) => self.on_cookie_reply(now, from, &reply, out),
            Packet::Transport(t) => self.on_transport(now, &t, out),
        }
    }

    /// Encrypts `plaintext` for `peer` under its current session into a transport
    /// packet in `out`.
    pub fn encrypt(
        &mut self,
        now: Time,
        peer: &PeerKey,
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, SendError> {
        let index = self
            .peers
            .get(peer)
            .and_then(|k| k.current)
            .ok_or(SendError::NoSession)?;
        match self.slots.get_mut(&index) {
            Some(Slot::Session(s)) => s.encrypt(now, &self.limits, plaintext, out),
            _ => Err(SendError::NoSession),
        }
    }

    /// Whether [`Endpoint::encrypt`] to `peer` can succeed at `now`.
    pub fn has_session(&self, now: Time, peer: &PeerKey) -> bool {
        self.current(peer)
            .is_some_and(|s| s.can_send(now, &self.limits))
    }

    fn current(&self, peer: &PeerKey) -> Option<&Session> {
        let index = self.peers.get(peer)?.current?;
        match self.slots.get(&index) {
            Some(Slot::Session(s)) => Some(s),
            _ => None,
        }
    }

    /// Whether this side should start a new handshake with `peer` now: its current
    /// session is old (see the module documentation) or has used
    /// [`REKEY_AFTER_MESSAGES`] counters, and no initiation to it is in progress.
    /// False when there is no session at all ([`Endpoint::has_session`] tells that).
    pub fn needs_rekey(&self, now: Time, peer: &PeerKey) -> bool {
        let Some(keys) = self.peers.get(peer) else {
            return false;
        };
        if keys.initiating.is_some() {
            return false;
        }
        let Some(s) = self.current(peer) else {
            return false;
        };
        let due = if s.is_initiator() {
            self.config.rekey_after
        } else {
            self.config.rekey_after + self.config.responder_rekey_margin
        };
        now.saturating_since(s.created()) >= due || s.sent() >= REKEY_AFTER_MESSAGES
    }

    /// Forgets every session and handshake with `peer` (its initiation timestamp is
    /// kept, so old initiations cannot be replayed).
    pub fn remove_peer(&mut self, peer: &PeerKey) {
        let doomed: Vec<u32> = self
            .slots
            .iter()
            .filter(|(_, slot)| match slot {
                Slot::Initiating(p) => p.remote.as_ref() == Some(peer),
                Slot::Session(s) => s.peer() == peer,
                Slot::Responding(_) => false,
            })
            .map(|(i, _)| *i)
            .collect();
        for index in doomed {
            self.remove_slot(index);
        }
        self.peers.remove(peer);
    }

    /// Drops handshakes that timed out and sessions past reject-after.
    pub fn handle_timeout(&mut self, now: Time) {
        while let Some(&(at, index)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.remove_slot(index);
        }
    }

    /// When [`Endpoint::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.deadlines.first().map(|&(at, _)| at)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> EndpointStats {
        EndpointStats {
            sessions: self.sessions,
            peers: self.peers.len(),
            pending_initiations: self.pending_initiations,
            pending_responses: self.responding.len(),
            rate_limit_sources: self.limiter.len(),
            ..self.stats.clone()
        }
    }

    /// The current (sending) session of every peer that has one.
    pub fn sessions(&self) -> impl Iterator<Item = SessionSummary> + '_ {
        self.peers.keys().filter_map(|peer| {
            self.current(peer).map(|s| SessionSummary {
                peer: *peer,
                established: s.created(),
                initiator: s.is_initiator(),
            })
        })
    }

    // ---- inbound ----

    fn on_initiation(
        &mut self,
        now: Time,
        from: SocketAddr,
        datagram: &[u8],
        init: &Initiation<'_>,
        out: &mut [u8],
    ) -> Result<Received, Reject> {
        if !self
            .checker
            .keys(init.pattern)
            .verify_mac1(datagram, &init.mac1)
        {
            return Err(Reject::BadMac);
        }
        if init.pattern == Pattern::Xx && !self.config.accept_xx {
            return Err(Reject::Unexpected);
        }
        let proven =
            init.mac2 != [0; MAC_LEN] && self.checker.verify_mac2(now, datagram, &init.mac2, &from);
        if proven {
            if !self.limiter.allow(now, from.ip()) {
                return Err(Reject::RateLimited);
            }
        } else if !self.load.admit(now) {
            self.stats.under_load = true;
            let len = self
                .checker
                .write_reply(now, &mut self.rng, init, &from, out)?;
            self.stats.cookie_replies_sent += 1;
            return Ok(Received::Reply { len });
        }
        self.stats.under_load = self.load.is_loaded(now);

        let seed = self.seed();
        let mut hs = Handshake::responder(&self.protocols, &self.identity, init.pattern, seed)
            .map_err(|_| Reject::Handshake)?;
        let timestamp = hs.read(init.noise).map_err(|_| Reject::Handshake)?;
        match init.pattern {
            Pattern::Ik => {
                let peer = hs.remote_static().ok_or(Reject::Handshake)?;
                let timestamp = timestamp.ok_or(Reject::Handshake)?;
                self.check_timestamp(&peer, timestamp)?;
                self.make_room_for_session(now)?;
                let mut noise = [0u8; NOISE_IK_RESP_LEN];
                hs.write(None, &mut noise).map_err(|_| Reject::Handshake)?;
                let (transport, peer) = hs.into_transport().map_err(|_| Reject::Handshake)?;
                let index = self.new_index();
                let len = Packet::Response(Response {
                    pattern: Pattern::Ik,
                    sender: index,
                    receiver: init.sender,
                    noise: &noise,
                })
                .encode(out)?;
                self.timestamps.insert(peer, timestamp.timestamp);
                let session = Session::new(transport, peer, init.sender, false, now);
                self.install_session(index, session);
                self.stats.handshakes_completed += 1;
                Ok(Received::Established {
                    peer,
                    initiator: false,
                    reply: len,
                })
            }
            Pattern::Xx => {
                if self.responding.len() >= self.config.max_pending_handshakes.get()
                    && let Some(&(_, oldest)) = self.responding.first()
                {
                    self.remove_slot(oldest);
                }
                let mut noise = [0u8; NOISE_XX_RESP_LEN];
                hs.write(None, &mut noise).map_err(|_| Reject::Handshake)?;
                let index = self.new_index();
                let len = Packet::Response(Response {
                    pattern: Pattern::Xx,
                    sender: index,
                    receiver: init.sender,
                    noise: &noise,
                })
                .encode(out)?;
                self.insert_slot(
                    index,
                    Slot::Responding(Box::new(Responding {
                        hs,
                        remote_index: init.sender,
                        deadline: now + self.config.handshake_timeout,
                    })),
                );
                Ok(Received::Reply { len })
            }
        }
    }

    fn on_response(
        &mut self,
        now: Time,
        resp: &Response<'_>,
        out: &mut [u8],
    ) -> Result<Received, Reject> {
        self.make_room_for_session(now)?;
        let Some(slot) = self.slots.get_mut(&resp.receiver) else {
            return Err(Reject::UnknownSession);
        };
        let Slot::Initiating(pending) = slot else {
            return Err(Reject::Unexpected);
        };
        if pending.hs.pattern() != resp.pattern {
            return Err(Reject::Unexpected);
        }
        // A failed read leaves the handshake as it was (snow restores its state), so a
        // forged response cannot break a genuine handshake.
        pending.hs.read(resp.noise).map_err(|_| Reject::Handshake)?;
        let Some(Slot::Initiating(pending)) = self.remove_slot(resp.receiver) else {
            return Err(Reject::UnknownSession);
        };
        let Initiating { mut hs, remote, .. } = *pending;
        let reply = match resp.pattern {
            Pattern::Ik => 0,
            Pattern::Xx => {
                let timestamp = self.next_timestamp(now);
                let mut noise = [0u8; NOISE_XX_FINISH_LEN];
                hs.write(Some(timestamp), &mut noise)
                    .map_err(|_| Reject::Handshake)?;
                Packet::Finish(Finish {
                    receiver: resp.sender,
                    noise: &noise,
                })
                .encode(out)?
            }
        };
        let (transport, peer) = hs.into_transport().map_err(|_| Reject::Handshake)?;
        if remote.is_some_and(|r| r != peer) {
            return Err(Reject::Handshake);
        }
        let session = Session::new(transport, peer, resp.sender, true, now);
        self.install_session(resp.receiver, session);
        self.stats.handshakes_completed += 1;
        Ok(Received::Established {
            peer,
            initiator: true,
            reply,
        })
    }

    fn on_finish(&mut self, now: Time, finish: &Finish<'_>) -> Result<Received, Reject> {
        self.make_room_for_session(now)?;
        let Some(slot) = self.slots.get_mut(&finish.receiver) else {
            return Err(Reject::UnknownSession);
        };
        let Slot::Responding(pending) = slot else {
            return Err(Reject::Unexpected);
        };
        let timestamp = pending
            .hs
            .read(finish.noise)
            .map_err(|_| Reject::Handshake)?;
        let peer = pending.hs.remote_static();
        // The message authenticated, so the handshake is over either way.
        let Some(Slot::Responding(pending)) = self.remove_slot(finish.receiver) else {
            return Err(Reject::UnknownSession);
        };
        let (Some(timestamp), Some(peer)) = (timestamp, peer) else {
            return Err(Reject::Handshake);
        };
        self.check_timestamp(&peer, timestamp)?;
        let Responding {
            hs, remote_index, ..
        } = *pending;
        let (transport, peer) = hs.into_transport().map_err(|_| Reject::Handshake)?;
        self.timestamps.insert(peer, timestamp.timestamp);
        let session = Session::new(transport, peer, remote_index, false, now);
        self.install_session(finish.receiver, session);
        self.stats.handshakes_completed += 1;
        Ok(Received::Established {
            peer,
            initiator: false,
            reply: 0,
        })
    }

    fn on_cookie_reply(
        &mut self,
        now: Time,
        from: SocketAddr,
        reply: &CookieReply<'_>,
        out: &mut [u8],
    ) -> Result<Received, Reject> {
        let Some(slot) = self.slots.get_mut(&reply.receiver) else {
            return Err(Reject::UnknownSession);
        };
        let Slot::Initiating(pending) = slot else {
            return Err(Reject::Unexpected);
        };
        if pending.cookie_used {
            // One re-send per initiation: cookie replies cannot drive a loop.
            return Err(Reject::Unexpected);
        }
        let keys = pending
            .remote
            .as_ref()
            .map_or_else(MacKeys::for_xx, MacKeys::for_peer);
        let cookie = keys
            .open_cookie(reply, &pending.mac1)
            .ok_or(Reject::Decrypt)?;
        pending.cookie_used = true;
        let len = pending.len;
        write_mac2(&mut pending.packet[..len], &cookie);
        out[..len].copy_from_slice(&pending.packet[..len]);
        self.jar.store(now, from, cookie);
        self.stats.cookie_replies_received += 1;
        Ok(Received::Reply { len })
    }

    fn on_transport(
        &mut self,
        now: Time,
        t: &Transport<'_>,
        out: &mut [u8],
    ) -> Result<Received, Reject> {
        let Some(slot) = self.slots.get_mut(&t.receiver) else {
            return Err(Reject::UnknownSession);
        };
        let Slot::Session(session) = slot else {
            return Err(Reject::UnknownSession);
        };
        let len = session.decrypt(now, &self.limits, t.counter, t.ciphertext, out)?;
        let peer = *session.peer();
        let created = session.created();
        if session.confirm() {
            self.unconfirmed.remove(&(created, t.receiver));
            self.confirm(&peer, t.receiver);
        }
        Ok(Received::Data { peer, len })
    }

    // ---- state ----

    /// Key confirmation: the first packet on a `next` session makes it current.
    fn confirm(&mut self, peer: &PeerKey, index: u32) {
        let Some(keys) = self.peers.get_mut(peer) else {
            return;
        };
        if keys.next != Some(index) {
            return;
        }
        let dropped = keys.previous;
        keys.previous = keys.current;
        keys.current = Some(index);
        keys.next = None;
        if let Some(old) = dropped {
            self.remove_slot(old);
        }
    }

    fn install_session(&mut self, index: u32, session: Session) {
        let peer = *session.peer();
        let initiator = session.is_initiator();
        if !initiator {
            self.unconfirmed.insert((session.created(), index));
        }
        self.insert_slot(index, Slot::Session(Box::new(session)));
        let keys = self.peers.entry(peer).or_default();
        let dropped = if initiator {
            let dropped = keys.previous;
            keys.previous = keys.current;
            keys.current = Some(index);
            dropped
        } else {
            keys.next.replace(index)
        };
        if let Some(old) = dropped {
            self.remove_slot(old);
        }
    }

    fn insert_slot(&mut self, index: u32, slot: Slot) {
        let deadline = slot_deadline(&slot, &self.limits);
        match &slot {
            Slot::Initiating(_) => self.pending_initiations += 1,
            Slot::Responding(_) => {
                self.responding.insert((deadline, index));
            }
            Slot::Session(_) => self.sessions += 1,
        }
        self.deadlines.insert((deadline, index));
        if let Some(old) = self.slots.insert(index, slot) {
            // Indices are unique by construction (`new_index`, or a slot's own index
            // reused after `remove_slot`); keep the counts right regardless.
            self.forget_slot(index, &old);
        }
    }

    fn remove_slot(&mut self, index: u32) -> Option<Slot> {
        let slot = self.slots.remove(&index)?;
        self.forget_slot(index, &slot);
        Some(slot)
    }

    fn forget_slot(&mut self, index: u32, slot: &Slot) {
        let deadline = slot_deadline(slot, &self.limits);
        self.deadlines.remove(&(deadline, index));
        let peer = match slot {
            Slot::Initiating(p) => {
                self.pending_initiations -= 1;
                p.remote
            }
            Slot::Responding(_) => {
                self.responding.remove(&(deadline, index));
                None
            }
            Slot::Session(s) => {
                self.sessions -= 1;
                self.unconfirmed.remove(&(s.created(), index));
                Some(*s.peer())
            }
        };
        if let Some(peer) = peer
            && let Some(keys) = self.peers.get_mut(&peer)
        {
            keys.forget(index);
            if keys.is_empty() {
                self.peers.remove(&peer);
            }
        }
    }

    /// Makes room for one more session: expired ones go first, then the oldest
    /// session no packet has confirmed (its initiator, if genuine, will retry; a flood
    /// of handshakes that never send data cannot crowd out working sessions). When
    /// every session is confirmed and live, the new one is refused.
    fn make_room_for_session(&mut self, now: Time) -> Result<(), Reject> {
        if self.sessions < self.config.max_sessions.get() {
            return Ok(());
        }
        self.handle_timeout(now);
        if self.sessions < self.config.max_sessions.get() {
            return Ok(());
        }
        match self.unconfirmed.first() {
            Some(&(_, oldest)) => {
                self.remove_slot(oldest);
                Ok(())
            }
            None => Err(Reject::RateLimited),
        }
    }

    fn check_timestamp(&self, peer: &PeerKey, t: InitPayload) -> Result<(), Reject> {
        match self.timestamps.peek(peer) {
            Some(&last) if t.timestamp <= last => Err(Reject::StaleTimestamp),
            _ => Ok(()),
        }
    }

    /// A timestamp strictly greater than every one sent before.
    fn next_timestamp(&mut self, now: Time) -> InitPayload {
        self.last_timestamp = now.as_micros().max(self.last_timestamp + 1);
        InitPayload {
            timestamp: self.last_timestamp,
        }
    }

    fn seed(&mut self) -> [u8; 32] {
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        seed
    }

    /// A random index no slot uses. Slots are bounded far below 2^32, so this ends.
    fn new_index(&mut self) -> u32 {
        loop {
            let index = self.rng.next_u32();
            if !self.slots.contains_key(&index) {
                return index;
            }
        }
    }
}

#[cfg(test)]
mod tests;
