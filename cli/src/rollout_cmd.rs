//! `posfleet rollout …`: staged rollouts of a release, wave by wave.

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use posfleet_proto::v1;
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

use crate::view::{self, table};
use crate::{Admin, Output, parse_bundle_ref, parse_label, show};

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Create a rollout of a published release (a draft until started).
    Create(Box<CreateArgs>),
    /// Start a draft rollout (one awaiting approval must be approved first).
    Start(IdArgs),
    /// Approve a draft that needs a second person's approval: one selecting
    /// more devices than the control plane's approval_threshold_devices,
    /// or an emergency. Its creator cannot.
    Approve {
        id: String,
    },
    /// Stop dispatching until resumed.
    Pause(IdArgs),
    Resume(IdArgs),
    /// Stop for good; devices keep what they have.
    Abort(IdArgs),
    /// Put every device the rollout touched back on its previous version.
    Rollback(IdArgs),
    List {
        /// Only rollouts in this state: draft, running, paused, completed,
        /// aborted, rolled_back.
        #[arg(long)]
        state: Option<String>,
    },
    /// Per wave and per store counts, and failures with their reasons.
    Show {
        id: String,
    },
    /// Everything that happened in the rollout, in order.
    Events {
        id: String,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Live progress until the rollout completes, stops or pauses.
    Watch {
        id: String,
        /// Poll interval.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        every: Duration,
    },
}

#[derive(Debug, Args)]
pub struct IdArgs {
    id: String,
    /// Why; kept with the rollout's events.
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The release, `NAME@VERSION`, a published bundle.
    #[arg(long)]
    release: String,
    /// Only devices of these stores (comma-separated).
    #[arg(long, value_delimiter = ',')]
    stores: Vec<String>,
    /// Only devices with this label, `key=value`; repeatable.
    #[arg(long = "selector", value_parser = parse_label)]
    device_labels: Vec<(String, String)>,
    /// Only devices of stores with this label, `key=value`; repeatable.
    #[arg(long = "store-selector", value_parser = parse_label)]
    store_labels: Vec<(String, String)>,
    /// Only devices of this hardware model.
    #[arg(long)]
    hardware: Option<String>,
    /// Only devices running this version of the bundle now.
    #[arg(long)]
    installed_version: Option<String>,
    /// Cumulative wave sizes: counts or percentages, e.g. `1,10%,50%,100%`.
    #[arg(long, default_value = "100%")]
    waves: String,
    /// A first wave of exactly these stores (comma-separated).
    #[arg(long, value_delimiter = ',')]
    canary_stores: Vec<String>,
    /// Count stores instead of devices in wave sizes.
    #[arg(long)]
    by_store: bool,
    /// Wait after each wave, e.g. `30m`.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    bake: Duration,
    /// Pause when a wave's failures reach this share of it, e.g. `5%`.
    #[arg(long, default_value = "5%", value_parser = parse_percent)]
    max_failures: f64,
    /// ... and at least this many devices.
    #[arg(long, default_value_t = 1)]
    min_failures: u32,
    /// A device not done this long after it was notified has timed out.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    device_timeout: Duration,
    /// Tills of one store installing at once.
    #[arg(long, default_value_t = 1)]
    max_unavailable: u32,
    /// Download only inside the maintenance window too.
    #[arg(long)]
    no_download_ahead: bool,
    /// Install at once, ignoring maintenance windows.
    #[arg(long)]
    emergency: bool,
    /// Judge each wave but the last by canary analysis, with the policy in
    /// this TOML file (see the README's "Canary analysis").
    #[arg(long, value_name = "FILE")]
    analysis: Option<std::path::PathBuf>,
    /// Start it at once.
    #[arg(long)]
    start: bool,
}

/// Largest analysis policy file the CLI reads (the control plane's limit).
const MAX_ANALYSIS_POLICY_BYTES: u64 = 64 * 1024;

