//! `SessionService`: operators log in with their password and a second
//! factor and get a session token; new (and reset) users set themselves up
//! first, from a one-time setup code.
//!
//! * `Login`: password (Argon2id, `crate::password`) and a TOTP code
//!   (`posfleet_proto::totp`: SHA-1, 6 digits, 30 s, one step of skew) or a
//!   recovery code. A TOTP code works once: its step must be later than the
//!   last step accepted for the user (stored, so every replica agrees). A
//!   user pending setup passes their setup code as the password and no
//!   code, and gets a `SetupChallenge`: a fresh TOTP secret and a setup
//!   token valid for [`SETUP_CHALLENGE_LIFETIME_MS`].
//! * `CompleteSetup`: the new password and a current code for the
//!   challenge's secret; consumes the setup code, stores
//!   [`RECOVERY_CODES`] recovery codes (returned once) and opens a session.
//! * `Logout`: ends the bearer's session.
//!
//! Limits: every call counts against its source address's budget
//! (`login_rate_per_minute`, in memory per replica; over it,
//! `RESOURCE_EXHAUSTED`), and `login_max_failures` failed logins in a row
//! lock the user for `login_lockout_seconds` (in the database: all replicas
//! share it), during which even the right password is refused.
//! An unknown user and a wrong password get the same answer after the
//! same work (a dummy hash is verified), so no one learns which names exist.
//!
//! Every attempt is in the audit log (`actor_kind` `session`, the user
//! name as typed, cut to [`MAX_ACTOR_BYTES`], the user's role when known,
//! the peer address, the reason of a failure in the target) and counted in
//! `posfleet_logins_total{result}`. Rows that anyone can cause without
//! knowing a user's name or being past a lockout (unknown names, attempts
//! during a lockout, malformed requests) are bounded like unauthenticated
//! admin calls (`AuditLog::insert_bounded`).

use posfleet_proto::totp;
use posfleet_proto::v1::{self, session_service_server::SessionService};
use rand::RngCore;
use serde_json::Value;
use std::sync::{Arc, Weak};
use tonic::{Request, Response, Status};

use crate::audit::{AuditLog, code_name};
use crate::authz::Scope;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::password;
use crate::ratelimit::{HOUSEKEEPING_INTERVAL, Peer, PeerLimit};
use crate::storage::{FinishedSetup, NewAuditEntry, NewSession, Storage, UserRecord};
use crate::{format_ms, now_ms, secret};

/// Largest `SessionService` message: names, passwords and codes.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024;
/// How long a setup challenge may be answered.
pub const SETUP_CHALLENGE_LIFETIME_MS: i64 = 10 * 60 * 1000;
/// Recovery codes a setup hands out.
pub const RECOVERY_CODES: usize = 10;
/// Groups of four characters in a recovery code (100 random bits).
const RECOVERY_CODE_GROUPS: usize = 5;
/// Longest user name kept in an audit row (names are at most 64 bytes).
pub const MAX_ACTOR_BYTES: usize = 64;
/// Longest user name, code or token a request may carry.
const MAX_FIELD_BYTES: usize = 256;
/// A code this many steps before the accepted window is "expired" (the
/// authenticator's clock is behind, or it was typed late) rather than
/// "wrong".
const STALE_STEPS: u64 = 10;

/// Every value of the `result` label of `posfleet_logins_total`.
pub const LOGIN_RESULTS: [&str; 15] = [
    "ok",
    "setup_started",
    "setup_completed",
    "logout",
    "wrong_password",
    "wrong_code",
    "replayed_code",
    "expired_code",
    "locked",
    "disabled",
    "unknown_user",
    "setup_expired",
    "invalid",
    "rate_limited",
    "error",
];

/// The login settings of the control plane's configuration.
#[derive(Debug, Clone, Copy)]
pub struct SessionSettings {
    pub lifetime_seconds: u64,
    pub max_failures: u32,
    pub lockout_seconds: u64,
    pub rate_per_minute: u32,
    pub max_peers: u32,
}

