//! The engine's two message sets: end-to-end call control ([`CallMsg`], the body of a
//! `Frame::Call` on the session between two callers) and the relay service
//! ([`RelayMsg`], the body of a `Frame::RelayControl` on a hop session with a
//! supernode, or between two supernodes).
//!
//! Each body is one version byte ([`CALL_PROTOCOL_VERSION`],
//! [`RELAY_PROTOCOL_VERSION`]) followed by the postcard encoding of the message, as
//! the overlay's messages are. A body of another version, that does not decode, or
//! whose lists or byte strings exceed their bounds is a [`MsgError`]: the receiver
//! drops it and counts it.

use std::net::SocketAddr;

use peercall_crypto::record::MAX_RECORD_LEN;
use peercall_wire::MAX_DATAGRAM;
use peercall_wire::packet::MAX_TRANSPORT_PLAINTEXT;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The version byte of [`CallMsg`] bodies.
pub const CALL_PROTOCOL_VERSION: u8 = 1;
/// The version byte of [`RelayMsg`] bodies.
pub const RELAY_PROTOCOL_VERSION: u8 = 1;
/// The longest body of either set: what one transport frame carries.
pub const MAX_BODY_LEN: usize = MAX_TRANSPORT_PLAINTEXT - 1;
/// Paths one offer may list: the router's limit.
pub const MAX_OFFERED_PATHS: usize = peercall_router::MAX_PATHS;
/// Home supernodes a callee may report: records list at most a few, and a node
/// attaches to two.
pub const MAX_HOMES: usize = 4;
/// The longest packet a signalling message carries: a handshake initiation or a
/// transport packet whose frame, wrapped once more in a relay control frame, still
/// fits one datagram.
pub const MAX_SIGNAL_PACKET: usize = MAX_DATAGRAM - 200;

/// A 32-byte key on the wire (a `PeerKey`).
pub type Id = [u8; 32];

/// A supernode named in a message: its key and address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Sn {
    /// Its Noise static key.
    pub key: Id,
    /// Its address.
    pub addr: SocketAddr,
}

/// One relayed path of a call, as the caller numbers it. The direct path is always
/// [`crate::DIRECT_PATH`] and is never offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathOffer {
    /// Both callers use channels at one supernode.
    Relay1 {
        /// The path id.
        id: u16,
        /// The relay.
        relay: Sn,
    },
    /// The caller uses a channel at `caller_side`, the callee one at `callee_side`,
    /// and the two relays link their channels.
    Relay2 {
        /// The path id.
        id: u16,
        /// The caller's relay.
        caller_side: Sn,
        /// The callee's relay.
        callee_side: Sn,
    },
}

impl PathOffer {
    /// The path id.
    pub fn id(&self) -> u16 {
        match self {
            PathOffer::Relay1 { id, .. } | PathOffer::Relay2 { id, .. } => *id,
        }
    }
}

/// Why a callee refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectCode {
    /// The user declined.
    Declined,
    /// The callee is in as many calls as it takes.
    Busy,
}

/// Why a call was hung up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HangupCode {
    /// The user hung up (or cancelled before an answer).
    Normal,
    /// The caller gave up waiting for an answer.
    NoAnswer,
    /// The sender lost every path and gave up.
    Lost,
    /// The sender's node is shutting down.
    Shutdown,
}

/// End-to-end call control between the two callers. `call` is the caller's random
/// call number, the same on both ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallMsg {
    /// The caller asks for a call; `record` is its signed directory record, whose
    /// static key must be the session's (the callee verifies both).
    Invite {
        /// Call number.
        call: u64,
        /// The caller's signed record.
        record: Vec<u8>,
    },
    /// The callee is alerting its user; `homes` are its home supernodes now (the
    /// caller re-offers paths when they differ from the record's).
    Ringing {
        /// Call number.
        call: u64,
        /// The callee's homes.
        homes: Vec<Sn>,
    },
    /// The callee answered.
    Accept {
        /// Call number.
        call: u64,
    },
    /// The caller heard the answer (stops the callee re-sending [`CallMsg::Accept`]).
    Connected {
        /// Call number.
        call: u64,
    },
    /// The callee refused.
    Reject {
        /// Call number.
        call: u64,
        /// Why.
        reason: RejectCode,
    },
    /// Either side ends the call.
    Hangup {
        /// Call number.
        call: u64,
        /// Why.
        reason: HangupCode,
    },
    /// The answer to [`CallMsg::Hangup`].
    HangupAck {
        /// Call number.
        call: u64,
    },
    /// The caller's numbering of the relayed paths (version `version`; the newest
    /// replaces the older ones).
    Paths {
        /// Call number.
        call: u64,
        /// Offer version.
        version: u32,
        /// The paths.
        paths: Vec<PathOffer>,
    },
    /// The callee adopted offer `version`.
    PathsAck {
        /// Call number.
        call: u64,
        /// Offer version.
        version: u32,
    },
}

