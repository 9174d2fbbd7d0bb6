//! Failover: leaving a dead path, redundancy, switching to a better path.

// The two callers are indexed 0 and 1 across parallel per-side arrays.
#![allow(clippy::needless_range_loop)]

mod common;

use std::time::Duration;

use common::{FRAME, Link, START, Sim, seed};
use peercall_router::path::FEEDBACK_TIMEOUT;
use peercall_router::selector::{RETURN_CLEAN, SWITCH_HOLD};
use peercall_router::{PROBE_INTERVAL_WARM, PathKind, RedundancyMode, RouterConfig, SwitchReason};
use peercall_wire::Time;

const DIRECT: u16 = 0;
const RELAY: u16 = 1;

fn two_paths(seed: u64, mode: RedundancyMode, direct: Link, relay: Link) -> Sim {
    Sim::new(
        seed,
        RouterConfig { redundancy: mode },
        vec![
            (DIRECT, PathKind::Direct, direct.clone(), direct),
            (RELAY, PathKind::Relay1, relay.clone(), relay),
        ],
    )
}

/// The first switch of side `s` at or after `t`.
fn switch_after(sim: &Sim, s: usize, t: Time) -> Option<(Time, Option<u16>, u16, SwitchReason)> {
    sim.sides[s].switches.iter().copied().find(|sw| sw.0 >= t)
}

struct Failover {
    /// Per side: time from the cut to leaving the path.
    leave: [Duration; 2],
    /// Per side: the bound max(3 × RTT, 150 ms) with the RTT measured before the cut.
    bound: [Duration; 2],
    /// Frames each side sent that the other never got.
    lost: [u64; 2],
}

/// Both callers on a direct path (one-way `direct_ms`) with a relay standby; the
/// direct path is cut in both directions 20 s in.
fn cut_direct(seed: u64, mode: RedundancyMode, direct_ms: u64, loss: f64) -> Failover {
    let mut sim = two_paths(
        seed,
        mode,
        Link::new(direct_ms).jitter_ms(4).loss(loss),
        Link::new(direct_ms + 25).jitter_ms(4).loss(loss),
    );
    let cut = START + Duration::from_secs(20);
    sim.cut(DIRECT, cut, Duration::from_secs(600));
    sim.run_until(cut);
    let mut bound = [Duration::ZERO; 2];
    for s in 0..2 {
        assert_eq!(
            sim.routers[s].active(),
            Some(DIRECT),
            "side {s} starts direct"
        );
        let rtt = sim.routers[s].stats(sim.now).paths[0]
            .rtt
            .expect("measured");
        bound[s] = (rtt * 3).max(Duration::from_millis(150));
    }
    let first = [sim.next_seq(0), sim.next_seq(1)];
    sim.run_for(Duration::from_secs(10));
    let mut leave = [Duration::ZERO; 2];
    let mut lost = [0; 2];
    for s in 0..2 {
        let (at, from, to, reason) = switch_after(&sim, s, cut).expect("left the dead path");
        assert_eq!(
            (from, to, reason),
            (Some(DIRECT), RELAY, SwitchReason::Silent)
        );
        leave[s] = at.saturating_since(cut);
        // Frames sent up to 1 s before the end have all arrived or are lost.
        let until = sim.next_seq(s) - 50;
        lost[s] = sim.frames_lost(s, first[s], until);
        assert_eq!(sim.sides[s].delivered_twice, 0);
    }
    assert_eq!(sim.stuck, 0);
    Failover { leave, bound, lost }
}

#[test]
fn a_dead_active_path_is_left_within_the_bound() {
    let base = seed(11);
    let mut leaves = Vec::new();
    let mut losses = Vec::new();
    for (i, owd) in [10u64, 20, 40, 80, 150].into_iter().enumerate() {
        let f = cut_direct(base + i as u64, RedundancyMode::Auto, owd, 0.0);
        for s in 0..2 {
            eprintln!(
                "one-way {owd} ms, side {s}: left after {:?} (bound {:?}), {} frames lost",
                f.leave[s], f.bound[s], f.lost[s]
            );
            assert!(
                f.leave[s] <= f.bound[s],
                "left after {:?} > {:?}",
                f.leave[s],
                f.bound[s]
            );
            leaves.push(f.leave[s]);
            losses.push(f.lost[s]);
        }
    }
    leaves.sort();
    losses.sort();
    eprintln!(
        "time to leave a dead path: median {:?}, max {:?}; frames lost (auto redundancy): median {}, max {}",
        leaves[leaves.len() / 2],
        leaves[leaves.len() - 1],
        losses[losses.len() / 2],
        losses[losses.len() - 1]
    );
}

#[test]
fn a_dead_path_is_left_within_the_bound_on_lossy_links() {
    let base = seed(21);
    for i in 0..4 {
        let f = cut_direct(base + i, RedundancyMode::Auto, 25, 0.02);
        for s in 0..2 {
            eprintln!(
                "2 % loss, side {s}: left after {:?} (bound {:?})",
                f.leave[s], f.bound[s]
            );
            assert!(f.leave[s] <= f.bound[s]);
        }
    }
}

