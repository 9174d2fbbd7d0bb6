//! `Endpoint::handle` on arbitrary datagrams. It must never panic, and a rejected
//! datagram must leave nothing behind.
//!
//! Each input runs against a deterministic endpoint `b` that holds a confirmed
//! session, a pending XX initiation and a pending XX response, so that every packet
//! type has state to reach. Building it takes a few handshakes, so it is kept
//! between inputs while they are rejected by checks that change nothing, and rebuilt
//! after any input that may have changed it: every input still meets the same state,
//! and a crash reproduces from its input alone. Input: a control byte, then data. Control
//! bit 0 picks the source address; bit 1 picks the mode: raw (the data is the
//! datagram) or mutate (the next byte picks one of the genuine packets captured
//! during set-up, and the rest is XORed into it), which gets past the length checks
//! and into the MAC, Noise and AEAD paths.
#![no_main]

use std::net::SocketAddr;

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use peercall_crypto::{Endpoint, EndpointConfig, Identity, Received, Reject};
use peercall_wire::{MAX_DATAGRAM, Time};

const NOW: Time = Time::from_secs(1_700_000_000);

struct World {
    b: Endpoint,
    genuine: Vec<Vec<u8>>,
}

fn world() -> World {
    let a_id = Identity::from_seed([1; 32]);
    let b_id = Identity::from_seed([2; 32]);
    let a_addr: SocketAddr = "192.0.2.1:1000".parse().expect("address");
    let b_addr: SocketAddr = "198.51.100.2:2000".parse().expect("address");
    let mut a = Endpoint::new(&a_id, EndpointConfig::default(), [3; 32]).expect("config");
    let mut b = Endpoint::new(&b_id, EndpointConfig::default(), [4; 32]).expect("config");
    let mut out = vec![0u8; MAX_DATAGRAM];
    let mut back = vec![0u8; MAX_DATAGRAM];
    let mut genuine = Vec::new();

    // A confirmed IK session a -> b.
    let n = a
        .initiate(NOW, b_addr, Some(b_id.peer_key()), &mut out)
        .expect("initiates");
    genuine.push(out[..n].to_vec());
    let Ok(Received::Established { reply, .. }) = b.handle(NOW, a_addr, &out[..n], &mut back)
    else {
        panic!("set-up: IK responder");
    };
    genuine.push(back[..reply].to_vec());
    a.handle(NOW, b_addr, &back[..reply], &mut out)
        .expect("set-up: IK initiator");
    let n = a
        .encrypt(NOW, &b_id.peer_key(), b"keepalive", &mut out)
        .expect("encrypts");
    b.handle(NOW, a_addr, &out[..n], &mut back)
        .expect("set-up: keepalive");
    let n = a
        .encrypt(NOW, &b_id.peer_key(), b"data", &mut out)
        .expect("encrypts");
    genuine.push(out[..n].to_vec());

    // b initiates XX to a, a answers: b has a pending initiation, we keep the answer.
    let n = b.initiate(NOW, a_addr, None, &mut out).expect("initiates");
    genuine.push(out[..n].to_vec());
    let Ok(Received::Reply { len }) = a.handle(NOW, b_addr, &out[..n], &mut back) else {
        panic!("set-up: XX responder");
    };
    genuine.push(back[..len].to_vec());

    // a initiates XX to b: b holds a pending response.
    let n = a.initiate(NOW, b_addr, None, &mut out).expect("initiates");
    let Ok(Received::Reply { len }) = b.handle(NOW, a_addr, &out[..n], &mut back) else {
        panic!("set-up: XX pending");
    };
    let Ok(Received::Established { reply, .. }) = a.handle(NOW, b_addr, &back[..len], &mut out)
    else {
        panic!("set-up: XX message 3");
    };
    genuine.push(out[..reply].to_vec());

    World { b, genuine }
}

thread_local! {
    static WORLD: RefCell<Option<World>> = const { RefCell::new(None) };
}

/// Rejections that provably leave the endpoint untouched.
fn changes_nothing(r: &Result<Received, Reject>) -> bool {
    matches!(
        r,
        Err(Reject::Malformed(_)
            | Reject::UnknownSession
            | Reject::BadMac
            | Reject::Decrypt
            | Reject::Replay
            | Reject::ExpiredKey
            | Reject::Unexpected)
    )
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    WORLD.with_borrow_mut(|slot| {
        let w = slot.get_or_insert_with(world);
        let from: SocketAddr = if control & 1 == 0 {
            "192.0.2.1:1000".parse().expect("address")
        } else {
            "203.0.113.9:9".parse().expect("address")
        };
        let datagram = if control & 2 == 0 {
            rest.to_vec()
        } else {
            let Some((&pick, mask)) = rest.split_first() else {
                return;
            };
            let mut packet = w.genuine[usize::from(pick) % w.genuine.len()].clone();
            for (byte, m) in packet.iter_mut().zip(mask) {
                *byte ^= m;
            }
            packet
        };
        let before = w.b.stats();
        let mut out = vec![0u8; MAX_DATAGRAM];
        let r = w.b.handle(NOW, from, &datagram, &mut out);
        let after = w.b.stats();
        if r.is_err() {
            assert_eq!(after.sessions, before.sessions);
            assert_eq!(after.pending_initiations, before.pending_initiations);
            assert!(after.pending_responses <= before.pending_responses);
        }
        if changes_nothing(&r) {
            assert_eq!(
                after, before,
                "a rejection without side effects changed {r:?}"
            );
        } else {
            *slot = None;
        }
    });
});
