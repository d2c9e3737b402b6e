//! What the CLI prints: one view per resource, shown as a table or as JSON.

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use posfleet_proto::v1;
use serde::Serialize;
use std::collections::BTreeMap;

pub fn time(ms: i64) -> String {
    if ms == 0 {
        return String::new();
    }
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_header(header.to_vec());
    table
}

#[derive(Debug, Serialize)]
pub struct StoreView {
    pub id: String,
    pub name: String,
    pub time_zone: String,
    pub devices: u64,
    pub created_at: String,
    /// `null`: installs may happen at any time.
    pub maintenance_window: Option<WindowView>,
    /// Rollout selectors and token scopes pick stores by them.
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
pub struct WindowView {
    /// Local time of day, `HH:MM`.
    pub start: String,
    pub duration_minutes: u32,
    pub time_zone: String,
}

impl From<v1::Store> for StoreView {
    fn from(s: v1::Store) -> Self {
        StoreView {
            id: s.id,
            name: s.name,
            time_zone: s.time_zone,
            devices: s.device_count,
            created_at: time(s.created_at_unix_ms),
            maintenance_window: s.maintenance_window.map(|w| WindowView {
                start: format!("{:02}:{:02}", w.start_minute / 60, w.start_minute % 60),
                duration_minutes: w.duration_minutes,
                time_zone: w.time_zone,
            }),
            labels: s.labels.into_iter().collect(),
        }
    }
}

/// `90` → `1h30m`, `180` → `3h`, `45` → `45m`.
pub fn minutes(m: u32) -> String {
    match (m / 60, m % 60) {
        (0, m) => format!("{m}m"),
        (h, 0) => format!("{h}h"),
        (h, m) => format!("{h}h{m}m"),
    }
}

/// `02:00+3h Europe/Paris`, or `any time`.
pub fn window(w: Option<&WindowView>) -> String {
    match w {
        Some(w) => format!(
            "{}+{} {}",
            w.start,
            minutes(w.duration_minutes),
            w.time_zone
        ),
        None => "any time".into(),
    }
}

pub fn stores_table(stores: &[StoreView]) -> Table {
    let mut t = table(&[
        "STORE",
        "NAME",
        "TIME ZONE",
        "DEVICES",
        "MAINTENANCE WINDOW",
        "LABELS",
        "CREATED",
    ]);
    for s in stores {
        t.add_row(vec![
            s.id.clone(),
            s.name.clone(),
            s.time_zone.clone(),
            s.devices.to_string(),
            window(s.maintenance_window.as_ref()),
            labels(&s.labels),
            s.created_at.clone(),
        ]);
    }
    t
}

/// A store with where its tills' bundle bytes came from (`store show`).
#[derive(Debug, Serialize)]
pub struct StoreDetailView {
    #[serde(flatten)]
    pub store: StoreView,
    pub transfers: Vec<TransferView>,
}

#[derive(Debug, Serialize)]
pub struct TransferView {
    pub bundle: String,
    pub version: String,
    pub size_bytes: u64,
    pub tills: u64,
    pub bytes_from_origin: u64,
    pub bytes_from_peers: u64,
    /// Origin bytes over the bundle's size: 1.0 is "once per store".
    pub origin_ratio: Option<f64>,
}

impl From<v1::StoreDetail> for StoreDetailView {
    fn from(d: v1::StoreDetail) -> Self {
        StoreDetailView {
            store: d.store.unwrap_or_default().into(),
            transfers: d
                .transfers
                .into_iter()
                .map(|t| TransferView {
                    origin_ratio: (t.size_bytes > 0)
                        .then(|| t.bytes_from_origin as f64 / t.size_bytes as f64),
                    bundle: t.bundle,
                    version: t.version,
                    size_bytes: t.size_bytes,
                    tills: t.tills,
                    bytes_from_origin: t.bytes_from_origin,
                    bytes_from_peers: t.bytes_from_peers,
                })
                .collect(),
        }
    }
}

pub fn store_details(d: &StoreDetailView) -> String {
    let mut out = format!("{}\n", stores_table(std::slice::from_ref(&d.store)));
    if d.transfers.is_empty() {
        out.push_str("No bundle transfers reported yet.\n");
        return out;
    }
    let mut t = table(&[
        "BUNDLE",
        "VERSION",
        "SIZE",
        "TILLS",
        "FROM ORIGIN",
        "FROM PEERS",
        "ORIGIN / SIZE",
    ]);
    for x in &d.transfers {
        t.add_row(vec![
            x.bundle.clone(),
            x.version.clone(),
            format!("{} MiB", mib(x.size_bytes)),
            x.tills.to_string(),
            format!("{} MiB", mib(x.bytes_from_origin)),
            format!("{} MiB", mib(x.bytes_from_peers)),
            x.origin_ratio
                .map_or_else(|| "-".to_string(), |r| format!("{r:.2}")),
        ]);
    }
    out.push_str(&format!("{t}\n"));
    out
}

/// What `device assign` did.
#[derive(Debug, Serialize)]
pub struct AssignmentView {
    pub name: String,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_id: Option<String>,
    pub download_ahead: bool,
    pub emergency: bool,
    pub devices_assigned: u64,
}

impl AssignmentView {
    pub fn new(request: v1::AssignBundleRequest, devices_assigned: u64) -> AssignmentView {
        use v1::assign_bundle_request::Target;
        let (device_id, store_id) = match request.target {
            Some(Target::DeviceId(id)) => (Some(id), None),
            Some(Target::StoreId(id)) => (None, Some(id)),
            None => (None, None),
        };
        AssignmentView {
            name: request.name,
            version: request.version,
            device_id,
            store_id,
            download_ahead: request.download_ahead.unwrap_or(true),
            emergency: request.emergency,
            devices_assigned,
        }
    }
}

pub fn assignment_summary(a: &AssignmentView) -> String {
    let target = match (&a.device_id, &a.store_id) {
        (Some(id), _) => format!("device {id}"),
        (_, Some(id)) => format!("store {id}"),
        _ => "nothing".into(),
    };
    let devices = match a.devices_assigned {
        1 => "1 device".to_string(),
        n => format!("{n} devices"),
    };
    let flags = desired_flags(a.download_ahead, a.emergency);
    format!(
        "Assigned {}@{}{flags} to {target}: {devices} now assigned.\n",
        a.name, a.version
    )
}

/// ` (emergency, no download-ahead)`, or empty for the defaults.
fn desired_flags(download_ahead: bool, emergency: bool) -> String {
    let mut flags = Vec::new();
    if emergency {
        flags.push("emergency");
    }
    if !download_ahead {
        flags.push("no download-ahead");
    }
    if flags.is_empty() {
        String::new()
    } else {
        format!(" ({})", flags.join(", "))
    }
}

#[derive(Debug, Serialize)]
pub struct TokenView {
    pub id: String,
    pub store_id: String,
    pub uses_total: u32,
    pub uses_remaining: u32,
    pub expires_at: String,
    pub revoked_at: String,
    pub created_at: String,
    /// Only when just created: the secret to give the agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Only when just created, from a control plane serving TLS: the fleet
    /// CA's fingerprint, for the agent's `ca_fingerprint`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_fingerprint: Option<String>,
}

impl From<v1::EnrollmentToken> for TokenView {
    fn from(t: v1::EnrollmentToken) -> Self {
        TokenView {
            id: t.id,
            store_id: t.store_id,
            uses_total: t.uses_total,
            uses_remaining: t.uses_remaining,
            expires_at: time(t.expires_at_unix_ms),
            revoked_at: time(t.revoked_at_unix_ms),
            created_at: time(t.created_at_unix_ms),
            secret: None,
            ca_fingerprint: None,
        }
    }
}

pub fn tokens_table(tokens: &[TokenView]) -> Table {
    let mut t = table(&["TOKEN", "STORE", "USES LEFT", "EXPIRES", "REVOKED"]);
    for k in tokens {
        t.add_row(vec![
            k.id.clone(),
            k.store_id.clone(),
            format!("{}/{}", k.uses_remaining, k.uses_total),
            k.expires_at.clone(),
            k.revoked_at.clone(),
        ]);
    }
    t
}

#[derive(Debug, Serialize)]
pub struct PeripheralView {
    pub kind: String,
    pub name: String,
    pub state: String,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct DeviceView {
    pub id: String,
    pub store_id: String,
    pub status: String,
    pub hardware_model: String,
    pub serial_number: String,
    pub agent_version: String,
    pub labels: BTreeMap<String, String>,
    pub installed_bundles: BTreeMap<String, String>,
    pub last_seen: String,
    pub enrolled_at: String,
    pub heartbeat_interval_seconds: u32,
    pub uptime_seconds: u64,
    pub agent_uptime_seconds: u64,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub memory_total_bytes: u64,
    pub peripherals: Vec<PeripheralView>,
    /// Desired and reported state per bundle (`device show` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundles: Option<Vec<DeviceBundleView>>,
    /// Empty when not revoked.
    pub revoked_at: String,
    pub revoked_reason: String,
    /// The device's certificate (over TLS): when it ends, and what that
    /// means (`valid`, `renewal due`, `expired, renewable until …`,
    /// `expired: enroll the device again`). Empty without one.
    pub certificate_expires_at: String,
    pub certificate_status: String,
    /// SHA-256 of the CA that issued it; empty if not recorded.
    pub certificate_ca: String,
}

#[derive(Debug, Serialize)]
pub struct DeviceBundleView {
    pub name: String,
    /// `null` when nothing is assigned.
    pub desired: Option<DesiredView>,
    /// `null` until the device reports.
    pub status: Option<BundleStatusView>,
}

#[derive(Debug, Serialize)]
pub struct DesiredView {
    pub version: String,
    pub kind: String,
    pub download_ahead: bool,
    pub emergency: bool,
}

#[derive(Debug, Serialize)]
pub struct BundleStatusView {
    pub active_version: String,
    pub target_version: String,
    pub phase: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Verified bytes of target_version from the control plane and from
    /// the store's other tills.
    pub bytes_from_origin: u64,
    pub bytes_from_peers: u64,
    /// Bytes of target_version not downloaded thanks to a delta.
    pub bytes_saved_by_delta: u64,
    /// Why a delta offered for target_version was not used.
    pub delta_error: String,
    pub error: String,
    pub updated_at: String,
}

impl From<v1::DeviceBundle> for DeviceBundleView {
    fn from(b: v1::DeviceBundle) -> Self {
        DeviceBundleView {
            name: b.name,
            desired: b.desired.map(|d| DesiredView {
                kind: v1::BundleKind::try_from(d.kind)
                    .map(|k| enum_name(k.as_str_name(), "BUNDLE_KIND_"))
                    .unwrap_or_else(|_| d.kind.to_string()),
                version: d.version,
                download_ahead: d.download_ahead,
                emergency: d.emergency,
            }),
            status: b.status.map(|s| BundleStatusView {
                phase: v1::BundlePhase::try_from(s.phase)
                    .map(|p| enum_name(p.as_str_name(), "BUNDLE_PHASE_"))
                    .unwrap_or_else(|_| s.phase.to_string()),
                active_version: s.active_version,
                target_version: s.target_version,
                bytes_done: s.bytes_done,
                bytes_total: s.bytes_total,
                bytes_from_origin: s.bytes_from_origin,
                bytes_from_peers: s.bytes_from_peers,
                bytes_saved_by_delta: s.bytes_saved_by_delta,
                delta_error: s.delta_error,
                error: s.error,
                updated_at: time(s.updated_at_unix_ms),
            }),
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

/// `37% 12.0/32.0 MiB` while downloading, what a till waits for before
/// and after, `-` otherwise.
pub fn progress(s: &BundleStatusView) -> String {
    match s.phase.as_str() {
        "downloading" => {}
        // Waiting for something else than the window (expired trust
        // metadata): the error column says what.
        "pending" | "downloaded" if !s.error.is_empty() => return "waiting (see error)".into(),
        // Not allowed to download (or install) before the store's window.
        "pending" | "downloaded" => return "waiting for the window".into(),
        _ => return "-".into(),
    }
    if s.bytes_total == 0 {
        return format!("{} MiB", mib(s.bytes_done));
    }
    let percent = (s.bytes_done.min(s.bytes_total) as f64 * 100.0 / s.bytes_total as f64).floor();
    format!(
        "{percent:.0}% {}/{} MiB",
        mib(s.bytes_done),
        mib(s.bytes_total)
    )
}

/// What a delta did for the version a till works towards: the bytes it
/// saved, why it was not used, or `-`.
pub fn delta(s: &BundleStatusView) -> String {
    if s.bytes_saved_by_delta > 0 {
        format!("saved {} MiB", mib(s.bytes_saved_by_delta))
    } else if !s.delta_error.is_empty() {
        format!("not used: {}", one_line(&s.delta_error, 60))
    } else {
        "-".into()
    }
}

/// An agent's error on one line, cut to `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= max {
        return line;
    }
    let cut: String = line.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

pub fn bundles_table(bundles: &[DeviceBundleView]) -> Table {
    let mut t = table(&[
        "BUNDLE", "DESIRED", "ACTIVE", "PHASE", "PROGRESS", "DELTA", "ERROR", "UPDATED",
    ]);
    for b in bundles {
        let desired = match &b.desired {
            Some(d) => format!(
                "{}{}",
                d.version,
                desired_flags(d.download_ahead, d.emergency)
            ),
            None => "-".into(),
        };
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        let row = match &b.status {
            Some(s) => vec![
                b.name.clone(),
                desired,
                dash(&s.active_version),
                s.phase.clone(),
                progress(s),
                delta(s),
                dash(&one_line(&s.error, 90)),
                s.updated_at.clone(),
            ],
            None => vec![
                b.name.clone(),
                desired,
                "-".into(),
                "not reported".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
        };
        t.add_row(row);
    }
    t
}

fn enum_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

impl From<v1::Device> for DeviceView {
    fn from(d: v1::Device) -> Self {
        let status = v1::DeviceStatus::try_from(d.status)
            .map(|s| enum_name(s.as_str_name(), "DEVICE_STATUS_"))
            .unwrap_or_else(|_| d.status.to_string());
        let health = d.health.unwrap_or_default();
        DeviceView {
            id: d.id,
            store_id: d.store_id,
            status,
            hardware_model: d.hardware_model,
            serial_number: d.serial_number,
            agent_version: d.agent_version,
            labels: d.labels.into_iter().collect(),
            installed_bundles: d.installed_bundles.into_iter().collect(),
            last_seen: time(d.last_seen_unix_ms),
            enrolled_at: time(d.enrolled_at_unix_ms),
            heartbeat_interval_seconds: d.heartbeat_interval_seconds,
            uptime_seconds: health.uptime_seconds,
            agent_uptime_seconds: d.agent_uptime_seconds,
            disk_free_bytes: health.disk_free_bytes,
            disk_total_bytes: health.disk_total_bytes,
            memory_available_bytes: health.memory_available_bytes,
            memory_total_bytes: health.memory_total_bytes,
            peripherals: health
                .peripherals
                .into_iter()
                .map(|p| PeripheralView {
                    kind: v1::PeripheralKind::try_from(p.kind)
                        .map(|k| enum_name(k.as_str_name(), "PERIPHERAL_KIND_"))
                        .unwrap_or_else(|_| p.kind.to_string()),
                    state: v1::PeripheralState::try_from(p.state)
                        .map(|s| enum_name(s.as_str_name(), "PERIPHERAL_STATE_"))
                        .unwrap_or_else(|_| p.state.to_string()),
                    name: p.name,
                    detail: p.detail,
                })
                .collect(),
            bundles: None,
            revoked_at: time(d.revoked_at_unix_ms),
            revoked_reason: d.revoked_reason,
            certificate_expires_at: time(d.certificate_not_after_unix_ms),
            certificate_status: d.certificate_status,
            certificate_ca: d.certificate_ca_fingerprint,
        }
    }
}

impl DeviceView {
    /// A device as `GetDevice` returns it, with its bundles.
    pub fn with_bundles(mut d: v1::Device) -> DeviceView {
        let bundles = std::mem::take(&mut d.bundles);
        let mut view = DeviceView::from(d);
        view.bundles = Some(bundles.into_iter().map(Into::into).collect());
        view
    }
}

/// A scope (store labels a caller is confined to) as `k=v,k2=v2`, sorted;
/// empty when unscoped.
pub fn scope<'a>(map: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let sorted: BTreeMap<&String, &String> = map.into_iter().collect();
    sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn labels(map: &BTreeMap<String, String>) -> String {
    scope(map)
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Peripherals that are not `ok`, or "ok" when all are.
fn peripherals_summary(d: &DeviceView) -> String {
    let bad: Vec<String> = d
        .peripherals
        .iter()
        .filter(|p| p.state != "ok")
        .map(|p| format!("{} {}", p.name, p.state))
        .collect();
    match (d.peripherals.is_empty(), bad.is_empty()) {
        (true, _) => "-".into(),
        (false, true) => "ok".into(),
        (false, false) => bad.join(", "),
    }
}

pub fn devices_table(devices: &[DeviceView]) -> Table {
    let mut t = table(&[
        "DEVICE",
        "STORE",
        "STATUS",
        "MODEL",
        "AGENT",
        "BUNDLES",
        "LAST SEEN",
        "DISK FREE",
        "PERIPHERALS",
        "LABELS",
    ]);
    for d in devices {
        let bundles: Vec<String> = d
            .installed_bundles
            .iter()
            .map(|(name, version)| format!("{name} {version}"))
            .collect();
        t.add_row(vec![
            d.id.clone(),
            d.store_id.clone(),
            d.status.clone(),
            d.hardware_model.clone(),
            d.agent_version.clone(),
            if bundles.is_empty() {
                "-".into()
            } else {
                bundles.join(", ")
            },
            d.last_seen.clone(),
            gib(d.disk_free_bytes),
            peripherals_summary(d),
            labels(&d.labels),
        ]);
    }
    t
}

pub fn device_details(d: &DeviceView) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<18}{v}\n"));
    line("Device", d.id.clone());
    line("Store", d.store_id.clone());
    line("Status", d.status.clone());
    if !d.revoked_at.is_empty() {
        line(
            "Revoked",
            if d.revoked_reason.is_empty() {
                d.revoked_at.clone()
            } else {
                format!("{} ({})", d.revoked_at, d.revoked_reason)
            },
        );
    }
    if !d.certificate_expires_at.is_empty() {
        line(
            "Certificate",
            format!(
                "ends {} ({})",
                d.certificate_expires_at, d.certificate_status
            ),
        );
        if !d.certificate_ca.is_empty() {
            line("Certificate CA", d.certificate_ca.clone());
        }
    }
    line("Hardware model", d.hardware_model.clone());
    line("Serial number", d.serial_number.clone());
    line("Agent version", d.agent_version.clone());
    line("Labels", labels(&d.labels));
    line("Enrolled", d.enrolled_at.clone());
    line("Last seen", d.last_seen.clone());
    line(
        "Heartbeat every",
        format!("{} s", d.heartbeat_interval_seconds),
    );
    line(
        "Uptime",
        format!(
            "{} s (agent {} s)",
            d.uptime_seconds, d.agent_uptime_seconds
        ),
    );
    line(
        "Disk",
        format!(
            "{} free of {}",
            gib(d.disk_free_bytes),
            gib(d.disk_total_bytes)
        ),
    );
    line(
        "Memory",
        format!(
            "{} free of {}",
            gib(d.memory_available_bytes),
            gib(d.memory_total_bytes)
        ),
    );
    let installed = if d.installed_bundles.is_empty() {
        "-".to_string()
    } else {
        d.installed_bundles
            .iter()
            .map(|(n, v)| format!("{n}@{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    line("Installed", installed);
    for p in &d.peripherals {
        let detail = if p.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", p.detail)
        };
        line(
            "Peripheral",
            format!("{} {}: {}{detail}", p.kind, p.name, p.state),
        );
    }
    match &d.bundles {
        Some(bundles) if !bundles.is_empty() => {
            out.push_str(&format!("Bundles\n{}\n", bundles_table(bundles)));
        }
        Some(_) => out.push_str(&format!("{:<18}-\n", "Bundles")),
        None => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: &str, done: u64, total: u64) -> BundleStatusView {
        BundleStatusView {
            active_version: "1.0.0".into(),
            target_version: "1.1.0".into(),
            phase: phase.into(),
            bytes_done: done,
            bytes_total: total,
            bytes_from_origin: 0,
            bytes_from_peers: 0,
            bytes_saved_by_delta: 0,
            delta_error: String::new(),
            error: String::new(),
            updated_at: String::new(),
        }
    }

    #[test]
    fn the_delta_column_says_what_a_delta_saved_or_why_it_was_not_used() {
        let saved = BundleStatusView {
            bytes_saved_by_delta: 19 << 20,
            ..status("downloaded", 0, 0)
        };
        assert_eq!(delta(&saved), "saved 19.0 MiB");
        let failed = BundleStatusView {
            delta_error: "pos-app/1.0.0 as installed does not pack into its signed bundle".into(),
            ..status("downloading", 0, 0)
        };
        assert_eq!(
            delta(&failed),
            "not used: pos-app/1.0.0 as installed does not pack into its signed bu…"
        );
        assert_eq!(delta(&status("installed", 0, 0)), "-");
    }

    #[test]
    fn progress_reads_as_percent_and_mib() {
        const MIB: u64 = 1 << 20;
        for (s, expected) in [
            (
                status("downloading", 12 * MIB, 32 * MIB),
                "37% 12.0/32.0 MiB",
            ),
            (status("downloading", 0, 32 * MIB), "0% 0.0/32.0 MiB"),
            (
                status("downloading", 32 * MIB, 32 * MIB),
                "100% 32.0/32.0 MiB",
            ),
            (status("downloading", 3 * MIB / 2, 0), "1.5 MiB"),
            (status("installed", 32 * MIB, 32 * MIB), "-"),
            (status("pending", 0, 0), "waiting for the window"),
            (
                BundleStatusView {
                    error: "trust metadata expired; not starting a download until the repository is reachable".into(),
                    ..status("pending", 0, 0)
                },
                "waiting (see error)",
            ),
        ] {
            assert_eq!(progress(&s), expected);
        }
    }

    #[test]
    fn windows_and_flags_read_naturally() {
        let w = |start: &str, duration_minutes| WindowView {
            start: start.into(),
            duration_minutes,
            time_zone: "Europe/Paris".into(),
        };
        assert_eq!(window(Some(&w("02:00", 180))), "02:00+3h Europe/Paris");
        assert_eq!(window(Some(&w("23:30", 90))), "23:30+1h30m Europe/Paris");
        assert_eq!(window(Some(&w("00:00", 45))), "00:00+45m Europe/Paris");
        assert_eq!(window(None), "any time");
        assert_eq!(desired_flags(true, false), "");
        assert_eq!(
            desired_flags(false, true),
            " (emergency, no download-ahead)"
        );
        assert_eq!(one_line("a\n  b", 60), "a b");
        assert_eq!(one_line("abcdef", 4), "abc…");
    }

    #[test]
    fn device_show_lists_bundles_in_both_outputs() {
        let device = v1::Device {
            id: "dev-1".into(),
            bundles: vec![
                v1::DeviceBundle {
                    name: "catalog".into(),
                    desired: Some(v1::DesiredBundle {
                        name: "catalog".into(),
                        version: "2026.1.0".into(),
                        kind: v1::BundleKind::Catalog as i32,
                        download_ahead: true,
                        emergency: false,
                        rollback: false,
                    }),
                    status: None,
                },
                v1::DeviceBundle {
                    name: "pos-app".into(),
                    desired: Some(v1::DesiredBundle {
                        name: "pos-app".into(),
                        version: "1.1.0".into(),
                        kind: v1::BundleKind::Software as i32,
                        download_ahead: false,
                        emergency: true,
                        rollback: false,
                    }),
                    status: Some(v1::BundleStatus {
                        name: "pos-app".into(),
                        kind: v1::BundleKind::Software as i32,
                        active_version: "1.0.0".into(),
                        target_version: "1.1.0".into(),
                        phase: v1::BundlePhase::RolledBack as i32,
                        bytes_done: 0,
                        bytes_total: 0,
                        error: "health check failed:\nexit 3".into(),
                        updated_at_unix_ms: 1_700_000_000_000,
                        ..Default::default()
                    }),
                },
            ],
            ..Default::default()
        };
        let view = DeviceView::with_bundles(device);
        let text = device_details(&view);
        for expected in [
            "2026.1.0",
            "not reported",
            "1.1.0 (emergency, no download-ahead)",
            "rolled_back",
            "health check failed: exit 3",
            "2023-11-14T22:13:20Z",
        ] {
            assert!(text.contains(expected), "{expected} in\n{text}");
        }
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["bundles"][1]["status"]["phase"], "rolled_back");
        assert_eq!(json["bundles"][1]["desired"]["kind"], "software");
        assert_eq!(json["bundles"][0]["status"], serde_json::Value::Null);
        // Device lists do not carry bundles at all.
        let listed = serde_json::to_value(DeviceView::from(v1::Device::default())).unwrap();
        assert!(listed.get("bundles").is_none());
    }
}
