//! How outer packets reach a peer, and where inbound ones came from.
//!
//! An end-to-end session is path-agnostic: its transport packets find their session
//! by receiver index whichever way they arrive. A [`Route`] says how to send one
//! outer packet: straight to an address, wrapped in a `Frame::Relay` on the hop
//! session with a relay supernode, or wrapped in a signalling message to a home
//! supernode. An [`Origin`] says how an inbound one came, so that replies go back the
//! same way and call paths can attribute it.
//!
//! Transmit buffers come from a [`BufPool`]: the engine encrypts into a recycled
//! buffer and hands it out with the transmit; the shell gives it back with
//! [`crate::Node::recycle`], or lets [`crate::Node::poll_transmit_into`] copy and
//! recycle it. Either way a relay forwarding packets allocates nothing per packet
//! once warm.

use std::net::SocketAddr;

use peercall_crypto::PeerKey;
use peercall_wire::{Frame, MAX_DATAGRAM, Time};

use crate::msg::RelayMsg;
use crate::node::{Node, Transmit};
use crate::relay::{RelayDrop, is_private_target};

/// How to send an outer packet to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Route {
    /// A UDP datagram to this address.
    Direct(SocketAddr),
    /// A `Frame::Relay` on `channel` over the hop session with `relay`.
    Relay {
        /// The relay supernode.
        relay: PeerKey,
        /// Our channel there.
        channel: u32,
    },
    /// A signalling message through `relay` to `to`.
    Signal {
        /// The supernode that passes it on.
        relay: PeerKey,
        /// The peer.
        to: PeerKey,
    },
}

/// Where an inbound outer packet came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A datagram from this address.
    Direct(SocketAddr),
    /// Delivered by relay `relay` on our channel `channel`.
    Relay {
        /// The relay.
        relay: PeerKey,
        /// Our channel.
        channel: u32,
    },
    /// Signalled through `relay` by `from`, whose packets reach the relay from
    /// `observed`.
    Signal {
        /// The supernode.
        relay: PeerKey,
        /// The sender, as the supernode names it.
        from: PeerKey,
        /// The sender's address as the supernode sees it.
        observed: SocketAddr,
    },
}

impl Origin {
    /// The way back.
    pub(crate) fn reply_route(&self) -> Route {
        match *self {
            Origin::Direct(a) => Route::Direct(a),
            Origin::Relay { relay, channel } => Route::Relay { relay, channel },
            Origin::Signal { relay, from, .. } => Route::Signal { relay, to: from },
        }
    }

    /// The source address, if the packet came straight from the peer.
    pub(crate) fn direct(&self) -> Option<SocketAddr> {
        match self {
            Origin::Direct(a) => Some(*a),
            _ => None,
        }
    }
}

/// Buffers kept for reuse. A relay's transmit queue is drained after every input,
/// so a few hundred cover any burst one input can cause.
const POOL_KEEP: usize = 256;

/// Recycled transmit buffers (each of capacity [`MAX_DATAGRAM`]).
#[derive(Debug, Default)]
pub(crate) struct BufPool {
    free: Vec<Vec<u8>>,
    /// Buffers allocated because the pool was empty.
    pub(crate) allocated: u64,
}

impl BufPool {
    /// A zeroed buffer of length [`MAX_DATAGRAM`] to write a packet into; truncate it
    /// to the packet's length.
    pub(crate) fn take(&mut self) -> Vec<u8> {
        match self.free.pop() {
            Some(mut b) => {
                b.resize(MAX_DATAGRAM, 0);
                b
            }
            None => {
                self.allocated += 1;
                vec![0; MAX_DATAGRAM]
            }
        }
    }

    /// Returns a buffer for reuse.
    pub(crate) fn give(&mut self, mut b: Vec<u8>) {
        if self.free.len() < POOL_KEEP && b.capacity() >= MAX_DATAGRAM {
            b.clear();
            self.free.push(b);
        }
    }
}

impl Node {
    /// Queues a datagram whose buffer came from the pool.
    pub(crate) fn push_transmit(&mut self, dest: SocketAddr, bytes: Vec<u8>) {
        self.transmits.push_back(Transmit { dest, bytes });
    }

    /// Sends a copy of `bytes` (an outer packet) along `route`.
    pub(crate) fn send_bytes(&mut self, now: Time, route: Route, bytes: &[u8]) {
        let mut b = self.pool.take();
        b[..bytes.len()].copy_from_slice(bytes);
        b.truncate(bytes.len());
        self.send_packet(now, route, b);
    }

