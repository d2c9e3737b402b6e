//! A wave's verdict: each signal judged by its test, then the signals
//! combined under the policy's observation times.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::counts::{CountBucket, CountEvidence, CountTest};
use super::policy::{AnalysisPolicy, Direction, OnFail, OnInconclusive, SignalKind, SignalPolicy};
use super::ranks::{MannWhitney, RankEvidence, SampleBucket, hodges_lehmann, median};

/// What the engine hands in for one signal of one wave: everything
/// reported since the wave started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalData {
    /// A count signal: one bucket per store per minute.
    Counts(Vec<CountBucket>),
    /// A continuous signal: one bucket per minute.
    Samples(Vec<SampleBucket>),
}

/// A wave as the analysis sees it at one look.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WaveObservation {
    /// Minutes since the wave's tills got the release (the engine's clock,
    /// not read here).
    pub elapsed_minutes: u32,
    /// Per signal name; names the policy does not list are ignored.
    pub signals: BTreeMap<String, SignalData>,
}

/// One signal's state at a look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalStatus {
    Pass,
    Fail,
    Undecided,
}

/// The test behind a signal's evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "test", rename_all = "snake_case")]
pub enum TestEvidence {
    /// Count signals: the sequential probability ratio test.
    Sprt(CountEvidence),
    /// Continuous signals: Mann–Whitney U and Hodges–Lehmann.
    MannWhitney(RankEvidence),
    /// Nothing usable was reported.
    NoData,
}

/// One signal's evidence at a look, as recorded with the verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalEvidence {
    pub signal: String,
    pub kind: SignalKind,
    pub bad: Direction,
    pub status: SignalStatus,
    /// Why it has this status, in words.
    pub reason: String,
    #[serde(flatten)]
    pub test: TestEvidence,
}

impl SignalEvidence {
    fn new(
        name: &str,
        signal: &SignalPolicy,
        status: SignalStatus,
        reason: String,
        test: TestEvidence,
    ) -> SignalEvidence {
        SignalEvidence {
            signal: name.to_string(),
            kind: signal.kind,
            bad: signal.bad,
            status,
            reason,
            test,
        }
    }

    /// Whether the control group took part at all: tills online (counts)
    /// or values reported (continuous).
    pub fn has_controls(&self) -> bool {
        match &self.test {
            TestEvidence::Sprt(e) => e.control_till_hours > 0.0,
            TestEvidence::MannWhitney(e) => e.control_samples > 0,
            TestEvidence::NoData => false,
        }
    }

    /// One line: the signal, its status and its figures.
    pub fn summary(&self) -> String {
        let status = match self.status {
            SignalStatus::Pass => "pass",
            SignalStatus::Fail => "FAIL",
            SignalStatus::Undecided => "undecided",
        };
        let figures = match &self.test {
            TestEvidence::Sprt(e) => format!(
                "canary {} in {:.1} till-h ({}/till-h) vs control {} in {:.1} till-h ({}/till-h), \
                 log-LR {:.2} for ratio {} (fail at {:.2}, pass at {:.2})",
                e.canary_events,
                e.canary_till_hours,
                rate(e.canary_rate_per_till_hour),
                e.control_events,
                e.control_till_hours,
                rate(e.control_rate_per_till_hour),
                e.log_likelihood_ratio,
                e.tested_ratio,
                e.fail_at,
                e.pass_at,
            ),
            TestEvidence::MannWhitney(e) => format!(
                "median canary {} vs control {} (n {}/{}), shift {} in [{}, {}], margin {}, \
                 p {} at look {} of {} (level {:.4})",
                value(e.canary_median),
                value(e.control_median),
                e.canary_samples,
                e.control_samples,
                value(e.shift),
                e.shift_low
                    .map_or("-inf".to_string(), |v| format!("{v:.3}")),
                e.shift_high
                    .map_or("+inf".to_string(), |v| format!("{v:.3}")),
                value(e.margin),
                e.p_value.map_or("-".to_string(), |p| format!("{p:.4}")),
                e.look,
                e.looks,
                e.alpha_per_look,
            ),
            TestEvidence::NoData => "no data".to_string(),
        };
        format!("{} {status}: {} ({figures})", self.signal, self.reason)
    }
}

