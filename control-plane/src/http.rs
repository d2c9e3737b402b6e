//! HTTP listener: `/healthz` (the process runs), `/readyz` (the database
//! answers), `/metrics` (Prometheus text format), `/repo/` (the bundle
//! repository). Nothing here costs a database read per request: fleet
//! gauges are counted at most every `FLEET_GAUGES_MAX_AGE`, repository
//! metadata comes from `MetadataCache`.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, watch};

use crate::error::Error;
use crate::metrics::Metrics;
use crate::now_ms;
use crate::repository::Repository;
use crate::storage::Storage;
use axum::extract::{ConnectInfo, Path, Request};
use axum::response::Response;
use posfleet_bundle::tuf::{ROOT, SNAPSHOT, TARGETS, TIMESTAMP};
use std::collections::HashMap;
use std::sync::Arc;

/// How old the fleet gauges (`crate::metrics::fleet`) may be when a scrape
/// shows them: however often `/metrics` is asked for, the database is read
/// for them at most once per this.
pub const FLEET_GAUGES_MAX_AGE: Duration = Duration::from_secs(5);
/// Longest a refresh of the fleet gauges may take; the scrape then shows
/// the previous values.
const FLEET_GAUGES_TIMEOUT: Duration = Duration::from_secs(5);

/// Who may read what from `/repo/` when the control plane serves TLS: TUF
/// metadata any enrolled, unrevoked till; a bundle's bytes and chunk list
/// only a till of a store that has the bundle in its desired state (for
/// itself or for any of its tills, which it may serve over P2P).
#[derive(Clone)]
pub(crate) struct RepoAccess {
    pub desired: crate::desired::DesiredCache,
    pub tls: Arc<crate::tls::Tls>,
    /// Each published bundle's (name, version) by the hashes of its bytes
    /// and of its chunk list; read again when a hash is not in it (at most
    /// once per `BUNDLES_REREAD`).
    bundles: Arc<Mutex<(Instant, Arc<BundlesByHash>)>>,
}

/// (name, version) of each published bundle, by the hash of its bytes and
/// by the hash of its chunk list.
type BundlesByHash = HashMap<String, (String, String)>;

/// Least time between two reads of the published bundles for `/repo/`.
const BUNDLES_REREAD: Duration = Duration::from_secs(1);

impl RepoAccess {
    pub fn new(desired: crate::desired::DesiredCache, tls: Arc<crate::tls::Tls>) -> RepoAccess {
        RepoAccess {
            desired,
            tls,
            bundles: Arc::new(Mutex::new((
                Instant::now() - BUNDLES_REREAD,
                Arc::new(HashMap::new()),
            ))),
        }
    }

    /// The bundle a hash belongs to, from the published bundles.
    async fn bundle_of(
        &self,
        storage: &Storage,
        hash: &str,
    ) -> Result<Option<(String, String)>, Error> {
        let mut bundles = self.bundles.lock().await;
        if let Some(found) = bundles.1.get(hash) {
            return Ok(Some(found.clone()));
        }
        if bundles.0.elapsed() < BUNDLES_REREAD {
            return Ok(None);
        }
        let mut by_hash = HashMap::new();
        for bundle in storage.list_bundles(None).await? {
            let key = (bundle.name.clone(), bundle.version.clone());
            by_hash.insert(bundle.sha256.clone(), key.clone());
            by_hash.insert(bundle.chunks_sha256.clone(), key);
        }
        *bundles = (Instant::now(), Arc::new(by_hash));
        Ok(bundles.1.get(hash).cloned())
    }

