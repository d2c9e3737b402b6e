//! The rollout engine's decisions, as pure functions of stored state and
//! the clock: which wave each device is in, what a device's reports mean
//! for its state, when it has timed out, how many tills of a store may be
//! dispatched, when a wave's failures pause the rollout, and what the
//! rollout does next. No I/O: the engine (`engine.rs`) reads the state,
//! asks these functions, and writes what they decide.

use chrono::DateTime;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::model::{Counts, DeviceState, RolloutState, Strategy, WaveSize, WaveUnit};

/// A device's (or, for waves counted in stores, a store's) place in the
/// rollout order: the first 32 bits of SHA-256 of its id. It depends on
/// nothing else, so it is the same in every rollout and on every replica,
/// and a device enrolled later gets a place among the others.
pub fn seed(id: &str) -> u32 {
    let digest = Sha256::digest(id.as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// `upper_seed` of a wave that reaches every seed.
pub const ALL_SEEDS: i64 = u32::MAX as i64;

/// A selected device, when a rollout starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub device_id: String,
    pub store_id: String,
}

/// The waves of a rollout as it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WavePlan {
    /// Per wave: the highest seed it holds (`ALL_SEEDS` when it reaches
    /// everything, -1 when no seed yet), or `None` for a wave of named
    /// stores.
    pub upper_seeds: Vec<Option<i64>>,
    /// Per candidate (same order): its wave, or `None` when the waves end
    /// before it (the last wave stops short of 100%).
    pub waves: Vec<Option<usize>>,
}

/// `ceil(percent% of total)`, without counting float noise as a fraction
/// (10% of 30 is 3, not 4).
pub fn percent_of(percent: f64, total: u64) -> u64 {
    let exact = percent * total as f64 / 100.0;
    let rounded = exact.round();
    let n = if (exact - rounded).abs() < 1e-9 {
        rounded
    } else {
        exact.ceil()
    };
    (n.max(0.0) as u64).min(total)
}

/// Puts each candidate in a wave. Waves are cumulative: a wave of `n` (or
/// `p%`) brings the devices (or stores) reached so far, canary stores
/// included, up to `n` (or `p%` of them, rounded up). Outside canary waves
/// the order is by seed (then id), so it is stable and deterministic.
pub fn plan_waves(strategy: &Strategy, candidates: &[Candidate]) -> WavePlan {
    let unit_of = |c: &Candidate| -> String {
        match strategy.wave_unit {
            WaveUnit::Devices => c.device_id.clone(),
            WaveUnit::Stores => c.store_id.clone(),
        }
    };
    let canary: Vec<Option<usize>> = candidates
        .iter()
        .map(|c| strategy.canary_wave_of(&c.store_id))
        .collect();
    let all_units: BTreeSet<String> = candidates.iter().map(unit_of).collect();
    let total = all_units.len() as u64;
    let mut canary_units: HashMap<usize, BTreeSet<String>> = HashMap::new();
    let mut ranked: BTreeSet<(u32, String)> = BTreeSet::new();
    for (c, wave) in candidates.iter().zip(&canary) {
        let unit = unit_of(c);
        match wave {
            Some(w) => {
                canary_units.entry(*w).or_default().insert(unit);
            }
            None => {
                ranked.insert((seed(&unit), unit));
            }
        }
    }
    let ranked: Vec<(u32, String)> = ranked.into_iter().collect();
    let mut wave_of_unit: HashMap<&str, usize> = HashMap::new();
    let mut upper_seeds = Vec::with_capacity(strategy.waves.len());
    let mut covered = 0u64;
    let mut next = 0usize;
    let mut upper = -1i64;
    for (i, size) in strategy.waves.iter().enumerate() {
        let target = match size {
            WaveSize::Stores(_) => {
                covered += canary_units.get(&i).map_or(0, |u| u.len() as u64);
                upper_seeds.push(None);
                continue;
            }
            WaveSize::Count(n) => u64::from(*n).min(total),
            WaveSize::Percent(p) => percent_of(*p, total),
        };
        let take = (target.saturating_sub(covered) as usize).min(ranked.len() - next);
        for (s, unit) in &ranked[next..next + take] {
            wave_of_unit.insert(unit, i);
            upper = i64::from(*s);
        }
        next += take;
        covered += take as u64;
        let reaches_all = match size {
            WaveSize::Percent(p) => *p >= 100.0,
            _ => target >= total && next == ranked.len(),
        };
        upper_seeds.push(Some(if reaches_all { ALL_SEEDS } else { upper }));
    }
    let waves = candidates
        .iter()
        .zip(canary)
        .map(|(c, canary)| canary.or_else(|| wave_of_unit.get(unit_of(c).as_str()).copied()))
        .collect();
    WavePlan { upper_seeds, waves }
}

