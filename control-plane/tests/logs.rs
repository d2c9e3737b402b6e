//! Logs on demand through gRPC, with simulated tills: a request reaches
//! its till in a heartbeat's answer and the upload is read back; uploads
//! the till was not asked for, malformed or oversized ones, expired
//! requests and revoked tills are refused. On SQLite, and on PostgreSQL
//! with --ignored.

mod common;

use common::{Admin, Backend, Setup, assert_status, device_request, heartbeat, setup};
use posfleet_proto::v1;
use std::time::Duration;
use tonic::{Code, Status};

async fn metric(s: &Setup, name: &str) -> f64 {
    let (_, text) = s.server.http_get("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

async fn request_logs(
    admin: &mut Admin,
    device_id: &str,
    grep: &str,
) -> Result<v1::LogRequestInfo, Status> {
    let request = admin.req(v1::RequestDeviceLogsRequest {
        device_id: device_id.into(),
        max_lines: 5,
        grep: grep.into(),
        ..Default::default()
    });
    admin
        .client
        .request_device_logs(request)
        .await
        .map(tonic::Response::into_inner)
}

/// The log requests a till's heartbeat is answered with.
async fn heartbeat_requests(s: &Setup, credential: &str) -> Vec<v1::LogRequest> {
    let hello = v1::HeartbeatRequest {
        agent_version: "1.0.0".into(),
        ..Default::default()
    };
    s.server
        .agent()
        .await
        .heartbeat(heartbeat(credential, hello))
        .await
        .unwrap()
        .into_inner()
        .log_requests
}

fn line(text: &str) -> v1::LogLine {
    v1::LogLine {
        unix_ms: 1_700_000_000_000,
        source: "/var/log/pos/app.log".into(),
        text: text.into(),
    }
}

fn message(request_id: &str, lines: Vec<v1::LogLine>, done: bool) -> v1::LogUpload {
    v1::LogUpload {
        request_id: request_id.into(),
        lines,
        done,
        lines_skipped: 0,
    }
}

async fn upload(
    s: &Setup,
    credential: &str,
    messages: Vec<v1::LogUpload>,
) -> Result<v1::UploadLogsResponse, Status> {
    s.server
        .agent()
        .await
        .upload_logs(device_request(credential, tokio_stream::iter(messages)))
        .await
        .map(tonic::Response::into_inner)
}

/// Everything `GetDeviceLogs` sends for `id` without waiting: the lines
/// and the request's last state.
async fn read_back(admin: &mut Admin, id: &str) -> (Vec<v1::LogLine>, v1::LogRequestInfo) {
    let request = admin.req(v1::GetDeviceLogsRequest {
        request_id: id.into(),
        wait_seconds: 0,
    });
    let mut stream = admin
        .client
        .get_device_logs(request)
        .await
        .unwrap()
        .into_inner();
    let mut lines = Vec::new();
    let mut last = None;
    while let Some(chunk) = stream.message().await.unwrap() {
        lines.extend(chunk.lines);
        last = chunk.request.or(last);
    }
    (lines, last.expect("the request's state"))
}

async fn a_request_reaches_its_till_and_its_upload_is_read_back(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("lyon-01").await;
    let (till, credential) = s.enrolled_device("lyon-01").await;
    let (_, other) = s.enrolled_device("lyon-01").await;
    let info = request_logs(&mut admin, &till, "sale").await.unwrap();
    assert_eq!(info.state, "pending");
    assert!(info.expires_at_unix_ms > info.created_at_unix_ms + 23 * 3600 * 1000);

    let asked = heartbeat_requests(&s, &credential).await;
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].request_id, info.id);
    assert_eq!((asked[0].max_lines, asked[0].grep.as_str()), (5, "sale"));
    assert!(heartbeat_requests(&s, &other).await.is_empty());

    let answer = upload(
        &s,
        &credential,
        vec![
            message(
                &info.id,
                vec![line("sale 1 ok"), line("sale 2 failed")],
                false,
            ),
            message("", vec![line("sale 3 ok")], true),
        ],
    )
    .await
    .unwrap();
    assert_eq!(answer.lines_stored, 3);
    assert!(answer.truncated_reason.is_empty());
    let (lines, last) = read_back(&mut admin, &info.id).await;
    let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["sale 1 ok", "sale 2 failed", "sale 3 ok"]);
    assert_eq!(lines[0].source, "/var/log/pos/app.log");
    assert_eq!((last.state.as_str(), last.lines_received), ("done", 3));
    assert!(last.keep_until_unix_ms > 0);

    // Answered once: neither handed out again nor accepted again.
    assert!(heartbeat_requests(&s, &credential).await.is_empty());
    assert_status(
        upload(&s, &credential, vec![message(&info.id, vec![], true)]).await,
        Code::FailedPrecondition,
        "already answered",
    );
    assert_eq!(
        metric(&s, "posfleet_log_requests_total{result=\"created\"}").await,
        1.0
    );
    assert_eq!(
        metric(&s, "posfleet_log_requests_total{result=\"answered\"}").await,
        1.0
    );
    assert_eq!(
        metric(&s, "posfleet_log_requests_total{result=\"refused\"}").await,
        1.0
    );
    assert_eq!(metric(&s, "posfleet_log_lines_received_total").await, 3.0);
    s.finish().await;
}

