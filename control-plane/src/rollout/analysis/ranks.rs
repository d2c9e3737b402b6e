//! Continuous signals (health-check latency, checkout durations): the
//! Mann–Whitney U test with a Hodges–Lehmann shift estimate and interval.
//!
//! # The test
//!
//! `U` counts the (canary, control) pairs where the canary value is the
//! larger, ties counting one half. Without a difference between the groups
//! it has mean `nm/2` and, with the correction for ties,
//! variance `nm/12 · ((N+1) − Σ(t³−t)/(N(N−1)))` (`N = n+m`, `t` the size
//! of each group of tied values); the p-value is one-sided, in the bad
//! direction, from the normal approximation with a continuity correction.
//! That approximation is why a rank test may not decide before each group
//! has `min_samples` values (at least 8; 20 by default).
//!
//! The size of the change is the Hodges–Lehmann estimate: the median of
//! all `nm` differences canary − control. Its interval (Moses's method) runs
//! from the `C`-th smallest difference to the `C`-th largest, with
//! `C = ⌊nm/2 − z·σ⌋`; the differences are never listed: the `k`-th
//! smallest is found by bisection over values, counting differences at or
//! below a value with two sorted lists in `O(n + m)`.
//!
//! # Decisions
//!
//! A signal tolerates a shift of `margin = effect × |median of the
//! control|` toward its bad direction. It fails when a shift beyond the
//! margin is shown: the Mann–Whitney test of the canary's values moved
//! back by the margin against the control's rejects "no worse" at the
//! look's level (a release exactly at the margin fails with probability
//! at most that level; one within it, less). It passes when the
//! interval's end toward the bad direction is within the margin: a shift
//! beyond it is ruled out at the same level. Both errors are therefore
//! bounded by `α` (for continuous signals `β` is not used; the interval
//! is two-sided at `1 − 2α/K`).
//!
//! # Repeated looks
//!
//! A rank test is not sequential: judged every minute it would fail a good
//! release far more often than its `α`. So it decides only at planned
//! looks: every `min_observation_minutes` after the wave starts and at
//! `max_observation_minutes`, `K` looks in all, each at level `α/K` (a
//! Bonferroni split, the simplest form of alpha spending). Between looks
//! the verdict of the last look stands (the data are cut at the look's
//! minute), so however often the engine asks, a good release fails with
//! probability at most `α` per signal.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, Normal};

/// Values of one continuous signal reported in one minute of a wave: every
/// value from every canary till and every control till, pooled over the
/// wave's stores (a distribution is compared, not a rate, so there is
/// nothing to stratify by store for the test to stay valid; but pooling
/// stores with different mixes of canary and control tills can shift the
/// comparison, so a policy should prefer count signals for store-driven
/// effects).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SampleBucket {
    /// Minutes since the wave started.
    pub minute: u32,
    pub canary: Vec<f64>,
    pub control: Vec<f64>,
}

/// The standard normal distribution.
pub(crate) fn standard_normal() -> Normal {
    // Mean 0 and standard deviation 1 are valid parameters.
    Normal::new(0.0, 1.0).expect("the standard normal's parameters are valid")
}

/// The Mann–Whitney statistic of `canary` against `control`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannWhitney {
    /// Pairs where the canary is larger, ties counting one half.
    pub u: f64,
    /// Its mean under "no difference": `nm/2`.
    pub mean: f64,
    /// Its standard deviation under "no difference", tie-corrected.
    pub sd: f64,
}

impl MannWhitney {
    /// Ranks both samples together (mid-ranks for ties).
    pub fn new(canary: &[f64], control: &[f64]) -> MannWhitney {
        let n = canary.len() as f64;
        let m = control.len() as f64;
        let mut all: Vec<(f64, bool)> = canary
            .iter()
            .map(|v| (*v, true))
            .chain(control.iter().map(|v| (*v, false)))
            .collect();
        all.sort_by(|x, y| x.0.total_cmp(&y.0));
        let total = all.len() as f64;
        let mut canary_ranks = 0.0;
        let mut ties = 0.0;
        let mut i = 0;
        while i < all.len() {
            let mut j = i;
            while j < all.len() && all[j].0 == all[i].0 {
                j += 1;
            }
            // Positions i..j (0-based) share the mid-rank of ranks i+1..=j.
            let rank = (i + 1 + j) as f64 / 2.0;
            let t = (j - i) as f64;
            ties += t * t * t - t;
            canary_ranks += rank * all[i..j].iter().filter(|(_, c)| *c).count() as f64;
            i = j;
        }
        let u = canary_ranks - n * (n + 1.0) / 2.0;
        let variance = if total > 1.0 {
            n * m / 12.0 * ((total + 1.0) - ties / (total * (total - 1.0)))
        } else {
            0.0
        };
        MannWhitney {
            u,
            mean: n * m / 2.0,
            sd: variance.max(0.0).sqrt(),
        }
    }

