//! NAT behaviour through the whole network: translation, filtering per type,
//! mapping timeouts, hairpinning, and hole punching between NATs.

mod common;

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use common::*;
use peercall_sim::echo::{EchoKind, EchoNode};
use peercall_sim::{HostId, NatConfig, NatType, NodeId, Sim};

const NAT_IP: [u8; 4] = [203, 0, 113, 1];

/// Two servers (s1 with nodes on ports 4000 and 4001, s2 on 4000) and a client
/// behind a NAT.
struct World {
    sim: Sim<EchoNode>,
    nat: HostId,
    s1_host: HostId,
    s1: NodeId,
    s1_other_port: NodeId,
    s2: NodeId,
    client: NodeId,
}

fn world(seed: u64, config: NatConfig) -> World {
    let mut sim = sim(seed);
    sim.set_default_link(link(20)).expect("valid");
    let s1_host = sim.add_host(ip(198, 51, 100, 1)).expect("host");
    let s2_host = sim.add_host(ip(198, 51, 100, 2)).expect("host");
    let [a, b, c, d] = NAT_IP;
    let nat = sim.add_nat(ip(a, b, c, d), config).expect("nat");
    let inside = sim.add_private_host(nat, ip(10, 0, 0, 2)).expect("host");
    let s1 = sim.add_node(s1_host, 4000, EchoNode::new()).expect("node");
    let s1_other_port = sim.add_node(s1_host, 4001, EchoNode::new()).expect("node");
    let s2 = sim.add_node(s2_host, 4000, EchoNode::new()).expect("node");
    let client = sim.add_node(inside, 5000, EchoNode::new()).expect("node");
    World {
        sim,
        nat,
        s1_host,
        s1,
        s1_other_port,
        s2,
        client,
    }
}

fn send(sim: &mut Sim<EchoNode>, from: NodeId, to: SocketAddr, kind: EchoKind, seq: u64) {
    sim.with_node(from, |n, now| n.send(now, to, kind, seq, 32));
}

/// The source address `node` saw on its latest message.
fn last_seen_from(sim: &Sim<EchoNode>, node: NodeId) -> SocketAddr {
    received(sim, node)
        .last()
        .expect("a message arrived")
        .event
        .from
}

/// Sends a data message from `from` to `to` and says whether it arrived.
fn gets_through(sim: &mut Sim<EchoNode>, from: NodeId, to: SocketAddr, receiver: NodeId) -> bool {
    let before = received(sim, receiver).len();
    send(sim, from, to, EchoKind::Data, 99);
    sim.run_for(Duration::from_secs(1));
    received(sim, receiver).len() > before
}

#[test]
fn outbound_source_is_rewritten_and_replies_come_back() {
    let mut w = world(20, NatConfig::new(NatType::PortRestricted));
    let s1 = w.sim.addr(w.s1);
    send(&mut w.sim, w.client, s1, EchoKind::Ping, 1);
    w.sim.run_for(Duration::from_secs(1));
    let seen = v4(last_seen_from(&w.sim, w.s1));
    let [a, b, c, d] = NAT_IP;
    assert_eq!(
        *seen.ip(),
        ip(a, b, c, d),
        "the server sees the NAT's public address"
    );
    assert!(seen.port() >= 1024);
    let pong = received(&w.sim, w.client);
    assert_eq!(pong.len(), 1, "the pong passed the NAT inbound");
    assert_eq!(pong[0].event.kind, EchoKind::Pong);
    assert_eq!(pong[0].event.from, s1, "inbound source is left as is");
    assert_eq!(w.sim.nat_mappings(w.nat), Ok(1));
}

#[test]
fn filtering_per_nat_type() {
    // (type, from a new port of a contacted IP, from a new IP, same mapping for every destination)
    let table = [
        (NatType::FullCone, true, true, true),
        (NatType::AddressRestricted, true, false, true),
        (NatType::PortRestricted, false, false, true),
        (NatType::Symmetric, false, false, false),
    ];
    for (nat_type, new_port_ok, new_ip_ok, endpoint_independent) in table {
        let mut w = world(21, NatConfig::new(nat_type));
        let (s1, s2) = (w.sim.addr(w.s1), w.sim.addr(w.s2));
        send(&mut w.sim, w.client, s1, EchoKind::Data, 1);
        w.sim.run_for(Duration::from_secs(1));
        let mapped = last_seen_from(&w.sim, w.s1);

        assert!(
            gets_through(&mut w.sim, w.s1, mapped, w.client),
            "{nat_type:?}: contacted endpoint"
        );
        assert_eq!(
            gets_through(&mut w.sim, w.s1_other_port, mapped, w.client),
            new_port_ok,
            "{nat_type:?}: new port of a contacted IP"
        );
        assert_eq!(
            gets_through(&mut w.sim, w.s2, mapped, w.client),
            new_ip_ok,
            "{nat_type:?}: an IP never contacted"
        );
        let blocked = u64::from(!new_port_ok) + u64::from(!new_ip_ok);
        assert_eq!(w.sim.stats().filtered_by_nat, blocked, "{nat_type:?}");

        send(&mut w.sim, w.client, s2, EchoKind::Data, 2);
        w.sim.run_for(Duration::from_secs(1));
        let mapped_for_s2 = last_seen_from(&w.sim, w.s2);
        assert_eq!(
            mapped == mapped_for_s2,
            endpoint_independent,
            "{nat_type:?}: mapping"
        );
        // A full-cone NAT accepts anyone once mapped, even a host that only heard of
        // the mapping second hand.
        if nat_type == NatType::FullCone {
            assert!(gets_through(&mut w.sim, w.s2, mapped, w.client));
        }
    }
}

