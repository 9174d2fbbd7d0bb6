//! The scale scenario behind `peercall sim`: thousands of real engine nodes (Noise
//! sessions, the overlay, STUN) on the virtual clock and the network emulator, with
//! WAN-like latencies, a NAT mix, seeds and elected supernodes, churn, lookups at a
//! steady rate, presence subscriptions, and optionally the loss of a share of the
//! supernodes or a synchronized restart of a share of the nodes.
//!
//! # Population
//! - `seeds` pinned supernodes (by default one per [`NODES_PER_SEED`] nodes, at
//!   least [`MIN_SEEDS`]) on public addresses; each knows a few others (a symmetric
//!   ring with chords, [`SEED_CHORDS`]) and learns the rest by gossip.
//! - The other nodes run with `role = auto`: [`PUBLIC_SHARE`] of them on public
//!   addresses, the rest behind their own NAT, the four RFC 4787 types in the
//!   shares of [`NAT_MIX`]. Each gets resources drawn at random (bandwidth
//!   log-uniform in 1-100 Mbit/s, CPU headroom 20-95%), so some qualify for
//!   promotion and the tier elects the rest of its supernodes. A fresh install's
//!   host cache holds [`SHIPPED_HOSTS`] seeds; a restarted node keeps its cache.
//! - Each node follows [`ScaleOptions::contacts`] random users' presence.
//!
//! # Network
//! One-way delay = a [`CORE_DELAY`] + both sites' access delays (uniform in
//! [`ACCESS_DELAY`]) + a fixed per-pair component (uniform in
//! `[0, PAIR_DELAY_MAX]`): 20-80 ms, about 50 ms on average. Random loss
//! [`ScaleOptions::loss`].
//!
//! # Timeline
//! Seeds start at 0; the other nodes join uniformly over the ramp (a tenth of the
//! run, between 5 and 30 s). Measurements (lookups, traffic, peak load) cover the
//! window from the end of [`ScaleOptions::warmup`] (default a quarter of the run)
//! to its end. Churn runs from the end of the ramp: at `churn` percent of the
//! non-seed nodes per minute, a random online one leaves (half of them gracefully,
//! half by crashing) and comes back, with the same identity and host cache, after
//! a downtime uniform in [`DOWNTIME`]. A kill or a restart storm strikes at half
//! the run. Lookups start at the window's start, at
//! [`ScaleOptions::lookups_per_s`], each by a random node online for at least
//! [`ASKER_SETTLE`] for a random online user who first came online at least
//! [`TARGET_SETTLE`] ago, by id or by handle in turn, and stop [`LOOKUP_TAIL`]
//! before the end so that every one finishes.
//!
//! # Recovery
//! After a strike, `strike_success_within_2s` is the share of lookups started
//! from [`RECOVERY`] after it that found the record within [`RECOVERY`], and
//! `recovery_s` the second after the strike from which every one-second bucket
//! has at least [`RECOVERED_SHARE`] of its lookups so found.
//!
//! With `SCALE_DEBUG` in the environment, failed and slow lookups are printed to
//! stderr (asker, target, homes, result), for diagnosis; with `SCALE_LAT`, every
//! lookup by id found is printed with the fastest its homes and the record's
//! storers allow on the emulated links (`ideal`), the round trip to its nearest
//! home and to the nearest supernode: where the time goes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use peercall_crypto::{Handle, Identity, UserId};
use peercall_engine::{Config, Contact, Event, Lookup, LookupError, Node, OverlayEvent, Role};
use peercall_overlay::{CachedHost, Capacity, ElectionConfig, OverlayConfig, RequestId, Resources};
use peercall_wire::Time;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use serde::Serialize;

use crate::{LinkConfig, NatConfig, NatType, NodeId, START, Sim, SimError};

/// Nodes per seed by default: operators run a few seeds (enough to hold every
/// node's two homes at full load while the network forms), the tier elects the
/// rest as load passes its high watermark.
pub const NODES_PER_SEED: usize = 100;
/// Seeds at least, so that the tier starts with the directory's three replicas.
pub const MIN_SEEDS: usize = 3;
/// Share of the non-seed nodes on public addresses: a minority of desktops.
pub const PUBLIC_SHARE: f64 = 0.2;
/// NAT types of the other nodes and their shares (most consumer NATs filter by
/// address and port; a fifth map per destination).
pub const NAT_MIX: [(NatType, f64); 4] = [
    (NatType::FullCone, 0.2),
    (NatType::AddressRestricted, 0.2),
    (NatType::PortRestricted, 0.4),
    (NatType::Symmetric, 0.2),
];
/// One-way delay of the core between any two sites.
pub const CORE_DELAY: Duration = Duration::from_millis(10);
/// Range of each site's access delay (at both ends of every path).
pub const ACCESS_DELAY: (Duration, Duration) =
    (Duration::from_millis(5), Duration::from_millis(20));
