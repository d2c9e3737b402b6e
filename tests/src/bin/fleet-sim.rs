//! fleet-sim: N simulated devices, each enrolling with its own Ed25519 key
//! and heartbeating with its own credential over real gRPC, against a real
//! `posfleet-control-plane` process on SQLite or PostgreSQL.
//!
//! Phases: enrollment; one heartbeat from every device (cold credential
//! cache, as after a restart); a fixed-rate phase (open loop: latency counts
//! from each request's scheduled time, so queueing is not hidden); a
//! max-throughput phase (closed loop). Figures go to a JSON file.
//!
//!     cargo run --release -p posfleet-e2e --bin fleet-sim -- --devices 100000
//!
//! With `--rollout`, a rollout phase follows (and `--skip-heartbeat-phases`
//! leaves out the fixed-rate and max-throughput phases, keeping enrollment
//! and the cold pass): the repository is initialised (`posfleet keys init`),
//! pos-app 1.1.0 built and published (`posfleet bundle build|publish`), and
//! a rollout created over the whole fleet, one wave of 100%,
//! `--max-unavailable-per-store` tills of a store at once. The fleet
//! heartbeats open loop at `--rate` for `--rollout-seconds`; the rollout
//! starts `ROLLOUT_DELAY` into that phase, so the control plane's CPU is
//! seen before and during dispatch. A simulated till that is told to have
//! pos-app 1.1.0 reports it installed from its next heartbeat on (an
//! instant install), so the rollout can complete: the engine never has
//! every till of a store in flight at once, so the last till of each store
//! is dispatched only once another has succeeded.
//!
//! Dispatch is timed from the StartRollout call, by polling GetRollout
//! (dispatched = every device past `pending`), and engine-side from the
//! control plane's own log (`Rollout started.` to each `Devices
//! dispatched.`). Figures go to `benchmarks/fleet-sim-rollout-<database>.json`.
//!
//!     cargo run --release -p posfleet-e2e --bin fleet-sim -- --devices 100000 \
//!         --devices-per-store 200 --rollout --skip-heartbeat-phases
//!
//! With `--enroll-flood`, the fixed-rate and max-throughput phases give way
//! to a side-by-side comparison: the same open-loop heartbeat load at
//! `--rate` for `--phase-seconds`, alternately quiet and under a flood of
//! `Enroll` calls with bogus tokens (each validly signed, so it passes every
//! check that needs no database) from a second source address
//! (`--flood-source`, another loopback address), `--flood-concurrency` in
//! flight, for `--flood-rounds` rounds. Heartbeat p50/p99/max, errors and
//! heartbeat batches the control plane dropped are reported for both, with
//! the flood's own calls by answer. Figures go to
//! `benchmarks/fleet-sim-enroll-flood-<database>.json`.
//!
//!     cargo run --release -p posfleet-e2e --bin fleet-sim -- --devices 10000 \
//!         --rate 1000 --phase-seconds 20 --enroll-flood
//!
//! With `--backup`, the fixed-rate and max-throughput phases give way to
//! `posfleet-control-plane backup` run 3 times beside the serving control
//! plane, each backup restored (`restore`) into a fresh data dir and, on
//! PostgreSQL, a fresh database: times, their medians and the backup's size
//! go to `benchmarks/fleet-sim-backup-<database>.json`.
//!
//!     cargo run --release -p posfleet-e2e --bin fleet-sim -- --devices 100000 --backup
//!
//! With `--tls`, none of the above: every simulated till gets a connection
//! of its own, over plaintext and then over mutual TLS with its own device
//! certificate, for enrollment, steady heartbeats and a reconnect storm
//! after a control-plane restart, side by side (see `connections`).
//!
//!     cargo run --release -p posfleet-e2e --bin fleet-sim -- --tls --devices 20000
//!
//! With `--replicas N`, none of the above: N control-plane replicas on one
//! PostgreSQL database behind HAProxy, heartbeats measured through it to
//! one, two, … N of them in one run (see `replicas`).
//!
//!     cargo run --release -p posfleet-e2e --bin fleet-sim -- --replicas 3 \
//!         --database postgres --devices 10000 --connections 6 --phase-seconds 15
//!
//! The simulator enrolls its whole fleet through one address, which no
//! store does, so it turns the per-address `Enroll` limit off
//! (`--peer-enroll-calls-per-minute 0`); the limit on refused calls keeps
//! its default.

use clap::{Parser, ValueEnum};
use ed25519_dalek::{Signer, SigningKey};
use posfleet_e2e::{ControlPlane, PostgresDb, cpu_seconds, median, peak_rss_bytes, pos_app_source};
use posfleet_proto::v1;
use posfleet_proto::v1::admin_service_client::AdminServiceClient;
use posfleet_proto::v1::agent_service_client::AgentServiceClient;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

#[derive(Debug, Clone, Copy, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Database {
    Sqlite,
    Postgres,
}

#[derive(Debug, Parser)]
#[command(about = "Simulate a fleet of tills heartbeating against a real control plane.")]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    devices: usize,
    #[arg(long, default_value_t = 100)]
    devices_per_store: usize,
    #[arg(long, value_enum, default_value_t = Database::Sqlite)]
    database: Database,
    /// Server on which a fresh database is created for the run.
    #[arg(
        long,
        env = "POSFLEET_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// Heartbeats per second in the fixed-rate phase.
    #[arg(long, default_value_t = 5000)]
    rate: u32,
    /// Length of the fixed-rate and max-throughput phases.
    #[arg(long, default_value_t = 30)]
    phase_seconds: u64,
    /// HTTP/2 connections shared by the simulated devices.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight in the closed-loop phases.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Default: benchmarks/fleet-sim-<database>.json, or
    /// benchmarks/fleet-sim-rollout-<database>.json with `--rollout`.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Add the rollout phase (see the header).
    #[arg(long)]
    rollout: bool,
    /// Leave out the fixed-rate and max-throughput phases.
    #[arg(long)]
    skip_heartbeat_phases: bool,
    /// Length of the rollout phase (heartbeats at `--rate` throughout).
    #[arg(long, default_value_t = 90)]
    rollout_seconds: u64,
    /// The rollout's `max_unavailable_per_store`.
    #[arg(long, default_value_t = 1000)]
    max_unavailable_per_store: u32,
    /// Compare heartbeats quiet and under an Enroll flood (see the header),
    /// instead of the fixed-rate and max-throughput phases.
    #[arg(long)]
    enroll_flood: bool,
    /// Enroll calls in flight from the flood's source.
    #[arg(long, default_value_t = 32)]
    flood_concurrency: usize,
    /// Quiet and flooded phase pairs.
    #[arg(long, default_value_t = 2)]
    flood_rounds: usize,
    /// Where the flood comes from: a loopback address other than the
    /// simulated fleet's 127.0.0.1.
    #[arg(long, default_value = "127.0.0.2")]
    flood_source: IpAddr,
    /// Time backup and restore (see the header), instead of the
    /// fixed-rate and max-throughput phases.
    #[arg(long)]
    backup: bool,
    /// One connection per simulated till, plaintext and mutual TLS side by
    /// side (see `connections`), instead of the phases above.
    #[arg(long)]
    tls: bool,
    /// With `--tls`: the transports measured, in turn.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Transport::Plaintext, Transport::Tls])]
    transports: Vec<Transport>,
    /// With `--tls`: what follows enrollment and connecting.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Scenario::Steady, Scenario::Storm])]
    scenario: Vec<Scenario>,
    /// With `--tls`: a till that has not heartbeated this long after the
    /// restart gives up.
    #[arg(long, default_value_t = 120)]
    storm_deadline_seconds: u64,
    /// With `--tls`: the longest wait between a till's retries (the
    /// agent's default).
    #[arg(long, default_value_t = 300)]
    max_backoff_seconds: u64,
    /// Heartbeats through HAProxy to one, two, … this many replicas on one
    /// PostgreSQL database, side by side (see `replicas`), instead of the
    /// phases above.
    #[arg(long, default_value_t = 0)]
    replicas: usize,
}

/// How a simulated till reaches the control plane (`--tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Transport {
    Plaintext,
    Tls,
}

/// What `--tls` measures once the fleet is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Scenario {
    /// Heartbeats at `--rate` over the open connections.
    Steady,
    /// A control-plane restart, every till reconnecting at once.
    Storm,
}

/// The version the rollout ships; the fleet starts on 1.0.0.
const RELEASE: &str = "1.1.0";
/// Heartbeats before StartRollout, for a baseline in the same phase.
const ROLLOUT_DELAY: Duration = Duration::from_secs(5);

struct Device {
    /// `Device <credential>`; none for a till whose certificate is its
    /// identity (mutual TLS).
    authorization: Option<MetadataValue<Ascii>>,
    /// Told to have pos-app RELEASE: reports it installed from now on.
    upgraded: AtomicBool,
}

