//! Webhooks, their deliveries and the dispatcher's cursor over events.
//!
//! The dispatcher turns events into delivery rows in one transaction that
//! also moves `webhook_cursor` (conditionally on its old value), so a
//! restart neither repeats nor skips an event and two replicas never both
//! fan the same events out. A delivery is attempted by whoever claims it:
//! a conditional UPDATE of `claimed_until_ms`, so two replicas never attempt
//! the same delivery at once, and a crashed one's claim runs out.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Param, Placeholders, Storage, bind_all};
use crate::error::Error;

/// Deliveries inserted per statement (12 parameters each).
const DELIVERY_ROWS_PER_STATEMENT: usize = 400;

/// A receiver of events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRecord {
    pub id: String,
    pub url: String,
    /// Event kinds and `prefix.*` patterns; empty: every event.
    pub events: Vec<String>,
    /// The HMAC-SHA256 key deliveries are signed with.
    pub secret: String,
    /// It receives the events after this one (the last when it was added).
    pub after_event_seq: u64,
    pub created_at_ms: i64,
    /// PEM certificates of a CA trusted beside the system's roots for an
    /// https:// receiver; empty for none.
    pub ca_pem: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    Pending,
    Delivered,
    /// Given up after the last attempt.
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<DeliveryState, Error> {
        match s {
            "pending" => Ok(DeliveryState::Pending),
            "delivered" => Ok(DeliveryState::Delivered),
            "failed" => Ok(DeliveryState::Failed),
            other => Err(Error::Corrupt(format!("delivery state {other}"))),
        }
    }
}

/// A delivery to create when an event is fanned out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    pub webhook_id: String,
    pub event_seq: u64,
    pub event_kind: String,
    pub rollout_id: String,
    pub payload_json: String,
}

/// One event for one webhook, and how its attempts went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub webhook_id: String,
    pub event_seq: u64,
    pub event_kind: String,
    pub rollout_id: String,
    pub payload_json: String,
    pub state: DeliveryState,
    pub attempts: u32,
    /// 0 when the last attempt got no HTTP answer.
    pub last_http_status: u32,
    pub last_error: String,
    /// 0 before the first attempt.
    pub last_attempt_at_ms: i64,
    /// 0 once delivered or given up.
    pub next_attempt_at_ms: i64,
}

/// How one attempt ended, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// The state after this attempt.
    pub state: DeliveryState,
    pub http_status: u32,
    pub error: String,
    pub at_ms: i64,
    /// 0 when nothing is left to attempt.
    pub next_attempt_at_ms: i64,
}

fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn webhook_from_row(row: &AnyRow) -> Result<WebhookRecord, Error> {
    let events: String = row.try_get("events_json")?;
    let id: String = row.try_get("id")?;
    Ok(WebhookRecord {
        events: serde_json::from_str(&events)
            .map_err(|e| Error::Corrupt(format!("event filter of webhook {id}: {e}")))?,
        url: row.try_get("url")?,
        secret: row.try_get("secret")?,
        after_event_seq: row.try_get::<i64, _>("after_event_seq")?.max(0) as u64,
        created_at_ms: row.try_get("created_at_ms")?,
        ca_pem: row.try_get("ca_pem")?,
        id,
    })
}

fn delivery_from_row(row: &AnyRow) -> Result<DeliveryRecord, Error> {
    let state: String = row.try_get("state")?;
    Ok(DeliveryRecord {
        webhook_id: row.try_get("webhook_id")?,
        event_seq: row.try_get::<i64, _>("event_seq")?.max(0) as u64,
        event_kind: row.try_get("event_kind")?,
        rollout_id: row.try_get("rollout_id")?,
        payload_json: row.try_get("payload_json")?,
        state: DeliveryState::parse(&state)?,
        attempts: row.try_get::<i64, _>("attempts")?.clamp(0, u32::MAX.into()) as u32,
        last_http_status: row
            .try_get::<i64, _>("last_http_status")?
            .clamp(0, u32::MAX.into()) as u32,
        last_error: row.try_get("last_error")?,
        last_attempt_at_ms: row.try_get("last_attempt_at_ms")?,
        next_attempt_at_ms: row.try_get("next_attempt_at_ms")?,
    })
}

