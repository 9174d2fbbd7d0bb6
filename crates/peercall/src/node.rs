//! `peercall node`: run a node until SIGINT, SIGTERM or `POST /v1/shutdown`.
//!
//! Start-up order: settings, logging, data directory (lock, identity, admin token,
//! host cache, contacts), UDP socket (`udp.addr`), admin listener, signal handlers,
//! and last `admin.addr`: once that file exists the node is ready and answers on
//! both addresses. A host cache or contacts file that does not load is renamed
//! aside with a warning; the node starts without it.
//!
//! The overlay is configured from the settings: the handle, capacity, election and
//! record keys; the host cache (tried before the seeds); the local endpoints (see
//! `crate::resources`); the bandwidth from config and the CPU headroom measured
//! every [`CPU_SAMPLE_INTERVAL`].
//!
//! Shutdown: the engine closes its sessions and sends the goodbyes (an ordinary
//! node publishes a signed offline record, a supernode hands its share off), event
//! streams end, the admin server stops, the host cache and contacts are saved, the
//! address files are removed, and the process exits 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use peercall_engine::{CachedHost, Config as EngineConfig, Node, Resources};
use rand::rngs::OsRng;
use rand_core::RngCore;
use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::admin::{self, AdminState, AdminToken};
use crate::book::{ContactBook, MAX_CONTACTS_FILE};
use crate::clock::Clock;
use crate::config::{self, Flags, Settings, Sources};
use crate::events::EventBus;
use crate::hosts::{self, MAX_HOSTS_FILE};
use crate::logging::{self, LogArgs};
use crate::metrics::Metrics;
use crate::persist::Persister;
use crate::resources::{self, CpuSampler};
use crate::runtime::{self, AnswerMedia, Command, Engine, UserState};
use crate::store::{
    ADMIN_ADDR_FILE, ADMIN_TOKEN_FILE, CONTACTS_FILE, DataDir, HOSTS_FILE, UDP_ADDR_FILE,
};

/// Commands queued for the engine task before senders wait. Admin requests are few;
/// this only absorbs bursts (a scrape racing a connect).
const COMMAND_QUEUE: usize = 64;
/// UDP socket buffers asked for, each way: a relay forwarding 100,000 packets a
/// second fills the kernel's default (about 200 KiB, a few hundred packets) in a
/// couple of milliseconds of descheduling; 4 MiB rides out tens of milliseconds.
/// The kernel caps it at `net.core.rmem_max` / `wmem_max`.
const UDP_SOCKET_BUFFER: usize = 4 << 20;
/// How long in-flight admin requests may take to finish once the engine has stopped.
const ADMIN_DRAIN: Duration = Duration::from_secs(2);
/// How often CPU headroom is measured for the election: often enough to follow a
/// host getting busy within the election's minute-scale pacing, rarely enough to
/// cost nothing.
pub const CPU_SAMPLE_INTERVAL: Duration = Duration::from_secs(10);

/// Arguments of `peercall node`.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// TOML config file (see configs/default.toml); without it, the defaults apply.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (overrides `data_dir`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// UDP address to listen on (overrides `listen`).
    #[arg(long, value_name = "UDP_ADDR")]
    pub listen: Option<SocketAddr>,
    /// Admin HTTP address, loopback only (overrides `admin`).
    #[arg(long, value_name = "HTTP_ADDR")]
    pub admin: Option<SocketAddr>,
}

