//! `posfleet-control-plane`: parses the configuration, sets up logging, binds
//! the listeners and serves until SIGTERM or SIGINT.

use clap::Parser;
use posfleet_control_plane::ControlPlane;
use posfleet_control_plane::config::{Args, Config, LogFormat};
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
    init_tracing(&config);
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

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("Cannot install signal handlers; stop the control plane with SIGKILL.");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "Signal received."),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "Signal received."),
    }
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log_level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
