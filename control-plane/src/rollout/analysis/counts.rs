//! Count signals (crashes, restarts, failed tenders, printer faults): a
//! sequential probability ratio test on where the events fall.
//!
//! # The test
//!
//! A bucket is one store's tills over one minute: the canary tills' events
//! `c` and online till-minutes `a`, the control tills' events `k` and
//! till-minutes `b`. Within a bucket both groups share whatever drives the
//! store's event rate at that minute (the lunch rush, a network outage),
//! so if a canary till's rate is `ρ` times a control till's, then given
//! the bucket's `n = c + k` events, `c` is binomial with
//! `p(ρ) = ρa / (ρa + b)`: the shared rate cancels. The test weighs
//! `H1: ρ = ρ1` (`1 + effect` when an increase is bad, `1 - effect` when a
//! decrease is) against `H0: ρ = 1`, adding per bucket the log-likelihood
//! ratio
//!
//! ```text
//! c·ln(p(ρ1)/p(1)) + k·ln((1-p(ρ1))/(1-p(1)))  =  c·ln ρ1 + n·ln((a+b)/(ρ1·a+b))
//! ```
//!
//! Buckets where either group has no till online carry no information
//! (`p` is 0 or 1 under both hypotheses) and add nothing; neither do
//! minutes without events. So exposure shares that change from minute to
//! minute (a wave that grows, tills that go offline, a store that closes)
//! are handled exactly, bucket by bucket, rather than through one pooled
//! share.
//!
//! # Why looking every minute keeps the false-alarm bound
//!
//! Under `H0`, given everything before a bucket and the bucket's own
//! exposures and event total, its likelihood ratio has expectation
//! `(p0·p1/p0 + (1-p0)·(1-p1)/(1-p0))^n = 1`. The product over buckets is
//! therefore a non-negative martingale with mean 1, and Ville's inequality
//! bounds the chance that it *ever* reaches `1/α`, over an unbounded
//! number of buckets, by `α`. The test fails a signal when the
//! log-likelihood ratio reaches `ln(1/α)`: however often it is looked at
//! (every minute, every second), and whenever the wave stops, a release no
//! worse than the old one fails with probability at most `α`. This holds
//! for any exposure path that is fixed before a bucket's events are known,
//! so tills going offline because of earlier events do not break it.
//! (Wald's classical boundary `ln((1-β)/α)` is slightly lower and its `α`
//! only approximate; `ln(1/α)` is the one with a proof.)
//!
//! The lower boundary `ln(β/(1-α))` is Wald's: the evidence favours `H0`
//! over a change of exactly the effect size by `(1-α)/β`, and a release
//! that is that much worse reaches it with probability about `β`.

use serde::{Deserialize, Serialize};

/// One group's share of a bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupCount {
    /// Events reported by the group's tills in the bucket's minute.
    pub events: u64,
    /// Sum over the group's tills of the part of the minute each was
    /// online and reporting (a till online all minute adds 1). Any
    /// exposure the event rate is proportional to will do instead, with
    /// the same unit for both groups: for failed tenders, the number of
    /// tenders tried makes a busy lane comparable with a quiet one (the
    /// rates shown are then per 60 of that unit, not per till-hour).
    pub till_minutes: f64,
}

/// One store's tills over one minute: the canary tills (those that run the
/// release) and the control tills (the store's others, still on the old
/// version). Stores are separate buckets, even in the same minute.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CountBucket {
    /// Minutes since the wave started.
    pub minute: u32,
    pub canary: GroupCount,
    pub control: GroupCount,
}

impl CountBucket {
    /// Test helper and simulator shorthand: `(events, till-minutes)` per group.
    pub fn new(minute: u32, canary: (u64, f64), control: (u64, f64)) -> CountBucket {
        CountBucket {
            minute,
            canary: GroupCount {
                events: canary.0,
                till_minutes: canary.1,
            },
            control: GroupCount {
                events: control.0,
                till_minutes: control.1,
            },
        }
    }
}

/// Exposure as counted: negative, NaN and infinite values are no exposure.
fn exposure(till_minutes: f64) -> f64 {
    if till_minutes.is_finite() && till_minutes > 0.0 {
        till_minutes
    } else {
        0.0
    }
}

/// The log-likelihood ratio of `ratio` against 1 for one bucket (see the
/// module's docs); 0 for a bucket without events or without tills online
/// in either group.
pub fn bucket_log_likelihood_ratio(ratio: f64, bucket: &CountBucket) -> f64 {
    let a = exposure(bucket.canary.till_minutes);
    let b = exposure(bucket.control.till_minutes);
    let n = bucket.canary.events + bucket.control.events;
    if a == 0.0 || b == 0.0 || n == 0 {
        return 0.0;
    }
    bucket.canary.events as f64 * ratio.ln() + n as f64 * ((a + b) / (ratio * a + b)).ln()
}

