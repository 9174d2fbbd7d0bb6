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

/// A str0m peer playing the browser over a real UDP socket on loopback.
struct FakeBrowser {
    rtc: str0m::Rtc,
    socket: UdpSocket,
    local: std::net::SocketAddr,
    mid: str0m::media::Mid,
    pending: Option<str0m::change::SdpPendingOffer>,
    connected: Option<Instant>,
    closed: bool,
    /// Opus packets received, in order.
    received: Vec<Vec<u8>>,
    buf: Vec<u8>,
}

impl FakeBrowser {
    /// A browser with one send-receive audio section; returns it and its SDP offer.
    fn offering() -> (FakeBrowser, String) {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(2)))
            .expect("timeout");
        let local = socket.local_addr().expect("local addr");
        let mut rtc = RtcConfig::new().build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp").expect("candidate"))
            .expect("candidate accepted");
        let mut api = rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, pending) = api.apply().expect("offer");
        let browser = FakeBrowser {
            rtc,
            socket,
            local,
            mid,
            pending: Some(pending),
            connected: None,
            closed: false,
            received: Vec::new(),
            buf: vec![0u8; 2000],
        };
        (browser, offer.to_sdp_string())
    }

    fn accept(&mut self, answer: &str) {
        let pending = self.pending.take().expect("an offer pending");
        self.rtc
            .sdp_api()
            .accept_answer(pending, SdpAnswer::from_sdp_string(answer).expect("answer"))
            .expect("answer accepted");
    }

    /// Sends everything str0m has to send and takes its events.
    fn drain(&mut self) {
        while let Ok(output) = self.rtc.poll_output() {
            match output {
                Output::Timeout(_) => break,
                Output::Transmit(t) => {
                    let _ = self.socket.send_to(&t.contents, t.destination);
                }
                Output::Event(Event::Connected) => self.connected = Some(Instant::now()),
                Output::Event(Event::MediaData(d)) => self.received.push(d.data.to_vec()),
                Output::Event(Event::Closed) => self.closed = true,
                Output::Event(_) => {}
            }
        }
    }

    /// Waits up to 2 ms for one datagram and hands it (or the time) to str0m.
    fn receive(&mut self) {
        let input = match self.socket.recv_from(&mut self.buf) {
            Ok((n, from)) => Input::Receive(
                Instant::now(),
                Receive::new(Protocol::Udp, from, self.local, &self.buf[..n]).expect("parsable"),
            ),
            Err(_) => Input::Timeout(Instant::now()),
        };
        // A closed session refuses input; that is fine here.
        let _ = self.rtc.handle_input(input);
        self.drain();
    }

    /// Runs until `done` or `limit` passes; returns whether `done` held.
    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&FakeBrowser) -> bool) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if done(self) {
                return true;
            }
            self.receive();
        }
        done(self)
    }

    /// Sends one Opus packet with RTP timestamp `ts` (48 kHz).
    fn send(&mut self, ts: u64, opus: Vec<u8>) {
        let writer = self.rtc.writer(self.mid).expect("writer");
        let pt = writer
            .payload_params()
            .find(|p| p.spec().codec == Codec::Opus)
            .map(|p| p.pt())
            .expect("Opus");
        writer
            .write(
                pt,
                Instant::now(),
                MediaTime::new(ts, Frequency::FORTY_EIGHT_KHZ),
                opus,
            )
            .expect("write");
        self.drain();
    }

    /// Sends `frames` 20 ms frames of a 330 Hz tone, paced in real time, while
    /// receiving; returns the packets sent.
    fn talk(&mut self, encoder: &mut Encoder, frames: u32) -> Vec<Vec<u8>> {
        let mut sent = Vec::new();
        let mut next = Instant::now();
        while sent.len() < frames as usize {
            if Instant::now() < next {
                self.receive();
                continue;
            }
            let i = sent.len() as u32;
            let mut pcm = [0i16; FRAME_SAMPLES];
            for (k, s) in pcm.iter_mut().enumerate() {
                let t = f64::from(i) * 0.02 + k as f64 / 48_000.0;
                *s = (6000.0 * (2.0 * std::f64::consts::PI * 330.0 * t).sin()) as i16;
            }
            let mut packet = vec![0u8; 1500];
            let n = encoder.encode(&pcm, &mut packet).expect("encode");
            packet.truncate(n);
            self.send(u64::from(i) * 960, packet.clone());
            sent.push(packet);
            next += Duration::from_millis(20);
        }
        sent
    }
}

