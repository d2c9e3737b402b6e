//! The control plane's TLS: the fleet's CAs and their rotation
//! ([`authorities`]), the listeners' own certificate (issued from the fleet
//! CA, or supplied as files and reloaded when they change), and the
//! listeners themselves ([`listener`]), which terminate TLS with rustls so
//! that each connection carries the device its certificate names and a
//! revoked device is cut off at once.
//!
//! Whatever changes (a reloaded or reissued server certificate, a rotated or
//! retired CA), the listeners' rustls configuration is rebuilt and each new
//! handshake takes the current one; open connections keep theirs.

pub mod authorities;
mod listener;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use posfleet_pki::DeviceIdentity;
use posfleet_pki::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tonic::Status;

pub use authorities::{Authorities, Source};
pub use listener::{
    Acceptor, Connection, DeviceGate, HANDSHAKE_TIMEOUT, Incoming, MAX_HANDSHAKES, Peer,
};
pub(crate) use listener::{device_of, remote_address};

use crate::error::Error;

/// The current trust bundle, kept in `data_dir/tls` for operators and
/// tills to trust (`--ca-file`, `ca_cert_path`): rewritten whenever it
/// changes.
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";

/// How long the listeners' own certificate is valid when issued here; a
/// new one is issued when two thirds of that have passed.
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// How often the revoked devices are read again, for revocations made
/// through another replica.
const REVOCATION_REFRESH: Duration = Duration::from_secs(5);
/// How often server certificate files are looked at for a change, and an
/// issued certificate for its renewal.
pub const SERVER_CERT_CHECK: Duration = Duration::from_secs(5);

/// The control plane's TLS, shared by the listeners and the APIs.
pub(crate) struct Tls {
    trust: RwLock<Trust>,
    /// The names the listeners' certificate is for.
    names: Vec<String>,
    /// The server certificate supplied as files (certificate chain, key).
    server_files: Option<(PathBuf, PathBuf)>,
    /// PEM certificates added to the tills' trust bundle: the issuer of a
    /// server certificate supplied as files.
    extra_trust_pem: String,
    server: Mutex<ServerCertificate>,
    grpc: watch::Sender<tokio_rustls::TlsAcceptor>,
    http: watch::Sender<tokio_rustls::TlsAcceptor>,
    pub gate: Arc<DeviceGate>,
    /// Held through a rotation or a retirement: one at a time.
    changing: tokio::sync::Mutex<()>,
    /// Where the current trust bundle is written ([`TRUST_BUNDLE_FILE`]).
    bundle_file: PathBuf,
}

/// The CAs in force and the trust bundle tills get from them.
struct Trust {
    authorities: Arc<Authorities>,
    bundle_pem: Arc<str>,
    /// SHA-256 of `bundle_pem`: a till reporting another one is sent it.
    bundle_digest: [u8; 32],
}

