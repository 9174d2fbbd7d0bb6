//! The overlay with real `peercall node` processes on loopback (issue 3, section 9):
//! pinned seed supernodes and desktop nodes on their own loopback addresses, a desktop
//! promoted by the tier after a dial-back, users registered with handles and looked up
//! by id and handle through the admin API and the `peercall lookup` CLI, presence
//! pushed through `/v1/events`, a supernode killed with SIGKILL and the directory and
//! presence recovering, bad requests answered clearly, and a restart that re-attaches
//! from the persisted host cache with its contacts.
//!
//! Every node listens on its own address in 127.0.0.0/8: the tier only validates a
//! candidate through a supernode on another IP than the candidate's and its home's,
//! as it would on the Internet. For the same reason the promotion test pins three
//! seeds, not two: the dialer must be a supernode the candidate never had a session
//! with, and with two seeds every desktop is attached to both (two homes), so no
//! candidate could ever be validated. The figures measured (promotion time, lookup
//! latency, recovery time) are printed; run with `--nocapture` to see them.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::thread::{self, sleep};
use std::time::{Duration, Instant};

use common::*;
use peercall_crypto::Identity;
use rand::rngs::OsRng;
use serde_json::Value;

/// Keepalive interval: the shortest the config allows, so a dead peer is noticed fast.
const KEEPALIVE_SECS: u64 = 1;
/// Session timeout: a killed supernode's sessions end within this many seconds.
const SESSION_TIMEOUT_SECS: u64 = 3;
/// How long a desktop counts a supernode it probed or was in session with as
/// contacted (it cannot dial the desktop back for the election): the default
/// three minutes, a consumer NAT's mapping time, is beyond the test; the desktops
/// are on open loopback addresses anyway.
const CONTACT_MEMORY_SECS: u64 = 5;
/// Record lifetime and refresh: short, so the test exercises refreshes, but far
/// longer than any step of the test.
const RECORD_TTL_SECS: u64 = 60;
const RECORD_REFRESH_SECS: u64 = 20;
/// Clients a seed admits: three seeds take 9 attachments, and four desktops with two
/// homes each bring 8, a load of 0.89, past the high watermark of 0.8. The coordinator
/// promotes enough nodes to bring the load to the midpoint of the watermarks (0.625):
/// one, after which the load is 6 of 12 (0.5), between the watermarks, so the tier
/// stays at four.
const SEED_CAPACITY: u32 = 3;
/// How long the seeds may take to know each other.
const TIER_WAIT: Duration = Duration::from_secs(20);
/// How long nodes may take to attach to their homes.
const ATTACH_WAIT: Duration = Duration::from_secs(20);
/// How long the tier may take to promote a desktop: candidacy (3 s after attaching),
/// dial-back, nomination and the coordinator's election round (every 10 s, after a
/// 10 s cool-down at start), on a loaded 2-core machine.
const PROMOTION_WAIT: Duration = Duration::from_secs(40);
/// How long the directory may take to hold every record after the nodes attached.
const PUBLISH_WAIT: Duration = Duration::from_secs(20);
/// Bound on the recovery of lookups after a supernode is killed: the session timeout,
/// a re-attach with back-off, and a re-publish, with slack for the machine.
const RECOVERY_BOUND: Duration = Duration::from_secs(20);
/// Bound on a presence change reaching a subscriber.
const PRESENCE_BOUND: Duration = Duration::from_secs(15);
/// How long a CLI command may run.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// A block of loopback addresses of its own for each test (and each test process),
/// so concurrent runs never meet.
fn ip(test: u8, host: u8) -> IpAddr {
    let pid = std::process::id();
    IpAddr::V4(Ipv4Addr::new(
        127,
        100 + (pid % 100) as u8,
        test.wrapping_add((pid / 100 % 50) as u8 * 4),
        host,
    ))
}

/// A free UDP port on `ip` (bound and released; the node binds it right after).
fn free_addr(ip: IpAddr) -> SocketAddr {
    let s = UdpSocket::bind((ip, 0)).expect("bind a loopback address");
    s.local_addr().expect("local addr")
}

