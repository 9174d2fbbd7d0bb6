//! A virtual-clock harness: the gateway and str0m "browsers" (ordinary, full-ICE
//! str0m peers that make the offer, as Chrome does) exchanging datagrams in memory.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peercall_gateway::{Accepted, CallKey, Gateway, GatewayConfig, GatewayEvent, Transmit};
use peercall_media::{Encoder, EncoderConfig, FRAME_SAMPLES};
use peercall_wire::Time;
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

/// The node's UDP address, as offered to browsers.
pub const GATEWAY: &str = "127.0.0.1:7600";
/// The harness's clock step: fine enough for 20 ms audio and str0m's pacing.
pub const STEP: Duration = Duration::from_millis(1);

pub fn gateway_addr() -> SocketAddr {
    GATEWAY.parse().expect("a socket address")
}

/// A str0m peer playing the browser.
pub struct Browser {
    pub rtc: Rtc,
    pub addr: SocketAddr,
    pub mid: Mid,
    pub pending: Option<SdpPendingOffer>,
    pub connected: bool,
    pub closed: bool,
    /// (sequence number, RTP timestamp, payload) of the audio received.
    pub received: Vec<(u64, u64, Vec<u8>)>,
    /// Stop taking part (the tab was closed without goodbye).
    pub vanished: bool,
    pub next_timeout: Option<Instant>,
    /// Datagrams this browser sent, kept for replay tests.
    pub sent: Vec<Vec<u8>>,
}

impl Browser {
    /// A browser at `addr` offering audio in `direction` with `config`'s codecs.
    pub fn offering(
        config: RtcConfig,
        addr: SocketAddr,
        kind: MediaKind,
        direction: Direction,
        at: Instant,
    ) -> (Browser, String) {
        let mut rtc = config.build(at);
        rtc.add_local_candidate(Candidate::host(addr, "udp").expect("a host candidate"))
            .expect("candidate accepted");
        let mut api = rtc.sdp_api();
        let mid = api.add_media(kind, direction, None, None, None);
        let (offer, pending) = api.apply().expect("an offer");
        let browser = Browser {
            rtc,
            addr,
            mid,
            pending: Some(pending),
            connected: false,
            closed: false,
            received: Vec::new(),
            vanished: false,
            next_timeout: None,
            sent: Vec::new(),
        };
        (browser, offer.to_sdp_string())
    }

    pub fn accept_answer(&mut self, answer: &str) {
        let answer = SdpAnswer::from_sdp_string(answer).expect("the gateway's answer parses");
        let pending = self.pending.take().expect("an offer is pending");
        self.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .expect("the gateway's answer is accepted");
    }

    /// Polls until a timeout; returns the datagrams to send.
    pub fn drain(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    self.next_timeout = Some(t);
                    break;
                }
                Ok(Output::Transmit(t)) => out.push((t.destination, t.contents.into())),
                Ok(Output::Event(e)) => match e {
                    Event::Connected => self.connected = true,
                    Event::Closed => self.closed = true,
                    Event::MediaData(d) => {
                        self.received
                            .push((**d.seq_range.start(), d.time.numer(), d.data.to_vec()))
                    }
                    _ => {}
                },
                Err(_) => {
                    self.closed = true;
                    break;
                }
            }
        }
        out
    }

    /// Sends one Opus packet.
    pub fn send_opus(&mut self, at: Instant, timestamp: u64, opus: &[u8]) {
        let mid = self.mid;
        let writer = self.rtc.writer(mid).expect("audio writer");
        let pt = writer
            .payload_params()
            .find(|p| p.spec().codec == Codec::Opus)
            .map(|p| p.pt())
            .expect("Opus negotiated");
        writer
            .write(
                pt,
                at,
                MediaTime::new(timestamp, Frequency::FORTY_EIGHT_KHZ),
                opus.to_vec(),
            )
            .expect("write audio");
    }
}

/// Whether a datagram in flight is delivered.
pub type Filter = Box<dyn FnMut(&[u8]) -> bool>;

/// The gateway, its browsers and the virtual clock.
pub struct Net {
    pub t0: Time,
    pub base: Instant,
    pub now: Time,
    pub gw: Gateway,
    pub browsers: Vec<Browser>,
    pub events: Vec<GatewayEvent>,
    /// Datagrams the gateway sent to addresses that are no browser.
    pub stray: Vec<Transmit>,
    /// Applied to the gateway's datagrams to browsers.
    pub to_browser: Filter,
    /// Datagrams from browsers the gateway did not take: (browser, first byte).
    pub untaken: Vec<(usize, u8)>,
}

