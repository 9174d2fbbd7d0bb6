//! The engine task: the one owner of the [`Node`] and the UDP socket.
//!
//! It waits on the command channel, the engine's next deadline and the socket, feeds
//! whichever comes first to the node with the current time, then drains the node's
//! outputs (transmits are sent, events logged), as the driving contract in
//! `peercall_engine` requires. The socket is batched ([`crate::udp`]): one wake-up
//! receives up to a batch of datagrams with `recvmmsg`, feeds them all to the node,
//! then sends the node's transmits together (GSO runs where the destinations allow),
//! copying them out with `Node::poll_transmit_into` so the node reuses its buffers
//! and forwarding allocates nothing per packet. On shutdown it closes the node, sends the resulting
//! transmits (peers are told) and returns.
//!
//! It also owns what the node knows of the overlay on the user's behalf: the
//! contact book (presence from the overlay's events, saved through the state
//! writer at every change), the admin API's lookups in flight (answered when the
//! overlay's `LookupDone` arrives), and the host cache's periodic save. Every event
//! worth showing is published on the [`EventBus`] for `GET /v1/events`.
//!
//! With the `webrtc` feature it also owns the WebRTC gateway: every datagram is
//! offered to the gateway first (it takes only STUN for its own ICE ufrags and
//! DTLS/SRTP from browsers it has validated), the rest goes to the node; both
//! deadlines are watched, and both outputs drained.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peercall_crypto::{Handle, UserId};
use peercall_engine::{
    CallError, CallId, CallStats, CallTarget, Contact, EndReason, Event, FRAME_SAMPLES, Found,
    Lookup, LookupError, Node, OverlayEvent, PathKind, RequestId, Resources, Stats, Status,
};
use peercall_wire::Time;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::book::{AddError, Added, ContactBook, ContactView};
use crate::calls::{AudioInfo, CallAudio, CallBody, FRAME, MediaFiles, Playback, Recorder};
use crate::clock::Clock;
use crate::events::EventBus;
use crate::hosts;
use crate::logging::short_key;
use crate::metrics::Metrics;
use crate::persist::{Persister, Saved};
use crate::store::{CONTACTS_FILE, HOSTS_FILE};
use crate::udp::{BatchSocket, TxBatch};

/// Longest single timer sleep. Deadlines further away (or at `Time::MAX`) are
/// re-checked after this, which costs nothing and keeps tokio's timer wheel in range.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// Lookups from the admin API in flight at once; more are refused (the overlay
/// answers each within seconds, so this only bounds a runaway client).
pub const MAX_PENDING_LOOKUPS: usize = 256;

/// Audio of ended calls remembered for the API: as many as the engine lingers on
/// at most, a bound for a node that takes many short calls.
const MAX_ENDED_AUDIO: usize = 64;

/// The answer to a lookup.
pub type LookupResult = Result<Found, LookupError>;

/// What a contact add did, the contact, and whether the book reached the disk.
pub type AddReply = Result<(Added, ContactView, oneshot::Receiver<Saved>), AddError>;

