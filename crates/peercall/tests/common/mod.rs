//! Helpers for tests that run the real `peercall` binary: start a node on loopback
//! with ephemeral ports, find its addresses and token in its data directory, talk
//! HTTP/1.1 to its admin API, signal it, and wait for it with bounded timeouts.
#![allow(dead_code, reason = "each test file uses a subset of the helpers")]

pub mod relay;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long a node may take to become ready (a debug build on a loaded 2-core box).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM or a failed start.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Socket timeouts of the test HTTP client.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for files, exits and counters.
const POLL: Duration = Duration::from_millis(20);

/// The data directory files the node writes.
pub const ADMIN_ADDR: &str = "admin.addr";
pub const UDP_ADDR: &str = "udp.addr";
pub const ADMIN_TOKEN: &str = "admin.token";
pub const IDENTITY: &str = "identity.key";

/// Keepalives every second, so sessions and homes settle fast.
const CALL_NET_KEEPALIVE_SECS: &str = "1";
/// How long the overlay may take to attach desktops and publish their records (a
/// debug build on a loaded 2-core machine).
pub const OVERLAY_WAIT: Duration = Duration::from_secs(60);

/// A node of a loopback call network: fast keepalives, relaying to private
/// addresses allowed (every address is loopback here), plus `env`.
pub fn start_call_node(dir: &Path, env: &[(&str, &str)]) -> Daemon {
    let mut all = vec![
        ("PEERCALL_KEEPALIVE_SECS", CALL_NET_KEEPALIVE_SECS),
        ("PEERCALL_RELAY_ALLOW_PRIVATE_TARGETS", "true"),
    ];
    all.extend_from_slice(env);
    Daemon::start_node(dir, "127.0.0.1:0", &[], &all)
}

/// Two seed supernodes under `root` (`seed1`, `seed2`), and the `PEERCALL_SEEDS`
/// value naming both with their keys.
pub fn start_seeds(root: &Path) -> (Vec<Daemon>, String) {
    let key = |d: &Daemon| d.status()["peer_key"].as_str().expect("key").to_owned();
    let s1 = start_call_node(&root.join("seed1"), &[("PEERCALL_ROLE", "supernode")]);
    let s1_spec = format!("{}@{}", key(&s1), s1.udp());
    let s2 = start_call_node(
        &root.join("seed2"),
        &[("PEERCALL_ROLE", "supernode"), ("PEERCALL_SEEDS", &s1_spec)],
    );
    let seeds = format!("{s1_spec},{}@{}", key(&s2), s2.udp());
    (vec![s1, s2], seeds)
}

/// Waits until each of `nodes` (name, node) is attached and finds every other's
/// handle (its name) in the directory.
pub fn wait_directory(nodes: &[(&str, &Daemon)]) {
    for (who, d) in nodes {
        for (other, _) in nodes.iter().filter(|(o, _)| o != who) {
            let found = eventually(OVERLAY_WAIT, || {
                let homes = d.status()["homes"].as_array().map_or(0, Vec::len);
                homes > 0
                    && d.request("GET", &format!("/v1/lookup?q={other}"), "")
                        .status
                        == 200
            });
            assert!(
                found,
                "{who} attached and finds {other}: {}\n{}",
                d.status(),
                d.stderr()
            );
        }
    }
}

/// A `peercall` command with no `PEERCALL_*` variables inherited from the test's
/// environment (they would change the configuration).
pub fn peercall() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peercall"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PEERCALL_") {
            cmd.env_remove(name);
        }
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    cmd
}

/// Arguments for a node on loopback with ephemeral ports.
pub fn node_args(data_dir: &Path) -> Vec<String> {
    vec![
        "node".into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin".into(),
        "127.0.0.1:0".into(),
    ]
}

/// A running `peercall` process; killed on drop if still running.
pub struct Daemon {
    child: Child,
    /// Its data directory.
    pub data_dir: PathBuf,
    log: PathBuf,
    _logs: tempfile::TempDir,
}

impl Daemon {
    /// Spawns `cmd` (its stderr goes to a log file) without waiting for readiness.
    pub fn spawn(mut cmd: Command, data_dir: &Path) -> Daemon {
        let logs = tempfile::tempdir().expect("log dir");
        let log = logs.path().join("stderr.log");
        let file = File::create(&log).expect("log file");
        cmd.stderr(Stdio::from(file));
        let child = cmd.spawn().expect("spawn peercall");
        Daemon {
            child,
            data_dir: data_dir.to_owned(),
            log,
            _logs: logs,
        }
    }

    /// Starts a node on loopback with ephemeral ports and waits until it is ready.
    pub fn start(data_dir: &Path) -> Daemon {
        Daemon::start_with(data_dir, &[], &[])
    }

    /// Like [`Daemon::start`] with extra arguments and environment variables.
    pub fn start_with(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut cmd = peercall();
        cmd.args(extra)
            .args(node_args(data_dir))
            .envs(env.iter().copied());
        let mut d = Daemon::spawn(cmd, data_dir);
        d.wait_ready();
        d
    }

