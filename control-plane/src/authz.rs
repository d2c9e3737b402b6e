//! Who may call what: roles, the permission every AdminService method
//! needs ([`METHODS`], the one table), and store scopes.
//!
//! A caller ([`Principal`]) holds one [`Role`]; a role grants a set of
//! [`Permission`]s; each method needs exactly one. The audit layer checks
//! this right after authenticating the caller, before the request's body is
//! read, so a call beyond the caller's role never reaches its handler.
//!
//! A principal may be confined to the stores carrying some labels (its
//! [`Scope`]). What a method does with a scope is also in the table
//! ([`Scoping`]): a method over the whole fleet refuses scoped callers in
//! the layer, one without store data ignores the scope, and the handlers of
//! the others filter what they show and refuse targets outside the scope.

use std::collections::BTreeMap;
use std::fmt;

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Permission {
    /// Stores, devices, rollouts, events, enrollment token ids, the CAs'
    /// public certificates.
    Read,
    /// The bundle repository's signed metadata and the published bundles.
    ReadRepository,
    /// Publishing bundles.
    Publish,
    /// Rollouts and bundle assignments.
    Deploy,
    /// Device actions (labels, revocation, logs), maintenance windows and
    /// enrollment tokens.
    StoreOps,
    /// Tokens, webhooks, the audit log, repository keys, the CA, stores and
    /// their labels.
    Admin,
}

impl Permission {
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::ReadRepository => "read-repository",
            Permission::Publish => "publish",
            Permission::Deploy => "deploy",
            Permission::StoreOps => "store-ops",
            Permission::Admin => "admin",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a caller may do: one role per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Publisher,
    Deployer,
    StoreOps,
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Viewer,
        Role::Publisher,
        Role::Deployer,
        Role::StoreOps,
        Role::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Publisher => "publisher",
            Role::Deployer => "deployer",
            Role::StoreOps => "store-ops",
            Role::Admin => "admin",
        }
    }

    /// `viewer` → `Role::Viewer`; `None` for an unknown name.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// The permissions this role grants. A publisher reads the repository
    /// (it signs new targets metadata over the current one) and nothing
    /// else; deployers and store-ops read what a viewer reads.
    pub fn permissions(self) -> &'static [Permission] {
        use Permission::*;
        match self {
            Role::Viewer => &[Read, ReadRepository],
            Role::Publisher => &[ReadRepository, Publish],
            Role::Deployer => &[Read, ReadRepository, Deploy],
            Role::StoreOps => &[Read, ReadRepository, StoreOps],
            Role::Admin => &[Read, ReadRepository, Publish, Deploy, StoreOps, Admin],
        }
    }

    pub fn grants(self, permission: Permission) -> bool {
        self.permissions().contains(&permission)
    }

    /// Whether a token of this role may be confined to stores: not a
    /// publisher (bundles are fleet-wide) nor an admin (who could lift its
    /// own scope).
    pub fn may_be_scoped(self) -> bool {
        matches!(self, Role::Viewer | Role::Deployer | Role::StoreOps)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a method does with a scoped caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoping {
    /// It holds no store's data (the repository, bundles, the CAs): the
    /// scope does not matter.
    Fleet,
    /// Its handler shows only stores in scope (and their devices,
    /// rollouts, tokens) and refuses targets outside it.
    Stores,
    /// It covers the whole fleet and cannot be narrowed: refused to scoped
    /// callers.
    Refused,
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct MethodRule {
    pub method: &'static str,
    pub needs: Permission,
    pub scoping: Scoping,
}

const fn rule(method: &'static str, needs: Permission, scoping: Scoping) -> MethodRule {
    MethodRule {
        method,
        needs,
        scoping,
    }
}

/// Every AdminService method, the permission it needs and what it does
/// with a scope. A method missing here is refused to everyone, and a test
/// fails for it.
pub const METHODS: &[MethodRule] = {
    use Permission::*;
    use Scoping::*;
    &[
        rule("CreateStore", Admin, Refused),
        rule("ListStores", Read, Stores),
        rule("GetStore", Read, Stores),
        rule("SetStoreLabels", Admin, Refused),
        rule("SetMaintenanceWindow", StoreOps, Stores),
        rule("CreateEnrollmentToken", StoreOps, Stores),
        rule("ListEnrollmentTokens", Read, Stores),
        rule("RevokeEnrollmentToken", StoreOps, Stores),
        rule("ListDevices", Read, Stores),
        rule("GetDevice", Read, Stores),
        rule("SetDeviceLabels", StoreOps, Stores),
        rule("RevokeDevice", StoreOps, Stores),
        rule("RequestDeviceLogs", StoreOps, Stores),
        rule("GetDeviceLogs", StoreOps, Stores),
        // An emergency one is held for a second person's approval.
        rule("AssignBundle", Deploy, Stores),
        rule("ListHeldAssignments", Read, Stores),
        // Not by the person who asked for it (checked by the call).
        rule("ApproveAssignment", Deploy, Stores),
        rule("CancelAssignment", Deploy, Stores),
        rule("GetRepository", ReadRepository, Fleet),
        rule("ListBundles", ReadRepository, Fleet),
        // The published bytes, to make deltas from (what a till may fetch).
        rule("DownloadBundle", Publish, Fleet),
        rule("PublishBundle", Publish, Fleet),
        rule("InitRepository", Admin, Refused),
        rule("UpdateRoot", Admin, Refused),
        rule("CreateRollout", Deploy, Stores),
        rule("StartRollout", Deploy, Stores),
        // Not by the rollout's creator (checked by the call).
        rule("ApproveRollout", Deploy, Stores),
        rule("PauseRollout", Deploy, Stores),
        rule("ResumeRollout", Deploy, Stores),
        rule("AbortRollout", Deploy, Stores),
        rule("RollbackRollout", Deploy, Stores),
        rule("ListRollouts", Read, Stores),
        rule("GetRollout", Read, Stores),
        // Only one rollout's, for a scoped caller.
        rule("ListEvents", Read, Stores),
        // Its targets quote webhook URLs, which may hold credentials.
        rule("ListAuditEntries", Admin, Refused),
        rule("AddWebhook", Admin, Refused),
        rule("ListWebhooks", Admin, Refused),
        rule("RemoveWebhook", Admin, Refused),
        rule("ListWebhookDeliveries", Admin, Refused),
        rule("CreateAdminToken", Admin, Refused),
        rule("ListAdminTokens", Admin, Refused),
        rule("RevokeAdminToken", Admin, Refused),
        rule("CreateUser", Admin, Refused),
        rule("ListUsers", Admin, Refused),
        rule("DisableUser", Admin, Refused),
        rule("UpdateUser", Admin, Refused),
        rule("EnableUser", Admin, Refused),
        rule("ResetUser", Admin, Refused),
        rule("UnlockUser", Admin, Refused),
        rule("GetCertificateAuthorities", Read, Fleet),
        rule("RotateCertificateAuthority", Admin, Refused),
        rule("RetireCertificateAuthority", Admin, Refused),
    ]
};

/// The table's row for `method`.
pub fn rule_of(method: &str) -> Option<&'static MethodRule> {
    METHODS.iter().find(|r| r.method == method)
}

/// Store labels a caller is confined to: it sees and acts on the stores
/// carrying every one of them. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    labels: BTreeMap<String, String>,
}

