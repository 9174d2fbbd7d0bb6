//! User-space network emulation in the node's own UDP socket (the `[emulate]`
//! config section): outbound delay, jitter and random loss, and a port-restricted
//! cone NAT's inbound filter. For tests and `peercall demo` on loopback, where no
//! `tc netem` or NAT router is at hand; never for production nodes.
//!
//! - **Impairment** applies to datagrams this node sends (to every destination, or
//!   only to the addresses listed in `emulate.peers`): each is lost with probability
//!   `loss_pct`, else held for `delay_ms` ± a uniform `jitter_ms` (like `netem`,
//!   datagrams may overtake one another when the jitter exceeds their spacing). The
//!   random draws come from a ChaCha20 generator seeded by `emulate.seed` (logged at
//!   start), so a run can be repeated.
//! - **NAT filter** (`emulate.nat = "port-restricted"`): a datagram from an address
//!   this node has not sent to within `nat_timeout_secs` is dropped, as a
//!   port-restricted cone NAT (RFC 4787: endpoint-independent mapping,
//!   address-and-port-dependent filtering) in front of the node would drop it. The
//!   mapping is the identity (loopback has no address to translate to), so direct
//!   paths need both sides to punch, exactly as behind the real thing.
//!
//! Delayed datagrams wait in a bounded queue owned by the socket
//! ([`crate::udp::BatchSocket`]), which sends them from its receive loop when they
//! are due: the engine never waits for them. A full queue drops (and counts) the
//! datagram. Buffers are recycled, so a steady stream allocates nothing once the
//! queue has reached its working size.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use rand::Rng;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// Datagrams the delay queue holds at most: at the largest delay allowed
/// ([`MAX_DELAY_MS`]) this is still above 800 datagrams/s, ten voice calls with
/// redundancy plus the overlay's traffic, and it bounds the queue's memory to
/// about 12 MB of datagram buffers.
pub const MAX_DELAYED: usize = 8192;
/// Largest configurable delay (and jitter): ten seconds is far beyond any real path
/// (a geostationary hop is 0.3 s); more is a unit mistake.
pub const MAX_DELAY_MS: u64 = 10_000;
/// Addresses the NAT filter remembers at most. Beyond this, expired mappings are
/// swept; if none has expired, the new mapping is not made (a real NAT runs out
/// of ports the same way) and datagrams from that address stay filtered.
pub const MAX_NAT_MAPPINGS: usize = 65_536;
/// Most entries in `emulate.peers`.
pub const MAX_PEERS: usize = 64;

/// Which inbound datagrams the emulated NAT lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NatMode {
    /// No NAT: everything reaches the node.
    #[default]
    None,
    /// A port-restricted cone NAT: only datagrams from an `IP:PORT` the node sent
    /// to within the mapping timeout.
    PortRestricted,
}

impl NatMode {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NatMode::None => "none",
            NatMode::PortRestricted => "port-restricted",
        }
    }
}

/// An entry of `emulate.peers`: an address, with port 0 standing for any port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerMatch(pub SocketAddr);

impl PeerMatch {
    fn matches(self, addr: SocketAddr) -> bool {
        same_ip(self.0.ip(), addr.ip()) && (self.0.port() == 0 || self.0.port() == addr.port())
    }
}

/// IPv4 and its IPv4-mapped IPv6 form are the same host.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// The `emulate.*` keys, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EmulateSettings {
    /// Added to every impaired datagram, milliseconds.
    pub delay_ms: u64,
    /// Uniform spread around the delay, ± milliseconds (at most the delay).
    pub jitter_ms: u64,
    /// Datagrams lost, in parts per million (configured as a percentage).
    pub loss_ppm: u32,
    /// The generator's seed; 0 draws one from the OS (it is logged either way).
    pub seed: u64,
    /// Impaired destinations; empty: all.
    pub peers: Vec<PeerMatch>,
    /// The NAT filter.
    pub nat: NatMode,
    /// How long a mapping lives after the last datagram sent through it, seconds.
    pub nat_timeout_secs: u64,
}

impl EmulateSettings {
    /// Whether any of it is on.
    pub fn is_active(&self) -> bool {
        self.impairs() || self.nat != NatMode::None
    }

    /// Whether outbound datagrams are delayed or lost.
    pub fn impairs(&self) -> bool {
        self.delay_ms > 0 || self.loss_ppm > 0
    }
}