/// Largest per-pair delay component: with the above, one-way delays span 20-80 ms.
pub const PAIR_DELAY_MAX: Duration = Duration::from_millis(30);
/// Seeds in a fresh install's host cache.
pub const SHIPPED_HOSTS: usize = 8;
/// Each seed knows the seeds at these distances both ways around a ring (a
/// symmetric relation, since a seed admits joins only from seeds it knows).
pub const SEED_CHORDS: [usize; 4] = [1, 2, 7, 31];
/// Minimum uptime for promotion in the scenario: runs last minutes, not the hours
/// a deployment asks for (`peercall_overlay::config::DEFAULT_MIN_UPTIME`).
pub const SIM_MIN_UPTIME: Duration = Duration::from_secs(20);
/// How long a churned node stays away.
pub const DOWNTIME: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(90));
/// Share of churned nodes that leave gracefully (the rest crash).
pub const GRACEFUL_SHARE: f64 = 0.5;
/// No lookup starts this close to the end, so every one finishes (the overlay's
/// lookup timeout is 4 s).
pub const LOOKUP_TAIL: Duration = Duration::from_secs(5);
/// Presence changes not pushed within this long count as missed.
pub const PRESENCE_DEADLINE: Duration = Duration::from_secs(30);
/// Lookups after a strike are judged from this long after it ("≥ 99% within 2 s").
pub const RECOVERY: Duration = Duration::from_secs(2);
/// Lookups are asked by nodes online at least this long (time to attach).
pub const ASKER_SETTLE: Duration = Duration::from_secs(2);
/// Lookups are for users who first came online at least this long ago (time to
/// attach and publish once); a returning user's old record still answers.
pub const TARGET_SETTLE: Duration = Duration::from_secs(10);
/// Draws to find an asker or target that qualifies before the lookup is skipped.
const PICK_TRIES: usize = 64;
/// The share of lookups found within [`RECOVERY`] that counts as recovered.
pub const RECOVERED_SHARE: f64 = 0.99;
/// Lookups slower than this are printed with `SCALE_DEBUG` set.
const SLOW_LOOKUP: Duration = Duration::from_millis(600);
/// Port every node binds.
const PORT: u16 = 7600;
/// How often the runner samples supernode load and reports progress.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// What to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleOptions {
    /// Nodes in all, seeds included.
    pub nodes: usize,
    /// The simulation seed.
    pub seed: u64,
    /// Simulated time.
    pub duration: Duration,
    /// Percent of the non-seed nodes that leave (and later return) per minute.
    pub churn_pct_per_min: f64,
    /// Percent of the supernodes that crash at once at half the run (0: none).
    pub kill_supernodes_pct: f64,
    /// Percent of the ordinary nodes that restart at once at half the run (0: none).
    pub restart_storm_pct: f64,
    /// Lookups per second, all nodes together.
    pub lookups_per_s: f64,
    /// Simulated time before measurements start (the network forms, the tier
    /// elects its supernodes).
    pub warmup: Duration,
    /// Pinned seed supernodes.
    pub seeds: usize,
    /// Users each node follows.
    pub contacts: usize,
    /// Random loss on every path.
    pub loss: f64,
}

impl ScaleOptions {
    /// `nodes` nodes for `duration` from `seed`, with the defaults: no churn, kill
    /// or storm; one lookup per second per 500 nodes (at least 10); one seed per
    /// [`NODES_PER_SEED`] nodes; three contacts each; 0.1% loss.
    pub fn new(nodes: usize, seed: u64, duration: Duration) -> ScaleOptions {
        ScaleOptions {
            nodes,
            seed,
            duration,
            churn_pct_per_min: 0.0,
            kill_supernodes_pct: 0.0,
            restart_storm_pct: 0.0,
            lookups_per_s: (nodes as f64 / 500.0).max(10.0),
            warmup: duration / 4,
            seeds: nodes.div_ceil(NODES_PER_SEED).max(MIN_SEEDS),
            contacts: 3,
            loss: 0.001,
        }
    }

    /// Checks the options, naming the bad one.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |what, reason: &str| {
            Err(SimError::Invalid {
                what,
                reason: reason.into(),
            })
        };
        if self.seeds < MIN_SEEDS || self.seeds >= self.nodes {
            return bad("seeds", "at least 3 and fewer than the nodes");
        }
        if self.nodes > 1_000_000 {
            return bad("nodes", "at most 1,000,000 (addresses are numbered)");
        }
        if self.duration < Duration::from_secs(20) {
            return bad("duration", "at least 20 simulated seconds");
        }
        if self.warmup + LOOKUP_TAIL >= self.duration {
            return bad("warmup", "shorter than the duration less 5 s");
        }
        let pct = |p: f64| (0.0..=100.0).contains(&p);
        if !pct(self.churn_pct_per_min) {
            return bad("churn", "a percentage in 0..=100");
        }
        if !pct(self.kill_supernodes_pct) || !pct(self.restart_storm_pct) {
            return bad("kill-supernodes/restart-storm", "a percentage in 0..=100");
        }
        if !(self.lookups_per_s > 0.0 && self.lookups_per_s <= 100_000.0) {
            return bad("lookups_per_s", "positive, at most 100,000");
        }
        if !(0.0..1.0).contains(&self.loss) {
            return bad("loss", "a probability below 1");
        }
        Ok(())
    }
}

/// What a run measured. Latencies in milliseconds, rates in `[0, 1]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ScaleReport {
    /// The simulation seed.
    pub seed: u64,
    /// Nodes in all.
    pub nodes: usize,
    /// Pinned seeds among them.
    pub seeds: usize,
    /// Simulated seconds.
    pub duration_s: f64,
    /// Online supernodes at the end.
    pub supernodes: usize,
    /// Supernodes over online nodes at the end.
    pub supernode_ratio: f64,
    /// Online nodes at the end.
    pub online: usize,
    /// Lookups started in the measurement window.
    pub lookups: u64,
    /// Share of them that found the user's record.
    pub lookup_success_rate: f64,
    /// Lookups answered "not found".
    pub lookups_not_found: u64,
    /// Lookups that timed out (or had no home to ask).
    pub lookups_failed: u64,
    /// 99th percentile of overlay hops beyond the home supernode.
    pub lookup_hops_p99: u8,
    /// Median lookup latency of the successes.
    pub lookup_ms_p50: f64,
    /// 99th percentile lookup latency of the successes.
    pub lookup_ms_p99: f64,
    /// 95th percentile delay of presence pushes after graceful leaves and returns.
    pub presence_ms_p95: f64,
    /// Presence changes measured.
    pub presence_samples: u64,
    /// Presence changes not pushed within [`PRESENCE_DEADLINE`].
    pub presence_missed: u64,
    /// Peak of clients over capacity of any supernode, sampled every second.
    pub max_supernode_load_ratio: f64,
    /// Mean supernode load at the end.
    pub mean_supernode_load_ratio: f64,
    /// Nodes that became supernodes (promotions).
    pub promotions: u64,
    /// Supernodes that handed off and became ordinary (demotions).
    pub demotions: u64,
    /// Traffic (sent and received, UDP payload) per ordinary node per second over
    /// the window, among nodes online and ordinary throughout it: upkeep, plus the
    /// few lookups they made.
    pub bytes_per_node_per_s: f64,
    /// Records held by all supernodes at the end (copies, handle placements
    /// included).
    pub records_stored: u64,
    /// Churn departures.
    pub churn_leaves: u64,
    /// When the kill or storm struck (simulated seconds), if one did.
    pub strike_at_s: Option<f64>,
    /// Supernodes killed or nodes restarted by the strike.
    pub struck: usize,
    /// Share of lookups started from [`RECOVERY`] after the strike that found the
    /// record within [`RECOVERY`].
    pub strike_success_within_2s: Option<f64>,
    /// Per second after the strike (its first 30 s): lookups started, and the
    /// share that found the record within [`RECOVERY`].
    pub strike_timeline: Vec<(u64, f64)>,
    /// Seconds after the strike from which every second of the timeline has at
    /// least [`RECOVERED_SHARE`] of its lookups found within [`RECOVERY`] (0: it
    /// never dipped).
    pub recovery_s: Option<f64>,
    /// Simulator events processed.
    pub sim_events: u64,
}

