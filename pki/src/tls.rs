//! The rustls configurations: the control plane's server side, which asks
//! for a device certificate, checks it against the fleet CA and the live
//! list of revoked devices, and the client side of tills and operators
//! (trusting given CAs, or a CA pinned by its fingerprint).

use std::fmt;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use crate::crypto_provider;
use crate::error::Error;
use crate::identity::DeviceIdentity;

/// The devices that must be refused, consulted at every handshake (and by
/// the server for every request on a connection already open).
pub trait Revocations: Send + Sync + fmt::Debug {
    fn is_revoked(&self, device: &DeviceIdentity) -> bool;
}

/// Every certificate in PEM text; at least one.
pub fn certificates_from_pem(
    pem: &[u8],
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            what: what.to_string(),
            detail: e.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(Error::Pem {
            what: what.to_string(),
            detail: "no certificate in it".into(),
        });
    }
    Ok(certificates)
}

/// The first private key in PEM text.
pub fn private_key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| Error::Pem {
        what: what.to_string(),
        detail: e.to_string(),
    })
}

fn roots(trusted: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, Error> {
    let mut store = RootCertStore::empty();
    for certificate in trusted {
        store
            .add(certificate.clone())
            .map_err(|e| Error::Certificate(format!("a trusted CA certificate: {e}")))?;
    }
    Ok(Arc::new(store))
}

/// The server side: presents `chain` (the server's certificate, then the
/// CA's), asks every client for a certificate from `client_cas` but lets
/// one in without (enrollment needs none; every other call checks for the
/// identity itself), and refuses at the handshake a certificate from another
/// CA, out of its validity, not a device's, or of a revoked device. No
/// session is resumed, so those checks run on every connection.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_cas: &[CertificateDer<'static>],
    revocations: Arc<dyn Revocations>,
) -> Result<ServerConfig, Error> {
    let provider = crypto_provider();
    let inner = WebPkiClientVerifier::builder_with_provider(roots(client_cas)?, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::Certificate(format!("client verifier: {e}")))?;
    let verifier = Arc::new(DeviceVerifier { inner, revocations });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    // A resumed session skips the certificate checks: a revoked or expired
    // device would get back in. Every connection is a full handshake.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The client side: trusts the servers `trusted` issued, and presents
/// `identity` (a device certificate chain and key) when given.
pub fn client_config(
    trusted: &[CertificateDer<'static>],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, Error> {
    let provider = crypto_provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(trusted)?, provider.clone())
        .build()
        .map_err(|e| Error::Certificate(format!("server verifier: {e}")))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_webpki_verifier(verifier);
    Ok(match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    })
}

/// Checks that a client trusting `trusted` would accept `chain` (a server
/// certificate, then its intermediates) for `name` now: the check made on
/// a server certificate supplied as files, before it is served.
pub fn verify_server_chain(
    chain: &[CertificateDer<'static>],
    trusted: &[CertificateDer<'static>],
    name: &str,
) -> Result<(), Error> {
    let provider = crypto_provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(trusted)?, provider)
        .build()
        .map_err(|e| Error::Certificate(format!("server verifier: {e}")))?;
    let server_name =
        ServerName::try_from(name.to_string()).map_err(|_| Error::BadName(name.to_string()))?;
    let (end_entity, intermediates) = chain
        .split_first()
        .ok_or_else(|| Error::Certificate("no certificate in the chain".into()))?;
    verifier
        .verify_server_cert(
            end_entity,
            intermediates,
            &server_name,
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| Error::Certificate(format!("{e}")))
}

/// A CA fingerprint as given to a till: SHA-256 of the CA certificate's
/// DER, 64 hex digits (upper or lower case, `:` between bytes allowed).
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], Error> {
    let digits: String = text.trim().chars().filter(|c| *c != ':').collect();
    hex::decode(&digits)
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| {
            Error::BadFingerprint(format!(
                "`{text}` is not a SHA-256 fingerprint (64 hex digits)"
            ))
        })
}

/// The client side of a till given the fleet CA's fingerprint (with its
/// enrollment token) rather than the CA certificate: the server is accepted
/// only if the chain it presents holds a certificate with that fingerprint,
/// and its own certificate verifies, for the name dialed, with that
/// certificate as the one trust anchor.
pub fn pinned_client_config(fingerprint: &[u8; 32]) -> Result<ClientConfig, Error> {
    let provider = crypto_provider();
    let verifier = Arc::new(PinnedCaVerifier {
        fingerprint: *fingerprint,
        provider: provider.clone(),
    });
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The server's chain held no certificate with the pinned fingerprint.
/// (rustls shows it with `Debug`, so that says the sentence too.)
#[derive(thiserror::Error)]
#[error(
    "the server's certificate chain holds no CA with the pinned fingerprint {pinned} \
     (it presented {presented}): not the fleet's control plane, or the pin is wrong"
)]
pub struct NotThePinnedCa {
    pub pinned: String,
    /// The fingerprints of the certificates it presented.
    pub presented: String,
}

impl fmt::Debug for NotThePinnedCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Finds the pinned CA in the presented chain, then verifies the chain
/// against it as webpki does against any trusted CA.
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = |der: &[u8]| ring::digest::digest(&ring::digest::SHA256, der);
        let Some(anchor) = intermediates
            .iter()
            .find(|der| digest(der).as_ref() == self.fingerprint)
        else {
            let presented = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|der| hex::encode(digest(der)))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(NotThePinnedCa {
                    pinned: hex::encode(self.fingerprint),
                    presented,
                })),
            )));
        };
        let roots = roots(&[anchor.clone().into_owned()])
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|der| *der != anchor)
            .cloned()
            .collect();
        WebPkiServerVerifier::builder_with_provider(roots, self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("server verifier: {e}")))?
            .verify_server_cert(end_entity, &others, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The fleet CA's verification, then: is it a device's certificate, and is
/// that device still allowed in.
#[derive(Debug)]
struct DeviceVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Arc<dyn Revocations>,
}

impl ClientCertVerifier for DeviceVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let identity = DeviceIdentity::from_certificate(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        })?;
        if self.revocations.is_revoked(&identity) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