#[test]
fn offer_endpoint_refuses_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Daemon::start(dir.path());

    // No token.
    let r = http(node.admin(), "POST", "/v1/webrtc/offer?echo=1", &[], "v=0").expect("POST");
    assert_eq!(r.status, 401, "{}", r.body);
    // Neither a call nor the echo flag.
    let r = node.post_authorized("/v1/webrtc/offer", "v=0");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("echo=1"), "{}", r.body);
    // A call that does not exist, or is not a number.
    let r = node.post_authorized("/v1/webrtc/offer?call=1", "v=0");
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"], "no call 1", "{}", r.body);
    let r = node.post_authorized("/v1/webrtc/offer?call=one", "v=0");
    assert_eq!(r.status, 400, "{}", r.body);
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
    assert!(r.body.contains("/assets/echo.js"));
    assert!(node.get("/assets/echo.js").body.contains("window.echoTest"));
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
    let (mut browser, offer) = FakeBrowser::offering();

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
    browser.accept(answer);
    let start = Instant::now();
    assert!(
        browser.run_until(DEADLINE, |b| b.connected.is_some()),
        "connected to the node"
    );
    let connected = browser.connected.expect("connected") - start;
    let mut encoder = Encoder::new(EncoderConfig::default()).expect("encoder");
    let sent = browser.talk(&mut encoder, FRAMES);
    browser.run_until(Duration::from_secs(2), |b| b.received.len() >= sent.len());
    let echoed = browser.received.clone();
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
    let closed = browser.run_until(Duration::from_secs(5), |b| b.closed);
    assert!(closed, "the browser side saw the close");
    let r = delete_authorized(&node, &format!("/v1/webrtc/sessions/{session}"));
    assert_eq!(r.status, 404);
    let metrics = node.get("/metrics").body;
    assert_eq!(metric(&metrics, "peercall_webrtc_sessions"), Some(0.0));
    node.stop();
}

/// Writes a 440 Hz tone of `secs` as a 48 kHz mono WAV.
fn write_tone(path: &std::path::Path, secs: u32) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 48_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).expect("create WAV");
    for i in 0..secs * 48_000 {
        let t = f64::from(i) / 48_000.0;
        w.write_sample((6000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16)
            .expect("sample");
    }
    w.finalize().expect("finalize");
}

/// The share of `x`'s energy at `freq` Hz (48 kHz samples): a Goertzel filter's
/// power over the total.
fn tone_share(x: &[i16], freq: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / 48_000.0;
    let (mut s1, mut s2, mut total) = (0.0f64, 0.0f64, 0.0f64);
    for &v in x {
        let v = f64::from(v);
        let s0 = v + 2.0 * w.cos() * s1 - s2;
        s2 = s1;
        s1 = s0;
        total += v * v;
    }
    let power = s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2;
    // A pure tone of amplitude A over N samples gives power (A N / 2)^2 and total
    // energy A^2 N / 2: normalise so a pure tone scores 1.
    if total == 0.0 {
        0.0
    } else {
        2.0 * power / (total * x.len() as f64)
    }
}

