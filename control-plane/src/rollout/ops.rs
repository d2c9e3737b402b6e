//! The rollout operations behind `AdminService`: create, start, pause,
//! resume, abort, rollback, and the views. Each validates, writes one
//! `RolloutWrite` with its events, and wakes the engine.

use posfleet_proto::v1;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use tonic::{Code, Status};

use super::analysis::{AnalysisPolicy, Judgement};
use super::decide::{self, Candidate};
use super::engine::{EngineHandle, eligible};
use super::model::{Counts, DeviceState, RolloutState, Selector, Strategy, WaveSize, WaveUnit};
use crate::desired::DesiredCache;
use crate::error::Error;
use crate::storage::rollouts::{NewRolloutDevice, RolloutRecord, RolloutWrite, SelectedDevice};
use crate::storage::{BundleRecord, DesiredBundleRecord, NewEvent, Storage};
use crate::validate::{self, invalid, label_key, slug, text};

/// Waves per rollout.
pub const MAX_WAVES: usize = 100;
/// Longest bake and device timeout.
pub const MAX_DURATION_SECONDS: u64 = 90 * 24 * 3600;
/// Failures listed by `GetRollout`.
pub const MAX_FAILURES_SHOWN: i64 = 1000;
/// Times an operation is tried when the engine changed the rollout between
/// its read and its write.
const CONFLICT_ATTEMPTS: u32 = 5;

/// Runs `operation` again while it fails with ABORTED (the engine changed
/// the rollout between its read and its write), up to CONFLICT_ATTEMPTS.
async fn retry_conflicts<F>(operation: impl Fn() -> F) -> Result<v1::Rollout, Status>
where
    F: std::future::Future<Output = Result<v1::Rollout, Status>>,
{
    let mut attempt = 1;
    loop {
        match operation().await {
            Err(s) if s.code() == Code::Aborted && attempt < CONFLICT_ATTEMPTS => attempt += 1,
            done => return done,
        }
    }
}
/// Devices named in an overlap error.
const OVERLAP_EXAMPLES: usize = 3;

/// The rollout operations, shared by the admin API's handlers.
#[derive(Clone)]
pub struct Rollouts {
    storage: Storage,
    desired: DesiredCache,
    engine: EngineHandle,
    metrics: super::RolloutMetrics,
    /// A rollout selecting more devices needs an approval to start.
    approval_threshold: u64,
}

impl Rollouts {
    pub fn new(
        storage: Storage,
        desired: DesiredCache,
        engine: EngineHandle,
        metrics: super::RolloutMetrics,
        approval_threshold: u64,
    ) -> Rollouts {
        Rollouts {
            storage,
            desired,
            engine,
            metrics,
            approval_threshold,
        }
    }

    /// Creates a draft in the name of `actor`, whose person (the user, or
    /// the user a token belongs to, or a token of nobody's) is `actor_id`.
    pub async fn create(
        &self,
        req: v1::CreateRolloutRequest,
        actor: &str,
        actor_id: &str,
    ) -> Result<v1::Rollout, Status> {
        validate::bundle_name("bundle_name", &req.bundle_name)?;
        validate::version("bundle_version", &req.bundle_version, true)?;
        let bundle = self
            .published(&req.bundle_name, &req.bundle_version)
            .await?;
        let selector = Selector::from_proto(req.selector.unwrap_or_default());
        self.validate_selector(&selector, &bundle).await?;
        let strategy_proto = req
            .strategy
            .ok_or_else(|| invalid("strategy", "is required (at least its waves)"))?;
        validate_waves_present(&strategy_proto)?;
        let strategy = Strategy::from_proto(strategy_proto);
        self.validate_strategy(&strategy).await?;
        validate_analysis(&req.analysis_policy, &strategy)?;
        let selected = self.refuse_overlap(&bundle, &selector, None).await?;
        let now = crate::now_ms();
        let record = RolloutRecord {
            id: crate::secret::short_id("ro-", 4),
            bundle_name: bundle.name.clone(),
            bundle_version: bundle.version.clone(),
            bundle_kind: bundle.kind.clone(),
            selector_json: to_json(&selector)?,
            strategy_json: to_json(&strategy)?,
            state: RolloutState::Draft,
            current_wave: 0,
            wave_count: strategy.waves.len() as i64,
            reason: String::new(),
            revision: 0,
            created_by: actor.to_string(),
            created_at_ms: now,
            started_at_ms: None,
            finished_at_ms: None,
            updated_at_ms: now,
            created_by_id: actor_id.to_string(),
            selected_devices: selected.len() as i64,
            approved_by: String::new(),
            approved_by_id: String::new(),
            approved_at_ms: None,
            analysis_policy: req.analysis_policy,
        };
        let approval = self.approval_needed(strategy.emergency, selected.len());
        let event = NewEvent::new(
            "rollout.created",
            &record.id,
            "",
            json!({
                "bundle": record.bundle_name,
                "version": record.bundle_version,
                "state": "draft",
                "by": actor,
                "waves": record.wave_count,
                "devices": selected.len(),
                "approval_required": approval.is_some(),
                "analysis": !record.analysis_policy.is_empty(),
            }),
        );
        self.storage.insert_rollout(&record, &event).await?;
        tracing::info!(
            rollout_id = %record.id,
            bundle = %record.bundle_name,
            version = %record.bundle_version,
            waves = record.wave_count,
            created_by = actor,
            "Rollout created."
        );
        self.view(record).await
    }

