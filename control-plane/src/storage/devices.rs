//! Devices (`devices`, `device_labels`): their heartbeats, labels, counts,
//! revocation and P2P addresses.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;
use std::collections::BTreeMap;

use super::{Param, Placeholders, Storage, bind_all};
use crate::error::Error;

/// Heartbeats written per statement (12 parameters each; both databases
/// accept well over 6,000 parameters).
const HEARTBEAT_ROWS_PER_STATEMENT: usize = 500;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedRecord {
    pub at_ms: i64,
    pub reason: String,
}

/// A peripheral as reported in the last heartbeat (proto enum values kept as
/// numbers so an agent newer than the server loses nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeripheralRecord {
    pub kind: i32,
    pub name: String,
    pub state: i32,
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthRecord {
    pub uptime_seconds: i64,
    pub disk_free_bytes: i64,
    pub disk_total_bytes: i64,
    pub memory_total_bytes: i64,
    pub memory_available_bytes: i64,
    pub peripherals: Vec<PeripheralRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub id: String,
    pub store_id: String,
    pub hardware_model: String,
    pub serial_number: String,
    pub labels: BTreeMap<String, String>,
    pub enrolled_at_ms: i64,
    pub last_seen_ms: i64,
    pub heartbeat_interval_seconds: i64,
    pub agent_version: String,
    pub installed_bundles: BTreeMap<String, String>,
    pub agent_uptime_seconds: i64,
    pub health: HealthRecord,
    pub revoked: Option<RevokedRecord>,
    /// The certificate last issued to the device, over TLS.
    pub certificate: Option<CertificateRecord>,
}

/// A device certificate the control plane issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRecord {
    /// Serial number, in lowercase hex.
    pub serial: String,
    pub not_after_ms: i64,
    /// SHA-256 (hex) of the CA that issued it; empty if not recorded.
    pub ca_fingerprint: String,
}

/// What renewing a device's certificate is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewalRecord {
    pub store_id: String,
    /// The key the device enrolled with: a renewal is for that key only.
    pub public_key_hex: String,
    pub revoked: bool,
    pub certificate: Option<CertificateRecord>,
}

/// What the control plane needs to check a device credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAuth {
    pub credential_sha256: String,
    pub store_id: String,
    /// The CA of the certificate last issued to it (see
    /// [`CertificateRecord::ca_fingerprint`]).
    pub certificate_ca: String,
}

/// One device's reported state from one heartbeat.
#[derive(Debug, Clone)]
pub struct HeartbeatRecord {
    pub device_id: String,
    pub seen_at_ms: i64,
    pub heartbeat_interval_seconds: i64,
    pub agent_version: String,
    pub installed_bundles: BTreeMap<String, String>,
    pub agent_uptime_seconds: i64,
    pub health: HealthRecord,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Online,
    Offline,
}

#[derive(Debug, Clone)]
pub struct DeviceFilter {
    pub store_id: Option<String>,
    pub status: Option<StatusFilter>,
    pub labels: BTreeMap<String, String>,
    /// Keyset pagination: only devices whose id sorts after this one.
    pub after_id: String,
    pub limit: i64,
    pub now_ms: i64,
    pub offline_after_missed_heartbeats: i64,
}

/// True when a device seen at `last_seen_ms` is still online at `now_ms`.
/// The SQL filters in `list_devices` use the same rule.
pub fn is_online(
    last_seen_ms: i64,
    heartbeat_interval_seconds: i64,
    offline_after_missed_heartbeats: i64,
    now_ms: i64,
) -> bool {
    last_seen_ms + heartbeat_interval_seconds * 1000 * offline_after_missed_heartbeats >= now_ms
}

const DEVICE_COLUMNS: &str = "d.id, d.store_id, d.hardware_model, d.serial_number, \
    d.enrolled_at_ms, d.last_seen_ms, d.heartbeat_interval_seconds, d.agent_version, \
    d.installed_bundles_json, d.agent_uptime_seconds, d.uptime_seconds, d.disk_free_bytes, \
    d.disk_total_bytes, d.memory_total_bytes, d.memory_available_bytes, d.peripherals_json, \
    d.revoked_at_ms, d.revoked_reason, d.certificate_serial, d.certificate_not_after_ms, \
    d.certificate_ca";

