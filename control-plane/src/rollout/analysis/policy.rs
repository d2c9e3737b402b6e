//! The analysis policy: which signals a rollout watches, which direction is
//! bad, how large a change is tolerated, how long each wave is watched and
//! what happens on a failed or an undecided wave. Read from TOML
//! (`AnalysisPolicy::from_toml`), validated as it is read; every field
//! has a safe default except the signals themselves.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A policy file holds at most this many signals.
pub const MAX_SIGNALS: usize = posfleet_proto::signals::MAX_NAMES;
/// Longest observation of one wave: a week.
pub const MAX_OBSERVATION_MINUTES: u32 = 7 * 24 * 60;
/// Largest tolerated increase: 10 (a rate 11 times the control's).
pub const MAX_INCREASE_EFFECT: f64 = 10.0;
/// Fewest samples per group a rank test may ever decide on; below this the
/// normal approximation of the Mann–Whitney statistic is not trusted.
pub const MIN_RANK_SAMPLES: u32 = 8;

/// Why a policy file was refused. Each message names the field.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("the analysis policy is not valid TOML for this format: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("the analysis policy names no signal: add at least one [signals.<name>] table")]
    NoSignals,
    #[error("the analysis policy names {count} signals; at most {MAX_SIGNALS} are allowed")]
    TooManySignals { count: usize },
    #[error(
        "signal name {name:?} is not allowed: use 1 to 64 lowercase letters, digits and underscores, starting with a letter"
    )]
    SignalName { name: String },
    #[error("{field} = {value} is out of range: it must lie strictly between 0 and 0.5")]
    ErrorRate { field: &'static str, value: f64 },
    #[error(
        "signals.{signal}.effect = {value} is out of range: with bad = \"{bad}\" it must be {range}"
    )]
    Effect {
        signal: String,
        value: f64,
        bad: Direction,
        range: &'static str,
    },
    #[error("min_observation_minutes = {value} is out of range: it must be at least 1")]
    MinObservation { value: u32 },
    #[error(
        "min_observation_minutes = {min} is above max_observation_minutes = {max}: \
         a wave cannot need more observation than it is allowed"
    )]
    ObservationOrder { min: u32, max: u32 },
    #[error(
        "max_observation_minutes = {value} is out of range: at most {MAX_OBSERVATION_MINUTES} (a week)"
    )]
    MaxObservation { value: u32 },
    #[error("min_canary_till_hours = {value} is out of range: a number from 0 up")]
    TillHours { value: f64 },
    #[error(
        "signals.{signal}.min_samples = {value} is out of range: at least {MIN_RANK_SAMPLES} \
         per group"
    )]
    MinSamples { signal: String, value: u32 },
    #[error(
        "signals.{signal}.min_samples is for continuous signals; a count signal is \
         gated by min_canary_till_hours"
    )]
    MinSamplesOnCount { signal: String },
}

/// What a signal measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    /// Events counted per till per minute (crashes, restarts, failed
    /// tenders, printer faults), judged as a rate per till-hour.
    Count,
    /// Measured values (health-check latency, checkout duration), judged by
    /// their distribution.
    Continuous,
}

/// Which change of a signal is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Increase,
    Decrease,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Increase => "increase",
            Direction::Decrease => "decrease",
        })
    }
}

/// What a rollout does when a wave fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFail {
    /// Pause the rollout for an operator.
    Pause,
    /// Roll the release back on the tills that have it.
    Rollback,
}

/// What a rollout does when a wave ends undecided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnInconclusive {
    /// Pause the rollout for an operator.
    Pause,
    /// Go on with the next wave.
    Continue,
}

/// One watched signal, as written in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalPolicy {
    pub kind: SignalKind,
    /// The bad direction; `increase` unless said.
    #[serde(default = "default_bad")]
    pub bad: Direction,
    /// The tolerated relative change. Counts: the tested rate ratio is
    /// `1 + effect` (bad = increase) or `1 - effect` (bad = decrease).
    /// Continuous: the tolerated shift is `effect` times the control's
    /// median. Defaults: 1.0 for counts (a doubled rate), 0.25 for
    /// continuous signals (a quarter of the median).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<f64>,
    /// Continuous signals: samples needed in each group before the rank
    /// test may decide (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_samples: Option<u32>,
}

impl SignalPolicy {
    /// The effect, defaulted by kind.
    pub fn effect(&self) -> f64 {
        self.effect.unwrap_or(match self.kind {
            SignalKind::Count => 1.0,
            SignalKind::Continuous => 0.25,
        })
    }

    /// Samples needed per group before a rank test may decide.
    pub fn min_samples(&self) -> u32 {
        self.min_samples.unwrap_or(20)
    }

