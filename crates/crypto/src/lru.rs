//! A bounded map that evicts its least recently used entry.
//!
//! Built on two `BTreeMap`s (entries, and use order), so it needs no hasher: no OS
//! randomness, deterministic behaviour, and no hash-flooding by attacker-chosen keys.
//! Every operation is `O(log n)`.

use std::collections::BTreeMap;

pub(crate) struct LruMap<K, V> {
    entries: BTreeMap<K, (V, u64)>,
    order: BTreeMap<u64, K>,
    tick: u64,
    capacity: usize,
}

impl<K: Ord + Clone, V> LruMap<K, V> {
    /// A map that never holds more than `capacity` entries (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        LruMap {
            entries: BTreeMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            capacity: capacity.max(1),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Looks `key` up without changing its place in the use order.
    pub(crate) fn peek(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|(v, _)| v)
    }

    /// Looks `key` up and marks it most recently used.
    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let tick = self.next_tick();
        let (v, stamp) = self.entries.get_mut(key)?;
        self.order.remove(stamp);
        *stamp = tick;
        self.order.insert(tick, key.clone());
        Some(v)
    }

    /// Inserts or replaces `key`, marking it most recently used. Returns the entry
    /// evicted to make room, if any.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<(K, V)> {
        let tick = self.next_tick();
        if let Some((v, stamp)) = self.entries.get_mut(&key) {
            *v = value;
            self.order.remove(stamp);
            *stamp = tick;
            self.order.insert(tick, key);
            return None;
        }
        let evicted = if self.entries.len() >= self.capacity {
            self.pop_oldest()
        } else {
            None
        };
        self.order.insert(tick, key.clone());
        self.entries.insert(key, (value, tick));
        evicted
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let (v, stamp) = self.entries.remove(key)?;
        self.order.remove(&stamp);
        Some(v)
    }

    /// Removes and returns the least recently used entry.
    pub(crate) fn pop_oldest(&mut self) -> Option<(K, V)> {
        let (_, key) = self.order.pop_first()?;
        let (v, _) = self.entries.remove(&key)?;
        Some((key, v))
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_and_stays_bounded() {
        let mut m = LruMap::new(3);
        assert!(m.insert(1, "a").is_none());
        assert!(m.insert(2, "b").is_none());
        assert!(m.insert(3, "c").is_none());
        // Touch 1 so 2 becomes the oldest.
        assert_eq!(m.get_mut(&1), Some(&mut "a"));
        assert_eq!(m.insert(4, "d"), Some((2, "b")));
        assert_eq!(m.len(), 3);
        assert_eq!(m.peek(&2), None);
        // Replacing an entry never evicts.
        assert!(m.insert(4, "e").is_none());
        assert_eq!(m.remove(&3), Some("c"));
        assert_eq!(m.pop_oldest(), Some((1, "a")));
        assert_eq!(m.pop_oldest(), Some((4, "e")));
        assert_eq!(m.pop_oldest(), None);
        for i in 0..100 {
            m.insert(i, "x");
            assert!(m.len() <= 3);
        }
    }
}
