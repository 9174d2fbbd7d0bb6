//! Calls on the simulator: real engine nodes (Noise, overlay lookups, NATs, relays,
//! Opus) placing, answering and hanging up calls, with audio driven on the virtual
//! clock in 20 ms steps, as a daemon's audio clock would.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use peercall_crypto::{Handle, Identity};
use peercall_engine::{
    CallId, CallState, CallStats, CallTarget, Config, Contact, EndReason, Event, FRAME_SAMPLES,
    Node, PathKind, RedundancyMode, RelayDrop, Role, Side,
};
use peercall_overlay::OverlayConfig;
use peercall_sim::{CutId, HostId, LinkConfig, NatConfig, NatType, NodeId, Sim, seed_from_env};
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
    let mut sim: Sim<Node> =
        Sim::new(seed_from_env(seed).expect("PEERCALL_SIM_SEED must be a u64"));
    sim.set_default_link(LinkConfig::new(ms(link_ms)))
        .expect("link");
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
                    let h = sim
                        .add_host(Ipv4Addr::new(203, 0, 113, j + 1))
                        .expect("host");
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
        config.role = if i < SEEDS {
            Role::Supernode
        } else {
            Role::Ordinary
        };
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
    assert!(
        n.events(0)
            .iter()
            .any(|(_, e)| matches!(e, Event::CallConnected { call, .. } if *call == ca))
    );
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

/// A call whose caller passes Opus through (as the daemon does for a browser): the
/// caller's packets, coded outside the engine, reach the callee's decoder; what the
/// callee says comes out as `CallOpus` events, one per frame; capture pushed as PCM
/// is ignored meanwhile; a gap in the source's timestamps reaches the far end as a
/// pause, not a jump.
#[test]
fn a_passthrough_call_carries_opus_coded_outside_the_engine() {
    let mut n = net(503, &[Site::Public, Site::Public], 25, auto_answer);
    let ca = n.call(0, 1);
    let a = n.nodes[n.user(0)];
    n.sim
        .with_node(a, |node, _| node.set_opus_passthrough(ca, true))
        .expect("pass-through on a live call");
    let mut encoder =
        peercall_media::Encoder::new(peercall_media::EncoderConfig::default()).expect("encoder");
    let mut opus = vec![0u8; 1500];
    let mut ts = 0x1234_5678u32;
    let mut pushed = 0u64;
    let mut cb = None;
    for step in 0..400u32 {
        cb = cb.or_else(|| n.incoming(1));
        let calls: Vec<(usize, CallId)> = cb.map(|c| (1, c)).into_iter().collect();
        // The callee talks as usual; the caller's PCM pushes are ignored.
        n.talk(&calls, FRAME);
        if n.stats(0, ca).state != CallState::Active {
            continue;
        }
        let phase = u64::from(step) * FRAME_SAMPLES as u64;
        let pcm: Vec<i16> = (0..FRAME_SAMPLES)
            .map(|k| {
                let t = (phase + k as u64) as f64 / 48_000.0;
                (6_000.0 * (2.0 * std::f64::consts::PI * 300.0 * t).sin()) as i16
            })
            .collect();
        let len = encoder.encode(&pcm, &mut opus).expect("encode");
        // Frames 250..253 are never sent, as a browser's DTX or a lost packet.
        ts = ts.wrapping_add(FRAME_SAMPLES as u32);
        if (250..253).contains(&step) {
            continue;
        }
        n.sim.with_node(a, |node, now| {
            node.push_audio(now, ca, &[0; FRAME_SAMPLES])
                .expect("ignored");
            node.push_opus(now, ca, ts, &opus[..len])
                .expect("push_opus");
        });
        pushed += 1;
    }
    let cb = cb.expect("the callee was called");
    let (sa, sb) = (n.stats(0, ca), n.stats(1, cb));
    assert_eq!(
        sa.frames_sent, pushed,
        "only the Opus packets are sent: {sa:?}"
    );
    assert!(sb.frames_received * 10 >= pushed * 9, "{sb:?}");
    assert!(sb.first_audio_ms.is_some(), "the callee decodes: {sb:?}");
    // The three skipped frames are a 60 ms pause at the callee (a talkspurt starts
    // after it, as after DTX), not a jump in its playout.
    assert_eq!(sb.media.dtx, 3, "{sb:?}");
    let received: Vec<(u32, u32, usize)> = n
        .events(0)
        .into_iter()
        .filter_map(|(_, e)| match e {
            Event::CallOpus {
                call,
                seq,
                timestamp,
                opus,
            } if call == ca => Some((seq, timestamp, opus.len())),
            _ => None,
        })
        .collect();
    assert!(
        received.len() as u64 * 10 >= sb.frames_sent * 9,
        "{} Opus events for {} frames sent",
        received.len(),
        sb.frames_sent
    );
    assert!(received.iter().all(|&(_, _, len)| len > 0));
    for w in received.windows(2) {
        assert_eq!(w[1].1.wrapping_sub(w[0].1) % FRAME_SAMPLES as u32, 0);
    }
    // Bad packets are refused with a reason; so is Opus on a call without pass-through.
    n.sim.with_node(a, |node, now| {
        let long = [0x80u8, 0x00]; // config 16, 2.5 ms CELT: not a 20 ms frame
        assert!(node.push_opus(now, ca, ts, &long).is_err());
        assert!(node.push_opus(now, ca, ts, &[]).is_err());
    });
    let b = n.nodes[n.user(1)];
    n.sim.with_node(b, |node, now| {
        assert!(node.push_opus(now, cb, 0, &opus[..4]).is_err());
    });
}

