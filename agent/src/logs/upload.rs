//! Answering log requests: the stored lines a request asks for, redacted,
//! then (when it follows) new ones, uploaded with `UploadLogs` at most at
//! `log_upload_limit_bytes_per_second`. A request is answered once: one
//! being uploaded, or answered, is skipped when a heartbeat names it again;
//! an upload that breaks off is started over at the next heartbeat.

use posfleet_proto::v1::{self, agent_service_client::AgentServiceClient};
use prost::Message;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::StoreHandle;
use super::redact::Redactor;
use super::store::{self, Entry};

/// Lines in one upload message at most.
const MESSAGE_LINES: usize = 256;
/// Bytes of lines in one upload message, about.
const MESSAGE_BYTES: usize = 16 * 1024;
/// While following with nothing new, a message this often keeps the
/// upload alive (the control plane ends an idle one after 60 s).
const KEEPALIVE: Duration = Duration::from_secs(20);
/// Requests remembered as answered, so a heartbeat that still names one
/// does not start it again.
const ANSWERED_KEPT: usize = 256;

/// How uploads are made.
pub(crate) struct UploadSettings {
    pub client: AgentServiceClient<Channel>,
    pub authorization: Option<tonic::metadata::AsciiMetadataValue>,
    pub redactor: Arc<Redactor>,
    /// 0: unlimited.
    pub bytes_per_second: u64,
}

/// Starts the task that answers log requests; heartbeats send it the
/// requests their answers carry.
pub(crate) fn spawn_uploads(
    store: StoreHandle,
    settings: UploadSettings,
) -> mpsc::Sender<Vec<v1::LogRequest>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(manage(rx, store, Arc::new(settings)));
    tx
}

async fn manage(
    mut requests: mpsc::Receiver<Vec<v1::LogRequest>>,
    store: StoreHandle,
    settings: Arc<UploadSettings>,
) {
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut answered: VecDeque<String> = VecDeque::new();
    let mut uploads = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            list = requests.recv() => {
                let Some(list) = list else { break };
                for request in list {
                    let id = request.request_id.clone();
                    if in_flight.contains(&id) || answered.contains(&id) {
                        continue;
                    }
                    in_flight.insert(id);
                    uploads.spawn(answer(request, store.clone(), settings.clone()));
                }
            }
            Some(done) = uploads.join_next(), if !uploads.is_empty() => {
                if let Ok((id, finished)) = done {
                    in_flight.remove(&id);
                    if finished {
                        answered.push_back(id);
                        if answered.len() > ANSWERED_KEPT {
                            answered.pop_front();
                        }
                    }
                }
            }
        }
    }
}

/// Uploads one request; returns its id and whether it is finished with
/// (answered, or refused for good).
async fn answer(
    request: v1::LogRequest,
    store: StoreHandle,
    settings: Arc<UploadSettings>,
) -> (String, bool) {
    let id = request.request_id.clone();
    // The search text stays out of the till's own log: it may name a secret.
    tracing::info!(request_id = %id, max_lines = request.max_lines, follow_seconds = request.follow_seconds, "Log request received; uploading.");
    match upload(&request, &store, &settings).await {
        Ok(answer) => {
            tracing::info!(request_id = %id, lines = answer.lines_stored, truncated_reason = %answer.truncated_reason, "Log request answered.");
            (id, true)
        }
        Err(status)
            if matches!(
                status.code(),
                Code::FailedPrecondition
                    | Code::NotFound
                    | Code::PermissionDenied
                    | Code::InvalidArgument
            ) =>
        {
            tracing::warn!(request_id = %id, error = %status.message(), "Log request refused by the control plane.");
            (id, true)
        }
        Err(status) => {
            tracing::warn!(request_id = %id, code = ?status.code(), error = %status.message(), "Log upload broke off; it starts over at the next heartbeat.");
            (id, false)
        }
    }
}

