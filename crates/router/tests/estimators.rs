//! Estimator accuracy through the whole router loop, against links with known

// The two callers are indexed 0 and 1 across parallel per-side arrays.
#![allow(clippy::needless_range_loop)]
//! delay, jitter, loss and bursts.

mod common;

use std::time::Duration;

use common::{Link, START, Sim, seed};
use peercall_router::{PathKind, RouterConfig};

/// One path; only side 0 talks, so its direction carries media only (side 1
/// answers with reports), and the figures are the link's.
fn one_way_call(seed: u64, ab: Link, ba: Link) -> Sim {
    let mut sim = Sim::new(
        seed,
        RouterConfig::default(),
        vec![(0, PathKind::Direct, ab, ba)],
    );
    sim.sides[1].talking = false;
    sim
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn rtt_and_jitter_match_the_links() {
    // 30 + 45 ms one way, each with up to 6 ms of uniform extra delay: RTT mean
    // 81 ms, minimum 75 ms. RFC 3550 jitter of iid U[0, w] delays is E|X - Y| = w/3
    // = 2 ms.
    let mut sim = one_way_call(
        seed(1),
        Link::new(30).jitter_ms(6),
        Link::new(45).jitter_ms(6),
    );
    let mut srtt = Vec::new();
    let mut jitter = Vec::new();
    let mut inbound_jitter = Vec::new();
    for _ in 0..30 {
        sim.run_for(Duration::from_secs(10));
        let a = sim.routers[0].stats(sim.now);
        let b = sim.routers[1].stats(sim.now);
        let p = &a.paths[0];
        srtt.push(p.rtt.expect("rtt").as_secs_f64() * 1e3);
        jitter.push(p.jitter.as_secs_f64() * 1e3);
        inbound_jitter.push(b.paths[0].inbound_jitter.as_secs_f64() * 1e3);
        let min = p.rtt_min.expect("min").as_secs_f64() * 1e3;
        let p50 = p.rtt_p50.expect("p50").as_secs_f64() * 1e3;
        let p90 = p.rtt_p90.expect("p90").as_secs_f64() * 1e3;
        // The smallest of the last 32 samples of 75 ms + two U[0, 6 ms].
        assert!((75.0..79.0).contains(&min), "min {min}");
        assert!((79.0..83.0).contains(&p50), "p50 {p50}");
        assert!(p90 > p50 && p90 < 87.0, "p90 {p90}");
    }
    let (srtt, jitter, inbound) = (mean(&srtt), mean(&jitter), mean(&inbound_jitter));
    eprintln!(
        "srtt {srtt:.2} ms (81), jitter reported {jitter:.2} ms, measured {inbound:.2} ms (2)"
    );
    assert!((80.0..82.0).contains(&srtt), "{srtt}");
    assert!((1.8..2.2).contains(&inbound), "{inbound}");
    // The sender's figure is the receiver's, carried by reports.
    assert!((1.8..2.2).contains(&jitter), "{jitter}");
}

#[test]
fn random_loss_is_measured_on_both_ends() {
    let mut sim = one_way_call(seed(2), Link::new(20).loss(0.03), Link::new(20));
    let mut sender = Vec::new();
    let mut receiver = Vec::new();
    let mut bursts = Vec::new();
    for _ in 0..60 {
        sim.run_for(Duration::from_secs(10));
        let a = &sim.routers[0].stats(sim.now).paths[0];
        let b = &sim.routers[1].stats(sim.now).paths[0];
        assert!(a.loss_from_media);
        sender.push(a.media_loss.rate());
        receiver.push(b.inbound_loss.rate());
        bursts.push(a.media_loss.mean_burst());
    }
    let (s, r, b) = (mean(&sender), mean(&receiver), mean(&bursts));
    let truth = sim.link(0, 0).media_loss_rate();
    assert!((truth - 0.03).abs() < 0.002, "{truth}");
    eprintln!("3 % random loss: sender sees {s:.4}, receiver {r:.4}, mean burst {b:.3} (1.03)");
    assert!((0.027..0.033).contains(&s), "{s}");
    assert!((0.027..0.033).contains(&r), "{r}");
    // Random loss at p has mean run 1 / (1 - p).
    assert!((1.0..1.1).contains(&b), "{b}");
}

#[test]
fn loss_bursts_are_measured_on_both_ends() {
    // Gilbert-Elliott: bad state lasts 1 / 0.25 = 4 packets on average, entered
    // with probability 0.01: loss = 0.01 / (0.01 + 0.25) = 3.85 %.
    let mut link = Link::new(20);
    link.burst = Some((0.01, 0.25));
    let mut sim = one_way_call(seed(3), link, Link::new(20));
    let mut sender = Vec::new();
    let mut receiver = Vec::new();
    let mut loss = Vec::new();
    let mut max_burst = 0;
    for _ in 0..60 {
        sim.run_for(Duration::from_secs(10));
        let a = &sim.routers[0].stats(sim.now).paths[0];
        let b = &sim.routers[1].stats(sim.now).paths[0];
        sender.push(a.media_loss.mean_burst());
        receiver.push(b.inbound_loss.mean_burst());
        loss.push(a.media_loss.rate());
        max_burst = max_burst.max(a.media_loss.max_burst);
        assert!(a.media_loss.max_burst <= b.inbound_loss.max_burst + 1);
    }
    let (s, r, l) = (mean(&sender), mean(&receiver), mean(&loss));
    // The link's own count of media loss runs (acks to the peer's probes share the
    // link, so media sees slightly shorter runs than the model's 4).
    let truth = sim.link(0, 0).clone();
    let (true_run, true_loss) = (truth.media_mean_run(), truth.media_loss_rate());
    eprintln!(
        "burst loss: mean burst sender {s:.2}, receiver {r:.2}, link {true_run:.2}; \
         loss {l:.4}, link {true_loss:.4}; max burst {max_burst}"
    );
    assert!((s - true_run).abs() < 0.15 * true_run, "{s} vs {true_run}");
    assert!((r - true_run).abs() < 0.15 * true_run, "{r} vs {true_run}");
    assert!(
        (l - true_loss).abs() < 0.1 * true_loss,
        "{l} vs {true_loss}"
    );
    assert!(true_run > 3.0);
    assert!(max_burst >= 10);
}

#[test]
fn idle_paths_are_measured_by_probes() {
    // Nobody talks: the path is measured by probes alone.
    let mut sim = one_way_call(seed(4), Link::new(40).loss(0.05), Link::new(40).loss(0.05));
    sim.sides[0].talking = false;
    let mut one_way = Vec::new();
    for _ in 0..60 {
        sim.run_for(Duration::from_secs(10));
        one_way.push(sim.routers[0].stats(sim.now).paths[0].loss);
    }
    let mean_loss = mean(&one_way);
    eprintln!("one-way loss from probes: mean {mean_loss:.4} (0.05)");
    assert!((0.035..0.065).contains(&mean_loss), "{mean_loss}");
    let p = &sim.routers[0].stats(sim.now).paths[0];
    eprintln!(
        "probes {} acked {}, loss {:.3}, rtt {:?}",
        p.probes_sent, p.probes_acked, p.loss, p.rtt
    );
    assert!(!p.loss_from_media);
    let rtt = p.rtt.expect("rtt").as_secs_f64() * 1e3;
    assert!((79.0..81.0).contains(&rtt), "{rtt}");
    // Round trip loss 1 - 0.95² = 9.75 % over ~2000 probes.
    let rt = p.probes_acked as f64 / p.probes_sent as f64;
    assert!((0.85..0.95).contains(&rt), "{rt}");
    // The warm interval: about 3 probes a second (250 ms after each answer).
    let rate = p.probes_sent as f64 / 600.0;
    assert!((2.5..4.0).contains(&rate), "{rate}");
    let since = sim.now.saturating_since(START);
    assert!(since >= Duration::from_secs(600));
}
