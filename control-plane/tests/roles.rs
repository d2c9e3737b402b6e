//! Roles, expiry and store scopes of admin API tokens: every role against
//! every AdminService method (from the one table), expired and revoked
//! tokens, token creation checks, scoped callers kept to their stores. On
//! SQLite and (with --ignored) PostgreSQL.

mod common;

use common::{Admin, Backend, assert_status, setup, token_request};
use posfleet_bundle::manifest::Kind;
use posfleet_control_plane::authz::{METHODS, Role, Scoping};
use posfleet_proto::v1;
use std::collections::HashMap;
use tonic::Code;

/// Calls `method` with an empty body, whatever its request type: a call
/// beyond the caller's role is refused before the body is read.
async fn call_empty(
    channel: &tonic::transport::Channel,
    admin: &Admin,
    method: &str,
) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = format!("/posfleet.v1.AdminService/{method}")
        .parse()
        .unwrap();
    // Any answer decodes as `()` (unknown fields are skipped).
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    grpc.unary(admin.req(()), path, codec).await.map(|_| ())
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn audit(admin: &mut Admin) -> Vec<v1::AuditEntry> {
    let req = admin.req(v1::ListAuditEntriesRequest {
        after_seq: 0,
        limit: 1000,
        ..Default::default()
    });
    admin
        .client
        .list_audit_entries(req)
        .await
        .unwrap()
        .into_inner()
        .entries
}

async fn every_role_is_refused_exactly_what_the_table_denies(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let channel = s.server.channel().await;
    for role in Role::ALL {
        let name = format!("t-{role}");
        let caller = admin
            .with_new_token(token_request(&name, role.as_str()))
            .await;
        for rule in METHODS {
            let result = call_empty(&channel, &caller, rule.method).await;
            if role.grants(rule.needs) {
                if let Err(status) = &result {
                    assert_ne!(
                        status.code(),
                        Code::PermissionDenied,
                        "{role} {}: {status:?}",
                        rule.method
                    );
                }
            } else {
                assert_status(
                    result,
                    Code::PermissionDenied,
                    &format!(
                        "token {name} has role {role}; {} needs {}",
                        rule.method, rule.needs
                    ),
                );
            }
        }
    }
    // Scoped tokens: the same, and methods over the whole fleet refused
    // too. (Their handlers may refuse an empty request's target, but the
    // layer lets every other method through.)
    for role in Role::ALL.into_iter().filter(|r| r.may_be_scoped()) {
        let name = format!("eu-{role}");
        let caller = admin.with_new_token(scoped(&name, role.as_str())).await;
        for rule in METHODS {
            let result = call_empty(&channel, &caller, rule.method).await;
            let refusal = if !role.grants(rule.needs) {
                Some(format!(
                    "token {name} has role {role}; {} needs {}",
                    rule.method, rule.needs
                ))
            } else if rule.scoping == Scoping::Refused {
                Some(format!(
                    "token {name} is scoped to stores with region=eu; {} covers the whole fleet",
                    rule.method
                ))
            } else {
                None
            };
            match refusal {
                Some(message) => assert_status(result, Code::PermissionDenied, &message),
                None => {
                    if let Err(status) = result {
                        assert!(
                            !status.message().contains("needs")
                                && !status.message().contains("whole fleet"),
                            "{role} {}: {status:?}",
                            rule.method
                        );
                    }
                }
            }
        }
    }
    // Refusals are in the audit log with the caller and its role.
    let log = audit(&mut admin).await;
    let refused = log
        .iter()
        .find(|e| e.actor == "t-publisher" && e.method == "CreateRollout")
        .expect("the refused call is recorded");
    assert_eq!(refused.role, "publisher");
    assert_eq!(refused.result, "PERMISSION_DENIED");
    assert!(!refused.peer_address.is_empty(), "{refused:?}");
    let allowed = log
        .iter()
        .find(|e| e.actor == "t-deployer" && e.method == "CreateRollout")
        .expect("the allowed call is recorded");
    assert_eq!(allowed.role, "deployer");
    assert_ne!(allowed.result, "PERMISSION_DENIED");
    let denied = common::metric_sample(
        &s.server.http_get("/metrics").await.1,
        "posfleet_admin_permission_denied_total",
    )
    .unwrap();
    assert!(denied > 50.0, "{denied}");
    s.finish().await;
}

