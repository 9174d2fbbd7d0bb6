//! `peercall node` as a process: start-up, admin API, metrics, shutdown, identity
//! persistence and refusal of bad state or configuration.

mod common;

use std::fs;
use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use peercall_crypto::Identity;
use rand::rngs::OsRng;

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o7777
}

#[test]
fn serves_admin_api_and_stops_cleanly_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let mut node = Daemon::start(&dir);

    // The data directory and its private files.
    assert_eq!(mode(&dir), 0o700);
    for file in [IDENTITY, ADMIN_TOKEN, ADMIN_ADDR, UDP_ADDR] {
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }
    let token = node.token();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(node.admin().ip().is_loopback() && node.admin().port() != 0);
    assert!(node.udp().ip().is_loopback() && node.udp().port() != 0);

    let health = node.get("/healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));

    let status = node.get("/status");
    assert_eq!(status.status, 200);
    assert!(
        status
            .header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let s = status.json();
    let identity = Identity::from_file_bytes(&fs::read(dir.join(IDENTITY)).unwrap()).unwrap();
    assert_eq!(s["user_id"], identity.user_id().to_string());
    assert_eq!(s["fingerprint"], identity.user_id().fingerprint());
    assert_eq!(s["peer_key"], identity.peer_key().to_string());
    assert_eq!(s["role"], "auto");
    assert_eq!(s["udp"], node.udp().to_string());
    assert_eq!(s["sessions"], serde_json::json!([]));
    assert!(s["uptime_s"].as_u64().is_some());

    // A datagram reaches the engine through the socket and shows in /metrics.
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.send_to(b"\xffnot a peercall packet", node.udp())
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            metric(
                &node.get("/metrics").body,
                "peercall_datagrams_received_total",
            ) == Some(1.0)
        }),
        "datagram counted"
    );

    // State changes need the token.
    let addr = node.admin();
    for (method, path) in [("POST", "/v1/connect"), ("POST", "/v1/shutdown")] {
        let r = http(addr, method, path, &[], r#"{"peer":"127.0.0.1:9"}"#).unwrap();
        assert_eq!(r.status, 401, "{path} without token");
        assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
        let wrong = format!("Bearer {}", "0".repeat(64));
        let r = http(addr, method, path, &[("Authorization", &wrong)], "{}").unwrap();
        assert_eq!(r.status, 401, "{path} with a wrong token");
    }
    let r = node.post_authorized("/v1/connect", r#"{"peer":"127.0.0.1:9"}"#);
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["addr"], "127.0.0.1:9");
    let r = node.post_authorized("/v1/connect", r#"{"peer":"nowhere"}"#);
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("nowhere"));
    let r = node.post_authorized("/v1/connect", "not json");
    assert_eq!(r.status, 400);

    // Requests addressed to a non-loopback host name (DNS rebinding) are refused.
    let r = http(
        addr,
        "GET",
        "/status",
        &[("Host", "attacker.example:80")],
        "",
    )
    .unwrap();
    assert_eq!(r.status, 403);

    // /metrics: Prometheus text that promtool accepts, with the expected series.
    let m = node.get("/metrics");
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    assert_eq!(
        metric(&m.body, "peercall_admin_unauthorized_total"),
        Some(4.0)
    );
    assert_eq!(metric(&m.body, "peercall_sessions"), Some(0.0));
    assert_eq!(
        metric(
            &m.body,
            "peercall_dropped_datagrams_total{reason=\"replay\"}"
        ),
        Some(0.0)
    );
    assert!(metric(&m.body, "peercall_uptime_seconds").is_some());
    match promtool_check(&m.body) {
        Some((ok, report)) => assert!(ok, "promtool check metrics failed:\n{report}\n{}", m.body),
        None => eprintln!("promtool not installed: skipped `promtool check metrics`"),
    }

    node.stop();
    assert!(!dir.join(ADMIN_ADDR).exists() && !dir.join(UDP_ADDR).exists());
    let log = node.stderr();
    assert!(
        log.contains("node ready") && log.contains("stopped"),
        "{log}"
    );
    // No secrets or full ids in the info log.
    for secret in [
        token,
        identity.user_id().to_string(),
        identity.peer_key().to_string(),
    ] {
        assert!(!log.contains(&secret), "log leaks {secret}:\n{log}");
    }
}

