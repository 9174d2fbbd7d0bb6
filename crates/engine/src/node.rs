use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use peercall_crypto::endpoint::{Endpoint, EndpointConfig, Received, Reject};
use peercall_crypto::{Handle, Identity, PeerKey, UserId};
pub use peercall_overlay::Role;
use peercall_overlay::util::{Map, TokenBucket, map};
use peercall_overlay::{
    Bootstrap, CachedHost, Lookup, Output, Overlay, OverlayConfig, OverlayEvent, RequestId,
    Resources, stun,
};
use peercall_wire::frame::CloseReason;
use peercall_wire::{Frame, MAX_DATAGRAM, Protocol, Time, classify};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::call::{CallConfig, CallId, Calls, EndReason};
use crate::paths::{BufPool, Origin, Route};
use crate::relay::{RelayConfig, RelayServer};
use crate::stats::{DropReason, Stats};
use peercall_router::PathKind;

/// A peer to reach: its address and, when known, its static key (IK) or not (XX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contact {
    /// UDP address.
    pub addr: SocketAddr,
    /// The peer's Noise static key, when known.
    pub key: Option<PeerKey>,
}

/// A node's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node's long-term keys.
    pub identity: Identity,
    /// Seeds the node's RNG (ephemeral keys, session indices, jitter).
    pub rng_seed: [u8; 32],
    /// The node's role setting.
    pub role: Role,
    /// Peers to connect to at start and to keep connected.
    pub seeds: Vec<Contact>,
    /// Interval of authenticated keepalives on an idle session.
    pub keepalive_interval: Duration,
    /// A session with no authenticated packet for this long is dead.
    pub session_timeout: Duration,
    /// A session this node opened on demand for overlay messages is closed after
    /// this long without any (unless the overlay keeps it: homes, clients).
    pub idle_timeout: Duration,
    /// Overlay settings (host cache, handle, capacity, election).
    pub overlay: OverlayConfig,
    /// Call settings (answering, limits, timeouts, codec, jitter buffer).
    pub calls: CallConfig,
    /// Relay service settings (used while the node is a supernode).
    pub relay: RelayConfig,
}

impl Config {
    /// A configuration with the documented defaults.
    pub fn new(identity: Identity, rng_seed: [u8; 32]) -> Config {
        Config {
            identity,
            rng_seed,
            role: Role::Auto,
            seeds: Vec::new(),
            keepalive_interval: Duration::from_secs(10),
            session_timeout: Duration::from_secs(35),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            overlay: OverlayConfig::default(),
            calls: CallConfig::default(),
            relay: RelayConfig::default(),
        }
    }
}

/// A datagram to send. Its buffer may be handed back with [`Node::recycle`] once
/// sent, so the node reuses it instead of allocating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub dest: SocketAddr,
    /// Contents.
    pub bytes: Vec<u8>,
}

/// Something the owner may show or act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A session with `peer` came up (or was re-keyed onto a new address).
    PeerUp {
        /// The peer's static key.
        peer: PeerKey,
        /// Where its packets come from.
        addr: SocketAddr,
    },
    /// A session with `peer` ended: it closed, timed out, or failed to start.
    PeerDown {
        /// The peer's static key.
        peer: PeerKey,
        /// Why, for logs.
        reason: &'static str,
    },
    /// Something the overlay reports: lookups done, presence, role and home changes.
    Overlay(OverlayEvent),
    /// Someone calls: answer with [`Node::answer`] or decline with [`Node::reject`]
    /// (unless `auto_answer` answered already: [`Event::CallConnected`] follows).
    CallIncoming {
        /// The call.
        call: CallId,
        /// The caller's user id (from its verified record).
        from: UserId,
        /// The caller's handle, if its record claims one.
        handle: Option<Handle>,
    },
    /// The callee's phone rings (outgoing calls).
    CallRinging {
        /// The call.
        call: CallId,
    },
    /// The call was answered; media flows. `path` is the active path's kind, if one
    /// works yet (media starts on the first that does).
    CallConnected {
        /// The call.
        call: CallId,
        /// Active path kind.
        path: Option<PathKind>,
    },
    /// The active path changed.
    CallPathSwitched {
        /// The call.
        call: CallId,
        /// The kind left, if any.
        from: Option<PathKind>,
        /// The kind now active.
        to: PathKind,
    },
    /// A received Opus packet of a call that passes Opus through
    /// ([`Node::set_opus_passthrough`]): the first copy of each frame, as it
    /// arrived (late or out of order included), for a player with its own jitter
    /// buffer (a browser).
    CallOpus {
        /// The call.
        call: CallId,
        /// The stream's sequence number.
        seq: u32,
        /// Its 48 kHz timestamp.
        timestamp: u32,
        /// The Opus packet.
        opus: Vec<u8>,
    },
    /// The call is over.
    CallEnded {
        /// The call.
        call: CallId,
        /// Why.
        reason: EndReason,
    },
}

