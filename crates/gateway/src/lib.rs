//! The browser bridge: WebRTC sessions (str0m) on the node's own UDP port.
//!
//! A browser joins a call through its local node: the page sends an SDP offer to the
//! node's admin API, the [`Gateway`] answers it (ICE-lite, one host candidate on the
//! node's UDP address, Opus only, `sendrecv` audio) and from then on exchanges STUN,
//! DTLS and SRTP with the browser on the port peercall already uses. Opus frames
//! pass through untouched in both directions: the browser's packets come out as
//! [`GatewayEvent::AudioFrame`], and [`Gateway::send_audio`] sends the far end's
//! packets to the browser, so nothing is transcoded.
//!
//! # Sharing the port
//!
//! The first byte of a datagram says what it is (`peercall_wire::classify`, RFC 7983).
//! [`Gateway::handle_datagram`] takes a datagram and says whether it was the
//! gateway's:
//!
//! - **STUN** (0..=3) is the gateway's only when its USERNAME attribute starts with
//!   the ICE ufrag of one of its sessions (`<session ufrag>:<browser ufrag>`); it goes
//!   to that session. STUN without such a USERNAME (peercall's own reflexive address
//!   discovery, stray probes) is left to the engine.
//! - **DTLS** (20..=63) and **RTP/RTCP** (128..=191) are the gateway's when they come
//!   from an address that a session's ICE has validated (a browser that passed a
//!   STUN check with the session's password). Anything else is left to the engine,
//!   which counts it as a drop.
//! - Everything else, peercall's own packets included, is never the gateway's.
//!
//! For ten seconds after a session ends, its ufrag and addresses stay the
//! gateway's, so the browser's last datagrams (RTCP BYE, DTLS alerts) are dropped
//! and counted here rather than reaching the engine as unknown traffic.
//!
//! Unauthenticated datagrams cost a first-byte check and a lookup; nothing is
//! allocated for them by the gateway (str0m parses what it is handed).
//!
//! # Driving contract
//!
//! The same as the engine's, and str0m's underneath: the gateway never reads a
//! clock or touches a socket.
//!
//! 1. Feed inputs with the current time: [`Gateway::handle_datagram`],
//!    [`Gateway::handle_timeout`] when [`Gateway::poll_timeout`] has come, and
//!    commands ([`Gateway::accept_offer`], [`Gateway::send_audio`], [`Gateway::close`]).
//! 2. After every input, drain [`Gateway::poll_transmit`] and [`Gateway::poll_event`].
//! 3. Sleep until [`Gateway::poll_timeout`] or the next datagram.
//!
//! str0m counts time in `std::time::Instant`; the owner passes one `Instant` taken
//! at the same moment as a `now` to [`Gateway::new`], and the gateway maps every
//! later [`Time`](peercall_wire::Time) onto it. `now` must never go backwards.
//!
//! # Limits
//!
//! Sessions are bounded ([`GatewayConfig::max_sessions`]) and each call has at most
//! one browser session. A session that has not connected within
//! [`GatewayConfig::connect_timeout`], or whose browser stops answering ICE consent
//! checks (str0m ends an ICE-lite pair 15 s after the browser's last check), ends
//! with [`GatewayEvent::Disconnected`]. str0m draws its own randomness for DTLS and
//! SRTP (keys must come from the OS); the ICE credentials come from the seeded RNG
//! in the config.

mod error;
mod gateway;
mod stun;
mod timebase;

pub use error::GatewayError;
pub use gateway::{
    Accepted, CallKey, DisconnectReason, Gateway, GatewayConfig, GatewayEvent, MAX_SDP_LEN,
    ReceiverReport, SessionId, Stats, Transmit,
};
pub use stun::local_ufrag;
