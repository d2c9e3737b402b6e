//! Webhooks: events delivered as signed JSON to HTTP receivers.
//!
//! The dispatcher is one task of its own. It only *reads* events (the engine
//! never waits for it) and:
//!
//! 1. fans events out: each event after `webhook_cursor` becomes one
//!    delivery row per webhook whose filter matches it (and that was added
//!    before it was stored), in the same transaction that moves the cursor — so
//!    a restart neither repeats nor skips one;
//! 2. attempts due deliveries: a delivery is attempted only when no earlier
//!    delivery of the same rollout to the same webhook is still pending, so
//!    a receiver sees a rollout's events in order (an event given up on no
//!    longer holds back the next). Each attempt is its own task, with a
//!    request timeout; at most `max_in_flight_per_webhook` per webhook and
//!    `max_in_flight` in all, so a slow or dead receiver holds a few slots
//!    and never delays the others;
//! 3. records every attempt (attempts, HTTP status, error, next attempt) and
//!    retries failures with exponential backoff and jitter until
//!    `max_attempts`, then gives up (`failed`).
//!
//! Several replicas may run a dispatcher: moving the cursor is a
//! conditional UPDATE, and an attempt starts only after claiming its
//! delivery with another (`claimed_until_ms`), so no event is fanned out
//! twice and no delivery is attempted by two replicas at once. A replica that
//! dies mid-attempt leaves a claim that runs out, and the delivery is
//! attempted again: delivery is at least once, and receivers dedupe on
//! `X-Posfleet-Delivery`.
//!
//! A request: `POST <url>` with the body
//! `{"seq":…,"kind":…,"at":…,"rollout_id":…,"device_id":…,"data":{…}}` and
//! the headers `X-Posfleet-Event` (the kind), `X-Posfleet-Delivery`
//! (`<webhook id>-<seq>`, the same on every attempt), `X-Posfleet-Timestamp`
//! (Unix seconds of the attempt) and `X-Posfleet-Signature:
//! sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`. Any 2xx
//! answer delivers it; redirects are not followed. An https:// receiver's
//! certificate is checked against the system's roots and the webhook's own
//! CA, if it has one ([`tls`]).

pub mod tls;

use hmac::{Hmac, Mac};
use posfleet_proto::v1;
use rand::Rng;
use serde_json::{Value, json};
use sha2::Sha256;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::Status;

use crate::config::Config;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::now_ms;
use crate::storage::{
    AttemptRecord, DeliveryRecord, DeliveryState, EventRecord, NewDelivery, Storage, WebhookRecord,
};
use crate::validate::invalid;

/// Longest webhook URL accepted.
pub const MAX_URL_CHARS: usize = 2048;
/// Most entries in an event filter.
pub const MAX_EVENT_FILTERS: usize = 32;
/// Longest event kind or pattern in a filter.
const MAX_EVENT_FILTER_CHARS: usize = 128;
/// Events read per fan-out pass.
const FAN_OUT_PAGE: u32 = 500;
/// Finished deliveries are kept this long for `ListWebhookDeliveries`.
const FINISHED_DELIVERY_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often finished deliveries are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// How long a stopping dispatcher waits for attempts in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Most webhooks at once (the dispatcher looks at each one every pass).
pub const MAX_WEBHOOKS: usize = 100;
/// Prefix of webhook secrets; the whole string, prefix included, is the
/// HMAC key.
pub const SECRET_PREFIX: &str = "pfw_";

/// How the dispatcher paces itself.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Limit of one request, connection included.
    pub request_timeout: Duration,
    /// Attempts before a delivery is given up.
    pub max_attempts: u32,
    /// Wait after the first failure; doubled after each next one.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How often events and due deliveries are looked for.
    pub poll_interval: Duration,
    pub max_in_flight: usize,
    pub max_in_flight_per_webhook: usize,
}