    pub async fn start(&self, req: v1::RolloutRequest, actor: &str) -> Result<v1::Rollout, Status> {
        retry_conflicts(|| self.start_once(req.clone(), actor)).await
    }

    async fn start_once(
        &self,
        req: v1::RolloutRequest,
        actor: &str,
    ) -> Result<v1::Rollout, Status> {
        let rollout = self.rollout(&req).await?;
        if rollout.state != RolloutState::Draft {
            return Err(wrong_state(&rollout, "start", "only a draft starts"));
        }
        let bundle = self
            .published(&rollout.bundle_name, &rollout.bundle_version)
            .await?;
        let selector: Selector = from_json(&rollout.id, &rollout.selector_json)?;
        let strategy: Strategy = from_json(&rollout.id, &rollout.strategy_json)?;
        let selected = self
            .refuse_overlap(&bundle, &selector, Some(&rollout.id))
            .await?;
        if selected.is_empty() {
            return Err(Status::failed_precondition(format!(
                "rollout {} selects no device that can take {} {} (check the selector, the \
                 bundle's hardware and the installed version)",
                rollout.id, bundle.name, bundle.version
            )));
        }
        if rollout.approved_by.is_empty()
            && let Some(why) = self.approval_needed(strategy.emergency, selected.len())
        {
            if rollout.selected_devices != selected.len() as i64 {
                // So that `rollout show` says why it waits.
                let mut write = self.write(&rollout, crate::now_ms()).await?;
                write.set_selected_devices(selected.len() as i64).await?;
                write.commit(&[]).await?;
            }
            return Err(Status::failed_precondition(format!(
                "rollout {} needs approval before it starts ({why}): another person with the \
                 deployer or admin role must run `posfleet rollout approve {}`; its creator {} \
                 cannot",
                rollout.id, rollout.id, rollout.created_by
            )));
        }
        let candidates: Vec<Candidate> = selected
            .iter()
            .map(|d| Candidate {
                device_id: d.device_id.clone(),
                store_id: d.store_id.clone(),
            })
            .collect();
        let plan = decide::plan_waves(&strategy, &candidates);
        let members: Vec<NewRolloutDevice> = candidates
            .into_iter()
            .zip(&plan.waves)
            .filter_map(|(c, wave)| {
                wave.map(|w| NewRolloutDevice {
                    device_id: c.device_id,
                    store_id: c.store_id,
                    wave: w as i64,
                })
            })
            .collect();
        let first_wave = members.iter().filter(|m| m.wave == 0).count();
        let now = crate::now_ms();
        let mut write = self.write(&rollout, now).await?;
        write.start(&plan.upper_seeds).await?;
        write.insert_devices(&members).await?;
        write.start_wave(0).await?;
        let base = json!({ "bundle": rollout.bundle_name, "version": rollout.bundle_version });
        write
            .commit(&[
                NewEvent::new(
                    "rollout.started",
                    &rollout.id,
                    "",
                    merge(
                        &base,
                        json!({ "state": "running", "by": actor, "devices": members.len() }),
                    ),
                ),
                NewEvent::new(
                    "rollout.wave_started",
                    &rollout.id,
                    "",
                    merge(&base, json!({ "wave": 0, "devices": first_wave })),
                ),
            ])
            .await?;
        tracing::info!(rollout_id = %rollout.id, devices = members.len(), by = actor, "Rollout started.");
        self.engine.wake();
        self.reload(&rollout.id).await
    }

    /// Approves a draft that needs it, in the name of `actor` (whose kind,
    /// `user` or `token`, is `actor_kind`), whose person is `actor_id`: not
    /// the person who created it.
    pub async fn approve(
        &self,
        req: v1::RolloutRequest,
        actor: &str,
        actor_kind: &str,
        actor_id: &str,
    ) -> Result<v1::Rollout, Status> {
        retry_conflicts(|| self.approve_once(req.clone(), actor, actor_kind, actor_id)).await
    }

