//! The N-node harness: owns the nodes, the network and the clock.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use peercall_engine::Transmit;
use peercall_wire::Time;
use serde::Serialize;

use crate::SimError;
use crate::link::{LinkConfig, Uplink};
use crate::nat::NatConfig;
use crate::net::{HostKind, NetStats, Network};
use crate::queue::{Due, Queue, Slab};
use crate::seed::Seeds;

/// Where every simulation's clock starts: 2023-11-14 22:13:20 UTC. A plausible
/// wall-clock time, so that logic which judges wall-clock values (record expiry,
/// handshake timestamps) sees realistic numbers.
pub const START: Time = Time::from_secs(1_700_000_000);

/// The [`Sim::derive_seed`] label reserved for the pair-delay hash key (far from
/// the small labels tests use).
const PAIR_DELAY_LABEL: u64 = u64::MAX - 0x7061_6972;

/// A sans-IO state machine the harness can drive: anything driven the way
/// `peercall_engine::Node` is (see that crate's driving contract).
pub trait Drivable {
    /// What [`Drivable::poll_event`] hands out.
    type Event;

    /// Handles one datagram received from `from`.
    fn handle_datagram(&mut self, now: Time, from: SocketAddr, datagram: &[u8]);

    /// Runs the timers due at `now`.
    fn handle_timeout(&mut self, now: Time);

    /// The next datagram to send.
    fn poll_transmit(&mut self) -> Option<Transmit>;

    /// The next event.
    fn poll_event(&mut self) -> Option<Self::Event>;

    /// When [`Drivable::handle_timeout`] must next be called; `None` for never.
    fn poll_timeout(&mut self) -> Option<Time>;
}

/// A host in the simulated network: a public host, a NAT box, or a host behind a NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(pub(crate) u32);

impl HostId {
    /// Hosts are numbered from 0 in the order they were added.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A node in the harness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub(crate) u32);

impl NodeId {
    /// Nodes are numbered from 0 in the order they were added.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A cut in the network, made by [`Sim::cut`] or [`Sim::cut_one_way`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CutId(u32);

/// An event a node emitted, with when and who.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<E> {
    /// Virtual time of the input that produced the event.
    pub at: Time,
    /// The node that emitted it.
    pub node: NodeId,
    /// The event.
    pub event: E,
}

/// One node's datagrams through the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    /// Datagrams the node sent.
    pub sent: u64,
    /// Bytes in them.
    pub sent_bytes: u64,
    /// Datagrams delivered to the node.
    pub received: u64,
    /// Bytes in them.
    pub received_bytes: u64,
}

type Command<N> = Box<dyn FnOnce(&mut N, Time)>;

enum Action<N> {
    Cut(u32, bool),
    Command(NodeId, Command<N>),
}

struct Slot<N> {
    node: N,
    host: HostId,
    addr: SocketAddrV4,
    online: bool,
    /// The node's latest `poll_timeout`.
    want: Option<Time>,
    /// The time of the node's live timer entry in the queue; `Time::MAX` for none.
    /// Entries for a node are only ever queued earlier than the live one, so any
    /// other entry popped for the node is stale and skipped.
    armed: Time,
    traffic: Traffic,
}

/// A deterministic simulation of nodes of type `N` on an emulated network.
///
/// Built from a seed, it replays exactly: the same seed and the same calls give the
/// same event trace. See the crate documentation for the network model.
///
/// Methods taking a [`NodeId`] panic if it did not come from this simulation's
/// [`Sim::add_node`], like an out-of-range slice index.
pub struct Sim<N: Drivable> {
    seed: u64,
    seeds: Seeds,
    now: Time,
    queue: Queue,
    net: Network,
    nodes: Vec<Slot<N>>,
    actions: Slab<Action<N>>,
    events: Vec<Record<N::Event>>,
    recording: bool,
    processed: u64,
}

impl<N: Drivable> fmt::Debug for Sim<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.seed)
            .field("now", &self.now)
            .field("nodes", &self.nodes.len())
            .field("queued", &self.queue.len())
            .field("stats", &self.net.stats)
            .finish_non_exhaustive()
    }
}

impl<N: Drivable> Sim<N> {
    /// An empty simulation at [`START`] whose randomness all comes from `seed`.
    /// Prints `sim seed = N` to stderr, so a failing run can be replayed (see
    /// [`crate::seed_from_env`]).
    pub fn new(seed: u64) -> Sim<N> {
        eprintln!("sim seed = {seed}");
        Sim {
            seed,
            seeds: Seeds::new(seed),
            now: START,
            queue: Queue::default(),
            net: Network::new(Seeds::network(seed)),
            nodes: Vec::new(),
            actions: Slab::default(),
            events: Vec::new(),
            recording: true,
            processed: 0,
        }
    }

