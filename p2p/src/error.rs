//! Everything that can fail in the crate, one variant per failing operation.

use libp2p::Multiaddr;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not an Ed25519 public key: {message}")]
    InvalidPublicKey { message: String },

    #[error("not an Ed25519 seed: {message}")]
    InvalidSeed { message: String },

    #[error("cannot set up the libp2p transports: {message}")]
    Transport { message: String },

    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: Multiaddr, message: String },

    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot read piece {index} of {path}: {source}")]
    ReadPiece {
        path: PathBuf,
        index: usize,
        source: std::io::Error,
    },

    #[error("cannot write piece {index} to {path}: {source}")]
    WritePiece {
        path: PathBuf,
        index: usize,
        source: std::io::Error,
    },

    #[error("cannot write the piece record {path}: {source}")]
    WriteSidecar {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot flush {path}: {source}")]
    Sync {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A piece does not match the signed chunk list (from a peer, the
    /// origin or the local disk).
    #[error("piece {index} of {path} does not match the chunk list")]
    HashMismatch { path: PathBuf, index: usize },

    #[error("{path} is {actual} bytes, the bundle is {expected} bytes")]
    LengthMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    #[error("piece {index} is out of range: the bundle has {count} pieces")]
    PieceOutOfRange { index: usize, count: usize },

    #[error("the origin sent piece {index}, outside the requested range {first}..={last}")]
    OriginOutOfRange {
        index: usize,
        first: usize,
        last: usize,
    },

    #[error("piece {index} from the origin does not match the chunk list")]
    OriginHashMismatch { index: usize },

    #[error("the origin: {message}")]
    Origin { message: String },

    #[error("pieces of {chunk_size} bytes exceed the limit of {limit} bytes")]
    PieceTooLarge { chunk_size: u32, limit: u32 },

    #[error("bundle {digest} is already being fetched")]
    AlreadyFetching { digest: String },

    #[error("the p2p task has stopped")]
    Stopped,
}

impl Error {
    /// For [`crate::OriginSource`] implementations: any failure of the origin.
    pub fn origin(message: impl std::fmt::Display) -> Error {
        Error::Origin {
            message: message.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
