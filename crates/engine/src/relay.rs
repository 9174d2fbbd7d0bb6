//! The supernode relay service: channels with mutual permission, two-relay links,
//! quotas, expiry, signalling, and the drop counters.
//!
//! # Model
//!
//! A *leg* is one client's permission at this relay: (client, peer, via). The relay
//! gives each leg a random 32-bit *channel*; the client wraps each end-to-end packet
//! for `peer` in a `Frame::Relay { channel, packet }` on its hop session with the
//! relay, and receives the peer's packets the same way, on the same channel. The
//! hop session is Noise-encrypted; the packet inside is the callers' own end-to-end
//! transport packet, so the relay sees neither plaintext media nor call control.
//!
//! - **One-relay path** (via none): packets on a leg (A, B) are forwarded to B on
//!   its mirror leg (B, A), and only while that mirror leg exists: both callers
//!   asked this relay for each other (mutual permission, as TURN permissions).
//! - **Two-relay path** (via S2): this relay tells S2 with a [`RelayMsg::Link`]
//!   "my client A consents to your client B, send to me on channel c". S2 answers
//!   with its own link once B asked S2 for the mirror leg (B, A, via this relay).
//!   Packets from A go to S2 on S2's channel; packets from S2 on A's channel go to A.
//!   S2 must be a live supernode in this relay's membership view.
//!
//! Targets are always named by static key (sessions), never by raw address, and a
//! target whose address is loopback, private, link-local or multicast is refused
//! unless [`RelayConfig::allow_private_targets`] (for loopback demos and private test
//! networks).
//!
//! # Limits
//!
//! Per client: [`RelayConfig::max_channels_per_client`] legs, a byte-rate token
//! bucket over everything forwarded for its legs, and a request-rate bucket over its
//! allocation and signalling messages. Per relay: [`RelayConfig::max_channels`] legs.
//! A leg expires after [`RelayConfig::idle_timeout`] without a forwarded packet, or
//! [`RelayConfig::lifetime`] after its last refresh (clients refresh while they use
//! it). Nothing is allocated for a sender that has no authenticated session: every
//! input here arrived on one.
//!
//! # Hot path
//!
//! Forwarding is one hash lookup of the channel, a permission check,
//! a token-bucket charge and (one-relay) a second lookup of the mirror leg. It does
//! not allocate; the engine decrypts the hop, calls it, re-encrypts into a recycled
//! transmit buffer.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use peercall_crypto::PeerKey;
use peercall_overlay::util::{Map, Set, TokenBucket, map, set};
use peercall_wire::Time;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::msg::{Id, Refusal, RelayMsg};

/// Legs a supernode holds by default: two per relayed call, so 2,048 calls, well
/// above what a residential supernode's uplink carries (a call is ~100 kbit/s both
/// ways with headers).
pub const DEFAULT_MAX_CHANNELS: usize = 4_096;
/// Legs one client may hold by default: a call uses up to two per relay (a one-relay
/// and a two-relay path), so this covers a few calls at once.
pub const DEFAULT_MAX_CHANNELS_PER_CLIENT: usize = 8;
/// Bytes per second forwarded for one client's legs by default: 40 kB/s is four
/// 32 kbit/s voice streams with headers and redundant copies.
pub const DEFAULT_CLIENT_RATE_BPS: u32 = 40_000;
/// Burst of the client byte bucket: half a second at the rate, for the packet
/// trains of a path switch.
pub const DEFAULT_CLIENT_BURST_BYTES: u32 = 20_000;
/// Relay control messages (allocations, signals) per second per client: a call
/// setup sends a few; more is a misbehaving or hostile client.
pub const DEFAULT_REQUEST_RATE: u32 = 20;
/// Burst of the request bucket: a whole call setup at once (signals to two homes,
/// allocations for four paths, retries).
pub const DEFAULT_REQUEST_BURST: u32 = 40;
/// A leg's hard lifetime after its last refresh. Clients refresh every
/// [`LEG_REFRESH`], so a leg of a client that vanished lingers at most this long.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// A leg with no forwarded packet for this long is dropped: warm paths are probed
/// every 0.25 s and cold ones every 2 s, so only abandoned legs are idle this long.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Clients refresh their legs this often: a third of the lifetime, so two refreshes
/// may be lost before a leg expires.
pub const LEG_REFRESH: Duration = Duration::from_secs(100);
/// How often expired legs are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Recently expired channels remembered, to count their late packets as expired
/// rather than unknown.
const EXPIRED_MEMORY: usize = 4_096;
/// A peer that signalled a client through this supernode may be signalled back
/// (it need not be attached here) for this long: a call setup's exchange.
const SIGNAL_PAIR_TTL: Duration = Duration::from_secs(60);
/// Signalling pairs remembered at once; the oldest are forgotten first.
const MAX_SIGNAL_PAIRS: usize = 4_096;

