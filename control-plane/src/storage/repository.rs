//! The bundle repository: its signed metadata files (`repo_metadata`), the
//! published bundles (`bundles`) and, for replicas that share them, the
//! sealed online keys (`repository_online_keys`).

use sqlx::Row;
use sqlx::any::AnyRow;
use std::collections::HashMap;

use super::{Backend, Storage};
use crate::error::Error;

/// Key of the PostgreSQL advisory lock held while a replica signs and
/// stores online metadata ("posfrepo" in ASCII).
const ONLINE_SIGNING_LOCK_KEY: i64 = 0x706f_7366_7265_706f;

/// Held while online metadata is signed and stored (see
/// [`Storage::lock_online_signing`]).
pub struct OnlineSigningLock {
    tx: Option<sqlx::Transaction<'static, sqlx::Any>>,
}

impl OnlineSigningLock {
    /// Releases the lock (dropping it would too, when its connection goes
    /// back to the pool and its transaction is rolled back).
    pub async fn release(self) {
        if let Some(tx) = self.tx {
            let _ = tx.commit().await;
        }
    }
}

/// One signed metadata file of the bundle repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataRecord {
    pub role: String,
    pub version: i64,
    pub body: String,
    pub expires_at_ms: i64,
}

/// A published bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleRecord {
    pub target: String,
    pub name: String,
    pub version: String,
    pub kind: String,
    pub hardware: Vec<String>,
    pub length: i64,
    pub sha256: String,
    pub chunks_sha256: String,
    pub targets_version: i64,
    pub published_at_ms: i64,
    /// On a delta: the version it rebuilds `version` from (`name`, `version`,
    /// `kind` and `hardware` are then the rebuilt bundle's; `length` and the
    /// hashes the delta file's). Empty for a bundle.
    pub delta_from: String,
}

/// An online key sealed with a key-encryption key (`crate::online_keys`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedKey {
    /// Names the key-encryption key.
    pub kek_id: String,
    pub nonce_hex: String,
    pub sealed_hex: String,
}

fn bundle_from_row(row: &AnyRow) -> Result<BundleRecord, Error> {
    let hardware: String = row.try_get("hardware_json")?;
    Ok(BundleRecord {
        target: row.try_get("target")?,
        name: row.try_get("name")?,
        version: row.try_get("version")?,
        kind: row.try_get("kind")?,
        hardware: serde_json::from_str(&hardware)
            .map_err(|e| Error::Corrupt(format!("bundle hardware: {e}")))?,
        length: row.try_get("length")?,
        sha256: row.try_get("sha256")?,
        chunks_sha256: row.try_get("chunks_sha256")?,
        targets_version: row.try_get("targets_version")?,
        published_at_ms: row.try_get("published_at_ms")?,
        delta_from: row.try_get("delta_from")?,
    })
}

