//! Heartbeats are acknowledged at once and written in batches by one task:
//! a heartbeat costs an in-memory credential check and a queue push, and the
//! database sees a few multi-row statements per second instead of one write
//! per device. A crash loses at most the batch in flight, which the next
//! heartbeats re-report.

use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;
use crate::storage::{DeviceSignals, HeartbeatRecord, Storage};

/// Most heartbeats written in one batch.
const MAX_BATCH: usize = 2000;
/// A batch waits at most this long for more heartbeats.
const BATCH_WINDOW: Duration = Duration::from_millis(50);

/// The interval handed to agents: the configured one, lengthened while the
/// write queue backs up so the fleet slows down before the database falls
/// behind.
pub fn interval_for_load(base_seconds: u32, queued: usize, capacity: usize) -> u32 {
    let factor = if queued * 4 >= capacity * 3 {
        4
    } else if queued * 2 >= capacity {
        2
    } else {
        1
    };
    base_seconds.saturating_mul(factor)
}

/// A heartbeat as queued: what is written to the device's row, and the
/// signal minutes to keep (only for a store under canary analysis).
#[derive(Debug, Clone)]
pub struct Beat {
    pub record: HeartbeatRecord,
    pub signals: Option<DeviceSignals>,
}

/// The sending side, held by the AgentService.
#[derive(Clone)]
pub struct HeartbeatQueue {
    tx: mpsc::Sender<Beat>,
}

impl HeartbeatQueue {
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn capacity(&self) -> usize {
        self.tx.max_capacity()
    }

    /// Queues a heartbeat, waiting while the queue is full (backpressure).
    pub async fn push(&self, beat: Beat) -> Result<(), Beat> {
        self.tx.send(beat).await.map_err(|e| e.0)
    }
}

/// Starts the writer task. When `stop` turns true the queue is closed (a
/// heartbeat pushed after that is refused, and the agent retries later),
/// everything already queued is written, and the task ends. It also ends
/// once every `HeartbeatQueue` clone is dropped and the queue is empty.
pub fn spawn_writer(
    storage: Storage,
    metrics: Metrics,
    capacity: usize,
    stop: watch::Receiver<bool>,
) -> (HeartbeatQueue, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(capacity);
    let handle = tokio::spawn(write_loop(storage, metrics, rx, stop));
    (HeartbeatQueue { tx }, handle)
}

async fn write_loop(
    storage: Storage,
    metrics: Metrics,
    mut rx: mpsc::Receiver<Beat>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = Vec::with_capacity(MAX_BATCH);
    let mut stopping = false;
    loop {
        let received = tokio::select! {
            n = rx.recv_many(&mut buf, MAX_BATCH) => n,
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                rx.close();
                continue;
            }
        };
        if received == 0 {
            return; // closed (or every sender gone) and nothing left
        }
        // Give the batch a moment to fill when traffic is light.
        if buf.len() < MAX_BATCH {
            let _ = tokio::time::timeout(BATCH_WINDOW, async {
                while buf.len() < MAX_BATCH {
                    let room = MAX_BATCH - buf.len();
                    if rx.recv_many(&mut buf, room).await == 0 {
                        break;
                    }
                }
            })
            .await;
        }
        metrics.heartbeat_queue_depth.set(rx.len() as i64);
        let (batch, signals) = latest_per_device(std::mem::take(&mut buf));
        let timer = metrics.heartbeat_flush_seconds.start_timer();
        metrics.heartbeat_flush_rows.observe(batch.len() as f64);
        let mut attempt = 0;
        while let Err(error) = storage.record_heartbeats(&batch).await {
            attempt += 1;
            tracing::warn!(%error, rows = batch.len(), attempt, "Writing heartbeats failed; retrying.");
            if attempt >= 5 {
                tracing::error!(%error, rows = batch.len(), "Dropping a heartbeat batch; devices re-report on their next heartbeat.");
                metrics.heartbeat_batches_dropped.inc();
                break;
            }
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
        timer.observe_duration();
        // Each minute was acknowledged to its till: a failed write loses
        // it (canary analysis then sees that till-minute as missing, on
        // whichever side the till is).
        let mut attempt = 0;
        while !signals.is_empty() {
            let Err(error) = storage.record_signal_minutes(&signals).await else {
                break;
            };
            attempt += 1;
            if attempt >= 3 {
                tracing::error!(%error, devices = signals.len(), "Dropping a batch of signal minutes.");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
    }
}

/// Keeps the newest heartbeat of each device, in arrival order, and every
/// signal minute of them all (each heartbeat brought other minutes).
fn latest_per_device(batch: Vec<Beat>) -> (Vec<HeartbeatRecord>, Vec<DeviceSignals>) {
    let mut index: HashMap<String, usize> = HashMap::with_capacity(batch.len());
    let mut out: Vec<HeartbeatRecord> = Vec::with_capacity(batch.len());
    let mut signals: Vec<DeviceSignals> = Vec::new();
    for Beat {
        record,
        signals: minutes,
    } in batch
    {
        match index.get(&record.device_id) {
            Some(&i) => out[i] = record,
            None => {
                index.insert(record.device_id.clone(), out.len());
                out.push(record);
            }
        }
        if let Some(minutes) = minutes.filter(|m| !m.minutes.is_empty()) {
            signals.push(minutes);
        }
    }
    (out, signals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_lengthens_as_the_queue_fills() {
        for (queued, expected) in [
            (0, 30),
            (499, 30),
            (500, 60),
            (749, 60),
            (750, 120),
            (1000, 120),
        ] {
            assert_eq!(
                interval_for_load(30, queued, 1000),
                expected,
                "queued {queued}"
            );
        }
        assert_eq!(interval_for_load(u32::MAX, 1000, 1000), u32::MAX);
    }

    #[test]
    fn a_batch_keeps_the_newest_heartbeat_per_device() {
        let hb = |id: &str, at| Beat {
            record: HeartbeatRecord {
                device_id: id.into(),
                seen_at_ms: at,
                heartbeat_interval_seconds: 30,
                agent_version: String::new(),
                installed_bundles: Default::default(),
                agent_uptime_seconds: 0,
                health: Default::default(),
            },
            signals: Some(DeviceSignals {
                device_id: id.into(),
                store_id: "s".into(),
                minutes: vec![crate::storage::SignalMinuteRecord {
                    minute: at,
                    ..Default::default()
                }],
            }),
        };
        let (out, signals) = latest_per_device(vec![hb("a", 1), hb("b", 2), hb("a", 3)]);
        let minutes: Vec<_> = signals
            .iter()
            .map(|s| (s.device_id.as_str(), s.minutes[0].minute))
            .collect();
        assert_eq!(minutes, vec![("a", 1), ("b", 2), ("a", 3)]);
        let seen: Vec<_> = out
            .iter()
            .map(|r| (r.device_id.as_str(), r.seen_at_ms))
            .collect();
        assert_eq!(seen, vec![("a", 3), ("b", 2)]);
    }
}
