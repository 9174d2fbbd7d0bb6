//! `peercall`: the peer-to-peer voice node and its command-line tools.
//!
//! This crate is the only one that does IO (sockets, tasks, the clock, OS
//! randomness); the protocol lives in the sans-IO `peercall_engine::Node`, which
//! [`runtime`] drives. `main` only dispatches: each subcommand is its own module with
//! an `Args` struct and a `run` function.

mod admin;
mod bench;
mod book;
mod callcli;
mod calls;
mod cli;
mod client;
mod clock;
mod config;
mod contact;
mod demo;
mod events;
mod hosts;
mod logging;
mod media_eval;
mod metrics;
mod netem;
mod node;
mod page;
mod persist;
mod resources;
mod runtime;
mod sim;
mod store;
mod udp;
#[cfg(feature = "webrtc")]
mod webrtc;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// peercall: a peer-to-peer voice network node.
#[derive(Debug, Parser)]
#[command(name = "peercall", version)]
struct Cli {
    #[command(flatten)]
    log: logging::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: UDP peer traffic plus the loopback admin API, until SIGINT/SIGTERM.
    Node(node::NodeArgs),
    /// Start a small network on loopback (a seed supernode and desktop nodes, each a
    /// real `peercall node` process), show it working, and clean up.
    Demo(demo::DemoArgs),
    /// Look a user up in the global directory through the local node: prints the
    /// record's fingerprint, endpoints and home supernodes.
    Lookup(cli::LookupArgs),
    /// Show the local node's status: role, home supernodes, attached clients,
    /// directory share, sessions.
    Status(cli::StatusArgs),
    /// List, add or remove contacts (pinned by user id; presence is followed).
    Contacts(cli::ContactsArgs),
    /// Call a user through the local node: live status, hang-up after --duration or
    /// on Ctrl-C, then a summary (--json: one object on stdout).
    Call(callcli::CallArgs),
    /// Wait for the next incoming call on the local node and answer it.
    Answer(callcli::AnswerArgs),
    /// Print a link that opens the local node's call page in a browser, signed in.
    Page(cli::PageArgs),
    /// Load tools: `bench relay` drives voice streams through a relay process.
    Bench(bench::BenchArgs),
    /// Run a WAV file through the audio pipeline over a simulated network.
    MediaEval(media_eval::MediaEvalArgs),
    /// Simulate the overlay at scale (real nodes on a virtual clock and an emulated
    /// network) and report lookups, presence, supernode load and traffic.
    Sim(sim::SimArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Node(args) => node::run(&cli.log, args),
        Command::Demo(args) => demo::run(&cli.log, args),
        Command::Lookup(args) => cli::lookup(args),
        Command::Status(args) => cli::status(args),
        Command::Contacts(args) => cli::contacts(args),
        Command::Page(args) => cli::page(args),
        Command::MediaEval(args) => media_eval::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Sim(args) => sim::run(args),
        Command::Call(args) => callcli::call(args),
        Command::Answer(args) => callcli::answer(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peercall: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
