//! The audit log: who called which mutating `AdminService` method, on what,
//! when, from where, and how it ended.
//!
//! [`AuditLayer`] wraps the AdminService server. For every call it
//! authenticates the bearer token first, from the request's headers alone
//! ([`authenticate`]): a user's session (`pfs_…`, from
//! `SessionService.Login`) or an admin API token. A row names the caller
//! (`actor`), what they called with (`actor_kind`: `user` or `token`), for
//! a token the user it belongs to (`actor_owner`), and their role:
//!
//! * a call without a valid token is answered `UNAUTHENTICATED` by the layer
//!   itself, before its body is read or decoded, so no stranger can make the
//!   server parse a large message. If its method is mutating, it gets one
//!   row naming only the method and the peer (its target is never read).
//!   Those rows are rate-limited ([`UNAUTHENTICATED_BURST`], then one per
//!   [`UNAUTHENTICATED_REFILL`]; the next row written says how many were
//!   skipped) and only the newest are kept, at most
//!   [`UNAUTHENTICATED_KEPT`] rows and [`UNAUTHENTICATED_KEPT_BYTES`], so a
//!   flood cannot fill the disk (failed logins for unknown names share
//!   that bound: [`AuditLog::insert_bounded`]);
//! * an expired token or session, an ended session, or the session of a
//!   disabled user is refused the same way, saying why;
//! * an authenticated call beyond its caller's role (or, for a caller
//!   confined to some stores, a method over the whole fleet) is answered
//!   `PERMISSION_DENIED` by the layer, also before its body is read, and
//!   recorded (whatever its method) with the caller and role; see
//!   [`crate::authz`];
//! * an authenticated call reaches its handler with a [`Caller`] request
//!   extension. Mutating calls (every method but `Get*` and `List*`) are
//!   recorded:
//!   1. when the handler authorizes the call (`AdminApi::authorize`, which
//!      every handler runs first), a row is written *ahead*, with the
//!      method's target (its ids, from [`AuditTarget`]) and result
//!      `PENDING`. If that write fails the call is refused (UNAVAILABLE)
//!      before it changes anything: no mutation goes unrecorded;
//!   2. when the handler answers, the row gets the result: the
//!      `grpc-status` header of a trailers-only answer (how tonic sends a
//!      handler's error), or `OK` when the handler returned a message. (A
//!      message that then fails to encode is not seen: that status travels
//!      in trailers, after the layer has let the answer go.) A call cut
//!      short (client gone, server timeout) ends `CANCELLED`; a row left
//!      `PENDING` is a call whose end the server never saw (it crashed).
//!
//! Every row is bounded in bytes: the target is written ahead, before the
//! handler checks its request, so [`bounded_target`] cuts each string to
//! [`MAX_TARGET_STRING_BYTES`], each list or map to [`MAX_TARGET_ITEMS`]
//! and the whole target to [`MAX_TARGET_BYTES`]. Requests within the
//! documented limits are never cut; one beyond them is refused by its
//! handler (`INVALID_ARGUMENT`) and its row keeps the cut target. Audit
//! rows of authenticated callers are never dropped or pruned.
//!
//! A failure to write or complete a row is logged and counted in
//! `posfleet_audit_write_failures_total`.
//!
//! A handler that learns more about its target (the id it created, a
//! streamed header) adds it with [`Caller::set_target`].

use posfleet_proto::v1;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::Status;
use tonic::codegen::http;
use tonic::server::NamedService;

use crate::authz::{Credential, Owner, Principal, Role, Scope};
use crate::metrics::Metrics;
use crate::storage::{AUDIT_PENDING, NewAuditEntry, Storage, UNAUTHENTICATED_ACTOR};
use crate::{now_ms, secret};