/// The emulator's counters (`peercall_debug_*`).
#[derive(Debug, Clone)]
pub struct EmulateMetrics {
    /// Outbound datagrams lost on purpose.
    pub lost: IntCounter,
    /// Outbound datagrams dropped because the delay queue was full.
    pub queue_full: IntCounter,
    /// Delayed datagrams the socket refused when they fell due.
    pub send_failed: IntCounter,
    /// Inbound datagrams the NAT filter dropped.
    pub nat_filtered: IntCounter,
    /// Outbound datagrams that went through the delay queue.
    pub delayed: IntCounter,
}

/// What to do with one outbound datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    /// Send it now.
    Send,
    /// Taken: queued, or lost (and counted).
    Taken,
}

/// A datagram waiting in the delay queue.
#[derive(Debug)]
struct Delayed {
    due: Instant,
    /// Arrival order, so equal due times leave in the order they came.
    seq: u64,
    dest: SocketAddr,
    bytes: Vec<u8>,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}

impl Eq for Delayed {}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// The emulated link and NAT of one socket.
#[derive(Debug)]
pub struct LinkEmulator {
    delay: Duration,
    jitter_us: u64,
    loss_ppm: u32,
    peers: Vec<PeerMatch>,
    rng: ChaCha20Rng,
    queue: BinaryHeap<Reverse<Delayed>>,
    /// Buffers of sent datagrams, for reuse.
    spare: Vec<Vec<u8>>,
    seq: u64,
    nat: NatMode,
    nat_timeout: Duration,
    /// When this node last sent to each address (the NAT's mappings).
    mappings: HashMap<SocketAddr, Instant>,
    metrics: EmulateMetrics,
}

impl LinkEmulator {
    /// An emulator for `settings` whose generator starts from `seed` (the settings'
    /// seed, or one the caller drew when it is 0).
    pub fn new(settings: &EmulateSettings, seed: u64, metrics: EmulateMetrics) -> LinkEmulator {
        LinkEmulator {
            delay: Duration::from_millis(settings.delay_ms),
            jitter_us: settings.jitter_ms * 1000,
            loss_ppm: settings.loss_ppm,
            peers: settings.peers.clone(),
            rng: ChaCha20Rng::seed_from_u64(seed),
            queue: BinaryHeap::new(),
            spare: Vec::new(),
            seq: 0,
            nat: settings.nat,
            nat_timeout: Duration::from_secs(settings.nat_timeout_secs),
            mappings: HashMap::new(),
            metrics,
        }
    }

    /// Whether datagrams to `dest` are delayed or lost (else they go out as the
    /// engine batched them).
    pub fn impairs(&self, dest: SocketAddr) -> bool {
        (self.delay > Duration::ZERO || self.loss_ppm > 0)
            && (self.peers.is_empty() || self.peers.iter().any(|p| p.matches(dest)))
    }

    /// Notes that the node sends to `dest` at `now`: the NAT's mapping for it is
    /// made or refreshed (before any loss: the NAT is at this end of the link).
    pub fn sent(&mut self, dest: SocketAddr, now: Instant) {
        if self.nat == NatMode::None {
            return;
        }
        if let Some(last) = self.mappings.get_mut(&dest) {
            *last = now;
            return;
        }
        if self.mappings.len() >= MAX_NAT_MAPPINGS {
            let timeout = self.nat_timeout;
            self.mappings
                .retain(|_, last| now.saturating_duration_since(*last) < timeout);
        }
        if self.mappings.len() < MAX_NAT_MAPPINGS {
            self.mappings.insert(dest, now);
        }
    }

    /// Whether the NAT lets a datagram from `from` in at `now`; counts it if not.
    pub fn admits(&self, from: SocketAddr, now: Instant, datagrams: usize) -> bool {
        if self.nat == NatMode::None {
            return true;
        }
        let open = self
            .mappings
            .get(&from)
            .is_some_and(|last| now.saturating_duration_since(*last) < self.nat_timeout);
        if !open {
            self.metrics.nat_filtered.inc_by(datagrams as u64);
        }
        open
    }

