//! A control plane and stores of tills, started the way every end-to-end
//! test and benchmark needs them: one builder, so a change to how a till is
//! started (its flags, its enrollment) is made once.
//!
//! ```no_run
//! use posfleet_e2e::fleet::Fleet;
//! let mut fleet = Fleet::builder().start();
//! fleet.publish("1.0.0", true, 0);
//! fleet.store("lyon-01", 3, &[]);
//! fleet.assign("lyon-01", "pos-app@1.0.0");
//! fleet.wait_until_active(&["lyon-01"], "1.0.0");
//! ```

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{ControlPlane, Process, check_ok, eventually, pos_app_source, start_agent};

/// How long a fleet's waits last before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(180);

/// How a fleet's control plane starts.
pub struct FleetBuilder {
    database_url: Option<String>,
    control_plane_args: Vec<String>,
    standby_replicas: usize,
}

impl FleetBuilder {
    /// PostgreSQL at `url` (`None`: SQLite in the fleet's folder).
    pub fn database_url(mut self, url: Option<&str>) -> FleetBuilder {
        self.database_url = url.map(str::to_string);
        self
    }

    /// More control-plane flags (besides a 1 s heartbeat interval).
    pub fn control_plane_args(mut self, args: &[&str]) -> FleetBuilder {
        self.control_plane_args
            .extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Replicas on the same database and data dir started before the one
    /// that serves tills and the CLI: the first of them runs the rollout
    /// engine (PostgreSQL only).
    pub fn standby_replicas(mut self, count: usize) -> FleetBuilder {
        self.standby_replicas = count;
        self
    }

    /// Starts the control plane (and the standby replicas) and creates the
    /// repository's keys.
    pub fn start(self) -> Fleet {
        let dir = tempfile::tempdir().expect("temp dir");
        let args: Vec<&str> = self.control_plane_args.iter().map(String::as_str).collect();
        let url = self.database_url.as_deref();
        let standby: Vec<ControlPlane> = (0..self.standby_replicas)
            .map(|_| start_control_plane(&dir.path().join("cp"), url, &args))
            .collect();
        if let Some(first) = standby.first() {
            eventually("the first replica runs the engine", TIMEOUT, || {
                (first.metric("posfleet_rollout_engine_leader") == 1.0).then_some(())
            });
        }
        let cp = start_control_plane(&dir.path().join("cp"), url, &args);
        let keys = dir.path().join("keys");
        cp.init_repository(&keys);
        Fleet {
            dir,
            cp,
            standby,
            keys,
            tills: Vec::new(),
            control_plane_args: self.control_plane_args,
        }
    }
}

fn start_control_plane(
    data_dir: &Path,
    database_url: Option<&str>,
    extra: &[&str],
) -> ControlPlane {
    let mut args = vec!["--heartbeat-interval-seconds", "1"];
    args.extend_from_slice(extra);
    ControlPlane::start(data_dir, database_url, "127.0.0.1:0", "127.0.0.1:0", &args)
}

/// One till of a fleet.
pub struct Till {
    pub store: String,
    pub data: PathBuf,
    pub process: Process,
    /// The agent flags it runs with (besides the control plane's address,
    /// its data dir and its token), to start it again the same way.
    pub args: Vec<String>,
}

impl Till {
    /// The device id it enrolled as.
    pub fn device_id(&self) -> String {
        eventually("the till enrolled", TIMEOUT, || {
            crate::enrolled_device_id(&self.data)
        })
    }
}

/// A running control plane, its repository keys, and the tills started in
/// its stores. Everything lives in one temporary folder.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    /// Serves the tills and the CLI.
    pub cp: ControlPlane,
    /// Replicas started before `cp` (see [`FleetBuilder::standby_replicas`]).
    pub standby: Vec<ControlPlane>,
    pub keys: PathBuf,
    pub tills: Vec<Till>,
    control_plane_args: Vec<String>,
}

/// A store to open and fill with tills.
pub struct StoreSpec<'a> {
    pub name: &'a str,
    pub time_zone: &'a str,
    pub tills: usize,
    /// More agent flags for its tills.
    pub agent_args: &'a [&'a str],
    /// Where its tills reach the bundle repository (through a
    /// [`crate::link::PacedLink`], say), when not the control plane directly.
    pub repository_url: Option<&'a str>,
}

impl<'a> StoreSpec<'a> {
    pub fn new(name: &'a str, tills: usize) -> StoreSpec<'a> {
        StoreSpec {
            name,
            time_zone: "UTC",
            tills,
            agent_args: &[],
            repository_url: None,
        }
    }
}

impl Fleet {
    pub fn builder() -> FleetBuilder {
        FleetBuilder {
            database_url: None,
            control_plane_args: Vec::new(),
            standby_replicas: 0,
        }
    }

