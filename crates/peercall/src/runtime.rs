//! The engine task: the one owner of the [`Node`] and the UDP socket.
//!
//! It waits on the command channel, the engine's next deadline and the socket, feeds
//! whichever comes first to the node with the current time, then drains the node's
//! outputs (transmits are sent, events logged), as the driving contract in
//! `peercall_engine` requires. On shutdown it closes the node, sends the resulting
//! transmits (peers are told) and returns.
//!
//! With the `webrtc` feature it also owns the WebRTC gateway: every datagram is
//! offered to the gateway first (it takes only STUN for its own ICE ufrags and
//! DTLS/SRTP from browsers it has validated), the rest goes to the node; both
//! deadlines are watched, and both outputs drained.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peercall_engine::{Contact, Event, Node, Stats, Status};
use peercall_wire::Time;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::clock::Clock;
use crate::logging::short_key;
use crate::metrics::Metrics;

/// Receive buffer: the largest UDP payload, so an oversized datagram reaches the
/// engine whole and is counted as malformed rather than silently truncated.
const RECV_BUFFER: usize = 65_535;
/// Longest single timer sleep. Deadlines further away (or at `Time::MAX`) are
/// re-checked after this, which costs nothing and keeps tokio's timer wheel in range.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// A request to the engine task.
#[derive(Debug)]
pub enum Command {
    /// Start a session with a peer.
    Connect(Contact),
    /// Report the node's status and counters.
    Snapshot(oneshot::Sender<Snapshot>),
    /// Close the node and stop.
    Shutdown,
    /// Answer a browser's SDP offer with an echo session.
    #[cfg(feature = "webrtc")]
    WebRtcEchoOffer {
        /// The SDP offer.
        sdp: String,
        /// Where the answer goes (`None`: this node runs no gateway).
        reply: oneshot::Sender<
            Option<Result<peercall_gateway::Accepted, peercall_gateway::GatewayError>>,
        >,
    },
    /// Close a browser session; replies whether there was one.
    #[cfg(feature = "webrtc")]
    WebRtcClose {
        /// The session.
        session: peercall_gateway::SessionId,
        /// Where the answer goes.
        reply: oneshot::Sender<bool>,
    },
}

/// The node's state at one moment, for the admin API.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The node's status.
    pub status: Status,
    /// Its counters.
    pub stats: Stats,
    /// When the snapshot was taken.
    pub now: Time,
    /// The WebRTC gateway's counters.
    #[cfg(feature = "webrtc")]
    pub webrtc: Option<peercall_gateway::Stats>,
}

/// The engine task's state.
#[derive(Debug)]
pub struct Engine {
    node: Node,
    socket: UdpSocket,
    clock: Clock,
    commands: mpsc::Receiver<Command>,
    metrics: Arc<Metrics>,
    #[cfg(feature = "webrtc")]
    webrtc: Option<crate::webrtc::WebRtc>,
}

/// Sleeps until `deadline`, or forever if there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => {
            let cap = Instant::now() + MAX_SLEEP;
            tokio::time::sleep_until(at.min(cap).into()).await;
        }
        None => std::future::pending().await,
    }
}

impl Engine {
    /// An engine task over `node` and `socket`.
    pub fn new(
        node: Node,
        socket: UdpSocket,
        clock: Clock,
        commands: mpsc::Receiver<Command>,
        metrics: Arc<Metrics>,
    ) -> Engine {
        Engine {
            node,
            socket,
            clock,
            commands,
            metrics,
            #[cfg(feature = "webrtc")]
            webrtc: None,
        }
    }

    /// Adds the WebRTC gateway.
    #[cfg(feature = "webrtc")]
    pub fn with_webrtc(mut self, webrtc: crate::webrtc::WebRtc) -> Engine {
        self.webrtc = Some(webrtc);
        self
    }

