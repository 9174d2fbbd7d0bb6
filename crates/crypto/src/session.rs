//! One transport session: the keys of one completed handshake.
//!
//! Transport packets carry an explicit 64-bit counter, which is the Noise nonce, so
//! packets decrypt in any order (snow's stateless transport) and the
//! [`ReplayWindow`] refuses duplicates. A session is refused for sending and
//! receiving once it is [`SessionLimits::reject_after`] old or has used
//! [`REJECT_AFTER_MESSAGES`] counters; the endpoint rekeys well before either.

use std::time::Duration;

use peercall_wire::packet::{TAG_LEN, TRANSPORT_HEADER_LEN, Transport};
use peercall_wire::{MAX_DATAGRAM, Time, WireError};
use snow::StatelessTransportState;
use thiserror::Error;

use crate::PeerKey;
use crate::replay::ReplayWindow;

/// Counters a session uses before the endpoint asks for a rekey (WireGuard's
/// `REKEY_AFTER_MESSAGES`): far beyond any real traffic, but a bound.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
/// Counters a session may ever use (WireGuard's `REJECT_AFTER_MESSAGES`): short of
/// 2^64 by more than the replay window, so the counter never wraps and never reaches
/// the value snow reserves.
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);

/// Why a packet could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SendError {
    /// No usable session with the peer: start (or wait for) a handshake.
    #[error("no usable session with this peer")]
    NoSession,
    /// The session's keys are too old or used up; a rekey is overdue.
    #[error("session keys expired")]
    Expired,
    /// The plaintext does not fit one datagram.
    #[error("plaintext of {0} bytes does not fit a datagram")]
    TooLarge(usize),
    /// The output buffer is too small.
    #[error("output buffer too small: {needed} bytes needed")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
    },
    /// Too many handshakes are in progress; wait for some to finish or time out.
    #[error("too many handshakes in progress")]
    TooManyHandshakes,
    /// The handshake could not be started (a Noise failure; should not happen).
    #[error("handshake could not be started")]
    Handshake,
}

/// Why a transport packet was refused by a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ReceiveError {
    /// The keys are older than reject-after, or the counter is past the limit.
    #[error("session keys expired")]
    Expired,
    /// The counter was seen already or is older than the replay window.
    #[error("replayed or too old counter")]
    Replay,
    /// Authentication failed.
    #[error("decryption failed")]
    Decrypt,
    /// The output buffer cannot hold the plaintext.
    #[error("output buffer too small")]
    BufferTooSmall,
}

/// The time limits of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// After this, the session is neither used nor accepted.
    pub reject_after: Duration,
}

/// The transport state of one handshake.
pub struct Session {
    transport: StatelessTransportState,
    peer: PeerKey,
    /// The index the peer put in its handshake message; goes into our packets.
    remote_index: u32,
    initiator: bool,
    /// Whether a packet from the peer has arrived on it (always true for the
    /// initiator, who received the handshake response).
    confirmed: bool,
    created: Time,
    next_send: u64,
    replay: ReplayWindow,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer)
            .field("initiator", &self.initiator)
            .field("created", &self.created)
            .field("next_send", &self.next_send)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session over `transport` with `peer`, whose session index is `remote_index`.
    pub fn new(
        transport: StatelessTransportState,
        peer: PeerKey,
        remote_index: u32,
        initiator: bool,
        created: Time,
    ) -> Session {
        Session {
            transport,
            peer,
            remote_index,
            initiator,
            confirmed: initiator,
            created,
            next_send: 0,
            replay: ReplayWindow::new(),
        }
    }

    /// The peer.
    pub fn peer(&self) -> &PeerKey {
        &self.peer
    }

    /// Whether this side initiated the handshake.
    pub fn is_initiator(&self) -> bool {
        self.initiator
    }

    /// When the handshake completed.
    pub fn created(&self) -> Time {
        self.created
    }

    /// Counters used for sending so far.
    pub fn sent(&self) -> u64 {
        self.next_send
    }

    /// Whether the session may still send at `now`.
    pub fn can_send(&self, now: Time, limits: &SessionLimits) -> bool {
        now.saturating_since(self.created) < limits.reject_after
            && self.next_send < REJECT_AFTER_MESSAGES
    }

    /// Encrypts `plaintext` into a complete transport packet in `out`.
    pub fn encrypt(
        &mut self,
        now: Time,
        limits: &SessionLimits,
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, SendError> {
        if !self.can_send(now, limits) {
            return Err(SendError::Expired);
        }
        let len = TRANSPORT_HEADER_LEN + plaintext.len() + TAG_LEN;
        if len > MAX_DATAGRAM {
            return Err(SendError::TooLarge(plaintext.len()));
        }
        if out.len() < len {
            return Err(SendError::BufferTooSmall { needed: len });
        }
        let counter = self.next_send;
        Transport::encode_header(self.remote_index, counter, out).map_err(|e| match e {
            WireError::BufferTooSmall { needed, .. } => SendError::BufferTooSmall { needed },
            _ => SendError::BufferTooSmall { needed: len },
        })?;
        let n = self
            .transport
            .write_message(counter, plaintext, &mut out[TRANSPORT_HEADER_LEN..len])
            .map_err(|_| SendError::Expired)?;
        self.next_send += 1;
        Ok(TRANSPORT_HEADER_LEN + n)
    }

    /// Authenticates and decrypts a transport packet's ciphertext with `counter` into
    /// `out`. Only an authentic packet moves the replay window. For no per-packet
    /// allocation, `out` should be at least as long as `ciphertext`.
    pub fn decrypt(
        &mut self,
        now: Time,
        limits: &SessionLimits,
        counter: u64,
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, ReceiveError> {
        if now.saturating_since(self.created) >= limits.reject_after
            || counter >= REJECT_AFTER_MESSAGES
        {
            return Err(ReceiveError::Expired);
        }
        if !self.replay.check(counter) {
            return Err(ReceiveError::Replay);
        }
        if out.len() < ciphertext.len().saturating_sub(TAG_LEN) {
            return Err(ReceiveError::BufferTooSmall);
        }
        let n = self
            .transport
            .read_message(counter, ciphertext, out)
            .map_err(|_| ReceiveError::Decrypt)?;
        self.replay.commit(counter);
        Ok(n)
    }

    /// Records that an authentic packet arrived; true the first time for a
    /// responder's session (key confirmation).
    pub fn confirm(&mut self) -> bool {
        !std::mem::replace(&mut self.confirmed, true)
    }

    #[cfg(test)]
    pub(crate) fn set_next_send(&mut self, counter: u64) {
        self.next_send = counter;
    }
}
