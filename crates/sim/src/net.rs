//! The network: hosts, NATs, links, cuts, and the fate of every datagram.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use peercall_wire::Time;
use rand_chacha::ChaCha20Rng;
use serde::Serialize;

use crate::link::{LinkConfig, Uplink, micros};
use crate::nat::{Nat, NatConfig};
use crate::queue::{Due, Queue, Slab};
use crate::util::{FastMap, chance};
use crate::{HostId, NodeId, SimError};

/// What happened to the datagrams of a run. Every datagram handed to the network,
/// and every duplicate it made, ends in exactly one of the outcome counters (or is
/// still in flight):
///
/// `sent + duplicated = delivered + lost + filtered_by_nat + partitioned +
/// queue_dropped + unroutable + host_down + in flight`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NetStats {
    /// Datagrams handed to the network by nodes.
    pub sent: u64,
    /// Bytes in those datagrams (UDP payload only; no header overhead is added).
    pub sent_bytes: u64,
    /// Extra copies made by duplication.
    pub duplicated: u64,
    /// Datagrams handed to nodes, duplicates included.
    pub delivered: u64,
    /// Bytes in those datagrams.
    pub delivered_bytes: u64,
    /// Lost on a link, at random or in a burst.
    pub lost: u64,
    /// Dropped by a NAT: no live mapping, filtered, hairpinning off, or no free port.
    pub filtered_by_nat: u64,
    /// Dropped by an active cut.
    pub partitioned: u64,
    /// Dropped by a full uplink queue.
    pub queue_dropped: u64,
    /// Sent to an address or port nobody has, to a private address from outside its
    /// NAT, or to an IPv6 address.
    pub unroutable: u64,
    /// Sent by or to a node that is offline.
    pub host_down: u64,
}

/// Where a host sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostKind {
    /// On the public internet.
    Public,
    /// A NAT box; index into the network's NATs.
    Nat(u32),
    /// Behind the NAT `nat`, whose index among the network's NATs is `index`.
    Private { nat: HostId, index: u32 },
}

#[derive(Debug)]
pub(crate) struct Host {
    pub(crate) ip: Ipv4Addr,
    pub(crate) kind: HostKind,
    access_delay: u64,
    uplink: Option<Uplink>,
    busy_until: Time,
    /// Bound ports; almost always one, so a vector beats a map.
    ports: Vec<(u16, NodeId)>,
}

/// Per-link state, kept only for links that need it.
#[derive(Debug, Default, Clone, Copy)]
struct LinkState {
    /// Latest arrival scheduled on this link, for FIFO links.
    tail: Time,
    /// Gilbert-Elliott channel state.
    bad: bool,
}

/// A datagram on its way.
#[derive(Debug)]
struct InFlight {
    /// The host that sent it (for cuts).
    origin: HostId,
    /// The source address on the wire (after any NAT).
    src: SocketAddrV4,
    /// The host the destination address belongs to (a NAT for NATted hosts).
    to: HostId,
    /// The destination address as sent.
    dst: SocketAddrV4,
    bytes: Vec<u8>,
}

/// A set of hosts, as a bitmap over host indices.
#[derive(Debug, Clone)]
struct HostSet(Vec<u64>);

impl HostSet {
    fn new(hosts: &[HostId]) -> HostSet {
        let words = hosts
            .iter()
            .map(|h| h.0 as usize / 64 + 1)
            .max()
            .unwrap_or(0);
        let mut bits = vec![0u64; words];
        for h in hosts {
            bits[h.0 as usize / 64] |= 1 << (h.0 % 64);
        }
        HostSet(bits)
    }

    fn contains(&self, h: HostId) -> bool {
        self.0
            .get(h.0 as usize / 64)
            .is_some_and(|w| w & (1 << (h.0 % 64)) != 0)
    }
}

#[derive(Debug)]
struct Cut {
    from: HostSet,
    to: HostSet,
    both_ways: bool,
    active: bool,
}

/// A delivered datagram, for the harness to hand to its node.
pub(crate) struct Arrival {
    pub(crate) node: NodeId,
    pub(crate) src: SocketAddrV4,
    pub(crate) bytes: Vec<u8>,
}

#[derive(Debug)]
pub(crate) struct Network {
    rng: ChaCha20Rng,
    hosts: Vec<Host>,
    by_ip: FastMap<u32, HostId>,
    nats: Vec<Nat>,
    default_link: LinkConfig,
    links: FastMap<u64, LinkConfig>,
    link_state: FastMap<u64, LinkState>,
    cuts: Vec<Cut>,
    active_cuts: Vec<u32>,
    in_flight: Slab<InFlight>,
    /// Largest per-pair delay component, µs (0: none).
    pair_delay_max: u64,
    /// Key of the hash that fixes each pair's component.
    pair_key: u64,
    pub(crate) stats: NetStats,
}

