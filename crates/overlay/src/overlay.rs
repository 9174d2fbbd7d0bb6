//! [`Overlay`]: one node's part in the overlay, as an ordinary node and, once
//! promoted (or pinned as a seed), as a supernode.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::time::Duration;

use blake2::{Blake2s256, Digest};
use peercall_crypto::record::{MAX_ENDPOINTS, MAX_RECORD_LEN, MAX_SUPERNODES, MIN_RECORD_LEN};
use peercall_crypto::{Handle, HomeSupernode, Identity, PeerKey, Record, RecordBody, UserId};
use peercall_wire::Time;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::config::{Bootstrap, CachedHost, HOST_CACHE_SIZE, OverlayConfig, Role};
use crate::event::{Found, Lookup, LookupError, Output, OverlayEvent, OverlayStats, RequestId};
use crate::membership::{Change, Membership, PROBE_INTERVAL};
use crate::msg::{
    Capabilities, Id, Load, MAX_IDS, MAX_MSG_LEN, MAX_SAMPLE, MAX_STORE_BATCH, Msg, Query, Refusal,
    SnInfo,
};
use crate::policy::{DefaultElection, ElectionPolicy};
use crate::store::{Store, StoreError, Stored, view};
use crate::util::{
    KeyedState, Map, Set, Timers, TokenBucket, backoff, below, jitter, map, mix64, prefix64, set,
};

/// Homes a node keeps (DESIGN.md §1: two, so one failure never cuts it off).
pub const HOME_TARGET: usize = 2;
/// An attach with no answer by then has failed.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(3);
/// First attach back-off step after a failure or redirect (full jitter).
pub const ATTACH_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Back-off cap: a node never waits longer than a minute to retry.
pub const ATTACH_BACKOFF_CAP: Duration = Duration::from_secs(60);
/// A home lost (died, left) is replaced after a uniform delay up to this, so the
/// clients of a dead supernode do not all arrive elsewhere in the same instant.
pub const HOME_LOSS_JITTER: Duration = Duration::from_secs(1);
/// A redirect naming a supernode loaded below this (per mille) is followed at once.
pub const REDIRECT_ROOM_PERMILLE: u16 = 900;
/// Redirects followed at once in a row; beyond, the node backs off as after any
/// failure (load figures in redirects may be stale, so chains must end).
pub const MAX_REDIRECT_FOLLOW: u32 = 4;
/// A followed redirect waits up to this long (uniform), so a burst of redirected
/// nodes does not land on the suggested supernodes in one instant.
pub const REDIRECT_FOLLOW_JITTER: Duration = Duration::from_millis(300);
/// Supernodes named in a redirect, drawn at random among the least loaded it
/// knows, so redirected nodes spread instead of all trying the same few.
pub const REDIRECT_SUGGESTIONS: usize = 4;
/// A failed supernode is not tried again for this long (unless nothing else is left).
pub const ATTACH_FAIL_MEMORY: Duration = Duration::from_secs(60);
/// Nodes ping each home this often: detects a dead home within seconds, far sooner
/// than the session timeout, for ~10 bytes/s per home.
pub const HOME_PING_INTERVAL: Duration = Duration::from_secs(4);
/// A home silent this long (three pings) is dead.
pub const HOME_SILENCE: Duration = Duration::from_secs(10);
/// A home that has left a request unanswered this long is pinged again (so a
/// lost datagram alone never condemns it).
pub const HOME_RETRY: Duration = Duration::from_millis(1_000);
/// A home that leaves a request (and the pings that follow it) unanswered this
/// long is dead: the node switches to its other home at once and re-attaches.
/// Far above a WAN round trip plus a home's fetch timeout, far below the silence
/// rule, so a crashed home is replaced within seconds.
pub const HOME_DEAD: Duration = Duration::from_secs(3);
/// A lookup goes to a home that has left a request unanswered this long only if
/// no other home is better.
pub const HOME_SUSPECT: Duration = Duration::from_millis(700);
/// Records are re-published this long after a change, so changes that come together
/// (two attaches, a reflexive address) make one record.
pub const PUBLISH_DEBOUNCE: Duration = Duration::from_millis(200);
/// A lookup waits this long for one home before asking the next: above the p99
/// of a one-hop lookup on WAN links (two round trips), so a live home is rarely
/// asked twice, and short enough that a dead home costs well under a second.
pub const LOOKUP_TRY: Duration = Duration::from_millis(700);
/// A lookup gives up after this long.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(4);
/// A home with no valid answer from the storers this long after asking also
/// asks the storers ranked next: above a WAN round trip and most handshakes, so
/// it rarely fires when all storers are alive; it bounds the cost of a storer
/// that died and is not yet known dead.
pub const FETCH_WIDEN: Duration = Duration::from_millis(350);
/// A home waits this long for storers before answering with what it has.
pub const FETCH_TIMEOUT: Duration = Duration::from_millis(1_200);
/// Copies of each record: `r = 3` (DESIGN.md §2).
pub const REPLICAS: usize = 3;
/// A home answers from its cache without asking storers if it fetched the record
/// this recently (or keeps it fresh by watching it).
pub const CACHE_FRESH: Duration = Duration::from_secs(10);
/// Records a home caches at most; beyond, the cache is cleared of expired ones and
/// then of everything (a cache miss only costs one fetch).
pub const MAX_CACHE: usize = 50_000;
/// Homes renew their watches at storers this often…
pub const WATCH_RENEW: Duration = Duration::from_secs(30);
/// …and a storer keeps a watch this long without renewal (two renewals and slack).
pub const WATCH_LEASE: Duration = Duration::from_secs(75);
/// Homes watching one user at a storer, at most (a storer's fan-out bound).
pub const MAX_WATCHERS_PER_USER: usize = 256;
/// Contacts one client may follow through its home.
pub const MAX_SUBSCRIPTIONS: usize = 1_000;
/// Supernode housekeeping period: expiry sweep, watch leases, cache bound.
pub const MAINTAIN_INTERVAL: Duration = Duration::from_secs(5);
/// Membership changes are batched this long before records are re-placed.
pub const REPLICATE_DELAY: Duration = Duration::from_secs(1);
/// A widened read also asks where the record was placed before the members that
/// joined within this long (re-replication to them is batched and needs new
/// sessions, so it takes a few seconds when many join at once).
pub const RECENT_JOIN: Duration = Duration::from_secs(15);
/// Lookups one client may make per second through its home, and burst.
pub const CLIENT_LOOKUP_RATE: (u32, u32) = (10, 30);
/// Publishes one client may make per second, and burst (it needs one a minute).
pub const CLIENT_PUBLISH_RATE: (u32, u32) = (1, 5);
/// Subscribe messages one client may send per second, and burst.
pub const CLIENT_SUBSCRIBE_RATE: (u32, u32) = (2, 30);
/// Supernodes sent in an attach answer or host sample.
pub const SAMPLE_SIZE: usize = 16;
/// Clients get a fresh host-cache sample this often (piggybacked on a ping answer).
pub const HOST_SAMPLE_INTERVAL: Duration = Duration::from_secs(300);
/// The most join requests a supernode remembers (to accept their answers): its
/// homes and seeds, and the coordinator that promoted it.
pub const MAX_JOIN_SENT: usize = 32;
/// Candidates report to their home this often.
pub const CANDIDATE_INTERVAL: Duration = Duration::from_secs(60);
/// A candidate not ready to report yet (no home, or its reflexive address unknown)
/// looks again this soon: attaching and a STUN exchange take a round trip or two,
/// and waiting a whole [`CANDIDATE_INTERVAL`] would delay the first report a minute.
pub const CANDIDATE_SETTLE: Duration = Duration::from_secs(3);
/// A dialer waits this long for the candidate's STUN answer.
pub const DIALBACK_WAIT: Duration = Duration::from_secs(2);
/// A home forgets a dial-back it asked for after this long.
pub const DIALBACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Dial-backs in progress at one home, at most.
pub const MAX_DIALBACKS: usize = 32;
/// Dial-back requests a supernode serves per second, and burst.
pub const DIALBACK_RATE: (u32, u32) = (5, 10);
/// The coordinator forgets a nomination not renewed in this long (candidates
/// report every minute).
pub const NOMINATION_TTL: Duration = Duration::from_secs(180);
/// Nominations the coordinator keeps, best first.
pub const MAX_NOMINEES: usize = 64;
/// The coordinator decides this often.
pub const ELECT_INTERVAL: Duration = Duration::from_secs(10);
/// Coordinator epochs: the coordinator is the live supernode with the lowest HRW
/// score for the epoch, so the role moves around hourly and at once on death.
pub const EPOCH: Duration = Duration::from_secs(3600);
/// After a promotion the coordinator waits this long (load reports settle).
pub const PROMOTION_COOLDOWN: Duration = Duration::from_secs(10);
/// After a demotion it waits this long (the hand-off moves clients).
pub const DEMOTION_COOLDOWN: Duration = Duration::from_secs(60);
/// A demoted or stopping supernode hands off for this long before it goes.
pub const HANDOFF_GRACE: Duration = Duration::from_secs(2);
/// Members a leaving supernode tells at once.
pub const LEAVE_FANOUT: usize = 4;
/// STUN requests awaiting an answer, at most.
pub const MAX_STUN_PENDING: usize = 8;
/// A STUN request unanswered this long is forgotten.
pub const STUN_TIMEOUT: Duration = Duration::from_secs(5);
/// Candidate supernodes probed at once (a STUN binding each) before a home is
/// chosen: the node attaches to the one with the lowest round trip, since every
/// lookup crosses the node-home path twice and the home's own access link four
/// times. As many as a home's host sample ([`SAMPLE_SIZE`]), so all of it is
/// measured.
pub const PROBE_FANOUT: usize = SAMPLE_SIZE;
/// Probes in flight at most (answers are kept for later choices).
pub const MAX_PROBES: usize = 2 * PROBE_FANOUT;
/// A probe round waits this long at most for its first answer (the nearest of
/// the round, since all were sent together) before the node attaches with what
/// it has measured: above the round trip of most WAN paths, short enough that a
/// start or a lost home is not noticeably delayed.
pub const PROBE_WAIT: Duration = Duration::from_millis(300);
/// A candidate that answered a probe this recently counts as alive with the
/// measured round trip; older measurements are probed again before use (a
/// supernode that died since does not answer and is not chosen).
pub const RTT_FRESH: Duration = Duration::from_secs(3);
/// Candidates within this much round trip of the nearest count as near: the
/// node picks one of them at random, which spreads a crowd of nodes re-homing at
/// once for a few milliseconds of latency.
pub const NEAR_SLACK: Duration = Duration::from_millis(20);
/// A node with all its homes answering measures a few more supernodes this often
/// and moves to one nearer than its farthest home: homes taken while the tier was
/// forming (the nearest seeds full, the nearer supernodes not yet promoted) or
/// on a redirect are seldom the nearest, and every lookup crosses the home link
/// twice.
pub const REHOME_INTERVAL: Duration = Duration::from_secs(60);
/// Supernodes probed per re-homing round, those measured longest ago first: over
/// the minutes the node measures its whole host cache, while its probes (which
/// count as contacts for the election, [`crate::config::DEFAULT_CONTACT_MEMORY`])
/// stay few enough for a candidate's report.
pub const REHOME_PROBES: usize = 4;
/// A node moves to a nearer home only if it beats the farthest by this much of
/// round trip: less is within the noise of the estimates.
pub const REHOME_MIN_GAIN: Duration = Duration::from_millis(10);
/// Round trips measured this recently are trusted for re-homing, and not probed
/// again by it (the attach is the final check: a supernode gone since does not
/// answer it).
pub const REHOME_MEMORY: Duration = Duration::from_secs(1_800);
/// A supernode reported (in a sample or redirect) as loaded past
/// [`REDIRECT_ROOM_PERMILLE`] this recently is not chosen for its latency.
pub const LOAD_HINT_FRESH: Duration = Duration::from_secs(60);
/// Weight of a new round-trip sample in the smoothed estimate, as a divisor
/// (RFC 6298's alpha = 1/8).
pub const RTT_GAIN_DIVISOR: u32 = 8;
/// Seeds re-send `Join` this often while the node knows no other supernode.
pub const REJOIN_INTERVAL: Duration = Duration::from_secs(10);
/// Readers remember the highest sequence number seen for this many users, to
/// refuse rolled-back records.
pub const MAX_SEEN: usize = 4_096;
/// Key of the fixed hash that places handles (every node must agree on it).
const HANDLE_HASH_KEY: KeyedState = KeyedState::fixed(0x7065_6572_6361_6c6c, 0x6861_6e64_6c65_7331);

/// Periodic timers, each with at most one live queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Periodic {
    Attach,
    HomePing,
    Publish,
    Refresh,
    Probe,
    Maintain,
    Elect,
    Candidate,
    Replicate,
    Handoff,
    Rehome,
}
const PERIODIC: usize = 11;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Periodic(Periodic),
    Lookup(u32),
    Fetch(u32),
    Dialback([u8; 12]),
    DialTask([u8; 12]),
}

#[derive(Debug, Clone, Copy)]
struct Home {
    key: PeerKey,
    addr: SocketAddr,
    last_heard: Time,
    /// When the oldest request (lookup or ping) still unanswered was sent; any
    /// message from the home clears it.
    asked: Option<Time>,
    /// When it was last pinged.
    pinged: Time,
    /// When the ping now unanswered was sent (for a round-trip sample).
    ping_sent: Option<Time>,
}

impl Home {
    /// A request has been waiting at least `after` for this home.
    fn waiting(&self, now: Time, after: Duration) -> bool {
        self.asked.is_some_and(|a| now.saturating_since(a) >= after)
    }
}

/// What a node knows of its round trip to one supernode.
#[derive(Debug, Clone, Copy)]
struct Latency {
    /// Smoothed round trip (`None`: never answered).
    srtt: Option<Duration>,
    /// When it last answered a probe or ping.
    measured: Time,
    /// When it was last probed.
    probed: Time,
    /// Its load (per mille) as last reported in a sample or redirect, and when.
    load: Option<(u16, Time)>,
}

/// A STUN probe of a candidate home in flight.
#[derive(Debug, Clone, Copy)]
struct Probe {
    txid: [u8; 12],
    key: PeerKey,
    addr: SocketAddr,
    sent: Time,
}

#[derive(Debug, Clone, Copy)]
struct Attaching {
    key: PeerKey,
    deadline: Time,
}

#[derive(Debug, Clone)]
struct PendingLookup {
    id: RequestId,
    query: Query,
    started: Time,
    tries: usize,
    /// Homes asked that have not answered (a "not found" from one waits for
    /// the others).
    waiting_on: Vec<PeerKey>,
}

#[derive(Debug, Clone, Copy)]
struct PresenceState {
    seq: u64,
    online: bool,
}

#[derive(Debug)]
struct Client {
    addr: SocketAddr,
    user: UserId,
    /// Its newest verified record, re-stored by this home at storers that take
    /// over after storers depart (if all of a record's storers die, one after
    /// the other or at once, nobody else could re-replicate it).
    record: Vec<u8>,
    /// The storers this home sent that record to.
    stored_at: Vec<PeerKey>,
    /// The homes it lacks (below [`HOME_TARGET`]), by that record and counting
    /// this one: demand the tier has no place for yet.
    missing_homes: u32,
    lookups: TokenBucket,
    publishes: TokenBucket,
    subscribes: TokenBucket,
    subs: Vec<UserId>,
    last_sample: Time,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Client(PeerKey, u32),
    Local(u32),
    Presence(UserId),
}

#[derive(Debug)]
struct Fetch {
    origin: Origin,
    query: Query,
    storers: Vec<PeerKey>,
    replied: Vec<(PeerKey, Option<u64>)>,
    best: Option<Vec<u8>>,
    answered: bool,
    /// Whether the next-ranked storers were asked after a miss.
    widened: bool,
    deadline: Time,
}

#[derive(Debug, Clone, Copy)]
struct Dialback {
    candidate: PeerKey,
    addr: SocketAddr,
    score: u32,
    dialer: PeerKey,
    deadline: Time,
}

#[derive(Debug, Clone, Copy)]
struct DialTask {
    requester: PeerKey,
    target: SocketAddr,
    deadline: Time,
}

#[derive(Debug, Clone, Copy)]
struct Nominee {
    key: PeerKey,
    addr: SocketAddr,
    score: u32,
    at: Time,
    /// The home that validated it, which relays the promotion.
    via: PeerKey,
}

/// Supernode state.
#[derive(Debug)]
struct Super {
    members: Membership,
    store: Store,
    clients: Map<PeerKey, Client>,
    client_by_user: Map<UserId, PeerKey>,
    admission: TokenBucket,
    fetches: Map<u32, Fetch>,
    next_fetch: u32,
    /// Records this home read or was given, and when.
    cache: Map<UserId, (Vec<u8>, Time)>,
    /// As storer: homes watching each user, with lease ends.
    watchers: Map<UserId, Vec<(PeerKey, Time)>>,
    /// As home: clients (or this node) following each user.
    watching: Map<UserId, Vec<PeerKey>>,
    last_watch_renew: Time,
    dialbacks: Map<[u8; 12], Dialback>,
    dial_tasks: Map<[u8; 12], DialTask>,
    dialback_bucket: TokenBucket,
    nominees: Vec<Nominee>,
    promotions: VecDeque<Time>,
    cooldown_until: Time,
    joined: Vec<PeerKey>,
    /// The supernodes this one asked to join (their answers are trusted).
    join_sent: Vec<PeerKey>,
    departed: Vec<PeerKey>,
    /// Members that became suspect since the last re-placement.
    suspected: Vec<PeerKey>,
    least_loaded: Vec<SnInfo>,
    /// For each object (user or handle) of a stored record, the HRW score of the
    /// last of its `REPLICAS` storers as of the last re-placement (0 with fewer
    /// members): a member that joins or leaves with a lower score cannot change
    /// where the object goes, so re-placement scans the membership only for the
    /// objects a change can move instead of for every record.
    placed: Map<u64, u64>,
    handoff: bool,
    last_join: Time,
    /// Supernodes this one joined through (a promoted node's homes): their
    /// member lists are accepted before they are in the view.
    joined_via: Vec<PeerKey>,
}

