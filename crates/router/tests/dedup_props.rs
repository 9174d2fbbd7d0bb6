//! Property tests of the de-duplicator against an exact model.

use std::collections::HashSet;

use peercall_router::{DEDUP_WINDOW, Deduplicator};
use proptest::prelude::*;

/// Arrivals: a stream position that moves forward, frames around it (late ones far
/// behind, a few ahead), and repeats of earlier arrivals (the second path's copy).
fn arrivals() -> impl Strategy<Value = (u32, Vec<(u32, i32, bool)>)> {
    (
        any::<u32>(),
        prop::collection::vec((0u32..40, -1500i32..60, any::<bool>()), 1..600),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_twice_and_never_a_new_frame_in_the_window_refused((start, ops) in arrivals()) {
        let mut d = Deduplicator::default();
        let mut delivered: HashSet<u32> = HashSet::new();
        let mut newest: Option<u32> = None;
        let mut pos = start;
        let mut last = start;
        for (step, offset, repeat) in ops {
            pos = pos.wrapping_add(step);
            let seq = if repeat { last } else { pos.wrapping_add_signed(offset) };
            last = seq;
            let in_window = newest
                .is_none_or(|n| (seq.wrapping_sub(n) as i32) > -(DEDUP_WINDOW as i32));
            let expected = in_window && !delivered.contains(&seq);
            let got = d.accept(seq);
            prop_assert_eq!(got, expected, "seq {} newest {:?}", seq, newest);
            if got {
                prop_assert!(delivered.insert(seq), "delivered twice: {}", seq);
                if newest.is_none_or(|n| (seq.wrapping_sub(n) as i32) > 0) {
                    newest = Some(seq);
                }
            }
        }
    }

    #[test]
    fn every_frame_on_two_paths_is_delivered_exactly_once(
        start in any::<u32>(),
        n in 1usize..2000,
        skew in 0usize..30,
    ) {
        // Path A delivers frames in order; path B the same frames `skew` later.
        let mut d = Deduplicator::default();
        let mut fresh = 0usize;
        for i in 0..n + skew {
            if i < n && d.accept(start.wrapping_add(i as u32)) {
                fresh += 1;
            }
            if i >= skew && d.accept(start.wrapping_add((i - skew) as u32)) {
                fresh += 1;
            }
        }
        prop_assert_eq!(fresh, n);
        prop_assert_eq!(d.duplicates() as usize, n);
    }
}

#[test]
fn memory_is_bounded() {
    // A fixed bitmap, whatever the traffic.
    assert!(std::mem::size_of::<Deduplicator>() <= 160);
    assert_eq!(DEDUP_WINDOW % 64, 0);
}
