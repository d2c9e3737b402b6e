//! Operators as people, over real gRPC, on SQLite and (with --ignored)
//! PostgreSQL: users set up from a one-time code, log in with a password
//! and a TOTP code (or a recovery code), get sessions that end when they
//! log out, expire, or are disabled or reset; failed logins lock them out;
//! every attempt is in the audit log.

mod common;

use common::{
    Admin, Backend, NEW_USER_PASSWORD, assert_metric, assert_status, setup, token_request,
};
use posfleet_proto::setup::CompletedSetup;
use posfleet_proto::totp;
use posfleet_proto::v1::{self, login_response, session_service_client::SessionServiceClient};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

async fn login_as(
    channel: &Channel,
    user: &str,
    password: &str,
    code: &str,
    session_seconds: u64,
) -> Result<v1::LoginResponse, Status> {
    SessionServiceClient::new(channel.clone())
        .login(Request::new(v1::LoginRequest {
            user: user.into(),
            password: password.into(),
            code: code.into(),
            session_seconds,
        }))
        .await
        .map(|r| r.into_inner())
}

/// A login that must give a session.
async fn session(channel: &Channel, user: &str, password: &str, code: &str) -> v1::Session {
    match login_as(channel, user, password, code, 0)
        .await
        .unwrap()
        .result
    {
        Some(login_response::Result::Session(session)) => session,
        other => panic!("expected a session, got {other:?}"),
    }
}

/// A login that must be refused.
async fn refused(channel: &Channel, user: &str, password: &str, code: &str) -> Status {
    login_as(channel, user, password, code, 0)
        .await
        .expect_err("the login should be refused")
}

