//! The rollout engine: one task that drives every rollout, a tick a second
//! and whenever an operation wakes it (`EngineHandle::wake`).
//!
//! Each tick, per rollout it looks after: follow the dispatched devices
//! (their progress reports and heartbeats) and time them out; now and then
//! add devices that joined the selection; then take the rollout's next
//! steps (pause on failures, start, dispatch, finish and bake waves,
//! complete). Every change is one `RolloutWrite` transaction with its
//! events, checked against the revision it was computed from, so a kill at
//! any point leaves the database at a step boundary and the next tick (in
//! this process or the next) carries on from there: no device is counted
//! twice, no wave is skipped.
//!
//! On PostgreSQL several replicas may share the database; only the one
//! holding the engine's advisory lock runs the engine. The others try
//! again every few seconds, and a replica whose lock connection fails
//! stops its engine at once.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::analysis::{Action, AnalysisPolicy, OnInconclusive, Verdict};
use super::canary;
use super::decide::{self, Reported, Step, StoreWindow, WaveView};
use super::model::{DeviceState, RolloutState, Selector, Strategy};
use crate::desired::DesiredCache;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::storage::rollouts::{
    DeviceChange, Dispatch, NewRolloutDevice, RolloutRecord, SelectedDevice,
};
use crate::storage::{DesiredBundleRecord, NewEvent, Storage};

/// Time between ticks.
pub const TICK: Duration = Duration::from_secs(1);
/// How often a replica without the engine's lock tries to take it.
pub const LOCK_RETRY: Duration = Duration::from_secs(3);
/// How long the lock's connection may take to answer before the engine
/// stops.
pub const LOCK_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often running rollouts look for devices that joined their selection
/// (also whenever a wave starts).
pub const JOIN_INTERVAL: Duration = Duration::from_secs(10);
/// How often signal minutes past their retention are deleted.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(600);
/// Devices dispatched per transaction. On SQLite a transaction holds the
/// one write lock: heartbeats wait for at most one batch.
pub const DISPATCH_BATCH: usize = 20_000;

/// Wakes the engine (cheap to clone). A wake-up on a replica that does
/// not run the engine does nothing; the engine's own tick sees the change
/// within a second.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    wake: mpsc::Sender<()>,
}

impl EngineHandle {
    /// Asks for a tick now. Never blocks: one pending wake-up is enough.
    pub fn wake(&self) {
        let _ = self.wake.try_send(());
    }
}

/// Starts the engine task. It runs until `stop` turns true.
pub fn spawn(
    storage: Storage,
    desired: DesiredCache,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
) -> (EngineHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(1);
    let engine = Engine {
        storage,
        desired,
        metrics,
        last_join: HashMap::new(),
        last_judged: HashMap::new(),
        last_prune: None,
    };
    (
        EngineHandle { wake: tx },
        tokio::spawn(engine.run(rx, stop)),
    )
}

enum Ended {
    Stopped,
    LostLock(Error),
}

struct Engine {
    storage: Storage,
    desired: DesiredCache,
    metrics: Metrics,
    /// When each rollout last looked for devices that joined.
    last_join: HashMap<String, Instant>,
    /// The minute (since the epoch) each rollout's analysis last looked.
    last_judged: HashMap<String, i64>,
    /// When old signal minutes were last deleted.
    last_prune: Option<Instant>,
}

