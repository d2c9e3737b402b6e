//! Wave-level table tests of canary analysis through `judge_wave`, and
//! simulated waves measuring its false-alarm rate and its power.

use super::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, LogNormal, Poisson};

const POLICY: &str = r#"
on_fail = "rollback"
[signals.crashes]
kind = "count"
[signals.latency_ms]
kind = "continuous"
effect = 0.2
"#;

fn policy(text: &str) -> AnalysisPolicy {
    AnalysisPolicy::from_toml(text).unwrap()
}

/// `minutes` buckets of one store: `canary` and `control` tills online,
/// one event at each listed minute.
fn counts(
    minutes: u32,
    canary: f64,
    control: f64,
    canary_at: &[u32],
    control_at: &[u32],
) -> SignalData {
    SignalData::Counts(
        (0..minutes)
            .map(|m| {
                let c = canary_at.iter().filter(|x| **x == m).count() as u64;
                let k = control_at.iter().filter(|x| **x == m).count() as u64;
                CountBucket::new(m, (c, canary), (k, control))
            })
            .collect(),
    )
}

/// `n` values per group, one of each per minute: the control's spread
/// evenly over 100..150, the canary's the same times `scale`.
fn samples(n: u32, scale: f64) -> SignalData {
    SignalData::Samples(
        (0..n)
            .map(|m| {
                let v = 100.0 + f64::from(m * 37 % 50);
                SampleBucket {
                    minute: m,
                    canary: vec![v * scale],
                    control: vec![v],
                }
            })
            .collect(),
    )
}

fn wave(elapsed_minutes: u32, signals: Vec<(&str, SignalData)>) -> WaveObservation {
    WaveObservation {
        elapsed_minutes,
        signals: signals
            .into_iter()
            .map(|(n, d)| (n.to_string(), d))
            .collect(),
    }
}

/// Judges `wave` under `policy` and checks the verdict, that the
/// reason holds `reason`, and the action.
fn check(
    policy: &AnalysisPolicy,
    wave: WaveObservation,
    verdict: Verdict,
    reason: &str,
    action: Action,
) {
    let got = judge_wave(policy, &wave);
    assert_eq!(got.verdict, verdict, "{}", got.summary());
    assert!(
        got.reason.contains(reason),
        "{:?} lacks {reason:?}",
        got.reason
    );
    assert_eq!(got.action(policy), action, "{}", got.summary());
    assert_eq!(got.signals.len(), policy.signals().len());
}

#[test]
fn count_signal_verdicts() {
    let p = policy("[signals.crashes]\nkind = \"count\"\n");
    let eleven: Vec<u32> = (0..11).collect();
    // Eleven crashes on the canary, none on as many control tills:
    // log-LR 11·ln(4/3) = 3.16 ≥ ln 20. Fails before the minimum.
    check(
        &p,
        wave(12, vec![("crashes", counts(12, 5.0, 5.0, &eleven, &[]))]),
        Verdict::Fail,
        "worse on the canary: crashes",
        Action::Pause,
    );
    // Ten: short of it, and before the minimum observation.
    check(
        &p,
        wave(
            12,
            vec![("crashes", counts(12, 5.0, 5.0, &eleven[..10], &[]))],
        ),
        Verdict::Observing,
        "watched 12 of at least 30",
        Action::Wait,
    );
    // Four control crashes, none on the canary, 5 canary till-hours.
    check(
        &p,
        wave(
            60,
            vec![("crashes", counts(60, 5.0, 5.0, &[], &[3, 9, 20, 41]))],
        ),
        Verdict::Pass,
        "every signal passed",
        Action::Proceed,
    );
    // The same before the minimum observation: no Pass yet.
    check(
        &p,
        wave(
            29,
            vec![("crashes", counts(29, 5.0, 5.0, &[], &[3, 9, 20, 21]))],
        ),
        Verdict::Observing,
        "watched 29",
        Action::Wait,
    );
    // Only half a canary till online for an hour: 0.5 till-hours of 1.
    check(
        &p,
        wave(
            60,
            vec![("crashes", counts(60, 0.5, 5.0, &[], &[3, 9, 20, 41]))],
        ),
        Verdict::Observing,
        "undecided: crashes",
        Action::Wait,
    );
    check(
        &p,
        wave(
            240,
            vec![("crashes", counts(240, 0.125, 5.0, &[], &[3, 9, 20, 41]))],
        ),
        Verdict::Inconclusive,
        "crashes: not enough till-hours: 0.50 of 1.00",
        Action::Pause,
    );
    // No crash at all by the maximum: nothing to tell the groups apart.
    check(
        &p,
        wave(240, vec![("crashes", counts(240, 5.0, 5.0, &[], &[]))]),
        Verdict::Inconclusive,
        "crashes: no events yet",
        Action::Pause,
    );
    // One crash each: undecided.
    check(
        &p,
        wave(240, vec![("crashes", counts(240, 5.0, 5.0, &[7], &[8]))]),
        Verdict::Inconclusive,
        "crashes: the evidence has reached neither bound",
        Action::Pause,
    );
    // Every till of the store runs the release: no controls, decided
    // as soon as the minimum observation is over.
    check(
        &p,
        wave(30, vec![("crashes", counts(30, 5.0, 0.0, &[], &[]))]),
        Verdict::Inconclusive,
        "no concurrent control tills",
        Action::Pause,
    );
    check(
        &p,
        wave(29, vec![("crashes", counts(29, 5.0, 0.0, &[], &[]))]),
        Verdict::Observing,
        "watched 29",
        Action::Wait,
    );
    // Nothing reported, or the wrong kind of data.
    check(
        &p,
        wave(240, vec![]),
        Verdict::Inconclusive,
        "crashes: no data reported",
        Action::Pause,
    );
    check(
        &p,
        wave(240, vec![("crashes", samples(40, 1.0))]),
        Verdict::Inconclusive,
        "crashes: reported as the wrong kind of data (the policy says count)",
        Action::Pause,
    );
    // A bad direction of decrease: completed sales fall on the canary.
    let sales = policy(
        "on_inconclusive = \"continue\"\n[signals.sales]\nkind = \"count\"\nbad = \"decrease\"\neffect = 0.5\n",
    );
    check(
        &sales,
        wave(40, vec![("sales", counts(40, 5.0, 5.0, &[], &eleven))]),
        Verdict::Fail,
        "worse on the canary: sales",
        Action::Pause,
    );
    check(
        &sales,
        wave(240, vec![("sales", counts(240, 5.0, 5.0, &[1], &[2]))]),
        Verdict::Inconclusive,
        "sales: the evidence has reached neither bound",
        Action::Proceed,
    );
}

