//! canary-sim: how often canary analysis fails a release that is as good as
//! the old one, and how soon it fails one that crashes three times as
//! often, for the sequential test the control plane runs and for a
//! fixed-horizon test on the same simulated data.
//!
//! Each simulated wave puts `C` canary tills (3, 5, 10, 20) into stores of
//! 3 to 20 tills (at most half of a store's tills, the rest its controls).
//! Stores open 07:00 to 22:00; a daily profile (a lunch rush three times
//! the morning's rate, a smaller evening peak) drives the crash rate of
//! both groups alike, and a till is offline for a whole hour now and then.
//! Crashes are Poisson, per store, group and hour, placed at random
//! minutes. The wave starts at a random opening hour and is looked at every
//! simulated minute:
//!
//! - `sequential`: the control plane's own `judge_count` and `combine`
//!   (`posfleet_control_plane::rollout::analysis`), every minute, until
//!   the wave passes, fails or reaches its maximum observation;
//! - `fixed_once`: a one-sided score test of the canary's share of the
//!   events (conditional on each store-minute's events and exposure
//!   shares, so the daily profile cancels as it does for the sequential
//!   test), looked at once, at the horizon;
//! - `fixed_peeking`: the same test looked at every minute from the
//!   minimum observation to the horizon, stopping at the first rejection:
//!   the mistake the sequential test exists to avoid.
//!
//! Every wave draws from its own seed, so runs are deterministic and the
//! three tests see the same crashes. Figures go to a JSON file.
//!
//!     cargo run --release -p posfleet-e2e --bin canary-sim

use clap::Parser;
use posfleet_control_plane::rollout::analysis::{
    AnalysisPolicy, CountBucket, Verdict, combine, count_test, judge_count,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Poisson};
use serde::Serialize;
use statrs::distribution::{ContinuousCDF, Normal};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Parser)]
#[command(
    about = "Simulate canary analysis: false alarms and detection, sequential vs fixed-horizon."
)]
struct Args {
    /// Simulated waves per scenario (canary size × release).
    #[arg(long, default_value_t = 2000)]
    waves: u64,
    /// Canary tills per wave, one scenario each.
    #[arg(long, value_delimiter = ',', default_value = "3,5,10,20")]
    canary_tills: Vec<u32>,
    /// Crashes per till-hour at the profile's base level (mornings).
    #[arg(long, default_value_t = 0.05)]
    base_rate: f64,
    /// The bad release's crash rate, as a multiple of the old one's.
    #[arg(long, default_value_t = 3.0)]
    bad_ratio: f64,
    /// The policy's effect: the test is built to catch a rate 1 + effect
    /// times the control's.
    #[arg(long, default_value_t = 1.0)]
    effect: f64,
    #[arg(long, default_value_t = 0.05)]
    alpha: f64,
    #[arg(long, default_value_t = 0.2)]
    beta: f64,
    #[arg(long, default_value_t = 30)]
    min_observation_minutes: u32,
    /// Maximum observation per wave; the peeking fixed-horizon test looks
    /// up to it.
    #[arg(long, default_value_t = 72)]
    max_observation_hours: u32,
    /// Horizons of the fixed-horizon test looked at once (each at most the
    /// maximum observation).
    #[arg(long, value_delimiter = ',', default_value = "24,72")]
    fixed_horizon_hours: Vec<u32>,
    /// Canary till-hours needed before a pass.
    #[arg(long, default_value_t = 1.0)]
    min_canary_till_hours: f64,
    /// Chance a till is offline for a given hour.
    #[arg(long, default_value_t = 0.05)]
    offline_probability: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value = "benchmarks/canary-sim.json")]
    output: PathBuf,
}

/// The crash rate's multiple by hour of the day; 0 while the store is
/// closed (its tills are off).
fn profile(hour_of_day: u32) -> f64 {
    match hour_of_day {
        7..=10 => 1.0,
        11..=13 => 3.0,
        14..=16 => 1.5,
        17..=19 => 2.0,
        20..=21 => 1.0,
        _ => 0.0,
    }
}

/// A store of the wave: how many of its tills run the release.
struct Store {
    canary: u32,
    control: u32,
}

/// Stores of 3 to 20 tills, at most half of each in the canary, until
/// `canary` canary tills are placed.
fn stores(rng: &mut StdRng, canary: u32) -> Vec<Store> {
    let mut left = canary;
    let mut out = vec![];
    while left > 0 {
        let tills = rng.gen_range(3..=20u32);
        let here = (tills / 2).min(left);
        left -= here;
        out.push(Store {
            canary: here,
            control: tills - here,
        });
    }
    out
}