/// A request to the engine task.
#[derive(Debug)]
pub enum Command {
    /// Start a session with a peer.
    Connect(Contact),
    /// Report the node's status and counters.
    Snapshot(oneshot::Sender<Snapshot>),
    /// Look a user up in the directory; `None` if too many lookups are in flight.
    Lookup {
        /// By user id or handle.
        what: Lookup,
        /// Where the answer goes.
        reply: oneshot::Sender<Option<LookupResult>>,
    },
    /// List the contacts.
    Contacts(oneshot::Sender<Vec<ContactView>>),
    /// Pin a user as a contact and follow its presence.
    AddContact {
        /// The user id (pinned).
        user: UserId,
        /// The handle it was found under, if added by handle.
        handle: Option<Handle>,
        /// Where the answer goes.
        reply: oneshot::Sender<AddReply>,
    },
    /// Remove the contact pinned to a user id.
    RemoveContact {
        /// The user id.
        user: UserId,
        /// The removed contact and whether the book reached the disk; `None` if
        /// there was no such contact.
        reply: oneshot::Sender<Option<(ContactView, oneshot::Receiver<Saved>)>>,
    },
    /// New resource figures for the election (CPU headroom measured by the shell).
    SetResources(Resources),
    /// Place a call; the answer is its id (failures come as its end).
    PlaceCall {
        /// Whom to call.
        to: CallTarget,
        /// What to play and record.
        media: MediaFiles,
        /// Where the answer goes.
        reply: oneshot::Sender<CallId>,
    },
    /// Answer an incoming call.
    AnswerCall {
        /// The call.
        call: CallId,
        /// What to play and record.
        media: MediaFiles,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<(), CallError>>,
    },
    /// Decline an incoming call.
    RejectCall {
        /// The call.
        call: CallId,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<(), CallError>>,
    },
    /// Hang up (or cancel) a call.
    HangupCall {
        /// The call.
        call: CallId,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<(), CallError>>,
    },
    /// Every call the engine knows (live, and ended in the last minute).
    Calls(oneshot::Sender<Vec<CallBody>>),
    /// One call.
    GetCall {
        /// The call.
        call: CallId,
        /// Where the answer goes (`None`: no such call).
        reply: oneshot::Sender<Option<CallBody>>,
    },
    /// Close the node and stop.
    Shutdown,
    /// Answer a browser's SDP offer with a session carrying a call's audio, or
    /// with an echo session when no call is named.
    #[cfg(feature = "webrtc")]
    WebRtcOffer {
        /// The call (`None`: an echo session).
        call: Option<CallId>,
        /// The SDP offer.
        sdp: String,
        /// Where the answer goes (`None`: this node runs no gateway).
        reply:
            oneshot::Sender<Option<Result<peercall_gateway::Accepted, crate::webrtc::OfferError>>>,
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
    /// Contacts in the book.
    pub contacts: usize,
    /// Contacts online now.
    pub contacts_online: usize,
    /// Supernodes in the host cache.
    pub host_cache: usize,
    /// Every call the engine knows.
    pub calls: Vec<CallStats>,
    /// The WebRTC gateway's counters.
    #[cfg(feature = "webrtc")]
    pub webrtc: Option<peercall_gateway::Stats>,
}

/// What the engine task holds on the user's behalf besides the node.
#[derive(Debug)]
pub struct UserState {
    /// The contact book, as loaded at start.
    pub book: ContactBook,
    /// Where events for `/v1/events` go.
    pub events: Arc<EventBus>,
    /// The state writer.
    pub persister: Persister,
    /// How often the host cache is saved.
    pub save_interval: Duration,
    /// What auto-answered calls play and record.
    pub answer_media: AnswerMedia,
}

/// What auto-answered calls play and record (`calls.answer_play`,
/// `calls.answer_record`).
#[derive(Debug, Clone, Default)]
pub struct AnswerMedia {
    /// Played into each auto-answered call.
    pub play: Option<Playback>,
    /// Each auto-answered call is recorded here (overwriting the last).
    pub record: Option<std::path::PathBuf>,
}

/// What the engine task leaves behind: the state to save at shutdown.
#[derive(Debug)]
pub struct Final {
    /// The state writer, to finish its queue.
    pub persister: Persister,
    /// The host cache file's contents.
    pub hosts: Vec<u8>,
    /// The contacts file's contents.
    pub contacts: Vec<u8>,
}

/// The engine task's state.
#[derive(Debug)]
pub struct Engine {
    node: Node,
    socket: BatchSocket,
    /// Transmits waiting for the next batched send.
    tx: TxBatch,
    clock: Clock,
    commands: mpsc::Receiver<Command>,
    metrics: Arc<Metrics>,
    me: UserId,
    book: ContactBook,
    events: Arc<EventBus>,
    persister: Persister,
    save_interval: Duration,
    /// The host cache as last saved, to skip saves that change nothing.
    saved_hosts: Vec<u8>,
    lookups: HashMap<RequestId, oneshot::Sender<Option<LookupResult>>>,
    /// Audio of calls on the clock (connected calls).
    audio: HashMap<CallId, CallAudio>,
    /// What calls not connected yet will play and record.
    pending_media: HashMap<CallId, MediaFiles>,
    /// The audio of ended calls, for the API while the engine lingers on them.
    ended_audio: HashMap<CallId, AudioInfo>,
    answer_media: AnswerMedia,
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
        socket: BatchSocket,
        clock: Clock,
        commands: mpsc::Receiver<Command>,
        metrics: Arc<Metrics>,
        user: UserState,
    ) -> Engine {
        Engine {
            me: node.status().user_id,
            saved_hosts: hosts::to_json(node.host_cache()),
            node,
            tx: TxBatch::new(socket.max_gso_segments()),
            socket,
            clock,
            commands,
            metrics,
            book: user.book,
            events: user.events,
            persister: user.persister,
            save_interval: user.save_interval,
            lookups: HashMap::new(),
            audio: HashMap::new(),
            pending_media: HashMap::new(),
            ended_audio: HashMap::new(),
            answer_media: user.answer_media,
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
    /// then closes the node, sends its last transmits and hands back what must be
    /// saved.
    pub async fn run(mut self) -> Final {
        let now = self.clock.now();
        // Contacts are followed from the start; the overlay subscribes through the
        // first home supernode as soon as it has one.
        self.node.subscribe(now, &self.book.users());
        // The node connects to its seeds on its first timeout (see `Node::new`).
        self.node.handle_timeout(now);
        self.drain().await;
        let mut save = tokio::time::interval(self.save_interval);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        save.tick().await;
        // The audio clock: each tick does every connected call's due frames, counted
        // from the call's own start (see `crate::calls`), so a late tick neither
        // drifts nor bursts more than the catch-up bound; missed ticks are skipped.
        let mut audio_tick = tokio::time::interval(FRAME);
        audio_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
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
                    Some(Command::WebRtcOffer { call, sdp, reply }) => {
                        let now = self.clock.now();
                        let node = &mut self.node;
                        let result = self.webrtc.as_mut().map(|w| match call {
                            Some(call) => w.offer_call(now, node, call, &sdp),
                            None => w.offer_echo(now, &sdp).map_err(Into::into),
                        });
                        let _ = reply.send(result);
                    }
                    #[cfg(feature = "webrtc")]
                    Some(Command::WebRtcClose { session, reply }) => {
                        let now = self.clock.now();
                        let node = &mut self.node;
                        let closed = self.webrtc.as_mut().is_some_and(|w| w.close(now, node, session));
                        let _ = reply.send(closed);
                    }
                    Some(command) => self.command(command),
                },
                _ = save.tick() => self.save_hosts(),
                _ = audio_tick.tick(), if !self.audio.is_empty() => self.audio_tick(),
                () = sleep_until(wake) => {
                    let now = self.clock.now();
                    // A capped sleep may wake before the deadline: then just re-arm.
                    if deadline.is_some_and(|d| now >= d) {
                        self.handle_timeout(now);
                    }
                }
                received = self.socket.recv_batch() => match received {
                    Ok(filled) => {
                        self.metrics.udp_receive_calls.inc();
                        self.handle_batch(filled);
                    }
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
        // Datagrams an emulated link still holds ([emulate]) go out when due.
        self.socket.finish().await;
        // Recordings of calls the close did not end (none expected) are finished too.
        for (call, mut audio) in std::mem::take(&mut self.audio) {
            finish_recording(call, &mut audio);
        }
        Final {
            hosts: hosts::to_json(self.node.host_cache()),
            contacts: self.book.to_json(),
            persister: self.persister,
        }
    }

    /// Serves the commands that are neither connect, snapshot nor shutdown.
    fn command(&mut self, command: Command) {
        let now = self.clock.now();
        match command {
            Command::Lookup { what, reply } => {
                self.lookups.retain(|_, r| !r.is_closed());
                if self.lookups.len() >= MAX_PENDING_LOOKUPS {
                    let _ = reply.send(None);
                    return;
                }
                let id = self.node.lookup(now, what);
                self.lookups.insert(id, reply);
            }
            Command::Contacts(reply) => {
                let _ = reply.send(self.book.views(now));
            }
            Command::AddContact {
                user,
                handle,
                reply,
            } => {
                let result = if user == self.me {
                    Err(AddError::Myself)
                } else {
                    self.book.add(user, handle, now.as_secs())
                };
                let result = result.map(|added| {
                    let saved = self.save_contacts(added != Added::Unchanged);
                    if added == Added::New {
                        self.node.subscribe(now, &[user]);
                        info!(user = %user.fingerprint(), "contact added");
                    }
                    let view = self.view_of(&user, now);
                    if added != Added::Unchanged {
                        self.events.publish("contact_added", &view);
                    }
                    (added, view, saved)
                });
                let _ = reply.send(result);
            }
            Command::RemoveContact { user, reply } => {
                let view = self.book.get(&user).map(|c| self.book.view(c, now));
                let answer = view.and_then(|view| {
                    self.book.remove(&user)?;
                    self.node.unsubscribe(now, &[user]);
                    info!(user = %user.fingerprint(), "contact removed");
                    self.events.publish("contact_removed", &view);
                    Some((view, self.save_contacts(true)))
                });
                let _ = reply.send(answer);
            }
            Command::SetResources(resources) => self.node.set_resources(resources),
            Command::PlaceCall { to, media, reply } => {
                let call = self.node.call(now, to);
                info!(%call, "placing a call");
                self.pending_media.insert(call, media);
                let _ = reply.send(call);
            }
            Command::AnswerCall { call, media, reply } => {
                self.pending_media.insert(call, media);
                let result = self.node.answer(now, call);
                if result.is_err() {
                    self.pending_media.remove(&call);
                }
                let _ = reply.send(result);
            }
            Command::RejectCall { call, reply } => {
                let _ = reply.send(self.node.reject(now, call));
            }
            Command::HangupCall { call, reply } => {
                let _ = reply.send(self.node.hangup(now, call));
            }
            Command::Calls(reply) => {
                let calls = self.node.calls(now);
                let bodies = calls.iter().map(|s| self.call_body(s)).collect();
                let _ = reply.send(bodies);
            }
            Command::GetCall { call, reply } => {
                let body = self.node.call_stats(now, call).map(|s| self.call_body(&s));
                let _ = reply.send(body);
            }
            // Served in the loop.
            Command::Connect(_) | Command::Snapshot(_) | Command::Shutdown => {}
            #[cfg(feature = "webrtc")]
            Command::WebRtcOffer { .. } | Command::WebRtcClose { .. } => {}
        }
    }

    /// A contact's view (it must be in the book).
    fn view_of(&self, user: &UserId, now: Time) -> ContactView {
        match self.book.get(user) {
            Some(c) => self.book.view(c, now),
            None => ContactView {
                user_id: user.to_string(),
                fingerprint: user.fingerprint(),
                handle: None,
                added: 0,
                online: None,
                since_s: None,
                record_handle: None,
                endpoints: Vec::new(),
            },
        }
    }

    /// Saves the contact book (if `changed`; else answers "saved" at once).
    fn save_contacts(&self, changed: bool) -> oneshot::Receiver<Saved> {
        if changed {
            return self.persister.save(CONTACTS_FILE, self.book.to_json());
        }
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Ok(()));
        rx
    }

    /// Saves the host cache if it changed since the last save.
    fn save_hosts(&mut self) {
        let bytes = hosts::to_json(self.node.host_cache());
        if bytes != self.saved_hosts {
            self.saved_hosts = bytes.clone();
            // Failures are logged and counted by the writer; the next tick retries
            // only if the cache changes again, and shutdown saves it anyway.
            drop(self.persister.save(HOSTS_FILE, bytes));
        }
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

    /// Hands each received datagram to the gateway if it is a browser's, else to the
    /// node, all at one `now` (they arrived together).
    fn handle_batch(&mut self, filled: usize) {
        let now = self.clock.now();
        let node = &mut self.node;
        #[cfg(feature = "webrtc")]
        let webrtc = &mut self.webrtc;
        self.socket.for_each(filled, |from, datagram| {
            #[cfg(feature = "webrtc")]
            if let Some(w) = webrtc.as_mut()
                && w.handle_datagram(now, from, datagram)
            {
                return;
            }
            node.handle_datagram(now, from, datagram);
        });
    }

    /// Sends what the batch holds.
    async fn flush(&mut self) {
        flush(&mut self.socket, &mut self.tx, &self.metrics).await;
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            status: self.node.status(),
            stats: self.node.stats(),
            now: self.clock.now(),
            contacts: self.book.len(),
            contacts_online: self.book.online(),
            host_cache: self.node.host_cache().len(),
            calls: self.node.calls(self.clock.now()),
            #[cfg(feature = "webrtc")]
            webrtc: self.webrtc.as_ref().map(|w| w.stats()),
        }
    }

    /// Sends every pending transmit (batched) and acts on every pending event,
    /// until neither the node nor the gateway has more (a browser's audio feeds
    /// the node, a call's audio feeds the gateway).
    async fn drain(&mut self) {
        while self.drain_once().await {}
    }

    /// One round of [`Engine::drain`]; returns whether the gateway fed the node,
    /// so another round is due.
    async fn drain_once(&mut self) -> bool {
        loop {
            if !self.tx.has_room() {
                self.flush().await;
            }
            let node = &mut self.node;
            if !self.tx.fill(|buf| node.poll_transmit_into(buf)) {
                break;
            }
        }
        self.flush().await;
        while let Some(event) = self.node.poll_event() {
            self.handle_event(event);
        }
        #[cfg(feature = "webrtc")]
        if let Some(w) = &mut self.webrtc {
            // Events first: echoed or forwarded audio produces more transmits.
            let fed = w.handle_events(self.clock.now(), &self.metrics.webrtc, &mut self.node);
            while let Some(t) = w.poll_transmit() {
                if !self.tx.has_room() {
                    flush(&mut self.socket, &mut self.tx, &self.metrics).await;
                }
                if !self.tx.push(t.dest, &t.bytes) {
                    self.metrics.udp_send_errors.inc();
                    debug!(dest = %t.dest, len = t.bytes.len(), "datagram too long to send");
                }
            }
            flush(&mut self.socket, &mut self.tx, &self.metrics).await;
            return fed;
        }
        false
    }
}

/// Sends what `tx` holds on `socket`, counting calls and failures.
async fn flush(socket: &mut BatchSocket, tx: &mut TxBatch, metrics: &Metrics) {
    if tx.is_empty() {
        return;
    }
    let (calls, failed) = socket.flush(tx).await;
    metrics.udp_send_calls.inc_by(calls);
    metrics.udp_send_errors.inc_by(failed);
}

/// Body of `session_up` events.
#[derive(Serialize)]
struct SessionUp {
    peer: String,
    addr: String,
}

/// Body of `session_down` events.
#[derive(Serialize)]
struct SessionDown {
    peer: String,
    reason: &'static str,
}

impl Engine {
    /// Logs an engine event, counts it, and acts on it: lookups answered, presence
    /// noted in the contact book, everything of interest published.
    fn handle_event(&mut self, event: Event) {
        match event {
            Event::PeerUp { peer, addr } => {
                info!(peer = %short_key(&peer), "session up");
                debug!(peer = %peer, addr = %addr, "session up");
                self.events.publish(
                    "session_up",
                    SessionUp {
                        peer: peer.to_string(),
                        addr: addr.to_string(),
                    },
                );
            }
            Event::PeerDown { peer, reason } => {
                self.metrics.session_ended(reason);
                info!(peer = %short_key(&peer), reason, "session down");
                self.events.publish(
                    "session_down",
                    SessionDown {
                        peer: peer.to_string(),
                        reason,
                    },
                );
            }
            Event::Overlay(e) => self.overlay_event(e),
            Event::CallIncoming { call, from, handle } => {
                info!(%call, from = %from.fingerprint(), "incoming call");
                self.events.publish(
                    "call_incoming",
                    serde_json::json!({
                        "call": call.0,
                        "from": from.to_string(),
                        "fingerprint": from.fingerprint(),
                        "handle": handle.as_ref().map(|h| h.as_str()),
                    }),
                );
            }
            Event::CallRinging { call } => {
                info!(%call, "ringing");
                self.events
                    .publish("call_ringing", serde_json::json!({ "call": call.0 }));
            }
            Event::CallConnected { call, path } => {
                info!(%call, path = path_label(path), "call connected");
                self.start_audio(call);
                self.events.publish(
                    "call_connected",
                    serde_json::json!({ "call": call.0, "path": path.map(PathKind::label) }),
                );
            }
            Event::CallPathSwitched { call, from, to } => {
                info!(%call, from = path_label(from), to = to.label(), "call path switched");
                self.events.publish(
                    "call_path_switched",
                    serde_json::json!({
                        "call": call.0,
                        "from": from.map(PathKind::label),
                        "to": to.label(),
                    }),
                );
            }
            Event::CallEnded { call, reason } => self.call_ended(call, reason),
            Event::CallOpus {
                call,
                timestamp,
                opus,
                ..
            } => {
                #[cfg(feature = "webrtc")]
                if let Some(w) = &mut self.webrtc {
                    w.forward_to_browser(self.clock.now(), call, timestamp, &opus);
                }
                #[cfg(not(feature = "webrtc"))]
                let _ = (call, timestamp, opus);
            }
        }
    }