    /// Opens `store` (UTC) and starts `count` tills in it with `extra`
    /// agent flags; returns their indexes in `tills`.
    pub fn store(&mut self, store: &str, count: usize, extra: &[&str]) -> std::ops::Range<usize> {
        self.open_store(&StoreSpec {
            agent_args: extra,
            ..StoreSpec::new(store, count)
        })
    }

    /// Opens a store as `spec` says and starts its tills; returns their
    /// indexes in `tills`.
    pub fn open_store(&mut self, spec: &StoreSpec) -> std::ops::Range<usize> {
        self.create_store(spec.name, spec.time_zone);
        let token = self.enrollment_token(spec.name, spec.tills);
        let args = self.agent_args(spec.repository_url, spec.agent_args);
        let first = self.tills.len();
        for till in 0..spec.tills {
            let data = self.dir.path().join(format!("{}-{till}", spec.name));
            self.start_till(spec.name, &data, &token, args.clone());
        }
        first..self.tills.len()
    }

    /// `posfleet store create`.
    pub fn create_store(&self, store: &str, time_zone: &str) {
        self.cp.create_store(store, time_zone);
    }

    /// A new enrollment token for `uses` tills of `store`; returns its secret.
    pub fn enrollment_token(&self, store: &str, uses: usize) -> String {
        let token = self.cp.cli_json(&[
            "enroll-token",
            "create",
            "--store",
            store,
            "--uses",
            &uses.to_string(),
        ]);
        token["secret"].as_str().expect("secret").to_string()
    }

