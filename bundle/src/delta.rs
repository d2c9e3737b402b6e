//! Deltas between two versions of a bundle: the new version's tar rebuilt
//! from the old version's tar and a small file.
//!
//! The method was chosen by measurement (BENCHMARKS.md, delta-bench): zstd
//! with the old tar as a reference prefix (what `zstd --patch-from` does)
//! ships a catalog whose prices changed here and there, and a program with
//! one file changed, in a few KiB; content-defined chunks cannot, since a
//! scattered change touches nearly every chunk. One reference prefix for
//! the whole tar would make a till hold the old tar and a window as large
//! in memory, so the new tar is cut into segments of at most
//! [`MAX_SEGMENT_BYTES`], each compressed as a zstd frame of its own
//! against the region of the old tar where its bytes were (found by
//! sampling, at most [`MAX_REFERENCE_BYTES`]). Applying reads one region
//! and decodes one frame at a time: memory stays under about
//! `MAX_REFERENCE_BYTES + MAX_SEGMENT_BYTES` whatever the bundle's size,
//! and the old tar is read from disk.
//!
//! A delta says nothing about trust: its bytes are a signed target like any
//! other, and what it rebuilds is checked against the full target's signed
//! hash before anyone uses it. The header below is only checked for shape,
//! so a corrupt delta fails with [`Error::Delta`] and never asks for more
//! memory than the limits allow.
//!
//! Layout: the magic `PFDELTA1`, the header's length (`u32`, little
//! endian), the header (JSON, [`Header`]), then each segment's zstd frame
//! in order.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest::Manifest;

const MAGIC: &[u8; 8] = b"PFDELTA1";

/// The largest piece of the new tar one frame rebuilds.
pub const MAX_SEGMENT_BYTES: u64 = 4 << 20;

/// The largest region of the old tar one frame refers to.
pub const MAX_REFERENCE_BYTES: u64 = 8 << 20;

/// The largest header: a segment's entry is under 100 bytes, so this
/// covers tars of several GiB.
const MAX_HEADER_BYTES: u32 = 1 << 20;

/// How far before and after where a segment's bytes were found its
/// reference region reaches: room for what moved inside the segment.
const MARGIN_BYTES: u64 = (MAX_REFERENCE_BYTES - MAX_SEGMENT_BYTES) / 2;

/// zstd level for deltas: they are made once per publish and fetched by
/// every store, so the slowest level is worth it.
const LEVEL: i32 = 19;

/// Anchors: the first bytes of each 512-byte block of the old tar (a
/// tar's entries start on such blocks), looked up in the new tar.
const BLOCK: usize = 512;
const ANCHOR: usize = 32;

/// How far into a segment anchors are looked for.
const ANCHOR_SCAN_BYTES: usize = 64 << 10;

/// What a delta rebuilds, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Length of the old tar the delta applies to.
    pub base_tar_length: u64,
    /// Length of the tar it rebuilds.
    pub result_tar_length: u64,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    /// The region of the old tar this frame refers to.
    pub base_offset: u64,
    pub base_length: u64,
    /// Bytes of the new tar the frame rebuilds.
    pub result_length: u64,
    /// Length of the frame in the delta.
    pub frame_length: u64,
}

fn malformed(message: impl Into<String>) -> Error {
    Error::Delta(message.into())
}

impl Header {
    /// Checks the header's shape against the limits and the old tar's
    /// length.
    fn check(&self, base_tar_length: u64) -> Result<()> {
        if self.base_tar_length != base_tar_length {
            return Err(malformed(format!(
                "it applies to a tar of {} bytes, not {base_tar_length}",
                self.base_tar_length
            )));
        }
        let mut total = 0u64;
        for (i, s) in self.segments.iter().enumerate() {
            if s.result_length == 0 || s.result_length > MAX_SEGMENT_BYTES {
                return Err(malformed(format!(
                    "segment {i} rebuilds {} bytes (1 to {MAX_SEGMENT_BYTES})",
                    s.result_length
                )));
            }
            if s.base_length > MAX_REFERENCE_BYTES
                || s.base_offset
                    .checked_add(s.base_length)
                    .is_none_or(|end| end > base_tar_length)
            {
                return Err(malformed(format!(
                    "segment {i} refers to {} bytes at {} of a {base_tar_length}-byte tar",
                    s.base_length, s.base_offset
                )));
            }
            total = total.saturating_add(s.result_length);
        }
        if total != self.result_tar_length {
            return Err(malformed(format!(
                "its segments rebuild {total} bytes, not {}",
                self.result_tar_length
            )));
        }
        Ok(())
    }
}