#[test]
fn sigint_and_admin_shutdown_exit_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Daemon::start(&tmp.path().join("a"));
    node.signal("INT");
    let status = node.wait_exit(EXIT_TIMEOUT);
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        node.stderr()
    );

    let mut node = Daemon::start(&tmp.path().join("b"));
    let r = node.post_authorized("/v1/shutdown", "");
    assert_eq!(r.status, 202);
    let status = node.wait_exit(EXIT_TIMEOUT);
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        node.stderr()
    );
}

/// `debug_endpoints`: off, the block list does not exist (404); on, it needs the
/// token, checks its input, and drops (and counts) datagrams from a listed address
/// until it is emptied.
#[test]
fn debug_block_list_is_off_by_default_and_drops_what_it_lists() {
    let tmp = tempfile::tempdir().unwrap();
    let mut plain = Daemon::start(&tmp.path().join("plain"));
    let r = plain.post_authorized("/v1/debug/block", r#"{"addr": "127.0.0.1:9"}"#);
    assert_eq!(r.status, 404, "{}", r.body);
    plain.stop();

    let mut node = Daemon::start_with(
        &tmp.path().join("debug"),
        &[],
        &[("PEERCALL_DEBUG_ENDPOINTS", "true")],
    );
    let r = http(
        node.admin(),
        "POST",
        "/v1/debug/block",
        &[],
        r#"{"addr": "127.0.0.1:9"}"#,
    )
    .unwrap();
    assert_eq!(r.status, 401, "the token is required");
    for bad in [
        r#"{"addr": "nowhere"}"#,
        r#"{"address": "127.0.0.1:9"}"#,
        "[]",
    ] {
        let r = node.post_authorized("/v1/debug/block", bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert!(r.json()["error"].is_string(), "{}", r.body);
    }
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let from = peer.local_addr().unwrap();
    let r = node.post_authorized("/v1/debug/block", &format!(r#"{{"addr": "{from}"}}"#));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["blocked"][0], from.to_string());
    let counts = |node: &Daemon| {
        let text = node.get("/metrics").body;
        (
            metric(&text, "peercall_debug_blocked_datagrams_total").expect("blocked series"),
            metric(&text, "peercall_datagrams_received_total").expect("received series"),
        )
    };
    let (blocked0, received0) = counts(&node);
    for _ in 0..5 {
        peer.send_to(b"junk", node.udp()).unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || counts(&node).0 >= blocked0 + 5.0));
    assert_eq!(counts(&node).1, received0, "the engine saw none of them");

    let auth = format!("Bearer {}", node.token());
    let r = http(
        node.admin(),
        "DELETE",
        "/v1/debug/block",
        &[("Authorization", &auth)],
        "",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["blocked"], serde_json::json!([]));
    peer.send_to(b"junk", node.udp()).unwrap();
    assert!(eventually(Duration::from_secs(5), || counts(&node).1 > received0));
    assert_eq!(counts(&node).0, blocked0 + 5.0);
    node.stop();
}

#[test]
fn identity_persists_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let mut first = Daemon::start(&dir);
    let id = first.get("/status").json()["user_id"].clone();
    let token = first.token();
    first.stop();

    let mut second = Daemon::start(&dir);
    assert_eq!(second.get("/status").json()["user_id"], id);
    assert_ne!(second.token(), token, "a fresh admin token at every start");
    second.stop();
}

#[test]
fn second_node_on_one_data_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let mut first = Daemon::start(&dir);
    let mut cmd = peercall();
    cmd.args(node_args(&dir));
    let (status, stderr) = run_to_exit(cmd, &dir);
    assert!(!status.success());
    assert!(
        stderr.contains("in use by another running peercall node"),
        "{stderr}"
    );
    assert_eq!(
        first.get("/healthz").status,
        200,
        "the first node is unharmed"
    );
    first.stop();
}

fn write_key(dir: &std::path::Path, bytes: &[u8], file_mode: u32) -> std::path::PathBuf {
    fs::create_dir_all(dir).expect("create data dir");
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).expect("chmod data dir");
    let key = dir.join(IDENTITY);
    fs::write(&key, bytes).expect("write key");
    fs::set_permissions(&key, fs::Permissions::from_mode(file_mode)).expect("chmod key");
    key
}