impl Engine {
    async fn run(mut self, mut wake: mpsc::Receiver<()>, mut stop: watch::Receiver<bool>) {
        let mut waiting_logged = false;
        loop {
            if *stop.borrow() {
                return;
            }
            let mut lock = match self.storage.try_engine_lock().await {
                Ok(Some(lock)) => lock,
                Ok(None) => {
                    if !waiting_logged {
                        tracing::info!(
                            "Another replica runs the rollout engine; this one stands by."
                        );
                        waiting_logged = true;
                    }
                    if sleep_or_stop(LOCK_RETRY, &mut stop).await {
                        return;
                    }
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "Cannot take the rollout engine's lock; retrying.");
                    if sleep_or_stop(LOCK_RETRY, &mut stop).await {
                        return;
                    }
                    continue;
                }
            };
            waiting_logged = false;
            self.metrics.rollout.engine_leader.set(1);
            tracing::info!("Rollout engine running.");
            let ended = self.lead(&mut lock, &mut wake, &mut stop).await;
            self.metrics.rollout.engine_leader.set(0);
            match ended {
                Ended::Stopped => {
                    lock.release().await;
                    tracing::info!("Rollout engine stopped.");
                    return;
                }
                Ended::LostLock(error) => {
                    tracing::error!(%error, "Lost the rollout engine's lock; the engine stops here.");
                    drop(lock);
                }
            }
        }
    }

    async fn lead(
        &mut self,
        lock: &mut crate::storage::rollouts::EngineLock,
        wake: &mut mpsc::Receiver<()>,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                Some(()) = wake.recv() => {}
                _ = stop.wait_for(|s| *s) => return Ended::Stopped,
            }
            // A connection that hangs is as good as lost: PostgreSQL may
            // have released the lock already.
            match tokio::time::timeout(LOCK_CHECK_TIMEOUT, lock.check()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Ended::LostLock(error),
                Err(_) => {
                    return Ended::LostLock(Error::EngineLockLost(
                        "its connection did not answer in 5 s".into(),
                    ));
                }
            }
            let timer = self.metrics.rollout.tick_seconds.start_timer();
            if let Err(error) = self.tick(crate::now_ms()).await {
                tracing::warn!(%error, "Rollout engine tick failed; the next one retries.");
            }
            timer.observe_duration();
        }
    }

    /// One pass over every rollout the engine looks after.
    async fn tick(&mut self, now_ms: i64) -> Result<(), Error> {
        let rollouts = self.storage.engine_rollouts().await?;
        let live: BTreeSet<&str> = rollouts.iter().map(|r| r.id.as_str()).collect();
        self.last_join.retain(|id, _| live.contains(id.as_str()));
        self.last_judged.retain(|id, _| live.contains(id.as_str()));
        if self
            .last_prune
            .is_none_or(|at| at.elapsed() >= PRUNE_INTERVAL)
        {
            self.last_prune = Some(Instant::now());
            let before = canary::minute_of(now_ms) - crate::signals::RETENTION_MINUTES;
            match self.storage.prune_signal_minutes(before).await {
                Ok(0) => {}
                Ok(rows) => {
                    tracing::info!(rows, "Deleted signal minutes older than the retention.")
                }
                Err(error) => {
                    tracing::warn!(%error, "Cannot delete old signal minutes; trying again later.")
                }
            }
        }
        for rollout in &rollouts {
            if let Err(error) = self.tick_rollout(rollout, now_ms).await {
                tracing::warn!(rollout_id = %rollout.id, %error, "Rollout step failed; the next tick retries.");
            }
        }
        Ok(())
    }

    async fn tick_rollout(&mut self, rollout: &RolloutRecord, now_ms: i64) -> Result<(), Error> {
        let strategy: Strategy = parse(&rollout.id, "strategy", &rollout.strategy_json)?;
        self.follow_devices(rollout, &strategy, now_ms).await?;
        if !matches!(rollout.state, RolloutState::Running | RolloutState::Paused) {
            return Ok(());
        }
        let join_due = match self.last_join.get(&rollout.id) {
            Some(at) => at.elapsed() >= JOIN_INTERVAL,
            // Starting selected every device: newcomers can wait a while.
            None => now_ms - rollout.started_at_ms.unwrap_or(0) >= JOIN_INTERVAL.as_millis() as i64,
        };
        if join_due {
            self.join_devices(&rollout.id, now_ms).await?;
        }
        if rollout.state == RolloutState::Running && !rollout.analysis_policy.is_empty() {
            self.analyse(rollout, &strategy, now_ms).await?;
        }
        // A few steps per tick, so empty waves and finished ones move on
        // without waiting a tick each.
        for _ in 0..(rollout.wave_count.max(0) as usize * 2 + 4) {
            if !self.step(&rollout.id, &strategy, now_ms).await? {
                break;
            }
        }
        Ok(())
    }

    /// Moves dispatched devices on from what they reported, and times out
    /// those that took too long.
    async fn follow_devices(
        &mut self,
        rollout: &RolloutRecord,
        strategy: &Strategy,
        now_ms: i64,
    ) -> Result<(), Error> {
        let tracked = self
            .storage
            .tracked_devices(&rollout.id, &rollout.bundle_name)
            .await?;
        let mut changes = Vec::new();
        let mut events = Vec::new();
        for device in tracked {
            let report = device.report.as_ref().map(|(a, t, p, e)| Reported {
                active_version: a,
                target_version: t,
                phase: p,
                error: e,
            });
            let observed = decide::observe(
                &rollout.bundle_version,
                report,
                device.installed_version.as_deref(),
            );
            let window = device.window.and_then(|(start, duration)| {
                // A bad stored window (the API refuses them) reads as none.
                StoreWindow::new(&device.time_zone, start, duration).ok()
            });
            let late = device.state.is_in_flight()
                && decide::timed_out(
                    device.notified_at_ms,
                    now_ms,
                    strategy.device_timeout_seconds,
                    window.as_ref(),
                    strategy.emergency,
                );
            let Some((to, reason)) = decide::advance(device.state, observed, late, || {
                timeout_reason(strategy, window.is_some())
            }) else {
                continue;
            };
            events.push(NewEvent::new(
                &format!("rollout.device_{}", to.as_str()),
                &rollout.id,
                &device.device_id,
                json!({
                    "store_id": device.store_id,
                    "wave": device.wave,
                    "state": to.as_str(),
                    "previous_state": device.state.as_str(),
                    "reason": reason,
                }),
            ));
            changes.push(DeviceChange {
                device_id: device.device_id,
                from: device.state,
                to,
                reason,
            });
        }
        if changes.is_empty() {
            return Ok(());
        }
        let Some(mut write) = self
            .storage
            .write_rollout(&rollout.id, rollout.revision, now_ms)
            .await?
        else {
            return Ok(()); // changed meanwhile: the next tick reads it again
        };
        write.change_devices(&changes).await?;
        write.commit(&events).await?;
        for change in &changes {
            if change.to.is_done() {
                self.metrics
                    .rollout
                    .device_results
                    .with_label_values(&[change.to.as_str()])
                    .inc();
            }
            tracing::info!(
                rollout_id = %rollout.id,
                device_id = %change.device_id,
                state = change.to.as_str(),
                reason = %change.reason,
                "Rollout device state changed."
            );
        }
        Ok(())
    }

    /// Adds devices that entered the selection since the rollout started,
    /// each in the wave its seed falls in, or the current wave if that one
    /// has gone by.
    async fn join_devices(&mut self, rollout_id: &str, now_ms: i64) -> Result<(), Error> {
        self.last_join
            .insert(rollout_id.to_string(), Instant::now());
        let Some(rollout) = self.storage.get_rollout(rollout_id).await? else {
            return Ok(());
        };
        let strategy: Strategy = parse(&rollout.id, "strategy", &rollout.strategy_json)?;
        let selector: Selector = parse(&rollout.id, "selector", &rollout.selector_json)?;
        let Some(bundle) = self
            .storage
            .get_bundle(&rollout.bundle_name, &rollout.bundle_version)
            .await?
        else {
            return Ok(());
        };
        let candidates = self
            .storage
            .select_devices(&selector, &rollout.bundle_name, Some(&rollout.id))
            .await?;
        let candidates = eligible(candidates, &selector, &bundle.hardware);
        if candidates.is_empty() {
            return Ok(());
        }
        let waves = self.storage.rollout_waves(&rollout.id).await?;
        let uppers: Vec<Option<i64>> = waves.iter().map(|w| w.upper_seed).collect();
        let mut joined = Vec::new();
        for c in candidates {
            let Some(wave) = decide::late_wave(&strategy, &uppers, &c.device_id, &c.store_id)
            else {
                continue;
            };
            joined.push(NewRolloutDevice {
                device_id: c.device_id,
                store_id: c.store_id,
                wave: (wave as i64).max(rollout.current_wave),
            });
        }
        if joined.is_empty() {
            return Ok(());
        }
        let Some(mut write) = self
            .storage
            .write_rollout(&rollout.id, rollout.revision, now_ms)
            .await?
        else {
            return Ok(());
        };
        write.insert_devices(&joined).await?;
        let events: Vec<NewEvent> = joined
            .iter()
            .map(|d| {
                NewEvent::new(
                    "rollout.device_joined",
                    &rollout.id,
                    &d.device_id,
                    json!({ "store_id": d.store_id, "wave": d.wave }),
                )
            })
            .collect();
        write.commit(&events).await?;
        tracing::info!(rollout_id = %rollout.id, devices = joined.len(), "Devices joined the rollout.");
        Ok(())
    }

    /// Takes the rollout's next step; `true` when another may follow now.
    async fn step(
        &mut self,
        rollout_id: &str,
        strategy: &Strategy,
        now_ms: i64,
    ) -> Result<bool, Error> {
        let Some(rollout) = self.storage.get_rollout(rollout_id).await? else {
            return Ok(false);
        };
        let waves = self.storage.rollout_waves(&rollout.id).await?;
        let counts = self.storage.wave_counts(&rollout.id).await?;
        let policy = analysis_policy(&rollout)?;
        let views: Vec<WaveView> = waves
            .iter()
            .map(|w| WaveView {
                counts: counts.get(&w.wave).copied().unwrap_or_default(),
                started: w.started_at_ms.is_some(),
                finished: w.finished_at_ms.is_some(),
                bake_until_ms: w.bake_until_ms,
                failures_acknowledged: w.failures_acknowledged.max(0) as u64,
                analysis_pending: policy.as_ref().is_some_and(|p| {
                    w.wave < rollout.wave_count - 1
                        && !analysis_done(p, w.analysis_verdict.as_deref())
                }),
            })
            .collect();
        let current = rollout.current_wave.max(0) as usize;
        let step = decide::next_step(rollout.state, current, &views, strategy, now_ms);
        let base = json!({
            "bundle": rollout.bundle_name,
            "version": rollout.bundle_version,
        });
        let event = |kind: &str, extra: serde_json::Value| {
            let mut data = base.clone();
            if let (Some(data), Some(extra)) = (data.as_object_mut(), extra.as_object()) {
                data.extend(extra.clone());
            }
            NewEvent::new(kind, &rollout.id, "", data)
        };
        match step {
            Step::Wait => Ok(false),
            Step::Dispatch => {
                self.dispatch(&rollout, strategy, now_ms).await?;
                Ok(false)
            }
            Step::Pause { reason } => {
                let Some(mut write) = self
                    .storage
                    .write_rollout(&rollout.id, rollout.revision, now_ms)
                    .await?
                else {
                    return Ok(false);
                };
                write
                    .set_state(RolloutState::Paused, &reason, false)
                    .await?;
                write
                    .commit(&[event(
                        "rollout.paused",
                        json!({ "state": "paused", "reason": reason, "by": "engine", "wave": current }),
                    )])
                    .await?;
                self.metrics
                    .rollout
                    .pauses
                    .with_label_values(&["failure_threshold"])
                    .inc();
                tracing::warn!(rollout_id = %rollout.id, %reason, "Rollout paused by its failure threshold.");
                Ok(false)
            }
            Step::StartWave { wave } => {
                if wave != current {
                    // Devices that joined meanwhile go in before it starts.
                    self.join_devices(&rollout.id, now_ms).await?;
                    return self.start_wave(rollout_id, wave, now_ms).await;
                }
                self.start_wave(rollout_id, wave, now_ms).await
            }
            Step::FinishWave {
                wave,
                bake_until_ms,
            } => {
                let Some(mut write) = self
                    .storage
                    .write_rollout(&rollout.id, rollout.revision, now_ms)
                    .await?
                else {
                    return Ok(false);
                };
                write.finish_wave(wave as i64, Some(bake_until_ms)).await?;
                let c = views[wave].counts;
                write
                    .commit(&[event(
                        "rollout.wave_finished",
                        json!({
                            "wave": wave,
                            "devices": c.total(),
                            "succeeded": c.get(DeviceState::Succeeded),
                            "failures": c.failures(),
                            "bake_until_ms": bake_until_ms,
                        }),
                    )])
                    .await?;
                tracing::info!(rollout_id = %rollout.id, wave, bake_until = %crate::format_ms(bake_until_ms), "Wave finished.");
                Ok(true)
            }
            Step::Complete => {
                let Some(mut write) = self
                    .storage
                    .write_rollout(&rollout.id, rollout.revision, now_ms)
                    .await?
                else {
                    return Ok(false);
                };
                write.finish_wave(current as i64, None).await?;
                write.set_state(RolloutState::Completed, "", true).await?;
                let c = views[current].counts;
                let total = views
                    .iter()
                    .fold(super::model::Counts::default(), |mut acc, w| {
                        for s in DeviceState::ALL {
                            acc.add(s, w.counts.get(s));
                        }
                        acc
                    });
                write
                    .commit(&[
                        event(
                            "rollout.wave_finished",
                            json!({
                                "wave": current,
                                "devices": c.total(),
                                "succeeded": c.get(DeviceState::Succeeded),
                                "failures": c.failures(),
                            }),
                        ),
                        event(
                            "rollout.completed",
                            json!({
                                "state": "completed",
                                "devices": total.total(),
                                "succeeded": total.get(DeviceState::Succeeded),
                                "failures": total.failures(),
                            }),
                        ),
                    ])
                    .await?;
                tracing::info!(rollout_id = %rollout.id, devices = total.total(), "Rollout completed.");
                Ok(false)
            }
        }
    }

    /// Judges the current wave once a minute and acts on its verdict: a
    /// Fail pauses or rolls back, an Inconclusive pauses or lets the next
    /// wave start, a Pass lets it start (see `decide::next_step`).
    async fn analyse(
        &mut self,
        rollout: &RolloutRecord,
        strategy: &Strategy,
        now_ms: i64,
    ) -> Result<(), Error> {
        let minute = canary::minute_of(now_ms);
        if self.last_judged.get(&rollout.id) == Some(&minute) {
            return Ok(());
        }
        let Some(policy) = analysis_policy(rollout)? else {
            return Ok(());
        };
        let wave = rollout.current_wave;
        if wave >= rollout.wave_count - 1 {
            return Ok(());
        }
        let waves = self.storage.rollout_waves(&rollout.id).await?;
        let Some(record) = waves.iter().find(|w| w.wave == wave) else {
            return Ok(());
        };
        let Some(started_ms) = record.started_at_ms else {
            return Ok(());
        };
        if record
            .analysis_verdict
            .as_deref()
            .is_some_and(|v| v != "observing")
        {
            return Ok(());
        }
        let judgement =
            canary::judge(&self.storage, rollout, &policy, wave, started_ms, now_ms).await?;
        let action = judgement.action(&policy);
        let verdict = judgement.verdict.to_string().to_lowercase();
        let summary = judgement.summary();
        let Some(mut write) = self
            .storage
            .write_rollout(&rollout.id, rollout.revision, now_ms)
            .await?
        else {
            return Ok(());
        };
        let judgement_json = serde_json::to_string(&judgement)
            .map_err(|e| Error::Corrupt(format!("analysis judgement: {e}")))?;
        write
            .set_wave_analysis(wave, &verdict, &judgement_json)
            .await?;
        let mut events = Vec::new();
        let mut stores = std::collections::BTreeSet::new();
        if judgement.verdict != Verdict::Observing {
            events.push(NewEvent::new(
                "rollout.analysis",
                &rollout.id,
                "",
                json!({
                    "bundle": rollout.bundle_name,
                    "version": rollout.bundle_version,
                    "wave": wave,
                    "verdict": verdict,
                    "summary": summary,
                    "elapsed_minutes": judgement.elapsed_minutes,
                    "signals": judgement.signals,
                }),
            ));
            let reason = format!("analysis_{verdict}: {summary}");
            match action {
                Action::Wait | Action::Proceed => {}
                Action::Pause => {
                    write
                        .set_state(RolloutState::Paused, &reason, false)
                        .await?;
                    events.push(NewEvent::new(
                        "rollout.paused",
                        &rollout.id,
                        "",
                        json!({
                            "bundle": rollout.bundle_name,
                            "version": rollout.bundle_version,
                            "state": "paused",
                            "reason": reason,
                            "by": "engine",
                            "wave": wave,
                        }),
                    ));
                }
                Action::Rollback => {
                    let (rolled_back, touched) =
                        super::ops::roll_back(&mut write, rollout, strategy, &reason, "engine")
                            .await?;
                    events.extend(rolled_back);
                    stores = touched;
                }
            }
        }
        write.commit(&events).await?;
        self.last_judged.insert(rollout.id.clone(), minute);
        for store in &stores {
            self.desired.invalidate(store).await;
        }
        if judgement.verdict != Verdict::Observing {
            self.metrics
                .rollout
                .analysis_verdicts
                .with_label_values(&[&verdict])
                .inc();
            if action == Action::Pause {
                self.metrics
                    .rollout
                    .pauses
                    .with_label_values(&[&format!("analysis_{verdict}")])
                    .inc();
            }
            tracing::warn!(rollout_id = %rollout.id, wave, %summary, ?action, "Canary analysis reached a verdict.");
        }
        Ok(())
    }

    async fn start_wave(
        &mut self,
        rollout_id: &str,
        wave: usize,
        now_ms: i64,
    ) -> Result<bool, Error> {
        let Some(rollout) = self.storage.get_rollout(rollout_id).await? else {
            return Ok(false);
        };
        let devices = self
            .storage
            .wave_counts(rollout_id)
            .await?
            .get(&(wave as i64))
            .map_or(0, |c| c.total());
        let Some(mut write) = self
            .storage
            .write_rollout(rollout_id, rollout.revision, now_ms)
            .await?
        else {
            return Ok(false);
        };
        write.start_wave(wave as i64).await?;
        write
            .commit(&[NewEvent::new(
                "rollout.wave_started",
                rollout_id,
                "",
                json!({
                    "bundle": rollout.bundle_name,
                    "version": rollout.bundle_version,
                    "wave": wave,
                    "devices": devices,
                }),
            )])
            .await?;
        tracing::info!(rollout_id, wave, devices, "Wave started.");
        Ok(true)
    }

    /// Dispatches the current wave's pending devices, as many per store as
    /// its slots allow, in seed order, `DISPATCH_BATCH` devices per
    /// transaction so heartbeats are written in between (SQLite has one
    /// writer).
    async fn dispatch(
        &mut self,
        rollout: &RolloutRecord,
        strategy: &Strategy,
        now_ms: i64,
    ) -> Result<(), Error> {
        let started = Instant::now();
        let mut pending = self
            .storage
            .pending_devices(&rollout.id, &rollout.bundle_name, rollout.current_wave)
            .await?;
        if pending.is_empty() {
            return Ok(());
        }
        pending.sort_by_cached_key(|d| (decide::seed(&d.device_id), d.device_id.clone()));
        let stores: Vec<String> = pending
            .iter()
            .map(|d| d.store_id.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let (store_devices, in_flight) = self.storage.store_loads(&stores).await?;
        let pairs: Vec<(String, String)> = pending
            .iter()
            .map(|d| (d.device_id.clone(), d.store_id.clone()))
            .collect();
        let picked = decide::pick_dispatch(
            &pairs,
            strategy.max_unavailable_per_store,
            &store_devices,
            &in_flight,
        );
        if picked.is_empty() {
            return Ok(());
        }
        let read_ms = started.elapsed().as_millis() as u64;
        let chosen: Vec<_> = picked.into_iter().map(|i| &pending[i]).collect();
        let desired = DesiredBundleRecord {
            name: rollout.bundle_name.clone(),
            version: rollout.bundle_version.clone(),
            kind: rollout.bundle_kind.clone(),
            download_ahead: strategy.download_ahead,
            emergency: strategy.emergency,
            rollback: false,
        };
        let mut dispatched = 0;
        let mut touched = BTreeSet::new();
        // Each batch is checked against the revision the one before left.
        for (revision, batch) in (rollout.revision..).zip(chosen.chunks(DISPATCH_BATCH)) {
            let dispatches: Vec<Dispatch> = batch
                .iter()
                .map(|d| Dispatch {
                    device_id: d.device_id.clone(),
                    previous_version: d.previous_version.clone(),
                })
                .collect();
            let events: Vec<NewEvent> = batch
                .iter()
                .map(|d| {
                    NewEvent::new(
                        "rollout.device_notified",
                        &rollout.id,
                        &d.device_id,
                        json!({
                            "store_id": d.store_id,
                            "wave": rollout.current_wave,
                            "state": "notified",
                            "previous_state": "pending",
                            "previous_version": d.previous_version,
                        }),
                    )
                })
                .collect();
            // A pause or abort in between stops the dispatch there.
            let Some(mut write) = self
                .storage
                .write_rollout(&rollout.id, revision, now_ms)
                .await?
            else {
                break;
            };
            write.dispatch(&dispatches, &desired).await?;
            write.commit(&events).await?;
            dispatched += dispatches.len();
            self.metrics
                .rollout
                .dispatched
                .inc_by(dispatches.len() as u64);
            let stores: BTreeSet<&str> = batch.iter().map(|d| d.store_id.as_str()).collect();
            for store in stores {
                if touched.insert(store) {
                    self.desired.invalidate(store).await;
                }
            }
        }
        if dispatched == 0 {
            return Ok(());
        }
        tracing::info!(
            rollout_id = %rollout.id,
            wave = rollout.current_wave,
            devices = dispatched,
            stores = touched.len(),
            read_ms,
            total_ms = started.elapsed().as_millis() as u64,
            "Devices dispatched."
        );
        Ok(())
    }
}