/// A cheap hash of an anchor's bytes.
fn anchor_key(bytes: &[u8]) -> u64 {
    let mut key = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        key = (key ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    key
}

/// Where the old tar's blocks start, by the hash of their first bytes.
/// Blocks of zeros (padding, empty space) say nothing and are left out.
fn index_blocks(base: &[u8]) -> HashMap<u64, u64> {
    let mut index = HashMap::new();
    for start in (0..base.len().saturating_sub(ANCHOR)).step_by(BLOCK) {
        let bytes = &base[start..start + ANCHOR];
        if bytes.iter().all(|&b| b == 0) {
            continue;
        }
        index.entry(anchor_key(bytes)).or_insert(start as u64);
    }
    index
}

/// How far the bytes of `new[start..]` moved from where they were in the
/// old tar (old offset minus new offset), if an anchor says so: the median
/// of the shifts of the anchors found near `start`.
fn shift_near(new: &[u8], start: usize, index: &HashMap<u64, u64>) -> Option<i64> {
    let end = (start + ANCHOR_SCAN_BYTES).min(new.len().saturating_sub(ANCHOR));
    let mut shifts = Vec::new();
    let mut p = start;
    while p < end {
        if let Some(&old) = index.get(&anchor_key(&new[p..p + ANCHOR])) {
            shifts.push(old as i64 - p as i64);
            // The next old block is at least a block further on.
            p += BLOCK;
        } else {
            p += 1;
        }
    }
    shifts.sort_unstable();
    shifts.get(shifts.len() / 2).copied()
}

/// log2 of a zstd window covering `bytes`.
fn window_log(bytes: u64) -> u32 {
    (u64::BITS - bytes.max(1).next_power_of_two().leading_zeros() - 1).clamp(10, 30)
}

/// Makes the delta rebuilding `new` (a tar) from `base` (the old tar).
pub fn make(base: &[u8], new: &[u8]) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| malformed(format!("cannot compress: {e}"));
    let index = index_blocks(base);
    let mut segments = Vec::new();
    let mut frames = Vec::new();
    let mut shift = 0i64;
    for start in (0..new.len()).step_by(MAX_SEGMENT_BYTES as usize) {
        let end = (start + MAX_SEGMENT_BYTES as usize).min(new.len());
        shift = shift_near(new, start, &index).unwrap_or(shift);
        let centre = (start as i64 + shift).clamp(0, base.len() as i64) as u64;
        let base_offset = centre.saturating_sub(MARGIN_BYTES);
        let base_end = (centre + MAX_SEGMENT_BYTES + MARGIN_BYTES).min(base.len() as u64);
        let base_offset = base_offset.min(base_end);
        let reference = &base[base_offset as usize..base_end as usize];
        let segment = &new[start..end];
        let mut encoder =
            zstd::Encoder::with_ref_prefix(Vec::new(), LEVEL, reference).map_err(io)?;
        encoder
            .window_log(window_log(reference.len() as u64 + segment.len() as u64))
            .map_err(io)?;
        encoder
            .set_pledged_src_size(Some(segment.len() as u64))
            .map_err(io)?;
        encoder.include_checksum(true).map_err(io)?;
        encoder.write_all(segment).map_err(io)?;
        let frame = encoder.finish().map_err(io)?;
        segments.push(Segment {
            base_offset,
            base_length: base_end - base_offset,
            result_length: segment.len() as u64,
            frame_length: frame.len() as u64,
        });
        frames.extend_from_slice(&frame);
    }
    let header = Header {
        base_tar_length: base.len() as u64,
        result_tar_length: new.len() as u64,
        segments,
    };
    let header = serde_json::to_vec(&header).map_err(|e| malformed(e.to_string()))?;
    let mut delta = Vec::with_capacity(MAGIC.len() + 4 + header.len() + frames.len());
    delta.extend_from_slice(MAGIC);
    delta.extend_from_slice(&(header.len() as u32).to_le_bytes());
    delta.extend_from_slice(&header);
    delta.extend_from_slice(&frames);
    Ok(delta)
}