#[test]
fn key_file_readable_by_others_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let key = write_key(&dir, &Identity::generate(&mut OsRng).to_file_bytes(), 0o644);
    let mut cmd = peercall();
    cmd.args(node_args(&dir));
    let (status, stderr) = run_to_exit(cmd, &dir);
    assert!(!status.success());
    assert!(stderr.contains("mode 0644"), "{stderr}");
    assert!(
        stderr.contains(&format!("chmod 600 {}", key.display())),
        "{stderr}"
    );
    assert!(!dir.join(ADMIN_ADDR).exists());
    assert_eq!(mode(&key), 0o644, "the node does not touch the file");
}

#[test]
fn corrupt_key_file_is_refused_and_left_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let mut junk = Identity::generate(&mut OsRng).to_file_bytes();
    junk[50] ^= 0x40;
    let key = write_key(&dir, &junk, 0o600);
    let mut cmd = peercall();
    cmd.args(node_args(&dir));
    let (status, stderr) = run_to_exit(cmd, &dir);
    assert!(!status.success());
    assert!(
        stderr.contains("corrupt") && stderr.contains("left untouched"),
        "{stderr}"
    );
    assert_eq!(fs::read(&key).unwrap(), junk);
}

#[test]
fn bad_configuration_fails_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let file = tmp.path().join("peercall.toml");
    struct Case {
        file: &'static str,
        env: &'static [(&'static str, &'static str)],
        flags: &'static [&'static str],
        expected: &'static str,
    }
    let cases = [
        Case {
            file: "lisen = \"127.0.0.1:7600\"\n",
            env: &[],
            flags: &[],
            expected: "config key 'lisen': unknown key",
        },
        Case {
            file: "keepalive_secs = 0\n",
            env: &[],
            flags: &[],
            expected: "config key 'keepalive_secs': invalid value \"0\"",
        },
        Case {
            file: "",
            env: &[("PEERCALL_LISTEN", "x")],
            flags: &[],
            expected: "config key 'listen': invalid socket address \"x\"",
        },
        Case {
            file: "",
            env: &[("PEERCALL_NOPE", "1")],
            flags: &[],
            expected: "config key 'nope': unknown key",
        },
        Case {
            file: "role = \"king\"\n",
            env: &[],
            flags: &[],
            expected: "config key 'role': invalid value \"king\"",
        },
        Case {
            file: "",
            env: &[],
            flags: &["--admin", "0.0.0.0:7601"],
            expected: "config key 'admin': 0.0.0.0:7601 is not a loopback address",
        },
    ];
    for Case {
        file: text,
        env,
        flags,
        expected,
    } in cases
    {
        fs::write(&file, text).unwrap();
        let mut cmd = peercall();
        cmd.args(["node", "--config"])
            .arg(&file)
            .args(["--data-dir"])
            .arg(&dir)
            .args(flags)
            .envs(env.iter().copied());
        let (status, stderr) = run_to_exit(cmd, &dir);
        assert_eq!(status.code(), Some(1), "{expected}: {stderr}");
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in:\n{stderr}"
        );
    }
    assert!(
        !dir.exists(),
        "a bad configuration stops before touching the data directory"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Daemon::start_with(&tmp.path().join("node"), &["--log-format", "json"], &[]);
    node.stop();
    let log = node.stderr();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 3, "{log}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}
