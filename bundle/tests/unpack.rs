//! `archive::unpack`: what `build` packs comes back byte for byte, and every
//! hostile archive is refused with its own error, writing nothing outside the
//! destination.

use posfleet_bundle::Error;
use posfleet_bundle::archive::{UnpackLimits, build, unpack};
use posfleet_bundle::manifest::MANIFEST_FILE;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tar::EntryType;

const MANIFEST: &str =
    "name = \"pos-app\"\nversion = \"1.0.0\"\nkind = \"software\"\nhardware = [\"*\"]\n";

/// A destination inside a root that nothing else writes to, so that an
/// escape shows up as something in the root besides `dest`.
struct Sandbox {
    root: tempfile::TempDir,
    dest: PathBuf,
}

impl Sandbox {
    fn new() -> Sandbox {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        Sandbox { root, dest }
    }

    fn unpack(
        &self,
        archive: &[u8],
    ) -> posfleet_bundle::Result<posfleet_bundle::manifest::Manifest> {
        self.unpack_with(archive, &UnpackLimits::default())
    }

    fn unpack_with(
        &self,
        archive: &[u8],
        limits: &UnpackLimits,
    ) -> posfleet_bundle::Result<posfleet_bundle::manifest::Manifest> {
        unpack(archive, &self.dest, limits)
    }

    /// Fails the test if anything but `dest` is in the root.
    fn assert_nothing_outside(&self) {
        let outside: Vec<_> = std::fs::read_dir(self.root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|name| name != "dest")
            .collect();
        assert!(outside.is_empty(), "written outside dest: {outside:?}");
    }
}

/// A tar header whose name and link name are written as raw bytes, so that
/// names the tar crate would refuse to write (`..`, absolute, not UTF-8)
/// can be made.
fn raw_header(path: &[u8], kind: EntryType, size: u64, mode: u32, link: &[u8]) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_mtime(0);
    let old = header.as_old_mut();
    old.name[..path.len()].copy_from_slice(path);
    old.linkname[..link.len()].copy_from_slice(link);
    header.set_cksum();
    header
}

/// A tar + zstd archive of `entries` (path, type, mode, data or link target).
fn archive(entries: &[(&[u8], EntryType, u32, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for &(path, kind, mode, data) in entries {
        let (size, link) = match kind {
            EntryType::Symlink | EntryType::Link => (0, data),
            _ => (data.len() as u64, &[][..]),
        };
        let header = raw_header(path, kind, size, mode, link);
        let data = if size == 0 { &[][..] } else { data };
        tar.append(&header, data).unwrap();
    }
    zstd::encode_all(&tar.into_inner().unwrap()[..], 3).unwrap()
}

fn manifest_entry() -> (&'static [u8], EntryType, u32, &'static [u8]) {
    (
        MANIFEST_FILE.as_bytes(),
        EntryType::Regular,
        0o644,
        MANIFEST.as_bytes(),
    )
}

/// Every file and directory below `root`, relative, with its mode and, for
/// files, its bytes.
fn tree(root: &Path) -> Vec<(PathBuf, u32, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for child in std::fs::read_dir(root.join(&rel)).unwrap() {
            let child = child.unwrap();
            let path = rel.join(child.file_name());
            let meta = std::fs::symlink_metadata(child.path()).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                out.push((path.clone(), mode, None));
                stack.push(path);
            } else {
                assert!(meta.is_file(), "{path:?} is neither a file nor a directory");
                out.push((path, mode, Some(std::fs::read(child.path()).unwrap())));
            }
        }
    }
    out.sort();
    out
}

fn source(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("share/empty")).unwrap();
    std::fs::write(dir.join(MANIFEST_FILE), MANIFEST).unwrap();
    std::fs::write(dir.join("bin/pos-app"), b"#!/bin/sh\necho ok\n").unwrap();
    std::fs::set_permissions(
        dir.join("bin/pos-app"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(dir.join("share/empty-file"), b"").unwrap();
    // Incompressible, and over one copy buffer.
    let mut noise = Vec::with_capacity(300_000);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..300_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.push(x as u8);
    }
    std::fs::write(dir.join("share/noise.bin"), noise).unwrap();
    // Past the 100 bytes of a ustar name: a GNU long name.
    let long = format!("share/{}", "l".repeat(150));
    std::fs::write(dir.join(long), b"long").unwrap();
}

fn built() -> (tempfile::TempDir, Vec<u8>) {
    let src = tempfile::tempdir().unwrap();
    source(src.path());
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("pos-app.bundle");
    build(src.path(), &path).unwrap();
    (src, std::fs::read(path).unwrap())
}

