//! The overlay's settings, each default a named constant with its reason.

use std::net::SocketAddr;
use std::time::Duration;

use peercall_crypto::{Handle, PeerKey};
use peercall_wire::Time;
use thiserror::Error;

/// What a node is allowed to be in the overlay (`role` in config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// May be promoted by the supernode tier (the default).
    Auto,
    /// Refuses promotion.
    Ordinary,
    /// Pinned supernode (a seed); never demoted.
    Supernode,
}

impl Role {
    /// The config and status spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Auto => "auto",
            Role::Ordinary => "ordinary",
            Role::Supernode => "supernode",
        }
    }
}

/// A known supernode in the host cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedHost {
    /// Its Noise static key.
    pub key: PeerKey,
    /// Its address.
    pub addr: SocketAddr,
    /// When this node last heard of it being a live supernode.
    pub last_seen: Time,
}

/// A bootstrap contact (a configured seed): its key may be unknown (then the engine
/// learns it with an XX handshake).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bootstrap {
    /// Its address.
    pub addr: SocketAddr,
    /// Its key, when configured.
    pub key: Option<PeerKey>,
}

/// The most supernodes a host cache holds (DESIGN.md §2).
pub const HOST_CACHE_SIZE: usize = 200;
/// Clients a supernode admits by default: a desktop on a residential uplink relays
/// and answers for a few hundred nodes without strain.
pub const DEFAULT_MAX_CLIENTS: u32 = 200;
/// Attaches per second a supernode admits by default: a tenth of capacity per
/// second refills an emptied supernode in ten seconds without a stampede.
pub const DEFAULT_ATTACH_RATE: u32 = 20;
/// Burst of attaches admitted at once.
pub const DEFAULT_ATTACH_BURST: u32 = 40;
/// Directory records live this long unless refreshed (lead's design: 120 s).
pub const DEFAULT_RECORD_TTL: Duration = Duration::from_secs(120);
/// Nodes re-sign and re-publish their record this often: half the TTL, so one lost
/// refresh never lets a live record expire.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(60);
/// Minimum uptime before a node may be promoted: an hour filters out laptops that
/// come and go.
pub const DEFAULT_MIN_UPTIME: Duration = Duration::from_secs(3600);
/// Minimum upstream bandwidth for promotion, kbit/s: relaying a few calls of
/// 40 kbit/s Opus needs a few megabits.
pub const DEFAULT_MIN_BANDWIDTH_KBPS: u32 = 5_000;
/// Minimum idle CPU for promotion, percent.
pub const DEFAULT_MIN_CPU_HEADROOM: u8 = 50;
/// Promote when the tier's average load passes this (per mille of capacity).
pub const DEFAULT_HIGH_WATERMARK: u16 = 700;
/// Demote when it falls below this; the gap is the hysteresis.
pub const DEFAULT_LOW_WATERMARK: u16 = 300;
/// Promotions per minute at most for a small tier, so a load spike cannot stampede
/// it; a tier larger than this may grow by up to its own size per minute (at most
/// doubling), so a large network adds capacity at its own scale. Each decision
/// promotes only enough to bring the average load to the watermarks' midpoint.
pub const DEFAULT_MAX_PROMOTIONS_PER_MIN: u32 = 6;
/// The tier never demotes below this many supernodes.
pub const DEFAULT_MIN_SUPERNODES: u32 = 3;
/// How long a supernode this node contacted (a session, or a latency probe) is
/// taken to still have a NAT mapping open towards it, so it cannot dial the node
/// back as a stranger: consumer NATs keep idle UDP mappings from 30 s to a few
/// minutes. Set it to the NAT's mapping timeout where that is known.
pub const DEFAULT_CONTACT_MEMORY: Duration = Duration::from_secs(180);

/// Capacity limits of a supernode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// The most attached clients ([`DEFAULT_MAX_CLIENTS`]).
    pub max_clients: u32,
    /// Attaches admitted per second ([`DEFAULT_ATTACH_RATE`]).
    pub attach_rate: u32,
    /// Attaches admitted in a burst ([`DEFAULT_ATTACH_BURST`]).
    pub attach_burst: u32,
}