    /// Puts a connected call's audio on the clock: the files given when it was
    /// placed or answered, or the auto-answer files for an incoming call answered
    /// by the engine.
    fn start_audio(&mut self, call: CallId) {
        let media = match self.pending_media.remove(&call) {
            Some(m) => m,
            None => {
                let incoming = self
                    .node
                    .call_stats(self.clock.now(), call)
                    .is_some_and(|s| !s.outgoing);
                if incoming {
                    self.auto_answer_media(call)
                } else {
                    MediaFiles::default()
                }
            }
        };
        self.audio
            .insert(call, CallAudio::new(media, Instant::now()));
    }

    /// The auto-answer files for `call`.
    fn auto_answer_media(&self, call: CallId) -> MediaFiles {
        let record =
            self.answer_media
                .record
                .as_deref()
                .and_then(|path| match Recorder::create(path) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        warn!(%call, error = %e, "calls.answer_record: not recording");
                        None
                    }
                });
        MediaFiles {
            play: self.answer_media.play.clone(),
            record,
        }
    }

    /// Takes a call off the clock, finishes its recording and tells the clients.
    fn call_ended(&mut self, call: CallId, reason: EndReason) {
        info!(%call, %reason, outcome = reason.label(), "call ended");
        #[cfg(feature = "webrtc")]
        if let Some(w) = &mut self.webrtc {
            w.call_ended(call);
        }
        self.pending_media.remove(&call);
        if let Some(mut audio) = self.audio.remove(&call) {
            finish_recording(call, &mut audio);
            if self.ended_audio.len() >= MAX_ENDED_AUDIO {
                // Forget the oldest (lowest id: ids grow).
                if let Some(oldest) = self.ended_audio.keys().min().copied() {
                    self.ended_audio.remove(&oldest);
                }
            }
            self.ended_audio.insert(call, audio.info);
        }
        let body = self
            .node
            .call_stats(self.clock.now(), call)
            .map(|s| self.call_body(&s));
        self.events.publish(
            "call_ended",
            serde_json::json!({
                "call": call.0,
                "outcome": reason.label(),
                "reason": reason.to_string(),
                "stats": body,
            }),
        );
    }

    /// The API view of a call.
    fn call_body(&self, stats: &CallStats) -> CallBody {
        let audio = self
            .audio
            .get(&stats.id)
            .map(|a| a.info.clone())
            .or_else(|| self.ended_audio.get(&stats.id).cloned());
        CallBody::new(stats, audio)
    }

    /// One tick of the audio clock: every connected call's due frames, pushed
    /// from its file and pulled into its recording.
    fn audio_tick(&mut self) {
        let mut frame = [0i16; FRAME_SAMPLES];
        let wall = Instant::now();
        let now = self.clock.now();
        for (&call, audio) in &mut self.audio {
            for _ in 0..audio.due(wall) {
                audio.next_capture(&mut frame);
                if let Err(e) = self.node.push_audio(now, call, &frame) {
                    debug!(%call, error = %e, "push_audio");
                }
                if let Err(e) = self.node.pull_audio(now, call, &mut frame) {
                    debug!(%call, error = %e, "pull_audio");
                    frame.fill(0);
                }
                audio.playout(&frame);
            }
        }
    }

    fn overlay_event(&mut self, event: OverlayEvent) {
        let now = self.clock.now();
        match event {
            OverlayEvent::LookupDone { id, result } => {
                debug!(id = id.0, found = result.is_ok(), "lookup done");
                if let Some(reply) = self.lookups.remove(&id) {
                    // The requester may have timed out; nothing to do then.
                    let _ = reply.send(Some(result));
                }
            }
            OverlayEvent::Presence {
                user,
                online,
                record,
            } => {
                if self.book.set_presence(now, user, online, record).is_some() {
                    info!(
                        user = %user.fingerprint(),
                        state = if online { "online" } else { "offline" },
                        "contact presence"
                    );
                    let view = self.view_of(&user, now);
                    self.events.publish("presence", &view);
                }
            }
            OverlayEvent::RoleChanged { supernode } => {
                info!(supernode, "role changed");
                self.events
                    .publish("role", serde_json::json!({ "supernode": supernode }));
            }
            OverlayEvent::HomesChanged { homes } => {
                let short: Vec<String> = homes.iter().map(short_key).collect();
                info!(homes = ?short, "home supernodes changed");
                let keys: Vec<String> = homes.iter().map(ToString::to_string).collect();
                self.events
                    .publish("homes", serde_json::json!({ "homes": keys }));
            }
            OverlayEvent::HandleRefused { handle } => {
                warn!(
                    handle = %handle,
                    "the directory refused our handle: another live user holds it"
                );
                self.events.publish(
                    "handle_refused",
                    serde_json::json!({ "handle": handle.as_str() }),
                );
            }
            OverlayEvent::Reflexive { addr } => {
                info!("reflexive address learned");
                debug!(%addr, "reflexive address");
                self.events
                    .publish("reflexive", serde_json::json!({ "addr": addr.to_string() }));
            }
        }
    }
}

