//! `posfleet login` and `posfleet logout`: a person's session with the
//! control plane (SessionService). Login asks for the password and a code
//! from the authenticator app (or a recovery code); a user still to be
//! set up gives their setup code instead, chooses a password, enrols the
//! app from a QR code and gets their recovery codes. The session is stored
//! for the next commands (`session_file`).

use anyhow::{Context, bail};
use clap::Args;
use posfleet_proto::v1;
use posfleet_proto::v1::session_service_client::SessionServiceClient;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

use crate::prompt::Answers;
use crate::session_file::{self, StoredSession};
use crate::view::time;
use crate::{Output, Server, call_error, show};

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Who logs in; by default the user of the stored session.
    #[arg(long)]
    user: Option<String>,
    /// Ask for a session shorter than the control plane's
    /// `session_lifetime_seconds` (which is also the longest), in hours.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=8784))]
    session_hours: Option<u64>,
}

/// What `login` prints once logged in.
#[derive(Debug, Serialize)]
pub struct LoginView {
    pub server: String,
    pub user: String,
    pub role: String,
    /// Store labels the user is confined to (`region=eu`); empty when unscoped.
    pub scope: String,
    pub expires_at: String,
    pub session_file: PathBuf,
    /// Only right after a setup: single-use codes standing in for a TOTP
    /// code, shown once.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recovery_codes: Vec<String>,
}

/// A SessionService client for `server`; `token` (a session's) for Logout.
pub struct Sessions {
    client: SessionServiceClient<Channel>,
    server: String,
}

