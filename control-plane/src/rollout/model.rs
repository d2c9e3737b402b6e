//! What a rollout is: its states, the devices' states, its selector and
//! strategy, as stored (`rollouts.selector_json`, `strategy_json`) and as
//! the API shows them.

use posfleet_proto::v1;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A device that has not succeeded this long after it was notified (window
/// time, see `decide::timed_out`) counts as timed out, unless the strategy
/// says otherwise.
pub const DEFAULT_DEVICE_TIMEOUT_SECONDS: u64 = 24 * 3600;

/// `draft → running ⇄ paused → completed | aborted | rolled_back`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RolloutState {
    Draft,
    Running,
    Paused,
    Completed,
    Aborted,
    RolledBack,
}

impl RolloutState {
    pub const ALL: [RolloutState; 6] = [
        RolloutState::Draft,
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Completed,
        RolloutState::Aborted,
        RolloutState::RolledBack,
    ];

    /// How it is stored, and the word the API and events use.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Draft => "draft",
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Completed => "completed",
            RolloutState::Aborted => "aborted",
            RolloutState::RolledBack => "rolled_back",
        }
    }

    pub fn parse(s: &str) -> Option<RolloutState> {
        RolloutState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
    }

    /// No operation leads out of it.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutState::Completed | RolloutState::Aborted | RolloutState::RolledBack
        )
    }

    pub fn to_proto(self) -> v1::RolloutState {
        match self {
            RolloutState::Draft => v1::RolloutState::Draft,
            RolloutState::Running => v1::RolloutState::Running,
            RolloutState::Paused => v1::RolloutState::Paused,
            RolloutState::Completed => v1::RolloutState::Completed,
            RolloutState::Aborted => v1::RolloutState::Aborted,
            RolloutState::RolledBack => v1::RolloutState::RolledBack,
        }
    }

    pub fn from_proto(state: v1::RolloutState) -> Option<RolloutState> {
        RolloutState::ALL
            .into_iter()
            .find(|s| s.to_proto() == state)
    }
}

/// A device within a rollout: `pending → notified → downloading →
/// installing → succeeded | failed | rolled_back | timed_out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceState {
    /// In the rollout, not dispatched yet.
    Pending,
    /// Its desired state names the release; nothing reported yet.
    Notified,
    /// Fetching the release, or holding it and waiting for its window.
    Downloading,
    Installing,
    Succeeded,
    /// The till could not fetch or install the release.
    Failed,
    /// Back on its previous version: the till's health check refused the
    /// release, or the rollout was rolled back.
    RolledBack,
    /// Not done within the device timeout.
    TimedOut,
}

impl DeviceState {
    pub const ALL: [DeviceState; 8] = [
        DeviceState::Pending,
        DeviceState::Notified,
        DeviceState::Downloading,
        DeviceState::Installing,
        DeviceState::Succeeded,
        DeviceState::Failed,
        DeviceState::RolledBack,
        DeviceState::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Pending => "pending",
            DeviceState::Notified => "notified",
            DeviceState::Downloading => "downloading",
            DeviceState::Installing => "installing",
            DeviceState::Succeeded => "succeeded",
            DeviceState::Failed => "failed",
            DeviceState::RolledBack => "rolled_back",
            DeviceState::TimedOut => "timed_out",
        }
    }

    pub fn parse(s: &str) -> Option<DeviceState> {
        DeviceState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
    }

    /// Dispatched and not done: the till may be installing. These count
    /// against its store's `max_unavailable`.
    pub fn is_in_flight(self) -> bool {
        matches!(
            self,
            DeviceState::Notified | DeviceState::Downloading | DeviceState::Installing
        )
    }

    /// Done, one way or the other.
    pub fn is_done(self) -> bool {
        matches!(
            self,
            DeviceState::Succeeded
                | DeviceState::Failed
                | DeviceState::RolledBack
                | DeviceState::TimedOut
        )
    }

    /// Counts against the wave's failure threshold.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            DeviceState::Failed | DeviceState::RolledBack | DeviceState::TimedOut
        )
    }

    pub fn to_proto(self) -> v1::RolloutDeviceState {
        match self {
            DeviceState::Pending => v1::RolloutDeviceState::Pending,
            DeviceState::Notified => v1::RolloutDeviceState::Notified,
            DeviceState::Downloading => v1::RolloutDeviceState::Downloading,
            DeviceState::Installing => v1::RolloutDeviceState::Installing,
            DeviceState::Succeeded => v1::RolloutDeviceState::Succeeded,
            DeviceState::Failed => v1::RolloutDeviceState::Failed,
            DeviceState::RolledBack => v1::RolloutDeviceState::RolledBack,
            DeviceState::TimedOut => v1::RolloutDeviceState::TimedOut,
        }
    }
}

/// Devices by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts([u64; 8]);

impl Counts {
    pub fn add(&mut self, state: DeviceState, n: u64) {
        self.0[state as usize] += n;
    }