/// Relay settings (supernodes only relay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// Whether this node relays when it is a supernode (default true).
    pub enabled: bool,
    /// Forward to loopback, private, link-local and multicast targets (default
    /// false; the loopback demo and private test networks turn it on).
    pub allow_private_targets: bool,
    /// [`DEFAULT_MAX_CHANNELS`].
    pub max_channels: usize,
    /// [`DEFAULT_MAX_CHANNELS_PER_CLIENT`].
    pub max_channels_per_client: usize,
    /// [`DEFAULT_CLIENT_RATE_BPS`].
    pub client_rate_bps: u32,
    /// [`DEFAULT_CLIENT_BURST_BYTES`].
    pub client_burst_bytes: u32,
    /// [`DEFAULT_REQUEST_RATE`].
    pub request_rate: u32,
    /// [`DEFAULT_REQUEST_BURST`].
    pub request_burst: u32,
    /// [`DEFAULT_LIFETIME`].
    pub lifetime: Duration,
    /// [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            enabled: true,
            allow_private_targets: false,
            max_channels: DEFAULT_MAX_CHANNELS,
            max_channels_per_client: DEFAULT_MAX_CHANNELS_PER_CLIENT,
            client_rate_bps: DEFAULT_CLIENT_RATE_BPS,
            client_burst_bytes: DEFAULT_CLIENT_BURST_BYTES,
            request_rate: DEFAULT_REQUEST_RATE,
            request_burst: DEFAULT_REQUEST_BURST,
            lifetime: DEFAULT_LIFETIME,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Why a relayed packet was dropped. Labels are stable and few.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RelayDrop {
    /// The channel's peer has not consented (no mirror leg or link), or the sender
    /// does not own the channel.
    NoPermission,
    /// The client's byte rate or the relay's channel quota was exceeded.
    Quota,
    /// The channel expired.
    Expired,
    /// No such channel.
    UnknownChannel,
    /// The target's address is loopback, private, link-local or multicast.
    PrivateTarget,
}

impl RelayDrop {
    /// All reasons, for exporting zero-valued series.
    pub const ALL: [RelayDrop; 5] = [
        RelayDrop::NoPermission,
        RelayDrop::Quota,
        RelayDrop::Expired,
        RelayDrop::UnknownChannel,
        RelayDrop::PrivateTarget,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RelayDrop::NoPermission => "no_permission",
            RelayDrop::Quota => "quota",
            RelayDrop::Expired => "expired",
            RelayDrop::UnknownChannel => "unknown_channel",
            RelayDrop::PrivateTarget => "private_target",
        }
    }
}

/// The relay service's counters (monotonic) and gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Legs held now (gauge).
    pub channels: u64,
    /// Legs whose peer consented, forwarding now (gauge).
    pub active_channels: u64,
    /// Clients holding at least one leg (gauge): the relay sessions.
    pub clients: u64,
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes of end-to-end packets forwarded.
    pub bytes: u64,
    /// Packets dropped, indexed like [`RelayDrop::ALL`].
    pub drops: [u64; RelayDrop::ALL.len()],
    /// Legs granted (new ones, not refreshes).
    pub allocations: u64,
    /// Requests refused (any [`Refusal`]).
    pub refusals: u64,
    /// Signalled packets passed on.
    pub signals: u64,
    /// Signals refused (unknown target, rate).
    pub signals_refused: u64,
    /// Legs expired (idle or lifetime).
    pub expired: u64,
}

impl RelayStats {
    /// Drops for one reason.
    pub fn dropped(&self, reason: RelayDrop) -> u64 {
        self.drops[reason as usize]
    }
}

/// Whether an address is one a relay must not send to unless configured: loopback,
/// private (RFC 1918, RFC 4193), link-local, multicast, broadcast, unspecified, or
/// the shared carrier-grade NAT range (RFC 6598).
pub fn is_private_target(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => {
            let [a, b, ..] = ip.octets();
            ip.is_loopback()
                || ip.is_private()
                || ip.is_link_local()
                || ip.is_multicast()
                || ip.is_broadcast()
                || ip.is_unspecified()
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(ip) => {
            let first = ip.segments()[0];
            ip.is_loopback()
                || ip.is_multicast()
                || ip.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || ip.to_ipv4_mapped().is_some()
        }
    }
}

/// What the relay needs to know about the node around it.
pub(crate) trait RelayEnv {
    /// Whether the node relays now (a supernode, relaying enabled).
    fn relays(&self) -> bool;
    /// The address of an established session with `key`.
    fn session_addr(&self, key: &PeerKey) -> Option<SocketAddr>;
    /// Whether `key` is attached here as a client.
    fn is_client(&self, key: &PeerKey) -> bool;
    /// The address of `key` if it is a live supernode in the membership view.
    fn member_addr(&self, key: &PeerKey) -> Option<SocketAddr>;
}

