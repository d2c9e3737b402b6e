//! Emergency assignments held for a second person's approval
//! (`held_assignments`). Approving one writes the assignment itself in the
//! same transaction, and only if the row is still awaiting approval and
//! unexpired: two approvals, or an approval racing a cancellation, cannot
//! both take effect.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::desired::write_assignment;
use super::{AssignTarget, DesiredBundleRecord, Storage};
use crate::error::Error;

/// Where a held assignment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldState {
    AwaitingApproval,
    Approved,
    Cancelled,
    /// Awaiting approval past its expiry: it can no longer be approved.
    Lapsed,
}

impl HeldState {
    const AWAITING: &'static str = "awaiting-approval";
    const APPROVED: &'static str = "approved";
    const CANCELLED: &'static str = "cancelled";
}

/// A stored held assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldAssignmentRecord {
    pub id: String,
    /// Empty when the whole store is assigned.
    pub device_id: String,
    pub store_id: String,
    pub bundle_name: String,
    pub bundle_version: String,
    pub bundle_kind: String,
    pub download_ahead: bool,
    /// As stored; see [`HeldAssignmentRecord::state_at`].
    pub state: String,
    pub requested_by: String,
    pub requested_by_id: String,
    pub requested_at_ms: i64,
    pub expires_at_ms: i64,
    pub decided_by: String,
    pub decided_at_ms: Option<i64>,
    pub devices_assigned: i64,
}

impl HeldAssignmentRecord {
    /// Its state at `now_ms`. A row with a state this binary does not know
    /// (written by a later version) counts as cancelled: never applied.
    pub fn state_at(&self, now_ms: i64) -> HeldState {
        match self.state.as_str() {
            HeldState::AWAITING if self.expires_at_ms <= now_ms => HeldState::Lapsed,
            HeldState::AWAITING => HeldState::AwaitingApproval,
            HeldState::APPROVED => HeldState::Approved,
            _ => HeldState::Cancelled,
        }
    }

    /// Whom the assignment is for.
    pub fn target(&self) -> AssignTarget {
        if self.device_id.is_empty() {
            AssignTarget::Store(self.store_id.clone())
        } else {
            AssignTarget::Device(self.device_id.clone())
        }
    }

    /// The desired-state row approving it writes.
    pub fn desired(&self) -> DesiredBundleRecord {
        DesiredBundleRecord {
            name: self.bundle_name.clone(),
            version: self.bundle_version.clone(),
            kind: self.bundle_kind.clone(),
            download_ahead: self.download_ahead,
            emergency: true,
            rollback: false,
        }
    }
}

/// An emergency assignment to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewHeldAssignment<'a> {
    pub id: &'a str,
    pub target: &'a AssignTarget,
    pub store_id: &'a str,
    pub bundle: &'a DesiredBundleRecord,
    pub requested_by: &'a str,
    pub requested_by_id: &'a str,
    pub requested_at_ms: i64,
    pub expires_at_ms: i64,
}

/// A decision on a held assignment: who makes it, when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    pub id: &'a str,
    pub by: &'a str,
    pub at_ms: i64,
}

const COLUMNS: &str = "id, device_id, store_id, bundle_name, bundle_version, bundle_kind, \
     download_ahead, state, requested_by, requested_by_id, requested_at_ms, expires_at_ms, \
     decided_by, decided_at_ms, devices_assigned";

fn held_from_row(row: &AnyRow) -> Result<HeldAssignmentRecord, Error> {
    Ok(HeldAssignmentRecord {
        id: row.try_get("id")?,
        device_id: row.try_get("device_id")?,
        store_id: row.try_get("store_id")?,
        bundle_name: row.try_get("bundle_name")?,
        bundle_version: row.try_get("bundle_version")?,
        bundle_kind: row.try_get("bundle_kind")?,
        download_ahead: row.try_get::<i64, _>("download_ahead")? != 0,
        state: row.try_get("state")?,
        requested_by: row.try_get("requested_by")?,
        requested_by_id: row.try_get("requested_by_id")?,
        requested_at_ms: row.try_get("requested_at_ms")?,
        expires_at_ms: row.try_get("expires_at_ms")?,
        decided_by: row.try_get("decided_by")?,
        decided_at_ms: row.try_get("decided_at_ms")?,
        devices_assigned: row.try_get("devices_assigned")?,
    })
}

