//! Link behaviour: delay, jitter, loss (random and bursty), duplication, reordering,
//! and per-host uplink queues.

use std::time::Duration;

use rand_core::RngCore;

use crate::SimError;
use crate::util::{chance, unit};

/// The one-way delay of a link nobody configured: a short metro path. Tests set the
/// delays they measure.
pub const DEFAULT_DELAY: Duration = Duration::from_millis(10);

/// How one direction of a path between two public addresses behaves.
///
/// Every datagram draws its own fate when it is sent:
/// - it is lost with probability [`loss`](Self::loss), and independently by the
///   [`burst_loss`](Self::burst_loss) model when one is set;
/// - it arrives after [`delay`](Self::delay) plus a jitter drawn uniformly from
///   `[-jitter, +jitter]` (never before it was sent), plus both ends' access delays
///   (see `Sim::set_access_delay`);
/// - with probability [`reorder`](Self::reorder) it is held back a further
///   [`reorder_delay`](Self::reorder_delay), so datagrams sent just after it overtake it;
/// - with probability [`duplicate`](Self::duplicate) a second copy is delivered, with
///   its own jitter.
///
/// Jitter alone reorders datagrams sent closer together than the jitter spread, as on
/// a multi-path network. With [`fifo`](Self::fifo) set, a datagram never arrives
/// before one sent earlier on the same link (it waits for it), which models one
/// queue; held-back (reordered) datagrams are the only exception.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// Base one-way delay.
    pub delay: Duration,
    /// Half-width of the uniform jitter around `delay`.
    pub jitter: Duration,
    /// Keep datagrams in sending order despite jitter.
    pub fifo: bool,
    /// Probability in `[0, 1]` that a datagram is lost, independently of others.
    pub loss: f64,
    /// Bursty loss on top of `loss`.
    pub burst_loss: Option<GilbertElliott>,
    /// Probability in `[0, 1]` that a datagram is delivered twice.
    pub duplicate: f64,
    /// Probability in `[0, 1]` that a datagram is held back by `reorder_delay`.
    pub reorder: f64,
    /// How long a reordered datagram is held back; must be non-zero when `reorder` is.
    pub reorder_delay: Duration,
}

impl LinkConfig {
    /// A perfect link with a fixed one-way `delay`: no jitter, loss, duplication or
    /// reordering.
    pub fn new(delay: Duration) -> LinkConfig {
        LinkConfig {
            delay,
            jitter: Duration::ZERO,
            fifo: false,
            loss: 0.0,
            burst_loss: None,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
        }
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), SimError> {
        probability("LinkConfig::loss", self.loss)?;
        probability("LinkConfig::duplicate", self.duplicate)?;
        probability("LinkConfig::reorder", self.reorder)?;
        if self.reorder > 0.0 && self.reorder_delay.is_zero() {
            return Err(SimError::Invalid {
                what: "LinkConfig::reorder_delay",
                reason: "must be non-zero when reorder is set, or nothing is reordered".into(),
            });
        }
        Ok(())
    }

    /// Whether datagrams on this link need per-link state (the FIFO tail or the
    /// Gilbert-Elliott channel state).
    pub(crate) fn is_stateful(&self) -> bool {
        self.fifo || self.burst_loss.is_some()
    }

    /// The delay of one copy, in microseconds, before access delays and FIFO.
    pub(crate) fn draw_delay(&self, rng: &mut impl RngCore) -> (u64, bool) {
        let base = micros(self.delay);
        let jitter = micros(self.jitter);
        let mut delay = if jitter == 0 {
            base
        } else {
            let offset = crate::util::below(rng, jitter.saturating_mul(2).saturating_add(1));
            base.saturating_add(offset).saturating_sub(jitter)
        };
        let held = chance(rng, self.reorder);
        if held {
            delay = delay.saturating_add(micros(self.reorder_delay));
        }
        (delay, held)
    }
}

impl Default for LinkConfig {
    /// [`LinkConfig::new`] with [`DEFAULT_DELAY`].
    fn default() -> LinkConfig {
        LinkConfig::new(DEFAULT_DELAY)
    }
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn probability(what: &'static str, p: f64) -> Result<(), SimError> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(SimError::Invalid {
            what,
            reason: format!("{p} is not a probability in [0, 1]"),
        })
    }
}

/// Bursty loss: a two-state Markov channel (Gilbert-Elliott).
///
/// The channel is *good* or *bad*. Each datagram is lost with the loss probability of
/// the current state, then the state moves on: good to bad with probability `p`, bad
/// to good with probability `r`. In the long run the channel is bad `p / (p + r)` of
/// the time and stays bad for `1 / r` datagrams on average.
///
/// [`GilbertElliott::new`] builds the classic Gilbert channel (nothing lost while
/// good, everything lost while bad) from the two figures people quote: the loss rate
/// and the mean burst length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    p: f64,
    r: f64,
    loss_good: f64,
    loss_bad: f64,
}

