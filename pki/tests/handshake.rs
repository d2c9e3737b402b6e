//! Device certificates issued by the fleet CA, checked by real TLS
//! handshakes over loopback sockets.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ed25519_dalek::SigningKey;
use posfleet_pki::rustls::pki_types::{CertificateDer, ServerName};
use posfleet_pki::{
    DeviceIdentity, Error, FleetCa, Revocations, certificate_request, certificates_from_pem,
    client_config, parse_fingerprint, pinned_client_config, private_key_der, private_key_from_pem,
    server_config,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DAY: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Default)]
struct Revoked(Mutex<HashSet<String>>);

impl Revocations for Revoked {
    fn is_revoked(&self, device: &DeviceIdentity) -> bool {
        self.0.lock().unwrap().contains(&device.device_id)
    }
}

/// A new CA; each one named apart, as two companies' CAs would be.
fn new_ca() -> FleetCa {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    FleetCa::create(&format!("test fleet CA {n}"), SystemTime::now())
        .unwrap()
        .0
}

fn device_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

/// A certificate for `key` as device `device` of store `store`, valid from
/// `now` for `validity`.
fn device_certificate(
    ca: &FleetCa,
    key: &SigningKey,
    device: &str,
    now: SystemTime,
    validity: Duration,
) -> Vec<CertificateDer<'static>> {
    let request = certificate_request(key).unwrap();
    let issued = ca
        .issue_device(
            &request,
            key.verifying_key().as_bytes(),
            device,
            "lyon-01",
            validity,
            now,
        )
        .unwrap();
    vec![CertificateDer::from(issued.der)]
}

/// A server on loopback with the CA's server certificate; answers each
/// connection with the device it saw, or `-` without one.
struct Server {
    address: std::net::SocketAddr,
    revoked: Arc<Revoked>,
}

async fn start_server(ca: &FleetCa) -> Server {
    let issued = ca
        .issue_server(
            &["127.0.0.1".into(), "cp.test".into()],
            DAY,
            SystemTime::now(),
        )
        .unwrap();
    let chain = certificates_from_pem(issued.chain_pem.as_bytes(), "chain").unwrap();
    let key = private_key_from_pem(issued.key_pem.as_bytes(), "key").unwrap();
    let trusted = certificates_from_pem(ca.certificates_pem().as_bytes(), "CA").unwrap();
    let revoked = Arc::new(Revoked::default());
    let config = server_config(chain, key, &trusted, revoked.clone()).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let seen = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|der| DeviceIdentity::from_certificate(der).unwrap().device_id)
                    .unwrap_or_else(|| "-".into());
                let _ = tls.write_all(seen.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    Server { address, revoked }
}

