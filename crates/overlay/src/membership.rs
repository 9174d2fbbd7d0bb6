//! SWIM membership among supernodes (Das, Gupta, Motivala 2002), sans-IO, with the
//! usual refinements: round-robin probe order, indirect probes through `k` helpers,
//! suspicion with incarnation-number refutation, and gossip piggybacked on probe
//! traffic, each update sent `λ·log₂(n+1)` times.
//!
//! Each member's entry also carries its load (clients, capacity, election score,
//! pinned), re-announced under a new incarnation when it changes enough (as
//! memberlist does for node metadata), so every supernode knows the whole tier and
//! its load without extra traffic.
//!
//! The owner feeds it messages and ticks and drains [`Membership::out`] (messages to
//! send) and [`Membership::changes`] (members that came or went).

use std::net::SocketAddr;
use std::time::Duration;

use peercall_crypto::PeerKey;
use peercall_wire::Time;
use rand_chacha::ChaCha20Rng;

use crate::msg::{Load, MAX_GOSSIP, MAX_MEMBERS, MemberState, Msg, Update};
use crate::util::{Map, below, map, mix64, prefix64};

/// One probe per member per period: SWIM's protocol period. One second keeps
/// failure detection to a few seconds at a few dozen bytes per second.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Wait this long for a direct ack before asking helpers: two WAN round trips
/// (80 ms one way) plus a Noise handshake when no session is up.
pub const ACK_TIMEOUT: Duration = Duration::from_millis(700);
/// A probe with no direct or indirect ack by then makes the member suspect.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(2_500);
/// Helpers asked to probe a member that did not ack (SWIM's `k`).
pub const INDIRECT_PROBES: usize = 3;
/// Suspicion lasts `SUSPICION_MULT · log10(n+1)` probe periods (memberlist's rule)…
pub const SUSPICION_MULT: u32 = 4;
/// …but never less than this, so a lost packet or two never kills a member.
pub const MIN_SUSPICION: Duration = Duration::from_secs(4);
/// Each update is piggybacked `GOSSIP_MULT · ⌈log₂(n+1)⌉` times: enough for
/// epidemic spread to reach everyone with high probability.
pub const GOSSIP_MULT: u32 = 3;
/// Dead members are remembered this long, so old gossip cannot resurrect them and a
/// falsely declared member hears of it and refutes.
pub const DEAD_RETAIN: Duration = Duration::from_secs(300);
/// A member re-announces its load when clients moved by this fraction of capacity…
pub const LOAD_STEP_DIVISOR: u32 = 10;
/// …at most this often.
pub const LOAD_ANNOUNCE_MIN: Duration = Duration::from_secs(5);
/// Each member exchanges its whole membership list with one random live member
/// this often (push-pull anti-entropy, as memberlist does). Gossip alone is
/// bounded by [`MAX_GOSSIP`] updates per probe message and sends the freshest
/// first, so when a tier forms or grows by many members at once (and loads are
/// re-announced meanwhile) older news can starve for minutes; the exchange makes
/// every member's view converge within a few intervals whatever the backlog, at
/// about 60 bytes per member each way.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(15);
/// The next exchange comes this soon instead when the last one found the view
/// still growing by at least [`SYNC_GROWTH_DIVISOR`]-th (a tier forming, or
/// after a wave of promotions): each exchange about doubles what a sparse view
/// holds, so a thousand members converge in seconds rather than minutes.
pub const SYNC_FAST: Duration = Duration::from_secs(3);
/// See [`SYNC_FAST`]: growth by a 50th of the view or more.
pub const SYNC_GROWTH_DIVISOR: usize = 50;
/// Sync requests a member answers per [`SYNC_INTERVAL`] at most (each answer is
/// the whole list): a member is picked by about one other per interval on
/// average, so this leaves room for
/// chance while bounding what a misbehaving peer can make it send.
pub const MAX_SYNC_ANSWERS: u32 = 4;

/// A supernode as this member sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Its Noise static key.
    pub key: PeerKey,
    /// Its address.
    pub addr: SocketAddr,
    /// Its incarnation.
    pub incarnation: u32,
    /// Its state.
    pub state: MemberState,
    /// Its load.
    pub load: Load,
    /// When it entered its current state.
    pub since: Time,
    /// Its placement hash, precomputed.
    pub hrw: u64,
}

