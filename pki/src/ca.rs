//! The fleet CA: made at the control plane's first start (key readable by
//! the owner alone), or supplied by the operator as a CA or intermediate
//! certificate and key from the company's PKI. It issues the control plane's
//! server certificates and one certificate per till.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

use crate::error::Error;
use crate::identity::{DEVICE_URI_PREFIX, DeviceIdentity, STORE_URI_PREFIX};
use crate::tls::certificates_from_pem;

/// The file names of a CA the control plane made itself, in its folder.
pub const CERTIFICATE_FILE: &str = "fleet-ca.crt";
pub const KEY_FILE: &str = "fleet-ca.key";

/// How long a CA made at first start is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Issued certificates start this much before the moment of issue, so a
/// till whose clock is a little behind accepts them at once.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// A CA that issues the fleet's certificates.
pub struct FleetCa {
    /// The CA's certificate, and any certificates above it the operator
    /// supplied with it, as PEM: what clients trust.
    certificates_pem: String,
    certificate: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// Read from the certificate: its subject (DER and as text), its
    /// subject key identifier, and its end.
    subject: Vec<u8>,
    subject_text: String,
    key_identifier: Option<Vec<u8>>,
    not_after: i64,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// A server certificate and its new key, as PEM.
#[derive(Clone)]
pub struct ServerCertificate {
    /// The server's certificate followed by the CA's.
    pub chain_pem: String,
    pub key_pem: String,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
}

/// A device certificate the CA issued.
#[derive(Debug, Clone)]
pub struct DeviceCertificate {
    pub der: Vec<u8>,
    pub pem: String,
    /// Serial number, in lowercase hex.
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
}

impl FleetCa {
    /// A new CA with an ECDSA P-256 key, valid for ten years from `now`.
    pub fn create(common_name: &str, now: SystemTime) -> Result<(FleetCa, String), Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let key_pem = key.serialize_pem();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = at(now - CLOCK_SKEW);
        params.not_after = at(now + CA_VALIDITY);
        params.serial_number = Some(random_serial()?);
        let certificate = params.self_signed(&key)?;
        let ca = FleetCa::new(
            certificate.pem(),
            certificate.der().clone(),
            Issuer::new(params, key),
        )?;
        Ok((ca, key_pem))
    }

    /// A CA from PEM text: its certificate (first, optionally followed by
    /// the certificates above it) and its private key.
    pub fn from_pem(certificates_pem: &str, key_pem: &str) -> Result<FleetCa, Error> {
        let certificates =
            certificates_from_pem(certificates_pem.as_bytes(), "the CA certificate")?;
        let certificate = certificates
            .into_iter()
            .next()
            .expect("certificates_from_pem returns at least one");
        let key = KeyPair::from_pem(key_pem).map_err(|e| Error::Pem {
            what: "the CA key".into(),
            detail: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_der(&certificate, key)
            .map_err(|e| Error::Certificate(format!("the CA certificate: {e}")))?;
        let ca = FleetCa::new(certificates_pem.to_string(), certificate, issuer)?;
        ca.check_key_matches()?;
        Ok(ca)
    }

    fn new(
        certificates_pem: String,
        certificate: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    ) -> Result<FleetCa, Error> {
        use x509_parser::extensions::ParsedExtension;
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, parsed) = X509Certificate::from_der(&certificate)
            .map_err(|e| Error::Certificate(format!("the CA certificate: {e}")))?;
        let key_identifier =
            parsed
                .extensions()
                .iter()
                .find_map(|extension| match extension.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                    _ => None,
                });
        let subject = parsed.subject().as_raw().to_vec();
        let subject_text = parsed.subject().to_string();
        let not_after = parsed.validity().not_after.timestamp();
        Ok(FleetCa {
            certificates_pem,
            certificate,
            issuer,
            subject,
            subject_text,
            key_identifier,
            not_after,
        })
    }

