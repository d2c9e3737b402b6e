//! `AgentService`: enrollment, heartbeats and bundle progress reports.

use ed25519_dalek::{Signature, VerifyingKey};
use posfleet_proto::v1::{
    self, EnrollRequest, EnrollResponse, HeartbeatRequest, HeartbeatResponse,
    agent_service_server::AgentService,
};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tonic::{Code, Request, Response, Status};

use crate::config::Config;
use crate::desired::{DesiredCache, DesiredError};
use crate::heartbeat::{Beat, HeartbeatQueue, interval_for_load};
use crate::log_requests::LogRequests;
use crate::metrics::Metrics;
use crate::ratelimit::{HOUSEKEEPING_INTERVAL, Peer, PeerLimit};
use crate::signals::AnalysedStores;
use crate::storage::{
    BundleStatusRecord, DeviceAuth, DeviceSignals, EnrollError, HeartbeatRecord, NewDevice,
    RevokedRecord, Storage,
};
use crate::validate::{self, invalid, text};
use crate::{convert, now_ms, secret};

/// Limits on what one heartbeat may report.
const MAX_INSTALLED_BUNDLES: usize = 256;
const MAX_PERIPHERALS: usize = 32;
/// Most bundle statuses in one progress report.
const MAX_REPORTED_BUNDLES: usize = 64;
/// Most P2P listen addresses one till may report, and their longest.
const MAX_P2P_ADDRS: usize = 16;
const MAX_P2P_ADDR_LEN: usize = 256;
/// Most peer bans one heartbeat may add to `posfleet_p2p_peers_banned_total`:
/// a till has at most a store of peers to ban.
const MAX_REPORTED_BANS: u32 = 1024;

/// Devices whose credential hash (or absence) is kept in memory, so a
/// heartbeat normally does not read the database.
const AUTH_CACHE_CAPACITY: u64 = 2_000_000;
/// How long a cached credential hash is trusted before it is read again, so a
/// credential changed through another replica takes effect everywhere.
const AUTH_CACHE_TTL: Duration = Duration::from_secs(60);
/// A credential that does not match (or an unknown device id) is read
/// again only when what is cached is older than this: a re-issued
/// credential shows within it, and a caller guessing secrets costs no read.
const AUTH_RECHECK_AFTER: Duration = Duration::from_secs(10);
/// Enrollment tokens known to be refused (unknown, revoked, expired: none
/// of these changes back), kept so a till retrying a bad token costs no
/// read. A used-up token is not kept: it still lets the device it enrolled
/// retry an enrollment whose answer was lost.
const REFUSED_TOKEN_CAPACITY: u64 = 100_000;
const REFUSED_TOKEN_TTL: Duration = Duration::from_secs(60);

/// A device's credential as last read: `None` for an unknown device id.
struct CachedAuth {
    auth: Option<Arc<DeviceAuth>>,
    read_at: Instant,
}

/// Why an enrollment token is refused, as remembered for the next try.
#[derive(Debug, Clone, Copy)]
enum TokenRefusal {
    Unknown,
    Expired { expired_at_ms: i64 },
    Revoked { revoked_at_ms: i64 },
}

impl TokenRefusal {
    fn of(error: &EnrollError) -> Option<TokenRefusal> {
        Some(match error {
            EnrollError::UnknownToken => TokenRefusal::Unknown,
            EnrollError::Expired { expired_at_ms } => TokenRefusal::Expired {
                expired_at_ms: *expired_at_ms,
            },
            EnrollError::Revoked { revoked_at_ms } => TokenRefusal::Revoked {
                revoked_at_ms: *revoked_at_ms,
            },
            EnrollError::UsedUp | EnrollError::PublicKeyInUse { .. } | EnrollError::Storage(_) => {
                return None;
            }
        })
    }

    /// The `result` label and the answer.
    fn status(self) -> (&'static str, Status) {
        match self {
            TokenRefusal::Unknown => (
                "unknown_token",
                Status::unauthenticated("enrollment token is not valid"),
            ),
            TokenRefusal::Expired { expired_at_ms } => (
                "expired",
                Status::unauthenticated(format!(
                    "enrollment token expired at {}; ask ops for a new one",
                    crate::format_ms(expired_at_ms)
                )),
            ),
            TokenRefusal::Revoked { revoked_at_ms } => (
                "revoked",
                Status::permission_denied(format!(
                    "enrollment token was revoked at {}",
                    crate::format_ms(revoked_at_ms)
                )),
            ),
        }
    }
}

/// The per-peer budgets, shared with their housekeeping task.
struct Limits {
    /// Every `Enroll` call.
    enroll: PeerLimit,
    /// Refused calls: a bad token or credential, a malformed request.
    failures: PeerLimit,
}

/// What the agent API needs when the control plane serves TLS.
pub struct AgentTls {
    pub tls: Arc<crate::tls::Tls>,
    /// Lifetime of an issued device certificate, and how long after its
    /// end it may still be renewed.
    pub policy: crate::tls::CertificatePolicy,
}

/// How far a renewal proof's time may be from the control plane's clock.
const RENEW_PROOF_WINDOW_MS: i64 = 5 * 60 * 1000;

/// Devices' credentials as this replica last read them (see
/// [`crate::changes`]: other replicas' changes drop entries).
#[derive(Clone)]
pub(crate) struct CredentialCache(moka::future::Cache<String, Arc<CachedAuth>>);

impl CredentialCache {
    pub async fn forget(&self, device_id: &str) {
        self.0.invalidate(device_id).await;
    }

    pub fn forget_all(&self) {
        self.0.invalidate_all();
    }
}

