//! Four-eyes approval over real gRPC, on SQLite and (with --ignored)
//! PostgreSQL: a rollout selecting more devices than
//! approval_threshold_devices, or an emergency one, starts only once a
//! second deployer or admin approved it; an emergency assignment is held
//! until one approves it.

mod common;

use common::{
    Admin, Backend, Setup, assert_status, heartbeat, one_wave_rollout, setup, token_request,
};
use posfleet_bundle::manifest::Kind;
use posfleet_control_plane::config::Config;
use posfleet_proto::v1;
use tonic::Code;

const APP: &str = "pos-app";
/// The threshold of these tests: more than 3 devices need an approval.
const THRESHOLD: u64 = 3;

/// A control plane with approval_threshold_devices 3, pos-app 1.1.0
/// published, and `tills` devices enrolled in each of `stores`.
async fn fleet(backend: Backend, stores: &[(&str, usize)]) -> (Setup, Admin) {
    fleet_with(backend, |_| {}, stores).await
}

/// [`fleet`] with `tweak` applied to the control plane's configuration.
async fn fleet_with(
    backend: Backend,
    tweak: impl FnOnce(&mut Config),
    stores: &[(&str, usize)],
) -> (Setup, Admin) {
    let s = setup(backend, |c| {
        c.approval_threshold_devices = THRESHOLD;
        tweak(c)
    })
    .await;
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

// ----- emergency assignments -----

/// `device assign --store STORE pos-app@1.1.0 --emergency`: what it holds.
async fn emergency_to_store(admin: &mut Admin, store: &str) -> v1::HeldAssignment {
    let req = admin.req(v1::AssignBundleRequest {
        target: Some(v1::assign_bundle_request::Target::StoreId(store.into())),
        name: APP.into(),
        version: "1.1.0".into(),
        download_ahead: None,
        emergency: true,
    });
    let answer = admin.client.assign_bundle(req).await.unwrap().into_inner();
    assert_eq!(answer.devices_assigned, 0, "nothing is assigned while held");
    answer.held.expect("an emergency assignment is held")
}

async fn approve_held(admin: &mut Admin, id: &str) -> Result<v1::HeldAssignment, tonic::Status> {
    let req = admin.req(v1::HeldAssignmentRequest { id: id.into() });
    admin
        .client
        .approve_assignment(req)
        .await
        .map(|r| r.into_inner())
}

async fn cancel_held(admin: &mut Admin, id: &str) -> Result<v1::HeldAssignment, tonic::Status> {
    let req = admin.req(v1::HeldAssignmentRequest { id: id.into() });
    admin
        .client
        .cancel_assignment(req)
        .await
        .map(|r| r.into_inner())
}

/// (id, state) of what `ListHeldAssignments` shows the caller.
async fn held_list(
    admin: &mut Admin,
    include_decided: bool,
) -> Vec<(String, v1::HeldAssignmentState)> {
    let req = admin.req(v1::ListHeldAssignmentsRequest { include_decided });
    admin
        .client
        .list_held_assignments(req)
        .await
        .unwrap()
        .into_inner()
        .assignments
        .into_iter()
        .map(|a| {
            let state = a.state();
            (a.id, state)
        })
        .collect()
}

/// (name, version, emergency) of what a till's heartbeat says it should have.
async fn desired_of(s: &Setup, credential: &str) -> Vec<(String, String, bool)> {
    s.server
        .agent()
        .await
        .heartbeat(heartbeat(credential, Default::default()))
        .await
        .unwrap()
        .into_inner()
        .desired_bundles
        .into_iter()
        .map(|b| (b.name, b.version, b.emergency))
        .collect()
}

async fn an_emergency_assignment_applies_once_another_person_approved_it(backend: Backend) {
    let (s, mut admin) = fleet(backend, &[("s1", 1)]).await;
    let (_, till) = s.enrolled_device("s1").await;
    let (mut alice, _) = admin.with_new_user("alice", "deployer", &[]).await;
    let (mut bob, _) = admin.with_new_user("bob", "deployer", &[]).await;
    let mut viewer = admin
        .with_new_token(token_request("help-desk", "viewer"))
        .await;
    let mut admin_bot = admin
        .with_new_token(token_request("admin-bot", "deployer"))
        .await;

    let held = emergency_to_store(&mut alice, "s1").await;
    assert_eq!(held.state(), v1::HeldAssignmentState::AwaitingApproval);
    assert_eq!(held.requested_by, "alice");
    assert_eq!(
        held.expires_at_unix_ms - held.requested_at_unix_ms,
        24 * 3600 * 1000,
        "held for a day by default"
    );
    assert_eq!(
        (held.store_id.as_str(), held.device_id.as_str()),
        ("s1", "")
    );
    assert!(
        desired_of(&s, &till).await.is_empty(),
        "nothing assigned yet"
    );
    assert_eq!(
        held_list(&mut viewer, false).await,
        [(held.id.clone(), v1::HeldAssignmentState::AwaitingApproval)]
    );

    // Not by the person who asked, nor beyond a role.
    assert_status(
        approve_held(&mut alice, &held.id).await,
        Code::PermissionDenied,
        &format!(
            "user alice asked for emergency assignment {} of pos-app 1.1.0 to store s1; \
             another person with the deployer or admin role must approve it",
            held.id
        ),
    );
    assert_status(
        approve_held(&mut viewer, &held.id).await,
        Code::PermissionDenied,
        "ApproveAssignment needs deploy",
    );
    let by_admin = emergency_to_store(&mut admin, "s1").await;
    assert_status(
        approve_held(&mut admin_bot, &by_admin.id).await,
        Code::PermissionDenied,
        "token admin-bot belongs to the person who asked for emergency assignment",
    );
    assert_status(
        approve_held(&mut bob, "asg-nope").await,
        Code::NotFound,
        "unknown held assignment asg-nope",
    );
    assert!(
        desired_of(&s, &till).await.is_empty(),
        "refusals assign nothing"
    );

    let approved = approve_held(&mut bob, &held.id).await.unwrap();
    assert_eq!(approved.state(), v1::HeldAssignmentState::Approved);
    assert_eq!(approved.decided_by, "bob");
    assert_eq!(approved.devices_assigned, 2);
    assert_eq!(
        desired_of(&s, &till).await,
        [(APP.to_string(), "1.1.0".to_string(), true)],
        "approved, the tills are told to install at once"
    );
    assert_status(
        approve_held(&mut admin, &held.id).await,
        Code::FailedPrecondition,
        "was already approved by bob",
    );
    assert_status(
        cancel_held(&mut alice, &held.id).await,
        Code::FailedPrecondition,
        "was already approved by bob",
    );
    // Decided ones leave the list unless asked for.
    assert_eq!(
        held_list(&mut viewer, false).await,
        [(
            by_admin.id.clone(),
            v1::HeldAssignmentState::AwaitingApproval
        )]
    );
    assert_eq!(held_list(&mut viewer, true).await.len(), 2);

    // Every step is in the audit log, by person.
    let calls: Vec<(String, String)> = admin
        .audit_entries()
        .await
        .into_iter()
        .filter(|e| e.method == "ApproveAssignment")
        .map(|e| (e.actor, e.result))
        .collect();
    let expected = [
        ("alice", "PERMISSION_DENIED"),
        ("help-desk", "PERMISSION_DENIED"),
        ("admin-bot", "PERMISSION_DENIED"),
        ("bob", "NOT_FOUND"),
        ("bob", "OK"),
        ("admin", "FAILED_PRECONDITION"),
    ]
    .map(|(a, r)| (a.to_string(), r.to_string()));
    assert_eq!(calls, expected);
    s.finish().await;
}

async fn a_held_assignment_is_cancelled_or_lapses_and_is_never_applied(backend: Backend) {
    let (s, mut admin) = fleet_with(
        backend,
        |c| c.held_assignment_expiry_seconds = 2,
        &[("s1", 0)],
    )
    .await;
    let (_, till) = s.enrolled_device("s1").await;
    let (mut alice, _) = admin.with_new_user("alice", "deployer", &[]).await;
    let (mut bob, _) = admin.with_new_user("bob", "deployer", &[]).await;

    let cancelled = emergency_to_store(&mut alice, "s1").await;
    let lapsing = emergency_to_store(&mut alice, "s1").await;
    let withdrawn = cancel_held(&mut alice, &cancelled.id).await.unwrap();
    assert_eq!(withdrawn.state(), v1::HeldAssignmentState::Cancelled);
    assert_eq!(withdrawn.decided_by, "alice");
    assert_status(
        approve_held(&mut bob, &cancelled.id).await,
        Code::FailedPrecondition,
        "was cancelled by alice",
    );

    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_status(
        approve_held(&mut bob, &lapsing.id).await,
        Code::FailedPrecondition,
        "lapsed unapproved at",
    );
    assert_eq!(
        held_list(&mut bob, false).await,
        [(lapsing.id.clone(), v1::HeldAssignmentState::Lapsed)],
        "a lapsed one stays listed until cancelled"
    );
    assert_eq!(
        cancel_held(&mut bob, &lapsing.id).await.unwrap().state(),
        v1::HeldAssignmentState::Cancelled
    );
    assert!(held_list(&mut bob, false).await.is_empty());
    assert!(
        desired_of(&s, &till).await.is_empty(),
        "neither was applied"
    );
    s.finish().await;
}

async fn a_scoped_deployer_sees_and_approves_only_inside_its_scope(backend: Backend) {
    let (s, mut admin) = fleet(backend, &[("eu-1", 0), ("us-1", 0)]).await;
    for (store, region) in [("eu-1", "eu"), ("us-1", "us")] {
        let req = admin.req(v1::SetStoreLabelsRequest {
            store_id: store.into(),
            set: [("region".to_string(), region.to_string())].into(),
            remove: vec![],
        });
        admin.client.set_store_labels(req).await.unwrap();
    }
    let (_, us_till) = s.enrolled_device("us-1").await;
    let (mut eu_ops, _) = admin
        .with_new_user("eu-lead", "deployer", &[("region", "eu")])
        .await;
    let for_eu = emergency_to_store(&mut admin, "eu-1").await;
    let for_us = emergency_to_store(&mut admin, "us-1").await;

    assert_eq!(
        held_list(&mut eu_ops, false).await,
        [(for_eu.id.clone(), v1::HeldAssignmentState::AwaitingApproval)]
    );
    assert_status(
        approve_held(&mut eu_ops, &for_us.id).await,
        Code::PermissionDenied,
        "user eu-lead is scoped to stores with region=eu; store us-1 is outside it",
    );
    assert_status(
        cancel_held(&mut eu_ops, &for_us.id).await,
        Code::PermissionDenied,
        "store us-1 is outside it",
    );
    assert!(desired_of(&s, &us_till).await.is_empty());
    assert_eq!(
        approve_held(&mut eu_ops, &for_eu.id).await.unwrap().state(),
        v1::HeldAssignmentState::Approved
    );
    s.finish().await;
}

on_both_backends!(
    an_emergency_assignment_applies_once_another_person_approved_it,
    a_held_assignment_is_cancelled_or_lapses_and_is_never_applied,
    a_scoped_deployer_sees_and_approves_only_inside_its_scope,
    a_user_and_their_own_token_are_one_person,
    a_big_rollout_starts_once_another_deployer_approved_it,
    a_small_rollout_needs_no_approval_and_an_emergency_one_does,
    a_selection_grown_past_the_threshold_after_creation_needs_approval,
);