/// One node's overlay state machine. See the crate documentation for the driving
/// contract.
#[derive(Debug)]
pub struct Overlay {
    identity: Identity,
    me: PeerKey,
    my_hrw: u64,
    user: UserId,
    role: Role,
    cfg: OverlayConfig,
    policy: Box<dyn ElectionPolicy>,
    rng: ChaCha20Rng,
    started: Time,
    timers: Timers<Timer>,
    armed: [Time; PERIODIC],
    out: VecDeque<Output>,
    stats: OverlayStats,
    closing: bool,
    reflexive: Option<SocketAddr>,
    /// The latest online record this node signed (for call invitations).
    own_record: Option<Vec<u8>>,
    stun_pending: Vec<([u8; 12], SocketAddr, Time)>,
    /// Round trips to supernodes (probes of candidates, pings of homes).
    latency: Map<PeerKey, Latency>,
    /// The probe round in flight, and when the node stops waiting for it.
    probes: Vec<Probe>,
    probe_until: Time,
    /// When the re-homing round's probes went out (its answers are due).
    rehome_probed: Option<Time>,
    bootstrap: Vec<Bootstrap>,
    homes: Vec<Home>,
    attaching: Vec<Attaching>,
    attach_failures: u32,
    /// Redirects followed at once since the last successful attach.
    redirects_followed: u32,
    next_attach: Time,
    failed: Map<PeerKey, Time>,
    host_cache: Vec<CachedHost>,
    suggestions: VecDeque<SnInfo>,
    seq: u64,
    lookups: Map<u32, PendingLookup>,
    next_req: u32,
    next_id: u64,
    contacts: Set<UserId>,
    presence: Map<UserId, PresenceState>,
    seen: Map<UserId, u64>,
    /// Peers with a session now (`Time::MAX`) or until when (its end).
    contacted: Map<PeerKey, Time>,
    sn: Option<Box<Super>>,
}

fn handle_obj(handle: &str) -> u64 {
    let mut h = HANDLE_HASH_KEY.build_hasher();
    h.write(handle.as_bytes());
    h.finish()
}

fn user_obj(user: &UserId) -> u64 {
    prefix64(&user.0)
}

fn member_hrw(key: &PeerKey) -> u64 {
    mix64(prefix64(&key.0))
}

/// The user id a record's bytes claim (BLAKE2s of the identity key), without
/// verifying anything: for cheap staleness checks before the signature.
fn claimed_user(bytes: &[u8]) -> Option<UserId> {
    if bytes.len() < MIN_RECORD_LEN || bytes.len() > MAX_RECORD_LEN {
        return None;
    }
    Some(UserId(Blake2s256::digest(&bytes[1..33]).into()))
}

/// The HRW score for `obj` of the last of the `REPLICAS` best of `storers` (all
/// of them for a placement; a home's storers of a record by id and by handle are
/// both), or 0 when there are fewer (any member would be placed).
fn last_score(obj: u64, storers: &[PeerKey]) -> u64 {
    let mut scores: Vec<u64> = storers.iter().map(|k| mix64(obj ^ member_hrw(k))).collect();
    scores.sort_unstable_by(|a, b| b.cmp(a));
    scores.get(REPLICAS - 1).copied().unwrap_or(0)
}

/// The homes a client lacks by its record, this supernode `me` counted as one.
fn missing_homes(record: &Record, me: PeerKey) -> u32 {
    let named = &record.body.supernodes;
    let homes = named.len() + usize::from(!named.iter().any(|h| h.key == me));
    HOME_TARGET.saturating_sub(homes) as u32
}

fn query_of(lookup: &Lookup) -> Query {
    match lookup {
        Lookup::User(u) => Query::User(u.0),
        Lookup::Handle(h) => Query::Handle(h.as_str().to_owned()),
    }
}

fn matches(query: &Query, record: &Record) -> bool {
    match query {
        Query::User(u) => record.user_id().0 == *u,
        Query::Handle(h) => record.body.handle.as_ref().is_some_and(|x| x.as_str() == h),
    }
}

impl Overlay {
    /// A node's overlay starting at `now`. A `role` of [`Role::Supernode`] makes it a
    /// (pinned) supernode at once; otherwise it attaches to supernodes from the host
    /// cache or `bootstrap`.
    pub fn new(
        identity: Identity,
        role: Role,
        bootstrap: Vec<Bootstrap>,
        cfg: OverlayConfig,
        rng_seed: [u8; 32],
        now: Time,
    ) -> Overlay {
        let mut rng = ChaCha20Rng::from_seed(rng_seed);
        let me = identity.peer_key();
        let mut host_cache = cfg.host_cache.clone();
        host_cache.retain(|h| h.key != me);
        host_cache.truncate(HOST_CACHE_SIZE);
        let mut o = Overlay {
            user: identity.user_id(),
            my_hrw: member_hrw(&me),
            me,
            identity,
            role,
            policy: Box::new(DefaultElection),
            started: now,
            timers: Timers::default(),
            armed: [Time::MAX; PERIODIC],
            out: VecDeque::new(),
            stats: OverlayStats::default(),
            closing: false,
            reflexive: None,
            own_record: None,
            stun_pending: Vec::new(),
            latency: map(&mut rng),
            probes: Vec::new(),
            probe_until: Time::ZERO,
            rehome_probed: None,
            bootstrap: bootstrap
                .into_iter()
                .filter(|b| b.key != Some(me))
                .collect(),
            homes: Vec::new(),
            attaching: Vec::new(),
            attach_failures: 0,
            redirects_followed: 0,
            next_attach: now,
            failed: map(&mut rng),
            host_cache,
            suggestions: VecDeque::new(),
            seq: 0,
            lookups: map(&mut rng),
            next_req: 0,
            next_id: 0,
            contacts: set(&mut rng),
            presence: map(&mut rng),
            seen: map(&mut rng),
            contacted: map(&mut rng),
            sn: None,
            cfg,
            rng,
        };
        if role == Role::Supernode {
            o.become_supernode(now);
        } else {
            o.arm(Periodic::Attach, now);
        }
        o.arm(Periodic::Refresh, now + o.cfg.refresh_interval);
        o.arm(Periodic::Rehome, now + REHOME_INTERVAL);
        // The first report goes out once the node meets the minimum uptime (reports
        // before then would only be refused), and not before it had time to settle.
        let first = o.cfg.election.min_uptime.max(CANDIDATE_SETTLE);
        o.arm(Periodic::Candidate, now + first);
        o
    }

    /// Replaces the election policy (default [`DefaultElection`]).
    pub fn set_election_policy(&mut self, policy: Box<dyn ElectionPolicy>) {
        self.policy = policy;
    }

    // ---- driving contract ------------------------------------------------------