/// A token bucket counting bytes.
#[derive(Debug, Clone)]
struct ByteBucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    last: Time,
}

impl ByteBucket {
    fn new(rate: u32, burst: u32, now: Time) -> ByteBucket {
        ByteBucket {
            rate: u64::from(rate),
            burst: u64::from(burst.max(1)),
            tokens: u64::from(burst.max(1)),
            last: now,
        }
    }

    fn take(&mut self, now: Time, n: u64) -> bool {
        let elapsed = now.saturating_since(self.last).as_micros();
        if elapsed > 0 {
            let add = (u128::from(self.rate) * elapsed / 1_000_000).min(u128::from(u64::MAX));
            self.tokens = self.tokens.saturating_add(add as u64).min(self.burst);
            self.last = now;
        }
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

type LegKey = (PeerKey, PeerKey, Option<PeerKey>);

#[derive(Debug, Clone)]
struct Leg {
    client: PeerKey,
    peer: PeerKey,
    via: Option<PeerKey>,
    /// The via relay's channel for the mirror leg, once linked.
    remote: Option<u32>,
    /// Forwarding (the peer consented); the client was told.
    ready: bool,
    refreshed: Time,
    last_used: Time,
}

#[derive(Debug, Clone)]
struct Client {
    legs: usize,
    bytes: ByteBucket,
    requests: TokenBucket,
}

/// Where [`RelayServer::forward`] sends a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hop {
    /// The session to send on.
    pub to: PeerKey,
    /// The channel to put in the `Frame::Relay`.
    pub channel: u32,
}

/// The relay service of one node. Inert unless the node is a supernode.
#[derive(Debug)]
pub(crate) struct RelayServer {
    cfg: RelayConfig,
    rng: ChaCha20Rng,
    legs: Map<u32, Leg>,
    index: Map<LegKey, u32>,
    clients: Map<PeerKey, Client>,
    expired: VecDeque<u32>,
    expired_set: Set<u32>,
    /// (from, to) → when `from` last signalled `to` through this node.
    signal_pairs: Map<(PeerKey, PeerKey), Time>,
    signal_order: VecDeque<((PeerKey, PeerKey), Time)>,
    out: VecDeque<(PeerKey, Option<SocketAddr>, RelayMsg)>,
    next_sweep: Option<Time>,
    stats: RelayStats,
}

fn key(id: &Id) -> PeerKey {
    PeerKey(*id)
}

impl RelayServer {
    pub(crate) fn new(cfg: RelayConfig, seed: [u8; 32]) -> RelayServer {
        let mut rng = ChaCha20Rng::from_seed(seed);
        RelayServer {
            legs: map(&mut rng),
            index: map(&mut rng),
            clients: map(&mut rng),
            expired: VecDeque::new(),
            expired_set: set(&mut rng),
            signal_pairs: map(&mut rng),
            signal_order: VecDeque::new(),
            out: VecDeque::new(),
            next_sweep: None,
            stats: RelayStats::default(),
            cfg,
            rng,
        }
    }

    pub(crate) fn config(&self) -> &RelayConfig {
        &self.cfg
    }

    /// New limits; existing channels keep going, new requests see them.
    pub(crate) fn set_config(&mut self, cfg: RelayConfig) {
        self.cfg = cfg;
    }

    pub(crate) fn count_drop(&mut self, reason: RelayDrop) {
        self.stats.drops[reason as usize] += 1;
    }

    /// Where a `Frame::Relay { channel, .. }` of `len` bytes from session `from`
    /// goes, or why it is dropped (counted here).
    pub(crate) fn forward(
        &mut self,
        now: Time,
        from: &PeerKey,
        channel: u32,
        len: usize,
    ) -> Result<Hop, RelayDrop> {
        let r = self.route(now, from, channel, len);
        match r {
            Ok(_) => {
                self.stats.packets += 1;
                self.stats.bytes += len as u64;
            }
            Err(reason) => self.count_drop(reason),
        }
        r
    }

