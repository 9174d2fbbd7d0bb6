//! Outer packets: the handshake, the cookie reply and transport data.
//!
//! Every packet starts with a 4-byte header: type, [`VERSION`], and two reserved
//! bytes that must be zero. All integers are big-endian. Layouts (bytes):
//!
//! ```text
//! initiation IK   | hdr 4 | sender 4 | noise 104 | mac1 16 | mac2 16 |   = 144
//! initiation XX   | hdr 4 | sender 4 | noise 32  | mac1 16 | mac2 16 |   =  72
//! response IK     | hdr 4 | sender 4 | receiver 4 | noise 48 |          =  60
//! response XX     | hdr 4 | sender 4 | receiver 4 | noise 96 |          = 108
//! finish XX       | hdr 4 | receiver 4 | noise 72 |                      =  80
//! cookie reply    | hdr 4 | receiver 4 | nonce 24 | sealed cookie 32 |   =  64
//! transport       | hdr 4 | receiver 4 | counter 8 | ciphertext 16.. |
//! ```
//!
//! `sender` and `receiver` are session indices chosen at random by each side, as in
//! WireGuard: a receiver finds its session state by index, never by address, so a
//! session survives a change of path. `mac1` covers every byte before it and `mac2`
//! every byte before `mac2` (see the crypto crate for the keys). Noise message lengths
//! are those of `Noise_*_25519_AESGCM_BLAKE2s` with the payloads defined here:
//! an 8-byte [`InitPayload`] in the first authenticated initiator message (IK message
//! 1, XX message 3) and empty payloads elsewhere.
//!
//! The cookie reply (64 bytes) is never larger than the smallest initiation it answers
//! (72 bytes), so a spoofed initiation cannot be amplified.

use crate::codec::{Reader, Writer};
use crate::{MAX_DATAGRAM, VERSION, WireError};

/// Bytes in the common packet header.
pub const HEADER_LEN: usize = 4;
/// Bytes in a MAC field.
pub const MAC_LEN: usize = 16;
/// Bytes in an X25519 public key.
pub const KEY_LEN: usize = 32;
/// Bytes in an AEAD tag (AES-256-GCM and ChaCha20-Poly1305 alike).
pub const TAG_LEN: usize = 16;
/// Bytes in the [`InitPayload`].
pub const INIT_PAYLOAD_LEN: usize = 8;
/// Noise IK message 1: `e`, encrypted `s`, encrypted payload.
pub const NOISE_IK_INIT_LEN: usize = KEY_LEN + (KEY_LEN + TAG_LEN) + INIT_PAYLOAD_LEN + TAG_LEN;
/// Noise IK message 2: `e`, encrypted empty payload.
pub const NOISE_IK_RESP_LEN: usize = KEY_LEN + TAG_LEN;
/// Noise XX message 1: `e` and an empty plaintext payload.
pub const NOISE_XX_INIT_LEN: usize = KEY_LEN;
/// Noise XX message 2: `e`, encrypted `s`, encrypted empty payload.
pub const NOISE_XX_RESP_LEN: usize = KEY_LEN + (KEY_LEN + TAG_LEN) + TAG_LEN;
/// Noise XX message 3: encrypted `s`, encrypted payload.
pub const NOISE_XX_FINISH_LEN: usize = (KEY_LEN + TAG_LEN) + INIT_PAYLOAD_LEN + TAG_LEN;
/// Bytes in a cookie reply's nonce (XChaCha20-Poly1305).
pub const COOKIE_NONCE_LEN: usize = 24;
/// Bytes in a cookie.
pub const COOKIE_LEN: usize = 16;
/// Bytes in a sealed cookie: the cookie and its tag.
pub const SEALED_COOKIE_LEN: usize = COOKIE_LEN + TAG_LEN;
/// Bytes before the ciphertext of a transport packet.
pub const TRANSPORT_HEADER_LEN: usize = HEADER_LEN + 4 + 8;
/// The largest plaintext one transport packet carries.
pub const MAX_TRANSPORT_PLAINTEXT: usize = MAX_DATAGRAM - TRANSPORT_HEADER_LEN - TAG_LEN;

/// peercall's packet types: the first byte of the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    /// Noise IK message 1.
    InitIk = 4,
    /// Noise XX message 1.
    InitXx = 5,
    /// Noise IK message 2.
    RespIk = 6,
    /// Noise XX message 2.
    RespXx = 7,
    /// Noise XX message 3.
    FinishXx = 8,
    /// A stateless cookie sent instead of a response under load.
    CookieReply = 9,
    /// Encrypted transport data carrying one [`crate::Frame`].
    Transport = 10,
}