impl Storage {
    /// The sealed online key of `role` (snapshot or timestamp), if stored.
    pub async fn sealed_online_key(&self, role: &str) -> Result<Option<SealedKey>, Error> {
        sqlx::query(
            "SELECT kek_id, nonce_hex, sealed_hex FROM repository_online_keys WHERE role = $1",
        )
        .bind(role)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| {
            Ok(SealedKey {
                kek_id: row.try_get("kek_id")?,
                nonce_hex: row.try_get("nonce_hex")?,
                sealed_hex: row.try_get("sealed_hex")?,
            })
        })
        .transpose()
    }

    /// Stores the sealed online key of `role` unless one is: `false` when
    /// another replica stored its own first.
    pub async fn insert_sealed_online_key(
        &self,
        role: &str,
        key: &SealedKey,
        now_ms: i64,
    ) -> Result<bool, Error> {
        let inserted = sqlx::query(
            "INSERT INTO repository_online_keys (role, kek_id, nonce_hex, sealed_hex, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (role) DO NOTHING",
        )
        .bind(role)
        .bind(&key.kek_id)
        .bind(&key.nonce_hex)
        .bind(&key.sealed_hex)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    /// The newest version of a metadata role and its file.
    pub async fn latest_metadata(&self, role: &str) -> Result<Option<(i64, String)>, Error> {
        sqlx::query(
            "SELECT version, body FROM repo_metadata WHERE role = $1 ORDER BY version DESC LIMIT 1",
        )
        .bind(role)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| Ok((row.try_get("version")?, row.try_get("body")?)))
        .transpose()
    }

    pub async fn metadata(&self, role: &str, version: i64) -> Result<Option<String>, Error> {
        sqlx::query("SELECT body FROM repo_metadata WHERE role = $1 AND version = $2")
            .bind(role)
            .bind(version)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| Ok(row.try_get("body")?))
            .transpose()
    }

    /// Stores metadata files (and the bundle they publish) in one
    /// transaction. `Ok(false)` when one of the versions exists already:
    /// another change got there first, and nothing was written.
    /// Makes replicas sign online metadata one at a time: on PostgreSQL a
    /// transaction-level advisory lock, taken by a transaction of its own
    /// that holds it until the returned lock is released or dropped (a
    /// cancelled call cannot leave it held); on SQLite, which one process
    /// serves, nothing.
    pub async fn lock_online_signing(&self) -> Result<OnlineSigningLock, Error> {
        if self.backend == Backend::Sqlite {
            return Ok(OnlineSigningLock { tx: None });
        }
        let mut tx = self.pool.begin().await?;
        // Wrapped: the Any driver cannot decode the lock function's `void`.
        sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock($1)) AS locked")
            .bind(ONLINE_SIGNING_LOCK_KEY)
            .execute(&mut *tx)
            .await?;
        Ok(OnlineSigningLock { tx: Some(tx) })
    }

    pub async fn insert_metadata(
        &self,
        files: &[MetadataRecord],
        bundle: Option<&BundleRecord>,
        now_ms: i64,
    ) -> Result<bool, Error> {
        let mut tx = self.pool.begin().await?;
        for file in files {
            let inserted = sqlx::query(
                "INSERT INTO repo_metadata (role, version, body, expires_at_ms, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (role, version) DO NOTHING",
            )
            .bind(&file.role)
            .bind(file.version)
            .bind(&file.body)
            .bind(file.expires_at_ms)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
        }
        if let Some(b) = bundle {
            let hardware =
                serde_json::to_string(&b.hardware).expect("a list of strings serializes");
            let inserted = sqlx::query(
                "INSERT INTO bundles (target, name, version, kind, hardware_json, length, sha256, \
                 chunks_sha256, targets_version, published_at_ms, delta_from) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (target) DO NOTHING",
            )
            .bind(&b.target)
            .bind(&b.name)
            .bind(&b.version)
            .bind(&b.kind)
            .bind(hardware)
            .bind(b.length)
            .bind(&b.sha256)
            .bind(&b.chunks_sha256)
            .bind(b.targets_version)
            .bind(b.published_at_ms)
            .bind(&b.delta_from)
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The published bundles (of `name`) and their deltas.
    pub async fn list_bundles(&self, name: Option<&str>) -> Result<Vec<BundleRecord>, Error> {
        let query = match name {
            Some(name) => sqlx::query(
                "SELECT * FROM bundles WHERE name = $1 ORDER BY published_at_ms, target",
            )
            .bind(name.to_string()),
            None => sqlx::query("SELECT * FROM bundles ORDER BY name, published_at_ms, target"),
        };
        query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(bundle_from_row)
            .collect()
    }

    /// The published bundle `name` `version`, if any.
    pub async fn get_bundle(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<BundleRecord>, Error> {
        self.bundle_by_target(&format!("{name}/{version}")).await
    }

    /// The published bundle or delta whose target is `target`, if any.
    pub async fn bundle_by_target(&self, target: &str) -> Result<Option<BundleRecord>, Error> {
        sqlx::query("SELECT * FROM bundles WHERE target = $1")
            .bind(target.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(bundle_from_row)
            .transpose()
    }

    /// Per bundle name and version (of `name`), the devices that last
    /// reported it as their confirmed version, revoked ones left out.
    pub async fn active_devices(
        &self,
        name: Option<&str>,
    ) -> Result<HashMap<(String, String), i64>, Error> {
        let select = "SELECT st.name, st.active_version, COUNT(*) AS devices \
                      FROM device_bundle_status st JOIN devices d ON d.id = st.device_id \
                      WHERE st.active_version <> '' AND d.revoked_at_ms IS NULL";
        let group = "GROUP BY st.name, st.active_version";
        let sql = match name {
            Some(_) => format!("{select} AND st.name = $1 {group}"),
            None => format!("{select} {group}"),
        };
        let mut query = sqlx::query(&sql).persistent(false);
        if let Some(name) = name {
            query = query.bind(name.to_string());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok((
                    (row.try_get("name")?, row.try_get("active_version")?),
                    row.try_get("devices")?,
                ))
            })
            .collect()
    }
}
