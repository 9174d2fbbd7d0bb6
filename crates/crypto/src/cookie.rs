//! Denial-of-service defence for handshakes: `mac1`, `mac2` and cookie replies, after
//! the scheme WireGuard uses (its paper, section 5.4.7), written for peercall's
//! packets.
//!
//! * **mac1** is a keyed BLAKE2s-128 over the initiation up to `mac1`, keyed by
//!   BLAKE2s-256(`"mac1----"` ‖ responder static public key). A responder checks it
//!   before anything else and answers nothing when it fails, so a scanner that does
//!   not know a node's key cannot even learn that the node runs peercall.
//!
//!   An XX initiation is sent to a node whose key is not known yet, so its mac1 is
//!   keyed by a fixed network label, [`XX_NETWORK_LABEL`], instead. That mac1 only
//!   filters garbage and other protocols; it proves nothing. A responder that does
//!   not want to be discoverable refuses XX (`EndpointConfig::accept_xx`).
//! * **Cookie**: under load, a responder answers an initiation whose `mac2` does not
//!   verify with a cookie reply and no state. The cookie is a keyed BLAKE2s-128 of
//!   the source IP and port under a secret that rotates every
//!   [`COOKIE_SECRET_LIFETIME`]. It travels sealed with XChaCha20-Poly1305 under
//!   BLAKE2s-256(`"cookie--"` ‖ responder key, or the XX label), a random nonce, and
//!   the initiation's mac1 as associated data, so only the sender of that initiation
//!   can use it. The reply (64 bytes) is smaller than any initiation (72 or 144), so a
//!   spoofed initiation is never amplified.
//! * **mac2** is a keyed BLAKE2s-128 over the initiation up to `mac2`, keyed by the
//!   cookie: proof that the initiator receives packets at its source address. An
//!   initiator keeps each cookie for its destination for [`COOKIE_SECRET_LIFETIME`]
//!   minus [`COOKIE_EXPIRY_MARGIN`].

use std::net::SocketAddr;
use std::time::Duration;

use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use peercall_wire::packet::{
    COOKIE_LEN, COOKIE_NONCE_LEN, CookieReply, Initiation, MAC_LEN, Pattern, SEALED_COOKIE_LEN,
};
use peercall_wire::{Packet, Time, WireError};
use rand_core::RngCore;

use crate::PeerKey;
use crate::lru::LruMap;

/// Domain label of the mac1 key derivation.
const MAC1_LABEL: &[u8; 8] = b"mac1----";
/// Domain label of the cookie-sealing key derivation.
const COOKIE_LABEL: &[u8; 8] = b"cookie--";
/// What XX initiations key mac1 and cookies with, in place of the unknown responder
/// key. Public: it filters garbage, it authenticates nothing.
pub const XX_NETWORK_LABEL: &[u8] = b"peercall/1 xx";
/// How long a responder's cookie secret lives; a cookie is valid no longer.
pub const COOKIE_SECRET_LIFETIME: Duration = Duration::from_secs(120);
/// How much sooner than [`COOKIE_SECRET_LIFETIME`] an initiator stops using a
/// cookie: a round trip and some clock-rate difference. Using a cookie the responder
/// has already rotated away costs only one more cookie round trip.
pub const COOKIE_EXPIRY_MARGIN: Duration = Duration::from_secs(5);

type Mac128 = Blake2sMac<U16>;

fn derive(label: &[u8; 8], name: &[u8]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    h.update(label);
    h.update(name);
    h.finalize().into()
}

fn keyed(key: &[u8]) -> Mac128 {
    // Keys here are 16 or 32 bytes; BLAKE2s takes up to 32.
    <Mac128 as KeyInit>::new_from_slice(key).expect("BLAKE2s keys up to 32 bytes are valid")
}

fn mac(key: &[u8], data: &[u8]) -> [u8; MAC_LEN] {
    let mut m = keyed(key);
    Mac::update(&mut m, data);
    m.finalize().into_bytes().into()
}

fn verify(key: &[u8], data: &[u8], tag: &[u8; MAC_LEN]) -> bool {
    let mut m = keyed(key);
    Mac::update(&mut m, data);
    // Constant time.
    m.verify_slice(tag).is_ok()
}

/// The keys bound to one responder name: its static public key for IK, or
/// [`XX_NETWORK_LABEL`] for XX.
#[derive(Clone)]
pub struct MacKeys {
    mac1: [u8; 32],
    cookie: [u8; 32],
}

impl MacKeys {
    /// Keys for initiations to the node with static key `responder` (IK).
    pub fn for_peer(responder: &PeerKey) -> MacKeys {
        MacKeys::named(&responder.0)
    }

    /// Keys for XX initiations.
    pub fn for_xx() -> MacKeys {
        MacKeys::named(XX_NETWORK_LABEL)
    }

    fn named(name: &[u8]) -> MacKeys {
        MacKeys {
            mac1: derive(MAC1_LABEL, name),
            cookie: derive(COOKIE_LABEL, name),
        }
    }

