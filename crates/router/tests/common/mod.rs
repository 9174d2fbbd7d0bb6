//! A seeded two-caller network for router tests: each path is a pair of one-way
//! links with delay, uniform jitter, random or Gilbert-Elliott loss and outages;
//! both callers run a `Router`, send a 20 ms frame each tick, and answer probes and
//! reports as the engine will.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::time::Duration;

use peercall_router::{
    Delivery, Media, PathId, PathKind, Probe, ProbeAck, Report, Router, RouterConfig, RouterEvent,
    SwitchReason,
};
use peercall_wire::Time;
use rand::Rng;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// The seed for a test: `PEERCALL_SIM_SEED` when set (to replay a failure), else
/// `default`. Printed, so every run can be replayed.
pub fn seed(default: u64) -> u64 {
    let s = std::env::var("PEERCALL_SIM_SEED")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default);
    eprintln!("router sim seed = {s}");
    s
}

pub const FRAME: Duration = Duration::from_millis(20);
pub const START: Time = Time::from_secs(1_700_000_000);

/// One direction of a path.
#[derive(Debug, Clone)]
pub struct Link {
    pub delay: Duration,
    /// Extra delay drawn uniformly from [0, jitter].
    pub jitter: Duration,
    /// Random loss probability.
    pub loss: f64,
    /// Gilbert-Elliott: (P(good→bad), P(bad→good)); every packet in bad is lost.
    pub burst: Option<(f64, f64)>,
    bad: bool,
    /// Packets sent or arriving inside these intervals are lost.
    pub outages: Vec<(Time, Time)>,
    /// Ground truth for media frames on this link: sent, lost, loss runs.
    pub media_sent: u64,
    pub media_lost: u64,
    pub media_runs: u64,
    media_in_run: bool,
}

impl Link {
    pub fn new(delay_ms: u64) -> Link {
        Link {
            delay: Duration::from_millis(delay_ms),
            jitter: Duration::ZERO,
            loss: 0.0,
            burst: None,
            bad: false,
            outages: Vec::new(),
            media_sent: 0,
            media_lost: 0,
            media_runs: 0,
            media_in_run: false,
        }
    }

    pub fn loss(mut self, loss: f64) -> Link {
        self.loss = loss;
        self
    }

    pub fn jitter_ms(mut self, ms: u64) -> Link {
        self.jitter = Duration::from_millis(ms);
        self
    }

    fn down(&self, t: Time) -> bool {
        self.outages.iter().any(|&(a, b)| t >= a && t < b)
    }

    /// The arrival time, or None when lost.
    fn fate(&mut self, now: Time, rng: &mut ChaCha20Rng, media: bool) -> Option<Time> {
        let mut lost = rng.r#gen::<f64>() < self.loss;
        if let Some((gb, bg)) = self.burst {
            let flip: f64 = rng.r#gen();
            self.bad = if self.bad { flip >= bg } else { flip < gb };
            lost |= self.bad;
        }
        let extra = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_micros(rng.gen_range(0..=self.jitter.as_micros() as u64))
        };
        let at = now + self.delay + extra;
        let lost = lost || self.down(now) || self.down(at);
        if media {
            self.media_sent += 1;
            if lost {
                self.media_lost += 1;
                if !self.media_in_run {
                    self.media_runs += 1;
                }
            }
            self.media_in_run = lost;
        }
        (!lost).then_some(at)
    }

    /// The true mean length of the media loss runs so far.
    pub fn media_mean_run(&self) -> f64 {
        self.media_lost as f64 / self.media_runs.max(1) as f64
    }

    /// The true media loss rate so far.
    pub fn media_loss_rate(&self) -> f64 {
        self.media_lost as f64 / self.media_sent.max(1) as f64
    }
}

#[derive(Debug, Clone, Copy)]
enum Packet {
    Media {
        path: PathId,
        path_seq: u32,
        seq: u32,
        timestamp: u32,
    },
    Probe(Probe),
    Ack(ProbeAck),
    Report(Report),
}