impl WebhookSettings {
    pub fn from_config(config: &Config) -> WebhookSettings {
        let retry_initial = Duration::from_millis(config.webhook_retry_initial_milliseconds);
        WebhookSettings {
            request_timeout: Duration::from_secs(config.webhook_timeout_seconds),
            max_attempts: config.webhook_max_attempts,
            retry_initial,
            retry_max: Duration::from_secs(config.webhook_retry_max_seconds),
            // A retry is never looked for much later than it is due.
            poll_interval: retry_initial.clamp(Duration::from_millis(100), Duration::from_secs(1)),
            max_in_flight: 32,
            max_in_flight_per_webhook: 4,
        }
    }

    /// A claim outlives the attempt it covers, with room for recording it.
    fn claim_duration(&self) -> Duration {
        self.request_timeout * 2 + Duration::from_secs(30)
    }

    /// The wait before the attempt after `attempts` failed ones: the initial
    /// wait doubled each time, capped, with the upper half jittered.
    pub fn backoff(&self, attempts: u32, rng: &mut impl Rng) -> Duration {
        let doublings = attempts.saturating_sub(1).min(30);
        let full = self
            .retry_initial
            .saturating_mul(1u32 << doublings)
            .min(self.retry_max);
        let half = full / 2;
        half + half.mul_f64(rng.gen_range(0.0..=1.0))
    }
}

/// A webhook as the API shows it: without its secret.
pub fn webhook_view(w: WebhookRecord) -> v1::Webhook {
    v1::Webhook {
        id: w.id,
        url: w.url,
        events: w.events,
        created_at_unix_ms: w.created_at_ms,
        cas: tls::ca_views(&w.ca_pem),
    }
}

pub fn delivery_view(d: DeliveryRecord) -> v1::WebhookDelivery {
    let state = match d.state {
        DeliveryState::Pending => v1::DeliveryState::Pending,
        DeliveryState::Delivered => v1::DeliveryState::Delivered,
        DeliveryState::Failed => v1::DeliveryState::Failed,
    };
    v1::WebhookDelivery {
        webhook_id: d.webhook_id,
        event_seq: d.event_seq,
        event_kind: d.event_kind,
        state: state as i32,
        attempts: d.attempts,
        last_http_status: d.last_http_status,
        last_error: d.last_error,
        last_attempt_at_unix_ms: d.last_attempt_at_ms,
        next_attempt_at_unix_ms: d.next_attempt_at_ms,
    }
}

// ----- validation -----

/// A receiver URL: absolute http or https, with a host, without
/// credentials (URLs are listed to every admin).
pub fn validate_url(url: &str) -> Result<String, Status> {
    if url.is_empty() {
        return Err(invalid("url", "is required"));
    }
    if url.chars().count() > MAX_URL_CHARS {
        return Err(invalid(
            "url",
            format!("must be at most {MAX_URL_CHARS} characters"),
        ));
    }
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| invalid("url", format!("`{url}` is not a URL: {e}")))?;
    match parsed.scheme() {
        "http" | "https" => {}
        other => {
            return Err(invalid(
                "url",
                format!("must be http:// or https://, not {other}://"),
            ));
        }
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("url", "must name a host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid(
            "url",
            "must not carry credentials; deliveries are authenticated by their signature",
        ));
    }
    Ok(parsed.to_string())
}

/// An event filter: exact kinds (`rollout.paused`) or prefixes ending in
/// `.*` (`rollout.*`); empty for every event. Duplicates are dropped.
pub fn validate_events(events: &[String]) -> Result<Vec<String>, Status> {
    if events.len() > MAX_EVENT_FILTERS {
        return Err(invalid(
            "events",
            format!("at most {MAX_EVENT_FILTERS} kinds or patterns"),
        ));
    }
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    };
    let mut out: Vec<String> = Vec::new();
    for event in events {
        let event = event.trim();
        let kind = event.strip_suffix(".*").unwrap_or(event);
        if event.chars().count() > MAX_EVENT_FILTER_CHARS || !kind.split('.').all(segment_ok) {
            return Err(invalid(
                "events",
                format!(
                    "`{event}` is neither an event kind such as rollout.paused nor a prefix \
                     such as rollout.*"
                ),
            ));
        }
        if !out.iter().any(|e| e == event) {
            out.push(event.to_string());
        }
    }
    Ok(out)
}

