//! The receiver's de-duplicator for frames sent on two paths at once.

/// How many stream sequence numbers behind the newest the de-duplicator remembers:
/// 1024 frames are 20 s of audio, far beyond any jitter buffer's reach (a frame that
/// late is useless), so refusing older ones loses nothing. Costs 128 bytes.
pub const DEDUP_WINDOW: u32 = 1024;

const WORDS: usize = (DEDUP_WINDOW / 64) as usize;

/// Remembers which stream sequence numbers (`Media.seq`) were delivered, so the copy
/// that arrives second on another path is dropped.
///
/// Memory is a fixed bitmap of [`DEDUP_WINDOW`] bits around the newest number seen
/// (serial-number arithmetic, so the 32-bit wrap is handled). A frame is delivered
/// iff it was not delivered before and is less than [`DEDUP_WINDOW`] behind the
/// newest; so no frame is ever delivered twice.
#[derive(Debug, Clone)]
pub struct Deduplicator {
    newest: Option<u32>,
    bits: [u64; WORDS],
    duplicates: u64,
    too_old: u64,
}

impl Default for Deduplicator {
    fn default() -> Self {
        Deduplicator {
            newest: None,
            bits: [0; WORDS],
            duplicates: 0,
            too_old: 0,
        }
    }
}

fn index(seq: u32) -> (usize, u64) {
    let slot = seq % DEDUP_WINDOW;
    ((slot / 64) as usize, 1u64 << (slot % 64))
}

impl Deduplicator {
    /// True when `seq` is new and should be delivered; false for a copy already
    /// delivered or a frame too old to tell.
    pub fn accept(&mut self, seq: u32) -> bool {
        let Some(newest) = self.newest else {
            self.newest = Some(seq);
            self.set(seq);
            return true;
        };
        let ahead = seq.wrapping_sub(newest) as i32;
        if ahead > 0 {
            let ahead = ahead.unsigned_abs();
            if ahead >= DEDUP_WINDOW {
                self.bits = [0; WORDS];
            } else {
                // Forget the slots that the window slides over.
                for s in 1..=ahead {
                    let (w, b) = index(newest.wrapping_add(s));
                    self.bits[w] &= !b;
                }
            }
            self.newest = Some(seq);
            self.set(seq);
            return true;
        }
        if ahead.unsigned_abs() >= DEDUP_WINDOW {
            self.too_old += 1;
            return false;
        }
        let (w, b) = index(seq);
        if self.bits[w] & b != 0 {
            self.duplicates += 1;
            false
        } else {
            self.bits[w] |= b;
            true
        }
    }

    fn set(&mut self, seq: u32) {
        let (w, b) = index(seq);
        self.bits[w] |= b;
    }

    /// Copies dropped because the frame was already delivered.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Frames dropped for being more than [`DEDUP_WINDOW`] behind the newest.
    pub fn too_old(&self) -> u64 {
        self.too_old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_copy_is_dropped_and_wrap_is_handled() {
        let mut d = Deduplicator::default();
        let start = u32::MAX - 5;
        for i in 0..20u32 {
            let s = start.wrapping_add(i);
            assert!(d.accept(s), "{s}");
            assert!(!d.accept(s), "{s}");
        }
        assert_eq!(d.duplicates(), 20);
        // Reordered: 100 ahead, then the gap fills in once each.
        let top = start.wrapping_add(120);
        assert!(d.accept(top));
        assert!(d.accept(start.wrapping_add(50)));
        assert!(!d.accept(start.wrapping_add(50)));
        // Too old.
        assert!(!d.accept(top.wrapping_sub(DEDUP_WINDOW)));
        assert_eq!(d.too_old(), 1);
    }
}
