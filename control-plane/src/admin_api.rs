//! `AdminService`: stores, enrollment tokens, devices, their desired bundles
//! and the bundle repository, for ops.

use posfleet_proto::v1::{self, admin_service_server::AdminService};
use std::collections::{BTreeMap, BTreeSet};
use tonic::{Request, Response, Status};

use crate::audit::{self, AuditTarget};
use crate::authz::{Principal, Role, Scope};
use crate::desired::DesiredCache;
use crate::repository::{Repository, Upload};
use crate::storage::{
    AdminTokenInfo, AdminTokenRevocation, AssignTarget, BundleRecord, DesiredBundleRecord,
    DeviceFilter, DeviceRecord, EnrollmentTokenRecord, NewAdminToken, NewUser, StatusFilter,
    Storage, StoreRecord, UserChange, UserRecord, WebhookRecord, WindowRecord,
};
use crate::timeout::STREAM_IDLE_TIMEOUT;
use crate::validate::{self, invalid, label_key, slug, text, time_zone, user_name};
use crate::webhooks;
use crate::{convert, now_ms, secret};
use posfleet_proto::v1::assign_bundle_request::Target;
use posfleet_proto::v1::publish_bundle_request::Part;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

mod held;

const DEFAULT_PAGE_SIZE: u32 = 500;
const MAX_PAGE_SIZE: u32 = 1000;
const DEFAULT_TOKEN_LIFETIME_SECONDS: u64 = 24 * 3600;
const MAX_TOKEN_LIFETIME_SECONDS: u64 = 365 * 24 * 3600;
const MAX_TOKEN_USES: u32 = 1_000_000;
const MAX_LABELS_PER_CALL: usize = 64;
const DEFAULT_EVENTS_PER_PAGE: u32 = 100;
/// Longest admin token name (lowercase letters, digits and '-').
pub const MAX_ADMIN_TOKEN_NAME_BYTES: usize = 64;
/// Longest life of an admin token.
pub const MAX_ADMIN_TOKEN_LIFETIME_SECONDS: u64 = 365 * 24 * 3600;
/// Most labels in a token's scope.
pub const MAX_SCOPE_LABELS: usize = 8;
/// How long a new (or reset) user's setup code works.
pub const USER_SETUP_CODE_LIFETIME_MS: i64 = 72 * 3600 * 1000;
/// Groups of four characters in a setup code (160 random bits).
const SETUP_CODE_GROUPS: usize = 8;

pub struct AdminApi {
    storage: Storage,
    offline_after_missed_heartbeats: i64,
    repository: Arc<Repository>,
    desired: DesiredCache,
    rollouts: crate::rollout::Rollouts,
    /// Cuts a revoked device's open connections.
    gate: Arc<crate::tls::DeviceGate>,
    logs: crate::log_requests::LogRequests,
    /// Set when the control plane serves TLS.
    tls: Option<AdminTls>,
    /// How long an emergency assignment waits for approval.
    held_assignment_expiry_ms: i64,
}

/// What the admin API shows of the control plane's TLS.
pub struct AdminTls {
    /// How long device certificates live and may be renewed after.
    pub certificates: crate::tls::CertificatePolicy,
    pub tls: Arc<crate::tls::Tls>,
}

impl AdminTls {
    /// Certificates that ended before this are past renewal: their tills
    /// must enroll again whatever CA issued them.
    fn renewable_after_ms(&self) -> i64 {
        now_ms() - i64::try_from(self.certificates.grace.as_millis()).unwrap_or(i64::MAX)
    }

    /// The CAs, with how many tills hold a certificate from each.
    async fn authorities(
        &self,
        storage: &Storage,
        devices_to_reenroll: Vec<String>,
    ) -> Result<v1::CertificateAuthorities, Status> {
        let authorities = self.tls.authorities();
        let (bundle, digest) = self.tls.trust_bundle();
        let counts = storage
            .certificates_by_ca(self.renewable_after_ms())
            .await?;
        let count = |fingerprint: &str, unrecorded_too: bool| -> u64 {
            counts
                .iter()
                .filter(|(ca, _)| ca == fingerprint || (unrecorded_too && ca.is_empty()))
                .map(|(_, n)| n)
                .sum()
        };
        // Certificates issued before their CA was recorded came from the
        // CA in force then: the previous one during a rotation.
        let mut list = vec![(
            &authorities.active,
            "active",
            authorities.previous.is_none(),
        )];
        if let Some(previous) = &authorities.previous {
            list.push((previous, "previous", true));
        }
        Ok(v1::CertificateAuthorities {
            authorities: list
                .into_iter()
                .map(|(ca, role, unrecorded)| {
                    let fingerprint = ca.fingerprint();
                    v1::CertificateAuthority {
                        devices: count(&fingerprint, unrecorded),
                        fingerprint,
                        subject: ca.subject().to_string(),
                        not_after_unix_ms: ca.not_after().saturating_mul(1000),
                        role: role.into(),
                    }
                })
                .collect(),
            source: match authorities.source {
                crate::tls::Source::Own { .. } => "data dir",
                crate::tls::Source::Configured => "configuration",
            }
            .into(),
            trust_bundle_sha256: hex::encode(digest),
            trust_bundle_pem: bundle.to_string(),
            devices_to_reenroll,
        })
    }
}

/// Largest bundle accepted for publishing.
const MAX_BUNDLE_BYTES: u64 = 8 * 1024 * 1024 * 1024;

/// Removes an upload's temporary file however the call ends (a committed
/// upload has been renamed away already).
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn admin_token_view(t: AdminTokenInfo) -> v1::AdminToken {
    let scope = scope_map(&t.scope_json);
    v1::AdminToken {
        id: t.id,
        name: t.name,
        created_at_unix_ms: t.created_at_ms,
        revoked_at_unix_ms: t.revoked_at_ms.unwrap_or(0),
        role: t.role,
        expires_at_unix_ms: t.expires_at_ms.unwrap_or(0),
        scope,
        created_by: t.created_by,
    }
}

/// A role name, checked.
fn parse_role(name: &str) -> Result<Role, Status> {
    Role::parse(name).ok_or_else(|| {
        let known: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
        invalid(
            "role",
            format!("unknown role `{name}`; one of {}", known.join(", ")),
        )
    })
}

/// The store labels a token or user of `role` is confined to, checked;
/// `what` is `tokens` or `users`, for the message.
fn parse_scope(
    labels: &std::collections::HashMap<String, String>,
    role: Role,
    what: &str,
) -> Result<Option<Scope>, Status> {
    if labels.len() > MAX_SCOPE_LABELS {
        return Err(invalid(
            "scope",
            format!("at most {MAX_SCOPE_LABELS} labels"),
        ));
    }
    for (key, value) in labels {
        label_key("scope", key)?;
        text("scope", value, true, 128)?;
    }
    let scope = Scope::new(labels.clone().into_iter().collect());
    if scope.is_some() && !role.may_be_scoped() {
        return Err(invalid(
            "scope",
            format!(
                "{role} {what} cannot be scoped to stores; only viewer, deployer and store-ops \
                 {what} can"
            ),
        ));
    }
    Ok(scope)
}

/// A new token's role, expiry and scope, checked: (role, expires_at_ms,
/// scope).
fn token_terms(
    req: &v1::CreateAdminTokenRequest,
    now_ms: i64,
) -> Result<(Role, i64, Option<Scope>), Status> {
    let role = parse_role(&req.role)?;
    let lifetime = match req.expires_in_seconds {
        0 => return Err(invalid("expires_in_seconds", "is required (e.g. 90 days)")),
        n if n > MAX_ADMIN_TOKEN_LIFETIME_SECONDS => {
            return Err(invalid("expires_in_seconds", "must be at most one year"));
        }
        n => n as i64,
    };
    let scope = parse_scope(&req.scope, role, "tokens")?;
    Ok((role, now_ms + lifetime * 1000, scope))
}

fn scope_map(scope_json: &str) -> std::collections::HashMap<String, String> {
    Scope::from_json(scope_json)
        .ok()
        .flatten()
        .map(|s| s.labels().clone().into_iter().collect())
        .unwrap_or_default()
}

