//! The overlay's messages: the bodies of `Frame::Control` frames.
//!
//! Every message is one [`PROTOCOL_VERSION`] byte followed by the postcard encoding
//! of a [`Msg`]. A body longer than [`MAX_MSG_LEN`], of another version, that does
//! not decode, or whose lists exceed their bounds is an error ([`MsgError`]); the
//! overlay drops it and counts it. Records travel as the signed bytes of a
//! `peercall_crypto::Record` and are verified by whoever uses them.

use std::net::SocketAddr;

use peercall_crypto::record::MAX_RECORD_LEN;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The message encoding version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// The longest message body: fits a `Frame::Control` (up to 1,419 bytes of body in
/// a 1,452-byte datagram) with room to spare.
pub const MAX_MSG_LEN: usize = 1_400;
/// Supernodes in one list (samples, redirects, hand-offs): 24 entries of about 45
/// bytes stay under [`MAX_MSG_LEN`].
pub const MAX_SAMPLE: usize = 24;
/// User ids in one subscribe/watch message: 38 × 33 bytes stay under
/// [`MAX_MSG_LEN`].
pub const MAX_IDS: usize = 38;
/// Membership updates piggybacked on one probe message.
pub const MAX_GOSSIP: usize = 8;
/// Members in one membership page.
pub const MAX_MEMBERS: usize = 20;
/// Records in one `Store` message (small records batch; the byte bound still
/// applies).
pub const MAX_STORE_BATCH: usize = 16;
/// Endpoints a candidate may report.
pub const MAX_CANDIDATE_ADDRS: usize = 4;
/// Recently contacted peers a candidate may report: its homes, the supernodes it
/// probed choosing them and a few re-homing rounds' (a report with 32 fits
/// [`MAX_MSG_LEN`]).
pub const MAX_CANDIDATE_RECENT: usize = 32;

/// A 32-byte key or id on the wire (a `PeerKey` or a `UserId`).
pub type Id = [u8; 32];

/// A supernode as the overlay tells others about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnInfo {
    /// Its Noise static key.
    pub key: Id,
    /// Its address.
    pub addr: SocketAddr,
    /// Its load in per mille of capacity (clients / capacity × 1000), for picking
    /// the least loaded.
    pub load_permille: u16,
}

/// A supernode's load, as gossiped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Attachments asked of it: its clients, plus the homes they lack (a client
    /// with one home counts twice).
    pub clients: u32,
    /// The most clients it admits.
    pub capacity: u32,
    /// Its election score (higher is stronger), for picking whom to demote.
    pub score: u32,
    /// Pinned (a seed): never demoted.
    pub pinned: bool,
}

impl Load {
    /// Load in per mille of capacity, saturating.
    pub fn permille(&self) -> u16 {
        if self.capacity == 0 {
            return 1000;
        }
        (u64::from(self.clients) * 1000 / u64::from(self.capacity)).min(u64::from(u16::MAX)) as u16
    }
}

/// What a lookup asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Query {
    /// A user id.
    User(Id),
    /// A handle (validated as a `peercall_crypto::Handle` by the receiver).
    Handle(String),
}

/// A membership state, as gossiped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Missed a probe; will be declared dead unless it refutes.
    Suspect,
    /// Declared dead, or left.
    Dead,
}

/// One membership fact, gossiped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// The member's key.
    pub key: Id,
    /// Its address.
    pub addr: SocketAddr,
    /// Its incarnation: only the member raises it, to refute suspicion or announce
    /// a new load.
    pub incarnation: u32,
    /// The state.
    pub state: MemberState,
    /// Its load at that incarnation.
    pub load: Load,
}

/// Why a storer refused a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// Another live user holds the handle.
    HandleTaken,
}

