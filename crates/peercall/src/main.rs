//! The peercall command line.

mod media_eval;

use clap::Parser;

/// peercall: a peer-to-peer voice network.
#[derive(Debug, Parser)]
#[command(name = "peercall", version, about)]
enum Cli {
    /// Run a WAV file through the audio pipeline over a simulated network.
    MediaEval(media_eval::MediaEvalArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse() {
        Cli::MediaEval(args) => media_eval::run(args),
    }
}