impl Net {
    pub fn new(config: GatewayConfig) -> Net {
        let t0 = Time::from_secs(1_700_000_000);
        let base = Instant::now();
        let gw = Gateway::new(config, t0, base).expect("a gateway");
        Net {
            t0,
            base,
            now: t0,
            gw,
            browsers: Vec::new(),
            events: Vec::new(),
            stray: Vec::new(),
            to_browser: Box::new(|_| true),
            untaken: Vec::new(),
        }
    }

    pub fn seeded() -> Net {
        Net::new(GatewayConfig::new([7; 32]))
    }

    pub fn instant(&self, t: Time) -> Instant {
        self.base + t.saturating_since(self.t0)
    }

    /// A browser at 127.0.0.1:`port` offering sendrecv Opus for `call`; returns its
    /// index once the gateway has answered.
    pub fn add_browser(&mut self, port: u16, call: CallKey) -> (usize, Accepted) {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("an address");
        let (mut browser, offer) = Browser::offering(
            RtcConfig::new(),
            addr,
            MediaKind::Audio,
            Direction::SendRecv,
            self.instant(self.now),
        );
        let accepted = self
            .gw
            .accept_offer(self.now, call, &offer, gateway_addr())
            .expect("offer accepted");
        browser.accept_answer(&accepted.answer);
        self.browsers.push(browser);
        (self.browsers.len() - 1, accepted)
    }

    /// Moves everything in flight until nothing is (without advancing the clock).
    pub fn settle(&mut self) {
        let at = self.instant(self.now);
        for _ in 0..1000 {
            let mut moved = false;
            for i in 0..self.browsers.len() {
                if self.browsers[i].vanished {
                    continue;
                }
                for (dest, bytes) in self.browsers[i].drain() {
                    moved = true;
                    assert_eq!(dest, gateway_addr(), "browsers only talk to the gateway");
                    let from = self.browsers[i].addr;
                    self.browsers[i].sent.push(bytes.clone());
                    if !self.gw.handle_datagram(self.now, from, &bytes) {
                        self.untaken.push((i, bytes[0]));
                    }
                }
            }
            while let Some(t) = self.gw.poll_transmit() {
                moved = true;
                let Some(b) = self.browsers.iter_mut().find(|b| b.addr == t.dest) else {
                    self.stray.push(t);
                    continue;
                };
                if b.vanished || !(self.to_browser)(&t.bytes) {
                    continue;
                }
                let receive = Receive::new(Protocol::Udp, gateway_addr(), b.addr, &t.bytes)
                    .expect("the gateway sends parsable datagrams");
                // A browser may refuse a datagram (e.g. after close); that is its call.
                let _ = b.rtc.handle_input(Input::Receive(at, receive));
            }
            while let Some(e) = self.gw.poll_event() {
                self.events.push(e);
            }
            if !moved {
                return;
            }
        }
        panic!("datagrams still moving after 1000 rounds");
    }

    /// Advances the clock by `d` in [`STEP`]s, running timers and calling `tick`
    /// after each step.
    pub fn run(&mut self, d: Duration, mut tick: impl FnMut(&mut Net)) {
        let end = self.now + d;
        self.settle();
        while self.now < end {
            self.now = (self.now + STEP).min(end);
            let at = self.instant(self.now);
            if self.gw.poll_timeout().is_some_and(|t| t <= self.now) {
                self.gw.handle_timeout(self.now);
            }
            for b in &mut self.browsers {
                if !b.vanished && b.next_timeout.is_none_or(|t| t <= at) {
                    let _ = b.rtc.handle_input(Input::Timeout(at));
                }
            }
            self.settle();
            tick(self);
            self.settle();
        }
    }

    /// Runs until `done` holds, at most `limit`; returns the time it took.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Net) -> bool) -> Duration {
        let start = self.now;
        let end = self.now + limit;
        while self.now < end && !done(self) {
            self.run(STEP, |_| {});
        }
        assert!(done(self), "condition not reached within {limit:?}");
        self.now.saturating_since(start)
    }

    pub fn gateway_connected(&self, id: peercall_gateway::SessionId) -> bool {
        self.events.contains(&GatewayEvent::Connected(id))
    }
}

/// A source of real Opus packets: a 440 Hz tone through peercall's encoder.
pub struct Tone {
    encoder: Encoder,
    phase: f64,
}

impl Tone {
    pub fn new() -> Tone {
        Tone {
            encoder: Encoder::new(EncoderConfig::default()).expect("an encoder"),
            phase: 0.0,
        }
    }

    pub fn next_packet(&mut self) -> Vec<u8> {
        let mut pcm = [0i16; FRAME_SAMPLES];
        for s in &mut pcm {
            *s = (8000.0 * self.phase.sin()) as i16;
            self.phase += 2.0 * std::f64::consts::PI * 440.0 / 48_000.0;
        }
        let mut out = vec![0u8; 1500];
        let n = self.encoder.encode(&pcm, &mut out).expect("encode");
        out.truncate(n);
        out
    }
}
