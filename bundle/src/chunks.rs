//! Chunk lists: the SHA-256 of every 1 MiB piece of a bundle. The list's own
//! digest is in the signed target metadata, so a piece from any peer, mirror
//! or disk is checked on its own before it is stored. A bundle whose every
//! piece matches an authenticated list is itself authenticated: verifying it
//! hashes each byte once.
//!
//! A [`ChunkList`] is built only by the code that checked or computed it:
//! [`ChunkList::decode`] (fetched bytes, against a signed digest) or
//! [`digest_reader`] (a bundle being published). Its fields are private.

use std::io::Read;

use crate::error::{Error, Result};
use crate::hash::{Sha256, sha256};

/// The piece size of every bundle.
pub const CHUNK_SIZE: u32 = 1 << 20;
/// The largest piece size a client accepts from metadata (it sizes buffers).
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkList {
    chunk_size: u32,
    /// Length of the whole bundle.
    length: u64,
    hashes: Vec<[u8; 32]>,
}

fn chunk_count(length: u64, chunk_size: u32) -> u64 {
    length.div_ceil(u64::from(chunk_size))
}

/// Bytes of the encoded chunk list of a bundle of `length` bytes cut into
/// pieces of `chunk_size`; `None` when that cannot be (size 0, overflow).
pub fn encoded_len(chunk_size: u32, length: u64) -> Option<u64> {
    if chunk_size == 0 {
        return None;
    }
    chunk_count(length, chunk_size).checked_mul(32)
}

impl ChunkList {
    /// The serialized list: the hashes, 32 bytes each, in order.
    pub fn encode(&self) -> Vec<u8> {
        self.hashes.concat()
    }

    /// SHA-256 of `encode()`, as signed in the target's metadata.
    pub fn digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for hash in &self.hashes {
            hasher.update(hash);
        }
        hasher.finish()
    }

    /// Parses a list fetched from anywhere, checking it against the signed
    /// digest, piece size and length before trusting it.
    ///
    /// The error tells whose fault a refusal is: bytes that do not match
    /// `digest` are [`Error::ChunkListMismatch`] (the sender lied: ban a
    /// peer); an authentic list that does not fit `chunk_size` and `length`
    /// is [`Error::ChunkList`] (the question was wrong). See
    /// [`Error::is_bad_digest`].
    pub fn decode(
        bytes: &[u8],
        chunk_size: u32,
        length: u64,
        digest: &[u8; 32],
    ) -> Result<ChunkList> {
        if chunk_size == 0 {
            return Err(Error::ChunkList("chunk size is 0".into()));
        }
        let Some(expected) = encoded_len(chunk_size, length) else {
            return Err(Error::ChunkList(format!(
                "{length} bytes in chunks of {chunk_size} bytes is too many chunks"
            )));
        };
        if sha256(bytes) != *digest {
            return Err(Error::ChunkListMismatch);
        }
        if expected != bytes.len() as u64 {
            return Err(Error::ChunkList(format!(
                "{} bytes for {} chunks of {chunk_size} bytes",
                bytes.len(),
                expected / 32
            )));
        }
        let hashes = bytes
            .chunks_exact(32)
            .map(|c| {
                let mut hash = [0u8; 32];
                hash.copy_from_slice(c);
                hash
            })
            .collect();
        Ok(ChunkList {
            chunk_size,
            length,
            hashes,
        })
    }

    /// The size of every piece but the last.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The length of the whole bundle.
    pub fn length(&self) -> u64 {
        self.length
    }

    pub fn count(&self) -> usize {
        self.hashes.len()
    }

    /// The length piece `index` must have.
    pub fn chunk_len(&self, index: usize) -> Result<u64> {
        if index >= self.count() {
            return Err(Error::ChunkOutOfRange {
                index,
                count: self.count(),
            });
        }
        Ok((self.length - self.offset(index)).min(u64::from(self.chunk_size)))
    }

    /// Where piece `index` starts in the bundle.
    pub fn offset(&self, index: usize) -> u64 {
        index as u64 * u64::from(self.chunk_size)
    }

    /// Checks one piece against the list: its length and SHA-256.
    ///
    /// [`Error::ChunkHashMismatch`] when `data` is not the signed piece (a
    /// bad digest: whoever sent it is at fault); [`Error::ChunkOutOfRange`]
    /// when the bundle has no piece `index` (a wrong shape: the caller's
    /// question was wrong).
    pub fn verify_piece(&self, index: usize, data: &[u8]) -> Result<()> {
        if data.len() as u64 != self.chunk_len(index)? || sha256(data) != self.hashes[index] {
            return Err(Error::ChunkHashMismatch { index });
        }
        Ok(())
    }

    /// Checks a whole bundle read from `reader`, piece by piece, in one pass
    /// and bounded memory.
    pub fn verify_reader(&self, mut reader: impl Read) -> Result<()> {
        let mut buf = vec![0u8; self.chunk_size as usize];
        for index in 0..self.count() {
            let len = self.chunk_len(index)? as usize;
            reader
                .read_exact(&mut buf[..len])
                .map_err(|_| Error::LengthMismatch {
                    what: "the bundle".into(),
                    expected: self.length,
                    actual: self.offset(index),
                })?;
            self.verify_piece(index, &buf[..len])?;
        }
        let mut extra = [0u8; 1];
        if matches!(reader.read(&mut extra), Ok(n) if n > 0) {
            return Err(Error::LengthMismatch {
                what: "the bundle".into(),
                expected: self.length,
                actual: self.length + 1,
            });
        }
        Ok(())
    }
}

