//! `--replicas N`: N control-plane replicas on one PostgreSQL database
//! (plaintext, each with a data dir of its own), and HAProxy in TCP mode
//! with one frontend per count: the first replica alone, the first two, …
//! all N. The fleet enrolls through all of them; then, for each count in
//! turn, the simulated tills connect through that frontend
//! (`--connections` HTTP/2 connections, spread round robin: give a multiple
//! of 6 for 1 to 3 replicas), every device heartbeats once (so each
//! replica's credential cache is warm), and two phases are measured:
//! max throughput (closed loop, `--concurrency` in flight) and a fixed
//! rate (`--rate`, open loop), each `--phase-seconds` long. Besides
//! heartbeats/s and latency, the CPU each part used: the replicas, HAProxy,
//! the PostgreSQL backends serving its database and the simulator, in
//! cores. Figures go to
//! `benchmarks/fleet-sim-replicas-postgres.json`.

use super::*;
use posfleet_e2e::replicas::{Frontend, LoadBalancer, Replicas};

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    devices: usize,
    stores: usize,
    cores: usize,
    connections: usize,
    concurrency: usize,
    enrollment_seconds: f64,
    /// The machine's 1-minute load average before and after the phases
    /// (the machine is shared).
    load_average: [f64; 2],
    runs: Vec<Run>,
    /// Max-throughput heartbeats/s with N replicas over those with one.
    scaling: Vec<f64>,
    command: String,
    commit: Option<String>,
}

/// One count of replicas.
#[derive(Serialize)]
struct Run {
    replicas: usize,
    max_throughput: Measured,
    fixed_rate: Measured,
}

#[derive(Serialize)]
struct Measured {
    #[serde(flatten)]
    phase: Phase,
    cpu: Cpu,
}

/// Cores used during a phase, by part.
#[derive(Debug, Serialize)]
struct Cpu {
    per_replica_cores: Vec<f64>,
    replicas_cores: f64,
    haproxy_cores: f64,
    postgres_cores: f64,
    simulator_cores: f64,
}

/// The processes whose CPU a phase counts.
struct Parts {
    replicas: Vec<u32>,
    haproxy: u32,
    /// The benchmark's database, whose backends are counted.
    database: String,
}

/// CPU seconds of each PostgreSQL backend serving `database` (its
/// process title names it), by pid.
fn postgres_cpu_seconds(database: &str) -> BTreeMap<u32, f64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|title| {
                let title = String::from_utf8_lossy(&title);
                title.starts_with("postgres:") && title.contains(database)
            })
        })
        .filter_map(|pid| Some((pid, cpu_seconds(pid)?)))
        .collect()
}

/// The 1-minute load average, from `/proc/loadavg`.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// HAProxy's CPU: the master and its worker (its child).
fn haproxy_cpu_seconds(master: u32) -> f64 {
    let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
        .unwrap_or_default();
    std::iter::once(master)
        .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
        .filter_map(cpu_seconds)
        .sum()
}

struct CpuMeter {
    started: Instant,
    replicas: Vec<f64>,
    haproxy: f64,
    postgres: BTreeMap<u32, f64>,
    simulator: f64,
}

impl CpuMeter {
    fn start(parts: &Parts) -> CpuMeter {
        CpuMeter {
            started: Instant::now(),
            replicas: parts
                .replicas
                .iter()
                .map(|&p| cpu_seconds(p).unwrap_or(0.0))
                .collect(),
            haproxy: haproxy_cpu_seconds(parts.haproxy),
            postgres: postgres_cpu_seconds(&parts.database),
            simulator: cpu_seconds(std::process::id()).unwrap_or(0.0),
        }
    }

    fn finish(self, parts: &Parts) -> Cpu {
        let seconds = self.started.elapsed().as_secs_f64();
        let per_replica_cores: Vec<f64> = parts
            .replicas
            .iter()
            .zip(&self.replicas)
            .map(|(&p, before)| (cpu_seconds(p).unwrap_or(0.0) - before) / seconds)
            .collect();
        Cpu {
            replicas_cores: per_replica_cores.iter().sum(),
            per_replica_cores,
            haproxy_cores: (haproxy_cpu_seconds(parts.haproxy) - self.haproxy) / seconds,
            // A backend that started during the phase counts from zero.
            postgres_cores: postgres_cpu_seconds(&parts.database)
                .iter()
                .map(|(pid, now)| now - self.postgres.get(pid).unwrap_or(&0.0))
                .sum::<f64>()
                / seconds,
            simulator_cores: (cpu_seconds(std::process::id()).unwrap_or(0.0) - self.simulator)
                / seconds,
        }
    }
}

