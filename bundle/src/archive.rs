//! The bundle archive: a source directory with `posfleet-bundle.toml` at its
//! root, packed as tar + zstd, reproducibly: the same directory gives the
//! same bytes on any machine (sorted entries, fixed times, owners and modes).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::manifest::{MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest};

/// zstd level: a fixed level keeps archives reproducible.
const ZSTD_LEVEL: i32 = 9;

/// Files and directories of `src`, relative, sorted, refusing what a bundle
/// cannot carry (symlinks, devices, sockets, non-UTF-8 names).
fn entries(src: &Path) -> Result<Vec<(PathBuf, bool)>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = src.join(&rel);
        let read = |source| Error::Read {
            path: dir.clone(),
            source,
        };
        let mut children: Vec<_> = std::fs::read_dir(&dir)
            .map_err(read)?
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(read)?;
        children.sort_by_key(|e| e.file_name());
        for child in children {
            let name = child.file_name();
            let path = rel.join(&name);
            if name.to_str().is_none() {
                return Err(Error::UnsupportedEntry {
                    path: src.join(&path),
                    what: "a name that is not UTF-8",
                });
            }
            let file_type = child.file_type().map_err(|source| Error::Read {
                path: src.join(&path),
                source,
            })?;
            if file_type.is_dir() {
                out.push((path.clone(), true));
                stack.push(path);
            } else if file_type.is_file() {
                out.push((path, false));
            } else {
                return Err(Error::UnsupportedEntry {
                    path: src.join(&path),
                    what: if file_type.is_symlink() {
                        "a symbolic link"
                    } else {
                        "a special file"
                    },
                });
            }
        }
    }
    out.sort();
    Ok(out)
}

fn header(size: u64, mode: u32, dir: bool) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_size(size);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(if dir {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    header
}

/// Packs `src` into `out` and returns its manifest.
pub fn build(src: &Path, out: &Path) -> Result<Manifest> {
    use std::os::unix::fs::PermissionsExt;
    let manifest_path = src.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path).map_err(|source| Error::Read {
        path: manifest_path.clone(),
        source,
    })?;
    let manifest = Manifest::parse(&text, &manifest_path)?;
    let write_error = |source| Error::Write {
        path: out.to_path_buf(),
        source,
    };
    let file = File::create(out).map_err(write_error)?;
    let encoder = zstd::Encoder::new(BufWriter::new(file), ZSTD_LEVEL).map_err(write_error)?;
    let mut tar = tar::Builder::new(encoder);
    tar.mode(tar::HeaderMode::Deterministic);
    for (rel, is_dir) in entries(src)? {
        let full = src.join(&rel);
        if is_dir {
            let mut h = header(0, 0o755, true);
            tar.append_data(&mut h, &rel, std::io::empty())
                .map_err(write_error)?;
            continue;
        }
        let read = |source| Error::Read {
            path: full.clone(),
            source,
        };
        let file = File::open(&full).map_err(read)?;
        let meta = file.metadata().map_err(read)?;
        let executable = meta.permissions().mode() & 0o100 != 0;
        let mut h = header(meta.len(), if executable { 0o755 } else { 0o644 }, false);
        tar.append_data(&mut h, &rel, file).map_err(write_error)?;
    }
    let encoder = tar.into_inner().map_err(write_error)?;
    let mut writer = encoder.finish().map_err(write_error)?;
    writer.flush().map_err(write_error)?;
    writer
        .into_inner()
        .map_err(|e| write_error(e.into_error()))?
        .sync_all()
        .map_err(write_error)?;
    Ok(manifest)
}

/// Reads the manifest from an archive without unpacking it.
pub fn read_manifest(archive: impl Read) -> Result<Manifest> {
    let decoder = zstd::Decoder::new(archive).map_err(|e| Error::Archive(e.to_string()))?;
    let mut tar = tar::Archive::new(decoder);
    for entry in tar.entries().map_err(|e| Error::Archive(e.to_string()))? {
        let entry = entry.map_err(|e| Error::Archive(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| Error::Archive(e.to_string()))?
            .into_owned();
        if path == Path::new(MANIFEST_FILE) {
            if entry.size() > MAX_MANIFEST_BYTES {
                return Err(Error::Archive(format!(
                    "{MANIFEST_FILE} is over {MAX_MANIFEST_BYTES} bytes"
                )));
            }
            let mut text = String::new();
            entry
                .take(MAX_MANIFEST_BYTES)
                .read_to_string(&mut text)
                .map_err(|e| Error::Archive(e.to_string()))?;
            return Manifest::parse(&text, &path);
        }
    }
    Err(Error::MissingManifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(dir: &Path) {
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(
            dir.join(MANIFEST_FILE),
            "name = \"pos-app\"\nversion = \"1.0.0\"\nkind = \"software\"\nhardware = [\"*\"]\n",
        )
        .unwrap();
        std::fs::write(dir.join("bin/pos-app"), b"#!/bin/sh\necho ok\n").unwrap();
        std::fs::write(dir.join("README"), b"hello").unwrap();
    }

    #[test]
    fn the_same_source_packs_to_the_same_bytes() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        source(a.path());
        source(b.path());
        // Different times and permissions on disk must not matter.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            b.path().join("README"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        let (x, y) = (out.path().join("x.bundle"), out.path().join("y.bundle"));
        let manifest = build(a.path(), &x).unwrap();
        build(b.path(), &y).unwrap();
        assert_eq!(std::fs::read(&x).unwrap(), std::fs::read(&y).unwrap());
        assert_eq!(read_manifest(File::open(&x).unwrap()).unwrap(), manifest);
    }

    #[test]
    fn symlinks_and_missing_manifests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        source(dir.path());
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let out = dir.path().join("../out.bundle");
        assert!(matches!(
            build(dir.path(), &out),
            Err(Error::UnsupportedEntry { .. })
        ));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(build(empty.path(), &out), Err(Error::Read { .. })));
        assert!(matches!(
            read_manifest(&b"not zstd"[..]),
            Err(Error::Archive(_))
        ));
    }
}