/// What publishing needs to know of a bundle file: its length, SHA-256 and
/// chunk list, from one read.
#[derive(Debug, Clone)]
pub struct FileDigest {
    pub length: u64,
    pub sha256: [u8; 32],
    pub chunks: ChunkList,
}

/// Reads `reader` to its end: the whole file's SHA-256 and its chunk list.
pub fn digest_reader(mut reader: impl Read) -> std::io::Result<FileDigest> {
    let mut whole = Sha256::new();
    let mut hashes = Vec::new();
    let mut length = 0u64;
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    loop {
        let filled = fill(&mut reader, &mut buf)?;
        if filled == 0 {
            break;
        }
        whole.update(&buf[..filled]);
        hashes.push(sha256(&buf[..filled]));
        length += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    Ok(FileDigest {
        length,
        sha256: whole.finish(),
        chunks: ChunkList {
            chunk_size: CHUNK_SIZE,
            length,
            hashes,
        },
    })
}

/// Reads until `buf` is full or the reader ends (reads may return less).
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// SHA-256 and length of everything `reader` yields, in bounded memory.
pub(crate) fn sha256_reader(mut reader: impl Read) -> std::io::Result<(u64, [u8; 32])> {
    let mut whole = Sha256::new();
    let mut length = 0u64;
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    loop {
        let filled = fill(&mut reader, &mut buf)?;
        if filled == 0 {
            break;
        }
        whole.update(&buf[..filled]);
        length += filled as u64;
    }
    Ok((length, whole.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_round_trip_and_catch_every_tampering() {
        let data: Vec<u8> = (0..(2 * CHUNK_SIZE as usize + 5))
            .map(|i| (i % 251) as u8)
            .collect();
        let d = digest_reader(&data[..]).unwrap();
        assert_eq!(d.chunks.count(), 3);
        assert_eq!(d.length, data.len() as u64);
        assert_eq!(d.sha256, sha256(&data));
        let list = ChunkList::decode(&d.chunks.encode(), CHUNK_SIZE, d.length, &d.chunks.digest())
            .unwrap();
        list.verify_reader(&data[..]).unwrap();
        list.verify_piece(2, &data[2 * CHUNK_SIZE as usize..])
            .unwrap();

        let mut bad = data.clone();
        bad[CHUNK_SIZE as usize + 7] ^= 1;
        assert!(matches!(
            list.verify_reader(&bad[..]),
            Err(Error::ChunkHashMismatch { index: 1 })
        ));
        assert!(matches!(
            list.verify_reader(&data[..data.len() - 1]),
            Err(Error::LengthMismatch { .. })
        ));
        let mut longer = data.clone();
        longer.push(0);
        assert!(matches!(
            list.verify_reader(&longer[..]),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(matches!(
            list.verify_piece(3, b""),
            Err(Error::ChunkOutOfRange { .. })
        ));

        let mut encoded = d.chunks.encode();
        encoded[0] ^= 1;
        assert!(matches!(
            ChunkList::decode(&encoded, CHUNK_SIZE, d.length, &d.chunks.digest()),
            Err(Error::ChunkListMismatch)
        ));
        assert!(
            ChunkList::decode(&encoded[..64], CHUNK_SIZE, d.length, &d.chunks.digest()).is_err()
        );
    }

    #[test]
    fn a_bad_digest_is_told_from_a_wrong_shape() {
        let data = vec![3u8; CHUNK_SIZE as usize + 1];
        let d = digest_reader(&data[..]).unwrap();
        let (encoded, digest) = (d.chunks.encode(), d.chunks.digest());
        // Authentic bytes, asked for with the wrong length: the question.
        let err = ChunkList::decode(&encoded, CHUNK_SIZE, 5 * d.length, &digest).unwrap_err();
        assert!(
            matches!(err, Error::ChunkList(_)) && !err.is_bad_digest(),
            "{err}"
        );
        // Bytes that are not the signed list, whatever their length: the sender.
        for forged in [&encoded[..32], &[0u8; 64][..]] {
            let err = ChunkList::decode(forged, CHUNK_SIZE, d.length, &digest).unwrap_err();
            assert!(
                matches!(err, Error::ChunkListMismatch) && err.is_bad_digest(),
                "{err}"
            );
        }
        // A piece that is not the signed one, and a piece the bundle lacks.
        let err = d.chunks.verify_piece(1, &[4]).unwrap_err();
        assert!(err.is_bad_digest(), "{err}");
        let err = d.chunks.verify_piece(1, &[]).unwrap_err();
        assert!(err.is_bad_digest(), "{err}");
        let err = d.chunks.verify_piece(2, &[3]).unwrap_err();
        assert!(
            matches!(err, Error::ChunkOutOfRange { .. }) && !err.is_bad_digest(),
            "{err}"
        );
    }

    #[test]
    fn an_absurd_length_is_refused_not_a_panic() {
        assert!(matches!(
            ChunkList::decode(b"", 1, u64::MAX, &[0; 32]),
            Err(Error::ChunkList(_))
        ));
        assert!(matches!(
            ChunkList::decode(b"", 0, 5, &[0; 32]),
            Err(Error::ChunkList(_))
        ));
    }

    #[test]
    fn an_empty_bundle_has_no_chunks() {
        let d = digest_reader(&b""[..]).unwrap();
        assert_eq!((d.length, d.chunks.count()), (0, 0));
        d.chunks.verify_reader(&b""[..]).unwrap();
    }
}
