use std::net::{Ipv4Addr, SocketAddrV4};

use crate::{HostId, NodeId};

/// A simulation was set up wrongly. Nothing is changed when one of these is returned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// Another host (or NAT) already has this IPv4 address.
    #[error("address {0} is already taken by another host")]
    AddressTaken(Ipv4Addr),
    /// Another node is already bound to this address and port.
    #[error("port {0} is already bound by another node")]
    PortTaken(SocketAddrV4),
    /// No host with this id exists in this simulation.
    #[error("no host {0:?} in this simulation")]
    UnknownHost(HostId),
    /// No node with this id exists in this simulation.
    #[error("no node {0:?} in this simulation")]
    UnknownNode(NodeId),
    /// No partition with this id exists in this simulation.
    #[error("no cut {0} in this simulation")]
    UnknownCut(u32),
    /// The host is not a NAT, but the operation needs one.
    #[error("host {0:?} is not a NAT")]
    NotANat(HostId),
    /// The operation needs an ordinary host that can run a node (not a NAT box).
    #[error("host {0:?} is a NAT box; nodes run on public or private hosts")]
    IsANat(HostId),
    /// Links, access delays and uplinks belong to hosts with a public address; a
    /// private host's internet traffic uses those of its NAT.
    #[error("host {0:?} is behind a NAT; configure its NAT instead")]
    NotPublic(HostId),
    /// A configuration value is out of its range.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The field or parameter.
        what: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// `PEERCALL_SIM_SEED` holds something that is not a u64.
    #[error("PEERCALL_SIM_SEED={value:?} is not a seed: {reason}")]
    BadSeed {
        /// The variable's value.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
}
