//! The contact book: the people this node's user follows, pinned by user id.
//!
//! Trust on first use (DESIGN.md §2): a contact added by handle is looked up once,
//! and the user id the directory returned is pinned; from then on presence, and
//! later calls, follow that user id, whoever claims the handle afterwards. A second
//! contact under a handle already pinned to someone else is refused, so a handle
//! never silently changes hands in the book.
//!
//! `contacts.json` in the data directory, written atomically at every change:
//!
//! ```json
//! {"version": 1, "contacts": [{"user_id": "<52 base32>", "handle": "alice", "fingerprint": "abcd-efgh-...", "added": 1700000000}]}
//! ```
//!
//! `handle` and `fingerprint` are optional (a hand-written file may list bare user
//! ids); a fingerprint that does not match its user id makes the file corrupt, as
//! does any entry that does not parse. Presence is not persisted: it is learned
//! from the overlay after every start.

use std::collections::HashMap;
use std::net::SocketAddr;

use peercall_crypto::{Handle, Record, UserId};
use peercall_wire::Time;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The file format's version.
pub const CONTACTS_VERSION: u32 = 1;
/// Most contacts: what a home supernode follows for one client
/// (`peercall_overlay::MAX_SUBSCRIPTIONS`).
pub const MAX_CONTACTS: usize = peercall_overlay::MAX_SUBSCRIPTIONS;
/// Largest contacts file read: a full book takes about 200 KB.
pub const MAX_CONTACTS_FILE: usize = 1024 * 1024;

/// Why a contacts file does not load.
#[derive(Debug, Error)]
pub enum BookError {
    /// Not the JSON shape above.
    #[error("not a contacts file: {0}")]
    Json(#[from] serde_json::Error),
    /// A version this peercall does not read.
    #[error("contacts file version {0}; this peercall reads version {CONTACTS_VERSION}")]
    Version(u32),
    /// An entry that does not parse.
    #[error("contact {index}: {reason}")]
    Entry {
        /// Which entry (from 0).
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// More than [`MAX_CONTACTS`] entries.
    #[error("{0} contacts; at most {MAX_CONTACTS}")]
    TooMany(usize),
    /// Longer than [`MAX_CONTACTS_FILE`].
    #[error("larger than {MAX_CONTACTS_FILE} bytes")]
    TooLarge,
}

/// Why a contact could not be added.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddError {
    /// The book is full.
    #[error("the contact book is full ({MAX_CONTACTS} contacts)")]
    Full,
    /// Another contact already holds this handle (trust on first use).
    #[error(
        "your contact {handle:?} is pinned to another user ({}); remove it first if you \
         trust the new one",
        pinned.fingerprint()
    )]
    HandleTaken {
        /// The handle.
        handle: Handle,
        /// The user id it is pinned to.
        pinned: UserId,
    },
    /// The node's own user.
    #[error("that is this node's own user")]
    Myself,
}

/// One contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    /// The pinned user id.
    pub user: UserId,
    /// The handle it was added under, if any.
    pub handle: Option<Handle>,
    /// When it was added, Unix seconds.
    pub added: u64,
}

/// What an add did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// A new contact.
    New,
    /// An existing contact got the handle it lacked.
    Updated,
    /// Already there as it is.
    Unchanged,
}

/// A contact's presence, as the overlay last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// Online (a live record with endpoints).
    pub online: bool,
    /// When this state was learned.
    pub since: Time,
    /// The record behind it (`None` when it expired).
    pub record: Option<Box<Record>>,
}

/// The contacts and their presence.
#[derive(Debug, Clone, Default)]
pub struct ContactBook {
    contacts: Vec<Contact>,
    presence: HashMap<UserId, Presence>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    contacts: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    handle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fingerprint: Option<String>,
    #[serde(default)]
    added: u64,
}

