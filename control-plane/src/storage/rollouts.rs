//! Rollouts, their waves and devices, store labels, and the lock that lets
//! one replica run the rollout engine.
//!
//! Every change to a rollout goes through a `RolloutWrite`: a transaction
//! whose first statement moves the rollout's `revision` on, but only from
//! the revision the change was computed from. A change computed from an
//! older read (a pause by ops while the engine was deciding, a second
//! engine during a hand-over) finds another revision and writes nothing.
//! Its events are appended last, then it commits: state and events land
//! together or not at all.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use std::collections::{BTreeMap, HashMap};

use super::{Backend, DesiredBundleRecord, Param, Placeholders, Storage, StoreRecord, bind_all};
use crate::error::Error;
use crate::rollout::model::{Counts, DeviceState, RolloutState, Selector};
use crate::storage::NewEvent;

/// Rows per multi-row statement (at most 8 parameters each).
const ROWS_PER_STATEMENT: usize = 500;

/// Key of the PostgreSQL advisory lock held by the replica running the
/// engine ("posfleet" in ASCII).
const ENGINE_LOCK_KEY: i64 = 0x706f_7366_6c65_6574;

const IN_FLIGHT: &str = "('notified', 'downloading', 'installing')";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutRecord {
    pub id: String,
    pub bundle_name: String,
    pub bundle_version: String,
    pub bundle_kind: String,
    pub selector_json: String,
    pub strategy_json: String,
    pub state: RolloutState,
    pub current_wave: i64,
    pub wave_count: i64,
    pub reason: String,
    pub revision: i64,
    pub created_by: String,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub updated_at_ms: i64,
    /// The id of the person who created it, who may not approve it: a
    /// user's id, the id of the user a token belongs to, or (a token of
    /// nobody's, and rows made before users existed) the token's id.
    pub created_by_id: String,
    /// Devices selected at creation, or at the last start refused for
    /// want of an approval.
    pub selected_devices: i64,
    /// The approver's name and their person's id (as `created_by_id`);
    /// empty until approved.
    pub approved_by: String,
    pub approved_by_id: String,
    pub approved_at_ms: Option<i64>,
    /// The canary analysis policy (TOML); empty for none.
    pub analysis_policy: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaveRecord {
    pub wave: i64,
    pub upper_seed: Option<i64>,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub bake_until_ms: Option<i64>,
    pub failures_acknowledged: i64,
    /// The latest canary analysis judgement: its verdict (`observing`,
    /// `pass`, `fail`, `inconclusive`, or `accepted` by an operator's
    /// resume), the judgement as JSON, and when.
    pub analysis_verdict: Option<String>,
    pub analysis_json: Option<String>,
    pub analysis_at_ms: Option<i64>,
}

/// A device of a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutDeviceRecord {
    pub device_id: String,
    pub store_id: String,
    pub wave: i64,
    pub state: DeviceState,
    pub reason: String,
    pub previous_version: Option<String>,
    pub notified_at_ms: Option<i64>,
    pub updated_at_ms: i64,
}

/// A device a selector matches, with its active version of the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedDevice {
    pub device_id: String,
    pub store_id: String,
    pub hardware_model: String,
    /// From its last report of the bundle, else its last heartbeat; empty
    /// when it has none.
    pub active_version: String,
}

/// A dispatched device the engine follows, with what it reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedDevice {
    pub device_id: String,
    pub store_id: String,
    pub wave: i64,
    pub state: DeviceState,
    pub notified_at_ms: i64,
    /// Its `device_bundle_status` row for the bundle, if any:
    /// (active_version, target_version, phase, error).
    pub report: Option<(String, String, String, String)>,
    /// The bundle's version in its last heartbeat.
    pub installed_version: Option<String>,
    pub time_zone: String,
    pub window: Option<(i64, i64)>,
}

/// A pending device of a wave, and the version it would roll back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDevice {
    pub device_id: String,
    pub store_id: String,
    /// Its active version of the bundle, else the version its own desired
    /// row names, else empty.
    pub previous_version: String,
}

/// A device joining a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRolloutDevice {
    pub device_id: String,
    pub store_id: String,
    pub wave: i64,
}

/// A device's move from one state to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceChange {
    pub device_id: String,
    pub from: DeviceState,
    pub to: DeviceState,
    pub reason: String,
}

/// A device dispatched: its desired state names the release from now on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    pub device_id: String,
    pub previous_version: String,
}

fn state_error(what: &str, value: &str) -> Error {
    Error::Corrupt(format!("unknown {what} state `{value}`"))
}