/// A TOTP code of a step after `*last` (the last one the server accepted
/// for this user, or later), waiting for the clock when needed.
async fn fresh_code(secret: &str, last: &mut u64) -> String {
    loop {
        let current = totp::step_at(totp::unix_now());
        let step = (*last + 1).max(current);
        if step <= current + 1 {
            *last = step;
            return totp::code_at(secret, step * totp::STEP_SECONDS).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A user and what the test knows of them.
struct User {
    client: Admin,
    setup: CompletedSetup,
    /// No code of this step or before will be accepted.
    last_step: u64,
}

impl User {
    async fn new(admin: &mut Admin, name: &str, role: &str, scope: &[(&str, &str)]) -> User {
        let (client, setup) = admin.with_new_user(name, role, scope).await;
        User {
            client,
            setup,
            last_step: totp::step_at(totp::unix_now()),
        }
    }

    async fn code(&mut self) -> String {
        fresh_code(&self.setup.totp_secret, &mut self.last_step).await
    }

    fn recovery_code(&mut self) -> String {
        self.setup.recovery_codes.remove(0)
    }

    /// A client calling with `token`.
    fn with_token(&self, token: &str) -> Admin {
        Admin {
            client: self.client.client.clone(),
            channel: self.client.channel.clone(),
            token: Some(token.into()),
        }
    }
}

async fn list_stores(admin: &mut Admin) -> Result<Vec<v1::Store>, Status> {
    let req = admin.req(v1::ListStoresRequest::default());
    admin
        .client
        .list_stores(req)
        .await
        .map(|r| r.into_inner().stores)
}

async fn create_store(admin: &mut Admin, id: &str) -> Result<v1::Store, Status> {
    let req = admin.req(v1::CreateStoreRequest {
        id: id.into(),
        name: id.into(),
        time_zone: "UTC".into(),
    });
    admin.client.create_store(req).await.map(|r| r.into_inner())
}

fn user_request(name: &str) -> v1::UserRequest {
    v1::UserRequest { name: name.into() }
}

async fn list_users(admin: &mut Admin, include_disabled: bool) -> Vec<v1::User> {
    let req = admin.req(v1::ListUsersRequest { include_disabled });
    admin
        .client
        .list_users(req)
        .await
        .unwrap()
        .into_inner()
        .users
}

fn reason(entry: &v1::AuditEntry) -> String {
    let target: serde_json::Value = serde_json::from_str(&entry.target_json).unwrap();
    target["reason"].as_str().unwrap_or_default().to_string()
}

/// The whole path of a new person: created with a role, set up from the
/// setup code (password, TOTP), logged in with password and code, and
/// calling within their role only.
async fn a_new_user_sets_up_logs_in_and_calls_within_their_role(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let channel = admin.channel.clone();
    let created = admin.create_user("carol", "viewer", &[]).await;
    let user = created.user.unwrap();
    assert!(user.setup_pending);
    assert_eq!(
        (user.role.as_str(), user.created_by.as_str()),
        ("viewer", "admin")
    );
    let in_72h = created.setup_code_expires_at_unix_ms - user.created_at_unix_ms;
    assert_eq!(in_72h, 72 * 3600 * 1000);

    // The setup code as the password, no code: a challenge.
    let challenge = match login_as(&channel, "carol", &created.setup_code, "", 0)
        .await
        .unwrap()
        .result
    {
        Some(login_response::Result::Setup(challenge)) => challenge,
        other => panic!("expected a setup challenge, got {other:?}"),
    };
    assert_eq!(challenge.min_password_chars, 12);
    assert!(
        challenge
            .otpauth_uri
            .starts_with("otpauth://totp/posfleet:carol?secret="),
        "{}",
        challenge.otpauth_uri
    );
    assert!(challenge.otpauth_uri.contains("&issuer=posfleet"));
    let mut sessions = SessionServiceClient::new(channel.clone());
    let complete = |password: &str, code: String| v1::CompleteSetupRequest {
        setup_token: challenge.setup_token.clone(),
        new_password: password.into(),
        code,
        session_seconds: 0,
    };
    // A short password, or a wrong code, is refused and the challenge
    // stays open.
    let code = totp::code_now(&challenge.totp_secret).unwrap();
    assert_status(
        sessions
            .complete_setup(complete("too short", code.clone()))
            .await,
        Code::InvalidArgument,
        "new_password: must be at least 12 characters",
    );
    let wrong = if code == "000000" { "111111" } else { "000000" };
    assert_status(
        sessions
            .complete_setup(complete(NEW_USER_PASSWORD, wrong.into()))
            .await,
        Code::Unauthenticated,
        "wrong code",
    );
    let done = sessions
        .complete_setup(complete(NEW_USER_PASSWORD, code))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.recovery_codes.len(), 10);
    let session = done.session.unwrap();
    assert!(session.token.starts_with("pfs_"), "{}", session.token);
    assert_eq!(
        (session.user.as_str(), session.role.as_str()),
        ("carol", "viewer")
    );
    let in_12h = session.expires_at_unix_ms - chrono::Utc::now().timestamp_millis();
    assert!((12 * 3600 - 60) * 1000 < in_12h && in_12h <= 12 * 3600 * 1000);

    // From now on: password and a code.
    let mut last = totp::step_at(totp::unix_now());
    let code = fresh_code(&challenge.totp_secret, &mut last).await;
    let logged_in = session_of(&channel, "carol", &code).await;
    let mut carol = Admin {
        client: admin.client.clone(),
        channel: channel.clone(),
        token: Some(logged_in.token),
    };
    list_stores(&mut carol).await.unwrap();
    assert_status(
        create_store(&mut carol, "s1").await,
        Code::PermissionDenied,
        "user carol has role viewer; CreateStore needs admin",
    );
    let listed = list_users(&mut admin, false).await;
    let carol_row = listed.iter().find(|u| u.name == "carol").unwrap();
    assert!(!carol_row.setup_pending);
    assert!(carol_row.last_login_unix_ms > 0);
    assert_eq!(carol_row.recovery_codes_left, 10);
    let names: Vec<&str> = listed.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["admin", "carol"]);
    // Names are checked and never reused.
    for (name, role, code, fragment) in [
        (
            "carol",
            "viewer",
            Code::AlreadyExists,
            "names are not reused",
        ),
        (
            "Carol",
            "viewer",
            Code::InvalidArgument,
            "name: `Carol` must be",
        ),
        ("dave", "root", Code::InvalidArgument, "unknown role `root`"),
    ] {
        let req = admin.req(v1::CreateUserRequest {
            name: name.into(),
            role: role.into(),
            scope: Default::default(),
        });
        assert_status(admin.client.create_user(req).await, code, fragment);
    }
    let req = admin.req(v1::CreateUserRequest {
        name: "erin".into(),
        role: "admin".into(),
        scope: [("region".to_string(), "eu".to_string())].into(),
    });
    assert_status(
        admin.client.create_user(req).await,
        Code::InvalidArgument,
        "admin users cannot be scoped to stores",
    );
    s.finish().await;
}

async fn session_of(channel: &Channel, user: &str, code: &str) -> v1::Session {
    session(channel, user, NEW_USER_PASSWORD, code).await
}

/// Each wrong credential is refused, saying what is wrong only as far as
/// that tells no stranger anything: an unknown user and a wrong password
/// read the same.
async fn wrong_credentials_are_refused_and_a_code_works_once(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let channel = admin.channel.clone();
    let mut dave = User::new(&mut admin, "dave", "deployer", &[]).await;

    let wrong_password = refused(&channel, "dave", "not dave's password", "123456").await;
    let unknown = refused(&channel, "nobody", "not dave's password", "123456").await;
    assert_eq!(wrong_password.code(), Code::Unauthenticated);
    assert_eq!(
        (unknown.code(), unknown.message()),
        (wrong_password.code(), wrong_password.message())
    );
    assert_eq!(wrong_password.message(), "wrong user name or password");

    let secret = dave.setup.totp_secret.clone();
    let now = totp::unix_now();
    let valid: Vec<String> = (0..3)
        .map(|i| totp::code_at(&secret, now - 30 + i * 30).unwrap())
        .collect();
    let wrong = (0..10)
        .map(|d| format!("{d}{d}{d}{d}{d}{d}"))
        .find(|c| !valid.contains(c))
        .unwrap();
    assert_status(
        login_as(&channel, "dave", NEW_USER_PASSWORD, &wrong, 0).await,
        Code::Unauthenticated,
        "wrong code",
    );
    // A code from 3 steps ago is expired, not merely wrong.
    let old = totp::code_at(&secret, now - 3 * totp::STEP_SECONDS).unwrap();
    if !valid.contains(&old) {
        assert_status(
            login_as(&channel, "dave", NEW_USER_PASSWORD, &old, 0).await,
            Code::Unauthenticated,
            "code expired",
        );
    }
    assert_status(
        login_as(&channel, "dave", NEW_USER_PASSWORD, "", 0).await,
        Code::Unauthenticated,
        "a code is required",
    );
    // A good code works once: the same code again is refused, right
    // password and all.
    let code = dave.code().await;
    session_of(&channel, "dave", &code).await;
    assert_status(
        login_as(&channel, "dave", NEW_USER_PASSWORD, &code, 0).await,
        Code::Unauthenticated,
        "code already used; wait for the next one",
    );
    // More than the configured session length cannot be asked for.
    assert_status(
        login_as(&channel, "dave", NEW_USER_PASSWORD, &code, 13 * 3600).await,
        Code::InvalidArgument,
        "session_seconds: at most 43200",
    );

    // Every attempt is in the audit log: the name typed, the session kind,
    // the role when the user exists, where it came from, and why.
    let rows = admin.audit_entries_of("").await;
    let set_up = rows
        .iter()
        .find(|e| e.method == "CompleteSetup" && e.actor == "dave")
        .unwrap()
        .seq;
    let logins: Vec<(&str, &str, &str, String)> = rows
        .iter()
        .filter(|e| e.method == "Login" && e.seq > set_up)
        .map(|e| {
            assert_eq!(e.actor_kind, "session");
            assert!(e.peer_address.starts_with("127.0.0.1:"), "{e:?}");
            (
                e.actor.as_str(),
                e.role.as_str(),
                e.result.as_str(),
                reason(e),
            )
        })
        .collect();
    let mut expected = vec![
        (
            "dave",
            "deployer",
            "UNAUTHENTICATED",
            "wrong password".to_string(),
        ),
        ("nobody", "", "UNAUTHENTICATED", "unknown user".into()),
        ("dave", "deployer", "UNAUTHENTICATED", "wrong code".into()),
    ];
    if !valid.contains(&old) {
        expected.push(("dave", "deployer", "UNAUTHENTICATED", "expired code".into()));
    }
    expected.extend([
        ("dave", "deployer", "UNAUTHENTICATED", "wrong code".into()),
        ("dave", "deployer", "OK", String::new()),
        (
            "dave",
            "deployer",
            "UNAUTHENTICATED",
            "replayed code".into(),
        ),
        ("dave", "", "INVALID_ARGUMENT", "invalid request".into()),
    ]);
    assert_eq!(logins, expected);
    let text = s.server.http_get("/metrics").await.1;
    assert_metric(&text, "posfleet_logins_total{result=\"ok\"}", 1.0);
    assert_metric(
        &text,
        "posfleet_logins_total{result=\"replayed_code\"}",
        1.0,
    );
    assert_metric(&text, "posfleet_logins_total{result=\"unknown_user\"}", 1.0);
    assert_metric(
        &text,
        "posfleet_logins_total{result=\"setup_completed\"}",
        2.0,
    );
    s.finish().await;
}

/// A recovery code stands in for a TOTP code, once.
async fn a_recovery_code_works_once(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let channel = admin.channel.clone();
    let mut erin = User::new(&mut admin, "erin", "viewer", &[]).await;
    let code = erin.recovery_code();
    // Typed in capitals, with spaces around: the same code.
    let mut erin_client = erin.with_token(
        &session_of(&channel, "erin", &format!(" {} ", code.to_uppercase()))
            .await
            .token,
    );
    list_stores(&mut erin_client).await.unwrap();
    assert_status(
        login_as(&channel, "erin", NEW_USER_PASSWORD, &code, 0).await,
        Code::Unauthenticated,
        "a recovery code works once",
    );
    let left = list_users(&mut admin, false).await;
    assert_eq!(
        left.iter()
            .find(|u| u.name == "erin")
            .unwrap()
            .recovery_codes_left,
        9
    );
    s.finish().await;
}

/// After `login_max_failures` failures in a row the user is locked: the
/// right password and code are refused too, until the lock ends or an
/// admin lifts it.
async fn failed_logins_lock_the_user_until_an_admin_unlocks_them(backend: Backend) {
    let s = setup(backend, |c| {
        c.login_max_failures = 3;
        c.login_lockout_seconds = 3600;
    })
    .await;
    let mut admin = s.server.admin().await;
    let channel = admin.channel.clone();
    let mut frank = User::new(&mut admin, "frank", "viewer", &[]).await;
    for attempt in 1..=3 {
        let refusal = refused(&channel, "frank", "guess number one", "123456").await;
        if attempt == 3 {
            assert!(
                refusal.message().contains("frank is locked until"),
                "{}",
                refusal.message()
            );
        }
    }
    let code = frank.recovery_code();
    assert_status(
        login_as(&channel, "frank", NEW_USER_PASSWORD, &code, 0).await,
        Code::Unauthenticated,
        "an admin can lift it with `posfleet user unlock frank`",
    );
    let listed = list_users(&mut admin, false).await;
    assert!(
        listed
            .iter()
            .find(|u| u.name == "frank")
            .unwrap()
            .locked_until_unix_ms
            > 0
    );
    // The refusal while locked spent nothing: the same recovery code works
    // once unlocked.
    let req = admin.req(user_request("frank"));
    let unlocked = admin.client.unlock_user(req).await.unwrap().into_inner();
    assert_eq!(unlocked.locked_until_unix_ms, 0);
    session_of(&channel, "frank", &code).await;
    let rows = admin.audit_entries_of("frank").await;
    let reasons: Vec<String> = rows
        .iter()
        .filter(|e| e.method == "Login")
        .map(reason)
        .collect();
    assert_eq!(
        reasons,
        [
            "",
            "wrong password",
            "wrong password",
            "wrong password",
            "locked",
            ""
        ]
    );
    s.finish().await;
}

/// Sessions end when they expire, when their user logs out, and, for a
/// disabled user, at their next call.
async fn sessions_end_by_expiry_logout_or_disabling(backend: Backend) {
    let s = setup(backend, |c| c.session_lifetime_seconds = 3600).await;
    let mut admin = s.server.admin().await;
    let channel = admin.channel.clone();
    let mut gina = User::new(&mut admin, "gina", "viewer", &[]).await;

    // A session asked to last one second.
    let code = gina.recovery_code();
    let short = match login_as(&channel, "gina", NEW_USER_PASSWORD, &code, 1)
        .await
        .unwrap()
        .result
    {
        Some(login_response::Result::Session(session)) => session,
        other => panic!("{other:?}"),
    };
    let mut short_client = gina.with_token(&short.token);
    list_stores(&mut short_client).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_status(
        list_stores(&mut short_client).await,
        Code::Unauthenticated,
        "session expired at",
    );
    assert_status(
        list_stores(&mut short_client).await,
        Code::Unauthenticated,
        "run `posfleet login`",
    );

    // Logged out: refused at once, and logging out again is harmless.
    let code = gina.recovery_code();
    let token = session_of(&channel, "gina", &code).await.token;
    let mut client = gina.with_token(&token);
    list_stores(&mut client).await.unwrap();
    let mut sessions = SessionServiceClient::new(channel.clone());
    let logout = |token: &str| {
        let mut req = Request::new(v1::LogoutRequest {});
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        req
    };
    sessions.logout(logout(&token)).await.unwrap();
    assert_status(
        list_stores(&mut client).await,
        Code::Unauthenticated,
        "session ended (logged out or revoked); run `posfleet login`",
    );
    sessions.logout(logout(&token)).await.unwrap();
    assert_status(
        sessions.logout(logout("pfs_bogus")).await,
        Code::Unauthenticated,
        "session is not valid",
    );

    // Disabled: the live session (from the setup) is refused at its next
    // call, logins too; enabled again, they log in again.
    list_stores(&mut gina.client).await.unwrap();
    let req = admin.req(user_request("gina"));
    let disabled = admin.client.disable_user(req).await.unwrap().into_inner();
    assert!(disabled.disabled_at_unix_ms > 0);
    assert_status(
        list_stores(&mut gina.client).await,
        Code::Unauthenticated,
        "session ended",
    );
    let code = gina.recovery_code();
    assert_status(
        login_as(&channel, "gina", NEW_USER_PASSWORD, &code, 0).await,
        Code::Unauthenticated,
        "gina was disabled at",
    );
    assert!(
        list_users(&mut admin, false)
            .await
            .iter()
            .all(|u| u.name != "gina")
    );
    assert_eq!(list_users(&mut admin, true).await.len(), 2);
    let req = admin.req(user_request("gina"));
    let enabled = admin.client.enable_user(req).await.unwrap().into_inner();
    assert_eq!(enabled.disabled_at_unix_ms, 0);
    let mut again = gina.with_token(&session_of(&channel, "gina", &code).await.token);
    list_stores(&mut again).await.unwrap();
    s.finish().await;
}

/// The last enabled admin cannot be disabled, and nobody disables
/// themselves; unknown users are not found.
async fn the_last_admin_and_oneself_cannot_be_disabled(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let req = admin.req(user_request("admin"));
    assert_status(
        admin.client.disable_user(req).await,
        Code::FailedPrecondition,
        "admin cannot disable their own user",
    );
    let mut hana = User::new(&mut admin, "hana", "admin", &[]).await;
    // Nor through a token of their own.
    let req = hana.client.req(token_request("hana-bot", "admin"));
    let bot = hana
        .client
        .client
        .create_admin_token(req)
        .await
        .unwrap()
        .into_inner();
    let mut hana_bot = hana.with_token(&bot.secret);
    let req = hana_bot.req(user_request("hana"));
    assert_status(
        hana_bot.client.disable_user(req).await,
        Code::FailedPrecondition,
        "hana cannot disable their own user",
    );
    // The first admin's token, then Hana disables the first admin: she is
    // the last enabled admin, and the disabled admin's token stops working
    // with them (so it cannot disable her either); enabled again, it works.
    let req = admin.req(token_request("admin-bot", "admin"));
    let admin_bot = admin
        .client
        .create_admin_token(req)
        .await
        .unwrap()
        .into_inner();
    let req = hana.client.req(user_request("admin"));
    hana.client.client.disable_user(req).await.unwrap();
    let mut admin_bot = hana.with_token(&admin_bot.secret);
    let req = admin_bot.req(user_request("hana"));
    assert_status(
        admin_bot.client.disable_user(req).await,
        Code::Unauthenticated,
        "admin API token admin-bot belongs to user admin, who was disabled at",
    );
    let req = hana.client.req(user_request("admin"));
    hana.client.client.enable_user(req).await.unwrap();
    list_stores(&mut admin_bot).await.unwrap();
    let req = hana.client.req(user_request("admin"));
    hana.client.client.disable_user(req).await.unwrap();
    let req = hana.client.req(user_request("nobody"));
    assert_status(
        hana.client.client.enable_user(req).await,
        Code::NotFound,
        "unknown user nobody",
    );
    // The first admin's session ended with them.
    assert_status(
        list_stores(&mut admin).await,
        Code::Unauthenticated,
        "session ended",
    );
    s.finish().await;
}

/// A reset forgets the password, the TOTP secret and the recovery codes,
/// ends the sessions, lifts a lockout, and hands out a new setup code; a
/// setup code works for one setup only.
async fn a_reset_user_sets_up_again_and_setup_codes_work_once(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let channel = admin.channel.clone();
    let first_code = admin.create_user("ivan", "viewer", &[]).await.setup_code;
    let first = posfleet_proto::setup::complete_setup(
        channel.clone(),
        "ivan",
        &first_code,
        NEW_USER_PASSWORD,
    )
    .await
    .unwrap();
    // The setup code is spent.
    assert_status(
        login_as(&channel, "ivan", &first_code, "", 0).await,
        Code::Unauthenticated,
        "wrong user name or password",
    );
    let mut ivan = Admin {
        client: admin.client.clone(),
        channel: channel.clone(),
        token: Some(first.session.token.clone()),
    };
    list_stores(&mut ivan).await.unwrap();

    let req = admin.req(user_request("ivan"));
    let reset = admin.client.reset_user(req).await.unwrap().into_inner();
    assert!(reset.user.as_ref().unwrap().setup_pending);
    assert_eq!(reset.user.as_ref().unwrap().recovery_codes_left, 0);
    assert_ne!(reset.setup_code, first_code);
    assert_status(
        list_stores(&mut ivan).await,
        Code::Unauthenticated,
        "session ended",
    );
    // The old password (with a recovery code of before) no longer works.
    assert_status(
        login_as(
            &channel,
            "ivan",
            NEW_USER_PASSWORD,
            &first.recovery_codes[0],
            0,
        )
        .await,
        Code::Unauthenticated,
        "wrong user name or password",
    );
    let again = posfleet_proto::setup::complete_setup(
        channel.clone(),
        "ivan",
        &reset.setup_code,
        "ivan's second password",
    )
    .await
    .unwrap();
    assert_ne!(again.totp_secret, first.totp_secret);
    ivan.token = Some(again.session.token);
    list_stores(&mut ivan).await.unwrap();
    s.finish().await;
}

/// A setup challenge is answered within its time, with its own token; an
/// expired setup code leads to no challenge.
async fn expired_or_unknown_setups_are_refused(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let channel = admin.channel.clone();
    let mut sessions = SessionServiceClient::new(channel.clone());
    let complete = |token: &str, secret: &str| v1::CompleteSetupRequest {
        setup_token: token.into(),
        new_password: NEW_USER_PASSWORD.into(),
        code: totp::code_now(secret).unwrap_or_default(),
        session_seconds: 0,
    };
    assert_status(
        sessions.complete_setup(complete("pfc_bogus", "")).await,
        Code::Unauthenticated,
        "the setup token is not valid",
    );
    let code = admin.create_user("judy", "viewer", &[]).await.setup_code;
    let challenge = |response: v1::LoginResponse| match response.result {
        Some(login_response::Result::Setup(challenge)) => challenge,
        other => panic!("{other:?}"),
    };
    let first = challenge(login_as(&channel, "judy", &code, "", 0).await.unwrap());
    // A second login with the code replaces the first challenge.
    let second = challenge(login_as(&channel, "judy", &code, "", 0).await.unwrap());
    assert_status(
        sessions
            .complete_setup(complete(&first.setup_token, &first.totp_secret))
            .await,
        Code::Unauthenticated,
        "log in with the setup code again",
    );
    // Ten minutes later (the clock moved by hand in the database).
    sql(
        &s.db.url,
        "UPDATE users SET setup_expires_at_ms = 1 WHERE name = 'judy'",
    )
    .await;
    assert_status(
        sessions
            .complete_setup(complete(&second.setup_token, &second.totp_secret))
            .await,
        Code::Unauthenticated,
        "the setup challenge expired at",
    );
    sql(
        &s.db.url,
        "UPDATE users SET setup_code_expires_at_ms = 1 WHERE name = 'judy'",
    )
    .await;
    assert_status(
        login_as(&channel, "judy", &code, "", 0).await,
        Code::Unauthenticated,
        "`posfleet user reset judy`",
    );
    s.finish().await;
}

/// Runs `statement` on the test's database, as if time had passed.
async fn sql(url: &str, statement: &str) {
    use sqlx::{Connection, Executor};
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    conn.execute(statement).await.unwrap();
    conn.close().await.unwrap();
}

/// One address gets `login_rate_per_minute` attempts, then
/// RESOURCE_EXHAUSTED, whatever the names.
async fn logins_are_rate_limited_per_source(backend: Backend) {
    let s = setup(backend, |c| c.login_rate_per_minute = 4).await;
    let channel = s.server.admin().await.channel.clone();
    // The first admin's setup spent 2 of the 4.
    for _ in 0..2 {
        refused(&channel, "nobody", "some password", "").await;
    }
    let status = refused(&channel, "admin", "some password", "").await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("too many login attempts from this address"),
        "{}",
        status.message()
    );
    let text = s.server.http_get("/metrics").await.1;
    assert_metric(&text, "posfleet_logins_total{result=\"rate_limited\"}", 1.0);
    s.finish().await;
}

