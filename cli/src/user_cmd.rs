//! `posfleet user create|list|disable|enable|reset|unlock`: operators as
//! people, who log in with a password and a TOTP code (`posfleet login`).
//! Admin only.

use clap::Subcommand;
use posfleet_proto::v1;
use serde::Serialize;

use crate::view::{table, time};
use crate::{Admin, Output, show};

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; prints their one-time setup code, once. They log in
    /// with it (`posfleet login --user NAME`), choose a password and enrol
    /// an authenticator app.
    Create {
        /// 1 to 64 lowercase letters, digits, '-', '_' or '.', e.g. `alice`.
        /// The audit log names their calls by it.
        name: String,
        /// What they may do: viewer, publisher, deployer, store-ops or admin
        /// (see the README's "Operators and roles").
        #[arg(long)]
        role: String,
        /// Confine them to the stores carrying this label, `key=value`
        /// (repeat for several; a store needs all). Viewer, deployer and
        /// store-ops only.
        #[arg(long = "scope", value_parser = crate::parse_label)]
        scope: Vec<(String, String)>,
    },
    /// Users: role, scope, status, lockout, last login, recovery codes left.
    List {
        /// Disabled users too.
        #[arg(long)]
        all: bool,
    },
    /// Refuse a user's logins, and their live sessions and their tokens from
    /// their next call.
    Disable { name: String },
    /// Let a disabled user log in again.
    Enable { name: String },
    /// Forget a user's password, authenticator and recovery codes and end
    /// their sessions; prints a new setup code (a lost phone, a forgotten
    /// password).
    Reset { name: String },
    /// Lift the lockout that failed logins put on a user.
    Unlock { name: String },
    /// Change a user's role or scope: it applies from their next call. A
    /// user who is no longer an admin loses the tokens they made.
    Update {
        name: String,
        /// The new role: viewer, publisher, deployer, store-ops or admin.
        #[arg(long)]
        role: Option<String>,
        /// Confine them to the stores carrying this label, `key=value`
        /// (repeat for several), instead of their current scope.
        #[arg(long = "scope", value_parser = crate::parse_label, conflicts_with = "unscoped")]
        scope: Vec<(String, String)>,
        /// Confine them to no stores any more.
        #[arg(long)]
        unscoped: bool,
    },
}

#[derive(Debug, Serialize)]
pub struct UserView {
    pub name: String,
    pub role: String,
    /// Store labels they are confined to (`region=eu`); empty when unscoped.
    pub scope: String,
    /// `enabled` or `disabled`.
    pub status: String,
    /// Still to choose a password and enrol an authenticator.
    pub setup_pending: bool,
    /// Empty when not locked.
    pub locked_until: String,
    /// Empty before the first login.
    pub last_login: String,
    pub recovery_codes_left: u32,
    pub created_by: String,
    pub created_at: String,
    /// Empty when enabled.
    pub disabled_at: String,
    /// Only when just created or reset: the one-time setup code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_code_expires_at: Option<String>,
}

impl UserView {
    fn new(u: v1::User, now_unix_ms: i64) -> UserView {
        // The server keeps the end of a lockout that has passed; it no
        // longer refuses anything.
        let locked_until = if u.locked_until_unix_ms > now_unix_ms {
            time(u.locked_until_unix_ms)
        } else {
            String::new()
        };
        UserView {
            name: u.name,
            role: u.role,
            scope: crate::view::scope(&u.scope),
            status: if u.disabled_at_unix_ms == 0 {
                "enabled".into()
            } else {
                "disabled".into()
            },
            setup_pending: u.setup_pending,
            locked_until,
            last_login: time(u.last_login_unix_ms),
            recovery_codes_left: u.recovery_codes_left,
            created_by: u.created_by,
            created_at: time(u.created_at_unix_ms),
            disabled_at: time(u.disabled_at_unix_ms),
            setup_code: None,
            setup_code_expires_at: None,
        }
    }
}

fn now_unix_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn users_table(users: &[UserView]) -> comfy_table::Table {
    let mut t = table(&[
        "USER",
        "ROLE",
        "SCOPE",
        "STATUS",
        "SETUP",
        "LOCKED UNTIL",
        "LAST LOGIN",
        "RECOVERY CODES",
        "CREATED BY",
    ]);
    for u in users {
        t.add_row(vec![
            u.name.clone(),
            u.role.clone(),
            u.scope.clone(),
            u.status.clone(),
            if u.setup_pending { "pending" } else { "done" }.into(),
            u.locked_until.clone(),
            u.last_login.clone(),
            if u.setup_pending {
                String::new()
            } else {
                u.recovery_codes_left.to_string()
            },
            u.created_by.clone(),
        ]);
    }
    t
}

impl Admin {
    pub async fn create_user(
        &mut self,
        request: v1::CreateUserRequest,
    ) -> anyhow::Result<v1::CreateUserResponse> {
        let request = self.request(request);
        let answer = self.client.create_user(request).await;
        self.answer(answer)
    }

    pub async fn list_users(&mut self, include_disabled: bool) -> anyhow::Result<Vec<v1::User>> {
        let request = self.request(v1::ListUsersRequest { include_disabled });
        let answer = self.client.list_users(request).await;
        self.answer(answer).map(|r| r.users)
    }

