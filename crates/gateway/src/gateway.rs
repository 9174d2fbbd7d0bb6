use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peercall_wire::{Protocol, Time, classify};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use str0m::change::SdpOffer;
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaTime, Mid, Pt};
use str0m::net::{Protocol as NetProtocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, IceCreds, Input, Output, Rtc, RtcConfig};
use tracing::debug;

use crate::error::GatewayError;
use crate::stun::local_ufrag;
use crate::timebase::Timebase;

/// The largest SDP offer parsed. Chrome's offer for audio and video with every codec
/// is about 10 KB; an audio-only offer is under 4 KB.
pub const MAX_SDP_LEN: usize = 64 * 1024;

/// Characters in a session's ICE ufrag: 16 alphanumerics, 95 bits, so sessions
/// never collide and the ufrag cannot be guessed to hijack routing.
const UFRAG_LEN: usize = 16;
/// Characters in a session's ICE password: 24 alphanumerics, 142 bits, above the
/// 128 bits RFC 8445 §5.3 asks for. It keys STUN MESSAGE-INTEGRITY.
const PWD_LEN: usize = 24;
/// The characters both are drawn from (a subset of RFC 8839's ice-char).
const ICE_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Opus's RTP clock (RFC 7587): always 48 kHz, whatever the audio bandwidth.
const OPUS_CLOCK: Frequency = Frequency::FORTY_EIGHT_KHZ;

/// Audio packets str0m may hold back waiting for a missing earlier one: none.
/// peercall's own jitter buffer reorders, uses FEC and conceals; holding frames here
/// would only add delay in front of it.
const AUDIO_REORDER_PACKETS: usize = 0;

/// How long an ended session's ufrag and addresses stay the gateway's. A browser's
/// last datagrams (RTCP BYE, a DTLS alert, a consent check in flight) arrive within
/// a round trip or two of the end; they are taken and dropped here instead of
/// reaching the engine as unknown traffic. Ten seconds covers any round trip.
const LINGER: Duration = Duration::from_secs(10);
/// Ended sessions remembered at once, per session slot: beyond that the oldest is
/// forgotten first, so a burst of short sessions cannot grow memory.
const LINGER_PER_SLOT: usize = 2;

/// Identifies one browser session of this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The call a browser session belongs to, as the engine names it (opaque here).
/// A call has at most one browser session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallKey(pub u64);

impl fmt::Display for CallKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The gateway's settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Most browser sessions at once. Each holds a DTLS and SRTP context and
    /// buffers (tens of kilobytes); a desktop node serves its own user's tabs.
    pub max_sessions: NonZeroUsize,
    /// A session that has not finished ICE and DTLS this long after its offer ends
    /// with [`DisconnectReason::ConnectTimeout`].
    pub connect_timeout: Duration,
    /// How often the gateway looks for new receiver reports from the browser; each
    /// new one becomes a [`GatewayEvent::Feedback`].
    pub feedback_interval: Duration,
    /// Seeds the RNG that draws ICE credentials.
    pub rng_seed: [u8; 32],
}

impl GatewayConfig {
    /// The defaults: 16 sessions, a 20 s connect timeout, feedback every second.
    ///
    /// 16 sessions are more tabs than one person has calls; 20 s is far beyond the
    /// sub-second ICE and DTLS set-up between a browser and its own node, yet short
    /// enough that an abandoned offer frees its slot quickly; looking every second
    /// adds at most a second to the age of a receiver report, which browsers send
    /// every few seconds for audio.
    pub fn new(rng_seed: [u8; 32]) -> GatewayConfig {
        GatewayConfig {
            max_sessions: NonZeroUsize::new(16).expect("16 is not zero"),
            connect_timeout: Duration::from_secs(20),
            feedback_interval: Duration::from_secs(1),
            rng_seed,
        }
    }
}

/// A session created by [`Gateway::accept_offer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The new session.
    pub session: SessionId,
    /// The SDP answer to hand back to the browser.
    pub answer: String,
}