/// Sleeps `duration`; `true` if `stop` turned true meanwhile.
async fn sleep_or_stop(duration: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(duration) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

/// The rollout's analysis policy, if it has one.
fn analysis_policy(rollout: &RolloutRecord) -> Result<Option<AnalysisPolicy>, Error> {
    if rollout.analysis_policy.is_empty() {
        return Ok(None);
    }
    AnalysisPolicy::from_toml(&rollout.analysis_policy)
        .map(Some)
        .map_err(|e| Error::Corrupt(format!("rollout {}: analysis policy: {e}", rollout.id)))
}

/// Whether a wave's analysis lets the next wave start.
fn analysis_done(policy: &AnalysisPolicy, verdict: Option<&str>) -> bool {
    match verdict {
        Some("pass" | "accepted") => true,
        Some("inconclusive") => policy.on_inconclusive() == OnInconclusive::Continue,
        _ => false,
    }
}

fn parse<T: serde::de::DeserializeOwned>(id: &str, what: &str, json: &str) -> Result<T, Error> {
    serde_json::from_str(json).map_err(|e| Error::Corrupt(format!("{what} of rollout {id}: {e}")))
}

/// Selected devices that can take the release: of a hardware model it is
/// signed for, and running the version the selector asks for.
pub fn eligible(
    devices: Vec<SelectedDevice>,
    selector: &Selector,
    hardware: &[String],
) -> Vec<SelectedDevice> {
    devices
        .into_iter()
        .filter(|d| hardware.iter().any(|h| h == "*" || *h == d.hardware_model))
        .filter(|d| {
            selector.installed_version.is_empty() || d.active_version == selector.installed_version
        })
        .collect()
}

/// "2h", "90m", "45s".
pub fn duration_text(seconds: u64) -> String {
    if seconds >= 3600 && seconds.is_multiple_of(3600) {
        format!("{}h", seconds / 3600)
    } else if seconds >= 60 && seconds.is_multiple_of(60) {
        format!("{}m", seconds / 60)
    } else {
        format!("{seconds}s")
    }
}

fn timeout_reason(strategy: &Strategy, windowed: bool) -> String {
    let timeout = duration_text(strategy.device_timeout_seconds);
    if windowed && !strategy.emergency {
        format!("not done after {timeout} of its store's maintenance window")
    } else {
        format!("not done {timeout} after it was notified")
    }
}
