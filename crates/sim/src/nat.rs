//! NAT boxes: mapping and filtering as RFC 4787 describes them.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use peercall_wire::Time;
use rand_core::RngCore;

use crate::HostId;
use crate::util::{FastMap, below};

/// How long an idle UDP mapping lives by default. 30 s is common among consumer
/// NATs and well under RFC 4787's 2-minute minimum (REQ-5), so protocols tested here
/// must keep their mappings alive the hard way.
pub const DEFAULT_MAPPING_TIMEOUT: Duration = Duration::from_secs(30);

/// The lowest public port a NAT hands out: ports below are the well-known and
/// registered system range that NATs leave alone.
const FIRST_PORT: u16 = 1024;

/// Random tries before a NAT searches its port range in order; with a sparse table
/// the first try almost always succeeds.
const RANDOM_PORT_TRIES: u32 = 16;

/// The table size below which expired mappings are not swept (they are still ignored
/// when looked up); sweeping tiny tables is not worth the walk.
const MIN_SWEEP: usize = 64;

/// The classic NAT types, in RFC 4787 terms.
///
/// | type | mapping | filtering |
/// |---|---|---|
/// | full cone | endpoint-independent | endpoint-independent: anyone may send to a mapping |
/// | address-restricted cone | endpoint-independent | address-dependent: only IPs the inside has sent to |
/// | port-restricted cone | endpoint-independent | address-and-port-dependent: only IP:port pairs the inside has sent to |
/// | symmetric | address-and-port-dependent: a new public port per destination | address-and-port-dependent |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatType {
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-dependent filtering.
    AddressRestricted,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestricted,
    /// Address-and-port-dependent mapping and filtering.
    Symmetric,
}

/// A NAT box's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatConfig {
    /// Mapping and filtering behaviour.
    pub nat_type: NatType,
    /// A mapping (and each filtering permission in it) lives this long after the last
    /// outbound datagram through it; inbound traffic does not refresh it.
    pub mapping_timeout: Duration,
    /// Whether a datagram from inside to one of the NAT's own public mappings is
    /// turned around to the inside host (RFC 4787 REQ-9). Off by default, as on many
    /// consumer NATs.
    pub hairpinning: bool,
}

impl NatConfig {
    /// A NAT of type `nat_type` with [`DEFAULT_MAPPING_TIMEOUT`] and no hairpinning.
    pub fn new(nat_type: NatType) -> NatConfig {
        NatConfig {
            nat_type,
            mapping_timeout: DEFAULT_MAPPING_TIMEOUT,
            hairpinning: false,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), crate::SimError> {
        if self.mapping_timeout.is_zero() {
            return Err(crate::SimError::Invalid {
                what: "NatConfig::mapping_timeout",
                reason: "must be non-zero, or no reply could ever come back".into(),
            });
        }
        Ok(())
    }
}

/// One public port's translation.
#[derive(Debug)]
struct Mapping {
    /// The inside endpoint.
    inside: SocketAddrV4,
    /// The inside host.
    host: HostId,
    /// The key this mapping is found under for outbound datagrams.
    key: u128,
    /// Dead from this time on, unless refreshed by outbound traffic.
    expires: Time,
    /// Remotes allowed in (filter keys, see [`Nat::filter_key`]) and until when.
    /// Empty for full-cone NATs, which filter nothing.
    permits: Vec<(u64, Time)>,
}

/// A NAT box's state: its mappings, keyed both ways.
#[derive(Debug)]
pub(crate) struct Nat {
    pub(crate) public_ip: Ipv4Addr,
    pub(crate) config: NatConfig,
    /// Outbound key to public port.
    outbound: FastMap<u128, u16>,
    /// Public port to mapping.
    by_port: FastMap<u16, Mapping>,
    /// Sweep expired mappings when the table reaches this size.
    sweep_at: usize,
}

fn endpoint_bits(a: SocketAddrV4) -> u64 {
    (u64::from(a.ip().to_bits()) << 16) | u64::from(a.port())
}

impl Nat {
    pub(crate) fn new(public_ip: Ipv4Addr, config: NatConfig) -> Nat {
        Nat {
            public_ip,
            config,
            outbound: FastMap::default(),
            by_port: FastMap::default(),
            sweep_at: MIN_SWEEP,
        }
    }

    /// Live mappings (expired ones not yet swept are not counted).
    pub(crate) fn live_mappings(&self, now: Time) -> usize {
        self.by_port.values().filter(|m| m.expires > now).count()
    }

    fn mapping_key(&self, inside: SocketAddrV4, remote: SocketAddrV4) -> u128 {
        let inside = u128::from(endpoint_bits(inside));
        match self.config.nat_type {
            NatType::Symmetric => (inside << 64) | u128::from(endpoint_bits(remote)),
            _ => inside << 64,
        }
    }