pub struct AgentApi {
    /// `None` over plaintext: devices then present their credential.
    tls: Option<AgentTls>,
    storage: Storage,
    metrics: Metrics,
    queue: HeartbeatQueue,
    auth_cache: moka::future::Cache<String, Arc<CachedAuth>>,
    refused_tokens: moka::future::Cache<String, TokenRefusal>,
    limits: Arc<Limits>,
    /// Devices whose P2P addresses were stored within the change interval;
    /// `None` when changes are not limited.
    addr_changes: Option<moka::future::Cache<String, ()>>,
    desired: DesiredCache,
    logs: LogRequests,
    heartbeat_interval_seconds: u32,
    analysed: AnalysedStores,
}

impl AgentApi {
    /// The credential cache, for other replicas' changes to drop entries of.
    pub(crate) fn credential_cache(&self) -> CredentialCache {
        CredentialCache(self.auth_cache.clone())
    }

    /// Forgets a device's cached credential here and on every replica.
    async fn credential_changed(&self, device_id: &str) {
        self.auth_cache.invalidate(device_id).await;
        crate::changes::announce(
            &self.storage,
            crate::changes::Change::Credential {
                device_id: device_id.to_string(),
            },
        )
        .await;
    }

    /// Starts the rate limits' housekeeping too (it ends with the service).
    pub fn new(
        storage: Storage,
        metrics: Metrics,
        queue: HeartbeatQueue,
        desired: DesiredCache,
        logs: LogRequests,
        config: &Config,
        tls: Option<AgentTls>,
    ) -> AgentApi {
        let limits = Arc::new(Limits {
            enroll: PeerLimit::new(
                "Enroll calls",
                config.peer_enroll_calls_per_minute,
                config.peer_enroll_burst_calls,
                config.rate_limit_max_peers,
            ),
            failures: PeerLimit::new(
                "refused calls",
                config.peer_failed_calls_per_minute,
                config.peer_failed_burst_calls,
                config.rate_limit_max_peers,
            ),
        });
        let weak: Weak<Limits> = Arc::downgrade(&limits);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HOUSEKEEPING_INTERVAL).await;
                let Some(limits) = weak.upgrade() else { return };
                limits.enroll.housekeeping();
                limits.failures.housekeeping();
            }
        });
        let addr_changes = (config.p2p_address_change_interval_seconds > 0).then(|| {
            moka::future::Cache::builder()
                .max_capacity(AUTH_CACHE_CAPACITY)
                .time_to_live(Duration::from_secs(
                    config.p2p_address_change_interval_seconds,
                ))
                .build()
        });
        let analysed = AnalysedStores::spawn(storage.clone());
        AgentApi {
            tls,
            storage,
            metrics,
            queue,
            desired,
            logs,
            auth_cache: moka::future::Cache::builder()
                .max_capacity(AUTH_CACHE_CAPACITY)
                .time_to_live(AUTH_CACHE_TTL)
                .build(),
            refused_tokens: moka::future::Cache::builder()
                .max_capacity(REFUSED_TOKEN_CAPACITY)
                .time_to_live(REFUSED_TOKEN_TTL)
                .build(),
            limits,
            addr_changes,
            heartbeat_interval_seconds: config.heartbeat_interval_seconds,
            analysed,
        }
    }

    /// The minutes of a heartbeat to keep: those in range, from a till of a
    /// store under canary analysis.
    fn signal_minutes(
        &self,
        device_id: &str,
        store_id: &str,
        minutes: Vec<v1::SignalMinute>,
        now_ms: i64,
    ) -> Option<DeviceSignals> {
        if minutes.is_empty() {
            return None;
        }
        let counter = |result: &str| self.metrics.signal_reports.with_label_values(&[result]);
        if !self.analysed.contains(store_id) {
            counter("unobserved").inc_by(minutes.len() as u64);
            return None;
        }
        let (kept, outside) = crate::signals::in_range(minutes, now_ms);
        counter("out_of_range").inc_by(outside);
        counter("stored").inc_by(kept.len() as u64);
        Some(DeviceSignals {
            device_id: device_id.to_string(),
            store_id: store_id.to_string(),
            minutes: kept,
        })
    }

    fn current_interval(&self) -> u32 {
        interval_for_load(
            self.heartbeat_interval_seconds,
            self.queue.queued(),
            self.queue.capacity(),
        )
    }

    /// Finds the device named by the `authorization: Device …` credential:
    /// its id and store. A refused credential counts against the caller's
    /// budget of refused calls; past it, a check that would read the
    /// database is refused with `RESOURCE_EXHAUSTED` instead.
    async fn authenticate<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(String, Arc<DeviceAuth>), Status> {
        let peer = Peer::of(crate::tls::remote_address(request.extensions()).map(|a| a.ip()));
        let result = self.check_credential(request, peer).await;
        if let Err(status) = &result
            && status.code() == Code::Unauthenticated
        {
            // This call is answered as it is; the budget stops the next ones.
            let _ = self.limits.failures.charge(peer);
        }
        result
    }

    async fn check_credential<T>(
        &self,
        request: &Request<T>,
        peer: Peer,
    ) -> Result<(String, Arc<DeviceAuth>), Status> {
        if let Some(tls) = &self.tls {
            return self.check_certificate(request, peer, tls).await;
        }
        let credential = request
            .metadata()
            .get(posfleet_proto::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Device "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing device credential: send `authorization: Device <credential>` (enroll first)",
                )
            })?;
        let (device_id, device_secret) = secret::parse_device_credential(credential)
            .ok_or_else(|| Status::unauthenticated("malformed device credential"))?;
        let device_id = device_id.to_string();
        let presented = secret::hash(device_secret);
        // Both sides are SHA-256 digests of a 256-bit secret: comparing them
        // reveals nothing useful about the secret.
        let matches = |cached: &CachedAuth| {
            cached
                .auth
                .as_ref()
                .filter(|auth| auth.credential_sha256 == presented)
                .cloned()
        };
        let cached = match self.auth_cache.get(&device_id).await {
            Some(cached) => {
                if let Some(auth) = matches(&cached) {
                    return Ok((device_id, auth));
                }
                if cached.read_at.elapsed() < AUTH_RECHECK_AFTER {
                    return Err(refused_credential(&device_id, &cached));
                }
                // It may predate a credential re-issued elsewhere: read
                // again. The entry stays until the read replaces it, so a
                // refused caller never costs the device its cached entry.
                self.limits.failures.check(peer)?;
                let fresh = Arc::new(CachedAuth {
                    auth: self
                        .storage
                        .device_auth(&device_id)
                        .await
                        .map_err(|error| lookup_failed(&device_id, error))?
                        .map(Arc::new),
                    read_at: Instant::now(),
                });
                self.auth_cache
                    .insert(device_id.clone(), fresh.clone())
                    .await;
                fresh
            }
            None => {
                self.limits.failures.check(peer)?;
                self.read_auth(&device_id).await?
            }
        };
        match matches(&cached) {
            Some(auth) => Ok((device_id, auth)),
            None => Err(refused_credential(&device_id, &cached)),
        }
    }

    /// The device's credential, from memory or read once (concurrent
    /// misses share the read); an unknown id is remembered too.
    /// Over TLS the device is the one its verified certificate names (the
    /// handshake already refused other CAs', expired and revoked ones): it
    /// must still be enrolled, in the store the certificate names, and not
    /// revoked since the connection opened.
    async fn check_certificate<T>(
        &self,
        request: &Request<T>,
        peer: Peer,
        tls: &AgentTls,
    ) -> Result<(String, Arc<DeviceAuth>), Status> {
        let device = crate::tls::device_of(request.extensions()).ok_or_else(|| {
            Status::unauthenticated(
                "no device certificate: this control plane serves mutual TLS; \
                 call with the certificate issued at enrollment (enroll first)",
            )
        })?;
        let device_id = device.device_id.clone();
        match tls.tls.admit(device) {
            Ok(()) => {}
            Err(crate::tls::Refusal::Revoked) => {
                return Err(Status::permission_denied(format!(
                    "device {device_id} is revoked"
                )));
            }
            Err(crate::tls::Refusal::RetiredCa) => {
                return Err(Status::unavailable(
                    "this connection's certificate is from a retired CA; the connection is \
                     closed: reconnect with the renewed certificate",
                ));
            }
        }
        let cached = match self.auth_cache.get(&device_id).await {
            Some(cached) => cached,
            None => {
                self.limits.failures.check(peer)?;
                self.read_auth(&device_id).await?
            }
        };
        match &cached.auth {
            Some(auth) if auth.store_id == device.store_id => Ok((device_id, auth.clone())),
            Some(_) => Err(Status::unauthenticated(format!(
                "the certificate of device {device_id} names store {}, not the device's: enroll again",
                device.store_id
            ))),
            None => Err(Status::unauthenticated(format!(
                "unknown device {device_id}: enroll again"
            ))),
        }
    }

    async fn read_auth(&self, device_id: &str) -> Result<Arc<CachedAuth>, Status> {
        let storage = self.storage.clone();
        let lookup_id = device_id.to_string();
        self.auth_cache
            .try_get_with(device_id.to_string(), async move {
                let auth = storage.device_auth(&lookup_id).await?;
                Ok::<_, crate::error::Error>(Arc::new(CachedAuth {
                    auth: auth.map(Arc::new),
                    read_at: Instant::now(),
                }))
            })
            .await
            .map_err(|error| lookup_failed(device_id, error))
    }

    /// Whether a till's new P2P addresses may be stored now: at most once
    /// per `p2p_address_change_interval_seconds`.
    async fn may_store_addrs(&self, device_id: &str) -> bool {
        match &self.addr_changes {
            None => true,
            Some(recent) => recent
                .entry(device_id.to_string())
                .or_insert(())
                .await
                .is_fresh(),
        }
    }
}