    async fn approve_once(
        &self,
        req: v1::RolloutRequest,
        actor: &str,
        actor_kind: &str,
        actor_id: &str,
    ) -> Result<v1::Rollout, Status> {
        let rollout = self.rollout(&req).await?;
        if rollout.state != RolloutState::Draft {
            return Err(wrong_state(
                &rollout,
                "approve",
                "only a draft is approved, before it starts",
            ));
        }
        if !rollout.approved_by.is_empty() {
            return Err(Status::failed_precondition(format!(
                "rollout {} is already approved (by {})",
                rollout.id, rollout.approved_by
            )));
        }
        if rollout.created_by_id == actor_id {
            let who = if rollout.created_by == actor {
                format!("{actor_kind} {actor} created rollout {}", rollout.id)
            } else {
                format!(
                    "{actor_kind} {actor} belongs to the person who created rollout {} (as {})",
                    rollout.id, rollout.created_by
                )
            };
            return Err(Status::permission_denied(format!(
                "{who}; another person with the deployer or admin role must approve it"
            )));
        }
        let bundle = self
            .published(&rollout.bundle_name, &rollout.bundle_version)
            .await?;
        let selector: Selector = from_json(&rollout.id, &rollout.selector_json)?;
        let strategy: Strategy = from_json(&rollout.id, &rollout.strategy_json)?;
        let devices = self.selection(&bundle, &selector).await?.len();
        let Some(why) = self.approval_needed(strategy.emergency, devices) else {
            return Err(Status::failed_precondition(format!(
                "rollout {} needs no approval: it selects {devices} devices (the threshold is \
                 {}) and is not an emergency; start it with `posfleet rollout start {}`",
                rollout.id, self.approval_threshold, rollout.id
            )));
        };
        let mut write = self.write(&rollout, crate::now_ms()).await?;
        write.approve(actor, actor_id).await?;
        write.set_selected_devices(devices as i64).await?;
        write
            .commit(&[NewEvent::new(
                "rollout.approved",
                &rollout.id,
                "",
                json!({
                    "bundle": rollout.bundle_name,
                    "version": rollout.bundle_version,
                    "state": "draft",
                    "by": actor,
                    "created_by": rollout.created_by,
                    "devices": devices,
                    "emergency": strategy.emergency,
                    "reason": why,
                }),
            )])
            .await?;
        tracing::info!(rollout_id = %rollout.id, by = actor, created_by = %rollout.created_by, devices, "Rollout approved.");
        self.reload(&rollout.id).await
    }

    /// Why a rollout of `devices` devices needs an approval to start;
    /// `None` when it needs none.
    fn approval_needed(&self, emergency: bool, devices: usize) -> Option<String> {
        if emergency {
            Some("it is an emergency rollout".into())
        } else if devices as u64 > self.approval_threshold {
            Some(format!(
                "it selects {devices} devices, more than approval_threshold_devices {}",
                self.approval_threshold
            ))
        } else {
            None
        }
    }

    pub async fn pause(&self, req: v1::RolloutRequest, actor: &str) -> Result<v1::Rollout, Status> {
        let paused = self
            .set_state(
                req,
                actor,
                "pause",
                &[RolloutState::Running],
                RolloutState::Paused,
            )
            .await?;
        self.metrics.pauses.with_label_values(&["operator"]).inc();
        Ok(paused)
    }

    pub async fn resume(
        &self,
        req: v1::RolloutRequest,
        actor: &str,
    ) -> Result<v1::Rollout, Status> {
        self.set_state(
            req,
            actor,
            "resume",
            &[RolloutState::Paused],
            RolloutState::Running,
        )
        .await
    }

    pub async fn abort(&self, req: v1::RolloutRequest, actor: &str) -> Result<v1::Rollout, Status> {
        self.set_state(
            req,
            actor,
            "abort",
            &[
                RolloutState::Draft,
                RolloutState::Running,
                RolloutState::Paused,
            ],
            RolloutState::Aborted,
        )
        .await
    }

    /// Pause, resume and abort: a state change and its event. A resume
    /// accepts the failures counted so far: only new ones pause again.
    async fn set_state(
        &self,
        req: v1::RolloutRequest,
        actor: &str,
        verb: &str,
        from: &[RolloutState],
        to: RolloutState,
    ) -> Result<v1::Rollout, Status> {
        retry_conflicts(|| self.set_state_once(req.clone(), actor, verb, from, to)).await
    }

