//! The control plane serving TLS: enrollment over server-authenticated TLS
//! issues the till a certificate, every later call is mutual TLS and the
//! device is the one its certificate names, and a revoked till is cut off.

mod common;

use common::*;
use ed25519_dalek::SigningKey;
use posfleet_pki::FleetCa;
use posfleet_proto::v1;
use posfleet_proto::v1::agent_service_client::AgentServiceClient;
use std::time::{Duration, SystemTime};
use tonic::Code;

async fn tls_setup() -> Setup {
    setup(Backend::Sqlite, |config| {
        config.tls_server_names = vec!["127.0.0.1".into()];
    })
    .await
}

/// Enrolls a new till in `store` over TLS: its key, and the response.
async fn enroll(setup: &Setup, store: &str) -> (SigningKey, v1::EnrollResponse) {
    let mut admin = setup.server.admin().await;
    let token = admin.token(store, 1, 0).await.unwrap().secret;
    let key = new_key();
    let response = setup
        .server
        .agent()
        .await
        .enroll(enroll_request(&key, &token, "SN-1"))
        .await
        .unwrap()
        .into_inner();
    (key, response)
}

fn as_device(
    setup: &Setup,
    key: &SigningKey,
    certificate_pem: &str,
) -> AgentServiceClient<tonic::transport::Channel> {
    AgentServiceClient::new(setup.server.tls_channel(Some((certificate_pem, key))))
}

/// A call refused below gRPC (the connection or its TLS handshake), with
/// `reason` in the error's chain.
fn assert_transport_error<T: std::fmt::Debug>(result: Result<T, tonic::Status>, reason: &str) {
    let status = result.expect_err("the connection should be refused");
    let chain = format!("{status:?}");
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Internal
        ),
        "{chain}"
    );
    assert!(chain.contains(reason), "`{reason}` should be in {chain}");
}