fn device_from_row(row: &AnyRow) -> Result<DeviceRecord, Error> {
    let installed: String = row.try_get("installed_bundles_json")?;
    let peripherals: String = row.try_get("peripherals_json")?;
    let id: String = row.try_get("id")?;
    Ok(DeviceRecord {
        installed_bundles: serde_json::from_str(&installed)
            .map_err(|e| Error::Corrupt(format!("installed bundles of {id}: {e}")))?,
        health: HealthRecord {
            uptime_seconds: row.try_get("uptime_seconds")?,
            disk_free_bytes: row.try_get("disk_free_bytes")?,
            disk_total_bytes: row.try_get("disk_total_bytes")?,
            memory_total_bytes: row.try_get("memory_total_bytes")?,
            memory_available_bytes: row.try_get("memory_available_bytes")?,
            peripherals: serde_json::from_str(&peripherals)
                .map_err(|e| Error::Corrupt(format!("peripherals of {id}: {e}")))?,
        },
        store_id: row.try_get("store_id")?,
        hardware_model: row.try_get("hardware_model")?,
        serial_number: row.try_get("serial_number")?,
        labels: BTreeMap::new(),
        enrolled_at_ms: row.try_get("enrolled_at_ms")?,
        last_seen_ms: row.try_get("last_seen_ms")?,
        heartbeat_interval_seconds: row.try_get("heartbeat_interval_seconds")?,
        agent_version: row.try_get("agent_version")?,
        agent_uptime_seconds: row.try_get("agent_uptime_seconds")?,
        revoked: match row.try_get::<Option<i64>, _>("revoked_at_ms")? {
            Some(at_ms) => Some(RevokedRecord {
                at_ms,
                reason: row.try_get("revoked_reason")?,
            }),
            None => None,
        },
        certificate: certificate_from_row(row)?,
        id,
    })
}

fn certificate_from_row(row: &AnyRow) -> Result<Option<CertificateRecord>, Error> {
    Ok(row
        .try_get::<Option<i64>, _>("certificate_not_after_ms")?
        .map(|not_after_ms| {
            Ok::<_, sqlx::Error>(CertificateRecord {
                serial: row.try_get("certificate_serial")?,
                not_after_ms,
                ca_fingerprint: row.try_get("certificate_ca")?,
            })
        })
        .transpose()?)
}