    fn route(
        &mut self,
        now: Time,
        from: &PeerKey,
        channel: u32,
        len: usize,
    ) -> Result<Hop, RelayDrop> {
        let Some(leg) = self.legs.get(&channel) else {
            return Err(if self.expired_set.contains(&channel) {
                RelayDrop::Expired
            } else {
                RelayDrop::UnknownChannel
            });
        };
        if self.leg_expiry(leg) <= now {
            return Err(RelayDrop::Expired);
        }
        let (owner, hop) = if leg.client == *from {
            let hop = match leg.via {
                None => {
                    let mirror = self
                        .index
                        .get(&(leg.peer, leg.client, None))
                        .ok_or(RelayDrop::NoPermission)?;
                    Hop {
                        to: leg.peer,
                        channel: *mirror,
                    }
                }
                Some(via) => Hop {
                    to: via,
                    channel: leg.remote.ok_or(RelayDrop::NoPermission)?,
                },
            };
            (leg.client, hop)
        } else if leg.via == Some(*from) && leg.remote.is_some() {
            (
                leg.client,
                Hop {
                    to: leg.client,
                    channel,
                },
            )
        } else {
            return Err(RelayDrop::NoPermission);
        };
        let client = self
            .clients
            .get_mut(&owner)
            .ok_or(RelayDrop::NoPermission)?;
        if !client.bytes.take(now, len as u64) {
            return Err(RelayDrop::Quota);
        }
        if let Some(leg) = self.legs.get_mut(&channel) {
            leg.last_used = now;
        }
        Ok(hop)
    }

    fn leg_expiry(&self, leg: &Leg) -> Time {
        (leg.refreshed + self.cfg.lifetime).min(leg.last_used + self.cfg.idle_timeout)
    }

    /// Handles a relay control message from an authenticated session.
    pub(crate) fn handle(
        &mut self,
        now: Time,
        env: &impl RelayEnv,
        from: PeerKey,
        from_addr: SocketAddr,
        msg: RelayMsg,
    ) {
        match msg {
            RelayMsg::Allocate { peer, via } => {
                self.allocate(now, env, from, key(&peer), via.map(|v| key(&v)))
            }
            RelayMsg::Release { peer, via } => {
                if let Some(&ch) = self.index.get(&(from, key(&peer), via.map(|v| key(&v)))) {
                    self.remove_leg(ch, false);
                }
            }
            RelayMsg::Signal { to, packet } => {
                self.signal(now, env, from, from_addr, key(&to), packet)
            }
            RelayMsg::Link {
                client,
                peer,
                channel,
                reply,
            } => self.link(env, from, key(&peer), key(&client), channel, reply),
            RelayMsg::Unlink { client, peer } => {
                let k = (key(&peer), key(&client), Some(from));
                if let Some(&ch) = self.index.get(&k)
                    && let Some(leg) = self.legs.get_mut(&ch)
                {
                    leg.remote = None;
                    leg.ready = false;
                }
            }
            // Messages for clients are handled by the call side.
            _ => {}
        }
    }

    fn admit_request(&mut self, now: Time, from: PeerKey) -> bool {
        let cfg = &self.cfg;
        let c = self.clients.entry(from).or_insert_with(|| Client {
            legs: 0,
            bytes: ByteBucket::new(cfg.client_rate_bps, cfg.client_burst_bytes, now),
            requests: TokenBucket::new(cfg.request_rate, cfg.request_burst, now),
        });
        c.requests.take(now)
    }

    fn refuse(&mut self, to: PeerKey, peer: PeerKey, via: Option<PeerKey>, reason: Refusal) {
        self.stats.refusals += 1;
        if matches!(reason, Refusal::PrivateTarget) {
            self.count_drop(RelayDrop::PrivateTarget);
        }
        if matches!(reason, Refusal::Quota) {
            self.count_drop(RelayDrop::Quota);
        }
        self.out.push_back((
            to,
            None,
            RelayMsg::Refused {
                peer: peer.0,
                via: via.map(|v| v.0),
                reason,
            },
        ));
    }