fn rate(r: Option<f64>) -> String {
    r.map_or("-".to_string(), |r| format!("{r:.2}"))
}

fn value(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.3}"))
}

/// A wave's verdict at one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Not yet decided: keep watching (before the minimum observation, or
    /// undecided before the maximum).
    Observing,
    /// Every signal passed.
    Pass,
    /// A signal failed.
    Fail,
    /// The wave cannot be decided (no controls, not enough data, the
    /// maximum observation reached undecided).
    Inconclusive,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Observing => "Observing",
            Verdict::Pass => "Pass",
            Verdict::Fail => "Fail",
            Verdict::Inconclusive => "Inconclusive",
        })
    }
}

/// What the rollout should do after a look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Look again later.
    Wait,
    /// The wave is done: go on to the next one.
    Proceed,
    /// Pause the rollout for an operator.
    Pause,
    /// Roll the release back.
    Rollback,
}

/// A wave's verdict with its evidence: recorded as a rollout event and
/// shown to operators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    pub verdict: Verdict,
    /// Why, in words.
    pub reason: String,
    pub elapsed_minutes: u32,
    /// Every signal of the policy, in name order.
    pub signals: Vec<SignalEvidence>,
}

impl Judgement {
    /// What the policy says to do now.
    pub fn action(&self, policy: &AnalysisPolicy) -> Action {
        match self.verdict {
            Verdict::Observing => Action::Wait,
            Verdict::Pass => Action::Proceed,
            Verdict::Fail => match policy.on_fail() {
                OnFail::Pause => Action::Pause,
                OnFail::Rollback => Action::Rollback,
            },
            Verdict::Inconclusive => match policy.on_inconclusive() {
                OnInconclusive::Pause => Action::Pause,
                OnInconclusive::Continue => Action::Proceed,
            },
        }
    }

    /// One line for an operator: the verdict, why, and the figures of the
    /// signals that decided it (the failed ones on Fail, all on Pass, the
    /// undecided ones otherwise).
    pub fn summary(&self) -> String {
        let shown = |s: &&SignalEvidence| match self.verdict {
            Verdict::Fail => s.status == SignalStatus::Fail,
            Verdict::Pass => true,
            Verdict::Observing | Verdict::Inconclusive => s.status == SignalStatus::Undecided,
        };
        let figures: Vec<String> = self
            .signals
            .iter()
            .filter(shown)
            .map(SignalEvidence::summary)
            .collect();
        format!(
            "{} after {} min: {}. {}",
            self.verdict,
            self.elapsed_minutes,
            self.reason,
            figures.join("; ")
        )
    }
}

/// Judges one wave at one look. Pure: the same observation and policy give
/// the same judgement, on any replica, at any time.
pub fn judge_wave(policy: &AnalysisPolicy, wave: &WaveObservation) -> Judgement {
    let signals = policy
        .signals()
        .iter()
        .map(
            |(name, signal)| match (signal.kind, wave.signals.get(name)) {
                (SignalKind::Count, Some(SignalData::Counts(buckets))) => {
                    let mut test = count_test(policy, signal);
                    for b in buckets {
                        test.add(b);
                    }
                    judge_count(policy, name, signal, &test)
                }
                (SignalKind::Continuous, Some(SignalData::Samples(buckets))) => {
                    judge_rank(policy, name, signal, wave.elapsed_minutes, buckets)
                }
                (_, Some(_)) => no_data(
                    name,
                    signal,
                    format!(
                        "reported as the wrong kind of data (the policy says {})",
                        kind_name(signal.kind)
                    ),
                ),
                (_, None) => no_data(name, signal, "no data reported".to_string()),
            },
        )
        .collect();
    combine(policy, wave.elapsed_minutes, signals)
}

fn kind_name(kind: SignalKind) -> &'static str {
    match kind {
        SignalKind::Count => "count",
        SignalKind::Continuous => "continuous",
    }
}

fn no_data(name: &str, signal: &SignalPolicy, reason: String) -> SignalEvidence {
    SignalEvidence::new(
        name,
        signal,
        SignalStatus::Undecided,
        reason,
        TestEvidence::NoData,
    )
}

