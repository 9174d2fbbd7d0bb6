//! Calls on the simulator: real engine nodes (Noise, overlay lookups, NATs, relays,
//! Opus) placing, answering and hanging up calls, with audio driven on the virtual
//! clock in 20 ms steps, as a daemon's audio clock would.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use peercall_crypto::{Handle, Identity};
use peercall_engine::{
    CallConfig, CallId, CallState, CallStats, CallTarget, Config, Contact, EndReason, Event,
    FRAME_SAMPLES, Node, PathKind, RedundancyMode, RelayDrop, Role, Side, Unreachable,
};
use peercall_overlay::OverlayConfig;
use peercall_sim::{HostId, LinkConfig, NatConfig, NatType, NodeId, Sim, seed_from_env};
use peercall_wire::Time;

const PORT: u16 = 7600;
const SEEDS: usize = 3;
/// Audio step: one 20 ms frame.
const FRAME: Duration = Duration::from_millis(20);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Where a calling node sits.
#[derive(Debug, Clone, Copy)]
enum Site {
    Public,
    Nat(NatType),
}

struct Net {
    sim: Sim<Node>,
    /// Per node: its sim id and its host (the NAT box for a node behind one).
    nodes: Vec<NodeId>,
    sites: Vec<HostId>,
    /// Phase of each node's test tone.
    phase: Vec<u64>,
}

/// Three seed supernodes on public hosts, then one node per `users` entry. Every
/// link is `link_ms` one way. `tweak` adjusts each user's config.
fn net(seed: u64, users: &[Site], link_ms: u64, tweak: impl Fn(usize, &mut Config)) -> Net {
    let mut sim: Sim<Node> = Sim::new(seed_from_env(seed).expect("PEERCALL_SIM_SEED must be a u64"));
    sim.set_default_link(LinkConfig::new(ms(link_ms))).expect("link");
    let total = SEEDS + users.len();
    let ids: Vec<Identity> = (0..total)
        .map(|i| Identity::from_seed(sim.derive_seed(i as u64)))
        .collect();
    let seeds: Vec<Contact> = (0..SEEDS)
        .map(|i| Contact {
            addr: SocketAddr::from((Ipv4Addr::new(198, 51, 100, i as u8 + 1), PORT)),
            key: Some(ids[i].peer_key()),
        })
        .collect();
    let mut nodes = Vec::new();
    let mut sites = Vec::new();
    for i in 0..total {
        let (host, site) = if i < SEEDS {
            let h = sim
                .add_host(Ipv4Addr::new(198, 51, 100, i as u8 + 1))
                .expect("host");
            (h, h)
        } else {
            let j = (i - SEEDS) as u8;
            match users[i - SEEDS] {
                Site::Public => {
                    let h = sim.add_host(Ipv4Addr::new(203, 0, 113, j + 1)).expect("host");
                    (h, h)
                }
                Site::Nat(t) => {
                    let nat = sim
                        .add_nat(Ipv4Addr::new(203, 0, 113, j + 101), NatConfig::new(t))
                        .expect("nat");
                    let h = sim
                        .add_private_host(nat, Ipv4Addr::new(10, 0, j, 2))
                        .expect("host");
                    (h, nat)
                }
            }
        };
        let mut config = Config::new(ids[i].clone(), sim.derive_seed(50_000 + i as u64));
        config.seeds = seeds.clone();
        config.role = if i < SEEDS { Role::Supernode } else { Role::Ordinary };
        config.overlay = OverlayConfig {
            handle: Some(Handle::new(&format!("user{i}")).expect("handle")),
            ..OverlayConfig::default()
        };
        if i >= SEEDS {
            tweak(i - SEEDS, &mut config);
        }
        let node = Node::new(config, sim.now());
        nodes.push(sim.add_node(host, PORT, node).expect("node"));
        sites.push(site);
    }
    let mut n = Net {
        sim,
        nodes,
        sites,
        phase: vec![0; total],
    };
    // Attach, learn reflexive addresses, publish records.
    let users_at = SEEDS..total;
    let ok = n.sim.run_until_pred(n.sim.now() + secs(60), |s| {
        (0..SEEDS).all(|i| s.node(n.nodes[i]).overlay().members().len() == SEEDS - 1)
            && users_at.clone().all(|i| {
            let node = s.node(n.nodes[i]);
            node.overlay().homes().len() >= 2 && node.overlay().own_record().is_some()
        })
    });
    assert!(ok, "users attached and published");
    // Records reach their storers, supernode views settle.
    n.sim.run_for(secs(5));
    n
}

impl Net {
    fn user(&self, u: usize) -> usize {
        SEEDS + u
    }

    fn node(&self, u: usize) -> &Node {
        self.sim.node(self.nodes[self.user(u)])
    }

    fn site(&self, u: usize) -> HostId {
        self.sites[self.user(u)]
    }