fn hello() -> v1::HeartbeatRequest {
    v1::HeartbeatRequest {
        agent_version: "1.0.0".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn enrollment_issues_a_certificate_and_later_calls_go_by_it() {
    let setup = tls_setup().await;
    setup.server.admin().await.store("lyon-01").await;
    let (key, enrolled) = enroll(&setup, "lyon-01").await;
    assert!(
        enrolled.device_credential.is_empty(),
        "no bearer secret over TLS"
    );
    let identity = posfleet_pki::DeviceIdentity::from_certificate(
        &posfleet_pki::certificates_from_pem(enrolled.device_certificate_pem.as_bytes(), "cert")
            .unwrap()[0],
    )
    .unwrap();
    assert_eq!(identity.device_id, enrolled.device_id);
    assert_eq!(identity.store_id, "lyon-01");
    let days = (identity.not_after - identity.not_before) / 86_400;
    assert_eq!(days, 30, "the default device_cert_validity_days");
    assert!(enrolled.trust_bundle_pem.contains("BEGIN CERTIFICATE"));

    // Without the certificate: refused, saying what to present.
    assert_status(
        setup.server.agent().await.heartbeat(hello()).await,
        Code::Unauthenticated,
        "no device certificate",
    );
    // A credential header is no way in over TLS.
    assert_status(
        setup
            .server
            .agent()
            .await
            .heartbeat(heartbeat(
                &format!("{}.secret", enrolled.device_id),
                hello(),
            ))
            .await,
        Code::Unauthenticated,
        "no device certificate",
    );
    // With it: the heartbeat counts for the device the certificate names.
    as_device(&setup, &key, &enrolled.device_certificate_pem)
        .heartbeat(hello())
        .await
        .unwrap();
    let mut admin = setup.server.admin().await;
    eventually(&mut admin, &enrolled.device_id, |d| {
        d.agent_version == "1.0.0"
    })
    .await;
    setup.finish().await;
}

#[tokio::test]
async fn an_enrollment_without_a_valid_request_is_refused_and_keeps_the_token() {
    let setup = tls_setup().await;
    let mut admin = setup.server.admin().await;
    admin.store("lyon-01").await;
    let token = admin.token("lyon-01", 1, 0).await.unwrap().secret;
    let mut agent = setup.server.agent().await;
    let key = new_key();

    let mut without = enroll_request(&key, &token, "SN-1");
    without.certificate_request.clear();
    assert_status(
        agent.enroll(without).await,
        Code::InvalidArgument,
        "certificate_request",
    );
    // A request for another key than the one that signed the proof.
    let mut other_key = enroll_request(&key, &token, "SN-1");
    other_key.certificate_request = posfleet_pki::certificate_request(&new_key()).unwrap();
    assert_status(
        agent.enroll(other_key).await,
        Code::InvalidArgument,
        "another key",
    );
    let mut garbage = enroll_request(&key, &token, "SN-1");
    garbage.certificate_request = vec![0x30, 0x03, 1, 2, 3];
    assert_status(
        agent.enroll(garbage).await,
        Code::InvalidArgument,
        "certificate_request",
    );
    // The one use of the token is still there.
    agent
        .enroll(enroll_request(&key, &token, "SN-1"))
        .await
        .unwrap();
    setup.finish().await;
}

#[tokio::test]
async fn a_certificate_naming_another_store_than_the_devices_is_refused() {
    let setup = tls_setup().await;
    let mut admin = setup.server.admin().await;
    admin.store("lyon-01").await;
    let (key, enrolled) = enroll(&setup, "lyon-01").await;
    // Made with the fleet CA's own key (as a compromised issuing process
    // might): the device is right, the store is not.
    let tls = setup.server.config.data_dir.join("tls");
    let ca = FleetCa::load_or_create(&tls, SystemTime::now()).unwrap().0;
    let forged = ca
        .issue_device(
            &posfleet_pki::certificate_request(&key).unwrap(),
            key.verifying_key().as_bytes(),
            &enrolled.device_id,
            "paris-09",
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .unwrap();
    assert_status(
        as_device(&setup, &key, &forged.pem)
            .heartbeat(hello())
            .await,
        Code::Unauthenticated,
        "names store paris-09",
    );
    setup.finish().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let setup = tls_setup().await;
    setup.server.admin().await.store("lyon-01").await;
    let (key, enrolled) = enroll(&setup, "lyon-01").await;
    let (other, _) = FleetCa::create("another CA", SystemTime::now()).unwrap();
    let foreign = other
        .issue_device(
            &posfleet_pki::certificate_request(&key).unwrap(),
            key.verifying_key().as_bytes(),
            &enrolled.device_id,
            "lyon-01",
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .unwrap();
    assert_transport_error(
        as_device(&setup, &key, &foreign.pem)
            .heartbeat(hello())
            .await,
        "UnknownCA",
    );
    setup.finish().await;
}

#[tokio::test]
async fn revoking_a_till_cuts_its_open_connection_and_refuses_its_next_handshake() {
    let setup = tls_setup().await;
    let mut admin = setup.server.admin().await;
    admin.store("lyon-01").await;
    let (key, enrolled) = enroll(&setup, "lyon-01").await;
    let mut till = as_device(&setup, &key, &enrolled.device_certificate_pem);
    till.heartbeat(hello()).await.unwrap();

    admin
        .client
        .revoke_device(admin.req(v1::RevokeDeviceRequest {
            device_id: enrolled.device_id.clone(),
            reason: "stolen".into(),
        }))
        .await
        .unwrap();
    // The same channel: its connection was cut, and connecting again is
    // refused at the handshake.
    till.heartbeat(hello()).await.expect_err("cut off");
    assert_transport_error(till.heartbeat(hello()).await, "CertificateRevoked");
    assert_transport_error(
        as_device(&setup, &key, &enrolled.device_certificate_pem)
            .heartbeat(hello())
            .await,
        "CertificateRevoked",
    );
    setup.finish().await;
}

#[tokio::test]
async fn a_plaintext_client_on_the_tls_port_gets_a_clear_error() {
    let tls = tls_setup().await;
    let plain_url = tls.server.grpc_url.replace("https://", "http://");
    let plain = tonic::transport::Endpoint::from_shared(plain_url).unwrap();
    let refused = AgentServiceClient::new(posfleet_pki::grpc_channel(&plain, None))
        .heartbeat(hello())
        .await;
    assert_transport_error(refused, "this port serves TLS: connect with https://");
    // An HTTP/1 client (a scraper set to http://) gets a 400 saying so.
    let (code, body) = tls.server.http_get("/metrics").await;
    assert_eq!(code, 400);
    assert!(body.contains("this port serves TLS"), "{body}");
    tls.finish().await;
}

#[tokio::test]
async fn a_tls_client_on_a_plaintext_port_gets_a_clear_error() {
    let plain_server = setup(Backend::Sqlite, |_| {}).await;
    let trusted = posfleet_pki::certificates_from_pem(
        FleetCa::create("any", SystemTime::now())
            .unwrap()
            .0
            .certificates_pem()
            .as_bytes(),
        "CA",
    )
    .unwrap();
    let config = posfleet_pki::client_config(&trusted, None).unwrap();
    let url = plain_server.server.grpc_url.replace("http://", "https://");
    let endpoint = tonic::transport::Endpoint::from_shared(url).unwrap();
    let refused = AgentServiceClient::new(posfleet_pki::grpc_channel(
        &endpoint,
        Some(std::sync::Arc::new(config)),
    ))
    .heartbeat(hello())
    .await;
    assert_transport_error(refused, "answered in plaintext, not TLS");
    plain_server.finish().await;
}

/// `/repo/` path of a published bundle's bytes.
fn target_path(bundle: &v1::Bundle) -> String {
    let path = match bundle.target.rsplit_once('/') {
        Some((dir, file)) => format!("{dir}/{}.{file}", bundle.sha256),
        None => format!("{}.{}", bundle.sha256, bundle.target),
    };
    format!("/repo/targets/{path}")
}

#[tokio::test]
async fn the_repository_serves_each_till_only_what_its_store_is_meant_to_have() {
    use posfleet_bundle::manifest::Kind;
    use posfleet_proto::v1::assign_bundle_request::Target;
    let setup = tls_setup().await;
    let mut admin = setup.server.admin().await;
    admin.store("lyon-01").await;
    admin.store("paris-09").await;
    let key = admin.init_repository().await;
    let lyon_catalog = admin
        .publish(&key, "catalog-lyon", "2026.1.0", Kind::Catalog, &["*"])
        .await;
    let paris_catalog = admin
        .publish(&key, "catalog-paris", "2026.1.0", Kind::Catalog, &["*"])
        .await;
    for (store, bundle) in [("lyon-01", &lyon_catalog), ("paris-09", &paris_catalog)] {
        let req = admin.req(v1::AssignBundleRequest {
            target: Some(Target::StoreId(store.into())),
            name: bundle.name.clone(),
            version: bundle.version.clone(),
            download_ahead: None,
            emergency: false,
        });
        admin.client.assign_bundle(req).await.unwrap();
    }
    let (till_key, till) = enroll(&setup, "lyon-01").await;
    let me = Some((till.device_certificate_pem.as_str(), &till_key));

    // Metadata: any enrolled till, nobody without a certificate.
    let (code, body) = setup.server.https_get("/repo/timestamp.json", me).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = setup.server.https_get("/repo/timestamp.json", None).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("device certificate"), "{body}");
    // Its store's catalog, and its chunk list.
    let (code, body) = setup
        .server
        .https_get(&target_path(&lyon_catalog), me)
        .await;
    assert_eq!(code, 200, "{body}");
    let chunks = format!("/repo/chunks/{}", lyon_catalog.chunks_sha256);
    assert_eq!(setup.server.https_get(&chunks, me).await.0, 200);
    // Another store's catalog is refused, saying why.
    let (code, body) = setup
        .server
        .https_get(&target_path(&paris_catalog), me)
        .await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("is not assigned to store lyon-01"), "{body}");
    let chunks = format!("/repo/chunks/{}", paris_catalog.chunks_sha256);
    assert_eq!(setup.server.https_get(&chunks, me).await.0, 403);
    // Health and metrics need no certificate.
    assert_eq!(setup.server.https_get("/healthz", None).await.0, 200);

    // Revoked, the till gets nothing more, not even its own store's
    // catalog: its handshake is refused.
    admin
        .client
        .revoke_device(admin.req(v1::RevokeDeviceRequest {
            device_id: till.device_id.clone(),
            reason: "stolen".into(),
        }))
        .await
        .unwrap();
    let mut config = posfleet_pki::client_config(
        setup.server.trusted.as_ref().unwrap(),
        Some((
            posfleet_pki::certificates_from_pem(till.device_certificate_pem.as_bytes(), "c")
                .unwrap(),
            posfleet_pki::private_key_der(&till_key).unwrap(),
        )),
    )
    .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let socket = tokio::net::TcpStream::connect(setup.server.http_addr)
        .await
        .unwrap();
    let name = posfleet_pki::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let answer = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, socket)
            .await?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            target_path(&lyon_catalog)
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    }
    .await;
    let error = answer.expect_err("no answer for a revoked till");
    assert!(error.to_string().contains("CertificateRevoked"), "{error}");
    setup.finish().await;
}

