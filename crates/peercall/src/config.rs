//! Layered configuration: built-in defaults < file (TOML) < `PEERCALL_*` environment
//! < command-line flags.
//!
//! The layers are merged with the `config` crate, then every key is parsed into a
//! typed [`Settings`] ("parse, don't validate"): enums for choices, `NonZero*` for
//! intervals, a loopback-only type for the admin address. An unknown key or a bad
//! value, from any layer, is a [`ConfigError`] that names the key, the reason and
//! the layer it came from. `configs/default.toml` documents every key; a test keeps
//! it equal to the built-in defaults.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::{AddrParseError, IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config as Layers, File, FileFormat, Map, Source, Value, ValueKind};
use peercall_crypto::Handle;
use peercall_engine::{CallConfig, OverlayConfig, RedundancyMode, RelayConfig, Role};
use peercall_overlay::config as overlay;
use thiserror::Error;

use crate::contact::{PeerSpec, PeerSpecError};
use crate::netem::{EmulateSettings, MAX_DELAY_MS, MAX_PEERS, NatMode, PeerMatch};

/// Prefix of the environment variables that set config keys (`PEERCALL_LISTEN`...).
pub const ENV_PREFIX: &str = "PEERCALL_";

/// Every config key, in documentation order.
pub const KEYS: [&str; 52] = [
    "data_dir",
    "listen",
    "admin",
    "role",
    "seeds",
    "handle",
    "local_addrs",
    "keepalive_secs",
    "session_timeout_secs",
    "state_save_secs",
    "supernode_max_clients",
    "supernode_attach_rate",
    "supernode_attach_burst",
    "bandwidth_mbps",
    "record_ttl_secs",
    "record_refresh_secs",
    "election_min_uptime_secs",
    "election_min_bandwidth_mbps",
    "election_min_cpu_headroom_pct",
    "election_high_watermark",
    "election_low_watermark",
    "election_max_promotions_per_min",
    "election_min_supernodes",
    "election_contact_memory_secs",
    "log_format",
    "log_level",
    "debug_endpoints",
    "calls.auto_answer",
    "calls.answer_play",
    "calls.answer_record",
    "calls.max_calls",
    "calls.ring_timeout_secs",
    "calls.connect_timeout_secs",
    "calls.lost_timeout_secs",
    "calls.redundancy",
    "relay.enabled",
    "relay.allow_private_targets",
    "relay.max_channels",
    "relay.max_channels_per_client",
    "relay.client_bytes_per_sec",
    "relay.client_burst_bytes",
    "relay.request_rate",
    "relay.request_burst",
    "relay.lifetime_secs",
    "relay.idle_timeout_secs",
    "emulate.delay_ms",
    "emulate.jitter_ms",
    "emulate.loss_pct",
    "emulate.seed",
    "emulate.peers",
    "emulate.nat",
    "emulate.nat_timeout_secs",
];

/// Config sections: a TOML table (`[calls]`) whose keys are named `calls.KEY`;
/// in the environment `PEERCALL_CALLS_KEY`.
pub const SECTIONS: [&str; 3] = ["calls", "relay", "emulate"];

/// Most calls at a time a node may be configured for: each call runs an Opus
/// encoder and decoder on the daemon's audio clock; more than this on one host is a
/// typo, not a plan.
pub const MAX_CALLS: u64 = 64;
/// Upper bound of the call timeouts: ten minutes of ringing or connecting is
/// already far beyond any caller's patience.
pub const MAX_CALL_TIMEOUT_SECS: u64 = 600;
/// Upper bound of the relay's count keys (channels, requests): far beyond one
/// process, so only typos are refused.
pub const MAX_RELAY_COUNT: u64 = 10_000_000;
/// Upper bound of the relay's byte keys: 1 GB/s per client is beyond any uplink.
pub const MAX_RELAY_BYTES: u64 = 1_000_000_000;
/// Default lifetime of an emulated NAT mapping without outbound traffic: 30 s, the
/// common UDP binding timeout of home routers (and Linux conntrack's).
pub const DEFAULT_NAT_TIMEOUT_SECS: u64 = 30;

/// Default UDP address: all interfaces, peercall's port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7600";
/// Default admin HTTP address: loopback, the port after the UDP one.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:7601";
/// Default keepalive interval; the engine's own default (10 s keeps most NAT UDP
/// bindings, which commonly expire after 30 s, alive).
pub const DEFAULT_KEEPALIVE_SECS: u64 = 10;
/// Default session timeout: three keepalives lost in a row, plus slack.
pub const DEFAULT_SESSION_TIMEOUT_SECS: u64 = 35;
/// Default interval between saves of the host cache: a crash (SIGKILL, power loss)
/// loses at most this much of what the node learned about supernodes, and a
/// 200-entry file written twice a minute costs nothing.
pub const DEFAULT_STATE_SAVE_SECS: u64 = 30;
/// Upper bound of `bandwidth_mbps` and `election_min_bandwidth_mbps`: 100 Gbit/s,
/// beyond any host's uplink (a larger value is a unit mistake).
pub const MAX_BANDWIDTH_MBPS: f64 = 100_000.0;
/// Upper bound of the supernode capacity keys: far beyond what one process serves,
/// so only typos are refused.
pub const MAX_CAPACITY: u32 = 1_000_000;
/// Upper bound of `election_min_uptime_secs`: 30 days.
pub const MAX_MIN_UPTIME_SECS: u64 = 30 * 86_400;
/// Upper bound of the election's count keys.
pub const MAX_ELECTION_COUNT: u32 = 10_000;
/// Most entries in `local_addrs`: a record lists at most 8 endpoints, one of them
/// usually the reflexive address.
pub const MAX_LOCAL_ADDRS: usize = peercall_crypto::record::MAX_ENDPOINTS;
/// Upper bound for interval keys: a day. Longer is surely a typo (milliseconds
/// written as seconds) and would make a dead peer look alive for days.
pub const MAX_INTERVAL_SECS: u64 = 86_400;

/// The origin label of built-in defaults.
const ORIGIN_DEFAULT: &str = "built-in default";
/// The origin label the `config` crate gives environment values.
const ORIGIN_ENV: &str = "the environment";
/// The origin label prefix of command-line flags.
const ORIGIN_FLAG: &str = "command-line flag --";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The most verbose level logged by peercall's own crates (other crates log at
/// `warn` at most).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, clap::ValueEnum)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// The default: start-up, sessions up and down, shutdown.
    #[default]
    Info,
    /// Per-session detail, peer addresses, full keys.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Off => "off",
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

impl LogFormat {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// A socket address on the loopback interface; the only kind the admin API binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopbackAddr(SocketAddr);

impl LoopbackAddr {
    /// `addr`, if it is a loopback address.
    pub fn new(addr: SocketAddr) -> Result<LoopbackAddr, KeyError> {
        if addr.ip().is_loopback() {
            Ok(LoopbackAddr(addr))
        } else {
            Err(KeyError::NotLoopback(addr))
        }
    }

    /// The address.
    pub fn get(self) -> SocketAddr {
        self.0
    }
}

/// The node's settings, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Where the identity key, admin token and other state live.
    pub data_dir: PathBuf,
    /// UDP address for all peer traffic.
    pub listen: SocketAddr,
    /// HTTP admin API address (loopback only).
    pub admin: LoopbackAddr,
    /// Overlay role.
    pub role: Role,
    /// Peers to contact at start.
    pub seeds: Vec<PeerSpec>,
    /// The handle to claim in the directory.
    pub handle: Option<Handle>,
    /// The local endpoints to list in the directory record.
    pub local_addrs: LocalAddrs,
    /// Keepalive interval on idle sessions.
    pub keepalive_secs: NonZeroU64,
    /// Silence after which a session is dead; always longer than the keepalive.
    pub session_timeout_secs: NonZeroU64,
    /// Interval between saves of the host cache.
    pub state_save_secs: NonZeroU64,
    /// Most clients admitted as a supernode.
    pub supernode_max_clients: NonZeroU32,
    /// Attaches admitted per second as a supernode.
    pub supernode_attach_rate: NonZeroU32,
    /// Attaches admitted in a burst as a supernode.
    pub supernode_attach_burst: NonZeroU32,
    /// Upstream bandwidth offered for promotion, kbit/s (configured in Mbit/s).
    pub bandwidth_kbps: u32,
    /// Lifetime of the signed directory record.
    pub record_ttl_secs: NonZeroU64,
    /// Re-publication interval of the record; always shorter than its lifetime.
    pub record_refresh_secs: NonZeroU64,
    /// Election minimums and pacing.
    pub election: overlay::ElectionConfig,
    /// Log format.
    pub log_format: LogFormat,
    /// Log level.
    pub log_level: LogLevel,
    /// Whether the admin API serves the debug endpoints (`/v1/debug/*`: the
    /// datagram block list used by `peercall demo` to cut a path).
    pub debug_endpoints: bool,
    /// Call settings (`calls.*`).
    pub calls: CallSettings,
    /// Relay settings (`relay.*`), used while the node is a supernode.
    pub relay: RelayConfig,
    /// Emulated link impairment and NAT in the UDP socket (`emulate.*`): for tests
    /// and the demo.
    pub emulate: EmulateSettings,
}

/// The `calls.*` keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSettings {
    /// Answer incoming calls at once.
    pub auto_answer: bool,
    /// WAV file played into auto-answered calls (silence without one).
    pub answer_play: Option<PathBuf>,
    /// WAV file each auto-answered call is recorded to (overwritten per call).
    pub answer_record: Option<PathBuf>,
    /// Calls at a time; more are answered busy.
    pub max_calls: usize,
    /// Ringing without an answer this long ends the call (`no_answer`).
    pub ring_timeout_secs: NonZeroU64,
    /// No session with the callee within this long ends the call (`unreachable`).
    pub connect_timeout_secs: NonZeroU64,
    /// Every path silent this long ends the call (`lost`).
    pub lost_timeout_secs: NonZeroU64,
    /// When the router sends redundant copies.
    pub redundancy: RedundancyMode,
}