/// Per minute of the wave: `(events, tills online)` of one group of one store.
type Series = Vec<(u64, u32)>;

/// One group's crashes and exposure, minute by minute, over `hours` from
/// `start_hour` (of the day).
fn group_series(
    rng: &mut StdRng,
    tills: u32,
    rate: f64,
    start_hour: u32,
    hours: u32,
    offline: f64,
) -> Series {
    let mut series = vec![(0u64, 0u32); hours as usize * 60];
    for h in 0..hours {
        let factor = profile((start_hour + h) % 24);
        if factor == 0.0 {
            continue;
        }
        let online = (0..tills).filter(|_| !rng.gen_bool(offline)).count() as u32;
        let mean = rate * factor * f64::from(online);
        let events = if mean > 0.0 {
            // A positive mean is a valid Poisson parameter.
            Poisson::new(mean).expect("positive mean").sample(rng) as u64
        } else {
            0
        };
        let hour = &mut series[h as usize * 60..(h as usize + 1) * 60];
        for minute in hour.iter_mut() {
            minute.1 = online;
        }
        for _ in 0..events {
            hour[rng.gen_range(0..60)].0 += 1;
        }
    }
    series
}

/// The fixed-horizon test: the canary's events against their expectation
/// under "no change", given each bucket's events and exposure shares.
#[derive(Default, Clone, Copy)]
struct ScoreTest {
    observed: f64,
    expected: f64,
    variance: f64,
}

impl ScoreTest {
    fn add(&mut self, b: &CountBucket) {
        let (a, c) = (b.canary.till_minutes, b.control.till_minutes);
        let n = (b.canary.events + b.control.events) as f64;
        if a <= 0.0 || c <= 0.0 || n == 0.0 {
            return;
        }
        let p = a / (a + c);
        self.observed += b.canary.events as f64;
        self.expected += n * p;
        self.variance += n * p * (1.0 - p);
    }

    /// One-sided, continuity-corrected: is the canary's share too high?
    fn rejects(&self, z_critical: f64) -> bool {
        self.variance > 0.0
            && (self.observed - self.expected - 0.5) / self.variance.sqrt() >= z_critical
    }
}

/// When a test decided, in wall hours since the wave started and canary
/// till-hours.
#[derive(Clone, Copy)]
struct Decision {
    hours: f64,
    canary_till_hours: f64,
}

/// What the three tests decided on one simulated wave.
struct WaveResult {
    stores: usize,
    control_tills: u32,
    sequential: Verdict,
    sequential_at: Decision,
    /// Per horizon of `fixed_horizon_hours`.
    fixed_once: Vec<Option<Decision>>,
    fixed_peeking: Option<Decision>,
}

fn simulate_wave(
    args: &Args,
    policy: &AnalysisPolicy,
    canary: u32,
    ratio: f64,
    seed: u64,
) -> WaveResult {
    let mut rng = StdRng::seed_from_u64(seed);
    let hours = args.max_observation_hours;
    let start_hour = rng.gen_range(7..22u32);
    let stores = stores(&mut rng, canary);
    // Each group of each store draws from its own seed, so the good and
    // the bad release see the same stores, hours online and control
    // crashes.
    let series: Vec<(Series, Series)> = stores
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let group_rng =
                |g: u64| StdRng::seed_from_u64(seed ^ ((i as u64 + 1) << 32) ^ (g << 30));
            let c = group_series(
                &mut group_rng(1),
                s.canary,
                args.base_rate * ratio,
                start_hour,
                hours,
                args.offline_probability,
            );
            let k = group_series(
                &mut group_rng(2),
                s.control,
                args.base_rate,
                start_hour,
                hours,
                args.offline_probability,
            );
            (c, k)
        })
        .collect();

    let (name, signal) = policy
        .signals()
        .iter()
        .next()
        .expect("the policy has one signal");
    let z_critical = standard_normal().inverse_cdf(1.0 - args.alpha);
    let mut sequential = count_test(policy, signal);
    let mut score = ScoreTest::default();
    let mut canary_till_minutes = 0.0;
    let mut result = WaveResult {
        stores: stores.len(),
        control_tills: stores.iter().map(|s| s.control).sum(),
        sequential: Verdict::Inconclusive,
        sequential_at: Decision {
            hours: 0.0,
            canary_till_hours: 0.0,
        },
        fixed_once: vec![None; args.fixed_horizon_hours.len()],
        fixed_peeking: None,
    };
    let mut sequential_done = false;
    for minute in 0..hours * 60 {
        for (c, k) in &series {
            let (ce, co) = c[minute as usize];
            let (ke, ko) = k[minute as usize];
            let bucket = CountBucket::new(minute, (ce, f64::from(co)), (ke, f64::from(ko)));
            canary_till_minutes += f64::from(co);
            if !sequential_done {
                sequential.add(&bucket);
            }
            score.add(&bucket);
        }
        let elapsed = minute + 1;
        let now = Decision {
            hours: f64::from(elapsed) / 60.0,
            canary_till_hours: canary_till_minutes / 60.0,
        };
        if !sequential_done {
            let judgement = combine(
                policy,
                elapsed,
                vec![judge_count(policy, name, signal, &sequential)],
            );
            if judgement.verdict != Verdict::Observing {
                result.sequential = judgement.verdict;
                result.sequential_at = now;
                sequential_done = true;
            }
        }
        if result.fixed_peeking.is_none()
            && elapsed >= args.min_observation_minutes
            && score.rejects(z_critical)
        {
            result.fixed_peeking = Some(now);
        }
        for (i, horizon) in args.fixed_horizon_hours.iter().enumerate() {
            if elapsed == horizon * 60 && score.rejects(z_critical) {
                result.fixed_once[i] = Some(now);
            }
        }
    }
    result
}