/// The policy file's text.
fn read_policy(path: &std::path::Path) -> anyhow::Result<String> {
    let len = std::fs::metadata(path)
        .map_err(|e| anyhow!("cannot read the analysis policy {}: {e}", path.display()))?
        .len();
    if len > MAX_ANALYSIS_POLICY_BYTES {
        bail!(
            "the analysis policy {} is {len} bytes; at most {MAX_ANALYSIS_POLICY_BYTES} are allowed",
            path.display()
        );
    }
    std::fs::read_to_string(path)
        .map_err(|e| anyhow!("cannot read the analysis policy {}: {e}", path.display()))
}

/// `5%` or `5` → 5.0.
fn parse_percent(s: &str) -> Result<f64, String> {
    let value: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("`{s}` is not a percentage such as 5%"))?;
    if !(0.0..=100.0).contains(&value) {
        return Err(format!("`{s}` must be 0% to 100%"));
    }
    Ok(value)
}

/// `1,10%,50%,100%` → waves of 1 device, then up to 10%, 50%, all.
pub fn parse_waves(s: &str) -> anyhow::Result<Vec<v1::WaveSpec>> {
    use v1::wave_spec::Size;
    s.split(',')
        .map(|part| {
            let part = part.trim();
            let size = if let Some(p) = part.strip_suffix('%') {
                let p: f64 = p
                    .parse()
                    .map_err(|_| anyhow!("wave `{part}` is not a percentage"))?;
                if !(p > 0.0 && p <= 100.0) {
                    bail!("wave `{part}` must be more than 0% and at most 100%");
                }
                Size::Percent(p)
            } else {
                let n: u32 = part
                    .parse()
                    .map_err(|_| anyhow!("wave `{part}` is neither a count nor a percentage"))?;
                if n == 0 {
                    bail!("a wave of 0 devices reaches nobody");
                }
                Size::Count(n)
            };
            Ok(v1::WaveSpec { size: Some(size) })
        })
        .collect()
}

fn create_request(args: CreateArgs) -> anyhow::Result<v1::CreateRolloutRequest> {
    let (bundle_name, bundle_version) = parse_bundle_ref(&args.release)?;
    let mut waves = Vec::new();
    if !args.canary_stores.is_empty() {
        waves.push(v1::WaveSpec {
            size: Some(v1::wave_spec::Size::Stores(v1::StoreList {
                store_ids: args.canary_stores,
            })),
        });
    }
    waves.extend(parse_waves(&args.waves)?);
    let analysis_policy = match &args.analysis {
        Some(path) => read_policy(path)?,
        None => String::new(),
    };
    Ok(v1::CreateRolloutRequest {
        bundle_name,
        analysis_policy,
        bundle_version,
        selector: Some(v1::RolloutSelector {
            store_ids: args.stores,
            store_labels: args.store_labels.into_iter().collect(),
            device_labels: args.device_labels.into_iter().collect(),
            hardware_model: args.hardware.unwrap_or_default(),
            installed_version: args.installed_version.unwrap_or_default(),
        }),
        strategy: Some(v1::RolloutStrategy {
            waves,
            wave_unit: if args.by_store {
                v1::WaveUnit::Stores
            } else {
                v1::WaveUnit::Devices
            } as i32,
            bake_seconds: args.bake.as_secs(),
            max_failures_percent: args.max_failures,
            min_failures: args.min_failures,
            device_timeout_seconds: args.device_timeout.as_secs(),
            max_unavailable_per_store: args.max_unavailable,
            download_ahead: Some(!args.no_download_ahead),
            emergency: args.emergency,
        }),
    })
}

