//! Property tests: everything encoded parses back to itself, `encoded_len` is exact,
//! and no input makes a parser panic.

use peercall_wire::frame::{self, CloseReason, Frame, Media, Probe, ProbeAck, Relay, Report};
use peercall_wire::packet::{
    self, CookieReply, Finish, Initiation, Packet, Pattern, Response, Transport,
};
use peercall_wire::{MAX_DATAGRAM, WireError};
use proptest::prelude::*;

fn pattern() -> impl Strategy<Value = Pattern> {
    prop_oneof![Just(Pattern::Ik), Just(Pattern::Xx)]
}

/// Owned inputs for one packet; the view borrows them.
#[derive(Debug, Clone)]
enum P {
    Init(Pattern, u32, Vec<u8>, [u8; 16], [u8; 16]),
    Resp(Pattern, u32, u32, Vec<u8>),
    Finish(u32, Vec<u8>),
    Cookie(u32, [u8; 24], [u8; 32]),
    Transport(u32, u64, Vec<u8>),
}

fn packet_input() -> impl Strategy<Value = P> {
    let bytes = |n| proptest::collection::vec(any::<u8>(), n);
    prop_oneof![
        (
            pattern(),
            any::<u32>(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>()
        )
            .prop_flat_map(move |(p, s, m1, m2)| {
                let n = Initiation::len_for(p) - 40;
                bytes(n).prop_map(move |noise| P::Init(p, s, noise, m1, m2))
            }),
        (pattern(), any::<u32>(), any::<u32>()).prop_flat_map(move |(p, s, r)| {
            let n = match p {
                Pattern::Ik => packet::NOISE_IK_RESP_LEN,
                Pattern::Xx => packet::NOISE_XX_RESP_LEN,
            };
            bytes(n).prop_map(move |noise| P::Resp(p, s, r, noise))
        }),
        (any::<u32>(), bytes(packet::NOISE_XX_FINISH_LEN)).prop_map(|(r, n)| P::Finish(r, n)),
        (any::<u32>(), any::<[u8; 24]>(), any::<[u8; 32]>())
            .prop_map(|(r, n, c)| P::Cookie(r, n, c)),
        (
            any::<u32>(),
            any::<u64>(),
            proptest::collection::vec(
                any::<u8>(),
                packet::TAG_LEN..=MAX_DATAGRAM - packet::TRANSPORT_HEADER_LEN
            )
        )
            .prop_map(|(r, c, ct)| P::Transport(r, c, ct)),
    ]
}

fn view(p: &P) -> Packet<'_> {
    match p {
        P::Init(pattern, sender, noise, mac1, mac2) => Packet::Initiation(Initiation {
            pattern: *pattern,
            sender: *sender,
            noise,
            mac1: *mac1,
            mac2: *mac2,
        }),
        P::Resp(pattern, sender, receiver, noise) => Packet::Response(Response {
            pattern: *pattern,
            sender: *sender,
            receiver: *receiver,
            noise,
        }),
        P::Finish(receiver, noise) => Packet::Finish(Finish {
            receiver: *receiver,
            noise,
        }),
        P::Cookie(receiver, nonce, sealed) => Packet::CookieReply(CookieReply {
            receiver: *receiver,
            nonce,
            sealed,
        }),
        P::Transport(receiver, counter, ciphertext) => Packet::Transport(Transport {
            receiver: *receiver,
            counter: *counter,
            ciphertext,
        }),
    }
}

#[derive(Debug, Clone)]
enum F {
    Keepalive,
    Close(u8),
    Control(Vec<u8>),
    Relay(u32, Vec<u8>),
    Probe(u16, u32, u64),
    Ack(u16, u32, u64, u32),
    Media(u16, u32, u32, u32, u8, Vec<u8>),
    Report(u16, u32, u32, u32),
    Call(Vec<u8>),
    RelayControl(Vec<u8>),
}