    async fn set_state_once(
        &self,
        req: v1::RolloutRequest,
        actor: &str,
        verb: &str,
        from: &[RolloutState],
        to: RolloutState,
    ) -> Result<v1::Rollout, Status> {
        text("reason", &req.reason, false, 512)?;
        let rollout = self.rollout(&req).await?;
        if !from.contains(&rollout.state) {
            let allowed: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
            return Err(wrong_state(
                &rollout,
                verb,
                &format!("only a {} rollout can", allowed.join(" or ")),
            ));
        }
        let reason = who_and_why(verb, actor, &req.reason);
        let now = crate::now_ms();
        let acknowledged: Vec<(i64, u64)> = if to == RolloutState::Running {
            self.storage
                .wave_counts(&rollout.id)
                .await?
                .into_iter()
                .map(|(wave, c)| (wave, c.failures()))
                .collect()
        } else {
            Vec::new()
        };
        let mut write = self.write(&rollout, now).await?;
        write
            .set_state(
                to,
                if to == RolloutState::Running {
                    ""
                } else {
                    &reason
                },
                to.is_final(),
            )
            .await?;
        write.acknowledge_failures(&acknowledged).await?;
        if to == RolloutState::Running {
            write.accept_analyses().await?;
        }
        let kind = match to {
            RolloutState::Paused => "rollout.paused",
            RolloutState::Running => "rollout.resumed",
            _ => "rollout.aborted",
        };
        write
            .commit(&[NewEvent::new(
                kind,
                &rollout.id,
                "",
                json!({
                    "bundle": rollout.bundle_name,
                    "version": rollout.bundle_version,
                    "state": to.as_str(),
                    "previous_state": rollout.state.as_str(),
                    "reason": reason,
                    "by": actor,
                    "wave": rollout.current_wave,
                }),
            )])
            .await?;
        tracing::info!(rollout_id = %rollout.id, state = to.as_str(), by = actor, %reason, "Rollout state changed.");
        self.engine.wake();
        self.reload(&rollout.id).await
    }

    /// Puts every device the rollout dispatched back on the version it had
    /// (a desired row flagged as a rollback), or drops its own desired row
    /// when it had none, and marks it rolled back.
    pub async fn rollback(
        &self,
        req: v1::RolloutRequest,
        actor: &str,
    ) -> Result<v1::Rollout, Status> {
        retry_conflicts(|| self.rollback_once(req.clone(), actor)).await
    }

    async fn rollback_once(
        &self,
        req: v1::RolloutRequest,
        actor: &str,
    ) -> Result<v1::Rollout, Status> {
        text("reason", &req.reason, false, 512)?;
        let rollout = self.rollout(&req).await?;
        if matches!(
            rollout.state,
            RolloutState::Draft | RolloutState::RolledBack
        ) {
            return Err(wrong_state(
                &rollout,
                "roll back",
                "a draft has nothing to roll back (abort it) and a rolled-back rollout is done",
            ));
        }
        let strategy: Strategy = from_json(&rollout.id, &rollout.strategy_json)?;
        let reason = who_and_why("rolled back", actor, &req.reason);
        let now = crate::now_ms();
        let mut write = self.write(&rollout, now).await?;
        let (events, stores) = roll_back(&mut write, &rollout, &strategy, &reason, actor).await?;
        let devices = events.len().saturating_sub(1);
        write.commit(&events).await?;
        for store in stores {
            self.desired.invalidate(&store).await;
        }
        tracing::info!(rollout_id = %rollout.id, devices, by = actor, "Rollout rolled back.");
        self.engine.wake();
        self.reload(&rollout.id).await
    }

    pub async fn list(
        &self,
        req: v1::ListRolloutsRequest,
    ) -> Result<v1::ListRolloutsResponse, Status> {
        let state = match v1::RolloutState::try_from(req.state) {
            Ok(v1::RolloutState::Unspecified) => None,
            Ok(state) => RolloutState::from_proto(state),
            Err(_) => return Err(invalid("state", format!("unknown state {}", req.state))),
        };
        let records = self.storage.list_rollouts(state).await?;
        let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
        let counts = self.storage.rollout_counts(&ids).await?;
        Ok(v1::ListRolloutsResponse {
            rollouts: records
                .into_iter()
                .map(|r| {
                    let c = counts.get(&r.id).copied().unwrap_or_default();
                    rollout_view(r, c, self.approval_threshold)
                })
                .collect::<Result<_, _>>()?,
        })
    }

