use std::net::SocketAddr;
use std::time::Duration;

use peercall_wire::packet::{Initiation, MAC_LEN, Pattern, TRANSPORT_HEADER_LEN};
use peercall_wire::{MAX_DATAGRAM, Packet, Time, WireError};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use super::*;
use crate::ratelimit::Rate;
use crate::replay::WINDOW;
use crate::session::REJECT_AFTER_MESSAGES;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn identity(seed: u64) -> Identity {
    Identity::generate(&mut ChaCha20Rng::seed_from_u64(seed))
}

fn seed(n: u8) -> [u8; 32] {
    [n; 32]
}

const T0: Time = Time::from_secs(1_700_000_000);

fn at(secs: u64) -> Time {
    T0 + Duration::from_secs(secs)
}

struct Node {
    ep: Endpoint,
    key: PeerKey,
    addr: SocketAddr,
}

fn node(id: u64, addr_text: &str, config: EndpointConfig) -> Node {
    let identity = identity(id);
    Node {
        key: identity.peer_key(),
        ep: Endpoint::new(&identity, config, seed(id as u8)).expect("valid config"),
        addr: addr(addr_text),
    }
}

fn pair() -> (Node, Node) {
    (
        node(1, "192.0.2.1:1000", EndpointConfig::default()),
        node(2, "198.51.100.2:2000", EndpointConfig::default()),
    )
}

fn buf() -> Vec<u8> {
    vec![0u8; MAX_DATAGRAM]
}

/// Delivers `bytes` from `from` to `to`, returning the result and `to`'s output.
fn deliver(
    now: Time,
    from: &Node,
    to: &mut Node,
    bytes: &[u8],
) -> (Result<Received, Reject>, Vec<u8>) {
    let mut out = buf();
    let r = to.ep.handle(now, from.addr, bytes, &mut out);
    (r, out)
}

/// A full IK handshake from `a` to `b` at `now`, with a's confirming keepalive.
fn ik(now: Time, a: &mut Node, b: &mut Node) {
    let mut out = buf();
    let n =
        a.ep.initiate(now, b.addr, Some(b.key), &mut out)
            .expect("initiates");
    assert_eq!(n, Initiation::len_for(Pattern::Ik));
    let (r, reply) = deliver(now, a, b, &out[..n]);
    let Ok(Received::Established {
        peer,
        initiator: false,
        reply: len,
    }) = r
    else {
        panic!("responder did not establish: {r:?}");
    };
    assert_eq!(peer, a.key);
    assert_eq!(len, 60);
    let (r, _) = deliver(now, b, a, &reply[..len]);
    assert_eq!(
        r,
        Ok(Received::Established {
            peer: b.key,
            initiator: true,
            reply: 0
        })
    );
    let keepalive = seal(now, a, &b.key, b"");
    assert_eq!(
        deliver(now, a, b, &keepalive).0,
        Ok(Received::Data {
            peer: a.key,
            len: 0
        })
    );
}

fn seal(now: Time, from: &mut Node, to: &PeerKey, plaintext: &[u8]) -> Vec<u8> {
    let mut out = buf();
    let n = from
        .ep
        .encrypt(now, to, plaintext, &mut out)
        .expect("encrypts");
    out.truncate(n);
    out
}

fn open(now: Time, from: &Node, to: &mut Node, packet: &[u8]) -> Result<Vec<u8>, Reject> {
    let (r, out) = deliver(now, from, to, packet);
    match r? {
        Received::Data { peer, len } => {
            assert_eq!(peer, from.key);
            Ok(out[..len].to_vec())
        }
        other => panic!("not data: {other:?}"),
    }
}

