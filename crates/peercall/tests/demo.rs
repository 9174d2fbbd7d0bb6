//! `peercall demo`: the network comes up as reported, and nothing it started survives
//! it, whether it ends on its own or on Ctrl-C.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// How long the whole demo may take (a debug build on a loaded 2-core machine; it
/// takes about 19 s on an idle one, 10 of them waiting for the promotion).
const DEMO_TIMEOUT: Duration = Duration::from_secs(90);

/// One demo at a time: each is seven node processes waiting on a 10 s election
/// round; three at once on a 2-core machine test the machine, not the demo.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds [`ONE_AT_A_TIME`] for a test (a failed test's poison is no reason to stop).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running `peercall demo`; if a test fails while it runs, dropping it sends
/// SIGINT (so the demo stops its nodes and removes its directory, as on Ctrl-C)
/// and kills it only if it does not finish.
struct Demo(Child);

impl std::ops::Deref for Demo {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Demo {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            signal(self.0.id(), "INT");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `peercall demo` with stdout and stderr piped and no `PEERCALL_*` variables.
fn demo(args: &[&str]) -> Demo {
    let mut cmd: Command = peercall();
    cmd.arg("demo")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Demo(cmd.spawn().expect("spawn peercall demo"))
}

/// Reads a pipe to its end on a thread, so the child never blocks on a full pipe.
fn collect(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(pipe).read_to_string(&mut text);
        let _ = tx.send(text);
    });
    rx
}

fn wait(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            // Dropping the demo stops it.
            panic!("peercall demo did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` is a peercall node of the demo whose temporary directory
/// is `temp_dir` (a recycled pid belongs to something else).
fn node_alive(pid: u64, temp_dir: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(temp_dir))
}

/// Checks the summary: three seed supernodes in a tier, four desktops seeded with
/// seed-1 (odd ones over IK, even ones over XX), desk-1 and desk-2 behind emulated
/// NATs with impaired links, one open desktop promoted by the tier, and
/// authenticated keepalives received by everyone.
fn check_summary(summary: &Value) {
    let nodes = summary["nodes"].as_array().expect("nodes");
    let names: Vec<&str> = nodes.iter().filter_map(|n| n["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "seed-1", "seed-2", "seed-3", "desk-1", "desk-2", "desk-3", "desk-4"
        ],
        "{summary}"
    );
    for seed in &nodes[..3] {
        assert_eq!(seed["role"], "supernode", "{seed}");
        assert_eq!(seed["handshake"], Value::Null);
        assert_eq!(seed["nat"], false);
    }
    // seed-1 holds sessions with the other seeds (and with the desktops it is a
    // home of: the others closed their bootstrap session with it once attached).
    let seed1: Vec<&str> = nodes[0]["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for peer in ["seed-2", "seed-3"] {
        assert!(
            seed1.contains(&peer),
            "seed-1 has a session with {peer}: {seed1:?}"
        );
    }
    assert_eq!(summary["sessions"].as_u64(), Some(seed1.len() as u64));
    for (i, node) in nodes[3..].iter().enumerate() {
        let name = format!("desk-{}", i + 1);
        assert_eq!(node["role"], "auto", "{name}");
        let sessions = node["sessions"].as_array().expect("sessions");
        assert!(
            sessions.len() >= 2,
            "{name} is in session with its homes: {node}"
        );
        assert_eq!(node["handshake"], if i % 2 == 0 { "IK" } else { "XX" });
        assert!(
            node["handshakes_completed"].as_u64().expect("count") >= 1,
            "{name}"
        );
        assert!(node["session_up_ms"].as_f64().is_some(), "{name}");
        // desk-1 and desk-2 sit behind emulated NATs on impaired links: their
        // sockets delayed what they sent; the open desktops' did nothing.
        let behind_nat = i < 2;
        assert_eq!(node["nat"], behind_nat, "{name}");
        let delayed = node["emulated"]["delayed"].as_u64().expect("delayed");
        assert_eq!(delayed > 0, behind_nat, "{name}: {node}");
        if !behind_nat {
            assert_eq!(node["emulated"]["nat_filtered"], 0, "{name}");
            assert_eq!(node["emulated"]["lost"], 0, "{name}");
        }
    }
    // The promotion: an open desktop (the NATed ones fail the dial-back), elected
    // by the tier within the demo; the tier may take both open ones in one round
    // (enough to bring the load to the watermarks' midpoint).
    assert!(summary["promotions"].as_u64().expect("promotions") >= 1);
    let promoted = summary["promoted"]
        .as_str()
        .expect("a desktop was promoted");
    assert!(["desk-3", "desk-4"].contains(&promoted), "{promoted}");
    let mut supernodes = 0;
    for node in nodes {
        if node["role"] == "supernode" || node["name"] == promoted {
            assert_eq!(node["supernode"], true, "{node}");
        }
        if node["nat"] == true {
            assert_eq!(node["supernode"], false, "{node}");
        }
        supernodes += usize::from(node["supernode"] == true);
    }
    assert!((4..=5).contains(&supernodes), "{summary}");
    assert_eq!(summary["supernodes"], supernodes, "{summary}");
    let after = summary["promotion_s"].as_f64().expect("promotion_s");
    assert!(after > 0.0 && after < 40.0, "{after} s");
    let mut keys: Vec<&str> = nodes
        .iter()
        .map(|n| n["peer_key"].as_str().expect("peer_key"))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), 7, "seven distinct identities");
    for node in nodes {
        assert!(
            node["keepalives_received"].as_u64().expect("count") >= 2,
            "{node}"
        );
        assert!(
            node["keepalives_sent"].as_u64().expect("count") >= 1,
            "{node}"
        );
        assert_eq!(node["fingerprint"].as_str().expect("fingerprint").len(), 24);
        let metrics = node["metrics"].as_str().expect("metrics url");
        assert!(metrics.starts_with("http://127.0.0.1:") && metrics.ends_with("/metrics"));
        assert!(
            node["udp"].as_str().expect("udp").starts_with("127.80.0."),
            "{node}"
        );
    }
}

