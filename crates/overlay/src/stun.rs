//! STUN Binding (RFC 8489, wire-compatible with RFC 5389) on the shared port, through
//! the `stun_codec` crate.
//!
//! Every node answers Binding requests statelessly with the source address it saw
//! (XOR-MAPPED-ADDRESS), so a standard STUN client gets a correct answer; nodes send
//! Binding requests to their supernodes to learn their reflexive address, and
//! supernodes send them to election candidates to dial them back. Only the
//! overlay's own transaction ids are accepted as answers.
//!
//! Amplification: a success response carries XOR-MAPPED-ADDRESS and, when the
//! request had one, FINGERPRINT; nothing else (no SOFTWARE). It is at most 12 bytes
//! longer than the smallest request it answers (32 bytes for a bare 20-byte IPv4
//! request), one datagram for one, and the engine also caps the answer rate.

use std::net::SocketAddr;

use bytecodec::{DecodeExt, EncodeExt};
use stun_codec::rfc5389::attributes::{Fingerprint, XorMappedAddress};
use stun_codec::rfc5389::{Attribute, methods::BINDING};
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};

/// The smallest STUN message: the 20-byte header.
pub const STUN_HEADER_LEN: usize = 20;
/// The largest STUN datagram the node looks at; Binding requests are tiny, and a
/// bigger one is not worth decoding.
pub const MAX_STUN_LEN: usize = 548;

/// A STUN datagram the node cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StunMessage {
    /// A Binding request: answer it.
    Request {
        /// Its transaction id.
        txid: [u8; 12],
        /// Whether it carried FINGERPRINT (then the answer does too).
        fingerprint: bool,
    },
    /// A Binding success response.
    Response {
        /// Its transaction id.
        txid: [u8; 12],
        /// The reflexive address it reports.
        mapped: SocketAddr,
    },
}

/// The CHANGE-REQUEST attribute (RFC 5780 §7.2, from RFC 3489).
const CHANGE_REQUEST: u16 = 0x0003;
/// RFC 5389's magic cookie: its absence marks a classic RFC 3489 message.
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// Parses a STUN datagram; `None` for anything that is not a well-formed Binding
/// request or success response with a mapped address.
pub fn parse(datagram: &[u8]) -> Option<StunMessage> {
    if !(STUN_HEADER_LEN..=MAX_STUN_LEN).contains(&datagram.len()) {
        return None;
    }
    if datagram[4..8] != MAGIC_COOKIE {
        return None;
    }
    let mut decoder = MessageDecoder::<Attribute>::new();
    let message = decoder.decode_from_bytes(datagram).ok()?.ok()?;
    if message.method() != BINDING {
        return None;
    }
    let txid = *message.transaction_id().as_bytes();
    match message.class() {
        MessageClass::Request => {
            // RFC 8489 §6.3.1: unknown comprehension-required attributes get a 420
            // error; this node answers only plain Binding requests and stays silent.
            // CHANGE-REQUEST (RFC 5780) asking for no change is a plain request; one
            // asking for another address or port cannot be honoured by a node with
            // one address, so it goes unanswered, which is what such a client expects
            // from a server without an alternate address.
            if message.unknown_attributes().any(|a| {
                let t = stun_codec::Attribute::get_type(a).as_u16();
                t < 0x8000 && !(t == CHANGE_REQUEST && a.value() == [0, 0, 0, 0])
            }) {
                return None;
            }
            let fingerprint = message.get_attribute::<Fingerprint>().is_some();
            Some(StunMessage::Request { txid, fingerprint })
        }
        MessageClass::SuccessResponse => {
            let mapped = message.get_attribute::<XorMappedAddress>()?.address();
            Some(StunMessage::Response { txid, mapped })
        }
        _ => None,
    }
}

/// The success response to a Binding request with `txid` seen from `from`.
pub fn response(txid: [u8; 12], from: SocketAddr, fingerprint: bool) -> Option<Vec<u8>> {
    let mut message = Message::<Attribute>::new(
        MessageClass::SuccessResponse,
        BINDING,
        TransactionId::new(txid),
    );
    message.add_attribute(XorMappedAddress::new(from));
    if fingerprint {
        let fp = Fingerprint::new(&message).ok()?;
        message.add_attribute(fp);
    }
    MessageEncoder::new().encode_into_bytes(message).ok()
}

