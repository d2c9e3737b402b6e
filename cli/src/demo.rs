//! `posfleet demo`: a control plane on SQLite in a temporary directory, two
//! stores with three tills each (real agents speaking gRPC over loopback),
//! shown coming online, taking the example POS program from 1.0.0 to 1.1.0
//! (as a delta from 1.0.0, the bytes it saved reported) with their store's
//! catalog once a second person approved it, rolling back a 1.2.0 whose
//! health check fails, and canary analysis pausing a 1.3.0 whose program
//! keeps crashing while a good 1.2.1 passes. Everything it does goes
//! through the same APIs an ops engineer and a till use; its two people log
//! in as `posfleet login` does, the demo computing the TOTP codes their
//! phones would show.

use anyhow::{Context, bail};
use clap::Args;
use posfleet_agent::Agent;
use posfleet_agent::config::{AgentConfig, PeripheralsDriver};
use posfleet_control_plane::ControlPlane;
use posfleet_control_plane::config::Config;
use posfleet_proto::totp;
use posfleet_proto::v1;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::repo_cmd::{self, RoleKeyCounts};
use crate::view::{self, DeviceView};
use crate::{Admin, Output, login_cmd, session_file};

/// The example POS program's settings (`pos-app.conf`) in the demo: a
/// sale every 2 seconds, each reported to the agent.
const SELLING: &str = "healthy=yes\nsale_seconds=2\nfailed_tender_every=0\ncrash_every_seconds=0\n";
/// A release that passes its health check but whose program exits 1
/// every 4 seconds (the agent restarts it, later each time).
const CRASHING: &str =
    "healthy=yes\nsale_seconds=2\nfailed_tender_every=0\ncrash_every_seconds=4\n";
/// The demo's canary analysis policy: sales and checkout times, judged
/// from the first finished minute.
const ANALYSIS_POLICY: &str = r#"min_observation_minutes = 1
max_observation_minutes = 10
min_canary_till_hours = 0
on_fail = "pause"
on_inconclusive = "pause"

[signals.transactions]
kind = "count"
bad = "decrease"
effect = 0.5

[signals.checkout_seconds]
kind = "continuous"
effect = 0.25
"#;

/// The second person, a deployer, who approves big rollouts.
const APPROVER: &str = "alice";

/// The demo's people's password (a throwaway control plane on loopback).
const DEMO_PASSWORD: &str = "posfleet demo password";

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
struct TransferSummary {
    size_bytes: u64,
    tills: u64,
    bytes_from_origin: u64,
    bytes_from_peers: u64,
}

#[derive(Serialize)]
struct DeltaSummary {
    delta_bytes: u64,
    bundle_bytes: u64,
    /// Tills that rebuilt 1.1.0 from the delta.
    devices_rebuilt: usize,
    /// Bundle bytes they did not download, summed.
    bytes_saved: u64,
}

#[derive(Clone, Serialize)]
struct AnalysisSummary {
    /// The crashing release's rollout: its state (paused), its first
    /// wave's verdict (fail) and the reason, with the figures.
    rollout_1_3_0: String,
    verdict_1_3_0: String,
    reason_1_3_0: String,
    /// The good release's rollout: completed, its first wave passed.
    rollout_1_2_1: String,
    verdict_1_2_1: String,
    summary_1_2_1: String,
}

