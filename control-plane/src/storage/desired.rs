//! Desired and reported bundle state: assignments to stores and devices
//! (`store_desired_bundles`, `device_desired_bundles`), a store's desired
//! state as heartbeats read it, and what devices report
//! (`device_bundle_status`), summed into transfers per store.

use sqlx::Row;
use sqlx::any::AnyRow;
use std::collections::{BTreeMap, HashMap};

use super::stores::window_from_row;
use super::{Param, Placeholders, RevokedRecord, Storage, WindowRecord, bind_all};
use crate::error::Error;

/// The version of a bundle a device (or every device of a store) should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredBundleRecord {
    pub name: String,
    pub version: String,
    /// The published bundle's kind: `software` or `catalog`.
    pub kind: String,
    pub download_ahead: bool,
    pub emergency: bool,
    /// A sanctioned step back to a lower version (a rollout's rollback).
    pub rollback: bool,
}

/// Whose desired state an assignment sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignTarget {
    Device(String),
    Store(String),
}

/// The desired state of a store and of each of its devices: its window, its
/// bundle rows and its devices' own rows, and its membership list. Every
/// heartbeat from the store is answered from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreDesiredState {
    pub time_zone: String,
    pub maintenance_window: Option<WindowRecord>,
    /// The store's rows, sorted by name.
    pub store_bundles: Vec<DesiredBundleRecord>,
    /// Devices' own rows, by device id.
    pub device_bundles: HashMap<String, Vec<DesiredBundleRecord>>,
    /// The store's membership list: its enrolled devices that are not
    /// revoked, sorted by id.
    pub peers: Vec<StorePeerRecord>,
    /// SHA-256 over `peers`: a till holding this list is up to date.
    pub peers_digest: Vec<u8>,
    /// The store's revoked devices, refused when they call.
    pub revoked: HashMap<String, RevokedRecord>,
}

/// Where one bundle version's bytes came from, summed over a store's tills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRecord {
    pub bundle: String,
    pub version: String,
    pub tills: i64,
    pub bytes_from_origin: i64,
    pub bytes_from_peers: i64,
    /// 0 when the version is not published.
    pub size_bytes: i64,
}

/// One till of a store, as the others see it for P2P.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorePeerRecord {
    pub device_id: String,
    pub public_key_hex: String,
    /// The multiaddrs it last reported.
    pub addrs: Vec<String>,
}

/// The digest of a membership list: each field length-prefixed, so no two
/// lists share one.
pub fn peers_digest(peers: &[StorePeerRecord]) -> Vec<u8> {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    let mut field = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    };
    for peer in peers {
        field(peer.device_id.as_bytes());
        field(peer.public_key_hex.as_bytes());
        field(&(peer.addrs.len() as u64).to_be_bytes());
        for addr in &peer.addrs {
            field(addr.as_bytes());
        }
    }
    hash.finalize().to_vec()
}

impl StoreDesiredState {
    /// One device's desired bundles: its own rows over the store's, one per
    /// bundle name, sorted by name.
    pub fn for_device(&self, device_id: &str) -> Vec<DesiredBundleRecord> {
        let own = self.device_bundles.get(device_id).into_iter().flatten();
        merge_desired(
            self.store_bundles
                .iter()
                .map(|b| (false, b.clone()))
                .chain(own.map(|b| (true, b.clone()))),
        )
    }
}

/// A bundle's state as the device last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleStatusRecord {
    pub name: String,
    /// `software`, `catalog`, or empty when the agent did not say.
    pub kind: String,
    pub active_version: String,
    pub target_version: String,
    /// `pending`, `downloading`, `downloaded`, `installing`, `installed`,
    /// `failed`, `rolled_back`.
    pub phase: String,
    pub bytes_done: i64,
    pub bytes_total: i64,
    pub error: String,
    /// The agent's time of the change.
    pub updated_at_ms: i64,
    /// Verified bytes of target_version from the control plane and from
    /// the store's other tills.
    pub bytes_from_origin: i64,
    pub bytes_from_peers: i64,
    /// Bytes of target_version not downloaded thanks to a delta.
    pub bytes_saved_by_delta: i64,
    /// Why a delta offered for target_version was not used; empty if none
    /// failed.
    pub delta_error: String,
}