/// Answers a classic RFC 3489 Binding request (no magic cookie: the whole 16 bytes
/// after the length are the transaction id), as older clients such as the
/// `stun-client` package's `stun` send it: a Binding response with MAPPED-ADDRESS
/// (32 bytes for IPv4). `stun_codec` speaks only RFC 5389 and later, so this legacy
/// layout is written here; it has one attribute. Requests with attributes other
/// than a CHANGE-REQUEST asking for no change (RESPONSE-ADDRESS would aim the answer
/// at a third party) are not answered.
pub fn classic_response(datagram: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    if !(STUN_HEADER_LEN..=MAX_STUN_LEN).contains(&datagram.len())
        || datagram[0..2] != [0x00, 0x01]
        || datagram[4..8] == MAGIC_COOKIE
    {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    if STUN_HEADER_LEN + len != datagram.len() || len % 4 != 0 {
        return None;
    }
    let mut attrs = &datagram[STUN_HEADER_LEN..];
    while !attrs.is_empty() {
        if attrs.len() < 4 {
            return None;
        }
        let t = u16::from_be_bytes([attrs[0], attrs[1]]);
        let l = usize::from(u16::from_be_bytes([attrs[2], attrs[3]]));
        let padded = 4 + l.div_ceil(4) * 4;
        if attrs.len() < padded {
            return None;
        }
        let no_change = t == CHANGE_REQUEST && l == 4 && attrs[4..8] == [0, 0, 0, 0];
        if !no_change && t < 0x8000 {
            return None;
        }
        attrs = &attrs[padded..];
    }
    let (family, ip): (u8, Vec<u8>) = match from {
        SocketAddr::V4(a) => (1, a.ip().octets().to_vec()),
        SocketAddr::V6(a) => (2, a.ip().octets().to_vec()),
    };
    let attr_len = 4 + ip.len();
    let mut out = Vec::with_capacity(STUN_HEADER_LEN + 4 + attr_len);
    out.extend_from_slice(&[0x01, 0x01]);
    out.extend_from_slice(&((4 + attr_len) as u16).to_be_bytes());
    out.extend_from_slice(&datagram[4..20]);
    out.extend_from_slice(&[0x00, 0x01]);
    out.extend_from_slice(&(attr_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, family]);
    out.extend_from_slice(&from.port().to_be_bytes());
    out.extend_from_slice(&ip);
    Some(out)
}

/// A Binding request with `txid` (with FINGERPRINT, as RFC 8489 recommends when
/// STUN shares a port with other protocols).
pub fn request(txid: [u8; 12]) -> Vec<u8> {
    let mut message =
        Message::<Attribute>::new(MessageClass::Request, BINDING, TransactionId::new(txid));
    if let Ok(fp) = Fingerprint::new(&message) {
        message.add_attribute(fp);
    }
    MessageEncoder::new()
        .encode_into_bytes(message)
        .expect("a Binding request with a fingerprint always encodes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_response_round_trip() {
        let txid = [7u8; 12];
        let req = request(txid);
        assert_eq!(req.len(), 28);
        assert_eq!(
            parse(&req),
            Some(StunMessage::Request {
                txid,
                fingerprint: true
            })
        );
        let from: SocketAddr = "203.0.113.9:40000".parse().expect("addr");
        let resp = response(txid, from, true).expect("encodes");
        assert!(
            resp.len() <= req.len() + 12,
            "no amplification beyond 12 bytes"
        );
        assert_eq!(
            parse(&resp),
            Some(StunMessage::Response { txid, mapped: from })
        );
        let v6: SocketAddr = "[2001:db8::1]:5".parse().expect("addr");
        let resp = response(txid, v6, false).expect("encodes");
        assert_eq!(
            parse(&resp),
            Some(StunMessage::Response { txid, mapped: v6 })
        );
    }

    #[test]
    fn rfc5769_style_bare_request_is_answered() {
        // A bare RFC 5389 Binding request as stunclient sends it: header only.
        let mut bare = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        bare.extend_from_slice(&[1; 12]);
        assert_eq!(
            parse(&bare),
            Some(StunMessage::Request {
                txid: [1; 12],
                fingerprint: false
            })
        );
        let from: SocketAddr = "192.0.2.1:32853".parse().expect("addr");
        let resp = response([1; 12], from, false).expect("encodes");
        assert_eq!(resp.len(), 32);
        // Wrong magic cookie: not STUN as RFC 5389 knows it.
        bare[4] = 0;
        assert_eq!(parse(&bare), None);
    }

    #[test]
    fn change_requests_and_classic_clients() {
        // RFC 5389 request with CHANGE-REQUEST asking for no change: answered.
        let mut req = vec![0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42];
        req.extend_from_slice(&[3; 12]);
        req.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0]);
        assert_eq!(
            parse(&req),
            Some(StunMessage::Request {
                txid: [3; 12],
                fingerprint: false
            })
        );
        // Asking for another address or port: not answered.
        req[27] = 0x02;
        assert_eq!(parse(&req), None);
        // Classic RFC 3489 request as the stun-client package sends it.
        let mut classic = vec![0x00, 0x01, 0x00, 0x08];
        classic.extend_from_slice(&[9; 16]);
        classic.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0]);
        assert_eq!(parse(&classic), None, "not RFC 5389");
        let from: SocketAddr = "192.0.2.7:5000".parse().expect("addr");
        let resp = classic_response(&classic, from).expect("answered");
        assert_eq!(resp.len(), 32);
        assert_eq!(&resp[0..4], &[0x01, 0x01, 0x00, 0x0c]);
        assert_eq!(&resp[4..20], &[9; 16]);
        assert_eq!(&resp[20..32], &[0, 1, 0, 8, 0, 1, 0x13, 0x88, 192, 0, 2, 7]);
        classic[27] = 0x06;
        assert_eq!(classic_response(&classic, from), None, "change requested");
        classic[27] = 0;
        classic[21] = 0x02; // RESPONSE-ADDRESS
        assert_eq!(
            classic_response(&classic, from),
            None,
            "no reflection elsewhere"
        );
        assert_eq!(classic_response(&classic[..22], from), None);
    }

    proptest! {
        #[test]
        fn classic_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let from: SocketAddr = "192.0.2.7:5000".parse().expect("addr");
            if let Some(r) = classic_response(&bytes, from) {
                prop_assert!(r.len() <= bytes.len() + 12);
            }
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn parse_survives_corrupted_requests(txid: [u8; 12], at in 0usize..28, bit in 0u8..8) {
            let mut req = request(txid);
            req[at] ^= 1 << bit;
            let _ = parse(&req);
        }
    }
}
