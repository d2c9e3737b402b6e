//! The audit log (`audit_log`) and the admin API tokens (`admin_tokens`)
//! whose names it records (users are in `users.rs`).
//!
//! `seq` is the previous largest plus one, taken by the insert itself. On
//! PostgreSQL two inserts racing for the same number collide on the primary
//! key; the loser waits for the winner to commit and retries. So a number is
//! only ever taken once the one before it is committed: readers paging with
//! `seq > cursor` miss nothing.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Storage, is_unique_violation};
use crate::error::Error;

/// How often an insert that lost the race for a seq is retried.
const INSERT_ATTEMPTS: usize = 20;

/// Result of a call that has not finished (or whose end was never seen).
pub const AUDIT_PENDING: &str = "PENDING";

/// What a row costs beyond its text columns (numbers, row and index
/// overhead), as the byte bound on unauthenticated rows counts it.
pub const AUDIT_ROW_OVERHEAD_BYTES: i64 = 64;

/// Actor of calls without a valid admin token.
pub const UNAUTHENTICATED_ACTOR: &str = "unauthenticated";

/// An admin API token, as callers are identified: live (not revoked),
/// possibly expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTokenRecord {
    pub id: String,
    pub name: String,
    /// A role name (`crate::authz::Role`).
    pub role: String,
    pub expires_at_ms: Option<i64>,
    /// `crate::authz::Scope` as JSON; empty when unscoped.
    pub scope_json: String,
    /// The user it belongs to (id and name); empty for nobody's.
    pub owner_id: String,
    pub owner: String,
    /// When the user it belongs to was disabled, if they are.
    pub owner_disabled_at_ms: Option<i64>,
    /// The role the user it belongs to has now; `None` for nobody's.
    pub owner_role: Option<String>,
}

/// An admin API token as `posfleet token list` shows it (never its secret,
/// which is stored only as a hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTokenInfo {
    pub id: String,
    pub name: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    pub role: String,
    pub expires_at_ms: Option<i64>,
    pub scope_json: String,
    pub created_by: String,
}

/// A token to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAdminToken<'a> {
    pub id: &'a str,
    pub secret_sha256: &'a str,
    pub name: &'a str,
    pub created_at_ms: i64,
    pub role: &'a str,
    pub expires_at_ms: Option<i64>,
    pub scope_json: &'a str,
    pub created_by: &'a str,
    /// The user it belongs to; empty for nobody's.
    pub owner_id: &'a str,
    pub owner: &'a str,
}

/// Columns of [`AdminTokenInfo`].
const TOKEN_COLUMNS: &str =
    "id, name, created_at_ms, revoked_at_ms, role, expires_at_ms, scope_json, created_by";

/// What revoking an admin token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminTokenRevocation {
    /// Revoked now, or already revoked before (unchanged).
    Revoked(AdminTokenInfo),
    /// No token has this id.
    Unknown,
}

fn admin_token_from_row(row: &AnyRow) -> Result<AdminTokenInfo, Error> {
    Ok(AdminTokenInfo {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        created_at_ms: row.try_get("created_at_ms")?,
        revoked_at_ms: row.try_get("revoked_at_ms")?,
        role: row.try_get("role")?,
        expires_at_ms: row.try_get("expires_at_ms")?,
        scope_json: row.try_get("scope_json")?,
        created_by: row.try_get("created_by")?,
    })
}

/// An audit entry to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAuditEntry {
    pub at_ms: i64,
    pub actor: String,
    pub method: String,
    pub target_json: String,
    pub peer_address: String,
    /// `PENDING` (written ahead of the call), `OK` or a gRPC code name.
    pub result: String,
    /// The caller's role; empty when unauthenticated.
    pub role: String,
    /// `user`, `token`, `session` (logins, logouts) or empty
    /// (unauthenticated).
    pub actor_kind: String,
    /// For a token: the user it belongs to; else empty.
    pub actor_owner: String,
    /// A row anyone can cause (an unauthenticated call, a failed login
    /// for an unknown name): rate-limited, and only the newest kept.
    pub bounded: bool,
}