/// Keeps, per bundle name, the device's own row over its store's. `rows`
/// are `(own, bundle)`; the result is sorted by name.
pub fn merge_desired(
    rows: impl IntoIterator<Item = (bool, DesiredBundleRecord)>,
) -> Vec<DesiredBundleRecord> {
    let mut by_name: BTreeMap<String, (bool, DesiredBundleRecord)> = BTreeMap::new();
    for (own, bundle) in rows {
        match by_name.get(&bundle.name) {
            Some((true, _)) if !own => {}
            _ => {
                by_name.insert(bundle.name.clone(), (own, bundle));
            }
        }
    }
    by_name.into_values().map(|(_, b)| b).collect()
}

fn status_from_row(row: &AnyRow) -> Result<BundleStatusRecord, Error> {
    Ok(BundleStatusRecord {
        name: row.try_get("name")?,
        kind: row.try_get("kind")?,
        active_version: row.try_get("active_version")?,
        target_version: row.try_get("target_version")?,
        phase: row.try_get("phase")?,
        bytes_done: row.try_get("bytes_done")?,
        bytes_total: row.try_get("bytes_total")?,
        error: row.try_get("error")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
        bytes_from_origin: row.try_get("bytes_from_origin")?,
        bytes_from_peers: row.try_get("bytes_from_peers")?,
        bytes_saved_by_delta: row.try_get("bytes_saved_by_delta")?,
        delta_error: row.try_get("delta_error")?,
    })
}

/// [`Storage::assign_bundle`] inside the caller's transaction.
pub(super) async fn write_assignment(
    conn: &mut sqlx::AnyConnection,
    target: &AssignTarget,
    bundle: &DesiredBundleRecord,
    now_ms: i64,
) -> Result<i64, Error> {
    let (table, column, id) = match target {
        AssignTarget::Device(id) => ("device_desired_bundles", "device_id", id),
        AssignTarget::Store(id) => ("store_desired_bundles", "store_id", id),
    };
    sqlx::query(&format!(
        "INSERT INTO {table} ({column}, name, version, kind, download_ahead, emergency, \
         rollback, assigned_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT ({column}, name) DO UPDATE SET version = excluded.version, \
         kind = excluded.kind, download_ahead = excluded.download_ahead, \
         emergency = excluded.emergency, rollback = excluded.rollback, \
         assigned_at_ms = excluded.assigned_at_ms"
    ))
    .bind(id)
    .bind(&bundle.name)
    .bind(&bundle.version)
    .bind(&bundle.kind)
    .bind(i64::from(bundle.download_ahead))
    .bind(i64::from(bundle.emergency))
    .bind(i64::from(bundle.rollback))
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    Ok(match target {
        AssignTarget::Device(_) => 1,
        AssignTarget::Store(store_id) => sqlx::query(
            "SELECT COUNT(*) AS n FROM devices d WHERE d.store_id = $1 AND NOT EXISTS \
             (SELECT 1 FROM device_desired_bundles o WHERE o.device_id = d.id AND o.name = $2)",
        )
        .bind(store_id)
        .bind(&bundle.name)
        .fetch_one(&mut *conn)
        .await?
        .try_get("n")?,
    })
}

impl Storage {
    /// Sets the desired version of a bundle for a device or a store, and
    /// returns how many devices it now applies to: 1 for a device; for a
    /// store, its devices that have no row of their own for this bundle.
    /// The caller checks that the target exists.
    pub async fn assign_bundle(
        &self,
        target: &AssignTarget,
        bundle: &DesiredBundleRecord,
        now_ms: i64,
    ) -> Result<i64, Error> {
        let mut tx = self.pool.begin().await?;
        let assigned = write_assignment(&mut tx, target, bundle, now_ms).await?;
        tx.commit().await?;
        Ok(assigned)
    }

