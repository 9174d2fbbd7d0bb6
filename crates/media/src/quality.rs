//! The ITU-T G.107 E-model: transmission rating R and estimated MOS from delay,
//! jitter and loss, in the simplified form network monitors commonly use.
//!
//! `R = R0 - Id - Ie,eff` (the simultaneous impairment `Is` and advantage `A` are
//! zero, as in G.107's default parameter set), with:
//!
//! - `R0 = 93.2`, the rating of G.107's default parameters with no impairment.
//! - Delay `Id` from Cole & Rosenbluth's fit of G.107's `Idd + Idte` for default
//!   echo parameters: `0.024 d + 0.11 (d - 177.3) H(d - 177.3)`, `d` the mouth-to-ear
//!   delay in ms. Jitter that no jitter buffer absorbed yet counts as
//!   [`JITTER_DELAY_WEIGHT`] times its value of extra delay (the delay a buffer would
//!   need); a caller that measured its playout delay includes it in the delay and
//!   passes zero jitter.
//! - Loss `Ie,eff = Ie + (95 - Ie) Ppl / (Ppl / BurstR + Bpl)` (G.107 §3.5), `Ppl`
//!   in percent, `BurstR` the burst ratio (1 for random loss).
//!
//! # Codec values for Opus
//!
//! G.113 tabulates `Ie`/`Bpl` for older codecs, not for Opus, and the wideband
//! E-model (G.107.1) needs values nobody has standardized for it either. So this
//! module stays on the narrowband scale (MOS at most 4.41) with [`OPUS`]:
//!
//! - `Ie = 0`: wideband Opus at 24 kb/s and above scores at or above G.711 in
//!   listening tests, and G.711 is the narrowband scale's `Ie = 0` reference; the
//!   scale cannot credit more than that.
//! - `Bpl = 25.1`: G.113 Appendix I's value for G.711 with packet loss concealment.
//!   Opus's concealment (SILK's LPC and pitch extrapolation) is at least that good for
//!   20 ms frames. The loss to feed in is the *residual* loss: frames concealed after
//!   FEC did what it could, so FEC's benefit is counted once, through `Ppl`.

/// R for G.107's default parameters with no impairment at all.
pub const R0: f64 = 93.2;

/// Unabsorbed jitter counts this many times over as delay: a jitter buffer covering
/// it would hold about twice the mean deviation.
pub const JITTER_DELAY_WEIGHT: f64 = 2.0;

/// Delay beyond which the conversational impairment grows steeply (Cole & Rosenbluth).
const DELAY_KNEE_MS: f64 = 177.3;

/// A codec's equipment impairment and its robustness to loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Codec {
    /// Equipment impairment factor `Ie`.
    pub ie: f64,
    /// Packet-loss robustness factor `Bpl`.
    pub bpl: f64,
}

/// Opus at ≥ 24 kb/s wideband with concealment; see the [module docs](self).
pub const OPUS: Codec = Codec { ie: 0.0, bpl: 25.1 };

/// What the listener's audio went through.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conditions {
    /// Mouth-to-ear delay, ms.
    pub delay_ms: f64,
    /// Jitter not absorbed by a jitter buffer already counted in `delay_ms`, ms.
    pub jitter_ms: f64,
    /// Fraction of frames lost (and not recovered), 0..=1.
    pub loss: f64,
    /// Burst ratio: mean observed loss burst length over the mean for random loss
    /// at the same rate (1 for random loss); see [`burst_ratio`].
    pub burst_ratio: f64,
}

impl Default for Conditions {
    fn default() -> Self {
        Conditions {
            delay_ms: 0.0,
            jitter_ms: 0.0,
            loss: 0.0,
            burst_ratio: 1.0,
        }
    }
}

fn finite_or(x: f64, fallback: f64) -> f64 {
    if x.is_finite() { x } else { fallback }
}

/// The burst ratio for a loss rate and a mean observed burst length in frames
/// (G.107 §3.5: observed mean burst over `1 / (1 - p)`, the random-loss mean).
pub fn burst_ratio(loss: f64, mean_burst_frames: f64) -> f64 {
    let p = finite_or(loss, 0.0).clamp(0.0, 0.999);
    let b = finite_or(mean_burst_frames, 1.0).max(1.0);
    (b * (1.0 - p)).max(1.0)
}

/// The transmission rating R, 0..=93.2.
pub fn r_factor(c: &Conditions, codec: &Codec) -> f64 {
    let delay = finite_or(c.delay_ms, 0.0).max(0.0)
        + JITTER_DELAY_WEIGHT * finite_or(c.jitter_ms, 0.0).max(0.0);
    let id = 0.024 * delay + 0.11 * (delay - DELAY_KNEE_MS).max(0.0);
    let ppl = finite_or(c.loss, 1.0).clamp(0.0, 1.0) * 100.0;
    let burst = finite_or(c.burst_ratio, 1.0).max(1.0);
    let ie_eff = codec.ie + (95.0 - codec.ie) * ppl / (ppl / burst + codec.bpl);
    (R0 - id - ie_eff).clamp(0.0, R0)
}

/// Estimated MOS (1.0..=4.5) for a rating R (G.107 Annex B).
pub fn mos_from_r(r: f64) -> f64 {
    let r = finite_or(r, 0.0);
    if r <= 0.0 {
        1.0
    } else if r >= 100.0 {
        4.5
    } else {
        1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7.0e-6
    }
}

/// Estimated MOS for `c` with `codec`.
pub fn mos(c: &Conditions, codec: &Codec) -> f64 {
    mos_from_r(r_factor(c, codec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_call_is_g107_default() {
        let r = r_factor(&Conditions::default(), &OPUS);
        assert!((r - 93.2).abs() < 1e-9);
        assert!((mos_from_r(r) - 4.41).abs() < 0.01);
    }

    #[test]
    fn delay_loss_and_bursts_lower_the_score_monotonically() {
        let base = Conditions {
            delay_ms: 100.0,
            ..Conditions::default()
        };
        let r_base = r_factor(&base, &OPUS);
        let late = r_factor(
            &Conditions {
                delay_ms: 300.0,
                ..base
            },
            &OPUS,
        );
        let lossy = r_factor(&Conditions { loss: 0.05, ..base }, &OPUS);
        let bursty = r_factor(
            &Conditions {
                loss: 0.05,
                burst_ratio: 3.0,
                ..base
            },
            &OPUS,
        );
        let jittery = r_factor(
            &Conditions {
                jitter_ms: 30.0,
                ..base
            },
            &OPUS,
        );
        assert!(late < r_base - 15.0, "{late}");
        assert!(lossy < r_base && bursty < lossy && jittery < r_base);
        // Ie,eff at 5 % random loss: 95 * 5 / (5 + 25.1) = 15.78.
        assert!((r_base - lossy - 15.78).abs() < 0.01);
        // The worst is still a valid MOS.
        let dead = Conditions {
            delay_ms: 5000.0,
            loss: 1.0,
            ..base
        };
        assert_eq!(mos(&dead, &OPUS), 1.0);
        let nan = Conditions {
            delay_ms: f64::NAN,
            loss: f64::NAN,
            ..base
        };
        assert!(mos(&nan, &OPUS) >= 1.0);
    }

    #[test]
    fn burst_ratio_is_one_for_random_loss() {
        // Random loss at p has mean burst 1 / (1 - p).
        assert!((burst_ratio(0.2, 1.25) - 1.0).abs() < 1e-9);
        assert!((burst_ratio(0.1, 3.0) - 2.7).abs() < 1e-9);
    }
}