/// A datagram to send from the node's UDP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub dest: SocketAddr,
    /// Contents.
    pub bytes: Vec<u8>,
}

/// How the browser receives the audio the gateway sends it, from its RTCP receiver
/// reports: what the far end's encoder should adapt to (FEC, bitrate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReceiverReport {
    /// Fraction of packets lost, 0.0..=1.0, between this report and the previous
    /// one (for the first report, of all packets sent so far).
    pub loss_fraction: f32,
    /// Interarrival jitter as the browser measured it (RFC 3550 §6.4.1).
    pub jitter: Duration,
    /// Packets lost in total since the session started.
    pub packets_lost: u64,
    /// Round-trip time between the gateway and the browser, once known.
    pub rtt: Option<Duration>,
}

/// Why a session ended on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// ICE and DTLS did not complete: [`GatewayConfig::connect_timeout`] passed, or
    /// ICE gave up first (no check from the browser for 15 s).
    ConnectTimeout,
    /// The browser stopped answering (no ICE consent check for 15 s): the tab was
    /// closed, the machine slept, or the network went away.
    ConsentLost,
    /// The browser closed the connection (DTLS close_notify).
    ClosedByBrowser,
    /// str0m gave up on the session (for example a DTLS fingerprint mismatch).
    Failed(String),
}

impl DisconnectReason {
    /// A short label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            DisconnectReason::ConnectTimeout => "connect_timeout",
            DisconnectReason::ConsentLost => "consent_lost",
            DisconnectReason::ClosedByBrowser => "closed_by_browser",
            DisconnectReason::Failed(_) => "failed",
        }
    }
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::Failed(why) => write!(f, "failed: {why}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// Something the owner acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayEvent {
    /// ICE and DTLS are up: audio flows both ways from now on.
    Connected(SessionId),
    /// One Opus packet from the browser, as it sent it.
    AudioFrame {
        /// The session.
        id: SessionId,
        /// RTP sequence number, extended past 16 bits (wraps at 32).
        seq: u32,
        /// RTP timestamp at 48 kHz.
        timestamp: u32,
        /// The Opus packet.
        opus: Vec<u8>,
    },
    /// The browser reported how it receives the audio sent to it.
    Feedback {
        /// The session.
        id: SessionId,
        /// The figures.
        report: ReceiverReport,
    },
    /// The session ended; it is gone. Not emitted for [`Gateway::close`].
    Disconnected(SessionId, DisconnectReason),
}

/// Counters, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sessions now.
    pub sessions: u64,
    /// Offers answered.
    pub offers_accepted: u64,
    /// Offers refused (any [`GatewayError`] from [`Gateway::accept_offer`]).
    pub offers_refused: u64,
    /// Datagrams taken by [`Gateway::handle_datagram`].
    pub datagrams_in: u64,
    /// Bytes of those.
    pub bytes_in: u64,
    /// Datagrams handed out by [`Gateway::poll_transmit`].
    pub datagrams_out: u64,
    /// Bytes of those.
    pub bytes_out: u64,
    /// Datagrams taken but unusable: unparsable, refused by str0m, or arriving
    /// for a session that ended moments ago.
    pub datagrams_dropped: u64,
    /// Opus packets received from browsers.
    pub frames_in: u64,
    /// Opus packets sent to browsers.
    pub frames_out: u64,
    /// Sessions that ended on their own ([`GatewayEvent::Disconnected`]).
    pub disconnects: u64,
}

/// One browser.
struct Session {
    call: CallKey,
    rtc: Rtc,
    ufrag: String,
    /// The address the browser was told (the host candidate): the destination of
    /// everything it sends.
    local: SocketAddr,
    /// The negotiated audio section and Opus payload type.
    audio: Option<(Mid, Pt)>,
    connected: bool,
    connect_deadline: Time,
    /// str0m's next timeout.
    next_timeout: Time,
    /// (highest sequence number, packets lost) of the browser's last receiver report.
    last_report: Option<(u64, u64)>,
    /// Set while draining when the session must end.
    ended: Option<DisconnectReason>,
}