    /// The continuity-corrected z toward "the canary is larger"
    /// (`larger = true`) or "smaller", and its one-sided p-value. Without
    /// spread (every value equal) there is no evidence: z 0, p 1.
    pub fn one_sided(&self, larger: bool) -> (f64, f64) {
        if self.sd == 0.0 {
            return (0.0, 1.0);
        }
        let z = if larger {
            (self.u - self.mean - 0.5) / self.sd
        } else {
            (self.mean - self.u - 0.5) / self.sd
        };
        (z, 1.0 - standard_normal().cdf(z))
    }
}

/// How many differences `x − y` are at or below `d` (`x` and `y` sorted).
fn differences_at_most(x: &[f64], y: &[f64], d: f64) -> u64 {
    // For growing x, the y with x − y ≤ d (y ≥ x − d) start further right.
    let mut count = 0u64;
    let mut j = 0;
    for xi in x {
        while j < y.len() && y[j] < xi - d {
            j += 1;
        }
        count += (y.len() - j) as u64;
    }
    count
}

/// The `k`-th smallest (1-based) of the differences `x − y`, `x` and `y`
/// sorted and non-empty, `1 ≤ k ≤ nm`.
pub fn kth_difference(x: &[f64], y: &[f64], k: u64) -> f64 {
    let mut lo = x[0] - y[y.len() - 1];
    let mut hi = x[x.len() - 1] - y[0];
    if differences_at_most(x, y, lo) >= k {
        return lo;
    }
    // Invariant: fewer than k differences are at or below lo, at least k
    // at or below hi. Halving ends when lo and hi are adjacent floats
    // (at most a few thousand steps; about 60 for values of one scale).
    loop {
        let mid = lo + (hi - lo) / 2.0;
        if mid <= lo || mid >= hi {
            break;
        }
        if differences_at_most(x, y, mid) >= k {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    // The answer is the largest difference at or below hi: snap to it, so
    // the result is one of the differences exactly.
    let mut best = f64::NEG_INFINITY;
    for xi in x {
        // The smallest y ≥ xi − hi gives the largest xi − y ≤ hi.
        let j = y.partition_point(|v| *v < xi - hi);
        if j < y.len() {
            best = best.max(xi - y[j]);
        }
    }
    best
}

/// The Hodges–Lehmann shift of `canary` over `control` (the median of all
/// differences) and its two-sided interval at `1 − 2·tail`, whose ends
/// are `None` when the samples are too small for that level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shift {
    pub estimate: f64,
    pub low: Option<f64>,
    pub high: Option<f64>,
}

/// `canary` and `control` sorted and non-empty; `sd` from `MannWhitney`.
pub fn hodges_lehmann(canary: &[f64], control: &[f64], sd: f64, tail: f64) -> Shift {
    let pairs = canary.len() as u64 * control.len() as u64;
    let estimate = if pairs % 2 == 1 {
        kth_difference(canary, control, pairs.div_ceil(2))
    } else {
        (kth_difference(canary, control, pairs / 2)
            + kth_difference(canary, control, pairs / 2 + 1))
            / 2.0
    };
    let z = standard_normal().inverse_cdf(1.0 - tail);
    let c = (pairs as f64 / 2.0 - z * sd).floor();
    let (low, high) = if c >= 1.0 {
        let c = c as u64;
        (
            Some(kth_difference(canary, control, c)),
            Some(kth_difference(canary, control, pairs + 1 - c)),
        )
    } else {
        (None, None)
    };
    Shift {
        estimate,
        low,
        high,
    }
}

/// The median of sorted, non-empty values.
pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// What a continuous signal's test saw, as recorded with the verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankEvidence {
    /// The look the figures come from (1-based; 0: before the first look)
    /// and how many looks the wave plans.
    pub look: u32,
    pub looks: u32,
    /// Minutes of data the look used (from the wave's start).
    pub look_minute: u32,
    pub canary_samples: usize,
    pub control_samples: usize,
    pub canary_median: Option<f64>,
    pub control_median: Option<f64>,
    /// Mann–Whitney U of the canary's values moved back by the margin
    /// against the control's (pairs where the canary is larger, ties one
    /// half).
    pub u: Option<f64>,
    /// Its continuity-corrected z, toward the bad direction.
    pub z: Option<f64>,
    /// One-sided p-value of "worse by more than the margin".
    pub p_value: Option<f64>,
    /// The level each look is judged at: α per signal over the looks.
    pub alpha_per_look: f64,
    /// Hodges–Lehmann shift, canary − control, in the signal's unit.
    pub shift: Option<f64>,
    /// Its interval at `1 − 2·alpha_per_look`; `None` where unbounded.
    pub shift_low: Option<f64>,
    pub shift_high: Option<f64>,
    /// The tolerated shift toward the bad direction (`effect` × the
    /// control's median), in the signal's unit.
    pub margin: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook example, by hand.
    ///
    /// Canary `X = 14, 17, 19, 22` (n = 4), control `Y = 11, 12, 14, 15,
    /// 16` (m = 5). Together, sorted: 11 12 14 14 15 16 17 19 22, ranks
    /// 1 2 3.5 3.5 5 6 7 8 9 (the two 14s share 3.5). The canary's rank
    /// sum is 3.5 + 7 + 8 + 9 = 27.5, so `U = 27.5 − 4·5/2 = 17.5` (by
    /// pairs: 14 beats 11 and 12 and ties 14: 2.5; 17, 19 and 22 beat all
    /// five: 15). Mean `nm/2 = 10`. One tie of size 2: `Σ(t³−t) = 6`, so
    /// the variance is `20/12 · (10 − 6/72) = 16.52778`, sd 4.06544.
    /// Toward "the canary is larger": `z = (17.5 − 10 − 0.5)/4.06544 =
    /// 1.72183`, `p = 1 − Φ(1.72183) = 0.04255`.
    ///
    /// The 20 differences x − y, sorted: −2 −1 0 1 2 2 3 3 3 4 | 5 5 6 6
    /// 7 7 8 8 10 11; the Hodges–Lehmann shift is the mean of the 10th and
    /// 11th, (4 + 5)/2 = 4.5. The 90% interval (5% each side, z 1.64485):
    /// `C = ⌊10 − 1.64485 · 4.06544⌋ = ⌊3.3129⌋ = 3`, so it runs from the
    /// 3rd smallest difference, 0, to the 3rd largest (the 18th), 8.
    #[test]
    fn textbook_example_by_hand() {
        let x = [14.0, 17.0, 19.0, 22.0];
        let y = [11.0, 12.0, 14.0, 15.0, 16.0];
        let mw = MannWhitney::new(&x, &y);
        assert_eq!(mw.u, 17.5);
        assert_eq!(mw.mean, 10.0);
        assert!((mw.sd - 4.065437).abs() < 1e-6, "sd {}", mw.sd);
        let (z, p) = mw.one_sided(true);
        assert!((z - 1.721832).abs() < 1e-6, "z {z}");
        assert!((p - 0.04255).abs() < 5e-5, "p {p}");
        // The other direction: z = (10 − 17.5 − 0.5)/sd, p near 1.
        let (z, p) = mw.one_sided(false);
        assert!((z + 8.0 / 4.065437).abs() < 1e-6);
        assert!(p > 0.97);

        let shift = hodges_lehmann(&x, &y, mw.sd, 0.05);
        assert_eq!(shift.estimate, 4.5);
        assert_eq!((shift.low, shift.high), (Some(0.0), Some(8.0)));
        assert_eq!(median(&y), 14.0);
        assert_eq!(median(&x), 18.0);
    }

    /// `check(x, y, k, expected)`: the k-th smallest difference, against
    /// listing all of them.
    fn check(x: &[f64], y: &[f64]) {
        let mut all: Vec<f64> = x
            .iter()
            .flat_map(|a| y.iter().map(move |b| a - b))
            .collect();
        all.sort_by(f64::total_cmp);
        for (i, expected) in all.iter().enumerate() {
            let got = kth_difference(x, y, i as u64 + 1);
            assert_eq!(got, *expected, "k = {} of {x:?} − {y:?}", i + 1);
        }
    }

    #[test]
    fn kth_difference_matches_listing_them() {
        check(&[14.0, 17.0, 19.0, 22.0], &[11.0, 12.0, 14.0, 15.0, 16.0]);
        check(&[1.0], &[1.0]);
        check(&[0.1, 0.1, 0.1], &[0.3, 0.3]);
        check(&[-3.5, 0.25, 7.125, 1e6], &[-1e-3, 2.0, 2.0, 9.75]);
        check(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3.5]);
    }

    #[test]
    fn no_spread_is_no_evidence() {
        let mw = MannWhitney::new(&[5.0; 10], &[5.0; 12]);
        assert_eq!(mw.u, 60.0);
        assert_eq!(mw.one_sided(true), (0.0, 1.0));
    }

    #[test]
    fn small_samples_have_no_interval_at_strict_levels() {
        // n = m = 3: nm/2 = 4.5 and sd = 2.29; at 1% a side C = ⌊4.5 −
        // 2.326·2.29⌋ = ⌊−0.83⌋ < 1.
        let x = [1.0, 2.0, 3.0];
        let y = [4.0, 5.0, 6.0];
        let mw = MannWhitney::new(&x, &y);
        let shift = hodges_lehmann(&x, &y, mw.sd, 0.01);
        assert_eq!(shift.estimate, -3.0);
        assert_eq!((shift.low, shift.high), (None, None));
    }
}