/// Connects trusting `trusted`, presenting `identity`; what the server
/// answered, or the error.
async fn connect(
    server: &Server,
    trusted: &FleetCa,
    identity: Option<(Vec<CertificateDer<'static>>, &SigningKey)>,
    name: &str,
) -> Result<String, String> {
    let trusted = certificates_from_pem(trusted.certificates_pem().as_bytes(), "CA").unwrap();
    let identity = identity.map(|(chain, key)| (chain, private_key_der(key).unwrap()));
    let config = client_config(&trusted, identity).unwrap();
    connect_with(server, config, name).await
}

/// Connects with a client configuration of the caller's; what the server
/// answered, or the error.
async fn connect_with(
    server: &Server,
    config: posfleet_pki::rustls::ClientConfig,
    name: &str,
) -> Result<String, String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let socket = TcpStream::connect(server.address).await.unwrap();
    let name = ServerName::try_from(name.to_string()).unwrap();
    let mut tls = connector
        .connect(name, socket)
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    // In TLS 1.3 the server checks the client's certificate after the
    // client considers the handshake done: a refusal arrives as an alert
    // on the first read.
    tls.read_to_string(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    Ok(answer)
}

#[tokio::test]
async fn a_device_certificate_names_the_enrolled_device_and_its_store() {
    let ca = new_ca();
    let key = device_key();
    let chain = device_certificate(&ca, &key, "dev-1", SystemTime::now(), 30 * DAY);
    let identity = DeviceIdentity::from_certificate(&chain[0]).unwrap();
    assert_eq!(identity.device_id, "dev-1");
    assert_eq!(identity.store_id, "lyon-01");
    let lifetime = identity.not_after - identity.not_before;
    // Thirty days, plus the few minutes allowed for a slow clock.
    assert!(
        (30 * 86_400..30 * 86_400 + 600).contains(&lifetime),
        "{lifetime}"
    );

    let server = start_server(&ca).await;
    let seen = connect(&server, &ca, Some((chain, &key)), "127.0.0.1").await;
    assert_eq!(seen.unwrap(), "dev-1");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_let_in_without_an_identity() {
    let ca = new_ca();
    let server = start_server(&ca).await;
    // By IP address and by host name: both are in the server certificate.
    assert_eq!(connect(&server, &ca, None, "127.0.0.1").await.unwrap(), "-");
    assert_eq!(connect(&server, &ca, None, "cp.test").await.unwrap(), "-");
}

#[tokio::test]
async fn a_request_asking_for_another_device_gets_the_enrolled_name() {
    let ca = new_ca();
    let key = device_key();
    // The request asks for device B of another store, in every field it has.
    let mut params = rcgen::CertificateParams::new(vec![
        "urn:posfleet:device:dev-B".to_string(),
        "urn:posfleet:store:paris-09".to_string(),
    ])
    .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "dev-B");
    let pkcs8 = match private_key_der(&key).unwrap() {
        posfleet_pki::rustls::pki_types::PrivateKeyDer::Pkcs8(der) => der,
        _ => unreachable!("an Ed25519 key is PKCS#8"),
    };
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519).unwrap();
    let request = params.serialize_request(&pair).unwrap();
    let issued = ca
        .issue_device(
            request.der(),
            key.verifying_key().as_bytes(),
            "dev-A",
            "lyon-01",
            DAY,
            SystemTime::now(),
        )
        .unwrap();
    let identity = DeviceIdentity::from_certificate(&issued.der).unwrap();
    assert_eq!(
        (identity.device_id.as_str(), identity.store_id.as_str()),
        ("dev-A", "lyon-01")
    );
    let text = format!("{:?}", x509_names(&issued.der));
    assert!(
        !text.contains("dev-B") && !text.contains("paris-09"),
        "{text}"
    );
}

/// The common name of a CA certificate.
fn subject_of(der: &[u8]) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, certificate) = X509Certificate::from_der(der).unwrap();
    let name = certificate.subject().iter_common_name().next().unwrap();
    name.as_str().unwrap().to_string()
}

fn x509_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, certificate) = X509Certificate::from_der(der).unwrap();
    let mut names = vec![certificate.subject().to_string()];
    if let Ok(Some(sans)) = certificate.subject_alternative_name() {
        names.extend(sans.value.general_names.iter().map(|n| format!("{n:?}")));
    }
    names
}

#[tokio::test]
async fn a_request_for_a_key_other_than_the_proofs_is_refused() {
    let ca = new_ca();
    let requester = device_key();
    let prover = device_key();
    let request = certificate_request(&requester).unwrap();
    let refused = ca.issue_device(
        &request,
        prover.verifying_key().as_bytes(),
        "dev-1",
        "lyon-01",
        DAY,
        SystemTime::now(),
    );
    assert!(matches!(refused, Err(Error::KeyMismatch)), "{refused:?}");
}

#[tokio::test]
async fn a_tampered_request_is_refused() {
    let ca = new_ca();
    let key = device_key();
    let mut request = certificate_request(&key).unwrap();
    let last = request.len() - 1;
    request[last] ^= 1;
    let refused = ca.issue_device(
        &request,
        key.verifying_key().as_bytes(),
        "dev-1",
        "lyon-01",
        DAY,
        SystemTime::now(),
    );
    assert!(matches!(refused, Err(Error::BadRequest(_))), "{refused:?}");
}

#[tokio::test]
async fn names_that_would_change_the_uri_are_refused() {
    let ca = new_ca();
    let key = device_key();
    let request = certificate_request(&key).unwrap();
    for (device, store) in [("dev 1", "lyon-01"), ("dev-1", "lyon:01"), ("", "lyon-01")] {
        let refused = ca.issue_device(
            &request,
            key.verifying_key().as_bytes(),
            device,
            store,
            DAY,
            SystemTime::now(),
        );
        assert!(matches!(refused, Err(Error::BadName(_))), "{refused:?}");
    }
}