    /// `None` if the till may read the blob `hash`; else the refusal.
    async fn refusal(
        &self,
        storage: &Storage,
        peer: &crate::tls::Peer,
        hash: Option<&str>,
    ) -> Option<Response> {
        let forbidden = |message: String| Some((StatusCode::FORBIDDEN, message).into_response());
        let Some(device) = &peer.device else {
            return forbidden(
                "present the device certificate issued at enrollment: this repository serves enrolled tills only\n".into(),
            );
        };
        match self.tls.admit(device) {
            Ok(()) => {}
            Err(crate::tls::Refusal::Revoked) => {
                return forbidden(format!("device {} is revoked\n", device.device_id));
            }
            Err(crate::tls::Refusal::RetiredCa) => {
                return forbidden(
                    "this connection's certificate is from a retired CA: reconnect with the renewed one\n".into(),
                );
            }
        }
        let hash = hash?;
        let bundle = match self.bundle_of(storage, hash).await {
            Ok(Some(bundle)) => bundle,
            Ok(None) => return Some((StatusCode::NOT_FOUND, "not found\n").into_response()),
            Err(error) => {
                tracing::error!(%error, "Cannot read the published bundles.");
                return Some(
                    (StatusCode::SERVICE_UNAVAILABLE, "repository unavailable\n").into_response(),
                );
            }
        };
        let desired = match self.desired.get(&device.store_id).await {
            Ok(desired) => desired,
            Err(error) => {
                tracing::error!(%error, store_id = %device.store_id, "Cannot read a store's desired state.");
                return Some(
                    (StatusCode::SERVICE_UNAVAILABLE, "repository unavailable\n").into_response(),
                );
            }
        };
        let wanted = desired
            .store_bundles
            .iter()
            .chain(desired.device_bundles.values().flatten())
            .any(|row| row.name == bundle.0 && row.version == bundle.1);
        if wanted {
            return None;
        }
        tracing::warn!(
            device_id = %device.device_id,
            store_id = %device.store_id,
            bundle = %format!("{}@{}", bundle.0, bundle.1),
            "Refused a bundle not meant for the till's store."
        );
        forbidden(format!(
            "{}@{} is not assigned to store {}\n",
            bundle.0, bundle.1, device.store_id
        ))
    }
}

#[derive(Clone)]
struct HttpState {
    /// Set when the control plane serves TLS.
    access: Option<RepoAccess>,
    repository: Arc<Repository>,
    storage: Storage,
    metrics: Metrics,
    offline_after_missed_heartbeats: i64,
    /// Set: requests for blobs are redirected to presigned URLs of the
    /// object store, valid this long.
    redirect_expiry: Option<Duration>,
    stopping: watch::Receiver<bool>,
    /// When the fleet gauges were last counted; held while counting, so
    /// concurrent scrapes share one count.
    fleet_counted_at: Arc<Mutex<Option<Instant>>>,
}

/// `stopping` turns true at the shutdown signal; `/readyz` then answers
/// 503. With `redirect_expiry`, `/repo/` redirects blob requests to
/// presigned URLs of the object store valid that long.
pub fn router(
    repository: Arc<Repository>,
    metrics: Metrics,
    offline_after_missed_heartbeats: u32,
    redirect_expiry: Option<Duration>,
    stopping: watch::Receiver<bool>,
    access: Option<RepoAccess>,
) -> Router {
    let measured = metrics.clone();
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .route("/repo/{*path}", get(repo_file))
        .layer(axum::middleware::from_fn(move |request, next| {
            measure(measured.clone(), request, next)
        }))
        .with_state(HttpState {
            access,
            storage: repository.storage().clone(),
            repository,
            metrics,
            offline_after_missed_heartbeats: offline_after_missed_heartbeats.into(),
            redirect_expiry,
            stopping,
            fleet_counted_at: Arc::new(Mutex::new(None)),
        })
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if *state.stopping.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    match tokio::time::timeout(Duration::from_secs(2), state.storage.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n"),
        Ok(Err(error)) => {
            tracing::warn!(%error, "Not ready: the database does not answer.");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n")
        }
        Err(_) => {
            tracing::warn!("Not ready: the database gave no answer within 2s.");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n")
        }
    }
}