struct Sim {
    channels: Vec<Channel>,
    devices: Vec<Device>,
    /// Heartbeat responses that named pos-app RELEASE.
    told_release: AtomicUsize,
}

impl Sim {
    async fn heartbeat(&self, i: usize) -> Result<(), Code> {
        self.heartbeat_desired(i).await.map(|_| ())
    }

    /// One heartbeat; returns the desired version of pos-app, if any.
    async fn heartbeat_desired(&self, i: usize) -> Result<Option<String>, Code> {
        let device = &self.devices[i % self.devices.len()];
        let pos_app = if device.upgraded.load(Ordering::Relaxed) {
            RELEASE
        } else {
            "1.0.0"
        };
        let mut request = Request::new(v1::HeartbeatRequest {
            agent_version: "0.1.0".into(),
            installed_bundles: [
                ("pos-app".to_string(), pos_app.to_string()),
                ("catalog-store".to_string(), "2026.11.21".to_string()),
            ]
            .into(),
            agent_uptime_seconds: 3600,
            p2p_listen_addrs: Vec::new(),
            store_peers_digest: Vec::new(),
            trust_bundle_sha256: Vec::new(),
            p2p_peers_banned: 0,
            signal_minutes: Vec::new(),
            signals_dropped: 0,
            health: Some(v1::Health {
                uptime_seconds: 86_400,
                disk_free_bytes: 20 << 30,
                disk_total_bytes: 64 << 30,
                memory_total_bytes: 4 << 30,
                memory_available_bytes: 2 << 30,
                peripherals: vec![v1::Peripheral {
                    kind: v1::PeripheralKind::Printer as i32,
                    name: "receipt-printer".into(),
                    state: v1::PeripheralState::Ok as i32,
                    detail: String::new(),
                }],
            }),
        });
        if let Some(authorization) = &device.authorization {
            request
                .metadata_mut()
                .insert(posfleet_proto::AUTHORIZATION, authorization.clone());
        }
        let mut client = AgentServiceClient::new(self.channels[i % self.channels.len()].clone());
        let response = client
            .heartbeat(request)
            .await
            .map_err(|s| s.code())?
            .into_inner();
        let desired = response
            .desired_bundles
            .into_iter()
            .find(|b| b.name == "pos-app")
            .map(|b| b.version);
        if desired.as_deref() == Some(RELEASE) {
            self.told_release.fetch_add(1, Ordering::Relaxed);
            device.upgraded.store(true, Ordering::Relaxed);
        }
        Ok(desired)
    }
}

#[derive(Debug, Serialize)]
struct Phase {
    name: String,
    mode: &'static str,
    target_per_second: Option<u32>,
    sent: usize,
    ok: usize,
    errors: BTreeMap<String, usize>,
    seconds: f64,
    achieved_per_second: f64,
    latency_p50_ms: f64,
    latency_p90_ms: f64,
    latency_p99_ms: f64,
    latency_max_ms: f64,
    control_plane_cpu_cores: f64,
    simulator_cpu_cores: f64,
}

struct Meter {
    pid: u32,
    started: Instant,
    cp_cpu: f64,
    sim_cpu: f64,
}

impl Meter {
    fn start(pid: u32) -> Meter {
        Meter {
            pid,
            started: Instant::now(),
            cp_cpu: cpu_seconds(pid).unwrap_or(0.0),
            sim_cpu: cpu_seconds(std::process::id()).unwrap_or(0.0),
        }
    }

    fn finish(
        self,
        name: &str,
        mode: &'static str,
        target: Option<u32>,
        results: Vec<(Result<(), Code>, Duration)>,
    ) -> Phase {
        let seconds = self.started.elapsed().as_secs_f64();
        let mut latencies: Vec<f64> = results
            .iter()
            .map(|(_, l)| l.as_secs_f64() * 1000.0)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            if latencies.is_empty() {
                0.0
            } else {
                latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)]
            }
        };
        let mut errors = BTreeMap::new();
        for (result, _) in &results {
            if let Err(code) = result {
                *errors.entry(format!("{code:?}")).or_insert(0) += 1;
            }
        }
        let ok = results.iter().filter(|(r, _)| r.is_ok()).count();
        Phase {
            name: name.into(),
            mode,
            target_per_second: target,
            sent: results.len(),
            ok,
            errors,
            seconds,
            achieved_per_second: ok as f64 / seconds,
            latency_p50_ms: pct(0.50),
            latency_p90_ms: pct(0.90),
            latency_p99_ms: pct(0.99),
            latency_max_ms: latencies.last().copied().unwrap_or(0.0),
            control_plane_cpu_cores: (cpu_seconds(self.pid).unwrap_or(0.0) - self.cp_cpu) / seconds,
            simulator_cpu_cores: (cpu_seconds(std::process::id()).unwrap_or(0.0) - self.sim_cpu)
                / seconds,
        }
    }
}

/// Every device once, `concurrency` at a time.
async fn closed_loop<F, Fut>(
    count: usize,
    concurrency: usize,
    deadline: Option<Instant>,
    call: F,
) -> Vec<(Result<(), Code>, Duration)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), Code>> + Send,
{
    let call = Arc::new(call);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let call = call.clone();
        let next = next.clone();
        workers.spawn(async move {
            let mut out = Vec::new();
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return out;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if deadline.is_none() && i >= count {
                    return out;
                }
                let started = Instant::now();
                let result = call(i).await;
                out.push((result, started.elapsed()));
            }
        });
    }
    let mut all = Vec::new();
    while let Some(worker) = workers.join_next().await {
        all.extend(worker.expect("worker task"));
    }
    all
}

/// One heartbeat from every device, `concurrency` in flight.
async fn every_device_once(
    sim: &Arc<Sim>,
    concurrency: usize,
) -> Vec<(Result<(), Code>, Duration)> {
    let s = sim.clone();
    closed_loop(sim.devices.len(), concurrency, None, move |i| {
        let s = s.clone();
        async move { s.heartbeat(i).await }
    })
    .await
}

/// Heartbeats as fast as they are answered, `concurrency` in flight, for
/// `seconds`.
async fn saturate(
    sim: &Arc<Sim>,
    concurrency: usize,
    seconds: u64,
) -> Vec<(Result<(), Code>, Duration)> {
    let s = sim.clone();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    closed_loop(usize::MAX, concurrency, Some(deadline), move |i| {
        let s = s.clone();
        async move { s.heartbeat(i).await }
    })
    .await
}

/// `rate` requests per second for `seconds`, each timed from when it was due.
async fn open_loop(
    sim: Arc<Sim>,
    rate: u32,
    seconds: u64,
    offset: usize,
) -> Vec<(Result<(), Code>, Duration)> {
    open_loop_timed(sim, rate, seconds, offset)
        .await
        .into_iter()
        .map(|(result, latency, _)| (result, latency))
        .collect()
}

