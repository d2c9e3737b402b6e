//! The whole agent against a control plane that records its heartbeats:
//! finished minutes go out with them, again after a failed heartbeat, and
//! never again once one carrying them was acknowledged.

use posfleet_agent::Agent;
use posfleet_agent::config::AgentConfig;
use posfleet_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use posfleet_proto::v1::{
    EnrollRequest, EnrollResponse, HeartbeatRequest, HeartbeatResponse, LogUpload,
    RenewCertificateRequest, RenewCertificateResponse, ReportProgressRequest,
    ReportProgressResponse, UploadLogsResponse,
};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::{Request, Response, Status, Streaming};

/// Records heartbeats; refuses the first one that carries minutes.
#[derive(Default, Clone)]
struct Recorder {
    heartbeats: Arc<Mutex<Vec<(HeartbeatRequest, bool)>>>,
}

#[tonic::async_trait]
impl AgentService for Recorder {
    async fn enroll(&self, _: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        Ok(Response::new(EnrollResponse {
            device_id: "till-1".into(),
            device_credential: "credential".into(),
            store_id: "s1".into(),
            ..Default::default()
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let request = request.into_inner();
        let mut heartbeats = self.heartbeats.lock().unwrap();
        let refuse = !request.signal_minutes.is_empty()
            && heartbeats.iter().all(|(h, _)| h.signal_minutes.is_empty());
        heartbeats.push((request, !refuse));
        if refuse {
            return Err(Status::unavailable("the control plane is restarting"));
        }
        Ok(Response::new(HeartbeatResponse {
            next_heartbeat_interval_seconds: 1,
            ..Default::default()
        }))
    }

    async fn report_progress(
        &self,
        _: Request<ReportProgressRequest>,
    ) -> Result<Response<ReportProgressResponse>, Status> {
        Ok(Response::new(ReportProgressResponse::default()))
    }

    async fn renew_certificate(
        &self,
        _: Request<RenewCertificateRequest>,
    ) -> Result<Response<RenewCertificateResponse>, Status> {
        Err(Status::unimplemented("no TLS here"))
    }

    async fn upload_logs(
        &self,
        _: Request<Streaming<LogUpload>>,
    ) -> Result<Response<UploadLogsResponse>, Status> {
        Err(Status::unimplemented("no logs here"))
    }
}

type Heartbeats = [(HeartbeatRequest, bool)];

/// An agent running in this process until stopped.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), posfleet_agent::Error>>,
}

impl Running {
    fn start(config: &AgentConfig) -> Running {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(Agent::open(config.clone()).unwrap().run(async {
            let _ = stopped.await;
        }));
        Running { stop, task }
    }

    /// Stops it as SIGTERM would, and waits until it stopped.
    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// Waits until the heartbeats received satisfy `done`.
async fn wait_for(recorder: &Recorder, what: &str, done: impl Fn(&Heartbeats) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done(&recorder.heartbeats.lock().unwrap()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn set_clock(file: &Path, minute: i64) {
    let time = chrono::DateTime::from_timestamp(minute * 60 + 30, 0).unwrap();
    std::fs::write(file, time.to_rfc3339()).unwrap();
}

#[tokio::test]
async fn heartbeats_carry_finished_minutes_until_one_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let recorder = Recorder::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(recorder.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let clock = dir.path().join("clock");
    let minute = 29_000_000;
    set_clock(&clock, minute);
    let data_dir = dir.path().join("data");
    let config = AgentConfig {
        server_url: format!("http://{address}"),
        data_dir: data_dir.clone(),
        enrollment_token: "token".into(),
        clock_file: clock.clone(),
        p2p_enabled: false,
        max_backoff_seconds: 1,
        ..AgentConfig::default()
    };
    let agent = Running::start(&config);
    // The program reports through the local API once it listens.
    let socket = data_dir.join("signals.sock");
    let report = |lines: &[&str]| {
        let lines: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        posfleet_agent::signals::socket::send(&socket, &lines)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while report(&["transactions:2|c", "checkout_seconds:1.5|v", "Bad|c"]).is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let heartbeats = || recorder.heartbeats.lock().unwrap().clone();
    // Nothing goes out while the minute is being filled.
    wait_for(&recorder, "a heartbeat", |h| !h.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        heartbeats()
            .iter()
            .all(|(h, _)| h.signal_minutes.is_empty())
    );
    // The next minute: the first heartbeat with it is refused, the next
    // one carries it again.
    set_clock(&clock, minute + 1);
    wait_for(
        &recorder,
        "an acknowledged heartbeat with the minute",
        |h| h.iter().any(|(h, ok)| *ok && !h.signal_minutes.is_empty()),
    )
    .await;
    let with_minutes: Vec<(HeartbeatRequest, bool)> = heartbeats()
        .into_iter()
        .filter(|(h, _)| !h.signal_minutes.is_empty())
        .collect();
    let (refused, _) = &with_minutes[0];
    let (acknowledged, _) = &with_minutes[1];
    assert!(!with_minutes[0].1 && with_minutes[1].1);
    assert_eq!(refused.signal_minutes, acknowledged.signal_minutes);
    let sent = &acknowledged.signal_minutes;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].minute, minute);
    assert_eq!(sent[0].counts["transactions"], 2);
    assert_eq!(sent[0].values["checkout_seconds"].values, [1.5]);
    // Once acknowledged, neither the minute nor the drop is sent again.
    let seen = heartbeats().len();
    wait_for(&recorder, "two more heartbeats", |h| h.len() >= seen + 2).await;
    for (later, _) in &heartbeats()[seen..] {
        assert!(later.signal_minutes.is_empty(), "{later:?}");
    }
    // `Bad|c` was dropped: reported until a heartbeat with it was
    // acknowledged, then never again.
    let drops: Vec<(u64, bool)> = heartbeats()
        .iter()
        .map(|(h, ok)| (h.signals_dropped, *ok))
        .filter(|(dropped, _)| *dropped > 0)
        .collect();
    assert_eq!(drops.last(), Some(&(1, true)), "{drops:?}");
    assert!(drops[..drops.len() - 1].iter().all(|d| *d == (1, false)));
    // An empty minute is one too.
    set_clock(&clock, minute + 2);
    wait_for(&recorder, "the empty minute", |h| {
        h.iter()
            .any(|(h, ok)| *ok && h.signal_minutes.iter().any(|m| m.minute == minute + 1))
    })
    .await;
    let last = heartbeats()
        .into_iter()
        .find(|(h, _)| h.signal_minutes.iter().any(|m| m.minute == minute + 1))
        .unwrap()
        .0;
    assert_eq!(last.signal_minutes.len(), 1);
    assert!(last.signal_minutes[0].counts.is_empty() && last.signal_minutes[0].values.is_empty());
    // What a stop leaves unsent (the minute being filled) goes out after
    // the next start.
    report(&["transactions:5|c"]).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.stop().await;
    assert!(data_dir.join("signals.pb").is_file());
    let agent = Running::start(&config);
    wait_for(&recorder, "the minute kept over the restart", |h| {
        h.iter().any(|(h, ok)| {
            *ok && h
                .signal_minutes
                .iter()
                .any(|m| m.minute == minute + 2 && m.counts.get("transactions") == Some(&5))
        })
    })
    .await;
    let sent: Vec<i64> = heartbeats()
        .iter()
        .filter(|(_, ok)| *ok)
        .flat_map(|(h, _)| h.signal_minutes.iter().map(|m| m.minute))
        .collect();
    assert_eq!(sent, [minute, minute + 1, minute + 2], "each minute once");
    agent.stop().await;
}