/// A stored audit entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: u64,
    pub at_ms: i64,
    pub actor: String,
    pub method: String,
    pub target_json: String,
    pub peer_address: String,
    pub result: String,
    pub finished_at_ms: Option<i64>,
    pub role: String,
    pub actor_kind: String,
    pub actor_owner: String,
}

fn audit_from_row(row: &AnyRow) -> Result<AuditRecord, Error> {
    Ok(AuditRecord {
        seq: row.try_get::<i64, _>("seq")?.max(0) as u64,
        at_ms: row.try_get("at_ms")?,
        actor: row.try_get("actor")?,
        method: row.try_get("method")?,
        target_json: row.try_get("target_json")?,
        peer_address: row.try_get("peer_address")?,
        result: row.try_get("result")?,
        finished_at_ms: row.try_get("finished_at_ms")?,
        role: row.try_get("role")?,
        actor_kind: row.try_get("actor_kind")?,
        actor_owner: row.try_get("actor_owner")?,
    })
}

impl Storage {
    /// The live admin token with this hash, if any.
    pub async fn admin_token_by_hash(
        &self,
        secret_sha256: &str,
    ) -> Result<Option<AdminTokenRecord>, Error> {
        sqlx::query(
            "SELECT t.id, t.name, t.role, t.expires_at_ms, t.scope_json, t.owner_id, t.owner, \
             u.disabled_at_ms AS owner_disabled_at_ms, u.role AS owner_role FROM admin_tokens t \
             LEFT JOIN users u ON u.id = t.owner_id \
             WHERE t.secret_sha256 = $1 AND t.revoked_at_ms IS NULL",
        )
        .bind(secret_sha256)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| {
            Ok(AdminTokenRecord {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                role: row.try_get("role")?,
                expires_at_ms: row.try_get("expires_at_ms")?,
                scope_json: row.try_get("scope_json")?,
                owner_id: row.try_get("owner_id")?,
                owner: row.try_get("owner")?,
                owner_disabled_at_ms: row.try_get("owner_disabled_at_ms")?,
                owner_role: row.try_get("owner_role")?,
            })
        })
        .transpose()
    }

    /// Adds a live admin token; `Ok(false)` if a token (live or revoked) has
    /// this name already: the audit log names callers by it, so a name is
    /// never reused.
    pub async fn create_admin_token(&self, token: &NewAdminToken<'_>) -> Result<bool, Error> {
        let done = sqlx::query(
            "INSERT INTO admin_tokens (id, secret_sha256, name, created_at_ms, role, \
             expires_at_ms, scope_json, created_by, owner_id, owner) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 \
             WHERE NOT EXISTS (SELECT 1 FROM admin_tokens WHERE name = $11)",
        )
        .bind(token.id)
        .bind(token.secret_sha256)
        .bind(token.name)
        .bind(token.created_at_ms)
        .bind(token.role)
        .bind(token.expires_at_ms)
        .bind(token.scope_json)
        .bind(token.created_by)
        .bind(token.owner_id)
        .bind(token.owner)
        .bind(token.name)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Admin tokens, oldest first; revoked ones only if asked.
    pub async fn list_admin_tokens(
        &self,
        include_revoked: bool,
    ) -> Result<Vec<AdminTokenInfo>, Error> {
        let filter = if include_revoked {
            ""
        } else {
            "WHERE revoked_at_ms IS NULL"
        };
        let sql =
            format!("SELECT {TOKEN_COLUMNS} FROM admin_tokens {filter} ORDER BY created_at_ms, id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(admin_token_from_row).collect()
    }

    /// Revokes a token. From the moment this returns,
    /// [`Storage::admin_token_by_hash`] no longer finds it, on every
    /// replica (nothing caches tokens). (Operators are users: the last
    /// enabled admin *user* is what cannot be disabled.)
    pub async fn revoke_admin_token(
        &self,
        id: &str,
        now_ms: i64,
    ) -> Result<AdminTokenRevocation, Error> {
        sqlx::query(
            "UPDATE admin_tokens SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms IS NULL",
        )
        .bind(now_ms)
        .bind(id)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM admin_tokens WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(AdminTokenRevocation::Unknown);
        };
        Ok(AdminTokenRevocation::Revoked(admin_token_from_row(&row)?))
    }

    /// Appends an entry and returns its seq.
    pub async fn insert_audit_entry(&self, entry: &NewAuditEntry) -> Result<u64, Error> {
        let finished = (entry.result != AUDIT_PENDING).then_some(entry.at_ms);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let inserted = sqlx::query(
                "INSERT INTO audit_log (seq, at_ms, actor, method, target_json, peer_address, \
                 result, finished_at_ms, role, actor_kind, actor_owner, bounded) \
                 SELECT COALESCE(MAX(seq), 0) + 1, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 \
                 FROM audit_log RETURNING seq",
            )
            .bind(entry.at_ms)
            .bind(&entry.actor)
            .bind(&entry.method)
            .bind(&entry.target_json)
            .bind(&entry.peer_address)
            .bind(&entry.result)
            .bind(finished)
            .bind(&entry.role)
            .bind(&entry.actor_kind)
            .bind(&entry.actor_owner)
            .bind(i64::from(entry.bounded))
            .fetch_one(&self.pool)
            .await;
            match inserted {
                Ok(row) => return Ok(row.try_get::<i64, _>("seq")?.max(0) as u64),
                Err(error) if is_unique_violation(&error) && attempt < INSERT_ATTEMPTS => {}
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Records how a call written ahead ended; `target_json` replaces the
    /// target when the handler learned more (e.g. the id it created).
    /// `false` if there is no such entry.
    pub async fn finish_audit_entry(
        &self,
        seq: u64,
        result: &str,
        target_json: Option<&str>,
        finished_at_ms: i64,
    ) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE audit_log SET result = $1, target_json = COALESCE($2, target_json), \
             finished_at_ms = $3 WHERE seq = $4",
        )
        .bind(result)
        .bind(target_json)
        .bind(finished_at_ms)
        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Entries with `seq > after_seq`, oldest first, at most `limit`; with
    /// `user`, only that user's: their own calls, their logins and logouts
    /// (and failed attempts under their name), and the calls of the tokens
    /// that belong to them.
    pub async fn list_audit_entries(
        &self,
        after_seq: u64,
        limit: u32,
        user: Option<&str>,
    ) -> Result<Vec<AuditRecord>, Error> {
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let rows = match user {
            None => {
                sqlx::query("SELECT * FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2")
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?
            }
            Some(user) => {
                sqlx::query(
                    "SELECT * FROM audit_log WHERE seq > $1 AND ((actor = $2 AND actor_kind IN \
                     ('user', 'session')) OR (actor_owner = $3 AND actor_kind = 'token')) \
                     ORDER BY seq LIMIT $4",
                )
                .bind(after)
                .bind(user)
                .bind(user)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(audit_from_row).collect()
    }

    /// Deletes the bounded entries (unauthenticated calls, failed logins
    /// for unknown names) but the newest ones, at most `keep_rows` of them
    /// and at most `keep_bytes` (the length of their text columns plus
    /// [`AUDIT_ROW_OVERHEAD_BYTES`] each); returns how many went.
    pub async fn prune_bounded_audit_entries(
        &self,
        keep_rows: u32,
        keep_bytes: u64,
    ) -> Result<u64, Error> {
        let done = sqlx::query(
            "DELETE FROM audit_log WHERE bounded = 1 AND seq <= ( \
             SELECT MAX(seq) FROM ( \
             SELECT seq, ROW_NUMBER() OVER (ORDER BY seq DESC) AS n, \
             SUM(LENGTH(target_json) + LENGTH(method) + LENGTH(peer_address) + LENGTH(result) \
             + LENGTH(actor) + LENGTH(role) + LENGTH(actor_kind) + $1) \
             OVER (ORDER BY seq DESC) AS bytes \
             FROM audit_log WHERE bounded = 1) AS newest WHERE n > $2 OR bytes > $3)",
        )
        .bind(AUDIT_ROW_OVERHEAD_BYTES)
        .bind(i64::from(keep_rows))
        .bind(i64::try_from(keep_bytes).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
