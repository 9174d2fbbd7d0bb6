/// Why a datagram was dropped. Labels are stable and few (bounded metric cardinality).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Did not parse (see `peercall_wire::WireError`).
    Malformed,
    /// A protocol this node does not serve on its port.
    UnknownProtocol,
    /// A transport packet or response for a session index this node does not have.
    UnknownSession,
    /// Failed authentication: tampered, truncated ciphertext or the wrong key.
    Decrypt,
    /// A transport counter already seen or older than the replay window.
    Replay,
    /// A transport packet under keys older than the reject-after time.
    ExpiredKey,
    /// A handshake initiation whose `mac1` did not verify.
    BadMac,
    /// A handshake initiation whose timestamp is not newer than the last one.
    StaleTimestamp,
    /// A handshake that failed Noise processing.
    Handshake,
    /// Shed under load or by the per-source rate limit.
    RateLimited,
    /// A well-formed frame this node cannot use in its state.
    Unexpected,
}

impl DropReason {
    /// All reasons, for exporting zero-valued series.
    pub const ALL: [DropReason; 11] = [
        DropReason::Malformed,
        DropReason::UnknownProtocol,
        DropReason::UnknownSession,
        DropReason::Decrypt,
        DropReason::Replay,
        DropReason::ExpiredKey,
        DropReason::BadMac,
        DropReason::StaleTimestamp,
        DropReason::Handshake,
        DropReason::RateLimited,
        DropReason::Unexpected,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownProtocol => "unknown_protocol",
            DropReason::UnknownSession => "unknown_session",
            DropReason::Decrypt => "decrypt",
            DropReason::Replay => "replay",
            DropReason::ExpiredKey => "expired_key",
            DropReason::BadMac => "bad_mac",
            DropReason::StaleTimestamp => "stale_timestamp",
            DropReason::Handshake => "handshake",
            DropReason::RateLimited => "rate_limited",
            DropReason::Unexpected => "unexpected",
        }
    }
}

/// Counters since the node started; monotonic except `sessions`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams received.
    pub datagrams_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Datagrams handed out to send.
    pub datagrams_out: u64,
    /// Bytes handed out to send.
    pub bytes_out: u64,
    /// Handshakes this node started.
    pub handshakes_initiated: u64,
    /// Handshakes completed, either side.
    pub handshakes_completed: u64,
    /// Cookie replies sent while under load.
    pub cookie_replies_sent: u64,
    /// Authenticated keepalives sent.
    pub keepalives_sent: u64,
    /// Authenticated keepalives received.
    pub keepalives_received: u64,
    /// Sessions now established (a gauge).
    pub sessions: u64,
    /// Dropped datagrams by reason, indexed like [`DropReason::ALL`].
    pub drops: [u64; DropReason::ALL.len()],
    /// STUN Binding requests answered.
    pub stun_answered: u64,
    /// Overlay control frames received.
    pub control_in: u64,
    /// Overlay control frames sent.
    pub control_out: u64,
    /// Overlay messages dropped: queue full while dialing, or the peer unreachable.
    pub control_dropped: u64,
    /// Sessions opened on demand that could not be set up.
    pub dials_failed: u64,
    /// Idle sessions closed.
    pub sessions_reaped: u64,
    /// The overlay's counters and gauges.
    pub overlay: peercall_overlay::OverlayStats,
    /// The relay service's counters and gauges (a supernode's).
    pub relay: crate::relay::RelayStats,
    /// Calls: by outcome, set-up times, paths, concealment.
    pub calls: crate::call::CallCounters,
    /// Transmit buffers allocated because none was free to reuse.
    pub buffers_allocated: u64,
}

impl Stats {
    /// Drops for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    pub(crate) fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }
}
