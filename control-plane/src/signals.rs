//! Tills' signal minutes on their way in: checked against the bounds both
//! sides keep (`posfleet_proto::signals`), and kept only for the stores of
//! a wave under canary analysis; every other till's minutes are counted
//! and let go.

use std::collections::HashSet;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use posfleet_proto::signals::{
    MAX_MINUTES_PER_HEARTBEAT, MAX_NAMES, MAX_VALUES_PER_NAME, valid_name,
};
use posfleet_proto::v1;
use tonic::Status;

use crate::storage::{SignalMinuteRecord, Storage};
use crate::validate::invalid;

/// How long minutes are kept: the longest observation a policy may ask
/// for (a week) and a day.
pub const RETENTION_MINUTES: i64 = 8 * 24 * 60;
/// How far ahead of the control plane's clock a till's minute may be.
const MAX_MINUTES_AHEAD: i64 = 2;
/// How often each replica reads which stores are under analysis.
const REFRESH: Duration = Duration::from_secs(5);

/// The stores whose tills' minutes are kept, read every few seconds (a
/// wave that starts is watched from its next refresh on).
#[derive(Default)]
pub struct AnalysedStores {
    stores: Arc<RwLock<HashSet<String>>>,
}

impl AnalysedStores {
    /// Starts the refresh; it ends once the cache is dropped.
    pub fn spawn(storage: Storage) -> AnalysedStores {
        let cache = AnalysedStores::default();
        let weak: Weak<RwLock<HashSet<String>>> = Arc::downgrade(&cache.stores);
        tokio::spawn(async move {
            loop {
                let read = storage.analysed_stores().await;
                let Some(shared) = weak.upgrade() else { return };
                match read {
                    Ok(stores) => *shared.write().unwrap_or_else(|e| e.into_inner()) = stores,
                    Err(error) => {
                        tracing::warn!(%error, "Cannot read the stores under canary analysis; keeping the last list.");
                    }
                }
                drop(shared);
                tokio::time::sleep(REFRESH).await;
            }
        });
        cache
    }

    pub fn contains(&self, store_id: &str) -> bool {
        self.stores
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(store_id)
    }
}

/// Refuses a heartbeat whose minutes break the bounds an agent keeps: it
/// is not a posfleet agent's, or a broken one's.
pub fn validate(minutes: &[v1::SignalMinute]) -> Result<(), Status> {
    const FIELD: &str = "signal_minutes";
    if minutes.len() > MAX_MINUTES_PER_HEARTBEAT {
        return Err(invalid(
            FIELD,
            format!("more than {MAX_MINUTES_PER_HEARTBEAT} minutes in one heartbeat"),
        ));
    }
    for m in minutes {
        if m.counts.len() + m.values.len() > MAX_NAMES {
            return Err(invalid(
                FIELD,
                format!("minute {} has more than {MAX_NAMES} signals", m.minute),
            ));
        }
        for name in m.counts.keys().chain(m.values.keys()) {
            if !valid_name(name) {
                return Err(invalid(
                    FIELD,
                    format!(
                        "signal name {:?} is not 1 to 64 of a-z, 0-9 and _ starting with a letter",
                        name.chars().take(80).collect::<String>()
                    ),
                ));
            }
        }
        for (name, values) in &m.values {
            if values.values.len() > MAX_VALUES_PER_NAME {
                return Err(invalid(
                    FIELD,
                    format!("signal {name} has more than {MAX_VALUES_PER_NAME} values in a minute"),
                ));
            }
            if values.values.iter().any(|v| !v.is_finite()) {
                return Err(invalid(
                    FIELD,
                    format!("signal {name} has a value that is not a finite number"),
                ));
            }
        }
    }
    Ok(())
}

/// The minutes within the kept range (`RETENTION_MINUTES` back, a little
/// ahead for clocks), and how many were outside it.
pub fn in_range(minutes: Vec<v1::SignalMinute>, now_ms: i64) -> (Vec<SignalMinuteRecord>, u64) {
    let now = now_ms.div_euclid(60_000);
    let mut outside = 0;
    let kept = minutes
        .into_iter()
        .filter(|m| {
            let ok = m.minute > now - RETENTION_MINUTES && m.minute <= now + MAX_MINUTES_AHEAD;
            if !ok {
                outside += 1;
            }
            ok
        })
        .map(|m| SignalMinuteRecord {
            minute: m.minute,
            counts: m.counts.into_iter().collect(),
            values: m.values.into_iter().map(|(k, v)| (k, v.values)).collect(),
        })
        .collect();
    (kept, outside)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minute(minute: i64, counts: &[(&str, u64)]) -> v1::SignalMinute {
        v1::SignalMinute {
            minute,
            counts: counts.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            values: Default::default(),
        }
    }

    #[test]
    fn bounds_are_enforced() {
        assert!(validate(&[minute(1, &[("crashes", 2)])]).is_ok());
        let many: Vec<v1::SignalMinute> = (0..=MAX_MINUTES_PER_HEARTBEAT as i64)
            .map(|m| minute(m, &[]))
            .collect();
        assert!(validate(&many).unwrap_err().message().contains("minutes"));
        let names: Vec<(String, u64)> = (0..=MAX_NAMES).map(|i| (format!("s{i}"), 1)).collect();
        let wide = v1::SignalMinute {
            minute: 1,
            counts: names.into_iter().collect(),
            values: Default::default(),
        };
        assert!(validate(&[wide]).unwrap_err().message().contains("signals"));
        let err = validate(&[minute(1, &[("Bad-Name", 1)])]).unwrap_err();
        assert!(err.message().contains("Bad-Name"), "{}", err.message());
        let mut nan = minute(1, &[]);
        nan.values.insert(
            "latency".into(),
            v1::SignalValues {
                values: vec![1.0, f64::NAN],
            },
        );
        assert!(validate(&[nan]).unwrap_err().message().contains("finite"));
        let mut long = minute(1, &[]);
        long.values.insert(
            "latency".into(),
            v1::SignalValues {
                values: vec![1.0; MAX_VALUES_PER_NAME + 1],
            },
        );
        assert!(validate(&[long]).unwrap_err().message().contains("values"));
    }

    #[test]
    fn old_and_future_minutes_are_left_out() {
        let now_ms = 1_000_000 * 60_000 + 30_000;
        let (kept, outside) = in_range(
            vec![
                minute(1_000_000 - RETENTION_MINUTES, &[]),
                minute(1_000_000 - RETENTION_MINUTES + 1, &[]),
                minute(999_999, &[("crashes", 3)]),
                minute(1_000_000 + MAX_MINUTES_AHEAD, &[]),
                minute(1_000_000 + MAX_MINUTES_AHEAD + 1, &[]),
            ],
            now_ms,
        );
        let minutes: Vec<i64> = kept.iter().map(|m| m.minute).collect();
        assert_eq!(
            minutes,
            vec![
                1_000_000 - RETENTION_MINUTES + 1,
                999_999,
                1_000_000 + MAX_MINUTES_AHEAD
            ]
        );
        assert_eq!(outside, 2);
        assert_eq!(kept[1].counts.get("crashes"), Some(&3));
    }
}
