//! The overlay on the simulator: real engine nodes (Noise sessions, STUN, NATs)
//! attaching to supernodes, publishing and looking up records, following presence,
//! electing and demoting supernodes, and riding out storms.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use peercall_crypto::{Handle, Identity, PeerKey, UserId};
use peercall_engine::{
    Config, Contact, Event, Lookup, LookupError, Node, OverlayEvent, RequestId, Role,
};
use peercall_overlay::{Capacity, ElectionConfig, OverlayConfig, Resources};
use peercall_sim::{HostId, LinkConfig, NatConfig, NatType, NodeId, Sim, seed_from_env};
use peercall_wire::Time;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[derive(Clone, Copy)]
struct Spec {
    seeds: usize,
    nodes: usize,
    /// Every `public_every`-th ordinary node is on a public address (0: none).
    public_every: usize,
    capacity: u32,
    role: Role,
    resources: Resources,
    election: ElectionConfig,
}

impl Spec {
    fn new(seeds: usize, nodes: usize) -> Spec {
        Spec {
            seeds,
            nodes,
            public_every: 0,
            capacity: 100,
            role: Role::Auto,
            resources: Resources::default(),
            election: ElectionConfig::default(),
        }
    }
}

struct World {
    sim: Sim<Node>,
    ids: Vec<Identity>,
    nodes: Vec<NodeId>,
    hosts: Vec<HostId>,
    seeds: Vec<Contact>,
    spec: Spec,
}

const PORT: u16 = 7600;

impl World {
    /// `spec.seeds` pinned supernodes on public hosts, then `spec.nodes` ordinary
    /// nodes, most behind port-restricted NATs. One-way delays are 20-80 ms: a 10 ms
    /// core plus 5-35 ms of access delay at each end.
    fn new(seed: u64, spec: Spec) -> World {
        let mut sim: Sim<Node> =
            Sim::new(seed_from_env(seed).expect("PEERCALL_SIM_SEED must be a u64"));
        sim.set_default_link(LinkConfig::new(Duration::from_millis(10)))
            .expect("link");
        let total = spec.seeds + spec.nodes;
        let ids: Vec<Identity> = (0..total)
            .map(|i| Identity::from_seed(sim.derive_seed(i as u64)))
            .collect();
        let seeds: Vec<Contact> = (0..spec.seeds)
            .map(|i| Contact {
                addr: SocketAddr::from((Ipv4Addr::new(198, 51, 100, i as u8 + 1), PORT)),
                key: Some(ids[i].peer_key()),
            })
            .collect();
        let mut w = World {
            sim,
            ids,
            nodes: Vec::new(),
            hosts: Vec::new(),
            seeds,
            spec,
        };
        for i in 0..total {
            let host = w.add_host(i);
            w.hosts.push(host);
            let node = w.make_node(i);
            let id = w.sim.add_node(host, PORT, node).expect("node");
            w.nodes.push(id);
        }
        w
    }

    fn add_host(&mut self, i: usize) -> HostId {
        let spec = self.spec;
        let access =
            Duration::from_millis(5 + (self.sim.derive_seed(10_000 + i as u64)[0] as u64 % 31));
        if i < spec.seeds {
            let h = self
                .sim
                .add_host(Ipv4Addr::new(198, 51, 100, i as u8 + 1))
                .expect("host");
            self.sim.set_access_delay(h, access).expect("delay");
            h
        } else {
            let j = i - spec.seeds;
            let public = spec.public_every > 0 && j.is_multiple_of(spec.public_every);
            let ip = Ipv4Addr::new(203, 0, (j / 250) as u8 + 1, (j % 250) as u8 + 1);
            if public {
                let h = self.sim.add_host(ip).expect("host");
                self.sim.set_access_delay(h, access).expect("delay");
                h
            } else {
                let nat = self
                    .sim
                    .add_nat(ip, NatConfig::new(NatType::PortRestricted))
                    .expect("nat");
                self.sim.set_access_delay(nat, access).expect("delay");
                self.sim
                    .add_private_host(nat, Ipv4Addr::new(10, (j / 250) as u8, (j % 250) as u8, 2))
                    .expect("host")
            }
        }
    }

    fn make_node(&self, i: usize) -> Node {
        self.make_node_with(i, self.seeds.clone())
    }

    /// Node `i` bootstrapping from `seeds` alone.
    fn make_node_with(&self, i: usize, seeds: Vec<Contact>) -> Node {
        let spec = self.spec;
        let mut config = Config::new(
            self.ids[i].clone(),
            self.sim
                .derive_seed(50_000 + i as u64 + 7919 * self.sim.now().as_secs()),
        );
        config.seeds = seeds;
        config.role = if i < spec.seeds {
            Role::Supernode
        } else {
            spec.role
        };
        config.overlay = OverlayConfig {
            handle: Some(Handle::new(&format!("user{i}")).expect("handle")),
            capacity: Capacity {
                max_clients: spec.capacity,
                attach_rate: spec.capacity.div_ceil(5).max(2),
                attach_burst: spec.capacity.div_ceil(3).max(2),
            },
            resources: spec.resources,
            election: spec.election,
            ..OverlayConfig::default()
        };
        Node::new(config, self.sim.now())
    }

    fn node(&self, i: usize) -> &Node {
        self.sim.node(self.nodes[i])
    }

    fn user(&self, i: usize) -> UserId {
        self.ids[i].user_id()
    }