/// One established session, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The peer's static key.
    pub peer: PeerKey,
    /// The peer's current address.
    pub addr: SocketAddr,
    /// When the session (or its latest rekey) was established.
    pub established: Time,
    /// When the last authenticated packet arrived.
    pub last_received: Time,
}

/// A snapshot of the node for `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The node's user id.
    pub user_id: UserId,
    /// The node's Noise static key.
    pub peer_key: PeerKey,
    /// Current role.
    pub role: Role,
    /// Established sessions.
    pub sessions: Vec<SessionInfo>,
    /// When the node started.
    pub started: Time,
    /// Whether the node is a supernode now.
    pub supernode: bool,
    /// Home supernodes (ordinary nodes).
    pub homes: Vec<(PeerKey, SocketAddr)>,
    /// Attached clients (supernodes).
    pub clients: u64,
    /// Live supernodes known, this one included (supernodes).
    pub members: u64,
    /// Directory records stored (supernodes).
    pub records: u64,
    /// The reflexive address STUN reported.
    pub reflexive: Option<SocketAddr>,
}

/// How long to wait before re-sending an unanswered handshake initiation; doubles
/// per attempt. One second is several WAN round trips, so a lost packet costs little.
const HANDSHAKE_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The back-off cap, so a seed that comes back is found within half a minute.
const HANDSHAKE_RETRY_MAX: Duration = Duration::from_secs(30);
/// Handshake attempts for a session opened on demand before the peer is reported
/// unreachable (at 0, 1 and 3 s; given up at 7 s): the overlay then tries another.
const ON_DEMAND_ATTEMPTS: u32 = 3;
/// Control messages queued for one peer while its session is being set up; more are
/// dropped (and counted). Re-replication batches and member pages fit.
const MAX_QUEUED: usize = 64;
/// Default of [`Config::idle_timeout`]: long enough that a supernode's sessions with
/// other supernodes it probes or reads from every few seconds stay up, short enough
/// that sessions with thousands of storers over time do not accumulate.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(45);
/// A supernode also closes sessions others opened to it that carried overlay
/// messages but none for this long (the opener normally closes first).
const INBOUND_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// STUN Binding answers per second, and burst: a bound on what the node will reflect
/// to unverified sources.
const STUN_ANSWER_RATE: (u32, u32) = (200, 400);

/// An established session with a peer.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    /// The peer's address (for a call peer reached only through relays: its best
    /// known direct candidate, for status).
    pub(crate) addr: SocketAddr,
    /// How node-level traffic reaches a call peer that is not reached at `addr`: a
    /// relay channel or signalling. `None`: straight to `addr`.
    pub(crate) via: Option<Route>,
    established: Time,
    last_received: Time,
    pub(crate) last_sent: Time,
    /// When to next ask the crypto layer whether this session needs new keys.
    next_rekey_check: Time,
    /// When the session last carried an overlay or relay control message; `None` if
    /// never.
    pub(crate) last_control: Option<Time>,
    /// This node opened the session to send overlay messages (or it carried a call
    /// that ended): closed when idle.
    pub(crate) on_demand: bool,
    /// The time of this peer's live entry in the timer heap (`Time::MAX`: none).
    armed: Time,
}

/// A handshake this node is trying to complete.
#[derive(Debug, Clone)]
struct Dial {
    contact: Contact,
    attempts: u32,
    next_attempt: Time,
    /// Opened for overlay messages: given up after [`ON_DEMAND_ATTEMPTS`].
    on_demand: bool,
}