/// Unauthenticated calls written at once before the rate limit applies.
pub const UNAUTHENTICATED_BURST: u32 = 60;
/// Then one more may be written per this much time (per replica).
pub const UNAUTHENTICATED_REFILL: Duration = Duration::from_secs(1);
/// Rows of unauthenticated calls kept; older ones are pruned.
pub const UNAUTHENTICATED_KEPT: u32 = 10_000;
/// Bytes of unauthenticated rows kept (text plus
/// [`crate::storage::AUDIT_ROW_OVERHEAD_BYTES`] per row); older ones are
/// pruned.
pub const UNAUTHENTICATED_KEPT_BYTES: u64 = 2 * 1024 * 1024;
/// Longest string kept in an audit target (the longest valid one, a webhook
/// URL of 2048 characters, fits).
pub const MAX_TARGET_STRING_BYTES: usize = 8 * 1024;
/// Most entries of one list or map kept in an audit target (64 label
/// changes per call are allowed).
pub const MAX_TARGET_ITEMS: usize = 64;
/// Largest audit target, as JSON; a larger one is replaced by its size.
pub const MAX_TARGET_BYTES: usize = 16 * 1024;
/// Pruning runs after this many rows of unauthenticated calls.
const PRUNE_EVERY: u64 = 100;
/// Method names longer than this (only a hostile client sends them) are cut.
const MAX_METHOD_CHARS: usize = 64;

/// Whether a method changes anything: everything but `Get*` and `List*`
/// (an unknown method counts as mutating, so it is recorded).
pub(crate) fn is_mutating(method: &str) -> bool {
    !(method.starts_with("Get") || method.starts_with("List"))
}

/// Checks `authorization: Bearer <credential>` at `now_ms` and returns who
/// holds it: a user's session (live, the user enabled; their role and scope
/// read from their row now, so a change applies at the next call), or an
/// admin API token (live, not expired, its owner an enabled admin). Counts refusals in
/// `posfleet_admin_auth_failures_total`.
pub(crate) async fn authenticate(
    storage: &Storage,
    metrics: &Metrics,
    headers: &http::HeaderMap,
    now_ms: i64,
) -> Result<Principal, Status> {
    let token = bearer(headers);
    let Some(token) = token else {
        metrics.admin_auth_failures.inc();
        return Err(Status::unauthenticated(
            "missing admin API token: pass --token or set POSFLEET_TOKEN, or log in with \
             `posfleet login`",
        ));
    };
    let principal = if token.starts_with(secret::SESSION_TOKEN_PREFIX) {
        session_principal(storage, token, now_ms).await
    } else {
        token_principal(storage, token, now_ms).await
    };
    if matches!(&principal, Err(status) if status.code() == tonic::Code::Unauthenticated) {
        metrics.admin_auth_failures.inc();
    }
    principal
}