    pub async fn get(&self, req: v1::RolloutRequest) -> Result<v1::RolloutDetail, Status> {
        let rollout = self.rollout(&req).await?;
        let wave_counts = self.storage.wave_counts(&rollout.id).await?;
        let waves = self.storage.rollout_waves(&rollout.id).await?;
        let store_counts = self.storage.store_counts(&rollout.id).await?;
        let failures = self
            .storage
            .rollout_failures(&rollout.id, MAX_FAILURES_SHOWN)
            .await?;
        let total = sum(wave_counts.values());
        let waves = if waves.is_empty() {
            // A draft: its waves, empty.
            (0..rollout.wave_count.max(0) as u32)
                .map(|index| v1::WaveStatus {
                    index,
                    counts: Some(Counts::default().to_proto()),
                    ..Default::default()
                })
                .collect()
        } else {
            waves
                .iter()
                .map(|w| {
                    let c = wave_counts.get(&w.wave).copied().unwrap_or_default();
                    v1::WaveStatus {
                        index: w.wave.max(0) as u32,
                        devices: c.total(),
                        counts: Some(c.to_proto()),
                        started_at_unix_ms: w.started_at_ms.unwrap_or(0),
                        finished_at_unix_ms: w.finished_at_ms.unwrap_or(0),
                        bake_until_unix_ms: w.bake_until_ms.unwrap_or(0),
                        analysis: wave_analysis(w),
                    }
                })
                .collect()
        };
        Ok(v1::RolloutDetail {
            rollout: Some(rollout_view(rollout, total, self.approval_threshold)?),
            waves,
            stores: store_counts
                .into_iter()
                .map(|(store_id, c)| v1::StoreRolloutStatus {
                    store_id,
                    counts: Some(c.to_proto()),
                })
                .collect(),
            failures: failures
                .into_iter()
                .map(|f| v1::RolloutFailure {
                    device_id: f.device_id,
                    store_id: f.store_id,
                    wave: f.wave.max(0) as u32,
                    state: f.state.to_proto() as i32,
                    reason: f.reason,
                    at_unix_ms: f.updated_at_ms,
                })
                .collect(),
        })
    }

    // ----- helpers -----

    async fn rollout(&self, req: &v1::RolloutRequest) -> Result<RolloutRecord, Status> {
        text("id", &req.id, true, 64)?;
        self.storage
            .get_rollout(&req.id)
            .await?
            .ok_or_else(|| Status::not_found(format!("unknown rollout {}", req.id)))
    }

    async fn reload(&self, id: &str) -> Result<v1::Rollout, Status> {
        let rollout = self
            .storage
            .get_rollout(id)
            .await?
            .ok_or_else(|| Status::not_found(format!("unknown rollout {id}")))?;
        self.view(rollout).await
    }

    async fn view(&self, rollout: RolloutRecord) -> Result<v1::Rollout, Status> {
        let counts = self
            .storage
            .rollout_counts(std::slice::from_ref(&rollout.id))
            .await?
            .remove(&rollout.id)
            .unwrap_or_default();
        rollout_view(rollout, counts, self.approval_threshold)
    }

    /// A transaction on the rollout as read; `ABORTED` (retry) if it
    /// changed in between.
    async fn write(
        &self,
        rollout: &RolloutRecord,
        now: i64,
    ) -> Result<crate::storage::rollouts::RolloutWrite, Status> {
        self.storage
            .write_rollout(&rollout.id, rollout.revision, now)
            .await?
            .ok_or_else(|| {
                Status::aborted(format!(
                    "rollout {} changed while this call ran; try again",
                    rollout.id
                ))
            })
    }

    async fn published(&self, name: &str, version: &str) -> Result<BundleRecord, Status> {
        let bundle = self
            .storage
            .get_bundle(name, version)
            .await?
            .ok_or_else(|| {
                Status::not_found(format!("bundle {name} {version} is not published"))
            })?;
        if bundle.kind == "catalog" {
            return Err(Status::failed_precondition(format!(
                "{name} is a catalog bundle; catalogs are assigned per store, not rolled out"
            )));
        }
        Ok(bundle)
    }

    async fn validate_selector(&self, s: &Selector, bundle: &BundleRecord) -> Result<(), Status> {
        if s.store_ids.len() > 10_000 {
            return Err(invalid("selector.store_ids", "at most 10000 stores"));
        }
        for id in &s.store_ids {
            slug("selector.store_ids", id, 64)?;
        }
        self.stores_exist("selector.store_ids", &s.store_ids)
            .await?;
        for (field, labels) in [
            ("selector.store_labels", &s.store_labels),
            ("selector.device_labels", &s.device_labels),
        ] {
            if labels.len() > 64 {
                return Err(invalid(field, "at most 64 labels"));
            }
            for (key, value) in labels {
                label_key(field, key)?;
                text(field, value, false, 128)?;
            }
        }
        text("selector.hardware_model", &s.hardware_model, false, 64)?;
        if !s.hardware_model.is_empty()
            && !bundle
                .hardware
                .iter()
                .any(|h| h == "*" || *h == s.hardware_model)
        {
            return Err(Status::failed_precondition(format!(
                "bundle {} {} is for hardware {}, not {}",
                bundle.name,
                bundle.version,
                bundle.hardware.join(", "),
                s.hardware_model
            )));
        }
        validate::version("selector.installed_version", &s.installed_version, false)?;
        Ok(())
    }