/// A call placed right after the direct path to the same peer died, while the
/// session from the last call still looks alive: the invite must not wait for that
/// session to time out, but reach the callee through the supernodes at once.
#[test]
fn a_new_call_over_a_dead_session_connects_through_the_relays() {
    let mut n = net(
        509,
        &[Site::Nat(NatType::PortRestricted), Site::Public],
        25,
        auto_answer,
    );
    let (ca, cb) = n.connect(0, 1, secs(5));
    n.talk(&[(0, ca), (1, cb)], secs(2));
    n.sim
        .with_node(n.nodes[n.user(0)], |node, now| node.hangup(now, ca))
        .expect("hang up");
    n.sim.run_for(ms(200));
    // The direct path dies; the session with the callee is still up.
    let (a, b) = (n.site(0), n.site(1));
    n.sim.cut(n.sim.now(), &[a], &[b]).expect("cut");
    n.sim.run_for(ms(300));
    let placed = n.sim.now();
    let c2 = n.call(0, 1);
    let deadline = placed + secs(10);
    let mut connected = None;
    while n.sim.now() < deadline && connected.is_none() {
        n.talk(&[(0, c2)], FRAME);
        let s = n.stats(0, c2);
        if let Some(r) = n.ended(0, c2) {
            panic!("the second call ended: {r}; {s:?}");
        }
        if s.state == CallState::Active {
            connected = Some(n.sim.now().saturating_since(placed));
        }
    }
    let took = connected.unwrap_or_else(|| panic!("not connected: {:?}", n.stats(0, c2)));
    eprintln!("second call connected {took:?} after it was placed");
    assert!(took < secs(2), "connected after {took:?}");
}