/// The token of `authorization: Bearer <token>`.
pub(crate) fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(posfleet_proto::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// A stored role and scope, checked: stored by this code from checked
/// values, so a row that does not parse was changed by hand, and is
/// refused.
fn role_and_scope(
    role: &str,
    scope_json: &str,
    what: &str,
) -> Result<(Role, Option<Scope>), Status> {
    match (Role::parse(role), Scope::from_json(scope_json)) {
        (Some(role), Ok(scope)) => Ok((role, scope)),
        _ => {
            tracing::error!(caller = %what, role = %role, "A caller has an unknown role or a bad scope.");
            Err(Status::permission_denied(format!(
                "{what} has an unknown role or scope; see the control plane log"
            )))
        }
    }
}

async fn token_principal(storage: &Storage, token: &str, now_ms: i64) -> Result<Principal, Status> {
    let Some(record) = storage.admin_token_by_hash(&secret::hash(token)).await? else {
        return Err(Status::unauthenticated("admin API token is not valid"));
    };
    if let Some(expired) = record.expires_at_ms.filter(|at| *at <= now_ms) {
        return Err(Status::unauthenticated(format!(
            "admin API token {} expired at {}; ask an admin for a new one",
            record.name,
            crate::format_ms(expired)
        )));
    }
    if let Some(at) = record.owner_disabled_at_ms {
        return Err(Status::unauthenticated(format!(
            "admin API token {} belongs to user {}, who was disabled at {}; an admin makes a \
             new token if it is still needed",
            record.name,
            record.owner,
            crate::format_ms(at)
        )));
    }
    // Only admins make tokens: one whose maker is no longer an admin goes
    // with the role.
    if record
        .owner_role
        .as_deref()
        .is_some_and(|role| role != Role::Admin.as_str())
    {
        return Err(Status::unauthenticated(format!(
            "admin API token {} belongs to user {}, who is no longer an admin; an admin makes \
             a new token if it is still needed",
            record.name, record.owner
        )));
    }
    let what = format!("admin API token {}", record.name);
    let (role, scope) = role_and_scope(&record.role, &record.scope_json, &what)?;
    let owner = (!record.owner_id.is_empty()).then_some(Owner {
        id: record.owner_id,
        name: record.owner,
    });
    Ok(Principal {
        id: record.id,
        name: record.name,
        role,
        scope,
        credential: Credential::Token { owner },
    })
}

async fn session_principal(
    storage: &Storage,
    token: &str,
    now_ms: i64,
) -> Result<Principal, Status> {
    let Some(session) = storage.session_by_hash(&secret::hash(token)).await? else {
        return Err(Status::unauthenticated(
            "session is not valid; run `posfleet login`",
        ));
    };
    if session.revoked_at_ms.is_some() {
        return Err(Status::unauthenticated(
            "session ended (logged out or revoked); run `posfleet login`",
        ));
    }
    if session.expires_at_ms <= now_ms {
        return Err(Status::unauthenticated(format!(
            "session expired at {}; run `posfleet login`",
            crate::format_ms(session.expires_at_ms)
        )));
    }
    let user = session.user;
    if let Some(at) = user.disabled_at_ms {
        return Err(Status::unauthenticated(format!(
            "user {} was disabled at {}; ask an admin",
            user.name,
            crate::format_ms(at)
        )));
    }
    let what = format!("user {}", user.name);
    let (role, scope) = role_and_scope(&user.role, &user.scope_json, &what)?;
    Ok(Principal {
        id: user.id,
        name: user.name,
        role,
        scope,
        credential: Credential::Session,
    })
}

/// What an audit entry says a call was about: the main ids and arguments of
/// its request, as JSON (`Null` for reads, which are not recorded). Every
/// request type an AdminService handler authorizes implements it.
pub(crate) trait AuditTarget {
    fn audit_target(&self) -> Value;
}

/// The authenticated caller of one AdminService call, put in the request's
/// extensions by [`AuditLayer`].
#[derive(Clone)]
pub(crate) struct Caller {
    identity: Principal,
    /// Set for mutating methods.
    record: Option<Arc<CallRecord>>,
}

impl Caller {
    /// Who calls, once the call is in the audit log (written ahead, with
    /// `target`). Refuses the call if that write fails.
    pub async fn authorize(&self, target: impl FnOnce() -> Value) -> Result<Principal, Status> {
        if let Some(record) = &self.record {
            record.set_target(target());
            record.write_ahead().await?;
        }
        Ok(self.identity.clone())
    }

    /// Replaces the call's target in its audit entry (written when the call
    /// ends).
    pub fn set_target(&self, target: Value) {
        if let Some(record) = &self.record {
            record.set_target(target);
        }
    }
}

/// `value` with every string cut to [`MAX_TARGET_STRING_BYTES`] (on a
/// character boundary, ending in `…`), every list and map to its first
/// [`MAX_TARGET_ITEMS`] entries, and, if its JSON is still over
/// [`MAX_TARGET_BYTES`], replaced by `{"target_bytes": <size>}`.
pub(crate) fn bounded_target(value: Value) -> Value {
    fn cut(text: &str) -> String {
        if text.len() <= MAX_TARGET_STRING_BYTES {
            return text.to_string();
        }
        let mut end = MAX_TARGET_STRING_BYTES - '…'.len_utf8();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &text[..end])
    }
    fn bound(value: Value) -> Value {
        match value {
            Value::String(text) => Value::String(cut(&text)),
            Value::Array(items) => Value::Array(
                items
                    .into_iter()
                    .take(MAX_TARGET_ITEMS)
                    .map(bound)
                    .collect(),
            ),
            Value::Object(fields) => Value::Object(
                fields
                    .into_iter()
                    .take(MAX_TARGET_ITEMS)
                    .map(|(key, value)| (cut(&key), bound(value)))
                    .collect(),
            ),
            other => other,
        }
    }
    let bounded = bound(value);
    let bytes = bounded.to_string().len();
    if bytes > MAX_TARGET_BYTES {
        json!({ "target_bytes": bytes })
    } else {
        bounded
    }
}

