//! What can go wrong with certificates, named for the operator who must fix
//! it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    #[error("{what}: {detail}")]
    Pem { what: String, detail: String },
    #[error("{0}")]
    Certificate(String),
    #[error("the certificate request is not valid: {0}")]
    BadRequest(String),
    #[error("the certificate request is for another key than the one that signed the proof")]
    KeyMismatch,
    #[error("not a posfleet device certificate: {0}")]
    NotADeviceCertificate(String),
    #[error("`{0}` cannot be named in a certificate (letters, digits, `.`, `_` and `-` only)")]
    BadName(String),
    #[error("{0}")]
    BadFingerprint(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

impl From<rcgen::Error> for Error {
    fn from(error: rcgen::Error) -> Error {
        Error::Certificate(error.to_string())
    }
}