#[test]
fn rank_signal_verdicts() {
    let p = policy("[signals.latency_ms]\nkind = \"continuous\"\neffect = 0.2\n");
    // 30 values each at the first look (minute 30), the canary 50%
    // slower: shift ≈ 62 ms, margin 20% of 124.5.
    check(
        &p,
        wave(30, vec![("latency_ms", samples(60, 1.5))]),
        Verdict::Fail,
        "worse on the canary: latency_ms",
        Action::Pause,
    );
    check(
        &p,
        wave(30, vec![("latency_ms", samples(60, 1.0))]),
        Verdict::Pass,
        "every signal passed",
        Action::Proceed,
    );
    // 5% slower: inside the 20% margin, a pass.
    check(
        &p,
        wave(30, vec![("latency_ms", samples(60, 1.05))]),
        Verdict::Pass,
        "every signal passed",
        Action::Proceed,
    );
    // Before the first look nothing is judged, not even a fail.
    check(
        &p,
        wave(29, vec![("latency_ms", samples(60, 1.5))]),
        Verdict::Observing,
        "watched 29",
        Action::Wait,
    );
    // Ten values a group (fewer than 20) up to the maximum.
    check(
        &p,
        wave(240, vec![("latency_ms", samples(10, 1.5))]),
        Verdict::Inconclusive,
        "latency_ms: too few values: canary 10, control 10, 20 needed",
        Action::Pause,
    );
    // Faster is not bad when an increase is.
    check(
        &p,
        wave(60, vec![("latency_ms", samples(60, 0.5))]),
        Verdict::Pass,
        "every signal passed",
        Action::Proceed,
    );
    let throughput = policy(
        "[signals.scans_per_second]\nkind = \"continuous\"\nbad = \"decrease\"\neffect = 0.2\n",
    );
    check(
        &throughput,
        wave(60, vec![("scans_per_second", samples(60, 0.5))]),
        Verdict::Fail,
        "worse on the canary: scans_per_second",
        Action::Pause,
    );
    check(
        &throughput,
        wave(60, vec![("scans_per_second", samples(60, 1.5))]),
        Verdict::Pass,
        "every signal passed",
        Action::Proceed,
    );
}