/// The audit log's writer side, shared by every call (the admin calls'
/// layer and the session service).
#[derive(Clone)]
pub(crate) struct AuditLog {
    storage: Storage,
    metrics: Metrics,
    limiter: Arc<Mutex<Limiter>>,
}

/// A token bucket for rows of unauthenticated calls.
struct Limiter {
    tokens: f64,
    last: Instant,
    /// Rows skipped since the last one written.
    suppressed: u64,
    /// Rows written, to prune every `PRUNE_EVERY`.
    written: u64,
}

impl Limiter {
    fn new() -> Limiter {
        Limiter {
            tokens: f64::from(UNAUTHENTICATED_BURST),
            last: Instant::now(),
            suppressed: 0,
            written: 0,
        }
    }

    /// `Some(skipped since the last row)` if a row may be written now.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        let refill =
            now.duration_since(self.last).as_secs_f64() / UNAUTHENTICATED_REFILL.as_secs_f64();
        self.tokens = (self.tokens + refill).min(f64::from(UNAUTHENTICATED_BURST));
        self.last = now;
        if self.tokens < 1.0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1.0;
        self.written += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl AuditLog {
    pub fn new(storage: Storage, metrics: Metrics) -> AuditLog {
        AuditLog {
            storage,
            metrics,
            limiter: Arc::new(Mutex::new(Limiter::new())),
        }
    }

    /// Writes a row anyone can cause (its `bounded` is set): within the
    /// rate limit (the next row written says how many were skipped), and
    /// pruning the oldest of such rows now and then.
    pub async fn insert_bounded(&self, mut entry: NewAuditEntry) {
        entry.bounded = true;
        let (admitted, prune) = {
            let mut limiter = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
            let admitted = limiter.admit(Instant::now());
            let prune = admitted.is_some() && limiter.written.is_multiple_of(PRUNE_EVERY);
            (admitted, prune)
        };
        match admitted {
            None => {
                self.metrics.audit_suppressed.inc();
                return;
            }
            Some(0) => {}
            Some(skipped) => {
                let mut value: Value =
                    serde_json::from_str(&entry.target_json).unwrap_or_else(|_| json!({}));
                if let Some(object) = value.as_object_mut() {
                    object.insert("suppressed_before".into(), json!(skipped));
                }
                entry.target_json = value.to_string();
            }
        }
        self.insert(entry).await;
        if prune
            && let Err(error) = self
                .storage
                .prune_bounded_audit_entries(UNAUTHENTICATED_KEPT, UNAUTHENTICATED_KEPT_BYTES)
                .await
        {
            tracing::warn!(%error, "Cannot prune bounded audit entries.");
        }
    }

    fn write_failed(&self, error: &crate::error::Error, what: &str, method: &str) {
        self.metrics.audit_write_failures.inc();
        tracing::error!(%error, method, "Cannot {what} an audit entry.");
    }

    /// Writes a row; its seq, or `None` if the write failed (logged and
    /// counted).
    pub async fn insert(&self, entry: NewAuditEntry) -> Option<u64> {
        match self.storage.insert_audit_entry(&entry).await {
            Ok(seq) => Some(seq),
            Err(error) => {
                self.write_failed(&error, "write", &entry.method);
                None
            }
        }
    }
}

#[derive(Default)]
struct CallState {
    target: Option<Value>,
    /// The row written ahead.
    seq: Option<u64>,
    /// The target changed after the row was written ahead.
    target_changed: bool,
    finished: bool,
}

/// One mutating call being recorded.
struct CallRecord {
    log: AuditLog,
    at_ms: i64,
    method: String,
    peer_address: String,
    actor: String,
    /// The caller's role; empty when unauthenticated.
    role: String,
    /// `user`, `token` or empty (unauthenticated).
    actor_kind: &'static str,
    /// For a token: the user it belongs to.
    actor_owner: String,
    state: Mutex<CallState>,
}

impl CallRecord {
    fn state(&self) -> std::sync::MutexGuard<'_, CallState> {
        // The lock is never held across an await nor while anything can
        // panic, so it cannot be poisoned; recover the data anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_target(&self, target: Value) {
        let target = bounded_target(target);
        let mut state = self.state();
        state.target_changed = state.seq.is_some();
        state.target = Some(target);
    }

