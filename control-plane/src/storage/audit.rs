//! The audit log (`audit_log`) and the admin API tokens (`admin_tokens`)
//! whose names it records.
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
    /// It is the last live admin token: revoking it would lock every
    /// operator out.
    LastLive,
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
    })
}

impl Storage {
    /// Live admin-role tokens that have not expired at `now_ms`.
    pub async fn admin_token_count(&self, now_ms: i64) -> Result<i64, Error> {
        Ok(sqlx::query(
            "SELECT COUNT(*) AS n FROM admin_tokens WHERE revoked_at_ms IS NULL \
             AND role = 'admin' AND (expires_at_ms IS NULL OR expires_at_ms > $1)",
        )
        .bind(now_ms)
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?)
    }

    pub async fn insert_admin_token(
        &self,
        id: &str,
        secret_sha256: &str,
        name: &str,
        now_ms: i64,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO admin_tokens (id, secret_sha256, name, created_at_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(secret_sha256)
        .bind(name)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The live admin token with this hash, if any.
    pub async fn admin_token_by_hash(
        &self,
        secret_sha256: &str,
    ) -> Result<Option<AdminTokenRecord>, Error> {
        sqlx::query(
            "SELECT id, name, role, expires_at_ms, scope_json FROM admin_tokens \
             WHERE secret_sha256 = $1 AND revoked_at_ms IS NULL",
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
             expires_at_ms, scope_json, created_by) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
             WHERE NOT EXISTS (SELECT 1 FROM admin_tokens WHERE name = $9)",
        )
        .bind(token.id)
        .bind(token.secret_sha256)
        .bind(token.name)
        .bind(token.created_at_ms)
        .bind(token.role)
        .bind(token.expires_at_ms)
        .bind(token.scope_json)
        .bind(token.created_by)
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

    /// Revokes a token unless it is the last live admin token (one that has
    /// not expired). From the moment this
    /// returns, [`Storage::admin_token_by_hash`] no longer finds it, on every
    /// replica (nothing caches tokens).
    pub async fn revoke_admin_token(
        &self,
        id: &str,
        now_ms: i64,
    ) -> Result<AdminTokenRevocation, Error> {
        // One statement: the count of live tokens is taken by the update
        // itself, so two callers cannot each revoke one of the last two.
        // (On PostgreSQL's READ COMMITTED two such updates can still both
        // see two live tokens; the row lock of the first makes the second
        // re-check only its own row. An operator left without a live token
        // gets a new one written to the data dir at the next start.)
        let done = sqlx::query(
            "UPDATE admin_tokens SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms IS NULL \
             AND (role <> 'admin' OR (SELECT COUNT(*) FROM admin_tokens WHERE revoked_at_ms IS NULL \
             AND role = 'admin' AND (expires_at_ms IS NULL OR expires_at_ms > $3)) > 1)",
        )
        .bind(now_ms)
        .bind(id)
        .bind(now_ms)
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
        let token = admin_token_from_row(&row)?;
        if done.rows_affected() == 0 && token.revoked_at_ms.is_none() {
            return Ok(AdminTokenRevocation::LastLive);
        }
        Ok(AdminTokenRevocation::Revoked(token))
    }

    /// Appends an entry and returns its seq.
    pub async fn insert_audit_entry(&self, entry: &NewAuditEntry) -> Result<u64, Error> {
        let finished = (entry.result != AUDIT_PENDING).then_some(entry.at_ms);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let inserted = sqlx::query(
                "INSERT INTO audit_log (seq, at_ms, actor, method, target_json, peer_address, \
                 result, finished_at_ms, role) \
                 SELECT COALESCE(MAX(seq), 0) + 1, $1, $2, $3, $4, $5, $6, $7, $8 FROM audit_log \
                 RETURNING seq",
            )
            .bind(entry.at_ms)
            .bind(&entry.actor)
            .bind(&entry.method)
            .bind(&entry.target_json)
            .bind(&entry.peer_address)
            .bind(&entry.result)
            .bind(finished)
            .bind(&entry.role)
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

    /// Entries with `seq > after_seq`, oldest first, at most `limit`.
    pub async fn list_audit_entries(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, Error> {
        let rows = sqlx::query("SELECT * FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2")
            .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// Deletes the entries of unauthenticated calls but the newest ones, at
    /// most `keep_rows` of them and at most `keep_bytes` (the length of
    /// their text columns plus [`AUDIT_ROW_OVERHEAD_BYTES`] each); returns
    /// how many went.
    pub async fn prune_unauthenticated_audit_entries(
        &self,
        keep_rows: u32,
        keep_bytes: u64,
    ) -> Result<u64, Error> {
        let done = sqlx::query(
            "DELETE FROM audit_log WHERE actor = $1 AND seq <= ( \
             SELECT MAX(seq) FROM ( \
             SELECT seq, ROW_NUMBER() OVER (ORDER BY seq DESC) AS n, \
             SUM(LENGTH(target_json) + LENGTH(method) + LENGTH(peer_address) + LENGTH(result) \
             + LENGTH(actor) + $2) OVER (ORDER BY seq DESC) AS bytes \
             FROM audit_log WHERE actor = $3) AS newest WHERE n > $4 OR bytes > $5)",
        )
        .bind(UNAUTHENTICATED_ACTOR)
        .bind(AUDIT_ROW_OVERHEAD_BYTES)
        .bind(UNAUTHENTICATED_ACTOR)
        .bind(i64::from(keep_rows))
        .bind(i64::try_from(keep_bytes).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