/// A browser joins a real call between two nodes: its Opus goes into the call
/// unchanged and reaches the far end's decoder and recording; the far end's audio
/// comes back to it as Opus; a second browser for the call, an ended or unknown
/// call are refused; when the browser session goes, the call ends on both sides
/// and the browser is told.
#[test]
fn a_browser_joins_a_call_and_its_opus_passes_through() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let (bob_play, bob_record) = (root.join("bob-tone.wav"), root.join("bob-heard.wav"));
    write_tone(&bob_play, 20);
    let (_seeds, spec) = start_seeds(root);
    let alice = start_call_node(
        &root.join("alice"),
        &[("PEERCALL_SEEDS", &spec), ("PEERCALL_HANDLE", "alice")],
    );
    let bob = start_call_node(
        &root.join("bob"),
        &[
            ("PEERCALL_SEEDS", &spec),
            ("PEERCALL_HANDLE", "bob"),
            ("PEERCALL_CALLS_AUTO_ANSWER", "true"),
            (
                "PEERCALL_CALLS_ANSWER_PLAY",
                bob_play.to_str().expect("utf-8"),
            ),
            (
                "PEERCALL_CALLS_ANSWER_RECORD",
                bob_record.to_str().expect("utf-8"),
            ),
        ],
    );
    wait_directory(&[("alice", &alice), ("bob", &bob)]);

    let r = alice.request("POST", "/v1/calls", "{\"to\": \"bob\"}");
    assert_eq!(r.status, 201, "{}", r.body);
    let call = r.json()["call"].as_u64().expect("call id");
    let (mut browser, offer) = FakeBrowser::offering();
    let r = alice.request("POST", &format!("/v1/webrtc/offer?call={call}"), &offer);
    assert_eq!(r.status, 201, "{}", r.body);
    let body = r.json();
    assert_eq!(body["call"], call, "{body}");
    assert_eq!(body["echo"], false, "{body}");
    let session = body["session"].as_u64().expect("session");
    browser.accept(body["answer"].as_str().expect("answer"));
    // A second browser for the same call is refused; nothing is left of it.
    let (_other, other_offer) = FakeBrowser::offering();
    let r = alice.request(
        "POST",
        &format!("/v1/webrtc/offer?call={call}"),
        &other_offer,
    );
    assert_eq!(r.status, 409, "{}", r.body);

    let call_state = |d: &Daemon, id: u64| d.request("GET", &format!("/v1/calls/{id}"), "").json();
    assert!(
        browser.run_until(DEADLINE, |b| b.connected.is_some()
            && call_state(&alice, call)["state"] == "active"),
        "the browser connected and the call is active: {}",
        call_state(&alice, call)
    );
    let mut encoder = Encoder::new(EncoderConfig::default()).expect("encoder");
    let sent = browser.talk(&mut encoder, 150);
    browser.run_until(Duration::from_millis(500), |_| false);

    // What the browser sent went into the call, one frame per packet (plus the
    // node's own silence in the moments between the call connecting and the
    // browser's offer).
    let stats = call_state(&alice, call);
    eprintln!("alice's call: {stats}");
    let frames_sent = stats["frames_sent"].as_u64().expect("frames_sent");
    assert!(
        frames_sent + 5 >= sent.len() as u64,
        "{frames_sent} frames sent for {} from the browser",
        sent.len()
    );
    // What bob plays reached the browser as Opus (bob's 440 Hz tone).
    assert!(
        browser.received.len() >= 100,
        "{} frames reached the browser",
        browser.received.len()
    );
    let mut decoder = peercall_media::Decoder::new().expect("decoder");
    let mut pcm = Vec::new();
    for packet in &browser.received[browser.received.len() - 50..] {
        let mut out = [0i16; FRAME_SAMPLES];
        decoder
            .decode(packet, &mut out)
            .expect("bob's frames decode");
        pcm.extend_from_slice(&out);
    }
    let share = tone_share(&pcm, 440.0);
    assert!(
        share > 0.5,
        "the browser hears bob's tone: share {share:.2}"
    );

    // The browser leaves: the call ends on both sides, the browser is told.
    let r = alice.request("DELETE", &format!("/v1/webrtc/sessions/{session}"), "");
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(browser.run_until(Duration::from_secs(5), |b| b.closed));
    let ended = eventually(Duration::from_secs(10), || {
        let calls = bob.request("GET", "/v1/calls", "").json();
        call_state(&alice, call)["state"] == "ended"
            && calls["calls"]
                .as_array()
                .is_some_and(|c| c.len() == 1 && c[0]["state"] == "ended")
    });
    assert!(ended, "both sides ended: {}", call_state(&alice, call));
    let bob_call = &bob.request("GET", "/v1/calls", "").json()["calls"][0];
    assert_eq!(bob_call["end_reason"], "hung up by the peer", "{bob_call}");
    // An ended call takes no browser.
    let (_late, late_offer) = FakeBrowser::offering();
    let r = alice.request(
        "POST",
        &format!("/v1/webrtc/offer?call={call}"),
        &late_offer,
    );
    assert_eq!(r.status, 409, "{}", r.body);

    // Bob recorded the browser's 330 Hz tone.
    let mut reader = hound::WavReader::open(&bob_record).expect("bob's recording");
    let heard: Vec<i16> = reader
        .samples::<i16>()
        .map(|s| s.expect("sample"))
        .collect();
    let tail = &heard[heard.len().saturating_sub(48_000)..];
    let loudest = heard
        .chunks(48_000)
        .map(|c| tone_share(c, 330.0))
        .fold(0.0, f64::max);
    eprintln!(
        "bob recorded {:.1} s; best one-second 330 Hz share {loudest:.2}, last second {:.2}",
        heard.len() as f64 / 48_000.0,
        tone_share(tail, 330.0)
    );
    assert!(loudest > 0.5, "bob hears the browser's tone: {loudest:.2}");

    let metrics = alice.get("/metrics").body;
    let value = |series: &str| metric(&metrics, series).unwrap_or(-1.0);
    assert_eq!(
        value("peercall_webrtc_audio_frames_total{direction=\"from_browser\"}"),
        sent.len() as f64
    );
    assert!(value("peercall_webrtc_audio_frames_total{direction=\"to_browser\"}") >= 100.0);
    assert_eq!(
        value("peercall_webrtc_refused_frames_total"),
        0.0,
        "{metrics}"
    );
    assert_eq!(value("peercall_webrtc_sessions"), 0.0, "{metrics}");
}