fn rollout_from_row(row: &AnyRow) -> Result<RolloutRecord, Error> {
    let state: String = row.try_get("state")?;
    Ok(RolloutRecord {
        id: row.try_get("id")?,
        bundle_name: row.try_get("bundle_name")?,
        bundle_version: row.try_get("bundle_version")?,
        bundle_kind: row.try_get("bundle_kind")?,
        selector_json: row.try_get("selector_json")?,
        strategy_json: row.try_get("strategy_json")?,
        state: RolloutState::parse(&state).ok_or_else(|| state_error("rollout", &state))?,
        current_wave: row.try_get("current_wave")?,
        wave_count: row.try_get("wave_count")?,
        reason: row.try_get("reason")?,
        revision: row.try_get("revision")?,
        created_by: row.try_get("created_by")?,
        created_at_ms: row.try_get("created_at_ms")?,
        started_at_ms: row.try_get("started_at_ms")?,
        finished_at_ms: row.try_get("finished_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
        created_by_id: row.try_get("created_by_id")?,
        selected_devices: row.try_get("selected_devices")?,
        approved_by: row.try_get("approved_by")?,
        approved_by_id: row.try_get("approved_by_id")?,
        approved_at_ms: row.try_get("approved_at_ms")?,
        analysis_policy: row.try_get("analysis_policy")?,
    })
}

fn device_state(row: &AnyRow) -> Result<DeviceState, Error> {
    let state: String = row.try_get("state")?;
    DeviceState::parse(&state).ok_or_else(|| state_error("device", &state))
}

fn rollout_device_from_row(row: &AnyRow) -> Result<RolloutDeviceRecord, Error> {
    Ok(RolloutDeviceRecord {
        device_id: row.try_get("device_id")?,
        store_id: row.try_get("store_id")?,
        wave: row.try_get("wave")?,
        state: device_state(row)?,
        reason: row.try_get("reason")?,
        previous_version: row.try_get("previous_version")?,
        notified_at_ms: row.try_get("notified_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

/// The version of `bundle` in a heartbeat's `installed_bundles_json`.
fn installed_version(json: &str, bundle: &str) -> Option<String> {
    serde_json::from_str::<BTreeMap<String, String>>(json)
        .ok()?
        .remove(bundle)
}

/// Counts by a key, from rows of (key, state, n).
fn counts_by<K: Ord>(rows: Vec<(K, String, i64)>) -> Result<BTreeMap<K, Counts>, Error> {
    let mut out: BTreeMap<K, Counts> = BTreeMap::new();
    for (key, state, n) in rows {
        let state = DeviceState::parse(&state).ok_or_else(|| state_error("device", &state))?;
        out.entry(key).or_default().add(state, n.max(0) as u64);
    }
    Ok(out)
}

impl Storage {
    // ----- store labels -----

    /// Fills in the labels of these stores.
    pub(super) async fn attach_store_labels(
        &self,
        stores: &mut [StoreRecord],
    ) -> Result<(), Error> {
        if stores.is_empty() {
            return Ok(());
        }
        let mut next = Placeholders::new(self.backend);
        let placeholders: Vec<String> = stores.iter().map(|_| next.next()).collect();
        let sql = format!(
            "SELECT store_id, key, value FROM store_labels WHERE store_id IN ({})",
            placeholders.join(", ")
        );
        let params = stores.iter().map(|s| Param::Text(s.id.clone())).collect();
        let rows = bind_all(sqlx::query(&sql).persistent(false), params)
            .fetch_all(&self.pool)
            .await?;
        let mut by_store: HashMap<String, BTreeMap<String, String>> = HashMap::new();
        for row in rows {
            by_store
                .entry(row.try_get("store_id")?)
                .or_default()
                .insert(row.try_get("key")?, row.try_get("value")?);
        }
        for store in stores {
            store.labels = by_store.remove(&store.id).unwrap_or_default();
        }
        Ok(())
    }

    /// Sets and removes a store's labels, with `event`, in one transaction;
    /// `None` if no such store.
    pub async fn set_store_labels(
        &self,
        store_id: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
        event: &NewEvent,
        now_ms: i64,
    ) -> Result<Option<StoreRecord>, Error> {
        let mut tx = self.pool.begin().await?;
        // A write first, so SQLite takes its write lock up front.
        let found = sqlx::query("UPDATE stores SET id = id WHERE id = $1")
            .bind(store_id)
            .execute(&mut *tx)
            .await?;
        if found.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        for (key, value) in set {
            sqlx::query(
                "INSERT INTO store_labels (store_id, key, value) VALUES ($1, $2, $3) \
                 ON CONFLICT (store_id, key) DO UPDATE SET value = excluded.value",
            )
            .bind(store_id)
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        }
        for key in remove {
            sqlx::query("DELETE FROM store_labels WHERE store_id = $1 AND key = $2")
                .bind(store_id)
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        self.append_event(&mut tx, now_ms, event).await?;
        tx.commit().await?;
        self.count_events(std::slice::from_ref(event));
        self.get_store(store_id).await
    }

    // ----- rollouts -----

    /// Stores a new (draft) rollout with its event.
    pub async fn insert_rollout(
        &self,
        rollout: &RolloutRecord,
        event: &NewEvent,
    ) -> Result<(), Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO rollouts (id, bundle_name, bundle_version, bundle_kind, selector_json, \
             strategy_json, state, current_wave, wave_count, reason, revision, created_by, \
             created_at_ms, started_at_ms, finished_at_ms, updated_at_ms, created_by_id, \
             selected_devices, analysis_policy) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
             $17, $18, $19)",
        )
        .bind(&rollout.id)
        .bind(&rollout.bundle_name)
        .bind(&rollout.bundle_version)
        .bind(&rollout.bundle_kind)
        .bind(&rollout.selector_json)
        .bind(&rollout.strategy_json)
        .bind(rollout.state.as_str())
        .bind(rollout.current_wave)
        .bind(rollout.wave_count)
        .bind(&rollout.reason)
        .bind(rollout.revision)
        .bind(&rollout.created_by)
        .bind(rollout.created_at_ms)
        .bind(rollout.started_at_ms)
        .bind(rollout.finished_at_ms)
        .bind(rollout.updated_at_ms)
        .bind(&rollout.created_by_id)
        .bind(rollout.selected_devices)
        .bind(&rollout.analysis_policy)
        .execute(&mut *tx)
        .await?;
        self.append_event(&mut tx, rollout.created_at_ms, event)
            .await?;
        tx.commit().await?;
        self.count_events(std::slice::from_ref(event));
        Ok(())
    }

    pub async fn get_rollout(&self, id: &str) -> Result<Option<RolloutRecord>, Error> {
        sqlx::query("SELECT * FROM rollouts WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(rollout_from_row)
            .transpose()
    }

    /// Rollouts, newest first, optionally in one state.
    pub async fn list_rollouts(
        &self,
        state: Option<RolloutState>,
    ) -> Result<Vec<RolloutRecord>, Error> {
        let query = match state {
            Some(state) => sqlx::query(
                "SELECT * FROM rollouts WHERE state = $1 ORDER BY created_at_ms DESC, id",
            )
            .bind(state.as_str()),
            None => sqlx::query("SELECT * FROM rollouts ORDER BY created_at_ms DESC, id"),
        };
        query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rollout_from_row)
            .collect()
    }

    /// Running or paused rollouts of a bundle.
    pub async fn active_rollouts_of(&self, bundle_name: &str) -> Result<Vec<RolloutRecord>, Error> {
        sqlx::query(
            "SELECT * FROM rollouts WHERE bundle_name = $1 AND state IN ('running', 'paused') \
             ORDER BY id",
        )
        .bind(bundle_name)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(rollout_from_row)
        .collect()
    }

    /// What the engine looks after: running and paused rollouts, and
    /// aborted ones with devices still in flight.
    pub async fn engine_rollouts(&self) -> Result<Vec<RolloutRecord>, Error> {
        sqlx::query(&format!(
            "SELECT * FROM rollouts ro WHERE ro.state IN ('running', 'paused') \
             OR (ro.state = 'aborted' AND EXISTS (SELECT 1 FROM rollout_devices r \
             WHERE r.rollout_id = ro.id AND r.state IN {IN_FLIGHT})) ORDER BY ro.created_at_ms, ro.id"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(rollout_from_row)
        .collect()
    }

    pub async fn rollout_waves(&self, id: &str) -> Result<Vec<WaveRecord>, Error> {
        let rows = sqlx::query("SELECT * FROM rollout_waves WHERE rollout_id = $1 ORDER BY wave")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(WaveRecord {
                    wave: row.try_get("wave")?,
                    upper_seed: row.try_get("upper_seed")?,
                    started_at_ms: row.try_get("started_at_ms")?,
                    finished_at_ms: row.try_get("finished_at_ms")?,
                    bake_until_ms: row.try_get("bake_until_ms")?,
                    failures_acknowledged: row.try_get("failures_acknowledged")?,
                    analysis_verdict: row.try_get("analysis_verdict")?,
                    analysis_json: row.try_get("analysis_json")?,
                    analysis_at_ms: row.try_get("analysis_at_ms")?,
                })
            })
            .collect()
    }

    /// Device counts of each of these rollouts.
    pub async fn rollout_counts(&self, ids: &[String]) -> Result<HashMap<String, Counts>, Error> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut out = HashMap::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut next = Placeholders::new(self.backend);
            let placeholders: Vec<String> = chunk.iter().map(|_| next.next()).collect();
            let sql = format!(
                "SELECT rollout_id, state, COUNT(*) AS n FROM rollout_devices \
                 WHERE rollout_id IN ({}) GROUP BY rollout_id, state",
                placeholders.join(", ")
            );
            let params = chunk.iter().map(|id| Param::Text(id.clone())).collect();
            let rows = bind_all(sqlx::query(&sql).persistent(false), params)
                .fetch_all(&self.pool)
                .await?;
            let rows = rows
                .iter()
                .map(|r| {
                    Ok((
                        r.try_get("rollout_id")?,
                        r.try_get("state")?,
                        r.try_get("n")?,
                    ))
                })
                .collect::<Result<Vec<(String, String, i64)>, sqlx::Error>>()?;
            out.extend(counts_by(rows)?);
        }
        Ok(out)
    }

    /// Device counts of a rollout per wave.
    pub async fn wave_counts(&self, id: &str) -> Result<BTreeMap<i64, Counts>, Error> {
        let rows = sqlx::query(
            "SELECT wave, state, COUNT(*) AS n FROM rollout_devices WHERE rollout_id = $1 \
             GROUP BY wave, state",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("wave")?, r.try_get("state")?, r.try_get("n")?)))
        .collect::<Result<Vec<(i64, String, i64)>, sqlx::Error>>()?;
        counts_by(rows)
    }

    /// Device counts of a rollout per store.
    pub async fn store_counts(&self, id: &str) -> Result<BTreeMap<String, Counts>, Error> {
        let rows = sqlx::query(
            "SELECT store_id, state, COUNT(*) AS n FROM rollout_devices WHERE rollout_id = $1 \
             GROUP BY store_id, state",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("store_id")?, r.try_get("state")?, r.try_get("n")?)))
        .collect::<Result<Vec<(String, String, i64)>, sqlx::Error>>()?;
        counts_by(rows)
    }

    /// Devices of a rollout that failed, rolled back or timed out, oldest
    /// first, at most `limit`.
    pub async fn rollout_failures(
        &self,
        id: &str,
        limit: i64,
    ) -> Result<Vec<RolloutDeviceRecord>, Error> {
        sqlx::query(
            "SELECT * FROM rollout_devices WHERE rollout_id = $1 \
             AND state IN ('failed', 'rolled_back', 'timed_out') \
             ORDER BY updated_at_ms, device_id LIMIT $2",
        )
        .bind(id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(rollout_device_from_row)
        .collect()
    }

    /// Every device of a rollout (tests and tools; the engine reads less).
    pub async fn rollout_devices(&self, id: &str) -> Result<Vec<RolloutDeviceRecord>, Error> {
        sqlx::query("SELECT * FROM rollout_devices WHERE rollout_id = $1 ORDER BY device_id")
            .bind(id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rollout_device_from_row)
            .collect()
    }

    /// The devices a selector matches (stores, store labels, device labels,
    /// hardware model), with their active version of `bundle`, sorted by
    /// id. The installed version filter is the caller's. With
    /// `not_in_rollout`, only devices that rollout does not have yet.
    pub async fn select_devices(
        &self,
        selector: &Selector,
        bundle: &str,
        not_in_rollout: Option<&str>,
    ) -> Result<Vec<SelectedDevice>, Error> {
        let mut placeholders = Placeholders::new(self.backend);
        let mut params = Vec::new();
        let mut next = |params: &mut Vec<Param>, p: Param| {
            params.push(p);
            placeholders.next()
        };
        let name = next(&mut params, Param::Text(bundle.to_string()));
        let mut sql = format!(
            "SELECT d.id, d.store_id, d.hardware_model, d.installed_bundles_json, \
             st.active_version FROM devices d LEFT JOIN device_bundle_status st \
             ON st.device_id = d.id AND st.name = {name} WHERE 1 = 1"
        );
        if !selector.store_ids.is_empty() {
            let list: Vec<String> = selector
                .store_ids
                .iter()
                .map(|s| next(&mut params, Param::Text(s.clone())))
                .collect();
            sql.push_str(&format!(" AND d.store_id IN ({})", list.join(", ")));
        }
        for (key, value) in &selector.store_labels {
            let k = next(&mut params, Param::Text(key.clone()));
            let v = next(&mut params, Param::Text(value.clone()));
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM store_labels l WHERE l.store_id = d.store_id \
                 AND l.key = {k} AND l.value = {v})"
            ));
        }
        for (key, value) in &selector.device_labels {
            let k = next(&mut params, Param::Text(key.clone()));
            let v = next(&mut params, Param::Text(value.clone()));
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM device_labels l WHERE l.device_id = d.id \
                 AND l.key = {k} AND l.value = {v})"
            ));
        }
        if !selector.hardware_model.is_empty() {
            let m = next(&mut params, Param::Text(selector.hardware_model.clone()));
            sql.push_str(&format!(" AND d.hardware_model = {m}"));
        }
        if let Some(rollout) = not_in_rollout {
            let r = next(&mut params, Param::Text(rollout.to_string()));
            sql.push_str(&format!(
                " AND NOT EXISTS (SELECT 1 FROM rollout_devices r WHERE r.rollout_id = {r} \
                 AND r.device_id = d.id)"
            ));
        }
        sql.push_str(" ORDER BY d.id");
        let rows = bind_all(sqlx::query(&sql).persistent(false), params)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let reported: Option<String> = row.try_get("active_version")?;
                let heartbeat: String = row.try_get("installed_bundles_json")?;
                Ok(SelectedDevice {
                    device_id: row.try_get("id")?,
                    store_id: row.try_get("store_id")?,
                    hardware_model: row.try_get("hardware_model")?,
                    active_version: reported
                        .or_else(|| installed_version(&heartbeat, bundle))
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Ids of a rollout's devices.
    pub async fn rollout_device_ids(&self, id: &str) -> Result<Vec<String>, Error> {
        Ok(
            sqlx::query("SELECT device_id FROM rollout_devices WHERE rollout_id = $1")
                .bind(id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|row| row.try_get("device_id"))
                .collect::<Result<_, _>>()?,
        )
    }

    /// Dispatched devices the engine follows: in flight, and timed out
    /// (which may still succeed), with their reports of `bundle`.
    pub async fn tracked_devices(
        &self,
        rollout_id: &str,
        bundle: &str,
    ) -> Result<Vec<TrackedDevice>, Error> {
        let rows = sqlx::query(&format!(
            "SELECT r.device_id, r.store_id, r.wave, r.state, r.notified_at_ms, \
             st.active_version, st.target_version, st.phase, st.error, \
             d.installed_bundles_json, s.time_zone, s.maintenance_start_minute, \
             s.maintenance_duration_minutes \
             FROM rollout_devices r JOIN devices d ON d.id = r.device_id \
             JOIN stores s ON s.id = d.store_id \
             LEFT JOIN device_bundle_status st ON st.device_id = r.device_id AND st.name = $2 \
             WHERE r.rollout_id = $1 AND (r.state IN {IN_FLIGHT} OR r.state = 'timed_out') \
             ORDER BY r.device_id"
        ))
        .bind(rollout_id)
        .bind(bundle)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let phase: Option<String> = row.try_get("phase")?;
                let report = match phase {
                    Some(phase) => Some((
                        row.try_get("active_version")?,
                        row.try_get("target_version")?,
                        phase,
                        row.try_get("error")?,
                    )),
                    None => None,
                };
                let heartbeat: String = row.try_get("installed_bundles_json")?;
                let start: Option<i64> = row.try_get("maintenance_start_minute")?;
                let duration: Option<i64> = row.try_get("maintenance_duration_minutes")?;
                Ok(TrackedDevice {
                    device_id: row.try_get("device_id")?,
                    store_id: row.try_get("store_id")?,
                    wave: row.try_get("wave")?,
                    state: device_state(row)?,
                    notified_at_ms: row
                        .try_get::<Option<i64>, _>("notified_at_ms")?
                        .unwrap_or_default(),
                    report,
                    installed_version: installed_version(&heartbeat, bundle),
                    time_zone: row.try_get("time_zone")?,
                    window: start.zip(duration),
                })
            })
            .collect()
    }

    /// The pending devices of one wave of a rollout.
    pub async fn pending_devices(
        &self,
        rollout_id: &str,
        bundle: &str,
        wave: i64,
    ) -> Result<Vec<PendingDevice>, Error> {
        let rows = sqlx::query(
            "SELECT r.device_id, r.store_id, d.installed_bundles_json, st.active_version, \
             o.version AS own_version \
             FROM rollout_devices r JOIN devices d ON d.id = r.device_id \
             LEFT JOIN device_bundle_status st ON st.device_id = r.device_id AND st.name = $2 \
             LEFT JOIN device_desired_bundles o ON o.device_id = r.device_id AND o.name = $2 \
             WHERE r.rollout_id = $1 AND r.wave = $3 AND r.state = 'pending' ORDER BY r.device_id",
        )
        .bind(rollout_id)
        .bind(bundle)
        .bind(wave)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let reported: Option<String> = row.try_get("active_version")?;
                let heartbeat: String = row.try_get("installed_bundles_json")?;
                let own: Option<String> = row.try_get("own_version")?;
                let previous = reported
                    .filter(|v| !v.is_empty())
                    .or_else(|| installed_version(&heartbeat, bundle))
                    .filter(|v| !v.is_empty())
                    .or(own)
                    .unwrap_or_default();
                Ok(PendingDevice {
                    device_id: row.try_get("device_id")?,
                    store_id: row.try_get("store_id")?,
                    previous_version: previous,
                })
            })
            .collect()
    }

    /// Devices per store, and devices in flight per store across every
    /// rollout, for these stores.
    pub async fn store_loads(
        &self,
        store_ids: &[String],
    ) -> Result<(HashMap<String, u64>, HashMap<String, u64>), Error> {
        let mut devices = HashMap::new();
        let mut in_flight = HashMap::new();
        for chunk in store_ids.chunks(ROWS_PER_STATEMENT) {
            for (table, filter, out) in [
                ("devices", "", &mut devices),
                (
                    "rollout_devices",
                    &*format!(" AND state IN {IN_FLIGHT}"),
                    &mut in_flight,
                ),
            ] {
                let mut next = Placeholders::new(self.backend);
                let placeholders: Vec<String> = chunk.iter().map(|_| next.next()).collect();
                let sql = format!(
                    "SELECT store_id, COUNT(*) AS n FROM {table} WHERE store_id IN ({}){filter} \
                     GROUP BY store_id",
                    placeholders.join(", ")
                );
                let params = chunk.iter().map(|id| Param::Text(id.clone())).collect();
                for row in bind_all(sqlx::query(&sql).persistent(false), params)
                    .fetch_all(&self.pool)
                    .await?
                {
                    let n: i64 = row.try_get("n")?;
                    out.insert(row.try_get("store_id")?, n.max(0) as u64);
                }
            }
        }
        Ok((devices, in_flight))
    }

    /// Starts a change to rollout `id`, computed from `expected_revision`.
    /// `None` when the rollout has moved on since (or does not exist):
    /// re-read and decide again.
    pub async fn write_rollout(
        &self,
        id: &str,
        expected_revision: i64,
        now_ms: i64,
    ) -> Result<Option<RolloutWrite>, Error> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE rollouts SET revision = revision + 1, updated_at_ms = $3 \
             WHERE id = $1 AND revision = $2",
        )
        .bind(id)
        .bind(expected_revision)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        Ok(Some(RolloutWrite {
            storage: self.clone(),
            tx,
            rollout_id: id.to_string(),
            now_ms,
        }))
    }

    /// Takes the engine's lock: on PostgreSQL an advisory lock held by a
    /// connection of its own for as long as the returned `EngineLock`
    /// lives (`None`: another replica holds it); on SQLite, where one
    /// process owns the file, always granted.
    pub async fn try_engine_lock(&self) -> Result<Option<EngineLock>, Error> {
        if self.backend == Backend::Sqlite {
            return Ok(Some(EngineLock { conn: None }));
        }
        let mut conn = self.pool.acquire().await?.detach();
        let locked: bool = sqlx::query("SELECT pg_try_advisory_lock($1) AS locked")
            .bind(ENGINE_LOCK_KEY)
            .fetch_one(&mut conn)
            .await?
            .try_get("locked")?;
        if locked {
            Ok(Some(EngineLock { conn: Some(conn) }))
        } else {
            let _ = sqlx::Connection::close(conn).await;
            Ok(None)
        }
    }
}

