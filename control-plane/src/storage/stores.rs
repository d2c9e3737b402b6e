//! Stores (`stores`) and their maintenance windows.

use sqlx::Row;
use sqlx::any::AnyRow;
use std::collections::BTreeMap;

use super::Storage;
use crate::error::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRecord {
    pub id: String,
    pub name: String,
    pub time_zone: String,
    pub created_at_ms: i64,
    pub device_count: i64,
    /// `None`: installs may happen at any time.
    pub maintenance_window: Option<WindowRecord>,
    pub labels: BTreeMap<String, String>,
}

/// A daily maintenance window in the store's local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowRecord {
    /// Minutes after local midnight (0..1439).
    pub start_minute: i64,
    /// 1..1440.
    pub duration_minutes: i64,
}

const STORE_COLUMNS: &str = "s.id, s.name, s.time_zone, s.created_at_ms, \
    s.maintenance_start_minute, s.maintenance_duration_minutes, \
    (SELECT COUNT(*) FROM devices d WHERE d.store_id = s.id) AS device_count";

pub(super) fn window_from_row(row: &AnyRow) -> Result<Option<WindowRecord>, Error> {
    let start: Option<i64> = row.try_get("maintenance_start_minute")?;
    let duration: Option<i64> = row.try_get("maintenance_duration_minutes")?;
    Ok(start
        .zip(duration)
        .map(|(start_minute, duration_minutes)| WindowRecord {
            start_minute,
            duration_minutes,
        }))
}

fn store_from_row(row: &AnyRow) -> Result<StoreRecord, Error> {
    Ok(StoreRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        time_zone: row.try_get("time_zone")?,
        created_at_ms: row.try_get("created_at_ms")?,
        device_count: row.try_get("device_count")?,
        maintenance_window: window_from_row(row)?,
        labels: BTreeMap::new(),
    })
}

impl Storage {
    /// Creates a store; `Ok(false)` if the id is taken.
    pub async fn create_store(&self, store: &StoreRecord) -> Result<bool, Error> {
        let window = store.maintenance_window;
        let result = sqlx::query(
            "INSERT INTO stores (id, name, time_zone, created_at_ms, maintenance_start_minute, \
             maintenance_duration_minutes) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&store.id)
        .bind(&store.name)
        .bind(&store.time_zone)
        .bind(store.created_at_ms)
        .bind(window.map(|w| w.start_minute))
        .bind(window.map(|w| w.duration_minutes))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    pub async fn list_stores(&self, after_id: &str, limit: i64) -> Result<Vec<StoreRecord>, Error> {
        let rows = sqlx::query(&format!(
            "SELECT {STORE_COLUMNS} FROM stores s WHERE s.id > $1 ORDER BY s.id LIMIT $2"
        ))
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut stores = rows
            .iter()
            .map(store_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        self.attach_store_labels(&mut stores).await?;
        Ok(stores)
    }

    pub async fn get_store(&self, id: &str) -> Result<Option<StoreRecord>, Error> {
        let row = sqlx::query(&format!(
            "SELECT {STORE_COLUMNS} FROM stores s WHERE s.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut stores = vec![store_from_row(&row)?];
        self.attach_store_labels(&mut stores).await?;
        Ok(stores.pop())
    }

    /// Sets (or with `None` clears) a store's maintenance window; `None` if
    /// no such store.
    pub async fn set_maintenance_window(
        &self,
        id: &str,
        window: Option<WindowRecord>,
    ) -> Result<Option<StoreRecord>, Error> {
        let updated = sqlx::query(
            "UPDATE stores SET maintenance_start_minute = $2, maintenance_duration_minutes = $3 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(window.map(|w| w.start_minute))
        .bind(window.map(|w| w.duration_minutes))
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(None);
        }
        self.get_store(id).await
    }

    pub async fn store_exists(&self, id: &str) -> Result<bool, Error> {
        Ok(sqlx::query("SELECT id FROM stores WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    pub async fn count_stores(&self) -> Result<i64, Error> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM stores")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }
}

impl Storage {
    /// The ids of the stores carrying every one of `labels` (a store scope).
    pub async fn store_ids_with_labels(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<std::collections::BTreeSet<String>, Error> {
        let mut placeholders = super::Placeholders::new(self.backend);
        let mut params = Vec::new();
        let mut sql = "SELECT s.id FROM stores s WHERE 1 = 1".to_string();
        for (key, value) in labels {
            let k = placeholders.next();
            params.push(super::Param::Text(key.clone()));
            let v = placeholders.next();
            params.push(super::Param::Text(value.clone()));
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM store_labels l WHERE l.store_id = s.id \
                 AND l.key = {k} AND l.value = {v})"
            ));
        }
        let rows = super::bind_all(sqlx::query(&sql).persistent(false), params)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok(row.try_get::<String, _>("id")?))
            .collect()
    }
}