    async fn stores_exist(&self, field: &str, ids: &[String]) -> Result<(), Status> {
        for id in ids {
            if !self.storage.store_exists(id).await? {
                return Err(Status::not_found(format!("{field}: unknown store {id}")));
            }
        }
        Ok(())
    }

    async fn validate_strategy(&self, s: &Strategy) -> Result<(), Status> {
        if s.waves.len() > MAX_WAVES {
            return Err(invalid(
                "strategy.waves",
                format!("at most {MAX_WAVES} waves"),
            ));
        }
        let mut last_count = 0u32;
        let mut last_percent = 0f64;
        let mut canary = BTreeSet::new();
        for (i, wave) in s.waves.iter().enumerate() {
            let field = format!("strategy.waves[{i}]");
            match wave {
                WaveSize::Count(n) => {
                    if *n == 0 {
                        return Err(invalid(&field, "a wave of 0 devices reaches nobody"));
                    }
                    if *n <= last_count {
                        return Err(invalid(
                            &field,
                            format!(
                                "wave sizes are cumulative: {n} must be more than {last_count}"
                            ),
                        ));
                    }
                    last_count = *n;
                }
                WaveSize::Percent(p) => {
                    if !(p.is_finite() && *p > 0.0 && *p <= 100.0) {
                        return Err(invalid(
                            &field,
                            "a percentage is more than 0 and at most 100",
                        ));
                    }
                    if *p <= last_percent {
                        return Err(invalid(
                            &field,
                            format!(
                                "wave sizes are cumulative: {p}% must be more than {last_percent}%"
                            ),
                        ));
                    }
                    last_percent = *p;
                }
                WaveSize::Stores(ids) => {
                    if ids.is_empty() {
                        return Err(invalid(&field, "a canary wave names at least one store"));
                    }
                    for id in ids {
                        slug(&field, id, 64)?;
                        if !canary.insert(id.clone()) {
                            return Err(invalid(&field, format!("store {id} is in two waves")));
                        }
                    }
                    self.stores_exist(&field, ids).await?;
                }
            }
        }
        let p = s.max_failures_percent;
        if !(p.is_finite() && (0.0..=100.0).contains(&p)) {
            return Err(invalid("strategy.max_failures_percent", "must be 0 to 100"));
        }
        for (field, value) in [
            ("strategy.bake_seconds", s.bake_seconds),
            ("strategy.device_timeout_seconds", s.device_timeout_seconds),
        ] {
            if value > MAX_DURATION_SECONDS {
                return Err(invalid(field, "must be at most 90 days"));
            }
        }
        if s.max_unavailable_per_store > 10_000 {
            return Err(invalid(
                "strategy.max_unavailable_per_store",
                "must be at most 10000",
            ));
        }
        Ok(())
    }

    /// The devices the selector covers now that can take the release; and
    /// FAILED_PRECONDITION if a running or paused rollout of the same bundle
    /// covers any of them.
    /// The devices `selector` selects now that can take `bundle`, as the
    /// engine computes them at start.
    async fn selection(
        &self,
        bundle: &BundleRecord,
        selector: &Selector,
    ) -> Result<Vec<SelectedDevice>, Status> {
        Ok(eligible(
            self.storage
                .select_devices(selector, &bundle.name, None)
                .await?,
            selector,
            &bundle.hardware,
        ))
    }

    async fn refuse_overlap(
        &self,
        bundle: &BundleRecord,
        selector: &Selector,
        this: Option<&str>,
    ) -> Result<Vec<SelectedDevice>, Status> {
        let selected = self.selection(bundle, selector).await?;
        let ours: BTreeSet<&str> = selected.iter().map(|d| d.device_id.as_str()).collect();
        for other in self.storage.active_rollouts_of(&bundle.name).await? {
            if Some(other.id.as_str()) == this {
                continue;
            }
            let mut theirs: BTreeSet<String> = self
                .storage
                .rollout_device_ids(&other.id)
                .await?
                .into_iter()
                .collect();
            let their_selector: Selector = from_json(&other.id, &other.selector_json)?;
            let their_bundle = self
                .storage
                .get_bundle(&other.bundle_name, &other.bundle_version)
                .await?;
            if let Some(their_bundle) = their_bundle {
                let now = self
                    .storage
                    .select_devices(&their_selector, &other.bundle_name, None)
                    .await?;
                theirs.extend(
                    eligible(now, &their_selector, &their_bundle.hardware)
                        .into_iter()
                        .map(|d| d.device_id),
                );
            }
            let shared: Vec<&str> = ours
                .iter()
                .copied()
                .filter(|id| theirs.contains(*id))
                .collect();
            if !shared.is_empty() {
                let examples: Vec<&str> = shared.iter().copied().take(OVERLAP_EXAMPLES).collect();
                return Err(Status::failed_precondition(format!(
                    "rollout {} ({} {}, {}) already covers {} of these devices ({}{}); \
                     finish, abort or roll it back first, or narrow the selector",
                    other.id,
                    other.bundle_name,
                    other.bundle_version,
                    other.state.as_str(),
                    shared.len(),
                    examples.join(", "),
                    if shared.len() > examples.len() {
                        ", …"
                    } else {
                        ""
                    },
                )));
            }
        }
        Ok(selected)
    }
}

