//! Logs: tracing to stderr, as text or JSON lines.
//!
//! Privacy rule for everything that logs: at `info` and above, peers and users appear
//! only as short fingerprints ([`short_key`], `UserId::fingerprint`) and addresses
//! not at all; full keys and addresses only at `debug`. Secrets never.

use std::io::IsTerminal;

use peercall_crypto::PeerKey;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogLevel};

/// Characters of a peer key shown in `info` logs: 40 bits, enough to tell a handful
/// of peers apart in a log, far too few to look anyone up by.
const SHORT_KEY_CHARS: usize = 8;

/// The global logging flags, shared by every subcommand.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log format on stderr (overrides the `log_format` config key).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Most verbose level logged by peercall (overrides the `log_level` config key).
    #[arg(long, global = true, value_enum)]
    pub log_level: Option<LogLevel>,
}

impl LogArgs {
    /// Starts logging from the flags alone, for subcommands without a config file.
    #[allow(
        dead_code,
        reason = "for the subcommands without a config file (media-eval, demo) landing next"
    )]
    pub fn init(&self) -> anyhow::Result<()> {
        init(
            self.log_format.unwrap_or_default(),
            self.log_level.unwrap_or_default(),
        )
    }
}

fn level_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Off => LevelFilter::OFF,
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    }
}

/// Installs the global subscriber: peercall's crates (targets `peercall*`) at `level`,
/// everything else at `warn` at most, so dependencies do not flood the log.
pub fn init(format: LogFormat, level: LogLevel) -> anyhow::Result<()> {
    let ours = level_filter(level);
    let filter = Targets::new()
        .with_default(ours.min(LevelFilter::WARN))
        .with_target("peercall", ours);
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => registry
            .with(fmt.with_ansi(std::io::stderr().is_terminal()))
            .try_init()?,
        LogFormat::Json => registry.with(fmt.json()).try_init()?,
    }
    Ok(())
}

/// A peer key as shown at `info` level: its first characters.
pub fn short_key(key: &PeerKey) -> String {
    let mut text = key.to_string();
    text.truncate(SHORT_KEY_CHARS);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_key_is_a_prefix() {
        let key = PeerKey([7; 32]);
        let short = short_key(&key);
        assert_eq!(short.len(), SHORT_KEY_CHARS);
        assert!(key.to_string().starts_with(&short));
    }
}