    /// Runs until a [`Command::Shutdown`] (or until every command sender is gone),
    /// then closes the node and sends its last transmits.
    pub async fn run(mut self) {
        let mut buf = vec![0u8; RECV_BUFFER];
        // The node connects to its seeds on its first timeout (see `Node::new`).
        self.node.handle_timeout(self.clock.now());
        self.drain().await;
        loop {
            let deadline = self.poll_timeout();
            let wake = deadline.and_then(|t| self.clock.instant_at(t));
            tokio::select! {
                // Commands first, so shutdown and the admin API are served under a flood.
                biased;
                command = self.commands.recv() => match command {
                    None | Some(Command::Shutdown) => break,
                    Some(Command::Connect(contact)) => {
                        debug!(addr = %contact.addr, "connect requested");
                        self.node.connect(self.clock.now(), contact);
                    }
                    Some(Command::Snapshot(reply)) => {
                        // The requester may have given up; nothing to do then.
                        let _ = reply.send(self.snapshot());
                    }
                    #[cfg(feature = "webrtc")]
                    Some(Command::WebRtcEchoOffer { sdp, reply }) => {
                        let now = self.clock.now();
                        let result = self.webrtc.as_mut().map(|w| w.offer_echo(now, &sdp));
                        let _ = reply.send(result);
                    }
                    #[cfg(feature = "webrtc")]
                    Some(Command::WebRtcClose { session, reply }) => {
                        let closed = self.webrtc.as_mut().is_some_and(|w| w.close(session));
                        let _ = reply.send(closed);
                    }
                },
                () = sleep_until(wake) => {
                    let now = self.clock.now();
                    // A capped sleep may wake before the deadline: then just re-arm.
                    if deadline.is_some_and(|d| now >= d) {
                        self.handle_timeout(now);
                    }
                }
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((len, from)) => self.handle_datagram(self.clock.now(), from, &buf[..len]),
                    Err(e) => {
                        // Typically an ICMP error for an earlier send; the socket is fine.
                        self.metrics.udp_receive_errors.inc();
                        debug!(error = %e, "UDP receive failed");
                    }
                },
            }
            self.drain().await;
        }
        info!("closing sessions");
        self.node.close(self.clock.now());
        #[cfg(feature = "webrtc")]
        if let Some(w) = &mut self.webrtc {
            w.close_all();
        }
        self.drain().await;
    }

    /// The earliest deadline of the node and the gateway.
    fn poll_timeout(&self) -> Option<Time> {
        let node = self.node.poll_timeout();
        #[cfg(feature = "webrtc")]
        if let Some(gateway) = self.webrtc.as_ref().and_then(|w| w.poll_timeout()) {
            return Some(node.map_or(gateway, |n| n.min(gateway)));
        }
        node
    }

    /// Runs whichever timers are due.
    fn handle_timeout(&mut self, now: Time) {
        if self.node.poll_timeout().is_some_and(|d| now >= d) {
            self.node.handle_timeout(now);
        }
        #[cfg(feature = "webrtc")]
        if let Some(w) = &mut self.webrtc {
            w.handle_timeout(now);
        }
    }

    /// Hands a datagram to the gateway if it is a browser's, else to the node.
    fn handle_datagram(&mut self, now: Time, from: SocketAddr, datagram: &[u8]) {
        #[cfg(feature = "webrtc")]
        if let Some(w) = &mut self.webrtc
            && w.handle_datagram(now, from, datagram)
        {
            return;
        }
        self.node.handle_datagram(now, from, datagram);
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            status: self.node.status(),
            stats: self.node.stats(),
            now: self.clock.now(),
            #[cfg(feature = "webrtc")]
            webrtc: self.webrtc.as_ref().map(|w| w.stats()),
        }
    }

    /// Sends every pending transmit and logs every pending event.
    async fn drain(&mut self) {
        while let Some(t) = self.node.poll_transmit() {
            if let Err(e) = self.socket.send_to(&t.bytes, t.dest).await {
                self.metrics.udp_send_errors.inc();
                debug!(dest = %t.dest, error = %e, "UDP send failed");
            }
        }
        while let Some(event) = self.node.poll_event() {
            if let Event::PeerDown { reason, .. } = &event {
                self.metrics.session_ended(reason);
            }
            log_event(&event);
        }
        #[cfg(feature = "webrtc")]
        if let Some(w) = &mut self.webrtc {
            // Events first: echoing audio produces more transmits.
            w.handle_events(self.clock.now(), &self.metrics.webrtc);
            while let Some(t) = w.poll_transmit() {
                if let Err(e) = self.socket.send_to(&t.bytes, t.dest).await {
                    self.metrics.udp_send_errors.inc();
                    debug!(dest = %t.dest, error = %e, "UDP send failed");
                }
            }
        }
    }
}

fn log_event(event: &Event) {
    match event {
        Event::PeerUp { peer, addr } => {
            info!(peer = %short_key(peer), "session up");
            debug!(peer = %peer, addr = %addr, "session up");
        }
        Event::PeerDown { peer, reason } => {
            info!(peer = %short_key(peer), reason, "session down");
        }
        Event::Overlay(e) => debug!(event = ?e, "overlay"),
        Event::CallIncoming { call, .. } => info!(%call, "incoming call"),
        Event::CallRinging { call } => info!(%call, "ringing"),
        Event::CallConnected { call, path } => {
            info!(%call, path = path.map_or("none", |k| k.label()), "call connected")
        }
        Event::CallPathSwitched { call, from, to } => info!(
            %call,
            from = from.map_or("none", |k| k.label()),
            to = to.label(),
            "call path switched"
        ),
        Event::CallEnded { call, reason } => info!(%call, %reason, "call ended"),
    }
}

/// Sends `command` to the engine task; false if it has stopped.
pub async fn send(commands: &mpsc::Sender<Command>, command: Command) -> bool {
    commands.send(command).await.is_ok()
}

/// Asks the engine task for a snapshot, waiting at most `timeout`.
pub async fn snapshot(commands: &mpsc::Sender<Command>, timeout: Duration) -> Option<Snapshot> {
    let (tx, rx) = oneshot::channel();
    if !send(commands, Command::Snapshot(tx)).await {
        return None;
    }
    tokio::time::timeout(timeout, rx).await.ok()?.ok()
}

/// Warns about seeds that could not be resolved; returns the rest.
pub async fn resolve_seeds(seeds: &[crate::contact::PeerSpec], local: SocketAddr) -> Vec<Contact> {
    let mut contacts = Vec::with_capacity(seeds.len());
    for seed in seeds {
        match seed.resolve(local).await {
            Ok(c) => contacts.push(c),
            Err(e) => warn!(error = %e, "seed skipped"),
        }
    }
    contacts
}
