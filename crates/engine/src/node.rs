use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use peercall_crypto::{Identity, PeerKey, UserId};
use peercall_wire::Time;

use crate::stats::Stats;

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

/// The sans-IO node. See the crate documentation for the driving contract.
#[derive(Debug)]
pub struct Node {
    config: Config,
    started: Time,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
}

impl Node {
    /// A node starting at `now`; it connects to its seeds on the first
    /// [`Node::handle_timeout`].
    pub fn new(config: Config, now: Time) -> Node {
        Node {
            config,
            started: now,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// Handles one received datagram.
    pub fn handle_datagram(&mut self, now: Time, from: SocketAddr, datagram: &[u8]) {
        let _ = (now, from);
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += datagram.len() as u64;
    }

    /// Runs timers due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        let _ = now;
    }

    /// Starts a session with `contact` (no-op if one is up or being set up).
    pub fn connect(&mut self, now: Time, contact: Contact) {
        let _ = (now, contact);
    }

    /// Graceful shutdown: tells every peer the session is closing.
    pub fn close(&mut self, now: Time) {
        let _ = now;
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
        None
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    /// A status snapshot.
    pub fn status(&self) -> Status {
        Status {
            user_id: self.config.identity.user_id(),
            peer_key: self.config.identity.peer_key(),
            role: self.config.role,
            sessions: Vec::new(),
            started: self.started,
        }
    }
}