#[test]
fn ik_handshake_then_transport_both_ways() {
    let (mut a, mut b) = pair();
    let now = at(0);
    let mut out = buf();
    let n =
        a.ep.initiate(now, b.addr, Some(b.key), &mut out)
            .expect("initiates");
    let init = out[..n].to_vec();
    let (r, reply) = deliver(now, &a, &mut b, &init);
    let Ok(Received::Established { reply: len, .. }) = r else {
        panic!("{r:?}")
    };
    // The responder does not send on unconfirmed keys.
    assert!(!b.ep.has_session(now, &a.key));
    assert_eq!(
        b.ep.encrypt(now, &a.key, b"x", &mut out),
        Err(SendError::NoSession)
    );
    assert!(matches!(
        deliver(now, &b, &mut a, &reply[..len]).0,
        Ok(Received::Established {
            initiator: true,
            ..
        })
    ));
    assert!(a.ep.has_session(now, &b.key));

    let hello = seal(now, &mut a, &b.key, b"hello bob");
    assert_eq!(hello.len(), TRANSPORT_HEADER_LEN + 9 + 16);
    assert_eq!(open(now, &a, &mut b, &hello), Ok(b"hello bob".to_vec()));
    // Key confirmation: now b sends.
    assert!(b.ep.has_session(now, &a.key));
    let back = seal(now, &mut b, &a.key, b"hi alice");
    assert_eq!(open(now, &b, &mut a, &back), Ok(b"hi alice".to_vec()));
    let stats = b.ep.stats();
    assert_eq!(stats.handshakes_completed, 1);
    assert_eq!(stats.sessions, 1);
    assert_eq!(stats.peers, 1);
    assert_eq!(a.ep.stats().handshakes_initiated, 1);
}

#[test]
fn xx_handshake_learns_both_keys() {
    let (mut a, mut b) = pair();
    let now = at(0);
    let mut out = buf();
    let n =
        a.ep.initiate(now, b.addr, None, &mut out)
            .expect("initiates");
    assert_eq!(n, Initiation::len_for(Pattern::Xx));
    let (r, msg2) = deliver(now, &a, &mut b, &out[..n]);
    let Ok(Received::Reply { len }) = r else {
        panic!("{r:?}")
    };
    assert_eq!(len, 108);
    assert_eq!(b.ep.stats().pending_responses, 1);
    let (r, msg3) = deliver(now, &b, &mut a, &msg2[..len]);
    assert_eq!(
        r,
        Ok(Received::Established {
            peer: b.key,
            initiator: true,
            reply: 80
        })
    );
    let (r, _) = deliver(now, &a, &mut b, &msg3[..80]);
    assert_eq!(
        r,
        Ok(Received::Established {
            peer: a.key,
            initiator: false,
            reply: 0
        })
    );
    assert_eq!(b.ep.stats().pending_responses, 0);
    // Replaying message 3 finds a session, not a handshake.
    assert_eq!(
        deliver(now, &a, &mut b, &msg3[..80]).0,
        Err(Reject::Unexpected)
    );
    let p = seal(now, &mut a, &b.key, b"first");
    assert_eq!(open(now, &a, &mut b, &p), Ok(b"first".to_vec()));
    let p = seal(now, &mut b, &a.key, b"second");
    assert_eq!(open(now, &b, &mut a, &p), Ok(b"second".to_vec()));
}

#[test]
fn bad_transport_packets_get_the_right_reject() {
    let (mut a, mut b) = pair();
    let now = at(0);
    ik(now, &mut a, &mut b);
    let p = seal(now, &mut a, &b.key, b"payload");

    for i in TRANSPORT_HEADER_LEN..p.len() {
        let mut bad = p.clone();
        bad[i] ^= 0x20;
        assert_eq!(
            deliver(now, &a, &mut b, &bad).0,
            Err(Reject::Decrypt),
            "flip at {i}"
        );
    }
    // A flipped counter is a different nonce: decryption fails too.
    let mut bad = p.clone();
    bad[TRANSPORT_HEADER_LEN - 2] ^= 1;
    assert_eq!(deliver(now, &a, &mut b, &bad).0, Err(Reject::Decrypt));
    let mut bad = p.clone();
    bad[4] ^= 1;
    assert_eq!(
        deliver(now, &a, &mut b, &bad).0,
        Err(Reject::UnknownSession)
    );
    assert_eq!(
        deliver(now, &a, &mut b, &p[..p.len() - 1]).0,
        Err(Reject::Decrypt)
    );
    assert!(matches!(
        deliver(now, &a, &mut b, &p[..20]).0,
        Err(Reject::Malformed(_))
    ));
    assert_eq!(
        deliver(now, &a, &mut b, &[]).0,
        Err(Reject::Malformed(WireError::Truncated { needed: 1 }))
    );

    // None of that moved the replay window: the genuine packet still decrypts, once.
    assert_eq!(open(now, &a, &mut b, &p), Ok(b"payload".to_vec()));
    assert_eq!(deliver(now, &a, &mut b, &p).0, Err(Reject::Replay));

    // A counter fallen out of the window.
    let old = seal(now, &mut a, &b.key, b"old");
    for _ in 0..WINDOW + 1 {
        seal(now, &mut a, &b.key, b"");
    }
    let newest = seal(now, &mut a, &b.key, b"new");
    assert_eq!(open(now, &a, &mut b, &newest), Ok(b"new".to_vec()));
    assert_eq!(deliver(now, &a, &mut b, &old).0, Err(Reject::Replay));
}