/// A node places a call as soon as it is attached, before its own record (which
/// the invite carries) is published: the invite waits for the record instead of
/// never going out.
#[test]
fn a_call_placed_before_the_own_record_exists_waits_for_it() {
    let mut n = net(511, &[Site::Public], 25, auto_answer);
    let seeds: Vec<Contact> = (0..SEEDS)
        .map(|i| Contact {
            addr: SocketAddr::from((Ipv4Addr::new(198, 51, 100, i as u8 + 1), PORT)),
            key: Some(n.sim.node(n.nodes[i]).status().peer_key),
        })
        .collect();
    let mut config = Config::new(
        Identity::from_seed(n.sim.derive_seed(90_001)),
        n.sim.derive_seed(90_002),
    );
    config.seeds = seeds;
    config.role = Role::Ordinary;
    let host = n
        .sim
        .add_host(Ipv4Addr::new(203, 0, 113, 77))
        .expect("host");
    let late = n
        .sim
        .add_node(host, PORT, Node::new(config, n.sim.now()))
        .expect("node");
    let attached = n.sim.run_until_pred(n.sim.now() + secs(30), |s| {
        let o = s.node(late).overlay();
        !o.homes().is_empty() && o.own_record().is_none()
    });
    assert!(attached, "attached with no record published yet");
    let handle = Handle::new(&format!("user{}", n.user(0))).expect("handle");
    let call = n
        .sim
        .with_node(late, |node, now| node.call(now, CallTarget::Handle(handle)));
    let ok = n.sim.run_until_pred(n.sim.now() + secs(10), |s| {
        s.node(late)
            .call_stats(s.now(), call)
            .is_some_and(|c| c.state == CallState::Active || c.state == CallState::Ended)
    });
    let stats = n
        .sim
        .node(late)
        .call_stats(n.sim.now(), call)
        .expect("call");
    assert!(ok && stats.state == CallState::Active, "{stats:?}");
}

