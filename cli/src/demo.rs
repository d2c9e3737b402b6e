//! `posfleet demo`: a control plane on SQLite in a temporary directory, two
//! stores with three tills each (real agents speaking gRPC over loopback),
//! shown coming online. Everything it does goes through the same APIs an
//! ops engineer and a till use.

use anyhow::{Context, bail};
use clap::Args;
use posfleet_agent::Agent;
use posfleet_agent::config::{AgentConfig, PeripheralsDriver};
use posfleet_control_plane::ControlPlane;
use posfleet_control_plane::config::Config;
use posfleet_proto::v1;
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::repo_cmd::{self, RoleKeyCounts};
use crate::view::{self, DeviceView};
use crate::{Admin, Output};

/// (store id, name, time zone) of the demo stores, in order.
const STORES: &[(&str, &str, &str)] = &[
    ("paris-01", "Paris Bastille", "Europe/Paris"),
    ("nyc-01", "New York SoHo", "America/New_York"),
    ("tokyo-01", "Tokyo Shibuya", "Asia/Tokyo"),
    ("sydney-01", "Sydney CBD", "Australia/Sydney"),
];

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of stores (1 to 4).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=4))]
    stores: u32,
    /// Tills per store (1 to 20).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    tills_per_store: u32,
    /// Give up if the tills are not all online by then.
    #[arg(long, default_value_t = 60)]
    timeout_seconds: u64,
    /// Keep the control plane and tills running until Ctrl-C, to explore
    /// them with the other commands.
    #[arg(long)]
    keep_running: bool,
}

#[derive(Serialize)]
struct Summary {
    bundles_published: Vec<String>,
    devices_online: usize,
    devices_total: usize,
    stores: usize,
    seconds_to_online: f64,
    grpc_address: String,
    http_address: String,
}