    /// Starts `peercall node` on `data_dir` listening on UDP `listen` (the admin API on
    /// an ephemeral loopback port), with `flags` after the subcommand (such as
    /// `--config FILE`) and extra environment variables; waits until it is ready.
    pub fn start_node(
        data_dir: &Path,
        listen: &str,
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut cmd = peercall();
        cmd.arg("node")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen, "--admin", "127.0.0.1:0"])
            .args(flags)
            .envs(env.iter().copied());
        let mut d = Daemon::spawn(cmd, data_dir);
        d.wait_ready();
        d
    }

    /// `GET /status` (asserted to answer 200) as JSON.
    pub fn status(&self) -> serde_json::Value {
        let r = self.get("/status");
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }

    /// `method path` with the node's token and `body`.
    pub fn request(&self, method: &str, path: &str, body: &str) -> HttpResponse {
        let auth = format!("Bearer {}", self.token().trim());
        http(
            self.admin(),
            method,
            path,
            &[("Authorization", &auth)],
            body,
        )
        .expect("HTTP")
    }

    /// Waits until `admin.addr` exists (the node writes it last, when ready).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.data_dir.join(ADMIN_ADDR).exists() {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("peercall exited early ({status}):\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "not ready in time:\n{}",
                self.stderr()
            );
            sleep(POLL);
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The admin API address.
    pub fn admin(&self) -> SocketAddr {
        read_addr(&self.data_dir.join(ADMIN_ADDR))
    }

    /// The UDP address.
    pub fn udp(&self) -> SocketAddr {
        read_addr(&self.data_dir.join(UDP_ADDR))
    }

    /// The admin bearer token.
    pub fn token(&self) -> String {
        fs::read_to_string(self.data_dir.join(ADMIN_TOKEN)).expect("admin.token")
    }

    /// `GET path` on the admin API, with the bearer token (every `/v1/` path needs
    /// it; the open ones ignore it). Tests of refusals call [`http`] without it.
    pub fn get(&self, path: &str) -> HttpResponse {
        let auth = format!("Bearer {}", self.token());
        http(self.admin(), "GET", path, &[("Authorization", &auth)], "").expect("GET")
    }

    /// `POST path` with the bearer token.
    pub fn post_authorized(&self, path: &str, body: &str) -> HttpResponse {
        let auth = format!("Bearer {}", self.token());
        http(
            self.admin(),
            "POST",
            path,
            &[("Authorization", &auth)],
            body,
        )
        .expect("POST")
    }

    /// Sends a signal by name (`TERM`, `INT`) with the shell's `kill` builtin.
    pub fn signal(&self, name: &str) {
        signal(self.pid(), name);
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(POLL);
        }
    }

    /// Sends SIGTERM and asserts a clean exit (status 0) within [`EXIT_TIMEOUT`].
    pub fn stop(&mut self) {
        self.signal("TERM");
        let status = self.wait_exit(EXIT_TIMEOUT);
        assert!(
            status.is_some_and(|s| s.success()),
            "clean exit after SIGTERM, got {status:?}:\n{}",
            self.stderr()
        );
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends signal `name` to `pid` through `sh`'s `kill` builtin (present on every
/// system, unlike the procps `kill` binary).
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("sh")
        .args(["-c", "kill -s \"$1\" \"$2\"", "sh", name, &pid.to_string()])
        .status()
        .expect("run sh");
    assert!(status.success(), "kill -s {name} {pid}");
}

/// Runs `cmd` to completion (bounded by [`EXIT_TIMEOUT`]); returns its status and
/// stderr.
pub fn run_to_exit(cmd: Command, data_dir: &Path) -> (ExitStatus, String) {
    let mut d = Daemon::spawn(cmd, data_dir);
    let status = d.wait_exit(EXIT_TIMEOUT);
    let stderr = d.stderr();
    let status = status.unwrap_or_else(|| panic!("did not exit in time:\n{stderr}"));
    (status, stderr)
}

fn read_addr(path: &Path) -> SocketAddr {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.trim()
        .parse()
        .expect("address file holds a socket address")
}

/// Waits until `check` holds, at most `timeout`.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(POLL);
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body as text.
    pub body: String,
}

impl HttpResponse {
    /// The first header named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("JSON: {e}: {}", self.body))
    }
}

/// A minimal HTTP/1.1 client: one request per connection (`Connection: close`),
/// bounded by [`IO_TIMEOUT`]. `headers` may override `Host`.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if method != "GET" {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &str) -> io::Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or_else(|| bad("chunk size"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("chunk size"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after.get(..size).ok_or_else(|| bad("short chunk"))?;
        out.push_str(chunk);
        rest = after.get(size + 2..).ok_or_else(|| bad("chunk end"))?;
    }
}

/// The value of one series in Prometheus text output.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Runs `promtool check metrics` on `text`. `None` if promtool is not installed.
pub fn promtool_check(text: &str) -> Option<(bool, String)> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => panic!("promtool: {e}"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), report))
}