    /// Sends an outer packet (in a pool buffer) along `route`.
    pub(crate) fn send_packet(&mut self, now: Time, route: Route, packet: Vec<u8>) {
        match route {
            Route::Direct(addr) => self.push_transmit(addr, packet),
            Route::Relay { relay, channel } => {
                let sent = self.send_relayed(now, relay, channel, &packet);
                self.pool.give(packet);
                if !sent {
                    self.calls.stats.unroutable += 1;
                }
            }
            Route::Signal { relay, to } => {
                let msg = RelayMsg::Signal {
                    to: to.0,
                    packet: packet.clone(),
                };
                self.pool.give(packet);
                self.send_relay_msg(now, relay, None, &msg);
            }
        }
    }

    /// Wraps `packet` in a `Frame::Relay` on `channel` and sends it on the hop
    /// session with `relay`. False if there is no such session.
    pub(crate) fn send_relayed(
        &mut self,
        now: Time,
        relay: PeerKey,
        channel: u32,
        packet: &[u8],
    ) -> bool {
        let Some(hop) = self.peers.get(&relay) else {
            return false;
        };
        let addr = hop.addr;
        let frame = Frame::Relay(peercall_wire::frame::Relay { channel, packet });
        let Ok(n) = frame.encode(&mut self.frame_buf[..]) else {
            return false;
        };
        let mut out = self.pool.take();
        match self
            .endpoint
            .encrypt(now, &relay, &self.frame_buf[..n], &mut out[..])
        {
            Ok(len) => {
                out.truncate(len);
                if let Some(p) = self.peers.get_mut(&relay) {
                    p.last_sent = now;
                }
                self.push_transmit(addr, out);
                true
            }
            Err(_) => {
                self.pool.give(out);
                false
            }
        }
    }

    /// Encrypts `frame` for `peer` and sends it along `route`. False if it could not
    /// be encrypted (no session) or routed.
    pub(crate) fn send_on(
        &mut self,
        now: Time,
        peer: PeerKey,
        route: Route,
        frame: &Frame<'_>,
    ) -> bool {
        let Ok(n) = frame.encode(&mut self.frame_buf[..]) else {
            return false;
        };
        let mut out = self.pool.take();
        match self
            .endpoint
            .encrypt(now, &peer, &self.frame_buf[..n], &mut out[..])
        {
            Ok(len) => {
                out.truncate(len);
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.last_sent = now;
                }
                self.send_packet(now, route, out);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot send frame");
                self.pool.give(out);
                false
            }
        }
    }

    /// The route node-level traffic (keepalives, overlay messages, rekeys) to `peer`
    /// takes: its relay or signalling route for a call peer reached that way, else
    /// its address.
    pub(crate) fn peer_route(&self, peer: &PeerKey) -> Option<Route> {
        let p = self.peers.get(peer)?;
        Some(p.via.unwrap_or(Route::Direct(p.addr)))
    }

    /// Sends a relay-service message to `to` (a supernode, or a client of ours),
    /// opening a session to `addr` first when there is none (the message waits for
    /// it, bounded).
    pub(crate) fn send_relay_msg(
        &mut self,
        now: Time,
        to: PeerKey,
        addr: Option<SocketAddr>,
        msg: &RelayMsg,
    ) {
        let Ok(body) = msg.encode() else {
            return;
        };
        if let Some(p) = self.peers.get(&to) {
            // Hop sessions with supernodes and their clients are direct.
            let route = Route::Direct(p.addr);
            self.send_on(now, to, route, &Frame::RelayControl(&body));
            if let Some(p) = self.peers.get_mut(&to) {
                p.last_control = Some(now);
            }
            return;
        }
        let Some(addr) = addr else {
            self.calls.stats.relay_msgs_dropped += 1;
            return;
        };
        if self.is_closing() {
            return;
        }
        if !self.calls.queue_relay_msg(to, body) {
            self.calls.stats.relay_msgs_dropped += 1;
        }
        self.dial_on_demand(now, to, addr);
    }

    /// Relays a `Frame::Relay` that arrived from session `from` as a relay server:
    /// look the channel up, re-wrap the packet for the next hop, send it.
    pub(crate) fn forward_relay(&mut self, now: Time, from: PeerKey, channel: u32, packet: &[u8]) {
        let Ok(hop) = self.relay.forward(now, &from, channel, packet.len()) else {
            return;
        };
        let Some(target) = self.peers.get(&hop.to) else {
            self.relay.count_drop(RelayDrop::NoPermission);
            return;
        };
        if !self.relay.config().allow_private_targets && is_private_target(&target.addr) {
            self.relay.count_drop(RelayDrop::PrivateTarget);
            return;
        }
        if !self.send_relayed(now, hop.to, hop.channel, packet) {
            self.relay.count_drop(RelayDrop::NoPermission);
        }
    }
}
