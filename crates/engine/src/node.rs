use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use peercall_crypto::endpoint::{Endpoint, EndpointConfig, Received, Reject};
use peercall_crypto::{Identity, PeerKey, UserId};
use peercall_wire::frame::CloseReason;
use peercall_wire::{Frame, MAX_DATAGRAM, Protocol, Time, classify};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::stats::{DropReason, Stats};

/// What a node is in the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// May be promoted by the supernode tier (the default).
    Auto,
    /// Refuses promotion.
    Ordinary,
    /// Pinned supernode (a seed); never demoted.
    Supernode,
}

impl Role {
    /// The config and status spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Auto => "auto",
            Role::Ordinary => "ordinary",
            Role::Supernode => "supernode",
        }
    }
}

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
        }
    }
}

/// A datagram to send.
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
}

/// How long to wait before re-sending an unanswered handshake initiation; doubles
/// per attempt. One second is several WAN round trips, so a lost packet costs little.
const HANDSHAKE_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The back-off cap, so a seed that comes back is found within half a minute.
const HANDSHAKE_RETRY_MAX: Duration = Duration::from_secs(30);

/// An established session with a peer.
#[derive(Debug, Clone)]
struct Peer {
    addr: SocketAddr,
    established: Time,
    last_received: Time,
    last_sent: Time,
    /// When to next ask the crypto layer whether this session needs new keys.
    next_rekey_check: Time,
}

/// A handshake this node is trying to complete.
#[derive(Debug, Clone)]
struct Dial {
    contact: Contact,
    attempts: u32,
    next_attempt: Time,
}