#[test]
fn with_redundancy_no_frame_is_lost_when_a_path_dies() {
    let base = seed(31);
    for i in 0..4 {
        let f = cut_direct(base + i, RedundancyMode::Always, 20 + 20 * i, 0.0);
        eprintln!(
            "redundancy always: frames lost {:?}, left after {:?}",
            f.lost, f.leave
        );
        assert_eq!(f.lost, [0, 0]);
    }
}

#[test]
fn switches_to_a_clearly_better_path_after_the_hold_time() {
    // Both start on the direct path; 30 s in it starts losing 15 % while the relay
    // stays clean.
    let mut sim = two_paths(
        seed(41),
        RedundancyMode::Auto,
        Link::new(20).jitter_ms(4),
        Link::new(45).jitter_ms(4).loss(0.005),
    );
    let degrade = START + Duration::from_secs(30);
    sim.run_until(degrade);
    assert_eq!(sim.routers[0].active(), Some(DIRECT));
    for dir in 0..2 {
        sim.link(DIRECT, dir).loss = 0.15;
    }
    sim.run_for(Duration::from_secs(30));
    for s in 0..2 {
        let (at, from, to, reason) = switch_after(&sim, s, degrade).expect("switched");
        let after = at.saturating_since(degrade);
        eprintln!("side {s}: switched to the better path {after:?} after it became better");
        assert_eq!(
            (from, to, reason),
            (Some(DIRECT), RELAY, SwitchReason::Better)
        );
        assert!(after >= SWITCH_HOLD, "{after:?}");
        assert!(after <= Duration::from_secs(12), "{after:?}");
        // And stays there.
        assert_eq!(
            sim.sides[s]
                .switches
                .iter()
                .filter(|w| w.0 >= degrade)
                .count(),
            1
        );
    }
}

#[test]
fn a_relayed_call_upgrades_to_a_direct_path_that_appears() {
    // The direct path is dead for the first 20 s (hole punching still going on).
    let mut sim = two_paths(
        seed(51),
        RedundancyMode::Auto,
        Link::new(25).jitter_ms(4),
        Link::new(60).jitter_ms(4),
    );
    let appear = START + Duration::from_secs(20);
    sim.cut(DIRECT, START, Duration::from_secs(20));
    sim.run_until(appear);
    assert_eq!(sim.routers[0].active(), Some(RELAY));
    sim.run_for(Duration::from_secs(40));
    for s in 0..2 {
        let (at, from, to, _) = switch_after(&sim, s, appear).expect("upgraded");
        let after = at.saturating_since(appear);
        eprintln!("side {s}: upgraded to direct {after:?} after it appeared");
        assert_eq!((from, to), (Some(RELAY), DIRECT));
        assert!(after <= Duration::from_secs(20), "{after:?}");
    }
}

#[test]
fn media_starts_on_the_first_working_path() {
    // Only the relay answers at first; the call must not wait for the direct path.
    let mut sim = two_paths(seed(61), RedundancyMode::Auto, Link::new(10), Link::new(50));
    sim.cut(DIRECT, START, Duration::from_secs(5));
    sim.run_for(Duration::from_millis(500));
    let (at, _, to, reason) = sim.sides[0].switches[0];
    assert_eq!((to, reason), (RELAY, SwitchReason::Initial));
    // One probe round trip on the relay plus a frame.
    assert!(at.saturating_since(START) <= Duration::from_millis(100) + FRAME);
}

#[test]
fn a_one_way_failure_is_left_within_the_feedback_timeout() {
    // Only side 0's direction of the direct path dies: side 1 stops hearing and
    // leaves at once; side 0 still hears side 1's probes on it, but no reports about
    // its own media, and leaves after the feedback timeout.
    let mut sim = two_paths(
        seed(71),
        RedundancyMode::Auto,
        Link::new(20).jitter_ms(4),
        Link::new(45).jitter_ms(4),
    );
    let cut = START + Duration::from_secs(20);
    // Registered up front: a packet's fate is drawn when it is sent.
    sim.link(DIRECT, 0)
        .outages
        .push((cut, cut + Duration::from_secs(600)));
    sim.run_until(cut);
    assert_eq!(sim.routers[0].active(), Some(DIRECT));
    sim.run_for(Duration::from_secs(5));
    let leave = |s: usize| {
        let (at, from, to, _) = switch_after(&sim, s, cut).expect("left the path");
        assert_eq!((from, to), (Some(DIRECT), RELAY));
        at.saturating_since(cut)
    };
    let (l0, l1) = (leave(0), leave(1));
    eprintln!("one-way failure: sender left after {l0:?}, receiver after {l1:?}");
    assert!(l1 <= Duration::from_millis(150), "{l1:?}");
    assert!(
        l0 <= FEEDBACK_TIMEOUT + Duration::from_millis(100),
        "{l0:?}"
    );
}

