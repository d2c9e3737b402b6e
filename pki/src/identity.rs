//! Who a device certificate names: read back from a certificate the fleet
//! CA issued (and a TLS verifier has already checked).

use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::Error;

/// The URI subject alternative name that names the device.
pub const DEVICE_URI_PREFIX: &str = "urn:posfleet:device:";
/// The URI subject alternative name that names the device's store.
pub const STORE_URI_PREFIX: &str = "urn:posfleet:store:";

/// The device a certificate was issued to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub device_id: String,
    pub store_id: String,
    /// The certificate's serial number, in lowercase hex.
    pub serial: String,
    /// Validity, in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// The issuer's distinguished name (DER), and the key identifier of the
    /// issuer's key when the certificate names it: which CA issued it.
    pub issuer: Vec<u8>,
    pub authority_key_id: Option<Vec<u8>>,
}

impl DeviceIdentity {
    /// Reads the identity from a DER certificate. Exactly one device and one
    /// store name are required.
    pub fn from_certificate(der: &[u8]) -> Result<DeviceIdentity, Error> {
        let (_, certificate) = X509Certificate::from_der(der)
            .map_err(|e| Error::NotADeviceCertificate(format!("cannot parse it: {e}")))?;
        let names = certificate
            .subject_alternative_name()
            .map_err(|e| {
                Error::NotADeviceCertificate(format!("bad subject alternative names: {e}"))
            })?
            .map(|extension| extension.value.general_names.clone())
            .unwrap_or_default();
        let uris: Vec<&str> = names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect();
        let one = |prefix: &str, what: &str| -> Result<String, Error> {
            let mut found = uris.iter().filter_map(|uri| uri.strip_prefix(prefix));
            match (found.next(), found.next()) {
                (Some(value), None) if !value.is_empty() => Ok(value.to_string()),
                (None, _) => Err(Error::NotADeviceCertificate(format!("it names no {what}"))),
                _ => Err(Error::NotADeviceCertificate(format!(
                    "it names more than one {what}"
                ))),
            }
        };
        let validity = certificate.validity();
        let authority_key_id =
            certificate.extensions().iter().find_map(|extension| {
                match extension.parsed_extension() {
                    ParsedExtension::AuthorityKeyIdentifier(aki) => {
                        aki.key_identifier.as_ref().map(|id| id.0.to_vec())
                    }
                    _ => None,
                }
            });
        Ok(DeviceIdentity {
            device_id: one(DEVICE_URI_PREFIX, "device")?,
            store_id: one(STORE_URI_PREFIX, "store")?,
            serial: hex::encode(certificate.raw_serial()),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            issuer: certificate.issuer().as_raw().to_vec(),
            authority_key_id,
        })
    }
}
