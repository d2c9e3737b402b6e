//! https:// receivers. A receiver's certificate is checked against the
//! system's roots plus, when the webhook has one, its own CA (a company
//! CA). The dispatcher keeps one HTTP client per distinct CA, each with a
//! rustls configuration built here on posfleet-pki's crypto provider (none
//! is picked implicitly), and a certificate failure is recorded as one line
//! that says so.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::time::Duration;

use posfleet_pki::rustls::pki_types::pem::PemObject;
use posfleet_pki::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use posfleet_pki::rustls::{self, CertificateError, ClientConfig, RootCertStore};
use posfleet_proto::v1;
use sha2::{Digest, Sha256};
use tonic::Status;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::storage::WebhookRecord;
use crate::validate::invalid;

/// Largest `ca_pem` accepted: room for a CA and its intermediates, not for
/// a whole system bundle.
pub const MAX_CA_PEM_BYTES: usize = 64 * 1024;

/// A webhook's CA as given at `AddWebhook` for the receiver at `url` (a
/// URL [`super::validate_url`] accepted): empty, or PEM certificates only,
/// each usable as a trust anchor, for an https:// receiver. Returned
/// trimmed, as stored.
pub fn validate_ca_pem(url: &str, ca_pem: &str) -> Result<String, Status> {
    let ca_pem = ca_pem.trim();
    if ca_pem.is_empty() {
        return Ok(String::new());
    }
    if ca_pem.len() > MAX_CA_PEM_BYTES {
        return Err(invalid(
            "ca_pem",
            format!(
                "must be at most {MAX_CA_PEM_BYTES} bytes, not {}",
                ca_pem.len()
            ),
        ));
    }
    if !url.starts_with("https://") {
        return Err(invalid(
            "ca_pem",
            "checks an https:// receiver's certificate; an http:// receiver has none \
             (use https:// or leave the CA out)",
        ));
    }
    if PrivateKeyDer::pem_slice_iter(ca_pem.as_bytes())
        .next()
        .is_some()
    {
        return Err(invalid(
            "ca_pem",
            "holds a private key: give the CA's certificate only, and keep the key where it was",
        ));
    }
    let certificates = posfleet_pki::certificates_from_pem(ca_pem.as_bytes(), "ca_pem")
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    for (i, certificate) in certificates.iter().enumerate() {
        let which = i + 1;
        X509Certificate::from_der(certificate).map_err(|e| {
            invalid(
                "ca_pem",
                format!("certificate {which} is not an X.509 certificate: {e}"),
            )
        })?;
        RootCertStore::empty()
            .add(certificate.clone())
            .map_err(|e| {
                invalid(
                    "ca_pem",
                    format!("certificate {which} cannot be trusted as a CA: {e}"),
                )
            })?;
    }
    Ok(ca_pem.to_string())
}