/// As `open_loop`, with each request's due time.
async fn open_loop_timed(
    sim: Arc<Sim>,
    rate: u32,
    seconds: u64,
    offset: usize,
) -> Vec<(Result<(), Code>, Duration, Instant)> {
    let total = rate as usize * seconds as usize;
    let in_flight = Arc::new(Semaphore::new(4096));
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..total {
        let due = start + Duration::from_secs_f64(k as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        let sim = sim.clone();
        tasks.spawn(async move {
            let result = sim.heartbeat(offset + k).await;
            drop(permit);
            (result, due.elapsed(), due.into_std())
        });
    }
    let mut all = Vec::with_capacity(total);
    while let Some(task) = tasks.join_next().await {
        all.push(task.expect("heartbeat task"));
    }
    all
}

fn print_phase(p: &Phase) {
    eprintln!(
        "  {:<44} {:>9.0}/s  p50 {:>6.2} ms  p99 {:>7.2} ms  max {:>7.1} ms  errors {:?}  control plane {:.2} cores, simulator {:.2} cores",
        p.name,
        p.achieved_per_second,
        p.latency_p50_ms,
        p.latency_p99_ms,
        p.latency_max_ms,
        p.errors,
        p.control_plane_cpu_cores,
        p.simulator_cpu_cores
    );
}

/// The control plane's own view of its heartbeat writer, from `/metrics`.
#[derive(Debug, Serialize)]
struct WriterFigures {
    batches: f64,
    mean_rows_per_batch: f64,
    mean_flush_ms: f64,
}

/// The control plane's `/metrics` text.
async fn scrape(http_address: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(http_address).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}

async fn writer_figures(http_address: &str) -> anyhow::Result<WriterFigures> {
    let text = scrape(http_address).await?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    let batches = value("posfleet_heartbeat_flush_seconds_count");
    Ok(WriterFigures {
        batches,
        mean_rows_per_batch: value("posfleet_heartbeat_flush_rows_sum") / batches.max(1.0),
        mean_flush_ms: 1000.0 * value("posfleet_heartbeat_flush_seconds_sum") / batches.max(1.0),
    })
}

/// What a Prometheus scrape of the control plane costs at this fleet size.
#[derive(Debug, Serialize)]
struct ScrapeFigures {
    /// Scrapes that read the fleet gauges from the database (the first
    /// after `FLEET_GAUGES_MAX_AGE`), median of `SCRAPES`.
    refreshing_scrape_ms_median: f64,
    /// Scrapes right after one of those (the gauges as they were).
    cached_scrape_ms_median: f64,
    body_bytes: usize,
    /// Samples exposed (lines that are not comments).
    samples: usize,
}

const SCRAPES: usize = 5;

async fn scrape_figures(http_address: &str) -> anyhow::Result<ScrapeFigures> {
    let (mut refreshing, mut cached) = (Vec::new(), Vec::new());
    let mut text = String::new();
    for _ in 0..SCRAPES {
        // Past the gauges' maximum age (5 s): this scrape reads them again.
        tokio::time::sleep(Duration::from_millis(5_200)).await;
        let started = Instant::now();
        text = scrape(http_address).await?;
        refreshing.push(started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        scrape(http_address).await?;
        cached.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok(ScrapeFigures {
        refreshing_scrape_ms_median: median(refreshing),
        cached_scrape_ms_median: median(cached),
        body_bytes: body.len(),
        samples: body
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count(),
    })
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    database: Database,
    devices: usize,
    stores: usize,
    cores: usize,
    connections: usize,
    enrollment_seconds: f64,
    enrollments_per_second: f64,
    phases: Vec<Phase>,
    control_plane_peak_rss_bytes: u64,
    heartbeat_writer: WriterFigures,
    metrics_scrape: ScrapeFigures,
    devices_online_after: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    rollout: Option<RolloutFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    enroll_flood: Option<FloodFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backup: Option<posfleet_e2e::backup::BackupFigures>,
    command: String,
    /// The commit measured (`git describe`).
    commit: Option<String>,
}

/// The cores this machine has.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// Writes `report` to `--output`, by default
/// `benchmarks/fleet-sim-<kind><database>.json`; returns the file.
fn write_figures(args: &Args, kind: &str, report: &impl Serialize) -> anyhow::Result<PathBuf> {
    let database = match args.database {
        Database::Sqlite => "sqlite",
        Database::Postgres => "postgres",
    };
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("benchmarks/fleet-sim-{kind}{database}.json")));
    if let Some(parent) = output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&output, serde_json::to_string_pretty(report)? + "\n")?;
    Ok(output)
}

/// `stores` stores and one enrollment token for `per_store` tills each;
/// returns the tokens' secrets.
async fn create_stores(
    admin: &mut AdminServiceClient<Channel>,
    bearer: &MetadataValue<Ascii>,
    stores: usize,
    per_store: usize,
) -> anyhow::Result<Vec<String>> {
    let mut tokens = Vec::with_capacity(stores);
    for s in 0..stores {
        let id = format!("store-{s:05}");
        admin
            .create_store(with_bearer(
                bearer,
                v1::CreateStoreRequest {
                    id: id.clone(),
                    name: format!("Store {s}"),
                    time_zone: "Europe/Paris".into(),
                },
            ))
            .await?;
        let token = admin
            .create_enrollment_token(with_bearer(
                bearer,
                v1::CreateEnrollmentTokenRequest {
                    store_id: id,
                    expires_in_seconds: 3600,
                    uses: per_store as u32,
                },
            ))
            .await?
            .into_inner()
            .secret;
        tokens.push(token);
    }
    Ok(tokens)
}

fn with_bearer<T>(bearer: &MetadataValue<Ascii>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(posfleet_proto::AUTHORIZATION, bearer.clone());
    request
}

/// An Enroll call signed by `key`, with `certificate_request` (empty when
/// the control plane serves plaintext).
fn enroll_request(
    key: &SigningKey,
    token: String,
    serial: String,
    certificate_request: Vec<u8>,
) -> v1::EnrollRequest {
    let public_key = key.verifying_key().to_bytes().to_vec();
    let payload = posfleet_proto::enroll_signing_payload(&token, &public_key, "sim-pos", &serial);
    v1::EnrollRequest {
        enrollment_token: token,
        signature: key.sign(&payload).to_bytes().to_vec(),
        public_key,
        hardware_model: "sim-pos".into(),
        serial_number: serial,
        agent_version: "0.1.0".into(),
        certificate_request,
    }
}

