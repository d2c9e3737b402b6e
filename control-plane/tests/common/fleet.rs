//! A fleet of simulated tills on a control plane: each step every till
//! heartbeats, reads its desired version of pos-app, moves one phase
//! towards it and reports it, as agents do; and reports, once each minute
//! is over, the signals of the version it runs (for canary analysis).

use super::{
    Admin, Backend, TestDb, TestServer, device_request, enroll_request_for, heartbeat, new_key,
};
use ed25519_dalek::SigningKey;
use posfleet_bundle::manifest::Kind;
use posfleet_proto::v1;
use posfleet_proto::v1::agent_service_client::AgentServiceClient;
use posfleet_proto::v1::wave_spec::Size;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub const APP: &str = "pos-app";

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One simulated till: what it runs, what it is working on.
pub struct Till {
    pub id: String,
    pub credential: String,
    pub active: Option<String>,
    /// The version being installed and how far (1: downloading, 2: installing).
    pub working: Option<(String, u8)>,
    /// Versions it gave up on (failed, rolled back), never retried.
    pub given_up: BTreeSet<String>,
    /// Never answers (switched off).
    pub silent: bool,
    /// Minutes (since the epoch) before this one have been reported.
    pub reported_until: i64,
}

/// Tills of a fleet, driven one step at a time: each step every till
/// heartbeats, reads its desired version of pos-app and moves one phase
/// towards it, reporting each phase with ReportProgress. Versions in `bad`
/// fail their health check and are rolled back by the till.
pub struct Sim {
    pub tills: Vec<Till>,
    pub bad: BTreeSet<String>,
    pub agent: AgentServiceClient<Channel>,
    /// Signals each till reports for every minute, by the version it runs
    /// (none for a version not listed); `None`: tills report no minutes.
    pub signals: Option<HashMap<String, BTreeMap<String, u64>>>,
}

impl Sim {
    pub fn till(&mut self, id: &str) -> &mut Till {
        self.tills.iter_mut().find(|t| t.id == id).unwrap()
    }

    pub async fn report(&mut self, i: usize, target: &str, phase: v1::BundlePhase, error: &str) {
        let till = &self.tills[i];
        let status = v1::BundleStatus {
            name: APP.into(),
            kind: v1::BundleKind::Software as i32,
            active_version: till.active.clone().unwrap_or_default(),
            target_version: target.into(),
            phase: phase as i32,
            bytes_done: 0,
            bytes_total: 0,
            error: error.into(),
            updated_at_unix_ms: now_ms(),
            ..Default::default()
        };
        self.agent
            .report_progress(device_request(
                &till.credential,
                v1::ReportProgressRequest {
                    bundles: vec![status],
                },
            ))
            .await
            .unwrap();
    }

    /// Till `i`'s minutes that ended since its last heartbeat, with the
    /// signals of the version it runs.
    fn finished_minutes(&mut self, i: usize) -> Vec<v1::SignalMinute> {
        let Some(signals) = &self.signals else {
            return Vec::new();
        };
        let till = &mut self.tills[i];
        let now = now_ms().div_euclid(60_000);
        let counts = till
            .active
            .as_ref()
            .and_then(|v| signals.get(v))
            .cloned()
            .unwrap_or_default();
        let minutes = (till.reported_until..now)
            .map(|minute| v1::SignalMinute {
                minute,
                counts: counts.clone().into_iter().collect(),
                values: Default::default(),
            })
            .collect();
        till.reported_until = till.reported_until.max(now);
        minutes
    }