fn lookup_failed(device_id: &str, error: impl std::fmt::Display) -> Status {
    tracing::error!(%error, device_id = %device_id, "Device lookup failed.");
    Status::unavailable("device lookup failed; retry later")
}

impl AgentApi {
    /// Issues a device certificate and records it: (certificate PEM, trust
    /// bundle PEM).
    async fn issue(
        &self,
        tls: &AgentTls,
        request: &[u8],
        key: &[u8; 32],
        device_id: &str,
        store_id: &str,
    ) -> Result<(String, String), Status> {
        let ca = tls.tls.authorities().active.clone();
        let issued = ca
            .issue_device(
                request,
                key,
                device_id,
                store_id,
                tls.policy.validity,
                std::time::SystemTime::now(),
            )
            .map_err(|error| {
                tracing::error!(%error, %device_id, "Cannot issue a device certificate.");
                Status::internal("cannot issue the device certificate; try again")
            })?;
        self.storage
            .set_device_certificate(
                device_id,
                &crate::storage::CertificateRecord {
                    serial: issued.serial.clone(),
                    not_after_ms: issued.not_after.saturating_mul(1000),
                    ca_fingerprint: ca.fingerprint(),
                },
            )
            .await?;
        // Its cached record names the CA of its previous certificate.
        self.credential_changed(device_id).await;
        tracing::info!(%device_id, serial = %issued.serial, "Device certificate issued.");
        Ok((issued.pem, tls.tls.trust_bundle().0.to_string()))
    }

