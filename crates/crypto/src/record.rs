//! Signed directory records (DESIGN.md §2): who a user is, where their node is, and
//! which supernodes it is attached to, signed by the user's identity key.
//!
//! # Encoding (canonical: one byte string per record)
//! ```text
//! version 1 | identity key 32 | seq 8 | expires 8 | body_len 2 | body | signature 64
//! body = handle_len 1 | handle | static key 32
//!      | n_endpoints 1 | endpoint × n        (n ≤ 8)
//!      | n_supernodes 1 | (key 32 | endpoint) × n   (n ≤ 4)
//! endpoint = family 1 (4 or 6) | address 4 or 16 | port 2
//! ```
//! Integers are big-endian; `expires` is in Unix seconds; a handle length of 0 means
//! no handle. The Ed25519 signature covers [`SIGNATURE_CONTEXT`] followed by every
//! byte before the signature, so a record signature can never be mistaken for a
//! signature over anything else the identity key signs.
//!
//! [`Record::verify`] checks the length bounds, the version and the signature
//! before it parses a single body field, and parsing is strict: any byte string it
//! accepts re-encodes to itself ([`Record::to_bytes`]). Addresses must be usable
//! (no port 0, no unspecified address) and written in their canonical family (an
//! IPv4 address never as IPv4-mapped IPv6); lists hold no duplicates.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ed25519_dalek::{Signature, Signer, VerifyingKey};
use peercall_wire::Time;
use thiserror::Error;

use crate::{Identity, PeerKey, UserId};

/// The encoding version this build writes and reads.
pub const RECORD_VERSION: u8 = 1;
/// The largest record: small enough for one datagram with room for the overlay's
/// framing, as DESIGN.md §2 requires.
pub const MAX_RECORD_LEN: usize = 1000;
/// Prefixed to the signed bytes (domain separation).
pub const SIGNATURE_CONTEXT: &[u8] = b"peercall record v1";
/// The most endpoints a record lists: a few local and reflexive addresses of each
/// family is plenty; more would only feed amplification.
pub const MAX_ENDPOINTS: usize = 8;
/// The most home supernodes a record lists: a node attaches to two, with slack for a
/// handover in progress.
pub const MAX_SUPERNODES: usize = 4;
/// The longest handle, in bytes.
pub const MAX_HANDLE_LEN: usize = 32;
/// How far in the future a record may expire when it is stored: bounds how long a
/// record outlives a node that stopped refreshing it. Owners refresh far sooner.
pub const MAX_RECORD_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Bytes before the body: version, identity key, seq, expires, body length.
const HEAD_LEN: usize = 1 + 32 + 8 + 8 + 2;
const SIG_LEN: usize = 64;
/// The smallest body: no handle, a key, two empty lists.
const MIN_BODY_LEN: usize = 1 + 32 + 1 + 1;
/// The smallest record.
pub const MIN_RECORD_LEN: usize = HEAD_LEN + MIN_BODY_LEN + SIG_LEN;

const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// What was wrong with a record.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecordError {
    /// Shorter than any record or longer than [`MAX_RECORD_LEN`].
    #[error("record of {0} bytes is outside {MIN_RECORD_LEN}..={MAX_RECORD_LEN}")]
    Size(usize),
    /// An encoding version this build does not read.
    #[error("unsupported record version {0}")]
    Version(u8),
    /// The body length field disagrees with the record's length.
    #[error("body length field disagrees with the record length")]
    BodyLength,
    /// The identity key is not a valid Ed25519 public key.
    #[error("identity key is not a valid Ed25519 key")]
    IdentityKey,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// A body field is malformed or not in canonical form.
    #[error("malformed field `{field}`: {reason}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The record has expired.
    #[error("record expired at {0} (Unix seconds)")]
    Expired(u64),
    /// The record expires further ahead than [`MAX_RECORD_LIFETIME`].
    #[error("record expiry {0} is too far in the future")]
    ExpiryTooFar(u64),
    /// Not newer than the record it would replace.
    #[error("stale record: sequence {seq} is not above {current}")]
    Stale {
        /// The offered record's sequence number.
        seq: u64,
        /// The stored one's.
        current: u64,
    },
    /// The record is for a different identity than the one it would replace.
    #[error("record is for a different identity")]
    WrongIdentity,
}