fn link_key(from: HostId, to: HostId) -> u64 {
    (u64::from(from.0) << 32) | u64::from(to.0)
}

impl Network {
    pub(crate) fn new(rng: ChaCha20Rng) -> Network {
        Network {
            rng,
            hosts: Vec::new(),
            by_ip: FastMap::default(),
            nats: Vec::new(),
            default_link: LinkConfig::default(),
            links: FastMap::default(),
            link_state: FastMap::default(),
            cuts: Vec::new(),
            active_cuts: Vec::new(),
            in_flight: Slab::default(),
            pair_delay_max: 0,
            pair_key: 0,
            stats: NetStats::default(),
        }
    }

    /// Gives every pair of distinct sites a fixed extra one-way delay, uniform in
    /// `[0, max]`, the same both ways, drawn from a hash of the pair keyed by `key`.
    pub(crate) fn set_pair_delay(&mut self, max: Duration, key: u64) {
        self.pair_delay_max = micros(max);
        self.pair_key = key;
    }

    /// The pair component between sites `a` and `b` (µs).
    fn pair_delay(&self, a: HostId, b: HostId) -> u64 {
        if self.pair_delay_max == 0 {
            return 0;
        }
        let (lo, hi) = if a.0 <= b.0 { (a.0, b.0) } else { (b.0, a.0) };
        let h = crate::util::mix(self.pair_key ^ ((u64::from(lo) << 32) | u64::from(hi)));
        h % (self.pair_delay_max + 1)
    }

    pub(crate) fn host(&self, h: HostId) -> Result<&Host, SimError> {
        self.hosts.get(h.0 as usize).ok_or(SimError::UnknownHost(h))
    }

    fn host_mut(&mut self, h: HostId) -> Result<&mut Host, SimError> {
        self.hosts
            .get_mut(h.0 as usize)
            .ok_or(SimError::UnknownHost(h))
    }

    /// A host that may carry links, access delays and uplinks.
    fn public_host_mut(&mut self, h: HostId) -> Result<&mut Host, SimError> {
        let host = self.host_mut(h)?;
        match host.kind {
            HostKind::Private { .. } => Err(SimError::NotPublic(h)),
            _ => Ok(host),
        }
    }

    pub(crate) fn add_host(&mut self, ip: Ipv4Addr, kind: HostKind) -> Result<HostId, SimError> {
        if self.by_ip.contains_key(&ip.to_bits()) {
            return Err(SimError::AddressTaken(ip));
        }
        let id = HostId(
            u32::try_from(self.hosts.len()).map_err(|_| SimError::Invalid {
                what: "host count",
                reason: "more than 2^32 hosts".into(),
            })?,
        );
        self.hosts.push(Host {
            ip,
            kind,
            access_delay: 0,
            uplink: None,
            busy_until: Time::ZERO,
            ports: Vec::new(),
        });
        self.by_ip.insert(ip.to_bits(), id);
        Ok(id)
    }

    pub(crate) fn add_nat(&mut self, ip: Ipv4Addr, config: NatConfig) -> Result<HostId, SimError> {
        config.validate()?;
        let index = u32::try_from(self.nats.len()).map_err(|_| SimError::Invalid {
            what: "NAT count",
            reason: "more than 2^32 NATs".into(),
        })?;
        let id = self.add_host(ip, HostKind::Nat(index))?;
        self.nats.push(Nat::new(ip, config));
        Ok(id)
    }

    pub(crate) fn add_private_host(
        &mut self,
        nat: HostId,
        ip: Ipv4Addr,
    ) -> Result<HostId, SimError> {
        match self.host(nat)?.kind {
            HostKind::Nat(index) => self.add_host(ip, HostKind::Private { nat, index }),
            _ => Err(SimError::NotANat(nat)),
        }
    }

    /// Binds `port` on `host` to `node`; returns the bound address.
    pub(crate) fn bind(
        &mut self,
        host: HostId,
        port: u16,
        node: NodeId,
    ) -> Result<SocketAddrV4, SimError> {
        let h = self.host_mut(host)?;
        if matches!(h.kind, HostKind::Nat(_)) {
            return Err(SimError::IsANat(host));
        }
        let addr = SocketAddrV4::new(h.ip, port);
        if h.ports.iter().any(|&(p, _)| p == port) {
            return Err(SimError::PortTaken(addr));
        }
        h.ports.push((port, node));
        Ok(addr)
    }

    pub(crate) fn set_default_link(&mut self, config: LinkConfig) -> Result<(), SimError> {
        config.validate()?;
        self.default_link = config;
        Ok(())
    }