fn standard_normal() -> Normal {
    // Mean 0 and standard deviation 1 are valid parameters.
    Normal::new(0.0, 1.0).expect("valid parameters")
}

/// Percentiles of a sample (`None` when empty).
#[derive(Serialize)]
struct Spread {
    p10: f64,
    p50: f64,
    p90: f64,
}

fn spread(mut values: Vec<f64>) -> Option<Spread> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    Some(Spread {
        p10: at(0.1),
        p50: at(0.5),
        p90: at(0.9),
    })
}

/// One test's figures in one scenario.
#[derive(Serialize)]
struct TestFigures {
    /// Share of the waves it failed.
    fail_rate: f64,
    /// Wall hours from the wave's start to the failure, over failed waves.
    hours_to_fail: Option<Spread>,
    /// Canary till-hours (tills online × hours) until the failure.
    canary_till_hours_to_fail: Option<Spread>,
}

#[derive(Serialize)]
struct SequentialFigures {
    #[serde(flatten)]
    figures: TestFigures,
    pass_rate: f64,
    inconclusive_rate: f64,
    /// Wall hours until a pass, over passed waves.
    hours_to_pass: Option<Spread>,
}

#[derive(Serialize)]
struct FixedFigures {
    horizon_hours: u32,
    #[serde(flatten)]
    figures: TestFigures,
}

#[derive(Serialize)]
struct Scenario {
    canary_tills: u32,
    /// "good" (the old crash rate) or "bad" (`bad_ratio` times it).
    release: &'static str,
    crash_ratio: f64,
    waves: u64,
    /// Stores per wave, and control tills per wave, on average.
    mean_stores: f64,
    mean_control_tills: f64,
    sequential: SequentialFigures,
    fixed_once: Vec<FixedFigures>,
    fixed_peeking: TestFigures,
}

#[derive(Serialize)]
struct Parameters {
    waves: u64,
    base_rate_per_till_hour: f64,
    lunch_rush_multiple: f64,
    bad_ratio: f64,
    effect: f64,
    alpha: f64,
    beta: f64,
    min_observation_minutes: u32,
    max_observation_hours: u32,
    fixed_horizon_hours: Vec<u32>,
    min_canary_till_hours: f64,
    offline_probability_per_till_hour: f64,
    seed: u64,
    policy_toml: String,
}

#[derive(Serialize)]
struct Figures {
    command: String,
    commit: Option<String>,
    parameters: Parameters,
    seconds: f64,
    scenarios: Vec<Scenario>,
}