/// The wave of a device that was selected after the rollout started: its
/// canary wave, or the first wave whose seeds reach its own (or its
/// store's). `None`: past the last wave, not in the rollout. The engine
/// never puts it in a wave before the current one.
pub fn late_wave(
    strategy: &Strategy,
    upper_seeds: &[Option<i64>],
    device_id: &str,
    store_id: &str,
) -> Option<usize> {
    if let Some(w) = strategy.canary_wave_of(store_id) {
        return Some(w);
    }
    let unit = match strategy.wave_unit {
        WaveUnit::Devices => device_id,
        WaveUnit::Stores => store_id,
    };
    let s = i64::from(seed(unit));
    upper_seeds
        .iter()
        .position(|upper| matches!(upper, Some(u) if *u >= s))
}

/// What a device last reported about a bundle (`device_bundle_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported<'a> {
    pub active_version: &'a str,
    pub target_version: &'a str,
    /// `pending`, `downloading`, `downloaded`, `installing`, `installed`,
    /// `failed`, `rolled_back`.
    pub phase: &'a str,
    pub error: &'a str,
}

/// What a device's reports say about `release`: its state and why, or
/// `None` when they say nothing about it yet. `installed` is the version
/// of the bundle in its last heartbeat.
pub fn observe(
    release: &str,
    report: Option<Reported<'_>>,
    installed: Option<&str>,
) -> Option<(DeviceState, String)> {
    if installed == Some(release) || report.is_some_and(|r| r.active_version == release) {
        return Some((DeviceState::Succeeded, String::new()));
    }
    let r = report.filter(|r| r.target_version == release)?;
    let because = |default: &str| {
        if r.error.is_empty() {
            default.to_string()
        } else {
            r.error.to_string()
        }
    };
    Some(match r.phase {
        "failed" => (
            DeviceState::Failed,
            because("the till could not install it"),
        ),
        "rolled_back" => (
            DeviceState::RolledBack,
            format!(
                "the till rolled it back: {}",
                because("not confirmed healthy")
            ),
        ),
        "installing" => (DeviceState::Installing, String::new()),
        "downloading" | "downloaded" => (DeviceState::Downloading, String::new()),
        // "installed" with another active version cannot happen (the agent
        // reports the version it installed as active); the rest is waiting.
        _ => (DeviceState::Notified, String::new()),
    })
}

/// A device's next state within a rollout, if it changes. Pending devices
/// wait for dispatch; done devices stay done, except that a timed-out
/// device that installs the release after all counts as succeeded.
pub fn advance(
    current: DeviceState,
    observed: Option<(DeviceState, String)>,
    timed_out: bool,
    timeout_reason: impl FnOnce() -> String,
) -> Option<(DeviceState, String)> {
    match current {
        DeviceState::Pending
        | DeviceState::Succeeded
        | DeviceState::Failed
        | DeviceState::RolledBack => None,
        DeviceState::TimedOut => observed
            .filter(|(s, _)| *s == DeviceState::Succeeded)
            .map(|(s, _)| (s, "installed after timing out".to_string())),
        DeviceState::Notified | DeviceState::Downloading | DeviceState::Installing => {
            match observed {
                Some((s, reason)) if s.is_done() => Some((s, reason)),
                _ if timed_out => Some((DeviceState::TimedOut, timeout_reason())),
                Some((s, reason)) if s != current => Some((s, reason)),
                _ => None,
            }
        }
    }
}

/// A store's daily maintenance window, read as the agent reads it.
pub use posfleet_runtime::window::LocalWindow as StoreWindow;

/// Longest stretch whose window time is counted day by day; a device
/// notified longer ago than this has timed out whatever its window.
const MAX_COUNTED_DAYS: i64 = 400;

