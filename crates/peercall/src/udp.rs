//! Batched UDP for the engine task, through `quinn-udp`.
//!
//! Receive: one `recvmmsg` returns up to [`quinn_udp::BATCH_SIZE`] datagrams (and,
//! where the kernel coalesced a flow with GRO, several datagrams per slot, split by
//! their stride). Send: the engine's transmits are copied back to back into one
//! buffer ([`TxBatch`]); consecutive datagrams to the same destination with the same
//! size form a *run* sent with one `sendmsg` and UDP GSO where the kernel offers it,
//! every other datagram with one `sendmsg` each. quinn-udp offers no `sendmmsg`, and
//! the workspace forbids the unsafe code calling it ourselves would need, so sends
//! to many destinations still cost one system call each.
//!
//! Nothing here allocates per datagram: the receive slots and the send buffer are
//! allocated once, and the engine's transmit buffers go back to its pool through
//! `Node::poll_transmit_into`.
//!
//! For tests and the demo, two debug layers sit in the socket: the block list
//! ([`BlockList`], `debug_endpoints`) and the link and NAT emulator
//! ([`crate::netem`], the `[emulate]` section), whose delayed datagrams the
//! receive loop sends when they fall due.

use std::collections::HashSet;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use prometheus::IntCounter;

use peercall_wire::MAX_DATAGRAM;
use quinn_udp::{BATCH_SIZE, RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::netem::{LinkEmulator, Outbound};

/// Bytes per receive slot: the largest UDP payload, so an oversized datagram reaches
/// the engine whole (and is counted as malformed rather than silently truncated),
/// and a GRO-coalesced slot (at most 64 KiB by the kernel's limit) fits.
pub const RECV_SLOT: usize = 65_535;
/// Datagrams the send buffer holds before it is flushed: two receive batches'
/// worth, so a batch that makes each received datagram answer once (a relay) goes
/// out in one flush.
pub const TX_DATAGRAMS: usize = 2 * BATCH_SIZE;
/// The kernel's cap on one GSO send: 64 KiB of payload.
const GSO_MAX_BYTES: usize = 65_000;

/// The debug block list (`debug_endpoints = true`): datagrams to or from a listed
/// address are dropped at the socket, as if the network between lost them, so a
/// test can cut one path of a call on loopback, where no firewall rule is at hand.
///
/// Cheap when empty: the socket loop reads one atomic flag per batch and takes the
/// lock only while the list holds an address.
#[derive(Debug)]
pub struct BlockList {
    /// Whether `addrs` is non-empty (read without the lock).
    active: AtomicBool,
    addrs: RwLock<HashSet<SocketAddr>>,
    /// `peercall_debug_blocked_datagrams_total`.
    dropped: IntCounter,
}

impl BlockList {
    /// An empty list counting its drops in `dropped`.
    pub fn new(dropped: IntCounter) -> BlockList {
        BlockList {
            active: AtomicBool::new(false),
            addrs: RwLock::new(HashSet::new()),
            dropped,
        }
    }

    /// Adds `addr`; returns whether it was new.
    pub fn block(&self, addr: SocketAddr) -> bool {
        let mut addrs = self.addrs.write().unwrap_or_else(PoisonError::into_inner);
        let new = addrs.insert(addr);
        self.active.store(true, Ordering::Release);
        new
    }

    /// Empties the list; returns how many addresses it held.
    pub fn clear(&self) -> usize {
        let mut addrs = self.addrs.write().unwrap_or_else(PoisonError::into_inner);
        let n = addrs.len();
        addrs.clear();
        self.active.store(false, Ordering::Release);
        n
    }

    /// The listed addresses, sorted.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let addrs = self.addrs.read().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<SocketAddr> = addrs.iter().copied().collect();
        v.sort();
        v
    }

    /// Whether `addr` is listed; if so, counts `datagrams` dropped. No lock is
    /// taken while the list is empty.
    fn drops(&self, addr: SocketAddr, datagrams: usize) -> bool {
        if !self.active.load(Ordering::Acquire) {
            return false;
        }
        let listed = self
            .addrs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&addr);
        if listed {
            self.dropped.inc_by(datagrams as u64);
        }
        listed
    }
}