    /// Writes mac1 into an encoded initiation `packet` (whose last 32 bytes are the
    /// two MACs) and returns it.
    pub fn write_mac1(&self, packet: &mut [u8]) -> [u8; MAC_LEN] {
        let tag = mac(&self.mac1, Initiation::mac1_input(packet));
        let at = packet.len().saturating_sub(2 * MAC_LEN);
        if let Some(field) = packet.get_mut(at..at + MAC_LEN) {
            field.copy_from_slice(&tag);
        }
        tag
    }

    /// Whether the mac1 of an encoded initiation `packet` verifies, in constant time.
    pub fn verify_mac1(&self, packet: &[u8], mac1: &[u8; MAC_LEN]) -> bool {
        verify(&self.mac1, Initiation::mac1_input(packet), mac1)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.cookie.into())
    }

    /// Seals `cookie` for the sender of the initiation that carried `mac1`.
    pub fn seal_cookie(
        &self,
        cookie: &[u8; COOKIE_LEN],
        nonce: &[u8; COOKIE_NONCE_LEN],
        mac1: &[u8; MAC_LEN],
    ) -> [u8; SEALED_COOKIE_LEN] {
        let mut sealed = [0u8; SEALED_COOKIE_LEN];
        let (body, tag_out) = sealed.split_at_mut(COOKIE_LEN);
        body.copy_from_slice(cookie);
        let tag = self
            .cipher()
            .encrypt_in_place_detached(XNonce::from_slice(nonce), mac1, body)
            .expect("a 16-byte message is far below the AEAD's length limit");
        tag_out.copy_from_slice(&tag);
        sealed
    }

    /// Opens the cookie in `reply` to an initiation that carried `mac1`.
    pub fn open_cookie(
        &self,
        reply: &CookieReply<'_>,
        mac1: &[u8; MAC_LEN],
    ) -> Option<[u8; COOKIE_LEN]> {
        let mut cookie = [0u8; COOKIE_LEN];
        cookie.copy_from_slice(&reply.sealed[..COOKIE_LEN]);
        self.cipher()
            .decrypt_in_place_detached(
                XNonce::from_slice(reply.nonce),
                mac1,
                &mut cookie,
                Tag::from_slice(&reply.sealed[COOKIE_LEN..]),
            )
            .ok()?;
        Some(cookie)
    }
}

/// Writes mac2 = MAC(cookie, packet up to mac2) into the last 16 bytes of `packet`.
pub fn write_mac2(packet: &mut [u8], cookie: &[u8; COOKIE_LEN]) {
    let tag = mac(cookie, Initiation::mac2_input(packet));
    let at = packet.len().saturating_sub(MAC_LEN);
    if let Some(field) = packet.get_mut(at..) {
        field.copy_from_slice(&tag);
    }
}

fn address_bytes(addr: &SocketAddr, out: &mut [u8; 18]) -> usize {
    let ip = addr.ip().to_canonical();
    let n = match ip {
        std::net::IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            4
        }
        std::net::IpAddr::V6(v6) => {
            out[..16].copy_from_slice(&v6.octets());
            16
        }
    };
    out[n..n + 2].copy_from_slice(&addr.port().to_be_bytes());
    n + 2
}

/// The responder's side: checks MACs and makes cookie replies.
pub struct CookieChecker {
    ik: MacKeys,
    xx: MacKeys,
    secret: [u8; 32],
    /// When `secret` was drawn; `None` before the first cookie.
    born: Option<Time>,
}

impl CookieChecker {
    /// A checker for the node whose static public key is `local`.
    pub fn new(local: &PeerKey) -> CookieChecker {
        CookieChecker {
            ik: MacKeys::for_peer(local),
            xx: MacKeys::for_xx(),
            secret: [0; 32],
            born: None,
        }
    }

    /// The keys for initiations of `pattern` addressed to this node.
    pub fn keys(&self, pattern: Pattern) -> &MacKeys {
        match pattern {
            Pattern::Ik => &self.ik,
            Pattern::Xx => &self.xx,
        }
    }

    fn live(&self, now: Time) -> bool {
        self.born
            .is_some_and(|born| now.saturating_since(born) < COOKIE_SECRET_LIFETIME)
    }

    fn cookie(&self, from: &SocketAddr) -> [u8; COOKIE_LEN] {
        let mut buf = [0u8; 18];
        let n = address_bytes(from, &mut buf);
        mac(&self.secret, &buf[..n])
    }

    /// Whether the mac2 of initiation `packet` proves it came from `from`.
    pub fn verify_mac2(
        &self,
        now: Time,
        packet: &[u8],
        mac2: &[u8; MAC_LEN],
        from: &SocketAddr,
    ) -> bool {
        self.live(now) && verify(&self.cookie(from), Initiation::mac2_input(packet), mac2)
    }

