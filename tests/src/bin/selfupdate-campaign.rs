//! selfupdate-campaign: a till updates its own agent release after release
//! (every fourth one a bad release that never reaches the control plane)
//! and its launcher, its agent or both are killed with SIGKILL at a random
//! moment of each update. Checks after every kill that `current` names a
//! whole agent, that one agent runs once the launcher is started again,
//! and that the till settles (the new version confirmed, or reverted to
//! the one before, as the control plane shows). Figures go to a JSON file;
//! the exit status is non-zero if any trial failed.
//!
//!     cargo run --release -p posfleet-e2e --bin selfupdate-campaign -- --trials 60

use clap::Parser;
use posfleet_e2e::selfupdate::{self, Options};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(about = "Kill the launcher and the agent at random moments of the agent's own updates.")]
struct Args {
    #[arg(long, default_value_t = 60)]
    trials: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// `agent_update_confirm_seconds` of the till.
    #[arg(long, default_value_t = 10)]
    confirm_seconds: u64,
    /// Every N-th release never reaches the control plane (0: none).
    #[arg(long, default_value_t = 4)]
    bad_every: usize,
    #[arg(long, default_value = "benchmarks/selfupdate-campaign.json")]
    output: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let report = selfupdate::campaign(&Options {
        trials: args.trials,
        seed: args.seed,
        confirm_seconds: args.confirm_seconds,
        bad_every: args.bad_every,
    });
    println!("{}", posfleet_e2e::write_figures(&args.output, &report)?);
    anyhow::ensure!(
        report.failures.is_empty() && report.converged == report.trials,
        "{} of {} trials failed",
        report.failures.len(),
        report.trials
    );
    Ok(())
}
