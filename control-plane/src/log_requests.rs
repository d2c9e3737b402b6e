//! Logs on demand: an operator asks for a till's logs (`RequestDeviceLogs`),
//! the request waits in the database until the till's next heartbeat hands
//! it out, the till uploads the matching lines (`UploadLogs`, a client
//! stream it opens itself) and the operator reads them as they arrive
//! (`GetDeviceLogs`, a server stream). No connection to a till is opened.
//!
//! Heartbeats read the fleet's open requests from memory: one query every
//! [`OPEN_REQUESTS_MAX_AGE`] per replica whatever the fleet's size, and at
//! once after a change made through this replica. Readers of a request poll
//! the database (an upload may land on another replica) and are woken at
//! once by an upload stored by this one.

use posfleet_proto::v1;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::storage::{LogLineRecord, LogRequestRecord, LogRequestState, NewLogRequest, Storage};
use crate::timeout::STREAM_IDLE_TIMEOUT;
use crate::validate::{invalid, text};
use crate::{format_ms, now_ms, secret};

/// Lines a request asks for when it does not say.
pub const DEFAULT_MAX_LINES: u32 = 200;
/// Most lines a request may ask for (following adds new ones after them).
pub const MAX_LINES: u32 = 10_000;
/// Longest `grep` text.
pub const MAX_GREP_BYTES: usize = 256;
/// Farthest back a request may reach.
pub const MAX_SINCE_SECONDS: u64 = 90 * 24 * 3600;
/// Open requests one device may have at once.
pub const MAX_OPEN_PER_DEVICE: i64 = 8;
/// Longest line stored; a longer one is cut, saying so.
pub const MAX_LINE_BYTES: usize = 8 * 1024;
/// Longest source name stored.
pub const MAX_SOURCE_BYTES: usize = 512;
/// Most lines in one upload message.
pub const MAX_LINES_PER_MESSAGE: usize = 1_000;
/// How long heartbeats hand out the open requests read once.
const OPEN_REQUESTS_MAX_AGE: Duration = Duration::from_secs(2);
/// A reader looks for new lines at least this often.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Longest a reader waits for a till to start answering.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Lines per message to a reader.
const LINES_PER_CHUNK: i64 = 500;
/// An upload may take this long beyond its follow time (stored lines at
/// the till's bandwidth cap); past it the control plane ends it.
const UPLOAD_GRACE: Duration = Duration::from_secs(10 * 60);

/// Every value of the `result` label of `posfleet_log_requests_total`.
pub const LOG_REQUEST_RESULTS: [&str; 5] =
    ["created", "answered", "truncated", "expired", "refused"];

/// The logs-on-demand metrics, registered with the control plane's others.
#[derive(Clone)]
pub struct LogMetrics {
    /// Requests by what became of them (`LOG_REQUEST_RESULTS`): created;
    /// answered whole, or cut at the per-request limit; expired before the
    /// till answered; and requests or uploads refused.
    pub requests: prometheus::IntCounterVec,
    /// Lines stored from tills' uploads.
    pub lines_received: prometheus::IntCounter,
}

impl LogMetrics {
    pub fn register(registry: &prometheus::Registry) -> LogMetrics {
        let requests = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "posfleet_log_requests_total",
                "Log requests by result: created, answered, truncated (cut at the per-request \
                 limit), expired (the till did not answer in time), refused (a request or an \
                 upload refused).",
            ),
            &["result"],
        )
        .expect("static metric definition is valid");
        let lines_received = prometheus::IntCounter::new(
            "posfleet_log_lines_received_total",
            "Log lines stored from tills' uploads.",
        )
        .expect("static metric definition is valid");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(lines_received.clone()),
        ] {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        for result in LOG_REQUEST_RESULTS {
            requests.with_label_values(&[result]);
        }
        LogMetrics {
            requests,
            lines_received,
        }
    }
}