/// Whether an event of `kind` goes to a webhook with this filter.
pub fn matches(filter: &[String], kind: &str) -> bool {
    filter.is_empty()
        || filter.iter().any(|f| match f.strip_suffix('*') {
            Some(prefix) => kind.starts_with(prefix),
            None => f == kind,
        })
}

// ----- requests -----

/// The body delivered for an event.
pub fn payload(event: &EventRecord) -> String {
    let data: Value = serde_json::from_str(&event.data_json).unwrap_or_else(|_| json!({}));
    let at = chrono::DateTime::from_timestamp_millis(event.at_ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    json!({
        "seq": event.seq,
        "kind": event.kind,
        "at": at,
        "rollout_id": event.rollout_id,
        "device_id": event.device_id,
        "data": data,
    })
    .to_string()
}

/// `sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`.
pub fn signature(secret: &str, timestamp: i64, body: &str) -> String {
    // HMAC takes keys of any length.
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// `X-Posfleet-Delivery`: the same on every attempt.
pub fn delivery_id(webhook_id: &str, event_seq: u64) -> String {
    format!("{webhook_id}-{event_seq}")
}

/// How one request went.
#[derive(Debug)]
enum Outcome {
    Delivered(u16),
    HttpError(u16),
    Timeout(String),
    NetworkError(String),
}

impl Outcome {
    fn metric_label(&self) -> &'static str {
        match self {
            Outcome::Delivered(_) => "ok",
            Outcome::HttpError(_) => "http_error",
            Outcome::Timeout(_) => "timeout",
            Outcome::NetworkError(_) => "network_error",
        }
    }
}

/// An error and its causes, on one line of at most 500 characters.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    crate::error::error_chain(error).chars().take(500).collect()
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    secret: &str,
    delivery: &DeliveryRecord,
) -> Outcome {
    let timestamp = chrono::Utc::now().timestamp();
    let body = delivery.payload_json.clone();
    let request = client
        .post(url)
        .header("content-type", "application/json")
        .header(
            "user-agent",
            concat!("posfleet/", env!("CARGO_PKG_VERSION")),
        )
        .header("x-posfleet-event", &delivery.event_kind)
        .header(
            "x-posfleet-delivery",
            delivery_id(&delivery.webhook_id, delivery.event_seq),
        )
        .header("x-posfleet-timestamp", timestamp.to_string())
        .header(
            "x-posfleet-signature",
            signature(secret, timestamp, &delivery.payload_json),
        )
        .body(body);
    match request.send().await {
        Ok(response) => {
            let status = response.status();
            if status.is_success() {
                Outcome::Delivered(status.as_u16())
            } else {
                Outcome::HttpError(status.as_u16())
            }
        }
        Err(error) if error.is_timeout() => Outcome::Timeout(error_chain(&error)),
        Err(error) => Outcome::NetworkError(
            tls::tls_failure(url, &error).unwrap_or_else(|| error_chain(&error)),
        ),
    }
}

// ----- the dispatcher -----

/// Starts the dispatcher; it stops when `stop` turns true, after the
/// attempts in flight end (at most a few seconds).
pub fn spawn_dispatcher(
    storage: Storage,
    metrics: Metrics,
    settings: WebhookSettings,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let clients = tls::Clients::new(settings.request_timeout).map_err(Error::WebhookClient)?;
    let dispatcher = Dispatcher {
        storage,
        metrics,
        settings,
        clients,
        attempts: JoinSet::new(),
        in_flight: HashMap::new(),
    };
    Ok(tokio::spawn(dispatcher.run(stop)))
}

struct Dispatcher {
    storage: Storage,
    metrics: Metrics,
    settings: WebhookSettings,
    /// One per distinct webhook CA.
    clients: tls::Clients,
    /// Attempts in flight; each yields its webhook's id.
    attempts: JoinSet<String>,
    /// Attempts in flight per webhook.
    in_flight: HashMap<String, usize>,
}