    /// The seed this simulation was built from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The virtual time.
    pub fn now(&self) -> Time {
        self.now
    }

    /// 32 random bytes for `label` (say, a node's RNG seed or key material), fixed by
    /// the simulation seed and the label and independent of the network's draws.
    pub fn derive_seed(&self, label: u64) -> [u8; 32] {
        self.seeds.derive(label)
    }

    // ---- topology -------------------------------------------------------------

    /// Adds a host with a public address.
    pub fn add_host(&mut self, ip: Ipv4Addr) -> Result<HostId, SimError> {
        self.net.add_host(ip, HostKind::Public)
    }

    /// Adds a NAT box with public address `public_ip`.
    pub fn add_nat(&mut self, public_ip: Ipv4Addr, config: NatConfig) -> Result<HostId, SimError> {
        self.net.add_nat(public_ip, config)
    }

    /// Adds a host behind `nat` with the private address `ip` (unique in the whole
    /// simulation; RFC 1918 addresses are customary).
    pub fn add_private_host(&mut self, nat: HostId, ip: Ipv4Addr) -> Result<HostId, SimError> {
        self.net.add_private_host(nat, ip)
    }

    /// Sets the link used between any two sites without a link of their own.
    pub fn set_default_link(&mut self, config: LinkConfig) -> Result<(), SimError> {
        self.net.set_default_link(config)
    }

    /// Sets the link from `from` to `to` (one direction; call twice for both). The
    /// ends are public hosts or NATs; traffic of hosts behind a NAT uses its NAT's
    /// links, and traffic that stays behind one NAT uses the NAT's link to itself.
    pub fn set_link(
        &mut self,
        from: HostId,
        to: HostId,
        config: LinkConfig,
    ) -> Result<(), SimError> {
        self.net.set_link(from, to, config)
    }

    /// Sets the one-way delay between a public host or NAT and the core network; a
    /// datagram between two sites takes both sites' access delays on top of the link's.
    /// With access delays, large simulations get varied latencies without a link per pair.
    pub fn set_access_delay(&mut self, host: HostId, delay: Duration) -> Result<(), SimError> {
        self.net.set_access_delay(host, delay)
    }

    /// Gives every pair of sites (public hosts and NATs) a fixed extra one-way delay
    /// drawn uniformly from `[0, max]`, the same both ways and for the whole run,
    /// fixed by the simulation seed. With access delays it gives a large simulation
    /// varied pair latencies (so "nearest" differs per pair) without a link per pair.
    pub fn set_pair_delay(&mut self, max: Duration) {
        let key = u64::from_le_bytes(
            self.seeds.derive(PAIR_DELAY_LABEL)[..8]
                .try_into()
                .expect("8 bytes"),
        );
        self.net.set_pair_delay(max, key);
    }

    /// Sets (or with `None` removes) the rate limit and queue of a public host's or
    /// NAT's uplink. Traffic that stays behind one NAT does not use it.
    pub fn set_uplink(&mut self, host: HostId, uplink: Option<Uplink>) -> Result<(), SimError> {
        self.net.set_uplink(host, uplink)
    }

    /// The live mappings of NAT `nat`.
    pub fn nat_mappings(&self, nat: HostId) -> Result<usize, SimError> {
        self.net.live_mappings(nat, self.now)
    }

    /// Cuts all traffic between hosts in `a` and hosts in `b`, both ways, from time
    /// `at` (now, if `at` has passed) until healed. A NAT in a set stands for every
    /// host behind it. Datagrams are checked when they arrive, so those in flight
    /// when the cut comes are lost too.
    pub fn cut(&mut self, at: Time, a: &[HostId], b: &[HostId]) -> Result<CutId, SimError> {
        let id = self.net.add_cut(a, b, true)?;
        self.schedule_cut(at, id, true);
        Ok(CutId(id))
    }

    /// Cuts traffic from hosts in `from` to hosts in `to` only (a one-way link
    /// failure), from time `at` until healed.
    pub fn cut_one_way(
        &mut self,
        at: Time,
        from: &[HostId],
        to: &[HostId],
    ) -> Result<CutId, SimError> {
        let id = self.net.add_cut(from, to, false)?;
        self.schedule_cut(at, id, true);
        Ok(CutId(id))
    }

    /// Heals `cut` at time `at` (now, if `at` has passed).
    pub fn heal(&mut self, at: Time, cut: CutId) -> Result<(), SimError> {
        self.net.check_cut(cut.0)?;
        self.schedule_cut(at, cut.0, false);
        Ok(())
    }