/// The engine's lock (see `Storage::try_engine_lock`).
pub struct EngineLock {
    conn: Option<AnyConnection>,
}

impl EngineLock {
    /// Fails when the lock's connection is gone: PostgreSQL has released
    /// the lock and another replica may hold it now.
    pub async fn check(&mut self) -> Result<(), Error> {
        if let Some(conn) = &mut self.conn {
            sqlx::query("SELECT 1").execute(&mut *conn).await?;
        }
        Ok(())
    }

    /// Releases the lock (closing its connection would too).
    pub async fn release(self) {
        if let Some(mut conn) = self.conn {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(ENGINE_LOCK_KEY)
                .execute(&mut conn)
                .await;
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}

/// A change to one rollout, in one transaction (see the module docs).
pub struct RolloutWrite {
    storage: Storage,
    tx: sqlx::Transaction<'static, sqlx::Any>,
    rollout_id: String,
    now_ms: i64,
}

impl RolloutWrite {
    fn conn(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }

    fn backend(&self) -> Backend {
        self.storage.backend
    }

    /// Sets the rollout's state and reason; `finished` stamps its end.
    pub async fn set_state(
        &mut self,
        state: RolloutState,
        reason: &str,
        finished: bool,
    ) -> Result<(), Error> {
        let now = self.now_ms;
        let id = self.rollout_id.clone();
        sqlx::query(
            "UPDATE rollouts SET state = $2, reason = $3, \
             finished_at_ms = CASE WHEN $4 = 1 THEN $5 ELSE finished_at_ms END WHERE id = $1",
        )
        .bind(id)
        .bind(state.as_str())
        .bind(reason)
        .bind(i64::from(finished))
        .bind(now)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    /// Records the approval of token `by` (`by_id`).
    pub async fn approve(&mut self, by: &str, by_id: &str) -> Result<(), Error> {
        let now = self.now_ms;
        let id = self.rollout_id.clone();
        sqlx::query(
            "UPDATE rollouts SET approved_by = $2, approved_by_id = $3, approved_at_ms = $4 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(by)
        .bind(by_id)
        .bind(now)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    /// Records how many devices the selection holds now.
    pub async fn set_selected_devices(&mut self, devices: i64) -> Result<(), Error> {
        let id = self.rollout_id.clone();
        sqlx::query("UPDATE rollouts SET selected_devices = $2 WHERE id = $1")
            .bind(id)
            .bind(devices)
            .execute(self.conn())
            .await?;
        Ok(())
    }

    /// Marks the rollout started, with its waves.
    pub async fn start(&mut self, upper_seeds: &[Option<i64>]) -> Result<(), Error> {
        let now = self.now_ms;
        let id = self.rollout_id.clone();
        sqlx::query(
            "UPDATE rollouts SET state = 'running', started_at_ms = $2, current_wave = 0, \
             wave_count = $3, reason = '' WHERE id = $1",
        )
        .bind(&id)
        .bind(now)
        .bind(upper_seeds.len() as i64)
        .execute(self.conn())
        .await?;
        for (wave, upper) in upper_seeds.iter().enumerate() {
            sqlx::query(
                "INSERT INTO rollout_waves (rollout_id, wave, upper_seed, failures_acknowledged) \
                 VALUES ($1, $2, $3, 0)",
            )
            .bind(&id)
            .bind(wave as i64)
            .bind(*upper)
            .execute(self.conn())
            .await?;
        }
        Ok(())
    }

    /// Wave `wave` starts now and becomes the current one.
    pub async fn start_wave(&mut self, wave: i64) -> Result<(), Error> {
        let now = self.now_ms;
        let id = self.rollout_id.clone();
        sqlx::query("UPDATE rollouts SET current_wave = $2 WHERE id = $1")
            .bind(&id)
            .bind(wave)
            .execute(self.conn())
            .await?;
        sqlx::query(
            "UPDATE rollout_waves SET started_at_ms = COALESCE(started_at_ms, $3) \
             WHERE rollout_id = $1 AND wave = $2",
        )
        .bind(&id)
        .bind(wave)
        .bind(now)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    /// Every device of wave `wave` is done; the next may start at
    /// `bake_until_ms`.
    pub async fn finish_wave(
        &mut self,
        wave: i64,
        bake_until_ms: Option<i64>,
    ) -> Result<(), Error> {
        let now = self.now_ms;
        let id = self.rollout_id.clone();
        sqlx::query(
            "UPDATE rollout_waves SET finished_at_ms = $3, bake_until_ms = $4 \
             WHERE rollout_id = $1 AND wave = $2",
        )
        .bind(id)
        .bind(wave)
        .bind(now)
        .bind(bake_until_ms)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    /// Records wave `wave`'s latest canary analysis judgement.
    pub async fn set_wave_analysis(
        &mut self,
        wave: i64,
        verdict: &str,
        judgement_json: &str,
    ) -> Result<(), Error> {
        let now = self.now_ms;
        let id = self.rollout_id.clone();
        sqlx::query(
            "UPDATE rollout_waves SET analysis_verdict = $3, analysis_json = $4, \
             analysis_at_ms = $5 WHERE rollout_id = $1 AND wave = $2",
        )
        .bind(id)
        .bind(wave)
        .bind(verdict)
        .bind(judgement_json)
        .bind(now)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    /// An operator resumed the rollout: failed and inconclusive analyses
    /// are accepted, so the next waves may start.
    pub async fn accept_analyses(&mut self) -> Result<(), Error> {
        let id = self.rollout_id.clone();
        sqlx::query(
            "UPDATE rollout_waves SET analysis_verdict = 'accepted' \
             WHERE rollout_id = $1 AND analysis_verdict IN ('fail', 'inconclusive')",
        )
        .bind(id)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    /// Failures a resume accepts: `(wave, failures)`.
    pub async fn acknowledge_failures(&mut self, waves: &[(i64, u64)]) -> Result<(), Error> {
        let id = self.rollout_id.clone();
        for (wave, failures) in waves {
            sqlx::query(
                "UPDATE rollout_waves SET failures_acknowledged = $3 \
                 WHERE rollout_id = $1 AND wave = $2",
            )
            .bind(&id)
            .bind(*wave)
            .bind(i64::try_from(*failures).unwrap_or(i64::MAX))
            .execute(self.conn())
            .await?;
        }
        Ok(())
    }

    /// Adds devices to the rollout, pending.
    pub async fn insert_devices(&mut self, devices: &[NewRolloutDevice]) -> Result<(), Error> {
        let now = self.now_ms;
        let id = self.rollout_id.clone();
        for chunk in devices.chunks(ROWS_PER_STATEMENT) {
            let mut placeholders = Placeholders::new(self.backend());
            let mut params = Vec::with_capacity(chunk.len() * 5);
            let rows: Vec<String> = chunk
                .iter()
                .map(|d| {
                    params.extend([
                        Param::Text(id.clone()),
                        Param::Text(d.device_id.clone()),
                        Param::Text(d.store_id.clone()),
                        Param::Int(d.wave),
                        Param::Int(now),
                    ]);
                    let p: Vec<String> = (0..5).map(|_| placeholders.next()).collect();
                    format!(
                        "({}, {}, {}, {}, 'pending', '', NULL, NULL, {})",
                        p[0], p[1], p[2], p[3], p[4]
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO rollout_devices (rollout_id, device_id, store_id, wave, state, \
                 reason, previous_version, notified_at_ms, updated_at_ms) VALUES {} \
                 ON CONFLICT (rollout_id, device_id) DO NOTHING",
                rows.join(", ")
            );
            bind_all(sqlx::query(&sql).persistent(false), params)
                .execute(self.conn())
                .await?;
        }
        Ok(())
    }

    /// Moves devices from one state to another. Fails (and the caller
    /// drops the change) if one of them is not in its `from` state.
    pub async fn change_devices(&mut self, changes: &[DeviceChange]) -> Result<(), Error> {
        let now = self.now_ms;
        let id = self.rollout_id.clone();
        for chunk in changes.chunks(ROWS_PER_STATEMENT) {
            let mut placeholders = Placeholders::new(self.backend());
            let mut params = vec![Param::Int(now)];
            let now_p = placeholders.next();
            let rows: Vec<String> = chunk
                .iter()
                .map(|c| {
                    params.extend([
                        Param::Text(c.device_id.clone()),
                        Param::Text(c.to.as_str().to_string()),
                        Param::Text(c.reason.clone()),
                        Param::Text(c.from.as_str().to_string()),
                    ]);
                    let p: Vec<String> = (0..4).map(|_| placeholders.next()).collect();
                    format!("({})", p.join(", "))
                })
                .collect();
            params.push(Param::Text(id.clone()));
            let id_p = placeholders.next();
            let sql = format!(
                "UPDATE rollout_devices SET state = v.column2, reason = v.column3, \
                 updated_at_ms = {now_p} FROM (VALUES {}) AS v \
                 WHERE rollout_devices.rollout_id = {id_p} \
                 AND rollout_devices.device_id = v.column1 AND rollout_devices.state = v.column4",
                rows.join(", ")
            );
            let done = bind_all(sqlx::query(&sql).persistent(false), params)
                .execute(self.conn())
                .await?;
            if done.rows_affected() != chunk.len() as u64 {
                return Err(Error::Conflict(format!(
                    "rollout {id}: {} of {} device changes applied",
                    done.rows_affected(),
                    chunk.len()
                )));
            }
        }
        Ok(())
    }

    /// Dispatches pending devices: their own desired row names the release
    /// (`desired`), and they become notified, remembering the version they
    /// had.
    pub async fn dispatch(
        &mut self,
        devices: &[Dispatch],
        desired: &DesiredBundleRecord,
    ) -> Result<(), Error> {
        let now = self.now_ms;
        let id = self.rollout_id.clone();
        // In key order, neighbouring rows share index pages: SQLite upserts
        // the desired state about three times faster than in seed order.
        let mut devices: Vec<&Dispatch> = devices.iter().collect();
        devices.sort_unstable_by(|a, b| a.device_id.cmp(&b.device_id));
        for chunk in devices.chunks(ROWS_PER_STATEMENT) {
            let mut placeholders = Placeholders::new(self.backend());
            let mut params = Vec::with_capacity(chunk.len() * 8);
            let rows: Vec<String> = chunk
                .iter()
                .map(|d| {
                    params.extend([
                        Param::Text(d.device_id.clone()),
                        Param::Text(desired.name.clone()),
                        Param::Text(desired.version.clone()),
                        Param::Text(desired.kind.clone()),
                        Param::Int(i64::from(desired.download_ahead)),
                        Param::Int(i64::from(desired.emergency)),
                        Param::Int(i64::from(desired.rollback)),
                        Param::Int(now),
                    ]);
                    let p: Vec<String> = (0..8).map(|_| placeholders.next()).collect();
                    format!("({})", p.join(", "))
                })
                .collect();
            let sql = format!(
                "INSERT INTO device_desired_bundles (device_id, name, version, kind, \
                 download_ahead, emergency, rollback, assigned_at_ms) VALUES {} \
                 ON CONFLICT (device_id, name) DO UPDATE SET version = excluded.version, \
                 kind = excluded.kind, download_ahead = excluded.download_ahead, \
                 emergency = excluded.emergency, rollback = excluded.rollback, \
                 assigned_at_ms = excluded.assigned_at_ms",
                rows.join(", ")
            );
            bind_all(sqlx::query(&sql).persistent(false), params)
                .execute(self.conn())
                .await?;

            // One update per previous version (a handful), each naming its
            // devices by primary key. (A join with a VALUES list made SQLite
            // walk the rollout's pending rows per statement.) SQLite, without
            // statistics, would rather look up `(rollout_id, state)` in
            // rollout_devices_state and scan every pending row for the
            // listed ones; the unary `+` keeps it on the primary key.
            let pending = match self.backend() {
                Backend::Sqlite => "+state",
                Backend::Postgres => "state",
            };
            let mut by_previous: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for d in chunk {
                by_previous
                    .entry(d.previous_version.as_str())
                    .or_default()
                    .push(d.device_id.as_str());
            }
            let mut changed = 0;
            for (previous, ids) in by_previous {
                let mut placeholders = Placeholders::new(self.backend());
                let mut params = vec![
                    Param::Int(now),
                    Param::Int(now),
                    Param::Text(previous.to_string()),
                    Param::Text(id.clone()),
                ];
                let fixed: Vec<String> = (0..4).map(|_| placeholders.next()).collect();
                let listed: Vec<String> = ids
                    .iter()
                    .map(|device| {
                        params.push(Param::Text(device.to_string()));
                        placeholders.next()
                    })
                    .collect();
                let sql = format!(
                    "UPDATE rollout_devices SET state = 'notified', reason = '', \
                     notified_at_ms = {}, updated_at_ms = {}, previous_version = {} \
                     WHERE rollout_id = {} AND {pending} = 'pending' AND device_id IN ({})",
                    fixed[0],
                    fixed[1],
                    fixed[2],
                    fixed[3],
                    listed.join(", ")
                );
                changed += bind_all(sqlx::query(&sql).persistent(false), params)
                    .execute(self.conn())
                    .await?
                    .rows_affected();
            }
            if changed != chunk.len() as u64 {
                return Err(Error::Conflict(format!(
                    "rollout {id}: {changed} of {} devices were still pending",
                    chunk.len()
                )));
            }
        }
        Ok(())
    }

    /// The devices this rollout dispatched (read inside the transaction).
    pub async fn dispatched_devices(&mut self) -> Result<Vec<RolloutDeviceRecord>, Error> {
        let id = self.rollout_id.clone();
        sqlx::query(
            "SELECT * FROM rollout_devices WHERE rollout_id = $1 \
             AND notified_at_ms IS NOT NULL ORDER BY device_id",
        )
        .bind(id)
        .fetch_all(self.conn())
        .await?
        .iter()
        .map(rollout_device_from_row)
        .collect()
    }

    /// Puts the desired state of `devices` `(device_id, previous_version)`
    /// back: a row naming the previous version, flagged as a rollback, or
    /// no row of their own when they had none. Only rows that still name
    /// `release` (the rollout's version) change: a later assignment wins.
    pub async fn restore_desired(
        &mut self,
        release: &DesiredBundleRecord,
        devices: &[(String, String)],
    ) -> Result<(), Error> {
        let now = self.now_ms;
        let (back, remove): (Vec<_>, Vec<_>) = devices.iter().partition(|(_, v)| !v.is_empty());
        for chunk in back.chunks(ROWS_PER_STATEMENT) {
            let mut placeholders = Placeholders::new(self.backend());
            let mut params = Vec::with_capacity(chunk.len() * 8 + 1);
            let rows: Vec<String> = chunk
                .iter()
                .map(|(device, previous)| {
                    params.extend([
                        Param::Text(device.clone()),
                        Param::Text(release.name.clone()),
                        Param::Text(previous.clone()),
                        Param::Text(release.kind.clone()),
                        Param::Int(i64::from(release.download_ahead)),
                        Param::Int(i64::from(release.emergency)),
                        Param::Int(1),
                        Param::Int(now),
                    ]);
                    let p: Vec<String> = (0..8).map(|_| placeholders.next()).collect();
                    format!("({})", p.join(", "))
                })
                .collect();
            params.push(Param::Text(release.version.clone()));
            let version_p = placeholders.next();
            let sql = format!(
                "INSERT INTO device_desired_bundles (device_id, name, version, kind, \
                 download_ahead, emergency, rollback, assigned_at_ms) VALUES {} \
                 ON CONFLICT (device_id, name) DO UPDATE SET version = excluded.version, \
                 kind = excluded.kind, download_ahead = excluded.download_ahead, \
                 emergency = excluded.emergency, rollback = excluded.rollback, \
                 assigned_at_ms = excluded.assigned_at_ms \
                 WHERE device_desired_bundles.version = {version_p}",
                rows.join(", ")
            );
            bind_all(sqlx::query(&sql).persistent(false), params)
                .execute(self.conn())
                .await?;
        }
        for chunk in remove.chunks(ROWS_PER_STATEMENT) {
            let mut placeholders = Placeholders::new(self.backend());
            let name_p = placeholders.next();
            let version_p = placeholders.next();
            let mut params = vec![
                Param::Text(release.name.clone()),
                Param::Text(release.version.clone()),
            ];
            let list: Vec<String> = chunk
                .iter()
                .map(|(device, _)| {
                    params.push(Param::Text(device.clone()));
                    placeholders.next()
                })
                .collect();
            let sql = format!(
                "DELETE FROM device_desired_bundles WHERE name = {name_p} AND version = {version_p} \
                 AND device_id IN ({})",
                list.join(", ")
            );
            bind_all(sqlx::query(&sql).persistent(false), params)
                .execute(self.conn())
                .await?;
        }
        Ok(())
    }

    /// Appends the change's events and commits; returns their seqs.
    pub async fn commit(mut self, events: &[NewEvent]) -> Result<Vec<u64>, Error> {
        let storage = self.storage.clone();
        let now = self.now_ms;
        let seqs = storage.append_events(&mut self.tx, now, events).await?;
        self.tx.commit().await?;
        storage.count_events(events);
        Ok(seqs)
    }
}
