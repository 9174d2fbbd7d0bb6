//! The [`Router`]: the paths of one call, their measurement, and the send plan.

use std::collections::VecDeque;
use std::time::Duration;

use peercall_wire::Time;
use peercall_wire::frame::{Media, Probe, ProbeAck, Report};

use crate::dedup::Deduplicator;
use crate::path::{LIVENESS_REPORT_INTERVAL, Path, Rejected, STATS_REPORT_INTERVAL};
use crate::selector::{
    DefaultSelector, PathSelector, PathView, RedundancyMode, SwitchReason, kind_preference,
};
use crate::stats::{PathState, PathStats, RouterStats};
use crate::{PathId, PathKind, RouterError};

/// Paths one call may have: direct, a one-relay path through each of the two
/// supernodes either side is attached to, and a few two-relay paths. More only adds
/// probe traffic.
pub const MAX_PATHS: usize = 8;

/// Warm paths (the active one and the best standbys) are kept measured at least
/// this often while no media gives feedback on them: four probes a second, a few
/// hundred bytes per second, keep a standby's RTT and liveness fresh for an
/// immediate failover.
pub const PROBE_INTERVAL_WARM: Duration = Duration::from_millis(250);

/// Other paths are probed this often: enough to keep NAT mappings open (UDP
/// mappings last 30 s or more, RFC 4787 REQ-5) and notice a path coming back.
pub const PROBE_INTERVAL_COLD: Duration = Duration::from_secs(2);

/// A suspect active path is probed this often, so an answer (or its absence)
/// decides quickly: two frame intervals.
pub const PROBE_INTERVAL_SUSPECT: Duration = Duration::from_millis(40);

/// At least this many paths stay warm for the whole call (DESIGN.md §3), so a
/// failover always has a measured path to go to.
pub const MIN_WARM_PATHS: usize = 2;

/// A re-send covers the frames sent since the failing path was last heard, minus
/// this many of its RTTs: what the peer's last packet could not have seen arrive
/// (frames in flight, then everything after). The engine bounds it by what it keeps; see [`Router::poll_resend`].
pub const RESEND_WINDOW_RTT_FACTOR: u32 = 1;

/// Events kept for [`Router::poll_event`]; older ones are dropped when the engine
/// does not drain them (counted in [`RouterStats::events_dropped`]).
pub const MAX_EVENTS: usize = 64;

/// Where media goes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SendPlan {
    /// The path for every frame; None while no path works yet.
    pub primary: Option<PathId>,
    /// A second path for a copy of every frame.
    pub redundant: Option<PathId>,
}

impl SendPlan {
    /// The paths to send on, primary first.
    pub fn paths(&self) -> impl Iterator<Item = PathId> {
        self.primary.into_iter().chain(self.redundant)
    }
}

/// What to do with an incoming media frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The first copy: hand it to the jitter buffer.
    Fresh,
    /// A copy already delivered (it came on two paths) or too old: drop it.
    Duplicate,
}

/// Something the engine may want to log or count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterEvent {
    /// The active path changed.
    Switched {
        /// The path left, if any.
        from: Option<PathId>,
        /// The new active path.
        to: PathId,
        /// Why.
        reason: SwitchReason,
    },
    /// A path stopped answering.
    PathDown(PathId),
    /// A path answered for the first time, or again after it went silent.
    PathUp(PathId),
}

/// Router settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouterConfig {
    /// When the default selector sends a second copy.
    pub redundancy: RedundancyMode,
}

/// The paths of one call: measurement, selection, probing, receiver reports and
/// de-duplication. Sans-IO: every method takes `now`; see the
/// [crate docs](crate) for the driving contract.
#[derive(Debug)]
pub struct Router<S = DefaultSelector> {
    paths: Vec<Path>,
    usable: Vec<bool>,
    selector: S,
    views: Vec<PathView>,
    active: Option<PathId>,
    redundant: Option<PathId>,
    /// A re-send for the next send plan: (path to send on, frames sent since).
    resend: Option<(PathId, Time)>,
    dedup: Deduplicator,
    events: VecDeque<RouterEvent>,
    events_dropped: u64,
    switches: u64,
    switches_silent: u64,
    switches_better: u64,
    rejected: u64,
    /// The latest `now` seen.
    now: Time,
}

