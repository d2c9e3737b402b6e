//! `posfleet-control-plane`: parses the configuration, sets up logging, binds
//! the listeners and serves until SIGTERM or SIGINT; or, with a command,
//! backs the control plane up or restores it.

use clap::Parser;
use posfleet_control_plane::config::{Args, Command, Config};
use posfleet_control_plane::{ControlPlane, backup};
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
    if let Some(command) = args.command {
        return match runtime.block_on(run_command(&config, command)) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("posfleet-control-plane: {error}");
                ExitCode::FAILURE
            }
        };
    }
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

/// Connections waiting to be accepted, per listener: a fleet reconnecting
/// at once after a restart (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 8192;

async fn run(config: Config) -> anyhow::Result<()> {
    raise_open_files_limit();
    let bind = |address: String| async move {
        let listen = || -> std::io::Result<tokio::net::TcpListener> {
            let address: std::net::SocketAddr = address
                .parse()
                .map_err(|_| std::io::Error::other("not an address"))?;
            let socket = if address.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.bind(address)?;
            socket.listen(LISTEN_BACKLOG)
        };
        listen().map_err(|e| anyhow::anyhow!("cannot listen on {address}: {e}"))
    };
    let grpc = bind(config.grpc_listen_address.clone()).await?;
    let http = bind(config.http_listen_address.clone()).await?;
    let control_plane = ControlPlane::open(config).await?;
    control_plane.serve(grpc, http, shutdown_signal()).await?;
    Ok(())
}

/// Runs a backup or a restore; returns what to tell the operator.
async fn run_command(config: &Config, command: Command) -> Result<String, backup::BackupError> {
    let started = std::time::Instant::now();
    match command {
        Command::Backup { to, postgres } => {
            let manifest = backup::backup(config, &to, &postgres).await?;
            Ok(format!(
                "Backed up to {} in {}: {}",
                to.display(),
                backup::seconds(started.elapsed()),
                backup::describe(&manifest)
            ))
        }
        Command::Restore { from, postgres } => {
            let manifest = backup::restore(config, &from, &postgres).await?;
            let mut summary = format!(
                "Restored {} into {} in {}: {}",
                from.display(),
                config.data_dir.display(),
                backup::seconds(started.elapsed()),
                backup::describe(&manifest)
            );
            let known = posfleet_control_plane::storage::known_schema_version();
            if manifest.schema_version < known {
                summary.push_str(&format!(
                    "\nThe database is at schema {}; the next start migrates it to {known}.",
                    manifest.schema_version
                ));
            }
            Ok(summary)
        }
    }
}

/// Each till keeps a connection open over TLS: the soft limit on open files
/// (often 1,024) is raised to the hard one, which the service manager sets
/// (`LimitNOFILE`).
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(%error, soft, hard, "Cannot raise the open-files limit.");
            }
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "Cannot read the open-files limit."),
    }
}