    /// What a permission is keyed by: the remote IP, or IP and port. `None` when the
    /// NAT does not filter.
    fn filter_key(&self, remote: SocketAddrV4) -> Option<u64> {
        match self.config.nat_type {
            NatType::FullCone => None,
            NatType::AddressRestricted => Some(u64::from(remote.ip().to_bits()) << 16),
            NatType::PortRestricted | NatType::Symmetric => Some(endpoint_bits(remote)),
        }
    }

    /// Translates an outbound datagram from `inside` (on `host`) to `remote`: finds or
    /// creates the mapping, refreshes it, and returns the public source address.
    /// `None` when every public port is taken.
    pub(crate) fn outbound(
        &mut self,
        now: Time,
        host: HostId,
        inside: SocketAddrV4,
        remote: SocketAddrV4,
        rng: &mut impl RngCore,
    ) -> Option<SocketAddrV4> {
        let key = self.mapping_key(inside, remote);
        let expires = now + self.config.mapping_timeout;
        let port = match self.outbound.get(&key).copied() {
            Some(port) if self.by_port.get(&port).is_some_and(|m| m.expires > now) => port,
            stale => {
                if let Some(port) = stale {
                    self.by_port.remove(&port);
                    self.outbound.remove(&key);
                }
                let port = self.allocate_port(now, rng)?;
                self.by_port.insert(
                    port,
                    Mapping {
                        inside,
                        host,
                        key,
                        expires,
                        permits: Vec::new(),
                    },
                );
                self.outbound.insert(key, port);
                port
            }
        };
        let filter = self.filter_key(remote);
        let mapping = self
            .by_port
            .get_mut(&port)
            .expect("the mapping was found or inserted above");
        mapping.expires = expires;
        if let Some(filter) = filter {
            mapping.permits.retain(|&(_, until)| until > now);
            match mapping.permits.iter_mut().find(|(k, _)| *k == filter) {
                Some(permit) => permit.1 = expires,
                None => mapping.permits.push((filter, expires)),
            }
        }
        Some(SocketAddrV4::new(self.public_ip, port))
    }

    /// Filters and translates an inbound datagram from `remote` to public `port`:
    /// the inside host and endpoint, or `None` when the NAT drops it.
    pub(crate) fn inbound(
        &mut self,
        now: Time,
        remote: SocketAddrV4,
        port: u16,
    ) -> Option<(HostId, SocketAddrV4)> {
        let mapping = self.by_port.get(&port)?;
        if mapping.expires <= now {
            let key = mapping.key;
            self.by_port.remove(&port);
            self.outbound.remove(&key);
            return None;
        }
        let allowed = match self.filter_key(remote) {
            None => true,
            Some(filter) => mapping
                .permits
                .iter()
                .any(|&(k, until)| k == filter && until > now),
        };
        allowed.then_some((mapping.host, mapping.inside))
    }

    /// A free public port, chosen at random (as most NATs do, which defeats port
    /// prediction), or `None` when all are taken by live mappings.
    fn allocate_port(&mut self, now: Time, rng: &mut impl RngCore) -> Option<u16> {
        if self.by_port.len() >= self.sweep_at {
            self.sweep(now);
        }
        let span = u64::from(u16::MAX - FIRST_PORT) + 1;
        let pick = |offset: u64| FIRST_PORT + u16::try_from(offset % span).unwrap_or(0);
        for _ in 0..RANDOM_PORT_TRIES {
            let port = pick(below(rng, span));
            if !self.by_port.contains_key(&port) {
                return Some(port);
            }
        }
        self.sweep(now);
        let start = below(rng, span);
        (0..span)
            .map(|i| pick(start + i))
            .find(|port| !self.by_port.contains_key(port))
    }

    /// Forgets expired mappings; amortised O(1) per allocation because the next sweep
    /// waits until the table has doubled.
    fn sweep(&mut self, now: Time) {
        let outbound = &mut self.outbound;
        self.by_port.retain(|_, m| {
            let live = m.expires > now;
            if !live {
                outbound.remove(&m.key);
            }
            live
        });
        self.sweep_at = (2 * self.by_port.len()).max(MIN_SWEEP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn ep(a: u8, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, a), port)
    }

    const INSIDE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 5000);
    const HOST: HostId = HostId(1);

    fn nat(t: NatType) -> Nat {
        Nat::new(Ipv4Addr::new(203, 0, 113, 1), NatConfig::new(t))
    }

