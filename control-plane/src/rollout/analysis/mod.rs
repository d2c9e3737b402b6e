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
//! - `verdict`: each signal's status and the wave's verdict.
//!
//! # The policy file
//!
//! ```toml
//! # How long each wave is watched.
//! min_observation_minutes = 30     # no Pass before this (default 30)
//! max_observation_minutes = 240    # undecided by then: Inconclusive (default 240)
//! min_canary_till_hours = 1.0      # count signals pass only after this much canary time (default 1)
//!
//! # Error rates, each strictly between 0 and 0.5.
//! alpha = 0.05   # chance a wave of an equally good release fails, all signals and looks together (default 0.05)
//! beta = 0.2     # chance a signal misses a change of exactly its effect size (default 0.2)
//!
//! on_fail = "rollback"         # "pause" (default) or "rollback"
//! on_inconclusive = "pause"    # "pause" (default) or "continue"
//!
//! # One table per signal, named as the tills report it
//! # (1 to 64 lowercase letters, digits and underscores).
//! [signals.crashes]
//! kind = "count"          # events per till per minute, judged per till-hour
//! bad = "increase"        # "increase" (default) or "decrease"
//! effect = 1.0            # fail on a rate 1 + 1.0 = 2 times the control's (default 1.0)
//!
//! [signals.failed_tenders]
//! kind = "count"
//! effect = 0.5            # 1.5 times
//!
//! [signals.checkout_seconds]
//! kind = "continuous"     # values, compared by rank
//! effect = 0.2            # tolerate a shift of 20% of the control's median (default 0.25)
//! min_samples = 30        # values per group before it may decide (default 20, at least 8)
//! ```
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
mod policy;
mod ranks;
mod verdict;

#[cfg(test)]
mod tests;

pub use counts::{CountBucket, CountEvidence, CountTest, GroupCount, bucket_log_likelihood_ratio};
pub use policy::{
    AnalysisPolicy, Direction, OnFail, OnInconclusive, PolicyError, SignalKind, SignalPolicy,
};
pub use ranks::{MannWhitney, RankEvidence, SampleBucket, Shift, hodges_lehmann, kth_difference};
pub use verdict::{
    Action, Judgement, SignalData, SignalEvidence, SignalStatus, TestEvidence, Verdict,
    WaveObservation, combine, count_test, judge_count, judge_rank, judge_wave,
};