#[test]
fn a_quiet_path_is_covered_by_a_copy_and_a_re_send_before_it_turns_suspect() {
    // One-way 25 ms direct, 50 ms relay: with `Auto` redundancy, the quiet trigger
    // (two frame intervals plus a jitter margin of the peer's media missing) starts
    // a copy on the relay and re-sends what the direct path may have lost, so no
    // frame is lost for good when it dies.
    let base = seed(81);
    for i in 0..4 {
        let f = cut_direct(base + i, RedundancyMode::Auto, 25, 0.0);
        eprintln!(
            "auto, one-way 25 ms: frames lost {:?}, left after {:?}",
            f.lost, f.leave
        );
        assert_eq!(f.lost, [0, 0]);
    }
}

#[test]
fn a_healed_path_left_for_silence_gets_the_call_back_after_its_clean_time() {
    let mut sim = two_paths(
        seed(91),
        RedundancyMode::Auto,
        Link::new(25).jitter_ms(4),
        Link::new(50).jitter_ms(4),
    );
    let cut = START + Duration::from_secs(20);
    let outage = Duration::from_secs(10);
    sim.cut(DIRECT, cut, outage);
    sim.run_until(cut + outage);
    let healed = sim.now;
    sim.run_for(Duration::from_secs(20));
    for s in 0..2 {
        let (at, from, to, reason) = switch_after(&sim, s, healed).expect("returned");
        let after = at.saturating_since(healed);
        eprintln!("side {s}: back on the direct path {after:?} after it healed");
        assert_eq!(
            (from, to, reason),
            (Some(RELAY), DIRECT, SwitchReason::Better)
        );
        // Its clean time, plus a warm probe interval (the selector keeps the path
        // it may return to warm) and a round trip before its first answer.
        assert!(after >= RETURN_CLEAN, "{after:?}");
        assert!(
            after <= RETURN_CLEAN + PROBE_INTERVAL_WARM + Duration::from_millis(100),
            "{after:?}"
        );
    }
}

#[test]
fn a_path_that_flaps_gets_the_call_back_at_most_once() {
    // The direct path dies for 4 s every 10 s: up for 6 s, longer than the clean
    // time, so the call returns once, loses it again, and then needs twice the
    // clean time, which the path never gives.
    let mut sim = two_paths(
        seed(101),
        RedundancyMode::Auto,
        Link::new(25).jitter_ms(4),
        Link::new(50).jitter_ms(4),
    );
    let first = START + Duration::from_secs(20);
    for k in 0..12 {
        sim.cut(
            DIRECT,
            first + Duration::from_secs(10 * k),
            Duration::from_secs(4),
        );
    }
    sim.run_until(first + Duration::from_secs(120));
    for s in 0..2 {
        let returns = sim.sides[s]
            .switches
            .iter()
            .filter(|w| w.0 >= first && w.2 == DIRECT)
            .count();
        let all = sim.sides[s]
            .switches
            .iter()
            .filter(|w| w.0 >= first)
            .count();
        eprintln!("side {s}: {all} switches, {returns} back to the flapping path");
        assert!(returns <= 1, "{:?}", sim.sides[s].switches);
        // The failover, the return, its failover: then the call stays put.
        assert!(all <= 3, "{:?}", sim.sides[s].switches);
    }
}

#[test]
fn quiet_alarms_cost_little_on_a_healthy_lossy_call() {
    // Random loss and ± 4 ms jitter on both paths, for two minutes. At 1 % the
    // active path stays below the lossy threshold, so every copy comes from a quiet
    // alarm (two of the peer's frames missing in a row) and its re-send; at 2 % and
    // more the lossy rule (`LOSSY_ON`, measured over 10 s windows) adds copies of
    // its own, and only the re-sends are the alarms' cost.
    for (i, loss) in [0.01, 0.02, 0.05].into_iter().enumerate() {
        let mut sim = two_paths(
            seed(111 + i as u64),
            RedundancyMode::Auto,
            Link::new(25).jitter_ms(4).loss(loss),
            Link::new(50).jitter_ms(4).loss(loss),
        );
        sim.run_for(Duration::from_secs(120));
        for s in 0..2 {
            let side = &sim.sides[s];
            let copies = side.redundant_frames + side.resent_frames;
            let pct = 100.0 * copies as f64 / side.sent as f64;
            eprintln!(
                "{:.0} % loss, side {s}: {} copies + {} re-sent of {} frames ({pct:.2} %), {} switches",
                loss * 100.0,
                side.redundant_frames,
                side.resent_frames,
                side.sent,
                side.switches.len()
            );
            assert!(side.resent_frames * 100 <= side.sent, "re-sends above 1 %");
            if loss <= 0.01 {
                assert!(pct <= 2.0, "{pct:.2} %");
            }
        }
    }
}
