//! The WebRTC gateway in a real `peercall node` (feature `webrtc`): the admin
//! endpoints, and an echo session with a str0m peer playing the browser over real
//! UDP on the node's one port.

#![cfg(feature = "webrtc")]

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::*;
use peercall_media::{Encoder, EncoderConfig, FRAME_SAMPLES};
use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, RtcConfig};

/// Frames the fake browser sends: two seconds of audio.
const FRAMES: u32 = 100;
/// How long the whole exchange may take on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(20);

fn delete_authorized(d: &Daemon, path: &str) -> HttpResponse {
    let auth = format!("Bearer {}", d.token());
    http(d.admin(), "DELETE", path, &[("Authorization", &auth)], "").expect("DELETE")
}

fn offer_sdp(
    socket: &UdpSocket,
) -> (
    str0m::Rtc,
    str0m::change::SdpPendingOffer,
    String,
    str0m::media::Mid,
) {
    let mut rtc = RtcConfig::new().build(Instant::now());
    let local = socket.local_addr().expect("local addr");
    rtc.add_local_candidate(Candidate::host(local, "udp").expect("candidate"))
        .expect("candidate accepted");
    let mut api = rtc.sdp_api();
    let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let (offer, pending) = api.apply().expect("offer");
    (rtc, pending, offer.to_sdp_string(), mid)
}

#[test]
fn offer_endpoint_refuses_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Daemon::start(dir.path());

    // No token.
    let r = http(node.admin(), "POST", "/v1/webrtc/offer?echo=1", &[], "v=0").expect("POST");
    assert_eq!(r.status, 401, "{}", r.body);
    // No echo flag: there are no calls to join yet.
    let r = node.post_authorized("/v1/webrtc/offer", "v=0");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("echo=1"), "{}", r.body);
    // Joining a call's audio: the node has no calls to join yet, which the page
    // shows as "calls not available on this node".
    let r = node.post_authorized("/v1/webrtc/offer?call=1", "v=0");
    assert_eq!(r.status, 501, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .expect("error")
            .starts_with("calls not available on this node"),
        "{}",
        r.body
    );
    let r = node.post_authorized("/v1/webrtc/offer?call=1&echo=1", "v=0");
    assert_eq!(r.status, 400, "{}", r.body);
    // An unknown query parameter.
    let r = node.post_authorized("/v1/webrtc/offer?echo=1&video=1", "v=0");
    assert_eq!(r.status, 400, "{}", r.body);
    // Malformed SDP.
    let r = node.post_authorized("/v1/webrtc/offer?echo=1", "this is not SDP");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["error"].as_str().expect("error").contains("SDP"),
        "{}",
        r.body
    );
    // No such session.
    let r = delete_authorized(&node, "/v1/webrtc/sessions/77");
    assert_eq!(r.status, 404, "{}", r.body);
    let r = delete_authorized(&node, "/v1/webrtc/sessions/x");
    assert_eq!(r.status, 400, "{}", r.body);
    // The page is served, self-contained.
    let r = node.get("/webrtc/echo");
    assert_eq!(r.status, 200);
    assert!(r.body.contains("window.echoTest"));
    assert!(!r.body.contains("http://") && !r.body.contains("https://"));
    assert!(r.header("content-security-policy").is_some());

    let metrics = node.get("/metrics").body;
    assert_eq!(
        metric(&metrics, "peercall_webrtc_offers_total{result=\"refused\"}"),
        Some(1.0),
        "{metrics}"
    );
    node.stop();
}

