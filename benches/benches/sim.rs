//! Simulator throughput: events per second through the network emulator with
//! 10,000 hosts, each running a tiny echo node that pings another host every 200 ms.
//!
//! An event is anything the harness pops from its queue: a datagram arrival (ping
//! or pong, through NATs where there are some) or a node timer. Links have jitter,
//! 1% loss and per-host access delays, as a WAN-like scale run would.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use peercall_sim::echo::{EchoKind, EchoNode};
use peercall_sim::{LinkConfig, NatConfig, NatType, NodeId, Sim};

/// Hosts running a node.
const HOSTS: u32 = 10_000;
/// Simulated time per measured iteration.
const RUN: Duration = Duration::from_secs(2);
/// Each node pings its target this often.
const PING_INTERVAL: Duration = Duration::from_millis(200);
/// Bytes per ping, about a keepalive with its headers.
const PING_LEN: usize = 80;
const SEED: u64 = 1;

/// Address number `i` of three disjoint blocks: public hosts, private hosts, NATs.
fn public_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from_bits(0x2000_0000 + i)
}

fn private_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from_bits(0x0a00_0000 + i)
}

fn nat_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from_bits(0x3000_0000 + i)
}

/// `HOSTS` hosts; the first `public` on public addresses, the rest each behind its
/// own NAT (types in turn). Every node pings a public node, chosen by a fixed
/// stride, starting at a staggered time.
fn build(public: u32) -> Sim<EchoNode> {
    let mut sim = Sim::new(SEED);
    sim.record_events(false);
    sim.set_default_link(LinkConfig {
        jitter: Duration::from_millis(5),
        loss: 0.01,
        ..LinkConfig::new(Duration::from_millis(10))
    })
    .expect("valid link");
    let types = [
        NatType::FullCone,
        NatType::AddressRestricted,
        NatType::PortRestricted,
        NatType::Symmetric,
    ];
    let mut nodes: Vec<NodeId> = Vec::with_capacity(HOSTS as usize);
    for i in 0..HOSTS {
        let (host, site) = if i < public {
            let host = sim.add_host(public_ip(i)).expect("unique address");
            (host, host)
        } else {
            let nat = sim
                .add_nat(nat_ip(i), NatConfig::new(types[i as usize % types.len()]))
                .expect("unique address");
            let host = sim
                .add_private_host(nat, private_ip(i))
                .expect("unique address");
            (host, nat)
        };
        sim.set_access_delay(site, Duration::from_millis(5 + u64::from(i % 31)))
            .expect("public site");
        nodes.push(
            sim.add_node(host, 4000, EchoNode::new())
                .expect("free port"),
        );
    }
    for (i, &node) in nodes.iter().enumerate() {
        let i = i as u64;
        let target = nodes[((i * 7919 + 1) % u64::from(public)) as usize];
        let dest: SocketAddr = sim.addr(target);
        let start = sim.now() + Duration::from_micros(i * 37 % 200_000);
        sim.with_node(node, |n, _| {
            n.stream(
                start,
                dest,
                EchoKind::Ping,
                PING_INTERVAL,
                u64::MAX,
                PING_LEN,
            )
        });
    }
    sim
}

fn run(mut sim: Sim<EchoNode>) -> Sim<EchoNode> {
    sim.run_for(RUN);
    sim
}

fn sim(c: &mut Criterion) {
    let mut g = c.benchmark_group("sim");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    for (name, public) in [
        ("public_10k_hosts", HOSTS),
        ("nat_mix_10k_hosts", HOSTS * 3 / 10),
    ] {
        let probe = run(build(public));
        let events = probe.events_processed();
        eprintln!("{name}: {events} events per iteration, {:?}", probe.stats());
        g.throughput(Throughput::Elements(events));
        g.bench_function(name, |b| {
            b.iter_batched(
                || build(public),
                |s| black_box(run(s)),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, sim);
criterion_main!(benches);