#[derive(Serialize)]
struct Summary {
    bundles_published: Vec<String>,
    devices_online: usize,
    devices_total: usize,
    /// Tills holding a valid certificate from the demo's fleet CA: every
    /// call they made after enrolling was mutual TLS.
    devices_with_certificate: usize,
    stores: usize,
    seconds_to_online: f64,
    /// Tills running pos-app 1.1.0 after it was assigned.
    devices_on_1_1_0: usize,
    seconds_to_1_1_0: f64,
    /// The 1.1.0 rollout's end state (completed).
    rollout_1_1_0: String,
    /// Who approved it (the second person, user alice, a deployer: it
    /// selects every till, more than one store's, the demo's approval
    /// threshold).
    rollout_1_1_0_approved_by: String,
    /// The 1.2.0 rollout's state (paused by itself) and why.
    rollout_1_2_0: String,
    rollout_1_2_0_reason: String,
    /// Canary tills it reached that rolled 1.2.0 back by themselves, and why.
    devices_rolled_back_1_2_0: usize,
    /// Tills outside the canary store never told about 1.2.0.
    devices_never_offered_1_2_0: usize,
    rollback_reasons: Vec<String>,
    /// Tills holding their own store's catalog and no other.
    devices_with_own_catalog: usize,
    /// Per store, where its tills got pos-app 1.1.0 (the delta from 1.0.0):
    /// the origin once, the rest from each other.
    transfers_1_1_0: BTreeMap<String, TransferSummary>,
    /// What the delta from 1.0.0 did for the 1.1.0 rollout.
    delta_1_1_0: DeltaSummary,
    /// The canary analysis of a crashing release and of a good one.
    analysis: Option<AnalysisSummary>,
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
    // TLS, and mutual TLS for the tills, from a fleet CA of its own made in
    // the temp dir.
    let config = Config {
        data_dir: dir.path().join("control-plane"),
        heartbeat_interval_seconds: 2,
        tls_server_names: vec!["127.0.0.1".into()],
        // One store's tills: the rollout to every store needs a second
        // person's approval, so the demo shows that step.
        approval_threshold_devices: args.tills_per_store.into(),
        ..Config::default()
    };
    let ca_file = config
        .data_dir
        .join("tls")
        .join(posfleet_control_plane::tls::TRUST_BUNDLE_FILE);
    let control_plane = ControlPlane::open(config)
        .await
        .context("starting the control plane")?;
    let setup_code_path = control_plane.admin_setup_code_path();
    let setup_code = std::fs::read_to_string(&setup_code_path)
        .with_context(|| format!("reading {}", setup_code_path.display()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let server = tokio::spawn(control_plane.serve(grpc, http, stopped(stop_rx.clone())));
    say(&format!(
        "Control plane on SQLite in {}: gRPC https://{grpc_address}, metrics https://{http_address}/metrics; TLS from its fleet CA {}",
        dir.path().display(),
        ca_file.display()
    ));

    let server_url = format!("https://{grpc_address}");
    let address = crate::Server {
        url: server_url.clone(),
        ca_file: Some(ca_file.clone()),
        insecure_dev: false,
    };
    // The first admin sets up (password, TOTP) as a person would at their
    // first `posfleet login`; their session goes to a file for the CLI.
    let channel = posfleet_pki::grpc_channel(
        &tonic::transport::Endpoint::from_shared(server_url.clone())?,
        address.tls()?,
    );
    let first = posfleet_proto::setup::complete_setup(
        channel.clone(),
        posfleet_control_plane::FIRST_ADMIN,
        &setup_code,
        DEMO_PASSWORD,
    )
    .await
    .context("setting up the first admin")?;
    // Kept where `posfleet login` keeps a session, for --keep-running.
    let config_dir = dir.path().join("config");
    let session_file = session_file::save(
        &config_dir,
        &session_file::StoredSession {
            server: server_url.clone(),
            user: first.session.user.clone(),
            role: first.session.role.clone(),
            token: first.session.token.clone(),
            expires_at_unix_ms: first.session.expires_at_unix_ms,
        },
    )?;
    say(&format!(
        "posfleet login --user admin: the first admin set up from their setup code ({}); session in {}",
        setup_code_path.display(),
        session_file.display()
    ));
    let mut admin = Admin::connect(&address, &first.session.token).await?;
    let mut approver = second_person(&mut admin, &address, channel, &say).await?;

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
    let mut published = Vec::new();
    let base = build_pos_app(dir.path(), "1.0.0", SELLING)?;
    published.push(repo_cmd::publish(&mut admin, &base, &keys, 7 * day).await?);
    let point = build_pos_app(dir.path(), "1.1.0", SELLING)?;
    published.push(repo_cmd::publish(&mut admin, &point, &keys, 7 * day).await?);
    // 1.1.0 also as a delta from 1.0.0: tills holding 1.0.0 fetch that.
    let delta = repo_cmd::publish_delta(&mut admin, &base, &point, &keys, 7 * day).await?;
    published.push(delta.clone());
    let bad = build_pos_app(dir.path(), "1.2.0", "healthy=no\n")?;
    published.push(repo_cmd::publish(&mut admin, &bad, &keys, 7 * day).await?);
    for &(store_id, name, _) in &STORES[..args.stores as usize] {
        let bundle = build_catalog(dir.path(), store_id, name)?;
        published.push(repo_cmd::publish(&mut admin, &bundle, &keys, 7 * day).await?);
    }
    say(&format!(
        "Bundle repository initialized (keys in {}); built, signed and published {}. \
         pos-app 1.2.0's health check is told to fail.",
        keys.display(),
        published
            .iter()
            .map(|b| b.target.as_str())
            .collect::<Vec<_>>()
            .join(", ")
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
                ca_cert_path: ca_file.clone(),
                data_dir: dir
                    .path()
                    .join("agents")
                    .join(format!("{store_id}-till-{till}")),
                enrollment_token: token.secret.clone(),
                hardware_model: "demo-pos-v1".into(),
                serial_number: format!("DEMO-{store_id}-{till}"),
                peripherals: PeripheralsDriver::Fake,
                root_json_path: keys.join("root.json"),
                repository_url: format!("https://{http_address}/repo/"),
                install_check_interval_seconds: 1,
                // Every till of the demo shares one machine: loopback, a
                // free port each, found through the control plane's list.
                p2p_listen_addrs: vec![
                    "/ip4/127.0.0.1/tcp/0".into(),
                    "/ip4/127.0.0.1/udp/0/quic-v1".into(),
                ],
                p2p_mdns: false,
                ..AgentConfig::default()
            };
            let mut agent = Agent::open(config)?;
            if let Ok(program) = std::env::current_exe() {
                agent = agent.with_signal_executable(program);
            }
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
    let device_ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    if !json {
        let views: Vec<DeviceView> = devices.iter().cloned().map(Into::into).collect();
        println!("{}", view::devices_table(&views));
        println!("{expected} of {expected} tills online after {seconds_to_online:.1}s.");
    }
    let stores = &STORES[..args.stores as usize];

    // The first release and each store's own catalog.
    say("\nposfleet device assign --store S pos-app@1.0.0, and each store's catalog:");
    for &(store_id, _, _) in stores {
        assign(&mut admin, store_id, "pos-app", "1.0.0").await?;
        assign(
            &mut admin,
            store_id,
            &catalog_name(store_id),
            CATALOG_VERSION,
        )
        .await?;
    }
    let wait = Duration::from_secs(args.timeout_seconds);
    let phase = |p: v1::BundlePhase| p as i32;
    converge(
        &mut admin,
        &device_ids,
        "pos-app",
        "1.0.0",
        phase(v1::BundlePhase::Installed),
        wait,
        &say,
    )
    .await?;

    // The upgrade, as a staged rollout: one till, then half, then all,
    // one till per store at a time, a short bake between waves.
    say("\nposfleet rollout create --release pos-app@1.1.0 --waves 1,50%,100% --bake 2s --start:");
    let upgrade = Instant::now();
    let good = start_rollout(
        &mut admin,
        &mut approver,
        ("pos-app", "1.1.0"),
        (&[], &[]),
        "1,50%,100%",
        (2, ""),
        &say,
    )
    .await?;
    let good = follow_rollout(&mut admin, &good.id, wait, &say).await?;
    let on_1_1_0 = converge(
        &mut admin,
        &device_ids,
        "pos-app",
        "1.1.0",
        phase(v1::BundlePhase::Installed),
        wait,
        &say,
    )
    .await?;
    let seconds_to_1_1_0 = upgrade.elapsed().as_secs_f64();
    let delta_1_1_0 = DeltaSummary {
        delta_bytes: delta.length,
        bundle_bytes: published
            .iter()
            .find(|b| b.target == "pos-app/1.1.0")
            .map_or(0, |b| b.length),
        devices_rebuilt: on_1_1_0
            .iter()
            .filter(|s| s.bytes_saved_by_delta > 0)
            .count(),
        bytes_saved: on_1_1_0.iter().map(|s| s.bytes_saved_by_delta).sum(),
    };
    say(&format!(
        "{} of {} tills rebuilt pos-app 1.1.0 from the {:.1} KiB delta from 1.0.0 instead of \
         fetching the {:.1} MiB bundle: {:.1} MiB not downloaded (posfleet device show, DELTA).",
        delta_1_1_0.devices_rebuilt,
        on_1_1_0.len(),
        delta_1_1_0.delta_bytes as f64 / 1024.0,
        mib(delta_1_1_0.bundle_bytes),
        mib(delta_1_1_0.bytes_saved)
    ));
    // Each store's tills shared the release: the origin sent it about once
    // per store.
    let mut transfers_1_1_0 = BTreeMap::new();
    for &(store_id, _, _) in stores {
        let request = admin.request(v1::GetStoreRequest {
            id: store_id.into(),
        });
        let detail = admin
            .client
            .get_store(request)
            .await
            .map_err(|s| admin.error(s))?
            .into_inner();
        if let Some(t) = detail
            .transfers
            .into_iter()
            .find(|t| t.bundle == "pos-app" && t.version == "1.1.0")
        {
            say(&format!(
                "Store {store_id}: pos-app 1.1.0 is {:.1} MiB; its {} tills got {} from the origin and {} from each other.",
                mib(t.size_bytes),
                t.tills,
                amount(t.bytes_from_origin),
                amount(t.bytes_from_peers)
            ));
            transfers_1_1_0.insert(
                store_id.to_string(),
                TransferSummary {
                    size_bytes: t.size_bytes,
                    tills: t.tills,
                    bytes_from_origin: t.bytes_from_origin,
                    bytes_from_peers: t.bytes_from_peers,
                },
            );
        }
    }

    // A bad release: its health check fails on the canary store's tills,
    // which switch back to 1.1.0 by themselves, and the rollout pauses
    // itself before any other store is told.
    let canary = stores[0].0;
    say(&format!(
        "\nposfleet rollout create --release pos-app@1.2.0 --canary-stores {canary} --waves 100% --start (a bad release):"
    ));
    let bad = start_rollout(
        &mut admin,
        &mut approver,
        ("pos-app", "1.2.0"),
        (&[], &[canary]),
        "100%",
        (0, ""),
        &say,
    )
    .await?;
    let bad = follow_rollout(&mut admin, &bad.id, wait, &say).await?;
    // The tills it reached (one at a time per store) and that failed.
    let canary_ids: Vec<String> = admin
        .get_rollout(&bad.id)
        .await?
        .failures
        .into_iter()
        .map(|f| f.device_id)
        .collect();
    let rolled_back = converge(
        &mut admin,
        &canary_ids,
        "pos-app",
        "1.2.0",
        phase(v1::BundlePhase::RolledBack),
        wait,
        &say,
    )
    .await?;
    let mut devices_never_offered_1_2_0 = 0;
    for device in devices.iter().filter(|d| d.store_id != canary) {
        let shown = admin.get_device(&device.id).await?;
        let offered = shown.bundles.iter().any(|b| {
            b.name == "pos-app" && b.desired.as_ref().is_some_and(|d| d.version == "1.2.0")
        });
        if !offered {
            devices_never_offered_1_2_0 += 1;
        }
    }
    let mut rollback_reasons: Vec<String> = rolled_back
        .iter()
        .filter(|s| s.active_version == "1.1.0")
        .map(|s| s.error.clone())
        .collect();
    let devices_rolled_back_1_2_0 = rollback_reasons.len();
    rollback_reasons.sort();
    rollback_reasons.dedup();

    let analysis = if stores.len() >= 2 && args.tills_per_store >= 2 {
        let stores = [stores[0].0, stores[1].0];
        let dir = dir.path();
        Some(
            canary_analysis(
                &mut admin,
                &mut approver,
                (dir, &keys),
                stores,
                &bad.id,
                &say,
            )
            .await?,
        )
    } else {
        say("\nCanary analysis needs 2 stores of 2 tills or more: skipped.");
        None
    };

    // Each till holds its own store's catalog, and no other.
    let mut devices_with_own_catalog = 0;
    for device in &devices {
        let shown = admin.get_device(&device.id).await?;
        let catalogs: Vec<&str> = shown
            .bundles
            .iter()
            .filter(|b| b.name.starts_with("catalog-"))
            .filter(|b| {
                b.status
                    .as_ref()
                    .is_some_and(|s| s.active_version == CATALOG_VERSION)
            })
            .map(|b| b.name.as_str())
            .collect();
        if catalogs == [catalog_name(&device.store_id).as_str()] {
            devices_with_own_catalog += 1;
        }
    }

    let devices = admin
        .list_devices(v1::ListDevicesRequest::default())
        .await?;
    let views: Vec<DeviceView> = devices.into_iter().map(Into::into).collect();
    let bundles = admin.list_bundles(String::new()).await?;
    if json {
        let summary = Summary {
            bundles_published: bundles.iter().map(|b| b.target.clone()).collect(),
            devices_online: views.len(),
            devices_total,
            devices_with_certificate: views
                .iter()
                .filter(|d| d.certificate_status == "valid")
                .count(),
            stores: args.stores as usize,
            seconds_to_online,
            devices_on_1_1_0: on_1_1_0.len(),
            seconds_to_1_1_0,
            rollout_1_1_0: rollout_state(good.state),
            rollout_1_1_0_approved_by: good.approved_by.clone(),
            rollout_1_2_0: rollout_state(bad.state),
            rollout_1_2_0_reason: bad.reason.clone(),
            devices_rolled_back_1_2_0,
            devices_never_offered_1_2_0,
            rollback_reasons,
            devices_with_own_catalog,
            transfers_1_1_0,
            delta_1_1_0,
            analysis: analysis.clone(),
            grpc_address,
            http_address: http_address.clone(),
        };
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "\nRollout {} of pos-app 1.1.0, approved by {}, {}: {} of {expected} tills moved in {seconds_to_1_1_0:.1}s.",
            good.id,
            good.approved_by,
            rollout_state(good.state),
            on_1_1_0.len(),
        );
        println!(
            "Rollout {} of pos-app 1.2.0 {} by itself ({}); {devices_rolled_back_1_2_0} canary tills \
             rolled it back by themselves ({}); {devices_never_offered_1_2_0} tills of other stores never got it.",
            bad.id,
            rollout_state(bad.state),
            bad.reason,
            rollback_reasons.join("; ")
        );
        if let Some(summary) = &analysis {
            println!(
                "Rollout of pos-app 1.3.0 {} by its canary analysis ({}); rollout of pos-app 1.2.1 {}, its canary analysis: {}.",
                summary.rollout_1_3_0,
                summary.reason_1_3_0,
                summary.rollout_1_2_1,
                summary.summary_1_2_1
            );
        }
        println!(
            "{devices_with_own_catalog} of {expected} tills hold their own store's catalog and no other."
        );
        println!("{}", view::devices_table(&views));
        println!("Published bundles (posfleet bundle list):");
        repo_cmd::print_bundles(&bundles, Output::Table)?;
    }

    if args.keep_running {
        let prometheus = write_prometheus_config(dir.path(), &http_address, &ca_file)?;
        eprintln!(
            "Running until Ctrl-C. Try, with the first admin's session: POSFLEET_CONFIG_DIR={} \
             posfleet --server {server_url} --ca-file {} device list",
            config_dir.display(),
            ca_file.display(),
        );
        eprintln!(
            "Prometheus on it, with the dashboards' rules (then http://127.0.0.1:9090; \
             Grafana: see dashboards/README.md):\n  prometheus --config.file={} \
             --storage.tsdb.path={} --web.listen-address=127.0.0.1:9090",
            prometheus.display(),
            dir.path().join("prometheus").join("data").display()
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

/// The second person, who approves the big rollouts the first one creates:
/// `posfleet user create`, then her first `posfleet login` (setup code,
/// password, authenticator app) and an everyday one (password and code),
/// whose session approves. A phone would show her codes; the demo computes
/// them from her TOTP secret, as an authenticator app does.
async fn second_person(
    admin: &mut Admin,
    address: &crate::Server,
    channel: tonic::transport::Channel,
    say: &impl Fn(&str),
) -> anyhow::Result<Admin> {
    let created = admin
        .create_user(v1::CreateUserRequest {
            name: APPROVER.into(),
            role: "deployer".into(),
            scope: Default::default(),
        })
        .await?;
    say(&format!(
        "posfleet user create {APPROVER} --role deployer: a second person, to approve big \
         rollouts; her one-time setup code is {}",
        created.setup_code
    ));
    let setup = posfleet_proto::setup::complete_setup(
        channel,
        APPROVER,
        &created.setup_code,
        DEMO_PASSWORD,
    )
    .await
    .context("setting up the approver")?;
    say(&format!(
        "posfleet login --user {APPROVER} (her first): the setup code, a new password, her \
         phone's authenticator app enrolled from the QR code (secret {}), {} recovery codes \
         printed once",
        setup.totp_secret,
        setup.recovery_codes.len()
    ));
    // The setup spent the current 30-second step's code: her everyday
    // login takes the next one's (accepted: one step of clock skew).
    let code = totp::code_at(&setup.totp_secret, totp::unix_now() + totp::STEP_SECONDS)?;
    let login = login_cmd::Sessions::connect(address)?
        .login(v1::LoginRequest {
            user: APPROVER.into(),
            password: DEMO_PASSWORD.into(),
            code: code.clone(),
            session_seconds: 0,
        })
        .await?;
    let Some(v1::login_response::Result::Session(session)) = login.result else {
        bail!("{APPROVER}'s login gave no session");
    };
    say(&format!(
        "posfleet login --user {APPROVER}: her password and the code her phone shows ({code}, \
         computed here from her secret as the app would); a session until {}",
        view::time(session.expires_at_unix_ms)
    ));
    Admin::connect(address, &session.token).await
}

/// The recording and alerting rules of `dashboards/rules/`.
const PROMETHEUS_RULES: [(&str, &str); 2] = [
    (
        "posfleet.rules.yml",
        include_str!("../../dashboards/rules/posfleet.rules.yml"),
    ),
    (
        "posfleet.alerts.yml",
        include_str!("../../dashboards/rules/posfleet.alerts.yml"),
    ),
];

/// Writes a Prometheus configuration scraping the demo's control plane at
/// `http_address` over TLS (trusting `ca_file`), with the dashboards'
/// rules beside it, in `dir/prometheus/`. Returns its path.
fn write_prometheus_config(
    dir: &std::path::Path,
    http_address: &str,
    ca_file: &std::path::Path,
) -> anyhow::Result<std::path::PathBuf> {
    let folder = dir.join("prometheus");
    std::fs::create_dir_all(&folder)?;
    for (name, rules) in PROMETHEUS_RULES {
        std::fs::write(folder.join(name), rules)?;
    }
    let config = format!(
        "# Written by `posfleet demo`: dashboards/prometheus.yml for this demo's control plane.
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files:
  - posfleet.rules.yml
  - posfleet.alerts.yml
scrape_configs:
  - job_name: posfleet-control-plane
    scheme: https
    tls_config:
      ca_file: {}
    static_configs:
      - targets: [\"{http_address}\"]
",
        ca_file.display()
    );
    let path = folder.join("prometheus.yml");
    std::fs::write(&path, config)?;
    Ok(path)
}

/// True once a heartbeat has arrived (not merely enrolled): every heartbeat
/// reports the terminal's memory.
fn has_reported(device: &v1::Device) -> bool {
    device
        .health
        .as_ref()
        .is_some_and(|h| h.memory_total_bytes > 0)
}

const CATALOG_VERSION: &str = "2026.11.1";

fn catalog_name(store_id: &str) -> String {
    format!("catalog-{store_id}")
}

/// `posfleet device assign --store STORE NAME@VERSION`.
async fn assign(
    admin: &mut Admin,
    store_id: &str,
    name: &str,
    version: &str,
) -> anyhow::Result<()> {
    admin
        .assign_bundle(v1::AssignBundleRequest {
            target: Some(v1::assign_bundle_request::Target::StoreId(store_id.into())),
            name: name.into(),
            version: version.into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

fn rollout_state(state: i32) -> String {
    v1::RolloutState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("ROLLOUT_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// `posfleet rollout create --release NAME@VERSION --waves W [--canary-stores S] --start`,
/// with `posfleet rollout approve ID` by `approver` in between when the
/// rollout needs it.
async fn start_rollout(
    admin: &mut Admin,
    approver: &mut Admin,
    (name, version): (&str, &str),
    (only_stores, canary): (&[&str], &[&str]),
    waves: &str,
    (bake_seconds, analysis_policy): (u64, &str),
    say: &impl Fn(&str),
) -> anyhow::Result<v1::Rollout> {
    let mut all_waves = Vec::new();
    if !canary.is_empty() {
        all_waves.push(v1::WaveSpec {
            size: Some(v1::wave_spec::Size::Stores(v1::StoreList {
                store_ids: canary.iter().map(|s| s.to_string()).collect(),
            })),
        });
    }
    all_waves.extend(crate::rollout_cmd::parse_waves(waves)?);
    let rollout = admin
        .create_rollout(v1::CreateRolloutRequest {
            bundle_name: name.into(),
            analysis_policy: analysis_policy.into(),
            bundle_version: version.into(),
            selector: Some(v1::RolloutSelector {
                store_ids: only_stores.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            strategy: Some(v1::RolloutStrategy {
                waves: all_waves,
                wave_unit: v1::WaveUnit::Devices as i32,
                bake_seconds,
                max_failures_percent: 20.0,
                min_failures: 1,
                device_timeout_seconds: 600,
                max_unavailable_per_store: 1,
                download_ahead: Some(true),
                emergency: false,
            }),
        })
        .await?;
    if rollout.approval_required {
        say(&format!(
            "  rollout {} awaits approval ({} devices > threshold {}); as {APPROVER}: posfleet rollout approve {}",
            rollout.id, rollout.selected_devices, rollout.approval_threshold_devices, rollout.id
        ));
        approver
            .rollout_operation("approve", &rollout.id, "")
            .await?;
    }
    admin.rollout_operation("start", &rollout.id, "").await
}

/// Canary analysis: 1.3.0, which passes its health check but whose program
/// keeps crashing, and 1.2.1, as good as 1.1.0, each rolled out to one of
/// `stores` with a first wave of one till judged against the store's other
/// tills. The paused 1.2.0 rollout is aborted first (its tills are its own
/// until then).
async fn canary_analysis(
    admin: &mut Admin,
    approver: &mut Admin,
    (dir, keys): (&std::path::Path, &std::path::Path),
    stores: [&str; 2],
    paused: &str,
    say: &impl Fn(&str),
) -> anyhow::Result<AnalysisSummary> {
    say(&format!(
        "\nposfleet rollout abort {paused} (1.2.0 stays where it is; its tills are free for the next rollouts)"
    ));
    admin
        .rollout_operation("abort", paused, "the next releases replace it")
        .await?;
    let day = Duration::from_secs(86_400);
    for (version, conf) in [("1.2.1", SELLING), ("1.3.0", CRASHING)] {
        let bundle = build_pos_app(dir, version, conf)?;
        repo_cmd::publish(admin, &bundle, keys, 7 * day).await?;
    }
    let policy = dir.join("canary.toml");
    std::fs::write(&policy, ANALYSIS_POLICY)?;
    say(&format!(
        "Canary analysis (policy {}: sales must not fall by half, checkout times not shift by a quarter; \
         judged on finished minutes, so this takes a few minutes). Published pos-app 1.3.0, which passes \
         its health check but whose program exits every 4 s, and 1.2.1, as good as 1.1.0:",
        policy.display()
    ));
    let mut rollouts = Vec::new();
    for (version, store) in [("1.3.0", stores[0]), ("1.2.1", stores[1])] {
        say(&format!(
            "posfleet rollout create --release pos-app@{version} --stores {store} --waves 1,100% \
             --analysis {} --start",
            policy.display()
        ));
        let rollout = start_rollout(
            admin,
            approver,
            ("pos-app", version),
            (&[store], &[]),
            "1,100%",
            (0, ANALYSIS_POLICY),
            say,
        )
        .await?;
        rollouts.push(rollout.id);
    }
    // A judgement needs a finished minute after the canary installed.
    let wait = Duration::from_secs(360);
    let crashing = follow_rollout(admin, &rollouts[0], wait, say).await?;
    let good = follow_rollout(admin, &rollouts[1], wait, say).await?;
    let verdict = |detail: &v1::RolloutDetail| {
        detail
            .waves
            .first()
            .and_then(|w| w.analysis.clone())
            .unwrap_or_default()
    };
    let crashing_detail = admin.get_rollout(&rollouts[0]).await?;
    let good_detail = admin.get_rollout(&rollouts[1]).await?;
    let shown = crate::rollout_cmd::RolloutDetailView::from(crashing_detail.clone());
    say(&format!(
        "posfleet rollout show {}:\n{}",
        rollouts[0],
        crate::rollout_cmd::detail_text(&shown)
    ));
    let good_verdict = verdict(&good_detail);
    Ok(AnalysisSummary {
        rollout_1_3_0: rollout_state(crashing.state),
        verdict_1_3_0: verdict(&crashing_detail).verdict,
        reason_1_3_0: crashing.reason,
        rollout_1_2_1: rollout_state(good.state),
        verdict_1_2_1: good_verdict.verdict,
        summary_1_2_1: good_verdict.summary,
    })
}

/// Polls a rollout until it completes, stops or pauses, printing each
/// change of wave and counts (what `posfleet rollout watch` shows).
async fn follow_rollout(
    admin: &mut Admin,
    id: &str,
    timeout: Duration,
    say: &impl Fn(&str),
) -> anyhow::Result<v1::Rollout> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let rollout = admin.get_rollout(id).await?.rollout.unwrap_or_default();
        let counts = rollout.counts.unwrap_or_default();
        let state = rollout_state(rollout.state);
        let line = format!(
            "{state}, wave {}/{}: {} succeeded, {} in flight, {} failed{}",
            (rollout.current_wave + 1).min(rollout.wave_count),
            rollout.wave_count,
            counts.succeeded,
            counts.notified + counts.downloading + counts.installing,
            counts.failed + counts.rolled_back + counts.timed_out,
            if rollout.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", rollout.reason)
            }
        );
        if line != last {
            say(&format!(
                "  {:>5.1}s  rollout {id} {line}",
                started.elapsed().as_secs_f64()
            ));
            last = line;
        }
        if matches!(
            state.as_str(),
            "completed" | "paused" | "aborted" | "rolled_back"
        ) {
            return Ok(rollout);
        }
        if started.elapsed() > timeout {
            bail!("rollout {id} still {state} after {}s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Polls the tills until each reports `phase` for `name` `version`,
/// printing progress as the count changes; returns their statuses.
async fn converge(
    admin: &mut Admin,
    device_ids: &[String],
    name: &str,
    version: &str,
    phase: i32,
    timeout: Duration,
    say: &impl Fn(&str),
) -> anyhow::Result<Vec<v1::BundleStatus>> {
    let started = Instant::now();
    let mut last_count = usize::MAX;
    loop {
        let mut done = Vec::new();
        for id in device_ids {
            let device = admin.get_device(id).await?;
            if let Some(status) = device
                .bundles
                .into_iter()
                .find(|b| b.name == name)
                .and_then(|b| b.status)
                .filter(|s| s.target_version == version && s.phase == phase)
            {
                done.push(status);
            }
        }
        if done.len() != last_count {
            last_count = done.len();
            let phase_name = v1::BundlePhase::try_from(phase)
                .map(|p| {
                    p.as_str_name()
                        .trim_start_matches("BUNDLE_PHASE_")
                        .to_ascii_lowercase()
                })
                .unwrap_or_default();
            say(&format!(
                "  {:>5.1}s  {}/{} tills {phase_name} {name} {version}",
                started.elapsed().as_secs_f64(),
                done.len(),
                device_ids.len()
            ));
        }
        if done.len() == device_ids.len() {
            return Ok(done);
        }
        if started.elapsed() > timeout {
            bail!(
                "only {} of {} tills reached {name} {version} after {}s",
                done.len(),
                device_ids.len(),
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The files of `examples/pos-app`, built into the CLI so the demo runs
/// from any folder.
const POS_APP: &[(&str, &str, u32)] = &[
    (
        "posfleet-bundle.toml",
        include_str!("../../examples/pos-app/posfleet-bundle.toml"),
        0o644,
    ),
    (
        "pos-app.conf",
        include_str!("../../examples/pos-app/pos-app.conf"),
        0o644,
    ),
    (
        "bin/pos-app",
        include_str!("../../examples/pos-app/bin/pos-app"),
        0o755,
    ),
];

/// The example POS program at `version`, packed as a bundle; `healthy =
/// false` tells its health check to fail.
fn build_pos_app(
    dir: &std::path::Path,
    version: &str,
    conf: &str,
) -> anyhow::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let src = dir.join(format!("pos-app-{version}"));
    for (path, text, mode) in POS_APP {
        let file = src.join(path);
        std::fs::create_dir_all(file.parent().unwrap_or(&src))?;
        let text = match *path {
            "posfleet-bundle.toml" => {
                text.replace("version = \"1.0.0\"", &format!("version = \"{version}\""))
            }
            "pos-app.conf" => conf.to_string(),
            _ => text.to_string(),
        };
        std::fs::write(&file, text)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode))?;
    }
    // Product images: enough bytes (8 pieces) for the store's tills to
    // share; a point release leaves them alone, so its delta is small.
    std::fs::create_dir_all(src.join("assets"))?;
    std::fs::write(
        src.join("assets/images.bin"),
        noise(0x2545_f491_4f6c_dd1d, 8 << 20),
    )?;
    let bundle = dir.join(format!("pos-app-{version}.bundle"));
    posfleet_bundle::archive::build(&src, &bundle)?;
    Ok(bundle)
}

/// `len` incompressible bytes from `seed` (xorshift64*).
fn noise(mut seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// `3.2 KiB` below a MiB, `8.0 MiB` above.
fn amount(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", mib(bytes))
    }
}

/// A store's product and price catalog, as a catalog bundle.
fn build_catalog(
    dir: &std::path::Path,
    store_id: &str,
    store_name: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let name = catalog_name(store_id);
    let src = dir.join(&name);
    std::fs::create_dir_all(&src)?;
    std::fs::write(
        src.join("posfleet-bundle.toml"),
        format!(
            "name = \"{name}\"\nversion = \"{CATALOG_VERSION}\"\nkind = \"catalog\"\nhardware = [\"*\"]\n"
        ),
    )?;
    // Prices differ per store: a till must hold its own store's.
    let markup = 100 + 10 * store_id.len() as u32;
    let items = [
        ("1001", "Espresso", 250),
        ("1002", "Croissant", 180),
        ("1003", "Orange juice", 390),
    ];
    let mut csv = format!("# {store_name}\nsku,name,cents\n");
    for (sku, item, cents) in items {
        csv.push_str(&format!("{sku},{item},{}\n", cents * markup / 100));
    }
    std::fs::write(src.join("prices.csv"), csv)?;
    let bundle = dir.join(format!("{name}.bundle"));
    posfleet_bundle::archive::build(&src, &bundle)?;
    Ok(bundle)
}