async fn uploads_the_till_was_not_asked_for_are_refused(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("lyon-01").await;
    let (till, credential) = s.enrolled_device("lyon-01").await;
    let (other, other_credential) = s.enrolled_device("lyon-01").await;
    let info = request_logs(&mut admin, &till, "").await.unwrap();

    // Another till answering it, or a request nobody made.
    for (credential, id) in [
        (&other_credential, info.id.as_str()),
        (&credential, "log-0000"),
    ] {
        assert_status(
            upload(&s, credential, vec![message(id, vec![line("x")], true)]).await,
            Code::NotFound,
            "unknown log request",
        );
    }
    assert_status(
        upload(&s, &credential, vec![]).await,
        Code::InvalidArgument,
        "empty",
    );
    let too_many = (0..1_001).map(|_| line("x")).collect();
    assert_status(
        upload(&s, &credential, vec![message(&info.id, too_many, true)]).await,
        Code::InvalidArgument,
        "at most 1000 lines per message",
    );
    // A second request in the same upload.
    let second = request_logs(&mut admin, &till, "").await.unwrap();
    assert_status(
        upload(
            &s,
            &credential,
            vec![
                message(&info.id, vec![line("x")], false),
                message(&second.id, vec![line("y")], true),
            ],
        )
        .await,
        Code::InvalidArgument,
        "an upload answers one request",
    );

    // Requests ops cannot make.
    assert_status(
        request_logs(&mut admin, "dev-nope", "").await,
        Code::NotFound,
        "unknown device dev-nope",
    );
    let request = admin.req(v1::RequestDeviceLogsRequest {
        device_id: till.clone(),
        max_lines: 10_001,
        ..Default::default()
    });
    assert_status(
        admin.client.request_device_logs(request).await,
        Code::InvalidArgument,
        "max_lines: at most 10000",
    );

    // A revoked till: no new request, and its old one is not answered.
    let waiting = request_logs(&mut admin, &other, "").await.unwrap();
    let revoke = admin.req(v1::RevokeDeviceRequest {
        device_id: other.clone(),
        reason: "stolen".into(),
    });
    admin.client.revoke_device(revoke).await.unwrap();
    assert_status(
        request_logs(&mut admin, &other, "").await,
        Code::FailedPrecondition,
        "revoked",
    );
    assert_status(
        upload(
            &s,
            &other_credential,
            vec![message(&waiting.id, vec![line("x")], true)],
        )
        .await,
        Code::PermissionDenied,
        "revoked",
    );

    // The request the refusals were about is still there for its till.
    let answer = upload(
        &s,
        &credential,
        vec![message(&info.id, vec![line("ok")], true)],
    )
    .await
    .unwrap();
    assert_eq!(answer.lines_stored, 1);
    assert!(
        metric(&s, "posfleet_log_requests_total{result=\"refused\"}").await >= 6.0,
        "refused requests and uploads are counted"
    );
    s.finish().await;
}

