//! `posfleet-control-plane`: parses the configuration, sets up logging, binds
//! the listeners and serves until SIGTERM or SIGINT.

use clap::Parser;
use posfleet_control_plane::ControlPlane;
use posfleet_control_plane::config::{Args, Config};
use posfleet_runtime::{init_tracing, shutdown_signal};
use std::process::ExitCode;

/// Exit code for a configuration error (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("posfleet-control-plane: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(&config.log_level, config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("posfleet-control-plane: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "The control plane stopped on an error."
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let bind = |address: String| async move {
        tokio::net::TcpListener::bind(&address)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {address}: {e}"))
    };
    let grpc = bind(config.grpc_listen_address.clone()).await?;
    let http = bind(config.http_listen_address.clone()).await?;
    let control_plane = ControlPlane::open(config).await?;
    control_plane.serve(grpc, http, shutdown_signal()).await?;
    Ok(())
}