/// The control plane's settings for log requests.
#[derive(Debug, Clone, Copy)]
pub struct LogSettings {
    /// How long a request waits for its till.
    pub expiry: Duration,
    /// How long uploaded lines are kept once the upload ended.
    pub retention: Duration,
    /// How long a till keeps sending new lines for `--follow`.
    pub follow_max: Duration,
    /// Most bytes of lines stored for one request.
    pub max_bytes: u64,
    /// For the device's online status.
    pub offline_after_missed_heartbeats: i64,
}

impl LogSettings {
    pub fn from_config(config: &Config) -> LogSettings {
        LogSettings {
            expiry: Duration::from_secs(config.log_request_expiry_seconds),
            retention: Duration::from_secs(config.log_retention_seconds),
            follow_max: Duration::from_secs(config.log_follow_max_seconds),
            max_bytes: config.log_request_max_bytes,
            offline_after_missed_heartbeats: config.offline_after_missed_heartbeats.into(),
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Open requests by device, as heartbeats hand them out.
type OpenRequests = Arc<HashMap<String, Vec<v1::LogRequest>>>;

/// Log requests, shared by the agent and admin services. Cheap to clone.
#[derive(Clone)]
pub struct LogRequests {
    storage: Storage,
    metrics: Metrics,
    settings: LogSettings,
    open: moka::future::Cache<(), OpenRequests>,
    /// Woken whenever this replica stores lines or ends an upload.
    uploaded: Arc<Notify>,
}

impl LogRequests {
    pub fn new(storage: Storage, metrics: Metrics, settings: LogSettings) -> LogRequests {
        LogRequests {
            storage,
            metrics,
            settings,
            open: moka::future::Cache::builder()
                .max_capacity(1)
                .time_to_live(OPEN_REQUESTS_MAX_AGE)
                .build(),
            uploaded: Arc::new(Notify::new()),
        }
    }

    fn count(&self, result: &str) {
        self.metrics
            .logs
            .requests
            .with_label_values(&[result])
            .inc();
    }

    /// The requests waiting for `device_id`, for its heartbeat's answer.
    /// Logs are not worth failing a heartbeat for: a read that fails hands
    /// out none (the next heartbeat reads again).
    pub async fn for_heartbeat(&self, device_id: &str) -> Vec<v1::LogRequest> {
        let storage = self.storage.clone();
        let open = self
            .open
            .try_get_with((), async move {
                let mut by_device: HashMap<String, Vec<v1::LogRequest>> = HashMap::new();
                for record in storage.open_log_requests(now_ms()).await? {
                    by_device
                        .entry(record.request.device_id.clone())
                        .or_default()
                        .push(for_till(&record));
                }
                Ok::<_, crate::error::Error>(Arc::new(by_device))
            })
            .await;
        match open {
            Ok(open) => open.get(device_id).cloned().unwrap_or_default(),
            Err(error) => {
                tracing::error!(%error, "Cannot read the open log requests; handing out none for a while.");
                // Read again once this entry ends, not at every heartbeat.
                self.open.insert((), Arc::new(HashMap::new())).await;
                Vec::new()
            }
        }
    }

    /// `RequestDeviceLogs`, for the admin token named `requested_by`.
    pub async fn create(
        &self,
        requested_by: &str,
        req: v1::RequestDeviceLogsRequest,
    ) -> Result<v1::LogRequestInfo, Status> {
        let result = self.try_create(requested_by, req).await;
        self.count(if result.is_ok() { "created" } else { "refused" });
        result
    }

    async fn try_create(
        &self,
        requested_by: &str,
        req: v1::RequestDeviceLogsRequest,
    ) -> Result<v1::LogRequestInfo, Status> {
        text("device_id", &req.device_id, true, 64)?;
        text("grep", &req.grep, false, MAX_GREP_BYTES)?;
        if req.max_lines > MAX_LINES {
            return Err(invalid(
                "max_lines",
                format!("at most {MAX_LINES}, got {}", req.max_lines),
            ));
        }
        if req.since_seconds > MAX_SINCE_SECONDS {
            return Err(invalid(
                "since_seconds",
                format!("at most {MAX_SINCE_SECONDS} (90 days)"),
            ));
        }
        let device = self
            .storage
            .get_device(&req.device_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("unknown device {}", req.device_id)))?;
        if let Some(revoked) = &device.revoked {
            return Err(Status::failed_precondition(format!(
                "device {} was revoked at {}: it uploads nothing",
                device.id,
                format_ms(revoked.at_ms)
            )));
        }
        let now = now_ms();
        self.prune(now).await;
        if self
            .storage
            .count_open_log_requests(&device.id, now)
            .await?
            >= MAX_OPEN_PER_DEVICE
        {
            return Err(Status::resource_exhausted(format!(
                "device {} already has {MAX_OPEN_PER_DEVICE} log requests waiting; \
                 wait for them to be answered or to expire",
                device.id
            )));
        }
        let since_ms = match req.since_seconds {
            0 => 0,
            seconds => now - millis(Duration::from_secs(seconds)),
        };
        let new = NewLogRequest {
            id: secret::short_id("log-", 8),
            device_id: device.id.clone(),
            requested_by: requested_by.to_string(),
            created_at_ms: now,
            expires_at_ms: now + millis(self.settings.expiry),
            since_ms,
            max_lines: i64::from(match req.max_lines {
                0 => DEFAULT_MAX_LINES,
                n => n,
            }),
            grep: req.grep,
            follow_seconds: if req.follow {
                i64::try_from(self.settings.follow_max.as_secs()).unwrap_or(i64::MAX)
            } else {
                0
            },
        };
        self.storage.insert_log_request(&new).await?;
        let record = LogRequestRecord::pending(new);
        // This replica's heartbeats hand it out from the next one on.
        self.open.invalidate(&()).await;
        tracing::info!(request_id = %record.request.id, device_id = %record.request.device_id, requested_by, "Log request created.");
        Ok(self.info(&record, Some(&device), now))
    }

    /// Expires open requests past their time and forgets old ones. Failures
    /// are logged: the next prune tries again.
    async fn prune(&self, now: i64) {
        match self
            .storage
            .prune_log_requests(now, now - millis(self.settings.retention))
            .await
        {
            Ok(expired) => self
                .metrics
                .logs
                .requests
                .with_label_values(&["expired"])
                .inc_by(expired),
            Err(error) => tracing::error!(%error, "Cannot prune log requests."),
        }
    }

    /// A request as operators see it.
    fn info(
        &self,
        record: &LogRequestRecord,
        device: Option<&crate::storage::DeviceRecord>,
        now: i64,
    ) -> v1::LogRequestInfo {
        v1::LogRequestInfo {
            id: record.request.id.clone(),
            device_id: record.request.device_id.clone(),
            state: record.state_at(now).as_str().into(),
            created_at_unix_ms: record.request.created_at_ms,
            expires_at_unix_ms: record.request.expires_at_ms,
            keep_until_unix_ms: record.keep_until_ms,
            device_online: device.is_some_and(|d| {
                crate::storage::is_online(
                    d.last_seen_ms,
                    d.heartbeat_interval_seconds,
                    self.settings.offline_after_missed_heartbeats,
                    now,
                )
            }),
            device_last_seen_unix_ms: device.map_or(0, |d| d.last_seen_ms),
            lines_received: u64::try_from(record.lines_received).unwrap_or(0),
            note: record.note.clone(),
            requested_by: record.request.requested_by.clone(),
            follow_seconds: u32::try_from(record.request.follow_seconds).unwrap_or(u32::MAX),
        }
    }

    async fn info_now(&self, record: &LogRequestRecord) -> Result<v1::LogRequestInfo, Status> {
        let device = self.storage.get_device(&record.request.device_id).await?;
        Ok(self.info(record, device.as_ref(), now_ms()))
    }

    /// `GetDeviceLogs`: the request's lines as a stream (see the module
    /// docs).
    pub async fn watch(
        &self,
        req: v1::GetDeviceLogsRequest,
    ) -> Result<ReceiverStream<Result<v1::DeviceLogsChunk, Status>>, Status> {
        text("request_id", &req.request_id, true, 64)?;
        let record = self
            .storage
            .log_request(&req.request_id)
            .await?
            .ok_or_else(|| unknown_request(&req.request_id))?;
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        let wait = Duration::from_secs(req.wait_seconds.into()).min(MAX_WAIT);
        tokio::spawn(async move {
            if let Err(status) = this.send_lines(record, wait, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// Sends `record`'s lines and state changes to `tx` until its upload
    /// ends, the reader leaves, or (while the till has not started) `wait`
    /// passes.
    async fn send_lines(
        &self,
        mut record: LogRequestRecord,
        wait: Duration,
        tx: &mpsc::Sender<Result<v1::DeviceLogsChunk, Status>>,
    ) -> Result<(), Status> {
        let waited_until = Instant::now() + wait;
        let mut cursor = 0;
        // The state and note last shown to the reader.
        let mut shown: Option<(LogRequestState, String)> = None;
        loop {
            let woken = self.uploaded.notified();
            let now = now_ms();
            let state = record.state_at(now);
            // Read after the state: lines of a request seen done are all in.
            let lines = self
                .storage
                .log_lines_after(&record.request.id, cursor, LINES_PER_CHUNK)
                .await?;
            let drained = (lines.len() as i64) < LINES_PER_CHUNK;
            let upload_over = state == LogRequestState::Uploading
                && now
                    > record.started_at_ms
                        + record.request.follow_seconds * 1000
                        + millis(UPLOAD_GRACE);
            let last = drained
                && (!state.is_open()
                    || upload_over
                    || (state == LogRequestState::Pending && Instant::now() >= waited_until));
            let changed = shown
                .as_ref()
                .is_none_or(|(shown, note)| *shown != state || *note != record.note);
            if let Some(line) = lines.last() {
                cursor = line.seq;
            }
            if changed || last || !lines.is_empty() {
                let request = if changed || last {
                    Some(self.info_now(&record).await?)
                } else {
                    None
                };
                let chunk = v1::DeviceLogsChunk {
                    request,
                    lines: lines.into_iter().map(line_view).collect(),
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return Ok(());
                }
                shown = Some((state, record.note.clone()));
            }
            if last {
                return Ok(());
            }
            if drained {
                tokio::select! {
                    () = woken => {}
                    () = tokio::time::sleep(POLL_INTERVAL) => {}
                    () = tx.closed() => return Ok(()),
                }
            }
            record = self
                .storage
                .log_request(&record.request.id)
                .await?
                .ok_or_else(|| unknown_request(&record.request.id))?;
        }
    }

    /// `UploadLogs` from `device_id` (authenticated, not revoked).
    pub async fn receive_upload(
        &self,
        device_id: &str,
        stream: &mut tonic::Streaming<v1::LogUpload>,
    ) -> Result<v1::UploadLogsResponse, Status> {
        let result = self.try_receive_upload(device_id, stream).await;
        self.uploaded.notify_waiters();
        if let Err(status) = &result
            && matches!(
                status.code(),
                Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition
            )
        {
            self.refused();
            tracing::warn!(device_id, error = %status.message(), "Log upload refused.");
        }
        result
    }

    /// Counts an upload refused before it reached [`Self::receive_upload`]
    /// (a revoked till's).
    pub fn refused(&self) {
        self.count("refused");
    }

    async fn try_receive_upload(
        &self,
        device_id: &str,
        stream: &mut tonic::Streaming<v1::LogUpload>,
    ) -> Result<v1::UploadLogsResponse, Status> {
        let first = next_message(stream, STREAM_IDLE_TIMEOUT)
            .await?
            .ok_or_else(|| invalid("request_id", "the upload is empty"))?;
        let record = self.accept_upload(device_id, &first).await?;
        self.store_upload(&record, first, stream).await
    }

    /// The request `first` answers, once it is checked to be this device's
    /// and open, its upload started.
    async fn accept_upload(
        &self,
        device_id: &str,
        first: &v1::LogUpload,
    ) -> Result<LogRequestRecord, Status> {
        text("request_id", &first.request_id, true, 64)?;
        let record = self
            .storage
            .log_request(&first.request_id)
            .await?
            .ok_or_else(|| unknown_request(&first.request_id))?;
        if record.request.device_id != device_id {
            // Said the same way as an unknown id: a till learns nothing
            // about other tills' requests.
            return Err(unknown_request(&first.request_id));
        }
        let now = now_ms();
        match record.state_at(now) {
            LogRequestState::Done => {
                return Err(Status::failed_precondition(format!(
                    "log request {} was already answered",
                    record.request.id
                )));
            }
            LogRequestState::Expired => {
                return Err(Status::failed_precondition(format!(
                    "log request {} expired at {}",
                    record.request.id,
                    format_ms(record.request.expires_at_ms)
                )));
            }
            LogRequestState::Pending | LogRequestState::Uploading => {}
        }
        let open_until = now + record.request.follow_seconds * 1000 + millis(UPLOAD_GRACE);
        if !self
            .storage
            .start_log_upload(&record.request.id, now, open_until)
            .await?
        {
            return Err(Status::failed_precondition(format!(
                "log request {} is not waiting for an upload any more",
                record.request.id
            )));
        }
        tracing::info!(request_id = %record.request.id, device_id, "Log upload started.");
        Ok(LogRequestRecord {
            started_at_ms: now,
            ..record
        })
    }

    async fn store_upload(
        &self,
        record: &LogRequestRecord,
        first: v1::LogUpload,
        stream: &mut tonic::Streaming<v1::LogUpload>,
    ) -> Result<v1::UploadLogsResponse, Status> {
        let ends_at = Instant::now()
            + Duration::from_secs(u64::try_from(record.request.follow_seconds).unwrap_or(0))
            + UPLOAD_GRACE;
        let mut stored_lines: u64 = 0;
        let mut stored_bytes: u64 = 0;
        let mut skipped: u64 = 0;
        let mut message = Some(first);
        let mut note = String::new();
        while let Some(upload) = message.take() {
            if !upload.request_id.is_empty() && upload.request_id != record.request.id {
                return Err(invalid(
                    "request_id",
                    "an upload answers one request: later messages name the same one",
                ));
            }
            if upload.lines.len() > MAX_LINES_PER_MESSAGE {
                return Err(invalid(
                    "lines",
                    format!(
                        "at most {MAX_LINES_PER_MESSAGE} lines per message, got {}",
                        upload.lines.len()
                    ),
                ));
            }
            skipped = skipped.max(upload.lines_skipped);
            let mut lines = Vec::with_capacity(upload.lines.len());
            let mut bytes: u64 = 0;
            for line in upload.lines {
                let line = bounded_line(line);
                let size = (line.1.len() + line.2.len()) as u64;
                if stored_bytes + bytes + size > self.settings.max_bytes {
                    note = format!(
                        "the upload reached this request's limit of {} bytes \
                         (log_request_max_bytes); later lines were dropped",
                        self.settings.max_bytes
                    );
                    break;
                }
                bytes += size;
                lines.push(line);
            }
            self.storage
                .append_log_lines(
                    &record.request.id,
                    &lines,
                    i64::try_from(bytes).unwrap_or(i64::MAX),
                )
                .await?;
            stored_lines += lines.len() as u64;
            stored_bytes += bytes;
            self.metrics.logs.lines_received.inc_by(lines.len() as u64);
            self.uploaded.notify_waiters();
            if !note.is_empty() || upload.done {
                break;
            }
            let idle = STREAM_IDLE_TIMEOUT.min(ends_at.saturating_duration_since(Instant::now()));
            match next_message(stream, idle).await {
                Ok(next) => message = next,
                Err(status) if Instant::now() >= ends_at => {
                    // The till's follow time is long over: what it sent is kept.
                    tracing::warn!(request_id = %record.request.id, error = %status.message(), "Log upload ended by the control plane.");
                    note = "the upload went on past its follow time and was ended".into();
                }
                Err(status) => return Err(status),
            }
        }
        let truncated = !note.is_empty();
        if skipped > 0 && note.is_empty() {
            note = format!("the till left out {skipped} lines (its upload bandwidth cap)");
        }
        let now = now_ms();
        self.storage
            .finish_log_upload(
                &record.request.id,
                now,
                now + millis(self.settings.retention),
                &note,
            )
            .await?;
        self.open.invalidate(&()).await;
        self.count(if truncated { "truncated" } else { "answered" });
        self.prune(now).await;
        tracing::info!(request_id = %record.request.id, lines = stored_lines, bytes = stored_bytes, truncated, "Log upload done.");
        Ok(v1::UploadLogsResponse {
            lines_stored: stored_lines,
            truncated_reason: if truncated { note } else { String::new() },
        })
    }
}

/// What a till is told about a request.
fn for_till(record: &LogRequestRecord) -> v1::LogRequest {
    v1::LogRequest {
        request_id: record.request.id.clone(),
        since_unix_ms: record.request.since_ms,
        max_lines: u32::try_from(record.request.max_lines).unwrap_or(MAX_LINES),
        grep: record.request.grep.clone(),
        follow_seconds: u32::try_from(record.request.follow_seconds).unwrap_or(u32::MAX),
    }
}

fn line_view(line: LogLineRecord) -> v1::LogLine {
    v1::LogLine {
        unix_ms: line.unix_ms,
        source: line.source,
        text: line.text,
    }
}

fn unknown_request(id: &str) -> Status {
    Status::not_found(format!("unknown log request {id}"))
}

/// `text` cut to `max` bytes on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A line as stored: (time, source, text), the text cut to
/// [`MAX_LINE_BYTES`] saying so, the source to [`MAX_SOURCE_BYTES`].
fn bounded_line(line: v1::LogLine) -> (i64, String, String) {
    let text = if line.text.len() > MAX_LINE_BYTES {
        format!(
            "{} … [line cut: it was {} bytes, the limit is {MAX_LINE_BYTES}]",
            cut(&line.text, MAX_LINE_BYTES),
            line.text.len()
        )
    } else {
        line.text
    };
    (
        line.unix_ms,
        cut(&line.source, MAX_SOURCE_BYTES).to_string(),
        text,
    )
}

/// The next message of an upload, or `DEADLINE_EXCEEDED` when none came
/// within `idle`.
async fn next_message(
    stream: &mut tonic::Streaming<v1::LogUpload>,
    idle: Duration,
) -> Result<Option<v1::LogUpload>, Status> {
    match tokio::time::timeout(idle, stream.message()).await {
        Ok(message) => message,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no upload message for {} s",
            idle.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_cut_saying_so() {
        let line = |text: &str| v1::LogLine {
            unix_ms: 5,
            source: "agent".into(),
            text: text.into(),
        };
        assert_eq!(bounded_line(line("short")).2, "short");
        let long = "é".repeat(MAX_LINE_BYTES);
        let (_, _, text) = bounded_line(line(&long));
        assert!(text.len() < MAX_LINE_BYTES + 100, "{}", text.len());
        assert!(
            text.ends_with(&format!(
                "[line cut: it was {} bytes, the limit is {MAX_LINE_BYTES}]",
                long.len()
            )),
            "{text}"
        );
    }

    #[test]
    fn open_requests_expire_at_their_time() {
        let record = LogRequestRecord::pending(NewLogRequest {
            id: "log-1".into(),
            device_id: "dev-1".into(),
            requested_by: "ops".into(),
            created_at_ms: 0,
            expires_at_ms: 1_000,
            since_ms: 0,
            max_lines: 10,
            grep: String::new(),
            follow_seconds: 0,
        });
        assert_eq!(record.state_at(999), LogRequestState::Pending);
        assert_eq!(record.state_at(1_000), LogRequestState::Expired);
        let done = LogRequestRecord {
            state: LogRequestState::Done,
            ..record
        };
        assert_eq!(done.state_at(5_000), LogRequestState::Done);
    }
}