    fn allocate(
        &mut self,
        now: Time,
        env: &impl RelayEnv,
        client: PeerKey,
        peer: PeerKey,
        via: Option<PeerKey>,
    ) {
        if !self.cfg.enabled || !env.relays() {
            return self.refuse(client, peer, via, Refusal::NotRelay);
        }
        if !self.admit_request(now, client) {
            self.stats.refusals += 1;
            return;
        }
        if peer == client || via == Some(client) || via == Some(peer) {
            return self.refuse(client, peer, via, Refusal::UnknownRelay);
        }
        let via_addr = match via {
            Some(v) => match env.member_addr(&v) {
                Some(a) => Some(a),
                None => return self.refuse(client, peer, via, Refusal::UnknownRelay),
            },
            None => None,
        };
        if !self.cfg.allow_private_targets {
            let client_private = env
                .session_addr(&client)
                .is_some_and(|a| is_private_target(&a));
            if client_private || via_addr.is_some_and(|a| is_private_target(&a)) {
                return self.refuse(client, peer, via, Refusal::PrivateTarget);
            }
        }
        let k = (client, peer, via);
        let channel = match self.index.get(&k) {
            Some(&ch) => {
                if let Some(leg) = self.legs.get_mut(&ch) {
                    leg.refreshed = now;
                    leg.last_used = leg.last_used.max(now);
                }
                ch
            }
            None => {
                let used = self.clients.get(&client).map_or(0, |c| c.legs);
                if used >= self.cfg.max_channels_per_client
                    || self.legs.len() >= self.cfg.max_channels
                {
                    return self.refuse(client, peer, via, Refusal::Quota);
                }
                let ch = self.new_channel();
                self.legs.insert(
                    ch,
                    Leg {
                        client,
                        peer,
                        via,
                        remote: None,
                        ready: false,
                        refreshed: now,
                        last_used: now,
                    },
                );
                self.index.insert(k, ch);
                if let Some(c) = self.clients.get_mut(&client) {
                    c.legs += 1;
                }
                self.stats.allocations += 1;
                self.arm_sweep(now);
                ch
            }
        };
        // Tell the client first, then whoever became ready.
        let ready = self.is_ready(channel);
        if let Some(leg) = self.legs.get_mut(&channel) {
            leg.ready = ready;
        }
        self.out.push_back((
            client,
            None,
            RelayMsg::Allocated {
                peer: peer.0,
                via: via.map(|v| v.0),
                channel,
                lifetime_s: u32::try_from(self.cfg.lifetime.as_secs()).unwrap_or(u32::MAX),
                ready,
            },
        ));
        match via {
            None => {
                if let Some(&mirror) = self.index.get(&(peer, client, None)) {
                    self.update_ready(mirror);
                }
            }
            Some(v) => {
                if self.legs.get(&channel).is_some_and(|l| l.remote.is_none()) {
                    self.out.push_back((
                        v,
                        via_addr,
                        RelayMsg::Link {
                            client: client.0,
                            peer: peer.0,
                            channel,
                            reply: false,
                        },
                    ));
                }
            }
        }
    }

    fn is_ready(&self, channel: u32) -> bool {
        let Some(leg) = self.legs.get(&channel) else {
            return false;
        };
        match leg.via {
            None => self.index.contains_key(&(leg.peer, leg.client, None)),
            Some(_) => leg.remote.is_some(),
        }
    }

    /// Re-checks a leg's readiness and tells its client when forwarding starts.
    fn update_ready(&mut self, channel: u32) {
        let ready = self.is_ready(channel);
        if let Some(leg) = self.legs.get_mut(&channel) {
            if ready && !leg.ready {
                self.out
                    .push_back((leg.client, None, RelayMsg::Ready { channel }));
            }
            leg.ready = ready;
        }
    }

    /// A link from relay `from`: its client `their_client` consents to our client
    /// `ours`, and wants packets on `channel`. Answered unless it is an answer.
    fn link(
        &mut self,
        env: &impl RelayEnv,
        from: PeerKey,
        ours: PeerKey,
        their_client: PeerKey,
        channel: u32,
        reply: bool,
    ) {
        if !self.cfg.enabled || !env.relays() {
            return;
        }
        let Some(&mine) = self.index.get(&(ours, their_client, Some(from))) else {
            // Our client has not asked (yet): nothing to remember; the link is sent
            // again when it does, from our side.
            return;
        };
        let Some(leg) = self.legs.get_mut(&mine) else {
            return;
        };
        leg.remote = Some(channel);
        if !reply {
            let addr = env.member_addr(&from);
            self.out.push_back((
                from,
                addr,
                RelayMsg::Link {
                    client: ours.0,
                    peer: their_client.0,
                    channel: mine,
                    reply: true,
                },
            ));
        }
        self.update_ready(mine);
    }

    fn signal(
        &mut self,
        now: Time,
        env: &impl RelayEnv,
        from: PeerKey,
        from_addr: SocketAddr,
        to: PeerKey,
        packet: Vec<u8>,
    ) {
        let refuse = |s: &mut RelayServer, reason| {
            s.stats.signals_refused += 1;
            s.out
                .push_back((from, None, RelayMsg::SignalRefused { to: to.0, reason }));
        };
        if !env.relays() {
            return refuse(self, Refusal::NotRelay);
        }
        if !self.admit_request(now, from) {
            self.stats.signals_refused += 1;
            return;
        }
        let answering = self
            .signal_pairs
            .get(&(to, from))
            .is_some_and(|t| now.saturating_since(*t) < SIGNAL_PAIR_TTL);
        if to == from || !(env.is_client(&to) || answering) || env.session_addr(&to).is_none() {
            return refuse(self, Refusal::UnknownTarget);
        }
        if peercall_wire::Packet::parse(&packet).is_err() {
            self.stats.signals_refused += 1;
            return;
        }
        self.remember_pair(now, from, to);
        self.stats.signals += 1;
        self.out.push_back((
            to,
            None,
            RelayMsg::Signalled {
                from: from.0,
                observed: from_addr,
                packet,
            },
        ));
    }

