//! A man in the middle on loopback: a UDP relay between node B (which dials the
//! relay's front address, believing it is A) and node A. It forwards datagrams both
//! ways, records every one, can hold back one direction, and injects datagrams of
//! the test's choosing into either node from the address that node expects.
//!
//! ```text
//!   node B  <──>  front ┤ relay ├ back  <──>  node A
//! ```

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the relay threads look at their stop flag while no datagram arrives.
const STOP_CHECK: Duration = Duration::from_millis(50);
/// Receive buffer: any UDP payload fits.
const BUFFER: usize = 65_535;

/// Which way a datagram travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From B to A.
    ToA,
    /// From A to B.
    ToB,
}

impl Dir {
    fn index(self) -> usize {
        match self {
            Dir::ToA => 0,
            Dir::ToB => 1,
        }
    }
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Where B's datagrams come from (learned from the first one).
    b: Mutex<Option<SocketAddr>>,
    /// Every datagram that reached the relay, in order, with its direction.
    log: Mutex<Vec<(Dir, Vec<u8>)>>,
    /// Per direction: `Some(queue)` while held (datagrams queue instead of passing).
    held: Mutex<[Option<Vec<Vec<u8>>>; 2]>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A relay thread that panicked leaves plain data behind; it is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The relay; its threads stop when it is dropped.
pub struct Relay {
    front: UdpSocket,
    back: UdpSocket,
    a: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// A relay in front of node A at `a`, on two ephemeral loopback ports.
    pub fn start(a: SocketAddr) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind relay front");
        let back = UdpSocket::bind("127.0.0.1:0").expect("bind relay back");
        for s in [&front, &back] {
            s.set_read_timeout(Some(STOP_CHECK)).expect("read timeout");
        }
        let shared = Arc::new(Shared::default());
        let to_a = {
            let (rx, tx, shared) = (clone(&front), clone(&back), shared.clone());
            std::thread::spawn(move || {
                pump(&rx, &shared, Dir::ToA, |bytes| {
                    let _ = tx.send_to(bytes, a);
                });
            })
        };
        let to_b = {
            let (rx, tx, shared) = (clone(&back), clone(&front), shared.clone());
            std::thread::spawn(move || {
                pump(&rx, &shared, Dir::ToB, |bytes| {
                    if let Some(b) = *lock(&shared.b) {
                        let _ = tx.send_to(bytes, b);
                    }
                });
            })
        };
        Relay {
            front,
            back,
            a,
            shared,
            threads: vec![to_a, to_b],
        }
    }

    /// The address B must dial: to B, this is node A.
    pub fn front_addr(&self) -> SocketAddr {
        self.front.local_addr().expect("front address")
    }

    /// The address node A sees B's datagrams come from.
    pub fn back_addr(&self) -> SocketAddr {
        self.back.local_addr().expect("back address")
    }

    /// Every datagram recorded so far in direction `dir`, oldest first.
    pub fn recorded(&self, dir: Dir) -> Vec<Vec<u8>> {
        lock(&self.shared.log)
            .iter()
            .filter(|(d, _)| *d == dir)
            .map(|(_, bytes)| bytes.clone())
            .collect()
    }

    /// From now on, datagrams in direction `dir` queue in the relay instead of
    /// passing (they are still recorded).
    pub fn hold(&self, dir: Dir) {
        lock(&self.shared.held)[dir.index()].get_or_insert_with(Vec::new);
    }

    /// The datagrams held so far in direction `dir`.
    pub fn held(&self, dir: Dir) -> Vec<Vec<u8>> {
        lock(&self.shared.held)[dir.index()]
            .clone()
            .unwrap_or_default()
    }

    /// Stops holding `dir` and forwards what was held, in order.
    pub fn release(&self, dir: Dir) {
        let held = lock(&self.shared.held)[dir.index()]
            .take()
            .unwrap_or_default();
        for bytes in held {
            self.forward(dir, &bytes);
        }
    }

    /// Sends `bytes` to node B from the relay's front address, as if A sent them.
    pub fn inject_to_b(&self, bytes: &[u8]) {
        self.forward(Dir::ToB, bytes);
    }

    /// Sends `bytes` to node A from the relay's back address, as if B sent them.
    pub fn inject_to_a(&self, bytes: &[u8]) {
        self.forward(Dir::ToA, bytes);
    }

    fn forward(&self, dir: Dir, bytes: &[u8]) {
        match dir {
            Dir::ToA => {
                self.back.send_to(bytes, self.a).expect("send to A");
            }
            Dir::ToB => {
                let b = lock(&self.shared.b).expect("B has sent something already");
                self.front.send_to(bytes, b).expect("send to B");
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn clone(socket: &UdpSocket) -> UdpSocket {
    socket.try_clone().expect("clone relay socket")
}

/// Receives on `rx` until the stop flag is set: records each datagram (and, from B,
/// B's address), then queues it if `dir` is held, else hands it to `forward`.
fn pump(rx: &UdpSocket, shared: &Shared, dir: Dir, mut forward: impl FnMut(&[u8])) {
    let mut buf = vec![0u8; BUFFER];
    while !shared.stop.load(Ordering::Relaxed) {
        let (len, from) = match rx.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            // ICMP errors for earlier sends (a node that has exited): keep relaying.
            Err(_) => continue,
        };
        let bytes = &buf[..len];
        if dir == Dir::ToA {
            *lock(&shared.b) = Some(from);
        }
        lock(&shared.log).push((dir, bytes.to_vec()));
        if let Some(queue) = &mut lock(&shared.held)[dir.index()] {
            queue.push(bytes.to_vec());
            continue;
        }
        forward(bytes);
    }
}
