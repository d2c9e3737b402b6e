//! A bundle file on disk, written piece by piece at random offsets, with a
//! sidecar that records which pieces are verified so a restart resumes.
//!
//! The only way to write a piece is [`PieceFile::write_verified`], which
//! checks it against the chunk list first: unverified bytes never reach the
//! file. Reads for serving are verified too, so a disk that rotted under a
//! shared bundle does not get this till banned by its peers.
//!
//! The sidecar (`<dest>.pieces`) is a hint, not a proof: the pieces it lists
//! are hashed again when the file is opened, so a crash between writing a
//! piece and the sidecar, or a power cut that lost page cache, costs a
//! re-download of those pieces and nothing else. Calls use positional I/O
//! and take `&self`, so fetch, serve and origin tasks share one open file.

use posfleet_bundle::chunks::ChunkList;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::bitmap::Bitmap;
use crate::error::{Error, Result};

/// Written bytes are flushed to disk every this many, so that the flush
/// at the end of a fetch has little left to do.
const FLUSH_EVERY: u64 = 16 << 20;

const SIDECAR_MAGIC: &[u8; 8] = b"PFPIECE1";
/// Magic, chunk list digest, piece count.
const SIDECAR_HEADER: u64 = 8 + 32 + 4;

pub(crate) struct PieceFile {
    path: PathBuf,
    file: File,
    chunks: Arc<ChunkList>,
    /// Present while the bundle is incomplete.
    sidecar: Option<(PathBuf, File)>,
    /// Pieces whose bytes on disk were checked since the file was opened:
    /// written by [`PieceFile::write_verified`], or read and verified once.
    /// Serving them again skips the hash (every receiver checks each piece
    /// anyway); the first read of a piece after an open still catches a
    /// disk that rotted while the till was off.
    checked: Box<[AtomicBool]>,
    /// Bytes written since the last flush.
    unflushed: AtomicU64,
}

fn unchecked(count: usize) -> Box<[AtomicBool]> {
    (0..count).map(|_| AtomicBool::new(false)).collect()
}

pub(crate) fn sidecar_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".pieces");
    PathBuf::from(name)
}

