//! `peercall bench relay`: a load tool for one supernode relay process.
//!
//! It starts a real `peercall node` (role supernode, relaying to loopback allowed)
//! and, in this process, `2 × calls` clients: each holds a real Noise session with
//! the relay (the crypto layer's [`Endpoint`], XX handshake), asks it for a channel
//! to its call partner ([`RelayMsg::Allocate`]; both partners ask, so the relay's
//! mutual permission opens), then sends voice-paced packets: 50 a second, each a
//! `Frame::Relay` carrying a 160-byte payload (call, direction, sequence number,
//! send time) encrypted on the hop session. The relay decrypts the hop, looks up the
//! channel, re-encrypts for the partner and sends it on.
//!
//! The clients share a few sockets ([`DEFAULT_SOCKETS`]): received packets find
//! their client by the Noise receiver index, exactly as in the engine. Receiving is
//! batched (`recvmmsg` through quinn-udp, on a small tokio runtime) and stamped by
//! the kernel (`SO_TIMESTAMPNS`), so the bench's own scheduling delays do not count
//! as relay latency; sending runs on a few threads that sleep until each packet is
//! due, packets of all streams spread evenly over the 20 ms interval.
//!
//! Figures, over a measured window that starts after every channel is up and a
//! warm-up second:
//! - `relay_cpu_us_per_packet`: the relay process's CPU time (`utime + stime` from
//!   `/proc/PID/stat`) over the window, divided by the packets it delivered in it;
//! - `packets` delivered through the relay in the window, `loss` among the packets
//!   sent in it;
//! - `added_latency_us_p50/p99`: one-way latency (send time to the kernel's receive
//!   stamp, one host clock) through the relay, minus the same percentile through a
//!   plain forwarder (no crypto, one table lookup, a blocking loop in this process)
//!   measured first with the same streams: what the relay adds over the two
//!   loopback hops any forwarder has.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket as StdSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use peercall_crypto::endpoint::{Endpoint, EndpointConfig, Received};
use peercall_crypto::{Identity, PeerKey};
use peercall_engine::msg::RelayMsg;
use peercall_wire::frame::Relay;
use peercall_wire::{Frame, MAX_DATAGRAM, Packet};
use rand::rngs::OsRng;
use rand_core::RngCore;
use serde::Serialize;

use crate::clock::Clock;
use crate::store::UDP_ADDR_FILE;
use crate::udp::BatchSocket;

/// Voice pacing: one packet per 20 ms Opus frame, each way.
const PACKET_INTERVAL: Duration = Duration::from_millis(20);
/// Bytes of each packet's payload (a 64 kbit/s voice frame with headroom).
const PAYLOAD: usize = 160;
/// Sockets the clients share by default: enough that the relay rarely sees two
/// consecutive packets for one address (so its GSO runs stay what real clients on
/// separate hosts would give), few enough that the bench's batched receive stays
/// cheap.
pub const DEFAULT_SOCKETS: usize = 64;
/// Sending threads by default: each paces its share of the streams.
pub const DEFAULT_SENDERS: usize = 2;
/// Most calls: two sessions each, within the relay's session table (16,384) and
/// the channel limit the bench configures.
const MAX_CALLS: u32 = 5_000;
/// Longest measured window: hop sessions rekey after 120 s and the bench's clients
/// do not rekey, so a run ends well before.
const MAX_DURATION_SECS: u64 = 90;
/// Handshakes started per second: below the relay's 1,000/s threshold at which it
/// starts demanding cookies (and then limits each source address to 20/s).
const HANDSHAKE_RATE: u32 = 400;
/// A client whose session or channel is not up after this long is asked again.
const SETUP_RETRY: Duration = Duration::from_secs(2);
/// Set-up of all clients fails after this long.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// The relay process must be ready (its address files written) within this.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Sending starts this long before the measured window: queues and caches warm up.
const WARMUP: Duration = Duration::from_secs(1);
/// Packets sent in the window may arrive this long after it and still count.
const GRACE: Duration = Duration::from_millis(500);
/// Longest baseline window (the forwarder's latency settles within a few seconds).
const MAX_BASELINE: Duration = Duration::from_secs(3);
/// Socket buffers of the bench's sockets: a few hundred milliseconds of traffic, so
/// a scheduling hiccup of the bench does not drop packets.
const SOCKET_BUFFER: usize = 4 << 20;
/// Marks payloads: the first bytes of every voice payload.
const MAGIC: [u8; 4] = *b"PCBR";