    /// Which device a renewal is for, and the key it must be for: the one
    /// its certificate names (over mutual TLS), else the one whose key
    /// signed the proof, if its certificate ended within the grace period.
    async fn renewing_device(
        &self,
        request: &Request<v1::RenewCertificateRequest>,
        tls: &AgentTls,
    ) -> Result<(String, crate::storage::RenewalRecord), Status> {
        let peer = Peer::of(crate::tls::remote_address(request.extensions()).map(|a| a.ip()));
        let req = request.get_ref();
        let certified = crate::tls::device_of(request.extensions()).map(|d| d.device_id.clone());
        let device_id = match &certified {
            Some(id) => id.clone(),
            None => {
                text("device_id", &req.device_id, true, 64)?;
                req.device_id.clone()
            }
        };
        self.limits.failures.check(peer)?;
        let refuse = |status: Status| {
            let _ = self.limits.failures.charge(peer);
            Err(status)
        };
        let Some(record) = self.storage.device_renewal(&device_id).await? else {
            return refuse(Status::unauthenticated(format!(
                "unknown device {device_id}: enroll again"
            )));
        };
        if record.revoked || tls.tls.gate.is_revoked_id(&device_id) {
            return refuse(Status::permission_denied(format!(
                "device {device_id} is revoked"
            )));
        }
        if certified.is_some() {
            return Ok((device_id, record));
        }
        // No certificate: the device proves its key, and its certificate
        // must have ended within the grace period (or it never had one).
        let now = now_ms();
        match record
            .certificate
            .as_ref()
            .map(|c| tls.policy.state(c.not_after_ms, now))
        {
            Some(crate::tls::CertificateState::ExpiredRenewable { .. }) => {}
            Some(crate::tls::CertificateState::MustReenroll) => {
                return refuse(Status::failed_precondition(format!(
                    "the certificate of device {device_id} ended more than {} days ago: enroll the device again",
                    tls.policy.grace.as_secs() / 86_400
                )));
            }
            Some(_) => {
                return refuse(Status::unauthenticated(
                    "the device's certificate is still valid: call with it",
                ));
            }
            // Enrolled over plaintext, before this control plane served
            // TLS: its first certificate, for the key it enrolled with.
            None => {}
        }
        if (now - req.signed_at_unix_ms).abs() > RENEW_PROOF_WINDOW_MS {
            return refuse(Status::unauthenticated(
                "the renewal proof's time is more than 5 minutes from the control plane's clock",
            ));
        }
        let key = hex::decode(&record.public_key_hex)
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .and_then(|bytes| VerifyingKey::from_bytes(&bytes).ok())
            .ok_or_else(|| Status::internal("the device's stored key is corrupt"))?;
        let payload = posfleet_proto::renew_signing_payload(
            &device_id,
            req.signed_at_unix_ms,
            &req.certificate_request,
        );
        let proven = Signature::from_slice(&req.signature)
            .ok()
            .is_some_and(|signature| key.verify_strict(&payload, &signature).is_ok());
        if !proven {
            return refuse(Status::unauthenticated(format!(
                "the renewal proof is not signed by the key of device {device_id}"
            )));
        }
        Ok((device_id, record))
    }

    /// Over TLS an enrollment must carry a certificate request for the key
    /// that signed it; checked before the token is spent.
    fn check_certificate_request(&self, req: &EnrollRequest, key: &VerifyingKey) -> Option<Status> {
        self.tls.as_ref()?;
        if req.certificate_request.is_empty() {
            return Some(invalid(
                "certificate_request",
                "is required: this control plane serves TLS and issues the device a certificate",
            ));
        }
        if req.certificate_request.len() > MAX_CERTIFICATE_REQUEST_BYTES {
            return Some(invalid("certificate_request", "is too large"));
        }
        posfleet_pki::ca::check_request(&req.certificate_request, key.as_bytes())
            .err()
            .map(|error| invalid("certificate_request", error))
    }
}

/// A certificate request for an Ed25519 key is a few hundred bytes.
const MAX_CERTIFICATE_REQUEST_BYTES: usize = 4096;

fn refused_credential(device_id: &str, cached: &CachedAuth) -> Status {
    match cached.auth {
        None => Status::unauthenticated(format!("unknown device {device_id}")),
        Some(_) => Status::unauthenticated(format!(
            "device credential is not valid for device {device_id}"
        )),
    }
}

fn validate_enroll(req: &EnrollRequest) -> Result<VerifyingKey, Status> {
    if req.enrollment_token.is_empty() {
        return Err(invalid("enrollment_token", "is required"));
    }
    text("enrollment_token", &req.enrollment_token, true, 256)?;
    text("hardware_model", &req.hardware_model, true, 64)?;
    text("serial_number", &req.serial_number, true, 128)?;
    text("agent_version", &req.agent_version, false, 64)?;
    let key_bytes: [u8; 32] = req
        .public_key
        .as_slice()
        .try_into()
        .map_err(|_| invalid("public_key", "must be a 32-byte Ed25519 public key"))?;
    let key = VerifyingKey::from_bytes(&key_bytes)
        .map_err(|_| invalid("public_key", "is not a valid Ed25519 public key"))?;
    let signature = Signature::from_slice(&req.signature)
        .map_err(|_| invalid("signature", "must be a 64-byte Ed25519 signature"))?;
    let payload = posfleet_proto::enroll_signing_payload(
        &req.enrollment_token,
        &req.public_key,
        &req.hardware_model,
        &req.serial_number,
    );
    key.verify_strict(&payload, &signature).map_err(|_| {
        Status::unauthenticated("signature does not prove possession of the presented public key")
    })?;
    Ok(key)
}