/// The sequential test a count signal of `policy` runs.
pub fn count_test(policy: &AnalysisPolicy, signal: &SignalPolicy) -> CountTest {
    CountTest::new(
        signal.alternative_ratio(),
        policy.alpha_per_signal(),
        policy.beta(),
    )
}

/// A count signal's status from its test. It may fail at any look; it
/// passes once the evidence favours "no change" and the canary tills have
/// been online `min_canary_till_hours`.
pub fn judge_count(
    policy: &AnalysisPolicy,
    name: &str,
    signal: &SignalPolicy,
    test: &CountTest,
) -> SignalEvidence {
    let e = test.evidence();
    let worse = match signal.bad {
        Direction::Increase => "higher",
        Direction::Decrease => "lower",
    };
    let (status, reason) = if test.failed() {
        (
            SignalStatus::Fail,
            format!(
                "the canary's rate is {worse} than the control's by a factor of {} or more \
                 (false-alarm rate {:.3})",
                e.tested_ratio,
                policy.alpha_per_signal()
            ),
        )
    } else if e.control_till_hours == 0.0 {
        (
            SignalStatus::Undecided,
            "no control till online".to_string(),
        )
    } else if e.canary_till_hours == 0.0 {
        (SignalStatus::Undecided, "no canary till online".to_string())
    } else if e.canary_till_hours < policy.min_canary_till_hours() {
        (
            SignalStatus::Undecided,
            format!(
                "not enough till-hours: {:.2} of {:.2} on the canary",
                e.canary_till_hours,
                policy.min_canary_till_hours()
            ),
        )
    } else if test.accepts_no_change() {
        (
            SignalStatus::Pass,
            format!(
                "no change of a factor of {} (miss rate {})",
                e.tested_ratio,
                policy.beta()
            ),
        )
    } else if e.informative_events == 0 {
        (
            SignalStatus::Undecided,
            "no events yet in minutes with both groups online".to_string(),
        )
    } else {
        (
            SignalStatus::Undecided,
            "the evidence has reached neither bound".to_string(),
        )
    };
    SignalEvidence::new(name, signal, status, reason, TestEvidence::Sprt(e))
}