/// Reads a delta's header, checking its shape against the limits and the
/// old tar's length.
pub fn read_header(delta: &mut impl Read, base_tar_length: u64) -> Result<Header> {
    let short = |e: std::io::Error| malformed(format!("cannot read its header: {e}"));
    let mut magic = [0u8; 8];
    delta.read_exact(&mut magic).map_err(short)?;
    if &magic != MAGIC {
        return Err(malformed("it is not a posfleet delta"));
    }
    let mut word = [0u8; 4];
    delta.read_exact(&mut word).map_err(short)?;
    let length = u32::from_le_bytes(word);
    if length > MAX_HEADER_BYTES {
        return Err(malformed(format!(
            "its header of {length} bytes is over the limit of {MAX_HEADER_BYTES}"
        )));
    }
    let mut bytes = vec![0u8; length as usize];
    delta.read_exact(&mut bytes).map_err(short)?;
    let header: Header =
        serde_json::from_slice(&bytes).map_err(|e| malformed(format!("its header: {e}")))?;
    header.check(base_tar_length)?;
    Ok(header)
}

/// Rebuilds the new tar into `out` from the old tar `base` (read in
/// regions, never whole) and `delta`, returning its length. Fails with
/// [`Error::Delta`] on a delta that does not fit `base` or does not
/// decode; what was written to `out` is then garbage.
pub fn apply(
    base: &mut (impl Read + Seek),
    base_tar_length: u64,
    delta: &mut impl Read,
    out: &mut impl Write,
) -> Result<u64> {
    let header = read_header(delta, base_tar_length)?;
    let io = |what: &str, e: std::io::Error| malformed(format!("{what}: {e}"));
    let mut reference = Vec::new();
    let mut written = 0u64;
    for (i, segment) in header.segments.iter().enumerate() {
        reference.resize(segment.base_length as usize, 0);
        base.seek(SeekFrom::Start(segment.base_offset))
            .map_err(|e| io("cannot read the old tar", e))?;
        base.read_exact(&mut reference)
            .map_err(|e| io("cannot read the old tar", e))?;
        let frame = std::io::BufReader::new(delta.by_ref().take(segment.frame_length));
        let mut decoder = zstd::Decoder::with_ref_prefix(frame, &reference)
            .map_err(|e| io("cannot start decoding", e))?
            .single_frame();
        decoder
            .window_log_max(window_log(MAX_REFERENCE_BYTES + MAX_SEGMENT_BYTES))
            .map_err(|e| io("cannot start decoding", e))?;
        // One byte more than promised tells a segment that runs long.
        let copied = std::io::copy(
            &mut (&mut decoder).take(segment.result_length + 1),
            &mut WriteOnly(&mut *out),
        )
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::Other => io(&format!("segment {i} does not decode"), e),
            _ => io(&format!("segment {i}"), e),
        })?;
        if copied != segment.result_length {
            return Err(malformed(format!(
                "segment {i} rebuilt {copied} bytes, not {}",
                segment.result_length
            )));
        }
        written += copied;
    }
    Ok(written)
}

/// Writes through to a writer (`io::copy` wants a sized `Write`).
struct WriteOnly<'a, W: Write>(&'a mut W);

impl<W: Write> Write for WriteOnly<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A delta made from two bundle files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Made {
    pub base: Manifest,
    pub result: Manifest,
    pub delta_bytes: u64,
    pub result_bundle_bytes: u64,
}

