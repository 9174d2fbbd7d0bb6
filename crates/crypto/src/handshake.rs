//! Noise handshakes: `Noise_IK_25519_AESGCM_BLAKE2s` when the responder's static
//! key is known (from a signed record or the host cache) and
//! `Noise_XX_25519_AESGCM_BLAKE2s` on first contact, both with the prologue
//! [`PROLOGUE`] so that no other protocol's handshake can be spliced into peercall's.
//!
//! AES-256-GCM rather than ChaCha20-Poly1305: every desktop CPU peercall targets has
//! AES instructions (x86 AES-NI/VAES, ARMv8 crypto extensions), where ring's AES-GCM
//! seals and opens a 160-byte voice packet in less than half the time of its
//! ChaCha20-Poly1305 (measured by `benches/benches/crypto.rs`: 0.27 µs against 0.62 µs
//! for encrypt plus decrypt here); without them ring falls back to constant-time
//! code. Tags are 16 bytes either way, so the wire lengths are the same.
//!
//! snow does the Noise work with its ring-accelerated resolver. The one thing swapped
//! in is the random source: [`SeededResolver`] hands snow a ChaCha20 RNG seeded by the
//! caller (the endpoint draws the seed from its own seeded RNG), so ephemeral keys,
//! and thus every handshake byte, are reproducible from the endpoint's seed.
//!
//! The payloads are fixed by the wire format: [`InitPayload`] (the initiator's
//! timestamp) in IK message 1 and XX message 3, empty elsewhere. [`Handshake`]
//! checks every message against the exact lengths in `peercall_wire::packet`.

use peercall_wire::packet::{
    INIT_PAYLOAD_LEN, InitPayload, NOISE_IK_INIT_LEN, NOISE_IK_RESP_LEN, NOISE_XX_FINISH_LEN,
    NOISE_XX_INIT_LEN, NOISE_XX_RESP_LEN, Pattern, TAG_LEN,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use snow::params::{CipherChoice, DHChoice, HashChoice, NoiseParams};
use snow::resolvers::{CryptoResolver, DefaultResolver, RingResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use snow::{HandshakeState, StatelessTransportState};
use thiserror::Error;

use crate::{Identity, PeerKey};

/// Mixed into every handshake hash: peercall protocol version 1.
pub const PROLOGUE: &[u8] = b"peercall/1";
const IK: &str = "Noise_IK_25519_AESGCM_BLAKE2s";
const XX: &str = "Noise_XX_25519_AESGCM_BLAKE2s";
/// Room for the longest handshake message plus one spare tag.
const SCRATCH_LEN: usize = NOISE_IK_INIT_LEN + TAG_LEN;

/// Why a handshake step failed. The handshake state is unchanged by a failed read
/// (snow restores it), so a forged message does not break a genuine handshake.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// Noise processing failed: a bad key, a failed tag, or a message out of turn.
    #[error("noise: {0}")]
    Noise(#[from] snow::Error),
    /// A message or payload of the wrong length for this step.
    #[error("handshake message has the wrong length")]
    Length,
    /// The payload did not parse.
    #[error("handshake payload: {0}")]
    Payload(#[from] peercall_wire::WireError),
    /// A message that carries the initiator's timestamp was written without one.
    #[error("this handshake message needs the initiator's timestamp")]
    MissingTimestamp,
    /// The peer's static key was not learned (cannot happen once a pattern finishes).
    #[error("the peer's static key is unknown")]
    NoRemoteKey,
}

/// A snow RNG drawn from a seed.
struct SeededRandom(ChaCha20Rng);

impl Random for SeededRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

/// snow's ring resolver, falling back to its default (pure Rust) resolver for what
/// ring lacks (X25519, BLAKE2s), with a seeded RNG in place of the OS one.
pub struct SeededResolver {
    seed: [u8; 32],
}

impl SeededResolver {
    /// A resolver whose RNG is ChaCha20 seeded with `seed`.
    pub fn new(seed: [u8; 32]) -> SeededResolver {
        SeededResolver { seed }
    }
}

impl CryptoResolver for SeededResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(SeededRandom(ChaCha20Rng::from_seed(self.seed))))
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        RingResolver
            .resolve_dh(choice)
            .or_else(|| DefaultResolver.resolve_dh(choice))
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        RingResolver
            .resolve_hash(choice)
            .or_else(|| DefaultResolver.resolve_hash(choice))
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        RingResolver
            .resolve_cipher(choice)
            .or_else(|| DefaultResolver.resolve_cipher(choice))
    }
}

/// Parsed Noise parameters for both patterns, built once per endpoint.
#[derive(Clone)]
pub struct Protocols {
    ik: NoiseParams,
    xx: NoiseParams,
}