/// The control plane's flags in every run: quiet agent calls, a long
/// heartbeat interval (the simulator sets the pace), no per-address
/// Enroll limit (the whole simulated fleet enrolls through one address),
/// and no four-eyes approval (one token creates and starts the rollout).
const QUIET: [&str; 8] = [
    "--log-level",
    "info,posfleet_control_plane::agent_api=warn",
    "--heartbeat-interval-seconds",
    "300",
    "--peer-enroll-calls-per-minute",
    "0",
    "--approval-threshold-devices",
    "10000000",
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let open_files = raise_open_files_limit(2 * args.devices as u64 + 4096)?;
    if args.tls {
        return connections::run(&args, open_files).await;
    }
    if args.replicas > 0 {
        return replicas::run(&args).await;
    }
    let dir = tempfile::tempdir()?;
    let postgres = match args.database {
        Database::Sqlite => None,
        Database::Postgres => Some(PostgresDb::create_on(&args.postgres_url)),
    };
    let cp = ControlPlane::start(
        &dir.path().join("cp"),
        postgres.as_ref().map(|p| p.url.as_str()),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &QUIET,
    );
    let pid = cp.process.child.id();
    let url = cp.url();
    let admin_token = std::fs::read_to_string(cp.admin_token_file())?
        .trim()
        .to_string();
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        channels.push(Channel::from_shared(url.clone())?.connect().await?);
    }
    let bearer: MetadataValue<Ascii> = format!("Bearer {admin_token}").parse()?;
    let mut admin_client = AdminServiceClient::new(channels[0].clone());

    // Stores and one token per store.
    let stores = args.devices.div_ceil(args.devices_per_store);
    eprintln!(
        "fleet-sim: {} devices in {stores} stores on {:?}",
        args.devices, args.database
    );
    let tokens = create_stores(&mut admin_client, &bearer, stores, args.devices_per_store).await?;

    let (devices, enrollment_seconds) =
        enroll_fleet(&channels, tokens, args.devices, args.devices_per_store).await?;
    let sim = Arc::new(Sim {
        channels: channels.clone(),
        devices,
        told_release: AtomicUsize::new(0),
    });

    let mut phases = Vec::new();
    let meter = Meter::start(pid);
    let results = every_device_once(&sim, args.concurrency).await;
    phases.push(meter.finish(
        "first heartbeat of every device (cold cache)",
        "closed loop",
        None,
        results,
    ));
    print_phase(phases.last().expect("pushed"));

    let enroll_flood = if args.enroll_flood {
        Some(flood_comparison(&args, &cp, &url, &sim).await?)
    } else {
        None
    };

    if !args.skip_heartbeat_phases && !args.enroll_flood && !args.backup {
        let meter = Meter::start(pid);
        let results = open_loop(sim.clone(), args.rate, args.phase_seconds, 0).await;
        phases.push(meter.finish(
            &format!("fixed rate {} heartbeats/s", args.rate),
            "open loop",
            Some(args.rate),
            results,
        ));
        print_phase(phases.last().expect("pushed"));

        let meter = Meter::start(pid);
        let results = saturate(&sim, args.concurrency, args.phase_seconds).await;
        phases.push(meter.finish("max throughput", "closed loop", None, results));
        print_phase(phases.last().expect("pushed"));
    }

    let rollout = if args.rollout {
        let figures = rollout_phase(&args, &cp, dir.path(), &sim, &bearer, &mut phases).await?;
        Some(figures)
    } else {
        None
    };
    let backup = args.backup.then(|| {
        let postgres_server = postgres.as_ref().map(|_| args.postgres_url.as_str());
        tokio::task::block_in_place(|| {
            posfleet_e2e::backup::measure(&cp, dir.path(), postgres_server, 3)
        })
    });
    let control_plane_peak_rss_bytes = peak_rss_bytes(pid).unwrap_or(0);
    let heartbeat_writer = writer_figures(&cp.http_address).await?;
    eprintln!("  heartbeat writer: {heartbeat_writer:?}");
    let metrics_scrape = scrape_figures(&cp.http_address).await?;
    eprintln!("  /metrics: {metrics_scrape:?}");

    // Every device must now be online in the fleet view.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut online = 0;
    let mut page_token = String::new();
    loop {
        let page = admin_client
            .list_devices(with_bearer(
                &bearer,
                v1::ListDevicesRequest {
                    status: v1::DeviceStatus::Online as i32,
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        online += page
            .devices
            .iter()
            .filter(|d| {
                d.agent_version == "0.1.0"
                    && d.health.as_ref().is_some_and(|h| h.memory_total_bytes > 0)
            })
            .count();
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    eprintln!(
        "  devices online afterwards: {online} of {}; control plane peak RSS {} MiB",
        args.devices,
        control_plane_peak_rss_bytes >> 20
    );

    let report = Report {
        benchmark: "fleet-sim",
        database: args.database,
        devices: args.devices,
        stores,
        cores: cores(),
        connections: args.connections,
        enrollment_seconds,
        enrollments_per_second: args.devices as f64 / enrollment_seconds,
        phases,
        control_plane_peak_rss_bytes,
        heartbeat_writer,
        metrics_scrape,
        devices_online_after: online,
        rollout,
        enroll_flood,
        backup,
        command: posfleet_e2e::command_line(),
        commit: posfleet_e2e::measured_commit(),
    };
    let kind = if args.rollout {
        "rollout-"
    } else if args.enroll_flood {
        "enroll-flood-"
    } else if args.backup {
        "backup-"
    } else {
        ""
    };
    let output = write_figures(&args, kind, &report)?;
    eprintln!("  figures written to {}", output.display());
    anyhow::ensure!(
        online == args.devices,
        "only {online} of {} devices online after the run",
        args.devices
    );
    if let Some(f) = &report.enroll_flood {
        anyhow::ensure!(
            f.dropped_batches == 0,
            "{} heartbeat batches dropped",
            f.dropped_batches
        );
    }
    if let Some(r) = &report.rollout {
        anyhow::ensure!(
            r.sample_told_release == r.sample_checked,
            "only {} of {} sampled devices were told to have pos-app {RELEASE}",
            r.sample_told_release,
            r.sample_checked
        );
    }
    Ok(())
}

/// Enrolls `count` simulated devices over `channels`, 64 at a time, each
/// with its own key (proof of possession) and `tokens[i / per_store]`;
/// returns them with their credentials, and the seconds it took.
async fn enroll_fleet(
    channels: &[Channel],
    tokens: Vec<String>,
    count: usize,
    per_store: usize,
) -> anyhow::Result<(Vec<Device>, f64)> {
    let enroll_channels = channels.to_vec();
    let tokens = Arc::new(tokens);
    let credentials = Arc::new(std::sync::Mutex::new(vec![String::new(); count]));
    let sink = credentials.clone();
    let started = Instant::now();
    let results = closed_loop(count, 64, None, move |i| {
        let channel = enroll_channels[i % enroll_channels.len()].clone();
        let token = tokens[i / per_store].clone();
        let sink = sink.clone();
        async move {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let request = enroll_request(&key, token, format!("SIM-{i:07}"), Vec::new());
            let response = AgentServiceClient::new(channel)
                .enroll(request)
                .await
                .map_err(|s| s.code())?;
            sink.lock().expect("lock")[i] = response.into_inner().device_credential;
            Ok(())
        }
    })
    .await;
    let enrollment_seconds = started.elapsed().as_secs_f64();
    let mut failed: BTreeMap<String, usize> = BTreeMap::new();
    for (result, _) in &results {
        if let Err(code) = result {
            *failed.entry(format!("{code:?}")).or_default() += 1;
        }
    }
    anyhow::ensure!(failed.is_empty(), "enrollments failed: {failed:?}");
    eprintln!(
        "  enrolled {count} devices in {enrollment_seconds:.1}s ({:.0}/s)",
        count as f64 / enrollment_seconds
    );
    let devices = credentials
        .lock()
        .expect("lock")
        .iter()
        .map(|c| {
            Ok(Device {
                authorization: Some(format!("Device {c}").parse()?),
                upgraded: AtomicBool::new(false),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((devices, enrollment_seconds))
}

/// Latency of a set of heartbeats.
#[derive(Debug, Serialize)]
struct Latency {
    heartbeats: usize,
    errors: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn latency(samples: &[&(Result<(), Code>, Duration, Instant)]) -> Latency {
    let mut ms: Vec<f64> = samples
        .iter()
        .map(|(_, l, _)| l.as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if ms.is_empty() {
            0.0
        } else {
            ms[((ms.len() as f64 * p) as usize).min(ms.len() - 1)]
        }
    };
    Latency {
        heartbeats: samples.len(),
        errors: samples.iter().filter(|(r, _, _)| r.is_err()).count(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: ms.last().copied().unwrap_or(0.0),
    }
}

/// One GetRollout poll during the rollout phase.
#[derive(Debug, Serialize)]
struct Poll {
    /// Since the StartRollout call was sent.
    seconds: f64,
    dispatched: u64,
    succeeded: u64,
    /// Control-plane CPU since the previous poll.
    control_plane_cpu_cores: f64,
}

/// One `Devices dispatched.` line of the control plane's log.
#[derive(Debug, Serialize)]
struct Batch {
    /// Since `Rollout started.` (the end of the StartRollout call).
    seconds: f64,
    devices: u64,
    /// The engine's own timing of the dispatch: reading the pending
    /// devices and choosing, then everything including the writes.
    read_ms: u64,
    total_ms: u64,
}

#[derive(Debug, Serialize)]
struct RolloutFigures {
    release: String,
    devices_in_rollout: u64,
    max_unavailable_per_store: u32,
    /// Tills that may be in flight at once: per store, the lesser of
    /// max_unavailable_per_store and the store's tills less one.
    dispatchable_at_once: u64,
    create_rollout_seconds: f64,
    /// The StartRollout call (it writes the rollout's devices).
    start_rollout_call_seconds: f64,
    /// From sending StartRollout, as seen by polling GetRollout (every
    /// 200 ms): the first device dispatched, `dispatchable_at_once`
    /// dispatched, every device dispatched, the rollout completed.
    first_dispatched_seconds: Option<f64>,
    dispatchable_dispatched_seconds: Option<f64>,
    all_dispatched_seconds: Option<f64>,
    completed_seconds: Option<f64>,
    /// From the control plane's log: `Rollout started.` to the end of the
    /// first `Devices dispatched.` batch, and to the last.
    engine_first_batch_seconds: Option<f64>,
    engine_last_batch_seconds: Option<f64>,
    engine_batches: Vec<Batch>,
    control_plane_cpu_cores_before: f64,
    /// From sending StartRollout until `dispatchable_at_once` were
    /// dispatched, and until every device was.
    control_plane_cpu_cores_first_pass: Option<f64>,
    control_plane_cpu_cores_until_all_dispatched: Option<f64>,
    heartbeats_before: Latency,
    heartbeats_during_first_pass: Option<Latency>,
    heartbeats_until_all_dispatched: Option<Latency>,
    heartbeats_after: Latency,
    /// Heartbeat responses naming pos-app at the release, during the phase.
    heartbeats_told_release: usize,
    devices_told_release: usize,
    /// Devices spread over the fleet, one more heartbeat each after the
    /// phase: how many were told to have the release.
    sample_checked: usize,
    sample_told_release: usize,
    final_state: String,
    final_counts: BTreeMap<String, u64>,
    timeline: Vec<Poll>,
}

async fn rollout_phase(
    args: &Args,
    cp: &ControlPlane,
    dir: &std::path::Path,
    sim: &Arc<Sim>,
    bearer: &MetadataValue<Ascii>,
    phases: &mut Vec<Phase>,
) -> anyhow::Result<RolloutFigures> {
    let with_bearer = |message| with_bearer(bearer, message);
    let rollout_request = |id: &str| {
        self::with_bearer(
            bearer,
            v1::RolloutRequest {
                id: id.to_string(),
                reason: String::new(),
            },
        )
    };
    let keys = dir.join("keys");
    cp.init_repository(&keys);
    let source = pos_app_source(&dir.join(format!("pos-app-{RELEASE}")), RELEASE, true, 0);
    cp.publish(&source, &keys);
    eprintln!("  published pos-app {RELEASE}");
    let mut admin = AdminServiceClient::new(sim.channels[0].clone());
    let started = Instant::now();
    let created = admin
        .create_rollout(with_bearer(v1::CreateRolloutRequest {
            bundle_name: "pos-app".into(),
            analysis_policy: String::new(),
            bundle_version: RELEASE.into(),
            selector: Some(v1::RolloutSelector::default()),
            strategy: Some(v1::RolloutStrategy {
                waves: vec![v1::WaveSpec {
                    size: Some(v1::wave_spec::Size::Percent(100.0)),
                }],
                wave_unit: v1::WaveUnit::Devices as i32,
                max_failures_percent: 10.0,
                max_unavailable_per_store: args.max_unavailable_per_store,
                ..Default::default()
            }),
        }))
        .await?
        .into_inner();
    let create_rollout_seconds = started.elapsed().as_secs_f64();
    let id = created.id.clone();
    eprintln!("  rollout {id} created in {create_rollout_seconds:.2}s");

    let per_store = args.devices_per_store as u64;
    let full_stores = args.devices as u64 / per_store;
    let rest = args.devices as u64 % per_store;
    let cap = |n: u64| match n {
        0 => 0,
        1 => 1,
        n => (args.max_unavailable_per_store.max(1) as u64).min(n - 1),
    };
    let dispatchable_at_once = full_stores * cap(per_store) + cap(rest);

    let phase = Meter::start(cp.process.child.id());
    let pid = cp.process.child.id();
    let heartbeats = tokio::spawn(open_loop_timed(
        sim.clone(),
        args.rate,
        args.rollout_seconds,
        0,
    ));
    let phase_start = Instant::now();
    tokio::time::sleep(ROLLOUT_DELAY).await;
    let cpu_before = cpu_seconds(pid).unwrap_or(0.0);
    let control_plane_cpu_cores_before =
        (cpu_before - phase.cp_cpu) / phase_start.elapsed().as_secs_f64();

    let t0 = Instant::now();
    admin.start_rollout(rollout_request(&id)).await?;
    let start_rollout_call_seconds = t0.elapsed().as_secs_f64();
    eprintln!("  StartRollout returned after {start_rollout_call_seconds:.2}s");

    let mut first = None;
    let mut dispatchable = None;
    let mut all = None;
    let mut completed = None;
    let mut timeline = Vec::new();
    let mut devices_in_rollout;
    let mut final_state;
    let mut final_counts;
    let mut last = (t0, cpu_before);
    let phase_end = phase_start + Duration::from_secs(args.rollout_seconds);
    loop {
        let detail = admin.get_rollout(rollout_request(&id)).await?.into_inner();
        let now = Instant::now();
        let cpu = cpu_seconds(pid).unwrap_or(0.0);
        let rollout = detail.rollout.unwrap_or_default();
        let c = rollout.counts.unwrap_or_default();
        let total = c.pending
            + c.notified
            + c.downloading
            + c.installing
            + c.succeeded
            + c.failed
            + c.rolled_back
            + c.timed_out;
        devices_in_rollout = total;
        let dispatched = total - c.pending;
        let at = (now - t0).as_secs_f64();
        timeline.push(Poll {
            seconds: at,
            dispatched,
            succeeded: c.succeeded,
            control_plane_cpu_cores: (cpu - last.1) / (now - last.0).as_secs_f64().max(1e-3),
        });
        last = (now, cpu);
        let mark = |slot: &mut Option<(f64, f64, Instant)>, label: &str| {
            if slot.is_none() {
                eprintln!(
                    "  {label} after {at:.2}s ({dispatched} dispatched, {} succeeded)",
                    c.succeeded
                );
                *slot = Some((at, cpu, now));
            }
        };
        if dispatched > 0 {
            mark(&mut first, "first device dispatched");
        }
        if dispatched >= dispatchable_at_once.min(total) && total > 0 {
            mark(&mut dispatchable, "all dispatchable at once dispatched");
        }
        if total > 0 && dispatched == total {
            mark(&mut all, "every device dispatched");
        }
        final_state = format!("{:?}", rollout.state());
        final_counts = [
            ("pending", c.pending),
            ("notified", c.notified),
            ("downloading", c.downloading),
            ("installing", c.installing),
            ("succeeded", c.succeeded),
            ("failed", c.failed),
            ("rolled_back", c.rolled_back),
            ("timed_out", c.timed_out),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if rollout.state() == v1::RolloutState::Completed {
            mark(&mut completed, "rollout completed");
        }
        if completed.is_some() || now >= phase_end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let results = heartbeats.await?;
    let told_during_phase = sim.told_release.load(Ordering::Relaxed);
    let devices_told_release = sim
        .devices
        .iter()
        .filter(|d| d.upgraded.load(Ordering::Relaxed))
        .count();
    let window = |from: Instant, to: Option<Instant>| {
        let picked: Vec<_> = results
            .iter()
            .filter(|(_, _, due)| *due >= from && to.is_none_or(|to| *due < to))
            .collect();
        latency(&picked)
    };
    let heartbeats_before = window(phase_start, Some(t0));
    let heartbeats_during_first_pass = dispatchable.map(|(_, _, at)| window(t0, Some(at)));
    let heartbeats_until_all_dispatched = all.map(|(_, _, at)| window(t0, Some(at)));
    let heartbeats_after = window(all.map_or(t0, |(_, _, at)| at), None);
    let cores = |mark: Option<(f64, f64, Instant)>| {
        mark.map(|(at, cpu, _)| (cpu - cpu_before) / at.max(1e-3))
    };
    phases.push(phase.finish(
        &format!("{} heartbeats/s during the rollout", args.rate),
        "open loop",
        Some(args.rate),
        results.into_iter().map(|(r, l, _)| (r, l)).collect(),
    ));
    print_phase(phases.last().expect("pushed"));

    // The engine's own account, from its log.
    let mut rollout_started = None;
    let mut engine_batches = Vec::new();
    for line in cp.process.lines() {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let at = value["timestamp"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        let (Some(at), Some(message)) = (at, value["message"].as_str()) else {
            continue;
        };
        match message {
            "Rollout started." if value["rollout_id"] == id.as_str() => {
                rollout_started = Some(at);
            }
            "Devices dispatched." if value["rollout_id"] == id.as_str() => {
                if let Some(start) = rollout_started {
                    engine_batches.push(Batch {
                        seconds: (at - start).as_seconds_f64(),
                        devices: value["devices"].as_u64().unwrap_or(0),
                        read_ms: value["read_ms"].as_u64().unwrap_or(0),
                        total_ms: value["total_ms"].as_u64().unwrap_or(0),
                    });
                }
            }
            _ => {}
        }
    }
    eprintln!("  engine batches (s after Rollout started., devices): {engine_batches:?}");

    // A sample spread over the fleet: one more heartbeat each.
    let sample_checked = 100.min(sim.devices.len());
    let mut sample_told_release = 0;
    for k in 0..sample_checked {
        let i = k * sim.devices.len() / sample_checked + k % args.devices_per_store.max(1);
        if sim.heartbeat_desired(i).await.ok().flatten().as_deref() == Some(RELEASE) {
            sample_told_release += 1;
        }
    }
    eprintln!(
        "  sample: {sample_told_release} of {sample_checked} devices told to have pos-app {RELEASE}; {devices_told_release} devices told during the phase"
    );

    Ok(RolloutFigures {
        release: RELEASE.into(),
        devices_in_rollout,
        max_unavailable_per_store: args.max_unavailable_per_store,
        dispatchable_at_once,
        create_rollout_seconds,
        start_rollout_call_seconds,
        first_dispatched_seconds: first.map(|m| m.0),
        dispatchable_dispatched_seconds: dispatchable.map(|m| m.0),
        all_dispatched_seconds: all.map(|m| m.0),
        completed_seconds: completed.map(|m| m.0),
        engine_first_batch_seconds: engine_batches.first().map(|b| b.seconds),
        engine_last_batch_seconds: engine_batches.last().map(|b| b.seconds),
        engine_batches,
        control_plane_cpu_cores_before,
        control_plane_cpu_cores_first_pass: cores(dispatchable),
        control_plane_cpu_cores_until_all_dispatched: cores(all),
        heartbeats_before,
        heartbeats_during_first_pass,
        heartbeats_until_all_dispatched,
        heartbeats_after,
        heartbeats_told_release: told_during_phase,
        devices_told_release,
        sample_checked,
        sample_told_release,
        final_state,
        final_counts,
        timeline,
    })
}

/// The commit this binary measures, as `git describe` names it.
/// A channel whose connection leaves from `source` (another loopback
/// address), so the control plane sees a second peer.
async fn channel_from(url: &str, source: IpAddr) -> anyhow::Result<Channel> {
    let connector = tower::service_fn(move |uri: tonic::transport::Uri| async move {
        let target = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or_else(|| std::io::Error::other("the URL names no address"))?;
        let target: SocketAddr = target.parse().map_err(std::io::Error::other)?;
        let socket = match source {
            IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(target).await?;
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
    });
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_with_connector(connector)
        .await?)
}

/// One phase of the flood comparison.
#[derive(Debug, Serialize)]
struct FloodPhase {
    flooded: bool,
    heartbeats: Latency,
    /// Heartbeat batches the control plane gave up writing in the phase.
    dropped_batches: u64,
    control_plane_cpu_cores: f64,
    /// The flood's Enroll calls, and their answers by code.
    enroll_calls: usize,
    enroll_calls_per_second: f64,
    enroll_answers: BTreeMap<String, usize>,
}

#[derive(Debug, Serialize)]
struct FloodFigures {
    rate: u32,
    phase_seconds: u64,
    flood_concurrency: usize,
    flood_source: IpAddr,
    phases: Vec<FloodPhase>,
    /// Per round: flooded heartbeat p99 over the quiet one before it.
    p99_ratios: Vec<f64>,
    median_p99_ratio: f64,
    median_quiet_p99_ms: f64,
    median_flooded_p99_ms: f64,
    dropped_batches: u64,
    heartbeat_errors: usize,
}

/// A validly signed Enroll call with a token nobody issued.
fn bogus_enroll() -> v1::EnrollRequest {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let token = format!("pfe_{}", hex::encode(rand::random::<[u8; 16]>()));
    enroll_request(&key, token, "FLOOD".into(), Vec::new())
}

/// Heartbeats at `--rate`, quiet and flooded in turn.
async fn flood_comparison(
    args: &Args,
    cp: &ControlPlane,
    url: &str,
    sim: &Arc<Sim>,
) -> anyhow::Result<FloodFigures> {
    let pid = cp.process.child.id();
    let flood_channel = channel_from(url, args.flood_source).await?;
    let mut phases = Vec::new();
    let mut offset = 0;
    for round in 0..args.flood_rounds {
        for flooded in [false, true] {
            let dropped_before = cp.metric("posfleet_heartbeat_batches_dropped_total");
            let stop = Arc::new(AtomicBool::new(false));
            let mut flood = tokio::task::JoinSet::new();
            if flooded {
                for _ in 0..args.flood_concurrency {
                    let stop = stop.clone();
                    let mut client = AgentServiceClient::new(flood_channel.clone());
                    flood.spawn(async move {
                        let mut answers: BTreeMap<String, usize> = BTreeMap::new();
                        while !stop.load(Ordering::Relaxed) {
                            let code = match client.enroll(bogus_enroll()).await {
                                Ok(_) => Code::Ok,
                                Err(status) => status.code(),
                            };
                            *answers.entry(format!("{code:?}")).or_default() += 1;
                        }
                        answers
                    });
                }
            }
            let meter = Meter::start(pid);
            let results = open_loop_timed(sim.clone(), args.rate, args.phase_seconds, offset).await;
            offset += results.len();
            let seconds = meter.started.elapsed().as_secs_f64();
            let cp_cores = (cpu_seconds(pid).unwrap_or(0.0) - meter.cp_cpu) / seconds;
            stop.store(true, Ordering::Relaxed);
            let mut enroll_answers: BTreeMap<String, usize> = BTreeMap::new();
            while let Some(worker) = flood.join_next().await {
                for (code, n) in worker? {
                    *enroll_answers.entry(code).or_default() += n;
                }
            }
            let enroll_calls = enroll_answers.values().sum();
            let all: Vec<_> = results.iter().collect();
            let phase = FloodPhase {
                flooded,
                heartbeats: latency(&all),
                dropped_batches: (cp.metric("posfleet_heartbeat_batches_dropped_total")
                    - dropped_before)
                    .max(0.0) as u64,
                control_plane_cpu_cores: cp_cores,
                enroll_calls,
                enroll_calls_per_second: enroll_calls as f64 / seconds,
                enroll_answers,
            };
            eprintln!(
                "  round {round} {:<8} heartbeats p50 {:>6.2} ms  p99 {:>7.2} ms  max {:>7.1} ms  errors {}  dropped batches {}  control plane {:.2} cores  flood {:.0} Enroll/s {:?}",
                if flooded { "flooded" } else { "quiet" },
                phase.heartbeats.p50_ms,
                phase.heartbeats.p99_ms,
                phase.heartbeats.max_ms,
                phase.heartbeats.errors,
                phase.dropped_batches,
                phase.control_plane_cpu_cores,
                phase.enroll_calls_per_second,
                phase.enroll_answers,
            );
            phases.push(phase);
        }
    }
    let p99 = |flooded: bool| -> Vec<f64> {
        phases
            .iter()
            .filter(|p| p.flooded == flooded)
            .map(|p| p.heartbeats.p99_ms)
            .collect()
    };
    let p99_ratios: Vec<f64> = p99(false)
        .iter()
        .zip(p99(true))
        .map(|(quiet, flooded)| flooded / quiet.max(1e-3))
        .collect();
    let figures = FloodFigures {
        rate: args.rate,
        phase_seconds: args.phase_seconds,
        flood_concurrency: args.flood_concurrency,
        flood_source: args.flood_source,
        median_p99_ratio: median(p99_ratios.clone()),
        p99_ratios,
        median_quiet_p99_ms: median(p99(false)),
        median_flooded_p99_ms: median(p99(true)),
        dropped_batches: phases.iter().map(|p| p.dropped_batches).sum(),
        heartbeat_errors: phases.iter().map(|p| p.heartbeats.errors).sum(),
        phases,
    };
    eprintln!(
        "  Enroll flood: heartbeat p99 {:.2} ms quiet, {:.2} ms flooded (median ratio {:.2}), {} dropped batches, {} heartbeat errors",
        figures.median_quiet_p99_ms,
        figures.median_flooded_p99_ms,
        figures.median_p99_ratio,
        figures.dropped_batches,
        figures.heartbeat_errors
    );
    Ok(figures)
}

/// Raises this process's limit on open files (its soft limit to the hard
/// one, and the hard one to `wanted` where allowed), so that one socket per
/// simulated till fits; the control plane started from here inherits it.
/// Returns the limit in force.
fn raise_open_files_limit(wanted: u64) -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if hard < wanted && setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_ok() {
        return Ok(wanted);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    if hard < wanted {
        eprintln!("fleet-sim: at most {hard} open files (wanted {wanted}); connections may fail");
    }
    Ok(hard)
}

#[path = "fleet-sim/replicas.rs"]
mod replicas;

/// `--tls`: every simulated till on a connection of its own, as real tills
/// are, over plaintext and over mutual TLS side by side.
///
/// For each transport, a fresh control plane: the fleet enrolls, each till
/// over a new connection of its own (over TLS: server-authenticated, with a
/// certificate request for its own Ed25519 key; the answer's certificate
/// becomes its identity). The control plane is restarted with nothing
/// connected, its idle RSS read, and every till opens its connection (one
/// heartbeat each, `--concurrency` at a time); the RSS again gives the
/// memory an open connection costs. `steady`: heartbeats at `--rate` for
/// `--phase-seconds` over those connections, open loop. `storm`: the
/// control plane is stopped (SIGTERM) and started again on the same data
/// dir and addresses, and the moment it listens every till heartbeats at
/// once, retrying on failure as the agent does (waits doubling from 1 s to
/// `--max-backoff-seconds`, drawn from the upper half), until each has
/// succeeded once or `--storm-deadline-seconds` have passed (it gave up).
/// Figures go to `benchmarks/fleet-sim-tls-<database>.json`.
///
///     cargo run --release -p posfleet-e2e --bin fleet-sim -- --tls --devices 20000
mod connections {
    use super::*;
    use posfleet_pki::rustls::ClientConfig;
    use posfleet_pki::rustls::pki_types::CertificateDer;

    /// The agent's own request and connect timeout.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    /// Enroll calls in flight.
    const ENROLL_CONCURRENCY: usize = 64;
    /// How long the control plane has to stop on SIGTERM.
    const STOP_GRACE: Duration = Duration::from_secs(60);

    #[derive(Serialize)]
    struct Report {
        benchmark: &'static str,
        database: Database,
        devices: usize,
        stores: usize,
        cores: usize,
        open_files_limit: u64,
        runs: Vec<Run>,
        simulator_peak_rss_bytes: u64,
        command: String,
        /// The commit measured (`git describe`).
        commit: Option<String>,
    }

    /// One transport's figures.
    #[derive(Serialize)]
    struct Run {
        transport: Transport,
        enrollment: Enrollment,
        connect: Connect,
        #[serde(skip_serializing_if = "Option::is_none")]
        steady: Option<Steady>,
        #[serde(skip_serializing_if = "Option::is_none")]
        storm: Option<Storm>,
        control_plane_peak_rss_bytes: u64,
    }

    #[derive(Serialize)]
    struct Enrollment {
        seconds: f64,
        per_second: f64,
        in_flight: usize,
        errors: BTreeMap<String, usize>,
        control_plane_cpu_cores: f64,
        simulator_cpu_cores: f64,
    }

    /// Every till opening its connection, with one heartbeat.
    #[derive(Serialize)]
    struct Connect {
        phase: Phase,
        control_plane_rss_idle_bytes: u64,
        control_plane_rss_connected_bytes: u64,
        /// (connected - idle) / tills.
        control_plane_rss_per_connection_bytes: f64,
        /// The control plane's open file descriptors once connected.
        control_plane_open_files: usize,
    }

    #[derive(Serialize)]
    struct Steady {
        phase: Phase,
        control_plane_rss_after_bytes: u64,
    }

    #[derive(Serialize)]
    struct Storm {
        /// SIGTERM until the old process exited.
        stop_seconds: f64,
        /// The new process's start until it listened.
        start_seconds: f64,
        /// From the moment it listened (every till calling at once).
        all_online_seconds: Option<f64>,
        online_p50_seconds: f64,
        online_p99_seconds: f64,
        online: usize,
        gave_up: usize,
        /// Calls that failed and were retried, by code.
        failed_calls: usize,
        failed_calls_by_code: BTreeMap<String, usize>,
        tills_that_retried: usize,
        /// Connections (over TLS, handshakes) that carried a till's
        /// successful heartbeat, per second: on average until all were
        /// online, and in the busiest second.
        connections_per_second: f64,
        connections_per_second_peak: usize,
        /// From listening until all were online (or the deadline).
        control_plane_cpu_seconds: f64,
        simulator_cpu_seconds: f64,
        control_plane_rss_after_bytes: u64,
        timeline: Vec<StormSample>,
    }

    #[derive(Serialize)]
    struct StormSample {
        seconds: f64,
        online: usize,
        control_plane_cpu_cores: f64,
    }

    pub async fn run(args: &Args, open_files_limit: u64) -> anyhow::Result<()> {
        let stores = args.devices.div_ceil(args.devices_per_store);
        eprintln!(
            "fleet-sim: {} tills in {stores} stores on {:?}, a connection each, over {:?}; open files limit {open_files_limit}",
            args.devices, args.database, args.transports
        );
        let mut runs = Vec::new();
        for &transport in &args.transports {
            eprintln!("{transport:?}:");
            runs.push(run_transport(args, transport).await?);
        }
        let report = Report {
            benchmark: "fleet-sim-connections",
            database: args.database,
            devices: args.devices,
            stores,
            cores: cores(),
            open_files_limit,
            runs,
            simulator_peak_rss_bytes: peak_rss_bytes("self").unwrap_or(0),
            command: posfleet_e2e::command_line(),
            commit: posfleet_e2e::measured_commit(),
        };
        let output = write_figures(args, "tls-", &report)?;
        eprintln!(
            "  simulator peak RSS {} MiB; figures written to {}",
            report.simulator_peak_rss_bytes >> 20,
            output.display()
        );
        for run in &report.runs {
            if let Some(storm) = &run.storm {
                anyhow::ensure!(
                    storm.gave_up == 0,
                    "{:?}: {} tills gave up reconnecting",
                    run.transport,
                    storm.gave_up
                );
            }
        }
        Ok(())
    }

    /// An endpoint set up as the agent sets up its own.
    fn till_endpoint(url: &str) -> anyhow::Result<Endpoint> {
        Ok(Endpoint::from_shared(url.to_string())?
            .connect_timeout(REQUEST_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(60))
            .keep_alive_while_idle(false))
    }

    /// A new channel (its own connection, made at the first call): over
    /// TLS with `tls`, else plaintext.
    fn channel(endpoint: &Endpoint, tls: Option<ClientConfig>) -> Channel {
        match tls {
            Some(config) => posfleet_pki::grpc_channel_with(
                endpoint,
                Some(posfleet_pki::ClientTls::new(config)),
            ),
            None => endpoint.connect_lazy(),
        }
    }

    /// What enrollment left a till with: its credential, or its certificate
    /// and the CAs to trust.
    enum Identity {
        Credential(String),
        Certificate {
            key: Box<SigningKey>,
            chain_pem: String,
            trust_pem: String,
        },
    }

    impl Identity {
        /// The till's own channel and its heartbeat identity.
        fn connect(self, endpoint: &Endpoint) -> anyhow::Result<(Channel, Device)> {
            Ok(match self {
                Identity::Credential(credential) => (
                    channel(endpoint, None),
                    Device {
                        authorization: Some(format!("Device {credential}").parse()?),
                        upgraded: AtomicBool::new(false),
                    },
                ),
                Identity::Certificate {
                    key,
                    chain_pem,
                    trust_pem,
                } => {
                    let chain =
                        posfleet_pki::certificates_from_pem(chain_pem.as_bytes(), "device.crt")?;
                    let trusted =
                        posfleet_pki::certificates_from_pem(trust_pem.as_bytes(), "trust.pem")?;
                    let config = posfleet_pki::client_config(
                        &trusted,
                        Some((chain, posfleet_pki::private_key_der(&key)?)),
                    )?;
                    (
                        channel(endpoint, Some(config)),
                        Device {
                            authorization: None,
                            upgraded: AtomicBool::new(false),
                        },
                    )
                }
            })
        }
    }

    fn rss_bytes(pid: u32) -> u64 {
        posfleet_e2e::status_kib(pid, "VmRSS:").unwrap_or(0) * 1024
    }

    fn open_files(pid: u32) -> usize {
        std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
    }

    /// Stops `cp` with SIGTERM and starts it again on its data dir and
    /// addresses; returns the new one, the seconds stopping took and the
    /// seconds starting took.
    fn restart(mut cp: ControlPlane, extra: &[&str]) -> (ControlPlane, f64, f64) {
        let t0 = Instant::now();
        cp.process.stop(STOP_GRACE);
        let stop_seconds = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let cp = ControlPlane::start(
            &cp.data_dir,
            cp.database_url.as_deref(),
            &cp.grpc_address,
            &cp.http_address,
            extra,
        );
        (cp, stop_seconds, t1.elapsed().as_secs_f64())
    }

    async fn run_transport(args: &Args, transport: Transport) -> anyhow::Result<Run> {
        let dir = tempfile::tempdir()?;
        let postgres = match args.database {
            Database::Sqlite => None,
            Database::Postgres => Some(PostgresDb::create_on(&args.postgres_url)),
        };
        let mut extra = QUIET.to_vec();
        if transport == Transport::Tls {
            extra.extend(["--tls-server-name", "127.0.0.1"]);
        }
        let cp = ControlPlane::start(
            &dir.path().join("cp"),
            postgres.as_ref().map(|p| p.url.as_str()),
            "127.0.0.1:0",
            "127.0.0.1:0",
            &extra,
        );
        let endpoint = till_endpoint(&cp.url())?;
        // Over TLS, operators and enrolling tills trust the fleet CA.
        let server_auth = if cp.tls {
            let pem = std::fs::read(cp.ca_file())?;
            let ca: Vec<CertificateDer<'static>> =
                posfleet_pki::certificates_from_pem(&pem, "the fleet CA")?;
            Some(posfleet_pki::client_config(&ca, None)?)
        } else {
            None
        };
        let admin_token = std::fs::read_to_string(cp.admin_token_file())?;
        let bearer: MetadataValue<Ascii> = format!("Bearer {}", admin_token.trim()).parse()?;
        let mut admin = AdminServiceClient::new(channel(&endpoint, server_auth.clone()));
        let stores = args.devices.div_ceil(args.devices_per_store);
        let tokens =
            Arc::new(create_stores(&mut admin, &bearer, stores, args.devices_per_store).await?);

        // Enrollment: each till over a new connection of its own.
        let per_store = args.devices_per_store;
        let identities: Arc<std::sync::Mutex<Vec<Option<Identity>>>> = Arc::new(
            std::sync::Mutex::new((0..args.devices).map(|_| None).collect()),
        );
        let sink = identities.clone();
        let enroll_endpoint = endpoint.clone();
        let meter = Meter::start(cp.process.child.id());
        let results = closed_loop(args.devices, ENROLL_CONCURRENCY, None, move |i| {
            let token = tokens[i / per_store].clone();
            let sink = sink.clone();
            let channel = channel(&enroll_endpoint, server_auth.clone());
            async move {
                let key = SigningKey::generate(&mut rand::rngs::OsRng);
                let certificate_request = match transport {
                    Transport::Tls => {
                        posfleet_pki::certificate_request(&key).map_err(|_| Code::Internal)?
                    }
                    Transport::Plaintext => Vec::new(),
                };
                let request =
                    enroll_request(&key, token, format!("SIM-{i:07}"), certificate_request);
                let answer = AgentServiceClient::new(channel)
                    .enroll(request)
                    .await
                    .map_err(|s| s.code())?
                    .into_inner();
                let identity = match transport {
                    Transport::Tls => Identity::Certificate {
                        key: Box::new(key),
                        chain_pem: answer.device_certificate_pem,
                        trust_pem: answer.trust_bundle_pem,
                    },
                    Transport::Plaintext => Identity::Credential(answer.device_credential),
                };
                sink.lock().expect("lock")[i] = Some(identity);
                Ok(())
            }
        })
        .await;
        let phase = meter.finish("enrollment", "closed loop", None, results);
        let enrollment = Enrollment {
            seconds: phase.seconds,
            per_second: phase.achieved_per_second,
            in_flight: ENROLL_CONCURRENCY,
            errors: phase.errors,
            control_plane_cpu_cores: phase.control_plane_cpu_cores,
            simulator_cpu_cores: phase.simulator_cpu_cores,
        };
        eprintln!(
            "  enrolled {} tills in {:.1}s ({:.0}/s), errors {:?}, control plane {:.2} cores",
            phase.ok,
            enrollment.seconds,
            enrollment.per_second,
            enrollment.errors,
            enrollment.control_plane_cpu_cores
        );
        anyhow::ensure!(
            enrollment.errors.is_empty(),
            "enrollments failed: {:?}",
            enrollment.errors
        );

        // A restart with nothing connected: the idle footprint.
        let (cp, _, _) = restart(cp, &extra);
        let pid = cp.process.child.id();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let control_plane_rss_idle_bytes = rss_bytes(pid);

        let identities = std::mem::take(&mut *identities.lock().expect("lock"));
        let mut channels = Vec::with_capacity(args.devices);
        let mut devices = Vec::with_capacity(args.devices);
        for identity in identities {
            let identity = identity.ok_or_else(|| anyhow::anyhow!("a till did not enroll"))?;
            let (channel, device) = identity.connect(&endpoint)?;
            channels.push(channel);
            devices.push(device);
        }
        let sim = Arc::new(Sim {
            channels,
            devices,
            told_release: AtomicUsize::new(0),
        });

        let meter = Meter::start(pid);
        let s = sim.clone();
        let results = closed_loop(args.devices, args.concurrency, None, move |i| {
            let s = s.clone();
            async move { s.heartbeat(i).await }
        })
        .await;
        let phase = meter.finish(
            "every till connects and heartbeats once",
            "closed loop",
            None,
            results,
        );
        print_phase(&phase);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let control_plane_rss_connected_bytes = rss_bytes(pid);
        let connect = Connect {
            control_plane_rss_idle_bytes,
            control_plane_rss_connected_bytes,
            control_plane_rss_per_connection_bytes: (control_plane_rss_connected_bytes as f64
                - control_plane_rss_idle_bytes as f64)
                / args.devices as f64,
            control_plane_open_files: open_files(pid),
            phase,
        };
        eprintln!(
            "  control plane RSS {} MiB idle, {} MiB with {} connections ({:.1} KiB each); {} open files",
            control_plane_rss_idle_bytes >> 20,
            control_plane_rss_connected_bytes >> 20,
            args.devices,
            connect.control_plane_rss_per_connection_bytes / 1024.0,
            connect.control_plane_open_files
        );

        let steady = if args.scenario.contains(&Scenario::Steady) {
            let meter = Meter::start(pid);
            let results = open_loop(sim.clone(), args.rate, args.phase_seconds, 0).await;
            let phase = meter.finish(
                &format!("fixed rate {} heartbeats/s", args.rate),
                "open loop",
                Some(args.rate),
                results,
            );
            print_phase(&phase);
            Some(Steady {
                phase,
                control_plane_rss_after_bytes: rss_bytes(pid),
            })
        } else {
            None
        };

        let (cp, storm) = if args.scenario.contains(&Scenario::Storm) {
            let (cp, storm) = storm(args, cp, &extra, &sim).await;
            (cp, Some(storm))
        } else {
            (cp, None)
        };
        let control_plane_peak_rss_bytes = peak_rss_bytes(cp.process.child.id()).unwrap_or(0);
        drop(sim);
        drop(cp);
        Ok(Run {
            transport,
            enrollment,
            connect,
            steady,
            storm,
            control_plane_peak_rss_bytes,
        })
    }

    /// A till's retries after the restart: until its first successful
    /// heartbeat, or the deadline.
    struct Reconnect {
        online_after: Option<Duration>,
        failures: Vec<Code>,
    }

    /// The agent's wait before retry `failures + 1`: doubling from 1 s up
    /// to `max`, drawn from the upper half.
    fn backoff(failures: usize, max: Duration) -> Duration {
        let ceiling = Duration::from_secs(1 << failures.min(20)).min(max);
        ceiling.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    async fn storm(
        args: &Args,
        cp: ControlPlane,
        extra: &[&str],
        sim: &Arc<Sim>,
    ) -> (ControlPlane, Storm) {
        let (cp, stop_seconds, start_seconds) = restart(cp, extra);
        let pid = cp.process.child.id();
        let started = Instant::now();
        let cp_cpu = cpu_seconds(pid).unwrap_or(0.0);
        let sim_cpu = cpu_seconds(std::process::id()).unwrap_or(0.0);
        let deadline = started + Duration::from_secs(args.storm_deadline_seconds);
        let max_backoff = Duration::from_secs(args.max_backoff_seconds);
        let online = Arc::new(AtomicUsize::new(0));
        let mut tills = tokio::task::JoinSet::new();
        for i in 0..sim.devices.len() {
            let sim = sim.clone();
            let online = online.clone();
            tills.spawn(async move {
                let mut failures = Vec::new();
                loop {
                    match sim.heartbeat(i).await {
                        Ok(()) => {
                            online.fetch_add(1, Ordering::Relaxed);
                            return Reconnect {
                                online_after: Some(started.elapsed()),
                                failures,
                            };
                        }
                        Err(code) => failures.push(code),
                    }
                    let wait = backoff(failures.len() - 1, max_backoff);
                    if Instant::now() + wait >= deadline {
                        return Reconnect {
                            online_after: None,
                            failures,
                        };
                    }
                    tokio::time::sleep(wait).await;
                }
            });
        }
        // One sample a second while the tills reconnect.
        let total = sim.devices.len();
        let sampler = {
            let online = online.clone();
            tokio::spawn(async move {
                let mut timeline = Vec::new();
                let mut last = (started, cp_cpu);
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let now = Instant::now();
                    let cpu = cpu_seconds(pid).unwrap_or(last.1);
                    let count = online.load(Ordering::Relaxed);
                    timeline.push(StormSample {
                        seconds: (now - started).as_secs_f64(),
                        online: count,
                        control_plane_cpu_cores: (cpu - last.1)
                            / (now - last.0).as_secs_f64().max(1e-3),
                    });
                    last = (now, cpu);
                    if count == total || now >= deadline {
                        return timeline;
                    }
                }
            })
        };
        let mut reconnects = Vec::with_capacity(total);
        while let Some(till) = tills.join_next().await {
            reconnects.push(till.expect("till task"));
        }
        let ended = Instant::now();
        let control_plane_cpu_seconds = cpu_seconds(pid).unwrap_or(cp_cpu) - cp_cpu;
        let simulator_cpu_seconds = cpu_seconds(std::process::id()).unwrap_or(sim_cpu) - sim_cpu;
        let timeline = sampler.await.expect("sampler task");

        let mut times: Vec<f64> = reconnects
            .iter()
            .filter_map(|r| r.online_after.map(|d| d.as_secs_f64()))
            .collect();
        times.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            times
                .get(((times.len() as f64 * p) as usize).min(times.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        };
        let mut per_second: BTreeMap<u64, usize> = BTreeMap::new();
        for t in &times {
            *per_second.entry(*t as u64).or_default() += 1;
        }
        let mut failed_calls_by_code: BTreeMap<String, usize> = BTreeMap::new();
        for code in reconnects.iter().flat_map(|r| &r.failures) {
            *failed_calls_by_code.entry(format!("{code:?}")).or_default() += 1;
        }
        let gave_up = reconnects
            .iter()
            .filter(|r| r.online_after.is_none())
            .count();
        let all_online_seconds = (gave_up == 0).then(|| pct(1.0));
        let storm = Storm {
            stop_seconds,
            start_seconds,
            all_online_seconds,
            online_p50_seconds: pct(0.5),
            online_p99_seconds: pct(0.99),
            online: times.len(),
            gave_up,
            failed_calls: failed_calls_by_code.values().sum(),
            failed_calls_by_code,
            tills_that_retried: reconnects.iter().filter(|r| !r.failures.is_empty()).count(),
            connections_per_second: times.len() as f64
                / all_online_seconds
                    .unwrap_or_else(|| (ended - started).as_secs_f64())
                    .max(1e-3),
            connections_per_second_peak: per_second.values().copied().max().unwrap_or(0),
            control_plane_cpu_seconds,
            simulator_cpu_seconds,
            control_plane_rss_after_bytes: rss_bytes(pid),
            timeline,
        };
        eprintln!(
            "  storm: stopped in {:.1}s, listening after {:.1}s; {} of {total} online after {} (p50 {:.1}s, p99 {:.1}s), {} gave up; {} failed calls {:?} from {} tills; {:.0} connections/s (peak {}/s); control plane {:.1} CPU s, simulator {:.1} CPU s",
            storm.stop_seconds,
            storm.start_seconds,
            storm.online,
            storm
                .all_online_seconds
                .map_or("—".to_string(), |s| format!("{s:.1}s")),
            storm.online_p50_seconds,
            storm.online_p99_seconds,
            storm.gave_up,
            storm.failed_calls,
            storm.failed_calls_by_code,
            storm.tills_that_retried,
            storm.connections_per_second,
            storm.connections_per_second_peak,
            storm.control_plane_cpu_seconds,
            storm.simulator_cpu_seconds,
        );
        (cp, storm)
    }
}
