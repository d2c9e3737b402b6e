//! Private files and folders for backups and restores: made 0700 and
//! 0600, hashed as they are copied, synced, and staged in hidden folders.

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{BackupError, STAGING_PREFIX, io};

/// Creates `path` (and missing parents) with mode 0700.
pub(super) fn private_dir(path: &Path) -> Result<(), BackupError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io(path))
}

/// A new file at `path`, mode 0600, its folders 0700.
pub(super) fn create_private(path: &Path) -> Result<std::fs::File, BackupError> {
    if let Some(parent) = path.parent() {
        private_dir(parent)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))
}

/// SHA-256 (hex) and size of the file at `path`; with `copy_to`, copied
/// there (mode 0600, synced) as it is read.
pub(super) fn hash_file(path: &Path, copy_to: Option<&Path>) -> Result<(String, u64), BackupError> {
    let mut source = std::fs::File::open(path).map_err(io(path))?;
    let mut sink = copy_to.map(create_private).transpose()?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = source.read(&mut buffer).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
        if let (Some(sink), Some(to)) = (&mut sink, copy_to) {
            sink.write_all(&buffer[..n]).map_err(io(to))?;
        }
    }
    if let (Some(sink), Some(to)) = (sink, copy_to) {
        sink.sync_all().map_err(io(to))?;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

pub(super) fn sync_dir(path: &Path) -> Result<(), BackupError> {
    std::fs::File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(io(path))
}

/// A hidden folder a backup or a restore is written in, removed on drop
/// unless [`Staging::keep`] was called.
pub(super) struct Staging {
    pub(super) path: PathBuf,
    keep: bool,
}

impl Staging {
    pub(super) fn new(parent: &Path, purpose: &str) -> Result<Staging, BackupError> {
        let path = parent.join(format!(
            "{STAGING_PREFIX}{purpose}-{}",
            crate::secret::short_id("", 10)
        ));
        private_dir(&path)?;
        Ok(Staging { path, keep: false })
    }

    pub(super) fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.path.clone()
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Syncs every folder under `root` (and `root`), so the renames and
/// creations in them are on disk.
pub(super) fn sync_tree(root: &Path) -> Result<(), BackupError> {
    for entry in std::fs::read_dir(root).map_err(io(root))? {
        let entry = entry.map_err(io(root))?;
        if entry.file_type().map_err(io(&entry.path()))?.is_dir() {
            sync_tree(&entry.path())?;
        }
    }
    sync_dir(root)
}
