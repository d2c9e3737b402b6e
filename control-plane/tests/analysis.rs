//! Canary analysis over real gRPC: simulated tills report their signals
//! once each minute is over, and the engine judges each wave's tills
//! against the control tills of the same stores, on SQLite and (with
//! --ignored) PostgreSQL.
//!
//! Each judged scenario waits for real minutes to end (a wave is judged on
//! finished minutes only): about two minutes each; they run side by side.

mod common;

use common::fleet::*;
use common::{Admin, Backend, assert_metric, assert_status, heartbeat};
use posfleet_proto::v1;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tonic::Code;

/// Long enough for the minute a canary installed in to end, the next one
/// to end too, and the engine to look.
const JUDGED_WITHIN: Duration = Duration::from_secs(200);

/// Crashes counted per till-hour; fails on twice the controls' rate.
fn policy(on_fail: &str, max_minutes: u32) -> String {
    format!(
        r#"
min_observation_minutes = 1
max_observation_minutes = {max_minutes}
min_canary_till_hours = 0
on_fail = "{on_fail}"
on_inconclusive = "pause"

[signals.service_crashes]
kind = "count"
effect = 1.0
"#
    )
}

/// 1.1.0 to every till of 3 stores of 4, a first wave of 3 tills judged
/// by `policy`.
fn analysed(policy: &str) -> v1::CreateRolloutRequest {
    let mut req = request(
        "1.1.0",
        Default::default(),
        strategy(vec![count(3), percent(100.0)]),
    );
    req.analysis_policy = policy.into();
    req
}

/// Crashes per till and minute, by the version the till runs.
fn crashes(old: u64, new: u64) -> HashMap<String, BTreeMap<String, u64>> {
    HashMap::from([
        (
            "1.0.0".to_string(),
            BTreeMap::from([("service_crashes".to_string(), old)]),
        ),
        (
            "1.1.0".to_string(),
            BTreeMap::from([("service_crashes".to_string(), new)]),
        ),
    ])
}

async fn started(admin: &mut Admin, req: v1::CreateRolloutRequest) -> String {
    let rollout = create(admin, req).await.unwrap();
    start(admin, &rollout.id).await.unwrap();
    rollout.id
}

fn analysis(detail: &v1::RolloutDetail, wave: usize) -> Option<&v1::WaveAnalysis> {
    detail.waves[wave].analysis.as_ref()
}

fn verdict(detail: &v1::RolloutDetail, wave: usize) -> &str {
    analysis(detail, wave).map_or("", |a| a.verdict.as_str())
}

/// The `rollout.analysis` events' data.
async fn verdicts(admin: &mut Admin, id: &str) -> Vec<serde_json::Value> {
    events(admin, id)
        .await
        .iter()
        .filter(|e| e.kind == "rollout.analysis")
        .map(data)
        .collect()
}