    fn remember_pair(&mut self, now: Time, from: PeerKey, to: PeerKey) {
        self.signal_pairs.insert((from, to), now);
        self.signal_order.push_back(((from, to), now));
        while self.signal_order.len() > MAX_SIGNAL_PAIRS
            || self
                .signal_order
                .front()
                .is_some_and(|(_, t)| now.saturating_since(*t) >= SIGNAL_PAIR_TTL)
        {
            let Some((pair, t)) = self.signal_order.pop_front() else {
                break;
            };
            if self.signal_pairs.get(&pair) == Some(&t) {
                self.signal_pairs.remove(&pair);
            }
        }
    }

    fn new_channel(&mut self) -> u32 {
        loop {
            let ch = self.rng.next_u32();
            if ch != 0 && !self.legs.contains_key(&ch) && !self.expired_set.contains(&ch) {
                return ch;
            }
        }
    }

    /// Removes a leg; `expired` counts it and remembers its channel.
    fn remove_leg(&mut self, channel: u32, expired: bool) {
        let Some(leg) = self.legs.remove(&channel) else {
            return;
        };
        self.index.remove(&(leg.client, leg.peer, leg.via));
        if let Some(c) = self.clients.get_mut(&leg.client) {
            c.legs = c.legs.saturating_sub(1);
        }
        if expired {
            self.stats.expired += 1;
            self.out
                .push_back((leg.client, None, RelayMsg::Closed { channel }));
        }
        if self.expired.len() >= EXPIRED_MEMORY
            && let Some(old) = self.expired.pop_front()
        {
            self.expired_set.remove(&old);
        }
        self.expired.push_back(channel);
        self.expired_set.insert(channel);
        match leg.via {
            None => {
                if let Some(&mirror) = self.index.get(&(leg.peer, leg.client, None))
                    && let Some(m) = self.legs.get_mut(&mirror)
                {
                    m.ready = false;
                }
            }
            Some(via) if leg.remote.is_some() => self.out.push_back((
                via,
                None,
                RelayMsg::Unlink {
                    client: leg.client.0,
                    peer: leg.peer.0,
                },
            )),
            Some(_) => {}
        }
    }

    /// A session ended: its legs go, and so does its client state.
    pub(crate) fn peer_down(&mut self, key: &PeerKey) {
        if self.legs.is_empty() && self.clients.is_empty() {
            return;
        }
        let mut doomed: Vec<u32> = self
            .legs
            .iter()
            .filter(|(_, l)| l.client == *key)
            .map(|(c, _)| *c)
            .collect();
        doomed.sort_unstable();
        for ch in doomed {
            self.remove_leg(ch, false);
        }
        // Legs linked through a relay that went away lose their link.
        for leg in self.legs.values_mut() {
            if leg.via == Some(*key) {
                leg.remote = None;
                leg.ready = false;
            }
        }
        self.clients.remove(key);
    }

    fn arm_sweep(&mut self, now: Time) {
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + SWEEP_INTERVAL);
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Time> {
        self.next_sweep
    }

    pub(crate) fn handle_timeout(&mut self, now: Time) {
        if self.next_sweep.is_none_or(|t| t > now) {
            return;
        }
        let mut doomed: Vec<u32> = self
            .legs
            .iter()
            .filter(|(_, l)| self.leg_expiry(l) <= now)
            .map(|(c, _)| *c)
            .collect();
        doomed.sort_unstable();
        for ch in doomed {
            self.remove_leg(ch, true);
        }
        self.next_sweep = (!self.legs.is_empty()).then(|| now + SWEEP_INTERVAL);
    }

    pub(crate) fn poll_output(&mut self) -> Option<(PeerKey, Option<SocketAddr>, RelayMsg)> {
        self.out.pop_front()
    }

    /// Whether the relay holds state for `key` (a client with legs, or a relay
    /// linked with ours), so its session must be kept.
    pub(crate) fn keeps_session(&self, key: &PeerKey) -> bool {
        self.clients.get(key).is_some_and(|c| c.legs > 0)
            || self
                .legs
                .values()
                .any(|l| l.via == Some(*key) && l.remote.is_some())
    }