#[test]
fn replayed_initiation_is_stale() {
    let (mut a, mut b) = pair();
    let now = at(0);
    let mut out = buf();
    let n =
        a.ep.initiate(now, b.addr, Some(b.key), &mut out)
            .expect("initiates");
    let init = out[..n].to_vec();
    assert!(matches!(
        deliver(now, &a, &mut b, &init).0,
        Ok(Received::Established { .. })
    ));
    assert_eq!(
        deliver(at(1), &a, &mut b, &init).0,
        Err(Reject::StaleTimestamp)
    );
    // A fresh initiation (newer timestamp) is accepted.
    let n =
        a.ep.initiate(at(2), b.addr, Some(b.key), &mut out)
            .expect("initiates");
    assert!(matches!(
        deliver(at(2), &a, &mut b, &out[..n]).0,
        Ok(Received::Established { .. })
    ));
    // Even within one microsecond, timestamps strictly increase.
    let n1 =
        a.ep.initiate(at(3), b.addr, Some(b.key), &mut out)
            .expect("initiates");
    let first = out[..n1].to_vec();
    let n2 =
        a.ep.initiate(at(3), b.addr, Some(b.key), &mut out)
            .expect("initiates");
    assert!(matches!(
        deliver(at(3), &a, &mut b, &out[..n2]).0,
        Ok(Received::Established { .. })
    ));
    assert_eq!(
        deliver(at(3), &a, &mut b, &first).0,
        Err(Reject::StaleTimestamp)
    );
}

#[test]
fn rekey_keeps_traffic_flowing_and_old_keys_expire() {
    let (mut a, mut b) = pair();
    ik(at(0), &mut a, &mut b);
    assert!(!a.ep.needs_rekey(at(119), &b.key));
    assert!(a.ep.needs_rekey(at(120), &b.key));
    // The responder waits its margin longer.
    assert!(!b.ep.needs_rekey(at(120), &a.key));
    assert!(b.ep.needs_rekey(at(130), &a.key));

    // In flight under the old keys when the rekey happens.
    let old_a = seal(at(120), &mut a, &b.key, b"old from a");
    let old_b = seal(at(120), &mut b, &a.key, b"old from b");

    let mut out = buf();
    let n =
        a.ep.initiate(at(120), b.addr, Some(b.key), &mut out)
            .expect("initiates");
    // While the handshake is underway no second one is asked for.
    assert!(!a.ep.needs_rekey(at(120), &b.key));
    let (r, reply) = deliver(at(120), &a, &mut b, &out[..n]);
    let Ok(Received::Established { reply: len, .. }) = r else {
        panic!("{r:?}")
    };
    // b keeps sending on the old session until the new one is confirmed.
    let still_old = seal(at(120), &mut b, &a.key, b"still old");
    assert_eq!(
        open(at(120), &b, &mut a, &still_old),
        Ok(b"still old".to_vec())
    );
    assert!(matches!(
        deliver(at(120), &b, &mut a, &reply[..len]).0,
        Ok(Received::Established { .. })
    ));
    assert!(!a.ep.needs_rekey(at(121), &b.key));

    let new_a = seal(at(121), &mut a, &b.key, b"new from a");
    assert_eq!(
        open(at(121), &a, &mut b, &new_a),
        Ok(b"new from a".to_vec())
    );
    let new_b = seal(at(121), &mut b, &a.key, b"new from b");
    assert_eq!(
        open(at(121), &b, &mut a, &new_b),
        Ok(b"new from b".to_vec())
    );
    assert_eq!(b.ep.stats().sessions, 2);

    // Old keys still accepted until 180 s after their handshake...
    assert_eq!(
        open(at(179), &a, &mut b, &old_a),
        Ok(b"old from a".to_vec())
    );
    // ...and refused after.
    assert_eq!(
        deliver(at(180), &b, &mut a, &old_b).0,
        Err(Reject::ExpiredKey)
    );
    // Timers drop the old sessions; the new ones carry on.
    assert_eq!(a.ep.poll_timeout(), Some(at(5).max(at(180))));
    a.ep.handle_timeout(at(180));
    b.ep.handle_timeout(at(180));
    assert_eq!(a.ep.stats().sessions, 1);
    assert_eq!(
        deliver(at(180), &b, &mut a, &old_b).0,
        Err(Reject::UnknownSession)
    );
    let p = seal(at(200), &mut a, &b.key, b"later");
    assert_eq!(open(at(200), &a, &mut b, &p), Ok(b"later".to_vec()));
    // Without another rekey, everything ends at 120 + 180 s.
    assert_eq!(
        a.ep.encrypt(at(300), &b.key, b"", &mut out),
        Err(SendError::Expired)
    );
    a.ep.handle_timeout(at(300));
    assert_eq!(a.ep.stats().sessions, 0);
    assert_eq!(a.ep.stats().peers, 0);
    assert_eq!(
        a.ep.encrypt(at(300), &b.key, b"", &mut out),
        Err(SendError::NoSession)
    );
}

