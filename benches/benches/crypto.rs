//! Crypto hot paths: transport packets through two endpoints, and complete IK and XX
//! handshakes. Targets (issue #2): ≤ 0.5 µs per 160-byte packet encrypted and
//! decrypted; ≥ 1,500 full handshakes per second per core.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use peercall_crypto::ratelimit::Rate;
use peercall_crypto::{Endpoint, EndpointConfig, Identity, PeerKey, Received};
use peercall_wire::{MAX_DATAGRAM, Time};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// A voice frame's worth of plaintext: a 20 ms Opus frame at 64 kb/s.
const PAYLOAD: usize = 160;

struct Side {
    ep: Endpoint,
    key: PeerKey,
    addr: SocketAddr,
}

fn side(n: u64, addr: &str) -> Side {
    let id = Identity::generate(&mut ChaCha20Rng::seed_from_u64(n));
    // No load shedding: the bench measures the handshake, not the cookie path.
    let config = EndpointConfig {
        global_handshakes: Rate::new(u32::MAX, u32::MAX),
        ..EndpointConfig::default()
    };
    Side {
        key: id.peer_key(),
        ep: Endpoint::new(&id, config, [n as u8; 32]).expect("valid config"),
        addr: addr.parse().expect("address"),
    }
}

fn now() -> Time {
    Time::from_secs(1_700_000_000)
}

fn ik(a: &mut Side, b: &mut Side, out: &mut [u8], scratch: &mut [u8]) {
    let n =
        a.ep.initiate(now(), b.addr, Some(b.key), out)
            .expect("initiates");
    let Ok(Received::Established { reply, .. }) = b.ep.handle(now(), a.addr, &out[..n], scratch)
    else {
        panic!("responder failed");
    };
    let r = a.ep.handle(now(), b.addr, &scratch[..reply], out);
    assert!(matches!(r, Ok(Received::Established { .. })));
}

fn xx(a: &mut Side, b: &mut Side, out: &mut [u8], scratch: &mut [u8]) {
    let n = a.ep.initiate(now(), b.addr, None, out).expect("initiates");
    let Ok(Received::Reply { len }) = b.ep.handle(now(), a.addr, &out[..n], scratch) else {
        panic!("responder failed");
    };
    let Ok(Received::Established { reply, .. }) = a.ep.handle(now(), b.addr, &scratch[..len], out)
    else {
        panic!("initiator failed");
    };
    let r = b.ep.handle(now(), a.addr, &out[..reply], scratch);
    assert!(matches!(r, Ok(Received::Established { .. })));
}

fn transport(c: &mut Criterion) {
    let mut a = side(1, "192.0.2.1:1000");
    let mut b = side(2, "198.51.100.2:2000");
    let mut out = vec![0u8; MAX_DATAGRAM];
    let mut scratch = vec![0u8; MAX_DATAGRAM];
    ik(&mut a, &mut b, &mut out, &mut scratch);
    let payload = [0x5au8; PAYLOAD];
    let mut g = c.benchmark_group("transport");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encrypt_decrypt_160B", |bench| {
        bench.iter(|| {
            let n =
                a.ep.encrypt(now(), &b.key, black_box(&payload), &mut out)
                    .expect("encrypts");
            let r = b.ep.handle(now(), a.addr, &out[..n], &mut scratch);
            black_box(r).expect("decrypts");
        })
    });
    g.finish();
}

fn handshakes(c: &mut Criterion) {
    let mut a = side(1, "192.0.2.1:1000");
    let mut b = side(2, "198.51.100.2:2000");
    let mut out = vec![0u8; MAX_DATAGRAM];
    let mut scratch = vec![0u8; MAX_DATAGRAM];
    let mut g = c.benchmark_group("handshake");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ik_full", |bench| {
        bench.iter(|| ik(&mut a, &mut b, &mut out, &mut scratch))
    });
    g.bench_function("xx_full", |bench| {
        bench.iter(|| xx(&mut a, &mut b, &mut out, &mut scratch))
    });
    g.finish();
}

criterion_group!(benches, transport, handshakes);
criterion_main!(benches);