    /// The flags a till of this fleet runs with: the pinned root, the
    /// repository (`repository_url`, or the control plane's), a 1 s install
    /// check, then `extra`.
    pub fn agent_args(&self, repository_url: Option<&str>, extra: &[&str]) -> Vec<String> {
        let mut args = self.cp.repository_args(&self.keys);
        if let Some(url) = repository_url {
            let at = args
                .iter()
                .position(|a| a == "--repository-url")
                .expect("repository_args names the repository");
            args[at + 1] = url.to_string();
        }
        args.extend(["--install-check-interval-seconds".into(), "1".into()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    }

    /// Starts a till of `store` in `data` with `token` and `args`; returns
    /// its index in `tills`.
    pub fn start_till(
        &mut self,
        store: &str,
        data: &Path,
        token: &str,
        args: Vec<String>,
    ) -> usize {
        let process = self.spawn_agent(data, token, &args);
        self.tills.push(Till {
            store: store.to_string(),
            data: data.to_path_buf(),
            process,
            args,
        });
        self.tills.len() - 1
    }

    /// Starts till `index` again, as it was started (it is enrolled: no
    /// token).
    pub fn restart_till(&mut self, index: usize) {
        let till = &self.tills[index];
        let process = self.spawn_agent(&till.data, "", &till.args);
        self.tills[index].process = process;
    }

    /// Starts an agent in `data` with `token` and `args` that the caller
    /// holds (it is not one of `tills`).
    pub fn spawn_agent(&self, data: &Path, token: &str, args: &[String]) -> Process {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        start_agent(&self.cp.url(), data, token, &args)
    }

    /// Starts the serving control plane again on its addresses (after a
    /// kill), with the flags it had.
    pub fn restart_control_plane(&mut self) {
        let args: Vec<&str> = self.control_plane_args.iter().map(String::as_str).collect();
        let mut all = vec!["--heartbeat-interval-seconds", "1"];
        all.extend_from_slice(&args);
        self.cp = ControlPlane::start(
            &self.cp.data_dir,
            self.cp.database_url.as_deref(),
            &self.cp.grpc_address,
            &self.cp.http_address,
            &all,
        );
    }

    /// Builds and publishes pos-app `version` (its health check passing or
    /// not, with `payload` incompressible bytes); returns the bundle's size.
    pub fn publish(&self, version: &str, healthy: bool, payload: usize) -> u64 {
        let src = self.dir.path().join(format!("pos-app-{version}"));
        pos_app_source(&src, version, healthy, payload);
        let file = self.cp.publish(&src, &self.keys);
        std::fs::metadata(file).expect("bundle file").len()
    }

    /// Builds and publishes pos-app `version` with `conf` as its
    /// `pos-app.conf` (how its supervised program behaves: see the file in
    /// `examples/pos-app`).
    pub fn publish_configured(&self, version: &str, conf: &str) {
        let src = self.dir.path().join(format!("pos-app-{version}"));
        pos_app_source(&src, version, true, 0);
        std::fs::write(src.join("pos-app.conf"), conf).expect("write conf");
        self.cp.publish(&src, &self.keys);
    }

    /// Publishes pos-app `version` as the release `base` (published with
    /// [`Fleet::publish`]) with only its version changed, and a signed delta
    /// to it from `base`: with `base_file`, from the base's bundle file
    /// (`bundle publish --delta-from`), else as `bundle publish` makes them
    /// by default (from the versions tills run, fetched from the control
    /// plane). Returns the new bundle's size and the delta's.
    pub fn publish_with_delta(&self, version: &str, base: &str, base_file: bool) -> (u64, u64) {
        let base_src = self.dir.path().join(format!("pos-app-{base}"));
        let src = self.dir.path().join(format!("pos-app-{version}"));
        crate::copy_tree(&base_src, &src);
        let manifest = src.join("posfleet-bundle.toml");
        let text = std::fs::read_to_string(&manifest).expect("read manifest");
        let text = text.replace(
            &format!("version = \"{base}\""),
            &format!("version = \"{version}\""),
        );
        std::fs::write(&manifest, text).expect("write manifest");
        let file = self.cp.build_bundle(&src, &src.with_extension("bundle"));
        let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
        let mut args = vec![
            "bundle".to_string(),
            "publish".into(),
            path(&file),
            "--keys".into(),
            path(&self.keys),
        ];
        if base_file {
            args.extend([
                "--delta-from".into(),
                path(&base_src.with_extension("bundle")),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        check_ok(self.cp.cli(&args));
        let delta = format!("pos-app/{version}/from-{base}.delta");
        let listed = self.cp.cli_json(&["bundle", "list"]);
        let length = listed
            .as_array()
            .and_then(|l| l.iter().find(|b| b["target"] == delta.as_str()))
            .and_then(|b| b["length"].as_u64())
            .unwrap_or_else(|| panic!("{delta} is not listed: {listed}"));
        (std::fs::metadata(&file).expect("bundle file").len(), length)
    }

    /// `posfleet device assign --store STORE RELEASE` (`name@version`).
    pub fn assign(&self, store: &str, release: &str) {
        check_ok(
            self.cp
                .cli(&["device", "assign", "--store", store, release]),
        );
    }

    /// `posfleet device list`.
    pub fn devices(&self) -> Vec<Value> {
        self.cp
            .cli_json(&["device", "list"])
            .as_array()
            .expect("a JSON array")
            .clone()
    }

    /// Waits until every till of `stores` runs pos-app `version` (as ops see
    /// it, `installed_bundles`), and the stores have as many devices as
    /// tills were started in them.
    pub fn wait_until_active(&self, stores: &[&str], version: &str) {
        let count = self
            .tills
            .iter()
            .filter(|t| stores.contains(&t.store.as_str()))
            .count();
        eventually(&format!("{stores:?} on pos-app {version}"), TIMEOUT, || {
            let devices: Vec<Value> = self
                .devices()
                .into_iter()
                .filter(|d| stores.contains(&d["store_id"].as_str().unwrap_or_default()))
                .collect();
            (devices.len() == count
                && devices
                    .iter()
                    .all(|d| d["installed_bundles"]["pos-app"] == version))
            .then_some(())
        });
    }

    /// Waits until every till of `store` holds a membership list naming
    /// `count` tills and has been connected to each of the others (members
    /// are dialed as soon as the list arrives; on a loaded machine that
    /// takes a while, and tills that cannot see each other yet each fetch
    /// from the origin, as they should).
    pub fn wait_for_membership(&self, store: &str, count: usize) {
        for till in self.tills.iter().filter(|t| t.store == store) {
            eventually("the store's membership list", TIMEOUT, || {
                logged(&till.process, "Store membership list updated.")
                    .last()
                    .filter(|v| v["members"] == count)
                    .map(|_| ())
            });
        }
        for till in self.tills.iter().filter(|t| t.store == store) {
            eventually("connections to the store's other tills", TIMEOUT, || {
                let peers: std::collections::HashSet<String> =
                    logged(&till.process, "Store peer connected.")
                        .iter()
                        .filter_map(|v| v["peer_id"].as_str().map(str::to_string))
                        .collect();
                (peers.len() + 1 >= count).then_some(())
            });
        }
    }
}

/// The log lines of `process` with this message, parsed.
pub fn logged(process: &Process, message: &str) -> Vec<Value> {
    process
        .lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

/// Checks that the payload in a till's active pos-app slot is the one
/// published (its digest ships beside it).
pub fn assert_slot_whole(data: &Path) {
    use sha2::Digest;
    let slot = data.join("slots/pos-app/current");
    let want = std::fs::read_to_string(slot.join("payload.sha256")).expect("payload digest");
    let have = hex::encode(sha2::Sha256::digest(
        std::fs::read(slot.join("payload.bin")).expect("payload"),
    ));
    assert_eq!(have, want.trim(), "{}", data.display());
}