async fn a_release_that_crashes_more_on_canary_tills_fails_and_pauses(backend: Backend) {
    let (s, mut admin, mut sim, _key) = fleet(backend, 3, 4, Some("1.0.0")).await;
    sim.signals = Some(crashes(1, 30));
    let id = started(&mut admin, analysed(&policy("pause", 30))).await;
    let detail = sim
        .until(&mut admin, &id, JUDGED_WITHIN, |d| {
            state(d) == v1::RolloutState::Paused
        })
        .await;
    let rollout = detail.rollout.as_ref().unwrap();
    assert!(
        rollout.reason.starts_with("analysis_fail: Fail"),
        "{}",
        rollout.reason
    );
    assert_eq!(verdict(&detail, 0), "fail");
    let judged = analysis(&detail, 0).unwrap();
    assert!(
        judged.summary.contains("service_crashes FAIL"),
        "{}",
        judged.summary
    );
    assert_eq!(detail.waves[1].started_at_unix_ms, 0, "the next wave waits");
    // The evidence: the canary tills' events against the controls'.
    let evidence: serde_json::Value = serde_json::from_str(&judged.evidence_json).unwrap();
    let crashes = &evidence[0];
    assert_eq!(crashes["signal"], "service_crashes");
    assert_eq!(crashes["status"], "fail");
    let canary = crashes["canary_events"].as_u64().unwrap();
    let control = crashes["control_events"].as_u64().unwrap();
    let canary_rate = crashes["canary_rate_per_till_hour"].as_f64().unwrap();
    let control_rate = crashes["control_rate_per_till_hour"].as_f64().unwrap();
    assert!(canary >= 30 && control >= 1, "{crashes}");
    assert!(canary_rate > 10.0 * control_rate, "{crashes}");
    let recorded = verdicts(&mut admin, &id).await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["verdict"], "fail");
    assert_eq!(recorded[0]["wave"], 0);
    assert_eq!(recorded[0]["signals"][0]["canary_events"], canary);
    let (_, text) = s.server.http_get("/metrics").await;
    assert_metric(
        &text,
        r#"posfleet_rollout_analysis_verdicts_total{verdict="fail"}"#,
        1.0,
    );
    assert_metric(
        &text,
        r#"posfleet_rollout_pauses_total{reason="analysis_fail"}"#,
        1.0,
    );
    assert!(
        common::metric_sample(&text, r#"posfleet_signal_reports_total{result="stored"}"#)
            .is_some_and(|n| n >= 1.0),
        "{text}"
    );

    // An operator who accepts it resumes: the rest of the fleet gets it.
    let req = admin.req(rollout_request(&id, "crashes are the printer driver's"));
    admin.client.resume_rollout(req).await.unwrap();
    let detail = sim
        .until(&mut admin, &id, Duration::from_secs(60), |d| {
            state(d) == v1::RolloutState::Completed
        })
        .await;
    assert_eq!(verdict(&detail, 0), "accepted");
    assert!(
        analysis(&detail, 1).is_none(),
        "the last wave is not judged"
    );
    s.finish().await;
}

async fn a_release_as_good_as_the_old_one_passes(backend: Backend) {
    let (s, mut admin, mut sim, _key) = fleet(backend, 3, 4, Some("1.0.0")).await;
    sim.signals = Some(crashes(10, 10));
    let id = started(&mut admin, analysed(&policy("pause", 30))).await;
    let detail = sim
        .until(&mut admin, &id, JUDGED_WITHIN, |d| {
            state(d) == v1::RolloutState::Completed || state(d) == v1::RolloutState::Paused
        })
        .await;
    assert_eq!(
        state(&detail),
        v1::RolloutState::Completed,
        "{:?}",
        detail.rollout
    );
    assert_eq!(verdict(&detail, 0), "pass");
    let recorded = verdicts(&mut admin, &id).await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["verdict"], "pass");
    for till in &sim.tills {
        assert_eq!(till.active.as_deref(), Some("1.1.0"));
    }
    s.finish().await;
}

async fn without_signals_the_wave_is_inconclusive_and_pauses(backend: Backend) {
    let (s, mut admin, mut sim, _key) = fleet(backend, 3, 4, Some("1.0.0")).await;
    // Tills that report nothing (agents too old to, say).
    sim.signals = None;
    let id = started(&mut admin, analysed(&policy("pause", 1))).await;
    let detail = sim
        .until(&mut admin, &id, JUDGED_WITHIN, |d| {
            state(d) == v1::RolloutState::Paused
        })
        .await;
    assert_eq!(verdict(&detail, 0), "inconclusive");
    let reason = &detail.rollout.as_ref().unwrap().reason;
    assert!(
        reason.starts_with("analysis_inconclusive: Inconclusive") && reason.contains("no data"),
        "{reason}"
    );
    assert_eq!(detail.waves[1].started_at_unix_ms, 0, "the next wave waits");
    s.finish().await;
}

async fn a_failed_wave_rolls_back_when_the_policy_says_so(backend: Backend) {
    let (s, mut admin, mut sim, _key) = fleet(backend, 3, 4, Some("1.0.0")).await;
    sim.signals = Some(crashes(1, 30));
    let id = started(&mut admin, analysed(&policy("rollback", 30))).await;
    let detail = sim
        .until(&mut admin, &id, JUDGED_WITHIN, |d| {
            state(d) == v1::RolloutState::RolledBack
        })
        .await;
    assert_eq!(verdict(&detail, 0), "fail");
    assert!(
        detail
            .rollout
            .as_ref()
            .unwrap()
            .reason
            .contains("analysis_fail"),
        "{:?}",
        detail.rollout
    );
    // The canary tills go back to 1.0.0.
    for _ in 0..10 {
        sim.step().await;
    }
    for till in &sim.tills {
        assert_eq!(till.active.as_deref(), Some("1.0.0"), "{}", till.id);
    }
    s.finish().await;
}

