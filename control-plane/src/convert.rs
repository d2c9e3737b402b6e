//! Storage records to API messages.

use posfleet_proto::v1;

use std::collections::BTreeMap;

use crate::storage::{
    self, BundleStatusRecord, DesiredBundleRecord, DeviceRecord, EnrollmentTokenRecord,
    HealthRecord, StorePeerRecord, StoreRecord, WindowRecord,
};

pub fn store(s: StoreRecord) -> v1::Store {
    v1::Store {
        maintenance_window: window(&s.time_zone, s.maintenance_window),
        id: s.id,
        name: s.name,
        time_zone: s.time_zone,
        created_at_unix_ms: s.created_at_ms,
        device_count: s.device_count.max(0) as u64,
        labels: s.labels.into_iter().collect(),
    }
}

/// A stored window, in the store's time zone.
pub fn window(time_zone: &str, w: Option<WindowRecord>) -> Option<v1::MaintenanceWindow> {
    w.map(|w| v1::MaintenanceWindow {
        time_zone: time_zone.to_string(),
        start_minute: w.start_minute.clamp(0, u32::MAX as i64) as u32,
        duration_minutes: w.duration_minutes.clamp(0, u32::MAX as i64) as u32,
    })
}

/// How a bundle kind is stored (`bundles.kind` uses the same words).
pub fn kind_name(kind: v1::BundleKind) -> &'static str {
    match kind {
        v1::BundleKind::Unspecified => "",
        v1::BundleKind::Software => "software",
        v1::BundleKind::Catalog => "catalog",
        v1::BundleKind::Agent => "agent",
    }
}

pub fn kind_from_name(name: &str) -> v1::BundleKind {
    match name {
        "software" => v1::BundleKind::Software,
        "catalog" => v1::BundleKind::Catalog,
        "agent" => v1::BundleKind::Agent,
        _ => v1::BundleKind::Unspecified,
    }
}

/// How a bundle phase is stored, and its `phase` metric label.
pub fn phase_name(phase: v1::BundlePhase) -> &'static str {
    match phase {
        v1::BundlePhase::Unspecified => "",
        v1::BundlePhase::Downloading => "downloading",
        v1::BundlePhase::Downloaded => "downloaded",
        v1::BundlePhase::Installing => "installing",
        v1::BundlePhase::Installed => "installed",
        v1::BundlePhase::Failed => "failed",
        v1::BundlePhase::RolledBack => "rolled_back",
        v1::BundlePhase::Pending => "pending",
    }
}

pub fn phase_from_name(name: &str) -> v1::BundlePhase {
    match name {
        "downloading" => v1::BundlePhase::Downloading,
        "downloaded" => v1::BundlePhase::Downloaded,
        "installing" => v1::BundlePhase::Installing,
        "installed" => v1::BundlePhase::Installed,
        "failed" => v1::BundlePhase::Failed,
        "rolled_back" => v1::BundlePhase::RolledBack,
        "pending" => v1::BundlePhase::Pending,
        _ => v1::BundlePhase::Unspecified,
    }
}

pub fn desired_bundle(b: DesiredBundleRecord) -> v1::DesiredBundle {
    v1::DesiredBundle {
        kind: kind_from_name(&b.kind) as i32,
        name: b.name,
        version: b.version,
        download_ahead: b.download_ahead,
        emergency: b.emergency,
        rollback: b.rollback,
    }
}

pub fn bundle_status(s: BundleStatusRecord) -> v1::BundleStatus {
    v1::BundleStatus {
        kind: kind_from_name(&s.kind) as i32,
        phase: phase_from_name(&s.phase) as i32,
        name: s.name,
        active_version: s.active_version,
        target_version: s.target_version,
        bytes_done: unsigned(s.bytes_done),
        bytes_total: unsigned(s.bytes_total),
        error: s.error,
        updated_at_unix_ms: s.updated_at_ms,
        bytes_from_origin: unsigned(s.bytes_from_origin),
        bytes_from_peers: unsigned(s.bytes_from_peers),
        bytes_saved_by_delta: unsigned(s.bytes_saved_by_delta),
        delta_error: s.delta_error,
    }
}

/// Desired and reported state side by side, one entry per bundle name that
/// has either, sorted by name.
pub fn device_bundles(
    desired: Vec<DesiredBundleRecord>,
    reported: Vec<BundleStatusRecord>,
) -> Vec<v1::DeviceBundle> {
    fn entry(
        by_name: &mut BTreeMap<String, v1::DeviceBundle>,
        name: String,
    ) -> &mut v1::DeviceBundle {
        by_name
            .entry(name.clone())
            .or_insert_with(|| v1::DeviceBundle {
                name,
                ..Default::default()
            })
    }
    let mut by_name = BTreeMap::new();
    for d in desired {
        let name = d.name.clone();
        entry(&mut by_name, name).desired = Some(desired_bundle(d));
    }
    for r in reported {
        let name = r.name.clone();
        entry(&mut by_name, name).status = Some(bundle_status(r));
    }
    by_name.into_values().collect()
}

pub fn enrollment_token(t: EnrollmentTokenRecord) -> v1::EnrollmentToken {
    v1::EnrollmentToken {
        id: t.id,
        store_id: t.store_id,
        uses_total: t.uses_total.clamp(0, u32::MAX as i64) as u32,
        uses_remaining: t.uses_remaining.clamp(0, u32::MAX as i64) as u32,
        expires_at_unix_ms: t.expires_at_ms,
        revoked_at_unix_ms: t.revoked_at_ms.unwrap_or(0),
        created_at_unix_ms: t.created_at_ms,
    }
}

