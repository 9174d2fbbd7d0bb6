//! Smoke test: the harness drives real `peercall_engine::Node`s.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use peercall_crypto::Identity;
use peercall_engine::{Config, Contact, Event, Node, Transmit};
use peercall_sim::echo::{Echo, EchoKind, EchoNode};
use peercall_sim::{Drivable, Sim, seed_from_env};
use peercall_wire::Time;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// Engine nodes next to an echo node that pokes them with datagrams.
enum Mixed {
    Engine(Box<Node>),
    Echo(EchoNode),
}

#[derive(Debug)]
#[allow(dead_code)] // Read only through Debug, when a run is inspected.
enum MixedEvent {
    Engine(Event),
    Echo(Echo),
}

impl Mixed {
    fn engine(&self) -> &Node {
        match self {
            Mixed::Engine(n) => n,
            Mixed::Echo(_) => panic!("not an engine node"),
        }
    }
}

impl Drivable for Mixed {
    type Event = MixedEvent;

    fn handle_datagram(&mut self, now: Time, from: SocketAddr, datagram: &[u8]) {
        match self {
            Mixed::Engine(n) => n.as_mut().handle_datagram(now, from, datagram),
            Mixed::Echo(n) => n.handle_datagram(now, from, datagram),
        }
    }

    fn handle_timeout(&mut self, now: Time) {
        match self {
            Mixed::Engine(n) => Drivable::handle_timeout(n.as_mut(), now),
            Mixed::Echo(n) => n.handle_timeout(now),
        }
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        match self {
            Mixed::Engine(n) => Drivable::poll_transmit(n.as_mut()),
            Mixed::Echo(n) => n.poll_transmit(),
        }
    }

    fn poll_event(&mut self) -> Option<MixedEvent> {
        match self {
            Mixed::Engine(n) => Drivable::poll_event(n.as_mut()).map(MixedEvent::Engine),
            Mixed::Echo(n) => n.poll_event().map(MixedEvent::Echo),
        }
    }

    fn poll_timeout(&mut self) -> Option<Time> {
        match self {
            Mixed::Engine(n) => Drivable::poll_timeout(n.as_mut()),
            Mixed::Echo(n) => n.poll_timeout(),
        }
    }
}

#[test]
fn drives_two_engine_nodes() {
    let mut sim: Sim<Mixed> = Sim::new(seed_from_env(41).expect("PEERCALL_SIM_SEED must be a u64"));
    let mut identities = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..2u8 {
        let host = sim
            .add_host(Ipv4Addr::new(198, 51, 100, i + 1))
            .expect("host");
        let identity =
            Identity::generate(&mut ChaCha20Rng::from_seed(sim.derive_seed(u64::from(i))));
        identities.push(identity.clone());
        let config = Config::new(identity, sim.derive_seed(100 + u64::from(i)));
        let node = Node::new(config, sim.now());
        nodes.push(
            sim.add_node(host, 4433, Mixed::Engine(Box::new(node)))
                .expect("node"),
        );
    }
    let poker_host = sim.add_host(Ipv4Addr::new(198, 51, 100, 9)).expect("host");
    let poker = sim
        .add_node(poker_host, 9, Mixed::Echo(EchoNode::new()))
        .expect("node");

    let (a, b) = (nodes[0], nodes[1]);
    let contact = Contact {
        addr: sim.addr(b),
        key: Some(identities[1].peer_key()),
    };
    sim.with_node(a, |n, now| match n {
        Mixed::Engine(node) => node.connect(now, contact),
        Mixed::Echo(_) => unreachable!("a is an engine node"),
    });
    let (to_a, to_b) = (sim.addr(a), sim.addr(b));
    sim.with_node(poker, |n, now| {
        if let Mixed::Echo(e) = n {
            e.stream(now, to_a, EchoKind::Data, Duration::from_millis(500), 3, 60);
            e.stream(now, to_b, EchoKind::Ping, Duration::from_millis(700), 2, 60);
        }
    });
    sim.run_for(Duration::from_secs(60));

    // Whatever the engine does today, the harness's view of its traffic and the
    // node's own counters agree, and the echo node's datagrams reached it.
    for &id in &nodes {
        let stats = sim.node(id).engine().stats();
        let seen = sim.traffic(id);
        assert_eq!(stats.datagrams_in, seen.received);
        assert_eq!(stats.bytes_in, seen.received_bytes);
        assert_eq!(stats.datagrams_out, seen.sent);
        assert_eq!(stats.bytes_out, seen.sent_bytes);
    }
    assert!(sim.traffic(a).received >= 3);
    assert!(sim.traffic(b).received >= 2);
    assert!(sim.now() >= Time::from_secs(peercall_sim::START.as_secs() + 60));
    for r in sim.events() {
        if let MixedEvent::Engine(Event::PeerUp { addr, .. }) = &r.event {
            assert!(
                *addr == to_a || *addr == to_b,
                "peers appear at their sim addresses"
            );
        }
    }
}