impl Router<DefaultSelector> {
    /// A router with the default selector.
    pub fn new(now: Time, config: RouterConfig) -> Router<DefaultSelector> {
        Router::with_selector(now, DefaultSelector::new(config.redundancy))
    }
}

impl<S: PathSelector> Router<S> {
    /// A router with a custom selection policy.
    pub fn with_selector(now: Time, selector: S) -> Router<S> {
        Router {
            paths: Vec::with_capacity(MAX_PATHS),
            usable: Vec::with_capacity(MAX_PATHS),
            selector,
            views: Vec::with_capacity(MAX_PATHS),
            active: None,
            redundant: None,
            resend: None,
            dedup: Deduplicator::default(),
            events: VecDeque::with_capacity(MAX_EVENTS),
            events_dropped: 0,
            switches: 0,
            switches_silent: 0,
            switches_better: 0,
            rejected: 0,
            now,
        }
    }

    fn tick(&mut self, now: Time) {
        self.now = self.now.max(now);
    }

    fn index(&self, id: PathId) -> Result<usize, RouterError> {
        self.paths
            .iter()
            .position(|p| p.id == id)
            .ok_or(RouterError::UnknownPath(id))
    }

    fn path_mut(&mut self, id: PathId) -> Result<&mut Path, RouterError> {
        let i = self.index(id);
        match i {
            Ok(i) => Ok(&mut self.paths[i]),
            Err(e) => {
                self.rejected += 1;
                Err(e)
            }
        }
    }