#[test]
fn rank_looks_cut_the_data_at_the_look() {
    let p = policy("[signals.latency_ms]\nkind = \"continuous\"\n");
    // Good values up to minute 30, then very bad ones: the look at 30
    // uses only the first; the verdict stands until the look at 60.
    let mut data = match samples(30, 1.0) {
        SignalData::Samples(b) => b,
        SignalData::Counts(_) => unreachable!(),
    };
    data.extend((30..60).map(|m| SampleBucket {
        minute: m,
        canary: vec![1000.0; 5],
        control: vec![100.0],
    }));
    let data = SignalData::Samples(data);
    for elapsed in [30, 45, 59] {
        let j = judge_wave(&p, &wave(elapsed, vec![("latency_ms", data.clone())]));
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.summary());
        let TestEvidence::MannWhitney(e) = &j.signals[0].test else {
            panic!("not a rank test: {j:?}")
        };
        assert_eq!(
            (e.look, e.looks, e.look_minute, e.canary_samples),
            (1, 8, 30, 30)
        );
        // 0.05 over 8 looks.
        assert!((e.alpha_per_look - 0.05 / 8.0).abs() < 1e-12);
    }
    let j = judge_wave(&p, &wave(60, vec![("latency_ms", data)]));
    assert_eq!(j.verdict, Verdict::Fail, "{}", j.summary());
}

#[test]
fn signals_combine() {
    let p = policy(POLICY);
    let good = ("crashes", counts(60, 5.0, 5.0, &[], &[3, 9, 20, 41]));
    let bad = (
        "crashes",
        counts(60, 5.0, 5.0, &(0..11).collect::<Vec<_>>(), &[]),
    );
    // α = 0.05 over two signals: a count fails at ln 40 = 3.69, so
    // eleven canary crashes (3.16) are not enough with two signals.
    check(
        &p,
        wave(60, vec![bad.clone(), ("latency_ms", samples(60, 1.0))]),
        Verdict::Observing,
        "undecided: crashes",
        Action::Wait,
    );
    let worse = (
        "crashes",
        counts(60, 5.0, 5.0, &(0..13).collect::<Vec<_>>(), &[]),
    );
    check(
        &p,
        wave(60, vec![worse, ("latency_ms", samples(60, 1.0))]),
        Verdict::Fail,
        "worse on the canary: crashes",
        Action::Rollback,
    );
    check(
        &p,
        wave(60, vec![good.clone(), ("latency_ms", samples(60, 1.5))]),
        Verdict::Fail,
        "worse on the canary: latency_ms",
        Action::Rollback,
    );
    check(
        &p,
        wave(60, vec![good.clone(), ("latency_ms", samples(60, 1.0))]),
        Verdict::Pass,
        "every signal passed",
        Action::Proceed,
    );
    check(
        &p,
        wave(240, vec![good.clone()]),
        Verdict::Inconclusive,
        "latency_ms: no data reported",
        Action::Pause,
    );
    // Controls on one signal are enough to go on watching.
    check(
        &p,
        wave(60, vec![good, ("latency_ms", SignalData::Samples(vec![]))]),
        Verdict::Observing,
        "undecided: latency_ms",
        Action::Wait,
    );
}

#[test]
fn judgements_serialize_and_summarize() {
    let p = policy(POLICY);
    let j = judge_wave(
        &p,
        &wave(
            60,
            vec![
                (
                    "crashes",
                    counts(60, 5.0, 5.0, &(0..13).collect::<Vec<_>>(), &[]),
                ),
                ("latency_ms", samples(60, 1.0)),
            ],
        ),
    );
    let json = serde_json::to_value(&j).unwrap();
    assert_eq!(json["verdict"], "fail");
    assert_eq!(json["signals"][0]["signal"], "crashes");
    assert_eq!(json["signals"][0]["test"], "sprt");
    assert_eq!(json["signals"][0]["status"], "fail");
    assert_eq!(json["signals"][0]["canary_events"], 13);
    assert_eq!(json["signals"][1]["test"], "mann_whitney");
    assert_eq!(json["signals"][1]["status"], "pass");
    let back: Judgement = serde_json::from_value(json).unwrap();
    assert_eq!(back, j);
    let line = j.summary();
    assert!(!line.contains('\n'));
    assert!(
        line.starts_with("Fail after 60 min: worse on the canary: crashes. crashes FAIL: "),
        "{line}"
    );
    assert!(
        line.contains(
            "canary 13 in 5.0 till-h (2.60/till-h) vs control 0 in 5.0 till-h (0.00/till-h)"
        ),
        "{line}"
    );
    assert!(
        !line.contains("latency_ms"),
        "only the failed signal: {line}"
    );
}