/// The sans-IO node. See the crate documentation for the driving contract.
pub struct Node {
    pub(crate) config: Config,
    started: Time,
    pub(crate) endpoint: Endpoint,
    pub(crate) overlay: Overlay,
    pub(crate) peers: Map<PeerKey, Peer>,
    /// Per-peer deadlines (keepalive, timeout, rekey, idle): `(time, peer)` entries,
    /// live only when equal to the peer's `armed` time, so `poll_timeout` is O(1)
    /// however many sessions a supernode holds.
    timers: BinaryHeap<Reverse<(Time, PeerKey)>>,
    /// Dials by address: for XX the peer key is not known until the handshake ends.
    dials: Map<SocketAddr, Dial>,
    /// Static keys learned from XX handshakes, by address, for IK re-dials.
    learned: Map<SocketAddr, PeerKey>,
    /// Overlay messages waiting for a session with their peer.
    pending: Map<PeerKey, VecDeque<Vec<u8>>>,
    stun_bucket: TokenBucket,
    closing: bool,
    pub(crate) transmits: VecDeque<Transmit>,
    pub(crate) events: VecDeque<Event>,
    pub(crate) stats: Stats,
    /// Scratch for handshake messages written by the crypto layer.
    buf: Box<[u8; MAX_DATAGRAM]>,
    /// Scratch for outgoing frames before encryption.
    pub(crate) frame_buf: Box<[u8; MAX_DATAGRAM]>,
    /// Scratch buffers for decrypted plaintext: one per nesting level (a hop packet,
    /// then the end-to-end packet a relay delivered inside it).
    rx: Vec<Vec<u8>>,
    /// Recycled transmit buffers.
    pub(crate) pool: BufPool,
    /// The relay service (active while a supernode).
    pub(crate) relay: RelayServer,
    /// Calls, their paths, and relay channels held as a client.
    pub(crate) calls: Calls,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_key", &self.config.identity.peer_key())
            .field("sessions", &self.peers.len())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A node starting at `now`; it dials its seeds on the first
    /// [`Node::handle_timeout`], which [`Node::poll_timeout`] asks for at once.
    pub fn new(config: Config, now: Time) -> Node {
        let mut rng = ChaCha20Rng::from_seed(config.rng_seed);
        let mut endpoint_seed = [0u8; 32];
        rng.fill_bytes(&mut endpoint_seed);
        let mut overlay_seed = [0u8; 32];
        rng.fill_bytes(&mut overlay_seed);
        let mut relay_seed = [0u8; 32];
        rng.fill_bytes(&mut relay_seed);
        let mut calls_seed = [0u8; 32];
        rng.fill_bytes(&mut calls_seed);
        let endpoint = Endpoint::new(&config.identity, EndpointConfig::default(), endpoint_seed)
            .expect("the default endpoint configuration is valid");
        let bootstrap = config
            .seeds
            .iter()
            .map(|c| Bootstrap {
                addr: c.addr,
                key: c.key,
            })
            .collect();
        let overlay = Overlay::new(
            config.identity.clone(),
            config.role,
            bootstrap,
            config.overlay.clone(),
            overlay_seed,
            now,
        );
        let mut dials = map(&mut rng);
        for &contact in &config.seeds {
            let dial = Dial {
                contact,
                attempts: 0,
                next_attempt: now,
                on_demand: false,
            };
            dials.insert(contact.addr, dial);
        }
        Node {
            started: now,
            endpoint,
            overlay,
            peers: map(&mut rng),
            timers: BinaryHeap::new(),
            dials,
            learned: map(&mut rng),
            pending: map(&mut rng),
            stun_bucket: TokenBucket::new(STUN_ANSWER_RATE.0, STUN_ANSWER_RATE.1, now),
            closing: false,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            buf: Box::new([0; MAX_DATAGRAM]),
            frame_buf: Box::new([0; MAX_DATAGRAM]),
            rx: vec![vec![0; MAX_DATAGRAM], vec![0; MAX_DATAGRAM]],
            pool: BufPool::default(),
            relay: RelayServer::new(config.relay.clone(), relay_seed),
            calls: Calls::new(config.calls.clone(), calls_seed),
            config,
        }
    }

    /// Handles one received datagram.
    pub fn handle_datagram(&mut self, now: Time, from: SocketAddr, datagram: &[u8]) {
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += datagram.len() as u64;
        match classify(datagram) {
            Protocol::Peercall(_) => self.handle_peercall(now, Origin::Direct(from), datagram),
            Protocol::Stun => self.handle_stun(now, from, datagram),
            _ => self.stats.drop(DropReason::UnknownProtocol),
        }
        self.drain_overlay(now);
    }

    fn handle_stun(&mut self, now: Time, from: SocketAddr, datagram: &[u8]) {
        match stun::parse(datagram) {
            Some(stun::StunMessage::Request { txid, fingerprint }) => {
                if self.closing || !self.stun_bucket.take(now) {
                    self.stats.drop(DropReason::RateLimited);
                    return;
                }
                if let Some(bytes) = stun::response(txid, from, fingerprint) {
                    self.stats.stun_answered += 1;
                    self.transmits.push_back(Transmit { dest: from, bytes });
                }
            }
            Some(stun::StunMessage::Response { txid, mapped }) => {
                self.overlay.handle_stun_response(now, from, txid, mapped);
            }
            None => match stun::classic_response(datagram, from) {
                Some(bytes) if !self.closing && self.stun_bucket.take(now) => {
                    self.stats.stun_answered += 1;
                    self.transmits.push_back(Transmit { dest: from, bytes });
                }
                Some(_) => self.stats.drop(DropReason::RateLimited),
                None => self.stats.drop(DropReason::Malformed),
            },
        }
    }

