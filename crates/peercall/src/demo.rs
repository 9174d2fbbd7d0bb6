//! `peercall demo`: a small peercall network on loopback, shown working.
//!
//! It starts real `peercall node` processes (this same binary) with temporary data
//! directories, each on its own loopback address (127.80.0.0/24: the tier validates
//! a candidate only through a supernode on another IP, as on the internet): three
//! pinned seed supernodes that know each other (a tier needs three to dial a
//! candidate back: two are its homes, the third dials) and a few desktop nodes
//! seeded with the first seed, half of them knowing its key (Noise IK), the others
//! only its address (Noise XX, first contact). desk-1 and desk-2 sit behind emulated
//! port-restricted cone NATs with impaired links (the `[emulate]` section: delay,
//! jitter and loss in their own UDP sockets), so their call must punch holes; the
//! other desktops are open, and the tier promotes one of them when the seeds fill
//! up. The demo waits, with deadlines, for the sessions, authenticated keepalives
//! and the promotion, then desk-1 looks desk-2 up and calls it with speech; mid-call
//! the direct path is cut and the call switches to a relay. It narrates what
//! happens and prints a summary (`--json`: one JSON object on stdout, the narrative
//! on stderr). With `--keep-running` the network stays up until Ctrl-C.
//!
//! Cleanup is not optional: the children run in their own process groups (so a
//! Ctrl-C in the terminal reaches only the demo, which then stops them in order),
//! every exit path asks each node to shut down (`POST /v1/shutdown`) and kills what
//! does not exit in time, a drop guard kills and reaps whatever is left if the demo
//! unwinds, and the temporary directory goes with it. SIGINT, SIGTERM and SIGHUP are
//! all caught, so closing the terminal cleans up too.

use std::fmt::Display;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::ValueEnum;
use peercall_crypto::PeerKey;
use rand::rngs::OsRng;
use serde::Serialize;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::admin::StatusBody;
use crate::client;
use crate::logging::LogArgs;
use crate::store::{ADMIN_ADDR_FILE, ADMIN_TOKEN_FILE, UDP_ADDR_FILE};

/// Keepalive interval of the demo's nodes: the shortest allowed, so keepalives show
/// within the demo's few seconds (the node default is 10 s).
const KEEPALIVE_SECS: u64 = 1;
/// Session timeout of the demo's nodes: several missed keepalives.
const SESSION_TIMEOUT_SECS: u64 = 10;
/// Keepalives every node must have received before the demo calls them flowing:
/// the first may be the initiator's key confirmation, the second is periodic.
const MIN_KEEPALIVES: u64 = 2;
/// How long a node may take to become ready (a debug build on a loaded machine).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the sessions may take to come up once every node is ready.
const SESSIONS_TIMEOUT: Duration = Duration::from_secs(20);
/// How long keepalives may take to show (a few keepalive intervals, with slack).
const KEEPALIVES_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a node may take to exit after `POST /v1/shutdown` before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of one admin API request (they answer within milliseconds).
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Poll interval for readiness files: fine, since start-up timing is reported.
const STARTUP_POLL: Duration = Duration::from_millis(2);
/// Poll interval for `/status` while sessions come up.
const SESSION_POLL: Duration = Duration::from_millis(10);
/// Poll interval for `/metrics` while waiting for keepalives.
const METRICS_POLL: Duration = Duration::from_millis(100);
/// Most desktop nodes: enough to see a tier, few enough for a laptop (the demo's
/// addresses are 127.80.0.11 onwards).
const MAX_DESKTOPS: u8 = 16;
/// Pinned seed supernodes: the fewest with which a tier can promote. A desktop
/// attaches to two homes, and the dial-back that validates a candidate must come
/// from a supernode it never had a session with: the third.
const SEEDS: u8 = 3;
/// The demo's loopback network: node `n` listens on 127.80.0.n (seeds 1-3,
/// desktops 11 onwards). Every node needs an address of its own, since the tier
/// checks that a dial-back comes from another IP than the candidate's and its
/// homes'; Linux routes all of 127.0.0.0/8 to the loopback interface.
const NET: [u8; 3] = [127, 80, 0];
/// Host number of the first desktop in [`NET`].
const FIRST_DESKTOP_HOST: u8 = 11;
/// Home supernodes each desktop attaches to (the overlay's default).
const HOMES_PER_DESKTOP: u32 = 2;
/// Election and capacity keys of every node: no minimum uptime (the default wants
/// an hour, far beyond the demo), a bandwidth and CPU bar every loopback node
/// passes, and the watermarks of the real-process overlay test. A desktop's
/// contacts (its latency probes to every seed at start) are remembered for the
/// emulated NATs' mapping time, [`NAT_TIMEOUT_SECS`], not the default three
/// minutes, so a seed it probed may dial it back once its mapping is gone. The
/// round every 10 s (after a 10 s cool-down) is the overlay's own and is not
/// shortened.
const ELECTION: &str = "bandwidth_mbps = 100\n\
                        election_min_uptime_secs = 0\n\
                        election_contact_memory_secs = 5\n\
                        election_min_bandwidth_mbps = 10\n\
                        election_min_cpu_headroom_pct = 0\n\
                        election_high_watermark = 0.8\n\
                        election_low_watermark = 0.45\n\
                        election_min_supernodes = 3\n";
/// How long the seeds may take to know each other.
const TIER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the tier may take to promote a desktop once the desktops are up:
/// candidacy (3 s after attaching), dial-back, and the coordinator's round every
/// 10 s after a 10 s cool-down, on a loaded machine.
const PROMOTION_TIMEOUT: Duration = Duration::from_secs(40);
/// Poll interval of `/status` while waiting for the tier and the promotion.
const TIER_POLL: Duration = Duration::from_millis(100);
/// The emulated access link of desk-1 and desk-2, each way: one-way delay, its
/// jitter, and random loss, a fair broadband line to a peer in the same country.
const LINK_DELAY_MS: u64 = 20;
const LINK_JITTER_MS: u64 = 5;
const LINK_LOSS_PCT: f64 = 1.0;
/// Lines of a failed node's log shown in the error.
const LOG_TAIL_LINES: usize = 20;

/// Arguments of `peercall demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Print the summary as one JSON object on stdout (the narrative goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Keep the network running after the summary, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// Desktop nodes seeded with the first seed supernode (desk-1 and desk-2 behind
    /// emulated NATs; four or more fill the seeds, so the tier promotes one).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_DESKTOPS)))]
    pub desktops: u8,
}

/// Runs `peercall demo`.
pub fn run(log: &LogArgs, args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(run_demo(log, args))
}

async fn run_demo(log: &LogArgs, args: DemoArgs) -> anyhow::Result<()> {
    // Signals first: from here on Ctrl-C cannot kill the demo before it cleans up.
    let mut signals = Signals::new()?;
    let out = Narrator::new(args.json);
    let mut net = Network::new(log)?;
    let result = tokio::select! {
        r = demo(&mut net, &out, &args) => r,
        name = signals.recv() => Err(anyhow!("interrupted by {name} while setting up")),
    };
    if result.is_ok() && args.keep_running {
        out.say("the network keeps running; press Ctrl-C to stop it");
        let name = signals.recv().await;
        out.say(format!("{name}: stopping"));
    }
    // A second signal while stopping skips the grace period; the guard kills.
    tokio::select! {
        () = net.stop(&out) => {},
        name = signals.recv() => out.say(format!("{name}: killing the nodes")),
    }
    net.kill_remaining();
    net.remove(&out);
    result
}