#[tokio::test]
async fn certificates_from_another_ca_out_of_date_or_revoked_are_refused_at_the_handshake() {
    let ca = new_ca();
    let server = start_server(&ca).await;
    let key = device_key();
    let now = SystemTime::now();

    let other = device_certificate(&new_ca(), &key, "dev-1", now, DAY);
    let impostor_ca = FleetCa::create(&subject_of(ca.certificate()), now)
        .unwrap()
        .0;
    let impostor = device_certificate(&impostor_ca, &key, "dev-1", now, DAY);
    let expired = device_certificate(&ca, &key, "dev-1", now - 3 * DAY, DAY);
    let not_yet = device_certificate(&ca, &key, "dev-1", now + 3 * DAY, DAY);
    // The alert the server sends says why.
    for (what, chain, alert) in [
        ("from another CA", other, "UnknownCA"),
        ("expired", expired, "CertificateExpired"),
        ("not yet valid", not_yet, "CertificateExpired"),
        (
            "from an impostor CA with the fleet CA's name",
            impostor,
            "DecryptError",
        ),
    ] {
        let refused = connect(&server, &ca, Some((chain, &key)), "127.0.0.1").await;
        assert!(
            refused.as_ref().is_err_and(|e| e.contains(alert)),
            "{what}: {refused:?}"
        );
    }

    let valid = device_certificate(&ca, &key, "dev-1", now, DAY);
    assert_eq!(
        connect(&server, &ca, Some((valid.clone(), &key)), "127.0.0.1")
            .await
            .unwrap(),
        "dev-1"
    );
    server.revoked.0.lock().unwrap().insert("dev-1".into());
    let refused = connect(&server, &ca, Some((valid, &key)), "127.0.0.1").await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("revoked") || e.contains("Revoked")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_client_trusting_another_ca_refuses_the_server() {
    let ca = new_ca();
    let server = start_server(&ca).await;
    let refused = connect(&server, &new_ca(), None, "127.0.0.1").await;
    assert!(
        refused.is_err_and(|e| e.contains("UnknownIssuer")),
        "unknown issuer"
    );
    let refused = connect(&server, &ca, None, "cp.other").await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("not valid for name \"cp.other\"")),
        "wrong name: {refused:?}"
    );
}

#[test]
fn the_ca_made_at_first_start_is_kept_private_and_loaded_again() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let (first, created) = FleetCa::load_or_create(&tls, SystemTime::now()).unwrap();
    assert!(created);
    let mode = |name: &str| {
        std::fs::metadata(tls.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("fleet-ca.key"), 0o600);
    let (again, created) = FleetCa::load_or_create(&tls, SystemTime::now()).unwrap();
    assert!(!created);
    assert_eq!(first.fingerprint(), again.fingerprint());
    assert_eq!(first.fingerprint().len(), 64);

    // A certificate without its key is reported, never replaced.
    std::fs::remove_file(tls.join("fleet-ca.key")).unwrap();
    let error = FleetCa::load_or_create(&tls, SystemTime::now()).unwrap_err();
    assert!(error.to_string().contains("fleet-ca.key"), "{error}");
    assert!(tls.join("fleet-ca.crt").exists());
}

#[test]
fn a_ca_key_that_is_not_the_certificates_is_refused() {
    let (ca, _) = FleetCa::create("one", SystemTime::now()).unwrap();
    let (_, other_key) = FleetCa::create("two", SystemTime::now()).unwrap();
    let error = FleetCa::from_pem(ca.certificates_pem(), &other_key).unwrap_err();
    assert!(error.to_string().contains("does not belong"), "{error}");
}

#[tokio::test]
async fn an_intermediate_from_the_company_pki_issues_devices_the_root_vouches_for() {
    // The company's root, and an intermediate it signed for posfleet.
    let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root_params = rcgen::CertificateParams::default();
    root_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Company root");
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let root = rcgen::CertifiedIssuer::self_signed(root_params, root_key).unwrap();
    let intermediate_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let intermediate_key_pem = intermediate_key.serialize_pem();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "posfleet issuing CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    params.use_authority_key_identifier_extension = true;
    let intermediate = params.signed_by(&intermediate_key, &root).unwrap();

    let ca = FleetCa::from_pem(
        &format!("{}{}", intermediate.pem(), root.pem()),
        &intermediate_key_pem,
    )
    .unwrap();
    let key = device_key();
    let leaf = device_certificate(&ca, &key, "dev-1", SystemTime::now(), DAY);
    let server = start_server(&ca).await;
    let chain = vec![leaf[0].clone(), intermediate.der().clone()];
    assert_eq!(
        connect(&server, &ca, Some((chain, &key)), "127.0.0.1")
            .await
            .unwrap(),
        "dev-1"
    );
}