impl Member {
    /// Alive or suspect: still a member for placement and routing.
    pub fn is_live(&self) -> bool {
        self.state != MemberState::Dead
    }

    fn update(&self) -> Update {
        Update {
            key: self.key.0,
            addr: self.addr,
            incarnation: self.incarnation,
            state: self.state,
            load: self.load,
        }
    }
}

/// A member came or went, for the owner to re-place records and re-route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A member became live (new, or refuted its death).
    Up(PeerKey),
    /// A member was declared dead or left.
    Down(PeerKey),
    /// A live member became suspect (still live for placement; records it
    /// holds may be copied elsewhere before it is declared dead).
    Suspect(PeerKey),
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    target: PeerKey,
    sent: Time,
    indirect: bool,
    /// Set when this probe runs on behalf of another member's `PingReq`.
    for_requester: Option<(PeerKey, u32)>,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MembershipStats {
    /// Probes sent.
    pub probes: u64,
    /// Indirect probe requests sent.
    pub indirect_probes: u64,
    /// Members declared suspect by this member.
    pub suspicions: u64,
    /// Suspicions of this member it refuted.
    pub refutations: u64,
    /// Members declared dead by this member.
    pub deaths: u64,
    /// Membership exchanges this member started.
    pub syncs: u64,
    /// Membership exchanges asked of this member and answered.
    pub syncs_answered: u64,
}

/// SWIM state of one supernode. See the module documentation.
#[derive(Debug)]
pub struct Membership {
    me: PeerKey,
    my_addr: Option<SocketAddr>,
    incarnation: u32,
    load: Load,
    announced_load: Load,
    announced_at: Time,
    leaving: bool,
    members: Vec<Member>,
    index: Map<PeerKey, u32>,
    live: usize,
    /// Members currently suspect: the tick checks only these, not everyone.
    suspects: Vec<PeerKey>,
    /// The earliest time a tombstone may be purged.
    purge_at: Option<Time>,
    order: Vec<u32>,
    order_pos: usize,
    seq: u32,
    probes: Map<u32, Probe>,
    /// Keys with gossip to send and how many more times.
    gossip: Vec<(PeerKey, u32)>,
    /// When this member last exchanged its list (set at the first tick to a
    /// random offset, so members do not sync in step).
    last_sync: Option<Time>,
    /// Members known (in any state) at the last exchange.
    known_at_sync: usize,
    /// The start of the current window of sync answers, and answers in it.
    sync_window: (Time, u32),
    /// Messages to send: `(to, addr, msg)`.
    pub out: Vec<(PeerKey, SocketAddr, Msg)>,
    /// Members that came or went since the owner last drained this.
    pub changes: Vec<Change>,
    /// Counters.
    pub stats: MembershipStats,
}

impl Membership {
    /// The membership of `me`, alone, at incarnation `incarnation`.
    pub fn new(me: PeerKey, incarnation: u32, load: Load, rng: &mut ChaCha20Rng) -> Membership {
        Membership {
            me,
            my_addr: None,
            incarnation,
            load,
            announced_load: load,
            announced_at: Time::ZERO,
            leaving: false,
            members: Vec::new(),
            index: map(rng),
            live: 0,
            suspects: Vec::new(),
            purge_at: None,
            order: Vec::new(),
            order_pos: 0,
            seq: 0,
            probes: map(rng),
            gossip: Vec::new(),
            last_sync: None,
            known_at_sync: 0,
            sync_window: (Time::ZERO, 0),
            out: Vec::new(),
            changes: Vec::new(),
            stats: MembershipStats::default(),
        }
    }

    /// This member's incarnation.
    pub fn incarnation(&self) -> u32 {
        self.incarnation
    }

    /// Sets the address others reach this member at (learned from `Welcome` or STUN).
    pub fn set_my_addr(&mut self, addr: SocketAddr) {
        if self.my_addr != Some(addr) {
            self.my_addr = Some(addr);
            self.announce_self();
        }
    }

    /// This member's address, if known.
    pub fn my_addr(&self) -> Option<SocketAddr> {
        self.my_addr
    }

