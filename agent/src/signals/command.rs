//! `posfleet-agent signal LINE...`: reports signals from a shell program
//! through the agent's local API, with no other tool.

use clap::Parser;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use super::line::parse_line;
use super::socket::{self, SOCKET_ENV};

/// Exit code for lines that are not reports (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit code when the agent cannot be reached (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Debug, Parser)]
#[command(
    name = "posfleet-agent signal",
    about = "Reports signals to the posfleet agent: NAME:N|c (a count), NAME|c (a count of 1), NAME:X|v (a value)."
)]
struct SignalArgs {
    /// The agent's signal socket.
    #[arg(long, env = SOCKET_ENV)]
    socket: PathBuf,
    /// Reports, one per argument.
    #[arg(required = true, value_name = "LINE")]
    lines: Vec<String>,
}

/// Runs the subcommand; `args` are the words after `signal`. Nothing is
/// sent unless every line is a report the agent keeps.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = match SignalArgs::try_parse_from(
        std::iter::once(OsString::from("posfleet-agent signal")).chain(args),
    ) {
        Ok(args) => args,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    let mut refused = false;
    for line in &args.lines {
        if let Err(error) = parse_line(line) {
            eprintln!("posfleet-agent signal: {error}");
            refused = true;
        }
    }
    if refused {
        return ExitCode::from(EXIT_USAGE);
    }
    match socket::send(&args.socket, &args.lines) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("posfleet-agent signal: {error}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}