/// Nothing of the demo's is left: no node process, no temporary directory.
fn check_cleaned_up(summary: &Value) {
    let temp_dir = summary["temp_dir"].as_str().expect("temp_dir");
    assert!(temp_dir.contains("peercall-demo-"), "{temp_dir}");
    assert!(!Path::new(temp_dir).exists(), "{temp_dir} was removed");
    for node in summary["nodes"].as_array().expect("nodes") {
        let pid = node["pid"].as_u64().expect("pid");
        assert!(
            !node_alive(pid, temp_dir),
            "node {} (pid {pid}) survived",
            node["name"]
        );
    }
}

#[test]
fn demo_brings_up_a_network_and_leaves_nothing_behind() {
    let _serial = serial();
    let mut child = demo(&["--json"]);
    let stdout = collect(child.stdout.take().expect("stdout"));
    let stderr = collect(child.stderr.take().expect("stderr"));
    let status = wait(&mut child, DEMO_TIMEOUT);
    let (out, err) = (
        stdout.recv().expect("stdout"),
        stderr.recv().expect("stderr"),
    );
    assert!(status.success(), "{status}\n{err}");
    // stdout is the summary alone, as one JSON object on one line.
    assert_eq!(out.lines().count(), 1, "{out}");
    let summary: Value = serde_json::from_str(&out).expect("summary JSON");
    check_summary(&summary);
    check_call(&summary);
    check_cleaned_up(&summary);
    // The narrative went to stderr.
    for expected in [
        "seed-1  supernode",
        "the tier is formed: every seed knows all 3 supernodes",
        "behind an emulated NAT",
        "session up with Noise IK",
        "session up with Noise XX",
        "all 4 sessions up",
        "authenticated keepalives flowing",
        "promotion: the tier made desk-",
        "desk-1 and desk-2 stay ordinary",
        "all 7 nodes exited",
        "removed",
        "looked up desk-2 in the directory",
        "call connected in",
        "direct path cut:",
        "call_path_switched: direct -> relay",
        "hung up: set-up",
    ] {
        assert!(err.contains(expected), "{expected:?} in:\n{err}");
    }
}

/// The call from desk-1 to desk-2: the `peercall call --json` fields, audio both
/// ways, and desk-2's finished recording (removed here).
fn check_call(summary: &Value) {
    let call = &summary["call"];
    assert_eq!(call["outcome"], "completed", "{call}");
    assert_eq!(call["handle"], "desk-2", "{call}");
    let setup = call["setup_ms"].as_u64().expect("setup_ms");
    let first_audio = call["first_audio_ms"].as_u64().expect("first_audio_ms");
    assert!(setup <= first_audio && first_audio < 3_000, "{call}");
    for field in ["frames_sent", "frames_received"] {
        assert!(call[field].as_u64().expect(field) >= 100, "{call}");
    }
    for field in ["path_switches", "concealed_ms", "max_gap_ms"] {
        assert!(call[field].as_u64().is_some(), "{field}: {call}");
    }
    assert!(call["mos_estimate"].as_f64().is_some(), "{call}");
    assert!(
        !call["paths_used"]
            .as_array()
            .expect("paths_used")
            .is_empty()
    );
    check_path_cut(summary);
    let record = Path::new(call["record"].as_str().expect("record"));
    let wav = hound::WavReader::open(record).expect("desk-2's recording is a finished WAV");
    assert_eq!(wav.spec().sample_rate, 48_000);
    assert!(wav.duration() >= 48_000 * 3, "{} samples", wav.duration());
    std::fs::remove_file(record).expect("remove the recording");
}

/// Longest audio gap either side may hear across the cut: the router leaves a
/// silent path within max(3 × RTT, 150 ms) on loopback, and the jitter buffer and
/// concealment cover part of that; 200 ms leaves room for a loaded machine.
const MAX_GAP_MS: u64 = 200;