impl Storage {
    pub async fn hold_assignment(&self, held: &NewHeldAssignment<'_>) -> Result<(), Error> {
        let device_id = match held.target {
            AssignTarget::Device(id) => id.as_str(),
            AssignTarget::Store(_) => "",
        };
        sqlx::query(
            "INSERT INTO held_assignments (id, device_id, store_id, bundle_name, \
             bundle_version, bundle_kind, download_ahead, state, requested_by, \
             requested_by_id, requested_at_ms, expires_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(held.id)
        .bind(device_id)
        .bind(held.store_id)
        .bind(&held.bundle.name)
        .bind(&held.bundle.version)
        .bind(&held.bundle.kind)
        .bind(i64::from(held.bundle.download_ahead))
        .bind(HeldState::AWAITING)
        .bind(held.requested_by)
        .bind(held.requested_by_id)
        .bind(held.requested_at_ms)
        .bind(held.expires_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn held_assignment(&self, id: &str) -> Result<Option<HeldAssignmentRecord>, Error> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM held_assignments WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(held_from_row)
        .transpose()
    }

    /// Those awaiting approval (lapsed ones included), oldest first, then,
    /// with `decided`, up to `limit` of the others, newest first.
    pub async fn held_assignments(
        &self,
        decided: bool,
        limit: i64,
    ) -> Result<Vec<HeldAssignmentRecord>, Error> {
        let mut held: Vec<HeldAssignmentRecord> = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM held_assignments WHERE state = $1 \
             ORDER BY requested_at_ms, id LIMIT $2"
        ))
        .bind(HeldState::AWAITING)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(held_from_row)
        .collect::<Result<_, _>>()?;
        if decided {
            let rows = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM held_assignments WHERE state <> $1 \
                 ORDER BY decided_at_ms DESC, id LIMIT $2"
            ))
            .bind(HeldState::AWAITING)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
            for row in &rows {
                held.push(held_from_row(row)?);
            }
        }
        Ok(held)
    }

    /// Approves a held assignment and writes it, if it still awaits
    /// approval and has not lapsed at `decision.at_ms`; returns how many
    /// devices it now applies to, or `None` (nothing written) if it no
    /// longer awaits approval.
    pub async fn approve_held_assignment(
        &self,
        decision: Decision<'_>,
    ) -> Result<Option<i64>, Error> {
        // The claim first: a transaction that writes first holds SQLite's
        // write lock from its start (one that reads first may find it
        // taken when it comes to write, and fail instead of waiting).
        let mut tx = self.pool.begin().await?;
        let claimed = sqlx::query(
            "UPDATE held_assignments SET state = $1, decided_by = $2, decided_at_ms = $3 \
             WHERE id = $4 AND state = $5 AND expires_at_ms > $3",
        )
        .bind(HeldState::APPROVED)
        .bind(decision.by)
        .bind(decision.at_ms)
        .bind(decision.id)
        .bind(HeldState::AWAITING)
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() != 1 {
            return Ok(None);
        }
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM held_assignments WHERE id = $1"
        ))
        .bind(decision.id)
        .fetch_one(&mut *tx)
        .await?;
        let held = held_from_row(&row)?;
        let assigned =
            write_assignment(&mut tx, &held.target(), &held.desired(), decision.at_ms).await?;
        sqlx::query("UPDATE held_assignments SET devices_assigned = $1 WHERE id = $2")
            .bind(assigned)
            .bind(decision.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(assigned))
    }

    /// Withdraws a held assignment that still awaits approval (lapsed or
    /// not); `false` if it does not.
    pub async fn cancel_held_assignment(&self, decision: Decision<'_>) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE held_assignments SET state = $1, decided_by = $2, decided_at_ms = $3 \
             WHERE id = $4 AND state = $5",
        )
        .bind(HeldState::CANCELLED)
        .bind(decision.by)
        .bind(decision.at_ms)
        .bind(decision.id)
        .bind(HeldState::AWAITING)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
