//! Helpers shared by the simulator's integration tests.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use peercall_sim::echo::{Echo, EchoKind, EchoNode};
use peercall_sim::{HostId, LinkConfig, NodeId, Record, Sim, seed_from_env};
use peercall_wire::Time;

/// A simulation seeded from `PEERCALL_SIM_SEED`, or `default`.
pub fn sim(default: u64) -> Sim<EchoNode> {
    Sim::new(seed_from_env(default).expect("PEERCALL_SIM_SEED must be a u64"))
}

pub fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn link(delay_ms: u64) -> LinkConfig {
    LinkConfig::new(ms(delay_ms))
}

/// Two public hosts with one echo node each.
pub struct Pair {
    pub sim: Sim<EchoNode>,
    pub ha: HostId,
    pub hb: HostId,
    pub a: NodeId,
    pub b: NodeId,
}

pub fn pair(seed: u64, a_to_b: LinkConfig) -> Pair {
    let mut sim = sim(seed);
    let ha = sim.add_host(ip(198, 51, 100, 1)).expect("host");
    let hb = sim.add_host(ip(198, 51, 100, 2)).expect("host");
    sim.set_link(ha, hb, a_to_b).expect("valid link");
    let a = sim.add_node(ha, 4000, EchoNode::new()).expect("node");
    let b = sim.add_node(hb, 4000, EchoNode::new()).expect("node");
    Pair { sim, ha, hb, a, b }
}

/// Sends `count` numbered data messages from `from` to `to`, one every `interval`.
pub fn stream(sim: &mut Sim<EchoNode>, from: NodeId, to: NodeId, interval: Duration, count: u64) {
    let dest = sim.addr(to);
    sim.with_node(from, |n, now| {
        n.stream(now, dest, EchoKind::Data, interval, count, 64)
    });
}

/// What `node` received, in arrival order.
pub fn received(sim: &Sim<EchoNode>, node: NodeId) -> Vec<&Record<Echo>> {
    sim.events().iter().filter(|r| r.node == node).collect()
}

/// One-way delay of a received message, in milliseconds.
pub fn delay_ms(r: &Record<Echo>) -> f64 {
    r.at.saturating_since(r.event.sent_at).as_micros() as f64 / 1000.0
}

/// Arrivals whose sequence number is lower than one that arrived before.
pub fn inversions(records: &[&Record<Echo>]) -> usize {
    let mut highest = None;
    let mut count = 0;
    for r in records {
        if highest.is_some_and(|h| r.event.seq < h) {
            count += 1;
        }
        highest = highest.max(Some(r.event.seq));
    }
    count
}

pub fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The time `d` after the simulation's current time.
pub fn after(sim: &Sim<EchoNode>, d: Duration) -> Time {
    sim.now() + d
}

pub fn v4(addr: SocketAddr) -> std::net::SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => panic!("the simulator is IPv4 only"),
    }
}
