//! `posfleet audit list`: every mutating admin call, oldest first.

use clap::Subcommand;
use posfleet_proto::v1;
use serde::Serialize;
use serde_json::Value;

use crate::view::{table, time};
use crate::{Admin, Output, show};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Mutating admin calls: who, what, on what, when, from where, and how
    /// it ended (PENDING: the server did not see it end).
    List {
        /// Only entries after this sequence number (a cursor: pass the last
        /// SEQ shown to see the next ones).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many (the server caps it at 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only what this user did: their calls, logins and logouts, and
        /// the calls of the tokens they created.
        #[arg(long)]
        user: Option<String>,
    },
}

#[derive(Debug, Serialize)]
pub struct AuditEntryView {
    pub seq: u64,
    pub at: String,
    /// The user's or the token's name.
    pub actor: String,
    /// `user` (a session), `token`, `session` (a login or logout) or empty
    /// (unauthenticated).
    pub actor_kind: String,
    /// For a token: the user who created it; empty otherwise.
    pub actor_owner: String,
    /// The role the call was made with; empty when unauthenticated.
    pub role: String,
    pub method: String,
    /// The call's ids and main arguments.
    pub target: Value,
    pub peer_address: String,
    pub result: String,
}

impl From<v1::AuditEntry> for AuditEntryView {
    fn from(e: v1::AuditEntry) -> Self {
        AuditEntryView {
            seq: e.seq,
            at: time(e.at_unix_ms),
            actor: e.actor,
            actor_kind: e.actor_kind,
            actor_owner: e.actor_owner,
            role: e.role,
            method: e.method,
            target: serde_json::from_str(&e.target_json).unwrap_or(Value::String(e.target_json)),
            peer_address: e.peer_address,
            result: e.result,
        }
    }
}

/// `{"store_id":"s1","uses":2}` → `store_id=s1 uses=2`, cut to `max` chars.
pub fn compact(target: &Value, max: usize) -> String {
    let text = match target {
        Value::Object(fields) => fields
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    };
    if text.chars().count() <= max {
        return text;
    }
    let cut: String = text.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

pub fn audit_table(entries: &[AuditEntryView]) -> comfy_table::Table {
    let mut t = table(&[
        "SEQ", "TIME", "ACTOR", "KIND", "OWNER", "ROLE", "METHOD", "TARGET", "FROM", "RESULT",
    ]);
    for e in entries {
        t.add_row(vec![
            e.seq.to_string(),
            e.at.clone(),
            e.actor.clone(),
            e.actor_kind.clone(),
            e.actor_owner.clone(),
            e.role.clone(),
            e.method.clone(),
            compact(&e.target, 60),
            e.peer_address.clone(),
            e.result.clone(),
        ]);
    }
    t
}

impl Admin {
    pub async fn list_audit_entries(
        &mut self,
        after_seq: u64,
        limit: u32,
        user: String,
    ) -> anyhow::Result<Vec<v1::AuditEntry>> {
        let request = self.request(v1::ListAuditEntriesRequest {
            after_seq,
            limit,
            user,
        });
        let answer = self.client.list_audit_entries(request).await;
        self.answer(answer).map(|r| r.entries)
    }
}

pub async fn run(admin: &mut Admin, command: AuditCommand, output: Output) -> anyhow::Result<()> {
    match command {
        AuditCommand::List { after, limit, user } => {
            let more = match &user {
                Some(user) => format!(" --user {user}"),
                None => String::new(),
            };
            let entries: Vec<AuditEntryView> = admin
                .list_audit_entries(after, limit, user.unwrap_or_default())
                .await?
                .into_iter()
                .map(Into::into)
                .collect();
            show(output, &entries, || {
                let mut text = format!("{}\n", audit_table(&entries));
                if let Some(last) = entries.last()
                    && entries.len() as u32 >= limit
                {
                    text.push_str(&format!(
                        "More may follow: posfleet audit list --after {}{more}\n",
                        last.seq
                    ));
                }
                text
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_read_as_key_values() {
        let target = serde_json::json!({"store_id": "s1", "uses": 2, "window": null});
        assert_eq!(compact(&target, 60), "store_id=s1 uses=2");
        assert_eq!(compact(&target, 8), "store_i…");
        assert_eq!(compact(&serde_json::json!({}), 60), "");
    }
}