    fn run(&mut self, d: Duration) {
        self.sim.run_for(d);
    }

    fn lookup(&mut self, from: usize, what: Lookup) -> RequestId {
        self.sim
            .with_node(self.nodes[from], |n, now| n.lookup(now, what))
    }

    /// The result of lookup `id` by node `from`, and how long it took (ids restart
    /// with a restarted node, so only the latest matching answer counts).
    fn lookup_result(
        &self,
        from: usize,
        id: RequestId,
    ) -> Option<(Time, Result<peercall_engine::Found, LookupError>)> {
        self.sim.events().iter().rev().find_map(|r| match &r.event {
            Event::Overlay(OverlayEvent::LookupDone { id: got, result })
                if r.node == self.nodes[from] && *got == id =>
            {
                Some((r.at, result.clone()))
            }
            _ => None,
        })
    }

    fn ordinary(&self) -> std::ops::Range<usize> {
        self.spec.seeds..self.spec.seeds + self.spec.nodes
    }

    fn supernodes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.sim.is_online(self.nodes[i]) && self.node(i).overlay().is_supernode())
            .collect()
    }
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    if xs.is_empty() {
        return f64::NAN;
    }
    let i = ((xs.len() as f64 - 1.0) * p).round() as usize;
    xs[i]
}

/// Looks up `count` random users from random nodes, `gap` apart, and returns the
/// latencies (ms) of the successes and the number of failures.
fn lookup_round(w: &mut World, count: usize, gap: Duration, salt: u64) -> (Vec<f64>, usize) {
    let ord: Vec<usize> = w
        .ordinary()
        .filter(|&i| w.sim.is_online(w.nodes[i]))
        .collect();
    let mut asked = Vec::new();
    for k in 0..count {
        let r = w.sim.derive_seed(900_000 + salt * 10_000 + k as u64);
        let from = ord[r[0] as usize % ord.len()];
        let to = ord[(r[1] as usize * 256 + r[2] as usize) % ord.len()];
        let by_handle = r[3].is_multiple_of(2);
        let what = if by_handle {
            Lookup::Handle(Handle::new(&format!("user{to}")).expect("handle"))
        } else {
            Lookup::User(w.user(to))
        };
        let started = w.sim.now();
        let id = w.lookup(from, what);
        asked.push((from, to, id, started));
        w.run(gap);
    }
    w.run(secs(5));
    let mut ms = Vec::new();
    let mut failures = 0;
    for (from, to, id, started) in asked {
        match w.lookup_result(from, id) {
            Some((at, Ok(found))) if found.record.user_id() == w.user(to) => {
                ms.push(at.saturating_since(started).as_micros() as f64 / 1000.0)
            }
            other => {
                failures += 1;
                if std::env::var("OVERLAY_DEBUG").is_ok() {
                    eprintln!(
                        "lookup {from} -> {to} failed: {:?}; from homes {:?}, to homes {:?}",
                        other.map(|x| x.1.err()),
                        w.node(from).status().homes.len(),
                        w.node(to).status().homes.len()
                    );
                }
            }
        }
    }
    (ms, failures)
}

#[test]
fn nodes_attach_discover_their_address_and_find_each_other() {
    let mut w = World::new(31, Spec::new(3, 24));
    w.run(secs(20));
    for i in w.ordinary() {
        let st = w.node(i).status();
        assert_eq!(st.homes.len(), 2, "node {i} has two homes: {st:?}");
        let host_ip = match w.sim.addr(w.nodes[i]) {
            SocketAddr::V4(a) => *a.ip(),
            SocketAddr::V6(_) => unreachable!(),
        };
        let reflexive = st.reflexive.expect("STUN answered");
        assert_ne!(
            reflexive.ip(),
            std::net::IpAddr::V4(host_ip),
            "the NAT's address, not the private one"
        );
    }
    // Every record is stored by the three seeds (the whole tier here).
    for i in w.ordinary() {
        for s in 0..3 {
            assert!(
                w.node(s).overlay().stores(&w.user(i)),
                "seed {s} stores node {i}"
            );
        }
    }
    let (mut ms, failures) = lookup_round(&mut w, 40, Duration::from_millis(100), 1);
    assert_eq!(failures, 0, "every lookup succeeds");
    let p50 = percentile(&mut ms, 0.5);
    let p99 = percentile(&mut ms, 0.99);
    eprintln!("lookups: p50 {p50:.0} ms, p99 {p99:.0} ms");
    assert!(p99 < 1000.0, "one hop beyond the home: {p99} ms");
    // The record carries the node's reflexive endpoint and its homes.
    let id = w.lookup(w.spec.seeds, Lookup::User(w.user(w.spec.seeds + 1)));
    w.run(secs(3));
    let (_, r) = w.lookup_result(w.spec.seeds, id).expect("answered");
    let found = r.expect("found");
    let target = w.node(w.spec.seeds + 1).status();
    assert!(found.online);
    assert_eq!(
        found.record.body.endpoints,
        vec![target.reflexive.expect("reflexive")]
    );
    assert_eq!(found.record.body.supernodes.len(), 2);
}

#[test]
fn unknown_users_and_handles_are_not_found() {
    let mut w = World::new(32, Spec::new(3, 4));
    w.run(secs(10));
    let stranger = Identity::from_seed([99; 32]).user_id();
    let a = w.lookup(3, Lookup::User(stranger));
    let b = w.lookup(3, Lookup::Handle(Handle::new("nobody").expect("handle")));
    w.run(secs(5));
    assert_eq!(
        w.lookup_result(3, a).map(|x| x.1),
        Some(Err(LookupError::NotFound))
    );
    assert_eq!(
        w.lookup_result(3, b).map(|x| x.1),
        Some(Err(LookupError::NotFound))
    );
}

