//! Chunk lists: the SHA-256 of every 1 MiB piece of a bundle. The list's own
//! digest is in the signed target metadata, so a piece from any peer, mirror
//! or disk is checked on its own before it is stored. A bundle whose every
//! piece matches an authenticated list is itself authenticated: verifying it
//! hashes each byte once.

use sha2::{Digest as _, Sha256};
use std::io::Read;

use crate::error::{Error, Result};

/// The piece size of every bundle.
pub const CHUNK_SIZE: u32 = 1 << 20;
/// The largest piece size a client accepts from metadata (it sizes buffers).
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkList {
    pub chunk_size: u32,
    /// Length of the whole bundle.
    pub length: u64,
    pub hashes: Vec<[u8; 32]>,
}

fn chunk_count(length: u64, chunk_size: u32) -> u64 {
    length.div_ceil(u64::from(chunk_size))
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
        hasher.finalize().into()
    }

    /// Parses a list fetched from anywhere, checking it against the signed
    /// digest, piece size and length before trusting it.
    pub fn decode(
        bytes: &[u8],
        chunk_size: u32,
        length: u64,
        digest: &[u8; 32],
    ) -> Result<ChunkList> {
        if chunk_size == 0 {
            return Err(Error::ChunkList("chunk size is 0".into()));
        }
        let expected = chunk_count(length, chunk_size);
        if expected.checked_mul(32) != Some(bytes.len() as u64) {
            return Err(Error::ChunkList(format!(
                "{} bytes for {expected} chunks of {chunk_size} bytes",
                bytes.len()
            )));
        }
        if Sha256::digest(bytes).as_slice() != digest {
            return Err(Error::ChunkListMismatch);
        }
        let hashes = bytes
            .chunks_exact(32)
            .map(|c| c.try_into().expect("chunks_exact yields 32-byte slices"))
            .collect();
        Ok(ChunkList {
            chunk_size,
            length,
            hashes,
        })
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
        let start = index as u64 * u64::from(self.chunk_size);
        Ok((self.length - start).min(u64::from(self.chunk_size)))
    }

    /// Checks one piece against the list.
    pub fn verify_chunk(&self, index: usize, data: &[u8]) -> Result<()> {
        if data.len() as u64 != self.chunk_len(index)?
            || Sha256::digest(data).as_slice() != self.hashes[index]
        {
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
                    actual: index as u64 * u64::from(self.chunk_size),
                })?;
            self.verify_chunk(index, &buf[..len])?;
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

pub fn digest_reader(mut reader: impl Read) -> std::io::Result<FileDigest> {
    let mut whole = Sha256::new();
    let mut hashes = Vec::new();
    let mut length = 0u64;
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    loop {
        // Fill a whole piece (reads may return less).
        let mut filled = 0;
        while filled < buf.len() {
            let n = reader.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        whole.update(&buf[..filled]);
        hashes.push(Sha256::digest(&buf[..filled]).into());
        length += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    Ok(FileDigest {
        length,
        sha256: whole.finalize().into(),
        chunks: ChunkList {
            chunk_size: CHUNK_SIZE,
            length,
            hashes,
        },
    })
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
        assert_eq!(d.sha256.as_slice(), Sha256::digest(&data).as_slice());
        let list = ChunkList::decode(&d.chunks.encode(), CHUNK_SIZE, d.length, &d.chunks.digest())
            .unwrap();
        list.verify_reader(&data[..]).unwrap();
        list.verify_chunk(2, &data[2 * CHUNK_SIZE as usize..])
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
            list.verify_chunk(3, b""),
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