impl Default for Protocols {
    fn default() -> Self {
        Protocols::new()
    }
}

impl Protocols {
    /// Parses the two protocol names.
    pub fn new() -> Protocols {
        Protocols {
            ik: IK.parse().expect("a valid Noise protocol name"),
            xx: XX.parse().expect("a valid Noise protocol name"),
        }
    }

    fn params(&self, pattern: Pattern) -> NoiseParams {
        match pattern {
            Pattern::Ik => self.ik.clone(),
            Pattern::Xx => self.xx.clone(),
        }
    }
}

/// One side of one handshake, with the message lengths peercall's wire format fixes.
pub struct Handshake {
    state: HandshakeState,
    pattern: Pattern,
    /// Messages written and read so far: the position in the pattern.
    messages: usize,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("pattern", &self.pattern)
            .field("initiator", &self.state.is_initiator())
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// The initiator of an IK handshake to `remote` when it is known, else of XX.
    /// `seed` seeds the ephemeral key.
    pub fn initiator(
        protocols: &Protocols,
        local: &Identity,
        remote: Option<&PeerKey>,
        seed: [u8; 32],
    ) -> Result<Handshake, HandshakeError> {
        let pattern = if remote.is_some() {
            Pattern::Ik
        } else {
            Pattern::Xx
        };
        let builder = snow::Builder::with_resolver(
            protocols.params(pattern),
            Box::new(SeededResolver::new(seed)),
        )
        .prologue(PROLOGUE)?
        .local_private_key(local.static_secret())?;
        let builder = match remote {
            Some(key) => builder.remote_public_key(&key.0)?,
            None => builder,
        };
        Ok(Handshake {
            state: builder.build_initiator()?,
            pattern,
            messages: 0,
        })
    }

    /// The responder of a handshake of `pattern`.
    pub fn responder(
        protocols: &Protocols,
        local: &Identity,
        pattern: Pattern,
        seed: [u8; 32],
    ) -> Result<Handshake, HandshakeError> {
        let state = snow::Builder::with_resolver(
            protocols.params(pattern),
            Box::new(SeededResolver::new(seed)),
        )
        .prologue(PROLOGUE)?
        .local_private_key(local.static_secret())?
        .build_responder()?;
        Ok(Handshake {
            state,
            pattern,
            messages: 0,
        })
    }

    /// IK or XX.
    pub fn pattern(&self) -> Pattern {
        self.pattern
    }

    /// Whether this side sent the first message.
    pub fn is_initiator(&self) -> bool {
        self.state.is_initiator()
    }

    /// The Noise length of the next message, and whether it carries the timestamp.
    fn next_message(&self, step: usize) -> (usize, bool) {
        match (self.pattern, step) {
            (Pattern::Ik, 0) => (NOISE_IK_INIT_LEN, true),
            (Pattern::Ik, _) => (NOISE_IK_RESP_LEN, false),
            (Pattern::Xx, 0) => (NOISE_XX_INIT_LEN, false),
            (Pattern::Xx, 1) => (NOISE_XX_RESP_LEN, false),
            (Pattern::Xx, _) => (NOISE_XX_FINISH_LEN, true),
        }
    }

    /// Writes the next message into `out`, which must be exactly the length the wire
    /// format fixes. `timestamp` is required for the messages that carry it (IK 1, XX
    /// 3) and ignored elsewhere.
    pub fn write(
        &mut self,
        timestamp: Option<InitPayload>,
        out: &mut [u8],
    ) -> Result<usize, HandshakeError> {
        let (len, carries) = self.next_message(self.messages);
        if out.len() != len {
            return Err(HandshakeError::Length);
        }
        let bytes;
        let payload: &[u8] = if carries {
            bytes = timestamp
                .ok_or(HandshakeError::MissingTimestamp)?
                .to_bytes();
            &bytes
        } else {
            &[]
        };
        // snow wants room for a tag even where the payload travels in clear (XX
        // message 1), so write into scratch space and copy out the exact bytes.
        let mut scratch = [0u8; SCRATCH_LEN];
        let n = self.state.write_message(payload, &mut scratch)?;
        self.messages += 1;
        if n != len {
            return Err(HandshakeError::Length);
        }
        out.copy_from_slice(&scratch[..n]);
        Ok(n)
    }

    /// Reads the next message. Returns the timestamp for the messages that carry one.
    pub fn read(&mut self, message: &[u8]) -> Result<Option<InitPayload>, HandshakeError> {
        let (len, carries) = self.next_message(self.messages);
        if message.len() != len {
            return Err(HandshakeError::Length);
        }
        let mut payload = [0u8; INIT_PAYLOAD_LEN];
        let n = self.state.read_message(message, &mut payload)?;
        self.messages += 1;
        if carries {
            Ok(Some(InitPayload::parse(&payload[..n])?))
        } else if n == 0 {
            Ok(None)
        } else {
            Err(HandshakeError::Length)
        }
    }

