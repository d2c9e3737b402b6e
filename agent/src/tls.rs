//! The agent's TLS: the rustls configurations its gRPC calls and `/repo/`
//! downloads use, the certificate enrollment issued it (`device.crt`, with
//! the CAs to trust from then on in `trust.pem`), and what a failed
//! handshake means, said for whoever reads the till's log.

use ed25519_dalek::SigningKey;
use posfleet_pki::rustls::{self, AlertDescription, CertificateError, ClientConfig};
use std::path::Path;

use crate::config::ServerTrust;
use crate::error::Error;
use crate::files;

/// The device certificate enrollment issued (PEM), and the CAs that vouch
/// for the control plane from then on (PEM).
pub const CERTIFICATE_FILE: &str = "device.crt";
pub const TRUST_FILE: &str = "trust.pem";

/// The client configuration before enrollment: the control plane is
/// authenticated, the till presents nothing.
pub fn enrollment_config(trust: &ServerTrust) -> Result<ClientConfig, Error> {
    Ok(match trust {
        ServerTrust::Ca(certificates) => posfleet_pki::client_config(certificates, None)?,
        ServerTrust::Pinned(fingerprint) => posfleet_pki::pinned_client_config(fingerprint)?,
    })
}

/// What enrollment over TLS gave the till: its certificate and the CAs to
/// trust. Built only from PEM that parses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCertificate {
    chain_pem: String,
    trust_pem: String,
}

impl DeviceCertificate {
    /// From an enrollment's answer: `None` when it issued no certificate
    /// (a control plane that hands out a bearer credential instead).
    pub fn from_enrollment(
        certificate_pem: &str,
        trust_pem: &str,
        device_id: &str,
    ) -> Result<Option<DeviceCertificate>, Error> {
        if certificate_pem.is_empty() {
            return Ok(None);
        }
        let bad = |detail: String| Error::EnrollmentAnswer(detail);
        let chain = posfleet_pki::certificates_from_pem(
            certificate_pem.as_bytes(),
            "the device certificate",
        )
        .map_err(|e| bad(e.to_string()))?;
        let identity = posfleet_pki::DeviceIdentity::from_certificate(&chain[0])
            .map_err(|e| bad(e.to_string()))?;
        if identity.device_id != device_id {
            return Err(bad(format!(
                "the certificate names device {}, the answer {device_id}",
                identity.device_id
            )));
        }
        posfleet_pki::certificates_from_pem(trust_pem.as_bytes(), "the trust bundle")
            .map_err(|e| bad(e.to_string()))?;
        Ok(Some(DeviceCertificate {
            chain_pem: certificate_pem.to_string(),
            trust_pem: trust_pem.to_string(),
        }))
    }

    /// The saved certificate and trust bundle; `None` when neither file is
    /// there. One without the other is reported.
    pub fn load(data_dir: &Path) -> Result<Option<DeviceCertificate>, Error> {
        let read = |name: &str| -> Result<Option<String>, Error> {
            let path = data_dir.join(name);
            files::read_optional(&path)?
                .map(|bytes| {
                    String::from_utf8(bytes).map_err(|_| Error::Corrupt {
                        path: path.clone(),
                        detail: "not PEM text".into(),
                    })
                })
                .transpose()
        };
        let (chain_pem, trust_pem) = match (read(CERTIFICATE_FILE)?, read(TRUST_FILE)?) {
            (None, None) => return Ok(None),
            (Some(chain), Some(trust)) => (chain, trust),
            (chain, _) => {
                let missing = if chain.is_none() {
                    CERTIFICATE_FILE
                } else {
                    TRUST_FILE
                };
                return Err(Error::Corrupt {
                    path: data_dir.join(missing),
                    detail: "missing, while the other file of the device certificate is there"
                        .into(),
                });
            }
        };
        for (name, pem) in [(CERTIFICATE_FILE, &chain_pem), (TRUST_FILE, &trust_pem)] {
            posfleet_pki::certificates_from_pem(pem.as_bytes(), name).map_err(|e| {
                Error::Corrupt {
                    path: data_dir.join(name),
                    detail: e.to_string(),
                }
            })?;
        }
        Ok(Some(DeviceCertificate {
            chain_pem,
            trust_pem,
        }))
    }

