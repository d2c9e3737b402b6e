//! Real agents against a control plane serving TLS: enrollment over
//! server-authenticated TLS (trusting the fleet CA's certificate, or its
//! pinned fingerprint) gets the till a certificate, and from then on every
//! heartbeat, progress report and `/repo/` download is mutual TLS.
//!
//! The fleet is set up with the CLI, which trusts the fleet CA; tests read
//! the fleet through a small `AdminService` client over TLS.

use posfleet_e2e::fleet::{Fleet, logged};
use posfleet_e2e::{Process, enrolled_device_id, eventually};
use posfleet_pki::rustls::pki_types::CertificateDer;
use posfleet_proto::v1;
use posfleet_proto::v1::admin_service_client::AdminServiceClient;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(40);
const STORE: &str = "lyon-01";

/// A fleet whose control plane serves TLS, with `STORE`, an enrollment
/// token for `tills` tills and pos-app 1.0.0 assigned to the store.
struct TlsFleet {
    fleet: Fleet,
    token: String,
    runtime: tokio::runtime::Runtime,
}

impl TlsFleet {
    fn start(tills: usize) -> TlsFleet {
        let fleet = Fleet::builder()
            .control_plane_args(&["--tls-server-name", "127.0.0.1"])
            .start();
        assert!(fleet.cp.tls);
        fleet.create_store(STORE, "UTC");
        let token = fleet.enrollment_token(STORE, tills);
        fleet.publish("1.0.0", true, 0);
        fleet.assign(STORE, "pos-app@1.0.0");
        TlsFleet {
            fleet,
            token,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    /// The fleet's trust bundle, which the control plane keeps current:
    /// its fleet CA (and, during a CA rotation, the previous one).
    fn ca_file(&self) -> PathBuf {
        self.fleet.cp.ca_file()
    }

    fn ca_certificates(&self) -> Vec<CertificateDer<'static>> {
        let pem = std::fs::read(self.ca_file()).unwrap();
        posfleet_pki::certificates_from_pem(&pem, "the fleet CA").unwrap()
    }

    /// Starts an agent in `data`, reaching the control plane and its
    /// repository over https, with `trust` (`--ca-cert-path FILE` or
    /// `--ca-fingerprint HEX`) and no P2P, so every bundle byte comes
    /// from `/repo/`.
    fn agent(&self, data: &Path, token: &str, trust: &[&str]) -> Process {
        let repository = format!("https://{}/repo/", self.fleet.cp.http_address);
        let mut extra = vec!["--p2p-enabled", "false"];
        extra.extend_from_slice(trust);
        let mut args = self.fleet.agent_args(Some(&repository), &extra);
        // The fleet's own trust flag gives way to the test's.
        if let Some(at) = args.iter().position(|a| a == "--ca-cert-path") {
            args.drain(at..at + 2);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let url = format!("https://{}", self.fleet.cp.grpc_address);
        posfleet_e2e::start_agent(&url, data, token, &args)
    }

    /// Starts a till trusting the fleet CA's file, and waits until it has
    /// enrolled and runs: its data dir, its agent, its device id.
    fn enrolled_till(&self) -> (PathBuf, Process, String) {
        let data = self.fleet.dir.path().join("till-0");
        let ca_file = self.ca_file();
        let agent = self.agent(
            &data,
            &self.token,
            &["--ca-cert-path", ca_file.to_str().unwrap()],
        );
        let device = eventually("the till enrolled", TIMEOUT, || enrolled_device_id(&data));
        agent.wait_for_log("Agent running.", TIMEOUT);
        (data, agent, device)
    }

    /// An `AdminService` call over TLS, trusting the fleet CA.
    fn admin<T>(
        &self,
        call: impl AsyncFnOnce(
            &mut AdminServiceClient<tonic::transport::Channel>,
            tonic::metadata::AsciiMetadataValue,
        ) -> Result<T, tonic::Status>,
    ) -> T {
        let config = posfleet_pki::client_config(&self.ca_certificates(), None).unwrap();
        let url = format!("https://{}", self.fleet.cp.grpc_address);
        let endpoint = tonic::transport::Endpoint::from_shared(url).unwrap();
        let token = std::fs::read_to_string(self.fleet.cp.admin_token_file()).unwrap();
        let bearer = format!("Bearer {}", token.trim()).parse().unwrap();
        self.runtime.block_on(async {
            let mut client = AdminServiceClient::new(posfleet_pki::grpc_channel(
                &endpoint,
                Some(Arc::new(config)),
            ));
            call(&mut client, bearer).await.unwrap()
        })
    }

    fn device(&self, id: &str) -> v1::Device {
        self.admin(async |client, bearer| {
            let mut request = tonic::Request::new(v1::GetDeviceRequest { id: id.to_string() });
            request.metadata_mut().insert("authorization", bearer);
            Ok(client.get_device(request).await?.into_inner())
        })
    }
}

#[test]
fn a_till_enrolls_over_tls_then_heartbeats_and_installs_over_mutual_tls() {
    let tls = TlsFleet::start(1);
    let (data, mut agent, device) = tls.enrolled_till();
    let ca_file = tls.ca_file();
    let trust = ["--ca-cert-path", ca_file.to_str().unwrap()];
    for file in ["device.crt", "trust.pem"] {
        assert!(data.join(file).is_file(), "{file} saved at enrollment");
    }
    let running = agent.wait_for_log("Agent running.", TIMEOUT);
    assert_eq!(running["tls"], true, "{running}");
    // Seen online with its version, and the bundle downloaded over https
    // and installed: heartbeats, reports and /repo/ all went by the
    // certificate.
    let seen = eventually("pos-app 1.0.0 installed, as ops see it", TIMEOUT, || {
        let seen = tls.device(&device);
        (seen.installed_bundles.get("pos-app").map(String::as_str) == Some("1.0.0")).then_some(seen)
    });
    assert_eq!(seen.status, v1::DeviceStatus::Online as i32, "{seen:?}");
    assert_eq!(seen.agent_version, posfleet_agent::AGENT_VERSION);
    assert!(data.join("slots/pos-app/current/bin/pos-app").is_file());
    let reported = seen
        .bundles
        .iter()
        .find(|b| b.name == "pos-app")
        .and_then(|b| b.status.clone())
        .expect("a reported status");
    assert_eq!(reported.active_version, "1.0.0", "{reported:?}");

    // Started again, it goes straight to mutual TLS with what it saved.
    agent.terminate();
    let before = tls.device(&device).last_seen_unix_ms;
    let mut agent = tls.agent(&data, "", &trust);
    agent.wait_for_log("Agent running.", TIMEOUT);
    eventually("a heartbeat after the restart", TIMEOUT, || {
        (tls.device(&device).last_seen_unix_ms > before).then_some(())
    });
    assert!(logged(&agent, "Enrolled.").is_empty());

    // Revoked: refused at the handshake, said so, and the agent keeps
    // retrying rather than stopping.
    tls.admin(async |client, bearer| {
        let mut request = tonic::Request::new(v1::RevokeDeviceRequest {
            device_id: device.clone(),
            reason: "stolen".into(),
        });
        request.metadata_mut().insert("authorization", bearer);
        client.revoke_device(request).await
    });
    let revoked =
        "This till's certificate is revoked: the control plane refuses it. Retrying with backoff.";
    let deadline = std::time::Instant::now() + TIMEOUT;
    while logged(&agent, revoked).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the revocation not logged twice; the agent's log:\n{}",
            agent.lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.check_running().unwrap();
}

#[test]
fn a_till_given_the_ca_fingerprint_enrolls_and_a_wrong_one_is_refused() {
    let tls = TlsFleet::start(2);
    let fingerprint = posfleet_pki::ca::fingerprint(&tls.ca_certificates()[0]);
    let data = tls.fleet.dir.path().join("till-pinned");
    // What a stop between saving the certificate and the enrollment leaves:
    // a certificate file and no enrollment. The till enrolls again.
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("device.crt"), "left over").unwrap();
    let agent = tls.agent(&data, &tls.token, &["--ca-fingerprint", &fingerprint]);
    let device = eventually("the pinned till enrolled", TIMEOUT, || {
        enrolled_device_id(&data)
    });
    agent.wait_for_log("Agent running.", TIMEOUT);
    let certificate = std::fs::read(data.join("device.crt")).unwrap();
    assert!(posfleet_pki::certificates_from_pem(&certificate, "device.crt").is_ok());
    eventually("the pinned till heartbeating", TIMEOUT, || {
        (tls.device(&device).agent_version == posfleet_agent::AGENT_VERSION).then_some(())
    });

    // Another fingerprint: the till says what it was shown and does not
    // enroll.
    let wrong = "0f".repeat(32);
    let other = tls.fleet.dir.path().join("till-wrong-pin");
    let mut refused = tls.agent(&other, &tls.token, &["--ca-fingerprint", &wrong]);
    let logged_error = refused.wait_for_log("Cannot enroll over TLS.", TIMEOUT);
    let error = logged_error["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("no CA with the pinned fingerprint {wrong}"))
            && error.contains(&fingerprint),
        "{logged_error}"
    );
    refused.check_running().unwrap();
    assert_eq!(enrolled_device_id(&other), None);
    assert!(!other.join("device.crt").exists());
}

#[test]
fn a_till_renews_its_certificate_once_two_thirds_of_its_life_have_passed() {
    let tls = TlsFleet::start(1);
    let (data, mut agent, device) = tls.enrolled_till();
    agent.terminate();
    let ca_file = tls.ca_file();
    let trust = ["--ca-cert-path", ca_file.to_str().unwrap()];

    // Its certificate, as if issued 25 of its 30 days ago, by the same CA.
    let seed: [u8; 32] = std::fs::read(data.join("device.key"))
        .unwrap()
        .try_into()
        .unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let (ca, _) = posfleet_pki::FleetCa::load_or_create(
        &tls.fleet.cp.data_dir.join("tls"),
        std::time::SystemTime::now(),
    )
    .unwrap();
    let day = Duration::from_secs(86_400);
    let aged = ca
        .issue_device(
            &posfleet_pki::certificate_request(&key).unwrap(),
            key.verifying_key().as_bytes(),
            &device,
            STORE,
            30 * day,
            std::time::SystemTime::now() - 25 * day,
        )
        .unwrap();
    std::fs::write(data.join("device.crt"), &aged.pem).unwrap();

    let agent = tls.agent(&data, "", &trust);
    let renewed = agent.wait_for_log("Device certificate renewed.", TIMEOUT);
    assert_eq!(renewed["expired"], false, "{renewed}");
    let saved = std::fs::read(data.join("device.crt")).unwrap();
    let saved = posfleet_pki::certificates_from_pem(&saved, "device.crt").unwrap();
    let identity = posfleet_pki::DeviceIdentity::from_certificate(&saved[0]).unwrap();
    assert_eq!(identity.device_id, device);
    assert_ne!(identity.serial, aged.serial, "a new certificate was saved");
    let now = chrono::Utc::now().timestamp();
    assert!(identity.not_after > now + 29 * 86_400, "{identity:?}");
    // And the till carries on with it.
    let before = tls.device(&device).last_seen_unix_ms;
    eventually("a heartbeat with the new certificate", TIMEOUT, || {
        (tls.device(&device).last_seen_unix_ms > before).then_some(())
    });
    assert_eq!(tls.device(&device).certificate_status, "valid");
}

#[test]
fn tills_move_to_a_new_fleet_ca_by_themselves_and_the_old_one_is_retired() {
    let tls = TlsFleet::start(3);
    let ca_file = tls.ca_file();
    let trust = ["--ca-cert-path", ca_file.to_str().unwrap()];
    let till = |name: &str| {
        let data = tls.fleet.dir.path().join(name);
        let agent = tls.agent(&data, &tls.token, &trust);
        let device = eventually("the till enrolled", TIMEOUT, || enrolled_device_id(&data));
        agent.wait_for_log("Agent running.", TIMEOUT);
        (data, agent, device)
    };
    let (a_data, a, a_id) = till("till-a");
    let (_, b, b_id) = till("till-b");
    // Away (switched off) through the whole rotation.
    let (c_data, mut c, c_id) = till("till-c");
    c.terminate();

    let rotated = tls.fleet.cp.cli_json(&["ca", "rotate"]);
    let fingerprint = |answer: &serde_json::Value, role: &str| {
        answer["authorities"]
            .as_array()
            .unwrap()
            .iter()
            .find(|ca| ca["role"] == role)
            .map(|ca| ca["fingerprint"].as_str().unwrap().to_string())
    };
    let new_ca = fingerprint(&rotated, "active").unwrap();
    assert!(fingerprint(&rotated, "previous").is_some(), "{rotated}");

    // The online tills take the new trust bundle and renew from the new
    // CA at their next heartbeat, with nobody touching them.
    for id in [&a_id, &b_id] {
        eventually("a till renewed from the new CA", TIMEOUT, || {
            (tls.device(id).certificate_ca_fingerprint == new_ca).then_some(())
        });
    }
    a.wait_for_log(
        "New trust bundle from the control plane (a fleet CA was rotated or retired); new connections use it.",
        TIMEOUT,
    );
    let held = std::fs::read(a_data.join("trust.pem")).unwrap();
    assert_eq!(
        posfleet_pki::certificates_from_pem(&held, "trust.pem")
            .unwrap()
            .len(),
        2,
        "the old and the new CA during the rotation"
    );

    // The switched-off till still holds an old certificate: retiring is
    // refused, naming it, until forced.
    let refused = tls.fleet.cp.cli(&["ca", "retire"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains(&c_id), "{stderr}");
    let retired = tls.fleet.cp.cli_json(&["ca", "retire", "--force"]);
    assert_eq!(retired["devices_to_reenroll"], serde_json::json!([c_id]));
    assert_eq!(fingerprint(&retired, "previous"), None);

    // The online tills carry on: the server's certificate now comes from
    // the new CA, which they trust, and they call with their new
    // certificates.
    let since: Vec<i64> = [&a_id, &b_id]
        .iter()
        .map(|id| tls.device(id).last_seen_unix_ms)
        .collect();
    for (id, before) in [&a_id, &b_id].iter().zip(since) {
        eventually("a heartbeat after the retirement", TIMEOUT, || {
            (tls.device(id).last_seen_unix_ms > before + 1000).then_some(())
        });
    }
    assert_eq!(tls.device(&a_id).certificate_status, "valid");

    // The till that was away cannot reach the control plane any more, and
    // its log says why.
    let c = tls.agent(&c_data, "", &trust);
    let failure = c.wait_for_log("Cannot reach the control plane over TLS.", TIMEOUT);
    let error = failure["error"].as_str().unwrap_or_default();
    assert!(error.contains("enroll it again"), "{failure}");
    drop((a, b));
}

#[test]
fn a_till_enrolled_over_plaintext_moves_to_tls_without_enrolling_again() {
    use posfleet_e2e::{ControlPlane, check_ok, start_agent};
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("control-plane");
    let mut plaintext = ControlPlane::start_sqlite(&data_dir);
    assert!(!plaintext.tls);
    check_ok(plaintext.cli(&[
        "store",
        "create",
        STORE,
        "--name",
        "Lyon",
        "--time-zone",
        "UTC",
    ]));
    let token = plaintext.cli_json(&["enroll-token", "create", "--store", STORE])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let till = dir.path().join("till");
    let mut agent = start_agent(&plaintext.url(), &till, &token, &["--p2p-enabled", "false"]);
    let device = eventually("the till enrolled", TIMEOUT, || enrolled_device_id(&till));
    agent.wait_for_log("Agent running.", TIMEOUT);
    agent.terminate();
    plaintext.process.terminate();

    // The control plane turns TLS on, on the same data and addresses; the
    // till is given the fleet CA and the https address.
    let tls = ControlPlane::start(
        &data_dir,
        None,
        &plaintext.grpc_address,
        &plaintext.http_address,
        &[
            "--heartbeat-interval-seconds",
            "1",
            "--tls-server-name",
            "127.0.0.1",
        ],
    );
    assert!(tls.tls);
    let ca_file = tls.ca_file();
    let agent = start_agent(
        &tls.url(),
        &till,
        "",
        &[
            "--p2p-enabled",
            "false",
            "--ca-cert-path",
            ca_file.to_str().unwrap(),
        ],
    );
    agent.wait_for_log(
        "Device certificate obtained: this till, enrolled over plaintext, calls with mutual TLS from now on.",
        TIMEOUT,
    );
    let running = agent.wait_for_log("Agent running.", TIMEOUT);
    assert_eq!(running["device_id"], device.as_str(), "the same device");
    assert!(till.join("device.crt").is_file());
    let before = chrono::Utc::now().timestamp_millis();
    eventually("a heartbeat over mutual TLS", TIMEOUT, || {
        let shown = tls.cli_json(&["device", "show", &device]);
        (shown["last_seen"].as_str().is_some()
            && shown["certificate_status"] == "valid"
            && chrono::DateTime::parse_from_rfc3339(shown["last_seen"].as_str().unwrap())
                .is_ok_and(|seen| seen.timestamp_millis() > before))
        .then_some(())
    });
}