/// The sans-IO node. See the crate documentation for the driving contract.
pub struct Node {
    config: Config,
    started: Time,
    endpoint: Endpoint,
    peers: HashMap<PeerKey, Peer>,
    /// Dials by address: for XX the peer key is not known until the handshake ends.
    dials: HashMap<SocketAddr, Dial>,
    /// Static keys learned from XX handshakes, by address, for IK re-dials.
    learned: HashMap<SocketAddr, PeerKey>,
    closing: bool,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
    /// Scratch for decrypted plaintext and outgoing frames.
    buf: Box<[u8; MAX_DATAGRAM]>,
    frame_buf: Box<[u8; MAX_DATAGRAM]>,
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
        let endpoint = Endpoint::new(&config.identity, EndpointConfig::default(), endpoint_seed)
            .expect("the default endpoint configuration is valid");
        let dials = config
            .seeds
            .iter()
            .map(|&contact| {
                let dial = Dial {
                    contact,
                    attempts: 0,
                    next_attempt: now,
                };
                (contact.addr, dial)
            })
            .collect();
        Node {
            config,
            started: now,
            endpoint,
            peers: HashMap::new(),
            dials,
            learned: HashMap::new(),
            closing: false,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            buf: Box::new([0; MAX_DATAGRAM]),
            frame_buf: Box::new([0; MAX_DATAGRAM]),
        }
    }

    /// Handles one received datagram.
    pub fn handle_datagram(&mut self, now: Time, from: SocketAddr, datagram: &[u8]) {
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += datagram.len() as u64;
        match classify(datagram) {
            Protocol::Peercall(_) => self.handle_peercall(now, from, datagram),
            _ => self.stats.drop(DropReason::UnknownProtocol),
        }
    }

    fn handle_peercall(&mut self, now: Time, from: SocketAddr, datagram: &[u8]) {
        let received = match self.endpoint.handle(now, from, datagram, &mut self.buf[..]) {
            Ok(r) => r,
            Err(reject) => {
                self.stats.drop(drop_reason(&reject));
                return;
            }
        };
        match received {
            Received::Reply { len } => self.queue(from, len),
            Received::Established {
                peer,
                initiator,
                reply,
            } => {
                if reply > 0 {
                    self.queue(from, reply);
                }
                self.established(now, peer, from, initiator);
            }
            Received::Data { peer, len } => self.handle_data(now, peer, from, len),
        }
    }

    fn established(&mut self, now: Time, key: PeerKey, from: SocketAddr, initiator: bool) {
        self.stats.handshakes_completed += 1;
        self.dials.remove(&from);
        self.learned.insert(from, key);
        let fresh = !self.peers.contains_key(&key);
        let peer = self.peers.entry(key).or_insert(Peer {
            addr: from,
            established: now,
            last_received: now,
            last_sent: now,
            next_rekey_check: now,
        });
        peer.addr = from;
        peer.established = now;
        peer.last_received = now;
        peer.next_rekey_check = now + REKEY_FIRST_CHECK;
        if fresh {
            self.events.push_back(Event::PeerUp {
                peer: key,
                addr: from,
            });
        }
        if initiator {
            // Confirms the new keys to the responder, which sends on them only after
            // hearing from us under them.
            self.send_frame(now, key, &Frame::Keepalive);
            self.stats.keepalives_sent += 1;
        }
    }

    fn handle_data(&mut self, now: Time, key: PeerKey, from: SocketAddr, len: usize) {
        let frame = match Frame::parse(&self.buf[..len]) {
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
        if peer.addr != from {
            // The peer roamed (new NAT mapping); follow its authenticated packets.
            peer.addr = from;
            self.events.push_back(Event::PeerUp {
                peer: key,
                addr: from,
            });
        }
        match frame {
            Frame::Keepalive => self.stats.keepalives_received += 1,
            Frame::Close(_) => self.peer_down(key, "closed by peer"),
            _ => self.stats.drop(DropReason::Unexpected),
        }
    }

    fn peer_down(&mut self, key: PeerKey, reason: &'static str) {
        let Some(peer) = self.peers.remove(&key) else {
            return;
        };
        self.endpoint.remove_peer(&key);
        self.events.push_back(Event::PeerDown { peer: key, reason });
        // Seeds are kept connected: dial again right away (with back-off).
        if let Some(contact) = self
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
            });
        }
    }

    /// Runs timers due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        self.endpoint.handle_timeout(now);
        if self.closing {
            return;
        }
        // Dead sessions.
        let dead: Vec<PeerKey> = self
            .peers
            .iter()
            .filter(|(_, p)| now.saturating_since(p.last_received) >= self.config.session_timeout)
            .map(|(k, _)| *k)
            .collect();
        for key in dead {
            self.peer_down(key, "timed out");
        }
        // Keepalives and rekeys.
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for key in keys {
            let Some(peer) = self.peers.get_mut(&key) else {
                continue;
            };
            if peer.next_rekey_check <= now {
                peer.next_rekey_check = now + REKEY_RECHECK;
                if self.endpoint.needs_rekey(now, &key) {
                    let addr = peer.addr;
                    self.dials.entry(addr).or_insert(Dial {
                        contact: Contact {
                            addr,
                            key: Some(key),
                        },
                        attempts: 0,
                        next_attempt: now,
                    });
                }
            }
            if now.saturating_since(peer.last_sent) >= self.config.keepalive_interval {
                // Counted as sent even if encryption fails, so the timer moves on.
                peer.last_sent = now;
                self.send_frame(now, key, &Frame::Keepalive);
                self.stats.keepalives_sent += 1;
            }
        }
        // Handshakes due.
        let due: Vec<SocketAddr> = self
            .dials
            .iter()
            .filter(|(_, d)| d.next_attempt <= now)
            .map(|(a, _)| *a)
            .collect();
        for addr in due {
            self.attempt(now, addr);
        }
    }

    fn attempt(&mut self, now: Time, addr: SocketAddr) {
        let Some(dial) = self.dials.get_mut(&addr) else {
            return;
        };
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
            },
        );
        self.attempt(now, contact.addr);
    }

    /// Graceful shutdown: tells every peer the session is closing and stops dialing.
    pub fn close(&mut self, now: Time) {
        self.closing = true;
        self.dials.clear();
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for key in keys {
            self.send_frame(now, key, &Frame::Close(CloseReason::SHUTDOWN));
            self.endpoint.remove_peer(&key);
        }
        self.peers.clear();
    }

    fn send_frame(&mut self, now: Time, key: PeerKey, frame: &Frame<'_>) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let Ok(n) = frame.encode(&mut self.frame_buf[..]) else {
            return;
        };
        match self
            .endpoint
            .encrypt(now, &key, &self.frame_buf[..n], &mut self.buf[..])
        {
            Ok(len) => {
                peer.last_sent = now;
                let addr = peer.addr;
                self.queue(addr, len);
            }
            Err(e) => tracing::debug!(error = %e, "cannot send frame"),
        }
    }

    fn queue(&mut self, dest: SocketAddr, len: usize) {
        self.transmits.push_back(Transmit {
            dest,
            bytes: self.buf[..len].to_vec(),
        });
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.transmits.pop_front()?;
        self.stats.datagrams_out += 1;
        self.stats.bytes_out += t.bytes.len() as u64;
        Some(t)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Node::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Time> {
        let mut next = self.endpoint.poll_timeout();
        let mut consider = |t: Time| next = Some(next.map_or(t, |n: Time| n.min(t)));
        if !self.closing {
            for p in self.peers.values() {
                consider(p.last_sent + self.config.keepalive_interval);
                consider(p.last_received + self.config.session_timeout);
                consider(p.next_rekey_check);
            }
            for d in self.dials.values() {
                consider(d.next_attempt);
            }
        }
        next
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let mut stats = self.stats.clone();
        stats.sessions = self.peers.len() as u64;
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
        Status {
            user_id: self.config.identity.user_id(),
            peer_key: self.config.identity.peer_key(),
            role: self.config.role,
            sessions,
            started: self.started,
        }
    }
}

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