/// A contact as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ContactView {
    /// The pinned user id.
    pub user_id: String,
    /// Its fingerprint.
    pub fingerprint: String,
    /// The handle it was added under.
    pub handle: Option<String>,
    /// When it was added, Unix seconds.
    pub added: u64,
    /// Online now; `null` until the overlay has said.
    pub online: Option<bool>,
    /// Seconds since the presence was learned.
    pub since_s: Option<f64>,
    /// The handle in the contact's current record, if it claims one (may differ
    /// from the pinned one).
    pub record_handle: Option<String>,
    /// Where the contact's node can be reached (online only).
    pub endpoints: Vec<String>,
}

impl ContactBook {
    /// An empty book.
    pub fn new() -> ContactBook {
        ContactBook::default()
    }

    /// Parses a contacts file.
    pub fn parse(bytes: &[u8]) -> Result<ContactBook, BookError> {
        if bytes.len() > MAX_CONTACTS_FILE {
            return Err(BookError::TooLarge);
        }
        let file: File = serde_json::from_slice(bytes)?;
        if file.version != CONTACTS_VERSION {
            return Err(BookError::Version(file.version));
        }
        if file.contacts.len() > MAX_CONTACTS {
            return Err(BookError::TooMany(file.contacts.len()));
        }
        let mut book = ContactBook::new();
        for (index, e) in file.contacts.into_iter().enumerate() {
            let bad = |reason: String| BookError::Entry { index, reason };
            let user: UserId = e.user_id.parse().map_err(|err| bad(format!("{err}")))?;
            if let Some(fp) = &e.fingerprint
                && *fp != user.fingerprint()
            {
                return Err(bad(format!(
                    "fingerprint {fp:?} does not match the user id (its fingerprint is {})",
                    user.fingerprint()
                )));
            }
            let handle = e
                .handle
                .as_deref()
                .map(Handle::new)
                .transpose()
                .map_err(|err| bad(format!("{err}")))?;
            if book.contacts.iter().any(|c| c.user == user) {
                // A repeated entry (hand-edited) adds nothing.
                continue;
            }
            if let Some(h) = &handle
                && book.by_handle(h).is_some()
            {
                return Err(bad(format!("handle {h:?} is listed for two users")));
            }
            book.contacts.push(Contact {
                user,
                handle,
                added: e.added,
            });
        }
        Ok(book)
    }