#[test]
fn full_supernodes_redirect_and_never_exceed_capacity() {
    let mut spec = Spec::new(4, 30);
    spec.capacity = 18; // 72 slots for 60 attachments
    let mut w = World::new(33, spec);
    let mut peak = 0u64;
    for _ in 0..60 {
        w.run(Duration::from_millis(500));
        for s in 0..4 {
            peak = peak.max(w.node(s).stats().overlay.clients);
        }
    }
    assert!(peak <= 18, "peak {peak} clients over capacity");
    let redirected: u64 = (0..4)
        .map(|s| w.node(s).stats().overlay.attaches_redirected)
        .sum();
    assert!(redirected > 0, "admission redirected some attaches");
    let attached = w
        .ordinary()
        .filter(|&i| w.node(i).status().homes.len() == 2)
        .count();
    assert!(
        attached >= 28,
        "nearly all nodes found two homes: {attached}"
    );
}

#[test]
fn nodes_reattach_when_a_home_dies() {
    let mut w = World::new(34, Spec::new(4, 16));
    w.run(secs(20));
    // A seed that is some node's home (nodes pick the nearest seeds).
    let first = w.spec.seeds;
    let victim = seed_index(&w, &w.node(first).status().homes[0].0);
    let clients_of_victim: Vec<usize> = w
        .ordinary()
        .filter(|&i| {
            w.node(i)
                .status()
                .homes
                .iter()
                .any(|h| h.0 == w.ids[victim].peer_key())
        })
        .collect();
    assert!(!clients_of_victim.is_empty());
    let died = w.sim.now();
    w.sim.set_online(w.nodes[victim], false);
    w.run(secs(20));
    for &i in &clients_of_victim {
        let st = w.node(i).status();
        assert_eq!(st.homes.len(), 2, "node {i} re-attached: {st:?}");
        assert!(st.homes.iter().all(|h| h.0 != w.ids[victim].peer_key()));
        // Re-attached within seconds of the death.
        let back = w
            .sim
            .events()
            .iter()
            .filter(|r| r.node == w.nodes[i] && r.at > died)
            .find_map(|r| match &r.event {
                Event::Overlay(OverlayEvent::HomesChanged { homes }) if homes.len() == 2 => {
                    Some(r.at)
                }
                _ => None,
            })
            .expect("homes restored");
        assert!(
            back.saturating_since(died) < secs(16),
            "took {:?}",
            back.saturating_since(died)
        );
    }
    // Their new records (with the new homes) are found.
    let i = clients_of_victim[0];
    let id = w.lookup(
        w.spec.seeds + (i + 1 - w.spec.seeds) % 16,
        Lookup::User(w.user(i)),
    );
    w.run(secs(3));
    let found = w
        .lookup_result(w.spec.seeds + (i + 1 - w.spec.seeds) % 16, id)
        .expect("answered")
        .1
        .expect("found");
    assert!(
        found
            .record
            .body
            .supernodes
            .iter()
            .all(|h| h.key != w.ids[victim].peer_key())
    );
}

/// A record looked up more often than homes keep cached copies fresh is still
/// fetched again: after its node re-attaches and re-publishes, a looker that asks
/// every 2 s sees the new homes within the cache freshness, not at expiry.
#[test]
fn records_looked_up_often_are_refetched_after_they_change() {
    // Small supernodes, so that nodes spread over all of them (they would all
    // pick the same nearest two otherwise) and a looker attached elsewhere exists.
    let mut spec = Spec::new(4, 16);
    spec.capacity = 10;
    let mut w = World::new(40, spec);
    w.run(secs(20));
    let first = w.spec.seeds;
    let victim = seed_index(&w, &w.node(first).status().homes[0].0);
    let victim_key = w.ids[victim].peer_key();
    let homes_of = |w: &World, i: usize| -> Vec<PeerKey> {
        w.node(i).status().homes.iter().map(|h| h.0).collect()
    };
    let target = w
        .ordinary()
        .find(|&i| homes_of(&w, i).contains(&victim_key))
        .expect("a client of the victim");
    // Attached to none of the target's homes: its home learns the new record only
    // by fetching it.
    let target_homes = homes_of(&w, target);
    let looker = w
        .ordinary()
        .find(|&i| i != target && homes_of(&w, i).iter().all(|h| !target_homes.contains(h)))
        .expect("a node attached elsewhere");
    let ask = |w: &mut World| {
        let id = w.lookup(looker, Lookup::User(w.user(target)));
        w.run(secs(2));
        let (_, result) = w.lookup_result(looker, id).expect("answered");
        result.expect("found").record.body.supernodes
    };
    for _ in 0..3 {
        assert!(ask(&mut w).iter().any(|h| h.key == victim_key));
    }
    w.sim.set_online(w.nodes[victim], false);
    // Re-attach (under 16 s, see above), then at most one cache freshness period.
    let bound = secs(16) + peercall_overlay::CACHE_FRESH + secs(4);
    let mut waited = Duration::ZERO;
    while ask(&mut w).iter().any(|h| h.key == victim_key) {
        waited += secs(2);
        assert!(
            waited <= bound,
            "the looker still sees the dead home after {waited:?}"
        );
    }
}

