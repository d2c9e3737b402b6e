//! The CAs the control plane issues from and trusts, and their rotation.
//!
//! One CA is *active*: it issues every device certificate (enrollment and
//! renewal). During a rotation the CA before it is *previous*: certificates
//! it issued are still accepted, and the listeners' own certificate is
//! still issued by it, so a till that has not yet received the new CA still
//! connects. Tills receive both in their trust bundle at their next
//! heartbeat and renew their certificate from the active CA; once none
//! holds one from the previous CA any more, it is retired.
//!
//! A CA the control plane made itself lives in `data_dir/tls`, one pair of
//! files per CA, and `authorities.json` names the active and the previous
//! one: rewriting that file (atomically) is the one step that rotates or
//! retires. A CA supplied from the company's PKI comes from the
//! configuration's files, and is rotated by changing them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use posfleet_pki::rustls::pki_types::CertificateDer;
use posfleet_pki::{DeviceIdentity, FleetCa};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::Error;

/// Names the active and the previous CA among the files in `data_dir/tls`.
pub const STATE_FILE: &str = "authorities.json";
/// Where a retired CA's certificate is kept (its key is deleted).
pub const RETIRED_DIR: &str = "retired";
/// The file stem of the CA made at first start.
const FIRST_STEM: &str = "fleet-ca";

/// The CAs in force.
#[derive(Debug, Clone)]
pub struct Authorities {
    /// Issues device certificates.
    pub active: Arc<FleetCa>,
    /// Being rotated out: still trusted, and still the issuer of the
    /// listeners' certificate, until retired.
    pub previous: Option<Arc<FleetCa>>,
    pub source: Source,
}

/// Where the CAs are kept, which says how they are rotated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Made by the control plane in this folder: rotated and retired by
    /// command.
    Own { dir: PathBuf, state: OwnState },
    /// The configuration's files (`tls_ca_*`, `tls_previous_ca_*`).
    Configured,
}

/// The contents of [`STATE_FILE`]: file stems in the folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnState {
    pub active: String,
    pub previous: Option<String>,
}

impl Authorities {
    /// The CAs the configuration names, or the ones in `data_dir/tls`
    /// (made there at first start; `true` with them then).
    pub fn load(config: &Config, now: SystemTime) -> Result<(Authorities, bool), Error> {
        if let (Some(cert), Some(key)) = (&config.tls_ca_cert_path, &config.tls_ca_key_path) {
            let previous = match (
                &config.tls_previous_ca_cert_path,
                &config.tls_previous_ca_key_path,
            ) {
                (Some(cert), Some(key)) => Some(Arc::new(FleetCa::load_files(cert, key)?)),
                _ => None,
            };
            let authorities = Authorities {
                active: Arc::new(FleetCa::load_files(cert, key)?),
                previous,
                source: Source::Configured,
            };
            return Ok((authorities, false));
        }
        let dir = config.data_dir.join("tls");
        let state_path = dir.join(STATE_FILE);
        let state = match posfleet_runtime::files::read_optional(&state_path).map_err(|source| {
            posfleet_pki::Error::Read {
                path: state_path.clone(),
                source,
            }
        })? {
            Some(bytes) => serde_json::from_slice::<OwnState>(&bytes).map_err(|e| {
                Error::Corrupt(format!(
                    "{}: {e}; it names the fleet's CAs by file name",
                    state_path.display()
                ))
            })?,
            None => {
                // Before any rotation: the CA made at first start.
                let (active, created) = FleetCa::load_or_create(&dir, now)?;
                let authorities = Authorities {
                    active: Arc::new(active),
                    previous: None,
                    source: Source::Own {
                        dir,
                        state: OwnState {
                            active: FIRST_STEM.into(),
                            previous: None,
                        },
                    },
                };
                return Ok((authorities, created));
            }
        };
        let load = |stem: &str| -> Result<Arc<FleetCa>, Error> {
            let (cert, key) = files(&dir, stem);
            Ok(Arc::new(FleetCa::load_files(&cert, &key)?))
        };
        let authorities = Authorities {
            active: load(&state.active)?,
            previous: state.previous.as_deref().map(load).transpose()?,
            source: Source::Own { dir, state },
        };
        Ok((authorities, false))
    }

    /// A new active CA, the current one becoming previous. Only for the
    /// control plane's own CAs with no rotation under way; the new CA's
    /// files are written whole before the state file names it.
    pub fn rotate(&self, now: SystemTime) -> Result<Authorities, Error> {
        let Source::Own { dir, state } = &self.source else {
            return Err(Error::Corrupt("rotating a configured CA".into()));
        };
        let seconds = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let mut stem = format!("{FIRST_STEM}-{seconds}");
        while files(dir, &stem).0.exists() {
            stem.push('b');
        }
        let (cert, key) = files(dir, &stem);
        let when = chrono::DateTime::from_timestamp(seconds as i64, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_default();
        let active = FleetCa::create_files(
            &cert,
            &key,
            &format!("posfleet fleet CA (made {when})"),
            now,
        )?;
        let state = OwnState {
            active: stem,
            previous: Some(state.active.clone()),
        };
        write_state(dir, &state)?;
        Ok(Authorities {
            active: Arc::new(active),
            previous: Some(self.active.clone()),
            source: Source::Own {
                dir: dir.clone(),
                state,
            },
        })
    }

    /// Drops the previous CA: the state file first, then its key is
    /// deleted and its certificate moved to [`RETIRED_DIR`].
    pub fn retire(&self) -> Result<Authorities, Error> {
        let Source::Own { dir, state } = &self.source else {
            return Err(Error::Corrupt("retiring a configured CA".into()));
        };
        let Some(old) = &state.previous else {
            return Ok(self.clone());
        };
        let state = OwnState {
            active: state.active.clone(),
            previous: None,
        };
        write_state(dir, &state)?;
        let (cert, key) = files(dir, old);
        let retired = dir.join(RETIRED_DIR);
        let tidy = || -> std::io::Result<()> {
            std::fs::create_dir_all(&retired)?;
            std::fs::rename(&cert, retired.join(cert.file_name().unwrap_or_default()))?;
            std::fs::remove_file(&key)
        };
        // The retirement took effect with the state file; leftovers only
        // take space.
        if let Err(error) = tidy() {
            tracing::warn!(%error, ca = %old, "The retired CA's files were not tidied away.");
        }
        Ok(Authorities {
            active: self.active.clone(),
            previous: None,
            source: Source::Own {
                dir: dir.clone(),
                state,
            },
        })
    }

    /// Issues the listeners' certificate: the previous CA during a
    /// rotation (every till trusts it), else the active one.
    pub fn server_issuer(&self) -> &FleetCa {
        self.previous.as_deref().unwrap_or(&self.active)
    }

    /// The CAs whose device certificates are accepted.
    pub fn client_cas(&self) -> Vec<CertificateDer<'static>> {
        std::iter::once(&self.active)
            .chain(&self.previous)
            .map(|ca| ca.certificate().clone())
            .collect()
    }