/// A UDP socket with batched receive and send.
#[derive(Debug)]
pub struct BatchSocket {
    socket: UdpSocket,
    state: UdpSocketState,
    /// `BATCH_SIZE` receive slots of [`RECV_SLOT`] bytes, back to back.
    rx: Box<[u8]>,
    meta: [RecvMeta; BATCH_SIZE],
    /// The debug block list, when the node serves the debug endpoints.
    block: Option<Arc<BlockList>>,
    /// The emulated link and NAT (`[emulate]`), when configured.
    emulator: Option<LinkEmulator>,
}

impl BatchSocket {
    /// Wraps a bound socket (made non-blocking, GRO and receive timestamps turned on
    /// where available).
    pub fn new(socket: UdpSocket) -> io::Result<BatchSocket> {
        let state = UdpSocketState::new((&socket).into())?;
        Ok(BatchSocket {
            socket,
            state,
            rx: vec![0; RECV_SLOT * BATCH_SIZE].into_boxed_slice(),
            meta: [RecvMeta::default(); BATCH_SIZE],
            block: None,
            emulator: None,
        })
    }

    /// Delays, loses and filters datagrams as `emulator` says from now on.
    pub fn with_emulator(mut self, emulator: LinkEmulator) -> BatchSocket {
        self.emulator = Some(emulator);
        self
    }

    /// Drops datagrams to and from the addresses in `block` from now on.
    pub fn with_block_list(mut self, block: Arc<BlockList>) -> BatchSocket {
        self.block = Some(block);
        self
    }