#[test]
fn message_limit_refuses_sending() {
    let (mut a, mut b) = pair();
    ik(at(0), &mut a, &mut b);
    let index = a.ep.peers[&b.key].current.expect("a session");
    let Some(Slot::Session(s)) = a.ep.slots.get_mut(&index) else {
        panic!("no session slot")
    };
    s.set_next_send(REKEY_AFTER_MESSAGES);
    assert!(a.ep.needs_rekey(at(1), &b.key));
    let Some(Slot::Session(s)) = a.ep.slots.get_mut(&index) else {
        panic!("no session slot")
    };
    s.set_next_send(REJECT_AFTER_MESSAGES - 1);
    let last = seal(at(1), &mut a, &b.key, b"last");
    assert_eq!(open(at(1), &a, &mut b, &last), Ok(b"last".to_vec()));
    let mut out = buf();
    assert_eq!(
        a.ep.encrypt(at(1), &b.key, b"", &mut out),
        Err(SendError::Expired)
    );
}

#[test]
fn bad_mac1_gets_no_answer_and_no_state() {
    let (mut a, mut b) = pair();
    let now = at(0);
    let mut out = buf();
    let n =
        a.ep.initiate(now, b.addr, Some(b.key), &mut out)
            .expect("initiates");
    let init = out[..n].to_vec();
    let mac1_at = n - 2 * MAC_LEN;
    for i in 0..mac1_at + MAC_LEN {
        let mut bad = init.clone();
        bad[i] ^= 1;
        let (r, reply) = deliver(now, &a, &mut b, &bad);
        assert!(
            matches!(r, Err(Reject::BadMac | Reject::Malformed(_))),
            "flip at {i}: {r:?}"
        );
        assert!(reply.iter().all(|&x| x == 0), "nothing written");
    }
    // An IK initiation for someone else's key fails mac1 here.
    let carol = identity(3).peer_key();
    let n =
        a.ep.initiate(now, b.addr, Some(carol), &mut out)
            .expect("initiates");
    assert_eq!(deliver(now, &a, &mut b, &out[..n]).0, Err(Reject::BadMac));
    let stats = b.ep.stats();
    assert_eq!(
        (stats.sessions, stats.pending_responses, stats.peers),
        (0, 0, 0)
    );
    assert_eq!(stats.rate_limit_sources, 0);
    // The genuine one still works.
    assert!(matches!(
        deliver(now, &a, &mut b, &init).0,
        Ok(Received::Established { .. })
    ));
}

fn loaded_config() -> EndpointConfig {
    EndpointConfig {
        global_handshakes: Rate::new(1, 1),
        per_source_handshakes: Rate::new(1, 2),
        source_table: NonZeroUsize::new(4).expect("non-zero"),
        ..EndpointConfig::default()
    }
}