/// What a test node is.
#[derive(Clone)]
struct Spec {
    role: &'static str,
    handle: Option<&'static str>,
    seeds: Vec<String>,
    capacity: u32,
}

/// A node of the test network: its identity is made by the test, so its keys are
/// known before it starts.
struct Node {
    name: &'static str,
    id: Identity,
    addr: SocketAddr,
    dir: PathBuf,
    config: PathBuf,
    daemon: Option<Daemon>,
}

impl Node {
    fn new(root: &Path, name: &'static str, ip: IpAddr) -> Node {
        let dir = root.join(name);
        fs::create_dir_all(&dir).expect("create data dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        let id = Identity::generate(&mut OsRng);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(IDENTITY))
            .expect("create identity.key");
        f.write_all(&id.to_file_bytes())
            .expect("write identity.key");
        Node {
            name,
            id,
            addr: free_addr(ip),
            dir,
            config: root.join(format!("{name}.toml")),
            daemon: None,
        }
    }

    /// `KEY@ADDR`, as `seeds` lists it.
    fn seed_spec(&self) -> String {
        format!("{}@{}", self.id.peer_key(), self.addr)
    }

    fn user(&self) -> String {
        self.id.user_id().to_string()
    }

    fn key(&self) -> String {
        self.id.peer_key().to_string()
    }

    fn write_config(&self, spec: &Spec) {
        let seeds: Vec<String> = spec.seeds.iter().map(|s| format!("\"{s}\"")).collect();
        let text = format!(
            "role = \"{role}\"\n\
             handle = \"{handle}\"\n\
             seeds = [{seeds}]\n\
             keepalive_secs = {KEEPALIVE_SECS}\n\
             session_timeout_secs = {SESSION_TIMEOUT_SECS}\n\
             state_save_secs = 1\n\
             supernode_max_clients = {capacity}\n\
             bandwidth_mbps = 100\n\
             record_ttl_secs = {RECORD_TTL_SECS}\n\
             record_refresh_secs = {RECORD_REFRESH_SECS}\n\
             election_min_uptime_secs = 0\n\
             election_contact_memory_secs = {CONTACT_MEMORY_SECS}\n\
             election_min_bandwidth_mbps = 10\n\
             election_min_cpu_headroom_pct = 0\n\
             election_high_watermark = 0.8\n\
             election_low_watermark = 0.45\n\
             election_min_supernodes = 3\n",
            role = spec.role,
            handle = spec.handle.unwrap_or(""),
            seeds = seeds.join(", "),
            capacity = spec.capacity,
        );
        fs::write(&self.config, text).expect("write config");
    }

    /// Starts the node with `spec` and waits until it is ready.
    fn start(&mut self, spec: &Spec) {
        assert!(self.daemon.is_none(), "{} already runs", self.name);
        self.write_config(spec);
        let config = self.config.display().to_string();
        // The admin API on this node's own loopback address too.
        self.daemon = Some(Daemon::start_node(
            &self.dir,
            &self.addr.to_string(),
            &["--config", &config],
            &[],
        ));
    }

    fn d(&self) -> &Daemon {
        self.daemon
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
    }

    fn status(&self) -> Value {
        let r = self.d().get("/status");
        assert_eq!(r.status, 200, "{}: {}", self.name, r.body);
        r.json()
    }

    fn is_supernode(&self) -> bool {
        self.status()["supernode"] == Value::Bool(true)
    }

    fn homes(&self) -> Vec<String> {
        let mut homes: Vec<String> = self.status()["homes"]
            .as_array()
            .expect("homes")
            .iter()
            .map(|h| h["key"].as_str().expect("key").to_owned())
            .collect();
        homes.sort();
        homes
    }

    fn metric(&self, series: &str) -> f64 {
        let text = self.d().get("/metrics").body;
        metric(&text, series).unwrap_or_else(|| panic!("{}: no {series} in\n{text}", self.name))
    }

    /// `GET /v1/lookup?q=...` and how long it took.
    fn lookup(&self, q: &str) -> (HttpResponse, Duration) {
        let t = Instant::now();
        let r = self.d().get(&format!("/v1/lookup?q={q}"));
        (r, t.elapsed())
    }

    /// SIGTERM, and a clean exit.
    fn stop(&mut self) {
        let mut d = self.daemon.take().expect("running");
        d.stop();
    }

    /// SIGKILL: no goodbye, no state saved.
    fn kill(&mut self) {
        let mut d = self.daemon.take().expect("running");
        d.signal("KILL");
        assert!(d.wait_exit(EXIT_TIMEOUT).is_some(), "{} killed", self.name);
    }

    fn stderr(&self) -> String {
        self.daemon.as_ref().map(Daemon::stderr).unwrap_or_default()
    }
}

fn wait(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    assert!(eventually(timeout, &mut check), "{what} within {timeout:?}");
    t.elapsed()
}

/// Like [`wait`], and on failure shows `node`'s status and log.
fn wait_on(node: &Node, timeout: Duration, what: &str, check: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    if !eventually(timeout, check) {
        panic!(
            "{what} within {timeout:?}; {} status: {}\n{}",
            node.name,
            node.status(),
            node.stderr()
        );
    }
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A lookup answer describes `node`'s current record.
fn assert_record_of(body: &Value, node: &Node, handle: Option<&str>, what: &str) {
    assert_eq!(body["user_id"], node.user(), "{what}: {body}");
    assert_eq!(
        body["fingerprint"],
        node.id.user_id().fingerprint(),
        "{what}"
    );
    assert_eq!(body["static_key"], node.key(), "{what}");
    assert_eq!(body["handle"].as_str(), handle, "{what}");
    assert_eq!(body["online"], true, "{what}: {body}");
    let endpoints: Vec<&str> = body["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        endpoints.contains(&node.addr.to_string().as_str()),
        "{what}: {} listed at {endpoints:?}",
        node.addr
    );
}

/// The home supernode keys a lookup answer lists.
fn record_homes(body: &Value) -> Vec<String> {
    body["home_supernodes"]
        .as_array()
        .expect("home_supernodes")
        .iter()
        .map(|h| h["key"].as_str().expect("key").to_owned())
        .collect()
}

/// A `/v1/events` subscription read by a thread: events arrive with the time they
/// were read.
struct Events {
    rx: mpsc::Receiver<(Instant, String, Value)>,
    stream: TcpStream,
}

impl Events {
    fn open(d: &Daemon) -> Events {
        let mut stream = TcpStream::connect_timeout(&d.admin(), IO_TIMEOUT).expect("connect");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        write!(
            stream,
            "GET /v1/events HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Accept: text/event-stream\r\n\r\n",
            d.admin(),
            d.token()
        )
        .expect("send request");
        let (tx, rx) = mpsc::channel();
        let reader = stream.try_clone().expect("clone stream");
        thread::spawn(move || read_events(reader, &tx));
        let events = Events { rx, stream };
        events
            .wait(IO_TIMEOUT, |kind, _| kind == "hello")
            .expect("the hello event");
        events
    }

    /// The next event that `pred` accepts, within `timeout`.
    fn wait(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&str, &Value) -> bool,
    ) -> Option<(Instant, Value)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((at, kind, data)) if pred(&kind, &data) => return Some((at, data)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// The next presence event for `user` saying `online`.
    fn presence(&self, user: &str, online: bool, timeout: Duration) -> Option<Instant> {
        self.wait(timeout, |kind, data| {
            kind == "presence" && data["user_id"] == user && data["online"] == online
        })
        .map(|(at, _)| at)
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Reads an SSE response (chunked or not) and sends each event's kind and data.
fn read_events(stream: TcpStream, tx: &mpsc::Sender<(Instant, String, Value)>) {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if l.starts_with("http/") && !l.contains(" 200") {
            return;
        }
        chunked |= l == "transfer-encoding: chunked";
    }
    let mut pending = String::new();
    let (mut kind, mut data) = (String::new(), String::new());
    loop {
        let mut piece = Vec::new();
        if chunked {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let Ok(size) = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            else {
                return;
            };
            if size == 0 {
                return;
            }
            piece.resize(size + 2, 0);
            if r.read_exact(&mut piece).is_err() {
                return;
            }
            piece.truncate(size);
        } else {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            piece.extend_from_slice(line.as_bytes());
        }
        pending.push_str(&String::from_utf8_lossy(&piece));
        while let Some(i) = pending.find('\n') {
            let l: String = pending.drain(..=i).collect();
            let l = l.trim_end_matches(['\r', '\n']);
            if let Some(k) = l.strip_prefix("event:") {
                kind = k.trim().to_owned();
            } else if let Some(d) = l.strip_prefix("data:") {
                data.push_str(d.trim());
            } else if l.is_empty() && !kind.is_empty() {
                let value = serde_json::from_str(&data).unwrap_or(Value::Null);
                if tx
                    .send((Instant::now(), std::mem::take(&mut kind), value))
                    .is_err()
                {
                    return;
                }
                data.clear();
            }
        }
    }
}

/// Runs `peercall ARGS` to completion; its status, stdout and stderr.
fn cli(args: &[&str]) -> (bool, String, String) {
    let mut child = peercall()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn peercall");
    let deadline = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("peercall {args:?} did not finish in {CLI_TIMEOUT:?}");
        }
        sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    (status.success(), out, err)
}

/// Starts `n` pinned seed supernodes that know each other, and waits until each knows
/// the whole tier.
fn start_seeds(seeds: &mut [Node], capacity: u32) {
    let specs: Vec<String> = seeds.iter().map(Node::seed_spec).collect();
    for (i, s) in seeds.iter_mut().enumerate() {
        let others = specs
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, s)| s.clone())
            .collect();
        s.start(&Spec {
            role: "supernode",
            handle: None,
            seeds: others,
            capacity,
        });
    }
    let n = seeds.len() as u64;
    for s in seeds.iter() {
        let known = eventually(TIER_WAIT, || s.status()["members"].as_u64() == Some(n));
        assert!(
            known,
            "{} knows the tier of {n}: {}\n{}",
            s.name,
            s.status(),
            s.stderr()
        );
    }
}

