//! Path selection: which path carries the media, and when a second copy goes on
//! another path.
//!
//! The router measures; a [`PathSelector`] decides, from one [`PathView`] per path.
//! [`DefaultSelector`] is the documented default policy:
//!
//! 1. **Start at once.** With no active path, the best usable path (heard from and
//!    not silent) becomes active as soon as there is one: media never waits for the
//!    best path.
//! 2. **Leave a silent path at once.** When the active path is silent (no answer for
//!    max(3 × RTT, 150 ms), see [`crate::path::SILENCE_FLOOR`]), the best other
//!    usable path takes over in the same call.
//! 3. **Switch on sustained improvement.** A candidate must beat the active path's R
//!    by [`SWITCH_MARGIN_R`], and be no worse even with its loss at the upper end of
//!    its confidence interval and the active path's at the lower end
//!    ([`crate::path::LOSS_CONFIDENCE_Z`]), continuously for [`SWITCH_HOLD`], and at
//!    least [`MIN_SWITCH_INTERVAL`] after the last switch. Direct paths are preferred
//!    by [`PREFER_DIRECT_R`], one relay over two by [`PREFER_ONE_RELAY_R`].
//! 4. **Trial.** When a candidate beats the active path by the margin but not with
//!    confidence, and only probes measured it (too few samples),
//!    media is sent on it too for up to [`TRIAL_DURATION`], so it is measured at the
//!    media rate; at most one trial starts per [`TRIAL_INTERVAL`].
//! 5. **Redundancy** on the two best paths while the active path is lossy
//!    ([`LOSSY_ON`] / [`LOSSY_OFF`]), for [`RECENT_SWITCH_REDUNDANCY`] after a switch,
//!    while the active path is suspect (no answer for max(1.5 × RTT, 60 ms)) plus
//!    [`SUSPECT_LINGER`], and while it is *quiet* (the peer's media missing for two
//!    frame intervals plus a jitter margin, [`crate::path::QUIET_FRAMES`]) plus
//!    [`QUIET_LINGER`]. The quiet trigger is separate from the switch (which waits for
//!    silence) and cheap to get wrong: when it starts a copy, the router also re-sends
//!    the frames the quiet path may have lost on the copy's path
//!    ([`crate::Router::poll_resend`]).
//! 6. **Return.** A path left because it went silent gets the call back, without the
//!    confidence test, the hold or [`MIN_SWITCH_INTERVAL`], once it has answered every
//!    probe for [`RETURN_CLEAN`] and is preferred over the active path by kind (a
//!    direct path over a relay, one relay over two). A returned path that dies again within [`RETURN_PROBATION`] doubles the
//!    clean time the next return needs, up to [`RETURN_CLEAN_MAX`]: a path that keeps
//!    flapping is not returned to.

use std::time::Duration;

use peercall_wire::Time;

use crate::{PathId, PathKind};

/// What the selector sees of one path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathView {
    /// The path.
    pub id: PathId,
    /// Its kind.
    pub kind: PathKind,
    /// Something was heard on it (it works, at least once).
    pub validated: bool,
    /// It stopped answering (see [`crate::path::SILENCE_FLOOR`]).
    pub silent: bool,
    /// It is late answering: silent soon unless something arrives.
    pub suspect: bool,
    /// The peer's media stopped arriving on it for a moment (see
    /// [`crate::path::QUIET_FRAMES`]): the earliest warning, before suspect.
    pub quiet: bool,
    /// Since when every probe on it was answered and it never went silent.
    pub clean_since: Option<Time>,
    /// When something was last heard on it.
    pub last_heard: Option<Time>,
    /// Smoothed RTT, once measured.
    pub rtt: Option<Duration>,
    /// Loss rate used for the score.
    pub loss: f64,
    /// E-model R from the point estimates.
    pub r: f64,
    /// R with the loss at the upper end of its confidence interval.
    pub r_pessimistic: f64,
    /// R with the loss at the lower end of its confidence interval.
    pub r_optimistic: f64,
    /// The loss figures come from media reports (not only probes).
    pub measured_by_media: bool,
}

impl PathView {
    /// Validated and not silent: media can go on it.
    pub fn usable(&self) -> bool {
        self.validated && !self.silent
    }
}

/// Why the active path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SwitchReason {
    /// The first active path of the call.
    Initial,
    /// The active path went silent.
    Silent,
    /// Another path was better for long enough.
    Better,
    /// The active path was removed.
    Removed,
}

impl SwitchReason {
    /// A stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            SwitchReason::Initial => "initial",
            SwitchReason::Silent => "silent",
            SwitchReason::Better => "better",
            SwitchReason::Removed => "removed",
        }
    }
}

