//! Which datagrams on the shared port are the gateway's, and that no datagram can
//! make it panic or lose a working session.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::Net;
use peercall_gateway::{CallKey, GatewayEvent, local_ufrag};
use proptest::prelude::*;

/// A STUN binding request with USERNAME `username` and a (wrong) MESSAGE-INTEGRITY.
fn binding_request(username: &str) -> Vec<u8> {
    let mut attrs = Vec::new();
    attrs.extend_from_slice(&[0x00, 0x06]);
    attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attrs.extend_from_slice(username.as_bytes());
    while attrs.len() % 4 != 0 {
        attrs.push(0);
    }
    // MESSAGE-INTEGRITY (0x0008), 20 bytes of HMAC-SHA1 that is not the session's.
    attrs.extend_from_slice(&[0x00, 0x08, 0x00, 20]);
    attrs.extend_from_slice(&[0xAB; 20]);
    let mut msg = vec![0x00, 0x01];
    msg.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    msg.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
    msg.extend_from_slice(&[9; 12]);
    msg.extend_from_slice(&attrs);
    msg
}

fn ufrag_of(answer: &str) -> String {
    answer
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:"))
        .expect("the answer carries an ufrag")
        .to_owned()
}

fn stranger() -> SocketAddr {
    "198.51.100.7:40000".parse().expect("an address")
}

#[test]
fn stun_is_routed_by_ufrag_and_nothing_else() {
    let mut net = Net::seeded();
    let (_, accepted) = net.add_browser(50_000, CallKey(1));
    let ufrag = ufrag_of(&accepted.answer);
    assert_eq!(ufrag.len(), 16);
    let now = net.now;

    // Addressed to the session: the gateway's, whoever sends it. str0m then checks
    // its integrity and, this one being forged, neither answers nor learns the
    // sender's address.
    let forged = binding_request(&format!("{ufrag}:remote"));
    assert_eq!(local_ufrag(&forged), Some(ufrag.as_str()));
    assert!(net.gw.handle_datagram(now, stranger(), &forged));
    assert_eq!(net.gw.poll_transmit(), None, "no answer to a forged check");

    // Not the session's: the engine's.
    let other = binding_request("someoneelse:remote");
    assert!(!net.gw.handle_datagram(now, stranger(), &other));
    let swapped = binding_request(&format!("remote:{ufrag}"));
    assert!(!net.gw.handle_datagram(now, stranger(), &swapped));
    // peercall's own reflexive probe: a bare binding request, no USERNAME.
    let mut bare = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    bare.extend_from_slice(&[5; 12]);
    assert!(!net.gw.handle_datagram(now, stranger(), &bare));
    // A binding response (what peercall's reflexive discovery receives).
    let mut response = bare.clone();
    response[0] = 0x01;
    assert!(!net.gw.handle_datagram(now, stranger(), &response));

    // The forged check did not make the stranger's DTLS or RTP routable.
    let dtls = [22u8, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert!(!net.gw.handle_datagram(now, stranger(), &dtls));
    let rtp = [0x80u8, 111, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0xF8];
    assert!(!net.gw.handle_datagram(now, stranger(), &rtp));
    // peercall's own packets are never the gateway's.
    for first in 4..=15u8 {
        assert!(!net.gw.handle_datagram(now, stranger(), &[first, 1, 2, 3]));
    }
    assert!(!net.gw.handle_datagram(now, stranger(), &[]));

    // The real browser still connects (its checks carry the right integrity).
    let id = accepted.session;
    net.run_until(Duration::from_secs(5), |n| n.gateway_connected(id));
    assert!(net.untaken.is_empty(), "{:?}", net.untaken);
    let stats = net.gw.stats();
    assert!(stats.datagrams_in > 0);
}

#[test]
fn once_connected_the_browsers_address_is_the_gateways() {
    let mut net = Net::seeded();
    let (b, accepted) = net.add_browser(50_000, CallKey(1));
    let id = accepted.session;
    net.run_until(Duration::from_secs(5), |n| n.gateway_connected(id));
    let browser = net.browsers[b].addr;
    let now = net.now;
    // DTLS and RTP ranges from the browser go to its session (str0m drops junk).
    assert!(net.gw.handle_datagram(now, browser, &[22, 0, 0]));
    assert!(net.gw.handle_datagram(now, browser, &[0x80, 0, 0]));
    // Other ranges are not WebRTC, even from the browser.
    assert!(!net.gw.handle_datagram(now, browser, &[64, 0, 0]));
    assert!(!net.gw.handle_datagram(now, browser, &[200, 0, 0]));
    assert!(!net.gw.handle_datagram(now, browser, &[10, 1, 0, 0]));
    // The same port on another host is a stranger.
    let mut other = browser;
    other.set_ip("127.0.0.2".parse().expect("an ip"));
    assert!(!net.gw.handle_datagram(now, other, &[0x80, 0, 0]));
}

/// First bytes from every range of the demultiplexing table.
fn any_first_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        0..=3u8,
        4..=15u8,
        16..=63u8,
        64..=127u8,
        128..=191u8,
        192..=255u8,
    ]
}

fn any_datagram() -> impl Strategy<Value = Vec<u8>> {
    (
        any_first_byte(),
        proptest::collection::vec(any::<u8>(), 0..1500),
    )
        .prop_map(|(first, mut rest)| {
            rest.insert(0, first);
            rest
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Garbage from the browser's own address, from strangers, and mangled copies
    /// of the browser's real datagrams: no panic, and the call goes on.
    #[test]
    fn no_datagram_panics_or_breaks_a_session(
        junk in proptest::collection::vec((any_datagram(), any::<bool>()), 1..40),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..40),
    ) {
        let mut net = Net::seeded();
        let (b, accepted) = net.add_browser(50_000, CallKey(1));
        let id = accepted.session;
        // Junk during set-up, before anything is validated.
        for (datagram, _) in &junk {
            net.gw.handle_datagram(net.now, stranger(), datagram);
        }
        net.run_until(Duration::from_secs(5), |n| n.gateway_connected(id));
        let browser = net.browsers[b].addr;
        for (datagram, from_browser) in &junk {
            let from = if *from_browser { browser } else { stranger() };
            net.gw.handle_datagram(net.now, from, datagram);
        }
        // Mangled replays of what the browser really sent (STUN, DTLS, SRTP).
        let sent = net.browsers[b].sent.clone();
        for (i, (pos, value)) in flips.iter().enumerate() {
            let mut copy = sent[i % sent.len()].clone();
            let at = pos % copy.len();
            copy[at] ^= value | 1;
            net.gw.handle_datagram(net.now, browser, &copy);
            // Truncations too.
            net.gw.handle_datagram(net.now, browser, &copy[..at]);
        }
        net.settle();
        prop_assert!(net.gw.is_connected(id), "{:?}", net.events);
        // Audio still flows both ways.
        let before = net.browsers[b].received.len();
        let at = net.instant(net.now);
        net.browsers[b].send_opus(at, 96_000, &[0xF8, 0xAA, 0xBB]);
        net.gw.send_audio(id, net.now, 7, &[0xF8, 0xCC]).expect("send");
        net.run(Duration::from_millis(100), |_| {});
        let got_up = net.events.iter().any(|e| matches!(e,
            GatewayEvent::AudioFrame { opus, .. } if opus == &vec![0xF8, 0xAA, 0xBB]));
        prop_assert!(got_up);
        prop_assert!(net.browsers[b].received.len() > before);
    }
}