    pub(crate) fn stats(&self) -> RelayStats {
        let mut s = self.stats.clone();
        s.channels = self.legs.len() as u64;
        s.active_channels = self.legs.values().filter(|l| l.ready).count() as u64;
        s.clients = self.clients.values().filter(|c| c.legs > 0).count() as u64;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Env {
        relays: bool,
        clients: Vec<PeerKey>,
        members: Vec<(PeerKey, SocketAddr)>,
        addr: SocketAddr,
    }

    impl RelayEnv for Env {
        fn relays(&self) -> bool {
            self.relays
        }
        fn session_addr(&self, _key: &PeerKey) -> Option<SocketAddr> {
            Some(self.addr)
        }
        fn is_client(&self, key: &PeerKey) -> bool {
            self.clients.contains(key)
        }
        fn member_addr(&self, key: &PeerKey) -> Option<SocketAddr> {
            self.members.iter().find(|(k, _)| k == key).map(|(_, a)| *a)
        }
    }

    fn env() -> Env {
        Env {
            relays: true,
            clients: vec![k(2)],
            members: vec![(k(9), "198.51.100.9:7000".parse().expect("addr"))],
            addr: "203.0.113.5:4000".parse().expect("addr"),
        }
    }

    fn k(b: u8) -> PeerKey {
        PeerKey([b; 32])
    }

    const T0: Time = Time::from_secs(1_000);

    fn allocated(s: &mut RelayServer, to: PeerKey) -> (u32, bool) {
        while let Some((dest, _, m)) = s.poll_output() {
            if let (true, RelayMsg::Allocated { channel, ready, .. }) = (dest == to, m) {
                return (channel, ready);
            }
        }
        panic!("no allocation for {to:?}");
    }

    #[test]
    fn one_relay_forwarding_needs_both_sides() {
        let e = env();
        let mut s = RelayServer::new(RelayConfig::default(), [1; 32]);
        s.handle(
            T0,
            &e,
            k(1),
            e.addr,
            RelayMsg::Allocate {
                peer: k(2).0,
                via: None,
            },
        );
        let (a, ready) = allocated(&mut s, k(1));
        assert!(!ready);
        assert_eq!(s.forward(T0, &k(1), a, 100), Err(RelayDrop::NoPermission));
        s.handle(
            T0,
            &e,
            k(2),
            e.addr,
            RelayMsg::Allocate {
                peer: k(1).0,
                via: None,
            },
        );
        let (b, ready) = allocated(&mut s, k(2));
        assert!(ready);
        assert_eq!(
            s.forward(T0, &k(1), a, 100),
            Ok(Hop {
                to: k(2),
                channel: b
            })
        );
        assert_eq!(
            s.forward(T0, &k(2), b, 100),
            Ok(Hop {
                to: k(1),
                channel: a
            })
        );
        // Someone else's channel, and an unknown one.
        assert_eq!(s.forward(T0, &k(3), a, 100), Err(RelayDrop::NoPermission));
        assert_eq!(
            s.forward(T0, &k(1), a ^ 1, 100),
            Err(RelayDrop::UnknownChannel)
        );
        // Idle expiry.
        let later = T0 + DEFAULT_IDLE_TIMEOUT + Duration::from_secs(2);
        s.handle_timeout(later);
        assert_eq!(s.forward(later, &k(1), a, 100), Err(RelayDrop::Expired));
        let st = s.stats();
        assert_eq!(st.channels, 0);
        assert_eq!(st.packets, 2);
        assert_eq!(st.dropped(RelayDrop::NoPermission), 2);
        assert_eq!(st.dropped(RelayDrop::UnknownChannel), 1);
        assert_eq!(st.dropped(RelayDrop::Expired), 1);
    }

    #[test]
    fn quotas_and_private_targets_are_refused() {
        let mut e = env();
        let cfg = RelayConfig {
            max_channels_per_client: 1,
            client_rate_bps: 1_000,
            client_burst_bytes: 1_000,
            ..RelayConfig::default()
        };
        let mut s = RelayServer::new(cfg, [1; 32]);
        s.handle(
            T0,
            &e,
            k(1),
            e.addr,
            RelayMsg::Allocate {
                peer: k(2).0,
                via: None,
            },
        );
        let (a, _) = allocated(&mut s, k(1));
        s.handle(
            T0,
            &e,
            k(1),
            e.addr,
            RelayMsg::Allocate {
                peer: k(3).0,
                via: None,
            },
        );
        assert!(matches!(
            s.poll_output(),
            Some((
                _,
                _,
                RelayMsg::Refused {
                    reason: Refusal::Quota,
                    ..
                }
            ))
        ));
        s.handle(
            T0,
            &e,
            k(2),
            e.addr,
            RelayMsg::Allocate {
                peer: k(1).0,
                via: None,
            },
        );
        let _ = allocated(&mut s, k(2));
        assert!(s.forward(T0, &k(1), a, 900).is_ok());
        assert_eq!(s.forward(T0, &k(1), a, 200), Err(RelayDrop::Quota));
        // (Client 1 was told its channel is ready.)
        assert!(
            matches!(s.poll_output(), Some((to, _, RelayMsg::Ready { channel })) if to == k(1) && channel == a)
        );
        // A client on a private address is refused.
        e.addr = "10.1.2.3:4000".parse().expect("addr");
        s.handle(
            T0,
            &e,
            k(4),
            e.addr,
            RelayMsg::Allocate {
                peer: k(1).0,
                via: None,
            },
        );
        assert!(matches!(
            s.poll_output(),
            Some((
                _,
                _,
                RelayMsg::Refused {
                    reason: Refusal::PrivateTarget,
                    ..
                }
            ))
        ));
        // A two-relay link to a supernode nobody knows.
        e.addr = "203.0.113.5:4000".parse().expect("addr");
        s.handle(
            T0,
            &e,
            k(5),
            e.addr,
            RelayMsg::Allocate {
                peer: k(1).0,
                via: Some([8; 32]),
            },
        );
        assert!(matches!(
            s.poll_output(),
            Some((
                _,
                _,
                RelayMsg::Refused {
                    reason: Refusal::UnknownRelay,
                    ..
                }
            ))
        ));
        assert!(s.stats().dropped(RelayDrop::PrivateTarget) >= 1);
    }

    #[test]
    fn two_relay_links_are_mutual() {
        let e = env();
        let sa = k(9);
        let mut s = RelayServer::new(RelayConfig::default(), [2; 32]);
        // Our client 1 wants peer 2 through relay 9.
        s.handle(
            T0,
            &e,
            k(1),
            e.addr,
            RelayMsg::Allocate {
                peer: k(2).0,
                via: Some(sa.0),
            },
        );
        let mut mine = None;
        let mut link_sent = false;
        while let Some((to, _, m)) = s.poll_output() {
            match m {
                RelayMsg::Allocated { channel, ready, .. } => {
                    assert!(!ready);
                    mine = Some(channel);
                }
                RelayMsg::Link { channel, .. } => {
                    assert_eq!(to, sa);
                    link_sent = true;
                    assert_eq!(Some(channel), mine);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(link_sent);
        let mine = mine.expect("allocated");
        assert_eq!(s.forward(T0, &k(1), mine, 10), Err(RelayDrop::NoPermission));
        // The other relay links back.
        s.handle(
            T0,
            &e,
            sa,
            e.addr,
            RelayMsg::Link {
                client: k(2).0,
                peer: k(1).0,
                channel: 77,
                reply: true,
            },
        );
        assert_eq!(
            s.forward(T0, &k(1), mine, 10),
            Ok(Hop {
                to: sa,
                channel: 77
            })
        );
        assert_eq!(
            s.forward(T0, &sa, mine, 10),
            Ok(Hop {
                to: k(1),
                channel: mine
            })
        );
        // A link from a relay the client did not name does nothing.
        s.handle(
            T0,
            &e,
            k(7),
            e.addr,
            RelayMsg::Link {
                client: k(2).0,
                peer: k(1).0,
                channel: 5,
                reply: false,
            },
        );
        assert_eq!(s.forward(T0, &k(7), mine, 10), Err(RelayDrop::NoPermission));
    }

    #[test]
    fn signals_go_only_to_clients_and_answerers() {
        let e = env();
        let mut s = RelayServer::new(RelayConfig::default(), [3; 32]);
        let packet = {
            let mut b = vec![0u8; 32];
            let n = peercall_wire::packet::Transport::encode_header(1, 2, &mut b).expect("fits");
            b.truncate(n + 16);
            b
        };
        s.handle(
            T0,
            &e,
            k(1),
            e.addr,
            RelayMsg::Signal {
                to: k(3).0,
                packet: packet.clone(),
            },
        );
        assert!(matches!(
            s.poll_output(),
            Some((
                _,
                _,
                RelayMsg::SignalRefused {
                    reason: Refusal::UnknownTarget,
                    ..
                }
            ))
        ));
        s.handle(
            T0,
            &e,
            k(1),
            e.addr,
            RelayMsg::Signal {
                to: k(2).0,
                packet: packet.clone(),
            },
        );
        assert!(matches!(s.poll_output(), Some((to, _, RelayMsg::Signalled { .. })) if to == k(2)));
        // The client answers the caller, who is not attached here.
        s.handle(
            T0,
            &e,
            k(2),
            e.addr,
            RelayMsg::Signal { to: k(1).0, packet },
        );
        assert!(matches!(s.poll_output(), Some((to, _, RelayMsg::Signalled { .. })) if to == k(1)));
    }

    #[test]
    fn private_ranges() {
        for a in [
            "127.0.0.1:1",
            "10.0.0.1:1",
            "192.168.1.1:1",
            "172.16.0.1:1",
            "224.0.0.1:1",
            "169.254.1.1:1",
            "100.64.0.1:1",
            "[::1]:1",
            "[fc00::1]:1",
            "[fe80::1]:1",
        ] {
            assert!(is_private_target(&a.parse().expect("addr")), "{a}");
        }
        for a in [
            "198.51.100.1:1",
            "203.0.113.1:1",
            "8.8.8.8:1",
            "[2001:db8::1]:1",
        ] {
            assert!(!is_private_target(&a.parse().expect("addr")), "{a}");
        }
    }
}