fn test_figures(waves: u64, decisions: impl Iterator<Item = Option<Decision>>) -> TestFigures {
    let failed: Vec<Decision> = decisions.flatten().collect();
    TestFigures {
        fail_rate: failed.len() as f64 / waves as f64,
        hours_to_fail: spread(failed.iter().map(|d| d.hours).collect()),
        canary_till_hours_to_fail: spread(failed.iter().map(|d| d.canary_till_hours).collect()),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let policy_toml = format!(
        "min_observation_minutes = {}\nmax_observation_minutes = {}\nmin_canary_till_hours = {}\n\
         alpha = {}\nbeta = {}\n\n[signals.crashes]\nkind = \"count\"\neffect = {}\n",
        args.min_observation_minutes,
        args.max_observation_hours * 60,
        args.min_canary_till_hours,
        args.alpha,
        args.beta,
        args.effect,
    );
    let policy = AnalysisPolicy::from_toml(&policy_toml)?;
    if let Some(h) = args
        .fixed_horizon_hours
        .iter()
        .find(|h| **h == 0 || **h > args.max_observation_hours)
    {
        anyhow::bail!(
            "--fixed-horizon-hours {h} must lie between 1 and --max-observation-hours {}",
            args.max_observation_hours
        );
    }
    let started = Instant::now();
    let mut scenarios = vec![];
    for (size_index, &canary) in args.canary_tills.iter().enumerate() {
        for (release, ratio) in [("good", 1.0), ("bad", args.bad_ratio)] {
            let results: Vec<WaveResult> = (0..args.waves)
                .map(|w| {
                    // The same seeds for the good and the bad release.
                    let seed = args.seed.wrapping_mul(1_000_003) ^ ((size_index as u64) << 48) ^ w;
                    simulate_wave(&args, &policy, canary, ratio, seed)
                })
                .collect();
            let n = args.waves as f64;
            let share =
                |v: Verdict| results.iter().filter(|r| r.sequential == v).count() as f64 / n;
            let scenario = Scenario {
                canary_tills: canary,
                release,
                crash_ratio: ratio,
                waves: args.waves,
                mean_stores: results.iter().map(|r| r.stores as f64).sum::<f64>() / n,
                mean_control_tills: results
                    .iter()
                    .map(|r| f64::from(r.control_tills))
                    .sum::<f64>()
                    / n,
                sequential: SequentialFigures {
                    figures: test_figures(
                        args.waves,
                        results
                            .iter()
                            .map(|r| (r.sequential == Verdict::Fail).then_some(r.sequential_at)),
                    ),
                    pass_rate: share(Verdict::Pass),
                    inconclusive_rate: share(Verdict::Inconclusive),
                    hours_to_pass: spread(
                        results
                            .iter()
                            .filter(|r| r.sequential == Verdict::Pass)
                            .map(|r| r.sequential_at.hours)
                            .collect(),
                    ),
                },
                fixed_once: args
                    .fixed_horizon_hours
                    .iter()
                    .enumerate()
                    .map(|(i, h)| FixedFigures {
                        horizon_hours: *h,
                        figures: test_figures(args.waves, results.iter().map(|r| r.fixed_once[i])),
                    })
                    .collect(),
                fixed_peeking: test_figures(args.waves, results.iter().map(|r| r.fixed_peeking)),
            };
            eprintln!(
                "{canary:>2} canary tills, {release} release: sequential fails {:.3} (p50 {:.1} h), \
                 passes {:.3}; fixed once {:?}; fixed peeking {:.3}",
                scenario.sequential.figures.fail_rate,
                scenario
                    .sequential
                    .figures
                    .hours_to_fail
                    .as_ref()
                    .map_or(f64::NAN, |s| s.p50),
                scenario.sequential.pass_rate,
                scenario
                    .fixed_once
                    .iter()
                    .map(|f| f.figures.fail_rate)
                    .collect::<Vec<_>>(),
                scenario.fixed_peeking.fail_rate,
            );
            scenarios.push(scenario);
        }
    }
    let figures = Figures {
        command: posfleet_e2e::command_line(),
        commit: posfleet_e2e::measured_commit(),
        parameters: Parameters {
            waves: args.waves,
            base_rate_per_till_hour: args.base_rate,
            lunch_rush_multiple: profile(12),
            bad_ratio: args.bad_ratio,
            effect: args.effect,
            alpha: args.alpha,
            beta: args.beta,
            min_observation_minutes: args.min_observation_minutes,
            max_observation_hours: args.max_observation_hours,
            fixed_horizon_hours: args.fixed_horizon_hours.clone(),
            min_canary_till_hours: args.min_canary_till_hours,
            offline_probability_per_till_hour: args.offline_probability,
            seed: args.seed,
            policy_toml,
        },
        seconds: started.elapsed().as_secs_f64(),
        scenarios,
    };
    if let Some(dir) = args.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.output, serde_json::to_string_pretty(&figures)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&figures)?);
    Ok(())
}
