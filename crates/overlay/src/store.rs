//! The directory share a supernode stores: signed records keyed by user id, with a
//! handle index, in a compact layout.
//!
//! # Layout
//! A slab of entries (the user id and the record's signed bytes in one boxed slice)
//! plus two `hashbrown::HashTable<u32>` indexes holding only slab positions: by user
//! id, and by handle for records that claim one. Sequence numbers, expiry and the
//! handle are read from the signed bytes (the record encoding is fixed; see
//! `peercall_crypto::record`), so nothing is stored twice. Expiry is enforced by a
//! sweep ([`Store::purge_expired`]) rather than a heap, which would cost 16 bytes
//! per record and per refresh. At a million records this is about 60 bytes of
//! index overhead per record beyond its signed bytes (see [`Store::overhead_bytes`]
//! and the `directory` bench).
//!
//! The store trusts its caller to have verified each record's signature and
//! freshness (`Record::verify_at`); it enforces sequence order, the handle rule
//! (first come while live) and expiry.

use hashbrown::HashTable;
use peercall_crypto::UserId;
use peercall_crypto::record::RECORD_VERSION;
use peercall_wire::Time;
use thiserror::Error;

use crate::util::KeyedState;

/// Offsets in the record encoding (`peercall_crypto::record`, version 1):
/// `version 1 | identity key 32 | seq 8 | expires 8 | body_len 2 | body | sig 64`.
mod layout {
    pub const SEQ: usize = 33;
    pub const EXPIRES: usize = 41;
    pub const BODY: usize = 51;
    pub const SIG: usize = 64;
}

/// Read-only views of a verified record's signed bytes.
pub mod view {
    use super::layout;

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_be_bytes(w)
    }

    /// The sequence number.
    pub fn seq(bytes: &[u8]) -> u64 {
        u64_at(bytes, layout::SEQ)
    }

    /// The expiry, Unix seconds.
    pub fn expires(bytes: &[u8]) -> u64 {
        u64_at(bytes, layout::EXPIRES)
    }

    /// The handle, if the record claims one.
    pub fn handle(bytes: &[u8]) -> Option<&str> {
        let len = usize::from(bytes[layout::BODY]);
        if len == 0 {
            return None;
        }
        std::str::from_utf8(&bytes[layout::BODY + 1..layout::BODY + 1 + len]).ok()
    }

    /// The signed body (claims without sequence number and expiry): two records with
    /// the same body say the same thing about where the user is.
    pub fn body(bytes: &[u8]) -> &[u8] {
        &bytes[layout::BODY..bytes.len() - layout::SIG]
    }

    /// Whether the record lists any endpoint (a record without is the signed
    /// "offline" record a node publishes on a graceful exit).
    pub fn online(bytes: &[u8]) -> bool {
        let hlen = usize::from(bytes[layout::BODY]);
        bytes[layout::BODY + 1 + hlen + 32] > 0
    }
}

/// Why the store refused a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum StoreError {
    /// Not newer than the record held.
    #[error("stale record: sequence {seq} is not above {current}")]
    Stale {
        /// Offered.
        seq: u64,
        /// Held.
        current: u64,
    },
    /// Another user's live record claims the handle.
    #[error("handle claimed by another live user")]
    HandleTaken,
    /// Expired at `now`.
    #[error("record expired")]
    Expired,
    /// Not a version-1 record (the caller should have verified it).
    #[error("not a verified version-1 record")]
    Layout,
}

/// What an accepted store changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// The first record held for this user.
    New,
    /// Replaced an older record; `changed` when the claims (body) differ, which is
    /// what presence subscribers care about.
    Replaced {
        /// The body changed.
        changed: bool,
    },
}

#[derive(Debug)]
struct Entry {
    user: [u8; 32],
    /// The signed record bytes; empty for a free slot.
    bytes: Box<[u8]>,
}

/// A compact record store. See the module documentation.
#[derive(Debug)]
pub struct Store {
    entries: Vec<Entry>,
    free: Vec<u32>,
    by_user: HashTable<u32>,
    by_handle: HashTable<u32>,
    hasher: KeyedState,
    record_bytes: usize,
}

impl Store {
    /// An empty store whose index hashes are keyed by `hasher`.
    pub fn new(hasher: KeyedState) -> Store {
        Store {
            entries: Vec::new(),
            free: Vec::new(),
            by_user: HashTable::new(),
            by_handle: HashTable::new(),
            hasher,
            record_bytes: 0,
        }
    }

    fn user_hash(&self, user: &[u8; 32]) -> u64 {
        self.hasher.hash32(user)
    }

