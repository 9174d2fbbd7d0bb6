//! The scale scenario behind `peercall sim`, small: a few hundred real nodes on the
//! virtual clock, with the loss of 30% of the supernodes or a synchronized restart
//! of half the ordinary nodes at half the run. Each asserts the recovery property
//! of issue 3 (lookups ≥ 99% found within 2 s from 2 s after the strike, no
//! surviving supernode past its capacity) and prints its seed and report.

use std::time::Duration;

use peercall_sim::scale::{self, ScaleOptions, ScaleReport};

/// Nodes in each scenario: enough for a tier of several supernodes.
const NODES: usize = 300;
/// Seeds: enough supernodes that killing 30% leaves a tier and some records lose
/// more than one storer.
const SEEDS: usize = 8;
/// Simulated time: warm-up, strike at half, 30 s to recover.
const DURATION: Duration = Duration::from_secs(60);
/// Lookups per simulated second: 40 a second, so one lost lookup shows.
const LOOKUPS_PER_S: f64 = 40.0;

fn options(seed: u64) -> ScaleOptions {
    let mut o = ScaleOptions::new(NODES, seed, DURATION);
    o.seeds = SEEDS;
    o.warmup = Duration::from_secs(20);
    o.lookups_per_s = LOOKUPS_PER_S;
    o
}

fn run(opts: &ScaleOptions) -> ScaleReport {
    // The scenario prints its seed itself.
    let report = scale::run(opts, &mut |_| {}).expect("valid options");
    println!(
        "{}",
        serde_json::to_string(&report).expect("a report serializes")
    );
    report
}

fn assert_recovered(r: &ScaleReport) {
    assert!(r.struck > 0, "the strike hit nothing");
    let within = r
        .strike_success_within_2s
        .expect("lookups were made after the strike");
    assert!(
        within >= 0.99,
        "only {within:.4} of lookups from 2 s after the strike found within 2 s; timeline {:?}",
        r.strike_timeline
    );
    assert!(
        r.max_supernode_load_ratio <= 1.0,
        "a supernode went past capacity: {}",
        r.max_supernode_load_ratio
    );
    assert!(
        r.lookup_success_rate >= 0.99,
        "lookup success {}",
        r.lookup_success_rate
    );
    assert!(r.lookup_hops_p99 <= 1, "hops p99 {}", r.lookup_hops_p99);
}

#[test]
fn losing_30_percent_of_supernodes_recovers_within_2_s() {
    let mut o = options(11);
    o.kill_supernodes_pct = 30.0;
    let r = run(&o);
    assert!(
        r.struck >= 2,
        "30% of {SEEDS} seeds is at least 2: {}",
        r.struck
    );
    assert_recovered(&r);
    // Every second after the strike is back at 99% within 2 s by 5 s.
    let rec = r.recovery_s.expect("a strike happened");
    assert!(
        rec <= 5.0,
        "recovered only after {rec} s: {:?}",
        r.strike_timeline
    );
}

#[test]
fn restart_storm_of_half_the_nodes_recovers_within_2_s() {
    let mut o = options(12);
    o.restart_storm_pct = 50.0;
    let r = run(&o);
    assert!(
        r.struck >= NODES / 3,
        "half the ordinary nodes restart: {}",
        r.struck
    );
    assert_recovered(&r);
}

#[test]
fn options_are_validated() {
    let mut o = options(1);
    o.seeds = 2;
    assert!(
        scale::run(&o, &mut |_| {}).is_err(),
        "two seeds are too few"
    );
    let mut o = options(1);
    o.kill_supernodes_pct = 150.0;
    assert!(
        scale::run(&o, &mut |_| {}).is_err(),
        "150% is not a percentage"
    );
    let mut o = options(1);
    o.warmup = DURATION;
    assert!(
        scale::run(&o, &mut |_| {}).is_err(),
        "warm-up as long as the run"
    );
}