impl GilbertElliott {
    /// A channel losing `loss_rate` of all datagrams in bursts of `mean_burst`
    /// datagrams on average.
    ///
    /// `loss_rate` must be in `[0, 1)`, `mean_burst` at least 1, and the pair
    /// reachable: `loss_rate <= mean_burst / (mean_burst + 1)` (a shorter mean burst
    /// cannot carry a higher loss rate, since bursts need gaps between them).
    pub fn new(loss_rate: f64, mean_burst: f64) -> Result<GilbertElliott, SimError> {
        if !(0.0..1.0).contains(&loss_rate) {
            return Err(SimError::Invalid {
                what: "GilbertElliott loss_rate",
                reason: format!("{loss_rate} is not in [0, 1)"),
            });
        }
        if !(mean_burst >= 1.0 && mean_burst.is_finite()) {
            return Err(SimError::Invalid {
                what: "GilbertElliott mean_burst",
                reason: format!("{mean_burst} is not a finite length of at least 1"),
            });
        }
        let r = 1.0 / mean_burst;
        let p = loss_rate * r / (1.0 - loss_rate);
        if p > 1.0 {
            return Err(SimError::Invalid {
                what: "GilbertElliott loss_rate",
                reason: format!(
                    "{loss_rate} cannot be reached with bursts of {mean_burst} (at most {})",
                    mean_burst / (mean_burst + 1.0)
                ),
            });
        }
        GilbertElliott::with_states(p, r, 0.0, 1.0)
    }

    /// The general channel: transition probabilities `p` (good to bad) and `r` (bad
    /// to good, non-zero), and the loss probability in each state.
    pub fn with_states(
        p: f64,
        r: f64,
        loss_good: f64,
        loss_bad: f64,
    ) -> Result<GilbertElliott, SimError> {
        probability("GilbertElliott p", p)?;
        probability("GilbertElliott r", r)?;
        probability("GilbertElliott loss_good", loss_good)?;
        probability("GilbertElliott loss_bad", loss_bad)?;
        if r == 0.0 {
            return Err(SimError::Invalid {
                what: "GilbertElliott r",
                reason: "must be non-zero, or the channel never leaves the bad state".into(),
            });
        }
        Ok(GilbertElliott {
            p,
            r,
            loss_good,
            loss_bad,
        })
    }

    /// The long-run fraction of datagrams lost.
    pub fn loss_rate(&self) -> f64 {
        let bad = self.p / (self.p + self.r);
        (1.0 - bad) * self.loss_good + bad * self.loss_bad
    }

    /// The mean number of consecutive datagrams sent in the bad state.
    pub fn mean_bad_run(&self) -> f64 {
        1.0 / self.r
    }

    /// Decides one datagram's fate on a channel in state `bad`, and moves the state.
    pub(crate) fn step(&self, bad: &mut bool, rng: &mut impl RngCore) -> bool {
        let lost = if *bad {
            chance(rng, self.loss_bad)
        } else {
            chance(rng, self.loss_good)
        };
        let flip = if *bad { self.r } else { self.p };
        if flip >= 1.0 || (flip > 0.0 && unit(rng) < flip) {
            *bad = !*bad;
        }
        lost
    }
}

/// A host's uplink: a serialising link of `bits_per_sec` behind a tail-drop queue of
/// `queue_bytes`.
///
/// Datagrams leave one after another, each taking its size over the rate; one that
/// finds more than `queue_bytes` waiting ahead of it is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uplink {
    /// Line rate; must be non-zero.
    pub bits_per_sec: u64,
    /// Bytes that may wait to be sent.
    pub queue_bytes: u64,
}

impl Uplink {
    pub(crate) fn validate(&self) -> Result<(), SimError> {
        if self.bits_per_sec == 0 {
            return Err(SimError::Invalid {
                what: "Uplink::bits_per_sec",
                reason: "must be non-zero".into(),
            });
        }
        Ok(())
    }

    /// Microseconds to put `len` bytes on the wire (rounded up).
    pub(crate) fn serialise_micros(&self, len: usize) -> u64 {
        let bits = (len as u128) * 8 * 1_000_000;
        u64::try_from(bits.div_ceil(u128::from(self.bits_per_sec))).unwrap_or(u64::MAX)
    }

    /// Bytes still waiting when the line is busy for `backlog_micros` more.
    pub(crate) fn backlog_bytes(&self, backlog_micros: u64) -> u64 {
        let bytes = u128::from(backlog_micros) * u128::from(self.bits_per_sec) / 8_000_000;
        u64::try_from(bytes).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gilbert_parameters_match_the_figures() {
        let ge = GilbertElliott::new(0.05, 4.0).expect("valid");
        assert!((ge.loss_rate() - 0.05).abs() < 1e-12);
        assert!((ge.mean_bad_run() - 4.0).abs() < 1e-12);
        assert!(GilbertElliott::new(0.6, 1.0).is_err());
        assert!(GilbertElliott::new(0.5, 1.0).is_ok());
        assert!(GilbertElliott::new(1.0, 3.0).is_err());
        assert!(GilbertElliott::new(0.1, 0.5).is_err());
        assert!(GilbertElliott::new(0.1, f64::NAN).is_err());
        assert!(GilbertElliott::with_states(0.1, 0.0, 0.0, 1.0).is_err());
    }

    #[test]
    fn link_validation_names_the_field() {
        let mut l = LinkConfig::new(Duration::from_millis(5));
        assert!(l.validate().is_ok());
        l.loss = 1.5;
        assert!(matches!(
            l.validate(),
            Err(SimError::Invalid {
                what: "LinkConfig::loss",
                ..
            })
        ));
        l.loss = 0.0;
        l.reorder = 0.1;
        assert!(matches!(
            l.validate(),
            Err(SimError::Invalid {
                what: "LinkConfig::reorder_delay",
                ..
            })
        ));
        l.duplicate = f64::NAN;
        assert!(l.validate().is_err());
    }

    #[test]
    fn uplink_timing() {
        let u = Uplink {
            bits_per_sec: 1_000_000,
            queue_bytes: 10_000,
        };
        assert_eq!(u.serialise_micros(125), 1000);
        assert_eq!(u.serialise_micros(1), 8);
        assert_eq!(u.backlog_bytes(1000), 125);
    }
}