impl CallMsg {
    /// The call number.
    pub fn call(&self) -> u64 {
        match self {
            CallMsg::Invite { call, .. }
            | CallMsg::Ringing { call, .. }
            | CallMsg::Accept { call }
            | CallMsg::Connected { call }
            | CallMsg::Reject { call, .. }
            | CallMsg::Hangup { call, .. }
            | CallMsg::HangupAck { call }
            | CallMsg::Paths { call, .. }
            | CallMsg::PathsAck { call, .. } => *call,
        }
    }

    /// A short stable name, for logs.
    pub fn label(&self) -> &'static str {
        match self {
            CallMsg::Invite { .. } => "invite",
            CallMsg::Ringing { .. } => "ringing",
            CallMsg::Accept { .. } => "accept",
            CallMsg::Connected { .. } => "connected",
            CallMsg::Reject { .. } => "reject",
            CallMsg::Hangup { .. } => "hangup",
            CallMsg::HangupAck { .. } => "hangup_ack",
            CallMsg::Paths { .. } => "paths",
            CallMsg::PathsAck { .. } => "paths_ack",
        }
    }

    fn check_bounds(&self) -> Result<(), MsgError> {
        match self {
            CallMsg::Invite { record, .. } => bound(record.len() <= MAX_RECORD_LEN, "record"),
            CallMsg::Ringing { homes, .. } => bound(homes.len() <= MAX_HOMES, "homes"),
            CallMsg::Paths { paths, .. } => bound(paths.len() <= MAX_OFFERED_PATHS, "paths"),
            _ => Ok(()),
        }
    }

    /// The body of a `Frame::Call` carrying this message.
    pub fn encode(&self) -> Result<Vec<u8>, MsgError> {
        self.check_bounds()?;
        encode(self, CALL_PROTOCOL_VERSION)
    }

    /// Parses a `Frame::Call` body.
    pub fn decode(body: &[u8]) -> Result<CallMsg, MsgError> {
        let msg: CallMsg = decode(body, CALL_PROTOCOL_VERSION)?;
        msg.check_bounds()?;
        Ok(msg)
    }
}

/// Why a relay refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Refusal {
    /// This node does not relay (not a supernode, or relaying is off).
    NotRelay,
    /// The requester holds as many channels as it may, or the relay is full.
    Quota,
    /// The other relay of a two-relay path is not a live supernode this relay knows.
    UnknownRelay,
    /// The target's address is loopback, private, link-local or multicast and the
    /// relay is not configured to forward there.
    PrivateTarget,
    /// The signalling target is not reachable through this supernode.
    UnknownTarget,
    /// Too many requests from the sender; try again later.
    RateLimited,
}

impl Refusal {
    /// A stable label for metrics and messages.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NotRelay => "not_relay",
            Refusal::Quota => "quota",
            Refusal::UnknownRelay => "unknown_relay",
            Refusal::PrivateTarget => "private_target",
            Refusal::UnknownTarget => "unknown_target",
            Refusal::RateLimited => "rate_limited",
        }
    }
}