    fn target_json(target: Option<&Value>) -> String {
        match target {
            None | Some(Value::Null) => "{}".to_string(),
            Some(value) => value.to_string(),
        }
    }

    async fn write_ahead(&self) -> Result<(), Status> {
        let entry = self.entry(AUDIT_PENDING);
        match self.log.insert(entry).await {
            Some(seq) => {
                let mut state = self.state();
                state.seq = Some(seq);
                state.target_changed = false;
                Ok(())
            }
            None => Err(Status::unavailable(
                "cannot write the audit log, so nothing was changed; see the control plane log",
            )),
        }
    }

    /// Records the result, once.
    async fn finish(&self, result: &str) {
        let (seq, target) = {
            let mut state = self.state();
            if std::mem::replace(&mut state.finished, true) {
                return;
            }
            let target = (state.seq.is_none() || state.target_changed)
                .then(|| Self::target_json(state.target.as_ref()));
            (state.seq, target)
        };
        let log = &self.log;
        match seq {
            Some(seq) => {
                match log
                    .storage
                    .finish_audit_entry(seq, result, target.as_deref(), now_ms())
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => log.write_failed(
                        &crate::error::Error::Corrupt(format!("audit entry {seq} is missing")),
                        "complete",
                        &self.method,
                    ),
                    Err(error) => log.write_failed(&error, "complete", &self.method),
                }
            }
            None => {
                let mut entry = self.entry(result);
                entry.target_json = target.unwrap_or_else(|| "{}".to_string());
                if self.actor == UNAUTHENTICATED_ACTOR {
                    log.insert_bounded(entry).await;
                } else {
                    log.insert(entry).await;
                }
            }
        }
    }

    /// The row, with `result` and the target as set now.
    fn entry(&self, result: &str) -> NewAuditEntry {
        NewAuditEntry {
            at_ms: self.at_ms,
            actor: self.actor.clone(),
            method: self.method.clone(),
            target_json: Self::target_json(self.state().target.as_ref()),
            peer_address: self.peer_address.clone(),
            result: result.to_string(),
            role: self.role.clone(),
            actor_kind: self.actor_kind.to_string(),
            actor_owner: self.actor_owner.clone(),
            bounded: false,
        }
    }
}

/// Records a call that ends without an answer (dropped by a timeout or a
/// client gone) as `CANCELLED`.
struct CancelGuard(Option<Arc<CallRecord>>);

impl CancelGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(record) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move { record.finish("CANCELLED").await });
        }
    }
}

/// An entry as the API shows it.
pub(crate) fn entry_view(e: crate::storage::AuditRecord) -> v1::AuditEntry {
    v1::AuditEntry {
        seq: e.seq,
        at_unix_ms: e.at_ms,
        actor: e.actor,
        method: e.method,
        target_json: e.target_json,
        peer_address: e.peer_address,
        result: e.result,
        role: e.role,
        actor_kind: e.actor_kind,
        actor_owner: e.actor_owner,
    }
}

/// The canonical name of a gRPC status code, as the audit log records it.
pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The result of an answer: tonic sends a handler's error as a
/// trailers-only response, whose `grpc-status` is a header; an answer
/// without one carries the handler's message.
fn result_of(headers: &http::HeaderMap) -> &'static str {
    match headers.get("grpc-status") {
        None => "OK",
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .map(|n| code_name(tonic::Code::from_i32(n)))
            .unwrap_or("UNKNOWN"),
    }
}

/// `/posfleet.v1.AdminService/CreateStore` → `CreateStore`.
fn method_of(path: &str) -> String {
    let method = path.rsplit('/').next().unwrap_or_default();
    method.chars().take(MAX_METHOD_CHARS).collect()
}

/// Wraps the AdminService server; see the module documentation.
#[derive(Clone)]
pub(crate) struct AuditLayer {
    log: AuditLog,
}

impl AuditLayer {
    pub fn new(log: AuditLog) -> AuditLayer {
        AuditLayer { log }
    }
}