    pub(crate) fn set_link(
        &mut self,
        from: HostId,
        to: HostId,
        config: LinkConfig,
    ) -> Result<(), SimError> {
        config.validate()?;
        self.public_host_mut(from)?;
        self.public_host_mut(to)?;
        self.links.insert(link_key(from, to), config);
        Ok(())
    }

    pub(crate) fn set_access_delay(
        &mut self,
        host: HostId,
        delay: Duration,
    ) -> Result<(), SimError> {
        self.public_host_mut(host)?.access_delay = micros(delay);
        Ok(())
    }

    pub(crate) fn set_uplink(
        &mut self,
        host: HostId,
        uplink: Option<Uplink>,
    ) -> Result<(), SimError> {
        if let Some(u) = &uplink {
            u.validate()?;
        }
        self.public_host_mut(host)?.uplink = uplink;
        Ok(())
    }

    pub(crate) fn live_mappings(&self, nat: HostId, now: Time) -> Result<usize, SimError> {
        match self.host(nat)?.kind {
            HostKind::Nat(i) => Ok(self.nats[i as usize].live_mappings(now)),
            _ => Err(SimError::NotANat(nat)),
        }
    }

    pub(crate) fn add_cut(
        &mut self,
        from: &[HostId],
        to: &[HostId],
        both_ways: bool,
    ) -> Result<u32, SimError> {
        for &h in from.iter().chain(to) {
            self.host(h)?;
        }
        let id = u32::try_from(self.cuts.len()).map_err(|_| SimError::Invalid {
            what: "cut count",
            reason: "more than 2^32 cuts".into(),
        })?;
        self.cuts.push(Cut {
            from: HostSet::new(from),
            to: HostSet::new(to),
            both_ways,
            active: false,
        });
        Ok(id)
    }

    pub(crate) fn check_cut(&self, id: u32) -> Result<(), SimError> {
        match self.cuts.get(id as usize) {
            Some(_) => Ok(()),
            None => Err(SimError::UnknownCut(id)),
        }
    }

    pub(crate) fn set_cut_active(&mut self, id: u32, active: bool) {
        let Some(cut) = self.cuts.get_mut(id as usize) else {
            return;
        };
        if cut.active != active {
            cut.active = active;
            if active {
                self.active_cuts.push(id);
            } else {
                self.active_cuts.retain(|&c| c != id);
            }
        }
    }

    /// Whether `set` holds `h`, directly or through `h`'s NAT.
    fn member(&self, set: &HostSet, h: HostId) -> bool {
        set.contains(h)
            || matches!(self.hosts[h.0 as usize].kind, HostKind::Private { nat, .. } if set.contains(nat))
    }

    fn is_cut(&self, origin: HostId, dest: HostId) -> bool {
        self.active_cuts.iter().any(|&c| {
            let cut = &self.cuts[c as usize];
            (self.member(&cut.from, origin) && self.member(&cut.to, dest))
                || (cut.both_ways && self.member(&cut.to, origin) && self.member(&cut.from, dest))
        })
    }