/// The sequential test of one count signal, fed bucket by bucket. Pure
/// arithmetic: `judge` builds one from a wave's buckets at each look, and
/// the simulator keeps one per simulated wave.
#[derive(Debug, Clone, PartialEq)]
pub struct CountTest {
    ratio: f64,
    fail_at: f64,
    pass_at: f64,
    log_likelihood_ratio: f64,
    canary: GroupTotals,
    control: GroupTotals,
    /// Events in buckets where both groups had tills online.
    informative_events: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct GroupTotals {
    events: u64,
    till_minutes: f64,
}

impl GroupTotals {
    fn add(&mut self, group: &GroupCount) {
        self.events += group.events;
        self.till_minutes += exposure(group.till_minutes);
    }
}

impl CountTest {
    /// A test of rate ratio `ratio` (the alternative) against 1, failing
    /// the signal at false-alarm rate `alpha`, missing a change of `ratio`
    /// at rate about `beta`.
    pub fn new(ratio: f64, alpha: f64, beta: f64) -> CountTest {
        CountTest {
            ratio,
            fail_at: (1.0 / alpha).ln(),
            pass_at: (beta / (1.0 - alpha)).ln(),
            log_likelihood_ratio: 0.0,
            canary: GroupTotals::default(),
            control: GroupTotals::default(),
            informative_events: 0,
        }
    }

    /// Adds one bucket.
    pub fn add(&mut self, bucket: &CountBucket) {
        self.canary.add(&bucket.canary);
        self.control.add(&bucket.control);
        let llr = bucket_log_likelihood_ratio(self.ratio, bucket);
        if exposure(bucket.canary.till_minutes) > 0.0 && exposure(bucket.control.till_minutes) > 0.0
        {
            self.informative_events += bucket.canary.events + bucket.control.events;
        }
        self.log_likelihood_ratio += llr;
    }

    /// The evidence gathered so far.
    pub fn evidence(&self) -> CountEvidence {
        let rate = |g: &GroupTotals| {
            (g.till_minutes > 0.0).then(|| g.events as f64 * 60.0 / g.till_minutes)
        };
        CountEvidence {
            tested_ratio: self.ratio,
            log_likelihood_ratio: self.log_likelihood_ratio,
            fail_at: self.fail_at,
            pass_at: self.pass_at,
            canary_events: self.canary.events,
            control_events: self.control.events,
            informative_events: self.informative_events,
            canary_till_hours: self.canary.till_minutes / 60.0,
            control_till_hours: self.control.till_minutes / 60.0,
            canary_rate_per_till_hour: rate(&self.canary),
            control_rate_per_till_hour: rate(&self.control),
        }
    }

    /// Whether the signal has failed: the false-alarm bound reached.
    pub fn failed(&self) -> bool {
        self.log_likelihood_ratio >= self.fail_at
    }

    /// Whether the evidence now favours "no change" enough to pass (the
    /// till-hours gate is the caller's).
    pub fn accepts_no_change(&self) -> bool {
        self.log_likelihood_ratio <= self.pass_at
    }
}

/// What a count signal's test saw, as recorded with the verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CountEvidence {
    /// The alternative rate ratio (canary over control).
    pub tested_ratio: f64,
    /// Sum of the buckets' log-likelihood ratios.
    pub log_likelihood_ratio: f64,
    /// The signal fails when the ratio reaches this: `ln(1/α)`.
    pub fail_at: f64,
    /// The signal may pass when the ratio is at or below this: `ln(β/(1-α))`.
    pub pass_at: f64,
    pub canary_events: u64,
    pub control_events: u64,
    /// Events in minutes where both groups had tills online (the others
    /// cannot be compared).
    pub informative_events: u64,
    pub canary_till_hours: f64,
    pub control_till_hours: f64,
    /// `None` without till-hours.
    pub canary_rate_per_till_hour: Option<f64>,
    pub control_rate_per_till_hour: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPS: f64 = 1e-9;

    /// Feeds `buckets` to a test of `ratio` at α = 0.05, β = 0.2 and checks
    /// the log-likelihood ratio and the two decisions.
    fn check(ratio: f64, buckets: &[CountBucket], llr: f64, failed: bool, accepts: bool) {
        let mut test = CountTest::new(ratio, 0.05, 0.2);
        for b in buckets {
            test.add(b);
        }
        let got = test.evidence();
        assert!(
            (got.log_likelihood_ratio - llr).abs() < 1e-6,
            "log-likelihood ratio {} != {llr} for {buckets:?}",
            got.log_likelihood_ratio
        );
        assert_eq!(test.failed(), failed, "failed, for {buckets:?}");
        assert_eq!(
            test.accepts_no_change(),
            accepts,
            "accepts, for {buckets:?}"
        );
    }