/// A selector's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Selection {
    /// The path media goes on.
    pub active: Option<PathId>,
    /// A second path that carries a copy of every frame.
    pub redundant: Option<PathId>,
    /// Set when `active` changed in this decision.
    pub reason: Option<SwitchReason>,
}

/// Path selection policy.
///
/// The router calls [`PathSelector::select`] whenever it needs a decision (for
/// every frame sent and at every timeout) with one view per path, and again at
/// [`PathSelector::next_check`] at the latest. Implementations keep their own
/// state (hysteresis timers); they must be deterministic in their inputs.
pub trait PathSelector {
    /// Decides the active and the redundant path at `now`.
    fn select(&mut self, now: Time, paths: &[PathView]) -> Selection;

    /// When the decision may change with no new input (a hold time ending).
    fn next_check(&self) -> Option<Time> {
        None
    }

    /// A path the router must keep warm (probed every
    /// [`crate::PROBE_INTERVAL_WARM`]) besides the active and redundant ones: say,
    /// one the policy may return to, so it is measured closely.
    fn keep_warm(&self) -> Option<PathId> {
        None
    }
}

/// R points a candidate must gain over the active path to replace it: about
/// 1.5 points of random loss at a few percent, or 200 ms of one-way delay below
/// G.107's delay knee; around R 80 that is 0.2 MOS, a difference listeners notice.
pub const SWITCH_MARGIN_R: f64 = 5.0;

/// How long a candidate must stay better before the switch: long enough that a
/// passing burst on the active path does not move the call, short next to the
/// 10-second loss window, so a real change is followed within seconds.
pub const SWITCH_HOLD: Duration = Duration::from_secs(3);

/// The least time between a switch and a switch for improvement (switches away
/// from a silent path are never held back): the bound of at most one switch
/// per 30 s, as a hard floor under flapping when paths change faster than the
/// hysteresis can tell (loss that wanders every few seconds). A degraded active path
/// is covered meanwhile by redundancy ([`LOSSY_ON`]).
pub const MIN_SWITCH_INTERVAL: Duration = Duration::from_secs(30);

/// Bonus R for a direct path: above [`SWITCH_MARGIN_R`], so a call upgrades from a
/// relay to an equally good direct path (relays are shared, finite capacity), and a
/// direct path within 1 R of the relay's quality still wins.
pub const PREFER_DIRECT_R: f64 = 6.0;

/// Bonus R for a one-relay path over a two-relay one: a tie-breaker only (below the
/// margin), as both use relay capacity.
pub const PREFER_ONE_RELAY_R: f64 = 1.0;

/// Redundancy starts when the active path loses this much: at 3 % random loss the
/// E-model takes 10 R off (0.4 MOS around R 80), and a second copy on an
/// independent path makes the loss that of both at once.
pub const LOSSY_ON: f64 = 0.03;

/// Redundancy for loss stops below this: half of [`LOSSY_ON`], so a path hovering
/// near the threshold does not toggle it.
pub const LOSSY_OFF: f64 = 0.015;

/// After a switch, the old path (or the next best) keeps a copy of the media this
/// long: the new path's figures may be stale, and the old one may recover.
pub const RECENT_SWITCH_REDUNDANCY: Duration = Duration::from_secs(2);

/// Redundancy for a suspect active path lasts this long after it answers again:
/// answers that came after a gap may be the last before it dies.
pub const SUSPECT_LINGER: Duration = Duration::from_millis(500);

/// Redundancy started by a quiet active path lasts this long after it is heard again:
/// three frames. Short, because a quiet path is usually two frames lost at random,
/// and each false alarm costs the re-sent frames plus this.
pub const QUIET_LINGER: Duration = Duration::from_millis(60);

/// A path left for silence must answer every probe for this long before the call
/// returns to it: twenty warm probes, and longer than the outages of a few seconds
/// that flapping paths show.
pub const RETURN_CLEAN: Duration = Duration::from_secs(5);

/// A returned path that goes silent again within this long was returned to too
/// early: the next return needs twice the clean time.
pub const RETURN_PROBATION: Duration = Duration::from_secs(60);

/// The longest clean time a return may need, so a path that flapped for a while is
/// still returned to once it has been stable for two minutes.
pub const RETURN_CLEAN_MAX: Duration = Duration::from_secs(120);

/// A trial sends media on a promising candidate for at most this long: at 50
/// frames per second its pessimistic loss bound is tight within a few seconds.
pub const TRIAL_DURATION: Duration = Duration::from_secs(8);

/// At most one trial starts per this interval, so a path that only looks better on
/// sparse probes costs at most a quarter of the time in duplicate media.
pub const TRIAL_INTERVAL: Duration = Duration::from_secs(30);

