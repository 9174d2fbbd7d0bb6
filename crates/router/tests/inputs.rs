//! Bad input: errors for unknown paths and forged answers, no panic on anything.

use std::time::Duration;

use peercall_router::{
    Delivery, MAX_PATHS, Media, PathKind, Probe, ProbeAck, Report, Router, RouterConfig,
    RouterError,
};
use peercall_wire::Time;
use proptest::prelude::*;

const T0: Time = Time::from_secs(1_700_000_000);

fn router() -> Router {
    let mut r = Router::new(T0, RouterConfig::default());
    r.add_path(T0, 1, PathKind::Direct).expect("new path");
    r.add_path(T0, 2, PathKind::Relay2).expect("new path");
    r
}

#[test]
fn unknown_paths_forged_acks_and_bogus_reports_are_refused_and_counted() {
    let mut r = router();
    let media = Media {
        path: 9,
        path_seq: 0,
        seq: 0,
        timestamp: 0,
        flags: 0,
        payload: &[1],
    };
    assert_eq!(
        r.on_media_received(T0, &media),
        Err(RouterError::UnknownPath(9))
    );
    assert_eq!(r.on_media_sent(T0, 9), Err(RouterError::UnknownPath(9)));
    let ack = ProbeAck {
        path: 1,
        seq: 0,
        echo: 12345,
        held_us: 0,
    };
    assert_eq!(r.on_probe_ack(T0, &ack), Err(RouterError::UnknownProbe(1)));
    let report = Report {
        path: 2,
        highest_seq: 100,
        lost: 0,
        jitter_us: 0,
    };
    assert_eq!(r.on_report(T0, &report), Err(RouterError::BogusReport(2)));
    assert_eq!(
        r.add_path(T0, 1, PathKind::Direct),
        Err(RouterError::DuplicatePath(1))
    );
    for id in 3..=MAX_PATHS as u16 {
        r.add_path(T0, id, PathKind::Relay1).expect("room");
    }
    assert_eq!(
        r.add_path(T0, 100, PathKind::Relay1),
        Err(RouterError::TooManyPaths)
    );
    assert_eq!(r.stats(T0).rejected, 4);
    // A real probe's ack is taken once, then refused as a duplicate.
    let probe = r.poll_probe(T0).expect("a new path is probed at once");
    let ack = ProbeAck {
        path: probe.path,
        seq: probe.seq,
        echo: probe.sent_at,
        held_us: 1000,
    };
    let t = T0 + Duration::from_millis(31);
    assert_eq!(r.on_probe_ack(t, &ack), Ok(Duration::from_millis(30)));
    assert_eq!(
        r.on_probe_ack(t, &ack),
        Err(RouterError::UnknownProbe(probe.path))
    );
    // The path answered: it becomes the active one.
    assert_eq!(r.send_plan(t).primary, Some(probe.path));
}

#[test]
fn removing_the_active_path_moves_the_media() {
    let mut r = router();
    let t = T0 + Duration::from_millis(10);
    let heard = |r: &mut Router, path| r.on_packet_received(t, path).expect("known");
    heard(&mut r, 1);
    heard(&mut r, 2);
    assert_eq!(r.send_plan(t).primary, Some(1));
    r.remove_path(t, 1).expect("known");
    assert_eq!(r.send_plan(t).primary, Some(2));
    assert_eq!(r.remove_path(t, 1), Err(RouterError::UnknownPath(1)));
}

#[derive(Debug, Clone)]
enum Input {
    Media(u16, u32, u32, u32),
    Probe(u16, u32, u64),
    Ack(u16, u32, u64, u32),
    Report(u16, u32, u32, u32),
    Plan,
    Timeout,
    Advance(u32),
}

fn input() -> impl Strategy<Value = Input> {
    let path = 0u16..4;
    prop_oneof![
        (path.clone(), any::<u32>(), any::<u32>(), any::<u32>())
            .prop_map(|(p, a, b, c)| Input::Media(p, a, b, c)),
        (path.clone(), any::<u32>(), any::<u64>()).prop_map(|(p, a, b)| Input::Probe(p, a, b)),
        (path.clone(), any::<u32>(), any::<u64>(), any::<u32>())
            .prop_map(|(p, a, b, c)| Input::Ack(p, a, b, c)),
        (path, any::<u32>(), any::<u32>(), any::<u32>())
            .prop_map(|(p, a, b, c)| Input::Report(p, a, b, c)),
        Just(Input::Plan),
        Just(Input::Timeout),
        (0u32..2_000_000).prop_map(Input::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever arrives (authenticated but arbitrary frames), nothing panics, the
    /// plan names known paths, and the timeout never lies in the past for long.
    #[test]
    fn arbitrary_inputs_never_panic(inputs in prop::collection::vec(input(), 1..300)) {
        let mut r = router();
        let mut now = T0;
        for i in inputs {
            match i {
                Input::Media(path, path_seq, seq, timestamp) => {
                    let m = Media { path, path_seq, seq, timestamp, flags: 0, payload: &[1] };
                    let d = r.on_media_received(now, &m);
                    prop_assert!(matches!(d, Ok(Delivery::Fresh | Delivery::Duplicate)) || path > 2 || path == 0);
                }
                Input::Probe(path, seq, sent_at) => {
                    let _ = r.on_probe(now, &Probe { path, seq, sent_at });
                }
                Input::Ack(path, seq, echo, held_us) => {
                    let _ = r.on_probe_ack(now, &ProbeAck { path, seq, echo, held_us });
                }
                Input::Report(path, highest_seq, lost, jitter_us) => {
                    let _ = r.on_report(now, &Report { path, highest_seq, lost, jitter_us });
                }
                Input::Plan => {
                    let plan = r.send_plan(now);
                    for p in plan.paths() {
                        prop_assert!(p == 1 || p == 2);
                        r.on_media_sent(now, p).expect("planned path exists");
                    }
                    prop_assert!(plan.redundant.is_none() || plan.redundant != plan.primary);
                }
                Input::Timeout => r.handle_timeout(now),
                Input::Advance(us) => now = now + Duration::from_micros(u64::from(us)),
            }
            while let Some(p) = r.poll_probe(now) {
                prop_assert!(p.path == 1 || p.path == 2);
            }
            while r.poll_report(now).is_some() {}
            while r.poll_event().is_some() {}
            let stats = r.stats(now);
            for p in &stats.paths {
                prop_assert!(p.r.is_finite() && (0.0..=93.2).contains(&p.r));
                prop_assert!((1.0..=4.5).contains(&p.mos));
                prop_assert!((0.0..=1.0).contains(&p.loss));
            }
        }
    }
}