impl CallSettings {
    /// The engine's call settings these keys make (codec and jitter buffer at the
    /// engine's defaults).
    pub fn call_config(&self) -> CallConfig {
        CallConfig {
            auto_answer: self.auto_answer,
            max_calls: self.max_calls,
            ring_timeout: Duration::from_secs(self.ring_timeout_secs.get()),
            connect_timeout: Duration::from_secs(self.connect_timeout_secs.get()),
            lost_timeout: Duration::from_secs(self.lost_timeout_secs.get()),
            redundancy: self.redundancy,
            ..CallConfig::default()
        }
    }
}

/// The config spelling of a redundancy mode.
pub fn redundancy_str(mode: RedundancyMode) -> &'static str {
    match mode {
        RedundancyMode::Auto => "auto",
        RedundancyMode::Always => "always",
        RedundancyMode::Never => "never",
    }
}

impl Settings {
    /// The keepalive interval.
    pub fn keepalive(&self) -> Duration {
        Duration::from_secs(self.keepalive_secs.get())
    }

    /// The session timeout.
    pub fn session_timeout(&self) -> Duration {
        Duration::from_secs(self.session_timeout_secs.get())
    }

    /// The host cache save interval.
    pub fn state_save(&self) -> Duration {
        Duration::from_secs(self.state_save_secs.get())
    }

    /// The overlay settings these keys make. The host cache, the local addresses and
    /// the measured CPU headroom are the shell's to fill in at start.
    pub fn overlay_config(&self) -> OverlayConfig {
        OverlayConfig {
            handle: self.handle.clone(),
            capacity: overlay::Capacity {
                max_clients: self.supernode_max_clients.get(),
                attach_rate: self.supernode_attach_rate.get(),
                attach_burst: self.supernode_attach_burst.get(),
            },
            resources: overlay::Resources {
                bandwidth_kbps: self.bandwidth_kbps,
                cpu_headroom_pct: 0,
            },
            election: self.election,
            record_ttl: Duration::from_secs(self.record_ttl_secs.get()),
            refresh_interval: Duration::from_secs(self.record_refresh_secs.get()),
            ..OverlayConfig::default()
        }
    }
}

/// Which local endpoints the directory record lists (besides the reflexive address
/// the supernodes report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAddrs {
    /// The bound address if specific, else the host's interface addresses (see
    /// `crate::resources::interface_addrs`), with the bound port.
    Auto,
    /// Only these: an IP address takes the bound port; an `IP:PORT` is listed as is
    /// (a forwarded port, say).
    List(Vec<SocketAddr>),
}

impl LocalAddrs {
    /// The config spelling of [`LocalAddrs::Auto`].
    pub const AUTO: &str = "auto";
}

/// What is wrong with one key's value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    /// Not a key peercall knows (a typo, or a key from another version).
    #[error("unknown key; the known keys are {}", KEYS.join(", "))]
    Unknown,
    /// The value has the wrong type.
    #[error("expected {expected}, found {found}")]
    Type {
        /// What the key takes.
        expected: &'static str,
        /// What was given.
        found: &'static str,
    },
    /// Not a socket address.
    #[error("invalid socket address {text:?}: {error}")]
    SocketAddr {
        /// The value.
        text: String,
        /// The parser's reason.
        error: AddrParseError,
    },
    /// The admin API may only listen on loopback.
    #[error("{0} is not a loopback address; the admin API only listens on 127.0.0.1 or [::1]")]
    NotLoopback(SocketAddr),
    /// Not one of the allowed words.
    #[error("invalid value {text:?}: expected one of {allowed}")]
    Choice {
        /// The value.
        text: String,
        /// The allowed values.
        allowed: &'static str,
    },
    /// Not a whole number of seconds in range.
    #[error(
        "invalid value {text:?}: expected a whole number of seconds from 1 to {MAX_INTERVAL_SECS}"
    )]
    Seconds {
        /// The value.
        text: String,
    },
    /// The session timeout does not exceed the keepalive interval.
    #[error(
        "{timeout} is not longer than keepalive_secs ({keepalive}); sessions would time out between keepalives"
    )]
    TimeoutNotAboveKeepalive {
        /// The timeout given.
        timeout: u64,
        /// The keepalive interval.
        keepalive: u64,
    },
    /// A number out of its range.
    #[error("invalid value {text:?}: expected {expected}")]
    Range {
        /// The value.
        text: String,
        /// The range, in words.
        expected: &'static str,
    },
    /// Two keys that must be ordered are not.
    #[error("{value} is not {relation} {other} ({other_value}); {why}")]
    Order {
        /// This key's value.
        value: String,
        /// "below", "less than", ...
        relation: &'static str,
        /// The other key.
        other: &'static str,
        /// Its value.
        other_value: String,
        /// What would go wrong.
        why: &'static str,
    },
    /// Not a valid handle.
    #[error("invalid handle {text:?}: {reason}")]
    Handle {
        /// The value.
        text: String,
        /// Why.
        reason: String,
    },
    /// An entry of `local_addrs` that is neither an IP address nor `IP:PORT`.
    #[error(
        "invalid local address {text:?}: expected \"auto\", or a list of IP addresses or IP:PORT"
    )]
    LocalAddr {
        /// The entry.
        text: String,
    },
    /// An entry of `emulate.peers` that is neither an IP address nor `IP:PORT`.
    #[error("invalid peer address {text:?}: expected an IP address or IP:PORT")]
    PeerAddr {
        /// The entry.
        text: String,
    },
    /// Too many entries.
    #[error("{count} entries; at most {max}")]
    TooMany {
        /// Given.
        count: usize,
        /// Allowed.
        max: usize,
    },
    /// A relation the overlay checks failed.
    #[error("{0}")]
    Overlay(&'static str),
    /// A seed that does not parse.
    #[error("invalid seed {text:?}: {error}")]
    Seed {
        /// The value.
        text: String,
        /// Why.
        error: PeerSpecError,
    },
    /// An empty path.
    #[error("must not be empty")]
    Empty,
    /// The value is not valid UTF-8.
    #[error("value is not valid UTF-8")]
    NotUnicode,
    /// The key has no default here and was not given.
    #[error(
        "not set, and there is no default (XDG_DATA_HOME and HOME are unset, relative or not UTF-8)"
    )]
    Missing,
}

/// Why the configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// One key's value is unknown or bad.
    #[error("config key '{key}': {error} ({origin})")]
    Key {
        /// The key.
        key: String,
        /// Which layer set it.
        origin: Origin,
        /// What is wrong (boxed: the variants carry the offending text).
        error: Box<KeyError>,
    },
    /// The config file is missing or is not valid TOML.
    #[error("config file {path}: {error}")]
    File {
        /// The file.
        path: PathBuf,
        /// The reason.
        error: config::ConfigError,
    },
    /// The layers could not be merged (not expected from these sources).
    #[error("config: {0}")]
    Merge(config::ConfigError),
}

/// The layer a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Built into peercall.
    Default,
    /// The config file.
    File(String),
    /// A `PEERCALL_*` environment variable.
    Env(String),
    /// A command-line flag.
    Flag(String),
}

impl Origin {
    /// The origin of `key` from the `config` crate's label; `file` is the config file
    /// as the user named it (the crate's label is a path relative to the working
    /// directory).
    fn of(key: &str, value: Option<&str>, file: Option<&Path>) -> Origin {
        match value {
            None | Some(ORIGIN_DEFAULT) => Origin::Default,
            Some(ORIGIN_ENV) => Origin::Env(format!(
                "{ENV_PREFIX}{}",
                key.replace('.', "_").to_uppercase()
            )),
            Some(o) => match o.strip_prefix(ORIGIN_FLAG) {
                Some(flag) => Origin::Flag(flag.to_owned()),
                None => {
                    Origin::File(file.map_or_else(|| o.to_owned(), |f| f.display().to_string()))
                }
            },
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in default"),
            Origin::File(path) => write!(f, "set in file {path}"),
            Origin::Env(var) => write!(f, "set by environment variable {var}"),
            Origin::Flag(flag) => write!(f, "set by flag --{flag}"),
        }
    }
}