/// When the selector sends a second copy of the media.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedundancyMode {
    /// The default policy's rules (lossy active path, recent switch, suspect path,
    /// trials).
    #[default]
    Auto,
    /// Always on the two best paths when two are usable.
    Always,
    /// Never (trials still measure candidates with probes only).
    Never,
}

/// The default policy; see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct DefaultSelector {
    mode: RedundancyMode,
    active: Option<PathId>,
    /// (time, path left) of the last switch.
    last_switch: Option<(Time, Option<PathId>)>,
    /// A candidate better at its pessimistic R, and since when.
    candidate: Option<(PathId, Time)>,
    /// A path on trial, and since when.
    trial: Option<(PathId, Time)>,
    last_trial: Option<Time>,
    lossy: bool,
    suspect_until: Option<Time>,
    quiet_until: Option<Time>,
    /// The path left because it went silent, the clean time a return to it needs,
    /// and when the call last returned to it.
    left_silent: Option<(PathId, Duration, Option<Time>)>,
    next_check: Option<Time>,
}

/// The preference bonus of a path kind.
pub fn kind_preference(kind: PathKind) -> f64 {
    match kind {
        PathKind::Direct => PREFER_DIRECT_R,
        PathKind::Relay1 => PREFER_ONE_RELAY_R,
        PathKind::Relay2 => 0.0,
    }
}

fn effective(v: &PathView) -> f64 {
    v.r + kind_preference(v.kind)
}

fn effective_pessimistic(v: &PathView) -> f64 {
    v.r_pessimistic + kind_preference(v.kind)
}

fn effective_optimistic(v: &PathView) -> f64 {
    v.r_optimistic + kind_preference(v.kind)
}

/// The best usable path other than `except`, by `key`; a suspect path only when no
/// sound one is left.
fn best_by(
    paths: &[PathView],
    except: Option<PathId>,
    key: impl Fn(&PathView) -> f64,
) -> Option<&PathView> {
    paths
        .iter()
        .filter(|v| v.usable() && Some(v.id) != except)
        .max_by(|a, b| {
            (!a.suspect, key(a))
                .partial_cmp(&(!b.suspect, key(b)))
                .unwrap_or(std::cmp::Ordering::Equal)
                // Equal keys: the lower id, so the choice is deterministic.
                .then(b.id.cmp(&a.id))
        })
}

impl DefaultSelector {
    /// A default selector with a redundancy mode.
    pub fn new(mode: RedundancyMode) -> DefaultSelector {
        DefaultSelector {
            mode,
            ..DefaultSelector::default()
        }
    }

    fn switch_to(&mut self, now: Time, to: PathId) {
        self.last_switch = Some((now, self.active));
        self.active = Some(to);
        self.candidate = None;
        if self.trial.is_some_and(|(p, _)| p == to) {
            self.trial = None;
        }
    }

    fn choose_active(&mut self, now: Time, paths: &[PathView]) -> Option<SwitchReason> {
        let Some(active) = self.active.and_then(|a| paths.iter().find(|v| v.id == a)) else {
            let reason = if self.active.is_some() {
                SwitchReason::Removed
            } else {
                SwitchReason::Initial
            };
            let best = best_by(paths, None, effective).map(|v| v.id);
            return match best {
                Some(b) => {
                    self.switch_to(now, b);
                    Some(reason)
                }
                None => {
                    self.active = None;
                    None
                }
            };
        };
        let active = *active;
        if active.silent {
            self.candidate = None;
            let next = best_by(paths, Some(active.id), effective).map(|v| v.id);
            return next.map(|n| {
                // A return that failed within its probation doubles the next wait.
                let clean = match self.left_silent {
                    Some((p, clean, Some(back)))
                        if p == active.id && now.saturating_since(back) < RETURN_PROBATION =>
                    {
                        (clean * 2).min(RETURN_CLEAN_MAX)
                    }
                    Some((p, clean, _)) if p == active.id => clean,
                    _ => RETURN_CLEAN,
                };
                self.left_silent = Some((active.id, clean, None));
                self.switch_to(now, n);
                SwitchReason::Silent
            });
        }
        if let Some((p, clean, None)) = self.left_silent
            && let Some(back) = paths.iter().find(|v| v.id == p)
            && back.usable()
            && !back.quiet
            && kind_preference(back.kind) > kind_preference(active.kind)
            && back
                .clean_since
                .is_some_and(|t| now.saturating_since(t) >= clean)
        {
            self.switch_to(now, p);
            self.left_silent = Some((p, clean, Some(now)));
            return Some(SwitchReason::Better);
        }
        let bar = effective(&active) + SWITCH_MARGIN_R;
        let Some(c) = best_by(paths, Some(active.id), effective).filter(|c| effective(c) >= bar)
        else {
            self.candidate = None;
            return None;
        };
        if effective_pessimistic(c) >= effective_optimistic(&active) {
            let since = match self.candidate {
                Some((id, since)) if id == c.id => since,
                _ => now,
            };
            self.candidate = Some((c.id, since));
            // The first choice of the call is no switch to hold back from.
            let dwell_over = self.last_switch.is_none_or(|(t, from)| {
                from.is_none() || now.saturating_since(t) >= MIN_SWITCH_INTERVAL
            });
            if now.saturating_since(since) >= SWITCH_HOLD && dwell_over {
                self.switch_to(now, c.id);
                return Some(SwitchReason::Better);
            }
            return None;
        }
        // Better on its point estimate, not yet with confidence: too few samples
        // (probes only), so a trial measures it at the media rate.
        self.candidate = None;
        if self.trial.is_none()
            && !c.measured_by_media
            && self
                .last_trial
                .is_none_or(|t| now.saturating_since(t) >= TRIAL_INTERVAL)
        {
            self.trial = Some((c.id, now));
            self.last_trial = Some(now);
        }
        None
    }