    /// The next output.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Overlay::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Time> {
        if self.closing {
            return None;
        }
        self.timers.next()
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        while let Some((at, timer)) = self.timers.pop_due(now) {
            if self.closing {
                return;
            }
            match timer {
                Timer::Periodic(p) => {
                    if self.armed[p as usize] != at {
                        continue;
                    }
                    self.armed[p as usize] = Time::MAX;
                    self.periodic(now, p);
                }
                Timer::Lookup(req) => self.lookup_timer(now, req),
                Timer::Fetch(req) => {
                    let deadline = self
                        .sn
                        .as_ref()
                        .and_then(|sn| sn.fetches.get(&req).map(|f| f.deadline));
                    match deadline {
                        Some(d) if d <= now => self.finish_fetch(now, req),
                        Some(_) => {
                            // No valid answer yet: a storer is slow or gone (not
                            // yet known dead); the storers ranked next are asked.
                            if let Some(query) = self.widen_fetch(now, req) {
                                let local =
                                    self.sn.as_ref().and_then(|sn| Self::read_local(sn, &query));
                                let me = self.me;
                                self.on_fetch_reply(now, me, req, local);
                            }
                        }
                        None => {}
                    }
                }
                Timer::Dialback(nonce) => self.dialback_timer(now, nonce),
                Timer::DialTask(nonce) => self.dial_task_timer(now, nonce),
            }
        }
    }

    fn arm(&mut self, p: Periodic, at: Time) {
        if at < self.armed[p as usize] {
            self.armed[p as usize] = at;
            self.timers.push(at, Timer::Periodic(p));
        }
    }

    fn periodic(&mut self, now: Time, p: Periodic) {
        match p {
            Periodic::Attach => self.maintain_homes(now),
            Periodic::HomePing => self.ping_homes(now),
            Periodic::Publish => self.publish(now, true),
            Periodic::Refresh => {
                self.publish(now, true);
                self.arm(Periodic::Refresh, now + self.cfg.refresh_interval);
            }
            Periodic::Probe => self.probe_tick(now),
            Periodic::Maintain => self.maintain(now),
            Periodic::Elect => self.elect(now),
            Periodic::Candidate => self.candidacy(now),
            Periodic::Rehome => self.rehome(now),
            Periodic::Replicate => self.replicate(now),
            Periodic::Handoff => self.finish_handoff(now),
        }
    }

    /// Handles one overlay message (a `Frame::Control` body) from `from` at `addr`.
    pub fn handle_message(&mut self, now: Time, from: PeerKey, addr: SocketAddr, body: &[u8]) {
        self.stats.msgs_in += 1;
        self.stats.bytes_in += body.len() as u64;
        if self.closing {
            return;
        }
        let msg = match Msg::decode(body) {
            Ok(m) => m,
            Err(_) => {
                self.stats.dropped_malformed += 1;
                return;
            }
        };
        let used = self.dispatch(now, from, addr, msg);
        if !used {
            self.stats.dropped_unexpected += 1;
        }
        self.flush_membership(now);
    }

    /// A session with `peer` came up (or moved to `addr`).
    pub fn handle_peer_up(&mut self, now: Time, peer: PeerKey, addr: SocketAddr) {
        if self.sn.is_none() {
            self.contacted.insert(peer, Time::MAX);
        }
        let mut learned = false;
        for b in &mut self.bootstrap {
            if b.key.is_none() && b.addr == addr {
                b.key = Some(peer);
                learned = true;
            }
        }
        if learned {
            if self.sn.is_some() {
                self.send_join(peer, addr);
            } else {
                self.arm(Periodic::Attach, now);
            }
        }
        if let Some(sn) = self.sn.as_mut()
            && let Some(c) = sn.clients.get_mut(&peer)
        {
            c.addr = addr;
        }
    }

    /// A session with `peer` ended (closed, timed out, or could not be set up).
    pub fn handle_peer_down(&mut self, now: Time, peer: PeerKey) {
        if let Some(t) = self.contacted.get_mut(&peer) {
            *t = now;
            // Once forgotten it may dial this node back: report again then.
            if self.role == Role::Auto && self.sn.is_none() {
                self.arm(Periodic::Candidate, now + self.cfg.election.contact_memory);
            }
        }
        if let Some(i) = self.homes.iter().position(|h| h.key == peer) {
            self.lose_home(now, i, &[]);
        }
        if let Some(i) = self.attaching.iter().position(|a| a.key == peer) {
            self.attaching.remove(i);
            self.attach_failed(now, peer);
        }
        self.drop_client(now, peer);
    }

    /// A STUN Binding success response from `from` with `txid` reports `mapped`.
    pub fn handle_stun_response(
        &mut self,
        now: Time,
        from: SocketAddr,
        txid: [u8; 12],
        mapped: SocketAddr,
    ) {
        if let Some(i) = self
            .probes
            .iter()
            .position(|p| p.txid == txid && p.addr == from)
        {
            // A probe measures the round trip only: a symmetric NAT maps each
            // destination apart, so its answer says nothing about the reflexive
            // address the homes see.
            let p = self.probes.swap_remove(i);
            self.note_rtt(now, p.key, now.saturating_since(p.sent));
            if now < self.probe_until {
                // The first answer of a round is its nearest candidate: no
                // need to wait for the others (their answers still count).
                self.probe_until = now;
                self.arm(Periodic::Attach, now);
            }
            return;
        }
        if let Some(i) = self
            .stun_pending
            .iter()
            .position(|p| p.0 == txid && p.1 == from)
        {
            self.stun_pending.swap_remove(i);
            self.set_reflexive(now, mapped);
            return;
        }
        let Some(sn) = self.sn.as_mut() else { return };
        if let Some(task) = sn.dial_tasks.get(&txid).copied()
            && task.target == from
        {
            sn.dial_tasks.remove(&txid);
            let addr = sn.members.get(&task.requester).map(|m| m.addr);
            let msg = Msg::DialbackResult {
                nonce: txid,
                reachable: true,
            };
            if task.requester == self.me {
                self.dialback_result(now, self.me, txid, true);
            } else if let Some(addr) = addr {
                self.send(task.requester, addr, &msg);
            }
        }
    }

    fn set_reflexive(&mut self, now: Time, mapped: SocketAddr) {
        if self.reflexive != Some(mapped) {
            self.reflexive = Some(mapped);
            self.event(OverlayEvent::Reflexive { addr: mapped });
            if let Some(sn) = self.sn.as_mut() {
                sn.members.set_my_addr(mapped);
            }
            self.arm(Periodic::Publish, now + PUBLISH_DEBOUNCE);
        }
    }

    // ---- commands ----------------------------------------------------------------

    /// Looks `what` up in the directory; the answer comes as
    /// [`OverlayEvent::LookupDone`] with the returned id.
    pub fn lookup(&mut self, now: Time, what: Lookup) -> RequestId {
        self.next_id += 1;
        let id = RequestId(self.next_id);
        self.stats.lookups += 1;
        self.next_req = self.next_req.wrapping_add(1);
        let req = self.next_req;
        let query = query_of(&what);
        self.lookups.insert(
            req,
            PendingLookup {
                id,
                query: query.clone(),
                started: now,
                tries: 0,
                waiting_on: Vec::new(),
            },
        );
        self.timers.push(now + LOOKUP_TIMEOUT, Timer::Lookup(req));
        self.send_lookup(now, req);
        id
    }

    fn send_lookup(&mut self, now: Time, req: u32) {
        let Some(p) = self.lookups.get_mut(&req) else {
            return;
        };
        let query = p.query.clone();
        if self.sn.is_some() {
            p.tries += 1;
            self.start_fetch(now, Origin::Local(req), query);
            return;
        }
        if self.homes.is_empty() {
            // Waits for a home; retried when one attaches or at the next try.
            self.timers.push(now + LOOKUP_TRY, Timer::Lookup(req));
            return;
        }
        // Every home that answers requests is asked at once (a hedged request,
        // as in "The Tail at Scale"): the first record found wins, so a lookup
        // takes the faster of the homes' paths, and a home that died unnoticed
        // costs nothing while another lives. Lookups are rare next to upkeep, so
        // the second copy is cheap. If every home leaves requests unanswered,
        // they are tried in turn, nearest first.
        let tries = p.tries;
        p.tries += 1;
        let mut ask: Vec<usize> = (0..self.homes.len())
            .filter(|&i| !self.homes[i].waiting(now, HOME_SUSPECT))
            .collect();
        if ask.is_empty() {
            let mut order: Vec<usize> = (0..self.homes.len()).collect();
            order.sort_by_key(|&i| (self.rtt_of(&self.homes[i].key).unwrap_or(Duration::MAX), i));
            ask.push(order[tries % order.len()]);
        }
        self.timers.push(now + LOOKUP_TRY, Timer::Lookup(req));
        for i in ask {
            let home = self.homes[i];
            if let Some(p) = self.lookups.get_mut(&req)
                && !p.waiting_on.contains(&home.key)
            {
                p.waiting_on.push(home.key);
            }
            self.homes[i].asked.get_or_insert(now);
            // The home is checked on once the request has waited long enough to
            // suspect it.
            let check = self.homes[i].asked.map_or(now, |a| a + HOME_SUSPECT);
            self.arm(Periodic::HomePing, check);
            self.send(
                home.key,
                home.addr,
                &Msg::Lookup {
                    req,
                    query: query.clone(),
                },
            );
        }
    }

    fn lookup_timer(&mut self, now: Time, req: u32) {
        let Some(p) = self.lookups.get(&req) else {
            return;
        };
        if now.saturating_since(p.started) >= LOOKUP_TIMEOUT {
            let err = if self.homes.is_empty() && self.sn.is_none() {
                LookupError::NotAttached
            } else {
                LookupError::Timeout
            };
            self.finish_lookup(req, Err(err));
        } else if now.saturating_since(p.started) >= LOOKUP_TRY * p.tries.max(1) as u32 {
            self.send_lookup(now, req);
        }
    }

    fn finish_lookup(&mut self, req: u32, result: Result<Found, LookupError>) {
        let Some(p) = self.lookups.remove(&req) else {
            return;
        };
        match &result {
            Ok(_) => self.stats.lookups_found += 1,
            Err(LookupError::NotFound) => self.stats.lookups_not_found += 1,
            Err(_) => self.stats.lookups_failed += 1,
        }
        self.event(OverlayEvent::LookupDone { id: p.id, result });
    }

    fn on_lookup_reply(
        &mut self,
        now: Time,
        from: PeerKey,
        req: u32,
        hops: u8,
        record: Option<Vec<u8>>,
    ) {
        let Some(p) = self.lookups.get_mut(&req) else {
            return;
        };
        p.waiting_on.retain(|k| *k != from);
        let query = p.query.clone();
        let Some(bytes) = record else {
            // "Not found" once no other home asked may still find it.
            if p.waiting_on.is_empty() {
                self.finish_lookup(req, Err(LookupError::NotFound));
            }
            return;
        };
        match Record::verify_at(&bytes, now) {
            Ok(r) if matches(&query, &r) => {
                let user = r.user_id();
                if self.seen.get(&user).is_some_and(|&s| s > r.seq) {
                    // A rolled-back record: something newer was seen.
                    self.stats.stale_records += 1;
                    return;
                }
                self.note_seen(user, r.seq);
                let online = !r.body.endpoints.is_empty();
                self.finish_lookup(
                    req,
                    Ok(Found {
                        record: Box::new(r),
                        online,
                        hops,
                    }),
                );
            }
            _ => self.stats.forged_records += 1,
        }
    }

    fn note_seen(&mut self, user: UserId, seq: u64) {
        if self.seen.len() >= MAX_SEEN && !self.seen.contains_key(&user) {
            self.seen.clear();
        }
        let e = self.seen.entry(user).or_insert(0);
        *e = (*e).max(seq);
    }

    /// Follows these users' presence (contacts pinned by user id).
    pub fn subscribe(&mut self, now: Time, users: &[UserId]) {
        let fresh: Vec<UserId> = users
            .iter()
            .copied()
            .filter(|u| self.contacts.insert(*u))
            .collect();
        self.send_subscriptions(now, &fresh);
    }

    /// Stops following these users.
    pub fn unsubscribe(&mut self, now: Time, users: &[UserId]) {
        let gone: Vec<UserId> = users
            .iter()
            .copied()
            .filter(|u| self.contacts.remove(u))
            .collect();
        for u in &gone {
            self.presence.remove(u);
        }
        if self.sn.is_some() {
            let me = self.me;
            self.home_unsubscribe(me, &gone);
        } else if let Some(h) = self.homes.first().copied() {
            for chunk in gone.chunks(MAX_IDS) {
                let users = chunk.iter().map(|u| u.0).collect();
                self.send(h.key, h.addr, &Msg::Unsubscribe { users });
            }
        }
        let _ = now;
    }

    fn send_subscriptions(&mut self, now: Time, users: &[UserId]) {
        if users.is_empty() {
            return;
        }
        if self.sn.is_some() {
            let me = self.me;
            self.home_subscribe(now, me, users);
        } else if let Some(h) = self.homes.first().copied() {
            for chunk in users.chunks(MAX_IDS) {
                let users = chunk.iter().map(|u| u.0).collect();
                self.send(h.key, h.addr, &Msg::Subscribe { users });
            }
        }
    }

    /// Changes the handle claimed in the record and re-publishes.
    pub fn set_handle(&mut self, now: Time, handle: Option<Handle>) {
        self.cfg.handle = handle;
        self.arm(Periodic::Publish, now);
    }

    /// Re-publishes the record now.
    pub fn publish_now(&mut self, now: Time) {
        self.arm(Periodic::Publish, now);
    }

    /// Updates the resources offered for promotion (the shell measures them).
    pub fn set_resources(&mut self, resources: crate::config::Resources) {
        self.cfg.resources = resources;
    }

    /// Graceful exit: an ordinary node publishes a signed offline record and
    /// detaches; a supernode tells its clients to go elsewhere, leaves the
    /// membership and pushes its directory share to the next storers. After this
    /// the overlay is silent.
    pub fn close(&mut self, now: Time) {
        if self.closing {
            return;
        }
        if self.sn.is_some() {
            self.handoff(now);
        } else {
            let offline = self.sign_record(now, false);
            for h in self.homes.clone() {
                if let Some(bytes) = &offline {
                    self.send(
                        h.key,
                        h.addr,
                        &Msg::Publish {
                            record: bytes.clone(),
                        },
                    );
                }
                self.send(h.key, h.addr, &Msg::Detach);
            }
        }
        self.closing = true;
    }

    // ---- queries -------------------------------------------------------------------

    /// The smoothed round trip to each home, in the order of [`Overlay::homes`]
    /// (`None`: not measured yet).
    pub fn home_rtts(&self) -> Vec<Option<Duration>> {
        self.homes.iter().map(|h| self.rtt_of(&h.key)).collect()
    }

    /// Whether this node is a supernode now.
    pub fn is_supernode(&self) -> bool {
        self.sn.as_ref().is_some_and(|sn| !sn.handoff)
    }

    /// The role setting.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The home supernodes (keys and addresses).
    pub fn homes(&self) -> Vec<(PeerKey, SocketAddr)> {
        self.homes.iter().map(|h| (h.key, h.addr)).collect()
    }

    /// How many home supernodes the node has.
    pub fn home_count(&self) -> usize {
        self.homes.len()
    }

    /// The host cache, for the shell to persist.
    pub fn host_cache(&self) -> &[CachedHost] {
        &self.host_cache
    }

    /// The reflexive address STUN reported.
    pub fn reflexive(&self) -> Option<SocketAddr> {
        self.reflexive
    }

    /// This node's latest published (online) signed record, if any: calls send it
    /// to the callee, who verifies it against the session's static key.
    pub fn own_record(&self) -> Option<&[u8]> {
        self.own_record.as_deref()
    }

    /// Whether `peer` is attached to this supernode as a client.
    pub fn is_client(&self, peer: &PeerKey) -> bool {
        self.sn
            .as_ref()
            .is_some_and(|sn| !sn.handoff && sn.clients.contains_key(peer))
    }

    /// The address of `key` if it is a live supernode in this supernode's view.
    pub fn member_addr(&self, key: &PeerKey) -> Option<SocketAddr> {
        self.sn
            .as_ref()
            .and_then(|sn| sn.members.get(key))
            .filter(|m| m.is_live())
            .map(|m| m.addr)
    }

    /// Whether the engine should keep the session with `peer` (a home, an attach in
    /// progress, or a client): such sessions are never reaped when idle.
    pub fn keeps_session(&self, peer: &PeerKey) -> bool {
        self.homes.iter().any(|h| h.key == *peer)
            || self.attaching.iter().any(|a| a.key == *peer)
            || self
                .sn
                .as_ref()
                .is_some_and(|sn| sn.clients.contains_key(peer))
    }

    /// Whether the node still needs its configured seeds: not attached and not part
    /// of the supernode tier.
    pub fn wants_seeds(&self) -> bool {
        match &self.sn {
            Some(sn) => sn.members.size() <= 1,
            None => self.homes.is_empty(),
        }
    }

    /// The live supernodes this supernode knows (empty for an ordinary node).
    pub fn members(&self) -> Vec<(PeerKey, SocketAddr, Load)> {
        self.sn.as_ref().map_or_else(Vec::new, |sn| {
            sn.members.live().map(|m| (m.key, m.addr, m.load)).collect()
        })
    }

    /// Where the directory places `user`'s record (this node's view; supernodes only).
    pub fn storers_of(&self, user: &UserId) -> Vec<PeerKey> {
        self.sn
            .as_ref()
            .map_or_else(Vec::new, |sn| self.placement(sn, user_obj(user), &[], &[]))
    }

    /// Whether this supernode stores a record of `user`.
    pub fn stores(&self, user: &UserId) -> bool {
        self.sn
            .as_ref()
            .is_some_and(|sn| sn.store.get(user).is_some())
    }

    /// Counters and gauges.
    pub fn stats(&self) -> OverlayStats {
        let mut s = self.stats.clone();
        s.supernode = self.is_supernode();
        s.homes = self.homes.len() as u64;
        if let Some(sn) = &self.sn {
            s.clients = sn.clients.len() as u64;
            s.capacity = u64::from(self.cfg.capacity.max_clients);
            s.members = sn.members.size() as u64;
            s.records = sn.store.len() as u64;
            s.record_bytes = sn.store.record_bytes() as u64;
            s.store_overhead_bytes = sn.store.overhead_bytes() as u64;
            s.swim = sn.members.stats;
        }
        s
    }

    // ---- plumbing --------------------------------------------------------------------

    fn event(&mut self, e: OverlayEvent) {
        if matches!(e, OverlayEvent::Presence { .. }) {
            self.stats.presence_events += 1;
        }
        self.out.push_back(Output::Event(e));
    }

    fn send(&mut self, to: PeerKey, addr: SocketAddr, msg: &Msg) {
        if to == self.me {
            return;
        }
        match msg.encode() {
            Ok(bytes) => {
                self.stats.msgs_out += 1;
                self.stats.bytes_out += bytes.len() as u64;
                self.out.push_back(Output::Send {
                    to,
                    addr,
                    msg: bytes,
                });
            }
            Err(e) => debug_assert!(false, "overlay built an unencodable {}: {e}", msg.label()),
        }
    }

    /// Asks supernode `to` to let this supernode join the tier; its `Welcome` and
    /// member list are accepted because of this request.
    fn send_join(&mut self, to: PeerKey, addr: SocketAddr) {
        let load = self.my_load();
        let Some(sn) = self.sn.as_mut() else { return };
        let incarnation = sn.members.incarnation();
        if !sn.join_sent.contains(&to) {
            if sn.join_sent.len() >= MAX_JOIN_SENT {
                sn.join_sent.remove(0);
            }
            sn.join_sent.push(to);
        }
        self.send(to, addr, &Msg::Join { incarnation, load });
    }

    fn stun(&mut self, now: Time, to: SocketAddr) {
        self.stun_pending
            .retain(|p| now.saturating_since(p.2) < STUN_TIMEOUT);
        if self.stun_pending.len() >= MAX_STUN_PENDING {
            return;
        }
        let mut txid = [0u8; 12];
        self.rng.fill_bytes(&mut txid);
        self.stun_pending.push((txid, to, now));
        self.stats.stun_requests += 1;
        self.out.push_back(Output::Stun { to, txid });
    }

    /// This supernode's load; its `clients` are the attachments it is asked for:
    /// one per client, plus the homes its clients lack. A client with one home
    /// because every other supernode is full is demand the tier cannot serve, so
    /// it counts towards promotion (three desktops sharing the same two of three
    /// full seeds would otherwise leave the fourth one home short, below the
    /// watermark, for good).
    fn my_load(&self) -> Load {
        Load {
            clients: self.sn.as_ref().map_or(0, |sn| {
                sn.clients.values().map(|c| 1 + c.missing_homes).sum()
            }),
            capacity: self.cfg.capacity.max_clients,
            score: self.policy.score(&self.capabilities(Time::ZERO)),
            pinned: self.role == Role::Supernode,
        }
    }

    fn capabilities(&self, now: Time) -> Capabilities {
        Capabilities {
            uptime_s: now
                .saturating_since(self.started)
                .as_secs()
                .min(u64::from(u32::MAX)) as u32,
            bandwidth_kbps: self.cfg.resources.bandwidth_kbps,
            cpu_headroom_pct: self.cfg.resources.cpu_headroom_pct,
            local: self
                .cfg
                .local_addrs
                .iter()
                .copied()
                .take(crate::msg::MAX_CANDIDATE_ADDRS)
                .collect(),
            reflexive: self.reflexive,
            recent: self
                .contacted
                .iter()
                .filter(|(_, t)| {
                    **t == Time::MAX || now.saturating_since(**t) < self.cfg.election.contact_memory
                })
                .map(|(k, _)| k.0)
                .take(crate::msg::MAX_CANDIDATE_RECENT)
                .collect(),
        }
    }

    // ---- records -----------------------------------------------------------------------

    fn sign_record(&mut self, now: Time, online: bool) -> Option<Vec<u8>> {
        // Sequence numbers follow the clock (µs), so a restarted node is never stale.
        self.seq = (self.seq + 1).max(now.as_micros());
        let mut endpoints = Vec::new();
        if online {
            for a in self.reflexive.iter().chain(self.cfg.local_addrs.iter()) {
                let usable = a.port() != 0 && !a.ip().is_unspecified();
                if usable && !endpoints.contains(a) && endpoints.len() < MAX_ENDPOINTS {
                    endpoints.push(*a);
                }
            }
        }
        let supernodes: Vec<HomeSupernode> = if !online {
            Vec::new()
        } else if let Some(sn) = self.sn.as_ref().filter(|sn| !sn.handoff) {
            sn.members
                .my_addr()
                .map(|addr| HomeSupernode { key: self.me, addr })
                .into_iter()
                .collect()
        } else {
            self.homes
                .iter()
                .take(MAX_SUPERNODES)
                .map(|h| HomeSupernode {
                    key: h.key,
                    addr: h.addr,
                })
                .collect()
        };
        let body = RecordBody {
            handle: self.cfg.handle.clone(),
            static_key: self.me,
            endpoints,
            supernodes,
        };
        let expires = (now + self.cfg.record_ttl).as_secs();
        Record::sign(&self.identity, self.seq, expires, &body).ok()
    }

    fn publish(&mut self, now: Time, online: bool) {
        if self.closing {
            return;
        }
        let is_super = self.is_supernode();
        if !is_super && self.homes.is_empty() {
            return;
        }
        let Some(bytes) = self.sign_record(now, online) else {
            return;
        };
        self.own_record = online.then(|| bytes.clone());
        self.stats.publishes += 1;
        if is_super {
            self.store_and_forward(now, bytes);
        } else {
            for h in self.homes.clone() {
                self.send(
                    h.key,
                    h.addr,
                    &Msg::Publish {
                        record: bytes.clone(),
                    },
                );
            }
        }
    }

    // ---- ordinary node: homes ------------------------------------------------------------

    fn maintain_homes(&mut self, now: Time) {
        if self.sn.is_some() || self.closing {
            return;
        }
        self.attaching.retain(|a| a.deadline > now);
        // Attaches that timed out count as failures (retain dropped them; the
        // failure memory below keeps them from being retried at once).
        // While every home leaves requests unanswered, a spare home is sought at
        // once, so lookups resume before the silent homes are declared dead.
        let spare =
            !self.homes.is_empty() && self.homes.iter().all(|h| h.waiting(now, HOME_SUSPECT));
        let target = HOME_TARGET + usize::from(spare);
        while self.homes.len() + self.attaching.len() < target {
            if now < self.next_attach && !spare {
                self.arm(Periodic::Attach, self.next_attach);
                break;
            }
            // Candidates are measured first, so the home chosen is the nearest
            // that answers (and one that answers: after a crash of supernodes,
            // a pick from the host cache alone may be dead and cost the whole
            // attach timeout).
            if self.probe_round(now) {
                self.arm(Periodic::Attach, self.probe_until);
                break;
            }
            let Some((key, addr)) = self.pick_attach_target(now) else {
                // Nothing to try: back off and look again.
                self.attach_failures += 1;
                self.next_attach = now
                    + backoff(
                        &mut self.rng,
                        self.attach_failures,
                        ATTACH_BACKOFF_BASE,
                        ATTACH_BACKOFF_CAP,
                        Duration::from_millis(100),
                    );
                self.arm(Periodic::Attach, self.next_attach);
                break;
            };
            if !self.start_attach(now, key, addr) {
                break;
            }
        }
        if !self.attaching.is_empty() {
            let first = self
                .attaching
                .iter()
                .map(|a| a.deadline)
                .min()
                .unwrap_or(now);
            self.arm(Periodic::Attach, first);
        }
    }

    /// The candidate with the lowest round trip measured lately, not a home,
    /// not being attached to and not failed recently.
    fn nearest_measured(&self, now: Time) -> Option<(Duration, PeerKey, SocketAddr)> {
        self.measured_candidates(now, RTT_FRESH).into_iter().next()
    }

    /// The candidates with a round trip measured lately (so alive), not homes,
    /// not being attached to and not failed recently, nearest first.
    fn measured_candidates(
        &self,
        now: Time,
        max_age: Duration,
    ) -> Vec<(Duration, PeerKey, SocketAddr)> {
        let mut all: Vec<(Duration, PeerKey, SocketAddr)> = self
            .attach_candidates()
            .iter()
            .filter(|h| {
                h.key != self.me
                    && !self.homes.iter().any(|x| x.key == h.key)
                    && !self.attaching.iter().any(|a| a.key == h.key)
                    && self
                        .failed
                        .get(&h.key)
                        .is_none_or(|&t| now.saturating_since(t) >= ATTACH_FAIL_MEMORY)
            })
            .filter_map(|h| {
                let l = self.latency.get(&h.key)?;
                let fresh = now.saturating_since(l.measured) < max_age;
                // Reported full lately: it would only redirect.
                let full = l.load.is_some_and(|(permille, at)| {
                    permille >= REDIRECT_ROOM_PERMILLE && now.saturating_since(at) < LOAD_HINT_FRESH
                });
                l.srtt
                    .filter(|_| fresh && !full)
                    .map(|rtt| (rtt, h.key, h.addr))
            })
            .collect();
        all.sort_unstable();
        all
    }

    fn pick_attach_target(&mut self, now: Time) -> Option<(PeerKey, SocketAddr)> {
        let busy = |o: &Overlay, k: &PeerKey| {
            *k == o.me
                || o.homes.iter().any(|h| h.key == *k)
                || o.attaching.iter().any(|a| a.key == *k)
        };
        let recently_failed = |o: &Overlay, k: &PeerKey| {
            o.failed
                .get(k)
                .is_some_and(|&t| now.saturating_since(t) < ATTACH_FAIL_MEMORY)
        };
        // Suggestions (where a redirect or a leaving home says there is room)
        // come first, the nearest of them first.
        let mut suggestions = std::mem::take(&mut self.suggestions);
        suggestions.retain(|s| {
            let k = PeerKey(s.key);
            !busy(self, &k) && !recently_failed(self, &k)
        });
        self.suggestions = suggestions;
        let nearest = (0..self.suggestions.len()).min_by_key(|&i| {
            let k = PeerKey(self.suggestions[i].key);
            (self.rtt_of(&k).unwrap_or(Duration::MAX), i)
        });
        if let Some(s) = nearest.and_then(|i| self.suggestions.remove(i)) {
            return Some((PeerKey(s.key), s.addr));
        }
        // Then a candidate that answered a probe lately: at random among those
        // within NEAR_SLACK of the nearest, so that nodes sharing a favourite
        // do not all queue at its admission bucket. A node that has lost its
        // homes (or whose homes fell silent) is one of many doing so at once
        // after a crash: any live candidate will do.
        let urgent = self.stats.homes_lost > 0
            && (self.homes.is_empty() || self.homes.iter().all(|h| h.waiting(now, HOME_SUSPECT)));
        let near = self.measured_candidates(now, RTT_FRESH);
        if let Some(&(best, _, _)) = near.first() {
            let slack = if urgent { Duration::MAX } else { NEAR_SLACK };
            let pool: Vec<&(Duration, PeerKey, SocketAddr)> = near
                .iter()
                .take_while(|c| c.0 <= best.saturating_add(slack))
                .collect();
            let (_, key, addr) = *pool[below(&mut self.rng, pool.len())];
            return Some((key, addr));
        }
        // A random pick among the most recently seen cache entries spreads load.
        let mut fresh: Vec<CachedHost> = self
            .host_cache
            .iter()
            .filter(|h| !busy(self, &h.key) && !recently_failed(self, &h.key))
            .copied()
            .collect();
        fresh.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.key.cmp(&b.key)));
        fresh.truncate(8);
        if !fresh.is_empty() {
            let h = fresh[below(&mut self.rng, fresh.len())];
            return Some((h.key, h.addr));
        }
        let seeds: Vec<(PeerKey, SocketAddr)> = self
            .bootstrap
            .iter()
            .filter_map(|b| b.key.map(|k| (k, b.addr)))
            .filter(|(k, _)| !busy(self, k))
            .collect();
        let untried: Vec<&(PeerKey, SocketAddr)> = seeds
            .iter()
            .filter(|(k, _)| !recently_failed(self, k))
            .collect();
        if !untried.is_empty() {
            return Some(*untried[below(&mut self.rng, untried.len())]);
        }
        if !seeds.is_empty() {
            return Some(seeds[below(&mut self.rng, seeds.len())]);
        }
        // Last resort: any cached host, even one that failed recently.
        let any: Vec<CachedHost> = self
            .host_cache
            .iter()
            .filter(|h| !busy(self, &h.key))
            .copied()
            .collect();
        if any.is_empty() {
            None
        } else {
            let h = any[below(&mut self.rng, any.len())];
            Some((h.key, h.addr))
        }
    }

    /// Supernodes to attach to: the host cache, then configured seeds with known
    /// keys that it lacks (as if seen long ago).
    fn attach_candidates(&self) -> Vec<CachedHost> {
        let mut all = self.host_cache.clone();
        for b in &self.bootstrap {
            if let Some(key) = b.key
                && !all.iter().any(|h| h.key == key)
            {
                all.push(CachedHost {
                    key,
                    addr: b.addr,
                    last_seen: Time::ZERO,
                });
            }
        }
        all
    }

    /// Sends an attach request to `key`; false if no record can be signed yet.
    fn start_attach(&mut self, now: Time, key: PeerKey, addr: SocketAddr) -> bool {
        let Some(record) = self.sign_record(now, true) else {
            return false;
        };
        self.stats.attach_attempts += 1;
        let deadline = now + ATTACH_TIMEOUT;
        self.attaching.push(Attaching { key, deadline });
        self.failed.insert(key, now);
        self.send(key, addr, &Msg::Attach { record });
        self.arm(Periodic::Attach, deadline);
        true
    }

    /// Every [`REHOME_INTERVAL`], while all homes answer and no attach is under
    /// way, probes [`REHOME_PROBES`] more candidates; [`PROBE_WAIT`] later attaches
    /// to the nearest candidate measured within [`REHOME_MEMORY`] if it beats the
    /// farthest home by [`REHOME_MIN_GAIN`]. The farthest home is let go once all
    /// answer (as a spare home is, in [`Self::ping_homes`]).
    fn rehome(&mut self, now: Time) {
        let settled = self.sn.is_none()
            && !self.closing
            && self.homes.len() == HOME_TARGET
            && self.attaching.is_empty()
            && self.homes.iter().all(|h| h.asked.is_none());
        if settled
            && self.rehome_probed.take().is_none()
            && self.send_probes(now, REHOME_PROBES, REHOME_MEMORY)
        {
            self.rehome_probed = Some(now);
            self.arm(Periodic::Rehome, now + PROBE_WAIT);
            return;
        }
        let far = self
            .homes
            .iter()
            .map(|h| self.rtt_of(&h.key))
            .try_fold(Duration::ZERO, |far, r| r.map(|r| far.max(r)));
        if settled
            && let Some(far) = far
            && let Some(&(rtt, key, addr)) = self.measured_candidates(now, REHOME_MEMORY).first()
            && rtt + REHOME_MIN_GAIN < far
        {
            self.stats.rehomes += 1;
            self.start_attach(now, key, addr);
        }
        let next = REHOME_INTERVAL / 2 + jitter(&mut self.rng, REHOME_INTERVAL);
        self.arm(Periodic::Rehome, now + next);
    }

    /// Starts a round of STUN probes to the most recently seen candidates whose
    /// round trip is not known lately; returns whether the caller should wait for
    /// the answers (a round is in flight and has time left).
    fn probe_round(&mut self, now: Time) -> bool {
        if now < self.probe_until {
            return true;
        }
        if self.send_probes(now, PROBE_FANOUT, RTT_FRESH) {
            self.probe_until = now + PROBE_WAIT;
            return true;
        }
        // Probes still out and no measured candidate left (the nearest was just
        // taken by another attach): wait for the next answer, the next nearest.
        let pending = self
            .probes
            .iter()
            .map(|p| p.sent + PROBE_WAIT)
            .filter(|&t| t > now)
            .max();
        if let Some(until) = pending
            && self.nearest_measured(now).is_none()
        {
            self.probe_until = until;
            return true;
        }
        false
    }

    /// Probes up to `fanout` candidates that did not answer within `stale` nor
    /// were probed within [`RTT_FRESH`]: for an attach the most recently seen first (likely alive);
    /// for re-homing (`stale` beyond [`RTT_FRESH`]) those measured longest ago
    /// first, so a small tier, all measured, is left alone. Whether any were.
    fn send_probes(&mut self, now: Time, fanout: usize, stale: Duration) -> bool {
        // Unanswered probes: those candidates are not chosen on latency.
        self.probes
            .retain(|p| now.saturating_since(p.sent) < STUN_TIMEOUT);
        let room = MAX_PROBES - self.probes.len().min(MAX_PROBES);
        let mut cands: Vec<CachedHost> = self
            .attach_candidates()
            .into_iter()
            .filter(|h| {
                h.key != self.me
                    && !self.homes.iter().any(|x| x.key == h.key)
                    && !self.attaching.iter().any(|a| a.key == h.key)
                    && self
                        .failed
                        .get(&h.key)
                        .is_none_or(|&t| now.saturating_since(t) >= ATTACH_FAIL_MEMORY)
                    && self.latency.get(&h.key).is_none_or(|l| {
                        now.saturating_since(l.measured) >= stale
                            && now.saturating_since(l.probed) >= RTT_FRESH
                    })
            })
            .collect();
        if cands.is_empty() || room == 0 {
            return false;
        }
        if stale > RTT_FRESH {
            let measured = |k: &PeerKey| self.latency.get(k).map_or(Time::ZERO, |l| l.measured);
            cands.sort_by(|a, b| {
                measured(&a.key)
                    .cmp(&measured(&b.key))
                    .then(a.key.cmp(&b.key))
            });
        } else {
            cands.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.key.cmp(&b.key)));
        }
        cands.truncate(fanout.min(room));
        if self.latency.len() >= 2 * HOST_CACHE_SIZE {
            let cache = &self.host_cache;
            self.latency
                .retain(|k, _| cache.iter().any(|h| h.key == *k));
        }
        for h in cands {
            let mut txid = [0u8; 12];
            self.rng.fill_bytes(&mut txid);
            self.probes.push(Probe {
                txid,
                key: h.key,
                addr: h.addr,
                sent: now,
            });
            let l = self.latency.entry(h.key).or_insert(Latency {
                srtt: None,
                measured: Time::ZERO,
                probed: now,
                load: None,
            });
            l.probed = now;
            // The probe opens a NAT mapping towards the candidate, as a session
            // would: it cannot dial this node back as a stranger for a while.
            if self.sn.is_none() {
                let t = self.contacted.entry(h.key).or_insert(now);
                if *t != Time::MAX {
                    *t = now;
                }
            }
            self.stats.stun_requests += 1;
            self.out.push_back(Output::Stun { to: h.addr, txid });
        }
        true
    }

    /// Folds a round-trip sample to supernode `key` into its estimate.
    fn note_rtt(&mut self, now: Time, key: PeerKey, sample: Duration) {
        let l = self.latency.entry(key).or_insert(Latency {
            srtt: None,
            measured: now,
            probed: Time::ZERO,
            load: None,
        });
        l.measured = now;
        l.srtt = Some(match l.srtt {
            None => sample,
            Some(s) => (s * (RTT_GAIN_DIVISOR - 1) + sample) / RTT_GAIN_DIVISOR,
        });
    }

    /// The smoothed round trip to `key`, if measured.
    fn rtt_of(&self, key: &PeerKey) -> Option<Duration> {
        self.latency.get(key).and_then(|l| l.srtt)
    }

    fn attach_failed(&mut self, now: Time, key: PeerKey) {
        self.failed.insert(key, now);
        self.attach_failures += 1;
        self.next_attach = now
            + backoff(
                &mut self.rng,
                self.attach_failures,
                ATTACH_BACKOFF_BASE,
                ATTACH_BACKOFF_CAP,
                Duration::from_millis(50),
            );
        self.arm(Periodic::Attach, self.next_attach);
    }

    fn remember_hosts(&mut self, now: Time, hosts: &[SnInfo]) {
        for s in hosts {
            let key = PeerKey(s.key);
            if key == self.me {
                continue;
            }
            self.latency
                .entry(key)
                .or_insert(Latency {
                    srtt: None,
                    measured: Time::ZERO,
                    probed: Time::ZERO,
                    load: None,
                })
                .load = Some((s.load_permille, now));
            match self.host_cache.iter_mut().find(|h| h.key == key) {
                Some(h) => {
                    h.addr = s.addr;
                    h.last_seen = now;
                }
                None => {
                    if self.host_cache.len() >= HOST_CACHE_SIZE {
                        // Evict the stalest.
                        if let Some(i) = self
                            .host_cache
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, h)| (h.last_seen, h.key))
                            .map(|(i, _)| i)
                        {
                            self.host_cache.swap_remove(i);
                        }
                    }
                    self.host_cache.push(CachedHost {
                        key,
                        addr: s.addr,
                        last_seen: now,
                    });
                }
            }
        }
    }

    fn on_attach_ok(
        &mut self,
        now: Time,
        from: PeerKey,
        addr: SocketAddr,
        observed: SocketAddr,
        sample: &[SnInfo],
    ) -> bool {
        let Some(i) = self.attaching.iter().position(|a| a.key == from) else {
            // Already a home (a repeated answer) is fine; anything else is not.
            return self.homes.iter().any(|h| h.key == from);
        };
        self.attaching.remove(i);
        self.failed.remove(&from);
        self.attach_failures = 0;
        self.redirects_followed = 0;
        self.homes.push(Home {
            key: from,
            addr,
            last_heard: now,
            asked: None,
            pinged: now,
            ping_sent: None,
        });
        self.remember_hosts(now, sample);
        self.remember_hosts(
            now,
            &[SnInfo {
                key: from.0,
                addr,
                load_permille: 0,
            }],
        );
        if self.reflexive.is_none() {
            self.set_reflexive(now, observed);
        }
        self.stun(now, addr);
        self.event(OverlayEvent::HomesChanged {
            homes: self.homes.iter().map(|h| h.key).collect(),
        });
        self.arm(Periodic::Publish, now + PUBLISH_DEBOUNCE);
        self.arm(Periodic::HomePing, now + HOME_PING_INTERVAL);
        let others_silent = self.homes[..self.homes.len() - 1]
            .iter()
            .all(|h| h.waiting(now, HOME_SUSPECT));
        if self.homes.len() == 1 || others_silent {
            // The only home that answers: it serves lookups and presence from now
            // on, and the lookups waiting (for a home, or on silent homes) go to it.
            if others_silent && self.homes.len() > 1 {
                // The answering home becomes the primary.
                let last = self.homes.len() - 1;
                self.homes.swap(0, last);
            }
            let contacts: Vec<UserId> = self.contacts.iter().copied().collect();
            self.send_subscriptions(now, &contacts);
            let pending: Vec<u32> = self.lookups.keys().copied().collect();
            for req in pending {
                self.send_lookup(now, req);
            }
        }
        self.maintain_homes(now);
        true
    }

    fn lose_home(&mut self, now: Time, i: usize, suggestions: &[SnInfo]) {
        let lost = self.homes.remove(i);
        self.stats.homes_lost += 1;
        self.failed.insert(lost.key, now);
        for s in suggestions.iter().rev() {
            self.suggestions.push_front(*s);
        }
        self.suggestions.truncate(MAX_SAMPLE);
        let delay = jitter(&mut self.rng, HOME_LOSS_JITTER);
        self.next_attach = self
            .next_attach
            .max(now + delay)
            .min(now + HOME_LOSS_JITTER);
        self.arm(Periodic::Attach, self.next_attach);
        self.event(OverlayEvent::HomesChanged {
            homes: self.homes.iter().map(|h| h.key).collect(),
        });
        if i == 0 && !self.homes.is_empty() {
            let contacts: Vec<UserId> = self.contacts.iter().copied().collect();
            self.send_subscriptions(now, &contacts);
        }
        self.arm(Periodic::Publish, now + PUBLISH_DEBOUNCE);
    }

    /// Pings each home every [`HOME_PING_INTERVAL`], and a home with a request
    /// unanswered every [`HOME_RETRY`]; a home that leaves a request unanswered
    /// for [`HOME_DEAD`] (or is silent for [`HOME_SILENCE`]) is lost.
    fn ping_homes(&mut self, now: Time) {
        if self.sn.is_some() {
            return;
        }
        let mut i = 0;
        while i < self.homes.len() {
            let h = self.homes[i];
            if h.waiting(now, HOME_DEAD) || now.saturating_since(h.last_heard) >= HOME_SILENCE {
                self.lose_home(now, i, &[]);
            } else {
                i += 1;
            }
        }
        if !self.homes.is_empty() && self.homes.iter().all(|h| h.waiting(now, HOME_SUSPECT)) {
            self.maintain_homes(now);
        }
        // A spare home taken while the others were silent is let go once all
        // answer again: the farthest goes.
        if self.homes.len() > HOME_TARGET && self.homes.iter().all(|h| h.asked.is_none()) {
            let far = (0..self.homes.len())
                .max_by_key(|&i| (self.rtt_of(&self.homes[i].key).unwrap_or(Duration::MAX), i));
            if let Some(i) = far {
                let h = self.homes.remove(i);
                self.send(h.key, h.addr, &Msg::Detach);
                self.event(OverlayEvent::HomesChanged {
                    homes: self.homes.iter().map(|h| h.key).collect(),
                });
                if i == 0 {
                    // The primary went: subscriptions move to the new one.
                    let contacts: Vec<UserId> = self.contacts.iter().copied().collect();
                    self.send_subscriptions(now, &contacts);
                }
                self.arm(Periodic::Publish, now + PUBLISH_DEBOUNCE);
            }
        }

        let mut next = Time::MAX;
        for i in 0..self.homes.len() {
            let h = self.homes[i];
            let due = if h.asked.is_some() {
                HOME_RETRY
            } else {
                HOME_PING_INTERVAL
            };
            if now.saturating_since(h.pinged) >= due {
                self.homes[i].pinged = now;
                self.homes[i].ping_sent = Some(now);
                self.homes[i].asked.get_or_insert(now);
                self.send(h.key, h.addr, &Msg::HomePing);
            }
            let h = self.homes[i];
            next = next.min(h.pinged + HOME_PING_INTERVAL);
            if let Some(a) = h.asked {
                next = next.min(h.pinged + HOME_RETRY).min(a + HOME_DEAD);
                if now < a + HOME_SUSPECT {
                    next = next.min(a + HOME_SUSPECT);
                }
            }
        }
        if next < Time::MAX {
            self.arm(Periodic::HomePing, next.max(now + Duration::from_millis(1)));
        }
    }

    fn heard_from_home(&mut self, now: Time, from: PeerKey) {
        if let Some(h) = self.homes.iter_mut().find(|h| h.key == from) {
            h.last_heard = now;
            h.asked = None;
        }
    }

    fn candidacy(&mut self, now: Time) {
        if self.role != Role::Auto || self.sn.is_some() {
            self.arm(Periodic::Candidate, now + CANDIDATE_INTERVAL);
            return;
        }
        if self.homes.is_empty() || self.reflexive.is_none() {
            // Not attached yet: a home could not validate the report.
            self.arm(Periodic::Candidate, now + CANDIDATE_SETTLE);
            return;
        }
        let memory = self.cfg.election.contact_memory;
        self.contacted
            .retain(|_, t| *t == Time::MAX || now.saturating_since(*t) < memory);
        // The supernodes in this report cannot dial the node back; once the
        // first of those merely probed or no longer in session is forgotten, it
        // can, so the next report goes out then rather than a whole interval on
        // (in a small tier those may be the only strangers).
        let fade = self
            .contacted
            .values()
            .filter(|t| **t != Time::MAX)
            .map(|t| *t + memory)
            .min();
        self.arm(
            Periodic::Candidate,
            fade.map_or(now + CANDIDATE_INTERVAL, |t| {
                t.min(now + CANDIDATE_INTERVAL)
            }),
        );
        if self.contacted.len() > crate::msg::MAX_CANDIDATE_RECENT {
            // The report could not name them all, and the tier might pick one
            // of the unnamed as the stranger to dial back: wait for the fade.
            return;
        }
        let caps = self.capabilities(now);
        if !self.policy.eligible(&caps, &self.cfg.election) {
            return;
        }
        let h = self.homes[0];
        self.send(h.key, h.addr, &Msg::Candidate(caps));
    }

    // ---- messages ------------------------------------------------------------------------------

    fn dispatch(&mut self, now: Time, from: PeerKey, addr: SocketAddr, msg: Msg) -> bool {
        self.heard_from_home(now, from);
        match msg {
            // Node side.
            Msg::AttachOk { observed, sample } => {
                self.on_attach_ok(now, from, addr, observed, &sample)
            }
            Msg::Redirect { others } => {
                let Some(i) = self.attaching.iter().position(|a| a.key == from) else {
                    return false;
                };
                self.attaching.remove(i);
                self.remember_hosts(now, &others);
                for s in others.iter().rev() {
                    self.suggestions.push_front(*s);
                }
                self.suggestions.truncate(MAX_SAMPLE);
                // A redirect naming supernodes with room is followed at once (a
                // few hops in a row), not after a back-off and without counting
                // as a failure: admission control spread the load, the
                // suggestions are where room is. Otherwise it is a failure.
                let room = others
                    .iter()
                    .any(|s| s.load_permille < REDIRECT_ROOM_PERMILLE);
                if room && self.redirects_followed < MAX_REDIRECT_FOLLOW {
                    self.redirects_followed += 1;
                    self.failed.insert(from, now);
                    self.next_attach = now + jitter(&mut self.rng, REDIRECT_FOLLOW_JITTER);
                    self.arm(Periodic::Attach, self.next_attach);
                } else {
                    self.redirects_followed = 0;
                    self.attach_failed(now, from);
                }
                true
            }
            Msg::Leave { others } => {
                self.remember_hosts(now, &others);
                match self.homes.iter().position(|h| h.key == from) {
                    Some(i) => {
                        self.lose_home(now, i, &others);
                        true
                    }
                    None => false,
                }
            }
            Msg::HomePong => {
                let Some(h) = self.homes.iter_mut().find(|h| h.key == from) else {
                    return false;
                };
                if let Some(sent) = h.ping_sent.take() {
                    self.note_rtt(now, from, now.saturating_since(sent));
                }
                true
            }
            Msg::HostSample { sample } => {
                if !self.homes.iter().any(|h| h.key == from) {
                    return false;
                }
                self.remember_hosts(now, &sample);
                true
            }
            Msg::LookupReply { req, hops, record } => {
                if !self.homes.iter().any(|h| h.key == from) {
                    return false;
                }
                self.on_lookup_reply(now, from, req, hops, record);
                true
            }
            Msg::Presence { record } => {
                if self.homes.first().is_some_and(|h| h.key == from) {
                    self.on_presence(now, &record);
                    true
                } else {
                    self.home_presence_from_storer(now, from, &record)
                }
            }
            Msg::Gone { user } => {
                if self.homes.first().is_some_and(|h| h.key == from) {
                    self.on_gone(UserId(user));
                    true
                } else {
                    self.home_gone_from_storer(now, from, UserId(user))
                }
            }
            Msg::Refused { user, reason } => self.on_refused(from, UserId(user), reason),
            Msg::Promote {
                epoch: _,
                candidate,
            } => self.on_promote(now, from, PeerKey(candidate)),
            // Supernode side.
            Msg::Attach { record } => self.on_attach(now, from, addr, &record),
            Msg::Detach => {
                let had = self
                    .sn
                    .as_ref()
                    .is_some_and(|sn| sn.clients.contains_key(&from));
                self.drop_client(now, from);
                had
            }
            Msg::HomePing => self.on_home_ping(now, from, addr),
            Msg::Publish { record } => self.on_publish(now, from, &record),
            Msg::Lookup { req, query } => self.on_client_lookup(now, from, req, query),
            Msg::Subscribe { users } => self.on_client_subscribe(now, from, &users),
            Msg::Unsubscribe { users } => self.on_unsubscribe(from, &users),
            Msg::Store { records } => self.on_store(now, from, &records),
            Msg::Fetch { req, query } => self.on_fetch(from, addr, req, &query),
            Msg::FetchReply { req, record } => self.on_fetch_reply(now, from, req, record),
            Msg::Watch { users } => self.on_watch(now, from, addr, &users),
            Msg::Join { incarnation, load } => self.on_join(now, from, addr, incarnation, load),
            Msg::Welcome {
                observed,
                incarnation,
            } => self.on_welcome(now, from, observed, incarnation),
            Msg::Members { members } => match self.sn.as_mut() {
                Some(sn)
                    if sn.members.is_live(&from)
                        || sn.join_sent.contains(&from)
                        || sn.joined_via.contains(&from)
                        || self.bootstrap.iter().any(|b| b.key == Some(from)) =>
                {
                    sn.members.apply_page(now, &members);
                    true
                }
                _ => false,
            },
            Msg::Ping { seq, gossip } => match self.sn.as_mut() {
                Some(sn) => {
                    sn.members.handle_ping(now, from, addr, seq, &gossip);
                    true
                }
                None => false,
            },
            Msg::Ack { seq, gossip } => match self.sn.as_mut() {
                Some(sn) => {
                    sn.members.handle_ack(now, from, seq, &gossip);
                    true
                }
                None => false,
            },
            Msg::PingReq {
                seq,
                target,
                addr: target_addr,
            } => match self.sn.as_mut() {
                Some(sn) => {
                    sn.members
                        .handle_ping_req(now, from, seq, PeerKey(target), target_addr);
                    true
                }
                None => false,
            },
            Msg::IndirectAck { seq } => match self.sn.as_mut() {
                Some(sn) => {
                    sn.members.handle_indirect_ack(seq);
                    true
                }
                None => false,
            },
            Msg::Candidate(caps) => self.on_candidate(now, from, addr, &caps),
            Msg::DialbackRequest { nonce, target } => {
                self.on_dialback_request(now, from, nonce, target)
            }
            Msg::DialbackResult { nonce, reachable } => {
                self.dialback_result(now, from, nonce, reachable)
            }
            Msg::Nominate {
                key,
                addr: cand_addr,
                score,
            } => self.on_nominate(now, from, PeerKey(key), cand_addr, score),
            Msg::Demote { epoch: _ } => self.on_demote(now, from),
            // Answered even when the asker is not (yet) in this view: it knows
            // this member, so it accepts the list, and the pull is what lets
            // sparse views converge. The list is no secret (host samples carry
            // parts of it), travels on an authenticated session (no reflection)
            // and is sent a few times per interval at most.
            Msg::Sync => match self.sn.as_mut() {
                Some(sn) if !sn.handoff => sn.members.handle_sync(now, from, addr),
                _ => false,
            },
        }
    }

    // ---- node side: presence -------------------------------------------------------------------

    fn on_presence(&mut self, now: Time, bytes: &[u8]) {
        let Ok(r) = Record::verify_at(bytes, now) else {
            self.stats.forged_records += 1;
            return;
        };
        let user = r.user_id();
        if !self.contacts.contains(&user) {
            return;
        }
        let online = !r.body.endpoints.is_empty();
        match self.presence.get(&user) {
            Some(p) if p.seq >= r.seq => return,
            _ => {}
        }
        self.presence
            .insert(user, PresenceState { seq: r.seq, online });
        self.note_seen(user, r.seq);
        self.event(OverlayEvent::Presence {
            user,
            online,
            record: Some(Box::new(r)),
        });
    }

    fn on_gone(&mut self, user: UserId) {
        if !self.contacts.contains(&user) {
            return;
        }
        let was = self.presence.get(&user).copied();
        if was.is_none_or(|p| p.online) {
            self.presence.insert(
                user,
                PresenceState {
                    seq: was.map_or(0, |p| p.seq),
                    online: false,
                },
            );
            self.event(OverlayEvent::Presence {
                user,
                online: false,
                record: None,
            });
        }
    }

    fn on_refused(&mut self, from: PeerKey, user: UserId, reason: Refusal) -> bool {
        if user == self.user && self.homes.iter().any(|h| h.key == from) {
            if let (Refusal::HandleTaken, Some(h)) = (reason, self.cfg.handle.clone()) {
                self.event(OverlayEvent::HandleRefused { handle: h });
            }
            return true;
        }
        // A home relays a storer's refusal to the client it concerns.
        let Some(sn) = self.sn.as_ref() else {
            return false;
        };
        if !sn.members.is_live(&from) {
            return false;
        }
        let target = sn
            .client_by_user
            .get(&user)
            .and_then(|k| sn.clients.get(k).map(|c| (*k, c.addr)));
        if let Some((k, a)) = target {
            self.send(
                k,
                a,
                &Msg::Refused {
                    user: user.0,
                    reason,
                },
            );
        } else if user == self.user
            && let (Refusal::HandleTaken, Some(h)) = (reason, self.cfg.handle.clone())
        {
            self.event(OverlayEvent::HandleRefused { handle: h });
        }
        true
    }

    // ---- supernode: becoming, leaving --------------------------------------------------------

    fn become_supernode(&mut self, now: Time) {
        let load = self.my_load();
        let mut members = Membership::new(self.me, 0, load, &mut self.rng);
        if let Some(a) = self.reflexive {
            members.set_my_addr(a);
        }
        let store = Store::new(KeyedState::new(&mut self.rng));
        let cap = self.cfg.capacity;
        let sn = Super {
            members,
            store,
            clients: map(&mut self.rng),
            client_by_user: map(&mut self.rng),
            admission: TokenBucket::new(cap.attach_rate, cap.attach_burst, now),
            fetches: map(&mut self.rng),
            next_fetch: 0,
            cache: map(&mut self.rng),
            watchers: map(&mut self.rng),
            watching: map(&mut self.rng),
            last_watch_renew: now,
            dialbacks: map(&mut self.rng),
            dial_tasks: map(&mut self.rng),
            dialback_bucket: TokenBucket::new(DIALBACK_RATE.0, DIALBACK_RATE.1, now),
            nominees: Vec::new(),
            promotions: VecDeque::new(),
            cooldown_until: now + ELECT_INTERVAL,
            joined: Vec::new(),
            join_sent: Vec::new(),
            departed: Vec::new(),
            suspected: Vec::new(),
            least_loaded: Vec::new(),
            placed: map(&mut self.rng),
            handoff: false,
            last_join: now,
            joined_via: self.homes.iter().map(|h| h.key).collect(),
        };
        self.sn = Some(Box::new(sn));
        // Join through every known supernode: the seeds, or the homes of a
        // promoted node.
        let mut via: Vec<(PeerKey, SocketAddr)> =
            self.homes.iter().map(|h| (h.key, h.addr)).collect();
        via.extend(
            self.bootstrap
                .iter()
                .filter_map(|b| b.key.map(|k| (k, b.addr))),
        );
        for (k, a) in via {
            self.send_join(k, a);
        }
        self.arm(Periodic::Probe, now + PROBE_INTERVAL);
        self.arm(Periodic::Maintain, now + MAINTAIN_INTERVAL);
        self.arm(Periodic::Elect, now + ELECT_INTERVAL);
        self.arm(Periodic::Publish, now + PUBLISH_DEBOUNCE);
    }

    /// A promotion: as the candidate's home, admit it and pass it on; as the
    /// candidate, become a supernode if the message comes from a home.
    fn on_promote(&mut self, now: Time, from: PeerKey, candidate: PeerKey) -> bool {
        if let Some(sn) = self.sn.as_mut() {
            if sn.handoff || (from != self.me && !sn.members.is_live(&from)) {
                return false;
            }
            let Some(c) = sn.clients.get(&candidate) else {
                return false;
            };
            let addr = c.addr;
            let load = Load {
                clients: 0,
                capacity: self.cfg.capacity.max_clients,
                score: 0,
                pinned: false,
            };
            // Admitted here too, so the candidate's join through this home is
            // accepted before the coordinator's gossip arrives.
            sn.members.admit(now, candidate, addr, 0, load);
            let epoch = now.as_secs() / EPOCH.as_secs();
            self.send(
                candidate,
                addr,
                &Msg::Promote {
                    epoch,
                    candidate: candidate.0,
                },
            );
            self.flush_membership(now);
            return true;
        }
        if self.role != Role::Auto || candidate != self.me {
            return false;
        }
        // Only a supernode this node knows may promote it.
        let Some(promoter) = self
            .homes
            .iter()
            .filter(|h| h.key == from)
            .map(|h| h.addr)
            .chain(
                self.host_cache
                    .iter()
                    .filter(|h| h.key == from)
                    .map(|h| h.addr),
            )
            .next()
        else {
            return false;
        };
        self.become_supernode(now);
        // The coordinator admitted this node already; its homes and the seeds may
        // not have heard yet and refuse the join. The coordinator answers at once.
        if self
            .sn
            .as_ref()
            .is_some_and(|sn| !sn.join_sent.contains(&from))
        {
            self.send_join(from, promoter);
        }
        self.event(OverlayEvent::RoleChanged { supernode: true });
        true
    }

    fn on_welcome(
        &mut self,
        now: Time,
        from: PeerKey,
        observed: SocketAddr,
        incarnation: u32,
    ) -> bool {
        let Some(sn) = self.sn.as_mut() else {
            return false;
        };
        // Only the answer to a join this node sent.
        if !sn.join_sent.contains(&from) {
            return false;
        }
        sn.members.handle_welcome(observed, incarnation);
        if self.reflexive.is_none() {
            self.reflexive = Some(observed);
        }
        // A promoted node no longer needs homes: it is its own, and follows its
        // contacts at their storers itself from now on.
        if !self.homes.is_empty() {
            for h in std::mem::take(&mut self.homes) {
                self.send(h.key, h.addr, &Msg::Detach);
            }
            self.event(OverlayEvent::HomesChanged { homes: Vec::new() });
            let contacts: Vec<UserId> = self.contacts.iter().copied().collect();
            self.send_subscriptions(now, &contacts);
        }
        self.arm(Periodic::Publish, now + PUBLISH_DEBOUNCE);
        true
    }

    fn on_join(
        &mut self,
        now: Time,
        from: PeerKey,
        addr: SocketAddr,
        incarnation: u32,
        load: Load,
    ) -> bool {
        let Some(sn) = self.sn.as_mut() else {
            return false;
        };
        if sn.handoff {
            return false;
        }
        // Eligibility is decided by the tier: only configured seeds and nodes the
        // membership already knows (promoted by the coordinator) may join.
        let known =
            sn.members.get(&from).is_some() || self.bootstrap.iter().any(|b| b.key == Some(from));
        if !known {
            return false;
        }
        sn.members.handle_join(now, from, addr, incarnation, load);
        if sn.members.my_addr().is_none() {
            // A seed that started before the others never had its own joins
            // answered, so it does not know the address the tier reaches it at and
            // cannot announce itself: the joiner would never learn of it. Joining
            // back gets it a `Welcome` with that address.
            self.send_join(from, addr);
        }
        true
    }

    fn on_demote(&mut self, now: Time, from: PeerKey) -> bool {
        let Some(sn) = self.sn.as_ref() else {
            return false;
        };
        if self.role == Role::Supernode || sn.handoff || !sn.members.is_live(&from) {
            return false;
        }
        self.handoff(now);
        true
    }

    /// Starts a hand-off: clients told to go, membership left, records pushed on.
    fn handoff(&mut self, now: Time) {
        let Some(mut sn) = self.sn.take() else { return };
        sn.handoff = true;
        let others = self.least_loaded(&sn, MAX_SAMPLE / 2);
        let clients: Vec<(PeerKey, SocketAddr)> =
            sn.clients.iter().map(|(k, c)| (*k, c.addr)).collect();
        for (k, a) in clients {
            self.send(
                k,
                a,
                &Msg::Leave {
                    others: others.clone(),
                },
            );
        }
        sn.members.leave(LEAVE_FANOUT, &mut self.rng);
        // Push every record to its storers in a view without this node.
        let mut batches: Map<PeerKey, Vec<Vec<u8>>> = map(&mut self.rng);
        let me = self.me;
        for (user, bytes) in sn.store.iter() {
            let mut targets = self.placement(&sn, user_obj(&user), &[me], &[]);
            if let Some(h) = view::handle(bytes) {
                targets.extend(self.placement(&sn, handle_obj(h), &[me], &[]));
            }
            targets.sort();
            targets.dedup();
            for t in targets {
                batches.entry(t).or_default().push(bytes.to_vec());
            }
        }
        self.sn = Some(sn);
        self.flush_batches(batches);
        self.suggestions = others.into_iter().collect();
        self.flush_membership(now);
        self.arm(Periodic::Handoff, now + HANDOFF_GRACE);
    }

    fn finish_handoff(&mut self, now: Time) {
        if self.sn.as_ref().is_none_or(|sn| !sn.handoff) {
            return;
        }
        self.sn = None;
        self.event(OverlayEvent::RoleChanged { supernode: false });
        self.next_attach = now;
        self.arm(Periodic::Attach, now);
    }

    // ---- supernode: membership plumbing -----------------------------------------------------

    fn flush_membership(&mut self, now: Time) {
        let Some(sn) = self.sn.as_mut() else { return };
        let out = std::mem::take(&mut sn.members.out);
        let changes = std::mem::take(&mut sn.members.changes);
        for c in &changes {
            match *c {
                Change::Up(k) => sn.joined.push(k),
                Change::Down(k) => sn.departed.push(k),
                Change::Suspect(k) => sn.suspected.push(k),
            }
        }
        for (to, addr, msg) in out {
            self.send(to, addr, &msg);
        }
        if !changes.is_empty() {
            self.arm(Periodic::Replicate, now + REPLICATE_DELAY);
        }
    }

    fn probe_tick(&mut self, now: Time) {
        let Some(sn) = self.sn.as_mut() else { return };
        sn.members.tick(now, &mut self.rng);
        let alone = sn.members.size() <= 1;
        let rejoin = alone && now.saturating_since(sn.last_join) >= REJOIN_INTERVAL && !sn.handoff;
        if rejoin {
            sn.last_join = now;
        }
        let load = self.my_load();
        if let Some(sn) = self.sn.as_mut() {
            sn.members.set_load(now, load);
        }
        if rejoin {
            for b in self.bootstrap.clone() {
                if let Some(k) = b.key {
                    self.send_join(k, b.addr);
                }
            }
        }
        self.flush_membership(now);
        self.arm(Periodic::Probe, now + PROBE_INTERVAL);
    }

    /// The `REPLICAS` members with the highest HRW score for `obj`: live members
    /// (minus `skip`) plus `extra`, plus this node unless it is leaving or skipped.
    fn placement(&self, sn: &Super, obj: u64, skip: &[PeerKey], extra: &[PeerKey]) -> Vec<PeerKey> {
        self.placement_by(sn, obj, |k| skip.contains(k), extra)
    }

    /// [`Self::placement`] skipping the members `skip` says (a set's lookup when
    /// the list is long: a tier forming reports hundreds of joins at once).
    fn placement_by(
        &self,
        sn: &Super,
        obj: u64,
        skip: impl Fn(&PeerKey) -> bool,
        extra: &[PeerKey],
    ) -> Vec<PeerKey> {
        let mut best: [(u64, PeerKey); REPLICAS] = [(0, PeerKey([0; 32])); REPLICAS];
        let mut n = 0usize;
        let mut consider = |score: u64, key: PeerKey| {
            let cand = (score, key);
            if n < REPLICAS {
                best[n] = cand;
                n += 1;
            } else if cand > best[REPLICAS - 1] {
                best[REPLICAS - 1] = cand;
            } else {
                return;
            }
            best[..n].sort_by(|a, b| b.cmp(a));
        };
        for m in sn.members.live() {
            if !skip(&m.key) {
                consider(mix64(obj ^ m.hrw), m.key);
            }
        }
        for k in extra {
            if !skip(k) && *k != self.me && !sn.members.is_live(k) {
                consider(mix64(obj ^ member_hrw(k)), *k);
            }
        }
        if !sn.members.is_leaving() && !sn.handoff && !skip(&self.me) {
            consider(mix64(obj ^ self.my_hrw), self.me);
        }
        best[..n].iter().map(|(_, k)| *k).collect()
    }

    fn storers_for_record(&self, sn: &Super, user: &UserId, bytes: &[u8]) -> Vec<PeerKey> {
        self.storers_skipping(sn, user, bytes, &[])
    }

    /// Whether a member with one of the HRW keys `joined` now ranks among the
    /// storers of the record `bytes` of `user` (by id or handle) above one of
    /// `stored_at`, the storers it was sent to.
    fn outranked(
        &self,
        user: &UserId,
        bytes: &[u8],
        stored_at: &[PeerKey],
        joined: &[u64],
    ) -> bool {
        if joined.is_empty() {
            return false;
        }
        let mut objs = std::iter::once(user_obj(user)).chain(view::handle(bytes).map(handle_obj));
        objs.any(|obj| {
            let last = last_score(obj, stored_at);
            joined.iter().any(|&h| mix64(obj ^ h) > last)
        })
    }

    /// [`Self::storers_for_record`] among the members not in `skip`.
    fn storers_skipping(
        &self,
        sn: &Super,
        user: &UserId,
        bytes: &[u8],
        skip: &[PeerKey],
    ) -> Vec<PeerKey> {
        let mut t = self.placement(sn, user_obj(user), skip, &[]);
        if let Some(h) = view::handle(bytes) {
            for k in self.placement(sn, handle_obj(h), skip, &[]) {
                if !t.contains(&k) {
                    t.push(k);
                }
            }
        }
        t
    }

    fn addr_of(&self, sn: &Super, key: &PeerKey) -> Option<SocketAddr> {
        sn.members.get(key).map(|m| m.addr)
    }

    fn flush_batches(&mut self, batches: Map<PeerKey, Vec<Vec<u8>>>) {
        let Some(sn) = self.sn.take() else { return };
        let mut targets: Vec<(PeerKey, Vec<Vec<u8>>)> = batches.into_iter().collect();
        targets.sort_by_key(|a| a.0);
        for (to, records) in targets {
            let Some(addr) = self.addr_of(&sn, &to) else {
                continue;
            };
            let mut batch: Vec<Vec<u8>> = Vec::new();
            let mut size = 16;
            for r in records {
                if !batch.is_empty()
                    && (size + r.len() + 3 > MAX_MSG_LEN || batch.len() >= MAX_STORE_BATCH)
                {
                    self.stats.replicated += batch.len() as u64;
                    self.send(
                        to,
                        addr,
                        &Msg::Store {
                            records: std::mem::take(&mut batch),
                        },
                    );
                    size = 16;
                }
                size += r.len() + 3;
                batch.push(r);
            }
            if !batch.is_empty() {
                self.stats.replicated += batch.len() as u64;
                self.send(to, addr, &Msg::Store { records: batch });
            }
        }
        self.sn = Some(sn);
    }

    /// Re-places records after membership changes: each record goes to storers that
    /// own it now but did not before. Only the best-ranked surviving old storer
    /// pushes, so a change costs one copy per new storer.
    fn replicate(&mut self, now: Time) {
        let Some(mut sn) = self.sn.take() else { return };
        let joined = std::mem::take(&mut sn.joined);
        let departed = std::mem::take(&mut sn.departed);
        // A key that came and went (or the reverse) in one batch nets out by state.
        let joined: Vec<PeerKey> = joined
            .into_iter()
            .filter(|k| sn.members.is_live(k))
            .collect();
        let departed: Vec<PeerKey> = departed
            .into_iter()
            .filter(|k| !sn.members.is_live(k))
            .collect();
        let suspected = std::mem::take(&mut sn.suspected);
        let suspects = sn.members.suspects();
        let newly_suspect = suspected.iter().any(|k| suspects.contains(k));
        let mut batches: Map<PeerKey, Vec<Vec<u8>>> = map(&mut self.rng);
        let mut local: Vec<Vec<u8>> = Vec::new();
        if sn.handoff || sn.members.is_leaving() {
            sn.placed.clear();
        } else if !joined.is_empty() || !departed.is_empty() {
            let changed: Vec<u64> = joined
                .iter()
                .chain(departed.iter())
                .map(member_hrw)
                .collect();
            let mut placed: Map<u64, u64> = map(&mut self.rng);
            let mut joined_set: Set<PeerKey> = set(&mut self.rng);
            joined_set.extend(joined.iter().copied());
            for (user, bytes) in sn.store.iter() {
                let mut objs = vec![user_obj(&user)];
                if let Some(h) = view::handle(bytes) {
                    objs.push(handle_obj(h));
                }
                for obj in objs {
                    // Unmoved unless a changed member scores at least the last
                    // storer did (ties count as moved).
                    if let Some(&last) = sn.placed.get(&obj)
                        && changed.iter().all(|&h| mix64(obj ^ h) < last)
                    {
                        placed.insert(obj, last);
                        continue;
                    }
                    let new = self.placement(&sn, obj, &[], &[]);
                    placed.insert(obj, last_score(obj, &new));
                    let old = self.placement_by(&sn, obj, |k| joined_set.contains(k), &departed);
                    let targets: Vec<PeerKey> = new
                        .iter()
                        .copied()
                        .filter(|k| !old.contains(k) && *k != self.me)
                        .collect();
                    if targets.is_empty() {
                        continue;
                    }
                    let pusher = new
                        .iter()
                        .find(|k| old.contains(k))
                        .copied()
                        .unwrap_or(self.me);
                    if pusher != self.me {
                        continue;
                    }
                    for t in targets {
                        batches.entry(t).or_default().push(bytes.to_vec());
                    }
                }
            }
            sn.placed = placed;
        }
        if !sn.handoff {
            // As home: after storers depart, or become suspect, each client's
            // record goes to the storers it has now (suspects skipped) that this
            // home has not sent it to. Storers that took over from departed ones
            // may never have had it (all of its storers may have died, at once or
            // one after the other), and waiting for suspects to be declared dead
            // would leave a record whose storers all died unreadable for the
            // whole suspicion timeout. A suspect that refutes keeps its copy; the
            // extra one expires.
            // After joins, too, where a member that joined outranks one it was
            // sent to: a home that placed it while its view was still filling in
            // (a young tier, a newly promoted home) sent it to storers a full view
            // does not name, and those do not push it on (they saw no join).
            if !departed.is_empty() || newly_suspect || !joined.is_empty() {
                let joined_hrw: Vec<u64> = joined.iter().map(member_hrw).collect();
                let keys: Vec<PeerKey> = sn.clients.keys().copied().collect();
                for k in keys {
                    let Some(c) = sn.clients.get(&k) else {
                        continue;
                    };
                    let moved = c.stored_at.is_empty()
                        || c.stored_at
                            .iter()
                            .any(|k| departed.contains(k) || suspects.contains(k))
                        || self.outranked(&c.user, &c.record, &c.stored_at, &joined_hrw);
                    if c.record.is_empty() || !moved {
                        continue;
                    }
                    let now_at = self.storers_skipping(&sn, &c.user, &c.record, &suspects);
                    for &t in &now_at {
                        if c.stored_at.contains(&t) {
                            continue;
                        }
                        if t == self.me {
                            local.push(c.record.clone());
                        } else {
                            batches.entry(t).or_default().push(c.record.clone());
                        }
                    }
                    if let Some(c) = sn.clients.get_mut(&k) {
                        c.stored_at = now_at;
                    }
                }
            }
        }
        // Homes re-point their watches at the new storers soon.
        if !joined.is_empty() || !departed.is_empty() {
            sn.last_watch_renew = Time::ZERO;
        }
        self.sn = Some(sn);
        let me = self.me;
        for bytes in local {
            self.store_one(now, me, &bytes);
        }
        self.flush_batches(batches);
        self.arm(Periodic::Maintain, now + REPLICATE_DELAY);
    }

    fn least_loaded(&self, sn: &Super, n: usize) -> Vec<SnInfo> {
        if !sn.least_loaded.is_empty() {
            return sn.least_loaded.iter().take(n).copied().collect();
        }
        let mut all: Vec<SnInfo> = sn
            .members
            .live()
            .filter(|m| m.state == crate::msg::MemberState::Alive)
            .map(|m| SnInfo {
                key: m.key.0,
                addr: m.addr,
                load_permille: m.load.permille(),
            })
            .collect();
        all.sort_by_key(|s| (s.load_permille, s.key));
        all.truncate(n);
        all
    }

    fn sample(&mut self, n: usize) -> Vec<SnInfo> {
        let Some(sn) = self.sn.as_ref() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Some(addr) = sn.members.my_addr() {
            out.push(SnInfo {
                key: self.me.0,
                addr,
                load_permille: self.my_load().permille(),
            });
        }
        out.extend(
            sn.members
                .random_live(n.saturating_sub(1), &mut self.rng)
                .into_iter()
                .map(|m| SnInfo {
                    key: m.key.0,
                    addr: m.addr,
                    load_permille: m.load.permille(),
                }),
        );
        out.truncate(n.min(MAX_SAMPLE));
        out
    }

    // ---- supernode: clients ----------------------------------------------------------------------

    fn on_attach(&mut self, now: Time, from: PeerKey, addr: SocketAddr, record: &[u8]) -> bool {
        if self.sn.as_ref().is_none_or(|sn| sn.handoff) {
            // Not (or no longer) a supernode: point the node at supernodes this node
            // knows, or stay silent (the attacher times out and backs off).
            let mut known: Vec<CachedHost> = self.host_cache.clone();
            known.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.key.cmp(&b.key)));
            let others: Vec<SnInfo> = match self.sn.as_ref() {
                Some(sn) => self.least_loaded(sn, 8),
                None => known
                    .iter()
                    .take(8)
                    .map(|h| SnInfo {
                        key: h.key.0,
                        addr: h.addr,
                        load_permille: 0,
                    })
                    .collect(),
            };
            if others.is_empty() {
                return false;
            }
            self.send(from, addr, &Msg::Redirect { others });
            return true;
        }
        let r = match Record::verify_at(record, now) {
            Ok(r) if r.body.static_key == from => r,
            Ok(_) | Err(_) => {
                self.stats.forged_records += 1;
                return false;
            }
        };
        let max = self.cfg.capacity.max_clients as usize;
        let Some(sn) = self.sn.as_mut() else {
            return false;
        };
        if !sn.clients.contains_key(&from) && (sn.clients.len() >= max || !sn.admission.take(now)) {
            self.stats.attaches_redirected += 1;
            // Sorted once per housekeeping period, then reused for every redirect.
            let fresh = {
                let sn = self.sn.as_ref().expect("checked above");
                sn.least_loaded
                    .is_empty()
                    .then(|| self.least_loaded(sn, MAX_SAMPLE))
            };
            if let (Some(list), Some(sn)) = (fresh, self.sn.as_mut()) {
                sn.least_loaded = list;
            }
            let mut pool = {
                let sn = self.sn.as_ref().expect("checked above");
                self.least_loaded(sn, MAX_SAMPLE)
            };
            let mut others = Vec::with_capacity(REDIRECT_SUGGESTIONS);
            while others.len() < REDIRECT_SUGGESTIONS && !pool.is_empty() {
                let k = below(&mut self.rng, pool.len());
                others.push(pool.swap_remove(k));
            }
            self.send(from, addr, &Msg::Redirect { others });
            return true;
        }
        let user = r.user_id();
        sn.client_by_user.insert(user, from);
        let fresh = !sn.clients.contains_key(&from);
        let c = sn.clients.entry(from).or_insert_with(|| Client {
            addr,
            user,
            record: Vec::new(),
            stored_at: Vec::new(),
            missing_homes: 0,
            lookups: TokenBucket::new(CLIENT_LOOKUP_RATE.0, CLIENT_LOOKUP_RATE.1, now),
            publishes: TokenBucket::new(CLIENT_PUBLISH_RATE.0, CLIENT_PUBLISH_RATE.1, now),
            subscribes: TokenBucket::new(CLIENT_SUBSCRIBE_RATE.0, CLIENT_SUBSCRIBE_RATE.1, now),
            subs: Vec::new(),
            last_sample: now,
        });
        if c.record.is_empty() || view::seq(&c.record) <= view::seq(record) {
            c.record = record.to_vec();
            c.missing_homes = missing_homes(&r, self.me);
        }
        if fresh {
            self.stats.attaches_admitted += 1;
        }
        let load = self.my_load();
        if let Some(sn) = self.sn.as_mut() {
            sn.members.set_load(now, load);
        }
        let sample = self.sample(SAMPLE_SIZE);
        self.send(
            from,
            addr,
            &Msg::AttachOk {
                observed: addr,
                sample,
            },
        );
        true
    }

    fn drop_client(&mut self, now: Time, peer: PeerKey) {
        let Some(sn) = self.sn.as_mut() else { return };
        let Some(c) = sn.clients.remove(&peer) else {
            return;
        };
        if sn.client_by_user.get(&c.user) == Some(&peer) {
            sn.client_by_user.remove(&c.user);
        }
        self.home_unsubscribe(peer, &c.subs);
        let load = self.my_load();
        if let Some(sn) = self.sn.as_mut() {
            sn.members.set_load(now, load);
        }
    }

    fn on_home_ping(&mut self, now: Time, from: PeerKey, addr: SocketAddr) -> bool {
        let Some(sn) = self.sn.as_mut() else {
            return false;
        };
        let Some(c) = sn.clients.get_mut(&from) else {
            // Not a client (any more): tell it to attach elsewhere.
            let others = self
                .sn
                .as_ref()
                .map_or_else(Vec::new, |sn| self.least_loaded(sn, 8));
            self.send(from, addr, &Msg::Leave { others });
            return true;
        };
        let sample_due = now.saturating_since(c.last_sample) >= HOST_SAMPLE_INTERVAL;
        if sample_due {
            c.last_sample = now;
        }
        self.send(from, addr, &Msg::HomePong);
        if sample_due {
            let sample = self.sample(SAMPLE_SIZE);
            self.send(from, addr, &Msg::HostSample { sample });
        }
        true
    }

    fn on_publish(&mut self, now: Time, from: PeerKey, bytes: &[u8]) -> bool {
        let Some(sn) = self.sn.as_mut() else {
            return false;
        };
        let Some(c) = sn.clients.get_mut(&from) else {
            return false;
        };
        if !c.publishes.take(now) {
            self.stats.rate_limited += 1;
            return true;
        }
        let user = c.user;
        match Record::verify_at(bytes, now) {
            Ok(r) if r.body.static_key == from && r.user_id() == user => {
                if c.record.is_empty() || view::seq(&c.record) <= r.seq {
                    c.record = bytes.to_vec();
                    let missing = missing_homes(&r, self.me);
                    if std::mem::replace(&mut c.missing_homes, missing) != missing {
                        let load = self.my_load();
                        if let Some(sn) = self.sn.as_mut() {
                            sn.members.set_load(now, load);
                        }
                    }
                }
                let storers = self.store_and_forward(now, bytes.to_vec());
                if let Some(c) = self.sn.as_mut().and_then(|sn| sn.clients.get_mut(&from)) {
                    c.stored_at = storers;
                }
            }
            Ok(_) | Err(_) => self.stats.forged_records += 1,
        }
        true
    }

    /// As home: caches a (verified) record and sends it to its storers, which it
    /// returns.
    fn store_and_forward(&mut self, now: Time, bytes: Vec<u8>) -> Vec<PeerKey> {
        let Some(user) = claimed_user(&bytes) else {
            return Vec::new();
        };
        let Some(sn) = self.sn.as_ref() else {
            return Vec::new();
        };
        let storers = self.storers_for_record(sn, &user, &bytes);
        for &s in &storers {
            if s == self.me {
                let me = self.me;
                self.store_one(now, me, &bytes);
            } else if let Some(addr) = self.sn.as_ref().and_then(|sn| self.addr_of(sn, &s)) {
                self.send(
                    s,
                    addr,
                    &Msg::Store {
                        records: vec![bytes.clone()],
                    },
                );
            }
        }
        self.home_update(now, user, &bytes);
        storers
    }

    /// As home: a newer record of `user` (verified) is cached and pushed to the
    /// clients following the user.
    fn home_update(&mut self, now: Time, user: UserId, bytes: &[u8]) {
        let Some(sn) = self.sn.as_ref() else { return };
        if sn
            .cache
            .get(&user)
            .is_some_and(|(b, _)| view::seq(b) >= view::seq(bytes))
        {
            return;
        }
        let subs = sn.watching.get(&user).cloned().unwrap_or_default();
        self.cache_put(now, user, bytes.to_vec());
        for s in subs {
            self.deliver_presence(now, s, user, Some(bytes));
        }
    }

    fn cache_put(&mut self, now: Time, user: UserId, bytes: Vec<u8>) {
        let Some(sn) = self.sn.as_mut() else { return };
        if sn.cache.len() >= MAX_CACHE && !sn.cache.contains_key(&user) {
            let secs = now.as_secs();
            sn.cache.retain(|_, (b, _)| view::expires(b) > secs);
            if sn.cache.len() >= MAX_CACHE {
                sn.cache.clear();
            }
        }
        match sn.cache.get(&user) {
            Some((b, _)) if view::seq(b) > view::seq(&bytes) => {}
            _ => {
                sn.cache.insert(user, (bytes, now));
            }
        }
    }

    // ---- supernode: storer ----------------------------------------------------------------------

    fn on_store(&mut self, now: Time, from: PeerKey, records: &[Vec<u8>]) -> bool {
        if self.sn.as_ref().is_none_or(|sn| !sn.members.is_live(&from)) {
            return false;
        }
        for bytes in records {
            self.store_one(now, from, bytes);
        }
        true
    }

    /// Stores one record sent by `from` (a member, or this node).
    fn store_one(&mut self, now: Time, from: PeerKey, bytes: &[u8]) {
        let Some(user) = claimed_user(bytes) else {
            self.stats.forged_records += 1;
            return;
        };
        let Some(sn) = self.sn.as_mut() else { return };
        // Cheap check first: a stale record costs no signature verification.
        if bytes.len() > 49
            && sn
                .store
                .get(&user)
                .is_some_and(|held| view::seq(held) >= view::seq(bytes))
        {
            self.stats.stale_records += 1;
            return;
        }
        let r = match Record::verify_at(bytes, now) {
            Ok(r) => r,
            Err(peercall_crypto::RecordError::Expired(_)) => {
                self.stats.stale_records += 1;
                return;
            }
            Err(_) => {
                self.stats.forged_records += 1;
                return;
            }
        };
        debug_assert_eq!(r.user_id(), user);
        match sn.store.insert(now, user, bytes) {
            Ok(Stored::New) | Ok(Stored::Replaced { changed: true }) => {
                self.notify_watchers(now, user, bytes)
            }
            Ok(Stored::Replaced { changed: false }) => {}
            Err(StoreError::HandleTaken) => {
                self.stats.handle_conflicts += 1;
                if from == self.me {
                    self.on_refused(self.me, user, Refusal::HandleTaken);
                } else if let Some(addr) = self.sn.as_ref().and_then(|sn| self.addr_of(sn, &from)) {
                    self.send(
                        from,
                        addr,
                        &Msg::Refused {
                            user: user.0,
                            reason: Refusal::HandleTaken,
                        },
                    );
                }
            }
            Err(_) => self.stats.stale_records += 1,
        }
    }

    fn notify_watchers(&mut self, now: Time, user: UserId, bytes: &[u8]) {
        let Some(sn) = self.sn.as_ref() else { return };
        let Some(ws) = sn.watchers.get(&user) else {
            return;
        };
        let targets: Vec<(PeerKey, Option<SocketAddr>)> = ws
            .iter()
            .filter(|(_, lease)| *lease > now)
            .map(|(k, _)| (*k, self.addr_of(sn, k)))
            .collect();
        for (k, addr) in targets {
            self.stats.presence_pushes += 1;
            if k == self.me {
                let me = self.me;
                self.home_presence_from_storer(now, me, bytes);
            } else if let Some(a) = addr {
                self.send(
                    k,
                    a,
                    &Msg::Presence {
                        record: bytes.to_vec(),
                    },
                );
            }
        }
    }

    fn on_fetch(&mut self, from: PeerKey, addr: SocketAddr, req: u32, query: &Query) -> bool {
        let Some(sn) = self.sn.as_ref() else {
            return false;
        };
        if !sn.members.is_live(&from) {
            return false;
        }
        let record = Self::read_local(sn, query);
        self.send(from, addr, &Msg::FetchReply { req, record });
        true
    }

    fn read_local(sn: &Super, query: &Query) -> Option<Vec<u8>> {
        match query {
            Query::User(u) => sn.store.get(&UserId(*u)).map(<[u8]>::to_vec),
            Query::Handle(h) => sn.store.get_by_handle(h).map(|(_, b)| b.to_vec()),
        }
    }

    fn on_watch(&mut self, now: Time, from: PeerKey, addr: SocketAddr, users: &[Id]) -> bool {
        let Some(sn) = self.sn.as_mut() else {
            return false;
        };
        if !sn.members.is_live(&from) && from != self.me {
            return false;
        }
        let lease = now + WATCH_LEASE;
        let mut initial = Vec::new();
        for u in users {
            let user = UserId(*u);
            let ws = sn.watchers.entry(user).or_default();
            match ws.iter().position(|(k, _)| *k == from) {
                Some(i) => ws[i].1 = lease,
                None if ws.len() < MAX_WATCHERS_PER_USER => {
                    ws.push((from, lease));
                    if let Some(b) = sn.store.get(&user) {
                        initial.push(b.to_vec());
                    }
                }
                None => {}
            }
        }
        for b in initial {
            if from == self.me {
                let me = self.me;
                self.home_presence_from_storer(now, me, &b);
            } else {
                self.send(from, addr, &Msg::Presence { record: b });
            }
        }
        true
    }

    // ---- supernode: home side of lookups and presence --------------------------------------------

    fn on_client_lookup(&mut self, now: Time, from: PeerKey, req: u32, query: Query) -> bool {
        let Some(sn) = self.sn.as_mut() else {
            return false;
        };
        let Some(c) = sn.clients.get_mut(&from) else {
            return false;
        };
        if !c.lookups.take(now) {
            self.stats.rate_limited += 1;
            return true;
        }
        if let Query::Handle(h) = &query
            && Handle::new(h).is_err()
        {
            let addr = c.addr;
            self.send(
                from,
                addr,
                &Msg::LookupReply {
                    req,
                    hops: 0,
                    record: None,
                },
            );
            return true;
        }
        self.start_fetch(now, Origin::Client(from, req), query);
        true
    }

    fn start_fetch(&mut self, now: Time, origin: Origin, query: Query) {
        let Some(sn) = self.sn.as_ref() else { return };
        // Served from the cache when fresh: watched users are kept fresh by pushes.
        if let Query::User(u) = &query {
            let user = UserId(*u);
            if let Some((bytes, at)) = sn.cache.get(&user)
                && view::expires(bytes) > now.as_secs()
                && (now.saturating_since(*at) < CACHE_FRESH || sn.watching.contains_key(&user))
            {
                // Not `answer`: that would re-date the cached copy, and a record
                // looked up more often than `CACHE_FRESH` would never be fetched
                // again (a re-published record would stay unseen until expiry).
                let bytes = bytes.clone();
                self.reply(now, origin, 0, Some(bytes));
                return;
            }
        }
        let obj = match &query {
            Query::User(u) => prefix64(u),
            Query::Handle(h) => handle_obj(h),
        };
        // The storers, and while some of them are suspect the live ones ranked
        // next too: that is where their homes re-store records at once.
        let mut storers = self.placement(sn, obj, &[], &[]);
        let suspects = sn.members.suspects();
        if storers.iter().any(|k| suspects.contains(k)) {
            for k in self.placement(sn, obj, &suspects, &[]) {
                if !storers.contains(&k) {
                    storers.push(k);
                }
            }
        }
        let Some(sn) = self.sn.as_mut() else { return };
        sn.next_fetch = sn.next_fetch.wrapping_add(1);
        let req = sn.next_fetch;
        let deadline = now + FETCH_TIMEOUT;
        sn.fetches.insert(
            req,
            Fetch {
                origin,
                query: query.clone(),
                storers: storers.clone(),
                replied: Vec::new(),
                best: None,
                answered: false,
                widened: false,
                deadline,
            },
        );
        self.timers.push(deadline, Timer::Fetch(req));
        self.timers.push(now + FETCH_WIDEN, Timer::Fetch(req));
        for s in storers {
            if s == self.me {
                let local = self.sn.as_ref().and_then(|sn| Self::read_local(sn, &query));
                let me = self.me;
                self.on_fetch_reply(now, me, req, local);
            } else if let Some(addr) = self.sn.as_ref().and_then(|sn| self.addr_of(sn, &s)) {
                self.stats.fetches += 1;
                self.send(
                    s,
                    addr,
                    &Msg::Fetch {
                        req,
                        query: query.clone(),
                    },
                );
            }
        }
    }

    fn on_fetch_reply(
        &mut self,
        now: Time,
        from: PeerKey,
        req: u32,
        record: Option<Vec<u8>>,
    ) -> bool {
        let Some(sn) = self.sn.as_mut() else {
            return false;
        };
        let Some(f) = sn.fetches.get_mut(&req) else {
            return false;
        };
        if !f.storers.contains(&from) || f.replied.iter().any(|(k, _)| *k == from) {
            return false;
        }
        let valid = record.and_then(|b| match Record::verify_at(&b, now) {
            Ok(r) if matches(&f.query, &r) => Some((r.seq, b)),
            _ => {
                self.stats.forged_records += 1;
                None
            }
        });
        f.replied.push((from, valid.as_ref().map(|(s, _)| *s)));
        if let Some((seq, b)) = valid
            && f.best.as_ref().is_none_or(|cur| view::seq(cur) < seq)
        {
            f.best = Some(b);
        }
        let mut done = f.replied.len() >= f.storers.len();
        let mut local_next = None;
        if done && f.best.is_none() && !f.widened {
            // Every storer missed: right after members joined, the record may
            // still sit only at the storers ranked next (re-replication is under
            // way), so they are asked before the answer is "not found".
            local_next = self.widen_fetch(now, req);
            done = self
                .sn
                .as_ref()
                .and_then(|sn| sn.fetches.get(&req))
                .is_none_or(|f| f.replied.len() >= f.storers.len());
        }
        let Some(f) = self.sn.as_mut().and_then(|sn| sn.fetches.get_mut(&req)) else {
            return true;
        };
        let answer = if !f.answered && f.best.is_some() {
            f.answered = true;
            Some((f.origin, f.best.clone()))
        } else {
            None
        };
        if let Some((origin, best)) = answer {
            let hops = u8::from(from != self.me);
            self.answer(now, origin, hops, best);
        }
        if done {
            self.finish_fetch(now, req);
        }
        if let Some(query) = local_next {
            let local = self.sn.as_ref().and_then(|sn| Self::read_local(sn, &query));
            let me = self.me;
            self.on_fetch_reply(now, me, req, local);
        }
        true
    }

    /// Asks the storers ranked after those asked (once per fetch); returns the
    /// query if this node is one of them (the caller reads its own share).
    fn widen_fetch(&mut self, now: Time, req: u32) -> Option<Query> {
        let sn = self.sn.as_mut()?;
        let f = sn.fetches.get_mut(&req)?;
        if f.widened || f.answered {
            return None;
        }
        f.widened = true;
        let (query, asked) = (f.query.clone(), f.storers.clone());
        let obj = match &query {
            Query::User(u) => prefix64(u),
            Query::Handle(h) => handle_obj(h),
        };
        // Where the record sat before the latest joins: when the tier grows by
        // many members at once, its old storers may rank below the next few, and
        // they hold it until re-replication (batched, over new sessions) is done.
        let recent = self.sn.as_ref()?.members.alive_since(now - RECENT_JOIN);
        let mut skip: Set<PeerKey> = set(&mut self.rng);
        let sn = self.sn.as_ref()?;
        let mut next = self.placement(sn, obj, &asked, &[]);
        if !recent.is_empty() {
            skip.extend(recent.into_iter().chain(asked.iter().copied()));
            for k in self.placement_by(sn, obj, |k| skip.contains(k), &[]) {
                if !next.contains(&k) {
                    next.push(k);
                }
            }
        }
        if let Some(f) = self.sn.as_mut().and_then(|sn| sn.fetches.get_mut(&req)) {
            f.storers.extend(next.iter().copied());
        }
        let mut local = None;
        for k in next {
            if k == self.me {
                local = Some(query.clone());
            } else if let Some(addr) = self.sn.as_ref().and_then(|sn| self.addr_of(sn, &k)) {
                self.stats.fetches += 1;
                self.send(
                    k,
                    addr,
                    &Msg::Fetch {
                        req,
                        query: query.clone(),
                    },
                );
            }
        }
        local
    }

    /// Ends a fetch: answers "not found" if nothing came, and read-repairs storers
    /// that answered with nothing or an older record.
    fn finish_fetch(&mut self, now: Time, req: u32) {
        let Some(sn) = self.sn.as_mut() else { return };
        let Some(f) = sn.fetches.remove(&req) else {
            return;
        };
        if !f.answered {
            self.answer(now, f.origin, 1, None);
        }
        let Some(best) = f.best else { return };
        // The first reply answered; the newest of all of them is what the cache
        // keeps (it may be newer than the first).
        if let Some(user) = claimed_user(&best) {
            self.cache_put(now, user, best.clone());
        }
        let seq = view::seq(&best);
        for (k, held) in f.replied {
            if held.is_none_or(|s| s < seq) {
                self.stats.read_repairs += 1;
                if k == self.me {
                    let me = self.me;
                    self.store_one(now, me, &best);
                } else if let Some(addr) = self.sn.as_ref().and_then(|sn| self.addr_of(sn, &k)) {
                    self.send(
                        k,
                        addr,
                        &Msg::Store {
                            records: vec![best.clone()],
                        },
                    );
                }
            }
        }
    }

    /// Answers a lookup; `hops` counts the overlay hops beyond this home it took
    /// (0 from its cache or its own share, 1 from another storer).
    fn answer(&mut self, now: Time, origin: Origin, hops: u8, record: Option<Vec<u8>>) {
        if let Some(b) = &record
            && let Some(user) = claimed_user(b)
        {
            self.cache_put(now, user, b.clone());
        }
        self.reply(now, origin, hops, record);
    }

    /// Sends `record` to whoever asked; `hops` as for [`Self::answer`].
    fn reply(&mut self, now: Time, origin: Origin, hops: u8, record: Option<Vec<u8>>) {
        match origin {
            Origin::Client(k, req) => {
                let addr = self
                    .sn
                    .as_ref()
                    .and_then(|sn| sn.clients.get(&k).map(|c| c.addr));
                if let Some(a) = addr {
                    self.send(k, a, &Msg::LookupReply { req, hops, record });
                }
            }
            Origin::Local(req) => self.on_lookup_reply(now, self.me, req, hops, record),
            Origin::Presence(user) => {
                let subs = self
                    .sn
                    .as_ref()
                    .and_then(|sn| sn.watching.get(&user).cloned())
                    .unwrap_or_default();
                for s in subs {
                    self.deliver_presence(now, s, user, record.as_deref());
                }
            }
        }
    }

    fn deliver_presence(&mut self, now: Time, sub: PeerKey, user: UserId, record: Option<&[u8]>) {
        if sub == self.me {
            match record {
                Some(b) => self.on_presence(now, b),
                None => self.on_gone(user),
            }
            return;
        }
        let Some(addr) = self
            .sn
            .as_ref()
            .and_then(|sn| sn.clients.get(&sub).map(|c| c.addr))
        else {
            return;
        };
        self.stats.presence_pushes += 1;
        match record {
            Some(b) => self.send(sub, addr, &Msg::Presence { record: b.to_vec() }),
            None => self.send(sub, addr, &Msg::Gone { user: user.0 }),
        }
    }

    fn on_client_subscribe(&mut self, now: Time, from: PeerKey, users: &[Id]) -> bool {
        let Some(sn) = self.sn.as_mut() else {
            return false;
        };
        let Some(c) = sn.clients.get_mut(&from) else {
            return false;
        };
        if !c.subscribes.take(now) {
            self.stats.rate_limited += 1;
            return true;
        }
        let users: Vec<UserId> = users.iter().map(|u| UserId(*u)).collect();
        self.home_subscribe(now, from, &users);
        true
    }

    fn home_subscribe(&mut self, now: Time, sub: PeerKey, users: &[UserId]) {
        let me = self.me;
        let Some(sn) = self.sn.as_mut() else { return };
        let mut new_watches = Vec::new();
        let mut known = Vec::new();
        for &u in users {
            if sub != me {
                let Some(c) = sn.clients.get_mut(&sub) else {
                    return;
                };
                if c.subs.contains(&u) {
                    continue;
                }
                if c.subs.len() >= MAX_SUBSCRIPTIONS {
                    break;
                }
                c.subs.push(u);
            }
            let w = sn.watching.entry(u).or_default();
            if !w.contains(&sub) {
                w.push(sub);
            }
            if w.len() == 1 {
                new_watches.push(u);
            } else if let Some((b, _)) = sn.cache.get(&u) {
                known.push((u, b.clone()));
            }
        }
        for (u, b) in known {
            self.deliver_presence(now, sub, u, Some(&b));
        }
        self.send_watches(now, &new_watches);
        for u in new_watches {
            self.start_fetch(now, Origin::Presence(u), Query::User(u.0));
        }
    }

    fn send_watches(&mut self, now: Time, users: &[UserId]) {
        let Some(sn) = self.sn.as_ref() else { return };
        let mut per: std::collections::BTreeMap<PeerKey, Vec<Id>> =
            std::collections::BTreeMap::new();
        for u in users {
            for s in self.placement(sn, user_obj(u), &[], &[]) {
                per.entry(s).or_default().push(u.0);
            }
        }
        for (s, ids) in per {
            for chunk in ids.chunks(MAX_IDS) {
                if s == self.me {
                    let me = self.me;
                    self.on_watch(now, me, SocketAddr::from(([127, 0, 0, 1], 1)), chunk);
                } else if let Some(addr) = self.sn.as_ref().and_then(|sn| self.addr_of(sn, &s)) {
                    self.send(
                        s,
                        addr,
                        &Msg::Watch {
                            users: chunk.to_vec(),
                        },
                    );
                }
            }
        }
    }

    fn on_unsubscribe(&mut self, from: PeerKey, users: &[Id]) -> bool {
        let Some(sn) = self.sn.as_mut() else {
            return false;
        };
        let Some(c) = sn.clients.get_mut(&from) else {
            return false;
        };
        let users: Vec<UserId> = users.iter().map(|u| UserId(*u)).collect();
        c.subs.retain(|u| !users.contains(u));
        self.home_unsubscribe(from, &users);
        true
    }

    fn home_unsubscribe(&mut self, sub: PeerKey, users: &[UserId]) {
        let Some(sn) = self.sn.as_mut() else { return };
        for u in users {
            if let Some(w) = sn.watching.get_mut(u) {
                w.retain(|k| *k != sub);
                if w.is_empty() {
                    sn.watching.remove(u);
                }
            }
        }
    }

    fn home_presence_from_storer(&mut self, now: Time, from: PeerKey, bytes: &[u8]) -> bool {
        let Some(sn) = self.sn.as_ref() else {
            return false;
        };
        if from != self.me && !sn.members.is_live(&from) {
            return false;
        }
        let Some(user) = claimed_user(bytes) else {
            return false;
        };
        if !sn.watching.contains_key(&user)
            || sn
                .cache
                .get(&user)
                .is_some_and(|(b, _)| view::seq(b) >= view::seq(bytes))
        {
            return true;
        }
        if Record::verify_at(bytes, now).is_err() {
            self.stats.forged_records += 1;
            return true;
        }
        self.home_update(now, user, bytes);
        true
    }

    fn home_gone_from_storer(&mut self, now: Time, from: PeerKey, user: UserId) -> bool {
        let Some(sn) = self.sn.as_mut() else {
            return false;
        };
        if from != self.me && !sn.members.is_live(&from) {
            return false;
        }
        if sn
            .cache
            .get(&user)
            .is_some_and(|(b, _)| view::expires(b) > now.as_secs())
        {
            return true;
        }
        sn.cache.remove(&user);
        let subs = sn.watching.get(&user).cloned().unwrap_or_default();
        for s in subs {
            self.deliver_presence(now, s, user, None);
        }
        true
    }

    // ---- supernode: housekeeping ------------------------------------------------------------------

    fn maintain(&mut self, now: Time) {
        if self.sn.is_none() {
            return;
        }
        self.arm(Periodic::Maintain, now + MAINTAIN_INTERVAL);
        let sn = self.sn.as_mut().expect("checked above");
        // Expiry: storers tell watching homes the user is gone.
        let mut gone = Vec::new();
        sn.store.purge_expired(now, &mut gone);
        self.stats.expired += gone.len() as u64;
        let mut notices: Vec<(PeerKey, UserId)> = Vec::new();
        for u in &gone {
            if let Some(ws) = sn.watchers.get(u) {
                notices.extend(ws.iter().filter(|(_, l)| *l > now).map(|(k, _)| (*k, *u)));
            }
        }
        sn.watchers.retain(|_, ws| {
            ws.retain(|(_, l)| *l > now);
            !ws.is_empty()
        });
        let secs = now.as_secs();
        let expired_cache: Vec<UserId> = sn
            .cache
            .iter()
            .filter(|(_, (b, _))| view::expires(b) <= secs)
            .map(|(u, _)| *u)
            .collect();
        for u in &expired_cache {
            sn.cache.remove(u);
        }
        sn.least_loaded.clear();
        let renew = now.saturating_since(sn.last_watch_renew) >= WATCH_RENEW;
        if renew {
            sn.last_watch_renew = now;
        }
        let watched: Vec<UserId> = if renew {
            sn.watching.keys().copied().collect()
        } else {
            Vec::new()
        };
        // Users whose cached record expired are gone for subscribers.
        let lapsed: Vec<UserId> = expired_cache
            .into_iter()
            .filter(|u| sn.watching.contains_key(u))
            .collect();
        for (k, u) in notices {
            if k == self.me {
                let me = self.me;
                self.home_gone_from_storer(now, me, u);
            } else if let Some(addr) = self.sn.as_ref().and_then(|sn| self.addr_of(sn, &k)) {
                self.send(k, addr, &Msg::Gone { user: u.0 });
            }
        }
        for u in lapsed {
            let subs = self
                .sn
                .as_ref()
                .and_then(|sn| sn.watching.get(&u).cloned())
                .unwrap_or_default();
            for s in subs {
                self.deliver_presence(now, s, u, None);
            }
        }
        if renew {
            self.send_watches(now, &watched);
        }
        self.expire_dial_state(now);
    }

    fn expire_dial_state(&mut self, now: Time) {
        let Some(sn) = self.sn.as_mut() else { return };
        sn.nominees
            .retain(|n| now.saturating_since(n.at) < NOMINATION_TTL);
        while sn
            .promotions
            .front()
            .is_some_and(|&t| now.saturating_since(t) >= Duration::from_secs(60))
        {
            sn.promotions.pop_front();
        }
    }

    // ---- election --------------------------------------------------------------------------------

    fn on_candidate(
        &mut self,
        now: Time,
        from: PeerKey,
        addr: SocketAddr,
        caps: &Capabilities,
    ) -> bool {
        let Some(sn) = self.sn.as_ref() else {
            return false;
        };
        if !sn.clients.contains_key(&from) || sn.handoff {
            return false;
        }
        if !self.policy.eligible(caps, &self.cfg.election) || caps.reflexive != Some(addr) {
            // Below the minimums, or behind a NAT that maps it elsewhere.
            return true;
        }
        if sn.dialbacks.len() >= MAX_DIALBACKS || sn.dialbacks.values().any(|d| d.candidate == from)
        {
            return true;
        }
        // A dialer on another IP than this home and the candidate, which the
        // candidate has never contacted (it is not one of its homes).
        let my_ip = sn.members.my_addr().map(|a| a.ip());
        // The supernodes the candidate talks to (its homes, from its signed record)
        // have NAT mappings open towards them: they cannot judge reachability.
        let contacted: Vec<PeerKey> = sn
            .clients
            .get(&from)
            .and_then(|c| sn.cache.get(&c.user))
            .and_then(|(b, _)| Record::verify(b).ok())
            .map(|r| r.body.supernodes.iter().map(|h| h.key).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .chain(caps.recent.iter().map(|k| PeerKey(*k)))
            .collect();
        let dialers: Vec<(PeerKey, SocketAddr)> = sn
            .members
            .live()
            .filter(|m| m.state == crate::msg::MemberState::Alive)
            .filter(|m| Some(m.addr.ip()) != my_ip && m.addr.ip() != addr.ip())
            .filter(|m| !contacted.contains(&m.key))
            .map(|m| (m.key, m.addr))
            .collect();
        if dialers.is_empty() {
            return true;
        }
        let (dialer, dialer_addr) = dialers[below(&mut self.rng, dialers.len())];
        let mut nonce = [0u8; 12];
        self.rng.fill_bytes(&mut nonce);
        let score = self.policy.score(caps);
        let deadline = now + DIALBACK_TIMEOUT;
        if let Some(sn) = self.sn.as_mut() {
            sn.dialbacks.insert(
                nonce,
                Dialback {
                    candidate: from,
                    addr,
                    score,
                    dialer,
                    deadline,
                },
            );
        }
        self.timers.push(deadline, Timer::Dialback(nonce));
        self.send(
            dialer,
            dialer_addr,
            &Msg::DialbackRequest {
                nonce,
                target: addr,
            },
        );
        true
    }

    fn on_dialback_request(
        &mut self,
        now: Time,
        from: PeerKey,
        nonce: [u8; 12],
        target: SocketAddr,
    ) -> bool {
        let Some(sn) = self.sn.as_mut() else {
            return false;
        };
        if !sn.members.is_live(&from) {
            return false;
        }
        if !sn.dialback_bucket.take(now) || sn.dial_tasks.len() >= MAX_DIALBACKS {
            self.stats.rate_limited += 1;
            return true;
        }
        let deadline = now + DIALBACK_WAIT;
        sn.dial_tasks.insert(
            nonce,
            DialTask {
                requester: from,
                target,
                deadline,
            },
        );
        self.timers.push(deadline, Timer::DialTask(nonce));
        self.stats.stun_requests += 1;
        self.out.push_back(Output::Stun {
            to: target,
            txid: nonce,
        });
        true
    }

    fn dial_task_timer(&mut self, now: Time, nonce: [u8; 12]) {
        let Some(sn) = self.sn.as_mut() else { return };
        let Some(task) = sn.dial_tasks.get(&nonce).copied() else {
            return;
        };
        if task.deadline > now {
            return;
        }
        sn.dial_tasks.remove(&nonce);
        if let Some(addr) = sn.members.get(&task.requester).map(|m| m.addr) {
            self.send(
                task.requester,
                addr,
                &Msg::DialbackResult {
                    nonce,
                    reachable: false,
                },
            );
        }
    }

    fn dialback_result(
        &mut self,
        now: Time,
        from: PeerKey,
        nonce: [u8; 12],
        reachable: bool,
    ) -> bool {
        let Some(sn) = self.sn.as_mut() else {
            return false;
        };
        let Some(d) = sn.dialbacks.get(&nonce).copied() else {
            return false;
        };
        if d.dialer != from {
            return false;
        }
        sn.dialbacks.remove(&nonce);
        if !reachable {
            self.stats.dialbacks_failed += 1;
            return true;
        }
        self.stats.dialbacks_ok += 1;
        let coordinator = self.coordinator(now);
        if coordinator == self.me {
            self.on_nominate(now, self.me, d.candidate, d.addr, d.score);
        } else if let Some(addr) = self
            .sn
            .as_ref()
            .and_then(|sn| self.addr_of(sn, &coordinator))
        {
            self.send(
                coordinator,
                addr,
                &Msg::Nominate {
                    key: d.candidate.0,
                    addr: d.addr,
                    score: d.score,
                },
            );
        }
        true
    }

    fn dialback_timer(&mut self, now: Time, nonce: [u8; 12]) {
        let Some(sn) = self.sn.as_mut() else { return };
        if sn.dialbacks.get(&nonce).is_some_and(|d| d.deadline <= now) {
            sn.dialbacks.remove(&nonce);
            self.stats.dialbacks_failed += 1;
        }
    }

    fn on_nominate(
        &mut self,
        now: Time,
        from: PeerKey,
        key: PeerKey,
        addr: SocketAddr,
        score: u32,
    ) -> bool {
        let Some(sn) = self.sn.as_ref() else {
            return false;
        };
        if from != self.me && !sn.members.is_live(&from) {
            return false;
        }
        if sn.members.is_live(&key) {
            return true;
        }
        let Some(sn) = self.sn.as_mut() else {
            return false;
        };
        match sn.nominees.iter_mut().find(|n| n.key == key) {
            Some(n) => {
                n.addr = addr;
                n.score = score;
                n.at = now;
                n.via = from;
            }
            None => {
                sn.nominees.push(Nominee {
                    key,
                    addr,
                    score,
                    at: now,
                    via: from,
                });
                sn.nominees
                    .sort_by(|a, b| b.score.cmp(&a.score).then(a.key.cmp(&b.key)));
                sn.nominees.truncate(MAX_NOMINEES);
            }
        }
        true
    }

    /// The coordinator of the current epoch in this node's view: the live supernode
    /// with the lowest HRW score for the epoch number.
    fn coordinator(&self, now: Time) -> PeerKey {
        let epoch = mix64(now.as_secs() / EPOCH.as_secs());
        let Some(sn) = self.sn.as_ref() else {
            return self.me;
        };
        let mut best = (mix64(epoch ^ self.my_hrw), self.me);
        for m in sn.members.live() {
            let c = (mix64(epoch ^ m.hrw), m.key);
            if c < best {
                best = c;
            }
        }
        best.1
    }

    fn elect(&mut self, now: Time) {
        self.arm(Periodic::Elect, now + ELECT_INTERVAL);
        if self.coordinator(now) != self.me {
            return;
        }
        self.expire_dial_state(now);
        let cfg = self.cfg.election;
        let my_load = self.my_load();
        let Some(sn) = self.sn.as_ref() else { return };
        if sn.handoff || now < sn.cooldown_until {
            return;
        }
        let (mut clients, mut capacity) = (u64::from(my_load.clients), u64::from(my_load.capacity));
        let mut n = 1u64;
        for m in sn.members.live() {
            clients += u64::from(m.load.clients);
            capacity += u64::from(m.load.capacity);
            n += 1;
        }
        if capacity == 0 {
            return;
        }
        let avg = clients * 1000 / capacity;
        let mid = (u64::from(cfg.low_watermark) + u64::from(cfg.high_watermark)) / 2;
        let epoch = now.as_secs() / EPOCH.as_secs();
        if avg >= u64::from(cfg.high_watermark) {
            // The cap grows with the tier: a small tier takes a few promotions a
            // minute, a large one may at most double in a minute.
            let cap = u64::from(cfg.max_promotions_per_min).max(n);
            let budget = cap.saturating_sub(sn.promotions.len() as u64);
            // Enough supernodes of this one's capacity to bring the average load
            // down to the midpoint between the watermarks, and no more.
            let per = u64::from(my_load.capacity.max(1));
            let wanted = (clients * 1000 / mid.max(1))
                .saturating_sub(capacity)
                .div_ceil(per)
                .max(1);
            let picked: Vec<Nominee> = sn
                .nominees
                .iter()
                .filter(|c| !sn.members.is_live(&c.key))
                .take(wanted.min(budget) as usize)
                .copied()
                .collect();
            // Hysteresis: no promotion that would leave the tier below the low
            // watermark.
            let mut k = picked.len() as u64;
            while k > 0 && clients * 1000 / (capacity + k * per) <= u64::from(cfg.low_watermark) {
                k -= 1;
            }
            if k == 0 {
                return;
            }
            let Some(sn) = self.sn.as_mut() else { return };
            sn.cooldown_until = now + PROMOTION_COOLDOWN;
            let mut promote = Vec::new();
            for best in picked.into_iter().take(k as usize) {
                sn.nominees.retain(|c| c.key != best.key);
                sn.promotions.push_back(now);
                let load = Load {
                    clients: 0,
                    capacity: my_load.capacity,
                    score: best.score,
                    pinned: false,
                };
                sn.members.admit(now, best.key, best.addr, 0, load);
                promote.push(best);
            }
            for best in promote {
                self.stats.promotions += 1;
                let msg = Msg::Promote {
                    epoch,
                    candidate: best.key.0,
                };
                if best.via == self.me {
                    self.on_promote(now, self.me, best.key);
                } else if let Some(addr) =
                    self.sn.as_ref().and_then(|sn| self.addr_of(sn, &best.via))
                {
                    self.send(best.via, addr, &msg);
                }
            }
        } else if avg <= u64::from(cfg.low_watermark) && n > u64::from(cfg.min_supernodes) {
            let mut weakest: Option<(u32, PeerKey, u32)> =
                (!my_load.pinned).then_some((my_load.score, self.me, my_load.capacity));
            for m in sn.members.live() {
                if m.load.pinned {
                    continue;
                }
                let c = (m.load.score, m.key, m.load.capacity);
                if weakest.is_none_or(|w| (c.0, c.1) < (w.0, w.1)) {
                    weakest = Some(c);
                }
            }
            let Some((_, victim, cap)) = weakest else {
                return;
            };
            // Hysteresis: no demotion that would push the tier past the midpoint.
            let rest = capacity.saturating_sub(u64::from(cap)).max(1);
            if clients * 1000 / rest >= mid {
                return;
            }
            let victim_addr = sn.members.get(&victim).map(|m| m.addr);
            if let Some(sn) = self.sn.as_mut() {
                sn.cooldown_until = now + DEMOTION_COOLDOWN;
            }
            self.stats.demotions += 1;
            if victim == self.me {
                self.handoff(now);
            } else if let Some(addr) = victim_addr {
                self.send(victim, addr, &Msg::Demote { epoch });
            }
        }
        self.flush_membership(now);
    }
}