/// Runs `peercall node`.
pub fn run(log: &LogArgs, args: NodeArgs) -> anyhow::Result<()> {
    let flags = Flags {
        data_dir: args.data_dir,
        listen: args.listen,
        admin: args.admin,
        log_format: log.log_format,
        log_level: log.log_level,
    };
    let settings = config::load(&Sources::from_process(args.config, flags))?;
    logging::init(settings.log_format, settings.log_level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(run_node(settings))
}

/// Loads a state file with `parse`; one that does not load (or cannot be read) is
/// renamed aside with a warning and counted, and `None` is returned, so the node
/// starts without it and never overwrites the evidence.
fn load_state<T, E: std::fmt::Display>(
    dir: &DataDir,
    name: &str,
    max_len: usize,
    metrics: &Metrics,
    parse: impl FnOnce(&[u8]) -> Result<T, E>,
) -> anyhow::Result<Option<T>> {
    let problem = match dir.read_private(name, max_len) {
        Ok(None) => return Ok(None),
        Ok(Some(bytes)) => match parse(&bytes) {
            Ok(v) => return Ok(Some(v)),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = dir
        .set_aside(name, unix)
        .with_context(|| format!("{name} does not load ({problem}) and could not be set aside"))?;
    metrics.state_files_set_aside.inc();
    warn!(
        file = name,
        problem = %problem,
        kept_as = %aside.display(),
        "state file does not load; set aside, starting without it"
    );
    Ok(None)
}

async fn run_node(settings: Settings) -> anyhow::Result<()> {
    let dir = Arc::new(DataDir::open(&settings.data_dir)?);
    if let Some(mode) = dir.tightened {
        warn!(dir = %dir.path().display(), "data directory had mode {mode:04o}; made it 0700");
    }
    // Stale files from a crash must not point anyone at a dead node.
    dir.remove(ADMIN_ADDR_FILE)?;
    dir.remove(UDP_ADDR_FILE)?;

    let (identity, created) = dir.load_or_create_identity(&mut OsRng)?;
    info!(
        user = %identity.user_id().fingerprint(),
        created,
        role = settings.role.as_str(),
        "identity loaded"
    );
    let identity_user = identity.user_id();
    let token = AdminToken::generate(&mut OsRng);
    dir.write(ADMIN_TOKEN_FILE, token.as_str().as_bytes())?;

    let clock = Clock::start();
    let metrics = Arc::new(Metrics::new(clock.started()).context("metrics registry")?);
    let host_cache: Vec<CachedHost> =
        load_state(&dir, HOSTS_FILE, MAX_HOSTS_FILE, &metrics, hosts::parse)?.unwrap_or_default();
    let book = load_state(
        &dir,
        CONTACTS_FILE,
        MAX_CONTACTS_FILE,
        &metrics,
        ContactBook::parse,
    )?
    .unwrap_or_default();
    info!(
        supernodes = host_cache.len(),
        contacts = book.len(),
        "state loaded"
    );

    let socket = UdpSocket::bind(settings.listen)
        .await
        .with_context(|| format!("could not bind UDP {}", settings.listen))?;
    let udp_local = socket.local_addr().context("UDP socket address")?;
    dir.write_addr(UDP_ADDR_FILE, udp_local)?;

    let mut engine_config = EngineConfig::new(identity, os_seed());
    engine_config.role = settings.role;
    engine_config.seeds = runtime::resolve_seeds(&settings.seeds, udp_local).await;
    engine_config.keepalive_interval = settings.keepalive();
    engine_config.session_timeout = settings.session_timeout();
    engine_config.overlay = settings.overlay_config();
    engine_config.calls = settings.calls.call_config();
    engine_config.relay = settings.relay.clone();
    let answer_media = answer_media(&settings)?;
    engine_config.overlay.host_cache = host_cache;
    engine_config.overlay.local_addrs =
        resources::local_endpoints(&settings.local_addrs, udp_local);
    info!(
        local_endpoints = engine_config.overlay.local_addrs.len(),
        handle = settings.handle.as_ref().map_or("", |h| h.as_str()),
        "overlay configured"
    );
    tracing::debug!(endpoints = ?engine_config.overlay.local_addrs, "local endpoints");
    let node = Node::new(engine_config, clock.now());
    #[cfg(feature = "webrtc")]
    let webrtc = {
        let webrtc = crate::webrtc::WebRtc::new(udp_local, &clock, os_seed())
            .context("could not start the WebRTC gateway")?;
        info!(candidate = %crate::webrtc::candidate_for(udp_local), "WebRTC gateway ready");
        webrtc
    };

    let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let events = Arc::new(EventBus::new());
    let (stopping_tx, stopping) = watch::channel(false);
    let listener = TcpListener::bind(settings.admin.get())
        .await
        .with_context(|| format!("could not bind admin HTTP {}", settings.admin.get()))?;
    let admin_local = listener.local_addr().context("admin socket address")?;
    let interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;

    let debug_block = settings
        .debug_endpoints
        .then(|| Arc::new(crate::udp::BlockList::new(metrics.debug_blocked.clone())));
    if debug_block.is_some() {
        tracing::warn!("debug endpoints on: POST /v1/debug/block can cut this node's traffic");
    }
    let emulator = settings.emulate.is_active().then(|| {
        let e = &settings.emulate;
        // Seed 0 asks for a random one; the one used is logged, so the run can be
        // repeated with `emulate.seed`.
        let seed = match e.seed {
            0 => OsRng.next_u64(),
            seed => seed,
        };
        tracing::warn!(
            delay_ms = e.delay_ms,
            jitter_ms = e.jitter_ms,
            loss_pct = f64::from(e.loss_ppm) / 10_000.0,
            peers = e.peers.len(),
            nat = e.nat.as_str(),
            nat_timeout_secs = e.nat_timeout_secs,
            seed,
            "network emulation on ([emulate]): this node's UDP traffic is impaired on purpose"
        );
        crate::netem::LinkEmulator::new(e, seed, metrics.emulate.clone())
    });
    let state = Arc::new(AdminState {
        commands: commands.clone(),
        token,
        metrics: metrics.clone(),
        clock,
        udp_local,
        handle: settings.handle.clone(),
        user_id: Some(identity_user),
        events: events.clone(),
        stopping,
        debug_block: debug_block.clone(),
    });
    let (stop_admin, admin_stopped) = oneshot::channel::<()>();
    let admin_task = tokio::spawn(admin::serve(listener, state, async {
        let _ = admin_stopped.await;
    }));
    let signal_task = tokio::spawn(forward_signals(interrupt, terminate, commands.clone()));
    let sampler_task = tokio::spawn(sample_resources(
        settings.bandwidth_kbps,
        commands,
        metrics.clone(),
    ));

    dir.write_addr(ADMIN_ADDR_FILE, admin_local)?;
    info!(udp = %udp_local, admin = %admin_local, "node ready");
    info!("call page at http://{admin_local}/ (`peercall page` prints a signed-in link)");

    let user = UserState {
        book,
        events,
        persister: Persister::start(dir.clone(), metrics.clone()),
        save_interval: settings.state_save(),
        answer_media,
    };
    // The engine runs on its own thread with a single-threaded runtime: the thread
    // that waits in epoll for the socket runs the engine itself, so a datagram costs
    // no wake-up of another thread (on the shared runtime, a worker found the socket
    // readable and woke the engine's task elsewhere, which cost more than relaying).
    let socket = socket.into_std().context("UDP socket")?;
    let (done_tx, done_rx) = oneshot::channel();
    let parts = EngineParts {
        node,
        socket,
        clock,
        commands: command_rx,
        metrics,
        user,
        debug_block,
        emulator,
        #[cfg(feature = "webrtc")]
        webrtc,
    };
    let engine_thread = std::thread::Builder::new()
        .name("peercall-engine".into())
        .spawn(move || {
            // The receiver waits below; it is gone only if this task was dropped.
            let _ = done_tx.send(parts.run());
        })
        .context("could not start the engine thread")?;
    let last = done_rx
        .await
        .context("the engine thread stopped without a result")??;
    if engine_thread.join().is_err() {
        warn!("the engine thread panicked after it finished");
    }

    // Event streams end, so the admin server's graceful shutdown does not wait on
    // them.
    let _ = stopping_tx.send(true);
    let _ = stop_admin.send(());
    sampler_task.abort();
    match tokio::time::timeout(ADMIN_DRAIN, admin_task).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "admin server failed"),
        Err(_) => warn!("admin requests still running at shutdown; dropped"),
        _ => {}
    }
    signal_task.abort();
    // Queued saves first, then the final state, in that order.
    last.persister.finish().await;
    for (name, bytes) in [(HOSTS_FILE, &last.hosts), (CONTACTS_FILE, &last.contacts)] {
        if let Err(e) = dir.write(name, bytes) {
            error!(file = name, error = %e, "could not save state at shutdown");
        }
    }
    dir.remove(ADMIN_ADDR_FILE)?;
    dir.remove(UDP_ADDR_FILE)?;
    info!("stopped");
    Ok(())
}

/// What the engine thread is made of.
struct EngineParts {
    node: Node,
    socket: std::net::UdpSocket,
    clock: Clock,
    commands: mpsc::Receiver<Command>,
    metrics: Arc<Metrics>,
    user: UserState,
    /// The debug block list (`debug_endpoints`).
    debug_block: Option<Arc<crate::udp::BlockList>>,
    /// The link and NAT emulator (`[emulate]`).
    emulator: Option<crate::netem::LinkEmulator>,
    #[cfg(feature = "webrtc")]
    webrtc: crate::webrtc::WebRtc,
}

impl EngineParts {
    /// Runs the engine to its end on this thread, on a runtime of its own.
    fn run(self) -> anyhow::Result<runtime::Final> {
        // Sockets and timers only: the signal and process drivers would be polled at
        // every park for nothing (signals are the main runtime's).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .context("could not start the engine's runtime")?;
        rt.block_on(async move {
            let socket = UdpSocket::from_std(self.socket).context("UDP socket")?;
            let socket =
                crate::udp::BatchSocket::new(socket).context("could not set up the UDP socket")?;
            socket.set_buffers(UDP_SOCKET_BUFFER);
            let socket = match self.debug_block {
                Some(block) => socket.with_block_list(block),
                None => socket,
            };
            let socket = match self.emulator {
                Some(emulator) => socket.with_emulator(emulator),
                None => socket,
            };
            let engine = Engine::new(
                self.node,
                socket,
                self.clock,
                self.commands,
                self.metrics,
                self.user,
            );
            #[cfg(feature = "webrtc")]
            let engine = engine.with_webrtc(self.webrtc);
            Ok(engine.run().await)
        })
    }
}

/// Loads the auto-answer files (`calls.answer_play`, `calls.answer_record`):
/// a WAV that does not load, or a recording directory that does not exist, stops
/// start-up with the key named.
fn answer_media(settings: &Settings) -> anyhow::Result<AnswerMedia> {
    let play = match &settings.calls.answer_play {
        Some(path) => Some(
            crate::calls::Playback::load(path)
                .with_context(|| "config key 'calls.answer_play': cannot play this file")?,
        ),
        None => None,
    };
    if let Some(path) = &settings.calls.answer_record {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        if !dir.is_dir() {
            anyhow::bail!(
                "config key 'calls.answer_record': the directory {} does not exist",
                dir.display()
            );
        }
    }
    if settings.calls.auto_answer {
        info!(
            play = settings.calls.answer_play.is_some(),
            record = settings.calls.answer_record.is_some(),
            "calls are answered automatically"
        );
    }
    Ok(AnswerMedia {
        play,
        record: settings.calls.answer_record.clone(),
    })
}

/// Measures CPU headroom every [`CPU_SAMPLE_INTERVAL`] and hands it, with the
/// configured bandwidth, to the engine for the election.
async fn sample_resources(
    bandwidth_kbps: u32,
    commands: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
) {
    let mut sampler = CpuSampler::new();
    let mut tick = tokio::time::interval(CPU_SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tick.tick().await;
        let first = sampler.sample_proc();
        let Some(cpu_headroom_pct) = first else {
            // The first reading only sets the baseline; later ones fail only where
            // /proc is missing, and then the node offers no headroom.
            if !warned && std::fs::metadata("/proc/stat").is_err() {
                warn!("no /proc/stat: CPU headroom unknown, this node will not be promoted");
                warned = true;
            }
            continue;
        };
        metrics.cpu_headroom.set(i64::from(cpu_headroom_pct));
        let resources = Resources {
            bandwidth_kbps,
            cpu_headroom_pct,
        };
        if !runtime::send(&commands, Command::SetResources(resources)).await {
            return;
        }
    }
}

/// The engine's RNG seed, from the operating system.
fn os_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    seed
}

/// Turns the first SIGINT or SIGTERM into a graceful shutdown; a second one while
/// shutting down exits at once.
async fn forward_signals(
    mut interrupt: Signal,
    mut terminate: Signal,
    commands: mpsc::Sender<Command>,
) {
    let name = tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    info!(signal = name, "shutting down");
    runtime::send(&commands, Command::Shutdown).await;
    tokio::select! {
        _ = interrupt.recv() => {},
        _ = terminate.recv() => {},
    }
    warn!("second signal: exiting without waiting");
    std::process::exit(1);
}