fn field(field: &'static str, reason: &'static str) -> RecordError {
    RecordError::Field { field, reason }
}

/// A user's claimed name: 1 to 32 bytes of `a-z 0-9 _ - .`, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(String);

impl Handle {
    /// Validates `text` as a handle.
    pub fn new(text: &str) -> Result<Handle, RecordError> {
        let b = text.as_bytes();
        if b.is_empty() || b.len() > MAX_HANDLE_LEN {
            return Err(field("handle", "must be 1 to 32 bytes"));
        }
        if !b[0].is_ascii_lowercase() {
            return Err(field("handle", "must start with a lowercase letter"));
        }
        if !b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'.')
        }) {
            return Err(field(
                "handle",
                "only a-z, 0-9, '_', '-' and '.' are allowed",
            ));
        }
        Ok(Handle(text.to_owned()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A supernode a node is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HomeSupernode {
    /// Its Noise static key.
    pub key: PeerKey,
    /// Its address.
    pub addr: SocketAddr,
}

/// The signed claims of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordBody {
    /// The user's handle, if claimed.
    pub handle: Option<Handle>,
    /// The node's Noise static key (for IK handshakes to it).
    pub static_key: PeerKey,
    /// Where the node can be reached, most preferred first.
    pub endpoints: Vec<SocketAddr>,
    /// The node's home supernodes.
    pub supernodes: Vec<HomeSupernode>,
}

fn check_addr(name: &'static str, addr: &SocketAddr) -> Result<(), RecordError> {
    if addr.port() == 0 {
        return Err(field(name, "port 0"));
    }
    if addr.ip().is_unspecified() {
        return Err(field(name, "unspecified address"));
    }
    if let SocketAddr::V6(v6) = addr {
        if v6.ip().to_ipv4_mapped().is_some() {
            return Err(field(name, "IPv4-mapped IPv6; use the IPv4 form"));
        }
        if v6.flowinfo() != 0 || v6.scope_id() != 0 {
            return Err(field(name, "IPv6 flow info and scope id are not encoded"));
        }
    }
    Ok(())
}

fn put_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(FAMILY_V4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(FAMILY_V6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

impl RecordBody {
    /// The canonical encoding, after checking every field.
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(field("endpoints", "more than 8"));
        }
        if self.supernodes.len() > MAX_SUPERNODES {
            return Err(field("supernodes", "more than 4"));
        }
        let mut out = Vec::with_capacity(128);
        match &self.handle {
            Some(h) => {
                // Re-validate: a Handle is valid by construction, but be strict.
                let h = Handle::new(h.as_str())?;
                out.push(h.0.len() as u8);
                out.extend_from_slice(h.0.as_bytes());
            }
            None => out.push(0),
        }
        out.extend_from_slice(&self.static_key.0);
        out.push(self.endpoints.len() as u8);
        for (i, addr) in self.endpoints.iter().enumerate() {
            check_addr("endpoints", addr)?;
            if self.endpoints[..i].contains(addr) {
                return Err(field("endpoints", "duplicate address"));
            }
            put_addr(&mut out, addr);
        }
        out.push(self.supernodes.len() as u8);
        for (i, sn) in self.supernodes.iter().enumerate() {
            check_addr("supernodes", &sn.addr)?;
            if self.supernodes[..i].iter().any(|o| o.key == sn.key) {
                return Err(field("supernodes", "duplicate supernode key"));
            }
            out.extend_from_slice(&sn.key.0);
            put_addr(&mut out, &sn.addr);
        }
        Ok(out)
    }

    /// Parses a canonical body; anything else is an error.
    pub fn decode(bytes: &[u8]) -> Result<RecordBody, RecordError> {
        let mut r = Cursor(bytes);
        let handle_len = usize::from(r.u8("handle")?);
        let handle = if handle_len == 0 {
            None
        } else {
            let raw = r.take("handle", handle_len)?;
            let text = std::str::from_utf8(raw).map_err(|_| field("handle", "not UTF-8"))?;
            Some(Handle::new(text)?)
        };
        let static_key = PeerKey(r.array("static_key")?);
        let n = usize::from(r.u8("endpoints")?);
        if n > MAX_ENDPOINTS {
            return Err(field("endpoints", "more than 8"));
        }
        let mut endpoints = Vec::with_capacity(n);
        for _ in 0..n {
            let addr = r.addr("endpoints")?;
            if endpoints.contains(&addr) {
                return Err(field("endpoints", "duplicate address"));
            }
            endpoints.push(addr);
        }
        let n = usize::from(r.u8("supernodes")?);
        if n > MAX_SUPERNODES {
            return Err(field("supernodes", "more than 4"));
        }
        let mut supernodes: Vec<HomeSupernode> = Vec::with_capacity(n);
        for _ in 0..n {
            let key = PeerKey(r.array("supernodes")?);
            let addr = r.addr("supernodes")?;
            if supernodes.iter().any(|o| o.key == key) {
                return Err(field("supernodes", "duplicate supernode key"));
            }
            supernodes.push(HomeSupernode { key, addr });
        }
        if !r.0.is_empty() {
            return Err(field("body", "trailing bytes"));
        }
        Ok(RecordBody {
            handle,
            static_key,
            endpoints,
            supernodes,
        })
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, name: &'static str, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(field(name, "truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self, name: &'static str) -> Result<u8, RecordError> {
        Ok(self.take(name, 1)?[0])
    }

    fn array<const N: usize>(&mut self, name: &'static str) -> Result<[u8; N], RecordError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(name, N)?);
        Ok(out)
    }

    fn addr(&mut self, name: &'static str) -> Result<SocketAddr, RecordError> {
        let ip = match self.u8(name)? {
            FAMILY_V4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>(name)?)),
            FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>(name)?)),
            _ => return Err(field(name, "unknown address family")),
        };
        let port = u16::from_be_bytes(self.array(name)?);
        let addr = SocketAddr::new(ip, port);
        check_addr(name, &addr)?;
        Ok(addr)
    }
}