/// Whether a device notified at `notified_at_ms` has timed out at `now_ms`.
/// Only time inside its store's maintenance window counts (all time without
/// a window, or for an emergency rollout): a till waiting for its window
/// has not timed out.
pub fn timed_out(
    notified_at_ms: i64,
    now_ms: i64,
    timeout_seconds: u64,
    window: Option<&StoreWindow>,
    emergency: bool,
) -> bool {
    let timeout_ms = i64::try_from(timeout_seconds)
        .unwrap_or(i64::MAX / 1000)
        .saturating_mul(1000);
    let elapsed = now_ms.saturating_sub(notified_at_ms);
    match window {
        Some(w) if !emergency => {
            if elapsed > MAX_COUNTED_DAYS * 24 * 3600 * 1000 {
                return true;
            }
            let counted = match (
                DateTime::from_timestamp_millis(notified_at_ms),
                DateTime::from_timestamp_millis(now_ms),
            ) {
                (Some(from), Some(to)) => w.open_between(from, to).num_milliseconds(),
                _ => 0,
            };
            counted >= timeout_ms
        }
        _ => elapsed >= timeout_ms,
    }
}

/// Tills of a store that may be dispatched now: at most `max_unavailable`
/// in flight at once across running rollouts, and never every till of a
/// store that has more than one.
pub fn store_slots(max_unavailable: u32, store_devices: u64, in_flight: u64) -> u64 {
    let cap = if store_devices <= 1 {
        1
    } else {
        u64::from(max_unavailable.max(1)).min(store_devices - 1)
    };
    cap.saturating_sub(in_flight)
}

/// Which pending devices to dispatch now, in the order given: as many per
/// store as it has slots. `pending` is `(device_id, store_id)`; the result
/// holds indexes into it.
pub fn pick_dispatch(
    pending: &[(String, String)],
    max_unavailable: u32,
    store_devices: &HashMap<String, u64>,
    in_flight: &HashMap<String, u64>,
) -> Vec<usize> {
    let mut slots: BTreeMap<&str, u64> = BTreeMap::new();
    let mut picked = Vec::new();
    for (i, (_, store)) in pending.iter().enumerate() {
        let left = slots.entry(store.as_str()).or_insert_with(|| {
            store_slots(
                max_unavailable,
                store_devices.get(store).copied().unwrap_or(1),
                in_flight.get(store).copied().unwrap_or(0),
            )
        });
        if *left > 0 {
            *left -= 1;
            picked.push(i);
        }
    }
    picked
}

fn percent_text(p: f64) -> String {
    let rounded = (p * 10.0).round() / 10.0;
    if rounded.fract() == 0.0 {
        format!("{rounded:.0}%")
    } else {
        format!("{rounded:.1}%")
    }
}

/// Why the failures of wave `index` (0-based) pause the rollout, or `None`.
/// They do when they reach `max_percent` of the wave's devices and
/// `min_failures` (at least 1), and some came after the last resume (the
/// operator accepted `acknowledged` of them).
pub fn threshold_crossed(
    index: usize,
    devices: u64,
    failures: u64,
    acknowledged: u64,
    max_percent: f64,
    min_failures: u32,
) -> Option<String> {
    let min = u64::from(min_failures.max(1));
    if devices == 0 || failures < min || failures <= acknowledged {
        return None;
    }
    let share = failures as f64 * 100.0 / devices as f64;
    // Exactly at the threshold counts (5 of 100 at 5%).
    if share + 1e-9 < max_percent {
        return None;
    }
    Some(format!(
        "wave {}: {failures} of {devices} devices failed ({} ≥ {}, ≥ {min})",
        index + 1,
        percent_text(share),
        percent_text(max_percent),
    ))
}

/// A wave as the engine reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaveView {
    pub counts: Counts,
    pub started: bool,
    pub finished: bool,
    pub bake_until_ms: Option<i64>,
    pub failures_acknowledged: u64,
    /// Canary analysis has not yet let the next wave start.
    pub analysis_pending: bool,
}

/// What a rollout does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do now (not running, devices busy, baking).
    Wait,
    /// A wave crossed its failure threshold.
    Pause {
        reason: String,
    },
    StartWave {
        wave: usize,
    },
    /// Dispatch the current wave's pending devices, as slots allow.
    Dispatch,
    /// Every device of the wave is done; the next may start after the bake.
    FinishWave {
        wave: usize,
        bake_until_ms: i64,
    },
    /// Every device of the last wave is done.
    Complete,
}

