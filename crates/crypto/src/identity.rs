//! A node's long-term keys and the names derived from them.
//!
//! * The **identity key** (Ed25519) is the user: it signs directory records.
//!   [`UserId`] is the BLAKE2s-256 hash of its public half.
//! * The **static key** (X25519) is the node's Noise key; its public half,
//!   [`PeerKey`], names the node at the session layer.
//!
//! Both live in one key file, created on first start. The file format is
//! `"PCID" | version 1 | ed25519 secret 32 | x25519 secret 32 | BLAKE2s-256 of
//! everything before`, so corruption is detected and reported, never papered over by
//! generating a new identity. The IO shell owns the file itself (mode 0600).

use std::fmt;
use std::str::FromStr;

use blake2::{Blake2s256, Digest};
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::params::DHChoice;
use thiserror::Error;

use crate::base32;

const MAGIC: &[u8; 4] = b"PCID";
const FILE_VERSION: u8 = 1;
/// Bytes in an identity key file.
pub const KEY_FILE_LEN: usize = 4 + 1 + 32 + 32 + 32;

/// Why an identity could not be loaded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The file is not a peercall key file or is damaged. The file must be kept: it
    /// may still be recoverable, and replacing it would change who the user is.
    #[error("identity key file is corrupt ({0}); refusing to replace it")]
    Corrupt(&'static str),
    /// A key file from a newer peercall.
    #[error("identity key file has unsupported version {0}")]
    Version(u8),
    /// Text that is not a key or id.
    #[error("not a valid {0}")]
    Parse(&'static str),
}

/// A node's Noise static public key (X25519): its name at the session layer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey(pub [u8; 32]);

/// A user's id: BLAKE2s-256 of the Ed25519 identity public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub [u8; 32]);

/// A node's two long-term secret keys.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    static_secret: [u8; 32],
    static_public: PeerKey,
}

fn x25519_public(secret: &[u8; 32]) -> PeerKey {
    let mut dh = DefaultResolver
        .resolve_dh(&DHChoice::Curve25519)
        .expect("the default resolver always has Curve25519");
    dh.set(secret);
    let mut public = [0u8; 32];
    public.copy_from_slice(dh.pubkey());
    PeerKey(public)
}

impl Identity {
    /// Creates a new identity from `rng`.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Identity {
        let mut ed = [0u8; 32];
        let mut x = [0u8; 32];
        rng.fill_bytes(&mut ed);
        rng.fill_bytes(&mut x);
        Identity::from_secrets(ed, x)
    }

    fn from_secrets(ed: [u8; 32], x: [u8; 32]) -> Identity {
        Identity {
            signing: SigningKey::from_bytes(&ed),
            static_public: x25519_public(&x),
            static_secret: x,
        }
    }

    /// The key file contents.
    pub fn to_file_bytes(&self) -> [u8; KEY_FILE_LEN] {
        let mut out = [0u8; KEY_FILE_LEN];
        out[..4].copy_from_slice(MAGIC);
        out[4] = FILE_VERSION;
        out[5..37].copy_from_slice(&self.signing.to_bytes());
        out[37..69].copy_from_slice(&self.static_secret);
        let sum = Blake2s256::digest(&out[..69]);
        out[69..].copy_from_slice(&sum);
        out
    }

    /// Parses a key file, detecting truncation and corruption.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<Identity, IdentityError> {
        if bytes.len() < 5 || &bytes[..4] != MAGIC {
            return Err(IdentityError::Corrupt("not a peercall key file"));
        }
        if bytes[4] != FILE_VERSION {
            return Err(IdentityError::Version(bytes[4]));
        }
        if bytes.len() != KEY_FILE_LEN {
            return Err(IdentityError::Corrupt("wrong length"));
        }
        if Blake2s256::digest(&bytes[..69]).as_slice() != &bytes[69..] {
            return Err(IdentityError::Corrupt("checksum mismatch"));
        }
        let mut ed = [0u8; 32];
        let mut x = [0u8; 32];
        ed.copy_from_slice(&bytes[5..37]);
        x.copy_from_slice(&bytes[37..69]);
        Ok(Identity::from_secrets(ed, x))
    }

    /// The Ed25519 signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The Ed25519 public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The user id.
    pub fn user_id(&self) -> UserId {
        UserId::of(&self.verifying_key())
    }

    /// The X25519 secret, for the Noise handshake.
    pub fn static_secret(&self) -> &[u8; 32] {
        &self.static_secret
    }

    /// The X25519 public key.
    pub fn peer_key(&self) -> PeerKey {
        self.static_public
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print secrets.
        f.debug_struct("Identity")
            .field("user_id", &self.user_id())
            .field("peer_key", &self.static_public)
            .finish_non_exhaustive()
    }
}