/// A continuous signal's status at its latest planned look (see `ranks`):
/// the data are cut at the look's minute, so between looks the answer
/// does not change.
pub fn judge_rank(
    policy: &AnalysisPolicy,
    name: &str,
    signal: &SignalPolicy,
    elapsed_minutes: u32,
    buckets: &[SampleBucket],
) -> SignalEvidence {
    let step = policy.min_observation_minutes();
    let looks = policy.rank_looks();
    let (look, look_minute) = if elapsed_minutes >= policy.max_observation_minutes() {
        (looks, policy.max_observation_minutes())
    } else {
        let k = elapsed_minutes / step;
        (k, k * step)
    };
    let alpha_per_look = policy.alpha_per_signal() / f64::from(looks);
    let sorted = |pick: fn(&SampleBucket) -> &Vec<f64>| {
        let mut v: Vec<f64> = buckets
            .iter()
            .filter(|b| b.minute < look_minute)
            .flat_map(|b| pick(b).iter().copied())
            .filter(|v| v.is_finite())
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let canary = sorted(|b| &b.canary);
    let control = sorted(|b| &b.control);
    let mut e = RankEvidence {
        look,
        looks,
        look_minute,
        canary_samples: canary.len(),
        control_samples: control.len(),
        canary_median: (!canary.is_empty()).then(|| median(&canary)),
        control_median: (!control.is_empty()).then(|| median(&control)),
        u: None,
        z: None,
        p_value: None,
        alpha_per_look,
        shift: None,
        shift_low: None,
        shift_high: None,
        margin: None,
    };
    let need = signal.min_samples() as usize;
    let undecided = |reason: String, e: RankEvidence| {
        SignalEvidence::new(
            name,
            signal,
            SignalStatus::Undecided,
            reason,
            TestEvidence::MannWhitney(e),
        )
    };
    if look == 0 {
        return undecided(format!("the first look is at minute {step}"), e);
    }
    if control.is_empty() {
        return undecided("no control values".to_string(), e);
    }
    if canary.len() < need || control.len() < need {
        return undecided(
            format!(
                "too few values: canary {}, control {}, {need} needed in each",
                canary.len(),
                control.len()
            ),
            e,
        );
    }
    let increase = signal.bad == Direction::Increase;
    let margin = signal.effect() * median(&control).abs();
    // The test is against a change of the margin, not against none: the
    // canary's values moved back by the margin, then "worse" is "larger"
    // (or "smaller"). A release within the margin fails at most α.
    let moved: Vec<f64> = canary
        .iter()
        .map(|v| if increase { v - margin } else { v + margin })
        .collect();
    let test = MannWhitney::new(&moved, &control);
    let (z, p) = test.one_sided(increase);
    let raw = MannWhitney::new(&canary, &control);
    let shift = hodges_lehmann(&canary, &control, raw.sd, alpha_per_look);
    e.u = Some(test.u);
    e.z = Some(z);
    e.p_value = Some(p);
    e.shift = Some(shift.estimate);
    e.shift_low = shift.low;
    e.shift_high = shift.high;
    e.margin = Some(margin);
    // The interval's end toward the bad direction, as a bad shift.
    let bad_bound = if increase {
        shift.high
    } else {
        shift.low.map(|v| -v)
    };
    let (status, reason) = if p < alpha_per_look {
        let worse = if increase { "higher" } else { "lower" };
        (
            SignalStatus::Fail,
            format!("the canary's values are {worse} by more than the margin"),
        )
    } else if bad_bound.is_some_and(|b| b <= margin) {
        (
            SignalStatus::Pass,
            "a change beyond the margin is ruled out".to_string(),
        )
    } else {
        (
            SignalStatus::Undecided,
            "the interval still reaches past the margin".to_string(),
        )
    };
    SignalEvidence::new(name, signal, status, reason, TestEvidence::MannWhitney(e))
}

/// The wave's verdict from its signals' evidence:
/// 1. any signal failed: Fail, at any look;
/// 2. before `min_observation_minutes`: Observing;
/// 3. no signal had any control data: Inconclusive (waiting will not
///    bring controls: a wave only ever takes tills from them);
/// 4. every signal passed: Pass;
/// 5. at `max_observation_minutes`: Inconclusive, naming what is missing;
/// 6. otherwise Observing.
pub fn combine(
    policy: &AnalysisPolicy,
    elapsed_minutes: u32,
    signals: Vec<SignalEvidence>,
) -> Judgement {
    let names = |status: SignalStatus| -> String {
        signals
            .iter()
            .filter(|s| s.status == status)
            .map(|s| s.signal.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let failed = names(SignalStatus::Fail);
    let (verdict, reason) = if !failed.is_empty() {
        (Verdict::Fail, format!("worse on the canary: {failed}"))
    } else if elapsed_minutes < policy.min_observation_minutes() {
        (
            Verdict::Observing,
            format!(
                "watched {elapsed_minutes} of at least {} minutes",
                policy.min_observation_minutes()
            ),
        )
    } else if signals.iter().any(|s| s.test != TestEvidence::NoData)
        && !signals.iter().any(SignalEvidence::has_controls)
    {
        (
            Verdict::Inconclusive,
            "no concurrent control tills: none of the wave's stores had a till without the \
             release online and reporting"
                .to_string(),
        )
    } else if signals.iter().all(|s| s.status == SignalStatus::Pass) {
        (Verdict::Pass, "every signal passed".to_string())
    } else if elapsed_minutes >= policy.max_observation_minutes() {
        let why: Vec<String> = signals
            .iter()
            .filter(|s| s.status == SignalStatus::Undecided)
            .map(|s| format!("{}: {}", s.signal, s.reason))
            .collect();
        (
            Verdict::Inconclusive,
            format!(
                "undecided after the maximum {} minutes ({})",
                policy.max_observation_minutes(),
                why.join("; ")
            ),
        )
    } else {
        (
            Verdict::Observing,
            format!("undecided: {}", names(SignalStatus::Undecided)),
        )
    };
    Judgement {
        verdict,
        reason,
        elapsed_minutes,
        signals,
    }
}