    fn call(&mut self, from: usize, to: usize) -> CallId {
        let handle = Handle::new(&format!("user{}", self.user(to))).expect("handle");
        let id = self.nodes[self.user(from)];
        self.sim
            .with_node(id, |n, now| n.call(now, CallTarget::Handle(handle)))
    }

    fn stats(&self, u: usize, call: CallId) -> CallStats {
        self.node(u)
            .call_stats(self.sim.now(), call)
            .expect("call known")
    }

    /// The events of user `u`, in order.
    fn events(&self, u: usize) -> Vec<(Time, Event)> {
        let id = self.nodes[self.user(u)];
        self.sim
            .events()
            .iter()
            .filter(|r| r.node == id)
            .map(|r| (r.at, r.event.clone()))
            .collect()
    }

    /// The call user `u` got invited to.
    fn incoming(&self, u: usize) -> Option<CallId> {
        self.events(u).into_iter().find_map(|(_, e)| match e {
            Event::CallIncoming { call, .. } => Some(call),
            _ => None,
        })
    }

    fn ended(&self, u: usize, call: CallId) -> Option<EndReason> {
        self.events(u).into_iter().find_map(|(_, e)| match e {
            Event::CallEnded { call: c, reason } if c == call => Some(reason),
            _ => None,
        })
    }

    /// Runs for `d` in 20 ms steps; every user with a call in `calls` pushes a tone
    /// and pulls playout each step.
    fn talk(&mut self, calls: &[(usize, CallId)], d: Duration) {
        let end = self.sim.now() + d;
        while self.sim.now() < end {
            let next = self.sim.now() + FRAME;
            self.sim.run_until(next);
            for &(u, call) in calls {
                let i = self.user(u);
                let phase = self.phase[i];
                self.phase[i] += FRAME_SAMPLES as u64;
                let mut pcm = [0i16; FRAME_SAMPLES];
                for (k, s) in pcm.iter_mut().enumerate() {
                    let t = (phase + k as u64) as f64 / 48_000.0;
                    // Two tones, a different pair per node: speech-like enough for Opus.
                    let f = 220.0 + 110.0 * (i % 4) as f64;
                    *s = (6_000.0 * (2.0 * std::f64::consts::PI * f * t).sin()
                        + 2_000.0 * (2.0 * std::f64::consts::PI * 3.1 * f * t).sin())
                        as i16;
                }
                let id = self.nodes[i];
                self.sim.with_node(id, |n, now| {
                    let _ = n.push_audio(now, call, &pcm);
                    let mut out = [0i16; FRAME_SAMPLES];
                    let _ = n.pull_audio(now, call, &mut out);
                });
            }
        }
    }

    /// Places a call from `a` to `b` (auto-answering), talks until both sides play
    /// audio (at most `limit`), and returns both call ids.
    fn connect(&mut self, a: usize, b: usize, limit: Duration) -> (CallId, CallId) {
        let ca = self.call(a, b);
        let deadline = self.sim.now() + limit;
        let mut cb = None;
        while self.sim.now() < deadline {
            cb = cb.or_else(|| self.incoming(b));
            let calls: Vec<(usize, CallId)> =
                std::iter::once((a, ca)).chain(cb.map(|c| (b, c))).collect();
            self.talk(&calls, FRAME);
            if let Some(cb) = cb
                && self.stats(a, ca).first_audio_ms.is_some()
                && self.stats(b, cb).first_audio_ms.is_some()
            {
                return (ca, cb);
            }
            if let Some(r) = self.ended(a, ca) {
                panic!("call ended: {r}");
            }
        }
        panic!(
            "no audio both ways within {limit:?}: caller {:?}",
            self.stats(a, ca)
        );
    }
}

fn auto_answer(_: usize, c: &mut Config) {
    c.calls.auto_answer = true;
}

fn assert_flowing(s: &CallStats, secs_talked: u64) {
    let expected = secs_talked * 50;
    assert!(
        s.frames_received * 10 >= expected * 9,
        "frames received {} of about {expected}: {s:?}",
        s.frames_received
    );
    assert!(s.frames_sent * 10 >= expected * 9, "{s:?}");
}