/// What is left of an ended session for [`LINGER`].
struct Lingering {
    until: Time,
    ufrag: String,
    addrs: Vec<SocketAddr>,
}

/// What draining sessions produces.
#[derive(Default)]
struct Outputs {
    transmits: VecDeque<Transmit>,
    events: VecDeque<GatewayEvent>,
    stats: Stats,
}

/// The WebRTC gateway: one str0m `Rtc` per browser session. See the crate
/// documentation for how datagrams are routed and the driving contract.
pub struct Gateway {
    config: GatewayConfig,
    timebase: Timebase,
    rng: ChaCha20Rng,
    crypto: Arc<CryptoProvider>,
    cert: DtlsCert,
    next_id: u64,
    sessions: BTreeMap<SessionId, Session>,
    by_ufrag: HashMap<String, SessionId>,
    by_call: HashMap<CallKey, SessionId>,
    /// Addresses a session's ICE has validated, learned as their DTLS/RTP arrives.
    by_addr: HashMap<SocketAddr, SessionId>,
    /// Recently ended sessions, oldest first.
    lingering: VecDeque<Lingering>,
    /// The latest `now` seen, for inputs that carry none ([`Gateway::close`]).
    last_now: Time,
    out: Outputs,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway at `now`; `base` is the `Instant` of that same moment (see the
    /// crate documentation). Generates the DTLS certificate all sessions share
    /// (browsers pin its fingerprint per session through the SDP).
    pub fn new(config: GatewayConfig, now: Time, base: Instant) -> Result<Gateway, GatewayError> {
        let crypto = Arc::new(str0m::crypto::from_feature_flags());
        let cert = crypto
            .dtls_provider
            .generate_certificate()
            .ok_or(GatewayError::Certificate)?;
        Ok(Gateway {
            rng: ChaCha20Rng::from_seed(config.rng_seed),
            config,
            timebase: Timebase::new(now, base),
            crypto,
            cert,
            next_id: 1,
            sessions: BTreeMap::new(),
            by_ufrag: HashMap::new(),
            by_call: HashMap::new(),
            by_addr: HashMap::new(),
            lingering: VecDeque::new(),
            last_now: now,
            out: Outputs::default(),
        })
    }

    /// Answers a browser's SDP offer for `call` with a new session, offering
    /// `local` (the node's UDP address as the browser can reach it) as the only ICE
    /// candidate. Refusals leave no state behind.
    pub fn accept_offer(
        &mut self,
        now: Time,
        call: CallKey,
        sdp_offer: &str,
        local: SocketAddr,
    ) -> Result<Accepted, GatewayError> {
        self.last_now = self.last_now.max(now);
        let result = self.try_accept(now, call, sdp_offer, local);
        match &result {
            Ok(_) => self.out.stats.offers_accepted += 1,
            Err(_) => self.out.stats.offers_refused += 1,
        }
        result
    }

    fn try_accept(
        &mut self,
        now: Time,
        call: CallKey,
        sdp_offer: &str,
        local: SocketAddr,
    ) -> Result<Accepted, GatewayError> {
        if sdp_offer.len() > MAX_SDP_LEN {
            return Err(GatewayError::SdpTooLarge {
                len: sdp_offer.len(),
                limit: MAX_SDP_LEN,
            });
        }
        if local.ip().is_unspecified() || local.ip().is_multicast() || local.port() == 0 {
            return Err(GatewayError::BadCandidate(local));
        }
        if let Some(&session) = self.by_call.get(&call) {
            return Err(GatewayError::CallTaken { call, session });
        }
        if self.sessions.len() >= self.config.max_sessions.get() {
            return Err(GatewayError::TooManySessions(
                self.config.max_sessions.get(),
            ));
        }
        let offer = SdpOffer::from_sdp_string(sdp_offer)
            .map_err(|e| GatewayError::MalformedSdp(e.to_string()))?;
        let candidate =
            Candidate::host(local, "udp").map_err(|_| GatewayError::BadCandidate(local))?;

        let creds = self.fresh_credentials();
        let mut rtc = RtcConfig::new()
            .set_ice_lite(true)
            .set_local_ice_credentials(creds.clone())
            .set_crypto_provider(self.crypto.clone())
            .set_dtls_cert(self.cert.clone())
            .clear_codecs()
            .enable_opus(true, false)
            .set_reordering_size_audio(AUDIO_REORDER_PACKETS)
            .set_stats_interval(Some(self.config.feedback_interval))
            .build(self.timebase.instant(now));
        if rtc.add_local_candidate(candidate).is_none() {
            return Err(GatewayError::BadCandidate(local));
        }
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| GatewayError::OfferRejected(e.to_string()))?;

        // str0m reports the offer's media sections once time has been fed in.
        rtc.handle_input(Input::Timeout(self.timebase.instant(now)))
            .map_err(|e| GatewayError::OfferRejected(e.to_string()))?;

        let id = SessionId(self.next_id);
        let mut session = Session {
            call,
            rtc,
            ufrag: creds.ufrag,
            local,
            audio: None,
            connected: false,
            connect_deadline: now + self.config.connect_timeout,
            next_timeout: now,
            last_report: None,
            ended: None,
        };
        // Nothing is sent before the browser's first check (ICE-lite never
        // initiates), so a refusal below leaves nothing queued.
        let mut scratch = Outputs::default();
        session.drain(id, &self.timebase, &mut scratch);
        // str0m reports media sections as events only once DTLS is up; the offer's
        // text says which are audio.
        let mid = audio_mids(sdp_offer)
            .into_iter()
            .map(Mid::from)
            .find(|mid| session.rtc.media(*mid).is_some())
            .ok_or(GatewayError::NoAudio)?;
        let media = session.rtc.media(mid).ok_or(GatewayError::NoAudio)?;
        if media.remote_pts().is_empty() {
            // None of the offered codecs matched ours (Opus).
            return Err(GatewayError::NoOpus);
        }
        let direction = media.direction();
        if direction != Direction::SendRecv {
            // Our direction mirrors the browser's: recvonly here is sendonly there.
            return Err(GatewayError::NotSendRecv(
                mirror(direction).to_string().to_lowercase(),
            ));
        }
        let pt = session
            .rtc
            .writer(mid)
            .and_then(|w| {
                w.payload_params()
                    .find(|p| p.spec().codec == Codec::Opus)
                    .map(|p| p.pt())
            })
            .ok_or(GatewayError::NoOpus)?;
        session.audio = Some((mid, pt));
        self.out.transmits.extend(scratch.transmits);

        self.next_id += 1;
        self.by_ufrag.insert(session.ufrag.clone(), id);
        self.by_call.insert(call, id);
        self.sessions.insert(id, session);
        debug!(session = %id, %call, "browser session created");
        Ok(Accepted {
            session: id,
            answer: answer.to_sdp_string(),
        })
    }