impl Trust {
    fn new(authorities: Authorities, extra: &str) -> Trust {
        let bundle_pem: Arc<str> = authorities.trust_bundle_pem(extra).into();
        let bundle_digest = sha256(bundle_pem.as_bytes());
        Trust {
            authorities: Arc::new(authorities),
            bundle_pem,
            bundle_digest,
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// The listeners' certificate and key, and where they came from.
struct ServerCertificate {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    origin: Origin,
}

enum Origin {
    /// Issued here from the fleet CA; issued again at `renew_at`.
    Issued { renew_at: SystemTime },
    /// Read from the configured files, which looked like this then.
    Files { stamp: [Option<FileStamp>; 2] },
}

/// What changes when a file is replaced or rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    fn of(paths: &(PathBuf, PathBuf)) -> [Option<FileStamp>; 2] {
        use std::os::unix::fs::MetadataExt;
        [&paths.0, &paths.1].map(|path| {
            std::fs::metadata(path).ok().map(|m| FileStamp {
                modified: m.modified().ok(),
                len: m.len(),
                inode: m.ino(),
            })
        })
    }
}

/// Why a device's connection is not let through.
pub(crate) enum Refusal {
    Revoked,
    /// Its certificate is from a CA retired since the connection opened.
    RetiredCa,
}

impl Tls {
    /// `None` when the configuration serves plaintext. Loads (or makes) the
    /// fleet CA, reads or issues the listeners' certificate, and reads the
    /// revoked devices.
    pub async fn open(
        config: &crate::config::Config,
        storage: &crate::storage::Storage,
    ) -> Result<Option<Arc<Tls>>, Error> {
        if !config.tls() {
            return Ok(None);
        }
        let now = SystemTime::now();
        let (authorities, created) = Authorities::load(config, now)?;
        if created {
            tracing::info!(
                path = %config.data_dir.join("tls").join(posfleet_pki::ca::CERTIFICATE_FILE).display(),
                fingerprint = %authorities.active.fingerprint(),
                "Created the fleet CA; tills and operators trust its certificate."
            );
        }
        let extra_trust_pem = match &config.tls_server_trust_path {
            Some(path) => {
                let pem = read_text(path)?;
                posfleet_pki::certificates_from_pem(pem.as_bytes(), &path.display().to_string())?;
                pem
            }
            None => String::new(),
        };
        let server_files = config
            .tls_server_cert_path
            .clone()
            .zip(config.tls_server_key_path.clone());
        let trust = Trust::new(authorities, &extra_trust_pem);
        let server = match &server_files {
            Some(files) => read_server_files(files, &trust, &config.tls_server_names)?
                .map_err(|problem| Error::Tls(posfleet_pki::Error::Certificate(problem)))?,
            None => issue_server(&trust.authorities, &config.tls_server_names, now)?,
        };
        let gate = Arc::new(DeviceGate::new(storage.revoked_device_ids().await?));
        let (grpc, http) = acceptors(&server, &trust.authorities, &gate)?;
        let bundle_file = config.data_dir.join("tls").join(TRUST_BUNDLE_FILE);
        write_bundle(&bundle_file, &trust.bundle_pem)?;
        tracing::info!(
            names = ?config.tls_server_names,
            ca_fingerprint = %trust.authorities.active.fingerprint(),
            server_certificate = if server_files.is_some() { "files" } else { "issued" },
            "TLS on: devices enroll for a certificate and call with it."
        );
        Ok(Some(Arc::new(Tls {
            trust: RwLock::new(trust),
            names: config.tls_server_names.clone(),
            server_files,
            extra_trust_pem,
            server: Mutex::new(server),
            grpc: watch::channel(grpc).0,
            http: watch::channel(http).0,
            gate,
            changing: tokio::sync::Mutex::new(()),
            bundle_file,
        })))
    }

    /// When each of the control plane's certificates ends (seconds since
    /// the Unix epoch), named as `posfleet_tls_certificate_expiry_timestamp_seconds`
    /// labels them: `server`, `fleet_ca` and, during a rotation,
    /// `previous_fleet_ca`.
    pub fn expiries(&self) -> Vec<(&'static str, i64)> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let authorities = self.authorities();
        let mut expiries = vec![("fleet_ca", authorities.active.not_after())];
        if let Some(previous) = &authorities.previous {
            expiries.push(("previous_fleet_ca", previous.not_after()));
        }
        let server = self.server.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Ok((_, leaf))) = server
            .chain
            .first()
            .map(|der| X509Certificate::from_der(der))
        {
            expiries.push(("server", leaf.validity().not_after.timestamp()));
        }
        expiries
    }

    /// The CAs in force now.
    pub fn authorities(&self) -> Arc<Authorities> {
        self.read_trust().authorities.clone()
    }

    /// The trust bundle tills hold (PEM) and its SHA-256.
    pub fn trust_bundle(&self) -> (Arc<str>, [u8; 32]) {
        let trust = self.read_trust();
        (trust.bundle_pem.clone(), trust.bundle_digest)
    }