/// Stores eu-1 (region=eu) and us-1 (region=us).
async fn two_regions(admin: &mut Admin) {
    for (store, region) in [("eu-1", "eu"), ("us-1", "us")] {
        admin.store(store).await;
        let req = admin.req(v1::SetStoreLabelsRequest {
            store_id: store.into(),
            set: [("region".to_string(), region.to_string())].into(),
            remove: vec![],
        });
        admin.client.set_store_labels(req).await.unwrap();
    }
}

async fn update(
    admin: &mut Admin,
    name: &str,
    role: &str,
    scope: &[(&str, &str)],
    clear_scope: bool,
) -> Result<v1::User, Status> {
    let req = admin.req(v1::UpdateUserRequest {
        name: name.into(),
        role: role.into(),
        scope: common::labels(scope),
        clear_scope,
    });
    admin.client.update_user(req).await.map(|r| r.into_inner())
}

async fn store_ids(admin: &mut Admin) -> Vec<String> {
    let stores = list_stores(admin).await.unwrap();
    stores.into_iter().map(|s| s.id).collect()
}

/// An admin changes another user's role and scope: their live session
/// works with the new ones from its next call, and the tokens they made as
/// an admin stop once they are not one.
async fn a_users_role_and_scope_change_from_their_next_call(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    two_regions(&mut admin).await;
    let mut lee = User::new(&mut admin, "lee", "viewer", &[]).await;
    assert_status(
        create_store(&mut lee.client, "lee-1").await,
        Code::PermissionDenied,
        "CreateStore needs admin",
    );

    let promoted = update(&mut admin, "lee", "admin", &[], false)
        .await
        .unwrap();
    assert_eq!(promoted.role, "admin");
    create_store(&mut lee.client, "lee-1").await.unwrap();
    let req = lee.client.req(token_request("lee-bot", "admin"));
    let bot = lee.client.client.create_admin_token(req).await.unwrap();
    let mut bot = lee.with_token(&bot.into_inner().secret);
    list_stores(&mut bot).await.unwrap();

    // A deployer in region=eu: her session sees eu-1 only, her token stops.
    let moved = update(&mut admin, "lee", "deployer", &[("region", "eu")], false)
        .await
        .unwrap();
    assert_eq!((moved.role.as_str(), moved.scope.len()), ("deployer", 1));
    assert_eq!(store_ids(&mut lee.client).await, ["eu-1"]);
    assert_status(
        list_stores(&mut bot).await,
        Code::Unauthenticated,
        "admin API token lee-bot belongs to user lee, who is no longer an admin",
    );
    // Unscoped again, role kept.
    let unscoped = update(&mut admin, "lee", "", &[], true).await.unwrap();
    assert_eq!(
        (unscoped.role.as_str(), unscoped.scope.len()),
        ("deployer", 0)
    );
    assert_eq!(store_ids(&mut lee.client).await.len(), 3);

    // Refused: an admin with a scope, a scope kept for an admin, both a
    // scope and clearing it, oneself, and an unknown user.
    assert_status(
        update(&mut admin, "lee", "admin", &[("region", "eu")], false).await,
        Code::InvalidArgument,
        "admin users cannot be scoped to stores",
    );
    update(&mut admin, "lee", "", &[("region", "eu")], false)
        .await
        .unwrap();
    assert_status(
        update(&mut admin, "lee", "admin", &[], false).await,
        Code::InvalidArgument,
        "clear lee's scope (--unscoped) to make them admin",
    );
    assert_status(
        update(&mut admin, "lee", "", &[("region", "eu")], true).await,
        Code::InvalidArgument,
        "give a scope or clear it, not both",
    );
    assert_status(
        update(&mut admin, "admin", "viewer", &[], false).await,
        Code::FailedPrecondition,
        "admin cannot change their own role or scope; another admin must",
    );
    assert_status(
        update(&mut admin, "nobody", "viewer", &[], false).await,
        Code::NotFound,
        "unknown user nobody",
    );
    assert_status(
        update(&mut lee.client, "admin", "viewer", &[], false).await,
        Code::PermissionDenied,
        "UpdateUser needs admin",
    );
    s.finish().await;
}

