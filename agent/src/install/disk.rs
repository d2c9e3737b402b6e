//! The slots' primitives on disk: the atomic switch of `current` (a new
//! link renamed over it), slots removed by renaming them away first, the
//! journal written atomically, directories synced after each change, and
//! archives unpacked into a staging dir. Each leaves a slot whole or
//! absent whenever it stops.

use posfleet_bundle::archive::{UnpackLimits, unpack};
use posfleet_bundle::manifest::Manifest;
use posfleet_runtime::files::temporary_path;
use semver::Version;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::recovery::{Disk, Journal, Link};
use crate::error::Error;
use crate::files;

/// The slots' directory in the data dir.
pub(super) const SLOTS_DIR: &str = "slots";
/// The link naming a bundle's active version.
pub(crate) const CURRENT_LINK: &str = "current";
/// A bundle's install journal.
pub(super) const JOURNAL_FILE: &str = "journal.json";
/// The temporary name of the next `current` link.
pub(crate) const CURRENT_TMP: &str = ".current.tmp";
pub(crate) const STAGING_PREFIX: &str = ".staging-";
pub(crate) const TRASH_PREFIX: &str = ".trash-";

/// `text` as a version, if it is one written the way slots are named.
pub(crate) fn parse_version(text: &str) -> Option<Version> {
    Version::parse(text).ok().filter(|v| v.to_string() == text)
}

pub(crate) fn write_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Write {
        path: path.to_path_buf(),
        source,
    }
}

pub(super) fn is_disk_full(error: &Error) -> bool {
    matches!(
        error,
        Error::Write { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
    )
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_error(dir))
}

/// Removes a file, link or directory tree; absent is fine.
pub(crate) fn remove_any(path: &Path) -> Result<(), Error> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(write_error(path))
}

pub(super) fn read_current(dir: &Path) -> Result<Link, Error> {
    read_link(&dir.join(CURRENT_LINK), "")
}

/// Where the link at `path` points: to `<prefix><version>`, or broken.
pub(crate) fn read_link(path: &Path, prefix: &str) -> Result<Link, Error> {
    let path = path.to_path_buf();
    match std::fs::read_link(&path) {
        Ok(target) => Ok(
            match target
                .to_str()
                .and_then(|t| t.strip_prefix(prefix))
                .and_then(parse_version)
            {
                Some(v) => Link::To(v),
                None => Link::Broken(format!("pointed to `{}`", target.display())),
            },
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Link::Missing),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            Ok(Link::Broken("was not a symbolic link".into()))
        }
        Err(source) => Err(Error::Read { path, source }),
    }
}

/// What is in a bundle's directory, and the temporary entries a crash left.
pub(super) fn scan(dir: &Path) -> Result<(Disk, Vec<PathBuf>), Error> {
    let read_error = |source| Error::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut slots = BTreeSet::new();
    let mut leftovers = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(STAGING_PREFIX)
            || name.starts_with(TRASH_PREFIX)
            || name == CURRENT_TMP
            || entry.path() == temporary_path(&dir.join(JOURNAL_FILE))
        {
            leftovers.push(entry.path());
        } else if let Some(version) = parse_version(name)
            && entry.file_type().map_err(read_error)?.is_dir()
        {
            slots.insert(version);
        }
    }
    let current = read_current(dir)?;
    Ok((Disk { current, slots }, leftovers))
}

pub(super) fn load_journal(dir: &Path) -> Result<Journal, Error> {
    let path = dir.join(JOURNAL_FILE);
    Ok(match files::read_optional(&path)? {
        None => Journal::Stable { active: None },
        Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            // Written atomically, so only a damaged disk gets here; the
            // `current` link is then the best guide.
            tracing::warn!(path = %path.display(), %error, "Install journal unreadable; trusting the current link.");
            Journal::Stable { active: None }
        }),
    })
}

pub(super) fn write_journal(dir: &Path, journal: &Journal) -> Result<(), Error> {
    // Versions and strings only: serializing cannot fail.
    let bytes = serde_json::to_vec_pretty(journal).expect("plain data serializes");
    files::write_private(&dir.join(JOURNAL_FILE), &bytes)
}

/// Points `current` at `version`: a new link renamed over the old one.
pub(super) fn switch_link(dir: &Path, version: &Version) -> Result<(), Error> {
    replace_link(dir, &version.to_string())
}

/// Points `dir/current` at `target` (relative to `dir`): a new link
/// renamed over the old one, the folder synced.
pub(crate) fn replace_link(dir: &Path, target: &str) -> Result<(), Error> {
    let tmp = dir.join(CURRENT_TMP);
    remove_any(&tmp)?;
    std::os::unix::fs::symlink(target, &tmp).map_err(write_error(&tmp))?;
    let current = dir.join(CURRENT_LINK);
    std::fs::rename(&tmp, &current).map_err(write_error(&current))?;
    sync_dir(dir)
}

pub(crate) fn remove_link(dir: &Path) -> Result<(), Error> {
    remove_any(&dir.join(CURRENT_LINK))?;
    sync_dir(dir)
}

/// Removes a slot: renamed away first, so it is never seen half removed.
pub(crate) fn remove_slot(dir: &Path, version: &Version) -> Result<(), Error> {
    let slot = dir.join(version.to_string());
    if std::fs::symlink_metadata(&slot).is_err() {
        return Ok(());
    }
    let trash = dir.join(format!("{TRASH_PREFIX}{version}"));
    remove_any(&trash)?;
    std::fs::rename(&slot, &trash).map_err(write_error(&slot))?;
    sync_dir(dir)?;
    if let Err(error) = remove_any(&trash) {
        // Out of the way already; `recover` finishes the job.
        tracing::warn!(path = %trash.display(), %error, "Cannot remove an old slot.");
    }
    Ok(())
}

/// Unpacks `archive` into a new `staging` dir. A failure is its reason in
/// words, and whether the disk is full (worth retrying once space is freed).
pub(crate) async fn unpack_into(
    name: &str,
    version: &Version,
    archive: &Path,
    staging: &Path,
    limits: UnpackLimits,
) -> Result<Manifest, (String, bool)> {
    let made = remove_any(staging).and_then(|()| {
        std::fs::create_dir(staging).map_err(write_error(staging))?;
        Ok(())
    });
    if let Err(error) = made {
        return Err(if is_disk_full(&error) {
            (format!("the disk is full: {error}"), true)
        } else {
            (error.to_string(), false)
        });
    }
    let (archive, staging) = (archive.to_path_buf(), staging.to_path_buf());
    let unpacked = tokio::task::spawn_blocking(move || {
        let file =
            std::fs::File::open(&archive).map_err(|source| posfleet_bundle::Error::Read {
                path: archive.clone(),
                source,
            })?;
        unpack(file, &staging, &limits)
    })
    .await;
    match unpacked {
        Ok(Ok(manifest)) => Ok(manifest),
        Ok(Err(error)) if error.is_disk_full() => Err((
            format!("the disk is full: cannot unpack {name} {version} ({error})"),
            true,
        )),
        Ok(Err(error)) => Err((format!("cannot unpack {name} {version}: {error}"), false)),
        Err(error) => Err((
            format!("unpacking {name} {version} stopped: {error}"),
            false,
        )),
    }
}