/// Moves the end of `device`'s certificate, as the database records it.
async fn certificate_ended(setup: &Setup, device: &str, days_ago: i64) {
    use sqlx::Executor;
    sqlx::any::install_default_drivers();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&setup.db.url)
        .await
        .unwrap();
    let at = posfleet_control_plane::now_ms() - days_ago * 86_400_000;
    conn.execute(
        format!("UPDATE devices SET certificate_not_after_ms = {at} WHERE id = '{device}'")
            .as_str(),
    )
    .await
    .unwrap();
}

fn renewal_proof(
    key: &SigningKey,
    device: &str,
    signed_at: i64,
    request: Vec<u8>,
) -> v1::RenewCertificateRequest {
    use ed25519_dalek::Signer;
    let payload = posfleet_proto::renew_signing_payload(device, signed_at, &request);
    v1::RenewCertificateRequest {
        signature: key.sign(&payload).to_bytes().to_vec(),
        certificate_request: request,
        device_id: device.into(),
        signed_at_unix_ms: signed_at,
    }
}

#[tokio::test]
async fn a_till_renews_with_its_certificate_and_after_it_ends_within_the_grace_period() {
    let setup = tls_setup().await;
    let mut admin = setup.server.admin().await;
    admin.store("lyon-01").await;
    let (key, enrolled) = enroll(&setup, "lyon-01").await;
    let id = enrolled.device_id.clone();
    let shown = admin.device(&id).await.unwrap();
    assert_eq!(shown.certificate_status, "valid");
    assert!(shown.certificate_not_after_unix_ms > posfleet_control_plane::now_ms());

    // With its certificate: a new one, same device, new serial.
    let request = posfleet_pki::certificate_request(&key).unwrap();
    let renewed = as_device(&setup, &key, &enrolled.device_certificate_pem)
        .renew_certificate(v1::RenewCertificateRequest {
            certificate_request: request.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let serial = |pem: &str| {
        let der = &posfleet_pki::certificates_from_pem(pem.as_bytes(), "cert").unwrap()[0];
        posfleet_pki::DeviceIdentity::from_certificate(der).unwrap()
    };
    let (old, new) = (
        serial(&enrolled.device_certificate_pem),
        serial(&renewed.device_certificate_pem),
    );
    assert_eq!(new.device_id, id);
    assert_ne!(new.serial, old.serial);
    as_device(&setup, &key, &renewed.device_certificate_pem)
        .heartbeat(hello())
        .await
        .unwrap();
    // A request for another key is refused.
    assert_status(
        as_device(&setup, &key, &renewed.device_certificate_pem)
            .renew_certificate(v1::RenewCertificateRequest {
                certificate_request: posfleet_pki::certificate_request(&new_key()).unwrap(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "another key",
    );

    // Without a certificate while it is still valid: refused.
    let now = posfleet_control_plane::now_ms();
    let mut agent = setup.server.agent().await;
    assert_status(
        agent
            .renew_certificate(renewal_proof(&key, &id, now, request.clone()))
            .await,
        Code::Unauthenticated,
        "still valid",
    );
    // Ended ten days ago: renewable by proving the key, and only so.
    certificate_ended(&setup, &id, 10).await;
    assert!(
        admin
            .device(&id)
            .await
            .unwrap()
            .certificate_status
            .starts_with("expired, renewable until")
    );
    assert_status(
        agent
            .renew_certificate(renewal_proof(&new_key(), &id, now, request.clone()))
            .await,
        Code::Unauthenticated,
        "not signed by the key",
    );
    assert_status(
        agent
            .renew_certificate(renewal_proof(&key, &id, now - 3_600_000, request.clone()))
            .await,
        Code::Unauthenticated,
        "5 minutes",
    );
    let again = agent
        .renew_certificate(renewal_proof(&key, &id, now, request.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serial(&again.device_certificate_pem).device_id, id);
    assert_eq!(admin.device(&id).await.unwrap().certificate_status, "valid");

    // Ended past the grace period (90 days): enroll again, and `device show`
    // says so.
    certificate_ended(&setup, &id, 91).await;
    assert_status(
        agent
            .renew_certificate(renewal_proof(&key, &id, now, request.clone()))
            .await,
        Code::FailedPrecondition,
        "enroll the device again",
    );
    assert_eq!(
        admin.device(&id).await.unwrap().certificate_status,
        "expired: enroll the device again"
    );

    // A revoked till renews nothing.
    certificate_ended(&setup, &id, 10).await;
    admin
        .client
        .revoke_device(admin.req(v1::RevokeDeviceRequest {
            device_id: id.clone(),
            reason: "stolen".into(),
        }))
        .await
        .unwrap();
    assert_status(
        agent
            .renew_certificate(renewal_proof(&key, &id, now, request))
            .await,
        Code::PermissionDenied,
        "revoked",
    );
    setup.finish().await;
}

/// The certificate the gRPC listener presents to a client trusting
/// `trusted`.
async fn presented_certificate(
    setup: &Setup,
    trusted: &[posfleet_pki::rustls::pki_types::CertificateDer<'static>],
) -> Vec<u8> {
    let config = posfleet_pki::client_config(trusted, None).unwrap();
    let address = setup.server.grpc_url.trim_start_matches("https://");
    let socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            posfleet_pki::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            socket,
        )
        .await
        .unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A server certificate from `ca` for 127.0.0.1, written (chain, key)
/// where a renewal tool would put it: a new file renamed over the old.
fn write_server_certificate(ca: &FleetCa, dir: &std::path::Path) -> Vec<u8> {
    let issued = ca
        .issue_server(
            &["127.0.0.1".into()],
            Duration::from_secs(86_400),
            SystemTime::now(),
        )
        .unwrap();
    for (name, pem) in [
        ("server.crt", &issued.chain_pem),
        ("server.key", &issued.key_pem),
    ] {
        std::fs::write(dir.join(format!("{name}.new")), pem).unwrap();
        std::fs::rename(dir.join(format!("{name}.new")), dir.join(name)).unwrap();
    }
    posfleet_pki::certificates_from_pem(issued.chain_pem.as_bytes(), "chain").unwrap()[0].to_vec()
}

#[tokio::test]
async fn a_server_certificate_supplied_as_files_is_served_and_replaced_when_they_change() {
    let company = tempfile::tempdir().unwrap();
    let (issuing, _) = FleetCa::create("Example Corp issuing CA", SystemTime::now()).unwrap();
    let issuing_file = company.path().join("issuing-ca.crt");
    std::fs::write(&issuing_file, issuing.certificates_pem()).unwrap();
    let first = write_server_certificate(&issuing, company.path());
    let dir = company.path().to_path_buf();
    let setup = setup(Backend::Sqlite, |config| {
        config.tls_server_names = vec!["127.0.0.1".into()];
        config.tls_server_cert_path = Some(dir.join("server.crt"));
        config.tls_server_key_path = Some(dir.join("server.key"));
        config.tls_server_trust_path = Some(issuing_file.clone());
    })
    .await;
    let company_roots =
        posfleet_pki::certificates_from_pem(issuing.certificates_pem().as_bytes(), "CA").unwrap();
    assert_eq!(presented_certificate(&setup, &company_roots).await, first);

    // Tills are handed the company CA with the fleet CA, and enroll and
    // call with a fleet certificate as before.
    setup.server.admin().await.store("lyon-01").await;
    let (key, enrolled) = enroll(&setup, "lyon-01").await;
    assert!(
        enrolled
            .trust_bundle_pem
            .contains(issuing.certificates_pem().trim()),
        "the server certificate's issuer is in the trust bundle"
    );
    as_device(&setup, &key, &enrolled.device_certificate_pem)
        .heartbeat(hello())
        .await
        .unwrap();

    // Renewed by an outside tool: new connections get the new one, with
    // no restart.
    let second = write_server_certificate(&issuing, company.path());
    assert_ne!(first, second);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while presented_certificate(&setup, &company_roots).await != second {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate files were not taken"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Files that make no usable certificate (a key that is not the
    // certificate's) are not taken: the one in use stays.
    let (stranger, _) = FleetCa::create("stranger", SystemTime::now()).unwrap();
    let other = tempfile::tempdir().unwrap();
    write_server_certificate(&stranger, other.path());
    std::fs::copy(
        other.path().join("server.key"),
        company.path().join("server.key"),
    )
    .unwrap();
    tokio::time::sleep(posfleet_control_plane::tls::SERVER_CERT_CHECK * 3).await;
    assert_eq!(presented_certificate(&setup, &company_roots).await, second);
    as_device(&setup, &key, &enrolled.device_certificate_pem)
        .heartbeat(hello())
        .await
        .unwrap();
    setup.finish().await;
}

#[tokio::test]
async fn a_supplied_server_certificate_tills_would_refuse_stops_the_start() {
    let company = tempfile::tempdir().unwrap();
    let (issuing, _) = FleetCa::create("Example Corp issuing CA", SystemTime::now()).unwrap();
    write_server_certificate(&issuing, company.path());
    let data = tempfile::tempdir().unwrap();
    let config = posfleet_control_plane::config::Config {
        data_dir: data.path().to_path_buf(),
        // Not a name the certificate is for; and its issuer is not given
        // as trust either.
        tls_server_names: vec!["cp.example.net".into()],
        tls_server_cert_path: Some(company.path().join("server.crt")),
        tls_server_key_path: Some(company.path().join("server.key")),
        ..Default::default()
    };
    let error = posfleet_control_plane::ControlPlane::open(config)
        .await
        .err()
        .expect("refused");
    let text = error.to_string();
    assert!(
        text.contains("tills would refuse") && text.contains("cp.example.net"),
        "{text}"
    );
}

#[tokio::test]
async fn a_ca_rotation_renews_tills_from_the_new_ca_and_retiring_the_old_one_cuts_its_certificates()
{
    let setup = tls_setup().await;
    let mut admin = setup.server.admin().await;
    admin.store("lyon-01").await;
    let (key, enrolled) = enroll(&setup, "lyon-01").await;
    let (stale_key, stale) = enroll(&setup, "lyon-01").await;
    let old_trust = setup.server.trusted.clone().unwrap();
    let old_digest = {
        use sha2::Digest;
        sha2::Sha256::digest(enrolled.trust_bundle_pem.as_bytes()).to_vec()
    };
    let mut till = as_device(&setup, &key, &enrolled.device_certificate_pem);
    let answer = till
        .heartbeat(v1::HeartbeatRequest {
            trust_bundle_sha256: old_digest.clone(),
            ..hello()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.trust_bundle_pem.is_empty() && !answer.renew_certificate);

    let rotated = admin
        .client
        .rotate_certificate_authority(admin.req(v1::RotateCertificateAuthorityRequest {}))
        .await
        .unwrap()
        .into_inner();
    let role = |a: &v1::CertificateAuthorities, role: &str| {
        a.authorities
            .iter()
            .find(|ca| ca.role == role)
            .cloned()
            .unwrap()
    };
    let (new_ca, old_ca) = (role(&rotated, "active"), role(&rotated, "previous"));
    assert_eq!(old_ca.devices, 2, "{rotated:?}");
    assert_eq!(new_ca.devices, 0);
    // A second rotation waits for the first to end.
    assert_status(
        admin
            .client
            .rotate_certificate_authority(admin.req(v1::RotateCertificateAuthorityRequest {}))
            .await,
        Code::FailedPrecondition,
        "a rotation is under way",
    );

    // The till's next heartbeat hands it both CAs and asks for a renewal,
    // which the new CA answers.
    let answer = till
        .heartbeat(v1::HeartbeatRequest {
            trust_bundle_sha256: old_digest,
            ..hello()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.renew_certificate);
    let bundle =
        posfleet_pki::certificates_from_pem(answer.trust_bundle_pem.as_bytes(), "bundle").unwrap();
    assert_eq!(bundle.len(), 2);
    let renewed = till
        .renew_certificate(v1::RenewCertificateRequest {
            certificate_request: posfleet_pki::certificate_request(&key).unwrap(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let device = admin
        .client
        .get_device(admin.req(v1::GetDeviceRequest {
            id: enrolled.device_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(device.certificate_ca_fingerprint, new_ca.fingerprint);

    // The other till has not renewed: retiring is refused, naming it.
    assert_status(
        admin
            .client
            .retire_certificate_authority(
                admin.req(v1::RetireCertificateAuthorityRequest { force: false }),
            )
            .await,
        Code::FailedPrecondition,
        &stale.device_id,
    );
    let retired = admin
        .client
        .retire_certificate_authority(
            admin.req(v1::RetireCertificateAuthorityRequest { force: true }),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retired.devices_to_reenroll, vec![stale.device_id.clone()]);
    assert_eq!(retired.authorities.len(), 1);

    // The till's open connection was made with its old certificate: the
    // next call closes it, and the channel reconnects with the renewed one.
    till.heartbeat(hello())
        .await
        .expect_err("a retired CA's certificate");
    let new_trust =
        posfleet_pki::certificates_from_pem(retired.trust_bundle_pem.as_bytes(), "bundle").unwrap();
    // A client trusting `trust`, presenting `identity` (certificate, key).
    let client = |trust: &[posfleet_pki::rustls::pki_types::CertificateDer<'static>],
                  identity: Option<(&str, &SigningKey)>| {
        let identity = identity.map(|(pem, key)| {
            (
                posfleet_pki::certificates_from_pem(pem.as_bytes(), "certificate").unwrap(),
                posfleet_pki::private_key_der(key).unwrap(),
            )
        });
        let config = posfleet_pki::client_config(trust, identity).unwrap();
        let endpoint =
            tonic::transport::Endpoint::from_shared(setup.server.grpc_url.clone()).unwrap();
        AgentServiceClient::new(posfleet_pki::grpc_channel(
            &endpoint,
            Some(std::sync::Arc::new(config)),
        ))
    };
    client(&new_trust, Some((&renewed.device_certificate_pem, &key)))
        .heartbeat(hello())
        .await
        .unwrap();
    // The listeners' certificate now comes from the new CA: a client
    // holding only the old one refuses it, and the old CA's certificates
    // are refused at the handshake.
    assert_transport_error(
        client(&old_trust, None).heartbeat(hello()).await,
        "UnknownIssuer",
    );
    assert_transport_error(
        client(
            &new_trust,
            Some((&stale.device_certificate_pem, &stale_key)),
        )
        .heartbeat(hello())
        .await,
        "UnknownCA",
    );
    setup.finish().await;
}
