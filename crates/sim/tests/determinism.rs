//! Runs replay exactly from their seed.

mod common;

use std::time::Duration;

use common::*;
use peercall_sim::echo::{Echo, EchoKind, EchoNode};
use peercall_sim::{GilbertElliott, LinkConfig, NatConfig, NatType, NetStats, Record, Sim};

/// A busy network: every random feature on, NATs of every type, nodes pinging
/// each other with streams that overlap in time.
fn scenario(seed: u64) -> (Vec<Record<Echo>>, NetStats, Vec<[u8; 32]>) {
    let mut sim: Sim<EchoNode> = Sim::new(seed);
    sim.set_default_link(LinkConfig {
        jitter: ms(15),
        loss: 0.02,
        burst_loss: Some(GilbertElliott::new(0.03, 3.0).expect("valid")),
        duplicate: 0.02,
        reorder: 0.05,
        reorder_delay: ms(7),
        ..link(40)
    })
    .expect("valid");
    let mut public = Vec::new();
    let mut public_hosts = Vec::new();
    for i in 0..6u8 {
        let host = sim.add_host(ip(198, 51, 100, i + 1)).expect("host");
        sim.set_access_delay(host, ms(u64::from(i) * 3))
            .expect("public");
        public_hosts.push(host);
        public.push(sim.add_node(host, 4000, EchoNode::new()).expect("node"));
    }
    let types = [
        NatType::FullCone,
        NatType::AddressRestricted,
        NatType::PortRestricted,
        NatType::Symmetric,
    ];
    let mut private = Vec::new();
    for (i, t) in types.into_iter().enumerate() {
        let i = i as u8;
        let nat = sim
            .add_nat(ip(203, 0, 113, i + 1), NatConfig::new(t))
            .expect("nat");
        for j in 0..3u8 {
            let host = sim
                .add_private_host(nat, ip(10, i, 0, j + 2))
                .expect("host");
            private.push(sim.add_node(host, 5000, EchoNode::new()).expect("node"));
        }
    }
    let t0 = sim.now();
    let cut = sim
        .cut(
            t0 + Duration::from_secs(3),
            &public_hosts[..2],
            &public_hosts[2..],
        )
        .expect("hosts");
    sim.heal(t0 + Duration::from_secs(6), cut).expect("cut");
    for (k, &node) in private.iter().chain(&public).enumerate() {
        for step in 1..=2 {
            let target = public[(k * step + 1) % public.len()];
            let dest = sim.addr(target);
            sim.with_node(node, |n, now| {
                n.stream(
                    now + ms(k as u64),
                    dest,
                    EchoKind::Ping,
                    ms(37 + k as u64),
                    200,
                    80,
                )
            });
        }
    }
    // Unsolicited datagrams to the NATs, which drop them unless a full-cone mapping
    // happens to sit on that port.
    for &node in &public {
        for i in 0..4u8 {
            let dest = std::net::SocketAddr::from((ip(203, 0, 113, i + 1), 5000));
            sim.with_node(node, |n, now| {
                n.stream(now, dest, EchoKind::Data, ms(500), 20, 40)
            });
        }
    }
    sim.run_for(Duration::from_secs(10));
    let seeds = (0..3).map(|i| sim.derive_seed(i)).collect();
    (sim.take_events(), sim.stats().clone(), seeds)
}

#[test]
fn same_seed_same_trace_different_seed_different_trace() {
    let seed = seed_from_env_or(31);
    let first = scenario(seed);
    assert!(
        first.0.len() > 5_000,
        "a busy run: {} events",
        first.0.len()
    );
    let s = &first.1;
    assert!(
        s.lost > 0 && s.duplicated > 0 && s.filtered_by_nat > 0 && s.partitioned > 0,
        "{s:?}"
    );
    let again = scenario(seed);
    assert!(
        first == again,
        "same seed, same events, counters and derived seeds"
    );
    let other = scenario(seed.wrapping_add(1));
    assert_ne!(first.0, other.0, "another seed gives another trace");
    assert_ne!(first.2, other.2);
}

fn seed_from_env_or(default: u64) -> u64 {
    peercall_sim::seed_from_env(default).expect("PEERCALL_SIM_SEED must be a u64")
}