#[test]
fn tier_promotes_a_desktop_and_directory_and_presence_survive_a_supernode_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut seeds: Vec<Node> = ["s0", "s1", "s2"]
        .iter()
        .enumerate()
        .map(|(i, name)| Node::new(root, name, ip(1, 1 + i as u8)))
        .collect();
    start_seeds(&mut seeds, SEED_CAPACITY);

    // Four desktops that may be promoted, with handles. They know only the first
    // seed: the others they learn from it, and one of them stays a supernode they
    // never contacted, the tier's dialer for their dial-back.
    let handles = ["alice", "bob", "carol", "dave"];
    let mut desktops: Vec<Node> = ["d0", "d1", "d2", "d3"]
        .iter()
        .enumerate()
        .map(|(i, name)| Node::new(root, name, ip(1, 10 + i as u8)))
        .collect();
    let desktop_spec = |handle| Spec {
        role: "auto",
        handle: Some(handle),
        seeds: vec![seeds[0].seed_spec()],
        capacity: SEED_CAPACITY,
    };
    let started = Instant::now();
    for (d, h) in desktops.iter_mut().zip(handles) {
        d.start(&desktop_spec(h));
    }

    // The tier promotes a desktop.
    let mut promoted = None;
    wait(PROMOTION_WAIT, "a desktop promoted", || {
        promoted = desktops.iter().position(Node::is_supernode);
        promoted.is_some()
    });
    let promotion = started.elapsed();
    let p = promoted.expect("promoted");
    println!(
        "promotion: {} promoted {:.1} s after the desktops started",
        desktops[p].name,
        promotion.as_secs_f64()
    );
    let st = desktops[p].status();
    assert_eq!(st["role"], "auto", "promoted by the tier, not configured");
    assert_eq!(st["supernode"], true);
    assert_eq!(desktops[p].metric("peercall_overlay_supernode"), 1.0);
    let promotions: f64 = seeds
        .iter()
        .map(|s| s.metric("peercall_overlay_promotions_total"))
        .sum();
    assert!(promotions >= 1.0, "a seed counted the promotion");
    let dialbacks: f64 = seeds
        .iter()
        .map(|s| s.metric("peercall_overlay_dialbacks_total{result=\"ok\"}"))
        .sum();
    assert!(dialbacks >= 1.0, "after a successful dial-back");
    // Every supernode learns the new member; the promoted one its peers.
    for s in seeds.iter().chain([&desktops[p]]) {
        wait(TIER_WAIT, &format!("{} knows 4 supernodes", s.name), || {
            s.status()["members"].as_u64() == Some(4)
        });
    }
    assert_eq!(desktops[p].metric("peercall_overlay_members"), 4.0);
    let ordinary: Vec<usize> = (0..desktops.len()).filter(|&i| i != p).collect();
    for &i in &ordinary {
        let d = &desktops[i];
        wait(ATTACH_WAIT, &format!("{} has two homes", d.name), || {
            d.homes().len() == 2
        });
        assert_eq!(d.status()["supernode"], false, "{}", d.name);
        assert_eq!(d.metric("peercall_overlay_supernode"), 0.0);
    }
    let supernode_keys: Vec<String> = seeds.iter().chain([&desktops[p]]).map(Node::key).collect();
    for &i in &ordinary {
        println!("{} homes: {:?}", desktops[i].name, desktops[i].homes());
    }

    // Every user is found by id and by handle from every node, ordinary (through
    // its homes) or the promoted supernode (through its own fetch).
    let find_all = |latencies: &mut Vec<Duration>| -> Result<(), String> {
        for looker in &desktops {
            for (target, handle) in desktops.iter().zip(handles) {
                if looker.name == target.name {
                    continue;
                }
                for q in [target.user(), handle.to_owned()] {
                    let (r, took) = looker.lookup(&q);
                    if r.status != 200 {
                        return Err(format!("{} -> {q}: {} {}", looker.name, r.status, r.body));
                    }
                    let body = r.json();
                    assert_record_of(&body, target, Some(handle), &q);
                    let homes = record_homes(&body);
                    assert!(!homes.is_empty(), "{q}: homes listed");
                    assert!(
                        homes.iter().all(|h| supernode_keys.contains(h)),
                        "{q}: homes are supernodes: {homes:?}"
                    );
                    latencies.push(took);
                }
            }
        }
        Ok(())
    };
    let mut last = String::new();
    wait(PUBLISH_WAIT, "every record found", || {
        find_all(&mut Vec::new()).map_err(|e| last = e).is_ok()
    });
    let mut latencies = Vec::new();
    find_all(&mut latencies).expect("lookups after publication");
    println!(
        "lookup through the admin API: median {:.1} ms, max {:.1} ms over {}",
        median(latencies.clone()).as_secs_f64() * 1e3,
        latencies.iter().max().expect("some").as_secs_f64() * 1e3,
        latencies.len()
    );

    // The CLI, by handle and by user id, from an ordinary node.
    let looker = &desktops[ordinary[0]];
    let target = ordinary[1];
    let dir = looker.dir.display().to_string();
    let (ok, out, err) = cli(&["lookup", handles[target], "--data-dir", &dir]);
    assert!(ok, "peercall lookup: {err}");
    assert!(
        out.starts_with(&format!("{} (online)", handles[target])),
        "{out}"
    );
    for part in [
        desktops[target].id.user_id().fingerprint(),
        desktops[target].user(),
        desktops[target].key(),
        desktops[target].addr.to_string(),
    ] {
        assert!(out.contains(&part), "{part} in\n{out}");
    }
    let (ok, out, err) = cli(&[
        "lookup",
        &desktops[target].user(),
        "--json",
        "--data-dir",
        &dir,
    ]);
    assert!(ok, "peercall lookup --json: {err}");
    let body: Value = serde_json::from_str(&out).expect("JSON");
    assert_record_of(&body, &desktops[target], Some(handles[target]), "CLI");
    let (ok, out, err) = cli(&[
        "status",
        "--json",
        "--data-dir",
        &desktops[p].dir.display().to_string(),
    ]);
    assert!(ok, "peercall status: {err}");
    let body: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        (&body["role"], &body["supernode"]),
        (&"auto".into(), &true.into())
    );

    // Presence: the watcher pins a contact (by user id) that is not online yet, and
    // sees it come online.
    let w = ordinary[0];
    let events = Events::open(desktops[w].d());
    let mut erin = Node::new(root, "erin", ip(1, 20));
    let r = desktops[w].d().post_authorized(
        "/v1/contacts",
        &format!("{{\"contact\": \"{}\"}}", erin.user()),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let erin_spec = Spec {
        role: "ordinary",
        handle: Some("erin"),
        seeds: vec![seeds[1].seed_spec()],
        capacity: SEED_CAPACITY,
    };
    let t = Instant::now();
    erin.start(&erin_spec);
    let at = events
        .presence(&erin.user(), true, PRESENCE_BOUND)
        .unwrap_or_else(|| panic!("erin online at the watcher\n{}", desktops[w].stderr()));
    println!(
        "presence: online {:.1} s after erin's process started",
        (at - t).as_secs_f64()
    );

    // A record just published, looked up from every ordinary node: the homes have
    // no fresh copy (only the watcher's home follows erin), so these go to storers.
    let mut cold = Vec::new();
    for &i in &ordinary {
        let (r, took) = desktops[i].lookup("erin");
        assert_eq!(r.status, 200, "{}: {}", desktops[i].name, r.body);
        assert_record_of(&r.json(), &erin, Some("erin"), "erin");
        cold.push(took);
    }
    println!(
        "lookup of a just-published record through the admin API: median {:.1} ms over {}",
        median(cold.clone()).as_secs_f64() * 1e3,
        cold.len()
    );

    // Kill -9 one of the watcher's homes: a supernode that also stores records.
    let victim_key = desktops[w].homes()[0].clone();
    let victim = seeds
        .iter_mut()
        .chain([&mut desktops[p]])
        .find(|s| s.key() == victim_key)
        .expect("a watcher's home is a supernode");
    println!("killing {} (a home of the watcher)", victim.name);
    let killed = Instant::now();
    victim.kill();

    // Lookups recover: every ordinary node finds every user, and every record names
    // live homes only (the nodes re-attached and re-published).
    let live_ordinary: Vec<&Node> = ordinary.iter().map(|&i| &desktops[i]).collect();
    let mut failures = 0u32;
    let mut answering: Option<Duration> = None;
    let mut last = String::new();
    let whole = eventually(RECOVERY_BOUND, || {
        let mut bad = Vec::new();
        for looker in &live_ordinary {
            for target in desktops.iter().chain([&erin]) {
                if looker.name == target.name || target.daemon.is_none() {
                    continue;
                }
                let (r, _) = looker.lookup(&target.user());
                if r.status != 200 {
                    bad.push(format!("{} -> {}: {}", looker.name, target.name, r.body));
                } else if record_homes(&r.json()).contains(&victim_key) {
                    let b = r.json();
                    bad.push(format!(
                        "{} -> {}: lists the dead home: seq {} homes {} (target: supernode {} members {} homes {:?})",
                        looker.name,
                        target.name,
                        b["seq"],
                        b["home_supernodes"],
                        target.status()["supernode"],
                        target.status()["members"],
                        target.homes()
                    ));
                }
            }
        }
        if answering.is_none() && bad.iter().all(|b| b.contains("lists the dead home")) {
            answering = Some(killed.elapsed());
        }
        failures += u32::from(!bad.is_empty());
        last = bad.join("\n");
        bad.is_empty()
    });
    let recovered = killed.elapsed();
    if !whole {
        let states: Vec<String> = desktops
            .iter()
            .chain([&erin])
            .filter(|n| n.daemon.is_some())
            .map(|n| format!("{}: homes {:?}", n.name, n.homes()))
            .collect();
        panic!(
            "lookups not whole {RECOVERY_BOUND:?} after the kill:\n{last}\n{}\n{}",
            states.join("\n"),
            desktops[w].stderr()
        );
    }
    println!(
        "recovery: every lookup answered {:.1} s after the kill; every record names live \
         homes only {:.1} s after it ({failures} incomplete rounds)",
        answering.unwrap_or(recovered).as_secs_f64(),
        recovered.as_secs_f64()
    );
    for d in &live_ordinary {
        let homes = d.homes();
        assert!(!homes.contains(&victim_key), "{}: {homes:?}", d.name);
        // With a supernode gone the tier is loaded again and may promote another
        // desktop; the others re-attached.
        if d.is_supernode() {
            println!("{} promoted after the kill", d.name);
        } else {
            assert!(!homes.is_empty(), "{} re-attached", d.name);
        }
    }

    // Presence recovers: erin leaves gracefully, then comes back; the watcher, whose
    // home died, hears both.
    let t = Instant::now();
    erin.stop();
    let at = events
        .presence(&erin.user(), false, PRESENCE_BOUND)
        .unwrap_or_else(|| panic!("erin offline at the watcher\n{}", desktops[w].stderr()));
    println!(
        "presence after the kill: offline {:.1} s after erin's exit ({:.1} s after the kill)",
        (at - t).as_secs_f64(),
        (at - killed).as_secs_f64()
    );
    let t = Instant::now();
    erin.start(&erin_spec);
    let at = events
        .presence(&erin.user(), true, PRESENCE_BOUND)
        .unwrap_or_else(|| panic!("erin online again at the watcher\n{}", desktops[w].stderr()));
    println!(
        "presence after the kill: online again {:.1} s after erin restarted",
        (at - t).as_secs_f64()
    );
    let contacts = desktops[w].d().get("/v1/contacts").json();
    assert_eq!(contacts["contacts"][0]["user_id"], erin.user());
    assert_eq!(contacts["contacts"][0]["online"], true);
    drop(events);

    for n in seeds
        .iter_mut()
        .chain(desktops.iter_mut())
        .chain([&mut erin])
    {
        if n.daemon.is_some() {
            n.stop();
        }
    }
}

