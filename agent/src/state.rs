//! The agent's enrollment (device id and credential), kept across restarts.
//! Installed bundles are the slots' `current` links (see `install`).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::files;

pub const ENROLLMENT_FILE: &str = "enrollment.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    pub device_id: String,
    pub device_credential: String,
    pub store_id: String,
}

fn load_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, Error> {
    files::read_optional(path)?
        .map(|bytes| {
            serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })
        })
        .transpose()
}

fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<(), Error> {
    let bytes = serde_json::to_vec_pretty(value).expect("plain data serializes");
    files::write_private(path, &bytes)
}

/// The agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: &Path) -> StateDir {
        StateDir {
            dir: dir.to_path_buf(),
        }
    }

    pub fn enrollment(&self) -> Result<Option<Enrollment>, Error> {
        load_json(&self.dir.join(ENROLLMENT_FILE))
    }

    pub fn save_enrollment(&self, enrollment: &Enrollment) -> Result<(), Error> {
        save_json(&self.dir.join(ENROLLMENT_FILE), enrollment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrollment_round_trips_and_corruption_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        assert_eq!(state.enrollment().unwrap(), None);
        let enrollment = Enrollment {
            device_id: "dev-1".into(),
            device_credential: "pfd.dev-1.x".into(),
            store_id: "s".into(),
        };
        state.save_enrollment(&enrollment).unwrap();
        assert_eq!(state.enrollment().unwrap(), Some(enrollment));
        std::fs::write(dir.path().join(ENROLLMENT_FILE), b"{").unwrap();
        assert!(matches!(state.enrollment(), Err(Error::Corrupt { .. })));
    }
}
