//! Bundle bytes and chunk lists, stored by their SHA-256. Local disk now;
//! object storage later behind the same trait.

use std::path::{Path, PathBuf};

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
            let _ = std::fs::remove_file(entry?.path());
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
