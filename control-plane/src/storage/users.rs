//! Operators (`users`), their recovery codes (`recovery_codes`) and their
//! sessions (`sessions`).
//!
//! Everything a login decides on is in the database, so every replica
//! shares it: the failed-login count and lockout, the last TOTP step
//! accepted (a code works once, on whichever replica it is typed), the
//! sessions and whether the user is disabled. Every change that a race
//! could double (a code accepted twice, a setup finished twice, the last
//! admin disabled twice) is one conditional statement.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::Storage;
use crate::error::Error;

/// A stored user, secrets (as stored: hashes, the TOTP secret) included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: String,
    pub name: String,
    /// A role name (`crate::authz::Role`).
    pub role: String,
    /// `crate::authz::Scope` as JSON; empty when unscoped.
    pub scope_json: String,
    pub created_by: String,
    pub created_at_ms: i64,
    pub disabled_at_ms: Option<i64>,
    /// PHC string; empty until set up.
    pub password_hash: String,
    /// Base32; empty until set up.
    pub totp_secret: String,
    pub totp_last_step: i64,
    /// Empty once used (or never given).
    pub setup_code_sha256: String,
    pub setup_code_expires_at_ms: Option<i64>,
    pub setup_token_sha256: String,
    pub setup_totp_secret: String,
    pub setup_expires_at_ms: Option<i64>,
    pub failed_logins: i64,
    pub locked_until_ms: Option<i64>,
    pub last_login_at_ms: Option<i64>,
    /// Recovery codes not used yet.
    pub recovery_codes_left: i64,
}

impl UserRecord {
    /// Whether they still have to choose a password and enrol a TOTP
    /// authenticator.
    pub fn setup_pending(&self) -> bool {
        !self.setup_code_sha256.is_empty()
    }

    /// Until when logins are refused, if that is later than `now_ms`.
    pub fn locked_at(&self, now_ms: i64) -> Option<i64> {
        self.locked_until_ms.filter(|until| *until > now_ms)
    }
}

/// A user to create: pending setup, with the hash of their setup code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub role: &'a str,
    pub scope_json: &'a str,
    pub created_by: &'a str,
    pub created_at_ms: i64,
    pub setup_code_sha256: &'a str,
    /// `None`: it does not expire.
    pub setup_code_expires_at_ms: Option<i64>,
}

/// A session, with its user's row as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    pub user: UserRecord,
}

/// A session to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession<'a> {
    pub token_sha256: &'a str,
    pub id: &'a str,
    pub user_id: &'a str,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub peer_address: &'a str,
}

/// What finishing a setup stores, in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedSetup<'a> {
    pub user_id: &'a str,
    /// The challenge's token: the setup finishes only if it is still the
    /// user's (so two finishes of one setup cannot both succeed).
    pub setup_token_sha256: &'a str,
    pub password_hash: &'a str,
    pub totp_secret: &'a str,
    /// The step of the code that confirmed the authenticator: used.
    pub totp_step: i64,
    pub recovery_code_sha256s: &'a [String],
    pub session: NewSession<'a>,
}

/// What disabling or updating a user did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserChange {
    /// Done (or already so), as the user is now. Disabled: their sessions
    /// ended.
    Changed(Box<UserRecord>),
    Unknown,
    /// The last enabled admin: disabling them, or taking their admin role,
    /// would lock every operator out. Nothing changed.
    LastAdmin,
}

/// Columns of [`UserRecord`], with the count of unused recovery codes.
const USER_COLUMNS: &str = "u.id, u.name, u.role, u.scope_json, u.created_by, u.created_at_ms, \
     u.disabled_at_ms, u.password_hash, u.totp_secret, u.totp_last_step, u.setup_code_sha256, \
     u.setup_code_expires_at_ms, u.setup_token_sha256, u.setup_totp_secret, \
     u.setup_expires_at_ms, u.failed_logins, u.locked_until_ms, u.last_login_at_ms, \
     (SELECT COUNT(*) FROM recovery_codes r WHERE r.user_id = u.id AND r.used_at_ms IS NULL) \
     AS recovery_codes_left";