/// Simulated waves of one store with 5 canary and 5 control tills, a
/// crash rate of 0.5 per till-hour tripled over a two-hour lunch
/// rush, judged every minute for up to 12 hours.
fn simulate_counts(ratio: f64, waves: u64) -> (u64, Vec<u32>) {
    let p = policy("max_observation_minutes = 720\n[signals.crashes]\nkind = \"count\"\n");
    let signal = &p.signals()["crashes"];
    let mut fails = 0;
    let mut minutes_to_fail = vec![];
    for seed in 0..waves {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut test = count_test(&p, signal);
        for minute in 0..720u32 {
            let rush = if (180..300).contains(&minute) {
                3.0
            } else {
                1.0
            };
            let per_till = 0.5 / 60.0 * rush;
            let draw = |rng: &mut StdRng, mean: f64| Poisson::new(mean).unwrap().sample(rng) as u64;
            let c = draw(&mut rng, 5.0 * per_till * ratio);
            let k = draw(&mut rng, 5.0 * per_till);
            test.add(&CountBucket::new(minute, (c, 5.0), (k, 5.0)));
            let j = combine(
                &p,
                minute + 1,
                vec![judge_count(&p, "crashes", signal, &test)],
            );
            match j.verdict {
                Verdict::Fail => {
                    fails += 1;
                    minutes_to_fail.push(minute + 1);
                    break;
                }
                Verdict::Observing => {}
                // A pass ends the wave: it would go on to the next.
                Verdict::Pass | Verdict::Inconclusive => break,
            }
        }
    }
    minutes_to_fail.sort_unstable();
    (fails, minutes_to_fail)
}

#[test]
fn simulated_false_alarms_stay_under_alpha() {
    // 600 waves of a release as good as the old one, looked at every
    // minute: at most α = 5% may fail (with room for chance: 600
    // waves at 5% would fail 30 ± 5.3).
    let (fails, _) = simulate_counts(1.0, 600);
    assert!(fails <= 40, "{fails} of 600 good waves failed");
}

#[test]
fn simulated_triple_crash_rate_is_caught() {
    // A release with three times the crash rate: the test is built
    // to catch twice the rate 80% of the time.
    let (fails, minutes) = simulate_counts(3.0, 300);
    assert!(fails >= 270, "only {fails} of 300 bad waves failed");
    let median = minutes[minutes.len() / 2];
    assert!(
        (20..=300).contains(&median),
        "median {median} minutes to fail"
    );
}

/// Simulated waves of a continuous signal: two health-check latencies
/// per minute from each group, log-normal with a median of 100 ms, the
/// canary's moved up by `shift_ms`, judged every ten minutes for up to
/// four hours (between looks a rank test's answer cannot change: see
/// `rank_looks_cut_the_data_at_the_look`). The margin is 20% of the
/// control's median, about 20 ms. Returns the waves that failed and those
/// that passed.
fn simulate_ranks(shift_ms: f64, waves: u64) -> (u64, u64) {
    let p = policy("[signals.latency_ms]\nkind = \"continuous\"\neffect = 0.2\n");
    let latency = LogNormal::new(100f64.ln(), 0.5).unwrap();
    let (mut fails, mut passes) = (0, 0);
    for seed in 0..waves {
        let mut rng = StdRng::seed_from_u64(1_000_000 + seed);
        let buckets: Vec<SampleBucket> = (0..240)
            .map(|minute| SampleBucket {
                minute,
                canary: (0..2)
                    .map(|_| latency.sample(&mut rng) + shift_ms)
                    .collect(),
                control: (0..2).map(|_| latency.sample(&mut rng)).collect(),
            })
            .collect();
        for elapsed in (10..=240).step_by(10) {
            let signal = SignalData::Samples(buckets.clone());
            match judge_wave(&p, &wave(elapsed, vec![("latency_ms", signal)])).verdict {
                Verdict::Fail => fails += 1,
                Verdict::Pass => passes += 1,
                Verdict::Observing => continue,
                Verdict::Inconclusive => {}
            }
            break;
        }
    }
    (fails, passes)
}

#[test]
fn simulated_rank_false_alarms_stay_under_alpha() {
    // A release slower by exactly the margin is the hardest not to fail:
    // looked at eight times, each at 5%, the rank test would fail it far
    // more often than 5%; split over the looks, at most 5% (200 waves at
    // 5% would fail 10 ± 3.1).
    let (fails, _) = simulate_ranks(20.0, 200);
    assert!(fails <= 15, "{fails} of 200 waves at the margin failed");
    // A release no slower passes, and never fails.
    let (fails, passes) = simulate_ranks(0.0, 200);
    assert_eq!(fails, 0, "{fails} of 200 good waves failed");
    assert!(passes >= 190, "only {passes} of 200 good waves passed");
}

#[test]
fn simulated_slower_release_is_caught() {
    // 50 ms slower, against a margin of about 20 ms: caught.
    let (fails, _) = simulate_ranks(50.0, 50);
    assert_eq!(fails, 50, "{fails} of 50 slow waves failed");
    // 10 ms slower is within the margin: never failed, and mostly passed
    // within the four hours.
    let (fails, passes) = simulate_ranks(10.0, 50);
    assert_eq!(fails, 0, "{fails} of 50 waves within the margin failed");
    assert!(
        passes >= 30,
        "only {passes} of 50 waves within the margin passed"
    );
}