    /// ICE credentials whose ufrag no live session uses.
    fn fresh_credentials(&mut self) -> IceCreds {
        loop {
            let ufrag = random_ice_string(&mut self.rng, UFRAG_LEN);
            if !self.by_ufrag.contains_key(&ufrag) {
                let pass = random_ice_string(&mut self.rng, PWD_LEN);
                return IceCreds { ufrag, pass };
            }
        }
    }

    /// Handles one datagram received on the node's port; returns whether it was the
    /// gateway's (see the crate documentation). A datagram it returns `false` for
    /// is untouched and belongs to the engine.
    pub fn handle_datagram(&mut self, now: Time, from: SocketAddr, datagram: &[u8]) -> bool {
        self.last_now = self.last_now.max(now);
        let Some(id) = self.owner(now, from, datagram) else {
            if self.lingers(now, from, datagram) {
                self.out.stats.datagrams_in += 1;
                self.out.stats.bytes_in += datagram.len() as u64;
                self.out.stats.datagrams_dropped += 1;
                return true;
            }
            return false;
        };
        let Some(session) = self.sessions.get_mut(&id) else {
            return false;
        };
        self.out.stats.datagrams_in += 1;
        self.out.stats.bytes_in += datagram.len() as u64;
        let Ok(receive) = Receive::new(NetProtocol::Udp, from, session.local, datagram) else {
            self.out.stats.datagrams_dropped += 1;
            return true;
        };
        let input = Input::Receive(self.timebase.instant(now), receive);
        if let Err(e) = session.rtc.handle_input(input) {
            debug!(session = %id, error = %e, "browser datagram refused");
            self.out.stats.datagrams_dropped += 1;
        }
        self.drain(id);
        true
    }