/// A candidate's report of its capabilities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Seconds since the node started.
    pub uptime_s: u32,
    /// Upstream bandwidth it offers, kbit/s.
    pub bandwidth_kbps: u32,
    /// Idle CPU, percent.
    pub cpu_headroom_pct: u8,
    /// Its local (bound) addresses.
    pub local: Vec<SocketAddr>,
    /// Its reflexive address, as STUN told it.
    pub reflexive: Option<SocketAddr>,
    /// Peers it had sessions with recently (their NAT mappings may still be open),
    /// which therefore cannot dial it back meaningfully.
    pub recent: Vec<Id>,
}

/// One overlay message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    // ---- node ↔ home supernode ----
    /// A node asks to attach, with its current signed record.
    Attach {
        /// Signed record bytes.
        record: Vec<u8>,
    },
    /// Admitted. `observed` is where the node's packets come from; `sample` feeds its
    /// host cache.
    AttachOk {
        /// The node's address as the supernode sees it.
        observed: SocketAddr,
        /// Other supernodes.
        sample: Vec<SnInfo>,
    },
    /// Not admitted (full): try these instead.
    Redirect {
        /// Less loaded supernodes.
        others: Vec<SnInfo>,
    },
    /// The node detaches (graceful exit or moving).
    Detach,
    /// The supernode is leaving (demotion or shutdown): attach elsewhere.
    Leave {
        /// Suggested supernodes.
        others: Vec<SnInfo>,
    },
    /// Liveness between a node and its home.
    HomePing,
    /// Answer to [`Msg::HomePing`].
    HomePong,
    /// Fresh supernodes for the node's host cache.
    HostSample {
        /// Supernodes.
        sample: Vec<SnInfo>,
    },
    /// The node's new record, to store in the directory.
    Publish {
        /// Signed record bytes.
        record: Vec<u8>,
    },
    /// A storer refused the node's record.
    Refused {
        /// The user the record was for.
        user: Id,
        /// Why.
        reason: Refusal,
    },
    /// A directory lookup (node → home).
    Lookup {
        /// The node's request number.
        req: u32,
        /// What to find.
        query: Query,
    },
    /// The answer to [`Msg::Lookup`]: the record, or none.
    LookupReply {
        /// The request number.
        req: u32,
        /// Overlay hops beyond the home the answer took: 0 from the home's cache or
        /// share, 1 from another storer.
        hops: u8,
        /// Signed record bytes, if found.
        record: Option<Vec<u8>>,
    },
    /// Subscribe to these users' presence (node → home).
    Subscribe {
        /// User ids.
        users: Vec<Id>,
    },
    /// Stop following these users (node → home, home → storer).
    Unsubscribe {
        /// User ids.
        users: Vec<Id>,
    },
    /// A user's current record (storer → home, home → node): online unless the
    /// record lists no endpoints.
    Presence {
        /// Signed record bytes.
        record: Vec<u8>,
    },
    /// A user's record expired or was never there: offline.
    Gone {
        /// The user.
        user: Id,
    },

    // ---- home ↔ storer ----
    /// Store these records (publish, read repair, re-replication, hand-off).
    Store {
        /// Signed record bytes, one or more.
        records: Vec<Vec<u8>>,
    },
    /// Read a record (home → storer).
    Fetch {
        /// The home's request number.
        req: u32,
        /// What to find.
        query: Query,
    },
    /// The answer to [`Msg::Fetch`].
    FetchReply {
        /// The request number.
        req: u32,
        /// Signed record bytes, if held.
        record: Option<Vec<u8>>,
    },
    /// Push presence changes of these users to the sender (a lease; renewed).
    Watch {
        /// User ids.
        users: Vec<Id>,
    },

    // ---- membership (supernodes) ----
    /// A supernode (a seed, or a promoted node) joins the tier.
    Join {
        /// Its incarnation.
        incarnation: u32,
        /// Its load.
        load: Load,
    },
    /// Accepted: the joiner's address as seen, and the incarnation to use.
    Welcome {
        /// Where the joiner's packets come from.
        observed: SocketAddr,
        /// The incarnation it must use (above any the tier remembers).
        incarnation: u32,
    },
    /// A page of the membership list.
    Members {
        /// Members.
        members: Vec<Update>,
    },
    /// A SWIM probe.
    Ping {
        /// Probe number.
        seq: u32,
        /// Piggybacked updates.
        gossip: Vec<Update>,
    },
    /// A SWIM probe answer.
    Ack {
        /// Probe number.
        seq: u32,
        /// Piggybacked updates.
        gossip: Vec<Update>,
    },
    /// Probe `target` on my behalf (indirect probe).
    PingReq {
        /// My probe number.
        seq: u32,
        /// The member to probe.
        target: Id,
        /// Its address.
        addr: SocketAddr,
    },
    /// `target` answered your indirect probe.
    IndirectAck {
        /// Your probe number.
        seq: u32,
    },

    // ---- election ----
    /// A node offers itself for promotion (node → home).
    Candidate(Capabilities),
    /// Dial this candidate back from your address (home → another supernode).
    DialbackRequest {
        /// Transaction id of the STUN binding request to send.
        nonce: [u8; 12],
        /// The candidate's reflexive address.
        target: SocketAddr,
    },
    /// The outcome of a dial-back.
    DialbackResult {
        /// The transaction id.
        nonce: [u8; 12],
        /// Whether the candidate answered from `target`.
        reachable: bool,
    },
    /// A validated candidate, for the coordinator.
    Nominate {
        /// The candidate's key.
        key: Id,
        /// Its verified reflexive address.
        addr: SocketAddr,
        /// Its election score.
        score: u32,
    },
    /// Become a supernode: coordinator → the candidate's home (which admits it to
    /// its membership view and passes the message on) → the candidate, which
    /// trusts its home.
    Promote {
        /// The coordinator's epoch.
        epoch: u64,
        /// The candidate's key.
        candidate: Id,
    },
    /// Hand off and become an ordinary node (coordinator → supernode).
    Demote {
        /// The coordinator's epoch.
        epoch: u64,
    },
    /// Anti-entropy: send me your whole membership list (the sender has just
    /// sent its own, as [`Msg::Members`] pages). Answered a few times per
    /// interval at most (`membership::MAX_SYNC_ANSWERS`).
    Sync,
}