async fn bad_policies_and_bad_signals_are_refused(backend: Backend) {
    let (s, mut admin, mut sim, _key) = fleet(backend, 2, 2, Some("1.0.0")).await;
    let refused = |text: &str| analysed(text);
    assert_status(
        create(&mut admin, refused("alpha = 2")).await,
        Code::InvalidArgument,
        "analysis_policy",
    );
    assert_status(
        create(&mut admin, refused("[signals.Crashes]\nkind = \"count\"")).await,
        Code::InvalidArgument,
        "Crashes",
    );
    let mut by_store = analysed(&policy("pause", 30));
    by_store.strategy.as_mut().unwrap().wave_unit = v1::WaveUnit::Stores as i32;
    assert_status(
        create(&mut admin, by_store).await,
        Code::InvalidArgument,
        "waves counted in stores",
    );
    let mut named = analysed(&policy("pause", 30));
    named.strategy.as_mut().unwrap().waves = vec![stores(&["s1"]), percent(100.0)];
    assert_status(
        create(&mut admin, named).await,
        Code::InvalidArgument,
        "a wave of named stores",
    );
    let mut huge = analysed(&policy("pause", 30));
    huge.analysis_policy.push_str(&"#".repeat(70 * 1024));
    assert_status(
        create(&mut admin, huge).await,
        Code::InvalidArgument,
        "bytes",
    );
    // Named stores as the last wave are fine: it is not judged.
    let mut last = analysed(&policy("pause", 30));
    last.strategy.as_mut().unwrap().waves = vec![count(1), stores(&["s1", "s2"])];
    let created = create(&mut admin, last).await.unwrap();
    assert!(!created.analysis_policy.is_empty());

    // A till's heartbeat with signals no agent would send is refused.
    let credential = sim.tills[0].credential.clone();
    let minute = |counts: &[(&str, u64)]| v1::SignalMinute {
        minute: now_ms().div_euclid(60_000) - 1,
        counts: counts.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        values: Default::default(),
    };
    for (minutes, fragment) in [
        (vec![minute(&[("card-reads", 1)])], "card-reads"),
        (
            (0..121).map(|_| minute(&[])).collect::<Vec<_>>(),
            "more than 120 minutes",
        ),
    ] {
        assert_status(
            sim.agent
                .heartbeat(heartbeat(
                    &credential,
                    v1::HeartbeatRequest {
                        signal_minutes: minutes,
                        ..Default::default()
                    },
                ))
                .await,
            Code::InvalidArgument,
            fragment,
        );
    }
    // Good minutes from a store no wave is judging are let go.
    sim.agent
        .heartbeat(heartbeat(
            &credential,
            v1::HeartbeatRequest {
                signal_minutes: vec![minute(&[("service_crashes", 2)])],
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let (_, text) = s.server.http_get("/metrics").await;
    assert_metric(
        &text,
        r#"posfleet_signal_reports_total{result="unobserved"}"#,
        1.0,
    );
    s.finish().await;
}

/// The judged scenarios side by side, each on its own control plane: they
/// mostly wait for minutes to end.
async fn judged_waves_fail_pass_roll_back_or_stay_inconclusive(backend: Backend) {
    tokio::join!(
        a_release_that_crashes_more_on_canary_tills_fails_and_pauses(backend),
        a_release_as_good_as_the_old_one_passes(backend),
        without_signals_the_wave_is_inconclusive_and_pauses(backend),
        a_failed_wave_rolls_back_when_the_policy_says_so(backend),
    );
}

on_both_backends!(
    judged_waves_fail_pass_roll_back_or_stay_inconclusive,
    bad_policies_and_bad_signals_are_refused,
);