#[test]
fn symmetric_nat_drops_replies_to_another_destinations_mapping() {
    let mut w = world(22, NatConfig::new(NatType::Symmetric));
    let (s1, s2) = (w.sim.addr(w.s1), w.sim.addr(w.s2));
    send(&mut w.sim, w.client, s1, EchoKind::Data, 1);
    send(&mut w.sim, w.client, s2, EchoKind::Data, 2);
    w.sim.run_for(Duration::from_secs(1));
    let for_s1 = last_seen_from(&w.sim, w.s1);
    let for_s2 = last_seen_from(&w.sim, w.s2);
    assert_ne!(
        for_s1.port(),
        for_s2.port(),
        "a new public port per destination"
    );
    assert_eq!(w.sim.nat_mappings(w.nat), Ok(2));
    assert!(!gets_through(&mut w.sim, w.s2, for_s1, w.client));
    assert!(gets_through(&mut w.sim, w.s2, for_s2, w.client));
}

#[test]
fn mappings_time_out_without_outbound_traffic() {
    let config = NatConfig {
        mapping_timeout: Duration::from_secs(30),
        ..NatConfig::new(NatType::PortRestricted)
    };
    let mut w = world(23, config);
    let s1 = w.sim.addr(w.s1);
    let t0 = w.sim.now();
    send(&mut w.sim, w.client, s1, EchoKind::Data, 1);
    w.sim.run_for(Duration::from_secs(1));
    let mapped = last_seen_from(&w.sim, w.s1);

    // Inbound traffic does not keep the mapping alive: it expires 30 s after the
    // client's last datagram left (the server's datagrams take 20 ms to arrive).
    w.sim.run_until(t0 + Duration::from_secs(28));
    assert!(
        gets_through(&mut w.sim, w.s1, mapped, w.client),
        "alive at 28 s"
    );
    w.sim.run_until(t0 + Duration::from_secs(31));
    assert!(
        !gets_through(&mut w.sim, w.s1, mapped, w.client),
        "gone at 31 s"
    );
    assert_eq!(w.sim.nat_mappings(w.nat), Ok(0));

    // Outbound traffic every 20 s keeps a new mapping alive indefinitely.
    let start = w.sim.now();
    w.sim.with_node(w.client, |n, now| {
        n.stream(now, s1, EchoKind::Data, Duration::from_secs(20), 10, 32)
    });
    w.sim.run_for(Duration::from_secs(1));
    let mapped = last_seen_from(&w.sim, w.s1);
    w.sim.run_until(start + Duration::from_secs(150));
    assert!(
        gets_through(&mut w.sim, w.s1, mapped, w.client),
        "refreshed mapping"
    );
    assert_eq!(
        last_seen_from(&w.sim, w.s1),
        mapped,
        "the same public port throughout"
    );
}

#[test]
fn hairpinning_is_off_by_default_and_works_when_enabled() {
    for hairpinning in [false, true] {
        let config = NatConfig {
            hairpinning,
            ..NatConfig::new(NatType::FullCone)
        };
        let mut w = world(24, config);
        let inside2 = w
            .sim
            .add_private_host(w.nat, ip(10, 0, 0, 3))
            .expect("host");
        let client2 = w
            .sim
            .add_node(inside2, 5000, EchoNode::new())
            .expect("node");
        let s1 = w.sim.addr(w.s1);
        send(&mut w.sim, w.client, s1, EchoKind::Data, 1);
        w.sim.run_for(Duration::from_secs(1));
        let client_public = last_seen_from(&w.sim, w.s1);
        send(&mut w.sim, client2, s1, EchoKind::Data, 2);
        w.sim.run_for(Duration::from_secs(1));
        let client2_public = last_seen_from(&w.sim, w.s1);

        let arrived = gets_through(&mut w.sim, w.client, client2_public, client2);
        assert_eq!(arrived, hairpinning);
        if hairpinning {
            assert_eq!(
                last_seen_from(&w.sim, client2),
                client_public,
                "source is the public mapping"
            );
        } else {
            assert_eq!(w.sim.stats().filtered_by_nat, 1);
        }
    }
}