/// The rollout's next step. Waves start in order, each only once the one
/// before it is done and baked, so none is skipped; a wave with no device
/// needs no bake.
pub fn next_step(
    state: RolloutState,
    current: usize,
    waves: &[WaveView],
    strategy: &Strategy,
    now_ms: i64,
) -> Step {
    if state != RolloutState::Running || current >= waves.len() {
        return Step::Wait;
    }
    for (i, w) in waves[..=current].iter().enumerate() {
        if let Some(reason) = threshold_crossed(
            i,
            w.counts.total(),
            w.counts.failures(),
            w.failures_acknowledged,
            strategy.max_failures_percent,
            strategy.min_failures,
        ) {
            return Step::Pause { reason };
        }
    }
    let wave = &waves[current];
    if !wave.started {
        return Step::StartWave { wave: current };
    }
    if !wave.counts.all_done() {
        return if wave.counts.get(DeviceState::Pending) > 0 {
            Step::Dispatch
        } else {
            Step::Wait
        };
    }
    if current + 1 == waves.len() {
        return Step::Complete;
    }
    if !wave.finished {
        let bake_ms = if wave.counts.total() == 0 {
            0
        } else {
            i64::try_from(strategy.bake_seconds)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000)
        };
        return Step::FinishWave {
            wave: current,
            bake_until_ms: now_ms.saturating_add(bake_ms),
        };
    }
    match wave.bake_until_ms {
        Some(until) if now_ms < until => Step::Wait,
        _ if wave.analysis_pending => Step::Wait,
        _ => Step::StartWave { wave: current + 1 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strategy(waves: Vec<WaveSize>, unit: WaveUnit) -> Strategy {
        Strategy {
            waves,
            wave_unit: unit,
            bake_seconds: 60,
            max_failures_percent: 5.0,
            min_failures: 1,
            device_timeout_seconds: 3600,
            max_unavailable_per_store: 1,
            download_ahead: true,
            emergency: false,
        }
    }

    /// `stores` stores of `tills` devices each: `s{i}` / `s{i}-d{j}`.
    fn fleet(stores: usize, tills: usize) -> Vec<Candidate> {
        (0..stores)
            .flat_map(|s| {
                (0..tills).map(move |d| Candidate {
                    device_id: format!("s{s}-d{d}"),
                    store_id: format!("s{s}"),
                })
            })
            .collect()
    }

    fn sizes(plan: &WavePlan, waves: usize) -> Vec<usize> {
        (0..waves)
            .map(|w| plan.waves.iter().filter(|x| **x == Some(w)).count())
            .collect()
    }

    #[test]
    fn seeds_are_stable_and_spread() {
        assert_eq!(seed("dev-1"), seed("dev-1"));
        assert_ne!(seed("dev-1"), seed("dev-2"));
        // Known value: the first four bytes of SHA-256("abc").
        assert_eq!(seed("abc"), 0xba78_16bf);
    }

    #[test]
    fn percentages_round_up_without_float_noise() {
        for (p, total, expected) in [
            (10.0, 30, 3),
            (10.0, 31, 4),
            (1.0, 1, 1),
            (0.1, 5, 1),
            (50.0, 5, 3),
            (100.0, 7, 7),
            (33.3, 3, 1),
            (70.0, 10, 7),
        ] {
            assert_eq!(percent_of(p, total), expected, "{p}% of {total}");
        }
    }

    #[test]
    fn wave_sizes_are_cumulative() {
        use WaveSize::*;
        // One row: waves, unit, fleet (stores × tills), devices per wave.
        type Row = (Vec<WaveSize>, WaveUnit, (usize, usize), Vec<usize>);
        let rows: Vec<Row> = vec![
            (
                vec![Count(1), Percent(10.0), Percent(50.0), Percent(100.0)],
                WaveUnit::Devices,
                (10, 10),
                vec![1, 9, 40, 50],
            ),
            (vec![Percent(100.0)], WaveUnit::Devices, (3, 4), vec![12]),
            // A count past the fleet reaches everybody at once.
            (
                vec![Count(5), Count(500)],
                WaveUnit::Devices,
                (2, 4),
                vec![5, 3],
            ),
            // A wave the earlier ones already cover is empty.
            (
                vec![Count(5), Count(3), Percent(100.0)],
                WaveUnit::Devices,
                (2, 4),
                vec![5, 0, 3],
            ),
            // The last wave stopping short leaves devices out.
            (
                vec![Count(2), Percent(50.0)],
                WaveUnit::Devices,
                (2, 4),
                vec![2, 2],
            ),
            // In stores: 1 store, then half the stores, then all: whole stores.
            (
                vec![Count(1), Percent(50.0), Percent(100.0)],
                WaveUnit::Stores,
                (4, 3),
                vec![3, 3, 6],
            ),
            // A canary store counts towards the next cumulative size.
            (
                vec![Stores(vec!["s0".into()]), Count(6), Percent(100.0)],
                WaveUnit::Devices,
                (3, 4),
                vec![4, 2, 6],
            ),
            (
                vec![Stores(vec!["s0".into(), "s2".into()]), Percent(100.0)],
                WaveUnit::Stores,
                (3, 4),
                vec![8, 4],
            ),
        ];
        for (waves, unit, (stores, tills), expected) in rows {
            let s = strategy(waves.clone(), unit);
            let plan = plan_waves(&s, &fleet(stores, tills));
            assert_eq!(sizes(&plan, waves.len()), expected, "{waves:?} {unit:?}");
            assert_eq!(plan.upper_seeds.len(), waves.len());
        }
    }

    #[test]
    fn waves_are_deterministic_and_whole_stores_stay_together() {
        let s = strategy(
            vec![WaveSize::Count(2), WaveSize::Percent(100.0)],
            WaveUnit::Stores,
        );
        let mut candidates = fleet(5, 3);
        let plan = plan_waves(&s, &candidates);
        // The same plan whatever order the devices are read in.
        candidates.reverse();
        let mut reversed = plan_waves(&s, &candidates);
        reversed.waves.reverse();
        assert_eq!(plan, reversed);
        candidates.reverse();
        let mut by_store: HashMap<&str, BTreeSet<Option<usize>>> = HashMap::new();
        for (c, w) in candidates.iter().zip(&plan.waves) {
            by_store.entry(&c.store_id).or_default().insert(*w);
        }
        assert!(by_store.values().all(|waves| waves.len() == 1));
        // The first wave holds the two stores with the lowest seeds.
        let mut stores: Vec<&str> = by_store.keys().copied().collect();
        stores.sort_by_key(|s| (seed(s), s.to_string()));
        for (i, store) in stores.iter().enumerate() {
            let expected = Some(if i < 2 { 0 } else { 1 });
            assert_eq!(by_store[store].first(), Some(&expected), "{store}");
        }
    }

    #[test]
    fn a_device_joining_later_lands_where_its_seed_falls() {
        let s = strategy(
            vec![
                WaveSize::Stores(vec!["canary".into()]),
                WaveSize::Count(10),
                WaveSize::Percent(100.0),
            ],
            WaveUnit::Devices,
        );
        let candidates: Vec<Candidate> = (0..40)
            .map(|i| Candidate {
                device_id: format!("d{i}"),
                store_id: if i < 4 { "canary" } else { "other" }.into(),
            })
            .collect();
        let plan = plan_waves(&s, &candidates);
        // Every device present at the start would land where it is.
        for (c, w) in candidates.iter().zip(&plan.waves) {
            assert_eq!(
                late_wave(&s, &plan.upper_seeds, &c.device_id, &c.store_id),
                *w,
                "{}",
                c.device_id
            );
        }
        // A new device of the canary store joins the canary wave; others
        // land by seed, and the 100% wave reaches every seed.
        assert_eq!(late_wave(&s, &plan.upper_seeds, "new", "canary"), Some(0));
        let wave1_upper = plan.upper_seeds[1].unwrap();
        for i in 0..200 {
            let id = format!("late-{i}");
            let expected = if i64::from(seed(&id)) <= wave1_upper {
                1
            } else {
                2
            };
            assert_eq!(
                late_wave(&s, &plan.upper_seeds, &id, "other"),
                Some(expected)
            );
        }
        // Waves stopping short of 100% leave late devices past them out.
        let short = strategy(vec![WaveSize::Count(1)], WaveUnit::Devices);
        let plan = plan_waves(&short, &candidates);
        let outside = (0..200)
            .map(|i| format!("x{i}"))
            .find(|id| i64::from(seed(id)) > plan.upper_seeds[0].unwrap())
            .unwrap();
        assert_eq!(
            late_wave(&short, &plan.upper_seeds, &outside, "other"),
            None
        );
    }

    fn report<'a>(
        active: &'a str,
        target: &'a str,
        phase: &'a str,
        error: &'a str,
    ) -> Reported<'a> {
        Reported {
            active_version: active,
            target_version: target,
            phase,
            error,
        }
    }

    #[test]
    fn reports_say_where_a_device_is() {
        use DeviceState::*;
        type Row<'a> = (
            Option<Reported<'a>>,
            Option<&'a str>,
            Option<(DeviceState, &'a str)>,
        );
        let rows: Vec<Row> = vec![
            (None, None, None),
            (None, Some("1.0.0"), None),
            // The heartbeat alone is enough.
            (None, Some("2.0.0"), Some((Succeeded, ""))),
            (
                Some(report("1.0.0", "2.0.0", "pending", "")),
                None,
                Some((Notified, "")),
            ),
            (
                Some(report("1.0.0", "2.0.0", "downloading", "")),
                None,
                Some((Downloading, "")),
            ),
            (
                Some(report("1.0.0", "2.0.0", "downloaded", "")),
                None,
                Some((Downloading, "")),
            ),
            (
                Some(report("1.0.0", "2.0.0", "installing", "")),
                None,
                Some((Installing, "")),
            ),
            (
                Some(report("2.0.0", "2.0.0", "installed", "")),
                None,
                Some((Succeeded, "")),
            ),
            (
                Some(report("1.0.0", "2.0.0", "failed", "disk full")),
                None,
                Some((Failed, "disk full")),
            ),
            (
                Some(report("1.0.0", "2.0.0", "failed", "")),
                None,
                Some((Failed, "the till could not install it")),
            ),
            (
                Some(report(
                    "1.0.0",
                    "2.0.0",
                    "rolled_back",
                    "health check failed",
                )),
                None,
                Some((RolledBack, "the till rolled it back: health check failed")),
            ),
            // About another version: nothing to say about this one.
            (Some(report("1.0.0", "1.5.0", "failed", "x")), None, None),
        ];
        for (reported, installed, expected) in rows {
            let got = observe("2.0.0", reported, installed);
            assert_eq!(
                got.as_ref().map(|(s, r)| (*s, r.as_str())),
                expected,
                "{reported:?} {installed:?}"
            );
        }
    }

    #[test]
    fn device_states_only_move_forward_from_done() {
        use DeviceState::*;
        let seen = |s: DeviceState| Some((s, String::new()));
        // One row: current, observed, timed out, expected next state.
        type Row = (
            DeviceState,
            Option<(DeviceState, String)>,
            bool,
            Option<DeviceState>,
        );
        let rows: Vec<Row> = vec![
            (Pending, seen(Succeeded), false, None),
            (Notified, None, false, None),
            (Notified, seen(Notified), false, None),
            (Notified, seen(Downloading), false, Some(Downloading)),
            (Downloading, seen(Installing), false, Some(Installing)),
            (Installing, seen(Succeeded), false, Some(Succeeded)),
            (Installing, seen(Failed), false, Some(Failed)),
            // An outcome beats the clock.
            (Installing, seen(Succeeded), true, Some(Succeeded)),
            (Downloading, seen(Downloading), true, Some(TimedOut)),
            (Notified, None, true, Some(TimedOut)),
            // A retry after an interrupted install shows as downloading again.
            (Installing, seen(Downloading), false, Some(Downloading)),
            (Succeeded, seen(Failed), false, None),
            (Failed, seen(Succeeded), false, None),
            (RolledBack, seen(Succeeded), false, None),
            (TimedOut, seen(Installing), false, None),
            (TimedOut, seen(Succeeded), false, Some(Succeeded)),
        ];
        for (current, observed, late, expected) in rows {
            let got = advance(current, observed.clone(), late, || "late".into());
            assert_eq!(
                got.map(|(s, _)| s),
                expected,
                "{current:?} {observed:?} {late}"
            );
        }
    }

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn only_window_time_counts_towards_the_timeout() {
        // 02:00–04:00 Paris is 00:00–02:00 UTC in summer. How much of a
        // stretch lies in a window is the window rules' (posfleet-runtime).
        let w = StoreWindow::new("Europe/Paris", 120, 120).unwrap();
        // A till waiting for its window does not time out; in the window it does.
        let notified = ms("2026-06-01T12:00:00Z");
        assert!(!timed_out(
            notified,
            ms("2026-06-01T23:59:00Z"),
            1800,
            Some(&w),
            false
        ));
        assert!(!timed_out(
            notified,
            ms("2026-06-02T00:29:59Z"),
            1800,
            Some(&w),
            false
        ));
        assert!(timed_out(
            notified,
            ms("2026-06-02T00:30:00Z"),
            1800,
            Some(&w),
            false
        ));
        // Without a window, or in an emergency, all time counts.
        assert!(timed_out(
            notified,
            ms("2026-06-01T12:30:00Z"),
            1800,
            None,
            false
        ));
        assert!(!timed_out(
            notified,
            ms("2026-06-01T12:29:59Z"),
            1800,
            None,
            false
        ));
        assert!(timed_out(
            notified,
            ms("2026-06-01T12:30:00Z"),
            1800,
            Some(&w),
            true
        ));
    }

    #[test]
    fn never_all_tills_of_a_store_at_once() {
        // One row: max_unavailable, tills in the store, in flight, slots.
        for (max, tills, in_flight, slots) in [
            (1, 1, 0, 1),
            (1, 1, 1, 0),
            (1, 4, 0, 1),
            (1, 4, 1, 0),
            (3, 4, 0, 3),
            (4, 4, 0, 3),
            (10, 2, 0, 1),
            (10, 2, 1, 0),
            (2, 5, 1, 1),
            (2, 5, 3, 0),
            (0, 3, 0, 1),
            (5, 0, 0, 1),
        ] {
            assert_eq!(
                store_slots(max, tills, in_flight),
                slots,
                "max {max}, {tills} tills, {in_flight} in flight"
            );
        }
    }

    #[test]
    fn dispatch_fills_each_stores_slots_in_order() {
        let pending: Vec<(String, String)> = [
            ("a1", "a"),
            ("b1", "b"),
            ("a2", "a"),
            ("a3", "a"),
            ("c1", "c"),
        ]
        .iter()
        .map(|(d, s)| (d.to_string(), s.to_string()))
        .collect();
        let devices: HashMap<String, u64> = [("a", 4), ("b", 2), ("c", 1)]
            .map(|(s, n)| (s.to_string(), n))
            .into();
        let busy: HashMap<String, u64> = [("b".to_string(), 1)].into();
        assert_eq!(pick_dispatch(&pending, 2, &devices, &busy), vec![0, 2, 4]);
        assert_eq!(
            pick_dispatch(&pending, 1, &devices, &HashMap::new()),
            vec![0, 1, 4]
        );
    }

    #[test]
    fn failure_thresholds_need_both_the_share_and_the_count() {
        // One row: devices, failures, acknowledged, max %, min, pauses.
        for (devices, failures, acked, pct, min, pauses) in [
            (100, 5, 0, 5.0, 1, true),
            (100, 4, 0, 5.0, 1, false),
            (4, 1, 0, 25.0, 1, true),
            (4, 1, 0, 25.1, 1, false),
            (3, 1, 0, 33.333333333333336, 1, true),
            (4, 3, 0, 5.0, 1, true),
            (4, 3, 0, 5.0, 4, false),
            (4, 4, 0, 5.0, 4, true),
            (10, 0, 0, 0.0, 0, false),
            (10, 1, 0, 0.0, 0, true),
            (10, 2, 2, 5.0, 1, false),
            (10, 3, 2, 5.0, 1, true),
            (0, 0, 0, 5.0, 1, false),
        ] {
            assert_eq!(
                threshold_crossed(0, devices, failures, acked, pct, min).is_some(),
                pauses,
                "{failures} of {devices} (acked {acked}) at {pct}% min {min}"
            );
        }
        assert_eq!(
            threshold_crossed(0, 4, 3, 0, 5.0, 1).unwrap(),
            "wave 1: 3 of 4 devices failed (75% ≥ 5%, ≥ 1)"
        );
        assert_eq!(
            threshold_crossed(2, 3, 1, 0, 10.0, 1).unwrap(),
            "wave 3: 1 of 3 devices failed (33.3% ≥ 10%, ≥ 1)"
        );
    }

    fn wave(
        pairs: &[(DeviceState, u64)],
        started: bool,
        finished: bool,
        bake: Option<i64>,
    ) -> WaveView {
        let mut counts = Counts::default();
        for (s, n) in pairs {
            counts.add(*s, *n);
        }
        WaveView {
            counts,
            started,
            finished,
            bake_until_ms: bake,
            failures_acknowledged: 0,
            analysis_pending: false,
        }
    }

    #[test]
    fn the_rollout_goes_wave_by_wave() {
        use DeviceState::*;
        let s = strategy(
            vec![WaveSize::Count(1), WaveSize::Percent(100.0)],
            WaveUnit::Devices,
        );
        let done = wave(&[(Succeeded, 1)], true, false, None);
        let baked = wave(&[(Succeeded, 1)], true, true, Some(1_060_000));
        let next = wave(&[(Pending, 3)], false, false, None);
        let now = 1_000_000;
        // One row: state, current wave, waves, expected step.
        let rows: Vec<(RolloutState, usize, Vec<WaveView>, Step)> = vec![
            (RolloutState::Paused, 0, vec![done, next], Step::Wait),
            (RolloutState::Draft, 0, vec![next, next], Step::Wait),
            (
                RolloutState::Running,
                0,
                vec![next, next],
                Step::StartWave { wave: 0 },
            ),
            (
                RolloutState::Running,
                0,
                vec![wave(&[(Pending, 1)], true, false, None), next],
                Step::Dispatch,
            ),
            (
                RolloutState::Running,
                0,
                vec![wave(&[(Installing, 1)], true, false, None), next],
                Step::Wait,
            ),
            (
                RolloutState::Running,
                0,
                vec![
                    wave(&[(Installing, 1), (Pending, 1)], true, false, None),
                    next,
                ],
                Step::Dispatch,
            ),
            (
                RolloutState::Running,
                0,
                vec![done, next],
                Step::FinishWave {
                    wave: 0,
                    bake_until_ms: now + 60_000,
                },
            ),
            (RolloutState::Running, 0, vec![baked, next], Step::Wait),
            (
                RolloutState::Running,
                0,
                vec![
                    WaveView {
                        bake_until_ms: Some(now),
                        ..baked
                    },
                    next,
                ],
                Step::StartWave { wave: 1 },
            ),
            // Baked, but its canary analysis has not passed yet.
            (
                RolloutState::Running,
                0,
                vec![
                    WaveView {
                        bake_until_ms: Some(now),
                        analysis_pending: true,
                        ..baked
                    },
                    next,
                ],
                Step::Wait,
            ),
            // An empty wave needs no bake.
            (
                RolloutState::Running,
                0,
                vec![wave(&[], true, false, None), next],
                Step::FinishWave {
                    wave: 0,
                    bake_until_ms: now,
                },
            ),
            (
                RolloutState::Running,
                1,
                vec![baked, wave(&[(Succeeded, 3)], true, false, None)],
                Step::Complete,
            ),
            (
                RolloutState::Running,
                0,
                vec![wave(&[(Failed, 1)], true, false, None), next],
                Step::Pause {
                    reason: "wave 1: 1 of 1 devices failed (100% ≥ 5%, ≥ 1)".into(),
                },
            ),
            // A late failure in an earlier wave pauses too.
            (
                RolloutState::Running,
                1,
                vec![
                    wave(&[(TimedOut, 1)], true, true, Some(0)),
                    wave(&[(Installing, 3)], true, false, None),
                ],
                Step::Pause {
                    reason: "wave 1: 1 of 1 devices failed (100% ≥ 5%, ≥ 1)".into(),
                },
            ),
            // Unless a resume accepted it.
            (
                RolloutState::Running,
                1,
                vec![
                    WaveView {
                        failures_acknowledged: 1,
                        ..wave(&[(TimedOut, 1)], true, true, Some(0))
                    },
                    wave(&[(Installing, 3)], true, false, None),
                ],
                Step::Wait,
            ),
            // A failure pauses before the last wave completes.
            (
                RolloutState::Running,
                1,
                vec![
                    baked,
                    wave(&[(Succeeded, 2), (Failed, 1)], true, false, None),
                ],
                Step::Pause {
                    reason: "wave 2: 1 of 3 devices failed (33.3% ≥ 5%, ≥ 1)".into(),
                },
            ),
        ];
        for (state, current, waves, expected) in rows {
            assert_eq!(
                next_step(state, current, &waves, &s, now),
                expected,
                "{state:?} {current} {waves:?}"
            );
        }
    }
}
