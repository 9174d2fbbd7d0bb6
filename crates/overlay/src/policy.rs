//! Policy behind small traits, each with a documented default.

use std::fmt::Debug;

use crate::config::ElectionConfig;
use crate::msg::Capabilities;

/// Who may be promoted and how candidates rank.
pub trait ElectionPolicy: Debug + Send {
    /// Whether `caps` meet the configured minimums (dial-back is checked apart).
    fn eligible(&self, caps: &Capabilities, config: &ElectionConfig) -> bool;
    /// A score: higher is a better supernode. Ties break by key.
    fn score(&self, caps: &Capabilities) -> u32;
}

/// The default election policy: minimums as configured; the score adds uptime
/// (10 points per hour, capped at three days, since stable hosts matter most),
/// bandwidth (10 points per Mbit/s, capped at 100 Mbit/s) and CPU headroom (5 points
/// per percent), so a day of uptime weighs like 24 Mbit/s or 48% CPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultElection;

/// Uptime counted by the default score, hours.
const SCORE_MAX_UPTIME_HOURS: u32 = 72;
/// Bandwidth counted by the default score, Mbit/s.
const SCORE_MAX_MBPS: u32 = 100;

impl ElectionPolicy for DefaultElection {
    fn eligible(&self, caps: &Capabilities, config: &ElectionConfig) -> bool {
        u64::from(caps.uptime_s) >= config.min_uptime.as_secs()
            && caps.bandwidth_kbps >= config.min_bandwidth_kbps
            && caps.cpu_headroom_pct >= config.min_cpu_headroom_pct
            && caps.reflexive.is_some()
    }

    fn score(&self, caps: &Capabilities) -> u32 {
        let hours = (caps.uptime_s / 3600).min(SCORE_MAX_UPTIME_HOURS);
        let mbps = (caps.bandwidth_kbps / 1000).min(SCORE_MAX_MBPS);
        hours * 10 + mbps * 10 + u32::from(caps.cpu_headroom_pct.min(100)) * 5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(uptime_s: u32, bw: u32, cpu: u8) -> Capabilities {
        Capabilities {
            uptime_s,
            bandwidth_kbps: bw,
            cpu_headroom_pct: cpu,
            local: vec![],
            reflexive: Some("198.51.100.1:1".parse().expect("addr")),
            recent: vec![],
        }
    }

    #[test]
    fn minimums_and_ranking() {
        let p = DefaultElection;
        let cfg = ElectionConfig::default();
        assert!(p.eligible(&caps(3600, 5_000, 50), &cfg));
        assert!(!p.eligible(&caps(3599, 5_000, 50), &cfg));
        assert!(!p.eligible(&caps(3600, 4_999, 50), &cfg));
        assert!(!p.eligible(&caps(3600, 5_000, 49), &cfg));
        let mut no_reflexive = caps(7200, 9_000, 90);
        no_reflexive.reflexive = None;
        assert!(!p.eligible(&no_reflexive, &cfg));
        assert_eq!(
            p.score(&caps(24 * 3600, 0, 0)),
            p.score(&caps(0, 24_000, 0))
        );
        assert!(p.score(&caps(7200, 20_000, 80)) > p.score(&caps(7200, 10_000, 80)));
        assert_eq!(p.score(&caps(u32::MAX, u32::MAX, 255)), 720 + 1000 + 500);
    }
}
