//! Health reported in each heartbeat: uptime, free disk, memory, and the
//! state of the till's peripherals. Peripherals sit behind a trait: the
//! hardware drivers are the only part of the agent that may be faked.

use posfleet_proto::v1::{Health, Peripheral, PeripheralKind, PeripheralState};
use std::path::Path;

use crate::config::FakeFault;

/// Reads the state of the till's printer, scanner and cash drawer.
pub trait Peripherals: Send + Sync {
    fn status(&self) -> Vec<Peripheral>;
}

/// No peripherals attached.
pub struct NoPeripherals;

impl Peripherals for NoPeripherals {
    fn status(&self) -> Vec<Peripheral> {
        Vec::new()
    }
}

/// A simulated printer, scanner and cash drawer; the ones named in `faults`
/// report `FAILED`.
pub struct FakePeripherals {
    faults: Vec<FakeFault>,
}

impl FakePeripherals {
    pub fn new(faults: Vec<FakeFault>) -> FakePeripherals {
        FakePeripherals { faults }
    }
}

impl Peripherals for FakePeripherals {
    fn status(&self) -> Vec<Peripheral> {
        [
            (
                FakeFault::Printer,
                PeripheralKind::Printer,
                "receipt-printer",
            ),
            (
                FakeFault::Scanner,
                PeripheralKind::Scanner,
                "barcode-scanner",
            ),
            (
                FakeFault::CashDrawer,
                PeripheralKind::CashDrawer,
                "cash-drawer",
            ),
        ]
        .into_iter()
        .map(|(fault, kind, name)| {
            let failed = self.faults.contains(&fault);
            Peripheral {
                kind: kind as i32,
                name: name.into(),
                state: if failed {
                    PeripheralState::Failed
                } else {
                    PeripheralState::Ok
                } as i32,
                detail: if failed {
                    "simulated fault".into()
                } else {
                    String::new()
                },
            }
        })
        .collect()
    }
}

/// Collects the terminal's health. `data_dir` names the filesystem whose
/// free space matters (downloads and installs land there).
pub fn collect(data_dir: &Path, peripherals: &dyn Peripherals) -> Health {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let (disk_free_bytes, disk_total_bytes) = match nix::sys::statvfs::statvfs(data_dir) {
        Ok(stat) => {
            let fragment = stat.fragment_size();
            (
                stat.blocks_available().saturating_mul(fragment),
                stat.blocks().saturating_mul(fragment),
            )
        }
        Err(error) => {
            tracing::warn!(%error, path = %data_dir.display(), "Cannot read free disk space.");
            (0, 0)
        }
    };
    Health {
        uptime_seconds: sysinfo::System::uptime(),
        disk_free_bytes,
        disk_total_bytes,
        memory_total_bytes: system.total_memory(),
        memory_available_bytes: system.available_memory(),
        peripherals: peripherals.status(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_real_figures_and_injected_faults() {
        let dir = tempfile::tempdir().unwrap();
        let health = collect(
            dir.path(),
            &FakePeripherals::new(vec![FakeFault::CashDrawer]),
        );
        assert!(health.disk_total_bytes > 0 && health.disk_free_bytes <= health.disk_total_bytes);
        assert!(health.memory_total_bytes > 0);
        assert!(health.memory_available_bytes <= health.memory_total_bytes);
        let failed: Vec<_> = health
            .peripherals
            .iter()
            .filter(|p| p.state == PeripheralState::Failed as i32)
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(failed, vec!["cash-drawer"]);
        assert!(collect(dir.path(), &NoPeripherals).peripherals.is_empty());
    }
}
