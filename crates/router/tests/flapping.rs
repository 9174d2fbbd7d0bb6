//! No flapping: two stable paths with random 1-5 % loss for 10 simulated minutes.

mod common;

use std::time::Duration;

use common::{Link, START, Sim, seed};
use peercall_router::{PathKind, RedundancyMode, RouterConfig};
use peercall_wire::Time;
use rand::Rng;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const MINUTES: u64 = 10;
const WINDOW: Duration = Duration::from_secs(30);

/// The most switches of one side in any 30 s window (after the first choice).
fn max_switches_per_window(times: &[Time]) -> usize {
    times
        .iter()
        .map(|&t| times.iter().filter(|&&u| u >= t && u < t + WINDOW).count())
        .max()
        .unwrap_or(0)
}

struct Outcome {
    switches: [usize; 2],
    worst_window: usize,
}

/// Two paths with loss rates drawn from 1-5 % (redrawn every `redraw` if set), one
/// way delays 20-60 ms, and 5 ms of jitter; both sides talk for 10 minutes.
fn run(seed: u64, kinds: [PathKind; 2], redraw: Option<Duration>) -> Outcome {
    let mut draw = ChaCha20Rng::seed_from_u64(seed ^ 0x5eed);
    let link = |draw: &mut ChaCha20Rng| {
        Link::new(draw.gen_range(20..=60))
            .jitter_ms(5)
            .loss(draw.gen_range(0.01..=0.05))
    };
    let paths = (0..2u16)
        .map(|id| {
            let (ab, ba) = (link(&mut draw), link(&mut draw));
            eprintln!(
                "path {id} {:?}: {:?}/{:?} ms, loss {:.3}/{:.3}",
                kinds[id as usize], ab.delay, ba.delay, ab.loss, ba.loss
            );
            (id, kinds[id as usize], ab, ba)
        })
        .collect();
    let mut sim = Sim::new(seed, RouterConfig::default(), paths);
    let end = START + Duration::from_secs(60 * MINUTES);
    match redraw {
        None => sim.run_until(end),
        Some(step) => {
            while sim.now < end {
                sim.run_for(step);
                for id in 0..2 {
                    for dir in 0..2 {
                        sim.link(id, dir).loss = draw.gen_range(0.01..=0.05);
                    }
                }
            }
        }
    }
    assert_eq!(sim.stuck, 0);
    let mut switches = [0; 2];
    let mut worst_window = 0;
    for (s, count) in switches.iter_mut().enumerate() {
        // The first entry is the call's first choice, not a switch.
        let times: Vec<Time> = sim.sides[s].switches.iter().skip(1).map(|w| w.0).collect();
        *count = times.len();
        worst_window = worst_window.max(max_switches_per_window(&times));
        let stats = sim.routers[s].stats(sim.now);
        assert_eq!(stats.switches as usize, times.len());
        eprintln!(
            "side {s}: {} switches in {MINUTES} min ({:?}), redundant frames {:.0} %",
            times.len(),
            sim.sides[s]
                .switches
                .iter()
                .map(|w| (w.0.saturating_since(START).as_secs(), w.2, w.3.label()))
                .collect::<Vec<_>>(),
            100.0 * sim.sides[s].redundant_frames as f64 / sim.sides[s].sent as f64
        );
    }
    Outcome {
        switches,
        worst_window,
    }
}

fn check(base: u64, kinds: [PathKind; 2], redraw: Option<Duration>) {
    let mut all = Vec::new();
    for i in 0..4 {
        let o = run(base + i, kinds, redraw);
        assert!(
            o.worst_window <= 1,
            "seed {}: {} switches in one 30 s window",
            base + i,
            o.worst_window
        );
        all.extend(o.switches);
    }
    all.sort();
    eprintln!(
        "switches per side in {MINUTES} min: median {}, max {} (per 30 s: {:.3})",
        all[all.len() / 2],
        all[all.len() - 1],
        all[all.len() - 1] as f64 / (MINUTES as f64 * 2.0)
    );
}

#[test]
fn no_flapping_between_two_relays_with_fixed_random_loss() {
    check(seed(100), [PathKind::Relay1, PathKind::Relay1], None);
}

#[test]
fn no_flapping_between_direct_and_relay_with_fixed_random_loss() {
    check(seed(200), [PathKind::Direct, PathKind::Relay1], None);
}

#[test]
fn no_flapping_when_loss_wanders_between_1_and_5_percent() {
    check(
        seed(300),
        [PathKind::Relay1, PathKind::Relay1],
        Some(Duration::from_secs(5)),
    );
}

#[test]
fn redundancy_never_still_does_not_flap() {
    let base = seed(400);
    for i in 0..2 {
        let mut draw = ChaCha20Rng::seed_from_u64(base + i);
        let paths = (0..2u16)
            .map(|id| {
                let l = Link::new(30).jitter_ms(5).loss(draw.gen_range(0.01..=0.05));
                (id, PathKind::Relay1, l.clone(), l)
            })
            .collect();
        let mut sim = Sim::new(
            base + i,
            RouterConfig {
                redundancy: RedundancyMode::Never,
            },
            paths,
        );
        sim.run_for(Duration::from_secs(60 * MINUTES));
        for s in 0..2 {
            let times: Vec<Time> = sim.sides[s].switches.iter().skip(1).map(|w| w.0).collect();
            eprintln!("redundancy never, side {s}: {} switches", times.len());
            assert!(max_switches_per_window(&times) <= 1);
            assert_eq!(sim.sides[s].redundant_frames, 0);
        }
    }
}
