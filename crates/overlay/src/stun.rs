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

/// Parses a STUN datagram; `None` for anything that is not a well-formed Binding
/// request or success response with a mapped address.
pub fn parse(datagram: &[u8]) -> Option<StunMessage> {
    if !(STUN_HEADER_LEN..=MAX_STUN_LEN).contains(&datagram.len()) {
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
            if message
                .unknown_attributes()
                .any(|a| stun_codec::Attribute::get_type(a).as_u16() < 0x8000)
            {
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

    proptest! {
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
