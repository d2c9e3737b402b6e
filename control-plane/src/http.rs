//! HTTP listener: `/healthz` (the process runs), `/readyz` (the database
//! answers), `/metrics` (Prometheus text format).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::time::Duration;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::now_ms;
use crate::storage::Storage;

#[derive(Clone)]
struct HttpState {
    storage: Storage,
    metrics: Metrics,
    offline_after_missed_heartbeats: i64,
    stopping: watch::Receiver<bool>,
}

/// `stopping` turns true at the shutdown signal; `/readyz` then answers 503.
pub fn router(
    storage: Storage,
    metrics: Metrics,
    offline_after_missed_heartbeats: u32,
    stopping: watch::Receiver<bool>,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(HttpState {
            storage,
            metrics,
            offline_after_missed_heartbeats: offline_after_missed_heartbeats.into(),
            stopping,
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
    // Fleet gauges are read from the database at scrape time, not per heartbeat.
    let counts = tokio::time::timeout(Duration::from_secs(5), async {
        let devices = state
            .storage
            .count_devices(now_ms(), state.offline_after_missed_heartbeats)
            .await?;
        let stores = state.storage.count_stores().await?;
        Ok::<_, sqlx::Error>((devices, stores))
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
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