    pub fn get(&self, state: DeviceState) -> u64 {
        self.0[state as usize]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    pub fn failures(&self) -> u64 {
        DeviceState::ALL
            .into_iter()
            .filter(|s| s.is_failure())
            .map(|s| self.get(s))
            .sum()
    }

    pub fn in_flight(&self) -> u64 {
        DeviceState::ALL
            .into_iter()
            .filter(|s| s.is_in_flight())
            .map(|s| self.get(s))
            .sum()
    }

    /// Every device is done (true for no device at all).
    pub fn all_done(&self) -> bool {
        self.get(DeviceState::Pending) == 0 && self.in_flight() == 0
    }

    pub fn to_proto(self) -> v1::DeviceCounts {
        v1::DeviceCounts {
            pending: self.get(DeviceState::Pending),
            notified: self.get(DeviceState::Notified),
            downloading: self.get(DeviceState::Downloading),
            installing: self.get(DeviceState::Installing),
            succeeded: self.get(DeviceState::Succeeded),
            failed: self.get(DeviceState::Failed),
            rolled_back: self.get(DeviceState::RolledBack),
            timed_out: self.get(DeviceState::TimedOut),
        }
    }
}

/// Which devices a rollout covers; every part that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    #[serde(default)]
    pub store_ids: Vec<String>,
    #[serde(default)]
    pub store_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub device_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub hardware_model: String,
    /// The device's active version of the release's bundle ("" for any).
    #[serde(default)]
    pub installed_version: String,
}

impl Selector {
    pub fn from_proto(s: v1::RolloutSelector) -> Selector {
        let mut store_ids = s.store_ids;
        store_ids.sort();
        store_ids.dedup();
        Selector {
            store_ids,
            store_labels: s.store_labels.into_iter().collect(),
            device_labels: s.device_labels.into_iter().collect(),
            hardware_model: s.hardware_model,
            installed_version: s.installed_version,
        }
    }

    pub fn to_proto(&self) -> v1::RolloutSelector {
        v1::RolloutSelector {
            store_ids: self.store_ids.clone(),
            store_labels: self.store_labels.clone().into_iter().collect(),
            device_labels: self.device_labels.clone().into_iter().collect(),
            hardware_model: self.hardware_model.clone(),
            installed_version: self.installed_version.clone(),
        }
    }
}

/// The cumulative size of a wave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveSize {
    /// Up to this many devices (or stores) in all.
    Count(u32),
    /// Up to this percentage of them in all, rounded up.
    Percent(f64),
    /// Exactly the selected devices of these stores (a canary wave).
    Stores(Vec<String>),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveUnit {
    #[default]
    Devices,
    Stores,
}

/// How a rollout proceeds, with the server's defaults applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Strategy {
    pub waves: Vec<WaveSize>,
    pub wave_unit: WaveUnit,
    pub bake_seconds: u64,
    pub max_failures_percent: f64,
    /// At least 1.
    pub min_failures: u32,
    pub device_timeout_seconds: u64,
    /// At least 1.
    pub max_unavailable_per_store: u32,
    pub download_ahead: bool,
    pub emergency: bool,
}

impl Strategy {
    /// Defaults applied: 0 timeout is 24 h, 0 max_unavailable and 0
    /// min_failures are 1. The caller validates the rest.
    pub fn from_proto(s: v1::RolloutStrategy) -> Strategy {
        use v1::wave_spec::Size;
        Strategy {
            waves: s
                .waves
                .into_iter()
                .map(|w| match w.size {
                    Some(Size::Count(n)) => WaveSize::Count(n),
                    Some(Size::Percent(p)) => WaveSize::Percent(p),
                    Some(Size::Stores(list)) => WaveSize::Stores(list.store_ids),
                    // Refused by validation; reads as an empty wave.
                    None => WaveSize::Count(0),
                })
                .collect(),
            wave_unit: match v1::WaveUnit::try_from(s.wave_unit) {
                Ok(v1::WaveUnit::Stores) => WaveUnit::Stores,
                _ => WaveUnit::Devices,
            },
            bake_seconds: s.bake_seconds,
            max_failures_percent: s.max_failures_percent,
            min_failures: s.min_failures.max(1),
            device_timeout_seconds: match s.device_timeout_seconds {
                0 => DEFAULT_DEVICE_TIMEOUT_SECONDS,
                n => n,
            },
            max_unavailable_per_store: s.max_unavailable_per_store.max(1),
            download_ahead: s.download_ahead.unwrap_or(true),
            emergency: s.emergency,
        }
    }

    pub fn to_proto(&self) -> v1::RolloutStrategy {
        use v1::wave_spec::Size;
        v1::RolloutStrategy {
            waves: self
                .waves
                .iter()
                .map(|w| v1::WaveSpec {
                    size: Some(match w {
                        WaveSize::Count(n) => Size::Count(*n),
                        WaveSize::Percent(p) => Size::Percent(*p),
                        WaveSize::Stores(ids) => Size::Stores(v1::StoreList {
                            store_ids: ids.clone(),
                        }),
                    }),
                })
                .collect(),
            wave_unit: match self.wave_unit {
                WaveUnit::Devices => v1::WaveUnit::Devices,
                WaveUnit::Stores => v1::WaveUnit::Stores,
            } as i32,
            bake_seconds: self.bake_seconds,
            max_failures_percent: self.max_failures_percent,
            min_failures: self.min_failures,
            device_timeout_seconds: self.device_timeout_seconds,
            max_unavailable_per_store: self.max_unavailable_per_store,
            download_ahead: Some(self.download_ahead),
            emergency: self.emergency,
        }
    }

    /// The wave (if any) that names this store.
    pub fn canary_wave_of(&self, store_id: &str) -> Option<usize> {
        self.waves
            .iter()
            .position(|w| matches!(w, WaveSize::Stores(ids) if ids.iter().any(|s| s == store_id)))
    }
}