#[test]
fn under_load_cookie_round_trip() {
    let mut b = node(2, "198.51.100.2:2000", loaded_config());
    let mut a = node(1, "192.0.2.1:1000", EndpointConfig::default());
    let mut c = node(3, "192.0.2.3:3000", EndpointConfig::default());
    let now = at(0);
    // The first handshake takes the only token.
    ik(now, &mut a, &mut b);

    let mut out = buf();
    let n =
        c.ep.initiate(now, b.addr, Some(b.key), &mut out)
            .expect("initiates");
    let plain = out[..n].to_vec();
    let (r, cookie) = deliver(now, &c, &mut b, &plain);
    assert_eq!(r, Ok(Received::Reply { len: 64 }));
    assert!(64 <= n, "a cookie reply is never larger than the request");
    assert!(matches!(
        Packet::parse(&cookie[..64]),
        Ok(Packet::CookieReply(_))
    ));
    assert_eq!(b.ep.stats().cookie_replies_sent, 1);
    assert!(b.ep.stats().under_load);
    assert_eq!(
        b.ep.stats().pending_responses + b.ep.stats().sessions,
        1,
        "no state for c"
    );

    // c re-sends its initiation with mac2 at once.
    let (r, resent) = deliver(now, &b, &mut c, &cookie[..64]);
    assert_eq!(r, Ok(Received::Reply { len: n }));
    assert_eq!(
        resent[..n - MAC_LEN],
        plain[..n - MAC_LEN],
        "same initiation, mac2 added"
    );
    // A second cookie reply for the same initiation is not acted on.
    assert_eq!(
        deliver(now, &b, &mut c, &cookie[..64]).0,
        Err(Reject::Unexpected)
    );

    // The same bytes from another address do not pass: the cookie is bound to c's.
    let mallory = node(4, "203.0.113.4:4000", EndpointConfig::default());
    let (r, _) = deliver(now, &mallory, &mut b, &resent[..n]);
    assert_eq!(r, Ok(Received::Reply { len: 64 }));

    let (r, reply) = deliver(now, &c, &mut b, &resent[..n]);
    let Ok(Received::Established {
        peer, reply: len, ..
    }) = r
    else {
        panic!("{r:?}")
    };
    assert_eq!(peer, c.key);
    assert!(matches!(
        deliver(now, &b, &mut c, &reply[..len]).0,
        Ok(Received::Established { .. })
    ));

    // One without mac2 from yet another source gets only a cookie.
    let mut d = node(5, "192.0.2.5:5000", EndpointConfig::default());
    let m =
        d.ep.initiate(now, b.addr, Some(b.key), &mut out)
            .expect("initiates");
    assert_eq!(
        deliver(now, &d, &mut b, &out[..m]).0,
        Ok(Received::Reply { len: 64 })
    );
    assert_eq!(b.ep.stats().cookie_replies_sent, 3);

    // The cookie is kept: c's next initiation carries mac2 straight away and gets
    // through while b is under load again.
    let later = at(10);
    for _ in 0..2 {
        let m =
            d.ep.initiate(later, b.addr, Some(b.key), &mut out)
                .expect("initiates");
        let _ = deliver(later, &d, &mut b, &out[..m]);
    }
    assert!(b.ep.load.is_loaded(later));
    let n =
        c.ep.initiate(later, b.addr, Some(b.key), &mut out)
            .expect("initiates");
    assert_ne!(out[n - MAC_LEN..n], [0; MAC_LEN]);
    assert!(matches!(
        deliver(later, &c, &mut b, &out[..n]).0,
        Ok(Received::Established { .. })
    ));
}

#[test]
fn xx_cookie_reply_is_smaller_than_the_xx_initiation() {
    let mut b = node(2, "198.51.100.2:2000", loaded_config());
    let mut a = node(1, "192.0.2.1:1000", EndpointConfig::default());
    let mut out = buf();
    // Use up the token.
    let n =
        a.ep.initiate(at(0), b.addr, None, &mut out)
            .expect("initiates");
    assert!(matches!(
        deliver(at(0), &a, &mut b, &out[..n]).0,
        Ok(Received::Reply { len: 108 })
    ));
    let n =
        a.ep.initiate(at(0), b.addr, None, &mut out)
            .expect("initiates");
    assert_eq!(n, 72);
    let (r, cookie) = deliver(at(0), &a, &mut b, &out[..n]);
    assert_eq!(r, Ok(Received::Reply { len: 64 }));
    let (r, resent) = deliver(at(0), &b, &mut a, &cookie[..64]);
    assert_eq!(r, Ok(Received::Reply { len: 72 }));
    assert_eq!(
        deliver(at(0), &a, &mut b, &resent[..72]).0,
        Ok(Received::Reply { len: 108 })
    );
}