/// A progress snapshot, handed to the caller's callback every simulated second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Simulated seconds so far.
    pub sim_s: f64,
    /// Online nodes.
    pub online: usize,
    /// Online supernodes.
    pub supernodes: usize,
    /// Lookups started and finished so far.
    pub lookups: u64,
    /// Of which found.
    pub found: u64,
    /// Simulator events processed so far.
    pub events: u64,
    /// Online ordinary nodes with no, one, and two (or more) homes.
    pub homes: [usize; 3],
    /// Mean load of the online supernodes.
    pub mean_load: f64,
}

/// Things the scenario does at given times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    Join(usize),
    Lookup,
    Churn,
    Return(usize),
    Strike,
    Sample,
    Offline(usize),
}

struct PendingLookup {
    started: Time,
    target: usize,
    by_handle: bool,
}

#[derive(Default)]
struct Tally {
    started: u64,
    found: u64,
    not_found: u64,
    failed: u64,
    ms: Vec<f64>,
    hops: Vec<u8>,
}

struct Scenario<'a> {
    opts: &'a ScaleOptions,
    sim: Sim<Node>,
    rng: ChaCha20Rng,
    ids: Vec<Identity>,
    handles: Vec<Handle>,
    nodes: Vec<Option<NodeId>>,
    hosts: Vec<crate::HostId>,
    resources: Vec<Resources>,
    incarnation: Vec<u32>,
    contacts: Vec<Vec<usize>>,
    followers: Vec<Vec<usize>>,
    seed_contacts: Vec<Contact>,
    /// Online nodes, and each node's position in it (`usize::MAX`: offline).
    online: Vec<usize>,
    online_pos: Vec<usize>,
    /// When each node last started, and first started (`Time::MAX`: never).
    online_since: Vec<Time>,
    first_online: Vec<Time>,
    supernode: Vec<bool>,
    /// Nodes replaced, offline or promoted during the window: not counted for upkeep.
    disturbed: Vec<bool>,
    agenda: BinaryHeap<Reverse<(Time, u64, Action)>>,
    agenda_seq: u64,
    lookups: HashMap<(u32, RequestId), PendingLookup>,
    tally: Tally,
    all_lookups: (u64, u64),
    presence_pending: HashMap<(usize, usize), (Time, bool)>,
    presence_ms: Vec<f64>,
    presence_missed: u64,
    promotions: u64,
    demotions: u64,
    peak_load: f64,
    churn_leaves: u64,
    window_start: Time,
    end: Time,
    strike: Option<Time>,
    struck: usize,
    strike_lookups: Vec<(Time, Option<Duration>)>,
    traffic_at_window: Vec<u64>,
    traffic_since: Time,
    by_handle: bool,
    /// Scenario index of each simulator node.
    index_of: Vec<usize>,
    by_user: HashMap<UserId, usize>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn uniform(rng: &mut ChaCha20Rng, lo: Duration, hi: Duration) -> Duration {
    let span = (hi - lo).as_micros() as u64;
    lo + Duration::from_micros(if span == 0 {
        0
    } else {
        rng.next_u64() % (span + 1)
    })
}

