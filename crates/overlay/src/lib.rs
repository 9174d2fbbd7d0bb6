//! The peercall overlay: supernode membership, election, the one-hop directory,
//! presence, host cache and admission (DESIGN.md §1-2).

pub mod msg;
pub mod store;
pub mod stun;
pub mod util;