fn validate_heartbeat(req: &HeartbeatRequest) -> Result<(), Status> {
    text("agent_version", &req.agent_version, false, 64)?;
    crate::signals::validate(&req.signal_minutes)?;
    if req.installed_bundles.len() > MAX_INSTALLED_BUNDLES {
        return Err(invalid(
            "installed_bundles",
            format!("more than {MAX_INSTALLED_BUNDLES} entries"),
        ));
    }
    for (name, version) in &req.installed_bundles {
        text("installed_bundles", name, true, 128)?;
        text("installed_bundles", version, true, 64)?;
    }
    if !req.trust_bundle_sha256.is_empty() && req.trust_bundle_sha256.len() != 32 {
        return Err(invalid(
            "trust_bundle_sha256",
            "must be empty or a SHA-256 digest (32 bytes)",
        ));
    }
    if req.p2p_listen_addrs.len() > MAX_P2P_ADDRS {
        return Err(invalid(
            "p2p_listen_addrs",
            format!("more than {MAX_P2P_ADDRS} entries"),
        ));
    }
    for addr in &req.p2p_listen_addrs {
        text("p2p_listen_addrs", addr, true, MAX_P2P_ADDR_LEN)?;
        if !addr.starts_with('/') || addr.chars().any(char::is_whitespace) {
            return Err(invalid(
                "p2p_listen_addrs",
                format!("`{addr}` is not a multiaddr (like /ip4/10.0.0.5/tcp/4001)"),
            ));
        }
    }
    if req.store_peers_digest.len() > 64 {
        return Err(invalid("store_peers_digest", "longer than 64 bytes"));
    }
    if let Some(health) = &req.health {
        if health.peripherals.len() > MAX_PERIPHERALS {
            return Err(invalid(
                "health.peripherals",
                format!("more than {MAX_PERIPHERALS} entries"),
            ));
        }
        for p in &health.peripherals {
            text("health.peripherals.name", &p.name, false, 64)?;
            text("health.peripherals.detail", &p.detail, false, 256)?;
        }
    }
    Ok(())
}

/// Checks a progress report and turns it into the rows to store: at most one
/// per bundle name (the newest), with errors cut to 1 KiB. A status dated
/// after `now_ms` (a fast agent clock) is recorded as received at `now_ms`,
/// so it cannot hide the device's later reports.
fn validate_report(
    req: v1::ReportProgressRequest,
    now_ms: i64,
) -> Result<Vec<BundleStatusRecord>, Status> {
    if req.bundles.len() > MAX_REPORTED_BUNDLES {
        return Err(invalid(
            "bundles",
            format!(
                "{} statuses in one report; at most {MAX_REPORTED_BUNDLES}",
                req.bundles.len()
            ),
        ));
    }
    let mut by_name: std::collections::BTreeMap<String, BundleStatusRecord> =
        std::collections::BTreeMap::new();
    for (i, status) in req.bundles.into_iter().enumerate() {
        let field = |name: &str| format!("bundles[{i}].{name}");
        validate::bundle_name(&field("name"), &status.name)?;
        validate::version(&field("active_version"), &status.active_version, false)?;
        validate::version(&field("target_version"), &status.target_version, false)?;
        let kind = v1::BundleKind::try_from(status.kind)
            .map_err(|_| invalid(&field("kind"), format!("unknown kind {}", status.kind)))?;
        let phase = match v1::BundlePhase::try_from(status.phase) {
            Ok(v1::BundlePhase::Unspecified) => {
                return Err(invalid(
                    &field("phase"),
                    "is required (BUNDLE_PHASE_UNSPECIFIED is not a phase)",
                ));
            }
            Ok(phase) => phase,
            Err(_) => {
                return Err(invalid(
                    &field("phase"),
                    format!("unknown phase {}", status.phase),
                ));
            }
        };
        for (name, value) in [
            ("bytes_done", status.bytes_done),
            ("bytes_total", status.bytes_total),
            ("bytes_from_origin", status.bytes_from_origin),
            ("bytes_from_peers", status.bytes_from_peers),
            ("bytes_saved_by_delta", status.bytes_saved_by_delta),
        ] {
            if value > validate::MAX_REPORTED_BYTES {
                return Err(invalid(
                    &field(name),
                    format!(
                        "{value} is more than any till moves for one bundle (at most {})",
                        validate::MAX_REPORTED_BYTES
                    ),
                ));
            }
        }
        if status.updated_at_unix_ms <= 0 {
            return Err(invalid(
                &field("updated_at_unix_ms"),
                "is required (when the agent changed this status, UTC ms)",
            ));
        }
        let record = BundleStatusRecord {
            kind: convert::kind_name(kind).to_string(),
            active_version: status.active_version,
            target_version: status.target_version,
            phase: convert::phase_name(phase).to_string(),
            bytes_done: convert::signed(status.bytes_done),
            bytes_total: convert::signed(status.bytes_total),
            error: validate::reported_error(&status.error),
            updated_at_ms: status.updated_at_unix_ms.min(now_ms),
            bytes_from_origin: convert::signed(status.bytes_from_origin),
            bytes_from_peers: convert::signed(status.bytes_from_peers),
            bytes_saved_by_delta: convert::signed(status.bytes_saved_by_delta),
            delta_error: validate::reported_error(&status.delta_error),
            name: status.name,
        };
        match by_name.get(&record.name) {
            Some(kept) if kept.updated_at_ms > record.updated_at_ms => {}
            _ => {
                by_name.insert(record.name.clone(), record);
            }
        }
    }
    Ok(by_name.into_values().collect())
}

/// What a progress report adds to the fleet's byte counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Added {
    origin: u64,
    peers: u64,
    saved_by_delta: u64,
    /// Bundles whose delta failed, newly reported.
    delta_fallbacks: u64,
}

/// What `reported` adds to what was stored (`before`): for the byte
/// counts, the whole count for a new target version, the growth for the
/// same one, nothing for a report older than the stored one; a delta
/// failure once per target version and reason. The sums saturate: whatever
/// is stored, they cannot overflow.
fn added(before: &[BundleStatusRecord], reported: &[BundleStatusRecord]) -> Added {
    let mut sum = Added::default();
    for new in reported {
        let old = before.iter().find(|b| b.name == new.name);
        let counts = |r: &BundleStatusRecord| {
            [
                r.bytes_from_origin,
                r.bytes_from_peers,
                r.bytes_saved_by_delta,
            ]
        };
        let (growth, fallback) = match old {
            Some(old) if old.updated_at_ms > new.updated_at_ms => ([0; 3], false),
            Some(old) if old.target_version == new.target_version => {
                let (was, is) = (counts(old), counts(new));
                (
                    [0, 1, 2].map(|i| is[i].saturating_sub(was[i])),
                    !new.delta_error.is_empty() && new.delta_error != old.delta_error,
                )
            }
            _ => (counts(new), !new.delta_error.is_empty()),
        };
        let [origin, peers, saved] = growth.map(|n| n.max(0).unsigned_abs());
        sum.origin = sum.origin.saturating_add(origin);
        sum.peers = sum.peers.saturating_add(peers);
        sum.saved_by_delta = sum.saved_by_delta.saturating_add(saved);
        sum.delta_fallbacks += u64::from(fallback);
    }
    sum
}