fn user_from_row(row: &AnyRow) -> Result<UserRecord, Error> {
    Ok(UserRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: row.try_get("role")?,
        scope_json: row.try_get("scope_json")?,
        created_by: row.try_get("created_by")?,
        created_at_ms: row.try_get("created_at_ms")?,
        disabled_at_ms: row.try_get("disabled_at_ms")?,
        password_hash: row.try_get("password_hash")?,
        totp_secret: row.try_get("totp_secret")?,
        totp_last_step: row.try_get("totp_last_step")?,
        setup_code_sha256: row.try_get("setup_code_sha256")?,
        setup_code_expires_at_ms: row.try_get("setup_code_expires_at_ms")?,
        setup_token_sha256: row.try_get("setup_token_sha256")?,
        setup_totp_secret: row.try_get("setup_totp_secret")?,
        setup_expires_at_ms: row.try_get("setup_expires_at_ms")?,
        failed_logins: row.try_get("failed_logins")?,
        locked_until_ms: row.try_get("locked_until_ms")?,
        last_login_at_ms: row.try_get("last_login_at_ms")?,
        recovery_codes_left: row.try_get("recovery_codes_left")?,
    })
}

impl Storage {
    /// Users stored (enabled or not).
    pub async fn user_count(&self) -> Result<i64, Error> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM users")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    /// Adds a user pending setup; `Ok(false)` if the name is taken (names
    /// are never reused: the audit log names people by them).
    pub async fn create_user(&self, user: &NewUser<'_>) -> Result<bool, Error> {
        let done = sqlx::query(
            "INSERT INTO users (id, name, role, scope_json, created_by, created_at_ms, \
             password_hash, totp_secret, totp_last_step, setup_code_sha256, \
             setup_code_expires_at_ms, setup_token_sha256, setup_totp_secret, failed_logins) \
             VALUES ($1, $2, $3, $4, $5, $6, '', '', 0, $7, $8, '', '', 0) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(user.id)
        .bind(user.name)
        .bind(user.role)
        .bind(user.scope_json)
        .bind(user.created_by)
        .bind(user.created_at_ms)
        .bind(user.setup_code_sha256)
        .bind(user.setup_code_expires_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn user_where(&self, filter: &str, value: &str) -> Result<Option<UserRecord>, Error> {
        sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users u WHERE {filter}"
        ))
        .bind(value)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(user_from_row)
        .transpose()
    }

    pub async fn user_by_name(&self, name: &str) -> Result<Option<UserRecord>, Error> {
        self.user_where("u.name = $1", name).await
    }

    /// The user whose setup is under way with this token (expired or not).
    pub async fn user_by_setup_token(
        &self,
        token_sha256: &str,
    ) -> Result<Option<UserRecord>, Error> {
        if token_sha256.is_empty() {
            return Ok(None);
        }
        self.user_where("u.setup_token_sha256 = $1", token_sha256)
            .await
    }

    /// Users by name; disabled ones only if asked.
    pub async fn list_users(&self, include_disabled: bool) -> Result<Vec<UserRecord>, Error> {
        let filter = if include_disabled {
            ""
        } else {
            "WHERE u.disabled_at_ms IS NULL"
        };
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users u {filter} ORDER BY u.name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(user_from_row).collect()
    }

    /// Disables user `name` and ends their sessions, unless they are the
    /// last enabled admin.
    pub async fn disable_user(&self, name: &str, now_ms: i64) -> Result<UserChange, Error> {
        let mut tx = self.pool.begin().await?;
        // One statement: the count of enabled admins is taken by the
        // update itself.
        sqlx::query(
            "UPDATE users SET disabled_at_ms = $1 WHERE name = $2 AND disabled_at_ms IS NULL \
             AND (role <> 'admin' OR (SELECT COUNT(*) FROM users WHERE role = 'admin' \
             AND disabled_at_ms IS NULL) > 1)",
        )
        .bind(now_ms)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE sessions SET revoked_at_ms = $1 WHERE revoked_at_ms IS NULL \
             AND user_id IN (SELECT id FROM users WHERE name = $2 AND disabled_at_ms IS NOT NULL)",
        )
        .bind(now_ms)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(match self.user_by_name(name).await? {
            None => UserChange::Unknown,
            Some(user) if user.disabled_at_ms.is_none() => UserChange::LastAdmin,
            Some(user) => UserChange::Changed(Box::new(user)),
        })
    }