    /// A store's window and bundle rows and its devices' own rows, in one
    /// indexed query. `None` if the store is unknown.
    pub async fn store_desired_state(
        &self,
        store_id: &str,
    ) -> Result<Option<StoreDesiredState>, Error> {
        let rows = sqlx::query(
            "SELECT s.time_zone, s.maintenance_start_minute, s.maintenance_duration_minutes, \
             b.device_id, b.name, b.version, b.kind, b.download_ahead, b.emergency, b.rollback \
             FROM stores s LEFT JOIN ( \
             SELECT '' AS device_id, name, version, kind, download_ahead, emergency, rollback \
             FROM store_desired_bundles WHERE store_id = $1 \
             UNION ALL \
             SELECT o.device_id, o.name, o.version, o.kind, o.download_ahead, o.emergency, \
             o.rollback FROM device_desired_bundles o JOIN devices d ON d.id = o.device_id \
             WHERE d.store_id = $1 \
             ) b ON 1 = 1 WHERE s.id = $1 ORDER BY b.name",
        )
        .bind(store_id)
        .fetch_all(&self.pool)
        .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let mut state = StoreDesiredState {
            time_zone: first.try_get("time_zone")?,
            maintenance_window: window_from_row(first)?,
            ..Default::default()
        };
        for row in &rows {
            let Some(name) = row.try_get::<Option<String>, _>("name")? else {
                continue; // no bundle rows at all: the one row is the store's
            };
            let device_id: String = row.try_get("device_id")?;
            let bundle = DesiredBundleRecord {
                name,
                version: row.try_get("version")?,
                kind: row.try_get("kind")?,
                download_ahead: row.try_get::<i64, _>("download_ahead")? != 0,
                emergency: row.try_get::<i64, _>("emergency")? != 0,
                rollback: row.try_get::<i64, _>("rollback")? != 0,
            };
            if device_id.is_empty() {
                state.store_bundles.push(bundle);
            } else {
                state
                    .device_bundles
                    .entry(device_id)
                    .or_default()
                    .push(bundle);
            }
        }
        let devices = sqlx::query(
            "SELECT id, public_key, p2p_addrs_json, revoked_at_ms, revoked_reason \
             FROM devices WHERE store_id = $1 ORDER BY id",
        )
        .bind(store_id)
        .fetch_all(&self.pool)
        .await?;
        for row in &devices {
            let device_id: String = row.try_get("id")?;
            if let Some(at_ms) = row.try_get::<Option<i64>, _>("revoked_at_ms")? {
                let reason = row.try_get("revoked_reason")?;
                state
                    .revoked
                    .insert(device_id, RevokedRecord { at_ms, reason });
                continue;
            }
            let addrs: String = row.try_get("p2p_addrs_json")?;
            state.peers.push(StorePeerRecord {
                device_id,
                public_key_hex: row.try_get("public_key")?,
                // Written by this code from validated strings; a damaged
                // value only costs that till its peers' dials.
                addrs: serde_json::from_str(&addrs).unwrap_or_default(),
            });
        }
        state.peers_digest = peers_digest(&state.peers);
        Ok(Some(state))
    }

