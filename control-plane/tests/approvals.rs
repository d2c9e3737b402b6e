//! Four-eyes approval of rollouts over real gRPC, on SQLite and (with
//! --ignored) PostgreSQL: a rollout selecting more devices than
//! approval_threshold_devices, or an emergency one, starts only once a
//! second deployer or admin approved it.

mod common;

use common::{Admin, Backend, Setup, assert_status, one_wave_rollout, setup, token_request};
use posfleet_bundle::manifest::Kind;
use posfleet_proto::v1;
use tonic::Code;

const APP: &str = "pos-app";
/// The threshold of these tests: more than 3 devices need an approval.
const THRESHOLD: u64 = 3;

/// A control plane with approval_threshold_devices 3, pos-app 1.1.0
/// published, and `tills` devices enrolled in each of `stores`.
async fn fleet(backend: Backend, stores: &[(&str, usize)]) -> (Setup, Admin) {
    let s = setup(backend, |c| c.approval_threshold_devices = THRESHOLD).await;
    let mut admin = s.server.admin().await;
    let key = admin.init_repository().await;
    admin
        .publish(&key, APP, "1.1.0", Kind::Software, &["pos-x1"])
        .await;
    for &(store, tills) in stores {
        admin.store(store).await;
        for _ in 0..tills {
            s.enrolled_device(store).await;
        }
    }
    (s, admin)
}

