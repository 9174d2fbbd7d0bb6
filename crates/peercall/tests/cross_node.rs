//! Two or three real `peercall node` processes on loopback: Noise IK and XX sessions,
//! authenticated keepalives, a man in the middle whose tampered, truncated, replayed,
//! misdirected and foreign packets are dropped and counted without effect, graceful
//! close, and a restart that keeps the identity and restores the session.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use common::relay::{Dir, Relay};
use common::*;
use peercall_wire::packet::{HEADER_LEN, TAG_LEN, TRANSPORT_HEADER_LEN};
use peercall_wire::{PacketType, VERSION};
use serde_json::Value;

/// Keepalive interval of the test nodes: the shortest the config allows, so
/// keepalives flow within a second or two.
const KEEPALIVE_SECS: &str = "1";
/// Session timeout of the test nodes: far longer than any wait below, so in these
/// tests a session can only end because the peer said so.
const SESSION_TIMEOUT_SECS: &str = "30";
/// How long sessions may take to come up (a debug build on a loaded 2-core machine).
const SESSION_WAIT: Duration = Duration::from_secs(20);
/// How long a graceful close may take to reach the peer: well under the timeout.
const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// How long a counter may take to move after a datagram was sent to the node.
const COUNT_WAIT: Duration = Duration::from_secs(10);

/// Environment for a fast test node with optional seeds.
fn fast_env(seeds: Option<&str>) -> Vec<(&str, &str)> {
    let mut env = vec![
        ("PEERCALL_KEEPALIVE_SECS", KEEPALIVE_SECS),
        ("PEERCALL_SESSION_TIMEOUT_SECS", SESSION_TIMEOUT_SECS),
    ];
    if let Some(seeds) = seeds {
        env.push(("PEERCALL_SEEDS", seeds));
    }
    env
}

fn start(dir: &std::path::Path, seeds: Option<&str>) -> Daemon {
    Daemon::start_node(dir, "127.0.0.1:0", &[], &fast_env(seeds))
}

