//! Four-eyes approval of emergency assignments. `AssignBundle` with
//! `emergency` set (install at once, outside the maintenance window) holds
//! the assignment instead of writing it; a second person with the deployer
//! or admin role approves it (which writes it) or anyone with that role
//! cancels it; unapproved, it lapses after `held_assignment_expiry_seconds`.

use posfleet_proto::v1;
use tonic::Status;

use super::AdminApi;
use crate::authz::Principal;
use crate::storage::{
    AssignTarget, Decision, DesiredBundleRecord, HeldAssignmentRecord, HeldState, NewHeldAssignment,
};
use crate::validate::text;
use crate::{format_ms, now_ms, secret};

/// Held assignments a list shows at most, of those awaiting approval and
/// of the decided ones each.
const MAX_LISTED: i64 = 200;

fn state(state: HeldState) -> v1::HeldAssignmentState {
    match state {
        HeldState::AwaitingApproval => v1::HeldAssignmentState::AwaitingApproval,
        HeldState::Approved => v1::HeldAssignmentState::Approved,
        HeldState::Cancelled => v1::HeldAssignmentState::Cancelled,
        HeldState::Lapsed => v1::HeldAssignmentState::Lapsed,
    }
}

fn view(held: HeldAssignmentRecord, now_ms: i64) -> v1::HeldAssignment {
    v1::HeldAssignment {
        state: state(held.state_at(now_ms)).into(),
        id: held.id,
        device_id: held.device_id,
        store_id: held.store_id,
        name: held.bundle_name,
        version: held.bundle_version,
        download_ahead: held.download_ahead,
        requested_by: held.requested_by,
        requested_at_unix_ms: held.requested_at_ms,
        expires_at_unix_ms: held.expires_at_ms,
        decided_by: held.decided_by,
        decided_at_unix_ms: held.decided_at_ms.unwrap_or(0),
        devices_assigned: held.devices_assigned.max(0) as u64,
    }
}

/// "emergency assignment asg-… of pos-app 1.0.1 to device dev-…".
fn describe(held: &HeldAssignmentRecord) -> String {
    let to = match held.target() {
        AssignTarget::Device(id) => format!("device {id}"),
        AssignTarget::Store(id) => format!("store {id}"),
    };
    format!(
        "emergency assignment {} of {} {} to {to}",
        held.id, held.bundle_name, held.bundle_version
    )
}

/// `FAILED_PRECONDITION` saying why `held` can no longer be approved or
/// cancelled; `None` while it awaits approval.
fn decided(held: &HeldAssignmentRecord, now_ms: i64) -> Option<Status> {
    let what = describe(held);
    let why = match held.state_at(now_ms) {
        HeldState::AwaitingApproval => return None,
        HeldState::Approved => format!(
            "{what} was already approved by {} at {}",
            held.decided_by,
            format_ms(held.decided_at_ms.unwrap_or(0))
        ),
        HeldState::Cancelled => format!(
            "{what} was cancelled by {} at {}",
            held.decided_by,
            format_ms(held.decided_at_ms.unwrap_or(0))
        ),
        HeldState::Lapsed => format!(
            "{what} lapsed unapproved at {}; assign it again if it is still needed",
            format_ms(held.expires_at_ms)
        ),
    };
    Some(Status::failed_precondition(why))
}

impl AdminApi {
    /// Holds an emergency assignment, checked like any other, for a second
    /// person's approval.
    pub(super) async fn hold_assignment(
        &self,
        caller: &Principal,
        target: &AssignTarget,
        store_id: &str,
        bundle: &DesiredBundleRecord,
    ) -> Result<v1::HeldAssignment, Status> {
        let now = now_ms();
        let id = secret::short_id("asg-", 6);
        self.storage
            .hold_assignment(&NewHeldAssignment {
                id: &id,
                target,
                store_id,
                bundle,
                requested_by: &caller.name,
                requested_by_id: caller.person_id(),
                requested_at_ms: now,
                expires_at_ms: now.saturating_add(self.held_assignment_expiry_ms),
            })
            .await?;
        let held = self.held(caller, &id).await?;
        tracing::warn!(
            assignment_id = %id,
            store_id,
            bundle = %bundle.name,
            version = %bundle.version,
            requested_by = %caller.name,
            "Emergency assignment held for a second person's approval."
        );
        Ok(view(held, now))
    }

