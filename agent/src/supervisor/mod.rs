//! The supervisor: runs the `[service]` of each software bundle's active
//! version (the one `slots/<name>/current` names), and its periodic health
//! check (`[health_check] interval_seconds`), as `hook_user`, in the slot,
//! with the signal socket in `POSFLEET_SIGNAL_SOCKET`.
//!
//! It knows nothing of installs: once a second it compares what runs with
//! the active versions, stops what is no longer active (SIGTERM, then
//! SIGKILL) and starts what is. An install or a rollback that switches
//! `current` is followed within a second.
//!
//! - `decide`: what to stop and start, and the restart delays, no I/O;
//! - `service`: one version's service and health check;
//! - `leftovers`: notes of the running services, so that the programs of
//!   an agent killed outright are killed when the next one starts.

mod decide;
mod leftovers;
mod service;

use posfleet_bundle::manifest::{Kind, MANIFEST_FILE, Manifest};
use semver::Version;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::hooks::HookUser;
use crate::install::Slots;
use crate::signals::Signals;
use service::Unit;

/// How often what runs is compared with the active versions.
const RECONCILE: Duration = Duration::from_secs(1);
/// How long a service has to stop on SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What every supervised program shares.
pub struct Context {
    pub signals: Signals,
    /// The local API's socket, for `POSFLEET_SIGNAL_SOCKET`.
    pub socket: PathBuf,
    /// The agent's executable, for `POSFLEET_AGENT`
    /// (`$POSFLEET_AGENT signal LINE...`), when known.
    pub agent_executable: Option<PathBuf>,
    pub hook_user: Option<HookUser>,
    pub stop_timeout: Duration,
    /// Where the running services are noted (the data dir).
    pub notes: leftovers::Notes,
}

impl Context {
    /// What the supervisor of `data_dir` needs, with the defaults.
    pub fn new(data_dir: &Path, signals: Signals, socket: PathBuf) -> Context {
        Context {
            signals,
            socket,
            agent_executable: None,
            hook_user: None,
            stop_timeout: STOP_TIMEOUT,
            notes: leftovers::Notes::new(data_dir),
        }
    }
}

/// A running unit and how to stop it.
struct Running {
    version: Version,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(error) = self.task.await {
            tracing::error!(%error, "A supervised program's task failed.");
        }
    }
}

pub struct Supervisor {
    slots: Slots,
    context: Arc<Context>,
    running: BTreeMap<String, Running>,
    /// Manifests read, by slot: a slot's manifest never changes.
    manifests: BTreeMap<(String, Version), Option<Unit>>,
}

impl Supervisor {
    pub fn new(slots: Slots, context: Context) -> Supervisor {
        Supervisor {
            slots,
            context: Arc::new(context),
            running: BTreeMap::new(),
            manifests: BTreeMap::new(),
        }
    }

    /// Supervises until `stop` turns true, then stops every program.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        self.context.notes.kill_leftovers();
        loop {
            self.reconcile().await;
            tokio::select! {
                () = tokio::time::sleep(RECONCILE) => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
        }
        let running = std::mem::take(&mut self.running);
        for running in running.values() {
            let _ = running.stop.send(true);
        }
        for (_, running) in running {
            running.stop().await;
        }
    }

    /// Stops and starts programs so that what runs is the active versions'.
    pub async fn reconcile(&mut self) {
        let wanted = self.wanted();
        let running: BTreeMap<String, Version> = self
            .running
            .iter()
            .map(|(name, running)| (name.clone(), running.version.clone()))
            .collect();
        let versions = wanted
            .iter()
            .map(|(name, unit)| (name.clone(), unit.version.clone()))
            .collect();
        let changes = decide::reconcile(&running, &versions);
        for name in changes.stop {
            if let Some(running) = self.running.remove(&name) {
                tracing::info!(bundle = %name, version = %running.version, "Stopping the programs of a version no longer active.");
                running.stop().await;
            }
        }
        for name in changes.start {
            if let Some(unit) = wanted.get(&name) {
                let (stop, stopped) = watch::channel(false);
                let task = tokio::spawn(service::run(unit.clone(), self.context.clone(), stopped));
                self.running.insert(
                    name,
                    Running {
                        version: unit.version.clone(),
                        stop,
                        task,
                    },
                );
            }
        }
    }

    /// The units of the active versions that have something to run.
    /// A bundle whose `current` cannot be read keeps what runs.
    fn wanted(&mut self) -> BTreeMap<String, Unit> {
        let active = match self.slots.active_versions() {
            Ok(active) => active,
            Err(error) => {
                tracing::warn!(%error, "Cannot read the active versions; keeping what runs.");
                return self.running_units();
            }
        };
        let mut wanted = BTreeMap::new();
        for (name, version) in active {
            if let Some(unit) = self.unit(&name, &version) {
                wanted.insert(name, unit);
            }
        }
        wanted
    }

    fn running_units(&self) -> BTreeMap<String, Unit> {
        self.running
            .iter()
            .filter_map(|(name, running)| {
                self.manifests
                    .get(&(name.clone(), running.version.clone()))
                    .cloned()
                    .flatten()
                    .map(|unit| (name.clone(), unit))
            })
            .collect()
    }

    /// What `name` `version` runs, from its manifest (read once).
    fn unit(&mut self, name: &str, version: &Version) -> Option<Unit> {
        let key = (name.to_string(), version.clone());
        if let Some(unit) = self.manifests.get(&key) {
            return unit.clone();
        }
        let slot = self.slots.slot_dir(name, version)?;
        let path = slot.join(MANIFEST_FILE);
        let manifest = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| Manifest::parse(&text, &path).map_err(|e| e.to_string()));
        let unit = match manifest {
            Ok(manifest) if manifest.kind == Kind::Software => {
                let health_check = manifest
                    .health_check
                    .filter(|hook| hook.interval_seconds.is_some());
                (manifest.service.is_some() || health_check.is_some()).then(|| Unit {
                    name: name.to_string(),
                    version: version.clone(),
                    slot,
                    service: manifest.service,
                    health_check,
                })
            }
            Ok(_) => None,
            Err(error) => {
                tracing::error!(bundle = %name, version = %version, %error, "Cannot read the active version's manifest; nothing of it is supervised.");
                None
            }
        };
        self.manifests.insert(key, unit.clone());
        unit
    }
}