impl PacketType {
    /// The packet type for a first byte, if it is one of peercall's.
    pub fn from_u8(b: u8) -> Option<PacketType> {
        Some(match b {
            4 => PacketType::InitIk,
            5 => PacketType::InitXx,
            6 => PacketType::RespIk,
            7 => PacketType::RespXx,
            8 => PacketType::FinishXx,
            9 => PacketType::CookieReply,
            10 => PacketType::Transport,
            _ => return None,
        })
    }

    /// A stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            PacketType::InitIk => "init_ik",
            PacketType::InitXx => "init_xx",
            PacketType::RespIk => "resp_ik",
            PacketType::RespXx => "resp_xx",
            PacketType::FinishXx => "finish_xx",
            PacketType::CookieReply => "cookie_reply",
            PacketType::Transport => "transport",
        }
    }
}

/// The Noise handshake pattern of an initiation or response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// The initiator knows the responder's static key (signed record, host cache).
    Ik,
    /// First contact: static keys are exchanged during the handshake.
    Xx,
}

/// A handshake initiation (type 4 or 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initiation<'a> {
    /// IK or XX.
    pub pattern: Pattern,
    /// The initiator's session index.
    pub sender: u32,
    /// The Noise message.
    pub noise: &'a [u8],
    /// MAC keyed by the responder's public key (or the network key for XX).
    pub mac1: [u8; MAC_LEN],
    /// MAC keyed by a cookie, or zeros when the initiator has none.
    pub mac2: [u8; MAC_LEN],
}

impl Initiation<'_> {
    fn noise_len(pattern: Pattern) -> usize {
        match pattern {
            Pattern::Ik => NOISE_IK_INIT_LEN,
            Pattern::Xx => NOISE_XX_INIT_LEN,
        }
    }

    /// The encoded length of an initiation with this pattern.
    pub const fn len_for(pattern: Pattern) -> usize {
        HEADER_LEN
            + 4
            + match pattern {
                Pattern::Ik => NOISE_IK_INIT_LEN,
                Pattern::Xx => NOISE_XX_INIT_LEN,
            }
            + 2 * MAC_LEN
    }

    /// The bytes `mac1` covers in an encoded initiation `packet`.
    pub fn mac1_input(packet: &[u8]) -> &[u8] {
        &packet[..packet.len().saturating_sub(2 * MAC_LEN)]
    }

    /// The bytes `mac2` covers in an encoded initiation `packet`.
    pub fn mac2_input(packet: &[u8]) -> &[u8] {
        &packet[..packet.len().saturating_sub(MAC_LEN)]
    }
}

/// A handshake response (type 6 or 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response<'a> {
    /// IK or XX.
    pub pattern: Pattern,
    /// The responder's session index.
    pub sender: u32,
    /// The initiator's session index, echoed.
    pub receiver: u32,
    /// The Noise message.
    pub noise: &'a [u8],
}

/// The third XX message (type 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish<'a> {
    /// The responder's session index.
    pub receiver: u32,
    /// The Noise message.
    pub noise: &'a [u8],
}

/// A cookie reply (type 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CookieReply<'a> {
    /// The initiator's session index from the initiation this answers.
    pub receiver: u32,
    /// XChaCha20-Poly1305 nonce.
    pub nonce: &'a [u8; COOKIE_NONCE_LEN],
    /// The sealed cookie.
    pub sealed: &'a [u8; SEALED_COOKIE_LEN],
}

/// Encrypted transport data (type 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transport<'a> {
    /// The receiving side's session index.
    pub receiver: u32,
    /// The explicit 64-bit nonce, strictly increasing per sending key.
    pub counter: u64,
    /// The encrypted [`crate::Frame`] and its tag.
    pub ciphertext: &'a [u8],
}

impl Transport<'_> {
    /// Writes a transport header into `out`, leaving the ciphertext to the caller.
    /// Returns [`TRANSPORT_HEADER_LEN`].
    pub fn encode_header(receiver: u32, counter: u64, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out, TRANSPORT_HEADER_LEN)?;
        header(&mut w, PacketType::Transport);
        w.u32(receiver);
        w.u64(counter);
        Ok(w.done())
    }
}

/// An 8-byte payload of the first authenticated initiator message: a timestamp in
/// microseconds since the Unix epoch, strictly increasing per initiator, so that a
/// responder rejects replayed initiations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitPayload {
    /// Microseconds since the Unix epoch.
    pub timestamp: u64,
}

