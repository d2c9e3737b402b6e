//! The shared crash-safe private files, with the agent's errors naming
//! the path.

use std::path::Path;

use crate::error::Error;

/// Atomically replaces `path` with `bytes`, readable only by the owner.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    posfleet_runtime::files::write_private(path, bytes).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The file's bytes, or `None` if it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, Error> {
    posfleet_runtime::files::read_optional(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}
