//! The local API: a Unix datagram socket, one or more lines per datagram
//! (`line`'s format). Whatever cannot be kept (a malformed line, a refused
//! name, a name over the minute's cap, a datagram over
//! [`MAX_DATAGRAM_BYTES`]) is counted in `signals_dropped`.
//!
//! The socket is mode 0660, in the group of `hook_user` when one is set:
//! the program the agent supervises runs as that user.

use std::io;
use std::path::{Path, PathBuf};
use tokio::net::UnixDatagram;

use super::Signals;
use super::line::{lines, parse_line};
use crate::hooks::HookUser;

/// Largest datagram read; a longer one is dropped whole.
pub const MAX_DATAGRAM_BYTES: usize = 4096;
/// The socket's file name in the data dir, unless configured.
pub const SOCKET_FILE: &str = "signals.sock";
/// The variable naming the socket, for the supervised program and
/// `posfleet-agent signal`.
pub const SOCKET_ENV: &str = "POSFLEET_SIGNAL_SOCKET";

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("{path} exists and is not a socket; remove it or set signal_socket_path")]
    NotASocket { path: PathBuf },
    #[error("cannot let group {gid} write to {path}: {source}")]
    Permissions {
        path: PathBuf,
        gid: u32,
        source: io::Error,
    },
    #[error("cannot send to {path} (is the agent running?): {source}")]
    Send { path: PathBuf, source: io::Error },
}

/// Binds the socket at `path` (replacing one a previous run left), mode
/// 0660.
pub fn bind(path: &Path) -> Result<UnixDatagram, SocketError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let bind_error = |source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(bind_error)?
        }
        Ok(_) => {
            return Err(SocketError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_error(e)),
    }
    let socket = UnixDatagram::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_error)?;
    Ok(socket)
}

/// Gives the socket at `path` to the primary group of `user`, the user
/// the supervised program runs as, so that it may write to it.
pub fn allow(path: &Path, user: &HookUser) -> Result<(), SocketError> {
    nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(user.gid))).map_err(|e| {
        SocketError::Permissions {
            path: path.to_path_buf(),
            gid: user.gid,
            source: e.into(),
        }
    })
}

/// Records what one datagram reports.
pub fn receive(datagram: &[u8], signals: &Signals) {
    if datagram.len() > MAX_DATAGRAM_BYTES {
        tracing::debug!(
            bytes = datagram.len(),
            "Signal datagram over the size cap dropped."
        );
        signals.drop_one();
        return;
    }
    let Ok(text) = std::str::from_utf8(datagram) else {
        tracing::debug!("Signal datagram not in UTF-8 dropped.");
        signals.drop_one();
        return;
    };
    for line in lines(text) {
        match parse_line(line) {
            Ok(report) => signals.report(report),
            Err(error) => {
                tracing::debug!(%error, "Signal line dropped.");
                signals.drop_one();
            }
        }
    }
}

/// Receives datagrams on `socket` until the task is aborted.
pub fn spawn_server(socket: UnixDatagram, signals: Signals) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // One byte more than the cap: a datagram that fills it is too long.
        let mut buf = vec![0u8; MAX_DATAGRAM_BYTES + 1];
        loop {
            match socket.recv(&mut buf).await {
                Ok(n) => receive(&buf[..n], &signals),
                Err(error) => {
                    tracing::warn!(%error, "Cannot receive signals; trying again.");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    })
}

/// Sends `lines` to the socket at `path`, as few datagrams as fit in
/// [`MAX_DATAGRAM_BYTES`] each. The lines are not checked here.
pub fn send(path: &Path, lines: &[String]) -> Result<(), SocketError> {
    let socket =
        std::os::unix::net::UnixDatagram::unbound().map_err(|source| SocketError::Send {
            path: path.to_path_buf(),
            source,
        })?;
    let mut datagram = String::new();
    let flush = |datagram: &mut String| -> Result<(), SocketError> {
        if !datagram.is_empty() {
            socket
                .send_to(datagram.as_bytes(), path)
                .map_err(|source| SocketError::Send {
                    path: path.to_path_buf(),
                    source,
                })?;
            datagram.clear();
        }
        Ok(())
    };
    for line in lines {
        if datagram.len() + line.len() + 1 > MAX_DATAGRAM_BYTES {
            flush(&mut datagram)?;
        }
        datagram.push_str(line);
        datagram.push('\n');
    }
    flush(&mut datagram)
}