    fn choose_redundant(&mut self, now: Time, paths: &[PathView]) -> Option<PathId> {
        let active_id = self.active?;
        let active = paths.iter().find(|v| v.id == active_id)?;
        let usable = |id: PathId| paths.iter().any(|v| v.id == id && v.usable());
        let best_other = || best_by(paths, Some(active_id), effective).map(|v| v.id);
        match self.mode {
            RedundancyMode::Never => return None,
            RedundancyMode::Always => return best_other(),
            RedundancyMode::Auto => {}
        }
        if let Some((p, _)) = self.trial
            && usable(p)
        {
            return Some(p);
        }
        if let Some((t, Some(old))) = self.last_switch
            && now.saturating_since(t) < RECENT_SWITCH_REDUNDANCY
        {
            return if usable(old) && old != active_id {
                Some(old)
            } else {
                best_other()
            };
        }
        if active.loss >= LOSSY_ON {
            self.lossy = true;
        } else if active.loss <= LOSSY_OFF {
            self.lossy = false;
        }
        if active.suspect {
            self.suspect_until = Some(now + SUSPECT_LINGER);
        }
        if active.quiet {
            self.quiet_until = Some(now + QUIET_LINGER);
        }
        let suspect = self.suspect_until.is_some_and(|t| now < t);
        let quiet = self.quiet_until.is_some_and(|t| now < t);
        if self.lossy || suspect || quiet {
            best_other()
        } else {
            None
        }
    }

    fn update_next_check(&mut self, now: Time) {
        let mut next: Option<Time> = None;
        let mut at = |t: Time| {
            if t > now {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        if let Some((_, since)) = self.candidate {
            let dwell = match self.last_switch {
                Some((t, Some(_))) => t + MIN_SWITCH_INTERVAL,
                _ => Time::ZERO,
            };
            at((since + SWITCH_HOLD).max(dwell));
        }
        if let Some((_, since)) = self.trial {
            at(since + TRIAL_DURATION);
        }
        if let Some((t, _)) = self.last_switch {
            at(t + RECENT_SWITCH_REDUNDANCY);
        }
        if let Some(t) = self.suspect_until {
            at(t);
        }
        if let Some(t) = self.quiet_until {
            at(t);
        }

        if let Some(t) = self.last_trial {
            at(t + TRIAL_INTERVAL);
        }
        self.next_check = next;
    }
}

impl PathSelector for DefaultSelector {
    fn select(&mut self, now: Time, paths: &[PathView]) -> Selection {
        if let Some((p, since)) = self.trial {
            let on_trial = paths.iter().any(|v| v.id == p && v.usable());
            let held = self.candidate.is_some_and(|(c, _)| c == p);
            if !on_trial || (now.saturating_since(since) >= TRIAL_DURATION && !held) {
                self.trial = None;
            }
        }
        let reason = self.choose_active(now, paths);
        let redundant = self.choose_redundant(now, paths);
        self.update_next_check(now);
        Selection {
            active: self.active,
            redundant,
            reason,
        }
    }

    fn next_check(&self) -> Option<Time> {
        self.next_check
    }

    /// The path left for silence, while a return to it is possible: its clean
    /// time is then measured by a warm probe every 250 ms (twenty in
    /// [`RETURN_CLEAN`]), not a cold one every 2 s, so a path that came back lossy
    /// rarely passes, and its first answer after a heal is heard at once.
    fn keep_warm(&self) -> Option<PathId> {
        match self.left_silent {
            Some((p, _, None)) if self.active != Some(p) => Some(p),
            _ => None,
        }
    }
}