/// Why a message body was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MsgError {
    /// Longer than [`MAX_MSG_LEN`] (or empty).
    #[error("message of {0} bytes is outside 1..={MAX_MSG_LEN}")]
    Size(usize),
    /// Another protocol version.
    #[error("unsupported overlay protocol version {0}")]
    Version(u8),
    /// Did not decode as a message.
    #[error("malformed overlay message")]
    Malformed,
    /// A list or field over its bound.
    #[error("overlay message field `{0}` is over its bound")]
    Bound(&'static str),
}

impl Msg {
    /// A short stable name, for counters and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Msg::Attach { .. } => "attach",
            Msg::AttachOk { .. } => "attach_ok",
            Msg::Redirect { .. } => "redirect",
            Msg::Detach => "detach",
            Msg::Leave { .. } => "leave",
            Msg::HomePing => "home_ping",
            Msg::HomePong => "home_pong",
            Msg::HostSample { .. } => "host_sample",
            Msg::Publish { .. } => "publish",
            Msg::Refused { .. } => "refused",
            Msg::Lookup { .. } => "lookup",
            Msg::LookupReply { .. } => "lookup_reply",
            Msg::Subscribe { .. } => "subscribe",
            Msg::Unsubscribe { .. } => "unsubscribe",
            Msg::Presence { .. } => "presence",
            Msg::Gone { .. } => "gone",
            Msg::Store { .. } => "store",
            Msg::Fetch { .. } => "fetch",
            Msg::FetchReply { .. } => "fetch_reply",
            Msg::Watch { .. } => "watch",
            Msg::Join { .. } => "join",
            Msg::Welcome { .. } => "welcome",
            Msg::Members { .. } => "members",
            Msg::Ping { .. } => "ping",
            Msg::Ack { .. } => "ack",
            Msg::PingReq { .. } => "ping_req",
            Msg::IndirectAck { .. } => "indirect_ack",
            Msg::Candidate(_) => "candidate",
            Msg::DialbackRequest { .. } => "dialback_request",
            Msg::DialbackResult { .. } => "dialback_result",
            Msg::Nominate { .. } => "nominate",
            Msg::Promote { .. } => "promote",
            Msg::Demote { .. } => "demote",
            Msg::Sync => "sync",
        }
    }

    /// Checks every list and byte string against its bound.
    fn check_bounds(&self) -> Result<(), MsgError> {
        let bound = |ok: bool, field| {
            if ok {
                Ok(())
            } else {
                Err(MsgError::Bound(field))
            }
        };
        let record = |r: &Vec<u8>| bound(r.len() <= MAX_RECORD_LEN, "record");
        match self {
            Msg::Attach { record: r }
            | Msg::Publish { record: r }
            | Msg::Presence { record: r } => record(r),
            Msg::Store { records } => {
                bound(
                    !records.is_empty() && records.len() <= MAX_STORE_BATCH,
                    "records",
                )?;
                records.iter().try_for_each(record)
            }
            Msg::LookupReply { record: r, .. } | Msg::FetchReply { record: r, .. } => {
                r.as_ref().map_or(Ok(()), record)
            }
            Msg::AttachOk { sample: s, .. }
            | Msg::Redirect { others: s }
            | Msg::Leave { others: s }
            | Msg::HostSample { sample: s } => bound(s.len() <= MAX_SAMPLE, "sample"),
            Msg::Subscribe { users } | Msg::Unsubscribe { users } | Msg::Watch { users } => {
                bound(users.len() <= MAX_IDS, "users")
            }
            Msg::Lookup { query, .. } | Msg::Fetch { query, .. } => match query {
                Query::Handle(h) => {
                    bound(h.len() <= peercall_crypto::record::MAX_HANDLE_LEN, "handle")
                }
                Query::User(_) => Ok(()),
            },
            Msg::Members { members } => bound(members.len() <= MAX_MEMBERS, "members"),
            Msg::Ping { gossip, .. } | Msg::Ack { gossip, .. } => {
                bound(gossip.len() <= MAX_GOSSIP, "gossip")
            }
            Msg::Candidate(c) => {
                bound(c.local.len() <= MAX_CANDIDATE_ADDRS, "local")?;
                bound(c.recent.len() <= MAX_CANDIDATE_RECENT, "recent")
            }
            _ => Ok(()),
        }
    }

    /// The body of a `Frame::Control` carrying this message.
    pub fn encode(&self) -> Result<Vec<u8>, MsgError> {
        self.check_bounds()?;
        let out =
            postcard::to_extend(self, vec![PROTOCOL_VERSION]).map_err(|_| MsgError::Malformed)?;
        if out.len() > MAX_MSG_LEN {
            return Err(MsgError::Size(out.len()));
        }
        Ok(out)
    }

    /// Parses a `Frame::Control` body.
    pub fn decode(body: &[u8]) -> Result<Msg, MsgError> {
        if body.is_empty() || body.len() > MAX_MSG_LEN {
            return Err(MsgError::Size(body.len()));
        }
        if body[0] != PROTOCOL_VERSION {
            return Err(MsgError::Version(body[0]));
        }
        let (msg, rest) =
            postcard::take_from_bytes::<Msg>(&body[1..]).map_err(|_| MsgError::Malformed)?;
        if !rest.is_empty() {
            return Err(MsgError::Malformed);
        }
        msg.check_bounds()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr() -> SocketAddr {
        "198.51.100.7:4433".parse().expect("addr")
    }

    fn samples() -> Vec<Msg> {
        let update = Update {
            key: [3; 32],
            addr: addr(),
            incarnation: 7,
            state: MemberState::Suspect,
            load: Load {
                clients: 120,
                capacity: 500,
                score: 9,
                pinned: true,
            },
        };
        vec![
            Msg::Attach {
                record: vec![1; 200],
            },
            Msg::AttachOk {
                observed: addr(),
                sample: vec![
                    SnInfo {
                        key: [1; 32],
                        addr: addr(),
                        load_permille: 250
                    };
                    MAX_SAMPLE
                ],
            },
            Msg::Detach,
            Msg::Lookup {
                req: 9,
                query: Query::Handle("alice".into()),
            },
            Msg::LookupReply {
                req: 9,
                hops: 1,
                record: Some(vec![4; MAX_RECORD_LEN]),
            },
            Msg::Subscribe {
                users: vec![[5; 32]; MAX_IDS],
            },
            Msg::Ping {
                seq: 1,
                gossip: vec![update; MAX_GOSSIP],
            },
            Msg::Members {
                members: vec![update; MAX_MEMBERS],
            },
            Msg::Candidate(Capabilities {
                uptime_s: 3600,
                bandwidth_kbps: 10_000,
                cpu_headroom_pct: 80,
                local: vec![addr()],
                reflexive: Some(addr()),
                recent: vec![[1; 32]; MAX_CANDIDATE_RECENT],
            }),
            Msg::DialbackRequest {
                nonce: [9; 12],
                target: addr(),
            },
        ]
    }

    #[test]
    fn round_trip_within_the_size_bound() {
        for m in samples() {
            let bytes = m.encode().expect("encodes");
            assert!(
                bytes.len() <= MAX_MSG_LEN,
                "{} is {} bytes",
                m.label(),
                bytes.len()
            );
            assert_eq!(bytes[0], PROTOCOL_VERSION);
            assert_eq!(Msg::decode(&bytes).expect("decodes"), m);
        }
    }

    #[test]
    fn bad_bodies_are_errors() {
        assert_eq!(Msg::decode(&[]), Err(MsgError::Size(0)));
        assert_eq!(Msg::decode(&[2, 0]), Err(MsgError::Version(2)));
        assert_eq!(
            Msg::decode(&[PROTOCOL_VERSION, 250]),
            Err(MsgError::Malformed)
        );
        let mut ok = Msg::Detach.encode().expect("encodes");
        ok.push(0);
        assert_eq!(Msg::decode(&ok), Err(MsgError::Malformed), "trailing byte");
        assert!(matches!(
            Msg::decode(&[1; MAX_MSG_LEN + 1]),
            Err(MsgError::Size(_))
        ));
        // Over a list bound, though small enough to fit.
        let over = Msg::Subscribe {
            users: vec![[0; 32]; MAX_IDS + 1],
        };
        assert_eq!(over.encode(), Err(MsgError::Bound("users")));
        let mut raw = vec![PROTOCOL_VERSION];
        raw.extend(postcard::to_stdvec(&over).expect("postcard"));
        if raw.len() <= MAX_MSG_LEN {
            assert_eq!(Msg::decode(&raw), Err(MsgError::Bound("users")));
        }
        let big = Msg::Store {
            records: vec![vec![0; MAX_RECORD_LEN + 1]],
        };
        assert_eq!(big.encode(), Err(MsgError::Bound("record")));
    }

    proptest! {
        #[test]
        fn decode_never_panics(body in proptest::collection::vec(any::<u8>(), 0..1500)) {
            if let Ok(m) = Msg::decode(&body) {
                // Whatever decodes re-encodes within the bound.
                let again = m.encode().expect("a decoded message encodes");
                prop_assert!(again.len() <= MAX_MSG_LEN);
            }
        }
    }
}