fn unit(rng: &mut ChaCha20Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn below(rng: &mut ChaCha20Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

/// The value at quantile `q` of `xs` (sorted in place); NaN when empty.
pub fn percentile(xs: &mut [f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let i = ((xs.len() as f64 - 1.0) * q).round() as usize;
    xs[i.min(xs.len() - 1)]
}

/// Runs the scenario; `progress` is called every simulated second.
pub fn run(
    opts: &ScaleOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ScaleReport, SimError> {
    opts.validate()?;
    let mut s = Scenario::new(opts)?;
    s.run(progress)?;
    Ok(s.report())
}

impl<'a> Scenario<'a> {
    fn new(opts: &'a ScaleOptions) -> Result<Scenario<'a>, SimError> {
        let mut sim: Sim<Node> = Sim::new(opts.seed);
        sim.set_default_link(LinkConfig {
            loss: opts.loss,
            ..LinkConfig::new(CORE_DELAY)
        })?;
        sim.set_pair_delay(PAIR_DELAY_MAX);
        let rng = ChaCha20Rng::from_seed(sim.derive_seed(u64::MAX - 1));
        let n = opts.nodes;
        let ids: Vec<Identity> = (0..n)
            .map(|i| Identity::from_seed(sim.derive_seed(i as u64)))
            .collect();
        let handles = (0..n)
            .map(|i| Handle::new(&format!("u{i}")).expect("short ascii handles are valid"))
            .collect();
        let end = START + opts.duration;
        let window_start = START + opts.warmup;
        let mut s = Scenario {
            opts,
            sim,
            rng,
            ids,
            handles,
            nodes: vec![None; n],
            hosts: Vec::with_capacity(n),
            resources: Vec::with_capacity(n),
            incarnation: vec![0; n],
            contacts: vec![Vec::new(); n],
            followers: vec![Vec::new(); n],
            seed_contacts: Vec::new(),
            online: Vec::with_capacity(n),
            online_pos: vec![usize::MAX; n],
            online_since: vec![Time::MAX; n],
            first_online: vec![Time::MAX; n],
            supernode: vec![false; n],
            disturbed: vec![false; n],
            agenda: BinaryHeap::new(),
            agenda_seq: 0,
            lookups: HashMap::new(),
            tally: Tally::default(),
            all_lookups: (0, 0),
            presence_pending: HashMap::new(),
            presence_ms: Vec::new(),
            presence_missed: 0,
            promotions: 0,
            demotions: 0,
            peak_load: 0.0,
            churn_leaves: 0,
            window_start,
            end,
            strike: None,
            struck: 0,
            strike_lookups: Vec::new(),
            traffic_at_window: Vec::new(),
            traffic_since: end,
            by_handle: false,
            index_of: Vec::with_capacity(n),
            by_user: HashMap::with_capacity(n),
        };
        for i in 0..n {
            s.by_user.insert(s.ids[i].user_id(), i);
        }
        s.build()?;
        Ok(s)
    }

    fn schedule(&mut self, at: Time, action: Action) {
        self.agenda_seq += 1;
        self.agenda.push(Reverse((at, self.agenda_seq, action)));
    }

    fn public_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::from_bits(0x2000_0000 + i as u32)
    }

    /// Hosts for every node, seed contacts, resources, contacts, and the agenda.
    fn build(&mut self) -> Result<(), SimError> {
        let opts = self.opts;
        let n = opts.nodes;
        for i in 0..n {
            let access = uniform(&mut self.rng, ACCESS_DELAY.0, ACCESS_DELAY.1);
            let public = i < opts.seeds || unit(&mut self.rng) < PUBLIC_SHARE;
            let host = if public {
                let h = self.sim.add_host(Self::public_ip(i))?;
                self.sim.set_access_delay(h, access)?;
                h
            } else {
                let mut pick = unit(&mut self.rng);
                let mut kind = NatType::PortRestricted;
                for (t, share) in NAT_MIX {
                    if pick < share {
                        kind = t;
                        break;
                    }
                    pick -= share;
                }
                let nat = self.sim.add_nat(
                    Ipv4Addr::from_bits(0x3000_0000 + i as u32),
                    NatConfig::new(kind),
                )?;
                self.sim.set_access_delay(nat, access)?;
                self.sim
                    .add_private_host(nat, Ipv4Addr::from_bits(0x0a00_0000 + i as u32))?
            };
            self.hosts.push(host);
            // Bandwidth log-uniform in 1-100 Mbit/s; CPU headroom 20-95%.
            let mbps = 10f64.powf(2.0 * unit(&mut self.rng));
            self.resources.push(Resources {
                bandwidth_kbps: (mbps * 1000.0) as u32,
                cpu_headroom_pct: 20 + (unit(&mut self.rng) * 75.0) as u8,
            });
        }
        self.seed_contacts = (0..opts.seeds)
            .map(|i| Contact {
                addr: SocketAddr::from((Self::public_ip(i), PORT)),
                key: Some(self.ids[i].peer_key()),
            })
            .collect();
        for i in 0..n {
            for _ in 0..opts.contacts {
                let c = below(&mut self.rng, n);
                if c != i && !self.contacts[i].contains(&c) {
                    self.contacts[i].push(c);
                    self.followers[c].push(i);
                }
            }
        }
        for i in 0..opts.seeds {
            self.schedule(START, Action::Join(i));
        }
        let ramp = (opts.duration / 10).clamp(Duration::from_secs(5), Duration::from_secs(30));
        let others = n - opts.seeds;
        for (k, i) in (opts.seeds..n).enumerate() {
            let at = START + ramp.mul_f64(k as f64 / others as f64);
            self.schedule(at, Action::Join(i));
        }
        self.schedule(self.window_start, Action::Lookup);
        if opts.churn_pct_per_min > 0.0 {
            self.schedule(START + ramp, Action::Churn);
        }
        if opts.kill_supernodes_pct > 0.0 || opts.restart_storm_pct > 0.0 {
            self.schedule(START + opts.duration / 2, Action::Strike);
        }
        self.schedule(START + SAMPLE_INTERVAL, Action::Sample);
        Ok(())
    }

    fn make_node(&mut self, i: usize, host_cache: Vec<CachedHost>) -> Node {
        let opts = self.opts;
        let label = (1u64 << 40) + (i as u64) * 4096 + u64::from(self.incarnation[i]);
        let mut config = Config::new(self.ids[i].clone(), self.sim.derive_seed(label));
        let seed = i < opts.seeds;
        let addr = if seed {
            SocketAddr::from((Self::public_ip(i), PORT))
        } else {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT))
        };
        let mut cache = host_cache;
        if seed {
            config.role = Role::Supernode;
            let s = opts.seeds;
            let mut peers: Vec<usize> = Vec::new();
            for c in SEED_CHORDS {
                for j in [(i + c) % s, (i + s - c % s) % s] {
                    if j != i && !peers.contains(&j) {
                        peers.push(j);
                    }
                }
            }
            config.seeds = peers.iter().map(|&j| self.seed_contacts[j]).collect();
        } else {
            config.role = Role::Auto;
            if cache.is_empty() {
                for _ in 0..SHIPPED_HOSTS {
                    let j = below(&mut self.rng, opts.seeds);
                    let c = self.seed_contacts[j];
                    if !cache.iter().any(|h| h.addr == c.addr) {
                        cache.push(CachedHost {
                            key: c.key.expect("seed keys are known"),
                            addr: c.addr,
                            last_seen: self.sim.now(),
                        });
                    }
                }
            }
        }
        config.overlay = OverlayConfig {
            host_cache: cache,
            handle: Some(self.handles[i].clone()),
            local_addrs: if seed { vec![addr] } else { Vec::new() },
            capacity: Capacity {
                max_clients: peercall_overlay::config::DEFAULT_MAX_CLIENTS,
                attach_rate: peercall_overlay::config::DEFAULT_ATTACH_RATE,
                attach_burst: peercall_overlay::config::DEFAULT_ATTACH_BURST,
            },
            resources: self.resources[i],
            election: ElectionConfig {
                min_uptime: SIM_MIN_UPTIME,
                ..ElectionConfig::default()
            },
            ..OverlayConfig::default()
        };
        Node::new(config, self.sim.now())
    }

    fn set_online(&mut self, i: usize, on: bool) {
        if on && self.online_pos[i] == usize::MAX {
            self.online_pos[i] = self.online.len();
            self.online.push(i);
        } else if !on && self.online_pos[i] != usize::MAX {
            let p = self.online_pos[i];
            self.online.swap_remove(p);
            if p < self.online.len() {
                let moved = self.online[p];
                self.online_pos[moved] = p;
            }
            self.online_pos[i] = usize::MAX;
            self.supernode[i] = false;
        }
    }

    /// Starts (or restarts) node `i` now with `cache`.
    fn start(&mut self, i: usize, cache: Vec<CachedHost>) -> Result<(), SimError> {
        self.incarnation[i] += 1;
        let node = self.make_node(i, cache);
        let id = match self.nodes[i] {
            Some(id) => {
                self.forget_lookups_of(id);
                self.sim.replace_node(id, node);
                self.sim.set_online(id, true);
                id
            }
            None => {
                let id = self.sim.add_node(self.hosts[i], PORT, node)?;
                self.nodes[i] = Some(id);
                debug_assert_eq!(self.index_of.len(), id.index());
                self.index_of.push(i);
                id
            }
        };
        self.set_online(i, true);
        let now = self.sim.now();
        self.online_since[i] = now;
        if self.first_online[i] == Time::MAX {
            self.first_online[i] = now;
        }
        self.supernode[i] = i < self.opts.seeds;
        let contacts: Vec<UserId> = self.contacts[i]
            .iter()
            .map(|&c| self.ids[c].user_id())
            .collect();
        self.sim.with_node(id, |n, now| n.subscribe(now, &contacts));
        Ok(())
    }

    fn forget_lookups_of(&mut self, id: NodeId) {
        let gone: Vec<(u32, RequestId)> = self
            .lookups
            .keys()
            .filter(|k| k.0 == id.0)
            .copied()
            .collect();
        for k in gone {
            if self.lookups.remove(&k).is_some() {
                // The asker went away: the lookup is not judged.
                self.tally.started -= 1;
            }
        }
    }

    fn run(&mut self, progress: &mut dyn FnMut(&Progress)) -> Result<(), SimError> {
        while let Some(Reverse((at, _, action))) = self.agenda.pop() {
            if at > self.end {
                break;
            }
            self.sim.run_until(at);
            self.drain_events();
            self.act(at, action, progress)?;
        }
        self.sim.run_until(self.end);
        self.drain_events();
        Ok(())
    }

    fn act(
        &mut self,
        now: Time,
        action: Action,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(), SimError> {
        match action {
            Action::Join(i) => self.start(i, Vec::new())?,
            Action::Lookup => {
                self.issue_lookup(now);
                let gap = Duration::from_secs_f64(1.0 / self.opts.lookups_per_s);
                if now + gap + LOOKUP_TAIL <= self.end {
                    self.schedule(now + gap, Action::Lookup);
                }
            }
            Action::Churn => {
                self.churn(now);
                let non_seeds = (self.opts.nodes - self.opts.seeds) as f64;
                let per_s = non_seeds * self.opts.churn_pct_per_min / 100.0 / 60.0;
                let gap = Duration::from_secs_f64(1.0 / per_s);
                self.schedule(now + gap, Action::Churn);
            }
            Action::Return(i) => {
                let id = self.nodes[i].expect("a returning node was started before");
                let cache = self.sim.node(id).host_cache().to_vec();
                self.start(i, cache)?;
                self.expect_presence(i, true);
            }
            Action::Offline(i) => {
                if let Some(id) = self.nodes[i] {
                    self.sim.set_online(id, false);
                }
            }
            Action::Strike => self.strike(now)?,
            Action::Sample => {
                self.sample(now);
                let mut homes = [0usize; 3];
                let (mut load, mut supers) = (0.0, 0usize);
                for &i in &self.online {
                    let o = self.sim.node(self.nodes[i].expect("online")).overlay();
                    if self.supernode[i] {
                        let st = o.stats();
                        load += st.clients as f64 / st.capacity.max(1) as f64;
                        supers += 1;
                    } else {
                        homes[o.home_count().min(2)] += 1;
                    }
                }
                if std::env::var_os("SCALE_DEBUG").is_some() {
                    // How complete the supernodes' views of the tier are.
                    let (mut min, mut sum) = (u64::MAX, 0u64);
                    for &i in &self.online {
                        if self.supernode[i] {
                            let m = self
                                .sim
                                .node(self.nodes[i].expect("online"))
                                .overlay()
                                .stats()
                                .members;
                            min = min.min(m);
                            sum += m;
                        }
                    }
                    eprintln!(
                        "DEBUG views: {} supernodes know {} on average, {} at least",
                        supers,
                        sum / supers.max(1) as u64,
                        min
                    );
                }
                progress(&Progress {
                    homes,
                    mean_load: load / supers.max(1) as f64,
                    sim_s: now.saturating_since(START).as_secs_f64(),
                    online: self.online.len(),
                    supernodes: self.supernode.iter().filter(|&&s| s).count(),
                    lookups: self.all_lookups.0,
                    found: self.all_lookups.1,
                    events: self.sim.events_processed(),
                });
                self.schedule(now + SAMPLE_INTERVAL, Action::Sample);
            }
        }
        Ok(())
    }

    fn issue_lookup(&mut self, now: Time) {
        if self.online.len() < 2 {
            return;
        }
        // An asker online for a moment (it has had the time to attach); a target
        // that has had the time to publish once (a node that has not cannot be
        // found, and that says nothing about the directory).
        let Some(from) = self.pick_online(now, |s, i| s.online_since[i] + ASKER_SETTLE <= now)
        else {
            return;
        };
        let Some(to) = self.pick_online(now, |s, i| s.first_online[i] + TARGET_SETTLE <= now)
        else {
            return;
        };
        self.by_handle = !self.by_handle;
        let what = if self.by_handle {
            Lookup::Handle(self.handles[to].clone())
        } else {
            Lookup::User(self.ids[to].user_id())
        };
        let id = self.nodes[from].expect("online nodes exist");
        let req = self.sim.with_node(id, |n, now| n.lookup(now, what));
        self.tally.started += 1;
        self.lookups.insert(
            (id.0, req),
            PendingLookup {
                started: now,
                target: to,
                by_handle: self.by_handle,
            },
        );
        // Answers produced synchronously (a supernode's own cache) come as events.
        self.drain_events();
    }

    /// A random online node meeting `ok`, if one turns up in a few draws.
    fn pick_online(&mut self, _now: Time, ok: impl Fn(&Self, usize) -> bool) -> Option<usize> {
        for _ in 0..PICK_TRIES {
            let i = self.online[below(&mut self.rng, self.online.len())];
            if ok(self, i) {
                return Some(i);
            }
        }
        None
    }

    fn churn(&mut self, now: Time) {
        let candidates = self.online.len();
        if candidates == 0 {
            return;
        }
        // A random online non-seed node.
        let mut pick = None;
        for _ in 0..16 {
            let i = self.online[below(&mut self.rng, candidates)];
            if i >= self.opts.seeds {
                pick = Some(i);
                break;
            }
        }
        let Some(i) = pick else { return };
        let id = self.nodes[i].expect("online nodes exist");
        self.churn_leaves += 1;
        self.disturbed[i] = true;
        if unit(&mut self.rng) < GRACEFUL_SHARE {
            self.sim.with_node(id, |n, now| n.close(now));
            self.expect_presence(i, false);
            // The process lingers a moment to send its goodbyes, then exits.
            self.schedule(now + Duration::from_secs(1), Action::Offline(i));
        } else {
            self.sim.set_online(id, false);
        }
        self.set_online(i, false);
        let back = uniform(&mut self.rng, DOWNTIME.0, DOWNTIME.1);
        self.schedule(now + back, Action::Return(i));
    }

    /// Followers of `i` online now should hear it is `online` (from now).
    fn expect_presence(&mut self, i: usize, online: bool) {
        let now = self.sim.now();
        if now < self.window_start {
            return;
        }
        for k in 0..self.followers[i].len() {
            let f = self.followers[i][k];
            if self.online_pos[f] != usize::MAX {
                self.presence_pending.insert((f, i), (now, online));
            }
        }
    }

    fn strike(&mut self, now: Time) -> Result<(), SimError> {
        self.strike = Some(now);
        if self.opts.kill_supernodes_pct > 0.0 {
            let mut supers: Vec<usize> = self
                .online
                .iter()
                .copied()
                .filter(|&i| self.supernode[i])
                .collect();
            supers.sort_unstable();
            let k =
                ((supers.len() as f64) * self.opts.kill_supernodes_pct / 100.0).round() as usize;
            for _ in 0..k {
                let j = below(&mut self.rng, supers.len());
                let i = supers.swap_remove(j);
                let id = self.nodes[i].expect("online");
                self.sim.set_online(id, false);
                self.set_online(i, false);
                self.disturbed[i] = true;
                self.struck += 1;
            }
        }
        if self.opts.restart_storm_pct > 0.0 {
            let mut ordinary: Vec<usize> = self
                .online
                .iter()
                .copied()
                .filter(|&i| !self.supernode[i])
                .collect();
            ordinary.sort_unstable();
            let k =
                ((ordinary.len() as f64) * self.opts.restart_storm_pct / 100.0).round() as usize;
            for _ in 0..k {
                let j = below(&mut self.rng, ordinary.len());
                let i = ordinary.swap_remove(j);
                let id = self.nodes[i].expect("online");
                let cache = self.sim.node(id).host_cache().to_vec();
                self.disturbed[i] = true;
                self.start(i, cache)?;
                self.struck += 1;
            }
        }
        Ok(())
    }

    fn sample(&mut self, now: Time) {
        if self.traffic_at_window.is_empty() && now >= self.window_start {
            self.traffic_since = now;
            self.traffic_at_window = self
                .nodes
                .iter()
                .map(|id| {
                    id.map_or(0, |id| {
                        let t = self.sim.traffic(id);
                        t.sent_bytes + t.received_bytes
                    })
                })
                .collect();
            for i in 0..self.opts.nodes {
                if self.supernode[i] || self.online_pos[i] == usize::MAX {
                    self.disturbed[i] = true;
                }
            }
        }
        if now < self.window_start {
            return;
        }
        for k in 0..self.online.len() {
            let i = self.online[k];
            if !self.supernode[i] {
                continue;
            }
            let id = self.nodes[i].expect("online");
            let st = self.sim.node(id).overlay().stats();
            if st.capacity > 0 {
                self.peak_load = self.peak_load.max(st.clients as f64 / st.capacity as f64);
            }
        }
        // Presence changes overdue are missed.
        let overdue: Vec<(usize, usize)> = self
            .presence_pending
            .iter()
            .filter(|(_, (at, _))| now.saturating_since(*at) > PRESENCE_DEADLINE)
            .map(|(k, _)| *k)
            .collect();
        for k in overdue {
            self.presence_pending.remove(&k);
            self.presence_missed += 1;
        }
    }

    fn drain_events(&mut self) {
        for r in self.sim.take_events() {
            let Event::Overlay(e) = r.event else { continue };
            match e {
                OverlayEvent::LookupDone { id, result } => {
                    let Some(p) = self.lookups.remove(&(r.node.0, id)) else {
                        continue;
                    };
                    let target_user = self.ids[p.target].user_id();
                    let took = r.at.saturating_since(p.started);
                    let ok = matches!(&result, Ok(f) if f.record.user_id() == target_user);
                    self.all_lookups.0 += 1;
                    self.all_lookups.1 += u64::from(ok);
                    if let Some(s) = self.strike
                        && p.started >= s
                    {
                        self.strike_lookups.push((p.started, ok.then_some(took)));
                    }
                    if (!ok || took > SLOW_LOOKUP) && std::env::var_os("SCALE_DEBUG").is_some() {
                        let asker = self.node_index(r.node);
                        eprintln!(
                            "DEBUG {} t={:.3} took={:?} asker={} homes={} sn={} target={} tsn={} online={} res={:?} asker_up={:?}",
                            if ok { "slow" } else { "fail" },
                            p.started.saturating_since(START).as_secs_f64(),
                            took,
                            asker,
                            self.sim.node(r.node).overlay().home_count(),
                            self.supernode[asker],
                            p.target,
                            self.supernode[p.target],
                            self.online_pos[p.target] != usize::MAX,
                            result.as_ref().map(|f| f.hops),
                            p.started.saturating_since(self.online_since[asker]),
                        );
                        if !ok {
                            self.debug_placement(r.node, p.target);
                        }
                    }
                    if ok && !p.by_handle && std::env::var_os("SCALE_LAT").is_some() {
                        self.print_ideal(r.node, p.target, took);
                    }
                    match result {
                        Ok(f) if ok => {
                            self.tally.found += 1;
                            self.tally.ms.push(ms(took));
                            self.tally.hops.push(f.hops);
                        }
                        Ok(_) => self.tally.failed += 1,
                        Err(LookupError::NotFound) => self.tally.not_found += 1,
                        Err(_) => self.tally.failed += 1,
                    }
                }
                OverlayEvent::Presence { user, online, .. } => {
                    let f = self.node_index(r.node);
                    let Some(t) = self.user_index(&user) else {
                        continue;
                    };
                    if let Some(&(at, want)) = self.presence_pending.get(&(f, t))
                        && want == online
                        && r.at >= at
                    {
                        self.presence_pending.remove(&(f, t));
                        self.presence_ms.push(ms(r.at.saturating_since(at)));
                    }
                }
                OverlayEvent::RoleChanged { supernode } => {
                    let i = self.node_index(r.node);
                    if supernode {
                        self.promotions += 1;
                        self.disturbed[i] = true;
                    } else {
                        self.demotions += 1;
                    }
                    self.supernode[i] = supernode;
                }
                _ => {}
            }
        }
    }

    /// The online supernodes by static key, for the diagnostics.
    fn online_supernodes(&self) -> HashMap<peercall_crypto::PeerKey, usize> {
        self.online
            .iter()
            .filter(|&&i| self.supernode[i])
            .map(|&i| (self.ids[i].peer_key(), i))
            .collect()
    }

    /// For `SCALE_LAT`: how long a lookup took against the fastest its homes and
    /// the record's storers allow, and the round trips to its nearest home and to
    /// the nearest supernode.
    fn print_ideal(&self, asker_id: NodeId, target: usize, took: Duration) {
        let by_key = self.online_supernodes();
        let key_index = |k: &peercall_crypto::PeerKey| by_key.get(k).copied();
        let asker = self.node_index(asker_id);
        let homes: Vec<usize> = self
            .sim
            .node(asker_id)
            .overlay()
            .homes()
            .iter()
            .filter_map(|(k, _)| key_index(k))
            .collect();
        let Some(h0) = homes.first().and_then(|&h| self.nodes[h]) else {
            return;
        };
        let user = self.ids[target].user_id();
        let storers: Vec<usize> = self
            .sim
            .node(h0)
            .overlay()
            .storers_of(&user)
            .iter()
            .filter_map(key_index)
            .collect();
        let d = |a: usize, b: usize| -> f64 {
            if a == b {
                return 0.0;
            }
            match (self.nodes[a], self.nodes[b]) {
                (Some(x), Some(y)) => ms(CORE_DELAY + self.sim.site_delay(x, y)),
                _ => f64::INFINITY,
            }
        };
        let via = |h: usize| {
            2.0 * d(asker, h)
                + storers
                    .iter()
                    .map(|&s| 2.0 * d(h, s))
                    .fold(f64::INFINITY, f64::min)
        };
        let ideal = homes.iter().map(|&h| via(h)).fold(f64::INFINITY, f64::min);
        let home_rtt = homes
            .iter()
            .map(|&h| 2.0 * d(asker, h))
            .fold(f64::INFINITY, f64::min);
        let mut all: Vec<f64> = (0..self.ids.len())
            .filter(|&h| self.supernode[h] && self.online_pos[h] != usize::MAX)
            .map(|h| 2.0 * d(asker, h))
            .collect();
        all.sort_by(f64::total_cmp);
        eprintln!(
            "LAT took={:.1} ideal={ideal:.1} home_rtt={home_rtt:.1} best_rtt={:.1} homes={} storers={}",
            ms(took),
            all.first().copied().unwrap_or(f64::NAN),
            homes.len(),
            storers.len()
        );
    }

    /// For `SCALE_DEBUG`: where the asker's homes place `target`'s record, and
    /// which supernodes hold a copy.
    fn debug_placement(&self, asker: NodeId, target: usize) {
        let user = self.ids[target].user_id();
        let by_key = self.online_supernodes();
        let idx = |k: &peercall_crypto::PeerKey| by_key.get(k).copied();
        let holders: Vec<usize> = by_key
            .values()
            .copied()
            .filter(|&i| {
                self.sim
                    .node(self.nodes[i].expect("online"))
                    .overlay()
                    .stores(&user)
            })
            .collect();
        let homes: Vec<String> = self
            .sim
            .node(asker)
            .overlay()
            .homes()
            .iter()
            .map(|(k, _)| match idx(k) {
                Some(h) => {
                    let o = self.sim.node(self.nodes[h].expect("online")).overlay();
                    let st: Vec<Option<usize>> = o.storers_of(&user).iter().map(idx).collect();
                    format!("home {h} ({} members) places at {st:?}", o.stats().members)
                }
                None => "home not an online supernode".into(),
            })
            .collect();
        let thomes: Vec<Option<usize>> = self
            .sim
            .node(self.nodes[target].expect("online"))
            .overlay()
            .homes()
            .iter()
            .map(|(k, _)| idx(k))
            .collect();
        eprintln!(
            "DEBUG   held by {holders:?}; target homes {thomes:?}; {}",
            homes.join("; ")
        );
    }

    fn node_index(&self, id: NodeId) -> usize {
        self.index_of[id.index()]
    }

    fn user_index(&self, user: &UserId) -> Option<usize> {
        self.by_user.get(user).copied()
    }

    fn report(&mut self) -> ScaleReport {
        let opts = self.opts;
        let end = self.end;
        let window = end.saturating_since(self.traffic_since).as_secs_f64();
        // Upkeep among nodes undisturbed through the window.
        let mut bytes = 0u64;
        let mut counted = 0u64;
        for i in 0..opts.nodes {
            if self.disturbed[i] || self.supernode[i] || self.online_pos[i] == usize::MAX {
                continue;
            }
            let Some(id) = self.nodes[i] else { continue };
            let t = self.sim.traffic(id);
            let before = self.traffic_at_window.get(i).copied().unwrap_or(0);
            bytes += (t.sent_bytes + t.received_bytes).saturating_sub(before);
            counted += 1;
        }
        let supers: Vec<usize> = self
            .online
            .iter()
            .copied()
            .filter(|&i| self.supernode[i])
            .collect();
        let mut records = 0u64;
        let mut load = 0.0;
        for &i in &supers {
            let st = self
                .sim
                .node(self.nodes[i].expect("online"))
                .overlay()
                .stats();
            records += st.records;
            load += st.clients as f64 / st.capacity.max(1) as f64;
        }
        if std::env::var_os("SCALE_DEBUG").is_some() {
            let (mut sum, mut n, mut unknown) = (0.0, 0u64, 0u64);
            let mut hist = [0u64; 8];
            for &i in &self.online {
                if self.supernode[i] {
                    continue;
                }
                let o = self.sim.node(self.nodes[i].expect("online")).overlay();
                match o.home_rtts().into_iter().flatten().min() {
                    Some(r) => {
                        sum += ms(r);
                        n += 1;
                        hist[(ms(r) / 25.0).min(7.0) as usize] += 1;
                    }
                    None => unknown += 1,
                }
            }
            eprintln!(
                "DEBUG nearest home rtt mean {:.1} ms over {n} (unknown {unknown}), hist/25ms {hist:?}",
                sum / n.max(1) as f64
            );
            // Totals over the nodes running now (restarted nodes count from their
            // restart), ordinary and supernodes apart.
            let mut tot = [[0u64; 10]; 2];
            for &i in &self.online {
                let st = self.sim.node(self.nodes[i].expect("online")).stats();
                let o = &st.overlay;
                let row = &mut tot[usize::from(self.supernode[i])];
                for (k, v) in [
                    st.handshakes_initiated,
                    st.handshakes_completed,
                    st.datagrams_in,
                    o.msgs_in,
                    o.msgs_out,
                    o.replicated,
                    o.attach_attempts,
                    o.attaches_redirected,
                    o.stun_requests,
                    o.read_repairs,
                ]
                .into_iter()
                .enumerate()
                {
                    row[k] += v;
                }
            }
            eprintln!(
                "DEBUG totals [hs_init, hs_done, dgrams_in, msgs_in, msgs_out, replicated, attach_attempts, redirected, stun, read_repairs]: ordinary {:?} supernodes {:?}",
                tot[0], tot[1]
            );
        }
        let t = &mut self.tally;
        let judged = t.found + t.not_found + t.failed;
        let mut hops: Vec<f64> = t.hops.iter().map(|&h| f64::from(h)).collect();
        let mut strike_ok = None;
        let mut timeline = Vec::new();
        let mut recovery: Option<u64> = None;
        let mut recovery_s = None;
        if let Some(s) = self.strike {
            let after: Vec<&(Time, Option<Duration>)> = self
                .strike_lookups
                .iter()
                .filter(|(at, _)| at.saturating_since(s) >= RECOVERY)
                .collect();
            if !after.is_empty() {
                let ok = after
                    .iter()
                    .filter(|(_, took)| took.is_some_and(|d| d <= RECOVERY))
                    .count();
                strike_ok = Some(ok as f64 / after.len() as f64);
            }
            let secs = end.saturating_since(s).as_secs().min(30);
            for k in 0..secs {
                let lo = s + Duration::from_secs(k);
                let hi = lo + Duration::from_secs(1);
                let bucket: Vec<_> = self
                    .strike_lookups
                    .iter()
                    .filter(|(at, _)| *at >= lo && *at < hi)
                    .collect();
                if bucket.is_empty() {
                    continue;
                }
                let ok = bucket
                    .iter()
                    .filter(|(_, t)| t.is_some_and(|d| d <= RECOVERY))
                    .count();
                let share = ok as f64 / bucket.len() as f64;
                if share < RECOVERED_SHARE {
                    recovery = Some(k + 1);
                }
                timeline.push((bucket.len() as u64, share));
            }
            recovery_s = Some(recovery.unwrap_or(0) as f64);
        }
        ScaleReport {
            seed: opts.seed,
            nodes: opts.nodes,
            seeds: opts.seeds,
            duration_s: opts.duration.as_secs_f64(),
            supernodes: supers.len(),
            supernode_ratio: supers.len() as f64 / self.online.len().max(1) as f64,
            online: self.online.len(),
            lookups: judged,
            lookup_success_rate: if judged == 0 {
                0.0
            } else {
                t.found as f64 / judged as f64
            },
            lookups_not_found: t.not_found,
            lookups_failed: t.failed,
            lookup_hops_p99: percentile(&mut hops, 0.99).max(0.0) as u8,
            lookup_ms_p50: percentile(&mut t.ms, 0.5),
            lookup_ms_p99: percentile(&mut t.ms, 0.99),
            presence_ms_p95: percentile(&mut self.presence_ms, 0.95),
            presence_samples: self.presence_ms.len() as u64,
            presence_missed: self.presence_missed + self.presence_pending.len() as u64,
            max_supernode_load_ratio: self.peak_load,
            mean_supernode_load_ratio: load / supers.len().max(1) as f64,
            promotions: self.promotions,
            demotions: self.demotions,
            bytes_per_node_per_s: if counted == 0 || window <= 0.0 {
                0.0
            } else {
                bytes as f64 / counted as f64 / window
            },
            records_stored: records,
            churn_leaves: self.churn_leaves,
            strike_at_s: self.strike.map(|s| s.saturating_since(START).as_secs_f64()),
            struck: self.struck,
            strike_success_within_2s: strike_ok,
            strike_timeline: timeline,
            recovery_s,
            sim_events: self.sim.events_processed(),
        }
    }
}