/// Arguments of `peercall bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Debug, Clone, clap::Subcommand)]
enum BenchWhat {
    /// Two-way voice streams through one supernode relay process on loopback:
    /// relay CPU per packet, loss, added latency.
    Relay(RelayArgs),
}

/// Arguments of `peercall bench relay`.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    /// Concurrent relayed calls (two streams each, 50 packets/s each way).
    #[arg(long, default_value_t = 100)]
    calls: u32,
    /// Seconds measured (after set-up and a warm-up second).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Sockets the clients share.
    #[arg(long, default_value_t = DEFAULT_SOCKETS)]
    sockets: usize,
    /// Threads pacing the sends.
    #[arg(long, default_value_t = DEFAULT_SENDERS)]
    senders: usize,
}

/// What `peercall bench relay --json` prints.
#[derive(Debug, Serialize)]
struct Report {
    calls: u32,
    duration_s: f64,
    packets: u64,
    loss: f64,
    relay_cpu_us_per_packet: f64,
    /// Share of one core the relay used in the window.
    relay_cpu_cores: f64,
    /// Calls one core of this relay carries at this cost (`calls / relay_cpu_cores`).
    calls_per_core: f64,
    added_latency_us_p50: f64,
    added_latency_us_p99: f64,
    relay_latency_us_p50: f64,
    relay_latency_us_p99: f64,
    baseline_latency_us_p50: f64,
    baseline_latency_us_p99: f64,
    baseline_loss: f64,
    sockets: usize,
    /// Load average over the last minute when the run ended: the figures are only
    /// as good as the machine was idle.
    loadavg_1m: f64,
}

/// Runs `peercall bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchWhat::Relay(a) => relay(a),
    }
}