async fn upload(
    request: &v1::LogRequest,
    store: &StoreHandle,
    settings: &UploadSettings,
) -> Result<v1::UploadLogsResponse, Status> {
    let subscription = store
        .subscribe()
        .await
        .ok_or_else(|| Status::unavailable("the log store is not running"))?;
    let snapshot = subscription.snapshot;
    let mut selection = Selection::new(request, settings.redactor.clone());
    let stored = tokio::task::spawn_blocking(move || {
        store::read(&snapshot, |entry| selection.offer(entry)).map(|()| selection.lines)
    })
    .await
    .map_err(|e| Status::internal(format!("reading the log store failed: {e}")))?
    .map_err(|e| Status::internal(format!("cannot read the log store: {e}")))?;
    let (tx, rx) = mpsc::channel(2);
    let mut call = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(authorization) = &settings.authorization {
        call.metadata_mut()
            .insert(posfleet_proto::AUTHORIZATION, authorization.clone());
    }
    let mut client = settings.client.clone();
    let sender = Sender {
        tx,
        request_id: request.request_id.clone(),
        pacer: Pacer::new(settings.bytes_per_second),
        skipped: 0,
    };
    let follow = Follow {
        until: Instant::now() + Duration::from_secs(request.follow_seconds.into()),
        new_lines: subscription.new_lines,
        selection: Selection::new(
            &v1::LogRequest {
                since_unix_ms: 0,
                max_lines: u32::MAX,
                ..request.clone()
            },
            settings.redactor.clone(),
        ),
    };
    let (answer, ()) = tokio::join!(client.upload_logs(call), sender.send_all(stored, follow));
    answer.map(tonic::Response::into_inner)
}

/// The lines a request asks for, as they are offered oldest first: since
/// its time, redacted, containing its text, the newest `max_lines`.
pub(crate) struct Selection {
    since_unix_ms: i64,
    grep: String,
    max_lines: usize,
    redactor: Arc<Redactor>,
    pub lines: VecDeque<Entry>,
}

impl Selection {
    pub fn new(request: &v1::LogRequest, redactor: Arc<Redactor>) -> Selection {
        Selection {
            since_unix_ms: request.since_unix_ms,
            grep: request.grep.clone(),
            max_lines: request.max_lines as usize,
            redactor,
            lines: VecDeque::new(),
        }
    }

    pub fn offer(&mut self, entry: Entry) {
        if entry.unix_ms < self.since_unix_ms || self.max_lines == 0 {
            return;
        }
        // Matched after redaction: a search finds no secret the upload hides.
        let text = self.redactor.redact(&entry.text).into_owned();
        if !text.contains(&self.grep) {
            return;
        }
        self.lines.push_back(Entry { text, ..entry });
        if self.lines.len() > self.max_lines {
            self.lines.pop_front();
        }
    }
}

struct Follow {
    until: Instant,
    new_lines: broadcast::Receiver<Entry>,
    selection: Selection,
}

/// The sending half of one upload.
struct Sender {
    tx: mpsc::Sender<v1::LogUpload>,
    request_id: String,
    pacer: Pacer,
    /// Lines a follow fell too far behind for.
    skipped: u64,
}