#[test]
fn proven_sources_are_rate_limited_in_a_bounded_table() {
    let mut b = node(2, "198.51.100.2:2000", loaded_config());
    let now = at(0);
    let mut out = buf();
    // Exhaust the global bucket so every initiation needs a cookie.
    let mut first = node(1, "192.0.2.1:1000", EndpointConfig::default());
    ik(now, &mut first, &mut b);
    for i in 0..12u16 {
        let mut c = node(
            10 + u64::from(i),
            &format!("10.0.{}.1:{}", i, 4000 + i),
            EndpointConfig::default(),
        );
        // Per source: a burst of two proven initiations, then rate limited.
        for round in 0..3 {
            let n =
                c.ep.initiate(now, b.addr, Some(b.key), &mut out)
                    .expect("initiates");
            let mut packet = out[..n].to_vec();
            if round == 0 {
                let (r, cookie) = deliver(now, &c, &mut b, &packet);
                assert_eq!(r, Ok(Received::Reply { len: 64 }));
                let (r, resent) = deliver(now, &b, &mut c, &cookie[..64]);
                assert_eq!(r, Ok(Received::Reply { len: n }));
                packet = resent[..n].to_vec();
            }
            let r = deliver(now, &c, &mut b, &packet).0;
            if round < 2 {
                assert!(
                    matches!(r, Ok(Received::Established { .. })),
                    "round {round}: {r:?}"
                );
            } else {
                assert_eq!(r, Err(Reject::RateLimited));
            }
        }
        assert!(b.ep.stats().rate_limit_sources <= 4);
    }
    assert_eq!(b.ep.stats().rate_limit_sources, 4);
}

#[test]
fn unproven_flood_allocates_nothing() {
    let mut b = node(2, "198.51.100.2:2000", loaded_config());
    let mut a = node(1, "192.0.2.1:1000", EndpointConfig::default());
    let mut out = buf();
    let n =
        a.ep.initiate(at(0), b.addr, Some(b.key), &mut out)
            .expect("initiates");
    let init = out[..n].to_vec();
    assert!(matches!(
        b.ep.handle(at(0), a.addr, &init, &mut out),
        Ok(Received::Established { .. })
    ));
    let before = b.ep.stats();
    for i in 0..2_000u32 {
        let from = SocketAddr::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into(), 9);
        let mut junk = init.clone();
        junk[8] ^= 1;
        assert_eq!(
            b.ep.handle(at(0), from, &junk, &mut out),
            Err(Reject::BadMac)
        );
        assert_eq!(
            b.ep.handle(at(0), from, &init, &mut out),
            Ok(Received::Reply { len: 64 })
        );
    }
    let after = b.ep.stats();
    assert_eq!(after.sessions, before.sessions);
    assert_eq!(after.pending_responses, 0);
    assert_eq!(after.rate_limit_sources, 0);
    assert_eq!(b.ep.slots.len(), 1);
}

#[test]
fn xx_pending_table_is_bounded_and_xx_can_be_refused() {
    let config = EndpointConfig {
        max_pending_handshakes: NonZeroUsize::new(4).expect("non-zero"),
        ..EndpointConfig::default()
    };
    let mut b = node(2, "198.51.100.2:2000", config);
    let mut a = node(1, "192.0.2.1:1000", EndpointConfig::default());
    let mut out = buf();
    let mut first = None;
    for i in 0..10 {
        let n =
            a.ep.initiate(at(0), b.addr, None, &mut out)
                .expect("initiates");
        let (r, msg2) = deliver(at(0), &a, &mut b, &out[..n]);
        assert!(matches!(r, Ok(Received::Reply { .. })));
        assert!(b.ep.stats().pending_responses <= 4);
        if i == 0 {
            first = Some(msg2[..108].to_vec());
        }
    }
    assert_eq!(b.ep.stats().pending_responses, 4);
    // The oldest was evicted: finishing it finds nothing at b.
    let (r, msg3) = deliver(at(0), &b, &mut a, &first.expect("kept"));
    assert!(matches!(r, Ok(Received::Established { .. })));
    assert_eq!(
        deliver(at(0), &a, &mut b, &msg3[..80]).0,
        Err(Reject::UnknownSession)
    );
    // Pending handshakes time out.
    assert_eq!(b.ep.poll_timeout(), Some(at(5)));
    b.ep.handle_timeout(at(5));
    assert_eq!(b.ep.stats().pending_responses, 0);
    assert_eq!(b.ep.poll_timeout(), None);

    let mut closed = node(
        6,
        "198.51.100.6:2000",
        EndpointConfig {
            accept_xx: false,
            ..EndpointConfig::default()
        },
    );
    let n =
        a.ep.initiate(at(0), closed.addr, None, &mut out)
            .expect("initiates");
    assert_eq!(
        deliver(at(0), &a, &mut closed, &out[..n]).0,
        Err(Reject::Unexpected)
    );
}