fn relay(args: RelayArgs) -> anyhow::Result<()> {
    if args.calls == 0 || args.calls > MAX_CALLS {
        bail!("--calls must be from 1 to {MAX_CALLS}");
    }
    if args.duration == 0 || args.duration > MAX_DURATION_SECS {
        bail!(
            "--duration must be from 1 to {MAX_DURATION_SECS} seconds (the bench does not rekey)"
        );
    }
    if args.sockets == 0 || args.senders == 0 {
        bail!("--sockets and --senders must be at least 1");
    }
    let dir = tempfile::Builder::new()
        .prefix("peercall-bench-")
        .tempdir()
        .context("could not create a temporary directory")?;
    let relay = RelayProcess::start(dir.path(), args.calls)?;
    if !args.json {
        eprintln!(
            "relay process {} on {}; setting up {} calls",
            relay.pid, relay.addr, args.calls
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    let report = runtime.block_on(measure(&args, &relay))?;
    drop(relay);
    if args.json {
        println!("{}", serde_json::to_string(&report).context("report")?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &Report) {
    println!("relayed calls          {}", r.calls);
    println!("measured               {:.1} s", r.duration_s);
    println!("packets relayed        {}", r.packets);
    println!("loss                   {:.4} %", r.loss * 100.0);
    println!(
        "relay CPU              {:.2} µs/packet ({:.1} % of a core)",
        r.relay_cpu_us_per_packet,
        r.relay_cpu_cores * 100.0
    );
    println!("calls per relay core   {:.0}", r.calls_per_core);
    println!(
        "added latency          p50 {:.0} µs, p99 {:.0} µs",
        r.added_latency_us_p50, r.added_latency_us_p99
    );
    println!(
        "  through the relay    p50 {:.0} µs, p99 {:.0} µs",
        r.relay_latency_us_p50, r.relay_latency_us_p99
    );
    println!(
        "  plain forwarder      p50 {:.0} µs, p99 {:.0} µs",
        r.baseline_latency_us_p50, r.baseline_latency_us_p99
    );
    println!("load average (1 min)   {:.2}", r.loadavg_1m);
}

// ---- the relay process ---------------------------------------------------------

/// A `peercall node` relay started for the bench; killed when dropped.
struct RelayProcess {
    child: Child,
    pid: u32,
    addr: SocketAddr,
}

impl RelayProcess {
    fn start(dir: &Path, calls: u32) -> anyhow::Result<RelayProcess> {
        let data = dir.join("relay");
        let config = dir.join("relay.toml");
        // Two channels per call, and room for the channels of calls set up again.
        let channels = (4 * calls).max(4_096);
        let toml = format!(
            "data_dir = {data:?}\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             role = \"supernode\"\nlocal_addrs = []\nlog_level = \"warn\"\n\
             [relay]\nallow_private_targets = true\nmax_channels = {channels}\n",
            data = data.display().to_string(),
        );
        std::fs::write(&config, toml).context("could not write the relay's config")?;
        let log = std::fs::File::create(dir.join("relay.log")).context("relay log")?;
        let exe = std::env::current_exe().context("cannot find the peercall executable")?;
        let mut cmd = Command::new(exe);
        for (name, _) in std::env::vars_os() {
            if name
                .to_string_lossy()
                .starts_with(crate::config::ENV_PREFIX)
            {
                cmd.env_remove(name);
            }
        }
        let child = cmd
            .arg("node")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("could not start the relay process")?;
        let pid = child.id();
        let mut relay = RelayProcess {
            child,
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        relay.addr = relay.wait_ready(&data, &dir.join("relay.log"))?;
        Ok(relay)
    }

    fn wait_ready(&mut self, data: &Path, log: &Path) -> anyhow::Result<SocketAddr> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let file: PathBuf = data.join(UDP_ADDR_FILE);
        loop {
            if let Ok(text) = std::fs::read_to_string(&file)
                && let Ok(addr) = text.trim().parse()
                && data.join(crate::store::ADMIN_ADDR_FILE).exists()
            {
                return Ok(addr);
            }
            if let Some(status) = self.child.try_wait().context("relay process")? {
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                bail!(
                    "the relay process exited at start ({status}): {}",
                    tail.trim()
                );
            }
            if Instant::now() > deadline {
                bail!("the relay process was not ready within {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process's CPU time so far (user + system, all threads).
    fn cpu_time(&self, tick: Duration) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .context("cannot read the relay's /proc/PID/stat")?;
        // Fields after the command name (which may hold spaces) in parentheses.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| anyhow!("unexpected /proc/PID/stat format"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line; `rest` starts at
        // field 3.
        let ticks = |i: usize| -> anyhow::Result<u32> {
            fields
                .get(i)
                .and_then(|f| f.parse::<u32>().ok())
                .ok_or_else(|| anyhow!("unexpected /proc/PID/stat format"))
        };
        Ok(tick * (ticks(11)? + ticks(12)?))
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        // The relay holds no state worth a graceful goodbye.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel's clock tick (`getconf CLK_TCK`), in which /proc reports CPU time;
/// 100 Hz, the value on every common Linux build, if getconf is missing.
fn clock_tick() -> Duration {
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|hz| *hz > 0)
        .unwrap_or(100);
    Duration::from_secs(1) / hz
}

// ---- clients -------------------------------------------------------------------

/// One side of a call: a Noise session with the relay and a channel there.
struct Client {
    endpoint: Endpoint,
    /// The call partner's static key (the permission asked for).
    partner: PeerKey,
    /// Global id of the partner (the plain forwarder's channel).
    partner_id: usize,
    relay: Option<PeerKey>,
    channel: Option<u32>,
    ready: bool,
    /// When set-up last asked (handshake or allocation).
    asked: Option<Instant>,
    seq: u32,
    call: u32,
    side: u8,
}

/// The clients on one socket.
struct Group {
    socket: Arc<StdSocket>,
    clients: Vec<Client>,
    /// Our Noise receiver indices → slot in `clients`.
    by_index: HashMap<u32, usize>,
    /// One-way latencies (ns) of packets sent in the current phase's window.
    samples: Vec<u32>,
    /// Scratch.
    frame: Box<[u8; MAX_DATAGRAM]>,
    out: Box<[u8; MAX_DATAGRAM]>,
}

/// A measurement phase (the baseline forwarder or the relay).
#[derive(Debug, Default)]
struct Phase {
    /// Window start and end, ns since the Unix epoch.
    t0: AtomicU64,
    t1: AtomicU64,
    /// Packets sent in the window, and those of them received.
    sent: AtomicU64,
    received: AtomicU64,
    /// Packets received (stamped by the kernel) within the window.
    delivered: AtomicU64,
}

impl Phase {
    fn set_window(&self, t0: u64, t1: u64) {
        self.sent.store(0, Ordering::Relaxed);
        self.received.store(0, Ordering::Relaxed);
        self.delivered.store(0, Ordering::Relaxed);
        self.t0.store(t0, Ordering::Relaxed);
        self.t1.store(t1, Ordering::Relaxed);
    }

    fn in_window(&self, t: u64) -> bool {
        t >= self.t0.load(Ordering::Relaxed) && t < self.t1.load(Ordering::Relaxed)
    }
}

struct Shared {
    groups: Vec<Arc<Mutex<Group>>>,
    relay_addr: SocketAddr,
    forwarder: SocketAddr,
    clock: Clock,
    phase: Phase,
    stop: AtomicBool,
    errors: Mutex<Vec<String>>,
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn lock(g: &Mutex<Group>) -> std::sync::MutexGuard<'_, Group> {
    // A panicking thread ends the bench anyway; its data is still usable.
    g.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Client `id` lives in group `id % groups`, slot `id / groups`.
fn place(id: usize, groups: usize) -> (usize, usize) {
    (id % groups, id / groups)
}

async fn measure(args: &RelayArgs, relay: &RelayProcess) -> anyhow::Result<Report> {
    let n_clients = 2 * args.calls as usize;
    let n_groups = args.sockets.min(n_clients);
    let identities: Vec<Identity> = (0..n_clients)
        .map(|_| Identity::generate(&mut OsRng))
        .collect();
    let mut groups = Vec::with_capacity(n_groups);
    let mut receivers = Vec::with_capacity(n_groups);
    for g in 0..n_groups {
        let std = StdSocket::bind("127.0.0.1:0").context("bind a client socket")?;
        // Shared by both handles: a send that finds the buffer full loses the packet
        // (counted as loss), as a network would.
        std.set_nonblocking(true).context("socket")?;
        let tokio_side = tokio::net::UdpSocket::from_std(std.try_clone().context("socket")?)
            .context("socket")?;
        let batch = BatchSocket::new(tokio_side).context("socket")?;
        batch.set_buffers(SOCKET_BUFFER);
        let mut clients = Vec::new();
        let mut id = g;
        while id < n_clients {
            let partner_id = id ^ 1;
            let mut seed = [0u8; 32];
            OsRng.fill_bytes(&mut seed);
            clients.push(Client {
                endpoint: Endpoint::new(&identities[id], EndpointConfig::default(), seed)
                    .context("endpoint")?,
                partner: identities[partner_id].peer_key(),
                partner_id,
                relay: None,
                channel: None,
                ready: false,
                asked: None,
                seq: 0,
                call: (id / 2) as u32,
                side: (id % 2) as u8,
            });
            id += n_groups;
        }
        groups.push(Arc::new(Mutex::new(Group {
            socket: Arc::new(std),
            clients,
            by_index: HashMap::new(),
            samples: Vec::new(),
            frame: Box::new([0; MAX_DATAGRAM]),
            out: Box::new([0; MAX_DATAGRAM]),
        })));
        receivers.push(batch);
    }
    let forwarder = Forwarder::start(&groups)?;
    let shared = Arc::new(Shared {
        groups,
        relay_addr: relay.addr,
        forwarder: forwarder.addr,
        clock: Clock::start(),
        phase: Phase::default(),
        stop: AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
    });
    let mut tasks = Vec::new();
    for (g, socket) in receivers.into_iter().enumerate() {
        tasks.push(tokio::spawn(receive(shared.clone(), g, socket)));
    }

    let result = phases(args, relay, &shared).await;
    shared.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    forwarder.stop();
    result
}

async fn phases(
    args: &RelayArgs,
    relay: &RelayProcess,
    shared: &Arc<Shared>,
) -> anyhow::Result<Report> {
    let duration = Duration::from_secs(args.duration);
    // Baseline first: the same streams through the plain forwarder.
    let base_window = duration.min(MAX_BASELINE);
    let base = run_phase(shared, args.senders, Mode::Plain, base_window, |_| Ok(())).await?;
    let base_lat = percentiles(shared);

    setup(shared).await?;
    let tick = clock_tick();
    let mut cpu = (Duration::ZERO, Duration::ZERO);
    let relayed = run_phase(shared, args.senders, Mode::Relay, duration, |at_start| {
        let t = relay.cpu_time(tick)?;
        if at_start {
            cpu.0 = t;
        } else {
            cpu.1 = t;
        }
        Ok(())
    })
    .await?;
    let relay_lat = percentiles(shared);
    if let Some(e) = lock_errors(shared).first() {
        bail!("{e}");
    }
    let cpu_used = cpu.1.saturating_sub(cpu.0);
    let packets = relayed.delivered;
    let loadavg_1m = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|f| f.parse().ok()))
        .unwrap_or(f64::NAN);
    Ok(Report {
        calls: args.calls,
        duration_s: duration.as_secs_f64(),
        packets,
        loss: relayed.loss(),
        relay_cpu_us_per_packet: if packets == 0 {
            f64::NAN
        } else {
            cpu_used.as_secs_f64() * 1e6 / packets as f64
        },
        relay_cpu_cores: cpu_used.as_secs_f64() / duration.as_secs_f64(),
        calls_per_core: f64::from(args.calls) * duration.as_secs_f64() / cpu_used.as_secs_f64(),
        added_latency_us_p50: relay_lat.0 - base_lat.0,
        added_latency_us_p99: relay_lat.1 - base_lat.1,
        relay_latency_us_p50: relay_lat.0,
        relay_latency_us_p99: relay_lat.1,
        baseline_latency_us_p50: base_lat.0,
        baseline_latency_us_p99: base_lat.1,
        baseline_loss: base.loss(),
        sockets: shared.groups.len(),
        loadavg_1m,
    })
}

fn lock_errors(shared: &Shared) -> Vec<String> {
    shared
        .errors
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// The p50 and p99 of the samples gathered (µs), which are then cleared.
fn percentiles(shared: &Shared) -> (f64, f64) {
    let mut all: Vec<u32> = Vec::new();
    for g in &shared.groups {
        all.append(&mut lock(g).samples);
    }
    if all.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    all.sort_unstable();
    let at = |q: f64| {
        let i = ((all.len() - 1) as f64 * q).round() as usize;
        f64::from(all[i]) / 1_000.0
    };
    (at(0.50), at(0.99))
}

/// Counters of a finished phase.
struct Counts {
    sent: u64,
    received: u64,
    delivered: u64,
}

impl Counts {
    fn loss(&self) -> f64 {
        if self.sent == 0 {
            return f64::NAN;
        }
        1.0 - (self.received.min(self.sent) as f64 / self.sent as f64)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Plain datagrams through the forwarder.
    Plain,
    /// Hop-encrypted relay frames through the relay.
    Relay,
}

/// Sends the streams for warm-up + `window` (+ grace for the last packets to
/// arrive); `mark(true)` runs at the window's start and `mark(false)` at its end.
async fn run_phase(
    shared: &Arc<Shared>,
    senders: usize,
    mode: Mode,
    window: Duration,
    mut mark: impl FnMut(bool) -> anyhow::Result<()>,
) -> anyhow::Result<Counts> {
    let start = Instant::now();
    let now_ns = unix_ns();
    let t0 = now_ns + WARMUP.as_nanos() as u64;
    let t1 = t0 + window.as_nanos() as u64;
    shared.phase.set_window(t0, t1);
    let stop_at = start + WARMUP + window;
    let threads: Vec<_> = (0..senders)
        .map(|t| {
            let shared = shared.clone();
            std::thread::spawn(move || send_loop(&shared, mode, t, senders, start, stop_at))
        })
        .collect();
    tokio::time::sleep_until((start + WARMUP).into()).await;
    mark(true)?;
    tokio::time::sleep_until(stop_at.into()).await;
    mark(false)?;
    for t in threads {
        t.join().map_err(|_| anyhow!("a sending thread panicked"))?;
    }
    tokio::time::sleep(GRACE).await;
    let p = &shared.phase;
    Ok(Counts {
        sent: p.sent.load(Ordering::Relaxed),
        received: p.received.load(Ordering::Relaxed),
        delivered: p.delivered.load(Ordering::Relaxed),
    })
}

/// Paces the streams of thread `t` of `of`: stream `i` sends at
/// `start + k × 20 ms + i × 20 ms / streams`, so all streams together are evenly
/// spread.
fn send_loop(shared: &Shared, mode: Mode, t: usize, of: usize, start: Instant, stop_at: Instant) {
    let n_groups = shared.groups.len();
    let streams: usize = shared.groups.iter().map(|g| lock(g).clients.len()).sum();
    let mine: Vec<usize> = (t..streams).step_by(of).collect();
    let offset = |i: usize| PACKET_INTERVAL.mul_f64(i as f64 / streams as f64);
    let mut round = 0u32;
    loop {
        let base = start + PACKET_INTERVAL * round;
        if base >= stop_at {
            return;
        }
        for &id in &mine {
            let due = base + offset(id);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let (g, slot) = place(id, n_groups);
            send_one(shared, mode, g, slot);
        }
        round += 1;
    }
}

fn send_one(shared: &Shared, mode: Mode, g: usize, slot: usize) {
    let mut guard = lock(&shared.groups[g]);
    let group = &mut *guard;
    let Some(c) = group.clients.get_mut(slot) else {
        return;
    };
    let mut payload = [0u8; PAYLOAD];
    let sent_ns = unix_ns();
    payload[..4].copy_from_slice(&MAGIC);
    payload[4..8].copy_from_slice(&c.call.to_be_bytes());
    payload[8] = c.side;
    payload[9..13].copy_from_slice(&c.seq.to_be_bytes());
    payload[13..21].copy_from_slice(&sent_ns.to_be_bytes());
    c.seq = c.seq.wrapping_add(1);
    let (dest, len) = match mode {
        Mode::Plain => {
            let id = c.partner_id as u32;
            group.out[..4].copy_from_slice(&id.to_be_bytes());
            group.out[4..4 + PAYLOAD].copy_from_slice(&payload);
            (shared.forwarder, 4 + PAYLOAD)
        }
        Mode::Relay => {
            let (Some(relay), Some(channel), true) = (c.relay, c.channel, c.ready) else {
                return;
            };
            let frame = Frame::Relay(Relay {
                channel,
                packet: &payload,
            });
            let Ok(n) = frame.encode(&mut group.frame[..]) else {
                return;
            };
            let now = shared.clock.now();
            match c
                .endpoint
                .encrypt(now, &relay, &group.frame[..n], &mut group.out[..])
            {
                Ok(len) => (shared.relay_addr, len),
                Err(_) => return,
            }
        }
    };
    if shared.phase.in_window(sent_ns) {
        shared.phase.sent.fetch_add(1, Ordering::Relaxed);
    }
    // A full socket buffer loses the packet, as the network would.
    let _ = group.socket.send_to(&group.out[..len], dest);
}

/// Handshakes, then channel requests, paced and retried, until every client's
/// channel is ready.
async fn setup(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let started = Instant::now();
    let pace = Duration::from_secs(1) / HANDSHAKE_RATE;
    loop {
        let mut waiting = 0usize;
        for g in &shared.groups {
            let n = lock(g).clients.len();
            for slot in 0..n {
                let asked = {
                    let mut guard = lock(g);
                    let group = &mut *guard;
                    let c = &mut group.clients[slot];
                    if c.ready {
                        continue;
                    }
                    waiting += 1;
                    if c.asked.is_some_and(|t| t.elapsed() < SETUP_RETRY) {
                        continue;
                    }
                    c.asked = Some(Instant::now());
                    let now = shared.clock.now();
                    match c.relay {
                        None => {
                            let len = c
                                .endpoint
                                .initiate(now, shared.relay_addr, None, &mut group.out[..])
                                .map_err(|e| anyhow!("cannot start a handshake: {e}"))?;
                            if let Ok(Packet::Initiation(init)) = Packet::parse(&group.out[..len]) {
                                group.by_index.insert(init.sender, slot);
                            }
                            let _ = group.socket.send_to(&group.out[..len], shared.relay_addr);
                            true
                        }
                        Some(relay) => {
                            let msg = RelayMsg::Allocate {
                                peer: c.partner.0,
                                via: None,
                            };
                            send_control(shared, group, slot, relay, &msg);
                            false
                        }
                    }
                };
                if asked {
                    tokio::time::sleep(pace).await;
                }
            }
        }
        if let Some(e) = lock_errors(shared).first() {
            bail!("set-up failed: {e}");
        }
        if waiting == 0 {
            return Ok(());
        }
        if started.elapsed() > SETUP_TIMEOUT {
            bail!(
                "{waiting} of {} clients had no relay channel after {SETUP_TIMEOUT:?}",
                shared
                    .groups
                    .iter()
                    .map(|g| lock(g).clients.len())
                    .sum::<usize>()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a relay control message from client `slot` of `group` on its hop session.
fn send_control(shared: &Shared, group: &mut Group, slot: usize, relay: PeerKey, msg: &RelayMsg) {
    let Ok(body) = msg.encode() else {
        return;
    };
    let Ok(n) = Frame::RelayControl(&body).encode(&mut group.frame[..]) else {
        return;
    };
    let now = shared.clock.now();
    let c = &mut group.clients[slot];
    if let Ok(len) = c
        .endpoint
        .encrypt(now, &relay, &group.frame[..n], &mut group.out[..])
    {
        let _ = group.socket.send_to(&group.out[..len], shared.relay_addr);
    }
}

/// Receives for one socket's clients until the bench stops.
async fn receive(shared: Arc<Shared>, g: usize, mut socket: BatchSocket) {
    let mut plain = vec![0u8; MAX_DATAGRAM];
    while !shared.stop.load(Ordering::Relaxed) {
        let Ok(filled) = socket.recv_batch().await else {
            continue;
        };
        let mut guard = lock(&shared.groups[g]);
        let group = &mut *guard;
        socket.for_each_stamped(filled, |from, stamp, datagram| {
            let rx_ns = stamp.map_or_else(unix_ns, |d| d.as_nanos() as u64);
            if from == shared.forwarder {
                if let Some(p) = datagram.get(4..) {
                    record(&shared, group, p, rx_ns);
                }
                return;
            }
            on_relay_datagram(&shared, group, from, datagram, rx_ns, &mut plain);
        });
    }
}

fn on_relay_datagram(
    shared: &Shared,
    group: &mut Group,
    from: SocketAddr,
    datagram: &[u8],
    rx_ns: u64,
    plain: &mut [u8],
) {
    let receiver = match Packet::parse(datagram) {
        Ok(Packet::Transport(t)) => t.receiver,
        Ok(Packet::Response(r)) => r.receiver,
        Ok(Packet::CookieReply(r)) => r.receiver,
        _ => return,
    };
    let Some(&slot) = group.by_index.get(&receiver) else {
        return;
    };
    let now = shared.clock.now();
    let got = group.clients[slot]
        .endpoint
        .handle(now, from, datagram, plain);
    match got {
        Ok(Received::Reply { len }) => {
            let _ = group.socket.send_to(&plain[..len], from);
        }
        Ok(Received::Established { peer, reply, .. }) => {
            if reply > 0 {
                let _ = group.socket.send_to(&plain[..reply], from);
            }
            group.clients[slot].relay = Some(peer);
            // Confirms the keys to the relay (the responder sends only after it),
            // then asks for the channel.
            send_frame(shared, group, slot, peer, &Frame::Keepalive);
            let msg = RelayMsg::Allocate {
                peer: group.clients[slot].partner.0,
                via: None,
            };
            group.clients[slot].asked = Some(Instant::now());
            send_control(shared, group, slot, peer, &msg);
        }
        Ok(Received::Data { len, .. }) => match Frame::parse(&plain[..len]) {
            Ok(Frame::Relay(r)) => record(shared, group, r.packet, rx_ns),
            Ok(Frame::RelayControl(body)) => match RelayMsg::decode(body) {
                Ok(RelayMsg::Allocated { channel, ready, .. }) => {
                    let c = &mut group.clients[slot];
                    c.channel = Some(channel);
                    c.ready |= ready;
                }
                Ok(RelayMsg::Ready { channel }) => {
                    let c = &mut group.clients[slot];
                    if c.channel == Some(channel) {
                        c.ready = true;
                    }
                }
                Ok(RelayMsg::Refused { reason, .. }) => {
                    shared
                        .errors
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(format!("the relay refused a channel: {reason:?}"));
                }
                Ok(RelayMsg::Closed { .. }) => {
                    let c = &mut group.clients[slot];
                    c.ready = false;
                    c.channel = None;
                }
                _ => {}
            },
            _ => {}
        },
        Err(_) => {}
    }
}

fn send_frame(shared: &Shared, group: &mut Group, slot: usize, relay: PeerKey, frame: &Frame<'_>) {
    let Ok(n) = frame.encode(&mut group.frame[..]) else {
        return;
    };
    let now = shared.clock.now();
    if let Ok(len) =
        group.clients[slot]
            .endpoint
            .encrypt(now, &relay, &group.frame[..n], &mut group.out[..])
    {
        let _ = group.socket.send_to(&group.out[..len], shared.relay_addr);
    }
}

/// Counts a voice payload that arrived at `rx_ns` and keeps its latency.
fn record(shared: &Shared, group: &mut Group, payload: &[u8], rx_ns: u64) {
    if payload.len() != PAYLOAD || payload[..4] != MAGIC {
        return;
    }
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&payload[13..21]);
    let sent_ns = u64::from_be_bytes(ts);
    let p = &shared.phase;
    if p.in_window(rx_ns) {
        p.delivered.fetch_add(1, Ordering::Relaxed);
    }
    if p.in_window(sent_ns) {
        p.received.fetch_add(1, Ordering::Relaxed);
        let ns = rx_ns.saturating_sub(sent_ns).min(u64::from(u32::MAX));
        group.samples.push(ns as u32);
    }
}

// ---- the baseline forwarder ----------------------------------------------------

/// A plain UDP forwarder: `[destination id: u32][payload]` goes to that client's
/// socket unchanged. No crypto, one table lookup: the floor any relay has.
struct Forwarder {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Forwarder {
    fn start(groups: &[Arc<Mutex<Group>>]) -> anyhow::Result<Forwarder> {
        let socket = StdSocket::bind("127.0.0.1:0").context("bind the forwarder")?;
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .context("forwarder socket")?;
        let addr = socket.local_addr().context("forwarder socket")?;
        let mut table = Vec::new();
        let n = groups.len();
        let total: usize = groups.iter().map(|g| lock(g).clients.len()).sum();
        for id in 0..total {
            let (g, _) = place(id, n);
            table.push(lock(&groups[g]).socket.local_addr().context("socket")?);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; MAX_DATAGRAM];
            while !flag.load(Ordering::Relaxed) {
                let Ok((len, _)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Some(id) = buf
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                else {
                    continue;
                };
                if let Some(to) = table.get(id as usize) {
                    let _ = socket.send_to(&buf[..len], to);
                }
            }
        });
        Ok(Forwarder { addr, stop, thread })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}