/// Election settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElectionConfig {
    /// [`DEFAULT_MIN_UPTIME`].
    pub min_uptime: Duration,
    /// [`DEFAULT_MIN_BANDWIDTH_KBPS`].
    pub min_bandwidth_kbps: u32,
    /// [`DEFAULT_MIN_CPU_HEADROOM`].
    pub min_cpu_headroom_pct: u8,
    /// [`DEFAULT_HIGH_WATERMARK`].
    pub high_watermark: u16,
    /// [`DEFAULT_LOW_WATERMARK`].
    pub low_watermark: u16,
    /// [`DEFAULT_MAX_PROMOTIONS_PER_MIN`].
    pub max_promotions_per_min: u32,
    /// [`DEFAULT_MIN_SUPERNODES`].
    pub min_supernodes: u32,
    /// [`DEFAULT_CONTACT_MEMORY`].
    pub contact_memory: Duration,
}

impl Default for ElectionConfig {
    fn default() -> Self {
        ElectionConfig {
            min_uptime: DEFAULT_MIN_UPTIME,
            min_bandwidth_kbps: DEFAULT_MIN_BANDWIDTH_KBPS,
            min_cpu_headroom_pct: DEFAULT_MIN_CPU_HEADROOM,
            high_watermark: DEFAULT_HIGH_WATERMARK,
            low_watermark: DEFAULT_LOW_WATERMARK,
            max_promotions_per_min: DEFAULT_MAX_PROMOTIONS_PER_MIN,
            min_supernodes: DEFAULT_MIN_SUPERNODES,
            contact_memory: DEFAULT_CONTACT_MEMORY,
        }
    }
}

/// What the node offers if promoted (the shell measures these; the simulator
/// assigns them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    /// Upstream bandwidth, kbit/s.
    pub bandwidth_kbps: u32,
    /// Idle CPU, percent.
    pub cpu_headroom_pct: u8,
}

/// The overlay's settings.
#[derive(Debug, Clone)]
pub struct OverlayConfig {
    /// Known supernodes from the persisted host cache.
    pub host_cache: Vec<CachedHost>,
    /// The handle to claim in the directory.
    pub handle: Option<Handle>,
    /// Local (bound) addresses to list in the record besides the reflexive one.
    pub local_addrs: Vec<SocketAddr>,
    /// Limits when acting as a supernode.
    pub capacity: Capacity,
    /// Resources offered for promotion.
    pub resources: Resources,
    /// Election settings.
    pub election: ElectionConfig,
    /// [`DEFAULT_RECORD_TTL`].
    pub record_ttl: Duration,
    /// [`DEFAULT_REFRESH`].
    pub refresh_interval: Duration,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig {
            host_cache: Vec::new(),
            handle: None,
            local_addrs: Vec::new(),
            capacity: Capacity {
                max_clients: DEFAULT_MAX_CLIENTS,
                attach_rate: DEFAULT_ATTACH_RATE,
                attach_burst: DEFAULT_ATTACH_BURST,
            },
            resources: Resources::default(),
            election: ElectionConfig::default(),
            record_ttl: DEFAULT_RECORD_TTL,
            refresh_interval: DEFAULT_REFRESH,
        }
    }
}

/// A setting that cannot work, naming the key and the reason.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid overlay setting `{key}`: {reason}")]
pub struct OverlayConfigError {
    /// The setting.
    pub key: &'static str,
    /// Why.
    pub reason: &'static str,
}

impl OverlayConfig {
    /// Checks the relations between settings.
    pub fn validate(&self) -> Result<(), OverlayConfigError> {
        let err = |key, reason| Err(OverlayConfigError { key, reason });
        if self.refresh_interval.is_zero() || self.refresh_interval >= self.record_ttl {
            return err(
                "refresh_interval",
                "must be positive and shorter than record_ttl, or records expire while their node lives",
            );
        }
        if self.record_ttl > peercall_crypto::record::MAX_RECORD_LIFETIME {
            return err(
                "record_ttl",
                "storers refuse records that live longer than a day",
            );
        }
        if self.capacity.max_clients == 0 || self.capacity.attach_rate == 0 {
            return err("capacity", "max_clients and attach_rate must be positive");
        }
        if self.election.low_watermark >= self.election.high_watermark {
            return err(
                "election.low_watermark",
                "must be below high_watermark (hysteresis)",
            );
        }
        if self.election.high_watermark > 1000 {
            return err(
                "election.high_watermark",
                "is per mille of capacity: at most 1000",
            );
        }
        Ok(())
    }
}
