//! `peercall node`: run a node until SIGINT, SIGTERM or `POST /v1/shutdown`.
//!
//! Start-up order: settings, logging, data directory (lock, identity, admin token),
//! UDP socket (`udp.addr`), admin listener, signal handlers, and last `admin.addr`:
//! once that file exists the node is ready and answers on both addresses.
//! Shutdown: the engine closes its sessions and sends the goodbyes, the admin server
//! stops, the address files are removed, and the process exits 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use peercall_engine::{Config as EngineConfig, Node};
use rand::rngs::OsRng;
use rand_core::RngCore;
use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::admin::{self, AdminState, AdminToken};
use crate::clock::Clock;
use crate::config::{self, Flags, Settings, Sources};
use crate::logging::{self, LogArgs};
use crate::metrics::Metrics;
use crate::runtime::{self, Command, Engine};
use crate::store::{ADMIN_ADDR_FILE, ADMIN_TOKEN_FILE, DataDir, UDP_ADDR_FILE};

/// Commands queued for the engine task before senders wait. Admin requests are few;
/// this only absorbs bursts (a scrape racing a connect).
const COMMAND_QUEUE: usize = 64;
/// How long in-flight admin requests may take to finish once the engine has stopped.
const ADMIN_DRAIN: Duration = Duration::from_secs(2);

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

async fn run_node(settings: Settings) -> anyhow::Result<()> {
    let dir = DataDir::open(&settings.data_dir)?;
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
    let token = AdminToken::generate(&mut OsRng);
    dir.write(ADMIN_TOKEN_FILE, token.as_str().as_bytes())?;

    let clock = Clock::start();
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
    let node = Node::new(engine_config, clock.now());
    #[cfg(feature = "webrtc")]
    let webrtc = {
        let webrtc = crate::webrtc::WebRtc::new(udp_local, &clock, os_seed())
            .context("could not start the WebRTC gateway")?;
        info!(candidate = %crate::webrtc::candidate_for(udp_local), "WebRTC gateway ready");
        webrtc
    };

    let metrics = Arc::new(Metrics::new(clock.started()).context("metrics registry")?);
    let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let listener = TcpListener::bind(settings.admin.get())
        .await
        .with_context(|| format!("could not bind admin HTTP {}", settings.admin.get()))?;
    let admin_local = listener.local_addr().context("admin socket address")?;
    let interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;

    let state = Arc::new(AdminState {
        commands: commands.clone(),
        token,
        metrics: metrics.clone(),
        clock,
        udp_local,
    });
    let (stop_admin, admin_stopped) = oneshot::channel::<()>();
    let admin_task = tokio::spawn(admin::serve(listener, state, async {
        let _ = admin_stopped.await;
    }));
    let signal_task = tokio::spawn(forward_signals(interrupt, terminate, commands));

    dir.write_addr(ADMIN_ADDR_FILE, admin_local)?;
    info!(udp = %udp_local, admin = %admin_local, "node ready");

    let engine = Engine::new(node, socket, clock, command_rx, metrics);
    #[cfg(feature = "webrtc")]
    let engine = engine.with_webrtc(webrtc);
    // The engine runs here, on this task: it owns the node until shutdown.
    engine.run().await;

    // Nothing of the engine's needs saving yet; later state (host cache, contacts)
    // is written here through `DataDir::write`, atomically.
    let _ = stop_admin.send(());
    match tokio::time::timeout(ADMIN_DRAIN, admin_task).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "admin server failed"),
        Err(_) => warn!("admin requests still running at shutdown; dropped"),
        _ => {}
    }
    signal_task.abort();
    dir.remove(ADMIN_ADDR_FILE)?;
    dir.remove(UDP_ADDR_FILE)?;
    info!("stopped");
    Ok(())
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