/// A user confined to stores labelled region=eu sees and acts on those
/// only.
async fn a_scoped_user_stays_in_their_stores(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    two_regions(&mut admin).await;
    let mut kim = User::new(&mut admin, "kim", "deployer", &[("region", "eu")]).await;
    assert_eq!(
        kim.setup.session.scope.get("region").map(String::as_str),
        Some("eu")
    );
    let stores: Vec<String> = list_stores(&mut kim.client)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(stores, ["eu-1"]);
    let req = kim.client.req(v1::AssignBundleRequest {
        name: "pos-app".into(),
        version: "1.0.0".into(),
        target: Some(v1::assign_bundle_request::Target::StoreId("us-1".into())),
        ..Default::default()
    });
    assert_status(
        kim.client.client.assign_bundle(req).await,
        Code::PermissionDenied,
        "user kim is scoped to stores with region=eu",
    );
    s.finish().await;
}

/// The audit log names people: a user's calls (kind `user`), their
/// tokens' calls (kind `token`, owner the user), their logins (kind
/// `session`); `user` picks one person's.
async fn the_audit_log_names_the_person_and_filters_by_user(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let mut lena = User::new(&mut admin, "lena", "admin", &[]).await;
    create_store(&mut lena.client, "s-lena").await.unwrap();
    let req = lena.client.req(token_request("lena-bot", "admin"));
    let bot = lena
        .client
        .client
        .create_admin_token(req)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bot.token.unwrap().created_by, "lena");
    let mut lena_bot = lena.with_token(&bot.secret);
    create_store(&mut lena_bot, "s-bot").await.unwrap();
    create_store(&mut admin, "s-admin").await.unwrap();

    let mine = admin.audit_entries_of("lena").await;
    let summary: Vec<(&str, &str, &str, &str, &str)> = mine
        .iter()
        .map(|e| {
            (
                e.actor.as_str(),
                e.actor_kind.as_str(),
                e.actor_owner.as_str(),
                e.role.as_str(),
                e.method.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("lena", "session", "", "admin", "Login"),
            ("lena", "session", "", "admin", "CompleteSetup"),
            ("lena", "user", "", "admin", "CreateStore"),
            ("lena", "user", "", "admin", "CreateAdminToken"),
            ("lena-bot", "token", "lena", "admin", "CreateStore"),
        ]
    );
    assert!(
        mine.iter()
            .all(|e| e.peer_address.starts_with("127.0.0.1:"))
    );
    // The admin's own rows are the admin's.
    let admin_rows = admin.audit_entries_of("admin").await;
    let admins: Vec<&str> = admin_rows.iter().map(|e| e.method.as_str()).collect();
    assert_eq!(
        admins,
        ["Login", "CompleteSetup", "CreateUser", "CreateStore"]
    );
    let req = admin.req(v1::ListAuditEntriesRequest {
        user: "Not A Name".into(),
        ..Default::default()
    });
    assert_status(
        admin.client.list_audit_entries(req).await,
        Code::InvalidArgument,
        "user:",
    );
    s.finish().await;
}

