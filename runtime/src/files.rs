//! Crash-safe private files (keys, state): written to a temporary file
//! beside the target, synced, renamed over the old one, and the folder
//! synced, so a power cut leaves either the old or the new content, never a
//! torn one, and nobody but the owner can read either.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The temporary file [`write_private`] writes before renaming it over
/// `path`: the same name with `.tmp` added, in the same folder.
pub fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Atomically replaces `path` with `bytes`, readable only by the owner
/// (mode 0600).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = temporary_path(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    // A temporary file left by a crash keeps the mode it was created with.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)?;
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(folder)?.sync_all()
}

/// The file's bytes, or `None` if it does not exist.
pub fn read_optional(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn replaces_the_content_readable_by_the_owner_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(read_optional(&path).unwrap(), None);
        write_private(&path, b"one").unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(read_optional(&path).unwrap().unwrap(), b"two");
        assert_eq!(mode(&path), 0o600);
        assert!(!temporary_path(&path).exists());
        assert_eq!(temporary_path(&path).file_name().unwrap(), "state.json.tmp");
    }

    #[test]
    fn a_leftover_world_readable_temporary_file_does_not_leak_the_new_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.key");
        let leftover = temporary_path(&path);
        std::fs::write(&leftover, b"half-written").unwrap();
        std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"secret").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_relative_path_in_the_current_folder_is_written() {
        // No parent folder to name: the current one is synced.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain");
        write_private(&path, b"x").unwrap();
        assert_eq!(read_optional(&path).unwrap().unwrap(), b"x");
    }
}