impl Sessions {
    pub fn connect(server: &Server) -> anyhow::Result<Sessions> {
        Ok(Sessions {
            client: SessionServiceClient::new(server.channel()?),
            server: server.url.clone(),
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(crate::CALL_TIMEOUT);
        request
    }

    fn answer<T>(&self, answer: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
        answer
            .map(tonic::Response::into_inner)
            .map_err(|status| call_error(&self.server, status))
    }

    pub async fn login(&mut self, request: v1::LoginRequest) -> anyhow::Result<v1::LoginResponse> {
        let request = self.request(request);
        let answer = self.client.login(request).await;
        self.answer(answer)
    }

    async fn complete_setup(
        &mut self,
        request: v1::CompleteSetupRequest,
    ) -> anyhow::Result<v1::CompleteSetupResponse> {
        let request = self.request(request);
        let answer = self.client.complete_setup(request).await;
        self.answer(answer)
    }
}

/// Whether a password answer is a setup code (`posfleet user create`,
/// `user reset`): at least [`SETUP_CODE_MIN_GROUPS`] groups of four base32
/// characters joined by `-`, spaces and case ignored, as the control plane
/// reads it. A setup code is sent with no TOTP code, so none is asked for.
/// (Recovery codes are shorter, and are typed where the code is asked.)
fn is_setup_code(answer: &str) -> bool {
    let typed: String = answer
        .chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect();
    let groups: Vec<&str> = typed.split('-').collect();
    groups.len() >= SETUP_CODE_MIN_GROUPS
        && groups.iter().all(|g| {
            g.len() == 4
                && g.bytes()
                    .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        })
}

/// Setup codes have 8 groups (160 bits), recovery codes 5.
const SETUP_CODE_MIN_GROUPS: usize = 6;

pub async fn login(
    server: &Server,
    config_dir: &Path,
    args: LoginArgs,
    output: Output,
) -> anyhow::Result<()> {
    let user = match args.user {
        Some(user) => user,
        None => match session_file::load(config_dir).ok().flatten() {
            Some(stored) => stored.user,
            None => bail!("who logs in? pass --user NAME"),
        },
    };
    let session_seconds = args.session_hours.map_or(0, |h| h * 3600);
    let mut answers = Answers::from_stdin();
    let mut sessions = Sessions::connect(server)?;
    let secret = answers.secret(&format!(
        "Password for {user} on {} (a new user: the setup code): ",
        server.url
    ))?;
    let code = if is_setup_code(&secret) {
        String::new()
    } else {
        answers.visible("Code from your authenticator app, or a recovery code: ")?
    };
    let answer = sessions
        .login(v1::LoginRequest {
            user: user.clone(),
            password: secret,
            code,
            session_seconds,
        })
        .await?;
    let (session, recovery_codes) = match answer.result {
        Some(v1::login_response::Result::Session(session)) => (session, Vec::new()),
        Some(v1::login_response::Result::Setup(challenge)) => {
            let done = setup(
                &mut sessions,
                &mut answers,
                &user,
                challenge,
                session_seconds,
                output,
            )
            .await?;
            (done.session.unwrap_or_default(), done.recovery_codes)
        }
        None => bail!("the control plane answered the login with neither a session nor a setup"),
    };
    let stored = StoredSession {
        server: server.url.clone(),
        user: session.user.clone(),
        role: session.role.clone(),
        token: session.token.clone(),
        expires_at_unix_ms: session.expires_at_unix_ms,
    };
    let session_file = session_file::save(config_dir, &stored)?;
    let view = LoginView {
        server: stored.server,
        user: stored.user,
        role: stored.role,
        scope: crate::view::scope(&session.scope),
        expires_at: time(stored.expires_at_unix_ms),
        session_file,
        recovery_codes,
    };
    show(output, &view, || login_text(&view))
}

fn login_text(view: &LoginView) -> String {
    let mut text = String::new();
    if !view.recovery_codes.is_empty() {
        text.push_str(
            "\nRecovery codes: store these now, somewhere other than your phone (a password \
             manager, a sealed envelope). Each one stands in for a code from the app once, \
             if you lose it. They are not shown again.\n",
        );
        for code in &view.recovery_codes {
            text.push_str(&format!("  {code}\n"));
        }
        text.push('\n');
    }
    let scope = if view.scope.is_empty() {
        String::new()
    } else {
        format!(", confined to stores with {}", view.scope)
    };
    text.push_str(&format!(
        "Logged in to {} as {} ({}{scope}) until {}; the session is in {}.\n",
        view.server,
        view.user,
        view.role,
        view.expires_at,
        view.session_file.display()
    ));
    text
}

/// The first login of a new (or reset) user: a password, the
/// authenticator app, a code from it to prove it works.
async fn setup(
    sessions: &mut Sessions,
    answers: &mut Answers,
    user: &str,
    challenge: v1::SetupChallenge,
    session_seconds: u64,
    output: Output,
) -> anyhow::Result<v1::CompleteSetupResponse> {
    // For people on stdout; with --output json on stderr, so that stdout
    // holds the result's JSON alone.
    let say = |text: &str| match output {
        Output::Table => println!("{text}"),
        Output::Json => eprintln!("{text}"),
    };
    let min_chars = challenge.min_password_chars as usize;
    say(&format!(
        "Setting up {user}: choose a password (at least {min_chars} characters), then enrol an \
         authenticator app. Finish before {}.",
        time(challenge.expires_at_unix_ms)
    ));
    let new_password = new_password(answers, min_chars)?;
    say(&enrolment_text(&challenge));
    let code = answers.visible("Code now shown by the app for posfleet: ")?;
    sessions
        .complete_setup(v1::CompleteSetupRequest {
            setup_token: challenge.setup_token,
            new_password,
            code,
            session_seconds,
        })
        .await
        .context("setup not finished (run posfleet login again with the same setup code)")
}

/// Asks for the new password twice; at a terminal, again when the two
/// differ or it is too short.
fn new_password(answers: &mut Answers, min_chars: usize) -> anyhow::Result<String> {
    for _ in 0..3 {
        let password = answers.secret("New password: ")?;
        let again = answers.secret("The new password again: ")?;
        let problem = if password != again {
            "the two passwords differ"
        } else if password.chars().count() < min_chars {
            "the password is too short"
        } else {
            return Ok(password);
        };
        if !answers.interactive() {
            bail!("{problem} (at least {min_chars} characters)");
        }
        eprintln!("{problem}; again (at least {min_chars} characters).");
    }
    bail!("no new password after 3 tries")
}

/// The QR code an authenticator app scans, the same as a URI, and the
/// secret to type in by hand.
fn enrolment_text(challenge: &v1::SetupChallenge) -> String {
    let qr = qr_code(&challenge.otpauth_uri).unwrap_or_default();
    format!(
        "Scan this with an authenticator app (Google Authenticator, FreeOTP, 1Password, …):\n\n\
         {qr}\n\nOr open: {}\nOr type in the secret: {}\n",
        challenge.otpauth_uri,
        grouped(&challenge.totp_secret)
    )
}

/// `text` as a QR code in Unicode half blocks (two modules a character),
/// light on dark as terminals are: dark modules are left blank, light ones
/// and the quiet zone drawn. `None` if it does not fit in a QR code.
fn qr_code(text: &str) -> Option<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

/// `JBSWY3DPEHPK3PXP` → `JBSW Y3DP EHPK 3PXP`, easier to type.
fn grouped(secret: &str) -> String {
    secret
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `posfleet logout`: ends the session on the server and removes the file.
/// The file goes whatever the server says: a session that cannot be ended
/// there (unreachable, already ended) is at least no longer stored here.
pub async fn logout(server: &Server, config_dir: &Path) -> anyhow::Result<()> {
    let path = session_file::path(config_dir);
    let stored = match session_file::load(config_dir) {
        Ok(Some(stored)) => stored,
        Ok(None) => {
            println!("Not logged in (no session in {}).", path.display());
            return Ok(());
        }
        Err(error) => {
            session_file::remove(config_dir)?;
            println!("Removed {}: {error:#}.", path.display());
            return Ok(());
        }
    };
    let now = chrono::Utc::now().timestamp_millis();
    let ended = if stored.expired(now) {
        Err(format!(
            "the session had expired at {}",
            time(stored.expires_at_unix_ms)
        ))
    } else {
        // The token goes to the server that issued it, with this
        // invocation's way of trusting it.
        let own = Server {
            url: stored.server.clone(),
            ..server.clone()
        };
        end_on_server(&own, &stored.token).await
    };
    session_file::remove(config_dir)?;
    match ended {
        Ok(()) => println!(
            "Logged {} out of {}: the session is ended and {} removed.",
            stored.user,
            stored.server,
            path.display()
        ),
        Err(why) => println!(
            "Logged {} out: {why}; removed {}.",
            stored.user,
            path.display()
        ),
    }
    Ok(())
}

/// Logout on the server; `Err` says why the session was not ended there.
async fn end_on_server(server: &Server, token: &str) -> Result<(), String> {
    let mut sessions = Sessions::connect(server).map_err(|e| format!("{e:#}"))?;
    let mut request = sessions.request(v1::LogoutRequest {});
    let authorization = format!("Bearer {token}")
        .parse()
        .map_err(|_| "the stored token cannot be sent".to_string())?;
    request
        .metadata_mut()
        .insert(posfleet_proto::AUTHORIZATION, authorization);
    match sessions.client.logout(request).await {
        Ok(_) => Ok(()),
        Err(status) if status.code() == tonic::Code::Unauthenticated => Err(format!(
            "the session had already ended on the server ({})",
            status.message()
        )),
        Err(status) => Err(format!(
            "{:#}; the session was not ended on the server and lasts until it expires",
            call_error(&sessions.server, status)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commands_parse() {
        crate::check_command_lines(
            &[
                "posfleet login",
                "posfleet login --user alice",
                "posfleet login --user alice --session-hours 2",
                "posfleet logout",
                "posfleet --config-dir /x login --user alice",
            ],
            &[
                "posfleet login --user",
                "posfleet login --session-hours 0",
                "posfleet login --session-hours soon",
                "posfleet login --password x",
            ],
        );
    }

    #[test]
    fn setup_codes_are_told_from_passwords() {
        for (answer, setup) in [
            ("k2vq-7mxa-abcd-efgh-ijkl-mnop-qrst-uvwx", true),
            (" K2VQ-7MXA-ABCD-EFGH-IJKL-MNOP-QRST-UVWX\n", true),
            ("k2vq-7mxa-abcd-efgh-ijkl", false),
            ("k2vq-7mxa-abcd-efgh-ijkl-mnop-qrst-uvw1", false),
            ("correct horse battery staple", false),
            ("", false),
        ] {
            assert_eq!(is_setup_code(answer), setup, "{answer}");
        }
    }

    #[test]
    fn the_enrolment_shows_a_qr_code_the_uri_and_the_secret() {
        let text = enrolment_text(&v1::SetupChallenge {
            totp_secret: "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP".into(),
            otpauth_uri: "otpauth://totp/posfleet:alice?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP&issuer=posfleet".into(),
            ..Default::default()
        });
        assert!(text.contains("Or open: otpauth://totp/posfleet:alice?secret="));
        assert!(text.contains("JBSW Y3DP EHPK 3PXP JBSW"));
        // Half blocks, every line as wide as the others (a square code).
        let qr: Vec<&str> = text
            .lines()
            .filter(|l| l.contains('\u{2588}') || l.contains('\u{2580}'))
            .collect();
        assert!(qr.len() > 10, "{text}");
        let width = qr[0].chars().count();
        assert!(qr.iter().all(|l| l.chars().count() == width));
        assert!(
            (qr.len() * 2).abs_diff(width) <= 1,
            "square: {width}x{}",
            qr.len() * 2
        );
    }

    #[test]
    fn recovery_codes_come_with_a_store_them_now_line() {
        let mut view = LoginView {
            server: "https://cp:7400".into(),
            user: "alice".into(),
            role: "deployer".into(),
            scope: String::new(),
            expires_at: "2026-12-03T20:00:00Z".into(),
            session_file: "/home/alice/.config/posfleet/session.json".into(),
            recovery_codes: vec!["abcd-efgh".into(), "ijkl-mnop".into()],
        };
        let text = login_text(&view);
        assert!(text.contains("store these now"), "{text}");
        assert!(text.contains("  ijkl-mnop\n"), "{text}");
        view.recovery_codes.clear();
        assert_eq!(
            login_text(&view),
            "Logged in to https://cp:7400 as alice (deployer) until 2026-12-03T20:00:00Z; \
             the session is in /home/alice/.config/posfleet/session.json.\n"
        );
    }
}