fn print_run(replicas: usize, measured: &Measured) {
    print_phase(&measured.phase);
    eprintln!("    {replicas} replica(s): {:.2?}", measured.cpu);
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        matches!(args.database, Database::Postgres),
        "--replicas needs --database postgres: replicas share one PostgreSQL database"
    );
    let dir = tempfile::tempdir()?;
    let postgres = PostgresDb::create_on(&args.postgres_url);
    let count = args.replicas;
    eprintln!("fleet-sim: {count} replicas on one PostgreSQL behind HAProxy");
    let cluster = tokio::task::block_in_place(|| {
        Replicas::start(dir.path(), &postgres.url, count, false, &QUIET)
    });
    // One frontend per count of replicas, beside the cluster's own.
    let bench_dir = dir.path().join("bench");
    std::fs::create_dir_all(&bench_dir)?;
    let frontends: Vec<Frontend> = (1..=count)
        .map(|n| Frontend {
            name: format!("replicas{n}"),
            address: posfleet_e2e::replicas::free_address(),
            servers: cluster.replicas[..n]
                .iter()
                .map(|r| (r.grpc_address.clone(), r.http_address.clone()))
                .collect(),
        })
        .collect();
    let balancer =
        tokio::task::block_in_place(|| LoadBalancer::start(&bench_dir, &frontends, None));
    let parts = Parts {
        replicas: cluster
            .replicas
            .iter()
            .map(|r| {
                r.control_plane
                    .as_ref()
                    .map(|cp| cp.process.child.id())
                    .expect("the replicas run")
            })
            .collect(),
        haproxy: balancer.process.child.id(),
        database: postgres
            .url
            .rsplit_once('/')
            .map(|(_, name)| name.to_string())
            .unwrap_or_default(),
    };

    let admin_token = std::fs::read_to_string(cluster.admin_token_file())?
        .trim()
        .to_string();
    let bearer: MetadataValue<Ascii> = format!("Bearer {admin_token}").parse()?;
    let connect = async |address: &str| -> anyhow::Result<Vec<Channel>> {
        let mut channels = Vec::new();
        for _ in 0..args.connections {
            channels.push(
                Channel::from_shared(format!("http://{address}"))?
                    .connect()
                    .await?,
            );
        }
        Ok(channels)
    };
    let all = connect(&cluster.grpc_address).await?;
    let stores = args.devices.div_ceil(args.devices_per_store);
    let tokens = create_stores(
        &mut AdminServiceClient::new(all[0].clone()),
        &bearer,
        stores,
        args.devices_per_store,
    )
    .await?;
    let (devices, enrollment_seconds) =
        enroll_fleet(&all, tokens, args.devices, args.devices_per_store).await?;

    let load_before = load_average();
    let mut runs = Vec::new();
    for (n, frontend) in (1..=count).zip(&frontends) {
        let sim = Arc::new(Sim {
            channels: connect(&frontend.address).await?,
            devices: devices
                .iter()
                .map(|d| Device {
                    authorization: d.authorization.clone(),
                    upgraded: AtomicBool::new(false),
                })
                .collect(),
            told_release: AtomicUsize::new(0),
        });
        let warm = every_device_once(&sim, args.concurrency).await;
        anyhow::ensure!(
            warm.iter().all(|(r, _)| r.is_ok()),
            "heartbeats failed while warming {n} replica(s)"
        );

        let meter = Meter::start(parts.replicas[0]);
        let cpu = CpuMeter::start(&parts);
        let results = saturate(&sim, args.concurrency, args.phase_seconds).await;
        let cpu = cpu.finish(&parts);
        let mut phase = meter.finish(
            &format!("max throughput, {n} replica(s)"),
            "closed loop",
            None,
            results,
        );
        phase.control_plane_cpu_cores = cpu.replicas_cores;
        let max_throughput = Measured { phase, cpu };
        print_run(n, &max_throughput);

        let meter = Meter::start(parts.replicas[0]);
        let cpu = CpuMeter::start(&parts);
        let results = open_loop(sim.clone(), args.rate, args.phase_seconds, 0).await;
        let cpu = cpu.finish(&parts);
        let mut phase = meter.finish(
            &format!("fixed rate {}/s, {n} replica(s)", args.rate),
            "open loop",
            Some(args.rate),
            results,
        );
        phase.control_plane_cpu_cores = cpu.replicas_cores;
        let fixed_rate = Measured { phase, cpu };
        print_run(n, &fixed_rate);
        runs.push(Run {
            replicas: n,
            max_throughput,
            fixed_rate,
        });
    }

    let base = runs[0].max_throughput.phase.achieved_per_second;
    let scaling = runs
        .iter()
        .map(|r| r.max_throughput.phase.achieved_per_second / base)
        .collect();
    let report = Report {
        benchmark: "fleet-sim --replicas",
        devices: args.devices,
        stores,
        cores: cores(),
        connections: args.connections,
        concurrency: args.concurrency,
        enrollment_seconds,
        load_average: [load_before, load_average()],
        runs,
        scaling,
        command: posfleet_e2e::command_line(),
        commit: posfleet_e2e::measured_commit(),
    };
    eprintln!(
        "  scaling (max throughput over one replica's): {:.2?}",
        report.scaling
    );
    let output = write_figures(args, "replicas-", &report)?;
    eprintln!("  figures written to {}", output.display());
    for run in &report.runs {
        for phase in [&run.max_throughput.phase, &run.fixed_rate.phase] {
            anyhow::ensure!(phase.ok > 0, "no heartbeat answered: {}", phase.name);
        }
    }
    Ok(())
}
