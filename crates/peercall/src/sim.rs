//! `peercall sim`: the overlay at scale, by simulation. Thousands of real engine
//! nodes on the virtual clock and the network emulator (`peercall_sim::scale` has
//! the scenario); this module adds what only an IO crate may read: wall-clock time
//! and the process's peak memory.

use std::time::{Duration, Instant};

use anyhow::Context;
use peercall_sim::scale::{self, Progress, ScaleOptions, ScaleReport};
use serde::Serialize;

/// Arguments of `peercall sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Nodes in all, seed supernodes included.
    #[arg(long, default_value_t = 2_000)]
    pub nodes: usize,
    /// Simulation seed; the same seed and options replay the same run.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Simulated seconds.
    #[arg(long, default_value_t = 120)]
    pub duration: u64,
    /// Percent of the nodes that leave (and later return) per simulated minute.
    #[arg(long, alias = "churn-per-min", default_value_t = 0.0)]
    pub churn: f64,
    /// Simulated seconds before measurements start (default: a quarter of the
    /// duration).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Percent of the supernodes that crash at once, at half the duration.
    #[arg(long, default_value_t = 0.0)]
    pub kill_supernodes: f64,
    /// Percent of the ordinary nodes that restart at once, at half the duration.
    #[arg(long, default_value_t = 0.0)]
    pub restart_storm: f64,
    /// Lookups per simulated second, all nodes together (default: one per 500
    /// nodes, at least 10).
    #[arg(long)]
    pub lookups_per_s: Option<f64>,
    /// Pinned seed supernodes (default: one per 100 nodes, at least 3).
    #[arg(long)]
    pub seeds: Option<usize>,
    /// Random loss on every path, as a fraction.
    #[arg(long)]
    pub loss: Option<f64>,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The report with the process figures the simulator cannot read itself.
#[derive(Debug, Serialize)]
struct Output {
    #[serde(flatten)]
    report: ScaleReport,
    /// Peak resident memory of this process (VmHWM), MiB.
    peak_rss_mb: f64,
    /// Wall-clock seconds the run took.
    wall_s: f64,
}

/// Progress lines every this many simulated seconds.
const PROGRESS_EVERY_S: f64 = 5.0;

/// Runs the scenario and prints its report.
pub fn run(args: SimArgs) -> anyhow::Result<()> {
    let mut opts = ScaleOptions::new(args.nodes, args.seed, Duration::from_secs(args.duration));
    opts.churn_pct_per_min = args.churn;
    opts.kill_supernodes_pct = args.kill_supernodes;
    opts.restart_storm_pct = args.restart_storm;
    if let Some(r) = args.lookups_per_s {
        opts.lookups_per_s = r;
    }
    if let Some(w) = args.warmup {
        opts.warmup = Duration::from_secs(w);
    }
    if let Some(s) = args.seeds {
        opts.seeds = s;
    }
    if let Some(l) = args.loss {
        opts.loss = l;
    }
    let started = Instant::now();
    let quiet = args.quiet;
    let mut last = f64::NEG_INFINITY;
    let mut progress = |p: &Progress| {
        if quiet || p.sim_s - last < PROGRESS_EVERY_S {
            return;
        }
        last = p.sim_s;
        eprintln!(
            "sim t={:.0}s wall={:.1}s online={} supernodes={} load={:.2} homes={:?} lookups={} found={} events={} rss={:.0}MiB",
            p.sim_s,
            started.elapsed().as_secs_f64(),
            p.online,
            p.supernodes,
            p.mean_load,
            p.homes,
            p.lookups,
            p.found,
            p.events,
            peak_rss_mb().unwrap_or(0.0)
        );
    };
    let report = scale::run(&opts, &mut progress).context("running the scale scenario")?;
    let out = Output {
        report,
        peak_rss_mb: peak_rss_mb().unwrap_or(f64::NAN),
        wall_s: started.elapsed().as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// Peak resident set size (`VmHWM` in /proc/self/status), MiB; `None` where the
/// file is missing (not Linux).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