/// Rolls `rollout` back within `write`: every device it dispatched goes
/// back to the version it had (a desired row flagged as a rollback), or
/// loses the rollout's desired row when it had none, and is marked rolled
/// back. Returns the events to commit (one per device, then the
/// rollout's) and the stores whose desired state changed.
pub(crate) async fn roll_back(
    write: &mut RolloutWrite,
    rollout: &RolloutRecord,
    strategy: &Strategy,
    reason: &str,
    actor: &str,
) -> Result<(Vec<NewEvent>, BTreeSet<String>), Error> {
    let touched = write.dispatched_devices().await?;
    let release = DesiredBundleRecord {
        name: rollout.bundle_name.clone(),
        version: rollout.bundle_version.clone(),
        kind: rollout.bundle_kind.clone(),
        download_ahead: strategy.download_ahead,
        emergency: strategy.emergency,
        rollback: true,
    };
    let restore: Vec<(String, String)> = touched
        .iter()
        .map(|d| {
            (
                d.device_id.clone(),
                d.previous_version.clone().unwrap_or_default(),
            )
        })
        .filter(|(_, previous)| *previous != rollout.bundle_version)
        .collect();
    write.restore_desired(&release, &restore).await?;
    let changes: Vec<crate::storage::rollouts::DeviceChange> = touched
        .iter()
        .filter(|d| d.state != DeviceState::RolledBack)
        .map(|d| crate::storage::rollouts::DeviceChange {
            device_id: d.device_id.clone(),
            from: d.state,
            to: DeviceState::RolledBack,
            reason: reason.to_string(),
        })
        .collect();
    write.change_devices(&changes).await?;
    write
        .set_state(RolloutState::RolledBack, reason, true)
        .await?;
    let mut events: Vec<NewEvent> = touched
        .iter()
        .filter(|d| d.state != DeviceState::RolledBack)
        .map(|d| {
            NewEvent::new(
                "rollout.device_rolled_back",
                &rollout.id,
                &d.device_id,
                json!({
                    "store_id": d.store_id,
                    "wave": d.wave,
                    "state": "rolled_back",
                    "previous_state": d.state.as_str(),
                    "reason": reason,
                    "version": d.previous_version.clone().unwrap_or_default(),
                }),
            )
        })
        .collect();
    events.push(NewEvent::new(
        "rollout.rolled_back",
        &rollout.id,
        "",
        json!({
            "bundle": rollout.bundle_name,
            "version": rollout.bundle_version,
            "state": "rolled_back",
            "previous_state": rollout.state.as_str(),
            "reason": reason,
            "by": actor,
            "devices": touched.len(),
        }),
    ));
    let stores = touched.iter().map(|d| d.store_id.clone()).collect();
    Ok((events, stores))
}

/// Largest analysis policy file.
pub const MAX_ANALYSIS_POLICY_BYTES: usize = 64 * 1024;

/// An analysis policy must parse, and every wave it judges (all but the
/// last) must leave its stores control tills: waves of whole stores do not.
fn validate_analysis(text: &str, strategy: &Strategy) -> Result<(), Status> {
    if text.is_empty() {
        return Ok(());
    }
    if text.len() > MAX_ANALYSIS_POLICY_BYTES {
        return Err(invalid(
            "analysis_policy",
            format!("at most {MAX_ANALYSIS_POLICY_BYTES} bytes"),
        ));
    }
    AnalysisPolicy::from_toml(text).map_err(|e| invalid("analysis_policy", e.to_string()))?;
    if strategy.wave_unit == WaveUnit::Stores {
        return Err(invalid(
            "analysis_policy",
            "canary analysis compares a wave's tills with the other tills of their stores, \
             and waves counted in stores leave none: count waves in devices (the default)",
        ));
    }
    let judged = strategy.waves.len().saturating_sub(1);
    if let Some(i) = strategy.waves[..judged]
        .iter()
        .position(|w| matches!(w, WaveSize::Stores(_)))
    {
        return Err(invalid(
            &format!("strategy.waves[{i}]"),
            "canary analysis compares a wave's tills with the other tills of their stores, \
             and a wave of named stores takes every till of them: use a count or a percentage",
        ));
    }
    Ok(())
}