    fn push_event(&mut self, e: RouterEvent) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
            self.events_dropped += 1;
        }
        self.events.push_back(e);
    }

    /// Adds a path. Both ends of a call must use the same id for the same path (call
    /// setup numbers them); its first probe is due at once.
    pub fn add_path(&mut self, now: Time, id: PathId, kind: PathKind) -> Result<(), RouterError> {
        self.tick(now);
        if self.paths.iter().any(|p| p.id == id) {
            return Err(RouterError::DuplicatePath(id));
        }
        if self.paths.len() >= MAX_PATHS {
            return Err(RouterError::TooManyPaths);
        }
        self.paths.push(Path::new(id, kind, now));
        self.usable.push(false);
        Ok(())
    }

    /// Removes a path (its relay went away, or call setup gave up on it). If it was
    /// active, the next decision picks another.
    pub fn remove_path(&mut self, now: Time, id: PathId) -> Result<(), RouterError> {
        self.tick(now);
        let i = self.index(id)?;
        self.paths.remove(i);
        self.usable.remove(i);
        self.evaluate(now);
        Ok(())
    }

    /// Re-runs measurement views and the selector.
    fn evaluate(&mut self, now: Time) {
        self.views.clear();
        for p in &self.paths {
            self.views.push(p.view(now));
        }
        for (i, v) in self.views.iter().enumerate() {
            if v.silent {
                self.paths[i].clean_since = None;
            }
            let usable = v.usable();
            if usable != self.usable[i] {
                self.usable[i] = usable;
                let e = if usable {
                    RouterEvent::PathUp(v.id)
                } else {
                    RouterEvent::PathDown(v.id)
                };
                if self.events.len() >= MAX_EVENTS {
                    self.events.pop_front();
                    self.events_dropped += 1;
                }
                self.events.push_back(e);
            }
        }
        let sel = self.selector.select(now, &self.views);
        let known = |id: Option<PathId>| id.filter(|i| self.paths.iter().any(|p| p.id == *i));
        let active = known(sel.active);
        let redundant = known(sel.redundant).filter(|r| Some(*r) != active);
        if active != self.active
            && let Some(to) = active
        {
            let reason = sel.reason.unwrap_or(SwitchReason::Better);
            if self.active.is_some() {
                self.switches += 1;
                match reason {
                    SwitchReason::Silent => self.switches_silent += 1,
                    SwitchReason::Better => self.switches_better += 1,
                    SwitchReason::Initial | SwitchReason::Removed => {}
                }
            }
            self.push_event(RouterEvent::Switched {
                from: self.active,
                to,
                reason,
            });
        }
        self.plan_resend(active, redundant);
        self.active = active;
        self.redundant = redundant;
        self.mark_warm();
    }

    /// When a path starts carrying media (a copy, or the media after a switch) while
    /// the path that carried it is failing (quiet, suspect or silent), schedules a
    /// re-send of what that path may have lost.
    fn plan_resend(&mut self, active: Option<PathId>, redundant: Option<PathId>) {
        let carried = [self.active, self.redundant];
        let new = redundant
            .filter(|r| !carried.contains(&Some(*r)))
            .or(active.filter(|a| !carried.contains(&Some(*a))));
        let Some(to) = new else {
            if self
                .resend
                .is_some_and(|(p, _)| Some(p) != active && Some(p) != redundant)
            {
                self.resend = None;
            }
            return;
        };
        let failing = self.active.and_then(|a| {
            let i = self.paths.iter().position(|p| p.id == a)?;
            let v = &self.views[i];
            let p = &self.paths[i];
            (v.quiet || v.suspect || v.silent).then_some(p)
        });
        if let Some(p) = failing
            && let Some(heard) = p.last_heard
        {
            let since = heard - p.rtt_or_initial() * RESEND_WINDOW_RTT_FACTOR;
            self.resend = Some((to, since));
        }
    }

    /// Marks the active and redundant paths warm, then the best others until
    /// [`MIN_WARM_PATHS`] are, and the one the selector asks for.
    fn mark_warm(&mut self) {
        let mut warm = 0;
        let keep = self.selector.keep_warm();
        for p in &mut self.paths {
            p.warm = Some(p.id) == self.active || Some(p.id) == self.redundant;
            warm += usize::from(p.warm);
            // Not counted towards MIN_WARM_PATHS: a path kept warm for a possible
            // return may be dead, and the failover needs a live standby.
            p.warm |= Some(p.id) == keep;
        }
        while warm < MIN_WARM_PATHS {
            let best = self
                .views
                .iter()
                .enumerate()
                .filter(|(i, _)| !self.paths[*i].warm)
                .max_by(|(_, a), (_, b)| {
                    let ka = (a.usable(), a.r + kind_preference(a.kind));
                    let kb = (b.usable(), b.r + kind_preference(b.kind));
                    ka.partial_cmp(&kb).unwrap_or(std::cmp::Ordering::Equal)
                })
                .map(|(i, _)| i);
            match best {
                Some(i) => {
                    self.paths[i].warm = true;
                    warm += 1;
                }
                None => break,
            }
        }
    }

    /// Where the next frame goes. Call once per outgoing frame, then
    /// [`Router::on_media_sent`] for each path in the plan.
    pub fn send_plan(&mut self, now: Time) -> SendPlan {
        self.tick(now);
        self.evaluate(now);
        SendPlan {
            primary: self.active,
            redundant: self.redundant,
        }
    }

    /// A re-send, once, when a path starts carrying media (a copy, or all of it
    /// after a switch) because the path that carried it turned quiet, suspect or
    /// silent: send again on the returned path the frames last sent at or after the
    /// returned time (see [`RESEND_WINDOW_RTT_FACTOR`]), each with
    /// [`Media::FLAG_REDUNDANT`] and a path sequence number from
    /// [`Router::on_media_sent`]; they may have been lost on the failing path.
    /// Poll after [`Router::send_plan`] and after every input and timeout, so the
    /// copies leave as soon as the trigger fires.
    pub fn poll_resend(&mut self) -> Option<(PathId, Time)> {
        self.resend
            .take()
            .filter(|(p, _)| Some(*p) == self.active || Some(*p) == self.redundant)
    }

    /// A media frame goes out on `path`; returns the per-path sequence number to put
    /// in its `Media.path_seq`. A frame sent on two paths gets one number on each;
    /// set [`Media::FLAG_REDUNDANT`] on both copies.
    pub fn on_media_sent(&mut self, now: Time, path: PathId) -> Result<u32, RouterError> {
        self.tick(now);
        Ok(self.path_mut(path)?.on_media_sent(now))
    }

    /// A media frame arrived on its `media.path`. Measures the path, schedules a
    /// receiver report when one is due (drain [`Router::poll_report`] right after,
    /// so the report's RTT sample is exact), and says whether to deliver it.
    pub fn on_media_received(
        &mut self,
        now: Time,
        media: &Media<'_>,
    ) -> Result<Delivery, RouterError> {
        self.tick(now);
        let p = self.path_mut(media.path)?;
        p.on_heard(now);
        let arrival = p.inbound.on_media(now, media.path_seq, media.timestamp);
        if arrival.newest {
            let since = |t: Option<Time>| t.map_or(Duration::MAX, |t| now.saturating_since(t));
            if arrival.gap_closed
                || since(p.inbound.last_report) >= STATS_REPORT_INTERVAL
                || since(p.last_sent) >= LIVENESS_REPORT_INTERVAL
            {
                p.inbound.report_pending = true;
            }
        }
        Ok(if self.dedup.accept(media.seq) {
            Delivery::Fresh
        } else {
            Delivery::Duplicate
        })
    }

    /// The next receiver report to send, if one is due. Send it on the path it is
    /// about (`report.path`): its round trip is that path's RTT sample.
    pub fn poll_report(&mut self, now: Time) -> Option<Report> {
        self.tick(now);
        let p = self.paths.iter_mut().find(|p| p.inbound.report_pending)?;
        p.inbound.report_pending = false;
        p.inbound.last_report = Some(now);
        p.on_sent_other(now);
        Some(p.inbound.report(p.id))
    }

    /// A receiver report about our media on `report.path` arrived.
    pub fn on_report(&mut self, now: Time, report: &Report) -> Result<(), RouterError> {
        self.tick(now);
        let path = report.path;
        let r = self.path_mut(path)?.on_report(now, report);
        self.reject(r, path)
    }

    fn reject(&mut self, r: Result<(), Rejected>, path: PathId) -> Result<(), RouterError> {
        r.map_err(|e| {
            self.rejected += 1;
            match e {
                Rejected::UnknownProbe => RouterError::UnknownProbe(path),
                Rejected::BogusReport => RouterError::BogusReport(path),
            }
        })
    }

    /// The next probe to send, if one is due. Send it on `probe.path`. Call until
    /// None after every input and timeout.
    pub fn poll_probe(&mut self, now: Time) -> Option<Probe> {
        self.tick(now);
        for p in &mut self.paths {
            p.expire_probes(now);
        }
        let active = self.active;
        let p = self
            .paths
            .iter_mut()
            .find(|p| probe_due(p, active) <= now)?;
        Some(p.make_probe(now))
    }

    /// The peer's probe arrived; returns the answer to send back on the same path.
    pub fn on_probe(&mut self, now: Time, probe: &Probe) -> Result<ProbeAck, RouterError> {
        self.tick(now);
        let p = self.path_mut(probe.path)?;
        p.on_probe(now, probe);
        p.on_sent_other(now);
        Ok(ProbeAck {
            path: probe.path,
            seq: probe.seq,
            echo: probe.sent_at,
            held_us: 0,
        })
    }

    /// The answer to one of our probes arrived: an RTT sample (now - echo - held).
    pub fn on_probe_ack(&mut self, now: Time, ack: &ProbeAck) -> Result<Duration, RouterError> {
        self.tick(now);
        let path = ack.path;
        let r = self.path_mut(path)?.on_probe_ack(now, ack);
        match r {
            Ok(rtt) => Ok(rtt),
            Err(e) => self.reject(Err(e), path).map(|()| Duration::ZERO),
        }
    }

    /// Some other authenticated packet arrived on `path` (a keepalive, a control
    /// frame): the path is alive.
    pub fn on_packet_received(&mut self, now: Time, path: PathId) -> Result<(), RouterError> {
        self.tick(now);
        self.path_mut(path)?.on_heard(now);
        Ok(())
    }

    /// Some other packet (not media, probe or report) was sent on `path`.
    pub fn on_packet_sent(&mut self, now: Time, path: PathId) -> Result<(), RouterError> {
        self.tick(now);
        self.path_mut(path)?.on_sent_other(now);
        Ok(())
    }

    /// When [`Router::handle_timeout`] should run next (or probes are due).
    pub fn poll_timeout(&self) -> Option<Time> {
        let now = self.now;
        let mut next: Option<Time> = self.selector.next_check().filter(|t| *t > now);
        let mut at = |t: Time| next = Some(next.map_or(t, |n| n.min(t)));
        for p in &self.paths {
            at(probe_due(p, self.active));
            if let Some(t) = p.probe_expiry() {
                at(t);
            }
            if let Some(t) = p.silent_at().filter(|t| *t > now) {
                at(t);
            }
            if Some(p.id) == self.active {
                for t in [p.suspect_at(), p.quiet_at()].into_iter().flatten() {
                    if t > now {
                        at(t);
                    }
                }
            }
        }
        next
    }

    /// Runs timers: probe expiry, silence detection, the selector's hold times.
    pub fn handle_timeout(&mut self, now: Time) {
        self.tick(now);
        for p in &mut self.paths {
            p.expire_probes(now);
        }
        self.evaluate(now);
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<RouterEvent> {
        self.events.pop_front()
    }

    /// The active path.
    pub fn active(&self) -> Option<PathId> {
        self.active
    }

    /// The path's kind, if it exists.
    pub fn path_kind(&self, id: PathId) -> Option<PathKind> {
        self.paths.iter().find(|p| p.id == id).map(|p| p.kind)
    }

    /// The selector, for inspection.
    pub fn selector(&self) -> &S {
        &self.selector
    }

    /// The selector, to adjust its policy mid-call (say, redundancy for the first
    /// seconds of media). Takes effect at the next decision.
    pub fn selector_mut(&mut self) -> &mut S {
        &mut self.selector
    }

    /// A snapshot of every path's figures.
    pub fn stats(&self, now: Time) -> RouterStats {
        let paths = self
            .paths
            .iter()
            .map(|p| {
                let v = p.view(now);
                let (q, loss) = p.quality(now);
                let media = p.media_summary(now);
                let probes = p.probe_loss.summary(now);
                let inbound = p.inbound.loss.summary(now);
                let state = if Some(p.id) == self.active {
                    PathState::Active
                } else if !v.validated {
                    PathState::Unvalidated
                } else if v.silent {
                    PathState::Silent
                } else if Some(p.id) == self.redundant {
                    PathState::Redundant
                } else {
                    PathState::Standby
                };
                let (r, mos) = p.mos(now);
                PathStats {
                    id: p.id,
                    kind: p.kind,
                    state,
                    warm: p.warm,
                    rtt: p.rtt.smoothed(),
                    rtt_var: p.rtt.variation(),
                    rtt_min: p.rtt.min(now),
                    rtt_p50: p.rtt.percentile(0.5),
                    rtt_p90: p.rtt.percentile(0.9),
                    jitter: q.jitter,
                    loss: q.loss,
                    loss_from_media: loss.from_media,
                    media_loss: media,
                    probe_loss: probes,
                    inbound_loss: inbound,
                    inbound_jitter: Duration::from_micros(u64::from(p.inbound.jitter.jitter_us())),
                    r,
                    mos,
                    since_heard: p.last_heard.map(|t| now.saturating_since(t)),
                    media_sent: p.media_sent,
                    media_received: p.inbound.received(),
                    probes_sent: p.probes_sent,
                    probes_acked: p.probes_acked,
                    reports_received: p.reports_received,
                }
            })
            .collect();
        RouterStats {
            active: self.active,
            active_kind: self.active.and_then(|a| self.path_kind(a)),
            redundant: self.redundant,
            switches: self.switches,
            switches_silent: self.switches_silent,
            switches_better: self.switches_better,
            duplicates: self.dedup.duplicates(),
            too_old: self.dedup.too_old(),
            rejected: self.rejected,
            events_dropped: self.events_dropped,
            paths,
        }
    }
}

/// When `p` should be probed next (see the probe intervals): media feedback on a
/// path counts as a probe, so a path carrying media is not probed.
fn probe_due(p: &Path, active: Option<PathId>) -> Time {
    let interval = if p.warm || p.last_heard.is_none() {
        PROBE_INTERVAL_WARM
    } else {
        PROBE_INTERVAL_COLD
    };
    let due = match p.last_probe.max(p.last_feedback) {
        Some(t) => t + interval,
        None => p.added,
    };
    match p.suspect_at() {
        Some(suspect) if Some(p.id) == active => {
            let fast = p.last_probe.map_or(suspect, |t| t + PROBE_INTERVAL_SUSPECT);
            due.min(fast.max(suspect))
        }
        _ => due,
    }
}