    /// The file contents.
    pub fn to_json(&self) -> Vec<u8> {
        let file = File {
            version: CONTACTS_VERSION,
            contacts: self
                .contacts
                .iter()
                .map(|c| Entry {
                    user_id: c.user.to_string(),
                    handle: c.handle.as_ref().map(|h| h.as_str().to_owned()),
                    fingerprint: Some(c.user.fingerprint()),
                    added: c.added,
                })
                .collect(),
        };
        // Strings and integers always serialize.
        let mut out = serde_json::to_vec_pretty(&file).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// The pinned user ids.
    pub fn users(&self) -> Vec<UserId> {
        self.contacts.iter().map(|c| c.user).collect()
    }

    /// How many contacts.
    pub fn len(&self) -> usize {
        self.contacts.len()
    }

    /// How many are online.
    pub fn online(&self) -> usize {
        self.presence.values().filter(|p| p.online).count()
    }

    /// The contact pinned to `user`.
    pub fn get(&self, user: &UserId) -> Option<&Contact> {
        self.contacts.iter().find(|c| c.user == *user)
    }

    /// The contact added under `handle`.
    pub fn by_handle(&self, handle: &Handle) -> Option<&Contact> {
        self.contacts
            .iter()
            .find(|c| c.handle.as_ref() == Some(handle))
    }

    /// Adds `user` (found under `handle`, if by handle) at `added` (Unix seconds).
    pub fn add(
        &mut self,
        user: UserId,
        handle: Option<Handle>,
        added: u64,
    ) -> Result<Added, AddError> {
        if let Some(h) = &handle
            && let Some(other) = self.by_handle(h)
            && other.user != user
        {
            return Err(AddError::HandleTaken {
                handle: h.clone(),
                pinned: other.user,
            });
        }
        if let Some(c) = self.contacts.iter_mut().find(|c| c.user == user) {
            return Ok(match (&c.handle, handle) {
                (None, Some(h)) => {
                    c.handle = Some(h);
                    Added::Updated
                }
                _ => Added::Unchanged,
            });
        }
        if self.contacts.len() >= MAX_CONTACTS {
            return Err(AddError::Full);
        }
        self.contacts.push(Contact {
            user,
            handle,
            added,
        });
        Ok(Added::New)
    }

    /// Removes the contact pinned to `user`.
    pub fn remove(&mut self, user: &UserId) -> Option<Contact> {
        let i = self.contacts.iter().position(|c| c.user == *user)?;
        self.presence.remove(user);
        Some(self.contacts.remove(i))
    }

    /// Records a presence report; returns the contact if `user` is one and its
    /// online state or endpoints changed.
    pub fn set_presence(
        &mut self,
        now: Time,
        user: UserId,
        online: bool,
        record: Option<Box<Record>>,
    ) -> Option<&Contact> {
        let contact = self.contacts.iter().find(|c| c.user == user)?;
        let endpoints = |r: &Option<Box<Record>>| {
            r.as_ref()
                .map_or_else(Vec::new, |r| r.body.endpoints.clone())
        };
        let changed = self
            .presence
            .get(&user)
            .is_none_or(|p| p.online != online || endpoints(&p.record) != endpoints(&record));
        let since = match self.presence.get(&user) {
            Some(p) if p.online == online => p.since,
            _ => now,
        };
        self.presence.insert(
            user,
            Presence {
                online,
                since,
                record,
            },
        );
        changed.then_some(contact)
    }

    /// Every contact as the admin API shows it, in the order added.
    pub fn views(&self, now: Time) -> Vec<ContactView> {
        self.contacts.iter().map(|c| self.view(c, now)).collect()
    }

    /// One contact as the admin API shows it.
    pub fn view(&self, c: &Contact, now: Time) -> ContactView {
        let p = self.presence.get(&c.user);
        let record = p.and_then(|p| p.record.as_ref());
        ContactView {
            user_id: c.user.to_string(),
            fingerprint: c.user.fingerprint(),
            handle: c.handle.as_ref().map(|h| h.as_str().to_owned()),
            added: c.added,
            online: p.map(|p| p.online),
            since_s: p.map(|p| now.saturating_since(p.since).as_secs_f64()),
            record_handle: record
                .and_then(|r| r.body.handle.as_ref())
                .map(|h| h.as_str().to_owned()),
            endpoints: record
                .filter(|_| p.is_some_and(|p| p.online))
                .map_or_else(Vec::new, |r| endpoint_strings(&r.body.endpoints)),
        }
    }
}

/// Socket addresses as text.
pub fn endpoint_strings(addrs: &[SocketAddr]) -> Vec<String> {
    addrs.iter().map(ToString::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use peercall_crypto::Identity;
    use peercall_crypto::record::RecordBody;

    fn user(n: u8) -> UserId {
        UserId([n; 32])
    }

    fn handle(s: &str) -> Handle {
        Handle::new(s).unwrap()
    }

    #[test]
    fn add_pins_user_ids_and_refuses_a_handle_pinned_elsewhere() {
        let mut b = ContactBook::new();
        assert_eq!(b.add(user(1), Some(handle("alice")), 10), Ok(Added::New));
        assert_eq!(
            b.add(user(1), Some(handle("alice")), 11),
            Ok(Added::Unchanged)
        );
        assert_eq!(
            b.add(user(2), Some(handle("alice")), 12),
            Err(AddError::HandleTaken {
                handle: handle("alice"),
                pinned: user(1)
            })
        );
        assert_eq!(b.add(user(2), None, 12), Ok(Added::New));
        assert_eq!(b.add(user(2), Some(handle("bob")), 13), Ok(Added::Updated));
        assert_eq!(b.by_handle(&handle("bob")).unwrap().user, user(2));
        assert_eq!(b.users(), vec![user(1), user(2)]);
        assert_eq!(b.remove(&user(1)).unwrap().added, 10);
        assert!(b.remove(&user(1)).is_none());
        assert_eq!(b.add(user(3), Some(handle("alice")), 14), Ok(Added::New));
    }

    #[test]
    fn file_round_trips_and_fills_in_fingerprints() {
        let mut b = ContactBook::new();
        b.add(user(1), Some(handle("alice")), 10).unwrap();
        b.add(user(2), None, 11).unwrap();
        let json = b.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains(&user(1).fingerprint()), "{text}");
        let back = ContactBook::parse(&json).unwrap();
        assert_eq!(back.contacts, b.contacts);
        // A hand-written file with a bare user id.
        let bare = format!(
            "{{\"version\":1,\"contacts\":[{{\"user_id\":\"{}\"}}]}}",
            user(5)
        );
        let back = ContactBook::parse(bare.as_bytes()).unwrap();
        assert_eq!(back.users(), vec![user(5)]);
    }

    #[test]
    fn bad_files_are_errors() {
        let id = user(1).to_string();
        let entry = |extra: &str| {
            format!("{{\"version\":1,\"contacts\":[{{\"user_id\":\"{id}\"{extra}}}]}}")
        };
        for bad in [
            String::new(),
            "[]".into(),
            "{\"version\":3,\"contacts\":[]}".into(),
            "{\"version\":1,\"contacts\":[{\"user_id\":\"nope\"}]}".into(),
            entry(",\"fingerprint\":\"aaaa-bbbb-cccc-dddd-eeee\""),
            entry(",\"handle\":\"Not Valid\""),
            entry(",\"colour\":\"blue\""),
            format!(
                "{{\"version\":1,\"contacts\":[{{\"user_id\":\"{id}\",\"handle\":\"a\"}},\
                 {{\"user_id\":\"{}\",\"handle\":\"a\"}}]}}",
                user(2)
            ),
        ] {
            assert!(ContactBook::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(ContactBook::parse(entry(",\"handle\":\"a\",\"added\":5").as_bytes()).is_ok());
        assert!(matches!(
            ContactBook::parse(&vec![b' '; MAX_CONTACTS_FILE + 1]),
            Err(BookError::TooLarge)
        ));
    }

    #[test]
    fn presence_changes_are_reported_once() {
        let id = Identity::from_seed([7; 32]);
        let body = RecordBody {
            handle: Some(handle("carol")),
            static_key: id.peer_key(),
            endpoints: vec!["10.0.0.1:7600".parse().unwrap()],
            supernodes: vec![],
        };
        let bytes = Record::sign(&id, 1, 2_000_000_000, &body).unwrap();
        let record = Box::new(Record::verify(&bytes).unwrap());
        let mut b = ContactBook::new();
        let u = id.user_id();
        let t = Time::from_secs(100);
        assert!(
            b.set_presence(t, u, true, Some(record.clone())).is_none(),
            "not a contact"
        );
        b.add(u, None, 1).unwrap();
        assert!(b.views(t)[0].online.is_none());
        assert!(b.set_presence(t, u, true, Some(record.clone())).is_some());
        assert!(b.set_presence(t, u, true, Some(record.clone())).is_none());
        assert_eq!(b.online(), 1);
        let v = &b.views(Time::from_secs(103))[0];
        assert_eq!(v.online, Some(true));
        assert_eq!(v.since_s, Some(3.0));
        assert_eq!(v.endpoints, vec!["10.0.0.1:7600".to_owned()]);
        assert_eq!(v.record_handle.as_deref(), Some("carol"));
        assert!(
            b.set_presence(Time::from_secs(104), u, false, None)
                .is_some()
        );
        assert_eq!(b.online(), 0);
        let v = &b.views(Time::from_secs(104))[0];
        assert_eq!((v.online, v.endpoints.len()), (Some(false), 0));
    }
}
