//! The event queue: a binary heap ordered by time, ties broken by insertion order.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use peercall_wire::Time;

/// What happens when an entry comes due. Payloads live in slabs; the heap holds
/// only small copyable entries (24 bytes), which keeps sifting cheap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// A datagram arrives: index into the network's in-flight slab.
    Deliver(u32),
    /// A node's timer; stale unless its time is the one the node has armed.
    Timer(u32),
    /// A scheduled action: index into the harness's action slab.
    Action(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    at: Time,
    seq: u64,
    due: Due,
}

impl Ord for Entry {
    /// Reversed, so that the max-heap pops the earliest entry, and of entries due at
    /// the same time the one queued first: the tie-break that makes runs replay.
    fn cmp(&self, other: &Entry) -> Ordering {
        other.at.cmp(&self.at).then(other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Entry) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Pending events.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    heap: BinaryHeap<Entry>,
    seq: u64,
}

impl Queue {
    pub(crate) fn push(&mut self, at: Time, due: Due) {
        self.seq += 1;
        self.heap.push(Entry {
            at,
            seq: self.seq,
            due,
        });
    }

    pub(crate) fn peek_time(&self) -> Option<Time> {
        self.heap.peek().map(|e| e.at)
    }

    pub(crate) fn pop(&mut self) -> Option<(Time, Due)> {
        self.heap.pop().map(|e| (e.at, e.due))
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}

/// A vector of reusable slots addressed by `u32`.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Slab<T> {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    pub(crate) fn insert(&mut self, item: T) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.items[i as usize] = Some(item);
                i
            }
            None => {
                let i = u32::try_from(self.items.len())
                    .expect("fewer than 2^32 items are ever pending at once");
                self.items.push(Some(item));
                i
            }
        }
    }

    pub(crate) fn take(&mut self, i: u32) -> Option<T> {
        let item = self.items.get_mut(i as usize)?.take()?;
        self.free.push(i);
        Some(item)
    }

    /// Occupied slots.
    pub(crate) fn len(&self) -> usize {
        self.items.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_stay_small() {
        assert_eq!(std::mem::size_of::<Entry>(), 24);
    }

    #[test]
    fn pops_by_time_then_insertion_order() {
        let mut q = Queue::default();
        q.push(Time::from_micros(5), Due::Action(0));
        q.push(Time::from_micros(3), Due::Action(1));
        q.push(Time::from_micros(5), Due::Action(2));
        q.push(Time::from_micros(3), Due::Action(3));
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).map(|(_, d)| d).collect();
        assert_eq!(
            order,
            [
                Due::Action(1),
                Due::Action(3),
                Due::Action(0),
                Due::Action(2)
            ]
        );
    }

    #[test]
    fn slab_reuses_slots() {
        let mut s = Slab::default();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_eq!(s.take(a), Some("a"));
        assert_eq!(s.take(a), None);
        assert_eq!(s.insert("c"), a);
        assert_eq!(s.len(), 2);
        assert_eq!(s.take(b), Some("b"));
        assert_eq!(s.take(99), None);
    }
}