    /// The session a datagram belongs to, if any.
    fn owner(&mut self, now: Time, from: SocketAddr, datagram: &[u8]) -> Option<SessionId> {
        match classify(datagram) {
            Protocol::Stun => self.by_ufrag.get(local_ufrag(datagram)?).copied(),
            Protocol::Dtls | Protocol::Rtp => {
                if let Some(&id) = self.by_addr.get(&from) {
                    return Some(id);
                }
                // A new address: ask each session whether its ICE has validated it.
                // Bounded by max_sessions; nothing is kept unless one says yes.
                let first = self.sessions.values().next()?;
                let receive = Receive::new(NetProtocol::Udp, from, first.local, datagram).ok()?;
                let input = Input::Receive(self.timebase.instant(now), receive);
                let id = self
                    .sessions
                    .iter()
                    .find(|(_, s)| s.rtc.accepts(&input))
                    .map(|(id, _)| *id)?;
                self.by_addr.insert(from, id);
                Some(id)
            }
            _ => None,
        }
    }

    /// Whether a datagram is for a session that ended moments ago.
    fn lingers(&mut self, now: Time, from: SocketAddr, datagram: &[u8]) -> bool {
        while self.lingering.front().is_some_and(|l| l.until <= now) {
            self.lingering.pop_front();
        }
        match classify(datagram) {
            Protocol::Stun => local_ufrag(datagram)
                .is_some_and(|ufrag| self.lingering.iter().any(|l| l.ufrag == ufrag)),
            Protocol::Dtls | Protocol::Rtp => {
                self.lingering.iter().any(|l| l.addrs.contains(&from))
            }
            _ => false,
        }
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        self.last_now = self.last_now.max(now);
        let due: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.next_timeout <= now || (!s.connected && s.connect_deadline <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(session) = self.sessions.get_mut(&id) else {
                continue;
            };
            if !session.connected && session.connect_deadline <= now {
                session.ended = Some(DisconnectReason::ConnectTimeout);
            } else if let Err(e) = session
                .rtc
                .handle_input(Input::Timeout(self.timebase.instant(now)))
            {
                session.ended = Some(DisconnectReason::Failed(e.to_string()));
            }
            self.drain(id);
        }
    }

    /// Sends one Opus packet to the browser of session `id`, as is. `timestamp` is
    /// its RTP timestamp at 48 kHz (consecutive 20 ms frames differ by 960).
    pub fn send_audio(
        &mut self,
        id: SessionId,
        now: Time,
        timestamp: u32,
        opus: &[u8],
    ) -> Result<(), GatewayError> {
        self.last_now = self.last_now.max(now);
        let session = self
            .sessions
            .get_mut(&id)
            .ok_or(GatewayError::UnknownSession(id))?;
        let (mid, pt) = match session.audio {
            Some(audio) if session.connected => audio,
            _ => return Err(GatewayError::NotConnected(id)),
        };
        let writer = session
            .rtc
            .writer(mid)
            .ok_or(GatewayError::NotConnected(id))?;
        let media_time = MediaTime::new(u64::from(timestamp), OPUS_CLOCK);
        let result = writer
            .write(pt, self.timebase.instant(now), media_time, opus)
            .map_err(|e| GatewayError::Send {
                session: id,
                reason: e.to_string(),
            });
        if result.is_ok() {
            self.out.stats.frames_out += 1;
        }
        // A write is a mutation: drain whatever it produced, error or not.
        self.drain(id);
        result
    }