#[tokio::test]
async fn a_revoked_device_cannot_resume_an_earlier_session() {
    let ca = new_ca();
    let server = start_server(&ca).await;
    let key = device_key();
    let chain = device_certificate(&ca, &key, "dev-1", SystemTime::now(), DAY);
    // One client configuration, as a till keeps: its clones share the
    // session store, so it would offer to resume.
    let trusted = certificates_from_pem(ca.certificates_pem().as_bytes(), "CA").unwrap();
    let config = client_config(&trusted, Some((chain, private_key_der(&key).unwrap()))).unwrap();
    let connect_once = || connect_with(&server, config.clone(), "127.0.0.1");
    assert_eq!(connect_once().await.unwrap(), "dev-1");
    server.revoked.0.lock().unwrap().insert("dev-1".into());
    let refused = connect_once().await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("CertificateRevoked")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_client_pinning_the_ca_fingerprint_accepts_the_fleets_server() {
    let ca = new_ca();
    let server = start_server(&ca).await;
    let pin = parse_fingerprint(&ca.fingerprint()).unwrap();
    for name in ["127.0.0.1", "cp.test"] {
        let config = pinned_client_config(&pin).unwrap();
        assert_eq!(connect_with(&server, config, name).await.unwrap(), "-");
    }
    // The pin stands for the CA: the server's name is still checked.
    let config = pinned_client_config(&pin).unwrap();
    let refused = connect_with(&server, config, "cp.other").await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("not valid for name \"cp.other\"")),
        "wrong name: {refused:?}"
    );
}

#[tokio::test]
async fn a_client_pinning_another_fingerprint_refuses_the_server_saying_why() {
    let ca = new_ca();
    let server = start_server(&ca).await;
    let other = new_ca();
    let config = pinned_client_config(&parse_fingerprint(&other.fingerprint()).unwrap()).unwrap();
    let refused = connect_with(&server, config, "127.0.0.1").await;
    let error = refused.expect_err("another CA's fingerprint");
    assert!(
        error.contains(&format!(
            "holds no CA with the pinned fingerprint {}",
            other.fingerprint()
        )),
        "{error}"
    );
    // It lists what the server presented: the fleet CA is among them.
    assert!(error.contains(&ca.fingerprint()), "{error}");
}

#[tokio::test]
async fn a_server_presenting_the_pinned_ca_with_a_certificate_it_did_not_issue_is_refused() {
    // An impostor presents the real CA's certificate after its own server
    // certificate, issued by another CA: the pin is in the chain, but the
    // chain does not verify against it.
    let ca = new_ca();
    let impostor = new_ca();
    let issued = impostor
        .issue_server(&["127.0.0.1".into()], DAY, SystemTime::now())
        .unwrap();
    let mut chain = certificates_from_pem(issued.chain_pem.as_bytes(), "chain").unwrap();
    chain.truncate(1);
    chain.push(ca.certificate().clone());
    let key = private_key_from_pem(issued.key_pem.as_bytes(), "key").unwrap();
    let trusted = certificates_from_pem(ca.certificates_pem().as_bytes(), "CA").unwrap();
    let config = server_config(chain, key, &trusted, Arc::new(Revoked::default())).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let _ = acceptor.accept(socket).await;
    });
    let server = Server {
        address,
        revoked: Arc::new(Revoked::default()),
    };
    let config = pinned_client_config(&parse_fingerprint(&ca.fingerprint()).unwrap()).unwrap();
    let refused = connect_with(&server, config, "127.0.0.1").await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("UnknownIssuer")),
        "{refused:?}"
    );
}

#[test]
fn fingerprints_are_read_as_64_hex_digits_with_or_without_colons() {
    let ca = new_ca();
    let plain = ca.fingerprint();
    let expected = parse_fingerprint(&plain).unwrap();
    let with_colons = hex::encode(expected)
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|pair| std::str::from_utf8(pair).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    assert_eq!(parse_fingerprint(&with_colons).unwrap(), expected);
    for bad in [
        "",
        "abc",
        &plain[..62],
        &format!("{plain}00"),
        &format!("g{}", &plain[1..]),
    ] {
        let error = parse_fingerprint(bad).expect_err(bad);
        assert!(error.to_string().contains("64 hex digits"), "{error}");
    }
}