    /// Decides the fate of one impaired datagram to `dest` sent at `now`: lost,
    /// queued (copied) until its delay has passed, or to be sent at once.
    pub fn outbound(&mut self, now: Instant, dest: SocketAddr, datagram: &[u8]) -> Outbound {
        if self.loss_ppm > 0 && self.rng.gen_range(0..1_000_000) < self.loss_ppm {
            self.metrics.lost.inc();
            return Outbound::Taken;
        }
        let delay = self.draw_delay();
        if delay.is_zero() {
            return Outbound::Send;
        }
        if self.queue.len() >= MAX_DELAYED {
            self.metrics.queue_full.inc();
            return Outbound::Taken;
        }
        let mut bytes = self.spare.pop().unwrap_or_default();
        bytes.clear();
        bytes.extend_from_slice(datagram);
        self.seq += 1;
        self.queue.push(Reverse(Delayed {
            due: now + delay,
            seq: self.seq,
            dest,
            bytes,
        }));
        self.metrics.delayed.inc();
        Outbound::Taken
    }

    /// The delay for the next datagram: the base ± a uniform jitter, never negative.
    fn draw_delay(&mut self) -> Duration {
        if self.jitter_us == 0 {
            return self.delay;
        }
        let spread = self.rng.gen_range(0..=2 * self.jitter_us);
        let base = self.delay.as_micros() as u64;
        Duration::from_micros((base + spread).saturating_sub(self.jitter_us))
    }