fn user_view(u: UserRecord) -> v1::User {
    v1::User {
        setup_pending: u.setup_pending(),
        scope: scope_map(&u.scope_json),
        id: u.id,
        name: u.name,
        role: u.role,
        created_at_unix_ms: u.created_at_ms,
        created_by: u.created_by,
        disabled_at_unix_ms: u.disabled_at_ms.unwrap_or(0),
        locked_until_unix_ms: u.locked_until_ms.filter(|t| *t > now_ms()).unwrap_or(0),
        last_login_unix_ms: u.last_login_at_ms.unwrap_or(0),
        recovery_codes_left: u32::try_from(u.recovery_codes_left).unwrap_or(0),
    }
}

/// A fresh setup code and when it expires: (code, its hash, expiry).
fn new_setup_code(now_ms: i64) -> (String, String, i64) {
    let code = secret::grouped_code(SETUP_CODE_GROUPS);
    let hash = secret::hash(&code);
    (code, hash, now_ms + USER_SETUP_CODE_LIFETIME_MS)
}

fn unknown_user(name: &str) -> Status {
    Status::not_found(format!("unknown user {name}"))
}

/// The largest message of `DownloadBundle`.
const DOWNLOAD_CHUNK_BYTES: usize = 1 << 20;

/// A blob store failure as the caller sees it: a store that is down is
/// worth retrying, anything else is not.
fn blob_status(target: &str, error: crate::blobs::BlobError) -> Status {
    if error.is_unavailable() {
        Status::unavailable(format!("cannot read {target} now: {error}"))
    } else {
        Status::internal(format!("cannot read {target}: {error}"))
    }
}

fn bundle_view(b: BundleRecord) -> v1::Bundle {
    v1::Bundle {
        target: b.target,
        name: b.name,
        version: b.version,
        kind: b.kind,
        hardware: b.hardware,
        length: b.length.max(0) as u64,
        sha256: b.sha256,
        chunks_sha256: b.chunks_sha256,
        targets_version: b.targets_version.max(0) as u64,
        published_at_unix_ms: b.published_at_ms,
        delta_from: b.delta_from,
        active_devices: 0,
    }
}

impl AdminApi {
    // The services it calls, each built once by `ControlPlane::serve`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        storage: Storage,
        offline_after_missed_heartbeats: u32,
        repository: Arc<Repository>,
        desired: DesiredCache,
        rollouts: crate::rollout::Rollouts,
        gate: Arc<crate::tls::DeviceGate>,
        logs: crate::log_requests::LogRequests,
        tls: Option<AdminTls>,
        held_assignment_expiry: std::time::Duration,
    ) -> AdminApi {
        AdminApi {
            storage,
            offline_after_missed_heartbeats: offline_after_missed_heartbeats.into(),
            repository,
            desired,
            rollouts,
            gate,
            logs,
            tls,
            held_assignment_expiry_ms: i64::try_from(held_assignment_expiry.as_millis())
                .unwrap_or(i64::MAX),
        }
    }

    async fn repository_view(&self) -> Result<v1::Repository, Status> {
        let (root, targets) = self.repository.current().await?;
        let (snapshot, timestamp) = self.repository.online_public_keys();
        Ok(v1::Repository {
            root_json: root.into_bytes(),
            targets_json: targets.into_bytes(),
            snapshot_public_key: snapshot,
            timestamp_public_key: timestamp,
        })
    }

    /// Who calls (authenticated, and checked against the role table, by the
    /// audit layer in front of this service). A mutating call is written to
    /// the audit log, with what `T` says it is about, before this returns: a
    /// call that cannot be recorded is refused.
    async fn authorize<T: AuditTarget>(&self, request: &Request<T>) -> Result<Principal, Status> {
        match request.extensions().get::<audit::Caller>() {
            Some(caller) => caller.authorize(|| request.get_ref().audit_target()).await,
            None => {
                // lib.rs always serves this behind the audit layer.
                tracing::error!("An admin call arrived without the audit layer.");
                Err(Status::internal(
                    "internal error; see the control plane log",
                ))
            }
        }
    }

    fn device(&self, d: DeviceRecord) -> v1::Device {
        convert::device(
            d,
            now_ms(),
            self.offline_after_missed_heartbeats,
            self.tls.as_ref().map(|tls| &tls.certificates),
        )
    }

    /// `NOT_FOUND` unless store `id` exists.
    async fn existing_store(&self, id: &str) -> Result<(), Status> {
        match self.storage.store_exists(id).await? {
            true => Ok(()),
            false => Err(unknown_store(id)),
        }
    }

    /// Device `id`, or `NOT_FOUND`.
    async fn existing_device(&self, id: &str) -> Result<DeviceRecord, Status> {
        self.storage
            .get_device(id)
            .await?
            .ok_or_else(|| unknown_device(id))
    }

    /// The caller of a call about one user, and the user's name, checked.
    async fn user_call(
        &self,
        request: Request<v1::UserRequest>,
    ) -> Result<(Principal, String), Status> {
        let caller = self.authorize(&request).await?;
        let name = request.into_inner().name;
        user_name("name", &name)?;
        Ok((caller, name))
    }

    /// A call that changes rollout `req.id`, made in the caller's name:
    /// authorized (and recorded), refused if the rollout may reach stores
    /// outside the caller's scope, then answered with the rollout as
    /// `change` left it.
    async fn change_rollout<F>(
        &self,
        request: Request<v1::RolloutRequest>,
        change: impl FnOnce(v1::RolloutRequest, Principal) -> F,
    ) -> Result<Response<v1::Rollout>, Status>
    where
        F: std::future::Future<Output = Result<v1::Rollout, Status>>,
    {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        if let Some(scope) = &caller.scope
            && !self.rollout_in_scope(scope, &req.id).await?
        {
            return Err(out_of_scope(
                &caller,
                scope,
                &format!("rollout {} may select stores outside it", req.id),
            ));
        }
        let rollout = change(req, caller).await?;
        Ok(Response::new(rollout))
    }

    // ----- store scopes (see `crate::authz`) -----

    /// The stores a scoped caller sees and acts on; `None` when unscoped.
    async fn scope_stores(&self, caller: &Principal) -> Result<Option<BTreeSet<String>>, Status> {
        match &caller.scope {
            None => Ok(None),
            Some(scope) => Ok(Some(
                self.storage.store_ids_with_labels(scope.labels()).await?,
            )),
        }
    }

    /// `PERMISSION_DENIED` if store `store_id` is outside the caller's
    /// scope.
    async fn act_on_store(&self, caller: &Principal, store_id: &str) -> Result<(), Status> {
        let (Some(scope), Some(stores)) = (&caller.scope, self.scope_stores(caller).await?) else {
            return Ok(());
        };
        if stores.contains(store_id) {
            return Ok(());
        }
        Err(out_of_scope(
            caller,
            scope,
            &format!("store {store_id} is outside it"),
        ))
    }

    /// Device `id` if it exists and its store is in the caller's scope;
    /// `PERMISSION_DENIED` if it is outside.
    async fn act_on_device(&self, caller: &Principal, id: &str) -> Result<DeviceRecord, Status> {
        text("device_id", id, true, 64)?;
        let device = self.existing_device(id).await?;
        if let Some(scope) = &caller.scope
            && !self.in_scope(caller, &device.store_id).await?
        {
            return Err(out_of_scope(
                caller,
                scope,
                &format!("device {id} is in store {}, outside it", device.store_id),
            ));
        }
        Ok(device)
    }

    /// Whether the caller sees store `store_id` (always, unscoped).
    async fn in_scope(&self, caller: &Principal, store_id: &str) -> Result<bool, Status> {
        Ok(match self.scope_stores(caller).await? {
            None => true,
            Some(stores) => stores.contains(store_id),
        })
    }

    /// Whether rollout `id` can only ever select stores in `scope`: its
    /// selector requires every label of the scope. (An unknown rollout is
    /// left to the handler, which answers NOT_FOUND.)
    async fn rollout_in_scope(&self, scope: &Scope, id: &str) -> Result<bool, Status> {
        let Some(rollout) = self.storage.get_rollout(id).await? else {
            return Ok(true);
        };
        let selector: crate::rollout::model::Selector =
            serde_json::from_str(&rollout.selector_json).map_err(|e| {
                crate::error::Error::Corrupt(format!("rollout {id}'s selector: {e}"))
            })?;
        Ok(scope.bounds(&selector.store_labels.into_iter().collect()))
    }

    /// A scoped caller's new rollout must stay in its scope, now and when
    /// devices join it later: its selector must require the scope's
    /// labels, and what it selects now must be in scope (checked on the
    /// selection itself).
    async fn rollout_selector_in_scope(
        &self,
        caller: &Principal,
        req: &v1::CreateRolloutRequest,
    ) -> Result<(), Status> {
        let Some(scope) = &caller.scope else {
            return Ok(());
        };
        let proto = req.selector.clone().unwrap_or_default();
        if !scope.bounds(&proto.store_labels) {
            return Err(out_of_scope(
                caller,
                scope,
                &format!("a rollout's selector must require the store labels {scope}"),
            ));
        }
        let selector = crate::rollout::model::Selector::from_proto(proto);
        let stores = self.scope_stores(caller).await?.unwrap_or_default();
        if let Some(outside) = selector.store_ids.iter().find(|id| !stores.contains(*id)) {
            return Err(out_of_scope(
                caller,
                scope,
                &format!("store {outside} is outside it"),
            ));
        }
        let selected = self
            .storage
            .select_devices(&selector, &req.bundle_name, None)
            .await?;
        if let Some(outside) = selected.iter().find(|d| !stores.contains(&d.store_id)) {
            return Err(out_of_scope(
                caller,
                scope,
                &format!(
                    "the selector reaches device {} in store {}, outside it",
                    outside.device_id, outside.store_id
                ),
            ));
        }
        Ok(())
    }
}

