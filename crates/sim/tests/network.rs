//! The network emulator's link behaviour, measured over many datagrams.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use peercall_sim::echo::EchoKind;
use peercall_sim::{GilbertElliott, LinkConfig, SimError, Uplink};

#[test]
fn fixed_delay_is_exact() {
    let mut p = pair(1, link(37));
    stream(&mut p.sim, p.a, p.b, ms(5), 100);
    p.sim.run_for(Duration::from_secs(2));
    let got = received(&p.sim, p.b);
    assert_eq!(got.len(), 100);
    assert!(got.iter().all(|r| delay_ms(r) == 37.0));
    // The reverse direction has no link of its own: the default applies.
    let back = p.sim.addr(p.a);
    p.sim
        .with_node(p.b, |n, now| n.send(now, back, EchoKind::Data, 0, 20));
    p.sim.run_for(Duration::from_secs(1));
    let r = received(&p.sim, p.a);
    assert_eq!(r.len(), 1);
    assert_eq!(
        delay_ms(r[0]),
        peercall_sim::DEFAULT_DELAY.as_millis() as f64
    );
}

#[test]
fn jitter_statistics_match_the_configuration() {
    let cfg = LinkConfig {
        jitter: ms(10),
        ..link(50)
    };
    let mut p = pair(2, cfg);
    stream(&mut p.sim, p.a, p.b, ms(1), 20_000);
    p.sim.run_for(Duration::from_secs(30));
    let delays: Vec<f64> = received(&p.sim, p.b).iter().map(|r| delay_ms(r)).collect();
    assert_eq!(delays.len(), 20_000);
    let (mean, sd) = mean_sd(&delays);
    // Uniform on [40, 60] ms: mean 50, standard deviation 10/sqrt(3) = 5.77.
    assert!((mean - 50.0).abs() < 0.25, "mean {mean}");
    assert!((sd - 10.0 / 3f64.sqrt()).abs() < 0.2, "sd {sd}");
    let min = delays.iter().copied().fold(f64::MAX, f64::min);
    let max = delays.iter().copied().fold(f64::MIN, f64::max);
    assert!((40.0..40.5).contains(&min), "min {min}");
    assert!(max <= 60.0 && max > 59.5, "max {max}");
}

#[test]
fn jitter_reorders_unless_fifo() {
    let jittery = LinkConfig {
        jitter: ms(20),
        ..link(50)
    };
    let mut p = pair(3, jittery.clone());
    stream(&mut p.sim, p.a, p.b, ms(1), 5_000);
    p.sim.run_for(Duration::from_secs(10));
    let got = received(&p.sim, p.b);
    assert_eq!(got.len(), 5_000);
    assert!(inversions(&got) > 1_000, "{}", inversions(&got));

    let mut p = pair(
        3,
        LinkConfig {
            fifo: true,
            ..jittery
        },
    );
    stream(&mut p.sim, p.a, p.b, ms(1), 5_000);
    p.sim.run_for(Duration::from_secs(10));
    let got = received(&p.sim, p.b);
    assert_eq!(got.len(), 5_000);
    assert_eq!(inversions(&got), 0);
    let delays: Vec<f64> = got.iter().map(|r| delay_ms(r)).collect();
    let (mean, sd) = mean_sd(&delays);
    assert!(delays.iter().all(|&d| (30.0..=70.0).contains(&d)));
    assert!(
        mean >= 50.0 && sd > 1.0,
        "still jittered: mean {mean} sd {sd}"
    );
}

#[test]
fn reordering_holds_back_the_configured_fraction() {
    let cfg = LinkConfig {
        fifo: true,
        reorder: 0.1,
        reorder_delay: ms(5),
        ..link(20)
    };
    let mut p = pair(4, cfg);
    stream(&mut p.sim, p.a, p.b, ms(1), 10_000);
    p.sim.run_for(Duration::from_secs(15));
    let got = received(&p.sim, p.b);
    assert_eq!(got.len(), 10_000);
    let held = got.iter().filter(|r| delay_ms(r) == 25.0).count();
    assert!(got.iter().all(|r| matches!(delay_ms(r), 20.0 | 25.0)));
    let fraction = held as f64 / 10_000.0;
    assert!((fraction - 0.1).abs() < 0.02, "held back {fraction}");
    // Each held datagram is overtaken by the four sent in the next 4 ms.
    assert!(inversions(&got) as f64 > 0.8 * held as f64);
}

