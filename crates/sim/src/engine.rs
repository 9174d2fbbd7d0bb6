//! The harness drives the real engine node.

use std::net::SocketAddr;

use peercall_engine::{Event, Node, Transmit};
use peercall_wire::Time;

use crate::Drivable;

impl Drivable for Node {
    type Event = Event;

    fn handle_datagram(&mut self, now: Time, from: SocketAddr, datagram: &[u8]) {
        Node::handle_datagram(self, now, from, datagram);
    }

    fn handle_timeout(&mut self, now: Time) {
        Node::handle_timeout(self, now);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        Node::poll_transmit(self)
    }

    fn poll_event(&mut self) -> Option<Event> {
        Node::poll_event(self)
    }

    fn poll_timeout(&mut self) -> Option<Time> {
        Node::poll_timeout(self)
    }
}