/// The whole demo up to the summary.
async fn demo(net: &mut Network, out: &Narrator, args: &DemoArgs) -> anyhow::Result<()> {
    let capacity = seed_capacity(args.desktops);
    out.line(format!(
        "peercall demo: {SEEDS} seed supernodes and {} desktop nodes, each a real `peercall node` process on its own address in {}.{}.{}.0/24",
        args.desktops, NET[0], NET[1], NET[2]
    ));
    out.line(format!(
        "  temporary data in {} (removed at exit); keepalives every {KEEPALIVE_SECS} s; each seed admits {capacity} clients",
        net.root_path().display()
    ));
    out.line(format!(
        "  desk-1 and desk-2 sit behind emulated port-restricted NATs, their links {LINK_DELAY_MS} ms ± {LINK_JITTER_MS} ms each way with {LINK_LOSS_PCT} % loss ([emulate] in their own sockets)"
    ));

    // The tier: pinned seeds admit only each other, so each must know the others'
    // keys and addresses before it starts. The demo makes their identities and
    // picks their ports first.
    let mut planned = Vec::new();
    for i in 1..=SEEDS {
        let name = format!("seed-{i}");
        let (key, udp) = net.prepare(&name, host(i))?;
        planned.push((name, udp, format!("{key}@{udp}")));
    }
    let mut seeds: Vec<usize> = Vec::new();
    for (name, udp, spec) in &planned {
        let others: Vec<String> = planned
            .iter()
            .filter(|(_, _, s)| s != spec)
            .map(|(_, _, s)| s.clone())
            .collect();
        // One after the other: a seed's joins to seeds not yet listening are lost
        // and only retried at the overlay's next maintenance round, seconds later.
        let s = net.spawn(
            name,
            "supernode",
            *udp,
            &others,
            None,
            &seed_extra(capacity),
        )?;
        net.wait_ready(s).await?;
        seeds.push(s);
    }
    for &s in &seeds {
        let m = &net.members[s];
        let ready = m.ready()?;
        out.say(format!(
            "{:<7} supernode, fingerprint {}, UDP {}: ready in {} ms",
            m.name,
            ready.status.fingerprint,
            ready.udp,
            ms(ready.at - m.spawned)
        ));
    }
    net.wait_tier(out, &seeds).await?;
    let seed = seeds[0];
    let (seed_key, seed_udp) = {
        let r = net.members[seed].ready()?;
        (r.status.peer_key.clone(), r.udp)
    };

    let mut desktops = Vec::new();
    let desktops_started = Instant::now();
    for i in 1..=args.desktops {
        let name = format!("desk-{i}");
        // Odd desktops know the seed's key; even ones meet it for the first time.
        let (handshake, spec) = if i % 2 == 1 {
            (Handshake::Ik, format!("{seed_key}@{seed_udp}"))
        } else {
            (Handshake::Xx, seed_udp.to_string())
        };
        let behind_nat = i <= 2;
        out.say(format!(
            "{name:<7} starting: {}{}",
            handshake.explain(),
            if behind_nat {
                "; behind an emulated NAT"
            } else {
                ""
            }
        ));
        let extra = desktop_extra(&name, i, capacity, &net.recording);
        let host = host(FIRST_DESKTOP_HOST + i - 1);
        let d = net.spawn(&name, "auto", host, &[spec], Some(handshake), &extra)?;
        net.members[d].nat = behind_nat;
        desktops.push(d);
    }
    for &d in &desktops {
        net.wait_ready(d).await?;
        let m = &net.members[d];
        let ready = m.ready()?;
        out.say(format!(
            "{:<7} desktop, fingerprint {}, UDP {}: ready in {} ms",
            m.name,
            ready.status.fingerprint,
            ready.udp,
            ms(ready.at - m.spawned)
        ));
    }

    net.wait_sessions(out, seed, &desktops).await?;
    net.wait_keepalives(out).await?;
    let promotion = net
        .wait_promotion(out, &seeds, &desktops, desktops_started)
        .await?;
    let mut summary = net.summary(seed).await?;
    summary.promotion_s = promotion.map(|p| p.after.as_secs_f64());
    summary.promoted = promotion.map(|p| net.members[p.node].name.clone());
    if desktops.len() >= 2 {
        let (call, cut) = net.call(out, desktops[0], desktops[1]).await?;
        summary.call = Some(call);
        summary.path_cut_at_s = cut.as_ref().map(|c| c.at_s);
        summary.path_switch_ms = cut.as_ref().and_then(|c| c.switch_ms);
        summary.callee_call = cut.and_then(|c| c.callee);
        // The block list's and the emulator's drops happened during the call, after
        // the snapshot.
        for (node, m) in summary.nodes.iter_mut().zip(&net.members) {
            let text = get_metrics(m.ready()?.admin).await?;
            node.debug_blocked = counter(&text, "peercall_debug_blocked_datagrams_total");
            node.emulated = Emulated::of(&text);
        }
    }
    if args.json {
        let text = serde_json::to_string(&summary).context("summary as JSON")?;
        out.stdout(&text);
    }
    out.table(&summary);
    Ok(())
}

/// The address node `n` of the demo's network listens on (port chosen by the OS).
fn host(n: u8) -> SocketAddr {
    SocketAddr::from(([NET[0], NET[1], NET[2], n], 0))
}

/// Clients each seed admits: just enough for every desktop's homes, so the
/// seeds' load is above the high watermark ([`ELECTION`]: 0.8) from four
/// desktops on and the tier promotes one (three places each for four desktops:
/// 8 of 9, a load of 0.89; the coordinator then promotes just enough to bring the
/// load back between the watermarks).
fn seed_capacity(desktops: u8) -> u32 {
    (u32::from(desktops) * HOMES_PER_DESKTOP)
        .div_ceil(u32::from(SEEDS))
        .max(1)
}

/// A promotion the demo saw.
#[derive(Debug, Clone, Copy)]
struct Promotion {
    /// The promoted member.
    node: usize,
    /// From the desktops' start to the member reporting itself a supernode.
    after: Duration,
}

/// The two ways a desktop meets the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handshake {
    /// Knows the seed's static key.
    Ik,
    /// Knows only its address.
    Xx,
}

impl Handshake {
    fn as_str(self) -> &'static str {
        match self {
            Handshake::Ik => "IK",
            Handshake::Xx => "XX",
        }
    }

    fn explain(self) -> &'static str {
        match self {
            Handshake::Ik => "knows seed-1's address and key, so it opens with Noise IK",
            Handshake::Xx => {
                "knows only seed-1's address: first contact with Noise XX, which learns the key"
            }
        }
    }
}

/// What a node told us once it was ready.
#[derive(Debug)]
struct Ready {
    /// When its `admin.addr` appeared.
    at: Instant,
    udp: SocketAddr,
    admin: SocketAddr,
    token: String,
    status: StatusBody,
}

/// One node process of the demo.
#[derive(Debug)]
struct Member {
    name: String,
    role: &'static str,
    handshake: Option<Handshake>,
    child: Child,
    data_dir: PathBuf,
    log: PathBuf,
    spawned: Instant,
    ready: Option<Ready>,
    /// Time from ready to the session with the seed being established (desktops).
    session_up: Option<Duration>,
    /// Behind an emulated NAT with an impaired link.
    nat: bool,
}

impl Member {
    fn ready(&self) -> anyhow::Result<&Ready> {
        self.ready
            .as_ref()
            .ok_or_else(|| anyhow!("{} is not ready", self.name))
    }

    /// Fails if the process has exited, with the end of its log.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "node {} exited ({status}); its log ends with:\n{}",
                self.name,
                log_tail(&self.log)
            ),
            Err(e) => bail!("cannot check on node {}: {e}", self.name),
        }
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// The demo's node processes and their temporary directory; a drop guard that
/// kills and reaps every child still running, then removes the directory.
struct Network {
    members: Vec<Member>,
    /// `None` once removed.
    root: Option<tempfile::TempDir>,
    /// Global flags passed on to the nodes.
    log_flags: Vec<String>,
    /// Where desk-2 records the demo call: outside the temporary directory, so it
    /// is still there after the demo.
    recording: PathBuf,
}