fn frame_input() -> impl Strategy<Value = F> {
    let body = |max| proptest::collection::vec(any::<u8>(), 1..=max);
    prop_oneof![
        Just(F::Keepalive),
        any::<u8>().prop_map(F::Close),
        body(packet::MAX_TRANSPORT_PLAINTEXT - 1).prop_map(F::Control),
        (any::<u32>(), body(packet::MAX_TRANSPORT_PLAINTEXT - 5)).prop_map(|(c, p)| F::Relay(c, p)),
        (any::<u16>(), any::<u32>(), any::<u64>()).prop_map(|(a, b, c)| F::Probe(a, b, c)),
        (any::<u16>(), any::<u32>(), any::<u64>(), any::<u32>())
            .prop_map(|(a, b, c, d)| F::Ack(a, b, c, d)),
        (
            any::<u16>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            0u8..4,
            body(frame::MAX_OPUS_PACKET)
        )
            .prop_map(|(a, b, c, d, e, p)| F::Media(a, b, c, d, e, p)),
        (any::<u16>(), any::<u32>(), any::<u32>(), any::<u32>())
            .prop_map(|(a, b, c, d)| F::Report(a, b, c, d)),
        body(packet::MAX_TRANSPORT_PLAINTEXT - 1).prop_map(F::Call),
        body(packet::MAX_TRANSPORT_PLAINTEXT - 1).prop_map(F::RelayControl),
    ]
}

fn frame_view(f: &F) -> Frame<'_> {
    match f {
        F::Keepalive => Frame::Keepalive,
        F::Close(r) => Frame::Close(CloseReason(*r)),
        F::Control(b) => Frame::Control(b),
        F::Relay(channel, packet) => Frame::Relay(Relay {
            channel: *channel,
            packet,
        }),
        F::Probe(path, seq, sent_at) => Frame::Probe(Probe {
            path: *path,
            seq: *seq,
            sent_at: *sent_at,
        }),
        F::Ack(path, seq, echo, held_us) => Frame::ProbeAck(ProbeAck {
            path: *path,
            seq: *seq,
            echo: *echo,
            held_us: *held_us,
        }),
        F::Media(path, path_seq, seq, timestamp, flags, payload) => Frame::Media(Media {
            path: *path,
            path_seq: *path_seq,
            seq: *seq,
            timestamp: *timestamp,
            flags: *flags,
            payload,
        }),
        F::Report(path, highest_seq, lost, jitter_us) => Frame::Report(Report {
            path: *path,
            highest_seq: *highest_seq,
            lost: *lost,
            jitter_us: *jitter_us,
        }),
        F::Call(b) => Frame::Call(b),
        F::RelayControl(b) => Frame::RelayControl(b),
    }
}

proptest! {
    #[test]
    fn packets_round_trip(input in packet_input()) {
        let p = view(&input);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let n = p.encode(&mut buf).unwrap();
        prop_assert_eq!(n, p.encoded_len());
        prop_assert_eq!(Packet::parse(&buf[..n]).unwrap(), p);
        // One byte short of room is refused, not truncated.
        let short = p.encode(&mut buf[..n - 1]);
        let refused = matches!(short, Err(WireError::BufferTooSmall { .. }));
        prop_assert!(refused);
    }

    #[test]
    fn frames_round_trip(input in frame_input()) {
        let f = frame_view(&input);
        let mut buf = vec![0u8; packet::MAX_TRANSPORT_PLAINTEXT];
        let n = f.encode(&mut buf).unwrap();
        prop_assert_eq!(n, f.encoded_len());
        prop_assert_eq!(Frame::parse(&buf[..n]).unwrap(), f);
    }

    #[test]
    fn parsers_never_panic_and_valid_input_re_encodes_identically(
        bytes in proptest::collection::vec(any::<u8>(), 0..1600)
    ) {
        if let Ok(p) = Packet::parse(&bytes) {
            let mut out = vec![0u8; bytes.len()];
            prop_assert_eq!(p.encode(&mut out).unwrap(), bytes.len());
            prop_assert_eq!(&out, &bytes);
        }
        if let Ok(f) = Frame::parse(&bytes) {
            let mut out = vec![0u8; bytes.len()];
            prop_assert_eq!(f.encode(&mut out).unwrap(), bytes.len());
            prop_assert_eq!(&out, &bytes);
        }
    }

    #[test]
    fn mutated_valid_packets_never_panic(input in packet_input(), pos in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
        let p = view(&input);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let n = p.encode(&mut buf).unwrap();
        buf[pos % n] = byte;
        let _ = Packet::parse(&buf[..n]);
        let _ = Packet::parse(&buf[..cut % (n + 1)]);
    }
}
