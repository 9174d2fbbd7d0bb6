//! Every node answers STUN Binding requests on its port, statelessly.

use std::net::SocketAddr;

use peercall_crypto::Identity;
use peercall_engine::{Config, DropReason, Node};
use peercall_overlay::stun::{self, StunMessage};
use peercall_wire::Time;

#[test]
fn binding_requests_get_the_source_address() {
    let now = Time::from_secs(1_700_000_000);
    let mut node = Node::new(Config::new(Identity::from_seed([1; 32]), [2; 32]), now);
    while node.poll_transmit().is_some() {}
    let from: SocketAddr = "203.0.113.50:41000".parse().expect("addr");
    let txid = [5u8; 12];
    node.handle_datagram(now, from, &stun::request(txid));
    let t = node.poll_transmit().expect("answered");
    assert_eq!(t.dest, from);
    assert_eq!(
        stun::parse(&t.bytes),
        Some(StunMessage::Response { txid, mapped: from })
    );
    assert!(t.bytes.len() <= stun::request(txid).len() + 12);
    assert_eq!(node.stats().stun_answered, 1);
    // Garbage in the STUN range is dropped and counted, never answered.
    node.handle_datagram(now, from, &[0, 1, 0, 0, 1, 2, 3]);
    assert!(node.poll_transmit().is_none());
    assert_eq!(node.stats().dropped(DropReason::Malformed), 1);
    // A flood is cut off by the answer rate limit.
    for _ in 0..1000 {
        node.handle_datagram(now, from, &stun::request(txid));
    }
    let mut answered = 0;
    while node.poll_transmit().is_some() {
        answered += 1;
    }
    assert!((300..1000).contains(&answered), "{answered}");
    assert!(node.stats().dropped(DropReason::RateLimited) > 0);
}
