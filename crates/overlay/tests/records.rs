//! Storers and readers refuse forged, stale, oversize and mismatched records, and
//! bad messages are dropped and counted. Two seed overlays are wired to each other
//! through an in-memory loop (no engine): what one sends, the other handles.

use std::net::SocketAddr;
use std::time::Duration;

use peercall_crypto::{Handle, Identity, PeerKey, Record, RecordBody};
use peercall_overlay::msg::{Msg, Query};
use peercall_overlay::{Bootstrap, Output, Overlay, OverlayConfig, Role};
use peercall_wire::Time;

const T0: Time = Time::from_secs(1_700_000_000);

struct Pair {
    a: Overlay,
    b: Overlay,
    ka: PeerKey,
    kb: PeerKey,
    now: Time,
    /// Events `a` emitted.
    events: Vec<peercall_overlay::OverlayEvent>,
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([198, 51, 100, n], 7600))
}

impl Pair {
    fn new() -> Pair {
        let ia = Identity::from_seed([1; 32]);
        let ib = Identity::from_seed([2; 32]);
        let (ka, kb) = (ia.peer_key(), ib.peer_key());
        let seeds = vec![
            Bootstrap {
                addr: addr(1),
                key: Some(ka),
            },
            Bootstrap {
                addr: addr(2),
                key: Some(kb),
            },
        ];
        let a = Overlay::new(
            ia,
            Role::Supernode,
            seeds.clone(),
            OverlayConfig::default(),
            [3; 32],
            T0,
        );
        let b = Overlay::new(
            ib,
            Role::Supernode,
            seeds,
            OverlayConfig::default(),
            [4; 32],
            T0,
        );
        let mut p = Pair {
            a,
            b,
            ka,
            kb,
            now: T0,
            events: Vec::new(),
        };
        p.run(Duration::from_secs(5));
        p
    }