    /// The rate ratio a count test takes as the alternative.
    pub fn alternative_ratio(&self) -> f64 {
        match self.bad {
            Direction::Increase => 1.0 + self.effect(),
            Direction::Decrease => 1.0 - self.effect(),
        }
    }
}

fn default_bad() -> Direction {
    Direction::Increase
}

fn default_min_observation() -> u32 {
    30
}

fn default_max_observation() -> u32 {
    240
}

fn default_till_hours() -> f64 {
    1.0
}

fn default_alpha() -> f64 {
    0.05
}

fn default_beta() -> f64 {
    0.2
}

fn default_on_fail() -> OnFail {
    OnFail::Pause
}

fn default_on_inconclusive() -> OnInconclusive {
    OnInconclusive::Pause
}

/// A policy file as written, before validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    /// A wave cannot pass before it has been watched this long.
    #[serde(default = "default_min_observation")]
    min_observation_minutes: u32,
    /// A wave still undecided after this long is inconclusive.
    #[serde(default = "default_max_observation")]
    max_observation_minutes: u32,
    /// A count signal cannot pass before the canary tills have been online
    /// this many till-hours.
    #[serde(default = "default_till_hours")]
    min_canary_till_hours: f64,
    /// Chance that a wave of a release no worse than the old one fails,
    /// over the whole wave, all looks and all signals (split evenly among
    /// the signals).
    #[serde(default = "default_alpha")]
    alpha: f64,
    /// Chance that a signal misses a change of exactly its effect size.
    #[serde(default = "default_beta")]
    beta: f64,
    #[serde(default = "default_on_fail")]
    on_fail: OnFail,
    #[serde(default = "default_on_inconclusive")]
    on_inconclusive: OnInconclusive,
    /// The watched signals by name, as the agents report them.
    #[serde(default)]
    signals: BTreeMap<String, SignalPolicy>,
}

/// A rollout's analysis policy, validated: it is only ever built by
/// `from_toml` or by deserializing (a policy a rollout stored, say), and
/// both check every range, so a policy in hand is a valid one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PolicyFile", into = "PolicyFile")]
pub struct AnalysisPolicy {
    file: PolicyFile,
}

impl TryFrom<PolicyFile> for AnalysisPolicy {
    type Error = PolicyError;

    fn try_from(file: PolicyFile) -> Result<AnalysisPolicy, PolicyError> {
        validate(&file)?;
        Ok(AnalysisPolicy { file })
    }
}

impl From<AnalysisPolicy> for PolicyFile {
    fn from(policy: AnalysisPolicy) -> PolicyFile {
        policy.file
    }
}

impl AnalysisPolicy {
    /// Reads and validates a policy file's text.
    pub fn from_toml(text: &str) -> Result<AnalysisPolicy, PolicyError> {
        let file: PolicyFile = toml::from_str(text)?;
        AnalysisPolicy::try_from(file)
    }

    /// A wave cannot pass before it has been watched this long.
    pub fn min_observation_minutes(&self) -> u32 {
        self.file.min_observation_minutes
    }

    /// A wave still undecided after this long is inconclusive.
    pub fn max_observation_minutes(&self) -> u32 {
        self.file.max_observation_minutes
    }

    /// Canary till-hours a count signal needs before it may pass.
    pub fn min_canary_till_hours(&self) -> f64 {
        self.file.min_canary_till_hours
    }

    /// The wave's false-alarm rate, all signals and looks together.
    pub fn alpha(&self) -> f64 {
        self.file.alpha
    }

    /// A signal's miss rate at its effect size.
    pub fn beta(&self) -> f64 {
        self.file.beta
    }

    pub fn on_fail(&self) -> OnFail {
        self.file.on_fail
    }

    pub fn on_inconclusive(&self) -> OnInconclusive {
        self.file.on_inconclusive
    }

    /// The watched signals, by name.
    pub fn signals(&self) -> &BTreeMap<String, SignalPolicy> {
        &self.file.signals
    }

    /// The false-alarm rate each signal is allowed: `alpha` split evenly,
    /// so that the wave's chance of failing a good release stays at most
    /// `alpha` however many signals are watched (a union bound).
    pub fn alpha_per_signal(&self) -> f64 {
        self.file.alpha / self.file.signals.len().max(1) as f64
    }

    /// The minutes since the wave started at which rank tests look: every
    /// `min_observation_minutes`, and at `max_observation_minutes`.
    pub fn rank_looks(&self) -> u32 {
        self.file
            .max_observation_minutes
            .div_ceil(self.file.min_observation_minutes.max(1))
            .max(1)
    }
}

