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

fn table(header: &[&str]) -> Table {
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
}

impl From<v1::Store> for StoreView {
    fn from(s: v1::Store) -> Self {
        StoreView {
            id: s.id,
            name: s.name,
            time_zone: s.time_zone,
            devices: s.device_count,
            created_at: time(s.created_at_unix_ms),
        }
    }
}

pub fn stores_table(stores: &[StoreView]) -> Table {
    let mut t = table(&["STORE", "NAME", "TIME ZONE", "DEVICES", "CREATED"]);
    for s in stores {
        t.add_row(vec![
            s.id.clone(),
            s.name.clone(),
            s.time_zone.clone(),
            s.devices.to_string(),
            s.created_at.clone(),
        ]);
    }
    t
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
        }
    }
}

fn labels(map: &BTreeMap<String, String>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
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
        "LAST SEEN",
        "DISK FREE",
        "PERIPHERALS",
        "LABELS",
    ]);
    for d in devices {
        t.add_row(vec![
            d.id.clone(),
            d.store_id.clone(),
            d.status.clone(),
            d.hardware_model.clone(),
            d.agent_version.clone(),
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
    out
}
