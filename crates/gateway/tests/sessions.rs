//! Browser sessions end to end on a virtual clock, with str0m peers as browsers.

mod common;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use common::{Browser, Net, Tone, gateway_addr};
use peercall_gateway::{
    CallKey, DisconnectReason, GatewayConfig, GatewayError, GatewayEvent, SessionId,
};
use peercall_media::{Decoder, FRAME_SAMPLES};
use str0m::RtcConfig;
use str0m::media::{Direction, MediaKind};

/// 20 ms of Opus at 48 kHz.
const FRAME_TICKS: u32 = 960;

fn audio_from(events: &[GatewayEvent], session: SessionId) -> Vec<(u32, u32, Vec<u8>)> {
    events
        .iter()
        .filter_map(|e| match e {
            GatewayEvent::AudioFrame {
                id,
                seq,
                timestamp,
                opus,
            } if *id == session => Some((*seq, *timestamp, opus.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn browser_connects_and_opus_passes_through_both_ways() {
    let mut net = Net::seeded();
    let (b, accepted) = net.add_browser(50_000, CallKey(1));
    let id = accepted.session;
    assert!(
        accepted.answer.contains("a=ice-lite"),
        "{}",
        accepted.answer
    );
    assert!(
        accepted.answer.contains("opus/48000/2"),
        "{}",
        accepted.answer
    );
    assert!(
        accepted.answer.contains("a=sendrecv"),
        "{}",
        accepted.answer
    );
    assert!(
        accepted.answer.contains("127.0.0.1 7600 typ host"),
        "{}",
        accepted.answer
    );

    let took = net.run_until(Duration::from_secs(5), |n| {
        n.gateway_connected(id) && n.browsers[0].connected
    });
    assert!(took < Duration::from_secs(1), "connecting took {took:?}");
    assert!(net.gw.is_connected(id));

    // Two seconds of real Opus each way, 20 ms apart.
    let mut up = Tone::new();
    let mut down = Tone::new();
    let mut sent_up = Vec::new();
    let mut sent_down = Vec::new();
    let mut frame = 0u32;
    net.run(Duration::from_secs(2), |net| {
        if net.now.saturating_since(net.t0).as_millis() % 20 != 0 {
            return;
        }
        let at = net.instant(net.now);
        let packet = up.next_packet();
        net.browsers[b].send_opus(at, u64::from(frame * FRAME_TICKS), &packet);
        sent_up.push(packet);
        let packet = down.next_packet();
        net.gw
            .send_audio(id, net.now, 5_000 + frame * FRAME_TICKS, &packet)
            .expect("send to the browser");
        sent_down.push(packet);
        frame += 1;
    });
    net.run(Duration::from_millis(200), |_| {});

    let up_frames = audio_from(&net.events, id);
    assert_eq!(up_frames.len(), sent_up.len(), "every frame arrives");
    for (i, (seq, ts, opus)) in up_frames.iter().enumerate() {
        assert_eq!(opus, &sent_up[i], "frame {i} is passed through unchanged");
        if i > 0 {
            assert_eq!(*seq, up_frames[i - 1].0.wrapping_add(1));
            assert_eq!(*ts, up_frames[i - 1].1.wrapping_add(FRAME_TICKS));
        }
    }
    // And it is real Opus.
    let mut decoder = Decoder::new().expect("decoder");
    let mut pcm = [0i16; FRAME_SAMPLES];
    for (_, _, opus) in &up_frames {
        decoder.decode(opus, &mut pcm).expect("decodes");
    }

    let down_frames = &net.browsers[b].received;
    assert_eq!(down_frames.len(), sent_down.len());
    for (i, (_, _, opus)) in down_frames.iter().enumerate() {
        assert_eq!(opus, &sent_down[i]);
    }
    let stats = net.gw.stats();
    assert_eq!(stats.frames_in, sent_up.len() as u64);
    assert_eq!(stats.frames_out, sent_down.len() as u64);
    assert_eq!(stats.sessions, 1);
    assert!(net.stray.is_empty());
    assert!(net.untaken.is_empty(), "{:?}", net.untaken);
}

#[test]
fn browser_receiver_reports_become_feedback() {
    let mut net = Net::seeded();
    let (_, accepted) = net.add_browser(50_000, CallKey(1));
    let id = accepted.session;
    net.run_until(Duration::from_secs(5), |n| n.gateway_connected(id));
    // Lose every tenth datagram to the browser that carries media (SRTP, first
    // byte 128..=191, and at least a few bytes of payload).
    let mut n = 0u32;
    net.to_browser = Box::new(move |bytes| {
        if bytes[0] & 0xC0 != 0x80 || bytes.len() < 60 {
            return true;
        }
        n += 1;
        !n.is_multiple_of(10)
    });
    let mut tone = Tone::new();
    let mut frame = 0u32;
    net.run(Duration::from_secs(12), |net| {
        if net.now.saturating_since(net.t0).as_millis() % 20 == 0 {
            let packet = tone.next_packet();
            net.gw
                .send_audio(id, net.now, frame * FRAME_TICKS, &packet)
                .expect("send");
            frame += 1;
        }
    });
    let reports: Vec<_> = net
        .events
        .iter()
        .filter_map(|e| match e {
            GatewayEvent::Feedback { id: s, report } if *s == id => Some(*report),
            _ => None,
        })
        .collect();
    // str0m, like browsers, sends an audio receiver report every few seconds.
    assert!(reports.len() >= 2, "receiver reports arrive: {reports:?}");
    let last = reports.last().expect("one report");
    assert!(
        last.packets_lost > 20,
        "the browser counted the lost packets: {last:?}"
    );
    for r in &reports {
        assert!(
            (0.05..=0.15).contains(&r.loss_fraction),
            "about one packet in ten lost: {reports:?}"
        );
    }
}

#[test]
fn a_second_session_for_the_same_call_is_refused() {
    let mut net = Net::seeded();
    let (_, first) = net.add_browser(50_000, CallKey(9));
    let (_, offer) = Browser::offering(
        RtcConfig::new(),
        "127.0.0.1:50001".parse().expect("addr"),
        MediaKind::Audio,
        Direction::SendRecv,
        net.instant(net.now),
    );
    let err = net
        .gw
        .accept_offer(net.now, CallKey(9), &offer, gateway_addr())
        .expect_err("second session refused");
    assert_eq!(
        err,
        GatewayError::CallTaken {
            call: CallKey(9),
            session: first.session
        }
    );
    assert!(err.to_string().contains("already has a browser session"));
    assert_eq!(net.gw.session_of(CallKey(9)), Some(first.session));
    // Another call is fine, and once the first session is closed the call is free.
    net.gw
        .accept_offer(net.now, CallKey(10), &offer, gateway_addr())
        .expect("another call");
    assert!(net.gw.close(first.session));
    assert!(!net.gw.close(first.session), "closing twice is a no-op");
    let again = net
        .gw
        .accept_offer(net.now, CallKey(9), &offer, gateway_addr())
        .expect("the call is free again");
    assert_ne!(again.session, first.session);
    let stats = net.gw.stats();
    assert_eq!((stats.offers_accepted, stats.offers_refused), (3, 1));
}

#[test]
fn sessions_are_bounded() {
    let mut config = GatewayConfig::new([1; 32]);
    config.max_sessions = NonZeroUsize::new(2).expect("2");
    let mut net = Net::new(config);
    net.add_browser(50_000, CallKey(1));
    net.add_browser(50_001, CallKey(2));
    let (_, offer) = Browser::offering(
        RtcConfig::new(),
        "127.0.0.1:50002".parse().expect("addr"),
        MediaKind::Audio,
        Direction::SendRecv,
        net.instant(net.now),
    );
    assert_eq!(
        net.gw
            .accept_offer(net.now, CallKey(3), &offer, gateway_addr())
            .expect_err("full"),
        GatewayError::TooManySessions(2)
    );
}

#[test]
fn malformed_or_unsuitable_offers_get_clear_errors() {
    let mut net = Net::seeded();
    let now = net.now;
    let at = net.instant(now);
    let gw = gateway_addr();
    let offer = |config: RtcConfig, kind, direction| {
        Browser::offering(
            config,
            "127.0.0.1:50000".parse().expect("addr"),
            kind,
            direction,
            at,
        )
        .1
    };
    let recvonly = offer(RtcConfig::new(), MediaKind::Audio, Direction::RecvOnly);
    let video = offer(RtcConfig::new(), MediaKind::Video, Direction::SendRecv);
    let pcmu_only = offer(
        RtcConfig::new().clear_codecs().enable_pcmu(true, false),
        MediaKind::Audio,
        Direction::SendRecv,
    );
    let good = offer(RtcConfig::new(), MediaKind::Audio, Direction::SendRecv);
    let no_fingerprint: String = good
        .lines()
        .filter(|l| !l.starts_with("a=fingerprint"))
        .map(|l| format!("{l}\r\n"))
        .collect();

    type Check = fn(&GatewayError) -> bool;
    let cases: Vec<(String, Check)> = vec![
        ("".into(), |e| matches!(e, GatewayError::MalformedSdp(_))),
        ("hello, gateway".into(), |e| {
            matches!(e, GatewayError::MalformedSdp(_))
        }),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n".into(), |e| {
            matches!(
                e,
                GatewayError::MalformedSdp(_) | GatewayError::OfferRejected(_)
            )
        }),
        (good[..good.len() / 2].into(), |e| {
            matches!(
                e,
                GatewayError::MalformedSdp(_) | GatewayError::OfferRejected(_)
            )
        }),
        ("x".repeat(peercall_gateway::MAX_SDP_LEN + 1), |e| {
            matches!(e, GatewayError::SdpTooLarge { .. })
        }),
        (recvonly, |e| {
            *e == GatewayError::NotSendRecv("recvonly".into())
        }),
        (video, |e| *e == GatewayError::NoAudio),
        (pcmu_only, |e| *e == GatewayError::NoOpus),
        (no_fingerprint, |e| {
            matches!(
                e,
                GatewayError::OfferRejected(_) | GatewayError::MalformedSdp(_)
            )
        }),
    ];
    for (i, (sdp, expected)) in cases.iter().enumerate() {
        let err = net
            .gw
            .accept_offer(now, CallKey(i as u64), sdp, gw)
            .expect_err("refused");
        assert!(expected(&err), "case {i}: unexpected {err:?}");
        assert!(!err.to_string().is_empty());
    }
    // A candidate a browser cannot reach.
    for bad in ["0.0.0.0:7600", "127.0.0.1:0", "224.0.0.1:7600"] {
        let bad: SocketAddr = bad.parse().expect("addr");
        assert_eq!(
            net.gw
                .accept_offer(now, CallKey(99), &good, bad)
                .expect_err("bad candidate"),
            GatewayError::BadCandidate(bad)
        );
    }
    let stats = net.gw.stats();
    assert_eq!(stats.sessions, 0, "refusals leave nothing behind");
    assert_eq!(stats.offers_refused, cases.len() as u64 + 3);
    assert_eq!(net.gw.poll_timeout(), None);
    assert_eq!(net.gw.poll_transmit(), None);
    assert_eq!(net.gw.poll_event(), None);
}

#[test]
fn an_offer_nobody_follows_up_times_out() {
    let mut net = Net::seeded();
    let (_, offer) = Browser::offering(
        RtcConfig::new(),
        "127.0.0.1:50000".parse().expect("addr"),
        MediaKind::Audio,
        Direction::SendRecv,
        net.instant(net.now),
    );
    let accepted = net
        .gw
        .accept_offer(net.now, CallKey(1), &offer, gateway_addr())
        .expect("accepted");
    let timeout = GatewayConfig::new([0; 32]).connect_timeout;
    // The browser never answers: nothing but the gateway's timers run.
    let took = net.run_until(timeout + Duration::from_secs(5), |n| {
        n.events.iter().any(|e| {
            *e == GatewayEvent::Disconnected(accepted.session, DisconnectReason::ConnectTimeout)
        })
    });
    // ICE gives up after 15 s without a check, or the connect timeout hits first.
    assert!(took <= timeout + Duration::from_millis(50), "{took:?}");
    assert!(took >= Duration::from_secs(10), "{took:?}");
    assert_eq!(net.gw.stats().sessions, 0);
    assert_eq!(net.gw.poll_timeout(), None);
    assert_eq!(net.gw.session_of(CallKey(1)), None);
    assert_eq!(
        net.gw.send_audio(accepted.session, net.now, 0, &[1]),
        Err(GatewayError::UnknownSession(accepted.session))
    );
}

#[test]
fn a_browser_that_vanishes_is_disconnected() {
    let mut net = Net::seeded();
    let (b, accepted) = net.add_browser(50_000, CallKey(1));
    let id = accepted.session;
    net.run_until(Duration::from_secs(5), |n| n.gateway_connected(id));
    // Talk for a while, with consent checks flowing.
    net.run(Duration::from_secs(10), |_| {});
    assert!(net.gw.is_connected(id), "consent checks keep it up");
    net.browsers[b].vanished = true;
    let took = net.run_until(Duration::from_secs(60), |n| {
        n.events
            .iter()
            .any(|e| matches!(e, GatewayEvent::Disconnected(s, _) if *s == id))
    });
    let reason = net.events.iter().find_map(|e| match e {
        GatewayEvent::Disconnected(s, r) if *s == id => Some(r.clone()),
        _ => None,
    });
    assert_eq!(reason, Some(DisconnectReason::ConsentLost));
    // str0m ends an ICE-lite pair 15 s after the last check; checks come every few s.
    assert!(
        took >= Duration::from_secs(10) && took <= Duration::from_secs(20),
        "noticed after {took:?}"
    );
    assert!(!net.gw.is_connected(id));
    assert_eq!(net.gw.stats().sessions, 0);
    assert_eq!(net.gw.stats().disconnects, 1);
    assert_eq!(net.gw.poll_timeout(), None, "no timers left behind");
}

#[test]
fn close_tells_the_browser_and_frees_everything() {
    let mut net = Net::seeded();
    let (b, accepted) = net.add_browser(50_000, CallKey(1));
    let id = accepted.session;
    net.run_until(Duration::from_secs(5), |n| {
        n.gateway_connected(id) && n.browsers[0].connected
    });
    assert!(net.gw.close(id));
    net.run_until(Duration::from_secs(2), |n| n.browsers[b].closed);
    assert!(
        !net.events
            .iter()
            .any(|e| matches!(e, GatewayEvent::Disconnected(..))),
        "no Disconnected for a local close"
    );
    assert_eq!(net.gw.stats().sessions, 0);
    // The browser's last words still went to the gateway (dropped there), not to
    // the engine; ten seconds on, its address is nobody's again.
    assert!(net.untaken.is_empty(), "{:?}", net.untaken);
    let browser = net.browsers[b].addr;
    let dropped = net.gw.stats().datagrams_dropped;
    assert!(net.gw.handle_datagram(net.now, browser, &[0x80, 0, 0]));
    assert_eq!(net.gw.stats().datagrams_dropped, dropped + 1);
    net.browsers[b].vanished = true;
    net.run(Duration::from_secs(11), |_| {});
    assert!(!net.gw.handle_datagram(net.now, browser, &[0x80, 0, 0]));
    assert!(!net.gw.handle_datagram(net.now, browser, &[22, 0, 0]));
    assert_eq!(
        net.gw.send_audio(id, net.now, 0, &[1]),
        Err(GatewayError::UnknownSession(id))
    );
}

#[test]
fn sending_before_connected_is_refused() {
    let mut net = Net::seeded();
    let (_, accepted) = net.add_browser(50_000, CallKey(1));
    assert_eq!(
        net.gw
            .send_audio(accepted.session, net.now, 0, &[0xF8, 1, 2]),
        Err(GatewayError::NotConnected(accepted.session))
    );
}

#[test]
fn two_browsers_are_kept_apart() {
    let mut net = Net::seeded();
    let (b1, s1) = net.add_browser(50_000, CallKey(1));
    let (b2, s2) = net.add_browser(50_001, CallKey(2));
    net.run_until(Duration::from_secs(5), |n| {
        n.gateway_connected(s1.session) && n.gateway_connected(s2.session)
    });
    let at = net.instant(net.now);
    net.browsers[b1].send_opus(at, 0, &[0xF8, 1, 1, 1]);
    net.browsers[b2].send_opus(at, 0, &[0xF8, 2, 2, 2]);
    net.gw
        .send_audio(s1.session, net.now, 0, &[0xF8, 3])
        .expect("send");
    net.gw
        .send_audio(s2.session, net.now, 0, &[0xF8, 4])
        .expect("send");
    net.run(Duration::from_millis(100), |_| {});
    assert_eq!(
        audio_from(&net.events, s1.session)[0].2,
        vec![0xF8, 1, 1, 1]
    );
    assert_eq!(
        audio_from(&net.events, s2.session)[0].2,
        vec![0xF8, 2, 2, 2]
    );
    assert_eq!(net.browsers[b1].received[0].2, vec![0xF8, 3]);
    assert_eq!(net.browsers[b2].received[0].2, vec![0xF8, 4]);
}