impl Network {
    fn new(log: &LogArgs) -> anyhow::Result<Network> {
        let root = tempfile::Builder::new()
            .prefix("peercall-demo-")
            .tempdir()
            .context("could not create a temporary directory")?;
        let mut log_flags = Vec::new();
        if let Some(v) = log.log_format.and_then(|f| f.to_possible_value()) {
            log_flags.extend(["--log-format".to_owned(), v.get_name().to_owned()]);
        }
        if let Some(v) = log.log_level.and_then(|l| l.to_possible_value()) {
            log_flags.extend(["--log-level".to_owned(), v.get_name().to_owned()]);
        }
        let recording =
            std::env::temp_dir().join(format!("peercall-demo-call-{}.wav", std::process::id()));
        Ok(Network {
            members: Vec::new(),
            root: Some(root),
            log_flags,
            recording,
        })
    }

    fn root_path(&self) -> &Path {
        self.root.as_ref().map_or(Path::new(""), |r| r.path())
    }

    /// Makes node `name`'s data directory and identity, and picks a free UDP port
    /// on `ip`'s address (bound and released; the node binds it right after), so
    /// others can be configured with its key and address before it starts.
    fn prepare(&self, name: &str, ip: SocketAddr) -> anyhow::Result<(PeerKey, SocketAddr)> {
        let data_dir = self.root_path().join(name);
        let dir = crate::store::DataDir::open(&data_dir)
            .with_context(|| format!("could not create {}", data_dir.display()))?;
        let (identity, _) = dir
            .load_or_create_identity(&mut OsRng)
            .with_context(|| format!("could not make {name}'s identity"))?;
        let socket = std::net::UdpSocket::bind(ip)
            .with_context(|| format!("could not bind {ip} (is 127.0.0.0/8 routed to loopback?)"))?;
        let addr = socket.local_addr().context("local address")?;
        Ok((identity.peer_key(), addr))
    }