/// A target outside a scoped caller's stores.
fn out_of_scope(caller: &Principal, scope: &Scope, why: &str) -> Status {
    Status::permission_denied(format!(
        "{} {} is scoped to stores with {scope}; {why}",
        caller.kind(),
        caller.name
    ))
}

fn unknown_store(id: &str) -> Status {
    Status::not_found(format!("unknown store {id}"))
}

fn unknown_device(id: &str) -> Status {
    Status::not_found(format!("unknown device {id}"))
}

fn page_size(requested: u32) -> i64 {
    match requested {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
    .into()
}

/// Entries of the audit log and deliveries per call: 0 asks for 100, and
/// at most 1000.
fn list_limit(requested: u32) -> u32 {
    match requested {
        0 => 100,
        n => n.min(1000),
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_store(
        &self,
        request: Request<v1::CreateStoreRequest>,
    ) -> Result<Response<v1::Store>, Status> {
        self.authorize(&request).await?;
        let req = request.into_inner();
        slug("id", &req.id, 64)?;
        text("name", &req.name, true, 128)?;
        time_zone("time_zone", &req.time_zone)?;
        let store = StoreRecord {
            id: req.id,
            name: req.name,
            time_zone: req.time_zone,
            created_at_ms: now_ms(),
            device_count: 0,
            maintenance_window: None,
            labels: BTreeMap::new(),
        };
        if !self.storage.create_store(&store).await? {
            return Err(Status::already_exists(format!(
                "store {} already exists",
                store.id
            )));
        }
        tracing::info!(store_id = %store.id, time_zone = %store.time_zone, "Store created.");
        Ok(Response::new(convert::store(store)))
    }

    async fn list_stores(
        &self,
        request: Request<v1::ListStoresRequest>,
    ) -> Result<Response<v1::ListStoresResponse>, Status> {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        let limit = page_size(req.page_size);
        let stores = self.storage.list_stores(&req.page_token, limit).await?;
        let next_page_token = match stores.last() {
            Some(last) if stores.len() as i64 == limit => last.id.clone(),
            _ => String::new(),
        };
        // A scoped caller's pages may hold fewer stores; the cursor still
        // walks every store.
        let visible = self.scope_stores(&caller).await?;
        Ok(Response::new(v1::ListStoresResponse {
            stores: stores
                .into_iter()
                .filter(|s| visible.as_ref().is_none_or(|v| v.contains(&s.id)))
                .map(convert::store)
                .collect(),
            next_page_token,
        }))
    }

    async fn get_store(
        &self,
        request: Request<v1::GetStoreRequest>,
    ) -> Result<Response<v1::StoreDetail>, Status> {
        let caller = self.authorize(&request).await?;
        let id = request.into_inner().id;
        slug("id", &id, 64)?;
        if !self.in_scope(&caller, &id).await? {
            return Err(unknown_store(&id));
        }
        let store = self
            .storage
            .get_store(&id)
            .await?
            .ok_or_else(|| unknown_store(&id))?;
        let transfers = self.storage.store_transfers(&id).await?;
        Ok(Response::new(v1::StoreDetail {
            store: Some(convert::store(store)),
            transfers: transfers.into_iter().map(convert::transfer).collect(),
        }))
    }

    async fn create_enrollment_token(
        &self,
        request: Request<v1::CreateEnrollmentTokenRequest>,
    ) -> Result<Response<v1::CreateEnrollmentTokenResponse>, Status> {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        slug("store_id", &req.store_id, 64)?;
        let lifetime = match req.expires_in_seconds {
            0 => DEFAULT_TOKEN_LIFETIME_SECONDS,
            n if n > MAX_TOKEN_LIFETIME_SECONDS => {
                return Err(invalid("expires_in_seconds", "must be at most one year"));
            }
            n => n,
        };
        let uses = match req.uses {
            0 => 1,
            n if n > MAX_TOKEN_USES => {
                return Err(invalid("uses", format!("must be at most {MAX_TOKEN_USES}")));
            }
            n => n,
        };
        self.existing_store(&req.store_id).await?;
        self.act_on_store(&caller, &req.store_id).await?;
        let secret = secret::generate(secret::ENROLLMENT_TOKEN_PREFIX);
        let now = now_ms();
        let token = EnrollmentTokenRecord {
            id: secret::short_id("tok-", 6),
            store_id: req.store_id,
            uses_total: uses.into(),
            uses_remaining: uses.into(),
            expires_at_ms: now + (lifetime as i64) * 1000,
            revoked_at_ms: None,
            created_at_ms: now,
        };
        self.storage
            .create_enrollment_token(&token, &secret::hash(&secret))
            .await?;
        tracing::info!(token_id = %token.id, store_id = %token.store_id, uses, "Enrollment token created.");
        Ok(Response::new(v1::CreateEnrollmentTokenResponse {
            token: Some(convert::enrollment_token(token)),
            secret,
            // What a till pins: the CA that issued the listeners'
            // certificate (the previous one during a rotation).
            ca_fingerprint: self
                .tls
                .as_ref()
                .map(|tls| tls.tls.authorities().server_issuer().fingerprint())
                .unwrap_or_default(),
        }))
    }

    async fn list_enrollment_tokens(
        &self,
        request: Request<v1::ListEnrollmentTokensRequest>,
    ) -> Result<Response<v1::ListEnrollmentTokensResponse>, Status> {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        let store = (!req.store_id.is_empty()).then_some(req.store_id.as_str());
        let visible = self.scope_stores(&caller).await?;
        if let Some(store) = store {
            if visible.as_ref().is_some_and(|v| !v.contains(store)) {
                return Err(unknown_store(store));
            }
            self.existing_store(store).await?;
        }
        let tokens = self.storage.list_enrollment_tokens(store).await?;
        Ok(Response::new(v1::ListEnrollmentTokensResponse {
            tokens: tokens
                .into_iter()
                .filter(|t| visible.as_ref().is_none_or(|v| v.contains(&t.store_id)))
                .map(convert::enrollment_token)
                .collect(),
        }))
    }

    async fn revoke_enrollment_token(
        &self,
        request: Request<v1::RevokeEnrollmentTokenRequest>,
    ) -> Result<Response<v1::EnrollmentToken>, Status> {
        let caller = self.authorize(&request).await?;
        let id = request.into_inner().id;
        text("id", &id, true, 64)?;
        if caller.scope.is_some() {
            let tokens = self.storage.list_enrollment_tokens(None).await?;
            if let Some(token) = tokens.iter().find(|t| t.id == id) {
                self.act_on_store(&caller, &token.store_id).await?;
            }
        }
        let token = self
            .storage
            .revoke_enrollment_token(&id, now_ms())
            .await?
            .ok_or_else(|| Status::not_found(format!("unknown enrollment token {id}")))?;
        tracing::info!(token_id = %token.id, store_id = %token.store_id, "Enrollment token revoked.");
        Ok(Response::new(convert::enrollment_token(token)))
    }

    async fn list_devices(
        &self,
        request: Request<v1::ListDevicesRequest>,
    ) -> Result<Response<v1::ListDevicesResponse>, Status> {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        let status = match v1::DeviceStatus::try_from(req.status) {
            Ok(v1::DeviceStatus::Unspecified) => None,
            Ok(v1::DeviceStatus::Online) => Some(StatusFilter::Online),
            Ok(v1::DeviceStatus::Offline) => Some(StatusFilter::Offline),
            Err(_) => return Err(invalid("status", format!("unknown status {}", req.status))),
        };
        for key in req.labels.keys() {
            label_key("labels", key)?;
        }
        let filter = DeviceFilter {
            store_id: (!req.store_id.is_empty()).then_some(req.store_id),
            status,
            labels: req.labels.into_iter().collect(),
            after_id: req.page_token,
            limit: page_size(req.page_size),
            now_ms: now_ms(),
            offline_after_missed_heartbeats: self.offline_after_missed_heartbeats,
        };
        let devices = self.storage.list_devices(&filter).await?;
        let next_page_token = match devices.last() {
            Some(last) if devices.len() as i64 == filter.limit => last.id.clone(),
            _ => String::new(),
        };
        // A scoped caller's pages may hold fewer devices; the cursor still
        // walks every device.
        let visible = self.scope_stores(&caller).await?;
        Ok(Response::new(v1::ListDevicesResponse {
            devices: devices
                .into_iter()
                .filter(|d| visible.as_ref().is_none_or(|v| v.contains(&d.store_id)))
                .map(|d| self.device(d))
                .collect(),
            next_page_token,
        }))
    }

    async fn get_device(
        &self,
        request: Request<v1::GetDeviceRequest>,
    ) -> Result<Response<v1::Device>, Status> {
        let caller = self.authorize(&request).await?;
        let id = request.into_inner().id;
        text("id", &id, true, 64)?;
        let device = self.existing_device(&id).await?;
        if !self.in_scope(&caller, &device.store_id).await? {
            return Err(unknown_device(&id));
        }
        // Read afresh, not from the heartbeats' cache.
        let desired = self
            .storage
            .store_desired_state(&device.store_id)
            .await?
            .map(|state| state.for_device(&device.id))
            .unwrap_or_default();
        let reported = self.storage.bundle_statuses(&device.id).await?;
        let mut view = self.device(device);
        view.bundles = convert::device_bundles(desired, reported);
        Ok(Response::new(view))
    }

    async fn request_device_logs(
        &self,
        request: Request<v1::RequestDeviceLogsRequest>,
    ) -> Result<Response<v1::LogRequestInfo>, Status> {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        if caller.scope.is_some() {
            self.act_on_device(&caller, &req.device_id).await?;
        }
        let info = self.logs.create(&caller.name, req).await?;
        Ok(Response::new(info))
    }

    type GetDeviceLogsStream =
        tokio_stream::wrappers::ReceiverStream<Result<v1::DeviceLogsChunk, Status>>;

    async fn get_device_logs(
        &self,
        request: Request<v1::GetDeviceLogsRequest>,
    ) -> Result<Response<Self::GetDeviceLogsStream>, Status> {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        if caller.scope.is_some() {
            text("request_id", &req.request_id, true, 64)?;
            if let Some(record) = self.storage.log_request(&req.request_id).await? {
                self.act_on_device(&caller, &record.request.device_id)
                    .await?;
            }
        }
        let stream = self.logs.watch(req).await?;
        Ok(Response::new(stream))
    }

    async fn set_device_labels(
        &self,
        request: Request<v1::SetDeviceLabelsRequest>,
    ) -> Result<Response<v1::Device>, Status> {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        text("device_id", &req.device_id, true, 64)?;
        label_changes(&req.set, &req.remove)?;
        if caller.scope.is_some() {
            self.act_on_device(&caller, &req.device_id).await?;
        }
        let set: BTreeMap<String, String> = req.set.into_iter().collect();
        let device = self
            .storage
            .set_device_labels(&req.device_id, &set, &req.remove)
            .await?
            .ok_or_else(|| unknown_device(&req.device_id))?;
        tracing::info!(device_id = %device.id, set = set.len(), removed = req.remove.len(), "Device labels changed.");
        Ok(Response::new(self.device(device)))
    }

    async fn revoke_device(
        &self,
        request: Request<v1::RevokeDeviceRequest>,
    ) -> Result<Response<v1::Device>, Status> {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        text("device_id", &req.device_id, true, 64)?;
        text("reason", &req.reason, false, 256)?;
        if caller.scope.is_some() {
            self.act_on_device(&caller, &req.device_id).await?;
        }
        let store = self
            .storage
            .revoke_device(&req.device_id, &req.reason, now_ms())
            .await?
            .ok_or_else(|| unknown_device(&req.device_id))?;
        // Its own connections are cut now, on other replicas when they are
        // told (PostgreSQL), else within a few seconds; its store's tills
        // drop it with their next heartbeat.
        self.gate.revoke(&req.device_id);
        crate::changes::announce(
            &self.storage,
            crate::changes::Change::Revoked {
                device_id: req.device_id.clone(),
            },
        )
        .await;
        self.desired.invalidate(&store).await;
        let device = self.existing_device(&req.device_id).await?;
        tracing::warn!(device_id = %device.id, store_id = %store, reason = %req.reason, "Device revoked.");
        Ok(Response::new(self.device(device)))
    }

    async fn assign_bundle(
        &self,
        request: Request<v1::AssignBundleRequest>,
    ) -> Result<Response<v1::AssignBundleResponse>, Status> {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        let target = match req.target {
            Some(Target::DeviceId(id)) => {
                text("device_id", &id, true, 64)?;
                AssignTarget::Device(id)
            }
            Some(Target::StoreId(id)) => {
                slug("store_id", &id, 64)?;
                AssignTarget::Store(id)
            }
            None => return Err(invalid("target", "set device_id or store_id")),
        };
        if caller.scope.is_some() {
            match &target {
                AssignTarget::Device(id) => self.act_on_device(&caller, id).await.map(|_| ())?,
                AssignTarget::Store(id) => self.act_on_store(&caller, id).await?,
            }
        }
        validate::bundle_name("name", &req.name)?;
        validate::version("version", &req.version, true)?;
        let bundle = self
            .storage
            .get_bundle(&req.name, &req.version)
            .await?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "bundle {} {} is not published",
                    req.name, req.version
                ))
            })?;
        // A store's catalog holds its own prices and products: it is
        // assigned to the store, so that no till holds another store's.
        if bundle.kind == "catalog" && matches!(target, AssignTarget::Device(_)) {
            return Err(Status::failed_precondition(format!(
                "{} is a catalog bundle; catalogs are assigned per store (--store)",
                bundle.name
            )));
        }
        // The store whose heartbeats answer with this assignment.
        let store_id = match &target {
            AssignTarget::Device(id) => {
                let device = self.existing_device(id).await?;
                let model = &device.hardware_model;
                if !bundle.hardware.iter().any(|h| h == "*" || h == model) {
                    return Err(Status::failed_precondition(format!(
                        "bundle {} {} is for hardware {}, not {model} (device {id})",
                        bundle.name,
                        bundle.version,
                        bundle.hardware.join(", ")
                    )));
                }
                device.store_id
            }
            AssignTarget::Store(id) => {
                self.existing_store(id).await?;
                id.clone()
            }
        };
        let assignment = DesiredBundleRecord {
            name: bundle.name,
            version: bundle.version,
            kind: bundle.kind,
            download_ahead: req.download_ahead.unwrap_or(true),
            emergency: req.emergency,
            rollback: false,
        };
        if assignment.emergency {
            let held = self
                .hold_assignment(&caller, &target, &store_id, &assignment)
                .await?;
            return Ok(Response::new(v1::AssignBundleResponse {
                devices_assigned: 0,
                held: Some(held),
            }));
        }
        let assigned = self
            .storage
            .assign_bundle(&target, &assignment, now_ms())
            .await?;
        self.desired.invalidate(&store_id).await;
        let device_id = match &target {
            AssignTarget::Device(id) => id.as_str(),
            AssignTarget::Store(_) => "",
        };
        tracing::info!(
            device_id,
            store_id = %store_id,
            bundle = %assignment.name,
            version = %assignment.version,
            download_ahead = assignment.download_ahead,
            emergency = assignment.emergency,
            devices_assigned = assigned,
            "Bundle assigned."
        );
        Ok(Response::new(v1::AssignBundleResponse {
            devices_assigned: assigned.max(0) as u64,
            held: None,
        }))
    }

    async fn list_held_assignments(
        &self,
        request: Request<v1::ListHeldAssignmentsRequest>,
    ) -> Result<Response<v1::ListHeldAssignmentsResponse>, Status> {
        let caller = self.authorize(&request).await?;
        let list = self.list_held(&caller, request.into_inner()).await?;
        Ok(Response::new(list))
    }

    async fn approve_assignment(
        &self,
        request: Request<v1::HeldAssignmentRequest>,
    ) -> Result<Response<v1::HeldAssignment>, Status> {
        let caller = self.authorize(&request).await?;
        let held = self.approve_held(&caller, request.into_inner()).await?;
        Ok(Response::new(held))
    }

    async fn cancel_assignment(
        &self,
        request: Request<v1::HeldAssignmentRequest>,
    ) -> Result<Response<v1::HeldAssignment>, Status> {
        let caller = self.authorize(&request).await?;
        let held = self.cancel_held(&caller, request.into_inner()).await?;
        Ok(Response::new(held))
    }

    async fn set_maintenance_window(
        &self,
        request: Request<v1::SetMaintenanceWindowRequest>,
    ) -> Result<Response<v1::Store>, Status> {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        slug("store_id", &req.store_id, 64)?;
        self.act_on_store(&caller, &req.store_id).await?;
        let window = match req.maintenance_window {
            Some(w) => {
                validate::maintenance_window(w.start_minute, w.duration_minutes)?;
                Some(WindowRecord {
                    start_minute: w.start_minute.into(),
                    duration_minutes: w.duration_minutes.into(),
                })
            }
            None => None,
        };
        let store = self
            .storage
            .set_maintenance_window(&req.store_id, window)
            .await?
            .ok_or_else(|| unknown_store(&req.store_id))?;
        self.desired.invalidate(&store.id).await;
        match window {
            Some(w) => tracing::info!(
                store_id = %store.id,
                start_minute = w.start_minute,
                duration_minutes = w.duration_minutes,
                time_zone = %store.time_zone,
                "Maintenance window set."
            ),
            None => tracing::info!(store_id = %store.id, "Maintenance window cleared."),
        }
        Ok(Response::new(convert::store(store)))
    }

    async fn get_repository(
        &self,
        request: Request<v1::GetRepositoryRequest>,
    ) -> Result<Response<v1::Repository>, Status> {
        self.authorize(&request).await?;
        Ok(Response::new(self.repository_view().await?))
    }

    async fn init_repository(
        &self,
        request: Request<v1::InitRepositoryRequest>,
    ) -> Result<Response<v1::Repository>, Status> {
        self.authorize(&request).await?;
        let req = request.into_inner();
        self.repository
            .init(&req.root_json, &req.targets_json, chrono::Utc::now())
            .await?;
        Ok(Response::new(self.repository_view().await?))
    }

    async fn update_root(
        &self,
        request: Request<v1::UpdateRootRequest>,
    ) -> Result<Response<v1::Repository>, Status> {
        self.authorize(&request).await?;
        let req = request.into_inner();
        self.repository
            .update_root(&req.root_json, chrono::Utc::now())
            .await?;
        Ok(Response::new(self.repository_view().await?))
    }

    async fn publish_bundle(
        &self,
        request: Request<tonic::Streaming<v1::PublishBundleRequest>>,
    ) -> Result<Response<v1::Bundle>, Status> {
        self.authorize(&request).await?;
        let caller = request.extensions().get::<audit::Caller>().cloned();
        let mut stream = request.into_inner();
        let header = match next_upload_message(&mut stream).await? {
            Some(v1::PublishBundleRequest {
                part: Some(Part::Header(header)),
            }) => header,
            _ => return Err(invalid("header", "the first message must be the header")),
        };
        if let Some(caller) = caller {
            caller.set_target(audit::publish_target(&header));
        }
        let mut temp = None;
        if !header.target.is_empty() {
            let path = TempFile(self.repository.blobs().temp_path());
            let write_error = |e: std::io::Error| {
                tracing::error!(error = %e, path = %path.0.display(), "Cannot store an upload.");
                if e.raw_os_error() == Some(28) {
                    Status::resource_exhausted(
                        "the control plane's disk is full; nothing was published",
                    )
                } else {
                    Status::internal("cannot store the upload; see the control plane log")
                }
            };
            let mut file = tokio::fs::File::create(&path.0)
                .await
                .map_err(write_error)?;
            let mut total = 0u64;
            while let Some(message) = next_upload_message(&mut stream).await? {
                let Some(Part::Data(data)) = message.part else {
                    return Err(invalid("data", "only data may follow the header"));
                };
                total += data.len() as u64;
                if total > MAX_BUNDLE_BYTES {
                    return Err(Status::resource_exhausted(format!(
                        "bundles are limited to {MAX_BUNDLE_BYTES} bytes"
                    )));
                }
                file.write_all(&data).await.map_err(write_error)?;
            }
            file.sync_all().await.map_err(write_error)?;
            temp = Some(path);
        }
        let upload = temp.as_ref().map(|t| Upload {
            target: header.target.clone(),
            temp: t.0.clone(),
        });
        let bundle = self
            .repository
            .publish(&header.targets_json, upload, chrono::Utc::now())
            .await?;
        Ok(Response::new(bundle.map(bundle_view).unwrap_or_default()))
    }

    async fn list_bundles(
        &self,
        request: Request<v1::ListBundlesRequest>,
    ) -> Result<Response<v1::ListBundlesResponse>, Status> {
        self.authorize(&request).await?;
        let name = request.into_inner().name;
        let name = (!name.is_empty()).then_some(name.as_str());
        let bundles = self.storage.list_bundles(name).await?;
        let active = self.storage.active_devices(name).await?;
        let bundles = bundles
            .into_iter()
            .map(|b| {
                let devices = match b.delta_from.is_empty() {
                    true => active.get(&(b.name.clone(), b.version.clone())),
                    false => None,
                };
                v1::Bundle {
                    active_devices: devices.copied().unwrap_or(0).max(0) as u64,
                    ..bundle_view(b)
                }
            })
            .collect();
        Ok(Response::new(v1::ListBundlesResponse { bundles }))
    }

    type DownloadBundleStream =
        tokio_stream::wrappers::ReceiverStream<Result<v1::DownloadBundleChunk, Status>>;

    async fn download_bundle(
        &self,
        request: Request<v1::DownloadBundleRequest>,
    ) -> Result<Response<Self::DownloadBundleStream>, Status> {
        use futures::StreamExt;
        self.authorize(&request).await?;
        let target = request.into_inner().target;
        text("target", &target, true, 256)?;
        let bundle = self
            .storage
            .bundle_by_target(&target)
            .await?
            .ok_or_else(|| Status::not_found(format!("{target} is not published")))?;
        let length = bundle.length.max(0) as u64;
        let mut stream = self
            .repository
            .blobs()
            .read(&bundle.sha256, 0..length)
            .await
            .map_err(|e| blob_status(&target, e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(piece) = stream.next().await {
                let bytes = match piece {
                    Ok(bytes) => bytes,
                    Err(error) => {
                        let message = format!("reading {target} failed: {error}");
                        let _ = tx.send(Err(Status::unavailable(message))).await;
                        return;
                    }
                };
                for data in bytes.chunks(DOWNLOAD_CHUNK_BYTES) {
                    let chunk = v1::DownloadBundleChunk {
                        data: data.to_vec(),
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        // The caller went away.
                        return;
                    }
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn create_rollout(
        &self,
        request: Request<v1::CreateRolloutRequest>,
    ) -> Result<Response<v1::Rollout>, Status> {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        self.rollout_selector_in_scope(&caller, &req).await?;
        let rollout = self
            .rollouts
            .create(req, &caller.name, caller.person_id())
            .await?;
        Ok(Response::new(rollout))
    }

    async fn start_rollout(
        &self,
        request: Request<v1::RolloutRequest>,
    ) -> Result<Response<v1::Rollout>, Status> {
        self.change_rollout(request, |req, actor| async move {
            self.rollouts.start(req, &actor.name).await
        })
        .await
    }

    async fn approve_rollout(
        &self,
        request: Request<v1::RolloutRequest>,
    ) -> Result<Response<v1::Rollout>, Status> {
        self.change_rollout(request, |req, actor| async move {
            self.rollouts
                .approve(req, &actor.name, actor.kind(), actor.person_id())
                .await
        })
        .await
    }

    async fn pause_rollout(
        &self,
        request: Request<v1::RolloutRequest>,
    ) -> Result<Response<v1::Rollout>, Status> {
        self.change_rollout(request, |req, actor| async move {
            self.rollouts.pause(req, &actor.name).await
        })
        .await
    }

    async fn resume_rollout(
        &self,
        request: Request<v1::RolloutRequest>,
    ) -> Result<Response<v1::Rollout>, Status> {
        self.change_rollout(request, |req, actor| async move {
            self.rollouts.resume(req, &actor.name).await
        })
        .await
    }

    async fn abort_rollout(
        &self,
        request: Request<v1::RolloutRequest>,
    ) -> Result<Response<v1::Rollout>, Status> {
        self.change_rollout(request, |req, actor| async move {
            self.rollouts.abort(req, &actor.name).await
        })
        .await
    }

    async fn rollback_rollout(
        &self,
        request: Request<v1::RolloutRequest>,
    ) -> Result<Response<v1::Rollout>, Status> {
        self.change_rollout(request, |req, actor| async move {
            self.rollouts.rollback(req, &actor.name).await
        })
        .await
    }

    async fn list_rollouts(
        &self,
        request: Request<v1::ListRolloutsRequest>,
    ) -> Result<Response<v1::ListRolloutsResponse>, Status> {
        let caller = self.authorize(&request).await?;
        let mut list = self.rollouts.list(request.into_inner()).await?;
        if let Some(scope) = &caller.scope {
            list.rollouts.retain(|r| {
                r.selector
                    .as_ref()
                    .is_some_and(|s| scope.bounds(&s.store_labels))
            });
        }
        Ok(Response::new(list))
    }

    async fn get_rollout(
        &self,
        request: Request<v1::RolloutRequest>,
    ) -> Result<Response<v1::RolloutDetail>, Status> {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        if let Some(scope) = &caller.scope
            && !self.rollout_in_scope(scope, &req.id).await?
        {
            return Err(Status::not_found(format!("unknown rollout {}", req.id)));
        }
        let detail = self.rollouts.get(req).await?;
        Ok(Response::new(detail))
    }

    async fn list_events(
        &self,
        request: Request<v1::ListEventsRequest>,
    ) -> Result<Response<v1::ListEventsResponse>, Status> {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        if !req.rollout_id.is_empty() {
            text("rollout_id", &req.rollout_id, true, 64)?;
        }
        // The fleet's events are not narrowed by store: a scoped caller
        // reads those of one rollout in its scope.
        if let Some(scope) = &caller.scope
            && (req.rollout_id.is_empty() || !self.rollout_in_scope(scope, &req.rollout_id).await?)
        {
            return Err(out_of_scope(
                &caller,
                scope,
                "it may list the events of one rollout in its scope (rollout_id)",
            ));
        }
        let limit = match req.limit {
            0 => DEFAULT_EVENTS_PER_PAGE,
            n => n.min(crate::storage::MAX_EVENTS_PER_PAGE),
        };
        let rollout = (!req.rollout_id.is_empty()).then_some(req.rollout_id.as_str());
        let events = self
            .storage
            .events_after(req.after_seq, rollout, limit)
            .await?;
        Ok(Response::new(v1::ListEventsResponse {
            events: events.into_iter().map(convert::event).collect(),
        }))
    }

    async fn set_store_labels(
        &self,
        request: Request<v1::SetStoreLabelsRequest>,
    ) -> Result<Response<v1::Store>, Status> {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        slug("store_id", &req.store_id, 64)?;
        label_changes(&req.set, &req.remove)?;
        let set: BTreeMap<String, String> = req.set.into_iter().collect();
        let event =
            crate::rollout::ops::labels_event(&req.store_id, &set, &req.remove, &caller.name);
        let store = self
            .storage
            .set_store_labels(&req.store_id, &set, &req.remove, &event, now_ms())
            .await?
            .ok_or_else(|| unknown_store(&req.store_id))?;
        tracing::info!(store_id = %store.id, set = set.len(), removed = req.remove.len(), "Store labels changed.");
        Ok(Response::new(convert::store(store)))
    }

    async fn list_audit_entries(
        &self,
        request: Request<v1::ListAuditEntriesRequest>,
    ) -> Result<Response<v1::ListAuditEntriesResponse>, Status> {
        self.authorize(&request).await?;
        let req = request.into_inner();
        let user = (!req.user.is_empty()).then_some(req.user.as_str());
        if let Some(user) = user {
            user_name("user", user)?;
        }
        let entries = self
            .storage
            .list_audit_entries(req.after_seq, list_limit(req.limit), user)
            .await?;
        Ok(Response::new(v1::ListAuditEntriesResponse {
            entries: entries.into_iter().map(audit::entry_view).collect(),
        }))
    }

    async fn add_webhook(
        &self,
        request: Request<v1::AddWebhookRequest>,
    ) -> Result<Response<v1::AddWebhookResponse>, Status> {
        self.authorize(&request).await?;
        let caller = request.extensions().get::<audit::Caller>().cloned();
        let req = request.into_inner();
        let url = webhooks::validate_url(&req.url)?;
        let events = webhooks::validate_events(&req.events)?;
        let ca_pem = webhooks::tls::validate_ca_pem(&url, &req.ca_pem)?;
        if self.storage.list_webhooks().await?.len() >= webhooks::MAX_WEBHOOKS {
            return Err(Status::resource_exhausted(format!(
                "at most {} webhooks; remove one first",
                webhooks::MAX_WEBHOOKS
            )));
        }
        // Kept as is: deliveries are signed with it (HMAC needs the key).
        let secret = secret::generate(webhooks::SECRET_PREFIX);
        let webhook = WebhookRecord {
            id: secret::short_id("wh-", 6),
            url,
            events,
            secret: secret.clone(),
            // Events from now on (not the fleet's history).
            after_event_seq: self.storage.last_event_seq().await?,
            created_at_ms: now_ms(),
            ca_pem,
        };
        let view = webhooks::webhook_view(webhook.clone());
        let ca_fingerprints: Vec<&str> = view
            .cas
            .iter()
            .map(|ca| ca.sha256_fingerprint.as_str())
            .collect();
        self.storage.insert_webhook(&webhook).await?;
        if let Some(caller) = caller {
            caller.set_target(serde_json::json!({
                "webhook_id": webhook.id,
                "url": webhook.url,
                "events": webhook.events,
                "ca_sha256_fingerprints": ca_fingerprints,
            }));
        }
        tracing::info!(
            webhook_id = %webhook.id,
            url = %webhook.url,
            events = %webhook.events.join(","),
            ca_sha256_fingerprints = %ca_fingerprints.join(","),
            "Webhook added."
        );
        Ok(Response::new(v1::AddWebhookResponse {
            webhook: Some(view),
            secret,
        }))
    }

    async fn list_webhooks(
        &self,
        request: Request<v1::ListWebhooksRequest>,
    ) -> Result<Response<v1::ListWebhooksResponse>, Status> {
        self.authorize(&request).await?;
        let webhooks = self.storage.list_webhooks().await?;
        Ok(Response::new(v1::ListWebhooksResponse {
            webhooks: webhooks.into_iter().map(webhooks::webhook_view).collect(),
        }))
    }

    async fn remove_webhook(
        &self,
        request: Request<v1::RemoveWebhookRequest>,
    ) -> Result<Response<v1::Webhook>, Status> {
        self.authorize(&request).await?;
        let id = request.into_inner().id;
        text("id", &id, true, 64)?;
        let webhook = self
            .storage
            .remove_webhook(&id)
            .await?
            .ok_or_else(|| Status::not_found(format!("unknown webhook {id}")))?;
        tracing::info!(webhook_id = %webhook.id, url = %webhook.url, "Webhook removed.");
        Ok(Response::new(webhooks::webhook_view(webhook)))
    }

    async fn list_webhook_deliveries(
        &self,
        request: Request<v1::ListWebhookDeliveriesRequest>,
    ) -> Result<Response<v1::ListWebhookDeliveriesResponse>, Status> {
        self.authorize(&request).await?;
        let req = request.into_inner();
        let webhook = (!req.webhook_id.is_empty()).then_some(req.webhook_id.as_str());
        if let Some(id) = webhook {
            text("webhook_id", id, true, 64)?;
            let known = self.storage.list_webhooks().await?;
            if !known.iter().any(|w| w.id == id) {
                return Err(Status::not_found(format!("unknown webhook {id}")));
            }
        }
        let deliveries = self
            .storage
            .list_deliveries(webhook, list_limit(req.limit))
            .await?;
        Ok(Response::new(v1::ListWebhookDeliveriesResponse {
            deliveries: deliveries
                .into_iter()
                .map(webhooks::delivery_view)
                .collect(),
        }))
    }

    async fn create_admin_token(
        &self,
        request: Request<v1::CreateAdminTokenRequest>,
    ) -> Result<Response<v1::CreateAdminTokenResponse>, Status> {
        let principal = self.authorize(&request).await?;
        let caller = request.extensions().get::<audit::Caller>().cloned();
        let req = request.into_inner();
        slug("name", &req.name, MAX_ADMIN_TOKEN_NAME_BYTES)?;
        let now = now_ms();
        let (role, expires_at_ms, scope) = token_terms(&req, now)?;
        // The role table lets only admins here; never grant more than the
        // caller holds all the same.
        if !role.permissions().iter().all(|p| principal.role.grants(*p)) {
            return Err(Status::permission_denied(format!(
                "{} {} has role {}; it cannot create a {role} token",
                principal.kind(),
                principal.name,
                principal.role
            )));
        }
        let secret = secret::generate(secret::ADMIN_TOKEN_PREFIX);
        let token = AdminTokenInfo {
            id: secret::short_id("adm-", 6),
            name: req.name,
            created_at_ms: now,
            revoked_at_ms: None,
            role: role.as_str().to_string(),
            expires_at_ms: Some(expires_at_ms),
            scope_json: scope.as_ref().map(Scope::to_json).unwrap_or_default(),
            created_by: principal.name.clone(),
        };
        let hash = secret::hash(&secret);
        // The person behind the call owns the token: their own calls and
        // their tokens' are one person's (four-eyes approval, the audit
        // log's `user` filter).
        let owner = principal.person();
        let created = self
            .storage
            .create_admin_token(&NewAdminToken {
                id: &token.id,
                secret_sha256: &hash,
                name: &token.name,
                created_at_ms: token.created_at_ms,
                role: &token.role,
                expires_at_ms: token.expires_at_ms,
                scope_json: &token.scope_json,
                created_by: &token.created_by,
                owner_id: owner.as_ref().map_or("", |o| o.id.as_str()),
                owner: owner.as_ref().map_or("", |o| o.name.as_str()),
            })
            .await?;
        if !created {
            return Err(Status::already_exists(format!(
                "an admin token named {} exists (or existed: names are not reused)",
                token.name
            )));
        }
        if let Some(caller) = caller {
            caller.set_target(serde_json::json!({
                "admin_token_id": token.id,
                "name": token.name,
                "role": token.role,
                "expires_at_unix_ms": expires_at_ms,
                "scope": scope.as_ref().map(|s| s.to_string()).unwrap_or_default(),
            }));
        }
        tracing::info!(admin_token_id = %token.id, name = %token.name, role = %token.role, "Admin token created.");
        Ok(Response::new(v1::CreateAdminTokenResponse {
            token: Some(admin_token_view(token)),
            secret,
        }))
    }

    async fn list_admin_tokens(
        &self,
        request: Request<v1::ListAdminTokensRequest>,
    ) -> Result<Response<v1::ListAdminTokensResponse>, Status> {
        self.authorize(&request).await?;
        let include_revoked = request.into_inner().include_revoked;
        let tokens = self.storage.list_admin_tokens(include_revoked).await?;
        Ok(Response::new(v1::ListAdminTokensResponse {
            tokens: tokens.into_iter().map(admin_token_view).collect(),
        }))
    }

    async fn revoke_admin_token(
        &self,
        request: Request<v1::RevokeAdminTokenRequest>,
    ) -> Result<Response<v1::AdminToken>, Status> {
        let caller = self.authorize(&request).await?;
        let id = request.into_inner().id;
        text("id", &id, true, 64)?;
        let token = match self.storage.revoke_admin_token(&id, now_ms()).await? {
            AdminTokenRevocation::Revoked(token) => token,
            AdminTokenRevocation::Unknown => {
                return Err(Status::not_found(format!("unknown admin token {id}")));
            }
        };
        tracing::warn!(
            admin_token_id = %token.id,
            name = %token.name,
            by = %caller.name,
            own = caller.id == token.id,
            "Admin token revoked."
        );
        Ok(Response::new(admin_token_view(token)))
    }

    async fn create_user(
        &self,
        request: Request<v1::CreateUserRequest>,
    ) -> Result<Response<v1::CreateUserResponse>, Status> {
        let caller = self.authorize(&request).await?;
        let audit = request.extensions().get::<audit::Caller>().cloned();
        let req = request.into_inner();
        user_name("name", &req.name)?;
        let role = parse_role(&req.role)?;
        let scope = parse_scope(&req.scope, role, "users")?;
        let now = now_ms();
        let (code, code_hash, expires_at_ms) = new_setup_code(now);
        let id = secret::short_id("usr-", 6);
        let scope_json = scope.as_ref().map(Scope::to_json).unwrap_or_default();
        let created = self
            .storage
            .create_user(&NewUser {
                id: &id,
                name: &req.name,
                role: role.as_str(),
                scope_json: &scope_json,
                created_by: &caller.name,
                created_at_ms: now,
                setup_code_sha256: &code_hash,
                setup_code_expires_at_ms: Some(expires_at_ms),
            })
            .await?;
        if !created {
            return Err(Status::already_exists(format!(
                "a user named {} exists (names are not reused; `posfleet user reset {}` gives \
                 them a new setup code)",
                req.name, req.name
            )));
        }
        if let Some(audit) = audit {
            audit.set_target(serde_json::json!({
                "user": req.name,
                "user_id": id,
                "role": role.as_str(),
                "scope": scope.as_ref().map(|s| s.to_string()).unwrap_or_default(),
            }));
        }
        tracing::info!(user = %req.name, user_id = %id, role = %role, by = %caller.name, "User created.");
        let user = self
            .storage
            .user_by_name(&req.name)
            .await?
            .ok_or_else(|| unknown_user(&req.name))?;
        Ok(Response::new(v1::CreateUserResponse {
            user: Some(user_view(user)),
            setup_code: code,
            setup_code_expires_at_unix_ms: expires_at_ms,
        }))
    }

    async fn list_users(
        &self,
        request: Request<v1::ListUsersRequest>,
    ) -> Result<Response<v1::ListUsersResponse>, Status> {
        self.authorize(&request).await?;
        let include_disabled = request.into_inner().include_disabled;
        let users = self.storage.list_users(include_disabled).await?;
        Ok(Response::new(v1::ListUsersResponse {
            users: users.into_iter().map(user_view).collect(),
        }))
    }

    async fn disable_user(
        &self,
        request: Request<v1::UserRequest>,
    ) -> Result<Response<v1::User>, Status> {
        let (caller, name) = self.user_call(request).await?;
        let user = self
            .storage
            .user_by_name(&name)
            .await?
            .ok_or_else(|| unknown_user(&name))?;
        // An admin who disables themselves (or whose own token does) ends
        // their own access by a slip: another admin does it.
        if caller.person_id() == user.id {
            return Err(Status::failed_precondition(format!(
                "{} cannot disable their own user; another admin must",
                user.name
            )));
        }
        let user = match self.storage.disable_user(&name, now_ms()).await? {
            UserChange::Changed(user) => user,
            UserChange::Unknown => return Err(unknown_user(&name)),
            UserChange::LastAdmin => {
                return Err(Status::failed_precondition(format!(
                    "{name} is the last enabled admin user; create (or enable) another admin \
                     first"
                )));
            }
        };
        tracing::warn!(user = %user.name, by = %caller.name, "User disabled; their sessions ended.");
        Ok(Response::new(user_view(*user)))
    }

    async fn enable_user(
        &self,
        request: Request<v1::UserRequest>,
    ) -> Result<Response<v1::User>, Status> {
        let (caller, name) = self.user_call(request).await?;
        let user = self
            .storage
            .enable_user(&name)
            .await?
            .ok_or_else(|| unknown_user(&name))?;
        tracing::info!(user = %user.name, by = %caller.name, "User enabled.");
        Ok(Response::new(user_view(user)))
    }

    async fn reset_user(
        &self,
        request: Request<v1::UserRequest>,
    ) -> Result<Response<v1::CreateUserResponse>, Status> {
        let (caller, name) = self.user_call(request).await?;
        let now = now_ms();
        let (code, code_hash, expires_at_ms) = new_setup_code(now);
        let user = self
            .storage
            .reset_user(&name, &code_hash, Some(expires_at_ms), now)
            .await?
            .ok_or_else(|| unknown_user(&name))?;
        tracing::warn!(user = %user.name, by = %caller.name, "User reset: password, TOTP and sessions gone; a new setup code issued.");
        Ok(Response::new(v1::CreateUserResponse {
            user: Some(user_view(user)),
            setup_code: code,
            setup_code_expires_at_unix_ms: expires_at_ms,
        }))
    }

    async fn unlock_user(
        &self,
        request: Request<v1::UserRequest>,
    ) -> Result<Response<v1::User>, Status> {
        let (caller, name) = self.user_call(request).await?;
        let user = self
            .storage
            .unlock_user(&name)
            .await?
            .ok_or_else(|| unknown_user(&name))?;
        tracing::info!(user = %user.name, by = %caller.name, "User unlocked.");
        Ok(Response::new(user_view(user)))
    }

    async fn update_user(
        &self,
        request: Request<v1::UpdateUserRequest>,
    ) -> Result<Response<v1::User>, Status> {
        let caller = self.authorize(&request).await?;
        let req = request.into_inner();
        user_name("name", &req.name)?;
        let user = self
            .storage
            .user_by_name(&req.name)
            .await?
            .ok_or_else(|| unknown_user(&req.name))?;
        // An admin who demotes themselves (or whose own token does) loses
        // the right to undo it: another admin does it.
        if caller.person_id() == user.id {
            return Err(Status::failed_precondition(format!(
                "{} cannot change their own role or scope; another admin must",
                user.name
            )));
        }
        let role = match req.role.as_str() {
            "" => parse_role(&user.role)?,
            name => parse_role(name)?,
        };
        if !req.scope.is_empty() && req.clear_scope {
            return Err(invalid("scope", "give a scope or clear it, not both"));
        }
        let scope_json = if req.clear_scope {
            String::new()
        } else if req.scope.is_empty() {
            user.scope_json.clone()
        } else {
            parse_scope(&req.scope, role, "users")?
                .as_ref()
                .map(Scope::to_json)
                .unwrap_or_default()
        };
        // A kept scope must still suit the new role.
        let kept = Scope::from_json(&scope_json)
            .map_err(|_| Status::internal("a stored scope does not parse"))?;
        if kept.is_some() && !role.may_be_scoped() {
            return Err(invalid(
                "scope",
                format!(
                    "{role} users cannot be scoped to stores; clear {}'s scope (--unscoped) to \
                     make them {role}",
                    user.name
                ),
            ));
        }
        let user = match self
            .storage
            .update_user(&req.name, role.as_str(), &scope_json)
            .await?
        {
            UserChange::Changed(user) => user,
            UserChange::Unknown => return Err(unknown_user(&req.name)),
            UserChange::LastAdmin => {
                return Err(Status::failed_precondition(format!(
                    "{} is the last enabled admin user; create (or enable) another admin first",
                    req.name
                )));
            }
        };
        tracing::warn!(user = %user.name, role = %user.role, by = %caller.name, "User's role or scope changed.");
        Ok(Response::new(user_view(*user)))
    }

    async fn get_certificate_authorities(
        &self,
        request: Request<v1::GetCertificateAuthoritiesRequest>,
    ) -> Result<Response<v1::CertificateAuthorities>, Status> {
        self.authorize(&request).await?;
        let tls = self.tls_or_refuse()?;
        Ok(Response::new(
            tls.authorities(&self.storage, Vec::new()).await?,
        ))
    }

    async fn rotate_certificate_authority(
        &self,
        request: Request<v1::RotateCertificateAuthorityRequest>,
    ) -> Result<Response<v1::CertificateAuthorities>, Status> {
        let caller = self.authorize(&request).await?;
        let tls = self.tls_or_refuse()?;
        let rotated = tls.tls.rotate().await?;
        tracing::warn!(active = %rotated.active.fingerprint(), by = %caller.name, "Fleet CA rotation started.");
        Ok(Response::new(
            tls.authorities(&self.storage, Vec::new()).await?,
        ))
    }

    async fn retire_certificate_authority(
        &self,
        request: Request<v1::RetireCertificateAuthorityRequest>,
    ) -> Result<Response<v1::CertificateAuthorities>, Status> {
        let caller = self.authorize(&request).await?;
        let tls = self.tls_or_refuse()?;
        let force = request.into_inner().force;
        let storage = self.storage.clone();
        let active = tls.tls.authorities().active.fingerprint();
        let renewable_after_ms = tls.renewable_after_ms();
        let (_, stranded) = tls
            .tls
            .retire(
                async || {
                    storage
                        .certificate_holders_not_of(&active, renewable_after_ms)
                        .await
                },
                force,
            )
            .await?;
        tracing::warn!(by = %caller.name, stranded = stranded.len(), "Previous fleet CA retired.");
        Ok(Response::new(
            tls.authorities(&self.storage, stranded).await?,
        ))
    }
}

impl AdminApi {
    fn tls_or_refuse(&self) -> Result<&AdminTls, Status> {
        self.tls.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this control plane serves plaintext: it has no CA (set tls_server_names)",
            )
        })
    }
}

/// The next message of an upload, or `DEADLINE_EXCEEDED` when none came
/// for [`STREAM_IDLE_TIMEOUT`]: an upload may take as long as the bundle
/// and the link need, but not stall.
async fn next_upload_message(
    stream: &mut tonic::Streaming<v1::PublishBundleRequest>,
) -> Result<Option<v1::PublishBundleRequest>, Status> {
    match tokio::time::timeout(STREAM_IDLE_TIMEOUT, stream.message()).await {
        Ok(message) => message,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no upload data for {} s; nothing was published",
            STREAM_IDLE_TIMEOUT.as_secs()
        ))),
    }
}

/// Checks a call's label changes (device or store labels): how many, and
/// each key and value.
fn label_changes(
    set: &std::collections::HashMap<String, String>,
    remove: &[String],
) -> Result<(), Status> {
    if set.len() + remove.len() > MAX_LABELS_PER_CALL {
        return Err(invalid(
            "set",
            format!("at most {MAX_LABELS_PER_CALL} labels per call"),
        ));
    }
    for (key, value) in set {
        label_key("set", key)?;
        text("set", value, false, 128)?;
    }
    for key in remove {
        label_key("remove", key)?;
    }
    Ok(())
}