impl PieceFile {
    /// Opens (or creates) `dest` for fetching: sized to the bundle, with the
    /// set of pieces already there and verified.
    pub fn open_for_fetch(dest: &Path, chunks: Arc<ChunkList>) -> Result<(PieceFile, Bitmap)> {
        let open = |source| Error::Open {
            path: dest.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dest)
            .map_err(open)?;
        let old_len = file.metadata().map_err(open)?.len();
        let side_path = sidecar_path(dest);
        let recorded = read_sidecar(&side_path, &chunks);
        if old_len != chunks.length() {
            file.set_len(chunks.length()).map_err(open)?;
        }

        let mut this = PieceFile {
            path: dest.to_path_buf(),
            file,
            chunks: chunks.clone(),
            sidecar: None,
            checked: unchecked(chunks.count()),
            unflushed: AtomicU64::new(0),
        };
        // Which pieces to check: those the sidecar lists or, with no usable
        // sidecar, every piece that lies within what was on disk (a file
        // left by another downloader, or one completed before a restart).
        let candidates: Vec<usize> = match &recorded {
            Some(map) => (0..chunks.count()).filter(|&i| map.get(i)).collect(),
            None => (0..chunks.count())
                .filter(|&i| piece_end(&chunks, i) <= old_len)
                .collect(),
        };
        let mut have = Bitmap::empty(chunks.count());
        for index in candidates {
            if this.read_verified(index).is_ok() {
                have.set(index);
            }
        }

        if !have.is_full() {
            let side = OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&side_path)
                .map_err(|source| Error::WriteSidecar {
                    path: side_path.clone(),
                    source,
                })?;
            let mut body = Vec::with_capacity(SIDECAR_HEADER as usize + chunks.count());
            body.extend_from_slice(SIDECAR_MAGIC);
            body.extend_from_slice(&chunks.digest());
            body.extend_from_slice(&(chunks.count() as u32).to_be_bytes());
            body.extend((0..chunks.count()).map(|i| u8::from(have.get(i))));
            side.write_all_at(&body, 0)
                .map_err(|source| Error::WriteSidecar {
                    path: side_path.clone(),
                    source,
                })?;
            this.sidecar = Some((side_path, side));
        }
        Ok((this, have))
    }

    /// Opens a whole bundle for serving. Its pieces are verified as they
    /// are served, not here.
    pub fn open_whole(path: &Path, chunks: Arc<ChunkList>) -> Result<PieceFile> {
        let open = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open)?;
        let actual = file.metadata().map_err(open)?.len();
        if actual != chunks.length() {
            return Err(Error::LengthMismatch {
                path: path.to_path_buf(),
                expected: chunks.length(),
                actual,
            });
        }
        Ok(PieceFile {
            path: path.to_path_buf(),
            file,
            checked: unchecked(chunks.count()),
            chunks,
            sidecar: None,
            unflushed: AtomicU64::new(0),
        })
    }

    pub fn chunks(&self) -> &Arc<ChunkList> {
        &self.chunks
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn piece_len(&self, index: usize) -> Result<usize> {
        self.chunks
            .chunk_len(index)
            .map(|n| n as usize)
            .map_err(|_| Error::PieceOutOfRange {
                index,
                count: self.chunks.count(),
            })
    }

    /// Checks `data` against the chunk list (`posfleet-bundle` decides).
    fn verify(&self, index: usize, data: &[u8]) -> Result<()> {
        self.chunks.verify_piece(index, data).map_err(|e| {
            if e.is_bad_digest() {
                Error::HashMismatch {
                    path: self.path.clone(),
                    index,
                }
            } else {
                Error::PieceOutOfRange {
                    index,
                    count: self.chunks.count(),
                }
            }
        })
    }

    /// Reads one piece and checks it against the chunk list.
    pub fn read_verified(&self, index: usize) -> Result<Vec<u8>> {
        let data = self.read_unchecked(index)?;
        self.verify(index, &data)?;
        self.checked[index].store(true, Ordering::Relaxed);
        Ok(data)
    }

    /// Reads one piece to send to a peer: checked against the chunk list
    /// unless this till already checked its bytes on disk since the open.
    pub fn read_for_serving(&self, index: usize) -> Result<Vec<u8>> {
        if !self
            .checked
            .get(index)
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return self.read_verified(index);
        }
        self.read_unchecked(index)
    }

    /// The bytes of one piece as they are on disk.
    fn read_unchecked(&self, index: usize) -> Result<Vec<u8>> {
        let mut data = vec![0u8; self.piece_len(index)?];
        self.file
            .read_exact_at(&mut data, self.chunks.offset(index))
            .map_err(|source| Error::ReadPiece {
                path: self.path.clone(),
                index,
                source,
            })?;
        Ok(data)
    }

    /// Checks one piece against the chunk list, then writes it and records
    /// it in the sidecar.
    pub fn write_verified(&self, index: usize, data: &[u8]) -> Result<()> {
        self.verify(index, data)?;
        self.file
            .write_all_at(data, self.chunks.offset(index))
            .map_err(|source| Error::WritePiece {
                path: self.path.clone(),
                index,
                source,
            })?;
        if let Some((side_path, side)) = &self.sidecar {
            side.write_all_at(&[1], SIDECAR_HEADER + index as u64)
                .map_err(|source| Error::WriteSidecar {
                    path: side_path.clone(),
                    source,
                })?;
        }
        self.checked[index].store(true, Ordering::Relaxed);
        let unflushed = self
            .unflushed
            .fetch_add(data.len() as u64, Ordering::Relaxed)
            + data.len() as u64;
        if unflushed >= FLUSH_EVERY {
            self.unflushed.store(0, Ordering::Relaxed);
            self.file.sync_data().map_err(|source| Error::Sync {
                path: self.path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// The bundle is whole: flush it to disk and drop the sidecar.
    pub fn finish(&self) -> Result<()> {
        self.file.sync_all().map_err(|source| Error::Sync {
            path: self.path.clone(),
            source,
        })?;
        if let Some((side_path, _)) = &self.sidecar {
            match std::fs::remove_file(side_path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::WriteSidecar {
                        path: side_path.clone(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

fn piece_end(chunks: &ChunkList, index: usize) -> u64 {
    chunks.offset(index) + chunks.chunk_len(index).unwrap_or(0)
}

/// The pieces a sidecar lists, if it belongs to this chunk list.
fn read_sidecar(path: &Path, chunks: &ChunkList) -> Option<Bitmap> {
    let bytes = std::fs::read(path).ok()?;
    let (header, marks) = bytes.split_at_checked(SIDECAR_HEADER as usize)?;
    if &header[..8] != SIDECAR_MAGIC
        || header[8..40] != chunks.digest()
        || u32::from_be_bytes(header[40..44].try_into().ok()?) as usize != chunks.count()
        || marks.len() != chunks.count()
    {
        return None;
    }
    let mut map = Bitmap::empty(chunks.count());
    for (index, &mark) in marks.iter().enumerate() {
        if mark == 1 {
            map.set(index);
        }
    }
    Some(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use posfleet_bundle::chunks::digest_reader;

    fn bundle(len: usize, seed: usize) -> (Vec<u8>, Arc<ChunkList>) {
        let data: Vec<u8> = (0..len).map(|i| ((i + seed) * 7 % 253) as u8).collect();
        let chunks = digest_reader(&data[..]).unwrap().chunks;
        (data, Arc::new(chunks))
    }

    fn piece(data: &[u8], chunks: &ChunkList, index: usize) -> Vec<u8> {
        let start = chunks.offset(index) as usize;
        let end = start + chunks.chunk_len(index).unwrap() as usize;
        data[start..end].to_vec()
    }

    #[test]
    fn pieces_resume_from_the_sidecar_and_bad_ones_never_land() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("b.bundle");
        let (data, chunks) = bundle(3 * (1 << 20) + 100, 0);

        let (file, have) = PieceFile::open_for_fetch(&dest, chunks.clone()).unwrap();
        assert_eq!(have.count(), 0);
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), chunks.length());
        let mut bad = piece(&data, &chunks, 1);
        bad[5] ^= 1;
        assert!(matches!(
            file.write_verified(1, &bad),
            Err(Error::HashMismatch { index: 1, .. })
        ));
        file.write_verified(3, &piece(&data, &chunks, 3)).unwrap();
        file.write_verified(0, &piece(&data, &chunks, 0)).unwrap();
        drop(file);

        // Reopened: the two pieces are kept, the refused one is not there.
        let (file, have) = PieceFile::open_for_fetch(&dest, chunks.clone()).unwrap();
        assert_eq!(
            (have.get(0), have.get(1), have.get(2), have.get(3)),
            (true, false, false, true)
        );
        assert!(
            std::fs::read(&dest).unwrap()[1 << 20..2 << 20]
                .iter()
                .all(|&b| b == 0)
        );

        // A piece the sidecar lists but the disk lost is found out at open.
        drop(file);
        let f = OpenOptions::new().write(true).open(&dest).unwrap();
        f.write_all_at(&[0xAA], 10).unwrap();
        let (file, have) = PieceFile::open_for_fetch(&dest, chunks.clone()).unwrap();
        assert_eq!((have.get(0), have.get(3)), (false, true));

        for i in [0, 1, 2] {
            file.write_verified(i, &piece(&data, &chunks, i)).unwrap();
        }
        file.finish().unwrap();
        assert!(!sidecar_path(&dest).exists());
        assert_eq!(std::fs::read(&dest).unwrap(), data);

        // With no sidecar, a whole file is recognised by hashing it.
        let (_, have) = PieceFile::open_for_fetch(&dest, chunks.clone()).unwrap();
        assert!(have.is_full());
        let whole = PieceFile::open_whole(&dest, chunks.clone()).unwrap();
        assert_eq!(whole.read_verified(3).unwrap(), piece(&data, &chunks, 3));
    }

    #[test]
    fn a_piece_served_from_a_reopened_file_is_checked_on_its_first_read() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("b.bundle");
        let (data, chunks) = bundle(2 * (1 << 20) + 7, 5);
        let (file, _) = PieceFile::open_for_fetch(&dest, chunks.clone()).unwrap();
        for i in 0..chunks.count() {
            file.write_verified(i, &piece(&data, &chunks, i)).unwrap();
        }
        file.finish().unwrap();
        assert_eq!(file.read_for_serving(2).unwrap(), piece(&data, &chunks, 2));
        drop(file);

        // The disk rots while the till is off: the first read after the
        // open finds it out instead of sending the bad bytes to a peer.
        let f = OpenOptions::new().write(true).open(&dest).unwrap();
        f.write_all_at(&[0xAA], (1 << 20) + 3).unwrap();
        let whole = PieceFile::open_whole(&dest, chunks.clone()).unwrap();
        assert!(matches!(
            whole.read_for_serving(1),
            Err(Error::HashMismatch { index: 1, .. })
        ));
        assert_eq!(whole.read_for_serving(0).unwrap(), piece(&data, &chunks, 0));
        assert_eq!(whole.read_for_serving(0).unwrap(), piece(&data, &chunks, 0));
    }

    #[test]
    fn a_bad_piece_is_a_hash_mismatch_and_a_missing_one_out_of_range() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("b.bundle");
        let (data, chunks) = bundle(2 * (1 << 20) + 9, 3);
        let (file, _) = PieceFile::open_for_fetch(&dest, chunks.clone()).unwrap();
        let mut short = piece(&data, &chunks, 2);
        short.pop();
        assert!(matches!(
            file.write_verified(2, &short),
            Err(Error::HashMismatch { index: 2, .. })
        ));
        assert!(matches!(
            file.write_verified(3, b"x"),
            Err(Error::PieceOutOfRange { index: 3, count: 3 })
        ));
        file.write_verified(2, &piece(&data, &chunks, 2)).unwrap();
    }

    #[test]
    fn a_sidecar_of_another_bundle_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("b.bundle");
        let (data, chunks) = bundle(2 << 20, 0);
        let (file, _) = PieceFile::open_for_fetch(&dest, chunks.clone()).unwrap();
        file.write_verified(0, &piece(&data, &chunks, 0)).unwrap();
        drop(file);
        let (_, other) = bundle(5, 1);
        let (_, have) = PieceFile::open_for_fetch(&dest, other).unwrap();
        assert_eq!(have.count(), 0);
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 5);
    }
}