#[test]
fn initiator_pending_table_is_bounded_and_times_out() {
    let config = EndpointConfig {
        max_pending_handshakes: NonZeroUsize::new(2).expect("non-zero"),
        ..EndpointConfig::default()
    };
    let mut a = node(1, "192.0.2.1:1000", config);
    let b = node(2, "198.51.100.2:2000", EndpointConfig::default());
    let mut out = buf();
    assert!(a.ep.initiate(at(0), b.addr, Some(b.key), &mut out).is_ok());
    assert!(a.ep.initiate(at(0), b.addr, None, &mut out).is_ok());
    assert_eq!(
        a.ep.initiate(at(1), b.addr, None, &mut out),
        Err(SendError::TooManyHandshakes)
    );
    assert_eq!(a.ep.poll_timeout(), Some(at(5)));
    // Expired ones make room.
    assert!(a.ep.initiate(at(5), b.addr, None, &mut out).is_ok());
    assert_eq!(a.ep.stats().pending_initiations, 1);
    assert_eq!(a.ep.stats().peers, 0);
}

#[test]
fn responses_out_of_place_are_refused() {
    let (mut a, mut b) = pair();
    let mut out = buf();
    let n =
        a.ep.initiate(at(0), b.addr, Some(b.key), &mut out)
            .expect("initiates");
    let (r, reply) = deliver(at(0), &a, &mut b, &out[..n]);
    let Ok(Received::Established { reply: len, .. }) = r else {
        panic!("{r:?}")
    };
    let mut forged = reply[..len].to_vec();
    forged[20] ^= 1;
    assert_eq!(
        deliver(at(0), &b, &mut a, &forged).0,
        Err(Reject::Handshake)
    );
    // The forgery did not spoil the handshake.
    assert!(matches!(
        deliver(at(0), &b, &mut a, &reply[..len]).0,
        Ok(Received::Established { .. })
    ));
    assert_eq!(
        deliver(at(0), &b, &mut a, &reply[..len]).0,
        Err(Reject::Unexpected)
    );
    assert_eq!(
        deliver(at(0), &b, &mut a, &reply[..len]).0,
        Err(Reject::Unexpected)
    );
    // A response to nothing.
    forged[8..12].copy_from_slice(&7u32.to_be_bytes());
    assert_eq!(
        deliver(at(0), &b, &mut a, &forged).0,
        Err(Reject::UnknownSession)
    );
}

#[test]
fn a_full_session_table_evicts_unconfirmed_sessions_only() {
    let config = EndpointConfig {
        max_sessions: NonZeroUsize::new(2).expect("non-zero"),
        ..EndpointConfig::default()
    };
    let mut b = node(2, "198.51.100.2:2000", config);
    let mut a = node(1, "192.0.2.1:1000", EndpointConfig::default());
    let mut c = node(3, "192.0.2.3:3000", EndpointConfig::default());
    let mut d = node(4, "192.0.2.4:4000", EndpointConfig::default());
    let mut e = node(5, "192.0.2.5:5000", EndpointConfig::default());
    // a's session at b is confirmed, c's is not.
    ik(at(0), &mut a, &mut b);
    let mut out = buf();
    let n =
        c.ep.initiate(at(1), b.addr, Some(b.key), &mut out)
            .expect("initiates");
    let (r, reply) = deliver(at(1), &c, &mut b, &out[..n]);
    let Ok(Received::Established { reply: len, .. }) = r else {
        panic!("{r:?}")
    };
    assert!(matches!(
        deliver(at(1), &b, &mut c, &reply[..len]).0,
        Ok(Received::Established { .. })
    ));
    // d's handshake pushes out c's unconfirmed session, not a's.
    let n =
        d.ep.initiate(at(2), b.addr, Some(b.key), &mut out)
            .expect("initiates");
    let (r, reply) = deliver(at(2), &d, &mut b, &out[..n]);
    let Ok(Received::Established { reply: len, .. }) = r else {
        panic!("{r:?}")
    };
    assert!(matches!(
        deliver(at(2), &b, &mut d, &reply[..len]).0,
        Ok(Received::Established { .. })
    ));
    let from_c = seal(at(2), &mut c, &b.key, b"c");
    assert_eq!(
        deliver(at(2), &c, &mut b, &from_c).0,
        Err(Reject::UnknownSession)
    );
    let from_a = seal(at(2), &mut a, &b.key, b"a");
    assert_eq!(open(at(2), &a, &mut b, &from_a), Ok(b"a".to_vec()));
    let from_d = seal(at(2), &mut d, &b.key, b"d");
    assert_eq!(open(at(2), &d, &mut b, &from_d), Ok(b"d".to_vec()));
    // Both remaining sessions are confirmed: a new handshake is refused.
    let n =
        e.ep.initiate(at(3), b.addr, Some(b.key), &mut out)
            .expect("initiates");
    assert_eq!(
        deliver(at(3), &e, &mut b, &out[..n]).0,
        Err(Reject::RateLimited)
    );
    assert_eq!(b.ep.stats().sessions, 2);
}