    /// Live members other than this one.
    pub fn live(&self) -> impl Iterator<Item = &Member> + '_ {
        self.members.iter().filter(|m| m.is_live())
    }

    /// The number of live members, this one included.
    pub fn size(&self) -> usize {
        self.live + 1
    }

    /// A member by key.
    pub fn get(&self, key: &PeerKey) -> Option<&Member> {
        self.index.get(key).map(|&i| &self.members[i as usize])
    }

    /// Members alive that became so at `since` or later (joined, or refuted a
    /// suspicion), as this member heard.
    pub fn alive_since(&self, since: Time) -> Vec<PeerKey> {
        self.members
            .iter()
            .filter(|m| m.state == MemberState::Alive && m.since >= since)
            .map(|m| m.key)
            .collect()
    }

    /// Members suspected now.
    pub fn suspects(&self) -> Vec<PeerKey> {
        self.suspects
            .iter()
            .filter(|k| self.get(k).is_some_and(|m| m.state == MemberState::Suspect))
            .copied()
            .collect()
    }

    /// Whether `key` is a live member (or this member).
    pub fn is_live(&self, key: &PeerKey) -> bool {
        *key == self.me || self.get(key).is_some_and(|m| m.is_live())
    }

    /// This member's load as last set.
    pub fn load(&self) -> Load {
        self.load
    }

    /// Updates this member's load; re-announced when it moved enough.
    pub fn set_load(&mut self, now: Time, load: Load) {
        self.load = load;
        let step = (load.capacity / LOAD_STEP_DIVISOR).max(1);
        let a = self.announced_load;
        let moved = a.clients.abs_diff(load.clients) >= step
            || a.capacity != load.capacity
            || a.score != load.score
            || a.pinned != load.pinned;
        if moved && now.saturating_since(self.announced_at) >= LOAD_ANNOUNCE_MIN {
            self.announced_at = now;
            self.announced_load = load;
            self.incarnation += 1;
            self.announce_self();
        }
    }

    fn announce_self(&mut self) {
        let me = self.me;
        self.queue_gossip(me);
    }

    fn self_update(&self) -> Option<Update> {
        Some(Update {
            key: self.me.0,
            addr: self.my_addr?,
            incarnation: self.incarnation,
            state: if self.leaving {
                MemberState::Dead
            } else {
                MemberState::Alive
            },
            load: self.announced_load,
        })
    }

    fn transmits(&self) -> u32 {
        let n = self.size() as u32 + 1;
        GOSSIP_MULT * (32 - n.leading_zeros())
    }

    fn queue_gossip(&mut self, key: PeerKey) {
        let times = self.transmits();
        if let Some(g) = self.gossip.iter_mut().find(|g| g.0 == key) {
            g.1 = times;
        } else {
            self.gossip.push((key, times));
        }
    }

    /// Up to [`MAX_GOSSIP`] updates to piggyback, freshest first; `about` (the
    /// receiver) is told its own entry first when it is suspect or dead here, so it
    /// can refute.
    fn take_gossip(&mut self, about: Option<PeerKey>) -> Vec<Update> {
        let mut out = Vec::new();
        if let Some(k) = about
            && let Some(m) = self.get(&k)
            && m.state != MemberState::Alive
        {
            out.push(m.update());
        }
        self.gossip
            .sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut i = 0;
        while i < self.gossip.len() && out.len() < MAX_GOSSIP {
            let key = self.gossip[i].0;
            let update = if key == self.me {
                self.self_update()
            } else {
                self.get(&key).map(Member::update)
            };
            if let Some(u) = update
                && !out.iter().any(|o: &Update| o.key == u.key)
            {
                out.push(u);
            }
            self.gossip[i].1 = self.gossip[i].1.saturating_sub(1);
            i += 1;
        }
        self.gossip.retain(|g| g.1 > 0);
        out
    }

    fn send(&mut self, to: PeerKey, addr: SocketAddr, msg: Msg) {
        self.out.push((to, addr, msg));
    }

    /// Adds or updates a member as `Alive` at `incarnation` (a join, or the
    /// coordinator admitting a promoted node). Returns the incarnation the member
    /// must use: above any this member remembers for it.
    pub fn admit(
        &mut self,
        now: Time,
        key: PeerKey,
        addr: SocketAddr,
        incarnation: u32,
        load: Load,
    ) -> u32 {
        if key == self.me {
            return self.incarnation;
        }
        let inc = match self.get(&key) {
            Some(m) if m.incarnation >= incarnation => m.incarnation + 1,
            _ => incarnation,
        };
        self.apply(
            now,
            Update {
                key: key.0,
                addr,
                incarnation: inc,
                state: MemberState::Alive,
                load,
            },
        );
        inc
    }

    /// Handles a join request from `from` at `addr`; answers with `Welcome` and the
    /// member list. The caller decides whether `from` may join.
    pub fn handle_join(
        &mut self,
        now: Time,
        from: PeerKey,
        addr: SocketAddr,
        incarnation: u32,
        load: Load,
    ) {
        let inc = self.admit(now, from, addr, incarnation, load);
        self.send(
            from,
            addr,
            Msg::Welcome {
                observed: addr,
                incarnation: inc,
            },
        );
        self.send_members(from, addr);
    }

    /// Sends the whole live member list (this member included) to `to`, in pages.
    pub fn send_members(&mut self, to: PeerKey, addr: SocketAddr) {
        let mut all: Vec<Update> = self
            .members
            .iter()
            .filter(|m| m.is_live() && m.key != to)
            .map(Member::update)
            .collect();
        if let Some(me) = self.self_update() {
            all.push(me);
        }
        for page in all.chunks(MAX_MEMBERS) {
            self.send(
                to,
                addr,
                Msg::Members {
                    members: page.to_vec(),
                },
            );
        }
    }

    /// Handles `Welcome`: adopt the incarnation the tier asks for.
    pub fn handle_welcome(&mut self, observed: SocketAddr, incarnation: u32) {
        if incarnation > self.incarnation {
            self.incarnation = incarnation;
        }
        if self.my_addr.is_none() {
            self.my_addr = Some(observed);
        }
        self.announce_self();
    }

    /// Applies gossip or a member page.
    pub fn apply_all(&mut self, now: Time, updates: &[Update]) {
        for u in updates {
            self.apply(now, *u);
        }
    }

    /// Applies a page of the membership list (a join's answer or a sync): by the
    /// same rules as gossip, but what it teaches is not gossiped on. The pages
    /// carry old news as well as new, and gossip sends [`MAX_GOSSIP`] updates per
    /// message: re-gossiping a thousand entries would queue fresh news (deaths,
    /// promotions) behind them; every member syncs itself instead.
    pub fn apply_page(&mut self, now: Time, updates: &[Update]) {
        for u in updates {
            self.apply_update(now, *u, false);
        }
    }

    /// Applies one update by SWIM's precedence rules (and gossips what is new).
    pub fn apply(&mut self, now: Time, u: Update) {
        self.apply_update(now, u, true);
    }

    fn apply_update(&mut self, now: Time, u: Update, spread: bool) {
        let key = PeerKey(u.key);
        if key == self.me {
            if u.state != MemberState::Alive && u.incarnation >= self.incarnation && !self.leaving {
                // Refute: a newer incarnation of ourselves, alive.
                self.incarnation = u.incarnation + 1;
                self.stats.refutations += 1;
                self.announce_self();
            }
            return;
        }
        let Some(&i) = self.index.get(&key) else {
            if u.state == MemberState::Dead {
                return;
            }
            let i = self.members.len() as u32;
            self.members.push(Member {
                key,
                addr: u.addr,
                incarnation: u.incarnation,
                state: u.state,
                load: u.load,
                since: now,
                hrw: mix64(prefix64(&u.key)),
            });
            self.index.insert(key, i);
            self.order.push(i);
            self.live += 1;
            if u.state == MemberState::Suspect {
                self.suspects.push(key);
            }
            self.changes.push(Change::Up(key));
            if spread {
                self.queue_gossip(key);
            }
            return;
        };
        let m = &mut self.members[i as usize];
        let accept = match (m.state, u.state) {
            (_, MemberState::Alive) => u.incarnation > m.incarnation,
            (MemberState::Alive, MemberState::Suspect) => u.incarnation >= m.incarnation,
            (_, MemberState::Suspect) => u.incarnation > m.incarnation,
            (MemberState::Dead, MemberState::Dead) => false,
            (_, MemberState::Dead) => u.incarnation >= m.incarnation,
        };
        if !accept {
            return;
        }
        let was_live = m.is_live();
        if m.state != u.state {
            m.since = now;
            match u.state {
                MemberState::Suspect => {
                    self.suspects.push(key);
                    self.changes.push(Change::Suspect(key));
                }
                MemberState::Dead => {
                    let at = now + DEAD_RETAIN;
                    self.purge_at = Some(self.purge_at.map_or(at, |p| p.min(at)));
                }
                MemberState::Alive => {}
            }
        }
        m.incarnation = u.incarnation;
        m.state = u.state;
        m.addr = u.addr;
        m.load = u.load;
        let is_live = m.is_live();
        match (was_live, is_live) {
            (true, false) => {
                self.live -= 1;
                self.changes.push(Change::Down(key));
            }
            (false, true) => {
                self.live += 1;
                self.changes.push(Change::Up(key));
            }
            _ => {}
        }
        if spread {
            self.queue_gossip(key);
        }
    }

    fn suspicion_timeout(&self) -> Duration {
        let n = self.size() as f64 + 1.0;
        let periods = f64::from(SUSPICION_MULT) * n.log10();
        PROBE_INTERVAL.mul_f64(periods).max(MIN_SUSPICION)
    }

    /// Runs one protocol period: the next probe, timeouts of earlier ones, suspicion
    /// expiry and tombstone cleanup. Call every [`PROBE_INTERVAL`].
    pub fn tick(&mut self, now: Time, rng: &mut ChaCha20Rng) {
        // Probe timeouts.
        let mut expired = Vec::new();
        let mut indirect = Vec::new();
        for (&seq, p) in self.probes.iter() {
            let age = now.saturating_since(p.sent);
            if age >= PROBE_TIMEOUT {
                expired.push(seq);
            } else if age >= ACK_TIMEOUT && !p.indirect && p.for_requester.is_none() {
                indirect.push(seq);
            }
        }
        expired.sort_unstable();
        indirect.sort_unstable();
        for seq in expired {
            if let Some(p) = self.probes.remove(&seq)
                && p.for_requester.is_none()
            {
                self.suspect(now, p.target);
            }
        }
        for seq in indirect {
            self.ask_helpers(seq, rng);
        }
        // Suspicion expiry (only suspects are looked at) and tombstones.
        let timeout = self.suspicion_timeout();
        let mut dead = Vec::new();
        let suspects = std::mem::take(&mut self.suspects);
        for key in suspects {
            match self.get(&key) {
                Some(m) if m.state == MemberState::Suspect => {
                    if now.saturating_since(m.since) >= timeout {
                        dead.push(key);
                    } else if !self.suspects.contains(&key) {
                        self.suspects.push(key);
                    }
                }
                _ => {}
            }
        }
        for key in dead {
            let Some(m) = self.get(&key).copied() else {
                continue;
            };
            self.stats.deaths += 1;
            self.apply(
                now,
                Update {
                    state: MemberState::Dead,
                    ..m.update()
                },
            );
        }
        if self.purge_at.is_some_and(|t| t <= now) {
            self.purge(now);
        }
        if !self.leaving {
            self.probe_next(now, rng);
            self.sync_tick(now, rng);
        }
    }

    /// Starts a push-pull exchange with a random live member when one is due:
    /// sends it this member's list, then [`Msg::Sync`] for its list.
    fn sync_tick(&mut self, now: Time, rng: &mut ChaCha20Rng) {
        let first_ms = SYNC_FAST.as_millis() as usize;
        let last = *self.last_sync.get_or_insert_with(|| {
            now + Duration::from_millis(below(rng, first_ms) as u64) - SYNC_INTERVAL
        });
        let known = self.members.len();
        let growing = known >= self.known_at_sync + (known / SYNC_GROWTH_DIVISOR).max(1);
        let wait = if growing { SYNC_FAST } else { SYNC_INTERVAL };
        if now < last + wait {
            return;
        }
        self.known_at_sync = known;
        self.last_sync = Some(now);
        let Some(peer) = self.random_live(1, rng).pop() else {
            return;
        };
        self.stats.syncs += 1;
        self.send_members(peer.key, peer.addr);
        self.send(peer.key, peer.addr, Msg::Sync);
    }

    /// Handles [`Msg::Sync`] from `from` at `addr` (an authenticated peer, not
    /// necessarily in this view yet): answers with this member's whole list, at
    /// most [`MAX_SYNC_ANSWERS`] times per [`SYNC_INTERVAL`]. Returns whether it
    /// answered.
    pub fn handle_sync(&mut self, now: Time, from: PeerKey, addr: SocketAddr) -> bool {
        if from == self.me || self.leaving {
            return false;
        }
        if now.saturating_since(self.sync_window.0) >= SYNC_INTERVAL {
            self.sync_window = (now, 0);
        }
        if self.sync_window.1 >= MAX_SYNC_ANSWERS {
            return false;
        }
        self.sync_window.1 += 1;
        self.stats.syncs_answered += 1;
        self.send_members(from, addr);
        true
    }

    fn purge(&mut self, now: Time) {
        self.members.retain(|m| {
            !(m.state == MemberState::Dead && now.saturating_since(m.since) >= DEAD_RETAIN)
        });
        self.index.clear();
        for (i, m) in self.members.iter().enumerate() {
            self.index.insert(m.key, i as u32);
        }
        self.order = (0..self.members.len() as u32).collect();
        self.order_pos = self.order.len();
        self.purge_at = self
            .members
            .iter()
            .filter(|m| m.state == MemberState::Dead)
            .map(|m| m.since + DEAD_RETAIN)
            .min();
    }

    /// Up to `n` distinct live members drawn at random (fewer if there are not
    /// enough); `O(n)` draws, not a scan of the membership.
    pub fn random_live(&self, n: usize, rng: &mut ChaCha20Rng) -> Vec<Member> {
        let mut out: Vec<Member> = Vec::new();
        if self.members.is_empty() {
            return out;
        }
        for _ in 0..n * 4 {
            if out.len() >= n.min(self.live) {
                break;
            }
            let m = self.members[below(rng, self.members.len())];
            if m.is_live() && !out.iter().any(|o| o.key == m.key) {
                out.push(m);
            }
        }
        out
    }

    fn probe_next(&mut self, now: Time, rng: &mut ChaCha20Rng) {
        if self.live == 0 {
            return;
        }
        for _ in 0..=self.members.len() {
            if self.order_pos >= self.order.len() {
                // A fresh random order each round (SWIM's round-robin variant):
                // every member is probed within two rounds.
                for i in (1..self.order.len()).rev() {
                    let j = below(rng, i + 1);
                    self.order.swap(i, j);
                }
                self.order_pos = 0;
            }
            let i = self.order[self.order_pos] as usize;
            self.order_pos += 1;
            let Some(m) = self.members.get(i).copied() else {
                continue;
            };
            if !m.is_live() {
                continue;
            }
            self.seq = self.seq.wrapping_add(1);
            let seq = self.seq;
            self.probes.insert(
                seq,
                Probe {
                    target: m.key,
                    sent: now,
                    indirect: false,
                    for_requester: None,
                },
            );
            self.stats.probes += 1;
            let gossip = self.take_gossip(Some(m.key));
            self.send(m.key, m.addr, Msg::Ping { seq, gossip });
            return;
        }
    }

    fn ask_helpers(&mut self, seq: u32, rng: &mut ChaCha20Rng) {
        let Some(p) = self.probes.get_mut(&seq) else {
            return;
        };
        p.indirect = true;
        let target = p.target;
        let Some(addr) = self.get(&target).map(|m| m.addr) else {
            return;
        };
        let candidates: Vec<(PeerKey, SocketAddr)> = self
            .members
            .iter()
            .filter(|m| m.state == MemberState::Alive && m.key != target)
            .map(|m| (m.key, m.addr))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let mut picked: Vec<usize> = Vec::new();
        for _ in 0..INDIRECT_PROBES.min(candidates.len()) * 2 {
            let j = below(rng, candidates.len());
            if !picked.contains(&j) {
                picked.push(j);
            }
            if picked.len() == INDIRECT_PROBES {
                break;
            }
        }
        for j in picked {
            let (k, a) = candidates[j];
            self.stats.indirect_probes += 1;
            self.send(
                k,
                a,
                Msg::PingReq {
                    seq,
                    target: target.0,
                    addr,
                },
            );
        }
    }

    fn suspect(&mut self, now: Time, key: PeerKey) {
        let Some(m) = self.get(&key).copied() else {
            return;
        };
        if m.state == MemberState::Alive {
            self.stats.suspicions += 1;
            self.apply(
                now,
                Update {
                    state: MemberState::Suspect,
                    ..m.update()
                },
            );
        }
    }

    /// Handles `Ping` from `from` at `addr`: answers with an ack.
    pub fn handle_ping(
        &mut self,
        now: Time,
        from: PeerKey,
        addr: SocketAddr,
        seq: u32,
        gossip: &[Update],
    ) {
        self.apply_all(now, gossip);
        let gossip = self.take_gossip(Some(from));
        self.send(from, addr, Msg::Ack { seq, gossip });
    }

    /// Handles `Ack`.
    pub fn handle_ack(&mut self, now: Time, from: PeerKey, seq: u32, gossip: &[Update]) {
        self.apply_all(now, gossip);
        let Some(p) = self.probes.get(&seq).copied() else {
            return;
        };
        if p.target != from {
            return;
        }
        self.probes.remove(&seq);
        if let Some((requester, their_seq)) = p.for_requester
            && let Some(addr) = self.get(&requester).map(|m| m.addr)
        {
            self.send(requester, addr, Msg::IndirectAck { seq: their_seq });
        }
    }

    /// Handles `PingReq`: probe the target for the requester.
    pub fn handle_ping_req(
        &mut self,
        now: Time,
        from: PeerKey,
        seq: u32,
        target: PeerKey,
        addr: SocketAddr,
    ) {
        if target == self.me || !self.is_live(&from) {
            return;
        }
        self.seq = self.seq.wrapping_add(1);
        let mine = self.seq;
        self.probes.insert(
            mine,
            Probe {
                target,
                sent: now,
                indirect: true,
                for_requester: Some((from, seq)),
            },
        );
        let gossip = self.take_gossip(Some(target));
        self.send(target, addr, Msg::Ping { seq: mine, gossip });
    }

    /// Handles `IndirectAck`: a helper reached the target.
    pub fn handle_indirect_ack(&mut self, seq: u32) {
        self.probes.remove(&seq);
    }

    /// Starts leaving: this member's entry turns dead under a new incarnation and is
    /// pushed to up to `fanout` members at once (and piggybacked after).
    pub fn leave(&mut self, fanout: usize, rng: &mut ChaCha20Rng) {
        self.leaving = true;
        self.incarnation += 1;
        self.announce_self();
        let live: Vec<(PeerKey, SocketAddr)> = self.live().map(|m| (m.key, m.addr)).collect();
        if live.is_empty() {
            return;
        }
        for _ in 0..fanout.min(live.len()) {
            let (k, a) = live[below(rng, live.len())];
            self.seq = self.seq.wrapping_add(1);
            let seq = self.seq;
            let gossip = self.self_update().into_iter().collect();
            self.send(k, a, Msg::Ping { seq, gossip });
        }
    }

    /// Whether this member is leaving.
    pub fn is_leaving(&self) -> bool {
        self.leaving
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    fn key(n: u8) -> PeerKey {
        PeerKey([n; 32])
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, n], 4000))
    }

    fn up(n: u8, inc: u32, state: MemberState) -> Update {
        Update {
            key: [n; 32],
            addr: addr(n),
            incarnation: inc,
            state,
            load: Load::default(),
        }
    }

    #[test]
    fn precedence_rules() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let now = Time::from_secs(10);
        let mut m = Membership::new(key(0), 0, Load::default(), &mut rng);
        m.apply(now, up(1, 0, MemberState::Dead));
        assert!(
            m.get(&key(1)).is_none(),
            "unknown dead members are not added"
        );
        m.apply(now, up(1, 3, MemberState::Alive));
        assert_eq!(m.size(), 2);
        m.apply(now, up(1, 2, MemberState::Suspect));
        assert_eq!(
            m.get(&key(1)).map(|x| x.state),
            Some(MemberState::Alive),
            "older suspicion ignored"
        );
        m.apply(now, up(1, 3, MemberState::Suspect));
        assert_eq!(m.get(&key(1)).map(|x| x.state), Some(MemberState::Suspect));
        m.apply(now, up(1, 3, MemberState::Alive));
        assert_eq!(
            m.get(&key(1)).map(|x| x.state),
            Some(MemberState::Suspect),
            "refutation needs a higher incarnation"
        );
        m.apply(now, up(1, 4, MemberState::Alive));
        assert_eq!(m.get(&key(1)).map(|x| x.state), Some(MemberState::Alive));
        m.apply(now, up(1, 4, MemberState::Dead));
        assert_eq!(m.size(), 1);
        assert_eq!(
            m.changes,
            vec![
                Change::Up(key(1)),
                Change::Suspect(key(1)),
                Change::Down(key(1))
            ]
        );
        // Suspicion of ourselves is refuted with a higher incarnation.
        m.apply(now, up(0, 0, MemberState::Suspect));
        assert_eq!(m.incarnation(), 1);
        assert_eq!(m.stats.refutations, 1);
    }

    #[test]
    fn silent_member_is_suspected_then_declared_dead() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let mut now = Time::from_secs(10);
        let mut m = Membership::new(key(0), 0, Load::default(), &mut rng);
        m.set_my_addr(addr(0));
        for n in 1..=3 {
            m.apply(now, up(n, 0, MemberState::Alive));
        }
        m.changes.clear();
        // Members 1 and 2 answer everything; member 3 is silent.
        for _ in 0..40 {
            m.tick(now, &mut rng);
            let out = std::mem::take(&mut m.out);
            for (to, _, msg) in out {
                if to == key(3) {
                    continue;
                }
                match msg {
                    Msg::Ping { seq, .. } => m.handle_ack(now, to, seq, &[]),
                    Msg::PingReq { seq: _, .. } => {}
                    _ => {}
                }
            }
            now = now + PROBE_INTERVAL;
        }
        assert_eq!(m.get(&key(3)).map(|x| x.state), Some(MemberState::Dead));
        assert_eq!(
            m.changes,
            vec![Change::Suspect(key(3)), Change::Down(key(3))]
        );
        assert_eq!(m.size(), 3);
        assert!(m.stats.indirect_probes > 0);
    }

    /// Delivers `from`'s queued messages to `to` (membership messages only).
    fn deliver(from: &mut Membership, to: &mut Membership, now: Time) {
        let out = std::mem::take(&mut from.out);
        for (k, addr, msg) in out {
            if k != to.me {
                continue;
            }
            match msg {
                Msg::Members { members } => to.apply_page(now, &members),
                Msg::Sync => {
                    to.handle_sync(now, from.me, addr);
                }
                _ => {}
            }
        }
    }

    #[test]
    fn a_sync_exchange_merges_both_views_without_gossiping_them() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let now = Time::from_secs(10);
        let mut a = Membership::new(key(0), 0, Load::default(), &mut rng);
        let mut b = Membership::new(key(1), 0, Load::default(), &mut rng);
        a.set_my_addr(addr(0));
        b.set_my_addr(addr(1));
        // `a` knows `b` and 2..=30; `b` knows nobody but 31..=60 (not even `a`).
        a.apply(now, up(1, 0, MemberState::Alive));
        for n in 2..=30 {
            a.apply(now, up(n, 0, MemberState::Alive));
        }
        for n in 31..=60 {
            b.apply(now, up(n, 0, MemberState::Alive));
        }
        a.gossip.clear();
        b.gossip.clear();
        // `a` syncs with a random live member every interval, until it picks `b`.
        let mut t = now;
        loop {
            a.out.clear();
            a.sync_tick(t, &mut rng);
            if a.out
                .iter()
                .any(|(k, _, m)| *k == key(1) && *m == Msg::Sync)
            {
                break;
            }
            t = t + SYNC_INTERVAL;
            assert!(a.stats.syncs < 200, "b is picked some time");
        }
        deliver(&mut a, &mut b, t);
        // `b` did not know `a`; it answers the pull all the same, and learns `a`
        // and what `a` knows from `a`'s pages.
        assert_eq!(b.stats.syncs_answered, 1);
        for n in (0..=30).filter(|&n| n != 1) {
            assert!(b.is_live(&key(n)), "b learned {n} from a's list");
        }
        deliver(&mut b, &mut a, t);
        for n in 31..=60 {
            assert!(a.is_live(&key(n)), "a learned {n} from b's list");
        }
        assert!(
            a.gossip.is_empty(),
            "what a page teaches is not gossiped on"
        );
        assert!(b.gossip.is_empty());
    }

    #[test]
    fn sync_answers_are_bounded_per_interval() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let now = Time::from_secs(10);
        let mut m = Membership::new(key(0), 0, Load::default(), &mut rng);
        m.set_my_addr(addr(0));
        let answered = (0..3 * MAX_SYNC_ANSWERS)
            .filter(|_| m.handle_sync(now, key(9), addr(9)))
            .count();
        assert_eq!(answered, MAX_SYNC_ANSWERS as usize);
        assert!(m.handle_sync(now + SYNC_INTERVAL, key(9), addr(9)));
    }
}