#[test]
fn two_public_nodes_call_talk_and_hang_up() {
    let mut n = net(501, &[Site::Public, Site::Public], 25, auto_answer);
    let (ca, cb) = n.connect(0, 1, secs(5));
    n.talk(&[(0, ca), (1, cb)], secs(5));
    let (sa, sb) = (n.stats(0, ca), n.stats(1, cb));
    eprintln!("caller: {sa:?}");
    assert_eq!(sa.state, CallState::Active);
    assert_eq!(sb.state, CallState::Active);
    assert_eq!(sa.active_path, Some(PathKind::Direct));
    assert_eq!(sb.peer_user, Some(n.node(0).status().user_id));
    assert_eq!(sb.peer_handle.as_ref().map(|h| h.as_str()), Some("user3"));
    assert_flowing(&sa, 5);
    assert_flowing(&sb, 5);
    assert!(sa.mos_estimate.is_some_and(|m| m > 3.5), "{sa:?}");
    assert!(sa.concealed_ms <= 100, "{sa:?}");
    // The caller saw ringing or connected; the callee an incoming call.
    assert!(n.events(0).iter().any(|(_, e)| matches!(e, Event::CallConnected { call, .. } if *call == ca)));
    // Hang up.
    n.sim
        .with_node(n.nodes[n.user(0)], |node, now| node.hangup(now, ca))
        .expect("hang up");
    n.sim.run_for(secs(1));
    assert_eq!(n.ended(0, ca), Some(EndReason::HungUp(Side::Local)));
    assert_eq!(n.ended(1, cb), Some(EndReason::HungUp(Side::Remote)));
    let counters = n.node(0).stats().calls;
    assert_eq!(counters.ended[0], 1, "{counters:?}");
    assert_eq!(counters.active, 0);
}

/// The kinds of paths that are up (usable) on a call.
fn kinds_up(s: &CallStats) -> Vec<PathKind> {
    s.paths
        .iter()
        .filter(|p| !matches!(p.state, peercall_engine::PathState::Silent | peercall_engine::PathState::Unvalidated))
        .map(|p| p.kind)
        .collect()
}

#[test]
fn port_restricted_nats_punch_a_direct_path() {
    let nat = Site::Nat(NatType::PortRestricted);
    let mut n = net(502, &[nat, nat], 25, auto_answer);
    let (ca, cb) = n.connect(0, 1, secs(5));
    n.talk(&[(0, ca), (1, cb)], secs(4));
    let (sa, sb) = (n.stats(0, ca), n.stats(1, cb));
    eprintln!("caller: {sa:?}");
    assert_eq!(sa.active_path, Some(PathKind::Direct), "{sa:?}");
    assert_eq!(sb.active_path, Some(PathKind::Direct), "{sb:?}");
    assert_flowing(&sa, 4);
    assert_flowing(&sb, 4);
    // Relayed paths stay warm as standbys.
    assert!(kinds_up(&sa).len() >= 2, "{sa:?}");
}

#[test]
fn symmetric_nats_talk_through_relays() {
    let nat = Site::Nat(NatType::Symmetric);
    let mut n = net(503, &[nat, nat], 25, auto_answer);
    let (ca, cb) = n.connect(0, 1, secs(5));
    n.talk(&[(0, ca), (1, cb)], secs(4));
    let (sa, sb) = (n.stats(0, ca), n.stats(1, cb));
    eprintln!("caller: {sa:?}");
    assert!(
        matches!(sa.active_path, Some(PathKind::Relay1 | PathKind::Relay2)),
        "{sa:?}"
    );
    assert!(!kinds_up(&sa).contains(&PathKind::Direct), "{sa:?}");
    assert_flowing(&sa, 4);
    assert_flowing(&sb, 4);
    // The relays forwarded it, and never saw a packet they could not place.
    let relayed: u64 = (0..SEEDS)
        .map(|i| n.sim.node(n.nodes[i]).stats().relay.packets)
        .sum();
    assert!(relayed > 400, "relayed {relayed}");
}

#[test]
fn a_relayed_call_upgrades_to_direct() {
    let nat = Site::Nat(NatType::PortRestricted);
    let mut n = net(504, &[nat, nat], 25, auto_answer);
    // The direct way between the two NATs is down at first.
    let (a, b) = (n.site(0), n.site(1));
    let now = n.sim.now();
    let cut = n.sim.cut(now, &[a], &[b]).expect("cut");
    let (ca, cb) = n.connect(0, 1, secs(5));
    n.talk(&[(0, ca), (1, cb)], secs(2));
    let sa = n.stats(0, ca);
    assert!(
        matches!(sa.active_path, Some(PathKind::Relay1 | PathKind::Relay2)),
        "{sa:?}"
    );
    let healed = n.sim.now();
    n.sim.heal(healed, cut).expect("heal");
    n.talk(&[(0, ca), (1, cb)], secs(10));
    let (sa, sb) = (n.stats(0, ca), n.stats(1, cb));
    eprintln!("caller: {sa:?}");
    assert_eq!(sa.active_path, Some(PathKind::Direct), "{sa:?}");
    assert_eq!(sb.active_path, Some(PathKind::Direct), "{sb:?}");
    let switched = n.events(0).iter().any(|(at, e)| {
        *at >= healed
            && matches!(e, Event::CallPathSwitched { to: PathKind::Direct, call, .. } if *call == ca)
    });
    assert!(switched);
}