    /// Saves both files, each atomically; the enrollment that goes with
    /// them is saved after, so a till never holds an enrollment without
    /// its certificate.
    pub fn save(&self, data_dir: &Path) -> Result<(), Error> {
        files::write_private(&data_dir.join(CERTIFICATE_FILE), self.chain_pem.as_bytes())?;
        files::write_private(&data_dir.join(TRUST_FILE), self.trust_pem.as_bytes())
    }

    /// SHA-256 of the trust bundle, as handed out: the control plane sends
    /// a new one when its own differs.
    pub fn trust_digest(&self) -> Vec<u8> {
        use sha2::Digest;
        sha2::Sha256::digest(self.trust_pem.as_bytes()).to_vec()
    }

    /// The same certificate with a new trust bundle (a fleet CA was rotated
    /// or retired), which must hold at least one certificate.
    pub fn with_trust(&self, trust_pem: &str) -> Result<DeviceCertificate, Error> {
        posfleet_pki::certificates_from_pem(trust_pem.as_bytes(), "the trust bundle")
            .map_err(|e| Error::EnrollmentAnswer(e.to_string()))?;
        Ok(DeviceCertificate {
            chain_pem: self.chain_pem.clone(),
            trust_pem: trust_pem.to_string(),
        })
    }

    /// Who the certificate names and when it ends; `None` if it does not
    /// parse (it did when saved).
    pub fn identity(&self) -> Option<posfleet_pki::DeviceIdentity> {
        let chain =
            posfleet_pki::certificates_from_pem(self.chain_pem.as_bytes(), "device.crt").ok()?;
        posfleet_pki::DeviceIdentity::from_certificate(chain.first()?).ok()
    }

    /// Server-authenticated TLS only, trusting the saved CAs: for renewing
    /// a certificate that has ended.
    pub fn server_config(&self) -> Result<ClientConfig, Error> {
        let trusted = posfleet_pki::certificates_from_pem(self.trust_pem.as_bytes(), "trust.pem")?;
        Ok(posfleet_pki::client_config(&trusted, None)?)
    }

    /// Mutual TLS: trusts the saved CAs and presents the certificate with
    /// the device key.
    pub fn client_config(&self, key: &SigningKey) -> Result<ClientConfig, Error> {
        // Both parsed when this value was built.
        let chain = posfleet_pki::certificates_from_pem(self.chain_pem.as_bytes(), "device.crt")?;
        let trusted = posfleet_pki::certificates_from_pem(self.trust_pem.as_bytes(), "trust.pem")?;
        Ok(posfleet_pki::client_config(
            &trusted,
            Some((chain, posfleet_pki::private_key_der(key)?)),
        )?)
    }
}

/// A TLS failure whose cause is known, said so that the fix is plain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsFailure {
    /// The control plane refused this till's certificate: ops revoked it.
    Revoked,
    /// The control plane refused this till's certificate otherwise
    /// (another CA's, expired).
    CertificateRefused(String),
    /// The control plane's certificate is from a CA this till does not
    /// trust.
    UntrustedServer,
    /// The control plane's chain holds no CA with the pinned fingerprint.
    NotThePinnedCa(String),
    /// The control plane's certificate is not for the name dialed.
    WrongName,
    /// The control plane's certificate is out of its validity.
    ServerCertificateExpired,
    /// A plaintext server on an `https://` address.
    Plaintext(String),
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsFailure::Revoked => write!(
                f,
                "the control plane refused this till's certificate: it is revoked"
            ),
            TlsFailure::CertificateRefused(why) => write!(
                f,
                "the control plane refused this till's certificate ({why})"
            ),
            TlsFailure::UntrustedServer => write!(
                f,
                "the control plane's certificate is not from a trusted CA: \
                 ca_cert_path (or trust.pem once enrolled) is not the fleet CA's, \
                 the fleet CA was retired while this till was away (enroll it again), \
                 or this is not the fleet's control plane"
            ),
            TlsFailure::NotThePinnedCa(detail) => write!(f, "{detail}"),
            TlsFailure::WrongName => write!(
                f,
                "the control plane's certificate is not valid for the host in server_url \
                 (check server_url against the control plane's tls_server_names)"
            ),
            TlsFailure::ServerCertificateExpired => write!(
                f,
                "the control plane's certificate is expired or not yet valid \
                 (check this till's clock)"
            ),
            TlsFailure::Plaintext(detail) => write!(f, "{detail}"),
        }
    }
}

