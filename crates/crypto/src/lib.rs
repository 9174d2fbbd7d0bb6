//! peercall's cryptography: identities, Noise sessions, replay protection, rekeying,
//! denial-of-service cookies and signed directory records.
//!
//! Sans-IO: nothing here reads a clock, touches a socket or asks the OS for
//! randomness. Time comes in as [`peercall_wire::Time`], randomness as an injected
//! seed or `rand_core` RNG, and key files as bytes the IO shell reads and writes.
//!
//! The engine uses [`Endpoint`] (sessions, handshakes, cookies, rate limits) and
//! [`Record`] (signed directory records); the other modules are its parts, public so
//! they can be tested, benchmarked and reused on their own.

mod base32;
pub mod cookie;
pub mod endpoint;
pub mod handshake;
pub mod identity;
mod lru;
pub mod ratelimit;
pub mod record;
pub mod replay;
pub mod session;

pub use endpoint::{
    ConfigError, Endpoint, EndpointConfig, EndpointStats, Received, Reject, SessionSummary,
};
pub use identity::{Identity, IdentityError, PeerKey, UserId};
pub use record::{Handle, HomeSupernode, Record, RecordBody, RecordError};
pub use replay::ReplayWindow;
pub use session::SendError;