fn unsigned(v: i64) -> u64 {
    v.max(0) as u64
}

/// Stored counters are BIGINT; values above i64::MAX are clamped.
pub fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub fn health_to_proto(h: HealthRecord) -> v1::Health {
    v1::Health {
        uptime_seconds: unsigned(h.uptime_seconds),
        disk_free_bytes: unsigned(h.disk_free_bytes),
        disk_total_bytes: unsigned(h.disk_total_bytes),
        memory_total_bytes: unsigned(h.memory_total_bytes),
        memory_available_bytes: unsigned(h.memory_available_bytes),
        peripherals: h
            .peripherals
            .into_iter()
            .map(|p| v1::Peripheral {
                kind: p.kind,
                name: p.name,
                state: p.state,
                detail: p.detail,
            })
            .collect(),
    }
}

pub fn health_from_proto(h: v1::Health) -> HealthRecord {
    HealthRecord {
        uptime_seconds: signed(h.uptime_seconds),
        disk_free_bytes: signed(h.disk_free_bytes),
        disk_total_bytes: signed(h.disk_total_bytes),
        memory_total_bytes: signed(h.memory_total_bytes),
        memory_available_bytes: signed(h.memory_available_bytes),
        peripherals: h
            .peripherals
            .into_iter()
            .map(|p| storage::PeripheralRecord {
                kind: p.kind,
                name: p.name,
                state: p.state,
                detail: p.detail,
            })
            .collect(),
    }
}

pub fn device(
    d: DeviceRecord,
    now_ms: i64,
    offline_after_missed_heartbeats: i64,
    certificates: Option<&crate::tls::CertificatePolicy>,
) -> v1::Device {
    let online = storage::is_online(
        d.last_seen_ms,
        d.heartbeat_interval_seconds,
        offline_after_missed_heartbeats,
        now_ms,
    );
    v1::Device {
        id: d.id,
        store_id: d.store_id,
        hardware_model: d.hardware_model,
        serial_number: d.serial_number,
        labels: d.labels.into_iter().collect(),
        status: if online {
            v1::DeviceStatus::Online
        } else {
            v1::DeviceStatus::Offline
        } as i32,
        enrolled_at_unix_ms: d.enrolled_at_ms,
        last_seen_unix_ms: d.last_seen_ms,
        agent_version: d.agent_version,
        installed_bundles: d.installed_bundles.into_iter().collect(),
        health: Some(health_to_proto(d.health)),
        heartbeat_interval_seconds: d.heartbeat_interval_seconds.clamp(0, u32::MAX as i64) as u32,
        agent_uptime_seconds: unsigned(d.agent_uptime_seconds),
        // GetDevice fills these.
        bundles: Vec::new(),
        revoked_at_unix_ms: d.revoked.as_ref().map_or(0, |r| r.at_ms),
        revoked_reason: d.revoked.map(|r| r.reason).unwrap_or_default(),
        certificate_not_after_unix_ms: d.certificate.as_ref().map_or(0, |c| c.not_after_ms),
        certificate_ca_fingerprint: d
            .certificate
            .as_ref()
            .map(|c| c.ca_fingerprint.clone())
            .unwrap_or_default(),
        certificate_status: match (&d.certificate, certificates) {
            (Some(certificate), Some(policy)) => {
                policy.state(certificate.not_after_ms, now_ms).to_string()
            }
            _ => String::new(),
        },
    }
}

pub fn event(e: storage::EventRecord) -> v1::Event {
    v1::Event {
        seq: e.seq,
        at_unix_ms: e.at_ms,
        kind: e.kind,
        rollout_id: e.rollout_id,
        device_id: e.device_id,
        data_json: e.data_json,
    }
}

/// A store's membership list as the heartbeat carries it.
pub fn store_peers(peers: &[StorePeerRecord], digest: &[u8]) -> v1::StorePeers {
    v1::StorePeers {
        digest: digest.to_vec(),
        peers: peers
            .iter()
            .map(|p| v1::StorePeer {
                device_id: p.device_id.clone(),
                // Stored from a key checked at enrollment.
                public_key: hex::decode(&p.public_key_hex).unwrap_or_default(),
                addrs: p.addrs.clone(),
            })
            .collect(),
    }
}

pub fn transfer(t: storage::TransferRecord) -> v1::StoreTransfer {
    v1::StoreTransfer {
        bundle: t.bundle,
        version: t.version,
        size_bytes: unsigned(t.size_bytes),
        tills: unsigned(t.tills),
        bytes_from_origin: unsigned(t.bytes_from_origin),
        bytes_from_peers: unsigned(t.bytes_from_peers),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bundle_kind_is_stored_as_the_word_the_bundle_uses() {
        use posfleet_bundle::manifest::Kind;
        for (proto, kind) in [
            (v1::BundleKind::Software, Kind::Software),
            (v1::BundleKind::Catalog, Kind::Catalog),
            (v1::BundleKind::Agent, Kind::Agent),
        ] {
            assert_eq!(kind_name(proto), kind.as_str());
            assert_eq!(kind_from_name(kind.as_str()), proto);
        }
        assert_eq!(kind_from_name("firmware"), v1::BundleKind::Unspecified);
        assert_eq!(kind_name(v1::BundleKind::Unspecified), "");
    }
}