impl Storage {
    pub async fn device_auth(&self, device_id: &str) -> Result<Option<DeviceAuth>, Error> {
        sqlx::query("SELECT credential_sha256, store_id, certificate_ca FROM devices WHERE id = $1")
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| {
                Ok(DeviceAuth {
                    credential_sha256: row.try_get("credential_sha256")?,
                    store_id: row.try_get("store_id")?,
                    certificate_ca: row.try_get("certificate_ca")?,
                })
            })
            .transpose()
    }

    /// Writes a batch of heartbeats in a few multi-row statements, each
    /// unless the device was seen later already. The caller keeps at most
    /// one heartbeat per device in a batch.
    pub async fn record_heartbeats(&self, batch: &[HeartbeatRecord]) -> Result<(), Error> {
        for chunk in batch.chunks(HEARTBEAT_ROWS_PER_STATEMENT) {
            let mut sql = String::from(
                "UPDATE devices SET last_seen_ms = v.column2, \
                 first_heartbeat_ms = COALESCE(first_heartbeat_ms, v.column2), \
                 heartbeat_interval_seconds = v.column3, \
                 agent_version = v.column4, installed_bundles_json = v.column5, \
                 agent_uptime_seconds = v.column6, uptime_seconds = v.column7, \
                 disk_free_bytes = v.column8, disk_total_bytes = v.column9, \
                 memory_total_bytes = v.column10, memory_available_bytes = v.column11, \
                 peripherals_json = v.column12 FROM (VALUES ",
            );
            let mut params = Vec::with_capacity(chunk.len() * 12);
            let mut placeholders = Placeholders::new(self.backend);
            for (i, hb) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                let row: Vec<String> = (0..12).map(|_| placeholders.next()).collect();
                sql.push_str(&format!("({})", row.join(", ")));
                let installed = serde_json::to_string(&hb.installed_bundles)
                    .map_err(|e| Error::Corrupt(e.to_string()))?;
                let peripherals = serde_json::to_string(&hb.health.peripherals)
                    .map_err(|e| Error::Corrupt(e.to_string()))?;
                params.extend([
                    Param::Text(hb.device_id.clone()),
                    Param::Int(hb.seen_at_ms),
                    Param::Int(hb.heartbeat_interval_seconds),
                    Param::Text(hb.agent_version.clone()),
                    Param::Text(installed),
                    Param::Int(hb.agent_uptime_seconds),
                    Param::Int(hb.health.uptime_seconds),
                    Param::Int(hb.health.disk_free_bytes),
                    Param::Int(hb.health.disk_total_bytes),
                    Param::Int(hb.health.memory_total_bytes),
                    Param::Int(hb.health.memory_available_bytes),
                    Param::Text(peripherals),
                ]);
            }
            // A batch another replica wrote later may hold a newer
            // heartbeat of the device (it reconnected there while this
            // replica was stopping, or retrying its write): that one stays.
            sql.push_str(
                ") AS v WHERE devices.id = v.column1 AND devices.last_seen_ms <= v.column2",
            );
            bind_all(sqlx::query(&sql).persistent(false), params)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    pub async fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>, Error> {
        let row = sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut devices = vec![device_from_row(&row)?];
        self.attach_labels(&mut devices).await?;
        Ok(devices.pop())
    }

    pub async fn list_devices(&self, filter: &DeviceFilter) -> Result<Vec<DeviceRecord>, Error> {
        let mut placeholders = Placeholders::new(self.backend);
        let mut sql = format!(
            "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.id > {}",
            placeholders.next()
        );
        let mut params = vec![Param::Text(filter.after_id.clone())];
        let mut next = |params: &mut Vec<Param>, p: Param| {
            params.push(p);
            placeholders.next()
        };
        if let Some(store) = &filter.store_id {
            let p = next(&mut params, Param::Text(store.clone()));
            sql.push_str(&format!(" AND d.store_id = {p}"));
        }
        if let Some(status) = filter.status {
            let window = next(
                &mut params,
                Param::Int(1000 * filter.offline_after_missed_heartbeats),
            );
            let now = next(&mut params, Param::Int(filter.now_ms));
            let op = match status {
                StatusFilter::Online => ">=",
                StatusFilter::Offline => "<",
            };
            sql.push_str(&format!(
                " AND d.last_seen_ms + d.heartbeat_interval_seconds * {window} {op} {now}"
            ));
        }
        for (key, value) in &filter.labels {
            let k = next(&mut params, Param::Text(key.clone()));
            let v = next(&mut params, Param::Text(value.clone()));
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM device_labels l WHERE l.device_id = d.id \
                 AND l.key = {k} AND l.value = {v})"
            ));
        }
        let limit = next(&mut params, Param::Int(filter.limit));
        sql.push_str(&format!(" ORDER BY d.id LIMIT {limit}"));
        let rows = bind_all(sqlx::query(&sql).persistent(false), params)
            .fetch_all(&self.pool)
            .await?;
        let mut devices = rows
            .iter()
            .map(device_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        self.attach_labels(&mut devices).await?;
        Ok(devices)
    }

    async fn attach_labels(&self, devices: &mut [DeviceRecord]) -> Result<(), Error> {
        if devices.is_empty() {
            return Ok(());
        }
        let mut next = Placeholders::new(self.backend);
        let placeholders: Vec<String> = devices.iter().map(|_| next.next()).collect();
        let sql = format!(
            "SELECT device_id, key, value FROM device_labels WHERE device_id IN ({})",
            placeholders.join(", ")
        );
        let params = devices.iter().map(|d| Param::Text(d.id.clone())).collect();
        let rows = bind_all(sqlx::query(&sql).persistent(false), params)
            .fetch_all(&self.pool)
            .await?;
        let mut by_device: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for row in rows {
            by_device
                .entry(row.try_get("device_id")?)
                .or_default()
                .insert(row.try_get("key")?, row.try_get("value")?);
        }
        for device in devices {
            if let Some(labels) = by_device.remove(&device.id) {
                device.labels = labels;
            }
        }
        Ok(())
    }

    /// Sets and removes labels in one transaction; `None` if no such device.
    pub async fn set_device_labels(
        &self,
        id: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Option<DeviceRecord>, Error> {
        if self.device_auth(id).await?.is_none() {
            return Ok(None);
        }
        let mut tx = self.pool.begin().await?;
        for (key, value) in set {
            sqlx::query(
                "INSERT INTO device_labels (device_id, key, value) VALUES ($1, $2, $3) \
                 ON CONFLICT (device_id, key) DO UPDATE SET value = excluded.value",
            )
            .bind(id)
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        }
        for key in remove {
            sqlx::query("DELETE FROM device_labels WHERE device_id = $1 AND key = $2")
                .bind(id)
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.get_device(id).await
    }

    /// (online, total) device counts, for the metrics endpoint.
    pub async fn count_devices(
        &self,
        now_ms: i64,
        offline_after_missed_heartbeats: i64,
    ) -> Result<(i64, i64), Error> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS total, \
             COALESCE(SUM(CASE WHEN last_seen_ms + heartbeat_interval_seconds * $1 >= $2 \
             THEN 1 ELSE 0 END), 0) AS online FROM devices",
        )
        .bind(1000 * offline_after_missed_heartbeats)
        .bind(now_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get("online")?, row.try_get("total")?))
    }

    /// Records where a till listens for its store's other tills.
    pub async fn set_p2p_addrs(&self, device_id: &str, addrs: &[String]) -> Result<(), Error> {
        let json = serde_json::to_string(addrs).expect("strings serialize");
        sqlx::query("UPDATE devices SET p2p_addrs_json = $1 WHERE id = $2")
            .bind(json)
            .bind(device_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Revokes a device: it is refused from then on and leaves its store's
    /// membership list. Returns its store, or `None` for an unknown
    /// device. Revoking a revoked device keeps the first revocation.
    pub async fn revoke_device(
        &self,
        device_id: &str,
        reason: &str,
        at_ms: i64,
    ) -> Result<Option<String>, Error> {
        sqlx::query(
            "UPDATE devices SET revoked_at_ms = $1, revoked_reason = $2 \
             WHERE id = $3 AND revoked_at_ms IS NULL",
        )
        .bind(at_ms)
        .bind(reason)
        .bind(device_id)
        .execute(&self.pool)
        .await?;
        Ok(sqlx::query("SELECT store_id FROM devices WHERE id = $1")
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| row.try_get("store_id"))
            .transpose()?)
    }

    /// Records the certificate just issued to a device.
    pub async fn set_device_certificate(
        &self,
        device_id: &str,
        certificate: &CertificateRecord,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE devices SET certificate_serial = $1, certificate_not_after_ms = $2, \
             certificate_ca = $3 WHERE id = $4",
        )
        .bind(&certificate.serial)
        .bind(certificate.not_after_ms)
        .bind(&certificate.ca_fingerprint)
        .bind(device_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// What a renewal of the device's certificate is checked against;
    /// `None` for an unknown device.
    pub async fn device_renewal(&self, device_id: &str) -> Result<Option<RenewalRecord>, Error> {
        sqlx::query(
            "SELECT store_id, public_key, revoked_at_ms, certificate_serial, certificate_not_after_ms, \
             certificate_ca FROM devices WHERE id = $1",
        )
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| {
            Ok(RenewalRecord {
                store_id: row.try_get("store_id")?,
                public_key_hex: row.try_get("public_key")?,
                revoked: row.try_get::<Option<i64>, _>("revoked_at_ms")?.is_some(),
                certificate: certificate_from_row(&row)?,
            })
        })
        .transpose()
    }

    /// How many enrolled, unrevoked devices hold a certificate that is
    /// still usable (it ends after `usable_after_ms`: renewable at least),
    /// by the CA that issued it (empty when not recorded).
    pub async fn certificates_by_ca(
        &self,
        usable_after_ms: i64,
    ) -> Result<Vec<(String, u64)>, Error> {
        let rows = sqlx::query(
            "SELECT certificate_ca, COUNT(*) AS devices FROM devices \
             WHERE revoked_at_ms IS NULL AND certificate_serial <> '' \
             AND certificate_not_after_ms > $1 GROUP BY certificate_ca",
        )
        .bind(usable_after_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| {
                let devices: i64 = row.try_get("devices")?;
                Ok((row.try_get("certificate_ca")?, devices.max(0) as u64))
            })
            .collect::<Result<_, sqlx::Error>>()?)
    }

    /// The enrolled, unrevoked devices holding a still usable certificate
    /// (as in [`Storage::certificates_by_ca`]) that CA `ca` did not issue.
    pub async fn certificate_holders_not_of(
        &self,
        ca: &str,
        usable_after_ms: i64,
    ) -> Result<Vec<String>, Error> {
        let rows = sqlx::query(
            "SELECT id FROM devices WHERE revoked_at_ms IS NULL AND certificate_serial <> '' \
             AND certificate_not_after_ms > $1 AND certificate_ca <> $2 ORDER BY id",
        )
        .bind(usable_after_ms)
        .bind(ca)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| row.try_get("id"))
            .collect::<Result<_, _>>()?)
    }

    /// Every revoked device's id.
    pub async fn revoked_device_ids(&self) -> Result<Vec<String>, Error> {
        let rows = sqlx::query("SELECT id FROM devices WHERE revoked_at_ms IS NOT NULL")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|row| row.try_get("id"))
            .collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_rule_counts_missed_intervals() {
        // 30 s interval, offline after 3 missed: online up to 90 s after.
        assert!(is_online(0, 30, 3, 90_000));
        assert!(!is_online(0, 30, 3, 90_001));
    }
}