    /// Writes a cookie reply to `init` (whose encoding is `packet`) from `from` into
    /// `out`, rotating the secret when it is due.
    pub fn write_reply(
        &mut self,
        now: Time,
        rng: &mut impl RngCore,
        init: &Initiation<'_>,
        from: &SocketAddr,
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        if !self.live(now) {
            rng.fill_bytes(&mut self.secret);
            self.born = Some(now);
        }
        let mut nonce = [0u8; COOKIE_NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let sealed = self
            .keys(init.pattern)
            .seal_cookie(&self.cookie(from), &nonce, &init.mac1);
        Packet::CookieReply(CookieReply {
            receiver: init.sender,
            nonce: &nonce,
            sealed: &sealed,
        })
        .encode(out)
    }
}

/// The initiator's side: cookies received, per destination address, in a bounded
/// table.
pub struct CookieJar {
    cookies: LruMap<SocketAddr, ([u8; COOKIE_LEN], Time)>,
}

impl CookieJar {
    /// A jar holding at most `capacity` cookies.
    pub fn new(capacity: usize) -> CookieJar {
        CookieJar {
            cookies: LruMap::new(capacity),
        }
    }

    /// Keeps `cookie` for initiations to `to`.
    pub fn store(&mut self, now: Time, to: SocketAddr, cookie: [u8; COOKIE_LEN]) {
        self.cookies.insert(to, (cookie, now));
    }

    /// The cookie for `to`, if one is held and still fresh.
    pub fn get(&mut self, now: Time, to: &SocketAddr) -> Option<[u8; COOKIE_LEN]> {
        let (cookie, got) = *self.cookies.peek(to)?;
        if now.saturating_since(got) < COOKIE_SECRET_LIFETIME.saturating_sub(COOKIE_EXPIRY_MARGIN) {
            Some(cookie)
        } else {
            self.cookies.remove(to);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn initiation(keys: &MacKeys) -> Vec<u8> {
        let noise = [3u8; peercall_wire::packet::NOISE_XX_INIT_LEN];
        let mut buf = vec![0u8; 72];
        let n = Packet::Initiation(Initiation {
            pattern: Pattern::Xx,
            sender: 77,
            noise: &noise,
            mac1: [0; 16],
            mac2: [0; 16],
        })
        .encode(&mut buf)
        .expect("fits");
        buf.truncate(n);
        keys.write_mac1(&mut buf);
        buf
    }

    fn parse(packet: &[u8]) -> Initiation<'_> {
        match Packet::parse(packet) {
            Ok(Packet::Initiation(i)) => i,
            other => panic!("not an initiation: {other:?}"),
        }
    }

    #[test]
    fn mac1_binds_key_and_bytes() {
        let alice = PeerKey([1; 32]);
        let keys = MacKeys::for_peer(&alice);
        let packet = initiation(&keys);
        let init = parse(&packet);
        assert!(keys.verify_mac1(&packet, &init.mac1));
        assert!(!MacKeys::for_peer(&PeerKey([2; 32])).verify_mac1(&packet, &init.mac1));
        assert!(!MacKeys::for_xx().verify_mac1(&packet, &init.mac1));
        let mut bad = packet.clone();
        bad[10] ^= 1;
        assert!(!keys.verify_mac1(&bad, &init.mac1));
    }

    #[test]
    fn cookie_round_trip_binds_address_and_expires() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let responder = PeerKey([5; 32]);
        let mut checker = CookieChecker::new(&responder);
        let keys = MacKeys::for_xx();
        let packet = initiation(&keys);
        let init = parse(&packet);
        let from: SocketAddr = "192.0.2.1:4000".parse().expect("addr");
        let now = Time::from_secs(1000);
        let mut out = [0u8; 100];
        let n = checker
            .write_reply(now, &mut rng, &init, &from, &mut out)
            .expect("fits");
        assert_eq!(n, 64);
        assert!(n <= packet.len(), "no amplification");
        let Ok(Packet::CookieReply(reply)) = Packet::parse(&out[..n]) else {
            panic!("not a cookie reply");
        };
        assert_eq!(reply.receiver, 77);
        // Only the holder of the initiation's mac1 opens it.
        assert!(keys.open_cookie(&reply, &[0; 16]).is_none());
        let cookie = keys.open_cookie(&reply, &init.mac1).expect("opens");

        let mut again = packet.clone();
        write_mac2(&mut again, &cookie);
        let init2 = parse(&again);
        assert!(checker.verify_mac2(now, &again, &init2.mac2, &from));
        let other: SocketAddr = "192.0.2.1:4001".parse().expect("addr");
        assert!(!checker.verify_mac2(now, &again, &init2.mac2, &other));
        assert!(!checker.verify_mac2(now + COOKIE_SECRET_LIFETIME, &again, &init2.mac2, &from));

        let mut jar = CookieJar::new(4);
        jar.store(now, from, cookie);
        assert_eq!(jar.get(now + Duration::from_secs(100), &from), Some(cookie));
        assert_eq!(jar.get(now + Duration::from_secs(115), &from), None);
    }
}