#[test]
fn random_loss_rate() {
    let cfg = LinkConfig {
        loss: 0.1,
        ..link(10)
    };
    let mut p = pair(5, cfg);
    stream(&mut p.sim, p.a, p.b, ms(1), 20_000);
    p.sim.run_for(Duration::from_secs(25));
    let lost = p.sim.stats().lost;
    assert_eq!(received(&p.sim, p.b).len() as u64, 20_000 - lost);
    assert!((1_700..2_300).contains(&lost), "lost {lost}");
}

/// Loss rate and mean burst length measured from the gaps in a numbered stream.
fn loss_profile(cfg: LinkConfig, seed: u64, count: u64) -> (f64, f64) {
    let mut p = pair(seed, cfg);
    stream(&mut p.sim, p.a, p.b, Duration::from_micros(100), count);
    p.sim.run_for(Duration::from_secs(count / 10_000 + 5));
    let mut arrived = vec![false; count as usize];
    for r in received(&p.sim, p.b) {
        arrived[r.event.seq as usize] = true;
    }
    let lost = arrived.iter().filter(|&&a| !a).count();
    let bursts = arrived.windows(2).filter(|w| w[0] && !w[1]).count() + usize::from(!arrived[0]);
    (lost as f64 / count as f64, lost as f64 / bursts as f64)
}

#[test]
fn gilbert_elliott_loss_rate_and_burst_length() {
    let ge = GilbertElliott::new(0.05, 4.0).expect("valid");
    let cfg = LinkConfig {
        burst_loss: Some(ge),
        fifo: true,
        ..link(10)
    };
    let (rate, burst) = loss_profile(cfg, 6, 200_000);
    assert!((rate - 0.05).abs() < 0.006, "loss rate {rate}");
    assert!((burst - 4.0).abs() < 0.4, "mean burst {burst}");

    // The same rate lost independently comes in bursts of about 1 / (1 - 0.05).
    let (rate, burst) = loss_profile(
        LinkConfig {
            loss: 0.05,
            ..link(10)
        },
        6,
        200_000,
    );
    assert!((rate - 0.05).abs() < 0.006, "loss rate {rate}");
    assert!(burst < 1.2, "random loss is not bursty: {burst}");
}

#[test]
fn duplication_delivers_extra_copies() {
    let cfg = LinkConfig {
        duplicate: 0.2,
        jitter: ms(2),
        ..link(10)
    };
    let mut p = pair(7, cfg);
    stream(&mut p.sim, p.a, p.b, ms(1), 20_000);
    p.sim.run_for(Duration::from_secs(25));
    let mut copies: BTreeMap<u64, u32> = BTreeMap::new();
    for r in received(&p.sim, p.b) {
        *copies.entry(r.event.seq).or_default() += 1;
    }
    let twice = copies.values().filter(|&&c| c == 2).count() as u64;
    assert_eq!(copies.len(), 20_000, "every datagram arrives");
    assert!(copies.values().all(|&c| c <= 2));
    let stats = p.sim.stats();
    assert_eq!(twice, stats.duplicated);
    assert_eq!(stats.delivered, 20_000 + twice);
    assert!((3_600..4_400).contains(&twice), "duplicated {twice}");
}

#[test]
fn partition_cuts_and_heals() {
    let mut p = pair(8, link(20));
    let sim = &mut p.sim;
    let t0 = sim.now();
    let cut = sim
        .cut(t0 + Duration::from_secs(2), &[p.ha], &[p.hb])
        .expect("hosts exist");
    sim.heal(t0 + Duration::from_secs(5), cut)
        .expect("cut exists");
    stream(sim, p.a, p.b, ms(10), 1_000);
    stream(sim, p.b, p.a, ms(10), 1_000);
    sim.run_for(Duration::from_secs(12));
    let window = t0 + Duration::from_secs(2)..t0 + Duration::from_secs(5);
    for node in [p.a, p.b] {
        let got = received(sim, node);
        assert!(
            got.iter().all(|r| !window.contains(&r.at)),
            "nothing crosses the cut"
        );
        assert!(got.iter().any(|r| r.at < window.start));
        assert!(
            got.iter().any(|r| r.at >= window.end),
            "traffic resumes after healing"
        );
        assert_eq!(got.len(), 700);
    }
    assert_eq!(sim.stats().partitioned, 600);
}

