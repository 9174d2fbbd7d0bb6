//! Property tests of the jitter buffer: whatever arrives, in whatever order, no frame
//! is played twice, playout never goes backwards, and memory stays bounded.

use std::collections::HashSet;

use peercall_media::jitter::{CAPACITY, JitterBuffer, JitterConfig, Playout};
use peercall_wire::Time;
use proptest::prelude::*;

const T0: u64 = 1_700_000_000_000_000;
const FRAME: u32 = 960;

/// First payload byte of the realistic stream's packets (wild ones repeat 7).
const STREAM_TAG: u8 = 1;

/// Checks one pull's answer against everything played before.
struct Checker {
    played: HashSet<u32>,
    last: Option<u32>,
}

impl Checker {
    fn new() -> Self {
        Checker {
            played: HashSet::new(),
            last: None,
        }
    }

    fn see(&mut self, out: &Playout<'_>) -> Result<(), TestCaseError> {
        let seq = match *out {
            Playout::Play { seq, payload, .. } => {
                prop_assert!(!payload.is_empty());
                seq
            }
            Playout::Recover { seq, ahead, next } => {
                prop_assert!(!next.is_empty());
                prop_assert!(ahead >= 1 && (ahead as usize) < CAPACITY);
                // Packets of the realistic stream carry their own sequence number:
                // the redundancy offered must come from the packet `ahead` on.
                if let [STREAM_TAG, a, b, c, d] = *next {
                    let from = u32::from_le_bytes([a, b, c, d]);
                    prop_assert_eq!(from, seq.wrapping_add(ahead));
                }
                seq
            }
            _ => return Ok(()),
        };
        prop_assert!(self.played.insert(seq), "frame {} played twice", seq);
        if let Some(last) = self.last {
            // 32-bit numbers unwrap to the nearest value after the last played frame,
            // as the buffer does.
            let step = seq.wrapping_sub(last.wrapping_add(1)) as i32;
            prop_assert!(step >= 0, "playout went back from {} to {}", last, seq);
        }
        self.last = Some(seq);
        Ok(())
    }
}

fn check_bounds(jb: &JitterBuffer) -> Result<(), TestCaseError> {
    prop_assert!(jb.buffered() <= CAPACITY);
    let s = jb.stats();
    prop_assert!(s.played <= s.received);
    prop_assert!(s.target_delay.as_millis() >= 20 && s.target_delay.as_millis() <= 200);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A realistic stream: frames every 20 ms, each lost, delayed by up to 300 ms,
    /// or duplicated (a second path), plus a few wild packets from anywhere.
    #[test]
    fn any_arrival_order_keeps_the_invariants(
        base_seq in any::<u32>(),
        base_ts in any::<u32>(),
        frames in prop::collection::vec((0u8..100, 0u64..300, 0u64..300, any::<bool>()), 1..250),
        wild in prop::collection::vec((any::<u32>(), any::<u32>(), 0usize..300, 0usize..40), 0..4),
        silent in any::<bool>(),
    ) {
        let mut arrivals: Vec<(u64, u32, u32, Vec<u8>)> = Vec::new();
        for (k, &(roll, delay, second_delay, dup)) in frames.iter().enumerate() {
            if roll < 10 {
                continue;
            }
            let k32 = k as u32;
            let seq = base_seq.wrapping_add(k32);
            let ts = base_ts.wrapping_add(k32.wrapping_mul(FRAME));
            let sent = k as u64 * 20;
            let mut payload = vec![STREAM_TAG];
            payload.extend_from_slice(&seq.to_le_bytes());
            arrivals.push((sent + delay, seq, ts, payload.clone()));
            if dup {
                arrivals.push((sent + second_delay, seq, ts, payload));
            }
        }
        for &(seq, ts, at, len) in &wild {
            arrivals.push((at as u64 * 20, seq, ts, vec![7; len]));
        }
        arrivals.sort_by_key(|a| a.0);

        let mut jb = JitterBuffer::new(JitterConfig::default()).unwrap();
        let mut check = Checker::new();
        let mut i = 0;
        for pull in 0..(frames.len() as u64 + 40) {
            let now = pull * 20 + 7;
            while i < arrivals.len() && arrivals[i].0 <= now {
                let (at, seq, ts, ref payload) = arrivals[i];
                jb.push(Time::from_micros(T0 + at * 1000), seq, ts, 0, payload);
                i += 1;
            }
            let out = jb.pull(Time::from_micros(T0 + now * 1000), silent);
            check.see(&out)?;
            check_bounds(&jb)?;
        }
    }

    /// Adversarial: arbitrary pushes (any sequence number near or far, any timestamp,
    /// any flags, any length) interleaved with pulls at arbitrary moments.
    #[test]
    fn arbitrary_pushes_and_pulls_keep_the_invariants(
        ops in prop::collection::vec(
            (any::<bool>(), -80i64..200, any::<u32>(), any::<u8>(), 0usize..1400, 0u64..50, any::<bool>()),
            1..400,
        ),
    ) {
        let mut jb = JitterBuffer::new(JitterConfig::default()).unwrap();
        let mut check = Checker::new();
        let mut now = T0;
        let mut anchor: u32 = 5_000;
        let payload = vec![3u8; 1400];
        for (is_pull, seq_off, ts, flags, len, advance_ms, silent) in ops {
            now += advance_ms * 1000;
            if is_pull {
                let out = jb.pull(Time::from_micros(now), silent);
                check.see(&out)?;
            } else {
                let seq = anchor.wrapping_add(seq_off as u32);
                anchor = anchor.wrapping_add(1);
                let _ = jb.push(Time::from_micros(now), seq, ts, flags, &payload[..len]);
            }
            check_bounds(&jb)?;
        }
    }
}