impl SessionSettings {
    pub fn from_config(config: &Config) -> SessionSettings {
        SessionSettings {
            lifetime_seconds: config.session_lifetime_seconds,
            max_failures: config.login_max_failures,
            lockout_seconds: config.login_lockout_seconds,
            rate_per_minute: config.login_rate_per_minute,
            max_peers: config.rate_limit_max_peers,
        }
    }
}

/// Why an attempt failed: its audit reason and metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    WrongPassword,
    WrongCode,
    ReplayedCode,
    ExpiredCode,
    Locked,
    Disabled,
    UnknownUser,
    /// A setup code, challenge or token that expired, or is unknown.
    SetupExpired,
    Invalid,
    Internal,
}

impl Failure {
    fn reason(self) -> &'static str {
        match self {
            Failure::WrongPassword => "wrong password",
            Failure::WrongCode => "wrong code",
            Failure::ReplayedCode => "replayed code",
            Failure::ExpiredCode => "expired code",
            Failure::Locked => "locked",
            Failure::Disabled => "disabled",
            Failure::UnknownUser => "unknown user",
            Failure::SetupExpired => "setup expired",
            Failure::Invalid => "invalid request",
            Failure::Internal => "internal error",
        }
    }

    fn metric(self) -> &'static str {
        match self {
            Failure::WrongPassword => "wrong_password",
            Failure::WrongCode => "wrong_code",
            Failure::ReplayedCode => "replayed_code",
            Failure::ExpiredCode => "expired_code",
            Failure::Locked => "locked",
            Failure::Disabled => "disabled",
            Failure::UnknownUser => "unknown_user",
            Failure::SetupExpired => "setup_expired",
            Failure::Invalid => "invalid",
            Failure::Internal => "error",
        }
    }

    /// Whether anyone can cause it at will (its rows are bounded).
    fn bounded(self) -> bool {
        matches!(
            self,
            Failure::UnknownUser | Failure::Locked | Failure::Invalid | Failure::SetupExpired
        )
    }
}

/// A refused attempt: why, and what the caller is told.
struct Refusal {
    failure: Failure,
    status: Status,
}

impl Refusal {
    fn new(failure: Failure, status: Status) -> Refusal {
        Refusal { failure, status }
    }
}

impl From<crate::error::Error> for Refusal {
    fn from(error: crate::error::Error) -> Refusal {
        Refusal::new(Failure::Internal, error.into())
    }
}

/// What the audit row of one attempt says, filled in as it goes.
struct Attempt {
    method: &'static str,
    at_ms: i64,
    /// The user name as typed (cut), or the user's once known.
    actor: String,
    /// The user's role, once known.
    role: String,
    peer_address: String,
    /// Details for the row's target (the session's id, how it went).
    target: serde_json::Map<String, Value>,
}

impl Attempt {
    fn new(method: &'static str, typed_user: &str, peer_address: String) -> Attempt {
        Attempt {
            method,
            at_ms: now_ms(),
            actor: cut(typed_user, MAX_ACTOR_BYTES),
            role: String::new(),
            peer_address,
            target: serde_json::Map::new(),
        }
    }

    fn user(&mut self, user: &UserRecord) {
        self.actor = user.name.clone();
        self.role = user.role.clone();
    }