impl Scope {
    /// `None` for no labels (unscoped).
    pub fn new(labels: BTreeMap<String, String>) -> Option<Scope> {
        (!labels.is_empty()).then_some(Scope { labels })
    }

    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// Whether a store with these labels is in scope.
    pub fn covers(&self, store_labels: &BTreeMap<String, String>) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| store_labels.get(k) == Some(v))
    }

    /// Whether a selector that requires these store labels can only ever
    /// select stores in scope (it requires every label of the scope).
    pub fn bounds(&self, required: &std::collections::HashMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| required.get(k) == Some(v))
    }

    /// As stored: a JSON object.
    pub fn to_json(&self) -> String {
        serde_json::Value::from(
            self.labels
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
                .collect::<serde_json::Map<_, _>>(),
        )
        .to_string()
    }

    /// From its stored form; `""` is unscoped.
    pub fn from_json(text: &str) -> Result<Option<Scope>, serde_json::Error> {
        if text.is_empty() {
            return Ok(None);
        }
        Ok(Scope::new(serde_json::from_str(text)?))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pairs: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        f.write_str(&pairs.join(","))
    }
}

/// The user an admin API token belongs to: the person whose session (or
/// whose own token) created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub id: String,
    pub name: String,
}

/// What a caller authenticated with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A user's session (from `SessionService.Login`).
    Session,
    /// An admin API token, and the user it belongs to, if any (tokens made
    /// before users existed belong to nobody).
    Token { owner: Option<Owner> },
}

/// Who makes a call: a user (through a session) or an admin API token, as
/// the audit layer authenticated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user's id (`usr-…`) or the token's (`adm-…`).
    pub id: String,
    /// The name the audit log records.
    pub name: String,
    pub role: Role,
    pub scope: Option<Scope>,
    pub credential: Credential,
}