impl InitPayload {
    /// Parses exactly [`INIT_PAYLOAD_LEN`] bytes.
    pub fn parse(bytes: &[u8]) -> Result<InitPayload, WireError> {
        let mut r = Reader::new(bytes);
        let timestamp = r.u64()?;
        r.finish()?;
        Ok(InitPayload { timestamp })
    }

    /// The encoding.
    pub fn to_bytes(self) -> [u8; INIT_PAYLOAD_LEN] {
        self.timestamp.to_be_bytes()
    }
}

/// Any of peercall's outer packets, borrowing the datagram it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Handshake initiation.
    Initiation(Initiation<'a>),
    /// Handshake response.
    Response(Response<'a>),
    /// Third XX message.
    Finish(Finish<'a>),
    /// Cookie reply.
    CookieReply(CookieReply<'a>),
    /// Transport data.
    Transport(Transport<'a>),
}

fn header(w: &mut Writer<'_>, t: PacketType) {
    w.u8(t as u8);
    w.u8(VERSION);
    w.u16(0);
}

fn noise<'a>(r: &mut Reader<'a>, len: usize) -> Result<&'a [u8], WireError> {
    r.bytes(len)
}

impl<'a> Packet<'a> {
    /// Parses one datagram. The length must match the type exactly.
    pub fn parse(datagram: &'a [u8]) -> Result<Packet<'a>, WireError> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(WireError::Length {
                field: "datagram",
                len: datagram.len(),
            });
        }
        let mut r = Reader::new(datagram);
        let first = r.u8()?;
        let t = PacketType::from_u8(first).ok_or(WireError::NotPeercall(first))?;
        let version = r.u8()?;
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        if r.u16()? != 0 {
            return Err(WireError::Reserved);
        }
        let packet = match t {
            PacketType::InitIk | PacketType::InitXx => {
                let pattern = if t == PacketType::InitIk {
                    Pattern::Ik
                } else {
                    Pattern::Xx
                };
                let sender = r.u32()?;
                let noise = noise(&mut r, Initiation::noise_len(pattern))?;
                let mac1 = *r.array()?;
                let mac2 = *r.array()?;
                Packet::Initiation(Initiation {
                    pattern,
                    sender,
                    noise,
                    mac1,
                    mac2,
                })
            }
            PacketType::RespIk | PacketType::RespXx => {
                let (pattern, len) = if t == PacketType::RespIk {
                    (Pattern::Ik, NOISE_IK_RESP_LEN)
                } else {
                    (Pattern::Xx, NOISE_XX_RESP_LEN)
                };
                let sender = r.u32()?;
                let receiver = r.u32()?;
                let noise = noise(&mut r, len)?;
                Packet::Response(Response {
                    pattern,
                    sender,
                    receiver,
                    noise,
                })
            }
            PacketType::FinishXx => {
                let receiver = r.u32()?;
                let noise = noise(&mut r, NOISE_XX_FINISH_LEN)?;
                Packet::Finish(Finish { receiver, noise })
            }
            PacketType::CookieReply => {
                let receiver = r.u32()?;
                let nonce = r.array()?;
                let sealed = r.array()?;
                Packet::CookieReply(CookieReply {
                    receiver,
                    nonce,
                    sealed,
                })
            }
            PacketType::Transport => {
                let receiver = r.u32()?;
                let counter = r.u64()?;
                let ciphertext = r.rest("ciphertext", TAG_LEN, MAX_DATAGRAM)?;
                Packet::Transport(Transport {
                    receiver,
                    counter,
                    ciphertext,
                })
            }
        };
        r.finish()?;
        Ok(packet)
    }

    /// The packet's type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Initiation(i) => match i.pattern {
                Pattern::Ik => PacketType::InitIk,
                Pattern::Xx => PacketType::InitXx,
            },
            Packet::Response(r) => match r.pattern {
                Pattern::Ik => PacketType::RespIk,
                Pattern::Xx => PacketType::RespXx,
            },
            Packet::Finish(_) => PacketType::FinishXx,
            Packet::CookieReply(_) => PacketType::CookieReply,
            Packet::Transport(_) => PacketType::Transport,
        }
    }

    /// The number of bytes [`Packet::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + match self {
                Packet::Initiation(i) => 4 + i.noise.len() + 2 * MAC_LEN,
                Packet::Response(r) => 8 + r.noise.len(),
                Packet::Finish(f) => 4 + f.noise.len(),
                Packet::CookieReply(_) => 4 + COOKIE_NONCE_LEN + SEALED_COOKIE_LEN,
                Packet::Transport(t) => 12 + t.ciphertext.len(),
            }
    }

    /// Writes the packet into `out` and returns its length. Noise messages and
    /// ciphertexts of the wrong length are refused, so whatever this writes parses.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let expect = |field, len: usize, want: usize| {
            if len == want {
                Ok(())
            } else {
                Err(WireError::Length { field, len })
            }
        };
        match self {
            Packet::Initiation(i) => {
                expect("noise", i.noise.len(), Initiation::noise_len(i.pattern))?
            }
            Packet::Response(r) => expect(
                "noise",
                r.noise.len(),
                match r.pattern {
                    Pattern::Ik => NOISE_IK_RESP_LEN,
                    Pattern::Xx => NOISE_XX_RESP_LEN,
                },
            )?,
            Packet::Finish(f) => expect("noise", f.noise.len(), NOISE_XX_FINISH_LEN)?,
            Packet::CookieReply(_) => {}
            Packet::Transport(t) => {
                let len = t.ciphertext.len();
                if !(TAG_LEN..=MAX_DATAGRAM - TRANSPORT_HEADER_LEN).contains(&len) {
                    return Err(WireError::Length {
                        field: "ciphertext",
                        len,
                    });
                }
            }
        }
        let mut w = Writer::new(out, self.encoded_len())?;
        header(&mut w, self.packet_type());
        match self {
            Packet::Initiation(i) => {
                w.u32(i.sender);
                w.put(i.noise);
                w.put(&i.mac1);
                w.put(&i.mac2);
            }
            Packet::Response(r) => {
                w.u32(r.sender);
                w.u32(r.receiver);
                w.put(r.noise);
            }
            Packet::Finish(f) => {
                w.u32(f.receiver);
                w.put(f.noise);
            }
            Packet::CookieReply(c) => {
                w.u32(c.receiver);
                w.put(c.nonce);
                w.put(c.sealed);
            }
            Packet::Transport(t) => {
                w.u32(t.receiver);
                w.u64(t.counter);
                w.put(t.ciphertext);
            }
        }
        Ok(w.done())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_table() {
        assert_eq!(Initiation::len_for(Pattern::Ik), 144);
        assert_eq!(Initiation::len_for(Pattern::Xx), 72);
        let reply = Packet::CookieReply(CookieReply {
            receiver: 1,
            nonce: &[0; COOKIE_NONCE_LEN],
            sealed: &[0; SEALED_COOKIE_LEN],
        });
        assert_eq!(reply.encoded_len(), 64);
        assert!(
            reply.encoded_len() <= Initiation::len_for(Pattern::Xx),
            "no amplification"
        );
    }

    #[test]
    fn strict_lengths() {
        let noise = [7u8; NOISE_XX_INIT_LEN];
        let p = Packet::Initiation(Initiation {
            pattern: Pattern::Xx,
            sender: 9,
            noise: &noise,
            mac1: [1; 16],
            mac2: [2; 16],
        });
        let mut buf = [0u8; 200];
        let n = p.encode(&mut buf).unwrap();
        assert_eq!(Packet::parse(&buf[..n]).unwrap(), p);
        assert_eq!(
            Packet::parse(&buf[..n - 1]),
            Err(WireError::Truncated { needed: 1 })
        );
        assert_eq!(Packet::parse(&buf[..n + 1]), Err(WireError::Trailing(1)));
        let mut bad = buf;
        bad[1] = 2;
        assert_eq!(Packet::parse(&bad[..n]), Err(WireError::Version(2)));
        let mut bad = buf;
        bad[3] = 1;
        assert_eq!(Packet::parse(&bad[..n]), Err(WireError::Reserved));
        assert_eq!(
            Packet::parse(&[11, 1, 0, 0]),
            Err(WireError::NotPeercall(11))
        );
        assert_eq!(Packet::parse(&[]), Err(WireError::Truncated { needed: 1 }));
    }

    #[test]
    fn transport_needs_a_tag_and_fits_a_datagram() {
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        let n = Transport::encode_header(5, 6, &mut buf).unwrap();
        assert_eq!(n, TRANSPORT_HEADER_LEN);
        assert!(matches!(
            Packet::parse(&buf[..n + TAG_LEN - 1]),
            Err(WireError::Length {
                field: "ciphertext",
                ..
            })
        ));
        assert!(Packet::parse(&buf[..n + TAG_LEN]).is_ok());
        assert!(Packet::parse(&buf[..MAX_DATAGRAM]).is_ok());
        assert!(Packet::parse(&buf[..MAX_DATAGRAM + 1]).is_err());
        let big = vec![0u8; MAX_DATAGRAM];
        let t = Packet::Transport(Transport {
            receiver: 1,
            counter: 2,
            ciphertext: &big,
        });
        assert!(t.encode(&mut vec![0; 4096]).is_err());
    }
}