/// The direct path was cut mid-call in desk-1's socket, and the call went on over
/// a relay through the seed, on both sides, with a bounded gap.
fn check_path_cut(summary: &Value) {
    let cut_at = summary["path_cut_at_s"].as_f64().expect("path_cut_at_s");
    // 4 s in, or later if the call had to wait for the direct path (at most 10 s).
    assert!((3.0..16.0).contains(&cut_at), "{summary}");
    let switch_ms = summary["path_switch_ms"]
        .as_u64()
        .expect("the call switched paths after the cut");
    assert!(switch_ms < 3_000, "{switch_ms} ms");
    for side in [&summary["call"], &summary["callee_call"]] {
        assert!(
            side["path_switches"].as_u64().expect("path_switches") >= 1,
            "{side}"
        );
        let used: Vec<&str> = side["paths_used"]
            .as_array()
            .expect("paths_used")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(used.contains(&"direct"), "{side}");
        assert!(used.iter().any(|k| k.starts_with("relay")), "{side}");
        let gap = side["max_gap_ms"].as_u64().expect("max_gap_ms");
        assert!(gap <= MAX_GAP_MS, "longest gap {gap} ms: {side}");
        assert!(
            side["frames_received"].as_u64().expect("frames") >= 300,
            "{side}"
        );
    }
    // The cut happened in desk-1's socket, and only there.
    let nodes = summary["nodes"].as_array().expect("nodes");
    for node in nodes {
        let blocked = node["debug_blocked"].as_u64().expect("debug_blocked");
        if node["name"] == "desk-1" {
            assert!(blocked > 0, "{node}");
        } else {
            assert_eq!(blocked, 0, "{node}");
        }
    }
}

#[test]
fn keep_running_serves_metrics_until_ctrl_c_then_cleans_up() {
    let _serial = serial();
    let mut child = demo(&["--json", "--keep-running"]);
    let stderr = collect(child.stderr.take().expect("stderr"));
    // The summary comes first, while the network keeps running.
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(DEMO_TIMEOUT) {
        Ok(line) => line,
        Err(_) => panic!("no summary within {DEMO_TIMEOUT:?}"),
    };
    let summary: Value = match serde_json::from_str(&line) {
        Ok(v) => v,
        Err(e) => panic!(
            "summary JSON: {e}: {line:?}\n{}",
            stderr.recv().unwrap_or_default()
        ),
    };
    check_summary(&summary);
    // The call's recording outlives the demo by design; a test removes it.
    if let Some(record) = summary["call"]["record"].as_str() {
        let _ = std::fs::remove_file(record);
    }

    // Every node's metrics are where the summary says, and keepalives keep coming.
    for node in summary["nodes"].as_array().expect("nodes") {
        let admin: std::net::SocketAddr = node["admin"].as_str().expect("admin").parse().unwrap();
        let before = node["keepalives_received"].as_f64().expect("count");
        assert!(
            eventually(Duration::from_secs(20), || {
                http(admin, "GET", "/metrics", &[], "")
                    .ok()
                    .and_then(|r| metric(&r.body, "peercall_keepalives_received_total"))
                    .is_some_and(|v| v > before)
            }),
            "{} keeps receiving keepalives",
            node["name"]
        );
    }

    signal(child.id(), "INT");
    let status = wait(&mut child, DEMO_TIMEOUT);
    let err = stderr.recv().expect("stderr");
    assert!(
        status.success(),
        "Ctrl-C is the normal way out: {status}\n{err}"
    );
    assert!(err.contains("SIGINT: stopping"), "{err}");
    check_cleaned_up(&summary);
}

#[test]
fn ctrl_c_during_set_up_still_cleans_up() {
    let _serial = serial();
    let mut child = demo(&["--json"]);
    let stderr = child.stderr.take().expect("stderr");
    // Interrupt as soon as the first desktop is starting: nodes are mid-start-up.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = String::new();
        for line in lines.by_ref().map_while(Result::ok) {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("desk-1  starting") {
                let _ = tx.send(None);
            }
        }
        let _ = tx.send(Some(seen));
    });
    let first = rx.recv_timeout(DEMO_TIMEOUT);
    signal(child.id(), "INT");
    assert!(
        matches!(first, Ok(None)),
        "the demo got to its desktops: {first:?}"
    );
    let status = wait(&mut child, DEMO_TIMEOUT);
    let err = loop {
        match rx.recv_timeout(DEMO_TIMEOUT).expect("stderr closes") {
            Some(text) => break text,
            None => continue,
        }
    };
    assert_eq!(status.code(), Some(1), "interrupted set-up fails:\n{err}");
    assert!(err.contains("interrupted by SIGINT"), "{err}");
    let temp_dir = err
        .lines()
        .find_map(|l| l.trim().strip_prefix("temporary data in "))
        .and_then(|rest| rest.split(' ').next())
        .expect("the narrative names the temporary directory");
    assert!(!Path::new(temp_dir).exists(), "{temp_dir} was removed");
    // No process anywhere still runs a node from that directory.
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let name = entry.expect("entry").file_name();
        if let Some(pid) = name.to_str().and_then(|n| n.parse::<u64>().ok()) {
            assert!(!node_alive(pid, temp_dir), "pid {pid} survived");
        }
    }
}
