//! Enrollment tokens (`enrollment_tokens`) and enrollment itself: one use
//! of a token spent and the device created, in one transaction.

use sqlx::Row;
use sqlx::any::AnyRow;
use std::collections::BTreeMap;

use super::{DeviceRecord, HealthRecord, Storage, is_unique_violation};
use crate::error::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentTokenRecord {
    pub id: String,
    pub store_id: String,
    pub uses_total: i64,
    pub uses_remaining: i64,
    pub expires_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct NewDevice {
    pub id: String,
    pub public_key_hex: String,
    /// SHA-256 of the secret part of the device credential.
    pub credential_sha256: String,
    pub hardware_model: String,
    pub serial_number: String,
    pub agent_version: String,
    pub heartbeat_interval_seconds: i64,
}

/// Why an enrollment was refused.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("the enrollment token is not valid")]
    UnknownToken,
    #[error("the enrollment token expired")]
    Expired { expired_at_ms: i64 },
    #[error("the enrollment token was revoked")]
    Revoked { revoked_at_ms: i64 },
    #[error("the enrollment token has no uses left")]
    UsedUp,
    #[error("this public key is already enrolled as device {device_id}")]
    PublicKeyInUse { device_id: String },
    #[error(transparent)]
    Storage(#[from] Error),
}

impl From<sqlx::Error> for EnrollError {
    fn from(error: sqlx::Error) -> Self {
        EnrollError::Storage(Error::Database(error))
    }
}

fn token_from_row(row: &AnyRow) -> Result<EnrollmentTokenRecord, Error> {
    Ok(EnrollmentTokenRecord {
        id: row.try_get("id")?,
        store_id: row.try_get("store_id")?,
        uses_total: row.try_get("uses_total")?,
        uses_remaining: row.try_get("uses_remaining")?,
        expires_at_ms: row.try_get("expires_at_ms")?,
        revoked_at_ms: row.try_get("revoked_at_ms")?,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}

impl Storage {
    pub async fn create_enrollment_token(
        &self,
        token: &EnrollmentTokenRecord,
        secret_sha256: &str,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO enrollment_tokens (id, store_id, secret_sha256, uses_total, uses_remaining, \
             expires_at_ms, revoked_at_ms, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7)",
        )
        .bind(&token.id)
        .bind(&token.store_id)
        .bind(secret_sha256)
        .bind(token.uses_total)
        .bind(token.uses_remaining)
        .bind(token.expires_at_ms)
        .bind(token.created_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn list_enrollment_tokens(
        &self,
        store_id: Option<&str>,
    ) -> Result<Vec<EnrollmentTokenRecord>, Error> {
        let query = match store_id {
            Some(store) => sqlx::query(
                "SELECT * FROM enrollment_tokens WHERE store_id = $1 ORDER BY created_at_ms, id",
            )
            .bind(store.to_string()),
            None => sqlx::query("SELECT * FROM enrollment_tokens ORDER BY created_at_ms, id"),
        };
        query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(token_from_row)
            .collect()
    }

    /// Revokes a token (idempotent: the first revocation time is kept).
    pub async fn revoke_enrollment_token(
        &self,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<EnrollmentTokenRecord>, Error> {
        sqlx::query(
            "UPDATE enrollment_tokens SET revoked_at_ms = COALESCE(revoked_at_ms, $2) WHERE id = $1 \
             RETURNING *",
        )
        .bind(id)
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(token_from_row)
        .transpose()
    }

    /// Spends one use of the token and creates the device, atomically: a
    /// refused enrollment spends nothing. A token that is unknown, revoked,
    /// expired or used up costs one read and no write: anyone can present
    /// one, and SQLite has a single writer.
    pub async fn enroll_device(
        &self,
        token_sha256: &str,
        device: &NewDevice,
        now_ms: i64,
    ) -> Result<DeviceRecord, EnrollError> {
        let token = sqlx::query("SELECT * FROM enrollment_tokens WHERE secret_sha256 = $1")
            .bind(token_sha256)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(token_from_row)
            .transpose()?;
        let Some(token) = token else {
            return Err(EnrollError::UnknownToken);
        };
        if let Some(revoked_at_ms) = token.revoked_at_ms {
            return Err(EnrollError::Revoked { revoked_at_ms });
        }
        if token.expires_at_ms <= now_ms {
            return Err(EnrollError::Expired {
                expired_at_ms: token.expires_at_ms,
            });
        }
        // A retry by a device that enrolled but never saw the answer (killed,
        // network cut): the same key, proven by the caller's signature, with
        // the token that enrolled it, gets a fresh credential for the same
        // device instead of being stranded. Only until the device's first
        // heartbeat (it has its credential by then) and while the token is
        // live, so a captured request cannot be replayed to take a device over.
        let enrolled = sqlx::query(
            "SELECT id, first_heartbeat_ms, enrollment_token_id FROM devices WHERE public_key = $1",
        )
        .bind(&device.public_key_hex)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = enrolled {
            let id: String = row.try_get("id")?;
            let first_heartbeat: Option<i64> = row.try_get("first_heartbeat_ms")?;
            let token_id: Option<String> = row.try_get("enrollment_token_id")?;
            if first_heartbeat.is_some() || token_id.as_deref() != Some(token.id.as_str()) {
                return Err(if token.uses_remaining <= 0 {
                    EnrollError::UsedUp
                } else {
                    EnrollError::PublicKeyInUse { device_id: id }
                });
            }
            let retried = sqlx::query(
                "UPDATE devices SET credential_sha256 = $1 WHERE id = $2 \
                 AND first_heartbeat_ms IS NULL AND enrollment_token_id = \
                 (SELECT id FROM enrollment_tokens WHERE id = $3 \
                 AND revoked_at_ms IS NULL AND expires_at_ms > $4) RETURNING id",
            )
            .bind(&device.credential_sha256)
            .bind(&id)
            .bind(&token.id)
            .bind(now_ms)
            .fetch_optional(&self.pool)
            .await?;
            if retried.is_none() {
                // Its first heartbeat, or a revocation, came in between.
                return Err(EnrollError::PublicKeyInUse { device_id: id });
            }
            return self.get_device(&id).await?.ok_or(EnrollError::UnknownToken);
        }
        if token.uses_remaining <= 0 {
            return Err(EnrollError::UsedUp);
        }
        let mut tx = self.pool.begin().await?;
        // The write comes first so SQLite takes its write lock up front.
        let spent = sqlx::query(
            "UPDATE enrollment_tokens SET uses_remaining = uses_remaining - 1 \
             WHERE secret_sha256 = $1 AND revoked_at_ms IS NULL AND expires_at_ms > $2 \
             AND uses_remaining > 0 RETURNING id, store_id",
        )
        .bind(token_sha256)
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(spent) = spent else {
            tx.rollback().await?;
            return Err(self.why_token_refused(token_sha256, now_ms).await?);
        };
        let token_id: String = spent.try_get("id")?;
        let store_id: String = spent.try_get("store_id")?;
        if let Some(row) = sqlx::query("SELECT id FROM devices WHERE public_key = $1")
            .bind(&device.public_key_hex)
            .fetch_optional(&mut *tx)
            .await?
        {
            tx.rollback().await?;
            return Err(EnrollError::PublicKeyInUse {
                device_id: row.try_get("id")?,
            });
        }
        let inserted = sqlx::query(
            "INSERT INTO devices (id, store_id, public_key, credential_sha256, hardware_model, \
             serial_number, enrollment_token_id, enrolled_at_ms, last_seen_ms, \
             heartbeat_interval_seconds, agent_version, installed_bundles_json, agent_uptime_seconds, \
             uptime_seconds, disk_free_bytes, disk_total_bytes, memory_total_bytes, \
             memory_available_bytes, peripherals_json) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, '{}', 0, 0, 0, 0, 0, 0, '[]')",
        )
        .bind(&device.id)
        .bind(&store_id)
        .bind(&device.public_key_hex)
        .bind(&device.credential_sha256)
        .bind(&device.hardware_model)
        .bind(&device.serial_number)
        .bind(&token_id)
        .bind(now_ms)
        .bind(device.heartbeat_interval_seconds)
        .bind(&device.agent_version)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            // Another enrollment with the same key committed in between.
            Err(e) if is_unique_violation(&e) => {
                return Err(EnrollError::PublicKeyInUse {
                    device_id: "another device".into(),
                });
            }
            Err(e) => return Err(e.into()),
        }
        tx.commit().await?;
        Ok(DeviceRecord {
            id: device.id.clone(),
            store_id,
            hardware_model: device.hardware_model.clone(),
            serial_number: device.serial_number.clone(),
            labels: BTreeMap::new(),
            enrolled_at_ms: now_ms,
            last_seen_ms: now_ms,
            heartbeat_interval_seconds: device.heartbeat_interval_seconds,
            agent_version: device.agent_version.clone(),
            installed_bundles: BTreeMap::new(),
            agent_uptime_seconds: 0,
            health: HealthRecord::default(),
            revoked: None,
            certificate: None,
        })
    }

    async fn why_token_refused(
        &self,
        token_sha256: &str,
        now_ms: i64,
    ) -> Result<EnrollError, Error> {
        let row = sqlx::query("SELECT * FROM enrollment_tokens WHERE secret_sha256 = $1")
            .bind(token_sha256)
            .fetch_optional(&self.pool)
            .await?;
        let Some(token) = row.as_ref().map(token_from_row).transpose()? else {
            return Ok(EnrollError::UnknownToken);
        };
        Ok(if let Some(revoked_at_ms) = token.revoked_at_ms {
            EnrollError::Revoked { revoked_at_ms }
        } else if token.expires_at_ms <= now_ms {
            EnrollError::Expired {
                expired_at_ms: token.expires_at_ms,
            }
        } else {
            EnrollError::UsedUp
        })
    }
}