/// The certificates of a stored `ca_pem`, as listed.
pub fn ca_views(ca_pem: &str) -> Vec<v1::WebhookCa> {
    let certificates = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .filter_map(Result::ok)
        .collect::<Vec<_>>();
    certificates
        .iter()
        .map(|der| {
            let parsed = X509Certificate::from_der(der).ok().map(|(_, c)| c);
            v1::WebhookCa {
                subject: parsed
                    .as_ref()
                    .map(|c| c.subject().to_string())
                    .unwrap_or_default(),
                sha256_fingerprint: posfleet_pki::ca::fingerprint(der),
                not_after_unix_ms: parsed
                    .map(|c| c.validity().not_after.timestamp().saturating_mul(1000))
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// The dispatcher's HTTP clients: one for the receivers checked against
/// the system's roots alone (and the http:// ones), one per distinct
/// webhook CA, keyed by the SHA-256 of its PEM. A webhook's CA never
/// changes (it is removed and added again instead), so its hash is taken
/// once.
pub(super) struct Clients {
    system_roots: RootCertStore,
    request_timeout: Duration,
    system: reqwest::Client,
    /// The SHA-256 of each webhook's CA, for the webhooks that have one.
    ca_of_webhook: HashMap<String, [u8; 32]>,
    by_ca: HashMap<[u8; 32], reqwest::Client>,
}

impl Clients {
    /// Loads the system's roots (the platform's store, or `SSL_CERT_FILE` /
    /// `SSL_CERT_DIR`) and builds the client that trusts them alone.
    pub(super) fn new(request_timeout: Duration) -> Result<Clients, String> {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::warn!(%error, "A system CA certificate cannot be read.");
        }
        let mut system_roots = RootCertStore::empty();
        let (added, ignored) = system_roots.add_parsable_certificates(found.certs);
        if ignored > 0 {
            tracing::warn!(
                ignored,
                "System CA certificates that cannot be trust anchors."
            );
        }
        if added == 0 {
            tracing::warn!(
                "No system CA certificates: https:// webhook receivers are trusted only \
                 through their own CA (`webhook add --receiver-ca-file`)."
            );
        }
        let system = build(system_roots.clone(), request_timeout)?;
        Ok(Clients {
            system_roots,
            request_timeout,
            system,
            ca_of_webhook: HashMap::new(),
            by_ca: HashMap::new(),
        })
    }

    /// The client for `webhook`'s receiver.
    pub(super) fn for_webhook(
        &mut self,
        webhook: &WebhookRecord,
    ) -> Result<reqwest::Client, String> {
        if webhook.ca_pem.is_empty() {
            return Ok(self.system.clone());
        }
        let key = *self
            .ca_of_webhook
            .entry(webhook.id.clone())
            .or_insert_with(|| Sha256::digest(webhook.ca_pem.as_bytes()).into());
        if let Some(client) = self.by_ca.get(&key) {
            return Ok(client.clone());
        }
        let client = self.with_ca(&webhook.ca_pem)?;
        self.by_ca.insert(key, client.clone());
        Ok(client)
    }

    /// Forgets removed webhooks, and the clients of CAs no webhook has any
    /// more.
    pub(super) fn retain(&mut self, webhooks: &[WebhookRecord]) {
        self.ca_of_webhook
            .retain(|id, _| webhooks.iter().any(|w| w.id == *id));
        let in_use: Vec<[u8; 32]> = self.ca_of_webhook.values().copied().collect();
        self.by_ca.retain(|key, _| in_use.contains(key));
    }

    /// A client trusting the system's roots and the certificates of `ca_pem`.
    fn with_ca(&self, ca_pem: &str) -> Result<reqwest::Client, String> {
        let mut roots = self.system_roots.clone();
        let certificates =
            posfleet_pki::certificates_from_pem(ca_pem.as_bytes(), "the webhook's CA")
                .map_err(|e| format!("TLS: {e}"))?;
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|e| format!("TLS: the webhook's CA cannot be trusted: {e}"))?;
        }
        build(roots, self.request_timeout)
    }
}

/// A client whose https:// requests trust `roots`, on posfleet-pki's
/// crypto provider.
fn build(roots: RootCertStore, request_timeout: Duration) -> Result<reqwest::Client, String> {
    let mut tls = ClientConfig::builder_with_provider(posfleet_pki::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .timeout(request_timeout)
        .connect_timeout(request_timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .tls_backend_preconfigured(tls)
        .build()
        .map_err(|e| super::error_chain(&e))
}

/// The TLS failure behind a request's error, said on one line for the
/// receiver at `url`; `None` when TLS is not what failed.
pub(super) fn tls_failure(url: &str, error: &(dyn StdError + 'static)) -> Option<String> {
    let failure = rustls_error(error)?;
    let host = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    Some(match failure {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "TLS: certificate for {host} is not valid: issued by a CA this webhook does not \
             trust (the system's roots, and its own CA if it has one: webhook add \
             --receiver-ca-file)"
        ),
        rustls::Error::InvalidCertificate(reason) => {
            format!("TLS: certificate for {host} is not valid: {reason}")
        }
        other => format!("TLS: handshake with {host} failed: {other}"),
    })
}

/// The rustls error in an error's chain. An `io::Error` does not list the
/// error it wraps among its sources (it skips to that one's source), so
/// each is looked into.
fn rustls_error<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(found) = error.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        next = match error.downcast_ref::<std::io::Error>() {
            Some(io) => match io.get_ref() {
                Some(wrapped) => Some(wrapped as &(dyn StdError + 'static)),
                None => error.source(),
            },
            None => error.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn ca_pem() -> String {
        let (ca, _key) =
            posfleet_pki::FleetCa::create("Example Corp Root CA", SystemTime::now()).expect("a CA");
        ca.certificates_pem().to_string()
    }

    #[test]
    fn a_ca_is_checked_when_added() {
        let ca = ca_pem();
        let (_, key) = posfleet_pki::FleetCa::create("x", SystemTime::now()).unwrap();
        let https = "https://hooks.example.com/";
        assert_eq!(validate_ca_pem(https, "").unwrap(), "");
        assert_eq!(validate_ca_pem("http://h/", " \n").unwrap(), "");
        assert_eq!(
            validate_ca_pem(https, &format!("\n{ca}\n")).unwrap(),
            ca.trim()
        );
        let two = format!("{ca}{}", ca_pem());
        assert_eq!(validate_ca_pem(https, &two).unwrap(), two.trim());
        let with_key = format!("{ca}{key}");
        let too_big = "x".repeat(MAX_CA_PEM_BYTES + 1);
        for (url, pem, fragment) in [
            ("http://h/", ca.as_str(), "http://"),
            (https, "not PEM at all", "no certificate"),
            (https, key.as_str(), "private key"),
            (https, with_key.as_str(), "private key"),
            (
                https,
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "certificate 1",
            ),
            (https, too_big.as_str(), "at most 65536 bytes"),
        ] {
            let error = validate_ca_pem(url, pem).unwrap_err();
            assert_eq!(error.code(), tonic::Code::InvalidArgument, "{pem}");
            assert!(error.message().contains("ca_pem"), "{error:?}");
            assert!(error.message().contains(fragment), "{fragment}: {error:?}");
        }
    }

    #[test]
    fn a_ca_is_listed_by_subject_and_fingerprint() {
        let ca = ca_pem();
        let der = posfleet_pki::certificates_from_pem(ca.as_bytes(), "ca").unwrap();
        let views = ca_views(&ca);
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].subject, "CN=Example Corp Root CA");
        assert_eq!(
            views[0].sha256_fingerprint,
            posfleet_pki::ca::fingerprint(&der[0])
        );
        let in_nine_years = (SystemTime::now() + Duration::from_secs(9 * 365 * 86400))
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!(views[0].not_after_unix_ms > in_nine_years, "{views:?}");
        assert!(ca_views("").is_empty());
    }

    #[test]
    fn a_certificate_failure_is_told_as_one() {
        let io = |e: rustls::Error| std::io::Error::other(e);
        let unknown = io(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        let said = tls_failure("https://hooks.example.com:8443/x", &unknown).unwrap();
        assert!(
            said.starts_with("TLS: certificate for hooks.example.com is not valid: issued by a CA"),
            "{said}"
        );
        let expired = io(rustls::Error::InvalidCertificate(CertificateError::Expired));
        assert_eq!(
            tls_failure("https://h/", &expired).unwrap(),
            "TLS: certificate for h is not valid: Expired"
        );
        let alert = io(rustls::Error::AlertReceived(
            rustls::AlertDescription::HandshakeFailure,
        ));
        assert!(
            tls_failure("https://h/", &alert)
                .unwrap()
                .starts_with("TLS: handshake with h failed: received fatal alert"),
        );
        // However deep in io::Errors.
        let wrapped = io(rustls::Error::InvalidCertificate(CertificateError::Expired));
        let wrapped = std::io::Error::other(wrapped);
        assert_eq!(
            tls_failure("https://h/", &wrapped).unwrap(),
            "TLS: certificate for h is not valid: Expired"
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(tls_failure("https://h/", &refused), None);
    }
}