/// The kinds of paths that are up (usable) on a call.
fn kinds_up(s: &CallStats) -> Vec<PathKind> {
    s.paths
        .iter()
        .filter(|p| {
            !matches!(
                p.state,
                peercall_engine::PathState::Silent | peercall_engine::PathState::Unvalidated
            )
        })
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
    // Hang-up: both ends give their channels back, and the relayed session closes.
    n.sim
        .with_node(n.nodes[n.user(1)], |node, now| node.hangup(now, cb))
        .expect("hang up");
    n.sim.run_for(secs(2));
    assert_eq!(n.ended(0, ca), Some(EndReason::HungUp(Side::Remote)));
    let channels: u64 = (0..SEEDS)
        .map(|i| n.sim.node(n.nodes[i]).stats().relay.channels)
        .sum();
    assert_eq!(channels, 0);
    let callee = n.node(1).status().peer_key;
    assert!(n.node(0).status().sessions.iter().all(|s| s.peer != callee));
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

/// Cuts the direct way between the two users mid-call, `offset` into a frame
/// interval; returns, per side, how long after the cut the call left the direct
/// path, and both calls' stats after 5 s.
fn cut_direct_mid_call(
    n: &mut Net,
    offset: Duration,
) -> ([Duration; 2], CallStats, CallStats, CutId) {
    let (ca, cb) = n.connect(0, 1, secs(5));
    n.talk(&[(0, ca), (1, cb)], secs(5));
    assert_eq!(n.stats(0, ca).active_path, Some(PathKind::Direct));
    let before = [n.stats(0, ca), n.stats(1, cb)];
    let cut_at = n.sim.now() + offset;
    let (a, b) = (n.site(0), n.site(1));
    let cut = n.sim.cut(cut_at, &[a], &[b]).expect("cut");
    n.talk(&[(0, ca), (1, cb)], secs(5));
    let mut left = [Duration::MAX; 2];
    for (side, (u, call)) in [(0, ca), (1, cb)].into_iter().enumerate() {
        left[side] = n
            .events(u)
            .iter()
            .find_map(|(at, e)| match e {
                Event::CallPathSwitched {
                    call: c,
                    from: Some(PathKind::Direct),
                    ..
                } if *c == call && *at >= cut_at => Some(at.saturating_since(cut_at)),
                _ => None,
            })
            .unwrap_or(Duration::MAX);
    }
    let (sa, sb) = (n.stats(0, ca), n.stats(1, cb));
    eprintln!("left the direct path after {left:?}");
    eprintln!(
        "caller before: lost {} concealed {}",
        before[0].media.lost, before[0].concealed_ms
    );
    eprintln!("caller: {sa:?}");
    eprintln!("callee: {sb:?}");
    (left, sa, sb, cut)
}

/// Seeds the dead-path test runs over: enough for a median, few enough for the
/// 2-core CI machine (each seed is about a second of wall time).
const DEAD_PATH_SEEDS: u64 = 5;

/// The bound on leaving a dead active path: max(3 × RTT, 150 ms), with the
/// direct path's smoothed RTT as measured when it died.
fn leave_bound(s: &CallStats) -> Duration {
    let rtt = s
        .paths
        .iter()
        .find(|p| p.kind == PathKind::Direct)
        .and_then(|p| p.rtt)
        .expect("the direct path was measured");
    (rtt * 3).max(ms(150))
}

/// The bound on concealed audio when the active path dies.
const CONCEALED_BOUND_MS: u64 = 60;

/// How soon after the direct way heals the call must be back on it (the issue's
/// "about 10 s"): the router returns to a path left for silence after
/// `RETURN_CLEAN` (5 s) of answered probes, probed warm (every 250 ms) meanwhile;
/// measured 5.2 s. The rest is slack for a probe lost at random, which restarts
/// the clean time.
const BACK_BOUND: Duration = Duration::from_secs(10);

fn median<T: Ord + Copy>(v: &mut [T]) -> T {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn a_dead_direct_path_is_left_fast_with_little_concealment() {
    let base = seed_from_env(505).expect("PEERCALL_SIM_SEED must be a u64");
    let (mut lefts, mut concealed, mut backs) = (Vec::new(), Vec::new(), Vec::new());
    for seed in base..base + DEAD_PATH_SEEDS {
        let mut n = net(seed, &[Site::Public, Site::Public], 25, auto_answer);
        // So that each seed draws its own run: ± 2 ms of jitter (order kept) on
        // every link, and the cut at a different point of the frame interval.
        let sites = n.sites.clone();
        for &x in &sites {
            for &y in &sites {
                if x != y {
                    let link = LinkConfig {
                        jitter: ms(2),
                        fifo: true,
                        ..LinkConfig::new(ms(25))
                    };
                    n.sim.set_link(x, y, link).expect("link");
                }
            }
        }
        let offset = ms(u64::from(n.sim.derive_seed(7)[0]) % 20);
        let (left, sa, sb, cut) = cut_direct_mid_call(&mut n, offset);
        for (d, s) in left.iter().zip([&sa, &sb]) {
            let bound = leave_bound(s);
            assert!(
                *d <= bound,
                "seed {seed}: left after {left:?}, bound {bound:?}"
            );
        }
        assert_eq!(sa.state, CallState::Active);
        assert!(
            matches!(sa.active_path, Some(PathKind::Relay1 | PathKind::Relay2)),
            "{sa:?}"
        );
        // Redundancy `Auto`: the quiet trigger (the peer's media missing for two
        // frame intervals plus a jitter margin) starts a copy on the next path and
        // re-sends what the dead path may have lost; the jitter buffer plays the
        // re-sent frames late rather than losing them. What is left concealed is the
        // time from the buffer running dry to the first re-sent frame's arrival.
        for s in [&sa, &sb] {
            assert!(
                s.concealed_ms <= CONCEALED_BOUND_MS,
                "seed {seed}: concealed {} ms: {s:?}",
                s.concealed_ms
            );
            assert!(s.max_gap_ms <= CONCEALED_BOUND_MS, "seed {seed}: {s:?}");
        }
        // The direct way comes back: the call returns to it once it has answered
        // every probe for a few seconds.
        let healed = n.sim.now();
        n.sim.heal(healed, cut).expect("heal");
        let (ca, cb) = (sa.id, sb.id);
        n.talk(&[(0, ca), (1, cb)], secs(15));
        let mut back = Duration::ZERO;
        for (u, call) in [(0, ca), (1, cb)] {
            let at = n
                .events(u)
                .iter()
                .find_map(|(at, e)| match e {
                    Event::CallPathSwitched {
                        call: c,
                        to: PathKind::Direct,
                        ..
                    } if *c == call && *at > healed => Some(at.saturating_since(healed)),
                    _ => None,
                })
                .unwrap_or(Duration::MAX);
            back = back.max(at);
            assert_eq!(n.stats(u, call).active_path, Some(PathKind::Direct));
        }
        assert!(back <= BACK_BOUND, "seed {seed}: back after {back:?}");
        let worst = sa.concealed_ms.max(sb.concealed_ms);
        eprintln!(
            "seed {seed} (cut {offset:?} into a frame): left after {left:?}, concealed {} / {} ms, back on direct {back:?} after the heal, copies {} / {} of {} / {} frames",
            sa.concealed_ms,
            sb.concealed_ms,
            sa.frames_duplicated,
            sb.frames_duplicated,
            sa.frames_sent,
            sb.frames_sent,
        );
        lefts.push(left[0].max(left[1]));
        concealed.push(worst);
        backs.push(back);
    }
    eprintln!(
        "medians over {DEAD_PATH_SEEDS} seeds from {base}: left after {:?}, concealed {} ms (worse side), back on direct {:?}",
        median(&mut lefts),
        median(&mut concealed),
        median(&mut backs)
    );
}

#[test]
fn with_redundancy_no_frame_is_lost_when_a_path_dies() {
    let mut n = net(506, &[Site::Public, Site::Public], 25, |_, c| {
        c.calls.auto_answer = true;
        c.calls.redundancy = RedundancyMode::Always;
    });
    let (left, sa, sb, _) = cut_direct_mid_call(&mut n, Duration::ZERO);
    assert!(left.iter().all(|d| *d <= ms(150)), "left after {left:?}");
    for s in [&sa, &sb] {
        assert_eq!(s.media.lost, 0, "{s:?}");
        assert_eq!(s.concealed_ms, 0, "{s:?}");
        assert!(s.media.duplicate > 0 || s.frames_received > 0);
    }
}

#[test]
fn no_flapping_with_random_loss() {
    let mut n = net(507, &[Site::Public, Site::Public], 25, auto_answer);
    // 1-5 % random loss on every link, drawn per pair.
    let hosts: Vec<HostId> = n.sites.clone();
    for (i, &x) in hosts.iter().enumerate() {
        for (j, &y) in hosts.iter().enumerate() {
            if i != j {
                let loss =
                    0.01 + 0.04 * f64::from(n.sim.derive_seed((i * 31 + j) as u64)[0]) / 255.0;
                n.sim
                    .set_link(
                        x,
                        y,
                        LinkConfig {
                            loss,
                            ..LinkConfig::new(ms(25))
                        },
                    )
                    .expect("link");
            }
        }
    }
    let (ca, cb) = n.connect(0, 1, secs(5));
    let talk = 120;
    n.talk(&[(0, ca), (1, cb)], secs(talk));
    let (sa, sb) = (n.stats(0, ca), n.stats(1, cb));
    for (who, s) in [("caller", &sa), ("callee", &sb)] {
        eprintln!(
            "{who}: switches {} {:?}; copies {} of {} frames ({:.1} %), concealed {} ms",
            s.path_switches,
            s.paths_used,
            s.frames_duplicated,
            s.frames_sent,
            100.0 * s.frames_duplicated as f64 / s.frames_sent as f64,
            s.concealed_ms,
        );
    }
    for s in [&sa, &sb] {
        assert_eq!(s.state, CallState::Active);
        // At most one switch per 30 s.
        assert!(
            s.path_switches <= talk / 30,
            "{} switches: {s:?}",
            s.path_switches
        );
    }
}

/// How long the direct way stays up, then down, over and over, in the flapping
/// test: shorter than the router's 5 s clean time before a return, as a path
/// that fails every few seconds does.
const FLAP_HALF_PERIOD: Duration = Duration::from_secs(4);

#[test]
fn a_flapping_direct_path_does_not_make_the_call_flap() {
    let mut n = net(514, &[Site::Public, Site::Public], 25, auto_answer);
    let (ca, cb) = n.connect(0, 1, secs(5));
    n.talk(&[(0, ca), (1, cb)], secs(5));
    assert_eq!(n.stats(0, ca).active_path, Some(PathKind::Direct));
    let (a, b) = (n.site(0), n.site(1));
    let talk = 60;
    let end = n.sim.now() + secs(talk);
    while n.sim.now() < end {
        let now = n.sim.now();
        let cut = n.sim.cut(now, &[a], &[b]).expect("cut");
        n.talk(&[(0, ca), (1, cb)], FLAP_HALF_PERIOD);
        let now = n.sim.now();
        n.sim.heal(now, cut).expect("heal");
        n.talk(&[(0, ca), (1, cb)], FLAP_HALF_PERIOD);
    }
    let (sa, sb) = (n.stats(0, ca), n.stats(1, cb));
    for (who, s) in [("caller", &sa), ("callee", &sb)] {
        eprintln!(
            "{who}: switches {} {:?}, concealed {} ms",
            s.path_switches, s.paths_used, s.concealed_ms
        );
        assert_eq!(s.state, CallState::Active);
        // The first cut moves the call off the direct path; the flapping path is
        // never clean long enough to get it back: at most one switch per 30 s.
        assert!(
            s.path_switches <= talk / 30,
            "{} switches: {s:?}",
            s.path_switches
        );
        assert!(
            matches!(s.active_path, Some(PathKind::Relay1 | PathKind::Relay2)),
            "{s:?}"
        );
    }
}

fn events_of(n: &Net, u: usize) -> Vec<Event> {
    n.events(u).into_iter().map(|(_, e)| e).collect()
}

#[test]
fn calling_an_unknown_user_fails_with_not_found() {
    let mut n = net(508, &[Site::Public], 25, |_, _| {});
    let handle = Handle::new("nobody").expect("handle");
    let id = n.nodes[n.user(0)];
    let call = n
        .sim
        .with_node(id, |node, now| node.call(now, CallTarget::Handle(handle)));
    n.sim.run_for(secs(5));
    assert_eq!(n.ended(0, call), Some(EndReason::NotFound));
    let c = n.node(0).stats().calls;
    assert_eq!(c.ended[1], 1, "{c:?}");
    assert_eq!(EndReason::NotFound.label(), "not_found");
}

#[test]
fn an_unanswered_call_ends_with_no_answer_on_both_sides() {
    let mut n = net(509, &[Site::Public, Site::Public], 25, |_, c| {
        c.calls.ring_timeout = secs(3);
    });
    let ca = n.call(0, 1);
    n.sim.run_for(secs(2));
    assert!(events_of(&n, 0).contains(&Event::CallRinging { call: ca }));
    let cb = n.incoming(1).expect("invited");
    assert_eq!(n.stats(1, cb).state, CallState::Incoming);
    n.sim.run_for(secs(3));
    assert_eq!(n.ended(0, ca), Some(EndReason::NoAnswer));
    assert_eq!(n.ended(1, cb), Some(EndReason::NoAnswer));
}

#[test]
fn rejected_and_busy_calls_say_so() {
    let mut n = net(
        510,
        &[Site::Public, Site::Public, Site::Public],
        25,
        |u, c| {
            c.calls.auto_answer = u == 2;
        },
    );
    // Declined.
    let ca = n.call(0, 1);
    n.sim.run_for(secs(1));
    let cb = n.incoming(1).expect("invited");
    let id = n.nodes[n.user(1)];
    n.sim
        .with_node(id, |node, now| node.reject(now, cb))
        .expect("reject");
    n.sim.run_for(secs(1));
    assert_eq!(n.ended(0, ca), Some(EndReason::Rejected));
    assert_eq!(n.ended(1, cb), Some(EndReason::Rejected));
    // User 2 is in a call with user 1; user 0 gets busy.
    let (c1, c2) = n.connect(1, 2, secs(5));
    let again = n.call(0, 2);
    n.talk(&[(1, c1), (2, c2)], secs(2));
    assert_eq!(n.ended(0, again), Some(EndReason::Busy));
    assert_eq!(n.node(2).stats().calls.busy_rejected, 1);
    assert_eq!(n.stats(2, c2).state, CallState::Active);
}

#[test]
fn replayed_handshakes_and_packets_make_no_second_call() {
    // Every datagram between the two users arrives twice.
    let mut n = net(511, &[Site::Public, Site::Public], 25, auto_answer);
    let (a, b) = (n.site(0), n.site(1));
    let dup = LinkConfig {
        duplicate: 1.0,
        ..LinkConfig::new(ms(25))
    };
    n.sim.set_link(a, b, dup.clone()).expect("link");
    n.sim.set_link(b, a, dup).expect("link");
    let (ca, cb) = n.connect(0, 1, secs(5));
    n.talk(&[(0, ca), (1, cb)], secs(2));
    let incoming = events_of(&n, 1)
        .iter()
        .filter(|e| matches!(e, Event::CallIncoming { .. }))
        .count();
    assert_eq!(incoming, 1);
    let st = n.node(1).stats();
    let replays = st.dropped(peercall_engine::DropReason::Replay)
        + st.dropped(peercall_engine::DropReason::StaleTimestamp);
    assert!(replays > 50, "replays dropped: {replays}");
    assert_eq!(n.stats(1, cb).media.lost, 0);
}

#[test]
fn relay_quota_refusals_are_counted_and_the_call_goes_on() {
    let mut n = net(512, &[Site::Public, Site::Public], 25, auto_answer);
    // Every relay allows each client no channel at all.
    for i in 0..SEEDS {
        let id = n.nodes[i];
        n.sim.with_node(id, |node, _| {
            node.set_relay_config(peercall_engine::RelayConfig {
                max_channels_per_client: 0,
                ..peercall_engine::RelayConfig::default()
            })
        });
    }
    let (ca, cb) = n.connect(0, 1, secs(5));
    n.talk(&[(0, ca), (1, cb)], secs(2));
    let sa = n.stats(0, ca);
    assert_eq!(sa.active_path, Some(PathKind::Direct));
    assert!(
        sa.paths.iter().all(|p| p.kind == PathKind::Direct),
        "{sa:?}"
    );
    assert!(n.node(0).stats().calls.relay_refusals >= 1);
    let quota: u64 = (0..SEEDS)
        .map(|i| {
            n.sim
                .node(n.nodes[i])
                .stats()
                .relay
                .dropped(RelayDrop::Quota)
        })
        .sum();
    assert!(quota >= 2, "quota refusals {quota}");
    let _ = cb;
}

/// Set-up to first audio with 50 ms one-way links (100 ms RTT, ± 10 ms jitter, 1 %
/// loss) everywhere, over many seeds: the caller's time from `call` to the callee's
/// first audio played, p50 ≤ 1 s, both for users behind port-restricted NATs
/// (direct path) and behind symmetric NATs (relayed).
#[test]
fn setup_to_first_audio_p50_with_50ms_links() {
    let base = seed_from_env(600).expect("PEERCALL_SIM_SEED must be a u64");
    for (name, nat) in [
        ("port-restricted", NatType::PortRestricted),
        ("symmetric", NatType::Symmetric),
    ] {
        let site = Site::Nat(nat);
        let mut first_audio = Vec::new();
        let mut setup = Vec::new();
        for k in 0..15 {
            let mut n = net(base + k, &[site, site], 50, auto_answer);
            // 50 ± 10 ms, 1 % loss on every link, so each seed draws its own run.
            let sites = n.sites.clone();
            for &x in &sites {
                for &y in &sites {
                    if x != y {
                        let link = LinkConfig {
                            jitter: ms(10),
                            fifo: true,
                            loss: 0.01,
                            ..LinkConfig::new(ms(50))
                        };
                        n.sim.set_link(x, y, link).expect("link");
                    }
                }
            }
            let (ca, _) = n.connect(0, 1, secs(10));
            let s = n.stats(0, ca);
            setup.push(s.setup_ms.expect("connected"));
            first_audio.push(s.first_audio_ms.expect("audio"));
        }
        setup.sort_unstable();
        first_audio.sort_unstable();
        let p50 = |v: &[u64]| v[v.len() / 2];
        eprintln!(
            "{name}: set-up ms p50 {} (min {}, max {}); first audio ms p50 {} (min {}, max {}) over {} seeds from {base}",
            p50(&setup),
            setup[0],
            setup[setup.len() - 1],
            p50(&first_audio),
            first_audio[0],
            first_audio[first_audio.len() - 1],
            first_audio.len()
        );
        assert!(p50(&first_audio) <= 1_000, "{name}: {first_audio:?}");
    }
}

/// Both users behind symmetric NATs, and each cut off from every supernode but one
/// of its homes (different ones): only the two-relay path (caller's supernode →
/// callee's supernode) can carry the call.
#[test]
fn two_relay_path_carries_the_call_when_one_relay_paths_die() {
    let sym = Site::Nat(NatType::Symmetric);
    let base = seed_from_env(520).expect("PEERCALL_SIM_SEED must be a u64");
    // The first seed whose users have a home the other has not.
    let mut n = None;
    for k in 0..20 {
        let net = net(base + k, &[sym, sym], 25, auto_answer);
        let ha: Vec<_> = net
            .node(0)
            .overlay()
            .homes()
            .into_iter()
            .map(|h| h.0)
            .collect();
        let hb: Vec<_> = net
            .node(1)
            .overlay()
            .homes()
            .into_iter()
            .map(|h| h.0)
            .collect();
        if hb.iter().any(|b| *b != ha[0]) {
            n = Some((net, ha, hb));
            break;
        }
    }
    let (mut n, ha, hb) = n.expect("a seed with distinct homes");
    let (ca, cb) = n.connect(0, 1, secs(5));
    n.talk(&[(0, ca), (1, cb)], secs(3));
    let sa = n.stats(0, ca);
    assert!(
        sa.paths
            .iter()
            .any(|p| p.kind == PathKind::Relay2 && p.rtt.is_some()),
        "a working two-relay path: {sa:?}"
    );
    // The caller's side of the two-relay path is its first home; the callee's is
    // its first home that differs.
    let sa_key = ha[0];
    let sb_key = *hb.iter().find(|b| **b != sa_key).expect("distinct");
    let seed_of = |k| {
        (0..SEEDS)
            .find(|&i| n.sim.node(n.nodes[i]).status().peer_key == k)
            .expect("a seed")
    };
    let (ia, ib) = (seed_of(sa_key), seed_of(sb_key));
    let others_a: Vec<HostId> = (0..SEEDS)
        .filter(|&i| i != ia)
        .map(|i| n.sites[i])
        .collect();
    let others_b: Vec<HostId> = (0..SEEDS)
        .filter(|&i| i != ib)
        .map(|i| n.sites[i])
        .collect();
    let now = n.sim.now();
    let (a, b) = (n.site(0), n.site(1));
    n.sim.cut(now, &[a], &others_a).expect("cut");
    n.sim.cut(now, &[b], &others_b).expect("cut");
    n.talk(&[(0, ca), (1, cb)], secs(5));
    let (sa, sb) = (n.stats(0, ca), n.stats(1, cb));
    eprintln!("caller: {sa:?}");
    assert_eq!(sa.state, CallState::Active, "{sa:?}");
    assert_eq!(sa.active_path, Some(PathKind::Relay2), "{sa:?}");
    assert_eq!(sb.active_path, Some(PathKind::Relay2), "{sb:?}");
    // Audio kept flowing: the last seconds were not concealed.
    assert!(sa.max_gap_ms <= 500, "{sa:?}");
    let before = sa.frames_received;
    n.talk(&[(0, ca), (1, cb)], secs(2));
    assert!(n.stats(0, ca).frames_received >= before + 90);
}

#[test]
fn a_vanished_peer_ends_the_call_as_lost() {
    let mut n = net(513, &[Site::Public, Site::Public], 25, auto_answer);
    let (ca, cb) = n.connect(0, 1, secs(5));
    n.talk(&[(0, ca), (1, cb)], secs(2));
    let gone = n.nodes[n.user(1)];
    n.sim.set_online(gone, false);
    let at = n.sim.now();
    n.talk(&[(0, ca)], secs(12));
    assert_eq!(n.ended(0, ca), Some(EndReason::Lost));
    let when = n
        .events(0)
        .iter()
        .find_map(|(t, e)| matches!(e, Event::CallEnded { .. }).then_some(*t))
        .expect("ended");
    let after = when.saturating_since(at);
    assert!(after <= secs(11), "ended after {after:?}");
    assert_eq!(n.node(0).stats().calls.ended[6], 1);
}