#[test]
fn presence_follows_graceful_exit_and_return() {
    let mut w = World::new(35, Spec::new(3, 8));
    w.run(secs(15));
    let (watcher, target) = (3, 7);
    let t_user = w.user(target);
    w.sim
        .with_node(w.nodes[watcher], |n, now| n.subscribe(now, &[t_user]));
    w.run(secs(3));
    let presence = |w: &World, after: Time| -> Vec<(Time, bool)> {
        w.sim
            .events()
            .iter()
            .filter(|r| r.node == w.nodes[watcher] && r.at >= after)
            .filter_map(|r| match &r.event {
                Event::Overlay(OverlayEvent::Presence { user, online, .. }) if *user == t_user => {
                    Some((r.at, *online))
                }
                _ => None,
            })
            .collect()
    };
    let start = peercall_sim::START;
    assert_eq!(
        presence(&w, start).last().map(|p| p.1),
        Some(true),
        "initial state: online"
    );
    let left = w.sim.now();
    w.sim.with_node(w.nodes[target], |n, now| n.close(now));
    w.run(secs(5));
    let off = presence(&w, left);
    assert_eq!(
        off.last().map(|p| p.1),
        Some(false),
        "offline pushed: {off:?}"
    );
    let delay = off[0].0.saturating_since(left);
    eprintln!("graceful offline pushed in {delay:?}");
    assert!(delay < secs(2), "within 2 s: {delay:?}");
    // Back online: a new process with the same identity.
    let back = w.sim.now();
    let node = w.make_node(target);
    w.sim.replace_node(w.nodes[target], node);
    w.run(secs(10));
    let on = presence(&w, back);
    assert_eq!(on.last().map(|p| p.1), Some(true), "online again: {on:?}");
}

#[test]
fn records_expire_after_a_crash() {
    let mut w = World::new(36, Spec::new(3, 6));
    w.run(secs(15));
    let (watcher, target) = (3, 8);
    let t_user = w.user(target);
    w.sim
        .with_node(w.nodes[watcher], |n, now| n.subscribe(now, &[t_user]));
    w.run(secs(3));
    let crashed = w.sim.now();
    w.sim.set_online(w.nodes[target], false);
    // TTL 120 s + one refresh interval 60 s + the 5 s sweep.
    w.run(secs(190));
    for s in 0..3 {
        assert!(
            !w.node(s).overlay().stores(&t_user),
            "seed {s} purged the record"
        );
    }
    let id = w.lookup(watcher, Lookup::User(t_user));
    w.run(secs(3));
    assert_eq!(
        w.lookup_result(watcher, id).map(|x| x.1),
        Some(Err(LookupError::NotFound))
    );
    let offline = w.sim.events().iter().find_map(|r| match &r.event {
        Event::Overlay(OverlayEvent::Presence {
            user,
            online: false,
            ..
        }) if r.node == w.nodes[watcher] && *user == t_user && r.at > crashed => Some(r.at),
        _ => None,
    });
    let at = offline.expect("expiry pushed as offline");
    assert!(at.saturating_since(crashed) <= secs(185));
}

/// Candidates on public addresses pass the dial-back and are promoted when the tier
/// is loaded; candidates behind NATs are not.
fn election_world(seed: u64, public_every: usize) -> World {
    let mut spec = Spec::new(5, 20);
    spec.capacity = 9; // 40 attachments over 45 slots: load 0.89 > 0.7
    spec.public_every = public_every;
    spec.resources = Resources {
        bandwidth_kbps: 20_000,
        cpu_headroom_pct: 80,
    };
    spec.election.min_uptime = secs(200);
    World::new(seed, spec)
}

#[test]
fn loaded_tier_promotes_dialed_back_candidates() {
    let mut w = election_world(37, 1);
    // Candidates qualify at 200 s of uptime, once their bootstrap sessions with the
    // seeds are long closed (their NAT mappings could fake reachability).
    w.run(secs(300));
    let supers = w.supernodes();
    let promoted: Vec<usize> = supers.iter().copied().filter(|&i| i >= 5).collect();
    assert!(
        !promoted.is_empty(),
        "some candidates were promoted: {supers:?}"
    );
    let total: u64 = (0..5).map(|s| w.node(s).stats().overlay.promotions).sum();
    assert!(total as usize >= promoted.len());
    let ok: u64 = (0..5).map(|s| w.node(s).stats().overlay.dialbacks_ok).sum();
    assert!(ok > 0, "promotion came after a successful dial-back");
    // Every supernode knows the whole tier.
    for &s in &supers {
        assert_eq!(
            w.node(s).stats().overlay.members as usize,
            supers.len(),
            "node {s}"
        );
    }
    // Promotions per minute are capped.
    let per_min = w.spec.election.max_promotions_per_min as usize;
    assert!(promoted.len() <= per_min * 3);
    // Lookups work across old and new supernodes.
    let (_, failures) = lookup_round(&mut w, 20, Duration::from_millis(200), 2);
    assert_eq!(failures, 0);
}

#[test]
fn candidates_behind_nats_fail_the_dial_back() {
    let mut w = election_world(38, 0);
    w.run(secs(300));
    assert_eq!(
        w.supernodes(),
        vec![0, 1, 2, 3, 4],
        "no NATed node was promoted"
    );
    let failed: u64 = (0..5)
        .map(|s| w.node(s).stats().overlay.dialbacks_failed)
        .sum();
    assert!(failed > 0, "dial-backs were tried and failed");
    let ok: u64 = (0..5).map(|s| w.node(s).stats().overlay.dialbacks_ok).sum();
    assert_eq!(ok, 0);
}