    #[test]
    fn log_likelihood_ratios_by_hand() {
        let b = CountBucket::new;
        // Boundaries at α = 0.05, β = 0.2: fail at ln 20 = 2.9957,
        // pass at ln(0.2/0.95) = -1.5581.
        let t = CountTest::new(2.0, 0.05, 0.2).evidence();
        assert!((t.fail_at - 20f64.ln()).abs() < EPS);
        assert!((t.pass_at - (0.2f64 / 0.95).ln()).abs() < EPS);

        // Equal exposure, ratio 2: a canary event weighs ln(2·2/3) = ln(4/3)
        // = 0.28768, a control event ln(2/3) = -0.40547.
        check(
            2.0,
            &[b(0, (1, 5.0), (0, 5.0))],
            (4.0f64 / 3.0).ln(),
            false,
            false,
        );
        check(
            2.0,
            &[b(0, (0, 5.0), (1, 5.0))],
            (2.0f64 / 3.0).ln(),
            false,
            false,
        );
        // Ten canary events, none on the control: 2.8768, just short of
        // ln 20; the eleventh crosses it (3.1645).
        check(
            2.0,
            &[b(0, (10, 5.0), (0, 5.0))],
            10.0 * (4.0f64 / 3.0).ln(),
            false,
            false,
        );
        check(
            2.0,
            &[b(0, (11, 5.0), (0, 5.0))],
            11.0 * (4.0f64 / 3.0).ln(),
            true,
            false,
        );
        // Four control events: -1.6219, below -1.5581: "no change" accepted.
        check(
            2.0,
            &[b(0, (0, 5.0), (4, 5.0))],
            4.0 * (2.0f64 / 3.0).ln(),
            false,
            true,
        );
        check(
            2.0,
            &[b(0, (0, 5.0), (3, 5.0))],
            3.0 * (2.0f64 / 3.0).ln(),
            false,
            false,
        );
        // One canary event when the canary holds a quarter of the tills
        // (a = 1, b = 3): ln 2 + ln(4/5) = 0.47000. The same event when it
        // holds three quarters (a = 3, b = 1): ln 2 + ln(4/7) = 0.13353;
        // an event on the likelier side says less.
        check(
            2.0,
            &[b(0, (1, 1.0), (0, 3.0))],
            2f64.ln() + 0.8f64.ln(),
            false,
            false,
        );
        check(
            2.0,
            &[b(0, (1, 3.0), (0, 1.0))],
            2f64.ln() + (4.0f64 / 7.0).ln(),
            false,
            false,
        );
        // Shares that change: both of the above, summed bucket by bucket.
        check(
            2.0,
            &[b(0, (1, 1.0), (0, 3.0)), b(1, (1, 3.0), (0, 1.0))],
            2.0 * 2f64.ln() + 0.8f64.ln() + (4.0f64 / 7.0).ln(),
            false,
            false,
        );
        // A bucket whose control tills were all offline says nothing, nor
        // does one without canary tills, however many events it holds.
        check(2.0, &[b(0, (50, 5.0), (0, 0.0))], 0.0, false, false);
        check(2.0, &[b(0, (0, 0.0), (50, 5.0))], 0.0, false, false);
        check(2.0, &[b(0, (50, f64::NAN), (3, 5.0))], 0.0, false, false);
        // Decrease is bad (ratio 0.5, e.g. completed sales): a control
        // event now weighs ln((1+1)/(0.5+1)) = ln(4/3) toward failing.
        check(
            0.5,
            &[b(0, (0, 5.0), (11, 5.0))],
            11.0 * (4.0f64 / 3.0).ln(),
            true,
            false,
        );
        check(
            0.5,
            &[b(0, (1, 5.0), (0, 5.0))],
            0.5f64.ln() + (4.0f64 / 3.0).ln(),
            false,
            false,
        );
    }

    #[test]
    fn evidence_counts_rates_and_till_hours() {
        let mut test = CountTest::new(2.0, 0.05, 0.2);
        // 3 canary tills and 6 control tills for 40 minutes: 2 vs 1 events.
        for minute in 0..40 {
            let canary = u64::from(minute == 7 || minute == 30);
            let control = u64::from(minute == 12);
            test.add(&CountBucket::new(minute, (canary, 3.0), (control, 6.0)));
        }
        // A minute with the control offline: its event counts, weighs nothing.
        test.add(&CountBucket::new(40, (1, 3.0), (0, 0.0)));
        let e = test.evidence();
        assert_eq!(
            (e.canary_events, e.control_events, e.informative_events),
            (3, 1, 3)
        );
        assert!((e.canary_till_hours - 2.05).abs() < EPS);
        assert!((e.control_till_hours - 4.0).abs() < EPS);
        assert!((e.canary_rate_per_till_hour.unwrap() - 3.0 / 2.05).abs() < EPS);
        assert!((e.control_rate_per_till_hour.unwrap() - 0.25).abs() < EPS);
        // a = 3, b = 6: canary event ln 2 + ln(9/12), control event ln(9/12).
        let llr = 2.0 * 2f64.ln() + 3.0 * 0.75f64.ln();
        assert!((e.log_likelihood_ratio - llr).abs() < EPS);

        let empty = CountTest::new(2.0, 0.05, 0.2).evidence();
        assert_eq!(empty.canary_rate_per_till_hour, None);
        assert_eq!(empty.control_rate_per_till_hour, None);
    }
}
