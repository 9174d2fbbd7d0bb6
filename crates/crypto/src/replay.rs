//! Anti-replay: a sliding window over transport counters (RFC 6479).
//!
//! The window is a ring of 64-bit blocks. Bit `c % RING_BITS` records whether counter
//! `c` was seen. When the highest counter advances, whole blocks that slide out are
//! zeroed, so an update costs at most one pass over the ring and usually touches one
//! word. One block is always kept as slack for that clearing, so the window proper is
//! [`WINDOW`] counters: enough for packets reordered across paths of very different
//! delay (at 50 packets/s of voice that is over a minute of reordering; at line rate,
//! several milliseconds).

/// Bits per ring block.
const BLOCK_BITS: u64 = 64;
/// Blocks in the ring: 64 × 64 = 4096 bits, 512 bytes per session.
const BLOCKS: usize = 64;
/// Bits in the ring.
const RING_BITS: u64 = BLOCK_BITS * BLOCKS as u64;
/// Counters accepted (once each), the highest seen included: the ring minus one block
/// of slack, per RFC 6479.
pub const WINDOW: u64 = RING_BITS - BLOCK_BITS;

/// Remembers which counters were received, accepting each at most once and refusing
/// any [`WINDOW`] or more below the highest seen.
///
/// Use [`ReplayWindow::check`] before authenticating a packet and
/// [`ReplayWindow::commit`] after, so forged packets never move the window.
#[derive(Clone)]
pub struct ReplayWindow {
    /// One more than the highest counter committed; 0 when none was.
    next: u64,
    ring: [u64; BLOCKS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow::new()
    }
}

impl std::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayWindow")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

fn slot(counter: u64) -> (usize, u64) {
    let bit = counter % RING_BITS;
    ((bit / BLOCK_BITS) as usize, 1 << (bit % BLOCK_BITS))
}

impl ReplayWindow {
    /// An empty window: every counter is new.
    pub fn new() -> ReplayWindow {
        ReplayWindow {
            next: 0,
            ring: [0; BLOCKS],
        }
    }

    /// Whether `counter` would be accepted: newer than anything seen, or inside the
    /// window and not seen yet. Changes nothing.
    pub fn check(&self, counter: u64) -> bool {
        if counter >= self.next {
            return true;
        }
        if self.next - counter > WINDOW {
            return false;
        }
        let (block, mask) = slot(counter);
        self.ring[block] & mask == 0
    }

    /// Marks `counter` as received. Call only after [`ReplayWindow::check`] accepted it
    /// and the packet authenticated.
    pub fn commit(&mut self, counter: u64) {
        if counter >= self.next {
            // Zero the blocks that slide out, from the one after the current top up to
            // the new one (at most the whole ring).
            let first = if self.next == 0 {
                0
            } else {
                (self.next - 1) / BLOCK_BITS + 1
            };
            let last = counter / BLOCK_BITS;
            let span = (last + 1).saturating_sub(first).min(BLOCKS as u64);
            for i in 0..span {
                let block = ((last - i) % BLOCKS as u64) as usize;
                self.ring[block] = 0;
            }
            self.next = counter + 1;
        }
        let (block, mask) = slot(counter);
        self.ring[block] |= mask;
    }

    /// [`ReplayWindow::check`] then [`ReplayWindow::commit`]: true if `counter` was new.
    pub fn check_and_update(&mut self, counter: u64) -> bool {
        if self.check(counter) {
            self.commit(counter);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn accepts_once_and_refuses_old() {
        let mut w = ReplayWindow::new();
        assert!(w.check_and_update(0));
        assert!(!w.check_and_update(0));
        assert!(w.check_and_update(5));
        assert!(w.check_and_update(3));
        assert!(!w.check_and_update(3));
        assert!(w.check_and_update(10_000));
        // The window holds WINDOW counters, the highest included.
        assert!(!w.check(10_000 - WINDOW));
        assert!(w.check_and_update(10_000 - WINDOW + 1));
        assert!(!w.check(10_000 - WINDOW + 1));
        assert!(w.check_and_update(9_999));
        assert!(!w.check(5));
    }

    #[test]
    fn window_is_at_least_2048() {
        let mut w = ReplayWindow::new();
        assert!(w.check_and_update(3000));
        for c in (3000 - 2048)..3000 {
            assert!(w.check_and_update(c), "counter {c} inside the window");
        }
    }

    #[test]
    fn a_large_jump_clears_everything() {
        let mut w = ReplayWindow::new();
        for c in 0..100 {
            w.commit(c);
        }
        w.commit(100 + RING_BITS * 3 + 17);
        let top = 100 + RING_BITS * 3 + 17;
        for c in (top - WINDOW + 1)..top {
            assert!(w.check(c), "stale bit for {c}");
        }
    }

    /// The obvious model: a set of everything accepted and the highest counter.
    struct Model {
        seen: HashSet<u64>,
        top: Option<u64>,
    }

    impl Model {
        fn accept(&mut self, c: u64) -> bool {
            if let Some(top) = self.top
                && (c + WINDOW < top + 1 || self.seen.contains(&c))
            {
                return false;
            }
            self.seen.insert(c);
            self.top = Some(self.top.map_or(c, |t| t.max(c)));
            true
        }
    }

    proptest! {
        #[test]
        fn matches_a_set_model(steps in proptest::collection::vec((0u64..3, 0u64..6000), 1..400)) {
            let mut w = ReplayWindow::new();
            let mut m = Model { seen: HashSet::new(), top: None };
            let mut base = 0u64;
            for (kind, v) in steps {
                // Mix small reorderings near the top with big jumps forward.
                let c = match kind {
                    0 => base.saturating_sub(v),
                    1 => base + v % 64,
                    _ => { base += v; base }
                };
                prop_assert_eq!(w.check_and_update(c), m.accept(c), "counter {}", c);
                base = base.max(c);
            }
        }
    }
}
