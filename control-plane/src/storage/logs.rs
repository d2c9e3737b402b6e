//! Logs on demand (`log_requests`, `log_lines`): operators' requests for a
//! till's logs and the lines tills uploaded for them.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Param, Placeholders, Storage, bind_all};
use crate::error::Error;

/// Where a log request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogRequestState {
    /// Waiting for the till's next heartbeat.
    Pending,
    /// The till is uploading (or its upload broke off and it will start
    /// over at its next heartbeat).
    Uploading,
    Done,
    /// The till did not answer in time.
    Expired,
}

impl LogRequestState {
    pub fn as_str(self) -> &'static str {
        match self {
            LogRequestState::Pending => "pending",
            LogRequestState::Uploading => "uploading",
            LogRequestState::Done => "done",
            LogRequestState::Expired => "expired",
        }
    }

    fn parse(text: &str) -> Result<LogRequestState, Error> {
        Ok(match text {
            "pending" => LogRequestState::Pending,
            "uploading" => LogRequestState::Uploading,
            "done" => LogRequestState::Done,
            "expired" => LogRequestState::Expired,
            other => return Err(Error::Corrupt(format!("unknown log request state {other}"))),
        })
    }

    /// Still to be answered by the till.
    pub fn is_open(self) -> bool {
        matches!(self, LogRequestState::Pending | LogRequestState::Uploading)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRequestRecord {
    /// What was asked (its expiry is pushed back while an upload runs).
    pub request: NewLogRequest,
    /// As stored: an open request past its expiry is expired even before
    /// a prune marks it (see [`LogRequestRecord::state_at`]).
    pub state: LogRequestState,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    pub keep_until_ms: i64,
    pub lines_received: i64,
    pub bytes_received: i64,
    pub note: String,
}

impl LogRequestRecord {
    /// The state at `now_ms`.
    pub fn state_at(&self, now_ms: i64) -> LogRequestState {
        if self.state.is_open() && now_ms >= self.request.expires_at_ms {
            LogRequestState::Expired
        } else {
            self.state
        }
    }
}

/// A request as an operator makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLogRequest {
    pub id: String,
    pub device_id: String,
    pub requested_by: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub since_ms: i64,
    pub max_lines: i64,
    pub grep: String,
    pub follow_seconds: i64,
}

impl LogRequestRecord {
    /// `new` as stored, before its till answers.
    pub fn pending(request: NewLogRequest) -> LogRequestRecord {
        LogRequestRecord {
            request,
            state: LogRequestState::Pending,
            started_at_ms: 0,
            finished_at_ms: 0,
            keep_until_ms: 0,
            lines_received: 0,
            bytes_received: 0,
            note: String::new(),
        }
    }
}

/// One uploaded line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLineRecord {
    pub seq: i64,
    pub unix_ms: i64,
    pub source: String,
    pub text: String,
}

/// Lines written per statement (5 parameters each).
const LINES_PER_STATEMENT: usize = 500;

const REQUEST_COLUMNS: &str = "id, device_id, requested_by, created_at_ms, expires_at_ms, \
    since_ms, max_lines, grep, follow_seconds, state, started_at_ms, finished_at_ms, \
    keep_until_ms, lines_received, bytes_received, note";

fn request_from_row(row: &AnyRow) -> Result<LogRequestRecord, Error> {
    Ok(LogRequestRecord {
        request: NewLogRequest {
            id: row.try_get("id")?,
            device_id: row.try_get("device_id")?,
            requested_by: row.try_get("requested_by")?,
            created_at_ms: row.try_get("created_at_ms")?,
            expires_at_ms: row.try_get("expires_at_ms")?,
            since_ms: row.try_get("since_ms")?,
            max_lines: row.try_get("max_lines")?,
            grep: row.try_get("grep")?,
            follow_seconds: row.try_get("follow_seconds")?,
        },
        state: LogRequestState::parse(&row.try_get::<String, _>("state")?)?,
        started_at_ms: row.try_get("started_at_ms")?,
        finished_at_ms: row.try_get("finished_at_ms")?,
        keep_until_ms: row.try_get("keep_until_ms")?,
        lines_received: row.try_get("lines_received")?,
        bytes_received: row.try_get("bytes_received")?,
        note: row.try_get("note")?,
    })
}