/// Per-side bookkeeping.
#[derive(Debug, Default)]
pub struct Side {
    pub talking: bool,
    next_seq: u32,
    /// Stream sequence numbers sent (once each, however many copies).
    pub sent: u64,
    /// Fresh frames this side delivered from the peer.
    pub delivered: BTreeSet<u32>,
    pub delivered_twice: u64,
    pub duplicates_dropped: u64,
    pub switches: Vec<(Time, Option<PathId>, PathId, SwitchReason)>,
    /// Times a frame was sent on two paths.
    pub redundant_frames: u64,
    /// Frames sent again at the router's request ([`Router::poll_resend`]).
    pub resent_frames: u64,
    /// (stream seq, send time) of the last frames sent, for re-sends: as many as
    /// the engine keeps.
    history: std::collections::VecDeque<(u32, Time)>,
}

/// Frames a side keeps for re-sends, like the engine.
const KEEP: usize = 8;

pub struct Sim {
    pub rng: ChaCha20Rng,
    pub now: Time,
    pub routers: [Router; 2],
    pub sides: [Side; 2],
    /// links[path][0] carries side 0 → side 1, links[path][1] the reverse.
    pub links: Vec<(PathId, [Link; 2])>,
    queue: BinaryHeap<Reverse<(Time, u64, usize, PacketBox)>>,
    order: u64,
    next_frame: Time,
    /// Times the loop found a timeout at or before now after handling it.
    pub stuck: u64,
}

/// Wrapper so packets can sit in the heap (ordered by time and order only).
#[derive(Debug, Clone, Copy)]
struct PacketBox(Packet);
impl PartialEq for PacketBox {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for PacketBox {}
impl PartialOrd for PacketBox {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for PacketBox {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl Sim {
    /// Two callers with the given paths (same ids and kinds on both sides).
    pub fn new(seed: u64, config: RouterConfig, paths: Vec<(PathId, PathKind, Link, Link)>) -> Sim {
        let mut routers = [Router::new(START, config), Router::new(START, config)];
        let mut links = Vec::new();
        for (id, kind, ab, ba) in paths {
            for r in &mut routers {
                r.add_path(START, id, kind).expect("fresh path");
            }
            links.push((id, [ab, ba]));
        }
        Sim {
            rng: ChaCha20Rng::seed_from_u64(seed),
            now: START,
            routers,
            sides: [
                Side {
                    talking: true,
                    ..Side::default()
                },
                Side {
                    talking: true,
                    ..Side::default()
                },
            ],
            links,
            queue: BinaryHeap::new(),
            order: 0,
            next_frame: START,
            stuck: 0,
        }
    }

    pub fn link(&mut self, path: PathId, from: usize) -> &mut Link {
        &mut self
            .links
            .iter_mut()
            .find(|(id, _)| *id == path)
            .expect("known path")
            .1[from]
    }

    /// Cuts a path in both directions from `at` for `len`.
    pub fn cut(&mut self, path: PathId, at: Time, len: Duration) {
        for dir in 0..2 {
            self.link(path, dir).outages.push((at, at + len));
        }
    }

    fn send(&mut self, from: usize, path: PathId, p: Packet) {
        let now = self.now;
        let (_, links) = self
            .links
            .iter_mut()
            .find(|(id, _)| *id == path)
            .expect("packet on a known path");
        let media = matches!(p, Packet::Media { .. });
        if let Some(at) = links[from].fate(now, &mut self.rng, media) {
            self.order += 1;
            self.queue
                .push(Reverse((at, self.order, 1 - from, PacketBox(p))));
        }
    }

    fn send_frames(&mut self) {
        for s in 0..2 {
            if !self.sides[s].talking {
                continue;
            }
            let now = self.now;
            let plan = self.routers[s].send_plan(now);
            if plan.primary.is_none() {
                continue;
            }
            self.resend(s);
            let seq = self.sides[s].next_seq;
            self.sides[s].next_seq += 1;
            self.sides[s].sent += 1;
            let h = &mut self.sides[s].history;
            if h.len() == KEEP {
                h.pop_front();
            }
            h.push_back((seq, now));
            if plan.redundant.is_some() {
                self.sides[s].redundant_frames += 1;
            }
            for path in plan.paths() {
                let path_seq = self.routers[s]
                    .on_media_sent(now, path)
                    .expect("plan names a known path");
                self.send(
                    s,
                    path,
                    Packet::Media {
                        path,
                        path_seq,
                        seq,
                        timestamp: seq.wrapping_mul(960),
                    },
                );
            }
        }
    }