    /// Held assignment `id` if it exists and its store is in the caller's
    /// scope.
    async fn held(&self, caller: &Principal, id: &str) -> Result<HeldAssignmentRecord, Status> {
        text("id", id, true, 64)?;
        let held = self
            .storage
            .held_assignment(id)
            .await?
            .ok_or_else(|| Status::not_found(format!("unknown held assignment {id}")))?;
        self.act_on_store(caller, &held.store_id).await?;
        Ok(held)
    }

    pub(super) async fn list_held(
        &self,
        caller: &Principal,
        req: v1::ListHeldAssignmentsRequest,
    ) -> Result<v1::ListHeldAssignmentsResponse, Status> {
        let stores = self.scope_stores(caller).await?;
        let now = now_ms();
        let assignments = self
            .storage
            .held_assignments(req.include_decided, MAX_LISTED)
            .await?
            .into_iter()
            .filter(|held| stores.as_ref().is_none_or(|s| s.contains(&held.store_id)))
            .map(|held| view(held, now))
            .collect();
        Ok(v1::ListHeldAssignmentsResponse { assignments })
    }

    pub(super) async fn approve_held(
        &self,
        caller: &Principal,
        req: v1::HeldAssignmentRequest,
    ) -> Result<v1::HeldAssignment, Status> {
        let held = self.held(caller, &req.id).await?;
        let now = now_ms();
        if let Some(refusal) = decided(&held, now) {
            return Err(refusal);
        }
        if held.requested_by_id == caller.person_id() {
            let who = if held.requested_by == caller.name {
                format!(
                    "{} {} asked for {}",
                    caller.kind(),
                    caller.name,
                    describe(&held)
                )
            } else {
                format!(
                    "{} {} belongs to the person who asked for {} (as {})",
                    caller.kind(),
                    caller.name,
                    describe(&held),
                    held.requested_by
                )
            };
            return Err(Status::permission_denied(format!(
                "{who}; another person with the deployer or admin role must approve it"
            )));
        }
        if let AssignTarget::Device(id) = held.target() {
            self.existing_device(&id).await?;
        }
        let decision = Decision {
            id: &held.id,
            by: &caller.name,
            at_ms: now,
        };
        let Some(devices) = self.storage.approve_held_assignment(decision).await? else {
            // Decided (or lapsed) since it was read.
            let held = self.held(caller, &req.id).await?;
            return Err(decided(&held, now_ms())
                .unwrap_or_else(|| Status::aborted("the assignment changed; try again")));
        };
        self.desired.invalidate(&held.store_id).await;
        tracing::warn!(
            assignment_id = %held.id,
            store_id = %held.store_id,
            device_id = %held.device_id,
            bundle = %held.bundle_name,
            version = %held.bundle_version,
            requested_by = %held.requested_by,
            approved_by = %caller.name,
            devices_assigned = devices,
            "Emergency assignment approved and applied."
        );
        Ok(view(self.held(caller, &req.id).await?, now_ms()))
    }

    pub(super) async fn cancel_held(
        &self,
        caller: &Principal,
        req: v1::HeldAssignmentRequest,
    ) -> Result<v1::HeldAssignment, Status> {
        let held = self.held(caller, &req.id).await?;
        let now = now_ms();
        let decision = Decision {
            id: &held.id,
            by: &caller.name,
            at_ms: now,
        };
        // A lapsed one may be cancelled too: it leaves the list.
        if held.state_at(now) != HeldState::Lapsed
            && let Some(refusal) = decided(&held, now)
        {
            return Err(refusal);
        }
        if !self.storage.cancel_held_assignment(decision).await? {
            let held = self.held(caller, &req.id).await?;
            return Err(decided(&held, now_ms())
                .unwrap_or_else(|| Status::aborted("the assignment changed; try again")));
        }
        tracing::info!(assignment_id = %held.id, cancelled_by = %caller.name, "Emergency assignment cancelled.");
        Ok(view(self.held(caller, &req.id).await?, now_ms()))
    }
}