/// The tar inside a bundle file, whole.
fn read_tar(bundle: &Path) -> Result<Vec<u8>> {
    let read = |source| Error::Read {
        path: bundle.to_path_buf(),
        source,
    };
    let mut decoder = zstd::Decoder::new(File::open(bundle).map_err(read)?).map_err(read)?;
    let mut tar = Vec::new();
    decoder.read_to_end(&mut tar).map_err(read)?;
    Ok(tar)
}

fn manifest_of(bundle: &Path) -> Result<Manifest> {
    let file = File::open(bundle).map_err(|source| Error::Read {
        path: bundle.to_path_buf(),
        source,
    })?;
    crate::archive::read_manifest(BufReader::new(file))
}

/// Makes the delta from bundle file `base` to bundle file `result` (two
/// versions of one bundle, the result newer) into `out`. The publisher's
/// side: both tars are held in memory.
pub fn make_from_bundles(base: &Path, result: &Path, out: &Path) -> Result<Made> {
    let (base_manifest, result_manifest) = (manifest_of(base)?, manifest_of(result)?);
    if base_manifest.name != result_manifest.name || base_manifest.kind != result_manifest.kind {
        return Err(malformed(format!(
            "{} and {} are not versions of one bundle",
            base_manifest.target_name(),
            result_manifest.target_name()
        )));
    }
    if base_manifest.version >= result_manifest.version {
        return Err(malformed(format!(
            "{} is not older than {}",
            base_manifest.target_name(),
            result_manifest.target_name()
        )));
    }
    let delta = make(&read_tar(base)?, &read_tar(result)?)?;
    std::fs::write(out, &delta).map_err(|source| Error::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let result_bundle_bytes = std::fs::metadata(result)
        .map_err(|source| Error::Read {
            path: result.to_path_buf(),
            source,
        })?
        .len();
    Ok(Made {
        base: base_manifest,
        result: result_manifest,
        delta_bytes: delta.len() as u64,
        result_bundle_bytes,
    })
}

/// The till's side: rebuilds the newer bundle file `out` from bundle file
/// `base` and `delta`, the old tar written to `scratch` (a file, removed
/// after) and read from there in regions, the rebuilt tar packed as
/// [`crate::archive::build`] packs it. The caller checks `out` against the
/// signed target before anyone uses it: this trusts nothing and checks
/// nothing but the delta's shape.
pub fn rebuild_bundle(base: &Path, delta: &Path, scratch: &Path, out: &Path) -> Result<()> {
    let write = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Write {
            path: path.clone(),
            source,
        }
    };
    let read = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Read {
            path: path.clone(),
            source,
        }
    };
    let base_tar_length = {
        let mut decoder =
            zstd::Decoder::new(File::open(base).map_err(read(base))?).map_err(read(base))?;
        let mut tar = BufWriter::new(File::create(scratch).map_err(write(scratch))?);
        let length = std::io::copy(&mut decoder, &mut tar).map_err(read(base))?;
        tar.flush().map_err(write(scratch))?;
        length
    };
    let rebuilt = (|| {
        let mut base_tar = File::open(scratch).map_err(read(scratch))?;
        let mut delta_file = BufReader::new(File::open(delta).map_err(read(delta))?);
        let file = BufWriter::new(File::create(out).map_err(write(out))?);
        let mut encoder =
            zstd::Encoder::new(file, crate::archive::ZSTD_LEVEL).map_err(write(out))?;
        apply(
            &mut base_tar,
            base_tar_length,
            &mut delta_file,
            &mut encoder,
        )?;
        let mut file = encoder.finish().map_err(write(out))?;
        file.flush().map_err(write(out))?;
        file.into_inner()
            .map_err(|e| write(out)(e.into_error()))?
            .sync_all()
            .map_err(write(out))
    })();
    let _ = std::fs::remove_file(scratch);
    rebuilt
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A tar-like stream: 512-byte headers and rows of text.
    fn catalog(rows: usize, price_of: impl Fn(usize) -> u32) -> Vec<u8> {
        let mut bytes = vec![b'H'; 512];
        for row in 0..rows {
            bytes.extend_from_slice(
                format!(
                    "{row:08},Product {row} with a long description,{}\n",
                    price_of(row)
                )
                .as_bytes(),
            );
        }
        bytes.resize(bytes.len().next_multiple_of(512) + 1024, 0);
        bytes
    }

    fn rebuild(base: &[u8], delta: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        apply(
            &mut Cursor::new(base),
            base.len() as u64,
            &mut Cursor::new(delta),
            &mut out,
        )?;
        Ok(out)
    }

    #[test]
    fn a_catalog_with_one_price_in_a_hundred_changed_travels_in_a_small_delta() {
        // About 10 MiB: several segments, prices that change length.
        let old = catalog(160_000, |row| 100 + (row % 900) as u32);
        let new = catalog(160_000, |row| {
            100 + (row % 900) as u32 + if row % 100 == 7 { 1000 } else { 0 }
        });
        let delta = make(&old, &new).unwrap();
        assert_eq!(rebuild(&old, &delta).unwrap(), new);
        let compressed = zstd::encode_all(&new[..], 9).unwrap();
        assert!(
            delta.len() * 20 < compressed.len(),
            "delta {} bytes, the new version compressed {} bytes",
            delta.len(),
            compressed.len()
        );
    }

    #[test]
    fn inserted_and_removed_bytes_still_find_their_old_region() {
        let mut old = Vec::new();
        for i in 0..6_000_000u32 {
            old.push((i.wrapping_mul(2_654_435_761) >> 24) as u8);
        }
        // 3 MiB of new bytes inserted early, 1 MiB removed later: every
        // later segment sits elsewhere than in the old tar.
        let mut new = old[..1_000_000].to_vec();
        new.extend((0..3_000_000u32).map(|i| (i.wrapping_mul(40_503) >> 7) as u8));
        new.extend_from_slice(&old[1_000_000..3_000_000]);
        new.extend_from_slice(&old[4_000_000..]);
        let delta = make(&old, &new).unwrap();
        assert_eq!(rebuild(&old, &delta).unwrap(), new);
        let inserted = 3_000_000;
        assert!(
            delta.len() < inserted + inserted / 10,
            "delta {} bytes for {inserted} new bytes",
            delta.len()
        );
    }

    #[test]
    fn empty_and_tiny_tars() {
        for (old, new) in [
            (Vec::new(), b"new".to_vec()),
            (b"old".to_vec(), Vec::new()),
            (Vec::new(), Vec::new()),
            (b"same".to_vec(), b"same".to_vec()),
        ] {
            let delta = make(&old, &new).unwrap();
            assert_eq!(rebuild(&old, &delta).unwrap(), new);
        }
    }

    #[test]
    fn a_delta_that_does_not_fit_is_refused_with_the_reason() {
        let old = catalog(20_000, |row| row as u32);
        let new = catalog(20_000, |row| row as u32 + u32::from(row == 5));
        let delta = make(&old, &new).unwrap();
        let header_length = u32::from_le_bytes(delta[8..12].try_into().unwrap()) as usize;
        let header =
            || -> Header { serde_json::from_slice(&delta[12..12 + header_length]).unwrap() };
        let with_header = |header: &Header| {
            let bytes = serde_json::to_vec(header).unwrap();
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(&bytes);
            out.extend_from_slice(&delta[12 + header_length..]);
            out
        };
        let mut long_segment = header();
        long_segment.segments[0].result_length = MAX_SEGMENT_BYTES + 1;
        let mut outside = header();
        outside.segments[0].base_offset = old.len() as u64;
        let mut huge_reference = header();
        huge_reference.segments[0].base_length = MAX_REFERENCE_BYTES + 1;
        let mut wrong_total = header();
        wrong_total.result_tar_length += 1;
        let mut flipped = delta.clone();
        let last = flipped.len() - 6;
        flipped[last] ^= 0xff;
        let mut oversized = MAGIC.to_vec();
        oversized.extend_from_slice(&(MAX_HEADER_BYTES + 1).to_le_bytes());

        let cases: Vec<(&str, Vec<u8>, &[u8], &str)> = vec![
            (
                "another base",
                delta.clone(),
                &old[512..],
                "applies to a tar of",
            ),
            (
                "not a delta",
                b"PK\x03\x04 a zip".to_vec(),
                &old,
                "not a posfleet delta",
            ),
            (
                "cut short",
                delta[..delta.len() - 10].to_vec(),
                &old,
                "segment",
            ),
            ("bit flipped", flipped, &old, "segment"),
            ("oversized header", oversized, &old, "over the limit"),
            (
                "segment too long",
                with_header(&long_segment),
                &old,
                "rebuilds",
            ),
            ("region outside", with_header(&outside), &old, "refers to"),
            (
                "region too large",
                with_header(&huge_reference),
                &old,
                "refers to",
            ),
            (
                "lengths disagree",
                with_header(&wrong_total),
                &old,
                "its segments rebuild",
            ),
        ];
        for (what, delta, base, expected) in cases {
            match rebuild(base, &delta) {
                Err(Error::Delta(message)) => {
                    assert!(message.contains(expected), "{what}: {message}")
                }
                Ok(_) => panic!("{what}: applied"),
                Err(other) => panic!("{what}: {other}"),
            }
        }
    }

    /// Two versions of a small bundle, packed as ops pack them.
    fn bundles(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let source = |version: &str, price: u32| {
            let src = dir.join(format!("src-{version}"));
            std::fs::create_dir_all(src.join("data")).unwrap();
            std::fs::write(
                src.join("posfleet-bundle.toml"),
                format!(
                    "name = \"catalog-eu\"\nversion = \"{version}\"\nkind = \"catalog\"\nhardware = [\"*\"]\n"
                ),
            )
            .unwrap();
            let rows = catalog(30_000, |row| row as u32 + u32::from(row % 100 == 3) * price);
            std::fs::write(src.join("data/products.csv"), rows).unwrap();
            let out = dir.join(format!("catalog-{version}.bundle"));
            crate::archive::build(&src, &out).unwrap();
            out
        };
        (source("1.0.0", 0), source("1.1.0", 7))
    }

    #[test]
    fn a_bundle_rebuilt_from_its_predecessor_and_a_delta_is_byte_for_byte_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = bundles(dir.path());
        let delta = dir.path().join("1.1.0-from-1.0.0.delta");
        let made = make_from_bundles(&old, &new, &delta).unwrap();
        assert_eq!(made.base.target_name(), "catalog-eu/1.0.0");
        assert_eq!(made.result.target_name(), "catalog-eu/1.1.0");
        assert_eq!(made.delta_bytes, std::fs::metadata(&delta).unwrap().len());
        assert!(made.delta_bytes * 20 < made.result_bundle_bytes, "{made:?}");

        let out = dir.path().join("rebuilt.bundle");
        let scratch = dir.path().join("base.tar");
        rebuild_bundle(&old, &delta, &scratch, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&new).unwrap());
        assert!(!scratch.exists(), "the old tar is removed");

        // Against the wrong base: refused, and the scratch file goes too.
        let err = rebuild_bundle(&new, &delta, &scratch, &out).unwrap_err();
        assert!(matches!(err, Error::Delta(_)), "{err}");
        assert!(!scratch.exists());
    }

    #[test]
    fn deltas_go_forward_between_versions_of_one_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = bundles(dir.path());
        let delta = dir.path().join("d");
        let err = make_from_bundles(&new, &old, &delta).unwrap_err();
        assert!(err.to_string().contains("is not older than"), "{err}");
        let err = make_from_bundles(&old, &old, &delta).unwrap_err();
        assert!(err.to_string().contains("is not older than"), "{err}");
        assert!(!delta.exists());
    }
}