    fn handle_hash(hasher: &KeyedState, handle: &str) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = hasher.build_hasher();
        h.write(handle.as_bytes());
        h.finish()
    }

    fn slot_of(&self, user: &[u8; 32]) -> Option<u32> {
        let entries = &self.entries;
        self.by_user
            .find(self.user_hash(user), |&s| entries[s as usize].user == *user)
            .copied()
    }

    fn slot_of_handle(&self, handle: &str) -> Option<u32> {
        let entries = &self.entries;
        self.by_handle
            .find(Self::handle_hash(&self.hasher, handle), |&s| {
                view::handle(&entries[s as usize].bytes) == Some(handle)
            })
            .copied()
    }

    /// The record held for `user`.
    pub fn get(&self, user: &UserId) -> Option<&[u8]> {
        self.slot_of(&user.0)
            .map(|s| &*self.entries[s as usize].bytes)
    }

    /// The record claiming `handle`, and its user.
    pub fn get_by_handle(&self, handle: &str) -> Option<(UserId, &[u8])> {
        self.slot_of_handle(handle).map(|s| {
            let e = &self.entries[s as usize];
            (UserId(e.user), &*e.bytes)
        })
    }

    /// Stores `bytes` (a verified record of `user`) at `now`.
    pub fn insert(&mut self, now: Time, user: UserId, bytes: &[u8]) -> Result<Stored, StoreError> {
        if bytes.len() < layout::BODY + 1 + layout::SIG || bytes[0] != RECORD_VERSION {
            return Err(StoreError::Layout);
        }
        if view::expires(bytes) <= now.as_secs() {
            return Err(StoreError::Expired);
        }
        let existing = self.slot_of(&user.0);
        if let Some(s) = existing {
            let current = view::seq(&self.entries[s as usize].bytes);
            let seq = view::seq(bytes);
            if seq <= current {
                return Err(StoreError::Stale { seq, current });
            }
        }
        if let Some(handle) = view::handle(bytes)
            && let Some(other) = self.slot_of_handle(handle)
        {
            let e = &self.entries[other as usize];
            if e.user != user.0 {
                if view::expires(&e.bytes) > now.as_secs() {
                    return Err(StoreError::HandleTaken);
                }
                // An expired claim: the handle is free again.
                let stale_user = UserId(e.user);
                self.remove(&stale_user);
            }
        }
        let stored = match existing {
            Some(s) => {
                let old = std::mem::take(&mut self.entries[s as usize].bytes);
                let changed = view::body(&old) != view::body(bytes);
                self.unindex_handle(s, &old);
                self.record_bytes -= old.len();
                self.entries[s as usize].bytes = bytes.into();
                self.record_bytes += bytes.len();
                self.index_handle(s);
                Stored::Replaced { changed }
            }
            None => {
                let entry = Entry {
                    user: user.0,
                    bytes: bytes.into(),
                };
                let s = match self.free.pop() {
                    Some(s) => {
                        self.entries[s as usize] = entry;
                        s
                    }
                    None => {
                        self.entries.push(entry);
                        (self.entries.len() - 1) as u32
                    }
                };
                self.record_bytes += bytes.len();
                let hash = self.user_hash(&user.0);
                let (entries, hasher) = (&self.entries, &self.hasher);
                self.by_user
                    .insert_unique(hash, s, |&x| hasher.hash32(&entries[x as usize].user));
                self.index_handle(s);
                Stored::New
            }
        };
        Ok(stored)
    }

    fn index_handle(&mut self, s: u32) {
        let (entries, hasher) = (&self.entries, &self.hasher);
        if let Some(handle) = view::handle(&entries[s as usize].bytes) {
            let hash = Self::handle_hash(hasher, handle);
            self.by_handle.insert_unique(hash, s, |&x| {
                view::handle(&entries[x as usize].bytes).map_or(0, |h| Self::handle_hash(hasher, h))
            });
        }
    }

    fn unindex_handle(&mut self, s: u32, bytes: &[u8]) {
        if let Some(handle) = view::handle(bytes)
            && let Ok(e) = self
                .by_handle
                .find_entry(Self::handle_hash(&self.hasher, handle), |&x| x == s)
        {
            e.remove();
        }
    }

    /// Forgets `user`'s record; returns whether there was one.
    pub fn remove(&mut self, user: &UserId) -> bool {
        let Some(s) = self.slot_of(&user.0) else {
            return false;
        };
        let hash = self.user_hash(&user.0);
        if let Ok(e) = self.by_user.find_entry(hash, |&x| x == s) {
            e.remove();
        }
        let old = std::mem::take(&mut self.entries[s as usize].bytes);
        self.unindex_handle(s, &old);
        self.record_bytes -= old.len();
        self.free.push(s);
        true
    }

    /// Removes every record expired at `now`, appending their users to `gone`.
    /// `O(slots)`: run it every few seconds, not per packet.
    #[allow(clippy::needless_range_loop)] // `gone` is read while `self` is changed.
    pub fn purge_expired(&mut self, now: Time, gone: &mut Vec<UserId>) {
        let start = gone.len();
        for e in &self.entries {
            if !e.bytes.is_empty() && view::expires(&e.bytes) <= now.as_secs() {
                gone.push(UserId(e.user));
            }
        }
        for i in start..gone.len() {
            let user = gone[i];
            self.remove(&user);
        }
    }

    /// Every held record with its user, in slab order.
    pub fn iter(&self) -> impl Iterator<Item = (UserId, &[u8])> + '_ {
        self.entries
            .iter()
            .filter(|e| !e.bytes.is_empty())
            .map(|e| (UserId(e.user), &*e.bytes))
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.by_user.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.by_user.is_empty()
    }

    /// Bytes of signed records held.
    pub fn record_bytes(&self) -> usize {
        self.record_bytes
    }

    /// Bytes the store allocates beyond the records' signed bytes: slab, free list
    /// and both indexes (allocator rounding of each record's box is not included).
    pub fn overhead_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.free.capacity() * std::mem::size_of::<u32>()
            + self.by_user.allocation_size()
            + self.by_handle.allocation_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peercall_crypto::{Handle, Identity, PeerKey, Record, RecordBody};

    fn record(
        id: &Identity,
        seq: u64,
        expires: u64,
        handle: Option<&str>,
        online: bool,
    ) -> Vec<u8> {
        let body = RecordBody {
            handle: handle.map(|h| Handle::new(h).expect("valid")),
            static_key: PeerKey([1; 32]),
            endpoints: if online {
                vec!["198.51.100.1:4000".parse().expect("addr")]
            } else {
                vec![]
            },
            supernodes: vec![],
        };
        Record::sign(id, seq, expires, &body).expect("signs")
    }

    fn id(n: u8) -> Identity {
        Identity::from_seed([n; 32])
    }

    #[test]
    fn views_read_the_signed_fields() {
        let bytes = record(&id(1), 42, 5_000, Some("carol"), true);
        assert_eq!(view::seq(&bytes), 42);
        assert_eq!(view::expires(&bytes), 5_000);
        assert_eq!(view::handle(&bytes), Some("carol"));
        assert!(view::online(&bytes));
        let off = record(&id(1), 43, 5_000, None, false);
        assert_eq!(view::handle(&off), None);
        assert!(!view::online(&off));
    }

    #[test]
    fn newest_wins_and_handles_are_first_come() {
        let now = Time::from_secs(1_000);
        let mut s = Store::new(KeyedState::fixed(1, 2));
        let (a, b) = (id(1), id(2));
        let (ua, ub) = (a.user_id(), b.user_id());
        assert_eq!(
            s.insert(now, ua, &record(&a, 2, 2_000, Some("alice"), true)),
            Ok(Stored::New)
        );
        assert_eq!(
            s.insert(now, ua, &record(&a, 2, 2_000, Some("alice"), true)),
            Err(StoreError::Stale { seq: 2, current: 2 })
        );
        assert_eq!(
            s.insert(now, ua, &record(&a, 1, 2_000, Some("alice"), true)),
            Err(StoreError::Stale { seq: 1, current: 2 })
        );
        assert_eq!(
            s.insert(now, ub, &record(&b, 1, 2_000, Some("alice"), true)),
            Err(StoreError::HandleTaken)
        );
        assert_eq!(
            s.insert(now, ua, &record(&a, 3, 2_100, Some("alice"), true)),
            Ok(Stored::Replaced { changed: false })
        );
        assert_eq!(
            s.insert(now, ua, &record(&a, 4, 2_100, Some("alice"), false)),
            Ok(Stored::Replaced { changed: true })
        );
        assert_eq!(s.get_by_handle("alice").map(|(u, _)| u), Some(ua));
        // Renaming frees the old handle.
        s.insert(now, ua, &record(&a, 5, 2_100, Some("alicia"), true))
            .expect("stores");
        assert!(s.get_by_handle("alice").is_none());
        assert_eq!(
            s.insert(now, ub, &record(&b, 1, 2_000, Some("alice"), true)),
            Ok(Stored::New)
        );
        assert_eq!(s.len(), 2);
        // Expired records are refused and purged; their handles become free.
        assert_eq!(
            s.insert(now, id(3).user_id(), &record(&id(3), 1, 1_000, None, true)),
            Err(StoreError::Expired)
        );
        let mut gone = Vec::new();
        s.purge_expired(Time::from_secs(2_050), &mut gone);
        assert_eq!(gone, vec![ub]);
        assert!(s.get(&ub).is_none());
        assert!(s.get(&ua).is_some());
        assert_eq!(
            s.insert(
                Time::from_secs(2_050),
                id(4).user_id(),
                &record(&id(4), 1, 3_000, Some("alice"), true)
            ),
            Ok(Stored::New)
        );
        // An expired claimant loses the handle to a newcomer even before the sweep.
        let later = Time::from_secs(2_200);
        assert_eq!(
            s.insert(
                later,
                id(5).user_id(),
                &record(&id(5), 1, 3_000, Some("alicia"), true)
            ),
            Ok(Stored::New)
        );
        assert!(s.get(&ua).is_none());
    }

    #[test]
    fn slots_are_reused() {
        let now = Time::from_secs(1_000);
        let mut s = Store::new(KeyedState::fixed(3, 4));
        for round in 0..3u64 {
            for n in 0..20u8 {
                let i = id(n);
                s.insert(
                    now,
                    i.user_id(),
                    &record(&i, round + 1, 2_000, Some(&format!("u{n}")), true),
                )
                .expect("stores");
            }
            for n in 0..20u8 {
                assert!(s.remove(&id(n).user_id()));
            }
        }
        assert!(s.is_empty());
        assert_eq!(s.record_bytes(), 0);
        assert!(s.entries.len() <= 20);
    }
}
