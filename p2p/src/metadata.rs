//! TUF metadata between the tills of a store, for a till that cannot reach
//! the origin. A till serves the metadata files it verified and saved (its
//! `metadata_dir`), by their TUF names only; the asker verifies them exactly
//! as it verifies the origin's, so serving them grants no trust.
//!
//! Names: `timestamp.json`, `snapshot.json`, `targets.json` (the ones the
//! till trusts now) and `<N>.root.json` (root version N, for the rotation
//! chain). Anything else is refused without touching the disk, so no name
//! can reach outside the directory.
//!
//! A peer that answers with more than the asker's limit (which travels in
//! the request), or with bytes that do not parse as the TUF role asked for,
//! is banned. A file that parses but does not verify is not a reason to ban
//! here: a peer may hold older metadata than the asker, or be in the middle
//! of saving a newer set. The asker rejects it and asks someone else.

use posfleet_bundle::tuf::{self, Root, Snapshot, Targets, Timestamp};
use std::io::Read;
use std::path::Path;

/// The longest metadata name a request may carry.
pub(crate) const MAX_NAME_BYTES: u32 = 64;

/// Why TUF metadata could not be had from a peer.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("`{name}` is not a TUF metadata file name")]
    UnknownName { name: String },

    #[error("peer {peer} is not on this till's member list")]
    NotAMember { peer: String },

    #[error("peer {peer} refuses this till (not on its member list, or banned)")]
    Refused { peer: String },

    #[error("peer {peer} refuses `{name}` as not a TUF metadata file name")]
    NameRefused { peer: String, name: String },

    #[error("no answer from peer {peer}: {message}")]
    Unreachable { peer: String, message: String },

    /// Oversized, unparsable or not an answer to the question: banned.
    #[error("peer {peer} answered `{name}` with bad data ({message}); banned")]
    BadAnswer {
        peer: String,
        name: String,
        message: String,
    },

    #[error("the p2p task has stopped")]
    Stopped,
}

/// The TUF role a metadata file name stands for, if it is one.
pub fn role_of(name: &str) -> Option<&'static str> {
    match name {
        "timestamp.json" => return Some(tuf::TIMESTAMP),
        "snapshot.json" => return Some(tuf::SNAPSHOT),
        "targets.json" => return Some(tuf::TARGETS),
        _ => {}
    }
    let version = name.strip_suffix(".root.json")?;
    let decimal = !version.is_empty()
        && version.len() <= 20
        && version.bytes().all(|b| b.is_ascii_digit())
        && !version.starts_with('0');
    (decimal && version.parse::<u64>().is_ok()).then_some(tuf::ROOT)
}

/// Reads `dir/name` for serving: `None` if the name is not a metadata name,
/// the file is absent, or it is larger than `max_bytes`.
pub(crate) fn read(dir: &Path, name: &str, max_bytes: u32) -> std::io::Result<Option<Vec<u8>>> {
    if role_of(name).is_none() {
        return Ok(None);
    }
    let file = match std::fs::File::open(dir.join(name)) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.take(u64::from(max_bytes) + 1)
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= u64::from(max_bytes)).then_some(bytes))
}

/// Checks that `bytes` parse as the role `name` stands for (no signature is
/// checked: that is the asker's TUF client's job).
pub(crate) fn check_parses(name: &str, bytes: &[u8]) -> Result<(), String> {
    let role = role_of(name).ok_or_else(|| format!("`{name}` is not a metadata name"))?;
    let envelope =
        tuf::parse_envelope(role, bytes, bytes.len() as u64).map_err(|e| e.to_string())?;
    let decoded = match role {
        tuf::ROOT => envelope.decode::<Root>(role).map(drop),
        tuf::TIMESTAMP => envelope.decode::<Timestamp>(role).map(drop),
        tuf::SNAPSHOT => envelope.decode::<Snapshot>(role).map(drop),
        _ => envelope.decode::<Targets>(role).map(drop),
    };
    decoded.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tuf_metadata_names_are_served() {
        for (name, role) in [
            ("timestamp.json", Some("timestamp")),
            ("snapshot.json", Some("snapshot")),
            ("targets.json", Some("targets")),
            ("2.root.json", Some("root")),
            ("18446744073709551615.root.json", Some("root")),
            ("18446744073709551616.root.json", None),
            ("0.root.json", None),
            ("02.root.json", None),
            (".root.json", None),
            ("root.json", None),
            ("-1.root.json", None),
            ("+1.root.json", None),
            ("1.snapshot.json", None),
            ("../timestamp.json", None),
            ("tuf/targets.json", None),
            ("2.root.json/../../etc/passwd", None),
            ("/etc/passwd", None),
            ("..", None),
            ("", None),
            ("store_peers.json", None),
            ("device.key", None),
            ("timestamp.json\0", None),
        ] {
            assert_eq!(role_of(name), role, "{name:?}");
        }
    }

    #[test]
    fn reading_stays_in_the_directory_and_within_the_limit() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("tuf");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(root.path().join("device.key"), b"secret").unwrap();
        std::fs::write(dir.join("timestamp.json"), b"0123456789").unwrap();
        assert_eq!(
            read(&dir, "timestamp.json", 10).unwrap().as_deref(),
            Some(&b"0123456789"[..])
        );
        assert_eq!(read(&dir, "timestamp.json", 9).unwrap(), None);
        assert_eq!(read(&dir, "snapshot.json", 100).unwrap(), None);
        assert_eq!(read(&dir, "../device.key", 100).unwrap(), None);
    }
}
