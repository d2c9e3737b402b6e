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
use axum::extract::{Path, Request};
use axum::response::Response;
use posfleet_bundle::tuf::{ROOT, SNAPSHOT, TARGETS, TIMESTAMP};
use std::sync::Arc;
use tower::ServiceExt;

/// How old the fleet gauges (`posfleet_devices`, `posfleet_stores`) may be
/// when a scrape shows them: however often `/metrics` is asked for, the
/// devices table is counted at most once per this.
pub const FLEET_GAUGES_MAX_AGE: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct HttpState {
    repository: Arc<Repository>,
    storage: Storage,
    metrics: Metrics,
    offline_after_missed_heartbeats: i64,
    stopping: watch::Receiver<bool>,
    /// When the fleet gauges were last counted; held while counting, so
    /// concurrent scrapes share one count.
    fleet_counted_at: Arc<Mutex<Option<Instant>>>,
}

/// `stopping` turns true at the shutdown signal; `/readyz` then answers 503.
pub fn router(
    repository: Arc<Repository>,
    metrics: Metrics,
    offline_after_missed_heartbeats: u32,
    stopping: watch::Receiver<bool>,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .route("/repo/{*path}", get(repo_file))
        .with_state(HttpState {
            storage: repository.storage().clone(),
            repository,
            metrics,
            offline_after_missed_heartbeats: offline_after_missed_heartbeats.into(),
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

/// Counts devices and stores unless that was done within
/// `FLEET_GAUGES_MAX_AGE` (a failed count waits as long: a database in
/// trouble is not asked again by every scrape).
async fn refresh_fleet_gauges(state: &HttpState) {
    let mut counted_at = state.fleet_counted_at.lock().await;
    if counted_at.is_some_and(|at| at.elapsed() < FLEET_GAUGES_MAX_AGE) {
        return;
    }
    *counted_at = Some(Instant::now());
    let counts = tokio::time::timeout(Duration::from_secs(5), async {
        let devices = state
            .storage
            .count_devices(now_ms(), state.offline_after_missed_heartbeats)
            .await?;
        let stores = state.storage.count_stores().await?;
        Ok::<_, Error>((devices, stores))
    })
    .await;
    match counts {
        Ok(Ok(((online, total), stores))) => {
            state
                .metrics
                .devices
                .with_label_values(&["online"])
                .set(online);
            state
                .metrics
                .devices
                .with_label_values(&["offline"])
                .set(total - online);
            state.metrics.stores.set(stores);
        }
        Ok(Err(error)) => tracing::warn!(%error, "Cannot count devices for /metrics."),
        Err(_) => tracing::warn!("Counting devices for /metrics took over 5s."),
    }
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
    Path(path): Path<String>,
    request: Request,
) -> Response {
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

/// A blob from the store, with `Range` support; a bundle's bytes are
/// counted as they are handed to the connection (what the stores' WAN links
/// carry).
async fn serve_blob(state: &HttpState, hash: &str, request: Request, counted: bool) -> Response {
    let Some(file) = state.repository.blobs().local_path(hash) else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    let response = match tower_http::services::ServeFile::new(file)
        .oneshot(request)
        .await
    {
        Ok(response) => response.map(axum::body::Body::new),
        Err(never) => match never {},
    };
    if !counted {
        return response;
    }
    let sent = state.metrics.target_bytes_sent.clone();
    response.map(|body| {
        axum::body::Body::from_stream(tokio_stream::StreamExt::map(
            body.into_data_stream(),
            move |chunk| {
                if let Ok(bytes) = &chunk {
                    sent.inc_by(bytes.len() as u64);
                }
                chunk
            },
        ))
    })
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
}
