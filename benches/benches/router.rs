//! Router: the per-packet cost of the estimators, the selector and the router's
//! entry points for a call with three paths.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use peercall_router::estimator::{JitterEstimator, LossWindow, RttEstimator};
use peercall_router::{
    Deduplicator, DefaultSelector, Media, PathKind, PathSelector, ProbeAck, Report, Router,
    RouterConfig,
};
use peercall_wire::Time;

const T0: Time = Time::from_secs(1_700_000_000);
const FRAME: Duration = Duration::from_millis(20);

/// A router with three paths, all answered, and a few seconds of media reports on
/// the direct one.
fn warm_router() -> Router {
    let mut r = Router::new(T0, RouterConfig::default());
    for (id, kind) in [
        (0, PathKind::Direct),
        (1, PathKind::Relay1),
        (2, PathKind::Relay2),
    ] {
        r.add_path(T0, id, kind).expect("fresh path");
        r.on_packet_received(T0, id).expect("known path");
    }
    let mut now = T0;
    for i in 0..500u32 {
        now = now + FRAME;
        let plan = r.send_plan(now);
        for p in plan.paths() {
            r.on_media_sent(now, p).expect("known path");
        }
        if i % 10 == 9 {
            let report = Report {
                path: 0,
                highest_seq: i,
                lost: 0,
                jitter_us: 1500,
            };
            r.on_report(now + Duration::from_millis(30), &report)
                .expect("valid report");
        }
        // Standby paths answer their probes after 40 ms (relay) or 70 ms (two relays).
        while let Some(p) = r.poll_probe(now) {
            let ack = ProbeAck {
                path: p.path,
                seq: p.seq,
                echo: p.sent_at,
                held_us: 0,
            };
            let rtt = Duration::from_millis(10 + 30 * u64::from(p.path));
            r.on_probe_ack(now + rtt, &ack)
                .expect("answers a probe in flight");
        }
    }
    r
}

fn estimators(c: &mut Criterion) {
    let mut g = c.benchmark_group("router_estimators");
    g.bench_function("rtt_sample", |b| {
        let mut e = RttEstimator::default();
        let mut now = T0;
        b.iter(|| {
            now = now + FRAME;
            e.on_sample(now, black_box(Duration::from_micros(41_500)))
        })
    });
    g.bench_function("jitter_arrival", |b| {
        let mut e = JitterEstimator::default();
        let mut now = T0;
        let mut sent = 0i64;
        b.iter(|| {
            now = now + FRAME + Duration::from_micros((sent as u64 * 7919) % 3000);
            sent += 20_000;
            e.on_arrival(black_box(sent), now)
        })
    });
    g.bench_function("loss_record", |b| {
        let mut w = LossWindow::default();
        let mut now = T0;
        let mut i = 0u32;
        b.iter(|| {
            now = now + FRAME;
            i = i.wrapping_add(1);
            if i.is_multiple_of(33) {
                w.record_lost(now, 1);
            } else {
                w.record_received(now, 1);
            }
        })
    });
    g.bench_function("loss_summary", |b| {
        let mut w = LossWindow::default();
        for i in 0..500u64 {
            w.record_received(T0 + FRAME * i as u32, 1);
        }
        let now = T0 + Duration::from_secs(10);
        b.iter(|| black_box(&w).summary(now))
    });
    g.bench_function("dedup_accept_pair", |b| {
        let mut d = Deduplicator::default();
        let mut seq = 0u32;
        b.iter(|| {
            seq = seq.wrapping_add(1);
            (d.accept(black_box(seq)), d.accept(black_box(seq)))
        })
    });
    g.finish();
}

fn selector(c: &mut Criterion) {
    let r = warm_router();
    let now = T0 + Duration::from_secs(11);
    let stats = r.stats(now);
    eprintln!(
        "bench router: active {:?}, R {:?}",
        stats.active,
        stats.paths.iter().map(|p| p.r).collect::<Vec<_>>()
    );
    let mut g = c.benchmark_group("router_selector");
    // The views the router would hand over: rebuilt from a selector round.
    let views: Vec<_> = stats
        .paths
        .iter()
        .map(|p| peercall_router::PathView {
            id: p.id,
            kind: p.kind,
            validated: true,
            silent: false,
            suspect: false,
            quiet: false,
            clean_since: Some(now),
            last_heard: Some(now),
            rtt: p.rtt,
            loss: p.loss,
            r: p.r,
            r_pessimistic: p.r - 2.0,
            r_optimistic: p.r + 1.0,
            measured_by_media: p.loss_from_media,
        })
        .collect();
    g.bench_function("default_select_3_paths", |b| {
        let mut s = DefaultSelector::default();
        let mut t = now;
        b.iter(|| {
            t = t + FRAME;
            s.select(t, black_box(&views))
        })
    });
    g.finish();
}

fn router(c: &mut Criterion) {
    let mut g = c.benchmark_group("router");
    g.bench_function("send_frame_3_paths", |b| {
        // Per outgoing frame: the plan (views of 3 paths + selector) and the
        // sequence numbers.
        let mut r = warm_router();
        let mut now = T0 + Duration::from_secs(11);
        b.iter(|| {
            now = now + FRAME;
            let plan = r.send_plan(now);
            for p in plan.paths() {
                black_box(r.on_media_sent(now, p).expect("known path"));
            }
        })
    });
    g.bench_function("receive_frame_and_report", |b| {
        // Per incoming frame: path estimators, report scheduling, de-duplication.
        let mut r = warm_router();
        let mut now = T0 + Duration::from_secs(11);
        let mut seq = 0u32;
        let payload = [0x5au8; 80];
        b.iter(|| {
            now = now + FRAME;
            seq = seq.wrapping_add(1);
            let m = Media {
                path: 0,
                path_seq: seq,
                seq,
                timestamp: seq.wrapping_mul(960),
                flags: 0,
                payload: &payload,
            };
            let d = r.on_media_received(now, black_box(&m)).expect("known path");
            (d, r.poll_report(now))
        })
    });
    g.bench_function("on_report", |b| {
        let mut r = warm_router();
        let mut now = T0 + Duration::from_secs(11);
        let mut highest = 0u32;
        b.iter(|| {
            now = now + FRAME;
            let seq = r.on_media_sent(now, 0).expect("known path");
            highest = seq;
            let report = Report {
                path: 0,
                highest_seq: highest,
                lost: 0,
                jitter_us: 1200,
            };
            r.on_report(now + Duration::from_millis(30), black_box(&report))
        })
    });
    g.finish();
}

criterion_group!(benches, estimators, selector, router);
criterion_main!(benches);
