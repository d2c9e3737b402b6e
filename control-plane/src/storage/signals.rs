//! Signals tills report per minute, kept for canary analysis: one row per
//! till and minute, only for the stores of a wave under analysis.

use std::collections::{BTreeMap, HashSet};

use sqlx::Row;

use super::{Param, Placeholders, Storage, bind_all};
use crate::error::Error;
use crate::rollout::model::DeviceState;

/// Rows per multi-row statement (5 parameters each).
const ROWS_PER_STATEMENT: usize = 200;
/// Stores per `IN (…)` list.
const STORES_PER_STATEMENT: usize = 500;

/// What one till observed in one minute.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SignalMinuteRecord {
    /// Minutes since the Unix epoch.
    pub minute: i64,
    pub counts: BTreeMap<String, u64>,
    pub values: BTreeMap<String, Vec<f64>>,
}

/// A till's minutes, with the store they count for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceSignals {
    pub device_id: String,
    pub store_id: String,
    pub minutes: Vec<SignalMinuteRecord>,
}

/// A stored minute.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMinute {
    pub device_id: String,
    pub store_id: String,
    pub minute: SignalMinuteRecord,
}

/// A device of a rollout, as the analysis sorts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnalysedDevice {
    pub device_id: String,
    pub wave: i64,
    pub state: DeviceState,
    /// When it last changed state (for a succeeded device: when it
    /// reported the release running).
    pub updated_at_ms: i64,
}

/// The placeholders of an `IN (…)` list of `items`, whose parameters go
/// onto `params`.
fn text_list(placeholders: &mut Placeholders, params: &mut Vec<Param>, items: &[String]) -> String {
    let list: Vec<String> = items
        .iter()
        .map(|item| {
            params.push(Param::Text(item.clone()));
            placeholders.next()
        })
        .collect();
    list.join(", ")
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, Error> {
    serde_json::to_string(value).map_err(|e| Error::Corrupt(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Error> {
    serde_json::from_str(text).map_err(|e| Error::Corrupt(format!("signal minute: {e}")))
}

impl Storage {
    /// Stores tills' minutes. A minute stored already (its heartbeat's
    /// answer was lost and the till sent it again) keeps its first copy.
    pub async fn record_signal_minutes(&self, batch: &[DeviceSignals]) -> Result<(), Error> {
        let rows: Vec<(&DeviceSignals, &SignalMinuteRecord)> = batch
            .iter()
            .flat_map(|d| d.minutes.iter().map(move |m| (d, m)))
            .collect();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut placeholders = Placeholders::new(self.backend);
            let mut params = Vec::with_capacity(chunk.len() * 5);
            let mut tuples = Vec::with_capacity(chunk.len());
            for (device, minute) in chunk {
                let row: Vec<String> = (0..5).map(|_| placeholders.next()).collect();
                tuples.push(format!("({})", row.join(", ")));
                params.extend([
                    Param::Text(device.device_id.clone()),
                    Param::Int(minute.minute),
                    Param::Text(device.store_id.clone()),
                    Param::Text(json(&minute.counts)?),
                    Param::Text(json(&minute.values)?),
                ]);
            }
            let sql = format!(
                "INSERT INTO signal_minutes (device_id, minute, store_id, counts_json, values_json) \
                 VALUES {} ON CONFLICT (device_id, minute) DO NOTHING",
                tuples.join(", ")
            );
            bind_all(sqlx::query(&sql).persistent(false), params)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// The stores whose tills' minutes are kept: those of the wave under
    /// analysis of each running or paused rollout with a policy (the last
    /// wave is not judged: it leaves no control tills).
    pub async fn analysed_stores(&self) -> Result<HashSet<String>, Error> {
        let rows = sqlx::query(
            "SELECT DISTINCT d.store_id FROM rollout_devices d \
             JOIN rollouts r ON r.id = d.rollout_id \
             WHERE r.analysis_policy <> '' AND r.state IN ('running', 'paused') \
             AND d.wave = r.current_wave AND r.current_wave < r.wave_count - 1",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok(row.try_get::<String, _>("store_id")?))
            .collect()
    }

    /// Minutes `from..to` (minutes since the epoch) of these stores' tills.
    pub async fn signal_minutes(
        &self,
        stores: &[String],
        from: i64,
        to: i64,
    ) -> Result<Vec<StoredMinute>, Error> {
        let mut out = Vec::new();
        for chunk in stores.chunks(STORES_PER_STATEMENT) {
            let mut placeholders = Placeholders::new(self.backend);
            let mut params = vec![Param::Int(from), Param::Int(to)];
            let (a, b) = (placeholders.next(), placeholders.next());
            let list = text_list(&mut placeholders, &mut params, chunk);
            let sql = format!(
                "SELECT device_id, store_id, minute, counts_json, values_json FROM signal_minutes \
                 WHERE minute >= {a} AND minute < {b} AND store_id IN ({list})"
            );
            for row in bind_all(sqlx::query(&sql).persistent(false), params)
                .fetch_all(&self.pool)
                .await?
            {
                let counts: String = row.try_get("counts_json")?;
                let values: String = row.try_get("values_json")?;
                out.push(StoredMinute {
                    device_id: row.try_get("device_id")?,
                    store_id: row.try_get("store_id")?,
                    minute: SignalMinuteRecord {
                        minute: row.try_get("minute")?,
                        counts: parse(&counts)?,
                        values: parse(&values)?,
                    },
                });
            }
        }
        Ok(out)
    }

    /// The devices of rollout `id` in these stores, with their wave and state.
    pub async fn analysed_devices(
        &self,
        id: &str,
        stores: &[String],
    ) -> Result<Vec<AnalysedDevice>, Error> {
        let mut out = Vec::new();
        for chunk in stores.chunks(STORES_PER_STATEMENT) {
            let mut placeholders = Placeholders::new(self.backend);
            let mut params = vec![Param::Text(id.to_string())];
            let first = placeholders.next();
            let list = text_list(&mut placeholders, &mut params, chunk);
            let sql = format!(
                "SELECT device_id, wave, state, updated_at_ms FROM rollout_devices \
                 WHERE rollout_id = {first} AND store_id IN ({list})"
            );
            for row in bind_all(sqlx::query(&sql).persistent(false), params)
                .fetch_all(&self.pool)
                .await?
            {
                let state: String = row.try_get("state")?;
                out.push(AnalysedDevice {
                    device_id: row.try_get("device_id")?,
                    wave: row.try_get("wave")?,
                    state: DeviceState::parse(&state)
                        .ok_or_else(|| Error::Corrupt(format!("unknown device state `{state}`")))?,
                    updated_at_ms: row.try_get("updated_at_ms")?,
                });
            }
        }
        Ok(out)
    }

    /// The stores of wave `wave` of rollout `id`.
    pub async fn wave_stores(&self, id: &str, wave: i64) -> Result<Vec<String>, Error> {
        let rows = sqlx::query(
            "SELECT DISTINCT store_id FROM rollout_devices WHERE rollout_id = $1 AND wave = $2 \
             ORDER BY store_id",
        )
        .bind(id)
        .bind(wave)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok(row.try_get::<String, _>("store_id")?))
            .collect()
    }

    /// Deletes minutes before `minute`; how many went.
    pub async fn prune_signal_minutes(&self, minute: i64) -> Result<u64, Error> {
        let done = sqlx::query("DELETE FROM signal_minutes WHERE minute < $1")
            .bind(minute)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
