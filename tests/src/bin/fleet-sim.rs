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

use clap::{Parser, ValueEnum};
use ed25519_dalek::{Signer, SigningKey};
use posfleet_e2e::{ControlPlane, PostgresDb};
use posfleet_proto::v1;
use posfleet_proto::v1::admin_service_client::AdminServiceClient;
use posfleet_proto::v1::agent_service_client::AgentServiceClient;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
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
    /// Default: benchmarks/fleet-sim-<database>.json
    #[arg(long)]
    output: Option<PathBuf>,
}

struct Device {
    authorization: MetadataValue<Ascii>,
}

struct Sim {
    channels: Vec<Channel>,
    devices: Vec<Device>,
}

impl Sim {
    async fn heartbeat(&self, i: usize) -> Result<(), Code> {
        let device = &self.devices[i % self.devices.len()];
        let mut request = Request::new(v1::HeartbeatRequest {
            agent_version: "0.1.0".into(),
            installed_bundles: [
                ("pos-app".to_string(), "1.0.0".to_string()),
                ("catalog-store".to_string(), "2026.11.21".to_string()),
            ]
            .into(),
            agent_uptime_seconds: 3600,
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
        request
            .metadata_mut()
            .insert(posfleet_proto::AUTHORIZATION, device.authorization.clone());
        let mut client = AgentServiceClient::new(self.channels[i % self.channels.len()].clone());
        client
            .heartbeat(request)
            .await
            .map(|_| ())
            .map_err(|s| s.code())
    }
}

/// CPU seconds used so far by a process (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    // /proc reports clock ticks of USER_HZ, which Linux fixes at 100 for
    // user space whatever the kernel's internal rate.
    ticks / 100.0
}

fn peak_rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
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
            cp_cpu: cpu_seconds(pid),
            sim_cpu: cpu_seconds(std::process::id()),
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
            control_plane_cpu_cores: (cpu_seconds(self.pid) - self.cp_cpu) / seconds,
            simulator_cpu_cores: (cpu_seconds(std::process::id()) - self.sim_cpu) / seconds,
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

/// `rate` requests per second for `seconds`, each timed from when it was due.
async fn open_loop(
    sim: Arc<Sim>,
    rate: u32,
    seconds: u64,
    offset: usize,
) -> Vec<(Result<(), Code>, Duration)> {
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
            (result, due.elapsed())
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

async fn writer_figures(http_address: &str) -> anyhow::Result<WriterFigures> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(http_address).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
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
    devices_online_after: usize,
    command: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let postgres = match args.database {
        Database::Sqlite => None,
        Database::Postgres => Some(PostgresDb::create_on(&args.postgres_url)),
    };
    let quiet = [
        "--log-level",
        "info,posfleet_control_plane::agent_api=warn",
        "--heartbeat-interval-seconds",
        "300",
    ];
    let cp = ControlPlane::start(
        &dir.path().join("cp"),
        postgres.as_ref().map(|p| p.url.as_str()),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &quiet,
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
    fn with_bearer<T>(bearer: &MetadataValue<Ascii>, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert(posfleet_proto::AUTHORIZATION, bearer.clone());
        request
    }
    let mut admin_client = AdminServiceClient::new(channels[0].clone());

    // Stores and one token per store.
    let stores = args.devices.div_ceil(args.devices_per_store);
    eprintln!(
        "fleet-sim: {} devices in {stores} stores on {:?}",
        args.devices, args.database
    );
    let mut tokens = Vec::with_capacity(stores);
    for s in 0..stores {
        let id = format!("store-{s:05}");
        admin_client
            .create_store(with_bearer(
                &bearer,
                v1::CreateStoreRequest {
                    id: id.clone(),
                    name: format!("Store {s}"),
                    time_zone: "Europe/Paris".into(),
                },
            ))
            .await?;
        let token = admin_client
            .create_enrollment_token(with_bearer(
                &bearer,
                v1::CreateEnrollmentTokenRequest {
                    store_id: id,
                    expires_in_seconds: 3600,
                    uses: args.devices_per_store as u32,
                },
            ))
            .await?
            .into_inner()
            .secret;
        tokens.push(token);
    }

    // Enrollment: every device its own key, proof of possession, credential.
    let enroll_channels = channels.clone();
    let tokens = Arc::new(tokens);
    let per_store = args.devices_per_store;
    let credentials = Arc::new(std::sync::Mutex::new(vec![String::new(); args.devices]));
    let sink = credentials.clone();
    let started = Instant::now();
    let results = closed_loop(args.devices, 64, None, move |i| {
        let channel = enroll_channels[i % enroll_channels.len()].clone();
        let token = tokens[i / per_store].clone();
        let sink = sink.clone();
        async move {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let public_key = key.verifying_key().to_bytes().to_vec();
            let serial = format!("SIM-{i:07}");
            let payload =
                posfleet_proto::enroll_signing_payload(&token, &public_key, "sim-pos", &serial);
            let response = AgentServiceClient::new(channel)
                .enroll(v1::EnrollRequest {
                    enrollment_token: token,
                    signature: key.sign(&payload).to_bytes().to_vec(),
                    public_key,
                    hardware_model: "sim-pos".into(),
                    serial_number: serial,
                    agent_version: "0.1.0".into(),
                })
                .await
                .map_err(|s| s.code())?;
            sink.lock().expect("lock")[i] = response.into_inner().device_credential;
            Ok(())
        }
    })
    .await;
    let enrollment_seconds = started.elapsed().as_secs_f64();
    let failed = results.iter().filter(|(r, _)| r.is_err()).count();
    anyhow::ensure!(failed == 0, "{failed} enrollments failed");
    eprintln!(
        "  enrolled {} devices in {enrollment_seconds:.1}s ({:.0}/s)",
        args.devices,
        args.devices as f64 / enrollment_seconds
    );
    let devices = credentials
        .lock()
        .expect("lock")
        .iter()
        .map(|c| {
            Ok(Device {
                authorization: format!("Device {c}").parse()?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sim = Arc::new(Sim {
        channels: channels.clone(),
        devices,
    });

    let mut phases = Vec::new();
    let meter = Meter::start(pid);
    let s = sim.clone();
    let results = closed_loop(args.devices, args.concurrency, None, move |i| {
        let s = s.clone();
        async move { s.heartbeat(i).await }
    })
    .await;
    phases.push(meter.finish(
        "first heartbeat of every device (cold cache)",
        "closed loop",
        None,
        results,
    ));
    print_phase(phases.last().expect("pushed"));

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
    let s = sim.clone();
    let deadline = Instant::now() + Duration::from_secs(args.phase_seconds);
    let results = closed_loop(usize::MAX, args.concurrency, Some(deadline), move |i| {
        let s = s.clone();
        async move { s.heartbeat(i).await }
    })
    .await;
    phases.push(meter.finish("max throughput", "closed loop", None, results));
    print_phase(phases.last().expect("pushed"));
    let control_plane_peak_rss_bytes = peak_rss_bytes(pid);
    let heartbeat_writer = writer_figures(&cp.http_address).await?;
    eprintln!("  heartbeat writer: {heartbeat_writer:?}");

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
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        connections: args.connections,
        enrollment_seconds,
        enrollments_per_second: args.devices as f64 / enrollment_seconds,
        phases,
        control_plane_peak_rss_bytes,
        heartbeat_writer,
        devices_online_after: online,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let output = args.output.unwrap_or_else(|| {
        PathBuf::from(format!(
            "benchmarks/fleet-sim-{}.json",
            match args.database {
                Database::Sqlite => "sqlite",
                Database::Postgres => "postgres",
            }
        ))
    });
    if let Some(parent) = output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&output, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("  figures written to {}", output.display());
    anyhow::ensure!(
        online == args.devices,
        "only {online} of {} devices online after the run",
        args.devices
    );
    Ok(())
}
