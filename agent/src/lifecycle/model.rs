//! What the lifecycle works with: the desired state the control plane
//! hands out (kept in `desired.json`), and each bundle's status as the
//! agent keeps it (`bundles.json`) and reports it.

use chrono::{DateTime, Utc};
use posfleet_bundle::manifest::Kind;
use posfleet_proto::v1;
use semver::Version;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::window::Window;

/// One bundle the control plane wants on this device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub name: String,
    pub version: Version,
    pub kind: Kind,
    pub download_ahead: bool,
    pub emergency: bool,
    /// A sanctioned step back to a version this till kept.
    #[serde(default)]
    pub rollback: bool,
}

/// The desired state last received, kept on disk so the agent goes on
/// working towards it while the control plane is unreachable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub bundles: Vec<Desired>,
    pub window: Option<Window>,
}

impl DesiredState {
    /// Reads a heartbeat response. Entries the agent cannot use (bad
    /// version, unknown kind) are skipped with a warning, not fatal.
    pub fn from_response(response: &v1::HeartbeatResponse) -> DesiredState {
        let mut bundles: Vec<Desired> = response
            .desired_bundles
            .iter()
            .filter_map(|d| {
                let version = Version::parse(&d.version).ok();
                let kind = match v1::BundleKind::try_from(d.kind) {
                    Ok(v1::BundleKind::Software) => Some(Kind::Software),
                    Ok(v1::BundleKind::Catalog) => Some(Kind::Catalog),
                    Ok(v1::BundleKind::Agent) => Some(Kind::Agent),
                    _ => None,
                };
                let valid_name = !d.name.is_empty()
                    && d.name.len() <= 64
                    && d
                        .name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
                match (version, kind, valid_name) {
                    (Some(version), Some(kind), true) => Some(Desired {
                        name: d.name.clone(),
                        version,
                        kind,
                        download_ahead: d.download_ahead,
                        emergency: d.emergency,
                        rollback: d.rollback,
                    }),
                    _ => {
                        tracing::warn!(bundle = %d.name, version = %d.version, "Ignoring a desired bundle the agent cannot read.");
                        None
                    }
                }
            })
            .collect();
        bundles.sort_by(|a, b| a.name.cmp(&b.name));
        bundles.dedup_by(|a, b| a.name == b.name);
        let window = response.maintenance_window.as_ref().map(|w| Window {
            time_zone: w.time_zone.clone(),
            start_minute: w.start_minute,
            duration_minutes: w.duration_minutes,
        });
        DesiredState { bundles, window }
    }

    /// Whether installs may happen at `now`.
    pub fn window_open(&self, now: DateTime<Utc>) -> bool {
        self.window.as_ref().is_none_or(|w| w.is_open(now))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Pending,
    Downloading,
    Downloaded,
    Installing,
    Installed,
    Failed,
    RolledBack,
}

/// What the agent reports about one bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub kind: Kind,
    pub active_version: Option<Version>,
    pub target_version: Option<Version>,
    pub phase: Phase,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub error: String,
    /// Unix milliseconds.
    pub updated_at_ms: i64,
    /// The target version failed in a way retrying cannot fix (unhealthy,
    /// refused archive): the agent waits for a different desired version.
    #[serde(default)]
    pub given_up: bool,
    /// Installs of the target version cut short by the agent stopping
    /// before the health check confirmed it.
    #[serde(default)]
    pub interrupted: u32,
    /// Verified bytes of the target version received from the control
    /// plane and from the store's other tills.
    #[serde(default)]
    pub bytes_from_origin: u64,
    #[serde(default)]
    pub bytes_from_peers: u64,
    /// Bytes of the target version not downloaded because it was rebuilt
    /// from a delta against the version this till had.
    #[serde(default)]
    pub bytes_saved_by_delta: u64,
    /// Why the delta offered for the target version was not used (the
    /// whole bundle is fetched instead, and the delta not tried again).
    #[serde(default)]
    pub delta_error: String,
}

impl Status {
    /// A bundle's first status: nothing active or done yet.
    pub fn new(name: &str, kind: Kind, phase: Phase, updated_at_ms: i64) -> Status {
        Status {
            name: name.to_string(),
            kind,
            active_version: None,
            target_version: None,
            phase,
            bytes_done: 0,
            bytes_total: 0,
            error: String::new(),
            updated_at_ms,
            given_up: false,
            interrupted: 0,
            bytes_from_origin: 0,
            bytes_from_peers: 0,
            bytes_saved_by_delta: 0,
            delta_error: String::new(),
        }
    }

    pub fn to_proto(&self) -> v1::BundleStatus {
        let phase = match self.phase {
            Phase::Pending => v1::BundlePhase::Pending,
            Phase::Downloading => v1::BundlePhase::Downloading,
            Phase::Downloaded => v1::BundlePhase::Downloaded,
            Phase::Installing => v1::BundlePhase::Installing,
            Phase::Installed => v1::BundlePhase::Installed,
            Phase::Failed => v1::BundlePhase::Failed,
            Phase::RolledBack => v1::BundlePhase::RolledBack,
        };
        v1::BundleStatus {
            name: self.name.clone(),
            kind: match self.kind {
                Kind::Software => v1::BundleKind::Software,
                Kind::Catalog => v1::BundleKind::Catalog,
                Kind::Agent => v1::BundleKind::Agent,
            } as i32,
            active_version: version_string(&self.active_version),
            target_version: version_string(&self.target_version),
            phase: phase as i32,
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
            error: self.error.clone(),
            updated_at_unix_ms: self.updated_at_ms,
            bytes_from_origin: self.bytes_from_origin,
            bytes_from_peers: self.bytes_from_peers,
            bytes_saved_by_delta: self.bytes_saved_by_delta,
            delta_error: self.delta_error.clone(),
        }
    }
}

fn version_string(v: &Option<Version>) -> String {
    v.as_ref().map(Version::to_string).unwrap_or_default()
}

/// Statuses as reported to the control plane, by bundle name.
pub type Report = BTreeMap<String, v1::BundleStatus>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_state_skips_what_it_cannot_read() {
        let bundle = |name: &str, version: &str, kind: v1::BundleKind| v1::DesiredBundle {
            name: name.into(),
            version: version.into(),
            kind: kind as i32,
            download_ahead: true,
            emergency: false,
            rollback: false,
        };
        let response = v1::HeartbeatResponse {
            desired_bundles: vec![
                bundle("pos-app", "1.1.0", v1::BundleKind::Software),
                bundle("catalog-paris", "not-semver", v1::BundleKind::Catalog),
                bundle("../etc", "1.0.0", v1::BundleKind::Software),
                bundle("other", "1.0.0", v1::BundleKind::Unspecified),
            ],
            maintenance_window: Some(v1::MaintenanceWindow {
                time_zone: "Europe/Paris".into(),
                start_minute: 120,
                duration_minutes: 60,
            }),
            ..Default::default()
        };
        let state = DesiredState::from_response(&response);
        assert_eq!(state.bundles.len(), 1);
        assert_eq!(state.bundles[0].name, "pos-app");
        let window = state.window.as_ref().unwrap();
        assert_eq!((window.start_minute, window.duration_minutes), (120, 60));
        let inside = DateTime::parse_from_rfc3339("2026-06-01T00:30:00Z").unwrap();
        assert!(state.window_open(inside.with_timezone(&Utc)));
        let outside = DateTime::parse_from_rfc3339("2026-06-01T12:00:00Z").unwrap();
        assert!(!state.window_open(outside.with_timezone(&Utc)));
        assert!(DesiredState::default().window_open(Utc::now()));
    }
}