#[test]
fn remove_peer_forgets_sessions_but_not_timestamps() {
    let (mut a, mut b) = pair();
    let mut out = buf();
    let n =
        a.ep.initiate(at(0), b.addr, Some(b.key), &mut out)
            .expect("initiates");
    let init = out[..n].to_vec();
    let (r, reply) = deliver(at(0), &a, &mut b, &init);
    let Ok(Received::Established { reply: len, .. }) = r else {
        panic!("{r:?}")
    };
    assert!(matches!(
        deliver(at(0), &b, &mut a, &reply[..len]).0,
        Ok(Received::Established { .. })
    ));
    let p = seal(at(0), &mut a, &b.key, b"x");
    b.ep.remove_peer(&a.key);
    assert_eq!(b.ep.stats().sessions, 0);
    assert_eq!(b.ep.poll_timeout(), None);
    assert_eq!(
        deliver(at(0), &a, &mut b, &p).0,
        Err(Reject::UnknownSession)
    );
    assert_eq!(
        deliver(at(1), &a, &mut b, &init).0,
        Err(Reject::StaleTimestamp)
    );
}

#[test]
fn same_seed_same_bytes() {
    let run = || {
        let (mut a, mut b) = pair();
        let mut wire = Vec::new();
        let mut out = buf();
        let n =
            a.ep.initiate(at(0), b.addr, None, &mut out)
                .expect("initiates");
        wire.push(out[..n].to_vec());
        let (_, msg2) = deliver(at(0), &a, &mut b, &out[..n]);
        wire.push(msg2[..108].to_vec());
        let (_, msg3) = deliver(at(0), &b, &mut a, &msg2[..108]);
        wire.push(msg3[..80].to_vec());
        assert!(deliver(at(0), &a, &mut b, &msg3[..80]).0.is_ok());
        wire.push(seal(at(0), &mut a, &b.key, b"data"));
        let n =
            a.ep.initiate(at(1), b.addr, Some(b.key), &mut out)
                .expect("initiates");
        wire.push(out[..n].to_vec());
        wire
    };
    let first = run();
    assert_eq!(first, run());
    // A different seed gives different ephemeral keys and indices.
    let mut other = node(1, "192.0.2.1:1000", EndpointConfig::default());
    other.ep = Endpoint::new(&identity(1), EndpointConfig::default(), seed(99)).expect("valid");
    let mut out = buf();
    let n = other
        .ep
        .initiate(at(0), addr("198.51.100.2:2000"), None, &mut out)
        .expect("initiates");
    assert_ne!(out[..n], first[0][..]);
}

#[test]
fn bad_configs_name_the_key() {
    let bad = EndpointConfig {
        reject_after: Duration::from_secs(125),
        ..EndpointConfig::default()
    };
    let err = Endpoint::new(&identity(1), bad, seed(1)).expect_err("invalid");
    assert_eq!(err.key, "reject_after");
    assert!(err.to_string().contains("reject_after"));
    let bad = EndpointConfig {
        handshake_timeout: Duration::ZERO,
        ..EndpointConfig::default()
    };
    assert_eq!(
        Endpoint::new(&identity(1), bad, seed(1))
            .expect_err("invalid")
            .key,
        "handshake_timeout"
    );
}

#[test]
fn arbitrary_bytes_never_panic() {
    use proptest::prelude::*;
    let (mut a, mut b) = pair();
    ik(at(0), &mut a, &mut b);
    let b = std::cell::RefCell::new(b);
    let out = std::cell::RefCell::new(buf());
    proptest!(|(mut bytes in proptest::collection::vec(any::<u8>(), 0..300), first in 4u8..=10)| {
        if let Some(x) = bytes.first_mut() {
            *x = first;
        }
        if bytes.len() > 1 {
            bytes[1] = 1;
        }
        let _ = b.borrow_mut().ep.handle(at(0), a.addr, &bytes, &mut out.borrow_mut());
    });
}
