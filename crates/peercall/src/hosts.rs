//! The persisted host cache: the supernodes this node knows, so a restart attaches
//! from them instead of from the configured seeds (DESIGN.md §2).
//!
//! `hosts.json` in the data directory, written atomically every `state_save_secs`
//! (when it changed) and at shutdown:
//!
//! ```json
//! {"version": 1, "hosts": [{"key": "<52 base32>", "addr": "198.51.100.7:7600", "last_seen": 1700000000}]}
//! ```
//!
//! `last_seen` is Unix seconds. Parsing is strict: a file with any entry that does
//! not parse is corrupt as a whole (a torn or hand-damaged file cannot be trusted
//! piecemeal) and is set aside by the caller. More than
//! [`HOST_CACHE_SIZE`] entries keep the most recently seen; a duplicate key keeps
//! its most recent entry.

use std::net::SocketAddr;

use peercall_crypto::PeerKey;
use peercall_engine::CachedHost;
use peercall_overlay::config::HOST_CACHE_SIZE;
use peercall_wire::Time;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The file format's version.
pub const HOSTS_VERSION: u32 = 1;
/// Largest host cache file read: 200 entries take about 25 KB; a file far larger
/// is not ours.
pub const MAX_HOSTS_FILE: usize = 256 * 1024;

/// Why a host cache file does not load.
#[derive(Debug, Error)]
pub enum HostsError {
    /// Not the JSON shape above.
    #[error("not a host cache: {0}")]
    Json(#[from] serde_json::Error),
    /// A version this peercall does not read.
    #[error("host cache version {0}; this peercall reads version {HOSTS_VERSION}")]
    Version(u32),
    /// An entry with a bad key or address.
    #[error("entry {index}: {reason}")]
    Entry {
        /// Which entry (from 0).
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// Longer than [`MAX_HOSTS_FILE`].
    #[error("larger than {MAX_HOSTS_FILE} bytes")]
    TooLarge,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    hosts: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    key: String,
    addr: String,
    last_seen: u64,
}

/// Parses a host cache file.
pub fn parse(bytes: &[u8]) -> Result<Vec<CachedHost>, HostsError> {
    if bytes.len() > MAX_HOSTS_FILE {
        return Err(HostsError::TooLarge);
    }
    let file: File = serde_json::from_slice(bytes)?;
    if file.version != HOSTS_VERSION {
        return Err(HostsError::Version(file.version));
    }
    let mut hosts: Vec<CachedHost> = Vec::with_capacity(file.hosts.len());
    for (index, e) in file.hosts.into_iter().enumerate() {
        let bad = |reason: String| HostsError::Entry { index, reason };
        let key: PeerKey = e.key.parse().map_err(|err| bad(format!("{err}")))?;
        let addr: SocketAddr = e
            .addr
            .parse()
            .map_err(|err| bad(format!("address {:?}: {err}", e.addr)))?;
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return Err(bad(format!("address {addr} cannot be dialed")));
        }
        let last_seen = Time::from_secs(e.last_seen);
        match hosts.iter_mut().find(|h| h.key == key) {
            Some(h) if h.last_seen >= last_seen => {}
            Some(h) => {
                *h = CachedHost {
                    key,
                    addr,
                    last_seen,
                }
            }
            None => hosts.push(CachedHost {
                key,
                addr,
                last_seen,
            }),
        }
    }
    sort_and_cap(&mut hosts);
    Ok(hosts)
}

/// Most recently seen first (ties by key, so the file is deterministic), at most
/// [`HOST_CACHE_SIZE`].
fn sort_and_cap(hosts: &mut Vec<CachedHost>) {
    hosts.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.key.cmp(&b.key)));
    hosts.truncate(HOST_CACHE_SIZE);
}

/// The file contents for `hosts`.
pub fn to_json(hosts: &[CachedHost]) -> Vec<u8> {
    let mut hosts = hosts.to_vec();
    sort_and_cap(&mut hosts);
    let file = File {
        version: HOSTS_VERSION,
        hosts: hosts
            .iter()
            .map(|h| Entry {
                key: h.key.to_string(),
                addr: h.addr.to_string(),
                last_seen: h.last_seen.as_secs(),
            })
            .collect(),
    };
    // Strings and integers always serialize.
    let mut out = serde_json::to_vec_pretty(&file).unwrap_or_default();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(n: u8, secs: u64) -> CachedHost {
        CachedHost {
            key: PeerKey([n; 32]),
            addr: SocketAddr::from(([198, 51, 100, n], 7600)),
            last_seen: Time::from_secs(secs),
        }
    }

    #[test]
    fn round_trips_sorted_by_recency() {
        let hosts = vec![host(1, 100), host(2, 300), host(3, 200)];
        let back = parse(&to_json(&hosts)).unwrap();
        assert_eq!(back, vec![host(2, 300), host(3, 200), host(1, 100)]);
        assert_eq!(parse(&to_json(&[])).unwrap(), vec![]);
    }

    #[test]
    fn keeps_the_200_most_recent_and_the_newest_duplicate() {
        let many: Vec<CachedHost> = (0..250u32)
            .map(|i| CachedHost {
                key: PeerKey([(i % 256) as u8; 32]),
                addr: SocketAddr::from(([10, 0, (i / 256) as u8, (i % 256) as u8], 1)),
                last_seen: Time::from_secs(u64::from(i)),
            })
            .collect();
        let back = parse(&to_json(&many)).unwrap();
        assert_eq!(back.len(), HOST_CACHE_SIZE);
        assert_eq!(back[0].last_seen, Time::from_secs(249));
        assert_eq!(back[199].last_seen, Time::from_secs(50));

        let dup = format!(
            "{{\"version\":1,\"hosts\":[{{\"key\":\"{k}\",\"addr\":\"10.0.0.1:1\",\"last_seen\":5}},\
             {{\"key\":\"{k}\",\"addr\":\"10.0.0.2:2\",\"last_seen\":9}}]}}",
            k = PeerKey([7; 32])
        );
        let back = parse(dup.as_bytes()).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].addr, "10.0.0.2:2".parse().unwrap());
    }

    #[test]
    fn anything_malformed_is_an_error_never_a_panic() {
        let key = PeerKey([1; 32]).to_string();
        let entry = |k: &str, a: &str| {
            format!(
                "{{\"version\":1,\"hosts\":[{{\"key\":\"{k}\",\"addr\":\"{a}\",\"last_seen\":1}}]}}"
            )
        };
        for bad in [
            String::new(),
            "{".into(),
            "null".into(),
            "{\"version\":2,\"hosts\":[]}".into(),
            "{\"version\":1}".into(),
            "{\"version\":1,\"hosts\":[],\"extra\":1}".into(),
            entry("short", "10.0.0.1:1"),
            entry(&key, "nowhere"),
            entry(&key, "10.0.0.1:0"),
            entry(&key, "0.0.0.0:7600"),
            "{\"version\":1,\"hosts\":[{\"key\":1,\"addr\":\"10.0.0.1:1\",\"last_seen\":1}]}"
                .into(),
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(matches!(
            parse(&vec![b' '; MAX_HOSTS_FILE + 1]),
            Err(HostsError::TooLarge)
        ));
        // Arbitrary bytes.
        for seed in 0..200u32 {
            let junk: Vec<u8> = (0..(seed % 64))
                .map(|i| (i.wrapping_mul(seed).wrapping_add(seed * 31) % 256) as u8)
                .collect();
            let _ = parse(&junk);
        }
    }
}