/// What went wrong with a call, for the log: a known TLS failure said
/// plainly, else the status and its deepest cause.
pub fn describe(status: &tonic::Status) -> String {
    match tls_failure(status) {
        Some(failure) => failure.to_string(),
        None => {
            let cause = causes(status)
                .into_iter()
                .skip(1)
                .last()
                .map(ToString::to_string)
                .filter(|cause| !status.message().contains(cause.as_str()));
            match cause {
                Some(cause) => format!("{}: {cause}", status.message()),
                None => status.message().to_string(),
            }
        }
    }
}

/// The TLS failure behind a failed call, when the cause is one of those
/// [`TlsFailure`] names.
pub fn tls_failure(status: &tonic::Status) -> Option<TlsFailure> {
    for error in causes(status) {
        if let Some(failure) = error.downcast_ref::<rustls::Error>().and_then(from_rustls) {
            return Some(failure);
        }
        let text = error.to_string();
        if text.contains("answered in plaintext") {
            return Some(TlsFailure::Plaintext(text));
        }
        // An alert that arrives after the handshake (TLS 1.3 refuses a
        // client's certificate then) reaches the call as text: the HTTP/2
        // layer keeps the io::Error's message, not the rustls error.
        if let Some(failure) = text
            .split_once(ALERT_RECEIVED)
            .and_then(|(_, rest)| alert_named(rest.split_whitespace().next()?))
            .and_then(|alert| from_rustls(&rustls::Error::AlertReceived(alert)))
        {
            return Some(failure);
        }
    }
    None
}

/// How rustls words an alert from the peer.
const ALERT_RECEIVED: &str = "received fatal alert: ";

/// The alerts [`from_rustls`] names, by their `Debug` name.
fn alert_named(name: &str) -> Option<AlertDescription> {
    [
        AlertDescription::CertificateRevoked,
        AlertDescription::UnknownCA,
        AlertDescription::BadCertificate,
        AlertDescription::CertificateExpired,
        AlertDescription::CertificateUnknown,
        AlertDescription::DecryptError,
    ]
    .into_iter()
    .find(|alert| format!("{alert:?}") == name)
}

fn from_rustls(error: &rustls::Error) -> Option<TlsFailure> {
    Some(match error {
        rustls::Error::AlertReceived(AlertDescription::CertificateRevoked) => TlsFailure::Revoked,
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::DecryptError),
        ) => TlsFailure::CertificateRefused(format!("{alert:?}")),
        rustls::Error::InvalidCertificate(certificate) => match certificate {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                TlsFailure::UntrustedServer
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsFailure::WrongName
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => TlsFailure::ServerCertificateExpired,
            CertificateError::Other(other) => TlsFailure::NotThePinnedCa(
                other
                    .0
                    .downcast_ref::<posfleet_pki::NotThePinnedCa>()?
                    .to_string(),
            ),
            _ => return None,
        },
        _ => return None,
    })
}