/// A wave's latest analysis, for `GetRollout`.
fn wave_analysis(w: &crate::storage::rollouts::WaveRecord) -> Option<v1::WaveAnalysis> {
    let verdict = w.analysis_verdict.clone()?;
    let judgement: Option<Judgement> = w
        .analysis_json
        .as_deref()
        .and_then(|j| serde_json::from_str(j).ok());
    Some(v1::WaveAnalysis {
        verdict,
        summary: judgement
            .as_ref()
            .map(Judgement::summary)
            .unwrap_or_default(),
        elapsed_minutes: judgement.as_ref().map_or(0, |j| j.elapsed_minutes),
        judged_at_unix_ms: w.analysis_at_ms.unwrap_or(0),
        evidence_json: judgement
            .and_then(|j| serde_json::to_string(&j.signals).ok())
            .unwrap_or_default(),
    })
}

fn validate_waves_present(s: &v1::RolloutStrategy) -> Result<(), Status> {
    if s.waves.is_empty() {
        return Err(invalid("strategy.waves", "at least one wave (e.g. 100%)"));
    }
    if let Some(i) = s.waves.iter().position(|w| w.size.is_none()) {
        return Err(invalid(
            &format!("strategy.waves[{i}]"),
            "set a count, a percent or stores",
        ));
    }
    Ok(())
}

fn wrong_state(rollout: &RolloutRecord, verb: &str, rule: &str) -> Status {
    Status::failed_precondition(format!(
        "cannot {verb} rollout {}: it is {} ({rule})",
        rollout.id,
        rollout.state.as_str()
    ))
}

/// "paused by alice", "paused by alice: store 12 reports scanner errors".
fn who_and_why(verb: &str, actor: &str, reason: &str) -> String {
    let past = match verb {
        "pause" => "paused",
        "resume" => "resumed",
        "abort" => "aborted",
        other => other,
    };
    if reason.trim().is_empty() {
        format!("{past} by {actor}")
    } else {
        format!("{past} by {actor}: {}", reason.trim())
    }
}

fn merge(base: &serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    let mut out = base.clone();
    if let (Some(out), Some(extra)) = (out.as_object_mut(), extra.as_object()) {
        out.extend(extra.clone());
    }
    out
}

fn sum<'a>(counts: impl Iterator<Item = &'a Counts>) -> Counts {
    let mut total = Counts::default();
    for c in counts {
        for s in DeviceState::ALL {
            total.add(s, c.get(s));
        }
    }
    total
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, Status> {
    serde_json::to_string(value).map_err(|e| Error::Corrupt(e.to_string()).into())
}

fn from_json<T: serde::de::DeserializeOwned>(id: &str, json: &str) -> Result<T, Status> {
    serde_json::from_str(json).map_err(|e| Error::Corrupt(format!("rollout {id}: {e}")).into())
}

/// A stored rollout as the API shows it, with the control plane's
/// approval threshold.
pub fn rollout_view(
    r: RolloutRecord,
    counts: Counts,
    approval_threshold: u64,
) -> Result<v1::Rollout, Status> {
    let selector: Selector = from_json(&r.id, &r.selector_json)?;
    let strategy: Strategy = from_json(&r.id, &r.strategy_json)?;
    let selected_devices = r.selected_devices.max(0) as u64;
    Ok(v1::Rollout {
        approval_required: strategy.emergency || selected_devices > approval_threshold,
        selected_devices,
        approval_threshold_devices: approval_threshold,
        approved_by: r.approved_by,
        approved_at_unix_ms: r.approved_at_ms.unwrap_or(0),
        id: r.id,
        bundle_name: r.bundle_name,
        bundle_version: r.bundle_version,
        selector: Some(selector.to_proto()),
        strategy: Some(strategy.to_proto()),
        state: r.state.to_proto() as i32,
        current_wave: r.current_wave.max(0) as u32,
        wave_count: r.wave_count.max(0) as u32,
        reason: r.reason,
        counts: Some(counts.to_proto()),
        created_at_unix_ms: r.created_at_ms,
        started_at_unix_ms: r.started_at_ms.unwrap_or(0),
        finished_at_unix_ms: r.finished_at_ms.unwrap_or(0),
        created_by: r.created_by,
        analysis_policy: r.analysis_policy,
    })
}

/// Store labels, for `SetStoreLabels`.
pub fn labels_event(
    store_id: &str,
    set: &BTreeMap<String, String>,
    remove: &[String],
    actor: &str,
) -> NewEvent {
    NewEvent::new(
        "store.labels_changed",
        "",
        "",
        json!({ "store_id": store_id, "set": set, "removed": remove, "by": actor }),
    )
}