/// A flood of logins for names no one has cannot fill the disk: their
/// rows are rate-limited like unauthenticated calls (and pruned), and
/// counted.
async fn failed_logins_for_unknown_names_are_bounded(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let admin = s.server.admin().await;
    let channel = admin.channel.clone();
    let attempts = posfleet_control_plane::audit::UNAUTHENTICATED_BURST as usize + 40;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..attempts {
        let channel = channel.clone();
        calls.spawn(async move {
            let name = format!("intruder-{i}-{}", "x".repeat(200));
            login_as(&channel, &name, "password", "123456", 0).await
        });
    }
    while let Some(result) = calls.join_next().await {
        assert_eq!(result.unwrap().unwrap_err().code(), Code::Unauthenticated);
    }
    let mut admin = admin;
    let rows = admin.audit_entries_of("").await;
    let unknown: Vec<&v1::AuditEntry> = rows
        .iter()
        .filter(|e| e.method == "Login" && reason(e) == "unknown user")
        .collect();
    assert!(
        unknown.len() < attempts && unknown.len() >= 50,
        "{} rows of {attempts}",
        unknown.len()
    );
    // Each name is cut to a bound.
    assert!(unknown.iter().all(|e| e.actor.len() <= 64));
    let text = s.server.http_get("/metrics").await.1;
    assert_metric(
        &text,
        "posfleet_logins_total{result=\"unknown_user\"}",
        attempts as f64,
    );
    assert!(common::metric_sample(&text, "posfleet_audit_suppressed_total").unwrap() > 0.0);
    s.finish().await;
}

on_both_backends!(
    a_new_user_sets_up_logs_in_and_calls_within_their_role,
    wrong_credentials_are_refused_and_a_code_works_once,
    a_recovery_code_works_once,
    failed_logins_lock_the_user_until_an_admin_unlocks_them,
    sessions_end_by_expiry_logout_or_disabling,
    the_last_admin_and_oneself_cannot_be_disabled,
    a_users_role_and_scope_change_from_their_next_call,
    a_reset_user_sets_up_again_and_setup_codes_work_once,
    expired_or_unknown_setups_are_refused,
    logins_are_rate_limited_per_source,
    a_scoped_user_stays_in_their_stores,
    the_audit_log_names_the_person_and_filters_by_user,
    failed_logins_for_unknown_names_are_bounded,
);