    fn schedule_cut(&mut self, at: Time, id: u32, active: bool) {
        if at <= self.now {
            self.net.set_cut_active(id, active);
        } else {
            let action = self.actions.insert(Action::Cut(id, active));
            self.queue.push(at, Due::Action(action));
        }
    }

    // ---- nodes ----------------------------------------------------------------

    /// Adds `node`, bound to `port` on `host`, online. Its outputs are drained and its
    /// first timer armed at once.
    pub fn add_node(&mut self, host: HostId, port: u16, node: N) -> Result<NodeId, SimError> {
        let id = NodeId(
            u32::try_from(self.nodes.len()).map_err(|_| SimError::Invalid {
                what: "node count",
                reason: "more than 2^32 nodes".into(),
            })?,
        );
        let addr = self.net.bind(host, port, id)?;
        self.nodes.push(Slot {
            node,
            host,
            addr,
            online: true,
            want: None,
            armed: Time::MAX,
            traffic: Traffic::default(),
        });
        self.after_input(id);
        Ok(id)
    }

    /// Node ids, in the order the nodes were added.
    pub fn node_ids(&self) -> impl ExactSizeIterator<Item = NodeId> + use<N> {
        (0..self.nodes.len() as u32).map(NodeId)
    }

    /// The node, for inspection. Change it through [`Sim::with_node`] so that its
    /// outputs are drained.
    pub fn node(&self, id: NodeId) -> &N {
        &self.nodes[id.index()].node
    }

    /// The address the node is bound to (a private address for hosts behind a NAT).
    pub fn addr(&self, id: NodeId) -> SocketAddr {
        SocketAddr::V4(self.nodes[id.index()].addr)
    }

    /// The fixed part of the one-way delay between nodes `a` and `b` (access and
    /// pair delays of their sites, without links' own delays or jitter).
    pub fn site_delay(&self, a: NodeId, b: NodeId) -> Duration {
        Duration::from_micros(self.net.site_delay(self.host_of(a), self.host_of(b)))
    }

    /// The host the node runs on.
    pub fn host_of(&self, id: NodeId) -> HostId {
        self.nodes[id.index()].host
    }

    /// The node's datagrams through the network so far.
    pub fn traffic(&self, id: NodeId) -> Traffic {
        self.nodes[id.index()].traffic
    }

    /// Whether the node is online.
    pub fn is_online(&self, id: NodeId) -> bool {
        self.nodes[id.index()].online
    }

    /// Runs a command on the node at the current time (for instance
    /// `|n, now| n.connect(now, contact)`), then drains its outputs as the driving
    /// contract requires. Returns what `f` returns.
    pub fn with_node<R>(&mut self, id: NodeId, f: impl FnOnce(&mut N, Time) -> R) -> R {
        let out = f(&mut self.nodes[id.index()].node, self.now);
        self.after_input(id);
        out
    }

    /// Runs a command on the node at time `at` (now, if `at` has passed, once the
    /// simulation next steps).
    pub fn schedule(&mut self, at: Time, id: NodeId, f: impl FnOnce(&mut N, Time) + 'static) {
        assert!(
            id.index() < self.nodes.len(),
            "{id:?} is not a node of this simulation"
        );
        let action = self.actions.insert(Action::Command(id, Box::new(f)));
        self.queue.push(at.max(self.now), Due::Action(action));
    }

    /// Takes the node off the network, keeping its state: datagrams to it are dropped,
    /// its timers do not run, and anything it sends is dropped. Bringing it back runs
    /// the timers that came due meanwhile.
    pub fn set_online(&mut self, id: NodeId, online: bool) {
        let slot = &mut self.nodes[id.index()];
        if slot.online != online {
            slot.online = online;
            if online {
                self.after_input(id);
            }
        }
    }

    /// Replaces the node's state machine (a restart at the same address) and returns
    /// the old one. Timers of the old one are forgotten.
    pub fn replace_node(&mut self, id: NodeId, node: N) -> N {
        let slot = &mut self.nodes[id.index()];
        let old = std::mem::replace(&mut slot.node, node);
        slot.armed = Time::MAX;
        slot.want = None;
        self.after_input(id);
        old
    }

    // ---- running --------------------------------------------------------------

    /// Processes the next event, moving the clock to its time. False when nothing
    /// is pending.
    pub fn step(&mut self) -> bool {
        let Some((at, due)) = self.queue.pop() else {
            return false;
        };
        self.now = self.now.max(at);
        self.processed += 1;
        match due {
            Due::Deliver(slot) => self.deliver(slot),
            Due::Timer(node) => self.fire(NodeId(node), at),
            Due::Action(action) => match self.actions.take(action) {
                Some(Action::Cut(id, active)) => self.net.set_cut_active(id, active),
                Some(Action::Command(id, f)) => {
                    f(&mut self.nodes[id.index()].node, self.now);
                    self.after_input(id);
                }
                None => {}
            },
        }
        true
    }