#[test]
fn bad_requests_are_refused_and_a_restart_reattaches_from_the_host_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut seeds: Vec<Node> = ["s0", "s1"]
        .iter()
        .enumerate()
        .map(|(i, name)| Node::new(root, name, ip(2, 1 + i as u8)))
        .collect();
    start_seeds(&mut seeds, 50);
    let mut seed_keys: Vec<String> = seeds.iter().map(Node::key).collect();
    seed_keys.sort();
    let spec = |handle, seeds: Vec<String>| Spec {
        role: "ordinary",
        handle: Some(handle),
        seeds,
        capacity: 50,
    };
    let mut frank = Node::new(root, "frank", ip(2, 10));
    let mut grace = Node::new(root, "grace", ip(2, 11));
    frank.start(&spec("frank", vec![seeds[0].seed_spec()]));
    grace.start(&spec("grace", vec![seeds[1].seed_spec()]));
    for n in [&frank, &grace] {
        wait_on(n, ATTACH_WAIT, "attached to both seeds", || {
            n.homes() == seed_keys
        });
    }
    wait(PUBLISH_WAIT, "grace's record found", || {
        frank.lookup("grace").0.status == 200
    });

    // Bad input through the API.
    let unknown = Identity::generate(&mut OsRng).user_id().to_string();
    let (r, _) = frank.lookup(&unknown);
    assert_eq!(r.status, 404, "{}", r.body);
    let e = r.json();
    assert!(
        e["error"].as_str().is_some_and(|m| m.contains("not found")),
        "{e}"
    );
    let (r, _) = frank.lookup("nobody-here");
    assert_eq!(r.status, 404, "an unclaimed handle: {}", r.body);
    let (r, _) = frank.lookup("not%20a%20handle!");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("neither a user id"), "{}", r.body);
    let r = frank.d().get("/v1/lookup");
    assert_eq!(r.status, 400, "no query: {}", r.body);
    let admin = frank.d().admin();
    let body = format!("{{\"contact\": \"{}\"}}", grace.user());
    let wrong = format!("Bearer {}", "0".repeat(64));
    for auth in [None, Some(wrong.as_str())] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
        let r = http(admin, "POST", "/v1/contacts", &headers, &body).unwrap();
        assert_eq!(r.status, 401, "add a contact with {auth:?}: {}", r.body);
        assert!(r.header("www-authenticate").is_some());
        let r = http(admin, "GET", "/v1/events", &headers, "").unwrap();
        assert_eq!(r.status, 401, "events with {auth:?}: {}", r.body);
        let path = format!("/v1/contacts/{}", grace.user());
        let r = http(admin, "DELETE", &path, &headers, "").unwrap();
        assert_eq!(r.status, 401, "remove a contact with {auth:?}: {}", r.body);
    }
    assert_eq!(
        frank.d().get("/v1/contacts").json()["contacts"],
        Value::Array(vec![])
    );
    let r = frank
        .d()
        .post_authorized("/v1/contacts", "{\"contact\": \"nobody-here\"}");
    assert_eq!(r.status, 404, "an unknown handle is not pinned: {}", r.body);
    let r = frank.d().post_authorized("/v1/contacts", "{\"who\": 1}");
    assert_eq!(r.status, 400, "{}", r.body);
    // And through the CLI: a failure that says why.
    let dir = frank.dir.display().to_string();
    let (ok, _, err) = cli(&["lookup", &unknown, "--data-dir", &dir]);
    assert!(!ok && err.contains("not found"), "{err}");

    // A contact added by handle is pinned to the user id the directory holds.
    let r = frank
        .d()
        .post_authorized("/v1/contacts", "{\"contact\": \"grace\"}");
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["contact"]["user_id"], grace.user());
    wait(PRESENCE_BOUND, "grace online in frank's book", || {
        frank.d().get("/v1/contacts").json()["contacts"][0]["online"] == true
    });
    wait(ATTACH_WAIT, "frank's host cache holds both seeds", || {
        frank.status()["host_cache"].as_u64() >= Some(2)
    });

    // Restart without seeds: the host cache and the contacts come from the disk.
    frank.stop();
    let hosts = fs::read_to_string(frank.dir.join("hosts.json")).expect("hosts.json");
    let contacts = fs::read_to_string(frank.dir.join("contacts.json")).expect("contacts.json");
    for k in &seed_keys {
        assert!(hosts.contains(k), "{k} in hosts.json:\n{hosts}");
    }
    assert!(contacts.contains(&grace.user()), "{contacts}");
    let restarted = Instant::now();
    frank.start(&spec("frank", Vec::new()));
    wait(ATTACH_WAIT, "frank re-attached from its host cache", || {
        !frank.homes().is_empty()
    });
    println!(
        "restart: re-attached from the host cache {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    let homes = frank.homes();
    assert!(homes.iter().all(|h| seed_keys.contains(h)), "{homes:?}");
    let c = frank.d().get("/v1/contacts").json();
    assert_eq!(c["contacts"][0]["user_id"], grace.user(), "{c}");
    assert_eq!(c["contacts"][0]["handle"], "grace", "{c}");
    wait(PRESENCE_BOUND, "grace online again in frank's book", || {
        frank.d().get("/v1/contacts").json()["contacts"][0]["online"] == true
    });
    let (r, _) = frank.lookup("grace");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_record_of(&r.json(), &grace, Some("grace"), "after restart");

    frank.stop();
    grace.stop();
    for s in seeds.iter_mut() {
        s.stop();
    }
}
