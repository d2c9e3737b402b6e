//! The bundle archive: a source directory with `posfleet-bundle.toml` at its
//! root, packed as tar + zstd, reproducibly: the same directory gives the
//! same bytes on any machine (sorted entries, fixed times, owners and modes).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::manifest::{MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest};

/// zstd level: a fixed level keeps archives reproducible.
pub(crate) const ZSTD_LEVEL: i32 = 9;

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

/// Bounds on what [`unpack`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Total size of the unpacked files (the zip-bomb guard).
    pub max_unpacked_bytes: u64,
    /// Files and directories in the archive.
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_unpacked_bytes: 8 << 30,
            max_entries: 100_000,
        }
    }
}

/// Longest GNU long name read (the Linux `PATH_MAX`).
const MAX_LONG_NAME_BYTES: u64 = 4096;
/// Bytes accepted after the end-of-archive marker (tar pads to whole records).
const MAX_TRAILING_BYTES: u64 = 1 << 20;
/// Copy buffer: files are streamed through it, never held whole.
const COPY_BUFFER_BYTES: usize = 64 * 1024;

fn malformed(e: std::io::Error) -> Error {
    Error::Archive(e.to_string())
}

/// Unpacks `archive` into `dest`, an existing empty directory, and returns
/// the manifest read back from the unpacked `posfleet-bundle.toml`.
///
/// Streams: neither the archive nor any file in it is held in memory. Only
/// regular files and directories are made, with mode 0755 (directories and
/// executables) or 0644; every file and every directory made is fsynced
/// before this returns, so a power cut afterwards cannot leave empty files.
/// Refused, each with its own error: absolute paths, `..` components,
/// symbolic and hard links, devices, fifos and other special entries,
/// non-UTF-8 names, duplicate entries, more than `limits` allow, and a
/// missing or invalid manifest.
///
/// On error `dest` may hold part of the archive (never anything outside
/// it); the caller removes it.
pub fn unpack(archive: impl Read, dest: &Path, limits: &UnpackLimits) -> Result<Manifest> {
    check_empty_dir(dest)?;
    let decoder = zstd::Decoder::new(archive).map_err(malformed)?;
    let mut tar = tar::Archive::new(decoder);
    let mut unpacker = Unpacker {
        dest,
        limits,
        seen: HashSet::new(),
        dirs: HashSet::new(),
        made_dirs: Vec::new(),
        entries: 0,
        bytes: 0,
        has_manifest: false,
        buf: vec![0; COPY_BUFFER_BYTES],
    };
    {
        // Raw entries: the tar crate would read GNU long names and pax
        // headers into memory without a bound; long names are read here,
        // bounded, and pax headers are refused (`build` never writes them).
        let entries = tar.entries().map_err(malformed)?.raw(true);
        let mut long_name: Option<Vec<u8>> = None;
        for entry in entries {
            let mut entry = entry.map_err(malformed)?;
            if entry.header().entry_type().is_gnu_longname() {
                if long_name.is_some() {
                    return Err(Error::Archive("two long names for one entry".into()));
                }
                long_name = Some(read_long_name(&mut entry)?);
                continue;
            }
            let raw_path = match long_name.take() {
                Some(name) => name,
                None => entry.path_bytes().into_owned(),
            };
            unpacker.entry(&mut entry, &raw_path)?;
        }
        if long_name.is_some() {
            return Err(Error::Archive("a long name with no entry after it".into()));
        }
    }
    // The end-of-archive marker comes before the end of the compressed
    // stream: read on to its end, so that a stream cut short is refused.
    let mut rest = tar.into_inner().take(MAX_TRAILING_BYTES + 1);
    let trailing = std::io::copy(&mut rest, &mut std::io::sink()).map_err(malformed)?;
    if trailing > MAX_TRAILING_BYTES {
        return Err(Error::Archive(format!(
            "more than {MAX_TRAILING_BYTES} bytes after the end of the archive"
        )));
    }
    unpacker.finish()
}

fn check_empty_dir(dest: &Path) -> Result<()> {
    let refuse = |message: String| Error::UnpackDestination {
        path: dest.to_path_buf(),
        message,
    };
    let mut children = std::fs::read_dir(dest).map_err(|e| refuse(e.to_string()))?;
    if children.next().is_some() {
        return Err(refuse("the directory is not empty".into()));
    }
    Ok(())
}

fn read_long_name(entry: &mut impl Read) -> Result<Vec<u8>> {
    let mut name = Vec::new();
    entry
        .take(MAX_LONG_NAME_BYTES + 1)
        .read_to_end(&mut name)
        .map_err(malformed)?;
    if name.len() as u64 > MAX_LONG_NAME_BYTES {
        return Err(Error::Archive(format!(
            "a long name over {MAX_LONG_NAME_BYTES} bytes"
        )));
    }
    if name.last() == Some(&0) {
        name.pop();
    }
    Ok(name)
}

/// `path` as a relative path below the destination: refuses absolute paths
/// and `..`, drops `.` and empty components (`./bin/`, `a//b`).
fn relative_path(path: &str) -> Result<PathBuf> {
    if path.starts_with('/') {
        return Err(Error::AbsolutePath { path: path.into() });
    }
    let mut rel = PathBuf::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(Error::PathTraversal { path: path.into() }),
            part => rel.push(part),
        }
    }
    Ok(rel)
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| Error::Write {
            path: path.to_path_buf(),
            source,
        })
}