/// `status` and every error under it. An `io::Error` that wraps another
/// error is followed into it: its own `source` skips the wrapped error.
fn causes(status: &tonic::Status) -> Vec<&(dyn std::error::Error + 'static)> {
    let mut chain = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(error) = next {
        chain.push(error);
        next = match error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
        if chain.len() > 32 {
            break;
        }
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_over(error: rustls::Error) -> tonic::Status {
        // As a failed handshake reaches a gRPC call: rustls inside the
        // io::Error of the connection, inside the status.
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, error);
        tonic::Status::from_error(Box::new(io))
    }

    #[test]
    fn tls_failures_are_named_for_the_fix() {
        let pinned = posfleet_pki::NotThePinnedCa {
            pinned: "ab".repeat(32),
            presented: "cd".repeat(32),
        };
        for (error, expected) in [
            (
                rustls::Error::AlertReceived(AlertDescription::CertificateRevoked),
                TlsFailure::Revoked,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                TlsFailure::UntrustedServer,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
                TlsFailure::WrongName,
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::UnknownCA),
                TlsFailure::CertificateRefused("UnknownCA".into()),
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                    std::sync::Arc::new(pinned),
                ))),
                TlsFailure::NotThePinnedCa(format!(
                    "the server's certificate chain holds no CA with the pinned fingerprint {} \
                     (it presented {}): not the fleet's control plane, or the pin is wrong",
                    "ab".repeat(32),
                    "cd".repeat(32)
                )),
            ),
        ] {
            assert_eq!(tls_failure(&status_over(error)), Some(expected));
        }
        let revoked = status_over(rustls::Error::AlertReceived(
            AlertDescription::CertificateRevoked,
        ));
        assert!(describe(&revoked).contains("revoked"), "{revoked:?}");
        // As it reaches a call once the connection is up: text only.
        let alert = rustls::Error::AlertReceived(AlertDescription::CertificateRevoked);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, alert.to_string());
        let status = tonic::Status::from_error(Box::new(io));
        assert_eq!(tls_failure(&status), Some(TlsFailure::Revoked));
        let io = std::io::Error::other("received fatal alert: UnknownCA");
        let status = tonic::Status::from_error(Box::new(io));
        assert_eq!(
            tls_failure(&status),
            Some(TlsFailure::CertificateRefused("UnknownCA".into()))
        );
    }

    #[test]
    fn other_failures_show_their_deepest_cause() {
        let plaintext = std::io::Error::other(
            "127.0.0.1:7400 answered in plaintext, not TLS: a server started with insecure_dev is reached with http://",
        );
        let status = tonic::Status::from_error(Box::new(plaintext));
        assert!(matches!(
            tls_failure(&status),
            Some(TlsFailure::Plaintext(_))
        ));
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let status = tonic::Status::unavailable("cannot connect");
        assert_eq!(tls_failure(&status), None);
        assert_eq!(describe(&status), "cannot connect");
        let status = tonic::Status::from_error(Box::new(refused));
        assert!(describe(&status).contains("refused"), "{status:?}");
    }

    #[test]
    fn an_issued_certificate_is_saved_loaded_and_presented() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        let (ca, _) = posfleet_pki::FleetCa::create("test fleet CA", now).unwrap();
        let key = SigningKey::from_bytes(&[7; 32]);
        let issued = ca
            .issue_device(
                &posfleet_pki::certificate_request(&key).unwrap(),
                key.verifying_key().as_bytes(),
                "dev-1",
                "lyon-01",
                std::time::Duration::from_secs(3600),
                now,
            )
            .unwrap();
        let trust = ca.certificates_pem();
        // An answer naming another device than its certificate, or with no
        // trust bundle, is not saved.
        for (device, trust) in [("dev-2", trust), ("dev-1", "")] {
            let refused = DeviceCertificate::from_enrollment(&issued.pem, trust, device);
            assert!(
                matches!(refused, Err(Error::EnrollmentAnswer(_))),
                "{refused:?}"
            );
        }
        assert_eq!(
            DeviceCertificate::from_enrollment("", trust, "dev-1").unwrap(),
            None
        );
        let certificate = DeviceCertificate::from_enrollment(&issued.pem, trust, "dev-1")
            .unwrap()
            .unwrap();
        certificate.save(dir.path()).unwrap();
        let loaded = DeviceCertificate::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded, certificate);
        assert!(
            loaded
                .client_config(&key)
                .unwrap()
                .client_auth_cert_resolver
                .has_certs()
        );
    }

    #[test]
    fn a_saved_certificate_needs_both_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(DeviceCertificate::load(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join(CERTIFICATE_FILE), "x").unwrap();
        let error = DeviceCertificate::load(dir.path()).unwrap_err();
        assert!(error.to_string().contains(TRUST_FILE), "{error}");
        std::fs::write(dir.path().join(TRUST_FILE), "x").unwrap();
        let error = DeviceCertificate::load(dir.path()).unwrap_err();
        assert!(error.to_string().contains(CERTIFICATE_FILE), "{error}");
    }
}
