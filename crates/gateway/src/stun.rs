//! Just enough STUN (RFC 8489) to route a datagram: the local half of an ICE
//! USERNAME attribute, read in place without allocating.
//!
//! ICE (RFC 8445 §7.2.2) sets USERNAME to `RFRAG:LFRAG`, where `RFRAG` is the ufrag
//! of the agent the request is addressed to. Browsers checking connectivity to the
//! gateway therefore send `<gateway session ufrag>:<browser ufrag>`, and the part
//! before the colon names the session. Integrity (MESSAGE-INTEGRITY with the
//! session's password) is checked afterwards by str0m, inside the session.

/// Bytes in the STUN header: type, length, magic cookie, transaction id.
const HEADER_LEN: usize = 20;
/// The fixed magic cookie of RFC 5389 and later, at bytes 4..8.
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// The USERNAME attribute type.
const ATTR_USERNAME: u16 = 0x0006;
/// RFC 8489 §14.3 caps USERNAME at 513 bytes.
const MAX_USERNAME_LEN: usize = 513;

/// The ufrag a STUN message is addressed to (the part of USERNAME before `:`), or
/// `None` when the datagram is not STUN with a well-formed USERNAME.
pub fn local_ufrag(datagram: &[u8]) -> Option<&str> {
    let header = datagram.get(..HEADER_LEN)?;
    // The two top bits of a STUN message are zero; the cookie is fixed.
    if header[0] & 0xC0 != 0 || header[4..8] != MAGIC_COOKIE {
        return None;
    }
    let body_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    // Attributes are 4-byte aligned, so the body length is too.
    if body_len % 4 != 0 {
        return None;
    }
    let mut attrs = datagram.get(HEADER_LEN..HEADER_LEN + body_len)?;
    while attrs.len() >= 4 {
        let kind = u16::from_be_bytes([attrs[0], attrs[1]]);
        let len = usize::from(u16::from_be_bytes([attrs[2], attrs[3]]));
        let value = attrs.get(4..4 + len)?;
        if kind == ATTR_USERNAME {
            if len > MAX_USERNAME_LEN {
                return None;
            }
            let username = std::str::from_utf8(value).ok()?;
            let (local, _remote) = username.split_once(':')?;
            return (!local.is_empty()).then_some(local);
        }
        let padded = len.div_ceil(4) * 4;
        attrs = attrs.get(4 + padded..)?;
    }
    None
}

/// A binding request carrying `username` and one other attribute before it.
#[cfg(test)]
pub(crate) fn binding_request(username: &[u8]) -> Vec<u8> {
    let mut attrs = Vec::new();
    // PRIORITY (0x0024), 4 bytes.
    attrs.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
    attrs.extend_from_slice(&ATTR_USERNAME.to_be_bytes());
    attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attrs.extend_from_slice(username);
    while attrs.len() % 4 != 0 {
        attrs.push(0);
    }
    let mut msg = vec![0x00, 0x01];
    msg.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    msg.extend_from_slice(&MAGIC_COOKIE);
    msg.extend_from_slice(&[7; 12]);
    msg.extend_from_slice(&attrs);
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_local_ufrag() {
        let msg = binding_request(b"gw1abc:browserXY");
        assert_eq!(local_ufrag(&msg), Some("gw1abc"));
    }

    #[test]
    fn rejects_what_is_not_an_ice_username() {
        assert_eq!(local_ufrag(&binding_request(b"nocolon")), None);
        assert_eq!(local_ufrag(&binding_request(b":remote")), None);
        assert_eq!(local_ufrag(&binding_request(&[0xff, b':', b'x'])), None);
        let mut no_cookie = binding_request(b"a:b");
        no_cookie[4] = 0;
        assert_eq!(local_ufrag(&no_cookie), None);
        let mut not_stun = binding_request(b"a:b");
        not_stun[0] = 0x80;
        assert_eq!(local_ufrag(&not_stun), None);
        // A header alone (no attributes), e.g. peercall's own reflexive probes.
        let mut bare = binding_request(b"a:b")[..HEADER_LEN].to_vec();
        bare[2] = 0;
        bare[3] = 0;
        assert_eq!(local_ufrag(&bare), None);
    }

    #[test]
    fn never_panics_on_truncation_or_bad_lengths() {
        let msg = binding_request(b"gw1abc:browserXY");
        for cut in 0..msg.len() {
            // Every prefix is either rejected or (never) read past its end.
            let _ = local_ufrag(&msg[..cut]);
        }
        let mut long = msg.clone();
        // Attribute length pointing past the body.
        long[HEADER_LEN + 8 + 3] = 0xff;
        assert_eq!(local_ufrag(&long), None);
        let mut odd = msg;
        odd[3] = odd[3].wrapping_add(1);
        assert_eq!(local_ufrag(&odd), None);
    }
}
