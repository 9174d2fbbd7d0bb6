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
use std::net::{AddrParseError, SocketAddr};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config as Layers, File, FileFormat, Map, Source, Value, ValueKind};
use peercall_engine::Role;
use thiserror::Error;

use crate::contact::{PeerSpec, PeerSpecError};

/// Prefix of the environment variables that set config keys (`PEERCALL_LISTEN`...).
pub const ENV_PREFIX: &str = "PEERCALL_";

/// Every config key, in documentation order.
pub const KEYS: [&str; 9] = [
    "data_dir",
    "listen",
    "admin",
    "role",
    "seeds",
    "keepalive_secs",
    "session_timeout_secs",
    "log_format",
    "log_level",
];

/// Default UDP address: all interfaces, peercall's port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7600";
/// Default admin HTTP address: loopback, the port after the UDP one.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:7601";
/// Default keepalive interval; the engine's own default (10 s keeps most NAT UDP
/// bindings, which commonly expire after 30 s, alive).
pub const DEFAULT_KEEPALIVE_SECS: u64 = 10;
/// Default session timeout: three keepalives lost in a row, plus slack.
pub const DEFAULT_SESSION_TIMEOUT_SECS: u64 = 35;
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
    /// Keepalive interval on idle sessions.
    pub keepalive_secs: NonZeroU64,
    /// Silence after which a session is dead; always longer than the keepalive.
    pub session_timeout_secs: NonZeroU64,
    /// Log format.
    pub log_format: LogFormat,
    /// Log level.
    pub log_level: LogLevel,
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
        /// What is wrong.
        error: KeyError,
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
            Some(ORIGIN_ENV) => Origin::Env(format!("{ENV_PREFIX}{}", key.to_uppercase())),
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
    l.set("keepalive_secs", o, DEFAULT_KEEPALIVE_SECS);
    l.set("session_timeout_secs", o, DEFAULT_SESSION_TIMEOUT_SECS);
    l.set("log_format", o, LogFormat::default().as_str());
    l.set("log_level", o, LogLevel::default().as_str());
    l
}

fn flag_layer(flags: &Flags) -> Result<Layer, ConfigError> {
    let mut l = Layer::new();
    let origin = |flag: &str| format!("{ORIGIN_FLAG}{flag}");
    if let Some(dir) = &flags.data_dir {
        let text = dir.to_str().ok_or_else(|| ConfigError::Key {
            key: "data_dir".into(),
            origin: Origin::Flag("data-dir".into()),
            error: KeyError::NotUnicode,
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
            error: KeyError::NotUnicode,
        })?;
        map.insert(name.into_owned(), value.to_owned());
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
    // Sorted, so the error reported does not depend on hash order.
    let values: BTreeMap<String, Value> = values.into_iter().collect();
    if let Some((key, value)) = values.iter().find(|(k, _)| !KEYS.contains(&k.as_str())) {
        return Err(ConfigError::Key {
            key: key.clone(),
            origin: Origin::of(key, value.origin(), file),
            error: KeyError::Unknown,
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
    Ok(Settings {
        data_dir: p.key("data_dir", parse_path)?,
        listen: p.key("listen", parse_socket_addr)?,
        admin: p.key("admin", |v| {
            parse_socket_addr(v).and_then(LoopbackAddr::new)
        })?,
        role: p.key("role", parse_role)?,
        seeds: p.key("seeds", parse_seeds)?,
        keepalive_secs,
        session_timeout_secs,
        log_format: p.key("log_format", parse_log_format)?,
        log_level: p.key("log_level", parse_log_level)?,
    })
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
            error: KeyError::Missing,
        })?;
        parse(value).map_err(|error| ConfigError::Key {
            key: key.into(),
            origin: Origin::of(key, value.origin(), self.file),
            error,
        })
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
            ConfigError::Key { key, origin, error } => (key, origin, error),
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
            keepalive_secs: NonZeroU64::new(DEFAULT_KEEPALIVE_SECS).unwrap(),
            session_timeout_secs: NonZeroU64::new(DEFAULT_SESSION_TIMEOUT_SECS).unwrap(),
            log_format: LogFormat::Text,
            log_level: LogLevel::Info,
        }
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
            if key == "data_dir" {
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
