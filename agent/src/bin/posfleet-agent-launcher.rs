//! `posfleet-agent-launcher`: runs the till's agent as its child (the
//! version `current` names, else the factory one), restarts it, and takes
//! back a new agent version that does not confirm itself in time. See
//! `posfleet_agent::selfupdate`.

use clap::Parser;
use posfleet_agent::selfupdate::{DEFAULT_FACTORY_AGENT, LauncherConfig, run_launcher};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code for a configuration error (EX_USAGE), as the agent's.
const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "posfleet-agent-launcher",
    version,
    about = "Runs the posfleet agent and switches between its versions safely."
)]
struct Args {
    /// The agent's TOML configuration file (passed on to the agent).
    #[arg(long)]
    config: PathBuf,
    /// The agent the package installed, run while no version is current.
    #[arg(long, default_value = DEFAULT_FACTORY_AGENT)]
    factory_agent: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match LauncherConfig::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("posfleet-agent-launcher: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    posfleet_runtime::init_tracing(&config.log_level, config.log_format);
    // One thread: the agent is its child, and a child asked to die with its
    // parent dies when the thread that started it ends.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("posfleet-agent-launcher: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_launcher(&args.config, &config, &args.factory_agent)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "The launcher stopped.");
            ExitCode::FAILURE
        }
    }
}