/// A one-wave rollout of pos-app 1.1.0 to `stores` (every store if empty).
fn rollout(stores: &[&str], emergency: bool) -> v1::CreateRolloutRequest {
    let selector = v1::RolloutSelector {
        store_ids: stores.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let mut req = one_wave_rollout("1.1.0", selector);
    if let Some(strategy) = &mut req.strategy {
        strategy.emergency = emergency;
    }
    req
}

async fn create(admin: &mut Admin, req: v1::CreateRolloutRequest) -> v1::Rollout {
    let req = admin.req(req);
    admin.client.create_rollout(req).await.unwrap().into_inner()
}

fn id(id: &str) -> v1::RolloutRequest {
    v1::RolloutRequest {
        id: id.into(),
        reason: String::new(),
    }
}

async fn start(admin: &mut Admin, rollout: &str) -> Result<v1::Rollout, tonic::Status> {
    let req = admin.req(id(rollout));
    admin
        .client
        .start_rollout(req)
        .await
        .map(|r| r.into_inner())
}

async fn approve(admin: &mut Admin, rollout: &str) -> Result<v1::Rollout, tonic::Status> {
    let req = admin.req(id(rollout));
    admin
        .client
        .approve_rollout(req)
        .await
        .map(|r| r.into_inner())
}

async fn get(admin: &mut Admin, rollout: &str) -> v1::Rollout {
    let req = admin.req(id(rollout));
    admin
        .client
        .get_rollout(req)
        .await
        .unwrap()
        .into_inner()
        .rollout
        .unwrap()
}

fn running(rollout: &v1::Rollout) -> bool {
    rollout.state == v1::RolloutState::Running as i32
}

async fn a_big_rollout_starts_once_another_deployer_approved_it(backend: Backend) {
    let (s, mut admin) = fleet(backend, &[("s1", 4)]).await;
    let (mut alice, _) = admin.with_new_user("alice", "deployer", &[]).await;
    let (mut bob, _) = admin.with_new_user("bob", "deployer", &[]).await;
    let mut viewer = admin
        .with_new_token(token_request("help-desk", "viewer"))
        .await;
    let mut ci = admin
        .with_new_token(token_request("ci-release", "publisher"))
        .await;

    let created = create(&mut alice, rollout(&[], false)).await;
    assert!(created.approval_required);
    assert_eq!(created.selected_devices, 4);
    assert_eq!(created.approval_threshold_devices, THRESHOLD);
    assert_status(
        start(&mut alice, &created.id).await,
        Code::FailedPrecondition,
        &format!(
            "another person with the deployer or admin role must run `posfleet rollout approve {}`",
            created.id
        ),
    );
    assert_status(
        start(&mut alice, &created.id).await,
        Code::FailedPrecondition,
        "4 devices, more than approval_threshold_devices 3",
    );
    assert_status(
        approve(&mut alice, &created.id).await,
        Code::PermissionDenied,
        &format!("user alice created rollout {}", created.id),
    );
    for refused in [&mut viewer, &mut ci] {
        assert_status(
            approve(refused, &created.id).await,
            Code::PermissionDenied,
            "ApproveRollout needs deploy",
        );
    }
    assert_eq!(get(&mut admin, &created.id).await.approved_by, "");

    let approved = approve(&mut bob, &created.id).await.unwrap();
    assert_eq!(approved.approved_by, "bob");
    assert!(approved.approved_at_unix_ms > 0);
    assert_eq!(approved.state, v1::RolloutState::Draft as i32);
    assert_status(
        approve(&mut admin, &created.id).await,
        Code::FailedPrecondition,
        "is already approved (by bob)",
    );
    assert!(running(&start(&mut alice, &created.id).await.unwrap()));
    assert_status(
        approve(&mut bob, &created.id).await,
        Code::FailedPrecondition,
        "only a draft is approved",
    );

    // The approval is an event (webhooks see it) and, like the refusals,
    // in the audit log.
    let approvals: Vec<serde_json::Value> = admin
        .rollout_events(&created.id)
        .await
        .iter()
        .filter(|e| e.kind == "rollout.approved")
        .map(|e| serde_json::from_str(&e.data_json).unwrap())
        .collect();
    assert_eq!(approvals.len(), 1);
    assert_eq!(approvals[0]["by"], "bob");
    assert_eq!(approvals[0]["created_by"], "alice");
    assert_eq!(approvals[0]["devices"], 4);
    let audit = admin.audit_entries().await;
    let calls: Vec<(&str, &str)> = audit
        .iter()
        .filter(|e| e.method == "ApproveRollout")
        .map(|e| (e.actor.as_str(), e.result.as_str()))
        .collect();
    assert_eq!(
        calls,
        [
            ("alice", "PERMISSION_DENIED"),
            ("help-desk", "PERMISSION_DENIED"),
            ("ci-release", "PERMISSION_DENIED"),
            ("bob", "OK"),
            ("admin", "FAILED_PRECONDITION"),
            ("bob", "FAILED_PRECONDITION"),
        ]
    );
    s.finish().await;
}

async fn a_small_rollout_needs_no_approval_and_an_emergency_one_does(backend: Backend) {
    let (s, mut admin) = fleet(backend, &[("s1", 1), ("s2", 1)]).await;
    let (mut alice, _) = admin.with_new_user("alice", "deployer", &[]).await;

    let small = create(&mut alice, rollout(&["s1"], false)).await;
    assert!(!small.approval_required);
    assert_status(
        approve(&mut admin, &small.id).await,
        Code::FailedPrecondition,
        "needs no approval: it selects 1 devices (the threshold is 3)",
    );
    assert!(running(&start(&mut alice, &small.id).await.unwrap()));

    let emergency = create(&mut alice, rollout(&["s2"], true)).await;
    assert!(emergency.approval_required);
    assert_status(
        start(&mut alice, &emergency.id).await,
        Code::FailedPrecondition,
        "needs approval before it starts (it is an emergency rollout)",
    );
    assert_eq!(
        approve(&mut admin, &emergency.id)
            .await
            .unwrap()
            .approved_by,
        "admin"
    );
    assert!(running(&start(&mut alice, &emergency.id).await.unwrap()));
    s.finish().await;
}

async fn a_selection_grown_past_the_threshold_after_creation_needs_approval(backend: Backend) {
    let (s, mut admin) = fleet(backend, &[("s1", 3)]).await;
    let (mut alice, _) = admin.with_new_user("alice", "deployer", &[]).await;
    let created = create(&mut alice, rollout(&[], false)).await;
    assert!(!created.approval_required);
    assert_eq!(created.selected_devices, 3);

    s.enrolled_device("s1").await;
    assert_status(
        start(&mut alice, &created.id).await,
        Code::FailedPrecondition,
        "4 devices, more than approval_threshold_devices 3",
    );
    let now = get(&mut alice, &created.id).await;
    assert!(now.approval_required);
    assert_eq!(now.selected_devices, 4);
    approve(&mut admin, &created.id).await.unwrap();
    assert!(running(&start(&mut alice, &created.id).await.unwrap()));
    s.finish().await;
}

/// Four eyes are two people: a user and a token of theirs are one. The
/// rollout a user's session creates is not approved by their token, nor
/// the other way round; another person approves either.
async fn a_user_and_their_own_token_are_one_person(backend: Backend) {
    let (s, mut admin) = fleet(backend, &[("s1", 4), ("s2", 4)]).await;
    let (mut maria, _) = admin.with_new_user("maria", "admin", &[]).await;
    let mut maria_bot = maria
        .with_new_token(token_request("maria-bot", "deployer"))
        .await;
    let by_session = create(&mut maria, rollout(&["s1"], false)).await;
    assert!(by_session.approval_required);
    assert_status(
        approve(&mut maria_bot, &by_session.id).await,
        Code::PermissionDenied,
        &format!(
            "token maria-bot belongs to the person who created rollout {} (as maria); another \
             person",
            by_session.id
        ),
    );
    let by_token = create(&mut maria_bot, rollout(&["s2"], false)).await;
    assert_status(
        approve(&mut maria, &by_token.id).await,
        Code::PermissionDenied,
        &format!(
            "user maria belongs to the person who created rollout {} (as maria-bot)",
            by_token.id
        ),
    );
    for id in [&by_session.id, &by_token.id] {
        assert_eq!(approve(&mut admin, id).await.unwrap().approved_by, "admin");
    }
    s.finish().await;
}

on_both_backends!(
    a_user_and_their_own_token_are_one_person,
    a_big_rollout_starts_once_another_deployer_approved_it,
    a_small_rollout_needs_no_approval_and_an_emergency_one_does,
    a_selection_grown_past_the_threshold_after_creation_needs_approval,
);
