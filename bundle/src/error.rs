//! Every way a bundle or a piece of metadata can be refused. Attacks from
//! TUF's threat list have variants of their own.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ----- bundles -----
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
    #[error("invalid manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("the bundle source {path} holds {what}, which a bundle cannot carry")]
    UnsupportedEntry { path: PathBuf, what: &'static str },
    #[error("the archive has no posfleet-bundle.toml at its root")]
    MissingManifest,
    #[error("the archive is malformed: {0}")]
    Archive(String),
    /// A delta that does not fit its base or does not decode.
    #[error("the delta cannot be applied: {0}")]
    Delta(String),
    #[error("cannot unpack into {path}: {message}")]
    UnpackDestination { path: PathBuf, message: String },
    #[error("archive entry `{path}` is an absolute path")]
    AbsolutePath { path: String },
    #[error("archive entry `{path}` has a `..` component")]
    PathTraversal { path: String },
    #[error("archive entry `{path}` has a name that is not UTF-8")]
    NonUtf8Name { path: String },
    #[error("archive entry `{path}` is a symbolic link to `{target}`")]
    Symlink { path: String, target: String },
    #[error("archive entry `{path}` is a hard link to `{target}`")]
    HardLink { path: String, target: String },
    #[error("archive entry `{path}` is {what}, which a bundle cannot carry")]
    SpecialEntry { path: String, what: &'static str },
    #[error("archive entry `{path}` appears more than once")]
    DuplicateEntry { path: String },
    #[error("the archive unpacks to more than {limit} bytes")]
    UnpackedTooLarge { limit: u64 },
    #[error("the archive has more than {limit} entries")]
    TooManyEntries { limit: u64 },

    // ----- chunks -----
    #[error("chunk {index} does not match its signed hash")]
    ChunkHashMismatch { index: usize },
    #[error("the chunk list does not match its signed digest")]
    ChunkListMismatch,
    #[error("the chunk list is malformed: {0}")]
    ChunkList(String),
    #[error("chunk {index} is out of range (the bundle has {count})")]
    ChunkOutOfRange { index: usize, count: usize },

    // ----- metadata -----
    #[error("{role} metadata is {size} bytes, over the limit of {limit}")]
    TooLarge { role: String, size: u64, limit: u64 },
    #[error("{role} metadata is malformed: {message}")]
    Malformed { role: String, message: String },
    #[error("{role} metadata has {valid} valid signatures of the {threshold} required")]
    ThresholdNotMet {
        role: String,
        valid: usize,
        threshold: u64,
    },
    #[error("{role} metadata expired at {expires}")]
    ExpiredMetadata { role: String, expires: String },
    #[error("{role} version {offered} is older than the trusted version {trusted}")]
    RollbackAttempt {
        role: String,
        trusted: u64,
        offered: u64,
    },
    #[error("{role} version {offered} is not the version {expected} that {by} names")]
    VersionMismatch {
        role: String,
        expected: u64,
        offered: u64,
        by: String,
    },
    #[error("{what} does not match the hash that signed metadata gives it")]
    HashMismatch { what: String },
    #[error("{what} is {actual} bytes, not the {expected} that signed metadata gives it")]
    LengthMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("root version {offered} does not follow the trusted root version {trusted}")]
    RootVersionSkip { trusted: u64, offered: u64 },
    #[error("more than {limit} root rotations in one update")]
    TooManyRootUpdates { limit: u64 },
    #[error("{0} must be trusted first")]
    MissingMetadata(&'static str),
    #[error("no target {0} in the signed targets metadata")]
    UnknownTarget(String),
    #[error("target {name} is for hardware {allowed:?}, not {model}")]
    WrongHardware {
        name: String,
        model: String,
        allowed: Vec<String>,
    },
    #[error("target {name} version {offered} is lower than the installed {installed}")]
    Downgrade {
        name: String,
        installed: String,
        offered: String,
    },
    #[error("key error: {0}")]
    Key(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// True when bytes are not the ones signed metadata names: a piece, a
    /// chunk list or a whole bundle whose hash (or length, which the hash
    /// covers) differs. Whoever served them is at fault: a peer that does
    /// is banned. Every other refusal of bytes is a wrong shape (a piece
    /// index the bundle does not have, a chunk list asked for with the
    /// wrong size or length): the question was wrong, not the sender.
    pub fn is_bad_digest(&self) -> bool {
        matches!(
            self,
            Error::ChunkHashMismatch { .. }
                | Error::ChunkListMismatch
                | Error::HashMismatch { .. }
                | Error::LengthMismatch { .. }
        )
    }

    /// True when a write failed because the filesystem is full or over quota.
    pub fn is_disk_full(&self) -> bool {
        matches!(
            self,
            Error::Write { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                )
        )
    }
}