    /// The bound address.
    #[cfg(test)]
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Waits for datagrams and receives one batch; returns how many slots were
    /// filled (read them with [`BatchSocket::for_each`]). Cancel-safe: nothing is
    /// received unless the call completes. While it waits, it sends the emulator's
    /// delayed datagrams as they fall due (each at most once, so that is
    /// cancel-safe too).
    pub async fn recv_batch(&mut self) -> io::Result<usize> {
        let BatchSocket {
            socket,
            state,
            rx,
            meta,
            emulator,
            ..
        } = self;
        loop {
            let socket: &UdpSocket = socket;
            match emulator.as_mut() {
                Some(e) => {
                    // Due ones first: under a steady inbound flood the socket is
                    // always readable, and they must still leave on time.
                    send_due(socket, state, e);
                    match e.next_due() {
                        Some(due) => tokio::select! {
                            biased;
                            () = tokio::time::sleep_until(due.into()) => continue,
                            r = socket.readable() => r?,
                        },
                        None => socket.readable().await?,
                    }
                }
                None => socket.readable().await?,
            }
            let mut chunks = rx.chunks_mut(RECV_SLOT);
            let mut slices: [IoSliceMut<'_>; BATCH_SIZE] = std::array::from_fn(|_| {
                IoSliceMut::new(chunks.next().expect("BATCH_SIZE slots were allocated"))
            });
            match socket.try_io(Interest::READABLE, || {
                state.recv(socket.into(), &mut slices, meta)
            }) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends the emulator's delayed datagrams as they fall due, until none is left
    /// (at most the configured delay plus jitter): at shutdown, so the node's last
    /// words (the peers are told it leaves) are delayed like the rest, not lost.
    pub async fn finish(&mut self) {
        let BatchSocket {
            socket,
            state,
            emulator,
            ..
        } = self;
        let Some(e) = emulator.as_mut() else {
            return;
        };
        while let Some(due) = e.next_due() {
            tokio::time::sleep_until(due.into()).await;
            send_due(socket, state, e);
        }
    }

    /// Calls `f` with the source and contents of every datagram of the last
    /// `filled` slots (GRO slots split into their datagrams).
    pub fn for_each(&self, filled: usize, mut f: impl FnMut(SocketAddr, &[u8])) {
        self.for_each_stamped(filled, |from, _, d| f(from, d));
    }

    /// As [`BatchSocket::for_each`], with the kernel's receive time (since the Unix
    /// epoch) where the platform stamps datagrams.
    pub fn for_each_stamped(
        &self,
        filled: usize,
        mut f: impl FnMut(SocketAddr, Option<std::time::Duration>, &[u8]),
    ) {
        let now = self.emulator.as_ref().map(|_| Instant::now());
        for (meta, slot) in self.meta.iter().zip(self.rx.chunks(RECV_SLOT)).take(filled) {
            let data = &slot[..meta.len.min(slot.len())];
            let datagrams = || match meta.stride {
                0 => 1,
                stride => data.len().div_ceil(stride).max(1),
            };
            if let Some(block) = &self.block
                && block.drops(meta.addr, datagrams())
            {
                continue;
            }
            if let (Some(e), Some(now)) = (&self.emulator, now)
                && !e.admits(meta.addr, now, datagrams())
            {
                continue;
            }
            if data.is_empty() {
                // An empty datagram is still one (the engine counts it as junk).
                f(meta.addr, meta.timestamp, data);
                continue;
            }
            let stride = if meta.stride == 0 {
                data.len()
            } else {
                meta.stride
            };
            for datagram in data.chunks(stride) {
                f(meta.addr, meta.timestamp, datagram);
            }
        }
    }

    /// Asks for socket buffers of `bytes` each way (the kernel may cap them); a
    /// refusal leaves the defaults.
    pub fn set_buffers(&self, bytes: usize) {
        let r = self
            .state
            .set_recv_buffer_size((&self.socket).into(), bytes);
        let s = self
            .state
            .set_send_buffer_size((&self.socket).into(), bytes);
        if let Err(e) = r.and(s) {
            tracing::debug!(error = %e, "socket buffer size not set");
        }
    }

    /// Sends everything in `tx` and empties it; returns (send calls, failed calls).
    /// A send that fails is dropped (UDP is lossy; the engine's protocols retry).
    /// With the emulator, datagrams to impaired destinations are lost or queued
    /// one by one (sent later by [`BatchSocket::recv_batch`]) instead.
    pub async fn flush(&mut self, tx: &mut TxBatch) -> (u64, u64) {
        let mut calls = 0;
        let mut failed = 0;
        let now = self.emulator.as_ref().map(|_| Instant::now());
        for run in &tx.runs {
            if self
                .block
                .as_ref()
                .is_some_and(|b| b.drops(run.dest, run.count))
            {
                continue;
            }
            let contents = &tx.buf[run.start..run.start + run.len];
            if let (Some(e), Some(now)) = (&mut self.emulator, now) {
                e.sent(run.dest, now);
                if e.impairs(run.dest) {
                    for datagram in contents.chunks(run.segment) {
                        if e.outbound(now, run.dest, datagram) == Outbound::Send {
                            calls += 1;
                            let single = transmit(run.dest, datagram, None);
                            failed += u64::from(!send(&self.socket, &self.state, &single).await);
                        }
                    }
                    continue;
                }
            }
            calls += 1;
            let segment = (run.count > 1).then_some(run.segment);
            let whole = transmit(run.dest, contents, segment);
            failed += u64::from(!send(&self.socket, &self.state, &whole).await);
        }
        tx.clear();
        (calls, failed)
    }

    /// Datagrams one GSO send may carry here (1 where GSO is unavailable).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }
}

/// A transmit of `contents` to `dest`, in segments of `segment` bytes if given.
fn transmit(dest: SocketAddr, contents: &[u8], segment: Option<usize>) -> Transmit<'_> {
    Transmit {
        destination: dest,
        ecn: None,
        contents,
        segment_size: segment,
        src_ip: None,
    }
}

/// Sends one transmit, waiting while the socket's buffer is full; false if it
/// failed (logged).
async fn send(socket: &UdpSocket, state: &UdpSocketState, transmit: &Transmit<'_>) -> bool {
    loop {
        let sent = socket.try_io(Interest::WRITABLE, || {
            state.try_send(socket.into(), transmit)
        });
        match sent {
            Ok(()) => return true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = socket.writable().await {
                    tracing::debug!(error = %e, "UDP socket not writable");
                    return false;
                }
            }
            Err(e) => {
                tracing::debug!(dest = %transmit.destination, error = %e, "UDP send failed");
                return false;
            }
        }
    }
}