    /// The CA certificates tills trust (PEM): the active and the previous
    /// CA's, and `extra` (the issuer of a server certificate supplied as
    /// files).
    pub fn trust_bundle_pem(&self, extra: &str) -> String {
        let mut bundle = String::new();
        for ca in std::iter::once(&self.active).chain(&self.previous) {
            bundle.push_str(ca.certificates_pem());
            if !bundle.ends_with('\n') {
                bundle.push('\n');
            }
        }
        bundle.push_str(extra);
        bundle
    }

    /// Whether one of these CAs issued the certificate `device` was read
    /// from (one issued by a retired CA is not).
    pub fn trusts(&self, device: &DeviceIdentity) -> bool {
        std::iter::once(&self.active)
            .chain(&self.previous)
            .any(|ca| ca.issued(device))
    }
}

fn files(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    )
}

fn write_state(dir: &Path, state: &OwnState) -> Result<(), Error> {
    let path = dir.join(STATE_FILE);
    let json = serde_json::to_vec_pretty(state).expect("plain strings serialize");
    posfleet_runtime::files::write_private(&path, &json)
        .map_err(|source| posfleet_pki::Error::Write { path, source }.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config(dir: &Path) -> Config {
        Config {
            data_dir: dir.to_path_buf(),
            tls_server_names: vec!["cp.test".into()],
            ..Config::default()
        }
    }

    fn device_of(ca: &FleetCa, id: &str) -> DeviceIdentity {
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let request = posfleet_pki::certificate_request(&key).unwrap();
        let issued = ca
            .issue_device(
                &request,
                key.verifying_key().as_bytes(),
                id,
                "s-1",
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap();
        DeviceIdentity::from_certificate(&issued.der).unwrap()
    }

    #[test]
    fn a_rotation_and_a_retirement_survive_a_restart_and_change_what_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let now = SystemTime::now();
        let (first, created) = Authorities::load(&config, now).unwrap();
        assert!(created);
        let old_device = device_of(&first.active, "dev-old");

        let rotated = first.rotate(now + Duration::from_secs(1)).unwrap();
        assert_ne!(rotated.active.fingerprint(), first.active.fingerprint());
        // The listeners stay on the CA every till already trusts.
        assert_eq!(
            rotated.server_issuer().fingerprint(),
            first.active.fingerprint()
        );
        let new_device = device_of(&rotated.active, "dev-new");
        assert!(rotated.trusts(&old_device) && rotated.trusts(&new_device));
        assert!(rotated.active.issued(&new_device) && !rotated.active.issued(&old_device));
        let bundle = rotated.trust_bundle_pem("");
        assert_eq!(
            posfleet_pki::certificates_from_pem(bundle.as_bytes(), "bundle")
                .unwrap()
                .len(),
            2
        );

        // A restart finds the rotation under way.
        let (reloaded, created) = Authorities::load(&config, now).unwrap();
        assert!(!created);
        assert_eq!(reloaded.active.fingerprint(), rotated.active.fingerprint());
        assert_eq!(
            reloaded.previous.as_ref().unwrap().fingerprint(),
            first.active.fingerprint()
        );

        let retired = reloaded.retire().unwrap();
        assert!(retired.previous.is_none());
        assert!(!retired.trusts(&old_device) && retired.trusts(&new_device));
        assert_eq!(
            retired.server_issuer().fingerprint(),
            rotated.active.fingerprint()
        );
        // The old key is gone; its certificate is kept aside.
        let tls = dir.path().join("tls");
        assert!(!tls.join("fleet-ca.key").exists());
        assert!(tls.join(RETIRED_DIR).join("fleet-ca.crt").exists());
        let (again, _) = Authorities::load(&config, now).unwrap();
        assert!(again.previous.is_none());
        assert_eq!(again.active.fingerprint(), rotated.active.fingerprint());
    }

    #[test]
    fn a_damaged_state_file_stops_the_start_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let (first, _) = Authorities::load(&config, SystemTime::now()).unwrap();
        first.rotate(SystemTime::now()).unwrap();
        std::fs::write(dir.path().join("tls").join(STATE_FILE), b"{\"active\":").unwrap();
        let error = Authorities::load(&config, SystemTime::now()).unwrap_err();
        assert!(error.to_string().contains(STATE_FILE), "{error}");
    }
}
