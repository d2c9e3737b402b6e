//! Webhooks as a receiver sees them: every matching event, signed, in order
//! per rollout, retried until the receiver recovers; a dead receiver delays
//! no other; an https receiver is trusted through the webhook's own CA and
//! only so. Real HTTP and HTTPS receivers on loopback; SQLite and (with
//! --ignored) PostgreSQL.

mod common;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::{Backend, TestDb, TestServer, assert_status, setup};
use hmac::{Hmac, Mac};
use posfleet_control_plane::storage::{NewEvent, Storage};
use posfleet_pki::FleetCa;
use posfleet_pki::rustls::ServerConfig;
use posfleet_pki::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use posfleet_proto::v1;
use serde_json::{Value, json};
use sha2::Sha256;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::Code;

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Received {
    event: String,
    delivery: String,
    timestamp: String,
    signature: String,
    body: String,
    /// What the receiver answered.
    status: u16,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }

    fn seq(&self) -> u64 {
        self.json()["seq"].as_u64().unwrap()
    }
}

/// An HTTP receiver that answers 503 to its first `fail_first` requests.
#[derive(Clone)]
struct Receiver {
    url: String,
    requests: Arc<Mutex<Vec<Received>>>,
    failures_left: Arc<AtomicUsize>,
    /// TLS handshakes that failed (an https receiver's).
    failed_handshakes: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver::new("http", &listener, fail_first);
        let app = receiver.app();
        tokio::spawn(async move { axum::serve(listener, app).await });
        receiver
    }

    /// An https receiver on 127.0.0.1 presenting a certificate `ca` issued
    /// for that address.
    async fn start_https(ca: &FleetCa) -> Receiver {
        let issued = ca
            .issue_server(
                &["127.0.0.1".to_string()],
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap();
        let chain =
            posfleet_pki::certificates_from_pem(issued.chain_pem.as_bytes(), "chain").unwrap();
        let key = posfleet_pki::private_key_from_pem(issued.key_pem.as_bytes(), "key").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver::new("https", &listener, 0);
        let tls = TlsListener {
            tcp: listener,
            acceptor: TlsAcceptor::from(Arc::new(tls_server_config(chain, key))),
            failed_handshakes: receiver.failed_handshakes.clone(),
        };
        let app = receiver.app();
        tokio::spawn(async move { axum::serve(tls, app).await });
        receiver
    }

    fn new(scheme: &str, listener: &TcpListener, fail_first: usize) -> Receiver {
        Receiver {
            url: format!("{scheme}://{}/hook", listener.local_addr().unwrap()),
            requests: Arc::default(),
            failures_left: Arc::new(AtomicUsize::new(fail_first)),
            failed_handshakes: Arc::default(),
        }
    }

    fn app(&self) -> axum::Router {
        axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(self.clone())
    }

    fn requests(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    /// The requests it accepted (answered 2xx).
    fn delivered(&self) -> Vec<Received> {
        self.requests()
            .into_iter()
            .filter(|r| r.status == 200)
            .collect()
    }

    async fn wait_for_deliveries(&self, count: usize, within: Duration) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let delivered = self.delivered();
            if delivered.len() >= count {
                return delivered;
            }
            assert!(
                start.elapsed() < within,
                "{} of {count} deliveries after {within:?}: {:?}",
                delivered.len(),
                self.requests()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let fail = receiver
        .failures_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if fail {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    receiver.requests.lock().unwrap().push(Received {
        event: header("x-posfleet-event"),
        delivery: header("x-posfleet-delivery"),
        timestamp: header("x-posfleet-timestamp"),
        signature: header("x-posfleet-signature"),
        body,
        status: status.as_u16(),
    });
    status
}

fn tls_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> ServerConfig {
    ServerConfig::builder_with_provider(posfleet_pki::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap()
}

/// A TCP listener whose connections are TLS-terminated, counting the
/// handshakes that fail (a client that did not trust the certificate).
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    failed_handshakes: Arc<AtomicUsize>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((socket, peer)) = self.tcp.accept().await else {
                continue;
            };
            let handshake = self.acceptor.accept(socket);
            match tokio::time::timeout(Duration::from_secs(5), handshake).await {
                Ok(Ok(stream)) => return (stream, peer),
                _ => {
                    self.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// What a receiver does with the secret it was given once.
fn verify(secret: &str, request: &Received) {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{}.{}", request.timestamp, request.body).as_bytes());
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(request.signature, expected, "signature of {request:?}");
    let at: i64 = request.timestamp.parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - at).abs() < 120);
}

fn fast_retries(config: &mut posfleet_control_plane::config::Config) {
    config.webhook_retry_initial_milliseconds = 50;
    config.webhook_retry_max_seconds = 1;
    config.webhook_timeout_seconds = 5;
}

async fn add_webhook(
    admin: &mut common::Admin,
    url: &str,
    events: &[&str],
) -> v1::AddWebhookResponse {
    add_webhook_with_ca(admin, url, events, "").await
}

async fn add_webhook_with_ca(
    admin: &mut common::Admin,
    url: &str,
    events: &[&str],
    ca_pem: &str,
) -> v1::AddWebhookResponse {
    let req = admin.req(v1::AddWebhookRequest {
        url: url.into(),
        events: events.iter().map(|e| e.to_string()).collect(),
        ca_pem: ca_pem.into(),
    });
    admin.client.add_webhook(req).await.unwrap().into_inner()
}

async fn deliveries(admin: &mut common::Admin, webhook_id: &str) -> Vec<v1::WebhookDelivery> {
    let req = admin.req(v1::ListWebhookDeliveriesRequest {
        webhook_id: webhook_id.into(),
        limit: 1000,
    });
    admin
        .client
        .list_webhook_deliveries(req)
        .await
        .unwrap()
        .into_inner()
        .deliveries
}

/// The webhook's deliveries once `count` of them are on record as
/// delivered: a receiver has the request before the dispatcher records
/// its answer.
async fn settled_deliveries(
    admin: &mut common::Admin,
    webhook_id: &str,
    count: usize,
) -> Vec<v1::WebhookDelivery> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = deliveries(admin, webhook_id).await;
        let done = listed
            .iter()
            .filter(|d| d.state() == v1::DeliveryState::Delivered)
            .count();
        if done >= count || Instant::now() > deadline {
            return listed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Commits events (kind, rollout id) in one transaction, the way the engine
/// does; returns their seqs.
async fn emit(storage: &Storage, events: &[(&str, &str)]) -> Vec<u64> {
    let events: Vec<NewEvent> = events
        .iter()
        .enumerate()
        .map(|(i, (kind, rollout))| NewEvent::new(kind, rollout, "dev-1", json!({"i": i})))
        .collect();
    let mut tx = storage.begin().await.unwrap();
    // Any time: deliveries follow seq, not clocks (the engine may run on a
    // test clock).
    let seqs = storage
        .append_events(&mut tx, 1_000, &events)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    seqs
}

/// Per rollout, requests (failed ones included) never go back in seq: an
/// event is not sent before the previous one of its rollout is delivered.
fn assert_in_order_per_rollout(requests: &[Received]) {
    let mut last: HashMap<String, u64> = HashMap::new();
    for request in requests {
        let body = request.json();
        let rollout = body["rollout_id"].as_str().unwrap().to_string();
        let seq = request.seq();
        let previous = last.insert(rollout.clone(), seq).unwrap_or(0);
        assert!(
            seq >= previous,
            "rollout {rollout}: {seq} sent after {previous}: {requests:?}"
        );
    }
}

async fn deliveries_are_retried_until_the_receiver_recovers(backend: Backend) {
    let s = setup(backend, fast_retries).await;
    let storage = Storage::connect(&s.db.url, 2).await.unwrap();
    let mut admin = s.server.admin().await;
    // From before the webhooks: not theirs.
    emit(&storage, &[("rollout.completed", "ro-0")]).await;
    let flaky = Receiver::start(4).await;
    let completions = Receiver::start(0).await;
    let hook = add_webhook(&mut admin, &flaky.url, &["rollout.*"]).await;
    let completed_hook = add_webhook(&mut admin, &completions.url, &["rollout.completed"]).await;
    let webhook_id = hook.webhook.as_ref().unwrap().id.clone();

    let mut seqs = emit(
        &storage,
        &[
            ("rollout.started", "ro-1"),
            ("rollout.started", "ro-2"),
            ("store.labels_changed", ""),
        ],
    )
    .await;
    seqs.extend(
        emit(
            &storage,
            &[
                ("rollout.wave_started", "ro-1"),
                ("rollout.device_failed", "ro-1"),
                ("rollout.paused", "ro-2"),
                ("rollout.completed", "ro-1"),
            ],
        )
        .await,
    );

    let delivered = flaky.wait_for_deliveries(6, Duration::from_secs(30)).await;
    // Every matching event exactly once, signed with the webhook's secret.
    let mut delivered_seqs: Vec<u64> = delivered.iter().map(Received::seq).collect();
    delivered_seqs.sort();
    let expected: Vec<u64> = seqs.iter().copied().filter(|&seq| seq != seqs[2]).collect();
    assert_eq!(delivered_seqs, expected);
    for request in flaky.requests() {
        verify(&hook.secret, &request);
        let body = request.json();
        assert_eq!(request.event, body["kind"].as_str().unwrap());
        assert_eq!(request.delivery, format!("{webhook_id}-{}", request.seq()));
        assert_eq!(body["device_id"], "dev-1");
        assert!(body["data"]["i"].is_u64(), "{body}");
        assert_eq!(body["at"], "1970-01-01T00:00:01.000Z");
    }
    assert_in_order_per_rollout(&flaky.requests());
    assert_eq!(flaky.requests().len(), 6 + 4);

    // The attempts are on record.
    let listed = settled_deliveries(&mut admin, &webhook_id, 6).await;
    assert_eq!(listed.len(), 6);
    let attempts: u32 = listed.iter().map(|d| d.attempts).sum();
    assert_eq!(attempts, 6 + 4);
    for d in &listed {
        assert_eq!(d.state(), v1::DeliveryState::Delivered, "{d:?}");
        assert_eq!(d.last_http_status, 200);
        assert_eq!(d.next_attempt_at_unix_ms, 0);
        assert!(d.last_attempt_at_unix_ms > 0);
    }
    assert!(listed.iter().any(|d| d.attempts > 1));
    // Newest first.
    assert!(listed.windows(2).all(|p| p[0].event_seq > p[1].event_seq));

    // The other webhook gets what its filter names, nothing else.
    let completed = completions
        .wait_for_deliveries(1, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(completions.requests().len(), 1);
    assert_eq!(completed[0].event, "rollout.completed");
    verify(&completed_hook.secret, &completed[0]);
    let (_, metrics) = s.server.http_get("/metrics").await;
    assert!(
        metrics.contains("posfleet_webhook_deliveries_total{result=\"delivered\"} 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains("posfleet_webhook_delivery_attempts_total{result=\"http_error\"} 4"),
        "{metrics}"
    );
    s.finish().await;
}

/// A receiver that never answers and one whose port is closed hold up
/// neither each other nor a healthy receiver.
async fn a_dead_receiver_does_not_delay_a_healthy_one(backend: Backend) {
    const TIMEOUT: Duration = Duration::from_secs(5);
    let s = setup(backend, |config| {
        fast_retries(config);
        config.webhook_timeout_seconds = TIMEOUT.as_secs();
    })
    .await;
    let storage = Storage::connect(&s.db.url, 2).await.unwrap();
    let mut admin = s.server.admin().await;

    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}/hook", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    // Nothing listens there.
    let closed_url = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", listener.local_addr().unwrap())
    };
    let healthy = Receiver::start(0).await;
    let silent_hook = add_webhook(&mut admin, &silent_url, &[]).await;
    let closed_hook = add_webhook(&mut admin, &closed_url, &[]).await;
    add_webhook(&mut admin, &healthy.url, &[]).await;

    // 5 rollouts × 4 events.
    let mut events = Vec::new();
    for step in ["started", "wave_started", "device_succeeded", "completed"] {
        for rollout in ["ro-1", "ro-2", "ro-3", "ro-4", "ro-5"] {
            events.push((format!("rollout.{step}"), rollout));
        }
    }
    let events: Vec<(&str, &str)> = events.iter().map(|(k, r)| (k.as_str(), *r)).collect();
    let start = Instant::now();
    let seqs = emit(&storage, &events).await;
    let delivered = healthy
        .wait_for_deliveries(seqs.len(), Duration::from_secs(20))
        .await;
    let elapsed = start.elapsed();
    assert!(
        elapsed < TIMEOUT - Duration::from_secs(1),
        "the healthy receiver waited {elapsed:?}, as long as the silent one's timeout"
    );
    assert_eq!(delivered.len(), seqs.len());
    assert_in_order_per_rollout(&delivered);

    // The dead ones: each rollout's first event only is being attempted.
    let rollout_of: BTreeMap<u64, &str> = seqs
        .iter()
        .copied()
        .zip(events.iter().map(|e| e.1))
        .collect();
    let first_of_rollout = |seq: u64| {
        let rollout = rollout_of[&seq];
        rollout_of
            .iter()
            .find(|(_, r)| **r == rollout)
            .map(|(s, _)| *s)
            == Some(seq)
    };
    for hook in [&silent_hook, &closed_hook] {
        let id = &hook.webhook.as_ref().unwrap().id;
        let listed = deliveries(&mut admin, id).await;
        assert_eq!(listed.len(), seqs.len());
        for d in &listed {
            assert_eq!(d.state(), v1::DeliveryState::Pending, "{d:?}");
            if !first_of_rollout(d.event_seq) {
                assert_eq!(d.attempts, 0, "not its rollout's first: {d:?}");
            }
        }
    }
    // The closed port fails at once and is retried with backoff.
    let closed_id = &closed_hook.webhook.as_ref().unwrap().id;
    let listed = deliveries(&mut admin, closed_id).await;
    for d in listed.iter().filter(|d| first_of_rollout(d.event_seq)) {
        assert!(d.attempts >= 1, "{d:?}");
        assert_eq!(d.last_http_status, 0);
        assert!(!d.last_error.is_empty());
        assert!(
            d.next_attempt_at_unix_ms > d.last_attempt_at_unix_ms,
            "{d:?}"
        );
    }
    // The silent one times out.
    let silent_id = &silent_hook.webhook.as_ref().unwrap().id;
    let deadline = Instant::now() + TIMEOUT * 4;
    loop {
        let listed = deliveries(&mut admin, silent_id).await;
        let heads: Vec<_> = listed
            .iter()
            .filter(|d| first_of_rollout(d.event_seq))
            .collect();
        if heads.iter().all(|d| d.attempts >= 1) {
            for d in heads {
                assert!(d.last_error.contains("timed out"), "{d:?}");
                assert_eq!(d.last_http_status, 0);
            }
            break;
        }
        assert!(Instant::now() < deadline, "{listed:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.finish().await;
}

async fn webhooks_are_validated_listed_and_removed(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let (ca, ca_key) = FleetCa::create("Example Corp Webhook CA", SystemTime::now()).unwrap();
    let ca_pem = ca.certificates_pem();
    let with_key = format!("{ca_pem}{ca_key}");
    let too_big = format!("{ca_pem}{}", "#".repeat(64 * 1024));
    for (url, events, ca_pem, fragment) in [
        ("ftp://example.com/", vec![], "", "url"),
        ("not a url", vec![], "", "url"),
        ("http://user:secret@example.com/", vec![], "", "credentials"),
        ("http://example.com/", vec!["rollout*"], "", "events"),
        // A CA does nothing for a receiver without TLS.
        ("http://example.com/", vec![], ca_pem, "ca_pem"),
        (
            "https://example.com/",
            vec![],
            "not a certificate",
            "ca_pem",
        ),
        (
            "https://example.com/",
            vec![],
            with_key.as_str(),
            "private key",
        ),
        (
            "https://example.com/",
            vec![],
            too_big.as_str(),
            "at most 65536 bytes",
        ),
    ] {
        let req = admin.req(v1::AddWebhookRequest {
            url: url.into(),
            events: events.into_iter().map(String::from).collect(),
            ca_pem: ca_pem.into(),
        });
        assert_status(
            admin.client.add_webhook(req).await,
            Code::InvalidArgument,
            fragment,
        );
    }
    let req = admin.req(v1::ListWebhooksRequest {});
    let listed = admin.client.list_webhooks(req).await.unwrap().into_inner();
    assert!(listed.webhooks.is_empty(), "{listed:?}");

    let added = add_webhook(
        &mut admin,
        "http://hooks.example.com/posfleet",
        &["rollout.*", "rollout.paused"],
    )
    .await;
    assert!(added.secret.starts_with("pfw_") && added.secret.len() == 68);
    let webhook = added.webhook.unwrap();
    assert!(webhook.id.starts_with("wh-"));
    assert_eq!(webhook.events, ["rollout.*", "rollout.paused"]);
    assert!(webhook.cas.is_empty());
    let other = add_webhook(&mut admin, "http://other.example.com/", &[]).await;
    assert_ne!(other.secret, added.secret);
    // https, trusting a company CA beside the system's roots: listed by
    // subject and fingerprint, the PEM itself not echoed.
    let secure = add_webhook_with_ca(&mut admin, "https://hooks.example.com/", &[], ca_pem)
        .await
        .webhook
        .unwrap();
    assert_eq!(secure.cas.len(), 1);
    assert_eq!(secure.cas[0].subject, "CN=Example Corp Webhook CA");
    assert_eq!(secure.cas[0].sha256_fingerprint, ca.fingerprint());
    assert!(secure.cas[0].not_after_unix_ms > chrono::Utc::now().timestamp_millis());
    // An https receiver needs no CA of its own: the system's roots then.
    let public = add_webhook(&mut admin, "https://hooks.example.net/", &[]).await;
    assert!(public.webhook.unwrap().cas.is_empty());

    let req = admin.req(v1::ListWebhooksRequest {});
    let listed = admin.client.list_webhooks(req).await.unwrap().into_inner();
    assert_eq!(listed.webhooks.len(), 4);
    assert_eq!(listed.webhooks[0], webhook);
    // Read back from the database as it was added.
    assert_eq!(listed.webhooks[2], secure);

    let req = admin.req(v1::ListWebhookDeliveriesRequest {
        webhook_id: "wh-nope".into(),
        limit: 0,
    });
    assert_status(
        admin.client.list_webhook_deliveries(req).await,
        Code::NotFound,
        "wh-nope",
    );
    let req = admin.req(v1::RemoveWebhookRequest {
        id: webhook.id.clone(),
    });
    let removed = admin.client.remove_webhook(req).await.unwrap().into_inner();
    assert_eq!(removed, webhook);
    let req = admin.req(v1::RemoveWebhookRequest {
        id: webhook.id.clone(),
    });
    assert_status(
        admin.client.remove_webhook(req).await,
        Code::NotFound,
        "unknown webhook",
    );
    let req = admin.req(v1::ListWebhooksRequest {});
    let listed = admin.client.list_webhooks(req).await.unwrap().into_inner();
    assert_eq!(listed.webhooks.len(), 3);

    // On record, with the id created and never the secret.
    let req = admin.req(v1::ListAuditEntriesRequest::default());
    let log = admin
        .client
        .list_audit_entries(req)
        .await
        .unwrap()
        .into_inner()
        .entries;
    let add = log
        .iter()
        .find(|e| e.method == "AddWebhook" && e.result == "OK")
        .unwrap();
    let target: Value = serde_json::from_str(&add.target_json).unwrap();
    assert_eq!(target["webhook_id"], webhook.id.as_str());
    let add_secure = log
        .iter()
        .find(|e| e.method == "AddWebhook" && e.target_json.contains(&secure.id))
        .unwrap();
    let target: Value = serde_json::from_str(&add_secure.target_json).unwrap();
    assert_eq!(target["ca_sha256_fingerprints"], json!([ca.fingerprint()]));
    assert!(log.iter().all(|e| !e.target_json.contains(&added.secret)));
    assert!(
        log.iter()
            .any(|e| e.method == "RemoveWebhook" && e.result == "NOT_FOUND")
    );
    s.finish().await;
}

/// An https receiver whose certificate a company CA issued: a webhook that
/// carries that CA delivers to it; one that trusts the system's roots only,
/// or another CA, fails at the handshake, says so in its delivery's last
/// error, retries, and delivers nothing.
async fn an_https_receiver_is_trusted_through_the_webhooks_ca(backend: Backend) {
    let s = setup(backend, fast_retries).await;
    let storage = Storage::connect(&s.db.url, 2).await.unwrap();
    let mut admin = s.server.admin().await;
    let (company_ca, _) = FleetCa::create("Example Corp Webhook CA", SystemTime::now()).unwrap();
    let (other_ca, _) = FleetCa::create("Some Other CA", SystemTime::now()).unwrap();
    let receiver = Receiver::start_https(&company_ca).await;
    assert!(receiver.url.starts_with("https://127.0.0.1:"));

    let trusting = add_webhook_with_ca(
        &mut admin,
        &receiver.url,
        &[],
        company_ca.certificates_pem(),
    )
    .await;
    let system_only = add_webhook(&mut admin, &receiver.url, &[]).await;
    let wrong_ca =
        add_webhook_with_ca(&mut admin, &receiver.url, &[], other_ca.certificates_pem()).await;
    let trusting_id = trusting.webhook.as_ref().unwrap().id.clone();

    let seqs = emit(
        &storage,
        &[("rollout.started", "ro-1"), ("rollout.completed", "ro-1")],
    )
    .await;
    let delivered = receiver
        .wait_for_deliveries(2, Duration::from_secs(20))
        .await;
    for request in &delivered {
        verify(&trusting.secret, request);
        assert!(
            request.delivery.starts_with(&format!("{trusting_id}-")),
            "{request:?}"
        );
    }
    let kinds: Vec<&str> = delivered.iter().map(|r| r.event.as_str()).collect();
    assert_eq!(kinds, ["rollout.started", "rollout.completed"]);
    let listed = settled_deliveries(&mut admin, &trusting_id, 2).await;
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|d| d.state() == v1::DeliveryState::Delivered && d.last_http_status == 200),
        "{listed:?}"
    );

    for hook in [&system_only, &wrong_ca] {
        let id = &hook.webhook.as_ref().unwrap().id;
        let deadline = Instant::now() + Duration::from_secs(20);
        let first = loop {
            let listed = deliveries(&mut admin, id).await;
            let first = listed.into_iter().find(|d| d.event_seq == seqs[0]).unwrap();
            // Retried: failed at least twice, with more to come.
            if first.attempts >= 2 {
                break first;
            }
            assert!(Instant::now() < deadline, "{first:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(first.state(), v1::DeliveryState::Pending, "{first:?}");
        assert_eq!(first.last_http_status, 0);
        assert!(
            first
                .last_error
                .starts_with("TLS: certificate for 127.0.0.1 is not valid: issued by a CA this"),
            "{first:?}"
        );
        assert!(!first.last_error.contains('\n'), "{first:?}");
        assert!(first.next_attempt_at_unix_ms > first.last_attempt_at_unix_ms);
    }
    // The failures were refused handshakes, and nothing reached the
    // receiver but the trusting webhook's two deliveries.
    assert!(
        receiver.failed_handshakes.load(Ordering::SeqCst) >= 4,
        "{} failed handshakes",
        receiver.failed_handshakes.load(Ordering::SeqCst)
    );
    assert_eq!(receiver.requests().len(), 2, "{:?}", receiver.requests());
    s.finish().await;
}

/// The dispatcher's cursor is in the database: after a restart, events
/// from before are not delivered again and events from while it was down
/// are delivered.
async fn a_restart_neither_repeats_nor_loses_deliveries(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(backend, dir.path()).await;
    let mut config = common::config(dir.path(), &db);
    fast_retries(&mut config);
    let server = TestServer::start(config.clone()).await;
    let storage = Storage::connect(&db.url, 2).await.unwrap();
    let receiver = Receiver::start(0).await;
    let hook = add_webhook(&mut server.admin().await, &receiver.url, &[]).await;
    emit(
        &storage,
        &[("rollout.started", "ro-1"), ("rollout.paused", "ro-1")],
    )
    .await;
    receiver
        .wait_for_deliveries(2, Duration::from_secs(10))
        .await;
    server.stop().await;

    emit(&storage, &[("rollout.resumed", "ro-1")]).await;
    let server = TestServer::start(config).await;
    emit(&storage, &[("rollout.completed", "ro-1")]).await;
    let delivered = receiver
        .wait_for_deliveries(4, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.requests().len(), 4, "{:?}", receiver.requests());
    let kinds: Vec<String> = delivered.iter().map(|r| r.event.clone()).collect();
    assert_eq!(
        kinds,
        [
            "rollout.started",
            "rollout.paused",
            "rollout.resumed",
            "rollout.completed"
        ]
    );
    let mut admin = server.admin().await;
    let id = &hook.webhook.as_ref().unwrap().id;
    assert_eq!(deliveries(&mut admin, id).await.len(), 4);
    server.stop().await;
    storage.close().await;
    db.cleanup().await;
}

on_both_backends!(
    deliveries_are_retried_until_the_receiver_recovers,
    a_dead_receiver_does_not_delay_a_healthy_one,
    webhooks_are_validated_listed_and_removed,
    a_restart_neither_repeats_nor_loses_deliveries,
    an_https_receiver_is_trusted_through_the_webhooks_ca,
);
