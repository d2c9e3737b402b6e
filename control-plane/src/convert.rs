//! Storage records to API messages.

use posfleet_proto::v1;

use crate::storage::{self, DeviceRecord, EnrollmentTokenRecord, HealthRecord, StoreRecord};

pub fn store(s: StoreRecord) -> v1::Store {
    v1::Store {
        id: s.id,
        name: s.name,
        time_zone: s.time_zone,
        created_at_unix_ms: s.created_at_ms,
        device_count: s.device_count.max(0) as u64,
        maintenance_window: None,
    }
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

pub fn device(d: DeviceRecord, now_ms: i64, offline_after_missed_heartbeats: i64) -> v1::Device {
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
        bundles: Vec::new(),
    }
}
