//! Engine sessions on the simulator: handshakes, keepalives, rekeying, timeouts,
//! re-dialing and graceful close, on a lossy, jittery virtual network.

use std::net::Ipv4Addr;
use std::time::Duration;

use peercall_crypto::Identity;
use peercall_engine::{Config, Contact, DropReason, Event, Node};
use peercall_sim::{HostId, LinkConfig, NodeId, Sim, seed_from_env};
use peercall_wire::Time;

struct Net {
    sim: Sim<Node>,
    hosts: Vec<HostId>,
    nodes: Vec<NodeId>,
    ids: Vec<Identity>,
}

/// `n` public nodes; node i > 0 has node 0 as its seed (with or without its key).
fn net(seed: u64, n: u8, link: LinkConfig, seed_key_known: bool) -> Net {
    let mut sim: Sim<Node> =
        Sim::new(seed_from_env(seed).expect("PEERCALL_SIM_SEED must be a u64"));
    sim.set_default_link(link).expect("valid link");
    let ids: Vec<Identity> = (0..n)
        .map(|i| Identity::from_seed(sim.derive_seed(u64::from(i))))
        .collect();
    let hosts: Vec<HostId> = (0..n)
        .map(|i| {
            sim.add_host(Ipv4Addr::new(198, 51, 100, i + 1))
                .expect("host")
        })
        .collect();
    let first = std::net::SocketAddr::from((Ipv4Addr::new(198, 51, 100, 1), 7600));
    let mut nodes = Vec::new();
    for i in 0..n {
        let mut config = Config::new(
            ids[i as usize].clone(),
            sim.derive_seed(1000 + u64::from(i)),
        );
        if i > 0 {
            config.seeds.push(Contact {
                addr: first,
                key: seed_key_known.then(|| ids[0].peer_key()),
            });
        }
        let node = Node::new(config, sim.now());
        nodes.push(sim.add_node(hosts[i as usize], 7600, node).expect("node"));
    }
    Net {
        sim,
        hosts,
        nodes,
        ids,
    }
}

fn wan() -> LinkConfig {
    let mut l = LinkConfig::new(Duration::from_millis(40));
    l.jitter = Duration::from_millis(10);
    l.loss = 0.02;
    l
}

fn peer_ups(sim: &Sim<Node>, node: NodeId) -> Vec<Time> {
    sim.events()
        .iter()
        .filter(|r| r.node == node && matches!(r.event, Event::PeerUp { .. }))
        .map(|r| r.at)
        .collect()
}

fn peer_downs(sim: &Sim<Node>, node: NodeId) -> Vec<&'static str> {
    sim.events()
        .iter()
        .filter(|r| r.node == node)
        .filter_map(|r| match r.event {
            Event::PeerDown { reason, .. } => Some(reason),
            _ => None,
        })
        .collect()
}

#[test]
fn ik_session_comes_up_and_keeps_alive() {
    let mut net = net(1, 2, wan(), true);
    let start = net.sim.now();
    net.sim.run_for(Duration::from_secs(60));
    let (a, b) = (net.nodes[0], net.nodes[1]);
    let ups = peer_ups(&net.sim, b);
    assert!(!ups.is_empty(), "the dialer saw its seed come up");
    assert!(
        ups[0].saturating_since(start) < Duration::from_secs(3),
        "up within a few round trips even with 2% loss: {:?}",
        ups[0].saturating_since(start)
    );
    assert!(!peer_ups(&net.sim, a).is_empty(), "the seed saw the dialer");
    for &n in &net.nodes {
        let s = net.sim.node(n).stats();
        assert_eq!(s.sessions, 1);
        assert!(s.keepalives_received >= 3, "keepalives flow: {s:?}");
        assert!(peer_downs(&net.sim, n).is_empty());
        let st = net.sim.node(n).status();
        assert_eq!(st.sessions.len(), 1);
    }
    let status = net.sim.node(a).status();
    assert_eq!(status.sessions[0].peer, net.ids[1].peer_key());
    assert_eq!(status.sessions[0].addr, net.sim.addr(b));
}

#[test]
fn xx_first_contact_learns_the_key() {
    let mut net = net(2, 2, LinkConfig::new(Duration::from_millis(25)), false);
    net.sim.run_for(Duration::from_secs(5));
    let b = net.nodes[1];
    let status = net.sim.node(b).status();
    assert_eq!(status.sessions.len(), 1);
    assert_eq!(
        status.sessions[0].peer,
        net.ids[0].peer_key(),
        "XX revealed the seed's key"
    );
}

