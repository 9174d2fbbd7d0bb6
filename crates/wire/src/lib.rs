//! Every packet and frame peercall puts on the network.
//!
//! peercall uses one UDP port for everything. The first byte of a datagram says what
//! it is, with the ranges of RFC 7983 and RFC 9443, so that STUN, DTLS, TURN channel
//! and RTP/RTCP traffic from browsers and standard tools can share the port:
//!
//! | first byte | protocol | handled by |
//! |---|---|---|
//! | 0..=3 | STUN (RFC 8489) | reflexive address discovery |
//! | 4 | peercall handshake initiation, Noise `IK` | crypto |
//! | 5 | peercall handshake initiation, Noise `XX` | crypto |
//! | 6 | peercall handshake response to `IK` | crypto |
//! | 7 | peercall handshake response to `XX` | crypto |
//! | 8 | peercall handshake finish (third `XX` message) | crypto |
//! | 9 | peercall cookie reply | crypto |
//! | 10 | peercall transport data | crypto, then [`frame`] |
//! | 11..=15 | reserved for peercall | dropped |
//! | 16..=19 | ZRTP | dropped |
//! | 20..=63 | DTLS | WebRTC gateway |
//! | 64..=79 | TURN channel | dropped |
//! | 80..=127 | unassigned (QUIC in RFC 9443) | dropped |
//! | 128..=191 | RTP / RTCP | WebRTC gateway |
//! | 192..=255 | unassigned (QUIC long header in RFC 9443) | dropped |
//!
//! peercall's own packets sit in 4..=15, the range RFC 7983 leaves unassigned, so a
//! demultiplexer that follows the RFCs never mistakes them for anything else.
//!
//! Parsing is zero-copy: [`Packet::parse`] and [`Frame::parse`] return views that
//! borrow the input. Encoding writes into a caller buffer and never allocates. Lengths
//! are checked exactly: a packet with a byte too many or too few is an error, never
//! a panic.

mod codec;
mod demux;
mod error;
pub mod frame;
pub mod packet;
mod time;

pub use demux::{Protocol, classify};
pub use error::WireError;
pub use frame::Frame;
pub use packet::{Packet, PacketType};
pub use time::Time;

/// The peercall protocol version carried in the second byte of every packet.
pub const VERSION: u8 = 1;

/// The largest datagram peercall sends: 1500-byte Ethernet MTU minus the 40-byte IPv6
/// and 8-byte UDP headers, so nothing is fragmented on ordinary paths.
pub const MAX_DATAGRAM: usize = 1452;