/// The relay service: channel requests between a node and a supernode, signalling
/// through a callee's home supernode, and links between two relays.
///
/// A *leg* is one client's permission at one relay: (client, peer, via). A relay
/// forwards a client's packets only when the peer asked for the mirror leg at the
/// same relay (one-relay paths), or, for two-relay paths, when the relay named in
/// `via` confirmed with a [`RelayMsg::Link`] that the peer asked for its mirror leg
/// there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayMsg {
    // ---- node → relay ----
    /// Ask for (or refresh) a channel for packets to `peer`, through the relay
    /// `via` when set (a two-relay path).
    Allocate {
        /// The other caller.
        peer: Id,
        /// The other relay of a two-relay path.
        via: Option<Id>,
    },
    /// The channel for `peer` (through `via`) is no longer needed.
    Release {
        /// The other caller.
        peer: Id,
        /// The other relay.
        via: Option<Id>,
    },
    /// Forward `packet` (a peercall packet of the sender's end-to-end session with
    /// `to`) to `to`, a client of this supernode or a peer that signalled the sender
    /// through it.
    Signal {
        /// The target's static key.
        to: Id,
        /// The packet.
        packet: Vec<u8>,
    },

    // ---- relay → node ----
    /// A channel for `peer` (through `via`): use it in `Frame::Relay`. `ready` when
    /// the peer's mirror permission is there too (else [`RelayMsg::Ready`] follows).
    Allocated {
        /// The other caller.
        peer: Id,
        /// The other relay.
        via: Option<Id>,
        /// The channel.
        channel: u32,
        /// Seconds until the channel expires unless refreshed.
        lifetime_s: u32,
        /// Whether packets are forwarded now.
        ready: bool,
    },
    /// Forwarding on `channel` has started: the peer consented.
    Ready {
        /// The channel.
        channel: u32,
    },
    /// The request for `peer` (through `via`) was refused.
    Refused {
        /// The other caller.
        peer: Id,
        /// The other relay.
        via: Option<Id>,
        /// Why.
        reason: Refusal,
    },
    /// `channel` is gone (expired, released, or its peer left).
    Closed {
        /// The channel.
        channel: u32,
    },
    /// A signalled packet from `from`, whose packets reach the relay from `observed`.
    Signalled {
        /// The sender's static key.
        from: Id,
        /// The sender's address as this supernode sees it.
        observed: SocketAddr,
        /// The packet.
        packet: Vec<u8>,
    },
    /// A [`RelayMsg::Signal`] to `to` could not be delivered.
    SignalRefused {
        /// The target.
        to: Id,
        /// Why.
        reason: Refusal,
    },

    // ---- relay ↔ relay ----
    /// "My client `client` consents to packets with your client `peer`; send them to
    /// me on `channel`." A link that is not itself a `reply` is answered with the
    /// mirror link once the receiver's client asked for the mirror leg.
    Link {
        /// The sender's client.
        client: Id,
        /// The receiver's client.
        peer: Id,
        /// The sender's channel for the leg.
        channel: u32,
        /// This link answers one from the receiver.
        reply: bool,
    },
    /// The sender's leg for (`client`, `peer`) is gone.
    Unlink {
        /// The sender's client.
        client: Id,
        /// The receiver's client.
        peer: Id,
    },
}

impl RelayMsg {
    /// A short stable name, for logs.
    pub fn label(&self) -> &'static str {
        match self {
            RelayMsg::Allocate { .. } => "allocate",
            RelayMsg::Release { .. } => "release",
            RelayMsg::Signal { .. } => "signal",
            RelayMsg::Allocated { .. } => "allocated",
            RelayMsg::Ready { .. } => "ready",
            RelayMsg::Refused { .. } => "refused",
            RelayMsg::Closed { .. } => "closed",
            RelayMsg::Signalled { .. } => "signalled",
            RelayMsg::SignalRefused { .. } => "signal_refused",
            RelayMsg::Link { .. } => "link",
            RelayMsg::Unlink { .. } => "unlink",
        }
    }

    fn check_bounds(&self) -> Result<(), MsgError> {
        match self {
            RelayMsg::Signal { packet, .. } | RelayMsg::Signalled { packet, .. } => bound(
                !packet.is_empty() && packet.len() <= MAX_SIGNAL_PACKET,
                "packet",
            ),
            _ => Ok(()),
        }
    }

    /// The body of a `Frame::RelayControl` carrying this message.
    pub fn encode(&self) -> Result<Vec<u8>, MsgError> {
        self.check_bounds()?;
        encode(self, RELAY_PROTOCOL_VERSION)
    }

    /// Parses a `Frame::RelayControl` body.
    pub fn decode(body: &[u8]) -> Result<RelayMsg, MsgError> {
        let msg: RelayMsg = decode(body, RELAY_PROTOCOL_VERSION)?;
        msg.check_bounds()?;
        Ok(msg)
    }
}

/// Why a message body was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MsgError {
    /// Empty or longer than [`MAX_BODY_LEN`].
    #[error("message of {0} bytes is outside 1..={MAX_BODY_LEN}")]
    Size(usize),
    /// Another protocol version.
    #[error("unsupported message version {0}")]
    Version(u8),
    /// Did not decode.
    #[error("malformed message")]
    Malformed,
    /// A list or byte string over its bound.
    #[error("message field `{0}` is over its bound")]
    Bound(&'static str),
}