/// The demo's network: three seeds of 3 places each and four open desktops that
/// qualify at once (8 attachments over 9 places: load 0.89).
fn small_tier() -> Spec {
    let mut spec = Spec::new(3, 4);
    spec.capacity = 3;
    spec.public_every = 1;
    spec.resources = Resources {
        bandwidth_kbps: 20_000,
        cpu_headroom_pct: 80,
    };
    spec.election.min_uptime = Duration::ZERO;
    spec.election.contact_memory = secs(5);
    spec
}

/// In a tier of three seeds every candidate has probed (or been in session with)
/// all of them when it first reports, so no stranger can dial it back; it reports
/// again as soon as the first of them is forgotten, and is promoted then, not a
/// whole report interval later.
#[test]
fn a_small_tier_promotes_once_a_probed_seed_is_forgotten() {
    let mut w = World::new(40, small_tier());
    w.run(secs(40));
    let promoted: Vec<usize> = w.supernodes().into_iter().filter(|&i| i >= 3).collect();
    assert!(
        !promoted.is_empty(),
        "a candidate was promoted within 40 s (reports every {:?})",
        peercall_overlay::CANDIDATE_INTERVAL
    );
    let ok: u64 = (0..3).map(|s| w.node(s).stats().overlay.dialbacks_ok).sum();
    assert!(ok > 0, "after a successful dial-back");
}

/// Three desktops that know only two of the three seeds fill those two; the
/// fourth finds them full and has one home. The tier is at 7 of 9 places, under
/// the high watermark, but that home counts the missing place as demand, and a
/// desktop is promoted.
#[test]
fn a_client_short_of_a_home_counts_towards_promotion() {
    let mut spec = small_tier();
    spec.election.high_watermark = 800; // the demo's: 7 of 9 places is below it
    spec.election.low_watermark = 450;
    let mut w = World::new(41, spec);
    // The desktops start once the seeds have formed the tier.
    for i in 3..7 {
        w.sim.set_online(w.nodes[i], false);
    }
    w.run(secs(15));
    assert_eq!(w.node(0).stats().overlay.members, 3);
    for i in 3..7 {
        let known = if i < 6 { 0..2 } else { 2..3 };
        let node = w.make_node_with(i, w.seeds[known].to_vec());
        w.sim.replace_node(w.nodes[i], node);
        w.sim.set_online(w.nodes[i], true);
        w.run(secs(2)); // one at a time, within the seeds' admission rate
    }
    let clients: Vec<u64> = (0..3).map(|s| w.node(s).stats().overlay.clients).collect();
    assert_eq!(clients, [3, 3, 1], "the packing under test");
    assert_eq!(w.node(6).overlay().homes().len(), 1);
    w.run(secs(40));
    let promoted: Vec<usize> = w.supernodes().into_iter().filter(|&i| i >= 3).collect();
    assert!(
        !promoted.is_empty(),
        "a desktop was promoted within 45 s of starting"
    );
}

#[test]
fn records_move_to_a_joining_storer_and_away_from_a_dead_one() {
    let mut spec = Spec::new(6, 30);
    spec.capacity = 100;
    let mut w = World::new(39, spec);
    // Seed 5 starts late: offline until t = 20 s.
    w.sim.set_online(w.nodes[5], false);
    w.run(secs(20));
    let fresh = w.make_node(5);
    w.sim.replace_node(w.nodes[5], fresh);
    w.sim.set_online(w.nodes[5], true);
    w.run(secs(15));
    let users: Vec<UserId> = w.ordinary().map(|i| w.user(i)).collect();
    let expected_on_5: Vec<&UserId> = users
        .iter()
        .filter(|u| {
            w.node(0)
                .overlay()
                .storers_of(u)
                .contains(&w.ids[5].peer_key())
        })
        .collect();
    assert!(!expected_on_5.is_empty());
    for u in &expected_on_5 {
        assert!(
            w.node(5).overlay().stores(u),
            "re-replicated to the new storer"
        );
    }
    let replicated: u64 = (0..5).map(|s| w.node(s).stats().overlay.replicated).sum();
    assert!(replicated > 0);
    // Now a storer dies: its records reach their next storers once it is declared dead.
    w.sim.set_online(w.nodes[1], false);
    w.run(secs(25));
    for u in &users {
        let storers = w.node(0).overlay().storers_of(u);
        assert!(
            !storers.contains(&w.ids[1].peer_key()),
            "the dead seed left the view"
        );
        for s in storers {
            let i = w
                .ids
                .iter()
                .position(|id| id.peer_key() == s)
                .expect("a seed");
            assert!(w.node(i).overlay().stores(u), "seed {i} holds its share");
        }
    }
}