    /// Per bundle version the store's tills last reported on: the tills,
    /// and the bytes they got from the origin and from each other.
    pub async fn store_transfers(&self, store_id: &str) -> Result<Vec<TransferRecord>, Error> {
        let rows = sqlx::query(
            "SELECT st.name, st.target_version, COUNT(*) AS tills, \
             SUM(st.bytes_from_origin) AS origin, SUM(st.bytes_from_peers) AS peers, \
             MAX(b.length) AS size \
             FROM device_bundle_status st JOIN devices d ON d.id = st.device_id \
             LEFT JOIN bundles b ON b.name = st.name AND b.version = st.target_version AND b.delta_from = '' \
             WHERE d.store_id = $1 AND st.target_version <> '' \
             GROUP BY st.name, st.target_version ORDER BY st.name, st.target_version",
        )
        .bind(store_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(TransferRecord {
                    bundle: row.try_get("name")?,
                    version: row.try_get("target_version")?,
                    tills: row.try_get("tills")?,
                    bytes_from_origin: row.try_get::<Option<i64>, _>("origin")?.unwrap_or(0),
                    bytes_from_peers: row.try_get::<Option<i64>, _>("peers")?.unwrap_or(0),
                    size_bytes: row.try_get::<Option<i64>, _>("size")?.unwrap_or(0),
                })
            })
            .collect()
    }

    /// Stores reported bundle states. Per bundle, a report older than the
    /// stored one (by the agent's `updated_at_ms`) changes nothing. The caller
    /// keeps at most one report per bundle name.
    pub async fn record_bundle_statuses(
        &self,
        device_id: &str,
        statuses: &[BundleStatusRecord],
    ) -> Result<(), Error> {
        if statuses.is_empty() {
            return Ok(());
        }
        let mut placeholders = Placeholders::new(self.backend);
        let mut params = Vec::with_capacity(statuses.len() * 14);
        let rows: Vec<String> = statuses
            .iter()
            .map(|st| {
                params.extend([
                    Param::Text(device_id.to_string()),
                    Param::Text(st.name.clone()),
                    Param::Text(st.kind.clone()),
                    Param::Text(st.active_version.clone()),
                    Param::Text(st.target_version.clone()),
                    Param::Text(st.phase.clone()),
                    Param::Int(st.bytes_done),
                    Param::Int(st.bytes_total),
                    Param::Text(st.error.clone()),
                    Param::Int(st.updated_at_ms),
                    Param::Int(st.bytes_from_origin),
                    Param::Int(st.bytes_from_peers),
                    Param::Int(st.bytes_saved_by_delta),
                    Param::Text(st.delta_error.clone()),
                ]);
                let row: Vec<String> = (0..14).map(|_| placeholders.next()).collect();
                format!("({})", row.join(", "))
            })
            .collect();
        let sql = format!(
            "INSERT INTO device_bundle_status (device_id, name, kind, active_version, \
             target_version, phase, bytes_done, bytes_total, error, updated_at_ms, \
             bytes_from_origin, bytes_from_peers, bytes_saved_by_delta, delta_error) VALUES {} \
             ON CONFLICT (device_id, name) DO UPDATE SET kind = excluded.kind, \
             active_version = excluded.active_version, target_version = excluded.target_version, \
             phase = excluded.phase, bytes_done = excluded.bytes_done, \
             bytes_total = excluded.bytes_total, error = excluded.error, \
             updated_at_ms = excluded.updated_at_ms, \
             bytes_from_origin = excluded.bytes_from_origin, \
             bytes_from_peers = excluded.bytes_from_peers, \
             bytes_saved_by_delta = excluded.bytes_saved_by_delta, \
             delta_error = excluded.delta_error \
             WHERE device_bundle_status.updated_at_ms <= excluded.updated_at_ms",
            rows.join(", ")
        );
        bind_all(sqlx::query(&sql).persistent(false), params)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// What a device last reported, per bundle, sorted by name.
    pub async fn bundle_statuses(&self, device_id: &str) -> Result<Vec<BundleStatusRecord>, Error> {
        sqlx::query("SELECT * FROM device_bundle_status WHERE device_id = $1 ORDER BY name")
            .bind(device_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(status_from_row)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_devices_own_assignment_beats_its_stores() {
        let b = |name: &str, version: &str| DesiredBundleRecord {
            name: name.into(),
            version: version.into(),
            kind: "software".into(),
            download_ahead: true,
            emergency: false,
            rollback: false,
        };
        let versions = |rows: Vec<(bool, DesiredBundleRecord)>| -> Vec<(String, String)> {
            merge_desired(rows)
                .into_iter()
                .map(|b| (b.name, b.version))
                .collect()
        };
        let pair = |n: &str, v: &str| (n.to_string(), v.to_string());
        // Whatever the order rows come in.
        for rows in [
            vec![(false, b("app", "1.0.0")), (true, b("app", "2.0.0"))],
            vec![(true, b("app", "2.0.0")), (false, b("app", "1.0.0"))],
        ] {
            assert_eq!(versions(rows), vec![pair("app", "2.0.0")]);
        }
        assert_eq!(
            versions(vec![(false, b("zz", "1.0.0")), (true, b("aa", "3.0.0"))]),
            vec![pair("aa", "3.0.0"), pair("zz", "1.0.0")],
            "sorted by name"
        );
        assert!(versions(vec![]).is_empty());
    }
}