fn bound(ok: bool, field: &'static str) -> Result<(), MsgError> {
    if ok {
        Ok(())
    } else {
        Err(MsgError::Bound(field))
    }
}

fn encode<T: Serialize>(msg: &T, version: u8) -> Result<Vec<u8>, MsgError> {
    let out = postcard::to_extend(msg, vec![version]).map_err(|_| MsgError::Malformed)?;
    if out.len() > MAX_BODY_LEN {
        return Err(MsgError::Size(out.len()));
    }
    Ok(out)
}

fn decode<T: DeserializeOwned>(body: &[u8], version: u8) -> Result<T, MsgError> {
    if body.is_empty() || body.len() > MAX_BODY_LEN {
        return Err(MsgError::Size(body.len()));
    }
    if body[0] != version {
        return Err(MsgError::Version(body[0]));
    }
    let (msg, rest) =
        postcard::take_from_bytes::<T>(&body[1..]).map_err(|_| MsgError::Malformed)?;
    if !rest.is_empty() {
        return Err(MsgError::Malformed);
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sn(b: u8) -> Sn {
        Sn {
            key: [b; 32],
            addr: "198.51.100.7:4433".parse().expect("addr"),
        }
    }

    #[test]
    fn round_trip_within_the_size_bound() {
        let calls = vec![
            CallMsg::Invite {
                call: u64::MAX,
                record: vec![7; MAX_RECORD_LEN],
            },
            CallMsg::Ringing {
                call: 1,
                homes: vec![sn(1); MAX_HOMES],
            },
            CallMsg::Paths {
                call: 2,
                version: 3,
                paths: (0..MAX_OFFERED_PATHS as u16)
                    .map(|i| PathOffer::Relay2 {
                        id: i,
                        caller_side: sn(1),
                        callee_side: sn(2),
                    })
                    .collect(),
            },
            CallMsg::Hangup {
                call: 3,
                reason: HangupCode::Lost,
            },
        ];
        for m in calls {
            let bytes = m.encode().expect("encodes");
            assert!(
                bytes.len() <= MAX_BODY_LEN,
                "{} is {}",
                m.label(),
                bytes.len()
            );
            assert_eq!(CallMsg::decode(&bytes).expect("decodes"), m);
        }
        let relays = vec![
            RelayMsg::Signal {
                to: [1; 32],
                packet: vec![4; MAX_SIGNAL_PACKET],
            },
            RelayMsg::Signalled {
                from: [1; 32],
                observed: sn(1).addr,
                packet: vec![4; MAX_SIGNAL_PACKET],
            },
            RelayMsg::Allocated {
                peer: [2; 32],
                via: Some([3; 32]),
                channel: u32::MAX,
                lifetime_s: 300,
                ready: true,
            },
            RelayMsg::Link {
                client: [1; 32],
                peer: [2; 32],
                channel: 9,
                reply: false,
            },
        ];
        for m in relays {
            let bytes = m.encode().expect("encodes");
            assert!(bytes.len() <= MAX_BODY_LEN);
            assert_eq!(RelayMsg::decode(&bytes).expect("decodes"), m);
        }
    }

    #[test]
    fn bad_bodies_are_errors() {
        assert_eq!(CallMsg::decode(&[]), Err(MsgError::Size(0)));
        assert_eq!(CallMsg::decode(&[9, 0]), Err(MsgError::Version(9)));
        assert_eq!(
            RelayMsg::decode(&[RELAY_PROTOCOL_VERSION, 200]),
            Err(MsgError::Malformed)
        );
        let mut ok = CallMsg::Accept { call: 1 }.encode().expect("encodes");
        ok.push(0);
        assert_eq!(CallMsg::decode(&ok), Err(MsgError::Malformed));
        let over = CallMsg::Ringing {
            call: 1,
            homes: vec![sn(1); MAX_HOMES + 1],
        };
        assert_eq!(over.encode(), Err(MsgError::Bound("homes")));
        let empty = RelayMsg::Signal {
            to: [0; 32],
            packet: Vec::new(),
        };
        assert_eq!(empty.encode(), Err(MsgError::Bound("packet")));
    }

    proptest! {
        #[test]
        fn decode_never_panics(body in proptest::collection::vec(any::<u8>(), 0..1500)) {
            if let Ok(m) = CallMsg::decode(&body) {
                prop_assert!(m.encode().is_ok());
            }
            if let Ok(m) = RelayMsg::decode(&body) {
                prop_assert!(m.encode().is_ok());
            }
        }
    }
}