    /// Sets user `name`'s role and scope, unless that takes the admin role
    /// from the last enabled admin ([`UserChange::LastAdmin`], nothing
    /// changed).
    pub async fn update_user(
        &self,
        name: &str,
        role: &str,
        scope_json: &str,
    ) -> Result<UserChange, Error> {
        // One statement: the count of enabled admins is taken by the
        // update itself.
        sqlx::query(
            "UPDATE users SET role = $1, scope_json = $2 WHERE name = $3 AND ($1 = 'admin' \
             OR role <> 'admin' OR disabled_at_ms IS NOT NULL OR (SELECT COUNT(*) FROM users \
             WHERE role = 'admin' AND disabled_at_ms IS NULL) > 1)",
        )
        .bind(role)
        .bind(scope_json)
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(match self.user_by_name(name).await? {
            None => UserChange::Unknown,
            Some(user) if user.role != role || user.scope_json != scope_json => {
                UserChange::LastAdmin
            }
            Some(user) => UserChange::Changed(Box::new(user)),
        })
    }

    /// Enables user `name` again; `None` if there is no such user.
    pub async fn enable_user(&self, name: &str) -> Result<Option<UserRecord>, Error> {
        sqlx::query("UPDATE users SET disabled_at_ms = NULL WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        self.user_by_name(name).await
    }

    /// Lifts a lockout and clears the failed-login count.
    pub async fn unlock_user(&self, name: &str) -> Result<Option<UserRecord>, Error> {
        sqlx::query("UPDATE users SET failed_logins = 0, locked_until_ms = NULL WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        self.user_by_name(name).await
    }

    /// Forgets user `name`'s password, TOTP secret, recovery codes and any
    /// setup under way, ends their sessions, lifts a lockout and gives them
    /// a new setup code. `None` if there is no such user.
    pub async fn reset_user(
        &self,
        name: &str,
        setup_code_sha256: &str,
        setup_code_expires_at_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<Option<UserRecord>, Error> {
        let mut tx = self.pool.begin().await?;
        let id: Option<String> = sqlx::query(
            "UPDATE users SET password_hash = '', totp_secret = '', setup_code_sha256 = $1, \
             setup_code_expires_at_ms = $2, setup_token_sha256 = '', setup_totp_secret = '', \
             setup_expires_at_ms = NULL, failed_logins = 0, locked_until_ms = NULL \
             WHERE name = $3 RETURNING id",
        )
        .bind(setup_code_sha256)
        .bind(setup_code_expires_at_ms)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| row.try_get("id"))
        .transpose()?;
        let Some(id) = id else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE sessions SET revoked_at_ms = $1 WHERE user_id = $2 AND revoked_at_ms IS NULL",
        )
        .bind(now_ms)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.user_by_name(name).await
    }

    /// Counts a failed login of user `id`; at `max_failures` in a row the
    /// account is locked until `locked_until_ms` and the count starts
    /// again. Returns the lock's end if this failure locked it.
    pub async fn record_login_failure(
        &self,
        id: &str,
        max_failures: u32,
        locked_until_ms: i64,
    ) -> Result<Option<i64>, Error> {
        let max = i64::from(max_failures);
        // Both SET expressions read the row as it was.
        let row = sqlx::query(
            "UPDATE users SET \
             failed_logins = CASE WHEN failed_logins + 1 >= $1 THEN 0 ELSE failed_logins + 1 END, \
             locked_until_ms = CASE WHEN failed_logins + 1 >= $2 THEN $3 ELSE locked_until_ms END \
             WHERE id = $4 RETURNING failed_logins, locked_until_ms",
        )
        .bind(max)
        .bind(max)
        .bind(locked_until_ms)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(row) => {
                let count: i64 = row.try_get("failed_logins")?;
                let until: Option<i64> = row.try_get("locked_until_ms")?;
                until.filter(|u| count == 0 && *u == locked_until_ms)
            }
            None => None,
        })
    }

    /// Accepts the TOTP code of `step` for user `id`: `false` if a code of
    /// that step or a later one was accepted already (the code is spent).
    /// A success clears the failed-login count.
    pub async fn accept_totp_step(&self, id: &str, step: i64, now_ms: i64) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE users SET totp_last_step = $1, failed_logins = 0, last_login_at_ms = $2 \
             WHERE id = $3 AND totp_last_step < $4",
        )
        .bind(step)
        .bind(now_ms)
        .bind(id)
        .bind(step)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Spends one of user `id`'s recovery codes: `false` if it is not one
    /// of theirs or was used. A success clears the failed-login count.
    pub async fn use_recovery_code(
        &self,
        id: &str,
        code_sha256: &str,
        now_ms: i64,
    ) -> Result<bool, Error> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE recovery_codes SET used_at_ms = $1 WHERE user_id = $2 AND code_sha256 = $3 \
             AND used_at_ms IS NULL",
        )
        .bind(now_ms)
        .bind(id)
        .bind(code_sha256)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query("UPDATE users SET failed_logins = 0, last_login_at_ms = $1 WHERE id = $2")
            .bind(now_ms)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Starts (or restarts) user `id`'s setup: a token and a fresh TOTP
    /// secret, valid until `expires_at_ms`.
    pub async fn begin_setup(
        &self,
        id: &str,
        token_sha256: &str,
        totp_secret: &str,
        expires_at_ms: i64,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE users SET setup_token_sha256 = $1, setup_totp_secret = $2, \
             setup_expires_at_ms = $3, failed_logins = 0 WHERE id = $4",
        )
        .bind(token_sha256)
        .bind(totp_secret)
        .bind(expires_at_ms)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Finishes a setup: password, TOTP secret (its confirming step spent),
    /// the setup code consumed, new recovery codes, and a session, all or
    /// nothing. `false` if the setup was finished (or reset) meanwhile.
    pub async fn finish_setup(&self, setup: &FinishedSetup<'_>) -> Result<bool, Error> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE users SET password_hash = $1, totp_secret = $2, totp_last_step = $3, \
             setup_code_sha256 = '', setup_code_expires_at_ms = NULL, setup_token_sha256 = '', \
             setup_totp_secret = '', setup_expires_at_ms = NULL, failed_logins = 0, \
             locked_until_ms = NULL, last_login_at_ms = $4 \
             WHERE id = $5 AND setup_token_sha256 = $6 AND setup_token_sha256 <> ''",
        )
        .bind(setup.password_hash)
        .bind(setup.totp_secret)
        .bind(setup.totp_step)
        .bind(setup.session.created_at_ms)
        .bind(setup.user_id)
        .bind(setup.setup_token_sha256)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
            .bind(setup.user_id)
            .execute(&mut *tx)
            .await?;
        for code in setup.recovery_code_sha256s {
            sqlx::query("INSERT INTO recovery_codes (user_id, code_sha256) VALUES ($1, $2)")
                .bind(setup.user_id)
                .bind(code)
                .execute(&mut *tx)
                .await?;
        }
        insert_session(&mut tx, &setup.session).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Stores a session, and forgets this user's sessions that ended more
    /// than a day before it began (the table stays the size of the live
    /// ones).
    pub async fn create_session(&self, session: &NewSession<'_>) -> Result<(), Error> {
        let mut tx = self.pool.begin().await?;
        insert_session(&mut tx, session).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The session with this token hash, and its user as they are now.
    pub async fn session_by_hash(
        &self,
        token_sha256: &str,
    ) -> Result<Option<SessionRecord>, Error> {
        let row = sqlx::query(&format!(
            "SELECT s.id AS session_id, s.created_at_ms AS session_created_at_ms, \
             s.expires_at_ms AS session_expires_at_ms, \
             s.revoked_at_ms AS session_revoked_at_ms, {USER_COLUMNS} \
             FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token_sha256 = $1"
        ))
        .bind(token_sha256)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(SessionRecord {
                id: row.try_get("session_id")?,
                created_at_ms: row.try_get("session_created_at_ms")?,
                expires_at_ms: row.try_get("session_expires_at_ms")?,
                revoked_at_ms: row.try_get("session_revoked_at_ms")?,
                user: user_from_row(&row)?,
            })
        })
        .transpose()
    }

    /// Ends the session with this token hash; `false` if it had ended.
    pub async fn revoke_session(&self, token_sha256: &str, now_ms: i64) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE sessions SET revoked_at_ms = $1 WHERE token_sha256 = $2 \
             AND revoked_at_ms IS NULL",
        )
        .bind(now_ms)
        .bind(token_sha256)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// How long an ended session is kept (so a call with it is told it ended,
/// rather than that it is unknown).
const ENDED_SESSION_KEPT_MS: i64 = 24 * 3600 * 1000;

async fn insert_session(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    session: &NewSession<'_>,
) -> Result<(), Error> {
    sqlx::query(
        "DELETE FROM sessions WHERE user_id = $1 AND expires_at_ms < $2 \
         AND (revoked_at_ms IS NULL OR revoked_at_ms < $3)",
    )
    .bind(session.user_id)
    .bind(session.created_at_ms - ENDED_SESSION_KEPT_MS)
    .bind(session.created_at_ms - ENDED_SESSION_KEPT_MS)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO sessions (token_sha256, id, user_id, created_at_ms, expires_at_ms, \
         peer_address) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(session.token_sha256)
    .bind(session.id)
    .bind(session.user_id)
    .bind(session.created_at_ms)
    .bind(session.expires_at_ms)
    .bind(session.peer_address)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
