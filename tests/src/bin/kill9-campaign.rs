//! kill9-campaign: kills a till's agent with SIGKILL in every phase of its
//! installs in turn (the phase chosen first, then a random moment inside
//! it), release after release, and checks after every kill that one whole
//! version is active and after every restart that the agent converges.
//! Figures go to a JSON file; the exit status is non-zero if any trial
//! failed.
//!
//!     cargo run --release -p posfleet-e2e --bin kill9-campaign -- --trials 100

use clap::Parser;
use posfleet_e2e::kill9::{self, Options};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(about = "Kill the agent at random points of its installs and check what is left.")]
struct Args {
    #[arg(long, default_value_t = 100)]
    trials: usize,
    /// Incompressible bytes in each release.
    #[arg(long, default_value_t = 8 << 20)]
    payload_bytes: usize,
    /// How long each release's health check takes.
    #[arg(long, default_value_t = 0.5)]
    health_seconds: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value = "benchmarks/kill9-campaign.json")]
    output: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let report = kill9::run(&Options {
        trials: args.trials,
        payload_bytes: args.payload_bytes,
        health_seconds: args.health_seconds,
        seed: args.seed,
    });
    println!("{}", posfleet_e2e::write_figures(&args.output, &report)?);
    anyhow::ensure!(
        report.torn == 0 && report.converged == report.trials,
        "{} of {} trials failed",
        report.trials - report.converged + report.torn,
        report.trials
    );
    Ok(())
}