/// Checks every range of a policy file; the first problem found is returned.
fn validate(file: &PolicyFile) -> Result<(), PolicyError> {
    for (field, value) in [("alpha", file.alpha), ("beta", file.beta)] {
        if !(value > 0.0 && value < 0.5) {
            return Err(PolicyError::ErrorRate { field, value });
        }
    }
    if file.min_observation_minutes < 1 {
        return Err(PolicyError::MinObservation {
            value: file.min_observation_minutes,
        });
    }
    if file.max_observation_minutes > MAX_OBSERVATION_MINUTES {
        return Err(PolicyError::MaxObservation {
            value: file.max_observation_minutes,
        });
    }
    if file.min_observation_minutes > file.max_observation_minutes {
        return Err(PolicyError::ObservationOrder {
            min: file.min_observation_minutes,
            max: file.max_observation_minutes,
        });
    }
    if !(file.min_canary_till_hours >= 0.0 && file.min_canary_till_hours.is_finite()) {
        return Err(PolicyError::TillHours {
            value: file.min_canary_till_hours,
        });
    }
    if file.signals.is_empty() {
        return Err(PolicyError::NoSignals);
    }
    if file.signals.len() > MAX_SIGNALS {
        return Err(PolicyError::TooManySignals {
            count: file.signals.len(),
        });
    }
    for (name, signal) in &file.signals {
        if !posfleet_proto::signals::valid_name(name) {
            return Err(PolicyError::SignalName { name: name.clone() });
        }
        let effect = signal.effect();
        let (ok, range) = match signal.bad {
            Direction::Increase => (
                effect > 0.0 && effect <= MAX_INCREASE_EFFECT,
                "above 0 and at most 10",
            ),
            Direction::Decrease => (effect > 0.0 && effect < 1.0, "strictly between 0 and 1"),
        };
        if !ok {
            return Err(PolicyError::Effect {
                signal: name.clone(),
                value: effect,
                bad: signal.bad,
                range,
            });
        }
        match signal.kind {
            SignalKind::Count if signal.min_samples.is_some() => {
                return Err(PolicyError::MinSamplesOnCount {
                    signal: name.clone(),
                });
            }
            SignalKind::Continuous if signal.min_samples() < MIN_RANK_SAMPLES => {
                return Err(PolicyError::MinSamples {
                    signal: name.clone(),
                    value: signal.min_samples(),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in the module's docs.
    const EXAMPLE: &str = include_str!("example-policy.toml");

    /// Parses `text`; `Ok(())` expected, or an error whose message holds
    /// `expected`.
    fn check(text: &str, expected: Result<(), &str>) {
        let got = AnalysisPolicy::from_toml(text);
        match (got, expected) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(want)) => {
                let message = e.to_string();
                assert!(message.contains(want), "{message:?} lacks {want:?}");
            }
            (got, want) => panic!("{text}\n→ {got:?}, expected {want:?}"),
        }
    }

    #[test]
    fn the_documented_example_reads_as_written() {
        let p = AnalysisPolicy::from_toml(EXAMPLE).unwrap();
        assert_eq!(p.on_fail(), OnFail::Rollback);
        assert_eq!(p.on_inconclusive(), OnInconclusive::Pause);
        assert_eq!(
            p.signals().keys().collect::<Vec<_>>(),
            ["checkout_seconds", "crashes", "failed_tenders"]
        );
        assert_eq!(p.signals()["failed_tenders"].alternative_ratio(), 1.5);
        assert_eq!(p.signals()["checkout_seconds"].min_samples(), 30);
        // 0.05 split over three signals; 240/30 = 8 rank looks.
        assert!((p.alpha_per_signal() - 0.05 / 3.0).abs() < 1e-12);
        assert_eq!(p.rank_looks(), 8);
    }

    #[test]
    fn a_stored_policy_reads_back_only_if_valid() {
        // As a rollout would store it (JSON) and read it back.
        let p = AnalysisPolicy::from_toml(EXAMPLE).unwrap();
        let json = serde_json::to_string(&p).unwrap();
        let back: AnalysisPolicy = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        // A stored policy with a range broken is refused on reading.
        let broken = json.replace("\"alpha\":0.05", "\"alpha\":0.7");
        assert_ne!(broken, json);
        let error = serde_json::from_str::<AnalysisPolicy>(&broken).unwrap_err();
        assert!(
            error.to_string().contains("alpha = 0.7 is out of range"),
            "{error}"
        );
    }

    #[test]
    fn defaults_are_the_safe_ones() {
        let p = AnalysisPolicy::from_toml("[signals.crashes]\nkind = \"count\"\n").unwrap();
        assert_eq!((p.alpha(), p.beta()), (0.05, 0.2));
        assert_eq!(
            (p.min_observation_minutes(), p.max_observation_minutes()),
            (30, 240)
        );
        assert_eq!(p.min_canary_till_hours(), 1.0);
        assert_eq!(p.on_fail(), OnFail::Pause);
        assert_eq!(p.on_inconclusive(), OnInconclusive::Pause);
        let crashes = &p.signals()["crashes"];
        assert_eq!(crashes.bad, Direction::Increase);
        assert_eq!(crashes.alternative_ratio(), 2.0);
        let p = AnalysisPolicy::from_toml(
            "[signals.sales]\nkind = \"count\"\nbad = \"decrease\"\neffect = 0.3\n\
             [signals.latency_ms]\nkind = \"continuous\"\n",
        )
        .unwrap();
        assert!((p.signals()["sales"].alternative_ratio() - 0.7).abs() < 1e-12);
        assert_eq!(p.signals()["latency_ms"].effect(), 0.25);
        assert_eq!(p.signals()["latency_ms"].min_samples(), 20);
        // 250 minutes in steps of 30: looks at 30, 60, …, 240 and 250.
        let p = AnalysisPolicy::from_toml(
            "max_observation_minutes = 250\n[signals.crashes]\nkind = \"count\"\n",
        )
        .unwrap();
        assert_eq!(p.rank_looks(), 9);
    }

    #[test]
    fn bad_policies_are_refused_with_the_field_named() {
        let count = "[signals.crashes]\nkind = \"count\"\n";
        check(count, Ok(()));
        check("", Err("names no signal"));
        check("alpha = 0.05\n", Err("names no signal"));
        check(
            "[signals.crashes]\nkind = \"gauge\"\n",
            Err("unknown variant `gauge`, expected `count` or `continuous`"),
        );
        check("[signals.crashes]\n", Err("missing field `kind`"));
        check(
            "[signals.crashes]\nkind = \"count\"\nbad = \"up\"\n",
            Err("unknown variant `up`"),
        );
        check(
            "[signals.crashes]\nkind = \"count\"\nefect = 1.0\n",
            Err("unknown field `efect`"),
        );
        check(
            &format!("alhpa = 0.1\n{count}"),
            Err("unknown field `alhpa`"),
        );
        check(
            &format!("alpha = 0.5\n{count}"),
            Err("alpha = 0.5 is out of range"),
        );
        check(
            &format!("alpha = 0\n{count}"),
            Err("alpha = 0 is out of range"),
        );
        check(
            &format!("beta = -0.1\n{count}"),
            Err("beta = -0.1 is out of range"),
        );
        check(&format!("beta = 0.49\n{count}"), Ok(()));
        check(
            &format!("min_observation_minutes = 60\nmax_observation_minutes = 30\n{count}"),
            Err("min_observation_minutes = 60 is above max_observation_minutes = 30"),
        );
        check(
            &format!("min_observation_minutes = 0\n{count}"),
            Err("min_observation_minutes = 0"),
        );
        check(
            &format!("max_observation_minutes = 20000\n{count}"),
            Err("max_observation_minutes = 20000 is out of range"),
        );
        check(
            &format!("min_observation_minutes = -5\n{count}"),
            Err("min_observation_minutes"),
        );
        check(
            &format!("min_canary_till_hours = -1.0\n{count}"),
            Err("min_canary_till_hours = -1"),
        );
        check(
            &format!("on_fail = \"ignore\"\n{count}"),
            Err("unknown variant `ignore`, expected `pause` or `rollback`"),
        );
        check(
            &format!("on_inconclusive = \"rollback\"\n{count}"),
            Err("unknown variant `rollback`, expected `pause` or `continue`"),
        );
        check(
            "[signals.crashes]\nkind = \"count\"\neffect = 0.0\n",
            Err("signals.crashes.effect = 0 is out of range: with bad = \"increase\""),
        );
        check(
            "[signals.crashes]\nkind = \"count\"\neffect = 12.0\n",
            Err("signals.crashes.effect = 12 is out of range"),
        );
        check(
            "[signals.sales]\nkind = \"count\"\nbad = \"decrease\"\neffect = 1.0\n",
            Err("with bad = \"decrease\" it must be strictly between 0 and 1"),
        );
        check(
            "[signals.latency_ms]\nkind = \"continuous\"\nmin_samples = 5\n",
            Err("signals.latency_ms.min_samples = 5 is out of range"),
        );
        check(
            "[signals.crashes]\nkind = \"count\"\nmin_samples = 30\n",
            Err("min_samples is for continuous signals"),
        );
        check(
            "[signals.Crashes]\nkind = \"count\"\n",
            Err("signal name \"Crashes\" is not allowed"),
        );
        check(
            "[signals.\"printer faults\"]\nkind = \"count\"\n",
            Err("signal name \"printer faults\" is not allowed"),
        );
        let many: String = (0..=MAX_SIGNALS)
            .map(|i| format!("[signals.s{i}]\nkind = \"count\"\n"))
            .collect();
        check(&many, Err("names 33 signals; at most 32"));
        check("min_observation_minutes = ", Err("not valid TOML"));
    }
}