#[test]
fn hosts_behind_one_nat_reach_each_other_privately() {
    let mut w = world(25, NatConfig::new(NatType::Symmetric));
    let inside2 = w
        .sim
        .add_private_host(w.nat, ip(10, 0, 0, 3))
        .expect("host");
    let client2 = w
        .sim
        .add_node(inside2, 5000, EchoNode::new())
        .expect("node");
    let to = w.sim.addr(client2);
    assert!(gets_through(&mut w.sim, w.client, to, client2));
    assert_eq!(
        last_seen_from(&w.sim, client2),
        w.sim.addr(w.client),
        "no translation on the LAN"
    );
    assert_eq!(w.sim.nat_mappings(w.nat), Ok(0));
    // From outside, the private address means nothing.
    assert!(!gets_through(&mut w.sim, w.s1, to, client2));
    assert_eq!(w.sim.stats().unroutable, 1);
}

#[test]
fn a_cut_on_a_nat_covers_the_hosts_behind_it() {
    let mut w = world(26, NatConfig::new(NatType::FullCone));
    let t = w.sim.now();
    w.sim.cut(t, &[w.nat], &[w.s1_host]).expect("hosts");
    let s1 = w.sim.addr(w.s1);
    assert!(!gets_through(&mut w.sim, w.client, s1, w.s1));
    assert_eq!(w.sim.stats().partitioned, 1);
    let s2 = w.sim.addr(w.s2);
    assert!(gets_through(&mut w.sim, w.client, s2, w.s2));
}

/// Two clients behind their own NATs learn their public addresses from a server,
/// then both ping each other at once (a pong goes back to wherever the ping came
/// from, as a real punch answers the observed source). Says whether each heard the
/// other.
fn hole_punch(seed: u64, left: NatType, right: NatType) -> (bool, bool) {
    let mut sim = sim(seed);
    sim.set_default_link(link(30)).expect("valid");
    let server_host = sim.add_host(ip(198, 51, 100, 1)).expect("host");
    let server = sim
        .add_node(server_host, 3478, EchoNode::new())
        .expect("node");
    let mut clients = Vec::new();
    for (i, t) in [left, right].into_iter().enumerate() {
        let i = i as u8;
        let nat = sim
            .add_nat(ip(203, 0, 113, 10 + i), NatConfig::new(t))
            .expect("nat");
        let host = sim.add_private_host(nat, ip(10, 0, i, 2)).expect("host");
        clients.push(sim.add_node(host, 5000, EchoNode::new()).expect("node"));
    }
    let to_server = sim.addr(server);
    let mut public: Vec<SocketAddrV4> = Vec::new();
    for &c in &clients {
        send(&mut sim, c, to_server, EchoKind::Data, 0);
        sim.run_for(Duration::from_secs(1));
        public.push(v4(last_seen_from(&sim, server)));
    }
    let (l, r) = (clients[0], clients[1]);
    let (l_pub, r_pub) = (SocketAddr::V4(public[0]), SocketAddr::V4(public[1]));
    sim.with_node(l, |n, now| {
        n.stream(now, r_pub, EchoKind::Ping, ms(100), 5, 32)
    });
    sim.with_node(r, |n, now| {
        n.stream(now, l_pub, EchoKind::Ping, ms(100), 5, 32)
    });
    sim.run_for(Duration::from_secs(2));
    let from_peer = |me: NodeId, peer_ip| {
        received(&sim, me)
            .iter()
            .any(|rec| v4(rec.event.from).ip() == peer_ip)
    };
    (from_peer(l, public[1].ip()), from_peer(r, public[0].ip()))
}

#[test]
fn hole_punching_works_between_cones_but_not_against_symmetric() {
    use NatType::*;
    assert_eq!(hole_punch(27, PortRestricted, PortRestricted), (true, true));
    assert_eq!(
        hole_punch(27, AddressRestricted, PortRestricted),
        (true, true)
    );
    // The symmetric side's pings leave from a new port: a cone that filters on the
    // address alone lets them in and its pongs get back, one that filters on the
    // port does not.
    assert_eq!(hole_punch(27, FullCone, Symmetric), (true, true));
    assert_eq!(hole_punch(27, AddressRestricted, Symmetric), (true, true));
    assert_eq!(hole_punch(27, PortRestricted, Symmetric), (false, false));
    assert_eq!(hole_punch(27, Symmetric, Symmetric), (false, false));
}