async fn expired_and_revoked_tokens_are_refused(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let mut short = token_request("short-lived", "viewer");
    short.expires_in_seconds = 1;
    let mut short = admin.with_new_token(short).await;
    let list = |admin: &mut Admin| {
        let req = admin.req(v1::ListStoresRequest::default());
        let mut client = admin.client.clone();
        async move { client.list_stores(req).await.map(|_| ()) }
    };
    list(&mut short).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_status(
        list(&mut short).await,
        Code::Unauthenticated,
        "admin API token short-lived expired at 20",
    );
    // Revoked: refused as not valid.
    let created = {
        let req = admin.req(token_request("gone", "viewer"));
        admin
            .client
            .create_admin_token(req)
            .await
            .unwrap()
            .into_inner()
    };
    let mut gone = Admin {
        client: admin.client.clone(),
        channel: admin.channel.clone(),
        token: Some(created.secret),
    };
    list(&mut gone).await.unwrap();
    let req = admin.req(v1::RevokeAdminTokenRequest {
        id: created.token.unwrap().id,
    });
    admin.client.revoke_admin_token(req).await.unwrap();
    assert_status(list(&mut gone).await, Code::Unauthenticated, "not valid");
    let tokens = {
        let req = admin.req(v1::ListAdminTokensRequest {
            include_revoked: false,
        });
        admin
            .client
            .list_admin_tokens(req)
            .await
            .unwrap()
            .into_inner()
            .tokens
    };
    let short = tokens.iter().find(|t| t.name == "short-lived").unwrap();
    assert_eq!(short.role, "viewer");
    assert_eq!(short.created_by, "admin");
    assert!(short.expires_at_unix_ms > short.created_at_unix_ms);
    s.finish().await;
}

async fn token_creation_is_checked(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let cases: Vec<(v1::CreateAdminTokenRequest, &str)> = vec![
        (
            v1::CreateAdminTokenRequest {
                expires_in_seconds: 0,
                ..token_request("no-expiry", "viewer")
            },
            "expires_in_seconds: is required",
        ),
        (
            v1::CreateAdminTokenRequest {
                expires_in_seconds: 400 * 24 * 3600,
                ..token_request("too-long", "viewer")
            },
            "expires_in_seconds: must be at most one year",
        ),
        (
            token_request("root", "root"),
            "role: unknown role `root`; one of viewer, publisher, deployer, store-ops, admin",
        ),
        (
            v1::CreateAdminTokenRequest {
                scope: labels(&[("Region!", "eu")]),
                ..token_request("bad-key", "viewer")
            },
            "scope",
        ),
        (
            v1::CreateAdminTokenRequest {
                scope: labels(&[("region", "")]),
                ..token_request("empty-value", "viewer")
            },
            "scope",
        ),
        (
            v1::CreateAdminTokenRequest {
                scope: labels(&[("region", "eu")]),
                ..token_request("scoped-ci", "publisher")
            },
            "scope: publisher tokens cannot be scoped to stores",
        ),
        (
            v1::CreateAdminTokenRequest {
                scope: labels(&[("region", "eu")]),
                ..token_request("scoped-admin", "admin")
            },
            "scope: admin tokens cannot be scoped to stores",
        ),
    ];
    for (request, message) in cases {
        let name = request.name.clone();
        let req = admin.req(request);
        let result = admin.client.create_admin_token(req).await;
        assert_status(result, Code::InvalidArgument, message);
        // Nothing was created under that name.
        let req = admin.req(token_request(&name, "viewer"));
        let again = admin.client.create_admin_token(req).await;
        assert!(again.is_ok(), "{name}: {again:?}");
    }
    // Only admins create tokens.
    let mut store_ops = admin
        .with_new_token(token_request("ops", "store-ops"))
        .await;
    let req = store_ops.req(token_request("sneaky", "viewer"));
    assert_status(
        store_ops.client.create_admin_token(req).await,
        Code::PermissionDenied,
        "token ops has role store-ops; CreateAdminToken needs admin",
    );
    s.finish().await;
}