    /// Delivers everything in flight, repeatedly, and runs timers for `d`.
    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            self.pump();
            let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    self.a.handle_timeout(self.now);
                    self.b.handle_timeout(self.now);
                }
                _ => break,
            }
        }
        self.now = end;
    }

    fn pump(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            while let Some(o) = self.a.poll_output() {
                match o {
                    Output::Send { to, msg, .. } if to == self.kb => {
                        self.b.handle_message(self.now, self.ka, addr(1), &msg);
                        moved = true;
                    }
                    Output::Event(e) => self.events.push(e),
                    _ => {}
                }
            }
            while let Some(o) = self.b.poll_output() {
                if let Output::Send { to, msg, .. } = o
                    && to == self.ka
                {
                    self.a.handle_message(self.now, self.kb, addr(2), &msg);
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// `b` sends `msg` to `a`.
    fn b_sends(&mut self, msg: &Msg) {
        let bytes = msg.encode().expect("encodes");
        self.a.handle_message(self.now, self.kb, addr(2), &bytes);
        self.pump();
    }
}

fn record(id: &Identity, seq: u64, expires: u64, handle: &str) -> Vec<u8> {
    let body = RecordBody {
        handle: Some(Handle::new(handle).expect("handle")),
        static_key: id.peer_key(),
        endpoints: vec![addr(9)],
        supernodes: vec![],
    };
    Record::sign(id, seq, expires, &body).expect("signs")
}

#[test]
fn seeds_form_a_tier() {
    let p = Pair::new();
    assert!(p.a.is_supernode() && p.b.is_supernode());
    assert_eq!(p.a.members().len(), 1);
    assert_eq!(p.b.members().len(), 1);
}

#[test]
fn storers_refuse_forged_stale_expired_and_taken_records() {
    let mut p = Pair::new();
    let alice = Identity::from_seed([10; 32]);
    let mallory = Identity::from_seed([11; 32]);
    let exp = p.now.as_secs() + 100;
    let user = alice.user_id();

    // A good record is stored.
    p.b_sends(&Msg::Store {
        records: vec![record(&alice, 5, exp, "alice")],
    });
    assert!(p.a.stores(&user));

    // Forged: a flipped signature byte.
    let mut forged = record(&alice, 6, exp, "alice");
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let before = p.a.stats();
    p.b_sends(&Msg::Store {
        records: vec![forged],
    });
    assert_eq!(p.a.stats().forged_records, before.forged_records + 1);

    // Stale: not above the held sequence number (refused before any signature check).
    p.b_sends(&Msg::Store {
        records: vec![record(&alice, 5, exp, "alice")],
    });
    p.b_sends(&Msg::Store {
        records: vec![record(&alice, 4, exp, "alice")],
    });
    assert_eq!(p.a.stats().stale_records, before.stale_records + 2);

    // Expired, and expiring too far ahead.
    let old = record(&alice, 9, p.now.as_secs() - 1, "alice");
    p.b_sends(&Msg::Store { records: vec![old] });
    assert_eq!(p.a.stats().stale_records, before.stale_records + 3);
    let far = record(&alice, 9, p.now.as_secs() + 3 * 24 * 3600, "alice");
    p.b_sends(&Msg::Store { records: vec![far] });
    assert_eq!(p.a.stats().forged_records, before.forged_records + 2);

    // Someone else's claim on a live handle.
    p.b_sends(&Msg::Store {
        records: vec![record(&mallory, 1, exp, "alice")],
    });
    assert_eq!(p.a.stats().handle_conflicts, before.handle_conflicts + 1);
    assert!(!p.a.stores(&mallory.user_id()));

    // Oversize and malformed bodies never reach the store.
    let mut big = record(&alice, 10, exp, "alice");
    big.resize(1001, 0);
    let mut raw = vec![peercall_overlay::msg::PROTOCOL_VERSION];
    raw.extend(postcard::to_stdvec(&Msg::Store { records: vec![big] }).expect("postcard"));
    p.a.handle_message(p.now, p.kb, addr(2), &raw);
    p.a.handle_message(p.now, p.kb, addr(2), &[1, 255, 255]);
    p.a.handle_message(p.now, p.kb, addr(2), &[9, 0]);
    p.a.handle_message(p.now, p.kb, addr(2), &[]);
    assert_eq!(p.a.stats().dropped_malformed, before.dropped_malformed + 4);

    // Records from a peer that is not a member are not stored at all.
    let stranger = Identity::from_seed([12; 32]);
    let bytes = Msg::Store {
        records: vec![record(&stranger, 1, exp, "stranger")],
    }
    .encode()
    .expect("encodes");
    let dropped = p.a.stats().dropped_unexpected;
    p.a.handle_message(p.now, stranger.peer_key(), addr(7), &bytes);
    assert_eq!(p.a.stats().dropped_unexpected, dropped + 1);
    assert!(!p.a.stores(&stranger.user_id()));
}

#[test]
fn readers_refuse_mismatched_and_forged_answers() {
    let mut p = Pair::new();
    let alice = Identity::from_seed([20; 32]);
    let bob = Identity::from_seed([21; 32]);
    let exp = p.now.as_secs() + 100;
    // a looks alice up; b answers with bob's record (valid, but not what was asked).
    let id =
        p.a.lookup(p.now, peercall_overlay::Lookup::User(alice.user_id()));
    let mut reqs = Vec::new();
    while let Some(o) = p.a.poll_output() {
        if let Output::Send { msg, .. } = o
            && let Ok(Msg::Fetch { req, query }) = Msg::decode(&msg)
        {
            assert_eq!(query, Query::User(alice.user_id().0));
            reqs.push(req);
        }
    }
    assert!(!reqs.is_empty(), "a asked its storer b");
    let forged_before = p.a.stats().forged_records;
    for req in &reqs {
        p.b_sends(&Msg::FetchReply {
            req: *req,
            record: Some(record(&bob, 1, exp, "bob")),
        });
    }
    assert_eq!(
        p.a.stats().forged_records,
        forged_before + reqs.len() as u64
    );
    p.run(Duration::from_secs(5));
    let done = p.events.iter().find_map(|e| match e {
        peercall_overlay::OverlayEvent::LookupDone { id: got, result } if *got == id => {
            Some(result.clone())
        }
        _ => None,
    });
    assert_eq!(done, Some(Err(peercall_overlay::LookupError::NotFound)));
}
