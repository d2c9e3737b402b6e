//! `posfleet token list|create|revoke`: the admin API tokens callers are
//! identified by (the audit log names them).

use clap::Subcommand;
use posfleet_proto::v1;
use serde::Serialize;

use crate::view::{table, time};
use crate::{Admin, Output, show};

#[derive(Debug, Subcommand)]
pub enum AdminTokenCommand {
    /// Live admin tokens.
    List {
        /// Revoked tokens too.
        #[arg(long)]
        all: bool,
    },
    /// Create a token with one role; its secret is printed once. Only an
    /// admin token may create tokens.
    Create {
        /// Who holds it, e.g. `ci-release` or `alice`: 1 to 64 lowercase
        /// letters, digits or '-'. The audit log names its calls by it;
        /// names are never reused.
        #[arg(long)]
        name: String,
        /// What it may do: viewer, publisher, deployer, store-ops or admin
        /// (see the README's "Operators and roles").
        #[arg(long)]
        role: String,
        /// How long it lives, e.g. `90d` or `12h` (at most a year). Required.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: std::time::Duration,
        /// Confine it to the stores carrying this label, `key=value`
        /// (repeat for several; a store needs all). Viewer, deployer and
        /// store-ops tokens only.
        #[arg(long = "scope", value_parser = crate::parse_label)]
        scope: Vec<(String, String)>,
    },
    /// Revoke a token: refused from its next call on, on every replica. A
    /// token may revoke itself; the last live admin token cannot be revoked.
    Revoke { id: String },
}

#[derive(Debug, Serialize)]
pub struct AdminTokenView {
    pub id: String,
    pub name: String,
    pub role: String,
    /// Empty when it never expires.
    pub expires_at: String,
    /// Store labels it is confined to (`region=eu`); empty when unscoped.
    pub scope: String,
    /// The user (or, for older tokens, the token) that created it.
    pub created_by: String,
    pub created_at: String,
    /// Empty when live.
    pub revoked_at: String,
    /// Only when just created: the secret, shown once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl From<v1::AdminToken> for AdminTokenView {
    fn from(t: v1::AdminToken) -> Self {
        AdminTokenView {
            id: t.id,
            name: t.name,
            role: t.role,
            expires_at: time(t.expires_at_unix_ms),
            scope: crate::view::scope(&t.scope),
            created_by: t.created_by,
            created_at: time(t.created_at_unix_ms),
            revoked_at: time(t.revoked_at_unix_ms),
            secret: None,
        }
    }
}

pub fn admin_tokens_table(tokens: &[AdminTokenView]) -> comfy_table::Table {
    let mut t = table(&[
        "TOKEN",
        "NAME",
        "ROLE",
        "EXPIRES",
        "SCOPE",
        "CREATED BY",
        "CREATED",
        "REVOKED",
    ]);
    for token in tokens {
        t.add_row(vec![
            token.id.clone(),
            token.name.clone(),
            token.role.clone(),
            token.expires_at.clone(),
            token.scope.clone(),
            token.created_by.clone(),
            token.created_at.clone(),
            token.revoked_at.clone(),
        ]);
    }
    t
}

impl Admin {
    pub async fn create_admin_token(
        &mut self,
        request: v1::CreateAdminTokenRequest,
    ) -> anyhow::Result<v1::CreateAdminTokenResponse> {
        let request = self.request(request);
        let answer = self.client.create_admin_token(request).await;
        self.answer(answer)
    }

    pub async fn list_admin_tokens(
        &mut self,
        include_revoked: bool,
    ) -> anyhow::Result<Vec<v1::AdminToken>> {
        let request = self.request(v1::ListAdminTokensRequest { include_revoked });
        let answer = self.client.list_admin_tokens(request).await;
        self.answer(answer).map(|r| r.tokens)
    }

    pub async fn revoke_admin_token(&mut self, id: String) -> anyhow::Result<v1::AdminToken> {
        let request = self.request(v1::RevokeAdminTokenRequest { id });
        let answer = self.client.revoke_admin_token(request).await;
        self.answer(answer)
    }
}

pub async fn run(
    admin: &mut Admin,
    command: AdminTokenCommand,
    output: Output,
) -> anyhow::Result<()> {
    match command {
        AdminTokenCommand::List { all } => {
            let tokens: Vec<AdminTokenView> = admin
                .list_admin_tokens(all)
                .await?
                .into_iter()
                .map(Into::into)
                .collect();
            show(output, &tokens, || {
                format!("{}\n", admin_tokens_table(&tokens))
            })
        }
        AdminTokenCommand::Create {
            name,
            role,
            expires_in,
            scope,
        } => {
            let created = admin
                .create_admin_token(v1::CreateAdminTokenRequest {
                    name,
                    role,
                    expires_in_seconds: expires_in.as_secs(),
                    scope: scope.into_iter().collect(),
                })
                .await?;
            let mut token = AdminTokenView::from(created.token.unwrap_or_default());
            token.secret = Some(created.secret.clone());
            show(output, &token, || {
                format!(
                    "{}\nSecret (shown once; pass it with --token or POSFLEET_TOKEN):\n{}\n",
                    admin_tokens_table(std::slice::from_ref(&token)),
                    created.secret
                )
            })
        }
        AdminTokenCommand::Revoke { id } => {
            let token = AdminTokenView::from(admin.revoke_admin_token(id).await?);
            show(output, &token, || {
                format!(
                    "Revoked:\n{}\n",
                    admin_tokens_table(std::slice::from_ref(&token))
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_commands_parse() {
        crate::check_command_lines(
            &[
                "posfleet token list",
                "posfleet token list --all",
                "posfleet token create --name ci-release --role publisher --expires-in 90d",
                "posfleet token create --name eu-ops --role store-ops --expires-in 30d --scope region=eu --scope tier=a",
                "posfleet token revoke adm-abc123",
            ],
            &[
                "posfleet token create",
                "posfleet token create --name ci --role publisher",
                "posfleet token create --name ci --role publisher --expires-in soon",
                "posfleet token create --name ci --role viewer --expires-in 1d --scope region",
                "posfleet token revoke",
            ],
        );
    }
}