impl<S> tower::Layer<S> for AuditLayer {
    type Service = AuditService<S>;

    fn layer(&self, inner: S) -> AuditService<S> {
        AuditService {
            inner,
            log: self.log.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct AuditService<S> {
    inner: S,
    log: AuditLog,
}

impl<S: NamedService> NamedService for AuditService<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AuditService<S>
where
    S: tower::Service<
            http::Request<ReqBody>,
            Response = http::Response<ResBody>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let log = self.log.clone();
        Box::pin(async move {
            let at_ms = now_ms();
            let method = method_of(request.uri().path());
            let auth = authenticate(&log.storage, &log.metrics, request.headers(), at_ms).await;
            let peer_address = crate::tls::remote_address(request.extensions())
                .map(|a| a.to_string())
                .unwrap_or_default();
            let record = |caller: Option<&Principal>| {
                Arc::new(CallRecord {
                    log: log.clone(),
                    at_ms,
                    method: method.clone(),
                    peer_address: peer_address.clone(),
                    actor: caller.map_or(UNAUTHENTICATED_ACTOR.to_string(), |c| c.name.clone()),
                    role: caller
                        .map(|c| c.role.as_str().to_string())
                        .unwrap_or_default(),
                    actor_kind: caller.map_or("", |c| c.kind()),
                    actor_owner: caller
                        .and_then(|c| c.owner())
                        .map(|owner| owner.name.clone())
                        .unwrap_or_default(),
                    state: Mutex::new(CallState::default()),
                })
            };
            let identity = match auth {
                Ok(identity) => identity,
                Err(status) => {
                    // Answered here: the body is never read, and the row
                    // names only the method and the peer.
                    if is_mutating(&method) {
                        record(None).finish(code_name(status.code())).await;
                    }
                    return Ok(status.into_http());
                }
            };
            if let Err(why) = identity.may_call(&method) {
                // Also before the body is read; recorded whatever the
                // method, as the caller is known.
                log.metrics.admin_permission_denied.inc();
                record(Some(&identity))
                    .finish(code_name(tonic::Code::PermissionDenied))
                    .await;
                return Ok(Status::permission_denied(why).into_http());
            }
            let record = is_mutating(&method).then(|| record(Some(&identity)));
            request.extensions_mut().insert(Caller {
                identity,
                record: record.clone(),
            });
            let guard = CancelGuard(record.clone());
            let response = inner.call(request).await?;
            if let Some(record) = record {
                record.finish(result_of(response.headers())).await;
            }
            guard.disarm();
            Ok(response)
        })
    }
}

// ----- what each request is about -----

/// Reads carry no audit target.
macro_rules! untargeted {
    ($($t:ty),* $(,)?) => {
        $(impl AuditTarget for $t {
            fn audit_target(&self) -> Value {
                Value::Null
            }
        })*
    };
}

untargeted!(
    v1::ListStoresRequest,
    v1::GetStoreRequest,
    v1::ListEnrollmentTokensRequest,
    v1::ListDevicesRequest,
    v1::GetDeviceRequest,
    v1::GetRepositoryRequest,
    v1::ListBundlesRequest,
    v1::DownloadBundleRequest,
    v1::ListRolloutsRequest,
    v1::ListHeldAssignmentsRequest,
    v1::ListEventsRequest,
    v1::ListAuditEntriesRequest,
    v1::ListWebhooksRequest,
    v1::ListWebhookDeliveriesRequest,
    v1::ListAdminTokensRequest,
    v1::ListUsersRequest,
    v1::GetCertificateAuthoritiesRequest,
    v1::GetDeviceLogsRequest,
    // The header comes in the stream: the handler sets the target.
    tonic::Streaming<v1::PublishBundleRequest>,
);

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl AuditTarget for v1::CreateStoreRequest {
    fn audit_target(&self) -> Value {
        json!({"store_id": self.id, "name": self.name, "time_zone": self.time_zone})
    }
}

impl AuditTarget for v1::CreateEnrollmentTokenRequest {
    fn audit_target(&self) -> Value {
        json!({
            "store_id": self.store_id,
            "uses": self.uses,
            "expires_in_seconds": self.expires_in_seconds,
        })
    }
}

impl AuditTarget for v1::RevokeEnrollmentTokenRequest {
    fn audit_target(&self) -> Value {
        json!({"token_id": self.id})
    }
}

impl AuditTarget for v1::SetDeviceLabelsRequest {
    fn audit_target(&self) -> Value {
        json!({"device_id": self.device_id, "set": self.set, "remove": self.remove})
    }
}

impl AuditTarget for v1::RevokeDeviceRequest {
    fn audit_target(&self) -> Value {
        json!({"device_id": self.device_id, "reason": self.reason})
    }
}

impl AuditTarget for v1::RequestDeviceLogsRequest {
    fn audit_target(&self) -> Value {
        json!({
            "device_id": self.device_id,
            "since_seconds": self.since_seconds,
            "max_lines": self.max_lines,
            "grep": self.grep,
            "follow": self.follow,
        })
    }
}

impl AuditTarget for v1::AssignBundleRequest {
    fn audit_target(&self) -> Value {
        use v1::assign_bundle_request::Target;
        let mut target = json!({
            "bundle": self.name,
            "version": self.version,
            "download_ahead": self.download_ahead.unwrap_or(true),
            "emergency": self.emergency,
        });
        let (key, id) = match &self.target {
            Some(Target::DeviceId(id)) => ("device_id", id),
            Some(Target::StoreId(id)) => ("store_id", id),
            None => return target,
        };
        if let Some(object) = target.as_object_mut() {
            object.insert(key.into(), json!(id));
        }
        target
    }
}

impl AuditTarget for v1::HeldAssignmentRequest {
    fn audit_target(&self) -> Value {
        json!({"assignment_id": self.id})
    }
}

impl AuditTarget for v1::SetMaintenanceWindowRequest {
    fn audit_target(&self) -> Value {
        json!({
            "store_id": self.store_id,
            "maintenance_window": self.maintenance_window.as_ref().map(|w| json!({
                "start_minute": w.start_minute,
                "duration_minutes": w.duration_minutes,
            })),
        })
    }
}

impl AuditTarget for v1::InitRepositoryRequest {
    fn audit_target(&self) -> Value {
        json!({
            "root_sha256": sha256_hex(&self.root_json),
            "targets_sha256": sha256_hex(&self.targets_json),
        })
    }
}

impl AuditTarget for v1::UpdateRootRequest {
    fn audit_target(&self) -> Value {
        json!({"root_sha256": sha256_hex(&self.root_json)})
    }
}

impl AuditTarget for v1::CreateRolloutRequest {
    fn audit_target(&self) -> Value {
        json!({"bundle": self.bundle_name, "version": self.bundle_version})
    }
}

impl AuditTarget for v1::RolloutRequest {
    fn audit_target(&self) -> Value {
        json!({"rollout_id": self.id, "reason": self.reason})
    }
}

impl AuditTarget for v1::SetStoreLabelsRequest {
    fn audit_target(&self) -> Value {
        json!({"store_id": self.store_id, "set": self.set, "remove": self.remove})
    }
}

impl AuditTarget for v1::AddWebhookRequest {
    fn audit_target(&self) -> Value {
        json!({"url": self.url, "events": self.events})
    }
}

impl AuditTarget for v1::RemoveWebhookRequest {
    fn audit_target(&self) -> Value {
        json!({"webhook_id": self.id})
    }
}

impl AuditTarget for v1::CreateAdminTokenRequest {
    fn audit_target(&self) -> Value {
        json!({
            "name": self.name,
            "role": self.role,
            "expires_in_seconds": self.expires_in_seconds,
            "scope": self.scope,
        })
    }
}

impl AuditTarget for v1::RevokeAdminTokenRequest {
    fn audit_target(&self) -> Value {
        json!({"admin_token_id": self.id})
    }
}

impl AuditTarget for v1::CreateUserRequest {
    fn audit_target(&self) -> Value {
        json!({"user": self.name, "role": self.role, "scope": self.scope})
    }
}

impl AuditTarget for v1::UserRequest {
    fn audit_target(&self) -> Value {
        json!({"user": self.name})
    }
}

impl AuditTarget for v1::UpdateUserRequest {
    fn audit_target(&self) -> Value {
        json!({
            "user": self.name,
            "role": self.role,
            "scope": self.scope,
            "clear_scope": self.clear_scope,
        })
    }
}

impl AuditTarget for v1::RotateCertificateAuthorityRequest {
    fn audit_target(&self) -> Value {
        json!({})
    }
}

impl AuditTarget for v1::RetireCertificateAuthorityRequest {
    fn audit_target(&self) -> Value {
        json!({"force": self.force})
    }
}

/// The target of a publish, once its header is read.
pub(crate) fn publish_target(header: &v1::PublishBundleHeader) -> Value {
    json!({
        "target": header.target,
        "targets_sha256": sha256_hex(&header.targets_json),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_not_mutations() {
        for (method, mutating) in [
            ("CreateStore", true),
            ("AssignBundle", true),
            ("PublishBundle", true),
            ("AddWebhook", true),
            ("ListStores", false),
            ("GetDevice", false),
            ("ListAuditEntries", false),
            ("Bogus", true),
        ] {
            assert_eq!(is_mutating(method), mutating, "{method}");
        }
        assert_eq!(
            method_of("/posfleet.v1.AdminService/CreateStore"),
            "CreateStore"
        );
        assert_eq!(method_of(&format!("/x/{}", "A".repeat(500))).len(), 64);
    }

    #[test]
    fn audit_targets_are_bounded_but_valid_ones_are_kept_whole() {
        // Within the limits: unchanged.
        let url = format!("http://h/{}", "é".repeat(2000));
        let valid = json!({"url": url, "events": ["rollout.*"], "n": 3});
        assert_eq!(bounded_target(valid.clone()), valid);
        // An 8 MiB reason is cut on a character boundary, marked.
        let huge = json!({"device_id": "d", "reason": "é".repeat(4 * 1024 * 1024)});
        let cut = bounded_target(huge);
        let reason = cut["reason"].as_str().unwrap();
        assert!(reason.len() <= MAX_TARGET_STRING_BYTES && reason.ends_with('…'));
        assert_eq!(cut["device_id"], "d");
        // Long lists and maps keep their first items.
        let list: Vec<u32> = (0..10_000).collect();
        let cut = bounded_target(json!({ "remove": list }));
        assert_eq!(cut["remove"].as_array().unwrap().len(), MAX_TARGET_ITEMS);
        // Whatever survives must fit the target bound, or only its size stays.
        let many: serde_json::Map<String, Value> = (0..64)
            .map(|i| (format!("k{i}"), json!("v".repeat(8 * 1024))))
            .collect();
        let cut = bounded_target(Value::Object(many));
        assert!(cut["target_bytes"].as_u64().unwrap() > MAX_TARGET_BYTES as u64);
        assert!(cut.to_string().len() <= MAX_TARGET_BYTES);
    }

    #[test]
    fn results_come_from_the_status_header() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(result_of(&headers), "OK");
        headers.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(result_of(&headers), "NOT_FOUND");
        headers.insert("grpc-status", "16".parse().unwrap());
        assert_eq!(result_of(&headers), "UNAUTHENTICATED");
        headers.insert("grpc-status", "x".parse().unwrap());
        assert_eq!(result_of(&headers), "UNKNOWN");
    }

    #[test]
    fn unauthenticated_rows_are_rate_limited_and_count_what_they_skip() {
        let mut limiter = Limiter::new();
        let start = limiter.last;
        for _ in 0..UNAUTHENTICATED_BURST {
            assert_eq!(limiter.admit(start), Some(0));
        }
        assert_eq!(limiter.admit(start), None);
        assert_eq!(limiter.admit(start), None);
        // One more token a refill later, and it reports the two skipped.
        let later = start + UNAUTHENTICATED_REFILL;
        assert_eq!(limiter.admit(later), Some(2));
        assert_eq!(limiter.admit(later), None);
        // Idle for long: back to a full burst, not more.
        let much_later = later + UNAUTHENTICATED_REFILL * 10_000;
        for _ in 0..UNAUTHENTICATED_BURST {
            assert!(limiter.admit(much_later).is_some());
        }
        assert_eq!(limiter.admit(much_later), None);
    }
}