/// Values given as command-line flags; each overrides the key of the same meaning.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--admin`.
    pub admin: Option<SocketAddr>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--log-level`.
    pub log_level: Option<LogLevel>,
}

/// Everything the settings are built from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The config file, if one was given (it must then exist).
    pub file: Option<PathBuf>,
    /// The `PEERCALL_*` environment variables (others are ignored).
    pub env: Vec<(OsString, OsString)>,
    /// Command-line flags.
    pub flags: Flags,
    /// The default data directory, computed from the environment.
    pub default_data_dir: Option<PathBuf>,
}

impl Sources {
    /// The process's environment, the given file and flags.
    pub fn from_process(file: Option<PathBuf>, flags: Flags) -> Sources {
        Sources {
            file,
            env: std::env::vars_os().collect(),
            flags,
            default_data_dir: default_data_dir(
                std::env::var_os("XDG_DATA_HOME"),
                std::env::var_os("HOME"),
            ),
        }
    }
}

/// `$XDG_DATA_HOME/peercall`, else `$HOME/.local/share/peercall` (the XDG base
/// directory default), else none. Relative or empty `XDG_DATA_HOME` is ignored, as
/// the XDG specification requires.
pub fn default_data_dir(
    xdg_data_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let absolute = |v: OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    if let Some(xdg) = xdg_data_home.and_then(absolute) {
        return Some(xdg.join("peercall"));
    }
    home.and_then(absolute)
        .map(|h| h.join(".local").join("share").join("peercall"))
}

/// A layer of plain values with one origin label: the built-in defaults and the flags.
#[derive(Debug, Clone)]
struct Layer(Map<String, Value>);

impl Layer {
    fn new() -> Layer {
        Layer(Map::new())
    }

    fn set(&mut self, key: &str, origin: &str, kind: impl Into<ValueKind>) {
        self.0
            .insert(key.to_owned(), Value::new(Some(&origin.to_owned()), kind));
    }
}

impl Source for Layer {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        Ok(self.0.clone())
    }
}

/// The built-in defaults as a layer (`data_dir` only when there is one).
fn defaults(data_dir: Option<&Path>) -> Layer {
    let mut l = Layer::new();
    let o = ORIGIN_DEFAULT;
    // A non-UTF-8 default cannot be carried as a config string; it then counts as
    // no default, and `data_dir` must be given.
    if let Some(dir) = data_dir.and_then(Path::to_str) {
        l.set("data_dir", o, dir);
    }
    l.set("listen", o, DEFAULT_LISTEN);
    l.set("admin", o, DEFAULT_ADMIN);
    l.set("role", o, Role::Auto.as_str());
    l.set("seeds", o, ValueKind::Array(Vec::new()));
    l.set("handle", o, "");
    l.set("local_addrs", o, LocalAddrs::AUTO);
    l.set("keepalive_secs", o, DEFAULT_KEEPALIVE_SECS);
    l.set("session_timeout_secs", o, DEFAULT_SESSION_TIMEOUT_SECS);
    l.set("state_save_secs", o, DEFAULT_STATE_SAVE_SECS);
    let d = OverlayConfig::default();
    l.set(
        "supernode_max_clients",
        o,
        u64::from(d.capacity.max_clients),
    );
    l.set(
        "supernode_attach_rate",
        o,
        u64::from(d.capacity.attach_rate),
    );
    l.set(
        "supernode_attach_burst",
        o,
        u64::from(d.capacity.attach_burst),
    );
    l.set(
        "bandwidth_mbps",
        o,
        kbps_to_mbps(d.resources.bandwidth_kbps),
    );
    l.set("record_ttl_secs", o, d.record_ttl.as_secs());
    l.set("record_refresh_secs", o, d.refresh_interval.as_secs());
    let e = d.election;
    l.set("election_min_uptime_secs", o, e.min_uptime.as_secs());
    l.set(
        "election_min_bandwidth_mbps",
        o,
        kbps_to_mbps(e.min_bandwidth_kbps),
    );
    l.set(
        "election_min_cpu_headroom_pct",
        o,
        u64::from(e.min_cpu_headroom_pct),
    );
    l.set(
        "election_high_watermark",
        o,
        permille_to_fraction(e.high_watermark),
    );
    l.set(
        "election_low_watermark",
        o,
        permille_to_fraction(e.low_watermark),
    );
    l.set(
        "election_max_promotions_per_min",
        o,
        u64::from(e.max_promotions_per_min),
    );
    l.set("election_min_supernodes", o, u64::from(e.min_supernodes));
    l.set(
        "election_contact_memory_secs",
        o,
        e.contact_memory.as_secs(),
    );
    l.set("log_format", o, LogFormat::default().as_str());
    l.set("log_level", o, LogLevel::default().as_str());
    l.set("debug_endpoints", o, false);
    let c = CallConfig::default();
    l.set("calls.auto_answer", o, c.auto_answer);
    l.set("calls.answer_play", o, "");
    l.set("calls.answer_record", o, "");
    l.set("calls.max_calls", o, c.max_calls as u64);
    l.set("calls.ring_timeout_secs", o, c.ring_timeout.as_secs());
    l.set("calls.connect_timeout_secs", o, c.connect_timeout.as_secs());
    l.set("calls.lost_timeout_secs", o, c.lost_timeout.as_secs());
    l.set("calls.redundancy", o, redundancy_str(c.redundancy));
    let r = RelayConfig::default();
    l.set("relay.enabled", o, r.enabled);
    l.set("relay.allow_private_targets", o, r.allow_private_targets);
    l.set("relay.max_channels", o, r.max_channels as u64);
    l.set(
        "relay.max_channels_per_client",
        o,
        r.max_channels_per_client as u64,
    );
    l.set(
        "relay.client_bytes_per_sec",
        o,
        u64::from(r.client_rate_bps),
    );
    l.set(
        "relay.client_burst_bytes",
        o,
        u64::from(r.client_burst_bytes),
    );
    l.set("relay.request_rate", o, u64::from(r.request_rate));
    l.set("relay.request_burst", o, u64::from(r.request_burst));
    l.set("relay.lifetime_secs", o, r.lifetime.as_secs());
    l.set("relay.idle_timeout_secs", o, r.idle_timeout.as_secs());
    l.set("emulate.delay_ms", o, 0u64);
    l.set("emulate.jitter_ms", o, 0u64);
    l.set("emulate.loss_pct", o, 0.0);
    l.set("emulate.seed", o, 0u64);
    l.set("emulate.peers", o, ValueKind::Array(Vec::new()));
    l.set("emulate.nat", o, NatMode::None.as_str());
    l.set("emulate.nat_timeout_secs", o, DEFAULT_NAT_TIMEOUT_SECS);
    l
}

fn flag_layer(flags: &Flags) -> Result<Layer, ConfigError> {
    let mut l = Layer::new();
    let origin = |flag: &str| format!("{ORIGIN_FLAG}{flag}");
    if let Some(dir) = &flags.data_dir {
        let text = dir.to_str().ok_or_else(|| ConfigError::Key {
            key: "data_dir".into(),
            origin: Origin::Flag("data-dir".into()),
            error: Box::new(KeyError::NotUnicode),
        })?;
        l.set("data_dir", &origin("data-dir"), text);
    }
    if let Some(a) = flags.listen {
        l.set("listen", &origin("listen"), a.to_string());
    }
    if let Some(a) = flags.admin {
        l.set("admin", &origin("admin"), a.to_string());
    }
    if let Some(f) = flags.log_format {
        l.set("log_format", &origin("log-format"), f.as_str());
    }
    if let Some(v) = flags.log_level {
        l.set("log_level", &origin("log-level"), v.as_str());
    }
    Ok(l)
}

/// The `PEERCALL_*` variables as `config`'s environment source expects them.
fn env_map(env: &[(OsString, OsString)]) -> Result<Map<String, String>, ConfigError> {
    let mut map = Map::new();
    for (name, value) in env {
        let name = name.to_string_lossy();
        let Some(key) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let value = value.to_str().ok_or_else(|| ConfigError::Key {
            key: key.to_lowercase(),
            origin: Origin::Env(name.to_string()),
            error: Box::new(KeyError::NotUnicode),
        })?;
        // `PEERCALL_CALLS_AUTO_ANSWER` is `calls.auto_answer`: the section's
        // name becomes a path, which the config crate nests like a TOML table.
        let section = SECTIONS.iter().find(|s| {
            key.len() > s.len()
                && key[..s.len()].eq_ignore_ascii_case(s)
                && key.as_bytes()[s.len()] == b'_'
        });
        let name = match section {
            Some(s) => format!("{ENV_PREFIX}{s}.{}", &key[s.len() + 1..]),
            None => name.into_owned(),
        };
        map.insert(name, value.to_owned());
    }
    Ok(map)
}

/// Loads the settings from all layers.
pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
    let mut builder = Layers::builder().add_source(defaults(sources.default_data_dir.as_deref()));
    if let Some(path) = &sources.file {
        // Read and parse the file on its own first, so its errors name the file.
        let file = File::from(path.as_path())
            .format(FileFormat::Toml)
            .required(true);
        file.collect().map_err(|error| ConfigError::File {
            path: path.clone(),
            error,
        })?;
        builder = builder.add_source(file);
    }
    let env = config::Environment::with_prefix(ENV_PREFIX.trim_end_matches('_'))
        .prefix_separator("_")
        .source(Some(env_map(&sources.env)?));
    let merged = builder
        .add_source(env)
        .add_source(flag_layer(&sources.flags)?)
        .build()
        .map_err(ConfigError::Merge)?;
    parse(
        merged.collect().map_err(ConfigError::Merge)?,
        sources.file.as_deref(),
    )
}

/// Parses merged values into settings.
fn parse(values: Map<String, Value>, file: Option<&Path>) -> Result<Settings, ConfigError> {
    let values = flatten(values, file)?;
    if let Some((key, value)) = values.iter().find(|(k, _)| !KEYS.contains(&k.as_str())) {
        return Err(ConfigError::Key {
            key: key.clone(),
            origin: Origin::of(key, value.origin(), file),
            error: Box::new(KeyError::Unknown),
        });
    }
    let p = Parser {
        values: &values,
        file,
    };
    let keepalive_secs = p.key("keepalive_secs", parse_secs)?;
    let session_timeout_secs = p.key("session_timeout_secs", |v| {
        let timeout = parse_secs(v)?;
        if timeout > keepalive_secs {
            Ok(timeout)
        } else {
            Err(KeyError::TimeoutNotAboveKeepalive {
                timeout: timeout.get(),
                keepalive: keepalive_secs.get(),
            })
        }
    })?;
    let record_ttl_secs = p.key("record_ttl_secs", |v| {
        let ttl = parse_secs(v)?;
        let max = peercall_crypto::record::MAX_RECORD_LIFETIME.as_secs();
        if ttl.get() > max {
            return Err(KeyError::Range {
                text: ttl.to_string(),
                expected: "at most 86400 seconds: storers refuse records that live longer than a day",
            });
        }
        Ok(ttl)
    })?;
    let record_refresh_secs = p.key("record_refresh_secs", |v| {
        let refresh = parse_secs(v)?;
        if refresh < record_ttl_secs {
            Ok(refresh)
        } else {
            Err(KeyError::Order {
                value: refresh.to_string(),
                relation: "less than",
                other: "record_ttl_secs",
                other_value: record_ttl_secs.to_string(),
                why: "the record would expire while its node lives",
            })
        }
    })?;
    let high_watermark = p.key("election_high_watermark", |v| parse_permille(v, false))?;
    let low_watermark = p.key("election_low_watermark", |v| {
        let low = parse_permille(v, true)?;
        if low < high_watermark {
            Ok(low)
        } else {
            Err(KeyError::Order {
                value: permille_to_fraction(low).to_string(),
                relation: "below",
                other: "election_high_watermark",
                other_value: permille_to_fraction(high_watermark).to_string(),
                why: "without the gap the tier would promote and demote in turn (no hysteresis)",
            })
        }
    })?;
    let election = overlay::ElectionConfig {
        min_uptime: Duration::from_secs(p.key("election_min_uptime_secs", |v| {
            parse_uint(
                v,
                0,
                MAX_MIN_UPTIME_SECS,
                "a whole number of seconds from 0 to 2592000",
            )
        })?),
        min_bandwidth_kbps: p.key("election_min_bandwidth_mbps", parse_mbps)?,
        min_cpu_headroom_pct: p.key("election_min_cpu_headroom_pct", |v| {
            parse_uint(v, 0, 100, "a whole percentage from 0 to 100").map(|n| n as u8)
        })?,
        high_watermark,
        low_watermark,
        max_promotions_per_min: p.key("election_max_promotions_per_min", |v| {
            parse_uint(
                v,
                0,
                u64::from(MAX_ELECTION_COUNT),
                "a whole number from 0 to 10000",
            )
            .map(|n| n as u32)
        })?,
        min_supernodes: p.key("election_min_supernodes", |v| {
            parse_uint(
                v,
                1,
                u64::from(MAX_ELECTION_COUNT),
                "a whole number from 1 to 10000",
            )
            .map(|n| n as u32)
        })?,
        contact_memory: Duration::from_secs(p.key("election_contact_memory_secs", |v| {
            parse_uint(v, 1, 3600, "a whole number of seconds from 1 to 3600")
        })?),
    };
    let settings = Settings {
        data_dir: p.key("data_dir", parse_path)?,
        listen: p.key("listen", parse_socket_addr)?,
        admin: p.key("admin", |v| {
            parse_socket_addr(v).and_then(LoopbackAddr::new)
        })?,
        role: p.key("role", parse_role)?,
        seeds: p.key("seeds", parse_seeds)?,
        handle: p.key("handle", parse_handle)?,
        local_addrs: p.key("local_addrs", parse_local_addrs)?,
        keepalive_secs,
        session_timeout_secs,
        state_save_secs: p.key("state_save_secs", parse_secs)?,
        supernode_max_clients: p.key("supernode_max_clients", parse_capacity)?,
        supernode_attach_rate: p.key("supernode_attach_rate", parse_capacity)?,
        supernode_attach_burst: p.key("supernode_attach_burst", parse_capacity)?,
        bandwidth_kbps: p.key("bandwidth_mbps", parse_mbps)?,
        record_ttl_secs,
        record_refresh_secs,
        election,
        log_format: p.key("log_format", parse_log_format)?,
        log_level: p.key("log_level", parse_log_level)?,
        debug_endpoints: p.key("debug_endpoints", parse_bool)?,
        calls: parse_calls(&p)?,
        relay: parse_relay(&p)?,
        emulate: parse_emulate(&p)?,
    };
    // The overlay's own check, as a backstop: every relation it checks is checked
    // above under our key names, so this only fails if the two drift apart.
    if let Err(e) = settings.overlay_config().validate() {
        return Err(ConfigError::Key {
            key: e.key.to_owned(),
            origin: Origin::Default,
            error: Box::new(KeyError::Overlay(e.reason)),
        });
    }
    Ok(settings)
}

/// The merged values by key, sorted (so the error reported does not depend on
/// hash order), a section's table spread out into `section.key` entries.
fn flatten(
    values: Map<String, Value>,
    file: Option<&Path>,
) -> Result<BTreeMap<String, Value>, ConfigError> {
    let mut flat = BTreeMap::new();
    for (key, value) in values {
        if !SECTIONS.contains(&key.as_str()) {
            flat.insert(key, value);
            continue;
        }
        let origin = Origin::of(&key, value.origin(), file);
        match value.kind {
            ValueKind::Table(table) => {
                for (inner, v) in table {
                    flat.insert(format!("{key}.{inner}"), v);
                }
            }
            other => {
                return Err(ConfigError::Key {
                    origin,
                    key,
                    error: Box::new(KeyError::Type {
                        expected: "a table of keys",
                        found: kind_name(&other),
                    }),
                });
            }
        }
    }
    Ok(flat)
}

/// Looks keys up and attaches the key and origin to errors.
struct Parser<'a> {
    values: &'a BTreeMap<String, Value>,
    file: Option<&'a Path>,
}

impl Parser<'_> {
    fn key<T>(
        &self,
        key: &'static str,
        parse: impl FnOnce(&Value) -> Result<T, KeyError>,
    ) -> Result<T, ConfigError> {
        let value = self.values.get(key).ok_or(ConfigError::Key {
            key: key.into(),
            origin: Origin::Default,
            error: Box::new(KeyError::Missing),
        })?;
        parse(value).map_err(|error| ConfigError::Key {
            key: key.into(),
            origin: Origin::of(key, value.origin(), self.file),
            error: Box::new(error),
        })
    }
}

fn parse_calls(p: &Parser<'_>) -> Result<CallSettings, ConfigError> {
    let timeout = |v: &Value| {
        parse_uint(
            v,
            1,
            MAX_CALL_TIMEOUT_SECS,
            "a whole number of seconds from 1 to 600",
        )
        // In range, so non-zero.
        .map(|n| NonZeroU64::new(n).unwrap_or(NonZeroU64::MIN))
    };
    Ok(CallSettings {
        auto_answer: p.key("calls.auto_answer", parse_bool)?,
        answer_play: p.key("calls.answer_play", parse_optional_path)?,
        answer_record: p.key("calls.answer_record", parse_optional_path)?,
        max_calls: p.key("calls.max_calls", |v| {
            parse_uint(v, 1, MAX_CALLS, "a whole number from 1 to 64").map(|n| n as usize)
        })?,
        ring_timeout_secs: p.key("calls.ring_timeout_secs", timeout)?,
        connect_timeout_secs: p.key("calls.connect_timeout_secs", timeout)?,
        lost_timeout_secs: p.key("calls.lost_timeout_secs", timeout)?,
        redundancy: p.key("calls.redundancy", |v| {
            const ALLOWED: &str = "auto, always, never";
            let s = text(v, ALLOWED)?;
            [
                RedundancyMode::Auto,
                RedundancyMode::Always,
                RedundancyMode::Never,
            ]
            .into_iter()
            .find(|m| redundancy_str(*m) == s)
            .ok_or_else(|| choice(s, ALLOWED))
        })?,
    })
}

fn parse_relay(p: &Parser<'_>) -> Result<RelayConfig, ConfigError> {
    let count = |v: &Value| parse_uint(v, 1, MAX_RELAY_COUNT, "a whole number from 1 to 10000000");
    let bytes = |v: &Value| {
        parse_uint(
            v,
            1,
            MAX_RELAY_BYTES,
            "a whole number of bytes from 1 to 1000000000",
        )
        // In range, so within u32.
        .map(|n| n as u32)
    };
    let secs = |v: &Value| parse_secs(v).map(|n| Duration::from_secs(n.get()));
    Ok(RelayConfig {
        enabled: p.key("relay.enabled", parse_bool)?,
        allow_private_targets: p.key("relay.allow_private_targets", parse_bool)?,
        max_channels: p.key("relay.max_channels", count)? as usize,
        max_channels_per_client: p.key("relay.max_channels_per_client", count)? as usize,
        client_rate_bps: p.key("relay.client_bytes_per_sec", bytes)?,
        client_burst_bytes: p.key("relay.client_burst_bytes", bytes)?,
        request_rate: p.key("relay.request_rate", count)? as u32,
        request_burst: p.key("relay.request_burst", count)? as u32,
        lifetime: p.key("relay.lifetime_secs", secs)?,
        idle_timeout: p.key("relay.idle_timeout_secs", secs)?,
    })
}

fn parse_emulate(p: &Parser<'_>) -> Result<EmulateSettings, ConfigError> {
    let delay_ms = p.key("emulate.delay_ms", |v| {
        parse_uint(
            v,
            0,
            MAX_DELAY_MS,
            "a whole number of milliseconds from 0 to 10000",
        )
    })?;
    let jitter_ms = p.key("emulate.jitter_ms", |v| {
        let jitter = parse_uint(
            v,
            0,
            MAX_DELAY_MS,
            "a whole number of milliseconds from 0 to 10000",
        )?;
        if jitter <= delay_ms {
            Ok(jitter)
        } else {
            Err(KeyError::Order {
                value: jitter.to_string(),
                relation: "at most",
                other: "emulate.delay_ms",
                other_value: delay_ms.to_string(),
                why: "the jitter is spread around the delay, and a delay cannot go below zero",
            })
        }
    })?;
    Ok(EmulateSettings {
        delay_ms,
        jitter_ms,
        loss_ppm: p.key("emulate.loss_pct", |v| {
            const EXPECTED: &str = "a percentage from 0 to 100, such as 1.5";
            let (n, shown) = number(v, EXPECTED)?;
            n.filter(|n| (0.0..=100.0).contains(n))
                // In range, so the product is at most 1e6.
                .map(|n| (n * 10_000.0).round() as u32)
                .ok_or(KeyError::Range {
                    text: shown,
                    expected: EXPECTED,
                })
        })?,
        seed: p.key("emulate.seed", |v| {
            parse_uint(
                v,
                0,
                u64::MAX,
                "a whole number from 0 (a random seed, logged) to 18446744073709551615",
            )
        })?,
        peers: p.key("emulate.peers", parse_peers)?,
        nat: p.key("emulate.nat", |v| {
            const ALLOWED: &str = "none, port-restricted";
            let s = text(v, ALLOWED)?;
            [NatMode::None, NatMode::PortRestricted]
                .into_iter()
                .find(|m| m.as_str() == s)
                .ok_or_else(|| choice(s, ALLOWED))
        })?,
        nat_timeout_secs: p.key("emulate.nat_timeout_secs", parse_secs)?.get(),
    })
}

/// `true` or `false` (TOML booleans, or the words from the environment).
fn parse_bool(v: &Value) -> Result<bool, KeyError> {
    const EXPECTED: &str = "true or false";
    match &v.kind {
        ValueKind::Boolean(b) => Ok(*b),
        ValueKind::String(s) => match s.trim() {
            "true" => Ok(true),
            "false" => Ok(false),
            other => Err(choice(other, EXPECTED)),
        },
        other => Err(KeyError::Type {
            expected: EXPECTED,
            found: kind_name(other),
        }),
    }
}

/// A path, or `""` for none.
fn parse_optional_path(v: &Value) -> Result<Option<PathBuf>, KeyError> {
    match text(v, "a path string (\"\" for none)")? {
        "" => Ok(None),
        s => Ok(Some(PathBuf::from(s))),
    }
}

fn kind_name(kind: &ValueKind) -> &'static str {
    match kind {
        ValueKind::Nil => "nothing",
        ValueKind::Boolean(_) => "a boolean",
        ValueKind::I64(_) | ValueKind::I128(_) | ValueKind::U64(_) | ValueKind::U128(_) => {
            "an integer"
        }
        ValueKind::Float(_) => "a float",
        ValueKind::String(_) => "a string",
        ValueKind::Table(_) => "a table",
        ValueKind::Array(_) => "a list",
    }
}

fn text<'v>(v: &'v Value, expected: &'static str) -> Result<&'v str, KeyError> {
    match &v.kind {
        ValueKind::String(s) => Ok(s),
        other => Err(KeyError::Type {
            expected,
            found: kind_name(other),
        }),
    }
}

fn parse_path(v: &Value) -> Result<PathBuf, KeyError> {
    match text(v, "a path string")? {
        "" => Err(KeyError::Empty),
        s => Ok(PathBuf::from(s)),
    }
}

fn parse_socket_addr(v: &Value) -> Result<SocketAddr, KeyError> {
    let s = text(v, "a socket address string such as \"127.0.0.1:7600\"")?;
    s.trim().parse().map_err(|error| KeyError::SocketAddr {
        text: s.to_owned(),
        error,
    })
}

fn choice(s: &str, allowed: &'static str) -> KeyError {
    KeyError::Choice {
        text: s.to_owned(),
        allowed,
    }
}

fn parse_role(v: &Value) -> Result<Role, KeyError> {
    const ALLOWED: &str = "auto, ordinary, supernode";
    let s = text(v, ALLOWED)?;
    [Role::Auto, Role::Ordinary, Role::Supernode]
        .into_iter()
        .find(|r| r.as_str() == s)
        .ok_or_else(|| choice(s, ALLOWED))
}

fn parse_log_format(v: &Value) -> Result<LogFormat, KeyError> {
    const ALLOWED: &str = "text, json";
    let s = text(v, ALLOWED)?;
    [LogFormat::Text, LogFormat::Json]
        .into_iter()
        .find(|f| f.as_str() == s)
        .ok_or_else(|| choice(s, ALLOWED))
}

fn parse_log_level(v: &Value) -> Result<LogLevel, KeyError> {
    const ALLOWED: &str = "off, error, warn, info, debug, trace";
    let s = text(v, ALLOWED)?;
    [
        LogLevel::Off,
        LogLevel::Error,
        LogLevel::Warn,
        LogLevel::Info,
        LogLevel::Debug,
        LogLevel::Trace,
    ]
    .into_iter()
    .find(|l| l.as_str() == s)
    .ok_or_else(|| choice(s, ALLOWED))
}

fn parse_secs(v: &Value) -> Result<NonZeroU64, KeyError> {
    let (n, shown) = match &v.kind {
        ValueKind::I64(n) => (u64::try_from(*n).ok(), n.to_string()),
        ValueKind::U64(n) => (Some(*n), n.to_string()),
        ValueKind::I128(n) => (u64::try_from(*n).ok(), n.to_string()),
        ValueKind::U128(n) => (u64::try_from(*n).ok(), n.to_string()),
        // Environment variables are always strings.
        ValueKind::String(s) => (s.trim().parse().ok(), s.clone()),
        other => {
            return Err(KeyError::Type {
                expected: "a whole number of seconds",
                found: kind_name(other),
            });
        }
    };
    n.filter(|n| *n <= MAX_INTERVAL_SECS)
        .and_then(NonZeroU64::new)
        .ok_or(KeyError::Seconds { text: shown })
}

/// A whole number from `min` to `max` (integers, or strings from the environment).
fn parse_uint(v: &Value, min: u64, max: u64, expected: &'static str) -> Result<u64, KeyError> {
    let (n, shown) = match &v.kind {
        ValueKind::I64(n) => (u64::try_from(*n).ok(), n.to_string()),
        ValueKind::U64(n) => (Some(*n), n.to_string()),
        ValueKind::I128(n) => (u64::try_from(*n).ok(), n.to_string()),
        ValueKind::U128(n) => (u64::try_from(*n).ok(), n.to_string()),
        ValueKind::String(s) => (s.trim().parse().ok(), s.clone()),
        other => {
            return Err(KeyError::Type {
                expected,
                found: kind_name(other),
            });
        }
    };
    n.filter(|n| (min..=max).contains(n))
        .ok_or(KeyError::Range {
            text: shown,
            expected,
        })
}

/// A number, whole or not (TOML integers and floats, or environment strings).
fn number(v: &Value, expected: &'static str) -> Result<(Option<f64>, String), KeyError> {
    Ok(match &v.kind {
        // Config values are far below 2^53, so the conversions are exact.
        ValueKind::I64(n) => (Some(*n as f64), n.to_string()),
        ValueKind::U64(n) => (Some(*n as f64), n.to_string()),
        ValueKind::I128(n) => (Some(*n as f64), n.to_string()),
        ValueKind::U128(n) => (Some(*n as f64), n.to_string()),
        ValueKind::Float(f) => (Some(*f), f.to_string()),
        ValueKind::String(s) => (s.trim().parse::<f64>().ok(), s.clone()),
        other => {
            return Err(KeyError::Type {
                expected,
                found: kind_name(other),
            });
        }
    })
}

/// Mbit/s (0 to [`MAX_BANDWIDTH_MBPS`], fractions allowed) as kbit/s.
fn parse_mbps(v: &Value) -> Result<u32, KeyError> {
    const EXPECTED: &str = "a number of Mbit/s from 0 to 100000";
    let (n, shown) = number(v, EXPECTED)?;
    n.filter(|n| (0.0..=MAX_BANDWIDTH_MBPS).contains(n))
        // In range, so the product fits a u32 (at most 1e8).
        .map(|n| (n * 1000.0).round() as u32)
        .ok_or(KeyError::Range {
            text: shown,
            expected: EXPECTED,
        })
}

/// kbit/s as the Mbit/s the config speaks.
fn kbps_to_mbps(kbps: u32) -> f64 {
    f64::from(kbps) / 1000.0
}

/// A load fraction of at most 1 (above 0 unless `zero_ok`) as per mille, the
/// overlay's unit.
fn parse_permille(v: &Value, zero_ok: bool) -> Result<u16, KeyError> {
    let expected = if zero_ok {
        "a fraction of capacity from 0 to 1, such as 0.3"
    } else {
        "a fraction of capacity above 0 and at most 1, such as 0.7"
    };
    let (n, shown) = number(v, expected)?;
    n.filter(|n| (0.0..=1.0).contains(n) && (zero_ok || *n > 0.0))
        // In [0, 1], so the product is in [0, 1000].
        .map(|n| (n * 1000.0).round() as u16)
        .ok_or(KeyError::Range {
            text: shown,
            expected,
        })
}

/// Per mille as the fraction the config speaks.
fn permille_to_fraction(permille: u16) -> f64 {
    f64::from(permille) / 1000.0
}

fn parse_capacity(v: &Value) -> Result<NonZeroU32, KeyError> {
    let n = parse_uint(
        v,
        1,
        u64::from(MAX_CAPACITY),
        "a whole number from 1 to 1000000",
    )?;
    // In range, so non-zero and within u32.
    Ok(NonZeroU32::new(n as u32).unwrap_or(NonZeroU32::MIN))
}

fn parse_handle(v: &Value) -> Result<Option<Handle>, KeyError> {
    match text(v, "a handle string (\"\" for none)")?.trim() {
        "" => Ok(None),
        h => Handle::new(h).map(Some).map_err(|e| KeyError::Handle {
            text: h.to_owned(),
            reason: e.to_string(),
        }),
    }
}

fn parse_local_addr(s: &str) -> Result<SocketAddr, KeyError> {
    let s = s.trim();
    s.parse::<SocketAddr>()
        // Port 0 stands for "the bound port".
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 0)))
        .map_err(|_| KeyError::LocalAddr { text: s.to_owned() })
}

fn parse_local_addrs(v: &Value) -> Result<LocalAddrs, KeyError> {
    const EXPECTED: &str = "\"auto\" or a list of IP addresses or IP:PORT";
    let addrs: Vec<SocketAddr> = match &v.kind {
        ValueKind::String(s) if s.trim() == LocalAddrs::AUTO => return Ok(LocalAddrs::Auto),
        ValueKind::String(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(parse_local_addr)
            .collect::<Result<_, _>>()?,
        ValueKind::Array(items) => items
            .iter()
            .map(|i| parse_local_addr(text(i, EXPECTED)?))
            .collect::<Result<_, _>>()?,
        other => {
            return Err(KeyError::Type {
                expected: EXPECTED,
                found: kind_name(other),
            });
        }
    };
    if addrs.len() > MAX_LOCAL_ADDRS {
        return Err(KeyError::TooMany {
            count: addrs.len(),
            max: MAX_LOCAL_ADDRS,
        });
    }
    Ok(LocalAddrs::List(addrs))
}

/// `emulate.peers`: IP addresses (every port) or `IP:PORT`; empty for all.
fn parse_peers(v: &Value) -> Result<Vec<PeerMatch>, KeyError> {
    const EXPECTED: &str = "a list of IP addresses or IP:PORT (empty: every destination)";
    let one = |s: &str| {
        let s = s.trim();
        s.parse::<SocketAddr>()
            // Port 0 matches every port of that host.
            .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 0)))
            .map(PeerMatch)
            .map_err(|_| KeyError::PeerAddr { text: s.to_owned() })
    };
    let peers: Vec<PeerMatch> = match &v.kind {
        ValueKind::String(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(one)
            .collect::<Result<_, _>>()?,
        ValueKind::Array(items) => items
            .iter()
            .map(|i| one(text(i, EXPECTED)?))
            .collect::<Result<_, _>>()?,
        other => {
            return Err(KeyError::Type {
                expected: EXPECTED,
                found: kind_name(other),
            });
        }
    };
    if peers.len() > MAX_PEERS {
        return Err(KeyError::TooMany {
            count: peers.len(),
            max: MAX_PEERS,
        });
    }
    Ok(peers)
}

fn parse_seed(s: &str) -> Result<PeerSpec, KeyError> {
    s.parse().map_err(|error| KeyError::Seed {
        text: s.to_owned(),
        error,
    })
}

fn parse_seeds(v: &Value) -> Result<Vec<PeerSpec>, KeyError> {
    const EXPECTED: &str = "a list of \"HOST:PORT\" or \"PEERKEY@HOST:PORT\" strings";
    match &v.kind {
        ValueKind::Array(items) => items
            .iter()
            .map(|i| parse_seed(text(i, EXPECTED)?))
            .collect(),
        // A comma-separated list, as environment variables give it.
        ValueKind::String(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(parse_seed)
            .collect(),
        other => Err(KeyError::Type {
            expected: EXPECTED,
            found: kind_name(other),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const DATA: &str = "/var/lib/peercall-test";
    const KEY: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn sources() -> Sources {
        Sources {
            default_data_dir: Some(DATA.into()),
            ..Sources::default()
        }
    }

    fn with_env(vars: &[(&str, &str)]) -> Sources {
        Sources {
            env: vars
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            ..sources()
        }
    }

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn with_file(f: &tempfile::NamedTempFile) -> Sources {
        Sources {
            file: Some(f.path().to_owned()),
            ..sources()
        }
    }

    fn key_error(sources: &Sources) -> (String, Origin, KeyError) {
        match load(sources).unwrap_err() {
            ConfigError::Key { key, origin, error } => (key, origin, *error),
            other => panic!("expected a key error, got {other}"),
        }
    }

    fn defaults_expected() -> Settings {
        Settings {
            data_dir: DATA.into(),
            listen: DEFAULT_LISTEN.parse().unwrap(),
            admin: LoopbackAddr::new(DEFAULT_ADMIN.parse().unwrap()).unwrap(),
            role: Role::Auto,
            seeds: vec![],
            handle: None,
            local_addrs: LocalAddrs::Auto,
            keepalive_secs: NonZeroU64::new(DEFAULT_KEEPALIVE_SECS).unwrap(),
            session_timeout_secs: NonZeroU64::new(DEFAULT_SESSION_TIMEOUT_SECS).unwrap(),
            state_save_secs: NonZeroU64::new(DEFAULT_STATE_SAVE_SECS).unwrap(),
            supernode_max_clients: NonZeroU32::new(200).unwrap(),
            supernode_attach_rate: NonZeroU32::new(20).unwrap(),
            supernode_attach_burst: NonZeroU32::new(40).unwrap(),
            bandwidth_kbps: 0,
            record_ttl_secs: NonZeroU64::new(120).unwrap(),
            record_refresh_secs: NonZeroU64::new(60).unwrap(),
            election: overlay::ElectionConfig {
                min_uptime: Duration::from_secs(3600),
                min_bandwidth_kbps: 5_000,
                min_cpu_headroom_pct: 50,
                high_watermark: 700,
                low_watermark: 300,
                max_promotions_per_min: 6,
                min_supernodes: 3,
                contact_memory: Duration::from_secs(180),
            },
            log_format: LogFormat::Text,
            log_level: LogLevel::Info,
            debug_endpoints: false,
            calls: CallSettings {
                auto_answer: false,
                answer_play: None,
                answer_record: None,
                max_calls: 1,
                ring_timeout_secs: NonZeroU64::new(30).unwrap(),
                connect_timeout_secs: NonZeroU64::new(10).unwrap(),
                lost_timeout_secs: NonZeroU64::new(10).unwrap(),
                redundancy: RedundancyMode::Auto,
            },
            relay: RelayConfig::default(),
            emulate: EmulateSettings {
                nat_timeout_secs: DEFAULT_NAT_TIMEOUT_SECS,
                ..EmulateSettings::default()
            },
        }
    }

    #[test]
    fn call_and_relay_sections_parse_from_file_and_environment() {
        let f = toml_file(
            "[calls]\nauto_answer = true\nanswer_record = \"/tmp/x.wav\"\nmax_calls = 2\n\
             redundancy = \"always\"\n[relay]\nallow_private_targets = true\nmax_channels = 10\n",
        );
        let s = load(&with_file(&f)).unwrap();
        assert!(s.calls.auto_answer);
        assert_eq!(s.calls.answer_record, Some(PathBuf::from("/tmp/x.wav")));
        assert_eq!(s.calls.answer_play, None);
        let c = s.calls.call_config();
        assert_eq!((c.max_calls, c.redundancy), (2, RedundancyMode::Always));
        assert_eq!(
            c.ring_timeout,
            Duration::from_secs(30),
            "untouched keys keep defaults"
        );
        assert!(s.relay.allow_private_targets);
        assert_eq!(s.relay.max_channels, 10);
        assert!(s.relay.enabled);

        let mut src = with_file(&f);
        src.env = vec![
            ("PEERCALL_CALLS_AUTO_ANSWER".into(), "false".into()),
            ("PEERCALL_RELAY_IDLE_TIMEOUT_SECS".into(), "5".into()),
        ];
        let s = load(&src).unwrap();
        assert!(!s.calls.auto_answer, "the environment wins over the file");
        assert_eq!(s.calls.max_calls, 2);
        assert_eq!(s.relay.idle_timeout, Duration::from_secs(5));

        let (key, origin, error) = key_error(&with_env(&[("PEERCALL_CALLS_AUTO_ANSWER", "yes")]));
        assert_eq!(key, "calls.auto_answer");
        assert_eq!(origin, Origin::Env("PEERCALL_CALLS_AUTO_ANSWER".into()));
        assert!(matches!(error, KeyError::Choice { .. }), "{error}");
        let msg = load(&with_env(&[("PEERCALL_CALLS_MAX_CALLS", "0")]))
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("config key 'calls.max_calls': "), "{msg}");
        let f = toml_file("[relay]\nallow_private = true\n");
        assert_eq!(
            key_error(&with_file(&f)),
            (
                "relay.allow_private".to_owned(),
                Origin::File(f.path().display().to_string()),
                KeyError::Unknown
            )
        );
        let f = toml_file("calls = 3\n");
        assert!(matches!(
            key_error(&with_file(&f)),
            (k, _, KeyError::Type { .. }) if k == "calls"
        ));
        let f = toml_file("[relay]\nclient_bytes_per_sec = 0\n");
        assert_eq!(key_error(&with_file(&f)).0, "relay.client_bytes_per_sec");
        let f = toml_file("[calls]\nredundancy = \"sometimes\"\n");
        assert_eq!(key_error(&with_file(&f)).0, "calls.redundancy");
    }

    #[test]
    fn emulate_section_parses_and_bad_values_name_the_key() {
        let f = toml_file(
            "[emulate]\ndelay_ms = 30\njitter_ms = 10\nloss_pct = 1.5\nseed = 42\n\
             peers = [\"127.0.0.2\", \"127.0.0.3:7600\"]\nnat = \"port-restricted\"\n\
             nat_timeout_secs = 20\n",
        );
        let e = load(&with_file(&f)).unwrap().emulate;
        assert_eq!(
            (e.delay_ms, e.jitter_ms, e.loss_ppm, e.seed),
            (30, 10, 15_000, 42)
        );
        assert_eq!(
            e.peers,
            vec![
                PeerMatch("127.0.0.2:0".parse().unwrap()),
                PeerMatch("127.0.0.3:7600".parse().unwrap())
            ]
        );
        assert_eq!((e.nat, e.nat_timeout_secs), (NatMode::PortRestricted, 20));
        assert!(e.is_active() && e.impairs());
        let s = load(&with_env(&[
            ("PEERCALL_EMULATE_DELAY_MS", "20"),
            ("PEERCALL_EMULATE_PEERS", "10.0.0.1, 10.0.0.2:1"),
            ("PEERCALL_DEBUG_ENDPOINTS", "true"),
        ]))
        .unwrap();
        assert_eq!((s.emulate.delay_ms, s.emulate.peers.len()), (20, 2));
        assert!(s.debug_endpoints, "not taken for a key of a section");
        assert!(!sources_default_emulates());

        for (text, key, why) in [
            ("delay_ms = 10001", "emulate.delay_ms", "from 0 to 10000"),
            (
                "delay_ms = 10\njitter_ms = 11",
                "emulate.jitter_ms",
                "at most emulate.delay_ms",
            ),
            (
                "loss_pct = 101",
                "emulate.loss_pct",
                "percentage from 0 to 100",
            ),
            ("loss_pct = -1", "emulate.loss_pct", "percentage"),
            ("seed = -3", "emulate.seed", "whole number"),
            (
                "peers = [\"nowhere\"]",
                "emulate.peers",
                "invalid peer address \"nowhere\"",
            ),
            (
                "nat = \"symmetric\"",
                "emulate.nat",
                "none, port-restricted",
            ),
            (
                "nat_timeout_secs = 0",
                "emulate.nat_timeout_secs",
                "seconds from 1",
            ),
            ("bogus = 1", "emulate.bogus", "unknown key"),
        ] {
            let f = toml_file(&format!("[emulate]\n{text}\n"));
            let (k, origin, error) = key_error(&with_file(&f));
            assert_eq!(k, key, "{text}");
            assert!(matches!(origin, Origin::File(_)), "{text}");
            assert!(error.to_string().contains(why), "{text}: {error}");
        }
    }

    fn sources_default_emulates() -> bool {
        load(&sources()).unwrap().emulate.is_active()
    }

    #[test]
    fn no_file_no_env_no_flags_gives_the_defaults() {
        assert_eq!(load(&sources()).unwrap(), defaults_expected());
    }

    #[test]
    fn default_interval_settings_match_the_engine() {
        use rand::rngs::OsRng;
        let engine =
            peercall_engine::Config::new(peercall_crypto::Identity::generate(&mut OsRng), [0; 32]);
        let ours = defaults_expected();
        assert_eq!(ours.keepalive(), engine.keepalive_interval);
        assert_eq!(ours.session_timeout(), engine.session_timeout);
        assert_eq!(ours.role, engine.role);
        let (ours, theirs) = (ours.overlay_config(), engine.overlay);
        assert_eq!(ours.capacity, theirs.capacity);
        assert_eq!(ours.resources, theirs.resources);
        assert_eq!(ours.election, theirs.election);
        assert_eq!(ours.record_ttl, theirs.record_ttl);
        assert_eq!(ours.refresh_interval, theirs.refresh_interval);
        assert_eq!(ours.handle, theirs.handle);
    }

    #[test]
    fn overlay_keys_parse_into_the_overlay_config() {
        let f = toml_file(
            "handle = \"alice\"\nlocal_addrs = [\"10.0.0.2\", \"198.51.100.7:9000\"]\n\
             supernode_max_clients = 50\nsupernode_attach_rate = 5\nsupernode_attach_burst = 7\n\
             bandwidth_mbps = 2.5\nrecord_ttl_secs = 20\nrecord_refresh_secs = 5\n\
             election_min_uptime_secs = 0\nelection_min_bandwidth_mbps = 1\n\
             election_min_cpu_headroom_pct = 10\nelection_high_watermark = 0.9\n\
             election_low_watermark = 0\nelection_max_promotions_per_min = 0\n\
             election_min_supernodes = 1\nstate_save_secs = 1\n",
        );
        let s = load(&with_file(&f)).unwrap();
        assert_eq!(s.handle, Some(Handle::new("alice").unwrap()));
        assert_eq!(
            s.local_addrs,
            LocalAddrs::List(vec![
                "10.0.0.2:0".parse().unwrap(),
                "198.51.100.7:9000".parse().unwrap()
            ])
        );
        assert_eq!(s.state_save(), Duration::from_secs(1));
        let o = s.overlay_config();
        assert_eq!(o.handle.as_ref().map(Handle::as_str), Some("alice"));
        assert_eq!(
            (
                o.capacity.max_clients,
                o.capacity.attach_rate,
                o.capacity.attach_burst
            ),
            (50, 5, 7)
        );
        assert_eq!(o.resources.bandwidth_kbps, 2_500);
        assert_eq!(o.record_ttl, Duration::from_secs(20));
        assert_eq!(o.refresh_interval, Duration::from_secs(5));
        assert_eq!(o.election.min_uptime, Duration::ZERO);
        assert_eq!(o.election.min_bandwidth_kbps, 1_000);
        assert_eq!(o.election.min_cpu_headroom_pct, 10);
        assert_eq!(
            (o.election.high_watermark, o.election.low_watermark),
            (900, 0)
        );
        assert_eq!(o.election.max_promotions_per_min, 0);
        assert_eq!(o.election.min_supernodes, 1);
        o.validate().unwrap();

        // Environment spellings.
        let s = load(&with_env(&[
            ("PEERCALL_LOCAL_ADDRS", "fd00::2, 10.0.0.3"),
            ("PEERCALL_ELECTION_HIGH_WATERMARK", "0.8"),
            ("PEERCALL_BANDWIDTH_MBPS", "100"),
            ("PEERCALL_HANDLE", "bob.smith"),
        ]))
        .unwrap();
        assert_eq!(
            s.local_addrs,
            LocalAddrs::List(vec![
                "[fd00::2]:0".parse().unwrap(),
                "10.0.0.3:0".parse().unwrap()
            ])
        );
        assert_eq!(s.election.high_watermark, 800);
        assert_eq!(s.bandwidth_kbps, 100_000);
        let s = load(&with_env(&[("PEERCALL_LOCAL_ADDRS", "")])).unwrap();
        assert_eq!(s.local_addrs, LocalAddrs::List(vec![]));
    }

    #[test]
    fn bad_overlay_values_name_the_key_and_the_reason() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "PEERCALL_HANDLE",
                "Alice",
                "must start with a lowercase letter",
            ),
            ("PEERCALL_HANDLE", "a b", "only a-z"),
            ("PEERCALL_SUPERNODE_MAX_CLIENTS", "0", "from 1 to 1000000"),
            ("PEERCALL_SUPERNODE_ATTACH_RATE", "-3", "from 1 to 1000000"),
            ("PEERCALL_BANDWIDTH_MBPS", "-1", "Mbit/s"),
            ("PEERCALL_BANDWIDTH_MBPS", "fast", "Mbit/s"),
            (
                "PEERCALL_ELECTION_MIN_CPU_HEADROOM_PCT",
                "101",
                "percentage",
            ),
            ("PEERCALL_ELECTION_HIGH_WATERMARK", "0", "above 0"),
            ("PEERCALL_ELECTION_HIGH_WATERMARK", "1.5", "at most 1"),
            ("PEERCALL_ELECTION_LOW_WATERMARK", "0.7", "hysteresis"),
            (
                "PEERCALL_RECORD_REFRESH_SECS",
                "120",
                "expire while its node lives",
            ),
            ("PEERCALL_RECORD_TTL_SECS", "86401", "1 to 86400"),
            (
                "PEERCALL_LOCAL_ADDRS",
                "10.0.0.1, nope",
                "invalid local address \"nope\"",
            ),
            ("PEERCALL_STATE_SAVE_SECS", "0", "seconds from 1"),
        ];
        for (var, value, reason) in cases {
            let msg = load(&with_env(&[(var, value)])).unwrap_err().to_string();
            let key = var.trim_start_matches(ENV_PREFIX).to_lowercase();
            assert!(
                msg.starts_with(&format!("config key '{key}': ")),
                "{var}={value}: {msg}"
            );
            assert!(msg.contains(reason), "{var}={value}: {msg}");
        }
        let f = toml_file(
            "local_addrs = [\"1.1.1.1\", \"1.1.1.2\", \"1.1.1.3\", \"1.1.1.4\", \"1.1.1.5\", \"1.1.1.6\", \"1.1.1.7\", \"1.1.1.8\", \"1.1.1.9\"]\n",
        );
        let (key, _, error) = key_error(&with_file(&f));
        assert_eq!(key, "local_addrs");
        assert_eq!(error, KeyError::TooMany { count: 9, max: 8 });
        let f = toml_file("election_min_supernodes = true\n");
        assert!(matches!(
            key_error(&with_file(&f)).2,
            KeyError::Type {
                found: "a boolean",
                ..
            }
        ));
    }

    #[test]
    fn configs_default_toml_documents_every_key_with_the_builtin_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/default.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        // The file on its own (no built-in layer) plus the computed data_dir must give
        // exactly the built-in defaults.
        let mut data = Layer::new();
        data.set("data_dir", ORIGIN_DEFAULT, DATA);
        let only_file = Layers::builder()
            .add_source(data)
            .add_source(File::from_str(&text, FileFormat::Toml))
            .build()
            .unwrap();
        let table = only_file.collect().unwrap();
        for key in KEYS {
            if let Some((section, inner)) = key.split_once('.') {
                let ValueKind::Table(t) = &table[section].kind else {
                    panic!("[{section}] is a table in configs/default.toml");
                };
                assert!(
                    t.contains_key(inner),
                    "{key} is set in configs/default.toml"
                );
                assert!(text.contains(&format!("\n[{section}]\n")));
                assert!(text.contains(&format!("\n{inner} = ")), "{key}");
            } else if key == "data_dir" {
                // Its default depends on the environment: documented as a comment.
                assert!(text.contains("\n# data_dir = "), "data_dir documented");
            } else {
                assert!(
                    table.contains_key(key),
                    "{key} is set in configs/default.toml"
                );
                assert!(text.contains(&format!("\n{key} = ")));
            }
        }
        assert_eq!(parse(table, None).unwrap(), defaults_expected());
    }

    #[test]
    fn file_overrides_defaults() {
        let f = toml_file(&format!(
            "listen = \"127.0.0.1:9000\"\nrole = \"supernode\"\nseeds = [\"{KEY}@10.0.0.1:7600\", \"seed.example.org:7600\"]\nkeepalive_secs = 5\nlog_format = \"json\"\n"
        ));
        let s = load(&with_file(&f)).unwrap();
        assert_eq!(s.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(s.role, Role::Supernode);
        assert_eq!(s.seeds.len(), 2);
        assert_eq!(s.seeds[0].key, Some(KEY.parse().unwrap()));
        assert_eq!(s.keepalive(), Duration::from_secs(5));
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(
            s.admin.get(),
            DEFAULT_ADMIN.parse().unwrap(),
            "untouched keys keep defaults"
        );
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let f = toml_file(
            "listen = \"127.0.0.1:9000\"\nlog_level = \"warn\"\nadmin = \"127.0.0.1:9001\"\n",
        );
        let mut src = with_file(&f);
        src.env = vec![
            ("PEERCALL_LISTEN".into(), "127.0.0.1:9100".into()),
            ("PEERCALL_LOG_LEVEL".into(), "debug".into()),
            ("PEERCALL_SEEDS".into(), "10.0.0.1:1, 10.0.0.2:2".into()),
            ("PEERCALL_KEEPALIVE_SECS".into(), "3".into()),
            ("UNRELATED".into(), "ignored".into()),
        ];
        let s = load(&src).unwrap();
        assert_eq!(s.listen, "127.0.0.1:9100".parse().unwrap());
        assert_eq!(s.log_level, LogLevel::Debug);
        assert_eq!(s.admin.get(), "127.0.0.1:9001".parse().unwrap());
        assert_eq!(s.seeds.len(), 2);
        assert_eq!(s.keepalive_secs.get(), 3);

        src.flags = Flags {
            data_dir: Some("/tmp/flag-dir".into()),
            listen: Some("127.0.0.1:9200".parse().unwrap()),
            admin: Some("[::1]:9201".parse().unwrap()),
            log_format: Some(LogFormat::Json),
            log_level: Some(LogLevel::Trace),
        };
        let s = load(&src).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/tmp/flag-dir"));
        assert_eq!(s.listen, "127.0.0.1:9200".parse().unwrap());
        assert_eq!(s.admin.get(), "[::1]:9201".parse().unwrap());
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.log_level, LogLevel::Trace);
    }

    #[test]
    fn empty_seed_list_from_env_clears_the_file_seeds() {
        let f = toml_file("seeds = [\"10.0.0.1:1\"]\n");
        let mut src = with_file(&f);
        src.env = vec![("PEERCALL_SEEDS".into(), "".into())];
        assert!(load(&src).unwrap().seeds.is_empty());
    }

    #[test]
    fn unknown_keys_fail_from_every_layer() {
        let f = toml_file("lisen = \"127.0.0.1:1\"\n");
        let (key, origin, error) = key_error(&with_file(&f));
        assert_eq!((key.as_str(), error), ("lisen", KeyError::Unknown));
        assert_eq!(origin, Origin::File(f.path().display().to_string()));

        let f = toml_file("[listen_table]\nport = 1\n");
        assert_eq!(key_error(&with_file(&f)).0, "listen_table");

        let (key, origin, error) = key_error(&with_env(&[("PEERCALL_BOGUS", "1")]));
        assert_eq!(key, "bogus");
        assert_eq!(origin, Origin::Env("PEERCALL_BOGUS".into()));
        assert_eq!(error, KeyError::Unknown);
        let msg = load(&with_env(&[("PEERCALL_BOGUS", "1")]))
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("config key 'bogus': unknown key; the known keys are data_dir, listen"),
            "{msg}"
        );
        assert!(
            msg.ends_with("(set by environment variable PEERCALL_BOGUS)"),
            "{msg}"
        );
    }

    #[test]
    fn bad_socket_address_names_key_value_and_reason() {
        let msg = load(&with_env(&[("PEERCALL_LISTEN", "x")]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "config key 'listen': invalid socket address \"x\": invalid socket address syntax \
             (set by environment variable PEERCALL_LISTEN)"
        );
    }

    #[test]
    fn admin_must_be_loopback_from_any_layer() {
        let mut src = sources();
        src.flags.admin = Some("0.0.0.0:7601".parse().unwrap());
        let (key, origin, error) = key_error(&src);
        assert_eq!(key, "admin");
        assert_eq!(origin, Origin::Flag("admin".into()));
        assert_eq!(
            error,
            KeyError::NotLoopback("0.0.0.0:7601".parse().unwrap())
        );

        let f = toml_file("admin = \"192.168.1.2:7601\"\n");
        assert!(matches!(
            key_error(&with_file(&f)).2,
            KeyError::NotLoopback(_)
        ));
        let s = load(&with_env(&[("PEERCALL_ADMIN", "127.0.0.5:1")])).unwrap();
        assert_eq!(s.admin.get(), "127.0.0.5:1".parse().unwrap());
    }

    #[test]
    fn wrong_types_name_expected_and_found() {
        let f = toml_file("listen = 7600\n");
        let (key, _, error) = key_error(&with_file(&f));
        assert_eq!(key, "listen");
        assert!(matches!(
            error,
            KeyError::Type {
                found: "an integer",
                ..
            }
        ));

        let f = toml_file("keepalive_secs = 1.5\n");
        let (_, _, error) = key_error(&with_file(&f));
        assert!(matches!(
            error,
            KeyError::Type {
                found: "a float",
                ..
            }
        ));

        let f = toml_file("seeds = [1]\n");
        assert!(matches!(
            key_error(&with_file(&f)).2,
            KeyError::Type {
                found: "an integer",
                ..
            }
        ));
    }

    #[test]
    fn choices_are_checked() {
        let (key, _, error) = key_error(&with_env(&[("PEERCALL_ROLE", "boss")]));
        assert_eq!(key, "role");
        assert_eq!(
            error,
            KeyError::Choice {
                text: "boss".into(),
                allowed: "auto, ordinary, supernode"
            }
        );
        assert_eq!(
            key_error(&with_env(&[("PEERCALL_LOG_FORMAT", "xml")])).0,
            "log_format"
        );
        assert_eq!(
            key_error(&with_env(&[("PEERCALL_LOG_LEVEL", "loud")])).0,
            "log_level"
        );
        let s = load(&with_env(&[("PEERCALL_ROLE", "ordinary")])).unwrap();
        assert_eq!(s.role, Role::Ordinary);
    }

    #[test]
    fn intervals_are_positive_bounded_and_ordered() {
        for bad in ["0", "-1", "86401", "ten", "1e3"] {
            let (key, _, error) = key_error(&with_env(&[("PEERCALL_KEEPALIVE_SECS", bad)]));
            assert_eq!(key, "keepalive_secs");
            assert_eq!(error, KeyError::Seconds { text: bad.into() }, "{bad}");
        }
        let f = toml_file("session_timeout_secs = -5\n");
        assert_eq!(
            key_error(&with_file(&f)).2,
            KeyError::Seconds { text: "-5".into() }
        );
        let (key, _, error) = key_error(&with_env(&[
            ("PEERCALL_KEEPALIVE_SECS", "30"),
            ("PEERCALL_SESSION_TIMEOUT_SECS", "30"),
        ]));
        assert_eq!(key, "session_timeout_secs");
        assert_eq!(
            error,
            KeyError::TimeoutNotAboveKeepalive {
                timeout: 30,
                keepalive: 30
            }
        );
    }

    #[test]
    fn bad_seeds_are_named() {
        let f = toml_file("seeds = [\"10.0.0.1:7600\", \"nope\"]\n");
        let (key, _, error) = key_error(&with_file(&f));
        assert_eq!(key, "seeds");
        assert!(
            matches!(error, KeyError::Seed { ref text, .. } if text == "nope"),
            "{error}"
        );
        let (_, _, error) = key_error(&with_env(&[("PEERCALL_SEEDS", "xyz@1.2.3.4:5")]));
        assert!(matches!(
            error,
            KeyError::Seed {
                error: PeerSpecError::BadKey(_),
                ..
            }
        ));
    }

    #[test]
    fn data_dir_needs_a_value() {
        let src = Sources::default();
        let (key, _, error) = key_error(&src);
        assert_eq!((key.as_str(), error), ("data_dir", KeyError::Missing));
        let (key, _, error) = key_error(&with_env(&[("PEERCALL_DATA_DIR", "")]));
        assert_eq!((key.as_str(), error), ("data_dir", KeyError::Empty));
    }

    #[test]
    fn default_data_dir_follows_xdg() {
        assert_eq!(
            default_data_dir(Some("/x".into()), Some("/home/a".into())),
            Some(PathBuf::from("/x/peercall"))
        );
        assert_eq!(
            default_data_dir(Some("relative".into()), Some("/home/a".into())),
            Some(PathBuf::from("/home/a/.local/share/peercall"))
        );
        assert_eq!(default_data_dir(Some("".into()), None), None);
    }

    #[test]
    fn non_unicode_env_value_is_named() {
        use std::os::unix::ffi::OsStringExt;
        let mut src = sources();
        src.env = vec![(
            "PEERCALL_LISTEN".into(),
            OsString::from_vec(vec![0xff, 0xfe]),
        )];
        let (key, origin, error) = key_error(&src);
        assert_eq!(key, "listen");
        assert_eq!(origin, Origin::Env("PEERCALL_LISTEN".into()));
        assert_eq!(error, KeyError::NotUnicode);
    }

    #[test]
    fn missing_or_malformed_file_names_the_file() {
        let mut src = sources();
        src.file = Some("/nonexistent/peercall.toml".into());
        let err = load(&src).unwrap_err();
        assert!(matches!(err, ConfigError::File { .. }), "{err}");
        assert!(
            err.to_string().contains("/nonexistent/peercall.toml"),
            "{err}"
        );

        let f = toml_file("listen = \n");
        let err = load(&with_file(&f)).unwrap_err();
        assert!(matches!(err, ConfigError::File { .. }), "{err}");
    }
}
