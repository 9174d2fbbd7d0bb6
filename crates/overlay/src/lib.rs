//! The peercall overlay: supernode membership, election, the one-hop directory,
//! presence, host cache and admission (DESIGN.md §1-2), as a sans-IO state machine.
//!
//! # Driving contract
//!
//! [`Overlay`] is owned by the engine's node, which feeds it, each with `now`:
//! [`Overlay::handle_message`] for every `Frame::Control` body from a peer,
//! [`Overlay::handle_peer_up`] / [`Overlay::handle_peer_down`] when sessions come
//! and go, [`Overlay::handle_stun_response`] for STUN Binding answers, and
//! [`Overlay::handle_timeout`] when [`Overlay::poll_timeout`] comes due; commands
//! ([`Overlay::lookup`], [`Overlay::subscribe`], [`Overlay::set_handle`],
//! [`Overlay::close`]) come from the owner. After every input the owner drains
//! [`Overlay::poll_output`]: messages to send on a session (dialing first if
//! needed), STUN requests to send, and [`OverlayEvent`]s. Nothing here reads a clock,
//! touches a socket or draws OS randomness: all randomness comes from the seed
//! given to [`Overlay::new`].
//!
//! # Pieces
//! - [`msg`]: the message set (versioned postcard, strict bounds).
//! - [`membership`]: SWIM among supernodes, with load piggybacked.
//! - [`store`]: the compact record store of a directory share.
//! - [`stun`]: STUN Binding on the shared port.
//! - [`policy`]: election policy behind a trait.
//! - [`Overlay`]: attachment with admission and back-off, the directory (HRW
//!   placement, quorum reads with read repair, expiry, re-replication), presence,
//!   and the election.

pub mod config;
pub mod event;
pub mod membership;
pub mod msg;
mod overlay;
pub mod policy;
pub mod store;
pub mod stun;
pub mod util;

pub use config::{
    Bootstrap, CachedHost, Capacity, ElectionConfig, OverlayConfig, OverlayConfigError, Resources,
    Role,
};
pub use event::{Found, Lookup, LookupError, Output, OverlayEvent, OverlayStats, RequestId};
pub use membership::MembershipStats;
pub use overlay::*;