    /// Ends session `id` now: the browser is told (RTCP BYE, DTLS close_notify) and
    /// the session is gone. No [`GatewayEvent::Disconnected`] follows. Returns
    /// whether there was such a session.
    pub fn close(&mut self, id: SessionId) -> bool {
        let Some(session) = self.sessions.get_mut(&id) else {
            return false;
        };
        if let Err(e) = session.rtc.close() {
            debug!(session = %id, error = %e, "closing browser session");
        }
        session.drain(id, &self.timebase, &mut self.out);
        self.remove(id);
        true
    }

    /// Drains session `id`'s outputs, ending it if it must end.
    fn drain(&mut self, id: SessionId) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        session.drain(id, &self.timebase, &mut self.out);
        if let Some(reason) = session.ended.take() {
            debug!(session = %id, %reason, "browser session ended");
            self.remove(id);
            self.out.stats.disconnects += 1;
            self.out
                .events
                .push_back(GatewayEvent::Disconnected(id, reason));
        }
    }

    fn remove(&mut self, id: SessionId) {
        let Some(session) = self.sessions.remove(&id) else {
            return;
        };
        self.by_ufrag.remove(&session.ufrag);
        self.by_call.remove(&session.call);
        let mut addrs = Vec::new();
        self.by_addr.retain(|addr, owner| {
            if *owner == id {
                addrs.push(*addr);
            }
            *owner != id
        });
        if self.lingering.len() >= self.config.max_sessions.get() * LINGER_PER_SLOT {
            self.lingering.pop_front();
        }
        self.lingering.push_back(Lingering {
            until: self.last_now + LINGER,
            ufrag: session.ufrag,
            addrs,
        });
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.out.transmits.pop_front()?;
        self.out.stats.datagrams_out += 1;
        self.out.stats.bytes_out += t.bytes.len() as u64;
        Some(t)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<GatewayEvent> {
        self.out.events.pop_front()
    }

    /// When [`Gateway::handle_timeout`] must next be called; `None` without sessions.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.sessions
            .values()
            .map(|s| {
                if s.connected {
                    s.next_timeout
                } else {
                    s.next_timeout.min(s.connect_deadline)
                }
            })
            .min()
    }

    /// The session of `call`, if it has one.
    pub fn session_of(&self, call: CallKey) -> Option<SessionId> {
        self.by_call.get(&call).copied()
    }

    /// Whether session `id` exists and has connected.
    pub fn is_connected(&self, id: SessionId) -> bool {
        self.sessions.get(&id).is_some_and(|s| s.connected)
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats {
            sessions: self.sessions.len() as u64,
            ..self.out.stats.clone()
        }
    }
}

