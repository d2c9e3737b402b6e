//! `posfleet assignment list|approve|cancel`: emergency assignments
//! (`posfleet device assign --emergency`), held until a second person
//! approves them.

use clap::Subcommand;
use posfleet_proto::v1;
use serde::Serialize;

use crate::view::{table, time};
use crate::{Admin, Output, show};

#[derive(Debug, Subcommand)]
pub enum AssignmentCommand {
    /// Emergency assignments awaiting approval (lapsed ones too, until
    /// cancelled).
    List {
        /// The latest approved, cancelled and lapsed ones too.
        #[arg(long)]
        all: bool,
    },
    /// Approve an emergency assignment, which applies it: its tills install
    /// at once, outside their maintenance window. Deployers and admins
    /// only, and not the person who asked for it.
    Approve { id: String },
    /// Withdraw an emergency assignment before it is approved.
    Cancel { id: String },
}

#[derive(Debug, Serialize)]
pub struct HeldAssignmentView {
    pub id: String,
    /// `awaiting-approval`, `approved`, `cancelled` or `lapsed`.
    pub state: &'static str,
    pub name: String,
    pub version: String,
    /// Empty when the whole store is assigned.
    pub device_id: String,
    pub store_id: String,
    pub download_ahead: bool,
    pub requested_by: String,
    pub requested_at: String,
    pub expires_at: String,
    pub decided_by: String,
    pub decided_at: String,
    pub devices_assigned: u64,
}

fn state_name(state: v1::HeldAssignmentState) -> &'static str {
    match state {
        v1::HeldAssignmentState::AwaitingApproval => "awaiting-approval",
        v1::HeldAssignmentState::Approved => "approved",
        v1::HeldAssignmentState::Cancelled => "cancelled",
        v1::HeldAssignmentState::Lapsed => "lapsed",
        v1::HeldAssignmentState::Unspecified => "unknown",
    }
}

impl From<v1::HeldAssignment> for HeldAssignmentView {
    fn from(a: v1::HeldAssignment) -> Self {
        HeldAssignmentView {
            state: state_name(a.state()),
            id: a.id,
            name: a.name,
            version: a.version,
            device_id: a.device_id,
            store_id: a.store_id,
            download_ahead: a.download_ahead,
            requested_by: a.requested_by,
            requested_at: time(a.requested_at_unix_ms),
            expires_at: time(a.expires_at_unix_ms),
            decided_by: a.decided_by,
            decided_at: time(a.decided_at_unix_ms),
            devices_assigned: a.devices_assigned,
        }
    }
}

impl HeldAssignmentView {
    /// `device dev-… (store s1)` or `store s1`.
    fn target(&self) -> String {
        match self.device_id.as_str() {
            "" => format!("store {}", self.store_id),
            device => format!("device {device} (store {})", self.store_id),
        }
    }
}

fn held_table(held: &[HeldAssignmentView]) -> comfy_table::Table {
    let mut t = table(&[
        "ASSIGNMENT",
        "STATE",
        "BUNDLE",
        "TARGET",
        "REQUESTED BY",
        "EXPIRES",
        "DECIDED BY",
    ]);
    for a in held {
        t.add_row(vec![
            a.id.clone(),
            a.state.to_string(),
            format!("{}@{}", a.name, a.version),
            a.target(),
            a.requested_by.clone(),
            a.expires_at.clone(),
            a.decided_by.clone(),
        ]);
    }
    t
}

/// What `posfleet device assign --emergency` prints: nothing is assigned
/// until someone else approves.
pub fn held_summary(a: &HeldAssignmentView) -> String {
    format!(
        "Held emergency assignment {} of {}@{} to {}: nothing is assigned until another \
         deployer or admin approves it with `posfleet assignment approve {}` (before {}).\n",
        a.id,
        a.name,
        a.version,
        a.target(),
        a.id,
        a.expires_at
    )
}

fn decided_summary(a: &HeldAssignmentView) -> String {
    match a.state {
        "approved" => {
            let devices = match a.devices_assigned {
                1 => "1 device".to_string(),
                n => format!("{n} devices"),
            };
            format!(
                "Approved emergency assignment {} of {}@{} to {} (asked for by {}): {devices} \
                 now assigned; they install at once.\n",
                a.id,
                a.name,
                a.version,
                a.target(),
                a.requested_by
            )
        }
        state => format!(
            "Emergency assignment {} of {}@{} to {} is {state}.\n",
            a.id,
            a.name,
            a.version,
            a.target()
        ),
    }
}

impl Admin {
    async fn list_held_assignments(
        &mut self,
        include_decided: bool,
    ) -> anyhow::Result<Vec<v1::HeldAssignment>> {
        let request = self.request(v1::ListHeldAssignmentsRequest { include_decided });
        let answer = self.client.list_held_assignments(request).await;
        self.answer(answer).map(|r| r.assignments)
    }

    pub async fn approve_assignment(&mut self, id: String) -> anyhow::Result<v1::HeldAssignment> {
        let request = self.request(v1::HeldAssignmentRequest { id });
        let answer = self.client.approve_assignment(request).await;
        self.answer(answer)
    }

    async fn cancel_assignment(&mut self, id: String) -> anyhow::Result<v1::HeldAssignment> {
        let request = self.request(v1::HeldAssignmentRequest { id });
        let answer = self.client.cancel_assignment(request).await;
        self.answer(answer)
    }
}

pub async fn run(
    admin: &mut Admin,
    command: AssignmentCommand,
    output: Output,
) -> anyhow::Result<()> {
    let decided = match command {
        AssignmentCommand::List { all } => {
            let held: Vec<HeldAssignmentView> = admin
                .list_held_assignments(all)
                .await?
                .into_iter()
                .map(Into::into)
                .collect();
            return show(output, &held, || format!("{}\n", held_table(&held)));
        }
        AssignmentCommand::Approve { id } => admin.approve_assignment(id).await?,
        AssignmentCommand::Cancel { id } => admin.cancel_assignment(id).await?,
    };
    let decided = HeldAssignmentView::from(decided);
    show(output, &decided, || decided_summary(&decided))
}