    /// The CA in these two PEM files.
    pub fn load_files(certificate: &Path, key: &Path) -> Result<FleetCa, Error> {
        let read = |path: &Path| {
            read_optional(path)?.ok_or_else(|| Error::Read {
                path: path.to_path_buf(),
                source: std::io::ErrorKind::NotFound.into(),
            })
        };
        FleetCa::from_pem(&read(certificate)?, &read(key)?)
    }

    /// A new CA, as [`FleetCa::create`], saved to these two files (the key
    /// first, mode 0600; each written whole or not at all).
    pub fn create_files(
        certificate: &Path,
        key: &Path,
        common_name: &str,
        now: SystemTime,
    ) -> Result<FleetCa, Error> {
        let (ca, key_pem) = FleetCa::create(common_name, now)?;
        if let Some(dir) = key.parent() {
            std::fs::create_dir_all(dir).map_err(|source| Error::Write {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        // The key first: a crash between the two leaves a key with no
        // certificate, which is reported rather than silently replaced.
        write_private(key, key_pem.as_bytes())?;
        write_private(certificate, ca.certificates_pem.as_bytes())?;
        Ok(ca)
    }

    /// The CA kept in `dir` ([`CERTIFICATE_FILE`], [`KEY_FILE`]), made and
    /// saved there (the key with mode 0600) if there is none yet. `true`
    /// with it when it was made now.
    pub fn load_or_create(dir: &Path, now: SystemTime) -> Result<(FleetCa, bool), Error> {
        let certificate_path = dir.join(CERTIFICATE_FILE);
        let key_path = dir.join(KEY_FILE);
        let certificate = read_optional(&certificate_path)?;
        let key = read_optional(&key_path)?;
        match (certificate, key) {
            (Some(certificate), Some(key)) => Ok((FleetCa::from_pem(&certificate, &key)?, false)),
            (None, None) => Ok((
                FleetCa::create_files(&certificate_path, &key_path, "posfleet fleet CA", now)?,
                true,
            )),
            (Some(_), None) => Err(Error::Certificate(format!(
                "{} exists but {} does not: restore the CA key, or move the certificate away to make a new CA (every till must then enroll again)",
                certificate_path.display(),
                key_path.display()
            ))),
            (None, Some(_)) => Err(Error::Certificate(format!(
                "{} exists but {} does not: restore the CA certificate",
                key_path.display(),
                certificate_path.display()
            ))),
        }
    }

    /// What clients trust, as PEM.
    pub fn certificates_pem(&self) -> &str {
        &self.certificates_pem
    }

    /// The CA's own certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// SHA-256 of the CA certificate's DER, in lowercase hex: what a till
    /// given the fingerprint with its enrollment token pins.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.certificate)
    }

    /// The CA certificate's subject, as text.
    pub fn subject(&self) -> &str {
        &self.subject_text
    }

    /// When the CA certificate ends, in seconds since the Unix epoch.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// Whether this CA issued the certificate `device` was read from: the
    /// certificate's authority key identifier is this CA's subject key
    /// identifier, or, where either is missing, its issuer is this CA's
    /// subject. (Only for certificates a TLS verifier already checked.)
    pub fn issued(&self, device: &DeviceIdentity) -> bool {
        match (&self.key_identifier, &device.authority_key_id) {
            (Some(ours), Some(theirs)) => ours == theirs,
            _ => self.subject == device.issuer,
        }
    }

    /// A server certificate for `names` (host names or IP addresses), with a
    /// new ECDSA P-256 key, valid for `validity` from `now`.
    pub fn issue_server(
        &self,
        names: &[String],
        validity: Duration,
        now: SystemTime,
    ) -> Result<ServerCertificate, Error> {
        if names.is_empty() {
            return Err(Error::Certificate(
                "a server certificate needs at least one name".into(),
            ));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => name
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|_| Error::BadName(name.clone())),
            })
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = at(now - CLOCK_SKEW);
        params.not_after = at(now + validity);
        params.serial_number = Some(random_serial()?);
        let certificate = params.signed_by(&key, &self.issuer)?;
        Ok(ServerCertificate {
            chain_pem: format!("{}{}", certificate.pem(), self.certificates_pem),
            key_pem: key.serialize_pem(),
            not_after: unix(params.not_after),
        })
    }