    /// Writes the node's config file and starts `peercall node` on it.
    fn spawn(
        &mut self,
        name: &str,
        role: &'static str,
        listen: SocketAddr,
        seeds: &[String],
        handshake: Option<Handshake>,
        extra: &str,
    ) -> anyhow::Result<usize> {
        let root = self.root_path().to_owned();
        let data_dir = root.join(name);
        let config = root.join(format!("{name}.toml"));
        let log = root.join(format!("{name}.log"));
        std::fs::write(&config, node_config(&data_dir, role, listen, seeds, extra)?)
            .with_context(|| format!("could not write {}", config.display()))?;
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("could not create {}", log.display()))?;
        let exe = std::env::current_exe().context("cannot find the peercall binary")?;
        let mut cmd = Command::new(exe);
        // The demo's configuration is all in the file: nothing inherited may change it.
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("PEERCALL_") {
                cmd.env_remove(var);
            }
        }
        cmd.args(&self.log_flags)
            .arg("node")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            // Own process group: a terminal's Ctrl-C goes to the demo alone, which
            // then stops the nodes in order instead of racing them.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start node {name}"))?;
        self.members.push(Member {
            name: name.to_owned(),
            role,
            handshake,
            child,
            data_dir,
            log,
            spawned: Instant::now(),
            ready: None,
            session_up: None,
            nat: false,
        });
        Ok(self.members.len() - 1)
    }

    /// Waits until node `i` has written `admin.addr`, then reads its addresses,
    /// token and status.
    async fn wait_ready(&mut self, i: usize) -> anyhow::Result<()> {
        let m = &mut self.members[i];
        let deadline = m.spawned + READY_TIMEOUT;
        let admin_file = m.data_dir.join(ADMIN_ADDR_FILE);
        while !admin_file.exists() {
            m.check_alive()?;
            if Instant::now() >= deadline {
                bail!(
                    "node {} not ready within {READY_TIMEOUT:?}; its log:\n{}",
                    m.name,
                    log_tail(&m.log)
                );
            }
            tokio::time::sleep(STARTUP_POLL).await;
        }
        let at = Instant::now();
        let admin = read_addr(&admin_file)?;
        let udp = read_addr(&m.data_dir.join(UDP_ADDR_FILE))?;
        let token_file = m.data_dir.join(ADMIN_TOKEN_FILE);
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("could not read {}", token_file.display()))?
            .trim()
            .to_owned();
        let status = get_status(admin).await?;
        m.ready = Some(Ready {
            at,
            udp,
            admin,
            token,
            status,
        });
        Ok(())
    }

    /// Waits until every desktop lists a session with seed-1 and seed-1 lists
    /// one with every desktop, narrating each as it comes up.
    async fn wait_sessions(
        &mut self,
        out: &Narrator,
        seed: usize,
        desktops: &[usize],
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + SESSIONS_TIMEOUT;
        let seed_key = self.members[seed].ready()?.status.peer_key.clone();
        loop {
            for &d in desktops {
                if self.members[d].session_up.is_some() {
                    continue;
                }
                self.members[d].check_alive()?;
                let ready = self.members[d].ready()?;
                let (admin, ready_at) = (ready.admin, ready.at);
                let status = get_status(admin).await?;
                let Some(session) = status.sessions.iter().find(|s| s.peer == seed_key) else {
                    continue;
                };
                // When it was established, from its age at the time of asking.
                let age =
                    Duration::try_from_secs_f64(session.established_age_s).unwrap_or_default();
                let now = Instant::now();
                let established = now.checked_sub(age).unwrap_or(now);
                let up = established.saturating_duration_since(ready_at);
                let m = &mut self.members[d];
                m.session_up = Some(up);
                let how = m.handshake.map_or("", Handshake::as_str);
                out.say(format!(
                    "{:<7} <-> seed-1: session up with Noise {how}, {} ms after {} was ready",
                    m.name,
                    ms(up),
                    m.name
                ));
            }
            self.members[seed].check_alive()?;
            let seed_status = get_status(self.members[seed].ready()?.admin).await?;
            let missing: Vec<&str> = desktops
                .iter()
                .map(|&d| &self.members[d])
                .filter(|m| {
                    m.session_up.is_none()
                        || m.ready.as_ref().is_some_and(|r| {
                            !seed_status
                                .sessions
                                .iter()
                                .any(|s| s.peer == r.status.peer_key)
                        })
                })
                .map(|m| m.name.as_str())
                .collect();
            if missing.is_empty() {
                out.say(format!(
                    "all {} sessions up: seed-1 lists every desktop in /status, and each desktop lists seed-1",
                    desktops.len()
                ));
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "sessions with {} not up within {SESSIONS_TIMEOUT:?}; the seed's log:\n{}",
                    missing.join(", "),
                    log_tail(&self.members[seed].log)
                );
            }
            tokio::time::sleep(SESSION_POLL).await;
        }
    }

    /// Waits until every node has received [`MIN_KEEPALIVES`] authenticated
    /// keepalives, as its `/metrics` says.
    async fn wait_keepalives(&mut self, out: &Narrator) -> anyhow::Result<()> {
        let deadline = Instant::now() + KEEPALIVES_TIMEOUT;
        loop {
            let mut counts = Vec::new();
            for m in &mut self.members {
                m.check_alive()?;
                let text = get_metrics(m.ready()?.admin).await?;
                counts.push((
                    m.name.clone(),
                    counter(&text, "peercall_keepalives_sent_total"),
                    counter(&text, "peercall_keepalives_received_total"),
                ));
            }
            if counts
                .iter()
                .all(|(_, _, received)| *received >= MIN_KEEPALIVES)
            {
                let list: Vec<String> = counts
                    .iter()
                    .map(|(name, sent, received)| format!("{name} {sent} out/{received} in"))
                    .collect();
                out.say(format!(
                    "authenticated keepalives flowing (from /metrics): {}",
                    list.join(", ")
                ));
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("keepalives did not flow within {KEEPALIVES_TIMEOUT:?}: {counts:?}");
            }
            tokio::time::sleep(METRICS_POLL).await;
        }
    }

    /// Waits until every seed knows the whole tier (`members` in `/status`).
    async fn wait_tier(&mut self, out: &Narrator, seeds: &[usize]) -> anyhow::Result<()> {
        let started = Instant::now();
        let deadline = started + TIER_TIMEOUT;
        let n = seeds.len() as u64;
        loop {
            let mut known = Vec::new();
            for &s in seeds {
                self.members[s].check_alive()?;
                known.push(get_status(self.members[s].ready()?.admin).await?.members);
            }
            if known.iter().all(|&k| k == n) {
                out.say(format!(
                    "the tier is formed: every seed knows all {n} supernodes ({} ms)",
                    ms(started.elapsed())
                ));
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the seeds did not learn the tier of {n} within {TIER_TIMEOUT:?}: they know {known:?}"
                );
            }
            tokio::time::sleep(TIER_POLL).await;
        }
    }

    /// Waits until a desktop reports itself a supernode, narrating the tier's load
    /// and the dial-backs that decided it; `None` (said) when the desktops are too
    /// few to load the seeds past the high watermark.
    async fn wait_promotion(
        &mut self,
        out: &Narrator,
        seeds: &[usize],
        desktops: &[usize],
        started: Instant,
    ) -> anyhow::Result<Option<Promotion>> {
        let capacity = seed_capacity(desktops.len() as u8) * u32::from(SEEDS);
        let attachments = desktops.len() as u32 * HOMES_PER_DESKTOP;
        let load = f64::from(attachments) / f64::from(capacity);
        if load <= 0.8 {
            out.say(format!(
                "no promotion expected: {attachments} attachments to {capacity} places is a load of {load:.2}, below the high watermark 0.8"
            ));
            return Ok(None);
        }
        out.say(format!(
            "waiting for the tier to promote a desktop: {attachments} home attachments fill the seeds' {capacity} places (load {load:.2}, above the high watermark 0.8); candidates are dialed back by a supernode they never met, and the coordinator elects every 10 s"
        ));
        let deadline = Instant::now() + PROMOTION_TIMEOUT;
        let promoted = loop {
            let mut found = None;
            for &d in desktops {
                self.members[d].check_alive()?;
                if get_status(self.members[d].ready()?.admin).await?.supernode {
                    found = Some(d);
                    break;
                }
            }
            if let Some(d) = found {
                break d;
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = seeds
                    .iter()
                    .chain(desktops)
                    .map(|&i| {
                        let m = &self.members[i];
                        format!("{}'s log:\n{}", m.name, log_tail(&m.log))
                    })
                    .collect();
                bail!(
                    "no desktop was promoted within {PROMOTION_TIMEOUT:?}\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(TIER_POLL).await;
        };
        let after = started.elapsed();
        let (mut ok, mut failed, mut promotions) = (0, 0, 0);
        for &s in seeds {
            let text = get_metrics(self.members[s].ready()?.admin).await?;
            ok += counter(&text, "peercall_overlay_dialbacks_total{result=\"ok\"}");
            failed += counter(&text, "peercall_overlay_dialbacks_total{result=\"failed\"}");
            promotions += counter(&text, "peercall_overlay_promotions_total");
        }
        let m = &self.members[promoted];
        let status = get_status(m.ready()?.admin).await?;
        out.say(format!(
            "promotion: the tier made {} a supernode {:.1} s after the desktops started (role still \"{}\": elected, not configured); the seeds counted {promotions} promotion(s), {ok} dial-back(s) answered and {failed} failed",
            m.name,
            after.as_secs_f64(),
            status.role
        ));
        let behind: Vec<&str> = desktops
            .iter()
            .map(|&d| &self.members[d])
            .filter(|m| m.nat)
            .map(|m| m.name.as_str())
            .collect();
        if !behind.is_empty() {
            out.say(format!(
                "  {} stay ordinary: behind their NATs no supernode they never sent to can reach them, which is what the dial-back tests",
                behind.join(" and ")
            ));
        }
        Ok(Some(Promotion {
            node: promoted,
            after,
        }))
    }

    /// Reads every node's status and counters into the summary.
    async fn summary(&self, seed: usize) -> anyhow::Result<Summary> {
        let names: Vec<(String, String)> = self
            .members
            .iter()
            .filter_map(|m| Some((m.ready.as_ref()?.status.peer_key.clone(), m.name.clone())))
            .collect();
        let mut nodes = Vec::new();
        for m in &self.members {
            let ready = m.ready()?;
            let status = get_status(ready.admin).await?;
            let text = get_metrics(ready.admin).await?;
            let mut sessions: Vec<String> = status
                .sessions
                .iter()
                .map(|s| {
                    names
                        .iter()
                        .find(|(key, _)| *key == s.peer)
                        .map_or_else(|| s.peer.clone(), |(_, name)| name.clone())
                })
                .collect();
            sessions.sort();
            nodes.push(NodeSummary {
                name: m.name.clone(),
                role: m.role,
                handshake: m.handshake.map(Handshake::as_str),
                pid: m.child.id(),
                fingerprint: status.fingerprint,
                user_id: status.user_id,
                peer_key: status.peer_key,
                udp: ready.udp.to_string(),
                admin: ready.admin.to_string(),
                metrics: format!("http://{}/metrics", ready.admin),
                data_dir: m.data_dir.display().to_string(),
                log: m.log.display().to_string(),
                ready_ms: ms_f64(ready.at - m.spawned),
                session_up_ms: m.session_up.map(ms_f64),
                sessions,
                handshakes_completed: counter(&text, "peercall_handshakes_completed_total"),
                keepalives_sent: counter(&text, "peercall_keepalives_sent_total"),
                keepalives_received: counter(&text, "peercall_keepalives_received_total"),
                datagrams_sent: counter(&text, "peercall_datagrams_sent_total"),
                datagrams_received: counter(&text, "peercall_datagrams_received_total"),
                dropped: dropped_total(&text),
                debug_blocked: counter(&text, "peercall_debug_blocked_datagrams_total"),
                nat: m.nat,
                emulated: Emulated::of(&text),
                supernode: status.supernode,
            });
        }
        let mut supernodes = 0;
        let mut promotions = 0;
        for m in &self.members {
            let ready = m.ready()?;
            let status = get_status(ready.admin).await?;
            supernodes += usize::from(status.supernode);
            promotions += counter(
                &get_metrics(ready.admin).await?,
                "peercall_overlay_promotions_total",
            );
        }
        Ok(Summary {
            supernodes,
            promotions,
            promotion_s: None,
            promoted: None,
            call: None,
            path_cut_at_s: None,
            path_switch_ms: None,
            callee_call: None,
            sessions: nodes[seed].sessions.len(),
            setup_ms: ms_f64(self.members[seed].spawned.elapsed()),
            keepalive_secs: KEEPALIVE_SECS,
            temp_dir: self.root_path().display().to_string(),
            nodes,
        })
    }

    /// desk-1 looks desk-2 up and calls it with speech; desk-2 answers by itself
    /// and records. Hangs up after [`CALL_SECS`] of conversation.
    async fn call(
        &mut self,
        out: &Narrator,
        caller: usize,
        callee: usize,
    ) -> anyhow::Result<(crate::callcli::Summary, Option<PathCut>)> {
        let callee_ready = self.members[callee].ready()?;
        let (callee_admin, callee_token) = (callee_ready.admin, callee_ready.token.clone());
        let speech = self.root_path().join("speech.wav");
        let what = write_speech(&speech)?;
        let (from, to) = (&self.members[caller], &self.members[callee]);
        let (name, ready) = (to.name.clone(), from.ready()?);
        let (from_name, to_name) = (from.name.clone(), to.name.clone());
        let (from_admin, to_admin) = (ready.admin, to.ready()?.admin);
        let (admin, token) = (ready.admin, ready.token.clone());
        out.say(format!("{} plays {what}: {}", from.name, speech.display()));
        let deadline = Instant::now() + LOOKUP_TIMEOUT;
        let found = loop {
            let r = client::request(
                admin,
                "GET",
                &format!("/v1/lookup?q={name}"),
                Some(&token),
                None,
                HTTP_TIMEOUT + Duration::from_secs(10),
            )
            .await?;
            if r.is_success() {
                break serde_json::from_str::<crate::admin::LookupBody>(&r.body)?;
            }
            if Instant::now() >= deadline {
                bail!("{name} not found in the directory: {}", r.error_message());
            }
            tokio::time::sleep(METRICS_POLL).await;
        };
        out.say(format!(
            "{} looked up {name} in the directory: fingerprint {}, endpoints {}",
            from.name,
            found.fingerprint,
            found.endpoints.join(", ")
        ));
        let body = serde_json::json!({ "to": name, "play": speech.display().to_string() });
        let r = client::request(
            admin,
            "POST",
            "/v1/calls",
            Some(&token),
            Some(&body.to_string()),
            HTTP_TIMEOUT,
        )
        .await?;
        if !r.is_success() {
            bail!("could not place the call: {}", r.error_message());
        }
        let placed: crate::admin::PlacedBody = serde_json::from_str(&r.body)?;
        let path = format!("/v1/calls/{}", placed.call);
        let get = || async {
            let r = client::request(admin, "GET", &path, Some(&token), None, HTTP_TIMEOUT).await?;
            anyhow::Ok(serde_json::from_str::<crate::calls::CallBody>(&r.body)?)
        };
        // The callee's side of the call (ended calls stay listed a minute).
        let heard = || async {
            let r = client::request(
                callee_admin,
                "GET",
                "/v1/calls",
                Some(&callee_token),
                None,
                HTTP_TIMEOUT,
            )
            .await?;
            anyhow::Ok(
                serde_json::from_str::<crate::admin::CallsBody>(&r.body)
                    .ok()
                    .and_then(|b| b.calls.into_iter().max_by_key(|c| c.call)),
            )
        };
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut last = get().await?;
        while last.state != "active" && last.state != "ended" {
            if Instant::now() >= deadline {
                bail!("the call did not connect within {CONNECT_TIMEOUT:?}");
            }
            tokio::time::sleep(SESSION_POLL).await;
            last = get().await?;
        }
        if last.state == "ended" {
            bail!(
                "the call failed: {}",
                last.end_reason.as_deref().unwrap_or("ended")
            );
        }
        // Active comes with the answer; the first path is chosen with the first media.
        let deadline = Instant::now() + FIRST_PATH_WAIT;
        while last.path_kind.is_none() && Instant::now() < deadline {
            tokio::time::sleep(SESSION_POLL).await;
            last = get().await?;
        }
        let punched = if last.path_kind.as_deref() == Some("direct") && from.nat && to.nat {
            " (a hole punched through both NATs)"
        } else {
            ""
        };
        out.say(format!(
            "call connected in {} ms over {}{punched}; {name} answered by itself and records",
            last.setup_ms.unwrap_or(0),
            last.path_kind.as_deref().unwrap_or("?")
        ));
        let connected = Instant::now();
        let mut cut = None;
        for second in 1..=CALL_SECS {
            tokio::time::sleep(Duration::from_secs(1)).await;
            last = get().await?;
            out.say(format!("  {}", call_line(&last)));
            if second == CUT_AFTER_SECS {
                cut = Some(
                    self.cut_path(out, caller, callee, connected, &get, &heard)
                        .await?,
                );
            }
        }
        let _ = client::request(admin, "DELETE", &path, Some(&token), None, HTTP_TIMEOUT).await?;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        while last.state != "ended" && Instant::now() < deadline {
            tokio::time::sleep(SESSION_POLL).await;
            last = get().await?;
        }
        let mut summary = crate::callcli::Summary::of(&last);
        summary.record = Some(self.recording.display().to_string());
        let heard = heard().await?;
        if let Some(c) = &heard {
            out.say(format!(
                "{name}'s side: {} switches over {}, {} ms concealed, longest gap {} ms, {} frames in",
                c.path_switches,
                c.paths_used.join(" then "),
                c.concealed_ms,
                c.max_gap_ms,
                c.frames_received
            ));
        }
        if let Some(cut) = &mut cut {
            cut.callee = heard.as_ref().map(crate::callcli::Summary::of);
            out.say(format!(
                "the direct path was cut {:.1} s into the call; the call switched away {} after the cut, over {}",
                cut.at_s,
                cut.switch_ms
                    .map_or("never".to_owned(), |t| format!("{t} ms")),
                summary.paths_used.join(" then ")
            ));
        }
        for (who, admin) in [(&from_name, from_admin), (&to_name, to_admin)] {
            let e = Emulated::of(&get_metrics(admin).await?);
            out.say(format!(
                "{who}'s emulated link and NAT so far: {} datagrams delayed, {} lost, {} unsolicited ones filtered by its NAT",
                e.delayed, e.lost, e.nat_filtered
            ));
        }
        out.say(format!(
            "hung up: set-up {} ms, first audio {} ms, {} switches, longest gap {} ms, MOS {}; {name}'s recording: {}",
            opt_ms(summary.setup_ms),
            opt_ms(summary.first_audio_ms),
            summary.path_switches,
            summary.max_gap_ms,
            summary
                .mos_estimate
                .map_or("-".to_owned(), |m| format!("{m:.2}")),
            self.recording.display()
        ));
        Ok((summary, cut))
    }

    /// Cuts the direct path between `caller` and `callee` in the caller's own UDP
    /// socket (its debug block list: every datagram to or from the callee's
    /// address is dropped both ways), then watches the call's statistics every
    /// [`SWITCH_POLL`] until the active path changes, or [`SWITCH_TIMEOUT`].
    async fn cut_path<F, Fut, H, HFut>(
        &self,
        out: &Narrator,
        caller: usize,
        callee: usize,
        connected: Instant,
        get: &F,
        heard: &H,
    ) -> anyhow::Result<PathCut>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<crate::calls::CallBody>>,
        H: Fn() -> HFut,
        HFut: std::future::Future<Output = anyhow::Result<Option<crate::calls::CallBody>>>,
    {
        let (from, to) = (&self.members[caller], &self.members[callee]);
        let ready = from.ready()?;
        let target = to.ready()?.udp;
        let kind = |c: Option<&crate::calls::CallBody>| {
            c.and_then(|c| c.path_kind.clone())
                .unwrap_or_else(|| "-".into())
        };
        let direct = |c: Option<&crate::calls::CallBody>| kind(c) == "direct";
        let mut before = get().await?;
        let mut other = heard().await?;
        // Media starts on the first working path, which may be a relay, and each
        // side moves to the direct path on its own (after a few seconds of it
        // scoring better): the cut is only shown on the direct path, so wait for
        // both sides to be on it.
        if !direct(Some(&before)) || !direct(other.as_ref()) {
            out.say(format!(
                "the call is on {} ({}'s side {}), not yet on the punched direct path both ways: waiting for it (up to {DIRECT_WAIT:?})",
                kind(Some(&before)),
                to.name,
                kind(other.as_ref())
            ));
            let deadline = Instant::now() + DIRECT_WAIT;
            while !(direct(Some(&before)) && direct(other.as_ref())) && Instant::now() < deadline {
                tokio::time::sleep(SWITCH_POLL).await;
                before = get().await?;
                other = heard().await?;
            }
            if !direct(Some(&before)) || !direct(other.as_ref()) {
                bail!(
                    "the call never went direct both ways within {DIRECT_WAIT:?} (paths: {}; {}'s side: {})",
                    before.paths_used.join(", "),
                    to.name,
                    other.map_or_else(String::new, |c| c.paths_used.join(", "))
                );
            }
            out.say(format!("  {}", call_line(&before)));
        }
        let body = serde_json::json!({ "addr": target.to_string() });
        let r = client::request(
            ready.admin,
            "POST",
            "/v1/debug/block",
            Some(&ready.token),
            Some(&body.to_string()),
            HTTP_TIMEOUT,
        )
        .await?;
        if !r.is_success() {
            bail!("could not cut the direct path: {}", r.error_message());
        }
        let at = Instant::now();
        let at_s = (at - connected).as_secs_f64();
        out.say(format!(
            "direct path cut: {} now drops every datagram to and from {} ({}'s UDP address) in its own socket (POST /v1/debug/block); the call was on {}",
            from.name,
            target,
            to.name,
            before.path_kind.as_deref().unwrap_or("-")
        ));
        let deadline = at + SWITCH_TIMEOUT;
        let mut switch_ms = None;
        while Instant::now() < deadline {
            tokio::time::sleep(SWITCH_POLL).await;
            let now = get().await?;
            if now.path_switches > before.path_switches && now.path_kind != before.path_kind {
                let t = at.elapsed().as_millis() as u64;
                switch_ms = Some(t);
                out.say(format!(
                    "call_path_switched: {} -> {} seen {t} ms after the cut (switch {} of the call)",
                    before.path_kind.as_deref().unwrap_or("-"),
                    now.path_kind.as_deref().unwrap_or("-"),
                    now.path_switches
                ));
                break;
            }
        }
        if switch_ms.is_none() {
            out.say(format!(
                "the call did not switch paths within {SWITCH_TIMEOUT:?} of the cut"
            ));
        }
        Ok(PathCut {
            at_s,
            switch_ms,
            callee: None,
        })
    }

    /// Asks every running node to shut down, waits up to [`STOP_TIMEOUT`], then kills
    /// (and reaps) the rest.
    async fn stop(&mut self, out: &Narrator) {
        let mut asked = 0;
        for m in &mut self.members {
            if !m.is_running() {
                continue;
            }
            let accepted = match &m.ready {
                Some(r) => http(r.admin, "POST", "/v1/shutdown", Some(&r.token))
                    .await
                    .is_ok(),
                None => false,
            };
            if accepted {
                asked += 1;
            } else {
                // Not ready yet or not answering: it has no peers to tell.
                let _ = m.child.kill();
            }
        }
        if asked > 0 {
            out.say(format!(
                "stopping: asked {asked} nodes to shut down (POST /v1/shutdown); they tell their peers"
            ));
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.members.iter_mut().any(Member::is_running) && Instant::now() < deadline {
            tokio::time::sleep(SESSION_POLL).await;
        }
        let killed: Vec<String> = self
            .members
            .iter_mut()
            .filter_map(|m| m.is_running().then(|| m.name.clone()))
            .collect();
        self.kill_remaining();
        if killed.is_empty() {
            out.say(format!("all {} nodes exited", self.members.len()));
        } else {
            out.say(format!(
                "killed {} after {STOP_TIMEOUT:?}: {}",
                killed.len(),
                killed.join(", ")
            ));
        }
    }

    /// Kills (SIGKILL) every node still running and reaps them all.
    fn kill_remaining(&mut self) {
        for m in &mut self.members {
            if m.is_running() {
                let _ = m.child.kill();
            }
            let _ = m.child.wait();
        }
    }

    /// Removes the temporary directory (the nodes must have exited).
    fn remove(&mut self, out: &Narrator) {
        if let Some(root) = self.root.take() {
            let path = root.path().display().to_string();
            match root.close() {
                Ok(()) => out.say(format!("removed {path}")),
                Err(e) => out.say(format!("could not remove {path}: {e}")),
            }
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Normally `stop` has reaped everything already; this is for early exits.
        self.kill_remaining();
        // `root` (a TempDir) is removed when the fields drop, after the children.
    }
}

/// The config file of one demo node. `extra` may hold top-level keys, then
/// sections.
fn node_config(
    data_dir: &Path,
    role: &str,
    listen: SocketAddr,
    seeds: &[String],
    extra: &str,
) -> anyhow::Result<String> {
    let dir = data_dir
        .to_str()
        .ok_or_else(|| anyhow!("the temporary directory {data_dir:?} is not UTF-8"))?;
    // JSON string syntax is valid TOML basic-string syntax for any text.
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let seeds: Vec<String> = seeds.iter().map(|s| quote(s)).collect();
    Ok(format!(
        "# Written by `peercall demo`.\n\
         data_dir = {}\n\
         listen = \"{listen}\"\n\
         admin = \"127.0.0.1:0\"\n\
         role = \"{role}\"\n\
         seeds = [{}]\n\
         keepalive_secs = {KEEPALIVE_SECS}\n\
         session_timeout_secs = {SESSION_TIMEOUT_SECS}\n\
         {extra}",
        quote(dir),
        seeds.join(", ")
    ))
}

/// Config of every node: relays may forward to loopback (the network is on one
/// host).
const RELAY_LOOPBACK: &str = "[relay]\nallow_private_targets = true\n";
/// Seconds of conversation in the demo call: a few before the cut, a few after it
/// on the relayed path.
const CALL_SECS: u64 = 8;
/// Seconds into the call at which desk-1 cuts the direct path: long enough for the
/// router to have measured both paths and settled.
const CUT_AFTER_SECS: u64 = 4;
/// Poll interval of the call's statistics right after the cut: the resolution of
/// the reported time to switch.
const SWITCH_POLL: Duration = Duration::from_millis(10);
/// How long the demo waits, once the call is active, for its first path to be
/// chosen (with the first media, tens of milliseconds later).
const FIRST_PATH_WAIT: Duration = Duration::from_secs(2);
/// How long the demo waits for a call that started on a relay to move to the
/// direct path before it cuts that (the router upgrades within seconds).
const DIRECT_WAIT: Duration = Duration::from_secs(10);
/// How long the demo watches for the switch after the cut (the router's silence
/// rule should switch within a few hundred ms; this only bounds the wait).
const SWITCH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the callee may take to become findable in the directory.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the call may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// What the demo's caller says.
const SPEECH: &str = "Hello from peercall. This call runs over a peer to peer network of real nodes on this machine.";

/// A seed's extra config: its capacity, the election keys, relays to loopback.
fn seed_extra(capacity: u32) -> String {
    format!("supernode_max_clients = {capacity}\n{ELECTION}{RELAY_LOOPBACK}")
}

/// The emulated NATs' mapping timeout, s: as [`ELECTION`]'s contact memory. Short,
/// so the demo's promotion comes within seconds; keepalives every second keep the
/// mappings to the homes open.
const NAT_TIMEOUT_SECS: u32 = 5;

/// Desktop `i`'s extra config: its handle, the election keys (it may be promoted),
/// relays to loopback; desk-1 and desk-2 behind an emulated NAT with an impaired
/// link (a fixed seed per node, so the loss pattern repeats); desk-2 answers by
/// itself and records.
fn desktop_extra(name: &str, i: u8, capacity: u32, recording: &Path) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    // Debug endpoints: the demo cuts the call's direct path with the block list.
    let mut extra = format!(
        "handle = {}\ndebug_endpoints = true\nsupernode_max_clients = {capacity}\n{ELECTION}{RELAY_LOOPBACK}",
        quote(name)
    );
    if i <= 2 {
        extra.push_str(&format!(
            "[emulate]\ndelay_ms = {LINK_DELAY_MS}\njitter_ms = {LINK_JITTER_MS}\n\
             loss_pct = {LINK_LOSS_PCT}\nseed = {i}\nnat = \"port-restricted\"\n\
             nat_timeout_secs = {NAT_TIMEOUT_SECS}\n"
        ));
    }
    if i == 2 {
        extra.push_str(&format!(
            "[calls]\nauto_answer = true\nanswer_record = {}\n",
            quote(&recording.display().to_string())
        ));
    }
    extra
}

/// Writes the caller's speech: espeak-ng's voice if it is installed, else a
/// synthetic voiced signal (syllables on changing pitches with harmonics).
fn write_speech(path: &Path) -> anyhow::Result<&'static str> {
    let espeak = Command::new("espeak-ng")
        .arg("-w")
        .arg(path)
        .arg(SPEECH)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if espeak.is_ok_and(|s| s.success()) && path.exists() {
        return Ok("espeak-ng speech");
    }
    const RATE: u32 = 16_000;
    const SECS: f64 = 4.0;
    let samples: Vec<f32> = (0..(SECS * f64::from(RATE)) as usize)
        .map(|i| {
            let t = i as f64 / f64::from(RATE);
            let (syllable, pause) = (0.18, 0.09);
            let n = (t / (syllable + pause)).floor();
            let within = t - n * (syllable + pause);
            if within >= syllable {
                return 0.0;
            }
            let pitch = 110.0 + (n * 37.0) % 120.0;
            let envelope = (std::f64::consts::PI * within / syllable).sin().powi(2);
            let voiced: f64 = (1..=12)
                .map(|k| {
                    let k = f64::from(k);
                    (2.0 * std::f64::consts::PI * pitch * k * t).sin() / k
                })
                .sum();
            (0.25 * envelope * voiced) as f32
        })
        .collect();
    let resampled = peercall_media::wav::resample_to_48k(&samples, RATE)?;
    peercall_media::wav::write_wav(path, &peercall_media::wav::to_i16(&resampled))?;
    Ok("a synthetic voiced signal (espeak-ng is not installed)")
}

/// The summary, as printed with `--json`.
#[derive(Debug, Serialize)]
struct Summary {
    /// Every node, the seed first.
    nodes: Vec<NodeSummary>,
    /// Sessions seed-1 holds (the other seeds and the desktops it is a home of).
    sessions: usize,
    /// From starting the seed to the summary, in milliseconds.
    setup_ms: f64,
    /// The nodes' keepalive interval.
    keepalive_secs: u64,
    /// The temporary directory holding every node's data, config and log.
    temp_dir: String,
    /// Supernodes in the network: the seeds and the desktops the tier promoted.
    supernodes: usize,
    /// Promotions the tier decided (counted by the seeds).
    promotions: u64,
    /// Seconds from the desktops' start to the first promoted desktop reporting
    /// itself a supernode; none if no promotion was expected.
    promotion_s: Option<f64>,
    /// The desktop promoted.
    promoted: Option<String>,
    /// The call from desk-1 to desk-2: the fields of `peercall call --json`, and
    /// where desk-2's recording is.
    call: Option<crate::callcli::Summary>,
    /// Seconds into the call when desk-1 cut the direct path to desk-2.
    path_cut_at_s: Option<f64>,
    /// From the cut to the call's statistics showing another active path, ms (at
    /// the demo's polling resolution, [`SWITCH_POLL`]); none if it never switched.
    path_switch_ms: Option<u64>,
    /// The same call as desk-2 saw it (what desk-2 heard of desk-1).
    callee_call: Option<crate::callcli::Summary>,
}

/// What cutting the direct path did.
#[derive(Debug)]
struct PathCut {
    /// Seconds into the call.
    at_s: f64,
    /// Cut to switch seen, ms.
    switch_ms: Option<u64>,
    /// The callee's side of the call.
    callee: Option<crate::callcli::Summary>,
}

/// One line of a call's live status.
fn call_line(c: &crate::calls::CallBody) -> String {
    let p = c.active();
    format!(
        "{} via {}, RTT {}, loss {:.1} %, MOS {}, {} frames out / {} in, {} switches, {} ms concealed",
        c.state,
        c.path_kind.as_deref().unwrap_or("-"),
        p.and_then(|p| p.rtt_ms)
            .map_or("-".to_owned(), |r| format!("{r:.1} ms")),
        p.map_or(0.0, |p| p.loss * 100.0),
        c.mos_estimate.map_or("-".to_owned(), |m| format!("{m:.2}")),
        c.frames_sent,
        c.frames_received,
        c.path_switches,
        c.concealed_ms
    )
}

/// One node in the summary.
#[derive(Debug, Serialize)]
struct NodeSummary {
    name: String,
    role: &'static str,
    /// How a desktop met the seed: "IK" or "XX"; none for the seed.
    handshake: Option<&'static str>,
    pid: u32,
    fingerprint: String,
    user_id: String,
    peer_key: String,
    udp: String,
    admin: String,
    /// The Prometheus endpoint, while the network runs.
    metrics: String,
    data_dir: String,
    log: String,
    /// From spawning the process to its admin API being ready.
    ready_ms: f64,
    /// From ready to the session with the seed being established (desktops).
    session_up_ms: Option<f64>,
    /// Names of the peers it has sessions with.
    sessions: Vec<String>,
    handshakes_completed: u64,
    keepalives_sent: u64,
    keepalives_received: u64,
    datagrams_sent: u64,
    datagrams_received: u64,
    /// Datagrams dropped for any reason.
    dropped: u64,
    /// Datagrams its debug block list dropped (the demo's path cut).
    debug_blocked: u64,
    /// Behind an emulated NAT with an impaired link.
    nat: bool,
    /// What its `[emulate]` layer did.
    emulated: Emulated,
    /// Whether it is a supernode now (a seed, or a desktop the tier promoted).
    supernode: bool,
}

/// A node's `peercall_debug_emulated_*` counters.
#[derive(Debug, Default, Serialize)]
struct Emulated {
    /// Outbound datagrams held for the link's delay.
    delayed: u64,
    /// Outbound datagrams lost at random.
    lost: u64,
    /// Inbound datagrams the NAT filtered (from addresses not sent to).
    nat_filtered: u64,
    /// Delayed datagrams dropped for a full queue or a refused send.
    overflow: u64,
}

impl Emulated {
    fn of(text: &str) -> Emulated {
        let drops = |reason: &str| {
            counter(
                text,
                &format!("peercall_debug_emulated_drops_total{{reason=\"{reason}\"}}"),
            )
        };
        Emulated {
            delayed: counter(text, "peercall_debug_emulated_delayed_datagrams_total"),
            lost: drops("loss"),
            nat_filtered: drops("nat_filter"),
            overflow: drops("queue_full") + drops("send_failed"),
        }
    }
}

/// Where the demo's words go: stdout, or stderr when stdout carries the JSON.
struct Narrator {
    json: bool,
    start: Instant,
}

impl Narrator {
    fn new(json: bool) -> Narrator {
        Narrator {
            json,
            start: Instant::now(),
        }
    }

    /// A narrative line, stamped with the time since the demo started.
    fn say(&self, text: impl Display) {
        let t = self.start.elapsed().as_secs_f64();
        self.line(format!("[{t:6.2}s] {text}"));
    }

    /// A narrative line without a stamp.
    fn line(&self, text: impl Display) {
        // A closed pipe (`peercall demo | head`) must not abort the cleanup.
        if self.json {
            let _ = writeln!(std::io::stderr(), "{text}");
        } else {
            let _ = writeln!(std::io::stdout(), "{text}");
        }
    }

    /// A line on stdout whatever the mode (the JSON summary).
    fn stdout(&self, text: &str) {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{text}");
        let _ = stdout.flush();
    }

    fn table(&self, s: &Summary) {
        self.line("");
        self.line(format!(
            "{:<7} {:<9} {:<24} {:<3} {:<22} {:>10} {:>10} {:>7}  metrics (while running)",
            "node", "role", "fingerprint", "hs", "sessions", "keepalives", "session up", "dropped"
        ));
        self.line(format!(
            "{:<7} {:<9} {:<24} {:<3} {:<22} {:>10} {:>10} {:>7}",
            "", "", "", "", "", "out/in", "ms", ""
        ));
        for n in &s.nodes {
            self.line(format!(
                "{:<7} {:<9} {:<24} {:<3} {:<22} {:>10} {:>10} {:>7}  {}",
                n.name,
                if n.supernode && n.role != "supernode" {
                    "promoted"
                } else {
                    n.role
                },
                n.fingerprint,
                n.handshake.unwrap_or("-"),
                sessions_column(&n.sessions),
                format!("{}/{}", n.keepalives_sent, n.keepalives_received),
                n.session_up_ms
                    .map_or("-".to_owned(), |t| format!("{t:.1}")),
                n.dropped,
                n.metrics
            ));
        }
        let dropped: u64 = s.nodes.iter().map(|n| n.dropped).sum();
        self.line(format!(
            "\nthe network is up: {} sessions with seed-1, authenticated keepalives flowing, {dropped} datagrams dropped, {:.1} s from the first start",
            s.sessions,
            s.setup_ms / 1000.0
        ));
        self.line(format!(
            "{} supernodes, {} promotion(s){}",
            s.supernodes,
            s.promotions,
            match (&s.promoted, s.promotion_s) {
                (Some(name), Some(t)) => format!(": {name}, {t:.1} s after the desktops started"),
                _ => String::new(),
            }
        ));
        if let Some(c) = &s.call {
            self.line(format!(
                "call desk-1 -> desk-2: set-up {} ms, first audio {} ms, paths {}, switch {} after the cut, longest gap {} ms, MOS {}",
                opt_ms(c.setup_ms),
                opt_ms(c.first_audio_ms),
                c.paths_used.join(" then "),
                s.path_switch_ms
                    .map_or("never".to_owned(), |t| format!("{t} ms")),
                c.max_gap_ms,
                c.mos_estimate
                    .map_or("-".to_owned(), |m| format!("{m:.2}"))
            ));
        }
        self.line(format!(
            "each node's data, config and log are in {} while it runs",
            s.temp_dir
        ));
    }
}

/// The signals that stop the demo.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            hangup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
        })
    }

    /// The next signal's name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}

