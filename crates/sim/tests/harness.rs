//! The harness follows the driving contract: timers fire when asked, once, and
//! outputs are drained after every input.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use peercall_sim::{Drivable, Sim, Transmit, seed_from_env};
use peercall_wire::Time;

/// A node whose deadline the test sets; it reports every timeout and datagram and
/// sends a datagram to `peer` on each timeout.
#[derive(Default)]
struct Timed {
    deadline: Option<Time>,
    peer: Option<SocketAddr>,
    out: Vec<Transmit>,
    events: Vec<Seen>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Timeout { now: Time, deadline: Time },
    Datagram { now: Time, len: usize },
}

impl Drivable for Timed {
    type Event = Seen;

    fn handle_datagram(&mut self, now: Time, _from: SocketAddr, datagram: &[u8]) {
        self.events.push(Seen::Datagram {
            now,
            len: datagram.len(),
        });
    }

    fn handle_timeout(&mut self, now: Time) {
        let deadline = self
            .deadline
            .take()
            .expect("only called when a deadline was set");
        assert!(now >= deadline, "called early");
        self.events.push(Seen::Timeout { now, deadline });
        if let Some(peer) = self.peer {
            self.out.push(Transmit {
                dest: peer,
                bytes: vec![7; 10],
            });
        }
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop()
    }

    fn poll_event(&mut self) -> Option<Seen> {
        (!self.events.is_empty()).then(|| self.events.remove(0))
    }

    fn poll_timeout(&mut self) -> Option<Time> {
        self.deadline
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn setup() -> (Sim<Timed>, peercall_sim::NodeId, peercall_sim::NodeId) {
    let mut sim = Sim::new(seed_from_env(51).expect("PEERCALL_SIM_SEED must be a u64"));
    let ha = sim.add_host(Ipv4Addr::new(198, 51, 100, 1)).expect("host");
    let hb = sim.add_host(Ipv4Addr::new(198, 51, 100, 2)).expect("host");
    let a = sim.add_node(ha, 1, Timed::default()).expect("node");
    let b = sim.add_node(hb, 1, Timed::default()).expect("node");
    let to_b = sim.addr(b);
    sim.with_node(a, |n, _| n.peer = Some(to_b));
    (sim, a, b)
}

fn timeouts(sim: &Sim<Timed>) -> Vec<(Time, Time)> {
    sim.events()
        .iter()
        .filter_map(|r| match r.event {
            Seen::Timeout { now, deadline } => Some((now, deadline)),
            Seen::Datagram { .. } => None,
        })
        .collect()
}

#[test]
fn timers_fire_once_at_their_deadline_wherever_it_moves() {
    let (mut sim, a, b) = setup();
    let t0 = sim.now();
    // Set, then move earlier: fires at the earlier time only.
    sim.with_node(a, |n, now| n.deadline = Some(now + ms(100)));
    sim.with_node(a, |n, now| n.deadline = Some(now + ms(50)));
    sim.run_for(ms(200));
    assert_eq!(timeouts(&sim), [(t0 + ms(50), t0 + ms(50))]);

    // Set, then move later many times: one firing at the final time, and the queue
    // does not grow with each move.
    let t1 = sim.now();
    for k in 1..=1000 {
        sim.with_node(a, |n, now| n.deadline = Some(now + ms(10 + k)));
    }
    sim.run_for(ms(1500));
    assert_eq!(timeouts(&sim)[1..], [(t1 + ms(1010), t1 + ms(1010))]);

    // A deadline in the past fires at once, at the current time.
    let t2 = sim.now();
    sim.with_node(a, |n, _| n.deadline = Some(t0));
    sim.step();
    assert_eq!(timeouts(&sim)[2], (t2, t0));

    // Cleared deadlines never fire.
    sim.with_node(a, |n, now| n.deadline = Some(now + ms(5)));
    sim.with_node(a, |n, _| n.deadline = None);
    sim.run_for(ms(100));
    assert_eq!(timeouts(&sim).len(), 3);

    // Each timeout's datagram was drained right away and reached b 10 ms later
    // (the default link).
    let arrivals: Vec<Time> = sim
        .events()
        .iter()
        .filter(|r| r.node == b)
        .map(|r| r.at)
        .collect();
    let sends: Vec<Time> = timeouts(&sim).iter().map(|&(now, _)| now).collect();
    assert_eq!(
        arrivals,
        sends.iter().map(|&t| t + ms(10)).collect::<Vec<_>>()
    );
}

#[test]
fn moving_deadlines_later_does_not_grow_the_queue() {
    let (mut sim, a, _) = setup();
    for k in 1..=10_000 {
        sim.with_node(a, |n, now| n.deadline = Some(now + ms(k)));
    }
    // One live entry for the first deadline, which re-arms when it fires early.
    let mut steps = 0;
    while sim.step() {
        steps += 1;
    }
    assert!(steps <= 3, "{steps} queue entries for one timer");
    assert_eq!(timeouts(&sim).len(), 1);
}

#[test]
fn replaced_nodes_lose_their_timers_and_scheduled_commands_run_on_time() {
    let (mut sim, a, _) = setup();
    let t0 = sim.now();
    sim.with_node(a, |n, now| n.deadline = Some(now + ms(100)));
    let old = sim.replace_node(a, Timed::default());
    assert_eq!(old.deadline, Some(t0 + ms(100)));
    sim.schedule(t0 + ms(150), a, |n, now| n.deadline = Some(now + ms(20)));
    sim.run_for(ms(400));
    assert_eq!(timeouts(&sim), [(t0 + ms(170), t0 + ms(170))]);
}

#[test]
fn offline_nodes_run_overdue_timers_when_back() {
    let (mut sim, a, _) = setup();
    let t0 = sim.now();
    sim.with_node(a, |n, now| n.deadline = Some(now + ms(100)));
    sim.set_online(a, false);
    sim.run_for(ms(300));
    assert!(timeouts(&sim).is_empty());
    sim.set_online(a, true);
    sim.run_for(ms(1));
    assert_eq!(timeouts(&sim), [(t0 + ms(300), t0 + ms(100))]);
}
