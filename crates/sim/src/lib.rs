//! Deterministic simulation for peercall: a virtual clock, a seeded network emulator
//! in user space, and a harness that drives many sans-IO nodes on it.
//!
//! # Use
//!
//! ```
//! use std::net::Ipv4Addr;
//! use std::time::Duration;
//! use peercall_sim::echo::{EchoKind, EchoNode};
//! use peercall_sim::{LinkConfig, NatConfig, NatType, Sim, seed_from_env};
//!
//! let mut sim = Sim::new(seed_from_env(7).expect("PEERCALL_SIM_SEED is a u64"));
//! let server = sim.add_host(Ipv4Addr::new(198, 51, 100, 1)).unwrap();
//! let nat = sim.add_nat(Ipv4Addr::new(203, 0, 113, 1), NatConfig::new(NatType::PortRestricted)).unwrap();
//! let laptop = sim.add_private_host(nat, Ipv4Addr::new(10, 0, 0, 2)).unwrap();
//! sim.set_link(nat, server, LinkConfig { loss: 0.01, ..LinkConfig::new(Duration::from_millis(30)) }).unwrap();
//!
//! let s = sim.add_node(server, 4000, EchoNode::new()).unwrap();
//! let c = sim.add_node(laptop, 4000, EchoNode::new()).unwrap();
//! let to = sim.addr(s);
//! sim.with_node(c, |n, now| n.send(now, to, EchoKind::Ping, 1, 100));
//! sim.run_for(Duration::from_secs(1));
//! // The server saw the NAT's public address; the laptop got the pong back through it.
//! assert!(sim.events().iter().all(|r| r.node != s || r.event.from.ip() == Ipv4Addr::new(203, 0, 113, 1)));
//! ```
//!
//! # Time and determinism
//!
//! The clock is a [`peercall_wire::Time`] that only the event loop moves: it jumps to
//! the next event's time, starting at [`START`]. Events sit in a binary heap ordered
//! by time, with ties broken by the order they were queued. All randomness comes
//! from ChaCha generators seeded by the simulation's `u64` seed, and no clock or OS
//! randomness is read anywhere, so the same seed and the same calls replay the same
//! run exactly. [`Sim::new`] prints `sim seed = N` to stderr; [`seed_from_env`] lets
//! `PEERCALL_SIM_SEED` override a test's default seed to replay a failure.
//!
//! # Driving contract
//!
//! Nodes are anything [`Drivable`] (the engine's `Node` included). After every input
//! (a datagram, a timer, a command run through [`Sim::with_node`] or
//! [`Sim::schedule`]) the harness drains the node's transmits into the network, its
//! events into the trace ([`Sim::events`], stamped with the time), and re-reads its
//! timeout, which it honours with one live timer entry per node.
//!
//! # Network model
//!
//! - **Hosts** have IPv4 addresses, unique across the simulation; nodes bind a port
//!   on a host. A host is public, a NAT box, or behind a NAT (with a private address).
//! - **Links** join *sites*: public hosts and NATs (hosts behind a NAT use their NAT's
//!   links). Each direction has a [`LinkConfig`] (delay, uniform jitter, FIFO or
//!   reordering, random loss, Gilbert-Elliott burst loss, duplication, hold-back
//!   reordering), falling back to a default for pairs without one. Each site may add
//!   an access delay at both ends of its paths and have a rate-limited [`Uplink`] with
//!   a tail-drop queue; every pair of sites may get a fixed extra delay of its own
//!   ([`Sim::set_pair_delay`]). Traffic between hosts behind the same NAT (and hairpinned
//!   traffic) uses the NAT's link to itself, without access delays or uplink.
//! - A datagram's fate (loss, delay, duplication) is drawn when it is sent. NAT
//!   filtering and cuts are applied when it arrives, as on a real path: a hole punched
//!   after a packet was sent but before it arrives lets it in.
//! - **NATs** ([`NatType`]) translate exactly as RFC 4787 describes: outbound
//!   datagrams get the mapping's public source (endpoint-independent mapping, or a new
//!   mapping per destination for symmetric NATs), inbound ones are filtered
//!   (endpoint-independent, address-dependent or address-and-port-dependent) and
//!   rewritten to the inside endpoint. Public ports are drawn at random. Mappings and
//!   filter permissions expire [`NatConfig::mapping_timeout`] after the last outbound
//!   datagram; hairpinning is off unless enabled.
//! - **Cuts** ([`Sim::cut`], [`Sim::cut_one_way`], [`Sim::heal`]) drop traffic between
//!   two sets of hosts, one way or both, from and until given times.
//! - **Counters**: [`NetStats`] for the whole run and [`Traffic`] per node.
//!
//! Not modelled: IPv6, TCP, ICMP (an unreachable port is silent), IP fragmentation
//! and MTU limits, header overhead in byte counts and rates, packet corruption,
//! NATs behind NATs (carrier-grade NAT), NAT port preservation or sequential port
//! allocation, inbound refresh of mappings, delay on the host-to-NAT hop, congestion
//! between sites (only each site's own uplink queues), and routing changes. Delays
//! are the same for all datagram sizes except through an uplink.

pub mod echo;
mod engine;
mod error;
mod link;
mod nat;
mod net;
mod queue;
pub mod scale;
mod seed;
mod sim;
mod util;

pub use error::SimError;
pub use link::{DEFAULT_DELAY, GilbertElliott, LinkConfig, Uplink};
pub use nat::{DEFAULT_MAPPING_TIMEOUT, NatConfig, NatType};
pub use net::NetStats;
pub use peercall_engine::Transmit;
pub use seed::{SEED_ENV, seed_from_env};
pub use sim::{CutId, Drivable, HostId, NodeId, Record, START, Sim, Traffic};