    /// Processes every event due up to and including `until`, then sets the clock
    /// to `until` (if it is later).
    pub fn run_until(&mut self, until: Time) {
        while self.queue.peek_time().is_some_and(|at| at <= until) {
            self.step();
        }
        self.now = self.now.max(until);
    }

    /// [`Sim::run_until`] `now + duration`.
    pub fn run_for(&mut self, duration: Duration) {
        self.run_until(self.now + duration);
    }

    /// Processes events until `done` holds (checked before the first and after every
    /// event) or the next event is later than `deadline`. True if `done` held; on
    /// false the clock is at `deadline`.
    pub fn run_until_pred(&mut self, deadline: Time, mut done: impl FnMut(&Self) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            if self.queue.peek_time().is_none_or(|at| at > deadline) {
                self.now = self.now.max(deadline);
                return done(self);
            }
            self.step();
        }
    }

    // ---- observation ----------------------------------------------------------

    /// Events recorded so far, in order.
    pub fn events(&self) -> &[Record<N::Event>] {
        &self.events
    }

    /// Takes the recorded events, leaving none.
    pub fn take_events(&mut self) -> Vec<Record<N::Event>> {
        std::mem::take(&mut self.events)
    }

    /// Whether node events are recorded (on by default). Off, they are drained and
    /// dropped, which large simulations that only read counters may prefer.
    pub fn record_events(&mut self, on: bool) {
        self.recording = on;
    }

    /// Network counters for the run so far.
    pub fn stats(&self) -> &NetStats {
        &self.net.stats
    }

    /// Datagrams on their way.
    pub fn in_flight(&self) -> usize {
        self.net.in_flight()
    }

    /// Events processed (deliveries, timers, scheduled actions) since the start.
    pub fn events_processed(&self) -> u64 {
        self.processed
    }

    // ---- the driving contract ---------------------------------------------------

    fn deliver(&mut self, slot: u32) {
        let Some(arrival) = self.net.arrive(self.now, slot) else {
            return;
        };
        let id = arrival.node;
        let s = &mut self.nodes[id.index()];
        if !s.online {
            self.net.stats.host_down += 1;
            return;
        }
        let len = arrival.bytes.len() as u64;
        self.net.stats.delivered += 1;
        self.net.stats.delivered_bytes += len;
        s.traffic.received += 1;
        s.traffic.received_bytes += len;
        s.node
            .handle_datagram(self.now, SocketAddr::V4(arrival.src), &arrival.bytes);
        self.after_input(id);
    }

    fn fire(&mut self, id: NodeId, at: Time) {
        let s = &mut self.nodes[id.index()];
        if at != s.armed {
            return;
        }
        s.armed = Time::MAX;
        if !s.online {
            return;
        }
        match s.want {
            Some(want) if want <= self.now => {
                s.node.handle_timeout(self.now);
                self.after_input(id);
            }
            Some(want) => self.arm(id, want),
            None => {}
        }
    }

    /// Drains the node's transmits and events and re-reads its timeout: what the
    /// driving contract asks after every input.
    fn after_input(&mut self, id: NodeId) {
        let now = self.now;
        let s = &mut self.nodes[id.index()];
        while let Some(Transmit { dest, bytes }) = s.node.poll_transmit() {
            if s.online {
                s.traffic.sent += 1;
                s.traffic.sent_bytes += bytes.len() as u64;
                self.net
                    .send(now, s.host, s.addr.port(), dest, bytes, &mut self.queue);
            } else {
                self.net.stats.sent += 1;
                self.net.stats.sent_bytes += bytes.len() as u64;
                self.net.stats.host_down += 1;
            }
        }
        while let Some(event) = s.node.poll_event() {
            if self.recording {
                self.events.push(Record {
                    at: now,
                    node: id,
                    event,
                });
            }
        }
        s.want = s.node.poll_timeout();
        if let Some(want) = s.want {
            self.arm(id, want);
        }
    }

    /// Makes sure a timer entry fires no later than `want`: pushes one only if `want`
    /// is earlier than the live entry, so a node that keeps moving its deadline later
    /// costs no queue growth (the early entry re-arms itself when it fires).
    fn arm(&mut self, id: NodeId, want: Time) {
        let s = &mut self.nodes[id.index()];
        if !s.online {
            return;
        }
        let at = want.max(self.now);
        if at < s.armed {
            s.armed = at;
            self.queue.push(at, Due::Timer(id.0));
        }
    }
}