impl Principal {
    /// `user` or `token`, as the audit log's `actor_kind` says.
    pub fn kind(&self) -> &'static str {
        match self.credential {
            Credential::Session => "user",
            Credential::Token { .. } => "token",
        }
    }

    /// The user a token belongs to; `None` for a user, or a token of
    /// nobody's.
    pub fn owner(&self) -> Option<&Owner> {
        match &self.credential {
            Credential::Session => None,
            Credential::Token { owner } => owner.as_ref(),
        }
    }

    /// The person behind the call, for rules about people (four-eyes
    /// approval): the user, the user a token belongs to, or, for a token
    /// of nobody's, the token itself. User and token ids never collide.
    pub fn person_id(&self) -> &str {
        self.owner().map_or(&self.id, |owner| &owner.id)
    }

    /// The person behind the call as the user a new token belongs to:
    /// `None` for a token of nobody's.
    pub fn person(&self) -> Option<Owner> {
        match &self.credential {
            Credential::Session => Some(Owner {
                id: self.id.clone(),
                name: self.name.clone(),
            }),
            Credential::Token { owner } => owner.clone(),
        }
    }

    /// Whether this principal may call `method`; the refusal says why, for
    /// the operator.
    pub fn may_call(&self, method: &str) -> Result<(), String> {
        let Some(rule) = rule_of(method) else {
            return Err(format!("{method} is not an AdminService method"));
        };
        let who = format!("{} {}", self.kind(), self.name);
        if !self.role.grants(rule.needs) {
            return Err(format!(
                "{who} has role {}; {method} needs {}",
                self.role, rule.needs
            ));
        }
        if let (Some(scope), Scoping::Refused) = (&self.scope, rule.scoping) {
            return Err(format!(
                "{who} is scoped to stores with {scope}; {method} covers the whole fleet"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::collections::BTreeSet;

    fn admin_service_methods() -> BTreeSet<String> {
        let set = prost_types::FileDescriptorSet::decode(posfleet_proto::FILE_DESCRIPTOR_SET)
            .expect("the embedded descriptor set is valid");
        set.file
            .into_iter()
            .flat_map(|f| f.service)
            .filter(|s| s.name() == "AdminService")
            .flat_map(|s| s.method)
            .map(|m| m.name().to_string())
            .collect()
    }

    #[test]
    fn every_admin_service_method_has_exactly_one_rule() {
        let served = admin_service_methods();
        assert!(served.len() > 30, "{served:?}");
        let missing: Vec<&String> = served.iter().filter(|m| rule_of(m).is_none()).collect();
        assert!(
            missing.is_empty(),
            "add these AdminService methods to authz::METHODS: {missing:?}"
        );
        let listed: Vec<&str> = METHODS.iter().map(|r| r.method).collect();
        let unique: BTreeSet<&str> = listed.iter().copied().collect();
        assert_eq!(unique.len(), listed.len(), "a method is listed twice");
        let stale: Vec<&&str> = unique.iter().filter(|m| !served.contains(**m)).collect();
        assert!(stale.is_empty(), "not AdminService methods: {stale:?}");
    }

    fn principal(role: Role, scope: Option<&str>) -> Principal {
        Principal {
            id: "adm-1".into(),
            name: "ci-release".into(),
            role,
            scope: scope.and_then(|s| {
                let (k, v) = s.split_once('=').unwrap();
                Scope::new(BTreeMap::from([(k.to_string(), v.to_string())]))
            }),
            credential: Credential::Token { owner: None },
        }
    }

    /// The README's permission table, from [`METHODS`].
    fn readme_table() -> String {
        use Permission::*;
        let mut text = String::from("| permission | held by | methods |\n|---|---|---|\n");
        for permission in [Read, ReadRepository, Publish, Deploy, StoreOps, Admin] {
            let roles: Vec<&str> = Role::ALL
                .iter()
                .filter(|r| r.grants(permission))
                .map(|r| r.as_str())
                .collect();
            let methods: Vec<&str> = METHODS
                .iter()
                .filter(|r| r.needs == permission)
                .map(|r| r.method)
                .collect();
            text.push_str(&format!(
                "| `{permission}` | {} | {} |\n",
                roles.join(", "),
                methods.join(", ")
            ));
        }
        let fleet: Vec<&str> = METHODS
            .iter()
            .filter(|r| r.scoping == Scoping::Fleet)
            .map(|r| r.method)
            .collect();
        text.push_str(&format!(
            "\nA scoped token sees all of what holds no store's data ({}).\n",
            fleet.join(", ")
        ));
        text
    }

    #[test]
    fn the_readme_shows_the_permission_table() {
        let readme = include_str!("../../README.md");
        let table = readme_table();
        assert!(
            readme.contains(&table),
            "README.md's \"Operators and roles\" must hold this table:\n{table}"
        );
    }

    #[test]
    fn roles_allow_what_their_job_needs() {
        use Role::*;
        for (role, method, allowed) in [
            (Publisher, "PublishBundle", true),
            (Publisher, "GetRepository", true),
            (Publisher, "ListBundles", true),
            (Publisher, "ListDevices", false),
            (Publisher, "CreateRollout", false),
            (Viewer, "ListDevices", true),
            (Viewer, "GetRollout", true),
            (Viewer, "ListAuditEntries", false),
            (Viewer, "ListWebhooks", false),
            (Viewer, "RevokeDevice", false),
            (Viewer, "PublishBundle", false),
            (Deployer, "CreateRollout", true),
            (Deployer, "RollbackRollout", true),
            (Deployer, "ApproveRollout", true),
            (Publisher, "ApproveRollout", false),
            (Viewer, "ApproveRollout", false),
            (Deployer, "AssignBundle", true),
            (Deployer, "RevokeDevice", false),
            (Deployer, "PublishBundle", false),
            (StoreOps, "RevokeDevice", true),
            (StoreOps, "CreateEnrollmentToken", true),
            (StoreOps, "GetDeviceLogs", true),
            (StoreOps, "AssignBundle", false),
            (StoreOps, "SetStoreLabels", false),
            (Admin, "CreateAdminToken", true),
            (Admin, "RotateCertificateAuthority", true),
            (Admin, "Bogus", false),
        ] {
            assert_eq!(
                principal(role, None).may_call(method).is_ok(),
                allowed,
                "{role} {method}"
            );
        }
        assert_eq!(
            principal(Publisher, None)
                .may_call("CreateRollout")
                .unwrap_err(),
            "token ci-release has role publisher; CreateRollout needs deploy"
        );
    }

    #[test]
    fn scoped_callers_are_refused_fleet_wide_methods() {
        let eu = principal(Role::Deployer, Some("region=eu"));
        assert!(eu.may_call("CreateRollout").is_ok());
        assert!(eu.may_call("ListBundles").is_ok());
        assert!(eu.may_call("ListEvents").is_ok());
        // Only admin methods are whole-fleet today; an admin is never
        // scoped, but the rule holds should one be.
        let scoped_admin = principal(Role::Admin, Some("region=eu"));
        assert_eq!(
            scoped_admin.may_call("ListAuditEntries").unwrap_err(),
            "token ci-release is scoped to stores with region=eu; ListAuditEntries covers the whole fleet"
        );
        assert!(scoped_admin.may_call("ListDevices").is_ok());
    }

    #[test]
    fn a_token_stands_for_the_person_who_owns_it() {
        let mut alice = principal(Role::Deployer, None);
        alice.id = "usr-a1".into();
        alice.name = "alice".into();
        alice.credential = Credential::Session;
        assert_eq!(alice.kind(), "user");
        assert_eq!(alice.person_id(), "usr-a1");
        assert_eq!(
            alice.may_call("ListAuditEntries").unwrap_err(),
            "user alice has role deployer; ListAuditEntries needs admin"
        );
        let mut token = principal(Role::Deployer, None);
        token.credential = Credential::Token {
            owner: alice.person(),
        };
        assert_eq!(token.kind(), "token");
        assert_eq!(token.person_id(), "usr-a1");
        assert_eq!(token.person(), alice.person());
        // A token of nobody's is a person of its own.
        let unowned = principal(Role::Deployer, None);
        assert_eq!(unowned.person_id(), "adm-1");
        assert_eq!(unowned.person(), None);
    }

    #[test]
    fn scopes_cover_stores_with_all_their_labels() {
        let scope = Scope::new(BTreeMap::from([
            ("region".to_string(), "eu".to_string()),
            ("tier".to_string(), "a".to_string()),
        ]))
        .unwrap();
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(scope.covers(&labels(&[("region", "eu"), ("tier", "a"), ("x", "y")])));
        assert!(!scope.covers(&labels(&[("region", "eu")])));
        assert!(!scope.covers(&labels(&[("region", "us"), ("tier", "a")])));
        let required = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(scope.bounds(&required(&[("region", "eu"), ("tier", "a")])));
        assert!(!scope.bounds(&required(&[("region", "eu")])));
        assert_eq!(
            Scope::from_json(&scope.to_json()).unwrap(),
            Some(scope.clone())
        );
        assert_eq!(Scope::from_json("").unwrap(), None);
        assert_eq!(scope.to_string(), "region=eu,tier=a");
        assert_eq!(Scope::new(BTreeMap::new()), None);
    }
}