    /// A device certificate for the key in `request`, which must be
    /// `proof_key`, the key that signed the enrollment or renewal proof.
    /// What the certificate names is set here: the device and store ids
    /// given, whatever the request asked for.
    pub fn issue_device(
        &self,
        request: &[u8],
        proof_key: &[u8; 32],
        device_id: &str,
        store_id: &str,
        validity: Duration,
        now: SystemTime,
    ) -> Result<DeviceCertificate, Error> {
        for name in [device_id, store_id] {
            let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            if name.is_empty() || !name.chars().all(allowed) {
                return Err(Error::BadName(name.to_string()));
            }
        }
        let parsed = parse_request(request, proof_key)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, device_id);
        params.subject_alt_names = vec![
            uri(&format!("{DEVICE_URI_PREFIX}{device_id}"))?,
            uri(&format!("{STORE_URI_PREFIX}{store_id}"))?,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = at(now - CLOCK_SKEW);
        params.not_after = at(now + validity);
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone());
        let not_after = unix(params.not_after);
        let certificate = CertificateSigningRequestParams {
            params,
            public_key: parsed.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(DeviceCertificate {
            der: certificate.der().to_vec(),
            pem: certificate.pem(),
            serial: hex::encode(serial.to_bytes()),
            not_after,
        })
    }

    /// Refuses a key that is not the certificate's: every certificate
    /// issued with it would fail to verify.
    fn check_key_matches(&self) -> Result<(), Error> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, parsed) = X509Certificate::from_der(&self.certificate)
            .map_err(|e| Error::Certificate(format!("the CA certificate: {e}")))?;
        use rcgen::PublicKeyData;
        if parsed.public_key().subject_public_key.data.as_ref() != self.issuer.key().der_bytes() {
            return Err(Error::Certificate(
                "the CA key does not belong to the CA certificate".into(),
            ));
        }
        Ok(())
    }
}

/// Checks a certificate request before anything is spent on it (an
/// enrollment token's use): it must parse, carry a valid signature, and be
/// for `proof_key`, the Ed25519 key that signed the proof.
pub fn check_request(request: &[u8], proof_key: &[u8; 32]) -> Result<(), Error> {
    parse_request(request, proof_key).map(|_| ())
}

fn parse_request(
    request: &[u8],
    proof_key: &[u8; 32],
) -> Result<CertificateSigningRequestParams, Error> {
    // Parsing checks the request's own signature.
    let parsed =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(request))
            .map_err(|e| Error::BadRequest(e.to_string()))?;
    use rcgen::PublicKeyData;
    if parsed.public_key.algorithm() != &rcgen::PKCS_ED25519
        || parsed.public_key.der_bytes() != proof_key.as_slice()
    {
        return Err(Error::KeyMismatch);
    }
    Ok(parsed)
}

/// SHA-256 of a certificate's DER, in lowercase hex.
pub fn fingerprint(certificate: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, certificate))
}

fn uri(value: &str) -> Result<SanType, Error> {
    value
        .to_string()
        .try_into()
        .map(SanType::URI)
        .map_err(|_| Error::BadName(value.to_string()))
}

fn random_serial() -> Result<SerialNumber, Error> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Certificate("no randomness for a serial number".into()))?;
    // Positive, as DER integers for serial numbers must be.
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

fn at(moment: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(moment)
}

fn unix(moment: OffsetDateTime) -> i64 {
    moment.unix_timestamp()
}

fn read_optional(path: &Path) -> Result<Option<String>, Error> {
    posfleet_runtime::files::read_optional(path)
        .map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?
        .map(|bytes| {
            String::from_utf8(bytes).map_err(|_| Error::Pem {
                what: path.display().to_string(),
                detail: "not PEM text".into(),
            })
        })
        .transpose()
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    posfleet_runtime::files::write_private(path, bytes).map_err(|source| Error::Write {
        path: PathBuf::from(path),
        source,
    })
}