    #[test]
    fn filtering_per_type() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let now = Time::from_secs(100);
        for (t, same_ip_other_port, other_ip) in [
            (NatType::FullCone, true, true),
            (NatType::AddressRestricted, true, false),
            (NatType::PortRestricted, false, false),
            (NatType::Symmetric, false, false),
        ] {
            let mut n = nat(t);
            let public = n
                .outbound(now, HOST, INSIDE, ep(1, 80), &mut rng)
                .expect("port");
            let p = public.port();
            assert_eq!(n.inbound(now, ep(1, 80), p), Some((HOST, INSIDE)), "{t:?}");
            assert_eq!(
                n.inbound(now, ep(1, 81), p).is_some(),
                same_ip_other_port,
                "{t:?}"
            );
            assert_eq!(n.inbound(now, ep(2, 80), p).is_some(), other_ip, "{t:?}");
        }
    }

    #[test]
    fn mapping_per_destination_only_when_symmetric() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let now = Time::from_secs(1);
        for t in [
            NatType::FullCone,
            NatType::PortRestricted,
            NatType::Symmetric,
        ] {
            let mut n = nat(t);
            let a = n
                .outbound(now, HOST, INSIDE, ep(1, 80), &mut rng)
                .expect("port");
            let b = n
                .outbound(now, HOST, INSIDE, ep(2, 80), &mut rng)
                .expect("port");
            let a2 = n
                .outbound(now, HOST, INSIDE, ep(1, 80), &mut rng)
                .expect("port");
            assert_eq!(a, a2, "{t:?}: the same destination reuses its mapping");
            assert_eq!(a == b, t != NatType::Symmetric, "{t:?}");
        }
    }

    #[test]
    fn mappings_expire_unless_refreshed_outbound() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut n = nat(NatType::PortRestricted);
        let t0 = Time::from_secs(1000);
        let p = n
            .outbound(t0, HOST, INSIDE, ep(1, 80), &mut rng)
            .expect("port")
            .port();
        // Inbound traffic does not refresh.
        let almost = t0 + DEFAULT_MAPPING_TIMEOUT - Duration::from_micros(1);
        assert!(n.inbound(almost, ep(1, 80), p).is_some());
        assert!(
            n.inbound(t0 + DEFAULT_MAPPING_TIMEOUT, ep(1, 80), p)
                .is_none()
        );
        assert_eq!(n.live_mappings(t0 + DEFAULT_MAPPING_TIMEOUT), 0);
        // Outbound does refresh.
        let t1 = t0 + Duration::from_secs(100);
        let p = n
            .outbound(t1, HOST, INSIDE, ep(1, 80), &mut rng)
            .expect("port")
            .port();
        let t2 = t1 + Duration::from_secs(20);
        assert_eq!(
            n.outbound(t2, HOST, INSIDE, ep(1, 80), &mut rng)
                .map(|a| a.port()),
            Some(p)
        );
        assert!(
            n.inbound(t2 + Duration::from_secs(29), ep(1, 80), p)
                .is_some()
        );
    }

    #[test]
    fn permissions_expire_separately() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let mut n = nat(NatType::PortRestricted);
        let t0 = Time::from_secs(1000);
        let p = n
            .outbound(t0, HOST, INSIDE, ep(1, 80), &mut rng)
            .expect("port")
            .port();
        let t1 = t0 + Duration::from_secs(20);
        n.outbound(t1, HOST, INSIDE, ep(2, 80), &mut rng)
            .expect("port");
        let t2 = t0 + Duration::from_secs(40);
        assert!(n.inbound(t2, ep(2, 80), p).is_some(), "refreshed 20 s ago");
        assert!(
            n.inbound(t2, ep(1, 80), p).is_none(),
            "not sent to for 40 s"
        );
    }

    #[test]
    fn many_mappings_get_distinct_ports_and_sweeps_reclaim() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mut n = nat(NatType::Symmetric);
        let t0 = Time::from_secs(10);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..5000u16 {
            let a = n
                .outbound(t0, HOST, INSIDE, ep(1, 1000 + i), &mut rng)
                .expect("port");
            assert!(a.port() >= FIRST_PORT);
            assert!(seen.insert(a.port()), "port handed out twice");
        }
        let later = t0 + Duration::from_secs(3600);
        n.outbound(later, HOST, INSIDE, ep(3, 1), &mut rng)
            .expect("port");
        for i in 0..4000u16 {
            n.outbound(later, HOST, INSIDE, ep(4, i), &mut rng)
                .expect("port");
        }
        // The table doubled past 8192 entries once, and the sweep then dropped the
        // 5000 expired mappings.
        assert_eq!(n.by_port.len(), 4001, "expired mappings were swept");
        assert_eq!(n.by_port.len(), n.outbound.len());
    }
}