impl Dispatcher {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut last_prune = None::<tokio::time::Instant>;
        tracing::debug!("Webhook dispatcher started.");
        loop {
            if let Err(error) = self.pass().await {
                self.metrics.webhook_dispatch_errors.inc();
                tracing::error!(%error, "Webhook dispatch failed; retrying.");
            }
            if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_INTERVAL) {
                last_prune = Some(tokio::time::Instant::now());
                let before = now_ms() - FINISHED_DELIVERY_RETENTION.as_millis() as i64;
                match self.storage.prune_finished_deliveries(before).await {
                    Ok(0) => {}
                    Ok(pruned) => tracing::info!(pruned, "Old webhook deliveries pruned."),
                    Err(error) => tracing::warn!(%error, "Cannot prune webhook deliveries."),
                }
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                // An attempt ended: the next delivery of its rollout may go.
                Some(done) = self.attempts.join_next(), if !self.attempts.is_empty() => {
                    self.attempt_done(done);
                }
            }
        }
        let drain = async {
            while let Some(done) = self.attempts.join_next().await {
                self.attempt_done(done);
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            // Their claims run out and they are attempted again later.
            tracing::warn!("Webhook attempts still in flight at shutdown are abandoned.");
            self.attempts.abort_all();
        }
        tracing::debug!("Webhook dispatcher stopped.");
    }

    fn attempt_done(&mut self, done: Result<String, tokio::task::JoinError>) {
        match done {
            Ok(webhook_id) => {
                if let Some(n) = self.in_flight.get_mut(&webhook_id) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.in_flight.remove(&webhook_id);
                    }
                }
            }
            Err(error) => {
                // A panic in an attempt: its webhook's count is lost, so
                // start over from what is really in flight.
                tracing::error!(%error, "A webhook attempt failed unexpectedly.");
                if self.attempts.is_empty() {
                    self.in_flight.clear();
                }
            }
        }
    }

    /// Fans new events out, then starts the attempts that are due.
    async fn pass(&mut self) -> Result<(), Error> {
        self.fan_out().await?;
        let webhooks = self.storage.list_webhooks().await?;
        self.clients.retain(&webhooks);
        for webhook in webhooks {
            let busy = self.in_flight.get(&webhook.id).copied().unwrap_or(0);
            let free = self
                .settings
                .max_in_flight_per_webhook
                .saturating_sub(busy)
                .min(
                    self.settings
                        .max_in_flight
                        .saturating_sub(self.attempts.len()),
                );
            if free == 0 {
                continue;
            }
            let now = now_ms();
            let due = self
                .storage
                .due_deliveries(&webhook.id, now, free as u32)
                .await?;
            if due.is_empty() {
                continue;
            }
            // A CA that cannot be used (it was checked when added) fails
            // each attempt, on record, like an unreachable receiver.
            let client = self.clients.for_webhook(&webhook);
            for delivery in due {
                let until = now + self.settings.claim_duration().as_millis() as i64;
                if !self
                    .storage
                    .claim_delivery(&webhook.id, delivery.event_seq, now, until)
                    .await?
                {
                    continue; // Another replica's dispatcher has it.
                }
                *self.in_flight.entry(webhook.id.clone()).or_default() += 1;
                self.attempts.spawn(attempt(
                    self.storage.clone(),
                    self.metrics.clone(),
                    self.settings.clone(),
                    client.clone(),
                    webhook.clone(),
                    delivery,
                ));
            }
        }
        Ok(())
    }

    /// Turns the events after the cursor into deliveries, a page at a time.
    async fn fan_out(&self) -> Result<(), Error> {
        loop {
            let cursor = self.storage.webhook_cursor().await?;
            let events = self
                .storage
                .events_after(cursor, None, FAN_OUT_PAGE)
                .await?;
            let Some(last) = events.last().map(|e| e.seq) else {
                return Ok(());
            };
            let webhooks = self.storage.list_webhooks().await?;
            let deliveries = deliveries_for(&events, &webhooks);
            let count = deliveries.len();
            if !self
                .storage
                .fan_out_events(cursor, last, &deliveries, now_ms())
                .await?
            {
                // Another replica moved the cursor: read it again.
                continue;
            }
            if count > 0 {
                tracing::debug!(
                    after = cursor,
                    last,
                    deliveries = count,
                    "Events fanned out."
                );
            }
            if events.len() < FAN_OUT_PAGE as usize {
                return Ok(());
            }
        }
    }
}