#[test]
fn underloaded_tier_demotes_with_a_hand_off() {
    let mut w = election_world(40, 1);
    w.run(secs(300));
    let promoted: Vec<usize> = w.supernodes().into_iter().filter(|&i| i >= 5).collect();
    assert!(!promoted.is_empty(), "a promotion first");
    // Most ordinary nodes leave: the tier is now far below the low watermark.
    let leavers: Vec<usize> = w
        .ordinary()
        .filter(|i| !promoted.contains(i))
        .skip(4)
        .collect();
    for &i in &leavers {
        w.sim.with_node(w.nodes[i], |n, now| n.close(now));
    }
    w.run(secs(120));
    let demotions: u64 = (0..w.nodes.len())
        .map(|i| w.node(i).stats().overlay.demotions)
        .sum();
    assert!(demotions > 0, "the coordinator demoted someone");
    let still: Vec<usize> = w.supernodes().into_iter().filter(|&i| i >= 5).collect();
    assert!(
        still.len() < promoted.len(),
        "a promoted node went back: {still:?}"
    );
    // Seeds are pinned.
    for s in 0..5 {
        assert!(w.node(s).overlay().is_supernode());
    }
    // The remaining nodes are attached and findable.
    let remaining: Vec<usize> = w
        .ordinary()
        .filter(|i| !leavers.contains(i) && !still.contains(i))
        .collect();
    for &i in &remaining {
        assert_eq!(
            w.node(i).status().homes.len(),
            2,
            "node {i} re-attached after the hand-off"
        );
    }
    let from = remaining[0];
    for &i in &remaining[1..] {
        let id = w.lookup(from, Lookup::User(w.user(i)));
        w.run(secs(2));
        assert!(
            matches!(w.lookup_result(from, id).map(|x| x.1), Some(Ok(_))),
            "node {i} findable"
        );
    }
}

fn peak_load(w: &World) -> f64 {
    w.supernodes()
        .iter()
        .map(|&s| {
            let st = w.node(s).stats().overlay;
            st.clients as f64 / st.capacity.max(1) as f64
        })
        .fold(0.0, f64::max)
}

#[test]
fn restart_storm_of_half_the_nodes_stays_within_capacity() {
    let mut spec = Spec::new(6, 60);
    spec.capacity = 30; // 120 attachments over 180 slots
    spec.role = Role::Ordinary;
    let mut w = World::new(41, spec);
    w.run(secs(30));
    let (_, failures) = lookup_round(&mut w, 20, Duration::from_millis(50), 3);
    assert_eq!(failures, 0);
    // Half the nodes restart at the same instant (Skype 2007), keeping their host
    // caches as a persisted cache would.
    let storm = w.sim.now();
    let restarting: Vec<usize> = w.ordinary().step_by(2).collect();
    for &i in &restarting {
        let cache = w.node(i).host_cache().to_vec();
        let mut config = Config::new(w.ids[i].clone(), w.sim.derive_seed(77_000 + i as u64));
        config.seeds = w.seeds.clone();
        config.role = Role::Ordinary;
        config.overlay = OverlayConfig {
            host_cache: cache,
            handle: Some(Handle::new(&format!("user{i}")).expect("handle")),
            capacity: Capacity {
                max_clients: 30,
                attach_rate: 6,
                attach_burst: 10,
            },
            ..OverlayConfig::default()
        };
        let node = Node::new(config, storm);
        w.sim.replace_node(w.nodes[i], node);
    }
    let mut peak: f64 = 0.0;
    for _ in 0..40 {
        w.run(Duration::from_millis(500));
        peak = peak.max(peak_load(&w));
    }
    eprintln!("restart storm: peak supernode load {peak:.2}");
    assert!(peak <= 1.0, "no supernode past capacity: {peak}");
    let attached = restarting
        .iter()
        .filter(|&&i| w.node(i).status().homes.len() == 2)
        .count();
    assert!(
        attached * 10 >= restarting.len() * 9,
        "{attached} of {} back",
        restarting.len()
    );
    let (_, failures) = lookup_round(&mut w, 40, Duration::from_millis(50), 4);
    eprintln!("restart storm: {failures} of 40 lookups failed after 20 s");
    assert!(failures <= 1);
}

#[test]
fn losing_30_percent_of_supernodes_causes_no_cascade() {
    let mut spec = Spec::new(10, 60);
    spec.capacity = 24; // 120 attachments over 240 slots; over 168 after the loss
    spec.role = Role::Ordinary;
    let mut w = World::new(42, spec);
    w.run(secs(30));
    let killed = [1usize, 4, 7];
    let at = w.sim.now();
    for &k in &killed {
        w.sim.set_online(w.nodes[k], false);
    }
    let mut peak: f64 = 0.0;
    let mut first_ok = None;
    for step in 0..60 {
        w.run(Duration::from_millis(500));
        peak = peak.max(peak_load(&w));
        if step % 4 == 3 && first_ok.is_none() {
            let (_, failures) = lookup_round(&mut w, 20, Duration::from_millis(20), 100 + step);
            if failures == 0 {
                first_ok = Some(w.sim.now().saturating_since(at));
            }
        }
    }
    eprintln!(
        "30% supernodes lost: peak load {peak:.2}, lookups all succeed again after {first_ok:?}"
    );
    assert!(peak <= 1.0, "no survivor past capacity: {peak}");
    for s in (0..10).filter(|s| !killed.contains(s)) {
        assert!(w.sim.is_online(w.nodes[s]) && w.node(s).overlay().is_supernode());
        assert_eq!(
            w.node(s).stats().overlay.members,
            7,
            "seed {s} sees 7 live supernodes"
        );
    }
    let (_, failures) = lookup_round(&mut w, 40, Duration::from_millis(50), 5);
    assert!(failures == 0, "{failures} lookups failed after recovery");
    assert!(first_ok.is_some());
}