async fn metrics_handler(State(state): State<HttpState>) -> impl IntoResponse {
    refresh_fleet_gauges(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Reads the fleet gauges unless that was done within
/// `FLEET_GAUGES_MAX_AGE` (a failed read waits as long: a database in
/// trouble is not asked again by every scrape).
async fn refresh_fleet_gauges(state: &HttpState) {
    let mut counted_at = state.fleet_counted_at.lock().await;
    if counted_at.is_some_and(|at| at.elapsed() < FLEET_GAUGES_MAX_AGE) {
        return;
    }
    *counted_at = Some(Instant::now());
    let metrics = &state.metrics;
    metrics.observe_pool(&state.storage);
    if let Some(access) = &state.access {
        for (certificate, not_after) in access.tls.expiries() {
            metrics
                .certificate_expiry
                .with_label_values(&[certificate])
                .set(not_after as f64);
        }
    }
    let now = now_ms();
    let read = tokio::time::timeout(FLEET_GAUGES_TIMEOUT, async {
        let snapshot = state
            .storage
            .fleet_snapshot(now, state.offline_after_missed_heartbeats)
            .await?;
        let stores = state.storage.count_stores().await?;
        Ok::<_, Error>((snapshot, stores))
    })
    .await;
    match read {
        Ok(Ok((snapshot, stores))) => {
            metrics
                .database_acquire_seconds
                .observe(snapshot.acquire_wait.as_secs_f64());
            metrics.fleet.apply(&snapshot, now);
            metrics.fleet.set_stores(stores);
        }
        Ok(Err(error)) => tracing::warn!(%error, "Cannot read the fleet gauges for /metrics."),
        Err(_) => tracing::warn!(
            "Reading the fleet gauges for /metrics took over {}s; the scrape shows older values.",
            FLEET_GAUGES_TIMEOUT.as_secs()
        ),
    }
}

/// The `route` label of a request's path (`crate::metrics::HTTP_ROUTES`).
fn route_of(path: &str) -> &'static str {
    match path {
        "/metrics" => "metrics",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        p if p.starts_with("/repo/targets/") => "repo_target",
        p if p.starts_with("/repo/") => "repo_metadata",
        _ => "other",
    }
}

/// Counts and times every HTTP request, by route and status code.
async fn measure(metrics: Metrics, request: Request, next: axum::middleware::Next) -> Response {
    /// Counts a request in flight until it is answered or dropped.
    struct InFlight(prometheus::IntGauge);
    impl Drop for InFlight {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    let route = route_of(request.uri().path());
    let in_flight = InFlight(metrics.http_in_flight.with_label_values(&[route]));
    in_flight.0.inc();
    let started = Instant::now();
    let response = next.run(request).await;
    drop(in_flight);
    metrics
        .http_duration
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .http_requests
        .with_label_values(&[route, response.status().as_str()])
        .inc();
    response
}

/// What a path under `/repo/` names.
#[derive(Debug, PartialEq, Eq)]
enum RepoPath<'a> {
    /// The newest file of a role (`timestamp.json`, and `root.json` for people).
    Latest(&'static str),
    /// `<version>.<role>.json`.
    Versioned(&'static str, i64),
    /// A bundle by SHA-256: `targets/<name>/<sha256>.<version>` (TUF's
    /// consistent-snapshot target path).
    Target(&'a str),
    /// A chunk list by SHA-256: `chunks/<sha256>`.
    Chunks(&'a str),
}

fn parse_repo_path(path: &str) -> Option<RepoPath<'_>> {
    match path {
        "timestamp.json" => return Some(RepoPath::Latest(TIMESTAMP)),
        "root.json" => return Some(RepoPath::Latest(ROOT)),
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("chunks/") {
        return Some(RepoPath::Chunks(rest)).filter(|_| rest.len() == 64);
    }
    if let Some(rest) = path.strip_prefix("targets/") {
        let file = rest.rsplit('/').next()?;
        let (hash, _) = file.split_once('.')?;
        return Some(RepoPath::Target(hash)).filter(|_| hash.len() == 64);
    }
    let (version, role) = path.strip_suffix(".json")?.split_once('.')?;
    let role = [ROOT, SNAPSHOT, TARGETS].into_iter().find(|r| *r == role)?;
    Some(RepoPath::Versioned(
        role,
        version.parse().ok().filter(|v: &i64| *v > 0)?,
    ))
}

/// The bundle repository: TUF metadata from memory (`MetadataCache`),
/// bundle bytes and chunk lists from the blob store (with `Range`, so
/// downloads resume).
async fn repo_file(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<crate::tls::Peer>,
    Path(path): Path<String>,
    request: Request,
) -> Response {
    if let Some(access) = &state.access {
        let blob = match parse_repo_path(&path) {
            Some(RepoPath::Target(hash) | RepoPath::Chunks(hash)) => Some(hash),
            _ => None,
        };
        if let Some(refusal) = access.refusal(&state.storage, &peer, blob).await {
            return refusal;
        }
    }
    let not_found = || (StatusCode::NOT_FOUND, "not found\n").into_response();
    let metadata = |body: Arc<String>, cache: &'static str| {
        (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, cache),
            ],
            body.as_ref().clone(),
        )
            .into_response()
    };
    let failed = |error: Arc<Error>| {
        tracing::error!(%error, "Cannot read repository metadata.");
        (StatusCode::SERVICE_UNAVAILABLE, "repository unavailable\n").into_response()
    };
    let files = state.repository.metadata_cache();
    match parse_repo_path(&path) {
        Some(RepoPath::Latest(role)) => match files.latest(role).await {
            Ok(Some(body)) => metadata(body, "no-cache"),
            Ok(None) => not_found(),
            Err(e) => failed(e),
        },
        Some(RepoPath::Versioned(role, version)) => match files.version(role, version).await {
            Ok(Some(body)) => metadata(body, "public, max-age=31536000, immutable"),
            Ok(None) => not_found(),
            Err(e) => failed(e),
        },
        Some(RepoPath::Target(hash)) => serve_blob(&state, hash, request, true).await,
        Some(RepoPath::Chunks(hash)) => serve_blob(&state, hash, request, false).await,
        None => not_found(),
    }
}

/// Blobs never change under their name: any cache may keep them.
const BLOB_CACHE_CONTROL: &str = "public, max-age=31536000, immutable";
/// How long a till is asked to wait when the object store does not answer.
const BLOB_RETRY_AFTER_SECONDS: u64 = 10;

/// What part of a blob a request gets.
#[derive(Debug, PartialEq, Eq)]
enum BlobRange {
    Whole,
    Part(std::ops::Range<u64>),
    Unsatisfiable,
}

/// The part of a blob of `size` bytes (whose ETag is `etag`) that the
/// `Range` and `If-Range` headers ask for. One range at most, as tower-http's
/// file server serves.
fn blob_range(range: Option<&str>, if_range: Option<&str>, etag: &str, size: u64) -> BlobRange {
    let Some(range) = range else {
        return BlobRange::Whole;
    };
    // The copy the client has is not this one: it gets the whole.
    if if_range.is_some_and(|tag| tag != etag) {
        return BlobRange::Whole;
    }
    match http_range_header::parse_range_header(range).and_then(|r| r.validate(size)) {
        Ok(ranges) if ranges.len() == 1 => BlobRange::Part(*ranges[0].start()..ranges[0].end() + 1),
        _ => BlobRange::Unsatisfiable,
    }
}

/// A blob from the store, streamed, with `Range` support (so downloads
/// resume) and immutable caching; or, with `repo_redirect_to_object_store`,
/// a redirect to a short-lived presigned URL of the object store. An object
/// store that does not answer gets the till a 503 with `Retry-After`, never
/// a 404. A bundle's bytes are counted as they are handed to the connection
/// (what the stores' WAN links carry); redirected ones are not.
async fn serve_blob(state: &HttpState, hash: &str, request: Request, counted: bool) -> Response {
    let blobs = state.repository.blobs();
    let failed = |error: crate::blobs::BlobError| {
        tracing::error!(%error, sha256 = %hash, "Cannot serve a blob.");
        match error {
            crate::blobs::BlobError::Disk { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "cannot read the blob\n").into_response()
            }
            _ => (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, BLOB_RETRY_AFTER_SECONDS.to_string())],
                "the bundle store is unavailable; retry later\n",
            )
                .into_response(),
        }
    };
    let size = match blobs.head(hash).await {
        Ok(Some(info)) => info.size,
        Ok(None) => return (StatusCode::NOT_FOUND, "not found\n").into_response(),
        Err(error) => return failed(error),
    };
    if let Some(expiry) = state.redirect_expiry {
        match blobs.presigned_url(hash, expiry).await {
            Ok(Some(url)) => {
                return (
                    StatusCode::TEMPORARY_REDIRECT,
                    // The URL expires: no cache may keep the redirect.
                    [
                        (header::LOCATION, url),
                        (header::CACHE_CONTROL, "no-store".into()),
                    ],
                )
                    .into_response();
            }
            Ok(None) => {}
            Err(error) => return failed(error),
        }
    }
    let etag = format!("\"{hash}\"");
    let headers = request.headers();
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
    };
    let common = [
        (header::CACHE_CONTROL, BLOB_CACHE_CONTROL.to_string()),
        (header::ETAG, etag.clone()),
        (header::ACCEPT_RANGES, "bytes".to_string()),
    ];
    if text(header::IF_NONE_MATCH).is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag)) {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    let (status, range) = match blob_range(text(header::RANGE), text(header::IF_RANGE), &etag, size)
    {
        BlobRange::Whole => (StatusCode::OK, 0..size),
        BlobRange::Part(range) => (StatusCode::PARTIAL_CONTENT, range),
        BlobRange::Unsatisfiable => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response();
        }
    };
    let mut response = (status, common).into_response();
    let response_headers = response.headers_mut();
    response_headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    response_headers.insert(header::CONTENT_LENGTH, (range.end - range.start).into());
    if status == StatusCode::PARTIAL_CONTENT {
        let value = format!("bytes {}-{}/{size}", range.start, range.end - 1);
        if let Ok(value) = header::HeaderValue::try_from(value) {
            response_headers.insert(header::CONTENT_RANGE, value);
        }
    }
    if request.method() == axum::http::Method::HEAD || range.is_empty() {
        return response;
    }
    let stream = match blobs.read(hash, range).await {
        Ok(stream) => stream,
        Err(error) => return failed(error),
    };
    let sent = counted.then(|| state.metrics.target_bytes_sent.clone());
    let counted_stream = tokio_stream::StreamExt::map(stream, move |chunk| {
        if let (Some(sent), Ok(bytes)) = (&sent, &chunk) {
            sent.inc_by(bytes.len() as u64);
        }
        chunk
    });
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, axum::body::Body::from_stream(counted_stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_paths() {
        let hash = "a".repeat(64);
        let cases = [
            (
                "timestamp.json".to_string(),
                Some(RepoPath::Latest(TIMESTAMP)),
            ),
            ("root.json".to_string(), Some(RepoPath::Latest(ROOT))),
            (
                "3.root.json".to_string(),
                Some(RepoPath::Versioned(ROOT, 3)),
            ),
            (
                "12.targets.json".to_string(),
                Some(RepoPath::Versioned(TARGETS, 12)),
            ),
            ("0.snapshot.json".to_string(), None),
            ("1.timestamp.json".to_string(), None),
            ("x.root.json".to_string(), None),
            (
                format!("targets/pos-app/{hash}.1.1.0"),
                Some(RepoPath::Target(&hash)),
            ),
            (format!("chunks/{hash}"), Some(RepoPath::Chunks(&hash))),
            ("targets/pos-app/1.1.0".to_string(), None),
            ("chunks/abc".to_string(), None),
            ("../../etc/passwd".to_string(), None),
        ];
        for (path, expected) in &cases {
            assert_eq!(parse_repo_path(path), *expected, "{path}");
        }
    }

    #[test]
    fn blob_ranges() {
        let etag = "\"abc\"";
        let cases = [
            (None, None, BlobRange::Whole),
            (Some("bytes=0-99"), None, BlobRange::Part(0..100)),
            (Some("bytes=100-"), None, BlobRange::Part(100..1000)),
            (Some("bytes=-10"), None, BlobRange::Part(990..1000)),
            (Some("bytes=900-5000"), None, BlobRange::Part(900..1000)),
            (Some("bytes=999-999"), None, BlobRange::Part(999..1000)),
            (Some("bytes=1000-"), None, BlobRange::Unsatisfiable),
            (Some("bytes=0-1,5-9"), None, BlobRange::Unsatisfiable),
            (Some("pieces=1-2"), None, BlobRange::Unsatisfiable),
            (Some("bytes=5-9"), Some(etag), BlobRange::Part(5..10)),
            (Some("bytes=5-9"), Some("\"other\""), BlobRange::Whole),
        ];
        for (range, if_range, expected) in cases {
            assert_eq!(
                blob_range(range, if_range, etag, 1000),
                expected,
                "{range:?} {if_range:?}"
            );
        }
    }
}