    pub async fn step(&mut self) {
        for i in 0..self.tills.len() {
            if self.tills[i].silent {
                continue;
            }
            let installed: HashMap<String, String> = self.tills[i]
                .active
                .iter()
                .map(|v| (APP.to_string(), v.clone()))
                .collect();
            let signal_minutes = self.finished_minutes(i);
            let response = self
                .agent
                .heartbeat(heartbeat(
                    &self.tills[i].credential,
                    v1::HeartbeatRequest {
                        agent_version: "0.9.0".into(),
                        installed_bundles: installed,
                        signal_minutes,
                        ..Default::default()
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            let Some(desired) = response.desired_bundles.into_iter().find(|d| d.name == APP) else {
                continue;
            };
            let till = &self.tills[i];
            let version = desired.version.clone();
            if till.active.as_deref() == Some(&version) || till.given_up.contains(&version) {
                continue;
            }
            let lower = till.active.as_ref().is_some_and(|active| {
                semver::Version::parse(active).unwrap() > semver::Version::parse(&version).unwrap()
            });
            if lower && !desired.rollback {
                self.tills[i].given_up.insert(version.clone());
                self.report(
                    i,
                    &version,
                    v1::BundlePhase::Failed,
                    "refusing to downgrade",
                )
                .await;
                continue;
            }
            let stage = match &till.working {
                Some((v, stage)) if *v == version => *stage,
                _ => 0,
            };
            match stage {
                0 => {
                    self.tills[i].working = Some((version.clone(), 1));
                    self.report(i, &version, v1::BundlePhase::Downloading, "")
                        .await;
                }
                1 => {
                    self.tills[i].working = Some((version.clone(), 2));
                    self.report(i, &version, v1::BundlePhase::Installing, "")
                        .await;
                }
                _ => {
                    self.tills[i].working = None;
                    if self.bad.contains(&version) && !desired.rollback {
                        self.tills[i].given_up.insert(version.clone());
                        self.report(
                            i,
                            &version,
                            v1::BundlePhase::RolledBack,
                            "health check failed: exit status 1",
                        )
                        .await;
                    } else {
                        self.tills[i].active = Some(version.clone());
                        self.report(i, &version, v1::BundlePhase::Installed, "")
                            .await;
                    }
                }
            }
        }
    }

    /// Steps every 100 ms until `done` holds on the rollout, or panics
    /// after `limit`.
    pub async fn until(
        &mut self,
        admin: &mut Admin,
        id: &str,
        limit: Duration,
        done: impl Fn(&v1::RolloutDetail) -> bool,
    ) -> v1::RolloutDetail {
        let start = Instant::now();
        loop {
            self.step().await;
            let detail = get(admin, id).await;
            if done(&detail) {
                return detail;
            }
            assert!(
                start.elapsed() < limit,
                "rollout {id} did not get there in {limit:?}: {detail:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A control plane on a fresh database.
pub struct Fleet {
    pub server: TestServer,
    pub db: TestDb,
    pub dir: tempfile::TempDir,
}

impl Fleet {
    pub async fn new(backend: Backend) -> Fleet {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path()).await;
        let server = TestServer::start(super::config(dir.path(), &db)).await;
        Fleet { server, db, dir }
    }

    pub async fn finish(self) {
        self.server.stop().await;
        self.db.cleanup().await;
    }

    /// A fresh pos-x1 till enrolled in `store`: (device id, credential).
    pub async fn enroll(&self, store: &str) -> (String, String) {
        let mut admin = self.server.admin().await;
        let token = admin.token(store, 1, 0).await.unwrap().secret;
        let response = self
            .server
            .agent()
            .await
            .enroll(enroll_request_for(&new_key(), &token, "SN-1", "pos-x1"))
            .await
            .unwrap()
            .into_inner();
        (response.device_id, response.device_credential)
    }
}

/// Stores `s1`..`s{stores}` with `tills` enrolled tills each, running
/// pos-app `installed` (if any), and pos-app 1.0.0, 1.1.0 and 1.2.0
/// published.
pub async fn fleet(
    backend: Backend,
    stores: usize,
    tills: usize,
    installed: Option<&str>,
) -> (Fleet, Admin, Sim, SigningKey) {
    let s = Fleet::new(backend).await;
    let mut admin = s.server.admin().await;
    let key = admin.init_repository().await;
    for version in ["1.0.0", "1.1.0", "1.2.0"] {
        admin
            .publish(&key, APP, version, Kind::Software, &["pos-x1"])
            .await;
    }
    let mut sim = Sim {
        tills: Vec::new(),
        bad: BTreeSet::new(),
        agent: s.server.agent().await,
        signals: None,
    };
    for store in 1..=stores {
        let store = format!("s{store}");
        admin.store(&store).await;
        for _ in 0..tills {
            let (id, credential) = s.enroll(&store).await;
            sim.tills.push(Till {
                id,
                credential,
                active: installed.map(str::to_string),
                working: None,
                given_up: BTreeSet::new(),
                silent: false,
                reported_until: now_ms().div_euclid(60_000),
            });
        }
    }
    // One step: every till tells the control plane what it runs (written
    // by the heartbeat writer a moment later).
    sim.step().await;
    if let Some(version) = installed {
        let ids: Vec<String> = sim.tills.iter().map(|t| t.id.clone()).collect();
        for id in ids {
            super::eventually(&mut admin, &id, |d| {
                d.installed_bundles.get(APP).map(String::as_str) == Some(version)
            })
            .await;
        }
    }
    (s, admin, sim, key)
}

pub fn count(n: u32) -> v1::WaveSpec {
    v1::WaveSpec {
        size: Some(Size::Count(n)),
    }
}

pub fn percent(p: f64) -> v1::WaveSpec {
    v1::WaveSpec {
        size: Some(Size::Percent(p)),
    }
}

pub fn stores(ids: &[&str]) -> v1::WaveSpec {
    v1::WaveSpec {
        size: Some(Size::Stores(v1::StoreList {
            store_ids: ids.iter().map(|s| s.to_string()).collect(),
        })),
    }
}

pub fn strategy(waves: Vec<v1::WaveSpec>) -> v1::RolloutStrategy {
    v1::RolloutStrategy {
        waves,
        wave_unit: v1::WaveUnit::Devices as i32,
        bake_seconds: 0,
        max_failures_percent: 5.0,
        min_failures: 1,
        device_timeout_seconds: 0,
        max_unavailable_per_store: 1,
        download_ahead: None,
        emergency: false,
    }
}

pub fn request(
    version: &str,
    selector: v1::RolloutSelector,
    strategy: v1::RolloutStrategy,
) -> v1::CreateRolloutRequest {
    v1::CreateRolloutRequest {
        analysis_policy: String::new(),
        bundle_name: APP.into(),
        bundle_version: version.into(),
        selector: Some(selector),
        strategy: Some(strategy),
    }
}

pub async fn create(
    admin: &mut Admin,
    req: v1::CreateRolloutRequest,
) -> Result<v1::Rollout, tonic::Status> {
    let req = admin.req(req);
    admin
        .client
        .create_rollout(req)
        .await
        .map(|r| r.into_inner())
}

pub fn rollout_request(id: &str, reason: &str) -> v1::RolloutRequest {
    v1::RolloutRequest {
        id: id.into(),
        reason: reason.into(),
    }
}

pub async fn start(admin: &mut Admin, id: &str) -> Result<v1::Rollout, tonic::Status> {
    let req = admin.req(rollout_request(id, ""));
    admin
        .client
        .start_rollout(req)
        .await
        .map(|r| r.into_inner())
}

pub async fn get(admin: &mut Admin, id: &str) -> v1::RolloutDetail {
    let req = admin.req(rollout_request(id, ""));
    admin.client.get_rollout(req).await.unwrap().into_inner()
}

pub fn state(detail: &v1::RolloutDetail) -> v1::RolloutState {
    detail.rollout.as_ref().unwrap().state()
}

/// Every event of a rollout, in order.
pub async fn events(admin: &mut Admin, id: &str) -> Vec<v1::Event> {
    let mut all = Vec::new();
    loop {
        let req = admin.req(v1::ListEventsRequest {
            rollout_id: id.into(),
            after_seq: all.last().map_or(0, |e: &v1::Event| e.seq),
            limit: 1000,
        });
        let page = admin
            .client
            .list_events(req)
            .await
            .unwrap()
            .into_inner()
            .events;
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

pub fn data(e: &v1::Event) -> serde_json::Value {
    serde_json::from_str(&e.data_json).unwrap()
}