pub async fn run(args: &DemoArgs, output: Output) -> anyhow::Result<()> {
    let json = output == Output::Json;
    let say = |line: &str| {
        if !json {
            println!("{line}");
        }
    };
    let dir = tempfile::Builder::new()
        .prefix("posfleet-demo-")
        .tempdir()?;
    let started = Instant::now();

    // The control plane, with a short heartbeat interval so the demo is brisk.
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let grpc_address = grpc.local_addr()?.to_string();
    let http_address = http.local_addr()?.to_string();
    let config = Config {
        data_dir: dir.path().join("control-plane"),
        heartbeat_interval_seconds: 2,
        ..Config::default()
    };
    let control_plane = ControlPlane::open(config)
        .await
        .context("starting the control plane")?;
    let token_path = control_plane.admin_token_path();
    let admin_token = std::fs::read_to_string(&token_path)
        .with_context(|| format!("reading {}", token_path.display()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let server = tokio::spawn(control_plane.serve(grpc, http, stopped(stop_rx.clone())));
    say(&format!(
        "Control plane on SQLite in {}: gRPC {grpc_address}, metrics http://{http_address}/metrics",
        dir.path().display()
    ));

    let server_url = format!("http://{grpc_address}");
    let mut admin = Admin::connect(&server_url, admin_token.trim()).await?;

    // Signed bundles: keys, a sample bundle built, signed and published.
    let keys = dir.path().join("keys");
    let one_each = RoleKeyCounts {
        root_keys: 1,
        root_threshold: 1,
        targets_keys: 1,
        targets_threshold: 1,
    };
    let day = Duration::from_secs(86_400);
    repo_cmd::init(&mut admin, &keys, one_each, 30 * day, 7 * day).await?;
    let bundle = build_sample_bundle(dir.path())?;
    let published = repo_cmd::publish(&mut admin, &bundle, &keys, 7 * day).await?;
    say(&format!(
        "Bundle repository initialized (keys in {}); built, signed and published {} ({} bytes).",
        keys.display(),
        published.target,
        published.length
    ));
    let mut agents = Vec::new();
    for &(store_id, name, time_zone) in &STORES[..args.stores as usize] {
        admin.create_store(store_id, name, time_zone).await?;
        let token = admin
            .create_token(store_id, Duration::from_secs(3600), args.tills_per_store)
            .await?;
        say(&format!(
            "Store {store_id} ({time_zone}): enrollment token {} for {} tills",
            token.token.unwrap_or_default().id,
            args.tills_per_store
        ));
        for till in 1..=args.tills_per_store {
            let config = AgentConfig {
                server_url: server_url.clone(),
                data_dir: dir
                    .path()
                    .join("agents")
                    .join(format!("{store_id}-till-{till}")),
                enrollment_token: token.secret.clone(),
                hardware_model: "demo-pos-v1".into(),
                serial_number: format!("DEMO-{store_id}-{till}"),
                peripherals: PeripheralsDriver::Fake,
                root_json_path: keys.join("root.json"),
                repository_url: format!("http://{http_address}/repo/"),
                ..AgentConfig::default()
            };
            let agent = Agent::open(config)?;
            agents.push(tokio::spawn(agent.run(stopped(stop_rx.clone()))));
        }
    }

    let expected = (args.stores * args.tills_per_store) as usize;
    let deadline = started + Duration::from_secs(args.timeout_seconds);
    let devices = loop {
        let online = admin
            .list_devices(v1::ListDevicesRequest {
                status: v1::DeviceStatus::Online as i32,
                ..Default::default()
            })
            .await?;
        let reporting = online.iter().filter(|d| has_reported(d)).count();
        if reporting == expected {
            break online;
        }
        if Instant::now() > deadline {
            bail!(
                "only {reporting} of {expected} tills online after {}s",
                args.timeout_seconds
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let seconds_to_online = started.elapsed().as_secs_f64();
    let devices_total = admin
        .list_devices(v1::ListDevicesRequest::default())
        .await?
        .len();
    let views: Vec<DeviceView> = devices.into_iter().map(Into::into).collect();
    let bundles = admin.list_bundles(String::new()).await?;
    if json {
        let summary = Summary {
            bundles_published: bundles.iter().map(|b| b.target.clone()).collect(),
            devices_online: views.len(),
            devices_total,
            stores: args.stores as usize,
            seconds_to_online,
            grpc_address,
            http_address,
        };
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{}", view::devices_table(&views));
        println!("{expected} of {expected} tills online after {seconds_to_online:.1}s.");
        println!("Published bundles (posfleet bundle list):");
        repo_cmd::print_bundles(&bundles, Output::Table)?;
    }

    if args.keep_running {
        eprintln!(
            "Running until Ctrl-C. Try: posfleet --server {server_url} --token-file {} device list",
            token_path.display()
        );
        tokio::signal::ctrl_c().await?;
    }
    let _ = stop_tx.send(true);
    for agent in agents {
        agent.await??;
    }
    server.await??;
    Ok(())
}

/// True once a heartbeat has arrived (not merely enrolled): every heartbeat
/// reports the terminal's memory.
fn has_reported(device: &v1::Device) -> bool {
    device
        .health
        .as_ref()
        .is_some_and(|h| h.memory_total_bytes > 0)
}

/// The sample POS program of the demo, packed as bundle pos-app 1.0.0.
fn build_sample_bundle(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let src = dir.join("pos-app-src");
    std::fs::create_dir_all(src.join("bin"))?;
    std::fs::write(
        src.join("posfleet-bundle.toml"),
        "name = \"pos-app\"\nversion = \"1.0.0\"\nkind = \"software\"\nhardware = [\"demo-pos-v1\"]\n\n\
         [health_check]\ncommand = [\"bin/pos-app\", \"--health\"]\ntimeout_seconds = 10\n",
    )?;
    let program = src.join("bin/pos-app");
    std::fs::write(&program, "#!/bin/sh\necho \"pos-app 1.0.0: ok\"\n")?;
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755))?;
    let bundle = dir.join("pos-app-1.0.0.bundle");
    posfleet_bundle::archive::build(&src, &bundle)?;
    Ok(bundle)
}