impl Session {
    /// Polls str0m until it has nothing more than a timeout.
    fn drain(&mut self, id: SessionId, timebase: &Timebase, out: &mut Outputs) {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(at)) => {
                    self.next_timeout = timebase.time(at);
                    break;
                }
                Ok(Output::Transmit(t)) => out.transmits.push_back(Transmit {
                    dest: t.destination,
                    bytes: t.contents.into(),
                }),
                Ok(Output::Event(event)) => self.on_event(id, event, out),
                Err(e) => {
                    self.ended
                        .get_or_insert(DisconnectReason::Failed(e.to_string()));
                    break;
                }
            }
        }
        if !self.rtc.is_alive() && self.ended.is_none() {
            self.ended = Some(DisconnectReason::Failed("connection closed".into()));
        }
    }

    fn on_event(&mut self, id: SessionId, event: Event, out: &mut Outputs) {
        match event {
            Event::Connected => {
                self.connected = true;
                out.events.push_back(GatewayEvent::Connected(id));
            }
            Event::Closed => {
                self.ended.get_or_insert(DisconnectReason::ClosedByBrowser);
            }
            Event::MediaData(data) => {
                if self.audio.is_none_or(|(mid, _)| mid != data.mid) {
                    return;
                }
                out.stats.frames_in += 1;
                out.events.push_back(GatewayEvent::AudioFrame {
                    id,
                    // The extended sequence number modulo 2^32, as peercall's media
                    // frames count; the timestamp is the RTP header's own 32 bits.
                    seq: **data.seq_range.start() as u32,
                    timestamp: data.time.numer() as u32,
                    opus: data.data.to_vec(),
                });
            }
            Event::MediaEgressStats(stats) => {
                if self.audio.is_none_or(|(mid, _)| mid != stats.mid) {
                    return;
                }
                let Some(rr) = stats.remote else {
                    return;
                };
                let report = (*rr.maximum_sequence_number, rr.packets_lost);
                let loss_fraction = match self.last_report.replace(report) {
                    // The same receiver report as last time: nothing new.
                    Some((seq, _)) if seq == report.0 => return,
                    // RFC 3550 §6.4.1's interval loss, from the cumulative counts.
                    Some((seq, lost)) => {
                        let expected = report.0.saturating_sub(seq);
                        let lost = report.1.saturating_sub(lost);
                        lost as f32 / expected.max(1) as f32
                    }
                    // The first report: loss over everything sent so far.
                    None => report.1 as f32 / stats.packets.max(1) as f32,
                };
                let jitter = MediaTime::new(u64::from(rr.jitter), OPUS_CLOCK);
                out.events.push_back(GatewayEvent::Feedback {
                    id,
                    report: ReceiverReport {
                        loss_fraction: loss_fraction.clamp(0.0, 1.0),
                        jitter: Duration::from(jitter),
                        packets_lost: rr.packets_lost,
                        rtt: stats.rtt,
                    },
                });
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                // Before connecting, ICE giving up (no check for 15 s) is a failed
                // set-up; after, the browser went away.
                let reason = if self.connected {
                    DisconnectReason::ConsentLost
                } else {
                    DisconnectReason::ConnectTimeout
                };
                self.ended.get_or_insert(reason);
            }
            _ => {}
        }
    }
}

/// The `a=mid` values of an SDP's audio sections, in order.
fn audio_mids(sdp: &str) -> Vec<&str> {
    let mut audio = false;
    let mut mids = Vec::new();
    for line in sdp.lines().map(|l| l.trim_end_matches('\r')) {
        if line.starts_with("m=") {
            audio = line.starts_with("m=audio ");
        } else if let Some(mid) = line.strip_prefix("a=mid:").filter(|_| audio) {
            mids.push(mid.trim());
        }
    }
    mids
}

/// The browser's direction for ours.
fn mirror(d: Direction) -> Direction {
    match d {
        Direction::SendOnly => Direction::RecvOnly,
        Direction::RecvOnly => Direction::SendOnly,
        other => other,
    }
}

/// `len` characters drawn uniformly from [`ICE_CHARS`].
fn random_ice_string(rng: &mut ChaCha20Rng, len: usize) -> String {
    // Rejection sampling keeps the draw uniform: 248 = 4 × 62.
    const ACCEPT_BELOW: u8 = (256 / ICE_CHARS.len() * ICE_CHARS.len()) as u8;
    let mut s = String::with_capacity(len);
    while s.len() < len {
        let mut byte = [0u8; 1];
        rng.fill_bytes(&mut byte);
        if byte[0] < ACCEPT_BELOW {
            s.push(char::from(
                ICE_CHARS[usize::from(byte[0]) % ICE_CHARS.len()],
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_audio_mids() {
        let sdp = "v=0\r\na=group:BUNDLE 0 1 2\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\nm=application 9 x\r\na=mid:2\r\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 111\na=mid:a2\n";
        assert_eq!(audio_mids(sdp), vec!["1", "a2"]);
        assert!(audio_mids("m=audiox 9\r\na=mid:0\r\n").is_empty());
    }

    #[test]
    fn ice_strings_are_long_and_plain() {
        let mut rng = ChaCha20Rng::from_seed([3; 32]);
        let a = random_ice_string(&mut rng, UFRAG_LEN);
        let b = random_ice_string(&mut rng, UFRAG_LEN);
        assert_eq!(a.len(), UFRAG_LEN);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
    }
}
