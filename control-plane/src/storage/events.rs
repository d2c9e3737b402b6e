//! Events: every state change, numbered in commit order.
//!
//! `seq` is taken from the single row of `event_counter`, incremented by the
//! transaction that writes the event. That row stays locked (PostgreSQL) or
//! the database stays write-locked (SQLite) until the transaction commits or
//! rolls back, so:
//! - events are numbered in the order their transactions commit, on any
//!   number of replicas: a transaction that takes seq N+1 waits for the one
//!   holding N to end first;
//! - a rolled-back transaction gives its numbers back: seq has no gaps;
//! - a reader polling `seq > cursor` (the webhook dispatcher, `ListEvents`)
//!   never misses an event, because no lower seq can commit later.
//!
//! The price is that transactions writing events are serialized from their
//! first event to their commit. Keep them short, and write the events last
//! (after the transaction's other writes): a transaction holding the counter
//! then never waits for another lock, so it cannot deadlock.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{Param, Placeholders, Storage, bind_all};
use crate::error::Error;

/// Events inserted per statement (6 parameters each).
const EVENT_ROWS_PER_STATEMENT: usize = 500;

/// Largest page `events_after` returns.
pub const MAX_EVENTS_PER_PAGE: u32 = 1000;

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Increasing in commit order, without gaps; a cursor for readers.
    pub seq: u64,
    pub at_ms: i64,
    /// e.g. `rollout.started`, `rollout.device_failed`.
    pub kind: String,
    /// Empty when the event is about no rollout.
    pub rollout_id: String,
    /// Empty when the event is about no device.
    pub device_id: String,
    /// The event's fields, a JSON object.
    pub data_json: String,
}

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub kind: String,
    pub rollout_id: String,
    pub device_id: String,
    pub data: serde_json::Value,
}

impl NewEvent {
    pub fn new(kind: &str, rollout_id: &str, device_id: &str, data: serde_json::Value) -> Self {
        NewEvent {
            kind: kind.to_string(),
            rollout_id: rollout_id.to_string(),
            device_id: device_id.to_string(),
            data,
        }
    }
}

fn event_from_row(row: &AnyRow) -> Result<EventRecord, Error> {
    Ok(EventRecord {
        seq: row.try_get::<i64, _>("seq")?.max(0) as u64,
        at_ms: row.try_get("at_ms")?,
        kind: row.try_get("kind")?,
        rollout_id: row.try_get("rollout_id")?,
        device_id: row.try_get("device_id")?,
        data_json: row.try_get("data_json")?,
    })
}

impl Storage {
    /// A transaction on the fleet's database, for changes that must commit
    /// together with their events.
    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, Error> {
        Ok(self.pool.begin().await?)
    }

    /// Appends one event inside the caller's transaction (`&mut *tx`) and
    /// returns its seq. It is visible, with the transaction's other writes,
    /// once the transaction commits. Write events last in a transaction
    /// (see the module documentation).
    pub async fn append_event(
        &self,
        conn: &mut AnyConnection,
        at_ms: i64,
        event: &NewEvent,
    ) -> Result<u64, Error> {
        let seqs = self
            .append_events(conn, at_ms, std::slice::from_ref(event))
            .await?;
        // One event in, one seq out: append_events returns one per event.
        Ok(seqs.first().copied().unwrap_or_default())
    }

    /// Appends events, in this order, inside the caller's transaction, and
    /// returns their seqs (consecutive).
    pub async fn append_events(
        &self,
        conn: &mut AnyConnection,
        at_ms: i64,
        events: &[NewEvent],
    ) -> Result<Vec<u64>, Error> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let last: i64 = sqlx::query(
            "UPDATE event_counter SET last_seq = last_seq + $1 WHERE id = 1 RETURNING last_seq",
        )
        .bind(events.len() as i64)
        .fetch_one(&mut *conn)
        .await?
        .try_get("last_seq")?;
        let first = last - events.len() as i64 + 1;
        let mut seq = first;
        for chunk in events.chunks(EVENT_ROWS_PER_STATEMENT) {
            let mut placeholders = Placeholders::new(self.backend);
            let mut params = Vec::with_capacity(chunk.len() * 6);
            let mut rows = Vec::with_capacity(chunk.len());
            for event in chunk {
                let row: Vec<String> = (0..6).map(|_| placeholders.next()).collect();
                rows.push(format!("({})", row.join(", ")));
                params.extend([
                    Param::Int(seq),
                    Param::Int(at_ms),
                    Param::Text(event.kind.clone()),
                    Param::Text(event.rollout_id.clone()),
                    Param::Text(event.device_id.clone()),
                    Param::Text(event.data.to_string()),
                ]);
                seq += 1;
            }
            let sql = format!(
                "INSERT INTO events (seq, at_ms, kind, rollout_id, device_id, data_json) VALUES {}",
                rows.join(", ")
            );
            bind_all(sqlx::query(&sql).persistent(false), params)
                .execute(&mut *conn)
                .await?;
        }
        Ok((first..=last).map(|s| s.max(0) as u64).collect())
    }

    /// Events with `seq > after_seq`, oldest first, at most `limit` (capped
    /// at `MAX_EVENTS_PER_PAGE`), of one rollout or of all.
    pub async fn events_after(
        &self,
        after_seq: u64,
        rollout_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<EventRecord>, Error> {
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let limit = i64::from(limit.clamp(1, MAX_EVENTS_PER_PAGE));
        let rows =
            match rollout_id {
                Some(id) => sqlx::query(
                    "SELECT * FROM events WHERE rollout_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                )
                .bind(id.to_string())
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?,
                None => {
                    sqlx::query("SELECT * FROM events WHERE seq > $1 ORDER BY seq LIMIT $2")
                        .bind(after)
                        .bind(limit)
                        .fetch_all(&self.pool)
                        .await?
                }
            };
        rows.iter().map(event_from_row).collect()
    }

    /// The seq of the newest committed event (0 when there is none).
    pub async fn last_event_seq(&self) -> Result<u64, Error> {
        let last: i64 = sqlx::query("SELECT last_seq FROM event_counter WHERE id = 1")
            .fetch_one(&self.pool)
            .await?
            .try_get("last_seq")?;
        Ok(last.max(0) as u64)
    }
}
