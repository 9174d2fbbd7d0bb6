//! Peer addresses as people write them: `HOST:PORT` or `PEERKEY@HOST:PORT`.
//!
//! Used by the `seeds` config key and the admin API's `POST /v1/connect`. Parsing is
//! pure; [`PeerSpec::resolve`] does the DNS lookup (IO) and yields an engine
//! [`Contact`].

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;
use std::str::FromStr;

use peercall_crypto::{IdentityError, PeerKey};
use peercall_engine::Contact;
use thiserror::Error;

/// Longest DNS name (RFC 1035: 255 octets on the wire, 253 as text).
const MAX_HOST_NAME: usize = 253;

/// Why a peer address did not parse.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PeerSpecError {
    /// No `:PORT` at the end.
    #[error("expected HOST:PORT or PEERKEY@HOST:PORT")]
    MissingPort,
    /// The port is not a number from 1 to 65535.
    #[error("port {0:?} is not a number from 1 to 65535")]
    BadPort(String),
    /// The host is empty, or not an IP address or DNS name.
    #[error("host {0:?} is not an IP address or DNS name (IPv6 addresses go in brackets)")]
    BadHost(String),
    /// The part before `@` is not a peer key.
    #[error("{0}")]
    BadKey(IdentityError),
}

/// Why a peer address could not be resolved.
#[derive(Debug, Error)]
pub enum ResolveError {
    /// The DNS lookup failed.
    #[error("could not resolve {host}: {source}")]
    Lookup {
        /// The name looked up.
        host: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The name has no addresses.
    #[error("{0} has no addresses")]
    NoAddress(String),
}

/// Where a peer is: an IP address or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A literal address.
    Ip(IpAddr),
    /// A DNS name, resolved at use.
    Name(String),
}

/// A peer as configured: optional static key, host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// The peer's Noise static key; with it the handshake is `IK`, without it `XX`.
    pub key: Option<PeerKey>,
    /// The host.
    pub host: Host,
    /// The UDP port (never 0: nothing can be reached there).
    pub port: NonZeroU16,
}

fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HOST_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['.', '-'])
}

impl FromStr for PeerSpec {
    type Err = PeerSpecError;

    fn from_str(text: &str) -> Result<PeerSpec, PeerSpecError> {
        let text = text.trim();
        let (key, addr) = match text.split_once('@') {
            Some((key, addr)) => (
                Some(key.parse::<PeerKey>().map_err(PeerSpecError::BadKey)?),
                addr,
            ),
            None => (None, text),
        };
        if let Ok(sock) = addr.parse::<SocketAddr>() {
            let port = NonZeroU16::new(sock.port())
                .ok_or_else(|| PeerSpecError::BadPort(sock.port().to_string()))?;
            return Ok(PeerSpec {
                key,
                host: Host::Ip(sock.ip()),
                port,
            });
        }
        let (host, port) = addr.rsplit_once(':').ok_or(PeerSpecError::MissingPort)?;
        let port = port
            .parse::<NonZeroU16>()
            .map_err(|_| PeerSpecError::BadPort(port.to_owned()))?;
        if !is_dns_name(host) {
            return Err(PeerSpecError::BadHost(host.to_owned()));
        }
        Ok(PeerSpec {
            key,
            host: Host::Name(host.to_owned()),
            port,
        })
    }
}

impl fmt::Display for PeerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(key) = &self.key {
            write!(f, "{key}@")?;
        }
        match &self.host {
            Host::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port.get())),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

impl PeerSpec {
    /// Resolves the host to one address, preferring the address family of `local`
    /// (the node's UDP socket), since an IPv4 socket cannot send to IPv6 peers.
    pub async fn resolve(&self, local: SocketAddr) -> Result<Contact, ResolveError> {
        let addr = match &self.host {
            Host::Ip(ip) => SocketAddr::new(*ip, self.port.get()),
            Host::Name(name) => {
                let addrs: Vec<SocketAddr> =
                    tokio::net::lookup_host((name.as_str(), self.port.get()))
                        .await
                        .map_err(|source| ResolveError::Lookup {
                            host: name.clone(),
                            source,
                        })?
                        .collect();
                addrs
                    .iter()
                    .find(|a| a.is_ipv4() == local.is_ipv4())
                    .or(addrs.first())
                    .copied()
                    .ok_or_else(|| ResolveError::NoAddress(name.clone()))?
            }
        };
        Ok(Contact {
            addr,
            key: self.key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[test]
    fn parses_the_accepted_forms() {
        let p: PeerSpec = "127.0.0.1:7600".parse().unwrap();
        assert_eq!(p.host, Host::Ip("127.0.0.1".parse().unwrap()));
        assert_eq!(p.port.get(), 7600);
        assert_eq!(p.key, None);

        let p: PeerSpec = "[::1]:9".parse().unwrap();
        assert_eq!(p.host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(p.to_string(), "[::1]:9");

        let p: PeerSpec = "seed-1.example.org:7600".parse().unwrap();
        assert_eq!(p.host, Host::Name("seed-1.example.org".into()));

        let text = format!("{KEY}@10.0.0.1:7600");
        let p: PeerSpec = text.parse().unwrap();
        assert_eq!(p.key, Some(KEY.parse().unwrap()));
        assert_eq!(p.to_string(), text);
    }

    #[test]
    fn rejects_bad_forms_with_the_reason() {
        let err = |s: &str| s.parse::<PeerSpec>().unwrap_err();
        assert_eq!(err("localhost"), PeerSpecError::MissingPort);
        assert_eq!(err("10.0.0.1:0"), PeerSpecError::BadPort("0".into()));
        assert_eq!(err("host:99999"), PeerSpecError::BadPort("99999".into()));
        assert_eq!(err(":7600"), PeerSpecError::BadHost(String::new()));
        assert_eq!(err("::1:7600"), PeerSpecError::BadHost("::1".into()));
        assert_eq!(err("a b:1"), PeerSpecError::BadHost("a b".into()));
        assert!(matches!(err("short@1.2.3.4:5"), PeerSpecError::BadKey(_)));
    }

    #[tokio::test]
    async fn resolves_literals_and_names() {
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let c = "127.0.0.1:5"
            .parse::<PeerSpec>()
            .unwrap()
            .resolve(local)
            .await
            .unwrap();
        assert_eq!(c.addr, "127.0.0.1:5".parse().unwrap());
        let c = "localhost:5"
            .parse::<PeerSpec>()
            .unwrap()
            .resolve(local)
            .await
            .unwrap();
        assert!(c.addr.ip().is_loopback() && c.addr.is_ipv4(), "{c:?}");
    }
}
