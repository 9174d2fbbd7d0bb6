//! A tiny node for exercising the emulator: it answers pings and sends numbered,
//! time-stamped datagrams, one-off or in periodic streams.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use peercall_engine::Transmit;
use peercall_wire::Time;

use crate::Drivable;

/// Bytes in an echo message header: kind (1), sequence number (8), send time (8).
/// Messages may be padded beyond it.
pub const ECHO_HEADER: usize = 17;

/// What an echo message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EchoKind {
    /// Asks the receiver to send it back as a [`EchoKind::Pong`].
    Ping,
    /// The answer to a ping, with the ping's sequence number and send time.
    Pong,
    /// One-way traffic; the receiver only records it.
    Data,
}

impl EchoKind {
    fn byte(self) -> u8 {
        match self {
            EchoKind::Ping => 1,
            EchoKind::Pong => 2,
            EchoKind::Data => 3,
        }
    }

    fn from_byte(b: u8) -> Option<EchoKind> {
        match b {
            1 => Some(EchoKind::Ping),
            2 => Some(EchoKind::Pong),
            3 => Some(EchoKind::Data),
            _ => None,
        }
    }
}

/// A message an [`EchoNode`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echo {
    /// Source address as the network delivered it (after any NAT).
    pub from: SocketAddr,
    /// Message kind.
    pub kind: EchoKind,
    /// Sequence number given by the original sender.
    pub seq: u64,
    /// When the original sender sent it (for a pong: when the ping was sent).
    pub sent_at: Time,
    /// Datagram length.
    pub len: usize,
}

#[derive(Debug, Clone)]
struct Stream {
    dest: SocketAddr,
    kind: EchoKind,
    interval: Duration,
    next: Time,
    remaining: u64,
    seq: u64,
    len: usize,
}

/// The test node: see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct EchoNode {
    transmits: VecDeque<Transmit>,
    events: VecDeque<Echo>,
    streams: Vec<Stream>,
    malformed: u64,
}

fn encode(kind: EchoKind, seq: u64, sent_at: Time, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len.max(ECHO_HEADER)];
    bytes[0] = kind.byte();
    bytes[1..9].copy_from_slice(&seq.to_be_bytes());
    bytes[9..17].copy_from_slice(&sent_at.as_micros().to_be_bytes());
    bytes
}

fn decode(bytes: &[u8]) -> Option<(EchoKind, u64, Time)> {
    let header: &[u8; ECHO_HEADER] = bytes.get(..ECHO_HEADER)?.try_into().ok()?;
    let kind = EchoKind::from_byte(header[0])?;
    let seq = u64::from_be_bytes(header[1..9].try_into().ok()?);
    let sent = u64::from_be_bytes(header[9..17].try_into().ok()?);
    Some((kind, seq, Time::from_micros(sent)))
}

impl EchoNode {
    /// A node with nothing to send.
    pub fn new() -> EchoNode {
        EchoNode::default()
    }

    /// Sends one message of `len` bytes (at least [`ECHO_HEADER`]) to `dest` now.
    pub fn send(&mut self, now: Time, dest: SocketAddr, kind: EchoKind, seq: u64, len: usize) {
        self.transmits.push_back(Transmit {
            dest,
            bytes: encode(kind, seq, now, len),
        });
    }

    /// Sends `count` messages to `dest`, numbered from 0, one every `interval`, the
    /// first at `start` (through the node's timer).
    pub fn stream(
        &mut self,
        start: Time,
        dest: SocketAddr,
        kind: EchoKind,
        interval: Duration,
        count: u64,
        len: usize,
    ) {
        if count > 0 {
            self.streams.push(Stream {
                dest,
                kind,
                interval,
                next: start,
                remaining: count,
                seq: 0,
                len,
            });
        }
    }

    /// Datagrams received that were not echo messages.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }
}

impl Drivable for EchoNode {
    type Event = Echo;

    fn handle_datagram(&mut self, _now: Time, from: SocketAddr, datagram: &[u8]) {
        let Some((kind, seq, sent_at)) = decode(datagram) else {
            self.malformed += 1;
            return;
        };
        if kind == EchoKind::Ping {
            self.transmits.push_back(Transmit {
                dest: from,
                bytes: encode(EchoKind::Pong, seq, sent_at, datagram.len()),
            });
        }
        self.events.push_back(Echo {
            from,
            kind,
            seq,
            sent_at,
            len: datagram.len(),
        });
    }

    fn handle_timeout(&mut self, now: Time) {
        for s in &mut self.streams {
            while s.remaining > 0 && s.next <= now {
                self.transmits.push_back(Transmit {
                    dest: s.dest,
                    bytes: encode(s.kind, s.seq, now, s.len),
                });
                s.seq += 1;
                s.remaining -= 1;
                s.next = s.next + s.interval;
            }
        }
        self.streams.retain(|s| s.remaining > 0);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    fn poll_event(&mut self) -> Option<Echo> {
        self.events.pop_front()
    }

    fn poll_timeout(&mut self) -> Option<Time> {
        self.streams.iter().map(|s| s.next).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_pings_and_rejects_garbage() {
        let mut n = EchoNode::new();
        let from: SocketAddr = "192.0.2.1:9".parse().expect("addr");
        let t = Time::from_secs(5);
        n.handle_datagram(t, from, &encode(EchoKind::Ping, 7, Time::from_secs(4), 40));
        let reply = n.poll_transmit().expect("pong");
        assert_eq!(reply.dest, from);
        assert_eq!(
            decode(&reply.bytes),
            Some((EchoKind::Pong, 7, Time::from_secs(4)))
        );
        assert_eq!(reply.bytes.len(), 40);
        assert_eq!(n.poll_event().map(|e| e.seq), Some(7));
        for bad in [&[][..], &[1u8; 16][..], &[9u8; 17][..]] {
            n.handle_datagram(t, from, bad);
        }
        assert_eq!(n.malformed(), 3);
        assert!(n.poll_transmit().is_none());
    }

    #[test]
    fn streams_follow_their_timer() {
        let mut n = EchoNode::new();
        let to: SocketAddr = "192.0.2.1:9".parse().expect("addr");
        let t0 = Time::from_secs(1);
        n.stream(t0, to, EchoKind::Data, Duration::from_millis(10), 3, 0);
        assert_eq!(n.poll_timeout(), Some(t0));
        n.handle_timeout(t0);
        assert_eq!(n.poll_timeout(), Some(t0 + Duration::from_millis(10)));
        n.handle_timeout(t0 + Duration::from_millis(25));
        assert_eq!(n.poll_timeout(), None);
        let seqs: Vec<_> = std::iter::from_fn(|| n.poll_transmit())
            .map(|t| decode(&t.bytes).expect("valid").1)
            .collect();
        assert_eq!(seqs, [0, 1, 2]);
    }
}
