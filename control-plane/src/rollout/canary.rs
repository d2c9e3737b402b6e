//! The engine's canary analysis: once a minute per rollout with a policy,
//! the current wave's tills against the control tills of their stores
//! (`analysis` judges; this reads what it needs).
//!
//! The wave's stores are watched from the wave's start. A till of this or
//! an earlier wave is a canary from the minute after it reported the
//! release running; until then, and if it failed or was rolled back, it is
//! on neither side. The stores' other tills (later waves, or not selected)
//! are the controls. The last wave is not judged: it leaves its stores no
//! control tills.

use std::collections::HashMap;

use super::analysis::{AnalysisPolicy, Group, Judgement, TillMinute, judge_wave, observe};
use super::model::DeviceState;
use crate::error::Error;
use crate::storage::Storage;
use crate::storage::rollouts::RolloutRecord;

/// Minutes since the Unix epoch of a time in milliseconds.
pub fn minute_of(ms: i64) -> i64 {
    ms.div_euclid(60_000)
}

/// Judges wave `wave` of `rollout`, started at `started_ms`, with what its
/// stores' tills reported in the finished minutes up to `now_ms`.
pub async fn judge(
    storage: &Storage,
    rollout: &RolloutRecord,
    policy: &AnalysisPolicy,
    wave: i64,
    started_ms: i64,
    now_ms: i64,
) -> Result<Judgement, Error> {
    let first = minute_of(started_ms);
    let now = minute_of(now_ms);
    let stores = storage.wave_stores(&rollout.id, wave).await?;
    let devices: HashMap<String, (i64, DeviceState, i64)> = storage
        .analysed_devices(&rollout.id, &stores)
        .await?
        .into_iter()
        .map(|d| (d.device_id, (d.wave, d.state, minute_of(d.updated_at_ms))))
        .collect();
    let minutes = storage.signal_minutes(&stores, first, now).await?;
    let sorted = minutes.iter().filter_map(|m| {
        let group = match devices.get(&m.device_id) {
            Some(&(w, state, since)) if w <= wave => (state == DeviceState::Succeeded
                && m.minute.minute > since)
                .then_some(Group::Canary)?,
            _ => Group::Control,
        };
        Some(TillMinute {
            store_id: &m.store_id,
            minute: u32::try_from(m.minute.minute - first).unwrap_or(0),
            group,
            counts: &m.minute.counts,
            values: &m.minute.values,
        })
    });
    let elapsed =
        u32::try_from(now_ms.saturating_sub(started_ms).max(0) / 60_000).unwrap_or(u32::MAX);
    Ok(judge_wave(policy, &observe(policy, elapsed, sorted)))
}