/// Sends the emulator's datagrams that are due, without waiting: one the socket
/// cannot take at once is dropped and counted (a full send buffer is congestion,
/// which a real link would also lose to).
fn send_due(socket: &UdpSocket, state: &UdpSocketState, emulator: &mut LinkEmulator) {
    if emulator.next_due().is_none_or(|due| due > Instant::now()) {
        return;
    }
    emulator.send_due(Instant::now(), |dest, datagram| {
        let t = transmit(dest, datagram, None);
        socket
            .try_io(Interest::WRITABLE, || state.try_send(socket.into(), &t))
            .is_ok()
    });
}

/// Consecutive datagrams to one destination, back to back in [`TxBatch::buf`].
#[derive(Debug, Clone, Copy)]
struct Run {
    dest: SocketAddr,
    start: usize,
    len: usize,
    /// Size of each datagram but possibly the last.
    segment: usize,
    count: usize,
    /// The last datagram was shorter: nothing more may join (GSO's rule).
    closed: bool,
}

/// Datagrams waiting to be sent, packed for GSO.
#[derive(Debug)]
pub struct TxBatch {
    buf: Box<[u8]>,
    len: usize,
    runs: Vec<Run>,
    max_segments: usize,
}

impl TxBatch {
    /// An empty batch; runs carry at most `max_segments` datagrams.
    pub fn new(max_segments: usize) -> TxBatch {
        TxBatch {
            buf: vec![0; TX_DATAGRAMS * MAX_DATAGRAM].into_boxed_slice(),
            len: 0,
            runs: Vec::with_capacity(TX_DATAGRAMS),
            max_segments: max_segments.max(1),
        }
    }