    /// disable, enable, reset or unlock. `reset` answers with a setup code.
    async fn user_operation(
        &mut self,
        operation: &str,
        name: String,
    ) -> anyhow::Result<v1::CreateUserResponse> {
        let request = self.request(v1::UserRequest { name });
        let user = match operation {
            "disable" => self.client.disable_user(request).await,
            "enable" => self.client.enable_user(request).await,
            "unlock" => self.client.unlock_user(request).await,
            "reset" => {
                let answer = self.client.reset_user(request).await;
                return self.answer(answer);
            }
            other => anyhow::bail!("unknown user operation {other}"),
        };
        self.answer(user).map(|user| v1::CreateUserResponse {
            user: Some(user),
            ..Default::default()
        })
    }
}

/// A user just created or reset, with their setup code and what to do
/// with it.
fn show_setup_code(
    output: Output,
    admin: &Admin,
    created: v1::CreateUserResponse,
    what: &str,
) -> anyhow::Result<()> {
    let mut user = UserView::new(created.user.unwrap_or_default(), now_unix_ms());
    let expires = time(created.setup_code_expires_at_unix_ms);
    user.setup_code = Some(created.setup_code.clone());
    user.setup_code_expires_at = Some(expires.clone());
    show(output, &user, || {
        format!(
            "{table}\n{what} for {name} (shown once; valid until {expires}):\n{code}\n\
             Give it to {name} by a way other than the one they will log in on; \
             they run posfleet login --user {name} --server {server}, enter it \
             instead of a password, choose a password and enrol an authenticator app.\n",
            table = users_table(std::slice::from_ref(&user)),
            name = user.name,
            code = created.setup_code,
            server = admin.server_url(),
        )
    })
}

pub async fn run(admin: &mut Admin, command: UserCommand, output: Output) -> anyhow::Result<()> {
    match command {
        UserCommand::Create { name, role, scope } => {
            let created = admin
                .create_user(v1::CreateUserRequest {
                    name,
                    role,
                    scope: scope.into_iter().collect(),
                })
                .await?;
            show_setup_code(output, admin, created, "Setup code")
        }
        UserCommand::List { all } => {
            let now = now_unix_ms();
            let users: Vec<UserView> = admin
                .list_users(all)
                .await?
                .into_iter()
                .map(|u| UserView::new(u, now))
                .collect();
            show(output, &users, || format!("{}\n", users_table(&users)))
        }
        UserCommand::Reset { name } => {
            let reset = admin.user_operation("reset", name).await?;
            show_setup_code(
                output,
                admin,
                reset,
                "Password, authenticator and recovery codes forgotten, sessions ended. New setup code",
            )
        }
        UserCommand::Disable { name } => {
            one_user(
                admin,
                "disable",
                name,
                output,
                "Disabled (its sessions are refused from their next call)",
            )
            .await
        }
        UserCommand::Enable { name } => one_user(admin, "enable", name, output, "Enabled").await,
        UserCommand::Update {
            name,
            role,
            scope,
            unscoped,
        } => {
            if role.is_none() && scope.is_empty() && !unscoped {
                anyhow::bail!("nothing to change: give --role, --scope or --unscoped");
            }
            let request = admin.request(v1::UpdateUserRequest {
                name,
                role: role.unwrap_or_default(),
                scope: scope.into_iter().collect(),
                clear_scope: unscoped,
            });
            let answer = admin.client.update_user(request).await;
            let user = UserView::new(admin.answer(answer)?, now_unix_ms());
            show(output, &user, || {
                format!(
                    "Updated (from their next call):\n{}\n",
                    users_table(std::slice::from_ref(&user))
                )
            })
        }
        UserCommand::Unlock { name } => one_user(admin, "unlock", name, output, "Unlocked").await,
    }
}

async fn one_user(
    admin: &mut Admin,
    operation: &str,
    name: String,
    output: Output,
    done: &str,
) -> anyhow::Result<()> {
    let answer = admin.user_operation(operation, name).await?;
    let user = UserView::new(answer.user.unwrap_or_default(), now_unix_ms());
    show(output, &user, || {
        format!("{done}:\n{}\n", users_table(std::slice::from_ref(&user)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commands_parse() {
        crate::check_command_lines(
            &[
                "posfleet user create alice --role deployer",
                "posfleet user create bob --role store-ops --scope region=eu --scope tier=a",
                "posfleet user list",
                "posfleet user list --all",
                "posfleet user disable alice",
                "posfleet user enable alice",
                "posfleet user reset alice",
                "posfleet user unlock alice",
                "posfleet user update alice --role admin",
                "posfleet user update bob --scope region=us",
                "posfleet user update bob --role viewer --unscoped",
                "posfleet audit list --user alice",
            ],
            &[
                "posfleet user create alice",
                "posfleet user create --role viewer",
                "posfleet user create alice --role viewer --scope region",
                "posfleet user disable",
                "posfleet user reset",
                "posfleet user update bob --scope region=us --unscoped",
                "posfleet audit list --user",
            ],
        );
    }

    #[test]
    fn a_lockout_that_has_passed_is_not_shown() {
        let user = |locked_until_unix_ms| v1::User {
            name: "alice".into(),
            locked_until_unix_ms,
            disabled_at_unix_ms: 5,
            ..Default::default()
        };
        assert_eq!(UserView::new(user(1_000), 2_000).locked_until, "");
        assert_eq!(
            UserView::new(user(1_764_000_000_000), 2_000).locked_until,
            "2025-11-24T16:00:00Z"
        );
        assert_eq!(UserView::new(user(0), 2_000).status, "disabled");
    }
}