    /// Sends the router's pending re-send, if any.
    fn resend(&mut self, s: usize) {
        let now = self.now;
        let Some((path, since)) = self.routers[s].poll_resend() else {
            return;
        };
        let frames: Vec<u32> = self.sides[s]
            .history
            .iter()
            .filter(|(_, t)| *t >= since)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in frames {
            let path_seq = self.routers[s]
                .on_media_sent(now, path)
                .expect("re-send on a known path");
            self.sides[s].resent_frames += 1;
            self.send(
                s,
                path,
                Packet::Media {
                    path,
                    path_seq,
                    seq,
                    timestamp: seq.wrapping_mul(960),
                },
            );
        }
    }

    fn deliver(&mut self, to: usize, p: Packet) {
        let now = self.now;
        match p {
            Packet::Media {
                path,
                path_seq,
                seq,
                timestamp,
            } => {
                let m = Media {
                    path,
                    path_seq,
                    seq,
                    timestamp,
                    flags: 0,
                    payload: &[0xF8],
                };
                match self.routers[to]
                    .on_media_received(now, &m)
                    .expect("known path")
                {
                    Delivery::Fresh => {
                        if !self.sides[to].delivered.insert(seq) {
                            self.sides[to].delivered_twice += 1;
                        }
                    }
                    Delivery::Duplicate => self.sides[to].duplicates_dropped += 1,
                }
            }
            Packet::Probe(probe) => {
                let ack = self.routers[to].on_probe(now, &probe).expect("known path");
                self.send(to, probe.path, Packet::Ack(ack));
            }
            Packet::Ack(ack) => {
                // Late or duplicate acks are refused; that is fine here.
                let _ = self.routers[to].on_probe_ack(now, &ack);
            }
            Packet::Report(r) => {
                let _ = self.routers[to].on_report(now, &r);
            }
        }
    }

    fn drain(&mut self) {
        let now = self.now;
        for s in 0..2 {
            self.resend(s);
            while let Some(p) = self.routers[s].poll_probe(now) {
                self.send(s, p.path, Packet::Probe(p));
            }
            while let Some(r) = self.routers[s].poll_report(now) {
                self.send(s, r.path, Packet::Report(r));
            }
            while let Some(e) = self.routers[s].poll_event() {
                if let RouterEvent::Switched { from, to, reason } = e {
                    self.sides[s].switches.push((now, from, to, reason));
                }
            }
        }
    }

    /// Runs until `end`.
    pub fn run_until(&mut self, end: Time) {
        let mut same_time = 0u32;
        loop {
            let mut t = self.next_frame;
            if let Some(Reverse((at, ..))) = self.queue.peek() {
                t = t.min(*at);
            }
            for r in &self.routers {
                if let Some(at) = r.poll_timeout() {
                    t = t.min(at);
                }
            }
            if t <= self.now {
                same_time += 1;
                if same_time > 50 {
                    // A timeout that handling did not move: a router bug.
                    self.stuck += 1;
                    t = self.now + Duration::from_micros(1);
                    same_time = 0;
                }
            } else {
                same_time = 0;
            }
            let t = t.max(self.now);
            if t > end {
                self.now = end;
                return;
            }
            self.now = t;
            while let Some(Reverse((at, _, to, PacketBox(p)))) = self.queue.peek().copied() {
                if at > self.now {
                    break;
                }
                self.queue.pop();
                self.deliver(to, p);
                self.drain();
            }
            for s in 0..2 {
                if self.routers[s]
                    .poll_timeout()
                    .is_some_and(|at| at <= self.now)
                {
                    self.routers[s].handle_timeout(self.now);
                }
            }
            if self.next_frame <= self.now {
                self.send_frames();
                self.next_frame = self.next_frame + FRAME;
            }
            self.drain();
        }
    }

    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.run_until(end);
    }

    /// Frames side `from` sent that side `1 - from` never delivered, among those
    /// sent before `until` (later ones may still be in flight).
    pub fn frames_lost(&self, from: usize, first_seq: u32, until_seq: u32) -> u64 {
        (first_seq..until_seq)
            .filter(|s| !self.sides[1 - from].delivered.contains(s))
            .count() as u64
    }

    /// The next stream sequence number side `s` will send.
    pub fn next_seq(&self, s: usize) -> u32 {
        self.sides[s].next_seq
    }
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