/// Width of the table's sessions column.
const SESSIONS_COLUMN: usize = 22;

/// The peers' names if they fit the column, else their number.
fn sessions_column(names: &[String]) -> String {
    let list = names.join(",");
    if list.len() <= SESSIONS_COLUMN {
        list
    } else {
        format!("{} peers", names.len())
    }
}

fn opt_ms(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn ms(d: Duration) -> String {
    format!("{:.1}", ms_f64(d))
}

fn ms_f64(d: Duration) -> f64 {
    // Rounded to 0.1 ms: finer would be noise from the polling.
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

fn read_addr(path: &Path) -> anyhow::Result<SocketAddr> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("could not read {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{} holds no socket address", path.display()))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// The value of one series in Prometheus text, 0 if absent.
fn counter(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
        // Counters are whole numbers far below 2^53.
        .map_or(0, |v| v as u64)
}

/// The sum of `peercall_dropped_datagrams_total` over every reason.
fn dropped_total(text: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with("peercall_dropped_datagrams_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

async fn get_status(admin: SocketAddr) -> anyhow::Result<StatusBody> {
    let body = http(admin, "GET", "/status", None).await?;
    serde_json::from_str(&body).with_context(|| format!("unexpected /status from {admin}"))
}

async fn get_metrics(admin: SocketAddr) -> anyhow::Result<String> {
    http(admin, "GET", "/metrics", None).await
}

/// One request to a node's admin API; the body of a 2xx answer.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<String> {
    let r = client::request(addr, method, path, token, None, HTTP_TIMEOUT).await?;
    if !r.is_success() {
        bail!("{method} {path} on {addr}: HTTP {}: {}", r.status, r.body);
    }
    Ok(r.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counters_and_sums_drops() {
        let text = "# HELP x y\n\
                    peercall_keepalives_sent_total 7\n\
                    peercall_keepalives_sent_total_extra 9\n\
                    peercall_dropped_datagrams_total{reason=\"replay\"} 2\n\
                    peercall_dropped_datagrams_total{reason=\"decrypt\"} 3\n";
        assert_eq!(counter(text, "peercall_keepalives_sent_total"), 7);
        assert_eq!(counter(text, "peercall_missing_total"), 0);
        assert_eq!(dropped_total(text), 5);
    }

    #[test]
    fn node_configs_load_as_the_node_loads_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a \"quoted\" \\ dir");
        let file = tmp.path().join("node.toml");
        let seed = "127.0.0.1:7600";
        let extra = format!(
            "{}[calls]\nmax_calls = 1\n",
            desktop_extra("desk-1", 1, 3, &dir)
        );
        std::fs::write(
            &file,
            node_config(&dir, "supernode", host(1), &[seed.to_owned()], &extra).unwrap(),
        )
        .unwrap();
        let sources = crate::config::Sources {
            file: Some(file.clone()),
            env: Vec::new(),
            flags: crate::config::Flags::default(),
            default_data_dir: None,
        };
        let settings = crate::config::load(&sources).unwrap();
        assert_eq!(settings.data_dir, dir);
        assert_eq!(settings.role.as_str(), "supernode");
        assert_eq!(settings.seeds.len(), 1);
        assert_eq!(settings.seeds[0].to_string(), seed);
        assert_eq!(settings.keepalive_secs.get(), KEEPALIVE_SECS);
        assert_eq!(settings.session_timeout_secs.get(), SESSION_TIMEOUT_SECS);
        assert_eq!(settings.listen, "127.80.0.1:0".parse().unwrap());
        assert_eq!(settings.supernode_max_clients.get(), 3);
        assert_eq!(settings.election.min_uptime, Duration::ZERO);
        assert_eq!(settings.emulate.delay_ms, LINK_DELAY_MS);
        assert_eq!(settings.emulate.nat, crate::netem::NatMode::PortRestricted);
        assert!(settings.debug_endpoints);

        for extra in [seed_extra(3), desktop_extra("desk-3", 3, 3, &dir)] {
            std::fs::write(
                &file,
                node_config(&dir, "auto", host(11), &[], &extra).unwrap(),
            )
            .unwrap();
            let settings = crate::config::load(&sources).unwrap();
            assert!(settings.seeds.is_empty());
            assert_eq!(settings.role.as_str(), "auto");
            assert!(!settings.emulate.is_active());
        }
        std::fs::write(
            &file,
            node_config(
                &dir,
                "auto",
                host(12),
                &[],
                &desktop_extra("desk-2", 2, 3, &dir),
            )
            .unwrap(),
        )
        .unwrap();
        let settings = crate::config::load(&sources).unwrap();
        assert!(settings.calls.auto_answer && settings.emulate.is_active());
    }

    #[test]
    fn seeds_are_sized_for_one_promotion() {
        // Four desktops: 8 attachments to 9 places, a load of 0.89.
        assert_eq!(seed_capacity(4), 3);
        for desktops in 1..=MAX_DESKTOPS {
            let places = seed_capacity(desktops) * u32::from(SEEDS);
            let load = f64::from(u32::from(desktops) * HOMES_PER_DESKTOP) / f64::from(places);
            assert!(load <= 1.0, "{desktops}: every desktop finds its homes");
            if desktops >= 4 {
                assert!(load > 0.8, "{desktops}: above the high watermark");
            }
        }
    }
}
