//! From what tills reported to what the analysis judges: each till-minute
//! sorted into the canary or the control group, and summed per store and
//! minute (counts) or per minute (values).

use std::collections::BTreeMap;

use super::counts::{CountBucket, GroupCount};
use super::policy::{AnalysisPolicy, SignalKind};
use super::ranks::SampleBucket;
use super::verdict::{SignalData, WaveObservation};

/// Which side of the comparison a till-minute is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// The till ran the release all that minute.
    Canary,
    /// The till did not have the release yet.
    Control,
}

/// One till's minute, sorted.
#[derive(Debug, Clone, Copy)]
pub struct TillMinute<'a> {
    pub store_id: &'a str,
    /// Minutes since the wave started.
    pub minute: u32,
    pub group: Group,
    pub counts: &'a BTreeMap<String, u64>,
    pub values: &'a BTreeMap<String, Vec<f64>>,
}

/// The observation of a wave `elapsed_minutes` after it started. A
/// till-minute is a minute of exposure for every count signal (zero events
/// are news too); a continuous signal with no value from either group is
/// left out (the verdict says "no data").
pub fn observe<'a>(
    policy: &AnalysisPolicy,
    elapsed_minutes: u32,
    minutes: impl IntoIterator<Item = TillMinute<'a>>,
) -> WaveObservation {
    let mut counts: BTreeMap<&str, BTreeMap<(&str, u32), CountBucket>> = BTreeMap::new();
    let mut samples: BTreeMap<&str, BTreeMap<u32, SampleBucket>> = BTreeMap::new();
    for m in minutes {
        for (name, signal) in policy.signals() {
            match signal.kind {
                SignalKind::Count => {
                    let bucket = counts
                        .entry(name)
                        .or_default()
                        .entry((m.store_id, m.minute))
                        .or_insert_with(|| CountBucket {
                            minute: m.minute,
                            canary: GroupCount::default(),
                            control: GroupCount::default(),
                        });
                    let group = match m.group {
                        Group::Canary => &mut bucket.canary,
                        Group::Control => &mut bucket.control,
                    };
                    group.events = group
                        .events
                        .saturating_add(m.counts.get(name).copied().unwrap_or(0));
                    group.till_minutes += 1.0;
                }
                SignalKind::Continuous => {
                    let Some(values) = m.values.get(name).filter(|v| !v.is_empty()) else {
                        continue;
                    };
                    let bucket = samples
                        .entry(name)
                        .or_default()
                        .entry(m.minute)
                        .or_insert_with(|| SampleBucket {
                            minute: m.minute,
                            ..SampleBucket::default()
                        });
                    match m.group {
                        Group::Canary => bucket.canary.extend(values),
                        Group::Control => bucket.control.extend(values),
                    }
                }
            }
        }
    }
    let mut signals = BTreeMap::new();
    for (name, buckets) in counts {
        signals.insert(
            name.to_string(),
            SignalData::Counts(buckets.into_values().collect()),
        );
    }
    for (name, buckets) in samples {
        signals.insert(
            name.to_string(),
            SignalData::Samples(buckets.into_values().collect()),
        );
    }
    WaveObservation {
        elapsed_minutes,
        signals,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        [signals.crashes]
        kind = "count"
        [signals.checkout_seconds]
        kind = "continuous"
    "#;

    #[test]
    fn till_minutes_are_summed_per_store_and_minute() {
        let policy = AnalysisPolicy::from_toml(POLICY).unwrap();
        let crash = BTreeMap::from([("crashes".to_string(), 2u64)]);
        let quiet = BTreeMap::new();
        let checkout = BTreeMap::from([("checkout_seconds".to_string(), vec![1.5, 2.5])]);
        let none = BTreeMap::new();
        let m = |store, minute, group, counts, values| TillMinute {
            store_id: store,
            minute,
            group,
            counts,
            values,
        };
        let wave = observe(
            &policy,
            3,
            [
                m("s1", 0, Group::Canary, &crash, &checkout),
                m("s1", 0, Group::Control, &quiet, &none),
                m("s1", 0, Group::Control, &crash, &checkout),
                m("s2", 0, Group::Control, &quiet, &none),
                m("s1", 1, Group::Canary, &quiet, &none),
            ],
        );
        assert_eq!(wave.elapsed_minutes, 3);
        let Some(SignalData::Counts(buckets)) = wave.signals.get("crashes") else {
            panic!("crashes are counts: {wave:?}");
        };
        assert_eq!(
            buckets,
            &vec![
                CountBucket::new(0, (2, 1.0), (2, 2.0)),
                CountBucket::new(1, (0, 1.0), (0, 0.0)),
                CountBucket::new(0, (0, 0.0), (0, 1.0)),
            ]
        );
        let Some(SignalData::Samples(samples)) = wave.signals.get("checkout_seconds") else {
            panic!("checkout_seconds are values: {wave:?}");
        };
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].canary, vec![1.5, 2.5]);
        assert_eq!(samples[0].control, vec![1.5, 2.5]);
    }

    #[test]
    fn a_continuous_signal_nobody_reported_is_missing() {
        let policy = AnalysisPolicy::from_toml(POLICY).unwrap();
        let (counts, values) = (BTreeMap::new(), BTreeMap::new());
        let wave = observe(
            &policy,
            1,
            [TillMinute {
                store_id: "s1",
                minute: 0,
                group: Group::Canary,
                counts: &counts,
                values: &values,
            }],
        );
        assert!(wave.signals.contains_key("crashes"));
        assert!(!wave.signals.contains_key("checkout_seconds"));
    }
}