impl Sender {
    /// The stored lines, then new ones until the follow time is over, then
    /// the last message. Stops when the call has ended (refused, or the
    /// control plane's limit reached).
    async fn send_all(mut self, stored: VecDeque<Entry>, mut follow: Follow) {
        if !self.send_lines(stored.into_iter().collect()).await {
            return;
        }
        while Instant::now() < follow.until {
            let received = tokio::select! {
                received = follow.new_lines.recv() => received,
                () = tokio::time::sleep_until(follow.until) => break,
                () = tokio::time::sleep(KEEPALIVE) => {
                    if !self.send(Vec::new(), false).await {
                        return;
                    }
                    continue;
                }
                () = self.tx.closed() => return,
            };
            match received {
                Ok(entry) => {
                    follow.selection.offer(entry);
                    // Whatever else is already there goes in the same message.
                    while follow.selection.lines.len() < MESSAGE_LINES {
                        match follow.new_lines.try_recv() {
                            Ok(entry) => follow.selection.offer(entry),
                            Err(broadcast::error::TryRecvError::Lagged(n)) => self.skipped += n,
                            Err(_) => break,
                        }
                    }
                    let lines = follow.selection.lines.drain(..).collect();
                    if !self.send_lines(lines).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => self.skipped += n,
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        self.send(Vec::new(), true).await;
    }

    /// Sends `lines` in messages of at most [`MESSAGE_LINES`] lines and
    /// about [`MESSAGE_BYTES`]; always one message, so the first one names
    /// the request even when nothing matched.
    async fn send_lines(&mut self, lines: Vec<Entry>) -> bool {
        let mut message = Vec::new();
        let mut bytes = 0;
        for entry in lines {
            bytes += entry.text.len() + entry.source.len() + 16;
            message.push(v1::LogLine {
                unix_ms: entry.unix_ms,
                source: entry.source,
                text: entry.text,
            });
            if message.len() >= MESSAGE_LINES || bytes >= MESSAGE_BYTES {
                if !self.send(std::mem::take(&mut message), false).await {
                    return false;
                }
                bytes = 0;
            }
        }
        self.send(message, false).await
    }

    async fn send(&mut self, lines: Vec<v1::LogLine>, done: bool) -> bool {
        let message = v1::LogUpload {
            request_id: self.request_id.clone(),
            lines,
            done,
            lines_skipped: self.skipped,
        };
        let bytes = message.encoded_len();
        if self.tx.send(message).await.is_err() {
            return false;
        }
        self.pacer.sent(bytes).await;
        true
    }
}

/// Spaces messages so the upload stays within its bandwidth cap.
struct Pacer {
    bytes_per_second: u64,
    start: Instant,
    sent: u64,
}

impl Pacer {
    fn new(bytes_per_second: u64) -> Pacer {
        Pacer {
            bytes_per_second,
            start: Instant::now(),
            sent: 0,
        }
    }

    /// Waits until `bytes` more are within the cap.
    async fn sent(&mut self, bytes: usize) {
        if self.bytes_per_second == 0 {
            return;
        }
        self.sent += bytes as u64;
        let due =
            self.start + Duration::from_secs_f64(self.sent as f64 / self.bytes_per_second as f64);
        tokio::time::sleep_until(due).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(unix_ms: i64, text: &str) -> Entry {
        Entry {
            unix_ms,
            source: "agent".into(),
            text: text.into(),
        }
    }

    fn select(request: v1::LogRequest, entries: &[Entry]) -> Vec<String> {
        let redactor = Redactor::new(&["password=\\S+".to_string()]).unwrap();
        let mut selection = Selection::new(&request, Arc::new(redactor));
        for e in entries {
            selection.offer(e.clone());
        }
        selection.lines.into_iter().map(|e| e.text).collect()
    }

    #[test]
    fn a_request_selects_the_newest_matching_redacted_lines() {
        let entries = [
            entry(1, "boot"),
            entry(2, "sale 1 ok"),
            entry(3, "sale 2 failed password=hunter2"),
            entry(4, "sale 3 ok"),
            entry(5, "sale 4 failed"),
        ];
        let request = |since_unix_ms, max_lines, grep: &str| v1::LogRequest {
            request_id: "log-1".into(),
            since_unix_ms,
            max_lines,
            grep: grep.into(),
            follow_seconds: 0,
        };
        assert_eq!(
            select(request(0, 2, ""), &entries),
            ["sale 3 ok", "sale 4 failed"]
        );
        assert_eq!(
            select(request(0, 10, "failed"), &entries),
            ["sale 2 failed [REDACTED]", "sale 4 failed"]
        );
        assert_eq!(
            select(request(4, 10, "sale"), &entries),
            ["sale 3 ok", "sale 4 failed"]
        );
        // Matching is done on the redacted text: the secret is not findable.
        assert!(select(request(0, 10, "hunter2"), &entries).is_empty());
        assert!(select(request(0, 0, ""), &entries).is_empty());
    }

    #[tokio::test]
    async fn the_pacer_keeps_to_its_rate() {
        let mut pacer = Pacer::new(10_000);
        let start = Instant::now();
        for _ in 0..5 {
            pacer.sent(2_000).await;
        }
        // 10,000 bytes at 10,000 bytes/s.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(990) && elapsed < Duration::from_secs(3),
            "{elapsed:?}"
        );
        let mut unlimited = Pacer::new(0);
        let start = Instant::now();
        unlimited.sent(1 << 30).await;
        assert!(start.elapsed() < Duration::from_millis(100));
    }
}