fn revoked_status(device_id: &str, revoked: &RevokedRecord) -> Status {
    let reason = if revoked.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", revoked.reason)
    };
    Status::permission_denied(format!(
        "device {device_id} was revoked at {}{reason}",
        crate::format_ms(revoked.at_ms)
    ))
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let peer = Peer::of(crate::tls::remote_address(request.extensions()).map(|a| a.ip()));
        let count = |result: &str| self.metrics.enrollments.with_label_values(&[result]).inc();
        // Past its budget of refused calls, a peer is refused before any
        // work, the signature check included.
        if let Err(status) = self
            .limits
            .enroll
            .charge(peer)
            .and_then(|()| self.limits.failures.check(peer))
        {
            count("rate_limited");
            return Err(status);
        }
        let req = request.into_inner();
        let key = match validate_enroll(&req) {
            Ok(key) => key,
            Err(status) => {
                let _ = self.limits.failures.charge(peer);
                count("invalid");
                return Err(status);
            }
        };
        if let Some(status) = self.check_certificate_request(&req, &key) {
            let _ = self.limits.failures.charge(peer);
            count("invalid");
            return Err(status);
        }
        let token_sha256 = secret::hash(&req.enrollment_token);
        if let Some(refusal) = self.refused_tokens.get(&token_sha256).await {
            let _ = self.limits.failures.charge(peer);
            let (result, status) = refusal.status();
            count(result);
            return Err(status);
        }
        let device_secret = secret::generate("");
        let interval = self.current_interval();
        let new_device = NewDevice {
            id: secret::short_id("dev-", 10),
            public_key_hex: hex::encode(key.as_bytes()),
            credential_sha256: secret::hash(&device_secret),
            hardware_model: req.hardware_model,
            serial_number: req.serial_number,
            agent_version: req.agent_version,
            heartbeat_interval_seconds: interval.into(),
        };
        let now = now_ms();
        match self
            .storage
            .enroll_device(&token_sha256, &new_device, now)
            .await
        {
            Ok(device) => {
                // A retried enrollment replaced the credential of an existing
                // device; a new one may have been looked up (and not found).
                self.credential_changed(&device.id).await;
                count("ok");
                tracing::info!(
                    device_id = %device.id,
                    store_id = %device.store_id,
                    hardware_model = %device.hardware_model,
                    "Device enrolled."
                );
                let mut response = EnrollResponse {
                    device_credential: secret::device_credential(&device.id, &device_secret),
                    device_id: device.id,
                    store_id: device.store_id,
                    heartbeat_interval_seconds: interval,
                    ..Default::default()
                };
                if let Some(tls) = &self.tls {
                    // The certificate is the identity: no bearer secret.
                    response.device_credential.clear();
                    let (certificate, trust) = self
                        .issue(
                            tls,
                            &req.certificate_request,
                            key.as_bytes(),
                            &response.device_id,
                            &response.store_id,
                        )
                        .await?;
                    response.device_certificate_pem = certificate;
                    response.trust_bundle_pem = trust;
                }
                Ok(Response::new(response))
            }
            Err(error) => {
                let (result, status) = match (TokenRefusal::of(&error), &error) {
                    (Some(refusal), _) => {
                        self.refused_tokens.insert(token_sha256, refusal).await;
                        refusal.status()
                    }
                    (None, EnrollError::UsedUp) => (
                        "used_up",
                        Status::permission_denied("enrollment token has no uses left"),
                    ),
                    (None, EnrollError::PublicKeyInUse { device_id }) => (
                        "key_in_use",
                        Status::already_exists(format!(
                            "this device key is already enrolled as {device_id}"
                        )),
                    ),
                    (None, error) => {
                        tracing::error!(%error, "Enrollment failed.");
                        (
                            "error",
                            Status::internal("internal error; see the control plane log"),
                        )
                    }
                };
                if result != "error" {
                    let _ = self.limits.failures.charge(peer);
                }
                count(result);
                Err(status)
            }
        }
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let (device_id, auth) = match self.authenticate(&request).await {
            Ok(found) => found,
            Err(status) => {
                let result = if status.code() == Code::ResourceExhausted {
                    "rate_limited"
                } else {
                    "unauthenticated"
                };
                self.metrics.heartbeats.with_label_values(&[result]).inc();
                return Err(status);
            }
        };
        // Loopback P2P addresses are kept only from a till on this very
        // machine (development and tests): see `validate::store_lan_addr`.
        let calls_from_loopback = crate::tls::remote_address(request.extensions())
            .is_some_and(|a| a.ip().to_canonical().is_loopback());
        let req = request.into_inner();
        if let Err(status) = validate_heartbeat(&req) {
            self.metrics
                .heartbeats
                .with_label_values(&["invalid"])
                .inc();
            return Err(status);
        }
        // The answer must be whole: an agent told "no window" would install
        // at any time, so a failed read fails the heartbeat (it is retried).
        let mut desired = match self.desired.get(&auth.store_id).await {
            Ok(desired) => desired,
            Err(error) => {
                self.metrics
                    .heartbeats
                    .with_label_values(&["unavailable"])
                    .inc();
                return Err(match error.as_ref() {
                    DesiredError::UnknownStore(_) => crate::error::Error::Corrupt(format!(
                        "device {device_id} belongs to an unknown store: {error}"
                    ))
                    .into(),
                    DesiredError::Storage(e) => {
                        tracing::error!(error = %e, device_id = %device_id, "Cannot read the desired state.");
                        Status::unavailable("cannot read the desired state; retry later")
                    }
                });
            }
        };
        if let Some(revoked) = desired.revoked.get(&device_id) {
            self.metrics
                .heartbeats
                .with_label_values(&["revoked"])
                .inc();
            return Err(revoked_status(&device_id, revoked));
        }
        // A till that listens somewhere new: its store's tills learn it
        // with their next heartbeats. Only addresses a store LAN can have
        // are kept, and a till's list changes at most once per interval (each
        // change is a write and a new list for the whole store).
        let addrs: Vec<String> = req
            .p2p_listen_addrs
            .iter()
            .filter(|a| validate::store_lan_addr(a, calls_from_loopback))
            .cloned()
            .collect();
        let known = desired
            .peers
            .iter()
            .find(|p| p.device_id == device_id)
            .map(|p| p.addrs.as_slice());
        if known.is_some_and(|known| known != addrs.as_slice())
            && self.may_store_addrs(&device_id).await
        {
            if let Err(error) = self.storage.set_p2p_addrs(&device_id, &addrs).await {
                tracing::error!(%error, device_id = %device_id, "Cannot store P2P addresses.");
                // Nothing changed: the next heartbeat may try again.
                if let Some(recent) = &self.addr_changes {
                    recent.invalidate(&device_id).await;
                }
                return Err(Status::unavailable(
                    "cannot store the P2P addresses; retry later",
                ));
            }
            self.desired.invalidate(&auth.store_id).await;
            // Answer with the list that has them.
            if let Ok(fresh) = self.desired.get(&auth.store_id).await {
                desired = fresh;
            }
        }
        // Only tills that take part in P2P (they say where they listen) get
        // the list, and only when theirs is out of date: a store's list is
        // a few KiB per heartbeat otherwise.
        let store_peers = (!req.p2p_listen_addrs.is_empty()
            && req.store_peers_digest != desired.peers_digest)
            .then(|| convert::store_peers(&desired.peers, &desired.peers_digest));
        let interval = self.current_interval();
        let now = now_ms();
        let bundles = desired.for_device(&device_id);
        let log_requests = self.logs.for_heartbeat(&device_id).await;
        let signals = self.signal_minutes(&device_id, &auth.store_id, req.signal_minutes, now);
        self.metrics.signals_dropped.inc_by(req.signals_dropped);
        let record = HeartbeatRecord {
            device_id,
            seen_at_ms: now,
            heartbeat_interval_seconds: interval.into(),
            agent_version: req.agent_version,
            installed_bundles: req.installed_bundles.into_iter().collect(),
            agent_uptime_seconds: convert::signed(req.agent_uptime_seconds),
            health: convert::health_from_proto(req.health.unwrap_or_default()),
        };
        if self.queue.push(Beat { record, signals }).await.is_err() {
            return Err(Status::unavailable("the control plane is shutting down"));
        }
        self.metrics.heartbeats.with_label_values(&["ok"]).inc();
        self.metrics
            .p2p_bans
            .inc_by(req.p2p_peers_banned.min(MAX_REPORTED_BANS).into());
        // A till holding another trust bundle (a CA was rotated or retired)
        // gets the current one; one whose certificate is not from the
        // active CA renews it.
        let (trust_bundle_pem, renew_certificate) = match &self.tls {
            Some(tls) => {
                let (bundle, digest) = tls.tls.trust_bundle();
                let stale = !req.trust_bundle_sha256.is_empty()
                    && req.trust_bundle_sha256 != digest.as_slice();
                (
                    if stale {
                        bundle.to_string()
                    } else {
                        String::new()
                    },
                    tls.tls.should_renew(&auth.certificate_ca),
                )
            }
            None => (String::new(), false),
        };
        Ok(Response::new(HeartbeatResponse {
            next_heartbeat_interval_seconds: interval,
            server_time_unix_ms: now,
            maintenance_window: convert::window(&desired.time_zone, desired.maintenance_window),
            desired_bundles: bundles.into_iter().map(convert::desired_bundle).collect(),
            store_peers,
            trust_bundle_pem,
            renew_certificate,
            log_requests,
        }))
    }

    async fn renew_certificate(
        &self,
        request: Request<v1::RenewCertificateRequest>,
    ) -> Result<Response<v1::RenewCertificateResponse>, Status> {
        let Some(tls) = &self.tls else {
            return Err(Status::failed_precondition(
                "this control plane serves plaintext: there is no certificate to renew",
            ));
        };
        if request.get_ref().certificate_request.len() > MAX_CERTIFICATE_REQUEST_BYTES {
            return Err(invalid("certificate_request", "is too large"));
        }
        let (device_id, record) = self.renewing_device(&request, tls).await?;
        let key: [u8; 32] = hex::decode(&record.public_key_hex)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| Status::internal("the device's stored key is corrupt"))?;
        let req = request.into_inner();
        posfleet_pki::ca::check_request(&req.certificate_request, &key)
            .map_err(|error| invalid("certificate_request", error))?;
        let (certificate, trust) = self
            .issue(
                tls,
                &req.certificate_request,
                &key,
                &device_id,
                &record.store_id,
            )
            .await?;
        Ok(Response::new(v1::RenewCertificateResponse {
            device_certificate_pem: certificate,
            trust_bundle_pem: trust,
        }))
    }

    async fn report_progress(
        &self,
        request: Request<v1::ReportProgressRequest>,
    ) -> Result<Response<v1::ReportProgressResponse>, Status> {
        let (device_id, auth) = self.authenticate(&request).await?;
        if let Ok(desired) = self.desired.get(&auth.store_id).await
            && let Some(revoked) = desired.revoked.get(&device_id)
        {
            return Err(revoked_status(&device_id, revoked));
        }
        let statuses = validate_report(request.into_inner(), now_ms())?;
        // Counted by what each report adds to the last one stored.
        let before = self
            .storage
            .bundle_statuses(&device_id)
            .await
            .unwrap_or_default();
        if let Err(error) = self
            .storage
            .record_bundle_statuses(&device_id, &statuses)
            .await
        {
            tracing::error!(%error, device_id = %device_id, "Cannot store a progress report.");
            return Err(Status::unavailable(
                "cannot store the progress report; retry later",
            ));
        }
        let added = added(&before, &statuses);
        self.metrics.delta_bytes_saved.inc_by(added.saved_by_delta);
        self.metrics.delta_fallbacks.inc_by(added.delta_fallbacks);
        for (source, bytes) in [("origin", added.origin), ("peer", added.peers)] {
            self.metrics
                .bundle_bytes
                .with_label_values(&[source])
                .inc_by(bytes);
            self.metrics
                .fleet
                .add_store_bytes(&auth.store_id, source, bytes);
        }
        for record in &statuses {
            // One of BUNDLE_PHASES: validate_report refused any other phase.
            self.metrics
                .bundle_reports
                .with_label_values(&[record.phase.as_str()])
                .inc();
            tracing::debug!(
                device_id = %device_id,
                bundle = %record.name,
                phase = %record.phase,
                target_version = %record.target_version,
                "Bundle status reported."
            );
        }
        Ok(Response::new(v1::ReportProgressResponse {}))
    }

    async fn upload_logs(
        &self,
        mut request: Request<tonic::Streaming<v1::LogUpload>>,
    ) -> Result<Response<v1::UploadLogsResponse>, Status> {
        let (device_id, auth) = self.authenticate(&request).await?;
        // A revoked till uploads nothing, whatever it was asked before.
        let desired = self.desired.get(&auth.store_id).await.map_err(|error| {
            tracing::error!(%error, device_id = %device_id, "Cannot read the desired state.");
            Status::unavailable("cannot read the desired state; retry later")
        })?;
        if let Some(revoked) = desired.revoked.get(&device_id) {
            self.logs.refused();
            return Err(revoked_status(&device_id, revoked));
        }
        let answer = self
            .logs
            .receive_upload(&device_id, request.get_mut())
            .await?;
        Ok(Response::new(answer))
    }
}

