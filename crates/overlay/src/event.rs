//! What the overlay hands its owner: messages to send, STUN requests, events, and
//! counters.

use std::net::SocketAddr;

use peercall_crypto::{Handle, PeerKey, Record, UserId};

use crate::membership::MembershipStats;

/// A lookup's number, unique within one overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// What a lookup asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Lookup {
    /// A user id.
    User(UserId),
    /// A handle.
    Handle(Handle),
}

/// A record a lookup found, verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The verified record (boxed: events stay small in queues).
    pub record: Box<Record>,
    /// Whether it lists endpoints (a record without is a signed "offline").
    pub online: bool,
    /// Overlay hops beyond the home supernode the answer took: 0 when the home
    /// answered from its cache or its own share, 1 when it asked another storer.
    pub hops: u8,
}

/// Why a lookup found nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The storers answered and none holds a live record.
    #[error("no live record")]
    NotFound,
    /// No valid answer in time.
    #[error("lookup timed out")]
    Timeout,
    /// The node has no home supernode to ask (yet).
    #[error("not attached to the overlay")]
    NotAttached,
}

/// Something the owner may show or act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayEvent {
    /// A lookup finished.
    LookupDone {
        /// Which.
        id: RequestId,
        /// The record, or why not.
        result: Result<Found, LookupError>,
    },
    /// A subscribed contact came online, changed address, or went offline.
    Presence {
        /// The contact.
        user: UserId,
        /// Online now.
        online: bool,
        /// The record behind the change (`None` when it expired).
        record: Option<Box<Record>>,
    },
    /// This node became a supernode (`true`) or an ordinary node again.
    RoleChanged {
        /// Whether it is a supernode now.
        supernode: bool,
    },
    /// The node's home supernodes changed.
    HomesChanged {
        /// The current homes.
        homes: Vec<PeerKey>,
    },
    /// A storer refused the node's handle: another live user holds it.
    HandleRefused {
        /// The handle.
        handle: Handle,
    },
    /// STUN told the node a new reflexive address.
    Reflexive {
        /// The address.
        addr: SocketAddr,
    },
}

/// What the owner must do, drained with `Overlay::poll_output` after every input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send `msg` as a `Frame::Control` body to `to` (at `addr`), dialing first when
    /// no session is up.
    Send {
        /// The peer.
        to: PeerKey,
        /// Where to dial it if needed.
        addr: SocketAddr,
        /// The message body.
        msg: Vec<u8>,
    },
    /// Send a STUN Binding request with `txid` to `to` (outside any session).
    Stun {
        /// Destination.
        to: SocketAddr,
        /// Transaction id.
        txid: [u8; 12],
    },
    /// Tell the owner something.
    Event(OverlayEvent),
}

/// Counters and gauges, for `/metrics` and the simulator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayStats {
    /// Whether the node is a supernode now (gauge).
    pub supernode: bool,
    /// Home supernodes (gauge).
    pub homes: u64,
    /// Attached clients (gauge; supernodes).
    pub clients: u64,
    /// The most clients this supernode admits (gauge).
    pub capacity: u64,
    /// Live supernodes known, this one included (gauge; supernodes).
    pub members: u64,
    /// Directory records stored (gauge).
    pub records: u64,
    /// Bytes of signed records stored (gauge).
    pub record_bytes: u64,
    /// Bytes the store spends beyond the records (gauge).
    pub store_overhead_bytes: u64,
    /// Control messages received.
    pub msgs_in: u64,
    /// Control message bytes received.
    pub bytes_in: u64,
    /// Control messages sent.
    pub msgs_out: u64,
    /// Control message bytes sent.
    pub bytes_out: u64,
    /// Messages dropped as malformed, oversize or of another version.
    pub dropped_malformed: u64,
    /// Well-formed messages this node cannot use in its state or from that sender.
    pub dropped_unexpected: u64,
    /// Records refused for a bad signature, a wrong key or a mismatch with the query.
    pub forged_records: u64,
    /// Records refused as not newer than the one held, or expired.
    pub stale_records: u64,
    /// Records refused because another live user holds the handle.
    pub handle_conflicts: u64,
    /// Requests shed by a per-client rate limit.
    pub rate_limited: u64,
    /// Attaches started to move to a nearer home (node).
    pub rehomes: u64,
    /// Attach requests admitted (supernode).
    pub attaches_admitted: u64,
    /// Attach requests redirected (supernode).
    pub attaches_redirected: u64,
    /// Attach requests sent (node).
    pub attach_attempts: u64,
    /// Homes lost (died, left or went silent).
    pub homes_lost: u64,
    /// Lookups started by this node.
    pub lookups: u64,
    /// Lookups that found a record.
    pub lookups_found: u64,
    /// Lookups answered "not found".
    pub lookups_not_found: u64,
    /// Lookups that timed out or had no home.
    pub lookups_failed: u64,
    /// Directory reads sent to storers (home).
    pub fetches: u64,
    /// Records pushed to stale storers after a read.
    pub read_repairs: u64,
    /// Records pushed to new storers after a membership change or hand-off.
    pub replicated: u64,
    /// Records expired from the store.
    pub expired: u64,
    /// Presence events emitted.
    pub presence_events: u64,
    /// Presence notifications sent (storer and home).
    pub presence_pushes: u64,
    /// Records published by this node.
    pub publishes: u64,
    /// Promotions decided (coordinator).
    pub promotions: u64,
    /// Demotions decided (coordinator).
    pub demotions: u64,
    /// Candidates that answered a dial-back.
    pub dialbacks_ok: u64,
    /// Candidates that did not.
    pub dialbacks_failed: u64,
    /// STUN Binding requests sent.
    pub stun_requests: u64,
    /// Membership (SWIM) counters.
    pub swim: MembershipStats,
}