/// Stores eu-1 and eu-2 (region=eu) and us-1 (region=us), a device in
/// eu-1 and one in us-1: (eu device, us device).
async fn two_regions(s: &common::Setup, admin: &mut Admin) -> (String, String) {
    for (store, region) in [("eu-1", "eu"), ("eu-2", "eu"), ("us-1", "us")] {
        admin.store(store).await;
        let req = admin.req(v1::SetStoreLabelsRequest {
            store_id: store.into(),
            set: labels(&[("region", region)]),
            remove: vec![],
        });
        admin.client.set_store_labels(req).await.unwrap();
    }
    let (eu, _) = s.enrolled_device("eu-1").await;
    let (us, _) = s.enrolled_device("us-1").await;
    (eu, us)
}

fn scoped(name: &str, role: &str) -> v1::CreateAdminTokenRequest {
    v1::CreateAdminTokenRequest {
        scope: labels(&[("region", "eu")]),
        ..token_request(name, role)
    }
}

fn rollout(selector: v1::RolloutSelector) -> v1::CreateRolloutRequest {
    common::one_wave_rollout("1.0.0", selector)
}

async fn a_scoped_deployer_cannot_target_stores_outside_its_scope(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let (eu, us) = two_regions(&s, &mut admin).await;
    let key = admin.init_repository().await;
    admin
        .publish(&key, "pos-app", "1.0.0", Kind::Software, &["pos-x1"])
        .await;
    let mut deployer = admin.with_new_token(scoped("eu-deploy", "deployer")).await;
    let create = |admin: &mut Admin, selector: v1::RolloutSelector| {
        let req = admin.req(rollout(selector));
        let mut client = admin.client.clone();
        async move { client.create_rollout(req).await.map(|r| r.into_inner()) }
    };
    // A selector that does not require region=eu could reach any store,
    // now or later: refused, even when it names only eu stores.
    for selector in [
        v1::RolloutSelector::default(),
        v1::RolloutSelector {
            store_ids: vec!["eu-1".into()],
            ..Default::default()
        },
        v1::RolloutSelector {
            store_labels: labels(&[("region", "us")]),
            ..Default::default()
        },
    ] {
        assert_status(
            create(&mut deployer, selector).await,
            Code::PermissionDenied,
            "token eu-deploy is scoped to stores with region=eu; a rollout's selector must \
             require the store labels region=eu",
        );
    }
    assert_status(
        create(
            &mut deployer,
            v1::RolloutSelector {
                store_labels: labels(&[("region", "eu")]),
                store_ids: vec!["us-1".into()],
                ..Default::default()
            },
        )
        .await,
        Code::PermissionDenied,
        "store us-1 is outside it",
    );
    let ours = create(
        &mut deployer,
        v1::RolloutSelector {
            store_labels: labels(&[("region", "eu")]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // An admin's rollout to us stores: out of the deployer's hands and
    // sight.
    let theirs = create(
        &mut admin,
        v1::RolloutSelector {
            store_labels: labels(&[("region", "us")]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let req = deployer.req(v1::RolloutRequest {
        id: theirs.id.clone(),
        reason: String::new(),
    });
    assert_status(
        deployer.client.start_rollout(req).await,
        Code::PermissionDenied,
        &format!("rollout {} may select stores outside it", theirs.id),
    );
    let req = deployer.req(v1::RolloutRequest {
        id: theirs.id.clone(),
        reason: String::new(),
    });
    assert_status(
        deployer.client.get_rollout(req).await,
        Code::NotFound,
        &theirs.id,
    );
    let req = deployer.req(v1::ListRolloutsRequest::default());
    let listed: Vec<String> = deployer
        .client
        .list_rollouts(req)
        .await
        .unwrap()
        .into_inner()
        .rollouts
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(listed, [ours.id.as_str()]);
    let events = |admin: &mut Admin, rollout_id: &str| {
        let req = admin.req(v1::ListEventsRequest {
            rollout_id: rollout_id.into(),
            ..Default::default()
        });
        let mut client = admin.client.clone();
        async move { client.list_events(req).await.map(|r| r.into_inner().events) }
    };
    let seen = events(&mut deployer, &ours.id).await.unwrap();
    assert!(seen.iter().any(|e| e.kind == "rollout.created"), "{seen:?}");
    assert_status(
        events(&mut deployer, &theirs.id).await,
        Code::PermissionDenied,
        "it may list the events of one rollout in its scope",
    );
    let req = deployer.req(v1::RolloutRequest {
        id: ours.id.clone(),
        reason: String::new(),
    });
    let started = deployer
        .client
        .start_rollout(req)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.state, v1::RolloutState::Running as i32);
    // Assignments: only to stores and devices in scope.
    let assign = |admin: &mut Admin, target: v1::assign_bundle_request::Target| {
        let req = admin.req(v1::AssignBundleRequest {
            name: "pos-app".into(),
            version: "1.0.0".into(),
            target: Some(target),
            ..Default::default()
        });
        let mut client = admin.client.clone();
        async move { client.assign_bundle(req).await.map(|r| r.into_inner()) }
    };
    use v1::assign_bundle_request::Target;
    assert_status(
        assign(&mut deployer, Target::StoreId("us-1".into())).await,
        Code::PermissionDenied,
        "store us-1 is outside it",
    );
    assert_status(
        assign(&mut deployer, Target::DeviceId(us.clone())).await,
        Code::PermissionDenied,
        &format!("device {us} is in store us-1, outside it"),
    );
    assign(&mut deployer, Target::DeviceId(eu)).await.unwrap();
    // Nothing reached the us till.
    let device = admin.device(&us).await.unwrap();
    assert!(
        device
            .bundles
            .iter()
            .all(|b| b.desired.as_ref().is_none_or(|d| d.version.is_empty())),
        "{device:?}"
    );
    s.finish().await;
}

async fn a_scoped_store_ops_acts_only_on_its_stores(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let (eu, us) = two_regions(&s, &mut admin).await;
    let mut ops = admin.with_new_token(scoped("eu-ops", "store-ops")).await;
    let revoke = |admin: &mut Admin, id: &str| {
        let req = admin.req(v1::RevokeDeviceRequest {
            device_id: id.into(),
            reason: "stolen".into(),
        });
        let mut client = admin.client.clone();
        async move { client.revoke_device(req).await.map(|r| r.into_inner()) }
    };
    assert_status(
        revoke(&mut ops, &us).await,
        Code::PermissionDenied,
        &format!(
            "token eu-ops is scoped to stores with region=eu; device {us} is in store us-1, outside it"
        ),
    );
    assert_eq!(admin.device(&us).await.unwrap().revoked_at_unix_ms, 0);
    let revoked = revoke(&mut ops, &eu).await.unwrap();
    assert!(revoked.revoked_at_unix_ms > 0);
    let req = ops.req(v1::SetDeviceLabelsRequest {
        device_id: us.clone(),
        set: labels(&[("lane", "3")]),
        remove: vec![],
    });
    assert_status(
        ops.client.set_device_labels(req).await,
        Code::PermissionDenied,
        "outside it",
    );
    let req = ops.req(v1::RequestDeviceLogsRequest {
        device_id: us.clone(),
        ..Default::default()
    });
    assert_status(
        ops.client.request_device_logs(req).await,
        Code::PermissionDenied,
        "outside it",
    );
    assert_status(
        ops.token("us-1", 1, 0).await,
        Code::PermissionDenied,
        "store us-1 is outside it",
    );
    ops.token("eu-2", 1, 0).await.unwrap();
    let theirs = admin.token("us-1", 1, 0).await.unwrap().token.unwrap();
    let req = ops.req(v1::RevokeEnrollmentTokenRequest {
        id: theirs.id.clone(),
    });
    assert_status(
        ops.client.revoke_enrollment_token(req).await,
        Code::PermissionDenied,
        "store us-1 is outside it",
    );
    let req = admin.req(v1::RequestDeviceLogsRequest {
        device_id: us.clone(),
        ..Default::default()
    });
    let logs = admin
        .client
        .request_device_logs(req)
        .await
        .unwrap()
        .into_inner();
    let req = ops.req(v1::GetDeviceLogsRequest {
        request_id: logs.id,
        wait_seconds: 0,
    });
    assert_status(
        ops.client.get_device_logs(req).await,
        Code::PermissionDenied,
        &format!("device {us} is in store us-1, outside it"),
    );
    let req = ops.req(v1::SetMaintenanceWindowRequest {
        store_id: "us-1".into(),
        maintenance_window: None,
    });
    assert_status(
        ops.client.set_maintenance_window(req).await,
        Code::PermissionDenied,
        "store us-1 is outside it",
    );
    // Store labels define scopes: only admins change them.
    let req = ops.req(v1::SetStoreLabelsRequest {
        store_id: "us-1".into(),
        set: labels(&[("region", "eu")]),
        remove: vec![],
    });
    assert_status(
        ops.client.set_store_labels(req).await,
        Code::PermissionDenied,
        "SetStoreLabels needs admin",
    );
    s.finish().await;
}

async fn list_calls_show_only_what_the_scope_covers(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let (eu, us) = two_regions(&s, &mut admin).await;
    admin.token("us-1", 1, 0).await.unwrap();
    let mut viewer = admin.with_new_token(scoped("eu-view", "viewer")).await;
    let req = viewer.req(v1::ListStoresRequest::default());
    let stores: Vec<String> = viewer
        .client
        .list_stores(req)
        .await
        .unwrap()
        .into_inner()
        .stores
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(stores, ["eu-1", "eu-2"]);
    let devices: Vec<String> = viewer
        .devices(v1::ListDevicesRequest::default())
        .await
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(devices, [eu.as_str()]);
    assert_eq!(
        admin.devices(v1::ListDevicesRequest::default()).await.len(),
        2
    );
    viewer.device(&eu).await.unwrap();
    assert_status(viewer.device(&us).await, Code::NotFound, &us);
    let req = viewer.req(v1::GetStoreRequest { id: "us-1".into() });
    assert_status(viewer.client.get_store(req).await, Code::NotFound, "us-1");
    let req = viewer.req(v1::ListEnrollmentTokensRequest::default());
    let tokens = viewer
        .client
        .list_enrollment_tokens(req)
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert!(tokens.iter().all(|t| t.store_id == "eu-1"), "{tokens:?}");
    assert!(!tokens.is_empty());
    // Events: only those of one rollout in scope.
    let req = viewer.req(v1::ListEventsRequest::default());
    assert_status(
        viewer.client.list_events(req).await,
        Code::PermissionDenied,
        "token eu-view is scoped to stores with region=eu; it may list the events of one \
         rollout in its scope",
    );
    // Admin methods cover the whole fleet.
    let req = viewer.req(v1::ListAuditEntriesRequest::default());
    assert_status(
        viewer.client.list_audit_entries(req).await,
        Code::PermissionDenied,
        "ListAuditEntries needs admin",
    );
    s.finish().await;
}

on_both_backends!(
    every_role_is_refused_exactly_what_the_table_denies,
    expired_and_revoked_tokens_are_refused,
    token_creation_is_checked,
    a_scoped_deployer_cannot_target_stores_outside_its_scope,
    a_scoped_store_ops_acts_only_on_its_stores,
    list_calls_show_only_what_the_scope_covers,
);