#[test]
fn round_trip_keeps_bytes_and_modes() {
    let (src, bytes) = built();
    let sandbox = Sandbox::new();
    let manifest = sandbox.unpack(&bytes).unwrap();
    assert_eq!(manifest.name, "pos-app");
    assert_eq!(manifest.version.to_string(), "1.0.0");
    // The source's modes are whatever the umask made; the archive's are 0755
    // for directories and executables and 0644 for the rest.
    let expected: Vec<_> = tree(src.path())
        .into_iter()
        .map(|(path, mode, data)| {
            let mode = if data.is_none() || mode & 0o100 != 0 {
                0o755
            } else {
                0o644
            };
            (path, mode, data)
        })
        .collect();
    assert_eq!(tree(&sandbox.dest), expected);
    sandbox.assert_nothing_outside();
}

/// What a bundle unpacked to packs again into the very same bytes (what a
/// till relies on to rebuild the base of a delta from its installed copy),
/// and a file changed since does not.
#[test]
fn a_bundle_packed_again_from_what_it_unpacked_to_is_the_same_bytes() {
    let (_src, bytes) = built();
    let sandbox = Sandbox::new();
    sandbox.unpack(&bytes).unwrap();
    let out = tempfile::tempdir().unwrap();
    let again = out.path().join("again.bundle");
    build(&sandbox.dest, &again).unwrap();
    assert!(
        std::fs::read(&again).unwrap() == bytes,
        "packed again differently"
    );

    std::fs::write(sandbox.dest.join("share/empty-file"), b"written since").unwrap();
    build(&sandbox.dest, &again).unwrap();
    assert!(std::fs::read(&again).unwrap() != bytes);
}

