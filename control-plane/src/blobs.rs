//! Bundle bytes and chunk lists, stored by their SHA-256. Local disk now;
//! object storage later behind the same trait.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A temporary file untouched this long is an upload a crash cut off. A
/// younger one may be an upload in progress on another replica, when the
/// replicas share the blobs folder (a network filesystem), so it is left.
const ABANDONED_UPLOAD_AGE: Duration = Duration::from_secs(3600);

/// Where blobs live. A blob is named by the hex SHA-256 of its bytes, so the
/// same bytes are stored once and a name never changes meaning.
pub trait BlobStore: Send + Sync {
    /// A fresh temporary file for an upload in progress.
    fn temp_path(&self) -> PathBuf;
    /// Moves a fully written, verified file in as the blob `sha256`.
    fn commit(&self, temp: &Path, sha256: &str) -> std::io::Result<()>;
    /// The blob's file on local disk, if present.
    fn local_path(&self, sha256: &str) -> Option<PathBuf>;
}

/// Blobs under `<data_dir>/blobs/sha256/<first two hex digits>/<hash>`.
pub struct FsBlobStore {
    root: PathBuf,
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl FsBlobStore {
    pub fn open(root: &Path) -> std::io::Result<FsBlobStore> {
        std::fs::create_dir_all(root.join("sha256"))?;
        std::fs::create_dir_all(root.join("tmp"))?;
        // Uploads a crash interrupted.
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let entry = entry?;
            let abandoned = match entry.metadata().and_then(|m| m.modified()) {
                Ok(modified) => modified
                    .elapsed()
                    .is_ok_and(|age| age >= ABANDONED_UPLOAD_AGE),
                Err(_) => true,
            };
            if abandoned {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(FsBlobStore {
            root: root.to_path_buf(),
        })
    }

    fn path_of(&self, sha256: &str) -> PathBuf {
        self.root.join("sha256").join(&sha256[..2]).join(sha256)
    }
}

impl BlobStore for FsBlobStore {
    fn temp_path(&self) -> PathBuf {
        self.root
            .join("tmp")
            .join(crate::secret::short_id("upload-", 12))
    }

    fn commit(&self, temp: &Path, sha256: &str) -> std::io::Result<()> {
        if !is_sha256_hex(sha256) {
            return Err(std::io::Error::other("not a sha256"));
        }
        let path = self.path_of(sha256);
        let dir = path.parent().expect("blob paths have a parent");
        std::fs::create_dir_all(dir)?;
        std::fs::File::open(temp)?.sync_all()?;
        std::fs::rename(temp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    }

    fn local_path(&self, sha256: &str) -> Option<PathBuf> {
        if !is_sha256_hex(sha256) {
            return None;
        }
        let path = self.path_of(sha256);
        path.is_file().then_some(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    /// Another replica starting on the shared blobs folder leaves an
    /// upload in progress alone; an upload a crash cut off long ago goes.
    #[test]
    fn a_replica_starting_on_a_shared_folder_keeps_uploads_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let serving = FsBlobStore::open(dir.path()).unwrap();
        let in_progress = serving.temp_path();
        std::fs::write(&in_progress, b"bundle bytes").unwrap();
        let abandoned = serving.temp_path();
        std::fs::write(&abandoned, b"cut off").unwrap();
        let long_ago = std::time::SystemTime::now() - ABANDONED_UPLOAD_AGE * 2;
        std::fs::File::options()
            .write(true)
            .open(&abandoned)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();

        let _starting = FsBlobStore::open(dir.path()).unwrap();
        assert!(!abandoned.exists(), "an abandoned upload is removed");
        let sha256 = hex::encode(sha2::Sha256::digest(b"bundle bytes"));
        serving.commit(&in_progress, &sha256).unwrap();
        let stored = serving.local_path(&sha256).expect("the blob is stored");
        assert_eq!(std::fs::read(stored).unwrap(), b"bundle bytes");
    }
}
