//! Relay forwarding at the engine level: one voice packet (a `Frame::Relay` with a
//! 160-byte end-to-end payload, hop-encrypted by client A) handed to a supernode's
//! `Node::handle_datagram`: hop decrypt, frame parse, `RelayServer::forward`
//! (channel lookup, mutual permission, byte quota), re-encryption for client B into
//! a recycled buffer, and `Node::poll_transmit_into`. No socket: the daemon's cost
//! per packet on top of this is its batched system calls.
//!
//! After the run the bench checks that the relay's transmit pool allocated nothing
//! while forwarding.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use peercall_crypto::endpoint::{Endpoint, EndpointConfig, Received};
use peercall_crypto::{Identity, PeerKey};
use peercall_engine::msg::RelayMsg;
use peercall_engine::{Config, Node, RelayConfig, Role};
use peercall_wire::frame::Relay;
use peercall_wire::{Frame, MAX_DATAGRAM, Time};

const T0: Time = Time::from_secs(1_700_000_000);
/// A voice frame's end-to-end packet, as the bench tool sends.
const PAYLOAD: usize = 160;

fn addr(last: u8) -> SocketAddr {
    // A documentation range: public as far as the relay's target checks go.
    SocketAddr::from(([203, 0, 113, last], 7600))
}

/// A client of the relay: a Noise session to it and, once allocated, a channel.
struct Client {
    endpoint: Endpoint,
    addr: SocketAddr,
    channel: Option<u32>,
}

/// Feeds everything the relay sends to the clients, and their answers back, until
/// the relay is quiet.
fn deliver(relay: &mut Node, clients: &mut [Client], relay_key: &PeerKey) {
    let mut out = vec![0u8; MAX_DATAGRAM];
    let mut plain = vec![0u8; MAX_DATAGRAM];
    let mut queue = Vec::new();
    while let Some((dest, n)) = relay.poll_transmit_into(&mut out) {
        queue.push((dest, out[..n].to_vec()));
    }
    while let Some((dest, bytes)) = queue.pop() {
        let Some(i) = clients.iter().position(|c| c.addr == dest) else {
            continue;
        };
        let c = &mut clients[i];
        match c.endpoint.handle(T0, addr(1), &bytes, &mut plain) {
            Ok(Received::Established { .. }) => {
                // Confirm the keys, then ask for a channel to the other client.
                let other = clients[1 - i].endpoint.local_key();
                let c = &mut clients[i];
                send(relay, c, relay_key, &Frame::Keepalive);
                let body = RelayMsg::Allocate {
                    peer: other.0,
                    via: None,
                }
                .encode()
                .expect("encodes");
                send(relay, c, relay_key, &Frame::RelayControl(&body));
            }
            Ok(Received::Data { len, .. }) => {
                if let Ok(Frame::RelayControl(body)) = Frame::parse(&plain[..len])
                    && let Ok(RelayMsg::Allocated { channel, .. }) = RelayMsg::decode(body)
                {
                    c.channel = Some(channel);
                }
            }
            _ => {}
        }
        while let Some((dest, n)) = relay.poll_transmit_into(&mut out) {
            queue.push((dest, out[..n].to_vec()));
        }
    }
}

/// Encrypts `frame` on the client's hop session and hands it to the relay.
fn send(relay: &mut Node, c: &mut Client, relay_key: &PeerKey, frame: &Frame<'_>) {
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut out = [0u8; MAX_DATAGRAM];
    let n = frame.encode(&mut buf).expect("fits");
    let len = c
        .endpoint
        .encrypt(T0, relay_key, &buf[..n], &mut out)
        .expect("session up");
    relay.handle_datagram(T0, c.addr, &out[..len]);
}

/// A supernode relay with two clients holding mutual channels.
fn setup() -> (Node, Vec<Client>, PeerKey) {
    let relay_id = Identity::from_seed([1; 32]);
    let relay_key = relay_id.peer_key();
    let mut config = Config::new(relay_id, [2; 32]);
    config.role = Role::Supernode;
    // The quota is not what is measured: the bench forwards millions of packets
    // per second of simulated time.
    config.relay = RelayConfig {
        client_rate_bps: u32::MAX,
        client_burst_bytes: u32::MAX,
        ..RelayConfig::default()
    };
    let mut relay = Node::new(config, T0);
    relay.handle_timeout(T0);
    let mut clients: Vec<Client> = (0..2u8)
        .map(|i| Client {
            endpoint: Endpoint::new(
                &Identity::from_seed([10 + i; 32]),
                EndpointConfig::default(),
                [20 + i; 32],
            )
            .expect("valid config"),
            addr: addr(10 + i),
            channel: None,
        })
        .collect();
    let mut buf = [0u8; MAX_DATAGRAM];
    for i in 0..2 {
        let c = &mut clients[i];
        let n = c
            .endpoint
            .initiate(T0, addr(1), Some(relay_key), &mut buf)
            .expect("initiation");
        relay.handle_datagram(T0, c.addr, &buf[..n]);
        deliver(&mut relay, &mut clients, &relay_key);
    }
    assert!(
        clients.iter().all(|c| c.channel.is_some()),
        "both clients hold channels"
    );
    (relay, clients, relay_key)
}

fn relay_forward(c: &mut Criterion) {
    let (mut relay, mut clients, relay_key) = setup();
    let channel = clients[0].channel.expect("allocated");
    let payload = [0x5au8; PAYLOAD];
    let mut frame = [0u8; MAX_DATAGRAM];
    let n = Frame::Relay(Relay {
        channel,
        packet: &payload,
    })
    .encode(&mut frame)
    .expect("fits");
    let a_addr = clients[0].addr;
    let b_addr = clients[1].addr;
    let mut out = vec![0u8; MAX_DATAGRAM];
    // One packet goes through, to B.
    let mut packet = vec![0u8; MAX_DATAGRAM];
    let mut encrypt = |packet: &mut Vec<u8>| {
        packet.resize(MAX_DATAGRAM, 0);
        let len = clients[0]
            .endpoint
            .encrypt(T0, &relay_key, &frame[..n], packet)
            .expect("session up");
        packet.truncate(len);
    };
    encrypt(&mut packet);
    relay.handle_datagram(T0, a_addr, &packet);
    let (dest, len) = relay.poll_transmit_into(&mut out).expect("forwarded");
    assert_eq!(dest, b_addr);
    assert!(len > PAYLOAD);
    let warm = relay.stats().buffers_allocated;
    let forwarded = relay.stats().relay.packets;

    c.bench_function("relay/forward_voice_packet", |bench| {
        bench.iter_batched_ref(
            || {
                let mut p = Vec::with_capacity(MAX_DATAGRAM);
                encrypt(&mut p);
                p
            },
            |p| {
                relay.handle_datagram(T0, a_addr, p);
                black_box(relay.poll_transmit_into(&mut out));
            },
            BatchSize::SmallInput,
        );
    });

    let stats = relay.stats();
    assert!(stats.relay.packets > forwarded, "packets were forwarded");
    assert_eq!(
        stats.buffers_allocated, warm,
        "forwarding allocated transmit buffers"
    );
    println!(
        "relay: {} packets forwarded, {} transmit buffers allocated while forwarding",
        stats.relay.packets - forwarded,
        stats.buffers_allocated - warm
    );
}

criterion_group!(benches, relay_forward);
criterion_main!(benches);
