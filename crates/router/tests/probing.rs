//! The probing policy: warm and cold paths, media replacing probes.

mod common;

use std::time::Duration;

use common::{Link, Sim, seed};
use peercall_router::{MIN_WARM_PATHS, PathKind, PathState, RouterConfig};

#[test]
fn two_paths_stay_warm_the_rest_are_cold_and_media_replaces_probes() {
    let mut sim = Sim::new(
        seed(81),
        RouterConfig::default(),
        vec![
            (0, PathKind::Direct, Link::new(20), Link::new(20)),
            (1, PathKind::Relay1, Link::new(35), Link::new(35)),
            (2, PathKind::Relay2, Link::new(60), Link::new(60)),
        ],
    );
    sim.run_for(Duration::from_secs(10));
    let before = sim.routers[0].stats(sim.now);
    sim.run_for(Duration::from_secs(60));
    let after = sim.routers[0].stats(sim.now);
    let rate = |i: usize| (after.paths[i].probes_sent - before.paths[i].probes_sent) as f64 / 60.0;
    let warm = after.paths.iter().filter(|p| p.warm).count();
    eprintln!(
        "probes per second: active {:.2}, standby {:.2}, cold {:.2}; warm paths {warm}",
        rate(0),
        rate(1),
        rate(2)
    );
    assert_eq!(after.paths[0].state, PathState::Active);
    assert!(warm >= MIN_WARM_PATHS);
    assert!(after.paths[1].warm && !after.paths[2].warm);
    // The active path carries media and its reports: no probes.
    assert!(rate(0) < 0.1);
    // The warm standby: one probe 250 ms after each answer.
    assert!((3.0..4.0).contains(&rate(1)), "{}", rate(1));
    // The cold one: every 2 s after the answer.
    assert!((0.4..0.5).contains(&rate(2)), "{}", rate(2));
    // Every path has an RTT.
    assert!(after.paths.iter().all(|p| p.rtt.is_some()));
}

#[test]
fn an_idle_call_keeps_its_active_path_measured() {
    let mut sim = Sim::new(
        seed(82),
        RouterConfig::default(),
        vec![
            (0, PathKind::Direct, Link::new(20), Link::new(20)),
            (1, PathKind::Relay1, Link::new(35), Link::new(35)),
        ],
    );
    sim.sides[0].talking = false;
    sim.sides[1].talking = false;
    sim.run_for(Duration::from_secs(30));
    let s = sim.routers[0].stats(sim.now);
    assert_eq!(s.active, Some(0));
    assert_eq!(s.switches, 0);
    for p in &s.paths {
        assert!(p.probes_sent > 80, "{}", p.probes_sent);
        assert!(p.since_heard.expect("heard") < Duration::from_millis(400));
    }
}
