//! The session `posfleet login` stores: `<config dir>/session.json` (the
//! config dir is `--config-dir`/`POSFLEET_CONFIG_DIR`, else the platform's,
//! e.g. `~/.config/posfleet`). The folder is made 0700 and the file 0600
//! from its creation: the token in it is as good as the password and code
//! until it expires.

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The file's name in the config dir.
const FILE_NAME: &str = "session.json";

/// A session token and where it may be sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    /// The control plane it was issued by, as given to `--server`: the
    /// token is sent there and nowhere else.
    pub server: String,
    pub user: String,
    pub role: String,
    pub token: String,
    pub expires_at_unix_ms: i64,
}

impl StoredSession {
    pub fn expired(&self, now_unix_ms: i64) -> bool {
        now_unix_ms >= self.expires_at_unix_ms
    }

    /// Whether this session belongs to the control plane at `url`.
    pub fn is_for(&self, url: &str) -> bool {
        same_server(&self.server, url)
    }
}

/// Two spellings of a server URL that differ only by a trailing `/` or
/// the scheme's and host's case name the same server; anything else
/// (another host, port or scheme) does not.
fn same_server(a: &str, b: &str) -> bool {
    let canonical = |url: &str| {
        let url = url.trim().trim_end_matches('/');
        match url.split_once("://") {
            Some((scheme, rest)) => {
                let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
                format!(
                    "{}://{}/{path}",
                    scheme.to_ascii_lowercase(),
                    host.to_ascii_lowercase()
                )
            }
            None => url.to_string(),
        }
    };
    canonical(a) == canonical(b)
}

/// The folder holding the session file: `explicit` (the flag or env), else
/// the platform's config dir + `posfleet`.
pub fn config_dir(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = explicit {
        return Ok(dir);
    }
    dirs::config_dir()
        .map(|dir| dir.join("posfleet"))
        .ok_or_else(|| {
            anyhow!("no config folder for the session: set POSFLEET_CONFIG_DIR or --config-dir")
        })
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// The stored session, `None` when there is none. A file others may read
/// is refused: its token may have leaked.
pub fn load(dir: &Path) -> anyhow::Result<Option<StoredSession>> {
    let path = path(dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(error).with_context(|| format!("cannot read {}", path.display()));
        }
    };
    let mode = std::fs::metadata(&path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "refusing the session in {}: others may read it (mode {:o}); remove it and run posfleet login again",
            path.display(),
            mode & 0o777
        );
    }
    serde_json::from_slice(&bytes).map(Some).with_context(|| {
        format!(
            "{} is not a session file; remove it and run posfleet login again",
            path.display()
        )
    })
}

/// Writes the session atomically: a new file created 0600 beside the old
/// one, then renamed over it, in a folder made 0700.
pub fn save(dir: &Path, session: &StoredSession) -> anyhow::Result<PathBuf> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    // A folder that existed keeps its mode through `create`.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private (0700)", dir.display()))?;
    let path = path(dir);
    let json = serde_json::to_vec_pretty(session)?;
    let (temp_path, mut file) = new_private_file(dir)?;
    let written = file
        .write_all(&json)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&temp_path, &path));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temp_path);
        return Err(error).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(path)
}

/// A fresh file in `dir`, readable and writable by its owner only from the
/// moment it exists.
fn new_private_file(dir: &Path) -> anyhow::Result<(PathBuf, std::fs::File)> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    for attempt in 0..100u32 {
        let name = format!(
            ".{FILE_NAME}.{}.{}.tmp",
            std::process::id(),
            nanos.wrapping_add(attempt)
        );
        let candidate = dir.join(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&candidate)
        {
            Ok(file) => return Ok((candidate, file)),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("cannot create a file in {}", dir.display()));
            }
        }
    }
    bail!("cannot create a file in {}", dir.display())
}

/// Removes the stored session; `false` when there was none.
pub fn remove(dir: &Path) -> anyhow::Result<bool> {
    let path = path(dir);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error).with_context(|| format!("cannot remove {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(server: &str) -> StoredSession {
        StoredSession {
            server: server.into(),
            user: "alice".into(),
            role: "deployer".into(),
            token: "pfs_secret".into(),
            expires_at_unix_ms: 1_000,
        }
    }

    #[test]
    fn a_session_is_only_for_its_own_server() {
        let s = session("https://cp.example:7400");
        for (url, same) in [
            ("https://cp.example:7400", true),
            ("https://cp.example:7400/", true),
            ("HTTPS://CP.example:7400", true),
            ("https://cp.example:7401", false),
            ("http://cp.example:7400", false),
            ("https://cp.example", false),
            ("https://evil.example:7400", false),
            ("https://cp.example:7400.evil.example", false),
            ("https://cp.example:7400@evil.example", false),
        ] {
            assert_eq!(s.is_for(url), same, "{url}");
        }
        assert!(!s.expired(999));
        assert!(s.expired(1_000));
    }

    #[test]
    fn saved_private_read_back_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("nested").join("posfleet");
        assert_eq!(load(&config).unwrap(), None);
        let saved = save(&config, &session("https://a")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&saved), 0o600);
        assert_eq!(mode(&config), 0o700);
        assert_eq!(load(&config).unwrap(), Some(session("https://a")));
        // Replaced whole, and no temporary file left behind.
        save(&config, &session("https://b")).unwrap();
        assert_eq!(load(&config).unwrap(), Some(session("https://b")));
        assert_eq!(std::fs::read_dir(&config).unwrap().count(), 1);

        std::fs::set_permissions(&saved, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = load(&config).unwrap_err().to_string();
        assert!(refused.contains("others may read it"), "{refused}");

        std::fs::write(&saved, "not json").unwrap();
        std::fs::set_permissions(&saved, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load(&config).is_err());
        assert!(remove(&config).unwrap());
        assert!(!remove(&config).unwrap());
    }

    #[test]
    fn an_open_folder_is_made_private() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        save(dir.path(), &session("https://a")).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