    /// Handles one peercall packet: a datagram (`Origin::Direct`), or an end-to-end
    /// packet a relay or a signalling supernode delivered.
    pub(crate) fn handle_peercall(&mut self, now: Time, origin: Origin, datagram: &[u8]) {
        let from = match origin {
            Origin::Direct(a) => a,
            Origin::Relay { relay, .. } => self.peers.get(&relay).map_or(UNSPECIFIED, |p| p.addr),
            Origin::Signal { observed, .. } => observed,
        };
        let mut out = self.rx.pop().unwrap_or_else(|| vec![0; MAX_DATAGRAM]);
        match self.endpoint.handle(now, from, datagram, &mut out[..]) {
            Err(reject) => self.stats.drop(drop_reason(&reject)),
            Ok(Received::Reply { len }) => self.send_bytes(now, origin.reply_route(), &out[..len]),
            Ok(Received::Established {
                peer,
                initiator,
                reply,
            }) => {
                if reply > 0 {
                    self.send_bytes(now, origin.reply_route(), &out[..reply]);
                    // A handshake answered through signalling is answered straight
                    // to the sender as well: that opens our NAT towards it.
                    if let Origin::Signal { observed, .. } = origin {
                        self.send_bytes(now, Route::Direct(observed), &out[..reply]);
                    }
                }
                self.established(now, peer, origin, initiator);
            }
            Ok(Received::Data { peer, len }) => self.handle_data(now, peer, origin, &out[..len]),
        }
        self.rx.push(out);
    }

    fn established(&mut self, now: Time, key: PeerKey, origin: Origin, initiator: bool) {
        self.stats.handshakes_completed += 1;
        let direct = origin.direct();
        let on_demand =
            direct.is_some_and(|from| self.dials.remove(&from).is_some_and(|d| d.on_demand));
        if let Some(from) = direct {
            self.learned.insert(from, key);
        }
        let fresh = !self.peers.contains_key(&key);
        let (addr, via) = match direct {
            Some(from) => (from, None),
            None => (
                self.calls
                    .address_hint(&key, &origin)
                    .unwrap_or(UNSPECIFIED),
                Some(origin.reply_route()),
            ),
        };
        let peer = self.peers.entry(key).or_insert(Peer {
            addr,
            via,
            established: now,
            last_received: now,
            last_sent: now,
            next_rekey_check: now,
            last_control: None,
            on_demand,
            armed: Time::MAX,
        });
        match direct {
            Some(from) if peer.via.is_none() => peer.addr = from,
            Some(_) => {}
            // A session made anew through signalling (its direct path is gone, or
            // never was) answers through signalling from now on.
            None => peer.via = via,
        }
        peer.established = now;
        peer.last_received = now;
        peer.next_rekey_check = now + REKEY_FIRST_CHECK;
        let addr = peer.addr;
        if fresh {
            self.events.push_back(Event::PeerUp { peer: key, addr });
        }
        if initiator {
            // Confirms the new keys to the responder, which sends on them only after
            // hearing from us under them.
            self.send_frame(now, key, &Frame::Keepalive);
            self.stats.keepalives_sent += 1;
        }
        if fresh && let Some(from) = direct {
            self.overlay.handle_peer_up(now, key, from);
        }
        if let Some(queued) = self.pending.remove(&key) {
            for msg in queued {
                self.send_control_now(now, key, &msg);
            }
        }
        self.on_session_established(now, key, origin);
        self.arm_peer(key);
    }

    fn handle_data(&mut self, now: Time, key: PeerKey, origin: Origin, plaintext: &[u8]) {
        let frame = match Frame::parse(plaintext) {
            Ok(f) => f,
            Err(_) => {
                self.stats.drop(DropReason::Malformed);
                return;
            }
        };
        let Some(peer) = self.peers.get_mut(&key) else {
            // Authenticated, but the session was torn down locally meanwhile.
            self.stats.drop(DropReason::Unexpected);
            return;
        };
        peer.last_received = now;
        let direct = origin.direct();
        let mut roamed = false;
        if let Some(from) = direct
            && peer.via.is_none()
            && peer.addr != from
        {
            // The peer roamed (new NAT mapping); follow its authenticated packets.
            roamed = true;
            peer.addr = from;
            self.events.push_back(Event::PeerUp {
                peer: key,
                addr: from,
            });
        }
        match frame {
            Frame::Keepalive => {
                self.stats.keepalives_received += 1;
                self.on_call_keepalive(now, key, origin);
            }
            Frame::Close(_) => self.peer_down(now, key, "closed by peer"),
            Frame::Control(body) => {
                let Some(from) = direct else {
                    // Overlay messages travel on direct sessions only.
                    self.stats.drop(DropReason::Unexpected);
                    return;
                };
                peer.last_control = Some(now);
                self.stats.control_in += 1;
                if roamed {
                    self.overlay.handle_peer_up(now, key, from);
                }
                self.overlay.handle_message(now, key, from, body);
            }
            Frame::Relay(r) => match direct {
                // A relay frame inside a relayed packet is never valid: no nesting.
                None => self.stats.drop(DropReason::Unexpected),
                Some(_) => self.on_relay_frame(now, key, r.channel, r.packet),
            },
            Frame::RelayControl(body) => match direct {
                None => self.stats.drop(DropReason::Unexpected),
                Some(from) => {
                    peer.last_control = Some(now);
                    self.on_relay_control(now, key, from, body);
                }
            },
            Frame::Probe(_)
            | Frame::ProbeAck(_)
            | Frame::Media(_)
            | Frame::Report(_)
            | Frame::Call(_) => self.on_call_frame(now, key, origin, &frame),
        }
    }

