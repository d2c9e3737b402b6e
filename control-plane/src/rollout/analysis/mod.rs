//! Canary analysis: whether the tills of a wave are as healthy as the
//! control tills of the same stores that do not have the release yet,
//! over the same minutes.
//!
//! Pure: no clock, no database, no I/O. The engine hands in what the
//! tills reported since the wave started (`WaveObservation`) and the
//! minutes elapsed, and gets back a `Judgement`: `Observing`, `Pass`,
//! `Fail` or `Inconclusive`, with per-signal evidence (serde, for the
//! rollout's events) and a one-line `summary` for operators.
//!
//! - `policy`: the analysis policy file and its validation;
//! - `counts`: count signals, a sequential probability ratio test whose
//!   false-alarm bound holds however often it is looked at;
//! - `ranks`: continuous signals, Mann–Whitney U with a Hodges–Lehmann
//!   interval, judged at planned looks with the false-alarm rate split
//!   among them;
//! - `verdict`: each signal's status and the wave's verdict;
//! - `observe`: what tills reported, sorted into canary and control.
//!
//! # The policy file
//!
//! A rollout's analysis policy is a file like this one
//! (`example-policy.toml` beside this module, which its tests read):
//!
#![doc = concat!("```toml\n", include_str!("example-policy.toml"), "```")]
//!
//! With `bad = "decrease"` (sales completed, say), `effect` must be below
//! 1: a count fails on a rate `1 − effect` times the control's.
//!
//! # What the tills report
//!
//! Count signals: per till and minute, the number of events and whether
//! the till was up (its till-minutes); the engine sums them per store,
//! minute and group (canary: tills running the release; control: the
//! store's tills that do not have it yet) into `CountBucket`s. Continuous
//! signals: the values themselves (each health-check latency, each
//! checkout's duration), at most a bounded number per till and minute
//! (a uniform sample when there are more), into `SampleBucket`s. Per-minute
//! summaries (a mean or a median per till) would not do: the rank test
//! compares distributions and needs values, and a median of medians
//! weighs a quiet till like a busy one.

mod counts;
mod observe;
mod policy;
mod ranks;
mod verdict;

#[cfg(test)]
mod tests;

pub use counts::{CountBucket, CountEvidence, CountTest, GroupCount, bucket_log_likelihood_ratio};
pub use observe::{Group, TillMinute, observe};
pub use policy::{
    AnalysisPolicy, Direction, OnFail, OnInconclusive, PolicyError, SignalKind, SignalPolicy,
};
pub use ranks::{MannWhitney, RankEvidence, SampleBucket, Shift, hodges_lehmann, kth_difference};
pub use verdict::{
    Action, Judgement, SignalData, SignalEvidence, SignalStatus, TestEvidence, Verdict,
    WaveObservation, combine, count_test, judge_count, judge_rank, judge_wave,
};