    /// The fixed one-way delay between the sites of `a` and `b` (their NATs for
    /// private hosts): both access delays and the pair delay, without the link's
    /// own delay; 0 inside one site.
    pub(crate) fn site_delay(&self, a: HostId, b: HostId) -> u64 {
        let site = |h: HostId| match self.hosts[h.0 as usize].kind {
            HostKind::Private { nat, .. } => nat,
            _ => h,
        };
        let (x, y) = (site(a), site(b));
        if x == y {
            return 0;
        }
        self.hosts[x.0 as usize]
            .access_delay
            .saturating_add(self.hosts[y.0 as usize].access_delay)
            .saturating_add(self.pair_delay(x, y))
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Sends `bytes` from port `port` of `from` to `dest` at `now`: translates it
    /// through the sender's NAT, draws its fate on the link and queues its arrival.
    pub(crate) fn send(
        &mut self,
        now: Time,
        from: HostId,
        port: u16,
        dest: SocketAddr,
        bytes: Vec<u8>,
        queue: &mut Queue,
    ) {
        let len = bytes.len() as u64;
        self.stats.sent += 1;
        self.stats.sent_bytes += len;
        let SocketAddr::V4(dest) = dest else {
            self.stats.unroutable += 1;
            return;
        };
        let Some(&to) = self.by_ip.get(&dest.ip().to_bits()) else {
            self.stats.unroutable += 1;
            return;
        };
        let sender = &self.hosts[from.0 as usize];
        let inside = SocketAddrV4::new(sender.ip, port);

        // Route: the source on the wire and the two ends of the link it crosses
        // (equal ends mean it stays inside one site and crosses no internet link).
        let (src, link_from, link_to) = match (sender.kind, self.hosts[to.0 as usize].kind) {
            (
                HostKind::Private {
                    nat: inside_nat, ..
                },
                HostKind::Private { nat, .. },
            ) if inside_nat == nat => (inside, nat, nat),
            (_, HostKind::Private { .. }) | (HostKind::Nat(_), _) => {
                self.stats.unroutable += 1;
                return;
            }
            (HostKind::Public, _) => (inside, from, to),
            (HostKind::Private { nat, index }, _) => {
                let box_ = &mut self.nats[index as usize];
                let hairpin = to == nat;
                let translated = if hairpin && !box_.config.hairpinning {
                    None
                } else {
                    box_.outbound(now, from, inside, dest, &mut self.rng)
                };
                let Some(public) = translated else {
                    self.stats.filtered_by_nat += 1;
                    return;
                };
                if hairpin {
                    (public, nat, nat)
                } else {
                    (public, nat, to)
                }
            }
        };

        let local = link_from == link_to;
        let mut depart = now;
        let mut access = 0;
        if !local {
            let (sender_site, receiver_site) = (link_from.0 as usize, link_to.0 as usize);
            access = self.hosts[sender_site]
                .access_delay
                .saturating_add(self.hosts[receiver_site].access_delay)
                .saturating_add(self.pair_delay(link_from, link_to));
            let site = &mut self.hosts[sender_site];
            if let Some(up) = site.uplink {
                let start = site.busy_until.max(now);
                let backlog = start.as_micros() - now.as_micros();
                if backlog > 0 && up.backlog_bytes(backlog).saturating_add(len) > up.queue_bytes {
                    self.stats.queue_dropped += 1;
                    return;
                }
                let done = start
                    .as_micros()
                    .saturating_add(up.serialise_micros(bytes.len()));
                site.busy_until = Time::from_micros(done);
                depart = site.busy_until;
            }
        }

        let key = link_key(link_from, link_to);
        // Most large simulations set no per-pair links: skip the lookup then.
        let config = if self.links.is_empty() {
            &self.default_link
        } else {
            self.links.get(&key).unwrap_or(&self.default_link)
        };
        let mut state = if config.is_stateful() {
            Some(self.link_state.entry(key).or_default())
        } else {
            None
        };
        let burst_lost = match (&config.burst_loss, state.as_deref_mut()) {
            (Some(ge), Some(st)) => ge.step(&mut st.bad, &mut self.rng),
            _ => false,
        };
        if burst_lost | chance(&mut self.rng, config.loss) {
            self.stats.lost += 1;
            return;
        }
        let copies = if chance(&mut self.rng, config.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        let mut bytes = Some(bytes);
        for copy in 0..copies {
            let (delay, held) = config.draw_delay(&mut self.rng);
            let mut at = Time::from_micros(
                depart
                    .as_micros()
                    .saturating_add(delay.saturating_add(access)),
            );
            if config.fifo
                && !held
                && let Some(st) = state.as_deref_mut()
            {
                at = at.max(st.tail);
                st.tail = at;
            }
            let payload = if copy + 1 == copies {
                bytes.take().unwrap_or_default()
            } else {
                bytes.clone().unwrap_or_default()
            };
            let slot = self.in_flight.insert(InFlight {
                origin: from,
                src,
                to,
                dst: dest,
                bytes: payload,
            });
            queue.push(at, Due::Deliver(slot));
        }
    }

    /// A datagram arrives at `now`: through the receiving NAT and past the cuts to
    /// the node bound at its destination, or counted as dropped.
    pub(crate) fn arrive(&mut self, now: Time, slot: u32) -> Option<Arrival> {
        let packet = self.in_flight.take(slot)?;
        let (host, dst) = match self.hosts[packet.to.0 as usize].kind {
            HostKind::Nat(index) => {
                match self.nats[index as usize].inbound(now, packet.src, packet.dst.port()) {
                    Some(inside) => inside,
                    None => {
                        self.stats.filtered_by_nat += 1;
                        return None;
                    }
                }
            }
            _ => (packet.to, packet.dst),
        };
        if !self.active_cuts.is_empty() && self.is_cut(packet.origin, host) {
            self.stats.partitioned += 1;
            return None;
        }
        let bound = self.hosts[host.0 as usize]
            .ports
            .iter()
            .find(|&&(p, _)| p == dst.port());
        let Some(&(_, node)) = bound else {
            self.stats.unroutable += 1;
            return None;
        };
        Some(Arrival {
            node,
            src: packet.src,
            bytes: packet.bytes,
        })
    }
}
