//! The till's side of enrollment and renewal: a certificate request for its
//! Ed25519 key, and that key in the form TLS takes it.

use ed25519_dalek::pkcs8::EncodePrivateKey;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::Error;

/// A DER certificate request signed by `key`. It names nothing: the control
/// plane decides what the certificate says.
pub fn certificate_request(key: &ed25519_dalek::SigningKey) -> Result<Vec<u8>, Error> {
    let pair = key_pair(key)?;
    let request = rcgen::CertificateParams::default().serialize_request(&pair)?;
    Ok(request.der().to_vec())
}

/// `key` as the PKCS#8 private key a TLS client presents with its
/// certificate.
pub fn private_key_der(key: &ed25519_dalek::SigningKey) -> Result<PrivateKeyDer<'static>, Error> {
    Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8(key)?)))
}

fn pkcs8(key: &ed25519_dalek::SigningKey) -> Result<Vec<u8>, Error> {
    key.to_pkcs8_der()
        .map(|document| document.as_bytes().to_vec())
        .map_err(|e| Error::Certificate(format!("cannot encode the device key: {e}")))
}

fn key_pair(key: &ed25519_dalek::SigningKey) -> Result<rcgen::KeyPair, Error> {
    let der = PrivatePkcs8KeyDer::from(pkcs8(key)?);
    Ok(rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &der,
        &rcgen::PKCS_ED25519,
    )?)
}
