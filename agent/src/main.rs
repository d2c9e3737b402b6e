//! `posfleet-agent`: parses the configuration, sets up logging and runs the
//! agent until SIGTERM or SIGINT.

use clap::Parser;
use posfleet_agent::config::{AgentConfig, Args};
use posfleet_agent::selfupdate::{self, EXIT_SWITCHED, Launched};
use posfleet_agent::{Agent, Error};
use posfleet_runtime::{init_tracing_with, shutdown_signal};
use std::process::ExitCode;

/// Exit code for a configuration error (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    // `posfleet-agent signal LINE...`: the point-of-sale program's reports.
    let mut argv = std::env::args_os().skip(1);
    if argv.next().is_some_and(|first| first == "signal") {
        return posfleet_agent::signals::command::main(argv);
    }
    let args = Args::parse();
    let config = match AgentConfig::load(&args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("posfleet-agent: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Started by posfleet-agent-launcher: die with it, and wait for any
    // agent still holding the agent root to end.
    let launched = Launched::from_env();
    let _agent_lock = match &launched {
        Some(launched) => match selfupdate::attach_to_launcher(launched, &config.data_dir) {
            Ok(lock) => Some(lock),
            Err(error) => {
                eprintln!("posfleet-agent: {error}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    // The agent's own lines also go to its log store (logs on demand).
    let (capture, captured) = posfleet_agent::logs::capture();
    init_tracing_with(
        &config.log_level,
        config.log_format,
        Some(Box::new(capture)),
    );
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("posfleet-agent: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let agent = Agent::open(config)?
            .with_log_capture(captured)
            .with_launcher(launched);
        agent.run(shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::AgentSwitched { version }) => {
            tracing::info!(version = %version, "Switched to a new agent version; exiting so that the launcher starts it.");
            ExitCode::from(EXIT_SWITCHED)
        }
        Err(error) => {
            tracing::error!(error = %error, "The agent stopped.");
            ExitCode::FAILURE
        }
    }
}