impl Storage {
    /// Stores a new pending request.
    pub async fn insert_log_request(&self, request: &NewLogRequest) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO log_requests (id, device_id, requested_by, created_at_ms, expires_at_ms, \
             since_ms, max_lines, grep, follow_seconds, state, started_at_ms, finished_at_ms, \
             keep_until_ms, lines_received, bytes_received, last_seq, note) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, 0, 0, 0, 0, 0, '')",
        )
        .bind(&request.id)
        .bind(&request.device_id)
        .bind(&request.requested_by)
        .bind(request.created_at_ms)
        .bind(request.expires_at_ms)
        .bind(request.since_ms)
        .bind(request.max_lines)
        .bind(&request.grep)
        .bind(request.follow_seconds)
        .bind(LogRequestState::Pending.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn log_request(&self, id: &str) -> Result<Option<LogRequestRecord>, Error> {
        let row = sqlx::query(&format!(
            "SELECT {REQUEST_COLUMNS} FROM log_requests WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(request_from_row).transpose()
    }

    /// Every request of the fleet still waiting for its till at `now_ms`,
    /// oldest first: what heartbeats hand out.
    pub async fn open_log_requests(&self, now_ms: i64) -> Result<Vec<LogRequestRecord>, Error> {
        let rows = sqlx::query(&format!(
            "SELECT {REQUEST_COLUMNS} FROM log_requests \
             WHERE state IN ('pending', 'uploading') AND expires_at_ms > $1 \
             ORDER BY created_at_ms, id"
        ))
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(request_from_row).collect()
    }

    /// How many of a device's requests are still open at `now_ms`.
    pub async fn count_open_log_requests(
        &self,
        device_id: &str,
        now_ms: i64,
    ) -> Result<i64, Error> {
        Ok(sqlx::query(
            "SELECT COUNT(*) AS n FROM log_requests \
             WHERE device_id = $1 AND state IN ('pending', 'uploading') AND expires_at_ms > $2",
        )
        .bind(device_id)
        .bind(now_ms)
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?)
    }

    /// Starts (or starts over) the upload of an open request: its earlier
    /// lines are dropped, and it stays open at least until `open_until_ms`.
    /// `false` if it was not open any more (answered or expired meanwhile).
    pub async fn start_log_upload(
        &self,
        id: &str,
        now_ms: i64,
        open_until_ms: i64,
    ) -> Result<bool, Error> {
        let mut tx = self.pool.begin().await?;
        let started = sqlx::query(
            "UPDATE log_requests SET state = 'uploading', started_at_ms = $2, \
             expires_at_ms = CASE WHEN expires_at_ms < $3 THEN $3 ELSE expires_at_ms END, \
             lines_received = 0, bytes_received = 0, note = '' \
             WHERE id = $1 AND state IN ('pending', 'uploading') AND expires_at_ms > $2",
        )
        .bind(id)
        .bind(now_ms)
        .bind(open_until_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if started {
            sqlx::query("DELETE FROM log_lines WHERE request_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(started)
    }

    /// Appends uploaded lines (numbered after the request's last one) and
    /// counts them with `bytes`.
    pub async fn append_log_lines(
        &self,
        id: &str,
        lines: &[(i64, String, String)],
        bytes: i64,
    ) -> Result<(), Error> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let last_seq: i64 = sqlx::query(
            "UPDATE log_requests SET last_seq = last_seq + $2, \
             lines_received = lines_received + $2, bytes_received = bytes_received + $3 \
             WHERE id = $1 RETURNING last_seq",
        )
        .bind(id)
        .bind(lines.len() as i64)
        .bind(bytes)
        .fetch_one(&mut *tx)
        .await?
        .try_get("last_seq")?;
        let mut seq = last_seq - lines.len() as i64;
        for chunk in lines.chunks(LINES_PER_STATEMENT) {
            let mut placeholders = Placeholders::new(self.backend);
            let mut params = Vec::with_capacity(chunk.len() * 5);
            let mut values = Vec::with_capacity(chunk.len());
            for (unix_ms, source, text) in chunk {
                seq += 1;
                values.push(format!(
                    "({}, {}, {}, {}, {})",
                    placeholders.next(),
                    placeholders.next(),
                    placeholders.next(),
                    placeholders.next(),
                    placeholders.next()
                ));
                params.extend([
                    Param::Text(id.to_string()),
                    Param::Int(seq),
                    Param::Int(*unix_ms),
                    Param::Text(source.clone()),
                    Param::Text(text.clone()),
                ]);
            }
            let sql = format!(
                "INSERT INTO log_lines (request_id, seq, unix_ms, source, text) VALUES {}",
                values.join(", ")
            );
            bind_all(sqlx::query(&sql), params)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Marks an upload done; its lines are kept until `keep_until_ms`.
    pub async fn finish_log_upload(
        &self,
        id: &str,
        now_ms: i64,
        keep_until_ms: i64,
        note: &str,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE log_requests SET state = 'done', finished_at_ms = $2, keep_until_ms = $3, \
             note = $4 WHERE id = $1",
        )
        .bind(id)
        .bind(now_ms)
        .bind(keep_until_ms)
        .bind(note)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Up to `limit` lines of a request after `after_seq`, in order.
    pub async fn log_lines_after(
        &self,
        id: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<LogLineRecord>, Error> {
        let rows = sqlx::query(
            "SELECT seq, unix_ms, source, text FROM log_lines \
             WHERE request_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(id)
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(LogLineRecord {
                    seq: row.try_get("seq")?,
                    unix_ms: row.try_get("unix_ms")?,
                    source: row.try_get("source")?,
                    text: row.try_get("text")?,
                })
            })
            .collect()
    }

    /// Marks open requests past their expiry as expired (returns how many)
    /// and deletes, with their lines, the requests done or expired before
    /// `forget_before_ms` (done ones once their lines' time is over).
    pub async fn prune_log_requests(
        &self,
        now_ms: i64,
        forget_before_ms: i64,
    ) -> Result<u64, Error> {
        let expired = sqlx::query(
            "UPDATE log_requests SET state = 'expired', finished_at_ms = expires_at_ms \
             WHERE state IN ('pending', 'uploading') AND expires_at_ms <= $1",
        )
        .bind(now_ms)
        .execute(&self.pool)
        .await?
        .rows_affected();
        let mut tx = self.pool.begin().await?;
        let gone = "SELECT id FROM log_requests WHERE (state = 'done' AND keep_until_ms <= $1) \
                    OR (state = 'expired' AND finished_at_ms <= $2)";
        sqlx::query(&format!(
            "DELETE FROM log_lines WHERE request_id IN ({gone})"
        ))
        .bind(now_ms)
        .bind(forget_before_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!("DELETE FROM log_requests WHERE id IN ({gone})"))
            .bind(now_ms)
            .bind(forget_before_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(expired)
    }
}
