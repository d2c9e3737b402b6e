//! The agent's errors, one variant per failing operation.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot use the data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "the device is not enrolled and no enrollment token is configured (set enrollment_token)"
    )]
    NoEnrollmentToken,
    #[error("enrollment refused by the control plane: {0}")]
    EnrollmentRefused(String),
    #[error("the control plane's enrollment answer is not usable: {0}")]
    EnrollmentAnswer(String),
    #[error("TLS: {0}")]
    Tls(#[from] posfleet_pki::Error),
    #[error("invalid server URL: {0}")]
    ServerUrl(String),
    #[error("cannot use the bundle repository: {0}")]
    Repository(String),
    #[error("cannot install bundle {name}: {detail}")]
    Install { name: String, detail: String },
    #[error("launcher: {detail}")]
    Launcher { detail: String },
    /// Not a failure: the agent switched to agent `version` and stops so
    /// that its launcher starts it.
    #[error("switched to agent {version}; its launcher starts it")]
    AgentSwitched { version: semver::Version },
}