#[test]
fn sessions_survive_rekeys_without_drops() {
    let mut net = net(3, 2, LinkConfig::new(Duration::from_millis(30)), true);
    net.sim.run_for(Duration::from_secs(500));
    for &n in &net.nodes {
        let s = net.sim.node(n).stats();
        assert!(
            peer_downs(&net.sim, n).is_empty(),
            "no session loss across rekeys"
        );
        assert_eq!(s.sessions, 1);
        assert_eq!(s.dropped(DropReason::ExpiredKey), 0, "{s:?}");
        assert_eq!(s.dropped(DropReason::Decrypt), 0, "{s:?}");
        // Idle sessions carry a keepalive every 10 s; overlay control frames (the
        // dialer's attach attempts) stand in for some of them.
        assert!(s.keepalives_received + s.control_in >= 40, "{s:?}");
    }
    // 500 s at one rekey per 120 s: the initial handshake and at least three rekeys.
    let total: u64 = net
        .nodes
        .iter()
        .map(|&n| net.sim.node(n).stats().handshakes_completed)
        .sum();
    assert!(
        total >= 2 * 4,
        "handshakes completed on both sides: {total}"
    );
}

#[test]
fn dead_peer_times_out_and_is_redialed_after_heal() {
    let mut net = net(4, 2, LinkConfig::new(Duration::from_millis(20)), true);
    net.sim.run_for(Duration::from_secs(5));
    let (a, b) = (net.nodes[0], net.nodes[1]);
    let cut_at = net.sim.now();
    let cut = net
        .sim
        .cut(cut_at, &[net.hosts[0]], &[net.hosts[1]])
        .expect("cut");
    net.sim.run_for(Duration::from_secs(60));
    assert_eq!(peer_downs(&net.sim, a), vec!["timed out"]);
    assert_eq!(peer_downs(&net.sim, b), vec!["timed out"]);
    assert_eq!(net.sim.node(a).stats().sessions, 0);
    let heal_at = net.sim.now();
    net.sim.heal(heal_at, cut).expect("heal");
    net.sim.run_for(Duration::from_secs(40));
    assert_eq!(
        net.sim.node(b).stats().sessions,
        1,
        "the dialer reconnected to its seed"
    );
    let ups = peer_ups(&net.sim, b);
    assert_eq!(ups.len(), 2);
    assert!(
        ups[1].saturating_since(heal_at) <= Duration::from_secs(31),
        "re-dial back-off is capped: {:?}",
        ups[1].saturating_since(heal_at)
    );
}

#[test]
fn close_tells_the_peer() {
    let mut net = net(5, 3, LinkConfig::new(Duration::from_millis(20)), true);
    net.sim.run_for(Duration::from_secs(3));
    let seed = net.nodes[0];
    assert_eq!(net.sim.node(seed).stats().sessions, 2);
    let at = net.sim.now();
    net.sim.schedule(at, net.nodes[1], |n, now| n.close(now));
    net.sim.run_for(Duration::from_secs(1));
    assert_eq!(peer_downs(&net.sim, seed), vec!["closed by peer"]);
    assert_eq!(net.sim.node(seed).stats().sessions, 1);
    assert_eq!(net.sim.node(net.nodes[1]).stats().sessions, 0);
    // A closed node stays quiet: it neither re-dials nor answers timers.
    let sent = net.sim.traffic(net.nodes[1]).sent;
    net.sim.run_for(Duration::from_secs(60));
    assert_eq!(net.sim.traffic(net.nodes[1]).sent, sent);
}

#[test]
fn same_seed_same_trace() {
    let trace = |seed| {
        let mut net = net(seed, 3, wan(), true);
        net.sim.run_for(Duration::from_secs(200));
        let events: Vec<String> = net
            .sim
            .events()
            .iter()
            .map(|r| format!("{:?}", (r.at, r.node, &r.event)))
            .collect();
        let stats: Vec<_> = net.nodes.iter().map(|&n| net.sim.node(n).stats()).collect();
        (events, stats)
    };
    assert_eq!(trace(6), trace(6));
    assert_ne!(trace(6).1, trace(7).1);
}
