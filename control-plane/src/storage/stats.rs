//! Aggregates for the fleet gauges of `/metrics`: counts grouped in SQL, so
//! a scrape reads a few rows per store, model, version and rollout rather
//! than a row per device (heartbeat ages excepted: one number per device).
//! Revoked devices are counted apart and left out of everything else.

use sqlx::Row;
use std::time::{Duration, Instant};

use super::{PeripheralRecord, Storage};
use crate::error::Error;

/// The fleet as the gauges show it, read in one pass.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FleetSnapshot {
    /// How long the pass waited for a pooled connection.
    pub acquire_wait: Duration,
    pub stores: Vec<StoreCounts>,
    pub revoked: i64,
    /// (hardware model, agent version, devices).
    pub models_and_versions: Vec<(String, String, i64)>,
    pub low_disk: i64,
    /// Devices with a failed peripheral, per proto `PeripheralKind` number
    /// (a device with two failed printers counts once for printers).
    pub failed_peripherals: Vec<(i32, i64)>,
    /// (bundle, active version, phase, devices).
    pub bundles: Vec<(String, String, String, i64)>,
    /// Devices whose last report of some bundle is `rolled_back`.
    pub rolled_back: i64,
    /// `last_seen_ms` of every enrolled device, ascending.
    pub last_seen_ms: Vec<i64>,
    /// Per store, the most copies of one bundle version its tills received
    /// from the origin (origin bytes over the version's length).
    pub origin_copies: Vec<(String, f64)>,
    /// (state, rollouts) of every rollout.
    pub rollout_states: Vec<(String, i64)>,
    pub active_rollouts: Vec<ActiveRollout>,
    /// Webhook deliveries not yet delivered nor given up.
    pub webhook_backlog: i64,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct StoreCounts {
    pub store_id: String,
    /// The store's `region` label, empty when it has none.
    pub region: String,
    pub online: i64,
    pub offline: i64,
}

/// A running or paused rollout and where its devices are.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ActiveRollout {
    pub id: String,
    pub bundle_name: String,
    pub bundle_version: String,
    pub state: String,
    pub current_wave: i64,
    pub wave_count: i64,
    /// (wave, device state in the rollout, devices).
    pub devices: Vec<(i64, String, i64)>,
    /// The last change to the rollout or to one of its devices.
    pub last_progress_ms: i64,
}

/// Proto `PeripheralState::Failed`.
const PERIPHERAL_FAILED: i32 = 3;