/// One delivery per (event, webhook) whose filter matches and that was
/// added before the event was stored.
pub fn deliveries_for(events: &[EventRecord], webhooks: &[WebhookRecord]) -> Vec<NewDelivery> {
    let mut out = Vec::new();
    for event in events {
        let mut body = None;
        for webhook in webhooks {
            if event.seq > webhook.after_event_seq && matches(&webhook.events, &event.kind) {
                out.push(NewDelivery {
                    webhook_id: webhook.id.clone(),
                    event_seq: event.seq,
                    event_kind: event.kind.clone(),
                    rollout_id: event.rollout_id.clone(),
                    payload_json: body.get_or_insert_with(|| payload(event)).clone(),
                });
            }
        }
    }
    out
}

/// Sends one claimed delivery and records how it went; returns the
/// webhook's id.
async fn attempt(
    storage: Storage,
    metrics: Metrics,
    settings: WebhookSettings,
    client: Result<reqwest::Client, String>,
    webhook: WebhookRecord,
    delivery: DeliveryRecord,
) -> String {
    let outcome = match client {
        Ok(client) => post(&client, &webhook.url, &webhook.secret, &delivery).await,
        Err(error) => Outcome::NetworkError(error),
    };
    metrics
        .webhook_attempts
        .with_label_values(&[outcome.metric_label()])
        .inc();
    let attempts = delivery.attempts + 1;
    let now = now_ms();
    let (http_status, error) = match &outcome {
        Outcome::Delivered(status) => (*status, String::new()),
        Outcome::HttpError(status) => (*status, format!("HTTP {status}")),
        Outcome::Timeout(e) => (0, format!("timed out: {e}")),
        Outcome::NetworkError(e) => (0, e.clone()),
    };
    let record = match outcome {
        Outcome::Delivered(_) => AttemptRecord {
            state: DeliveryState::Delivered,
            http_status: http_status.into(),
            error,
            at_ms: now,
            next_attempt_at_ms: 0,
        },
        _ if attempts >= settings.max_attempts => AttemptRecord {
            state: DeliveryState::Failed,
            http_status: http_status.into(),
            error,
            at_ms: now,
            next_attempt_at_ms: 0,
        },
        _ => {
            let wait = settings.backoff(attempts, &mut rand::thread_rng());
            AttemptRecord {
                state: DeliveryState::Pending,
                http_status: http_status.into(),
                error,
                at_ms: now,
                next_attempt_at_ms: now + wait.as_millis() as i64,
            }
        }
    };
    match record.state {
        DeliveryState::Delivered => {
            metrics
                .webhook_deliveries
                .with_label_values(&["delivered"])
                .inc();
            tracing::debug!(
                webhook_id = %webhook.id,
                event_seq = delivery.event_seq,
                attempts,
                "Webhook delivered."
            );
        }
        DeliveryState::Failed => {
            metrics
                .webhook_deliveries
                .with_label_values(&["failed"])
                .inc();
            tracing::warn!(
                webhook_id = %webhook.id,
                event_seq = delivery.event_seq,
                attempts,
                error = %record.error,
                "Webhook delivery given up."
            );
        }
        DeliveryState::Pending => tracing::info!(
            webhook_id = %webhook.id,
            event_seq = delivery.event_seq,
            attempts,
            error = %record.error,
            next_attempt_in_ms = record.next_attempt_at_ms - now,
            "Webhook delivery failed; will retry."
        ),
    }
    if let Err(error) = storage
        .record_delivery_attempt(&webhook.id, delivery.event_seq, &record)
        .await
    {
        // The claim runs out and the delivery is attempted again.
        metrics.webhook_dispatch_errors.inc();
        tracing::error!(
            %error,
            webhook_id = %webhook.id,
            event_seq = delivery.event_seq,
            "Cannot record a webhook attempt."
        );
    }
    webhook.id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        for (url, ok) in [
            ("http://hooks.example.com/posfleet", true),
            ("http://10.0.0.5:8080/x?y=1", true),
            ("https://hooks.example.com:8443/posfleet", true),
            ("HTTPS://hooks.example.com/", true),
            ("ftp://example.com/", false),
            ("example.com/hook", false),
            ("http://user:pass@example.com/", false),
            ("", false),
        ] {
            assert_eq!(validate_url(url).is_ok(), ok, "{url}");
        }
        let too_long = format!("http://example.com/{}", "a".repeat(MAX_URL_CHARS));
        assert!(validate_url(&too_long).is_err());
    }

    #[test]
    fn filters_take_kinds_and_prefixes() {
        let filter = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            validate_events(&filter(&["rollout.*", "rollout.paused", "rollout.*"])).unwrap(),
            filter(&["rollout.*", "rollout.paused"])
        );
        for bad in [
            "",
            "*",
            "rollout.",
            "rollout*",
            "Rollout.paused",
            "a.*.b",
            "a b",
        ] {
            assert!(validate_events(&filter(&[bad])).is_err(), "{bad}");
        }
        for (f, kind, expected) in [
            (&[][..], "rollout.started", true),
            (&["rollout.*"][..], "rollout.started", true),
            (&["rollout.*"][..], "rollouts.started", false),
            (&["rollout.*"][..], "rollout", false),
            (&["rollout.paused"][..], "rollout.paused", true),
            (&["rollout.paused"][..], "rollout.paused_again", false),
            (
                &["device.*", "rollout.completed"][..],
                "rollout.completed",
                true,
            ),
        ] {
            assert_eq!(matches(&filter(f), kind), expected, "{f:?} {kind}");
        }
    }

    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_dot_body() {
        // The value Python's hmac gives for the same inputs (see the README).
        assert_eq!(
            signature("whsec-test", 1_700_000_000, r#"{"a":1}"#),
            "sha256=fed7a1a6c799a6367d73724d76bc70c16678908a32a879cd1ded6565ac05cece"
        );
        assert_ne!(signature("k", 1, "x"), signature("k", 2, "x"));
        assert_ne!(signature("k", 1, "x"), signature("l", 1, "x"));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let settings = WebhookSettings {
            request_timeout: Duration::from_secs(10),
            max_attempts: 10,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(600),
            poll_interval: Duration::from_secs(1),
            max_in_flight: 32,
            max_in_flight_per_webhook: 4,
        };
        let mut rng = rand::thread_rng();
        for (attempts, full) in [(1, 1), (2, 2), (3, 4), (10, 512), (11, 600), (40, 600)] {
            for _ in 0..50 {
                let wait = settings.backoff(attempts, &mut rng);
                let full = Duration::from_secs(full);
                assert!(wait >= full / 2 && wait <= full, "{attempts}: {wait:?}");
            }
        }
    }

    #[test]
    fn payloads_carry_the_event() {
        let event = EventRecord {
            seq: 7,
            at_ms: 1_700_000_000_123,
            kind: "rollout.paused".into(),
            rollout_id: "ro-1".into(),
            device_id: String::new(),
            data_json: r#"{"reason":"3 failures"}"#.into(),
        };
        let body: Value = serde_json::from_str(&payload(&event)).unwrap();
        assert_eq!(
            body,
            json!({
                "seq": 7,
                "kind": "rollout.paused",
                "at": "2023-11-14T22:13:20.123Z",
                "rollout_id": "ro-1",
                "device_id": "",
                "data": {"reason": "3 failures"},
            })
        );
        let hook = |id: &str, after_event_seq: u64, events: &[&str]| WebhookRecord {
            id: id.into(),
            url: "http://x/".into(),
            events: events.iter().map(|s| s.to_string()).collect(),
            secret: "s".into(),
            after_event_seq,
            created_at_ms: 0,
            ca_pem: String::new(),
        };
        let deliveries = deliveries_for(
            std::slice::from_ref(&event),
            &[
                hook("all", 0, &[]),
                hook("later", event.seq, &[]),
                hook("devices", 0, &["rollout.device_failed"]),
            ],
        );
        assert_eq!(deliveries.len(), 1);
        assert_eq!(deliveries[0].webhook_id, "all");
        assert_eq!(deliveries[0].rollout_id, "ro-1");
    }
}
