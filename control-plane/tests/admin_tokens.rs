//! Admin API tokens: created, listed and revoked through the API, refused
//! the moment they are revoked (on every replica), every change audited.
//! On SQLite and (with --ignored) PostgreSQL.

mod common;

use common::{Backend, TestServer, assert_status, setup};
use posfleet_proto::v1;
use tonic::Code;

async fn create(admin: &mut common::Admin, name: &str) -> v1::CreateAdminTokenResponse {
    let req = admin.req(common::token_request(name, "admin"));
    admin
        .client
        .create_admin_token(req)
        .await
        .unwrap()
        .into_inner()
}

async fn list(admin: &mut common::Admin, include_revoked: bool) -> Vec<v1::AdminToken> {
    let req = admin.req(v1::ListAdminTokensRequest { include_revoked });
    admin
        .client
        .list_admin_tokens(req)
        .await
        .unwrap()
        .into_inner()
        .tokens
}

async fn revoke(
    admin: &mut common::Admin,
    id: &str,
) -> Result<tonic::Response<v1::AdminToken>, tonic::Status> {
    let req = admin.req(v1::RevokeAdminTokenRequest { id: id.into() });
    admin.client.revoke_admin_token(req).await
}

/// A call any token may make.
async fn list_stores(admin: &mut common::Admin) -> Result<(), tonic::Status> {
    let req = admin.req(v1::ListStoresRequest::default());
    admin.client.list_stores(req).await.map(|_| ())
}

fn names(tokens: &[v1::AdminToken]) -> Vec<&str> {
    tokens.iter().map(|t| t.name.as_str()).collect()
}

/// A leaked token is revoked on one replica; the other, which served it a
/// moment ago, refuses its very next call.
async fn a_revoked_admin_token_is_refused_at_once_on_every_replica(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    // A second replica on the same database (and data dir).
    let replica = TestServer::start(s.server.config.clone()).await;
    let mut admin = s.server.admin().await;
    let created = create(&mut admin, "ci-deploy").await;
    let token = created.token.unwrap();
    assert!(created.secret.starts_with("pfa_"), "{}", created.secret);
    let mut leaked = replica.admin().await;
    leaked.token = Some(created.secret.clone());
    list_stores(&mut leaked).await.unwrap();
    let revoked = revoke(&mut admin, &token.id).await.unwrap().into_inner();
    assert!(revoked.revoked_at_unix_ms > 0);
    assert_status(
        list_stores(&mut leaked).await,
        Code::Unauthenticated,
        "not valid",
    );
    let mut on_first = s.server.admin().await;
    on_first.token = Some(created.secret.clone());
    assert_status(
        list_stores(&mut on_first).await,
        Code::Unauthenticated,
        "not valid",
    );
    // Listed as revoked only when asked.
    assert!(list(&mut admin, false).await.is_empty());
    let all = list(&mut admin, true).await;
    assert_eq!(names(&all), ["ci-deploy"]);
    assert_eq!(all[0].revoked_at_unix_ms, revoked.revoked_at_unix_ms);
    assert_eq!(all[0].created_by, "admin");
    // Audited, by name, without the secret.
    let req = admin.req(v1::ListAuditEntriesRequest {
        after_seq: 0,
        limit: 0,
        ..Default::default()
    });
    let log = admin
        .client
        .list_audit_entries(req)
        .await
        .unwrap()
        .into_inner()
        .entries;
    // Past the first admin's setup (SessionService rows).
    let log: Vec<v1::AuditEntry> = log
        .into_iter()
        .filter(|e| e.actor_kind != "session")
        .collect();
    let summary: Vec<(&str, &str, &str)> = log
        .iter()
        .map(|e| (e.actor.as_str(), e.method.as_str(), e.result.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("admin", "CreateAdminToken", "OK"),
            ("admin", "RevokeAdminToken", "OK"),
        ]
    );
    assert!(
        log.iter()
            .all(|e| e.actor_kind == "user" && e.role == "admin")
    );
    let target: serde_json::Value = serde_json::from_str(&log[1].target_json).unwrap();
    assert_eq!(target["admin_token_id"], token.id.as_str());
    let target: serde_json::Value = serde_json::from_str(&log[0].target_json).unwrap();
    assert_eq!(target["admin_token_id"], token.id.as_str());
    assert_eq!(target["name"], "ci-deploy");
    assert!(log.iter().all(|e| !e.target_json.contains(&created.secret)));
    replica.stop().await;
    s.finish().await;
}

/// Revoking needs a valid token: a stranger's attempt is refused (and
/// recorded), and the token stays live.
async fn revoking_an_admin_token_needs_an_authenticated_caller(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let token = create(&mut admin, "alice").await.token.unwrap();
    let mut stranger = s.server.admin().await;
    for bogus in [None, Some("pfa_not-a-token".to_string())] {
        stranger.token = bogus;
        assert_status(
            revoke(&mut stranger, &token.id).await,
            Code::Unauthenticated,
            "token",
        );
    }
    assert_eq!(names(&list(&mut admin, false).await), ["alice"]);
    s.finish().await;
}

/// A token may revoke itself (retiring a credential needs no second one);
/// so may the last admin token go, as operators are users (the last
/// enabled admin user is what cannot be disabled: `users.rs`). Names are
/// unique and never reused.
async fn a_token_may_revoke_itself_even_the_last_one(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let created = create(&mut admin, "alice").await;
    let alice_id = created.token.unwrap().id;
    let mut alice = s.server.admin().await;
    alice.token = Some(created.secret);
    let revoked = revoke(&mut alice, &alice_id).await.unwrap().into_inner();
    assert_eq!(revoked.name, "alice");
    assert_status(list_stores(&mut alice).await, Code::Unauthenticated, "");
    // The admin's session calls on.
    list_stores(&mut admin).await.unwrap();
    // Revoking again changes nothing; unknown ids are not found.
    let again = revoke(&mut admin, &alice_id).await.unwrap().into_inner();
    assert_eq!(again.revoked_at_unix_ms, revoked.revoked_at_unix_ms);
    assert_status(revoke(&mut admin, "adm-nope").await, Code::NotFound, "");
    // A name is never reused, even once revoked.
    let req = admin.req(common::token_request("alice", "admin"));
    assert_status(
        admin.client.create_admin_token(req).await,
        Code::AlreadyExists,
        "alice",
    );
    let req = admin.req(common::token_request("Not A Slug", "admin"));
    assert_status(
        admin.client.create_admin_token(req).await,
        Code::InvalidArgument,
        "name",
    );
    s.finish().await;
}

on_both_backends!(
    a_revoked_admin_token_is_refused_at_once_on_every_replica,
    revoking_an_admin_token_needs_an_authenticated_caller,
    a_token_may_revoke_itself_even_the_last_one,
);