    /// A `Frame::Relay` on the hop session with `from`: a packet a relay delivers to
    /// us on one of our channels, or one to forward as a relay.
    fn on_relay_frame(&mut self, now: Time, from: PeerKey, channel: u32, packet: &[u8]) {
        if self.calls.is_our_channel(&from, channel) {
            self.handle_peercall(
                now,
                Origin::Relay {
                    relay: from,
                    channel,
                },
                packet,
            );
        } else {
            self.forward_relay(now, from, channel, packet);
        }
    }

    pub(crate) fn peer_down(&mut self, now: Time, key: PeerKey, reason: &'static str) {
        let Some(peer) = self.peers.remove(&key) else {
            return;
        };
        self.endpoint.remove_peer(&key);
        self.events.push_back(Event::PeerDown { peer: key, reason });
        self.overlay.handle_peer_down(now, key);
        self.relay.peer_down(&key);
        self.on_session_down(now, key);
        // Seeds are kept connected while the overlay needs them (not attached or
        // joined yet): dial again right away (with back-off).
        if self.overlay.wants_seeds()
            && !self.closing
            && let Some(contact) = self
                .config
                .seeds
                .iter()
                .find(|c| c.addr == peer.addr || c.key == Some(key))
        {
            let contact = *contact;
            self.dials.entry(contact.addr).or_insert(Dial {
                contact,
                attempts: 0,
                next_attempt: peer.last_received,
                on_demand: false,
            });
        }
    }

    fn is_seed(&self, key: &PeerKey, addr: &SocketAddr) -> bool {
        self.config
            .seeds
            .iter()
            .any(|c| c.key == Some(*key) || c.addr == *addr)
    }

    /// Whether an idle session with `key` may be closed at `now`, and when it may be.
    fn reap_at(&self, key: &PeerKey, peer: &Peer) -> Option<Time> {
        if self.overlay.keeps_session(key)
            || self.calls.keeps_session(key)
            || self.relay.keeps_session(key)
        {
            return None;
        }
        if self.is_seed(key, &peer.addr) {
            // Seeds bootstrap the overlay; once attached (or joined) the node lets
            // idle seed sessions go, so seeds do not hold every node's session.
            let last = peer.last_control.unwrap_or(peer.established);
            return (!self.overlay.wants_seeds()).then(|| last + self.config.idle_timeout);
        }
        let last = peer.last_control?;
        if peer.on_demand {
            return Some(last + self.config.idle_timeout);
        }
        self.overlay
            .is_supernode()
            .then(|| last + INBOUND_IDLE_TIMEOUT)
    }

    fn peer_deadline(&self, key: &PeerKey, p: &Peer) -> Time {
        let mut t = (p.last_sent + self.config.keepalive_interval)
            .min(p.last_received + self.config.session_timeout)
            .min(p.next_rekey_check);
        if let Some(r) = self.reap_at(key, p) {
            t = t.min(r);
        }
        t
    }

    /// Makes sure the peer's timer fires no later than its next deadline.
    fn arm_peer(&mut self, key: PeerKey) {
        let Some(p) = self.peers.get(&key) else {
            return;
        };
        let at = self.peer_deadline(&key, p);
        if at < p.armed {
            self.timers.push(Reverse((at, key)));
            if let Some(p) = self.peers.get_mut(&key) {
                p.armed = at;
            }
        }
    }