#[test]
fn one_way_cut_of_a_single_link() {
    let mut p = pair(9, link(20));
    let sim = &mut p.sim;
    let t0 = sim.now();
    let cut = sim.cut_one_way(t0, &[p.ha], &[p.hb]).expect("hosts exist");
    stream(sim, p.a, p.b, ms(10), 100);
    stream(sim, p.b, p.a, ms(10), 100);
    sim.run_for(Duration::from_secs(2));
    assert_eq!(received(sim, p.b).len(), 0);
    assert_eq!(received(sim, p.a).len(), 100);
    sim.heal(sim.now(), cut).expect("cut exists");
    stream(sim, p.a, p.b, ms(10), 10);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(received(sim, p.b).len(), 10);
}

#[test]
fn access_delays_add_at_both_ends() {
    let mut p = pair(10, link(5));
    p.sim.set_access_delay(p.ha, ms(10)).expect("public host");
    p.sim.set_access_delay(p.hb, ms(15)).expect("public host");
    stream(&mut p.sim, p.a, p.b, ms(10), 10);
    p.sim.run_for(Duration::from_secs(1));
    let got = received(&p.sim, p.b);
    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|r| delay_ms(r) == 30.0));
}

#[test]
fn uplink_serialises_and_tail_drops() {
    let mut p = pair(11, link(20));
    p.sim
        .set_uplink(
            p.ha,
            Some(Uplink {
                bits_per_sec: 1_000_000,
                queue_bytes: 10_000,
            }),
        )
        .expect("valid uplink");
    let dest = p.sim.addr(p.b);
    p.sim.with_node(p.a, |n, now| {
        for seq in 0..50 {
            n.send(now, dest, EchoKind::Data, seq, 1250);
        }
    });
    p.sim.run_for(Duration::from_secs(2));
    let got = received(&p.sim, p.b);
    // 1250 bytes take 10 ms at 1 Mbit/s; the queue holds 8 of them.
    assert_eq!(got.len(), 8);
    assert_eq!(p.sim.stats().queue_dropped, 42);
    for (k, r) in got.iter().enumerate() {
        assert_eq!(r.event.seq, k as u64);
        assert_eq!(delay_ms(r), 20.0 + 10.0 * (k as f64 + 1.0));
    }
}

#[test]
fn unroutable_destinations_are_counted() {
    let mut p = pair(12, link(5));
    let nat = p
        .sim
        .add_nat(
            ip(203, 0, 113, 9),
            peercall_sim::NatConfig::new(peercall_sim::NatType::FullCone),
        )
        .expect("nat");
    let inside = p.sim.add_private_host(nat, ip(10, 0, 0, 2)).expect("host");
    p.sim
        .add_node(inside, 4000, peercall_sim::echo::EchoNode::new())
        .expect("node");
    let dests = [
        "192.0.2.77:4000",    // nobody has this address
        "198.51.100.2:4999",  // nobody bound this port
        "10.0.0.2:4000",      // private, from outside its NAT
        "[2001:db8::1]:4000", // IPv6
    ];
    p.sim.with_node(p.a, |n, now| {
        for d in dests {
            n.send(now, d.parse().expect("addr"), EchoKind::Data, 0, 20);
        }
    });
    p.sim.run_for(Duration::from_secs(1));
    assert_eq!(p.sim.stats().unroutable, 4);
    assert_eq!(p.sim.stats().delivered, 0);
}

#[test]
fn offline_nodes_drop_traffic_and_resume() {
    let mut p = pair(13, link(5));
    stream(&mut p.sim, p.a, p.b, ms(100), 30);
    p.sim.run_for(ms(950));
    p.sim.set_online(p.b, false);
    p.sim.set_online(p.a, false);
    p.sim.run_for(Duration::from_secs(1));
    assert_eq!(
        received(&p.sim, p.b).len(),
        10,
        "a's timers paused while offline"
    );
    p.sim.set_online(p.a, true);
    p.sim.run_for(ms(500));
    assert_eq!(received(&p.sim, p.b).len(), 10, "b is still offline");
    assert!(p.sim.stats().host_down >= 5);
    p.sim.set_online(p.b, true);
    p.sim.run_for(Duration::from_secs(3));
    let got = received(&p.sim, p.b).len() as u64;
    assert_eq!(got + p.sim.stats().host_down, 30);
}