    fn read_trust(&self) -> std::sync::RwLockReadGuard<'_, Trust> {
        self.trust
            .read()
            .expect("never poisoned: no panics while held")
    }

    /// What the gRPC listener's handshakes use.
    pub fn grpc_acceptor(&self) -> Acceptor {
        self.grpc.subscribe()
    }

    /// What the HTTP listener's handshakes use.
    pub fn http_acceptor(&self) -> Acceptor {
        self.http.subscribe()
    }

    /// Whether a request on a connection of `device` goes on: not if the
    /// device was revoked, nor if its certificate's CA was retired since
    /// the connection opened (the connection is then closed, and the till
    /// reconnects with its new certificate).
    pub fn admit(&self, device: &DeviceIdentity) -> Result<(), Refusal> {
        if self.gate.is_revoked_id(&device.device_id) {
            return Err(Refusal::Revoked);
        }
        if !self.read_trust().authorities.trusts(device) {
            self.gate.disconnect(&device.device_id);
            return Err(Refusal::RetiredCa);
        }
        Ok(())
    }

    /// Whether a device whose certificate the CA `issued_by` (fingerprint;
    /// empty when not recorded) issued should renew it now: during a
    /// rotation, when that is not the active CA.
    pub fn should_renew(&self, issued_by: &str) -> bool {
        let trust = self.read_trust();
        trust.authorities.previous.is_some() && issued_by != trust.authorities.active.fingerprint()
    }

    /// Makes a new active CA; the current one stays trusted (and the
    /// listeners' issuer) until retired. Tills get the new trust bundle at
    /// their next heartbeat and renew their certificate from the new CA.
    pub async fn rotate(&self) -> Result<Arc<Authorities>, Status> {
        let _one = self.changing.lock().await;
        let current = self.authorities();
        if current.source == Source::Configured {
            return Err(Status::failed_precondition(
                "the fleet CA comes from tls_ca_cert_path: rotate it by moving the current CA to \
                 tls_previous_ca_cert_path/tls_previous_ca_key_path, setting the new one, and \
                 restarting",
            ));
        }
        if let Some(previous) = &current.previous {
            return Err(Status::failed_precondition(format!(
                "a rotation is under way: retire CA {} first (`posfleet ca retire`)",
                previous.fingerprint()
            )));
        }
        let rotated = current.rotate(SystemTime::now()).map_err(Status::from)?;
        tracing::info!(
            active = %rotated.active.fingerprint(),
            previous = %current.active.fingerprint(),
            "Fleet CA rotated: tills get the new CA at their next heartbeat and renew from it."
        );
        self.install_trust(rotated)
    }

    /// Stops trusting the previous CA: the listeners' certificate is issued
    /// from the active one from now on, and connections made with a
    /// certificate from the previous one are closed at their next request.
    /// `holding` lists the enrolled tills that still hold such a
    /// certificate; unless `force`, any is a refusal. Answers the CAs now in
    /// force and the tills that must enroll again.
    pub async fn retire(
        &self,
        holding: impl AsyncFnOnce() -> Result<Vec<String>, Error>,
        force: bool,
    ) -> Result<(Arc<Authorities>, Vec<String>), Status> {
        let _one = self.changing.lock().await;
        let current = self.authorities();
        let Some(previous) = current.previous.clone() else {
            return Err(Status::failed_precondition(
                "no CA is being rotated out: nothing to retire",
            ));
        };
        if current.source == Source::Configured {
            return Err(Status::failed_precondition(
                "the previous CA comes from tls_previous_ca_cert_path: retire it by removing \
                 tls_previous_ca_cert_path and tls_previous_ca_key_path and restarting",
            ));
        }
        let holding = holding().await?;
        if !holding.is_empty() && !force {
            return Err(Status::failed_precondition(format!(
                "{} enrolled till(s) still hold a certificate from CA {} (for example {}): online \
                 tills renew at their next heartbeat, offline ones when they return; wait, or \
                 retire with --force, after which those tills must enroll again",
                holding.len(),
                previous.fingerprint(),
                holding[..holding.len().min(3)].join(", ")
            )));
        }
        let retired = current.retire().map_err(Status::from)?;
        tracing::info!(
            retired = %previous.fingerprint(),
            active = %retired.active.fingerprint(),
            forced = !holding.is_empty(),
            "Previous fleet CA retired."
        );
        let authorities = self.install_trust(retired)?;
        for device in &holding {
            self.gate.disconnect(device);
        }
        Ok((authorities, holding))
    }

    /// Puts new CAs in force: the trust bundle, the listeners'
    /// configuration and (when issued here by another CA now) the
    /// listeners' certificate.
    fn install_trust(&self, authorities: Authorities) -> Result<Arc<Authorities>, Status> {
        let trust = Trust::new(authorities, &self.extra_trust_pem);
        let mut server = self
            .server
            .lock()
            .expect("never poisoned: no panics while held");
        if matches!(server.origin, Origin::Issued { .. }) {
            *server = issue_server(&trust.authorities, &self.names, SystemTime::now())
                .map_err(Status::from)?;
        }
        let (grpc, http) = acceptors(&server, &trust.authorities, &self.gate)
            .map_err(|e| Status::from(Error::from(e)))?;
        let authorities = trust.authorities.clone();
        // The CAs changed already (the state file): a failure here is
        // reported, and the next start writes the file again.
        if let Err(error) = write_bundle(&self.bundle_file, &trust.bundle_pem) {
            tracing::error!(%error, "Cannot write the trust bundle file.");
        }
        *self
            .trust
            .write()
            .expect("never poisoned: no panics while held") = trust;
        self.grpc.send_replace(grpc);
        self.http.send_replace(http);
        Ok(authorities)
    }

    /// Issues the listeners' certificate again when it is due, or reads
    /// the supplied files again when they changed. Files that do not make a
    /// usable certificate are reported (once per change) and the current
    /// certificate kept.
    fn check_server_certificate(&self) {
        let mut server = self
            .server
            .lock()
            .expect("never poisoned: no panics while held");
        let replacement = match (&server.origin, &self.server_files) {
            (Origin::Issued { renew_at }, _) if SystemTime::now() >= *renew_at => {
                issue_server(&self.authorities(), &self.names, SystemTime::now())
                    .map_err(|e| e.to_string())
            }
            (Origin::Files { stamp }, Some(files)) if *stamp != FileStamp::of(files) => {
                let read = read_server_files(files, &self.read_trust(), &self.names);
                if !matches!(read, Ok(Ok(_))) {
                    // Looked at again only when the files change again.
                    server.origin = Origin::Files {
                        stamp: FileStamp::of(files),
                    };
                }
                read.map_err(|e| e.to_string()).and_then(|read| read)
            }
            _ => return,
        };
        let installed = replacement.and_then(|replacement| {
            let (grpc, http) = acceptors(&replacement, &self.authorities(), &self.gate)
                .map_err(|e| e.to_string())?;
            *server = replacement;
            self.grpc.send_replace(grpc);
            self.http.send_replace(http);
            Ok(())
        });
        match installed {
            Ok(()) => tracing::info!(
                from_files = self.server_files.is_some(),
                "The listeners' certificate was replaced; new connections use it."
            ),
            Err(error) => tracing::error!(
                %error,
                "Cannot replace the listeners' certificate; new connections still get the current one."
            ),
        }
    }

    /// Reads the revoked devices every few seconds (cutting any newly
    /// revoked one) and looks after the listeners' certificate, until
    /// `stop`.
    pub fn spawn_refresh(
        self: &Arc<Self>,
        storage: crate::storage::Storage,
        mut stop: watch::Receiver<bool>,
    ) {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut revocations = tokio::time::interval(REVOCATION_REFRESH);
            let mut certificate = tokio::time::interval(SERVER_CERT_CHECK);
            loop {
                let revocations_due = tokio::select! {
                    _ = revocations.tick() => true,
                    _ = certificate.tick() => false,
                    _ = stop.wait_for(|s| *s) => return,
                };
                if revocations_due {
                    tls.refresh_revocations(&storage).await;
                } else {
                    tls.check_server_certificate();
                }
            }
        });
    }

    async fn refresh_revocations(&self, storage: &crate::storage::Storage) {
        match storage.revoked_device_ids().await {
            Ok(ids) => {
                for id in ids {
                    if !self.gate.is_revoked_id(&id) {
                        self.gate.revoke(&id);
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "Cannot read the revoked devices."),
        }
    }
}

/// A new certificate for the listeners from the CA that issues them now.
fn issue_server(
    authorities: &Authorities,
    names: &[String],
    now: SystemTime,
) -> Result<ServerCertificate, Error> {
    let issued = authorities
        .server_issuer()
        .issue_server(names, SERVER_CERT_VALIDITY, now)?;
    Ok(ServerCertificate {
        chain: posfleet_pki::certificates_from_pem(
            issued.chain_pem.as_bytes(),
            "the server certificate",
        )?,
        key: posfleet_pki::private_key_from_pem(issued.key_pem.as_bytes(), "the server key")?,
        origin: Origin::Issued {
            renew_at: now + SERVER_CERT_VALIDITY * 2 / 3,
        },
    })
}

/// The server certificate in the configured files, checked: it parses, the
/// key is its key, and a till holding the trust bundle accepts it for
/// every configured name. The outer error is an unreadable file, the inner
/// one a certificate that cannot be served.
fn read_server_files(
    files: &(PathBuf, PathBuf),
    trust: &Trust,
    names: &[String],
) -> Result<Result<ServerCertificate, String>, Error> {
    let stamp = FileStamp::of(files);
    let (chain_pem, key_pem) = (read_text(&files.0)?, read_text(&files.1)?);
    let check = || -> Result<ServerCertificate, String> {
        let chain = posfleet_pki::certificates_from_pem(
            chain_pem.as_bytes(),
            &files.0.display().to_string(),
        )
        .map_err(|e| e.to_string())?;
        let key =
            posfleet_pki::private_key_from_pem(key_pem.as_bytes(), &files.1.display().to_string())
                .map_err(|e| e.to_string())?;
        let trusted =
            posfleet_pki::certificates_from_pem(trust.bundle_pem.as_bytes(), "the trust bundle")
                .map_err(|e| e.to_string())?;
        for name in names {
            posfleet_pki::verify_server_chain(&chain, &trusted, name).map_err(|e| {
                format!(
                    "tills would refuse {} for `{name}`: {e}; it must be valid for every name in \
                     tls_server_names and chain to the fleet CA or to tls_server_trust_path",
                    files.0.display()
                )
            })?;
        }
        let server = ServerCertificate {
            chain,
            key,
            origin: Origin::Files { stamp },
        };
        // Builds once, which also checks that the key is the certificate's.
        posfleet_pki::server_config(
            server.chain.clone(),
            server.key.clone_key(),
            &trust.authorities.client_cas(),
            Arc::new(DeviceGate::default()),
        )
        .map_err(|e| format!("{} and {}: {e}", files.0.display(), files.1.display()))?;
        Ok(server)
    };
    Ok(check())
}

/// The gRPC and the HTTP listeners' configurations.
fn acceptors(
    server: &ServerCertificate,
    authorities: &Authorities,
    gate: &Arc<DeviceGate>,
) -> Result<(tokio_rustls::TlsAcceptor, tokio_rustls::TlsAcceptor), posfleet_pki::Error> {
    let config = posfleet_pki::server_config(
        server.chain.clone(),
        server.key.clone_key(),
        &authorities.client_cas(),
        gate.clone(),
    )?;
    let acceptor = |alpn: &[u8]| {
        let mut config = config.clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    };
    Ok((acceptor(b"h2"), acceptor(b"http/1.1")))
}

fn write_bundle(path: &std::path::Path, pem: &str) -> Result<(), Error> {
    let write = || {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        posfleet_runtime::files::write_private(path, pem.as_bytes())
    };
    write().map_err(|source| {
        posfleet_pki::Error::Write {
            path: path.to_path_buf(),
            source,
        }
        .into()
    })
}

fn read_text(path: &std::path::Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| {
        posfleet_pki::Error::Read {
            path: path.to_path_buf(),
            source,
        }
        .into()
    })
}

