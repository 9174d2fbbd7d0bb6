use crate::gateway::{CallKey, SessionId};

/// Why the gateway refused a request. Refusals change no state: a refused offer
/// creates no session, a refused send leaves the session as it was.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum GatewayError {
    /// The offer is larger than any browser sends; it was not parsed.
    #[error("SDP offer of {len} bytes is larger than the limit of {limit}")]
    SdpTooLarge {
        /// Its length.
        len: usize,
        /// [`crate::gateway::MAX_SDP_LEN`].
        limit: usize,
    },
    /// The offer is not valid SDP.
    #[error("malformed SDP offer: {0}")]
    MalformedSdp(String),
    /// The offer is SDP but cannot be answered (no fingerprint, bad bundle, ...).
    #[error("SDP offer not acceptable: {0}")]
    OfferRejected(String),
    /// The offer has no audio section.
    #[error("SDP offer has no audio section (m=audio)")]
    NoAudio,
    /// The offer's audio does not include Opus, the only codec peercall carries.
    #[error("SDP offer's audio does not include Opus, the only codec peercall carries")]
    NoOpus,
    /// The offer's audio is not two-way.
    #[error("SDP offer's audio is {0}; a call needs sendrecv (the browser speaks and listens)")]
    NotSendRecv(String),
    /// The call already has a browser session.
    #[error("call {call} already has a browser session ({session}); close it first")]
    CallTaken {
        /// The call.
        call: CallKey,
        /// Its session.
        session: SessionId,
    },
    /// All session slots are taken.
    #[error("too many browser sessions (limit {0})")]
    TooManySessions(usize),
    /// The address to offer as the ICE candidate cannot be reached by a browser.
    #[error("{0} cannot be offered as an ICE host candidate (unspecified or multicast)")]
    BadCandidate(std::net::SocketAddr),
    /// No such session (never created, closed, or disconnected).
    #[error("no browser session {0}")]
    UnknownSession(SessionId),
    /// The session has not finished ICE and DTLS yet; there is nowhere to send.
    #[error("browser session {0} is not connected yet")]
    NotConnected(SessionId),
    /// str0m refused to send the frame.
    #[error("browser session {session} could not send audio: {reason}")]
    Send {
        /// The session.
        session: SessionId,
        /// str0m's reason.
        reason: String,
    },
    /// The DTLS certificate could not be generated (at [`crate::Gateway::new`]).
    #[error("could not generate the gateway's DTLS certificate")]
    Certificate,
}