impl UserId {
    /// The id of an identity public key.
    pub fn of(key: &VerifyingKey) -> UserId {
        UserId(Blake2s256::digest(key.as_bytes()).into())
    }

    /// A short form for people to compare: the first 100 bits in five groups of four,
    /// e.g. `k3xq-7bna-...`. Not unique enough to look a user up by; use the full id.
    pub fn fingerprint(&self) -> String {
        let full = base32::encode(&self.0);
        let short = &full[..20];
        short
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("-")
    }
}

macro_rules! key_text {
    ($t:ty, $what:literal) => {
        impl fmt::Display for $t {
            /// 52 characters of lowercase base32.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&base32::encode(&self.0))
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let s = base32::encode(&self.0);
                write!(f, "{}({}…)", stringify!($t), &s[..8])
            }
        }

        impl FromStr for $t {
            type Err = IdentityError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                base32::decode::<32>(s.trim()).map(Self).ok_or(IdentityError::Parse($what))
            }
        }
    };
}

key_text!(PeerKey, "peer key (52 base32 characters)");
key_text!(UserId, "user id (52 base32 characters)");

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn key_file_round_trips_and_detects_damage() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let id = Identity::generate(&mut rng);
        let bytes = id.to_file_bytes();
        let back = Identity::from_file_bytes(&bytes).unwrap();
        assert_eq!(back.user_id(), id.user_id());
        assert_eq!(back.peer_key(), id.peer_key());
        for i in 0..bytes.len() {
            let mut bad = bytes;
            bad[i] ^= 0x10;
            assert!(Identity::from_file_bytes(&bad).is_err(), "flip at {i} detected");
        }
        assert_eq!(
            Identity::from_file_bytes(&bytes[..50]).unwrap_err(),
            IdentityError::Corrupt("wrong length")
        );
        assert!(Identity::from_file_bytes(b"").is_err());
    }

    #[test]
    fn ids_print_and_parse() {
        let id = Identity::generate(&mut ChaCha20Rng::seed_from_u64(2));
        let text = id.user_id().to_string();
        assert_eq!(text.parse::<UserId>().unwrap(), id.user_id());
        assert!("nope".parse::<PeerKey>().is_err());
        let fp = id.user_id().fingerprint();
        assert_eq!(fp.len(), 24);
        assert!(text.starts_with(&fp.replace('-', "")));
        assert!(!format!("{id:?}").contains(&format!("{:?}", id.static_secret())));
    }

    #[test]
    fn static_public_matches_snow() {
        let id = Identity::generate(&mut ChaCha20Rng::seed_from_u64(3));
        let params: snow::params::NoiseParams = "Noise_XX_25519_ChaChaPoly_BLAKE2s".parse().unwrap();
        // A handshake with this secret shows the same public key to the peer.
        let mut init = snow::Builder::new(params.clone())
            .local_private_key(id.static_secret())
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut resp = snow::Builder::new(params)
            .local_private_key(&[9u8; 32])
            .unwrap()
            .build_responder()
            .unwrap();
        let mut a = [0u8; 256];
        let mut b = [0u8; 256];
        let n = init.write_message(&[], &mut a).unwrap();
        resp.read_message(&a[..n], &mut b).unwrap();
        let n = resp.write_message(&[], &mut a).unwrap();
        init.read_message(&a[..n], &mut b).unwrap();
        let n = init.write_message(&[], &mut a).unwrap();
        resp.read_message(&a[..n], &mut b).unwrap();
        assert_eq!(resp.get_remote_static().unwrap(), &id.peer_key().0);
    }
}