    /// Whether another datagram of up to [`MAX_DATAGRAM`] bytes fits.
    pub fn has_room(&self) -> bool {
        self.len + MAX_DATAGRAM <= self.buf.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Fills the next datagram with `fill`, which writes into the buffer it is given
    /// ([`MAX_DATAGRAM`] bytes) and returns the destination and length, or `None`
    /// when it has nothing. Returns whether a datagram was added. Call only when
    /// [`TxBatch::has_room`].
    pub fn fill(&mut self, fill: impl FnOnce(&mut [u8]) -> Option<(SocketAddr, usize)>) -> bool {
        let start = self.len;
        let Some((dest, n)) = fill(&mut self.buf[start..start + MAX_DATAGRAM]) else {
            return false;
        };
        self.commit(dest, n.min(MAX_DATAGRAM));
        true
    }

    /// Copies `bytes` in as a datagram to `dest`; false (nothing copied) if it is
    /// longer than [`MAX_DATAGRAM`] or there is no room.
    #[cfg_attr(
        not(any(test, feature = "webrtc")),
        expect(dead_code, reason = "only the WebRTC gateway's transmits are pushed")
    )]
    pub fn push(&mut self, dest: SocketAddr, bytes: &[u8]) -> bool {
        if bytes.len() > MAX_DATAGRAM || !self.has_room() {
            return false;
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.commit(dest, bytes.len());
        true
    }

    fn commit(&mut self, dest: SocketAddr, n: usize) {
        if n == 0 {
            return;
        }
        let max = self.max_segments;
        match self.runs.last_mut() {
            Some(r)
                if r.dest == dest
                    && !r.closed
                    && n <= r.segment
                    && r.count < max
                    && r.len + n <= GSO_MAX_BYTES =>
            {
                r.len += n;
                r.count += 1;
                r.closed = n < r.segment;
            }
            _ => self.runs.push(Run {
                dest,
                start: self.len,
                len: n,
                segment: n,
                count: 1,
                closed: false,
            }),
        }
        self.len += n;
    }

    fn clear(&mut self) {
        self.len = 0;
        self.runs.clear();
    }

    /// Send calls the batch will take (for tests).
    #[cfg(test)]
    fn calls(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn runs_group_same_destination_and_size() {
        let mut tx = TxBatch::new(4);
        for (port, n) in [(1, 100), (1, 100), (1, 60), (1, 100), (2, 100), (2, 100)] {
            assert!(tx.push(addr(port), &vec![7; n]));
        }
        // [100,100,60] to 1 (closed by the short one), [100] to 1, [100,100] to 2.
        assert_eq!(tx.calls(), 3);
        assert_eq!(tx.runs[0].count, 3);
        assert_eq!(tx.runs[1].start, 260);
        // The segment cap splits long runs.
        let mut tx = TxBatch::new(2);
        for _ in 0..5 {
            assert!(tx.push(addr(1), &[1; 10]));
        }
        assert_eq!(tx.calls(), 3);
        // Oversized datagrams are refused, and a full batch takes no more.
        assert!(!tx.push(addr(1), &vec![0; MAX_DATAGRAM + 1]));
        let mut tx = TxBatch::new(64);
        let mut pushed = 0;
        while tx.push(addr(3), &[0; MAX_DATAGRAM]) {
            pushed += 1;
        }
        assert_eq!(pushed, TX_DATAGRAMS);
    }

    #[tokio::test]
    async fn a_batch_goes_out_and_comes_back_in_order() {
        let mut a = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()).unwrap();
        let mut b = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()).unwrap();
        let to = b.local_addr().unwrap();
        let mut tx = TxBatch::new(a.max_gso_segments());
        for i in 0..40u8 {
            assert!(tx.fill(|buf| {
                buf[..3].copy_from_slice(&[i, i, i]);
                Some((to, 3))
            }));
        }
        let (calls, failed) = a.flush(&mut tx).await;
        assert_eq!(failed, 0);
        assert!((1..=40).contains(&calls));
        assert!(tx.is_empty());
        let mut got = Vec::new();
        while got.len() < 40 {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), b.recv_batch())
                .await
                .expect("datagrams arrive")
                .unwrap();
            b.for_each(n, |from, d| {
                assert_eq!(from, a.local_addr().unwrap());
                got.push(d.to_vec());
            });
        }
        let want: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 3]).collect();
        assert_eq!(got, want);
        // An empty datagram arrives as one.
        a.socket.send_to(&[], to).await.unwrap();
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), b.recv_batch())
            .await
            .expect("the empty datagram arrives")
            .unwrap();
        let mut empties = 0;
        b.for_each(n, |_, d| {
            assert!(d.is_empty());
            empties += 1;
        });
        assert_eq!(empties, 1);
    }

    #[tokio::test]
    async fn the_block_list_drops_both_ways_and_counts() {
        let counter = IntCounter::new("blocked", "test").unwrap();
        let list = Arc::new(BlockList::new(counter.clone()));
        let mut a = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").await.unwrap())
            .unwrap()
            .with_block_list(list.clone());
        let mut b = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()).unwrap();
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let send = |n: u8, to: SocketAddr| {
            let mut tx = TxBatch::new(1);
            for i in 0..n {
                assert!(tx.push(to, &[i]));
            }
            tx
        };
        // Empty list: everything goes out.
        assert!(list.addrs().is_empty());
        let mut tx = send(3, b_addr);
        a.flush(&mut tx).await;
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), b.recv_batch())
            .await
            .expect("sent while the list is empty")
            .unwrap();
        let mut got = 0;
        b.for_each(n, |_, _| got += 1);
        assert!(got >= 1);
        while got < 3 {
            let n = b.recv_batch().await.unwrap();
            b.for_each(n, |_, _| got += 1);
        }
        assert_eq!(counter.get(), 0);

        // Blocked: sends to b are dropped and counted...
        assert!(list.block(b_addr));
        assert!(!list.block(b_addr), "already listed");
        assert_eq!(list.addrs(), vec![b_addr]);
        let mut tx = send(4, b_addr);
        let (calls, failed) = a.flush(&mut tx).await;
        assert_eq!((calls, failed), (0, 0));
        assert_eq!(counter.get(), 4);
        // ...and so is what b sends to a.
        let mut tx = send(2, a_addr);
        b.flush(&mut tx).await;
        let mut delivered = 0;
        while counter.get() < 6 {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), a.recv_batch())
                .await
                .expect("b's datagrams reach a's socket")
                .unwrap();
            a.for_each(n, |_, _| delivered += 1);
        }
        assert_eq!(delivered, 0);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(100), b.recv_batch())
                .await
                .is_err(),
            "nothing reached b"
        );

        // Cleared: traffic flows again.
        assert_eq!(list.clear(), 1);
        let mut tx = send(1, b_addr);
        a.flush(&mut tx).await;
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), b.recv_batch())
            .await
            .expect("sent once cleared")
            .unwrap();
        let mut got = 0;
        b.for_each(n, |from, _| {
            assert_eq!(from, a_addr);
            got += 1;
        });
        assert_eq!(got, 1);
        assert_eq!(counter.get(), 6);
    }

    #[tokio::test]
    async fn the_emulator_delays_what_it_sends_and_filters_like_a_nat() {
        use crate::netem::{EmulateMetrics, EmulateSettings, LinkEmulator, NatMode};
        use std::time::Duration;
        const DELAY_MS: u64 = 40;
        let c = |n: &str| IntCounter::new(n, "test").unwrap();
        let metrics = EmulateMetrics {
            lost: c("lost"),
            queue_full: c("queue_full"),
            send_failed: c("send_failed"),
            nat_filtered: c("nat_filtered"),
            delayed: c("delayed"),
        };
        let settings = EmulateSettings {
            delay_ms: DELAY_MS,
            nat: NatMode::PortRestricted,
            nat_timeout_secs: 30,
            ..EmulateSettings::default()
        };
        let mut a = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").await.unwrap())
            .unwrap()
            .with_emulator(LinkEmulator::new(&settings, 1, metrics.clone()));
        let mut b = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()).unwrap();
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());

        // Unsolicited: b has not been sent to, so a's NAT drops what b sends.
        b.socket.send_to(b"knock", a_addr).await.unwrap();
        let wait = Duration::from_millis(300);
        let mut heard = 0;
        let _ = tokio::time::timeout(wait, async {
            loop {
                let n = a.recv_batch().await.unwrap();
                a.for_each(n, |_, _| heard += 1);
                if metrics.nat_filtered.get() > 0 {
                    break;
                }
            }
        })
        .await;
        assert_eq!((heard, metrics.nat_filtered.get()), (0, 1));

        // a sends to b: held for the delay, sent by a's receive loop when due.
        let mut tx = TxBatch::new(a.max_gso_segments());
        for i in 0..5u8 {
            assert!(tx.push(b_addr, &[i]));
        }
        let sent_at = std::time::Instant::now();
        let (calls, failed) = a.flush(&mut tx).await;
        assert_eq!((calls, failed), (0, 0), "all queued");
        assert_eq!(metrics.delayed.get(), 5);
        let early = tokio::time::timeout(Duration::from_millis(DELAY_MS / 2), b.recv_batch()).await;
        assert!(early.is_err(), "nothing arrives before the delay");
        let mut got = Vec::new();
        let receive = async {
            while got.len() < 5 {
                let n = b.recv_batch().await.unwrap();
                b.for_each(n, |from, d| {
                    assert_eq!(from, a_addr);
                    got.push(d[0]);
                });
            }
        };
        tokio::select! {
            () = receive => {}
            _ = a.recv_batch() => panic!("a received nothing"),
            () = tokio::time::sleep(Duration::from_secs(5)) => panic!("the delayed datagrams never left"),
        }
        let elapsed = sent_at.elapsed();
        assert!(elapsed >= Duration::from_millis(DELAY_MS), "{elapsed:?}");
        assert_eq!(got, vec![0, 1, 2, 3, 4], "no jitter: in order");

        // At shutdown, what is still queued goes out when due.
        let mut tx = TxBatch::new(1);
        assert!(tx.push(b_addr, &[9]));
        a.flush(&mut tx).await;
        tokio::time::timeout(Duration::from_secs(5), a.finish())
            .await
            .expect("finish ends once the queue is empty");
        let n = tokio::time::timeout(Duration::from_secs(5), b.recv_batch())
            .await
            .expect("the last datagram arrives")
            .unwrap();
        let mut last = Vec::new();
        b.for_each(n, |_, d| last.push(d.to_vec()));
        assert_eq!(last, vec![vec![9]]);

        // Now that a has sent to b, b's answer is admitted.
        b.socket.send_to(b"reply", a_addr).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), a.recv_batch())
            .await
            .expect("the reply arrives")
            .unwrap();
        let mut replies = Vec::new();
        a.for_each(n, |from, d| replies.push((from, d.to_vec())));
        assert_eq!(replies, vec![(b_addr, b"reply".to_vec())]);
        assert_eq!(metrics.nat_filtered.get(), 1);
    }
}