fn status(d: &Daemon) -> Value {
    let r = d.get("/status");
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn peer_key(d: &Daemon) -> String {
    status(d)["peer_key"].as_str().expect("peer_key").to_owned()
}

/// The node's sessions as (peer key, peer address, established age in seconds).
fn sessions(d: &Daemon) -> Vec<(String, String, f64)> {
    status(d)["sessions"]
        .as_array()
        .expect("sessions array")
        .iter()
        .map(|s| {
            (
                s["peer"].as_str().expect("peer").to_owned(),
                s["addr"].as_str().expect("addr").to_owned(),
                s["established_age_s"].as_f64().expect("age"),
            )
        })
        .collect()
}

fn has_session(d: &Daemon, peer: &str) -> bool {
    sessions(d).iter().any(|(p, _, _)| p == peer)
}

fn wait_session(d: &Daemon, peer: &str, what: &str) {
    assert!(
        eventually(SESSION_WAIT, || has_session(d, peer)),
        "{what}: no session with {peer}: {:?}\n{}",
        sessions(d),
        d.stderr()
    );
}

/// One series of the node's `/metrics`; it must exist.
fn value(d: &Daemon, series: &str) -> f64 {
    let text = d.get("/metrics").body;
    metric(&text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// Every `peercall_dropped_datagrams_total` series, by reason.
fn drops(d: &Daemon) -> BTreeMap<String, f64> {
    let text = d.get("/metrics").body;
    text.lines()
        .filter_map(|l| l.strip_prefix("peercall_dropped_datagrams_total{reason=\""))
        .filter_map(|l| {
            let (reason, rest) = l.split_once("\"} ")?;
            Some((reason.to_owned(), rest.trim().parse().ok()?))
        })
        .collect()
}

/// Drop reasons that no honest traffic on loopback can cause.
const ATTACK_REASONS: [&str; 7] = [
    "malformed",
    "unknown_protocol",
    "decrypt",
    "replay",
    "expired_key",
    "bad_mac",
    "stale_timestamp",
];

fn assert_no_attack_drops(d: &Daemon, name: &str) {
    let drops = drops(d);
    for reason in ATTACK_REASONS {
        assert_eq!(drops.get(reason), Some(&0.0), "{name}: {drops:?}");
    }
}

fn wait_value_at_least(d: &Daemon, series: &str, at_least: f64, what: &str) {
    assert!(
        eventually(SESSION_WAIT, || value(d, series) >= at_least),
        "{what}: {series} stayed below {at_least} (now {})",
        value(d, series)
    );
}

#[test]
fn xx_and_ik_sessions_exchange_authenticated_keepalives() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = start(&tmp.path().join("a"), None);
    let (a_key, a_udp) = (peer_key(&a), a.udp());

    // B knows only A's address (environment): first contact, Noise XX.
    let mut b = start(&tmp.path().join("b"), Some(&a_udp.to_string()));
    // C knows A's key too (config file): Noise IK.
    let config = tmp.path().join("c.toml");
    fs::write(
        &config,
        format!(
            "seeds = [\"{a_key}@{a_udp}\"]\nkeepalive_secs = {KEEPALIVE_SECS}\n\
             session_timeout_secs = {SESSION_TIMEOUT_SECS}\n"
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let mut c = Daemon::start_node(
        &tmp.path().join("c"),
        "127.0.0.1:0",
        &["--config", &config],
        &[],
    );
    let (b_key, c_key) = (peer_key(&b), peer_key(&c));

    wait_session(&b, &a_key, "B (XX)");
    wait_session(&c, &a_key, "C (IK)");
    wait_session(&a, &b_key, "A with B");
    wait_session(&a, &c_key, "A with C");
    let a_sessions = sessions(&a);
    assert_eq!(a_sessions.len(), 2, "{a_sessions:?}");
    for (peer, addr) in [(&b_key, b.udp()), (&c_key, c.udp())] {
        assert!(
            a_sessions
                .iter()
                .any(|(p, a, _)| p == peer && *a == addr.to_string()),
            "A sees {peer} at {addr}: {a_sessions:?}"
        );
    }
    assert_eq!(sessions(&b)[0].1, a_udp.to_string());
    assert_eq!(value(&a, "peercall_sessions"), 2.0);

    // Keepalives flow both ways on both sessions: each node receives them
    // periodically (the first one of an initiator is sent with the session's keys
    // confirmation; the rest come every KEEPALIVE_SECS).
    for (node, name, at_least) in [(&a, "A", 4.0), (&b, "B", 2.0), (&c, "C", 2.0)] {
        wait_value_at_least(node, "peercall_keepalives_received_total", at_least, name);
        wait_value_at_least(node, "peercall_keepalives_sent_total", 2.0, name);
    }
    assert_eq!(value(&a, "peercall_handshakes_completed_total"), 2.0);
    assert_eq!(value(&a, "peercall_handshakes_initiated_total"), 0.0);
    for (node, name) in [(&b, "B"), (&c, "C")] {
        assert_eq!(
            value(node, "peercall_handshakes_completed_total"),
            1.0,
            "{name}"
        );
        assert!(value(node, "peercall_handshakes_initiated_total") >= 1.0);
    }
    for (node, name) in [(&a, "A"), (&b, "B"), (&c, "C")] {
        assert_no_attack_drops(node, name);
    }
    let text = a.get("/metrics").body;
    if let Some((ok, report)) = promtool_check(&text) {
        assert!(ok, "promtool check metrics failed:\n{report}\n{text}");
    }

    for node in [&mut c, &mut b, &mut a] {
        node.stop();
    }
    for (node, name) in [(&b, "B"), (&c, "C")] {
        assert!(node.stderr().contains("session up"), "{name}");
    }
}

#[test]
fn graceful_shutdown_tells_the_peer_and_a_restart_restores_the_session() {
    let tmp = tempfile::tempdir().unwrap();
    let a_dir = tmp.path().join("a");
    let mut a = start(&a_dir, None);
    let (a_status, a_udp) = (status(&a), a.udp());
    let a_key = a_status["peer_key"].as_str().unwrap().to_owned();
    let mut b = start(&tmp.path().join("b"), Some(&a_udp.to_string()));
    let b_key = peer_key(&b);
    wait_session(&b, &a_key, "B");
    wait_session(&a, &b_key, "A");
    let closed = "peercall_sessions_ended_total{reason=\"closed_by_peer\"}";
    let timed_out = "peercall_sessions_ended_total{reason=\"timed_out\"}";
    assert_eq!(value(&b, closed), 0.0);

    // SIGTERM: A says goodbye, so B drops the session at once, not after the timeout.
    let stopped = Instant::now();
    a.stop();
    assert!(
        eventually(CLOSE_WAIT, || sessions(&b).is_empty()),
        "B still has {:?}",
        sessions(&b)
    );
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_secs(SESSION_TIMEOUT_SECS.parse().unwrap()),
        "{took:?}"
    );
    assert_eq!(value(&b, closed), 1.0);
    assert_eq!(value(&b, timed_out), 0.0);
    assert_eq!(value(&b, "peercall_sessions"), 0.0);
    let log = b.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("session down") && l.contains("closed by peer")),
        "{log}"
    );

    // A comes back on the same address with the same identity; B, which keeps its
    // seeds connected, finds it again. B learned A's key over XX and re-dials with IK
    // under that key, so this only works if A's identity really persisted.
    let handshakes_before = value(&b, "peercall_handshakes_completed_total");
    let mut a = Daemon::start_node(&a_dir, &a_udp.to_string(), &[], &fast_env(None));
    let again = status(&a);
    assert_eq!(again["peer_key"], a_status["peer_key"]);
    assert_eq!(again["user_id"], a_status["user_id"]);
    assert_eq!(a.udp(), a_udp);
    wait_session(&b, &a_key, "B after A's restart");
    wait_session(&a, &b_key, "restarted A");
    assert_eq!(
        value(&b, "peercall_handshakes_completed_total"),
        handshakes_before + 1.0
    );
    let received = value(&b, "peercall_keepalives_received_total");
    wait_value_at_least(
        &b,
        "peercall_keepalives_received_total",
        received + 1.0,
        "B after restart",
    );
    assert_no_attack_drops(&a, "restarted A");
    b.stop();
    a.stop();
}

/// Flips the lowest bit of byte `at`.
fn flipped(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v[at] ^= 1;
    v
}

/// STUN (first byte 0-3, RFC 7983): B measuring its round trip to A.
fn is_stun(bytes: &[u8]) -> bool {
    bytes.first().is_some_and(|&b| b <= 3)
}

fn is_transport(bytes: &[u8]) -> bool {
    bytes.first() == Some(&(PacketType::Transport as u8))
}

/// Sends `bytes` through `inject` and waits until `node` counts exactly one more
/// drop under `reason` and no drop under any other reason.
fn expect_drop(
    node: &Daemon,
    expected: &mut BTreeMap<String, f64>,
    case: &str,
    reason: &str,
    inject: impl FnOnce(),
) {
    inject();
    *expected.get_mut(reason).expect("a known reason") += 1.0;
    let counted = eventually(COUNT_WAIT, || {
        drops(node).get(reason) == expected.get(reason)
    });
    let now = drops(node);
    assert!(counted, "{case}: expected one more {reason} drop; {now:?}");
    assert_eq!(&now, expected, "{case}: only {reason} moved");
    eprintln!("{case}: dropped as {reason}");
}

/// The man-in-the-middle test, for a session set up with IK (`with_key`) or XX.
fn man_in_the_middle(with_key: bool) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let a = start(&tmp.path().join("a"), None);
    let a_key = peer_key(&a);
    let relay = Relay::start(a.udp());
    let seed = if with_key {
        format!("{a_key}@{}", relay.front_addr())
    } else {
        relay.front_addr().to_string()
    };
    let b = start(&tmp.path().join("b"), Some(&seed));
    let b_key = peer_key(&b);
    wait_session(&b, &a_key, "B through the relay");
    wait_session(&a, &b_key, "A through the relay");
    assert_eq!(sessions(&a)[0].1, relay.back_addr().to_string());
    assert_eq!(sessions(&b)[0].1, relay.front_addr().to_string());
    wait_value_at_least(&b, "peercall_keepalives_received_total", 1.0, "B");
    wait_value_at_least(&a, "peercall_keepalives_received_total", 2.0, "A");

    // The handshake the relay saw is the one configured (an initiation may have
    // been sent twice on a slow machine, hence the dedup). STUN (first byte 0-3,
    // RFC 7983) is the node measuring its way to the seed before attaching.
    let first = |dir: Dir| -> Vec<u8> {
        let mut types: Vec<u8> = relay
            .recorded(dir)
            .iter()
            .map(|p| p[0])
            .filter(|&t| t != PacketType::Transport as u8 && t > 3) // not STUN
            .collect();
        types.sort_unstable();
        types.dedup();
        types
    };
    if with_key {
        assert_eq!(first(Dir::ToA), [PacketType::InitIk as u8]);
        assert_eq!(first(Dir::ToB), [PacketType::RespIk as u8]);
    } else {
        assert_eq!(
            first(Dir::ToA),
            [PacketType::InitXx as u8, PacketType::FinishXx as u8]
        );
        assert_eq!(first(Dir::ToB), [PacketType::RespXx as u8]);
    }

    let a_before = status(&a);
    let b_age = sessions(&b)[0].2;
    let counters = [
        "peercall_handshakes_initiated_total",
        "peercall_handshakes_completed_total",
    ];
    let a_counters: Vec<f64> = counters.iter().map(|c| value(&a, c)).collect();
    let b_counters: Vec<f64> = counters.iter().map(|c| value(&b, c)).collect();
    let mut b_drops = drops(&b);
    let mut a_drops = drops(&a);
    assert!(b_drops.values().all(|&v| v == 0.0), "{b_drops:?}");

    // Hold A's packets to B, so B's keepalive counter moves only for what we inject,
    // and take the first held one: a real, authentic, not yet delivered packet.
    // (STUN answers to B's round-trip probes may come first: skipped.)
    relay.hold(Dir::ToB);
    let first_transport = || relay.held(Dir::ToB).into_iter().find(|p| is_transport(p));
    assert!(
        eventually(SESSION_WAIT, || first_transport().is_some()),
        "A sent B nothing within {SESSION_WAIT:?}"
    );
    let packet = first_transport().expect("a held transport packet");
    assert_eq!(packet[1], VERSION);
    let keepalives = "peercall_keepalives_received_total";
    let b_keepalives = value(&b, keepalives);

    let ciphertext_at = TRANSPORT_HEADER_LEN;
    let mut junk = vec![PacketType::Transport as u8, 0xee];
    junk.extend((0u8..60).map(|i| i.wrapping_mul(37) ^ 0x5a));
    let mut unknown_index = packet.clone();
    for byte in &mut unknown_index[HEADER_LEN..HEADER_LEN + 4] {
        *byte ^= 0xff;
    }
    // A counter not seen yet passes the replay window, but it is the AEAD nonce.
    let mut counter_ahead = packet.clone();
    let counter_at = HEADER_LEN + 4..TRANSPORT_HEADER_LEN;
    let counter = u64::from_be_bytes(packet[counter_at.clone()].try_into().expect("8 bytes"));
    counter_ahead[counter_at].copy_from_slice(&(counter + 1000).to_be_bytes());
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "one ciphertext byte flipped",
            "decrypt",
            flipped(&packet, ciphertext_at),
        ),
        (
            "authentication tag byte flipped",
            "decrypt",
            flipped(&packet, packet.len() - 1),
        ),
        ("counter moved ahead", "decrypt", counter_ahead),
        (
            "truncated by one byte",
            "decrypt",
            packet[..packet.len() - 1].to_vec(),
        ),
        (
            "truncated inside the tag",
            "malformed",
            packet[..TRANSPORT_HEADER_LEN + TAG_LEN - 1].to_vec(),
        ),
        (
            "truncated to the header",
            "malformed",
            packet[..HEADER_LEN].to_vec(),
        ),
        ("unknown receiver index", "unknown_session", unknown_index),
        ("garbage after a transport type byte", "malformed", junk),
        ("a lone transport type byte", "malformed", vec![10]),
        (
            "wrong version",
            "malformed",
            flipped(&packet, 1), // version 1 becomes 0
        ),
        (
            "DTLS-looking first byte",
            "unknown_protocol",
            [&[22u8][..], &packet[1..]].concat(),
        ),
        (
            "reserved peercall first byte",
            "unknown_protocol",
            [&[11u8][..], &packet[1..]].concat(),
        ),
        (
            "first byte in the QUIC range",
            "unknown_protocol",
            vec![0xc0; 40],
        ),
        ("empty datagram", "unknown_protocol", Vec::new()),
    ];
    for (case, reason, bytes) in &cases {
        expect_drop(&b, &mut b_drops, case, reason, || relay.inject_to_b(bytes));
        assert_eq!(value(&b, keepalives), b_keepalives, "{case} had an effect");
    }

    // The untouched packet is still good: none of the above burnt its counter.
    relay.inject_to_b(&packet);
    assert!(
        eventually(COUNT_WAIT, || value(&b, keepalives) == b_keepalives + 1.0),
        "the genuine packet was accepted after the forgeries"
    );
    assert_eq!(drops(&b), b_drops);
    expect_drop(&b, &mut b_drops, "exact replay", "replay", || {
        relay.inject_to_b(&packet)
    });
    let oldest = relay
        .recorded(Dir::ToB)
        .into_iter()
        .find(|p| is_transport(p))
        .expect("a transport packet to B");
    expect_drop(&b, &mut b_drops, "replay of the oldest", "replay", || {
        relay.inject_to_b(&oldest)
    });
    assert_eq!(value(&b, keepalives), b_keepalives + 1.0);

    // Into A: B's session index means nothing there; and the handshake can be
    // neither replayed nor forged.
    expect_drop(
        &a,
        &mut a_drops,
        "B's packet sent to A",
        "unknown_session",
        || relay.inject_to_a(&packet),
    );
    let to_a = relay.recorded(Dir::ToA);
    let init = to_a
        .iter()
        .find(|p| !is_transport(p) && !is_stun(p))
        .expect("initiation")
        .clone();
    expect_drop(&a, &mut a_drops, "tampered initiation", "bad_mac", || {
        relay.inject_to_a(&flipped(&init, HEADER_LEN + 4))
    });
    if with_key {
        expect_drop(
            &a,
            &mut a_drops,
            "replayed IK initiation",
            "stale_timestamp",
            || relay.inject_to_a(&init),
        );
    } else {
        let finish = to_a
            .iter()
            .find(|p| p[0] == PacketType::FinishXx as u8)
            .expect("XX finish")
            .clone();
        expect_drop(&a, &mut a_drops, "replayed XX finish", "unexpected", || {
            relay.inject_to_a(&finish)
        });
    }
    // A answered none of it: only keepalives came back (and are held), besides
    // its STUN answers to B's own probes.
    assert!(
        relay
            .held(Dir::ToB)
            .iter()
            .all(|p| is_transport(p) || is_stun(p)),
        "A replied to an injected packet"
    );

    // Let A's packets through again, the original of the packet delivered above
    // first: late, it is a replay too. Then the session carries on as before.
    expect_drop(&b, &mut b_drops, "delayed original", "replay", || {
        relay.release(Dir::ToB)
    });
    wait_value_at_least(&b, keepalives, b_keepalives + 3.0, "B after the attack");
    let a_keepalives = value(&a, keepalives);
    wait_value_at_least(&a, keepalives, a_keepalives + 1.0, "A after the attack");
    let b_sessions = sessions(&b);
    assert_eq!(b_sessions.len(), 1, "{b_sessions:?}");
    assert_eq!(b_sessions[0].0, a_key);
    assert!(
        b_sessions[0].2 > b_age,
        "B's session was not re-established"
    );
    let a_now = status(&a);
    assert_eq!(a_now["sessions"].as_array().expect("sessions").len(), 1);
    assert_eq!(
        a_now["sessions"][0]["addr"],
        a_before["sessions"][0]["addr"]
    );
    assert_eq!(
        counters.iter().map(|c| value(&a, c)).collect::<Vec<_>>(),
        a_counters,
        "A: no new handshakes"
    );
    assert_eq!(
        counters.iter().map(|c| value(&b, c)).collect::<Vec<_>>(),
        b_counters,
        "B: no new handshakes"
    );
    assert_eq!(drops(&b), b_drops, "B: nothing else dropped");
    assert_eq!(drops(&a), a_drops, "A: nothing else dropped");
    for (node, name) in [(&a, "A"), (&b, "B")] {
        assert_eq!(value(node, "peercall_sessions"), 1.0, "{name}");
        assert_eq!(
            value(
                node,
                "peercall_sessions_ended_total{reason=\"closed_by_peer\"}"
            ),
            0.0,
            "{name}"
        );
    }
}

#[test]
fn man_in_the_middle_cannot_disturb_an_ik_session() {
    man_in_the_middle(true);
}

#[test]
fn man_in_the_middle_cannot_disturb_an_xx_session() {
    man_in_the_middle(false);
}