/// How long device certificates live and may be renewed after they end.
#[derive(Debug, Clone, Copy)]
pub struct CertificatePolicy {
    pub validity: Duration,
    /// After its end, a certificate may still be renewed (the device
    /// proving its key) for this long; then the device must enroll again.
    pub grace: Duration,
}

/// Where a device's certificate ending at `not_after_ms` stands at `now_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateState {
    Valid,
    /// Less than a third of its lifetime left: the agent renews it now.
    RenewalDue,
    /// Ended, but renewable by proving the key until the given moment.
    ExpiredRenewable {
        until_ms: i64,
    },
    /// Ended longer than the grace period ago.
    MustReenroll,
}

impl CertificatePolicy {
    pub fn state(&self, not_after_ms: i64, now_ms: i64) -> CertificateState {
        let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        if now_ms < not_after_ms {
            if not_after_ms - now_ms < millis(self.validity) / 3 {
                CertificateState::RenewalDue
            } else {
                CertificateState::Valid
            }
        } else {
            let until_ms = not_after_ms.saturating_add(millis(self.grace));
            if now_ms < until_ms {
                CertificateState::ExpiredRenewable { until_ms }
            } else {
                CertificateState::MustReenroll
            }
        }
    }
}

impl std::fmt::Display for CertificateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertificateState::Valid => write!(f, "valid"),
            CertificateState::RenewalDue => write!(f, "renewal due"),
            CertificateState::ExpiredRenewable { until_ms } => {
                write!(
                    f,
                    "expired, renewable until {}",
                    crate::format_ms(*until_ms)
                )
            }
            CertificateState::MustReenroll => write!(f, "expired: enroll the device again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_renewed_in_its_last_third_and_renewable_for_the_grace_period() {
        let day = 86_400_000;
        let policy = CertificatePolicy {
            validity: Duration::from_secs(30 * 86_400),
            grace: Duration::from_secs(90 * 86_400),
        };
        let end = 100 * day;
        assert_eq!(policy.state(end, end - 20 * day), CertificateState::Valid);
        assert_eq!(
            policy.state(end, end - 9 * day),
            CertificateState::RenewalDue
        );
        assert_eq!(
            policy.state(end, end),
            CertificateState::ExpiredRenewable {
                until_ms: end + 90 * day
            }
        );
        assert_eq!(
            policy.state(end, end + 89 * day),
            CertificateState::ExpiredRenewable {
                until_ms: end + 90 * day
            }
        );
        assert_eq!(
            policy.state(end, end + 90 * day),
            CertificateState::MustReenroll
        );
        assert_eq!(
            policy.state(end, end + 90 * day).to_string(),
            "expired: enroll the device again"
        );
    }
}