impl Storage {
    pub async fn insert_webhook(&self, webhook: &WebhookRecord) -> Result<(), Error> {
        let events = serde_json::to_string(&webhook.events)
            .map_err(|e| Error::Corrupt(format!("event filter: {e}")))?;
        sqlx::query(
            "INSERT INTO webhooks \
             (id, url, events_json, secret, after_event_seq, created_at_ms, ca_pem) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&webhook.id)
        .bind(&webhook.url)
        .bind(events)
        .bind(&webhook.secret)
        .bind(seq_param(webhook.after_event_seq))
        .bind(webhook.created_at_ms)
        .bind(&webhook.ca_pem)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every webhook, oldest first (with their secrets: callers showing them
    /// must leave those out).
    pub async fn list_webhooks(&self) -> Result<Vec<WebhookRecord>, Error> {
        sqlx::query("SELECT * FROM webhooks ORDER BY created_at_ms, id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(webhook_from_row)
            .collect()
    }

    /// Removes a webhook and its deliveries; `None` if there is no such one.
    pub async fn remove_webhook(&self, id: &str) -> Result<Option<WebhookRecord>, Error> {
        let mut tx = self.pool.begin().await?;
        let Some(row) = sqlx::query("SELECT * FROM webhooks WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let webhook = webhook_from_row(&row)?;
        sqlx::query("DELETE FROM webhook_deliveries WHERE webhook_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM webhooks WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(webhook))
    }

    /// The last event turned into deliveries.
    pub async fn webhook_cursor(&self) -> Result<u64, Error> {
        let seq: i64 = sqlx::query("SELECT event_seq FROM webhook_cursor WHERE id = 1")
            .fetch_one(&self.pool)
            .await?
            .try_get("event_seq")?;
        Ok(seq.max(0) as u64)
    }

    /// Moves the cursor from `from` to `to` and creates `deliveries`, in one
    /// transaction. `false` (and nothing written) when the cursor is no
    /// longer at `from`: another dispatcher got there first.
    pub async fn fan_out_events(
        &self,
        from: u64,
        to: u64,
        deliveries: &[NewDelivery],
        now_ms: i64,
    ) -> Result<bool, Error> {
        let mut tx = self.pool.begin().await?;
        // First, so that on PostgreSQL the cursor row is locked for the rest
        // of the transaction and a competing dispatcher waits, then finds it
        // moved.
        let moved =
            sqlx::query("UPDATE webhook_cursor SET event_seq = $1 WHERE id = 1 AND event_seq = $2")
                .bind(seq_param(to))
                .bind(seq_param(from))
                .execute(&mut *tx)
                .await?;
        if moved.rows_affected() != 1 {
            return Ok(false);
        }
        for chunk in deliveries.chunks(DELIVERY_ROWS_PER_STATEMENT) {
            let mut placeholders = Placeholders::new(self.backend);
            let mut params = Vec::with_capacity(chunk.len() * 12);
            let mut rows = Vec::with_capacity(chunk.len());
            for d in chunk {
                let row: Vec<String> = (0..12).map(|_| placeholders.next()).collect();
                rows.push(format!("({})", row.join(", ")));
                params.extend([
                    Param::Text(d.webhook_id.clone()),
                    Param::Int(seq_param(d.event_seq)),
                    Param::Text(d.event_kind.clone()),
                    Param::Text(d.rollout_id.clone()),
                    Param::Text(d.payload_json.clone()),
                    Param::Text(DeliveryState::Pending.as_str().to_string()),
                    Param::Int(0),
                    Param::Int(0),
                    Param::Text(String::new()),
                    Param::Int(0),
                    Param::Int(now_ms),
                    Param::Int(now_ms),
                ]);
            }
            // claimed_until_ms starts at 0 (unclaimed); a webhook removed
            // meanwhile makes its rows fail the foreign key, hence the
            // filter on webhooks.
            let sql = format!(
                "INSERT INTO webhook_deliveries (webhook_id, event_seq, event_kind, rollout_id, \
                 payload_json, state, attempts, last_http_status, last_error, \
                 last_attempt_at_ms, next_attempt_at_ms, created_at_ms, claimed_until_ms) \
                 SELECT v.*, 0 FROM (VALUES {}) AS v \
                 WHERE EXISTS (SELECT 1 FROM webhooks w WHERE w.id = v.column1) \
                 ON CONFLICT (webhook_id, event_seq) DO NOTHING",
                rows.join(", ")
            );
            bind_all(sqlx::query(&sql).persistent(false), params)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// A webhook's deliveries that may be attempted now: pending, due,
    /// unclaimed, and first of their rollout (no pending delivery of the
    /// same rollout to the same webhook comes before them).
    pub async fn due_deliveries(
        &self,
        webhook_id: &str,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<DeliveryRecord>, Error> {
        sqlx::query(
            "SELECT d.* FROM webhook_deliveries d \
             WHERE d.webhook_id = $1 AND d.state = 'pending' AND d.next_attempt_at_ms <= $2 \
             AND d.claimed_until_ms <= $3 \
             AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p WHERE p.webhook_id = d.webhook_id \
             AND p.rollout_id = d.rollout_id AND p.state = 'pending' AND p.event_seq < d.event_seq) \
             ORDER BY d.next_attempt_at_ms, d.event_seq LIMIT $4",
        )
        .bind(webhook_id)
        .bind(now_ms)
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(delivery_from_row)
        .collect()
    }

    /// Claims a pending delivery until `until_ms`; `false` if it is
    /// finished or someone else holds it.
    pub async fn claim_delivery(
        &self,
        webhook_id: &str,
        event_seq: u64,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, Error> {
        let claimed = sqlx::query(
            "UPDATE webhook_deliveries SET claimed_until_ms = $1 \
             WHERE webhook_id = $2 AND event_seq = $3 AND state = 'pending' \
             AND claimed_until_ms <= $4",
        )
        .bind(until_ms)
        .bind(webhook_id)
        .bind(seq_param(event_seq))
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(claimed.rows_affected() == 1)
    }

    /// Records an attempt of a pending delivery and releases the claim.
    pub async fn record_delivery_attempt(
        &self,
        webhook_id: &str,
        event_seq: u64,
        attempt: &AttemptRecord,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE webhook_deliveries SET state = $1, attempts = attempts + 1, \
             last_http_status = $2, last_error = $3, last_attempt_at_ms = $4, \
             next_attempt_at_ms = $5, claimed_until_ms = 0 \
             WHERE webhook_id = $6 AND event_seq = $7 AND state = 'pending'",
        )
        .bind(attempt.state.as_str())
        .bind(i64::from(attempt.http_status))
        .bind(&attempt.error)
        .bind(attempt.at_ms)
        .bind(attempt.next_attempt_at_ms)
        .bind(webhook_id)
        .bind(seq_param(event_seq))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deliveries, newest event first, of one webhook or of all.
    pub async fn list_deliveries(
        &self,
        webhook_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DeliveryRecord>, Error> {
        let limit = i64::from(limit);
        let rows =
            match webhook_id {
                Some(id) => {
                    sqlx::query(
                        "SELECT * FROM webhook_deliveries WHERE webhook_id = $1 \
                     ORDER BY event_seq DESC LIMIT $2",
                    )
                    .bind(id)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
                }
                None => sqlx::query(
                    "SELECT * FROM webhook_deliveries ORDER BY event_seq DESC, webhook_id LIMIT $1",
                )
                .bind(limit)
                .fetch_all(&self.pool)
                .await?,
            };
        rows.iter().map(delivery_from_row).collect()
    }

    /// Deletes deliveries delivered or given up before `before_ms`.
    pub async fn prune_finished_deliveries(&self, before_ms: i64) -> Result<u64, Error> {
        let done = sqlx::query(
            "DELETE FROM webhook_deliveries WHERE state <> 'pending' AND last_attempt_at_ms < $1",
        )
        .bind(before_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