/// A path kind's label, `none` without one.
fn path_label(kind: Option<PathKind>) -> &'static str {
    kind.map_or("none", PathKind::label)
}

/// Finishes a call's recording, logging the outcome.
fn finish_recording(call: CallId, audio: &mut CallAudio) {
    match audio.finish() {
        Some(Ok(path)) => info!(%call, path = %path.display(), "call recording written"),
        Some(Err(e)) => {
            warn!(%call, error = %e, "call recording failed");
            audio.info.record_error = Some(e);
        }
        None => {}
    }
}

/// Sends `command` to the engine task; false if it has stopped.
pub async fn send(commands: &mpsc::Sender<Command>, command: Command) -> bool {
    commands.send(command).await.is_ok()
}

/// Asks the engine task for a snapshot, waiting at most `timeout`.
pub async fn snapshot(commands: &mpsc::Sender<Command>, timeout: Duration) -> Option<Snapshot> {
    ask(commands, Command::Snapshot, timeout).await
}

/// Sends the command `make` builds around a reply channel and waits at most
/// `timeout` for the answer; `None` if the engine task has stopped or is stuck.
pub async fn ask<T>(
    commands: &mpsc::Sender<Command>,
    make: impl FnOnce(oneshot::Sender<T>) -> Command,
    timeout: Duration,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    if !send(commands, make(tx)).await {
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