#[test]
fn bad_configuration_is_rejected_with_the_field_named() {
    let mut p = pair(14, link(5));
    let err = p
        .sim
        .set_link(
            p.ha,
            p.hb,
            LinkConfig {
                duplicate: 2.0,
                ..link(5)
            },
        )
        .expect_err("not a probability");
    assert!(err.to_string().contains("LinkConfig::duplicate"), "{err}");
    assert_eq!(
        p.sim.add_host(ip(198, 51, 100, 1)),
        Err(SimError::AddressTaken(ip(198, 51, 100, 1)))
    );
    assert!(matches!(
        p.sim
            .add_node(p.ha, 4000, peercall_sim::echo::EchoNode::new()),
        Err(SimError::PortTaken(_))
    ));
    assert!(matches!(
        p.sim.add_private_host(p.ha, ip(10, 0, 0, 1)),
        Err(SimError::NotANat(_))
    ));
    assert!(
        p.sim
            .set_uplink(
                p.ha,
                Some(Uplink {
                    bits_per_sec: 0,
                    queue_bytes: 1
                })
            )
            .is_err()
    );
}

#[test]
fn run_until_pred_stops_when_the_condition_holds() {
    let mut p = pair(15, link(25));
    stream(&mut p.sim, p.a, p.b, ms(10), 100);
    let b = p.b;
    let deadline = after(&p.sim, Duration::from_secs(10));
    let start = p.sim.now();
    let held = p.sim.run_until_pred(deadline, |s| {
        s.events().iter().filter(|r| r.node == b).count() == 3
    });
    assert!(held);
    assert_eq!(
        p.sim.now(),
        start + ms(45),
        "the third datagram arrives at 20 + 25 ms"
    );
    let never = p.sim.run_until_pred(deadline, |_| false);
    assert!(!never);
    assert_eq!(p.sim.now(), deadline);
}

mod conservation {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whatever the link does, every datagram is accounted for exactly once.
        #[test]
        fn every_datagram_is_accounted_for(
            seed in any::<u64>(),
            loss in 0.0..0.5f64,
            duplicate in 0.0..0.5f64,
            reorder in 0.0..0.5f64,
            jitter in 0u64..30,
            fifo in any::<bool>(),
            burst in proptest::option::of((0.0..0.3f64, 1.0..6.0f64)),
            cut_from in 0u64..500,
        ) {
            let cfg = LinkConfig {
                loss,
                duplicate,
                reorder,
                reorder_delay: ms(3),
                jitter: ms(jitter),
                fifo,
                burst_loss: burst.and_then(|(r, b)| GilbertElliott::new(r, b).ok()),
                ..link(20)
            };
            let mut p = pair(seed, cfg.clone());
            p.sim.set_link(p.hb, p.ha, cfg).expect("valid");
            p.sim.set_uplink(p.ha, Some(Uplink { bits_per_sec: 2_000_000, queue_bytes: 3_000 }))
                .expect("valid");
            let t0 = p.sim.now();
            let cut = p.sim.cut(t0 + ms(cut_from), &[p.ha], &[p.hb]).expect("hosts");
            p.sim.heal(t0 + ms(cut_from + 200), cut).expect("cut");
            let (a, b) = (p.sim.addr(p.a), p.sim.addr(p.b));
            p.sim.with_node(p.a, |n, now| n.stream(now, b, EchoKind::Ping, ms(2), 300, 200));
            p.sim.with_node(p.b, |n, now| n.stream(now, a, EchoKind::Data, ms(3), 200, 100));
            p.sim.run_for(Duration::from_secs(5));
            prop_assert_eq!(p.sim.in_flight(), 0);
            let s = p.sim.stats().clone();
            prop_assert_eq!(
                s.sent + s.duplicated,
                s.delivered + s.lost + s.filtered_by_nat + s.partitioned + s.queue_dropped
                    + s.unroutable + s.host_down
            );
            let (ta, tb) = (p.sim.traffic(p.a), p.sim.traffic(p.b));
            prop_assert_eq!(ta.sent + tb.sent, s.sent);
            prop_assert_eq!(ta.received + tb.received, s.delivered);
            prop_assert_eq!(ta.received_bytes + tb.received_bytes, s.delivered_bytes);
            prop_assert_eq!(p.sim.events().len() as u64, s.delivered);
        }
    }
}