async fn oversized_uploads_are_cut_saying_why(backend: Backend) {
    let s = setup(backend, |c| c.log_request_max_bytes = 64 * 1024).await;
    let mut admin = s.server.admin().await;
    admin.store("lyon-01").await;
    let (till, credential) = s.enrolled_device("lyon-01").await;
    let info = request_logs(&mut admin, &till, "").await.unwrap();
    let long = "z".repeat(20 * 1024);
    let mut lines = vec![line(&long)];
    lines.extend((0..100).map(|n| line(&format!("{n:03} {}", "y".repeat(996)))));
    // One message larger than the control plane takes (max_message_size_bytes).
    assert_status(
        upload(
            &s,
            &credential,
            vec![message(&info.id, lines.clone(), true)],
        )
        .await,
        Code::OutOfRange,
        "message length too large",
    );
    // The same lines in messages of a sensible size.
    let mut messages: Vec<v1::LogUpload> = lines
        .chunks(20)
        .map(|chunk| message(&info.id, chunk.to_vec(), false))
        .collect();
    messages.push(message(&info.id, vec![], true));
    let answer = upload(&s, &credential, messages).await.unwrap();
    assert!(
        answer
            .truncated_reason
            .contains("reached this request's limit of 65536 bytes"),
        "{}",
        answer.truncated_reason
    );
    let (stored, last) = read_back(&mut admin, &info.id).await;
    assert_eq!(stored.len() as u64, answer.lines_stored);
    assert!((50..=60).contains(&stored.len()), "{}", stored.len());
    assert!(
        stored[0]
            .text
            .ends_with("[line cut: it was 20480 bytes, the limit is 8192]"),
        "a long line is cut, saying so"
    );
    let kept: usize = stored.iter().map(|l| l.text.len() + l.source.len()).sum();
    assert!(kept <= 64 * 1024, "{kept}");
    assert_eq!(last.state, "done");
    assert!(
        last.note.contains("later lines were dropped"),
        "{}",
        last.note
    );
    assert_eq!(
        metric(&s, "posfleet_log_requests_total{result=\"truncated\"}").await,
        1.0
    );
    s.finish().await;
}

async fn a_request_expires_when_its_till_does_not_answer_in_time(backend: Backend) {
    let s = setup(backend, |c| c.log_request_expiry_seconds = 1).await;
    let mut admin = s.server.admin().await;
    admin.store("lyon-01").await;
    let (till, credential) = s.enrolled_device("lyon-01").await;
    let info = request_logs(&mut admin, &till, "").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert!(heartbeat_requests(&s, &credential).await.is_empty());
    assert_status(
        upload(
            &s,
            &credential,
            vec![message(&info.id, vec![line("late")], true)],
        )
        .await,
        Code::FailedPrecondition,
        "expired at",
    );
    let (lines, last) = read_back(&mut admin, &info.id).await;
    assert!(lines.is_empty());
    assert_eq!(last.state, "expired");
    // Counted when the next request prunes it.
    request_logs(&mut admin, &till, "").await.unwrap();
    assert_eq!(
        metric(&s, "posfleet_log_requests_total{result=\"expired\"}").await,
        1.0
    );
    s.finish().await;
}

on_both_backends!(
    a_request_reaches_its_till_and_its_upload_is_read_back,
    uploads_the_till_was_not_asked_for_are_refused,
    oversized_uploads_are_cut_saying_why,
    a_request_expires_when_its_till_does_not_answer_in_time,
);