    fn note(&mut self, key: &str, value: impl Into<Value>) {
        self.target.insert(key.into(), value.into());
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

pub struct SessionApi {
    storage: Storage,
    metrics: Metrics,
    audit: AuditLog,
    settings: SessionSettings,
    /// Login calls per source address.
    limit: Arc<PeerLimit>,
}

impl SessionApi {
    /// Starts the rate limit's housekeeping too (it ends with the service).
    pub fn new(
        storage: Storage,
        metrics: Metrics,
        audit: AuditLog,
        settings: SessionSettings,
    ) -> SessionApi {
        let limit = Arc::new(PeerLimit::new(
            "login attempts",
            settings.rate_per_minute,
            settings.rate_per_minute,
            settings.max_peers,
        ));
        let weak: Weak<PeerLimit> = Arc::downgrade(&limit);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HOUSEKEEPING_INTERVAL).await;
                let Some(limit) = weak.upgrade() else { return };
                limit.housekeeping();
            }
        });
        SessionApi {
            storage,
            metrics,
            audit,
            settings,
            limit,
        }
    }

    /// The caller's address, charged one attempt.
    fn charge<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let address = crate::tls::remote_address(request.extensions());
        if let Err(status) = self.limit.charge(Peer::of(address.map(|a| a.ip()))) {
            self.count("rate_limited");
            return Err(status);
        }
        Ok(address.map(|a| a.to_string()).unwrap_or_default())
    }

    fn count(&self, result: &str) {
        self.metrics.logins.with_label_values(&[result]).inc();
    }

    /// Records how an attempt ended (audit row, metric) and answers.
    async fn finish<T>(
        &self,
        mut attempt: Attempt,
        outcome: Result<(T, &'static str), Refusal>,
    ) -> Result<Response<T>, Status> {
        let (result, bounded, answer) = match outcome {
            Ok((answer, label)) => {
                self.count(label);
                ("OK", false, Ok(Response::new(answer)))
            }
            Err(refusal) => {
                self.count(refusal.failure.metric());
                attempt.note("reason", refusal.failure.reason());
                (
                    code_name(refusal.status.code()),
                    refusal.failure.bounded(),
                    Err(refusal.status),
                )
            }
        };
        let entry = NewAuditEntry {
            at_ms: attempt.at_ms,
            actor: attempt.actor,
            method: attempt.method.to_string(),
            target_json: Value::Object(attempt.target).to_string(),
            peer_address: attempt.peer_address,
            result: result.to_string(),
            role: attempt.role,
            actor_kind: "session".into(),
            actor_owner: String::new(),
            bounded,
        };
        if bounded {
            self.audit.insert_bounded(entry).await;
        } else {
            self.audit.insert(entry).await;
        }
        answer
    }

    /// The session length asked for, in ms, within the configured one.
    fn session_ms(&self, asked_seconds: u64) -> Result<i64, Refusal> {
        let most = self.settings.lifetime_seconds;
        let seconds = match asked_seconds {
            0 => most,
            n if n > most => {
                return Err(Refusal::new(
                    Failure::Invalid,
                    Status::invalid_argument(format!(
                        "session_seconds: at most {most} (the control plane's \
                         session_lifetime_seconds)"
                    )),
                ));
            }
            n => n,
        };
        Ok(i64::try_from(seconds.saturating_mul(1000)).unwrap_or(i64::MAX))
    }

    /// A new session for `user`, stored.
    async fn open_session(
        &self,
        user: &UserRecord,
        session_ms: i64,
        attempt: &mut Attempt,
    ) -> Result<v1::Session, Refusal> {
        let (token, session) = new_session(user, session_ms, attempt);
        self.storage
            .create_session(&NewSession {
                token_sha256: &secret::hash(&token),
                id: &session.id,
                user_id: &user.id,
                created_at_ms: attempt.at_ms,
                expires_at_ms: session.expires_at_ms,
                peer_address: &attempt.peer_address,
            })
            .await?;
        Ok(session_view(user, token, session.expires_at_ms))
    }

    /// Counts a failed login against `user`; the refusal says if it locked
    /// them.
    async fn failed(
        &self,
        user: &UserRecord,
        failure: Failure,
        message: String,
    ) -> Result<Refusal, Refusal> {
        let until = attempt_lock(
            &self.storage,
            user,
            self.settings.max_failures,
            self.settings.lockout_seconds,
        )
        .await?;
        let message = match until {
            Some(until) => format!(
                "{message}; after {} failed logins in a row, {} is locked until {}",
                self.settings.max_failures,
                user.name,
                format_ms(until)
            ),
            None => message,
        };
        Ok(Refusal::new(failure, Status::unauthenticated(message)))
    }

    async fn try_login(
        &self,
        req: v1::LoginRequest,
        attempt: &mut Attempt,
    ) -> Result<(v1::LoginResponse, &'static str), Refusal> {
        use v1::login_response::Result as Answer;
        if req.user.is_empty()
            || req.user.len() > MAX_FIELD_BYTES
            || req.password.len() > password::MAX_PASSWORD_BYTES
            || req.code.len() > MAX_FIELD_BYTES
        {
            return Err(Refusal::new(
                Failure::Invalid,
                Status::invalid_argument(format!(
                    "a user name (at most {MAX_FIELD_BYTES} bytes) and a password (at most {} \
                     bytes) are required",
                    password::MAX_PASSWORD_BYTES
                )),
            ));
        }
        let session_ms = self.session_ms(req.session_seconds)?;
        let now = attempt.at_ms;
        let Some(user) = self.storage.user_by_name(&req.user).await? else {
            password::waste_a_verify(req.password).await;
            return Err(Refusal::new(Failure::UnknownUser, wrong_user_or_password()));
        };
        attempt.user(&user);
        if let Some(until) = user.locked_at(now) {
            return Err(Refusal::new(
                Failure::Locked,
                Status::unauthenticated(format!(
                    "{} is locked until {} after {} failed logins in a row; an admin can lift \
                     it with `posfleet user unlock {}`",
                    user.name,
                    format_ms(until),
                    self.settings.max_failures,
                    user.name
                )),
            ));
        }
        if user.setup_pending() {
            let is_setup_code = req.code.is_empty()
                && secret::hash(&secret::normalize_code(&req.password)) == user.setup_code_sha256;
            if !is_setup_code {
                password::waste_a_verify(req.password).await;
                return Err(self
                    .failed(&user, Failure::WrongPassword, wrong_user_or_password_text())
                    .await?);
            }
            refuse_disabled(&user)?;
            if let Some(expired) = user.setup_code_expires_at_ms.filter(|at| *at <= now) {
                return Err(Refusal::new(
                    Failure::SetupExpired,
                    Status::unauthenticated(format!(
                        "the setup code of {} expired at {}; an admin can issue a new one with \
                         `posfleet user reset {}`",
                        user.name,
                        format_ms(expired),
                        user.name
                    )),
                ));
            }
            let challenge = self.begin_setup(&user, now).await?;
            attempt.note("setup_expires_at_unix_ms", challenge.expires_at_unix_ms);
            return Ok((
                v1::LoginResponse {
                    result: Some(Answer::Setup(challenge)),
                },
                "setup_started",
            ));
        }
        if !password::verify(req.password, user.password_hash.clone()).await? {
            return Err(self
                .failed(&user, Failure::WrongPassword, wrong_user_or_password_text())
                .await?);
        }
        refuse_disabled(&user)?;
        self.second_factor(&user, &req.code, now, attempt).await?;
        let session = self.open_session(&user, session_ms, attempt).await?;
        Ok((
            v1::LoginResponse {
                result: Some(Answer::Session(session)),
            },
            "ok",
        ))
    }

    /// Checks (and spends) the TOTP or recovery code of a login.
    async fn second_factor(
        &self,
        user: &UserRecord,
        code: &str,
        now: i64,
        attempt: &mut Attempt,
    ) -> Result<(), Refusal> {
        let code = code.trim();
        if code.is_empty() {
            return Err(self
                .failed(
                    user,
                    Failure::WrongCode,
                    "a code is required: the 6 digits your authenticator shows, or a recovery \
                     code"
                        .into(),
                )
                .await?);
        }
        let unix_seconds = u64::try_from(now / 1000).unwrap_or(0);
        let is_totp =
            code.len() == usize::from(totp::DIGITS) && code.bytes().all(|b| b.is_ascii_digit());
        if !is_totp {
            let hash = secret::hash(&secret::normalize_code(code));
            if self.storage.use_recovery_code(&user.id, &hash, now).await? {
                attempt.note("second_factor", "recovery code");
                return Ok(());
            }
            return Err(self
                .failed(
                    user,
                    Failure::WrongCode,
                    "wrong code (a recovery code works once)".into(),
                )
                .await?);
        }
        let secret_b32 = &user.totp_secret;
        let step = totp::matching_step(secret_b32, code, unix_seconds).map_err(|_| {
            crate::error::Error::Corrupt(format!("the TOTP secret of user {}", user.name))
        })?;
        match step {
            Some(step) => {
                let step = i64::try_from(step).unwrap_or(i64::MAX);
                if self.storage.accept_totp_step(&user.id, step, now).await? {
                    attempt.note("second_factor", "totp");
                    Ok(())
                } else {
                    Err(self
                        .failed(
                            user,
                            Failure::ReplayedCode,
                            "code already used; wait for the next one".into(),
                        )
                        .await?)
                }
            }
            None if totp::is_stale(secret_b32, code, unix_seconds, STALE_STEPS)
                .unwrap_or(false) =>
            {
                Err(self
                    .failed(
                        user,
                        Failure::ExpiredCode,
                        "code expired; enter the one your authenticator shows now (is its clock \
                         right?)"
                            .into(),
                    )
                    .await?)
            }
            None => Err(self
                .failed(user, Failure::WrongCode, "wrong code".into())
                .await?),
        }
    }

    /// A fresh challenge for `user`'s setup, stored.
    async fn begin_setup(
        &self,
        user: &UserRecord,
        now: i64,
    ) -> Result<v1::SetupChallenge, Refusal> {
        let mut bytes = [0u8; totp::SECRET_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let totp_secret = totp::encode_secret(&bytes);
        let token = secret::generate(secret::SETUP_TOKEN_PREFIX);
        let expires_at_ms = now + SETUP_CHALLENGE_LIFETIME_MS;
        self.storage
            .begin_setup(&user.id, &secret::hash(&token), &totp_secret, expires_at_ms)
            .await?;
        Ok(v1::SetupChallenge {
            setup_token: token,
            otpauth_uri: totp::otpauth_uri(&totp_secret, &user.name),
            totp_secret,
            expires_at_unix_ms: expires_at_ms,
            min_password_chars: password::MIN_PASSWORD_CHARS as u32,
        })
    }

    async fn try_complete_setup(
        &self,
        req: v1::CompleteSetupRequest,
        attempt: &mut Attempt,
    ) -> Result<(v1::CompleteSetupResponse, &'static str), Refusal> {
        if req.setup_token.len() > MAX_FIELD_BYTES || req.code.len() > MAX_FIELD_BYTES {
            return Err(Refusal::new(
                Failure::Invalid,
                Status::invalid_argument("setup_token and code are too long"),
            ));
        }
        let session_ms = self.session_ms(req.session_seconds)?;
        let now = attempt.at_ms;
        let token_hash = secret::hash(&req.setup_token);
        let Some(user) = self.storage.user_by_setup_token(&token_hash).await? else {
            return Err(Refusal::new(
                Failure::SetupExpired,
                setup_gone("the setup token is not valid (unknown, finished or replaced)"),
            ));
        };
        attempt.user(&user);
        if let Some(expired) = user.setup_expires_at_ms.filter(|at| *at <= now) {
            return Err(Refusal::new(
                Failure::SetupExpired,
                setup_gone(&format!(
                    "the setup challenge expired at {}",
                    format_ms(expired)
                )),
            ));
        }
        refuse_disabled(&user)?;
        if let Err(why) = password::check_rules(&req.new_password) {
            return Err(Refusal::new(
                Failure::Invalid,
                Status::invalid_argument(format!("new_password: {why}")),
            ));
        }
        let unix_seconds = u64::try_from(now / 1000).unwrap_or(0);
        let step = totp::matching_step(&user.setup_totp_secret, &req.code, unix_seconds).map_err(
            |_| {
                crate::error::Error::Corrupt(format!("the setup TOTP secret of user {}", user.name))
            },
        )?;
        let Some(step) = step else {
            return Err(self
                .failed(
                    &user,
                    Failure::WrongCode,
                    "wrong code: enter the 6 digits your authenticator shows for the secret of \
                     this setup"
                        .into(),
                )
                .await?);
        };
        let password_hash = password::hash(req.new_password).await?;
        let recovery_codes: Vec<String> = (0..RECOVERY_CODES)
            .map(|_| secret::grouped_code(RECOVERY_CODE_GROUPS))
            .collect();
        let recovery_hashes: Vec<String> = recovery_codes.iter().map(|c| secret::hash(c)).collect();
        let (token, session) = new_session(&user, session_ms, attempt);
        let token_sha256 = secret::hash(&token);
        let finished = self
            .storage
            .finish_setup(&FinishedSetup {
                user_id: &user.id,
                setup_token_sha256: &token_hash,
                password_hash: &password_hash,
                totp_secret: &user.setup_totp_secret,
                totp_step: i64::try_from(step).unwrap_or(i64::MAX),
                recovery_code_sha256s: &recovery_hashes,
                session: NewSession {
                    token_sha256: &token_sha256,
                    id: &session.id,
                    user_id: &user.id,
                    created_at_ms: now,
                    expires_at_ms: session.expires_at_ms,
                    peer_address: &attempt.peer_address,
                },
            })
            .await?;
        if !finished {
            return Err(Refusal::new(
                Failure::SetupExpired,
                setup_gone("the setup was finished or replaced meanwhile"),
            ));
        }
        tracing::info!(user = %user.name, "User set up.");
        Ok((
            v1::CompleteSetupResponse {
                session: Some(session_view(&user, token, session.expires_at_ms)),
                recovery_codes,
            },
            "setup_completed",
        ))
    }
}

/// A session's id and expiry, before it is stored.
struct SessionTerms {
    id: String,
    expires_at_ms: i64,
}

/// A fresh session token for `user`, noted in the attempt's audit row.
fn new_session(
    user: &UserRecord,
    session_ms: i64,
    attempt: &mut Attempt,
) -> (String, SessionTerms) {
    let token = secret::generate(secret::SESSION_TOKEN_PREFIX);
    let terms = SessionTerms {
        id: secret::short_id("ses-", 6),
        expires_at_ms: attempt.at_ms.saturating_add(session_ms),
    };
    attempt.note("session_id", terms.id.clone());
    attempt.note("expires_at_unix_ms", terms.expires_at_ms);
    tracing::info!(user = %user.name, session_id = %terms.id, "Session opened.");
    (token, terms)
}

fn session_view(user: &UserRecord, token: String, expires_at_ms: i64) -> v1::Session {
    v1::Session {
        token,
        expires_at_unix_ms: expires_at_ms,
        user: user.name.clone(),
        role: user.role.clone(),
        scope: Scope::from_json(&user.scope_json)
            .ok()
            .flatten()
            .map(|s| s.labels().clone().into_iter().collect())
            .unwrap_or_default(),
    }
}

/// Counts a failure for `user`; the end of the lock if it locked them.
async fn attempt_lock(
    storage: &Storage,
    user: &UserRecord,
    max_failures: u32,
    lockout_seconds: u64,
) -> Result<Option<i64>, crate::error::Error> {
    let lockout_ms = i64::try_from(lockout_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
    let until = now_ms().saturating_add(lockout_ms);
    let locked = storage
        .record_login_failure(&user.id, max_failures, until)
        .await?;
    if let Some(until) = locked {
        tracing::warn!(user = %user.name, locked_until = %format_ms(until), "User locked after failed logins.");
    }
    Ok(locked)
}

fn wrong_user_or_password_text() -> String {
    "wrong user name or password".into()
}

fn wrong_user_or_password() -> Status {
    Status::unauthenticated(wrong_user_or_password_text())
}

fn refuse_disabled(user: &UserRecord) -> Result<(), Refusal> {
    match user.disabled_at_ms {
        Some(at) => Err(Refusal::new(
            Failure::Disabled,
            Status::unauthenticated(format!(
                "{} was disabled at {}; ask an admin",
                user.name,
                format_ms(at)
            )),
        )),
        None => Ok(()),
    }
}

fn setup_gone(why: &str) -> Status {
    Status::unauthenticated(format!(
        "{why}; log in with the setup code again to get a new challenge"
    ))
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    async fn login(
        &self,
        request: Request<v1::LoginRequest>,
    ) -> Result<Response<v1::LoginResponse>, Status> {
        let peer = self.charge(&request)?;
        let req = request.into_inner();
        let mut attempt = Attempt::new("Login", &req.user, peer);
        let outcome = self.try_login(req, &mut attempt).await;
        self.finish(attempt, outcome).await
    }

    async fn complete_setup(
        &self,
        request: Request<v1::CompleteSetupRequest>,
    ) -> Result<Response<v1::CompleteSetupResponse>, Status> {
        let peer = self.charge(&request)?;
        let mut attempt = Attempt::new("CompleteSetup", "", peer);
        let outcome = self
            .try_complete_setup(request.into_inner(), &mut attempt)
            .await;
        self.finish(attempt, outcome).await
    }

    async fn logout(
        &self,
        request: Request<v1::LogoutRequest>,
    ) -> Result<Response<v1::LogoutResponse>, Status> {
        let peer = self.charge(&request)?;
        let headers = request.metadata().clone().into_headers();
        let token = crate::audit::bearer(&headers).map(str::to_string);
        let mut attempt = Attempt::new("Logout", "", peer);
        let outcome = async {
            let Some(token) = token.filter(|t| t.starts_with(secret::SESSION_TOKEN_PREFIX)) else {
                return Err(Refusal::new(
                    Failure::Invalid,
                    Status::unauthenticated(
                        "Logout ends the session whose token is the bearer token; pass a \
                         session token (an admin API token is revoked with `posfleet token \
                         revoke`)",
                    ),
                ));
            };
            let hash = secret::hash(&token);
            let Some(session) = self.storage.session_by_hash(&hash).await? else {
                return Err(Refusal::new(
                    Failure::Invalid,
                    Status::unauthenticated("session is not valid"),
                ));
            };
            attempt.user(&session.user);
            attempt.note("session_id", session.id.clone());
            // Ending an ended session again is a no-op.
            self.storage.revoke_session(&hash, attempt.at_ms).await?;
            tracing::info!(user = %session.user.name, session_id = %session.id, "Logged out.");
            Ok((v1::LogoutResponse {}, "logout"))
        }
        .await;
        self.finish(attempt, outcome).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_have_bounded_labels_and_only_anonymous_ones_are_bounded() {
        for failure in [
            Failure::WrongPassword,
            Failure::WrongCode,
            Failure::ReplayedCode,
            Failure::ExpiredCode,
            Failure::Locked,
            Failure::Disabled,
            Failure::UnknownUser,
            Failure::SetupExpired,
            Failure::Invalid,
            Failure::Internal,
        ] {
            assert!(LOGIN_RESULTS.contains(&failure.metric()), "{failure:?}");
        }
        assert!(Failure::UnknownUser.bounded());
        assert!(Failure::Locked.bounded());
        assert!(!Failure::WrongPassword.bounded());
        assert!(!Failure::ReplayedCode.bounded());
        assert_eq!(cut("é".repeat(40).as_str(), 5), "éé");
    }
}