// Keep the generated type referenced so the health reporter can name it.
pub type Server = v1::agent_service_server::AgentServiceServer<AgentApi>;

#[cfg(test)]
mod tests {
    use super::*;

    fn status(target: &str, at: i64, origin: i64, peers: i64) -> BundleStatusRecord {
        BundleStatusRecord {
            name: "pos-app".into(),
            kind: "software".into(),
            active_version: "1.0.0".into(),
            target_version: target.into(),
            phase: "downloading".into(),
            bytes_done: 0,
            bytes_total: 0,
            error: String::new(),
            updated_at_ms: at,
            bytes_from_origin: origin,
            bytes_from_peers: peers,
            bytes_saved_by_delta: 0,
            delta_error: String::new(),
        }
    }

    #[test]
    fn reported_bytes_count_once() {
        for (before, reported, expected) in [
            // First report of a version: all of it.
            (vec![], status("1.1.0", 10, 5, 7), (5, 7)),
            // The same version again: what it adds.
            (
                vec![status("1.1.0", 10, 5, 7)],
                status("1.1.0", 11, 8, 7),
                (3, 0),
            ),
            // A new version: all of it.
            (
                vec![status("1.1.0", 10, 5, 7)],
                status("1.2.0", 11, 2, 1),
                (2, 1),
            ),
            // A report older than the stored one: nothing.
            (
                vec![status("1.1.0", 10, 5, 7)],
                status("1.1.0", 9, 9, 9),
                (0, 0),
            ),
            // Counts never go backwards.
            (
                vec![status("1.1.0", 10, 5, 7)],
                status("1.1.0", 12, 4, 7),
                (0, 0),
            ),
        ] {
            let added = added(&before, std::slice::from_ref(&reported));
            assert_eq!(
                (added.origin, added.peers),
                expected,
                "{before:?} then {reported:?}"
            );
        }
    }