    /// When the next delayed datagram is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse(d)| d.due)
    }

    /// Calls `send` with every datagram due at `now`, earliest first; `send`
    /// returns whether the socket took it (a refusal is counted and the datagram
    /// dropped: the link is lossy anyway).
    pub fn send_due(&mut self, now: Instant, mut send: impl FnMut(SocketAddr, &[u8]) -> bool) {
        while self.queue.peek().is_some_and(|Reverse(d)| d.due <= now) {
            let Some(Reverse(d)) = self.queue.pop() else {
                break;
            };
            if !send(d.dest, &d.bytes) {
                self.metrics.send_failed.inc();
            }
            if self.spare.len() < MAX_DELAYED {
                self.spare.push(d.bytes);
            }
        }
    }

    /// Datagrams waiting.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> EmulateMetrics {
        let c = |n: &str| IntCounter::new(n, "test").unwrap();
        EmulateMetrics {
            lost: c("lost"),
            queue_full: c("queue_full"),
            send_failed: c("send_failed"),
            nat_filtered: c("nat_filtered"),
            delayed: c("delayed"),
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn settings(delay_ms: u64, jitter_ms: u64, loss_pct: f64) -> EmulateSettings {
        EmulateSettings {
            delay_ms,
            jitter_ms,
            loss_ppm: (loss_pct * 10_000.0) as u32,
            seed: 7,
            nat_timeout_secs: 30,
            ..EmulateSettings::default()
        }
    }

    /// Sends `n` datagrams at `t0` and returns (lost, per-datagram delays in ms).
    fn run(e: &mut LinkEmulator, n: usize, t0: Instant) -> (usize, Vec<f64>) {
        let lost_before = e.metrics.lost.get();
        for i in 0..n {
            let payload = (i as u32).to_be_bytes();
            assert_eq!(e.outbound(t0, addr(9), &payload), Outbound::Taken);
        }
        let lost = (e.metrics.lost.get() - lost_before) as usize;
        let mut delays = Vec::new();
        while let Some(due) = e.next_due() {
            e.send_due(due, |_, _| {
                delays.push((due - t0).as_secs_f64() * 1000.0);
                true
            });
        }
        (lost, delays)
    }

    #[test]
    fn delay_jitter_and_loss_follow_the_settings_and_the_seed() {
        // Below the queue's bound, so every datagram not lost is queued.
        const N: usize = 8_000;
        let t0 = Instant::now();
        let m = metrics();
        let mut e = LinkEmulator::new(&settings(30, 10, 1.0), 7, m.clone());
        let (lost, delays) = run(&mut e, N, t0);
        assert_eq!(lost + delays.len(), N);
        // 1 % of 8,000 is 80; the binomial's standard deviation is 8.9.
        assert!((50..=110).contains(&lost), "{lost} lost");
        assert_eq!(m.lost.get() as usize, lost);
        assert_eq!(m.delayed.get() as usize, delays.len());
        let min = delays.iter().copied().fold(f64::MAX, f64::min);
        let max = delays.iter().copied().fold(0.0, f64::max);
        let mean = delays.iter().sum::<f64>() / delays.len() as f64;
        assert!(min >= 20.0 && max <= 40.0, "{min}..{max}");
        assert!(
            min < 21.0 && max > 39.0,
            "the jitter spans ±10 ms: {min}..{max}"
        );
        assert!((mean - 30.0).abs() < 0.5, "mean {mean}");
        // Due order: the queue hands datagrams out earliest first.
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));

        // The same seed gives the same run; another seed another one.
        let again = run(
            &mut LinkEmulator::new(&settings(30, 10, 1.0), 7, metrics()),
            N,
            t0,
        );
        assert_eq!(again, (lost, delays.clone()));
        let other = run(
            &mut LinkEmulator::new(&settings(30, 10, 1.0), 8, metrics()),
            N,
            t0,
        );
        assert_ne!(other, (lost, delays));
    }

    #[test]
    fn nothing_is_sent_before_it_is_due_and_the_queue_is_bounded() {
        let t0 = Instant::now();
        let m = metrics();
        let mut e = LinkEmulator::new(&settings(40, 0, 0.0), 1, m.clone());
        for i in 0..MAX_DELAYED + 5 {
            e.outbound(t0 + Duration::from_micros(i as u64), addr(9), &[1, 2, 3]);
        }
        assert_eq!(e.queued(), MAX_DELAYED);
        assert_eq!(m.queue_full.get(), 5);
        let mut sent = 0;
        e.send_due(t0 + Duration::from_millis(39), |_, _| {
            sent += 1;
            true
        });
        assert_eq!(sent, 0, "not due before 40 ms");
        e.send_due(t0 + Duration::from_millis(40), |dest, bytes| {
            assert_eq!((dest, bytes), (addr(9), &[1u8, 2, 3][..]));
            sent += 1;
            sent % 2 == 0
        });
        assert_eq!(sent, 1, "only the first is due at exactly 40 ms");
        // The last was queued 8.2 ms after the first.
        e.send_due(t0 + Duration::from_millis(50), |_, _| {
            sent += 1;
            false
        });
        assert_eq!(sent, MAX_DELAYED);
        assert_eq!(e.queued(), 0);
        // Every one refused, the first included (its `send` answered false).
        assert_eq!(m.send_failed.get() as usize, MAX_DELAYED);
    }

    #[test]
    fn only_listed_peers_are_impaired() {
        let mut s = settings(20, 0, 0.0);
        s.peers = vec![
            PeerMatch("127.0.0.2:0".parse().unwrap()),
            PeerMatch("127.0.0.3:7600".parse().unwrap()),
        ];
        let e = LinkEmulator::new(&s, 1, metrics());
        assert!(e.impairs("127.0.0.2:1234".parse().unwrap()));
        assert!(e.impairs("[::ffff:127.0.0.2]:1".parse().unwrap()));
        assert!(e.impairs("127.0.0.3:7600".parse().unwrap()));
        assert!(!e.impairs("127.0.0.3:7601".parse().unwrap()));
        assert!(!e.impairs(addr(9)));
        // No impairment configured: nothing is impaired, listed or not.
        let e = LinkEmulator::new(&EmulateSettings::default(), 1, metrics());
        assert!(!e.impairs("127.0.0.2:1234".parse().unwrap()));
    }

    #[test]
    fn the_nat_admits_only_addresses_sent_to_within_the_timeout() {
        let t0 = Instant::now();
        let m = metrics();
        let mut s = settings(0, 0, 0.0);
        s.nat = NatMode::PortRestricted;
        s.nat_timeout_secs = 5;
        let mut e = LinkEmulator::new(&s, 1, m.clone());
        assert!(!e.admits(addr(9), t0, 1), "unsolicited");
        e.sent(addr(9), t0);
        assert!(e.admits(addr(9), t0 + Duration::from_secs(4), 1));
        // Port-restricted: another port of the same host is still filtered.
        assert!(!e.admits(addr(10), t0, 2));
        assert!(
            !e.admits(addr(9), t0 + Duration::from_secs(5), 1),
            "expired"
        );
        e.sent(addr(9), t0 + Duration::from_secs(6));
        assert!(
            e.admits(addr(9), t0 + Duration::from_secs(10), 1),
            "refreshed"
        );
        assert_eq!(m.nat_filtered.get(), 4);
        // Without the NAT everything is admitted and nothing counted.
        let e = LinkEmulator::new(&settings(0, 0, 0.0), 1, m.clone());
        assert!(e.admits(addr(11), t0, 1));
        assert_eq!(m.nat_filtered.get(), 4);
    }
}