    /// The peer's static key, once the handshake has revealed it.
    pub fn remote_static(&self) -> Option<PeerKey> {
        let key = self.state.get_remote_static()?;
        let mut out = [0u8; 32];
        out.copy_from_slice(key.get(..32)?);
        Some(PeerKey(out))
    }

    /// Whether both sides have sent all their messages.
    pub fn is_finished(&self) -> bool {
        self.state.is_handshake_finished()
    }

    /// The transport keys, once finished, with the peer's static key.
    pub fn into_transport(self) -> Result<(StatelessTransportState, PeerKey), HandshakeError> {
        let peer = self.remote_static().ok_or(HandshakeError::NoRemoteKey)?;
        Ok((self.state.into_stateless_transport_mode()?, peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(pattern: Pattern) -> (Handshake, Handshake, Identity, Identity) {
        let p = Protocols::new();
        let a = Identity::from_seed([1; 32]);
        let b = Identity::from_seed([2; 32]);
        let remote = (pattern == Pattern::Ik).then(|| b.peer_key());
        let init = Handshake::initiator(&p, &a, remote.as_ref(), [3; 32]).expect("builds");
        let resp = Handshake::responder(&p, &b, pattern, [4; 32]).expect("builds");
        (init, resp, a, b)
    }

    #[test]
    fn ik_messages_have_the_wire_lengths() {
        let (mut i, mut r, a, b) = pair(Pattern::Ik);
        let ts = InitPayload { timestamp: 42 };
        let mut m1 = [0u8; NOISE_IK_INIT_LEN];
        assert!(matches!(
            i.write(None, &mut m1),
            Err(HandshakeError::MissingTimestamp)
        ));
        assert_eq!(
            i.write(Some(ts), &mut m1).expect("writes"),
            NOISE_IK_INIT_LEN
        );
        assert!(r.read(&m1[..NOISE_IK_INIT_LEN - 1]).is_err());
        assert_eq!(r.read(&m1).expect("reads"), Some(ts));
        assert_eq!(r.remote_static(), Some(a.peer_key()));
        let mut m2 = [0u8; NOISE_IK_RESP_LEN];
        assert_eq!(r.write(None, &mut m2).expect("writes"), NOISE_IK_RESP_LEN);
        assert_eq!(i.read(&m2).expect("reads"), None);
        assert!(i.is_finished() && r.is_finished());
        let (ti, peer_of_i) = i.into_transport().expect("transport");
        let (tr, peer_of_r) = r.into_transport().expect("transport");
        assert_eq!((peer_of_i, peer_of_r), (b.peer_key(), a.peer_key()));
        let mut ct = [0u8; 32];
        let mut pt = [0u8; 32];
        let n = ti.write_message(7, b"hi", &mut ct).expect("encrypts");
        assert_eq!(tr.read_message(7, &ct[..n], &mut pt).expect("decrypts"), 2);
        assert!(tr.read_message(8, &ct[..n], &mut pt).is_err());
    }

    #[test]
    fn xx_messages_have_the_wire_lengths() {
        let (mut i, mut r, a, b) = pair(Pattern::Xx);
        let mut m1 = [0u8; NOISE_XX_INIT_LEN];
        assert_eq!(i.write(None, &mut m1).expect("writes"), NOISE_XX_INIT_LEN);
        assert_eq!(r.read(&m1).expect("reads"), None);
        let mut m2 = [0u8; NOISE_XX_RESP_LEN];
        assert_eq!(r.write(None, &mut m2).expect("writes"), NOISE_XX_RESP_LEN);
        assert_eq!(i.read(&m2).expect("reads"), None);
        assert_eq!(i.remote_static(), Some(b.peer_key()));
        let ts = InitPayload { timestamp: 9 };
        let mut m3 = [0u8; NOISE_XX_FINISH_LEN];
        assert_eq!(
            i.write(Some(ts), &mut m3).expect("writes"),
            NOISE_XX_FINISH_LEN
        );
        assert_eq!(r.read(&m3).expect("reads"), Some(ts));
        assert_eq!(r.remote_static(), Some(a.peer_key()));
    }

    #[test]
    fn the_seed_fixes_the_ephemeral_key() {
        let first = |seed| {
            let p = Protocols::new();
            let mut hs = Handshake::initiator(&p, &Identity::from_seed([1; 32]), None, seed)
                .expect("builds");
            let mut m = [0u8; NOISE_XX_INIT_LEN];
            hs.write(None, &mut m).expect("writes");
            m
        };
        assert_eq!(first([5; 32]), first([5; 32]));
        assert_ne!(first([5; 32]), first([6; 32]));
    }
}
