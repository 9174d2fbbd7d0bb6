//! peercall's cryptography: identities, Noise sessions, replay protection, rekeying,
//! denial-of-service cookies and signed directory records.
//!
//! Sans-IO: nothing here reads a clock, touches a socket or asks the OS for
//! randomness. Time comes in as [`peercall_wire::Time`], randomness as an injected
//! `rand_core` RNG, and key files as bytes the IO shell reads and writes.

mod base32;
pub mod identity;

pub use identity::{Identity, IdentityError, PeerKey, UserId};
