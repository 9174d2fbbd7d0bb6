use crate::PacketType;

/// What a datagram on the shared port is, judged by its first byte (RFC 7983, RFC 9443).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// STUN, first byte 0..=3.
    Stun,
    /// One of peercall's own packets.
    Peercall(PacketType),
    /// DTLS, first byte 20..=63 (WebRTC).
    Dtls,
    /// RTP or RTCP, first byte 128..=191 (WebRTC media).
    Rtp,
    /// TURN channel data, first byte 64..=79.
    TurnChannel,
    /// ZRTP, first byte 16..=19.
    Zrtp,
    /// Anything else, including peercall's reserved types and empty datagrams.
    Unknown,
}

/// Classifies a datagram by its first byte without looking further.
pub fn classify(datagram: &[u8]) -> Protocol {
    let Some(&first) = datagram.first() else {
        return Protocol::Unknown;
    };
    match first {
        0..=3 => Protocol::Stun,
        16..=19 => Protocol::Zrtp,
        20..=63 => Protocol::Dtls,
        64..=79 => Protocol::TurnChannel,
        128..=191 => Protocol::Rtp,
        b => PacketType::from_u8(b).map_or(Protocol::Unknown, Protocol::Peercall),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_7983() {
        assert_eq!(classify(&[]), Protocol::Unknown);
        assert_eq!(classify(&[0, 1]), Protocol::Stun);
        assert_eq!(classify(&[3]), Protocol::Stun);
        assert_eq!(classify(&[22]), Protocol::Dtls);
        assert_eq!(classify(&[64]), Protocol::TurnChannel);
        assert_eq!(classify(&[0x80]), Protocol::Rtp);
        assert_eq!(classify(&[191]), Protocol::Rtp);
        assert_eq!(classify(&[192]), Protocol::Unknown);
        assert_eq!(classify(&[11]), Protocol::Unknown);
        for t in 4..=10u8 {
            assert!(matches!(classify(&[t]), Protocol::Peercall(p) if p as u8 == t));
        }
    }
}