#[test]
fn setuid_and_other_mode_bits_are_dropped() {
    let sandbox = Sandbox::new();
    let bytes = archive(&[
        manifest_entry(),
        (b"bin/", EntryType::Directory, 0o7777, b""),
        (b"bin/su", EntryType::Regular, 0o4755, b"x"),
        (b"secret", EntryType::Regular, 0o2600, b"y"),
    ]);
    sandbox.unpack(&bytes).unwrap();
    let mode = |p: &str| {
        std::fs::metadata(sandbox.dest.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(
        (mode("bin"), mode("bin/su"), mode("secret")),
        (0o755, 0o755, 0o644)
    );
}

#[test]
fn parent_dir_components_are_refused() {
    for path in [&b"../evil"[..], b"bin/../../evil", b"./.."] {
        let sandbox = Sandbox::new();
        let bytes = archive(&[
            manifest_entry(),
            (path, EntryType::Regular, 0o644, b"pwned"),
        ]);
        let err = sandbox.unpack(&bytes).unwrap_err();
        assert!(
            matches!(&err, Error::PathTraversal { path: p } if p.as_bytes() == path),
            "{err}"
        );
        sandbox.assert_nothing_outside();
    }
}

#[test]
fn absolute_paths_are_refused() {
    let sandbox = Sandbox::new();
    // A place the test can watch, rather than /etc.
    let target = sandbox.root.path().join("escaped");
    let target = target.to_str().unwrap().as_bytes();
    let bytes = archive(&[
        manifest_entry(),
        (target, EntryType::Regular, 0o644, b"pwned"),
    ]);
    let err = sandbox.unpack(&bytes).unwrap_err();
    assert!(
        matches!(&err, Error::AbsolutePath { path } if path.as_bytes() == target),
        "{err}"
    );
    sandbox.assert_nothing_outside();
}

#[test]
fn symlinks_are_refused() {
    let sandbox = Sandbox::new();
    let root = sandbox.root.path().to_str().unwrap().as_bytes();
    let bytes = archive(&[
        manifest_entry(),
        (b"etc", EntryType::Symlink, 0o777, root),
        (b"etc/x", EntryType::Regular, 0o644, b"pwned"),
    ]);
    let err = sandbox.unpack(&bytes).unwrap_err();
    assert!(
        matches!(&err, Error::Symlink { path, target } if path == "etc" && target.as_bytes() == root),
        "{err}"
    );
    sandbox.assert_nothing_outside();
    assert!(
        std::fs::symlink_metadata(sandbox.dest.join("etc")).is_err(),
        "the link was made"
    );
}

#[test]
fn hard_links_are_refused() {
    let sandbox = Sandbox::new();
    let bytes = archive(&[
        manifest_entry(),
        (b"passwd", EntryType::Link, 0o644, b"/etc/passwd"),
    ]);
    let err = sandbox.unpack(&bytes).unwrap_err();
    assert!(
        matches!(&err, Error::HardLink { path, target } if path == "passwd" && target == "/etc/passwd"),
        "{err}"
    );
    assert!(!sandbox.dest.join("passwd").exists());
    sandbox.assert_nothing_outside();
}

#[test]
fn fifos_and_devices_are_refused() {
    for (kind, what) in [
        (EntryType::Fifo, "a fifo"),
        (EntryType::Char, "a device"),
        (EntryType::Block, "a device"),
    ] {
        let sandbox = Sandbox::new();
        let bytes = archive(&[manifest_entry(), (b"dev", kind, 0o644, b"")]);
        let err = sandbox.unpack(&bytes).unwrap_err();
        assert!(
            matches!(&err, Error::SpecialEntry { path, what: w } if path == "dev" && *w == what),
            "{err}"
        );
        assert!(std::fs::symlink_metadata(sandbox.dest.join("dev")).is_err());
        sandbox.assert_nothing_outside();
    }
}

#[test]
fn non_utf8_names_are_refused() {
    let sandbox = Sandbox::new();
    let bytes = archive(&[
        manifest_entry(),
        (b"caf\xe9", EntryType::Regular, 0o644, b"x"),
    ]);
    let err = sandbox.unpack(&bytes).unwrap_err();
    assert!(matches!(&err, Error::NonUtf8Name { .. }), "{err}");
    assert_eq!(std::fs::read_dir(&sandbox.dest).unwrap().count(), 1);
    sandbox.assert_nothing_outside();
}

#[test]
fn duplicate_entries_are_refused() {
    for second in [&b"bin/app"[..], b"./bin/app", b"bin//app"] {
        let sandbox = Sandbox::new();
        let bytes = archive(&[
            manifest_entry(),
            (b"bin/app", EntryType::Regular, 0o755, b"first"),
            (second, EntryType::Regular, 0o755, b"second"),
        ]);
        let err = sandbox.unpack(&bytes).unwrap_err();
        assert!(matches!(&err, Error::DuplicateEntry { .. }), "{err}");
        assert_eq!(
            std::fs::read(sandbox.dest.join("bin/app")).unwrap(),
            b"first"
        );
        sandbox.assert_nothing_outside();
    }
    // A file where a directory was made.
    let sandbox = Sandbox::new();
    let bytes = archive(&[
        manifest_entry(),
        (b"bin/app", EntryType::Regular, 0o755, b"first"),
        (b"bin", EntryType::Regular, 0o644, b"second"),
    ]);
    let err = sandbox.unpack(&bytes).unwrap_err();
    assert!(
        matches!(&err, Error::DuplicateEntry { path } if path == "bin"),
        "{err}"
    );
}

#[test]
fn more_bytes_than_the_limit_are_refused() {
    let limits = UnpackLimits {
        max_unpacked_bytes: 1000,
        ..UnpackLimits::default()
    };
    let sandbox = Sandbox::new();
    let bytes = archive(&[
        manifest_entry(),
        (b"a", EntryType::Regular, 0o644, &[0; 400]),
        (b"b", EntryType::Regular, 0o644, &[0; 600]),
    ]);
    let err = sandbox.unpack_with(&bytes, &limits).unwrap_err();
    assert!(
        matches!(err, Error::UnpackedTooLarge { limit: 1000 }),
        "{err}"
    );
    // Refused before it was written.
    assert!(!sandbox.dest.join("b").exists());
    sandbox.assert_nothing_outside();

    // A header claiming a huge file is refused before anything is read.
    let sandbox = Sandbox::new();
    let mut tar = tar::Builder::new(Vec::new());
    let header = raw_header(b"bomb", EntryType::Regular, 1 << 40, 0o644, b"");
    tar.append(&header, &[][..]).unwrap();
    let bytes = zstd::encode_all(&tar.into_inner().unwrap()[..], 3).unwrap();
    let err = sandbox.unpack(&bytes).unwrap_err();
    assert!(matches!(err, Error::UnpackedTooLarge { .. }), "{err}");
    assert!(!sandbox.dest.join("bomb").exists());
}

#[test]
fn more_entries_than_the_limit_are_refused() {
    let limits = UnpackLimits {
        max_entries: 3,
        ..UnpackLimits::default()
    };
    let sandbox = Sandbox::new();
    let bytes = archive(&[
        manifest_entry(),
        (b"a", EntryType::Directory, 0o755, b""),
        (b"a/b", EntryType::Directory, 0o755, b""),
        (b"a/b/c", EntryType::Regular, 0o644, b""),
    ]);
    let err = sandbox.unpack_with(&bytes, &limits).unwrap_err();
    assert!(matches!(err, Error::TooManyEntries { limit: 3 }), "{err}");
    assert!(!sandbox.dest.join("a/b/c").exists());
    sandbox.assert_nothing_outside();
}

#[test]
fn a_missing_or_invalid_manifest_is_refused() {
    let sandbox = Sandbox::new();
    let bytes = archive(&[(b"bin/app", EntryType::Regular, 0o755, b"x")]);
    let err = sandbox.unpack(&bytes).unwrap_err();
    assert!(matches!(err, Error::MissingManifest), "{err}");

    // Only a regular file at the root counts.
    let sandbox = Sandbox::new();
    let nested = format!("sub/{MANIFEST_FILE}");
    let bytes = archive(&[
        (MANIFEST_FILE.as_bytes(), EntryType::Directory, 0o755, b""),
        (
            nested.as_bytes(),
            EntryType::Regular,
            0o644,
            MANIFEST.as_bytes(),
        ),
    ]);
    let err = sandbox.unpack(&bytes).unwrap_err();
    assert!(matches!(err, Error::MissingManifest), "{err}");

    let sandbox = Sandbox::new();
    let bytes = archive(&[(
        MANIFEST_FILE.as_bytes(),
        EntryType::Regular,
        0o644,
        b"name = \"Not Valid\"\n",
    )]);
    let err = sandbox.unpack(&bytes).unwrap_err();
    assert!(matches!(err, Error::Manifest { .. }), "{err}");
    sandbox.assert_nothing_outside();
}

#[test]
fn a_truncated_archive_is_an_error_not_a_panic() {
    let (_src, bytes) = built();
    let len = bytes.len();
    let mut cuts: Vec<usize> = (1..16).map(|i| len * i / 16).collect();
    // Cuts in the last bytes fall after the end-of-archive marker, inside
    // the end of the zstd frame.
    cuts.extend((1..=16).map(|back| len - back));
    for cut in cuts {
        let sandbox = Sandbox::new();
        let result = sandbox.unpack(&bytes[..cut]);
        assert!(
            matches!(result, Err(Error::Archive(_))),
            "cut at {cut} of {len}: {result:?}"
        );
        sandbox.assert_nothing_outside();
    }
}

#[test]
fn a_stream_cut_after_the_end_of_archive_marker_is_refused() {
    // Tar writers pad archives with zeros after the end marker; cut the
    // zstd frame inside that padding, past everything the tar reader needs.
    let mut tar = tar::Builder::new(Vec::new());
    let (path, kind, mode, data) = manifest_entry();
    tar.append(&raw_header(path, kind, data.len() as u64, mode, b""), data)
        .unwrap();
    let mut plain = tar.into_inner().unwrap();
    plain.resize(plain.len() + 512 * 1024, 0);
    let bytes = zstd::encode_all(&plain[..], 3).unwrap();

    let whole = Sandbox::new();
    whole.unpack(&bytes).unwrap();
    let cut = Sandbox::new();
    let result = cut.unpack(&bytes[..bytes.len() - 4]);
    assert!(matches!(result, Err(Error::Archive(_))), "{result:?}");

    // Padding is bounded too.
    plain.resize(plain.len() + 2 * 1024 * 1024, 0);
    let bytes = zstd::encode_all(&plain[..], 3).unwrap();
    let padded = Sandbox::new();
    let result = padded.unpack(&bytes);
    assert!(matches!(result, Err(Error::Archive(_))), "{result:?}");
}

#[test]
fn garbage_is_refused() {
    let mut noise = Vec::new();
    let mut x: u32 = 7;
    for _ in 0..10_000 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        noise.push((x >> 16) as u8);
    }
    // Not zstd, and zstd holding something that is not tar.
    for garbage in [
        noise.clone(),
        zstd::encode_all(&noise[..], 3).unwrap(),
        b"not zstd".to_vec(),
    ] {
        let sandbox = Sandbox::new();
        let err = sandbox.unpack(&garbage).unwrap_err();
        assert!(matches!(err, Error::Archive(_)), "{err}");
        sandbox.assert_nothing_outside();
    }
}

#[test]
fn the_destination_must_be_an_empty_directory() {
    let (_src, bytes) = built();
    let sandbox = Sandbox::new();
    std::fs::write(sandbox.dest.join("left-over"), b"").unwrap();
    let err = sandbox.unpack(&bytes).unwrap_err();
    assert!(matches!(err, Error::UnpackDestination { .. }), "{err}");
    let missing = sandbox.root.path().join("missing");
    let err = unpack(&bytes[..], &missing, &UnpackLimits::default()).unwrap_err();
    assert!(matches!(err, Error::UnpackDestination { .. }), "{err}");
    assert!(!missing.exists());
}