fn state_name(state: i32) -> String {
    v1::RolloutState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("ROLLOUT_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| state.to_string())
}

fn parse_state(s: &str) -> anyhow::Result<v1::RolloutState> {
    v1::RolloutState::from_str_name(&format!("ROLLOUT_STATE_{}", s.to_ascii_uppercase()))
        .filter(|s| *s != v1::RolloutState::Unspecified)
        .ok_or_else(|| {
            anyhow!("`{s}` is not a rollout state (draft, running, paused, completed, aborted, rolled_back)")
        })
}

#[derive(Debug, Default, Serialize)]
pub struct CountsView {
    pub pending: u64,
    pub notified: u64,
    pub downloading: u64,
    pub installing: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub rolled_back: u64,
    pub timed_out: u64,
}

impl From<Option<v1::DeviceCounts>> for CountsView {
    fn from(c: Option<v1::DeviceCounts>) -> Self {
        let c = c.unwrap_or_default();
        CountsView {
            pending: c.pending,
            notified: c.notified,
            downloading: c.downloading,
            installing: c.installing,
            succeeded: c.succeeded,
            failed: c.failed,
            rolled_back: c.rolled_back,
            timed_out: c.timed_out,
        }
    }
}

impl CountsView {
    fn total(&self) -> u64 {
        self.pending
            + self.notified
            + self.downloading
            + self.installing
            + self.succeeded
            + self.failed
            + self.rolled_back
            + self.timed_out
    }

    fn failures(&self) -> u64 {
        self.failed + self.rolled_back + self.timed_out
    }

    fn in_flight(&self) -> u64 {
        self.notified + self.downloading + self.installing
    }
}

#[derive(Debug, Serialize)]
pub struct RolloutView {
    pub id: String,
    pub release: String,
    pub state: String,
    pub current_wave: u32,
    pub wave_count: u32,
    pub reason: String,
    /// "awaiting approval (…)", "approved by …", or empty when it needs
    /// no approval.
    pub approval: String,
    pub approved_by: String,
    pub counts: CountsView,
    pub created_by: String,
    pub created_at: String,
    pub started_at: String,
    pub finished_at: String,
    /// Whether waves are judged by canary analysis.
    pub analysis: bool,
}

impl From<v1::Rollout> for RolloutView {
    fn from(r: v1::Rollout) -> Self {
        RolloutView {
            release: format!("{}@{}", r.bundle_name, r.bundle_version),
            state: state_name(r.state),
            current_wave: r.current_wave,
            wave_count: r.wave_count,
            approval: approval_text(&r),
            approved_by: r.approved_by,
            counts: r.counts.into(),
            created_by: r.created_by,
            created_at: view::time(r.created_at_unix_ms),
            started_at: view::time(r.started_at_unix_ms),
            finished_at: view::time(r.finished_at_unix_ms),
            analysis: !r.analysis_policy.is_empty(),
            id: r.id,
            reason: r.reason,
        }
    }
}

/// Where a rollout stands with its approval, for people.
fn approval_text(r: &v1::Rollout) -> String {
    if !r.approved_by.is_empty() {
        return format!(
            "approved by {} at {}",
            r.approved_by,
            view::time(r.approved_at_unix_ms)
        );
    }
    if !r.approval_required {
        return String::new();
    }
    let why = if r.strategy.as_ref().is_some_and(|s| s.emergency) {
        "emergency".to_string()
    } else {
        format!(
            "{} devices > threshold {}",
            r.selected_devices, r.approval_threshold_devices
        )
    };
    if r.state == v1::RolloutState::Draft as i32 {
        format!("awaiting approval ({why})")
    } else {
        format!("needed approval ({why})")
    }
}

impl RolloutView {
    /// "draft", "draft, awaiting approval (150 devices > threshold 100)".
    fn state_text(&self) -> String {
        if self.approval.is_empty() {
            self.state.clone()
        } else {
            format!("{}, {}", self.state, self.approval)
        }
    }
}

#[derive(Debug, Serialize)]
pub struct EventView {
    pub seq: u64,
    pub at: String,
    pub kind: String,
    pub device_id: String,
    pub data: serde_json::Value,
}

#[derive(Debug, Serialize)]
pub struct WaveView {
    pub index: u32,
    pub devices: u64,
    pub counts: CountsView,
    pub started_at: String,
    pub finished_at: String,
    pub bake_until: String,
    pub analysis: Option<AnalysisView>,
}

/// A wave's latest canary analysis.
#[derive(Debug, Serialize)]
pub struct AnalysisView {
    pub verdict: String,
    pub summary: String,
    pub elapsed_minutes: u32,
    pub judged_at: String,
    /// Per-signal evidence, as the control plane recorded it.
    pub signals: serde_json::Value,
}

impl From<v1::WaveAnalysis> for AnalysisView {
    fn from(a: v1::WaveAnalysis) -> Self {
        AnalysisView {
            verdict: a.verdict,
            summary: a.summary,
            elapsed_minutes: a.elapsed_minutes,
            judged_at: view::time(a.judged_at_unix_ms),
            signals: serde_json::from_str(&a.evidence_json).unwrap_or(serde_json::Value::Null),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct StoreCountsView {
    pub store_id: String,
    pub counts: CountsView,
}

#[derive(Debug, Serialize)]
pub struct FailureView {
    pub device_id: String,
    pub store_id: String,
    pub wave: u32,
    pub state: String,
    pub reason: String,
    pub at: String,
}

#[derive(Debug, Serialize)]
pub struct RolloutDetailView {
    #[serde(flatten)]
    pub rollout: RolloutView,
    pub waves: Vec<WaveView>,
    pub stores: Vec<StoreCountsView>,
    pub failures: Vec<FailureView>,
}

fn device_state_name(state: i32) -> String {
    v1::RolloutDeviceState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("ROLLOUT_DEVICE_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| state.to_string())
}

impl From<v1::RolloutDetail> for RolloutDetailView {
    fn from(d: v1::RolloutDetail) -> Self {
        RolloutDetailView {
            rollout: d.rollout.unwrap_or_default().into(),
            waves: d
                .waves
                .into_iter()
                .map(|w| WaveView {
                    index: w.index,
                    devices: w.devices,
                    counts: w.counts.into(),
                    started_at: view::time(w.started_at_unix_ms),
                    finished_at: view::time(w.finished_at_unix_ms),
                    bake_until: view::time(w.bake_until_unix_ms),
                    analysis: w.analysis.map(AnalysisView::from),
                })
                .collect(),
            stores: d
                .stores
                .into_iter()
                .map(|s| StoreCountsView {
                    store_id: s.store_id,
                    counts: s.counts.into(),
                })
                .collect(),
            failures: d
                .failures
                .into_iter()
                .map(|f| FailureView {
                    device_id: f.device_id,
                    store_id: f.store_id,
                    wave: f.wave,
                    state: device_state_name(f.state),
                    reason: f.reason,
                    at: view::time(f.at_unix_ms),
                })
                .collect(),
        }
    }
}

fn counts_cell(c: &CountsView) -> String {
    format!(
        "{}/{} ok, {} in flight, {} failed",
        c.succeeded,
        c.total(),
        c.in_flight(),
        c.failures()
    )
}

fn rollouts_table(rollouts: &[RolloutView]) -> comfy_table::Table {
    let mut t = table(&[
        "ROLLOUT", "RELEASE", "STATE", "WAVE", "DEVICES", "REASON", "CREATED",
    ]);
    for r in rollouts {
        t.add_row(vec![
            r.id.clone(),
            r.release.clone(),
            r.state_text(),
            format!(
                "{}/{}",
                (r.current_wave + 1).min(r.wave_count),
                r.wave_count
            ),
            counts_cell(&r.counts),
            r.reason.clone(),
            r.created_at.clone(),
        ]);
    }
    t
}

pub(crate) fn detail_text(d: &RolloutDetailView) -> String {
    let r = &d.rollout;
    let mut out = format!(
        "Rollout {} of {}: {}{}\nCreated {} by {}; started {}; finished {}\nDevices: {}\n",
        r.id,
        r.release,
        r.state_text(),
        if r.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.reason)
        },
        r.created_at,
        r.created_by,
        r.started_at,
        r.finished_at,
        counts_cell(&r.counts)
    );
    let mut waves = table(&[
        "WAVE",
        "DEVICES",
        "PROGRESS",
        "STARTED",
        "FINISHED",
        "BAKE UNTIL",
        "ANALYSIS",
    ]);
    for w in &d.waves {
        let analysis = match &w.analysis {
            Some(a) => format!("{} ({} min)", a.verdict, a.elapsed_minutes),
            None if r.analysis && w.index + 1 == r.wave_count => "not judged (last)".into(),
            None if r.analysis => "-".into(),
            None => String::new(),
        };
        waves.add_row(vec![
            (w.index + 1).to_string(),
            w.devices.to_string(),
            counts_cell(&w.counts),
            w.started_at.clone(),
            w.finished_at.clone(),
            w.bake_until.clone(),
            analysis,
        ]);
    }
    out.push_str(&format!("{waves}\n"));
    for w in &d.waves {
        if let Some(a) = &w.analysis {
            out.push_str(&format!(
                "Wave {} canary analysis, {}: {}\n",
                w.index + 1,
                a.judged_at,
                a.summary
            ));
        }
    }
    let mut stores = table(&["STORE", "PROGRESS"]);
    for s in &d.stores {
        stores.add_row(vec![s.store_id.clone(), counts_cell(&s.counts)]);
    }
    out.push_str(&format!("{stores}\n"));
    if d.failures.is_empty() {
        out.push_str("No failures.\n");
    } else {
        let mut failures = table(&["DEVICE", "STORE", "WAVE", "STATE", "REASON", "AT"]);
        for f in &d.failures {
            failures.add_row(vec![
                f.device_id.clone(),
                f.store_id.clone(),
                (f.wave + 1).to_string(),
                f.state.clone(),
                f.reason.clone(),
                f.at.clone(),
            ]);
        }
        out.push_str(&format!("{failures}\n"));
    }
    out
}

impl Admin {
    pub async fn create_rollout(
        &mut self,
        request: v1::CreateRolloutRequest,
    ) -> anyhow::Result<v1::Rollout> {
        let request = self.request(request);
        let answer = self.client.create_rollout(request).await;
        self.answer(answer)
    }

    /// start, approve, pause, resume, abort or rollback.
    pub async fn rollout_operation(
        &mut self,
        operation: &str,
        id: &str,
        reason: &str,
    ) -> anyhow::Result<v1::Rollout> {
        let request = self.request(v1::RolloutRequest {
            id: id.into(),
            reason: reason.into(),
        });
        let response = match operation {
            "start" => self.client.start_rollout(request).await,
            "approve" => self.client.approve_rollout(request).await,
            "pause" => self.client.pause_rollout(request).await,
            "resume" => self.client.resume_rollout(request).await,
            "abort" => self.client.abort_rollout(request).await,
            "rollback" => self.client.rollback_rollout(request).await,
            other => bail!("unknown rollout operation {other}"),
        };
        self.answer(response)
    }

    /// Every event of rollout `id` after `after`, following pages.
    pub async fn rollout_events(&mut self, id: &str, after: u64) -> anyhow::Result<Vec<EventView>> {
        let mut events = Vec::new();
        let mut cursor = after;
        loop {
            let request = self.request(v1::ListEventsRequest {
                rollout_id: id.into(),
                after_seq: cursor,
                limit: 1000,
            });
            let page = self
                .client
                .list_events(request)
                .await
                .map_err(|s| self.error(s))?
                .into_inner()
                .events;
            let Some(last) = page.last() else {
                return Ok(events);
            };
            cursor = last.seq;
            events.extend(page.into_iter().map(|e| EventView {
                seq: e.seq,
                at: view::time(e.at_unix_ms),
                kind: e.kind,
                device_id: e.device_id,
                data: serde_json::from_str(&e.data_json).unwrap_or(serde_json::Value::Null),
            }));
        }
    }

    pub async fn get_rollout(&mut self, id: &str) -> anyhow::Result<v1::RolloutDetail> {
        let request = self.request(v1::RolloutRequest {
            id: id.into(),
            reason: String::new(),
        });
        let answer = self.client.get_rollout(request).await;
        self.answer(answer)
    }

    pub async fn list_rollouts(
        &mut self,
        state: v1::RolloutState,
    ) -> anyhow::Result<Vec<v1::Rollout>> {
        let request = self.request(v1::ListRolloutsRequest {
            state: state as i32,
        });
        let answer = self.client.list_rollouts(request).await;
        self.answer(answer).map(|r| r.rollouts)
    }
}

pub async fn run(admin: &mut Admin, command: RolloutCommand, output: Output) -> anyhow::Result<()> {
    let (operation, args) = match command {
        RolloutCommand::Create(args) => {
            let start = args.start;
            let mut rollout = admin.create_rollout(create_request(*args)?).await?;
            if start {
                rollout = admin.rollout_operation("start", &rollout.id, "").await?;
            }
            let rollout = RolloutView::from(rollout);
            return show_rollout(output, &rollout);
        }
        RolloutCommand::List { state } => {
            let state = match state {
                Some(s) => parse_state(&s)?,
                None => v1::RolloutState::Unspecified,
            };
            let rollouts: Vec<RolloutView> = admin
                .list_rollouts(state)
                .await?
                .into_iter()
                .map(Into::into)
                .collect();
            return show(output, &rollouts, || {
                format!("{}\n", rollouts_table(&rollouts))
            });
        }
        RolloutCommand::Show { id } => {
            let detail = RolloutDetailView::from(admin.get_rollout(&id).await?);
            return show(output, &detail, || detail_text(&detail));
        }
        RolloutCommand::Watch { id, every } => return watch(admin, &id, every, output).await,
        RolloutCommand::Events { id, after } => {
            let events = admin.rollout_events(&id, after).await?;
            return show(output, &events, || {
                let mut t = table(&["SEQ", "AT", "EVENT", "DEVICE", "DATA"]);
                for e in &events {
                    t.add_row(vec![
                        e.seq.to_string(),
                        e.at.clone(),
                        e.kind.clone(),
                        e.device_id.clone(),
                        e.data.to_string(),
                    ]);
                }
                format!("{t}\n")
            });
        }
        RolloutCommand::Start(args) => ("start", args),
        RolloutCommand::Approve { id } => (
            "approve",
            IdArgs {
                id,
                reason: String::new(),
            },
        ),
        RolloutCommand::Pause(args) => ("pause", args),
        RolloutCommand::Resume(args) => ("resume", args),
        RolloutCommand::Abort(args) => ("abort", args),
        RolloutCommand::Rollback(args) => ("rollback", args),
    };
    let rollout = RolloutView::from(
        admin
            .rollout_operation(operation, &args.id, &args.reason)
            .await?,
    );
    show_rollout(output, &rollout)
}

/// "Rollout ro-1a2b of pos-app@1.2.0: draft, awaiting approval (…)."
fn show_rollout(output: Output, rollout: &RolloutView) -> anyhow::Result<()> {
    show(output, rollout, || {
        format!(
            "Rollout {} of {}: {}.\n",
            rollout.id,
            rollout.release,
            rollout.state_text()
        )
    })
}

fn ended(state: &str) -> bool {
    matches!(state, "completed" | "aborted" | "rolled_back")
}

/// Progress bars, one per wave and one for the whole rollout, until the
/// rollout ends (completed, aborted, rolled back) or pauses. With
/// `--output json`, one JSON line per change instead. A pause is an error
/// (non-zero exit), so scripts notice.
async fn watch(admin: &mut Admin, id: &str, every: Duration, output: Output) -> anyhow::Result<()> {
    let style = ProgressStyle::with_template("{prefix:>9} [{bar:32}] {pos}/{len} {msg}")
        .map_err(|e| anyhow!("progress style: {e}"))?
        .progress_chars("=> ");
    let bars = MultiProgress::new();
    let mut wave_bars: HashMap<u32, ProgressBar> = HashMap::new();
    let total = bars.add(ProgressBar::new(0).with_style(style.clone()));
    total.set_prefix("all");
    let mut last_json = String::new();
    loop {
        let detail = RolloutDetailView::from(admin.get_rollout(id).await?);
        let r = &detail.rollout;
        if output == Output::Json {
            let line = serde_json::to_string(&detail)?;
            if line != last_json {
                println!("{line}");
                last_json = line;
            }
        } else {
            total.set_length(r.counts.total());
            total.set_position(r.counts.succeeded + r.counts.failures());
            total.set_message(format!(
                "{} · {} failed · {}",
                r.release,
                r.counts.failures(),
                r.state
            ));
            for w in &detail.waves {
                let bar = wave_bars.entry(w.index).or_insert_with(|| {
                    let bar = bars.add(ProgressBar::new(w.devices).with_style(style.clone()));
                    bar.set_prefix(format!("wave {}", w.index + 1));
                    bar
                });
                bar.set_length(w.devices);
                bar.set_position(w.counts.succeeded + w.counts.failures());
                let status = if !w.finished_at.is_empty() {
                    "done".to_string()
                } else if w.started_at.is_empty() {
                    "waiting".to_string()
                } else {
                    format!("{} in flight", w.counts.in_flight())
                };
                bar.set_message(format!("{} failed · {status}", w.counts.failures()));
            }
        }
        if ended(&r.state) || r.state == "paused" {
            for bar in wave_bars.values() {
                bar.abandon();
            }
            total.abandon();
            if r.state == "paused" {
                bail!(
                    "rollout {id} paused: {} (posfleet rollout resume {id}, or rollback {id})",
                    r.reason
                );
            }
            if output == Output::Table {
                println!("Rollout {id} {}.", r.state);
            }
            return Ok(());
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::wave_spec::Size;

    #[test]
    fn waves_parse_as_counts_and_percentages() {
        let waves = parse_waves("1,10%,50%,100%").unwrap();
        let sizes: Vec<_> = waves.into_iter().map(|w| w.size.unwrap()).collect();
        assert_eq!(
            sizes,
            vec![
                Size::Count(1),
                Size::Percent(10.0),
                Size::Percent(50.0),
                Size::Percent(100.0)
            ]
        );
        for bad in ["0", "0%", "101%", "x", "5,,10%", "-1"] {
            assert!(parse_waves(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_percent("5%"), Ok(5.0));
        assert!(parse_percent("150%").is_err());
    }

    #[test]
    fn a_rollout_says_where_it_stands_with_its_approval() {
        let draft = v1::Rollout {
            id: "ro-1a2b".into(),
            bundle_name: "pos-app".into(),
            bundle_version: "1.2.0".into(),
            state: v1::RolloutState::Draft as i32,
            approval_required: true,
            selected_devices: 150,
            approval_threshold_devices: 100,
            ..Default::default()
        };
        assert_eq!(
            RolloutView::from(draft.clone()).state_text(),
            "draft, awaiting approval (150 devices > threshold 100)"
        );
        let emergency = v1::Rollout {
            strategy: Some(v1::RolloutStrategy {
                emergency: true,
                ..Default::default()
            }),
            selected_devices: 2,
            ..draft.clone()
        };
        assert_eq!(
            RolloutView::from(emergency).state_text(),
            "draft, awaiting approval (emergency)"
        );
        let approved = RolloutView::from(v1::Rollout {
            approved_by: "bob".into(),
            approved_at_unix_ms: 1_780_000_000_000,
            ..draft.clone()
        });
        assert!(
            approved
                .state_text()
                .starts_with("draft, approved by bob at "),
            "{}",
            approved.state_text()
        );
        let small = v1::Rollout {
            approval_required: false,
            selected_devices: 5,
            ..draft
        };
        assert_eq!(RolloutView::from(small).state_text(), "draft");
        let approve = ["posfleet", "rollout", "approve", "ro-1a2b"];
        assert!(<crate::Cli as clap::Parser>::try_parse_from(approve).is_ok());
    }

    #[test]
    fn states_parse_by_name() {
        assert_eq!(parse_state("paused").unwrap(), v1::RolloutState::Paused);
        assert_eq!(
            parse_state("rolled_back").unwrap(),
            v1::RolloutState::RolledBack
        );
        assert!(parse_state("unspecified").is_err());
        assert!(parse_state("lost").is_err());
    }
}