/// A verified directory record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The user's Ed25519 identity key, which signed the record.
    pub identity: VerifyingKey,
    /// Sequence number: a storer keeps only the highest.
    pub seq: u64,
    /// Expiry in Unix seconds.
    pub expires: u64,
    /// The signed claims.
    pub body: RecordBody,
    signature: [u8; SIG_LEN],
}

fn signed_message(
    signed: &[u8],
    buf: &mut [u8; SIGNATURE_CONTEXT.len() + MAX_RECORD_LEN],
) -> usize {
    let n = SIGNATURE_CONTEXT.len() + signed.len();
    buf[..SIGNATURE_CONTEXT.len()].copy_from_slice(SIGNATURE_CONTEXT);
    buf[SIGNATURE_CONTEXT.len()..n].copy_from_slice(signed);
    n
}

/// Assembles and signs a record around an already encoded body (no body checks).
fn seal(identity: &Identity, seq: u64, expires: u64, body: &[u8]) -> Result<Vec<u8>, RecordError> {
    let len = HEAD_LEN + body.len() + SIG_LEN;
    if !(MIN_RECORD_LEN..=MAX_RECORD_LEN).contains(&len) {
        return Err(RecordError::Size(len));
    }
    let mut out = Vec::with_capacity(len);
    out.push(RECORD_VERSION);
    out.extend_from_slice(identity.verifying_key().as_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&expires.to_be_bytes());
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    let mut buf = [0u8; SIGNATURE_CONTEXT.len() + MAX_RECORD_LEN];
    let n = signed_message(&out, &mut buf);
    let signature = identity.signing_key().sign(&buf[..n]);
    out.extend_from_slice(&signature.to_bytes());
    Ok(out)
}