impl Storage {
    /// Reads the fleet gauges. A device is online when seen within
    /// `offline_after_missed_heartbeats` of its heartbeat interval.
    pub async fn fleet_snapshot(
        &self,
        now_ms: i64,
        offline_after_missed_heartbeats: i64,
    ) -> Result<FleetSnapshot, Error> {
        let asked = Instant::now();
        let mut conn = self.pool.acquire().await?;
        let mut snapshot = FleetSnapshot {
            acquire_wait: asked.elapsed(),
            ..FleetSnapshot::default()
        };
        for row in sqlx::query(
            "SELECT d.store_id, COALESCE(MAX(l.value), '') AS region, \
             SUM(CASE WHEN d.last_seen_ms + d.heartbeat_interval_seconds * $1 >= $2 \
                 THEN 1 ELSE 0 END) AS online, COUNT(*) AS total \
             FROM devices d LEFT JOIN store_labels l ON l.store_id = d.store_id AND l.key = 'region' \
             WHERE d.revoked_at_ms IS NULL GROUP BY d.store_id ORDER BY d.store_id",
        )
        .bind(1000 * offline_after_missed_heartbeats)
        .bind(now_ms)
        .fetch_all(&mut *conn)
        .await?
        {
            let online: i64 = row.try_get("online")?;
            let total: i64 = row.try_get("total")?;
            snapshot.stores.push(StoreCounts {
                store_id: row.try_get("store_id")?,
                region: row.try_get("region")?,
                online,
                offline: total - online,
            });
        }
        snapshot.revoked =
            sqlx::query("SELECT COUNT(*) AS n FROM devices WHERE revoked_at_ms IS NOT NULL")
                .fetch_one(&mut *conn)
                .await?
                .try_get("n")?;
        for row in sqlx::query(
            "SELECT hardware_model, agent_version, COUNT(*) AS n FROM devices \
             WHERE revoked_at_ms IS NULL GROUP BY hardware_model, agent_version",
        )
        .fetch_all(&mut *conn)
        .await?
        {
            snapshot.models_and_versions.push((
                row.try_get("hardware_model")?,
                row.try_get("agent_version")?,
                row.try_get("n")?,
            ));
        }
        // Below a tenth free: a download or an install may not fit.
        snapshot.low_disk = sqlx::query(
            "SELECT COUNT(*) AS n FROM devices WHERE revoked_at_ms IS NULL \
             AND disk_total_bytes > 0 AND disk_free_bytes * 10 < disk_total_bytes",
        )
        .fetch_one(&mut *conn)
        .await?
        .try_get("n")?;
        // The text match only narrows the rows; the JSON decides.
        let mut failed = std::collections::BTreeMap::<i32, i64>::new();
        for row in sqlx::query(
            "SELECT peripherals_json FROM devices WHERE revoked_at_ms IS NULL \
             AND peripherals_json LIKE '%\"state\":3%'",
        )
        .fetch_all(&mut *conn)
        .await?
        {
            let json: String = row.try_get("peripherals_json")?;
            let peripherals: Vec<PeripheralRecord> =
                serde_json::from_str(&json).unwrap_or_default();
            let mut kinds: Vec<i32> = peripherals
                .iter()
                .filter(|p| p.state == PERIPHERAL_FAILED)
                .map(|p| p.kind)
                .collect();
            kinds.sort_unstable();
            kinds.dedup();
            for kind in kinds {
                *failed.entry(kind).or_default() += 1;
            }
        }
        snapshot.failed_peripherals = failed.into_iter().collect();
        for row in sqlx::query(
            "SELECT s.name, s.active_version, s.phase, COUNT(*) AS n \
             FROM device_bundle_status s JOIN devices d ON d.id = s.device_id \
             WHERE d.revoked_at_ms IS NULL GROUP BY s.name, s.active_version, s.phase",
        )
        .fetch_all(&mut *conn)
        .await?
        {
            snapshot.bundles.push((
                row.try_get("name")?,
                row.try_get("active_version")?,
                row.try_get("phase")?,
                row.try_get("n")?,
            ));
        }
        snapshot.rolled_back = sqlx::query(
            "SELECT COUNT(DISTINCT s.device_id) AS n \
             FROM device_bundle_status s JOIN devices d ON d.id = s.device_id \
             WHERE d.revoked_at_ms IS NULL AND s.phase = 'rolled_back'",
        )
        .fetch_one(&mut *conn)
        .await?
        .try_get("n")?;
        for row in sqlx::query(
            "SELECT last_seen_ms FROM devices WHERE revoked_at_ms IS NULL ORDER BY last_seen_ms",
        )
        .fetch_all(&mut *conn)
        .await?
        {
            snapshot.last_seen_ms.push(row.try_get("last_seen_ms")?);
        }
        let mut copies = std::collections::BTreeMap::<String, f64>::new();
        for row in sqlx::query(
            "SELECT d.store_id, CAST(SUM(s.bytes_from_origin) AS BIGINT) AS origin, MAX(b.length) AS length \
             FROM device_bundle_status s JOIN devices d ON d.id = s.device_id \
             JOIN bundles b ON b.name = s.name AND b.version = s.target_version AND b.delta_from = '' \
             WHERE s.bytes_from_origin > 0 AND b.length > 0 \
             GROUP BY d.store_id, s.name, s.target_version",
        )
        .fetch_all(&mut *conn)
        .await?
        {
            let origin: i64 = row.try_get("origin")?;
            let length: i64 = row.try_get("length")?;
            let ratio = origin as f64 / length as f64;
            let store = copies.entry(row.try_get("store_id")?).or_default();
            *store = store.max(ratio);
        }
        snapshot.origin_copies = copies.into_iter().collect();
        for row in sqlx::query("SELECT state, COUNT(*) AS n FROM rollouts GROUP BY state")
            .fetch_all(&mut *conn)
            .await?
        {
            snapshot
                .rollout_states
                .push((row.try_get("state")?, row.try_get("n")?));
        }
        for row in sqlx::query(
            "SELECT id, bundle_name, bundle_version, state, current_wave, wave_count, \
             updated_at_ms FROM rollouts WHERE state IN ('running', 'paused') ORDER BY id",
        )
        .fetch_all(&mut *conn)
        .await?
        {
            snapshot.active_rollouts.push(ActiveRollout {
                id: row.try_get("id")?,
                bundle_name: row.try_get("bundle_name")?,
                bundle_version: row.try_get("bundle_version")?,
                state: row.try_get("state")?,
                current_wave: row.try_get("current_wave")?,
                wave_count: row.try_get("wave_count")?,
                devices: Vec::new(),
                last_progress_ms: row.try_get("updated_at_ms")?,
            });
        }
        for row in sqlx::query(
            "SELECT rd.rollout_id, rd.wave, rd.state, COUNT(*) AS n, \
             MAX(rd.updated_at_ms) AS last_ms \
             FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id \
             WHERE r.state IN ('running', 'paused') GROUP BY rd.rollout_id, rd.wave, rd.state",
        )
        .fetch_all(&mut *conn)
        .await?
        {
            let id: String = row.try_get("rollout_id")?;
            let Some(rollout) = snapshot.active_rollouts.iter_mut().find(|r| r.id == id) else {
                continue; // started after the read of the rollouts
            };
            let last_ms: i64 = row.try_get("last_ms")?;
            rollout.last_progress_ms = rollout.last_progress_ms.max(last_ms);
            rollout.devices.push((
                row.try_get("wave")?,
                row.try_get("state")?,
                row.try_get("n")?,
            ));
        }
        snapshot.webhook_backlog =
            sqlx::query("SELECT COUNT(*) AS n FROM webhook_deliveries WHERE state = 'pending'")
                .fetch_one(&mut *conn)
                .await?
                .try_get("n")?;
        Ok(snapshot)
    }

    /// (connections open, of them idle, most allowed) of the pool.
    pub fn pool_connections(&self) -> (u32, u32, u32) {
        (
            self.pool.size(),
            self.pool.num_idle() as u32,
            self.pool.options().get_max_connections(),
        )
    }
}