#[test]
fn echo_session_over_the_nodes_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Daemon::start(dir.path());
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(2)))
        .expect("timeout");
    let local = socket.local_addr().expect("local addr");
    let (mut rtc, pending, offer, mid) = offer_sdp(&socket);

    let r = node.post_authorized("/v1/webrtc/offer?echo=1", &offer);
    assert_eq!(r.status, 201, "{}", r.body);
    let body = r.json();
    let session = body["session"].as_u64().expect("session id");
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/webrtc/sessions/{session}").as_str())
    );
    let answer = body["answer"].as_str().expect("answer");
    assert!(
        answer.contains(&format!("{} typ host", node.udp().port())),
        "the node's UDP port is the candidate: {answer}"
    );
    rtc.sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(answer).expect("answer"))
        .expect("answer accepted");

    let mut encoder = Encoder::new(EncoderConfig::default()).expect("encoder");
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let mut echoed: Vec<Vec<u8>> = Vec::new();
    let mut connected = None;
    let mut next_frame = Instant::now();
    let start = Instant::now();
    let mut buf = vec![0u8; 2000];
    while start.elapsed() < DEADLINE && echoed.len() < FRAMES as usize {
        // Drain.
        loop {
            match rtc.poll_output().expect("poll") {
                Output::Timeout(_) => break,
                Output::Transmit(t) => {
                    socket.send_to(&t.contents, t.destination).expect("send");
                }
                Output::Event(Event::Connected) => connected = Some(start.elapsed()),
                Output::Event(Event::MediaData(d)) => echoed.push(d.data.to_vec()),
                Output::Event(_) => {}
            }
        }
        let now = Instant::now();
        if connected.is_some() && sent.len() < FRAMES as usize && now >= next_frame {
            let i = sent.len() as u32;
            let mut pcm = [0i16; FRAME_SAMPLES];
            for (k, s) in pcm.iter_mut().enumerate() {
                let t = f64::from(i) * 0.02 + k as f64 / 48_000.0;
                *s = (6000.0 * (2.0 * std::f64::consts::PI * 330.0 * t).sin()) as i16;
            }
            let mut packet = vec![0u8; 1500];
            let n = encoder.encode(&pcm, &mut packet).expect("encode");
            packet.truncate(n);
            let writer = rtc.writer(mid).expect("writer");
            let pt = writer
                .payload_params()
                .find(|p| p.spec().codec == Codec::Opus)
                .map(|p| p.pt())
                .expect("Opus");
            writer
                .write(
                    pt,
                    now,
                    MediaTime::new(u64::from(i) * 960, Frequency::FORTY_EIGHT_KHZ),
                    packet.clone(),
                )
                .expect("write");
            sent.push(packet);
            next_frame += Duration::from_millis(20);
            continue;
        }
        let input = match socket.recv_from(&mut buf) {
            Ok((n, from)) => Input::Receive(
                Instant::now(),
                Receive::new(Protocol::Udp, from, local, &buf[..n]).expect("parsable"),
            ),
            Err(_) => Input::Timeout(Instant::now()),
        };
        rtc.handle_input(input).expect("input");
    }
    let connected = connected.expect("connected to the node");
    assert!(connected < Duration::from_secs(5), "took {connected:?}");
    // Loopback loses nothing; allow a frame or two in flight at the end.
    assert!(
        echoed.len() + 2 >= FRAMES as usize,
        "{} of {FRAMES} frames echoed",
        echoed.len()
    );
    for (i, frame) in echoed.iter().enumerate() {
        assert_eq!(frame, &sent[i], "frame {i} came back unchanged");
    }

    let metrics = node.get("/metrics").body;
    let value = |series: &str| metric(&metrics, series).unwrap_or(-1.0);
    assert_eq!(value("peercall_webrtc_sessions"), 1.0, "{metrics}");
    assert!(
        value("peercall_webrtc_audio_frames_total{direction=\"from_browser\"}")
            >= echoed.len() as f64
    );
    assert!(
        value("peercall_webrtc_audio_frames_total{direction=\"to_browser\"}")
            >= echoed.len() as f64
    );
    assert!(value("peercall_webrtc_datagrams_received_total") > f64::from(FRAMES));
    // None of the browser's datagrams reached the engine.
    assert_eq!(
        value("peercall_dropped_datagrams_total{reason=\"unknown_protocol\"}"),
        0.0,
        "{metrics}"
    );

    // Closing tells the browser.
    let r = delete_authorized(&node, &format!("/v1/webrtc/sessions/{session}"));
    assert_eq!(r.status, 204, "{}", r.body);
    let mut closed = false;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until && !closed {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let receive = Receive::new(Protocol::Udp, from, local, &buf[..n]).expect("parsable");
            let _ = rtc.handle_input(Input::Receive(Instant::now(), receive));
        } else {
            let _ = rtc.handle_input(Input::Timeout(Instant::now()));
        }
        while let Ok(output) = rtc.poll_output() {
            match output {
                Output::Timeout(_) => break,
                Output::Event(Event::Closed) => closed = true,
                _ => {}
            }
        }
    }
    assert!(closed, "the browser side saw the close");
    let r = delete_authorized(&node, &format!("/v1/webrtc/sessions/{session}"));
    assert_eq!(r.status, 404);
    let metrics = node.get("/metrics").body;
    assert_eq!(metric(&metrics, "peercall_webrtc_sessions"), Some(0.0));
    node.stop();
}