struct Unpacker<'a> {
    dest: &'a Path,
    limits: &'a UnpackLimits,
    /// Paths of the entries so far (duplicates are refused).
    seen: HashSet<PathBuf>,
    /// Directories made, listed in the archive or not.
    dirs: HashSet<PathBuf>,
    /// The same, in the order they were made (parents first).
    made_dirs: Vec<PathBuf>,
    entries: u64,
    bytes: u64,
    has_manifest: bool,
    buf: Vec<u8>,
}

impl Unpacker<'_> {
    fn entry(&mut self, entry: &mut tar::Entry<'_, impl Read>, raw_path: &[u8]) -> Result<()> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(Error::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        let path = std::str::from_utf8(raw_path).map_err(|_| Error::NonUtf8Name {
            path: String::from_utf8_lossy(raw_path).into_owned(),
        })?;
        let rel = relative_path(path)?;
        let link_target = || {
            entry
                .link_name_bytes()
                .map(|t| String::from_utf8_lossy(&t).into_owned())
                .unwrap_or_default()
        };
        let special = |what| {
            Err(Error::SpecialEntry {
                path: path.into(),
                what,
            })
        };
        use tar::EntryType;
        match entry.header().entry_type() {
            EntryType::Regular => {}
            EntryType::Directory => {}
            EntryType::Symlink => {
                return Err(Error::Symlink {
                    path: path.into(),
                    target: link_target(),
                });
            }
            EntryType::Link => {
                return Err(Error::HardLink {
                    path: path.into(),
                    target: link_target(),
                });
            }
            EntryType::Char | EntryType::Block => return special("a device"),
            EntryType::Fifo => return special("a fifo"),
            EntryType::GNUSparse => return special("a sparse file"),
            EntryType::XHeader | EntryType::XGlobalHeader => {
                return special("a pax extended header");
            }
            EntryType::GNULongLink => return special("a GNU long link name"),
            _ => return special("an unknown entry type"),
        }
        let is_dir = entry.header().entry_type().is_dir();
        if rel.as_os_str().is_empty() {
            // `./`: the destination itself.
            return if is_dir {
                Ok(())
            } else {
                Err(Error::Archive(format!("file entry `{path}` has no name")))
            };
        }
        if !self.seen.insert(rel.clone()) || (!is_dir && self.dirs.contains(&rel)) {
            return Err(Error::DuplicateEntry { path: path.into() });
        }
        if is_dir {
            if entry.size() != 0 {
                return Err(Error::Archive(format!(
                    "directory entry `{path}` carries data"
                )));
            }
            return self.make_dirs(&rel);
        }
        if let Some(parent) = rel.parent() {
            self.make_dirs(parent)?;
        }
        self.write_file(entry, path, &rel)
    }

    /// Makes `rel` and its missing parents, 0755.
    fn make_dirs(&mut self, rel: &Path) -> Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let mut partial = PathBuf::new();
        for part in rel.components() {
            partial.push(part);
            if self.dirs.contains(&partial) {
                continue;
            }
            let full = self.dest.join(&partial);
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(&full)
                // The umask may have taken bits away.
                .and_then(|()| {
                    std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o755))
                })
                .map_err(|source| Error::Write {
                    path: full.clone(),
                    source,
                })?;
            self.dirs.insert(partial.clone());
            self.made_dirs.push(partial.clone());
        }
        Ok(())
    }

    fn write_file(
        &mut self,
        entry: &mut tar::Entry<'_, impl Read>,
        path: &str,
        rel: &Path,
    ) -> Result<()> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let too_large = Error::UnpackedTooLarge {
            limit: self.limits.max_unpacked_bytes,
        };
        let size = entry.size();
        match self.bytes.checked_add(size) {
            Some(total) if total <= self.limits.max_unpacked_bytes => {}
            _ => return Err(too_large),
        }
        let executable = entry.header().mode().map_err(malformed)? & 0o111 != 0;
        let mode = if executable { 0o755 } else { 0o644 };
        let full = self.dest.join(rel);
        let write_error = |source| Error::Write {
            path: full.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&full)
            .map_err(write_error)?;
        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Archive(format!("`{path}`: {e}"))),
            };
            written += n as u64;
            if written > size {
                // The tar reader stops at the declared size; not reached.
                return Err(Error::Archive(format!("`{path}` is longer than declared")));
            }
            file.write_all(&self.buf[..n]).map_err(write_error)?;
        }
        if written != size {
            return Err(Error::Archive(format!(
                "the archive ends inside `{path}` ({written} of {size} bytes)"
            )));
        }
        self.bytes += size;
        // The umask may have taken bits away; setuid and the like never pass.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .and_then(|()| file.sync_all())
            .map_err(write_error)?;
        if rel == Path::new(MANIFEST_FILE) {
            self.has_manifest = true;
        }
        Ok(())
    }

    /// Syncs the directories made (children before parents, then `dest`)
    /// and reads the manifest back.
    fn finish(self) -> Result<Manifest> {
        for dir in self.made_dirs.iter().rev() {
            sync_dir(&self.dest.join(dir))?;
        }
        sync_dir(self.dest)?;
        if !self.has_manifest {
            return Err(Error::MissingManifest);
        }
        let path = self.dest.join(MANIFEST_FILE);
        let read = |source| Error::Read {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(read)?;
        if file.metadata().map_err(read)?.len() > MAX_MANIFEST_BYTES {
            return Err(Error::Archive(format!(
                "{MANIFEST_FILE} is over {MAX_MANIFEST_BYTES} bytes"
            )));
        }
        let mut text = String::new();
        file.take(MAX_MANIFEST_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| Error::Manifest {
                path: PathBuf::from(MANIFEST_FILE),
                message: e.to_string(),
            })?;
        Manifest::parse(&text, Path::new(MANIFEST_FILE))
    }
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