    #[test]
    fn delta_savings_count_once_and_each_failed_delta_once() {
        let with = |at: i64, saved: i64, delta_error: &str| BundleStatusRecord {
            bytes_saved_by_delta: saved,
            delta_error: delta_error.into(),
            ..status("1.1.0", at, 0, 0)
        };
        let failed = "the bundle rebuilt from the delta does not match its signed hash";
        for (before, reported, expected) in [
            (vec![], with(10, 900, ""), (900, 0)),
            // Reported again, with the same saving: nothing more.
            (vec![with(10, 900, "")], with(11, 900, ""), (0, 0)),
            // A delta failed: one fallback, however often it is reported.
            (vec![], with(10, 0, failed), (0, 1)),
            (vec![with(10, 0, "")], with(11, 0, failed), (0, 1)),
            (vec![with(10, 0, failed)], with(11, 0, failed), (0, 0)),
            // The same failure for a new version is a new fallback.
            (
                vec![with(10, 0, failed)],
                BundleStatusRecord {
                    target_version: "1.2.0".into(),
                    ..with(11, 0, failed)
                },
                (0, 1),
            ),
            // An old report adds nothing.
            (vec![with(10, 0, "")], with(9, 900, failed), (0, 0)),
        ] {
            let added = added(&before, std::slice::from_ref(&reported));
            assert_eq!(
                (added.saved_by_delta, added.delta_fallbacks),
                expected,
                "{before:?} then {reported:?}"
            );
        }
    }
}
