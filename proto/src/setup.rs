//! A user's first login, as a client makes it: `Login` with the one-time
//! setup code, then `CompleteSetup` with the new password and a code
//! computed from the challenge's TOTP secret ([`crate::totp`]). The demo
//! and the test harnesses set up the first admin with it; a person does
//! the same through `posfleet login`, with an authenticator app.

use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::totp;
use crate::v1::{self, login_response, session_service_client::SessionServiceClient};

/// What a finished setup gives: a session, the recovery codes (shown
/// once), and the TOTP secret the user's codes come from from now on.
#[derive(Debug, Clone)]
pub struct CompletedSetup {
    pub session: v1::Session,
    pub recovery_codes: Vec<String>,
    pub totp_secret: String,
}

/// Sets `user` up with `password`, from their one-time `setup_code`, over
/// `channel` (the control plane's gRPC address).
pub async fn complete_setup(
    channel: Channel,
    user: &str,
    setup_code: &str,
    password: &str,
) -> Result<CompletedSetup, Status> {
    let mut client = SessionServiceClient::new(channel);
    let login = client
        .login(Request::new(v1::LoginRequest {
            user: user.into(),
            password: setup_code.trim().into(),
            ..Default::default()
        }))
        .await?
        .into_inner();
    let Some(login_response::Result::Setup(challenge)) = login.result else {
        return Err(Status::failed_precondition(format!(
            "{user} is set up already: log in with their password and a code"
        )));
    };
    let code = totp::code_now(&challenge.totp_secret)
        .map_err(|e| Status::internal(format!("the setup challenge's secret: {e}")))?;
    let done = client
        .complete_setup(Request::new(v1::CompleteSetupRequest {
            setup_token: challenge.setup_token,
            new_password: password.into(),
            code,
            session_seconds: 0,
        }))
        .await?
        .into_inner();
    let session = done
        .session
        .ok_or_else(|| Status::internal("CompleteSetup answered without a session"))?;
    Ok(CompletedSetup {
        session,
        recovery_codes: done.recovery_codes,
        totp_secret: challenge.totp_secret,
    })
}