impl Record {
    /// Signs a record of `body` with sequence number `seq`, expiring at `expires`
    /// (Unix seconds).
    pub fn sign(
        identity: &Identity,
        seq: u64,
        expires: u64,
        body: &RecordBody,
    ) -> Result<Vec<u8>, RecordError> {
        seal(identity, seq, expires, &body.encode()?)
    }

    /// Verifies and parses a record: length, version, identity key and signature
    /// first, then the body, strictly. Does not look at the clock; see
    /// [`Record::verify_at`].
    pub fn verify(bytes: &[u8]) -> Result<Record, RecordError> {
        if !(MIN_RECORD_LEN..=MAX_RECORD_LEN).contains(&bytes.len()) {
            return Err(RecordError::Size(bytes.len()));
        }
        if bytes[0] != RECORD_VERSION {
            return Err(RecordError::Version(bytes[0]));
        }
        let body_len = usize::from(u16::from_be_bytes([
            bytes[HEAD_LEN - 2],
            bytes[HEAD_LEN - 1],
        ]));
        if HEAD_LEN + body_len + SIG_LEN != bytes.len() {
            return Err(RecordError::BodyLength);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes[1..33]);
        let identity = VerifyingKey::from_bytes(&key).map_err(|_| RecordError::IdentityKey)?;
        let (signed, sig) = bytes.split_at(bytes.len() - SIG_LEN);
        let mut signature = [0u8; SIG_LEN];
        signature.copy_from_slice(sig);
        let mut buf = [0u8; SIGNATURE_CONTEXT.len() + MAX_RECORD_LEN];
        let n = signed_message(signed, &mut buf);
        identity
            .verify_strict(&buf[..n], &Signature::from_bytes(&signature))
            .map_err(|_| RecordError::BadSignature)?;
        // Only now is anything else parsed.
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&bytes[33..41]);
        let mut expires = [0u8; 8];
        expires.copy_from_slice(&bytes[41..49]);
        let body = RecordBody::decode(&signed[HEAD_LEN..])?;
        Ok(Record {
            identity,
            seq: u64::from_be_bytes(seq),
            expires: u64::from_be_bytes(expires),
            body,
            signature,
        })
    }

    /// [`Record::verify`], then refuses a record that has expired at `now` or expires
    /// more than [`MAX_RECORD_LIFETIME`] after it: what a storer or reader checks.
    pub fn verify_at(bytes: &[u8], now: Time) -> Result<Record, RecordError> {
        let record = Record::verify(bytes)?;
        if record.is_expired(now) {
            return Err(RecordError::Expired(record.expires));
        }
        if record.expires > (now + MAX_RECORD_LIFETIME).as_secs() {
            return Err(RecordError::ExpiryTooFar(record.expires));
        }
        Ok(record)
    }

    /// The signed encoding; identical to the bytes the record was verified from.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = self
            .body
            .encode()
            .expect("a verified record's body was parsed canonically, so it encodes");
        let mut out = Vec::with_capacity(HEAD_LEN + body.len() + SIG_LEN);
        out.push(RECORD_VERSION);
        out.extend_from_slice(self.identity.as_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.expires.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&self.signature);
        out
    }

    /// The user id of the signing identity.
    pub fn user_id(&self) -> UserId {
        UserId::of(&self.identity)
    }

    /// Whether the record has expired at `now`.
    pub fn is_expired(&self, now: Time) -> bool {
        now.as_secs() >= self.expires
    }

    /// Whether this record replaces `other`: same identity, higher sequence number.
    pub fn supersedes(&self, other: &Record) -> bool {
        self.identity == other.identity && self.seq > other.seq
    }

    /// [`Record::supersedes`] with the reason when it does not.
    pub fn check_supersedes(&self, current: &Record) -> Result<(), RecordError> {
        if self.identity != current.identity {
            return Err(RecordError::WrongIdentity);
        }
        if self.seq <= current.seq {
            return Err(RecordError::Stale {
                seq: self.seq,
                current: current.seq,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn identity() -> Identity {
        Identity::generate(&mut ChaCha20Rng::seed_from_u64(11))
    }

    fn body() -> RecordBody {
        RecordBody {
            handle: Some(Handle::new("alice.b-2_x").expect("valid")),
            static_key: PeerKey([7; 32]),
            endpoints: vec![
                "198.51.100.7:4433".parse().expect("addr"),
                "[2001:db8::5]:4433".parse().expect("addr"),
            ],
            supernodes: vec![HomeSupernode {
                key: PeerKey([9; 32]),
                addr: "203.0.113.1:4433".parse().expect("addr"),
            }],
        }
    }

    #[test]
    fn sign_verify_round_trip() {
        let id = identity();
        let bytes = Record::sign(&id, 5, 1_000_000, &body()).expect("signs");
        let rec = Record::verify(&bytes).expect("verifies");
        assert_eq!(rec.body, body());
        assert_eq!(rec.seq, 5);
        assert_eq!(rec.expires, 1_000_000);
        assert_eq!(rec.user_id(), id.user_id());
        assert_eq!(rec.to_bytes(), bytes);
        assert!(!rec.is_expired(Time::from_secs(999_999)));
        assert!(rec.is_expired(Time::from_secs(1_000_000)));
    }

    #[test]
    fn any_flipped_byte_fails() {
        let bytes = Record::sign(&identity(), 5, 1_000_000, &body()).expect("signs");
        for i in 0..bytes.len() {
            for bit in [0x01, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= bit;
                assert!(
                    Record::verify(&bad).is_err(),
                    "flip {bit:#x} at {i} accepted"
                );
            }
        }
        assert!(Record::verify(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Record::verify(&longer).is_err());
    }

    #[test]
    fn size_bounds() {
        assert_eq!(
            Record::verify(&[1u8; MAX_RECORD_LEN + 1]),
            Err(RecordError::Size(1001))
        );
        assert_eq!(Record::verify(&[1u8; 10]), Err(RecordError::Size(10)));
        // A signed body too big for the limit is refused at signing.
        let big = vec![0u8; MAX_RECORD_LEN];
        assert!(matches!(
            seal(&identity(), 1, 1, &big),
            Err(RecordError::Size(_))
        ));
    }

    #[test]
    fn signature_is_checked_before_the_body() {
        let id = identity();
        // Garbage body (an unknown address family), validly signed: a field error.
        let mut garbage = body().encode().expect("encodes");
        let at = 1 + 11 + 32 + 1;
        garbage[at] = 5;
        let signed = seal(&id, 1, 1, &garbage).expect("seals");
        assert!(matches!(
            Record::verify(&signed),
            Err(RecordError::Field { .. })
        ));
        // The same with a broken signature: the signature error comes first.
        let mut forged = signed.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert_eq!(Record::verify(&forged), Err(RecordError::BadSignature));
    }

    #[test]
    fn non_canonical_bodies_are_rejected_even_when_signed() {
        let id = identity();
        let ok = body().encode().expect("encodes");
        let check = |raw: Vec<u8>, what: &str| {
            let bytes = seal(&id, 1, 1, &raw).expect("seals");
            assert!(
                matches!(Record::verify(&bytes), Err(RecordError::Field { .. })),
                "{what} accepted"
            );
        };
        let mut upper = ok.clone();
        upper[1] = b'A';
        check(upper, "uppercase handle");
        let mut trailing = ok.clone();
        trailing.push(0);
        check(trailing, "trailing byte");
        // IPv4-mapped IPv6 instead of the IPv4 form.
        let mut mapped = body();
        mapped.endpoints = vec![];
        let mut raw = mapped.encode().expect("encodes");
        let n_at = 1 + 11 + 32;
        raw[n_at] = 1;
        raw.splice(n_at + 1..n_at + 1, {
            let mut a = vec![6];
            a.extend_from_slice(&Ipv4Addr::new(1, 2, 3, 4).to_ipv6_mapped().octets());
            a.extend_from_slice(&80u16.to_be_bytes());
            a
        });
        check(raw, "mapped address");
        let mut dup = body();
        dup.endpoints.push(dup.endpoints[0]);
        assert!(dup.encode().is_err());
        assert!(Handle::new("9lives").is_err());
        assert!(Handle::new("").is_err());
        assert!(Handle::new(&"a".repeat(33)).is_err());
        assert!(Handle::new("bob smith").is_err());
    }

    #[test]
    fn freshness_and_supersession() {
        let id = identity();
        let now = Time::from_secs(1_000);
        let r1 = Record::verify(&Record::sign(&id, 1, 2_000, &body()).expect("signs")).expect("ok");
        let r2 = Record::verify(&Record::sign(&id, 2, 2_000, &body()).expect("signs")).expect("ok");
        assert!(r2.supersedes(&r1));
        assert!(!r1.supersedes(&r2));
        assert!(!r1.supersedes(&r1));
        assert_eq!(
            r1.check_supersedes(&r2),
            Err(RecordError::Stale { seq: 1, current: 2 })
        );
        let other = Identity::generate(&mut ChaCha20Rng::seed_from_u64(12));
        let r3 =
            Record::verify(&Record::sign(&other, 9, 2_000, &body()).expect("signs")).expect("ok");
        assert_eq!(r3.check_supersedes(&r1), Err(RecordError::WrongIdentity));
        assert!(!r3.supersedes(&r1));
        let expired = Record::sign(&id, 3, 999, &body()).expect("signs");
        assert_eq!(
            Record::verify_at(&expired, now),
            Err(RecordError::Expired(999))
        );
        let far = Record::sign(&id, 3, 1_000 + 2 * 24 * 3600, &body()).expect("signs");
        assert!(matches!(
            Record::verify_at(&far, now),
            Err(RecordError::ExpiryTooFar(_))
        ));
        assert!(
            Record::verify_at(&Record::sign(&id, 3, 2_000, &body()).expect("signs"), now).is_ok()
        );
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (1u32.., 1u16..)
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
            (any::<[u8; 16]>(), 1u16..)
                .prop_filter("canonical IPv6", |(ip, _)| {
                    let ip = Ipv6Addr::from(*ip);
                    !ip.is_unspecified() && ip.to_ipv4_mapped().is_none()
                })
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
        ]
    }

    fn arb_body() -> impl Strategy<Value = RecordBody> {
        (
            proptest::option::of("[a-z][a-z0-9_.-]{0,31}"),
            any::<[u8; 32]>(),
            proptest::collection::btree_set(arb_addr(), 0..=MAX_ENDPOINTS),
            proptest::collection::btree_map(any::<[u8; 32]>(), arb_addr(), 0..=MAX_SUPERNODES),
        )
            .prop_map(|(handle, key, eps, sns)| RecordBody {
                handle: handle.map(|h| Handle::new(&h).expect("the regex yields valid handles")),
                static_key: PeerKey(key),
                endpoints: eps.into_iter().collect(),
                supernodes: sns
                    .into_iter()
                    .map(|(k, addr)| HomeSupernode {
                        key: PeerKey(k),
                        addr,
                    })
                    .collect(),
            })
    }

    proptest! {
        #[test]
        fn round_trips(body in arb_body(), seq: u64, expires: u64) {
            let id = identity();
            let bytes = Record::sign(&id, seq, expires, &body).expect("signs");
            prop_assert!(bytes.len() <= MAX_RECORD_LEN);
            let rec = Record::verify(&bytes).expect("verifies");
            prop_assert_eq!(&rec.body, &body);
            prop_assert_eq!(rec.seq, seq);
            prop_assert_eq!(rec.expires, expires);
            prop_assert_eq!(rec.to_bytes(), bytes);
            let raw = body.encode().expect("encodes");
            prop_assert_eq!(RecordBody::decode(&raw).expect("decodes"), body);
        }

        #[test]
        fn decode_never_panics_and_is_canonical(raw in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(body) = RecordBody::decode(&raw) {
                prop_assert_eq!(body.encode().expect("encodes"), raw);
            }
        }
    }
}