#[test]
fn lookup_latency_with_a_few_hundred_nodes() {
    let mut spec = Spec::new(12, 240);
    spec.capacity = 60;
    spec.role = Role::Ordinary;
    spec.public_every = 5;
    let mut w = World::new(43, spec);
    w.run(secs(40));
    let (mut ms, failures) = lookup_round(&mut w, 300, Duration::from_millis(20), 6);
    let n = ms.len() + failures;
    let p50 = percentile(&mut ms, 0.5);
    let p99 = percentile(&mut ms, 0.99);
    eprintln!(
        "252 nodes, 20-80 ms links: {n} lookups, success {:.1}%, p50 {p50:.0} ms, p99 {p99:.0} ms",
        100.0 * ms.len() as f64 / n as f64
    );
    assert!(failures * 1000 <= n, "success ≥ 99.9%: {failures} failures");
    assert!(p50 <= 400.0 && p99 <= 1000.0, "p50 {p50} p99 {p99}");
    // Presence: 30 watchers follow 30 others, who leave gracefully.
    let watchers: Vec<usize> = w.ordinary().take(30).collect();
    let targets: Vec<usize> = w.ordinary().skip(30).take(30).collect();
    for (a, b) in watchers.iter().zip(&targets) {
        let u = w.user(*b);
        w.sim
            .with_node(w.nodes[*a], |n, now| n.subscribe(now, &[u]));
    }
    w.run(secs(5));
    let left = w.sim.now();
    for &b in &targets {
        w.sim.with_node(w.nodes[b], |n, now| n.close(now));
    }
    w.run(secs(10));
    let mut delays: Vec<f64> = watchers
        .iter()
        .zip(&targets)
        .filter_map(|(a, b)| {
            let u = w.user(*b);
            w.sim.events().iter().find_map(|r| match &r.event {
                Event::Overlay(OverlayEvent::Presence {
                    user,
                    online: false,
                    ..
                }) if r.node == w.nodes[*a] && *user == u && r.at >= left => {
                    Some(r.at.saturating_since(left).as_micros() as f64 / 1000.0)
                }
                _ => None,
            })
        })
        .collect();
    let got = delays.len();
    if std::env::var("OVERLAY_DEBUG").is_ok() {
        for (a, b) in watchers.iter().zip(&targets) {
            let u = w.user(*b);
            let evs: Vec<(Time, bool)> = w
                .sim
                .events()
                .iter()
                .filter(|r| r.node == w.nodes[*a])
                .filter_map(|r| match &r.event {
                    Event::Overlay(OverlayEvent::Presence { user, online, .. }) if *user == u => {
                        Some((r.at, *online))
                    }
                    _ => None,
                })
                .collect();
            if evs.len() < 2 {
                let st = w.node(*b).status();
                eprintln!(
                    "watcher {a} -> {b}: {evs:?}; target homes {:?}; watcher homes {:?}",
                    st.homes,
                    w.node(*a).status().homes
                );
                for s in 0..12 {
                    eprintln!(
                        "  seed {s} {:?} stores: {} stats {:?}",
                        w.ids[s].peer_key(),
                        w.node(s).overlay().stores(&u),
                        w.node(s).stats().overlay.stale_records
                    );
                }
                eprintln!("  storers {:?}", w.node(0).overlay().storers_of(&u));
            }
        }
    }
    let p95 = percentile(&mut delays, 0.95);
    eprintln!("presence: {got} of 30 offline pushes, p95 {p95:.0} ms");
    assert_eq!(got, 30);
    assert!(p95 <= 2000.0);
}

/// The access delay `World::add_host` gave host `i` (the one-way delay between
/// two hosts is the 10 ms core plus both access delays).
fn access_ms(w: &World, i: usize) -> u64 {
    5 + w.sim.derive_seed(10_000 + i as u64)[0] as u64 % 31
}

fn seed_index(w: &World, key: &PeerKey) -> usize {
    (0..w.spec.seeds)
        .find(|&s| w.ids[s].peer_key() == *key)
        .expect("homes and storers are seeds here")
}

/// Nodes probe the seeds they know and attach to the nearest two: every node
/// here has the same nearest seeds (one-way delay is core + both access delays).
#[test]
fn nodes_attach_to_their_nearest_supernodes() {
    let mut w = World::new(61, Spec::new(6, 20));
    w.run(secs(20));
    let mut by_delay: Vec<u64> = (0..6).map(|s| access_ms(&w, s)).collect();
    by_delay.sort_unstable();
    let best_two = by_delay[0] + by_delay[1];
    for i in w.ordinary() {
        let st = w.node(i).status();
        assert_eq!(st.homes.len(), 2, "node {i}: {st:?}");
        let got: u64 = st
            .homes
            .iter()
            .map(|h| access_ms(&w, seed_index(&w, &h.0)))
            .sum();
        assert_eq!(
            got, best_two,
            "node {i} is attached to the two nearest seeds (access delays {by_delay:?})"
        );
        let rtts = w.node(i).overlay().home_rtts();
        assert!(rtts.iter().all(Option::is_some), "both homes measured");
    }
}