    /// Runs timers due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        self.endpoint.handle_timeout(now);
        if self.closing {
            return;
        }
        self.relay.handle_timeout(now);
        self.drain_relay(now);
        self.calls_timeout(now);
        while let Some(&Reverse((at, key))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(p) = self.peers.get_mut(&key) else {
                continue;
            };
            if p.armed != at {
                continue;
            }
            p.armed = Time::MAX;
            self.peer_timer(now, key);
            self.arm_peer(key);
        }
        // Handshakes due.
        let mut due: Vec<SocketAddr> = self
            .dials
            .iter()
            .filter(|(_, d)| d.next_attempt <= now)
            .map(|(a, _)| *a)
            .collect();
        due.sort_unstable();
        for addr in due {
            self.attempt(now, addr);
        }
        self.overlay.handle_timeout(now);
        self.drain_overlay(now);
    }

    fn peer_timer(&mut self, now: Time, key: PeerKey) {
        let Some(peer) = self.peers.get(&key).cloned() else {
            return;
        };
        if now.saturating_since(peer.last_received) >= self.config.session_timeout {
            self.peer_down(now, key, "timed out");
            return;
        }
        if self.reap_at(&key, &peer).is_some_and(|t| t <= now) {
            self.stats.sessions_reaped += 1;
            self.send_frame(now, key, &Frame::Close(CloseReason::SHUTDOWN));
            self.peer_down(now, key, "idle");
            return;
        }
        if peer.next_rekey_check <= now {
            if let Some(p) = self.peers.get_mut(&key) {
                p.next_rekey_check = now + REKEY_RECHECK;
            }
            if self.endpoint.needs_rekey(now, &key) && peer.via.is_some() {
                // A call peer reached through a relay: the new handshake takes the
                // same way (retried at the next check if it fails).
                self.rekey_via(now, key);
            } else if self.endpoint.needs_rekey(now, &key) {
                let addr = peer.addr;
                self.dials.entry(addr).or_insert(Dial {
                    contact: Contact {
                        addr,
                        key: Some(key),
                    },
                    attempts: 0,
                    next_attempt: now,
                    on_demand: false,
                });
            }
        }
        if now.saturating_since(peer.last_sent) >= self.config.keepalive_interval {
            // Counted as sent even if encryption fails, so the timer moves on.
            if let Some(p) = self.peers.get_mut(&key) {
                p.last_sent = now;
            }
            self.send_frame(now, key, &Frame::Keepalive);
            self.stats.keepalives_sent += 1;
        }
    }

    fn attempt(&mut self, now: Time, addr: SocketAddr) {
        let Some(dial) = self.dials.get_mut(&addr) else {
            return;
        };
        if dial.on_demand && dial.attempts >= ON_DEMAND_ATTEMPTS {
            let dial = self.dials.remove(&addr).expect("just found");
            self.stats.dials_failed += 1;
            if let Some(key) = dial.contact.key {
                if let Some(q) = self.pending.remove(&key) {
                    self.stats.control_dropped += q.len() as u64;
                }
                if !self.peers.contains_key(&key) {
                    self.events.push_back(Event::PeerDown {
                        peer: key,
                        reason: "unreachable",
                    });
                    self.overlay.handle_peer_down(now, key);
                    self.on_session_down(now, key);
                }
            }
            return;
        }
        let key = dial
            .contact
            .key
            .or_else(|| self.learned.get(&addr).copied());
        let backoff = HANDSHAKE_RETRY_FIRST
            .saturating_mul(1 << dial.attempts.min(16))
            .min(HANDSHAKE_RETRY_MAX);
        dial.attempts += 1;
        dial.next_attempt = now + backoff;
        match self.endpoint.initiate(now, addr, key, &mut self.buf[..]) {
            Ok(len) => {
                self.stats.handshakes_initiated += 1;
                self.queue(addr, len);
            }
            Err(e) => tracing::debug!(%addr, error = %e, "cannot initiate handshake"),
        }
    }

    /// Opens a session with `key` at `addr` for messages that wait for it (an
    /// on-demand dial, given up after a few attempts), unless one is up or dialing.
    pub(crate) fn dial_on_demand(&mut self, now: Time, key: PeerKey, addr: SocketAddr) {
        if self.peers.contains_key(&key) || self.closing {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.dials.entry(addr) {
            e.insert(Dial {
                contact: Contact {
                    addr,
                    key: Some(key),
                },
                attempts: 0,
                next_attempt: now,
                on_demand: true,
            });
            self.attempt(now, addr);
        }
    }

    /// Whether [`Node::close`] was called.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing
    }

    /// Starts a new handshake with call peer `key` along its relay route.
    fn rekey_via(&mut self, now: Time, key: PeerKey) {
        let Some(route) = self.peer_route(&key) else {
            return;
        };
        let addr = self.peers.get(&key).map_or(UNSPECIFIED, |p| p.addr);
        match self
            .endpoint
            .initiate(now, addr, Some(key), &mut self.buf[..])
        {
            Ok(len) => {
                self.stats.handshakes_initiated += 1;
                let bytes = self.buf[..len].to_vec();
                self.send_bytes(now, route, &bytes);
            }
            Err(e) => tracing::debug!(error = %e, "cannot initiate rekey"),
        }
    }

    /// Starts a session with `contact` (no-op if one is up or being set up).
    pub fn connect(&mut self, now: Time, contact: Contact) {
        let up = self.peers.values().any(|p| p.addr == contact.addr)
            || contact.key.is_some_and(|k| self.peers.contains_key(&k));
        if up || self.closing || self.dials.contains_key(&contact.addr) {
            return;
        }
        self.dials.insert(
            contact.addr,
            Dial {
                contact,
                attempts: 0,
                next_attempt: now,
                on_demand: false,
            },
        );
        self.attempt(now, contact.addr);
    }

    // ---- overlay ---------------------------------------------------------------------

    /// Hands the overlay's outputs on: messages onto sessions (dialing when needed),
    /// STUN requests onto the wire, events to the owner.
    pub(crate) fn drain_overlay(&mut self, now: Time) {
        while let Some(out) = self.overlay.poll_output() {
            match out {
                Output::Send { to, addr, msg } => self.send_control(now, to, addr, msg),
                Output::Stun { to, txid } => {
                    self.transmits.push_back(Transmit {
                        dest: to,
                        bytes: stun::request(txid),
                    });
                }
                Output::Event(OverlayEvent::LookupDone { id, result })
                    if self.calls.owns_lookup(id) =>
                {
                    self.on_call_lookup(now, id, result);
                }
                Output::Event(e) => self.events.push_back(Event::Overlay(e)),
            }
        }
    }

    /// Sends the relay service's messages.
    pub(crate) fn drain_relay(&mut self, now: Time) {
        while let Some((to, addr, msg)) = self.relay.poll_output() {
            self.send_relay_msg(now, to, addr, &msg);
        }
    }

    fn send_control(&mut self, now: Time, to: PeerKey, addr: SocketAddr, msg: Vec<u8>) {
        if self.peers.contains_key(&to) {
            self.send_control_now(now, to, &msg);
            return;
        }
        if self.closing {
            self.stats.control_dropped += 1;
            return;
        }
        let q = self.pending.entry(to).or_default();
        if q.len() >= MAX_QUEUED {
            q.pop_front();
            self.stats.control_dropped += 1;
        }
        q.push_back(msg);
        if let std::collections::hash_map::Entry::Vacant(e) = self.dials.entry(addr) {
            e.insert(Dial {
                contact: Contact {
                    addr,
                    key: Some(to),
                },
                attempts: 0,
                next_attempt: now,
                on_demand: true,
            });
            self.attempt(now, addr);
        }
    }

    fn send_control_now(&mut self, now: Time, to: PeerKey, msg: &[u8]) {
        self.stats.control_out += 1;
        self.send_frame(now, to, &Frame::Control(msg));
        if let Some(p) = self.peers.get_mut(&to) {
            p.last_control = Some(now);
        }
    }

    /// Looks a user up by id or handle; the answer comes as
    /// [`Event::Overlay`]`(`[`OverlayEvent::LookupDone`]`)` with the returned id.
    pub fn lookup(&mut self, now: Time, what: Lookup) -> RequestId {
        let id = self.overlay.lookup(now, what);
        self.drain_overlay(now);
        id
    }

    /// Follows these contacts' presence; changes come as
    /// [`OverlayEvent::Presence`] events.
    pub fn subscribe(&mut self, now: Time, users: &[UserId]) {
        self.overlay.subscribe(now, users);
        self.drain_overlay(now);
    }

    /// Stops following these contacts.
    pub fn unsubscribe(&mut self, now: Time, users: &[UserId]) {
        self.overlay.unsubscribe(now, users);
        self.drain_overlay(now);
    }

    /// Changes the relay service's limits (config reload); channels already granted
    /// keep going, new requests see the new limits.
    pub fn set_relay_config(&mut self, relay: RelayConfig) {
        self.relay.set_config(relay.clone());
        self.config.relay = relay;
    }

    /// Claims `handle` (or none) in the directory record and re-publishes.
    pub fn set_handle(&mut self, now: Time, handle: Option<Handle>) {
        self.overlay.set_handle(now, handle);
        self.drain_overlay(now);
    }

    /// Updates the resources this node offers for promotion (bandwidth from config,
    /// CPU headroom as the owner measures it); reported with the next candidacy.
    pub fn set_resources(&mut self, resources: Resources) {
        self.overlay.set_resources(resources);
    }

    /// Re-publishes the directory record now.
    pub fn publish(&mut self, now: Time) {
        self.overlay.publish_now(now);
        self.overlay.handle_timeout(now);
        self.drain_overlay(now);
    }

    /// The overlay state machine, for inspection.
    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    /// The host cache (known supernodes), for the shell to persist.
    pub fn host_cache(&self) -> &[CachedHost] {
        self.overlay.host_cache()
    }

    /// Graceful shutdown: the overlay says goodbye (offline record, hand-off), then
    /// every peer is told the session is closing and dialing stops.
    pub fn close(&mut self, now: Time) {
        self.hangup_all(now);
        self.overlay.close(now);
        self.closing = true;
        self.drain_overlay(now);
        self.dials.clear();
        self.pending.clear();
        let mut keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            self.send_frame(now, key, &Frame::Close(CloseReason::SHUTDOWN));
            self.endpoint.remove_peer(&key);
        }
        self.peers.clear();
    }

    pub(crate) fn send_frame(&mut self, now: Time, key: PeerKey, frame: &Frame<'_>) {
        let Some(route) = self.peer_route(&key) else {
            return;
        };
        self.send_on(now, key, route, frame);
    }

    fn queue(&mut self, dest: SocketAddr, len: usize) {
        let mut b = self.pool.take();
        b[..len].copy_from_slice(&self.buf[..len]);
        b.truncate(len);
        self.push_transmit(dest, b);
    }

    /// The next datagram to send. Hand its buffer back with [`Node::recycle`] after
    /// sending it, or use [`Node::poll_transmit_into`], so the node reuses buffers.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.transmits.pop_front()?;
        self.stats.datagrams_out += 1;
        self.stats.bytes_out += t.bytes.len() as u64;
        Some(t)
    }

    /// Copies the next datagram to send into `buf` (at least [`MAX_DATAGRAM`]
    /// bytes) and returns its destination and length; the node keeps the buffer for
    /// reuse. A datagram longer than `buf` is dropped (counted as sent, never
    /// happens with a buffer of [`MAX_DATAGRAM`] bytes).
    pub fn poll_transmit_into(&mut self, buf: &mut [u8]) -> Option<(SocketAddr, usize)> {
        let t = self.poll_transmit()?;
        let n = t.bytes.len();
        let fits = n <= buf.len();
        if fits {
            buf[..n].copy_from_slice(&t.bytes);
        }
        let dest = t.dest;
        self.pool.give(t.bytes);
        Some((dest, if fits { n } else { 0 }))
    }

    /// Gives a sent transmit's buffer back for reuse.
    pub fn recycle(&mut self, bytes: Vec<u8>) {
        self.pool.give(bytes);
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Node::handle_timeout`] must next be called. Cheap: the earliest of a
    /// heap top, the crypto layer's next deadline, the (few) dials in progress and
    /// the overlay's next timer.
    pub fn poll_timeout(&self) -> Option<Time> {
        let mut next = self.endpoint.poll_timeout();
        let mut consider = |t: Time| next = Some(next.map_or(t, |n: Time| n.min(t)));
        if !self.closing {
            if let Some(Reverse((at, _))) = self.timers.peek() {
                consider(*at);
            }
            for d in self.dials.values() {
                consider(d.next_attempt);
            }
            if let Some(t) = self.overlay.poll_timeout() {
                consider(t);
            }
            if let Some(t) = self.relay.poll_timeout() {
                consider(t);
            }
            if let Some(t) = self.calls_poll_timeout() {
                consider(t);
            }
        }
        next
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let mut stats = self.stats.clone();
        stats.sessions = self.peers.len() as u64;
        stats.overlay = self.overlay.stats();
        stats.relay = self.relay.stats();
        stats.calls = self.calls.counters();
        stats.buffers_allocated = self.pool.allocated;
        stats
    }

    /// A status snapshot.
    pub fn status(&self) -> Status {
        let mut sessions: Vec<SessionInfo> = self
            .peers
            .iter()
            .map(|(k, p)| SessionInfo {
                peer: *k,
                addr: p.addr,
                established: p.established,
                last_received: p.last_received,
            })
            .collect();
        sessions.sort_by_key(|s| s.peer);
        let o = self.overlay.stats();
        Status {
            user_id: self.config.identity.user_id(),
            peer_key: self.config.identity.peer_key(),
            role: self.config.role,
            sessions,
            started: self.started,
            supernode: o.supernode,
            homes: self.overlay.homes(),
            clients: o.clients,
            members: o.members,
            records: o.records,
            reflexive: self.overlay.reflexive(),
        }
    }
}

/// A placeholder address for sessions known only through relays; never sent to.
const UNSPECIFIED: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::UNSPECIFIED,
    0,
));

/// The first rekey check of a session: the crypto layer's rekey-after time (120 s);
/// earlier checks could only answer no.
const REKEY_FIRST_CHECK: Duration = Duration::from_secs(120);
/// Later checks: the responder side's rekey comes a few seconds after the
/// initiator's, and a lost handshake needs retrying; 5 s keeps both prompt.
const REKEY_RECHECK: Duration = Duration::from_secs(5);

fn drop_reason(reject: &Reject) -> DropReason {
    match reject {
        Reject::Malformed(_) => DropReason::Malformed,
        Reject::UnknownSession => DropReason::UnknownSession,
        Reject::Decrypt => DropReason::Decrypt,
        Reject::Replay => DropReason::Replay,
        Reject::ExpiredKey => DropReason::ExpiredKey,
        Reject::BadMac => DropReason::BadMac,
        Reject::StaleTimestamp => DropReason::StaleTimestamp,
        Reject::Handshake => DropReason::Handshake,
        Reject::RateLimited => DropReason::RateLimited,
        Reject::Unexpected => DropReason::Unexpected,
    }
}