/// Homes taken while the nearest supernode was away are not kept for good: once
/// it is up, re-homing measures it and moves the farthest home there.
#[test]
fn nodes_move_their_farthest_home_to_a_nearer_supernode() {
    let mut w = World::new(64, Spec::new(4, 8));
    for s in 0..4u64 {
        let access = Duration::from_millis(if s == 0 { 5 } else { 20 + 5 * s });
        w.sim
            .set_access_delay(w.hosts[s as usize], access)
            .expect("delay");
    }
    w.sim.set_online(w.nodes[0], false);
    w.run(secs(20));
    let near = w.ids[0].peer_key();
    for i in w.ordinary() {
        let homes = w.node(i).status().homes;
        assert!(homes.iter().all(|h| h.0 != near), "node {i}: {homes:?}");
    }
    let fresh = w.make_node(0);
    w.sim.replace_node(w.nodes[0], fresh);
    w.sim.set_online(w.nodes[0], true);
    // Rounds every 30-90 s: the first measures seed 0, the next moves.
    w.run(secs(200));
    for i in w.ordinary() {
        let homes = w.node(i).status().homes;
        assert_eq!(homes.len(), 2, "node {i}: {homes:?}");
        assert!(homes.iter().any(|h| h.0 == near), "node {i}: {homes:?}");
        assert!(w.node(i).stats().overlay.rehomes >= 1, "node {i}");
    }
}

/// A lookup goes to both homes at once: when one died a moment ago (nobody has
/// noticed yet), the other answers within a round trip or two, not after the
/// per-home retry delay.
#[test]
fn a_lookup_is_answered_at_once_when_a_home_died_unnoticed() {
    let mut w = World::new(62, Spec::new(4, 16));
    w.run(secs(20));
    let asker = w.spec.seeds;
    let target = w.spec.seeds + 5;
    let homes = w.node(asker).status().homes;
    assert_eq!(homes.len(), 2);
    // The primary home (the one asked first before lookups were hedged) dies.
    let dead = seed_index(&w, &homes[0].0);
    w.sim.set_online(w.nodes[dead], false);
    let started = w.sim.now();
    let id = w.lookup(asker, Lookup::User(w.user(target)));
    w.run(secs(3));
    let (at, result) = w.lookup_result(asker, id).expect("answered");
    let found = result.expect("found");
    assert_eq!(found.record.user_id(), w.user(target));
    let took = at.saturating_since(started);
    assert!(
        took < peercall_overlay::LOOKUP_TRY,
        "answered by the live home in {took:?}"
    );
}

/// When all three storers of a record crash at once, its homes copy it to the
/// storers ranked next as soon as the crashed ones are suspected, and readers
/// ask those too: lookups succeed again before the crashes are declared.
#[test]
fn a_record_whose_storers_all_crash_is_found_before_they_are_declared_dead() {
    let mut spec = Spec::new(9, 27);
    spec.role = Role::Ordinary;
    // Small supernodes, so the nodes spread over all of them (they would all
    // pick the same nearest two otherwise).
    spec.capacity = 8;
    let mut w = World::new(63, spec);
    w.run(secs(25));
    let homes_of = |w: &World, i: usize| -> Vec<usize> {
        w.node(i)
            .status()
            .homes
            .iter()
            .map(|h| seed_index(w, &h.0))
            .collect()
    };
    // A target whose homes are not among its storers, and an asker whose homes
    // are neither its storers nor its homes (which hold or cache the record).
    let (target, storers, asker) = w
        .ordinary()
        .find_map(|t| {
            let storers: Vec<usize> = w
                .node(0)
                .overlay()
                .storers_of(&w.user(t))
                .iter()
                .map(|k| seed_index(&w, k))
                .collect();
            let homes = homes_of(&w, t);
            if homes.len() != 2 || homes.iter().any(|h| storers.contains(h)) {
                return None;
            }
            let asker = w.ordinary().find(|&a| {
                let theirs = homes_of(&w, a);
                a != t
                    && theirs.len() == 2
                    && theirs
                        .iter()
                        .all(|h| !storers.contains(h) && !homes.contains(h))
            })?;
            Some((t, storers, asker))
        })
        .expect("some target and asker");
    assert_eq!(storers.len(), 3);
    let home = homes_of(&w, target)[0];
    // A fresh record without a handle (so it sits at its three user storers
    // only, not also at handle storers), newer than copies left elsewhere while
    // the tier formed.
    w.sim
        .with_node(w.nodes[target], |n, now| n.set_handle(now, None));
    w.run(secs(1));
    w.sim.with_node(w.nodes[target], |n, now| n.publish(now));
    w.run(secs(2));
    let newest = w.node(target).overlay().own_record().map(|b| {
        peercall_crypto::Record::verify(b)
            .expect("own record verifies")
            .seq
    });
    let newest = newest.expect("published");
    let crashed = w.sim.now();
    for &s in &storers {
        w.sim.set_online(w.nodes[s], false);
    }
    // Once they are suspected (a few seconds), and before they are declared
    // dead, a lookup finds the newest record. (One lookup: the asker's home
    // caches what it reads.)
    w.run(Duration::from_millis(5_500));
    let still_live = storers
        .iter()
        .filter(|&&s| {
            w.node(home)
                .overlay()
                .member_addr(&w.ids[s].peer_key())
                .is_some()
        })
        .count();
    assert_eq!(still_live, 3, "none declared dead yet");
    let started = w.sim.now();
    let id = w.lookup(asker, Lookup::User(w.user(target)));
    w.run(secs(2));
    let (at, result) = w.lookup_result(asker, id).expect("answered");
    let found = result.expect("found");
    eprintln!(
        "storers crashed: a lookup {:?} later found seq {} (newest {newest}) in {:?}",
        started.saturating_since(crashed),
        found.record.seq,
        at.saturating_since(started)
    );
    assert_eq!(
        found.record.seq, newest,
        "the newest record, not a leftover"
    );
}
